//! Guest RAM as a sparse file: each RAM region at its file offset, zero pages left as holes.
//!
//! Writing reads only pages the guest could have made non-zero: for anonymous memory, pages never
//! faulted in are zero by definition, so `mincore` tells which pages to look at. Runs of non-zero
//! pages are written with one `pwrite` each; the file is created at its full size first, so every
//! page not written is a hole. Reading back, [`HoleMap`] (from `SEEK_DATA`/`SEEK_HOLE`) tells data
//! from zero without reading zeros from disk.
//!
//! After guest RAM comes one page of trailer ([`TRAILER_LEN`]): magic `KSNAPMEM`, the snapshot id,
//! the RAM length and a CRC-64 of those, so a memory file is never restored with another
//! snapshot's state. Guest RAM keeps file offset 0, so the file can still be mapped as is.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::PAGE_SIZE;
use crate::id::SnapshotId;

/// Length of the identity trailer after guest RAM.
pub const TRAILER_LEN: u64 = PAGE_SIZE as u64;
const TRAILER_MAGIC: [u8; 8] = *b"KSNAPMEM";
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

fn encode_trailer(id: &SnapshotId, ram_len: u64) -> [u8; 40] {
    let mut t = [0u8; 40];
    t[..8].copy_from_slice(&TRAILER_MAGIC);
    t[8..24].copy_from_slice(&id.0);
    t[24..32].copy_from_slice(&ram_len.to_le_bytes());
    let crc = CRC.checksum(&t[..32]);
    t[32..40].copy_from_slice(&crc.to_le_bytes());
    t
}

/// One guest RAM region and where it lives in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Size in bytes (page multiple).
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// Lays regions out back to back in the file, in the order given.
pub fn file_layout(ranges: &[(u64, u64)]) -> Vec<MemoryRegion> {
    let mut offset = 0;
    ranges
        .iter()
        .map(|&(guest_addr, size)| {
            let r = MemoryRegion {
                guest_addr,
                size,
                file_offset: offset,
            };
            offset += size;
            r
        })
        .collect()
}

/// Total size of the memory file for these regions.
pub fn file_size(regions: &[MemoryRegion]) -> u64 {
    regions
        .iter()
        .map(|r| r.file_offset + r.size)
        .max()
        .unwrap_or(0)
}

/// Errors of memory files.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file's size does not match the layout.
    #[error(
        "memory file is {actual} bytes but the snapshot's memory layout needs {expected}: truncated or resized"
    )]
    SizeMismatch {
        /// From the layout.
        expected: u64,
        /// On disk.
        actual: u64,
    },
    /// The layout itself is inconsistent.
    #[error("invalid memory layout in snapshot: {0}")]
    BadLayout(String),
    /// The trailer is missing or damaged.
    #[error("memory file trailer is damaged ({0}): not a kata-snap memory file, or corrupt")]
    BadTrailer(&'static str),
    /// The file belongs to another snapshot.
    #[error(
        "memory file belongs to snapshot {found}, not to this state's snapshot {expected}: parts of different snapshots were mixed"
    )]
    ForeignSnapshot {
        /// The state's id.
        expected: SnapshotId,
        /// The memory file's id.
        found: SnapshotId,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MemoryFileError {
    let what = what.into();
    move |source| MemoryFileError::Io { what, source }
}

/// What writing a memory file did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteStats {
    /// Size of the file (guest RAM).
    pub total_bytes: u64,
    /// Pages written (non-zero).
    pub data_pages: u64,
    /// Pages examined for zeros.
    pub scanned_pages: u64,
}

/// Host memory holding one region's contents while writing.
#[derive(Debug, Clone, Copy)]
pub struct HostRegion {
    /// Start of the mapping.
    pub ptr: *const u8,
    /// Its length.
    pub len: usize,
    /// Whether it is anonymous memory (non-resident pages are zero); `false` for file-backed
    /// mappings, whose non-resident pages may hold data and are read.
    pub anonymous: bool,
}

/// Which pages of `[ptr, ptr+len)` are resident, one bool per page.
fn resident_pages(ptr: *const u8, len: usize) -> std::io::Result<Vec<bool>> {
    let pages = len.div_ceil(PAGE_SIZE);
    let mut vec = vec![0u8; pages];
    // SAFETY: ptr/len describe a live mapping (the caller's guest memory) and vec has one byte per page.
    let ret = unsafe { libc::mincore(ptr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 == 1).collect())
}

