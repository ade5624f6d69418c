//! The runtime's whole host path on this host, with the built-in test guest `agent` as the
//! template's guest (config `testGuest`): bundle, template warm and restore, rootfs image,
//! supervisor, vsock, the agent protocol (Hello, SyncTime, Reseed, Create, Start, output,
//! exit), teardown. The guest runs no process (it answers from argv, see
//! `test_guests::AGENT`), so this checks the host side, never what rung 4 checks in a Linux
//! guest. Where runc works, the same bundles run under it must give the same stdout and status.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::runtime_env::{Env, process_alive};
use common::{Output, kvm_usable, run_command};

const T: Duration = Duration::from_secs(120);
const RUNC: &str = "/usr/sbin/runc";

fn usable() -> bool {
    kvm_usable() && Path::new("/bin/busybox").exists() && {
        let ok = Path::new("/usr/bin/mkfs.erofs").exists();
        if !ok {
            println!("SKIPPED: mkfs.erofs missing (scripts/install-deps.sh)");
        }
        ok
    }
}

/// Whether runc can run containers here (as root, with its binary).
fn runc_usable() -> bool {
    let ok = Path::new(RUNC).exists() && nix::unistd::geteuid().is_root();
    if !ok {
        println!("SKIPPED (runc part): {RUNC} missing or not root");
    }
    ok
}

fn runc_run(root: &Path, bundle: &Path, id: &str) -> Output {
    let mut c = Command::new(RUNC);
    c.arg("--root")
        .arg(root)
        .args(["run", "--bundle", bundle.to_str().unwrap(), id]);
    run_command(c, T)
}

/// The error message of a runc-style log line (`time=".." level=error msg="..."`).
fn error_msg(o: &Output) -> String {
    o.stderr
        .lines()
        .filter(|l| l.contains("level=error"))
        .find_map(|l| l.split_once("msg=").map(|(_, m)| m.to_string()))
        .and_then(|m| serde_json::from_str::<String>(&m).ok())
        .unwrap_or_default()
}

#[test]
fn test_run_agent_test_guest_gives_stdout_and_status_as_runc() {
    if !usable() {
        return;
    }
    let env = Env::new(serde_json::json!({"testGuest": "agent"}));
    let runc = runc_usable();
    let cases: &[(&str, &[&str], &str, i32)] = &[
        (
            "script",
            &["sh", "-c", "echo hello world; exit 3"],
            "hello world\n",
            3,
        ),
        ("echo", &["/bin/echo", "a", "b c"], "a b c\n", 0),
        ("false", &["false"], "", 1),
        (
            "not-found-in-sh",
            &["sh", "-c", "no-such-command; echo after"],
            "after\n",
            0,
        ),
        (
            "exit-status",
            &["sh", "-c", "echo x;  echo  y  z ; no-such"],
            "x\ny z\n",
            127,
        ),
    ];
    for (i, (name, args, stdout, code)) in cases.iter().enumerate() {
        let b = env.bundle(name, args);
        let o = env.run(&["run", "--bundle", b.to_str().unwrap(), name]);
        assert_eq!(o.stdout, *stdout, "{name}: {o:?}");
        assert_eq!(o.code(), *code, "{name}: {o:?}");
        if i == 0 {
            // The first run warmed the template; every run says which guest it is.
            let t = fs::read_dir(env.dir.path().join("data/templates"))
                .unwrap()
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().contains('.'))
                .count();
            assert_eq!(t, 1, "one template");
        }
        assert!(o.stderr.contains("built-in test guest"), "{o:?}");
        if name.contains("not-found") || *code == 127 {
            assert!(o.stderr.contains("sh: no-such"), "{o:?}");
        }
        env.assert_gone(name);
        if runc {
            let r = runc_run(&env.dir.path().join("runc"), &b, name);
            assert_eq!(r.stdout, o.stdout, "{name}: runc {r:?}\nours {o:?}");
            assert_eq!(r.code(), o.code(), "{name}: runc {r:?}\nours {o:?}");
        }
    }
    // Not found by create itself: exit 1 and runc's message.
    let b = env.bundle("missing", &["no-such-command"]);
    let o = env.run(&["run", "--bundle", b.to_str().unwrap(), "missing"]);
    assert_eq!(o.code(), 1, "{o:?}");
    assert_eq!(
        error_msg(&o),
        "unable to start container process: exec: \"no-such-command\": executable file not \
         found in $PATH",
        "{o:?}"
    );
    env.assert_gone("missing");
    assert_eq!(
        fs::read_dir(env.root()).unwrap().count(),
        0,
        "the state root is empty"
    );
}

