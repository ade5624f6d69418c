//! Loading a guest from a snapshot, in one of four memory modes, each a
//! [`snapshot::memory_source::MemorySource`]:
//!
//! | mode | guest RAM | cost at restore | later |
//! | --- | --- | --- | --- |
//! | `eager` | anonymous, the file's data extents read in before the vCPUs start | grows with data size | none |
//! | `mmap` | the memory file mapped MAP_PRIVATE: clones share its page cache, writes are copy-on-write | constant | page-cache faults |
//! | `uffd` | anonymous, registered with userfaultfd; the page server answers each missing page | constant | one fault per fault-around window |
//! | `uffd-prefetch` | as `uffd`, with the recorded working set installed in batched reads | grows with the working set | faults only outside it |
//!
//! [`CheckedSnapshot::open`] checks everything before a VM exists: the state's magic, version and
//! checksum, the memory layout against the memory file, that `state`, `memory` and `workingset`
//! carry one snapshot id, the working set's pages, and this host's KVM (CPUID, XSAVE size) against
//! the snapshotting host's. Nothing is ever written into the snapshot: a working set is recorded
//! only to a path the caller gives.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::Serial;
use snapshot::PAGE_SIZE;
use snapshot::SnapshotId;
use snapshot::dir::{DirError, SnapshotDir, SnapshotFiles};
use snapshot::format::FormatError;
use snapshot::memory::{self, MemoryFileError};
use snapshot::memory_source::{self, EagerMemory, MemorySource, MmapMemory, UffdMemory};
use snapshot::page_server::{PageServerConfig, PageServerError, PageServerHandle};
use snapshot::prefetch::{self, PrefetchStats};
use snapshot::source::FileSource;
use snapshot::workingset::{self, WorkingSetError};

use super::kvm_system::KvmSystem;
use super::shell::ShellParts;
use super::{
    BuildVmError, HostResources, Loaded, MemoryBacking, PageServerReport, pio_bus, place_memory,
    serial_trigger, validate_shape,
};
use crate::layout::MemoryLayout;
use crate::persist::{self, VmState};
use crate::seccomp::ThreadKind;
use crate::vcpu::{ParkedVcpuThread, Vcpu};

/// How guest memory is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Read the whole memory file before resuming.
    Eager,
    /// Map the memory file MAP_PRIVATE.
    Mmap,
    /// Serve pages on demand through userfaultfd.
    Uffd,
    /// As `Uffd`, after (or while) installing the recorded working set.
    UffdPrefetch,
    /// As `Mmap`, with the recorded working set made present (`MADV_POPULATE_READ`) while the
    /// vCPUs run: lazy, prefetched, and clean pages shared between clones in the page cache.
    MmapPrefetch,
}

