//! virtio-mmio transport behaviour, driven through its registers (with virtio-rng behind it).

use std::time::Duration;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;

use super::VIRTIO_F_VERSION_1;
use super::mmio::{MMIO_MAGIC, MmioTransportArgs, RestoreTransportError};
use super::rng::{Rng, RngConfig, RngHandler};
use super::test_utils::{Buf, Harness, test_memory};
use crate::bus::{BusDevice, lock_device};
use crate::persist::Persist;

fn harness() -> Harness<RngHandler> {
    let mem = test_memory();
    Harness::new(
        Rng::new_rng(RngConfig::default(), mem.clone()).unwrap(),
        mem,
    )
}

#[test]
fn test_mmio_identity_registers_read_spec_values() {
    let h = harness();
    assert_eq!(h.driver.read_reg(reg::VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(h.driver.read_reg(reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(h.driver.read_reg(reg::VIRTIO_MMIO_DEVICE_ID), 4);
    assert_eq!(h.driver.device_features(), 1 << VIRTIO_F_VERSION_1);
    h.driver.write_reg(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(h.driver.read_reg(reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    h.driver.write_reg(reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(h.driver.read_reg(reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
}

#[test]
fn test_mmio_features_without_version_1_refuse_features_ok() {
    let mut h = harness();
    assert!(!h.driver.negotiate(0));
    assert!(!h.driver.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << 3)));
    assert!(h.driver.negotiate(1 << VIRTIO_F_VERSION_1));
}

#[test]
fn test_mmio_status_out_of_order_is_ignored() {
    let h = harness();
    h.driver
        .write_reg(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(h.driver.status(), 0);
    h.driver
        .write_reg(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    h.driver.write_reg(
        reg::VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(h.driver.status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
}

#[test]
fn test_mmio_driver_ok_with_queue_not_ready_needs_reset() {
    let mut h = harness();
    assert!(h.driver.negotiate(1 << VIRTIO_F_VERSION_1));
    let s = h.driver.status();
    h.driver
        .write_reg(reg::VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_ne!(h.driver.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // Reset clears it and the device works after a proper initialization.
    h.driver.write_reg(reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(h.driver.status(), 0);
    h.driver.init(16);
    let a = h.driver.alloc(32);
    assert_eq!(h.request(0, &[Buf::inp(a, 32)]).unwrap().len, 32);
}

#[test]
fn test_mmio_queue_outside_memory_needs_reset() {
    let mut h = harness();
    assert!(h.driver.negotiate(1 << VIRTIO_F_VERSION_1));
    h.driver.setup_queues(16);
    h.driver.write_reg(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    h.driver.write_reg(reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
    let s = h.driver.status();
    h.driver
        .write_reg(reg::VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_ne!(h.driver.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}

#[test]
fn test_mmio_reset_then_reinit_processes_requests() {
    let mut h = harness();
    h.driver.init(16);
    let a = h.driver.alloc(32);
    assert!(h.request(0, &[Buf::inp(a, 32)]).is_some());
    h.driver.write_reg(reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(h.driver.status(), 0);
    assert_eq!(h.driver.read_reg(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    h.driver.init(8);
    assert_eq!(
        h.driver.status(),
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
    );
    assert_eq!(h.request(0, &[Buf::inp(a, 32)]).unwrap().len, 32);
}

#[test]
fn test_mmio_interrupt_ack_clears_status_bits() {
    let mut h = harness();
    h.driver.init(16);
    let a = h.driver.alloc(8);
    h.driver.add_chain(0, &[Buf::inp(a, 8)]).unwrap();
    h.driver.kick(0);
    assert!(h.run_until_irq(Duration::from_secs(2)));
    assert_eq!(h.driver.read_reg(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    h.driver.write_reg(reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(h.driver.read_reg(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn test_mmio_unaligned_or_narrow_register_access_is_ignored() {
    let h = harness();
    let mut b = [0xffu8; 2];
    lock_device(&h.driver.transport).read(0, &mut b);
    assert_eq!(b, [0, 0]);
    lock_device(&h.driver.transport).write(0x70, &[1]);
    assert_eq!(h.driver.status(), 0);
}

#[test]
fn test_mmio_restore_wrong_device_type_is_refused() {
    let mut h = harness();
    h.driver.init(16);
    let mut state = lock_device(&h.driver.transport).save();
    state.device_type = 2;
    let parts = super::front::Parts::new(1).unwrap();
    let args = |parts: super::front::Parts| MmioTransportArgs {
        device: Box::new(super::front::Front::new(
            4,
            1 << VIRTIO_F_VERSION_1,
            vec![256],
            vec![],
            parts.tx,
        )),
        mem: test_memory(),
        interrupt: parts.interrupt,
        queue_evts: parts.queue_evts,
    };
    assert!(matches!(
        super::MmioTransport::restore(args(parts), &state),
        Err(RestoreTransportError::DeviceType {
            saved: 2,
            device: 4
        })
    ));
    let mut state = lock_device(&h.driver.transport).save();
    state.acked_features |= 1 << 7;
    assert!(matches!(
        super::MmioTransport::restore(args(super::front::Parts::new(1).unwrap()), &state),
        Err(RestoreTransportError::Features { .. })
    ));
    let mut state = lock_device(&h.driver.transport).save();
    state.queues[0].size = 512;
    assert!(matches!(
        super::MmioTransport::restore(args(super::front::Parts::new(1).unwrap()), &state),
        Err(RestoreTransportError::QueueSize(0))
    ));
}

#[test]
fn test_mmio_reset_before_worker_runs_leaves_rings_untouched() {
    let mut h = harness();
    h.driver.init(16);
    let a = h.driver.alloc(32);
    h.driver.add_chain(0, &[Buf::inp(a, 32)]).unwrap();
    h.driver.kick(0);
    // The driver resets before the loop has seen the kick: the worker must not complete the
    // request into rings the driver has taken back.
    h.driver.write_reg(reg::VIRTIO_MMIO_STATUS, 0);
    assert!(!h.run_until_irq(Duration::from_millis(50)));
    assert!(h.driver.take_used(0).is_empty());
    assert_eq!(lock_device(&h.driver.transport).status(), 0);
}

/// A driver part-way through set-up (or a hostile one) may leave any queue size and any acked
/// features in the registers until FEATURES_OK and DRIVER_OK check them; a snapshot taken at that
/// moment must restore, and the restored transport must check them just the same.
#[test]
fn test_mmio_restore_mid_setup_with_bad_queue_size_and_features_succeeds() {
    let args = || {
        let parts = super::front::Parts::new(1).unwrap();
        MmioTransportArgs {
            device: Box::new(super::front::Front::new(
                4,
                1 << VIRTIO_F_VERSION_1,
                vec![256],
                vec![],
                parts.tx,
            )),
            mem: test_memory(),
            interrupt: parts.interrupt,
            queue_evts: parts.queue_evts,
        }
    };
    let status = |t: &mut super::MmioTransport| {
        let mut b = [0u8; 4];
        t.read(u64::from(reg::VIRTIO_MMIO_STATUS), &mut b);
        u32::from_le_bytes(b)
    };
    let write = |t: &mut super::MmioTransport, off: u32, v: u32| {
        t.write(u64::from(off), &v.to_le_bytes());
    };
    let ack_driver = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;

    // Negotiating: unoffered features acked, queue size 3.
    let h = harness();
    h.driver
        .write_reg(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    h.driver.write_reg(reg::VIRTIO_MMIO_STATUS, ack_driver);
    h.driver.write_reg(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    h.driver
        .write_reg(reg::VIRTIO_MMIO_DRIVER_FEATURES, 0xdead_beef);
    h.driver.write_reg(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    h.driver.write_reg(reg::VIRTIO_MMIO_QUEUE_NUM, 3);
    let state = lock_device(&h.driver.transport).save();
    let mut t = super::MmioTransport::restore(args(), &state).expect("restore mid-negotiation");
    assert_eq!(status(&mut t), ack_driver);
    write(
        &mut t,
        reg::VIRTIO_MMIO_STATUS,
        ack_driver | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(status(&mut t), ack_driver, "FEATURES_OK still refused");

    // DRIVER_OK refused for the bad size: the device needs a reset.
    let mut h = harness();
    assert!(h.driver.negotiate(1 << VIRTIO_F_VERSION_1));
    h.driver.write_reg(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    h.driver.write_reg(reg::VIRTIO_MMIO_QUEUE_NUM, 3);
    h.driver.write_reg(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    let s = h.driver.status();
    h.driver
        .write_reg(reg::VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_ne!(h.driver.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    let state = lock_device(&h.driver.transport).save();
    let mut t = super::MmioTransport::restore(args(), &state).expect("restore needing reset");
    assert_ne!(status(&mut t) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    write(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(status(&mut t), 0);
}
