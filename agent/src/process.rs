//! Starting the container process in two steps, as runc's `create` and
//! `start`: [`prepare`] forks and sets the child up, [`ExecGate::open`] lets
//! it exec.
//!
//! ```text
//!  agent (parent)                       child
//!   prepare: fork ------------------->  set-up: setsid, stdio, chroot,
//!                                        hostname (init only), rlimits,
//!                                        umask, HOME, bounding caps,
//!                                        user, cwd, capset + ambient,
//!                                        PATH lookup, no_new_privs
//!   <-- report: READY ---------------    (or: kind byte + message, _exit)
//!   ... Created ...                      blocked reading the go pipe
//!   open: write go byte ------------->  execve
//!   <-- report: EOF (exec succeeded) -   (or: kind byte + message, _exit)
//! ```
//!
//! One code path serves the container's init (`Create`/`Run`, with its
//! hostname) and the processes `Exec` runs in it (no hostname, no mounts).
//!
//! The agent is single-threaded, so the child may allocate between `fork` and
//! `exec`. Both pipes are close-on-exec. The parent waits for each report at
//! most [`CHILD_REPORT_TIMEOUT`]. A child whose go pipe reaches EOF (the
//! agent dropped the gate without opening it) exits without exec. Messages
//! and exit codes follow runc: 127 for a command that is not found, 126 for
//! one that cannot be invoked.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_protocol::{ErrorKind, Process, RlimitKind};
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use thiserror::Error;

use crate::exit_status::{EXIT_CANNOT_INVOKE, EXIT_NOT_FOUND};
use crate::lookup::{errno_reason, look_path};
use crate::passwd::home_dir;

pub use crate::lookup::DEFAULT_PATH;

/// The umask a process gets when its request has none (runc's default).
pub const DEFAULT_UMASK: u32 = 0o022;

/// Longest wait for the child's report, after fork (set-up) and after the go
/// byte (exec). Both are local work; a child that takes longer (a hung disk)
/// is killed and the request fails, so the session's loop never waits
/// without bound.
pub const CHILD_REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// First byte of a report: the child finished set-up and waits for the go
/// byte. Failure reports start with a kind byte (1..=3) instead.
const REPORT_READY: u8 = 0;
/// Most bytes of a report the parent reads.
const REPORT_LIMIT: usize = 64 * 1024;

/// Errors of starting a process.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// Parent-side setup (pipes, pty, fork) failed.
    #[error("cannot start process: {0}")]
    Setup(String),
    /// The child did not report within [`CHILD_REPORT_TIMEOUT`], or died
    /// without a report; it has been killed and reaped.
    #[error("the process {stage} did not complete: {reason}")]
    Stalled {
        /// `set-up` or `exec`.
        stage: &'static str,
        /// What happened instead.
        reason: String,
    },
    /// The child failed before or at exec; it has exited with `code`.
    #[error("{message}")]
    Exec {
        /// Class of failure.
        kind: ErrorKind,
        /// runc-style message.
        message: String,
        /// The exit status to report.
        code: i32,
    },
}

/// The running process and the agent's ends of its stdio.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: Pid,
    /// Where to write its stdin (the pty master when it has a terminal).
    pub stdin: OwnedFd,
    /// Where to read its stdout (the pty master when it has a terminal).
    pub stdout: OwnedFd,
    /// Where to read its stderr (none with a terminal).
    pub stderr: Option<OwnedFd>,
    /// Whether stdio is a terminal.
    pub terminal: bool,
}

/// A failure inside the child, sent to the parent.
#[derive(Debug)]
struct ChildFailure {
    kind: ErrorKind,
    message: String,
}

impl ChildFailure {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    fn setup(what: &str, err: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::ExecFailed, format!("{what}: {err}"))
    }
}

fn kind_to_byte(k: ErrorKind) -> u8 {
    match k {
        ErrorKind::ExecNotFound => 1,
        ErrorKind::ExecPermissionDenied => 2,
        _ => 3,
    }
}

