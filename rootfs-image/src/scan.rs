//! What mkfs.erofs will read, measured before it runs: the file data (apparent sizes, a hard
//! link once) and the holes of sparse files. An uncompressed erofs image stores a hole as data,
//! so a 2 GiB sparse file with one page written would become a 2 GiB image (and take seconds to
//! read); the build refuses a rootfs whose holes pass a budget, and builds one with holes under it
//! in chunk mode, where every all-zero chunk is one shared block.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{ImageError, WalkLimits};

/// A file counts as sparse when this many bytes of it are holes.
pub(crate) const SPARSE_FILE_HOLES: u64 = 1 << 20;

/// What [`scan`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct TreeData {
    /// Bytes of regular-file data, by apparent size (what mkfs.erofs reads).
    pub data_bytes: u64,
    /// Bytes of holes in sparse files (apparent size less allocated blocks).
    pub hole_bytes: u64,
    /// The file with the most holes: (path, apparent size, allocated bytes).
    pub most_holes: Option<(PathBuf, u64, u64)>,
}

/// Walks `root` without following symlinks, bounded by `limits`.
pub(crate) fn scan(root: &Path, limits: &WalkLimits) -> Result<TreeData, ImageError> {
    let mut out = TreeData::default();
    let mut seen_links = HashSet::new();
    let mut entries = 0u64;
    let mut most = 0u64;
    // (directory, depth below the root)
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let walk_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Walk { path, source }
        };
        for entry in std::fs::read_dir(&dir).map_err(walk_err(&dir))? {
            let entry = entry.map_err(walk_err(&dir))?;
            entries += 1;
            if entries > limits.max_entries {
                return Err(ImageError::TreeTooLarge {
                    path: root.to_path_buf(),
                    limit: limits.max_entries,
                });
            }
            let path = entry.path();
            let md = std::fs::symlink_metadata(&path).map_err(walk_err(&path))?;
            if md.is_dir() {
                if depth + 1 > limits.max_depth {
                    return Err(ImageError::TreeTooDeep {
                        path,
                        limit: limits.max_depth,
                    });
                }
                stack.push((path, depth + 1));
                continue;
            }
            if !md.is_file() || (md.nlink() > 1 && !seen_links.insert((md.dev(), md.ino()))) {
                continue;
            }
            let size = md.size();
            let allocated = md.blocks().saturating_mul(512);
            out.data_bytes = out.data_bytes.saturating_add(size);
            let holes = size.saturating_sub(allocated);
            if holes >= SPARSE_FILE_HOLES {
                out.hole_bytes = out.hole_bytes.saturating_add(holes);
                if holes > most {
                    most = holes;
                    out.most_holes = Some((path, size, allocated));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_scan_counts_data_holes_and_hard_links_once() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/f"), vec![1u8; 10_000]).unwrap();
        std::fs::hard_link(r.join("a/f"), r.join("a/b/g")).unwrap();
        let sparse = std::fs::File::create(r.join("a/b/sparse")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::os::unix::fs::symlink("/nonexistent", r.join("link")).unwrap();
        let d = scan(r, &WalkLimits::default()).unwrap();
        assert_eq!(d.data_bytes, 10_000 + (64 << 20));
        assert!(d.hole_bytes >= 63 << 20, "{d:?}");
        let (path, size, _) = d.most_holes.unwrap();
        assert_eq!((path, size), (r.join("a/b/sparse"), 64 << 20));
        let small = WalkLimits {
            max_entries: 3,
            max_depth: 10,
        };
        assert!(matches!(
            scan(r, &small),
            Err(ImageError::TreeTooLarge { .. })
        ));
    }
}
