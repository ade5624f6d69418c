//! Creating and starting the session's process: `Create`, `Start`, and
//! `Run` (= `Create` then `Start`, one code path), with the answers each
//! gets on success and failure.

use std::time::Instant;

use agent_protocol::{AgentMessage, ErrorKind, RunRequest};
use nix::unistd::Pid;

use super::{Flow, Phase, Running, Session, SessionEnd, error};
use crate::exit_status::EXIT_CANNOT_INVOKE;
use crate::mounts::{apply_mount, populate_dev, prepare_dev};
use crate::process::{Prepared, SpawnError, Spawned, prepare};
use crate::restore::RestoreOps;
use crate::rootfs::prepare as prepare_rootfs;

/// Why creating or starting the process failed, and the exit status a `Run`
/// reports for it.
struct Failure {
    kind: ErrorKind,
    message: String,
    code: i32,
}

impl Failure {
    fn rootfs(e: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Rootfs,
            message: e.to_string(),
            code: EXIT_CANNOT_INVOKE,
        }
    }
}

impl From<SpawnError> for Failure {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::Exec {
                kind,
                message,
                code,
            } => Self {
                kind,
                message,
                code,
            },
            e @ (SpawnError::Setup(_) | SpawnError::Stalled { .. }) => Self {
                kind: ErrorKind::ExecFailed,
                message: e.to_string(),
                code: EXIT_CANNOT_INVOKE,
            },
        }
    }
}

fn wire_pid(pid: Pid) -> u32 {
    u32::try_from(pid.as_raw()).unwrap_or(u32::MAX)
}

impl<R: RestoreOps> Session<'_, '_, R> {
    /// Ends a `Run` or `Start` that failed: `Error`, then `Exited{code}`.
    fn fail_run(&mut self, f: Failure) -> Flow {
        let Failure {
            kind,
            message,
            code,
        } = f;
        tracing::warn!(?kind, %message, code, "run failed");
        let _ = self.send(&error(kind, message));
        let _ = self.send(&AgentMessage::Exited { code });
        Flow::End(SessionEnd::Exited(code))
    }

    /// `Run`: `Create` then `Start`, answered by `Started` alone.
    pub(super) fn run(&mut self, req: &RunRequest) -> Flow {
        match self.create(req).and_then(|_| self.start_created()) {
            Ok(pid) => self.reply(AgentMessage::Started { pid }),
            Err(f) => self.fail_run(f),
        }
    }

    pub(super) fn create_and_reply(&mut self, req: &RunRequest) -> Flow {
        match self.create(req) {
            Ok(pid) => self.reply(AgentMessage::Created { pid }),
            Err(f) => {
                // Nothing is left of the attempt: the host may Create again.
                tracing::warn!(kind = ?f.kind, message = %f.message, "create failed");
                self.reply(error(f.kind, f.message))
            }
        }
    }

    pub(super) fn start_and_reply(&mut self) -> Flow {
        match self.start_created() {
            Ok(pid) => self.reply(AgentMessage::Started { pid }),
            Err(f) => self.fail_run(f),
        }
    }

    /// Lets the created process exec. On success the phase is `Running`; on
    /// failure the child is reaped, the rootfs torn down, the phase `Idle`.
    fn start_created(&mut self) -> Result<u32, Failure> {
        let (mut run, gate) = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Created(run, gate) => (run, gate),
            other => {
                self.phase = other;
                return Err(Failure {
                    kind: ErrorKind::Internal,
                    message: "no created process to start".into(),
                    code: EXIT_CANNOT_INVOKE,
                });
            }
        };
        match gate.open() {
            Ok(()) => {
                let pid = run.pid;
                tracing::info!(pid = pid.as_raw(), "process started");
                self.phase = Phase::Running(run);
                Ok(wire_pid(pid))
            }
            Err(e) => {
                if let Some(r) = run.rootfs.take() {
                    r.teardown();
                }
                Err(e.into())
            }
        }
    }

    /// Mounts the rootfs and the OCI mounts and prepares the process. On
    /// success the phase is `Created`; on failure nothing is left (no child,
    /// no mounts) and the phase stays `Idle`.
    fn create(&mut self, req: &RunRequest) -> Result<u32, Failure> {
        let id = *self.ctx.next_id;
        *self.ctx.next_id += 1;
        let t0 = Instant::now();
        let rootfs =
            prepare_rootfs(self.ctx.state_dir, id, &req.rootfs).map_err(Failure::rootfs)?;
        let t_rootfs = t0.elapsed();
        let mounted = prepare_dev(&rootfs.root, &req.mounts, req.rootfs.readonly)
            .and_then(|()| {
                req.mounts
                    .iter()
                    .try_for_each(|m| apply_mount(&rootfs.root, m))
            })
            .and_then(|()| populate_dev(&rootfs.root));
        if let Err(e) = mounted {
            rootfs.teardown();
            return Err(Failure::rootfs(e));
        }
        let t_mounts = t0.elapsed();
        let prepared = prepare(&rootfs.root, req);
        tracing::debug!(
            rootfs_us = t_rootfs.as_micros() as u64,
            mounts_us = (t_mounts - t_rootfs).as_micros() as u64,
            prepare_us = (t0.elapsed() - t_mounts).as_micros() as u64,
            "create timing"
        );
        let Prepared {
            process:
                Spawned {
                    pid,
                    stdin,
                    stdout,
                    stderr,
                    terminal,
                },
            gate,
        } = match prepared {
            Ok(p) => p,
            Err(e) => {
                rootfs.teardown();
                return Err(e.into());
            }
        };
        if let Err(e) = nix::fcntl::fcntl(
            &stdin,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        ) {
            tracing::warn!(error = %e, "cannot make stdin non-blocking");
        }
        tracing::info!(pid = pid.as_raw(), args = ?req.process.args, "process created");
        self.phase = Phase::Created(
            Box::new(Running {
                pid,
                stdin: Some(stdin),
                stdin_queue: Vec::new(),
                stdin_close: false,
                stdout: Some(stdout),
                stderr,
                terminal,
                exit: None,
                rootfs: Some(rootfs),
            }),
            gate,
        );
        Ok(wire_pid(pid))
    }
}
