//! Where the runtime keeps things, and the guest it runs containers in.
//!
//! - State root (runc's `--root`): `/run/kata-snap/containers` as root, else
//!   `$XDG_RUNTIME_DIR/kata-snap/containers`, else `/tmp/kata-snap-UID/containers`.
//! - Data directory (templates, rootfs images): `$KATA_SNAP_DATA_DIR`, else `/var/lib/kata-snap`
//!   as root, else `$XDG_DATA_HOME/kata-snap` or `~/.local/share/kata-snap`.
//! - Guest kernel and agent initramfs: the config file's `kernel`/`initramfs`
//!   (`$KATA_SNAP_CONFIG`, else `/etc/kata-snap/config.json`), else where the project's build
//!   scripts put them (`$KATA_SNAP_CACHE`, else `~/.cache/kata-snap`: `kernel/latest/vmlinux`,
//!   `initramfs/initramfs.cpio`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Default guest memory when the bundle sets no memory limit, in MiB.
pub const DEFAULT_MEM_MIB: u64 = 256;
/// Default vCPUs when the bundle sets no CPU limit.
pub const DEFAULT_VCPUS: u8 = 1;

/// The one command that builds the guest kernel and the agent initramfs.
pub const BUILD_GUEST: &str = "scripts/build-guest.sh";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The default state root.
pub fn default_root() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/kata-snap/containers");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("kata-snap/containers"),
        None => PathBuf::from(format!(
            "/tmp/kata-snap-{}/containers",
            nix::unistd::geteuid()
        )),
    }
}

/// The data directory.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KATA_SNAP_DATA_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if is_root() {
        return PathBuf::from("/var/lib/kata-snap");
    }
    match std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("kata-snap"),
        None => home().join(".local/share/kata-snap"),
    }
}

/// The runtime's config file (all keys optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// The guest kernel (ELF vmlinux).
    pub kernel: Option<PathBuf>,
    /// The agent initramfs.
    pub initramfs: Option<PathBuf>,
    /// Guest memory when the bundle sets none, in MiB.
    pub default_mem_mib: Option<u64>,
    /// vCPUs when the bundle sets none.
    pub default_vcpus: Option<u8>,
}

impl RuntimeConfig {
    /// Reads the config file, if there is one (a missing file is an empty config).
    pub fn load() -> Result<Self> {
        let path = std::env::var_os("KATA_SNAP_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/kata-snap/config.json"));
        let text = match super::read_small_file(&path, 1 << 20) {
            Ok(t) => t,
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
            {
                return Ok(Self::default());
            }
            Err(e) => return Err(e.context("config file")),
        };
        serde_json::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }
}

/// The guest a container's VM runs.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// The kernel.
    pub kernel: PathBuf,
    /// The agent initramfs.
    pub initramfs: PathBuf,
}

/// Finds the guest kernel and initramfs; when one is missing, the error names the command that
/// builds it.
pub fn guest_assets(config: &RuntimeConfig) -> Result<GuestAssets> {
    let cache = std::env::var_os("KATA_SNAP_CACHE")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/kata-snap"));
    let kernel = config
        .kernel
        .clone()
        .unwrap_or_else(|| cache.join("kernel/latest/vmlinux"));
    let initramfs = config
        .initramfs
        .clone()
        .unwrap_or_else(|| cache.join("initramfs/initramfs.cpio"));
    for (what, path) in [("kernel", &kernel), ("agent initramfs", &initramfs)] {
        check_file(what, path)?;
    }
    Ok(GuestAssets { kernel, initramfs })
}

fn check_file(what: &str, path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => bail!("the guest {what} {} is not a regular file", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no guest {what} at {}: build the guest with `{BUILD_GUEST}` in the kata-snap source \
             tree, or name it in /etc/kata-snap/config.json",
            path.display()
        ),
        Err(e) => {
            Err(e).with_context(|| format!("cannot read the guest {what} {}", path.display()))
        }
    }
}
