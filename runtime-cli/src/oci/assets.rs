//! Where the runtime keeps things, and the guest it runs containers in.
//!
//! - State root (runc's `--root`): `/run/kata-snap/containers` as root, else
//!   `$XDG_RUNTIME_DIR/kata-snap/containers`; with neither, a command that needs it fails (there
//!   is no shared fallback such as `/tmp`: another local user could plant things there).
//!   It must be private to the caller: see [`private_dir`].
//! - Data directory (templates, rootfs images): `$KATA_SNAP_DATA_DIR`, else `/var/lib/kata-snap`
//!   as root, else `$XDG_DATA_HOME/kata-snap` or `~/.local/share/kata-snap`.
//! - Guest kernel and agent initramfs: the config file's `kernel`/`initramfs`
//!   (`$KATA_SNAP_CONFIG`, else `/etc/kata-snap/config.json`), else where the project's build
//!   scripts put them (`$KATA_SNAP_CACHE`, else `~/.cache/kata-snap`: `kernel/latest/vmlinux`,
//!   `initramfs/initramfs.cpio`).
//! - For tests and benchmarks of the host path only: the config file's `testGuest` names a
//!   built-in test guest that speaks the agent protocol (`agent`, guest/test-guests) to run
//!   instead of the kernel and initramfs. It runs no container process (it answers from the
//!   request's argv), so the host check, which is about booting Linux, does not apply to it.
//!   It needs the `builtin-guests` feature, and every command that uses it says so on stderr.

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

/// The default state root: `/run/kata-snap/containers` as root, else
/// `$XDG_RUNTIME_DIR/kata-snap/containers`; an error saying what to set without either.
pub fn default_root() -> Result<PathBuf> {
    if is_root() {
        return Ok(PathBuf::from("/run/kata-snap/containers"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => Ok(PathBuf::from(d).join("kata-snap/containers")),
        None => bail!(
            "no state root: pass --root DIR or set XDG_RUNTIME_DIR (kata-snap keeps no state in \
             /tmp)"
        ),
    }
}

/// Checks that `path` is a directory only the caller can change, and with `create` makes what is
/// missing of it (mode 0700). Returns whether it exists (without `create`, a missing directory
/// is not an error: nothing can have been planted in it).
///
/// The directory must be owned by the caller and writable by no one else. Every directory above
/// it must be owned by the caller or root and, if others may write to it, sticky (as `/tmp` is:
/// then they cannot rename or remove what the caller made in it). A symbolic link on the way
/// must be owned by the caller or root, and where it leads is checked in the same way. The error
/// names `what` (`state root`, `pool directory`), the path and what is wrong with it.
pub fn private_dir(path: &Path, create: bool, what: &str) -> Result<bool> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !path.is_absolute() {
        bail!("the {what} {} is not an absolute path", path.display());
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!("the {what} {} contains `..`", path.display());
    }
    let uid = nix::unistd::geteuid().as_raw();
    let mut prefix = PathBuf::new();
    let components: Vec<_> = path.components().collect();
    for (i, c) in components.iter().enumerate() {
        prefix.push(c);
        let leaf = i + 1 == components.len();
        let meta = match std::fs::symlink_metadata(&prefix) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::DirBuilder::new().mode(0o700).create(&prefix) {
                    Ok(()) => {}
                    // Made by another command at the same time: checked below like any other.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot create the {what} {}", prefix.display())
                        });
                    }
                }
                std::fs::symlink_metadata(&prefix)
                    .with_context(|| format!("cannot read the {what} {}", prefix.display()))?
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read the {what} {}", prefix.display()));
            }
        };
        let trusted_owner = |owner: u32| owner == uid || owner == 0;
        if meta.file_type().is_symlink() {
            if !trusted_owner(meta.uid()) {
                bail!(
                    "the {what} {}: {} is a symbolic link owned by uid {}, not by you (uid \
                     {uid}) or root",
                    path.display(),
                    prefix.display(),
                    meta.uid()
                );
            }
            // Where it leads, from `/` down.
            let target = std::fs::canonicalize(&prefix)
                .with_context(|| format!("cannot resolve {}", prefix.display()))?;
            let chain: Vec<&Path> = target.ancestors().collect();
            for (j, dir) in chain.iter().rev().enumerate() {
                let m = std::fs::metadata(dir)
                    .with_context(|| format!("cannot read {}", dir.display()))?;
                check_dir(path, what, dir, &m, leaf && j + 1 == chain.len(), uid)?;
            }
        } else {
            check_dir(path, what, &prefix, &meta, leaf, uid)?;
        }
    }
    Ok(true)
}

