//! The container's network, as the host sees it in the container's network
//! namespace (Docker, CNI, Kubernetes), for the agent to apply to the guest's
//! interfaces (`RunRequest::network`, protocol 7).
//!
//! The VM is the sandbox: the container shares the guest's network namespace,
//! so the agent configures the guest's own interfaces (the virtio-net `eth0`)
//! to look like the host namespace's interface: MAC, MTU, addresses, routes.

use std::collections::HashSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::validate::ValidationError;

/// Most interfaces in one [`NetworkConfig`].
pub const MAX_INTERFACES: usize = 8;
/// Most addresses on one interface.
pub const MAX_ADDRESSES: usize = 32;
/// Most routes in one [`NetworkConfig`].
pub const MAX_ROUTES: usize = 64;
/// Longest interface name, in bytes (`IFNAMSIZ` - 1).
pub const MAX_IFNAME: usize = 15;
/// Smallest MTU accepted (IPv4's minimum, RFC 791).
pub const MIN_MTU: u32 = 68;
/// Largest MTU accepted.
pub const MAX_MTU: u32 = 65535;

/// The network the agent gives the guest before the container's process is
/// made: interfaces first (in order), then routes (in order).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Interfaces to configure; each is brought up.
    pub interfaces: Vec<InterfaceConfig>,
    /// Routes to add once every interface is up.
    pub routes: Vec<RouteConfig>,
}

/// One guest interface and what it gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceConfig {
    /// The guest interface to configure, e.g. `eth0`.
    pub name: String,
    /// MAC address to set (unicast, not all-zero); `None` keeps the device's.
    pub mac: Option<[u8; 6]>,
    /// MTU to set (68..=65535); `None` keeps the device's.
    pub mtu: Option<u32>,
    /// Addresses to add, with their prefix length.
    pub addresses: Vec<IpNet>,
}

