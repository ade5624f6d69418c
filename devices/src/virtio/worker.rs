//! The event-loop half of every virtio device: queue notifications, activation hand-over, and the
//! device's own runtime state.
//!
//! A [`Worker`] owns a device's queues and backend ([`QueueHandler`]) and is driven by one
//! [`WorkerSource`] on the VMM's event loop. The VMM keeps a second `Rc` to the worker for save,
//! restore and quiescing; `Rc` is `!Send`, so the worker cannot leave the loop's thread and its
//! I/O path takes no lock.
//!
//! The worker's io_uring operations are tagged with a [`WorkerToken`]: the hand-over `EventFd`,
//! queue `i`'s notification `EventFd`, or an operation of the device's handler (block reads,
//! socket polls), tagged with the handler's own [`QueueHandler::Token`].

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

use event_loop::{Completion, EventSource, EventToken, Flow, Ops};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{ActivateError, Activation, Interrupt};

/// What one of a worker's operations is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerToken<T> {
    /// The hand-over `EventFd` (activation, reset).
    Handoff,
    /// A queue's notification `EventFd`.
    Queue(u16),
    /// An operation of the device's handler.
    Handler(T),
}

/// Set in the encoding of [`WorkerToken::Handler`]; a handler's tags encode below it.
pub const HANDLER_TOKEN_BIT: u32 = 1 << 31;

/// A handler's tag wraps into the worker's (handlers pass their own tags to [`Ops`]).
impl<T> From<T> for WorkerToken<T> {
    fn from(t: T) -> Self {
        Self::Handler(t)
    }
}

/// `0`: hand-over; `1 + i`: queue `i`; [`HANDLER_TOKEN_BIT`] `|` the handler's tag.
impl<T: EventToken> EventToken for WorkerToken<T> {
    fn encode(self) -> u32 {
        match self {
            Self::Handoff => 0,
            Self::Queue(i) => 1 + u32::from(i),
            Self::Handler(t) => {
                let raw = t.encode();
                debug_assert_eq!(raw & HANDLER_TOKEN_BIT, 0, "handler tag {t:?} too wide");
                HANDLER_TOKEN_BIT | raw
            }
        }
    }

    fn decode(raw: u32) -> Option<Self> {
        if raw & HANDLER_TOKEN_BIT != 0 {
            return T::decode(raw & !HANDLER_TOKEN_BIT).map(Self::Handler);
        }
        match raw {
            0 => Some(Self::Handoff),
            _ => u16::try_from(raw - 1).ok().map(Self::Queue),
        }
    }
}

/// The tag of a handler that submits no operations of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoToken {}

impl EventToken for NoToken {
    fn encode(self) -> u32 {
        match self {}
    }

    fn decode(_raw: u32) -> Option<Self> {
        None
    }
}

/// The operations handle a worker gives its handler.
pub type HandlerOps<'a, C, T> = Ops<'a, C, WorkerToken<T>>;

/// What the front (vCPU thread) tells the worker (loop thread).
#[derive(Debug)]
pub enum Command {
    /// DRIVER_OK: run these queues.
    Activate(Activation),
    /// Status 0: drop the queues.
    Reset,
}

/// The sending end of a hand-over, held by a device's front inside the transport.
#[derive(Debug)]
pub struct HandoffTx {
    tx: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    pending: Arc<AtomicUsize>,
}

impl HandoffTx {
    /// Sends `cmd` and wakes the worker.
    pub fn send(&self, cmd: Command) -> Result<(), ActivateError> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(cmd).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ActivateError::WorkerGone);
        }
        self.wake
            .write(1)
            .map_err(|_| ActivateError::WorkerGone)
            .map(|_| ())
    }
}

/// The receiving end of a hand-over, held by the worker.
#[derive(Debug)]
pub struct HandoffRx {
    rx: mpsc::Receiver<Command>,
    wake: Arc<EventFd>,
    pending: Arc<AtomicUsize>,
}

/// A new hand-over channel with its wake-up `EventFd`.
pub fn handoff() -> std::io::Result<(HandoffTx, HandoffRx)> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let pending = Arc::new(AtomicUsize::new(0));
    Ok((
        HandoffTx {
            tx,
            wake: wake.clone(),
            pending: pending.clone(),
        },
        HandoffRx { rx, wake, pending },
    ))
}

