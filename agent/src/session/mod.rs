//! One host connection: the handshake, restore requests, and at most one
//! process (the container's init, or one `Exec` runs in it) whose stdio is
//! relayed until it exits.
//!
//! ```text
//!  Handshake --Hello--> Idle --Create ok--> Created --Start ok--> Running
//!                        ^  |                  |                     |
//!                        +--+ Create failed,   | exits (a Signal)    | exits, output
//!                           | Exec refused     v                     v  drained
//!                           +--Run / Exec ------------------> Closing: Exited queued,
//!                                                              flushed, then closed
//! ```
//!
//! A session never blocks and owns no loop: the server's single poll(2) loop
//! asks it which descriptors to watch ([`Session::register`]), hands it the
//! events ([`Session::on_event`]), tells it when its process exited
//! ([`Session::process_exited`], reaping is central), and lets it act on
//! time ([`Session::tick`]).
//!
//! Flow control, both ways and bounded:
//! - everything for the host goes through an outbound queue written when
//!   the connection is writable; while the queue holds more than
//!   [`OUTPUT_QUEUE_LIMIT`] bytes the process's stdout/stderr are not read
//!   (the process blocks on its pipe), and past [`QUEUE_HARD_LIMIT`] host
//!   frames wait too (a host that sends without reading cannot grow the
//!   queue with replies). Below that, a `Signal` still gets through to a
//!   process whose output the host stopped reading.
//! - stdin bytes wait in a queue of at most [`STDIN_QUEUE_LIMIT`]; while it
//!   is full, host frames wait (the host's writes then block).
//!
//! Errors: a frame that does not decode or validate is answered with `Error`
//! and the session goes on; an oversized frame, a bad handshake, or no
//! `Hello` in time are answered with `Error` and the connection is closed
//! once it is flushed; EOF (even mid-frame) or a broken connection ends the
//! session at once. A process whose session ends before it exited is
//! SIGKILLed.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use agent_protocol::{AgentMessage, ErrorKind, FrameDecoder, MAX_TEXT, PROTOCOL_VERSION};
use nix::poll::{PollFd, PollFlags};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cgroup::Cgroups;
use crate::container::Containers;
use crate::process::ExecGate;
use crate::restore::RestoreOps;
use crate::shared_fs::SharedMount;
use crate::transport::Conn;

mod io;
mod lifecycle;
mod messages;

pub use io::OutQueue;

/// How long a connection may take to send its `Hello`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for stdout/stderr EOF after the process exited (a
/// background child may hold them open). Time during which the host is not
/// reading (the outbound queue is over its bound) does not count.
pub const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Longest drain after an exit, however slowly the host reads: bounds a
/// background child that keeps writing to the pipes.
pub const EXIT_DRAIN_MAX: Duration = Duration::from_secs(30);
/// How long a closing session waits for the host to read what is queued,
/// counted from the last write that made progress.
pub const CLOSE_LINGER: Duration = Duration::from_secs(30);
/// Most stdin bytes queued before the agent stops reading from the host.
pub const STDIN_QUEUE_LIMIT: usize = 1024 * 1024;
/// Outbound bytes above which the process's output is no longer read.
pub const OUTPUT_QUEUE_LIMIT: usize = 256 * 1024;
/// Outbound bytes above which host frames are no longer processed.
pub const QUEUE_HARD_LIMIT: usize = 512 * 1024;

/// State the sessions of one agent share.
#[derive(Debug)]
pub struct SessionContext<'a, R: RestoreOps> {
    /// Applies SyncTime / Reseed.
    pub restore: &'a mut R,
    /// Per-container mount points go here.
    pub state_dir: &'a Path,
    /// Number of the next container (names its state directory).
    pub next_id: u64,
    /// Every container and its processes.
    pub containers: Containers,
    /// The cgroup tree containers are put in, or why there is none.
    pub cgroups: Result<Cgroups, String>,
    /// The shared filesystem (`RunRequest::shared_fs`), once mounted.
    pub shared: SharedMount,
}

