//! virtio-net with the Linux guest's own driver (mergeable receive buffers, checksum and TSO
//! offloads as it acks them): a persistent tap (`ksn-*`) with the host's address 10.N.0.1/24; a
//! container in the guest configures eth0 as 10.N.0.2/24, pings the host (small and fragmented
//! packets) and moves 8 MiB over TCP each way to servers of this test. A template whose net
//! device is a slot is restored with the tap: the clone's link comes up and the MAC the
//! container sets is the one in the host's ARP table. Needs root (a tap); SKIPPED otherwise.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::guest::*;

pub(crate) const BYTES: usize = 8 << 20;

/// A persistent tap in this (the test host's) network namespace with the host's address
/// 10.`subnet`.0.1/24, removed on drop. Made with the tap ioctls and `ip addr`/`ip link`, which
/// busybox's `ip` has too (the rig's L1 has no iproute2, so no `ip netns` or `ip tuntap`).
struct TestTap {
    name: String,
    subnet: u8,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// Sets or clears the tap's persistence (TUNSETPERSIST) on an open tap fd.
fn set_persist(fd: &OwnedFd, on: bool) -> bool {
    // SAFETY: TUNSETPERSIST takes its argument by value; the fd is open.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, libc::c_ulong::from(on)) == 0 }
}

impl TestTap {
    fn new(tag: &str, subnet: u8) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            println!("SKIPPED: needs root and /dev/net/tun for a tap");
            return None;
        }
        let name = format!("ksn-l{tag}{}", std::process::id() % 10_000);
        let fd = vmm::vm::virtio::open_tap_fd(&name)
            .unwrap_or_else(|e| panic!("cannot create tap {name}: {e}"));
        assert!(set_persist(&fd, true), "TUNSETPERSIST on {name}");
        drop(fd);
        let tap = Self { name, subnet };
        let addr = format!("10.{subnet}.0.1/24");
        assert!(
            ip(&["addr", "add", &addr, "dev", &tap.name]) && ip(&["link", "set", &tap.name, "up"]),
            "ip(8) could not configure {}",
            tap.name
        );
        Some(tap)
    }

    fn host_ip(&self) -> String {
        format!("10.{}.0.1", self.subnet)
    }

    fn guest_ip(&self) -> String {
        format!("10.{}.0.2", self.subnet)
    }

    /// The MAC the host's ARP table holds for the guest (`/proc/net/arp`), if any.
    fn guest_mac(&self) -> Option<String> {
        let arp = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
        arp.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() >= 6 && f[0] == self.guest_ip() && f[5] == self.name)
            .map(|f| f[3].to_string())
    }

    /// The script that configures the guest's eth0 for this tap.
    fn up(&self) -> String {
        format!(
            "ip link set eth0 up && ip addr add {}/24 dev eth0",
            self.guest_ip()
        )
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        if let Ok(fd) = vmm::vm::virtio::open_tap_fd(&self.name) {
            set_persist(&fd, false);
        }
    }
}

/// A TCP server on `addr`:`port` serving one connection: `send` bytes to the client then close
/// and wait for the client to close, or (send 0) read until `BYTES` arrived or the client closed;
/// returns the bytes read and the time from the first byte (sent or read) to the end. Returns
/// once it listens.
pub(crate) fn server(
    addr: String,
    port: u16,
    send: usize,
) -> std::thread::JoinHandle<(usize, Duration)> {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let l = TcpListener::bind((addr.as_str(), port)).unwrap();
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
        let mut buf = vec![0u8; 64 << 10];
        if send > 0 {
            let t = Instant::now();
            let chunk = vec![0x5au8; 64 << 10];
            let mut left = send;
            while left > 0 {
                let n = left.min(chunk.len());
                s.write_all(&chunk[..n]).unwrap();
                left -= n;
            }
            // Everything is in the client's hands once it closes, having read to the end.
            let _ = s.shutdown(std::net::Shutdown::Write);
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            return (0, t.elapsed());
        }
        let mut got = 0;
        let mut first: Option<Instant> = None;
        while got < BYTES {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    got += n;
                }
            }
        }
        (got, first.map(|t| t.elapsed()).unwrap_or_default())
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the server did not start listening");
    handle
}

#[test]
fn test_linux_net_ping_and_tcp_both_ways_through_a_tap() {
    let Some(art) = setup() else {
        return;
    };
    let Some(tap) = TestTap::new("b", 77) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let mut g = Guest::boot(
        &art,
        &BootOpts {
            disks: vec![rootfs.display().to_string()],
            nets: vec![format!("n0,tap={}", tap.name)],
            ..Default::default()
        },
    );
    g.wait_ready(READY_TIMEOUT);
    let to_guest = server(tap.host_ip(), 5001, BYTES);
    let from_guest = server(tap.host_ip(), 5002, 0);
    let t = Instant::now();
    let o = g.sh(
        "/dev/vda",
        &format!(
            "{up} && ping -c 3 -W 5 {h} >/dev/null && echo ping-ok && \
             ping -c 2 -W 5 -s 20000 {h} >/dev/null && echo big-ping-ok && \
             nc {h} 5001 | wc -c && \
             dd if=/dev/zero bs=65536 count={n} 2>/dev/null | nc {h} 5002; echo sent",
            up = tap.up(),
            h = tap.host_ip(),
            n = BYTES / 65536
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
    assert_eq!(from_guest.join().unwrap().0, BYTES, "guest -> host TCP");
    g.stop();
}

#[test]
fn test_linux_net_slot_template_restored_with_a_tap_and_its_own_mac() {
    let Some(art) = setup() else {
        return;
    };
    let Some(tap) = TestTap::new("t", 78) else {
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
            format!("n0={}", tap.name),
        ];
        let mut g = Guest::restore(&template, mode, &vsock, &extra);
        // The clone's own MAC, set before the link is used (what the runtime will do through
        // the agent).
        let mac = format!("02:6b:73:00:01:{i:02x}");
        let o = g.sh(
            "/dev/vda",
            &format!(
                "ip link set eth0 address {mac} && {} && ping -c 3 -W 5 {} >/dev/null && echo ok",
                tap.up(),
                tap.host_ip()
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
        let seen = tap.guest_mac();
        assert_eq!(
            seen.as_deref(),
            Some(mac.as_str()),
            "{mode}: the host's ARP entry for the guest is not the clone's MAC"
        );
        g.stop();
    }
}
