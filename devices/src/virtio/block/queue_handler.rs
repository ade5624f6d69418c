//! virtio-blk queue processing on the event loop.

use std::collections::BTreeSet;

use event_loop::{Completion, EventToken};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::{BackendKind, Disk, execute_sync, iovecs, uring_entry};
use super::request::{DiskGeometry, Parsed, Request, RequestKind, parse};
use crate::virtio::Interrupt;
use crate::virtio::chain::{add_used, pop_chain, write_writable};
use crate::virtio::worker::{
    Active, DeviceFailure, HANDLER_TOKEN_BIT, HandlerOps, QueueHandler, QueuePosition,
};

/// Tag of a request's io_uring operation: its index in the in-flight table (at most the sum of the
/// queue sizes, far below [`HANDLER_TOKEN_BIT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSlot(u32);

impl EventToken for RequestSlot {
    fn encode(self) -> u32 {
        self.0
    }

    fn decode(raw: u32) -> Option<Self> {
        (raw < HANDLER_TOKEN_BIT).then_some(Self(raw))
    }
}

/// A request submitted to io_uring and not completed yet.
#[derive(Debug)]
struct InFlight {
    queue: usize,
    head: u16,
    /// Its available-ring position (for replay after a snapshot).
    pos: u16,
    status: GuestAddress,
    /// Bytes the operation must return (0: any non-negative result).
    expect: u64,
    /// Used length on success.
    used_len: u32,
    /// The iovecs the kernel reads; must not move until completion.
    _iov: Vec<libc::iovec>,
    /// Keeps the guest memory mapped until completion, even across a reset.
    mem: GuestMemoryMmap,
    epoch: u64,
}

/// Serves virtio-blk requests from one disk.
#[derive(Debug)]
pub struct BlockHandler {
    pub(super) disk: Disk,
    pub(super) geo: DiskGeometry,
    pub(super) id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    backend: BackendKind,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Per queue: available positions already completed before a snapshot that the restored
    /// device must skip while replaying the requests that were in flight.
    pub(super) skip: Vec<BTreeSet<u16>>,
    /// The spare slot's name, when this disk is one.
    pub(super) spare_slot: Option<String>,
}

impl BlockHandler {
    /// A handler for `disk`.
    pub fn new(disk: Disk, geo: DiskGeometry, id: [u8; 20], backend: BackendKind) -> Self {
        Self {
            disk,
            geo,
            id,
            backend,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            skip: vec![BTreeSet::new()],
            spare_slot: None,
        }
    }

    /// For a snapshot: queue positions rewound to the oldest request in flight (it will be
    /// replayed), and the positions after it that completed (they will be skipped).
    pub fn replay_positions(
        &self,
        current: &[QueuePosition],
    ) -> (Vec<QueuePosition>, Vec<Vec<u16>>) {
        let mut positions = current.to_vec();
        let mut skips = Vec::with_capacity(current.len());
        for (q, p) in positions.iter_mut().enumerate() {
            let pending: BTreeSet<u16> = self
                .slots
                .iter()
                .flatten()
                .filter(|f| f.queue == q)
                .map(|f| f.pos)
                .collect();
            let mut skip: Vec<u16> = self.skip.get(q).into_iter().flatten().copied().collect();
            if let Some(oldest) = pending
                .iter()
                .copied()
                .max_by_key(|&pos| p.next_avail.wrapping_sub(pos))
            {
                let mut pos = oldest;
                while pos != p.next_avail {
                    if !pending.contains(&pos) && !skip.contains(&pos) {
                        skip.push(pos);
                    }
                    pos = pos.wrapping_add(1);
                }
                p.next_avail = oldest;
            }
            skips.push(skip);
        }
        (positions, skips)
    }

    fn write_status(mem: &GuestMemoryMmap, at: GuestAddress, code: u32) {
        if mem.write_obj(code as u8, at).is_err() {
            crate::guest_warn!("virtio-blk: cannot write the status byte");
        }
    }

    /// Answers a request that needs no I/O or did its I/O synchronously; returns the used length.
    fn finish(mem: &GuestMemoryMmap, status: GuestAddress, ok: bool, used_len: u32) -> u32 {
        if ok {
            Self::write_status(mem, status, VIRTIO_BLK_S_OK);
            used_len
        } else {
            Self::write_status(mem, status, VIRTIO_BLK_S_IOERR);
            1
        }
    }

