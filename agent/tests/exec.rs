//! `Exec` (runc's `exec`): another process in the running container, on a
//! connection of its own, served at the same time as the init's.

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use agent_protocol::{AgentClient, AgentMessage, ClientError, ErrorKind, HostMessage, Mount};
use common::{Agent, err, out};

type Client = AgentClient<UnixStream>;

/// Collects output until `Exited`: (stdout, stderr, code).
fn wait_exit(c: &mut Client) -> (String, String, i32) {
    let (mut out, mut err) = (String::new(), String::new());
    loop {
        match c.recv().expect("recv") {
            AgentMessage::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
            AgentMessage::Stderr(b) => err.push_str(&String::from_utf8_lossy(&b)),
            AgentMessage::Exited { code } => return (out, err, code),
            other => panic!("unexpected {other:?} before Exited"),
        }
    }
}

fn refused(r: Result<u32, ClientError>) -> (ErrorKind, String) {
    match r {
        Err(ClientError::Agent { kind, message }) => (kind, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn devpts() -> Mount {
    Mount {
        destination: "/dev/pts".into(),
        fs_type: "devpts".into(),
        source: "devpts".into(),
        options: [
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
        ]
        .map(String::from)
        .to_vec(),
    }
}

#[test]
fn test_exec_running_container_output_stderr_and_code() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    let o = agent.exec(
        "e1",
        &["sh", "-c", "echo out; echo err >&2; cat /etc/hostname"],
    );
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(out(&o), "out\nimage\n");
    assert_eq!(err(&o), "err\n");
    assert!(o.pid.is_some());
    assert_eq!(agent.exec("e2", &["sh", "-c", "exit 3"]).code, 3);
}

#[test]
fn test_exec_missing_command_runc_message_and_127() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    let o = agent.exec("e", &["no-such-command"]);
    assert_eq!(o.code, 127);
    assert_eq!(
        o.error,
        Some((
            ErrorKind::ExecNotFound,
            "exec: \"no-such-command\": executable file not found in $PATH".into()
        ))
    );
    // The container is unharmed: the next exec runs.
    assert_eq!(agent.exec("e", &["true"]).code, 0);
}

#[test]
fn test_exec_three_at_once_and_init_each_own_output() {
    require_harness!();
    let agent = Agent::start();
    let mut init = agent.client();
    init.start(agent.request(&[
        "sh",
        "-c",
        "for i in 1 2 3 4 5; do echo init-$i; sleep 0.1; done; sleep 300",
    ]))
    .unwrap();
    let t0 = Instant::now();
    let results: Vec<(String, String, i32)> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..=3)
            .map(|n| {
                let agent = &agent;
                s.spawn(move || {
                    let script =
                        format!("for i in 1 2 3; do echo x{n}-$i; sleep 0.3; done; exit {n}");
                    let o = agent.exec(&format!("e{n}"), &["sh", "-c", &script]);
                    (out(&o), err(&o), o.code)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Run one after the other they would take 2.7 s at least.
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    for (n, (o, e, code)) in results.into_iter().enumerate() {
        let n = n + 1;
        assert_eq!(o, format!("x{n}-1\nx{n}-2\nx{n}-3\n"));
        assert_eq!((e.as_str(), code), ("", n as i32));
    }
    let mut text = String::new();
    while !text.contains("init-5") {
        match init.recv().unwrap() {
            AgentMessage::Stdout(b) => text.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(text, "init-1\ninit-2\ninit-3\ninit-4\ninit-5\n");
}

#[test]
fn test_exec_sleeping_exec_signalled_128_plus_n() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    let mut c = agent.client();
    c.exec(agent.exec_request("sleeper", &["sleep", "300"]))
        .unwrap();
    c.send(&HostMessage::Signal(libc::SIGTERM)).unwrap();
    assert_eq!(wait_exit(&mut c).2, 143);
    let mut c = agent.client();
    c.exec(agent.exec_request("sleeper", &["sleep", "300"]))
        .unwrap();
    c.send(&HostMessage::Signal(libc::SIGKILL)).unwrap();
    assert_eq!(wait_exit(&mut c).2, 137);
}

#[test]
fn test_exec_before_any_container_no_container_then_works() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    let (kind, message) = refused(c.exec(agent.exec_request("e", &["true"])));
    assert_eq!(kind, ErrorKind::NoContainer);
    assert_eq!(message, "container does not exist");
    // Nothing else comes; the same connection may try again once there is one.
    let _init = agent.start_init(&["sleep", "300"]);
    c.exec(agent.exec_request("e", &["sh", "-c", "exit 4"]))
        .unwrap();
    assert_eq!(wait_exit(&mut c).2, 4);
}

#[test]
fn test_exec_after_init_exited_container_stopped_runc_text() {
    require_harness!();
    let agent = Agent::start();
    assert_eq!(agent.run(&["true"]).code, 0);
    let mut c = agent.client();
    let (kind, message) = refused(c.exec(agent.exec_request("e", &["true"])));
    assert_eq!(kind, ErrorKind::ContainerStopped);
    assert_eq!(message, "cannot exec in a stopped container");
    // The connection is still usable.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    c.sync_time(now.as_nanos() as u64).unwrap();
}

#[test]
fn test_exec_duplicate_running_id_refused_invalid_request() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    let mut first = agent.client();
    first
        .exec(agent.exec_request("same", &["sleep", "300"]))
        .unwrap();
    let mut c = agent.client();
    let (kind, message) = refused(c.exec(agent.exec_request("same", &["true"])));
    assert_eq!(kind, ErrorKind::InvalidRequest);
    assert!(message.contains("\"same\""), "{message}");
    // Once the first is gone, the id is free again.
    first.send(&HostMessage::Signal(libc::SIGKILL)).unwrap();
    assert_eq!(wait_exit(&mut first).2, 137);
    c.exec(agent.exec_request("same", &["true"])).unwrap();
    assert_eq!(wait_exit(&mut c).2, 0);
}

#[test]
fn test_exec_processes_killed_when_init_exits_then_rootfs_gone() {
    require_harness!();
    let agent = Agent::start();
    let mut init = agent.start_init(&["sleep", "300"]);
    let mut execs: Vec<Client> = (0..2)
        .map(|n| {
            let mut c = agent.client();
            // The second one leaves a background child in its group.
            let args: &[&str] = if n == 0 {
                &["sleep", "300"]
            } else {
                &["sh", "-c", "sleep 301 & wait"]
            };
            c.exec(agent.exec_request(&format!("e{n}"), args)).unwrap();
            c
        })
        .collect();
    assert!(!agent.state_mounts().is_empty());
    // The init is pid 1 of its namespace: as in runc's, a signal it has no handler for is
    // not delivered (SIGTERM to `sleep` does nothing); SIGKILL is.
    init.send(&HostMessage::Signal(libc::SIGKILL)).unwrap();
    assert_eq!(wait_exit(&mut init).2, 137);
    for c in &mut execs {
        assert_eq!(wait_exit(c).2, 137);
    }
    let end = Instant::now() + Duration::from_secs(5);
    while !agent.children().is_empty() || !agent.state_mounts().is_empty() {
        assert!(
            Instant::now() < end,
            "left: {:?} {:?}",
            agent.children(),
            agent.state_mounts()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_init_is_pid_1_of_its_namespace_and_execs_join_it() {
    require_harness!();
    let agent = Agent::start();
    let mut init = agent.start_init(&["sleep", "300"]);
    // The exec sees the init as pid 1 (the container's /proc is its namespace's), no other
    // process of the agent, and has no parent in its namespace.
    let o = agent
        .exec_req(
            agent.exec_request(
                "ns",
                &[
                    "sh",
                    "-c",
                    "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'; grep PPid /proc/self/status",
                ],
            ),
            None,
        )
        .unwrap();
    assert_eq!(o.code, 0, "{}", err(&o));
    let text = out(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0].trim(), "sleep 300", "{text}");
    // sleep, sh, and the ls and grep of the pipeline (cat and tr are gone by then).
    let count: usize = lines[1].parse().unwrap();
    assert!((3..=5).contains(&count), "{text}");
    // sh's parent is the agent, outside the namespace: 0 as runc's exec shows it.
    assert_eq!(lines[2].split_whitespace().nth(1), Some("0"), "{text}");
    // A signal without a handler does not reach pid 1 (runc's init behaves the same).
    init.send(&HostMessage::Signal(libc::SIGTERM)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let o = agent
        .exec_req(agent.exec_request("alive", &["true"]), None)
        .unwrap();
    assert_eq!(o.code, 0, "init stopped by SIGTERM: {}", err(&o));
    init.send(&HostMessage::Signal(libc::SIGKILL)).unwrap();
    assert_eq!(wait_exit(&mut init).2, 137);
}

#[test]
fn test_exec_with_terminal_has_a_tty() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["sleep", "300"]);
    req.mounts.push(devpts());
    let mut init = agent.client();
    init.start(req).unwrap();
    let mut exec = agent.exec_request("t", &["sh", "-c", "test -t 0 && test -t 1 && tty"]);
    exec.process.terminal = true;
    let o = agent.exec_req(exec, Some(Vec::new())).unwrap();
    assert_eq!(o.code, 0, "{o:?}");
    assert!(out(&o).contains("/dev/pts/"), "{:?}", out(&o));
}

#[test]
fn test_exec_stdin_cat_echoes_and_exits_after_close_stdin() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    let mut c = agent.client();
    c.exec(agent.exec_request("cat", &["cat"])).unwrap();
    c.send(&HostMessage::Stdin(b"hello ".to_vec())).unwrap();
    c.send(&HostMessage::Stdin(b"exec\n".to_vec())).unwrap();
    let mut text = String::new();
    while text != "hello exec\n" {
        match c.recv().unwrap() {
            AgentMessage::Stdout(b) => text.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("{other:?} before the echo ({text:?})"),
        }
    }
    c.send(&HostMessage::CloseStdin).unwrap();
    assert_eq!(wait_exit(&mut c), (String::new(), String::new(), 0));
}

#[test]
fn test_exec_stdin_eof_not_held_by_another_created_child() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    let mut cat = agent.client();
    cat.exec(agent.exec_request("cat", &["cat"])).unwrap();
    // A second container's child, forked after cat's pipes existed, waits
    // for Start: it must not hold cat's stdin open.
    let mut created = agent.client();
    created.create(agent.request(&["true"])).unwrap();
    cat.send(&HostMessage::Stdin(b"x".to_vec())).unwrap();
    cat.send(&HostMessage::CloseStdin).unwrap();
    assert_eq!(wait_exit(&mut cat), ("x".into(), String::new(), 0));
}

#[test]
fn test_exec_stdin_3mb_through_sha256sum_right_hash() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let expected = {
        let mut child = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("host sha256sum");
        let mut stdin = child.stdin.take().unwrap();
        let d = data.clone();
        let w = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &d));
        let o = child.wait_with_output().unwrap();
        w.join().unwrap().unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    let t0 = Instant::now();
    let o = agent
        .exec_req(agent.exec_request("sum", &["sha256sum"]), Some(data))
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        out(&o).split_whitespace().next(),
        expected.split_whitespace().next()
    );
}
