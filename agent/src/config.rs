//! Agent configuration, parsed from the command line by `main`.

use std::path::PathBuf;
use std::str::FromStr;

use agent_protocol::AGENT_VSOCK_PORT;
use thiserror::Error;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// AF_VSOCK on this port, any CID (the VM case).
    Vsock(u32),
    /// A Unix socket at this path (the test harness case).
    Unix(PathBuf),
}

/// A `--listen` value that cannot be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid listen address {0:?}: expected vsock, vsock:PORT or unix:PATH")]
pub struct ParseListenError(String);

impl FromStr for Listen {
    type Err = ParseListenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseListenError(s.to_owned());
        if s == "vsock" {
            return Ok(Listen::Vsock(AGENT_VSOCK_PORT));
        }
        if let Some(port) = s.strip_prefix("vsock:") {
            return port.parse().map(Listen::Vsock).map_err(|_| bad());
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        Err(bad())
    }
}

/// Where the VM's cgroup v2 tree is mounted.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a microVM: mounts pseudo filesystems, applies clock and
    /// entropy, writes READY to the I/O port.
    Vm,
    /// A host process for tests: new namespaces, dry-run clock and entropy,
    /// no port I/O.
    Harness,
}

/// Everything the agent needs to know to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Where to listen.
    pub listen: Listen,
    /// VM or harness; harness whenever listening on a Unix socket.
    pub mode: Mode,
    /// Directory for per-container mount points (a tmpfs is mounted on it).
    pub state_dir: PathBuf,
    /// Root of the cgroup v2 tree the containers' groups go in; `None`
    /// runs containers without cgroups (the harness's default: the host's
    /// cgroups are not the agent's to change). In the VM cgroup2 is mounted
    /// there when it is not already.
    pub cgroup_root: Option<PathBuf>,
}

impl AgentConfig {
    /// Builds the configuration; the mode follows from the listen address.
    pub fn new(listen: Listen, state_dir: PathBuf) -> Self {
        let mode = match listen {
            Listen::Vsock(_) => Mode::Vm,
            Listen::Unix(_) => Mode::Harness,
        };
        let cgroup_root = (mode == Mode::Vm).then(|| PathBuf::from(DEFAULT_CGROUP_ROOT));
        Self {
            listen,
            mode,
            state_dir,
            cgroup_root,
        }
    }

    /// Puts the containers' cgroups under `root` instead of the default.
    pub fn with_cgroup_root(mut self, root: Option<PathBuf>) -> Self {
        if root.is_some() {
            self.cgroup_root = root;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_listen_parse_forms_accepted() {
        assert_eq!("vsock".parse(), Ok(Listen::Vsock(AGENT_VSOCK_PORT)));
        assert_eq!("vsock:77".parse(), Ok(Listen::Vsock(77)));
        assert_eq!(
            "unix:/tmp/a.sock".parse(),
            Ok(Listen::Unix("/tmp/a.sock".into()))
        );
    }

    #[test]
    fn test_listen_parse_garbage_rejected() {
        for bad in ["", "unix:", "vsock:x", "tcp:1", "vsock:99999999999"] {
            assert!(bad.parse::<Listen>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn test_config_unix_listen_selects_harness_mode() {
        let c = AgentConfig::new(Listen::Unix("/x".into()), "/s".into());
        assert_eq!(c.mode, Mode::Harness);
        assert_eq!(c.cgroup_root, None);
        let c = AgentConfig::new(Listen::Vsock(1), "/s".into());
        assert_eq!(c.mode, Mode::Vm);
        assert_eq!(c.cgroup_root, Some(DEFAULT_CGROUP_ROOT.into()));
        let c = c.with_cgroup_root(Some("/t/cg".into()));
        assert_eq!(c.cgroup_root, Some("/t/cg".into()));
    }
}
