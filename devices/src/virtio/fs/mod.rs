//! virtio-fs (virtio 1.2, 5.11): host directories shared with the guest over FUSE, served
//! in-process by `fuse-backend-rs` (the FUSE server Kata's in-process VMM uses) from the VMM's
//! own mapping of guest memory, so it works with every restore mode.
//!
//! - `device.rs`: config space (tag, one request queue), constructor, the handle the VMM holds.
//! - `queue_handler.rs`: the loop side: validates and bounds chains, forwards them to the fs
//!   thread, writes the used ring when it answers.
//! - `server.rs`: the fs thread: the FUSE server over the chain's buffers.
//! - `confined.rs`: the filesystem it serves: `PassthroughFs` confined to the share (names,
//!   read-only, caps on inodes and handles).
//! - `persist.rs`: save/restore. A device with no share is a *slot*: a restore attaches a
//!   directory to it. A device whose guest has a FUSE session cannot be snapshotted.
//!
//! No DAX window (no shared memory region): file data always goes through the queues.

mod confined;
mod device;
mod persist;
mod queue_handler;
mod server;

pub use confined::{ConfinedFs, FsLimits, MAX_XATTR_SIZE, check_name, sanitize_open_flags};
pub use device::{
    Fs, FsConfig, FsError, NUM_QUEUES, QUEUE_SIZE, TAG_LEN, VIRTIO_ID_FS, check_tag, config_space,
};
pub use persist::{FsArgs, FsState, RestoreFsError};
pub use queue_handler::{FsHandler, FsToken, MAX_MESSAGE_BYTES};
pub use server::{FsShare, ServerError, ServerThread, ThreadSetup};

#[cfg(any(test, feature = "test-utils"))]
pub mod test_client;
#[cfg(test)]
mod tests;