impl<'a, R: RestoreOps> SessionContext<'a, R> {
    /// A context with no container yet.
    pub fn new(restore: &'a mut R, state_dir: &'a Path, cgroups: Result<Cgroups, String>) -> Self {
        Self {
            restore,
            state_dir,
            next_id: 0,
            containers: Containers::new(),
            cgroups,
            shared: SharedMount::new(),
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The process ran and exited with this status (sent to the host).
    Exited(i32),
    /// The host closed the connection (or it broke) before any exit.
    Disconnected,
    /// The host broke the protocol; the agent said why and closed.
    ProtocolViolation,
    /// The host did not read what was queued for it in time.
    Stalled,
}

/// Which of a session's descriptors an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The host connection.
    Conn,
    /// The process's stdout (or pty master).
    Stdout,
    /// The process's stderr.
    Stderr,
    /// The process's stdin (or pty master), written from the queue.
    Stdin,
}

/// The session's process, created or running.
struct Proc {
    pid: Pid,
    stdin: Option<OwnedFd>,
    stdin_queue: Vec<u8>,
    stdin_close: bool,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    terminal: bool,
    exit: Option<Exit>,
}

#[derive(Debug, Clone, Copy)]
struct Exit {
    code: i32,
    /// When the drain gives up on stdout/stderr EOF (pushed back while the
    /// host is not reading).
    grace_end: Instant,
    /// When it gives up however slow the host is.
    hard_end: Instant,
}

enum Phase {
    Handshake,
    Idle,
    /// `Create` succeeded: the child finished set-up and waits for `Start`.
    Created(Box<Proc>, ExecGate),
    Running(Box<Proc>),
    /// The last message is queued: flush, then close.
    Closing(SessionEnd),
    /// Nothing more can be sent: close now.
    Gone(SessionEnd),
}

impl Phase {
    fn process(&self) -> Option<&Proc> {
        match self {
            Phase::Created(p, _) | Phase::Running(p) => Some(p),
            _ => None,
        }
    }

    fn process_mut(&mut self) -> Option<&mut Proc> {
        match self {
            Phase::Created(p, _) | Phase::Running(p) => Some(p),
            _ => None,
        }
    }
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

/// One host connection and its process.
pub struct Session {
    conn: Conn,
    decoder: FrameDecoder,
    out: OutQueue,
    phase: Phase,
    handshake_end: Instant,
    /// Complete host frames wait in the decoder: processing paused at a bound.
    backlog: bool,
    /// Last time a write to the host made progress (or the session began).
    last_progress: Instant,
    span: tracing::Span,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("conn", &self.conn)
            .field("queued", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session on a freshly accepted (non-blocking) connection; our
    /// `Hello` is queued at once.
    pub fn new(conn: Conn, number: u64) -> Self {
        let now = Instant::now();
        let mut out = OutQueue::default();
        out.push(&AgentMessage::Hello {
            version: PROTOCOL_VERSION,
        });
        Self {
            conn,
            decoder: FrameDecoder::new(),
            out,
            phase: Phase::Handshake,
            handshake_end: now + HANDSHAKE_TIMEOUT,
            backlog: false,
            last_progress: now,
            span: tracing::info_span!("session", n = number),
        }
    }

    /// The tracing span of this session (enter it around calls).
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Pid of the session's process while it has not been reaped.
    pub fn live_pid(&self) -> Option<Pid> {
        self.phase
            .process()
            .filter(|p| p.exit.is_none())
            .map(|p| p.pid)
    }

    /// Whether host frames are read and processed now.
    fn accepts_frames(&self) -> bool {
        let stdin_room = self
            .phase
            .process()
            .is_none_or(|p| p.stdin_queue.len() < STDIN_QUEUE_LIMIT);
        !matches!(self.phase, Phase::Closing(_) | Phase::Gone(_))
            && self.out.len() < QUEUE_HARD_LIMIT
            && stdin_room
    }

    /// Adds the descriptors to watch, tagged with `(index, slot)`.
    pub fn register<'a>(
        &'a self,
        index: usize,
        fds: &mut Vec<PollFd<'a>>,
        tags: &mut Vec<(usize, Slot)>,
    ) {
        if matches!(self.phase, Phase::Gone(_)) {
            return;
        }
        let mut conn = PollFlags::empty();
        if self.accepts_frames() && !self.backlog {
            conn |= PollFlags::POLLIN;
        }
        if !self.out.is_empty() {
            conn |= PollFlags::POLLOUT;
        }
        // Even with no flags, poll reports POLLHUP/POLLERR: a host gone
        // while nothing is exchanged is still noticed.
        fds.push(PollFd::new(self.conn.as_fd(), conn));
        tags.push((index, Slot::Conn));
        let Some(p) = self.phase.process() else {
            return;
        };
        if self.out.len() < OUTPUT_QUEUE_LIMIT {
            for (fd, slot) in [(&p.stdout, Slot::Stdout), (&p.stderr, Slot::Stderr)] {
                if let Some(fd) = fd {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    tags.push((index, slot));
                }
            }
        }
        if let Some(fd) = &p.stdin
            && !p.stdin_queue.is_empty()
        {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
            tags.push((index, Slot::Stdin));
        }
    }

    /// Handles readiness of one of the session's descriptors.
    pub fn on_event<R: RestoreOps>(
        &mut self,
        slot: Slot,
        events: PollFlags,
        ctx: &mut SessionContext<'_, R>,
    ) {
        if matches!(self.phase, Phase::Gone(_)) {
            return;
        }
        match slot {
            Slot::Conn => {
                if events.contains(PollFlags::POLLOUT) {
                    self.flush();
                }
                if matches!(self.phase, Phase::Gone(_)) {
                    return;
                }
                let hup = PollFlags::POLLHUP | PollFlags::POLLERR;
                if events.contains(PollFlags::POLLIN)
                    || (events.intersects(hup) && self.accepts_frames() && !self.backlog)
                {
                    self.read_host(ctx);
                } else if events.intersects(hup) {
                    tracing::info!("host connection closed");
                    self.end(SessionEnd::Disconnected, false);
                }
            }
            Slot::Stdout => self.relay_output(false),
            Slot::Stderr => self.relay_output(true),
            Slot::Stdin => self.write_stdin(),
        }
    }

