//! Where the pages of a lazily restored guest come from, and how each install is answered.
//!
//! A [`PageSource`] knows, for every page of guest memory, how it is installed ([`InstallOp`]: a
//! copy of data, a zero page, or later a CONTINUE of a page already in a shared template) and
//! installs runs of pages through the userfaultfd. Every install ioctl, whatever the op, is
//! classified by [`classify`] into one [`Resolved`] answer:
//!
//! | ioctl result | answer |
//! | --- | --- |
//! | success, whole length | [`Resolved::Served`] |
//! | `EEXIST` (another path installed a page of the run first) | [`Resolved::AlreadyThere`]: wake the waiter |
//! | `EAGAIN`, or a partial install (the mapping changed under us) | [`Resolved::Retry`] |
//! | anything else | an error: the server stops, the faulting vCPUs stay parked |
//!
//! [`FileSource`] serves the memory file with its hole map; its batched reads for the prefetcher
//! go through one io_uring.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use io_uring::register::Restriction;
use io_uring::{IoUring, opcode, types};
use userfaultfd::Uffd;

use crate::PAGE_SIZE;
use crate::memory::HoleMap;
use crate::page_server::PageServerError;

/// How a guest memory mapping is registered with userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Not at all: the memory is complete when mapped (eager, mmap).
    None,
    /// MISSING faults: every page is installed by the page server (UFFDIO_COPY / ZEROPAGE).
    Missing,
    /// MINOR faults: the pages exist in a shared mapping and are mapped in with UFFDIO_CONTINUE
    /// (the shared-template source).
    Minor,
}

/// The ioctl that installs a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallOp {
    /// UFFDIO_COPY of data.
    Copy,
    /// UFFDIO_ZEROPAGE (a hole of the memory file).
    ZeroPage,
    /// UFFDIO_CONTINUE (a page already in the shared backing).
    Continue,
}

impl std::fmt::Display for InstallOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InstallOp::Copy => "UFFDIO_COPY",
            InstallOp::ZeroPage => "UFFDIO_ZEROPAGE",
            InstallOp::Continue => "UFFDIO_CONTINUE",
        })
    }
}

/// The answer to one install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// Installed; the waiters are woken.
    Served(InstallOp),
    /// A page of the run was there already (EEXIST): nothing installed past it; wake only.
    AlreadyThere,
    /// Try again (EAGAIN, or only part of the run was installed).
    Retry,
}

/// Classifies the result of one install ioctl of `len` bytes: the same rules for COPY, ZEROPAGE
/// and CONTINUE.
pub fn classify(
    op: InstallOp,
    len: usize,
    result: Result<u64, userfaultfd::Error>,
) -> Result<Resolved, PageServerError> {
    use userfaultfd::Error as E;
    let errno = match result {
        Ok(n) if n as usize >= len => return Ok(Resolved::Served(op)),
        Ok(_) => return Ok(Resolved::Retry),
        Err(E::PartiallyCopied(_)) => return Ok(Resolved::Retry),
        Err(E::CopyFailed(e)) | Err(E::ZeropageFailed(e)) | Err(E::SystemError(e)) => e as i32,
        Err(other) => {
            return Err(PageServerError::Install {
                op,
                source: std::io::Error::other(other.to_string()),
            });
        }
    };
    match errno {
        libc::EEXIST => Ok(Resolved::AlreadyThere),
        libc::EAGAIN => Ok(Resolved::Retry),
        _ => Err(PageServerError::Install {
            op,
            source: std::io::Error::from_raw_os_error(errno),
        }),
    }
}

/// UFFDIO_COPY of `data` to `host`, classified.
///
/// # Safety
/// `host..host + data.len()` must lie inside a mapping registered with `uffd` for MISSING faults.
pub unsafe fn copy(uffd: &Uffd, host: usize, data: &[u8]) -> Result<Resolved, PageServerError> {
    // SAFETY: the caller guarantees the destination; `data` is a live buffer of its length.
    let r = unsafe {
        uffd.copy(
            data.as_ptr().cast(),
            host as *mut libc::c_void,
            data.len(),
            true,
        )
    };
    classify(InstallOp::Copy, data.len(), r.map(|n| n as u64))
}

/// UFFDIO_ZEROPAGE of `len` bytes at `host`, classified.
///
/// # Safety
/// As [`copy`].
pub unsafe fn zeropage(uffd: &Uffd, host: usize, len: usize) -> Result<Resolved, PageServerError> {
    // SAFETY: the caller guarantees the destination.
    let r = unsafe { uffd.zeropage(host as *mut libc::c_void, len, true) };
    classify(InstallOp::ZeroPage, len, r.map(|n| n as u64))
}

