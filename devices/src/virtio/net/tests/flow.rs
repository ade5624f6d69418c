//! Frames both ways, mergeable and single buffers, flow control, slots and restore.

use std::time::Duration;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_S_LINK_UP,
};

use super::*;
use crate::persist::Persist;
use crate::virtio::net::NetArgs;
use crate::virtio::test_utils::copy_memory;

#[test]
fn test_net_tx_frame_reaches_backend_intact() {
    let mut g = NetGuest::new(0);
    for (i, pieces) in [1usize, 2, 5].into_iter().enumerate() {
        let f = frame(&pattern(1500, i as u8));
        g.send(&f, pieces);
        let mut got = vec![0u8; 4096];
        let n = g.host().recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..], "frame sent in {pieces} descriptors");
    }
    let s = g.stats();
    assert_eq!(s.tx_frames, 3);
    assert_eq!(s.tx_bytes, 3 * 1512);
    assert_eq!(s.tx_dropped, 0);
}

#[test]
fn test_net_tx_64k_frame_passes_and_larger_is_dropped() {
    let mut g = NetGuest::new(0);
    let big = frame(&pattern(super::super::MAX_FRAME_LEN, 7));
    g.send(&big, 17);
    let mut got = vec![0u8; super::super::MAX_FRAME_BUF + 16];
    let n = g.host().recv(&mut got).unwrap();
    assert_eq!(n, big.len());
    assert_eq!(&got[..n], &big[..]);
    let too_big = frame(&pattern(super::super::MAX_FRAME_LEN + 1, 8));
    g.send(&too_big, 3);
    assert_eq!(g.stats().tx_dropped, 1);
    g.host().set_nonblocking(true).unwrap();
    assert!(
        g.host().recv(&mut got).is_err(),
        "an oversized frame reached the host"
    );
    assert!(!g.needs_reset());
}

#[test]
fn test_net_rx_frame_reaches_guest_single_buffers() {
    let mut g = NetGuest::new(MRG);
    g.post_rx(4, 2048);
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|i| frame(&pattern(100 + 500 * i, i as u8)))
        .collect();
    for f in &frames {
        g.host().send(f).unwrap();
    }
    let got = g.wait_received(3);
    assert_eq!(got.len(), 3);
    for (f, r) in frames.iter().zip(&got) {
        assert_eq!(&r[..10], &f[..10]);
        assert_eq!(u16::from_le_bytes([r[10], r[11]]), 1, "num_buffers");
        assert_eq!(&r[12..], &f[12..]);
    }
    assert_eq!(g.stats().rx_frames, 3);
}

#[test]
fn test_net_rx_single_buffer_too_small_drops_frame_keeps_buffer() {
    let mut g = NetGuest::new(MRG);
    g.post_rx(1, 256);
    g.host().send(&frame(&pattern(1000, 1))).unwrap();
    let small = frame(&pattern(100, 2));
    g.host().send(&small).unwrap();
    let got = g.wait_received(1);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][12..], &small[12..]);
    assert_eq!(g.stats().rx_dropped, 1);
    assert!(!g.needs_reset());
}

#[test]
fn test_net_rx_mergeable_frame_spans_buffers() {
    let mut g = NetGuest::new(0);
    g.post_rx(8, 1024);
    let f = frame(&pattern(3000, 3));
    g.host().send(&f).unwrap();
    let got = g.wait_received(1);
    assert_eq!(got.len(), 1);
    assert_eq!(u16::from_le_bytes([got[0][10], got[0][11]]), 3);
    assert_eq!(got[0].len(), f.len());
    assert_eq!(&got[0][12..], &f[12..]);
    // The next frame starts in a fresh buffer.
    let f2 = frame(&pattern(50, 4));
    g.host().send(&f2).unwrap();
    let got = g.wait_received(1);
    assert_eq!(&got[0][12..], &f2[12..]);
    assert_eq!(u16::from_le_bytes([got[0][10], got[0][11]]), 1);
}

