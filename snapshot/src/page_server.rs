//! The userfaultfd page server: guest RAM restored lazily, one fault at a time.
//!
//! Guest RAM is anonymous memory registered with userfaultfd (MISSING mode). When the guest (or
//! KVM on its behalf) touches a page that is not there yet, the kernel parks the faulting thread
//! and queues an event; the server answers from the memory file: data pages with UFFDIO_COPY,
//! holes with UFFDIO_ZEROPAGE (zeros are never read from disk). With fault-around, a fault
//! installs the aligned window of `fault_around` pages around it in as few ioctls as the hole map
//! allows.
//!
//! Outcomes of an install: done; EEXIST (another path, e.g. the prefetcher, installed the page
//! first: wake the waiter only); EAGAIN (the mapping changed under us: retry). If the server stops,
//! faulting vCPUs stay parked: the guest stalls, it never reads garbage.
//!
//! The server runs on its own thread rather than on the io_uring loop: the loop blocks while it
//! pauses vCPUs for a snapshot, and a vCPU parked on a fault could then never be answered; and a
//! blocking read on the uffd answers a fault without an extra ring round trip.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{Event, Uffd};

use crate::PAGE_SIZE;
use crate::memory::{HoleMap, MemoryRegion};

/// A guest RAM region registered with the userfaultfd.
#[derive(Debug, Clone, Copy)]
pub struct UffdRegion {
    /// Host address of the mapping.
    pub host_addr: usize,
    /// Its snapshot description (guest address, size, file offset).
    pub region: MemoryRegion,
}

impl UffdRegion {
    /// Host address of file offset `off`, if this region holds it.
    pub fn host_of(&self, off: u64) -> Option<usize> {
        let r = &self.region;
        (off >= r.file_offset && off < r.file_offset + r.size)
            .then(|| self.host_addr + (off - r.file_offset) as usize)
    }

    /// File offset of host address `addr`, if inside.
    pub fn file_of(&self, addr: usize) -> Option<u64> {
        (addr >= self.host_addr && addr < self.host_addr + self.region.size as usize)
            .then(|| self.region.file_offset + (addr - self.host_addr) as u64)
    }
}

/// Where pages come from: the memory file and its hole map.
#[derive(Debug)]
pub struct FileSource {
    /// The memory file.
    pub file: File,
    /// Its data extents.
    pub holes: HoleMap,
}

/// One bit per page of the memory file: installed already (by a fault or the prefetcher).
#[derive(Debug)]
pub struct InstalledPages {
    bits: Vec<AtomicU64>,
}

impl InstalledPages {
    /// Nothing installed, for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether page `p` is installed.
    pub fn get(&self, p: u64) -> bool {
        self.bits
            .get((p / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (p % 64)) != 0)
    }

    /// Marks page `p`; returns whether it was already marked.
    pub fn set(&self, p: u64) -> bool {
        self.bits
            .get((p / 64) as usize)
            .is_some_and(|w| w.fetch_or(1 << (p % 64), Ordering::AcqRel) & (1 << (p % 64)) != 0)
    }
}

/// Counters of the page server (and the prefetcher, which shares them).
#[derive(Debug, Default)]
pub struct PageStats {
    /// Fault events handled.
    pub faults: AtomicU64,
    /// Pages installed with UFFDIO_COPY.
    pub pages_copied: AtomicU64,
    /// Pages installed with UFFDIO_ZEROPAGE.
    pub pages_zeroed: AtomicU64,
    /// Faults answered by a wake only (page already there: EEXIST or installed by the prefetcher).
    pub wakes: AtomicU64,
    /// EAGAIN retries.
    pub retries: AtomicU64,
    /// Service time of each fault in nanoseconds (first 1 M faults).
    pub service_ns: Mutex<Vec<u32>>,
}

/// Tunables.
#[derive(Debug, Clone, Copy)]
pub struct PageServerConfig {
    /// Pages installed per fault (aligned window), 1 = exactly the faulting page.
    pub fault_around: usize,
    /// Whether to record installed pages in first-install order (the working set).
    pub record: bool,
}

impl Default for PageServerConfig {
    fn default() -> Self {
        Self {
            fault_around: 16,
            record: false,
        }
    }
}

