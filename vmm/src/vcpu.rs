//! vCPU threads: configuration at boot, the KVM_RUN loop, and pausing/kicking from other threads.
//!
//! ```text
//!            spawn                 pause()                 resume()
//!  Created ─────────► Running ───────────────► Paused ───────────────► Running
//!                        │  ▲ kick (signal):                 │
//!                        │  └─ KVM_RUN returns EINTR,        │ request_exit()
//!                        │     halt status sampled           ▼
//!                        └──── stop exit / error ──────►  Exited
//! ```
//!
//! A kick is a real-time signal sent to the vCPU thread. Its handler sets `kvm_run.immediate_exit`
//! through a thread-local pointer, so a kick that lands just before KVM_RUN is entered is not lost:
//! KVM_RUN returns EINTR at once.
//!
//! Before parking, a vCPU re-enters KVM_RUN once with `immediate_exit` set: KVM then completes the
//! I/O of the last exit (advancing RIP past the OUT, storing an IN's data) and returns at once, so
//! the state read while parked is consistent. A parked vCPU saves its state on its own thread when
//! asked ([`VcpuHandle::save_state`]). A device may ask the vCPU whose access it is handling to
//! park right after that exit ([`pause_after_this_exit`]): that is how a snapshot is taken at the
//! exact exit where the guest wrote READY.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Bus;
use kvm_bindings::{
    CpuId, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_SIPI_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::arch::{cpuid, lapic, msr, regs};
use crate::persist::{self, VcpuState};
use crate::stop::{StopNotifier, StopReason};

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureVcpuError {
    /// An ioctl failed.
    #[error("vCPU {vcpu}: {step} failed: {source}")]
    Ioctl {
        /// The vCPU.
        vcpu: u8,
        /// What was being set.
        step: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("vCPU {vcpu}: KVM set {set} of {wanted} boot MSRs (first refused: {first_refused:#x})")]
    Msrs {
        /// The vCPU.
        vcpu: u8,
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
        /// The first MSR KVM did not take.
        first_refused: u32,
    },
    /// The CPUID table could not be built.
    #[error("vCPU {vcpu}: building CPUID: {0}", vcpu = .1)]
    Cpuid(String, u8),
}

/// Errors controlling a running vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuControlError {
    /// The vCPU did not acknowledge a pause in time.
    #[error("vCPU {0} did not pause within {1:?}")]
    PauseTimeout(u8, Duration),
    /// The vCPU thread has exited.
    #[error("vCPU {0} has already exited")]
    Exited(u8),
    /// The kick signal could not be sent.
    #[error("cannot signal vCPU {0}: {1}")]
    Kick(u8, vmm_sys_util::errno::Error),
    /// The vCPU is not paused.
    #[error("vCPU {0} is not paused")]
    NotPaused(u8),
    /// Reading the vCPU's state failed.
    #[error("saving vCPU {0}: {1}")]
    Save(u8, #[source] crate::persist::PersistError),
    /// The vCPU did not save its state in time.
    #[error("vCPU {0} did not save its state within {1:?}")]
    SaveTimeout(u8, Duration),
}

/// Sets up one vCPU for the 64-bit boot protocol entering at `entry`.
pub fn configure_vcpu(
    fd: &VcpuFd,
    supported_cpuid: &CpuId,
    topo: cpuid::VcpuTopology,
    entry: u64,
) -> Result<(), ConfigureVcpuError> {
    let vcpu = topo.id;
    let io = |step: &'static str| move |source| ConfigureVcpuError::Ioctl { vcpu, step, source };
    let mut cpuid_table = supported_cpuid.clone();
    cpuid::filter_cpuid(cpuid_table.as_mut_slice(), topo);
    fd.set_cpuid2(&cpuid_table).map_err(io("KVM_SET_CPUID2"))?;

    let msrs = msr::boot_msrs().map_err(|e| ConfigureVcpuError::Cpuid(format!("{e:?}"), vcpu))?;
    let set = fd.set_msrs(&msrs).map_err(io("KVM_SET_MSRS"))?;
    if set != msrs.as_slice().len() {
        return Err(ConfigureVcpuError::Msrs {
            vcpu,
            set,
            wanted: msrs.as_slice().len(),
            first_refused: msrs.as_slice()[set].index,
        });
    }
    fd.set_regs(&regs::boot_regs(entry))
        .map_err(io("KVM_SET_REGS"))?;
    let sregs = fd.get_sregs().map_err(io("KVM_GET_SREGS"))?;
    fd.set_sregs(&regs::boot_sregs(sregs))
        .map_err(io("KVM_SET_SREGS"))?;
    fd.set_fpu(&regs::boot_fpu()).map_err(io("KVM_SET_FPU"))?;
    let mut lapic_state = fd.get_lapic().map_err(io("KVM_GET_LAPIC"))?;
    lapic::set_lint(&mut lapic_state);
    fd.set_lapic(&lapic_state).map_err(io("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Per-vCPU exit counters, readable from any thread.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub pio_in: AtomicU64,
    /// Port writes.
    pub pio_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Accesses no device claimed.
    pub unhandled: AtomicU64,
    /// Returns from KVM_RUN because of a kick.
    pub interrupted: AtomicU64,
}

/// A plain copy of [`ExitCounters`], summed over vCPUs for status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Port reads.
    pub pio_in: u64,
    /// Port writes.
    pub pio_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// Accesses no device claimed.
    pub unhandled: u64,
    /// Kicks out of KVM_RUN.
    pub interrupted: u64,
}

impl ExitCounters {
    /// Adds this vCPU's counters to `sum`.
    pub fn add_to(&self, sum: &mut ExitCounts) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        sum.pio_in += get(&self.pio_in);
        sum.pio_out += get(&self.pio_out);
        sum.mmio_read += get(&self.mmio_read);
        sum.mmio_write += get(&self.mmio_write);
        sum.unhandled += get(&self.unhandled);
        sum.interrupted += get(&self.interrupted);
    }
}

/// What a vCPU was doing when last sampled after a kick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HaltStatus {
    /// Not sampled since the last reset.
    Unknown = 0,
    /// Running or halted with interrupts enabled.
    Active = 1,
    /// Halted with interrupts disabled: only an NMI or INIT could wake it.
    HaltedInterruptsOff = 2,
    /// An application processor the guest never started.
    WaitingForStartup = 3,
}

