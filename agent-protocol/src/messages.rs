//! Message types. Field limits are enforced by [`crate::Validate`].

use serde::{Deserialize, Serialize};

/// A message from the host (the runtime) to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// First message of a connection. Frozen layout: variant 0, one `u32`.
    Hello {
        /// The host's [`crate::PROTOCOL_VERSION`].
        version: u32,
    },
    /// Create and start the container process in one step (`Create` then
    /// `Start`). At most one process per connection.
    Run(Box<RunRequest>),
    /// Bytes for the process's stdin (at most [`crate::MAX_STDIO_CHUNK`]).
    Stdin(Vec<u8>),
    /// Close the process's stdin once the bytes sent before are written.
    CloseStdin,
    /// Send this signal (1..=64) to the process.
    Signal(i32),
    /// Resize the process's terminal (ignored without a terminal).
    Resize {
        /// Rows, at least 1.
        rows: u16,
        /// Columns, at least 1.
        cols: u16,
    },
    /// Step the guest's realtime clock (after a restore). Answered by `Ack`.
    SyncTime {
        /// Nanoseconds since the Unix epoch.
        realtime_ns: u64,
    },
    /// Mix these bytes into the guest's entropy pool and credit them (after a
    /// restore, so clones do not share random state). Answered by `Ack`.
    Reseed {
        /// Random bytes from the host, 16..=512 of them.
        bytes: Vec<u8>,
    },
    /// Prepare the container process without starting it (runc's `create`):
    /// rootfs, mounts, fork, and in the child every set-up step up to exec,
    /// including the `PATH` lookup of `args[0]`. Answered by `Created` once
    /// the child waits for `Start`, or by `Error` (the connection then has no
    /// process and may `Create` again). At most one process per connection.
    Create(Box<RunRequest>),
    /// Exec the created process (runc's `start`). Answered as `Run` is:
    /// `Started`, or `Error` then `Exited{126|127}` when the exec fails.
    Start,
    /// Run another process in the container that a `Create` on another
    /// connection made (runc's `exec`). Answered as `Run` is: `Started`, or
    /// `Error` then `Exited{126|127}`; `Error{NoContainer | ContainerStopped |
    /// InvalidRequest}` alone (the connection may try again) when there is no
    /// container to run it in or the id is in use. At most one process per
    /// connection.
    Exec(Box<ExecRequest>),
    /// Change the cgroup limits of the newest container (runc's `update`).
    /// Answered by `Ack` once every file is written, or by `Error`
    /// (`NoContainer`, `ContainerStopped` "container not running",
    /// `InvalidRequest` for a memory limit above the guest's memory,
    /// `Cgroup` when a write fails). Allowed on any connection, in any phase
    /// after `Hello`.
    Update(Box<crate::Resources>),
    /// Read the newest container's cgroup (runc's `events --stats`).
    /// Answered by `AgentMessage::Stats` or by `Error` as `Update` is.
    Stats,
    /// List the newest container's processes (runc's `ps`): those in its
    /// cgroup. Answered by `AgentMessage::Processes` or by `Error` as
    /// `Update` is.
    Processes,
}

/// A message from the agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message of a connection. Frozen layout: variant 0, one `u32`.
    Hello {
        /// The agent's [`crate::PROTOCOL_VERSION`].
        version: u32,
    },
    /// A `SyncTime` or `Reseed` request was applied.
    Ack,
    /// The process was started.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Bytes the process wrote to stdout (or to its terminal).
    Stdout(Vec<u8>),
    /// Bytes the process wrote to stderr.
    Stderr(Vec<u8>),
    /// The process ended; last message of a connection that ran a process.
    Exited {
        /// Exit status as runc reports it: the exit code, or 128 + signal
        /// number for a process killed by a signal. 0..=255.
        code: i32,
    },
    /// A request failed.
    Error {
        /// What failed.
        kind: ErrorKind,
        /// Human-readable explanation, at most [`crate::MAX_TEXT`] bytes.
        message: String,
    },
    /// The process of a `Create` finished its set-up and waits for `Start`.
    Created {
        /// Its pid in the guest.
        pid: u32,
    },
    /// The answer to `Stats`.
    Stats(Box<crate::ContainerStats>),
    /// The answer to `Processes`, in pid order.
    Processes(Vec<ProcessEntry>),
}

/// One process of a container, as the guest's /proc shows it (what ps(1)
/// prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    /// Its pid in the guest.
    pub pid: u32,
    /// Its parent's pid in the guest.
    pub ppid: u32,
    /// Real uid.
    pub uid: u32,
    /// The state letter of /proc/PID/stat (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Its controlling terminal (`pts/0`), if any.
    pub tty: Option<String>,
    /// When it started, seconds since the Unix epoch (the guest's clock).
    pub started: u64,
    /// CPU time used (user + system), milliseconds.
    pub cpu_ms: u64,
    /// Seconds it has run for (for ps's `C`, its CPU use in percent).
    pub elapsed: u64,
    /// Its command line, arguments joined by spaces; `[comm]` when it has
    /// none (a kernel thread or a zombie).
    pub cmd: String,
}

