//! Guest-initiated connections: a guest REQUEST to host port P connects to `<uds_path>_<P>`
//! without blocking the loop (see `connect.rs`), waits on a retry timer while the listener's
//! backlog is full, and is answered RESPONSE once connected or RST when refused, over the cap,
//! or not accepted within [`CONNECT_TIMEOUT`].

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use super::{CONNECT_TIMEOUT, VsockHandler};
use crate::virtio::vsock::connect::{Attempt, HostConnect, PendingGuest};
use crate::virtio::vsock::connection::{ConnState, Connection};
use crate::virtio::vsock::packet::*;
use crate::virtio::vsock::token::VsockToken;
use crate::virtio::worker::HandlerOps;

/// How often guest connections waiting for room in a host listener's backlog are looked at; each
/// is retried with a backoff from 10 ms to 200 ms and gets RST after [`CONNECT_TIMEOUT`].
pub(super) const CONNECT_RETRY_PERIOD: std::time::Duration = std::time::Duration::from_millis(10);

impl VsockHandler {
    /// A guest REQUEST: connect to `<uds_path>_<port>` without blocking; answer RESPONSE once
    /// connected, RST when refused, over the cap, or not accepted within [`CONNECT_TIMEOUT`].
    pub(super) fn guest_request<C>(
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
    pub(super) fn retry_connects<C>(&mut self, ops: &mut HandlerOps<'_, C, VsockToken>) {
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
}
