use crate::virtio::Interrupt;
use crate::virtio::chain::{Chain, add_used, pop_chain, write_writable};
use crate::virtio::worker::{Active, DeviceFailure, HandlerOps, NoToken, QueueHandler};
use vm_memory::GuestMemoryMmap;

/// At most this many bytes are given per request (a larger buffer gets a short fill).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Serves entropy requests.
#[derive(Debug, Default)]
pub struct RngHandler {
    buf: Vec<u8>,
}

impl RngHandler {
    /// Answers one request: fills its writable buffers; returns the bytes written. A chain with
    /// device-readable buffers is malformed for this device and gets 0 bytes.
    pub fn serve(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> u32 {
        if chain.descs.iter().any(|d| !d.write) {
            tracing::debug!("virtio-rng: request with a device-readable buffer");
            return 0;
        }
        let want = (chain.writable_len() as usize).min(MAX_REQUEST_BYTES);
        self.buf.resize(want, 0);
        if let Err(e) = getrandom::fill(&mut self.buf) {
            tracing::warn!("virtio-rng: getrandom failed: {e}");
            return 0;
        }
        write_writable(mem, &chain.descs, &self.buf) as u32
    }
}

impl QueueHandler for RngHandler {
    /// Requests are answered at once: no operations.
    type Token = NoToken;

    fn name(&self) -> &'static str {
        "rng"
    }

    fn process_queue<C>(
        &mut self,
        queue: usize,
        active: &mut Active,
        irq: &Interrupt,
        _ops: &mut HandlerOps<'_, C, NoToken>,
    ) -> Result<(), DeviceFailure> {
        let mut used = false;
        while let Some(chain) = pop_chain(&mut active.queues[queue], queue, &active.mem)? {
            let len = self.serve(&active.mem, &chain);
            add_used(
                &mut active.queues[queue],
                queue,
                &active.mem,
                chain.head,
                len,
            )?;
            used = true;
        }
        if used {
            irq.signal_used_queue();
        }
        Ok(())
    }
}
