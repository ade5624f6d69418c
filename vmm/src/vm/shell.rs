//! The VM shell and the VMM thread.
//!
//! A [`VmShell`] is a KVM VM (irqchip, PIT, TSS), its vCPU fds, the control socket, the
//! termination signals and a thread of its own (the *VMM thread*) holding the io_uring event
//! loop: everything a VM needs before it is known what the guest will be. Every later stage runs
//! on the VMM thread, because the virtio devices' workers are `!Send` and live on the loop that
//! thread runs: [`VmShell::load`] and [`LoadedVm::start`] send it a job and wait for the answer;
//! after `start` the thread runs the loop until the VM stops and returns the [`VmReport`].

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_loop::{EventLoop, Ticker};
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::kvm_system::KvmSystem;
use super::load_snapshot::{self, SnapshotSpec};
use super::running::{Request, RunningVm};
use super::runtime::{self, RuntimeParts, VmRuntime};
use super::{BuildVmError, Guest, HostResources, VmReport, kvm_err};
use crate::control::{self, ControlListener};
use crate::host::{self, HostCheck};
use crate::layout::KVM_TSS_ADDRESS;
use crate::seccomp::{Filters, SeccompMode};
use crate::stop::{StopNotifier, StopReason};
use crate::vcpu;
use snapshot::SnapshotId;
use snapshot::memory_source::Reservation;

/// Period of the halt watchdog.
const HALT_CHECK_PERIOD: Duration = Duration::from_millis(250);

/// What a shell is built with.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    /// vCPUs to create.
    pub vcpus: u8,
    /// Where to listen for control requests.
    pub api_sock: Option<PathBuf>,
    /// When the process started: the zero of every reported time.
    pub process_start: Instant,
    /// Seccomp filters for the VM's threads.
    pub seccomp: SeccompMode,
    /// Guest memory size class in MiB: reserve host addresses for a guest of this size and
    /// register its KVM memslots now, so a guest of this size loads without creating memslots
    /// (a guest of another size re-slots, which costs what a cold start does).
    pub memory_class: Option<u64>,
    /// Whether SIGINT, SIGTERM and SIGHUP stop the VM (the default for a VMM run from a shell).
    /// A caller that forwards signals elsewhere (the container runtime sends them to the process
    /// in the guest) sets this false and reads them itself.
    pub stop_on_signals: bool,
    /// The host's KVM, when the caller opened it already (a restore checks its snapshot against
    /// it meanwhile); `None` opens it.
    pub kvm: Option<Arc<KvmSystem>>,
}

/// Removes the control socket file when the VM ends.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What the VMM thread holds from the shell stage on.
pub(super) struct ShellParts {
    pub event_loop: EventLoop<VmRuntime>,
    pub signals: SignalFd,
    pub listener: Option<UnixListener>,
    sock_guard: Option<RemoveOnDrop>,
    pub system: Arc<KvmSystem>,
    pub vm: VmFd,
    pub vcpu_fds: Vec<VcpuFd>,
    pub stop: Arc<StopNotifier>,
    pub host: HostCheck,
    pub seccomp: Filters,
    /// Host addresses reserved for guest memory, with their memslots registered.
    pub reserved: Option<Reservation>,
}

/// A job the VMM thread carries out.
enum Job {
    /// Bind the control socket at this path, or listen on a socket the caller bound (kept
    /// there when the VM ends: it is the caller's).
    Listen(
        PathBuf,
        Option<UnixListener>,
        Sender<Result<(), BuildVmError>>,
    ),
    Load(Box<Guest>, HostResources, Sender<Result<(), BuildVmError>>),
    Preload(Box<SnapshotSpec>, Sender<Result<SnapshotId, BuildVmError>>),
    Attach(HostResources, Sender<Result<(), BuildVmError>>),
    Start(Sender<Result<StartInfo, BuildVmError>>),
}

/// What `start` reports back.
struct StartInfo {
    requests: Sender<Request>,
    wake: Arc<vmm_sys_util::eventfd::EventFd>,
}

/// A VM before its guest is known.
#[derive(Debug)]
pub struct VmShell {
    kvm: Arc<KvmSystem>,
    jobs: Sender<Job>,
    thread: JoinHandle<Result<Option<VmReport>, BuildVmError>>,
    stop: Arc<StopNotifier>,
    vcpus: u8,
    seccomp: Filters,
}

