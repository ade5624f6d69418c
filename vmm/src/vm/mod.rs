//! Building and running one VM. A cold boot ([`boot::run`]) and a restore ([`restore::restore`])
//! share every step but where guest state comes from:
//!
//! 1. [`prepare`]: the event loop, termination signals, the control socket, KVM and the VM with
//!    its in-kernel irqchip and PIT (set-up failures end here, before a guest exists);
//! 2. guest memory: fresh (boot) or from a snapshot in one of the restore modes;
//! 3. guest state: the kernel and boot structures (boot) or saved vCPU/VM/device state (restore);
//! 4. [`launch`]: vCPU threads, the runtime on the loop until a stop, teardown, the report.

mod boot;
mod restore;
mod runtime;
mod snapshot;
pub mod virtio;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::Bus;
use devices::legacy::serial::{COM1_IRQ, COM1_LEN, COM1_PORT};
use devices::legacy::signal_port::SIGNAL_PORT;
use devices::legacy::{EventFdTrigger, I8042, Serial, SerialOutput, SignalPort};
use event_loop::{EventLoop, EventLoopError, Ticker};
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VmFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use boot::{check_kernel_file, run};
pub use restore::{RestoreConfig, RestoreError, RestoreMode, restore};
pub use runtime::VmRuntime;
pub use snapshot::{SnapshotError, SnapshotInfo};

use crate::arch::mptable;
use crate::boot::BootError;
use crate::control::{self, ControlListener, ControlSocketError};
use crate::host::{self, HostCheck};
use crate::layout::{KVM_TSS_ADDRESS, LayoutError, MemoryLayout};
use crate::persist::PersistError;
use crate::stop::{StopNotifier, StopReason};
use crate::vcpu::{ConfigureVcpuError, ExitCounts, Vcpu};

/// Period of the halt watchdog.
const HALT_CHECK_PERIOD: Duration = Duration::from_millis(250);

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

/// Everything needed to boot a VM.
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
}

/// Errors before the guest runs.
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
    /// A KVM VM ioctl failed.
    #[error("KVM {step} failed: {source}")]
    Kvm {
        /// What was being done.
        step: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: {detail}")]
    Memory {
        /// Size.
        mib: u64,
        /// Why.
        detail: String,
    },
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
    /// The boot protocol failed.
    #[error("{0}")]
    Boot(#[from] BootError),
    /// A vCPU could not be configured.
    #[error(transparent)]
    Vcpu(#[from] ConfigureVcpuError),
    /// Saved state could not be applied.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// A device could not be set up.
    #[error("device set-up: {0}")]
    Device(String),
    /// The control socket could not be created.
    #[error(transparent)]
    Control(#[from] ControlSocketError),
    /// The event loop could not be created.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// Signals could not be set up.
    #[error("signal set-up: {0}")]
    Signals(String),
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The snapshot cannot be restored.
    #[error(transparent)]
    Restore(#[from] RestoreError),
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

/// The page server's figures for a lazily restored VM.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PageServerReport {
    /// Faults answered.
    pub faults: u64,
    /// Pages installed with UFFDIO_COPY (faults and prefetch).
    pub pages_copied: u64,
    /// Pages installed as zero pages.
    pub pages_zeroed: u64,
    /// Faults answered with a wake only.
    pub wakes: u64,
    /// Median fault service time in microseconds.
    pub median_us: Option<f64>,
    /// 99th percentile fault service time in microseconds.
    pub p99_us: Option<f64>,
    /// Pages prefetched from the working set before the vCPUs started.
    pub prefetched_pages: u64,
    /// Time the prefetch took.
    pub prefetch_ms: Option<f64>,
    /// Pages recorded as this run's working set (written to the snapshot when it had none).
    pub recorded_pages: Option<u64>,
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

fn kvm_err(step: &'static str) -> impl Fn(kvm_ioctls::Error) -> BuildVmError {
    move |source| BuildVmError::Kvm { step, source }
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

fn open_kvm() -> Result<Kvm, BuildVmError> {
    let kvm = Kvm::new().map_err(BuildVmError::OpenKvm)?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(BuildVmError::MissingCap(name));
        }
    }
    Ok(kvm)
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

/// Registers every region of `mem` as a KVM memory slot.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, mib: u64) -> Result<(), BuildVmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| BuildVmError::Memory {
                mib,
                detail: e.to_string(),
            })?;
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping described is owned by `mem`, which outlives the VM: it is dropped
        // after every vCPU thread has been joined.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Blocks the termination signals in this thread (and so in every thread spawned after) and
/// returns a signalfd for them.
fn termination_signalfd() -> Result<SignalFd, BuildVmError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block()
        .map_err(|e| BuildVmError::Signals(e.to_string()))?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| BuildVmError::Signals(e.to_string()))
}

fn stdin_is_open() -> bool {
    // SAFETY: F_GETFD on fd 0 only queries its flags.
    unsafe { libc::fcntl(0, libc::F_GETFD) != -1 }
}

/// Removes the control socket file when the VM ends.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Step 1: what every VM needs before it has memory or state.
struct Prepared {
    event_loop: EventLoop<VmRuntime>,
    signals: SignalFd,
    listener: Option<UnixListener>,
    sock_guard: Option<RemoveOnDrop>,
    kvm: Kvm,
    vm: VmFd,
    stop: Arc<StopNotifier>,
    host: HostCheck,
    supported_cpuid: kvm_bindings::CpuId,
}

fn prepare(api_sock: Option<&Path>, process_start: Instant) -> Result<Prepared, BuildVmError> {
    let host = host::check_host();
    let signals = termination_signalfd()?;
    let event_loop = EventLoop::<VmRuntime>::new()?;
    let listener = api_sock.map(control::bind).transpose()?;
    let sock_guard = api_sock.map(|p| RemoveOnDrop(p.to_path_buf()));
    let kvm = open_kvm()?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let stop = Arc::new(
        StopNotifier::new(process_start).map_err(|e| BuildVmError::Device(e.to_string()))?,
    );
    let supported_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(Prepared {
        event_loop,
        signals,
        listener,
        sock_guard,
        kvm,
        vm,
        stop,
        host,
        supported_cpuid,
    })
}

/// The serial interrupt: an eventfd registered as COM1's irqfd.
fn serial_trigger(vm: &VmFd) -> Result<EventFdTrigger, BuildVmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildVmError::Device(e.to_string()))?;
    vm.register_irqfd(&evt, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    Ok(EventFdTrigger::new(
        evt.try_clone()
            .map_err(|e| BuildVmError::Device(e.to_string()))?,
    ))
}

