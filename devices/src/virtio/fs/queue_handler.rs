//! The loop side of virtio-fs: takes each available chain, validates it ([`pop_chain_raw`]),
//! bounds its size, and forwards it to the share's fs thread; writes the used ring when the
//! thread answers. Queue state (positions, used ring) lives only here, on the loop thread, so a
//! pause that waits for [`QueueHandler::in_flight`] to reach 0 finds the fs thread idle and the
//! queues consistent.

use std::sync::Arc;

use event_loop::{Completion, EventToken};

use super::server::{Msg, ServerThread, SharedMem};
use crate::virtio::Interrupt;
use crate::virtio::chain::{add_used, pop_chain_raw};
use crate::virtio::worker::{Active, DeviceFailure, HandlerOps, QueueHandler};

/// The largest request or reply a chain may carry: the FUSE server's 1 MiB of data plus its
/// 4 KiB header allowance. A larger chain is answered with 0 bytes and never reaches the server.
pub const MAX_MESSAGE_BYTES: u64 = (1 << 20) + 0x1000;

/// The handler's one operation: the fs thread's completion `EventFd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsToken {
    /// The fs thread answered requests.
    Done,
}

impl EventToken for FsToken {
    fn encode(self) -> u32 {
        0
    }

    fn decode(raw: u32) -> Option<Self> {
        (raw == 0).then_some(Self::Done)
    }
}

/// The virtio-fs queue handler.
#[derive(Debug)]
pub struct FsHandler {
    tag: String,
    server: Option<ServerThread>,
    mem: Option<SharedMem>,
    in_flight: usize,
}

impl FsHandler {
    /// A handler for device `tag`, serving `server`'s share (`None`: a slot with no share yet;
    /// every request is answered with 0 bytes).
    pub fn new(tag: String, server: Option<ServerThread>) -> Self {
        Self {
            tag,
            server,
            mem: None,
            in_flight: 0,
        }
    }

    /// The device's tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The share's server, if the device has a share.
    pub fn server(&self) -> Option<&ServerThread> {
        self.server.as_ref()
    }

    /// Whether the guest has a FUSE session on this device (its state cannot be snapshotted).
    pub fn session_active(&self) -> bool {
        self.server
            .as_ref()
            .is_some_and(ServerThread::session_active)
    }

    fn drain_done(
        &mut self,
        mut active: Option<&mut Active>,
        irq: &Interrupt,
    ) -> Result<(), DeviceFailure> {
        let Some(server) = &self.server else {
            return Ok(());
        };
        server.ack_done();
        let mut used = false;
        while let Some(d) = server.try_done() {
            self.in_flight = self.in_flight.saturating_sub(1);
            let Some(a) = active.as_deref_mut() else {
                continue;
            };
            // A completion of a request taken before a reset is not written into the rings of
            // the next activation.
            if a.epoch != d.epoch || d.queue >= a.queues.len() {
                continue;
            }
            add_used(&mut a.queues[d.queue], d.queue, &a.mem, d.head, d.len)?;
            used = true;
        }
        if used {
            irq.signal_used_queue();
        }
        Ok(())
    }
}

impl QueueHandler for FsHandler {
    type Token = FsToken;

    fn name(&self) -> &'static str {
        "fs"
    }

    fn start<C>(&mut self, ops: &mut HandlerOps<'_, C, FsToken>) {
        if let Some(s) = &self.server {
            ops.poll_readable(s.done_fd(), FsToken::Done, true);
        }
    }

    fn activated<C>(
        &mut self,
        active: &mut Active,
        _restored: bool,
        _irq: &Interrupt,
        _ops: &mut HandlerOps<'_, C, FsToken>,
    ) -> Result<(), DeviceFailure> {
        self.mem = Some(Arc::new(active.mem.clone()));
        Ok(())
    }

    fn process_queue<C>(
        &mut self,
        queue: usize,
        active: &mut Active,
        irq: &Interrupt,
        _ops: &mut HandlerOps<'_, C, FsToken>,
    ) -> Result<(), DeviceFailure> {
        let mem = match &self.mem {
            Some(m) => m.clone(),
            None => {
                let m = Arc::new(active.mem.clone());
                self.mem = Some(m.clone());
                m
            }
        };
        let mut used = false;
        while let Some((chain, raw)) = pop_chain_raw(&mut active.queues[queue], queue, mem.clone())?
        {
            let sendable = chain.readable_len() <= MAX_MESSAGE_BYTES
                && chain.writable_len() <= MAX_MESSAGE_BYTES
                && chain.readable_len() > 0;
            let sent = sendable
                && self.server.as_ref().is_some_and(|s| {
                    s.send(Msg::Request {
                        epoch: active.epoch,
                        queue,
                        head: chain.head,
                        chain: raw,
                    })
                });
            if sent {
                self.in_flight += 1;
            } else {
                if !sendable {
                    crate::guest_warn!(
                        "virtio-fs {}: request of {} + {} bytes refused",
                        self.tag,
                        chain.readable_len(),
                        chain.writable_len()
                    );
                }
                add_used(&mut active.queues[queue], queue, &active.mem, chain.head, 0)?;
                used = true;
            }
        }
        if used {
            irq.signal_used_queue();
        }
        Ok(())
    }

    fn complete<C>(
        &mut self,
        c: Completion<FsToken>,
        active: Option<&mut Active>,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, FsToken>,
    ) -> Result<(), DeviceFailure> {
        if !c.more
            && let Some(s) = &self.server
        {
            ops.poll_readable(s.done_fd(), FsToken::Done, true);
        }
        self.drain_done(active, irq)
    }

    fn reset(&mut self) {
        self.mem = None;
        if let Some(s) = &self.server {
            s.send(Msg::Reset);
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}
