//! The host client against a fake agent (the other end of a socket pair):
//! broken, hostile or mismatched agent messages give clear errors.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use agent_protocol::{
    AgentClient, AgentMessage, ClientError, FrameError, HostMessage, MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION, Process, ProtocolError, RootfsSource, RootfsSpec, RunRequest, User,
    read_message, write_message,
};

const T: Duration = Duration::from_secs(5);

fn raw(msg: &AgentMessage) -> Vec<u8> {
    let payload = postcard::to_stdvec(msg).unwrap();
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&payload);
    f
}

/// Runs `agent` on one end of a socket pair; returns the client's handshake.
fn with_fake_agent(
    agent: impl FnOnce(UnixStream) + Send + 'static,
    timeout: Duration,
) -> Result<AgentClient<UnixStream>, ClientError> {
    let (host, fake) = UnixStream::pair().unwrap();
    thread::spawn(move || agent(fake));
    AgentClient::handshake(host, timeout)
}

fn request() -> RunRequest {
    RunRequest {
        process: Process {
            args: vec!["true".into()],
            env: vec![],
            cwd: "/".into(),
            user: User {
                uid: 0,
                gid: 0,
                additional_gids: vec![],
            },
            rlimits: vec![],
            terminal: false,
            no_new_privileges: false,
            umask: None,
            capabilities: None,
            clear_onlcr: false,
            console_size: None,
        },
        hostname: None,
        mounts: vec![],
        rootfs: RootfsSpec {
            source: RootfsSource::Directory { path: "/".into() },
            readonly: true,
        },
        masked_paths: vec![],
        readonly_paths: vec![],
        seccomp: None,
        network: None,
        files: vec![],
        shared_fs: None,
    }
}