impl RestoreMode {
    /// Whether the mode prefetches the recorded working set.
    pub fn prefetches(self) -> bool {
        matches!(self, RestoreMode::UffdPrefetch | RestoreMode::MmapPrefetch)
    }
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
    /// The state's memory layout is not the one its size gives.
    #[error(
        "invalid snapshot state: memory layout {found:?} does not match {mib} MiB of guest memory"
    )]
    LayoutMismatch {
        /// The state's layout.
        found: Vec<memory::MemoryRegion>,
        /// Its memory size.
        mib: u64,
    },
    /// The state's vCPUs are not numbered 0..n.
    #[error("invalid snapshot state: vCPU {index} is saved as vCPU {id}")]
    VcpuOrder {
        /// Position.
        index: usize,
        /// Saved id.
        id: u8,
    },
    /// The state has no vCPU.
    #[error("invalid snapshot state: no vCPUs")]
    NoVcpus,
    /// The saved serial port is inconsistent.
    #[error("invalid snapshot state: serial port: {0}")]
    Serial(#[source] devices::legacy::serial::SerialRestoreError),
    /// uffd-prefetch without a working set.
    #[error(
        "{0} has no working set: record one with `restore --mode uffd --record-workingset {0}/workingset`"
    )]
    NoWorkingSet(PathBuf),
    /// Recording asked for in a mode that does not serve faults.
    #[error("--record-workingset needs --mode uffd")]
    RecordNeedsUffd,
    /// A recording restore was asked to be pre-loaded.
    #[error("a restore that records its working set cannot be pre-loaded")]
    RecordPreload,
    /// The working-set destination cannot be written.
    #[error("cannot record the working set to {0}: its directory does not exist")]
    RecordDest(PathBuf),
    /// The page server could not start.
    #[error(transparent)]
    PageServer(#[from] PageServerError),
    /// The prefetcher's io_uring could not be set up.
    #[error("cannot set up the prefetch ring: {0}")]
    PrefetchRing(#[source] std::io::Error),
}

/// Record the start-up working set of a uffd restore.
#[derive(Debug, Clone)]
pub struct RecordWorkingSet {
    /// The file to write (atomically, never inside the snapshot unless the caller names it).
    pub path: PathBuf,
    /// End the recording after this long, if READY or a request has not ended it first.
    pub limit: Option<Duration>,
}

/// The vCPU count and memory size of the snapshot in `dir` (its state file only, checksum
/// checked): enough to choose a VM shell for it.
pub fn snapshot_shape(dir: &Path) -> Result<(u8, u64), BuildVmError> {
    let read = SnapshotState::read(dir)?;
    Ok((read.vcpus()?, read.mem_mib()))
}

/// A snapshot's state file, read and checksummed, before the rest is checked: what a restore
/// needs to know to build its VM shell while it checks the rest.
#[derive(Debug)]
pub struct SnapshotState {
    snap: SnapshotDir,
    /// The memory and working-set files when opened by another process (see
    /// [`SnapshotState::from_files`]); else they are opened by path.
    opened: Option<(File, Option<File>)>,
    id: SnapshotId,
    state: VmState,
}

impl SnapshotState {
    /// Opens `dir` and reads its state file.
    pub fn read(dir: &Path) -> Result<Self, BuildVmError> {
        let snap = SnapshotDir::open(dir).map_err(RestoreError::from)?;
        let (id, state) = snapshot::format::read_file(&snap.state()).map_err(RestoreError::from)?;
        Ok(Self {
            snap,
            opened: None,
            id,
            state,
        })
    }

    /// Reads the state file of the snapshot whose files another process opened (a jailed pool
    /// shell cannot open its client's paths); `dir` only names the snapshot in errors. Each
    /// file must be a regular file.
    pub fn from_files(dir: &Path, files: SnapshotFiles) -> Result<Self, BuildVmError> {
        files.check(dir).map_err(RestoreError::from)?;
        let snap = SnapshotDir {
            path: dir.to_path_buf(),
        };
        let (id, state) =
            snapshot::format::read_from(files.state, &snap.state()).map_err(RestoreError::from)?;
        Ok(Self {
            snap,
            opened: Some((files.memory, files.workingset)),
            id,
            state,
        })
    }

    /// The snapshot's vCPU count.
    pub fn vcpus(&self) -> Result<u8, BuildVmError> {
        u8::try_from(self.state.vcpus.len()).map_err(|_| BuildVmError::VcpuCount(u8::MAX))
    }

    /// Its guest memory in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.state.mem_mib
    }

    /// Its spare disk slots: each one's name and whether it is read-only (how a restorer that
    /// opens their files for the VMM must open them).
    pub fn spare_slots(&self) -> Vec<(String, bool)> {
        self.state
            .virtio
            .iter()
            .filter_map(|d| match &d.state {
                super::virtio::VirtioState::Block(b) => b
                    .disk
                    .spare_slot
                    .clone()
                    .map(|name| (name, b.disk.read_only)),
                _ => None,
            })
            .collect()
    }

    /// Checks every other part of the snapshot for a restore in `mode` on the host whose KVM
    /// is `kvm` (see [`CheckedSnapshot::open`]).
    pub fn check(
        self,
        mode: RestoreMode,
        kvm: &KvmSystem,
    ) -> Result<CheckedSnapshot, BuildVmError> {
        CheckedSnapshot::from_state(self, mode, kvm)
    }
}

