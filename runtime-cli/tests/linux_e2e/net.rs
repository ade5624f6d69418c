//! virtio-net with the Linux guest's own driver (mergeable receive buffers, checksum and TSO
//! offloads as it acks them): the VMM runs in a test network namespace (`ksn-*`) whose tap has
//! 10.77.0.1/24; a container in the guest configures eth0 as 10.77.0.2/24, pings the host
//! (small and fragmented packets) and moves 8 MiB over TCP each way to servers in the namespace.
//! A template whose net device is a slot is restored with a tap: the clone's link comes up and
//! the MAC the container sets is the one the host sees. Needs root (netns, tap); SKIPPED
//! otherwise.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::guest::*;

const TAP_ADDR: &str = "10.77.0.1/24";
const GUEST_IP: &str = "10.77.0.2";
const BYTES: usize = 8 << 20;

/// A network namespace with a tap holding the host's address, removed on drop.
struct TestNet {
    ns: String,
    tap: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl TestNet {
    fn new(tag: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/net/tun").exists() {
            println!("SKIPPED: needs root and /dev/net/tun for a tap in a test netns");
            return None;
        }
        let id = std::process::id() % 100_000;
        let net = Self {
            ns: format!("ksn-l{tag}{id}"),
            tap: format!("ksn-lt{tag}{id}"),
        };
        let _ = ip(&["netns", "del", &net.ns]);
        let ok = ip(&["netns", "add", &net.ns])
            && ip(&[
                "-n", &net.ns, "tuntap", "add", "dev", &net.tap, "mode", "tap", "vnet_hdr",
            ])
            && ip(&["-n", &net.ns, "addr", "add", TAP_ADDR, "dev", &net.tap])
            && ip(&["-n", &net.ns, "link", "set", &net.tap, "up"])
            && ip(&["-n", &net.ns, "link", "set", "lo", "up"]);
        assert!(ok, "ip(8) could not make the test netns {}", net.ns);
        Some(net)
    }

    fn guest_neighbour(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "neigh", "show", GUEST_IP])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// A TCP server on 10.77.0.1:`port` inside `ns` (a thread that joins the namespace), serving one
/// connection: `send` bytes to the client then close, or (send 0) read until `BYTES` arrived or
/// the client closed; returns the bytes read. Returns once it listens.
fn server(ns: &str, port: u16, send: usize) -> std::thread::JoinHandle<usize> {
    let (tx, rx) = mpsc::channel();
    let path = format!("/run/netns/{ns}");
    let handle = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = TcpListener::bind(("10.77.0.1", port)).unwrap();
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let end = Instant::now() + Duration::from_secs(60);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("no connection on port {port}: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        if send > 0 {
            let chunk = vec![0x5au8; 64 << 10];
            let mut left = send;
            while left > 0 {
                let n = left.min(chunk.len());
                s.write_all(&chunk[..n]).unwrap();
                left -= n;
            }
            return 0;
        }
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < BYTES {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the server did not start listening");
    handle
}

const UP: &str = "ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0";

#[test]
fn test_linux_net_ping_and_tcp_both_ways_through_a_tap() {
    let Some(art) = setup() else {
        return;
    };
    let Some(net) = TestNet::new("b") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let mut g = Guest::boot(
        &art,
        &BootOpts {
            disks: vec![rootfs.display().to_string()],
            nets: vec![format!("n0,tap={}", net.tap)],
            netns: Some(net.ns.clone()),
            ..Default::default()
        },
    );
    g.wait_ready(READY_TIMEOUT);
    let to_guest = server(&net.ns, 5001, BYTES);
    let from_guest = server(&net.ns, 5002, 0);
    let t = Instant::now();
    let o = g.sh(
        "/dev/vda",
        &format!(
            "{UP} && ping -c 3 -W 5 10.77.0.1 >/dev/null && echo ping-ok && \
             ping -c 2 -W 5 -s 20000 10.77.0.1 >/dev/null && echo big-ping-ok && \
             nc 10.77.0.1 5001 | wc -c && \
             dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc 10.77.0.1 5002; echo sent",
            BYTES / 65536
        ),
        vec![],
    );
    measure("net_ping_and_16mib_tcp", ms_since(t));
    let lines: Vec<String> = out(&o).lines().map(|l| l.trim().to_string()).collect();
    g.check(
        lines.len() >= 4 && lines[0] == "ping-ok" && lines[1] == "big-ping-ok",
        format!("ping: {o:?}"),
    );
    assert_eq!(
        lines[2],
        BYTES.to_string(),
        "host -> guest TCP: {o:?}\n{}",
        g.logs()
    );
    to_guest.join().unwrap();
    assert_eq!(from_guest.join().unwrap(), BYTES, "guest -> host TCP");
    g.stop();
}

#[test]
fn test_linux_net_slot_template_restored_with_a_tap_and_its_own_mac() {
    let Some(art) = setup() else {
        return;
    };
    let Some(net) = TestNet::new("t") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let template = dir.path().join("template");
    let vsock = dir.path().join("template.vsock");
    let mut t = Guest::boot(
        &art,
        &BootOpts {
            slots: vec!["rootfs,ro".into()],
            nets: vec!["n0,mac=02:6b:73:00:00:10".into()],
            snapshot_on_ready: Some(template.clone()),
            vsock: Some(vsock.clone()),
            ..Default::default()
        },
    );
    let status = t.wait_exit(READY_TIMEOUT);
    t.check(
        status.success(),
        format!("template boot ended with {status}"),
    );
    for (i, mode) in ["mmap", "uffd"].into_iter().enumerate() {
        let extra = [
            "--disk-slot".to_string(),
            format!("rootfs={}", rootfs.display()),
            "--net-slot".to_string(),
            format!("n0={}", net.tap),
        ];
        let mut g = Guest::restore_in(Some(&net.ns), &template, mode, &vsock, &extra);
        // The clone's own MAC, set before the link is used (what the runtime will do through
        // the agent).
        let mac = format!("02:6b:73:00:01:{i:02x}");
        let o = g.sh(
            "/dev/vda",
            &format!(
                "ip link set eth0 address {mac} && {UP} && \
                 ping -c 3 -W 5 10.77.0.1 >/dev/null && echo ok"
            ),
            vec![],
        );
        g.check(out(&o) == "ok\n", format!("{mode}: {o:?}"));
        assert!(
            g.stderr_text()
                .contains("virtio-net n0: link up at restore"),
            "{mode}: {}",
            g.logs()
        );
        let neigh = net.guest_neighbour();
        assert!(
            neigh.contains(&mac),
            "{mode}: the host sees {neigh:?}, not the clone's MAC {mac}"
        );
        g.stop();
    }
}