/// UFFDIO_CONTINUE of `len` bytes at `host`, classified.
pub fn continue_at(uffd: &Uffd, host: usize, len: usize) -> Result<Resolved, PageServerError> {
    let r = uffd.r#continue(host as *mut libc::c_void, len, true);
    classify(InstallOp::Continue, len, r)
}

/// What [`PageSource::read_runs`] calls with each run's data: the run's index and its bytes.
pub type RunSink<'a> = dyn FnMut(usize, &[u8]) -> Result<(), PageServerError> + 'a;

/// Where the pages of guest memory come from.
pub trait PageSource: Send + Sync + std::fmt::Debug {
    /// Pages of guest memory the source covers.
    fn pages(&self) -> u64;
    /// How page `page` is installed; runs are split where this changes.
    fn op(&self, page: u64) -> InstallOp;
    /// Installs `n` pages from `page` (all of one op) at host address `host` through `uffd`.
    /// `scratch` is the caller's reusable buffer.
    ///
    /// # Safety
    /// `host..host + n pages` must lie inside a mapping registered with `uffd` in this source's
    /// registration mode.
    unsafe fn resolve(
        &self,
        uffd: &Uffd,
        host: usize,
        page: u64,
        n: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<Resolved, PageServerError>;
    /// Reads the data of many COPY runs `(first_page, pages)` in a batch; calls `done(i, data)`
    /// for run `i` as its data arrives, in any order.
    fn read_runs(&self, runs: &[(u64, u64)], done: &mut RunSink<'_>)
    -> Result<(), PageServerError>;
}

/// Longest run read at once by [`FileSource::read_runs`] (256 KiB).
pub const MAX_RUN_PAGES: u64 = 64;
/// Reads in flight. With [`MAX_RUN_PAGES`] this keeps the staging buffers at 2 MiB: every buffer
/// page costs a first-touch fault once, so a larger pool slows a small working set down.
pub const QUEUE_DEPTH: usize = 8;

/// Creates a ring for batched reads, limited with `IORING_REGISTER_RESTRICTIONS` to
/// `IORING_OP_READ` (a ring's operations bypass seccomp, so it may do nothing else).
pub fn read_only_ring() -> std::io::Result<IoUring> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(QUEUE_DEPTH as u32 * 2)?;
    ring.submitter()
        .register_restrictions(&mut [Restriction::sqe_op(opcode::Read::CODE)])?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

/// The memory file and its hole map: data pages are copied, holes are zero pages.
pub struct FileSource {
    file: File,
    holes: HoleMap,
    ring: Mutex<Option<IoUring>>,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("file", &self.file)
            .field("holes", &self.holes.extents().len())
            .finish_non_exhaustive()
    }
}

impl FileSource {
    /// A source reading `file`, whose data extents are `holes`.
    pub fn new(file: File, holes: HoleMap) -> Self {
        Self {
            file,
            holes,
            ring: Mutex::new(None),
        }
    }

    /// Creates the restricted ring [`PageSource::read_runs`] uses now, before the thread that
    /// will prefetch installs a seccomp filter that forbids creating rings.
    pub fn prepare_batch_reads(&self) -> std::io::Result<()> {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.is_none() {
            *ring = Some(read_only_ring()?);
        }
        Ok(())
    }

    /// The hole map.
    pub fn holes(&self) -> &HoleMap {
        &self.holes
    }
}

impl PageSource for FileSource {
    fn pages(&self) -> u64 {
        self.holes.len() / PAGE_SIZE as u64
    }

    fn op(&self, page: u64) -> InstallOp {
        if self.holes.is_data(page * PAGE_SIZE as u64) {
            InstallOp::Copy
        } else {
            InstallOp::ZeroPage
        }
    }