/// An activated device's queues and memory.
#[derive(Debug)]
pub struct Active {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues.
    pub queues: Vec<Queue>,
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// Counts activations, so a completion of I/O submitted before a reset is not written into
    /// the rings of the next activation.
    pub epoch: u64,
    /// The transport's reset count at activation (see [`Activation::reset_gen`]).
    pub reset_gen: u64,
}

impl Active {
    /// False once the driver has reset the device: the rings are no longer the device's.
    pub fn is_current(&self, irq: &Interrupt) -> bool {
        irq.resets() == self.reset_gen
    }
}

/// Runtime state of a worker.
#[derive(Debug, Default)]
pub enum DeviceState {
    /// Not activated (power-on, or after a reset).
    #[default]
    Inactive,
    /// Running the driver's queues.
    Activated(Active),
    /// A malformed request put the device in the failed state: DEVICE_NEEDS_RESET is set and
    /// nothing is processed until the driver resets the device.
    Failed,
}

/// A request the device cannot answer with an error status: the device goes to the failed state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceFailure {
    /// The available ring's index moved by more than the queue size.
    #[error("queue {0}: available index moved past the queue size")]
    AvailIndex(usize),
    /// A descriptor chain could not be parsed (loop, too long, outside memory, empty).
    #[error("queue {queue}: malformed descriptor chain at head {head}: {reason}")]
    Chain {
        /// The queue.
        queue: usize,
        /// The chain's head index.
        head: u16,
        /// What was wrong.
        reason: super::chain::ChainError,
    },
    /// A request the device cannot even answer (no usable status byte).
    #[error("queue {queue}: request at head {head} has no usable status buffer")]
    BadRequest {
        /// The queue.
        queue: usize,
        /// The chain's head index.
        head: u16,
    },
    /// A buffer the device can use in no way (a receive buffer the device may not write, or
    /// one too small for the header every buffer must hold).
    #[error("queue {queue}: unusable buffer at head {head}: {reason}")]
    BadBuffer {
        /// The queue.
        queue: usize,
        /// The chain's head index.
        head: u16,
        /// What was wrong.
        reason: &'static str,
    },
    /// Writing the used ring failed.
    #[error("queue {0}: cannot write the used ring")]
    UsedRing(usize),
}

/// One queue's position, as saved in snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
}

/// A device's queue processing, run by a [`Worker`] on the event loop.
pub trait QueueHandler {
    /// What the handler's own operations are for; must encode below [`HANDLER_TOKEN_BIT`].
    type Token: EventToken;
    /// A name for logs.
    fn name(&self) -> &'static str;
    /// Submits the handler's first operations (listening sockets); called once.
    fn start<C>(&mut self, _ops: &mut HandlerOps<'_, C, Self::Token>) {}
    /// The device was activated (`restored`: from a snapshot rather than by the driver).
    fn activated<C>(
        &mut self,
        _active: &mut Active,
        _restored: bool,
        _irq: &Interrupt,
        _ops: &mut HandlerOps<'_, C, Self::Token>,
    ) -> Result<(), DeviceFailure> {
        Ok(())
    }
    /// The driver notified queue `queue` (or it may have work after activation).
    fn process_queue<C>(
        &mut self,
        queue: usize,
        active: &mut Active,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, Self::Token>,
    ) -> Result<(), DeviceFailure>;
    /// A completion of an operation the handler submitted.
    fn complete<C>(
        &mut self,
        _c: Completion<Self::Token>,
        _active: Option<&mut Active>,
        _irq: &Interrupt,
        _ops: &mut HandlerOps<'_, C, Self::Token>,
    ) -> Result<(), DeviceFailure> {
        Ok(())
    }
    /// The device was reset: forget everything tied to the queues.
    fn reset(&mut self) {}
    /// Requests submitted and not completed yet.
    fn in_flight(&self) -> usize {
        0
    }
}

/// The loop-side half of a device.
#[derive(Debug)]
pub struct Worker<H> {
    state: DeviceState,
    rx: HandoffRx,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    restored_positions: Option<Vec<QueuePosition>>,
    epoch: u64,
    /// The device-specific part.
    pub handler: H,
}

impl<H: QueueHandler> Worker<H> {
    /// A worker for `handler`, receiving hand-overs on `rx`, notified through `queue_evts`.
    pub fn new(
        handler: H,
        rx: HandoffRx,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        Self {
            state: DeviceState::Inactive,
            rx,
            queue_evts,
            interrupt,
            restored_positions: None,
            epoch: 0,
            handler,
        }
    }

