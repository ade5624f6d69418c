//! Pre-loaded pool shells: a shell that has loaded a template's guest state before any client
//! asked for it (guest memory mapped and its working set installed, interrupt controllers, PIT,
//! device slots with their ioeventfds and irqfds, vCPU state: [`vmm::vm::VmShell::preload`]), so
//! a claim only attaches the clone's host resources (console, spare disk slot, vsock socket,
//! control socket) and starts the vCPUs.
//!
//! Which template a pool pre-loads is `preload.json` in the pool directory: written by
//! `pool start --template DIR`, or by a client that found no pre-loaded shell for its restore
//! (so a pool running beside the container runtime learns the runtime's template from its first
//! use). A template is known by its *key*: its path, memory mode and fault-around, and the
//! identity (device, inode, size, mtime, ctime) of its `state` and `memory` files and, in the
//! prefetching modes, of its `workingset`. A template that is replaced, re-warmed or gets a
//! working set has another key: the manager retires the shells of the old one (it removes their
//! ready sockets, which no client can then claim, and they exit), and clients only claim shells
//! whose socket names their restore's key (`t<KEY>-v<VCPUS>-m<MIB>-<PID>.sock`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::restore_cmd::{ModeArg, RestoreArgs};

/// The file naming the template a pool pre-loads.
const WANTED: &str = "preload.json";

/// A template to pre-load: what of a restore's arguments its guest state depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wanted {
    /// The snapshot directory (absolute).
    pub snapshot: PathBuf,
    /// The memory mode.
    pub mode: ModeArg,
    /// Pages per fault in the uffd modes.
    pub fault_around: u64,
}

impl Wanted {
    /// The template `args` restore, when such a restore can be pre-loaded (a restore that
    /// records its working set cannot: the recording starts with the guest).
    pub fn of(args: &RestoreArgs) -> Option<Self> {
        if args.record_workingset.is_some() {
            return None;
        }
        Some(Self {
            snapshot: std::path::absolute(&args.snapshot).ok()?,
            mode: args.mode,
            fault_around: args.fault_around,
        })
    }

    /// The template's key as its files are now; `None` when one is missing (nothing to
    /// pre-load: the restore reports what is wrong).
    pub fn key(&self) -> Option<String> {
        self.key_in(&self.snapshot)
    }

    /// The key, with the template's files looked at in `files` (where a jailed shell sees the
    /// snapshot directory): the same files give the same key.
    pub fn key_in(&self, files: &Path) -> Option<String> {
        let mut h = Sha256::new();
        h.update(self.snapshot.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(format!("{:?}/{}", self.mode, self.fault_around));
        let prefetch = matches!(self.mode, ModeArg::UffdPrefetch | ModeArg::MmapPrefetch);
        let names: &[&str] = if prefetch {
            &["state", "memory", "workingset"]
        } else {
            &["state", "memory"]
        };
        for f in names {
            let m = std::fs::symlink_metadata(files.join(f)).ok()?;
            for v in [
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime() as u64,
                m.mtime_nsec() as u64,
                m.ctime() as u64,
                m.ctime_nsec() as u64,
            ] {
                h.update(v.to_le_bytes());
            }
        }
        let digest = h.finalize();
        Some(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// The prefix of the ready sockets of shells that pre-loaded the template of key `key`.
pub fn socket_prefix(key: &str) -> String {
    format!("t{key}-")
}

/// The template the pool in `dir` pre-loads, if one is named.
pub fn wanted(dir: &Path) -> Option<Wanted> {
    let text = crate::oci::read_small_file(&dir.join(WANTED), 64 << 10).ok()?;
    serde_json::from_str(&text).ok()
}

/// Names `w` as the template the pool in `dir` pre-loads (unless it is already).
///
/// Written to a temporary name and renamed (a reader sees the old file or the new one) but not
/// fsynced: it is a hint that a crash may lose at the cost of one pre-load, in a directory that
/// is normally a tmpfs, and a client writes it on its restore's path.
pub fn want(dir: &Path, w: &Wanted) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if wanted(dir).as_ref() == Some(w) {
        return Ok(());
    }
    let tmp = dir.join(format!(".{WANTED}.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(w)?)?;
        std::fs::rename(&tmp, dir.join(WANTED))
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::from(e).context(format!("cannot write {}", dir.join(WANTED).display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(snapshot: &Path, mode: ModeArg) -> RestoreArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            a: RestoreArgs,
        }
        let mut a = P::parse_from(["x", "--snapshot", "/"]).a;
        a.snapshot = snapshot.to_path_buf();
        a.mode = mode;
        a
    }

    #[test]
    fn test_key_changes_with_the_template_files_and_mode() {
        let d = tempfile::tempdir().unwrap();
        for f in ["state", "memory"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let w = Wanted::of(&args(d.path(), ModeArg::Mmap)).unwrap();
        let k = w.key().unwrap();
        assert_eq!(w.key().unwrap(), k, "the same files give the same key");
        // Another mode is another template.
        let u = Wanted::of(&args(d.path(), ModeArg::Uffd)).unwrap();
        assert_ne!(u.key().unwrap(), k);
        // A prefetching mode needs the working set.
        let p = Wanted::of(&args(d.path(), ModeArg::MmapPrefetch)).unwrap();
        assert_eq!(p.key(), None);
        std::fs::write(d.path().join("workingset"), b"w").unwrap();
        assert!(p.key().is_some());
        // A replaced memory file (a re-warmed template) changes the key.
        let tmp = d.path().join("memory.new");
        std::fs::write(&tmp, b"x").unwrap();
        std::fs::rename(&tmp, d.path().join("memory")).unwrap();
        assert_ne!(w.key().unwrap(), k);
    }

    #[test]
    fn test_a_recording_restore_is_not_preloadable() {
        let d = tempfile::tempdir().unwrap();
        let mut a = args(d.path(), ModeArg::Uffd);
        a.record_workingset = Some(d.path().join("ws"));
        assert_eq!(Wanted::of(&a), None);
    }

    #[test]
    fn test_want_writes_once_and_reads_back() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(wanted(d.path()), None);
        let w = Wanted::of(&args(d.path(), ModeArg::Mmap)).unwrap();
        want(d.path(), &w).unwrap();
        assert_eq!(wanted(d.path()), Some(w.clone()));
        let before = std::fs::metadata(d.path().join(WANTED)).unwrap().ino();
        want(d.path(), &w).unwrap();
        let after = std::fs::metadata(d.path().join(WANTED)).unwrap().ino();
        assert_eq!(before, after, "an unchanged template is not written again");
    }
}