/// The class of an [`AgentMessage::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The peers speak different protocol versions; the agent closes.
    VersionMismatch,
    /// A frame could not be decoded, was too large, or came out of order.
    Protocol,
    /// A message decoded but a field was invalid.
    InvalidRequest,
    /// Mounting the rootfs or an OCI mount failed.
    Rootfs,
    /// The executable was not found (the process exits with 127).
    ExecNotFound,
    /// The executable could not be run: permission denied (exit 126).
    ExecPermissionDenied,
    /// Setting up or executing the process failed for another reason.
    ExecFailed,
    /// Applying `SyncTime` or `Reseed` failed.
    Restore,
    /// An internal agent failure.
    Internal,
    /// `Exec` found no container (no `Create` was made).
    NoContainer,
    /// `Exec` came after the container's init process exited.
    ContainerStopped,
    /// Reading or writing the container's cgroup failed, or the guest has
    /// no cgroups (`Update`, `Stats`).
    Cgroup,
    /// Configuring the guest's network (`RunRequest::network`) failed.
    Network,
}

/// A process to run: what OCI `process` says about it (the container's
/// init, or one run by `Exec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// argv; `args[0]` is looked up in `PATH` (from `env`) unless it has a `/`.
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE` entries. Without `HOME` the agent sets it
    /// from the container's `/etc/passwd` (`/` when the user has no entry),
    /// as runc does.
    pub env: Vec<String>,
    /// Absolute working directory inside the container.
    pub cwd: String,
    /// Credentials the process runs with.
    pub user: User,
    /// Resource limits to set.
    pub rlimits: Vec<Rlimit>,
    /// Give the process a pseudo-terminal as stdin/stdout/stderr.
    pub terminal: bool,
    /// Set `PR_SET_NO_NEW_PRIVS` before exec.
    pub no_new_privileges: bool,
    /// The umask to exec with (OCI `process.user.umask`); `None` keeps 0o022.
    pub umask: Option<u32>,
    /// The capability sets to exec with (OCI `process.capabilities`); `None`
    /// leaves the process with the capabilities its uid gets from the agent.
    pub capabilities: Option<Capabilities>,
    /// Clear `ONLCR` on its terminal (ignored without one): runc does so on the
    /// terminal it reads in the foreground (`run`/`exec -t` without
    /// `--console-socket`), so output lines end in `\n`, not `\r\n`.
    pub clear_onlcr: bool,
    /// The terminal's size (rows, columns) from its first byte on (OCI
    /// `process.consoleSize`): set before the process runs, where a `Resize`
    /// after `Started` could come after it read the size.
    pub console_size: Option<(u16, u16)>,
}

/// Capability sets, one bit per capability: bit N is capability number N
/// (`CAP_CHOWN` is 0, `CAP_CHECKPOINT_RESTORE` 40). Bits the guest kernel does
/// not know are ignored in `bounding` and refused by `capset(2)` elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// Capabilities kept in the bounding set; all others are dropped.
    pub bounding: u64,
    /// The effective set.
    pub effective: u64,
    /// The permitted set.
    pub permitted: u64,
    /// The inheritable set.
    pub inheritable: u64,
    /// The ambient set (raised where permitted and inheritable allow).
    pub ambient: u64,
}

/// Everything the agent needs to create the container and its init process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    /// The init process.
    pub process: Process,
    /// Hostname to set, if any.
    pub hostname: Option<String>,
    /// OCI mounts, applied in order after the rootfs.
    pub mounts: Vec<Mount>,
    /// Where the root filesystem comes from.
    pub rootfs: RootfsSpec,
    /// OCI `linux.maskedPaths`: absolute container paths hidden after the
    /// mounts (a directory under an empty read-only tmpfs, anything else
    /// under `/dev/null`); a path that does not exist is skipped.
    pub masked_paths: Vec<String>,
    /// OCI `linux.readonlyPaths`: absolute container paths bind-mounted
    /// read-only onto themselves after the mounts; a missing one is skipped.
    pub readonly_paths: Vec<String>,
    /// OCI `linux.seccomp`, compiled by the host: installed in the init and
    /// in every exec of the container, right before exec (runc's order).
    pub seccomp: Option<crate::SeccompProgram>,
    /// The container's network (protocol 7): the guest interfaces' MAC, MTU,
    /// addresses and the routes, applied in the agent's (the VM's) network
    /// namespace, which the container shares, before its process is made.
    /// `None` leaves the guest's interfaces as they are (loopback only).
    #[serde(default)]
    pub network: Option<crate::NetworkConfig>,
    /// Files written in the container's root before its process is made
    /// (protocol 7): the copies of the host files Docker binds on
    /// `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` (see
    /// [`crate::files`]). Written after the mounts, before a read-only root
    /// is sealed, each owned by root with its mode.
    #[serde(default)]
    pub files: Vec<crate::FileContent>,
    /// The shared filesystem (protocol 8): a virtio-fs device the agent mounts
    /// by its tag at a guest path of its own before the container's mounts,
    /// so that `bind` mounts can take their sources below it (the host
    /// directories and files of OCI bind mounts; see [`crate::shared_fs`]).
    /// `None` mounts nothing.
    #[serde(default)]
    pub shared_fs: Option<crate::SharedFs>,
}

/// Another process in the running container (runc's `exec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Names the process while it runs: 1..=64 bytes of letters, digits,
    /// `-`, `_` and `.`, unique among the container's running execs.
    pub id: String,
    /// The process.
    pub process: Process,
    /// runc's `exec --cgroup`: a group below the container's (a relative
    /// path without `..`) to run the process in, instead of the container's;
    /// `""` is the container's own group. Without it (`None`) the process goes
    /// to the container's group, or to the init's when that one refuses it
    /// (`EBUSY`), as runc does.
    pub cgroup: Option<String>,
}

