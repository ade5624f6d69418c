//! Restoring a VM from a snapshot, in one of four memory modes:
//!
//! | mode | guest RAM | cost at restore | later |
//! | --- | --- | --- | --- |
//! | `eager` | anonymous, the file's data extents read in before the vCPUs start | grows with data size | none |
//! | `mmap` | the memory file mapped MAP_PRIVATE: clones share its page cache, writes are copy-on-write | constant | page-cache faults |
//! | `uffd` | anonymous, registered with userfaultfd; the page server answers each missing page | constant | one fault per fault-around window |
//! | `uffd-prefetch` | as `uffd`, with the recorded working set installed in batched io_uring reads first | grows with the working set | faults only outside it |
//!
//! Everything in the snapshot is checked before a VM is created: the state's magic, version and
//! checksum, the memory layout against the memory file, the working set's pages, and the guest's
//! CPUID against what this host's KVM offers.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::{Serial, SerialOutput};
use snapshot::PAGE_SIZE;
use snapshot::dir::{DirError, SnapshotDir};
use snapshot::format::{self, FormatError};
use snapshot::memory::{self, HoleMap, MemoryFileError, MemoryRegion};
use snapshot::page_server::{
    FileSource, PageServer, PageServerConfig, PageServerError, PageServerHandle, UffdRegion,
    create_uffd,
};
use snapshot::prefetch::{self, PrefetchStats};
use snapshot::workingset::{self, WorkingSetError};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use super::{
    BuildVmError, Launch, MemoryBacking, PageServerReport, VmReport, kvm_err, launch, pio_bus,
    prepare, register_memory, serial_trigger, validate_shape,
};
use crate::layout::MemoryLayout;
use crate::persist::{self, VmState};
use crate::vcpu::Vcpu;

/// How guest memory is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Read the whole memory file before resuming.
    Eager,
    /// Map the memory file MAP_PRIVATE.
    Mmap,
    /// Serve pages on demand through userfaultfd.
    Uffd,
    /// As `Uffd`, after installing the recorded working set.
    UffdPrefetch,
}

/// Everything needed to restore a VM.
#[derive(Debug)]
pub struct RestoreConfig {
    /// The snapshot directory.
    pub snapshot: PathBuf,
    /// The memory mode.
    pub mode: RestoreMode,
    /// Where to listen for control requests.
    pub api_sock: Option<PathBuf>,
    /// Where the guest's console output goes.
    pub serial: SerialOutput,
    /// Whether to feed stdin to the guest's serial port.
    pub forward_stdin: bool,
    /// Pages installed per fault in the uffd modes.
    pub fault_around: usize,
    /// Record the working set even if the snapshot has one (uffd mode).
    pub record_workingset: bool,
    /// In `uffd-prefetch`, install the working set before the vCPUs start instead of while they
    /// run.
    pub prefetch_before: bool,
    /// Backing files for the snapshot's spare disk slots, by slot name.
    pub disk_slots: std::collections::HashMap<String, PathBuf>,
    /// When the process started.
    pub process_start: Instant,
}