#[test]
fn test_client_agent_wrong_version_is_version_mismatch() {
    let r = with_fake_agent(
        |mut s| {
            s.write_all(&raw(&AgentMessage::Hello {
                version: PROTOCOL_VERSION + 1,
            }))
            .unwrap()
        },
        T,
    );
    match r {
        Err(ClientError::VersionMismatch { agent, ours }) => {
            assert_eq!((agent, ours), (PROTOCOL_VERSION + 1, PROTOCOL_VERSION))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_client_agent_oversized_frame_rejected() {
    let r = with_fake_agent(
        |mut s| {
            s.write_all(&(MAX_MESSAGE_SIZE as u32 + 1).to_le_bytes())
                .unwrap()
        },
        T,
    );
    assert!(
        matches!(
            r,
            Err(ClientError::Protocol(ProtocolError::Frame(
                FrameError::TooLarge { .. }
            )))
        ),
        "{r:?}"
    );
}

#[test]
fn test_client_agent_truncated_frame_rejected() {
    let r = with_fake_agent(|mut s| s.write_all(&[9, 0, 0, 0, 0]).unwrap(), T);
    assert!(
        matches!(
            r,
            Err(ClientError::Protocol(ProtocolError::Frame(
                FrameError::Truncated { .. }
            )))
        ),
        "{r:?}"
    );
}

#[test]
fn test_client_agent_malformed_payload_rejected() {
    let r = with_fake_agent(|mut s| s.write_all(&[2, 0, 0, 0, 99, 99]).unwrap(), T);
    assert!(
        matches!(r, Err(ClientError::Protocol(ProtocolError::Decode(_)))),
        "{r:?}"
    );
}

#[test]
fn test_client_agent_closes_immediately_is_closed() {
    let r = with_fake_agent(drop, T);
    match r {
        Err(ClientError::Protocol(e)) => assert!(e.is_closed()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_client_silent_agent_times_out() {
    let r = with_fake_agent(
        |s| {
            // Keep the socket open, say nothing.
            thread::sleep(Duration::from_secs(2));
            drop(s);
        },
        Duration::from_millis(200),
    );
    assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
}

#[test]
fn test_client_agent_invalid_field_rejected() {
    let r = with_fake_agent(
        |mut s| {
            write_message(
                &mut s,
                &AgentMessage::Hello {
                    version: PROTOCOL_VERSION,
                },
            )
            .unwrap();
            let _ = read_message::<HostMessage>(&mut s);
            let _ = read_message::<HostMessage>(&mut s);
            s.write_all(&raw(&AgentMessage::Exited { code: 300 }))
                .unwrap();
            thread::sleep(Duration::from_millis(500));
        },
        T,
    );
    let mut c = r.unwrap();
    let e = c.run(request(), None, T).unwrap_err();
    match e {
        ClientError::Protocol(ProtocolError::Invalid(v)) => assert!(v.to_string().contains("300")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_client_unexpected_message_reported() {
    let r = with_fake_agent(
        |mut s| {
            write_message(
                &mut s,
                &AgentMessage::Hello {
                    version: PROTOCOL_VERSION,
                },
            )
            .unwrap();
            let _ = read_message::<HostMessage>(&mut s);
            let _ = read_message::<HostMessage>(&mut s);
            write_message(&mut s, &AgentMessage::Ack).unwrap();
            thread::sleep(Duration::from_millis(500));
        },
        T,
    );
    let e = r.unwrap().start(request()).unwrap_err();
    assert!(matches!(e, ClientError::Unexpected(_)), "{e:?}");
}

#[test]
fn test_client_run_collects_output_in_order() {
    let r = with_fake_agent(
        |mut s| {
            write_message(
                &mut s,
                &AgentMessage::Hello {
                    version: PROTOCOL_VERSION,
                },
            )
            .unwrap();
            let _hello = read_message::<HostMessage>(&mut s).unwrap();
            let run = read_message::<HostMessage>(&mut s).unwrap();
            assert!(matches!(run, HostMessage::Run(_)));
            for m in [
                AgentMessage::Started { pid: 5 },
                AgentMessage::Stdout(b"a".to_vec()),
                AgentMessage::Stderr(b"b".to_vec()),
                AgentMessage::Stdout(b"c".to_vec()),
                AgentMessage::Exited { code: 42 },
            ] {
                write_message(&mut s, &m).unwrap();
            }
        },
        T,
    );
    let o = r.unwrap().run(request(), None, T).unwrap();
    assert_eq!((o.pid, o.code), (Some(5), 42));
    assert_eq!(
        (o.stdout.as_slice(), o.stderr.as_slice()),
        (&b"ac"[..], &b"b"[..])
    );
    assert_eq!(o.events.len(), 5);
}

/// A fake agent that sends Hello, reads the host's Hello and one more
/// message (checked by `expect`), then answers with `answer`.
fn answering_agent(
    expect: fn(&HostMessage) -> bool,
    answer: Vec<AgentMessage>,
) -> impl FnOnce(UnixStream) + Send + 'static {
    move |mut s| {
        write_message(
            &mut s,
            &AgentMessage::Hello {
                version: PROTOCOL_VERSION,
            },
        )
        .unwrap();
        let _hello = read_message::<HostMessage>(&mut s).unwrap();
        let msg = read_message::<HostMessage>(&mut s).unwrap();
        assert!(expect(&msg), "unexpected {msg:?}");
        for m in answer {
            write_message(&mut s, &m).unwrap();
        }
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn test_client_create_returns_created_pid() {
    let agent = answering_agent(
        |m| matches!(m, HostMessage::Create(_)),
        vec![AgentMessage::Created { pid: 12 }],
    );
    let mut c = with_fake_agent(agent, T).unwrap();
    assert_eq!(c.create(request()).unwrap(), 12);
}

#[test]
fn test_client_create_error_is_agent_error() {
    let agent = answering_agent(
        |m| matches!(m, HostMessage::Create(_)),
        vec![AgentMessage::Error {
            kind: agent_protocol::ErrorKind::ExecNotFound,
            message: "exec: \"x\": executable file not found in $PATH".into(),
        }],
    );
    let e = with_fake_agent(agent, T)
        .unwrap()
        .create(request())
        .unwrap_err();
    assert!(
        matches!(
            &e,
            ClientError::Agent { kind: agent_protocol::ErrorKind::ExecNotFound, message }
                if message.contains("executable file not found")
        ),
        "{e:?}"
    );
}

#[test]
fn test_client_create_answered_by_started_is_unexpected() {
    let agent = answering_agent(
        |m| matches!(m, HostMessage::Create(_)),
        vec![AgentMessage::Started { pid: 3 }],
    );
    let e = with_fake_agent(agent, T)
        .unwrap()
        .create(request())
        .unwrap_err();
    assert!(matches!(e, ClientError::Unexpected(_)), "{e:?}");
}

#[test]
fn test_client_start_created_sends_start_returns_pid() {
    let agent = answering_agent(
        |m| matches!(m, HostMessage::Start),
        vec![AgentMessage::Started { pid: 9 }],
    );
    let mut c = with_fake_agent(agent, T).unwrap();
    assert_eq!(c.start_created().unwrap(), 9);
}
