//! The child's side of starting a process: everything between `fork` and
//! `execve`, in runc's order, reported to the parent through the report
//! pipe (see the module above for the exchange).
//!
//! ```text
//!  join cgroup (+ cgroup ns) -> init only: the container's mounts (in its
//!  new PID namespace, so /proc is the container's) -> setsid, terminal,
//!  stdio -> chroot -> hostname, cwd made (init) -> rlimits, umask, HOME ->
//!  seccomp (without no_new_privs: while still privileged) -> bounding caps,
//!  user, cwd, capabilities -> PATH lookup -> no_new_privs -> READY, wait for
//!  go -> seccomp (with no_new_privs: last) -> execve
//! ```

use nix::fcntl::OFlag;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use agent_protocol::{ErrorKind, Process, RlimitKind, SeccompProgram};

use super::{DEFAULT_UMASK, REPORT_LIMIT, REPORT_READY, Role};
use crate::exit_status::{EXIT_CANNOT_INVOKE, EXIT_NOT_FOUND};
use crate::lookup::{errno_reason, look_path};
use crate::passwd::home_dir;

/// A failure inside the child, sent to the parent.
#[derive(Debug)]
pub(super) struct ChildFailure {
    pub(super) kind: ErrorKind,
    pub(super) message: String,
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

pub(super) fn kind_to_byte(k: ErrorKind) -> u8 {
    match k {
        ErrorKind::ExecNotFound => 1,
        ErrorKind::ExecPermissionDenied => 2,
        ErrorKind::Rootfs => 4,
        ErrorKind::Cgroup => 5,
        _ => 3,
    }
}

pub(super) fn byte_to_kind(b: u8) -> (ErrorKind, i32) {
    match b {
        1 => (ErrorKind::ExecNotFound, EXIT_NOT_FOUND),
        2 => (ErrorKind::ExecPermissionDenied, EXIT_CANNOT_INVOKE),
        4 => (ErrorKind::Rootfs, EXIT_CANNOT_INVOKE),
        5 => (ErrorKind::Cgroup, EXIT_CANNOT_INVOKE),
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

/// Everything the child needs, prepared before fork.
pub(super) struct ChildPlan<'a> {
    pub(super) process: &'a Process,
    pub(super) role: Role<'a>,
    /// The group to join: the child moves itself in and enters a cgroup namespace of its own
    /// there before anything else (while it still has the privileges for both).
    pub(super) cgroup: Option<CgroupJoin>,
    pub(super) root: CString,
    pub(super) env: Vec<CString>,
    pub(super) args: Vec<CString>,
    pub(super) path_env: String,
    /// The kernel's highest capability number (read before the fork).
    pub(super) last_cap: u32,
    /// The container's seccomp filter, if it has one.
    pub(super) seccomp: Option<&'a SeccompProgram>,
}

/// Where the child puts itself (the `cgroup.procs` files, prepared before fork).
pub(super) struct CgroupJoin {
    /// The group to join.
    pub(super) procs: CString,
    /// Where to go instead when `procs` refuses with `EBUSY` (runc's fallback for an exec
    /// without `--cgroup`: the container's group has domain controllers on and processes in
    /// sub-groups, so only the init's group takes more).
    pub(super) fallback: Option<CString>,
    /// An exec joins the init's cgroup namespace (a pidfd of the init), which is rooted at the
    /// container's group whatever sub-group the exec is in; the init makes a new one.
    pub(super) ns_of: Option<std::os::fd::RawFd>,
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

/// Writes "0" (the writer itself, whatever its PID namespace) to `procs`.
fn enter_group(procs: &std::ffi::CStr) -> Result<(), nix::Error> {
    let fd = nix::fcntl::open(
        procs,
        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::write(&fd, b"0").map(|_| ())
}

/// Moves the calling child into its group (or the fallback, on `EBUSY`), then into a cgroup
/// namespace of its own rooted there: the container sees its group as `/` (`/proc/self/cgroup`
/// reads `0::/`, as with runc's cgroup namespace on a cgroup v2 host). Errors read as runc's
/// (`adding pid N to cgroups: ...: no such file or directory`).
fn join_cgroup(join: &CgroupJoin) -> Result<(), ChildFailure> {
    let fail = |procs: &std::ffi::CStr, e: nix::Error| {
        ChildFailure::new(
            ErrorKind::Cgroup,
            format!(
                "adding pid {} to cgroups: open {}: {}",
                nix::unistd::getpid(),
                procs.to_string_lossy(),
                errno_reason(e)
            ),
        )
    };
    match enter_group(&join.procs) {
        Ok(()) => {}
        Err(nix::Error::EBUSY) if join.fallback.is_some() => {
            let fb = join.fallback.as_deref().unwrap_or(&join.procs);
            enter_group(fb).map_err(|e| fail(fb, e))?;
        }
        Err(e) => return Err(fail(&join.procs, e)),
    }
    match join.ns_of {
        Some(fd) => {
            // SAFETY: the parent keeps the pidfd open until the child has reported.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWCGROUP)
                .map_err(|e| ChildFailure::setup("join the container's cgroup namespace", e))
        }
        None => nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| ChildFailure::setup("create the cgroup namespace", e)),
    }
}

/// Installs the container's seccomp filter, as runc's error says it.
fn install_seccomp(plan: &ChildPlan<'_>) -> Result<(), ChildFailure> {
    match plan.seccomp {
        Some(p) => crate::seccomp::install(p)
            .map_err(|e| ChildFailure::setup("error loading seccomp filter into kernel", e)),
        None => Ok(()),
    }
}

/// Every set-up step of the child, in order; returns what to exec.
fn child_setup(
    plan: &ChildPlan<'_>,
    stdio: [i32; 3],
    keep: [i32; 2],
    terminal: bool,
) -> Result<ExecTarget, ChildFailure> {
    reset_signals();
    if let Some(join) = &plan.cgroup {
        join_cgroup(join)?;
    }
    // The init makes the container's mounts itself: it is pid 1 of the container's PID
    // namespace, so the proc mounts show that namespace, as with runc.
    if let Role::Init {
        mounts: Some(mounts),
        ..
    } = plan.role
    {
        (mounts.0)().map_err(|m| ChildFailure::new(ErrorKind::Rootfs, m))?;
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
    if let Role::Init { hostname, .. } = plan.role {
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
    // runc: without no_new_privs the filter goes in while the process still has
    // CAP_SYS_ADMIN (before any capability is dropped); with it, as late as possible.
    if !process.no_new_privileges {
        install_seccomp(plan)?;
    }
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
pub(super) const GO: u8 = 1;

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

/// While it waits for the go byte, a signal that would end a process ends the child as if
/// by that signal's default (status 128+N), although it is pid 1 of its namespace, which the
/// kernel shields from every signal without a handler. `execve` puts the defaults back.
fn die_on_signals_while_waiting() {
    extern "C" fn die(sig: libc::c_int) {
        // SAFETY: _exit is async-signal-safe and ends the process at once.
        unsafe { libc::_exit(128 + sig) }
    }
    let act = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(die),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    for sig in nix::sys::signal::Signal::iterator() {
        use nix::sys::signal::Signal::*;
        if matches!(
            sig,
            SIGKILL | SIGSTOP | SIGCHLD | SIGCONT | SIGURG | SIGWINCH | SIGTSTP | SIGTTIN | SIGTTOU
        ) {
            continue;
        }
        // SAFETY: the handler only calls _exit, which is async-signal-safe.
        let _ = unsafe { nix::sys::signal::sigaction(sig, &act) };
    }
}

/// The child after fork: set up, report, wait, exec. Never returns.
pub(super) fn child_main(plan: &ChildPlan<'_>, stdio: [i32; 3], report: OwnedFd, go: OwnedFd) -> ! {
    let keep = [report.as_raw_fd(), go.as_raw_fd()];
    let failure = match child_setup(plan, stdio, keep, plan.process.terminal) {
        Err(f) => f,
        Ok(target) => {
            die_on_signals_while_waiting();
            let go = match nix::unistd::write(&report, &[REPORT_READY]) {
                Ok(1) => child_wait_for_go(&go),
                _ => None,
            };
            match go {
                // The agent is gone or gave up on this process: never exec.
                // SAFETY: _exit ends the child without running the parent's
                // atexit handlers or flushing its duplicated buffers.
                None => unsafe { libc::_exit(EXIT_CANNOT_INVOKE) },
                Some(_) => match plan.process.no_new_privileges {
                    true => match install_seccomp(plan) {
                        Ok(()) => child_exec(plan, &target),
                        Err(f) => f,
                    },
                    false => child_exec(plan, &target),
                },
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
