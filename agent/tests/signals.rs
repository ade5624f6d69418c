//! Signal forwarding, disconnects and zombie reaping.

mod common;

use std::time::{Duration, Instant};

use agent_protocol::{AgentMessage, HostMessage};
use common::{Agent, out};

/// Starts `args`, waits until its stdout contains `marker`, returns the client.
fn start_until(
    agent: &Agent,
    args: &[&str],
    marker: &str,
) -> agent_protocol::AgentClient<std::os::unix::net::UnixStream> {
    let mut c = agent.client();
    c.start(agent.request(args)).expect("start");
    let mut seen = String::new();
    while !seen.contains(marker) {
        match c.recv().expect("recv") {
            AgentMessage::Stdout(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("unexpected {other:?} before marker"),
        }
    }
    c
}

fn wait_exit(c: &mut agent_protocol::AgentClient<std::os::unix::net::UnixStream>) -> (i32, String) {
    let mut text = String::new();
    loop {
        match c.recv().expect("recv") {
            AgentMessage::Stdout(b) => text.push_str(&String::from_utf8_lossy(&b)),
            AgentMessage::Stderr(_) => {}
            AgentMessage::Exited { code } => return (code, text),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn test_signal_sigterm_forwarded_exit_143() {
    require_harness!();
    let agent = Agent::start();
    // To an exec: the init, pid 1 of its namespace, ignores a SIGTERM it has no handler for
    // (as runc's does).
    let _init = agent.start_init(&["sleep", "300"]);
    let mut c = agent.client();
    c.exec(agent.exec_request("t", &["sh", "-c", "echo ready; exec sleep 30"]))
        .expect("exec");
    let mut seen = String::new();
    while !seen.contains("ready") {
        match c.recv().expect("recv") {
            AgentMessage::Stdout(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("unexpected {other:?} before marker"),
        }
    }
    let t = Instant::now();
    c.send(&HostMessage::Signal(libc::SIGTERM)).unwrap();
    assert_eq!(wait_exit(&mut c).0, 143);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn test_signal_sigkill_forwarded_exit_137() {
    require_harness!();
    let agent = Agent::start();
    let mut c = start_until(&agent, &["sh", "-c", "echo ready; exec sleep 30"], "ready");
    c.send(&HostMessage::Signal(libc::SIGKILL)).unwrap();
    assert_eq!(wait_exit(&mut c).0, 137);
}

#[test]
fn test_signal_trapped_by_process_handler_runs() {
    require_harness!();
    let agent = Agent::start();
    let script = "trap 'echo got-usr1; exit 7' USR1; echo ready; while true; do sleep 0.05; done";
    let mut c = start_until(&agent, &["sh", "-c", script], "ready");
    c.send(&HostMessage::Signal(libc::SIGUSR1)).unwrap();
    let (code, text) = wait_exit(&mut c);
    assert_eq!(code, 7);
    assert!(text.contains("got-usr1"), "{text:?}");
}

#[test]
fn test_signal_host_disconnect_kills_process() {
    require_harness!();
    let agent = Agent::start();
    let c = start_until(&agent, &["sh", "-c", "echo ready; exec sleep 31"], "ready");
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let o = agent.run(&["ps"]);
    assert!(
        !out(&o).contains("sleep 31"),
        "process survived disconnect:\n{}",
        out(&o)
    );
}

/// States of the children of host pid `pid` (from /proc).
fn child_states(pid: u32) -> Vec<(u32, char)> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| {
            let stat = std::fs::read_to_string(format!("/proc/{c}/stat")).ok()?;
            let state = stat.rsplit(')').next()?.trim_start().chars().next()?;
            Some((c.parse().ok()?, state))
        })
        .collect()
}

#[test]
fn test_signal_orphans_die_with_the_init() {
    require_harness!();
    let agent = Agent::start();
    // The orphan is reparented to the container's init (pid 1 of its namespace), and the
    // kernel kills it when the init exits, as in runc's containers: nothing of it is left
    // among the agent's children, neither running nor a zombie.
    let o = agent.run(&["sh", "-c", "(sleep 30 >/dev/null 2>&1 &); exit 0"]);
    assert_eq!(o.code, 0);
    let inner = agent.inner_pid();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let states = child_states(inner);
        if states.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "left behind: {states:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
