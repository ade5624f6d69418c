//! Opening a disk image with the lock QEMU and Cloud Hypervisor take: one writer or many readers.
//!
//! A read-write image gets an exclusive `flock`, a read-only one a shared `flock`, both without
//! waiting. A second writer (another `--disk` on the same image, or another VM) is refused, and so
//! is a reader while a writer has it, or a writer while readers do. The lock belongs to the open
//! file: it goes when the device's file is closed, at the latest when the VMM exits.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Why a disk image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenImageError {
    /// Opening failed (missing, permissions, a directory for read-write, ...).
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another disk or VM holds a conflicting lock.
    #[error(
        "disk image {} is in use by another disk or VM ({})",
        path.display(),
        if *read_only { "it has the image open read-write" } else { "it has the image open" }
    )]
    InUse {
        /// The image.
        path: PathBuf,
        /// This open asked for read-only (shared) access.
        read_only: bool,
    },
    /// Locking failed for another reason.
    #[error("cannot lock disk image {}", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Opens the disk image at `path` (read-write unless `read_only`) and locks it: exclusively for
/// read-write, shared for read-only. Never waits for a lock.
pub fn open_image(path: &Path, read_only: bool) -> Result<File, OpenImageError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| OpenImageError::Open {
            path: path.to_owned(),
            source,
        })?;
    lock_image(file, path, read_only)
}

/// Locks the disk image `file` that another process opened (`path` names it in errors) as
/// [`open_image`] does, after checking it is a regular file or a block device opened read-write
/// for a read-write disk, read-only for a read-only one (no more access than the disk needs).
pub fn lock_image(file: File, path: &Path, read_only: bool) -> Result<File, OpenImageError> {
    let refused = |why: &str| OpenImageError::Open {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string()),
    };
    let ft = file
        .metadata()
        .map_err(|source| OpenImageError::Open {
            path: path.to_owned(),
            source,
        })?
        .file_type();
    {
        use std::os::unix::fs::FileTypeExt;
        if !ft.is_file() && !ft.is_block_device() {
            return Err(refused("not a regular file or a block device"));
        }
    }
    // SAFETY: F_GETFL on an fd this function owns; no memory is passed.
    let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETFL) };
    let writable = flags >= 0 && flags & libc::O_ACCMODE == libc::O_RDWR;
    let readable = flags >= 0 && flags & libc::O_ACCMODE != libc::O_WRONLY;
    if !readable || writable == read_only {
        return Err(refused(if read_only {
            "opened writable for a read-only disk"
        } else {
            "not opened read-write for a read-write disk"
        }));
    }
    let locked = if read_only {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match locked {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(OpenImageError::InUse {
            path: path.to_owned(),
            read_only,
        }),
        Err(TryLockError::Error(source)) => Err(OpenImageError::Lock {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        (dir, path)
    }

    #[test]
    fn test_open_image_second_writer_is_refused_naming_the_file() {
        let (_dir, path) = image();
        let _first = open_image(&path, false).unwrap();
        let err = open_image(&path, false).unwrap_err();
        assert!(matches!(&err, OpenImageError::InUse { path: p, read_only: false } if *p == path));
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("in use"), "{msg}");
    }

    #[test]
    fn test_open_image_two_readers_share_it() {
        let (_dir, path) = image();
        let _a = open_image(&path, true).unwrap();
        let _b = open_image(&path, true).unwrap();
    }

    #[test]
    fn test_open_image_reader_and_writer_exclude_each_other() {
        let (_dir, path) = image();
        let reader = open_image(&path, true).unwrap();
        assert!(matches!(
            open_image(&path, false),
            Err(OpenImageError::InUse {
                read_only: false,
                ..
            })
        ));
        drop(reader);
        let _writer = open_image(&path, false).unwrap();
        assert!(matches!(
            open_image(&path, true),
            Err(OpenImageError::InUse {
                read_only: true,
                ..
            })
        ));
    }

    #[test]
    fn test_open_image_lock_released_when_first_file_closed() {
        let (_dir, path) = image();
        let first = open_image(&path, false).unwrap();
        drop(first);
        let _second = open_image(&path, false).unwrap();
    }

    #[test]
    fn test_open_image_lock_survives_duplicated_fd_until_all_closed() {
        let (_dir, path) = image();
        let first = open_image(&path, false).unwrap();
        let dup = first.try_clone().unwrap();
        drop(first);
        assert!(
            open_image(&path, false).is_err(),
            "the duplicate still holds it"
        );
        drop(dup);
        assert!(open_image(&path, false).is_ok());
    }

    #[test]
    fn test_open_image_missing_file_error_has_cause_once() {
        let (dir, _) = image();
        let path = dir.path().join("none.img");
        let err = open_image(&path, true).unwrap_err();
        assert!(matches!(err, OpenImageError::Open { .. }));
        // The cause is the source, not repeated in the message.
        let msg = err.to_string();
        assert!(!msg.contains("No such file"), "{msg}");
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("No such file"), "{cause}");
    }
}
