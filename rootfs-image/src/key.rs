//! The cache key of a rootfs: from its overlay lower layers when it is an overlay with nothing
//! in its upper layer, else from a signature of every entry's metadata. Never reads file data.

use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::mountinfo::{self, OverlayLayers};
use crate::{ImageError, KeyKind, WalkLimits};

/// Bumped whenever what goes into a key, or how an image is built from a tree, changes.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// What every key covers besides the tree: the tool and how it is run.
#[derive(Debug)]
pub(crate) struct KeyInputs<'a> {
    /// mkfs.erofs's version line.
    pub tool_version: &'a str,
    /// The options it is run with.
    pub mkfs_args: &'a [&'a str],
}

/// A key is 64 lowercase hex digits (SHA-256).
pub(crate) fn is_valid_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn put_bytes(h: &mut Sha256, b: &[u8]) {
    h.update((b.len() as u64).to_le_bytes());
    h.update(b);
}

fn base_hasher(kind: KeyKind, inputs: &KeyInputs<'_>) -> Sha256 {
    let mut h = Sha256::new();
    h.update(b"kata-snap rootfs-image key\0");
    h.update(FORMAT_VERSION.to_le_bytes());
    h.update([match kind {
        KeyKind::Overlay => b'O',
        KeyKind::TreeSignature => b'T',
    }]);
    put_bytes(&mut h, inputs.tool_version.as_bytes());
    h.update((inputs.mkfs_args.len() as u64).to_le_bytes());
    for a in inputs.mkfs_args {
        put_bytes(&mut h, a.as_bytes());
    }
    h
}

fn hex(h: Sha256) -> String {
    use std::fmt::Write;
    h.finalize()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Why a rootfs is not keyed by its overlay layers (logged, then the tree signature is used).
pub(crate) type Fallback = String;

/// The overlay key of `rootfs` (canonical path; `root` its metadata), or why there is none.
pub(crate) fn overlay_key(
    rootfs: &Path,
    root: &Metadata,
    inputs: &KeyInputs<'_>,
) -> Result<String, Fallback> {
    let table = match mountinfo::read_mountinfo() {
        Ok(Some(t)) => t,
        Ok(None) => return Err("mountinfo larger than the read limit".into()),
        Err(e) => return Err(format!("cannot read /proc/self/mountinfo: {e}")),
    };
    let mount = mountinfo::find_mount(&table, rootfs).ok_or("not a mount point")?;
    if mount.fstype != "overlay" {
        return Err(format!("a {:?} mount, not overlay", mount.fstype));
    }
    if mount
        .mount_options
        .as_bytes()
        .split(|&b| b == b',')
        .any(|o| o == b"idmapped")
    {
        // The id mapping is not shown; the layers alone do not say which uids are seen.
        return Err("an idmapped mount".into());
    }
    let layers = mountinfo::overlay_layers(&mount.super_options);
    layers_key(&layers, &mount.mount_options, root, inputs)
}

/// The key of an overlay with these layers, or why there is none.
pub(crate) fn layers_key(
    layers: &OverlayLayers,
    mount_options: &OsString,
    root: &Metadata,
    inputs: &KeyInputs<'_>,
) -> Result<String, Fallback> {
    if layers.lower.is_empty() {
        return Err("overlay without lower layers".into());
    }
    if !mountinfo::all_absolute(layers) {
        return Err("overlay layer given as a relative path".into());
    }
    if let Some(upper) = &layers.upper {
        match std::fs::read_dir(upper) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(format!("upper dir {} is not empty", upper.display()));
                }
            }
            Err(e) => return Err(format!("cannot read upper dir {}: {e}", upper.display())),
        }
    }
    let mut h = base_hasher(KeyKind::Overlay, inputs);
    put_bytes(&mut h, mount_options.as_bytes());
    h.update((layers.other.len() as u64).to_le_bytes());
    for o in &layers.other {
        put_bytes(&mut h, o.as_bytes());
    }
    // The merged root takes its mode and owner from the (empty) upper root: cover them. Not its
    // times, which differ per container and would defeat sharing an image between containers.
    h.update(root.mode().to_le_bytes());
    h.update(root.uid().to_le_bytes());
    h.update(root.gid().to_le_bytes());
    for (tag, list) in [(b'L', &layers.lower), (b'D', &layers.data)] {
        for layer in list {
            let md = std::fs::metadata(layer)
                .map_err(|e| format!("cannot stat lower layer {}: {e}", layer.display()))?;
            h.update([tag]);
            put_bytes(&mut h, layer.as_os_str().as_bytes());
            h.update(md.dev().to_le_bytes());
            h.update(md.ino().to_le_bytes());
            h.update(md.ctime().to_le_bytes());
            h.update(md.ctime_nsec().to_le_bytes());
        }
    }
    Ok(hex(h))
}

