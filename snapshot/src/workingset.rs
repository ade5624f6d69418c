//! The working set: the pages a restored guest touched, in first-touch order, as page indices into
//! the memory file.
//!
//! ```text
//!  0  8  magic "KSNAPWS2"
//!  8 16  snapshot id (the working set belongs to one snapshot's memory file)
//! 24  8  number of pages n
//! 32 8n  page indices (u64 little endian)
//!  ..  8  CRC-64/XZ of everything before
//! ```

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::id::SnapshotId;

const MAGIC: [u8; 8] = *b"KSNAPWS2";
const HEADER: usize = 32;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Errors of working-set files.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// I/O failed.
    #[error("working set {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is damaged.
    #[error("working set is corrupt: {0}")]
    Corrupt(String),
    /// The working set was recorded for another snapshot.
    #[error("working set belongs to snapshot {found}, not to {expected}")]
    ForeignSnapshot {
        /// The snapshot's id.
        expected: SnapshotId,
        /// The working set's id.
        found: SnapshotId,
    },
    /// A page index is past the end of guest memory.
    #[error("working set names page {page}, past the {pages} pages of the memory file")]
    OutOfRange {
        /// The index.
        page: u64,
        /// Pages in the memory file.
        pages: u64,
    },
}

/// Encodes a working set of snapshot `id`.
pub fn encode(id: &SnapshotId, pages: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 8 + pages.len() * 8);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a working set, checks it belongs to snapshot `id` and that every page lies within
/// `total_pages`, each at most once.
pub fn decode(
    bytes: &[u8],
    id: &SnapshotId,
    total_pages: u64,
) -> Result<Vec<u64>, WorkingSetError> {
    if bytes.len() < HEADER + 8 || bytes[..8] != MAGIC {
        return Err(WorkingSetError::Corrupt("bad magic or too short".into()));
    }
    let n = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
    if n > total_pages || (bytes.len() as u64) != HEADER as u64 + 8 + n * 8 {
        return Err(WorkingSetError::Corrupt(format!(
            "{} bytes do not hold {n} pages",
            bytes.len()
        )));
    }
    let (payload, crc) = bytes.split_at(bytes.len() - 8);
    if CRC.checksum(payload) != u64::from_le_bytes(crc.try_into().expect("8 bytes")) {
        return Err(WorkingSetError::Corrupt("checksum mismatch".into()));
    }
    let found = SnapshotId(bytes[8..24].try_into().expect("16 bytes"));
    if found != *id {
        return Err(WorkingSetError::ForeignSnapshot {
            expected: *id,
            found,
        });
    }
    let pages: Vec<u64> = payload[HEADER..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let mut seen = vec![false; total_pages as usize];
    for &p in &pages {
        if p >= total_pages {
            return Err(WorkingSetError::OutOfRange {
                page: p,
                pages: total_pages,
            });
        }
        if std::mem::replace(&mut seen[p as usize], true) {
            return Err(WorkingSetError::Corrupt(format!("page {p} listed twice")));
        }
    }
    Ok(pages)
}

/// Writes a working set atomically to `path` (temporary name beside it, fsync, rename).
pub fn write(path: &Path, id: &SnapshotId, pages: &[u64]) -> Result<(), WorkingSetError> {
    let io = |what| move |source| WorkingSetError::Io { what, source };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A new file (O_EXCL|O_NOFOLLOW): nothing in its place (a link, a FIFO) is written
    // through; a name that is taken (left by a dead process with this pid) gives way to another.
    let (tmp, mut f) = {
        use std::os::unix::fs::OpenOptionsExt;
        let mut n = 0u32;
        loop {
            let tmp = match n {
                0 => path.with_file_name(format!(".{name}.tmp-{}", std::process::id())),
                n => path.with_file_name(format!(".{name}.tmp-{}.{n}", std::process::id())),
            };
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)
            {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 16 => n += 1,
                Err(e) => return Err(io("create")(e)),
            }
        }
    };
    let written = f
        .write_all(&encode(id, pages))
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write")(e));
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory"))?;
    }
    Ok(())
}