    /// Records the exit of the session's process (the server reaped it).
    pub fn process_exited(&mut self, code: i32) {
        let Some(p) = self.phase.process_mut() else {
            return;
        };
        tracing::info!(pid = p.pid.as_raw(), code, "process exited");
        let now = Instant::now();
        p.exit = Some(Exit {
            code,
            grace_end: now + EXIT_DRAIN_GRACE,
            hard_end: now + EXIT_DRAIN_MAX,
        });
        // Keep reading output, but stop writing input.
        p.stdin_queue.clear();
        if !p.terminal {
            p.stdin = None;
        }
    }

    /// Time-driven work after the events of one loop turn: process host
    /// frames held back by a bound, send `Exited` once output is drained,
    /// enforce the handshake and linger timeouts.
    pub fn tick<R: RestoreOps>(&mut self, now: Instant, ctx: &mut SessionContext<'_, R>) {
        if self.backlog && self.accepts_frames() {
            self.process_frames(ctx);
        }
        match &mut self.phase {
            Phase::Handshake if now >= self.handshake_end => {
                tracing::warn!("no Hello within {HANDSHAKE_TIMEOUT:?}; closing");
                self.out
                    .push(&error(ErrorKind::Protocol, "no Hello received in time"));
                self.end(SessionEnd::ProtocolViolation, true);
            }
            Phase::Created(p, _) | Phase::Running(p) => {
                let Some(exit) = &mut p.exit else { return };
                if self.out.len() >= OUTPUT_QUEUE_LIMIT {
                    // The host is behind: the grace waits for it.
                    exit.grace_end = exit.grace_end.max(now + EXIT_DRAIN_GRACE);
                }
                let drained = p.stdout.is_none() && p.stderr.is_none();
                let code = exit.code;
                if drained || now >= exit.grace_end.min(exit.hard_end) {
                    if !drained {
                        tracing::warn!("output still open after the exit; not waiting longer");
                    }
                    self.out.push(&AgentMessage::Exited { code });
                    self.end(SessionEnd::Exited(code), true);
                }
            }
            Phase::Closing(_) if now.duration_since(self.last_progress) >= CLOSE_LINGER => {
                tracing::warn!(
                    queued = self.out.len(),
                    "the host read nothing for {CLOSE_LINGER:?}; closing"
                );
                self.end(SessionEnd::Stalled, false);
            }
            _ => {}
        }
        if let Phase::Closing(end) = self.phase
            && self.out.is_empty()
        {
            self.phase = Phase::Gone(end);
        }
    }

    /// The next instant [`Self::tick`] has work to do, if any.
    pub fn deadline(&self) -> Option<Instant> {
        if self.backlog && self.accepts_frames() {
            return Some(Instant::now());
        }
        match &self.phase {
            Phase::Handshake => Some(self.handshake_end),
            Phase::Created(p, _) | Phase::Running(p) => {
                let exit = p.exit?;
                if p.stdout.is_none() && p.stderr.is_none() {
                    Some(Instant::now())
                } else {
                    Some(exit.grace_end.min(exit.hard_end))
                }
            }
            Phase::Closing(_) if self.out.is_empty() => Some(Instant::now()),
            Phase::Closing(_) => Some(self.last_progress + CLOSE_LINGER),
            _ => None,
        }
    }

    /// How the session ended, once it has nothing more to do; the server
    /// then drops it (closing the connection).
    pub fn finished(&self) -> Option<SessionEnd> {
        match self.phase {
            Phase::Gone(end) => Some(end),
            _ => None,
        }
    }

    /// Ends the session: closing after a flush (`flush`), or at once. A
    /// process that has not exited is SIGKILLed; its exit is still reaped
    /// centrally (the container's bookkeeping sees it).
    fn end(&mut self, end: SessionEnd, flush: bool) {
        let next = if flush {
            Phase::Closing(end)
        } else {
            Phase::Gone(end)
        };
        let old = std::mem::replace(&mut self.phase, next);
        if let Some(p) = old.process()
            && p.exit.is_none()
        {
            tracing::warn!(
                pid = p.pid.as_raw(),
                ?end,
                "session ended with the process running; killing it"
            );
            let _ = kill(p.pid, Signal::SIGKILL);
        }
        // Dropping `old` closes the stdio ends and, for a created process,
        // the exec gate (the child then exits without exec).
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.live_pid().is_some() {
            self.end(SessionEnd::Disconnected, false);
        }
    }
}
