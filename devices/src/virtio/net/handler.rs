//! The virtio-net worker's state and its dispatch: queue notifications and backend readiness to
//! `rx.rs` and `tx.rs`, offloads set on activation.

use std::os::fd::AsRawFd;

use event_loop::{Completion, EventToken};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
};

use super::MAX_FRAME_BUF;
use super::backend::Backend;
use crate::virtio::Interrupt;
use crate::virtio::worker::{Active, DeviceFailure, HandlerOps, QueueHandler};

pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;

/// What one of the net handler's operations is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetToken {
    /// The backend has a frame to read (one-shot poll).
    Readable,
    /// The backend can take frames again, or TX has more to do (one-shot poll).
    Writable,
}

impl EventToken for NetToken {
    fn encode(self) -> u32 {
        match self {
            Self::Readable => 0,
            Self::Writable => 1,
        }
    }

    fn decode(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Readable),
            1 => Some(Self::Writable),
            _ => None,
        }
    }
}

/// What the device counted since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent that reached the backend.
    pub tx_frames: u64,
    /// Their bytes (header included).
    pub tx_bytes: u64,
    /// Frames the guest sent that were dropped: malformed chains (device-writable buffers, shorter
    /// than the header, longer than the cap), no backend, or refused by the backend.
    pub tx_dropped: u64,
    /// Frames put in the guest's buffers.
    pub rx_frames: u64,
    /// Their bytes (header included).
    pub rx_bytes: u64,
    /// Frames read from the backend and dropped: shorter than a header, or larger than every
    /// buffer the guest could give.
    pub rx_dropped: u64,
}

/// The virtio-net device's worker state: the backend, the frame buffers and the flow control.
#[derive(Debug)]
pub struct NetHandler {
    pub(super) id: String,
    pub(super) mac: [u8; 6],
    pub(super) backend: Option<Backend>,
    /// A read failed for good (the tap went away): stop polling it.
    pub(super) backend_dead: bool,
    /// Frame read from the backend, header first.
    pub(super) rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` waiting for the guest's buffers (at most one: the backend
    /// is not read while it waits).
    pub(super) rx_pending: Option<usize>,
    pub(super) tx_buf: Vec<u8>,
    /// The backend refused a frame with EAGAIN: TX waits for it to be writable.
    pub(super) tx_blocked: bool,
    pub(super) read_armed: bool,
    pub(super) write_armed: bool,
    pub(super) stats: NetStats,
}

impl NetHandler {
    /// A handler for device `id` with `mac`, over `backend` (`None`: a slot).
    pub fn new(id: String, mac: [u8; 6], backend: Option<Backend>) -> Self {
        Self {
            id,
            mac,
            backend,
            backend_dead: false,
            rx_buf: vec![0u8; MAX_FRAME_BUF],
            rx_pending: None,
            tx_buf: vec![0u8; MAX_FRAME_BUF],
            tx_blocked: false,
            read_armed: false,
            write_armed: false,
            stats: NetStats::default(),
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The backend, if the device has one.
    pub fn backend(&self) -> Option<&Backend> {
        self.backend.as_ref()
    }

    /// The device's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether a frame read from the backend waits for guest buffers.
    pub fn rx_waiting(&self) -> bool {
        self.rx_pending.is_some()
    }

    pub(super) fn arm_read<C>(&mut self, ops: &mut HandlerOps<'_, C, NetToken>) {
        if let Some(b) = &self.backend
            && !self.read_armed
            && !self.backend_dead
        {
            self.read_armed = true;
            ops.poll_readable(b.as_raw_fd(), NetToken::Readable, false);
        }
    }

    pub(super) fn arm_write<C>(&mut self, ops: &mut HandlerOps<'_, C, NetToken>) {
        if let Some(b) = &self.backend
            && !self.write_armed
        {
            self.write_armed = true;
            ops.poll_writable(b.as_raw_fd(), NetToken::Writable);
        }
    }

    /// Enables on the tap the offloads the driver acked (the tap then hands us frames with
    /// partial checksums, TSO and UFO super-frames, which the guest said it takes). Falls back to
    /// fewer if the tap refuses some (an older kernel without UFO): a guest that acked more than it
    /// gets receives plain frames, which it always accepts.
    fn set_offloads(&mut self, acked: u64) {
        let Some(backend) = &mut self.backend else {
            return;
        };
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        let mut flags = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
            if has(VIRTIO_NET_F_GUEST_UFO) {
                flags |= libc::TUN_F_UFO;
            }
        }
        for try_flags in [flags, flags & !libc::TUN_F_UFO, flags & libc::TUN_F_CSUM, 0] {
            match backend.set_offload(try_flags) {
                Ok(()) => {
                    if try_flags != flags {
                        tracing::info!(
                            "virtio-net {}: the tap refused offloads {flags:#x}, using {try_flags:#x}",
                            self.id
                        );
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!("virtio-net {}: TUNSETOFFLOAD {try_flags:#x}: {e}", self.id)
                }
            }
        }
        tracing::warn!(
            "virtio-net {}: the tap refused every offload setting",
            self.id
        );
    }
}

impl QueueHandler for NetHandler {
    type Token = NetToken;

    fn name(&self) -> &'static str {
        "net"
    }

    fn activated<C>(
        &mut self,
        active: &mut Active,
        _restored: bool,
        _irq: &Interrupt,
        _ops: &mut HandlerOps<'_, C, NetToken>,
    ) -> Result<(), DeviceFailure> {
        // The worker runs both queues right after this: RX starts reading the backend.
        self.set_offloads(active.acked_features);
        self.rx_pending = None;
        self.tx_blocked = false;
        Ok(())
    }

    fn process_queue<C>(
        &mut self,
        queue: usize,
        active: &mut Active,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, NetToken>,
    ) -> Result<(), DeviceFailure> {
        match queue {
            RX => self.pump_rx(active, irq, ops),
            TX => self.process_tx(active, irq, ops),
            _ => Ok(()),
        }
    }

    fn complete<C>(
        &mut self,
        c: Completion<NetToken>,
        active: Option<&mut Active>,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, NetToken>,
    ) -> Result<(), DeviceFailure> {
        match c.tag {
            NetToken::Readable => {
                self.read_armed = false;
                match active {
                    Some(active) => self.pump_rx(active, irq, ops),
                    None => Ok(()),
                }
            }
            NetToken::Writable => {
                self.write_armed = false;
                self.tx_blocked = false;
                match active {
                    Some(active) => self.process_tx(active, irq, ops),
                    None => Ok(()),
                }
            }
        }
    }

    fn reset(&mut self) {
        // Polls still armed complete into an inactive device and are ignored; the next
        // activation reads and writes afresh.
        self.rx_pending = None;
        self.tx_blocked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_net_token_roundtrip_and_unknown() {
        for t in [NetToken::Readable, NetToken::Writable] {
            assert_eq!(NetToken::decode(t.encode()), Some(t));
        }
        assert_eq!(NetToken::decode(2), None);
    }
}
