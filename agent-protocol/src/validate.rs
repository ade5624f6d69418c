//! Field validation shared by both sides of the protocol.
//!
//! Every decoded message is validated before it is acted upon, and every
//! message is validated before it is sent, so a buggy peer is caught at the
//! sender and a hostile one at the receiver.

use std::collections::HashSet;

use thiserror::Error;

use crate::messages::{
    AgentMessage, ExecRequest, HostMessage, Mount, Process, RootfsSource, RunRequest,
};
use crate::{MAX_STDIO_CHUNK, PROTOCOL_VERSION};

/// Most argv entries in a `Run`.
pub const MAX_ARGS: usize = 4096;
/// Most environment entries in a `Run`.
pub const MAX_ENV: usize = 4096;
/// Most supplementary groups.
pub const MAX_GROUPS: usize = 1024;
/// Most OCI mounts.
pub const MAX_MOUNTS: usize = 128;
/// Longest single string (a path, an error message...), in bytes.
pub const MAX_TEXT: usize = 4096;
/// Longest hostname (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;
/// Fewest and most bytes in a `Reseed`.
pub const RESEED_BYTES: std::ops::RangeInclusive<usize> = 16..=512;
/// Earliest time `SyncTime` accepts (2020-01-01T00:00:00Z): anything earlier
/// is a host bug, not a clock.
pub const MIN_REALTIME_NS: u64 = 1_577_836_800 * 1_000_000_000;
/// Latest time `SyncTime` accepts (2200-01-01T00:00:00Z).
pub const MAX_REALTIME_NS: u64 = 7_258_118_400 * 1_000_000_000;
/// Mount types the agent supports. `cgroup2` is the unified hierarchy (the
/// guest kernel has no cgroup v1 controllers); hosts translate OCI `cgroup`
/// mounts to it, as runc does on a cgroup v2 host.
pub const SUPPORTED_MOUNT_TYPES: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup2", "bind",
];
/// Most entries in `masked_paths`, and in `readonly_paths`.
pub const MAX_PATH_LIST: usize = 256;
/// Longest exec id, in bytes.
pub const MAX_EXEC_ID: usize = 64;
/// Highest signal number (`SIGRTMAX` on Linux).
pub const MAX_SIGNAL: i32 = 64;

