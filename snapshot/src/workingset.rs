//! The working set: the pages a restored guest touched, in first-touch order, as page indices into
//! the memory file.
//!
//! ```text
//!  0  8  magic "KSNAPWS1"
//!  8  8  number of pages n
//! 16 8n  page indices (u64 little endian)
//!  ..  8  CRC-64/XZ of everything before
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

const MAGIC: [u8; 8] = *b"KSNAPWS1";
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
    /// A page index is past the end of guest memory.
    #[error("working set names page {page}, past the {pages} pages of the memory file")]
    OutOfRange {
        /// The index.
        page: u64,
        /// Pages in the memory file.
        pages: u64,
    },
}

/// Encodes a working set.
pub fn encode(pages: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + pages.len() * 8);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a working set and checks every page lies within `total_pages`, each at most once.
pub fn decode(bytes: &[u8], total_pages: u64) -> Result<Vec<u64>, WorkingSetError> {
    if bytes.len() < 24 || bytes[..8] != MAGIC {
        return Err(WorkingSetError::Corrupt("bad magic or too short".into()));
    }
    let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if n > total_pages || (bytes.len() as u64) != 24 + n * 8 {
        return Err(WorkingSetError::Corrupt(format!(
            "{} bytes do not hold {n} pages",
            bytes.len()
        )));
    }
    let (payload, crc) = bytes.split_at(bytes.len() - 8);
    if CRC.checksum(payload) != u64::from_le_bytes(crc.try_into().expect("8 bytes")) {
        return Err(WorkingSetError::Corrupt("checksum mismatch".into()));
    }
    let pages: Vec<u64> = payload[16..]
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

/// Writes a working set atomically next to `path` (temporary name, fsync, rename).
pub fn write(path: &Path, pages: &[u64]) -> Result<(), WorkingSetError> {
    let io = |what| move |source| WorkingSetError::Io { what, source };
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(io("create"))?;
    f.write_all(&encode(pages)).map_err(io("write"))?;
    f.sync_all().map_err(io("fsync"))?;
    std::fs::rename(&tmp, path).map_err(io("rename"))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory"))?;
    }
    Ok(())
}

/// Reads a working set, `None` if there is none.
pub fn read(path: &Path, total_pages: u64) -> Result<Option<Vec<u64>>, WorkingSetError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WorkingSetError::Io {
                what: "open",
                source,
            });
        }
    };
    let max = 24 + total_pages.saturating_mul(8);
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
    let mut bytes = Vec::with_capacity(len as usize);
    f.read_to_end(&mut bytes)
        .map_err(|source| WorkingSetError::Io {
            what: "read",
            source,
        })?;
    decode(&bytes, total_pages).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_workingset_roundtrip_keeps_order() {
        let pages = vec![5, 1, 900, 2];
        assert_eq!(decode(&encode(&pages), 1000).unwrap(), pages);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("workingset");
        assert_eq!(read(&p, 1000).unwrap(), None);
        write(&p, &pages).unwrap();
        assert_eq!(read(&p, 1000).unwrap(), Some(pages));
    }

    #[test]
    fn test_workingset_out_of_range_page_refused() {
        let err = decode(&encode(&[1, 1000]), 1000).unwrap_err();
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
        let mut b = encode(&[1, 2, 3]);
        b[17] ^= 1;
        assert!(matches!(decode(&b, 100), Err(WorkingSetError::Corrupt(_))));
        assert!(decode(&encode(&[1, 2, 3])[..30], 100).is_err());
        assert!(decode(&encode(&[4, 4]), 100).is_err());
        assert!(decode(b"garbage", 100).is_err());
    }
}
