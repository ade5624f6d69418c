//! The session's non-blocking I/O: the outbound queue and its writes to the
//! host, reads of host frames, the process's output and its stdin.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};

use agent_protocol::{AgentMessage, ErrorKind, MAX_STDIO_CHUNK, encode_message};

use super::{Phase, Session, SessionContext, SessionEnd, error};
use crate::restore::RestoreOps;

/// Most bytes read from the host connection at once.
const HOST_READ_CHUNK: usize = 64 * 1024;

/// Encoded frames waiting for the host to read them.
#[derive(Debug, Default)]
pub struct OutQueue {
    frames: VecDeque<Vec<u8>>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// Bytes queued and not yet written.
    len: usize,
}

impl OutQueue {
    /// Queues `msg`. A message that does not encode is an agent bug: logged
    /// and dropped.
    pub fn push(&mut self, msg: &AgentMessage) {
        match encode_message(msg) {
            Ok(frame) => {
                self.len += frame.len();
                self.frames.push_back(frame);
            }
            Err(e) => tracing::error!(error = %e, ?msg, "cannot encode a message for the host"),
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes as much as `fd` takes without blocking; returns the number of
    /// bytes written, or the error that broke the connection.
    pub fn write_to(&mut self, fd: BorrowedFd<'_>) -> nix::Result<usize> {
        let mut total = 0;
        while let Some(front) = self.frames.front() {
            match nix::unistd::write(fd, &front[self.offset..]) {
                Ok(n) => {
                    total += n;
                    self.len -= n;
                    self.offset += n;
                    if self.offset == front.len() {
                        self.frames.pop_front();
                        self.offset = 0;
                    }
                }
                Err(nix::Error::EINTR) => {}
                Err(nix::Error::EAGAIN) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(total)
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

impl Session {
    /// Writes what the connection takes; a broken connection ends the
    /// session.
    pub(super) fn flush(&mut self) {
        match self.out.write_to(self.conn.as_fd()) {
            Ok(0) => {}
            Ok(_) => self.last_progress = std::time::Instant::now(),
            Err(e) => {
                tracing::info!(error = %e, "host connection broken");
                self.end(SessionEnd::Disconnected, false);
            }
        }
    }

    /// Reads what the host sent and processes the complete frames.
    pub(super) fn read_host<R: RestoreOps>(&mut self, ctx: &mut SessionContext<'_, R>) {
        let mut buf = vec![0u8; HOST_READ_CHUNK];
        let n = match nix::unistd::read(self.conn.as_fd(), &mut buf) {
            Ok(n) => n,
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => return,
            Err(e) => {
                tracing::info!(error = %e, "connection read failed");
                self.end(SessionEnd::Disconnected, false);
                return;
            }
        };
        if n == 0 {
            if let Err(e) = self.decoder.finish() {
                tracing::warn!(error = %e, "host closed the connection mid-frame");
            } else {
                tracing::info!("host closed the connection");
            }
            self.end(SessionEnd::Disconnected, false);
            return;
        }
        self.decoder.feed(&buf[..n]);
        self.process_frames(ctx);
    }

    /// Handles complete frames while the bounds allow; the rest waits
    /// (`backlog`) until the queues drain.
    pub(super) fn process_frames<R: RestoreOps>(&mut self, ctx: &mut SessionContext<'_, R>) {
        loop {
            if !self.accepts_frames() {
                self.backlog = !matches!(self.phase, Phase::Closing(_) | Phase::Gone(_));
                return;
            }
            match self.decoder.next_frame() {
                Ok(None) => {
                    self.backlog = false;
                    return;
                }
                Ok(Some(payload)) => self.handle_frame(&payload, ctx),
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame; closing");
                    self.out.push(&error(ErrorKind::Protocol, e.to_string()));
                    self.end(SessionEnd::ProtocolViolation, true);
                    self.backlog = false;
                    return;
                }
            }
        }
    }

    /// Relays one chunk of the process's stdout or stderr.
    pub(super) fn relay_output(&mut self, is_stderr: bool) {
        let Some(p) = self.phase.process_mut() else {
            return;
        };
        let slot = if is_stderr {
            &mut p.stderr
        } else {
            &mut p.stdout
        };
        let Some(fd) = slot.as_ref() else {
            return;
        };
        match read_chunk(fd.as_fd()) {
            None => {}
            Some(None) => *slot = None,
            Some(Some(bytes)) => self.out.push(&if is_stderr {
                AgentMessage::Stderr(bytes)
            } else {
                AgentMessage::Stdout(bytes)
            }),
        }
    }

    /// Writes queued stdin bytes the pipe (or terminal) takes; closes the
    /// pipe once `CloseStdin` came and everything before it is written.
    pub(super) fn write_stdin(&mut self) {
        let Phase::Running(p) = &mut self.phase else {
            return;
        };
        let Some(fd) = &p.stdin else { return };
        match nix::unistd::write(fd, &p.stdin_queue) {
            Ok(n) => {
                p.stdin_queue.drain(..n);
            }
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => {}
            Err(e) => {
                tracing::debug!(error = %e, "stdin closed by the process");
                p.stdin_queue.clear();
                p.stdin = None;
            }
        }
        if p.stdin_queue.is_empty() && p.stdin_close && !p.terminal {
            p.stdin = None;
        }
    }
}
