//! The container's network for its VM (issue 20, runtime side; first step): a tap made inside
//! the network namespace the bundle names (Docker's, a CNI plugin's) and connected to that
//! namespace's interface by tc redirects both ways: an ingress qdisc on each and a match-all u32
//! filter whose mirred action redirects to the other's egress, as Kata's `tcfilter` model does.
//! The interface itself keeps its addresses; what the guest needs to take its place (MAC, MTU,
//! addresses) is read at the same time, for the agent to configure the guest's interface.
//!
//! The supervisor calls it before the restore (and before its jail) when the bundle names a
//! network namespace; the tap goes to the template's net slot and [`ContainerInterface::guest_config`]
//! to the agent (`RunRequest::network`).

use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use agent_protocol::{InterfaceConfig, IpNet, NetworkConfig, RouteConfig};
use futures_util::TryStreamExt;
use rtnetlink::LinkUnspec;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

/// The tap's name in the container's network namespace.
pub const TAP_NAME: &str = "tap0_kata";
/// `ETH_P_ALL`: the filters take every frame.
const ETH_P_ALL: u16 = 0x0003;
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// Errors connecting a tap to a container's interface.
#[derive(Debug, thiserror::Error)]
pub enum ContainerNetError {
    /// The namespace could not be entered.
    #[error("cannot enter the network namespace {path}: {reason}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The tap could not be made.
    #[error(transparent)]
    Tap(#[from] vmm::vm::virtio::TapError),
    /// A netlink request failed.
    #[error("netlink: {what}: {reason}")]
    Netlink {
        /// What was being done.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The namespace has no interface to connect the tap to.
    #[error("the network namespace has no interface besides loopback")]
    NoInterface,
    /// The helper thread failed.
    #[error("the network set-up thread: {0}")]
    Thread(String),
}

/// The namespace's interface, as the guest's must look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInterface {
    /// Its name in the namespace (`eth0`).
    pub name: String,
    /// Its MAC (the guest's interface takes it: the network knows the container by it).
    pub mac: Vec<u8>,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses with their prefix lengths.
    pub addrs: Vec<(IpAddr, u8)>,
    /// The routes of the main table through it that the guest must add itself: not those the
    /// kernel makes for an address's own subnet (`proto kernel`), which the guest's kernel makes
    /// too when it gets the address.
    pub routes: Vec<ContainerRoute>,
}

impl ContainerInterface {
    /// What the agent gives the guest's interface `guest_name` so that it takes this one's place:
    /// its MAC, MTU, IPv4 addresses and routes. The guest kernel has no IPv6: IPv6 addresses
    /// and routes are left out and returned, one line each (link-local ones, which every
    /// interface with IPv6 has, silently).
    pub fn guest_config(&self, guest_name: &str) -> (NetworkConfig, Vec<String>) {
        let mut dropped = Vec::new();
        let net = |(addr, prefix_len): (IpAddr, u8)| IpNet { addr, prefix_len };
        let mut addresses = Vec::new();
        for &(ip, len) in &self.addrs {
            match ip {
                IpAddr::V4(_) => addresses.push(net((ip, len))),
                IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {}
                IpAddr::V6(_) => dropped.push(format!(
                    "address {ip}/{len} of {} not given to the guest (its kernel has no IPv6)",
                    self.name
                )),
            }
        }
        let mut routes = Vec::new();
        for r in &self.routes {
            let v6 = r.destination.is_some_and(|(d, _)| d.is_ipv6())
                || r.gateway.is_some_and(|g| g.is_ipv6());
            if v6 {
                dropped.push(format!(
                    "an IPv6 route of {} not given to the guest (its kernel has no IPv6)",
                    self.name
                ));
                continue;
            }
            routes.push(RouteConfig {
                destination: r.destination.map(net),
                gateway: r.gateway,
                device: Some(guest_name.to_string()),
            });
        }
        let config = NetworkConfig {
            interfaces: vec![InterfaceConfig {
                name: guest_name.to_string(),
                mac: <[u8; 6]>::try_from(self.mac.as_slice()).ok(),
                mtu: Some(self.mtu),
                addresses,
            }],
            routes,
        };
        (config, dropped)
    }
}

/// A route through the container's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRoute {
    /// Its destination and prefix length; `None`: the default route.
    pub destination: Option<(IpAddr, u8)>,
    /// Its gateway; `None`: on link.
    pub gateway: Option<IpAddr>,
}

