//! Starting the container process in two steps, as runc's `create` and
//! `start`: [`prepare`] forks and sets the child up, [`ExecGate::open`] lets
//! it exec.
//!
//! ```text
//!  agent (parent)                       child ([`child`])
//!   prepare: fork (init: into a new --> set-up: cgroup, mounts (init),
//!   PID namespace; exec: into the        setsid, stdio, chroot, hostname
//!   init's)                              (init), rlimits, umask, HOME,
//!                                        seccomp (no NNP), bounding caps,
//!                                        user, cwd, capset + ambient,
//!                                        PATH lookup, no_new_privs
//!   <-- report: READY ---------------    (or: kind byte + message, _exit)
//!   ... Created ...                      blocked reading the go pipe
//!   open: write go byte ------------->  seccomp (NNP), execve
//!   <-- report: EOF (exec succeeded) -   (or: kind byte + message, _exit)
//! ```
//!
//! One code path serves the container's init (`Create`/`Run`, with its
//! hostname and mounts) and the processes `Exec` runs in it.
//!
//! **PID namespace.** As with runc, the container's init is pid 1 of a PID
//! namespace of its own: the agent `unshare`s `CLONE_NEWPID` (which only
//! changes where its next child goes), forks, and `setns`es back to its own
//! namespace at once. An exec `setns`es into the init's namespace the same
//! way around its fork. The agent stays the parent of every process it starts
//! (it reaps them, with their pids in its own namespace); when the init
//! exits, the kernel kills whatever else runs in the namespace. Where no
//! namespace can be made (a kernel without `CONFIG_PID_NS`, no privilege) the
//! process starts in the agent's, with a warning.
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
use std::path::Path;
use std::time::{Duration, Instant};

use agent_protocol::{ErrorKind, Process, SeccompProgram};
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use thiserror::Error;

mod child;

use child::{CgroupJoin, ChildPlan, GO, byte_to_kind, child_main};

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
fn open_pty(root: &Path, size: Option<(u16, u16)>) -> Result<(OwnedFd, OwnedFd), SpawnError> {
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
    let (rows, cols) = size.unwrap_or((24, 80));
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives across the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    Ok((master, slave))
}

/// The container's mounts, made by its init before it chroots (in the
/// container's PID namespace, so that a proc mount shows that namespace).
/// Returns the error's text.
#[derive(Clone, Copy)]
pub struct InitMounts<'a>(pub &'a dyn Fn() -> Result<(), String>);

impl std::fmt::Debug for InitMounts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InitMounts(..)")
    }
}

/// Which process of the container is started: its init, or one more (`Exec`).
#[derive(Debug, Clone, Copy)]
pub enum Role<'a> {
    /// The container's init, pid 1 of a new PID namespace: makes the mounts,
    /// sets the hostname (when given) and, as runc's `prepareRootfs` does,
    /// creates a missing working directory.
    Init {
        /// The container's hostname.
        hostname: Option<&'a str>,
        /// The container's mounts.
        mounts: Option<InitMounts<'a>>,
    },
    /// Another process in the running container.
    Exec {
        /// The container's init, whose PID namespace the process joins
        /// (`None`: the agent's).
        init: Option<Pid>,
    },
}

/// What [`prepare`] starts, besides the process itself.
#[derive(Debug, Clone, Copy)]
pub struct Setup<'a> {
    /// The container's root directory (chroot target).
    pub root: &'a Path,
    /// The container's init, or an exec.
    pub role: Role<'a>,
    /// The group (its directory) the child joins itself, on a real cgroup2
    /// mount.
    pub cgroup: Option<&'a Path>,
    /// Where the child goes when `cgroup` refuses it with `EBUSY`.
    pub cgroup_fallback: Option<&'a Path>,
    /// The container's seccomp filter.
    pub seccomp: Option<&'a SeccompProgram>,
}

impl<'a> Setup<'a> {
    /// A process in `root` as `role`, with no cgroup and no seccomp filter.
    pub fn new(root: &'a Path, role: Role<'a>) -> Self {
        Self {
            root,
            role,
            cgroup: None,
            cgroup_fallback: None,
            seccomp: None,
        }
    }
}