/// A snapshot whose every part was checked, ready to load.
#[derive(Debug)]
pub struct CheckedSnapshot {
    dir: PathBuf,
    id: SnapshotId,
    state: VmState,
    layout: MemoryLayout,
    mode: RestoreMode,
    memory: Box<dyn MemorySource>,
    workingset: Option<Vec<u64>>,
}

/// Checks the state against itself and the layout the VMM would build for it.
fn validate_state(state: &VmState) -> Result<MemoryLayout, BuildVmError> {
    let count = u8::try_from(state.vcpus.len()).map_err(|_| BuildVmError::VcpuCount(u8::MAX))?;
    if count == 0 {
        return Err(RestoreError::NoVcpus.into());
    }
    let layout = validate_shape(count, state.mem_mib)?;
    let ranges: Vec<(u64, u64)> = layout.ram.iter().map(|r| (r.start, r.size)).collect();
    if state.memory != memory::file_layout(&ranges) {
        return Err(RestoreError::LayoutMismatch {
            found: state.memory.clone(),
            mib: state.mem_mib,
        }
        .into());
    }
    for (index, v) in state.vcpus.iter().enumerate() {
        if usize::from(v.id) != index {
            return Err(RestoreError::VcpuOrder { index, id: v.id }.into());
        }
    }
    Ok(layout)
}

impl CheckedSnapshot {
    /// Step 1 of a restore, before any VM exists: opens `dir` and checks every part of it for a
    /// restore in `mode`, and this host's KVM (`kvm`) against the snapshotting host's.
    pub fn open(dir: &Path, mode: RestoreMode, kvm: &KvmSystem) -> Result<Self, BuildVmError> {
        SnapshotState::read(dir)?.check(mode, kvm)
    }

    fn from_state(
        read: SnapshotState,
        mode: RestoreMode,
        kvm: &KvmSystem,
    ) -> Result<Self, BuildVmError> {
        let SnapshotState {
            snap,
            opened,
            id,
            state,
        } = read;
        let layout = validate_state(&state)?;
        let (memory_file, ws_file) = match opened {
            Some((m, w)) => (Some(m), Some(w)),
            None => (None, None),
        };
        let (file, holes) = match memory_file {
            Some(f) => memory::check_memory_file(f, &state.memory, &id),
            None => memory::open_memory_file(&snap.memory(), &state.memory, &id),
        }
        .map_err(RestoreError::from)?;
        let total_pages = holes.len() / PAGE_SIZE as u64;
        let workingset = match mode {
            RestoreMode::UffdPrefetch | RestoreMode::MmapPrefetch => Some(
                match ws_file {
                    Some(Some(f)) => workingset::read_from(f, &id, total_pages).map(Some),
                    Some(None) => Ok(None),
                    None => workingset::read(&snap.workingset(), &id, total_pages),
                }
                .map_err(RestoreError::from)?
                .ok_or_else(|| RestoreError::NoWorkingSet(snap.path.clone()))?,
            ),
            _ => None,
        };
        persist::check_cpuid_compatible(&state.host_cpuid, kvm.supported_cpuid().as_slice())?;
        persist::check_xsave_size(kvm.kvm())?;
        let memory: Box<dyn MemorySource> = match mode {
            RestoreMode::Eager => Box::new(EagerMemory::new(file, holes)),
            RestoreMode::Mmap | RestoreMode::MmapPrefetch => Box::new(MmapMemory::new(file)),
            RestoreMode::Uffd => Box::new(UffdMemory::new(FileSource::new(file, holes))),
            RestoreMode::UffdPrefetch => {
                let m = UffdMemory::new(FileSource::new(file, holes));
                // The prefetcher's ring exists before any seccomp filter forbids creating one.
                m.prepare_prefetch().map_err(RestoreError::PrefetchRing)?;
                Box::new(m)
            }
        };
        Ok(Self {
            dir: snap.path,
            id,
            state,
            layout,
            mode,
            memory,
            workingset,
        })
    }

