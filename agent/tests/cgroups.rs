//! `Update` and `Stats` (runc's `update` and `events`) against a cgroup root
//! that is a plain directory: this host's cgroups are v1, so the tests check
//! the files the agent writes and parse fake files the kernel would write.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_protocol::{
    AgentClient, AgentMessage, ClientError, ErrorKind, HostMessage, Resources, read_message,
};
use common::Agent;

/// An agent whose cgroup root is `DIR/cg`.
fn agent() -> (Agent, PathBuf) {
    let agent = Agent::start_with(|d| {
        let root = d.join("cg");
        fs::create_dir_all(&root).unwrap();
        vec!["--cgroup-root".into(), root.display().to_string()]
    });
    let root = agent.dir.path.join("cg");
    (agent, root)
}

fn group(root: &Path) -> PathBuf {
    root.join("kata/c0")
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (ErrorKind, String) {
    match r {
        Err(ClientError::Agent { kind, message }) => (kind, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Starts `sleep 300` as the init; returns its connection and pid.
fn init(agent: &Agent) -> (AgentClient<UnixStream>, u32) {
    let mut c = agent.client();
    let pid = c
        .start(agent.request(&["sleep", "300"]))
        .unwrap_or_else(|e| panic!("init failed: {e}; log:\n{}", agent.log()));
    (c, pid)
}

fn fake(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
}

#[test]
fn test_init_and_exec_join_the_group_then_update_writes_runc_values() {
    require_harness!();
    let (agent, root) = agent();
    assert!(root.join("kata").is_dir(), "no kata/ parent");
    assert!(read(&root.join("kata/cgroup.subtree_control")).starts_with('+'));
    let (_c, pid) = init(&agent);
    let g = group(&root);
    let procs = read(&g.join("cgroup.procs"));
    assert_eq!(procs, format!("{pid}\n"), "init not in its group");
    let o = agent.exec("e1", &["true"]);
    assert_eq!(o.code, 0, "{o:?}");
    let exec_pid = o.pid.expect("exec pid");
    assert_eq!(
        read(&g.join("cgroup.procs")),
        format!("{pid}\n{exec_pid}\n"),
        "exec not put in the group before it ran"
    );

    // What the kernel shows before any limit.
    fake(&g, &[("memory.max", "max\n"), ("cpu.max", "max 100000\n")]);
    let mut c = agent.client();
    c.update(Resources {
        memory_limit: Some(64 << 20),
        memory_reservation: Some(32 << 20),
        memory_swap: Some(128 << 20),
        cpu_shares: Some(1024),
        cpu_quota: Some(50_000),
        cpuset_cpus: Some("0".into()),
        cpuset_mems: Some("0".into()),
        pids_limit: Some(20),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("update: {e}; log:\n{}", agent.log()));
    for (file, want) in [
        ("memory.max", "67108864\n"),
        ("memory.low", "33554432\n"),
        // OCI counts memory+swap; cgroup v2 swap alone.
        ("memory.swap.max", "67108864\n"),
        // runc's shares -> weight: 1 + (1024 - 2) * 9999 / 262142.
        ("cpu.weight", "39\n"),
        // The period was kept from the file.
        ("cpu.max", "50000 100000\n"),
        ("cpuset.cpus", "0\n"),
        ("cpuset.mems", "0\n"),
        ("pids.max", "20\n"),
    ] {
        assert_eq!(read(&g.join(file)), want, "{file}");
    }

    // A period alone keeps the quota; unlimited memory unlimits swap too (runc).
    c.update(Resources {
        cpu_period: Some(200_000),
        memory_limit: Some(-1),
        pids_limit: Some(-1),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(read(&g.join("cpu.max")), "50000 200000\n");
    assert_eq!(read(&g.join("memory.max")), "max\n");
    assert_eq!(read(&g.join("memory.swap.max")), "max\n");
    assert_eq!(read(&g.join("pids.max")), "max\n");

    // Swap without a memory limit in force is refused before anything is written.
    let (kind, msg) = refusal(c.update(Resources {
        memory_swap: Some(100 << 20),
        pids_limit: Some(7),
        ..Default::default()
    }));
    assert_eq!(kind, ErrorKind::InvalidRequest);
    assert_eq!(msg, "unable to set swap limit without memory limit");
    assert_eq!(read(&g.join("pids.max")), "max\n");
}

#[test]
fn test_stats_parses_the_group_files() {
    require_harness!();
    let (agent, root) = agent();
    let (_c, _pid) = init(&agent);
    let g = group(&root);
    fake(
        &g,
        &[
            ("memory.current", "1048576\n"),
            ("memory.max", "67108864\n"),
            ("memory.swap.current", "4096\n"),
            ("memory.swap.max", "max\n"),
            (
                "memory.stat",
                "anon 524288\nfile 262144\nkernel_stack 16384\n",
            ),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 5\noom 2\noom_kill 1\noom_group_kill 0\n",
            ),
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\n\
                 nr_throttled 3\nthrottled_usec 250\n",
            ),
            ("pids.current", "2\n"),
            ("pids.max", "20\n"),
        ],
    );
    let s = agent.client().stats().unwrap();
    assert_eq!(s.memory.usage, 1 << 20);
    assert_eq!(s.memory.limit, 64 << 20);
    assert_eq!(s.memory.swap_usage, 4096);
    assert_eq!(s.memory.swap_limit, u64::MAX);
    assert_eq!(
        s.memory.raw,
        vec![
            ("anon".to_owned(), 524_288),
            ("file".to_owned(), 262_144),
            ("kernel_stack".to_owned(), 16_384)
        ]
    );
    assert_eq!(
        (
            s.memory.events.max,
            s.memory.events.oom,
            s.memory.events.oom_kill
        ),
        (5, 2, 1)
    );
    assert_eq!(
        (s.cpu.usage_usec, s.cpu.user_usec, s.cpu.system_usec),
        (1500, 1000, 500)
    );
    assert_eq!(
        (s.cpu.nr_periods, s.cpu.nr_throttled, s.cpu.throttled_usec),
        (10, 3, 250)
    );
    assert_eq!((s.pids.current, s.pids.limit), (2, 20));

    // No swap accounting: zeros, as runc.
    fs::remove_file(g.join("memory.swap.current")).unwrap();
    fs::remove_file(g.join("memory.swap.max")).unwrap();
    let s = agent.client().stats().unwrap();
    assert_eq!((s.memory.swap_usage, s.memory.swap_limit), (0, 0));

    // Hostile content is an error on the connection, and the agent serves on.
    let mut c = agent.client();
    for (file, text) in [
        ("memory.current", "-5\n".to_owned()),
        ("memory.stat", "anon 1 2\n".to_owned()),
        (
            "cpu.stat",
            "usage_usec 99999999999999999999999\n".to_owned(),
        ),
        ("pids.max", "1".repeat(70_000)),
        ("memory.events", "\u{0}\u{1}\n".to_owned()),
    ] {
        let keep = fs::read(g.join(file)).unwrap();
        fs::write(g.join(file), &text).unwrap();
        let (kind, msg) = refusal(c.stats());
        assert_eq!(kind, ErrorKind::Cgroup, "{file}: {msg}");
        assert!(msg.contains(file), "{file}: {msg}");
        fs::write(g.join(file), keep).unwrap();
    }
    fs::remove_file(g.join("memory.current")).unwrap();
    let (kind, msg) = refusal(c.stats());
    assert_eq!(kind, ErrorKind::Cgroup);
    assert!(msg.contains("memory.current"), "{msg}");
    fs::write(g.join("memory.current"), "7\n").unwrap();
    assert_eq!(c.stats().unwrap().memory.usage, 7);
}

#[test]
fn test_update_and_stats_refusals() {
    require_harness!();
    let (agent, root) = agent();
    let mut c = agent.client();
    // No container yet.
    let (kind, msg) = refusal(c.update(Resources {
        pids_limit: Some(5),
        ..Default::default()
    }));
    assert_eq!(
        (kind, msg.as_str()),
        (ErrorKind::NoContainer, "container does not exist")
    );
    let (kind, _) = refusal(c.stats());
    assert_eq!(kind, ErrorKind::NoContainer);

    let (init_conn, _) = init(&agent);
    let g = group(&root);
    // Above the guest's memory: one line naming both numbers, nothing written.
    let huge = 1i64 << 50;
    let (kind, msg) = refusal(c.update(Resources {
        memory_limit: Some(huge),
        pids_limit: Some(9),
        ..Default::default()
    }));
    assert_eq!(kind, ErrorKind::InvalidRequest);
    assert!(!msg.contains('\n'), "{msg}");
    assert!(
        msg.contains(&huge.to_string()) && msg.contains("MemTotal"),
        "{msg}"
    );
    let total = msg
        .split("MemTotal ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no MemTotal number in {msg:?}"));
    assert!(total > 0 && total < huge as u64, "{msg}");
    assert!(!g.join("memory.max").exists() && !g.join("pids.max").exists());

    // Invalid values are refused by the agent's validation too (sent raw).
    let mut raw = agent.connect_raw();
    let hello = HostMessage::Hello {
        version: agent_protocol::PROTOCOL_VERSION,
    };
    for msg in [
        &hello,
        &HostMessage::Update(Box::new(Resources {
            cpu_shares: Some(1),
            ..Default::default()
        })),
    ] {
        let payload = postcard::to_stdvec(msg).unwrap();
        raw.write_all(&(payload.len() as u32).to_le_bytes())
            .unwrap();
        raw.write_all(&payload).unwrap();
    }
    assert!(matches!(
        read_message::<AgentMessage>(&mut raw).unwrap(),
        AgentMessage::Hello { .. }
    ));
    match read_message::<AgentMessage>(&mut raw).unwrap() {
        AgentMessage::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::InvalidRequest);
            assert!(message.contains("cpu shares"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(!g.join("cpu.weight").exists());

    // Stopped: runc's "container not running"; the group is gone with the rootfs.
    drop(init_conn); // the agent SIGKILLs the init of a closed connection
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match c.update(Resources {
            pids_limit: Some(5),
            ..Default::default()
        }) {
            Err(ClientError::Agent {
                kind: ErrorKind::ContainerStopped,
                message,
            }) => {
                assert_eq!(message, "container not running");
                break;
            }
            other => assert!(Instant::now() < end, "still {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (kind, _) = refusal(c.stats());
    assert_eq!(kind, ErrorKind::ContainerStopped);
    let end = Instant::now() + Duration::from_secs(5);
    while g.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!g.exists(), "group left after the container stopped");
}

#[test]
fn test_without_cgroup_root_containers_run_and_update_says_why() {
    require_harness!();
    let agent = Agent::start();
    let (_c, _) = init(&agent);
    let (kind, msg) = refusal(agent.client().update(Resources {
        pids_limit: Some(5),
        ..Default::default()
    }));
    assert_eq!(kind, ErrorKind::Cgroup);
    assert!(msg.contains("the guest has no cgroups"), "{msg}");
}
