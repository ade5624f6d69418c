//! The host side of a virtio-net device: a tap (`/dev/net/tun` with IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR, the virtio-net header passed through), or for tests and benchmarks one end of a
//! datagram socket pair, which keeps frame boundaries the way a tap does and needs no root.
//!
//! Both are read and written with plain non-blocking `read(2)`/`write(2)` from the event loop
//! once an io_uring poll says the fd is ready; one call moves one frame.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::VNET_HDR_LEN;

/// Errors setting up a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long for an interface name, or holds a NUL byte.
    #[error("invalid tap name {0:?} (1 to 15 bytes, no NUL)")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    /// An ioctl on the tap failed.
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        /// The interface, if known.
        name: String,
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tap fd handed over was not opened as the device needs.
    #[error(
        "tap {name}: opened without {missing} (a tap for virtio-net needs IFF_TAP | IFF_NO_PI | \
         IFF_VNET_HDR)"
    )]
    Flags {
        /// The interface.
        name: String,
        /// The flag it lacks (or `IFF_TAP` for a tun).
        missing: &'static str,
    },
    /// Setting the fd non-blocking failed.
    #[error("tap {name}: cannot make the fd non-blocking: {source}")]
    NonBlocking {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What a backend is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    /// A tap interface of this name.
    Tap(String),
    /// One end of a datagram socket pair (tests, benchmarks): each datagram is one frame,
    /// virtio-net header first.
    Datagram,
}

/// A virtio-net backend: one frame per `read`/`write`, each starting with the 12-byte
/// virtio-net header.
#[derive(Debug)]
pub struct Backend {
    file: File,
    kind: BackendKind,
    /// The offloads (`TUN_F_*`) the tap may use on frames it gives us.
    offload: u32,
}

/// An `ifreq` holding `name` (NUL-terminated) and `flags`.
fn ifreq(name: &str, flags: i32) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::Name(name.to_string()));
    }
    // SAFETY: `ifreq` is a C struct of integers, arrays and unions of them: all zeroes is a valid
    // value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    Ok(req)
}

fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Opens (or creates) the tap `name` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, non-blocking and
/// close-on-exec, in the calling thread's network namespace. Creating a tap needs CAP_NET_ADMIN;
/// opening one that exists needs only to be its owner.
pub fn open_tap_fd(name: &str) -> Result<OwnedFd, TapError> {
    let mut req = ifreq(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)?;
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    // SAFETY: TUNSETIFF reads (and writes back the name into) the `ifreq` we own, which lives
    // across the call; the fd is ours.
    let rc = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(TapError::Ioctl {
            name: name.to_string(),
            what: "TUNSETIFF",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file.into())
}

const REQUIRED_FLAGS: [(i32, &str); 3] = [
    (libc::IFF_TAP, "IFF_TAP"),
    (libc::IFF_NO_PI, "IFF_NO_PI"),
    (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
];

impl Backend {
    /// Opens (or creates) the tap `name` ([`open_tap_fd`]) and prepares it
    /// ([`Backend::from_tap_fd`]).
    pub fn open_tap(name: &str) -> Result<Self, TapError> {
        Self::from_tap_fd(open_tap_fd(name)?)
    }

    /// Adopts a tap fd opened by someone else (the runtime opens it inside the container's
    /// network namespace): checks it is a tap with IFF_NO_PI and IFF_VNET_HDR, sets the
    /// virtio-net header size to 12 bytes, no offloads (until a driver acks some), non-blocking.
    pub fn from_tap_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let file = File::from(fd);
        // SAFETY: all zeroes is a valid `ifreq` (see `ifreq`).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes an `ifreq` into the one we own; the fd is ours.
        let rc = unsafe { ioctl_with_mut_ref(&file, libc::TUNGETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: format!("fd {}", file.as_raw_fd()),
                what: "TUNGETIFF (is it a tap?)",
                source: std::io::Error::last_os_error(),
            });
        }
        let name = ifreq_name(&req);
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        if let Some((_, missing)) = REQUIRED_FLAGS.iter().find(|(f, _)| flags & f == 0) {
            return Err(TapError::Flags { name, missing });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the reference we pass; the fd is ours.
        let rc = unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &hdr_len) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name,
                what: "TUNSETVNETHDRSZ",
                source: std::io::Error::last_os_error(),
            });
        }
        set_nonblocking(file.as_fd()).map_err(|source| TapError::NonBlocking {
            name: name.clone(),
            source,
        })?;
        let mut backend = Self {
            file,
            kind: BackendKind::Tap(name),
            offload: 0,
        };
        backend.set_offload(0).map_err(|source| TapError::Ioctl {
            name: backend.name().to_string(),
            what: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(backend)
    }

    /// One end of a datagram socket pair as a backend (made non-blocking).
    pub fn datagram(fd: OwnedFd) -> std::io::Result<Self> {
        set_nonblocking(fd.as_fd())?;
        Ok(Self {
            file: File::from(fd),
            kind: BackendKind::Datagram,
            offload: 0,
        })
    }

    /// What this backend is.
    pub fn kind(&self) -> &BackendKind {
        &self.kind
    }

    /// The tap's name (or "datagram"), for logs.
    pub fn name(&self) -> &str {
        match &self.kind {
            BackendKind::Tap(n) => n,
            BackendKind::Datagram => "datagram",
        }
    }

    /// The offloads (`TUN_F_*`) in force.
    pub fn offload(&self) -> u32 {
        self.offload
    }

    /// Tells the tap which offloads (`TUN_F_*`) the reader accepts: frames with partial
    /// checksums, TSO or UFO super-frames. A datagram backend only records them.
    pub fn set_offload(&mut self, flags: u32) -> std::io::Result<()> {
        if let BackendKind::Tap(_) = self.kind {
            // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is ours.
            let rc = unsafe {
                ioctl_with_val(&self.file, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags))
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        self.offload = flags;
        Ok(())
    }

    /// Reads one frame (header first) into `buf`; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header first).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

/// Whether an error of a read or write means "try again when the fd is ready".
pub(super) fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ifreq_refuses_bad_names() {
        assert!(matches!(ifreq("", 0), Err(TapError::Name(_))));
        assert!(matches!(
            ifreq("0123456789abcdef", 0),
            Err(TapError::Name(_))
        ));
        assert!(matches!(ifreq("a\0b", 0), Err(TapError::Name(_))));
        let r = ifreq("ksn-tap0", libc::IFF_TAP).unwrap();
        assert_eq!(ifreq_name(&r), "ksn-tap0");
    }

    #[test]
    fn test_from_tap_fd_refuses_a_non_tap() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let err = Backend::from_tap_fd(OwnedFd::from(a)).unwrap_err();
        assert!(matches!(err, TapError::Ioctl { what, .. } if what.starts_with("TUNGETIFF")));
    }
}
