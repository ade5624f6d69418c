//! The container's network (`RunRequest::network`): the agent's network
//! module configures real interfaces (a tap named `eth0` in a new network
//! namespace), read back with iproute2; and through the harness, a `Create`
//! with a network configures the agent's `eth0` before the process runs.
//! Needs root, /dev/net/tun and `ip` (iproute2); each test prints
//! `SKIPPED: reason` and returns otherwise.

mod common;

use std::fs::{File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

use agent::network::{NetworkError, apply, bring_up_loopback};
use agent_protocol::{
    ClientError, ErrorKind, InterfaceConfig, IpNet, Mount, NetworkConfig, RouteConfig,
};
use common::Agent;
use nix::sched::{CloneFlags, setns, unshare};

const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];

fn skip() -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("needs root (network namespaces, taps)")
    } else if !Path::new("/dev/net/tun").exists() {
        Some("no /dev/net/tun")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("no `ip` (iproute2) to read the configuration back")
    } else {
        None
    };
    if let Some(r) = reason {
        println!("SKIPPED: {r}");
    }
    reason.is_some()
}

/// Runs `f` on a thread of its own in a new, empty network namespace (only a
/// `lo` that is down), which goes away with the thread.
fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Creates tap `name` in the caller's network namespace; it lives while the
/// returned descriptor is open, or for good (until its namespace goes) with
/// `persist`.
fn tap(name: &str, persist: bool) -> OwnedFd {
    let f: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    assert!(name.len() < req.ifr_name.len());
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(
        r,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    if persist {
        // SAFETY: TUNSETPERSIST takes an integer argument, no pointer.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
        assert_eq!(r, 0, "TUNSETPERSIST: {}", std::io::Error::last_os_error());
    }
    f.into()
}

/// `ip ARGS` in the calling thread's network namespace: its stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn v4(a: [u8; 4], prefix_len: u8) -> IpNet {
    IpNet {
        addr: IpAddr::V4(Ipv4Addr::from(a)),
        prefix_len,
    }
}

/// What the runtime will send for Docker's default bridge: MAC, MTU 1400,
/// 10.88.0.2/16, default route via 10.88.0.1; plus a link-scope route.
fn eth0_config(name: &str) -> NetworkConfig {
    NetworkConfig {
        interfaces: vec![InterfaceConfig {
            name: name.into(),
            mac: Some(MAC),
            mtu: Some(1400),
            addresses: vec![v4([10, 88, 0, 2], 16)],
        }],
        routes: vec![
            RouteConfig {
                destination: None,
                gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 88, 0, 1))),
                device: None,
            },
            RouteConfig {
                destination: Some(v4([192, 168, 7, 0], 24)),
                gateway: None,
                device: Some(name.into()),
            },
        ],
    }
}

#[test]
fn test_network_configures_a_tap_as_asked() {
    if skip() {
        return;
    }
    in_new_netns(|| {
        let _tap = tap("eth0", false);
        let before = ip(&["-o", "link", "show", "dev", "eth0"]);
        assert!(!before.contains("mtu 1400"), "{before}");
        assert!(!before.contains("02:42:ac:11:00:02"), "{before}");

        apply(&eth0_config("eth0")).unwrap_or_else(|e| panic!("{e}"));

        let link = ip(&["-o", "link", "show", "dev", "eth0"]);
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains("link/ether 02:42:ac:11:00:02"), "{link}");
        let flags = link.split(['<', '>']).nth(1).unwrap_or_default();
        assert!(flags.split(',').any(|f| f == "UP"), "{link}");
        let addr = ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
        assert!(
            addr.contains("inet 10.88.0.2/16 brd 10.88.255.255"),
            "{addr}"
        );
        let routes = ip(&["-4", "route", "show"]);
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with("default via 10.88.0.1 dev eth0")),
            "{routes}"
        );
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with("192.168.7.0/24 dev eth0") && l.contains("scope link")),
            "{routes}"
        );

        // Applied again (a Create after a failed one): what is there is fine.
        apply(&eth0_config("eth0")).unwrap_or_else(|e| panic!("again: {e}"));
    });
}

#[test]
fn test_network_missing_interface_named_with_what_exists() {
    if skip() {
        return;
    }
    in_new_netns(|| {
        let _tap = tap("eth0", false);
        match apply(&eth0_config("eth1")) {
            Err(e @ NetworkError::NoSuchInterface { .. }) => {
                let s = e.to_string();
                assert!(s.contains("\"eth1\" not found"), "{s}");
                assert!(s.contains("lo, eth0"), "{s}");
            }
            other => panic!("{other:?}"),
        }
        // Nothing was changed on the interface that exists.
        let link = ip(&["-o", "link", "show", "dev", "eth0"]);
        assert!(!link.contains("mtu 1400"), "{link}");
    });
}

