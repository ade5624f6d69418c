//! Harness mode (design section 9): the agent as a host process, PID 1 of new
//! mount, pid, uts, ipc and network namespaces, so the code paths are the
//! VM's while the host stays untouched (a `RunRequest::network` configures
//! the harness's own interfaces, never the host's).

use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use thiserror::Error;

use crate::exit_status::exit_code;

/// Errors of entering the harness namespaces.
#[derive(Debug, Error)]
pub enum HarnessError {
    /// `unshare` failed (needs CAP_SYS_ADMIN).
    #[error("unshare(mount, pid, uts, ipc, net) failed: {0} (harness mode needs root)")]
    Unshare(nix::Error),
    /// `fork` failed.
    #[error("fork failed: {0}")]
    Fork(nix::Error),
    /// Making mounts private or mounting the state tmpfs failed.
    #[error("cannot prepare mounts: {0}")]
    Mount(nix::Error),
    /// Creating the state directory failed.
    #[error("cannot create state directory: {0}")]
    StateDir(std::io::Error),
    /// Waiting for the namespaced agent failed.
    #[error("waitpid failed: {0}")]
    Wait(nix::Error),
}

/// What the caller of [`enter_namespaces`] is.
#[derive(Debug)]
pub enum Side {
    /// The process inside the namespaces (PID 1 there): run the agent.
    Inside,
    /// The original process: exit with this status once the inside exited.
    Outside(i32),
}

/// Unshares mount/pid/uts/ipc/net namespaces and forks. The child is PID 1 of
/// the new pid namespace and dies with its parent; the parent waits for it.
pub fn enter_namespaces(state_dir: &Path) -> Result<Side, HarnessError> {
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(HarnessError::Unshare)?;
    // SAFETY: the agent is single-threaded at this point, so the child may
    // run arbitrary code after fork.
    match unsafe { fork() }.map_err(HarnessError::Fork)? {
        ForkResult::Child => {
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and no pointers.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, Signal::SIGKILL as libc::c_ulong) };
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(HarnessError::Mount)?;
            std::fs::create_dir_all(state_dir).map_err(HarnessError::StateDir)?;
            mount(
                Some("tmpfs"),
                state_dir,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0700"),
            )
            .map_err(HarnessError::Mount)?;
            Ok(Side::Inside)
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    return Ok(Side::Outside(exit_code(status).unwrap_or(1)));
                }
                Ok(_) | Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(HarnessError::Wait(e)),
            }
        },
    }
}
