//! The kata-snap guest agent protocol: messages, framing, validation and the
//! host-side client.
//!
//! # Wire format
//!
//! Every message travels as one frame: a `u32` little-endian payload length
//! followed by the payload, a [postcard] encoding of [`HostMessage`] (host to
//! agent) or [`AgentMessage`] (agent to host). No payload may exceed
//! [`MAX_MESSAGE_SIZE`]; a larger length prefix is rejected before anything is
//! allocated.
//!
//! postcard is chosen over JSON and bincode: it is compact (varint integers,
//! raw byte strings, which matters for stdio chunks), has a documented and
//! stable wire format (1.0 specification), is actively maintained, and works
//! with plain serde derives. bincode 1 is unmaintained; JSON would inflate
//! binary stdio by a third (base64) or more.
//!
//! # Conversation
//!
//! ```text
//!  host                                agent
//!   | -- Hello{version} -------------->  |   both sides send Hello first and
//!   | <------------- Hello{version} ---  |   check the peer's version
//!   | -- SyncTime / Reseed ----------->  |   (after a restore; each answered
//!   | <---------------------- Ack -----  |    by Ack or Error)
//!   | -- Create{..} ------------------>  |   runc `create`: set up, do not exec
//!   | <--------------- Created{pid} ---  |   or Error{..}: no process; the host
//!   |                                    |    may Create again or close
//!   | -- Signal / Resize ------------->  |   (optional: a signal reaches the
//!   |                                    |    waiting child; Exited{128+N} ends)
//!   | -- Start ----------------------->  |   runc `start`: exec
//!   | <--------------- Started{pid} ---  |   or Error{..} then Exited{126|127}
//!   | -- Stdin / CloseStdin / Signal / Resize -->
//!   | <------- Stdout / Stderr ---------  |
//!   | <-------------- Exited{code} ----  |   then the agent closes the connection
//! ```
//!
//! `Run{..}` does `Create` and `Start` in one step: it is answered by
//! `Started{pid}`, or by `Error{..}` then `Exited{126|127}` (a set-up failure
//! ends the connection, unlike after `Create`).
//!
//! The agent serves many connections at once. Another process in the
//! container (runc's `exec`) runs on a connection of its own:
//!
//! ```text
//!  host (2nd connection)               agent
//!   | -- Hello{version} -------------->  |
//!   | <------------- Hello{version} ---  |
//!   | -- Exec{id, process} ----------->  |   chrooted in the container's root;
//!   | <--------------- Started{pid} ---  |   or Error{NoContainer | ContainerStopped |
//!   |                                    |    InvalidRequest} alone (may Exec again),
//!   |                                    |    or Error{..} then Exited{126|127}
//!   | -- Stdin / CloseStdin / Signal / Resize -->
//!   | <------- Stdout / Stderr ---------  |
//!   | <-------------- Exited{code} ----  |   then the agent closes the connection
//! ```
//!
//! When the container's init exits, its execs are SIGKILLed (their
//! connections get `Exited{137}`), as the kernel does in runc's pid
//! namespace. On every connection `Exited` comes after all the output the
//! process wrote, and is the last message.
//!
//! Out of order (`Start` without a created process, a second `Create` or
//! `Run`, `Stdin` or `CloseStdin` before `Start`...) is answered by
//! `Error{Protocol, ..}`; the connection and its process carry on. Stdin is
//! refused, not buffered, before `Start`: the host reads its input only once
//! the process runs, and a terminal would echo early bytes before `Started`.
//!
//! The container's cgroup (runc's `update` and `events`) is asked about on
//! any connection, typically one of its own, and each request is answered
//! in order:
//!
//! ```text
//!  host (any connection)               agent
//!   | -- Update(Resources) ----------->  |   cgroup v2 files of the newest container
//!   | <-------------- Ack | Error -----  |   (NoContainer, ContainerStopped,
//!   |                                    |    InvalidRequest, Cgroup)
//!   | -- Stats ----------------------->  |
//!   | <------- Stats(ContainerStats) ---  |   or Error as for Update
//!   | -- Processes ------------------->  |
//!   | <------- Processes(list) ---------  |   or Error as for Update
//! ```
//!
//! [`HostMessage::Hello`] and [`AgentMessage::Hello`] are variant 0 of their
//! enums and hold a single `u32`; that layout is frozen across versions so
//! that any two versions can at least tell each other apart.
//!
//! Both sides validate every message: [`write_message`] refuses to send an
//! invalid one and [`read_message`] refuses to accept one (see [`Validate`]).
#![deny(missing_docs)]