/// A tap connected to a container's interface.
#[derive(Debug)]
pub struct ContainerNet {
    /// The tap, opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (for `HostResources::net`).
    pub tap: OwnedFd,
    /// The interface it is connected to.
    pub iface: ContainerInterface,
}

fn nl(what: &'static str) -> impl Fn(rtnetlink::Error) -> ContainerNetError {
    move |e| ContainerNetError::Netlink {
        what,
        reason: e.to_string(),
    }
}

/// Runs `f` on a thread of its own that has entered the network namespace at `netns`, with a
/// netlink connection there.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl AsyncFnOnce(rtnetlink::Handle) -> Result<T, ContainerNetError> + Send + 'static,
) -> Result<T, ContainerNetError> {
    let netns = netns.to_owned();
    std::thread::Builder::new()
        .name("container-net".into())
        .spawn(move || {
            let err = |reason: String| ContainerNetError::Netns {
                path: netns.clone(),
                reason,
            };
            // Not blocking on a FIFO planted there; setns refuses what is not a namespace.
            let f_ns = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&netns)
                .map_err(|e| err(e.to_string()))?;
            nix::sched::setns(f_ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| err(e.to_string()))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| ContainerNetError::Thread(e.to_string()))?;
            rt.block_on(async move {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|e| ContainerNetError::Netlink {
                        what: "socket",
                        reason: e.to_string(),
                    })?;
                tokio::spawn(conn);
                f(handle).await
            })
        })
        .map_err(|e| ContainerNetError::Thread(e.to_string()))?
        .join()
        .map_err(|_| ContainerNetError::Thread("panicked".into()))?
}

/// Removes what [`connect_tap`] put on the namespace's interface (its ingress qdisc and the
/// redirect under it), once the container's VM and tap are gone, so that the namespace is as
/// the engine made it. A namespace that is gone already is not an error.
pub fn disconnect(netns: &Path) -> Result<(), ContainerNetError> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(netns, async move |handle| {
        let links = list_links(&handle).await?;
        // A tap lives while a VM holds it: then another container uses this namespace (this
        // one failed before it had one) and its redirects stay.
        if links.iter().any(|l| link_name(l) == Some(TAP_NAME)) {
            return Ok(());
        }
        if let Some(link) = container_link(&links, None) {
            // None there (never connected, or removed already) is fine.
            let _ = del_ingress(&handle, link.header.index).await;
        }
        Ok(())
    })
}

/// [`disconnect`] of the namespace a container joined, if any, once its VM is gone; a failure
/// is logged (the container's teardown goes on).
pub fn release(netns: Option<&Path>) {
    if let Some(ns) = netns
        && let Err(e) = disconnect(ns)
    {
        tracing::warn!("{e}");
    }
}

async fn list_links(handle: &rtnetlink::Handle) -> Result<Vec<LinkMessage>, ContainerNetError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))
}

/// The namespace's interface the tap is connected to: `eth0`, else the first that is neither
/// loopback nor the tap.
fn container_link(links: &[LinkMessage], tap: Option<u32>) -> Option<&LinkMessage> {
    let candidates: Vec<&LinkMessage> = links
        .iter()
        .filter(|l| {
            Some(l.header.index) != tap
                && link_name(l) != Some(TAP_NAME)
                && !l.header.flags.contains(LinkFlags::Loopback)
        })
        .collect();
    candidates
        .iter()
        .find(|l| link_name(l) == Some("eth0"))
        .or(candidates.first())
        .copied()
}

/// Deletes interface `index`'s ingress qdisc (and every filter under it).
async fn del_ingress(handle: &rtnetlink::Handle, index: u32) -> Result<(), rtnetlink::Error> {
    use rtnetlink::packet_route::tc::{TcAttribute, TcHandle};
    let mut req = handle.qdisc().del(index as i32);
    let m = req.message_mut();
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = TcHandle::from(INGRESS_PARENT);
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    req.execute().await
}

