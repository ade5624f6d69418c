//! Hostile and broken host input: the agent answers with a clear error and
//! either keeps serving or closes the connection, and never dies.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;

use agent_protocol::{
    AgentMessage, ErrorKind, HostMessage, MAX_MESSAGE_SIZE, PROTOCOL_VERSION, ProtocolError,
    read_message,
};
use common::Agent;

/// A frame for `msg`, encoded without validation (as a buggy host would).
fn raw_frame(msg: &HostMessage) -> Vec<u8> {
    let payload = postcard::to_stdvec(msg).unwrap();
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&payload);
    f
}

fn recv(s: &mut UnixStream) -> AgentMessage {
    read_message::<AgentMessage>(s).expect("agent message")
}

fn expect_error(s: &mut UnixStream, want: ErrorKind) -> String {
    match recv(s) {
        AgentMessage::Error { kind, message } if kind == want => message,
        other => panic!("expected {want:?} error, got {other:?}"),
    }
}

fn expect_closed(s: &mut UnixStream) {
    match read_message::<AgentMessage>(s) {
        Err(e) if e.is_closed() => {}
        other => panic!("expected the agent to close, got {other:?}"),
    }
}

/// Connects and completes the Hello exchange by hand.
fn hello(agent: &Agent) -> UnixStream {
    let mut s = agent.connect_raw();
    assert_eq!(
        recv(&mut s),
        AgentMessage::Hello {
            version: PROTOCOL_VERSION
        }
    );
    s.write_all(&raw_frame(&HostMessage::Hello {
        version: PROTOCOL_VERSION,
    }))
    .unwrap();
    s
}

/// The agent still runs processes on a fresh connection.
fn assert_still_serving(agent: &mut Agent) {
    assert!(agent.alive(), "agent died; log:\n{}", agent.log());
    assert_eq!(agent.run(&["sh", "-c", "exit 5"]).code, 5);
}

#[test]
fn test_protocol_wrong_version_hello_rejected_clearly() {
    require_harness!();
    let mut agent = Agent::start();
    let mut s = agent.connect_raw();
    assert_eq!(
        recv(&mut s),
        AgentMessage::Hello {
            version: PROTOCOL_VERSION
        }
    );
    s.write_all(&raw_frame(&HostMessage::Hello { version: 99 }))
        .unwrap();
    let msg = expect_error(&mut s, ErrorKind::VersionMismatch);
    assert!(
        msg.contains("peer speaks version 99")
            && msg.contains(&format!("speaks {PROTOCOL_VERSION}")),
        "{msg}"
    );
    expect_closed(&mut s);
    assert_still_serving(&mut agent);
}

#[test]
fn test_protocol_first_message_not_hello_closes() {
    require_harness!();
    let mut agent = Agent::start();
    let mut s = agent.connect_raw();
    recv(&mut s);
    s.write_all(&raw_frame(&HostMessage::CloseStdin)).unwrap();
    let msg = expect_error(&mut s, ErrorKind::Protocol);
    assert!(msg.contains("Hello"), "{msg}");
    expect_closed(&mut s);
    assert_still_serving(&mut agent);
}

#[test]
fn test_protocol_malformed_payload_answered_and_session_continues() {
    require_harness!();
    let mut agent = Agent::start();
    let mut s = hello(&agent);
    // Variant 200 does not exist.
    s.write_all(&[3, 0, 0, 0, 200, 1, 2]).unwrap();
    let msg = expect_error(&mut s, ErrorKind::Protocol);
    assert!(msg.contains("malformed"), "{msg}");
    // Trailing garbage after a valid message is malformed too.
    let mut f = raw_frame(&HostMessage::CloseStdin);
    f[0] += 1;
    f.push(0xaa);
    s.write_all(&f).unwrap();
    expect_error(&mut s, ErrorKind::Protocol);
    // The same connection can still run a process.
    let mut run = common::Agent::request(&agent, &["sh", "-c", "exit 9"]);
    run.process.env.push("X=1".into());
    s.write_all(&raw_frame(&HostMessage::Run(Box::new(run))))
        .unwrap();
    s.write_all(&raw_frame(&HostMessage::CloseStdin)).unwrap();
    assert!(matches!(recv(&mut s), AgentMessage::Started { .. }));
    assert_eq!(recv(&mut s), AgentMessage::Exited { code: 9 });
    expect_closed(&mut s);
    assert_still_serving(&mut agent);
}

