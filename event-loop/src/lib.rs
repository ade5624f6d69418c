//! The VMM's event loop: one thread, one io_uring.
//!
//! A crate of its own so that both the VMM and the devices (whose queue handlers and block I/O run
//! on it) can use it without the devices depending on the VMM.
//!
//! Every source of events (the control socket, signals, serial input, timers, later device queues
//! and the page server) is an [`EventSource`] registered in a slot. It submits operations through
//! [`Ops`], which tags each with a [`Token`] (slot + the source's own tag) in the SQE's `user_data`;
//! completions come back to the same source. Sources get the loop's context `C` (the VM's state)
//! by `&mut`, so nothing here needs a lock.
//!
//! Adding an event source: for "do this when that fd is readable", one [`FdWatch`] with a closure;
//! for anything else (reads into buffers, several operations in flight), implement [`EventSource`]
//! (start: submit the first operations; complete: handle one completion and resubmit). Then call
//! [`EventLoop::add`].

#![deny(missing_docs)]

use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};

/// Depth of the submission queue.
const RING_ENTRIES: u32 = 256;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// io_uring_setup failed (kernel too old, or io_uring disabled by sysctl/seccomp).
    #[error("cannot create the io_uring event loop: {0} (is io_uring disabled on this host?)")]
    Setup(#[source] std::io::Error),
    /// The kernel lacks an operation the VMM needs.
    #[error("this kernel's io_uring does not support {0}")]
    Unsupported(&'static str),
    /// The kernel lacks IORING_FEAT_NODROP, so completions could be lost.
    #[error("this kernel's io_uring lacks IORING_FEAT_NODROP (completions could be dropped)")]
    NoDrop,
    /// Submitting or waiting failed.
    #[error("io_uring submit: {0}")]
    Submit(#[source] std::io::Error),
}

/// Identifies an operation: which source submitted it and what for (the source's own tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// The source's slot.
    pub slot: u32,
    /// The source's tag.
    pub tag: u32,
}

impl Token {
    /// Packs into `user_data`.
    pub fn encode(self) -> u64 {
        (u64::from(self.slot) << 32) | u64::from(self.tag)
    }

    /// Unpacks from `user_data`.
    pub fn decode(data: u64) -> Self {
        Self {
            slot: (data >> 32) as u32,
            tag: data as u32,
        }
    }
}

/// One completion handed to a source.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The source's tag of the operation.
    pub tag: u32,
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
    /// Remove the source (it has nothing in flight any more).
    Remove,
}

/// Submission handle given to a source; tags every operation with the source's slot.
pub struct Ops<'a, C> {
    slot: u32,
    pending: &'a mut Vec<squeue::Entry>,
    spawned: &'a mut Vec<Box<dyn EventSource<C>>>,
    exit: &'a mut bool,
}

impl<C> std::fmt::Debug for Ops<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl<C> Ops<'_, C> {
    fn token(&self, tag: u32) -> u64 {
        Token {
            slot: self.slot,
            tag,
        }
        .encode()
    }

    /// Waits for `fd` to become readable (multishot when `multishot`).
    pub fn poll_readable(&mut self, fd: RawFd, tag: u32, multishot: bool) {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(multishot)
            .build()
            .user_data(self.token(tag));
        self.pending.push(e);
    }

    /// Completes after `timespec`. The timespec must stay where it is until the completion arrives
    /// (sources keep it in a field; they are boxed, so it does not move).
    pub fn timeout(&mut self, timespec: &types::Timespec, tag: u32) {
        let e = opcode::Timeout::new(timespec as *const _)
            .build()
            .user_data(self.token(tag));
        self.pending.push(e);
    }

    /// Submits an operation built by the source; its `user_data` is set to this source's token.
    pub fn push(&mut self, entry: squeue::Entry, tag: u32) {
        let token = self.token(tag);
        self.pending.push(entry.user_data(token));
    }

    /// Registers another source (for example an accepted connection) after this completion.
    pub fn spawn(&mut self, source: Box<dyn EventSource<C>>) {
        self.spawned.push(source);
    }

    /// Ends the loop after this round of completions.
    pub fn exit(&mut self) {
        *self.exit = true;
    }
}