/// A VM whose guest is loaded, ready to start.
#[derive(Debug)]
pub struct LoadedVm {
    shell: VmShell,
}

/// A VM with a snapshot's guest state loaded but none of its host resources: what a pool keeps
/// ready for a template ([`VmShell::preload`]). [`PreloadedVm::attach`] gives it its console,
/// disks and vsock socket; dropping it ends the VM.
#[derive(Debug)]
pub struct PreloadedVm {
    shell: VmShell,
    id: SnapshotId,
}

/// Blocks the termination signals (SIGINT, SIGTERM, SIGHUP) in the calling thread and every
/// thread it spawns afterwards: call it before spawning a thread that builds a [`VmShell`], so
/// that no thread of the process takes them with their default action (the VM's loop reads
/// them from a signalfd).
pub fn block_termination_signals() -> Result<(), BuildVmError> {
    termination_set()
        .thread_block()
        .map_err(BuildVmError::Signals)
}

fn termination_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks the termination signals in this thread (and so in every thread spawned after) and
/// returns a non-blocking signalfd for them.
pub fn termination_signalfd() -> Result<SignalFd, BuildVmError> {
    let set = termination_set();
    set.thread_block().map_err(BuildVmError::Signals)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(BuildVmError::Signals)
}

/// The shell's parts that are `Send`, built on the caller's thread.
struct KvmParts {
    system: Arc<KvmSystem>,
    vm: VmFd,
    vcpu_fds: Vec<VcpuFd>,
    reserved: Option<Reservation>,
}

/// Reserves host addresses for a guest of `mib` MiB and registers them as memslots.
fn reserve_memory(vm: &VmFd, mib: u64) -> Result<Reservation, BuildVmError> {
    let layout = crate::layout::MemoryLayout::new(mib)?;
    let ranges: Vec<(u64, u64)> = layout.ram.iter().map(|r| (r.start, r.size)).collect();
    let regions = snapshot::memory::file_layout(&ranges);
    let reservation = Reservation::new(&regions)
        .map_err(|e| BuildVmError::Memory(snapshot::memory_source::MemorySourceError::Read(e)))?;
    for (slot, (r, &addr)) in regions.iter().zip(reservation.addrs()).enumerate() {
        super::set_memslot(vm, slot as u32, r.guest_addr, r.size, addr as u64)?;
    }
    Ok(reservation)
}

