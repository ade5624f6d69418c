//! Reads an OCI bundle's `config.json` and turns it into what the kata-snap
//! guest agent needs: the container process as an
//! [`agent_protocol::RunRequest`], the VM's size, and a line for everything
//! the config asks for that a VM does not do.
//!
//! ```text
//!  bundle/config.json ──read (bounded, no FIFO/symlink/device)──► bytes
//!        ──serde_json + oci-spec──► Spec ──convert──► BundleConfig
//!        ──run_request(rootfs)──► RunRequest (checked by agent_protocol::Validate in load)
//! ```
//!
//! [`load`] fails before any VM exists: a missing or hostile config.json, a
//! missing rootfs, or anything kata-snap cannot honour is refused with one
//! line naming the file and the cause.
//!
//! # What happens to each field
//!
//! *Honoured* fields reach the guest or size the VM. *Ignored* ones are
//! accepted and recorded in [`BundleConfig::ignored`]: they exist to confine
//! a container sharing a host kernel, and a container alone in its VM is
//! confined by the VM. *Refused* ones are things a user relies on that a VM
//! cannot give; refusing beats pretending.
//!
//! | field | decision |
//! | --- | --- |
//! | `ociVersion` | honoured: must be 1.x |
//! | `root.path` | honoured: relative to the bundle unless absolute; must be an existing directory |
//! | `root.readonly` | honoured: no writable overlay in the guest |
//! | `process` | required; `args` must not be empty (runc's message) |
//! | `process.args`, `env`, `terminal`, `noNewPrivileges` | honoured |
//! | `process.cwd` | honoured; must be absolute |
//! | `process.consoleSize` | honoured (for the runtime's first resize) |
//! | `process.user.uid`, `gid`, `additionalGids` | honoured |
//! | `process.user.umask` | 0o022 (what the guest gives) accepted; any other value refused: the agent cannot set one yet |
//! | `process.user.username`, `commandLine` | ignored (Windows only) |
//! | `process.rlimits` | honoured; an unknown name is refused |
//! | `process.capabilities` | honoured: the guest process gets these bounding, effective, permitted, inheritable and ambient sets (as runc); an unknown name is skipped with a note, as runc warns |
//! | `process.apparmorProfile`, `selinuxLabel`, `linux.mountLabel` | ignored: the guest kernel has no LSM |
//! | `process.oomScoreAdj`, `ioPriority`, `scheduler`, `execCPUAffinity` | ignored: the process is alone in its VM |
//! | `hostname` | honoured |
//! | `domainname` | ignored |
//! | `mounts` proc, sysfs, tmpfs, devpts, mqueue | honoured: made by the guest |
//! | `mounts` cgroup, cgroup2 | honoured as cgroup2 (what runc does on a cgroup v2 host; the guest kernel has cgroup2 and no v1 controllers); options other than mount flags dropped |
//! | `mounts` bind of host `/sys` on `/sys` (`runc spec --rootless`) | replaced by the guest's sysfs |
//! | `mounts` bind of a host file on `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname` (Docker, nerdctl, CRI) | honoured by copying ([`BundleConfig::files`], [`FileCopy`]): the runtime reads the host file at create (a regular file of at most 64 KiB) and the agent writes it there before the process starts, read-only with `ro`; a copy, not a live bind: a change to the host file after create is not seen. A later bind on the same file replaces an earlier one |
//! | `mounts` any other bind (`type: bind`, or `bind`/`rbind` option) of a host path | honoured through the shared filesystem ([`HostShare`]): the runtime shares the directory or file with the guest (virtio-fs), read-only with `ro`, and the agent binds it on the destination; at most [`MAX_SHARES`] per container; the runtime refuses a source that is neither a directory nor a regular file |
//! | `mounts` other types (overlay, nfs, `none` without bind...) | refused |
//! | `mounts[].uidMappings`/`gidMappings` (idmapped) | refused |
//! | `hooks` | honoured ([`Hooks`]): run by the runtime on the host, in the host's namespaces; `path` must be absolute, `timeout` greater than zero. The state a hook reads names the container's supervisor (the VM's process) as its `pid`; the create-time hooks (`prestart`, `createRuntime`, `createContainer`) of a container with a new network namespace find it there, so that Docker's `libnetwork-setkey` and nerdctl's `oci-hook` configure the namespace whose interface the guest takes |
//! | `annotations` | honoured: kept for the runtime's state |
//! | `linux.namespaces` without `path` | `pid` and `cgroup`: the container gets both in the guest (always, listed or not); the others ignored: the VM is the boundary |
//! | `linux.namespaces` `network` with `path` (Docker, CNI, Kubernetes) | the namespace's interface is given to the guest: a tap in that namespace, its MAC, MTU, IPv4 addresses and routes ([`Network::Join`]) |
//! | `linux.namespaces` other types with `path` (join an existing one) | refused |
//! | `linux.uidMappings`, `gidMappings` | ignored: ids are used as they are in the guest |
//! | `linux.resources.memory.limit` | honoured: VM memory (see [`resources`]); above the largest VM refused |
//! | `linux.resources.cpu.quota`/`period`/`cpus` | honoured: vCPUs (see [`resources`]) |
//! | `linux.resources` anything else | ignored: no host cgroup for the container |
//! | `linux.cgroupsPath` | honoured: the VM's host process is placed there (cgroup v2); the container's limits apply in the guest |
//! | `linux.seccomp` | honoured: compiled on the host into BPF ([`seccomp`]), installed by the agent in the init and every exec; unknown syscall names skipped with a note (as runc); `SCMP_ACT_NOTIFY` and `listenerPath` refused |
//! | `linux.maskedPaths`, `readonlyPaths` | honoured in the guest, as runc: a masked directory gets an empty read-only tmpfs, anything else `/dev/null`; a read-only path is bound read-only onto itself; a missing path is skipped |
//! | `linux.sysctl` | ignored, each key recorded (Docker always sends two network ones) |
//! | `linux.devices` | the default devices (null, zero, full, random, urandom, tty, ptmx) ignored, the guest has them; any other refused |
//! | `linux.rootfsPropagation` | ignored |
//! | `linux.intelRdt`, `memoryPolicy` | ignored |
//! | `linux.personality`, `timeOffsets`, `netDevices` | refused |
//! | `solaris`, `windows`, `vm`, `zos` | refused |
//!
//! oci-spec's types are stricter than runc in some sections kata-snap ignores
//! (an unknown seccomp action is a parse error there, a warning in runc):
//! when the typed parse fails, it is retried without those sections, so they
//! cannot make a config unusable; other errors keep serde's line and column.
//! `process.capabilities` is converted from the JSON itself, so an unknown
//! name (a newer kernel's) is skipped alone.
#![deny(missing_docs)]

