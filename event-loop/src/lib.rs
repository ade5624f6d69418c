//! The VMM's event loop: one thread, one io_uring.
//!
//! A crate of its own so that both the VMM and the devices (whose queue handlers and block I/O run
//! on it) can use it without the devices depending on the VMM.
//!
//! Every source of events (the control socket and its connections, signals, serial input, timers,
//! and each virtio device's worker: its queue notifications, block I/O and vsock sockets) is an
//! [`EventSource`] registered in a slot. It submits operations through [`Ops`], which tags each
//! with the source's slot, the slot's generation and the source's own typed tag
//! ([`EventSource::Token`], an [`EventToken`]) in the SQE's `user_data`; completions come back to
//! the same source, decoded to that type. A completion that arrives after its source was removed
//! is dropped, even if another source took the slot since (the generation differs). Sources get
//! the loop's context `C` (the VM's state) by `&mut`, so nothing here needs a lock.
//!
//! The userfaultfd page server is not on this loop but on a thread of its own (see
//! `snapshot::page_server`): the loop blocks while it pauses vCPUs for a snapshot, and a vCPU
//! parked on a fault could then never be answered.
//!
//! Adding an event source: for "do this when that fd is readable", one [`FdWatch`] with a closure;
//! for anything else (reads into buffers, several operations in flight), implement [`EventSource`]
//! with a tag enum implementing [`EventToken`] (start: submit the first operations; complete:
//! handle one completion and resubmit). Then call [`EventLoop::add`].

#![deny(missing_docs)]

mod sources;
mod token;

use std::marker::PhantomData;
use std::os::fd::RawFd;

use io_uring::register::Restriction;
use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};

pub use sources::{FdWatch, Ticker, Watch};
pub use token::EventToken;
use token::Token;

/// Depth of the submission queue.
const RING_ENTRIES: u32 = 256;
/// Most sources registered at once (the slot is 16 bits of `user_data`).
pub const MAX_SOURCES: usize = 1 << 16;

