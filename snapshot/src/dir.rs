//! The snapshot directory: written to a temporary name, fsynced, renamed into place.
//!
//! A crash or a full disk while writing leaves only `.<name>.tmp-<pid>` behind, never something
//! that looks like a snapshot; the next snapshot written into the same directory removes such
//! leftovers whose writer process is gone ([`remove_stale_temporaries`]). An existing snapshot is
//! never overwritten.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// Name of the state file.
pub const STATE_FILE: &str = "state";
/// Name of the memory file.
pub const MEMORY_FILE: &str = "memory";
/// Name of the working-set file.
pub const WORKINGSET_FILE: &str = "workingset";

/// Errors creating or opening a snapshot directory.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The destination exists.
    #[error("{0} already exists: choose another path or remove it first")]
    Exists(PathBuf),
    /// The snapshot directory or one of its files is missing.
    #[error("{path} is not a snapshot: {what} is missing")]
    Missing {
        /// The directory.
        path: PathBuf,
        /// What is missing.
        what: &'static str,
    },
    /// A snapshot file is a FIFO, a device or a directory.
    #[error("{path} is not a regular file: refused", path = .path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// I/O failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DirError {
    let path = path.to_path_buf();
    move |source| DirError::Io { what, path, source }
}

/// Whether process `pid` exists. Asked with `pidfd_open`, not `kill(pid, 0)`: the VMM loop that
/// writes snapshots may not signal processes (its seccomp list has no `kill`), and a pidfd it
/// cannot use to signal either (no `pidfd_send_signal`) is closed at once.
fn process_alive(pid: i32) -> bool {
    // SAFETY: pidfd_open(2) takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        // SAFETY: closing the fd just returned to us.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The writer's pid in a temporary name `.<name>.tmp-<pid>`.
fn temporary_owner(name: &str) -> Option<i32> {
    let (head, pid) = name.rsplit_once(".tmp-")?;
    if !head.starts_with('.') || head.len() < 2 {
        return None;
    }
    pid.parse().ok().filter(|&p: &i32| p > 0)
}

/// Removes the temporary snapshot directories and files (`.<name>.tmp-<pid>`) in `parent` whose
/// writer process no longer exists (killed while writing). Returns how many were removed.
pub fn remove_stale_temporaries(parent: &Path) -> usize {
    let Ok(entries) = fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temporary_owner) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        match gone {
            Ok(()) => {
                tracing::info!("removed {} left by a writer that died", path.display());
                removed += 1;
            }
            Err(e) => tracing::warn!("cannot remove stale {}: {e}", path.display()),
        }
    }
    removed
}

/// A snapshot being written.
#[derive(Debug)]
pub struct SnapshotWriter {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl SnapshotWriter {
    /// Starts a snapshot that will become `dest`.
    pub fn create(dest: &Path) -> Result<Self, DirError> {
        if dest.exists() {
            return Err(DirError::Exists(dest.to_path_buf()));
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshot".into());
        let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        remove_stale_temporaries(parent);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io("cannot remove stale", &tmp))?;
        }
        fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
        // A new directory (mkdir fails on anything in its place, a planted link included).
        fs::create_dir(&tmp).map_err(io("cannot create", &tmp))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            done: false,
        })
    }

    /// Path of a file inside the snapshot being written.
    pub fn path(&self, file: &str) -> PathBuf {
        self.tmp.join(file)
    }

    /// fsyncs every file and the directory, then renames it into place and fsyncs the parent.
    pub fn commit(mut self) -> Result<PathBuf, DirError> {
        for entry in fs::read_dir(&self.tmp).map_err(io("cannot list", &self.tmp))? {
            let p = entry.map_err(io("cannot list", &self.tmp))?.path();
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io("cannot fsync", &p))?;
        }
        File::open(&self.tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot fsync", &self.tmp))?;
        if self.dest.exists() {
            return Err(DirError::Exists(self.dest.clone()));
        }
        fs::rename(&self.tmp, &self.dest).map_err(io("cannot rename into", &self.dest))?;
        let parent = self
            .dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot fsync", parent))?;
        self.done = true;
        Ok(self.dest.clone())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// The files of an existing snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    /// The directory.
    pub path: PathBuf,
}

