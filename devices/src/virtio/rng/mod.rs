//! virtio-rng (virtio 1.2, 5.4): entropy from the host's `getrandom`, so a guest restored as a
//! copy of another reseeds from fresh host randomness.
//!
//! - `device.rs`: constructor and the handle the VMM holds.
//! - `queue_handler.rs`: fills the guest's buffers (pure chain logic plus the worker glue).
//! - `persist.rs`: save/restore.

mod device;
mod persist;
mod queue_handler;

pub use device::{QUEUE_SIZE, Rng, RngConfig};
pub use persist::{RngArgs, RngState};
pub use queue_handler::{MAX_REQUEST_BYTES, RngHandler};

#[cfg(test)]
pub(crate) mod tests;
