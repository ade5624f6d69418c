//! The shared filesystem (`RunRequest::shared_fs`): the virtio-fs device that
//! carries the host directories and files of the container's bind mounts.
//!
//! A `Create` that names one mounts it (`mount -t virtiofs TAG MOUNT_POINT`,
//! `nosuid,nodev`) before the rootfs and the container's mounts, so the `bind`
//! mounts whose sources lie below the mount point find them. The mount stays
//! for the VM's life: a later `Create` (after a failed one) that names the same
//! device at the same place finds it mounted and goes on; another device or
//! another place is refused (one shared filesystem a VM).
//!
//! Where it may go: an absolute guest path (the protocol checks its form) that
//! is neither the agent's state directory, `/proc`, `/sys` or `/dev` nor above
//! one of them (a mount there would hide them), nor inside a container's own
//! directory (`<state>/c<N>`, its rootfs). The mount point is made (mode 0755)
//! when missing and must be a directory, not a symbolic link.
//!
//! A bind source below the mount point is refused when a component below the
//! mount point is a symbolic link: the guest kernel would resolve the link in
//! the guest's tree, not in the share.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use agent_protocol::{Mount, SharedFs};
use nix::mount::{MsFlags, mount};
use thiserror::Error;

/// Guest paths the shared filesystem may not cover, beside the state directory.
const KEEP_VISIBLE: &[&str] = &["/proc", "/sys", "/dev"];

/// Why the shared filesystem could not be mounted or used.
#[derive(Debug, Error)]
pub enum SharedFsError {
    /// The mount point would hide something the agent needs, or lies in a
    /// container's root.
    #[error("cannot mount the shared filesystem {tag} at {}: {reason}", mount_point.display())]
    Placement {
        /// The device's tag.
        tag: String,
        /// Where it was to go.
        mount_point: PathBuf,
        /// Why not there.
        reason: String,
    },
    /// Making the mount point failed, or it is not a directory.
    #[error("cannot mount the shared filesystem {tag} at {}: {source}", mount_point.display())]
    MountPoint {
        /// The device's tag.
        tag: String,
        /// Where it was to go.
        mount_point: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `mount(2)` failed.
    #[error("cannot mount the shared filesystem {tag} at {}: {source}", mount_point.display())]
    Mount {
        /// The device's tag.
        tag: String,
        /// Where it was to go.
        mount_point: PathBuf,
        /// Cause.
        source: nix::Error,
    },
    /// Another shared filesystem is mounted already.
    #[error(
        "cannot mount the shared filesystem {tag} at {mount_point}: \
         {mounted_tag} is mounted at {mounted_at} already (one shared filesystem a VM)"
    )]
    Other {
        /// The device's tag.
        tag: String,
        /// Where it was to go.
        mount_point: String,
        /// The one mounted.
        mounted_tag: String,
        /// Where it is.
        mounted_at: String,
    },
    /// A bind source below the mount point goes through a symbolic link.
    #[error(
        "bind mount source {source_path} goes through a symbolic link in the shared filesystem ({})",
        link.display()
    )]
    SymlinkSource {
        /// The mount's source.
        source_path: String,
        /// The link on the way.
        link: PathBuf,
    },
}

/// The shared filesystem the agent mounted, if any.
#[derive(Debug, Default)]
pub struct SharedMount {
    mounted: Option<SharedFs>,
}

