//! What a hostile guest (or host client) must not be able to do to the loop: block it on a host
//! listener that never accepts, or use up the VMM's file descriptors.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};

use super::*;
use crate::virtio::vsock::{DEFAULT_MAX_CONNECTIONS, FD_RESERVE, effective_max_connections};

/// Runs the loop until every port of `ports` got a RESPONSE or RST; returns the op per port.
fn replies(g: &mut Guest, ports: &[u32]) -> HashMap<u32, u16> {
    let mut got = HashMap::new();
    let end = Instant::now() + Duration::from_secs(10);
    while got.len() < ports.len() {
        for (h, _) in g.recv() {
            if h.op == OP_RESPONSE || h.op == OP_RST {
                got.insert(h.dst_port, h.op);
            }
        }
        assert!(Instant::now() < end, "replies missing: {got:?}");
        if got.len() < ports.len() {
            g.h.run_until_irq(Duration::from_millis(100));
        }
    }
    got
}

#[test]
fn test_vsock_guest_connect_to_full_backlog_loop_keeps_serving_then_rst() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let stalled = format!("{}_7000", socket_path(&dir).display());
    let (listener, _fill) = full_backlog_listener(Path::new(&stalled));
    let good = UnixListener::bind(format!("{}_7001", socket_path(&dir).display())).unwrap();
    // Turns the hang of a blocking connect into a failed assertion: makes room after 5 s.
    let rescue = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        rescue.set_nonblocking(true).unwrap();
        while rescue.accept().is_ok() {}
    });

    // A blocking connect here would not return: the backlog is full and nobody accepts.
    let start = Instant::now();
    g.send(g.header(1000, 7000, OP_REQUEST, 0), &[]);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the loop blocked {:?} on the request",
        start.elapsed()
    );
    assert_eq!(g.h.device.worker().borrow().handler.pending_connects(), 1);

    // The loop goes on serving: another connection is answered within a second.
    g.send(g.header(1001, 7001, OP_REQUEST, 0), &[]);
    let (h, _) = g.wait_for(|h| h.dst_port == 1001);
    assert_eq!(h.op, OP_RESPONSE);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "loop stalled for {:?}",
        start.elapsed()
    );
    let _accepted = good.accept().unwrap();

    // The stalled one is refused once the connect timeout passes.
    let (h, _) = g.wait_for(|h| h.dst_port == 1000);
    assert_eq!(h.op, OP_RST);
    let handler = &g.h.device.worker().borrow().handler;
    assert_eq!(handler.pending_connects(), 0);
    assert_eq!(handler.connections(), 1);
}

#[test]
fn test_vsock_guest_connect_to_full_backlog_connects_once_listener_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let path = format!("{}_7002", socket_path(&dir).display());
    let (listener, fill) = full_backlog_listener(Path::new(&path));
    g.send(g.header(1002, 7002, OP_REQUEST, 0), &[]);
    assert_eq!(g.h.device.worker().borrow().handler.pending_connects(), 1);

    // Room in the backlog: the retried connect gets through and the guest is answered.
    let first = listener.accept().unwrap();
    let (h, _) = g.wait_for(|h| h.dst_port == 1002);
    assert_eq!(h.op, OP_RESPONSE);
    // Behind the host's own connections is the guest's: data flows on it.
    let mut accepted: Vec<UnixStream> = (0..fill.len())
        .map(|_| listener.accept().unwrap().0)
        .collect();
    let mut host = accepted.pop().unwrap();
    g.send(g.header(1002, 7002, OP_RW, 2), b"hi");
    let mut buf = [0u8; 2];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");
    drop((first, fill, accepted));
}

