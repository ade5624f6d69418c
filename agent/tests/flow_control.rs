//! Many connections at once: a host that stops reading stalls neither the
//! agent nor other connections, and costs bounded memory (its process
//! blocks); the connection cap.

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use agent_protocol::{AgentClient, AgentMessage, ClientError, ErrorKind, HostMessage};
use common::{Agent, READ_TIMEOUT, out};

/// A field of /proc/<pid>/status or /proc/<pid>/io, as a number.
fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/{file}"))
}

/// Host pid of the agent's child running `comm`, waiting for it to appear.
fn child_named(agent: &Agent, comm: &str) -> u32 {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((pid, _)) = agent.children().into_iter().find(|(_, c)| c == comm) {
            return pid;
        }
        assert!(
            Instant::now() < end,
            "no {comm} among {:?}",
            agent.children()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_flow_host_not_reading_stalls_neither_others_nor_memory() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    // This host starts a flood of output and never reads it.
    let mut flooder = agent.client();
    flooder
        .exec(agent.exec_request("flood", &["yes", "flooding"]))
        .unwrap();
    let yes = child_named(&agent, "yes");
    std::thread::sleep(Duration::from_millis(500));
    let inner = agent.inner_pid();
    let rss_before = proc_field(inner, "status", "VmRSS:");

    // Another connection's process still runs and finishes, promptly.
    let t0 = Instant::now();
    let o = agent.exec("other", &["sh", "-c", "echo done; exit 5"]);
    assert_eq!((out(&o).as_str(), o.code), ("done\n", 5));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    // The flooding process is blocked on its pipe: it writes no more.
    let written = proc_field(yes, "io", "wchar:");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(proc_field(yes, "io", "wchar:"), written, "yes still writes");
    // It wrote about what the pipe, the agent's queue and the socket hold,
    // not an unbounded amount.
    assert!(written < 16 * 1024 * 1024, "{written} bytes written");
    let rss_after = proc_field(inner, "status", "VmRSS:");
    assert!(
        rss_after < rss_before + 4 * 1024,
        "agent RSS grew from {rss_before} kB to {rss_after} kB"
    );

    // A Signal still gets through to it; the host then reads everything.
    flooder.send(&HostMessage::Signal(libc::SIGTERM)).unwrap();
    let mut bytes = Vec::new();
    loop {
        match flooder.recv().unwrap() {
            AgentMessage::Stdout(b) => bytes.extend_from_slice(&b),
            AgentMessage::Exited { code } => {
                assert_eq!(code, 143);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        bytes.len() > 256 * 1024,
        "only {} bytes relayed",
        bytes.len()
    );
    // In order, nothing lost or repeated in the middle.
    let line = b"flooding\n";
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(i, b)| *b == line[i % line.len()])
    );
}

#[test]
fn test_flow_large_output_to_slow_reader_complete_then_exited() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    c.start(agent.request(&["sh", "-c", "yes abc | head -c 2000000"]))
        .unwrap();
    // Read slowly at first: the process waits for us, nothing is lost.
    std::thread::sleep(Duration::from_millis(500));
    let mut total = Vec::new();
    loop {
        match c.recv().unwrap() {
            AgentMessage::Stdout(b) => total.extend_from_slice(&b),
            AgentMessage::Exited { code } => {
                assert_eq!(code, 0);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(total.len(), 2_000_000);
    assert!(total.chunks(4).all(|c| c == b"abc\n" || c == b"ab"));
}

#[test]
fn test_flow_65th_connection_refused_with_error_others_served() {
    require_harness!();
    let agent = Agent::start();
    // The probes of Agent::start may still be open: give them time to go.
    std::thread::sleep(Duration::from_millis(200));
    let held: Vec<AgentClient<UnixStream>> = (0..64).map(|_| agent.client()).collect();
    let s = UnixStream::connect(&agent.socket).unwrap();
    match AgentClient::handshake(s, READ_TIMEOUT) {
        Err(ClientError::Agent { kind, message }) => {
            assert_eq!(kind, ErrorKind::Internal);
            assert!(message.contains("64"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(held);
    // Slots free up once the agent sees the connections close.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let s = UnixStream::connect(&agent.socket).unwrap();
        if let Ok(mut c) = AgentClient::handshake(s, READ_TIMEOUT) {
            let o = c
                .run(agent.request(&["echo", "ok"]), None, common::RUN_DEADLINE)
                .unwrap();
            assert_eq!(out(&o), "ok\n");
            break;
        }
        assert!(Instant::now() < end, "no slot freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}