impl HaltStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => HaltStatus::Active,
            2 => HaltStatus::HaltedInterruptsOff,
            3 => HaltStatus::WaitingForStartup,
            _ => HaltStatus::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Exit,
}

/// The run state of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Thread started, not yet in KVM_RUN.
    Starting,
    /// In or around KVM_RUN.
    Running,
    /// Parked on a pause request.
    Paused,
    /// Thread finished.
    Exited,
}

#[derive(Debug)]
struct Control {
    request: Request,
    state: RunState,
    save_requested: bool,
    saved: Option<Result<VcpuState, crate::persist::PersistError>>,
}

/// The part of a vCPU other threads see.
#[derive(Debug)]
pub struct VcpuShared {
    id: u8,
    control: Mutex<Control>,
    cv: Condvar,
    halt: AtomicU8,
    /// Exit counters.
    pub counters: ExitCounters,
}

impl VcpuShared {
    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null when the thread runs no vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
    /// Set by a device, during an exit, to park this vCPU right after it.
    static PAUSE_AFTER_EXIT: Cell<bool> = const { Cell::new(false) };
}

/// Called by a device while handling an access: the vCPU that made it parks right after this exit
/// (its I/O completed), before running another guest instruction.
pub fn pause_after_this_exit() {
    PAUSE_AFTER_EXIT.with(|p| p.set(true));
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: the pointer is set by the vCPU thread to a field of its own mapped kvm_run
            // and cleared before that mapping goes away; the handler runs on that same thread.
            unsafe { ptr.write_volatile(1) };
        }
    });
}

fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), kick_handler));
    result
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its index.
    pub id: u8,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where stop reasons go.
    pub stop: Arc<StopNotifier>,
    /// The MSRs to save in a snapshot.
    pub msr_indices: Arc<Vec<u32>>,
    /// The seccomp filters; the vCPU kind's is installed before the first `KVM_RUN`.
    pub seccomp: crate::seccomp::Filters,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    shared: Arc<VcpuShared>,
    thread: Option<JoinHandle<()>>,
}

enum Flow {
    Continue,
    Stop(StopReason),
}

/// A vCPU thread started ahead of its vCPU: it has installed the vCPU seccomp filter and waits
/// for [`Vcpu::start_on`] (a pre-loaded VM starts its vCPUs without creating threads or
/// installing filters on the claim's path). Dropping it ends the thread.
#[derive(Debug)]
pub struct ParkedVcpuThread {
    tx: std::sync::mpsc::Sender<(Vcpu, Arc<VcpuShared>)>,
    thread: JoinHandle<()>,
}

impl ParkedVcpuThread {
    /// Starts the thread of vCPU `id`: it installs `seccomp`'s vCPU filter, then waits.
    pub fn spawn(id: u8, seccomp: &crate::seccomp::Filters) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<(Vcpu, Arc<VcpuShared>)>();
        let filters = seccomp.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let applied = filters.apply(crate::seccomp::ThreadKind::Vcpu);
                if let Ok((vcpu, shared)) = rx.recv() {
                    vcpu.run_filtered(&shared, applied);
                }
            })?;
        Ok(Self { tx, thread })
    }
}