#[test]
fn test_vsock_guest_flood_past_cap_gets_rst_and_sockets_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let cap = g.h.device.worker().borrow().handler.max_connections();
    assert_eq!(cap, DEFAULT_MAX_CONNECTIONS.min(cap));
    let listener = UnixListener::bind(format!("{}_8000", socket_path(&dir).display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut host_side = Vec::new();
    let ports: Vec<u32> = (2000..2000 + cap as u32 + 44).collect();
    let mut got = HashMap::new();
    for &p in &ports {
        g.send(g.header(p, 8000, OP_REQUEST, 0), &[]);
        for (h, _) in g.recv() {
            got.insert(h.dst_port, h.op);
        }
        while let Ok((s, _)) = listener.accept() {
            host_side.push(s);
        }
    }
    let rest: Vec<u32> = ports
        .iter()
        .copied()
        .filter(|p| !got.contains_key(p))
        .collect();
    got.extend(replies(&mut g, &rest));
    while let Ok((s, _)) = listener.accept() {
        host_side.push(s);
    }
    let accepted = got.values().filter(|&&op| op == OP_RESPONSE).count();
    let refused = got.values().filter(|&&op| op == OP_RST).count();
    assert_eq!((accepted, refused), (cap, 44));
    // The first `cap` were taken, every later one refused.
    assert!(ports[..cap].iter().all(|p| got[p] == OP_RESPONSE));
    // One host socket per open connection, no more.
    assert_eq!(host_side.len(), cap);
    assert_eq!(g.h.device.worker().borrow().handler.connections(), cap);

    // A closed connection makes room for a new one.
    g.send(g.header(2000, 8000, OP_RST, 0), &[]);
    g.send(g.header(5000, 8000, OP_REQUEST, 0), &[]);
    assert_eq!(replies(&mut g, &[5000])[&5000], OP_RESPONSE);
}

#[test]
fn test_vsock_config_max_connections_small_cap_refuses_excess() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::with_max_connections(&dir, 4);
    let _listener = UnixListener::bind(format!("{}_8001", socket_path(&dir).display())).unwrap();
    let ports: Vec<u32> = (3000..3010).collect();
    for &p in &ports {
        g.send(g.header(p, 8001, OP_REQUEST, 0), &[]);
    }
    let got = replies(&mut g, &ports);
    assert!(ports[..4].iter().all(|p| got[p] == OP_RESPONSE), "{got:?}");
    assert!(ports[4..].iter().all(|p| got[p] == OP_RST), "{got:?}");
}

#[test]
fn test_vsock_host_connections_past_cap_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::with_max_connections(&dir, 2);
    let mut hosts = Vec::new();
    for port in [52, 53] {
        let mut s = UnixStream::connect(socket_path(&dir)).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = g.wait_for(|h| h.op == OP_REQUEST);
        assert_eq!(req.dst_port, port);
        hosts.push(s);
    }
    let mut third = UnixStream::connect(socket_path(&dir)).unwrap();
    third.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        g.h.run_until_irq(Duration::from_millis(50));
        match third.read(&mut [0u8; 8]) {
            Ok(0) => break,
            Ok(n) => panic!("{n} bytes on a refused connection"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < end, "third host connection not closed");
    }
}

#[test]
fn test_effective_max_connections_low_nofile_keeps_reserve() {
    assert_eq!(effective_max_connections(256, 1 << 20), 256);
    assert_eq!(effective_max_connections(256, u64::MAX), 256);
    assert_eq!(
        effective_max_connections(256, 256),
        256 - FD_RESERVE as usize
    );
    assert_eq!(effective_max_connections(256, 1024), 256);
    assert_eq!(effective_max_connections(256, 64), 0);
}

#[test]
fn test_vsock_credit_request_flood_on_open_connection_keeps_control_queue_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&dir);
    let _listener = UnixListener::bind(format!("{}_5000", socket_path(&dir).display())).unwrap();
    g.send(g.header(1000, 5000, OP_REQUEST, 0), &[]);
    let (h, _) = g.wait_for(|h| h.dst_port == 1000);
    assert_eq!(h.op, OP_RESPONSE);
    // The guest stops giving rx buffers back and asks for credit over and over. Each answer waits
    // for an rx buffer: on an open connection they must not pile up (the cap on queued control
    // packets does not apply to open connections, so nothing else bounds them).
    for _ in 0..3000 {
        g.send(g.header(1000, 5000, OP_CREDIT_REQUEST, 0), &[]);
    }
    let pending = g.h.device.worker().borrow().handler.pending_control();
    assert!(
        pending <= 1,
        "{pending} control packets queued for one connection"
    );
    // Once the guest takes its buffers back it is answered.
    let (h, _) = g.wait_for(|h| h.op == OP_CREDIT_UPDATE);
    assert_eq!((h.src_port, h.dst_port), (5000, 1000));
}