/// The port-I/O bus: COM1, the i8042 and the guest signal port.
fn pio_bus(
    serial: &Arc<Mutex<Serial>>,
    stop: &Arc<StopNotifier>,
) -> Result<Arc<Bus>, BuildVmError> {
    let mut pio = Bus::new();
    let dev_err = |e: devices::BusError| BuildVmError::Device(e.to_string());
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

/// Step 4 inputs: a VM with memory and state, ready to run.
struct Launch {
    vcpus: Vec<Vcpu>,
    mem: GuestMemoryMmap,
    layout: MemoryLayout,
    backing: MemoryBacking,
    mem_mib: u64,
    serial: Arc<Mutex<Serial>>,
    forward_stdin: bool,
    snapshot_on_ready: Option<SnapshotOnReady>,
    page_server: Option<restore::LazyMemory>,
    virtio: Vec<virtio::Attached>,
    process_start: Instant,
}

/// Step 4: start the vCPUs, run the loop until a stop, tear down, report.
fn launch(p: Prepared, l: Launch) -> Result<VmReport, BuildVmError> {
    let Prepared {
        mut event_loop,
        signals,
        listener,
        sock_guard,
        vm,
        stop,
        host,
        kvm: _kvm,
        supported_cpuid,
    } = p;
    if l.snapshot_on_ready.is_some() {
        stop.arm_snapshot_on_ready();
    }
    crate::vcpu::install_kick_handler().map_err(|e| BuildVmError::Signals(e.to_string()))?;
    let vcpus_started_after = l.process_start.elapsed();
    let run_start = Instant::now();
    let mut handles = Vec::with_capacity(l.vcpus.len());
    for v in l.vcpus {
        handles.push(v.spawn().map_err(BuildVmError::Thread)?);
    }
    let mut rt = VmRuntime::new(runtime::RuntimeParts {
        vcpus: handles,
        serial: l.serial,
        stop: stop.clone(),
        memory_mib: l.mem_mib,
        host,
        vm,
        mem: l.mem,
        layout: l.layout,
        backing: l.backing,
        snapshot_on_ready: l.snapshot_on_ready,
        lazy: l.page_server,
        host_cpuid: supported_cpuid.as_slice().to_vec(),
        virtio: l.virtio,
    });
    // Each device's worker runs on this loop; the handles stay in the runtime, on this thread.
    let sources: Vec<_> = rt.virtio.iter().map(|d| d.event_source()).collect();
    for source in sources {
        event_loop.add(source, &mut rt);
    }

    let stdin = (l.forward_stdin && stdin_is_open()).then_some(0);
    for source in runtime::loop_sources(&stop, signals, stdin) {
        event_loop.add(Box::new(source), &mut rt);
    }
    if let Some(l) = listener {
        event_loop.add(Box::new(ControlListener::new(l)), &mut rt);
    }
    event_loop.add(
        Box::new(Ticker::new(
            "watchdog",
            HALT_CHECK_PERIOD,
            |rt: &mut VmRuntime| {
                rt.check_halted();
                rt.check_page_server();
                event_loop::Flow::Continue
            },
        )),
        &mut rt,
    );
    if let Err(e) = event_loop.run(&mut rt) {
        stop.stop(StopReason::LoopError {
            error: e.to_string(),
        });
    }

    // Every vCPU thread is joined before guest memory and the VM go away.
    rt.resume();
    for v in &mut rt.vcpus {
        v.stop_and_join();
    }
    let run_time = run_start.elapsed();
    let page_server = rt.finish_lazy_memory();
    let report = VmReport {
        reason: stop.reason().unwrap_or(StopReason::LoopError {
            error: "loop ended without a reason".into(),
        }),
        ready_after: stop.ready_after(),
        first_serial_byte_after: rt
            .serial_metrics
            .first_byte_at
            .get()
            .map(|t| t.saturating_duration_since(l.process_start)),
        vcpus_started_after,
        serial_bytes: rt
            .serial_metrics
            .bytes_out
            .load(std::sync::atomic::Ordering::Relaxed),
        exits: rt.exit_counts(),
        run_time,
        snapshot: rt.snapshot_taken.clone(),
        page_server,
    };
    drop(rt);
    drop(sock_guard);
    Ok(report)
}
