//! virtio-vsock (virtio 1.2, 5.10) with the host side as Unix sockets, like Firecracker's hybrid
//! vsock:
//!
//! - host → guest: connect to the listening socket at `uds_path`, send `CONNECT <port>\n`; once
//!   the guest accepts, the device answers `OK <host port>\n` and the stream carries the data;
//! - guest → host: a guest connection to CID 2, port P, connects to the Unix socket
//!   `<uds_path>_<P>`;
//! - credit-based flow control both ways; after a restore the guest gets
//!   VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (connections do not survive a snapshot).
//!
//! Files: `packet.rs` (header codec), `connection.rs` (per-connection credit and buffers),
//! `queue_handler.rs` (the muxer on the loop), `device.rs`, `persist.rs`.

mod connection;
mod device;
pub mod packet;
mod persist;
mod queue_handler;

pub use connection::CONN_BUF;
pub use device::{QUEUE_SIZE, Vsock, VsockConfig, VsockError};
pub use persist::{VsockArgs, VsockRestoreError, VsockState};
pub use queue_handler::{MAX_PKT_PAYLOAD, VsockHandler, VsockToken};

#[cfg(test)]
pub(crate) mod tests;
