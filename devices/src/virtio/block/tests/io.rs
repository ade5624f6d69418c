use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress};

use super::*;

fn check_read_matches_file(backend: BackendKind) {
    let f = disk_file(SECTORS);
    let mut h = harness(backend, &f);
    let mut cap = [0u8; 8];
    h.driver.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    assert_eq!(read_sectors(&mut h, 3, 4), file_bytes(&f, 3 * 512, 4 * 512));
    // Scattered across three buffers.
    let a = h.driver.alloc(4096);
    let (used, status) = blk_request(
        &mut h,
        VIRTIO_BLK_T_IN,
        10,
        &[
            Buf::inp(a, 512),
            Buf::inp(a + 1024, 1024),
            Buf::inp(a + 3072, 512),
        ],
    );
    assert_eq!((used.len, status), (2049, 0));
    let mut got = vec![0u8; 2048];
    h.driver
        .mem
        .read_slice(&mut got[..512], GuestAddress(a))
        .unwrap();
    h.driver
        .mem
        .read_slice(&mut got[512..1536], GuestAddress(a + 1024))
        .unwrap();
    h.driver
        .mem
        .read_slice(&mut got[1536..], GuestAddress(a + 3072))
        .unwrap();
    assert_eq!(got, file_bytes(&f, 10 * 512, 2048));
}

#[test]
fn test_blk_read_uring_matches_file() {
    check_read_matches_file(BackendKind::IoUring);
}

#[test]
fn test_blk_read_sync_matches_file() {
    check_read_matches_file(BackendKind::Sync);
}

fn check_write_reaches_file(backend: BackendKind) {
    let f = disk_file(SECTORS);
    let mut h = harness(backend, &f);
    let a = h.driver.alloc(1024);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 13 + 5) as u8).collect();
    h.driver.mem.write_slice(&pattern, GuestAddress(a)).unwrap();
    let (used, status) = blk_request(&mut h, VIRTIO_BLK_T_OUT, 20, &[Buf::out(a, 1024)]);
    assert_eq!((used.len, status), (1, 0));
    let (_, status) = blk_request(&mut h, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(status, 0);
    assert_eq!(file_bytes(&f, 20 * 512, 1024), pattern);
    assert_eq!(read_sectors(&mut h, 20, 2), pattern);
    // Neighbours untouched.
    assert_eq!(file_bytes(&f, 19 * 512, 512), {
        let mut v = vec![0u8; 512];
        for (i, b) in v.iter_mut().enumerate() {
            *b = (19 * 7 + i) as u8;
        }
        v
    });
}

#[test]
fn test_blk_write_uring_reaches_file() {
    check_write_reaches_file(BackendKind::IoUring);
}

#[test]
fn test_blk_write_sync_reaches_file() {
    check_write_reaches_file(BackendKind::Sync);
}

#[test]
fn test_blk_get_id_returns_configured_id() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let a = h.driver.alloc(20);
    let (used, status) = blk_request(&mut h, VIRTIO_BLK_T_GET_ID, 0, &[Buf::inp(a, 20)]);
    assert_eq!((used.len, status), (21, 0));
    let mut id = [0u8; 20];
    h.driver.mem.read_slice(&mut id, GuestAddress(a)).unwrap();
    assert_eq!(&id[..6], b"disk0\0");
}

#[test]
fn test_blk_read_only_write_gets_ioerr() {
    let f = disk_file(SECTORS);
    let mut h = harness_with(
        BlockConfig {
            read_only: true,
            ..Default::default()
        },
        &f,
    );
    assert_ne!(h.driver.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    let a = h.driver.alloc(512);
    h.driver
        .mem
        .write_slice(&[0xaa; 512], GuestAddress(a))
        .unwrap();
    let (_, status) = blk_request(&mut h, VIRTIO_BLK_T_OUT, 0, &[Buf::out(a, 512)]);
    assert_eq!(status, 1);
    assert_eq!(file_bytes(&f, 0, 512), read_sectors(&mut h, 0, 1));
    assert_ne!(file_bytes(&f, 0, 512), vec![0xaa; 512]);
}

#[test]
fn test_blk_discard_and_write_zeroes_read_back_zero() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    if h.driver.device_features() & (1 << VIRTIO_BLK_F_DISCARD) == 0 {
        eprintln!("backing filesystem cannot punch holes; discard not offered");
        return;
    }
    for (ty, sector) in [
        (VIRTIO_BLK_T_DISCARD, 8u64),
        (VIRTIO_BLK_T_WRITE_ZEROES, 16),
    ] {
        let seg = h.driver.alloc(16);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&4u32.to_le_bytes());
        h.driver.mem.write_slice(&raw, GuestAddress(seg)).unwrap();
        let (_, status) = blk_request(&mut h, ty, 0, &[Buf::out(seg, 16)]);
        assert_eq!(status, 0);
        assert_eq!(file_bytes(&f, sector * 512, 2048), vec![0u8; 2048]);
    }
}

#[test]
fn test_blk_queue_depth_32_all_complete_correctly() {
    for backend in [BackendKind::IoUring, BackendKind::Sync] {
        let f = disk_file(SECTORS);
        let mut h = harness(backend, &f);
        let mut pending = Vec::new();
        for i in 0..32u64 {
            let buf = h.driver.alloc(512);
            let (bufs, status) = request_bufs(&mut h, VIRTIO_BLK_T_IN, i, &[Buf::inp(buf, 512)]);
            let head = h.driver.add_chain(0, &bufs).unwrap();
            pending.push((head, i, buf, status));
        }
        h.driver.kick(0);
        let used = h.wait_used(0, 32);
        assert_eq!(used.len(), 32);
        for (head, sector, buf, status) in pending {
            assert!(used.iter().any(|u| u.head == head && u.len == 513));
            let s: u8 = h.driver.mem.read_obj(GuestAddress(status)).unwrap();
            assert_eq!(s, 0);
            let mut got = vec![0u8; 512];
            h.driver
                .mem
                .read_slice(&mut got, GuestAddress(buf))
                .unwrap();
            assert_eq!(got, file_bytes(&f, sector * 512, 512));
        }
    }
}
