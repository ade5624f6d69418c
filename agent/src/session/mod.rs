//! One host connection: the handshake, restore requests, and at most one
//! container process whose stdio is relayed until it exits.
//!
//! ```text
//!  Handshake --Hello--> Idle --Create ok--> Created --Start ok--> Running
//!                        ^  |                  |                     |
//!                        +--+ Create failed    | exits (a Signal)    | exits
//!                           |                  v                     v
//!                           +--Run = Create+Start-------------> Exited sent, end
//! ```
//!
//! `Created` and `Running` share the process's state (`Running`); in
//! `Created` the child waits on its [`ExecGate`], signals and resizes reach
//! it, stdin is refused, and its death (a signal) ends the session with
//! `Exited` as in `Running`.
//!
//! The loop is single-threaded around `poll(2)`: the connection, the
//! process's stdout/stderr (or pty master), its stdin when bytes are queued,
//! and a signalfd for SIGCHLD. Host frames are decoded incrementally
//! ([`FrameDecoder`]) so a slow or hostile host cannot stall output relaying
//! with half a frame. Writes to the host block (back-pressure); the host must
//! read while it writes (the client does, with a writer thread).
//!
//! Errors: a frame that does not decode or validate is answered with `Error`
//! and the session goes on; an oversized frame, a bad handshake, or EOF in the
//! middle of a frame end the session (a running process is killed).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use agent_protocol::{
    AgentMessage, ErrorKind, FrameDecoder, HostMessage, MAX_STDIO_CHUNK, MAX_TEXT,
    PROTOCOL_VERSION, ProtocolError, ValidationError, decode_message, write_message,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::exit_status::exit_code;
use crate::process::ExecGate;
use crate::restore::RestoreOps;
use crate::rootfs::PreparedRootfs;
use crate::transport::Conn;

mod lifecycle;

/// How long a connection may take to send its `Hello`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for stdout/stderr EOF after the process exited (a
/// background child may hold them open).
pub const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Most stdin bytes queued before the agent stops reading from the host.
pub const STDIN_QUEUE_LIMIT: usize = 1024 * 1024;

/// Shared state the sessions of one agent use.
#[derive(Debug)]
pub struct SessionContext<'a, R: RestoreOps> {
    /// Applies SyncTime / Reseed.
    pub restore: &'a mut R,
    /// Per-container mount points go here.
    pub state_dir: &'a Path,
    /// SIGCHLD (blocked) as a non-blocking signalfd.
    pub sigchld: &'a SignalFd,
    /// Number of the next container (names its state directory).
    pub next_id: &'a mut u64,
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The process ran and exited with this status (sent to the host).
    Exited(i32),
    /// The host closed the connection (or it broke) before any exit.
    Disconnected,
    /// The host broke the protocol; the agent said why and closed.
    ProtocolViolation,
}

struct Running {
    pid: Pid,
    stdin: Option<OwnedFd>,
    stdin_queue: Vec<u8>,
    stdin_close: bool,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    terminal: bool,
    exit: Option<(i32, Instant)>,
    rootfs: Option<PreparedRootfs>,
}

enum Phase {
    Handshake,
    Idle,
    /// `Create` succeeded: the child finished set-up and waits for `Start`.
    Created(Box<Running>, ExecGate),
    Running(Box<Running>),
}

impl Phase {
    /// The session's process, created or running.
    fn process(&self) -> Option<&Running> {
        match self {
            Phase::Created(run, _) | Phase::Running(run) => Some(run),
            Phase::Handshake | Phase::Idle => None,
        }
    }

    fn process_mut(&mut self) -> Option<&mut Running> {
        match self {
            Phase::Created(run, _) | Phase::Running(run) => Some(run),
            Phase::Handshake | Phase::Idle => None,
        }
    }
}