/// Computes the tree signature of `root`: every entry's metadata, in sorted order, no data.
pub(crate) fn tree_signature(
    root: &Path,
    root_md: &Metadata,
    inputs: &KeyInputs<'_>,
    limits: &WalkLimits,
) -> Result<(String, u64), ImageError> {
    let mut w = Walker {
        h: base_hasher(KeyKind::TreeSignature, inputs),
        root,
        limits,
        entries: 0,
    };
    let mut full = root.to_path_buf();
    let mut rel = Vec::with_capacity(256);
    w.entry(&rel, &full, root_md)?;
    w.dir(&mut full, &mut rel, 0)?;
    Ok((hex(w.h), w.entries))
}

struct Walker<'a> {
    h: Sha256,
    root: &'a Path,
    limits: &'a WalkLimits,
    entries: u64,
}

impl Walker<'_> {
    fn too_large(&self) -> ImageError {
        ImageError::TreeTooLarge {
            path: self.root.to_path_buf(),
            limit: self.limits.max_entries,
        }
    }

    /// Hashes one entry: where it is and everything `lstat` says that mkfs.erofs carries over
    /// (or that changes when the data does: ctime), plus a symlink's target.
    fn entry(&mut self, rel: &[u8], full: &Path, md: &Metadata) -> Result<(), ImageError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(self.too_large());
        }
        let mut rec = [0u8; 4 * 3 + 8 * 8];
        let fields32 = [md.mode(), md.uid(), md.gid()];
        let fields64 = [
            md.size(),
            md.mtime() as u64,
            md.mtime_nsec() as u64,
            md.ctime() as u64,
            md.ctime_nsec() as u64,
            md.ino(),
            md.rdev(),
            md.nlink(),
        ];
        for (i, v) in fields32.iter().enumerate() {
            rec[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        for (i, v) in fields64.iter().enumerate() {
            rec[12 + i * 8..12 + i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        put_bytes(&mut self.h, rel);
        self.h.update(rec);
        if md.file_type().is_symlink() {
            let target = std::fs::read_link(full).map_err(|source| ImageError::Walk {
                path: full.to_path_buf(),
                source,
            })?;
            put_bytes(&mut self.h, target.as_os_str().as_bytes());
        }
        Ok(())
    }

    /// Hashes the entries of directory `full` (at `rel`), then recurses into its subdirectories.
    /// Each directory is read whole and closed before going down, so the walk holds one open
    /// directory at a time however deep the tree.
    fn dir(
        &mut self,
        full: &mut PathBuf,
        rel: &mut Vec<u8>,
        depth: usize,
    ) -> Result<(), ImageError> {
        if depth > self.limits.max_depth {
            return Err(ImageError::TreeTooDeep {
                path: full.clone(),
                limit: self.limits.max_depth,
            });
        }
        let walk_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Walk { path, source }
        };
        let mut list: Vec<(OsString, Metadata)> = Vec::new();
        for entry in std::fs::read_dir(&*full).map_err(walk_err(full))? {
            let entry = entry.map_err(walk_err(full))?;
            // lstat, relative to the open directory (fstatat with AT_SYMLINK_NOFOLLOW).
            let md = entry.metadata().map_err(walk_err(&entry.path()))?;
            list.push((entry.file_name(), md));
            if self.entries + list.len() as u64 > self.limits.max_entries {
                return Err(self.too_large());
            }
        }
        list.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (name, md) in list {
            let len = rel.len();
            rel.push(b'/');
            rel.extend_from_slice(name.as_bytes());
            full.push(&name);
            let result = self.entry(rel, full, &md).and_then(|()| {
                if md.is_dir() {
                    self.dir(full, rel, depth + 1)
                } else {
                    Ok(())
                }
            });
            full.pop();
            rel.truncate(len);
            result?;
        }
        Ok(())
    }
}
