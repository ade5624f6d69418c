//! One interface for every way guest memory comes back from a snapshot.
//!
//! A [`MemorySource`] maps the snapshot's memory layout, says how the mapping is registered with
//! userfaultfd ([`Registration`]) and supplies the [`PageSource`] that answers its faults, if any:
//!
//! | source | mapping | registration | page source |
//! | --- | --- | --- | --- |
//! | [`EagerMemory`] | anonymous, the file's data read in before the guest runs | none | none |
//! | [`MmapMemory`] | the memory file mapped `MAP_PRIVATE` (clones share its page cache) | none | none |
//! | [`UffdMemory`] | anonymous | MISSING | [`FileSource`]: copies data, zero pages for holes |
//!
//! The shared-template source (memory in shared memory, MINOR faults, UFFDIO_CONTINUE) is the next
//! implementation of the same trait. [`serve`] creates the userfaultfd, registers the mapping in
//! the source's mode and builds the [`PageServer`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use userfaultfd::RegisterMode;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap,
    mmap::MmapRegionBuilder,
};

use crate::memory::{HoleMap, MemoryRegion};
use crate::page_server::{PageServer, PageServerConfig, PageServerError, UffdRegion, create_uffd};
use crate::source::{FileSource, PageSource, Registration};

/// Errors mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemorySourceError {
    /// Anonymous memory could not be mapped.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Anonymous {
        /// Size.
        mib: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A guest address has no host mapping.
    #[error("guest memory lookup failed: {0}")]
    Lookup(#[source] vm_memory::GuestMemoryError),
    /// A file-backed region could not be mapped.
    #[error("cannot map the memory file: {0}")]
    MapFile(#[source] vm_memory::mmap::MmapRegionError),
    /// The regions do not form a valid guest memory.
    #[error("the memory layout does not form guest memory: {0}")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// A region's guest range overflows.
    #[error("memory region at {0:#x} overflows")]
    Overflow(u64),
    /// Reading the memory file failed.
    #[error("reading the memory file: {0}")]
    Read(#[source] std::io::Error),
    /// Setting up userfaultfd failed.
    #[error(transparent)]
    PageServer(#[from] PageServerError),
    /// The placement addresses do not match the regions.
    #[error("guest memory placement does not match the memory layout")]
    Placement,
}

/// How guest memory comes back from a snapshot.
pub trait MemorySource: Send + Sync + std::fmt::Debug {
    /// The mode's name, for messages.
    fn name(&self) -> &'static str;
    /// Maps guest memory for `regions`: fresh mappings, or (`at`) over the given host addresses
    /// of a [`Reservation`], one per region, whose KVM memslots already exist.
    fn map(
        &self,
        regions: &[MemoryRegion],
        at: Option<&[usize]>,
    ) -> Result<GuestMemoryMmap, MemorySourceError>;
    /// How the mapping is registered with userfaultfd.
    fn registration(&self) -> Registration;
    /// What answers the mapping's faults (`None` when it is not registered).
    fn page_source(&self) -> Option<Arc<dyn PageSource>>;
    /// Whether a page that was never touched is zero (anonymous memory filled by the VMM): a
    /// later snapshot then reads only resident pages.
    fn absent_pages_are_zero(&self) -> bool;
}

fn total_mib(regions: &[MemoryRegion]) -> u64 {
    regions.iter().map(|r| r.size).sum::<u64>() >> 20
}

/// Fresh anonymous guest memory for `regions`, or placed over `at`.
pub fn anonymous(
    regions: &[MemoryRegion],
    at: Option<&[usize]>,
) -> Result<GuestMemoryMmap, MemorySourceError> {
    if let Some(at) = at {
        return place(regions, at, None);
    }
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|source| MemorySourceError::Anonymous {
        mib: total_mib(regions),
        source,
    })
}

/// Maps each region at its address in `at` (`MAP_FIXED` over a reservation): anonymous, or the
/// region's part of `file` privately. The mappings belong to the reservation, which unmaps them.
fn place(
    regions: &[MemoryRegion],
    at: &[usize],
    file: Option<&File>,
) -> Result<GuestMemoryMmap, MemorySourceError> {
    use std::os::fd::AsRawFd;
    if at.len() != regions.len() {
        return Err(MemorySourceError::Placement);
    }
    let mut mapped = Vec::with_capacity(regions.len());
    for (r, &addr) in regions.iter().zip(at) {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let (flags, fd, off) = match file {
            Some(f) => (
                libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
                f.as_raw_fd(),
                r.file_offset as libc::off_t,
            ),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            ),
        };
        // SAFETY: `addr..addr + size` is a range of a live reservation made for this region (the
        // caller's `Reservation`), which nothing else uses; MAP_FIXED replaces it in place.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                r.size as usize,
                prot,
                flags,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED || p as usize != addr {
            return Err(MemorySourceError::Read(std::io::Error::last_os_error()));
        }
        // SAFETY: the mapping was just made with these protections and flags and stays alive as
        // long as the reservation, which outlives guest memory.
        let region = unsafe {
            vm_memory::mmap::MmapRegion::<()>::build_raw(
                addr as *mut u8,
                r.size as usize,
                prot,
                flags,
            )
        }
        .map_err(MemorySourceError::MapFile)?;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or(MemorySourceError::Overflow(r.guest_addr))?,
        );
    }
    GuestMemoryMmap::from_regions(mapped).map_err(MemorySourceError::Regions)
}

