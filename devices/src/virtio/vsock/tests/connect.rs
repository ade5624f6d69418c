use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use super::*;

#[test]
fn test_vsock_guest_connect_transfer_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let listener = UnixListener::bind(format!("{}_5000", socket_path(&dir).display())).unwrap();
    g.send(g.header(1000, 5000, OP_REQUEST, 0), &[]);
    let (h, _) = g.wait_for(|h| h.dst_port == 1000);
    assert_eq!(
        (h.op, h.src_port, h.src_cid, h.dst_cid),
        (OP_RESPONSE, 5000, HOST_CID, GUEST_CID)
    );
    let (mut host, _) = listener.accept().unwrap();

    g.send(g.header(1000, 5000, OP_RW, 5), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    host.write_all(b"world").unwrap();
    let (h, data) = g.wait_for(|h| h.op == OP_RW);
    assert_eq!(
        (h.src_port, h.dst_port, data.as_slice()),
        (5000, 1000, &b"world"[..])
    );
    assert_eq!(h.buf_alloc, crate::virtio::vsock::CONN_BUF);

    let mut shut = g.header(1000, 5000, OP_SHUTDOWN, 0);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shut, &[]);
    let (h, _) = g.wait_for(|h| h.op != OP_CREDIT_UPDATE);
    assert_eq!(h.op, OP_RST);
    assert_eq!(host.read(&mut buf).unwrap(), 0, "host side sees EOF");
    assert_eq!(g.h.device.worker().borrow().handler.connections(), 0);
}

#[test]
fn test_vsock_guest_connect_without_listener_gets_rst() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    g.send(g.header(1001, 6000, OP_REQUEST, 0), &[]);
    let (h, _) = g.wait_for(|h| h.dst_port == 1001);
    assert_eq!(h.op, OP_RST);
}

#[test]
fn test_vsock_host_connect_transfer_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let mut host = UnixStream::connect(socket_path(&dir)).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = g.wait_for(|h| h.op == OP_REQUEST);
    assert_eq!(
        (req.dst_port, req.src_cid, req.dst_cid),
        (52, HOST_CID, GUEST_CID)
    );
    let host_port = req.src_port;
    g.send(g.header(52, host_port, OP_RESPONSE, 0), &[]);
    let mut reader = BufReader::new(host.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));

    host.write_all(b"ping").unwrap();
    let (h, data) = g.wait_for(|h| h.op == OP_RW);
    assert_eq!((h.dst_port, data.as_slice()), (52, &b"ping"[..]));
    g.send(g.header(52, host_port, OP_RW, 4), b"pong");
    let mut buf = [0u8; 4];
    reader.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // The host closes: the guest is told, answers RST, the connection is gone.
    drop(reader);
    drop(host);
    let (h, _) = g.wait_for(|h| h.op == OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.send(g.header(52, host_port, OP_RST, 0), &[]);
    assert_eq!(g.h.device.worker().borrow().handler.connections(), 0);
}

#[test]
fn test_vsock_host_bad_connect_line_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let mut host = UnixStream::connect(socket_path(&dir)).unwrap();
    host.write_all(b"HELLO 52\n").unwrap();
    g.h.run_until_irq(Duration::from_millis(100));
    let mut buf = [0u8; 8];
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert!(g.recv().is_empty());
}

#[test]
fn test_vsock_packet_for_unknown_connection_gets_rst() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    g.send(g.header(7, 8, OP_RW, 3), b"abc");
    let (h, _) = g.wait_for(|h| h.dst_port == 7);
    assert_eq!(h.op, OP_RST);
}

#[test]
fn test_vsock_packet_with_wrong_source_cid_gets_rst() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let mut hdr = g.header(9, 10, OP_REQUEST, 0);
    hdr.src_cid = 99;
    g.send(hdr, &[]);
    let (h, _) = g.wait_for(|h| h.dst_port == 9);
    assert_eq!(h.op, OP_RST);
}

#[test]
fn test_vsock_restore_sends_transport_reset_event() {
    use crate::persist::Persist;
    use crate::virtio::test_utils::copy_memory;
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    g.h.run_until_irq(Duration::from_millis(20));
    let state = g.h.device.save();
    let mem2 = copy_memory(&g.h.driver.mem);
    let dir2 = tempfile::tempdir().unwrap();
    let dev = Vsock::restore(
        super::super::VsockArgs {
            mem: mem2.clone(),
            uds_path: socket_path(&dir2),
            max_connections: crate::virtio::vsock::DEFAULT_MAX_CONNECTIONS,
            listener: None,
            parts: None,
        },
        &state,
    )
    .unwrap();
    let Guest {
        h,
        rx_bufs,
        ev_bufs,
        tx_scratch,
        ..
    } = g;
    let mut g2 = Guest {
        h: h.restored(dev, mem2),
        rx_bufs,
        events: Vec::new(),
        ev_bufs,
        tx_scratch,
    };
    g2.h.run_until_irq(Duration::from_secs(2));
    g2.recv();
    assert_eq!(g2.events, vec![EVENT_TRANSPORT_RESET]);
    // The restored device works: a guest connection through the new socket path.
    let listener = UnixListener::bind(format!("{}_77", socket_path(&dir2).display())).unwrap();
    g2.send(g2.header(2000, 77, OP_REQUEST, 0), &[]);
    let (h, _) = g2.wait_for(|h| h.dst_port == 2000);
    assert_eq!(h.op, OP_RESPONSE);
    listener.accept().unwrap();
}

