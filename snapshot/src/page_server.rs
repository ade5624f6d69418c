//! The userfaultfd page server: guest RAM restored lazily, one fault at a time.
//!
//! Guest RAM is anonymous memory registered with userfaultfd (MISSING mode). When the guest (or
//! KVM on its behalf) touches a page that is not there yet, the kernel parks the faulting thread
//! and queues an event; the server answers from the memory file: data pages with UFFDIO_COPY,
//! holes with UFFDIO_ZEROPAGE (zeros are never read from disk). With fault-around, a fault
//! installs the aligned window of `fault_around` pages around it in as few ioctls as the hole map
//! allows.
//!
//! Every install is answered through the source ([`crate::source`]): served, already there
//! (EEXIST: wake the waiter only) or retry (EAGAIN: the mapping changed under us), with one
//! classification for COPY, ZEROPAGE and CONTINUE. If the server stops, faulting vCPUs stay
//! parked: the guest stalls, it never reads garbage.
//!
//! The server runs on its own thread rather than on the io_uring loop: the loop blocks while it
//! pauses vCPUs for a snapshot, and a vCPU parked on a fault could then never be answered; and a
//! blocking read on the uffd answers a fault without an extra ring round trip.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{Event, Uffd};

use crate::PAGE_SIZE;
use crate::memory::MemoryRegion;
use crate::source::{InstallOp, PageSource, Resolved};

