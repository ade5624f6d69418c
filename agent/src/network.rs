//! The container's network: the agent gives the guest's interfaces what the
//! host namespace's interface has (`RunRequest::network`), over rtnetlink,
//! in its own network namespace, which the container shares (the VM is the
//! sandbox). Also brings `lo` up at start, as runc does in a new namespace.
//!
//! Messages are built and parsed by `netlink-packet-route`; the socket is
//! `netlink-sys`'s synchronous one (the agent is a single-threaded poll loop).
//! Every request asks for an acknowledgement and waits for it, every answer is
//! read into a bounded buffer and checked (`NLMSG_ERROR` with its errno), and
//! the socket has a receive timeout so a kernel that never answers cannot
//! hang the agent.

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_protocol::{InterfaceConfig, IpNet, NetworkConfig, RouteConfig};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
use nix::sys::time::TimeVal;
use thiserror::Error;

/// How long one netlink answer may take (`SO_RCVTIMEO`, and the bound on a
/// whole exchange).
pub const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest datagram read from the kernel; a larger one is an error, not a
/// silent truncation.
const RECV_BUFFER: usize = 64 * 1024;
/// Most messages one dump may return.
const MAX_DUMP_MESSAGES: usize = 4096;
/// Most datagrams one exchange may read.
const MAX_DATAGRAMS: usize = 4096;
/// Most interface names listed in a "not found" error.
const MAX_LISTED: usize = 32;

/// A failed netlink exchange.
#[derive(Debug, Error)]
pub enum NetlinkError {
    /// The kernel refused the request.
    #[error("{0}")]
    Kernel(Errno),
    /// No answer within [`NETLINK_TIMEOUT`].
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
    /// The socket failed.
    #[error("netlink socket: {0}")]
    Io(io::Error),
    /// An answer that does not parse, is truncated or is too long.
    #[error("bad netlink answer: {0}")]
    Malformed(String),
}

/// Why the network could not be configured; each names the interface (or
/// route) and the step.
#[derive(Debug, Error)]
pub enum NetworkError {
    /// No netlink socket.
    #[error("cannot open a netlink socket: {0}")]
    Open(NetlinkError),
    /// The interface is not in the guest.
    #[error("interface {name:?} not found in the guest (it has: {existing})")]
    NoSuchInterface {
        /// The name asked for.
        name: String,
        /// The guest's interfaces, comma-separated.
        existing: String,
    },
    /// An IPv6 address or route on a guest kernel without IPv6.
    #[error("{what}: the guest kernel has no IPv6")]
    NoIpv6 {
        /// What asked for it.
        what: String,
    },
    /// A step on an interface failed.
    #[error("interface {interface}: {step}: {source}")]
    Interface {
        /// The interface.
        interface: String,
        /// What was being done (`set MTU 1400`).
        step: String,
        /// The cause.
        source: NetlinkError,
    },
    /// Adding a route failed.
    #[error("route {route}: {source}")]
    Route {
        /// The route, as `ip route` shows it.
        route: String,
        /// The cause.
        source: NetlinkError,
    },
}

