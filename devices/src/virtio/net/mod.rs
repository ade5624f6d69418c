//! virtio-net (virtio 1.2, 5.1) over a tap, on the event loop.
//!
//! - Two queues: 0 receive (host → guest), 1 transmit (guest → host); no control queue, one
//!   queue pair.
//! - The 12-byte virtio-net header (`struct virtio_net_hdr_v1`) passes through: the tap is opened
//!   with IFF_VNET_HDR and TUNSETVNETHDRSZ 12, so checksum and segmentation offloads the driver
//!   acks go straight to the host's stack. Offered: CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_UFO,
//!   HOST_TSO4/6, HOST_UFO, MRG_RXBUF, MAC, STATUS. The guest-side offloads (what the tap may
//!   hand us) are enabled with TUNSETOFFLOAD only once the driver acks them.
//! - TX: each chain must be device-readable only, 12 to [`MAX_FRAME_BUF`] bytes; others are
//!   dropped and counted. At most [`TX_BATCH`] frames per loop turn; a tap that cannot take more
//!   (EAGAIN) stops TX until it is writable again.
//! - RX: frames are read from the tap only while the guest has buffers: with none left, the
//!   frame read is held (one, bounded) and the tap is not read again until the guest notifies the
//!   receive queue. At most [`RX_BATCH`] frames per loop turn. With MRG_RXBUF a frame spans as
//!   many buffers as it needs (`num_buffers` in its header).
//! - A device may have no backend (a *slot*, for templates): its link is down, frames the guest
//!   sends are dropped and counted; a restore attaches a tap and the link comes up with a
//!   config-change interrupt.
//!
//! Files: `backend.rs` (tap and datagram backends), `device.rs` (features, config space,
//! constructor), `handler.rs` (the worker's state and dispatch), `rx.rs`, `tx.rs`, `persist.rs`.

mod backend;
mod device;
mod handler;
mod persist;
mod rx;
mod tx;

pub use backend::{Backend, BackendKind, TapError, open_tap_fd};
pub use device::{Net, NetConfig, NetError, QUEUE_SIZE, random_mac};
pub use handler::{NetHandler, NetStats, NetToken};
pub use persist::{NetArgs, NetRestoreError, NetState};

/// Size of the virtio-net header (`struct virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame after the header: a 64 KiB IP packet, an Ethernet header and a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65_550;
/// Largest header + frame the device moves in either direction.
pub const MAX_FRAME_BUF: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Frames received per loop turn at most (then the loop serves others and comes back).
pub const RX_BATCH: usize = 64;
/// Frames transmitted per loop turn at most.
pub const TX_BATCH: usize = 256;

#[cfg(test)]
pub(crate) mod tests;
