//! The stdio bridge between a host process and its process in the guest: the container's
//! supervisor (the init process) and `kata-snap exec` (one more process) both run one.
//!
//! The bridge owns one agent connection once its set-up (`Hello`, `Create` or `Exec`) is done
//! and turns it non-blocking: the caller's `poll(2)` loop asks it which events to wait for
//! ([`Bridge::agent_events`], [`Bridge::input_fd`]) and hands them back. Nothing here blocks on
//! the guest:
//! - messages to the agent (stdin, signals, resizes, `Start`) are queued and written when the
//!   connection is writable; while more than [`PENDING_LIMIT`] bytes wait, stdin is not read
//!   (the writer on the host side blocks: back-pressure, not memory);
//! - the agent's output is read whenever it arrives, so the agent can always drain its own
//!   queue and a process that floods its stdout while ours is slow cannot deadlock the two.
//!
//! Output goes to the process's host stdio: stdout and stderr, or the terminal. Writing it
//! waits for the host side (a slow reader slows the container, as with runc).

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use agent_protocol::{
    AgentMessage, ErrorKind, FrameDecoder, HostMessage, MAX_STDIO_CHUNK, decode_message,
    encode_message,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use thiserror::Error;

use super::console::HostTerminal;

/// Most bytes queued for the agent before stdin stops being read.
pub const PENDING_LIMIT: usize = 256 * 1024;

/// The agent's connection broke, or it sent something that is not the protocol.
#[derive(Debug, Error)]
pub enum BridgeError {
    /// The connection closed (or failed) before the process's exit status arrived.
    #[error("the agent closed its connection before the exit status")]
    Closed,
    /// A frame or message the protocol does not allow.
    #[error("bad message from the agent: {0}")]
    Protocol(String),
    /// Setting up the connection failed.
    #[error("cannot set up the agent connection: {0}")]
    Setup(#[from] std::io::Error),
}

/// What the agent said that the caller acts on (output is handled here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The process runs (an answer to `Start`).
    Started(u32),
    /// A request failed; for `Start` the exit status follows.
    Error(ErrorKind, String),
    /// The process ended with this status (128+N for signal N).
    Exited(i32),
}

/// Where the process's stdin comes from and its output goes.
#[derive(Debug)]
pub enum HostStdio {
    /// This process's own stdin, stdout and stderr.
    Inherited,
    /// A terminal.
    Terminal(HostTerminal),
}

impl HostStdio {
    /// The stdio of a process: with a terminal, a new pty whose master goes to `console_socket`
    /// (sized `size`), or the caller's stdin/stdout as runc does without a socket; else the
    /// caller's own stdio.
    pub fn new(
        terminal: bool,
        console_socket: Option<&std::path::Path>,
        size: Option<(u16, u16)>,
    ) -> anyhow::Result<Self> {
        if !terminal {
            return Ok(Self::Inherited);
        }
        Ok(Self::Terminal(match console_socket {
            Some(sock) => HostTerminal::for_console_socket(sock, size)?,
            None => HostTerminal::foreground()?,
        }))
    }
}

/// One process's bridge.
#[derive(Debug)]
pub struct Bridge {
    conn: UnixStream,
    decoder: FrameDecoder,
    pending: Vec<u8>,
    stdio: HostStdio,
    stdin: std::io::Stdin,
    /// The process runs: its stdin is read and sent on.
    started: bool,
    /// Stdin has not reached EOF.
    input_open: bool,
    exit: Option<i32>,
}

impl Bridge {
    /// Takes over `conn` (the agent's connection, set-up done) and makes it non-blocking.
    pub fn new(conn: UnixStream, stdio: HostStdio) -> Result<Self, BridgeError> {
        conn.set_nonblocking(true)?;
        Ok(Self {
            conn,
            decoder: FrameDecoder::new(),
            pending: Vec::new(),
            stdio,
            stdin: std::io::stdin(),
            started: false,
            input_open: true,
            exit: None,
        })
    }

    /// The terminal, if the process has one.
    pub fn terminal(&self) -> Option<&HostTerminal> {
        match &self.stdio {
            HostStdio::Terminal(t) => Some(t),
            HostStdio::Inherited => None,
        }
    }

    /// The exit status, once it arrived.
    pub fn exit(&self) -> Option<i32> {
        self.exit
    }

    /// From now on stdin is read and sent to the process.
    pub fn set_started(&mut self) {
        self.started = true;
    }

    /// Queues `msg` for the agent. A message that does not validate is a bug here, logged.
    pub fn send(&mut self, msg: &HostMessage) {
        match encode_message(msg) {
            Ok(frame) => self.pending.extend_from_slice(&frame),
            Err(e) => tracing::warn!("not sent to the agent: {e}"),
        }
        self.flush();
    }

    /// Forwards a signal the host process received: SIGWINCH becomes a resize of the
    /// terminal, SIGCHLD and SIGPIPE stay here, anything else goes to the process.
    pub fn forward_signal(&mut self, signo: i32) {
        match signo {
            libc::SIGCHLD | libc::SIGPIPE => {}
            libc::SIGWINCH => {
                if let Some((rows, cols)) = self.terminal().and_then(|t| t.size()) {
                    self.send(&HostMessage::Resize { rows, cols });
                }
            }
            _ => self.send(&HostMessage::Signal(signo)),
        }
    }

    /// The connection's fd and the events to wait for on it.
    pub fn agent_fd(&self) -> PollFd<'_> {
        let mut ev = PollFlags::POLLIN;
        if !self.pending.is_empty() {
            ev |= PollFlags::POLLOUT;
        }
        PollFd::new(self.conn.as_fd(), ev)
    }

    /// The input to wait on, when it should be read now.
    pub fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        if !self.started || !self.input_open || self.pending.len() >= PENDING_LIMIT {
            return None;
        }
        Some(match &self.stdio {
            HostStdio::Terminal(t) => t.input.as_fd(),
            HostStdio::Inherited => self.stdin.as_fd(),
        })
    }

    /// Handles what `poll` said of the connection: writes what is queued, reads what arrived,
    /// writes output, and returns the events for the caller in order.
    pub fn on_agent(&mut self, revents: PollFlags) -> Result<Vec<AgentEvent>, BridgeError> {
        if revents.contains(PollFlags::POLLOUT) {
            self.flush();
        }
        let mut events = Vec::new();
        if !revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            return Ok(events);
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.conn.read(&mut buf) {
                Ok(0) => {
                    self.drain(&mut events)?;
                    return if self.exit.is_some() {
                        Ok(events)
                    } else {
                        Err(BridgeError::Closed)
                    };
                }
                Ok(n) => {
                    self.decoder.feed(&buf[..n]);
                    self.drain(&mut events)?;
                    if self.exit.is_some() {
                        return Ok(events);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(events),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(BridgeError::Closed),
            }
        }
    }

    fn drain(&mut self, events: &mut Vec<AgentEvent>) -> Result<(), BridgeError> {
        while let Some(frame) = self
            .decoder
            .next_frame()
            .map_err(|e| BridgeError::Protocol(e.to_string()))?
        {
            let msg: AgentMessage =
                decode_message(&frame).map_err(|e| BridgeError::Protocol(e.to_string()))?;
            match msg {
                AgentMessage::Stdout(b) => self.output(false, &b),
                AgentMessage::Stderr(b) => self.output(true, &b),
                AgentMessage::Started { pid } => events.push(AgentEvent::Started(pid)),
                AgentMessage::Error { kind, message } => {
                    events.push(AgentEvent::Error(kind, message))
                }
                AgentMessage::Exited { code } => {
                    self.exit = Some(code);
                    events.push(AgentEvent::Exited(code));
                    return Ok(());
                }
                other => tracing::debug!("agent: {other:?}"),
            }
        }
        Ok(())
    }

    fn output(&self, stderr: bool, bytes: &[u8]) {
        let res = match &self.stdio {
            HostStdio::Terminal(t) => write_all_fd(t.output.as_fd(), bytes),
            HostStdio::Inherited if stderr => write_all_fd(std::io::stderr().as_fd(), bytes),
            HostStdio::Inherited => write_all_fd(std::io::stdout().as_fd(), bytes),
        };
        if let Err(e) = res {
            tracing::debug!("writing the process's output: {e}");
        }
    }

    /// Reads stdin (or the terminal) once and queues it; EOF sends `CloseStdin`.
    pub fn on_input(&mut self) {
        let mut buf = vec![0u8; MAX_STDIO_CHUNK];
        let read = match &self.stdio {
            HostStdio::Terminal(t) => nix::unistd::read(t.input.as_fd(), &mut buf),
            HostStdio::Inherited => nix::unistd::read(self.stdin.as_fd(), &mut buf),
        };
        let n = match read {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => return,
            // EIO: a terminal whose other side closed. Anything else: no more input either.
            Err(_) => 0,
        };
        if n == 0 {
            tracing::debug!("stdin closed: closing the process's stdin");
            self.input_open = false;
            self.send(&HostMessage::CloseStdin);
            return;
        }
        tracing::trace!("{n} bytes of stdin");
        buf.truncate(n);
        self.send(&HostMessage::Stdin(buf));
    }

    /// Writes what the connection takes now, without waiting.
    fn flush(&mut self) {
        while !self.pending.is_empty() {
            match nix::unistd::write(&self.conn, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => {
                    // The connection is gone; the read side reports it.
                    tracing::debug!("writing to the agent: {e}");
                    self.pending.clear();
                    return;
                }
            }
        }
    }
}