mod convert;
mod error;
mod mounts;
mod read;
pub mod resources;
pub mod seccomp;
mod spec;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agent_protocol::{
    Capabilities, Mount, Process, Rlimit, RootfsSource, RootfsSpec, RunRequest, User, Validate,
};

pub use convert::{GUEST_UMASK, capability_number};
pub use error::{BundleError, ConfigError};
pub use mounts::{MAX_SHARES, NETWORK_IDENTITY_FILES, SHARED_DIR, SHARED_TAG};
pub use read::MAX_CONFIG_BYTES;
pub use resources::Resources;
pub use spec::{OCI_VERSION_MIN, SPEC_VERSION, default_spec, features};

/// The name of the config file in a bundle.
pub const CONFIG_FILE: &str = "config.json";

/// A loaded bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The bundle directory, absolute and without symlinks.
    pub dir: PathBuf,
    /// Its config, checked.
    pub config: BundleConfig,
}

impl Bundle {
    /// Path of the bundle's config.json.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }
}

/// A bundle's config, as kata-snap will run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleConfig {
    /// `ociVersion`, as written.
    pub oci_version: String,
    /// The rootfs directory, absolute and without symlinks.
    pub root: PathBuf,
    /// `root.readonly`.
    pub readonly: bool,
    /// The container process.
    pub process: ProcessConfig,
    /// `hostname`, if set and not empty.
    pub hostname: Option<String>,
    /// The mounts the guest will make, in order.
    pub mounts: Vec<Mount>,
    /// Host files bound on `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`
    /// (Docker, nerdctl, CRI), copied into the container's root at create
    /// ([`FileCopy`]), one per destination.
    pub files: Vec<FileCopy>,
    /// `annotations`.
    pub annotations: BTreeMap<String, String>,
    /// The VM's size from `linux.resources`.
    pub resources: Resources,
    /// `linux.cgroupsPath` as written (runc's syntax; resolved by the runtime).
    pub cgroups_path: Option<String>,
    /// `linux.maskedPaths`, hidden in the guest.
    pub masked_paths: Vec<String>,
    /// `linux.readonlyPaths`, made read-only in the guest.
    pub readonly_paths: Vec<String>,
    /// `linux.seccomp`, compiled for the guest ([`seccomp`]).
    pub seccomp: Option<agent_protocol::SeccompProgram>,
    /// The container's network, from `linux.namespaces`.
    pub network: Network,
    /// `hooks`.
    pub hooks: Hooks,
    /// The host paths bound into the container, shared through virtio-fs ([`HostShare`]);
    /// `mounts` binds each from the guest's [`SHARED_DIR`].
    pub shares: Vec<HostShare>,
    /// What was accepted but has no effect in a VM, one line each.
    pub ignored: Vec<String>,
}

