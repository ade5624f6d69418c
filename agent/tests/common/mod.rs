//! Test harness (design section 9): a busybox-static rootfs in a temporary
//! directory and the real `kata-agent` binary in harness mode, driven through
//! the agent-protocol client exactly as the runtime drives it. Each test
//! starts its own agent process, killed on drop.

#![allow(dead_code)]

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agent_protocol::{
    AgentClient, ClientError, ExecRequest, Mount, Process, RootfsSource, RootfsSpec, RunOutcome,
    RunRequest, User,
};

/// Where Debian's busybox-static installs the binary.
pub const BUSYBOX: &str = "/bin/busybox";
/// Bound on any single run in the tests.
pub const RUN_DEADLINE: Duration = Duration::from_secs(20);
/// Bound on any single read from the agent.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "sleep",
    "kill",
    "id",
    "hostname",
    "env",
    "pwd",
    "true",
    "false",
    "dd",
    "head",
    "yes",
    "printf",
    "ps",
    "ls",
    "wc",
    "tr",
    "od",
    "seq",
    "trap",
    "test",
    "mkdir",
    "tty",
    "stty",
    "ulimit",
    "touch",
    "grep",
    "ln",
    "sha256sum",
    "stat",
    "rm",
    "umount",
];

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Returns a reason to skip, if the harness cannot run here. Prints
/// `SKIPPED: <reason>` so a skip is visible in the test output.
pub fn skip_reason() -> Option<String> {
    let reason = if !Path::new(BUSYBOX).exists() {
        Some("busybox-static not installed (apt-get install busybox-static)".to_owned())
    } else if !nix::unistd::geteuid().is_root() {
        Some("harness mode needs root (mount/pid/uts namespaces)".to_owned())
    } else {
        None
    };
    if let Some(r) = &reason {
        println!("SKIPPED: {r}");
    }
    reason
}

/// Skips the calling test (returns) when the harness cannot run.
#[macro_export]
macro_rules! require_harness {
    () => {
        if $crate::common::skip_reason().is_some() {
            return;
        }
    };
}

/// A temporary directory holding the rootfs, the socket, the state dir and
/// the agent's log.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("kata-agent-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Builds a busybox rootfs under `dir`.
pub fn build_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "bin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "etc",
        "root",
        "home/user",
        "work",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n\
         user:x:1000:1000::/home/user:/bin/sh\n\
         app:x:1001:1001::/home/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(
        root.join("etc/group"),
        "root:x:0:\nuser:x:1000:\nextra:x:2000:\n",
    )
    .unwrap();
    fs::write(root.join("etc/hostname"), "image\n").unwrap();
    root
}

/// A running agent in harness mode.
pub struct Agent {
    pub dir: TestDir,
    pub rootfs: PathBuf,
    pub socket: PathBuf,
    child: Child,
}

impl Agent {
    /// Builds a rootfs and starts the agent; waits until it accepts.
    pub fn start() -> Self {
        Self::start_with(|_| vec![])
    }

    /// As [`Self::start`], with more agent arguments made from the test
    /// directory (e.g. `--cgroup-root DIR/cg`).
    pub fn start_with(extra: impl FnOnce(&Path) -> Vec<String>) -> Self {
        let dir = TestDir::new();
        let extra = extra(&dir.path);
        let rootfs = build_rootfs(&dir.path);
        let socket = dir.path.join("agent.sock");
        let log = fs::File::create(dir.path.join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kata-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.path.join("state"))
            .args(&extra)
            .env("KATA_AGENT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kata-agent");
        let agent = Self {
            dir,
            rootfs,
            socket,
            child,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if UnixStream::connect(&agent.socket).is_ok() {
                return agent;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("agent did not listen within 10 s; log:\n{}", agent.log());
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path.join("agent.log")).unwrap_or_default()
    }

    /// A raw connection (no handshake).
    pub fn connect_raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        s
    }