    unsafe fn resolve(
        &self,
        uffd: &Uffd,
        host: usize,
        page: u64,
        n: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<Resolved, PageServerError> {
        let len = n as usize * PAGE_SIZE;
        match self.op(page) {
            InstallOp::Copy => {
                scratch.resize(len, 0);
                self.file
                    .read_exact_at(&mut scratch[..len], page * PAGE_SIZE as u64)
                    .map_err(PageServerError::Read)?;
                // SAFETY: the caller guarantees the destination.
                unsafe { copy(uffd, host, &scratch[..len]) }
            }
            // SAFETY: the caller guarantees the destination.
            _ => unsafe { zeropage(uffd, host, len) },
        }
    }

    fn read_runs(
        &self,
        runs: &[(u64, u64)],
        done: &mut RunSink<'_>,
    ) -> Result<(), PageServerError> {
        if let Some(&(_, n)) = runs.iter().find(|&&(_, n)| n == 0 || n > MAX_RUN_PAGES) {
            return Err(PageServerError::Read(std::io::Error::other(format!(
                "a run of {n} pages is outside 1..={MAX_RUN_PAGES}"
            ))));
        }
        let mut guard = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(read_only_ring().map_err(PageServerError::Read)?);
        }
        let ring = guard.as_mut().expect("set above");
        let fd = self.file.as_raw_fd();
        let mut buffers: Vec<Vec<u8>> = (0..QUEUE_DEPTH.min(runs.len()))
            .map(|_| vec![0u8; MAX_RUN_PAGES as usize * PAGE_SIZE])
            .collect();
        let mut inflight: Vec<Option<usize>> = vec![None; buffers.len()];
        let mut free: Vec<usize> = (0..buffers.len()).collect();
        let mut next = 0;
        loop {
            while let Some(&slot) = free.last() {
                let Some(&(first, n)) = runs.get(next) else {
                    break;
                };
                free.pop();
                let len = n as usize * PAGE_SIZE;
                let sqe = opcode::Read::new(types::Fd(fd), buffers[slot].as_mut_ptr(), len as u32)
                    .offset(first * PAGE_SIZE as u64)
                    .build()
                    .user_data(slot as u64);
                // SAFETY: the buffer of `slot` stays alive and untouched until its completion is
                // reaped below; the file outlives the ring.
                unsafe { ring.submission().push(&sqe) }.map_err(|_| {
                    PageServerError::Read(std::io::Error::other("submission queue full"))
                })?;
                inflight[slot] = Some(next);
                next += 1;
            }
            if free.len() == buffers.len() {
                return Ok(());
            }
            ring.submit_and_wait(1).map_err(PageServerError::Read)?;
            let completed: Vec<(usize, i32)> = ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (slot, res) in completed {
                let i = inflight
                    .get_mut(slot)
                    .and_then(Option::take)
                    .ok_or_else(|| {
                        PageServerError::Read(std::io::Error::other("stray completion"))
                    })?;
                let len = runs[i].1 as usize * PAGE_SIZE;
                if res < 0 {
                    return Err(PageServerError::Read(std::io::Error::from_raw_os_error(
                        -res,
                    )));
                }
                if res as usize != len {
                    return Err(PageServerError::Read(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "short read of the memory file",
                    )));
                }
                done(i, &buffers[slot][..len])?;
                free.push(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use userfaultfd::Error as E;

    /// The errno type of the userfaultfd crate (its own nix version).
    type Errno = uffd_nix::errno::Errno;

    fn errno(e: i32) -> Errno {
        Errno::from_i32(e)
    }

    #[test]
    fn test_prefetch_ring_runs_reads_only() {
        let mut ring = read_only_ring().unwrap();
        let nop = opcode::Nop::new().build().user_data(1);
        // SAFETY: a NOP carries no pointers.
        unsafe { ring.submission().push(&nop) }.unwrap();
        ring.submit_and_wait(1).unwrap();
        let c = ring.completion().next().unwrap();
        assert_eq!(c.result(), -libc::EACCES, "only IORING_OP_READ may run");
    }

    #[test]
    fn test_classify_every_answer_for_every_op() {
        for op in [InstallOp::Copy, InstallOp::ZeroPage, InstallOp::Continue] {
            assert_eq!(classify(op, 4096, Ok(4096)).unwrap(), Resolved::Served(op));
            assert_eq!(classify(op, 8192, Ok(4096)).unwrap(), Resolved::Retry);
        }
        type MakeError = fn(Errno) -> E;
        let cases: [(MakeError, InstallOp); 3] = [
            (E::CopyFailed, InstallOp::Copy),
            (E::ZeropageFailed, InstallOp::ZeroPage),
            (E::SystemError, InstallOp::Continue),
        ];
        for (make, op) in cases {
            assert_eq!(
                classify(op, 4096, Err(make(errno(libc::EEXIST)))).unwrap(),
                Resolved::AlreadyThere,
                "{op} EEXIST"
            );
            assert_eq!(
                classify(op, 4096, Err(make(errno(libc::EAGAIN)))).unwrap(),
                Resolved::Retry,
                "{op} EAGAIN"
            );
            let err = classify(op, 4096, Err(make(errno(libc::ENOMEM)))).unwrap_err();
            assert!(
                matches!(&err, PageServerError::Install { op: o, source } if *o == op && source.raw_os_error() == Some(libc::ENOMEM)),
                "{err}"
            );
        }
        assert_eq!(
            classify(InstallOp::Copy, 8192, Err(E::PartiallyCopied(4096))).unwrap(),
            Resolved::Retry
        );
    }
}
