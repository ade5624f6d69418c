//! Installing a recorded working set in large batches, through the same page source and the same
//! install path as faults.
//!
//! The working set lists pages in first-touch order. Consecutive pages are merged into runs of up
//! to [`MAX_RUN_PAGES`], split where the source's install op changes, keeping first-touch order.
//! Runs that need no data (zero pages, CONTINUE) are resolved at once; data runs are read by the
//! source in one batch ([`crate::source::PageSource::read_runs`]: io_uring for the memory file) and installed as
//! each read completes. Pages already installed (a vCPU faulted first) are skipped; a race ends in
//! EEXIST, which the page server turns into a wake.

use std::time::{Duration, Instant};

use crate::page_server::{PageServer, PageServerError};
use crate::source::InstallOp;
pub use crate::source::{MAX_RUN_PAGES, QUEUE_DEPTH};

/// What a prefetch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Pages in the working set.
    pub pages: u64,
    /// Pages installed from data.
    pub data_pages: u64,
    /// Pages installed without data (zero pages).
    pub zero_pages: u64,
    /// Pages skipped (already installed).
    pub skipped: u64,
    /// Reads submitted.
    pub reads: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Merges the working set into runs `(first_page, pages, op)`, keeping first-touch order.
pub fn runs(server: &PageServer, pages: &[u64]) -> Vec<(u64, u64, InstallOp)> {
    let source = server.source();
    let region_end = |p: u64| {
        let off = p * crate::PAGE_SIZE as u64;
        server
            .regions()
            .iter()
            .find(|r| r.host_of(off).is_some())
            .map(|r| (r.region.file_offset + r.region.size) / crate::PAGE_SIZE as u64)
            .unwrap_or(p + 1)
    };
    let mut out: Vec<(u64, u64, InstallOp)> = Vec::new();
    for &p in pages {
        let op = source.op(p);
        if let Some(last) = out.last_mut()
            && last.0 + last.1 == p
            && last.2 == op
            && last.1 < MAX_RUN_PAGES
            && p < region_end(last.0)
        {
            last.1 += 1;
            continue;
        }
        out.push((p, 1, op));
    }
    out
}

/// Installs `pages` (a working set) into guest memory through `server`.
pub fn prefetch(server: &PageServer, pages: &[u64]) -> Result<PrefetchStats, PageServerError> {
    let start = Instant::now();
    let mut stats = PrefetchStats {
        pages: pages.len() as u64,
        ..Default::default()
    };
    let installed = server.installed();
    let total = server.source().pages();
    let todo: Vec<u64> = pages
        .iter()
        .copied()
        .filter(|&p| p < total && !installed.get(p))
        .collect();
    stats.skipped = stats.pages - todo.len() as u64;
    let mut scratch = Vec::new();
    let mut data_runs = Vec::new();
    for (first, n, op) in runs(server, &todo) {
        if op == InstallOp::Copy {
            data_runs.push((first, n));
        } else {
            server.resolve(first, n, None, &mut scratch)?;
            stats.zero_pages += n;
        }
    }
    stats.reads = data_runs.len() as u64;
    server.source().read_runs(&data_runs, &mut |i, data| {
        let (first, n) = data_runs[i];
        server.resolve(first, n, Some(data), &mut Vec::new())?;
        stats.data_pages += n;
        Ok(())
    })?;
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Makes `pages` (a working set, in first-touch order) present in a file mapping without copying
/// them: `MADV_POPULATE_READ` on runs of consecutive pages maps the page-cache pages read-only,
/// so clones of one template share them and a guest write copies only the page it writes.
/// `regions` gives each region's host address.
pub fn populate(
    regions: &[crate::page_server::UffdRegion],
    pages: &[u64],
) -> Result<PrefetchStats, std::io::Error> {
    const RUN: u64 = 256;
    let start = Instant::now();
    let mut stats = PrefetchStats {
        pages: pages.len() as u64,
        ..Default::default()
    };
    let page = crate::PAGE_SIZE as u64;
    let mut runs: Vec<(usize, u64)> = Vec::new();
    for &p in pages {
        let Some(host) = regions.iter().find_map(|r| r.host_of(p * page)) else {
            stats.skipped += 1;
            continue;
        };
        if let Some(last) = runs.last_mut()
            && last.0 + (last.1 * page) as usize == host
            && last.1 < RUN
        {
            last.1 += 1;
            continue;
        }
        runs.push((host, 1));
    }
    for (host, n) in runs {
        // SAFETY: [host, host + n pages) lies inside a live mapping of guest memory (found in
        // `regions` above); MADV_POPULATE_READ only faults pages in, it changes no contents.
        let r = unsafe {
            libc::madvise(
                host as *mut libc::c_void,
                (n * page) as usize,
                libc::MADV_POPULATE_READ,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stats.reads += 1;
        stats.data_pages += n;
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}
