//! The pieces every kata-snap virtio device is made of, and the handle the VMM holds.
//!
//! [`Front`] is the [`VirtioDevice`] of all our devices: their fronts differ only in data (type,
//! features, queue sizes, config bytes), since all device logic runs in the worker.
//! [`MmioDevice`] bundles a device's transport (for the MMIO bus) and its worker (for the loop).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use event_loop::BoxedSource;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::worker::{Command, HandoffRx, HandoffTx, QueueHandler, Worker, WorkerSource, handoff};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, queue_eventfds, read_config_bytes,
};

/// Runtime state of a front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontState {
    /// Not activated.
    Inactive,
    /// Queues handed to the worker.
    Activated,
}

/// The vCPU-side half of a device: identity, features, config space, and the hand-over to the
/// worker.
#[derive(Debug)]
pub struct Front {
    device_type: u32,
    features: u64,
    queue_max_sizes: Vec<u16>,
    config: Vec<u8>,
    handoff: HandoffTx,
    state: FrontState,
}

impl Front {
    /// A front; `config` is the device's read-only config space image.
    pub fn new(
        device_type: u32,
        features: u64,
        queue_max_sizes: Vec<u16>,
        config: Vec<u8>,
        handoff: HandoffTx,
    ) -> Self {
        Self {
            device_type,
            features,
            queue_max_sizes,
            config,
            handoff,
            state: FrontState::Inactive,
        }
    }
}

impl VirtioDevice for Front {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "virtio-{}: ignored config write of {} bytes at {offset:#x}",
            self.device_type,
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.state == FrontState::Activated {
            return Err(ActivateError::AlreadyActive);
        }
        if activation.queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: activation.queues.len(),
            });
        }
        self.handoff.send(Command::Activate(activation))?;
        self.state = FrontState::Activated;
        Ok(())
    }

    fn reset(&mut self) {
        if self.handoff.send(Command::Reset).is_err() {
            tracing::warn!("virtio-{}: worker gone at reset", self.device_type);
        }
        self.state = FrontState::Inactive;
    }

    fn is_activated(&self) -> bool {
        self.state == FrontState::Activated
    }
}

/// A virtio-mmio device as the VMM holds it: the transport goes on the MMIO bus (vCPU threads),
/// the worker's event source goes on the event loop. `!Send`: keep it on the loop's thread.
#[derive(Debug)]
pub struct MmioDevice<H> {
    transport: Arc<Mutex<MmioTransport>>,
    worker: Rc<RefCell<Worker<H>>>,
}

/// The parts of a new device before its transport is built (the restore path builds the
/// transport from a state instead).
#[derive(Debug)]
pub struct Parts {
    /// Sending end of the hand-over (for the front).
    pub tx: HandoffTx,
    /// Receiving end (for the worker).
    pub rx: HandoffRx,
    /// The transport's notification `EventFd`s.
    pub queue_evts: Vec<EventFd>,
    /// Clones for the worker.
    pub worker_evts: Vec<EventFd>,
    /// The shared interrupt.
    pub interrupt: Arc<Interrupt>,
}

impl Parts {
    /// Creates the channels and `EventFd`s for a device with `queues` queues.
    pub fn new(queues: usize) -> std::io::Result<Self> {
        let (tx, rx) = handoff()?;
        let queue_evts = queue_eventfds(queues)?;
        let worker_evts = queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            tx,
            rx,
            queue_evts,
            worker_evts,
            interrupt: Interrupt::new()?,
        })
    }
}