fn byte_to_kind(b: u8) -> (ErrorKind, i32) {
    match b {
        1 => (ErrorKind::ExecNotFound, EXIT_NOT_FOUND),
        2 => (ErrorKind::ExecPermissionDenied, EXIT_CANNOT_INVOKE),
        _ => (ErrorKind::ExecFailed, EXIT_CANNOT_INVOKE),
    }
}

fn rlimit_resource(k: RlimitKind) -> libc::__rlimit_resource_t {
    match k {
        RlimitKind::As => libc::RLIMIT_AS,
        RlimitKind::Core => libc::RLIMIT_CORE,
        RlimitKind::Cpu => libc::RLIMIT_CPU,
        RlimitKind::Data => libc::RLIMIT_DATA,
        RlimitKind::Fsize => libc::RLIMIT_FSIZE,
        RlimitKind::Locks => libc::RLIMIT_LOCKS,
        RlimitKind::Memlock => libc::RLIMIT_MEMLOCK,
        RlimitKind::Msgqueue => libc::RLIMIT_MSGQUEUE,
        RlimitKind::Nice => libc::RLIMIT_NICE,
        RlimitKind::Nofile => libc::RLIMIT_NOFILE,
        RlimitKind::Nproc => libc::RLIMIT_NPROC,
        RlimitKind::Rss => libc::RLIMIT_RSS,
        RlimitKind::Rtprio => libc::RLIMIT_RTPRIO,
        RlimitKind::Rttime => libc::RLIMIT_RTTIME,
        RlimitKind::Sigpending => libc::RLIMIT_SIGPENDING,
        RlimitKind::Stack => libc::RLIMIT_STACK,
    }
}

fn cstring(what: &str, s: &[u8]) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Setup(format!("{what} contains a NUL byte")))
}

fn setup_err(what: &str) -> impl Fn(nix::Error) -> SpawnError + '_ {
    move |e| SpawnError::Setup(format!("{what}: {e}"))
}

/// Opens a pseudo-terminal pair. The container's own devpts instance
/// (`<root>/dev/pts/ptmx`, from an OCI `devpts` mount) is preferred so the
/// slave has a name inside the container, as with runc; otherwise the
/// agent's `/dev/ptmx`. The slave is opened through the master
/// (`TIOCGPTPEER`), never by path.
fn open_pty(root: &Path) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    use std::os::unix::fs::FileTypeExt;
    let own = root.join("dev/pts/ptmx");
    let ptmx = match std::fs::symlink_metadata(&own) {
        Ok(m) if m.file_type().is_char_device() => own,
        _ => std::path::PathBuf::from("/dev/ptmx"),
    };
    let master = nix::fcntl::open(
        &ptmx,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SpawnError::Setup(format!("open {}: {e}", ptmx.display())))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int that lives across the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(SpawnError::Setup(format!(
            "unlockpt: {}",
            std::io::Error::last_os_error()
        )));
    }
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if slave < 0 {
        return Err(SpawnError::Setup(format!(
            "open pty slave: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: the ioctl returned a new descriptor that nothing else owns.
    let slave = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(slave) };
    let ws = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives across the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    Ok((master, slave))
}

/// Which process of the container is started: its init, or one more (`Exec`).
#[derive(Debug, Clone, Copy)]
pub enum Role<'a> {
    /// The container's init: sets the hostname (when given) and, as runc's
    /// `prepareRootfs` does, creates a missing working directory.
    Init {
        /// The container's hostname.
        hostname: Option<&'a str>,
    },
    /// Another process in the running container.
    Exec,
}

/// Everything the child needs, prepared before fork.
struct ChildPlan<'a> {
    process: &'a Process,
    role: Role<'a>,
    /// The container's group: the child moves itself in and enters a cgroup namespace of its
    /// own there before anything else (while it still has the privileges for both).
    cgroup_procs: Option<CString>,
    root: CString,
    env: Vec<CString>,
    args: Vec<CString>,
    path_env: String,
    /// The kernel's highest capability number (read before the fork).
    last_cap: u32,
}

