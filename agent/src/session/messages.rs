//! What the session does with each host message.

use std::os::fd::AsRawFd;

use agent_protocol::{
    AgentMessage, ErrorKind, HostMessage, ProtocolError, ValidationError, decode_message,
};

use super::{Phase, Proc, Session, SessionContext, SessionEnd, error};
use crate::cgroup::{CgroupError, Group, mem_total};
use crate::restore::RestoreOps;

impl Session {
    /// Queues an answer to the host.
    pub(super) fn reply(&mut self, msg: AgentMessage) {
        self.out.push(&msg);
    }

    pub(super) fn handle_frame<R: RestoreOps>(
        &mut self,
        payload: &[u8],
        ctx: &mut SessionContext<'_, R>,
    ) {
        let handshake = matches!(self.phase, Phase::Handshake);
        let msg = match decode_message::<HostMessage>(payload) {
            Ok(m) => m,
            Err(ProtocolError::Invalid(e @ ValidationError::VersionMismatch { .. })) => {
                tracing::warn!(error = %e, "version mismatch; closing");
                self.reply(error(ErrorKind::VersionMismatch, e.to_string()));
                return self.end(SessionEnd::ProtocolViolation, true);
            }
            Err(e) => {
                tracing::warn!(error = %e, "rejected host message");
                let kind = match e {
                    ProtocolError::Invalid(_) => ErrorKind::InvalidRequest,
                    _ => ErrorKind::Protocol,
                };
                if handshake {
                    self.reply(error(kind, format!("during handshake: {e}")));
                    return self.end(SessionEnd::ProtocolViolation, true);
                }
                return self.reply(error(kind, e.to_string()));
            }
        };
        if handshake {
            if let HostMessage::Hello { .. } = msg {
                self.phase = Phase::Idle;
                return;
            }
            self.reply(error(
                ErrorKind::Protocol,
                "the first message must be Hello",
            ));
            return self.end(SessionEnd::ProtocolViolation, true);
        }
        self.handle_message(msg, ctx);
    }

    fn handle_message<R: RestoreOps>(&mut self, msg: HostMessage, ctx: &mut SessionContext<'_, R>) {
        let idle = matches!(self.phase, Phase::Idle);
        match msg {
            HostMessage::Hello { .. } => self.reply(error(ErrorKind::Protocol, "duplicate Hello")),
            HostMessage::SyncTime { realtime_ns } => {
                let r = ctx.restore.step_clock(realtime_ns);
                self.reply(match r {
                    Ok(()) => AgentMessage::Ack,
                    Err(e) => error(ErrorKind::Restore, e.to_string()),
                })
            }
            HostMessage::Reseed { bytes } => {
                let r = ctx.restore.reseed(&bytes);
                self.reply(match r {
                    Ok(()) => AgentMessage::Ack,
                    Err(e) => error(ErrorKind::Restore, e.to_string()),
                })
            }
            HostMessage::Run(req) if idle => self.run(&req, ctx),
            HostMessage::Create(req) if idle => self.create_and_reply(&req, ctx),
            HostMessage::Exec(req) if idle => self.exec(&req, ctx),
            HostMessage::Run(_) | HostMessage::Create(_) | HostMessage::Exec(_) => {
                let message = match self.phase {
                    Phase::Created(..) => {
                        "a process was already created on this connection (send Start)"
                    }
                    _ => "a process was already started on this connection",
                };
                self.reply(error(ErrorKind::Protocol, message))
            }
            HostMessage::Update(r) => self.on_cgroup(ctx, |g| {
                g.update(&r, mem_total()?)?;
                Ok(AgentMessage::Ack)
            }),
            HostMessage::Stats => {
                self.on_cgroup(ctx, |g| Ok(AgentMessage::Stats(Box::new(g.stats()?))))
            }
            HostMessage::Processes => self.on_cgroup(ctx, |g| {
                Ok(AgentMessage::Processes(crate::cgroup::procs::list(
                    g.path(),
                )?))
            }),
            HostMessage::Start => match &self.phase {
                Phase::Created(p, _) if p.exit.is_some() => self.reply(error(
                    ErrorKind::Protocol,
                    "the created process has already exited",
                )),
                Phase::Created(..) => self.start_and_reply(ctx),
                Phase::Running(_) => self.reply(error(
                    ErrorKind::Protocol,
                    "the process was already started",
                )),
                _ => self.reply(error(
                    ErrorKind::Protocol,
                    "no process was created on this connection (send Create first)",
                )),
            },
            HostMessage::Stdin(bytes) => self.with_started(|p| {
                if p.stdin.is_some() && !p.stdin_close {
                    p.stdin_queue.extend_from_slice(&bytes);
                }
            }),
            HostMessage::CloseStdin => self.with_started(|p| {
                if p.terminal && !p.stdin_close {
                    // A terminal has no half-close: send EOF (^D) instead.
                    p.stdin_queue.push(0x04);
                } else if p.stdin_queue.is_empty() && !p.terminal {
                    p.stdin = None;
                }
                p.stdin_close = true;
            }),
            HostMessage::Signal(n) => self.with_process(|p| {
                if p.exit.is_none() {
                    // Raw numbers so real-time signals (34..=64) work too;
                    // validation bounded n to 1..=64. The pid is not reaped
                    // yet (exit is None), so it cannot have been reused.
                    // SAFETY: kill(2) takes plain integers.
                    if unsafe { libc::kill(p.pid.as_raw(), n) } != 0 {
                        tracing::debug!(error = %std::io::Error::last_os_error(), "kill failed");
                    }
                }
            }),
            HostMessage::Resize { rows, cols } => self.with_process(|p| {
                if p.terminal
                    && let Some(fd) = &p.stdout
                {
                    resize(fd.as_raw_fd(), rows, cols);
                }
            }),
        }
    }