/// Makes tap `tap_name` inside the network namespace at `netns` and connects it with the
/// namespace's interface (`eth0`, else the first one that is not loopback). Runs on a thread of
/// its own, which alone enters the namespace.
pub fn connect_tap(netns: &Path, tap_name: &str) -> Result<ContainerNet, ContainerNetError> {
    let tap_name = tap_name.to_owned();
    in_netns(netns, async move |handle| {
        // Opened here: a tap belongs to the namespace its opener is in. A tap of this name in
        // use by another container's VM is refused (EBUSY) here.
        let tap = vmm::vm::virtio::open_tap_fd(&tap_name)?;
        let iface = connect(&handle, &tap_name).await?;
        Ok(ContainerNet { tap, iface })
    })
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

async fn connect(
    handle: &rtnetlink::Handle,
    tap_name: &str,
) -> Result<ContainerInterface, ContainerNetError> {
    let links = list_links(handle).await?;
    let tap = links
        .iter()
        .find(|l| link_name(l) == Some(tap_name))
        .ok_or(ContainerNetError::NoInterface)?
        .header
        .index;
    let link = container_link(&links, Some(tap)).ok_or(ContainerNetError::NoInterface)?;
    let index = link.header.index;
    let mut iface = ContainerInterface {
        name: link_name(link).unwrap_or_default().to_string(),
        mac: Vec::new(),
        mtu: 1500,
        addrs: Vec::new(),
        routes: Vec::new(),
    };
    for a in &link.attributes {
        match a {
            LinkAttribute::Address(mac) => iface.mac = mac.clone(),
            LinkAttribute::Mtu(m) => iface.mtu = *m,
            _ => {}
        }
    }
    let addrs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list addresses"))?;
    for a in addrs {
        if let Some(ip) = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        }) {
            iface.addrs.push((ip, a.header.prefix_len));
        }
    }
    iface.routes = routes(handle, index).await?;
    // Redirects left by an earlier container of this namespace whose `delete` never ran (its
    // tap is gone: this one could take the name) would send the interface's frames nowhere.
    let _ = del_ingress(handle, index).await;

    // The tap takes the interface's MTU, so frames the guest may send fit.
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap).mtu(iface.mtu).up().build())
        .execute()
        .await
        .map_err(nl("bring the tap up"))?;
    for (from, to) in [(index, tap), (tap, index)] {
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(nl("add an ingress qdisc"))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            // The kernel reads the filter's protocol in network byte order.
            .protocol(ETH_P_ALL.to_be())
            .redirect(to)
            .map_err(nl("build a redirect filter"))?
            .execute()
            .await
            .map_err(nl("add a redirect filter"))?;
    }
    Ok(iface)
}

