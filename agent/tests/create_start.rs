//! `Create` then `Start` (runc's `create` and `start`): the process is set up
//! but waits for `Start` to exec; set-up failures answer `Create` and leave
//! the connection free for another attempt; out-of-order messages are
//! refused without harming the process.

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use agent_protocol::{AgentClient, AgentMessage, ClientError, ErrorKind, HostMessage};
use common::Agent;

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

fn expect_protocol_error(c: &mut Client, contains: &str) {
    match c.recv().expect("recv") {
        AgentMessage::Error {
            kind: ErrorKind::Protocol,
            message,
        } => assert!(message.contains(contains), "{message:?}"),
        other => panic!("expected a Protocol error, got {other:?}"),
    }
}

fn expect_closed(c: &mut Client) {
    match c.recv() {
        Err(ClientError::Protocol(e)) if e.is_closed() => {}
        other => panic!("expected the agent to close, got {other:?}"),
    }
}

/// Number of open descriptors of the agent.
fn agent_fds(agent: &Agent) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", agent.inner_pid()))
        .unwrap()
        .count()
}

/// Waits (up to 5 s) until the agent has no child left.
fn assert_no_children_soon(agent: &Agent) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let children = agent.children();
        if children.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "children left: {children:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_create_then_start_runs_with_output_and_exit_code() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    let pid = c
        .create(agent.request(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
        .expect("create");
    assert_eq!(c.start_created().expect("start"), pid);
    let (out, err, code) = wait_exit(&mut c);
    assert_eq!((out.as_str(), err.as_str(), code), ("out\n", "err\n", 3));
    expect_closed(&mut c);
}

#[test]
fn test_create_child_waits_without_exec_until_start() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    c.create(agent.request(&["sh", "-c", "read x; echo got $x"]))
        .expect("create");
    // The child is still the agent's fork, not yet `sh`.
    let children = agent.children();
    assert_eq!(children.len(), 1, "{children:?}");
    assert_eq!(children[0].1, "kata-agent", "exec'd before Start");
    c.start_created().expect("start");
    let end = Instant::now() + Duration::from_secs(5);
    while agent.children().first().map(|c| c.1.as_str()) != Some("sh") {
        assert!(Instant::now() < end, "{:?}", agent.children());
        std::thread::sleep(Duration::from_millis(10));
    }
    c.send(&HostMessage::Stdin(b"yes\n".to_vec())).unwrap();
    c.send(&HostMessage::CloseStdin).unwrap();
    let (out, _, code) = wait_exit(&mut c);
    assert_eq!((out.as_str(), code), ("got yes\n", 0));
}

#[test]
fn test_create_missing_command_runc_error_then_second_create_works() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    match c.create(agent.request(&["no-such-command", "arg"])) {
        Err(ClientError::Agent { kind, message }) => {
            assert_eq!(kind, ErrorKind::ExecNotFound);
            assert_eq!(
                message,
                "exec: \"no-such-command\": executable file not found in $PATH"
            );
        }
        other => panic!("expected ExecNotFound, got {other:?}"),
    }
    // No process is left, and no Exited follows: the connection is free.
    assert_no_children_soon(&agent);
    c.create(agent.request(&["sh", "-c", "echo second; exit 5"]))
        .expect("second create");
    c.start_created().expect("start");
    let (out, _, code) = wait_exit(&mut c);
    assert_eq!((out.as_str(), code), ("second\n", 5));
}

#[test]
fn test_create_bad_cwd_error_and_nothing_left() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    let mut req = agent.request(&["true"]);
    // Not a directory, and cannot become one (runc creates a missing cwd).
    req.process.cwd = "/etc/passwd/sub".into();
    match c.create(req) {
        Err(ClientError::Agent { kind, message }) => {
            assert_eq!(kind, ErrorKind::ExecFailed);
            assert!(message.contains("chdir to cwd"), "{message}");
        }
        other => panic!("expected ExecFailed, got {other:?}"),
    }
    assert_no_children_soon(&agent);
    // The state directory holds no mount of the failed attempt either.
    assert_eq!(agent.state_mounts(), Vec::<String>::new());
}

#[test]
fn test_start_exec_failure_error_then_exited_126() {
    require_harness!();
    let agent = Agent::start();
    // Found and executable, so set-up succeeds; exec fails (ENOEXEC).
    let bad = agent.rootfs.join("bin/not-a-binary");
    std::fs::write(&bad, b"\x00\x01\x02garbage").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = agent.client();
    c.create(agent.request(&["not-a-binary"])).expect("create");
    match c.start_created() {
        Err(ClientError::Agent { kind, message }) => {
            assert_eq!(kind, ErrorKind::ExecFailed);
            assert_eq!(message, "exec: \"not-a-binary\": exec format error");
        }
        other => panic!("expected ExecFailed, got {other:?}"),
    }
    assert_eq!(c.recv().unwrap(), AgentMessage::Exited { code: 126 });
    expect_closed(&mut c);
    assert_no_children_soon(&agent);
}