    /// The snapshot's id.
    pub fn id(&self) -> SnapshotId {
        self.id
    }

    /// Its vCPU count.
    pub fn vcpus(&self) -> u8 {
        self.state.vcpus.len() as u8
    }

    /// Its guest memory in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.state.mem_mib
    }

    /// Whether it has a vsock device (whose host socket a restore must give).
    pub fn has_vsock(&self) -> bool {
        self.state
            .virtio
            .iter()
            .any(|d| matches!(d.state, super::virtio::VirtioState::Vsock(_)))
    }
}

/// What a restore loads: the checked snapshot and how to serve its memory.
#[derive(Debug)]
pub struct SnapshotSpec {
    snapshot: CheckedSnapshot,
    fault_around: usize,
    prefetch_before: bool,
    record: Option<RecordWorkingSet>,
}

impl SnapshotSpec {
    /// A restore of `snapshot`: `fault_around` pages per fault (uffd modes), the working set
    /// installed before the vCPUs start (`prefetch_before`) or beside them, and optionally the
    /// start-up working set recorded (uffd mode only).
    pub fn new(
        snapshot: CheckedSnapshot,
        fault_around: usize,
        prefetch_before: bool,
        record: Option<RecordWorkingSet>,
    ) -> Result<Self, BuildVmError> {
        if let Some(r) = &record {
            if snapshot.mode != RestoreMode::Uffd {
                return Err(RestoreError::RecordNeedsUffd.into());
            }
            let parent = r
                .path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(RestoreError::RecordDest(r.path.clone()).into());
            }
        }
        Ok(Self {
            snapshot,
            // A recording restore installs exactly the pages the guest touches, in the order it
            // touches them: the working set is then the guest's first touches, not windows.
            fault_around: if record.is_some() {
                1
            } else {
                fault_around.max(1)
            },
            prefetch_before,
            record,
        })
    }

    /// The snapshot's vCPU count (the shell must have as many).
    pub fn vcpus(&self) -> u8 {
        self.snapshot.vcpus()
    }

    /// The checked snapshot.
    pub fn snapshot(&self) -> &CheckedSnapshot {
        &self.snapshot
    }

    /// Whether the restore records its start-up working set (it cannot be pre-loaded: a
    /// recording starts with the guest).
    pub fn records(&self) -> bool {
        self.record.is_some()
    }
}

/// Guest memory served by the page server, its prefetch, and the working set being recorded.
#[derive(Debug)]
pub(super) struct LazyMemory {
    handle: Option<PageServerHandle>,
    prefetch: Prefetch,
    record: Option<(RecordWorkingSet, SnapshotId)>,
    recorded_pages: Option<u64>,
}

/// The working-set prefetch of a `uffd-prefetch` restore.
#[derive(Debug)]
enum Prefetch {
    /// None (`uffd` mode).
    None,
    /// Done before the vCPUs started.
    Done(PrefetchStats),
    /// Running beside the vCPUs on its own thread.
    Running(std::thread::JoinHandle<Result<PrefetchStats, PageServerError>>),
}

impl LazyMemory {
    /// Whether the page server thread has ended (the guest would stall on its next fault).
    pub fn server_ended(&self) -> bool {
        self.handle
            .as_ref()
            .is_some_and(PageServerHandle::is_finished)
    }

    /// Whether a working set is being recorded (the loop writes its file at the end).
    pub fn is_recording(&self) -> bool {
        self.record.is_some()
    }