impl Vcpu {
    /// Starts the vCPU's thread. The caller must have called [`install_kick_handler`].
    pub fn spawn(self) -> std::io::Result<VcpuHandle> {
        let shared = self.shared();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run(&thread_shared))?;
        Ok(VcpuHandle {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs the vCPU on `parked`, a thread started ahead for it; a thread that is gone is
    /// replaced by a new one ([`Vcpu::spawn`]). The caller must have called
    /// [`install_kick_handler`].
    pub fn start_on(self, parked: ParkedVcpuThread) -> std::io::Result<VcpuHandle> {
        let shared = self.shared();
        match parked.tx.send((self, shared.clone())) {
            Ok(()) => Ok(VcpuHandle {
                shared,
                thread: Some(parked.thread),
            }),
            Err(std::sync::mpsc::SendError((vcpu, _))) => vcpu.spawn(),
        }
    }

    fn shared(&self) -> Arc<VcpuShared> {
        Arc::new(VcpuShared {
            id: self.id,
            control: Mutex::new(Control {
                request: Request::Run,
                state: RunState::Starting,
                save_requested: false,
                saved: None,
            }),
            cv: Condvar::new(),
            halt: AtomicU8::new(HaltStatus::Unknown as u8),
            counters: ExitCounters::default(),
        })
    }

    fn run(self, shared: &VcpuShared) {
        let applied = self.seccomp.apply(crate::seccomp::ThreadKind::Vcpu);
        self.run_filtered(shared, applied);
    }

    /// The vCPU loop, on a thread whose filter install came to `applied`.
    fn run_filtered(
        mut self,
        shared: &VcpuShared,
        applied: Result<(), crate::seccomp::SeccompError>,
    ) {
        let exit_ptr: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(exit_ptr));
        if let Err(e) = applied {
            self.stop.stop(StopReason::VcpuError {
                vcpu: self.id,
                error: e.to_string(),
            });
            return;
        }
        while self.park_while_paused(shared) {
            let flow = match self.fd.run() {
                Ok(exit) => handle_exit(exit, self.id, &self.pio, &self.mmio, &shared.counters),
                Err(e) if e.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    shared.counters.interrupted.fetch_add(1, Ordering::Relaxed);
                    sample_halt_status(&self.fd, shared);
                    Flow::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => Flow::Continue,
                Err(e) => Flow::Stop(StopReason::VcpuError {
                    vcpu: self.id,
                    error: format!("KVM_RUN: {e}"),
                }),
            };
            if let Flow::Stop(reason) = flow {
                self.stop.stop(reason);
                break;
            }
            if PAUSE_AFTER_EXIT.with(|p| p.replace(false)) {
                let mut c = shared.control();
                if c.request == Request::Run {
                    c.request = Request::Pause;
                }
                drop(c);
                self.stop.snapshot_point_reached();
            }
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        let mut c = shared.control();
        c.state = RunState::Exited;
        shared.cv.notify_all();
    }

    /// Completes the last exit's I/O without running guest code (see the module docs).
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Parks while a pause is requested, saving state when asked; returns `false` on exit.
    fn park_while_paused(&mut self, shared: &VcpuShared) -> bool {
        let mut c = shared.control();
        loop {
            match c.request {
                Request::Run => {
                    c.state = RunState::Running;
                    return true;
                }
                Request::Exit => return false,
                Request::Pause if c.state != RunState::Paused => {
                    drop(c);
                    self.complete_pending_io();
                    c = shared.control();
                    if c.request == Request::Pause {
                        c.state = RunState::Paused;
                        shared.cv.notify_all();
                    }
                }
                Request::Pause if c.save_requested => {
                    drop(c);
                    let saved = persist::save_vcpu(&self.fd, self.id, &self.msr_indices);
                    c = shared.control();
                    c.save_requested = false;
                    c.saved = Some(saved);
                    shared.cv.notify_all();
                }
                Request::Pause => c = shared.cv.wait(c).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

fn sample_halt_status(fd: &VcpuFd, shared: &VcpuShared) {
    let (mp, regs) = (fd.get_mp_state(), fd.get_regs());
    if let (Ok(mp), Ok(r)) = (&mp, &regs) {
        tracing::trace!(
            vcpu = shared.id,
            rip = format_args!("{:#x}", r.rip),
            mp_state = mp.mp_state,
            "kicked"
        );
    }
    let status = match (mp, regs) {
        (Ok(mp), Ok(r)) => match mp.mp_state {
            KVM_MP_STATE_HALTED if r.rflags & RFLAGS_IF == 0 => HaltStatus::HaltedInterruptsOff,
            KVM_MP_STATE_UNINITIALIZED
            | KVM_MP_STATE_INIT_RECEIVED
            | KVM_MP_STATE_SIPI_RECEIVED => HaltStatus::WaitingForStartup,
            _ => HaltStatus::Active,
        },
        _ => HaltStatus::Active,
    };
    shared.halt.store(status as u8, Ordering::Release);
}

fn handle_exit(exit: VcpuExit<'_>, id: u8, pio: &Bus, mmio: &Bus, counters: &ExitCounters) -> Flow {
    match exit {
        VcpuExit::IoIn(port, data) => {
            counters.pio_in.fetch_add(1, Ordering::Relaxed);
            if !pio.read(u64::from(port), data) {
                counters.unhandled.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            counters.pio_out.fetch_add(1, Ordering::Relaxed);
            if !pio.write(u64::from(port), data) {
                counters.unhandled.fetch_add(1, Ordering::Relaxed);
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            counters.mmio_read.fetch_add(1, Ordering::Relaxed);
            if !mmio.read(addr, data) {
                counters.unhandled.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            counters.mmio_write.fetch_add(1, Ordering::Relaxed);
            if !mmio.write(addr, data) {
                counters.unhandled.fetch_add(1, Ordering::Relaxed);
            }
        }
        VcpuExit::Shutdown => return Flow::Stop(StopReason::TripleFault { vcpu: id }),
        VcpuExit::Hlt => {
            // Only without an in-kernel LAPIC; with one, halts stay in the kernel.
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Flow::Stop(match kind {
                KVM_SYSTEM_EVENT_RESET => StopReason::GuestReset,
                KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::GuestPowerOff,
                other => StopReason::UnexpectedExit {
                    vcpu: id,
                    exit: format!("system event {other}"),
                },
            });
        }
        VcpuExit::FailEntry(reason, _cpu) => {
            return Flow::Stop(StopReason::FailEntry { vcpu: id, reason });
        }
        VcpuExit::InternalError => {
            return Flow::Stop(StopReason::InternalError {
                vcpu: id,
                suberror: 0,
            });
        }
        other => {
            return Flow::Stop(StopReason::UnexpectedExit {
                vcpu: id,
                exit: format!("{other:?}"),
            });
        }
    }
    Flow::Continue
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn id(&self) -> u8 {
        self.shared.id
    }

    /// The shared state (counters).
    pub fn shared(&self) -> &VcpuShared {
        &self.shared
    }

    /// The vCPU's run state.
    pub fn state(&self) -> RunState {
        self.shared.control().state
    }

    /// The halt status sampled at the last kick.
    pub fn halt_status(&self) -> HaltStatus {
        HaltStatus::from_u8(self.shared.halt.load(Ordering::Acquire))
    }

    /// Forgets the sampled halt status, before a new round of kicks.
    pub fn clear_halt_status(&self) {
        self.shared
            .halt
            .store(HaltStatus::Unknown as u8, Ordering::Release);
    }

    /// Interrupts KVM_RUN on the vCPU's thread.
    pub fn kick(&self) -> Result<(), VcpuControlError> {
        match &self.thread {
            Some(t) => t
                .kill(kick_signal())
                .map_err(|e| VcpuControlError::Kick(self.shared.id, e)),
            None => Err(VcpuControlError::Exited(self.shared.id)),
        }
    }

    /// Asks the vCPU to pause; does not wait.
    pub fn request_pause(&self) -> Result<(), VcpuControlError> {
        {
            let mut c = self.shared.control();
            if c.state == RunState::Exited {
                return Err(VcpuControlError::Exited(self.shared.id));
            }
            c.request = Request::Pause;
        }
        self.kick()
    }

    /// Waits until the vCPU is parked (after [`Self::request_pause`]).
    pub fn wait_paused(&self, timeout: Duration) -> Result<(), VcpuControlError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.control();
        loop {
            match c.state {
                RunState::Paused => return Ok(()),
                RunState::Exited => return Err(VcpuControlError::Exited(self.shared.id)),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuControlError::PauseTimeout(self.shared.id, timeout));
            }
            // Wake up now and then to kick again, in case the thread was between checks.
            let wait = (deadline - now).min(Duration::from_millis(20));
            let (guard, _) = self
                .shared
                .cv
                .wait_timeout(c, wait)
                .unwrap_or_else(|p| p.into_inner());
            c = guard;
            if c.state == RunState::Running {
                drop(c);
                let _ = self.kick();
                c = self.shared.control();
            }
        }
    }

    /// Reads the state of a paused vCPU (on its own thread).
    pub fn save_state(&self, timeout: Duration) -> Result<VcpuState, VcpuControlError> {
        let id = self.shared.id;
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.control();
        if c.state != RunState::Paused {
            return Err(VcpuControlError::NotPaused(id));
        }
        c.save_requested = true;
        c.saved = None;
        self.shared.cv.notify_all();
        loop {
            if let Some(saved) = c.saved.take() {
                return saved.map_err(|e| VcpuControlError::Save(id, e));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuControlError::SaveTimeout(id, timeout));
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut c = self.shared.control();
        if c.request == Request::Pause {
            c.request = Request::Run;
            self.shared.cv.notify_all();
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop_and_join(&mut self) {
        {
            let mut c = self.shared.control();
            c.request = Request::Exit;
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.join().is_err() {
                tracing::error!("vCPU {} thread panicked", self.shared.id);
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
