//! virtio-vsock on the event loop: the queues on one side, Unix sockets on the other.
//!
//! Queue 0 (rx) takes packets to the guest, queue 1 (tx) brings the guest's packets, queue 2
//! (event) carries TRANSPORT_RESET after a restore. Sockets are polled with one-shot io_uring
//! polls, re-armed only when the device wants more: a connection whose guest has no credit or no
//! rx buffers left is not read, which is the back-pressure towards the host.
//!
//! The handler is split by concern; each file adds to `impl VsockHandler`:
//!
//! - `tx.rs`: guest → host, the packets on the tx queue;
//! - `rx.rs`: host → guest, the rx queue (control packets and data, credit) and the event queue;
//! - `host.rs`: the host side's sockets: listener, `CONNECT` line, connection readiness;
//! - `guest_connect.rs`: guest-initiated connections to host sockets;
//! - here: the handler's state, its connection table and the event dispatch.

mod guest_connect;
mod host;
mod rx;
mod tx;

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use event_loop::Completion;

use self::guest_connect::CONNECT_RETRY_PERIOD;
use self::host::{PendingHost, SWEEP_PERIOD};
use self::rx::Ctrl;
use super::connect::PendingGuest;
use super::connection::Connection;
use super::packet::HDR_SIZE;
use super::token::{MAX_CONN_ID, VsockToken};
use crate::virtio::Interrupt;
use crate::virtio::worker::{Active, DeviceFailure, HandlerOps, QueueHandler};

/// Largest payload accepted from, or sent to, the guest in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Host-initiated connections get local ports from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

/// How long a host connection may wait for its `CONNECT` line, then for the guest's answer, before
/// it is closed (like Firecracker's connect timeout).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

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
        self.socket_ready(id, write, ops);
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