enum Flow {
    Continue,
    End(SessionEnd),
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn error(kind: ErrorKind, message: impl Into<String>) -> AgentMessage {
    AgentMessage::Error {
        kind,
        message: truncate(message.into()),
    }
}

/// Serves one connection to its end.
pub struct Session<'c, 'a, R: RestoreOps> {
    conn: Conn,
    decoder: FrameDecoder,
    ctx: &'c mut SessionContext<'a, R>,
    phase: Phase,
}

impl<R: RestoreOps> std::fmt::Debug for Session<'_, '_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

/// Reads once from `fd` into a fresh buffer; `None` on EOF (or EIO, which a
/// pty master returns once the terminal is closed).
fn read_chunk(fd: BorrowedFd<'_>) -> Option<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_STDIO_CHUNK];
    match nix::unistd::read(fd, &mut buf) {
        Ok(0) | Err(nix::Error::EIO) => Some(None),
        Ok(n) => {
            buf.truncate(n);
            Some(Some(buf))
        }
        Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => None,
        Err(e) => {
            tracing::warn!(error = %e, "read from process failed");
            Some(None)
        }
    }
}

impl<'c, 'a, R: RestoreOps> Session<'c, 'a, R> {
    /// A session on a freshly accepted connection.
    pub fn new(conn: Conn, ctx: &'c mut SessionContext<'a, R>) -> Self {
        Self {
            conn,
            decoder: FrameDecoder::new(),
            ctx,
            phase: Phase::Handshake,
        }
    }

    fn send(&mut self, msg: &AgentMessage) -> Result<(), ProtocolError> {
        write_message(&mut self.conn, msg)
    }

    /// Runs the session until the connection ends.
    pub fn serve(mut self) -> SessionEnd {
        let end = match self.send(&AgentMessage::Hello {
            version: PROTOCOL_VERSION,
        }) {
            Ok(()) => self.event_loop(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot send Hello");
                SessionEnd::Disconnected
            }
        };
        self.cleanup();
        end
    }

    fn cleanup(&mut self) {
        if let Some(run) = self.phase.process_mut() {
            if run.exit.is_none() {
                tracing::warn!(
                    pid = run.pid.as_raw(),
                    "session ended with the process running; killing it"
                );
                let _ = kill(run.pid, Signal::SIGKILL);
                let _ = waitpid(run.pid, None);
            }
            if let Some(r) = run.rootfs.take() {
                r.teardown();
            }
        }
    }

