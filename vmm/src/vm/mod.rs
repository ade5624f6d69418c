//! Building and running one VM: KVM set-up, guest memory, boot, devices, vCPUs, the event loop.

mod runtime;

use std::fs::File;
use std::io::Cursor;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::Bus;
use devices::legacy::serial::{COM1_IRQ, COM1_LEN, COM1_PORT};
use devices::legacy::signal_port::SIGNAL_PORT;
use devices::legacy::{EventFdTrigger, I8042, Serial, SerialOutput, SignalPort};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use runtime::VmRuntime;
use runtime::{SignalSource, StdinSource, StopSource};

use crate::arch::{cpuid::VcpuTopology, mptable};
use crate::boot::{self, BootError, LoadedKernel};
use crate::control::{self, ControlListener, ControlSocketError};
use event_loop::{EventLoop, EventLoopError, Ticker};
use crate::host::{self, HostCheck};
use crate::layout::{KVM_TSS_ADDRESS, LayoutError, MemoryLayout};
use crate::stop::{StopNotifier, StopReason};
use crate::vcpu::{self, ConfigureVcpuError, ExitCounts, Vcpu};

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

/// Checks the configuration before anything is created.
pub fn validate(config: &VmConfig) -> Result<MemoryLayout, BuildVmError> {
    if config.vcpus == 0 || config.vcpus > mptable::MAX_VCPUS {
        return Err(BuildVmError::VcpuCount(config.vcpus));
    }
    let layout = MemoryLayout::new(config.mem_mib)?;
    if let Some(have) = host_ram_mib()
        && config.mem_mib > have
    {
        return Err(BuildVmError::MemoryExceedsHost {
            want: config.mem_mib,
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

fn create_memory(
    vm: &VmFd,
    layout: &MemoryLayout,
    mib: u64,
) -> Result<GuestMemoryMmap, BuildVmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| BuildVmError::Memory {
        mib,
        detail: e.to_string(),
    })?;
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
        // SAFETY: the mapping described is owned by `mem`, which the caller keeps alive for as long
        // as the VM exists (it is dropped after every vCPU thread has been joined).
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

fn load_guest(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
) -> Result<LoadedKernel, BuildVmError> {
    let kernel = match &config.kernel {
        KernelImage::Path(path) => {
            let mut f = File::open(path).map_err(|source| BuildVmError::KernelOpen {
                path: path.clone(),
                source,
            })?;
            boot::load_kernel(mem, &mut f)?
        }
        KernelImage::Builtin { bytes, .. } => boot::load_kernel(mem, &mut Cursor::new(*bytes))?,
    };
    let initrd = match &config.initrd {
        Some(path) => {
            let open_err = |source| BuildVmError::InitrdOpen {
                path: path.clone(),
                source,
            };
            let mut f = File::open(path).map_err(open_err)?;
            let size = f.metadata().map_err(open_err)?.len();
            Some(boot::load_initrd(mem, layout, &kernel, &mut f, size)?)
        }
        None => None,
    };
    let cmdline = boot::build_cmdline(&config.cmdline, &kernel)?;
    let params = boot::build_boot_params(layout, &kernel, config.cmdline.len(), initrd)?;
    boot::write_boot_structures(mem, &cmdline, &params, config.vcpus)?;
    Ok(kernel)
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

/// Boots and runs a VM until it stops; returns why and what was measured.
pub fn run(config: VmConfig) -> Result<VmReport, BuildVmError> {
    let layout = validate(&config)?;
    let host = host::check_host();

    // The loop, signals and the control socket first: set-up failures end here, before a guest runs.
    let signals = termination_signalfd()?;
    let mut event_loop = EventLoop::<VmRuntime>::new()?;
    let listener: Option<UnixListener> =
        config.api_sock.as_deref().map(control::bind).transpose()?;
    let api_sock_guard = config.api_sock.clone().map(RemoveOnDrop);

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
    let mem = create_memory(&vm, &layout, config.mem_mib)?;
    let kernel = load_guest(&config, &mem, &layout)?;
    tracing::debug!(?kernel.format, entry = kernel.entry, "kernel loaded");

    let stop = Arc::new(
        StopNotifier::new(config.process_start).map_err(|e| BuildVmError::Device(e.to_string()))?,
    );
    let serial_evt =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildVmError::Device(e.to_string()))?;
    vm.register_irqfd(&serial_evt, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let serial_trigger = serial_evt
        .try_clone()
        .map_err(|e| BuildVmError::Device(e.to_string()))?;
    let forward_stdin = config.forward_stdin && stdin_is_open();
    let serial = Arc::new(Mutex::new(Serial::new(
        EventFdTrigger::new(serial_trigger),
        config.serial,
    )));
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
    let pio = Arc::new(pio);
    let mmio = Arc::new(Bus::new());

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu::configure_vcpu(
            &fd,
            &supported,
            VcpuTopology {
                id,
                count: config.vcpus,
                tsc_deadline,
            },
            kernel.entry,
        )?;
        vcpus.push(Vcpu {
            fd,
            id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            stop: stop.clone(),
        });
    }
    vcpu::install_kick_handler().map_err(|e| BuildVmError::Signals(e.to_string()))?;

    let vcpus_started_after = config.process_start.elapsed();
    let run_start = Instant::now();
    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        handles.push(v.spawn().map_err(BuildVmError::Thread)?);
    }
    let mut rt = VmRuntime::new(handles, serial, stop.clone(), config.mem_mib, host);

    event_loop.add(Box::new(StopSource::new(&stop)), &mut rt);
    event_loop.add(Box::new(SignalSource::new(signals)), &mut rt);
    if let Some(l) = listener {
        event_loop.add(Box::new(ControlListener::new(l)), &mut rt);
    }
    if forward_stdin {
        event_loop.add(Box::new(StdinSource::new(0)), &mut rt);
    }
    event_loop.add(
        Box::new(Ticker::new(
            "halt-watchdog",
            HALT_CHECK_PERIOD,
            |rt: &mut VmRuntime| {
                rt.check_halted();
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
    let report = VmReport {
        reason: stop.reason().unwrap_or(StopReason::LoopError {
            error: "loop ended without a reason".into(),
        }),
        ready_after: stop.ready_after(),
        first_serial_byte_after: rt
            .serial_metrics
            .first_byte_at
            .get()
            .map(|t| t.saturating_duration_since(config.process_start)),
        vcpus_started_after,
        serial_bytes: rt
            .serial_metrics
            .bytes_out
            .load(std::sync::atomic::Ordering::Relaxed),
        exits: rt.exit_counts(),
        run_time,
    };
    drop(rt);
    drop(api_sock_guard);
    drop(mem);
    Ok(report)
}

/// Removes the control socket file when the VM ends.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether `path` names a kernel this VMM can boot (for early CLI checks).
pub fn check_kernel_file(path: &Path) -> Result<boot::KernelFormat, BuildVmError> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|source| BuildVmError::KernelOpen {
        path: path.to_path_buf(),
        source,
    })?;
    let mut head = vec![0u8; 0x206];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(source) => {
                return Err(BuildVmError::KernelOpen {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    Ok(boot::detect_format(&head[..n])?)
}

/// The host check, re-exported for callers that only need it.
pub fn host_check() -> HostCheck {
    host::check_host()
}
