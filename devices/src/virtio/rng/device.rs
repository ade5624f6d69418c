use vm_memory::GuestMemoryMmap;

use super::RngHandler;
use crate::virtio::VIRTIO_F_VERSION_1;
use crate::virtio::front::{Front, MmioDevice, Parts};
use crate::virtio::worker::HandoffTx;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Options of a virtio-rng device (none yet; a rate limit would go here).
#[derive(Debug, Clone, Default)]
pub struct RngConfig {}

/// A virtio-rng device: [`MmioDevice::transport`] on the MMIO bus, [`MmioDevice::event_source`]
/// on the loop.
pub type Rng = MmioDevice<RngHandler>;

pub(super) fn front(tx: HandoffTx) -> Front {
    Front::new(
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG,
        1 << VIRTIO_F_VERSION_1,
        vec![QUEUE_SIZE],
        Vec::new(),
        tx,
    )
}

impl MmioDevice<RngHandler> {
    /// A new virtio-rng device over `mem`.
    pub fn new_rng(_config: RngConfig, mem: GuestMemoryMmap) -> std::io::Result<Rng> {
        Ok(Rng::new(front, RngHandler::default(), mem, Parts::new(1)?))
    }
}