    /// How long recording may last.
    pub fn recording_limit(&self) -> Option<Duration> {
        self.record.as_ref().and_then(|(r, _)| r.limit)
    }

    /// Ends the recording and writes the working set; `false` if nothing was recording.
    pub fn finish_recording(&mut self, why: &str) -> bool {
        let Some(handle) = &self.handle else {
            return false;
        };
        let Some((record, id)) = self.record.take() else {
            return false;
        };
        let pages = handle.server().finish_recording();
        match workingset::write(&record.path, &id, &pages) {
            Ok(()) => {
                tracing::info!(
                    "start-up working set of {} pages recorded to {} (ended by {why})",
                    pages.len(),
                    record.path.display()
                );
                self.recorded_pages = Some(pages.len() as u64);
            }
            Err(e) => tracing::error!(
                "cannot write the working set to {}: {e}",
                record.path.display()
            ),
        }
        true
    }

    /// Stops the server, writes a recording still open, and reports.
    pub fn finish(mut self) -> PageServerReport {
        self.finish_recording("VM stop");
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
        let Some(mut handle) = self.handle.take() else {
            return PageServerReport {
                prefetched_pages: prefetch.map(|p| p.data_pages + p.zero_pages).unwrap_or(0),
                prefetch_ms: prefetch.map(|p| p.elapsed.as_secs_f64() * 1e3),
                ..Default::default()
            };
        };
        let stopped = handle.stop();
        let server = handle.server().clone();
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
        if let Err(e) = stopped {
            tracing::error!("page server: {e}");
        }
        PageServerReport {
            faults: load(&s.faults),
            pages_copied: load(&s.pages_copied),
            pages_zeroed: load(&s.pages_zeroed),
            wakes: load(&s.wakes),
            median_us: pick(0.5),
            p99_us: pick(0.99),
            prefetched_pages: prefetch.map(|p| p.data_pages + p.zero_pages).unwrap_or(0),
            prefetch_ms: prefetch.map(|p| p.elapsed.as_secs_f64() * 1e3),
            recorded_pages: self.recorded_pages,
            workingset_pages: server.expected_pages(),
            faults_in_set: load(&s.faults_in_set),
            faults_outside_set: load(&s.faults_outside_set),
        }
    }
}

/// A snapshot's guest loaded into a shell before any host resource of the VM is known: guest
/// memory (with its page server and prefetch), the interrupt controllers and PIT, every device
/// slot's ioeventfds and irqfds, every vCPU's state. [`attach`] finishes the load with the host
/// resources; a pool shell holds a `GuestLoaded` until it is claimed.
#[derive(Debug)]
pub(super) struct GuestLoaded {
    id: SnapshotId,
    /// Each vCPU's fd, id and saved TSC.
    vcpus: Vec<(kvm_ioctls::VcpuFd, u8, Option<u64>)>,
    clock: kvm_bindings::kvm_clock_data,
    mem: vm_memory::GuestMemoryMmap,
    layout: MemoryLayout,
    backing: MemoryBacking,
    mem_mib: u64,
    lazy: Option<LazyMemory>,
    reservation: Option<memory_source::Reservation>,
    serial_trigger: devices::legacy::EventFdTrigger,
    serial: devices::legacy::serial::SerialSnapshot,
    slots: Vec<super::virtio::PreparedSlot>,
    /// The vCPU threads, started with their seccomp filter installed, waiting for their vCPU.
    parked: Vec<ParkedVcpuThread>,
}

impl GuestLoaded {
    /// The loaded snapshot's id.
    pub fn id(&self) -> SnapshotId {
        self.id
    }
}

/// Step 3 for a restore, on the VMM thread: [`load_guest`], then [`attach`].
pub(super) fn load(
    shell: &mut ShellParts,
    spec: SnapshotSpec,
    host: HostResources,
) -> Result<Loaded, BuildVmError> {
    let guest = load_guest(shell, spec)?;
    attach(shell, guest, host)
}

