//! The agent's one loop: bind, signal READY, then serve every connection at
//! once around a single poll(2).
//!
//! The loop owns the listener, the SIGCHLD signalfd and every session
//! (at most [`MAX_CONNECTIONS`]; one more is answered with an `Error` and
//! closed). It never blocks on a peer: connections are non-blocking and each
//! session queues what it sends (see [`crate::session`]). It stays
//! single-threaded, which is what makes the child's set-up between fork and
//! exec (it allocates) safe.
//!
//! Reaping is central ([`reap`]): each exited child is looked at before it is
//! reaped (`waitid(P_ALL, WNOWAIT)`), its status goes to the session whose
//! process it is and to the container registry (an init's exit kills the
//! execs; the rootfs goes once every process is gone), then `waitpid` reaps
//! it. Anything else is an orphan PID 1 adopted: reaped and forgotten. Since
//! the bookkeeping runs before the reap, a process is never seen gone while
//! its container's mounts are still there.

use std::os::fd::AsFd;
use std::time::Instant;

use agent_protocol::{AgentMessage, ErrorKind, encode_message};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use thiserror::Error;

use crate::cgroup::Cgroups;
use crate::config::{AgentConfig, Mode};
use crate::container::Role;
use crate::exit_status::exit_code;
use crate::ready::signal_ready;
use crate::restore::{DryRunRestoreOps, KernelRestoreOps, RestoreOps};
use crate::session::{Session, SessionContext, Slot};
use crate::transport::{Conn, ListenError, Listener};

/// Most connections served at once; one more is answered with
/// `Error{Internal, ..}` and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// Errors that stop the agent.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Listening failed.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Blocking SIGCHLD or creating the signalfd failed.
    #[error("cannot set up SIGCHLD handling: {0}")]
    Signals(nix::Error),
    /// Creating the state directory failed.
    #[error("cannot create state directory {0}: {1}")]
    StateDir(String, std::io::Error),
    /// `poll` failed.
    #[error("poll failed: {0}")]
    Poll(nix::Error),
}

/// Runs the agent until a fatal error.
pub fn run(config: &AgentConfig) -> Result<(), ServerError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(ServerError::Signals)?;
    let sigchld = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(ServerError::Signals)?;
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| ServerError::StateDir(config.state_dir.display().to_string(), e))?;

    // Before READY: every clone of a template starts with the tree ready.
    let cgroups = match &config.cgroup_root {
        None => Err("no cgroup root configured (--cgroup-root)".to_owned()),
        Some(root) => Cgroups::setup(root, config.mode == Mode::Vm).map_err(|e| {
            tracing::warn!(error = %e, "cgroups unavailable; containers run without limits");
            e.to_string()
        }),
    };
    let listener = Listener::bind(&config.listen)?;
    tracing::info!(listen = ?config.listen, mode = ?config.mode, "agent listening");
    if let Err(e) = signal_ready(config.mode) {
        tracing::error!(error = %e, "cannot signal READY");
    }
    match config.mode {
        Mode::Vm => serve_forever(
            &listener,
            SessionContext::new(&mut KernelRestoreOps, &config.state_dir, cgroups),
            &sigchld,
        ),
        Mode::Harness => serve_forever(
            &listener,
            SessionContext::new(&mut DryRunRestoreOps::default(), &config.state_dir, cgroups),
            &sigchld,
        ),
    }
}

/// What a polled descriptor belongs to.
#[derive(Debug, Clone, Copy)]
enum Tag {
    Listener,
    Sigchld,
    Session(usize, Slot),
}

/// Reaps every exited child: status to its session and its container first,
/// then the reap itself.
fn reap<R: RestoreOps>(sessions: &mut [Session], ctx: &mut SessionContext<'_, R>) {
    let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    loop {
        let status = match waitid(Id::All, peek) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(s) => s,
        };
        let Some(pid) = status.pid() else { return };
        if let Some(code) = exit_code(status) {
            let session = sessions.iter_mut().find(|s| s.live_pid() == Some(pid));
            let had_session = session.is_some();
            if let Some(s) = session {
                let _g = s.span().clone().entered();
                s.process_exited(code);
            }
            let role = ctx.containers.process_exited(pid);
            if role == Role::Unknown && !had_session {
                tracing::debug!(pid = pid.as_raw(), code, "reaped orphan");
            } else {
                tracing::debug!(pid = pid.as_raw(), code, ?role, "reaped");
            }
        }
        if let Err(e) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            tracing::warn!(pid = pid.as_raw(), error = %e, "waitpid after waitid failed");
            return;
        }
    }
}