fn create_vm(
    system: Option<Arc<KvmSystem>>,
    vcpus: u8,
    memory_class: Option<u64>,
) -> Result<KvmParts, BuildVmError> {
    let system = match system {
        Some(s) => s,
        None => Arc::new(KvmSystem::open()?),
    };
    let vm = system.kvm().create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    // Memslots first: on this nested KVM registering one in a VM that has its irqchip and PIT
    // costs up to several milliseconds (measured 4-5.6 ms), in a bare VM a fraction of one.
    let reserved = memory_class
        .map(|mib| reserve_memory(&vm, mib))
        .transpose()?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let vcpu_fds = (0..vcpus)
        .map(|id| {
            vm.create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KvmParts {
        system,
        vm,
        vcpu_fds,
        reserved,
    })
}

impl VmShell {
    /// Builds a shell: signals, control socket, KVM VM with its vCPUs, and the VMM thread with
    /// its event loop. Termination signals are blocked in the calling thread from here on (they
    /// are read from a signalfd on the loop).
    pub fn new(config: ShellConfig) -> Result<Self, BuildVmError> {
        if config.vcpus == 0 || config.vcpus > crate::arch::mptable::MAX_VCPUS {
            return Err(BuildVmError::VcpuCount(config.vcpus));
        }
        let filters = Filters::new(config.seccomp)?;
        // /dev/kvm is opened once, here or by the caller, and is accessible if that worked.
        let parts = create_vm(config.kvm.clone(), config.vcpus, config.memory_class)?;
        let host = host::check_host_with_kvm(true);
        let kvm = parts.system.clone();
        let signals = if config.stop_on_signals {
            termination_signalfd()?
        } else {
            // Nothing to read: the caller handles every signal.
            SignalFd::with_flags(
                &SigSet::empty(),
                SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
            )
            .map_err(BuildVmError::Signals)?
        };
        let listener = config.api_sock.as_deref().map(control::bind).transpose()?;
        let sock_guard = config.api_sock.clone().map(RemoveOnDrop);
        let stop =
            Arc::new(StopNotifier::new(config.process_start).map_err(BuildVmError::EventFd)?);
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_stop = stop.clone();
        let caller_filters = filters.clone();
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                // The loop's ring is created on the thread that runs it.
                let event_loop = match EventLoop::<VmRuntime>::new() {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(BuildVmError::from(e)));
                        return Ok(None);
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let shell = ShellParts {
                    event_loop,
                    signals,
                    listener,
                    sock_guard,
                    system: parts.system,
                    vm: parts.vm,
                    vcpu_fds: parts.vcpu_fds,
                    stop: thread_stop,
                    host,
                    seccomp: filters,
                    reserved: parts.reserved,
                };
                vmm_thread(shell, jobs_rx)
            })
            .map_err(|source| BuildVmError::Thread {
                what: "VMM",
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(BuildVmError::VmmThreadGone),
        }
        Ok(Self {
            kvm,
            jobs: jobs_tx,
            thread,
            stop,
            vcpus: config.vcpus,
            seccomp: caller_filters,
        })
    }

    /// The host's KVM the shell was made with (to check a snapshot against it).
    pub fn kvm(&self) -> &Arc<KvmSystem> {
        &self.kvm
    }

    /// The number of vCPUs.
    pub fn vcpus(&self) -> u8 {
        self.vcpus
    }

    /// Moves the zero of reported times to `start`: a shell made ahead of time (a pool) reports
    /// times from its client's start.
    pub fn set_process_start(&self, start: Instant) {
        self.stop.set_process_start(start);
    }

    /// Starts listening for control requests on `path` (a shell made before its control socket
    /// was known, as in a pool).
    pub fn listen(&self, path: &Path) -> Result<(), BuildVmError> {
        self.listen_with(path, None)
    }

    /// Takes control requests on `listener`, bound at `path` by the caller (a jailed VMM cannot
    /// bind its client's path); the socket stays the caller's.
    pub fn listen_on(&self, path: &Path, listener: UnixListener) -> Result<(), BuildVmError> {
        self.listen_with(path, Some(listener))
    }

    fn listen_with(&self, path: &Path, given: Option<UnixListener>) -> Result<(), BuildVmError> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Job::Listen(path.to_path_buf(), given, tx))
            .map_err(|_| BuildVmError::VmmThreadGone)?;
        rx.recv().map_err(|_| BuildVmError::VmmThreadGone)?
    }

    /// Loads the guest (on the VMM thread): memory, devices with the given host resources, guest
    /// image or saved state, vCPUs.
    pub fn load(self, guest: Guest, host: HostResources) -> Result<LoadedVm, BuildVmError> {
        let (tx, rx) = mpsc::channel();
        if self
            .jobs
            .send(Job::Load(Box::new(guest), host, tx))
            .is_err()
        {
            return Err(self.gone());
        }
        match rx.recv() {
            Ok(Ok(())) => Ok(LoadedVm { shell: self }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.gone()),
        }
    }

    /// Loads a snapshot's guest state, the part of a restore that needs no host resource of
    /// the VM (on the VMM thread): guest memory with its page server and the working set
    /// installed, interrupt controllers, PIT, every device slot's ioeventfds and irqfd, every
    /// vCPU's state. A recording restore cannot be pre-loaded (it records from the start).
    pub fn preload(self, spec: SnapshotSpec) -> Result<PreloadedVm, BuildVmError> {
        if spec.records() {
            return Err(load_snapshot::RestoreError::RecordPreload.into());
        }
        let (tx, rx) = mpsc::channel();
        if self.jobs.send(Job::Preload(Box::new(spec), tx)).is_err() {
            return Err(self.gone());
        }
        match rx.recv() {
            Ok(Ok(id)) => Ok(PreloadedVm { shell: self, id }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.gone()),
        }
    }

    /// The VMM thread ended: its own error if it returned one.
    fn gone(self) -> BuildVmError {
        drop(self.jobs);
        match self.thread.join() {
            Ok(Err(e)) => e,
            _ => BuildVmError::VmmThreadGone,
        }
    }
}

impl PreloadedVm {
    /// The id of the snapshot loaded.
    pub fn snapshot_id(&self) -> SnapshotId {
        self.id
    }

    /// See [`VmShell::set_process_start`].
    pub fn set_process_start(&self, start: Instant) {
        self.shell.set_process_start(start);
    }