/// The IPv4 routes of the main table out of interface `index`, without the kernel's own.
async fn routes(
    handle: &rtnetlink::Handle,
    index: u32,
) -> Result<Vec<ContainerRoute>, ContainerNetError> {
    use rtnetlink::packet_route::route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteProtocol, RouteType,
    };
    let msgs: Vec<_> = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("list routes"))?;
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut out = Vec::new();
    for m in msgs {
        let table = m
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(m.header.table));
        let oif = m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if table != u32::from(RouteHeader::RT_TABLE_MAIN)
            || oif != Some(index)
            || m.header.kind != RouteType::Unicast
            || m.header.protocol == RouteProtocol::Kernel
        {
            continue;
        }
        let destination = m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(d) => {
                ip(d).map(|d| (d, m.header.destination_prefix_length))
            }
            _ => None,
        });
        let gateway = m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(g) => ip(g),
            _ => None,
        });
        out.push(ContainerRoute {
            destination,
            gateway,
        });
    }
    // Routes on link first: a gateway must be reachable when its route is added.
    out.sort_by_key(|r| r.gateway.is_some());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::process::Command;
    use std::time::{Duration, Instant};

    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }

    struct Ns(String);

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.0]);
        }
    }

    /// The guest gets the interface's MAC, MTU, IPv4 addresses and routes; IPv6 is left out
    /// (link-local silently, others named), as the guest kernel has none.
    #[test]
    fn test_guest_config_takes_ipv4_and_names_what_it_leaves_out() {
        let iface = ContainerInterface {
            name: "eth0".into(),
            mac: vec![2, 0x42, 0xac, 0x11, 0, 2],
            mtu: 1450,
            addrs: vec![
                ("172.17.0.2".parse().unwrap(), 16),
                ("fe80::42:acff:fe11:2".parse().unwrap(), 64),
                ("2001:db8::2".parse().unwrap(), 64),
            ],
            routes: vec![
                ContainerRoute {
                    destination: None,
                    gateway: Some("172.17.0.1".parse().unwrap()),
                },
                ContainerRoute {
                    destination: None,
                    gateway: Some("2001:db8::1".parse().unwrap()),
                },
            ],
        };
        let (c, dropped) = iface.guest_config("eth0");
        assert_eq!(
            c,
            NetworkConfig {
                interfaces: vec![InterfaceConfig {
                    name: "eth0".into(),
                    mac: Some([2, 0x42, 0xac, 0x11, 0, 2]),
                    mtu: Some(1450),
                    addresses: vec![IpNet {
                        addr: "172.17.0.2".parse().unwrap(),
                        prefix_len: 16
                    }],
                }],
                routes: vec![RouteConfig {
                    destination: None,
                    gateway: Some("172.17.0.1".parse().unwrap()),
                    device: Some("eth0".into()),
                }],
            }
        );
        assert_eq!(dropped.len(), 2, "{dropped:?}");
        assert!(dropped[0].contains("2001:db8::2/64"), "{dropped:?}");
        agent_protocol::Validate::validate(&c).unwrap();
    }

    /// An ARP request from the container's address (as its guest would send it) goes out
    /// through the redirects and the host's answer comes back on the tap.
    #[test]
    fn test_connect_tap_redirects_both_ways() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: needs root for a netns, a veth pair and a tap");
            return;
        }
        let id = std::process::id() % 100_000;
        let ns = Ns(format!("ksn-cn{id}"));
        let host = format!("ksn-vh{id}");
        let ok = ip(&["netns", "add", &ns.0])
            && ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
            ])
            && ip(&["addr", "add", "10.79.0.1/24", "dev", &host])
            && ip(&["link", "set", &host, "up"])
            && ip(&["-n", &ns.0, "addr", "add", "10.79.0.2/24", "dev", "eth0"])
            && ip(&["-n", &ns.0, "link", "set", "eth0", "up"])
            && ip(&["-n", &ns.0, "route", "add", "default", "via", "10.79.0.1"])
            && ip(&["-n", &ns.0, "route", "add", "10.80.0.0/16", "dev", "eth0"]);
        if !ok {
            println!("SKIPPED: ip(8) could not make a netns with a veth pair");
            return;
        }
        let c = connect_tap(Path::new(&format!("/run/netns/{}", ns.0)), "tap0_kata").unwrap();
        assert_eq!(c.iface.name, "eth0");
        assert_eq!(c.iface.mac.len(), 6);
        assert!(
            c.iface.addrs.contains(&("10.79.0.2".parse().unwrap(), 24)),
            "{:?}",
            c.iface.addrs
        );
        // The default route and the on-link one, not the address's own subnet (the kernel's).
        assert_eq!(
            c.iface.routes,
            vec![
                ContainerRoute {
                    destination: Some(("10.80.0.0".parse().unwrap(), 16)),
                    gateway: None,
                },
                ContainerRoute {
                    destination: None,
                    gateway: Some("10.79.0.1".parse().unwrap()),
                },
            ]
        );
        // The tap's default virtio-net header is 10 bytes.
        let mut frame = vec![0u8; 10];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&c.iface.mac);
        frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&c.iface.mac);
        frame.extend_from_slice(&[10, 79, 0, 2, 0, 0, 0, 0, 0, 0, 10, 79, 0, 1]);
        // SAFETY: write reads `frame` for its length; the fd is open.
        let n = unsafe { libc::write(c.tap.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(
            n as usize,
            frame.len(),
            "{}",
            std::io::Error::last_os_error()
        );
        let end = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 2048];
        let mut answered = false;
        while !answered && Instant::now() < end {
            // SAFETY: read writes at most `buf.len()` bytes into `buf`; the fd is open.
            let n = unsafe { libc::read(c.tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let f = &buf[10..n as usize];
            answered = f.len() >= 42
                && f[12..14] == [0x08, 0x06]
                && f[21] == 2
                && f[28..32] == [10, 79, 0, 1]
                && f[32..38] == c.iface.mac[..];
        }
        assert!(answered, "no ARP reply came back through the tap");
    }
}