fn is_zero(page: &[u8]) -> bool {
    // Compare in u64 words: the page is 8-byte aligned (it comes from a page-aligned mapping).
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to handles unaligned ends.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes `regions` (with their host memory) into a new sparse file at `path`.
///
/// # Safety
/// Every `HostRegion` must describe readable memory that nothing writes while this runs (the VM is
/// paused).
pub unsafe fn write_memory_file(
    path: &Path,
    id: &SnapshotId,
    regions: &[(MemoryRegion, HostRegion)],
) -> Result<WriteStats, MemoryFileError> {
    let layout: Vec<MemoryRegion> = regions.iter().map(|(r, _)| *r).collect();
    let total = file_size(&layout);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(format!("cannot create {}", path.display())))?;
    file.set_len(total + TRAILER_LEN)
        .map_err(io_err("cannot size the memory file"))?;
    file.write_all_at(&encode_trailer(id, total), total)
        .map_err(io_err("cannot write the memory file trailer"))?;
    let mut stats = WriteStats {
        total_bytes: total,
        ..Default::default()
    };
    for (region, host) in regions {
        let resident = if host.anonymous {
            Some(resident_pages(host.ptr, host.len).map_err(io_err("mincore"))?)
        } else {
            None
        };
        let pages = host.len / PAGE_SIZE;
        // SAFETY: the caller guarantees the region is live and quiescent.
        let mem = unsafe { std::slice::from_raw_parts(host.ptr, host.len) };
        let mut run_start: Option<usize> = None;
        let flush =
            |start: usize, end: usize, stats: &mut WriteStats| -> Result<(), MemoryFileError> {
                let bytes = &mem[start * PAGE_SIZE..end * PAGE_SIZE];
                file.write_all_at(bytes, region.file_offset + (start * PAGE_SIZE) as u64)
                    .map_err(io_err("cannot write the memory file"))?;
                stats.data_pages += (end - start) as u64;
                Ok(())
            };
        for p in 0..pages {
            let candidate = resident.as_ref().is_none_or(|r| r[p]);
            let data = candidate && {
                stats.scanned_pages += 1;
                !is_zero(&mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE])
            };
            match (data, run_start) {
                (true, None) => run_start = Some(p),
                (false, Some(s)) => {
                    flush(s, p, &mut stats)?;
                    run_start = None;
                }
                _ => {}
            }
            // Keep single writes bounded (8 MiB).
            if let Some(s) = run_start
                && p + 1 - s >= 2048
            {
                flush(s, p + 1, &mut stats)?;
                run_start = None;
            }
        }
        if let Some(s) = run_start {
            flush(s, pages, &mut stats)?;
        }
    }
    file.sync_all()
        .map_err(io_err("cannot fsync the memory file"))?;
    Ok(stats)
}

/// The data extents of a sparse file: everything else reads as zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoleMap {
    /// Sorted, non-overlapping `[start, end)` byte ranges holding data.
    extents: Vec<(u64, u64)>,
    len: u64,
}