/// Why a message is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    /// A `Run` has no argv.
    #[error("args must not be empty")]
    EmptyArgs,
    /// A list is longer than allowed.
    #[error("{field} has {len} entries, more than the limit of {max}")]
    TooMany {
        /// Field name.
        field: &'static str,
        /// Entries present.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A byte string is longer than allowed.
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    TooLong {
        /// Field name.
        field: &'static str,
        /// Bytes present.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A byte string is shorter than allowed.
    #[error("{field} is {len} bytes, fewer than the minimum of {min}")]
    TooShort {
        /// Field name.
        field: &'static str,
        /// Bytes present.
        len: usize,
        /// Minimum.
        min: usize,
    },
    /// A string contains a NUL byte.
    #[error("{field} contains a NUL byte")]
    Nul {
        /// Field name.
        field: &'static str,
    },
    /// A path is not absolute or has a `..` component.
    #[error("{field} {path:?} must be an absolute path without '..'")]
    BadPath {
        /// Field name.
        field: &'static str,
        /// The path.
        path: String,
    },
    /// An environment entry is not `KEY=VALUE` with a non-empty key.
    #[error("env entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
    /// A hostname has characters other than letters, digits, '-', '.', '_'.
    #[error("hostname {0:?} is not a valid hostname")]
    BadHostname(String),
    /// An rlimit's soft value exceeds its hard value.
    #[error("rlimit {kind:?}: soft limit {soft} exceeds hard limit {hard}")]
    RlimitSoftAboveHard {
        /// Which limit.
        kind: crate::RlimitKind,
        /// Soft.
        soft: u64,
        /// Hard.
        hard: u64,
    },
    /// The same rlimit appears twice.
    #[error("rlimit {0:?} appears more than once")]
    DuplicateRlimit(crate::RlimitKind),
    /// A mount type the agent does not support.
    #[error("mount type {0:?} is not supported (supported: {SUPPORTED_MOUNT_TYPES:?})")]
    UnsupportedMount(String),
    /// A signal number outside 1..=64.
    #[error("signal {0} is not in 1..={MAX_SIGNAL}")]
    BadSignal(i32),
    /// A terminal size with zero rows or columns.
    #[error("terminal size {rows}x{cols} must be at least 1x1")]
    BadWindowSize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// A `SyncTime` outside 2020..2200.
    #[error("realtime {0} ns is outside the accepted range (2020-01-01 .. 2200-01-01)")]
    BadTime(u64),
    /// An exit code outside 0..=255.
    #[error("exit code {0} is not in 0..=255")]
    BadExitCode(i32),
    /// A pid of 0.
    #[error("pid must not be 0")]
    BadPid,
    /// A umask with bits outside 0o777.
    #[error("umask {0:#o} has bits outside 0o777")]
    BadUmask(u32),
    /// An exec id that is empty, too long, or has characters other than
    /// letters, digits, '-', '_', '.'.
    #[error("exec id {0:?} must be 1..={MAX_EXEC_ID} letters, digits, '-', '_' or '.'")]
    BadExecId(String),
    /// A number outside the range its field allows.
    #[error("{field} {value} is out of range (allowed: {allowed})")]
    OutOfRange {
        /// Field name.
        field: &'static str,
        /// The value, as text.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// A cpuset list that is not comma-separated numbers and ranges.
    #[error("{field} {value:?} is not a list of CPUs or nodes such as 0-2,4")]
    BadCpuset {
        /// Field name.
        field: &'static str,
        /// The list (truncated).
        value: String,
    },
    /// A `memory.stat` key that is not 1..=64 lower-case letters, digits, '_'.
    #[error("memory.stat key {0:?} is not 1..=64 lower-case letters, digits or '_'")]
    BadStatKey(String),
    /// A `Hello` with a version other than ours. Reported separately so that
    /// callers can tell a version mismatch from other errors.
    #[error("protocol version mismatch: peer speaks version {peer}, this side speaks {ours}")]
    VersionMismatch {
        /// The peer's version.
        peer: u32,
        /// [`PROTOCOL_VERSION`].
        ours: u32,
    },
}

/// Checks that a message's fields are within the protocol's limits.
pub trait Validate {
    /// Returns the first problem found, if any.
    fn validate(&self) -> Result<(), ValidationError>;
}

fn text(field: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.len() > MAX_TEXT {
        return Err(ValidationError::TooLong {
            field,
            len: s.len(),
            max: MAX_TEXT,
        });
    }
    if s.contains('\0') {
        return Err(ValidationError::Nul { field });
    }
    Ok(())
}

fn abs_path(field: &'static str, p: &str) -> Result<(), ValidationError> {
    text(field, p)?;
    if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
        return Err(ValidationError::BadPath {
            field,
            path: p.to_owned(),
        });
    }
    Ok(())
}

fn count(field: &'static str, len: usize, max: usize) -> Result<(), ValidationError> {
    if len > max {
        return Err(ValidationError::TooMany { field, len, max });
    }
    Ok(())
}

fn chunk(field: &'static str, bytes: &[u8]) -> Result<(), ValidationError> {
    if bytes.len() > MAX_STDIO_CHUNK {
        return Err(ValidationError::TooLong {
            field,
            len: bytes.len(),
            max: MAX_STDIO_CHUNK,
        });
    }
    Ok(())
}

fn version(v: u32) -> Result<(), ValidationError> {
    if v != PROTOCOL_VERSION {
        return Err(ValidationError::VersionMismatch {
            peer: v,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// Validates a hostname: 1..=64 bytes of letters, digits, '-', '.', '_'.
pub fn validate_hostname(h: &str) -> Result<(), ValidationError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if h.is_empty() || h.len() > MAX_HOSTNAME || !h.chars().all(ok_char) {
        return Err(ValidationError::BadHostname(
            h.chars().take(MAX_HOSTNAME * 2).collect(),
        ));
    }
    Ok(())
}

fn validate_mount(m: &Mount) -> Result<(), ValidationError> {
    abs_path("mount destination", &m.destination)?;
    if !SUPPORTED_MOUNT_TYPES.contains(&m.fs_type.as_str()) {
        return Err(ValidationError::UnsupportedMount(
            m.fs_type.chars().take(64).collect(),
        ));
    }
    if m.fs_type == "bind" {
        abs_path("bind mount source", &m.source)?;
    } else {
        text("mount source", &m.source)?;
    }
    count("mount options", m.options.len(), 64)?;
    for o in &m.options {
        text("mount option", o)?;
    }
    Ok(())
}

impl Validate for Process {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.args.is_empty() {
            return Err(ValidationError::EmptyArgs);
        }
        count("args", self.args.len(), MAX_ARGS)?;
        for a in &self.args {
            text("arg", a)?;
        }
        if self.args[0].is_empty() {
            return Err(ValidationError::TooShort {
                field: "args[0]",
                len: 0,
                min: 1,
            });
        }
        count("env", self.env.len(), MAX_ENV)?;
        for e in &self.env {
            text("env entry", e)?;
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() => {}
                _ => return Err(ValidationError::BadEnv(e.chars().take(128).collect())),
            }
        }
        abs_path("cwd", &self.cwd)?;
        count(
            "additional_gids",
            self.user.additional_gids.len(),
            MAX_GROUPS,
        )?;
        count("rlimits", self.rlimits.len(), 16)?;
        let mut seen = HashSet::new();
        for r in &self.rlimits {
            if !seen.insert(r.kind) {
                return Err(ValidationError::DuplicateRlimit(r.kind));
            }
            if r.soft > r.hard {
                return Err(ValidationError::RlimitSoftAboveHard {
                    kind: r.kind,
                    soft: r.soft,
                    hard: r.hard,
                });
            }
        }
        if let Some((rows, cols)) = self.console_size
            && (rows == 0 || cols == 0)
        {
            return Err(ValidationError::BadWindowSize { rows, cols });
        }
        match self.umask {
            Some(m) if m > 0o777 => Err(ValidationError::BadUmask(m)),
            _ => Ok(()),
        }
    }
}

impl Validate for RunRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        self.process.validate()?;
        if let Some(h) = &self.hostname {
            validate_hostname(h)?;
        }
        count("mounts", self.mounts.len(), MAX_MOUNTS)?;
        for m in &self.mounts {
            validate_mount(m)?;
        }
        count("masked_paths", self.masked_paths.len(), MAX_PATH_LIST)?;
        for p in &self.masked_paths {
            abs_path("masked path", p)?;
        }
        count("readonly_paths", self.readonly_paths.len(), MAX_PATH_LIST)?;
        for p in &self.readonly_paths {
            abs_path("readonly path", p)?;
        }
        if let Some(s) = &self.seccomp {
            s.validate()?;
        }
        if let Some(n) = &self.network {
            n.validate()?;
        }
        crate::files::validate_files(&self.files)?;
        if let Some(s) = &self.shared_fs {
            s.validate_with(&self.rootfs.source)?;
        }
        match &self.rootfs.source {
            RootfsSource::Block { device, .. } => abs_path("rootfs device", device),
            RootfsSource::Directory { path } => abs_path("rootfs directory", path),
        }
    }
}

