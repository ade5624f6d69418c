//! Errors of loading a bundle. Every message is one line that names the file
//! (or the bundle) and the cause.

use std::path::PathBuf;

use agent_protocol::ValidationError;
use thiserror::Error;

/// Why a bundle cannot be loaded.
#[derive(Debug, Error)]
pub enum BundleError {
    /// The bundle directory cannot be resolved (missing, no permission).
    #[error("bundle {path}: {source}")]
    BundleDir {
        /// The bundle directory as given.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The bundle path is not a directory.
    #[error("bundle {path} is not a directory")]
    BundleNotDir {
        /// The bundle path.
        path: PathBuf,
    },
    /// config.json does not exist.
    #[error("{path} does not exist")]
    ConfigMissing {
        /// Path of config.json.
        path: PathBuf,
    },
    /// config.json is a symbolic link (refused: it could point at a device).
    #[error("{path} is a symbolic link; it must be a regular file")]
    ConfigSymlink {
        /// Path of config.json.
        path: PathBuf,
    },
    /// config.json is a directory, FIFO, device or socket.
    #[error("{path} is a {kind}, not a regular file")]
    ConfigNotRegular {
        /// Path of config.json.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// config.json is larger than [`crate::MAX_CONFIG_BYTES`].
    #[error("{path} is too large: more than {max} bytes")]
    ConfigTooLarge {
        /// Path of config.json.
        path: PathBuf,
        /// The bound.
        max: u64,
    },
    /// Opening or reading config.json failed for another reason.
    #[error("cannot read {path}: {source}")]
    ConfigRead {
        /// Path of config.json.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// config.json is not JSON (serde's message has the line and column).
    #[error("{path} is not valid JSON: {source}")]
    ConfigSyntax {
        /// Path of config.json.
        path: PathBuf,
        /// Cause, with line and column.
        source: serde_json::Error,
    },
    /// config.json is JSON but not an OCI runtime config (a wrong type, an
    /// unknown enum value); serde's message has the line and column.
    #[error("{path} is not a valid OCI runtime config: {source}")]
    ConfigSchema {
        /// Path of config.json.
        path: PathBuf,
        /// Cause, with line and column.
        source: serde_json::Error,
    },
    /// The config parsed but asks for something kata-snap cannot do.
    #[error("{path}: {error}")]
    Config {
        /// Path of config.json.
        path: PathBuf,
        /// What is wrong.
        error: ConfigError,
    },
}

/// What is wrong with a config that parsed.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// `ociVersion` is missing or not 1.x.
    #[error("ociVersion {0:?} is not supported (kata-snap reads OCI runtime spec 1.x)")]
    OciVersion(String),
    /// No `root`.
    #[error("root is missing: root.path must name the container's root filesystem")]
    NoRoot,
    /// The rootfs directory does not exist.
    #[error("rootfs {0} does not exist")]
    RootfsMissing(PathBuf),
    /// The rootfs is not a directory.
    #[error("rootfs {0} is not a directory")]
    RootfsNotDir(PathBuf),
    /// The rootfs cannot be inspected.
    #[error("rootfs {path}: {source}")]
    RootfsAccess {
        /// The rootfs path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// No `process`.
    #[error("process is missing: it says what to run")]
    NoProcess,
    /// `process.args` missing or empty (runc's wording).
    #[error("args must not be empty")]
    EmptyArgs,
    /// `process.cwd` is relative (runc's wording).
    #[error("process.cwd {0:?}: cwd property must be an absolute path")]
    RelativeCwd(String),
    /// A path is not UTF-8 (the agent protocol carries strings).
    #[error("{field} {value:?} is not valid UTF-8")]
    NotUtf8 {
        /// Which field.
        field: &'static str,
        /// The value, lossily converted.
        value: String,
    },
    /// `process.user.umask` with bits outside 0o777.
    #[error("process.user.umask {0:#o} is not a umask (bits outside 0o777)")]
    Umask(u32),
    /// `linux.seccomp` cannot be compiled or asks for what a VM cannot do.
    #[error("linux.seccomp: {0}")]
    Seccomp(String),
    /// `process.capabilities` is not an object of lists of names.
    #[error("process.capabilities.{0}: not a list of capability names")]
    CapabilityShape(String),
    /// An rlimit the agent does not know.
    #[error("process.rlimits: {0} is not a supported rlimit")]
    UnknownRlimit(String),
    /// A bind mount of a host path.
    #[error("mount {destination}: a bind mount needs a source (host path {host_path:?})")]
    HostBind {
        /// Destination in the container.
        destination: String,
        /// Host path.
        host_path: String,
    },
    /// More host paths bound than a container may share.
    #[error("mounts: more than {0} bind mounts of host paths")]
    TooManyShares(usize),
    /// A mount type the guest cannot make.
    #[error(
        "mount {destination}: type {fs_type:?} is not supported \
         (supported: proc, sysfs, tmpfs, devpts, mqueue, cgroup, cgroup2)"
    )]
    UnsupportedMountType {
        /// Destination in the container.
        destination: String,
        /// The type asked for (empty when missing).
        fs_type: String,
    },
    /// An idmapped mount.
    #[error("mount {0}: idmapped mounts (uidMappings/gidMappings) are not supported")]
    IdmappedMount(String),
    /// A hook whose `path` is not absolute.
    #[error("hooks.{kind}: the hook's path {path:?} is not absolute")]
    HookPath {
        /// `prestart`, `createRuntime`, ...
        kind: &'static str,
        /// The hook's executable, as written.
        path: String,
    },
    /// A hook whose `timeout` is zero or negative.
    #[error("hooks.{kind}: hook {path}: timeout {timeout} is not greater than zero")]
    HookTimeout {
        /// `prestart`, `createRuntime`, ...
        kind: &'static str,
        /// The hook's executable.
        path: String,
        /// The timeout, as written.
        timeout: i64,
    },
    /// A namespace path that is not absolute.
    #[error("linux.namespaces: the network namespace path {0:?} is not absolute")]
    RelativeNamespacePath(String),
    /// A namespace with a `path`: joining a host namespace.
    #[error(
        "linux.namespaces: cannot join the {ns} namespace at {path}: \
         the container runs in its own VM"
    )]
    JoinNamespace {
        /// Namespace type.
        ns: String,
        /// Path of the namespace to join.
        path: String,
    },
    /// A host device to pass in.
    #[error("linux.devices: host device {0} cannot be passed into the VM")]
    Device(String),
    /// A Linux feature a VM cannot provide.
    #[error("linux.{0} is not supported")]
    UnsupportedLinux(&'static str),
    /// A non-Linux platform section.
    #[error("the {0:?} section is not supported: kata-snap runs Linux containers in its own VM")]
    Platform(&'static str),
    /// A memory limit above what a VM can get.
    #[error(
        "linux.resources.memory.limit {limit} bytes is above the largest supported limit \
         of {max_mib} MiB"
    )]
    MemoryTooLarge {
        /// The limit asked for, in bytes.
        limit: i64,
        /// The largest limit accepted, in MiB.
        max_mib: u64,
    },
    /// `linux.resources.cpu.cpus` is not a CPU list.
    #[error("linux.resources.cpu.cpus {0:?} is not a valid CPU list (such as \"0-3,6\")")]
    BadCpuList(String),
    /// A field fails the agent protocol's validation.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
}
