//! The 8250 UART (COM1) on top of `vm-superio`, with its interrupt delivered through an irqfd.
//!
//! Output goes to a [`SerialOutput`] (the VMM's stdout, a log file, or a sink). Input from the host
//! is queued here and fed into the UART's 64-byte FIFO as the guest drains it, so a large paste is
//! never dropped. The device counts output bytes and remembers when the first one arrived: the VMM
//! reports "process start to first serial byte" from that.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;
use vm_superio::serial::{SerialEvents, SerialState};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The I/O port of COM1 and the size of its register window.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of UART registers.
pub const COM1_LEN: u64 = 8;
/// The ISA IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Register offset of the receive buffer.
const RBR_OFFSET: u64 = 0;

/// An interrupt trigger backed by an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an eventfd; the VMM registers a clone of it with KVM as the irqfd of the line.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file (created or appended by the caller).
    File(std::fs::File),
    /// Any other writer (tests, in-memory capture).
    Writer(Box<dyn Write + Send>),
    /// Discard.
    Sink,
}

impl std::fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            SerialOutput::Stdout => "stdout",
            SerialOutput::File(_) => "file",
            SerialOutput::Writer(_) => "writer",
            SerialOutput::Sink => "sink",
        };
        f.write_str(kind)
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Stdout => io::stdout().lock().write(buf),
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Writer(w) => w.write(buf),
            SerialOutput::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::Stdout => io::stdout().lock().flush(),
            SerialOutput::File(f) => f.flush(),
            SerialOutput::Writer(w) => w.flush(),
            SerialOutput::Sink => Ok(()),
        }
    }
}

/// Counters of the serial device, shared with the VMM's status report.
#[derive(Debug, Default)]
pub struct SerialMetrics {
    /// Bytes the guest wrote to the console.
    pub bytes_out: AtomicU64,
    /// Bytes lost because the output could not be written.
    pub bytes_lost: AtomicU64,
    /// When the guest wrote its first byte.
    pub first_byte_at: OnceLock<Instant>,
}

#[derive(Debug)]
struct Events(Arc<SerialMetrics>);

impl SerialEvents for Events {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.0.first_byte_at.get_or_init(Instant::now);
        self.0.bytes_out.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.0.bytes_lost.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {}
}

/// COM1 as a bus device.
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, Events, SerialOutput>,
    pending_input: VecDeque<u8>,
    metrics: Arc<SerialMetrics>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("pending_input", &self.pending_input.len())
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// The UART's registers and receive FIFO, as saved in a snapshot.
///
/// Host input queued beyond the FIFO is not part of it: it never reached the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the receive FIFO.
    pub in_buffer: Vec<u8>,
}

/// Errors restoring the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    /// The saved FIFO holds more than the UART can.
    #[error("serial state is invalid: {0}")]
    Invalid(String),
}

impl Serial {
    /// The device's state for a snapshot.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the saved state, raising its interrupt through `trigger`, writing to `out`.
    pub fn restore(
        trigger: EventFdTrigger,
        out: SerialOutput,
        state: &SerialSnapshot,
    ) -> Result<Self, SerialRestoreError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let metrics = Arc::new(SerialMetrics::default());
        let uart = vm_superio::Serial::from_state(&s, trigger, Events(metrics.clone()), out)
            .map_err(|e| SerialRestoreError::Invalid(e.to_string()))?;
        Ok(Self {
            uart,
            pending_input: VecDeque::new(),
            metrics,
        })
    }

    /// A UART raising its interrupt through `trigger` and writing output to `out`.
    pub fn new(trigger: EventFdTrigger, out: SerialOutput) -> Self {
        let metrics = Arc::new(SerialMetrics::default());
        Self {
            uart: vm_superio::Serial::with_events(trigger, Events(metrics.clone()), out),
            pending_input: VecDeque::new(),
            metrics,
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        self.metrics.clone()
    }

    /// Queues host input for the guest. Bytes beyond the FIFO wait here until the guest reads.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending_input.extend(bytes);
        self.refill_fifo();
    }

    /// Bytes queued but not yet in the guest-visible FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending_input.len()
    }

    fn refill_fifo(&mut self) {
        while !self.pending_input.is_empty() {
            let room = self.uart.fifo_capacity().min(self.pending_input.len());
            if room == 0 {
                break;
            }
            let chunk: Vec<u8> = self.pending_input.iter().take(room).copied().collect();
            match self.uart.enqueue_raw_bytes(&chunk) {
                Ok(n) => {
                    self.pending_input.drain(..n);
                    if n == 0 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("serial input dropped: {e}");
                    break;
                }
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        // The bus guarantees offset < COM1_LEN, which fits in u8.
        data[0] = self.uart.read(offset as u8);
        if offset == RBR_OFFSET && !self.pending_input.is_empty() {
            self.refill_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            // Output errors (a closed stdout) must not stop the guest; count and go on.
            tracing::debug!("serial write: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, Capture, EventFd) {
        let evt = EventFd::new(libc_nonblock()).unwrap();
        let cap = Capture::default();
        let s = Serial::new(
            EventFdTrigger::new(evt.try_clone().unwrap()),
            SerialOutput::Writer(Box::new(cap.clone())),
        );
        (s, cap, evt)
    }

    fn libc_nonblock() -> i32 {
        vmm_sys_util::eventfd::EFD_NONBLOCK
    }

    #[test]
    fn test_serial_thr_writes_reach_output_and_metrics() {
        let (mut s, cap, _evt) = serial();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(*cap.0.lock().unwrap(), b"hi\n");
        let m = s.metrics();
        assert_eq!(m.bytes_out.load(Ordering::Relaxed), 3);
        assert!(m.first_byte_at.get().is_some());
    }

    #[test]
    fn test_serial_input_larger_than_fifo_is_delivered_in_order() {
        let (mut s, _cap, evt) = serial();
        s.write(1, &[0x01]); // IER: received-data interrupt on
        let input: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        s.queue_input(&input);
        assert!(
            s.pending_input() > 0,
            "FIFO must not swallow more than it holds"
        );
        assert!(evt.read().unwrap() >= 1, "input raises the interrupt");
        let mut got = Vec::new();
        for _ in 0..1000 {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(s.pending_input(), 0);
    }

    #[test]
    fn test_serial_save_restore_keeps_registers_and_fifo() {
        let (mut s, _cap, _evt) = serial();
        s.write(3, &[0x80]); // DLAB
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]); // 8N1
        s.write(7, &[0x5a]); // scratch
        s.queue_input(b"abc");
        let saved = s.save();
        let evt = EventFd::new(libc_nonblock()).unwrap();
        let mut r = Serial::restore(EventFdTrigger::new(evt), SerialOutput::Sink, &saved).unwrap();
        assert_eq!(r.save(), saved);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        r.read(0, &mut b);
        assert_eq!(b, [b'a'], "the FIFO survives");
        let mut bad = saved.clone();
        bad.in_buffer = vec![0; 65];
        let evt = EventFd::new(libc_nonblock()).unwrap();
        assert!(Serial::restore(EventFdTrigger::new(evt), SerialOutput::Sink, &bad).is_err());
    }

    #[test]
    fn test_serial_wide_access_is_ignored() {
        let (mut s, cap, _evt) = serial();
        s.write(0, b"ab");
        let mut d = [0u8; 2];
        s.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        assert!(cap.0.lock().unwrap().is_empty());
    }
}