/// Errors of the page server.
#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    /// userfaultfd could not be created or used.
    #[error(
        "userfaultfd: {0} (kata-snap needs root, CAP_SYS_PTRACE, or access to /dev/userfaultfd)"
    )]
    Uffd(String),
    /// The memory file could not be read.
    #[error("reading the memory file: {0}")]
    Read(#[source] std::io::Error),
    /// A fault outside every registered region.
    #[error("fault at {0:#x} outside guest memory")]
    OutOfRange(usize),
    /// The thread could not start.
    #[error("cannot start the page server thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The server's state, shared by the fault thread and the prefetcher.
#[derive(Debug)]
pub struct PageServer {
    uffd: Uffd,
    regions: Vec<UffdRegion>,
    source: FileSource,
    installed: InstalledPages,
    config: PageServerConfig,
    /// Counters.
    pub stats: PageStats,
    recorded: Mutex<Vec<u64>>,
}

/// Creates a userfaultfd able to handle faults KVM takes from kernel mode on the guest's behalf.
pub fn create_uffd() -> Result<Uffd, PageServerError> {
    userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // Not user_mode_only: KVM touches guest memory from kernel mode (get_user_pages).
        .user_mode_only(false)
        .create()
        .map_err(|e| PageServerError::Uffd(e.to_string()))
}

enum Install {
    Done,
    Exists,
}

impl PageServer {
    /// A server for `regions` (already registered with `uffd`) backed by `source`.
    pub fn new(
        uffd: Uffd,
        regions: Vec<UffdRegion>,
        source: FileSource,
        config: PageServerConfig,
    ) -> Self {
        let pages = source.holes.len() / PAGE_SIZE as u64;
        Self {
            uffd,
            regions,
            source,
            installed: InstalledPages::new(pages),
            config,
            stats: PageStats::default(),
            recorded: Mutex::new(Vec::new()),
        }
    }

    /// Registers `[addr, addr+len)` for missing-page faults.
    pub fn register(uffd: &Uffd, addr: usize, len: usize) -> Result<(), PageServerError> {
        uffd.register(addr as *mut libc::c_void, len)
            .map_err(|e| PageServerError::Uffd(e.to_string()))?;
        Ok(())
    }

    /// The regions served.
    pub fn regions(&self) -> &[UffdRegion] {
        &self.regions
    }

    /// The memory file and its hole map.
    pub fn source(&self) -> &FileSource {
        &self.source
    }

    /// The installed-page bitmap.
    pub fn installed(&self) -> &InstalledPages {
        &self.installed
    }

    /// The pages installed so far in first-install order (when recording).
    pub fn recorded(&self) -> Vec<u64> {
        self.recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn region_of_file(&self, off: u64) -> Option<(usize, &UffdRegion)> {
        self.regions
            .iter()
            .find_map(|r| r.host_of(off).map(|h| (h, r)))
    }

    /// Installs `len` bytes at file offset `off` (homogeneous: all data or all hole, inside one
    /// region, none installed yet), from `data` when it is data.
    pub fn install(
        &self,
        off: u64,
        len: usize,
        data: Option<&[u8]>,
    ) -> Result<(), PageServerError> {
        let (host, _) = self
            .region_of_file(off)
            .ok_or(PageServerError::OutOfRange(off as usize))?;
        let outcome = self.install_at(host, len, data)?;
        let first = off / PAGE_SIZE as u64;
        let n = (len / PAGE_SIZE) as u64;
        let newly: Vec<u64> = (first..first + n)
            .filter(|&p| !self.installed.set(p))
            .collect();
        match (outcome, data) {
            (Install::Exists, _) => {}
            (Install::Done, Some(_)) => {
                self.stats.pages_copied.fetch_add(n, Ordering::Relaxed);
            }
            (Install::Done, None) => {
                self.stats.pages_zeroed.fetch_add(n, Ordering::Relaxed);
            }
        }
        if self.config.record && !newly.is_empty() {
            self.recorded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(newly);
        }
        Ok(())
    }

    fn install_at(
        &self,
        host: usize,
        len: usize,
        data: Option<&[u8]>,
    ) -> Result<Install, PageServerError> {
        loop {
            let dst = host as *mut libc::c_void;
            let res = match data {
                // SAFETY: host..host+len lies inside a registered guest RAM mapping that outlives
                // the server, and `buf` holds at least `len` bytes.
                Some(buf) => unsafe { self.uffd.copy(buf.as_ptr().cast(), dst, len, true) },
                // SAFETY: as above, without a source buffer.
                None => unsafe { self.uffd.zeropage(dst, len, true) },
            };
            match res {
                Ok(_) => return Ok(Install::Done),
                Err(userfaultfd::Error::CopyFailed(errno))
                | Err(userfaultfd::Error::ZeropageFailed(errno))
                    if errno as i32 == libc::EEXIST =>
                {
                    if len > PAGE_SIZE {
                        // Some page of the run exists: install the rest one page at a time.
                        for i in (0..len).step_by(PAGE_SIZE) {
                            let sub = data.map(|d| &d[i..i + PAGE_SIZE]);
                            self.install_at(host + i, PAGE_SIZE, sub)?;
                        }
                        return Ok(Install::Done);
                    }
                    self.stats.wakes.fetch_add(1, Ordering::Relaxed);
                    let _ = self.uffd.wake(host as *mut libc::c_void, len);
                    return Ok(Install::Exists);
                }
                Err(userfaultfd::Error::PartiallyCopied(_)) => {
                    // EAGAIN: the mapping is changing; try again.
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::yield_now();
                }
                Err(e) => return Err(PageServerError::Uffd(e.to_string())),
            }
        }
    }

    /// Answers one fault at host address `addr`.
    pub fn serve_fault(&self, addr: usize, buf: &mut Vec<u8>) -> Result<(), PageServerError> {
        let start = Instant::now();
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let page_addr = addr & !(PAGE_SIZE - 1);
        let region = self
            .regions
            .iter()
            .find(|r| r.file_of(page_addr).is_some())
            .ok_or(PageServerError::OutOfRange(addr))?;
        let fault_off = region.file_of(page_addr).expect("checked");
        let fault_page = fault_off / PAGE_SIZE as u64;
        if self.installed.get(fault_page) {
            self.stats.wakes.fetch_add(1, Ordering::Relaxed);
            let _ = self.uffd.wake(page_addr as *mut libc::c_void, PAGE_SIZE);
            return Ok(());
        }
        // The aligned window around the fault, clipped to the region.
        let n = self.config.fault_around.max(1) as u64;
        let r = &region.region;
        let first_page = r.file_offset / PAGE_SIZE as u64;
        let last_page = first_page + r.size / PAGE_SIZE as u64;
        let win_start = (first_page + (fault_page - first_page) / n * n).max(first_page);
        let win_end = (win_start + n).min(last_page);
        // Serve the run holding the faulting page first, then the rest of the window.
        let mut runs = Vec::new();
        let mut p = win_start;
        while p < win_end {
            if self.installed.get(p) {
                p += 1;
                continue;
            }
            let off = p * PAGE_SIZE as u64;
            let is_data = self.source.holes.is_data(off);
            let mut q = p + 1;
            while q < win_end
                && !self.installed.get(q)
                && self.source.holes.is_data(q * PAGE_SIZE as u64) == is_data
            {
                q += 1;
            }
            runs.push((p, q, is_data));
            p = q;
        }
        runs.sort_by_key(|&(s, e, _)| !(s <= fault_page && fault_page < e));
        for (s, e, is_data) in runs {
            let off = s * PAGE_SIZE as u64;
            let len = ((e - s) as usize) * PAGE_SIZE;
            if is_data {
                buf.resize(len, 0);
                self.source
                    .file
                    .read_exact_at(&mut buf[..len], off)
                    .map_err(PageServerError::Read)?;
                self.install(off, len, Some(&buf[..len]))?;
            } else {
                self.install(off, len, None)?;
            }
        }
        let ns = start.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32;
        let mut times = self
            .stats
            .service_ns
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if times.len() < 1 << 20 {
            times.push(ns);
        }
        Ok(())
    }

    /// Handles every queued event; returns when the queue is empty.
    pub fn drain_events(&self, buf: &mut Vec<u8>) -> Result<usize, PageServerError> {
        let mut handled = 0;
        loop {
            match self.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    self.serve_fault(addr as usize, buf)?;
                    handled += 1;
                }
                Ok(Some(_)) => handled += 1,
                Ok(None) => return Ok(handled),
                Err(e) => return Err(PageServerError::Uffd(e.to_string())),
            }
        }
    }

    /// The uffd, for polling.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }
}