/// Reads the working set of snapshot `id` (a regular file, read with a bound), `None` if there is
/// none.
pub fn read(
    path: &Path,
    id: &SnapshotId,
    total_pages: u64,
) -> Result<Option<Vec<u64>>, WorkingSetError> {
    let f = match crate::file::open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WorkingSetError::Io {
                what: "open",
                source,
            });
        }
    };
    read_from(f, id, total_pages).map(Some)
}

/// As [`read`], from the working-set file `f` already opened (read from its start).
pub fn read_from(
    mut f: File,
    id: &SnapshotId,
    total_pages: u64,
) -> Result<Vec<u64>, WorkingSetError> {
    use std::io::Seek;
    let is_file = f
        .metadata()
        .map_err(|source| WorkingSetError::Io {
            what: "stat",
            source,
        })?
        .is_file();
    if !is_file {
        return Err(WorkingSetError::Corrupt("not a regular file".into()));
    }
    f.rewind().map_err(|source| WorkingSetError::Io {
        what: "read",
        source,
    })?;
    let max = (HEADER as u64 + 8).saturating_add(total_pages.saturating_mul(8));
    let len = f
        .metadata()
        .map_err(|source| WorkingSetError::Io {
            what: "stat",
            source,
        })?
        .len();
    if len > max {
        return Err(WorkingSetError::Corrupt(format!(
            "{len} bytes is more than {total_pages} pages can need"
        )));
    }
    let bytes = crate::file::read_bounded(&mut f, max).map_err(|source| WorkingSetError::Io {
        what: "read",
        source,
    })?;
    decode(&bytes, id, total_pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: SnapshotId = SnapshotId([3; 16]);

    #[test]
    fn test_workingset_roundtrip_keeps_order() {
        let pages = vec![5, 1, 900, 2];
        assert_eq!(decode(&encode(&ID, &pages), &ID, 1000).unwrap(), pages);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("workingset");
        assert_eq!(read(&p, &ID, 1000).unwrap(), None);
        write(&p, &ID, &pages).unwrap();
        assert_eq!(read(&p, &ID, 1000).unwrap(), Some(pages));
    }

    #[test]
    fn test_workingset_write_does_not_follow_a_planted_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        let p = dir.path().join("workingset");
        let planted = dir
            .path()
            .join(format!(".workingset.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&outside, &planted).unwrap();
        write(&p, &ID, &[1, 2]).unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert_eq!(read(&p, &ID, 10).unwrap(), Some(vec![1, 2]));
        assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());
    }

    #[test]
    fn test_workingset_out_of_range_page_refused() {
        let err = decode(&encode(&ID, &[1, 1000]), &ID, 1000).unwrap_err();
        assert!(matches!(
            err,
            WorkingSetError::OutOfRange {
                page: 1000,
                pages: 1000
            }
        ));
    }

    #[test]
    fn test_workingset_corruption_refused() {
        let mut b = encode(&ID, &[1, 2, 3]);
        b[33] ^= 1;
        assert!(matches!(
            decode(&b, &ID, 100),
            Err(WorkingSetError::Corrupt(_))
        ));
        assert!(decode(&encode(&ID, &[1, 2, 3])[..40], &ID, 100).is_err());
        assert!(decode(&encode(&ID, &[4, 4]), &ID, 100).is_err());
        assert!(decode(b"garbage", &ID, 100).is_err());
    }

    #[test]
    fn test_workingset_of_another_snapshot_refused() {
        let err = decode(&encode(&ID, &[1, 2]), &SnapshotId([4; 16]), 100).unwrap_err();
        assert!(
            matches!(err, WorkingSetError::ForeignSnapshot { .. }),
            "{err}"
        );
    }
}
