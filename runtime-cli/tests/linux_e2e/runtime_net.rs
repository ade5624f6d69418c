//! A container in a network namespace as an engine makes one (Docker's bridge network, CNI's
//! bridge plugin: `eth0`, one end of a veth pair, with an address and a default route, the other
//! end on the host), named by the bundle (`linux.namespaces` network `path`), run by kata-snap and
//! by runc on the same bundle: the container sees the namespace's MAC and address and its own
//! loopback, reaches the host's end, and the host reaches a server in the container. kata-snap
//! gives the guest a tap in that namespace, connected to `eth0` by tc redirects, and the agent
//! gives the guest's `eth0` the namespace's MAC, MTU, address and routes. The namespace is made
//! with rtnetlink (the rig's L1 has no iproute2).

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::guest::*;
use crate::net::{BYTES, server};
use crate::runtime::*;

/// Runs `f` with a netlink handle, on this thread (a runtime of its own).
fn netlink<T>(f: impl AsyncFnOnce(rtnetlink::Handle) -> Result<T, String>) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        f(handle).await
    })
}

async fn link_index(h: &rtnetlink::Handle, name: &str) -> Result<u32, String> {
    let links: Vec<LinkMessage> = h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("link {name}: {e}"))?;
    links
        .first()
        .map(|l| l.header.index)
        .ok_or(format!("no link {name}"))
}

/// A network namespace at `/run/netns/NAME` holding `eth0` (10.`subnet`.0.2/24, default route
/// via .1), the peer of `host` (10.`subnet`.0.1/24) in the test's namespace, and `lo` up.
/// Removed on drop.
struct EngineNetns {
    path: PathBuf,
    host: String,
    subnet: u8,
    /// `eth0`'s MAC.
    mac: String,
}

impl EngineNetns {
    fn new(tag: &str, subnet: u8) -> Result<Self, String> {
        let id = std::process::id() % 10_000;
        let path = PathBuf::from(format!("/run/netns/ksn-{tag}{id}"));
        let host = format!("ksn-{tag}h{id}");
        let peer = format!("ksn-{tag}p{id}");
        let mut ns = Self {
            path: path.clone(),
            host: host.clone(),
            subnet,
            mac: String::new(),
        };
        new_netns(&path)?;
        let ns_file = fs::File::open(&path).map_err(|e| e.to_string())?;
        let host_ip = ns.host_ip();
        netlink(async move |h| {
            h.link()
                .add(LinkVeth::new(&host, &peer).build())
                .execute()
                .await
                .map_err(|e| format!("veth pair (veth.ko loaded?): {e}"))?;
            let p = link_index(&h, &peer).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(p)
                        .setns_by_fd(ns_file.as_raw_fd())
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| format!("move {peer} into the namespace: {e}"))?;
            let i = link_index(&h, &host).await?;
            h.address()
                .add(i, host_ip.into(), 24)
                .execute()
                .await
                .map_err(|e| format!("address of {host}: {e}"))?;
            h.link()
                .set(LinkUnspec::new_with_index(i).up().build())
                .execute()
                .await
                .map_err(|e| format!("{host} up: {e}"))
        })?;
        // Inside: the peer becomes eth0 with the container's address and a default route.
        let (p, peer, gw, addr) = (path.clone(), format!("ksn-{tag}p{id}"), host_ip, ns.ip());
        ns.mac = std::thread::spawn(move || -> Result<String, String> {
            let f = fs::File::open(&p).map_err(|e| e.to_string())?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))?;
            netlink(async move |h| {
                let i = link_index(&h, &peer).await?;
                h.link()
                    .set(LinkUnspec::new_with_index(i).name("eth0").build())
                    .execute()
                    .await
                    .map_err(|e| format!("rename to eth0: {e}"))?;
                h.address()
                    .add(i, addr.into(), 24)
                    .execute()
                    .await
                    .map_err(|e| format!("address of eth0: {e}"))?;
                h.link()
                    .set(LinkUnspec::new_with_index(i).up().build())
                    .execute()
                    .await
                    .map_err(|e| format!("eth0 up: {e}"))?;
                // Loopback up, as CNI's loopback plugin and Docker bring it up.
                let lo = link_index(&h, "lo").await?;
                h.link()
                    .set(LinkUnspec::new_with_index(lo).up().build())
                    .execute()
                    .await
                    .map_err(|e| format!("lo up: {e}"))?;
                h.route()
                    .add(RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build())
                    .execute()
                    .await
                    .map_err(|e| format!("default route: {e}"))?;
                let links: Vec<LinkMessage> = h
                    .link()
                    .get()
                    .match_index(i)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(|e| e.to_string())?;
                links
                    .first()
                    .and_then(|l| {
                        l.attributes.iter().find_map(|a| match a {
                            LinkAttribute::Address(m) => Some(
                                m.iter()
                                    .map(|b| format!("{b:02x}"))
                                    .collect::<Vec<_>>()
                                    .join(":"),
                            ),
                            _ => None,
                        })
                    })
                    .ok_or("eth0 has no MAC".to_string())
            })
        })
        .join()
        .map_err(|_| "the namespace thread panicked".to_string())??;
        Ok(ns)
    }

    fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 1)
    }

    fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 2)
    }
}

