//! The host side's sockets: the listening socket, host connections until their `CONNECT <port>`
//! line has been read and the guest has answered (both under [`CONNECT_TIMEOUT`]), and the
//! readiness of each connection's socket (one-shot polls, armed only when the device wants more).

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use super::{CONNECT_TIMEOUT, FIRST_LOCAL_PORT, VsockHandler};
use crate::virtio::vsock::connection::{ConnState, Connection};
use crate::virtio::vsock::packet::*;
use crate::virtio::vsock::token::VsockToken;
use crate::virtio::worker::HandlerOps;

/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// How often pending host connections are checked against [`CONNECT_TIMEOUT`].
pub(super) const SWEEP_PERIOD: std::time::Duration = std::time::Duration::from_millis(500);

/// A host connection that has not sent its `CONNECT` line yet.
#[derive(Debug)]
pub(super) struct PendingHost {
    pub(super) stream: UnixStream,
    line: Vec<u8>,
    since: std::time::Instant,
}

impl VsockHandler {
    /// Arms a one-shot read poll on `conn`'s socket unless one is armed.
    pub(super) fn arm_read<C>(conn: &mut Connection, ops: &mut HandlerOps<'_, C, VsockToken>) {
        if !conn.read_armed {
            conn.read_armed = true;
            ops.poll_readable(conn.stream.as_raw_fd(), VsockToken::Read(conn.id), false);
        }
    }

    /// Arms a one-shot write poll on `conn`'s socket while it holds guest data to write, unless
    /// one is armed.
    pub(super) fn arm_write<C>(conn: &mut Connection, ops: &mut HandlerOps<'_, C, VsockToken>) {
        if !conn.write_armed && !conn.tx_buf.is_empty() {
            conn.write_armed = true;
            ops.poll_writable(conn.stream.as_raw_fd(), VsockToken::Write(conn.id));
        }
    }

    pub(super) fn accept<C>(&mut self, ops: &mut HandlerOps<'_, C, VsockToken>) {
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

    pub(super) fn arm_sweep<C>(&self, ops: &mut HandlerOps<'_, C, VsockToken>) {
        // SAFETY: the timespec is boxed in this handler, which lives as long as its worker, and
        // the worker stays on the loop for the loop's whole life.
        unsafe { ops.timeout(&self.sweep, VsockToken::Sweep) };
    }

    /// Closes host connections that sent no `CONNECT` line, or that the guest did not answer,
    /// within [`CONNECT_TIMEOUT`]: a host client never waits forever on a silent guest. The
    /// guest is told RST, so an answer that comes later is refused.
    pub(super) fn expire_connects(&mut self) {
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

    /// A host socket is ready: a pending host connection's (its `CONNECT` line) or connection
    /// `id`'s, readable or, when `write`, writable.
    pub(super) fn socket_ready<C>(
        &mut self,
        id: u32,
        write: bool,
        ops: &mut HandlerOps<'_, C, VsockToken>,
    ) {
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
    }
}
