use std::fs::File;
use std::time::Duration;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::persist::Persist;
use crate::virtio::block::BlockArgs;
use crate::virtio::test_utils::copy_memory;

/// Writes then reads back through the device (used by the conformance test).
pub(crate) fn blk_io(h: &mut Harness<BlockHandler>, round: u32) {
    let a = h.driver.alloc(512);
    let pattern = vec![0x40 + round as u8; 512];
    h.driver.mem.write_slice(&pattern, GuestAddress(a)).unwrap();
    let sector = 2 + u64::from(round);
    let (_, status) = blk_request(h, VIRTIO_BLK_T_OUT, sector, &[Buf::out(a, 512)]);
    assert_eq!(status, 0);
    assert_eq!(read_sectors(h, sector, 1), pattern);
    if round == 1 {
        // What round 0 wrote before the snapshot is still there.
        assert_eq!(read_sectors(h, 2, 1), vec![0x40; 512]);
    }
}

#[test]
fn test_blk_snapshot_with_requests_pending_completes_after_restore() {
    let f = disk_file(SECTORS);
    let mut h = harness(BackendKind::IoUring, &f);
    let a = h.driver.alloc(512 * 4);
    h.driver
        .mem
        .write_slice(&[0x77; 2048], GuestAddress(a))
        .unwrap();
    // Four writes made available and kicked, but the loop has not run: the snapshot is taken
    // with them pending.
    let mut statuses = Vec::new();
    for i in 0..4u64 {
        let (bufs, status) = request_bufs(
            &mut h,
            VIRTIO_BLK_T_OUT,
            30 + i,
            &[Buf::out(a + i * 512, 512)],
        );
        h.driver.add_chain(0, &bufs).unwrap();
        statuses.push(status);
    }
    h.driver.kick(0);
    let state = h.device.save();
    let mem2 = copy_memory(&h.driver.mem);
    let file = File::options()
        .read(true)
        .write(true)
        .open(f.path())
        .unwrap();
    let dev = Block::restore(
        BlockArgs {
            mem: mem2.clone(),
            file: Some(file),
            backend: BackendKind::IoUring,
            parts: None,
        },
        &state,
    )
    .unwrap();
    let mut h2 = h.restored(dev, mem2);
    let used = h2.wait_used(0, 4);
    assert_eq!(used.len(), 4);
    for s in statuses {
        let v: u8 = h2.driver.mem.read_obj(GuestAddress(s)).unwrap();
        assert_eq!(v, 0);
    }
    assert_eq!(file_bytes(&f, 30 * 512, 2048), vec![0x77; 2048]);
}

#[test]
fn test_blk_replay_positions_rewind_to_oldest_in_flight() {
    use crate::virtio::worker::QueuePosition;
    let f = disk_file(SECTORS);
    let h = harness(BackendKind::IoUring, &f);
    let worker = h.device.worker().borrow();
    let current = [QueuePosition {
        next_avail: 10,
        next_used: 7,
    }];
    let (p, skip) = worker.handler.replay_positions(&current);
    assert_eq!(p, current.to_vec());
    assert_eq!(skip, vec![Vec::<u16>::new()]);
}

#[test]
fn test_blk_spare_slot_restore_announces_new_capacity() {
    // Template: an empty spare slot, driver loaded.
    let mem = test_memory();
    let dev = Block::new_block(
        BlockConfig {
            id: "rootfs".into(),
            spare_slot: Some("rootfs".into()),
            ..Default::default()
        },
        None,
        mem.clone(),
    )
    .unwrap();
    let mut h = Harness::new(dev, mem);
    h.driver.init(64);
    let mut cap = [0u8; 8];
    h.driver.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 0);
    let buf = h.driver.alloc(512);
    let (_, status) = blk_request(&mut h, VIRTIO_BLK_T_IN, 0, &[Buf::inp(buf, 512)]);
    assert_eq!(status, 1, "empty slot reads fail");
    let state = h.device.save();
    let generation = h.driver.read_reg(reg::VIRTIO_MMIO_CONFIG_GENERATION);

    // Restore with the container's rootfs in the slot.
    let f = disk_file(SECTORS);
    let mem2 = copy_memory(&h.driver.mem);
    let file = File::options()
        .read(true)
        .write(true)
        .open(f.path())
        .unwrap();
    let dev = Block::restore(
        BlockArgs {
            mem: mem2.clone(),
            file: Some(file),
            backend: BackendKind::IoUring,
            parts: None,
        },
        &state,
    )
    .unwrap();
    // Shown before the device's worker is on any loop: a pre-loaded shell's vCPUs may read
    // the interrupt status before the event loop gets to the device.
    let isr = dev.transport().lock().unwrap().interrupt().status();
    assert_eq!(
        isr & crate::virtio::VIRTIO_MMIO_INT_CONFIG,
        crate::virtio::VIRTIO_MMIO_INT_CONFIG,
        "the config change is announced by the restore itself"
    );
    let mut h2 = h.restored(dev, mem2);
    assert!(h2.run_until_irq(Duration::from_secs(2)));
    assert_eq!(
        h2.driver.ack_interrupts() & crate::virtio::VIRTIO_MMIO_INT_CONFIG,
        crate::virtio::VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(
        h2.driver.read_reg(reg::VIRTIO_MMIO_CONFIG_GENERATION),
        generation + 1
    );
    h2.driver.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    assert_eq!(read_sectors(&mut h2, 5, 2), file_bytes(&f, 5 * 512, 1024));
}

#[test]
fn test_blk_restore_resized_plain_disk_is_refused() {
    let f = disk_file(SECTORS);
    let h = harness(BackendKind::IoUring, &f);
    let state = h.device.save();
    let other = disk_file(SECTORS * 2);
    let r = Block::restore(
        BlockArgs {
            mem: test_memory(),
            file: Some(File::open(other.path()).unwrap()),
            backend: BackendKind::IoUring,
            parts: None,
        },
        &state,
    );
    assert!(matches!(
        r,
        Err(crate::virtio::block::BlockRestoreError::SizeChanged { .. })
    ));
}