/// A source of events on the loop.
pub trait EventSource<C> {
    /// A name for logs.
    fn name(&self) -> &'static str;
    /// Submits the source's first operations.
    fn start(&mut self, ctx: &mut C, ops: &mut Ops<'_, C>);
    /// Handles one completion of an operation this source submitted.
    fn complete(&mut self, c: Completion, ctx: &mut C, ops: &mut Ops<'_, C>) -> Flow;
}

/// The loop.
pub struct EventLoop<C> {
    ring: IoUring,
    sources: Vec<Option<Box<dyn EventSource<C>>>>,
    pending: Vec<squeue::Entry>,
}

impl<C> std::fmt::Debug for EventLoop<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field(
                "sources",
                &self
                    .sources
                    .iter()
                    .flatten()
                    .map(|s| s.name())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<C> EventLoop<C> {
    /// Creates the ring and checks the kernel supports what the loop uses.
    pub fn new() -> Result<Self, EventLoopError> {
        let ring = IoUring::new(RING_ENTRIES).map_err(EventLoopError::Setup)?;
        if !ring.params().is_feature_nodrop() {
            return Err(EventLoopError::NoDrop);
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(EventLoopError::Setup)?;
        for (code, name) in [
            (opcode::PollAdd::CODE, "IORING_OP_POLL_ADD"),
            (opcode::Timeout::CODE, "IORING_OP_TIMEOUT"),
            (opcode::Read::CODE, "IORING_OP_READ"),
            (opcode::Write::CODE, "IORING_OP_WRITE"),
        ] {
            if !probe.is_supported(code) {
                return Err(EventLoopError::Unsupported(name));
            }
        }
        Ok(Self {
            ring,
            sources: Vec::new(),
            pending: Vec::new(),
        })
    }

    /// Registers a source and lets it submit its first operations.
    pub fn add(&mut self, mut source: Box<dyn EventSource<C>>, ctx: &mut C) -> bool {
        let slot = match self.sources.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.sources.push(None);
                self.sources.len() - 1
            }
        };
        let mut spawned = Vec::new();
        let mut exit = false;
        let mut ops = Ops {
            slot: slot as u32,
            pending: &mut self.pending,
            spawned: &mut spawned,
            exit: &mut exit,
        };
        source.start(ctx, &mut ops);
        tracing::trace!("event source {} in slot {slot}", source.name());
        self.sources[slot] = Some(source);
        for s in spawned {
            exit |= self.add(s, ctx);
        }
        exit
    }

    fn flush_pending(&mut self) -> Result<(), EventLoopError> {
        let mut i = 0;
        while i < self.pending.len() {
            // SAFETY: every entry's buffers (timespecs) live in boxed sources that stay registered
            // until their operations complete; fds stay open for as long as their sources live.
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

    /// Runs until a source calls [`Ops::exit`] or `until` returns `true` after a round.
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
                let slot = token.slot as usize;
                let Some(Some(source)) = self.sources.get_mut(slot) else {
                    continue; // a late completion of a removed source (cancelled op)
                };
                let mut spawned = Vec::new();
                let mut ops = Ops {
                    slot: token.slot,
                    pending: &mut self.pending,
                    spawned: &mut spawned,
                    exit: &mut exit,
                };
                let flow = source.complete(
                    Completion {
                        tag: token.tag,
                        result,
                        more,
                    },
                    ctx,
                    &mut ops,
                );
                if flow == Flow::Remove {
                    self.sources[slot] = None;
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

/// What an [`FdWatch`] callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Keep watching.
    Again,
    /// Stop watching this fd (end of input, error).
    Done,
    /// End the whole loop.
    ExitLoop,
}

/// Calls `on_readable` each time `fd` becomes readable; the callback reads what it needs.
pub struct FdWatch<C> {
    name: &'static str,
    fd: RawFd,
    on_readable: Box<dyn FnMut(&mut C) -> Watch>,
}

impl<C> std::fmt::Debug for FdWatch<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdWatch")
            .field("name", &self.name)
            .field("fd", &self.fd)
            .finish()
    }
}

impl<C> FdWatch<C> {
    /// Watches `fd`, which must stay open as long as the source is registered (the callback
    /// usually owns it).
    pub fn new(
        name: &'static str,
        fd: RawFd,
        on_readable: impl FnMut(&mut C) -> Watch + 'static,
    ) -> Self {
        Self {
            name,
            fd,
            on_readable: Box::new(on_readable),
        }
    }
}

impl<C> EventSource<C> for FdWatch<C> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn start(&mut self, _ctx: &mut C, ops: &mut Ops<'_, C>) {
        ops.poll_readable(self.fd, 0, false);
    }

    fn complete(&mut self, c: Completion, ctx: &mut C, ops: &mut Ops<'_, C>) -> Flow {
        if c.result < 0 && c.result != -libc::EINTR {
            return Flow::Remove;
        }
        match (self.on_readable)(ctx) {
            Watch::Again => {
                ops.poll_readable(self.fd, 0, false);
                Flow::Continue
            }
            Watch::Done => Flow::Remove,
            Watch::ExitLoop => {
                ops.exit();
                Flow::Remove
            }
        }
    }
}

/// A periodic timer source calling `tick` every `period`.
pub struct Ticker<C> {
    name: &'static str,
    timespec: Box<types::Timespec>,
    tick: Box<dyn FnMut(&mut C) -> Flow>,
}

impl<C> std::fmt::Debug for Ticker<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticker").field("name", &self.name).finish()
    }
}