    /// See [`VmShell::listen`].
    pub fn listen(&self, path: &Path) -> Result<(), BuildVmError> {
        self.shell.listen(path)
    }

    /// See [`VmShell::listen_on`].
    pub fn listen_on(&self, path: &Path, listener: UnixListener) -> Result<(), BuildVmError> {
        self.shell.listen_on(path, listener)
    }

    /// Finishes the load with the VM's host resources (on the VMM thread): console, spare disk
    /// slots, vsock socket; then sets the guest's clocks to the snapshot's. On an error the VM
    /// ends, and nothing the attach opened or bound is left.
    pub fn attach(self, host: HostResources) -> Result<LoadedVm, BuildVmError> {
        let shell = self.shell;
        let (tx, rx) = mpsc::channel();
        if shell.jobs.send(Job::Attach(host, tx)).is_err() {
            return Err(shell.gone());
        }
        match rx.recv() {
            Ok(Ok(())) => Ok(LoadedVm { shell }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(shell.gone()),
        }
    }
}

impl LoadedVm {
    /// Starts the vCPUs and the loop; returns the running VM's handle.
    pub fn start(self) -> Result<RunningVm, BuildVmError> {
        let shell = self.shell;
        let (tx, rx) = mpsc::channel();
        if shell.jobs.send(Job::Start(tx)).is_err() {
            return Err(shell.gone());
        }
        match rx.recv() {
            Ok(Ok(info)) => Ok(RunningVm::new(
                info.requests,
                info.wake,
                shell.thread,
                shell.stop,
                shell.seccomp,
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(shell.gone()),
        }
    }
}

/// The VMM thread: waits for `load`, then `start`, then runs the VM to its end.
fn vmm_thread(
    mut shell: ShellParts,
    jobs: Receiver<Job>,
) -> Result<Option<VmReport>, BuildVmError> {
    let mut loaded = None;
    let mut preloaded = None;
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Listen(path, given, reply) => {
                let bound = if shell.listener.is_some() {
                    Err(BuildVmError::Control(control::ControlSocketError::InUse(
                        path,
                    )))
                } else if let Some(l) = given {
                    // The caller's socket: the loop never blocks on it.
                    l.set_nonblocking(true)
                        .map(|()| shell.listener = Some(l))
                        .map_err(|source| {
                            BuildVmError::Control(control::ControlSocketError::Bind {
                                path: path.clone(),
                                source,
                            })
                        })
                } else {
                    control::bind(&path)
                        .map(|l| {
                            shell.listener = Some(l);
                            shell.sock_guard = Some(RemoveOnDrop(path));
                        })
                        .map_err(BuildVmError::from)
                };
                let _ = reply.send(bound);
            }
            Job::Preload(spec, reply) => {
                if loaded.is_some() || preloaded.is_some() {
                    return Ok(None);
                }
                match load_snapshot::load_guest(&mut shell, *spec) {
                    Ok(g) => {
                        let _ = reply.send(Ok(g.id()));
                        preloaded = Some(g);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(None);
                    }
                }
            }
            Job::Attach(host, reply) => {
                let Some(g) = preloaded.take() else {
                    return Ok(None);
                };
                match load_snapshot::attach(&mut shell, g, host) {
                    Ok(l) => {
                        loaded = Some(l);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(None);
                    }
                }
            }
            Job::Load(guest, host, reply) => {
                if loaded.is_some() || preloaded.is_some() {
                    return Ok(None);
                }
                match super::load(&mut shell, *guest, host) {
                    Ok(l) => {
                        loaded = Some(l);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(None);
                    }
                }
            }
            Job::Start(reply) => {
                let Some(l) = loaded.take() else {
                    return Ok(None);
                };
                return run_vm(shell, l, reply).map(Some);
            }
        }
    }
    Ok(None)
}

/// Starts the vCPUs, answers `start`, runs the loop until a stop, tears down, reports.
fn run_vm(
    shell: ShellParts,
    l: super::Loaded,
    reply: Sender<Result<StartInfo, BuildVmError>>,
) -> Result<VmReport, BuildVmError> {
    let ShellParts {
        mut event_loop,
        signals,
        listener,
        sock_guard,
        vm,
        stop,
        host,
        system,
        vcpu_fds: _,
        seccomp,
        reserved: _,
    } = shell;
    let process_start = stop.process_start();
    let started = (|| {
        if l.snapshot_on_ready.is_some() {
            stop.arm_snapshot_on_ready();
        }
        vcpu::install_kick_handler().map_err(BuildVmError::KickHandler)?;
        let wake = Arc::new(
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                .map_err(BuildVmError::EventFd)?,
        );
        Ok(wake)
    })();
    let wake = match started {
        Ok(w) => w,
        Err(e) => {
            let _ = reply.send(Err(e));
            return Err(BuildVmError::VmmThreadGone);
        }
    };
    let vcpus_started_after = process_start.elapsed();
    let run_start = Instant::now();
    let mut handles = Vec::with_capacity(l.vcpus.len());
    let mut parked = l.parked.into_iter();
    for v in l.vcpus {
        let started = match parked.next() {
            Some(thread) => v.start_on(thread),
            None => v.spawn(),
        };
        match started {
            Ok(h) => handles.push(h),
            Err(source) => {
                stop.stop(StopReason::LoopError {
                    error: format!("cannot start a vCPU thread: {source}"),
                });
                for h in &mut handles {
                    h.stop_and_join();
                }
                let _ = reply.send(Err(BuildVmError::Thread {
                    what: "vCPU",
                    source,
                }));
                return Err(BuildVmError::VmmThreadGone);
            }
        }
    }
    let mut rt = VmRuntime::new(RuntimeParts {
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
        lazy: l.lazy,
        host_cpuid: system.supported_cpuid().as_slice().to_vec(),
        virtio: l.virtio,
        reservation: l.reservation,
    });
    // Each device's worker runs on this loop; the handles stay in the runtime, on this thread.
    let sources: Vec<_> = rt.virtio.iter().map(|d| d.event_source()).collect();
    for source in sources {
        event_loop.add(source, &mut rt);
    }
    let stdin = (l.forward_stdin && stdin_is_open()).then_some(0);
    let (req_tx, req_rx) = mpsc::channel::<Request>();
    for source in runtime::loop_sources(&stop, signals, stdin, wake.clone(), req_rx) {
        event_loop.add(Box::new(source), &mut rt);
    }
    let loop_filter = rt.loop_filter(listener.is_some());
    if let Some(l) = listener {
        event_loop.add(Box::new(ControlListener::new(l)), &mut rt);
    }
    if let Some(limit) = rt.recording_limit() {
        event_loop.add(
            Box::new(Ticker::new(
                "workingset-limit",
                limit,
                |rt: &mut VmRuntime| {
                    rt.finish_recording("time limit");
                    event_loop::Flow::Remove
                },
            )),
            &mut rt,
        );
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
    // Everything this thread sets up is done: from here on it only serves the guest.
    if let Err(e) = seccomp.apply(loop_filter) {
        stop.stop(StopReason::LoopError {
            error: e.to_string(),
        });
    }
    let _ = reply.send(Ok(StartInfo {
        requests: req_tx,
        wake,
    }));
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
            .map(|t| t.saturating_duration_since(process_start)),
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
    // The vsock devices' host sockets were bound by this VM: remove them with it.
    let vsock_sockets: Vec<RemoveOnDrop> = rt
        .virtio
        .iter()
        .filter(|d| matches!(d.device, super::virtio::VirtioDevice::Vsock(_)))
        .filter_map(|d| d.path.clone().map(RemoveOnDrop))
        .collect();
    drop(rt);
    drop(vsock_sockets);
    drop(sock_guard);
    Ok(report)
}

fn stdin_is_open() -> bool {
    // SAFETY: F_GETFD on fd 0 only queries its flags.
    unsafe { libc::fcntl(0, libc::F_GETFD) != -1 }
}

/// Whether `path` could be created as a snapshot directory (checked before booting).
pub(super) fn check_snapshot_dest(path: &Path) -> Result<(), BuildVmError> {
    let err = |reason| BuildVmError::SnapshotDest {
        path: path.to_path_buf(),
        reason,
    };
    if path.symlink_metadata().is_ok() {
        return Err(err(
            "it already exists: choose another path or remove it first",
        ));
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(err("its parent directory does not exist"));
    }
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(parent.as_os_str()))
        .map_err(|_| err("the path holds a NUL byte"))?;
    // SAFETY: access() on a valid NUL-terminated path reads no memory of ours beyond it.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(err("its parent directory is not writable"));
    }
    Ok(())
}
