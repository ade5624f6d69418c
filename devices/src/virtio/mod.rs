//! Virtio devices over the virtio-mmio transport (virtio 1.2, "modern" version 2).
//!
//! # Two halves, two threads
//!
//! A virtio device is touched from two threads, and it is split along that line:
//!
//! * The **front** ([`VirtioDevice`]) sits inside the [`mmio::MmioTransport`] on the MMIO bus,
//!   behind the bus's `Mutex`, because vCPU threads reach it on MMIO exits: feature bits, the
//!   config space, and the driver's DRIVER_OK write (activation) or status 0 (reset). It owns no
//!   queue and does no I/O.
//! * The **worker** ([`worker::Worker`]) owns the queues, guest memory and the backend (file,
//!   sockets, entropy). It lives on the event-loop thread, behind an `Rc<RefCell<..>>` that is
//!   `!Send`, so the compiler keeps it on that thread; no lock is taken on the I/O path.
//!
//! Activation crosses threads once: on DRIVER_OK the transport builds the queues from its
//! registers and the front sends them, with guest memory, through a channel and wakes the worker
//! with an `EventFd` ([`worker::handoff`]). Reset goes the same way, in order. What both threads
//! must share for every request is only [`Interrupt`]: the interrupt status bits the vCPU reads and
//! acknowledges, the config generation, the DEVICE_NEEDS_RESET flag, and the irqfd.
//!
//! Guest notifications go from the vCPU (or KVM's ioeventfd) to the worker through one `EventFd`
//! per queue; interrupts go from the worker to KVM through the irqfd in [`Interrupt`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub mod block;
pub mod chain;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vsock;

pub mod front;
pub mod worker;

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod transport_tests;

pub use mmio::{MmioTransport, MmioTransportState, kernel_cmdline_fragment};
pub use virtio_queue::{Queue, QueueT};

/// Feature bit: the device conforms to virtio 1.x (required by the modern transport).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Interrupt status bit: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Errors activating a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver handed a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The device is already active.
    #[error("device already activated")]
    AlreadyActive,
    /// The worker on the event loop is gone (the loop stopped).
    #[error("the device's worker on the event loop is gone")]
    WorkerGone,
}

/// What a device needs to run its queues: handed from the transport (vCPU thread) to the worker
/// (event-loop thread) on DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory (cheap to clone: the regions are reference-counted).
    pub mem: GuestMemoryMmap,
    /// The queues, configured and validated by the transport, positions at 0 (or restored).
    pub queues: Vec<Queue>,
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// [`Interrupt::resets`] when the transport built this activation: once the driver resets
    /// the device the count moves on and the worker stops touching these queues, even before it
    /// has received the reset through the hand-over.
    pub reset_gen: u64,
}

/// The front half of a virtio device, as the transport sees it.
///
/// ```text
///            new()                    activate(Activation)
///   ──────────────▶  Inactive  ────────────────────────────▶  Activated
///                       ▲                                        │
///                       └─────────────── reset() ────────────────┘
/// ```
///
/// `activate` runs on a vCPU thread (the driver's DRIVER_OK write); it only hands the queues to
/// the device's worker on the event loop and must not block. Nothing here knows about MMIO.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// The features the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// A driver read of the device config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A driver write to the device config space at `offset` (ignored by read-only configs).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device: the worker drops its queues. The device can be activated again.
    fn reset(&mut self);
    /// Whether the device is activated.
    fn is_activated(&self) -> bool;
}

/// Reads `data.len()` bytes of a config space image at `offset`; bytes past its end read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// The state the worker (event loop) and the transport (vCPU) share: interrupt status bits, the
/// config generation, the DEVICE_NEEDS_RESET flag and the interrupt `EventFd` (registered with KVM
/// as an irqfd). Everything else stays on its own side.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    resets: AtomicU64,
    evt: EventFd,
}

impl Interrupt {
    /// A new trigger with its own non-blocking `EventFd`.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            resets: AtomicU64::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// The `EventFd` to register with KVM as an irqfd for the device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        &self.evt
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio: cannot signal the interrupt: {e}");
        }
    }

    /// Tells the driver a used ring changed.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver the config space changed (bumps the config generation first).
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Puts the device in the failed state: DEVICE_NEEDS_RESET is shown in the status register
    /// and the driver is told through a config-change interrupt (virtio 1.2, 2.1.2).
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Whether the device needs a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The config generation register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The driver acknowledges interrupt bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// How many times the driver has reset the device (written by the vCPU at once, read by the
    /// worker before it touches the rings).
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::SeqCst)
    }

    /// Back to the power-on state (device reset).
    fn reset(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Restores the registers from a snapshot.
    fn restore(&self, status: u32, generation: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation.store(generation, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }
}

/// Creates one non-blocking notification `EventFd` per queue.
pub fn queue_eventfds(count: usize) -> std::io::Result<Vec<EventFd>> {
    (0..count).map(|_| EventFd::new(EFD_NONBLOCK)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_read_config_bytes_past_end_reads_zero() {
        let config = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut out);
        assert_eq!(out, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn test_interrupt_config_change_bumps_generation_and_status() {
        let irq = Interrupt::new().unwrap();
        irq.signal_config_change();
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.signal_used_queue();
        irq.ack(VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.irqfd().read().unwrap(), 2);
    }
}
