//! `kata-snap exec` on this host, against the real agent: the agent runs in harness mode (design
//! section 9: a host process in its own namespaces, serving a Unix socket), a relay plays the
//! VMM's hybrid vsock socket (`ROOT/ID/v.sock`, `CONNECT 1024` answered `OK`), and the test holds
//! the container's init process as its supervisor would. Everything between `kata-snap exec` and
//! the agent is the product's code; only the VM is missing. Rung 4 runs the same in a VM.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::{AgentClient, Mount, Process, RootfsSource, RootfsSpec, RunRequest, User};
use common::{BIN, Output, plant_with_bundle, run_command};

const T: Duration = Duration::from_secs(30);
const BUSYBOX: &str = "/bin/busybox";

/// The agent binary of this workspace, next to the test's own target directory.
fn agent_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("kata-agent");
    bin.is_file().then_some(bin)
}

/// Why this cannot run here, printed as SKIPPED.
fn skip() -> Option<String> {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("the agent's harness mode needs root (namespaces)".to_string())
    } else if !Path::new(BUSYBOX).exists() {
        Some("busybox-static is not installed (scripts/install-deps.sh)".into())
    } else if agent_bin().is_none() {
        Some("kata-agent is not built (cargo build -p agent)".into())
    } else {
        None
    };
    if let Some(w) = &why {
        println!("SKIPPED: {w}");
    }
    why
}

/// One container: a bundle with a busybox rootfs, the agent serving it, the relay, the state
/// record, and the init process (`sleep`) created and started through the agent.
struct Container {
    dir: tempfile::TempDir,
    root: PathBuf,
    id: String,
    agent: Child,
    /// The init's connection, held as the supervisor holds it.
    init: Option<AgentClient<UnixStream>>,
    /// The stand-in supervisor process the record names.
    sup: Child,
}

impl Container {
    fn new(init_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        let rootfs = bundle.join("rootfs");
        for d in ["bin", "proc", "dev", "tmp", "etc", "root", "home/app"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
        for a in [
            "sh",
            "cat",
            "echo",
            "sleep",
            "id",
            "pwd",
            "env",
            "sha256sum",
            "tty",
            "head",
        ] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        let o = run_command(
            {
                let mut c = Command::new(BIN);
                c.args(["spec", "--bundle"]).arg(&bundle);
                c
            },
            T,
        );
        assert_eq!(o.code(), 0, "{o:?}");

        let sock = dir.path().join("agent.sock");
        let agent = Command::new(agent_bin().unwrap())
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--state-dir")
            .arg(dir.path().join("agent-state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < end, "the agent did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }

        let root = dir.path().join("state");
        let id = "box".to_string();
        let sup = Command::new("sleep").arg("1000").spawn().unwrap();
        let cdir = plant_with_bundle(&root, &id, sup.id() as i32, "running", &bundle);
        relay(
            UnixListener::bind(cdir.join("v.sock")).unwrap(),
            sock.clone(),
        );

        let mut init = AgentClient::handshake(UnixStream::connect(&sock).unwrap(), T).unwrap();
        let req = RunRequest {
            process: Process {
                args: init_args.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/bin".into()],
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
            mounts: vec![Mount {
                destination: "/proc".into(),
                fs_type: "proc".into(),
                source: "proc".into(),
                options: vec![],
            }],
            rootfs: RootfsSpec {
                source: RootfsSource::Directory {
                    path: rootfs.display().to_string(),
                },
                readonly: false,
            },
            masked_paths: vec![],
            readonly_paths: vec![],
            seccomp: None,
            network: None,
            files: vec![],
            shared_fs: None,
        };
        init.create(req).unwrap();
        init.start_created().unwrap();
        // As the supervisor does when the engine gave the container no stdin.
        init.send(&agent_protocol::HostMessage::CloseStdin).unwrap();
        Self {
            dir,
            root,
            id,
            agent,
            init: Some(init),
            sup,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--root").arg(&self.root).args(args);
        c
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["exec"];
        full.extend_from_slice(args);
        run_command(self.cmd(&full), T)
    }

    /// `exec --detach --pid-file` with file stdio (a detached process keeps its stdio: a pipe
    /// would not reach EOF before it exits, with runc too); returns its host pid.
    fn exec_detached(&self, args: &[&str]) -> i32 {
        let pid_file = self.dir.path().join("exec.pid");
        let mut c = self.cmd(&["exec", "--detach", "--pid-file"]);
        c.arg(&pid_file).args(args);
        c.stdin(Stdio::null())
            .stdout(fs::File::create(self.dir.path().join("exec.out")).unwrap())
            .stderr(fs::File::create(self.dir.path().join("exec.err")).unwrap());
        let status = c.status().unwrap();
        assert!(
            status.success(),
            "{status:?}: {}",
            fs::read_to_string(self.dir.path().join("exec.err")).unwrap_or_default()
        );
        fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        drop(self.init.take());
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = self.sup.kill();
        let _ = self.sup.wait();
    }
}

/// Plays the VMM's hybrid vsock socket: each connection sends `CONNECT <port>`, is answered
/// `OK <port>` and is joined to a new connection to the agent.
fn relay(listener: UnixListener, agent: PathBuf) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut host) = conn else { return };
            let agent = agent.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut r = BufReader::new(host.try_clone().unwrap());
                if r.read_line(&mut line).is_err() || !line.starts_with("CONNECT ") {
                    return;
                }
                let Ok(guest) = UnixStream::connect(&agent) else {
                    return;
                };
                let port = line.trim_start_matches("CONNECT ").trim().to_string();
                host.write_all(format!("OK {port}\n").as_bytes()).unwrap();
                let (mut g2, mut h2) = (guest.try_clone().unwrap(), host.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut r, &mut g2);
                    let _ = g2.shutdown(std::net::Shutdown::Write);
                });
                let mut guest = guest;
                let _ = std::io::copy(&mut guest, &mut h2);
                let _ = h2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// This process adopts orphans (as containerd's shim does), so a detached exec's supervisor,
/// whose parent `kata-snap exec` exits at once, is reaped here with its status.
fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
}

