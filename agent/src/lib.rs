//! The kata-snap guest agent.
//!
//! In the VM the agent is PID 1 (`/init` of the initramfs): it mounts the
//! pseudo filesystems, listens on vsock, tells the VMM it is ready (port
//! `0xf4`), and then serves one connection at a time; each connection may run
//! one container process (see [`session`]).
//!
//! In harness mode (`--listen unix:PATH`, design section 9) the same code runs
//! as a host process in new mount/pid/uts/ipc namespaces, listening on a Unix
//! socket; it never touches the host clock or entropy pool and skips the port
//! write.
#![deny(missing_docs)]

pub mod config;
pub mod exit_status;
pub mod harness;
pub mod init;
pub mod mounts;
pub mod process;
pub mod ready;
pub mod restore;
pub mod rootfs;
pub mod server;
pub mod session;
pub mod transport;
