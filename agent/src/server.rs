//! The accept loop: bind, signal READY, serve connections one at a time.

use std::path::Path;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use thiserror::Error;

use crate::config::{AgentConfig, Mode};
use crate::ready::signal_ready;
use crate::restore::{DryRunRestoreOps, KernelRestoreOps, RestoreOps};
use crate::session::{Session, SessionContext};
use crate::transport::{ListenError, Listener};

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
    /// `accept` failed.
    #[error("accept failed: {0}")]
    Accept(std::io::Error),
}

/// Reaps every exited child (PID 1 adopts orphans).
fn reap_orphans() {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
        tracing::debug!(?status, "reaped orphan");
    }
}

/// Blocks until the listener is readable, reaping children on SIGCHLD.
fn wait_for_connection(listener: &Listener, sigchld: &SignalFd) -> Result<(), ServerError> {
    use std::os::fd::AsFd;

    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigchld.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(ServerError::Accept(e.into())),
        }
        let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
        let (conn, child) = (ready(0), ready(1));
        if child {
            while let Ok(Some(_)) = sigchld.read_signal() {}
            reap_orphans();
        }
        if conn {
            return Ok(());
        }
    }
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

    let listener = Listener::bind(&config.listen)?;
    tracing::info!(listen = ?config.listen, mode = ?config.mode, "agent listening");
    if let Err(e) = signal_ready(config.mode) {
        tracing::error!(error = %e, "cannot signal READY");
    }
    match config.mode {
        Mode::Vm => serve_forever(
            &listener,
            &mut KernelRestoreOps,
            &config.state_dir,
            &sigchld,
        ),
        Mode::Harness => serve_forever(
            &listener,
            &mut DryRunRestoreOps::default(),
            &config.state_dir,
            &sigchld,
        ),
    }
}

fn serve_forever<R: RestoreOps>(
    listener: &Listener,
    restore: &mut R,
    state_dir: &Path,
    sigchld: &SignalFd,
) -> Result<(), ServerError> {
    let mut next_id = 0;
    loop {
        // Between sessions, keep reaping orphans (PID 1 adopts the
        // container's leftovers) while waiting for the next host.
        wait_for_connection(listener, sigchld)?;
        let conn = listener.accept().map_err(ServerError::Accept)?;
        reap_orphans();
        tracing::info!("host connected");
        let mut ctx = SessionContext {
            restore,
            state_dir,
            sigchld,
            next_id: &mut next_id,
        };
        let end = Session::new(conn, &mut ctx).serve();
        tracing::info!(?end, "session ended");
        reap_orphans();
    }
}
