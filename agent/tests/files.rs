//! `RunRequest::files`: the copies of Docker's resolv.conf, hosts and
//! hostname binds are written in the container's root before its process
//! runs, owned by root with their mode, read-only when asked, and never
//! outside the root.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use agent_protocol::{AgentClient, AgentMessage, ClientError, ErrorKind, FileContent, RunRequest};
use common::{Agent, TestDir, err, out};

fn file(path: &str, content: &str, mode: u32, read_only: bool) -> FileContent {
    FileContent {
        path: path.into(),
        content: content.as_bytes().to_vec(),
        mode,
        read_only,
    }
}

/// Collects output until `Exited`: (stdout, stderr, code).
fn wait_exit(c: &mut AgentClient<UnixStream>) -> (String, String, i32) {
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

/// `Create` then `Start`, to the exit: (stdout, stderr, code).
fn create_and_run(agent: &Agent, req: RunRequest) -> (String, String, i32) {
    let mut c = agent.client();
    if let Err(e) = c.create(req) {
        panic!("create failed: {e}; agent log:\n{}", agent.log());
    }
    c.start_created().expect("start");
    wait_exit(&mut c)
}

/// `Create` that must fail: its error kind and message, within a few seconds.
fn create_refused(agent: &Agent, req: RunRequest) -> (ErrorKind, String) {
    let mut c = agent.client();
    let t0 = Instant::now();
    let r = c.create(req);
    assert!(t0.elapsed() < Duration::from_secs(5), "create blocked");
    match r {
        Err(ClientError::Agent { kind, message }) => (kind, message),
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[test]
fn test_files_written_before_the_process_as_root_with_their_mode() {
    require_harness!();
    let agent = Agent::start();
    // The image's own /etc/hostname belongs to a user and is world-writable: the copy
    // replaces its content, owner and mode. /etc/resolv.conf is missing: it is made.
    let hostname = agent.rootfs.join("etc/hostname");
    std::fs::write(&hostname, "a-much-longer-image-hostname\n").unwrap();
    std::os::unix::fs::chown(&hostname, Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(&hostname, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut req = agent.request(&[
        "sh",
        "-c",
        "cat /etc/resolv.conf /etc/hostname; stat -c '%n %a %u %g' /etc/resolv.conf /etc/hostname",
    ]);
    req.files = vec![
        file("/etc/resolv.conf", "nameserver 10.88.0.1\n", 0o644, false),
        file("/etc/hostname", "4e1f0a2b3c4d\n", 0o640, false),
    ];
    let (stdout, stderr, code) = create_and_run(&agent, req);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout,
        "nameserver 10.88.0.1\n4e1f0a2b3c4d\n\
         /etc/resolv.conf 644 0 0\n/etc/hostname 640 0 0\n"
    );
    // The image itself (the overlay's lower layer) is untouched.
    assert_eq!(
        std::fs::read_to_string(&hostname).unwrap(),
        "a-much-longer-image-hostname\n"
    );
    assert!(!agent.rootfs.join("etc/resolv.conf").exists());
}

#[test]
fn test_files_read_only_one_cannot_be_written() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&[
        "sh",
        "-c",
        "echo evil >> /etc/hosts && echo hosts-written; \
         echo ok >> /etc/resolv.conf && echo resolv-written; \
         cat /etc/hosts /etc/resolv.conf; grep -c ' /etc/hosts .* ro,' /proc/mounts",
    ]);
    req.files = vec![
        file("/etc/hosts", "127.0.0.1 localhost\n", 0o644, true),
        file("/etc/resolv.conf", "nameserver 1.1.1.1\n", 0o644, false),
    ];
    let (stdout, stderr, code) = create_and_run(&agent, req);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout,
        "resolv-written\n127.0.0.1 localhost\nnameserver 1.1.1.1\nok\n1\n"
    );
    assert!(stderr.contains("/etc/hosts"), "{stderr}");
}

#[test]
fn test_files_written_before_a_read_only_root_is_sealed() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&[
        "sh",
        "-c",
        "cat /etc/resolv.conf; touch /etc/new 2>/dev/null && echo root-writable; true",
    ]);
    req.rootfs.readonly = true;
    req.files = vec![file("/etc/resolv.conf", "search example\n", 0o644, false)];
    let (stdout, stderr, code) = create_and_run(&agent, req);
    assert_eq!((stdout.as_str(), code), ("search example\n", 0), "{stderr}");
}