fn reset_signals() {
    let empty = nix::sys::signal::SigSet::empty();
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&empty),
        None,
    );
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: restoring the default disposition installs no handler code.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// What the child execs once set up.
struct ExecTarget {
    path: CString,
    /// The request's environment, with `HOME` added when it had none.
    env: Vec<CString>,
}

/// The environment with `HOME` set from the container's `/etc/passwd` when
/// the request has none (or an empty one), as runc does. Runs in the child
/// after chroot and before the credentials change.
fn env_with_home(plan: &ChildPlan<'_>) -> Result<Vec<CString>, ChildFailure> {
    let has_home = plan
        .process
        .env
        .iter()
        .any(|e| e.strip_prefix("HOME=").is_some_and(|v| !v.is_empty()));
    let mut env: Vec<CString> = plan
        .env
        .iter()
        .filter(|e| has_home || !e.as_bytes().starts_with(b"HOME="))
        .cloned()
        .collect();
    if !has_home {
        let home = home_dir(Path::new("/etc/passwd"), plan.process.user.uid);
        env.push(
            CString::new(format!("HOME={home}"))
                .map_err(|_| ChildFailure::setup("HOME", "NUL byte in /etc/passwd"))?,
        );
    }
    Ok(env)
}

/// Closes every descriptor from 3 up except `keep` (the report and go
/// pipes). The agent's descriptors are close-on-exec, but a child that waits
/// for `Start` would otherwise hold the other sessions' connections and
/// pipes open meanwhile (a `cat` exec'd on another connection would never
/// see its stdin's EOF).
fn close_inherited(keep: [i32; 2]) {
    let mut keep = keep.map(|k| k as libc::c_uint);
    keep.sort_unstable();
    let mut from: libc::c_uint = 3;
    for k in keep {
        if k >= from {
            close_span(from, k);
            from = k + 1;
        }
    }
    close_span(from, libc::c_uint::MAX);
}

/// Closes descriptors `from..end` (`end` excluded).
fn close_span(from: libc::c_uint, end: libc::c_uint) {
    if end <= from {
        return;
    }
    // SAFETY: close_range(2) takes plain integers and closes only
    // descriptors of this (child) process.
    if unsafe { libc::syscall(libc::SYS_close_range, from, end - 1, 0) } != 0 {
        // Kernels before 5.9: close one by one up to a sane bound.
        for fd in from..end.min(4096) {
            // SAFETY: closing a descriptor number; EBADF is harmless.
            unsafe { libc::close(fd as i32) };
        }
    }
}

/// Moves the calling child into the group whose `cgroup.procs` is `procs`, then into a cgroup
/// namespace of its own rooted there: the container sees its group as `/` (`/proc/self/cgroup`
/// reads `0::/`, as with runc's cgroup namespace on a cgroup v2 host).
fn join_cgroup(procs: &std::ffi::CStr) -> Result<(), ChildFailure> {
    let fd = nix::fcntl::open(
        procs,
        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| ChildFailure::setup("open the container's cgroup", e))?;
    let pid = nix::unistd::getpid().to_string();
    nix::unistd::write(&fd, pid.as_bytes())
        .map_err(|e| ChildFailure::setup("join the container's cgroup", e))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| ChildFailure::setup("create the cgroup namespace", e))
}