/// `mount -t virtiofs TAG PATH -o nosuid,nodev`.
pub fn mount_virtiofs(tag: &str, path: &Path) -> nix::Result<()> {
    mount(
        Some(tag),
        path,
        Some("virtiofs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
}

/// Whether `mount_point` may hold the shared filesystem: the reason when not.
pub fn check_placement(mount_point: &Path, state_dir: &Path) -> Result<(), String> {
    if state_dir.starts_with(mount_point) {
        return Err(format!(
            "it would hide the agent's state directory {}",
            state_dir.display()
        ));
    }
    if let Some(p) = KEEP_VISIBLE
        .iter()
        .find(|p| Path::new(p).starts_with(mount_point) || mount_point.starts_with(p))
    {
        return Err(format!("it would cover or lie in {p}"));
    }
    if let Ok(rest) = mount_point.strip_prefix(state_dir)
        && let Some(Component::Normal(first)) = rest.components().next()
        && let Some(n) = first.to_str().and_then(|s| s.strip_prefix('c'))
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
    {
        return Err("it lies in a container's directory".into());
    }
    Ok(())
}

impl SharedMount {
    /// Nothing mounted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared filesystem mounted, if any.
    pub fn mounted(&self) -> Option<&SharedFs> {
        self.mounted.as_ref()
    }

    /// Mounts `fs` with `mount` (the agent passes [`mount_virtiofs`]) unless
    /// it is mounted already; `Ok(true)` when it mounted it now.
    pub fn ensure(
        &mut self,
        fs: &SharedFs,
        state_dir: &Path,
        mount: impl FnOnce(&str, &Path) -> nix::Result<()>,
    ) -> Result<bool, SharedFsError> {
        if let Some(m) = &self.mounted {
            if m == fs {
                return Ok(false);
            }
            return Err(SharedFsError::Other {
                tag: fs.tag.clone(),
                mount_point: fs.mount_point.clone(),
                mounted_tag: m.tag.clone(),
                mounted_at: m.mount_point.clone(),
            });
        }
        let at = PathBuf::from(&fs.mount_point);
        check_placement(&at, state_dir).map_err(|reason| SharedFsError::Placement {
            tag: fs.tag.clone(),
            mount_point: at.clone(),
            reason,
        })?;
        let point_err = |source| SharedFsError::MountPoint {
            tag: fs.tag.clone(),
            mount_point: at.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&at)
            .map_err(point_err)?;
        let meta = fs::symlink_metadata(&at).map_err(point_err)?;
        if !meta.is_dir() {
            return Err(point_err(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        mount(&fs.tag, &at).map_err(|source| SharedFsError::Mount {
            tag: fs.tag.clone(),
            mount_point: at.clone(),
            source,
        })?;
        tracing::info!(tag = %fs.tag, mount_point = %fs.mount_point, "shared filesystem mounted");
        self.mounted = Some(fs.clone());
        Ok(true)
    }

    /// Refuses a `bind` mount whose source lies below the shared
    /// filesystem's mount point through a symbolic link there.
    pub fn check_bind_source(&self, m: &Mount) -> Result<(), SharedFsError> {
        let Some(fs) = &self.mounted else {
            return Ok(());
        };
        if m.fs_type != "bind" && !m.options.iter().any(|o| o == "bind" || o == "rbind") {
            return Ok(());
        }
        let Ok(rest) = Path::new(&m.source).strip_prefix(&fs.mount_point) else {
            return Ok(());
        };
        let mut at = PathBuf::from(&fs.mount_point);
        for c in rest.components() {
            at.push(c);
            match fs::symlink_metadata(&at) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(SharedFsError::SymlinkSource {
                        source_path: m.source.clone(),
                        link: at,
                    });
                }
                // A missing source fails at its bind, with the mount's error.
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::unix::fs::PermissionsExt;

    fn fs_at(mount_point: &Path) -> SharedFs {
        SharedFs {
            tag: "kata-shared".into(),
            mount_point: mount_point.display().to_string(),
        }
    }

    #[test]
    fn test_placement_keeps_state_and_pseudo_filesystems_visible() {
        let state = Path::new("/run/kata-snap");
        check_placement(Path::new("/run/kata-snap/shared"), state).unwrap();
        check_placement(Path::new("/run/shared"), state).unwrap();
        check_placement(Path::new("/mnt/share"), state).unwrap();
        check_placement(Path::new("/run/kata-snap/c"), state).unwrap();
        check_placement(Path::new("/run/kata-snap/cx1"), state).unwrap();
        check_placement(Path::new("/devices"), state).unwrap();
        for bad in [
            "/run/kata-snap",
            "/run",
            "/",
            "/proc",
            "/proc/x",
            "/sys/fs",
            "/dev",
            "/dev/shm",
            "/run/kata-snap/c0",
            "/run/kata-snap/c12/rootfs/mnt",
        ] {
            assert!(check_placement(Path::new(bad), state).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_ensure_makes_the_point_mounts_once_and_refuses_another() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let at = state.join("shared/deep");
        let fs = fs_at(&at);
        let calls = Cell::new(0);
        let mut shared = SharedMount::new();
        let mounted = shared
            .ensure(&fs, &state, |tag, path| {
                assert_eq!(tag, "kata-shared");
                assert_eq!(path, at);
                // The point exists, as a directory, when mount(2) is called.
                assert!(path.is_dir());
                calls.set(calls.get() + 1);
                Ok(())
            })
            .unwrap();
        assert!(mounted);
        assert_eq!(calls.get(), 1);
        let mode = fs::metadata(&at).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode & !0o022, 0o755 & !0o022, "mode {mode:o}");
        assert_eq!(shared.mounted(), Some(&fs));
        // The same again (a second Create): nothing more is mounted.
        let again = shared
            .ensure(&fs, &state, |_, _| panic!("mounted twice"))
            .unwrap();
        assert!(!again);
        // Another tag or place: refused, the first one stays.
        let other = SharedFs {
            tag: "other".into(),
            ..fs.clone()
        };
        let e = shared
            .ensure(&other, &state, |_, _| panic!("mounted another"))
            .unwrap_err();
        assert!(e.to_string().contains("kata-shared is mounted at"), "{e}");
        assert_eq!(shared.mounted(), Some(&fs));
    }

    #[test]
    fn test_ensure_failure_is_reported_and_can_be_retried() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let at = dir.path().join("share");
        let fs = fs_at(&at);
        let mut shared = SharedMount::new();
        let e = shared
            .ensure(&fs, &state, |_, _| Err(nix::Error::ENODEV))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot mount the shared filesystem kata-shared at {}: ENODEV: No such device",
                at.display()
            )
        );
        assert_eq!(shared.mounted(), None);
        assert!(shared.ensure(&fs, &state, |_, _| Ok(())).unwrap());
    }

    #[test]
    fn test_ensure_refuses_a_bad_place_or_a_non_directory_before_mounting() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut shared = SharedMount::new();
        let e = shared
            .ensure(&fs_at(&state.join("c3")), &state, |_, _| panic!("mounted"))
            .unwrap_err();
        assert!(e.to_string().contains("container's directory"), "{e}");
        let e = shared
            .ensure(&fs_at(dir.path()), &state, |_, _| panic!("mounted"))
            .unwrap_err();
        assert!(e.to_string().contains("state directory"), "{e}");
        // A file, or a link to a directory, is not a mount point.
        fs::write(dir.path().join("file"), b"").unwrap();
        let e = shared
            .ensure(&fs_at(&dir.path().join("file")), &state, |_, _| {
                panic!("mounted")
            })
            .unwrap_err();
        assert!(matches!(e, SharedFsError::MountPoint { .. }), "{e}");
        std::os::unix::fs::symlink(dir.path(), dir.path().join("link")).unwrap();
        let e = shared
            .ensure(&fs_at(&dir.path().join("link")), &state, |_, _| {
                panic!("mounted")
            })
            .unwrap_err();
        assert!(e.to_string().contains("Not a directory"), "{e}");
        assert_eq!(shared.mounted(), None);
    }

    #[test]
    fn test_bind_source_through_a_link_in_the_share_refused() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("share");
        fs::create_dir_all(at.join("0/sub")).unwrap();
        fs::write(at.join("1"), b"file").unwrap();
        std::os::unix::fs::symlink("/etc", at.join("2")).unwrap();
        std::os::unix::fs::symlink("0/sub", at.join("3")).unwrap();
        let mut shared = SharedMount::new();
        shared
            .ensure(&fs_at(&at), dir.path(), |_, _| Ok(()))
            .unwrap_or_else(|e| panic!("{e}"));
        let bind = |source: &Path, fs_type: &str| Mount {
            destination: "/data".into(),
            fs_type: fs_type.into(),
            source: source.display().to_string(),
            options: vec!["rbind".into()],
        };
        shared
            .check_bind_source(&bind(&at.join("0"), "bind"))
            .unwrap();
        shared
            .check_bind_source(&bind(&at.join("0/sub"), "bind"))
            .unwrap();
        shared
            .check_bind_source(&bind(&at.join("1"), "bind"))
            .unwrap();
        shared
            .check_bind_source(&bind(&at.join("9"), "bind"))
            .unwrap();
        // Outside the share: not this check's business.
        shared
            .check_bind_source(&bind(Path::new("/etc"), "bind"))
            .unwrap();
        for link in [at.join("2"), at.join("3/x")] {
            let e = shared.check_bind_source(&bind(&link, "none")).unwrap_err();
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
    }
}
