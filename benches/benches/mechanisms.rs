//! Criterion benches of the VMM core's hot mechanisms: bus dispatch of a PIO access (every vCPU
//! exit goes through it), the event loop's wake-up on an eventfd (every notification does), and
//! what a VM's start pays for its seccomp filters (compiled per VM before, built into the binary
//! now).

use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use criterion::{Criterion, criterion_group, criterion_main};
use devices::{Bus, BusDevice};
use vmm::event_loop::{Completion, EventLoop, EventSource, Flow, Ops};
use vmm_sys_util::eventfd::EventFd;

struct Sink(u64);

impl BusDevice for Sink {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data[0] = offset as u8;
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.0 += u64::from(data[0]);
    }
}

fn bus_dispatch(c: &mut Criterion) {
    let mut bus = Bus::new();
    for base in [0x60u64, 0x68, 0x80, 0xf0, 0x2f8, 0x3e8, 0x3f8] {
        bus.insert(Arc::new(Mutex::new(Sink(0))), base, 8).unwrap();
    }
    c.bench_function("bus write dispatch (7 devices)", |b| {
        b.iter(|| black_box(bus.write(black_box(0x3f8), b"x")))
    });
    c.bench_function("bus miss (no device)", |b| {
        b.iter(|| black_box(bus.write(black_box(0x70), &[1])))
    });
}

struct Wake {
    evt: EventFd,
    remaining: u64,
}

impl EventSource<()> for Wake {
    type Token = ();
    fn name(&self) -> &'static str {
        "wake"
    }
    fn start(&mut self, _: &mut (), ops: &mut Ops<'_, (), ()>) {
        ops.poll_readable(self.evt.as_raw_fd(), (), true);
    }
    fn complete(&mut self, _: Completion<()>, _: &mut (), ops: &mut Ops<'_, (), ()>) -> Flow {
        let _ = self.evt.read();
        self.remaining -= 1;
        if self.remaining == 0 {
            ops.exit();
        } else {
            self.evt.write(1).unwrap();
        }
        Flow::Continue
    }
}

fn event_loop_wake(c: &mut Criterion) {
    c.bench_function("io_uring loop: 1000 eventfd wake-ups", |b| {
        b.iter(|| {
            let mut lp = EventLoop::<()>::new().unwrap();
            let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            evt.write(1).unwrap();
            lp.add(
                Box::new(Wake {
                    evt,
                    remaining: 1000,
                }),
                &mut (),
            );
            lp.run(&mut ()).unwrap();
        })
    });
    c.bench_function("io_uring loop creation (ring + probe)", |b| {
        b.iter(|| black_box(EventLoop::<()>::new().unwrap()))
    });
}

/// Side by side: compiling every thread kind's filter (what each VM's start paid before) and
/// getting the programs compiled at build time (what it pays now).
fn seccomp_filters(c: &mut Criterion) {
    use vmm::seccomp::{Filters, SeccompMode};
    c.bench_function(
        "seccomp: compile every kind's filter (per VM, before)",
        |b| b.iter(|| black_box(Filters::compile_uncached(SeccompMode::Kill).unwrap())),
    );
    c.bench_function(
        "seccomp: Filters::new, built into the binary (per VM, now)",
        |b| b.iter(|| black_box(Filters::new(SeccompMode::Kill).unwrap())),
    );
}

criterion_group!(benches, bus_dispatch, event_loop_wake, seccomp_filters);
criterion_main!(benches);