/// Every set-up step of the child, in order; returns what to exec.
fn child_setup(
    plan: &ChildPlan<'_>,
    stdio: [i32; 3],
    keep: [i32; 2],
    terminal: bool,
) -> Result<ExecTarget, ChildFailure> {
    reset_signals();
    if let Some(procs) = &plan.cgroup_procs {
        join_cgroup(procs)?;
    }
    nix::unistd::setsid().map_err(|e| ChildFailure::setup("setsid", e))?;
    if terminal {
        // SAFETY: TIOCSCTTY takes an integer argument; stdio[0] is the pty slave.
        if unsafe { libc::ioctl(stdio[0], libc::TIOCSCTTY, 0) } != 0 {
            return Err(ChildFailure::setup(
                "set controlling terminal",
                std::io::Error::last_os_error(),
            ));
        }
        // The terminal belongs to the process's user, as runc's does (its group stays the
        // devpts mount's, `gid=5` in the default config).
        let uid = nix::unistd::Uid::from_raw(plan.process.user.uid);
        // SAFETY: stdio[0] is the pty slave this child holds open for the whole call.
        let slave = unsafe { std::os::fd::BorrowedFd::borrow_raw(stdio[0]) };
        nix::unistd::fchown(slave, Some(uid), None)
            .map_err(|e| ChildFailure::setup("chown the terminal", e))?;
    }
    for (target, fd) in stdio.iter().enumerate() {
        // SAFETY: dup2 on descriptors this process owns; target is 0, 1 or 2.
        if unsafe { libc::dup2(*fd, target as i32) } < 0 {
            return Err(ChildFailure::setup(
                "dup2 stdio",
                std::io::Error::last_os_error(),
            ));
        }
    }
    close_inherited(keep);
    let process = plan.process;
    nix::unistd::chdir(plan.root.as_c_str())
        .map_err(|e| ChildFailure::setup("chdir to rootfs", e))?;
    nix::unistd::chroot(".").map_err(|e| ChildFailure::setup("chroot", e))?;
    nix::unistd::chdir("/").map_err(|e| ChildFailure::setup("chdir /", e))?;
    if let Role::Init { hostname } = plan.role {
        if let Some(h) = hostname {
            nix::unistd::sethostname(h).map_err(|e| ChildFailure::setup("sethostname", e))?;
        }
        // runc creates the init's working directory when the image lacks it (as root, before
        // the user is set); where it cannot (a read-only root), the chdir below says why.
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&process.cwd);
    }
    for r in &process.rlimits {
        let lim = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: `lim` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(rlimit_resource(r.kind), &lim) } != 0 {
            return Err(ChildFailure::setup(
                &format!("setrlimit {:?}", r.kind),
                std::io::Error::last_os_error(),
            ));
        }
    }
    let umask = process.umask.unwrap_or(DEFAULT_UMASK) & 0o777;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        umask as libc::mode_t,
    ));
    let env = env_with_home(plan)?;
    // runc's order: the bounding set while still root, the permitted set kept across the
    // change of uid, the sets themselves once the user is set.
    if let Some(c) = &process.capabilities {
        crate::caps::drop_bounding(c.bounding, plan.last_cap)
            .map_err(|e| ChildFailure::setup("drop bounding capabilities", e))?;
        crate::caps::set_keep_caps(true).map_err(|e| ChildFailure::setup("keep caps", e))?;
    }
    let u = &process.user;
    let groups: Vec<nix::unistd::Gid> = u
        .additional_gids
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| ChildFailure::setup("setgroups", e))?;
    let gid = nix::unistd::Gid::from_raw(u.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| ChildFailure::setup("setgid", e))?;
    // As runc: the working directory first as root, which may reach a directory the user
    // cannot (a 0700 home of another user); on a permission error again as the user, who may
    // reach what root cannot (a root-squashed mount).
    let cwd_err = |e| {
        ChildFailure::setup(
            &format!("chdir to cwd ({:?}) set in config.json failed", process.cwd),
            errno_reason(e),
        )
    };
    let chdir_later = match nix::unistd::chdir(process.cwd.as_str()) {
        Ok(()) => false,
        Err(nix::Error::EACCES | nix::Error::EPERM) => true,
        Err(e) => return Err(cwd_err(e)),
    };
    let uid = nix::unistd::Uid::from_raw(u.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| ChildFailure::setup("setuid", e))?;
    if chdir_later {
        nix::unistd::chdir(process.cwd.as_str()).map_err(cwd_err)?;
    }
    if let Some(c) = &process.capabilities {
        crate::caps::set_keep_caps(false).map_err(|e| ChildFailure::setup("keep caps", e))?;
        crate::caps::apply(c, plan.last_cap)
            .map_err(|e| ChildFailure::setup("set capabilities", e))?;
    }
    let name = &process.args[0];
    let path = look_path(name, &plan.path_env).map_err(|(kind, m)| ChildFailure::new(kind, m))?;
    let path_c = CString::new(path).map_err(|_| ChildFailure::setup("path", "NUL byte"))?;
    if process.no_new_privileges {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(ChildFailure::setup(
                "no_new_privs",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(ExecTarget { path: path_c, env })
}

/// Execs the target; returns only on failure, with the runc-style reason.
fn child_exec(plan: &ChildPlan<'_>, target: &ExecTarget) -> ChildFailure {
    let name = &plan.process.args[0];
    let err = nix::unistd::execve(&target.path, &plan.args, &target.env).unwrap_err();
    match err {
        nix::Error::EACCES => ChildFailure::new(
            ErrorKind::ExecPermissionDenied,
            format!("exec: {name:?}: permission denied"),
        ),
        nix::Error::ENOENT => ChildFailure::new(
            ErrorKind::ExecNotFound,
            format!("exec: {name:?}: {}", errno_reason(err)),
        ),
        e => ChildFailure::new(
            ErrorKind::ExecFailed,
            format!("exec: {name:?}: {}", errno_reason(e)),
        ),
    }
}

/// The go byte: exec.
const GO: u8 = 1;

/// Blocks until the agent writes the go byte (Some) or drops its end (None).
fn child_wait_for_go(go: &OwnedFd) -> Option<u8> {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(go, &mut byte) {
            Ok(1) => return Some(byte[0]),
            Err(nix::Error::EINTR) => continue,
            Ok(_) | Err(_) => return None,
        }
    }
}

/// The child after fork: set up, report, wait, exec. Never returns.
fn child_main(plan: &ChildPlan<'_>, stdio: [i32; 3], report: OwnedFd, go: OwnedFd) -> ! {
    let keep = [report.as_raw_fd(), go.as_raw_fd()];
    let failure = match child_setup(plan, stdio, keep, plan.process.terminal) {
        Err(f) => f,
        Ok(target) => {
            let go = match nix::unistd::write(&report, &[REPORT_READY]) {
                Ok(1) => child_wait_for_go(&go),
                _ => None,
            };
            match go {
                // The agent is gone or gave up on this process: never exec.
                // SAFETY: _exit ends the child without running the parent's
                // atexit handlers or flushing its duplicated buffers.
                None => unsafe { libc::_exit(EXIT_CANNOT_INVOKE) },
                Some(_) => child_exec(plan, &target),
            }
        }
    };
    let mut msg = vec![kind_to_byte(failure.kind)];
    msg.extend_from_slice(failure.message.as_bytes());
    msg.truncate(REPORT_LIMIT);
    let mut sent = 0;
    while sent < msg.len() {
        match nix::unistd::write(&report, &msg[sent..]) {
            Ok(n) => sent += n,
            Err(nix::Error::EINTR) => {}
            Err(_) => break,
        }
    }
    let (_, code) = byte_to_kind(msg[0]);
    // SAFETY: as above, _exit skips the parent's atexit handlers and buffers.
    unsafe { libc::_exit(code) }
}

/// How a read of the child's report ended.
enum Report {
    /// The pipe reached EOF after these bytes (possibly none).
    Eof(Vec<u8>),
    /// The child said it is ready (set-up done).
    Ready,
    /// Nothing conclusive within the timeout.
    TimedOut,
}

/// Reads the child's report until EOF, a READY byte (when `until_ready`), or
/// `timeout`, whichever comes first.
fn read_report(report: &OwnedFd, timeout: Duration, until_ready: bool) -> Report {
    let end = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(report.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => return Report::TimedOut,
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "poll on the child's report failed");
                return Report::TimedOut;
            }
        }
        match nix::unistd::read(report, &mut chunk) {
            Ok(0) => return Report::Eof(buf),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if until_ready && buf.first() == Some(&REPORT_READY) {
                    return Report::Ready;
                }
                if buf.len() >= REPORT_LIMIT {
                    buf.truncate(REPORT_LIMIT);
                    return Report::Eof(buf);
                }
            }
            Err(nix::Error::EINTR) | Err(nix::Error::EAGAIN) => {}
            Err(e) => {
                tracing::warn!(error = %e, "read of the child's report failed");
                return Report::Eof(buf);
            }
        }
        if Instant::now() >= end {
            return Report::TimedOut;
        }
    }
}