impl Drop for EngineNetns {
    fn drop(&mut self) {
        let host = self.host.clone();
        // Deleting one end deletes the pair.
        let _ = netlink(async move |h| {
            let i = link_index(&h, &host).await?;
            h.link().del(i).execute().await.map_err(|e| e.to_string())
        });
        remove_netns(&self.path);
    }
}

/// A new, empty network namespace at `path` (under /run/netns), kept by a bind mount of a
/// thread's namespace file, as `ip netns add` keeps one.
pub(crate) fn new_netns(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path.parent().unwrap()).map_err(|e| e.to_string())?;
    fs::write(path, b"").map_err(|e| e.to_string())?;
    let p = path.to_owned();
    std::thread::spawn(move || -> Result<(), String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare: {e}"))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &p,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount of the namespace: {e}"))
    })
    .join()
    .map_err(|_| "the namespace thread panicked".to_string())?
}

/// Removes a namespace [`new_netns`] made.
pub(crate) fn remove_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_file(path);
}

/// A TCP server on `addr` (a port the kernel picks, returned) that takes one connection and
/// returns what it sent until its end (at most 4 KiB, 60 s without data).
pub(crate) fn one_message_server(addr: &str) -> (u16, std::thread::JoinHandle<String>) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind((addr, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = String::new();
        let _ = s.take(4096).read_to_string(&mut got);
        got
    });
    (port, got)
}

/// GET `path` from `addr` until it answers 200 (up to 90 s); the body (empty if it never did).
pub(crate) fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n");
            let mut got = String::new();
            let _ = s.take(1 << 20).read_to_string(&mut got);
            if got.starts_with("HTTP/1.") && got.contains(" 200 ") {
                return got
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default();
            }
        }
        if Instant::now() > end {
            return String::new();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Connects to `addr:port` until it answers (up to 90 s) and returns the first line it sends.
fn first_line_from(addr: Ipv4Addr, port: u16) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(s) = TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(2))
            {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut line = String::new();
                let _ = BufReader::new(s).read_line(&mut line);
                if !line.is_empty() {
                    return line;
                }
            }
            if Instant::now() > end {
                return String::new();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

fn with_netns(b: &Path, netns: &Path) {
    let cfg = b.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg).unwrap()).unwrap();
    spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "network", "path": netns}
    ]);
    // busybox's ping opens a raw socket: CAP_NET_RAW, which Docker gives by default and
    // `runc spec` does not.
    for set in ["bounding", "effective", "permitted"] {
        if let Some(list) = spec["process"]["capabilities"][set].as_array_mut() {
            list.push("CAP_NET_RAW".into());
        }
    }
    fs::write(&cfg, spec.to_string()).unwrap();
}

