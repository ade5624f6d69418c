//! Large transfers both ways, with the receiver's credit forcing back-pressure.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use super::*;

const TOTAL: usize = 4 << 20;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn connect(g: &mut Guest, dir: &tempfile::TempDir, port: u32) -> std::os::unix::net::UnixStream {
    let listener = UnixListener::bind(format!("{}_{port}", socket_path(dir).display())).unwrap();
    g.send(g.header(1000, port, OP_REQUEST, 0), &[]);
    let (h, _) = g.wait_for(|h| h.dst_port == 1000);
    assert_eq!(h.op, OP_RESPONSE);
    listener.accept().unwrap().0
}

#[test]
fn test_vsock_host_to_guest_large_transfer_respects_guest_credit() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let mut host = connect(&mut g, &dir, 6000);
    let writer = std::thread::spawn(move || {
        host.write_all(&pattern(TOTAL)).unwrap();
        host
    });
    // The guest announces a 64 KiB buffer and consumes slowly: the device must never have more
    // than 64 KiB unacknowledged.
    let guest_buf: u32 = 64 * 1024;
    let mut got = Vec::with_capacity(TOTAL);
    let mut acked = 0u32;
    let end = Instant::now() + Duration::from_secs(30);
    while got.len() < TOTAL {
        assert!(Instant::now() < end, "transfer stalled at {}", got.len());
        for (h, d) in g.recv() {
            if h.op == OP_RW {
                got.extend_from_slice(&d);
            }
        }
        assert!(
            got.len() as u32 - acked <= guest_buf,
            "device overran the guest's credit"
        );
        if got.len() as u32 - acked >= guest_buf / 2 || got.len() == TOTAL {
            acked = got.len() as u32;
            let mut h = g.header(1000, 6000, OP_CREDIT_UPDATE, 0);
            h.fwd_cnt = acked;
            g.send(h, &[]);
        } else {
            g.h.run_until_irq(Duration::from_millis(200));
        }
    }
    assert!(got == pattern(TOTAL), "data corrupted");
    drop(writer.join().unwrap());
}

#[test]
fn test_vsock_guest_to_host_large_transfer_waits_for_host_credit() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let mut host = connect(&mut g, &dir, 6001);
    // The host reads slowly at first, so the device's buffer fills and the guest must wait for
    // credit updates.
    let reader = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let mut all = Vec::with_capacity(TOTAL);
        host.read_to_end(&mut all).unwrap();
        all
    });
    let data = pattern(TOTAL);
    let mut sent = 0usize;
    let (mut buf_alloc, mut fwd_cnt) = (crate::virtio::vsock::CONN_BUF, 0u32);
    let end = Instant::now() + Duration::from_secs(30);
    while sent < TOTAL {
        assert!(Instant::now() < end, "transfer stalled at {sent}");
        for (h, _) in g.recv() {
            if h.src_port == 6001 {
                buf_alloc = h.buf_alloc;
                fwd_cnt = h.fwd_cnt;
            }
        }
        let credit = buf_alloc - (sent as u32 - fwd_cnt);
        if credit == 0 {
            g.h.run_until_irq(Duration::from_millis(200));
            continue;
        }
        let n = (credit as usize).min(32 * 1024).min(TOTAL - sent);
        g.send(g.header(1000, 6001, OP_RW, n as u32), &data[sent..sent + n]);
        sent += n;
    }
    let mut shut = g.header(1000, 6001, OP_SHUTDOWN, 0);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shut, &[]);
    // The device flushes what it still buffers, then resets the connection.
    let (h, _) = g.wait_for(|h| h.op == OP_RST);
    assert_eq!(h.src_port, 6001);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(got == data, "data corrupted");
}