/// Answers a connection over the cap and drops it (best effort: a fresh
/// socket takes a small frame without blocking).
fn refuse(conn: Conn) {
    tracing::warn!("{MAX_CONNECTIONS} connections already; refusing one more");
    let msg = AgentMessage::Error {
        kind: ErrorKind::Internal,
        message: format!("the agent serves at most {MAX_CONNECTIONS} connections at once"),
    };
    if let Ok(frame) = encode_message(&msg) {
        let _ = nix::unistd::write(conn.as_fd(), &frame);
    }
}

fn accept_all(listener: &Listener, sessions: &mut Vec<Session>, counter: &mut u64) {
    loop {
        match listener.accept() {
            Ok(Some(conn)) if sessions.len() >= MAX_CONNECTIONS => refuse(conn),
            Ok(Some(conn)) => {
                *counter += 1;
                let s = Session::new(conn, *counter);
                s.span().in_scope(|| tracing::info!("host connected"));
                sessions.push(s);
            }
            Ok(None) => return,
            Err(e) => {
                // EMFILE and the like: try again on the next turn.
                tracing::warn!(error = %e, "accept failed");
                return;
            }
        }
    }
}

fn serve_forever<R: RestoreOps>(
    listener: &Listener,
    mut ctx: SessionContext<'_, R>,
    sigchld: &SignalFd,
) -> Result<(), ServerError> {
    let mut sessions: Vec<Session> = Vec::new();
    let mut counter = 0u64;
    loop {
        let deadline = sessions.iter().filter_map(Session::deadline).min();
        let events = {
            let mut fds = Vec::with_capacity(2 + 4 * sessions.len());
            let mut tags = Vec::with_capacity(fds.capacity());
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            tags.push(Tag::Listener);
            fds.push(PollFd::new(sigchld.as_fd(), PollFlags::POLLIN));
            tags.push(Tag::Sigchld);
            let mut session_tags = Vec::new();
            for (i, s) in sessions.iter().enumerate() {
                session_tags.clear();
                s.register(i, &mut fds, &mut session_tags);
                tags.extend(session_tags.iter().map(|&(i, slot)| Tag::Session(i, slot)));
            }
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so a deadline is not polled for in a busy loop.
                    let ms = left.as_nanos().div_ceil(1_000_000);
                    PollTimeout::from(ms.min(u128::from(u16::MAX)) as u16)
                }
            };
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(ServerError::Poll(e)),
            }
            fds.iter()
                .zip(tags)
                .filter_map(|(fd, tag)| {
                    let ev = fd.revents().unwrap_or(PollFlags::empty());
                    (!ev.is_empty()).then_some((tag, ev))
                })
                .collect::<Vec<_>>()
        };
        // Exits first, so output read in the same turn precedes `Exited`
        // only if it was there; then the sessions' events, then new hosts.
        let mut accept = false;
        for &(tag, _) in &events {
            match tag {
                Tag::Sigchld => {
                    while let Ok(Some(_)) = sigchld.read_signal() {}
                    reap(&mut sessions, &mut ctx);
                }
                Tag::Listener => accept = true,
                Tag::Session(..) => {}
            }
        }
        for (tag, ev) in events {
            if let Tag::Session(i, slot) = tag {
                let s = &mut sessions[i];
                let _g = s.span().clone().entered();
                s.on_event(slot, ev, &mut ctx);
            }
        }
        let now = Instant::now();
        for s in &mut sessions {
            let _g = s.span().clone().entered();
            s.tick(now, &mut ctx);
        }
        sessions.retain(|s| match s.finished() {
            Some(end) => {
                s.span().in_scope(|| tracing::info!(?end, "session ended"));
                false
            }
            None => true,
        });
        if accept {
            accept_all(listener, &mut sessions, &mut counter);
        }
    }
}