/// Writes all of `bytes` to `fd`, waiting for it to take them (a non-blocking pipe included).
pub fn write_all_fd(fd: BorrowedFd<'_>, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_protocol::{read_message, write_message};

    fn pair() -> (Bridge, UnixStream) {
        let (ours, agent) = UnixStream::pair().unwrap();
        (Bridge::new(ours, HostStdio::Inherited).unwrap(), agent)
    }

    fn wait(b: &Bridge) -> PollFlags {
        let mut fds = [b.agent_fd()];
        poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
        fds[0].revents().unwrap()
    }

    #[test]
    fn test_bridge_events_in_order_then_exit_ends_reading() {
        let (mut b, mut agent) = pair();
        for m in [
            AgentMessage::Started { pid: 7 },
            AgentMessage::Error {
                kind: ErrorKind::ExecFailed,
                message: "x".into(),
            },
            AgentMessage::Exited { code: 3 },
        ] {
            write_message(&mut agent, &m).unwrap();
        }
        drop(agent);
        let mut events = Vec::new();
        while b.exit().is_none() {
            let ev = wait(&b);
            events.extend(b.on_agent(ev).unwrap());
        }
        assert_eq!(
            events,
            [
                AgentEvent::Started(7),
                AgentEvent::Error(ErrorKind::ExecFailed, "x".into()),
                AgentEvent::Exited(3)
            ]
        );
    }

    #[test]
    fn test_bridge_connection_closed_before_exit_is_an_error() {
        let (mut b, agent) = pair();
        drop(agent);
        let ev = wait(&b);
        assert!(matches!(b.on_agent(ev), Err(BridgeError::Closed)));
    }

    #[test]
    fn test_bridge_garbage_from_agent_is_a_protocol_error() {
        let (mut b, mut agent) = pair();
        std::io::Write::write_all(&mut agent, &[0xff; 8]).unwrap();
        let ev = wait(&b);
        assert!(matches!(b.on_agent(ev), Err(BridgeError::Protocol(_))));
    }

    #[test]
    fn test_bridge_send_never_blocks_and_stops_input_past_the_limit() {
        let (mut b, mut agent) = pair();
        b.set_started();
        assert!(b.input_fd().is_some());
        // Nobody reads the agent's end: the socket buffer fills, the rest is queued.
        for _ in 0..((4 * PENDING_LIMIT) / MAX_STDIO_CHUNK) {
            b.send(&HostMessage::Stdin(vec![b'x'; MAX_STDIO_CHUNK]));
        }
        assert!(b.pending.len() >= PENDING_LIMIT, "{}", b.pending.len());
        assert!(
            b.input_fd().is_none(),
            "stdin must not be read past the limit"
        );
        // Once the agent reads, everything arrives, in order, intact.
        let reader = std::thread::spawn(move || {
            let mut n = 0;
            while n < 4 * PENDING_LIMIT {
                match read_message::<HostMessage>(&mut agent).unwrap() {
                    HostMessage::Stdin(c) => {
                        assert!(c.iter().all(|&x| x == b'x'));
                        n += c.len();
                    }
                    other => panic!("{other:?}"),
                }
            }
            n
        });
        while !b.pending.is_empty() {
            let ev = wait(&b);
            b.on_agent(ev & PollFlags::POLLOUT).unwrap();
        }
        assert_eq!(reader.join().unwrap(), 4 * PENDING_LIMIT);
        assert!(b.input_fd().is_some());
    }

    #[test]
    fn test_bridge_signals_forwarded_except_child_and_pipe() {
        let (mut b, mut agent) = pair();
        b.forward_signal(libc::SIGCHLD);
        b.forward_signal(libc::SIGPIPE);
        b.forward_signal(libc::SIGWINCH); // no terminal: nothing to resize
        b.forward_signal(libc::SIGTERM);
        agent
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            read_message::<HostMessage>(&mut agent).unwrap(),
            HostMessage::Signal(libc::SIGTERM)
        );
    }
}
