//! Ready-made sources: [`FdWatch`] (a callback when an fd is readable) and [`Ticker`] (a callback
//! every period).

use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::types;

use crate::{Completion, EventSource, Flow, Ops};

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
    /// One kind of operation: the poll.
    type Token = ();

    fn name(&self) -> &'static str {
        self.name
    }

    fn start(&mut self, _ctx: &mut C, ops: &mut Ops<'_, C, ()>) {
        ops.poll_readable(self.fd, (), false);
    }

    fn complete(&mut self, c: Completion<()>, ctx: &mut C, ops: &mut Ops<'_, C, ()>) -> Flow {
        if c.result < 0 && c.result != -libc::EINTR {
            return Flow::Remove;
        }
        match (self.on_readable)(ctx) {
            Watch::Again => {
                ops.poll_readable(self.fd, (), false);
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
    /// Boxed: its address is what the timeout operation points to.
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

    fn arm(&self, ops: &mut Ops<'_, C, ()>) {
        // SAFETY: the timespec is boxed in this source and dropped only with it; the source is
        // removed only from `complete` of this very timeout and then re-arms nothing, so the
        // timespec outlives every timeout that points to it.
        unsafe { ops.timeout(&self.timespec, ()) };
    }
}

impl<C> EventSource<C> for Ticker<C> {
    /// One kind of operation: the timeout.
    type Token = ();

    fn name(&self) -> &'static str {
        self.name
    }

    fn start(&mut self, _ctx: &mut C, ops: &mut Ops<'_, C, ()>) {
        self.arm(ops);
    }

    fn complete(&mut self, _c: Completion<()>, ctx: &mut C, ops: &mut Ops<'_, C, ()>) -> Flow {
        let flow = (self.tick)(ctx);
        if flow == Flow::Continue {
            self.arm(ops);
        }
        flow
    }
}
