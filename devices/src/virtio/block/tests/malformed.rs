//! A hostile driver: every kind of malformed request gets an error status or puts the device in
//! the failed state (DEVICE_NEEDS_RESET), never a panic, a hang or an access outside the chain.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

use super::*;
use crate::virtio::test_utils::{F_NEXT, F_WRITE, MEM_SIZE};

fn assert_needs_reset_then_recovers(h: &mut Harness<BlockHandler>, f: &NamedTempFile) {
    assert!(h.run_until_irq(std::time::Duration::from_secs(2)));
    assert_ne!(h.driver.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    h.driver
        .write_reg(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS, 0);
    h.driver.init(64);
    assert_eq!(read_sectors(h, 1, 1), file_bytes(f, 512, 512));
}

#[test]
fn test_blk_header_not_16_bytes_gets_ioerr() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let buf = h.driver.alloc(512);
    let (mut bufs, status) = request_bufs(&mut h, VIRTIO_BLK_T_IN, 0, &[Buf::inp(buf, 512)]);
    bufs[0].len = 12;
    h.request(0, &bufs).unwrap();
    let s: u8 = h.driver.mem.read_obj(GuestAddress(status)).unwrap();
    assert_eq!(s, 1);
}

#[test]
fn test_blk_status_not_1_byte_needs_reset() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let buf = h.driver.alloc(512);
    let (mut bufs, _) = request_bufs(&mut h, VIRTIO_BLK_T_IN, 0, &[Buf::inp(buf, 512)]);
    bufs.last_mut().unwrap().len = 4;
    h.driver.add_chain(0, &bufs).unwrap();
    h.driver.kick(0);
    assert_needs_reset_then_recovers(&mut h, &f);
}

#[test]
fn test_blk_status_device_readable_needs_reset() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let buf = h.driver.alloc(512);
    let (mut bufs, _) = request_bufs(&mut h, VIRTIO_BLK_T_IN, 0, &[Buf::inp(buf, 512)]);
    bufs.last_mut().unwrap().write = false;
    h.driver.add_chain(0, &bufs).unwrap();
    h.driver.kick(0);
    assert_needs_reset_then_recovers(&mut h, &f);
}

#[test]
fn test_blk_data_not_sector_multiple_gets_ioerr() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let buf = h.driver.alloc(512);
    let (_, status) = blk_request(&mut h, VIRTIO_BLK_T_IN, 0, &[Buf::inp(buf, 500)]);
    assert_eq!(status, 1);
}

#[test]
fn test_blk_sector_past_end_gets_ioerr() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let buf = h.driver.alloc(1024);
    let (_, status) = blk_request(&mut h, VIRTIO_BLK_T_IN, SECTORS - 1, &[Buf::inp(buf, 1024)]);
    assert_eq!(status, 1);
    let (_, status) = blk_request(&mut h, VIRTIO_BLK_T_OUT, u64::MAX, &[Buf::out(buf, 512)]);
    assert_eq!(status, 1);
}

#[test]
fn test_blk_read_into_device_readable_buffer_gets_ioerr() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let buf = h.driver.alloc(512);
    h.driver
        .mem
        .write_slice(&[0x5a; 512], GuestAddress(buf))
        .unwrap();
    let (_, status) = blk_request(&mut h, VIRTIO_BLK_T_IN, 0, &[Buf::out(buf, 512)]);
    assert_eq!(status, 1);
    let mut got = [0u8; 512];
    h.driver
        .mem
        .read_slice(&mut got, GuestAddress(buf))
        .unwrap();
    assert_eq!(
        got, [0x5a; 512],
        "device wrote into a device-readable buffer"
    );
}

#[test]
fn test_blk_write_from_device_writable_buffer_gets_ioerr() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let buf = h.driver.alloc(512);
    let (_, status) = blk_request(&mut h, VIRTIO_BLK_T_OUT, 0, &[Buf::inp(buf, 512)]);
    assert_eq!(status, 1);
    assert_eq!(file_bytes(&f, 0, 512), read_sectors(&mut h, 0, 1));
}

#[test]
fn test_blk_buffer_outside_guest_memory_needs_reset() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let (bufs, _) = request_bufs(
        &mut h,
        VIRTIO_BLK_T_IN,
        0,
        &[Buf::inp(MEM_SIZE as u64 - 256, 512)],
    );
    h.driver.add_chain(0, &bufs).unwrap();
    h.driver.kick(0);
    assert_needs_reset_then_recovers(&mut h, &f);
}

#[test]
fn test_blk_looping_chain_needs_reset() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let (bufs, _) = request_bufs(&mut h, VIRTIO_BLK_T_IN, 0, &[]);
    // 0 -> 1 -> 0 -> ...
    h.driver.write_desc(0, 0, bufs[0].addr, 16, F_NEXT, 1);
    h.driver
        .write_desc(0, 1, bufs[1].addr, 1, F_NEXT | F_WRITE, 0);
    h.driver.publish(0, 0);
    h.driver.kick(0);
    assert_needs_reset_then_recovers(&mut h, &f);
}

#[test]
fn test_blk_chain_longer_than_queue_needs_reset() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let size = h.driver.queues[0].size;
    let buf = h.driver.alloc(512);
    // Every descriptor points to the next one, the last one past the table.
    for i in 0..size {
        h.driver.write_desc(0, i, buf, 512, F_NEXT | F_WRITE, i + 1);
    }
    h.driver.publish(0, 0);
    h.driver.kick(0);
    assert_needs_reset_then_recovers(&mut h, &f);
}

#[test]
fn test_blk_head_index_outside_table_needs_reset() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    h.driver.publish(0, 0xfff0);
    h.driver.kick(0);
    assert_needs_reset_then_recovers(&mut h, &f);
}

#[test]
fn test_blk_avail_index_jump_needs_reset() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    h.driver.set_avail_idx(0, 1000);
    h.driver.kick(0);
    assert!(h.run_until_irq(std::time::Duration::from_secs(2)));
    assert_ne!(h.driver.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}

#[test]
fn test_blk_empty_chain_no_data_read_is_ok() {
    // A read of zero sectors is allowed and completes with just the status.
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let (used, status) = blk_request(&mut h, VIRTIO_BLK_T_IN, 0, &[]);
    assert_eq!((used.len, status), (1, 0));
}
