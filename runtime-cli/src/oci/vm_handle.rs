//! The container's VM, restored from its template in a pre-started VMM of a running pool
//! (`kata-snap pool start`: VM creation is then off the start-up path) or, when there is none
//! of the template's shape, cold in the supervisor's own process.
//!
//! Either way the supervisor stays the container's process: a pooled VM is stopped when the
//! supervisor stops it or dies (the pool's VMM watches its connection to the supervisor, which
//! the kernel closes even on SIGKILL).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use vmm::control::{ControlRequest, ControlResponse, send_request};
use vmm::seccomp::SeccompMode;
use vmm::vm::{RunningVm, SnapshotState, VmEvent};

use crate::pool::{Claim, PooledVm};
use crate::restore_cmd::{RestoreArgs, start_restore};

/// The longest socket path a pooled VM is given (the kernel's limit is 107 bytes).
const MAX_SOCKET_PATH: usize = 100;

/// A container's running VM.
#[derive(Debug)]
pub enum ContainerVm {
    /// In this process.
    Local {
        /// The VM.
        vm: RunningVm,
        /// Readable once the VM stopped.
        stopped: OwnedFd,
    },
    /// In a pre-started VMM of the pool.
    Pooled {
        /// The VMM's connection.
        vm: PooledVm,
        /// Its control socket.
        api: PathBuf,
    },
}

impl ContainerVm {
    /// Restores `args` cold in this process (`state`: the snapshot's state file, when read
    /// already).
    pub fn cold(
        args: &RestoreArgs,
        state: Option<SnapshotState>,
        process_start: Instant,
        seccomp: SeccompMode,
    ) -> Result<Self> {
        let vm = start_restore(args, None, state, process_start, seccomp, false)
            .context("cannot restore the container's VM from its template")?;
        let (stopped, stop_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create a pipe")?;
        let events = vm.events();
        let filters = vm.seccomp().clone();
        std::thread::Builder::new()
            .name("vm-watch".into())
            .spawn(move || {
                // Filtered before it waits: it only reads a channel and writes to the pipe. A
                // filter that cannot be installed ends the container (the pipe says "stopped").
                if let Err(e) = filters.apply(vmm::seccomp::ThreadKind::VmWatch) {
                    tracing::error!("vm-watch: {e}");
                    let _ = nix::unistd::write(&stop_w, b"x");
                    return;
                }
                while let Ok(ev) = events.recv() {
                    if matches!(ev, VmEvent::Stopping(_)) {
                        break;
                    }
                }
                // Also when the VM's handle is gone: the pipe's writer closes either way.
                let _ = nix::unistd::write(&stop_w, b"x");
            })
            .context("cannot start a thread")?;
        tracing::debug!("restore path: cold start");
        Ok(Self::Local { vm, stopped })
    }

    /// The VM in a pre-started VMM of a pool of the snapshot's shape (paths relative to the
    /// container's directory `dir`, the cwd), else (`Err`) nothing, with the snapshot's state file when
    /// the claim read it.
    pub fn pooled(
        dir: &Path,
        args: &RestoreArgs,
        process_start: Instant,
        adopter: Option<&crate::pool::Adopter>,
    ) -> Result<Result<Self, Option<Box<SnapshotState>>>> {
        // The pool's VMM has another cwd: every path it gets is absolute.
        let abs = |p: &Option<PathBuf>| p.as_ref().map(|p| dir.join(p));
        let api = dir.join("a.sock");
        let mut pooled = args.clone();
        pooled.vsock = abs(&args.vsock);
        pooled.serial_log = abs(&args.serial_log);
        pooled.api_sock = Some(api.clone());
        let too_long = [&pooled.vsock, &pooled.api_sock].iter().any(|p| {
            p.as_ref()
                .is_some_and(|p| p.as_os_str().len() > MAX_SOCKET_PATH)
        });
        if too_long {
            tracing::debug!(
                "socket paths under {} are too long for the pool",
                dir.display()
            );
            return Ok(Err(None));
        }
        // The VM's stdio is not the container's: the agent carries that.
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .context("cannot open /dev/null")?;
        let fd = null.as_raw_fd();
        let vm = match crate::pool::claim_and_start(&pooled, process_start, [fd, fd, fd], adopter)?
        {
            Claim::Started(vm) => vm,
            Claim::Cold(state) => return Ok(Err(state)),
        };
        tracing::debug!(
            "restore path: pool (pre-started VMM pid {}{})",
            vm.pid,
            if vm.preloaded {
                ", template pre-loaded"
            } else {
                ""
            }
        );
        Ok(Ok(Self::Pooled { vm, api }))
    }

    /// Whether the restore took a pre-started VMM.
    pub fn is_pooled(&self) -> bool {
        matches!(self, Self::Pooled { .. })
    }

    /// The jail uid of the pre-started VMM that the container adopted, when it took a jailed
    /// one.
    pub fn adopted_uid(&self) -> Option<u32> {
        match self {
            Self::Local { .. } => None,
            Self::Pooled { vm, .. } => vm.adopted,
        }
    }

    /// The container's directory is `dir` from now on (its jail's): the control socket of a
    /// pooled VM is reached there.
    pub fn rebase(&mut self, dir: &Path) {
        if let Self::Pooled { api, .. } = self
            && let Some(name) = api.file_name()
        {
            *api = dir.join(name);
        }
    }

    /// The pre-started VMM's pid, when the restore took one.
    pub fn pooled_pid(&self) -> Option<i32> {
        match self {
            Self::Local { .. } => None,
            Self::Pooled { vm, .. } => Some(vm.pid as i32),
        }
    }

    /// Readable once the VM has stopped.
    pub fn stopped_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Local { stopped, .. } => stopped.as_fd(),
            Self::Pooled { vm, .. } => vm.as_fd(),
        }
    }

    /// Whether the VM still runs.
    pub fn alive(&self) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            self.stopped_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        !matches!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
            Ok(n) if n > 0
        )
    }

    fn request(&self, req: ControlRequest) -> Result<()> {
        match self {
            Self::Local { vm, .. } => match req {
                ControlRequest::Pause => vm.pause()?,
                ControlRequest::Resume => vm.resume()?,
                ControlRequest::FinishWorkingset => vm.finish_recording()?,
                other => bail!("{other:?} is not asked of a container's VM"),
            },
            Self::Pooled { api, .. } => match send_request(api, req)? {
                ControlResponse { ok: true, .. } => {}
                ControlResponse { error, .. } => {
                    bail!("{}", error.unwrap_or_else(|| "refused".into()))
                }
            },
        }
        Ok(())
    }

    /// Pauses the vCPUs.
    pub fn pause(&self) -> Result<()> {
        self.request(ControlRequest::Pause)
    }

    /// Resumes the vCPUs.
    pub fn resume(&self) -> Result<()> {
        self.request(ControlRequest::Resume)
    }

    /// Ends the working-set recording and writes its file.
    pub fn finish_recording(&self) -> Result<()> {
        self.request(ControlRequest::FinishWorkingset)
    }

    /// Stops the VM and waits for it to be gone.
    pub fn shutdown(self) {
        match self {
            Self::Local { vm, .. } => {
                vm.stop();
                if let Err(e) = vm.wait() {
                    tracing::warn!("VM teardown: {e}");
                }
            }
            Self::Pooled { mut vm, .. } => {
                vm.stop_by_signal(libc::SIGTERM);
                if let Err(e) = vm.read_exit() {
                    tracing::debug!("pooled VM teardown: {e:#}");
                }
            }
        }
    }
}
