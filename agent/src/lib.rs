//! The kata-snap guest agent.
//!
//! In the VM the agent is PID 1 (`/init` of the initramfs): it mounts the
//! pseudo filesystems, listens on vsock, tells the VMM it is ready (port
//! `0xf4`), and then serves many connections at once from one single-threaded
//! poll loop ([`server`]); each connection may run one process: the
//! container's init (`Create`/`Run`) or another process in it (`Exec`, see
//! [`container`] and [`session`]).
//!
//! In harness mode (`--listen unix:PATH`, design section 9) the same code runs
//! as a host process in new mount/pid/uts/ipc namespaces, listening on a Unix
//! socket; it never touches the host clock or entropy pool and skips the port
//! write.
#![deny(missing_docs)]

pub mod caps;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod exit_status;
pub mod files;
pub mod harness;
pub mod init;
pub mod lookup;
pub mod mounts;
pub mod network;
pub mod passwd;
pub mod process;
pub mod ready;
pub mod restore;
pub mod rootfs;
pub mod seccomp;
pub mod server;
pub mod session;
pub mod shared_fs;
pub mod transport;