#[test]
fn test_protocol_invalid_fields_rejected_each_with_reason() {
    require_harness!();
    let mut agent = Agent::start();
    let mut s = hello(&agent);
    let base = agent.request(&["true"]);
    let cases: Vec<(HostMessage, &str)> = vec![
        (
            HostMessage::Run(Box::new({
                let mut r = base.clone();
                r.process.args.clear();
                r
            })),
            "args must not be empty",
        ),
        (
            HostMessage::Run(Box::new({
                let mut r = base.clone();
                r.process.cwd = "relative".into();
                r
            })),
            "absolute path",
        ),
        (
            HostMessage::Run(Box::new({
                let mut r = base.clone();
                r.process.env = vec!["NOEQUALS".into()];
                r
            })),
            "KEY=VALUE",
        ),
        (
            HostMessage::Run(Box::new({
                let mut r = base.clone();
                r.process.args[0] = "a\0b".into();
                r
            })),
            "NUL",
        ),
        (
            HostMessage::Run(Box::new({
                let mut r = base.clone();
                r.hostname = Some("bad/host".into());
                r
            })),
            "hostname",
        ),
        (
            HostMessage::Run(Box::new({
                let mut r = base.clone();
                r.mounts[0].fs_type = "nfs".into();
                r
            })),
            "not supported",
        ),
        (
            HostMessage::Run(Box::new({
                let mut r = base.clone();
                r.mounts[0].destination = "/a/../etc".into();
                r
            })),
            "absolute path",
        ),
        (
            HostMessage::Run(Box::new({
                let mut r = base.clone();
                r.process.rlimits = vec![agent_protocol::Rlimit {
                    kind: agent_protocol::RlimitKind::Nofile,
                    soft: 10,
                    hard: 5,
                }];
                r
            })),
            "exceeds hard limit",
        ),
        (HostMessage::Signal(0), "signal 0"),
        (HostMessage::Signal(65), "signal 65"),
        (HostMessage::Resize { rows: 0, cols: 80 }, "at least 1x1"),
        (
            HostMessage::Stdin(vec![0; agent_protocol::MAX_STDIO_CHUNK + 1]),
            "stdin chunk",
        ),
        (
            HostMessage::SyncTime { realtime_ns: 5 },
            "outside the accepted range",
        ),
        (
            HostMessage::Reseed { bytes: vec![1; 4] },
            "fewer than the minimum",
        ),
        (
            HostMessage::Reseed {
                bytes: vec![1; 4096],
            },
            "more than the limit",
        ),
    ];
    for (msg, want) in cases {
        s.write_all(&raw_frame(&msg)).unwrap();
        let got = expect_error(&mut s, ErrorKind::InvalidRequest);
        assert!(got.contains(want), "{msg:?}: {got:?} lacks {want:?}");
    }
    // Requests that need a process are refused without one.
    s.write_all(&raw_frame(&HostMessage::Signal(15))).unwrap();
    assert!(expect_error(&mut s, ErrorKind::Protocol).contains("no process"));
    // Connections are served one at a time: close this one first.
    drop(s);
    assert_still_serving(&mut agent);
}

#[test]
fn test_protocol_oversized_frame_rejected_before_reading_it() {
    require_harness!();
    let mut agent = Agent::start();
    let mut s = hello(&agent);
    s.write_all(&((MAX_MESSAGE_SIZE as u32) + 1).to_le_bytes())
        .unwrap();
    let msg = expect_error(&mut s, ErrorKind::Protocol);
    assert!(msg.contains("exceeds the limit"), "{msg}");
    expect_closed(&mut s);
    let mut s = hello(&agent);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    expect_error(&mut s, ErrorKind::Protocol);
    assert_still_serving(&mut agent);
}

#[test]
fn test_protocol_truncated_frame_then_disconnect_survived() {
    require_harness!();
    let mut agent = Agent::start();
    let mut s = hello(&agent);
    let f = raw_frame(&HostMessage::Run(Box::new(agent.request(&["true"]))));
    s.write_all(&f[..f.len() / 2]).unwrap();
    drop(s);
    // Half a length prefix, too.
    let mut s = hello(&agent);
    s.write_all(&[1, 0]).unwrap();
    drop(s);
    assert_still_serving(&mut agent);
    assert!(agent.log().contains("mid-frame"), "{}", agent.log());
}

#[test]
fn test_protocol_frame_split_across_writes_reassembled() {
    require_harness!();
    let agent = Agent::start();
    let mut s = hello(&agent);
    let f = raw_frame(&HostMessage::Run(Box::new(
        agent.request(&["sh", "-c", "exit 4"]),
    )));
    for b in &f {
        s.write_all(std::slice::from_ref(b)).unwrap();
    }
    assert!(matches!(recv(&mut s), AgentMessage::Started { .. }));
    assert_eq!(recv(&mut s), AgentMessage::Exited { code: 4 });
}

#[test]
fn test_protocol_second_run_on_connection_refused() {
    require_harness!();
    let agent = Agent::start();
    let mut s = hello(&agent);
    let run = raw_frame(&HostMessage::Run(Box::new(agent.request(&[
        "sh",
        "-c",
        "read x; exit 0",
    ]))));
    s.write_all(&run).unwrap();
    assert!(matches!(recv(&mut s), AgentMessage::Started { .. }));
    s.write_all(&run).unwrap();
    assert!(expect_error(&mut s, ErrorKind::Protocol).contains("already started"));
    s.write_all(&raw_frame(&HostMessage::CloseStdin)).unwrap();
    assert_eq!(recv(&mut s), AgentMessage::Exited { code: 0 });
    expect_closed(&mut s);
}

#[test]
fn test_protocol_client_refuses_to_send_invalid_message() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    let err = c.send(&HostMessage::Signal(0)).unwrap_err();
    assert!(
        matches!(
            err,
            agent_protocol::ClientError::Protocol(ProtocolError::Invalid(_))
        ),
        "{err:?}"
    );
}
