use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::types;
use vmm_sys_util::eventfd::EventFd;

use super::*;

struct Counter {
    evt: EventFd,
}

impl EventSource<Vec<u64>> for Counter {
    type Token = ();
    fn name(&self) -> &'static str {
        "counter"
    }
    fn start(&mut self, _ctx: &mut Vec<u64>, ops: &mut Ops<'_, Vec<u64>, ()>) {
        ops.poll_readable(self.evt.as_raw_fd(), (), true);
    }
    fn complete(
        &mut self,
        c: Completion<()>,
        ctx: &mut Vec<u64>,
        ops: &mut Ops<'_, Vec<u64>, ()>,
    ) -> Flow {
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

/// Exits the loop after its timeout.
struct Stopper(Box<types::Timespec>);

impl<C> EventSource<C> for Stopper {
    type Token = ();
    fn name(&self) -> &'static str {
        "stopper"
    }
    fn start(&mut self, _: &mut C, ops: &mut Ops<'_, C, ()>) {
        // SAFETY: the boxed timespec lives in this source, which is removed only when this
        // timeout completes.
        unsafe { ops.timeout(&self.0, ()) };
    }
    fn complete(&mut self, _: Completion<()>, _: &mut C, ops: &mut Ops<'_, C, ()>) -> Flow {
        ops.exit();
        Flow::Remove
    }
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
    lp.add(
        Box::new(Stopper(Box::new(Duration::from_millis(50).into()))),
        &mut ticks,
    );
    lp.run(&mut ticks).unwrap();
    assert_eq!(ticks, 5);
}

/// Tags of [`Probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeTag {
    Poll,
    Timer,
}

impl EventToken for ProbeTag {
    fn encode(self) -> u32 {
        self as u32
    }
    fn decode(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Poll),
            1 => Some(Self::Timer),
            _ => None,
        }
    }
}

/// What the probes saw: (probe id, tag) per completion, and the (slot, generation) of each.
#[derive(Debug, Default)]
struct Seen {
    completions: Vec<(u8, ProbeTag)>,
    slots: Vec<(u8, u16, u16)>,
}

/// Polls `evt` and runs a timer. The first probe removes itself on its timer with its poll still
/// in flight and hands over to `next`; the next one makes the first one's poll complete.
struct Probe {
    id: u8,
    evt: EventFd,
    timer: Box<types::Timespec>,
    /// Written at start (another probe's fd).
    wake: Option<EventFd>,
    next: Option<Box<Probe>>,
}

impl EventSource<Seen> for Probe {
    type Token = ProbeTag;
    fn name(&self) -> &'static str {
        "probe"
    }
    fn start(&mut self, seen: &mut Seen, ops: &mut Ops<'_, Seen, ProbeTag>) {
        seen.slots.push((self.id, ops.slot, ops.generation));
        ops.poll_readable(self.evt.as_raw_fd(), ProbeTag::Poll, false);
        // SAFETY: the boxed timer lives in this source, which is removed only when this timeout
        // completes.
        unsafe { ops.timeout(&self.timer, ProbeTag::Timer) };
        if let Some(w) = &self.wake {
            w.write(1).unwrap();
        }
    }
    fn complete(
        &mut self,
        c: Completion<ProbeTag>,
        seen: &mut Seen,
        ops: &mut Ops<'_, Seen, ProbeTag>,
    ) -> Flow {
        seen.completions.push((self.id, c.tag));
        if c.tag != ProbeTag::Timer {
            return Flow::Continue;
        }
        match self.next.take() {
            Some(next) => {
                ops.spawn(next);
                Flow::Remove
            }
            None => {
                ops.exit();
                Flow::Remove
            }
        }
    }
}

#[test]
fn test_late_completion_of_removed_source_not_delivered_to_slot_reuser() {
    let mut lp = EventLoop::<Seen>::new().unwrap();
    let old_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let new = Probe {
        id: 2,
        evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        timer: Box::new(Duration::from_millis(100).into()),
        // Same file as the old probe's: makes its poll, still in flight, complete.
        wake: Some(old_evt.try_clone().unwrap()),
        next: None,
    };
    let old = Probe {
        id: 1,
        evt: old_evt,
        timer: Box::new(Duration::from_millis(1).into()),
        wake: None,
        next: Some(Box::new(new)),
    };
    let mut seen = Seen::default();
    lp.add(Box::new(old), &mut seen);
    lp.run(&mut seen).unwrap();
    // The new probe took the old one's slot, in a new generation.
    assert_eq!(seen.slots, vec![(1, 0, 0), (2, 0, 1)]);
    // The old poll completed after its source was gone and reached nobody: the new probe saw
    // only its own timer (its own poll never fired).
    assert_eq!(
        seen.completions,
        vec![(1, ProbeTag::Timer), (2, ProbeTag::Timer)]
    );
}

/// Submits a completion under a tag its type never produces.
struct Forger;

impl EventSource<Vec<u32>> for Forger {
    type Token = ProbeTag;
    fn name(&self) -> &'static str {
        "forger"
    }
    fn start(&mut self, _: &mut Vec<u32>, ops: &mut Ops<'_, Vec<u32>, ProbeTag>) {
        // A no-op under raw tag 7, which `ProbeTag::decode` refuses; then a real one.
        let raw = ops.retag::<erased::Raw>();
        raw.pending
            .push(opcode::Nop::new().build().user_data(raw.token(7)));
        // SAFETY: a no-op points to nothing.
        unsafe { ops.push(opcode::Nop::new().build(), ProbeTag::Poll) };
    }
    fn complete(
        &mut self,
        c: Completion<ProbeTag>,
        seen: &mut Vec<u32>,
        ops: &mut Ops<'_, Vec<u32>, ProbeTag>,
    ) -> Flow {
        seen.push(c.tag.encode());
        ops.exit();
        Flow::Continue
    }
}

#[test]
fn test_completion_with_undecodable_tag_is_dropped() {
    let mut lp = EventLoop::<Vec<u32>>::new().unwrap();
    let mut seen = Vec::new();
    lp.add(Box::new(Forger), &mut seen);
    lp.run(&mut seen).unwrap();
    assert_eq!(seen, vec![ProbeTag::Poll.encode()]);
}