#[test]
fn test_start_without_create_protocol_error_session_goes_on() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    match c.start_created() {
        Err(ClientError::Agent { kind, message }) => {
            assert_eq!(kind, ErrorKind::Protocol);
            assert!(message.contains("send Create first"), "{message}");
        }
        other => panic!("expected a Protocol error, got {other:?}"),
    }
    c.create(agent.request(&["sh", "-c", "exit 6"]))
        .expect("create");
    c.start_created().expect("start");
    assert_eq!(wait_exit(&mut c).2, 6);
}

#[test]
fn test_create_out_of_order_messages_refused_process_unharmed() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    let req = agent.request(&["sh", "-c", "read x; echo got $x; exit 4"]);
    c.create(req.clone()).expect("create");
    c.send(&HostMessage::Create(Box::new(req.clone()))).unwrap();
    expect_protocol_error(&mut c, "already created");
    c.send(&HostMessage::Run(Box::new(req.clone()))).unwrap();
    expect_protocol_error(&mut c, "already created");
    // Stdin is refused, not buffered, before Start.
    c.send(&HostMessage::Stdin(b"early\n".to_vec())).unwrap();
    expect_protocol_error(&mut c, "accepted after Start");
    c.send(&HostMessage::CloseStdin).unwrap();
    expect_protocol_error(&mut c, "accepted after Start");
    // A resize before Start is harmless (no terminal here: ignored).
    c.send(&HostMessage::Resize {
        rows: 30,
        cols: 100,
    })
    .unwrap();
    c.start_created().expect("start");
    c.send(&HostMessage::Start).unwrap();
    expect_protocol_error(&mut c, "already started");
    c.send(&HostMessage::Create(Box::new(req))).unwrap();
    expect_protocol_error(&mut c, "already started");
    c.send(&HostMessage::Stdin(b"late\n".to_vec())).unwrap();
    c.send(&HostMessage::CloseStdin).unwrap();
    let (out, _, code) = wait_exit(&mut c);
    assert_eq!((out.as_str(), code), ("got late\n", 4));
}

#[test]
fn test_signal_sigkill_to_created_process_exited_137() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    c.create(agent.request(&["sleep", "30"])).expect("create");
    let t = Instant::now();
    c.send(&HostMessage::Signal(libc::SIGKILL)).unwrap();
    assert_eq!(c.recv().unwrap(), AgentMessage::Exited { code: 137 });
    assert!(t.elapsed() < Duration::from_secs(5));
    expect_closed(&mut c);
    assert_no_children_soon(&agent);
}

#[test]
fn test_signal_sigterm_to_created_process_exited_143() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    c.create(agent.request(&["sleep", "30"])).expect("create");
    c.send(&HostMessage::Signal(libc::SIGTERM)).unwrap();
    assert_eq!(c.recv().unwrap(), AgentMessage::Exited { code: 143 });
    expect_closed(&mut c);
}

#[test]
fn test_disconnect_while_created_kills_child() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    c.create(agent.request(&["sleep", "30"])).expect("create");
    assert_eq!(agent.children().len(), 1);
    assert!(!agent.state_mounts().is_empty(), "no rootfs mounted");
    drop(c);
    assert_no_children_soon(&agent);
    assert_eq!(agent.state_mounts(), Vec::<String>::new());
    // The agent serves the next connection.
    assert_eq!(agent.run(&["sh", "-c", "exit 8"]).code, 8);
}

#[test]
fn test_create_with_terminal_then_start_has_a_tty() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    let mut req = agent.request(&["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty"]);
    req.process.terminal = true;
    c.create(req).expect("create");
    c.start_created().expect("start");
    let (out, _, code) = wait_exit(&mut c);
    assert!(out.contains("is-a-tty"), "{out:?}");
    assert_eq!(code, 0);
}

#[test]
fn test_run_after_failed_create_still_works() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    assert!(c.create(agent.request(&["no-such-command"])).is_err());
    let o = c
        .run(
            agent.request(&["sh", "-c", "echo run; exit 2"]),
            None,
            common::RUN_DEADLINE,
        )
        .expect("run");
    assert_eq!((o.stdout.as_slice(), o.code), (&b"run\n"[..], 2));
}

#[test]
fn test_create_failures_and_kill_leak_no_descriptors() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    // Connections are served concurrently: a round trip lets the agent
    // finish with the probe connections of Agent::start first.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    c.sync_time(now.as_nanos() as u64).expect("sync_time");
    let base = agent_fds(&agent);
    for _ in 0..3 {
        assert!(c.create(agent.request(&["no-such-command"])).is_err());
    }
    assert_eq!(
        agent_fds(&agent),
        base,
        "descriptors leaked by failed creates"
    );
    c.create(agent.request(&["sleep", "30"])).expect("create");
    assert!(
        agent_fds(&agent) > base,
        "the created process holds no descriptor?"
    );
    c.send(&HostMessage::Signal(libc::SIGKILL)).unwrap();
    assert_eq!(c.recv().unwrap(), AgentMessage::Exited { code: 137 });
    expect_closed(&mut c);
    drop(c);
    // The connection is gone too: fewer than at the start.
    let end = Instant::now() + Duration::from_secs(5);
    while agent_fds(&agent) >= base {
        assert!(Instant::now() < end, "{} >= {base}", agent_fds(&agent));
        std::thread::sleep(Duration::from_millis(20));
    }
}