/// A bind mount of a host file that kata-snap honours by copying: the
/// runtime reads `source` when the container is created and the agent
/// writes its content at `destination` in the container's root (a copy, not
/// a live bind: a later change to the host file is not seen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCopy {
    /// The host file, absolute (a relative source is joined to the bundle
    /// directory). Not opened here: the runtime reads it as a hostile file.
    pub source: PathBuf,
    /// The absolute container path, one of [`NETWORK_IDENTITY_FILES`].
    pub destination: String,
    /// The bind asked for `ro`: the agent binds the copy read-only.
    pub read_only: bool,
}

/// An OCI hook: a host program the runtime runs at one point of the
/// container's lifecycle, the container's state on its stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// The executable, absolute.
    pub path: PathBuf,
    /// Its argv (`args[0]` included, as `execv` takes it); empty: the path alone.
    pub args: Vec<String>,
    /// Its whole environment (`KEY=VALUE`): nothing else is inherited.
    pub env: Vec<String>,
    /// Seconds after which it is killed and counted as failed.
    pub timeout: Option<u32>,
}

/// `hooks`, each list in the order given.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Hooks {
    /// Deprecated by the spec, still Docker's: at create, as `createRuntime`.
    pub prestart: Vec<Hook>,
    /// At create, once the container's namespaces exist.
    pub create_runtime: Vec<Hook>,
    /// At create, after `createRuntime` (runc runs them in the container's
    /// namespaces; kata-snap on the host: the container's are in its VM).
    pub create_container: Vec<Hook>,
    /// At start, before the process runs (runc: in the container; kata-snap:
    /// on the host).
    pub start_container: Vec<Hook>,
    /// Once the process runs; a failure is a warning.
    pub poststart: Vec<Hook>,
    /// At delete, once the VM is gone; a failure is a warning.
    pub poststop: Vec<Hook>,
}

impl Hooks {
    /// The hooks `create` runs, in order, with the kind each is.
    pub fn at_create(&self) -> impl Iterator<Item = (&'static str, &Hook)> {
        let kind = |k: &'static str| move |h| (k, h);
        self.prestart
            .iter()
            .map(kind("prestart"))
            .chain(self.create_runtime.iter().map(kind("createRuntime")))
            .chain(self.create_container.iter().map(kind("createContainer")))
    }

    /// Whether `create` runs any hook.
    pub fn any_at_create(&self) -> bool {
        self.at_create().next().is_some()
    }
}

/// A bind mount of a host directory or file (Docker `-v`, `ctr run --mount`, Kubernetes
/// volumes) the guest sees through the shared filesystem (virtio-fs): the runtime stages
/// `source` as share `i` and the agent binds `SHARED_DIR/i` on `destination`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostShare {
    /// The host path, absolute (a relative source is joined to the bundle directory). Not
    /// opened here: the runtime checks it is a directory or a regular file.
    pub source: PathBuf,
    /// The absolute container path.
    pub destination: String,
    /// `ro`: the guest cannot change it (the share itself is read-only too).
    pub read_only: bool,
    /// `rbind`: mounts below `source` are shared with it.
    pub recursive: bool,
}

/// The container's network, as `linux.namespaces` asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// No `network` entry (runc: the host's network). A VM cannot share the host's network
    /// namespace: the guest has loopback only.
    #[default]
    Host,
    /// A new, empty network namespace: loopback only, as runc gives it.
    New,
    /// The network namespace at this path (Docker, CNI, Kubernetes): its interface is given to
    /// the guest (`kata-snap create` connects a tap to it).
    Join(PathBuf),
}

/// The container process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// argv, not empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// Absolute working directory.
    pub cwd: String,
    /// uid, gid and supplementary groups.
    pub user: User,
    /// Give the process a terminal.
    pub terminal: bool,
    /// Initial terminal size, if given.
    pub console_size: Option<ConsoleSize>,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// Set `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privileges: bool,
    /// `process.user.umask`, if set.
    pub umask: Option<u32>,
    /// `process.capabilities` as masks; `None` when the config has none.
    pub capabilities: Option<Capabilities>,
}