    fn event_loop(&mut self) -> SessionEnd {
        let started = Instant::now();
        loop {
            let (timeout, ready) = match self.poll_once(started) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "poll failed");
                    return SessionEnd::Disconnected;
                }
            };
            if timeout && matches!(self.phase, Phase::Handshake) {
                tracing::warn!("no Hello within {HANDSHAKE_TIMEOUT:?}; closing");
                let _ = self.send(&error(ErrorKind::Protocol, "no Hello received in time"));
                return SessionEnd::ProtocolViolation;
            }
            match self.handle_ready(ready) {
                Flow::Continue => {}
                Flow::End(end) => return end,
            }
            if let Some(end) = self.check_exit() {
                return end;
            }
        }
    }

    fn poll_once(&mut self, started: Instant) -> nix::Result<(bool, Ready)> {
        let mut ready = Ready::default();
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(5);
        let mut slots: Vec<Slot> = Vec::with_capacity(5);
        let mut timeout = PollTimeout::NONE;
        let read_host = match self.phase.process() {
            Some(run) => run.stdin_queue.len() < STDIN_QUEUE_LIMIT,
            None => true,
        };
        if read_host {
            fds.push(PollFd::new(self.conn.as_fd(), PollFlags::POLLIN));
            slots.push(Slot::Conn);
        }
        match &self.phase {
            Phase::Handshake => {
                let left = HANDSHAKE_TIMEOUT.saturating_sub(started.elapsed());
                timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            }
            Phase::Idle => {}
            // A created child writes nothing and is given no stdin, but its
            // death (a host signal) must be seen.
            Phase::Created(run, _) | Phase::Running(run) => {
                fds.push(PollFd::new(self.ctx.sigchld.as_fd(), PollFlags::POLLIN));
                slots.push(Slot::Sigchld);
                if let Some(fd) = &run.stdout {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    slots.push(Slot::Stdout);
                }
                if let Some(fd) = &run.stderr {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    slots.push(Slot::Stderr);
                }
                if let Some(fd) = &run.stdin
                    && !run.stdin_queue.is_empty()
                {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
                    slots.push(Slot::Stdin);
                }
                if let Some((_, at)) = run.exit {
                    let left = EXIT_DRAIN_GRACE.saturating_sub(at.elapsed());
                    timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
                }
            }
        }
        let n = match poll(&mut fds, timeout) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => return Ok((false, ready)),
            Err(e) => return Err(e),
        };
        for (fd, slot) in fds.iter().zip(slots) {
            let ev = fd.revents().unwrap_or(PollFlags::empty());
            if ev.is_empty() {
                continue;
            }
            match slot {
                Slot::Conn => ready.conn = true,
                Slot::Sigchld => ready.sigchld = true,
                Slot::Stdout => ready.stdout = true,
                Slot::Stderr => ready.stderr = true,
                Slot::Stdin => ready.stdin = true,
            }
        }
        Ok((n == 0, ready))
    }

    fn handle_ready(&mut self, ready: Ready) -> Flow {
        if ready.sigchld {
            self.reap();
        }
        if ready.stdout && self.relay_output(false).is_err() {
            return Flow::End(SessionEnd::Disconnected);
        }
        if ready.stderr && self.relay_output(true).is_err() {
            return Flow::End(SessionEnd::Disconnected);
        }
        if ready.stdin {
            self.write_stdin();
        }
        if ready.conn {
            return self.read_host();
        }
        Flow::Continue
    }

    fn reap(&mut self) {
        while let Ok(Some(_)) = self.ctx.sigchld.read_signal() {}
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if let Some(run) = self.phase.process_mut()
                        && status.pid() == Some(run.pid)
                        && let Some(code) = exit_code(status)
                    {
                        tracing::info!(pid = run.pid.as_raw(), code, "process exited");
                        run.exit = Some((code, Instant::now()));
                        // Keep reading output, but stop writing input.
                        run.stdin_queue.clear();
                        if !run.terminal {
                            run.stdin = None;
                        }
                    } else {
                        tracing::debug!(?status, "reaped");
                    }
                }
            }
        }
    }

    fn relay_output(&mut self, is_stderr: bool) -> Result<(), ProtocolError> {
        let Some(run) = self.phase.process_mut() else {
            return Ok(());
        };
        let slot = if is_stderr {
            &mut run.stderr
        } else {
            &mut run.stdout
        };
        let Some(fd) = slot.as_ref() else {
            return Ok(());
        };
        match read_chunk(fd.as_fd()) {
            None => Ok(()),
            Some(None) => {
                *slot = None;
                Ok(())
            }
            Some(Some(bytes)) => {
                let msg = if is_stderr {
                    AgentMessage::Stderr(bytes)
                } else {
                    AgentMessage::Stdout(bytes)
                };
                self.send(&msg)
            }
        }
    }

    fn write_stdin(&mut self) {
        let Phase::Running(run) = &mut self.phase else {
            return;
        };
        let Some(fd) = &run.stdin else { return };
        match nix::unistd::write(fd, &run.stdin_queue) {
            Ok(n) => {
                run.stdin_queue.drain(..n);
            }
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => {}
            Err(e) => {
                tracing::debug!(error = %e, "stdin closed by the process");
                run.stdin_queue.clear();
                run.stdin = None;
            }
        }
        if run.stdin_queue.is_empty() && run.stdin_close && !run.terminal {
            run.stdin = None;
        }
    }

    fn check_exit(&mut self) -> Option<SessionEnd> {
        let run = self.phase.process_mut()?;
        let (code, at) = run.exit?;
        let drained = run.stdout.is_none() && run.stderr.is_none();
        if !drained && at.elapsed() < EXIT_DRAIN_GRACE {
            return None;
        }
        if !drained {
            tracing::warn!("output still open {EXIT_DRAIN_GRACE:?} after exit; not waiting longer");
        }
        if let Err(e) = self.send(&AgentMessage::Exited { code }) {
            tracing::warn!(error = %e, "cannot send Exited");
        }
        Some(SessionEnd::Exited(code))
    }

    fn read_host(&mut self) -> Flow {
        let mut buf = vec![0u8; 64 * 1024];
        let n = match nix::unistd::read(self.conn.as_fd(), &mut buf) {
            Ok(n) => n,
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => return Flow::Continue,
            Err(e) => {
                tracing::warn!(error = %e, "connection read failed");
                return Flow::End(SessionEnd::Disconnected);
            }
        };
        if n == 0 {
            if let Err(e) = self.decoder.finish() {
                tracing::warn!(error = %e, "host closed the connection mid-frame");
            } else {
                tracing::info!("host closed the connection");
            }
            return Flow::End(SessionEnd::Disconnected);
        }
        self.decoder.feed(&buf[..n]);
        loop {
            match self.decoder.next_frame() {
                Ok(None) => return Flow::Continue,
                Ok(Some(payload)) => {
                    if let Flow::End(e) = self.handle_frame(&payload) {
                        return Flow::End(e);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame; closing");
                    let _ = self.send(&error(ErrorKind::Protocol, e.to_string()));
                    return Flow::End(SessionEnd::ProtocolViolation);
                }
            }
        }
    }

    fn reply(&mut self, msg: AgentMessage) -> Flow {
        match self.send(&msg) {
            Ok(()) => Flow::Continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reply");
                Flow::End(SessionEnd::Disconnected)
            }
        }
    }

    fn handle_frame(&mut self, payload: &[u8]) -> Flow {
        let handshake = matches!(self.phase, Phase::Handshake);
        let msg = match decode_message::<HostMessage>(payload) {
            Ok(m) => m,
            Err(ProtocolError::Invalid(e @ ValidationError::VersionMismatch { .. })) => {
                tracing::warn!(error = %e, "version mismatch; closing");
                let _ = self.send(&error(ErrorKind::VersionMismatch, e.to_string()));
                return Flow::End(SessionEnd::ProtocolViolation);
            }
            Err(e) => {
                tracing::warn!(error = %e, "rejected host message");
                let kind = match e {
                    ProtocolError::Invalid(_) => ErrorKind::InvalidRequest,
                    _ => ErrorKind::Protocol,
                };
                if handshake {
                    let _ = self.send(&error(kind, format!("during handshake: {e}")));
                    return Flow::End(SessionEnd::ProtocolViolation);
                }
                return self.reply(error(kind, e.to_string()));
            }
        };
        if handshake {
            if let HostMessage::Hello { .. } = msg {
                self.phase = Phase::Idle;
                return Flow::Continue;
            }
            let _ = self.send(&error(
                ErrorKind::Protocol,
                "the first message must be Hello",
            ));
            return Flow::End(SessionEnd::ProtocolViolation);
        }
        self.handle_message(msg)
    }

    fn handle_message(&mut self, msg: HostMessage) -> Flow {
        match msg {
            HostMessage::Hello { .. } => self.reply(error(ErrorKind::Protocol, "duplicate Hello")),
            HostMessage::SyncTime { realtime_ns } => {
                let r = self.ctx.restore.step_clock(realtime_ns);
                self.reply(match r {
                    Ok(()) => AgentMessage::Ack,
                    Err(e) => error(ErrorKind::Restore, e.to_string()),
                })
            }
            HostMessage::Reseed { bytes } => {
                let r = self.ctx.restore.reseed(&bytes);
                self.reply(match r {
                    Ok(()) => AgentMessage::Ack,
                    Err(e) => error(ErrorKind::Restore, e.to_string()),
                })
            }
            HostMessage::Run(req) if matches!(self.phase, Phase::Idle) => self.run(&req),
            HostMessage::Create(req) if matches!(self.phase, Phase::Idle) => {
                self.create_and_reply(&req)
            }
            HostMessage::Exec(_) => self.reply(error(
                ErrorKind::NoContainer,
                "exec is not supported by this agent yet",
            )),
            HostMessage::Run(_) | HostMessage::Create(_) => {
                let message = match self.phase {
                    Phase::Created(..) => {
                        "a process was already created on this connection (send Start)"
                    }
                    _ => "a process was already started on this connection",
                };
                self.reply(error(ErrorKind::Protocol, message))
            }
            HostMessage::Start => match &self.phase {
                Phase::Created(run, _) if run.exit.is_some() => self.reply(error(
                    ErrorKind::Protocol,
                    "the created process has already exited",
                )),
                Phase::Created(..) => self.start_and_reply(),
                Phase::Running(_) => self.reply(error(
                    ErrorKind::Protocol,
                    "the process was already started",
                )),
                Phase::Handshake | Phase::Idle => self.reply(error(
                    ErrorKind::Protocol,
                    "no process was created on this connection (send Create first)",
                )),
            },
            HostMessage::Stdin(bytes) => self.with_started(|run| {
                if run.stdin.is_some() && !run.stdin_close {
                    run.stdin_queue.extend_from_slice(&bytes);
                }
            }),
            HostMessage::CloseStdin => self.with_started(|run| {
                if run.terminal && !run.stdin_close {
                    // A terminal has no half-close: send EOF (^D) instead.
                    run.stdin_queue.push(0x04);
                } else if run.stdin_queue.is_empty() {
                    run.stdin = None;
                }
                run.stdin_close = true;
            }),
            HostMessage::Signal(n) => self.with_process(|run| {
                if run.exit.is_none() {
                    // Raw numbers so real-time signals (34..=64) work too;
                    // validation bounded n to 1..=64.
                    // SAFETY: kill(2) takes plain integers.
                    if unsafe { libc::kill(run.pid.as_raw(), n) } != 0 {
                        tracing::debug!(error = %std::io::Error::last_os_error(), "kill failed");
                    }
                }
            }),
            HostMessage::Resize { rows, cols } => self.with_process(|run| {
                if run.terminal
                    && let Some(fd) = &run.stdout
                {
                    resize(fd.as_raw_fd(), rows, cols);
                }
            }),
        }
    }

    /// Applies `f` to the process, created or running, or answers that
    /// there is none.
    fn with_process(&mut self, f: impl FnOnce(&mut Running)) -> Flow {
        match self.phase.process_mut() {
            Some(run) => {
                f(run);
                Flow::Continue
            }
            None => self.reply(error(ErrorKind::Protocol, "no process is running")),
        }
    }

    /// Applies `f` to the started process, or answers why there is none.
    /// Stdin is refused before `Start`: see the crate doc of agent-protocol.
    fn with_started(&mut self, f: impl FnOnce(&mut Running)) -> Flow {
        match &mut self.phase {
            Phase::Running(run) => {
                f(run);
                Flow::Continue
            }
            Phase::Created(..) => self.reply(error(
                ErrorKind::Protocol,
                "the process is created but not started: stdin is accepted after Start",
            )),
            Phase::Handshake | Phase::Idle => {
                self.reply(error(ErrorKind::Protocol, "no process is running"))
            }
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

#[derive(Debug, Default, Clone, Copy)]
struct Ready {
    conn: bool,
    sigchld: bool,
    stdout: bool,
    stderr: bool,
    stdin: bool,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Conn,
    Sigchld,
    Stdout,
    Stderr,
    Stdin,
}