impl<C> Ticker<C> {
    /// A ticker named `name`.
    pub fn new(
        name: &'static str,
        period: Duration,
        tick: impl FnMut(&mut C) -> Flow + 'static,
    ) -> Self {
        Self {
            name,
            timespec: Box::new(types::Timespec::from(period)),
            tick: Box::new(tick),
        }
    }
}

impl<C> EventSource<C> for Ticker<C> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn start(&mut self, _ctx: &mut C, ops: &mut Ops<'_, C>) {
        ops.timeout(&self.timespec, 0);
    }

    fn complete(&mut self, _c: Completion, ctx: &mut C, ops: &mut Ops<'_, C>) -> Flow {
        let flow = (self.tick)(ctx);
        if flow == Flow::Continue {
            ops.timeout(&self.timespec, 0);
        }
        flow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn test_token_roundtrip() {
        for t in [
            Token { slot: 0, tag: 0 },
            Token {
                slot: 7,
                tag: u32::MAX,
            },
            Token {
                slot: u32::MAX,
                tag: 3,
            },
        ] {
            assert_eq!(Token::decode(t.encode()), t);
        }
    }

    struct Counter {
        evt: EventFd,
    }

    impl EventSource<Vec<u64>> for Counter {
        fn name(&self) -> &'static str {
            "counter"
        }
        fn start(&mut self, _ctx: &mut Vec<u64>, ops: &mut Ops<'_, Vec<u64>>) {
            ops.poll_readable(self.evt.as_raw_fd(), 9, true);
        }
        fn complete(
            &mut self,
            c: Completion,
            ctx: &mut Vec<u64>,
            ops: &mut Ops<'_, Vec<u64>>,
        ) -> Flow {
            assert_eq!(c.tag, 9);
            assert!(c.result > 0);
            ctx.push(self.evt.read().unwrap());
            if ctx.len() == 3 {
                ops.exit();
            } else {
                self.evt.write(ctx.len() as u64 + 1).unwrap();
            }
            Flow::Continue
        }
    }

    #[test]
    fn test_event_loop_multishot_poll_delivers_each_event() {
        let mut lp = EventLoop::<Vec<u64>>::new().unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        evt.write(1).unwrap();
        let mut seen = Vec::new();
        lp.add(Box::new(Counter { evt }), &mut seen);
        lp.run(&mut seen).unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
    }

    #[test]
    fn test_fd_watch_calls_back_until_exit() {
        let mut lp = EventLoop::<Vec<u64>>::new().unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        evt.write(5).unwrap();
        let fd = evt.as_raw_fd();
        let mut seen = Vec::new();
        lp.add(
            Box::new(FdWatch::new("evt", fd, move |seen: &mut Vec<u64>| {
                seen.push(evt.read().unwrap());
                if seen.len() == 3 {
                    return Watch::ExitLoop;
                }
                evt.write(1).unwrap();
                Watch::Again
            })),
            &mut seen,
        );
        lp.run(&mut seen).unwrap();
        assert_eq!(seen, vec![5, 1, 1]);
    }

    #[test]
    fn test_ticker_fires_repeatedly_until_removed() {
        let mut lp = EventLoop::<u32>::new().unwrap();
        let mut ticks = 0u32;
        lp.add(
            Box::new(Ticker::new("t", Duration::from_millis(1), |n: &mut u32| {
                *n += 1;
                if *n == 5 {
                    Flow::Remove
                } else {
                    Flow::Continue
                }
            })),
            &mut ticks,
        );
        struct Stopper(Box<types::Timespec>);
        impl EventSource<u32> for Stopper {
            fn name(&self) -> &'static str {
                "stopper"
            }
            fn start(&mut self, _: &mut u32, ops: &mut Ops<'_, u32>) {
                ops.timeout(&self.0, 1);
            }
            fn complete(&mut self, _: Completion, _: &mut u32, ops: &mut Ops<'_, u32>) -> Flow {
                ops.exit();
                Flow::Remove
            }
        }
        lp.add(
            Box::new(Stopper(Box::new(Duration::from_millis(50).into()))),
            &mut ticks,
        );
        lp.run(&mut ticks).unwrap();
        assert_eq!(ticks, 5);
    }
}