#[test]
fn test_network_failed_step_names_interface_and_step() {
    if skip() {
        return;
    }
    in_new_netns(|| {
        // IPv6 turned off on the device: its address is refused.
        let _tap = tap("eth0", false);
        std::fs::write("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "1").unwrap();
        let mut config = eth0_config("eth0");
        config.interfaces[0].addresses.push(IpNet {
            addr: "fd00::2".parse().unwrap(),
            prefix_len: 64,
        });
        let e = apply(&config).expect_err("IPv6 is off on eth0");
        let s = e.to_string();
        assert!(
            s.starts_with("interface eth0: add address fd00::2/64: "),
            "{s}"
        );
        assert!(s.contains("EACCES"), "{s}");
        // The steps before it took effect (in order: MAC, MTU, IPv4 address).
        let link = ip(&["-o", "link", "show", "dev", "eth0"]);
        assert!(link.contains("mtu 1400"), "{link}");

        // A gateway no interface reaches (eth0 is down: its address is not).
        let config = NetworkConfig {
            interfaces: vec![],
            routes: vec![RouteConfig {
                destination: None,
                gateway: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
                device: None,
            }],
        };
        let e = apply(&config).expect_err("unreachable gateway");
        let s = e.to_string();
        assert!(s.starts_with("route default via 192.0.2.1: "), "{s}");
        assert!(s.contains("ENETUNREACH"), "{s}");
    });
}

#[test]
fn test_loopback_brought_up() {
    if skip() {
        return;
    }
    in_new_netns(|| {
        let up = || {
            let link = ip(&["-o", "link", "show", "dev", "lo"]);
            let flags = link.split(['<', '>']).nth(1).unwrap_or_default().to_owned();
            flags.split(',').any(|f| f == "UP")
        };
        assert!(!up(), "lo of a new namespace starts down");
        bring_up_loopback().unwrap_or_else(|e| panic!("{e}"));
        assert!(up());
        let addr = ip(&["-o", "-4", "addr", "show", "dev", "lo"]);
        assert!(addr.contains("inet 127.0.0.1/8"), "{addr}");
    });
}

/// Creates a persistent tap `name` in the network namespace of process
/// `pid` (the harness agent's).
fn tap_in_netns_of(pid: u32, name: &str) {
    let ns = File::open(format!("/proc/{pid}/ns/net")).expect("open netns");
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
            drop(tap(name, true));
        })
        .join()
        .expect("tap thread");
    });
}

#[test]
fn test_create_with_network_configures_eth0_before_the_process() {
    if skip() || common::skip_reason().is_some() {
        return;
    }
    let agent = Agent::start();
    tap_in_netns_of(agent.inner_pid(), "eth0");
    let mut req = agent.request(&[
        "sh",
        "-c",
        "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu /sys/class/net/lo/flags; \
         cat /proc/net/route",
    ]);
    req.mounts.push(Mount {
        destination: "/sys".into(),
        fs_type: "sysfs".into(),
        source: "sysfs".into(),
        options: vec![
            "nosuid".into(),
            "noexec".into(),
            "nodev".into(),
            "ro".into(),
        ],
    });
    req.network = Some(eth0_config("eth0"));
    let out = agent
        .run_req(req, None)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", agent.log()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.code, 0, "{stdout} {:?}", out.error);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("02:42:ac:11:00:02"), "{stdout}");
    assert_eq!(lines.next(), Some("1400"), "{stdout}");
    // IFF_UP | IFF_LOOPBACK: the agent brought lo up at start.
    assert_eq!(lines.next(), Some("0x9"), "{stdout}");
    // /proc/net/route: Iface Destination Gateway ... (hex, host order on x86).
    let routes: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert!(
        routes
            .iter()
            .any(|r| r[..3] == ["eth0", "00000000", "0100580A"]),
        "no default route via 10.88.0.1: {stdout}"
    );
}

#[test]
fn test_create_with_missing_interface_fails_naming_it() {
    if skip() || common::skip_reason().is_some() {
        return;
    }
    let agent = Agent::start();
    let mut req = agent.request(&["true"]);
    req.network = Some(eth0_config("eth0"));
    let mut c = agent.client();
    match c.create(req.clone()) {
        Err(ClientError::Agent { kind, message }) => {
            assert_eq!(kind, ErrorKind::Network);
            assert!(
                message.contains("interface \"eth0\" not found in the guest (it has: lo)"),
                "{message}"
            );
        }
        other => panic!("{other:?}; log:\n{}", agent.log()),
    }
    // Nothing is left of the attempt: once the interface exists, the same
    // connection may Create again.
    tap_in_netns_of(agent.inner_pid(), "eth0");
    c.create(req)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", agent.log()));
}