impl Validate for ExecRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if self.id.is_empty() || self.id.len() > MAX_EXEC_ID || !self.id.chars().all(ok_char) {
            return Err(ValidationError::BadExecId(
                self.id.chars().take(MAX_EXEC_ID * 2).collect(),
            ));
        }
        if let Some(g) = self.cgroup.as_deref().filter(|g| !g.is_empty()) {
            validate_sub_cgroup(g)?;
        }
        self.process.validate()
    }
}

/// An `exec --cgroup` path: relative, below the container's group (no `..`,
/// no `.`, no empty component), at most [`MAX_TEXT`] bytes.
pub fn validate_sub_cgroup(g: &str) -> Result<(), ValidationError> {
    text("exec cgroup", g)?;
    let bad = g.is_empty()
        || g.starts_with('/')
        || g.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(ValidationError::BadPath {
            field: "exec cgroup (relative, without '.' or '..')",
            path: g.chars().take(256).collect(),
        });
    }
    Ok(())
}

impl Validate for crate::SeccompProgram {
    fn validate(&self) -> Result<(), ValidationError> {
        use crate::seccomp::{BPF_MAXINSNS, MAX_SECCOMP_FILTERS, MAX_SECCOMP_INSNS};
        if self.filters.is_empty() {
            return Err(ValidationError::TooShort {
                field: "seccomp filters",
                len: 0,
                min: 1,
            });
        }
        count("seccomp filters", self.filters.len(), MAX_SECCOMP_FILTERS)?;
        let mut total = 0;
        for f in &self.filters {
            if f.is_empty() {
                return Err(ValidationError::TooShort {
                    field: "seccomp filter",
                    len: 0,
                    min: 1,
                });
            }
            count("seccomp filter", f.len(), BPF_MAXINSNS)?;
            total += f.len();
        }
        count("seccomp instructions", total, MAX_SECCOMP_INSNS)?;
        if self.flags & !crate::seccomp::SECCOMP_FLAGS_KNOWN != 0 {
            return Err(ValidationError::OutOfRange {
                field: "seccomp flags",
                value: format!("{:#x}", self.flags),
                allowed: format!("bits of {:#x}", crate::seccomp::SECCOMP_FLAGS_KNOWN),
            });
        }
        Ok(())
    }
}

