//! Host → guest: frames read from the backend into the guest's receive buffers.
//!
//! A frame is read only when it can be placed or the guest has buffers to try: with none left
//! the frame read is kept (`rx_pending`, one at most) and the backend is not read or polled
//! again until the guest notifies the receive queue. Without MRG_RXBUF a frame goes into one
//! chain (a frame larger than that chain is dropped and the chain kept); with it, a frame takes
//! as many chains as it needs and says how many in `num_buffers`.

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{QueueOwnedT, QueueT};

use super::backend::would_block;
use super::handler::{NetHandler, NetToken, RX};
use super::{RX_BATCH, VNET_HDR_LEN};
use crate::virtio::Interrupt;
use crate::virtio::chain::{Chain, add_used, pop_chain, write_writable};
use crate::virtio::worker::{Active, DeviceFailure, HandlerOps};

/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;

/// What became of one frame.
enum Delivery {
    /// In the guest's buffers.
    Done,
    /// No buffer (or not enough) available: keep the frame, wait for the guest.
    NoRoom,
    /// It can never fit: dropped.
    Dropped,
}

/// What reading the backend gave.
enum Read {
    Frame(usize),
    Empty,
    Dead,
}

/// A receive chain the device cannot use at all fails the device: the driver broke the ring.
fn check_rx_chain(chain: &Chain) -> Result<(), DeviceFailure> {
    let bad = |reason| DeviceFailure::BadBuffer {
        queue: RX,
        head: chain.head,
        reason,
    };
    if chain.descs.iter().any(|d| !d.write) {
        return Err(bad("device-readable buffer in the receive queue"));
    }
    if chain.writable_len() < VNET_HDR_LEN as u64 {
        return Err(bad("receive buffer shorter than the virtio-net header"));
    }
    Ok(())
}

impl NetHandler {
    fn read_backend(&mut self) -> Read {
        let Some(backend) = &self.backend else {
            return Read::Dead;
        };
        if self.backend_dead {
            return Read::Dead;
        }
        loop {
            match backend.read_frame(&mut self.rx_buf) {
                // A tap never reads 0; a socket that does has been closed.
                Ok(0) => break,
                Ok(n) => return Read::Frame(n),
                Err(e) if would_block(&e) => return Read::Empty,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(
                        "virtio-net {}: reading {} failed, receive stopped: {e}",
                        self.id,
                        backend.name()
                    );
                    break;
                }
            }
        }
        self.backend_dead = true;
        Read::Dead
    }

    /// Moves frames from the backend to the guest until either runs out (or [`RX_BATCH`]).
    pub(super) fn pump_rx<C>(
        &mut self,
        active: &mut Active,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, NetToken>,
    ) -> Result<(), DeviceFailure> {
        let mrg = active.acked_features & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut used = false;
        let mut frames = 0;
        let result = loop {
            if frames == RX_BATCH {
                // Let the loop serve others; the poll fires at once if more is waiting.
                self.arm_read(ops);
                break Ok(());
            }
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => match self.read_backend() {
                    Read::Frame(n) => n,
                    Read::Empty => {
                        self.arm_read(ops);
                        break Ok(());
                    }
                    Read::Dead => break Ok(()),
                },
            };
            frames += 1;
            if len < VNET_HDR_LEN {
                self.stats.rx_dropped += 1;
                continue;
            }
            let delivered = if mrg {
                self.deliver_merged(active, len)
            } else {
                self.deliver_single(active, len)
            };
            match delivered {
                Ok(Delivery::Done) => {
                    used = true;
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += len as u64;
                }
                Ok(Delivery::NoRoom) => {
                    // Flow control: nothing more is read until the guest gives buffers (its
                    // notification of the receive queue runs this again).
                    self.rx_pending = Some(len);
                    break Ok(());
                }
                Ok(Delivery::Dropped) => self.stats.rx_dropped += 1,
                Err(e) => break Err(e),
            }
        };
        if used {
            irq.signal_used_queue();
        }
        result
    }

    /// Without MRG_RXBUF: the frame in one chain.
    fn deliver_single(
        &mut self,
        active: &mut Active,
        len: usize,
    ) -> Result<Delivery, DeviceFailure> {
        let q = &mut active.queues[RX];
        let Some(chain) = pop_chain(q, RX, &active.mem)? else {
            return Ok(Delivery::NoRoom);
        };
        check_rx_chain(&chain)?;
        if chain.writable_len() < len as u64 {
            // The guest's buffers are smaller than this frame (it did not ack the offloads that
            // make frames this big, or the tap's MTU is above the guest's): drop the frame, keep
            // the buffer.
            q.go_to_previous_position();
            return Ok(Delivery::Dropped);
        }
        self.rx_buf[NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        let n = write_writable(&active.mem, &chain.descs, &self.rx_buf[..len]);
        add_used(q, RX, &active.mem, chain.head, n as u32)?;
        Ok(Delivery::Done)
    }

    /// With MRG_RXBUF: the frame across as many chains as it needs.
    fn deliver_merged(
        &mut self,
        active: &mut Active,
        len: usize,
    ) -> Result<Delivery, DeviceFailure> {
        let q = &mut active.queues[RX];
        let mut chains: Vec<Chain> = Vec::new();
        let mut room = 0u64;
        while room < len as u64 {
            if chains.len() >= usize::from(q.size()) {
                // The whole ring cannot hold it: it will never fit.
                for _ in 0..chains.len() {
                    q.go_to_previous_position();
                }
                return Ok(Delivery::Dropped);
            }
            let Some(chain) = pop_chain(q, RX, &active.mem)? else {
                for _ in 0..chains.len() {
                    q.go_to_previous_position();
                }
                return Ok(Delivery::NoRoom);
            };
            check_rx_chain(&chain)?;
            room += chain.writable_len();
            chains.push(chain);
        }
        let count = chains.len() as u16;
        self.rx_buf[NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&count.to_le_bytes());
        let mut off = 0;
        let mut lens = Vec::with_capacity(chains.len());
        for c in &chains {
            let n = write_writable(&active.mem, &c.descs, &self.rx_buf[off..len]);
            off += n;
            lens.push(n as u32);
        }
        for (c, n) in chains.iter().zip(lens) {
            add_used(q, RX, &active.mem, c.head, n)?;
        }
        Ok(Delivery::Done)
    }
}
