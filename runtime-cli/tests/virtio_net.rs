//! virtio-net through KVM with the `net` test guest: the guest ARPs for the host's address on a
//! tap in a test network namespace and the host's stack answers. Cold boot with a tap, and a
//! template whose net device is a slot (link down) restored in every memory mode with a tap
//! attached (link up). Needs root (netns, tap); SKIPPED otherwise.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Output, kvm_usable, run, run_command};

const T: Duration = Duration::from_secs(120);
const MODES: [&str; 5] = ["eager", "mmap", "uffd", "uffd-prefetch", "mmap-prefetch"];
/// The tap's address, 10.77.0.1 (the guest is 10.77.0.2, in the `net` guest's default subnet).
const TAP_ADDR: &str = "10.77.0.1/24";

/// A network namespace with a tap that has the host's address, removed on drop.
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
    /// `None` (and SKIPPED printed) when this host cannot make one.
    fn new(tag: &str) -> Option<Self> {
        if !kvm_usable() {
            return None;
        }
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/net/tun").exists() {
            println!("SKIPPED: needs root and /dev/net/tun for a tap in a test netns");
            return None;
        }
        let id = std::process::id() % 100_000;
        let net = Self {
            ns: format!("ksn-n{tag}{id}"),
            tap: format!("ksn-t{tag}{id}"),
        };
        // A namespace left by a killed run of this test (quietly: usually there is none).
        let _ = Command::new("ip")
            .args(["netns", "del", &net.ns])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = ip(&["netns", "add", &net.ns])
            && ip(&[
                "-n", &net.ns, "tuntap", "add", "dev", &net.tap, "mode", "tap", "vnet_hdr",
            ])
            && ip(&["-n", &net.ns, "addr", "add", TAP_ADDR, "dev", &net.tap])
            && ip(&["-n", &net.ns, "link", "set", &net.tap, "up"]);
        if !ok {
            println!("SKIPPED: ip(8) could not make a netns with a tap");
            return None;
        }
        Some(net)
    }

    /// The tap's MAC, as the host's ARP replies carry it.
    fn tap_mac(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "cat"])
            .arg(format!("/sys/class/net/{}/address", self.tap))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Runs `kata-snap ARGS` inside the namespace.
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, common::BIN])
            .args(args);
        run_command(cmd, T)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// The guest (whose MAC is `guest_mac`) got the host's ARP reply, addressed to that MAC.
fn assert_arp_answered(out: &Output, net: &TestNet, guest_mac: &str, what: &str) {
    assert_eq!(out.code(), 0, "{what}: {}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("net: link up\n"),
        "{what}: {}",
        out.stdout
    );
    let want = format!(
        "net: arp reply from {} to {guest_mac} after ",
        net.tap_mac()
    );
    assert!(out.stdout.contains(&want), "{what}: {}", out.stdout);
    assert!(!out.stdout.contains("FAIL"), "{what}: {}", out.stdout);
}

#[test]
fn test_net_cold_boot_guest_arps_through_tap() {
    let Some(net) = TestNet::new("c") else { return };
    let out = net.run(&[
        "boot",
        "--kernel",
        "builtin:net",
        "--net",
        &format!("n0,tap={},mac=02:6b:73:00:00:01", net.tap),
    ]);
    assert!(
        out.stdout
            .starts_with("net: mac=02:6b:73:00:00:01 link=1\n"),
        "{}",
        out.stdout
    );
    assert_arp_answered(&out, &net, "02:6b:73:00:00:01", "cold boot");
}

#[test]
fn test_net_template_slot_restored_with_tap_in_every_mode() {
    let Some(net) = TestNet::new("r") else { return };
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("net");
    let snap_s = snap.to_str().unwrap();
    // The template: a slot, no tap, link down; made outside the namespace (no network needed).
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:net",
            "--net",
            "n0,mac=02:6b:73:00:00:02",
            "--snapshot-on-ready",
            snap_s,
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(out.stdout, "net: mac=02:6b:73:00:00:02 link=0\n");
    let slot = format!("n0={}", net.tap);
    let ws = snap.join("workingset");
    for mode in MODES {
        let mut args = vec![
            "restore",
            "--no-pool",
            "--snapshot",
            snap_s,
            "--mode",
            mode,
            "--net-slot",
            &slot,
        ];
        if mode == "uffd" {
            args.extend_from_slice(&["--record-workingset", ws.to_str().unwrap()]);
        }
        let out = net.run(&args);
        // The clone kept the MAC it read at boot (the runtime sets a clone's own through the
        // agent): the host answered that one.
        assert_arp_answered(&out, &net, "02:6b:73:00:00:02", mode);
        assert!(
            out.stderr.contains("virtio-net n0: link up at restore"),
            "{mode}: {}",
            out.stderr
        );
    }
}

#[test]
fn test_net_restore_refuses_unknown_slot_and_non_tap() {
    let Some(net) = TestNet::new("u") else { return };
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("net");
    let snap_s = snap.to_str().unwrap();
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:net",
            "--net",
            "n0",
            "--snapshot-on-ready",
            snap_s,
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let out = net.run(&[
        "restore",
        "--no-pool",
        "--snapshot",
        snap_s,
        "--net-slot",
        &format!("nope={}", net.tap),
    ]);
    out.assert_one_line_error("the snapshot has no net device named \"nope\"");
    let out = net.run(&[
        "restore",
        "--no-pool",
        "--snapshot",
        snap_s,
        "--net-slot",
        &format!("n0={}", "lo"),
    ]);
    assert_ne!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("--net-slot n0=lo"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// Through a pool of pre-started VMMs (started outside the namespace): the client opens the tap
/// in its own namespace and hands it over with its stdio.
#[test]
fn test_net_pool_restore_gets_the_clients_tap() {
    let Some(net) = TestNet::new("p") else { return };
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("net");
    let snap_s = snap.to_str().unwrap();
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:net",
            "--net",
            "n0,mac=02:6b:73:00:00:03",
            "--snapshot-on-ready",
            snap_s,
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let pool = dir.path().join("pool");
    let kata = |args: &[&str], in_ns: bool| {
        let mut cmd = if in_ns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &net.ns, common::BIN]);
            c
        } else {
            Command::new(common::BIN)
        };
        cmd.args(args).env("KATA_SNAP_POOL_DIR", &pool);
        run_command(cmd, T)
    };
    let started = kata(&["pool", "start", "--size", "1", "--mem-mib", "256"], false);
    assert_eq!(started.code(), 0, "{}", started.stderr);
    let slot = format!("n0={}", net.tap);
    let out = kata(
        &[
            "restore",
            "--snapshot",
            snap_s,
            "--mode",
            "mmap",
            "--net-slot",
            &slot,
            "--timing",
        ],
        true,
    );
    let _ = kata(&["pool", "stop"], false);
    assert!(
        out.stderr.contains("kata-snap: restore path: pool"),
        "{}",
        out.stderr
    );
    assert_arp_answered(&out, &net, "02:6b:73:00:00:03", "pool");
}
