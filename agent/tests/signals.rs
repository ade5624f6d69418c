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
    let mut c = start_until(&agent, &["sh", "-c", "echo ready; exec sleep 30"], "ready");
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

#[test]
fn test_signal_orphans_reaped_by_agent() {
    require_harness!();
    let agent = Agent::start();
    // The orphaned sleeps exit while the agent (PID 1 of the namespace) is
    // their parent; none may stay a zombie.
    let o = agent.run(&[
        "sh",
        "-c",
        "for i in 1 2 3; do (sleep 0.1 >/dev/null 2>&1 &); done",
    ]);
    assert_eq!(o.code, 0);
    let o = agent.run(&["sh", "-c", "sleep 0.5; cat /proc/[0-9]*/stat"]);
    let listing = out(&o);
    let zombies: Vec<&str> = listing
        .lines()
        .filter(|l| {
            l.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    assert!(listing.lines().count() >= 2, "no processes listed");
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
fn test_signal_orphans_reaped_between_sessions() {
    require_harness!();
    let agent = Agent::start();
    let o = agent.run(&["sh", "-c", "(sleep 1 >/dev/null 2>&1 &); exit 0"]);
    assert_eq!(o.code, 0);
    let inner = agent.inner_pid();
    // No host is connected when the orphan exits: the agent must still reap it.
    let end = Instant::now() + Duration::from_secs(5);
    let mut saw_child = false;
    loop {
        let states = child_states(inner);
        if states.is_empty() && saw_child {
            break;
        }
        saw_child |= !states.is_empty();
        for (pid, state) in states {
            if state == 'Z' {
                std::thread::sleep(Duration::from_millis(200));
                let again = child_states(inner);
                assert!(
                    !again.contains(&(pid, 'Z')),
                    "zombie {pid} not reaped while idle"
                );
            }
        }
        assert!(Instant::now() < end, "orphan never seen or never gone");
        std::thread::sleep(Duration::from_millis(20));
    }
}