/// Kills and reaps a child that is stuck or in an unknown state.
fn kill_and_reap(child: Pid) {
    let _ = kill(child, Signal::SIGKILL);
    let _ = waitpid(child, None);
}

/// Turns a failure report (kind byte, message) of an exited child into the
/// error, reaping the child.
fn failed(child: Pid, report: &[u8]) -> SpawnError {
    let _ = waitpid(child, None);
    let (kind, code) = byte_to_kind(report[0]);
    SpawnError::Exec {
        kind,
        message: String::from_utf8_lossy(&report[1..]).into_owned(),
        code,
    }
}

/// The parent's hold on a prepared child: the go pipe's write end and the
/// report pipe's read end. Dropping it without [`Self::open`] makes the
/// child exit without exec.
#[derive(Debug)]
pub struct ExecGate {
    pid: Pid,
    go: OwnedFd,
    report: OwnedFd,
}

impl ExecGate {
    /// Lets the child exec and waits (at most [`CHILD_REPORT_TIMEOUT`]) for
    /// the outcome. On error the child has exited and is reaped. A child
    /// killed while it waited (a host signal) counts as started: its exit is
    /// reaped by the caller's SIGCHLD handling as for any process.
    pub fn open(self) -> Result<(), SpawnError> {
        if let Err(e) = nix::unistd::write(&self.go, &[GO]) {
            // EPIPE: the child is gone already; the report pipe says more.
            tracing::debug!(error = %e, "cannot write the go byte");
        }
        drop(self.go);
        match read_report(&self.report, CHILD_REPORT_TIMEOUT, false) {
            Report::Eof(r) if r.is_empty() => Ok(()),
            Report::Eof(r) => Err(failed(self.pid, &r)),
            Report::Ready | Report::TimedOut => {
                kill_and_reap(self.pid);
                Err(SpawnError::Stalled {
                    stage: "exec",
                    reason: format!("no answer within {CHILD_REPORT_TIMEOUT:?}; killed"),
                })
            }
        }
    }
}