/// One directory of [`private_dir`]'s walk: `leaf` is the directory itself, else one above it.
/// [`private_dir`] for `parent/name`, where `parent` passed [`private_dir`] already: only the
/// leaf is checked (a real directory, the caller's, writable by no one else), since every
/// directory above it was. Returns whether it exists.
pub fn private_subdir(parent: &Path, name: &str, what: &str) -> Result<bool> {
    let path = parent.join(name);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the {what} {}", path.display()));
        }
    };
    check_dir(
        &path,
        what,
        &path,
        &meta,
        true,
        nix::unistd::geteuid().as_raw(),
    )?;
    Ok(true)
}

fn check_dir(
    path: &Path,
    what: &str,
    dir: &Path,
    meta: &std::fs::Metadata,
    leaf: bool,
    uid: u32,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o7777;
    let writable_by_others = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    let at = if dir == path {
        String::new()
    } else {
        format!(" (at {})", dir.display())
    };
    if !meta.is_dir() {
        bail!("the {what} {}{at} is not a directory", path.display());
    }
    if leaf {
        if meta.uid() != uid {
            bail!(
                "the {what} {}{at} is owned by uid {}, not by you (uid {uid})",
                path.display(),
                meta.uid()
            );
        }
        if writable_by_others {
            bail!(
                "the {what} {}{at} is writable by group or others (mode {mode:04o}): it must be \
                 private (chmod 700)",
                path.display()
            );
        }
    } else {
        if meta.uid() != uid && meta.uid() != 0 {
            bail!(
                "the {what} {} is inside {}, which is owned by uid {}, not by you (uid {uid}) or \
                 root",
                path.display(),
                dir.display(),
                meta.uid()
            );
        }
        if writable_by_others && !sticky {
            bail!(
                "the {what} {} is inside {}, which others may write to (mode {mode:04o}) and is \
                 not sticky",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
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
    /// Most MiB of rootfs images the cache keeps: after each build the least recently used
    /// images not in use are removed until it fits [default: [`DEFAULT_IMAGE_CACHE_MIB`]].
    pub image_cache_mib: Option<u64>,
    /// A built-in test guest instead of the kernel and initramfs (tests and benchmarks of the
    /// host path only; see the module's doc).
    pub test_guest: Option<String>,
    /// Jail each container's supervisor (its own mount namespace, an unprivileged uid of its
    /// own, no capabilities; see docs/runtime.md, "Security model") [default: true as root;
    /// without root there is no jail].
    pub jail: Option<bool>,
    /// The first uid (and gid) the jail gives containers [default: [`super::jail::DEFAULT_UID_BASE`]].
    pub jail_uid_base: Option<u32>,
    /// How many uids from `jailUidBase` the jail may give, at most one per live container
    /// [default: [`super::jail::DEFAULT_UID_COUNT`]].
    pub jail_uid_count: Option<u32>,
    /// When a container that asks for a new network namespace gets one of its own (its
    /// supervisor's) [default: `always`].
    pub new_network_namespace: Option<NewNetns>,
}

/// `newNetworkNamespace`: when a container asking for a new network namespace
/// (`linux.namespaces` `network` without a path) gets one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NewNetns {
    /// Always, as runc: whoever configures the container pid's namespace after `create`
    /// configures the container's, never the host's.
    Always,
    /// Only when the bundle has create-time hooks, which configure it (Docker's default
    /// bridge); other containers' supervisors stay in the host's namespace (their guest has
    /// loopback only either way). Saves the namespace's creation and teardown per container;
    /// the L1 rig uses it, whose emulator froze in most runs that made one per container.
    WithHooks,
}

/// The image cache's budget when the config file sets none: 10 GiB.
pub const DEFAULT_IMAGE_CACHE_MIB: u64 = 10 * 1024;

impl RuntimeConfig {
    /// The image cache's budget in bytes.
    pub fn image_cache_bytes(&self) -> u64 {
        self.image_cache_mib
            .unwrap_or(DEFAULT_IMAGE_CACHE_MIB)
            .saturating_mul(1 << 20)
    }

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

/// The built-in test guests that speak the agent protocol (config `testGuest`).
pub const AGENT_TEST_GUESTS: &[&str] = &["agent"];

/// The guest a container's VM runs.
#[derive(Debug, Clone)]
pub enum GuestAssets {
    /// The guest kernel and the agent initramfs.
    Linux {
        /// The kernel.
        kernel: PathBuf,
        /// The agent initramfs.
        initramfs: PathBuf,
    },
    /// A built-in test guest that speaks the agent protocol (config `testGuest`): no
    /// initramfs, no container process.
    TestGuest {
        /// Its name (`agent`).
        name: &'static str,
        /// Its ELF image.
        elf: &'static [u8],
    },
}

/// Finds the guest kernel and initramfs; when one is missing, the error names the command that
/// builds it. With `testGuest` in the config, the built-in test guest of that name.
pub fn guest_assets(config: &RuntimeConfig) -> Result<GuestAssets> {
    if let Some(name) = &config.test_guest {
        if config.kernel.is_some() || config.initramfs.is_some() {
            bail!("the config file names both a testGuest and a kernel or initramfs: choose one");
        }
        return test_guest(name);
    }
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
    Ok(GuestAssets::Linux { kernel, initramfs })
}

#[cfg(feature = "builtin-guests")]
fn test_guest(name: &str) -> Result<GuestAssets> {
    let guest = AGENT_TEST_GUESTS
        .contains(&name)
        .then(|| test_guests::by_name(name))
        .flatten()
        .with_context(|| {
            format!(
                "testGuest {name:?} in the config file: no built-in guest of that name speaks the \
                 agent protocol (there is: {})",
                AGENT_TEST_GUESTS.join(", ")
            )
        })?;
    tracing::warn!(
        "the guest is the built-in test guest {:?} (config testGuest): it runs no container \
         process, for tests and benchmarks of the host path only",
        guest.name
    );
    Ok(GuestAssets::TestGuest {
        name: guest.name,
        elf: guest.elf,
    })
}

#[cfg(not(feature = "builtin-guests"))]
fn test_guest(name: &str) -> Result<GuestAssets> {
    bail!(
        "testGuest {name:?} in the config file: this kata-snap was built without the built-in \
         test guests (feature builtin-guests)"
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn set_mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    /// Another uid to own things, when this test runs as root (it can chown).
    fn other_uid() -> Option<u32> {
        if !is_root() {
            println!("SKIPPED (other owner part): not root, cannot chown");
            return None;
        }
        Some(65534)
    }

    #[test]
    fn test_private_dir_makes_what_is_missing_0700() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/c");
        assert!(!private_dir(&d, false, "state root").unwrap());
        assert!(
            !t.path().join("a").exists(),
            "a check alone creates nothing"
        );
        assert!(private_dir(&d, true, "state root").unwrap());
        for p in [t.path().join("a"), t.path().join("a/b"), d.clone()] {
            assert!(p.is_dir());
            assert_eq!(mode(&p) & 0o077, 0, "{}", p.display());
        }
        assert!(private_dir(&d, false, "state root").unwrap());
        // A sticky, world-writable parent (as /tmp) is fine.
        set_mode(&t.path().join("a"), 0o1777);
        assert!(private_dir(&d, false, "state root").unwrap());
    }

    #[test]
    fn test_private_dir_refuses_what_others_can_change() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("root");
        private_dir(&d, true, "state root").unwrap();
        set_mode(&d, 0o770);
        let e = private_dir(&d, false, "state root")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("the state root {} is writable", d.display())),
            "{e}"
        );
        assert!(e.contains("mode 0770"), "{e}");
        set_mode(&d, 0o700);
        // A parent others may write to, not sticky.
        set_mode(t.path(), 0o777);
        let e = private_dir(&d, false, "pool directory")
            .unwrap_err()
            .to_string();
        assert!(e.contains("which others may write to (mode 0777)"), "{e}");
        assert!(e.starts_with("the pool directory "), "{e}");
        set_mode(t.path(), 0o700);
        // Not a directory.
        let f = t.path().join("file");
        std::fs::write(&f, b"").unwrap();
        let e = private_dir(&f, true, "state root").unwrap_err().to_string();
        assert!(e.ends_with("is not a directory"), "{e}");
        let e = private_dir(Path::new("rel/dir"), true, "state root")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an absolute path"), "{e}");
        let e = private_dir(&t.path().join("x/../root"), true, "state root")
            .unwrap_err()
            .to_string();
        assert!(e.contains("contains `..`"), "{e}");
    }

    #[test]
    fn test_private_dir_refuses_what_another_user_owns() {
        let Some(other) = other_uid() else { return };
        let t = tempfile::tempdir().unwrap();
        set_mode(t.path(), 0o755);
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(other), Some(other)).unwrap();
        // Their directory as the state root, or above it.
        let e = private_dir(&theirs, false, "state root")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("is owned by uid {other}, not by you")),
            "{e}"
        );
        let inside = theirs.join("containers");
        std::fs::create_dir(&inside).unwrap();
        let e = private_dir(&inside, true, "state root")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("which is owned by uid {other}")), "{e}");
        // A symbolic link of theirs to a directory of ours.
        let ours = t.path().join("ours");
        private_dir(&ours, true, "state root").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&ours, &link).unwrap();
        assert!(private_dir(&link, false, "state root").unwrap());
        std::os::unix::fs::lchown(&link, Some(other), Some(other)).unwrap();
        let e = private_dir(&link, false, "state root")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a symbolic link owned by uid"), "{e}");
        // Our link to their directory: where it leads is checked.
        let link2 = t.path().join("link2");
        std::os::unix::fs::symlink(&theirs, &link2).unwrap();
        let e = private_dir(&link2.join("x"), true, "state root")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("which is owned by uid {other}")), "{e}");
        assert!(
            !theirs.join("x").exists(),
            "nothing made in their directory"
        );
    }
}