/// A synchronous rtnetlink socket.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens and binds a `NETLINK_ROUTE` socket in the caller's network
    /// namespace, with a receive timeout of [`NETLINK_TIMEOUT`].
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Io)?;
        socket.bind_auto().map_err(NetlinkError::Io)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Io)?;
        let t = TimeVal::new(
            NETLINK_TIMEOUT.as_secs() as _,
            NETLINK_TIMEOUT.subsec_micros() as _,
        );
        setsockopt(&socket, ReceiveTimeout, &t)
            .map_err(|e| NetlinkError::Io(io::Error::from(e)))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// Sends `msg` with `flags` and reads answers until its acknowledgement
    /// (or, for a dump, `NLMSG_DONE`). Returns the answers' inner messages
    /// (a dump's entries).
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut out = vec![0u8; req.buffer_len()];
        req.serialize(&mut out);
        let sent = self.socket.send(&out, 0).map_err(NetlinkError::Io)?;
        if sent != out.len() {
            return Err(NetlinkError::Malformed(format!(
                "sent {sent} of {} bytes",
                out.len()
            )));
        }
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let deadline = Instant::now() + NETLINK_TIMEOUT;
        let mut found = Vec::new();
        for _ in 0..MAX_DATAGRAMS {
            if Instant::now() >= deadline {
                return Err(NetlinkError::Timeout(NETLINK_TIMEOUT));
            }
            self.buf.clear();
            let n = match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(NetlinkError::Timeout(NETLINK_TIMEOUT));
                }
                Err(e) => return Err(NetlinkError::Io(e)),
            };
            if n > self.buf.len() {
                return Err(NetlinkError::Malformed(format!(
                    "a {n}-byte answer is larger than the {RECV_BUFFER}-byte buffer"
                )));
            }
            if let Some(done) = parse_datagram(&self.buf[..n], seq, dump, &mut found)? {
                return done.map(|()| found);
            }
        }
        Err(NetlinkError::Malformed(format!(
            "no end of the answer after {MAX_DATAGRAMS} datagrams"
        )))
    }

    /// A request answered by an acknowledgement only.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkError> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_ACK | flags)
            .map(drop)
    }

    /// The index of interface `name`, or `None` when there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.exchange(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST) {
            Ok(answers) => answers
                .into_iter()
                .find_map(|m| match m {
                    RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                    _ => None,
                })
                .ok_or_else(|| NetlinkError::Malformed("no link in the answer".into()))
                .map(Some),
            Err(NetlinkError::Kernel(Errno::ENODEV)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The names of every interface, in index order (at most
    /// [`MAX_DUMP_MESSAGES`]).
    pub fn link_names(&mut self) -> Result<Vec<String>, NetlinkError> {
        let answers = self.exchange(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        let mut links: Vec<(u32, String)> = answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => {
                    let name = l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some((l.header.index, name))
                }
                _ => None,
            })
            .collect();
        links.sort();
        Ok(links.into_iter().map(|(_, n)| n).collect())
    }

    fn set_link(
        &mut self,
        index: u32,
        f: impl FnOnce(&mut LinkMessage),
    ) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        f(&mut msg);
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// Sets the interface's MAC address.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.set_link(index, |m| {
            m.attributes.push(LinkAttribute::Address(mac.to_vec()))
        })
    }

    /// Sets the interface's MTU.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.set_link(index, |m| m.attributes.push(LinkAttribute::Mtu(mtu)))
    }

    /// Brings the interface up (`IFF_UP`).
    pub fn set_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.set_link(index, |m| {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        })
    }

    /// Adds an address; one already there (`EEXIST`) is fine.
    pub fn add_address(&mut self, index: u32, net: &IpNet) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.index = index;
        msg.header.prefix_len = net.prefix_len;
        match net.addr {
            IpAddr::V4(a) => {
                msg.header.family = AddressFamily::Inet;
                msg.attributes.push(AddressAttribute::Local(net.addr));
                msg.attributes.push(AddressAttribute::Address(net.addr));
                if net.prefix_len < 31 {
                    let host_bits = u32::MAX.checked_shr(net.prefix_len.into()).unwrap_or(0);
                    let brd = std::net::Ipv4Addr::from(u32::from(a) | host_bits);
                    msg.attributes.push(AddressAttribute::Broadcast(brd));
                }
            }
            IpAddr::V6(_) => {
                msg.header.family = AddressFamily::Inet6;
                msg.attributes.push(AddressAttribute::Local(net.addr));
                msg.attributes.push(AddressAttribute::Address(net.addr));
            }
        }
        ok_if_exists(self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ))
    }

    /// Adds a route to the main table; one already there (`EEXIST`, such as
    /// the prefix route the kernel made with the address) is fine. Without a
    /// gateway the route is link-scope (on `oif`).
    pub fn add_route(
        &mut self,
        destination: Option<&IpNet>,
        gateway: Option<IpAddr>,
        oif: Option<u32>,
    ) -> Result<(), NetlinkError> {
        let v6 = destination
            .map(|d| d.addr.is_ipv6())
            .or(gateway.map(|g| g.is_ipv6()));
        let mut msg = RouteMessage::default();
        msg.header.address_family = if v6 == Some(true) {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if let Some(d) = destination {
            msg.header.destination_prefix_length = d.prefix_len;
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(d.addr)));
        }
        if let Some(g) = gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(g)));
        }
        if let Some(i) = oif {
            msg.attributes.push(RouteAttribute::Oif(i));
        }
        ok_if_exists(self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ))
    }
}

fn ok_if_exists(r: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match r {
        Err(NetlinkError::Kernel(Errno::EEXIST)) => Ok(()),
        other => other,
    }
}

