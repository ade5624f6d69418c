use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::{Rng, RngHandler, device::front};
use crate::persist::Persist;
use crate::virtio::front::{Parts, restore_device};
use crate::virtio::mmio::{MmioTransportState, RestoreTransportError};
use crate::virtio::worker::QueuePosition;

/// A virtio-rng device in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Transport registers.
    pub transport: MmioTransportState,
    /// Queue positions.
    pub queues: Vec<QueuePosition>,
}

/// What restoring a virtio-rng device needs.
#[derive(Debug)]
pub struct RngArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's channels and `EventFd`s, when made ahead (see
    /// [`crate::virtio::front::restore_device`]); `None` makes fresh ones.
    pub parts: Option<Parts>,
}

impl Persist for Rng {
    type State = RngState;
    type ConstructorArgs = RngArgs;
    type Error = RestoreTransportError;

    fn save(&self) -> RngState {
        RngState {
            transport: crate::bus::lock_device(&self.transport()).save(),
            queues: self.worker().borrow().queue_positions(),
        }
    }

    fn restore(args: RngArgs, state: &RngState) -> Result<Self, Self::Error> {
        restore_device(
            front,
            RngHandler::default(),
            args.mem,
            args.parts,
            &state.transport,
            &state.queues,
        )
    }
}
