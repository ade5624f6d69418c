//! Descriptor chains from a hostile driver, validated before any device looks at them.
//!
//! Pure logic over guest memory and a queue: no event loop, no backend, so it is unit-tested and
//! property-tested on its own. Every chain a device processes went through [`pop_chain`], which
//! guarantees: the available index moved by at most the queue size; the chain ends (no loop,
//! no more descriptors than the queue size); every buffer lies inside one guest memory region.
//! Devices then only ever access memory through the returned [`Desc`]s.

use std::ops::Deref;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::worker::DeviceFailure;

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum ChainError {
    /// The head index is outside the descriptor table, or the chain has no descriptor.
    #[error("empty chain or head index outside the table")]
    Empty,
    /// The chain does not end: it loops, is longer than the queue, points past the table, or
    /// refers to a bad indirect table.
    #[error("chain does not end (loop, too long, or bad next/indirect index)")]
    Unterminated,
    /// A buffer lies (partly) outside guest memory or straddles two memory regions.
    #[error("buffer {addr:#x}+{len:#x} outside guest memory")]
    OutsideMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
}

/// One validated buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (else device-readable).
    pub write: bool,
}

/// A validated descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head index, to put in the used ring.
    pub head: u16,
    /// The chain's buffers in order.
    pub descs: Vec<Desc>,
}

impl Chain {
    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.write)
            .map(|d| u64::from(d.len))
            .sum()
    }

    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| !d.write)
            .map(|d| u64::from(d.len))
            .sum()
    }
}

/// Whether `[addr, addr+len)` lies inside one region of `mem` (zero-length buffers always do).
pub fn in_one_region(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    if len == 0 {
        return true;
    }
    let Some(region) = mem.find_region(addr) else {
        return false;
    };
    let Some(last) = addr.0.checked_add(u64::from(len) - 1) else {
        return false;
    };
    last <= region.last_addr().0
}

/// Takes the next available chain of `queue`, validated. `Ok(None)`: nothing available.
/// `Err`: the driver broke the ring or the chain, and the device must go to the failed state;
/// the chain has been consumed from the available ring.
pub fn pop_chain(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
) -> Result<Option<Chain>, DeviceFailure> {
    Ok(pop_chain_raw(queue, index, mem)?.map(|(chain, _)| chain))
}

/// As [`pop_chain`], and also returns the `virtio-queue` chain itself (over any handle `M` on
/// guest memory, e.g. an `Arc` another thread can hold), for a library that walks chains itself
/// (virtio-fs's FUSE server). The returned chain re-reads the descriptor table when walked: a
/// driver may have changed it since it was validated, so its user must bound-check every buffer
/// again (the FUSE server's reader and writer do).
pub fn pop_chain_raw<M>(
    queue: &mut Queue,
    index: usize,
    mem: M,
) -> Result<Option<(Chain, DescriptorChain<M>)>, DeviceFailure>
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let avail = queue
        .avail_idx(&*mem, Ordering::Acquire)
        .map_err(|_| DeviceFailure::AvailIndex(index))?;
    let pending = avail.0.wrapping_sub(queue.next_avail());
    if pending > queue.size() {
        return Err(DeviceFailure::AvailIndex(index));
    }
    if pending == 0 {
        return Ok(None);
    }
    let mut iter = queue
        .iter(mem.clone())
        .map_err(|_| DeviceFailure::AvailIndex(index))?;
    let Some(raw) = iter.next() else {
        // The ring entry itself is unreadable: validated at activation, so this is a broken ring.
        return Err(DeviceFailure::AvailIndex(index));
    };
    let head = raw.head_index();
    let fail = |reason| DeviceFailure::Chain {
        queue: index,
        head,
        reason,
    };
    let mut descs = Vec::new();
    let mut last_has_next = false;
    for d in raw.clone() {
        if !in_one_region(&mem, d.addr(), d.len()) {
            return Err(fail(ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            }));
        }
        descs.push(Desc {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
        });
        last_has_next = d.has_next();
    }
    // The iterator stops silently when a chain loops (its time-to-live of queue-size descriptors
    // runs out), points past the table, or hits a bad indirect table: in each case the last
    // descriptor it returned still says "next".
    if descs.is_empty() {
        return Err(fail(ChainError::Empty));
    }
    if last_has_next {
        return Err(fail(ChainError::Unterminated));
    }
    Ok(Some((Chain { head, descs }, raw)))
}

