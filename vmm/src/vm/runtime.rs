//! The running VM as the event loop sees it: vCPU handles, devices shared with vCPU threads,
//! control requests, the halt watchdog, and the loop's own event sources (signals, stop, stdin).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock_device;
use devices::legacy::Serial;
use devices::legacy::serial::SerialMetrics;
use nix::sys::signalfd::SignalFd;

use crate::control::{ControlHandler, ControlRequest, ControlResponse, VmState, VmStatus};
use event_loop::{Completion, EventSource, Flow, Ops};
use crate::host::HostCheck;
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
    paused: bool,
    halted_rounds: u32,
}

impl VmRuntime {
    /// A runtime for started vCPUs.
    pub fn new(
        vcpus: Vec<VcpuHandle>,
        serial: Arc<Mutex<Serial>>,
        stop: Arc<StopNotifier>,
        memory_mib: u64,
        host: HostCheck,
    ) -> Self {
        let serial_metrics = lock_device(&serial).metrics();
        Self {
            vcpus,
            serial,
            serial_metrics,
            stop,
            memory_mib,
            host,
            paused: false,
            halted_rounds: 0,
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
    pub fn pause(&mut self) -> Result<(), String> {
        for v in &self.vcpus {
            v.request_pause().map_err(|e| e.to_string())?;
        }
        for v in &self.vcpus {
            if let Err(e) = v.wait_paused(PAUSE_TIMEOUT) {
                self.resume();
                return Err(e.to_string());
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
        }
    }
}

/// Ends the loop when a stop is reported.
#[derive(Debug)]
pub struct StopSource {
    fd: RawFd,
}

impl StopSource {
    /// Watches the notifier's eventfd.
    pub fn new(stop: &StopNotifier) -> Self {
        Self {
            fd: stop.eventfd().as_raw_fd(),
        }
    }
}

impl EventSource<VmRuntime> for StopSource {
    fn name(&self) -> &'static str {
        "stop"
    }

    fn start(&mut self, _ctx: &mut VmRuntime, ops: &mut Ops<'_, VmRuntime>) {
        ops.poll_readable(self.fd, 0, false);
    }

    fn complete(
        &mut self,
        _c: Completion,
        ctx: &mut VmRuntime,
        ops: &mut Ops<'_, VmRuntime>,
    ) -> Flow {
        let _ = ctx.stop.eventfd().read();
        if ctx.stop.reason().is_some() {
            ops.exit();
        } else {
            ops.poll_readable(self.fd, 0, false);
        }
        Flow::Continue
    }
}

/// SIGINT, SIGTERM and SIGHUP, read from a signalfd: each stops the VM cleanly.
#[derive(Debug)]
pub struct SignalSource {
    sfd: SignalFd,
}

impl SignalSource {
    /// Wraps a signalfd for the (already blocked) termination signals.
    pub fn new(sfd: SignalFd) -> Self {
        Self { sfd }
    }
}

impl EventSource<VmRuntime> for SignalSource {
    fn name(&self) -> &'static str {
        "signals"
    }

    fn start(&mut self, _ctx: &mut VmRuntime, ops: &mut Ops<'_, VmRuntime>) {
        ops.poll_readable(self.sfd.as_raw_fd(), 0, false);
    }

    fn complete(
        &mut self,
        _c: Completion,
        ctx: &mut VmRuntime,
        ops: &mut Ops<'_, VmRuntime>,
    ) -> Flow {
        if let Ok(Some(info)) = self.sfd.read_signal() {
            ctx.stop.stop(StopReason::Signal {
                signal: info.ssi_signo as i32,
            });
        }
        ops.poll_readable(self.sfd.as_raw_fd(), 0, false);
        Flow::Continue
    }
}

/// The VMM's standard input, fed to the guest's serial port. Removed at end of input.
#[derive(Debug)]
pub struct StdinSource {
    fd: RawFd,
}

impl StdinSource {
    /// Reads from `fd` (normally 0).
    pub fn new(fd: RawFd) -> Self {
        Self { fd }
    }
}

impl EventSource<VmRuntime> for StdinSource {
    fn name(&self) -> &'static str {
        "stdin"
    }

    fn start(&mut self, _ctx: &mut VmRuntime, ops: &mut Ops<'_, VmRuntime>) {
        ops.poll_readable(self.fd, 0, false);
    }

    fn complete(
        &mut self,
        c: Completion,
        ctx: &mut VmRuntime,
        ops: &mut Ops<'_, VmRuntime>,
    ) -> Flow {
        if c.result < 0 {
            return Flow::Remove;
        }
        let mut buf = [0u8; 1024];
        // SAFETY: reading into a local buffer of the given length from an fd we were given.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => {
                lock_device(&ctx.serial).queue_input(&buf[..n as usize]);
                ops.poll_readable(self.fd, 0, false);
                Flow::Continue
            }
            0 => Flow::Remove,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                || std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock =>
            {
                ops.poll_readable(self.fd, 0, false);
                Flow::Continue
            }
            _ => Flow::Remove,
        }
    }
}