    /// Used on restore: the next activation (re-sent by the restored transport) starts its queues
    /// at these positions instead of 0.
    pub fn set_restored_positions(&mut self, positions: Vec<QueuePosition>) {
        self.restored_positions = Some(positions);
    }

    /// The worker's state.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// The queues' positions, for a snapshot.
    pub fn queue_positions(&self) -> Vec<QueuePosition> {
        match &self.state {
            DeviceState::Activated(a) => a
                .queues
                .iter()
                .map(|q| QueuePosition {
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
            _ => self.restored_positions.clone().unwrap_or_default(),
        }
    }

    /// True when no hand-over is waiting and no request is in flight: the state may be saved.
    /// Pausing a VM is: stop the vCPUs, run the loop until every device is quiescent, save.
    pub fn is_quiescent(&self) -> bool {
        self.rx.pending.load(Ordering::SeqCst) == 0 && self.handler.in_flight() == 0
    }

    /// The interrupt shared with the transport.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn fail(&mut self, e: DeviceFailure) {
        crate::guest_warn!("virtio-{}: {e}; device needs reset", self.handler.name());
        self.state = DeviceState::Failed;
        self.interrupt.set_needs_reset();
    }

    fn process_all<C>(&mut self, ops: &mut HandlerOps<'_, C, H::Token>) {
        let DeviceState::Activated(active) = &mut self.state else {
            return;
        };
        if !active.is_current(&self.interrupt) {
            return;
        }
        for q in 0..active.queues.len() {
            if let Err(e) = self.handler.process_queue(q, active, &self.interrupt, ops) {
                self.fail(e);
                return;
            }
        }
    }

    fn handle_commands<C>(&mut self, ops: &mut HandlerOps<'_, C, H::Token>) {
        while let Ok(cmd) = self.rx.rx.try_recv() {
            self.rx.pending.fetch_sub(1, Ordering::SeqCst);
            match cmd {
                Command::Activate(a) => {
                    self.epoch += 1;
                    let mut queues = a.queues;
                    let restored = self.restored_positions.take();
                    if let Some(pos) = &restored {
                        for (q, p) in queues.iter_mut().zip(pos) {
                            q.set_next_avail(p.next_avail);
                            q.set_next_used(p.next_used);
                        }
                    }
                    let mut active = Active {
                        mem: a.mem,
                        queues,
                        acked_features: a.acked_features,
                        epoch: self.epoch,
                        reset_gen: a.reset_gen,
                    };
                    if !active.is_current(&self.interrupt) {
                        // Reset again before this activation arrived: its reset follows.
                        continue;
                    }
                    tracing::debug!("virtio-{}: activated", self.handler.name());
                    match self.handler.activated(
                        &mut active,
                        restored.is_some(),
                        &self.interrupt,
                        ops,
                    ) {
                        Ok(()) => {
                            self.state = DeviceState::Activated(active);
                            self.process_all(ops);
                        }
                        Err(e) => self.fail(e),
                    }
                }
                Command::Reset => {
                    tracing::debug!("virtio-{}: reset", self.handler.name());
                    self.handler.reset();
                    self.state = DeviceState::Inactive;
                }
            }
        }
    }

    fn start<C>(&mut self, ops: &mut HandlerOps<'_, C, H::Token>) {
        ops.poll_readable(self.rx.wake.as_raw_fd(), WorkerToken::Handoff, true);
        for (i, evt) in self.queue_evts.iter().enumerate() {
            ops.poll_readable(evt.as_raw_fd(), WorkerToken::Queue(i as u16), true);
        }
        self.handler.start(ops);
        // A restored device's activation may already be waiting.
        self.handle_commands(ops);
    }

    fn complete<C>(
        &mut self,
        c: Completion<WorkerToken<H::Token>>,
        ops: &mut HandlerOps<'_, C, H::Token>,
    ) {
        match c.tag {
            WorkerToken::Handoff => {
                let _ = self.rx.wake.read();
                if !c.more {
                    ops.poll_readable(self.rx.wake.as_raw_fd(), WorkerToken::Handoff, true);
                }
                self.handle_commands(ops);
            }
            WorkerToken::Queue(q) => {
                let q = usize::from(q);
                let Some(evt) = self.queue_evts.get(q) else {
                    return;
                };
                let _ = evt.read();
                if !c.more {
                    ops.poll_readable(evt.as_raw_fd(), c.tag, true);
                }
                if let DeviceState::Activated(active) = &mut self.state
                    && q < active.queues.len()
                    && active.is_current(&self.interrupt)
                    && let Err(e) = self.handler.process_queue(q, active, &self.interrupt, ops)
                {
                    self.fail(e);
                }
            }
            WorkerToken::Handler(tag) => {
                let active = match &mut self.state {
                    DeviceState::Activated(a) if a.is_current(&self.interrupt) => Some(a),
                    _ => None,
                };
                let c = Completion {
                    tag,
                    result: c.result,
                    more: c.more,
                };
                if let Err(e) = self.handler.complete(c, active, &self.interrupt, ops) {
                    self.fail(e);
                }
            }
        }
    }
}

/// The event source that drives a [`Worker`] on the loop.
#[derive(Debug)]
pub struct WorkerSource<H>(pub Rc<RefCell<Worker<H>>>);

impl<C, H: QueueHandler> EventSource<C> for WorkerSource<H> {
    type Token = WorkerToken<H::Token>;