impl Validate for HostMessage {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            HostMessage::Hello { version: v } => version(*v),
            HostMessage::Run(run) | HostMessage::Create(run) => run.validate(),
            HostMessage::Exec(exec) => exec.validate(),
            HostMessage::Update(r) => r.validate(),
            HostMessage::Start | HostMessage::Stats | HostMessage::Processes => Ok(()),
            HostMessage::Stdin(b) => chunk("stdin chunk", b),
            HostMessage::CloseStdin => Ok(()),
            HostMessage::Signal(s) => {
                if (1..=MAX_SIGNAL).contains(s) {
                    Ok(())
                } else {
                    Err(ValidationError::BadSignal(*s))
                }
            }
            &HostMessage::Resize { rows, cols } => {
                if rows == 0 || cols == 0 {
                    Err(ValidationError::BadWindowSize { rows, cols })
                } else {
                    Ok(())
                }
            }
            &HostMessage::SyncTime { realtime_ns } => {
                if (MIN_REALTIME_NS..MAX_REALTIME_NS).contains(&realtime_ns) {
                    Ok(())
                } else {
                    Err(ValidationError::BadTime(realtime_ns))
                }
            }
            HostMessage::Reseed { bytes } => {
                let len = bytes.len();
                if len < *RESEED_BYTES.start() {
                    Err(ValidationError::TooShort {
                        field: "reseed bytes",
                        len,
                        min: *RESEED_BYTES.start(),
                    })
                } else if len > *RESEED_BYTES.end() {
                    Err(ValidationError::TooLong {
                        field: "reseed bytes",
                        len,
                        max: *RESEED_BYTES.end(),
                    })
                } else {
                    Ok(())
                }
            }
        }
    }
}

impl Validate for AgentMessage {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            AgentMessage::Hello { version: v } => version(*v),
            AgentMessage::Ack => Ok(()),
            AgentMessage::Started { pid } | AgentMessage::Created { pid } => {
                if *pid == 0 {
                    Err(ValidationError::BadPid)
                } else {
                    Ok(())
                }
            }
            AgentMessage::Stdout(b) => chunk("stdout chunk", b),
            AgentMessage::Stderr(b) => chunk("stderr chunk", b),
            AgentMessage::Exited { code } => {
                if (0..=255).contains(code) {
                    Ok(())
                } else {
                    Err(ValidationError::BadExitCode(*code))
                }
            }
            AgentMessage::Error { message, .. } => text("error message", message),
            AgentMessage::Stats(s) => s.validate(),
            AgentMessage::Processes(list) => {
                if list.len() > MAX_PROCESSES {
                    return Err(ValidationError::TooMany {
                        field: "processes",
                        len: list.len(),
                        max: MAX_PROCESSES,
                    });
                }
                for p in list {
                    text("process command", &p.cmd)?;
                    if let Some(t) = &p.tty {
                        text("process tty", t)?;
                    }
                    if p.pid == 0 {
                        return Err(ValidationError::BadPid);
                    }
                }
                Ok(())
            }
        }
    }
}