/// Parses one datagram of answers to request `seq`, appending a dump's
/// entries to `found`. `Some(Ok)` once the answer is complete (the
/// acknowledgement, or a dump's `NLMSG_DONE`), `Some(Err)` for a refusal,
/// `None` when more is to come. Answers to other sequence numbers (a late
/// answer to an earlier request) are skipped.
fn parse_datagram(
    mut data: &[u8],
    seq: u32,
    dump: bool,
    found: &mut Vec<RouteNetlinkMessage>,
) -> Result<Option<Result<(), NetlinkError>>, NetlinkError> {
    const HEADER: usize = 16;
    while !data.is_empty() {
        if data.len() < HEADER {
            return Err(NetlinkError::Malformed(format!(
                "{} trailing bytes, less than a header",
                data.len()
            )));
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < HEADER || len > data.len() {
            return Err(NetlinkError::Malformed(format!(
                "message length {len} with {} bytes left",
                data.len()
            )));
        }
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[..len])
            .map_err(|e| NetlinkError::Malformed(e.to_string()))?;
        data = &data[len.next_multiple_of(4).min(data.len())..];
        if msg.header.sequence_number != seq {
            continue;
        }
        match msg.payload {
            NetlinkPayload::Error(e) => {
                return Ok(Some(match e.code {
                    None => Ok(()),
                    Some(code) => Err(NetlinkError::Kernel(Errno::from_raw(-code.get()))),
                }));
            }
            NetlinkPayload::Done(_) => return Ok(Some(Ok(()))),
            NetlinkPayload::Overrun(_) => {
                return Err(NetlinkError::Malformed("overrun".into()));
            }
            NetlinkPayload::InnerMessage(m) => {
                if found.len() >= MAX_DUMP_MESSAGES {
                    return Err(NetlinkError::Malformed(format!(
                        "more than {MAX_DUMP_MESSAGES} entries"
                    )));
                }
                found.push(m);
                // A plain GET is answered by the object alone, no ACK.
                if !dump && msg.header.flags & netlink_packet_core::NLM_F_MULTIPART == 0 {
                    return Ok(Some(Ok(())));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Whether the kernel has IPv6 (the guest's is built without it).
fn kernel_has_ipv6() -> bool {
    Path::new("/proc/sys/net/ipv6").exists()
}

/// `EAFNOSUPPORT` on an IPv6 request means no IPv6 in the kernel.
fn no_ipv6(e: &NetlinkError, v6: bool) -> bool {
    v6 && matches!(e, NetlinkError::Kernel(Errno::EAFNOSUPPORT))
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Finds interface `name`; a missing one is an error listing what exists.
fn find(nl: &mut Netlink, name: &str) -> Result<u32, NetworkError> {
    let step = |source| NetworkError::Interface {
        interface: name.to_owned(),
        step: "look it up".into(),
        source,
    };
    match nl.link_index(name).map_err(step)? {
        Some(i) => Ok(i),
        None => {
            let existing = match nl.link_names() {
                Ok(names) if names.is_empty() => "none".to_owned(),
                Ok(names) => {
                    let more = names.len().saturating_sub(MAX_LISTED);
                    let mut s = names
                        .into_iter()
                        .take(MAX_LISTED)
                        .collect::<Vec<_>>()
                        .join(", ");
                    if more > 0 {
                        s.push_str(&format!(" and {more} more"));
                    }
                    s
                }
                Err(e) => format!("cannot list them: {e}"),
            };
            Err(NetworkError::NoSuchInterface {
                name: name.to_owned(),
                existing,
            })
        }
    }
}

fn configure_interface(nl: &mut Netlink, i: &InterfaceConfig) -> Result<(), NetworkError> {
    let index = find(nl, &i.name)?;
    let fail = |step: String| {
        let interface = i.name.clone();
        move |source| NetworkError::Interface {
            interface,
            step,
            source,
        }
    };
    if let Some(mac) = &i.mac {
        nl.set_mac(index, *mac)
            .map_err(fail(format!("set MAC {}", format_mac(mac))))?;
    }
    if let Some(mtu) = i.mtu {
        nl.set_mtu(index, mtu)
            .map_err(fail(format!("set MTU {mtu}")))?;
    }
    for a in &i.addresses {
        nl.add_address(index, a).map_err(|e| {
            if no_ipv6(&e, a.addr.is_ipv6()) {
                NetworkError::NoIpv6 {
                    what: format!("interface {}: address {a}", i.name),
                }
            } else {
                fail(format!("add address {a}"))(e)
            }
        })?;
    }
    nl.set_up(index).map_err(fail("bring it up".into()))?;
    tracing::info!(
        interface = %i.name,
        index,
        mtu = ?i.mtu,
        addresses = i.addresses.len(),
        "interface configured"
    );
    Ok(())
}

fn add_route(nl: &mut Netlink, r: &RouteConfig) -> Result<(), NetworkError> {
    let oif = match &r.device {
        Some(d) => Some(find(nl, d)?),
        None => None,
    };
    let v6 =
        r.destination.is_some_and(|d| d.addr.is_ipv6()) || r.gateway.is_some_and(|g| g.is_ipv6());
    nl.add_route(r.destination.as_ref(), r.gateway, oif)
        .map_err(|source| {
            if no_ipv6(&source, v6) {
                NetworkError::NoIpv6 {
                    what: format!("route {r}"),
                }
            } else {
                NetworkError::Route {
                    route: r.to_string(),
                    source,
                }
            }
        })
}

/// Applies `config` in the caller's network namespace: each interface (MAC,
/// MTU, addresses, up), then each route. An IPv6 address or route on a
/// kernel without IPv6 is refused before anything changes.
pub fn apply(config: &NetworkConfig) -> Result<(), NetworkError> {
    if config.wants_ipv6() && !kernel_has_ipv6() {
        let what = config
            .interfaces
            .iter()
            .find_map(|i| {
                i.addresses
                    .iter()
                    .find(|a| a.addr.is_ipv6())
                    .map(|a| format!("interface {}: address {a}", i.name))
            })
            .or_else(|| {
                config
                    .routes
                    .iter()
                    .find(|r| {
                        r.destination.is_some_and(|d| d.addr.is_ipv6())
                            || r.gateway.is_some_and(|g| g.is_ipv6())
                    })
                    .map(|r| format!("route {r}"))
            })
            .unwrap_or_else(|| "IPv6".into());
        return Err(NetworkError::NoIpv6 { what });
    }
    let mut nl = Netlink::open().map_err(NetworkError::Open)?;
    for i in &config.interfaces {
        configure_interface(&mut nl, i)?;
    }
    for r in &config.routes {
        add_route(&mut nl, r)?;
    }
    Ok(())
}

/// Brings the loopback interface up, as runc does in a new network
/// namespace: without it nothing in the container reaches 127.0.0.1.
pub fn bring_up_loopback() -> Result<(), NetworkError> {
    let mut nl = Netlink::open().map_err(NetworkError::Open)?;
    let index = find(&mut nl, "lo")?;
    nl.set_up(index).map_err(|source| NetworkError::Interface {
        interface: "lo".into(),
        step: "bring it up".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{ErrorMessage, NLM_F_MULTIPART};

    fn encode(seq: u32, flags: u16, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut h = NetlinkHeader::default();
        h.sequence_number = seq;
        h.flags = flags;
        let mut m = NetlinkMessage::new(h, payload);
        m.finalize();
        let mut out = vec![0; m.buffer_len()];
        m.serialize(&mut out);
        out
    }

    fn error(code: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(code);
        e.header = vec![0; 16];
        NetlinkPayload::Error(e)
    }

    #[test]
    fn test_parse_ack_and_errno() {
        let mut found = vec![];
        let ack = encode(3, 0, error(0));
        assert!(matches!(
            parse_datagram(&ack, 3, false, &mut found),
            Ok(Some(Ok(())))
        ));
        let nack = encode(3, 0, error(-libc::EINVAL));
        match parse_datagram(&nack, 3, false, &mut found) {
            Ok(Some(Err(NetlinkError::Kernel(Errno::EINVAL)))) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_parse_skips_other_sequence_numbers() {
        let mut found = vec![];
        let mut d = encode(2, 0, error(-libc::EINVAL));
        d.extend(encode(3, 0, error(0)));
        assert!(matches!(
            parse_datagram(&d, 3, false, &mut found),
            Ok(Some(Ok(())))
        ));
        // Only a stale answer: more is to come.
        let stale = encode(2, 0, error(0));
        assert!(matches!(
            parse_datagram(&stale, 3, false, &mut found),
            Ok(None)
        ));
    }

    #[test]
    fn test_parse_dump_collects_until_done() {
        let mut found = vec![];
        let link = |i| {
            let mut l = LinkMessage::default();
            l.header.index = i;
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l))
        };
        let mut d = encode(5, NLM_F_MULTIPART, link(1));
        d.extend(encode(5, NLM_F_MULTIPART, link(2)));
        assert!(matches!(parse_datagram(&d, 5, true, &mut found), Ok(None)));
        let done = encode(
            5,
            NLM_F_MULTIPART,
            NetlinkPayload::Done(netlink_packet_core::DoneMessage::default()),
        );
        assert!(matches!(
            parse_datagram(&done, 5, true, &mut found),
            Ok(Some(Ok(())))
        ));
        assert_eq!(found.len(), 2);
    }

    #[test]
    fn test_parse_garbage_is_an_error_not_a_panic() {
        let mut found = vec![];
        for bad in [
            &[1u8, 2, 3][..],
            &[8, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
            &[255, 255, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0][..],
            // An NLMSG_ERROR too short for its errno.
            &[16, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0][..],
        ] {
            assert!(
                parse_datagram(bad, 3, false, &mut found).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn test_error_messages_name_interface_and_step() {
        let e = NetworkError::Interface {
            interface: "eth0".into(),
            step: "set MTU 1400".into(),
            source: NetlinkError::Kernel(Errno::EINVAL),
        };
        let s = e.to_string();
        assert!(
            s.contains("eth0") && s.contains("set MTU 1400") && s.contains("EINVAL"),
            "{s}"
        );
    }
}
