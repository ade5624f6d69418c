//! One stream connection between a guest port and a host Unix socket: its flow-control
//! bookkeeping and buffers. No event-loop code here.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

/// Our receive buffer per connection (what we announce as `buf_alloc`): bytes the guest may have
/// sent that the host side has not read yet.
pub const CONN_BUF: u32 = 256 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host connected and we sent the guest a REQUEST; waiting for its RESPONSE.
    HostInit,
    /// Data flows.
    Established,
}

/// A connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Poll id (tags of its operations).
    pub id: u32,
    /// When the connection was created (connect timeout of host-initiated connections).
    pub opened: std::time::Instant,
    /// The state.
    pub state: ConnState,
    /// Guest data not yet written to the stream.
    pub tx_buf: Vec<u8>,
    /// Bytes written to the stream (announced as `fwd_cnt`).
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last announced to the guest.
    pub last_fwd_sent: u32,
    /// Bytes sent to the guest.
    pub rx_cnt: u32,
    /// The guest's receive buffer size.
    pub peer_buf_alloc: u32,
    /// Bytes the guest consumed.
    pub peer_fwd_cnt: u32,
    /// Bytes read from the host before the guest accepted the connection, sent first.
    pub rx_pending: Vec<u8>,
    /// The stream may have data to read.
    pub readable: bool,
    /// A read poll is armed.
    pub read_armed: bool,
    /// A write poll is armed.
    pub write_armed: bool,
    /// The guest will send no more.
    pub guest_shut_send: bool,
    /// The guest will receive no more.
    pub guest_shut_rcv: bool,
    /// The host closed its side.
    pub host_eof: bool,
    /// A CREDIT_UPDATE for this connection waits in the control queue.
    pub credit_update_queued: bool,
}

impl Connection {
    /// A connection over `stream` (set non-blocking here).
    pub fn new(stream: UnixStream, id: u32, state: ConnState) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            id,
            opened: std::time::Instant::now(),
            state,
            tx_buf: Vec::new(),
            fwd_cnt: 0,
            last_fwd_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_pending: Vec::new(),
            readable: false,
            read_armed: false,
            write_armed: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_eof: false,
            credit_update_queued: false,
        })
    }

    /// Bytes we may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records the guest's credit fields from one of its packets.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Whether there is something to send to the guest (data or bytes read early).
    pub fn wants_rx(&self) -> bool {
        self.state == ConnState::Established
            && !self.guest_shut_rcv
            && (self.readable || !self.rx_pending.is_empty())
            && !self.host_eof
            && self.peer_credit() > 0
    }

    /// Takes guest data for the stream: writes what the stream accepts, buffers the rest.
    /// `Err` when the guest overran the credit we gave it, or the stream failed.
    pub fn push_guest_data(&mut self, data: &[u8]) -> Result<(), ()> {
        if self.tx_buf.len() + data.len() > CONN_BUF as usize {
            return Err(());
        }
        self.tx_buf.extend_from_slice(data);
        self.flush()
    }

    /// Writes buffered guest data to the stream. `Ok` also when it would block.
    pub fn flush(&mut self) -> Result<(), ()> {
        while !self.tx_buf.is_empty() {
            match self.stream.write(&self.tx_buf) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        if self.guest_shut_send {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Whether the guest should be told about freed buffer space now.
    pub fn credit_update_due(&self) -> bool {
        let unannounced = self.fwd_cnt.wrapping_sub(self.last_fwd_sent);
        unannounced >= CONN_BUF / 4 || (unannounced > 0 && self.tx_buf.is_empty())
    }

    /// Reads up to `buf.len()` bytes for the guest: early bytes first, then the stream.
    pub fn read_for_guest(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.rx_pending.is_empty() {
            let n = buf.len().min(self.rx_pending.len());
            buf[..n].copy_from_slice(&self.rx_pending[..n]);
            self.rx_pending.drain(..n);
            return Ok(n);
        }
        self.stream.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_peer_credit_wraps_and_saturates() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, 0, ConnState::Established).unwrap();
        c.update_peer_credit(1000, u32::MAX - 10);
        c.rx_cnt = 5; // 16 bytes in flight across the wrap
        assert_eq!(c.peer_credit(), 984);
        c.rx_cnt = (u32::MAX - 10).wrapping_add(2000);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn test_push_guest_data_past_credit_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, 0, ConnState::Established).unwrap();
        // Nobody reads `b`: the socket buffer fills, then our buffer, then we refuse.
        let chunk = vec![7u8; 64 * 1024];
        let mut refused = false;
        for _ in 0..64 {
            if c.push_guest_data(&chunk).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(c.tx_buf.len() <= CONN_BUF as usize);
        drop(b);
    }
}