/// Why a snapshot cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The directory is not a snapshot.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The state file is damaged or foreign.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The memory file does not match.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// The working set is damaged.
    #[error(transparent)]
    WorkingSet(#[from] WorkingSetError),
    /// The state is inconsistent.
    #[error("invalid snapshot state: {0}")]
    Invalid(String),
    /// uffd-prefetch without a working set.
    #[error("{0} has no working set: restore it once with --mode uffd to record one")]
    NoWorkingSet(PathBuf),
    /// The page server could not start.
    #[error(transparent)]
    PageServer(#[from] PageServerError),
}

/// Guest memory served by the page server, and what to do with its recording.
#[derive(Debug)]
pub(super) struct LazyMemory {
    pub handle: PageServerHandle,
    pub record_to: Option<PathBuf>,
    pub prefetch: Prefetch,
}

/// The working-set prefetch of a `uffd-prefetch` restore.
#[derive(Debug)]
pub(super) enum Prefetch {
    /// None (`uffd` mode).
    None,
    /// Done before the vCPUs started.
    Done(PrefetchStats),
    /// Running beside the vCPUs on its own thread.
    Running(std::thread::JoinHandle<Result<PrefetchStats, PageServerError>>),
}

impl LazyMemory {
    /// Stops the server, writes the recorded working set if asked, and reports.
    pub fn finish(mut self) -> PageServerReport {
        let prefetch = match std::mem::replace(&mut self.prefetch, Prefetch::None) {
            Prefetch::None => None,
            Prefetch::Done(stats) => Some(stats),
            Prefetch::Running(thread) => match thread.join() {
                Ok(Ok(stats)) => Some(stats),
                Ok(Err(e)) => {
                    tracing::error!("prefetch: {e}");
                    None
                }
                Err(_) => None,
            },
        };
        let stopped = self.handle.stop();
        let server = self.handle.server().clone();
        let s = &server.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let mut times = s
            .service_ns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        times.sort_unstable();
        let pick = |q: f64| {
            times
                .get(((times.len().max(1) - 1) as f64 * q) as usize)
                .map(|&ns| f64::from(ns) / 1e3)
        };
        let mut report = PageServerReport {
            faults: load(&s.faults),
            pages_copied: load(&s.pages_copied),
            pages_zeroed: load(&s.pages_zeroed),
            wakes: load(&s.wakes),
            median_us: pick(0.5),
            p99_us: pick(0.99),
            prefetched_pages: prefetch.map(|p| p.data_pages + p.zero_pages).unwrap_or(0),
            prefetch_ms: prefetch.map(|p| p.elapsed.as_secs_f64() * 1e3),
            recorded_pages: None,
        };
        if let Err(e) = stopped {
            tracing::error!("page server: {e}");
        }
        if let Some(path) = self.record_to.take() {
            let pages = server.recorded();
            match workingset::write(&path, &pages) {
                Ok(()) => {
                    tracing::info!(
                        "working set of {} pages recorded to {}",
                        pages.len(),
                        path.display()
                    );
                    report.recorded_pages = Some(pages.len() as u64);
                }
                Err(e) => tracing::error!("cannot record the working set: {e}"),
            }
        }
        report
    }
}

/// Checks the state against itself and the layout the VMM would build for it.
fn validate_state(state: &VmState) -> Result<MemoryLayout, RestoreError> {
    let layout =
        MemoryLayout::new(state.mem_mib).map_err(|e| RestoreError::Invalid(e.to_string()))?;
    let ranges: Vec<(u64, u64)> = layout.ram.iter().map(|r| (r.start, r.size)).collect();
    let expected = memory::file_layout(&ranges);
    if state.memory != expected {
        return Err(RestoreError::Invalid(format!(
            "memory layout {:?} does not match {} MiB of guest memory",
            state.memory, state.mem_mib
        )));
    }
    if state.vcpus.is_empty() {
        return Err(RestoreError::Invalid("no vCPUs".into()));
    }
    for (i, v) in state.vcpus.iter().enumerate() {
        if usize::from(v.id) != i {
            return Err(RestoreError::Invalid(format!(
                "vCPU {i} is saved as vCPU {}",
                v.id
            )));
        }
    }
    Ok(layout)
}

fn anonymous_memory(layout: &MemoryLayout, mib: u64) -> Result<GuestMemoryMmap, BuildVmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| BuildVmError::Memory {
        mib,
        detail: e.to_string(),
    })
}

/// `eager`: copies every data extent of the file into fresh anonymous memory.
fn eager_memory(
    layout: &MemoryLayout,
    mib: u64,
    regions: &[MemoryRegion],
    file: &File,
    holes: &HoleMap,
) -> Result<GuestMemoryMmap, BuildVmError> {
    let mem = anonymous_memory(layout, mib)?;
    let mem_err = |detail: String| BuildVmError::Memory { mib, detail };
    for &(start, end) in holes.extents() {
        for r in regions {
            let lo = start.max(r.file_offset);
            let hi = end.min(r.file_offset + r.size);
            if lo >= hi {
                continue;
            }
            let host = mem
                .get_host_address(GuestAddress(r.guest_addr + (lo - r.file_offset)))
                .map_err(|e| mem_err(e.to_string()))?;
            // SAFETY: [host, host + hi - lo) lies inside the region's live mapping (checked by the
            // layout validation), and no vCPU runs yet.
            let dst = unsafe { std::slice::from_raw_parts_mut(host, (hi - lo) as usize) };
            file.read_exact_at(dst, lo)
                .map_err(|e| mem_err(format!("reading the memory file: {e}")))?;
        }
    }
    Ok(mem)
}

