//! virtio-vsock driven through the harness by a small guest-side vsock stack.

mod connect;
mod hostile;
mod transfer;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::packet::*;
use super::{Vsock, VsockConfig, VsockHandler};
use crate::virtio::test_utils::{Buf, Harness, test_memory};

pub(crate) const GUEST_CID: u64 = 3;
const RX_BUF: u32 = (HDR_SIZE + 4096) as u32;
const RX_BUFS: usize = 32;

/// The guest side of the vsock transport.
pub(crate) struct Guest {
    pub h: Harness<VsockHandler>,
    rx_bufs: HashMap<u16, u64>,
    pub events: Vec<u32>,
    ev_bufs: HashMap<u16, u64>,
    tx_scratch: u64,
}

pub(crate) fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("v.sock")
}

/// A listener at `path` with a backlog of 0 that nobody accepts from, and the host connections
/// that fill its backlog (keep them alive).
pub(crate) fn full_backlog_listener(path: &Path) -> (UnixListener, Vec<UnixStream>) {
    use nix::errno::Errno;
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    socket::listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let mut fill = Vec::new();
    loop {
        let c = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        match socket::connect(c.as_raw_fd(), &UnixAddr::new(path).unwrap()) {
            Ok(()) => fill.push(UnixStream::from(c)),
            Err(Errno::EAGAIN) => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
        assert!(fill.len() < 1024, "the backlog does not fill");
    }
    (UnixListener::from(fd), fill)
}

impl Guest {
    pub fn new(dir: &tempfile::TempDir) -> Self {
        Self::with_max_connections(dir, super::DEFAULT_MAX_CONNECTIONS)
    }

    /// A guest whose device allows `max_connections` connections.
    pub fn with_max_connections(dir: &tempfile::TempDir, max_connections: usize) -> Self {
        let mem = test_memory();
        let dev = Vsock::new_vsock(
            VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: socket_path(dir),
                max_connections,
            },
            mem.clone(),
        )
        .unwrap();
        let mut h = Harness::new(dev, mem);
        h.driver.init(256);
        let mut g = Self::with_harness(h);
        g.post_buffers();
        g
    }

    pub fn with_harness(h: Harness<VsockHandler>) -> Self {
        Self {
            h,
            rx_bufs: HashMap::new(),
            events: Vec::new(),
            ev_bufs: HashMap::new(),
            tx_scratch: 0,
        }
    }

    /// Gives the device rx and event buffers.
    pub fn post_buffers(&mut self) {
        let base = self.h.driver.alloc(RX_BUF as u64 * RX_BUFS as u64);
        for i in 0..RX_BUFS as u64 {
            let a = base + i * u64::from(RX_BUF);
            let head = self.h.driver.add_chain(0, &[Buf::inp(a, RX_BUF)]).unwrap();
            self.rx_bufs.insert(head, a);
        }
        let ev = self.h.driver.alloc(32);
        for i in 0..4 {
            let head = self
                .h
                .driver
                .add_chain(2, &[Buf::inp(ev + i * 8, 8)])
                .unwrap();
            self.ev_bufs.insert(head, ev + i * 8);
        }
        self.tx_scratch = self.h.driver.alloc(64 * 1024 + 64);
        self.h.driver.kick(0);
        self.h.driver.kick(2);
    }

    pub fn header(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            ty: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Sends one packet on the tx queue.
    pub fn send(&mut self, h: Header, payload: &[u8]) {
        let a = self.tx_scratch;
        self.h
            .driver
            .mem
            .write_slice(&h.encode(), GuestAddress(a))
            .unwrap();
        let mut bufs = vec![Buf::out(a, HDR_SIZE as u32)];
        if !payload.is_empty() {
            self.h
                .driver
                .mem
                .write_slice(payload, GuestAddress(a + 64))
                .unwrap();
            bufs.push(Buf::out(a + 64, payload.len() as u32));
        }
        let head = self.h.driver.add_chain(1, &bufs).unwrap();
        self.h.driver.kick(1);
        // Let the device consume it before the scratch buffer is reused.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if self.h.driver.take_used(1).iter().any(|u| u.head == head) {
                break;
            }
            assert!(Instant::now() < end, "tx packet not consumed");
            self.h.run_until_irq(Duration::from_millis(100));
        }
    }

    /// Packets the device delivered so far (re-posting their buffers).
    pub fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.h.driver.ack_interrupts();
        let mut out = Vec::new();
        // Take every used buffer out first: re-posting reuses descriptor indices.
        let used: Vec<_> = self
            .h
            .driver
            .take_used(0)
            .into_iter()
            .map(|u| (u, self.rx_bufs.remove(&u.head).unwrap()))
            .collect();
        for &(u, a) in &used {
            let mut raw = [0u8; HDR_SIZE];
            self.h
                .driver
                .mem
                .read_slice(&mut raw, GuestAddress(a))
                .unwrap();
            let hdr = Header::decode(&raw);
            let mut data = vec![0u8; hdr.len as usize];
            assert!(u.len as usize >= HDR_SIZE + data.len());
            self.h
                .driver
                .mem
                .read_slice(&mut data, GuestAddress(a + HDR_SIZE as u64))
                .unwrap();
            out.push((hdr, data));
        }
        for (_, a) in used {
            let head = self.h.driver.add_chain(0, &[Buf::inp(a, RX_BUF)]).unwrap();
            self.rx_bufs.insert(head, a);
        }
        let events: Vec<_> = self
            .h
            .driver
            .take_used(2)
            .into_iter()
            .map(|u| self.ev_bufs.remove(&u.head).unwrap())
            .collect();
        for a in events {
            let id: u32 = self.h.driver.mem.read_obj(GuestAddress(a)).unwrap();
            self.events.push(id);
            let head = self.h.driver.add_chain(2, &[Buf::inp(a, 8)]).unwrap();
            self.ev_bufs.insert(head, a);
        }
        if !out.is_empty() {
            self.h.driver.kick(0);
        }
        out
    }

    /// Runs the loop until a packet matching `pred` arrives; returns it and what came before.
    pub fn wait_for(&mut self, pred: impl Fn(&Header) -> bool) -> (Header, Vec<u8>) {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            for (h, d) in self.recv() {
                if pred(&h) {
                    return (h, d);
                }
            }
            assert!(Instant::now() < end, "timed out waiting for a packet");
            self.h.run_until_irq(Duration::from_millis(200));
        }
    }
}

