//! One VM, built in stages that cold boot and restore share (`docs/lifecycle.md` lists the steps):
//!
//! 1. **check** the guest source before any VM exists: [`check_boot`] (shape, kernel, initrd,
//!    snapshot destination) or [`CheckedSnapshot::open`] (every file of the snapshot, its
//!    identity, and this host's KVM against the snapshotting host's);
//! 2. **shell** ([`VmShell::new`]): termination signals, the control socket, KVM VM with irqchip
//!    and PIT, vCPU fds, and the VMM thread with its io_uring event loop. Nothing in it depends on
//!    the guest but the vCPU count;
//! 3. **load** ([`VmShell::load`], on the VMM thread): guest memory and its memslots (fresh, or from
//!    a [`snapshot::memory_source::MemorySource`] with its page server), VM state, legacy and
//!    virtio devices with the host resources the caller gives ([`HostResources`]), then the guest
//!    image and vCPU state (boot protocol, or saved state). A restore's load is two halves: the
//!    guest state, which needs no host resource ([`VmShell::preload`] stops there and returns a
//!    [`PreloadedVm`]), and the attach of the host resources with the clocks set last
//!    ([`PreloadedVm::attach`]);
//! 4. **start** ([`LoadedVm::start`]): vCPU threads, the runtime on the loop; returns a
//!    [`RunningVm`] handle (pause, resume, snapshot, stop, wait, READY and stop events);
//! 5. **stop**: every vCPU joined, the page server stopped, a recorded working set written, the
//!    [`VmReport`].
//!
//! [`run`] and [`restore`] are the whole sequence for `kata-snap boot` and `kata-snap restore`.

mod capture;
mod kvm_system;
mod load_kernel;
mod load_snapshot;
mod running;
mod runtime;
mod shell;
pub mod virtio;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::Bus;
use devices::legacy::serial::{COM1_IRQ, COM1_LEN, COM1_PORT};
use devices::legacy::signal_port::SIGNAL_PORT;
use devices::legacy::{EventFdTrigger, I8042, Serial, SerialOutput, SignalPort};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use serde::Serialize;
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::stop::StopNotifier;
use crate::vcpu::Vcpu;

pub use capture::{SnapshotError, SnapshotInfo};
pub use kvm_system::KvmSystem;
pub use load_kernel::{BootSpec, check_boot, check_kernel_file};
pub use load_snapshot::{
    CheckedSnapshot, RecordWorkingSet, RestoreError, RestoreMode, SnapshotSpec, SnapshotState,
    snapshot_shape,
};
pub use running::{RequestError, RunningVm, StopHandle, VmEvent};
pub use runtime::VmRuntime;
pub use shell::{
    LoadedVm, PreloadedVm, ShellConfig, VmShell, block_termination_signals, termination_signalfd,
};

use crate::arch::mptable;
use crate::boot::BootError;
use crate::control::ControlSocketError;
use crate::layout::{LayoutError, MemoryLayout};
use crate::persist::PersistError;
use crate::stop::StopReason;
use crate::vcpu::{ConfigureVcpuError, ExitCounts};
use event_loop::EventLoopError;

/// Where the kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelImage {
    /// A file: ELF vmlinux or bzImage.
    Path(PathBuf),
    /// An image built into the binary (the test guests).
    Builtin {
        /// Its name, for messages.
        name: &'static str,
        /// Its bytes.
        bytes: &'static [u8],
    },
}

/// What to do once a snapshot was taken at READY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// Stop the VM (exit status 0).
    Exit,
    /// Let the guest continue.
    Continue,
}

/// Take a snapshot at the exit where the guest writes READY.
#[derive(Debug, Clone)]
pub struct SnapshotOnReady {
    /// The snapshot directory to create.
    pub dir: PathBuf,
    /// What then.
    pub after: AfterSnapshot,
}