/// `mmap`: the memory file mapped privately, region by region.
fn mmap_memory(
    mib: u64,
    regions: &[MemoryRegion],
    file: &File,
) -> Result<GuestMemoryMmap, BuildVmError> {
    let mem_err = |detail: String| BuildVmError::Memory { mib, detail };
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let f = file.try_clone().map_err(|e| mem_err(e.to_string()))?;
        let region = vm_memory::mmap::MmapRegionBuilder::<()>::new(r.size as usize)
            .with_file_offset(FileOffset::new(f, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| mem_err(e.to_string()))?;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| mem_err("region overflows".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| mem_err(e.to_string()))
}

/// `uffd` and `uffd-prefetch`: anonymous memory registered with a userfaultfd, and the server.
fn lazy_memory(
    layout: &MemoryLayout,
    mib: u64,
    regions: &[MemoryRegion],
    source: FileSource,
    config: PageServerConfig,
) -> Result<(GuestMemoryMmap, Arc<PageServer>), BuildVmError> {
    let mem = anonymous_memory(layout, mib)?;
    let uffd = create_uffd().map_err(RestoreError::from)?;
    let mut uffd_regions = Vec::with_capacity(regions.len());
    for r in regions {
        let host = mem
            .get_host_address(GuestAddress(r.guest_addr))
            .map_err(|e| BuildVmError::Memory {
                mib,
                detail: e.to_string(),
            })? as usize;
        PageServer::register(&uffd, host, r.size as usize).map_err(RestoreError::from)?;
        uffd_regions.push(UffdRegion {
            host_addr: host,
            region: *r,
        });
    }
    Ok((
        mem,
        Arc::new(PageServer::new(uffd, uffd_regions, source, config)),
    ))
}

/// Restores a VM from a snapshot and runs it until it stops.
pub fn restore(config: RestoreConfig) -> Result<VmReport, BuildVmError> {
    // Everything about the snapshot is checked before any VM exists.
    let dir = SnapshotDir::open(&config.snapshot).map_err(RestoreError::from)?;
    let state: VmState = format::read_file(&dir.state()).map_err(RestoreError::from)?;
    let layout = validate_state(&state)?;
    let (file, holes) =
        memory::open_memory_file(&dir.memory(), &state.memory).map_err(RestoreError::from)?;
    let total_pages = holes.len() / PAGE_SIZE as u64;
    let recorded = workingset::read(&dir.workingset(), total_pages).map_err(RestoreError::from)?;
    let workingset = match (config.mode, recorded) {
        (RestoreMode::UffdPrefetch, None) => {
            return Err(RestoreError::NoWorkingSet(dir.path.clone()).into());
        }
        (_, ws) => ws,
    };
    let count = state.vcpus.len() as u8;
    validate_shape(count, state.mem_mib)?;

    let p = prepare(config.api_sock.as_deref(), config.process_start)?;
    persist::check_cpuid_compatible(&state.host_cpuid, p.supported_cpuid.as_slice())?;
    persist::check_xsave_size(&p.kvm)?;

    let mib = state.mem_mib;
    let (mem, backing, lazy) = match config.mode {
        RestoreMode::Eager => (
            eager_memory(&layout, mib, &state.memory, &file, &holes)?,
            MemoryBacking::Anonymous,
            None,
        ),
        RestoreMode::Mmap => (
            mmap_memory(mib, &state.memory, &file)?,
            MemoryBacking::Lazy,
            None,
        ),
        RestoreMode::Uffd | RestoreMode::UffdPrefetch => {
            let record = config.mode == RestoreMode::Uffd
                && (workingset.is_none() || config.record_workingset);
            let server_config = PageServerConfig {
                fault_around: config.fault_around,
                record,
            };
            let (mem, server) = lazy_memory(
                &layout,
                mib,
                &state.memory,
                FileSource { file, holes },
                server_config,
            )?;
            let handle = PageServerHandle::spawn(server.clone()).map_err(RestoreError::from)?;
            let prefetch = match (workingset, config.mode) {
                (Some(ws), RestoreMode::UffdPrefetch) if config.prefetch_before => {
                    Prefetch::Done(prefetch::prefetch(&server, &ws).map_err(RestoreError::from)?)
                }
                (Some(ws), RestoreMode::UffdPrefetch) => {
                    // Beside the vCPUs: a page they touch first is served by a fault; the
                    // prefetcher then finds it installed (or gets EEXIST) and moves on.
                    let server = server.clone();
                    Prefetch::Running(
                        std::thread::Builder::new()
                            .name("prefetch".into())
                            .spawn(move || prefetch::prefetch(&server, &ws))
                            .map_err(|e| RestoreError::from(PageServerError::Thread(e)))?,
                    )
                }
                _ => Prefetch::None,
            };
            let record_to = record.then(|| dir.workingset());
            (
                mem,
                MemoryBacking::Lazy,
                Some(LazyMemory {
                    handle,
                    record_to,
                    prefetch,
                }),
            )
        }
    };
    register_memory(&p.vm, &mem, mib)?;
    persist::restore_vm(&p.vm, &state.vm)?;

    let trigger = serial_trigger(&p.vm)?;
    let serial = Serial::restore(trigger, config.serial, &state.devices.serial)
        .map_err(|e| RestoreError::Invalid(e.to_string()))?;
    let serial = Arc::new(Mutex::new(serial));
    let pio = pio_bus(&serial, &p.stop)?;
    let mut mmio = devices::Bus::new();
    let virtio =
        super::virtio::restore_devices(&p.vm, &mem, &mut mmio, &state.virtio, &config.disk_slots)?;
    let mmio = Arc::new(mmio);
    let msr_indices = Arc::new(persist::msr_index_list(&p.kvm)?);
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for vs in &state.vcpus {
        let fd =
            p.vm.create_vcpu(u64::from(vs.id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        persist::restore_vcpu(&fd, vs)?;
        vcpus.push(Vcpu {
            fd,
            id: vs.id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            stop: p.stop.clone(),
            msr_indices: msr_indices.clone(),
        });
    }
    launch(
        p,
        Launch {
            vcpus,
            mem,
            layout,
            backing,
            mem_mib: mib,
            serial,
            forward_stdin: config.forward_stdin,
            snapshot_on_ready: None,
            page_server: lazy,
            virtio,
            process_start: config.process_start,
        },
    )
}
