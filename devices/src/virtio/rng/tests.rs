use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::{Rng, RngConfig, RngHandler};
use crate::virtio::test_utils::{Buf, Harness, test_memory};

/// Asks for 256 random bytes twice and checks they arrived (used by the conformance test too).
pub(crate) fn rng_io(h: &mut Harness<RngHandler>, _round: u32) {
    let a = h.driver.alloc(256);
    let b = h.driver.alloc(256);
    let u = h
        .request(0, &[Buf::inp(a, 128), Buf::inp(a + 128, 128)])
        .unwrap();
    assert_eq!(u.len, 256);
    let u = h.request(0, &[Buf::inp(b, 256)]).unwrap();
    assert_eq!(u.len, 256);
    let mut x = [0u8; 256];
    let mut y = [0u8; 256];
    h.driver.mem.read_slice(&mut x, GuestAddress(a)).unwrap();
    h.driver.mem.read_slice(&mut y, GuestAddress(b)).unwrap();
    assert_ne!(x, [0u8; 256]);
    assert_ne!(x, y);
}

fn harness() -> Harness<RngHandler> {
    let mem = test_memory();
    let mut h = Harness::new(
        Rng::new_rng(RngConfig::default(), mem.clone()).unwrap(),
        mem,
    );
    h.driver.init(16);
    h
}

#[test]
fn test_rng_request_fills_buffers() {
    let mut h = harness();
    rng_io(&mut h, 0);
}

#[test]
fn test_rng_readable_buffer_gets_zero_bytes() {
    let mut h = harness();
    let a = h.driver.alloc(64);
    let u = h
        .request(0, &[Buf::out(a, 16), Buf::inp(a + 16, 48)])
        .unwrap();
    assert_eq!(u.len, 0);
}

#[test]
fn test_rng_huge_buffer_is_capped() {
    let mut h = harness();
    let a = h.driver.alloc(1 << 20);
    let u = h.request(0, &[Buf::inp(a, 1 << 20)]).unwrap();
    assert_eq!(u.len as usize, super::MAX_REQUEST_BYTES);
}

#[test]
fn test_rng_before_driver_ok_does_nothing() {
    let mem = test_memory();
    let mut h = Harness::new(
        Rng::new_rng(RngConfig::default(), mem.clone()).unwrap(),
        mem,
    );
    assert!(!h.run_until_irq(Duration::from_millis(30)));
}

#[test]
fn test_rng_restore_with_parts_of_another_queue_count_is_refused() {
    use super::RngArgs;
    use crate::persist::Persist;
    use crate::virtio::front::Parts;
    let h = harness();
    let state = h.device.save();
    let refused = Rng::restore(
        RngArgs {
            mem: test_memory(),
            parts: Some(Parts::new(3).unwrap()),
        },
        &state,
    );
    assert!(matches!(
        refused,
        Err(crate::virtio::mmio::RestoreTransportError::Queues { .. })
    ));
    Rng::restore(
        RngArgs {
            mem: test_memory(),
            parts: Some(Parts::new(1).unwrap()),
        },
        &state,
    )
    .unwrap();
}