#[test]
fn test_vsock_after_restore_nothing_reaches_rx_until_the_guest_handled_the_reset() {
    use crate::persist::Persist;
    use crate::virtio::test_utils::copy_memory;
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    g.h.run_until_irq(Duration::from_millis(20));
    let state = g.h.device.save();
    let mem2 = copy_memory(&g.h.driver.mem);
    let dir2 = tempfile::tempdir().unwrap();
    let dev = Vsock::restore(
        super::super::VsockArgs {
            mem: mem2.clone(),
            uds_path: socket_path(&dir2),
            max_connections: crate::virtio::vsock::DEFAULT_MAX_CONNECTIONS,
            listener: None,
            parts: None,
        },
        &state,
    )
    .unwrap();
    let Guest {
        h,
        rx_bufs,
        ev_bufs,
        tx_scratch,
        ..
    } = g;
    let mut g2 = Guest {
        h: h.restored(dev, mem2),
        rx_bufs,
        events: Vec::new(),
        ev_bufs,
        tx_scratch,
    };
    // A host connects at once, before the guest has looked at its event queue. Linux would
    // handle a connection request that arrives with the reset before the reset (rx work runs
    // first), and the reset would then close that new connection.
    let mut host = UnixStream::connect(socket_path(&dir2)).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        g2.h.run_until_irq(Duration::from_millis(50));
    }
    assert!(
        g2.h.driver.take_used(0).is_empty(),
        "a packet reached rx before the guest handled TRANSPORT_RESET"
    );
    // The guest takes the event, hands the buffer back and notifies: now the request comes.
    g2.recv();
    assert_eq!(g2.events, vec![EVENT_TRANSPORT_RESET]);
    g2.h.driver.kick(2);
    let (req, _) = g2.wait_for(|h| h.op == OP_REQUEST);
    assert_eq!(req.dst_port, 52);
}

#[test]
fn test_vsock_flood_without_rx_buffers_keeps_control_queue_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mem = test_memory();
    let dev = Vsock::new_vsock(
        VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: socket_path(&dir),
            max_connections: crate::virtio::vsock::DEFAULT_MAX_CONNECTIONS,
        },
        mem.clone(),
    )
    .unwrap();
    let mut h = Harness::new(dev, mem);
    h.driver.init(256);
    // No rx buffers posted; 2000 packets for unknown connections, each asking for an RST.
    let a = h.driver.alloc(HDR_SIZE as u64);
    for i in 0..2000u32 {
        let mut hdr = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: i,
            dst_port: 1,
            ty: TYPE_STREAM,
            op: OP_RW,
            ..Default::default()
        };
        hdr.len = 0;
        h.driver
            .mem
            .write_slice(&hdr.encode(), GuestAddress(a))
            .unwrap();
        h.driver
            .add_chain(1, &[Buf::out(a, HDR_SIZE as u32)])
            .unwrap();
        h.driver.kick(1);
        h.wait_used(1, 1);
    }
    let pending = h.device.worker().borrow().handler.pending_control();
    assert!(pending <= 1024, "{pending} control packets queued");
}

#[test]
fn test_vsock_host_connect_guest_never_answers_is_closed_after_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let mut host = UnixStream::connect(socket_path(&dir)).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let (req, _) = g.wait_for(|h| h.op == OP_REQUEST);
    assert_eq!(req.dst_port, 77);
    // The guest stays silent: after CONNECT_TIMEOUT the host sees EOF, the guest an RST.
    let start = std::time::Instant::now();
    let (rst, _) = g.wait_for(|h| h.op == OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 77));
    assert!(
        start.elapsed() + std::time::Duration::from_millis(600)
            >= crate::virtio::vsock::queue_handler::CONNECT_TIMEOUT
    );
    host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        host.read(&mut buf).unwrap(),
        0,
        "the host side is closed, not left hanging"
    );
    assert_eq!(g.h.device.worker().borrow().handler.connections(), 0);
}

#[test]
fn test_vsock_host_that_never_sends_connect_is_closed_after_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let mut host = UnixStream::connect(socket_path(&dir)).unwrap();
    host.set_read_timeout(Some(std::time::Duration::from_secs(6)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = [0u8; 8];
    while start.elapsed() < std::time::Duration::from_secs(5) {
        g.h.run_until_irq(std::time::Duration::from_millis(200));
        host.set_nonblocking(true).unwrap();
        match host.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => panic!("unexpected data"),
            Err(_) => {}
        }
    }
    host.set_nonblocking(true).unwrap();
    assert_eq!(
        host.read(&mut buf).ok(),
        Some(0),
        "a host that never sends CONNECT is dropped"
    );
}