/// Most processes one `Processes` answer lists (the agent truncates).
pub const MAX_PROCESSES: usize = 1024;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::messages::{RootfsSpec, User};

    fn process() -> Process {
        Process {
            args: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: User {
                uid: 0,
                gid: 0,
                additional_gids: vec![],
            },
            rlimits: vec![],
            terminal: false,
            no_new_privileges: true,
            umask: None,
            capabilities: None,
            clear_onlcr: false,
            console_size: None,
        }
    }

    pub(crate) fn run() -> RunRequest {
        RunRequest {
            process: process(),
            hostname: Some("h".into()),
            mounts: vec![],
            rootfs: RootfsSpec {
                source: RootfsSource::Block {
                    device: "/dev/vdb".into(),
                    fs: None,
                },
                readonly: false,
            },
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: vec!["/proc/sys".into()],
            seccomp: None,
            network: None,
            files: vec![],
            shared_fs: None,
        }
    }

    #[test]
    fn test_validate_run_checks_its_network() {
        use crate::network::{InterfaceConfig, NetworkConfig};
        let with_mtu = |mtu| RunRequest {
            network: Some(NetworkConfig {
                interfaces: vec![InterfaceConfig {
                    name: "eth0".into(),
                    mac: None,
                    mtu: Some(mtu),
                    addresses: vec![],
                }],
                routes: vec![],
            }),
            ..run()
        };
        with_mtu(1400).validate().unwrap();
        let bad = HostMessage::Create(Box::new(with_mtu(1)));
        assert!(matches!(
            bad.validate(),
            Err(ValidationError::OutOfRange { field: "MTU", .. })
        ));
    }

    #[test]
    fn test_validate_seccomp_bounds() {
        use crate::seccomp::{BPF_MAXINSNS, BpfInstruction, MAX_SECCOMP_FILTERS, SeccompProgram};
        let ret_allow = BpfInstruction {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        };
        let with = |filters: Vec<Vec<BpfInstruction>>, flags: u32| RunRequest {
            seccomp: Some(SeccompProgram { filters, flags }),
            ..run()
        };
        with(vec![vec![ret_allow; 3]], 2).validate().unwrap();
        with(vec![vec![ret_allow; BPF_MAXINSNS]], 0)
            .validate()
            .unwrap();
        for bad in [
            with(vec![], 0),
            with(vec![vec![]], 0),
            with(vec![vec![ret_allow; BPF_MAXINSNS + 1]], 0),
            with(vec![vec![ret_allow]; MAX_SECCOMP_FILTERS + 1], 0),
            with(vec![vec![ret_allow; BPF_MAXINSNS]; 5], 0),
            with(vec![vec![ret_allow]], 1),
        ] {
            assert!(
                bad.validate().is_err(),
                "{:?}",
                bad.seccomp.map(|s| s.flags)
            );
        }
    }

    #[test]
    fn test_validate_exec_cgroup_relative_below() {
        let exec = |g: &str| ExecRequest {
            id: "e".into(),
            process: process(),
            cgroup: Some(g.into()),
        };
        exec("sub").validate().unwrap();
        // The container's own group, explicitly.
        exec("").validate().unwrap();
        exec("a/b-c").validate().unwrap();
        for bad in ["/abs", "..", "a/../..", "a//b", "./a", "a/"] {
            assert!(exec(bad).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_validate_good_run_accepted() {
        run().validate().unwrap();
    }

    #[test]
    fn test_validate_exec_id_and_umask_checked() {
        let exec = |id: &str| ExecRequest {
            id: id.into(),
            process: process(),
            cgroup: None,
        };
        exec("exec-1.a_b").validate().unwrap();
        for bad in ["", "a/b", "a b", &"x".repeat(MAX_EXEC_ID + 1)] {
            assert!(
                matches!(exec(bad).validate(), Err(ValidationError::BadExecId(_))),
                "{bad:?}"
            );
        }
        let mut e = exec("x");
        e.process.args.clear();
        assert_eq!(e.validate(), Err(ValidationError::EmptyArgs));
        let mut r = run();
        r.process.umask = Some(0o027);
        r.validate().unwrap();
        r.process.umask = Some(0o1000);
        assert_eq!(r.validate(), Err(ValidationError::BadUmask(0o1000)));
    }

    #[test]
    fn test_validate_limits_enforced() {
        let mut r = run();
        r.process.args = vec!["x".into(); MAX_ARGS + 1];
        assert!(matches!(
            r.validate(),
            Err(ValidationError::TooMany { field: "args", .. })
        ));
        let mut r = run();
        r.process.cwd = format!("/{}", "a".repeat(MAX_TEXT));
        assert!(matches!(r.validate(), Err(ValidationError::TooLong { .. })));
        let mut r = run();
        r.process.user.additional_gids = vec![1; MAX_GROUPS + 1];
        assert!(r.validate().is_err());
        let mut r = run();
        r.hostname = Some("a".repeat(65));
        assert!(matches!(r.validate(), Err(ValidationError::BadHostname(_))));
    }

    #[test]
    fn test_validate_masked_and_readonly_paths_checked() {
        let mut r = run();
        r.masked_paths = vec!["relative".into()];
        assert!(matches!(
            r.validate(),
            Err(ValidationError::BadPath {
                field: "masked path",
                ..
            })
        ));
        let mut r = run();
        r.readonly_paths = vec!["/proc/../etc".into()];
        assert!(matches!(
            r.validate(),
            Err(ValidationError::BadPath {
                field: "readonly path",
                ..
            })
        ));
        let mut r = run();
        r.masked_paths = vec!["/a".into(); MAX_PATH_LIST + 1];
        assert!(matches!(
            r.validate(),
            Err(ValidationError::TooMany {
                field: "masked_paths",
                ..
            })
        ));
        let mut r = run();
        r.readonly_paths = vec![format!("/{}", "a".repeat(MAX_TEXT))];
        assert!(matches!(r.validate(), Err(ValidationError::TooLong { .. })));
        let mut r = run();
        r.masked_paths = vec!["/a\0b".into()];
        assert!(matches!(r.validate(), Err(ValidationError::Nul { .. })));
    }

    #[test]
    fn test_validate_duplicate_rlimit_rejected() {
        let mut r = run();
        let l = crate::Rlimit {
            kind: crate::RlimitKind::Nofile,
            soft: 1,
            hard: 1,
        };
        r.process.rlimits = vec![l, l];
        assert!(matches!(
            r.validate(),
            Err(ValidationError::DuplicateRlimit(_))
        ));
    }

    #[test]
    fn test_validate_mount_types() {
        let mount = |t: &str| Mount {
            destination: "/sys/fs/cgroup".into(),
            fs_type: t.into(),
            source: t.into(),
            options: vec!["ro".into()],
        };
        let mut r = run();
        r.mounts = vec![mount("cgroup2")];
        r.validate().unwrap();
        r.mounts = vec![mount("cgroup")];
        assert!(matches!(
            r.validate(),
            Err(ValidationError::UnsupportedMount(_))
        ));
    }

    #[test]
    fn test_validate_relative_rootfs_device_rejected() {
        let mut r = run();
        r.rootfs.source = RootfsSource::Block {
            device: "vdb".into(),
            fs: None,
        };
        assert!(matches!(r.validate(), Err(ValidationError::BadPath { .. })));
    }

    #[test]
    fn test_validate_hello_other_version_is_mismatch() {
        let e = HostMessage::Hello {
            version: PROTOCOL_VERSION + 1,
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e,
            ValidationError::VersionMismatch {
                peer: PROTOCOL_VERSION + 1,
                ours: PROTOCOL_VERSION
            }
        );
    }

    #[test]
    fn test_validate_sync_time_range() {
        assert!(
            HostMessage::SyncTime {
                realtime_ns: MIN_REALTIME_NS
            }
            .validate()
            .is_ok()
        );
        assert!(
            HostMessage::SyncTime {
                realtime_ns: MIN_REALTIME_NS - 1
            }
            .validate()
            .is_err()
        );
        assert!(
            HostMessage::SyncTime {
                realtime_ns: u64::MAX
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn test_validate_create_checks_request_like_run() {
        HostMessage::Create(Box::new(run())).validate().unwrap();
        let mut r = run();
        r.process.args.clear();
        assert_eq!(
            HostMessage::Create(Box::new(r)).validate(),
            Err(ValidationError::EmptyArgs)
        );
        let mut r = run();
        r.process.cwd = "relative".into();
        assert!(matches!(
            HostMessage::Create(Box::new(r)).validate(),
            Err(ValidationError::BadPath { field: "cwd", .. })
        ));
    }

    #[test]
    fn test_validate_start_always_valid() {
        HostMessage::Start.validate().unwrap();
    }

    #[test]
    fn test_validate_created_pid_zero_rejected() {
        assert_eq!(
            AgentMessage::Created { pid: 0 }.validate(),
            Err(ValidationError::BadPid)
        );
        AgentMessage::Created { pid: 1 }.validate().unwrap();
    }

    #[test]
    fn test_validate_agent_messages() {
        assert!(AgentMessage::Started { pid: 0 }.validate().is_err());
        assert!(AgentMessage::Exited { code: -1 }.validate().is_err());
        assert!(AgentMessage::Exited { code: 255 }.validate().is_ok());
        let long = AgentMessage::Error {
            kind: crate::ErrorKind::Internal,
            message: "x".repeat(MAX_TEXT + 1),
        };
        assert!(long.validate().is_err());
    }

    #[test]
    fn test_rlimit_oci_names_parsed() {
        assert_eq!(
            crate::RlimitKind::from_oci_name("RLIMIT_NOFILE"),
            Some(crate::RlimitKind::Nofile)
        );
        assert_eq!(crate::RlimitKind::from_oci_name("RLIMIT_BOGUS"), None);
    }
}
