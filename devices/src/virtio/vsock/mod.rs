//! virtio-vsock (virtio 1.2, 5.10) with the host side as Unix sockets, like Firecracker's hybrid
//! vsock:
//!
//! - host → guest: connect to the listening socket at `uds_path`, send `CONNECT <port>\n`; once
//!   the guest accepts, the device answers `OK <host port>\n` and the stream carries the data;
//! - guest → host: a guest connection to CID 2, port P, connects to the Unix socket
//!   `<uds_path>_<P>`;
//! - a guest connection never blocks the event loop: the host socket is connected without
//!   blocking and retried while the listener's backlog is full, then refused (RST) after
//!   `CONNECT_TIMEOUT`;
//! - at most [`VsockConfig::max_connections`] connections at once (default
//!   [`DEFAULT_MAX_CONNECTIONS`], lowered to leave [`FD_RESERVE`] fds under `RLIMIT_NOFILE`); the
//!   excess is refused with RST (guest) or closed at once (host);
//! - credit-based flow control both ways; after a restore the guest gets
//!   VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (connections do not survive a snapshot).
//!
//! Files: `packet.rs` (header codec), `connect.rs` (non-blocking connect to a host socket),
//! `connection.rs` (per-connection credit and buffers), `queue_handler/` (the muxer on the loop,
//! split by concern: `tx.rs`, `rx.rs`, `host.rs`, `guest_connect.rs`), `token.rs` (its
//! operations' tags), `device.rs`, `persist.rs`.

mod connect;
mod connection;
mod device;
pub mod packet;
mod persist;
mod queue_handler;
mod token;

pub use connection::CONN_BUF;
pub use device::{
    DEFAULT_MAX_CONNECTIONS, FD_RESERVE, QUEUE_SIZE, Vsock, VsockConfig, VsockError,
    effective_max_connections,
};
pub use persist::{VsockArgs, VsockRestoreError, VsockState};
pub use queue_handler::{MAX_PKT_PAYLOAD, VsockHandler};
pub use token::VsockToken;

#[cfg(test)]
pub(crate) mod tests;
