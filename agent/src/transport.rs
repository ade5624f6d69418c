//! Listening sockets: AF_VSOCK in the VM, a Unix socket in the harness.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept4, bind, listen, socket,
};
use thiserror::Error;

use crate::config::Listen;

/// Errors of setting up the listener.
#[derive(Debug, Error)]
pub enum ListenError {
    /// Creating, binding or listening on a vsock socket failed.
    #[error("cannot listen on vsock port {port}: {source}")]
    Vsock {
        /// Port.
        port: u32,
        /// Cause.
        source: nix::Error,
    },
    /// Binding the Unix socket failed.
    #[error("cannot listen on unix socket {path}: {source}")]
    Unix {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// A listening socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Binds and listens on `addr`.
    pub fn bind(addr: &Listen) -> Result<Self, ListenError> {
        match addr {
            Listen::Vsock(port) => {
                let port = *port;
                let err = |source| ListenError::Vsock { port, source };
                let fd = socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .map_err(err)?;
                bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port)).map_err(err)?;
                set_nonblocking(&fd).map_err(err)?;
                listen(&fd, Backlog::new(16).map_err(err)?).map_err(err)?;
                Ok(Self { fd })
            }
            Listen::Unix(path) => {
                let err = |source| ListenError::Unix {
                    path: path.clone(),
                    source,
                };
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(err(e)),
                }
                let l = UnixListener::bind(path).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                Ok(Self {
                    fd: OwnedFd::from(l),
                })
            }
        }
    }

    /// Takes the next pending connection without blocking (`None` when
    /// there is none). The connection is non-blocking and close-on-exec.
    pub fn accept(&self) -> io::Result<Option<Conn>> {
        loop {
            match accept4(
                self.fd.as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                    return Ok(Some(Conn(owned)));
                }
                Err(nix::Error::EINTR) | Err(nix::Error::ECONNABORTED) => continue,
                Err(nix::Error::EAGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// One accepted connection (vsock or Unix), non-blocking, read and written
/// with plain `read(2)`/`write(2)`.
#[derive(Debug)]
pub struct Conn(pub OwnedFd);

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(&self.0, buf)?)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(&self.0, buf)?)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