/// The PID namespace the next fork goes to.
enum PidNs {
    /// The agent's own.
    Agent,
    /// A new one: the child is its pid 1.
    New,
    /// An existing one (a pidfd of the init).
    Join(OwnedFd),
}

fn open_ns(path: &str) -> nix::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
}

/// A pidfd of `pid` (a pid of the agent's namespace, whatever `/proc` shows): `setns` takes
/// it for the process's namespaces (Linux 5.8).
fn pidfd_open(pid: Pid) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: the call returned a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Forks into `ns`. The namespace only changes where the agent's next child
/// goes (`pid_for_children`); it is set back to the agent's own right after
/// the fork, in the parent.
///
/// # Safety
/// As [`fork`]: the caller is single-threaded.
unsafe fn fork_in(ns: PidNs) -> Result<ForkResult, SpawnError> {
    let own = match ns {
        PidNs::Agent => None,
        _ => Some(
            open_ns("/proc/self/ns/pid").map_err(setup_err("open the agent's PID namespace"))?,
        ),
    };
    match &ns {
        PidNs::Agent => {}
        PidNs::New => {
            if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWPID) {
                tracing::warn!(error = %e, "cannot make a PID namespace; the process shares the agent's");
            }
        }
        PidNs::Join(fd) => nix::sched::setns(fd, CloneFlags::CLONE_NEWPID)
            .map_err(setup_err("join the container's PID namespace"))?,
    }
    // SAFETY: the caller is single-threaded (this function's contract).
    let forked = unsafe { fork() };
    if !matches!(forked, Ok(ForkResult::Child))
        && let Some(own) = own
        && let Err(e) = nix::sched::setns(&own, CloneFlags::CLONE_NEWPID)
    {
        // Never expected (the namespace one is in may always be entered again); later
        // children would start in the container's namespace.
        tracing::error!(error = %e, "cannot return to the agent's PID namespace");
    }
    forked.map_err(setup_err("fork"))
}

/// Clears `ONLCR` on a terminal: output keeps `\n` as it is.
fn clear_onlcr(tty: &OwnedFd) -> Result<(), SpawnError> {
    use nix::sys::termios::{OutputFlags, SetArg, tcgetattr, tcsetattr};
    let mut t = tcgetattr(tty).map_err(setup_err("tcgetattr"))?;
    t.output_flags.remove(OutputFlags::ONLCR);
    tcsetattr(tty, SetArg::TCSANOW, &t).map_err(setup_err("tcsetattr"))
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
pub fn prepare(setup: &Setup<'_>, process: &Process) -> Result<Prepared, SpawnError> {
    let root = setup.root;
    let procs = |g: &Path| cstring("cgroup path", g.join("cgroup.procs").as_os_str().as_bytes());
    // An exec joins the init's namespaces: a gone init leaves none, the exec cannot run.
    let init_fd = match setup.role {
        Role::Exec { init: Some(pid) } => {
            Some(pidfd_open(pid).map_err(setup_err("open the container's PID namespace"))?)
        }
        _ => None,
    };
    let cgroup = match setup.cgroup {
        Some(g) => Some(CgroupJoin {
            procs: procs(g)?,
            fallback: setup.cgroup_fallback.map(procs).transpose()?,
            ns_of: init_fd.as_ref().map(|f| f.as_raw_fd()),
        }),
        None => None,
    };
    let ns = match (setup.role, &init_fd) {
        (Role::Init { .. }, _) => PidNs::New,
        (Role::Exec { .. }, Some(fd)) => PidNs::Join(
            fd.try_clone()
                .map_err(|e| SpawnError::Setup(format!("dup: {e}")))?,
        ),
        (Role::Exec { .. }, None) => PidNs::Agent,
    };
    let plan = ChildPlan {
        process,
        role: setup.role,
        cgroup,
        seccomp: setup.seccomp,
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
            let (master, slave) = open_pty(root, process.console_size)?;
            if process.clear_onlcr {
                clear_onlcr(&slave)?;
            }
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
    match unsafe { fork_in(ns) }? {
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
pub fn spawn(setup: &Setup<'_>, process: &Process) -> Result<Spawned, SpawnError> {
    let Prepared { process, gate } = prepare(setup, process)?;
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