/// The host side of a VM, given by whoever builds it: a snapshot holds guest state only, and a
/// restore never writes into the snapshot's own resources.
#[derive(Debug)]
pub struct HostResources {
    /// Where the guest's console output goes.
    pub serial: SerialOutput,
    /// Whether to feed the VMM's stdin to the guest's serial port.
    pub forward_stdin: bool,
    /// Restore: the backing file of each spare disk slot, by slot name.
    pub disk_slots: std::collections::HashMap<String, PathBuf>,
    /// Restore: spare disk slots whose backing file was opened by the restorer (a jailed VMM
    /// cannot open its client's paths), by slot name; taken before `disk_slots`. Opened
    /// read-only for a read-only slot, read-write otherwise; the VMM takes the file's lock.
    pub disk_files: std::collections::HashMap<String, std::fs::File>,
    /// Restore: the host side of the vsock device (required when the snapshot has one; the guest
    /// CID stays as snapshotted).
    pub vsock: Option<virtio::VsockHost>,
    /// Restore: the vsock device's listening socket, bound at `vsock`'s path by the restorer
    /// (a jailed VMM cannot bind its client's path); `None` binds it here. Not removed with the
    /// VM: it is the restorer's.
    pub vsock_listener: Option<std::os::unix::net::UnixListener>,
    /// Restore: the taps of the snapshot's net devices, by device id, already opened (a net
    /// device left out has no link).
    pub net: Vec<virtio::NetTap>,
    /// Restore: the directories of the snapshot's virtio-fs slots, by tag (a slot left out
    /// stays empty).
    pub fs: Vec<virtio::FsSlot>,
}

impl HostResources {
    /// Serial output only; no stdin, no disk slots, no vsock socket.
    pub fn new(serial: SerialOutput) -> Self {
        Self {
            serial,
            forward_stdin: false,
            disk_slots: Default::default(),
            disk_files: Default::default(),
            vsock: None,
            vsock_listener: None,
            net: Vec::new(),
            fs: Vec::new(),
        }
    }
}

/// What a VM is loaded from.
#[derive(Debug)]
pub enum Guest {
    /// A kernel and the Linux boot protocol.
    Boot(Box<BootSpec>),
    /// A checked snapshot.
    Snapshot(Box<SnapshotSpec>),
}

/// Everything needed to boot a VM ([`run`]).
#[derive(Debug)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelImage,
    /// An initrd to load.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Where to listen for control requests.
    pub api_sock: Option<PathBuf>,
    /// Where the guest's console output goes.
    pub serial: SerialOutput,
    /// Whether to feed the VMM's stdin to the guest's serial port.
    pub forward_stdin: bool,
    /// Snapshot at READY.
    pub snapshot_on_ready: Option<SnapshotOnReady>,
    /// virtio-mmio devices.
    pub virtio: virtio::VirtioSpecs,
    /// When the process started: the zero of every reported time.
    pub process_start: Instant,
    /// Seccomp filters for the VM's threads.
    pub seccomp: crate::seccomp::SeccompMode,
}

/// Everything needed to restore a VM ([`restore`]).
#[derive(Debug)]
pub struct RestoreConfig {
    /// The snapshot directory.
    pub snapshot: PathBuf,
    /// The memory mode.
    pub mode: RestoreMode,
    /// Where to listen for control requests.
    pub api_sock: Option<PathBuf>,
    /// The VM's host resources.
    pub host: HostResources,
    /// Pages installed per fault in the uffd modes.
    pub fault_around: usize,
    /// Record the start-up working set (uffd mode) to this file.
    pub record_workingset: Option<RecordWorkingSet>,
    /// In `uffd-prefetch`, install the working set before the vCPUs start instead of while they
    /// run.
    pub prefetch_before: bool,
    /// When the process started.
    pub process_start: Instant,
    /// Seccomp filters for the VM's threads.
    pub seccomp: crate::seccomp::SeccompMode,
}