/// A child that finished its set-up and waits to exec.
#[derive(Debug)]
pub struct Prepared {
    /// The process and the agent's ends of its stdio.
    pub process: Spawned,
    /// Lets it exec.
    pub gate: ExecGate,
}

/// Forks `process` chrooted into `root` as `role` (the container's init, or an
/// exec) and runs every set-up step in the child up to exec.
/// Returns once the child waits for [`ExecGate::open`], or with the child's
/// runc-style error (the failed child is reaped here).
pub fn prepare(
    root: &Path,
    process: &Process,
    role: Role<'_>,
    cgroup: Option<&Path>,
) -> Result<Prepared, SpawnError> {
    let plan = ChildPlan {
        process,
        role,
        cgroup_procs: cgroup
            .map(|g| cstring("cgroup path", g.join("cgroup.procs").as_os_str().as_bytes()))
            .transpose()?,
        root: cstring("rootfs path", root.as_os_str().as_bytes())?,
        env: process
            .env
            .iter()
            .map(|e| cstring("env", e.as_bytes()))
            .collect::<Result<_, _>>()?,
        args: process
            .args
            .iter()
            .map(|a| cstring("arg", a.as_bytes()))
            .collect::<Result<_, _>>()?,
        path_env: process
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_owned(),
        last_cap: crate::caps::last_cap(),
    };
    // (parent's fds, child's fds [stdin, stdout, stderr])
    let (stdin, stdout, stderr, child_fds): (OwnedFd, OwnedFd, Option<OwnedFd>, Vec<OwnedFd>) =
        if process.terminal {
            let (master, slave) = open_pty(root)?;
            let master2 = master
                .try_clone()
                .map_err(|e| SpawnError::Setup(format!("dup: {e}")))?;
            (master, master2, None, vec![slave])
        } else {
            let (in_r, in_w) = pipe2(OFlag::O_CLOEXEC).map_err(setup_err("pipe"))?;
            let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(setup_err("pipe"))?;
            let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(setup_err("pipe"))?;
            (in_w, out_r, Some(err_r), vec![in_r, out_w, err_w])
        };
    let stdio_raw: [i32; 3] = if process.terminal {
        let s = child_fds[0].as_raw_fd();
        [s, s, s]
    } else {
        [
            child_fds[0].as_raw_fd(),
            child_fds[1].as_raw_fd(),
            child_fds[2].as_raw_fd(),
        ]
    };
    let (report_r, report_w) = pipe2(OFlag::O_CLOEXEC).map_err(setup_err("pipe"))?;
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).map_err(setup_err("pipe"))?;
    // SAFETY: the agent is single-threaded, so the child can run ordinary
    // code (allocate, format) until it execs or exits.
    match unsafe { fork() }.map_err(setup_err("fork"))? {
        ForkResult::Child => {
            // Without the parent's ends, EOF on `go_r` means the agent let go.
            drop(go_w);
            drop(report_r);
            child_main(&plan, stdio_raw, report_w, go_r)
        }
        ForkResult::Parent { child } => {
            drop(child_fds);
            drop(report_w);
            drop(go_r);
            match read_report(&report_r, CHILD_REPORT_TIMEOUT, true) {
                Report::Ready => Ok(Prepared {
                    process: Spawned {
                        pid: child,
                        stdin,
                        stdout,
                        stderr,
                        terminal: process.terminal,
                    },
                    gate: ExecGate {
                        pid: child,
                        go: go_w,
                        report: report_r,
                    },
                }),
                Report::Eof(r) if !r.is_empty() => Err(failed(child, &r)),
                Report::Eof(_) => {
                    let status = waitpid(child, None);
                    Err(SpawnError::Stalled {
                        stage: "set-up",
                        reason: format!("the child ended without a report ({status:?})"),
                    })
                }
                Report::TimedOut => {
                    kill_and_reap(child);
                    Err(SpawnError::Stalled {
                        stage: "set-up",
                        reason: format!("no answer within {CHILD_REPORT_TIMEOUT:?}; killed"),
                    })
                }
            }
        }
    }
}

