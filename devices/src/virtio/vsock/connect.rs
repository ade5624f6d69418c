//! Connecting to a host Unix socket without blocking the event loop.
//!
//! A guest connection to host port P connects to `<uds_path>_<P>`. A blocking `connect` there
//! would stop the whole loop (every device, the control socket) for as long as the listener's
//! backlog is full and nobody accepts, which a guest can arrange. So the socket is non-blocking:
//! on Linux a Unix stream `connect` then fails with `EAGAIN` while the backlog is full (there is
//! no "in progress" state to poll for), and the attempt is repeated on a timer until it succeeds,
//! fails, or the caller's deadline passes.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};

/// Delay before the first retry of an attempt that had to wait; it doubles after each attempt
/// that waits again, up to [`MAX_RETRY_DELAY`], so a guest that keeps many connections waiting
/// costs the loop few `connect` calls.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(10);
/// Longest delay between two attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_millis(200);

/// A non-blocking connection attempt to a Unix stream socket.
#[derive(Debug)]
pub struct HostConnect {
    fd: OwnedFd,
    addr: UnixAddr,
    /// When the first attempt was made.
    pub since: Instant,
    /// No attempt before this.
    next_attempt: Instant,
    /// The delay after the next attempt that waits.
    delay: Duration,
}

/// A guest connection request whose host listener had no room in its backlog yet.
#[derive(Debug)]
pub struct PendingGuest {
    /// The attempt.
    pub connect: HostConnect,
    /// The guest's `buf_alloc` from its REQUEST.
    pub buf_alloc: u32,
    /// The guest's `fwd_cnt` from its REQUEST.
    pub fwd_cnt: u32,
}

/// The outcome of one attempt.
#[derive(Debug)]
pub enum Attempt {
    /// Connected.
    Connected,
    /// The listener's backlog is full (or the connection is still being set up): try again later.
    Wait,
    /// Refused, no such socket, or another error: give up.
    Failed(io::Error),
}

impl HostConnect {
    /// A non-blocking socket for `path` (not connected yet); fails on a path too long for a
    /// socket address or when no socket can be created.
    pub fn new(path: &Path) -> io::Result<Self> {
        let addr = UnixAddr::new(path)?;
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let now = Instant::now();
        Ok(Self {
            fd,
            addr,
            since: now,
            next_attempt: now,
            delay: FIRST_RETRY_DELAY,
        })
    }

    /// Whether the next attempt is due at `now` (backing off after each attempt that waited).
    pub fn is_due(&self, now: Instant) -> bool {
        now >= self.next_attempt
    }

    /// Tries to connect, without blocking.
    pub fn attempt(&mut self) -> Attempt {
        loop {
            return match socket::connect(self.fd.as_raw_fd(), &self.addr) {
                // EISCONN: an earlier attempt that was in progress has completed.
                Ok(()) | Err(Errno::EISCONN) => Attempt::Connected,
                Err(Errno::EAGAIN | Errno::EINPROGRESS | Errno::EALREADY) => {
                    self.next_attempt = Instant::now() + self.delay;
                    self.delay = (self.delay * 2).min(MAX_RETRY_DELAY);
                    Attempt::Wait
                }
                Err(Errno::EINTR) => continue,
                Err(e) => Attempt::Failed(e.into()),
            };
        }
    }

    /// The connected stream (non-blocking).
    pub fn into_stream(self) -> UnixStream {
        UnixStream::from(self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn test_host_connect_listening_socket_connects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let _l = UnixListener::bind(&path).unwrap();
        let mut c = HostConnect::new(&path).unwrap();
        assert!(matches!(c.attempt(), Attempt::Connected));
    }

    #[test]
    fn test_host_connect_missing_socket_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = HostConnect::new(&dir.path().join("none")).unwrap();
        assert!(matches!(c.attempt(), Attempt::Failed(_)));
    }

    #[test]
    fn test_host_connect_path_too_long_is_refused() {
        let long = std::path::PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert!(HostConnect::new(&long).is_err());
    }

    #[test]
    fn test_host_connect_full_backlog_waits_then_connects_after_accept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let (listener, fill) = super::super::tests::full_backlog_listener(&path);
        let mut c = HostConnect::new(&path).unwrap();
        assert!(c.is_due(Instant::now()));
        assert!(matches!(c.attempt(), Attempt::Wait));
        assert!(!c.is_due(Instant::now()), "backs off after waiting");
        assert!(c.is_due(Instant::now() + MAX_RETRY_DELAY));
        // Room in the backlog: the next attempt connects.
        let _first = listener.accept().unwrap();
        assert!(matches!(c.attempt(), Attempt::Connected));
        drop(fill);
    }
}
