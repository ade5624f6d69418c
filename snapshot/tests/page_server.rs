//! The page server and the prefetcher on a real userfaultfd: pages arrive with the file's content,
//! holes read as zeros, fault-around and recording work, and a prefetched working set needs no
//! faults.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use snapshot::PAGE_SIZE;
use snapshot::memory::{HoleMap, MemoryRegion};
use snapshot::page_server::{
    PageServer, PageServerConfig, PageServerHandle, UffdRegion, create_uffd,
};
use snapshot::prefetch;
use snapshot::source::{FileSource, InstallOp};

const PAGES: usize = 256;

/// A memory file where page p holds bytes (p % 251) + 1 for p % 3 != 0, and every third page is a hole.
fn memory_file(dir: &std::path::Path) -> (File, HoleMap) {
    let path = dir.join("memory");
    let f = File::create(&path).unwrap();
    f.set_len((PAGES * PAGE_SIZE) as u64).unwrap();
    for p in (0..PAGES).filter(|p| !p.is_multiple_of(3)) {
        f.write_all_at(
            &vec![(p % 251) as u8 + 1; PAGE_SIZE],
            (p * PAGE_SIZE) as u64,
        )
        .unwrap();
    }
    f.sync_all().unwrap();
    let f = File::open(&path).unwrap();
    let holes = HoleMap::from_file(&f, (PAGES * PAGE_SIZE) as u64).unwrap();
    (f, holes)
}

fn expected(p: usize) -> u8 {
    if p.is_multiple_of(3) {
        0
    } else {
        (p % 251) as u8 + 1
    }
}

struct Mapping(*mut u8, usize);
// SAFETY: the mapping is plain memory shared with the server thread through raw addresses only.
unsafe impl Send for Mapping {}
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

fn setup(config: PageServerConfig) -> Option<(Arc<PageServer>, Mapping, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let (file, holes) = memory_file(dir.path());
    let len = PAGES * PAGE_SIZE;
    // SAFETY: a fresh private anonymous mapping.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    let uffd = match create_uffd() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return None;
        }
    };
    PageServer::register(&uffd, ptr as usize, len).unwrap();
    let region = UffdRegion {
        host_addr: ptr as usize,
        region: MemoryRegion {
            guest_addr: 0,
            size: len as u64,
            file_offset: 0,
        },
    };
    let server = Arc::new(PageServer::new(
        uffd,
        vec![region],
        Arc::new(FileSource::new(file, holes)),
        config,
    ));
    Some((server, Mapping(ptr.cast(), len), dir))
}

fn read_all(map: &Mapping) -> Vec<u8> {
    // Touch from another thread, as a vCPU would; each first touch blocks on the server.
    let (addr, len) = (map.0 as usize, map.1);
    std::thread::spawn(move || {
        (0..len / PAGE_SIZE)
            .map(|p| {
                // SAFETY: reading inside the live mapping; the page server fills it.
                unsafe { std::ptr::read_volatile((addr + p * PAGE_SIZE + 100) as *const u8) }
            })
            .collect()
    })
    .join()
    .unwrap()
}

#[test]
fn test_page_server_serves_file_content_and_zero_holes() {
    for fault_around in [1usize, 16] {
        let Some((server, map, _dir)) = setup(PageServerConfig {
            fault_around,
            record: true,
        }) else {
            return;
        };
        let mut handle = PageServerHandle::spawn(server.clone()).unwrap();
        let got = read_all(&map);
        for (p, b) in got.iter().enumerate() {
            assert_eq!(*b, expected(p), "page {p}, fault_around {fault_around}");
        }
        handle.stop().unwrap();
        let s = &server.stats;
        let faults = s.faults.load(Ordering::Relaxed);
        let copied = s.pages_copied.load(Ordering::Relaxed);
        let zeroed = s.pages_zeroed.load(Ordering::Relaxed);
        assert_eq!(
            copied + zeroed,
            PAGES as u64,
            "every page installed exactly once"
        );
        assert_eq!(
            zeroed,
            (0..PAGES).filter(|p| p.is_multiple_of(3)).count() as u64,
            "holes become zero pages"
        );
        if fault_around == 1 {
            assert_eq!(faults, PAGES as u64);
        } else {
            assert_eq!(
                faults,
                (PAGES / fault_around) as u64,
                "one fault per window"
            );
        }
        let mut rec = server.recorded();
        assert_eq!(rec.len(), PAGES);
        assert_eq!(rec[0], 0, "first touch first");
        rec.sort_unstable();
        assert_eq!(rec, (0..PAGES as u64).collect::<Vec<_>>());
    }
}