    /// Answers `Update` / `Stats`: `f` on the newest running container's
    /// cgroup, or why there is none. A request the agent refuses as asked
    /// (memory above the guest's, an impossible swap value) is
    /// `InvalidRequest`; a failed read or write is `Cgroup`.
    fn on_cgroup<R: RestoreOps>(
        &mut self,
        ctx: &SessionContext<'_, R>,
        f: impl FnOnce(&Group) -> Result<AgentMessage, CgroupError>,
    ) {
        let reply = match ctx.containers.cgroup() {
            Err((ErrorKind::Cgroup, m)) => match &ctx.cgroups {
                Err(reason) => error(
                    ErrorKind::Cgroup,
                    format!("the guest has no cgroups: {reason}"),
                ),
                Ok(_) => error(ErrorKind::Cgroup, m),
            },
            Err((kind, m)) => error(kind, m),
            Ok(g) => match f(g) {
                Ok(m) => m,
                Err(CgroupError::Refused(m)) => error(ErrorKind::InvalidRequest, m),
                Err(e) => error(ErrorKind::Cgroup, e.to_string()),
            },
        };
        if let AgentMessage::Error { kind, message } = &reply {
            tracing::info!(?kind, %message, "cgroup request refused");
        }
        self.reply(reply);
    }

    /// Applies `f` to the process, created or running, or answers that
    /// there is none.
    fn with_process(&mut self, f: impl FnOnce(&mut Proc)) {
        match self.phase.process_mut() {
            Some(p) => f(p),
            None => self.reply(error(ErrorKind::Protocol, "no process is running")),
        }
    }

    /// Applies `f` to the started process, or answers why there is none.
    /// Stdin is refused before `Start`: see the crate doc of agent-protocol.
    fn with_started(&mut self, f: impl FnOnce(&mut Proc)) {
        match &mut self.phase {
            Phase::Running(p) => f(p),
            Phase::Created(..) => self.reply(error(
                ErrorKind::Protocol,
                "the process is created but not started: stdin is accepted after Start",
            )),
            _ => self.reply(error(ErrorKind::Protocol, "no process is running")),
        }
    }
}

fn resize(master: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives across the call.
    if unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "TIOCSWINSZ failed");
    }
}