/// Puts `head` in the used ring with `len` bytes written.
pub fn add_used(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), DeviceFailure> {
    queue
        .add_used(mem, head, len)
        .map_err(|_| DeviceFailure::UsedRing(index))
}

/// Reads exactly `buf.len()` bytes from the start of the chain's readable buffers.
pub fn read_readable(mem: &GuestMemoryMmap, descs: &[Desc], buf: &mut [u8]) -> Option<()> {
    let mut done = 0;
    for d in descs.iter().filter(|d| !d.write) {
        if done == buf.len() {
            break;
        }
        let n = (d.len as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], d.addr).ok()?;
        done += n;
    }
    (done == buf.len()).then_some(())
}

/// Writes `data` across the chain's writable buffers, in order; returns the bytes written.
pub fn write_writable(mem: &GuestMemoryMmap, descs: &[Desc], data: &[u8]) -> usize {
    let mut done = 0;
    for d in descs.iter().filter(|d| d.write) {
        if done == data.len() {
            break;
        }
        let n = (d.len as usize).min(data.len() - done);
        if mem.write_slice(&data[done..done + n], d.addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn queue_with(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Queue {
        let mq = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        for (i, d) in raw.iter().enumerate() {
            mq.desc_table().store(i as u16, *d).unwrap();
        }
        mq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        mq.avail().idx().store(1u16.to_le());
        mq.create_queue().unwrap()
    }

    #[test]
    fn test_pop_chain_valid_two_descriptors_returns_both() {
        let m = mem();
        let mut q = queue_with(
            &m,
            &[
                Descriptor::new(0x8000, 16, F_NEXT, 1),
                Descriptor::new(0x9000, 1, F_WRITE, 0),
            ],
        );
        let c = pop_chain(&mut q, 0, &m).unwrap().unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.descs.len(), 2);
        assert!(c.descs[1].write);
        assert_eq!(pop_chain(&mut q, 0, &m).unwrap(), None);
    }

    #[test]
    fn test_pop_chain_loop_is_unterminated() {
        let m = mem();
        let mut q = queue_with(
            &m,
            &[
                Descriptor::new(0x8000, 16, F_NEXT, 1),
                Descriptor::new(0x9000, 16, F_NEXT, 0),
            ],
        );
        let e = pop_chain(&mut q, 0, &m).unwrap_err();
        assert!(matches!(
            e,
            DeviceFailure::Chain {
                reason: ChainError::Unterminated,
                ..
            }
        ));
    }

    #[test]
    fn test_pop_chain_buffer_outside_memory_is_refused() {
        let m = mem();
        let mut q = queue_with(&m, &[Descriptor::new(0xf_fff0, 0x20, 0, 0)]);
        assert!(matches!(
            pop_chain(&mut q, 0, &m).unwrap_err(),
            DeviceFailure::Chain {
                reason: ChainError::OutsideMemory { .. },
                ..
            }
        ));
    }

    #[test]
    fn test_pop_chain_avail_index_too_far_fails() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        mq.avail().idx().store(17u16.to_le());
        let mut q = mq.create_queue().unwrap();
        assert_eq!(
            pop_chain(&mut q, 3, &m).unwrap_err(),
            DeviceFailure::AvailIndex(3)
        );
    }

    #[test]
    fn test_read_readable_short_chain_is_none() {
        let m = mem();
        let d = [Desc {
            addr: GuestAddress(0x1000),
            len: 4,
            write: false,
        }];
        let mut buf = [0u8; 8];
        assert!(read_readable(&m, &d, &mut buf).is_none());
        assert!(read_readable(&m, &d, &mut buf[..4]).is_some());
    }
}
