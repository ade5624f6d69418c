//! PID 1 duties in the VM before listening: the pseudo filesystems.

use std::path::Path;

use nix::mount::{MsFlags, mount};
use thiserror::Error;

/// Errors of the early mounts.
#[derive(Debug, Error)]
#[error("cannot mount {fs_type} on {target}: {source}")]
pub struct InitError {
    /// Filesystem type.
    pub fs_type: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// Cause.
    pub source: nix::Error,
}

const EARLY_MOUNTS: &[(&str, &str, &str, Option<&str>)] = &[
    ("proc", "/proc", "proc", None),
    ("sysfs", "/sys", "sysfs", None),
    ("devtmpfs", "/dev", "devtmpfs", Some("mode=0755")),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ),
    ("tmpfs", "/run", "tmpfs", Some("mode=0755")),
];

/// Mounts proc, sys, dev (devtmpfs), dev/pts and run. An already mounted
/// filesystem (EBUSY) is fine.
pub fn mount_pseudo_filesystems() -> Result<(), InitError> {
    for &(source, target, fs_type, data) in EARLY_MOUNTS {
        let _ = std::fs::create_dir_all(target);
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        match mount(Some(source), Path::new(target), Some(fs_type), flags, data) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(InitError {
                    fs_type,
                    target,
                    source,
                });
            }
        }
    }
    Ok(())
}