impl<H: QueueHandler + 'static> MmioDevice<H> {
    /// Assembles a new (power-on) device.
    pub fn new(
        front: impl FnOnce(HandoffTx) -> Front,
        handler: H,
        mem: GuestMemoryMmap,
        parts: Parts,
    ) -> Self {
        let worker = Worker::new(
            handler,
            parts.rx,
            parts.worker_evts,
            parts.interrupt.clone(),
        );
        let transport = MmioTransport::new(
            Box::new(front(parts.tx)),
            mem,
            parts.interrupt,
            parts.queue_evts,
        );
        Self::from_parts(transport, worker)
    }

    /// Assembles a device from a built transport and worker (restore).
    pub fn from_parts(transport: MmioTransport, worker: Worker<H>) -> Self {
        Self {
            transport: Arc::new(Mutex::new(transport)),
            worker: Rc::new(RefCell::new(worker)),
        }
    }

    /// The transport, to insert on the MMIO bus at the device's window
    /// ([`super::mmio::MMIO_WINDOW_SIZE`] bytes).
    pub fn transport(&self) -> Arc<Mutex<MmioTransport>> {
        self.transport.clone()
    }

    /// The worker (save/restore, quiescing, tests).
    pub fn worker(&self) -> &Rc<RefCell<Worker<H>>> {
        &self.worker
    }

    /// The event source to add to the VMM's event loop (once).
    pub fn event_source<C>(&self) -> BoxedSource<C> {
        Box::new(WorkerSource(self.worker.clone()))
    }

    /// Duplicates of the queue notification `EventFd`s, in queue order, to register as
    /// ioeventfds at the window's base + [`super::mmio::NOTIFY_OFFSET`], datamatch = index.
    pub fn queue_evts(&self) -> std::io::Result<Vec<EventFd>> {
        crate::bus::lock_device(&self.transport)
            .queue_evts()
            .iter()
            .map(EventFd::try_clone)
            .collect()
    }

    /// A duplicate of the interrupt `EventFd`, to register as an irqfd for the device's GSI.
    pub fn irqfd(&self) -> std::io::Result<EventFd> {
        self.worker.borrow().interrupt().irqfd().try_clone()
    }

    /// True when no activation/reset is waiting and nothing is in flight: safe to save.
    pub fn is_quiescent(&self) -> bool {
        self.worker.borrow().is_quiescent()
    }
}

/// Builds a device from a snapshot: the worker first (with its saved queue positions), then the
/// transport, whose restore re-sends the activation the worker will pick up on its first round.
///
/// `parts` are the device's channels and `EventFd`s when the VMM made them ahead (it registers
/// their ioeventfds and irqfd with KVM before the device's host resources are known); `None`
/// makes fresh ones. Given parts must have one notification `EventFd` per saved queue.
pub fn restore_device<H: QueueHandler + 'static>(
    front: impl FnOnce(HandoffTx) -> Front,
    handler: H,
    mem: GuestMemoryMmap,
    parts: Option<Parts>,
    transport: &super::mmio::MmioTransportState,
    positions: &[super::worker::QueuePosition],
) -> Result<MmioDevice<H>, super::mmio::RestoreTransportError> {
    use crate::persist::Persist;
    let queues = transport.queue_max_sizes.len();
    let parts = match parts {
        Some(p) if p.queue_evts.len() == queues && p.worker_evts.len() == queues => p,
        Some(p) => {
            return Err(super::mmio::RestoreTransportError::Queues {
                saved: transport.queue_max_sizes.clone(),
                device: vec![0; p.queue_evts.len()],
            });
        }
        None => Parts::new(queues)
            .map_err(|_| super::mmio::RestoreTransportError::Activate(ActivateError::WorkerGone))?,
    };
    // No positions: the activation had not reached the worker when the state was saved, so the
    // queues start at 0 like any fresh activation.
    if !positions.is_empty() && positions.len() != transport.queues.len() {
        return Err(super::mmio::RestoreTransportError::Queues {
            saved: transport.queue_max_sizes.clone(),
            device: Vec::new(),
        });
    }
    let mut worker = Worker::new(
        handler,
        parts.rx,
        parts.worker_evts,
        parts.interrupt.clone(),
    );
    if !positions.is_empty() {
        worker.set_restored_positions(positions.to_vec());
    }
    let transport = MmioTransport::restore(
        super::mmio::MmioTransportArgs {
            device: Box::new(front(parts.tx)),
            mem,
            interrupt: parts.interrupt,
            queue_evts: parts.queue_evts,
        },
        transport,
    )?;
    Ok(MmioDevice::from_parts(transport, worker))
}
