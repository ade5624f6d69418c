//! The running VM's handle: requests to the loop, READY and stop events, the final report.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{BuildVmError, VmReport};
use crate::control::{ControlRequest, ControlResponse, VmStatus};
use crate::stop::{StopNotifier, StopReason};

/// A request to the loop and where its answer goes.
pub(super) type Request = (ControlRequest, Sender<ControlResponse>);

/// Something that happened to a running VM.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEvent {
    /// The guest said READY (port 0xf4), this long after process start.
    Ready(Duration),
    /// The VM is stopping, for this reason; [`RunningVm::wait`] gives the whole report.
    Stopping(StopReason),
}

/// Errors of requests to a running VM.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The VM refused or failed the request.
    #[error("{0}")]
    Refused(String),
    /// The VM has stopped: nothing answers requests any more.
    #[error("the VM has stopped")]
    Stopped,
}

/// Stops a running VM from any thread.
#[derive(Debug, Clone)]
pub struct StopHandle {
    stop: Arc<StopNotifier>,
}

impl StopHandle {
    /// Stops the VM as termination signal `signal` would (exit status 128 + signal).
    pub fn stop_by_signal(&self, signal: i32) {
        self.stop.stop(StopReason::Signal { signal });
    }
}

/// A VM whose vCPUs run. Requests are carried out on the VMM thread's loop, in order with the
/// control socket's.
#[derive(Debug)]
pub struct RunningVm {
    requests: Sender<Request>,
    wake: Arc<EventFd>,
    thread: JoinHandle<Result<Option<VmReport>, BuildVmError>>,
    stop: Arc<StopNotifier>,
    seccomp: crate::seccomp::Filters,
}

impl RunningVm {
    pub(super) fn new(
        requests: Sender<Request>,
        wake: Arc<EventFd>,
        thread: JoinHandle<Result<Option<VmReport>, BuildVmError>>,
        stop: Arc<StopNotifier>,
        seccomp: crate::seccomp::Filters,
    ) -> Self {
        Self {
            requests,
            wake,
            thread,
            stop,
            seccomp,
        }
    }

    /// Installs the main-thread seccomp filter on the calling thread, for a process that runs
    /// one VM and from now on only waits for it and reports (as `kata-snap boot` and `restore`
    /// do). The thread can then build no other VM.
    pub fn restrict_caller(&self) -> Result<(), crate::seccomp::SeccompError> {
        self.seccomp.apply(crate::seccomp::ThreadKind::Main)
    }

    /// The VM's seccomp filters, for a helper thread of the caller's that must install its own
    /// (a thread that watches the VM or forwards signals to it).
    pub fn seccomp(&self) -> &crate::seccomp::Filters {
        &self.seccomp
    }

    /// Carries out one control request (the same requests as the control socket's).
    pub fn request(&self, req: ControlRequest) -> Result<ControlResponse, RequestError> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send((req, tx))
            .map_err(|_| RequestError::Stopped)?;
        // A full eventfd counter still wakes the loop.
        let _ = self.wake.write(1);
        rx.recv().map_err(|_| RequestError::Stopped)
    }

    fn ok(&self, req: ControlRequest) -> Result<ControlResponse, RequestError> {
        let r = self.request(req)?;
        if r.ok {
            Ok(r)
        } else {
            Err(RequestError::Refused(r.error.unwrap_or_default()))
        }
    }

    /// Pauses every vCPU.
    pub fn pause(&self) -> Result<(), RequestError> {
        self.ok(ControlRequest::Pause).map(drop)
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), RequestError> {
        self.ok(ControlRequest::Resume).map(drop)
    }

    /// Writes a snapshot to `path` (absolute, not existing); the VM runs on afterwards if it was
    /// running.
    pub fn snapshot(&self, path: &std::path::Path) -> Result<(), RequestError> {
        self.ok(ControlRequest::Snapshot {
            path: path.display().to_string(),
        })
        .map(drop)
    }

    /// The VM's status.
    pub fn status(&self) -> Result<VmStatus, RequestError> {
        self.ok(ControlRequest::Status)?
            .status
            .map(|s| *s)
            .ok_or_else(|| RequestError::Refused("no status in the answer".into()))
    }

    /// Ends working-set recording now and writes the file.
    pub fn finish_recording(&self) -> Result<(), RequestError> {
        self.ok(ControlRequest::FinishWorkingset).map(drop)
    }

    /// Asks the VM to stop (exit status 4, as a control `stop`).
    pub fn stop(&self) {
        self.stop.stop(StopReason::ControlStop);
    }

    /// A handle that can stop the VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            stop: self.stop.clone(),
        }
    }

    /// Stops the VM as termination signal `signal` would (exit status 128 + signal): for a
    /// client that forwards the signals it receives to a VMM in another process.
    pub fn stop_by_signal(&self, signal: i32) {
        self.stop.stop(StopReason::Signal { signal });
    }

    /// Waits until the guest says READY; `None` if `timeout` passes first or the VM stops.
    pub fn wait_ready(&self, timeout: Duration) -> Option<Duration> {
        self.stop.wait_ready(timeout)
    }

    /// Events from now on: READY (if it comes later) and the stop.
    pub fn events(&self) -> Receiver<VmEvent> {
        self.stop.subscribe()
    }

    /// Waits for the VM to end and returns its report.
    pub fn wait(self) -> Result<VmReport, BuildVmError> {
        drop(self.requests);
        match self.thread.join() {
            Ok(Ok(Some(report))) => Ok(report),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) | Err(_) => Err(BuildVmError::VmmThreadGone),
        }
    }
}
