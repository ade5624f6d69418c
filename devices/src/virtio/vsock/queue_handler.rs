//! virtio-vsock on the event loop: the queues on one side, Unix sockets on the other.
//!
//! Queue 0 (rx) takes packets to the guest, queue 1 (tx) brings the guest's packets, queue 2
//! (event) carries TRANSPORT_RESET after a restore. Sockets are polled with one-shot io_uring
//! polls, re-armed only when the device wants more: a connection whose guest has no credit or no
//! rx buffers left is not read, which is the back-pressure towards the host.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use event_loop::Completion;
use virtio_queue::{QueueOwnedT, QueueT};

use super::connect::{Attempt, HostConnect, PendingGuest};
use super::connection::{CONN_BUF, ConnState, Connection};
use super::packet::*;
use super::token::{MAX_CONN_ID, VsockToken};
use crate::virtio::Interrupt;
use crate::virtio::chain::{add_used, pop_chain, read_readable, write_writable};
use crate::virtio::worker::{Active, DeviceFailure, HandlerOps, QueueHandler};

/// Largest payload accepted from, or sent to, the guest in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Host-initiated connections get local ports from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Control packets waiting for rx buffers beyond this are dropped when they are replies to
/// packets for unknown connections (a guest that floods bad packets and posts no rx buffers must
/// not grow host memory without bound).
const MAX_PENDING_CONTROL: usize = 1024;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;

const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

/// How long a host connection may wait for its `CONNECT` line, then for the guest's answer, before
/// it is closed (like Firecracker's connect timeout).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How often pending host connections are checked against [`CONNECT_TIMEOUT`].
const SWEEP_PERIOD: std::time::Duration = std::time::Duration::from_millis(500);
/// How often guest connections waiting for room in a host listener's backlog are looked at; each
/// is retried with a backoff from 10 ms to 200 ms and gets RST after [`CONNECT_TIMEOUT`].
const CONNECT_RETRY_PERIOD: std::time::Duration = std::time::Duration::from_millis(10);

/// A host connection that has not sent its `CONNECT` line yet.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    since: std::time::Instant,
}

/// A control packet waiting for an rx buffer (built when sent, so it carries fresh credit).
#[derive(Debug, Clone, Copy)]
struct Ctrl {
    local_port: u32,
    peer_port: u32,
    op: u16,
    flags: u32,
}

/// The vsock device's muxer between the guest and host Unix sockets.
#[derive(Debug)]
pub struct VsockHandler {
    pub(super) cid: u64,
    pub(super) uds_path: PathBuf,
    listener: UnixListener,
    /// Connections by (host port, guest port).
    conns: HashMap<(u32, u32), Connection>,
    by_id: HashMap<u32, (u32, u32)>,
    pending_host: HashMap<u32, PendingHost>,
    /// Guest connections waiting for room in a host listener's backlog, by (host port, guest port).
    pending_guest: HashMap<(u32, u32), PendingGuest>,
    /// Most connections at once, pending ones included (see [`super::DEFAULT_MAX_CONNECTIONS`]).
    max_connections: usize,
    next_id: u32,
    next_local_port: u32,
    control: VecDeque<Ctrl>,
    reset_event_pending: bool,
    /// TRANSPORT_RESET was sent and the guest has not handed an event buffer back since (the
    /// event queue's avail index when the event was sent). Until it does, nothing goes to the rx
    /// queue: Linux runs its rx work before its event work when one interrupt reports both, so a
    /// connection request delivered now would be reset along with the connections of before the
    /// snapshot (the first connection after a restore would fail).
    reset_unacked: Option<u16>,
    buf: Vec<u8>,
    /// Period of the connect-timeout sweep; boxed so its address is stable while the kernel
    /// holds the timeout operation.
    sweep: Box<io_uring::types::Timespec>,
    /// Period of the connect retry (boxed for the same reason).
    retry: Box<io_uring::types::Timespec>,
    retry_armed: bool,
}