impl SnapshotDir {
    /// Opens a snapshot directory, checking its required files exist.
    pub fn open(path: &Path) -> Result<Self, DirError> {
        if !path.is_dir() {
            return Err(DirError::Missing {
                path: path.to_path_buf(),
                what: "the directory",
            });
        }
        for (file, what) in [
            (STATE_FILE, "the state file"),
            (MEMORY_FILE, "the memory file"),
        ] {
            match fs::metadata(path.join(file)) {
                Ok(m) if m.is_file() => {}
                Ok(_) => {
                    return Err(DirError::NotRegular {
                        path: path.join(file),
                    });
                }
                Err(_) => {
                    return Err(DirError::Missing {
                        path: path.to_path_buf(),
                        what,
                    });
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// The state file.
    pub fn state(&self) -> PathBuf {
        self.path.join(STATE_FILE)
    }

    /// The memory file.
    pub fn memory(&self) -> PathBuf {
        self.path.join(MEMORY_FILE)
    }

    /// The working-set file (may not exist).
    pub fn workingset(&self) -> PathBuf {
        self.path.join(WORKINGSET_FILE)
    }
}

/// A snapshot's files opened by someone who may open them, for a process that may not (a jailed
/// pool shell gets them over a Unix socket): the state and memory files and, when there is one,
/// the working set. Each is a regular file, opened read-only.
#[derive(Debug)]
pub struct SnapshotFiles {
    /// The state file.
    pub state: File,
    /// The memory file.
    pub memory: File,
    /// The working set, if the snapshot has one.
    pub workingset: Option<File>,
}

impl SnapshotFiles {
    /// Opens the files of the snapshot in `dir` (not following a symbolic link to a FIFO or a
    /// device: each must be a regular file).
    pub fn open(dir: &Path) -> Result<Self, DirError> {
        let snap = SnapshotDir::open(dir)?;
        let open = |path: PathBuf| {
            crate::file::open_regular(&path).map_err(|source| match source.kind() {
                std::io::ErrorKind::InvalidInput => DirError::NotRegular { path },
                _ => DirError::Io {
                    what: "cannot open",
                    path,
                    source,
                },
            })
        };
        let workingset = match open(snap.workingset()) {
            Ok(f) => Some(f),
            Err(DirError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            state: open(snap.state())?,
            memory: open(snap.memory())?,
            workingset,
        })
    }

    /// Checks that each file is a regular file (files received from another process), naming
    /// the snapshot `dir` in the error.
    pub fn check(&self, dir: &Path) -> Result<(), DirError> {
        let files = [
            (Some(&self.state), STATE_FILE),
            (Some(&self.memory), MEMORY_FILE),
            (self.workingset.as_ref(), WORKINGSET_FILE),
        ];
        for (f, name) in files {
            let Some(f) = f else { continue };
            let m = f.metadata().map_err(io("cannot stat", &dir.join(name)))?;
            if !m.is_file() {
                return Err(DirError::NotRegular {
                    path: dir.join(name),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_writer_commit_renames_and_refuses_existing() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("snap");
        let w = SnapshotWriter::create(&dest).unwrap();
        fs::write(w.path(STATE_FILE), b"s").unwrap();
        fs::write(w.path(MEMORY_FILE), b"m").unwrap();
        assert!(!dest.exists(), "nothing appears before commit");
        w.commit().unwrap();
        let d = SnapshotDir::open(&dest).unwrap();
        assert_eq!(fs::read(d.state()).unwrap(), b"s");
        assert!(matches!(
            SnapshotWriter::create(&dest),
            Err(DirError::Exists(_))
        ));
    }

    #[test]
    fn test_writer_dropped_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("snap");
        {
            let w = SnapshotWriter::create(&dest).unwrap();
            fs::write(w.path(STATE_FILE), b"partial").unwrap();
        }
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn test_writer_removes_temporaries_of_dead_writers_only() {
        let root = tempfile::tempdir().unwrap();
        // A writer that was killed: its pid is reaped, so no process has it.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = root.path().join(format!(".old.tmp-{dead}"));
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join(MEMORY_FILE), vec![1u8; 4096]).unwrap();
        let stale_file = root.path().join(format!(".workingset.tmp-{dead}"));
        fs::write(&stale_file, b"x").unwrap();
        // A live writer's (pid 1 always exists) and unrelated names stay.
        let live = root.path().join(".other.tmp-1");
        fs::create_dir(&live).unwrap();
        let unrelated = root.path().join("keep.tmp-x");
        fs::write(&unrelated, b"k").unwrap();
        let w = SnapshotWriter::create(&root.path().join("snap")).unwrap();
        fs::write(w.path(STATE_FILE), b"s").unwrap();
        w.commit().unwrap();
        assert!(!stale.exists(), "the dead writer's directory is removed");
        assert!(!stale_file.exists());
        assert!(live.exists(), "a live writer's directory stays");
        assert!(unrelated.exists());
        assert!(root.path().join("snap").join(STATE_FILE).exists());
    }

    #[test]
    fn test_open_missing_files_are_named() {
        let root = tempfile::tempdir().unwrap();
        let err = SnapshotDir::open(&root.path().join("nope")).unwrap_err();
        assert!(
            err.to_string().contains("the directory is missing"),
            "{err}"
        );
        fs::write(root.path().join(STATE_FILE), b"").unwrap();
        let err = SnapshotDir::open(root.path()).unwrap_err();
        assert!(
            err.to_string().contains("the memory file is missing"),
            "{err}"
        );
    }
}