#[test]
fn test_net_rx_mergeable_waits_for_enough_buffers() {
    let mut g = NetGuest::new(0);
    g.post_rx(2, 1024);
    let f = frame(&pattern(3000, 5));
    g.host().send(&f).unwrap();
    g.run();
    assert!(
        g.received().is_empty(),
        "a frame delivered into too few buffers"
    );
    assert!(g.h.device.worker().borrow().handler.rx_waiting());
    g.post_rx(2, 1024);
    let got = g.wait_received(1);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][12..], &f[12..]);
    assert_eq!(g.stats().rx_dropped, 0);
}

#[test]
fn test_net_rx_stops_reading_without_buffers_and_resumes_in_order() {
    let mut g = NetGuest::new(MRG);
    let frames: Vec<Vec<u8>> = (0..6).map(|i| frame(&pattern(64, i as u8))).collect();
    for f in &frames {
        g.host().send(f).unwrap();
    }
    let queued = outq(g.host());
    assert!(queued > 0);
    g.run();
    {
        let w = g.h.device.worker().borrow();
        // One frame read and held; the others stay in the backend.
        assert!(w.handler.rx_waiting());
        assert_eq!(w.handler.stats().rx_frames, 0);
    }
    let left = outq(g.host());
    assert!(
        left > 0 && left * 6 >= queued * 5 - 5,
        "the device read more than one frame without buffers ({queued} -> {left} bytes queued)"
    );
    g.host().set_nonblocking(true).unwrap();
    let mut delivered = Vec::new();
    for batch in [1usize, 3, 2] {
        g.post_rx(batch, 2048);
        delivered.extend(g.wait_received(batch));
    }
    assert_eq!(delivered.len(), 6);
    for (f, r) in frames.iter().zip(&delivered) {
        assert_eq!(&r[12..], &f[12..]);
    }
    let s = g.stats();
    assert_eq!((s.rx_frames, s.rx_dropped), (6, 0));
    assert_eq!(outq(g.host()), 0);
    assert!(!g.h.device.worker().borrow().handler.rx_waiting());
}

#[test]
fn test_net_rx_burst_larger_than_batch_all_delivered() {
    let mut g = NetGuest::new(MRG);
    let n = super::super::RX_BATCH * 2 + 5;
    g.post_rx(n, 256);
    for i in 0..n {
        g.host().send(&frame(&pattern(60, i as u8))).unwrap();
    }
    let got = g.wait_received(n);
    assert_eq!(got.len(), n);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(&r[12..], &pattern(60, i as u8)[..]);
    }
}

#[test]
fn test_net_offloads_follow_acked_features() {
    let mut all = NetGuest::new(0);
    all.run();
    let off = all
        .h
        .device
        .worker()
        .borrow()
        .handler
        .backend()
        .unwrap()
        .offload();
    assert_eq!(
        off,
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
    );
    let mut no_csum = NetGuest::new(1 << VIRTIO_NET_F_GUEST_CSUM);
    no_csum.run();
    assert_eq!(
        no_csum
            .h
            .device
            .worker()
            .borrow()
            .handler
            .backend()
            .unwrap()
            .offload(),
        0,
        "TSO without checksum offload"
    );
    let mut csum_only = NetGuest::new(
        (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_UFO),
    );
    csum_only.run();
    assert_eq!(
        csum_only
            .h
            .device
            .worker()
            .borrow()
            .handler
            .backend()
            .unwrap()
            .offload(),
        libc::TUN_F_CSUM
    );
}

/// Bytes of datagrams sent on `sock` and not yet read by its peer (SIOCOUTQ).
fn outq(sock: &std::os::unix::net::UnixDatagram) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `n`, which we own; the fd is open.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(rc, 0);
    n as usize
}

fn link_status(g: &NetGuest) -> u16 {
    let mut s = [0u8; 2];
    g.h.driver.read_config(6, &mut s);
    u16::from_le_bytes(s)
}

#[test]
fn test_net_config_space_has_mac_and_link() {
    let g = NetGuest::new(0);
    let mut mac = [0u8; 6];
    g.h.driver.read_config(0, &mut mac);
    assert_eq!(mac, MAC);
    assert_eq!(link_status(&g), VIRTIO_NET_S_LINK_UP as u16);
    let slot = NetGuest::with_backend(None, 0);
    assert_eq!(link_status(&slot), 0);
}

