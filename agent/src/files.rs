//! The files a `Create` carries (`RunRequest::files`): copies of the host
//! files Docker binds on `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`,
//! written into the container's root after its mounts and before its process
//! runs (and before a read-only root is sealed).
//!
//! Each path is resolved in the root as a mount destination is
//! ([`resolve_in_rootfs`]: a symbolic link is followed as the container sees
//! it, never out of the root); the last component is opened without following
//! a link, created if missing (its directory must exist), and must be a
//! regular file. It is then owned by root, given the request's mode and, when
//! `read_only`, bound read-only onto itself (as runc makes a `ro` bind).

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agent_protocol::FileContent;
use thiserror::Error;

use crate::mounts::{MountError, apply_readonly_paths, resolve_in_rootfs};

/// Why a file could not be written in the container.
#[derive(Debug, Error)]
pub enum FileError {
    /// The path cannot be resolved in the root (a symbolic link loop).
    #[error("cannot write file {path}: {source}")]
    Resolve {
        /// The container path.
        path: String,
        /// Cause.
        source: MountError,
    },
    /// Opening, writing or changing the file failed.
    #[error("cannot write file {path} (at {}): {step}: {source}", at.display())]
    Io {
        /// The container path.
        path: String,
        /// Where it resolved to in the agent's view.
        at: PathBuf,
        /// What was being done.
        step: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The path exists and is not a regular file.
    #[error("cannot write file {path}: it exists and is not a regular file")]
    NotRegular {
        /// The container path.
        path: String,
    },
    /// The read-only bind failed.
    #[error("cannot make file {path} read-only: {source}")]
    ReadOnly {
        /// The container path.
        path: String,
        /// Cause.
        source: MountError,
    },
}

/// Writes every file of `files` under `rootfs`, in order; stops at the first
/// failure (what was written before stays: the caller tears the root down).
pub fn write_files(rootfs: &Path, files: &[FileContent]) -> Result<(), FileError> {
    for f in files {
        write_one(rootfs, f)?;
        tracing::debug!(path = %f.path, bytes = f.content.len(), read_only = f.read_only, "file written");
    }
    Ok(())
}

fn write_one(rootfs: &Path, f: &FileContent) -> Result<(), FileError> {
    let target = resolve_in_rootfs(rootfs, &f.path).map_err(|source| FileError::Resolve {
        path: f.path.clone(),
        source,
    })?;
    let io = |step| {
        let (path, at) = (f.path.clone(), target.clone());
        move |source| FileError::Io {
            path,
            at,
            step,
            source,
        }
    };
    // A missing directory on the way is made, as runc makes a bind mount's
    // destination (an image whose /etc/resolv.conf links into a /run/... it
    // does not ship): `target` is resolved inside the root already.
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io("create its directory"))?;
    }
    // O_NOFOLLOW: the last component was resolved, a link made since is not
    // followed. O_NONBLOCK: a FIFO there does not hang the agent (opening one
    // for writing without a reader fails with ENXIO instead). O_NOCTTY: a
    // terminal there does not become the agent's.
    let mut file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc_flags())
        .open(&target)
        .map_err(|e| match e.raw_os_error() {
            // A directory, or a FIFO without a reader: not a file to write.
            Some(errno)
                if errno == nix::errno::Errno::EISDIR as i32
                    || errno == nix::errno::Errno::ENXIO as i32 =>
            {
                FileError::NotRegular {
                    path: f.path.clone(),
                }
            }
            _ => io("open")(e),
        })?;
    let meta = file.metadata().map_err(io("fstat"))?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: f.path.clone(),
        });
    }
    file.set_len(0).map_err(io("truncate"))?;
    file.write_all(&f.content).map_err(io("write"))?;
    // Owner first: chown clears the setuid and setgid bits chmod then sets.
    std::os::unix::fs::fchown(&file, Some(0), Some(0)).map_err(io("chown to root"))?;
    file.set_permissions(Permissions::from_mode(f.mode))
        .map_err(io("chmod"))?;
    drop(file);
    if f.read_only {
        apply_readonly_paths(rootfs, std::slice::from_ref(&f.path)).map_err(|source| {
            FileError::ReadOnly {
                path: f.path.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

fn libc_flags() -> i32 {
    use nix::fcntl::OFlag;
    (OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).bits()
}