    fn name(&self) -> &'static str {
        self.0.borrow().handler.name()
    }

    fn start(&mut self, _ctx: &mut C, ops: &mut HandlerOps<'_, C, H::Token>) {
        self.0.borrow_mut().start(ops);
    }

    fn complete(
        &mut self,
        c: Completion<Self::Token>,
        _ctx: &mut C,
        ops: &mut HandlerOps<'_, C, H::Token>,
    ) -> Flow {
        self.0.borrow_mut().complete(c, ops);
        Flow::Continue
    }
}

/// Builds the queue a transport hands over, from its registers.
pub fn build_queue(
    max_size: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
) -> Result<Queue, virtio_queue::Error> {
    let mut q = Queue::new(max_size)?;
    q.try_set_size(size)?;
    q.try_set_desc_table_address(vm_memory::GuestAddress(desc))?;
    q.try_set_avail_ring_address(vm_memory::GuestAddress(avail))?;
    q.try_set_used_ring_address(vm_memory::GuestAddress(used))?;
    q.set_ready(true);
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::RequestSlot;
    use crate::virtio::vsock::VsockToken;

    fn roundtrip<T: EventToken + PartialEq>(t: WorkerToken<T>) {
        assert_eq!(WorkerToken::<T>::decode(t.encode()), Some(t));
    }

    #[test]
    fn test_worker_token_roundtrip_every_kind_keeps_value() {
        roundtrip(WorkerToken::<NoToken>::Handoff);
        roundtrip(WorkerToken::<NoToken>::Queue(0));
        roundtrip(WorkerToken::<NoToken>::Queue(u16::MAX));
        roundtrip(WorkerToken::from(RequestSlot::decode(0).unwrap()));
        roundtrip(WorkerToken::from(
            RequestSlot::decode(HANDLER_TOKEN_BIT - 1).unwrap(),
        ));
        for t in [
            VsockToken::Listener,
            VsockToken::Sweep,
            VsockToken::ConnectRetry,
            VsockToken::Read(0),
            VsockToken::Read((1 << 29) - 1),
            VsockToken::Write(7),
        ] {
            roundtrip(WorkerToken::from(t));
        }
    }

    #[test]
    fn test_worker_token_unknown_raw_decodes_to_none() {
        // Past the last queue, and a handler tag the handler never makes.
        assert_eq!(WorkerToken::<NoToken>::decode(0x1_0001), None);
        assert_eq!(WorkerToken::<NoToken>::decode(HANDLER_TOKEN_BIT), None);
        assert_eq!(
            WorkerToken::<VsockToken>::decode(HANDLER_TOKEN_BIT | 3),
            None
        );
    }
}