fn wait_status(pid: i32) -> i32 {
    let end = Instant::now() + T;
    loop {
        match nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        )
        .unwrap()
        {
            nix::sys::wait::WaitStatus::Exited(_, c) => return c,
            nix::sys::wait::WaitStatus::Signaled(_, s, _) => return 128 + s as i32,
            _ => {}
        }
        assert!(Instant::now() < end, "pid {pid} did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn test_exec_output_stderr_and_exit_code_as_runc() {
    if skip().is_some() {
        return;
    }
    let c = Container::new(&["sleep", "100"]);
    let o = c.exec(&[&c.id, "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(o.code(), 3, "{o:?}\n{}", c.agent_log());
    assert_eq!(o.stdout, "out\n");
    assert_eq!(o.stderr, "err\n");
    // The bundle's process is the base: its env (PATH, TERM) and cwd, with --env appended,
    // --cwd and --user applied; HOME comes from the image's /etc/passwd.
    let o = c.exec(&[
        "--env",
        "A=b",
        "--cwd",
        "/tmp",
        "--user",
        "1000:1000",
        &c.id,
        "sh",
        "-c",
        "echo $A $PWD $(id -u):$(id -g) $HOME",
    ]);
    assert_eq!(o.code(), 0, "{o:?}");
    assert_eq!(o.stdout, "b /tmp 1000:1000 /home/app\n");
}

#[test]
fn test_exec_failures_are_exec_failed_with_255_as_runc() {
    if skip().is_some() {
        return;
    }
    let c = Container::new(&["sleep", "100"]);
    let o = c.exec(&[&c.id, "nosuch"]);
    assert_eq!(o.code(), 255, "{o:?}");
    assert!(
        // The logfmt line quotes the message: its own quotes are escaped, as in runc's.
        o.stderr.contains(
            r#"exec failed: unable to start container process: exec: \"nosuch\": executable file not found in $PATH"#
        ),
        "{o:?}"
    );
    let o = c.exec(&["nope", "true"]);
    assert_eq!(o.code(), 255);
    assert!(
        o.stderr.contains("exec failed: container does not exist"),
        "{o:?}"
    );
    let o = c.exec(&[&c.id]);
    assert_eq!(o.code(), 255);
}

#[test]
fn test_exec_stdin_streams_with_eof_and_megabytes_pass() {
    if skip().is_some() {
        return;
    }
    let c = Container::new(&["sleep", "100"]);
    let mut child = c.cmd(&["exec", &c.id, "cat"]);
    child.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = child.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "hi\n");
    assert!(child.wait().unwrap().success());

    // 3 MB through sha256sum: both directions stream, nothing stalls.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let expect = {
        let mut h = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        h.stdin.take().unwrap().write_all(&data).unwrap();
        String::from_utf8(h.wait_with_output().unwrap().stdout).unwrap()
    };
    let mut child = c.cmd(&["exec", &c.id, "sha256sum"]);
    child.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = child.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        expect.split_whitespace().next()
    );
    assert!(start.elapsed() < T);
}