    /// A client after the Hello exchange.
    pub fn client(&self) -> AgentClient<UnixStream> {
        let s = UnixStream::connect(&self.socket).expect("connect");
        AgentClient::handshake(s, READ_TIMEOUT).expect("handshake")
    }

    /// A run request for `args` with the usual container defaults.
    pub fn request(&self, args: &[&str]) -> RunRequest {
        RunRequest {
            process: Process {
                args: args.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/bin".into(), "HOME=/root".into()],
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
                options: vec!["nosuid".into(), "noexec".into(), "nodev".into()],
            }],
            rootfs: RootfsSpec {
                source: RootfsSource::Directory {
                    path: self.rootfs.display().to_string(),
                },
                readonly: false,
            },
            masked_paths: vec![],
            readonly_paths: vec![],
            seccomp: None,
            network: None,
            files: vec![],
            shared_fs: None,
        }
    }

    /// An exec request named `id` for `args` with the usual defaults.
    pub fn exec_request(&self, id: &str, args: &[&str]) -> ExecRequest {
        ExecRequest {
            id: id.into(),
            process: self.request(args).process,
            cgroup: None,
        }
    }

    /// Starts the container's init (`args`) on a new connection and returns
    /// that connection (the init lives while it is open).
    pub fn start_init(&self, args: &[&str]) -> AgentClient<UnixStream> {
        let mut c = self.client();
        if let Err(e) = c.start(self.request(args)) {
            panic!("init {args:?} failed: {e}; agent log:\n{}", self.log());
        }
        c
    }

    /// Runs `req` in the container to completion on a new connection,
    /// closing stdin at once unless `stdin` is given.
    pub fn exec_req(
        &self,
        req: ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<RunOutcome, ClientError> {
        let mut c = self.client();
        c.run_exec(req, Some(stdin.unwrap_or_default()), RUN_DEADLINE)
    }

    /// Runs `args` in the container; panics (with the agent log) on errors.
    pub fn exec(&self, id: &str, args: &[&str]) -> RunOutcome {
        match self.exec_req(self.exec_request(id, args), None) {
            Ok(o) => o,
            Err(e) => panic!("exec {args:?} failed: {e}; agent log:\n{}", self.log()),
        }
    }

    /// Host pids and command names of the agent's children (its processes).
    pub fn children(&self) -> Vec<(u32, String)> {
        let inner = self.inner_pid();
        fs::read_to_string(format!("/proc/{inner}/task/{inner}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| {
                let comm = fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
                Some((p.parse().ok()?, comm.trim().to_owned()))
            })
            .collect()
    }

    /// Mount points under the agent's state directory (containers' rootfs).
    pub fn state_mounts(&self) -> Vec<String> {
        let mounts = fs::read_to_string(format!("/proc/{}/mounts", self.inner_pid())).unwrap();
        let state = format!("{}/", self.dir.path.join("state").display());
        mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&state))
            .map(str::to_owned)
            .collect()
    }

    /// Runs `req` to completion on a new connection, closing stdin at once
    /// unless `stdin` is given.
    pub fn run_req(
        &self,
        req: RunRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<RunOutcome, ClientError> {
        let mut c = self.client();
        c.run(req, Some(stdin.unwrap_or_default()), RUN_DEADLINE)
    }

    /// Runs `args` with defaults; panics (with the agent log) on protocol errors.
    pub fn run(&self, args: &[&str]) -> RunOutcome {
        let req = self.request(args);
        match self.run_req(req, None) {
            Ok(o) => o,
            Err(e) => panic!("run {args:?} failed: {e}; agent log:\n{}", self.log()),
        }
    }

    /// Host pid of the agent process inside the namespaces (the harness's
    /// PID 1), the only child of the spawned process.
    pub fn inner_pid(&self) -> u32 {
        let outer = self.child.id();
        let children =
            fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .expect("inner agent")
            .parse()
            .unwrap()
    }

    /// Whether the agent process is still alive.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// stdout as a string.
pub fn out(o: &RunOutcome) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as a string.
pub fn err(o: &RunOutcome) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