/// Errors building a VM, at any stage before it runs.
#[derive(Debug, thiserror::Error)]
pub enum BuildVmError {
    /// The vCPU count is out of range.
    #[error("--vcpus must be between 1 and {max}, not {0}", max = mptable::MAX_VCPUS)]
    VcpuCount(u8),
    /// The memory size is out of range.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// More memory than the host has.
    #[error("guest memory of {want} MiB is more than this host's {have} MiB of RAM")]
    MemoryExceedsHost {
        /// Asked for.
        want: u64,
        /// The host's RAM.
        have: u64,
    },
    /// /dev/kvm cannot be used.
    #[error("cannot open /dev/kvm: {0}{hint}", hint = kvm_hint(.0))]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability the VMM needs.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {step} failed: {source}")]
    Kvm {
        /// What was being done.
        step: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] snapshot::memory_source::MemorySourceError),
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {source}", path = .path.display())]
    KernelOpen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd file cannot be opened.
    #[error("cannot open initrd {path}: {source}", path = .path.display())]
    InitrdOpen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot destination cannot be written.
    #[error("cannot write the snapshot to {path}: {reason}", path = .path.display())]
    SnapshotDest {
        /// The destination.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The boot protocol failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU could not be configured.
    #[error(transparent)]
    Vcpu(#[from] ConfigureVcpuError),
    /// Saved state could not be applied.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// A device could not be set up.
    #[error(transparent)]
    Device(#[from] virtio::DeviceSetupError),
    /// The control socket could not be created.
    #[error(transparent)]
    Control(#[from] ControlSocketError),
    /// The event loop could not be created.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// Signals could not be set up.
    #[error("signal set-up failed: {0}")]
    Signals(#[source] nix::Error),
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Seccomp filters could not be built.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// A thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The shell's vCPU count differs from the guest's.
    #[error("the VM shell has {shell} vCPUs but the guest needs {guest}")]
    VcpuMismatch {
        /// vCPUs in the shell.
        shell: u8,
        /// vCPUs the guest has.
        guest: u8,
    },
    /// The snapshot cannot be restored.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The VMM thread ended before answering (it panicked).
    #[error("the VMM thread ended unexpectedly")]
    VmmThreadGone,
}

fn kvm_hint(e: &kvm_ioctls::Error) -> &'static str {
    match e.errno() {
        libc::ENOENT => {
            " (KVM is not available: enable virtualization and load kvm_intel or kvm_amd)"
        }
        libc::EACCES | libc::EPERM => {
            " (no permission: run as root or add your user to the kvm group)"
        }
        _ => "",
    }
}

fn kvm_err(step: &'static str) -> impl Fn(kvm_ioctls::Error) -> BuildVmError {
    move |source| BuildVmError::Kvm { step, source }
}

/// The page server's figures for a lazily restored VM.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PageServerReport {
    /// Faults answered.
    pub faults: u64,
    /// Pages installed with data (faults and prefetch).
    pub pages_copied: u64,
    /// Pages installed as zero pages.
    pub pages_zeroed: u64,
    /// Faults answered with a wake only.
    pub wakes: u64,
    /// Median fault service time in microseconds.
    pub median_us: Option<f64>,
    /// 99th percentile fault service time in microseconds.
    pub p99_us: Option<f64>,
    /// Pages prefetched from the working set.
    pub prefetched_pages: u64,
    /// Time the prefetch took.
    pub prefetch_ms: Option<f64>,
    /// Pages recorded as the start-up working set, once written.
    pub recorded_pages: Option<u64>,
    /// Pages of the working set prefetched (uffd-prefetch).
    pub workingset_pages: Option<u64>,
    /// Faults on working-set pages the prefetcher had not installed yet.
    pub faults_in_set: u64,
    /// Faults on pages outside the working set.
    pub faults_outside_set: u64,
}

impl PageServerReport {
    /// Share of the working set's pages the guest found installed when it touched them (a
    /// working set is the pages a guest touches, so each is touched again on a restore).
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.workingset_pages.filter(|&n| n > 0)?;
        Some(1.0 - self.faults_in_set.min(n) as f64 / n as f64)
    }
}

/// How a VM run ended and what it measured.
#[derive(Debug, Clone)]
pub struct VmReport {
    /// Why it stopped.
    pub reason: StopReason,
    /// Process start to the guest's READY.
    pub ready_after: Option<Duration>,
    /// Process start to the first serial byte.
    pub first_serial_byte_after: Option<Duration>,
    /// Process start to the vCPUs starting.
    pub vcpus_started_after: Duration,
    /// Bytes on the console.
    pub serial_bytes: u64,
    /// vCPU exits.
    pub exits: ExitCounts,
    /// How long the guest ran.
    pub run_time: Duration,
    /// The snapshot taken at READY, if one was.
    pub snapshot: Option<SnapshotInfo>,
    /// Page server figures (uffd restores).
    pub page_server: Option<PageServerReport>,
}

fn host_ram_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks a VM shape before anything is created.
pub fn validate_shape(vcpus: u8, mem_mib: u64) -> Result<MemoryLayout, BuildVmError> {
    if vcpus == 0 || vcpus > mptable::MAX_VCPUS {
        return Err(BuildVmError::VcpuCount(vcpus));
    }
    let layout = MemoryLayout::new(mem_mib)?;
    if let Some(have) = host_ram_mib()
        && mem_mib > have
    {
        return Err(BuildVmError::MemoryExceedsHost {
            want: mem_mib,
            have,
        });
    }
    Ok(layout)
}

/// How guest RAM is backed, which decides how a snapshot finds its zero pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Anonymous memory filled by the VMM: pages never faulted in are zero.
    Anonymous,
    /// Memory whose absent pages may still hold data (a MAP_PRIVATE file, or a uffd restore):
    /// every page is read.
    Lazy,
}

