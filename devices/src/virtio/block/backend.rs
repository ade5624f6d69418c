//! The disk behind a virtio-blk device, and the two ways of doing its I/O: io_uring operations on
//! the VMM's event loop, or plain synchronous `preadv`/`pwritev` (kept for comparison).
//!
//! Both do zero-copy I/O straight into the guest's buffers: every buffer was checked to lie in one
//! guest memory region by the chain validation, so it maps to one host `iovec`.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::request::{Request, RequestKind, SECTOR_SIZE};
use crate::virtio::chain::Desc;

/// How a disk's I/O is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// io_uring operations on the event loop (asynchronous, many in flight).
    #[default]
    IoUring,
    /// Blocking `preadv`/`pwritev` on the loop thread, one request at a time.
    Sync,
}

/// A backing file.
#[derive(Debug)]
pub struct Disk {
    file: File,
    /// Capacity in 512-byte sectors (a partial last sector is not exposed).
    pub sectors: u64,
    /// Whether the file supports punching holes (discard / write-zeroes offered).
    pub discard: bool,
}

impl Disk {
    /// Wraps `file`, reading its size and probing hole punching (unless `read_only`).
    pub fn new(file: File, read_only: bool) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let discard = !read_only && probe_punch_hole(&file, len);
        Ok(Self {
            file,
            sectors: len / SECTOR_SIZE,
            discard,
        })
    }

    /// An absent disk: an empty spare slot.
    pub fn empty() -> std::io::Result<Self> {
        Ok(Self {
            file: File::open("/dev/null")?,
            sectors: 0,
            discard: false,
        })
    }

    /// The file's descriptor.
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// Punching a hole past the end of the file changes nothing and tells whether the filesystem
/// supports it.
fn probe_punch_hole(file: &File, len: u64) -> bool {
    // SAFETY: fallocate on a valid fd with plain integer arguments; KEEP_SIZE and an offset at
    // the end of the file leave its contents and size unchanged.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            len as libc::off_t,
            SECTOR_SIZE as libc::off_t,
        )
    };
    r == 0
}

/// Host `iovec`s for the data buffers of a request. `None` when a buffer is not in guest memory
/// (cannot happen for validated chains; checked again since it guards raw pointers).
pub fn iovecs(mem: &GuestMemoryMmap, descs: &[Desc]) -> Option<Vec<libc::iovec>> {
    descs
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| {
            let s = mem.get_slice(d.addr, d.len as usize).ok()?;
            Some(libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
        })
        .collect()
}

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// Performs `req` synchronously. Returns the syscall's result: bytes, 0, or `-errno`.
pub fn execute_sync(disk: &Disk, req: &Request, iov: &[libc::iovec]) -> i64 {
    let off = (req.sector * SECTOR_SIZE) as libc::off_t;
    let fd = disk.fd();
    let r = match req.kind {
        // SAFETY: the iovecs point into guest memory regions kept mapped by the caller for the
        // duration of the call, each inside one region; fd is valid.
        RequestKind::Read => unsafe { libc::preadv(fd, iov.as_ptr(), iov.len() as i32, off) },
        // SAFETY: as above.
        RequestKind::Write => unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, off) },
        // SAFETY: plain syscall on a valid fd.
        RequestKind::Flush => unsafe { libc::fsync(fd) as isize },
        RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } => {
            // SAFETY: plain syscall on a valid fd with integer arguments.
            unsafe { libc::fallocate(fd, PUNCH, off, req.len as libc::off_t) as isize }
        }
        RequestKind::GetId => 0,
    };
    if r < 0 {
        -i64::from(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    } else {
        r as i64
    }
}

/// The io_uring operation for `req`; `None` for requests answered without I/O (get-id).
/// `iov` must stay where it is until the operation completes.
pub fn uring_entry(disk: &Disk, req: &Request, iov: &[libc::iovec]) -> Option<squeue::Entry> {
    let off = req.sector * SECTOR_SIZE;
    let fd = types::Fd(disk.fd());
    Some(match req.kind {
        RequestKind::Read => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
            .offset(off)
            .build(),
        RequestKind::Write => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
            .offset(off)
            .build(),
        RequestKind::Flush => opcode::Fsync::new(fd).build(),
        RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } => {
            opcode::Fallocate::new(fd, req.len)
                .offset(off)
                .mode(PUNCH)
                .build()
        }
        RequestKind::GetId => return None,
    })
}