impl HoleMap {
    /// Builds the map of the first `len` bytes of `file` with `SEEK_DATA`/`SEEK_HOLE`.
    pub fn from_file(file: &File, len: u64) -> Result<Self, MemoryFileError> {
        let fd = file.as_raw_fd();
        let mut extents = Vec::new();
        let mut pos: i64 = 0;
        while (pos as u64) < len {
            // SAFETY: lseek on a valid fd; no memory is touched.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // no more data
                }
                return Err(MemoryFileError::Io {
                    what: "SEEK_DATA".into(),
                    source: e,
                });
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(MemoryFileError::Io {
                    what: "SEEK_HOLE".into(),
                    source: std::io::Error::last_os_error(),
                });
            }
            if data as u64 >= len {
                break;
            }
            extents.push((data as u64, (hole as u64).min(len)));
            pos = hole;
        }
        Ok(Self { extents, len })
    }

    /// A map from explicit extents (tests, synthetic sources).
    pub fn from_extents(mut extents: Vec<(u64, u64)>, len: u64) -> Self {
        extents.sort_unstable();
        Self { extents, len }
    }

    /// File length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of data.
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|(s, e)| e - s).sum()
    }

    /// The data extents.
    pub fn extents(&self) -> &[(u64, u64)] {
        &self.extents
    }

    /// Whether the page at `offset` may hold data (false: it is a hole, all zeros).
    pub fn is_data(&self, offset: u64) -> bool {
        let page_end = offset + PAGE_SIZE as u64;
        let i = self.extents.partition_point(|&(_, end)| end <= offset);
        self.extents
            .get(i)
            .is_some_and(|&(start, _)| start < page_end)
    }

    /// Length of the run starting at `offset` (at most `max`) whose pages are all data, or all hole,
    /// matching the kind of the first page.
    pub fn run_len(&self, offset: u64, max: u64) -> u64 {
        let kind = self.is_data(offset);
        let mut len = PAGE_SIZE as u64;
        while len < max && offset + len < self.len && self.is_data(offset + len) == kind {
            len += PAGE_SIZE as u64;
        }
        len
    }
}

/// Opens a memory file (a regular file, opened without blocking) and checks it matches `regions`
/// and belongs to snapshot `id`.
pub fn open_memory_file(
    path: &Path,
    regions: &[MemoryRegion],
    id: &SnapshotId,
) -> Result<(File, HoleMap), MemoryFileError> {
    validate_layout(regions)?;
    let file = crate::file::open_regular(path)
        .map_err(io_err(format!("cannot open {}", path.display())))?;
    check_memory_file(file, regions, id)
}

