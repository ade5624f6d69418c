//! A hostile driver: malformed transmit chains are dropped (the device goes on), broken rings
//! and unusable receive buffers fail the device; nothing panics, nothing is written outside the
//! chains.

use std::time::Duration;

use super::*;

/// The device keeps working: a good frame still goes out.
fn assert_tx_still_works(g: &mut NetGuest) {
    assert!(!g.needs_reset());
    let f = frame(&pattern(300, 42));
    g.send(&f, 2);
    let mut got = vec![0u8; 1024];
    let n = g.host().recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
}

#[test]
fn test_net_tx_device_writable_buffer_is_dropped() {
    let mut g = NetGuest::new(0);
    let a = g.h.driver.alloc(2048);
    g.h.driver
        .mem
        .write_slice(&frame(&pattern(100, 1)), GuestAddress(a))
        .unwrap();
    g.send_chain(&[Buf::out(a, 12), Buf::inp(a + 12, 100)]);
    assert_eq!(g.stats().tx_dropped, 1);
    assert_tx_still_works(&mut g);
    assert_eq!(g.stats().tx_frames, 1);
}

#[test]
fn test_net_tx_shorter_than_header_is_dropped() {
    let mut g = NetGuest::new(0);
    let a = g.h.driver.alloc(64);
    g.send_chain(&[Buf::out(a, 11)]);
    g.send_chain(&[Buf::out(a, 0)]);
    assert_eq!(g.stats().tx_dropped, 2);
    assert_tx_still_works(&mut g);
}

#[test]
fn test_net_tx_chain_claiming_gigabytes_is_dropped_without_reading() {
    let mut g = NetGuest::new(0);
    let a = g.h.driver.alloc(4096);
    // Each buffer is in memory, but together far past the frame cap: refused before any copy.
    let bufs: Vec<Buf> = (0..8).map(|_| Buf::out(a, 4096)).collect::<Vec<_>>();
    let mut huge = bufs.clone();
    huge.extend((0..12).map(|_| Buf::out(0, 32 << 20)));
    g.send_chain(&huge);
    assert_eq!(g.stats().tx_dropped, 1);
    assert_tx_still_works(&mut g);
}

#[test]
fn test_net_tx_buffer_outside_memory_fails_device() {
    let mut g = NetGuest::new(0);
    let end = crate::virtio::test_utils::MEM_SIZE as u64;
    let head = g.h.driver.add_chain(TX, &[Buf::out(end - 8, 64)]).unwrap();
    let _ = head;
    g.h.driver.kick(TX);
    g.h.run_until_irq(Duration::from_millis(200));
    assert!(g.needs_reset());
    assert_eq!(g.stats().tx_frames, 0);
    g.host().set_nonblocking(true).unwrap();
    let mut buf = [0u8; 128];
    assert!(g.host().recv(&mut buf).is_err());
}

#[test]
fn test_net_tx_looping_chain_fails_device() {
    let mut g = NetGuest::new(0);
    let a = g.h.driver.alloc(64);
    g.h.driver
        .write_desc(TX, 0, a, 32, crate::virtio::test_utils::F_NEXT, 1);
    g.h.driver
        .write_desc(TX, 1, a, 32, crate::virtio::test_utils::F_NEXT, 0);
    g.h.driver.publish(TX, 0);
    g.h.driver.kick(TX);
    g.h.run_until_irq(Duration::from_millis(200));
    assert!(g.needs_reset());
}

#[test]
fn test_net_rx_device_readable_buffer_fails_device() {
    let mut g = NetGuest::new(0);
    let a = g.h.driver.alloc(2048);
    g.h.driver.add_chain(RX, &[Buf::out(a, 2048)]).unwrap();
    g.h.driver.kick(RX);
    let before = {
        let mut v = vec![0u8; 2048];
        g.h.driver.mem.read_slice(&mut v, GuestAddress(a)).unwrap();
        v
    };
    g.host().send(&frame(&pattern(100, 1))).unwrap();
    g.h.run_until_irq(Duration::from_millis(200));
    assert!(g.needs_reset());
    let mut after = vec![0u8; 2048];
    g.h.driver
        .mem
        .read_slice(&mut after, GuestAddress(a))
        .unwrap();
    assert_eq!(before, after, "the device wrote a device-readable buffer");
}

#[test]
fn test_net_rx_buffer_smaller_than_header_fails_device() {
    let mut g = NetGuest::new(0);
    let a = g.h.driver.alloc(64);
    g.h.driver.add_chain(RX, &[Buf::inp(a, 8)]).unwrap();
    g.h.driver.kick(RX);
    g.host().send(&frame(&pattern(100, 1))).unwrap();
    g.h.run_until_irq(Duration::from_millis(200));
    assert!(g.needs_reset());
}

#[test]
fn test_net_rx_runt_from_backend_is_dropped() {
    let mut g = NetGuest::new(0);
    g.post_rx(2, 2048);
    g.host().send(&[1, 2, 3]).unwrap();
    let f = frame(&pattern(70, 3));
    g.host().send(&f).unwrap();
    let got = g.wait_received(1);
    assert_eq!(&got[0][12..], &f[12..]);
    assert_eq!(g.stats().rx_dropped, 1);
}

#[test]
fn test_net_avail_index_too_far_fails_device() {
    let mut g = NetGuest::new(0);
    g.h.driver.set_avail_idx(TX, 1000);
    g.h.driver.kick(TX);
    g.h.run_until_irq(Duration::from_millis(200));
    assert!(g.needs_reset());
}

#[test]
fn test_net_tx_full_ring_all_arrive_in_order() {
    // The whole ring (256 chains, one turn's batch) at once: every frame arrives, in order.
    let mut g = NetGuest::new(0);
    let n = 256;
    let a = g.h.driver.alloc(64 * n as u64);
    for i in 0..n {
        let f = frame(&pattern(40, i as u8));
        g.h.driver
            .mem
            .write_slice(&f, GuestAddress(a + 64 * i as u64))
            .unwrap();
        g.h.driver
            .add_chain(TX, &[Buf::out(a + 64 * i as u64, f.len() as u32)])
            .unwrap();
    }
    g.h.driver.kick(TX);
    let used = g.h.wait_used(TX, n);
    assert_eq!(used.len(), n);
    g.host().set_nonblocking(true).unwrap();
    let mut buf = [0u8; 128];
    for i in 0..n {
        let got = g.host().recv(&mut buf).unwrap();
        assert_eq!(&buf[12..got], &pattern(40, i as u8)[..], "frame {i}");
    }
}