/// An address with its prefix length (`10.88.0.2/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length: at most 32 for IPv4, 128 for IPv6.
    pub prefix_len: u8,
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One route: `destination` via `gateway` and/or out of `device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// Destination network; `None` is the default route.
    pub destination: Option<IpNet>,
    /// Next hop; `None` makes a link-scope route out of `device`.
    pub gateway: Option<IpAddr>,
    /// Interface name to route out of.
    pub device: Option<String>,
}

impl std::fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.destination {
            Some(d) => write!(f, "{d}")?,
            None => f.write_str("default")?,
        }
        if let Some(g) = &self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(d) = &self.device {
            write!(f, " dev {d}")?;
        }
        Ok(())
    }
}

impl NetworkConfig {
    /// Whether any address or route is IPv6.
    pub fn wants_ipv6(&self) -> bool {
        self.interfaces
            .iter()
            .flat_map(|i| &i.addresses)
            .any(|a| a.addr.is_ipv6())
            || self.routes.iter().any(|r| {
                r.destination.is_some_and(|d| d.addr.is_ipv6())
                    || r.gateway.is_some_and(|g| g.is_ipv6())
            })
    }
}

fn bad(field: &'static str, value: impl std::fmt::Display, allowed: &str) -> ValidationError {
    ValidationError::OutOfRange {
        field,
        value: value.to_string().chars().take(64).collect(),
        allowed: allowed.to_owned(),
    }
}

fn count(field: &'static str, len: usize, max: usize) -> Result<(), ValidationError> {
    if len > max {
        return Err(ValidationError::TooMany { field, len, max });
    }
    Ok(())
}

/// An interface name as the kernel takes it (`dev_valid_name`): 1..=15
/// bytes, no `/`, NUL, whitespace or `:`, not `.` or `..`.
pub fn validate_ifname(name: &str) -> Result<(), ValidationError> {
    const ALLOWED: &str = "1..=15 bytes without '/', ':', NUL or whitespace, not '.' or '..'";
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(bad("interface name", format!("{name:?}"), ALLOWED))
    }
}

fn validate_ipnet(field: &'static str, n: &IpNet) -> Result<(), ValidationError> {
    let max = if n.addr.is_ipv4() { 32 } else { 128 };
    if n.prefix_len > max {
        return Err(bad(
            field,
            n,
            if max == 32 {
                "prefix length 0..=32 for IPv4"
            } else {
                "prefix length 0..=128 for IPv6"
            },
        ));
    }
    Ok(())
}

fn validate_mac(mac: &[u8; 6]) -> Result<(), ValidationError> {
    let text = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    if mac[0] & 1 != 0 {
        return Err(bad(
            "MAC address",
            text,
            "a unicast address (bit 0 of byte 0 clear)",
        ));
    }
    if mac.iter().all(|&b| b == 0) {
        return Err(bad("MAC address", text, "a non-zero address"));
    }
    Ok(())
}

impl crate::Validate for NetworkConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        count("network interfaces", self.interfaces.len(), MAX_INTERFACES)?;
        count("network routes", self.routes.len(), MAX_ROUTES)?;
        let mut names = HashSet::new();
        for i in &self.interfaces {
            validate_ifname(&i.name)?;
            if !names.insert(i.name.as_str()) {
                return Err(bad(
                    "interface name",
                    format!("{:?}", i.name),
                    "each interface once",
                ));
            }
            if let Some(mac) = &i.mac {
                validate_mac(mac)?;
            }
            if let Some(mtu) = i.mtu
                && !(MIN_MTU..=MAX_MTU).contains(&mtu)
            {
                return Err(bad("MTU", mtu, "68..=65535"));
            }
            count("interface addresses", i.addresses.len(), MAX_ADDRESSES)?;
            for a in &i.addresses {
                validate_ipnet("interface address", a)?;
            }
        }
        for r in &self.routes {
            if r.gateway.is_none() && r.device.is_none() {
                return Err(bad("route", r, "a gateway or a device (or both)"));
            }
            if let Some(d) = &r.device {
                validate_ifname(d)?;
            }
            if let Some(d) = &r.destination {
                validate_ipnet("route destination", d)?;
            }
            if let (Some(d), Some(g)) = (&r.destination, &r.gateway)
                && d.addr.is_ipv4() != g.is_ipv4()
            {
                return Err(bad(
                    "route",
                    r,
                    "a gateway of the destination's address family",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::Validate;

    fn v4(a: [u8; 4], prefix_len: u8) -> IpNet {
        IpNet {
            addr: IpAddr::V4(Ipv4Addr::from(a)),
            prefix_len,
        }
    }

    fn eth0() -> InterfaceConfig {
        InterfaceConfig {
            name: "eth0".into(),
            mac: Some([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
            mtu: Some(1500),
            addresses: vec![v4([10, 88, 0, 2], 16)],
        }
    }

    fn default_route() -> RouteConfig {
        RouteConfig {
            destination: None,
            gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 88, 0, 1))),
            device: None,
        }
    }

    fn config() -> NetworkConfig {
        NetworkConfig {
            interfaces: vec![eth0()],
            routes: vec![default_route()],
        }
    }

    fn with_iface(f: impl FnOnce(&mut InterfaceConfig)) -> NetworkConfig {
        let mut c = config();
        f(&mut c.interfaces[0]);
        c
    }

    fn with_route(f: impl FnOnce(&mut RouteConfig)) -> NetworkConfig {
        let mut c = config();
        f(&mut c.routes[0]);
        c
    }

    #[track_caller]
    fn refused(c: &NetworkConfig, what: &str) {
        let e = c.validate().expect_err(what);
        assert!(
            e.to_string().contains(what),
            "error {e:?} does not mention {what:?}"
        );
    }

    #[test]
    fn test_network_good_config_accepted() {
        config().validate().unwrap();
        NetworkConfig::default().validate().unwrap();
        // The limits themselves are fine.
        let mut c = config();
        c.interfaces = (0..MAX_INTERFACES)
            .map(|n| InterfaceConfig {
                name: format!("eth{n}"),
                addresses: vec![v4([10, 0, 0, 1], 8); MAX_ADDRESSES],
                ..eth0()
            })
            .collect();
        c.routes = vec![default_route(); MAX_ROUTES];
        c.validate().unwrap();
    }

    #[test]
    fn test_network_interface_count_bounded() {
        let mut c = config();
        c.interfaces = (0..=MAX_INTERFACES)
            .map(|n| InterfaceConfig {
                name: format!("eth{n}"),
                ..eth0()
            })
            .collect();
        assert_eq!(
            c.validate(),
            Err(ValidationError::TooMany {
                field: "network interfaces",
                len: MAX_INTERFACES + 1,
                max: MAX_INTERFACES
            })
        );
    }

    #[test]
    fn test_network_address_count_bounded() {
        let c = with_iface(|i| i.addresses = vec![v4([10, 0, 0, 1], 8); MAX_ADDRESSES + 1]);
        assert_eq!(
            c.validate(),
            Err(ValidationError::TooMany {
                field: "interface addresses",
                len: MAX_ADDRESSES + 1,
                max: MAX_ADDRESSES
            })
        );
    }

    #[test]
    fn test_network_route_count_bounded() {
        let mut c = config();
        c.routes = vec![default_route(); MAX_ROUTES + 1];
        assert_eq!(
            c.validate(),
            Err(ValidationError::TooMany {
                field: "network routes",
                len: MAX_ROUTES + 1,
                max: MAX_ROUTES
            })
        );
    }

    #[test]
    fn test_network_interface_names_checked() {
        for good in ["eth0", "a", "enp0s1-x_y.z", &"e".repeat(MAX_IFNAME)] {
            with_iface(|i| i.name = good.into()).validate().unwrap();
        }
        for badname in [
            "",
            &"e".repeat(MAX_IFNAME + 1),
            "a/b",
            "a\0b",
            "a b",
            "a\tb",
            "eth0:1",
            ".",
            "..",
        ] {
            refused(&with_iface(|i| i.name = badname.into()), "interface name");
        }
        // A route's device is an interface name too.
        refused(
            &with_route(|r| r.device = Some("eth0:1".into())),
            "interface name",
        );
    }

    #[test]
    fn test_network_interface_names_unique() {
        let mut c = config();
        c.interfaces.push(InterfaceConfig {
            mac: None,
            ..eth0()
        });
        refused(&c, "each interface once");
        c.interfaces[1].name = "eth1".into();
        c.validate().unwrap();
    }

    #[test]
    fn test_network_mac_unicast_nonzero() {
        refused(
            &with_iface(|i| i.mac = Some([0x01, 0, 0x5e, 0, 0, 1])),
            "unicast",
        );
        refused(&with_iface(|i| i.mac = Some([0xff; 6])), "unicast");
        refused(&with_iface(|i| i.mac = Some([0; 6])), "non-zero");
        // Locally administered (bit 1) is fine; so is no MAC.
        with_iface(|i| i.mac = Some([0x02, 0, 0, 0, 0, 1]))
            .validate()
            .unwrap();
        with_iface(|i| i.mac = None).validate().unwrap();
    }

    #[test]
    fn test_network_mtu_range() {
        for ok in [MIN_MTU, 1400, 9000, MAX_MTU] {
            with_iface(|i| i.mtu = Some(ok)).validate().unwrap();
        }
        for no in [0, MIN_MTU - 1, MAX_MTU + 1, u32::MAX] {
            refused(&with_iface(|i| i.mtu = Some(no)), "68..=65535");
        }
    }

    #[test]
    fn test_network_prefix_len_by_family() {
        with_iface(|i| i.addresses = vec![v4([10, 0, 0, 1], 32)])
            .validate()
            .unwrap();
        refused(
            &with_iface(|i| i.addresses = vec![v4([10, 0, 0, 1], 33)]),
            "0..=32",
        );
        let v6 = |prefix_len| IpNet {
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            prefix_len,
        };
        with_iface(|i| i.addresses = vec![v6(128)])
            .validate()
            .unwrap();
        refused(&with_iface(|i| i.addresses = vec![v6(129)]), "0..=128");
        refused(
            &with_route(|r| r.destination = Some(v4([10, 0, 0, 0], 40))),
            "0..=32",
        );
    }

    #[test]
    fn test_network_route_needs_gateway_or_device() {
        refused(
            &with_route(|r| {
                r.gateway = None;
                r.device = None;
            }),
            "a gateway or a device",
        );
        // A link-scope route: device, no gateway.
        with_route(|r| {
            r.gateway = None;
            r.device = Some("eth0".into());
            r.destination = Some(v4([10, 88, 0, 0], 16));
        })
        .validate()
        .unwrap();
    }

    #[test]
    fn test_network_route_gateway_family_matches() {
        refused(
            &with_route(|r| {
                r.destination = Some(v4([10, 0, 0, 0], 8));
                r.gateway = Some(IpAddr::V6(Ipv6Addr::LOCALHOST));
            }),
            "address family",
        );
    }

    #[test]
    fn test_network_wants_ipv6() {
        assert!(!config().wants_ipv6());
        assert!(
            with_iface(|i| i.addresses.push(IpNet {
                addr: "fd00::2".parse().unwrap(),
                prefix_len: 64
            }))
            .wants_ipv6()
        );
        assert!(with_route(|r| r.gateway = Some("fd00::1".parse().unwrap())).wants_ipv6());
    }

    #[test]
    fn test_network_display() {
        assert_eq!(default_route().to_string(), "default via 10.88.0.1");
        let r = RouteConfig {
            destination: Some(v4([10, 88, 0, 0], 16)),
            gateway: None,
            device: Some("eth0".into()),
        };
        assert_eq!(r.to_string(), "10.88.0.0/16 dev eth0");
    }

    #[test]
    fn test_network_round_trips_on_the_wire() {
        let mut c = config();
        c.interfaces[0].addresses.push(IpNet {
            addr: "fd00::2".parse().unwrap(),
            prefix_len: 64,
        });
        c.routes.push(RouteConfig {
            destination: Some(v4([192, 168, 1, 0], 24)),
            gateway: None,
            device: Some("eth0".into()),
        });
        let bytes = postcard::to_stdvec(&c).unwrap();
        assert_eq!(postcard::from_bytes::<NetworkConfig>(&bytes).unwrap(), c);

        // Inside a Create, through the framing (validated on both sides).
        let msgs = [Some(c), None].map(|network| {
            let mut wire = Vec::new();
            let mut req = crate::validate::tests::run();
            req.network = network;
            let msg = crate::HostMessage::Create(Box::new(req));
            crate::write_message(&mut wire, &msg).unwrap();
            (wire, msg)
        });
        for (wire, msg) in msgs {
            let got: crate::HostMessage = crate::read_message(&mut wire.as_slice()).unwrap();
            assert_eq!(got, msg);
        }
    }
}
