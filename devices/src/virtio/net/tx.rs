//! Guest → host: frames the guest puts on the transmit queue, written to the backend.
//!
//! A chain must be device-readable only and hold 12 to [`MAX_FRAME_BUF`] bytes (header and
//! frame); others are dropped and counted (the guest gets its buffers back, the device goes on).
//! Every buffer was bounds-checked by `pop_chain`; the frame is copied out of guest memory
//! before it is written, so the guest cannot change it under the backend. A backend that cannot
//! take a frame now (EAGAIN) keeps it on the ring and TX resumes when the backend is writable.

use virtio_queue::QueueOwnedT;

use super::backend::would_block;
use super::handler::{NetHandler, NetToken, TX};
use super::{MAX_FRAME_BUF, TX_BATCH, VNET_HDR_LEN};
use crate::virtio::Interrupt;
use crate::virtio::chain::{Chain, add_used, pop_chain, read_readable};
use crate::virtio::worker::{Active, DeviceFailure, HandlerOps};

/// What became of one frame.
enum Sent {
    /// Written, or dropped: either way the chain goes back to the guest.
    Done,
    /// The backend is full: retry this chain when it is writable.
    Blocked,
}

impl NetHandler {
    fn transmit(&mut self, mem: &vm_memory::GuestMemoryMmap, chain: &Chain) -> Sent {
        let total = chain.readable_len();
        let malformed = chain.descs.iter().any(|d| d.write)
            || total < VNET_HDR_LEN as u64
            || total > MAX_FRAME_BUF as u64;
        if malformed {
            crate::guest_warn!(
                "virtio-net {}: dropped a malformed transmit chain ({total} bytes)",
                self.id
            );
            self.stats.tx_dropped += 1;
            return Sent::Done;
        }
        let total = total as usize;
        let Some(backend) = &self.backend else {
            // A slot: no link, the frame goes nowhere.
            self.stats.tx_dropped += 1;
            return Sent::Done;
        };
        if read_readable(mem, &chain.descs, &mut self.tx_buf[..total]).is_none() {
            self.stats.tx_dropped += 1;
            return Sent::Done;
        }
        loop {
            match backend.write_frame(&self.tx_buf[..total]) {
                Ok(_) => {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += total as u64;
                    return Sent::Done;
                }
                Err(e) if would_block(&e) => return Sent::Blocked,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EIO: the tap's interface is down; EINVAL: a header the host refuses.
                    tracing::debug!(
                        "virtio-net {}: frame refused by {}: {e}",
                        self.id,
                        backend.name()
                    );
                    self.stats.tx_dropped += 1;
                    return Sent::Done;
                }
            }
        }
    }

    /// Sends the guest's frames until the queue is empty, the backend is full, or [`TX_BATCH`].
    pub(super) fn process_tx<C>(
        &mut self,
        active: &mut Active,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, NetToken>,
    ) -> Result<(), DeviceFailure> {
        if self.tx_blocked {
            return Ok(());
        }
        let mut used = false;
        let mut frames = 0;
        let result = loop {
            if frames == TX_BATCH {
                // Let the loop serve others; the writable poll brings TX back at once. A slot
                // (no backend to poll) goes on at the guest's next notification: a guest that
                // refills the ring as fast as it is emptied cannot hold the loop.
                self.arm_write(ops);
                break Ok(());
            }
            let q = &mut active.queues[TX];
            let chain = match pop_chain(q, TX, &active.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            match self.transmit(&active.mem, &chain) {
                Sent::Done => {
                    if let Err(e) = add_used(&mut active.queues[TX], TX, &active.mem, chain.head, 0)
                    {
                        break Err(e);
                    }
                    used = true;
                    frames += 1;
                }
                Sent::Blocked => {
                    active.queues[TX].go_to_previous_position();
                    self.tx_blocked = true;
                    self.arm_write(ops);
                    break Ok(());
                }
            }
        };
        if used {
            irq.signal_used_queue();
        }
        result
    }
}