/// Process credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
}

/// One resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Which limit.
    pub kind: RlimitKind,
    /// Soft limit (`u64::MAX` is infinity); at most `hard`.
    pub soft: u64,
    /// Hard limit (`u64::MAX` is infinity).
    pub hard: u64,
}

/// The resource limits of `setrlimit(2)`, named as in OCI (`RLIMIT_*`).
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RlimitKind {
    As,
    Core,
    Cpu,
    Data,
    Fsize,
    Locks,
    Memlock,
    Msgqueue,
    Nice,
    Nofile,
    Nproc,
    Rss,
    Rtprio,
    Rttime,
    Sigpending,
    Stack,
}

impl RlimitKind {
    /// Parses an OCI name such as `RLIMIT_NOFILE`.
    pub fn from_oci_name(name: &str) -> Option<Self> {
        Some(match name {
            "RLIMIT_AS" => Self::As,
            "RLIMIT_CORE" => Self::Core,
            "RLIMIT_CPU" => Self::Cpu,
            "RLIMIT_DATA" => Self::Data,
            "RLIMIT_FSIZE" => Self::Fsize,
            "RLIMIT_LOCKS" => Self::Locks,
            "RLIMIT_MEMLOCK" => Self::Memlock,
            "RLIMIT_MSGQUEUE" => Self::Msgqueue,
            "RLIMIT_NICE" => Self::Nice,
            "RLIMIT_NOFILE" => Self::Nofile,
            "RLIMIT_NPROC" => Self::Nproc,
            "RLIMIT_RSS" => Self::Rss,
            "RLIMIT_RTPRIO" => Self::Rtprio,
            "RLIMIT_RTTIME" => Self::Rttime,
            "RLIMIT_SIGPENDING" => Self::Sigpending,
            "RLIMIT_STACK" => Self::Stack,
            _ => return None,
        })
    }
}

/// An OCI mount the agent supports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Absolute path inside the container.
    pub destination: String,
    /// Filesystem type: one of `proc`, `sysfs`, `tmpfs`, `devpts`, `mqueue`,
    /// `cgroup2`, `bind` (a bind mount of a guest path).
    pub fs_type: String,
    /// Source (device name for pseudo filesystems, guest path for `bind`).
    pub source: String,
    /// OCI mount options (`ro`, `nosuid`, `mode=755`, ...).
    pub options: Vec<String>,
}

/// Where the container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// The read-only lower layer.
    pub source: RootfsSource,
    /// OCI `root.readonly`: no writable overlay, the rootfs stays read-only.
    pub readonly: bool,
}

/// The read-only lower layer of the rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootfsSource {
    /// A block device in the guest (the VM case), e.g. `/dev/vdb`.
    Block {
        /// Absolute device path.
        device: String,
        /// Filesystem; `None` tries erofs then ext4.
        fs: Option<FsType>,
    },
    /// A directory visible to the agent (the test harness case).
    Directory {
        /// Absolute path.
        path: String,
    },
}

/// Filesystems a rootfs image may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsType {
    /// EROFS image.
    Erofs,
    /// ext4 image.
    Ext4,
}

impl FsType {
    /// The name `mount(2)` knows the filesystem by.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Erofs => "erofs",
            Self::Ext4 => "ext4",
        }
    }
}