/// The page server's thread.
#[derive(Debug)]
pub struct PageServerHandle {
    server: Arc<PageServer>,
    stop: Arc<AtomicBool>,
    wake: File,
    thread: Option<JoinHandle<Result<(), PageServerError>>>,
}

impl PageServerHandle {
    /// Starts serving faults on a thread of its own.
    pub fn spawn(server: Arc<PageServer>) -> Result<Self, PageServerError> {
        let (wake_r, wake_w) = pipe().map_err(PageServerError::Thread)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (server.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || {
                let mut buf = Vec::new();
                let mut fds = [
                    libc::pollfd {
                        fd: s.uffd().as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: wake_r.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                while !st.load(Ordering::Acquire) {
                    // SAFETY: polling two valid fds owned by this closure's captures.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                    if n < 0 {
                        let e = std::io::Error::last_os_error();
                        if e.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(PageServerError::Uffd(e.to_string()));
                    }
                    if fds[0].revents != 0 {
                        s.drain_events(&mut buf)?;
                    }
                }
                Ok(())
            })
            .map_err(PageServerError::Thread)?;
        Ok(Self {
            server,
            stop,
            wake: wake_w,
            thread: Some(thread),
        })
    }

    /// The server (stats, recorded pages).
    pub fn server(&self) -> &Arc<PageServer> {
        &self.server
    }

    /// Whether the thread has ended (with an error, or stopped).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the thread and returns how it ended.
    pub fn stop(&mut self) -> Result<(), PageServerError> {
        self.stop.store(true, Ordering::Release);
        let _ = std::io::Write::write(&mut &self.wake, &[1]);
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(PageServerError::Uffd("page server thread panicked".into()))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for PageServerHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn pipe() -> std::io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: the read end was just created and is owned by nobody else.
    let r = unsafe { File::from_raw_fd(fds[0]) };
    // SAFETY: likewise the write end.
    let w = unsafe { File::from_raw_fd(fds[1]) };
    Ok((r, w))
}