/// Starts `process` chrooted into `root` at once: [`prepare`] then
/// [`ExecGate::open`]. Returns once the exec succeeded or the child reported
/// why it failed (the failed child is reaped here).
pub fn spawn(root: &Path, process: &Process, role: Role<'_>) -> Result<Spawned, SpawnError> {
    let Prepared { process, gate } = prepare(root, process, role, None)?;
    gate.open()?;
    Ok(process)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_pipe() -> (OwnedFd, OwnedFd) {
        pipe2(OFlag::O_CLOEXEC).unwrap()
    }

    #[test]
    fn test_read_report_ready_byte_returns_while_writer_open() {
        let (r, w) = report_pipe();
        nix::unistd::write(&w, &[REPORT_READY]).unwrap();
        assert!(matches!(
            read_report(&r, Duration::from_secs(5), true),
            Report::Ready
        ));
    }

    #[test]
    fn test_read_report_failure_read_to_eof() {
        let (r, w) = report_pipe();
        nix::unistd::write(&w, b"\x01exec: \"x\": not found").unwrap();
        drop(w);
        match read_report(&r, Duration::from_secs(5), true) {
            Report::Eof(b) => assert_eq!(b, b"\x01exec: \"x\": not found"),
            _ => panic!("expected Eof"),
        }
    }

    #[test]
    fn test_read_report_silent_child_times_out() {
        let (r, _w) = report_pipe();
        let t = Instant::now();
        assert!(matches!(
            read_report(&r, Duration::from_millis(50), false),
            Report::TimedOut
        ));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn test_read_report_eof_without_bytes_is_exec_success() {
        let (r, w) = report_pipe();
        drop(w);
        assert!(matches!(
            read_report(&r, Duration::from_secs(5), false),
            Report::Eof(b) if b.is_empty()
        ));
    }
}