impl ProcessConfig {
    /// The process as the agent runs it.
    pub fn agent_process(&self) -> Process {
        Process {
            args: self.args.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            rlimits: self.rlimits.clone(),
            terminal: self.terminal,
            no_new_privileges: self.no_new_privileges,
            umask: self.umask,
            capabilities: self.capabilities,
            clear_onlcr: false,
            console_size: self.console_size.map(|c| (c.rows, c.cols)),
        }
    }
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleSize {
    /// Rows, at least 1.
    pub rows: u16,
    /// Columns, at least 1.
    pub cols: u16,
}

impl BundleConfig {
    /// The agent request that runs this container on `rootfs`.
    pub fn run_request(&self, rootfs: RootfsSource) -> RunRequest {
        RunRequest {
            process: self.process.agent_process(),
            hostname: self.hostname.clone(),
            mounts: self.mounts.clone(),
            rootfs: RootfsSpec {
                source: rootfs,
                readonly: self.readonly,
            },
            masked_paths: self.masked_paths.clone(),
            readonly_paths: self.readonly_paths.clone(),
            seccomp: self.seccomp.clone(),
            network: None,
            // Their contents are read by the runtime at create (`files`).
            files: Vec::new(),
            // The host paths bound in: the guest mounts their shared filesystem, from which
            // `mounts` binds each.
            shared_fs: (!self.shares.is_empty()).then(|| agent_protocol::SharedFs {
                tag: SHARED_TAG.into(),
                mount_point: SHARED_DIR.into(),
            }),
        }
    }
}

/// Loads and checks a process.json (`runc exec --process FILE`): an OCI
/// `process` object, read and bounded as config.json is (but a link is followed
/// and a pipe read: see [`read::read_process_file`]), converted with the
/// same rules, and validated as the agent will.
pub fn load_process(path: &Path) -> Result<ProcessConfig, BundleError> {
    let bytes = read::read_process_file(path)?;
    let syntax = |source| BundleError::ConfigSyntax {
        path: path.into(),
        source,
    };
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(syntax)?;
    // Capabilities are converted from the JSON (an unknown name is skipped
    // there, where oci-spec's type would refuse the file).
    let raw_caps = value.as_object_mut().and_then(|o| o.remove("capabilities"));
    // runc reads a process without `user` as uid 0, gid 0 (Go's zero value); oci-spec's type
    // requires the field.
    if let Some(o) = value.as_object_mut() {
        o.entry("user")
            .or_insert_with(|| serde_json::json!({"uid": 0, "gid": 0}));
    }
    let process: oci_spec::runtime::Process = serde_json::from_value(value).map_err(syntax)?;
    let config_err = |error| BundleError::Config {
        path: path.into(),
        error,
    };
    let mut ignored = Vec::new();
    let p = convert::process(&process, raw_caps.as_ref(), &mut ignored).map_err(config_err)?;
    p.agent_process()
        .validate()
        .map_err(|e| config_err(e.into()))?;
    Ok(p)
}

/// Loads and checks the bundle in `bundle_dir`: reads config.json, converts
/// it, and validates the resulting request as the agent will.
pub fn load(bundle_dir: &Path) -> Result<Bundle, BundleError> {
    let dir = bundle_dir
        .canonicalize()
        .map_err(|source| BundleError::BundleDir {
            path: bundle_dir.into(),
            source,
        })?;
    if !dir.is_dir() {
        return Err(BundleError::BundleNotDir {
            path: bundle_dir.into(),
        });
    }
    let path = dir.join(CONFIG_FILE);
    let bytes = read::read_config(&path)?;
    let parsed = read::parse_config(&path, &bytes)?;
    let config_err = |error| BundleError::Config {
        path: path.clone(),
        error,
    };
    let config = convert::convert(
        &dir,
        &parsed.spec,
        parsed.notes,
        parsed.capabilities.as_ref(),
        parsed.seccomp.as_ref(),
    )
    .map_err(config_err)?;
    // The runtime picks the real source; any valid one checks the rest.
    let probe = RootfsSource::Block {
        device: "/dev/vdb".into(),
        fs: None,
    };
    config
        .run_request(probe)
        .validate()
        .map_err(|e| config_err(e.into()))?;
    tracing::debug!(
        bundle = %dir.display(),
        mounts = config.mounts.len(),
        ignored = ?config.ignored,
        "bundle loaded"
    );
    Ok(Bundle { dir, config })
}
