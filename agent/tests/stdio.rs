//! stdout/stderr relaying, stdin, binary and large data, terminals.

mod common;

use agent_protocol::{AgentMessage, MAX_STDIO_CHUNK};
use common::{Agent, err, out};

/// Stream tags of the output events, consecutive chunks of one stream merged.
fn stream_order(events: &[AgentMessage]) -> Vec<(char, String)> {
    let mut v: Vec<(char, String)> = Vec::new();
    for e in events {
        let (tag, bytes) = match e {
            AgentMessage::Stdout(b) => ('o', b),
            AgentMessage::Stderr(b) => ('e', b),
            _ => continue,
        };
        match v.last_mut() {
            Some((t, s)) if *t == tag => s.push_str(&String::from_utf8_lossy(bytes)),
            _ => v.push((tag, String::from_utf8_lossy(bytes).into_owned())),
        }
    }
    v
}

#[test]
fn test_stdio_stdout_and_stderr_separated_and_ordered() {
    require_harness!();
    let agent = Agent::start();
    let o = agent.run(&[
        "sh",
        "-c",
        "echo out1; sleep 0.2; echo err1 >&2; sleep 0.2; echo out2; sleep 0.2; echo err2 >&2",
    ]);
    assert_eq!(o.code, 0);
    assert_eq!(out(&o), "out1\nout2\n");
    assert_eq!(err(&o), "err1\nerr2\n");
    assert_eq!(
        stream_order(&o.events),
        vec![
            ('o', "out1\n".to_string()),
            ('e', "err1\n".to_string()),
            ('o', "out2\n".to_string()),
            ('e', "err2\n".to_string()),
        ]
    );
    assert!(matches!(
        o.events.last(),
        Some(AgentMessage::Exited { code: 0 })
    ));
}

#[test]
fn test_stdio_large_output_complete_and_chunked() {
    require_harness!();
    let agent = Agent::start();
    // 8 MiB of 'y\n'.
    let o = agent.run(&["sh", "-c", "yes | head -c 8388608"]);
    assert_eq!(o.code, 0);
    assert_eq!(o.stdout.len(), 8 * 1024 * 1024);
    assert!(o.stdout.chunks(2).all(|c| c == b"y\n"));
    for e in &o.events {
        if let AgentMessage::Stdout(b) = e {
            assert!(b.len() <= MAX_STDIO_CHUNK);
        }
    }
}

#[test]
fn test_stdio_binary_stdin_echoed_byte_exact() {
    require_harness!();
    let agent = Agent::start();
    // 3 MiB covering every byte value, through cat.
    let data: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let o = agent
        .run_req(agent.request(&["cat"]), Some(data.clone()))
        .unwrap();
    assert_eq!(o.code, 0);
    assert_eq!(o.stdout.len(), data.len());
    assert!(o.stdout == data, "binary data corrupted");
}

#[test]
fn test_stdio_stdin_line_read_by_shell() {
    require_harness!();
    let agent = Agent::start();
    let req = agent.request(&["sh", "-c", "read x; echo got:$x"]);
    let o = agent.run_req(req, Some(b"hello\n".to_vec())).unwrap();
    assert_eq!((o.code, out(&o).as_str()), (0, "got:hello\n"));
}

#[test]
fn test_stdio_closed_stdin_gives_eof() {
    require_harness!();
    let agent = Agent::start();
    let o = agent
        .run_req(
            agent.request(&["sh", "-c", "cat; echo done:$?"]),
            Some(Vec::new()),
        )
        .unwrap();
    assert_eq!((o.code, out(&o).as_str()), (0, "done:0\n"));
}

#[test]
fn test_stdio_output_of_background_child_does_not_hang_exit() {
    require_harness!();
    let agent = Agent::start();
    let start = std::time::Instant::now();
    // The orphan keeps stdout open; the agent must still report the exit.
    let o = agent.run(&["sh", "-c", "sleep 5 & echo parent"]);
    assert_eq!((o.code, out(&o).as_str()), (0, "parent\n"));
    assert!(start.elapsed() < std::time::Duration::from_secs(4));
}

#[test]
fn test_stdio_terminal_sized_before_the_process_runs() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["stty", "size"]);
    req.process.terminal = true;
    req.process.console_size = Some((10, 110));
    let o = agent.run_req(req, Some(Vec::new())).unwrap();
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(out(&o).trim(), "10 110");
}

#[test]
fn test_stdio_terminal_onlcr_cleared_on_request() {
    require_harness!();
    let agent = Agent::start();
    let run = |clear: bool| {
        let mut req = agent.request(&["printf", "a\\nb\\n"]);
        req.process.terminal = true;
        req.process.clear_onlcr = clear;
        let o = agent.run_req(req, Some(Vec::new())).unwrap();
        assert_eq!(o.code, 0, "{o:?}");
        o.stdout
    };
    // The terminal's default turns \n into \r\n; runc's foreground terminal does not.
    assert_eq!(run(false), b"a\r\nb\r\n");
    assert_eq!(run(true), b"a\nb\n");
}

#[test]
fn test_stdio_terminal_allocated_when_requested() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&[
        "sh",
        "-c",
        "test -t 0 && test -t 1 && tty && echo to-stderr >&2",
    ]);
    req.process.terminal = true;
    req.mounts.push(agent_protocol::Mount {
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
    });
    let o = agent.run_req(req, Some(Vec::new())).unwrap();
    assert_eq!(o.code, 0, "{o:?}");
    let text = out(&o);
    assert!(text.contains("/dev/pts/"), "{text:?}");
    // With a terminal, stderr goes to the terminal too.
    assert!(text.contains("to-stderr"), "{text:?}");
    assert!(o.stderr.is_empty());
}

#[test]
fn test_stdio_no_terminal_means_pipes() {
    require_harness!();
    let agent = Agent::start();
    let o = agent.run(&["sh", "-c", "test -t 1; echo $?"]);
    assert_eq!(out(&o), "1\n");
}

#[test]
fn test_stdio_terminal_resize_applied() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["sh", "-c", "read x; stty size"]);
    req.process.terminal = true;
    let mut c = agent.client();
    c.start(req).unwrap();
    c.send(&agent_protocol::HostMessage::Resize {
        rows: 40,
        cols: 100,
    })
    .unwrap();
    c.send(&agent_protocol::HostMessage::Stdin(b"go\n".to_vec()))
        .unwrap();
    let mut text = String::new();
    loop {
        match c.recv().unwrap() {
            AgentMessage::Stdout(b) => text.push_str(&String::from_utf8_lossy(&b)),
            AgentMessage::Exited { code } => {
                assert_eq!(code, 0);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(text.contains("40 100"), "{text:?}");
}