/// Host address ranges reserved for guest memory (`PROT_NONE`, nothing committed), so KVM
/// memslots can be registered before the guest is known; a restore then maps its memory over
/// them (`MAP_FIXED`). Unmapped when dropped, so it must outlive the guest memory placed in it.
#[derive(Debug)]
pub struct Reservation {
    regions: Vec<MemoryRegion>,
    addrs: Vec<usize>,
}

impl Reservation {
    /// Reserves one range per region.
    pub fn new(regions: &[MemoryRegion]) -> std::io::Result<Self> {
        let mut res = Self {
            regions: Vec::new(),
            addrs: Vec::new(),
        };
        for r in regions {
            // SAFETY: a fresh anonymous PROT_NONE mapping at an address of the kernel's choice.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    r.size as usize,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            res.regions.push(*r);
            res.addrs.push(p as usize);
        }
        Ok(res)
    }

    /// The regions reserved for.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// Each region's host address.
    pub fn addrs(&self) -> &[usize] {
        &self.addrs
    }

    /// Whether guest memory of `regions` fits exactly (same guest addresses and sizes).
    pub fn fits(&self, regions: &[MemoryRegion]) -> bool {
        self.regions.len() == regions.len()
            && self
                .regions
                .iter()
                .zip(regions)
                .all(|(a, b)| a.guest_addr == b.guest_addr && a.size == b.size)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for (r, &a) in self.regions.iter().zip(&self.addrs) {
            // SAFETY: unmapping the ranges this reservation mapped (and whatever was placed over
            // them); the guest memory using them is gone by now.
            unsafe { libc::munmap(a as *mut libc::c_void, r.size as usize) };
        }
    }
}

/// `eager`: the file's data extents read into fresh anonymous memory before the guest runs.
#[derive(Debug)]
pub struct EagerMemory {
    file: File,
    holes: HoleMap,
}

impl EagerMemory {
    /// Reads `file` (with its hole map) into memory at `map` time.
    pub fn new(file: File, holes: HoleMap) -> Self {
        Self { file, holes }
    }
}

impl MemorySource for EagerMemory {
    fn name(&self) -> &'static str {
        "eager"
    }

    fn map(
        &self,
        regions: &[MemoryRegion],
        at: Option<&[usize]>,
    ) -> Result<GuestMemoryMmap, MemorySourceError> {
        let mem = anonymous(regions, at)?;
        for &(start, end) in self.holes.extents() {
            for r in regions {
                let lo = start.max(r.file_offset);
                let hi = end.min(r.file_offset + r.size);
                if lo >= hi {
                    continue;
                }
                let guest = GuestAddress(r.guest_addr + (lo - r.file_offset));
                let host = mem
                    .get_host_address(guest)
                    .map_err(MemorySourceError::Lookup)?;
                // SAFETY: [host, host + hi - lo) lies inside the region's fresh mapping (the
                // extent is clipped to the region), and no vCPU runs yet.
                let dst = unsafe { std::slice::from_raw_parts_mut(host, (hi - lo) as usize) };
                self.file
                    .read_exact_at(dst, lo)
                    .map_err(MemorySourceError::Read)?;
            }
        }
        Ok(mem)
    }

    fn registration(&self) -> Registration {
        Registration::None
    }

    fn page_source(&self) -> Option<Arc<dyn PageSource>> {
        None
    }

    fn absent_pages_are_zero(&self) -> bool {
        true
    }
}

