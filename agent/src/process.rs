//! Starting the container process: fork, set it up in the child, exec.
//!
//! The agent is single-threaded, so the child may allocate between `fork` and
//! `exec`. Failures in the child are reported to the parent through a
//! close-on-exec pipe (a kind byte, then a message); EOF on the pipe means the
//! exec succeeded. Messages and exit codes follow runc: 127 for a command that
//! is not found, 126 for one that cannot be invoked.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use agent_protocol::{ErrorKind, RlimitKind, RunRequest};
use nix::fcntl::OFlag;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use thiserror::Error;

use crate::exit_status::{EXIT_CANNOT_INVOKE, EXIT_NOT_FOUND};

/// `PATH` used when the process environment has none (runc's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors of starting a process.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// Parent-side setup (pipes, pty, fork) failed.
    #[error("cannot start process: {0}")]
    Setup(String),
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

/// Finds `name` the way runc (Go's `exec.LookPath`) does and returns the path
/// to exec, or the runc-style error.
pub fn look_path(name: &str, path_env: &str) -> Result<String, (ErrorKind, String)> {
    if name.contains('/') {
        return match std::fs::metadata(name) {
            Ok(_) => Ok(name.to_owned()),
            Err(e) => Err((
                ErrorKind::ExecNotFound,
                format!("exec: {name:?}: stat {name}: {}", io_reason(&e)),
            )),
        };
    }
    for dir in path_env.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = format!("{dir}/{name}");
        if let Ok(meta) = std::fs::metadata(&candidate)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return Ok(candidate);
        }
    }
    Err((
        ErrorKind::ExecNotFound,
        format!("exec: {name:?}: executable file not found in $PATH"),
    ))
}

/// Go-style lower-case reason ("no such file or directory").
fn io_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::Error::from_raw(n).desc().to_lowercase(),
        None => e.to_string(),
    }
}