/// As [`open_memory_file`], for the memory file `file` already opened (a pool shell receives it
/// from its client).
pub fn check_memory_file(
    file: File,
    regions: &[MemoryRegion],
    id: &SnapshotId,
) -> Result<(File, HoleMap), MemoryFileError> {
    validate_layout(regions)?;
    if !file
        .metadata()
        .map_err(io_err("cannot stat the memory file"))?
        .is_file()
    {
        return Err(io_err("the memory file")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let actual = file
        .metadata()
        .map_err(io_err("cannot stat the memory file"))?
        .len();
    let ram = file_size(regions);
    if actual != ram + TRAILER_LEN {
        return Err(MemoryFileError::SizeMismatch {
            expected: ram + TRAILER_LEN,
            actual,
        });
    }
    let mut t = [0u8; 40];
    file.read_exact_at(&mut t, ram)
        .map_err(io_err("cannot read the memory file trailer"))?;
    if t[..8] != TRAILER_MAGIC {
        return Err(MemoryFileError::BadTrailer("bad magic"));
    }
    if CRC.checksum(&t[..32]).to_le_bytes() != t[32..40] {
        return Err(MemoryFileError::BadTrailer("checksum mismatch"));
    }
    if t[24..32] != ram.to_le_bytes() {
        return Err(MemoryFileError::BadTrailer("RAM length differs"));
    }
    let found = SnapshotId(t[8..24].try_into().expect("16 bytes"));
    if found != *id {
        return Err(MemoryFileError::ForeignSnapshot {
            expected: *id,
            found,
        });
    }
    let map = HoleMap::from_file(&file, ram)?;
    Ok((file, map))
}

/// Checks regions are page-aligned, non-empty, non-overlapping in guest and file space.
pub fn validate_layout(regions: &[MemoryRegion]) -> Result<(), MemoryFileError> {
    let page = PAGE_SIZE as u64;
    if regions.is_empty() {
        return Err(MemoryFileError::BadLayout("no memory regions".into()));
    }
    for (i, r) in regions.iter().enumerate() {
        if r.size == 0
            || r.size % page != 0
            || r.guest_addr % page != 0
            || r.file_offset % page != 0
        {
            return Err(MemoryFileError::BadLayout(format!(
                "region {i} is empty or not page-aligned"
            )));
        }
        if r.guest_addr.checked_add(r.size).is_none() || r.file_offset.checked_add(r.size).is_none()
        {
            return Err(MemoryFileError::BadLayout(format!("region {i} overflows")));
        }
        for o in &regions[i + 1..] {
            let overlap = |a: u64, al: u64, b: u64, bl: u64| a < b + bl && b < a + al;
            if overlap(r.guest_addr, r.size, o.guest_addr, o.size)
                || overlap(r.file_offset, r.size, o.file_offset, o.size)
            {
                return Err(MemoryFileError::BadLayout(format!(
                    "region {i} overlaps another"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(len: usize) -> *mut u8 {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    #[test]
    fn test_memory_file_sparse_roundtrip() {
        let len = 64 * PAGE_SIZE;
        let mem = anon(len);
        // Touch pages 3 (data), 4 (zero written but resident), 10..12 (data).
        for (page, byte) in [(3usize, 7u8), (4, 0), (10, 1), (11, 2)] {
            // SAFETY: inside the mapping.
            unsafe { mem.wrapping_add(page * PAGE_SIZE + 17).write(byte) };
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let region = MemoryRegion {
            guest_addr: 0,
            size: len as u64,
            file_offset: 0,
        };
        let host = HostRegion {
            ptr: mem,
            len,
            anonymous: true,
        };
        let id = SnapshotId([1; 16]);
        // SAFETY: the mapping is live and nothing writes it.
        let stats = unsafe { write_memory_file(&path, &id, &[(region, host)]) }.unwrap();
        assert_eq!(stats.data_pages, 3);
        assert_eq!(stats.scanned_pages, 4, "only resident pages are scanned");
        let err = open_memory_file(&path, &[region], &SnapshotId([2; 16])).unwrap_err();
        assert!(
            matches!(err, MemoryFileError::ForeignSnapshot { .. }),
            "{err}"
        );
        let (file, holes) = open_memory_file(&path, &[region], &id).unwrap();
        assert_eq!(holes.len(), len as u64, "the trailer is not guest memory");
        let data: Vec<u64> = (0..64)
            .filter(|p| holes.is_data(p * PAGE_SIZE as u64))
            .collect();
        assert_eq!(data, vec![3, 10, 11]);
        assert_eq!(
            holes.run_len(10 * PAGE_SIZE as u64, 16 * PAGE_SIZE as u64),
            2 * PAGE_SIZE as u64
        );
        assert_eq!(
            holes.run_len(12 * PAGE_SIZE as u64, 8 * PAGE_SIZE as u64),
            8 * PAGE_SIZE as u64
        );
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, (3 * PAGE_SIZE + 17) as u64)
            .unwrap();
        assert_eq!(b, [7]);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(mem.cast(), len) };
    }

    #[test]
    fn test_memory_file_size_mismatch_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let f = File::create(&path).unwrap();
        f.set_len(8 * PAGE_SIZE as u64).unwrap();
        let regions = [MemoryRegion {
            guest_addr: 0,
            size: 16 * PAGE_SIZE as u64,
            file_offset: 0,
        }];
        assert!(matches!(
            open_memory_file(&path, &regions, &SnapshotId([0; 16])),
            Err(MemoryFileError::SizeMismatch { .. })
        ));
        // The right size without a trailer: refused as damaged.
        f.set_len(17 * PAGE_SIZE as u64).unwrap();
        assert!(matches!(
            open_memory_file(&path, &regions, &SnapshotId([0; 16])),
            Err(MemoryFileError::BadTrailer(_))
        ));
    }

    #[test]
    fn test_layout_validation() {
        let p = PAGE_SIZE as u64;
        assert!(validate_layout(&[]).is_err());
        assert!(
            validate_layout(&[MemoryRegion {
                guest_addr: 1,
                size: p,
                file_offset: 0
            }])
            .is_err()
        );
        let a = MemoryRegion {
            guest_addr: 0,
            size: 4 * p,
            file_offset: 0,
        };
        let b = MemoryRegion {
            guest_addr: 2 * p,
            size: 4 * p,
            file_offset: 4 * p,
        };
        assert!(validate_layout(&[a, b]).is_err());
        let c = MemoryRegion {
            guest_addr: 1 << 32,
            size: 4 * p,
            file_offset: 4 * p,
        };
        validate_layout(&[a, c]).unwrap();
        assert_eq!(file_layout(&[(0, 4 * p), (1 << 32, 4 * p)]), vec![a, c]);
    }
}
