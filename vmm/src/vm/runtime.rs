//! The running VM as the event loop sees it: vCPU handles, devices shared with vCPU threads,
//! control requests, the halt watchdog, and the loop's own event sources (signals, stop, stdin).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock_device;
use devices::legacy::Serial;
use devices::legacy::serial::SerialMetrics;
use event_loop::{FdWatch, Watch};
use kvm_ioctls::VmFd;
use nix::sys::signalfd::SignalFd;
use vm_memory::GuestMemoryMmap;

use super::capture::{SnapshotInfo, take_snapshot};
use super::load_snapshot::LazyMemory;
use super::running::Request;
use super::{AfterSnapshot, MemoryBacking, PageServerReport, SnapshotOnReady};
use crate::control::{ControlHandler, ControlRequest, ControlResponse, VmState, VmStatus};
use crate::host::HostCheck;
use crate::layout::MemoryLayout;
use crate::seccomp::ThreadKind;
use crate::stop::{StopNotifier, StopReason};
use crate::vcpu::{ExitCounts, HaltStatus, VcpuHandle};

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The VM's runtime state, owned by the event loop.
#[derive(Debug)]
pub struct VmRuntime {
    /// The vCPU threads.
    pub vcpus: Vec<VcpuHandle>,
    /// COM1, shared with vCPU threads.
    pub serial: Arc<Mutex<Serial>>,
    /// COM1's counters.
    pub serial_metrics: Arc<SerialMetrics>,
    /// Where stops are reported.
    pub stop: Arc<StopNotifier>,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// The host check, for status.
    pub host: HostCheck,
    /// The KVM VM.
    pub vm: VmFd,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Its layout.
    pub layout: MemoryLayout,
    /// How it is backed.
    pub backing: MemoryBacking,
    /// The snapshot taken at READY, once taken.
    pub snapshot_taken: Option<SnapshotInfo>,
    snapshot_on_ready: Option<SnapshotOnReady>,
    lazy: Option<LazyMemory>,
    /// This host's KVM_GET_SUPPORTED_CPUID, recorded in snapshots.
    pub host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// The virtio devices (their workers run on this loop).
    pub virtio: Vec<super::virtio::Attached>,
    paused: bool,
    halted_rounds: u32,
    /// Whether the loop may write files (snapshots, working sets): false under the sealed filter.
    writes_files: bool,
    /// Host addresses guest memory was placed in (a pre-slotted shell): declared last so it is
    /// unmapped after `mem` and the VM are gone.
    _reservation: Option<snapshot::memory_source::Reservation>,
}

/// What [`VmRuntime::new`] is built from.
#[derive(Debug)]
pub struct RuntimeParts {
    pub(super) vcpus: Vec<VcpuHandle>,
    pub(super) serial: Arc<Mutex<Serial>>,
    pub(super) stop: Arc<StopNotifier>,
    pub(super) memory_mib: u64,
    pub(super) host: HostCheck,
    pub(super) vm: VmFd,
    pub(super) mem: GuestMemoryMmap,
    pub(super) layout: MemoryLayout,
    pub(super) backing: MemoryBacking,
    pub(super) snapshot_on_ready: Option<SnapshotOnReady>,
    pub(super) lazy: Option<LazyMemory>,
    pub(super) host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub(super) virtio: Vec<super::virtio::Attached>,
    pub(super) reservation: Option<snapshot::memory_source::Reservation>,
}

impl VmRuntime {
    /// A runtime for started vCPUs.
    pub(super) fn new(p: RuntimeParts) -> Self {
        let serial_metrics = lock_device(&p.serial).metrics();
        Self {
            vcpus: p.vcpus,
            serial: p.serial,
            serial_metrics,
            stop: p.stop,
            memory_mib: p.memory_mib,
            host: p.host,
            vm: p.vm,
            mem: p.mem,
            layout: p.layout,
            backing: p.backing,
            snapshot_taken: None,
            snapshot_on_ready: p.snapshot_on_ready,
            lazy: p.lazy,
            host_cpuid: p.host_cpuid,
            virtio: p.virtio,
            paused: false,
            halted_rounds: 0,
            writes_files: true,
            _reservation: p.reservation,
        }
    }