/// Every operation the loop's sources submit: the ring is restricted to these
/// (`IORING_REGISTER_RESTRICTIONS`), and each is probed at start-up.
pub const LOOP_OPCODES: &[(u8, &str)] = &[
    (opcode::PollAdd::CODE, "IORING_OP_POLL_ADD"),
    (opcode::Timeout::CODE, "IORING_OP_TIMEOUT"),
    (opcode::Read::CODE, "IORING_OP_READ"),
    (opcode::Write::CODE, "IORING_OP_WRITE"),
    (opcode::Readv::CODE, "IORING_OP_READV"),
    (opcode::Writev::CODE, "IORING_OP_WRITEV"),
    (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    (opcode::Fallocate::CODE, "IORING_OP_FALLOCATE"),
];

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// io_uring_setup failed (kernel too old, or io_uring disabled by sysctl/seccomp).
    #[error("cannot create the io_uring event loop: {0} (is io_uring disabled on this host?)")]
    Setup(#[source] std::io::Error),
    /// The kernel lacks an operation the VMM needs.
    #[error("this kernel's io_uring does not support {0}")]
    Unsupported(&'static str),
    /// The ring could not be restricted to the loop's opcodes.
    #[error("cannot restrict the io_uring event loop to its opcodes: {0}")]
    Restrict(#[source] std::io::Error),
    /// The kernel lacks IORING_FEAT_NODROP, so completions could be lost.
    #[error("this kernel's io_uring lacks IORING_FEAT_NODROP (completions could be dropped)")]
    NoDrop,
    /// Submitting or waiting failed.
    #[error("io_uring submit: {0}")]
    Submit(#[source] std::io::Error),
}

/// One completion handed to a source.
#[derive(Debug, Clone, Copy)]
pub struct Completion<T> {
    /// The source's tag of the operation.
    pub tag: T,
    /// The result: >= 0 on success, `-errno` on failure.
    pub result: i32,
    /// Whether a multishot operation will produce more completions.
    pub more: bool,
}

/// What a source wants after handling a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep the source.
    Continue,
    /// Remove the source. Completions of its operations still in flight are dropped; memory
    /// those operations point to must outlive them (see [`Ops::push`]).
    Remove,
}

/// A source as the loop holds it, whatever its tag type.
pub type BoxedSource<C> = Box<dyn AnySource<C>>;

/// Submission handle given to a source; tags every operation with the source's slot, the slot's
/// generation and the source's tag of type `T`. Tags are taken as `impl Into<T>`, so a source
/// whose tag wraps another type's (a device worker and its handler) can pass the inner one.
pub struct Ops<'a, C, T> {
    slot: u16,
    generation: u16,
    pending: &'a mut Vec<squeue::Entry>,
    spawned: &'a mut Vec<BoxedSource<C>>,
    exit: &'a mut bool,
    _tag: PhantomData<fn(T)>,
}

impl<C, T> std::fmt::Debug for Ops<'_, C, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("slot", &self.slot)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl<C, T> Ops<'_, C, T> {
    /// The same handle with another tag type (the loop erases tags; a source's own ops are typed).
    fn retag<U>(&mut self) -> Ops<'_, C, U> {
        Ops {
            slot: self.slot,
            generation: self.generation,
            pending: &mut *self.pending,
            spawned: &mut *self.spawned,
            exit: &mut *self.exit,
            _tag: PhantomData,
        }
    }

    fn token(&self, tag: u32) -> u64 {
        Token {
            slot: self.slot,
            generation: self.generation,
            tag,
        }
        .encode()
    }

    /// Registers another source (for example an accepted connection) after this completion.
    pub fn spawn(&mut self, source: BoxedSource<C>) {
        self.spawned.push(source);
    }

    /// Ends the loop after this round of completions.
    pub fn exit(&mut self) {
        *self.exit = true;
    }
}

impl<C, T: EventToken> Ops<'_, C, T> {
    /// Waits for `events` (`POLLIN`, `POLLOUT`, ...) on `fd` (multishot when `multishot`). The
    /// operation holds no pointer; a closed fd completes it with an error.
    pub fn poll(&mut self, fd: RawFd, events: u32, tag: impl Into<T>, multishot: bool) {
        let e = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(multishot)
            .build()
            .user_data(self.token(tag.into().encode()));
        self.pending.push(e);
    }

    /// Waits for `fd` to become readable (multishot when `multishot`).
    pub fn poll_readable(&mut self, fd: RawFd, tag: impl Into<T>, multishot: bool) {
        self.poll(fd, libc::POLLIN as u32, tag, multishot);
    }

    /// Waits for `fd` to become writable (once).
    pub fn poll_writable(&mut self, fd: RawFd, tag: impl Into<T>) {
        self.poll(fd, libc::POLLOUT as u32, tag, false);
    }

    /// Completes after `timespec`.
    ///
    /// # Safety
    ///
    /// The ring keeps a pointer to `timespec`: it must stay valid, at the same address, until the
    /// operation completes. A source keeps it in a boxed field of its own and does not drop it
    /// (nor return [`Flow::Remove`]) while the timeout is in flight.
    pub unsafe fn timeout(&mut self, timespec: &types::Timespec, tag: impl Into<T>) {
        let e = opcode::Timeout::new(timespec as *const _)
            .build()
            .user_data(self.token(tag.into().encode()));
        self.pending.push(e);
    }

    /// Submits an operation built by the source; its `user_data` is set to this source's token.
    ///
    /// # Safety
    ///
    /// Everything `entry` points to (buffers, iovecs, timespecs, addresses) must stay valid, at
    /// the same address, until the kernel completes the operation; buffers the kernel writes must
    /// not be read or written by anyone else until then; every fd it names must stay open until
    /// then. Removing the source does not cancel the operation: memory it points to must outlive
    /// the operation even then.
    pub unsafe fn push(&mut self, entry: squeue::Entry, tag: impl Into<T>) {
        let token = self.token(tag.into().encode());
        self.pending.push(entry.user_data(token));
    }
}