/// A loaded guest waiting for `start`, on the VMM thread.
pub(super) struct Loaded {
    vcpus: Vec<Vcpu>,
    mem: GuestMemoryMmap,
    layout: MemoryLayout,
    backing: MemoryBacking,
    mem_mib: u64,
    serial: Arc<Mutex<Serial>>,
    forward_stdin: bool,
    snapshot_on_ready: Option<SnapshotOnReady>,
    lazy: Option<load_snapshot::LazyMemory>,
    virtio: Vec<virtio::Attached>,
    reservation: Option<snapshot::memory_source::Reservation>,
    /// vCPU threads started ahead, in vCPU order (a restore's); the others are spawned at start.
    parked: Vec<crate::vcpu::ParkedVcpuThread>,
}

/// Step 3, on the VMM thread: fills the shell with the guest.
fn load(
    shell: &mut shell::ShellParts,
    guest: Guest,
    host: HostResources,
) -> Result<Loaded, BuildVmError> {
    match guest {
        Guest::Boot(spec) => load_kernel::load(shell, *spec, host),
        Guest::Snapshot(spec) => load_snapshot::load(shell, *spec, host),
    }
}

/// Sets KVM memory slot `slot` (size 0 deletes it).
fn set_memslot(vm: &VmFd, slot: u32, guest: u64, size: u64, host: u64) -> Result<(), BuildVmError> {
    let region_desc = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: guest,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: the mapping described is guest memory (or a reservation for it) that outlives the
    // VM: it is dropped after every vCPU thread has been joined and the VM fd closed.
    unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

/// Registers every region of `mem` as a KVM memory slot.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), BuildVmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(snapshot::memory_source::MemorySourceError::Lookup)?;
        set_memslot(
            vm,
            slot as u32,
            region.start_addr().0,
            region.len(),
            host as u64,
        )?;
    }
    Ok(())
}

/// Guest memory for `regions` from `map`, placed in the shell's reservation when it fits (its
/// memslots exist already), else mapped fresh and registered; a reservation that does not fit
/// is dropped and its memslots deleted first (re-slot). Returns the memory and the reservation
/// it lives in, which must outlive it.
fn place_memory(
    shell: &mut shell::ShellParts,
    regions: &[snapshot::memory::MemoryRegion],
    map: impl FnOnce(Option<&[usize]>) -> Result<GuestMemoryMmap, BuildVmError>,
) -> Result<
    (
        GuestMemoryMmap,
        Option<snapshot::memory_source::Reservation>,
    ),
    BuildVmError,