/// `mmap`: the memory file mapped `MAP_PRIVATE`, copy-on-write; clones share the page cache.
#[derive(Debug)]
pub struct MmapMemory {
    file: File,
}

impl MmapMemory {
    /// Maps `file` (opened read-only is enough: writes stay private).
    pub fn new(file: File) -> Self {
        Self { file }
    }
}

impl MemorySource for MmapMemory {
    fn name(&self) -> &'static str {
        "mmap"
    }

    fn map(
        &self,
        regions: &[MemoryRegion],
        at: Option<&[usize]>,
    ) -> Result<GuestMemoryMmap, MemorySourceError> {
        if let Some(at) = at {
            return place(regions, at, Some(&self.file));
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for r in regions {
            let f = self.file.try_clone().map_err(MemorySourceError::Read)?;
            let region = MmapRegionBuilder::<()>::new(r.size as usize)
                .with_file_offset(FileOffset::new(f, r.file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(MemorySourceError::MapFile)?;
            mapped.push(
                GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                    .ok_or(MemorySourceError::Overflow(r.guest_addr))?,
            );
        }
        GuestMemoryMmap::from_regions(mapped).map_err(MemorySourceError::Regions)
    }

    fn registration(&self) -> Registration {
        Registration::None
    }

    fn page_source(&self) -> Option<Arc<dyn PageSource>> {
        None
    }

    fn absent_pages_are_zero(&self) -> bool {
        false
    }
}

/// `uffd`: anonymous memory registered for MISSING faults, served from the memory file.
#[derive(Debug)]
pub struct UffdMemory {
    source: Arc<FileSource>,
}

impl UffdMemory {
    /// Serves faults from `source`.
    pub fn new(source: FileSource) -> Self {
        Self {
            source: Arc::new(source),
        }
    }

    /// Prepares the source's batched reads (for a prefetch on a filtered thread).
    pub fn prepare_prefetch(&self) -> std::io::Result<()> {
        self.source.prepare_batch_reads()
    }
}

impl MemorySource for UffdMemory {
    fn name(&self) -> &'static str {
        "uffd"
    }

    fn map(
        &self,
        regions: &[MemoryRegion],
        at: Option<&[usize]>,
    ) -> Result<GuestMemoryMmap, MemorySourceError> {
        anonymous(regions, at)
    }

    fn registration(&self) -> Registration {
        Registration::Missing
    }

    fn page_source(&self) -> Option<Arc<dyn PageSource>> {
        Some(self.source.clone())
    }

    fn absent_pages_are_zero(&self) -> bool {
        false
    }
}

/// Each region of `regions` with the host address `mem` maps it at.
pub fn host_regions(
    mem: &GuestMemoryMmap,
    regions: &[MemoryRegion],
) -> Result<Vec<UffdRegion>, MemorySourceError> {
    regions
        .iter()
        .map(|r| {
            let host = mem
                .get_host_address(GuestAddress(r.guest_addr))
                .map_err(MemorySourceError::Lookup)?;
            Ok(UffdRegion {
                host_addr: host as usize,
                region: *r,
            })
        })
        .collect()
}

/// Registers `mem`'s `regions` with a new userfaultfd in `source`'s mode and builds the page
/// server answering from its page source; `None` for a source that needs none.
pub fn serve(
    source: &dyn MemorySource,
    mem: &GuestMemoryMmap,
    regions: &[MemoryRegion],
    config: PageServerConfig,
) -> Result<Option<Arc<PageServer>>, MemorySourceError> {
    let mode = match source.registration() {
        Registration::None => return Ok(None),
        Registration::Missing => RegisterMode::MISSING,
        Registration::Minor => RegisterMode::MINOR,
    };
    let Some(pages) = source.page_source() else {
        return Ok(None);
    };
    let uffd = create_uffd()?;
    let uffd_regions = host_regions(mem, regions)?;
    for r in &uffd_regions {
        uffd.register_with_mode(
            r.host_addr as *mut libc::c_void,
            r.region.size as usize,
            mode,
        )
        .map_err(PageServerError::Register)?;
    }
    Ok(Some(Arc::new(PageServer::new(
        uffd,
        uffd_regions,
        pages,
        config,
    ))))
}
