//! Guest → host: packets the guest puts on the tx queue.
//!
//! Each chain is read into the handler's buffer (header, then a payload of at most
//! [`MAX_PKT_PAYLOAD`] that the chain must hold), returned to the guest at once, then handled:
//! REQUEST starts a connection (`guest_connect.rs`), RESPONSE opens a host-initiated one, RW
//! goes to the host socket within the credit we gave, SHUTDOWN, RST and the credit ops update
//! the connection. A packet for no connection is answered RST (see `rx.rs` for the cap on
//! those answers).

use super::{MAX_PKT_PAYLOAD, TX, VsockHandler};
use crate::virtio::chain::{add_used, pop_chain, read_readable};
use crate::virtio::vsock::connection::ConnState;
use crate::virtio::vsock::packet::*;
use crate::virtio::vsock::token::VsockToken;
use crate::virtio::worker::{Active, DeviceFailure, HandlerOps};

impl VsockHandler {
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

    pub(super) fn process_tx<C>(
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
}