/// A source of events on the loop.
pub trait EventSource<C> {
    /// What the source's operations are for, as its completions report it.
    type Token: EventToken;
    /// A name for logs.
    fn name(&self) -> &'static str;
    /// Submits the source's first operations.
    fn start(&mut self, ctx: &mut C, ops: &mut Ops<'_, C, Self::Token>);
    /// Handles one completion of an operation this source submitted.
    fn complete(
        &mut self,
        c: Completion<Self::Token>,
        ctx: &mut C,
        ops: &mut Ops<'_, C, Self::Token>,
    ) -> Flow;
}

mod erased {
    /// The tag type of the loop's own, untyped handle.
    #[derive(Debug, Clone, Copy)]
    pub struct Raw;
}

/// An [`EventSource`] with its tag type erased, as the loop stores it. Implemented for every
/// `EventSource`; box one to hand it to [`EventLoop::add`] or [`Ops::spawn`].
pub trait AnySource<C> {
    /// The source's name.
    fn name(&self) -> &'static str;
    /// [`EventSource::start`].
    fn start_erased(&mut self, ctx: &mut C, ops: &mut Ops<'_, C, erased::Raw>);
    /// Decodes the tag and calls [`EventSource::complete`]; drops a tag the source never made.
    fn complete_erased(
        &mut self,
        raw_tag: u32,
        result: i32,
        more: bool,
        ctx: &mut C,
        ops: &mut Ops<'_, C, erased::Raw>,
    ) -> Flow;
}

impl<C, S: EventSource<C>> AnySource<C> for S {
    fn name(&self) -> &'static str {
        EventSource::name(self)
    }

    fn start_erased(&mut self, ctx: &mut C, ops: &mut Ops<'_, C, erased::Raw>) {
        self.start(ctx, &mut ops.retag());
    }

