//! Why a VM stopped, and the one place every stop path reports to.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{GuestSignal, VmNotifier};
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

/// Why the VM ended. Each has a one-line description and a process exit code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    /// The guest reset the machine through the i8042 controller.
    GuestReset,
    /// The guest asked KVM for a power-off (system event).
    GuestPowerOff,
    /// Every vCPU halted with interrupts disabled: nothing can wake the guest again.
    HaltedInterruptsOff,
    /// A vCPU triple-faulted (KVM shutdown exit).
    TripleFault {
        /// The vCPU.
        vcpu: u8,
    },
    /// KVM could not emulate something the guest did.
    InternalError {
        /// The vCPU.
        vcpu: u8,
        /// KVM's sub-error code.
        suberror: u32,
    },
    /// KVM could not enter the guest.
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// A KVM exit the VMM does not handle.
    UnexpectedExit {
        /// The vCPU.
        vcpu: u8,
        /// The exit, as text.
        exit: String,
    },
    /// A vCPU ioctl failed.
    VcpuError {
        /// The vCPU.
        vcpu: u8,
        /// The error.
        error: String,
    },
    /// A `stop` request on the control socket.
    ControlStop,
    /// The VMM received a termination signal.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// The event loop failed.
    LoopError {
        /// The error.
        error: String,
    },
    /// A snapshot was taken at READY and the VM was told to exit afterwards.
    SnapshotTaken {
        /// Where it was written.
        path: String,
    },
    /// Taking a snapshot failed.
    SnapshotFailed {
        /// Why.
        error: String,
    },
    /// The page server serving guest memory stopped.
    PageServerFailed {
        /// Why.
        error: String,
    },
}

impl StopReason {
    /// The `kata-snap boot` exit status for this stop: 0 when the guest ended itself normally,
    /// 3 for a guest crash, 4 for a control stop, 128+N for signal N, 1 for a VMM failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::GuestReset
            | StopReason::GuestPowerOff
            | StopReason::HaltedInterruptsOff
            | StopReason::SnapshotTaken { .. } => 0,
            StopReason::TripleFault { .. }
            | StopReason::InternalError { .. }
            | StopReason::FailEntry { .. }
            | StopReason::UnexpectedExit { .. } => 3,
            StopReason::ControlStop => 4,
            StopReason::Signal { signal } => 128 + signal,
            StopReason::VcpuError { .. }
            | StopReason::LoopError { .. }
            | StopReason::SnapshotFailed { .. }
            | StopReason::PageServerFailed { .. } => 1,
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::GuestReset => write!(f, "guest reset (i8042 reset line)"),
            StopReason::GuestPowerOff => write!(f, "guest powered off"),
            StopReason::HaltedInterruptsOff => {
                write!(f, "guest halted with interrupts disabled on every vCPU")
            }
            StopReason::TripleFault { vcpu } => {
                write!(f, "guest crashed: triple fault on vCPU {vcpu}")
            }
            StopReason::InternalError { vcpu, suberror } => {
                write!(
                    f,
                    "guest crashed: KVM internal error {suberror} on vCPU {vcpu}"
                )
            }
            StopReason::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "guest crashed: KVM failed to enter vCPU {vcpu} (reason {reason:#x})"
                )
            }
            StopReason::UnexpectedExit { vcpu, exit } => {
                write!(f, "guest stopped: unhandled KVM exit {exit} on vCPU {vcpu}")
            }
            StopReason::VcpuError { vcpu, error } => write!(f, "vCPU {vcpu} failed: {error}"),
            StopReason::ControlStop => write!(f, "stopped by a control request"),
            StopReason::Signal { signal } => write!(f, "stopped by signal {signal}"),
            StopReason::LoopError { error } => write!(f, "event loop failed: {error}"),
            StopReason::SnapshotTaken { path } => write!(f, "snapshot taken at READY: {path}"),
            StopReason::SnapshotFailed { error } => write!(f, "snapshot failed: {error}"),
            StopReason::PageServerFailed { error } => {
                write!(f, "guest memory page server failed: {error}")
            }
        }
    }
}

/// Collects the first stop reason and wakes the event loop; also records guest milestones (READY)
/// and tells subscribers ([`crate::vm::RunningVm::events`]) of both.
#[derive(Debug)]
pub struct StopNotifier {
    reason: Mutex<Option<StopReason>>,
    evt: EventFd,
    process_start: Mutex<Instant>,
    ready_after: Mutex<Option<Duration>>,
    milestone: Condvar,
    snapshot_on_ready: std::sync::atomic::AtomicBool,
    snapshot_evt: EventFd,
    ready_evt: EventFd,
    subscribers: Mutex<Vec<Sender<crate::vm::VmEvent>>>,
}

