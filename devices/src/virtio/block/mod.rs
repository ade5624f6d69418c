//! virtio-blk (virtio 1.2, 5.2) on the VMM's io_uring event loop.
//!
//! - `request.rs`: parsing and checking a request from a validated chain (pure, unit-tested).
//! - `backend.rs`: the backing file, io_uring operations and the synchronous alternative.
//! - `queue_handler.rs`: the worker's queue processing and completions.
//! - `device.rs`: configuration, config space, constructor.
//! - `image.rs`: opening a disk image with its lock (one writer or many readers).
//! - `persist.rs`: save/restore, including the **spare slot**: a disk whose backing file is chosen
//!   at restore time; the restored device shows the new capacity and raises a config-change
//!   interrupt.

mod backend;
mod device;
mod image;
mod persist;
mod queue_handler;
pub mod request;

pub use backend::{BackendKind, Disk};
pub use device::{Block, BlockConfig, BlockError, QUEUE_SIZE};
pub use image::{OpenImageError, lock_image, open_image};
pub use persist::{BlockArgs, BlockRestoreError, BlockState, DiskState};
pub use queue_handler::{BlockHandler, RequestSlot};

#[cfg(test)]
pub(crate) mod tests;