    /// Handles one parsed request; `Some(used_len)` when it completed at once.
    fn start_request<C>(
        &mut self,
        queue: usize,
        head: u16,
        pos: u16,
        req: Request,
        active: &Active,
        ops: &mut HandlerOps<'_, C, RequestSlot>,
    ) -> Option<u32> {
        let mem = &active.mem;
        let used_len = match req.kind {
            RequestKind::Read => req.len as u32 + 1,
            RequestKind::GetId => {
                let n = write_writable(mem, &req.data, &self.id);
                return Some(Self::finish(mem, req.status, true, n as u32 + 1));
            }
            _ => 1,
        };
        let Some(iov) = iovecs(mem, &req.data) else {
            return Some(Self::finish(mem, req.status, false, 1));
        };
        let expect = match req.kind {
            RequestKind::Read | RequestKind::Write => req.len,
            _ => 0,
        };
        if self.backend == BackendKind::Sync {
            let r = execute_sync(&self.disk, &req, &iov);
            let ok = r >= 0 && (expect == 0 || r as u64 == expect);
            return Some(Self::finish(mem, req.status, ok, used_len));
        }
        let Some(entry) = uring_entry(&self.disk, &req, &iov) else {
            return Some(Self::finish(mem, req.status, false, 1));
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.slots[slot] = Some(InFlight {
            queue,
            head,
            pos,
            status: req.status,
            expect,
            used_len,
            _iov: iov,
            mem: mem.clone(),
            epoch: active.epoch,
        });
        self.in_flight += 1;
        // SAFETY: the entry points to the iovecs, kept in the slot's `InFlight` until the
        // completion arrives, and through them to guest memory, kept mapped by the slot's `mem`
        // until then (even across a reset); the disk's fd lives as long as this handler, whose
        // worker stays on the loop for the loop's whole life.
        unsafe { ops.push(entry, RequestSlot(slot as u32)) };
        None
    }
}

impl QueueHandler for BlockHandler {
    type Token = RequestSlot;

    fn name(&self) -> &'static str {
        "blk"
    }

    fn activated<C>(
        &mut self,
        _active: &mut Active,
        _restored: bool,
        _irq: &Interrupt,
        _ops: &mut HandlerOps<'_, C, RequestSlot>,
    ) -> Result<(), DeviceFailure> {
        Ok(())
    }

    fn process_queue<C>(
        &mut self,
        queue: usize,
        active: &mut Active,
        irq: &Interrupt,
        ops: &mut HandlerOps<'_, C, RequestSlot>,
    ) -> Result<(), DeviceFailure> {
        let mut used = false;
        loop {
            let pos = active.queues[queue].next_avail();
            let Some(chain) = pop_chain(&mut active.queues[queue], queue, &active.mem)? else {
                break;
            };
            if self.skip.get_mut(queue).is_some_and(|s| s.remove(&pos)) {
                continue;
            }
            let done = match parse(&active.mem, &chain, self.geo) {
                Parsed::NoStatus => {
                    return Err(DeviceFailure::BadRequest {
                        queue,
                        head: chain.head,
                    });
                }
                Parsed::Reject { status, code } => {
                    Self::write_status(&active.mem, status, u32::from(code));
                    Some(1)
                }
                Parsed::Ok(req) => self.start_request(queue, chain.head, pos, req, active, ops),
            };
            if let Some(len) = done {
                add_used(
                    &mut active.queues[queue],
                    queue,
                    &active.mem,
                    chain.head,
                    len,
                )?;
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
        c: Completion<RequestSlot>,
        active: Option<&mut Active>,
        irq: &Interrupt,
        _ops: &mut HandlerOps<'_, C, RequestSlot>,
    ) -> Result<(), DeviceFailure> {
        let slot = c.tag.0 as usize;
        let Some(f) = self.slots.get_mut(slot).and_then(Option::take) else {
            return Ok(());
        };
        self.free.push(slot);
        self.in_flight -= 1;
        let Some(active) = active.filter(|a| a.epoch == f.epoch) else {
            // Submitted before a reset: the driver has forgotten it.
            return Ok(());
        };
        let ok = c.result >= 0 && (f.expect == 0 || c.result as u64 == f.expect);
        let len = Self::finish(&f.mem, f.status, ok, f.used_len);
        add_used(
            &mut active.queues[f.queue],
            f.queue,
            &active.mem,
            f.head,
            len,
        )?;
        irq.signal_used_queue();
        Ok(())
    }

    fn reset(&mut self) {
        for s in self.skip.iter_mut() {
            s.clear();
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::test_memory;

    fn handler_with_in_flight(positions: &[u16]) -> BlockHandler {
        let geo = DiskGeometry {
            sectors: 0,
            read_only: false,
            discard: false,
        };
        let mut h = BlockHandler::new(Disk::empty().unwrap(), geo, [0; 20], BackendKind::IoUring);
        let mem = test_memory();
        for &pos in positions {
            h.slots.push(Some(InFlight {
                queue: 0,
                head: pos,
                pos,
                status: GuestAddress(0),
                expect: 0,
                used_len: 1,
                _iov: Vec::new(),
                mem: mem.clone(),
                epoch: 1,
            }));
        }
        h
    }

    #[test]
    fn test_replay_positions_out_of_order_completions_are_skipped() {
        // Positions 5..10 were popped; 5 and 8 are still in flight, 6, 7 and 9 completed.
        let h = handler_with_in_flight(&[8, 5]);
        let (pos, skip) = h.replay_positions(&[QueuePosition {
            next_avail: 10,
            next_used: 3,
        }]);
        assert_eq!(
            pos,
            vec![QueuePosition {
                next_avail: 5,
                next_used: 3
            }]
        );
        assert_eq!(skip, vec![vec![6, 7, 9]]);
    }

    #[test]
    fn test_replay_positions_across_u16_wrap() {
        let h = handler_with_in_flight(&[65534, 1]);
        let (pos, skip) = h.replay_positions(&[QueuePosition {
            next_avail: 2,
            next_used: 0,
        }]);
        assert_eq!(pos[0].next_avail, 65534);
        assert_eq!(skip, vec![vec![65535, 0]]);
    }
}