#[test]
fn test_net_slot_drops_and_counts_tx() {
    let mut g = NetGuest::with_backend(None, 0);
    for i in 0..3 {
        g.send(&frame(&pattern(100, i)), 2);
    }
    let s = g.stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (0, 3));
    assert!(!g.needs_reset());
}

#[test]
fn test_net_slot_restored_with_backend_links_up_and_moves_frames() {
    let mut g = NetGuest::with_backend(None, 0);
    g.post_rx(4, 2048);
    let saved = g.h.device.save();
    assert!(!saved.link_up);
    let json = serde_json::to_string(&saved).unwrap();
    let loaded: super::super::NetState = serde_json::from_str(&json).unwrap();
    let generation = g.h.driver.read_reg(reg::VIRTIO_MMIO_CONFIG_GENERATION);

    let (backend, host) = datagram_pair();
    let mem2 = copy_memory(&g.h.driver.mem);
    let dev = Net::restore(
        NetArgs {
            mem: mem2.clone(),
            backend: Some(backend),
            parts: None,
        },
        &loaded,
    )
    .unwrap();
    let rx_bufs = std::mem::take(&mut g.rx_bufs);
    let h = g.h.restored(dev, mem2);
    let mut g2 = NetGuest::with_harness(h);
    g2.rx_bufs = rx_bufs;
    g2.host = Some(host);
    // Announced by the restore itself, before the loop ran.
    assert_ne!(
        g2.h.driver.read_reg(reg::VIRTIO_MMIO_INTERRUPT_STATUS)
            & crate::virtio::VIRTIO_MMIO_INT_CONFIG,
        0
    );
    assert_eq!(
        g2.h.driver.read_reg(reg::VIRTIO_MMIO_CONFIG_GENERATION),
        generation + 1
    );
    assert_eq!(link_status(&g2), VIRTIO_NET_S_LINK_UP as u16);
    // The buffers posted before the snapshot receive now; frames go out.
    let f = frame(&pattern(400, 9));
    g2.host().send(&f).unwrap();
    let got = g2.wait_received(1);
    assert_eq!(&got[0][12..], &f[12..]);
    let out = frame(&pattern(80, 10));
    g2.send(&out, 1);
    let mut buf = [0u8; 256];
    let n = g2.host().recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &out[..]);
    assert!(g2.h.device.save().link_up);
}

#[test]
fn test_net_reset_drops_held_frame_and_reactivates() {
    let mut g = NetGuest::new(MRG);
    g.host().send(&frame(&pattern(64, 1))).unwrap();
    g.run();
    assert!(g.h.device.worker().borrow().handler.rx_waiting());
    g.h.driver.write_reg(reg::VIRTIO_MMIO_STATUS, 0);
    g.h.run_until_irq(Duration::from_millis(30));
    assert!(!g.h.device.worker().borrow().handler.rx_waiting());
    g.rx_bufs.clear();
    g.init(MRG);
    g.post_rx(1, 2048);
    let f = frame(&pattern(64, 2));
    g.host().send(&f).unwrap();
    let got = g.wait_received(1);
    assert_eq!(&got[0][12..], &f[12..]);
}

#[test]
fn test_net_device_with_backend_restored_without_one_links_down() {
    let mut g = NetGuest::new(0);
    g.run();
    let saved = g.h.device.save();
    assert!(saved.link_up);
    let mem2 = copy_memory(&g.h.driver.mem);
    let dev = Net::restore(
        NetArgs {
            mem: mem2.clone(),
            backend: None,
            parts: None,
        },
        &saved,
    )
    .unwrap();
    let h = g.h.restored(dev, mem2);
    let mut g2 = NetGuest::with_harness(h);
    assert_ne!(
        g2.h.driver.read_reg(reg::VIRTIO_MMIO_INTERRUPT_STATUS)
            & crate::virtio::VIRTIO_MMIO_INT_CONFIG,
        0,
        "the link change is announced"
    );
    assert_eq!(link_status(&g2), 0);
    g2.send(&frame(&pattern(64, 1)), 1);
    let s = g2.stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (0, 1));
    assert!(!g2.h.device.save().link_up);
}