    fn complete_erased(
        &mut self,
        raw_tag: u32,
        result: i32,
        more: bool,
        ctx: &mut C,
        ops: &mut Ops<'_, C, erased::Raw>,
    ) -> Flow {
        let Some(tag) = S::Token::decode(raw_tag) else {
            tracing::warn!(
                "event source {}: completion with a tag it never used ({raw_tag:#x}), dropped",
                EventSource::name(self)
            );
            return Flow::Continue;
        };
        self.complete(Completion { tag, result, more }, ctx, &mut ops.retag())
    }
}

/// A slot of the loop's source table.
struct Slot<C> {
    /// Bumped each time the slot is given to a new source.
    generation: u16,
    source: Option<BoxedSource<C>>,
}

/// The loop.
pub struct EventLoop<C> {
    ring: IoUring,
    slots: Vec<Slot<C>>,
    pending: Vec<squeue::Entry>,
}

impl<C> std::fmt::Debug for EventLoop<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field(
                "sources",
                &self
                    .slots
                    .iter()
                    .filter_map(|s| s.source.as_ref())
                    .map(|s| s.name())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<C> EventLoop<C> {
    /// Creates the ring and checks the kernel supports what the loop uses.
    pub fn new() -> Result<Self, EventLoopError> {
        // Created disabled, so that the opcodes it may run can be restricted before it runs any:
        // a ring's operations bypass seccomp.
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(RING_ENTRIES)
            .map_err(EventLoopError::Setup)?;
        if !ring.params().is_feature_nodrop() {
            return Err(EventLoopError::NoDrop);
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(EventLoopError::Setup)?;
        for &(code, name) in LOOP_OPCODES {
            if !probe.is_supported(code) {
                return Err(EventLoopError::Unsupported(name));
            }
        }
        let mut restrictions: Vec<Restriction> = LOOP_OPCODES
            .iter()
            .map(|&(code, _)| Restriction::sqe_op(code))
            .collect();
        ring.submitter()
            .register_restrictions(&mut restrictions)
            .map_err(EventLoopError::Restrict)?;
        ring.submitter()
            .register_enable_rings()
            .map_err(EventLoopError::Restrict)?;
        Ok(Self {
            ring,
            slots: Vec::new(),
            pending: Vec::new(),
        })
    }

    /// Registers a source and lets it submit its first operations; returns whether a source
    /// asked the loop to exit. With [`MAX_SOURCES`] registered, the source is dropped (logged).
    pub fn add(&mut self, mut source: BoxedSource<C>, ctx: &mut C) -> bool {
        let slot = match self.slots.iter().position(|s| s.source.is_none()) {
            Some(free) => {
                let s = &mut self.slots[free];
                s.generation = s.generation.wrapping_add(1);
                free
            }
            None if self.slots.len() < MAX_SOURCES => {
                self.slots.push(Slot {
                    generation: 0,
                    source: None,
                });
                self.slots.len() - 1
            }
            None => {
                tracing::error!(
                    "event loop full ({MAX_SOURCES} sources): {} dropped",
                    source.name()
                );
                return false;
            }
        };
        let mut spawned = Vec::new();
        let mut exit = false;
        let mut ops = Ops {
            slot: slot as u16,
            generation: self.slots[slot].generation,
            pending: &mut self.pending,
            spawned: &mut spawned,
            exit: &mut exit,
            _tag: PhantomData,
        };
        source.start_erased(ctx, &mut ops);
        tracing::trace!("event source {} in slot {slot}", source.name());
        self.slots[slot].source = Some(source);
        for s in spawned {
            exit |= self.add(s, ctx);
        }
        exit
    }

    fn flush_pending(&mut self) -> Result<(), EventLoopError> {
        let mut i = 0;
        while i < self.pending.len() {
            // SAFETY: entries reach `pending` only through `Ops`: polls carry no pointer, and the
            // callers of the unsafe `Ops::timeout` and `Ops::push` guaranteed that what their
            // entries point to (and the fds they name) outlive the operations.
            let pushed = unsafe { self.ring.submission().push(&self.pending[i]) };
            match pushed {
                Ok(()) => i += 1,
                // Queue full: hand what we have to the kernel and retry.
                Err(_) => {
                    self.ring.submit().map_err(EventLoopError::Submit)?;
                }
            }
        }
        self.pending.clear();
        Ok(())
    }

    /// Runs until a source calls [`Ops::exit`].
    pub fn run(&mut self, ctx: &mut C) -> Result<(), EventLoopError> {
        let mut completions = Vec::new();
        loop {
            self.flush_pending()?;
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(EventLoopError::Submit(e)),
            }
            completions.clear();
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), cqueue::more(c.flags()))),
            );
            let mut exit = false;
            for &(data, result, more) in &completions {
                let token = Token::decode(data);
                let slot = usize::from(token.slot);
                let Some(Slot {
                    generation,
                    source: Some(source),
                }) = self.slots.get_mut(slot)
                else {
                    continue; // a late completion of a removed source
                };
                if *generation != token.generation {
                    // A late completion of a removed source whose slot another source took.
                    tracing::trace!("dropped a completion of a removed source (slot {slot})");
                    continue;
                }
                let mut spawned = Vec::new();
                let mut ops = Ops {
                    slot: token.slot,
                    generation: token.generation,
                    pending: &mut self.pending,
                    spawned: &mut spawned,
                    exit: &mut exit,
                    _tag: PhantomData,
                };
                let flow = source.complete_erased(token.tag, result, more, ctx, &mut ops);
                if flow == Flow::Remove {
                    self.slots[slot].source = None;
                }
                for s in spawned {
                    exit |= self.add(s, ctx);
                }
            }
            if exit {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod restriction_tests {
    use super::*;

    /// The loop's ring refuses an opcode outside [`LOOP_OPCODES`]: the completion reports
    /// EACCES instead of running it.
    #[test]
    fn test_ring_refuses_opcodes_outside_the_loop_set() {
        let mut lp = EventLoop::<()>::new().unwrap();
        let nop = opcode::Nop::new().build().user_data(7);
        // SAFETY: a NOP carries no pointers.
        unsafe { lp.ring.submission().push(&nop) }.unwrap();
        lp.ring.submit_and_wait(1).unwrap();
        let c = lp.ring.completion().next().unwrap();
        assert_eq!(c.user_data(), 7);
        assert_eq!(c.result(), -libc::EACCES);
    }
}