#[test]
fn test_container_in_an_engine_network_namespace_as_with_runc() {
    let Some(art) = setup() else { return };
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: needs root for a network namespace and a veth pair");
        return;
    }
    let ns = match EngineNetns::new("e", 93) {
        Ok(ns) => ns,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must give the rig veth and tc (scripts/fetch-linux-kernel.sh): {e}"
            );
            println!("SKIPPED: cannot make a network namespace with a veth pair: {e}");
            return;
        }
    };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let script = format!(
        "cat /sys/class/net/eth0/address; \
         ip -4 -o addr show eth0 | awk '{{print $4}}'; \
         ping -c 1 -W 5 127.0.0.1 >/dev/null && echo loopback-ok; \
         ping -c 2 -W 5 {host} >/dev/null && echo host-ok; \
         ping -c 5 -W 5 {host} | tail -n 1; \
         nc {host} 5101 | wc -c; \
         dd if=/dev/zero bs=65536 count={n} 2>/dev/null | nc {host} 5102; \
         echo served-by-the-container | nc -l -p 8093; echo done",
        host = ns.host_ip(),
        n = BYTES / 65536,
    );
    let b = bundle(dir.path(), "net", &script, false);
    with_netns(&b, &ns.path);
    let expected = vec![
        ns.mac.clone(),
        format!("{}/24", ns.ip()),
        "loopback-ok".to_string(),
        "host-ok".to_string(),
        BYTES.to_string(),
        "done".to_string(),
    ];
    let mut seen = Vec::new();
    for (name, cmd) in runtimes(e, dir.path()) {
        step(format!("{name}: run in {}", ns.path.display()));
        let client = first_line_from(ns.ip(), 8093);
        let to_container = server(ns.host_ip().to_string(), 5101, BYTES);
        let from_container = server(ns.host_ip().to_string(), 5102, 0);
        let t = Instant::now();
        let o = run_it(
            cmd(),
            &["run", "--no-pivot", "--bundle", b.to_str().unwrap(), "net"],
        );
        measure(&format!("net_namespace_run_{name}"), ms_since(t));
        // ping's summary: `round-trip min/avg/max = 0.512/0.733/1.104 ms`.
        let rtt = o
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("round-trip min/avg/max = "))
            .and_then(|v| v.split('/').nth(1))
            .and_then(|avg| avg.parse::<f64>().ok());
        let lines: Vec<String> = o
            .stdout
            .lines()
            .filter(|l| !l.starts_with("round-trip"))
            .map(|l| l.trim().to_string())
            .collect();
        assert_eq!(lines, expected, "{name}: {o:?}");
        assert_eq!(o.code(), 0, "{name}: {o:?}");
        assert_eq!(
            client.join().unwrap(),
            "served-by-the-container\n",
            "{name}: the host reached the container's server"
        );
        let (_, down) = to_container.join().unwrap();
        let (got, up) = from_container.join().unwrap();
        assert_eq!(got, BYTES, "{name}: container -> host TCP");
        let mib_s = |d: Duration| BYTES as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9);
        measure(&format!("net_{name}_host_to_container_mib_s"), mib_s(down));
        measure(&format!("net_{name}_container_to_host_mib_s"), mib_s(up));
        if let Some(rtt) = rtt {
            measure(&format!("net_{name}_ping_rtt_ms"), rtt);
        }
        seen.push((name, mib_s(down), mib_s(up), rtt));
    }
    // The ratios of one run (emulated: only the ratios mean anything).
    if let [(_, kd, ku, kr), (_, rd, ru, rr)] = seen[..] {
        measure("net_ratio_host_to_container_kata_over_runc", kd / rd);
        measure("net_ratio_container_to_host_kata_over_runc", ku / ru);
        if let (Some(kr), Some(rr)) = (kr, rr) {
            measure("net_ratio_ping_rtt_kata_over_runc", kr / rr);
        }
    }
}