mod client;
pub mod files;
mod frame;
mod messages;
pub mod network;
pub mod resources;
pub mod seccomp;
pub mod shared_fs;
pub mod validate;

pub use client::{AgentClient, ClientError, RunOutcome};
pub use files::{FileContent, MAX_FILE_BYTES, MAX_FILES, MAX_FILES_TOTAL_BYTES};
pub use frame::{
    FrameDecoder, FrameError, ProtocolError, decode_message, encode_message, read_frame,
    read_message, write_frame, write_message,
};
pub use messages::{
    AgentMessage, Capabilities, ErrorKind, ExecRequest, FsType, HostMessage, Mount, Process,
    ProcessEntry, Rlimit, RlimitKind, RootfsSource, RootfsSpec, RunRequest, User,
};
pub use network::{InterfaceConfig, IpNet, NetworkConfig, RouteConfig};
pub use resources::{ContainerStats, CpuStats, MemoryEvents, MemoryStats, PidsStats, Resources};
pub use seccomp::{BpfInstruction, SeccompProgram};
pub use shared_fs::SharedFs;
pub use validate::{
    MAX_ARGS, MAX_ENV, MAX_GROUPS, MAX_MOUNTS, MAX_PATH_LIST, MAX_PROCESSES, MAX_TEXT,
    MIN_REALTIME_NS, SUPPORTED_MOUNT_TYPES, Validate, ValidationError,
};

/// Version of this protocol. Peers with different versions refuse to talk.
///
/// 2: `Create` / `Start` / `Created` (runc's `create` and `start`).
/// 3: `Exec` (runc's `exec`), `Process` apart from the container's fields,
/// `umask`.
/// 4: `Update` / `Stats` and `AgentMessage::Stats` (runc's `update` and
/// `events`), `ErrorKind::Cgroup`.
/// 5: `Process::capabilities` (OCI `process.capabilities`), and
/// `RunRequest::masked_paths` / `readonly_paths` (OCI `linux.maskedPaths`,
/// `linux.readonlyPaths`), all at the end of their structs.
/// 6: `RunRequest::seccomp` (OCI `linux.seccomp` compiled on the host),
/// `Process::clear_onlcr` and `console_size`, `ExecRequest::cgroup` (runc's `exec --cgroup`);
/// the container's init runs in a PID namespace of its own.
/// 7: `RunRequest::network` (the container's interfaces and routes, applied by
/// the agent to the guest's), `ErrorKind::Network`; the agent brings `lo` up;
/// `RunRequest::files` (host files copied into the container's root).
/// 8: `RunRequest::shared_fs` (a virtio-fs device the agent mounts before the
/// container's mounts, the source of the host binds), at the end of its struct.
pub const PROTOCOL_VERSION: u32 = 8;

/// Largest payload of one frame, in bytes (the 4-byte length prefix excluded).
pub const MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// Largest stdio chunk carried by one `Stdin`, `Stdout` or `Stderr` message.
pub const MAX_STDIO_CHUNK: usize = 64 * 1024;

/// Vsock port the agent listens on inside the VM.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Value the agent writes to [`READY_IO_PORT`] once it listens: the point at
/// which templates are snapshotted.
pub const READY_VALUE: u8 = 1;

/// I/O port the agent writes [`READY_VALUE`] to once it listens.
pub const READY_IO_PORT: u16 = 0xf4;