impl StopNotifier {
    /// A notifier whose eventfd the loop polls; times are measured from `process_start`.
    pub fn new(process_start: Instant) -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            process_start: Mutex::new(process_start),
            ready_after: Mutex::new(None),
            milestone: Condvar::new(),
            snapshot_on_ready: std::sync::atomic::AtomicBool::new(false),
            snapshot_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            ready_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            subscribers: Mutex::new(Vec::new()),
        })
    }

    /// Written once when the guest first says READY (the loop ends working-set recording there).
    pub fn ready_eventfd(&self) -> &EventFd {
        &self.ready_evt
    }

    /// A receiver of the events from now on.
    pub fn subscribe(&self) -> Receiver<crate::vm::VmEvent> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    fn publish(&self, event: crate::vm::VmEvent) {
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Waits until the guest says READY; `None` if `timeout` passes first or the VM stops.
    pub fn wait_ready(&self, timeout: Duration) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        let mut ready = self.ready_after.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if ready.is_some() {
                return *ready;
            }
            if self.reason().is_some() {
                return None;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            ready = self
                .milestone
                .wait_timeout(ready, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Makes the next READY park the vCPU that wrote it and signal [`Self::snapshot_eventfd`].
    pub fn arm_snapshot_on_ready(&self) {
        self.snapshot_on_ready
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Written when a vCPU parked at the snapshot point.
    pub fn snapshot_eventfd(&self) -> &EventFd {
        &self.snapshot_evt
    }

    /// Called by the vCPU thread once it has requested its own pause at the snapshot point.
    pub fn snapshot_point_reached(&self) {
        let _ = self.snapshot_evt.write(1);
    }

    /// Records `reason` unless another one came first, and wakes the loop.
    pub fn stop(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let first = slot.is_none();
        if first {
            tracing::debug!("stop requested: {reason}");
            *slot = Some(reason.clone());
        }
        drop(slot);
        // A full eventfd counter still wakes the loop; nothing to do on error.
        let _ = self.evt.write(1);
        if first {
            // Wake READY waiters: there will be no READY now.
            let _guard = self.ready_after.lock().unwrap_or_else(|p| p.into_inner());
            self.milestone.notify_all();
            drop(_guard);
            self.publish(crate::vm::VmEvent::Stopping(reason));
        }
    }

    /// The stop reason, once there is one.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd written on every stop.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// When the guest first said READY, measured from process start.
    pub fn ready_after(&self) -> Option<Duration> {
        *self.ready_after.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Process start, the zero of every time this VMM reports.
    pub fn process_start(&self) -> Instant {
        *self.process_start.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the zero of reported times (a pre-started VMM takes its client's start).
    pub fn set_process_start(&self, start: Instant) {
        *self.process_start.lock().unwrap_or_else(|p| p.into_inner()) = start;
    }
}

impl VmNotifier for StopNotifier {
    fn reset_requested(&self) {
        self.stop(StopReason::GuestReset);
    }

    fn guest_signal(&self, signal: GuestSignal) {
        match signal {
            GuestSignal::Ready => {
                let mut ready = self.ready_after.lock().unwrap_or_else(|p| p.into_inner());
                if ready.is_none() {
                    let t = self.process_start().elapsed();
                    *ready = Some(t);
                    if self
                        .snapshot_on_ready
                        .swap(false, std::sync::atomic::Ordering::AcqRel)
                    {
                        crate::vcpu::pause_after_this_exit();
                    }
                    tracing::info!(
                        "guest READY {:.3} ms after process start",
                        t.as_secs_f64() * 1e3
                    );
                    self.milestone.notify_all();
                    drop(ready);
                    let _ = self.ready_evt.write(1);
                    self.publish(crate::vm::VmEvent::Ready(t));
                }
            }
            GuestSignal::Reserved(v) => tracing::debug!("guest signal {v} ignored (reserved)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stop_notifier_first_reason_wins() {
        let n = StopNotifier::new(Instant::now()).unwrap();
        assert_eq!(n.reason(), None);
        n.stop(StopReason::TripleFault { vcpu: 1 });
        n.reset_requested();
        assert_eq!(n.reason(), Some(StopReason::TripleFault { vcpu: 1 }));
        assert!(n.eventfd().read().unwrap() >= 2);
    }

    #[test]
    fn test_ready_recorded_once() {
        let n = StopNotifier::new(Instant::now()).unwrap();
        n.guest_signal(GuestSignal::Reserved(9));
        assert_eq!(n.ready_after(), None);
        n.guest_signal(GuestSignal::Ready);
        let first = n.ready_after().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        n.guest_signal(GuestSignal::Ready);
        assert_eq!(n.ready_after(), Some(first));
    }

    #[test]
    fn test_exit_codes() {
        assert_eq!(StopReason::GuestReset.exit_code(), 0);
        assert_eq!(StopReason::HaltedInterruptsOff.exit_code(), 0);
        assert_eq!(StopReason::TripleFault { vcpu: 0 }.exit_code(), 3);
        assert_eq!(StopReason::ControlStop.exit_code(), 4);
        assert_eq!(StopReason::Signal { signal: 15 }.exit_code(), 143);
    }
}