#[test]
fn test_prefetch_installs_working_set_without_faults() {
    let Some((server, map, _dir)) = setup(PageServerConfig {
        fault_around: 1,
        record: false,
    }) else {
        return;
    };
    // A working set in a scattered first-touch order, covering every page.
    let mut ws: Vec<u64> = (0..PAGES as u64).filter(|p| p.is_multiple_of(2)).collect();
    ws.extend((0..PAGES as u64).filter(|p| !p.is_multiple_of(2)).rev());
    let stats = prefetch::prefetch(&server, &ws).unwrap();
    assert_eq!(stats.data_pages + stats.zero_pages, PAGES as u64);
    let mut handle = PageServerHandle::spawn(server.clone()).unwrap();
    let got = read_all(&map);
    for (p, b) in got.iter().enumerate() {
        assert_eq!(*b, expected(p), "page {p}");
    }
    handle.stop().unwrap();
    assert_eq!(
        server.stats.faults.load(Ordering::Relaxed),
        0,
        "a full working set leaves nothing to fault"
    );
    // Prefetching again skips everything.
    let again = prefetch::prefetch(&server, &ws).unwrap();
    assert_eq!(again.skipped, PAGES as u64);
}

#[test]
fn test_prefetch_partial_set_rest_served_by_faults() {
    let Some((server, map, _dir)) = setup(PageServerConfig {
        fault_around: 4,
        record: false,
    }) else {
        return;
    };
    let ws: Vec<u64> = (0..64).collect();
    let stats = prefetch::prefetch(&server, &ws).unwrap();
    assert!(stats.reads >= 1 && stats.reads <= 64);
    let mut handle = PageServerHandle::spawn(server.clone()).unwrap();
    let got = read_all(&map);
    for (p, b) in got.iter().enumerate() {
        assert_eq!(*b, expected(p), "page {p}");
    }
    handle.stop().unwrap();
    assert_eq!(
        server.stats.faults.load(Ordering::Relaxed),
        ((PAGES - 64) / 4) as u64
    );
}

#[test]
fn test_runs_merge_consecutive_pages_and_split_on_holes() {
    let Some((server, _map, _dir)) = setup(PageServerConfig::default()) else {
        return;
    };
    // Pages 1,2 are data; 3 is a hole; 4,5 data; then 10.
    let r = prefetch::runs(&server, &[1, 2, 3, 4, 5, 10]);
    assert_eq!(
        r,
        vec![
            (1, 2, InstallOp::Copy),
            (3, 1, InstallOp::ZeroPage),
            (4, 2, InstallOp::Copy),
            (10, 1, InstallOp::Copy)
        ]
    );
}

#[test]
fn test_finish_recording_returns_pages_so_far_and_stops_recording() {
    let Some((server, map, _dir)) = setup(PageServerConfig {
        fault_around: 1,
        record: true,
    }) else {
        return;
    };
    let mut handle = PageServerHandle::spawn(server.clone()).unwrap();
    // Touch the first 8 pages, end the recording, then touch the rest.
    let (addr, n) = (map.0 as usize, 8);
    std::thread::spawn(move || {
        for p in 0..n {
            // SAFETY: inside the mapping; the server installs the page.
            unsafe { std::ptr::read_volatile((addr + p * PAGE_SIZE) as *const u8) };
        }
    })
    .join()
    .unwrap();
    // The server records a page just after installing it (the reader may already run on).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while server.recorded().len() < 8 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert!(server.is_recording());
    let rec = server.finish_recording();
    assert_eq!(rec, (0..8).collect::<Vec<u64>>());
    assert!(!server.is_recording());
    let got = read_all(&map);
    assert_eq!(got[100], expected(100));
    handle.stop().unwrap();
    assert!(
        server.recorded().is_empty(),
        "nothing is recorded after the end"
    );
}
