//! Host → guest: what the device puts in the guest's buffers.
//!
//! The rx queue carries control packets first (queued by `ctrl`, capped when they
//! answer packets for unknown connections), then connection data within the guest's credit; each
//! header carries our own credit (`buf_alloc`, `fwd_cnt`). The event queue carries
//! TRANSPORT_RESET after a restore, and nothing goes to the rx queue until the guest has handled
//! it.

use std::io::ErrorKind;
use std::sync::atomic::Ordering;

use virtio_queue::{QueueOwnedT, QueueT};

use super::{EVT, MAX_PKT_PAYLOAD, RX, VsockHandler};
use crate::virtio::Interrupt;
use crate::virtio::chain::{add_used, pop_chain, write_writable};
use crate::virtio::vsock::connection::CONN_BUF;
use crate::virtio::vsock::packet::*;
use crate::virtio::vsock::token::VsockToken;
use crate::virtio::worker::{Active, DeviceFailure, HandlerOps};

/// Control packets waiting for rx buffers beyond this are dropped when they are replies to
/// packets for unknown connections (a guest that floods bad packets and posts no rx buffers must
/// not grow host memory without bound).
const MAX_PENDING_CONTROL: usize = 1024;

/// A control packet waiting for an rx buffer (built when sent, so it carries fresh credit).
#[derive(Debug, Clone, Copy)]
pub(super) struct Ctrl {
    local_port: u32,
    peer_port: u32,
    op: u16,
    flags: u32,
}

impl VsockHandler {
    /// Queues a control packet for the guest; [`Self::pump_rx`] sends it before any data.
    pub(super) fn ctrl(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32) {
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
    pub(super) fn pump_rx<C>(
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

    pub(super) fn send_reset_event(
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