#[test]
fn test_files_symlink_out_of_the_root_stays_inside() {
    require_harness!();
    let agent = Agent::start();
    // A hostile image: /etc/resolv.conf points at a host directory, absolutely, and
    // /etc/hosts climbs out with `..`. Both resolve inside the root, as the container
    // sees them.
    let outside = TestDir::new();
    let host_dir = outside.path.canonicalize().unwrap();
    let rel = host_dir.strip_prefix("/").unwrap();
    let etc = agent.rootfs.join("etc");
    std::os::unix::fs::symlink(host_dir.join("resolv.conf"), etc.join("resolv.conf")).unwrap();
    let climb = format!("../../../../../../../../{}/hosts", rel.display());
    std::os::unix::fs::symlink(&climb, etc.join("hosts")).unwrap();

    // The host directory's path does not exist in the root: it is made there (as runc makes a
    // bind's destination), and the files land in it, never on the host.
    let mut req = agent.request(&[
        "sh",
        "-c",
        &format!("cat /etc/resolv.conf /etc/hosts /{}/hosts", rel.display()),
    ]);
    req.files = vec![
        file("/etc/resolv.conf", "nameserver 6.6.6.6\n", 0o644, false),
        file("/etc/hosts", "6.6.6.6 evil\n", 0o644, true),
    ];
    let (stdout, stderr, code) = create_and_run(&agent, req);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "nameserver 6.6.6.6\n6.6.6.6 evil\n6.6.6.6 evil\n");
    assert!(!host_dir.join("resolv.conf").exists());
    assert!(!host_dir.join("hosts").exists());
    assert_eq!(std::fs::read_dir(&host_dir).unwrap().count(), 0);
}

#[test]
fn test_files_not_regular_refused_naming_the_file() {
    require_harness!();
    let agent = Agent::start();
    // A directory where the file goes, and a FIFO (opening it must not block).
    std::fs::create_dir(agent.rootfs.join("etc/hosts")).unwrap();
    nix::unistd::mkfifo(
        &agent.rootfs.join("etc/resolv.conf"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    for path in ["/etc/hosts", "/etc/resolv.conf"] {
        let mut req = agent.request(&["true"]);
        req.files = vec![file(path, "x\n", 0o644, false)];
        let (kind, message) = create_refused(&agent, req);
        assert_eq!(kind, ErrorKind::Rootfs, "{message}");
        assert!(
            message.contains(&format!(
                "cannot write file {path}: it exists and is not a regular file"
            )),
            "{message}"
        );
    }
    // A missing directory on the way is made (an image's /etc/resolv.conf linking into a
    // /run/... directory it does not ship).
    std::os::unix::fs::symlink(
        "../run/systemd/resolve/stub-resolv.conf",
        agent.rootfs.join("etc/resolv2.conf"),
    )
    .unwrap();
    let mut req = agent.request(&["cat", "/etc/resolv2.conf"]);
    req.files = vec![file(
        "/etc/resolv2.conf",
        "nameserver 9.9.9.9\n",
        0o644,
        false,
    )];
    let (stdout, stderr, code) = create_and_run(&agent, req);
    assert_eq!(
        (stdout.as_str(), code),
        ("nameserver 9.9.9.9\n", 0),
        "{stderr}"
    );
    // The agent carries on: a good Create works afterwards.
    let o = agent.run(&["true"]);
    assert_eq!(o.code, 0, "{} {}", out(&o), err(&o));
}