> {
    match shell.reserved.take() {
        Some(res) if res.fits(regions) => {
            let mem = map(Some(res.addrs()))?;
            tracing::debug!("guest memory placed in the pre-registered memslots");
            Ok((mem, Some(res)))
        }
        other => {
            if let Some(res) = other {
                let start = Instant::now();
                for (slot, r) in res.regions().iter().enumerate() {
                    set_memslot(&shell.vm, slot as u32, r.guest_addr, 0, 0)?;
                }
                drop(res);
                tracing::info!(
                    "re-slotted guest memory (the shell's size class does not fit): {:.2} ms to delete the old memslots",
                    start.elapsed().as_secs_f64() * 1e3
                );
            }
            let mem = map(None)?;
            register_memory(&shell.vm, &mem)?;
            Ok((mem, None))
        }
    }
}

/// The serial interrupt: an eventfd registered as COM1's irqfd.
fn serial_trigger(vm: &VmFd) -> Result<EventFdTrigger, BuildVmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildVmError::EventFd)?;
    vm.register_irqfd(&evt, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    Ok(EventFdTrigger::new(
        evt.try_clone().map_err(BuildVmError::EventFd)?,
    ))
}

/// The port-I/O bus: COM1, the i8042 and the guest signal port.
fn pio_bus(
    serial: &Arc<Mutex<Serial>>,
    stop: &Arc<StopNotifier>,
) -> Result<Arc<Bus>, BuildVmError> {
    let mut pio = Bus::new();
    let dev_err = virtio::DeviceSetupError::Bus;
    pio.insert(serial.clone(), u64::from(COM1_PORT), COM1_LEN)
        .map_err(dev_err)?;
    pio.insert(Arc::new(Mutex::new(I8042::new(stop.clone()))), 0x60, 5)
        .map_err(dev_err)?;
    pio.insert(
        Arc::new(Mutex::new(SignalPort::new(stop.clone()))),
        u64::from(SIGNAL_PORT),
        1,
    )
    .map_err(dev_err)?;
    Ok(Arc::new(pio))
}

/// Boots a VM and runs it until it stops: check, shell, load, start, wait.
pub fn run(config: VmConfig) -> Result<VmReport, BuildVmError> {
    let spec = BootSpec {
        kernel: config.kernel,
        initrd: config.initrd,
        cmdline: config.cmdline,
        mem_mib: config.mem_mib,
        virtio: config.virtio,
        snapshot_on_ready: config.snapshot_on_ready,
    };
    check_boot(&spec, config.vcpus)?;
    let shell = VmShell::new(ShellConfig {
        vcpus: config.vcpus,
        api_sock: config.api_sock,
        process_start: config.process_start,
        seccomp: config.seccomp,
        memory_class: None,
        stop_on_signals: true,
        kvm: None,
    })?;
    let host = HostResources {
        forward_stdin: config.forward_stdin,
        ..HostResources::new(config.serial)
    };
    shell
        .load(Guest::Boot(Box::new(spec)), host)?
        .start()?
        .wait()
}

/// Restores a VM from a snapshot and runs it until it stops: check, shell, load, start, wait.
pub fn restore(config: RestoreConfig) -> Result<VmReport, BuildVmError> {
    let kvm = Arc::new(KvmSystem::open()?);
    let snapshot = CheckedSnapshot::open(&config.snapshot, config.mode, &kvm)?;
    let spec = SnapshotSpec::new(
        snapshot,
        config.fault_around,
        config.prefetch_before,
        config.record_workingset,
    )?;
    let shell = VmShell::new(ShellConfig {
        vcpus: spec.vcpus(),
        api_sock: config.api_sock,
        process_start: config.process_start,
        seccomp: config.seccomp,
        memory_class: None,
        stop_on_signals: true,
        kvm: Some(kvm),
    })?;
    shell
        .load(Guest::Snapshot(Box::new(spec)), config.host)?
        .start()?
        .wait()
}