fn errno_reason(e: nix::Error) -> String {
    e.desc().to_lowercase()
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

/// Everything the child needs, prepared before fork.
struct ChildPlan<'a> {
    req: &'a RunRequest,
    root: CString,
    env: Vec<CString>,
    args: Vec<CString>,
    path_env: String,
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

fn child_setup(plan: &ChildPlan<'_>, stdio: [i32; 3], terminal: bool) -> Result<(), ChildFailure> {
    reset_signals();
    nix::unistd::setsid().map_err(|e| ChildFailure::setup("setsid", e))?;
    if terminal {
        // SAFETY: TIOCSCTTY takes an integer argument; stdio[0] is the pty slave.
        if unsafe { libc::ioctl(stdio[0], libc::TIOCSCTTY, 0) } != 0 {
            return Err(ChildFailure::setup(
                "set controlling terminal",
                std::io::Error::last_os_error(),
            ));
        }
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
    let req = plan.req;
    nix::unistd::chdir(plan.root.as_c_str())
        .map_err(|e| ChildFailure::setup("chdir to rootfs", e))?;
    nix::unistd::chroot(".").map_err(|e| ChildFailure::setup("chroot", e))?;
    nix::unistd::chdir("/").map_err(|e| ChildFailure::setup("chdir /", e))?;
    if let Some(h) = &req.hostname {
        nix::unistd::sethostname(h).map_err(|e| ChildFailure::setup("sethostname", e))?;
    }
    for r in &req.rlimits {
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
    let u = &req.user;
    let groups: Vec<nix::unistd::Gid> = u
        .additional_gids
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| ChildFailure::setup("setgroups", e))?;
    let gid = nix::unistd::Gid::from_raw(u.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| ChildFailure::setup("setgid", e))?;
    let uid = nix::unistd::Uid::from_raw(u.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| ChildFailure::setup("setuid", e))?;
    nix::unistd::chdir(req.cwd.as_str()).map_err(|e| {
        ChildFailure::setup(
            &format!("chdir to cwd ({:?}) set in config.json failed", req.cwd),
            errno_reason(e),
        )
    })?;
    let name = &req.args[0];
    let path = look_path(name, &plan.path_env).map_err(|(kind, m)| ChildFailure::new(kind, m))?;
    let path_c = CString::new(path).map_err(|_| ChildFailure::setup("path", "NUL byte"))?;
    if req.no_new_privileges {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(ChildFailure::setup(
                "no_new_privs",
                std::io::Error::last_os_error(),
            ));
        }
    }
    let err = nix::unistd::execve(&path_c, &plan.args, &plan.env).unwrap_err();
    Err(match err {
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
    })
}

/// Starts `req` chrooted into `root`. Returns once the exec succeeded or the
/// child reported why it failed (the failed child is reaped here).
pub fn spawn(root: &Path, req: &RunRequest) -> Result<Spawned, SpawnError> {
    let plan = ChildPlan {
        req,
        root: cstring("rootfs path", root.as_os_str().as_bytes())?,
        env: req
            .env
            .iter()
            .map(|e| cstring("env", e.as_bytes()))
            .collect::<Result<_, _>>()?,
        args: req
            .args
            .iter()
            .map(|a| cstring("arg", a.as_bytes()))
            .collect::<Result<_, _>>()?,
        path_env: req
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_owned(),
    };
    // (parent's fds, child's fds [stdin, stdout, stderr])
    let (stdin, stdout, stderr, child_fds): (OwnedFd, OwnedFd, Option<OwnedFd>, Vec<OwnedFd>) =
        if req.terminal {
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
    let stdio_raw: [i32; 3] = if req.terminal {
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
    // SAFETY: the agent is single-threaded, so the child can run ordinary
    // code (allocate, format) until it execs or exits.
    match unsafe { fork() }.map_err(setup_err("fork"))? {
        ForkResult::Child => {
            let failure = match child_setup(&plan, stdio_raw, req.terminal) {
                Ok(()) => ChildFailure::setup("exec", "returned"),
                Err(f) => f,
            };
            let mut msg = vec![kind_to_byte(failure.kind)];
            msg.extend_from_slice(failure.message.as_bytes());
            let mut w = std::fs::File::from(report_w);
            let _ = w.write_all(&msg);
            let (_, code) = byte_to_kind(msg[0]);
            // SAFETY: _exit ends the child without running the parent's
            // atexit handlers or flushing its duplicated buffers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(child_fds);
            drop(report_w);
            let mut report = Vec::new();
            let _ = std::fs::File::from(report_r)
                .take(64 * 1024)
                .read_to_end(&mut report);
            if report.is_empty() {
                return Ok(Spawned {
                    pid: child,
                    stdin,
                    stdout,
                    stderr,
                    terminal: req.terminal,
                });
            }
            let _ = waitpid(child, None);
            let (kind, code) = byte_to_kind(report[0]);
            let message = String::from_utf8_lossy(&report[1..]).into_owned();
            Err(SpawnError::Exec {
                kind,
                message,
                code,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_look_path_missing_command_runc_message() {
        let err = look_path("definitely-not-a-command", "/nonexistent-dir").unwrap_err();
        assert_eq!(err.0, ErrorKind::ExecNotFound);
        assert_eq!(
            err.1,
            "exec: \"definitely-not-a-command\": executable file not found in $PATH"
        );
    }

    #[test]
    fn test_look_path_missing_absolute_path_stat_message() {
        let err = look_path("/nonexistent/x", DEFAULT_PATH).unwrap_err();
        assert_eq!(
            err.1,
            "exec: \"/nonexistent/x\": stat /nonexistent/x: no such file or directory"
        );
    }

    #[test]
    fn test_look_path_finds_executable_in_path() {
        assert_eq!(look_path("sh", "/nonexistent:/bin").unwrap(), "/bin/sh");
    }

    #[test]
    fn test_look_path_non_executable_file_skipped() {
        // /etc/passwd exists but is not executable.
        assert!(look_path("passwd", "/etc").is_err());
    }
}
