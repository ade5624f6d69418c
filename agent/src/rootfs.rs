//! The container's root filesystem: a read-only lower layer (a block device
//! image in the VM, a directory in the harness) under a writable overlay whose
//! upper and work directories live on a tmpfs.
//!
//! Layout under the state directory, per container:
//!
//! ```text
//! <state>/c<N>/lower    the mounted image (block device case)
//! <state>/c<N>/rw       tmpfs holding upper/ and work/
//! <state>/c<N>/rootfs   the overlay
//! ```
//!
//! A read-only root (`root.readonly`) is the same overlay, made read-only
//! by [`PreparedRootfs::seal`] once the OCI mounts are applied: mount points
//! missing from the image are created in the overlay's upper layer (as runc
//! creates them), then the root's mount is remounted read-only, so the
//! container sees a read-only root while its mounts keep their own flags.

use std::fs;
use std::path::{Path, PathBuf};

use agent_protocol::{FsType, RootfsSource, RootfsSpec};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use thiserror::Error;

/// Errors of preparing the rootfs.
#[derive(Debug, Error)]
pub enum RootfsError {
    /// A directory could not be created.
    #[error("cannot create {path}: {source}")]
    Mkdir {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The rootfs directory does not exist.
    #[error("rootfs directory {0} does not exist")]
    NoDirectory(String),
    /// No filesystem type could mount the block device.
    #[error("cannot mount rootfs device {device} read-only as {tried}: {source}")]
    Device {
        /// Device path.
        device: String,
        /// Types tried.
        tried: String,
        /// Last error.
        source: nix::Error,
    },
    /// A path cannot be given to overlayfs (it contains ',' or ':').
    #[error("path {0} cannot be used in overlay options (contains ',' or ':')")]
    OverlayPath(PathBuf),
    /// A mount failed.
    #[error("cannot mount {what} at {path}: {source}")]
    Mount {
        /// What was mounted.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        source: nix::Error,
    },
}

/// A prepared rootfs; [`PreparedRootfs::teardown`] unmounts it.
#[derive(Debug)]
pub struct PreparedRootfs {
    /// The directory the container is chrooted into.
    pub root: PathBuf,
    mounts: Vec<PathBuf>,
    readonly: bool,
}

fn mkdir(path: &Path) -> Result<(), RootfsError> {
    fs::create_dir_all(path).map_err(|source| RootfsError::Mkdir {
        path: path.into(),
        source,
    })
}

fn overlay_safe(p: &Path) -> Result<&str, RootfsError> {
    match p.to_str() {
        Some(s) if !s.contains([',', ':']) => Ok(s),
        _ => Err(RootfsError::OverlayPath(p.into())),
    }
}

fn mount_device(device: &str, fs: Option<FsType>, target: &Path) -> Result<(), RootfsError> {
    let candidates: &[FsType] = match &fs {
        Some(f) => std::slice::from_ref(f),
        None => &[FsType::Erofs, FsType::Ext4],
    };
    let mut last = nix::Error::EINVAL;
    for f in candidates {
        match mount(
            Some(device),
            target,
            Some(f.as_str()),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            Ok(()) => {
                tracing::info!(device, fs = f.as_str(), "rootfs image mounted read-only");
                return Ok(());
            }
            Err(e) => last = e,
        }
    }
    let tried = candidates
        .iter()
        .map(|f| f.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    Err(RootfsError::Device {
        device: device.into(),
        tried,
        source: last,
    })
}

/// Mounts the rootfs for container number `id` under `state_dir`.
pub fn prepare(
    state_dir: &Path,
    id: u64,
    spec: &RootfsSpec,
) -> Result<PreparedRootfs, RootfsError> {
    let base = state_dir.join(format!("c{id}"));
    let root = base.join("rootfs");
    mkdir(&root)?;
    let mut prepared = PreparedRootfs {
        root: root.clone(),
        mounts: Vec::new(),
        readonly: spec.readonly,
    };
    match mount_layers(&mut prepared, &base, spec) {
        Ok(()) => Ok(prepared),
        Err(e) => {
            // Nothing half-mounted is left behind.
            prepared.teardown();
            Err(e)
        }
    }
}

/// The lower layer, the overlay's tmpfs and the overlay, each recorded in
/// `prepared` as soon as it is mounted.
fn mount_layers(
    prepared: &mut PreparedRootfs,
    base: &Path,
    spec: &RootfsSpec,
) -> Result<(), RootfsError> {
    let root = prepared.root.clone();
    let lower = match &spec.source {
        RootfsSource::Block { device, fs } => {
            let lower = base.join("lower");
            mkdir(&lower)?;
            mount_device(device, *fs, &lower)?;
            prepared.mounts.push(lower.clone());
            lower
        }
        RootfsSource::Directory { path } => {
            let p = PathBuf::from(path);
            if !p.is_dir() {
                return Err(RootfsError::NoDirectory(path.clone()));
            }
            p
        }
    };
    let err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| RootfsError::Mount { what, path, source }
    };
    let rw = base.join("rw");
    mkdir(&rw)?;
    mount(
        Some("tmpfs"),
        &rw,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(err("overlay tmpfs", &rw))?;
    prepared.mounts.push(rw.clone());
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    mkdir(&upper)?;
    mkdir(&work)?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        overlay_safe(&lower)?,
        overlay_safe(&upper)?,
        overlay_safe(&work)?
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(err("overlay", &root))?;
    prepared.mounts.push(root);
    Ok(())
}

impl PreparedRootfs {
    /// Makes the root read-only when the spec asks for it; call after the
    /// OCI mounts and the default devices are in place. The remount only
    /// changes the root's own mount: the mounts under it keep their flags.
    pub fn seal(&self) -> Result<(), RootfsError> {
        if !self.readonly {
            return Ok(());
        }
        mount(
            None::<&str>,
            &self.root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|source| RootfsError::Mount {
            what: "read-only remount",
            path: self.root.clone(),
            source,
        })
    }

    /// Lazily unmounts everything under the rootfs and the rootfs itself.
    pub fn teardown(self) {
        // The container's own mounts sit under root; MNT_DETACH takes them
        // with it.
        for m in self.mounts.iter().rev() {
            if let Err(e) = umount2(m, MntFlags::MNT_DETACH) {
                tracing::warn!(path = %m.display(), error = %e, "unmount failed");
            }
        }
    }
}