/// How many times one install is retried on EAGAIN before the server gives up.
const MAX_RETRIES: u32 = 100_000;

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
    /// Faults on pages of the expected working set the prefetcher had not installed yet.
    pub faults_in_set: AtomicU64,
    /// Faults on pages outside the expected working set.
    pub faults_outside_set: AtomicU64,
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
    /// userfaultfd could not be created.
    #[error(
        "cannot create a userfaultfd: {0} (kata-snap needs root, CAP_SYS_PTRACE, or access to /dev/userfaultfd)"
    )]
    Create(#[source] userfaultfd::Error),
    /// userfaultfd could not be created through the pre-opened /dev/userfaultfd.
    #[error("cannot create a userfaultfd through /dev/userfaultfd: {0}")]
    CreateFromDevice(#[source] std::io::Error),
    /// A mapping could not be registered.
    #[error("cannot register guest memory with userfaultfd: {0}")]
    Register(#[source] userfaultfd::Error),
    /// Reading the uffd's events failed.
    #[error("reading userfaultfd events: {0}")]
    Events(#[source] userfaultfd::Error),
    /// Waiting for events failed.
    #[error("polling the userfaultfd: {0}")]
    Poll(#[source] std::io::Error),
    /// An install ioctl failed.
    #[error("{op} failed: {source}")]
    Install {
        /// The ioctl.
        op: InstallOp,
        /// Its errno.
        #[source]
        source: std::io::Error,
    },
    /// An install kept answering EAGAIN.
    #[error("{op} answered EAGAIN {MAX_RETRIES} times in a row")]
    Retries {
        /// The ioctl.
        op: InstallOp,
    },
    /// The memory file could not be read.
    #[error("reading the memory file: {0}")]
    Read(#[source] std::io::Error),
    /// A fault outside every registered region.
    #[error("fault at {0:#x} outside guest memory")]
    OutOfRange(usize),
    /// The thread could not start.
    #[error("cannot start the page server thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The thread panicked.
    #[error("the page server thread panicked")]
    Panicked,
    /// The thread's start-up hook failed.
    #[error("page server start: {0}")]
    Start(#[source] std::io::Error),
}

/// The server's state, shared by the fault thread and the prefetcher.
#[derive(Debug)]
pub struct PageServer {
    uffd: Uffd,
    regions: Vec<UffdRegion>,
    source: Arc<dyn PageSource>,
    installed: InstalledPages,
    expected: std::sync::OnceLock<(InstalledPages, u64)>,
    config: PageServerConfig,
    /// Counters.
    pub stats: PageStats,
    recording: AtomicBool,
    recorded: Mutex<Vec<u64>>,
}

/// `/dev/userfaultfd`, opened before the process gave up the right to open it (a jailed VMM:
/// the device is root's, and `userfaultfd(2)` for kernel-mode faults needs CAP_SYS_PTRACE while
/// `vm.unprivileged_userfaultfd` is 0). [`create_uffd`] asks it for each new userfaultfd.
static DEVICE: Mutex<Option<std::os::fd::OwnedFd>> = Mutex::new(None);

/// Opens `/dev/userfaultfd` now, for every later [`create_uffd`] of this process. `Ok(false)`
/// when this kernel has no such device (before 6.1): creation then stays with the syscall.
pub fn preopen_uffd_device() -> std::io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
    {
        Ok(f) => {
            *DEVICE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f.into());
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `struct uffdio_api` of <linux/userfaultfd.h>.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
/// `UFFDIO_API`: `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `UFFD_API`.
const UFFD_API: u64 = 0xaa;

/// A new userfaultfd from the pre-opened device (the `userfaultfd` crate opens the device by
/// path on each creation, which a jail cannot).
fn uffd_from_device(dev: &std::os::fd::OwnedFd) -> std::io::Result<Uffd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: USERFAULTFD_IOC_NEW on the /dev/userfaultfd fd takes the flags as its integer
    // argument and returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api` that lives across the call.
    if unsafe { libc::ioctl(owned.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the Uffd takes over the descriptor (released from `owned`), as the crate's own
    // builder wraps the one it creates.
    Ok(unsafe { Uffd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(owned)) })
}

/// Creates a userfaultfd able to handle faults KVM takes from kernel mode on the guest's behalf.
pub fn create_uffd() -> Result<Uffd, PageServerError> {
    if let Some(dev) = DEVICE.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return uffd_from_device(dev).map_err(PageServerError::CreateFromDevice);
    }
    userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // Not user_mode_only: KVM touches guest memory from kernel mode (get_user_pages).
        .user_mode_only(false)
        .create()
        .map_err(PageServerError::Create)
}

impl PageServer {
    /// A server for `regions` (already registered with `uffd`) backed by `source`.
    pub fn new(
        uffd: Uffd,
        regions: Vec<UffdRegion>,
        source: Arc<dyn PageSource>,
        config: PageServerConfig,
    ) -> Self {
        let pages = source.pages();
        Self {
            uffd,
            regions,
            source,
            installed: InstalledPages::new(pages),
            expected: std::sync::OnceLock::new(),
            recording: AtomicBool::new(config.record),
            config,
            stats: PageStats::default(),
            recorded: Mutex::new(Vec::new()),
        }
    }

    /// Registers `[addr, addr+len)` for missing-page faults.
    pub fn register(uffd: &Uffd, addr: usize, len: usize) -> Result<(), PageServerError> {
        uffd.register(addr as *mut libc::c_void, len)
            .map_err(PageServerError::Register)?;
        Ok(())
    }

    /// The regions served.
    pub fn regions(&self) -> &[UffdRegion] {
        &self.regions
    }

    /// Where pages come from.
    pub fn source(&self) -> &dyn PageSource {
        &*self.source
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

    /// Declares the working set about to be prefetched, so faults are counted as in it (the
    /// prefetcher was late) or outside it (the set missed them). Once; later calls are ignored.
    pub fn expect(&self, pages: &[u64]) {
        let set = InstalledPages::new(self.source.pages());
        for &p in pages {
            set.set(p);
        }
        let _ = self.expected.set((set, pages.len() as u64));
    }

    /// The expected working set's size, if one was declared.
    pub fn expected_pages(&self) -> Option<u64> {
        self.expected.get().map(|(_, n)| *n)
    }

    /// Whether installs are still being recorded.
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    /// Ends the recording and returns the pages installed until now, in first-install order.
    pub fn finish_recording(&self) -> Vec<u64> {
        self.recording.store(false, Ordering::Release);
        std::mem::take(&mut *self.recorded.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn region_of_file(&self, off: u64) -> Option<(usize, &UffdRegion)> {
        self.regions
            .iter()
            .find_map(|r| r.host_of(off).map(|h| (h, r)))
    }

    /// Installs `n` pages from page `page` (one op, inside one region), from `data` when the caller
    /// already read them (the prefetcher), else through the source. Pages some other path installed
    /// first are only woken.
    pub fn resolve(
        &self,
        page: u64,
        n: u64,
        data: Option<&[u8]>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), PageServerError> {
        let off = page * PAGE_SIZE as u64;
        let (host, region) = self
            .region_of_file(off)
            .ok_or(PageServerError::OutOfRange(off as usize))?;
        if region.host_of(off + n * PAGE_SIZE as u64 - 1).is_none() {
            return Err(PageServerError::OutOfRange(off as usize));
        }
        let mut retries = 0;
        let answer = loop {
            let answer = match data {
                // SAFETY: host..host+len lies inside a registered guest RAM mapping that outlives
                // the server (checked above against the region).
                Some(buf) => unsafe { crate::source::copy(&self.uffd, host, buf)? },
                // SAFETY: as above.
                None => unsafe { self.source.resolve(&self.uffd, host, page, n, scratch)? },
            };
            if answer != Resolved::Retry {
                break answer;
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            retries += 1;
            if retries >= MAX_RETRIES {
                return Err(PageServerError::Retries {
                    op: self.source.op(page),
                });
            }
            std::thread::yield_now();
        };
        match answer {
            Resolved::Served(op) => {
                let counter = match op {
                    InstallOp::ZeroPage => &self.stats.pages_zeroed,
                    InstallOp::Copy | InstallOp::Continue => &self.stats.pages_copied,
                };
                counter.fetch_add(n, Ordering::Relaxed);
                self.mark(page, n);
            }
            Resolved::AlreadyThere if n > 1 => {
                // Some page of the run exists: install the rest one page at a time.
                for i in 0..n {
                    let sub =
                        data.map(|d| &d[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]);
                    self.resolve(page + i, 1, sub, scratch)?;
                }
            }
            Resolved::AlreadyThere | Resolved::Retry => {
                self.stats.wakes.fetch_add(1, Ordering::Relaxed);
                let _ = self.uffd.wake(host as *mut libc::c_void, PAGE_SIZE);
                self.mark(page, 1);
            }
        }
        Ok(())
    }

    fn mark(&self, page: u64, n: u64) {
        let newly: Vec<u64> = (page..page + n)
            .filter(|&p| !self.installed.set(p))
            .collect();
        if self.is_recording() && !newly.is_empty() {
            let mut rec = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            if self.is_recording() {
                rec.extend(newly);
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
        if let Some((set, _)) = self.expected.get() {
            let counter = if set.get(fault_page) {
                &self.stats.faults_in_set
            } else {
                &self.stats.faults_outside_set
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
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
            let op = self.source.op(p);
            let mut q = p + 1;
            while q < win_end && !self.installed.get(q) && self.source.op(q) == op {
                q += 1;
            }
            runs.push((p, q));
            p = q;
        }
        runs.sort_by_key(|&(s, e)| !(s <= fault_page && fault_page < e));
        for (s, e) in runs {
            self.resolve(s, e - s, None, buf)?;
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
                Err(e) => return Err(PageServerError::Events(e)),
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
        Self::spawn_with(server, || Ok(()))
    }

    /// As [`Self::spawn`], running `on_start` first on the new thread (the VMM installs the
    /// thread's seccomp filter there); if it fails, the thread ends with that error.
    pub fn spawn_with(
        server: Arc<PageServer>,
        on_start: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> Result<Self, PageServerError> {
        let (wake_r, wake_w) = pipe().map_err(PageServerError::Thread)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (server.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || {
                on_start().map_err(PageServerError::Start)?;
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
                        return Err(PageServerError::Poll(e));
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
            Some(t) => t.join().unwrap_or(Err(PageServerError::Panicked)),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A userfaultfd made through the kept /dev/userfaultfd registers memory and answers a
    /// fault KVM-style (from kernel mode: a `read(2)` into the registered page).
    #[test]
    fn test_uffd_from_the_preopened_device_handles_kernel_mode_faults() {
        match preopen_uffd_device() {
            Ok(true) => {}
            Ok(false) => {
                println!("SKIPPED: no /dev/userfaultfd on this kernel");
                return;
            }
            Err(e) => {
                println!("SKIPPED: cannot open /dev/userfaultfd: {e}");
                return;
            }
        }
        let uffd = create_uffd().unwrap();
        // SAFETY: a fresh anonymous private mapping of one page, unmapped below.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        uffd.register(page, PAGE_SIZE).unwrap();
        let addr = page as usize;
        let filler = std::thread::spawn(move || {
            let mut fds = [libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: poll on one pollfd that lives across the call.
            assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 10_000) }, 1);
            let src = vec![7u8; PAGE_SIZE];
            // SAFETY: copies one page from `src` into the registered, unpopulated page.
            unsafe {
                uffd.copy(
                    src.as_ptr().cast(),
                    addr as *mut libc::c_void,
                    PAGE_SIZE,
                    true,
                )
            }
            .unwrap();
        });
        // A kernel-mode access: write(2) from the registered page into a pipe.
        let mut p = [0i32; 2];
        // SAFETY: pipe writes two descriptors into `p`.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: the page is mapped for PAGE_SIZE bytes; the kernel faults it through the uffd.
        let n = unsafe { libc::write(p[1], page, 16) };
        assert_eq!(n, 16);
        let mut b = [0u8; 16];
        // SAFETY: reads at most 16 bytes into `b`.
        assert_eq!(unsafe { libc::read(p[0], b.as_mut_ptr().cast(), 16) }, 16);
        assert_eq!(b, [7u8; 16]);
        for fd in p {
            // SAFETY: closes the pipe's two descriptors made above.
            unsafe { libc::close(fd) };
        }
        filler.join().unwrap();
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(page, PAGE_SIZE) };
    }
}