    /// The seccomp filter of this VM's loop: [`ThreadKind::Vmm`] when it may write files (a
    /// control socket that can ask for a snapshot, a snapshot at READY, a working-set
    /// recording), else [`ThreadKind::VmmSealed`], and snapshot requests through the running
    /// VM's handle are refused from then on.
    pub(super) fn loop_filter(&mut self, control_socket: bool) -> ThreadKind {
        let writes = control_socket
            || self.snapshot_on_ready.is_some()
            || self.lazy.as_ref().is_some_and(LazyMemory::is_recording);
        self.writes_files = writes;
        if writes {
            ThreadKind::Vmm
        } else {
            ThreadKind::VmmSealed
        }
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops the VM if the page server serving its memory has died: its vCPUs would wait forever.
    pub fn check_page_server(&mut self) {
        if let Some(lazy) = &self.lazy
            && lazy.server_ended()
            && self.stop.reason().is_none()
        {
            self.stop.stop(StopReason::PageServerFailed {
                error: "the page server thread ended".into(),
            });
        }
    }

    /// Stops the page server (after the vCPUs) and reports what it did.
    pub(super) fn finish_lazy_memory(&mut self) -> Option<PageServerReport> {
        self.lazy.take().map(LazyMemory::finish)
    }

    /// How long working-set recording may last, if it is recording with a limit.
    pub fn recording_limit(&self) -> Option<Duration> {
        self.lazy.as_ref().and_then(LazyMemory::recording_limit)
    }

    /// Ends working-set recording (at its stop point: READY, a request, the time limit) and
    /// writes the file. Returns whether anything was recording.
    pub fn finish_recording(&mut self, why: &str) -> bool {
        self.lazy
            .as_mut()
            .is_some_and(|lazy| lazy.finish_recording(why))
    }

    /// The guest reached READY with snapshot-on-ready armed: its vCPU has parked; take the
    /// snapshot, then exit or continue.
    pub fn snapshot_at_ready(&mut self) {
        let Some(on_ready) = self.snapshot_on_ready.take() else {
            return;
        };
        match take_snapshot(self, &on_ready.dir) {
            Ok(info) => {
                let path = info.path.display().to_string();
                self.snapshot_taken = Some(info);
                match on_ready.after {
                    AfterSnapshot::Exit => self.stop.stop(StopReason::SnapshotTaken { path }),
                    AfterSnapshot::Continue => self.resume(),
                }
            }
            Err(e) => self.stop.stop(StopReason::SnapshotFailed {
                error: e.to_string(),
            }),
        }
    }

    /// Exit counters summed over vCPUs.
    pub fn exit_counts(&self) -> ExitCounts {
        let mut sum = ExitCounts::default();
        for v in &self.vcpus {
            v.shared().counters.add_to(&mut sum);
        }
        sum
    }

    /// Pauses every vCPU: ask all, then wait for all.
    pub fn pause(&mut self) -> Result<(), crate::vcpu::VcpuControlError> {
        for v in &self.vcpus {
            v.request_pause()?;
        }
        for v in &self.vcpus {
            if let Err(e) = v.wait_paused(PAUSE_TIMEOUT) {
                self.resume();
                return Err(e);
            }
        }
        self.paused = true;
        Ok(())
    }

    /// Resumes every vCPU.
    pub fn resume(&mut self) {
        for v in &self.vcpus {
            v.resume();
        }
        self.paused = false;
    }

    fn state(&self) -> VmState {
        if self.stop.reason().is_some() {
            VmState::Stopping
        } else if self.paused {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// The status report.
    pub fn status(&self) -> VmStatus {
        let start = self.stop.process_start();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        VmStatus {
            state: self.state(),
            vcpus: self.vcpus.len() as u8,
            memory_mib: self.memory_mib,
            uptime_ms: start.elapsed().as_millis() as u64,
            ready_ms: self.stop.ready_after().map(ms),
            first_serial_byte_ms: self
                .serial_metrics
                .first_byte_at
                .get()
                .map(|t| ms(t.saturating_duration_since(start))),
            serial_bytes: self
                .serial_metrics
                .bytes_out
                .load(std::sync::atomic::Ordering::Relaxed),
            exits: self.exit_counts(),
            pid: std::process::id(),
            host: self.host.clone(),
        }
    }

    /// One round of the halt watchdog: reads what the vCPUs reported at the last kick, stops the
    /// VM if every vCPU is halted with interrupts off (twice in a row), then kicks them again.
    pub fn check_halted(&mut self) {
        if self.paused || self.stop.reason().is_some() {
            return;
        }
        let statuses: Vec<HaltStatus> = self.vcpus.iter().map(VcpuHandle::halt_status).collect();
        let dead = statuses.contains(&HaltStatus::HaltedInterruptsOff)
            && statuses.iter().all(|s| {
                matches!(
                    s,
                    HaltStatus::HaltedInterruptsOff | HaltStatus::WaitingForStartup
                )
            })
            && statuses.first() == Some(&HaltStatus::HaltedInterruptsOff);
        self.halted_rounds = if dead { self.halted_rounds + 1 } else { 0 };
        if self.halted_rounds >= 2 {
            self.stop.stop(StopReason::HaltedInterruptsOff);
            return;
        }
        for v in &self.vcpus {
            v.clear_halt_status();
            let _ = v.kick();
        }
    }
}

impl ControlHandler for VmRuntime {
    fn handle_control(&mut self, req: ControlRequest) -> ControlResponse {
        match req {
            ControlRequest::Status => ControlResponse::status(self.status()),
            _ if self.stop.reason().is_some() => ControlResponse::error("the VM is stopping"),
            ControlRequest::Pause if self.paused => {
                ControlResponse::error("the VM is already paused")
            }
            ControlRequest::Pause => match self.pause() {
                Ok(()) => ControlResponse::state(VmState::Paused),
                Err(e) => ControlResponse::error(format!("pause failed: {e}")),
            },
            ControlRequest::Resume if !self.paused => {
                ControlResponse::error("the VM is not paused")
            }
            ControlRequest::Resume => {
                self.resume();
                ControlResponse::state(VmState::Running)
            }
            ControlRequest::Stop => {
                self.stop.stop(StopReason::ControlStop);
                ControlResponse::state(VmState::Stopping)
            }
            ControlRequest::FinishWorkingset => {
                if self.finish_recording("control request") {
                    ControlResponse::state(self.state())
                } else {
                    ControlResponse::error("no working set is being recorded")
                }
            }
            ControlRequest::Snapshot { .. } if !self.writes_files => ControlResponse::error(
                "this VM was started without a control socket or snapshot at READY: its loop \
                 may not write files (sealed seccomp filter)",
            ),
            ControlRequest::Snapshot { path } if !std::path::Path::new(&path).is_absolute() => {
                ControlResponse::error(format!("the snapshot path must be absolute, not {path:?}"))
            }
            ControlRequest::Snapshot { path } => {
                let was_paused = self.paused;
                let result = take_snapshot(self, std::path::Path::new(&path));
                if !was_paused {
                    self.resume();
                }
                match result {
                    Ok(info) => {
                        ControlResponse::snapshot(info.path.display().to_string(), info.elapsed_ms)
                    }
                    Err(e) => ControlResponse::error(format!("snapshot failed: {e}")),
                }
            }
        }
    }
}

/// The loop's own sources: stop reports, snapshot-on-ready, READY, requests from the running-VM
/// handle, termination signals, stdin.
pub(super) fn loop_sources(
    stop: &StopNotifier,
    signals: SignalFd,
    stdin: Option<RawFd>,
    wake: Arc<vmm_sys_util::eventfd::EventFd>,
    requests: Receiver<Request>,
) -> Vec<FdWatch<VmRuntime>> {
    let mut sources = vec![
        // Requests from the RunningVm handle: carried out like control-socket requests.
        FdWatch::new("handle", wake.as_raw_fd(), move |rt: &mut VmRuntime| {
            let _ = wake.read();
            while let Ok((req, reply)) = requests.try_recv() {
                let _ = reply.send(rt.handle_control(req));
            }
            Watch::Again
        }),
        // The guest's first READY: the start-up working set ends here.
        FdWatch::new(
            "ready",
            stop.ready_eventfd().as_raw_fd(),
            |rt: &mut VmRuntime| {
                let _ = rt.stop.ready_eventfd().read();
                rt.finish_recording("guest READY");
                Watch::Done
            },
        ),
        // A stop was reported: end the loop.
        FdWatch::new("stop", stop.eventfd().as_raw_fd(), |rt: &mut VmRuntime| {
            let _ = rt.stop.eventfd().read();
            if rt.stop.reason().is_some() {
                Watch::ExitLoop
            } else {
                Watch::Again
            }
        }),
        // A vCPU parked at READY with snapshot-on-ready armed.
        FdWatch::new(
            "snapshot-on-ready",
            stop.snapshot_eventfd().as_raw_fd(),
            |rt: &mut VmRuntime| {
                let _ = rt.stop.snapshot_eventfd().read();
                rt.snapshot_at_ready();
                Watch::Again
            },
        ),
    ];
    // SIGINT, SIGTERM, SIGHUP: each stops the VM cleanly.
    let sfd_raw = signals.as_raw_fd();
    sources.push(FdWatch::new(
        "signals",
        sfd_raw,
        move |rt: &mut VmRuntime| {
            if let Ok(Some(info)) = signals.read_signal() {
                rt.stop.stop(StopReason::Signal {
                    signal: info.ssi_signo as i32,
                });
            }
            Watch::Again
        },
    ));
    // The VMM's stdin, fed to the guest's serial port until end of input.
    if let Some(fd) = stdin {
        sources.push(FdWatch::new("stdin", fd, move |rt: &mut VmRuntime| {
            let mut buf = [0u8; 1024];
            // SAFETY: reading into a local buffer of the given length from an fd we were given.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                lock_device(&rt.serial).queue_input(&buf[..n as usize]);
                return Watch::Again;
            }
            let e = std::io::Error::last_os_error().kind();
            if n < 0
                && (e == std::io::ErrorKind::Interrupted || e == std::io::ErrorKind::WouldBlock)
            {
                Watch::Again
            } else {
                Watch::Done
            }
        }));
    }
    sources
}