/// The template half of step 3: everything of the snapshot that needs no host resource.
pub(super) fn load_guest(
    shell: &mut ShellParts,
    spec: SnapshotSpec,
) -> Result<GuestLoaded, BuildVmError> {
    let SnapshotSpec {
        snapshot,
        fault_around,
        prefetch_before,
        record,
    } = spec;
    let CheckedSnapshot {
        dir,
        id,
        state,
        layout,
        mode,
        memory: source,
        workingset,
    } = snapshot;
    let count = state.vcpus.len() as u8;
    if shell.vcpu_fds.len() != usize::from(count) {
        return Err(BuildVmError::VcpuMismatch {
            shell: shell.vcpu_fds.len() as u8,
            guest: count,
        });
    }
    tracing::debug!(
        "restoring snapshot {id} from {} in {mode:?} mode",
        dir.display()
    );

    // Guest memory from its source, its memslots, and the page server where it has one.
    let (mem, reservation) =
        place_memory(
            shell,
            &state.memory,
            |at| Ok(source.map(&state.memory, at)?),
        )?;
    let server_config = PageServerConfig {
        fault_around,
        record: record.is_some(),
    };
    let lazy = match memory_source::serve(&*source, &mem, &state.memory, server_config)? {
        None => match workingset {
            // mmap-prefetch: the working set made present in the file mapping, no page server.
            Some(ws) => {
                let regions = memory_source::host_regions(&mem, &state.memory)?;
                let populate = move || {
                    prefetch::populate(&regions, &ws)
                        .map_err(|e| PageServerError::Start(std::io::Error::other(e)))
                };
                let prefetch = if prefetch_before {
                    Prefetch::Done(populate().map_err(RestoreError::from)?)
                } else {
                    let filters = shell.seccomp.clone();
                    Prefetch::Running(
                        std::thread::Builder::new()
                            .name("prefetch".into())
                            .spawn(move || {
                                filters.apply(ThreadKind::Prefetch).map_err(|e| {
                                    PageServerError::Start(std::io::Error::other(e))
                                })?;
                                populate()
                            })
                            .map_err(|source| BuildVmError::Thread {
                                what: "prefetch",
                                source,
                            })?,
                    )
                };
                Some(LazyMemory {
                    handle: None,
                    prefetch,
                    record: None,
                    recorded_pages: None,
                })
            }
            None => None,
        },
        Some(server) => {
            let filters = shell.seccomp.clone();
            let handle = PageServerHandle::spawn_with(server.clone(), move || {
                filters
                    .apply(ThreadKind::PageServer)
                    .map_err(std::io::Error::other)
            })
            .map_err(RestoreError::from)?;
            if let Some(ws) = &workingset {
                server.expect(ws);
            }
            let prefetch = match workingset {
                Some(ws) if prefetch_before => {
                    Prefetch::Done(prefetch::prefetch(&server, &ws).map_err(RestoreError::from)?)
                }
                Some(ws) => {
                    // Beside the vCPUs: a page they touch first is served by a fault; the
                    // prefetcher then finds it installed (or gets EEXIST) and moves on.
                    let server = server.clone();
                    let filters = shell.seccomp.clone();
                    Prefetch::Running(
                        std::thread::Builder::new()
                            .name("prefetch".into())
                            .spawn(move || {
                                filters.apply(ThreadKind::Prefetch).map_err(|e| {
                                    PageServerError::Start(std::io::Error::other(e))
                                })?;
                                prefetch::prefetch(&server, &ws)
                            })
                            .map_err(|source| BuildVmError::Thread {
                                what: "prefetch",
                                source,
                            })?,
                    )
                }
                None => Prefetch::None,
            };
            Some(LazyMemory {
                handle: Some(handle),
                prefetch,
                record: record.map(|r| (r, id)),
                recorded_pages: None,
            })
        }
    };
    let backing = if source.absent_pages_are_zero() {
        MemoryBacking::Anonymous
    } else {
        MemoryBacking::Lazy
    };
    persist::restore_vm(&shell.vm, &state.vm)?;
    let serial_trigger = serial_trigger(&shell.vm)?;
    let slots = super::virtio::prepare_slots(&shell.vm, &state.virtio)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (vs, fd) in state.vcpus.iter().zip(std::mem::take(&mut shell.vcpu_fds)) {
        persist::restore_vcpu(&fd, vs)?;
        vcpus.push((fd, vs.id, vs.tsc()));
    }
    let parked = vcpus
        .iter()
        .map(|(_, id, _)| ParkedVcpuThread::spawn(*id, &shell.seccomp))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| BuildVmError::Thread {
            what: "vCPU",
            source,
        })?;
    Ok(GuestLoaded {
        id,
        vcpus,
        clock: state.vm.clock,
        mem,
        layout,
        backing,
        mem_mib: state.mem_mib,
        lazy,
        reservation,
        serial_trigger,
        serial: state.devices.serial,
        slots,
        parked,
    })
}