#[test]
fn test_exec_detached_pid_file_signals_and_status_for_a_subreaper() {
    if skip().is_some() {
        return;
    }
    become_subreaper();
    let c = Container::new(&["sleep", "100"]);
    // With pipes for stdio (as a test harness or an engine gives): `exec` returns, and the
    // pipes reach EOF once the process (and its exec supervisor) exits.
    let o = c.exec(&[
        "--detach",
        "--pid-file",
        c.dir.path().join("p.pid").to_str().unwrap(),
        &c.id,
        "sh",
        "-c",
        "sleep 0.3; echo piped",
    ]);
    assert_eq!((o.code(), o.stdout.as_str()), (0, "piped\n"), "{o:?}");
    let pid = c.exec_detached(&[&c.id, "sh", "-c", "sleep 0.3; echo done; exit 5"]);
    assert_eq!(wait_status(pid), 5);
    assert_eq!(
        fs::read_to_string(c.dir.path().join("exec.out")).unwrap(),
        "done\n"
    );

    // A signal to the exec's host pid reaches the process in the guest (as the shim kills an
    // exec): SIGTERM kills sleep, 128+15.
    let pid = c.exec_detached(&[&c.id, "sleep", "100"]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(wait_status(pid), 143);
}

#[test]
fn test_exec_many_at_once_each_with_its_own_output() {
    if skip().is_some() {
        return;
    }
    let c = Container::new(&["sleep", "100"]);
    let children: Vec<(usize, Child)> = (0..4)
        .map(|i| {
            let mut cmd = c.cmd(&[
                "exec",
                &c.id,
                "sh",
                "-c",
                &format!("sleep 0.3; echo exec{i}; exit {i}"),
            ]);
            cmd.stdout(Stdio::piped());
            (i, cmd.spawn().unwrap())
        })
        .collect();
    for (i, child) in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(i as i32));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("exec{i}\n"));
    }
}

#[test]
fn test_exec_with_a_terminal_and_after_the_container_stopped() {
    if skip().is_some() {
        return;
    }
    let mut c = Container::new(&["sleep", "100"]);
    // (This rootfs has no devpts mount, so the terminal has no name in it: test -t, not tty.)
    let o = c.exec(&[
        "--tty",
        &c.id,
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo a tty",
    ]);
    assert_eq!(o.code(), 0, "{o:?}");
    // In the foreground ONLCR is off, as runc has it: \n, not \r\n.
    assert_eq!(o.stdout, "a tty\n", "{o:?}");

    // The init exits: the container is stopped for the runtime once its supervisor is gone,
    // and for the agent once its init is.
    let mut init = c.init.take().unwrap();
    init.send(&agent_protocol::HostMessage::Signal(libc::SIGKILL))
        .unwrap();
    loop {
        if let agent_protocol::AgentMessage::Exited { .. } = init.recv().unwrap() {
            break;
        }
    }
    let o = c.exec(&[&c.id, "true"]);
    assert_eq!(o.code(), 255, "{o:?}");
    assert!(
        o.stderr.contains("cannot exec in a stopped container"),
        "{o:?}"
    );
    c.sup.kill().unwrap();
    c.sup.wait().unwrap();
    let o = c.exec(&[&c.id, "true"]);
    assert_eq!(o.code(), 255, "{o:?}");
    assert!(
        o.stderr
            .contains("exec failed: cannot exec in a stopped container"),
        "{o:?}"
    );
}

#[test]
fn test_exec_detached_does_not_keep_the_callers_other_descriptors() {
    if skip().is_some() {
        return;
    }
    become_subreaper();
    let c = Container::new(&["sleep", "100"]);
    // A pipe whose write end the caller passes on by accident (not close-on-exec), as a test
    // harness's fd 3: runc closes such descriptors, and so must the exec's supervisor, or the
    // reader waits for the exec's process to end.
    let (r, w) = nix::unistd::pipe().unwrap();
    let w_raw = std::os::fd::AsRawFd::as_raw_fd(&w);
    let mut cmd = c.cmd(&[
        "exec",
        "--detach",
        "--pid-file",
        c.dir.path().join("fd.pid").to_str().unwrap(),
        &c.id,
        "sleep",
        "30",
    ]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let onto_fd3 = move || -> std::io::Result<()> {
        // SAFETY: dup2 of a descriptor the child inherited onto fd 3.
        if unsafe { libc::dup2(w_raw, 3) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure only calls dup2, async-signal-safe, between fork and exec.
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, onto_fd3) };
    assert!(cmd.status().unwrap().success());
    drop(w);
    let pid: i32 = fs::read_to_string(c.dir.path().join("fd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The read end reaches EOF while the exec still runs, not when `sleep 30` ends.
    let mut f = fs::File::from(r);
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).unwrap();
    let still_running = nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    )
    .unwrap();
    assert_eq!(
        still_running,
        nix::sys::wait::WaitStatus::StillAlive,
        "the exec's supervisor kept the caller's pipe open until it ended"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_status(pid);
}