impl VsockHandler {
    /// A muxer for guest `cid`, listening on `uds_path`, with at most `max_connections`
    /// connections at once (both directions, pending ones included).
    pub fn new(
        cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            by_id: HashMap::new(),
            pending_host: HashMap::new(),
            pending_guest: HashMap::new(),
            max_connections,
            next_id: 0,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            reset_event_pending: false,
            reset_unacked: None,
            buf: vec![0u8; HDR_SIZE + MAX_PKT_PAYLOAD],
            sweep: Box::new(SWEEP_PERIOD.into()),
            retry: Box::new(CONNECT_RETRY_PERIOD.into()),
            retry_armed: false,
        })
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Guest connections waiting for room in a host listener's backlog.
    pub fn pending_connects(&self) -> usize {
        self.pending_guest.len()
    }

    /// The cap on connections, after clamping to the fd limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Everything that holds a host socket: open connections, pending guest connects, host
    /// connections that have not sent their `CONNECT` line.
    fn sockets(&self) -> usize {
        self.conns.len() + self.pending_guest.len() + self.pending_host.len()
    }

    /// Control packets waiting for rx buffers.
    pub fn pending_control(&self) -> usize {
        self.control.len()
    }

    /// An id no connection uses (there are far fewer connections than ids).
    fn new_id(&mut self) -> u32 {
        loop {
            self.next_id = self.next_id.wrapping_add(1) & MAX_CONN_ID;
            if !self.by_id.contains_key(&self.next_id)
                && !self.pending_host.contains_key(&self.next_id)
            {
                return self.next_id;
            }
        }
    }

    fn ctrl(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32) {
        match self.conns.get_mut(&(local_port, peer_port)) {
            // An open connection queues few control packets (RESPONSE once; RST and SHUTDOWN end
            // it) except credit updates, which the guest may ask for without end while it keeps
            // its rx buffers: one queued per connection is enough, as it carries the credit of
            // the moment it is sent.
            Some(conn) if op == OP_CREDIT_UPDATE => {
                if conn.credit_update_queued {
                    return;
                }
                conn.credit_update_queued = true;
            }
            Some(_) => {}
            None if self.control.len() >= MAX_PENDING_CONTROL => {
                tracing::debug!("virtio-vsock: control queue full, dropping op {op}");
                return;
            }
            None => {}
        }
        self.control.push_back(Ctrl {
            local_port,
            peer_port,
            op,
            flags,
        });
    }

    fn arm_read<C>(conn: &mut Connection, ops: &mut HandlerOps<'_, C, VsockToken>) {
        if !conn.read_armed {
            conn.read_armed = true;
            ops.poll_readable(conn.stream.as_raw_fd(), VsockToken::Read(conn.id), false);
        }
    }

    fn arm_write<C>(conn: &mut Connection, ops: &mut HandlerOps<'_, C, VsockToken>) {
        if !conn.write_armed && !conn.tx_buf.is_empty() {
            conn.write_armed = true;
            ops.poll_writable(conn.stream.as_raw_fd(), VsockToken::Write(conn.id));
        }
    }

    fn remove(&mut self, key: (u32, u32)) {
        if let Some(c) = self.conns.remove(&key) {
            // Wakes any poll still armed on it, so its operation completes (and is ignored).
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            self.by_id.remove(&c.id);
        }
    }

    fn drop_all(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        for (_, p) in self.pending_host.drain() {
            let _ = p.stream.shutdown(std::net::Shutdown::Both);
        }
        self.pending_guest.clear();
        self.control.clear();
    }

    fn accept<C>(&mut self, ops: &mut HandlerOps<'_, C, VsockToken>) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.sockets() >= self.max_connections {
                        // Closed at once: the host client sees end of file.
                        tracing::debug!(
                            "virtio-vsock: {} connections, host connection refused",
                            self.max_connections
                        );
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let id = self.new_id();
                    ops.poll_readable(stream.as_raw_fd(), VsockToken::Read(id), false);
                    self.pending_host.insert(
                        id,
                        PendingHost {
                            stream,
                            line: Vec::new(),
                            since: std::time::Instant::now(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("virtio-vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    fn arm_sweep<C>(&self, ops: &mut HandlerOps<'_, C, VsockToken>) {
        // SAFETY: the timespec is boxed in this handler, which lives as long as its worker, and
        // the worker stays on the loop for the loop's whole life.
        unsafe { ops.timeout(&self.sweep, VsockToken::Sweep) };
    }

    /// Closes host connections that sent no `CONNECT` line, or that the guest did not answer,
    /// within [`CONNECT_TIMEOUT`]: a host client never waits forever on a silent guest. The
    /// guest is told RST, so an answer that comes later is refused.
    fn expire_connects(&mut self) {
        let now = std::time::Instant::now();
        self.pending_host.retain(|_, p| {
            let keep = now.duration_since(p.since) < CONNECT_TIMEOUT;
            if !keep {
                // Shut down rather than only drop: the armed read poll holds the socket open.
                let _ = p.stream.shutdown(std::net::Shutdown::Both);
            }
            keep
        });
        let expired: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == ConnState::HostInit && now.duration_since(c.opened) >= CONNECT_TIMEOUT
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!(
                "virtio-vsock: guest did not answer CONNECT to port {} in time",
                key.1
            );
            self.remove(key);
            self.ctrl(key.0, key.1, OP_RST, 0);
        }
    }

    /// Reads a pending host connection's `CONNECT <port>\n`; on success asks the guest.
    fn read_connect<C>(&mut self, id: u32, ops: &mut HandlerOps<'_, C, VsockToken>) {
        let Some(mut p) = self.pending_host.remove(&id) else {
            return;
        };
        let mut chunk = [0u8; MAX_CONNECT_LINE];
        loop {
            match p.stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => p.line.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
            if p.line.contains(&b'\n') || p.line.len() > MAX_CONNECT_LINE {
                break;
            }
        }
        let Some(nl) = p.line.iter().position(|&b| b == b'\n') else {
            if p.line.len() <= MAX_CONNECT_LINE {
                ops.poll_readable(p.stream.as_raw_fd(), VsockToken::Read(id), false);
                self.pending_host.insert(id, p);
            }
            return;
        };
        let port = std::str::from_utf8(&p.line[..nl])
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|s| s.trim().parse::<u32>().ok());
        let Some(port) = port else {
            tracing::debug!("virtio-vsock: bad CONNECT line from host");
            return;
        };
        let mut local_port = self.next_local_port;
        while self.conns.keys().any(|&(l, _)| l == local_port) {
            local_port = local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        }
        self.next_local_port = local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let Ok(mut conn) = Connection::new(p.stream, id, ConnState::HostInit) else {
            return;
        };
        conn.rx_pending = p.line[nl + 1..].to_vec();
        self.conns.insert((local_port, port), conn);
        self.by_id.insert(id, (local_port, port));
        self.ctrl(local_port, port, OP_REQUEST, 0);
    }

    /// A guest REQUEST: connect to `<uds_path>_<port>` without blocking; answer RESPONSE once
    /// connected, RST when refused, over the cap, or not accepted within [`CONNECT_TIMEOUT`].
    fn guest_request<C>(
        &mut self,
        key: (u32, u32),
        h: &Header,
        ops: &mut HandlerOps<'_, C, VsockToken>,
    ) {
        if self.conns.contains_key(&key) || self.pending_guest.remove(&key).is_some() {
            self.ctrl(key.0, key.1, OP_RST, 0);
            return;
        }
        if self.sockets() >= self.max_connections {
            tracing::debug!(
                "virtio-vsock: {} connections, guest connection to port {} refused",
                self.max_connections,
                key.0
            );
            self.ctrl(key.0, key.1, OP_RST, 0);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        let mut connect = match HostConnect::new(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("virtio-vsock: guest connect to {}: {e}", path.display());
                self.ctrl(key.0, key.1, OP_RST, 0);
                return;
            }
        };
        match connect.attempt() {
            Attempt::Connected => {
                self.establish(key, connect.into_stream(), h.buf_alloc, h.fwd_cnt, ops);
            }
            Attempt::Wait => {
                let pending = PendingGuest {
                    connect,
                    buf_alloc: h.buf_alloc,
                    fwd_cnt: h.fwd_cnt,
                };
                self.pending_guest.insert(key, pending);
                self.arm_retry(ops);
            }
            Attempt::Failed(e) => {
                tracing::debug!("virtio-vsock: guest connect to {}: {e}", path.display());
                self.ctrl(key.0, key.1, OP_RST, 0);
            }
        }
    }

    /// A guest connection's host socket is connected: the connection is open.
    fn establish<C>(
        &mut self,
        key: (u32, u32),
        stream: UnixStream,
        buf_alloc: u32,
        fwd_cnt: u32,
        ops: &mut HandlerOps<'_, C, VsockToken>,
    ) {
        let id = self.new_id();
        match Connection::new(stream, id, ConnState::Established) {
            Ok(mut conn) => {
                conn.update_peer_credit(buf_alloc, fwd_cnt);
                Self::arm_read(&mut conn, ops);
                self.conns.insert(key, conn);
                self.by_id.insert(id, key);
                self.ctrl(key.0, key.1, OP_RESPONSE, 0);
            }
            Err(e) => {
                tracing::debug!("virtio-vsock: guest connection to port {}: {e}", key.0);
                self.ctrl(key.0, key.1, OP_RST, 0);
            }
        }
    }

    fn arm_retry<C>(&mut self, ops: &mut HandlerOps<'_, C, VsockToken>) {
        if !self.retry_armed {
            self.retry_armed = true;
            // SAFETY: the timespec is boxed in this handler, which lives as long as its worker,
            // and the worker stays on the loop for the loop's whole life.
            unsafe { ops.timeout(&self.retry, VsockToken::ConnectRetry) };
        }
    }

    /// Retries the guest connections waiting for room in a listener's backlog; those that still
    /// wait after [`CONNECT_TIMEOUT`], or fail, get RST.
    fn retry_connects<C>(&mut self, ops: &mut HandlerOps<'_, C, VsockToken>) {
        self.retry_armed = false;
        let now = std::time::Instant::now();
        let keys: Vec<(u32, u32)> = self.pending_guest.keys().copied().collect();
        for key in keys {
            let Some(p) = self.pending_guest.get_mut(&key) else {
                continue;
            };
            let expired = now.duration_since(p.connect.since) >= CONNECT_TIMEOUT;
            if !expired && !p.connect.is_due(now) {
                continue;
            }
            match p.connect.attempt() {
                Attempt::Connected => {
                    let p = self.pending_guest.remove(&key).expect("present above");
                    let stream = p.connect.into_stream();
                    self.establish(key, stream, p.buf_alloc, p.fwd_cnt, ops);
                }
                Attempt::Wait if !expired => {}
                Attempt::Wait => {
                    tracing::debug!(
                        "virtio-vsock: host listener on port {} did not take the guest's \
                         connection in time",
                        key.0
                    );
                    self.pending_guest.remove(&key);
                    self.ctrl(key.0, key.1, OP_RST, 0);
                }
                Attempt::Failed(e) => {
                    tracing::debug!("virtio-vsock: guest connect to port {}: {e}", key.0);
                    self.pending_guest.remove(&key);
                    self.ctrl(key.0, key.1, OP_RST, 0);
                }
            }
        }
        if !self.pending_guest.is_empty() {
            self.arm_retry(ops);
        }
    }

    /// Handles one packet from the guest.
    fn guest_packet<C>(
        &mut self,
        h: Header,
        payload: &[u8],
        ops: &mut HandlerOps<'_, C, VsockToken>,
    ) {
        if h.ty != TYPE_STREAM || h.src_cid != self.cid || h.dst_cid != HOST_CID {
            if h.op != OP_RST {
                self.ctrl(h.dst_port, h.src_port, OP_RST, 0);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            self.guest_request(key, &h, ops);
            return;
        }
        if self.pending_guest.remove(&key).is_some() {
            // The guest gave up (RST) or broke protocol before we could answer its REQUEST.
            if h.op != OP_RST {
                self.ctrl(key.0, key.1, OP_RST, 0);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.ctrl(key.0, key.1, OP_RST, 0);
            }
            return;
        };
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        match h.op {
            OP_RESPONSE if conn.state == ConnState::HostInit => {
                conn.state = ConnState::Established;
                let ok = format!("OK {}\n", key.0);
                let failed = conn.push_guest_data(ok.as_bytes()).is_err();
                // The OK line is ours, not the guest's: it does not count as forwarded data.
                conn.fwd_cnt = conn.fwd_cnt.wrapping_sub(ok.len() as u32);
                conn.last_fwd_sent = conn.fwd_cnt;
                if failed {
                    self.remove(key);
                    self.ctrl(key.0, key.1, OP_RST, 0);
                    return;
                }
                Self::arm_write(conn, ops);
                conn.readable = true;
            }
            OP_RW if conn.state == ConnState::Established && !conn.guest_shut_send => {
                if conn.push_guest_data(payload).is_err() {
                    self.remove(key);
                    self.ctrl(key.0, key.1, OP_RST, 0);
                    return;
                }
                Self::arm_write(conn, ops);
                if conn.credit_update_due() {
                    self.ctrl(key.0, key.1, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.ctrl(key.0, key.1, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                conn.guest_shut_send |= h.flags & SHUTDOWN_SEND != 0;
                conn.guest_shut_rcv |= h.flags & SHUTDOWN_RCV != 0;
                if conn.guest_shut_send && conn.guest_shut_rcv {
                    // Closed by the guest: deliver what it sent before, then reset.
                    if conn.flush().is_err() || conn.tx_buf.is_empty() {
                        self.remove(key);
                        self.ctrl(key.0, key.1, OP_RST, 0);
                    } else {
                        Self::arm_write(conn, ops);
                    }
                } else if conn.guest_shut_send && conn.tx_buf.is_empty() {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            OP_RST => self.remove(key),
            _ => {
                self.remove(key);
                self.ctrl(key.0, key.1, OP_RST, 0);
            }
        }
    }

    fn process_tx<C>(
        &mut self,
        active: &mut Active,
        ops: &mut HandlerOps<'_, C, VsockToken>,
    ) -> Result<bool, DeviceFailure> {
        let mut used = false;
        while let Some(chain) = pop_chain(&mut active.queues[TX], TX, &active.mem)? {
            let mut hdr = [0u8; HDR_SIZE];
            let parsed =
                read_readable(&active.mem, &chain.descs, &mut hdr).map(|_| Header::decode(&hdr));
            let packet = parsed.and_then(|h| {
                let len = h.len as usize;
                if len > MAX_PKT_PAYLOAD || (HDR_SIZE + len) as u64 > chain.readable_len() {
                    return None;
                }
                read_readable(&active.mem, &chain.descs, &mut self.buf[..HDR_SIZE + len])?;
                Some((h, len))
            });
            add_used(&mut active.queues[TX], TX, &active.mem, chain.head, 0)?;
            used = true;
            match packet {
                Some((h, len)) => {
                    let payload = self.buf[HDR_SIZE..HDR_SIZE + len].to_vec();
                    self.guest_packet(h, &payload, ops);
                }
                None => tracing::debug!("virtio-vsock: dropped a malformed tx packet"),
            }
        }
        Ok(used)
    }

    fn header(&self, local_port: u32, peer_port: u32, op: u16, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = self
            .conns
            .get(&(local_port, peer_port))
            .map_or((0, 0), |c| (CONN_BUF, c.fwd_cnt));
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: local_port,
            dst_port: peer_port,
            len,
            ty: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// Fills the guest's rx buffers with control packets and connection data.
    fn pump_rx<C>(
        &mut self,
        active: &mut Active,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, VsockToken>,
    ) -> Result<(), DeviceFailure> {
        if self.reset_event_pending || !self.reset_acked(active) {
            return Ok(());
        }
        let mut used = false;
        loop {
            let data_key = self
                .conns
                .iter()
                .find(|(_, c)| c.wants_rx())
                .map(|(k, _)| *k);
            if self.control.is_empty() && data_key.is_none() {
                break;
            }
            let Some(chain) = pop_chain(&mut active.queues[RX], RX, &active.mem)? else {
                break;
            };
            let room = chain.writable_len() as usize;
            if chain.descs.iter().any(|d| !d.write) || room < HDR_SIZE {
                add_used(&mut active.queues[RX], RX, &active.mem, chain.head, 0)?;
                used = true;
                continue;
            }
            if let Some(c) = self.control.pop_front() {
                let h = self.header(c.local_port, c.peer_port, c.op, c.flags, 0);
                if let Some(conn) = self.conns.get_mut(&(c.local_port, c.peer_port)) {
                    conn.last_fwd_sent = conn.fwd_cnt;
                    if c.op == OP_CREDIT_UPDATE {
                        conn.credit_update_queued = false;
                    }
                }
                let n = write_writable(&active.mem, &chain.descs, &h.encode());
                add_used(
                    &mut active.queues[RX],
                    RX,
                    &active.mem,
                    chain.head,
                    n as u32,
                )?;
                used = true;
                continue;
            }
            let key = data_key.expect("checked above");
            let conn = self.conns.get_mut(&key).expect("found above");
            let max = (room - HDR_SIZE)
                .min(MAX_PKT_PAYLOAD)
                .min(conn.peer_credit() as usize);
            match conn.read_for_guest(&mut self.buf[HDR_SIZE..HDR_SIZE + max]) {
                Ok(0) => {
                    conn.host_eof = true;
                    active.queues[RX].go_to_previous_position();
                    self.ctrl(key.0, key.1, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                }
                Ok(n) => {
                    conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                    conn.last_fwd_sent = conn.fwd_cnt;
                    let h = self.header(key.0, key.1, OP_RW, 0, n as u32);
                    self.buf[..HDR_SIZE].copy_from_slice(&h.encode());
                    let w = write_writable(&active.mem, &chain.descs, &self.buf[..HDR_SIZE + n]);
                    add_used(
                        &mut active.queues[RX],
                        RX,
                        &active.mem,
                        chain.head,
                        w as u32,
                    )?;
                    used = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    conn.readable = false;
                    Self::arm_read(conn, ops);
                    active.queues[RX].go_to_previous_position();
                }
                Err(_) => {
                    active.queues[RX].go_to_previous_position();
                    self.remove(key);
                    self.ctrl(key.0, key.1, OP_RST, 0);
                }
            }
        }
        if used {
            irq.signal_used_queue();
        }
        Ok(())
    }

    /// Whether the guest has handled the last TRANSPORT_RESET: it has made an event buffer
    /// available again since (Linux refills the event queue after handling its events).
    fn reset_acked(&mut self, active: &Active) -> bool {
        let Some(sent_at) = self.reset_unacked else {
            return true;
        };
        let now = active.queues[EVT].avail_idx(&active.mem, Ordering::Acquire);
        if now.is_ok_and(|i| i.0 == sent_at) {
            return false;
        }
        self.reset_unacked = None;
        true
    }

    fn send_reset_event(
        &mut self,
        active: &mut Active,
        irq: &Interrupt,
    ) -> Result<(), DeviceFailure> {
        if !self.reset_event_pending {
            return Ok(());
        }
        let Some(chain) = pop_chain(&mut active.queues[EVT], EVT, &active.mem)? else {
            return Ok(());
        };
        let n = write_writable(
            &active.mem,
            &chain.descs,
            &EVENT_TRANSPORT_RESET.to_le_bytes(),
        );
        add_used(
            &mut active.queues[EVT],
            EVT,
            &active.mem,
            chain.head,
            n as u32,
        )?;
        self.reset_event_pending = false;
        self.reset_unacked = active.queues[EVT]
            .avail_idx(&active.mem, Ordering::Acquire)
            .ok()
            .map(|i| i.0);
        irq.signal_used_queue();
        Ok(())
    }
}

impl QueueHandler for VsockHandler {
    type Token = VsockToken;

    fn name(&self) -> &'static str {
        "vsock"
    }

    fn start<C>(&mut self, ops: &mut HandlerOps<'_, C, VsockToken>) {
        ops.poll_readable(self.listener.as_raw_fd(), VsockToken::Listener, true);
        self.arm_sweep(ops);
    }

    fn activated<C>(
        &mut self,
        active: &mut Active,
        restored: bool,
        irq: &Interrupt,
        _ops: &mut HandlerOps<'_, C, VsockToken>,
    ) -> Result<(), DeviceFailure> {
        if restored {
            // Connections do not survive a snapshot: tell the guest to drop its own.
            self.drop_all();
            // The guest may still hold sockets of connections from before the snapshot (reset,
            // not yet closed by their owner); a new request on the same (host port, guest port)
            // pair would reach one of those and be refused. Take host ports from a random point
            // of the range instead of from where the snapshotted VM started.
            let offset = std::collections::hash_map::RandomState::new().hash_one(self.cid);
            self.next_local_port = FIRST_LOCAL_PORT + (offset % (1 << 29)) as u32;
            self.reset_event_pending = true;
            self.send_reset_event(active, irq)?;
        }
        Ok(())
    }

    fn process_queue<C>(
        &mut self,
        queue: usize,
        active: &mut Active,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, VsockToken>,
    ) -> Result<(), DeviceFailure> {
        match queue {
            TX => {
                if self.process_tx(active, ops)? {
                    irq.signal_used_queue();
                }
                self.pump_rx(active, irq, ops)
            }
            RX => self.pump_rx(active, irq, ops),
            _ if self.reset_event_pending => self.send_reset_event(active, irq),
            // The guest refills the event queue (and notifies it) once it has handled the event.
            _ => self.pump_rx(active, irq, ops),
        }
    }

    fn complete<C>(
        &mut self,
        c: Completion<VsockToken>,
        active: Option<&mut Active>,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, VsockToken>,
    ) -> Result<(), DeviceFailure> {
        let (id, write) = match c.tag {
            VsockToken::Listener => {
                if !c.more {
                    ops.poll_readable(self.listener.as_raw_fd(), VsockToken::Listener, true);
                }
                self.accept(ops);
                return Ok(());
            }
            VsockToken::Sweep => {
                self.expire_connects();
                self.arm_sweep(ops);
                return match active {
                    Some(active) => self.pump_rx(active, irq, ops),
                    None => Ok(()),
                };
            }
            VsockToken::ConnectRetry => {
                self.retry_connects(ops);
                return match active {
                    Some(active) => self.pump_rx(active, irq, ops),
                    None => Ok(()),
                };
            }
            VsockToken::Read(id) => (id, false),
            VsockToken::Write(id) => (id, true),
        };
        if self.pending_host.contains_key(&id) {
            self.read_connect(id, ops);
        } else if let Some(&key) = self.by_id.get(&id) {
            let conn = self.conns.get_mut(&key).expect("by_id is in sync");
            if write {
                conn.write_armed = false;
                let failed = conn.flush().is_err();
                let closed = conn.guest_shut_send && conn.guest_shut_rcv && conn.tx_buf.is_empty();
                if failed || closed {
                    self.remove(key);
                    self.ctrl(key.0, key.1, OP_RST, 0);
                } else {
                    Self::arm_write(conn, ops);
                    if conn.credit_update_due() {
                        self.ctrl(key.0, key.1, OP_CREDIT_UPDATE, 0);
                    }
                }
            } else {
                conn.read_armed = false;
                conn.readable = true;
            }
        }
        match active {
            Some(active) => self.pump_rx(active, irq, ops),
            None => Ok(()),
        }
    }

    fn reset(&mut self) {
        self.drop_all();
        self.reset_event_pending = false;
        self.reset_unacked = None;
    }
}