#[test]
fn test_create_start_state_delete_agent_test_guest_leaves_nothing() {
    if !usable() {
        return;
    }
    let env = Env::new(serde_json::json!({"testGuest": "agent"}));
    let b = env.bundle("b", &["sh", "-c", "echo from the test agent; exit 5"]);
    let (pid, out) = env.create(&b, "c1");
    assert!(process_alive(pid), "the supervisor runs");
    let state = |id: &str| -> serde_json::Value {
        let o = env.run(&["state", id]);
        assert_eq!(o.code(), 0, "{o:?}");
        serde_json::from_str(&o.stdout).unwrap()
    };
    let s = state("c1");
    assert_eq!(s["status"], "created", "{s}");
    assert_eq!(s["pid"], pid, "{s}");
    let o = env.run(&["start", "c1"]);
    assert_eq!(o.code(), 0, "{o:?}");
    let end = Instant::now() + T;
    while state("c1")["status"] != "stopped" {
        assert!(Instant::now() < end, "c1 never stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
    let end = Instant::now() + T;
    while process_alive(pid) {
        assert!(Instant::now() < end, "the supervisor {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read_to_string(&out).unwrap(), "from the test agent\n");
    let o = env.run(&["delete", "c1"]);
    assert_eq!(o.code(), 0, "{o:?}");
    env.assert_gone("c1");

    // A created container that is killed: the signal reaches the "process" waiting for start.
    let (pid, _) = env.create(&b, "c2");
    let o = env.run(&["kill", "c2", "TERM"]);
    assert_eq!(o.code(), 0, "{o:?}");
    let end = Instant::now() + T;
    while state("c2")["status"] != "stopped" {
        assert!(Instant::now() < end, "c2 never stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = env.run(&["start", "c2"]);
    assert_ne!(o.code(), 0, "a stopped container does not start: {o:?}");
    let o = env.run(&["delete", "c2"]);
    assert_eq!(o.code(), 0, "{o:?}");
    env.assert_gone("c2");
    let end = Instant::now() + T;
    while process_alive(pid) {
        assert!(Instant::now() < end, "the supervisor {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fs::read_dir(env.root()).unwrap().count(),
        0,
        "the state root is empty"
    );
}

#[test]
fn test_test_guest_with_a_kernel_in_the_config_is_refused() {
    let env = Env::new(serde_json::json!({"testGuest": "agent"}));
    fs::write(
        env.dir.path().join("config.json"),
        r#"{"testGuest": "agent", "kernel": "/boot/vmlinuz"}"#,
    )
    .unwrap();
    let b = env.bundle("b", &["true"]);
    let o = env.run(&["run", "--bundle", b.to_str().unwrap(), "x"]);
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(
        error_msg(&o).contains("both a testGuest and a kernel"),
        "{o:?}"
    );
    fs::write(
        env.dir.path().join("config.json"),
        r#"{"testGuest": "memtouch"}"#,
    )
    .unwrap();
    let o = env.run(&["run", "--bundle", b.to_str().unwrap(), "x"]);
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(
        error_msg(&o).contains("no built-in guest of that name speaks the agent protocol"),
        "{o:?}"
    );
    env.assert_gone("x");
}

/// Docker's resolv.conf, hosts and hostname binds: the host files are read at create and their
/// copies go to the agent in the request (the test guest does not write them: what the agent
/// does with them is agent/tests/files.rs). A source that is not a small regular file fails
/// create, naming it, without blocking on a FIFO and leaving nothing behind.
#[test]
fn test_run_with_docker_network_file_binds_copies_or_refuses_their_sources() {
    if !usable() {
        return;
    }
    let env = Env::new(serde_json::json!({"testGuest": "agent"}));
    let files = env.dir.path().join("docker-files");
    fs::create_dir_all(&files).unwrap();
    fs::write(files.join("resolv.conf"), "nameserver 10.88.0.1\n").unwrap();
    fs::write(files.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    fs::write(files.join("hostname"), "4e1f0a2b3c4d\n").unwrap();
    let with_binds = |name: &str| {
        let b = env.bundle(name, &["echo", "copied"]);
        let path = b.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let mounts = spec["mounts"].as_array_mut().unwrap();
        for (f, ro) in [("resolv.conf", false), ("hostname", false), ("hosts", true)] {
            let mut options = vec!["rbind", "rprivate"];
            if ro {
                options.push("ro");
            }
            mounts.push(serde_json::json!({
                "destination": format!("/etc/{f}"), "type": "bind",
                "source": files.join(f), "options": options
            }));
        }
        fs::write(&path, spec.to_string()).unwrap();
        b
    };
    let b = with_binds("binds");
    let o = env.run(&["run", "--bundle", b.to_str().unwrap(), "binds"]);
    assert_eq!((o.stdout.as_str(), o.code()), ("copied\n", 0), "{o:?}");
    env.assert_gone("binds");

    // A FIFO (no writer: a blocking open would hang create), a directory, a file too big.
    fs::remove_file(files.join("hosts")).unwrap();
    nix::unistd::mkfifo(
        &files.join("hosts"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    fs::remove_file(files.join("hostname")).unwrap();
    fs::create_dir(files.join("hostname")).unwrap();
    fs::write(files.join("resolv.conf"), vec![b'#'; 64 * 1024 + 1]).unwrap();
    for (bad, want) in [
        ("resolv.conf", "larger than 64 KiB"),
        ("hostname", "is not a regular file"),
        ("hosts", "is not a regular file"),
    ] {
        let b = with_binds(&format!("bad-{bad}"));
        let t0 = Instant::now();
        let o = env.run(&["run", "--bundle", b.to_str().unwrap(), "bad"]);
        assert!(t0.elapsed() < Duration::from_secs(60), "{bad}: {o:?}");
        assert_eq!(o.code(), 1, "{bad}: {o:?}");
        let msg = error_msg(&o);
        assert!(
            msg.contains(&format!("mount /etc/{bad}"))
                && msg.contains(&files.join(bad).display().to_string())
                && msg.contains(want),
            "{bad}: {o:?}"
        );
        env.assert_gone("bad");
        // Fixed for the next case (each case finds the one before it fixed).
        match bad {
            "resolv.conf" => fs::write(files.join(bad), "nameserver 10.88.0.1\n").unwrap(),
            "hostname" => {
                fs::remove_dir(files.join(bad)).unwrap();
                fs::write(files.join(bad), "h\n").unwrap();
            }
            _ => {}
        }
    }
}

/// The C test guest speaks the agent protocol by hand: its version must follow the crate's, or
/// every test above fails at Hello (as when protocol 6 came without it). Runs without KVM.
#[test]
fn test_agent_test_guest_speaks_this_protocol_version() {
    let src = include_str!("../../guest/test-guests/guests/agent_protocol.c");
    let version = src
        .lines()
        .find_map(|l| l.strip_prefix("#define PROTOCOL_VERSION "))
        .expect("agent_protocol.c defines PROTOCOL_VERSION")
        .trim()
        .parse::<u32>()
        .expect("a number");
    assert_eq!(
        version,
        agent_protocol::PROTOCOL_VERSION,
        "guest/test-guests/guests/agent_protocol.c speaks another protocol version than agent-protocol"
    );
}

/// `ip ARGS`, true when it succeeded.
fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A named network namespace holding `eth0`, one end of a veth pair whose other end stays in
/// the test's namespace (as Docker's and CNI's bridge plugins make them); removed on drop.
struct NetNs {
    name: String,
    host_end: String,
}

impl NetNs {
    fn new(tag: &str) -> Option<Self> {
        let id = std::process::id() % 100_000;
        let ns = Self {
            name: format!("ksn-{tag}{id}"),
            host_end: format!("ksn-{tag}h{id}"),
        };
        let ok = ip(&["netns", "add", &ns.name])
            && ip(&[
                "link",
                "add",
                &ns.host_end,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ])
            && ip(&["-n", &ns.name, "addr", "add", "10.91.0.2/24", "dev", "eth0"])
            && ip(&["-n", &ns.name, "link", "set", "eth0", "up"])
            && ip(&[
                "-n",
                &ns.name,
                "route",
                "add",
                "default",
                "via",
                "10.91.0.1",
            ]);
        ok.then_some(ns)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NS ARGS`'s stdout, if it succeeded.
    fn ip_out(&self, args: &[&str]) -> Option<String> {
        let o = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        ip(&["link", "del", &self.host_end]);
        ip(&["netns", "del", &self.name]);
    }
}

/// A container whose bundle names a network namespace (Docker, CNI, Kubernetes): `create`
/// makes a tap in it, connected to its `eth0` by tc redirects both ways (the guest's frames
/// leave through the veth, and the veth's arrive at the guest), and the tap is gone with the
/// container. A namespace path that does not exist fails `create` with one line naming it.
#[test]
fn test_create_in_a_network_namespace_connects_a_tap_to_its_interface() {
    if !usable() {
        return;
    }
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/net/tun").exists() {
        println!("SKIPPED: needs root and /dev/net/tun (a network namespace and a tap)");
        return;
    }
    let Some(ns) = NetNs::new("rp") else {
        println!("SKIPPED: ip(8) could not make a network namespace with a veth pair");
        return;
    };
    let env = Env::new(serde_json::json!({"testGuest": "agent"}));
    let b = env.bundle("b", &["sh", "-c", "echo networked"]);
    let with_netns = |path: &str| {
        let cfg = b.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&cfg).unwrap()).unwrap();
        spec["linux"]["namespaces"] = serde_json::json!([
            {"type": "pid"}, {"type": "mount"}, {"type": "network", "path": path}
        ]);
        fs::write(&cfg, spec.to_string()).unwrap();
    };
    with_netns(&ns.path());
    let (pid, out) = env.create(&b, "n1");
    assert!(process_alive(pid), "the supervisor runs");
    let tap = ns
        .ip_out(&["-o", "link", "show", "tap0_kata"])
        .expect("create made tap0_kata in the container's namespace");
    let eth0_mtu = ns
        .ip_out(&["-o", "link", "show", "eth0"])
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "mtu")
                .nth(1)
                .map(str::to_string)
        })
        .unwrap();
    assert!(tap.contains("UP"), "the tap is up: {tap}");
    assert!(
        tap.contains(&format!("mtu {eth0_mtu} ")),
        "the tap takes eth0's MTU {eth0_mtu}: {tap}"
    );
    for dev in ["eth0", "tap0_kata"] {
        let filters = Command::new("tc")
            .args(["-n", &ns.name, "filter", "show", "dev", dev, "ingress"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let to = if dev == "eth0" { "tap0_kata" } else { "eth0" };
        assert!(
            filters.contains("mirred") && filters.contains(&format!("to device {to}")),
            "{dev}'s ingress redirects to {to}: {filters}"
        );
    }
    let o = env.run(&["start", "n1"]);
    assert_eq!(o.code(), 0, "{o:?}");
    let end = Instant::now() + T;
    while process_alive(pid) {
        assert!(Instant::now() < end, "the supervisor {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read_to_string(&out).unwrap(), "networked\n");
    let o = env.run(&["delete", "n1"]);
    assert_eq!(o.code(), 0, "{o:?}");
    assert!(
        ns.ip_out(&["link", "show", "tap0_kata"]).is_none(),
        "the tap is gone with the container's VM"
    );
    // The namespace is as the engine made it: no redirect left on eth0, its address untouched.
    let filters = Command::new("tc")
        .args(["-n", &ns.name, "qdisc", "show", "dev", "eth0", "ingress"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !filters.contains("ingress"),
        "delete removes eth0's ingress qdisc: {filters}"
    );
    let addr = ns.ip_out(&["-o", "addr", "show", "eth0"]).unwrap();
    assert!(addr.contains("10.91.0.2/24"), "{addr}");

    // `run` in the foreground (jailed: a parent outside cleans up) leaves no redirect either,
    // and the namespace takes a next container.
    for _ in 0..2 {
        let o = env.run(&["run", "--bundle", b.to_str().unwrap(), "n3"]);
        assert_eq!(o.code(), 0, "{o:?}");
        assert_eq!(o.stdout, "networked\n", "{o:?}");
        let qdiscs = Command::new("tc")
            .args(["-n", &ns.name, "qdisc", "show", "dev", "eth0", "ingress"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        assert!(
            !qdiscs.contains("ingress"),
            "run removes eth0's ingress qdisc: {qdiscs}"
        );
    }

    with_netns("/run/netns/ksn-no-such-namespace");
    let mut c = env.ks();
    c.args(["create", "--bundle", b.to_str().unwrap(), "n2"])
        .stdin(Stdio::null());
    let o = run_command(c, T);
    assert_ne!(o.code(), 0, "{o:?}");
    assert!(
        o.stderr
            .contains("network namespace /run/netns/ksn-no-such-namespace"),
        "{o:?}"
    );
    env.assert_gone("n2");
}

/// OCI hooks, as Docker's default bridge uses them: a bundle with a new network namespace (no
/// path) and a `prestart` hook that does what `libnetwork-setkey` makes dockerd do (moves one
/// end of a veth pair into `/proc/PID/ns/net` of the state's pid, names it eth0, gives it an
/// address). The supervisor is in a namespace of its own, not the host's; the hook runs in the
/// host's; `create` connects a tap to the eth0 the hook put there. `startContainer`,
/// `poststart` and `poststop` run at start and delete with the state they should see; a
/// failing `createRuntime` hook fails `create` with its stderr, leaving nothing behind.
#[test]
fn test_hooks_run_and_configure_the_containers_own_network_namespace() {
    if !usable() {
        return;
    }
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/net/tun").exists() {
        println!("SKIPPED: needs root and /dev/net/tun (a network namespace and a tap)");
        return;
    }
    let env = Env::new(serde_json::json!({"testGuest": "agent"}));
    let d = env.dir.path();
    let id = std::process::id() % 100_000;
    let (host_end, peer) = (format!("ksn-hk{id}"), format!("ksn-hp{id}"));
    // Deleting the host's end deletes the pair (whichever test step failed).
    struct Veth(String);
    impl Drop for Veth {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let _veth = Veth(host_end.clone());
    let hook = |name: &str, body: &str| {
        let p = d.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p.to_str().unwrap().to_string()
    };
    let dir = d.display();
    let setkey = hook(
        "setkey",
        &format!(
            "state=$(cat); echo \"$state\" > {dir}/prestart.json\n\
             readlink /proc/self/ns/net > {dir}/hook-netns\n\
             pid=$(echo \"$state\" | sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p')\n\
             ip link add {host_end} type veth peer name {peer} || exit 1\n\
             ip link set {peer} netns \"$pid\" || exit 1\n\
             nsenter --net=/proc/$pid/ns/net sh -c 'ip link set {peer} name eth0 && \
             ip addr add 10.93.0.2/24 dev eth0 && ip link set eth0 up' || exit 1"
        ),
    );
    let record = |name: &str| hook(name, &format!("cat > {dir}/{name}.json"));
    let (start_c, post_start, post_stop) = (
        record("startContainer"),
        record("poststart"),
        record("poststop"),
    );
    let b = env.bundle("b", &["sh", "-c", "echo hooked"]);
    let cfg = b.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg).unwrap()).unwrap();
    spec["linux"]["namespaces"] =
        serde_json::json!([{"type": "pid"}, {"type": "mount"}, {"type": "network"}]);
    spec["hooks"] = serde_json::json!({
        "prestart": [{"path": setkey, "args": ["setkey", "libnetwork-setkey"]}],
        "startContainer": [{"path": start_c}],
        "poststart": [{"path": post_start}],
        "poststop": [{"path": post_stop}],
    });
    fs::write(&cfg, spec.to_string()).unwrap();

    let (pid, out) = env.create(&b, "h1");
    let prestart = fs::read_to_string(d.join("prestart.json")).unwrap();
    assert!(
        prestart.contains(&format!(
            "\"id\":\"h1\",\"status\":\"creating\",\"pid\":{pid},"
        )),
        "{prestart}"
    );
    let host_ns = fs::read_link("/proc/self/ns/net").unwrap();
    let hook_ns = fs::read_to_string(d.join("hook-netns")).unwrap();
    assert_eq!(
        hook_ns.trim(),
        host_ns.to_str().unwrap(),
        "hooks run in the host's namespace"
    );
    let ns = format!("/proc/{pid}/ns/net");
    assert_ne!(
        fs::read_link(&ns).unwrap(),
        host_ns,
        "the supervisor has a network namespace of its own"
    );
    let in_ns = |args: &[&str]| {
        let o = Command::new("nsenter")
            .arg(format!("--net={ns}"))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let tap = in_ns(&["ip", "-o", "link", "show", "tap0_kata"]);
    assert!(
        tap.contains("UP"),
        "create made and raised tap0_kata there: {tap}"
    );
    let filters = in_ns(&["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("mirred") && filters.contains("to device tap0_kata"),
        "eth0's ingress goes to the tap: {filters}"
    );

    let o = env.run(&["start", "h1"]);
    assert_eq!(o.code(), 0, "{o:?}");
    let end = Instant::now() + T;
    while process_alive(pid) {
        assert!(Instant::now() < end, "the supervisor {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read_to_string(&out).unwrap(), "hooked\n");
    for (name, want) in [
        (
            "startContainer",
            format!("\"status\":\"created\",\"pid\":{pid},"),
        ),
        (
            "poststart",
            format!("\"status\":\"running\",\"pid\":{pid},"),
        ),
    ] {
        let got = fs::read_to_string(d.join(format!("{name}.json"))).unwrap();
        assert!(got.contains(&want), "{name}: {got}");
    }
    assert!(!d.join("poststop.json").exists(), "poststop runs at delete");
    let o = env.run(&["delete", "h1"]);
    assert_eq!(o.code(), 0, "{o:?}");
    let got = fs::read_to_string(d.join("poststop.json")).unwrap();
    assert!(got.contains("\"status\":\"stopped\",\"pid\":0,"), "{got}");
    env.assert_gone("h1");

    // `run` in the foreground runs the start hooks too (before its process starts).
    for f in ["startContainer.json", "poststart.json", "poststop.json"] {
        let _ = fs::remove_file(d.join(f));
    }
    spec["hooks"] = serde_json::json!({
        "startContainer": [{"path": start_c}],
        "poststart": [{"path": post_start}],
        "poststop": [{"path": post_stop}],
    });
    fs::write(&cfg, spec.to_string()).unwrap();
    let o = env.run(&["run", "--bundle", b.to_str().unwrap(), "h4"]);
    assert_eq!((o.code(), o.stdout.as_str()), (0, "hooked\n"), "{o:?}");
    for (name, want) in [
        ("startContainer", "\"status\":\"created\""),
        ("poststart", "\"status\":\"running\""),
        ("poststop", "\"status\":\"stopped\",\"pid\":0,"),
    ] {
        let got = fs::read_to_string(d.join(format!("{name}.json"))).unwrap_or_default();
        assert!(got.contains(want), "{name}: {got:?}");
    }
    env.assert_gone("h4");

    // Without hooks a new network namespace is the supervisor's own all the same (whoever
    // configures the container's pid's namespace after create never touches the host's); no
    // `network` entry: the host's, as with runc.
    for (namespaces, own) in [
        (
            serde_json::json!([{"type": "pid"}, {"type": "network"}]),
            true,
        ),
        (serde_json::json!([{"type": "pid"}]), false),
    ] {
        spec["hooks"] = serde_json::json!({});
        spec["linux"]["namespaces"] = namespaces;
        fs::write(&cfg, spec.to_string()).unwrap();
        let (pid, _) = env.create(&b, "h3");
        let ns = fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        assert_eq!(ns != host_ns, own, "{ns:?} vs the host's {host_ns:?}");
        let o = env.run(&["delete", "--force", "h3"]);
        assert_eq!(o.code(), 0, "{o:?}");
    }
    // Config `newNetworkNamespace: withHooks`: only a container with create-time hooks gets
    // one (this one has none: the host's).
    spec["linux"]["namespaces"] =
        serde_json::json!([{"type": "pid"}, {"type": "mount"}, {"type": "network"}]);
    fs::write(&cfg, spec.to_string()).unwrap();
    let env2 =
        Env::new(serde_json::json!({"testGuest": "agent", "newNetworkNamespace": "withHooks"}));
    let (pid, _) = env2.create(&b, "h5");
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        host_ns
    );
    let o = env2.run(&["delete", "--force", "h5"]);
    assert_eq!(o.code(), 0, "{o:?}");

    // A failing create-time hook fails create, with what it said.
    let fail = hook("fail", "echo no network for you >&2; exit 7");
    spec["hooks"] = serde_json::json!({"createRuntime": [{"path": fail}]});
    fs::write(&cfg, spec.to_string()).unwrap();
    let mut c = env.ks();
    c.args(["create", "--bundle", b.to_str().unwrap(), "h2"])
        .stdin(Stdio::null());
    let o = run_command(c, T);
    assert_ne!(o.code(), 0, "{o:?}");
    assert!(
        o.stderr.contains("error running createRuntime hook #0")
            && o.stderr.contains("exit status 7")
            && o.stderr.contains("no network for you"),
        "{o:?}"
    );
    env.assert_gone("h2");
}

/// Bind mounts of host paths (Docker `-v`): the container restores a template with a virtio-fs
/// slot, and its jailed supervisor holds the shares in its mount namespace (`/shared/i`, a
/// directory read-write, a file read-only), keeping only the file capabilities for them. A
/// FIFO or socket as a source is refused at create, naming it, with nothing left behind.
#[test]
fn test_host_binds_are_staged_in_the_jail_of_the_container() {
    if !usable() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: needs root (shares are staged with mounts)");
        return;
    }
    let env = Env::new(serde_json::json!({"testGuest": "agent"}));
    let d = env.dir.path();
    let vol = d.join("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("from-host"), "host data\n").unwrap();
    let conf = d.join("app.conf");
    fs::write(&conf, "k=v\n").unwrap();
    let b = env.bundle("b", &["sh", "-c", "echo shared"]);
    let cfg = b.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg).unwrap()).unwrap();
    let with_mounts = |spec: &mut serde_json::Value, extra: serde_json::Value| {
        let mounts = spec["mounts"].as_array_mut().unwrap();
        mounts.retain(|m| m["type"] != "bind");
        mounts.extend(extra.as_array().unwrap().iter().cloned());
        fs::write(&cfg, spec.to_string()).unwrap();
    };
    with_mounts(
        &mut spec,
        serde_json::json!([
            {"destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]},
            {"destination": "/etc/app.conf", "type": "bind", "source": conf, "options": ["bind", "ro"]},
        ]),
    );
    let (pid, out) = env.create(&b, "s1");
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert_eq!(
        fs::read_to_string(root.join("shared/0/from-host")).unwrap(),
        "host data\n"
    );
    assert_eq!(fs::read_to_string(root.join("shared/1")).unwrap(), "k=v\n");
    let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let opts = |at: &str| {
        mounts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(at))
            .map(|l| l.split(' ').nth(5).unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("no mount at {at}: {mounts}"))
    };
    assert!(opts("/shared/0").starts_with("rw"), "{}", opts("/shared/0"));
    assert!(opts("/shared/1").starts_with("ro"), "{}", opts("/shared/1"));
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cap = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap()
    };
    assert_eq!(cap("CapEff:"), "000000000000001f", "{status}");
    assert_eq!(cap("CapBnd:"), "000000000000001f", "{status}");
    let o = env.run(&["start", "s1"]);
    assert_eq!(o.code(), 0, "{o:?}");
    let end = Instant::now() + T;
    while process_alive(pid) {
        assert!(Instant::now() < end, "the supervisor {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read_to_string(&out).unwrap(), "shared\n");
    let o = env.run(&["delete", "s1"]);
    assert_eq!(o.code(), 0, "{o:?}");
    env.assert_gone("s1");
    assert_eq!(
        fs::read_to_string(vol.join("from-host")).unwrap(),
        "host data\n"
    );

    // Neither a FIFO nor a missing path can be shared.
    let fifo = d.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    for (source, want) in [
        (fifo.clone(), "neither a directory nor a regular file"),
        (d.join("missing"), "cannot stat the host path"),
    ] {
        with_mounts(
            &mut spec,
            serde_json::json!([{"destination": "/x", "type": "bind", "source": source}]),
        );
        let mut c = env.ks();
        c.args(["create", "--bundle", b.to_str().unwrap(), "s2"])
            .stdin(Stdio::null());
        let o = run_command(c, T);
        assert_ne!(o.code(), 0, "{o:?}");
        assert!(
            o.stderr.contains("mount /x") && o.stderr.contains(want),
            "{o:?}"
        );
        env.assert_gone("s2");
    }
}