/// The attach half of step 3: the VM's host resources (console, spare disk slots, vsock
/// socket) given to its devices, and the clocks set to the snapshot's. Quick: every KVM
/// registration and vCPU state was done by [`load_guest`].
pub(super) fn attach(
    shell: &mut ShellParts,
    guest: GuestLoaded,
    host: HostResources,
) -> Result<Loaded, BuildVmError> {
    let GuestLoaded {
        id: _,
        vcpus: fds,
        clock,
        mem,
        layout,
        backing,
        mem_mib,
        lazy,
        reservation,
        serial_trigger,
        serial,
        slots,
        parked,
    } = guest;
    let serial =
        Serial::restore(serial_trigger, host.serial, &serial).map_err(RestoreError::Serial)?;
    let serial = Arc::new(Mutex::new(serial));
    let pio = pio_bus(&serial, &shell.stop)?;
    let mut mmio = devices::Bus::new();
    let virtio = super::virtio::restore_devices(
        &mem,
        &mut mmio,
        slots,
        super::virtio::HostDisks {
            paths: &host.disk_slots,
            files: host.disk_files,
        },
        host.vsock.as_ref().map(|v| (v, host.vsock_listener)),
        host.net,
        super::virtio::FsHosts {
            slots: host.fs,
            setup: &crate::seccomp::fs_thread_setup(&shell.seccomp),
        },
    )?;
    let mmio = Arc::new(mmio);
    let clocks: Vec<_> = fds.iter().map(|(fd, _, tsc)| (fd, *tsc)).collect();
    if let Err(e) = persist::restore_clock(&shell.vm, &clock, &clocks) {
        // The devices are dropped with this error; their vsock sockets with them.
        remove_vsock_sockets(&virtio);
        return Err(e.into());
    }
    let vcpus = fds
        .into_iter()
        .map(|(fd, id, _)| Vcpu {
            fd,
            id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            stop: shell.stop.clone(),
            msr_indices: shell.system.msr_indices().clone(),
            seccomp: shell.seccomp.clone(),
        })
        .collect();
    Ok(Loaded {
        vcpus,
        mem,
        layout,
        backing,
        mem_mib,
        serial,
        forward_stdin: host.forward_stdin,
        snapshot_on_ready: None,
        lazy,
        virtio,
        reservation,
        parked,
    })
}

/// Removes the host sockets of `devices`' vsock devices (an attach that failed after binding
/// them leaves nothing behind).
fn remove_vsock_sockets(devices: &[super::virtio::Attached]) {
    for d in devices {
        if let (super::virtio::VirtioDevice::Vsock(_), Some(p)) = (&d.device, &d.path) {
            let _ = std::fs::remove_file(p);
        }
    }
}
