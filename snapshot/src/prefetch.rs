//! Installing a recorded working set in large batched reads.
//!
//! The working set lists pages in first-touch order. Consecutive pages are merged into runs of up
//! to [`MAX_RUN_PAGES`], split where the hole map changes kind; hole runs are installed with
//! UFFDIO_ZEROPAGE at once, data runs are read with io_uring, [`QUEUE_DEPTH`] reads in flight, and
//! each is installed with UFFDIO_COPY as it completes. Pages already installed (a vCPU faulted
//! first) are skipped; a race ends in EEXIST, which the page server turns into a wake.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};

use crate::PAGE_SIZE;
use crate::page_server::{PageServer, PageServerError};

/// Longest run read at once (256 KiB).
pub const MAX_RUN_PAGES: u64 = 64;
/// Reads in flight. With [`MAX_RUN_PAGES`] this keeps the staging buffers at 2 MiB: every buffer
/// page costs a first-touch fault once, so a larger pool slows a small working set down.
pub const QUEUE_DEPTH: usize = 8;

/// What a prefetch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Pages in the working set.
    pub pages: u64,
    /// Pages installed from the file.
    pub data_pages: u64,
    /// Pages installed as zero pages.
    pub zero_pages: u64,
    /// Pages skipped (already installed).
    pub skipped: u64,
    /// Reads submitted.
    pub reads: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Merges the working set into runs `(first_page, pages, is_data)`, keeping first-touch order.
pub fn runs(server: &PageServer, pages: &[u64]) -> Vec<(u64, u64, bool)> {
    let holes = &server.source().holes;
    let region_end = |p: u64| {
        let off = p * PAGE_SIZE as u64;
        server
            .regions()
            .iter()
            .find(|r| r.host_of(off).is_some())
            .map(|r| (r.region.file_offset + r.region.size) / PAGE_SIZE as u64)
            .unwrap_or(p + 1)
    };
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for &p in pages {
        let is_data = holes.is_data(p * PAGE_SIZE as u64);
        if let Some(last) = out.last_mut()
            && last.0 + last.1 == p
            && last.2 == is_data
            && last.1 < MAX_RUN_PAGES
            && p < region_end(last.0)
        {
            last.1 += 1;
            continue;
        }
        out.push((p, 1, is_data));
    }
    out
}

/// Installs `pages` (a working set) into guest memory through `server`'s userfaultfd.
pub fn prefetch(server: &PageServer, pages: &[u64]) -> Result<PrefetchStats, PageServerError> {
    let start = Instant::now();
    let mut stats = PrefetchStats {
        pages: pages.len() as u64,
        ..Default::default()
    };
    let installed = server.installed();
    // Skip what is already there, then split runs around those pages.
    let todo: Vec<u64> = pages
        .iter()
        .copied()
        .filter(|&p| !installed.get(p))
        .collect();
    stats.skipped = stats.pages - todo.len() as u64;
    let mut queue = runs(server, &todo).into_iter();
    let mut ring = IoUring::new(QUEUE_DEPTH as u32 * 2).map_err(PageServerError::Read)?;
    let fd = server.source().file.as_raw_fd();
    let mut buffers: Vec<Vec<u8>> = (0..QUEUE_DEPTH)
        .map(|_| vec![0u8; MAX_RUN_PAGES as usize * PAGE_SIZE])
        .collect();
    let mut inflight: Vec<Option<(u64, u64)>> = vec![None; QUEUE_DEPTH];
    let mut free: Vec<usize> = (0..QUEUE_DEPTH).collect();
    loop {
        // Fill the queue.
        while let Some(slot) = free.last().copied() {
            let Some((first, n, is_data)) = queue.next() else {
                break;
            };
            let off = first * PAGE_SIZE as u64;
            let len = (n as usize) * PAGE_SIZE;
            if !is_data {
                server.install(off, len, None)?;
                stats.zero_pages += n;
                continue;
            }
            free.pop();
            let sqe = opcode::Read::new(types::Fd(fd), buffers[slot].as_mut_ptr(), len as u32)
                .offset(off)
                .build()
                .user_data(slot as u64);
            // SAFETY: the buffer of `slot` stays alive and untouched until its completion is reaped.
            unsafe { ring.submission().push(&sqe) }.map_err(|_| {
                PageServerError::Read(std::io::Error::other("submission queue full"))
            })?;
            inflight[slot] = Some((first, n));
            stats.reads += 1;
        }
        if free.len() == QUEUE_DEPTH {
            break;
        }
        ring.submit_and_wait(1).map_err(PageServerError::Read)?;
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (slot, res) in done {
            let (first, n) = inflight[slot]
                .take()
                .expect("completion of a submitted read");
            let len = (n as usize) * PAGE_SIZE;
            if res < 0 || res as usize != len {
                return Err(PageServerError::Read(if res < 0 {
                    std::io::Error::from_raw_os_error(-res)
                } else {
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "short read of the memory file",
                    )
                }));
            }
            server.install(first * PAGE_SIZE as u64, len, Some(&buffers[slot][..len]))?;
            stats.data_pages += n;
            free.push(slot);
        }
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}