/// Conformance I/O: a guest connection to a port nobody listens on is refused with RST; after a
/// restore the guest first gets TRANSPORT_RESET on the event queue.
pub(crate) fn vsock_io(h: &mut Harness<VsockHandler>, round: u32) {
    if round == 0 {
        let base = h.driver.alloc(u64::from(RX_BUF) * 4);
        for i in 0..4 {
            h.driver
                .add_chain(0, &[Buf::inp(base + i * u64::from(RX_BUF), RX_BUF)])
                .unwrap();
        }
        let ev = h.driver.alloc(8);
        h.driver.add_chain(2, &[Buf::inp(ev, 8)]).unwrap();
        h.driver.kick(0);
        h.driver.kick(2);
    } else {
        let ev = h.wait_used(2, 1);
        assert_eq!(ev.len(), 1, "no TRANSPORT_RESET after restore");
        // As Linux does once it has handled the event: hand the buffer back and notify.
        let desc = h.driver.queues[2].desc + u64::from(ev[0].head) * 16;
        let addr: u64 = h.driver.mem.read_obj(GuestAddress(desc)).unwrap();
        h.driver.add_chain(2, &[Buf::inp(addr, 8)]).unwrap();
        h.driver.kick(2);
    }
    let hdr = h.driver.alloc(HDR_SIZE as u64);
    let port = 500 + round;
    let req = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: port,
        dst_port: 9999,
        ty: TYPE_STREAM,
        op: OP_REQUEST,
        buf_alloc: 4096,
        ..Default::default()
    };
    h.driver
        .mem
        .write_slice(&req.encode(), GuestAddress(hdr))
        .unwrap();
    h.driver
        .add_chain(1, &[Buf::out(hdr, HDR_SIZE as u32)])
        .unwrap();
    h.driver.kick(1);
    let used = h.wait_used(0, 1);
    assert_eq!(used.len(), 1);
    let desc = h.driver.queues[0].desc + u64::from(used[0].head) * 16;
    let addr: u64 = h.driver.mem.read_obj(GuestAddress(desc)).unwrap();
    let mut raw = [0u8; HDR_SIZE];
    h.driver
        .mem
        .read_slice(&mut raw, GuestAddress(addr))
        .unwrap();
    let got = Header::decode(&raw);
    assert_eq!((got.op, got.dst_port), (OP_RST, port));
    h.driver.take_used(1);
    h.driver.add_chain(0, &[Buf::inp(addr, RX_BUF)]).unwrap();
    h.driver.kick(0);
}
