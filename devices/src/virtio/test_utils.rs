//! A host-side virtio driver, for tests and benches: guest memory, a driver that programs the
//! transport through its MMIO registers exactly as a guest would (`BusDevice::read/write` at
//! register offsets), split virtqueues it lays out in guest memory, and an event loop running the
//! device's worker.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_loop::{BoxedSource, Completion, EventLoop, EventSource, Flow, Ops};
use io_uring::types::Timespec;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::front::MmioDevice;
use super::mmio::MmioTransport;
use super::worker::QueueHandler;
use crate::bus::{BusDevice, lock_device};

/// Guest memory size of the harness.
pub const MEM_SIZE: usize = 64 << 20;
/// Where the harness puts its rings (64 KiB per queue).
pub const RINGS_START: u64 = 0x1_0000;
/// Where data buffers are allocated from.
pub const DATA_START: u64 = 0x10_0000;

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;

/// A fresh guest memory of [`MEM_SIZE`] bytes at guest address 0.
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// One buffer of a chain the driver adds.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn out(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }
    /// A device-writable buffer.
    pub fn inp(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// The driver's view of one split virtqueue.
#[derive(Debug)]
pub struct DriverQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

/// A completed chain: head and bytes written by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes the device wrote.
    pub len: u32,
}

/// A guest driver speaking virtio-mmio to one transport.
#[derive(Debug)]
pub struct Driver {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The transport, reached through its bus offsets only.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The queues set up by [`Driver::init`].
    pub queues: Vec<DriverQueue>,
    next_data: u64,
}

impl Driver {
    /// A driver for `transport`.
    pub fn new(mem: GuestMemoryMmap, transport: Arc<Mutex<MmioTransport>>) -> Self {
        Self {
            mem,
            transport,
            queues: Vec::new(),
            next_data: DATA_START,
        }
    }

    /// Reads a 32-bit register.
    pub fn read_reg(&self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        lock_device(&self.transport).read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write_reg(&self, offset: u32, v: u32) {
        lock_device(&self.transport).write(u64::from(offset), &v.to_le_bytes());
    }

    /// Reads the device config space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock_device(&self.transport).read(u64::from(reg::VIRTIO_MMIO_CONFIG) + offset, data);
    }

    /// The features the device offers.
    pub fn device_features(&self) -> u64 {
        self.write_reg(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = self.read_reg(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        self.write_reg(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = self.read_reg(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.read_reg(reg::VIRTIO_MMIO_STATUS)
    }

    /// Writes `features` and sets FEATURES_OK; returns whether the device kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write_reg(reg::VIRTIO_MMIO_STATUS, 0);
        self.write_reg(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.write_reg(reg::VIRTIO_MMIO_STATUS, s);
        self.write_reg(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write_reg(reg::VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.write_reg(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.write_reg(reg::VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        self.status() & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Full initialization: all offered features acked, every queue set up at `size` (or the
    /// device's maximum if smaller), DRIVER_OK.
    pub fn init(&mut self, size: u16) {
        let features = self.device_features();
        assert!(self.negotiate(features), "device refused its own features");
        self.setup_queues(size);
        let s = self.status();
        self.write_reg(reg::VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// Programs every queue's registers (after FEATURES_OK).
    pub fn setup_queues(&mut self, size: u16) {
        self.queues.clear();
        for q in 0u32.. {
            self.write_reg(reg::VIRTIO_MMIO_QUEUE_SEL, q);
            let max = self.read_reg(reg::VIRTIO_MMIO_QUEUE_NUM_MAX) as u16;
            if max == 0 {
                break;
            }
            let size = size.min(max);
            let base = RINGS_START + u64::from(q) * 0x1_0000;
            let dq = DriverQueue {
                size,
                desc: base,
                avail: base + 0x4000,
                used: base + 0x8000,
                free: (0..size).rev().collect(),
                chains: vec![Vec::new(); usize::from(size)],
                avail_idx: 0,
                last_used: 0,
            };
            self.mem
                .write_slice(&vec![0u8; 0x1_0000], GuestAddress(base))
                .unwrap();
            self.write_reg(reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
            for (lo, addr) in [
                (reg::VIRTIO_MMIO_QUEUE_DESC_LOW, dq.desc),
                (reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, dq.avail),
                (reg::VIRTIO_MMIO_QUEUE_USED_LOW, dq.used),
            ] {
                self.write_reg(lo, addr as u32);
                self.write_reg(lo + 4, (addr >> 32) as u32);
            }
            self.write_reg(reg::VIRTIO_MMIO_QUEUE_READY, 1);
            self.queues.push(dq);
        }
    }

    /// Allocates `len` bytes of guest memory for data (8-byte aligned, zeroed).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_data;
        self.next_data = (addr + len + 7) & !7;
        assert!(
            self.next_data <= MEM_SIZE as u64,
            "harness out of guest memory"
        );
        addr
    }

    /// Frees every data allocation.
    pub fn free_all(&mut self) {
        self.next_data = DATA_START;
    }

    /// Writes a raw descriptor into queue `q`'s table (for malformed-chain tests).
    pub fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(self.queues[q].desc + u64::from(index) * 16);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, a).unwrap();
    }

    /// Puts `head` in the available ring and publishes the new index.
    pub fn publish(&mut self, q: usize, head: u16) {
        let dq = &mut self.queues[q];
        let slot = u64::from(dq.avail_idx % dq.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(dq.avail + 4 + slot * 2))
            .unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(dq.avail_idx.to_le(), GuestAddress(dq.avail + 2))
            .unwrap();
    }

    /// Publishes a raw available index (for malformed-ring tests).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.queues[q].avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.queues[q].avail + 2))
            .unwrap();
    }

    /// Free descriptors of queue `q`.
    pub fn free_descs(&self, q: usize) -> usize {
        self.queues[q].free.len()
    }

    /// Adds a chain of `bufs` to queue `q` and makes it available; returns its head, or `None`
    /// when the table has not enough free descriptors.
    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> Option<u16> {
        if self.queues[q].free.len() < bufs.len() || bufs.is_empty() {
            return None;
        }
        let idx: Vec<u16> = (0..bufs.len())
            .map(|_| self.queues[q].free.pop().unwrap())
            .collect();
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= F_NEXT;
                idx[i + 1]
            } else {
                0
            };
            self.write_desc(q, idx[i], b.addr, b.len, flags, next);
        }
        let head = idx[0];
        self.queues[q].chains[usize::from(head)] = idx;
        self.publish(q, head);
        Some(head)
    }

    /// Notifies queue `q` through the QueueNotify register.
    pub fn kick(&self, q: usize) {
        self.write_reg(reg::VIRTIO_MMIO_QUEUE_NOTIFY, q as u32);
    }

    /// Takes the used entries the device added since the last call, freeing their descriptors.
    pub fn take_used(&mut self, q: usize) -> Vec<Used> {
        let dq = &mut self.queues[q];
        let idx: u16 = u16::from_le(
            self.mem
                .read_obj(GuestAddress(dq.used + 2))
                .unwrap_or_default(),
        );
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let mut out = Vec::new();
        while dq.last_used != idx {
            let slot = u64::from(dq.last_used % dq.size);
            let a = GuestAddress(dq.used + 4 + slot * 8);
            let id: u32 = self.mem.read_obj(a).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(a.0 + 4)).unwrap();
            let head = id as u16;
            if let Some(chain) = dq.chains.get_mut(usize::from(head)) {
                dq.free.append(chain);
            }
            out.push(Used { head, len });
            dq.last_used = dq.last_used.wrapping_add(1);
        }
        out
    }

    /// Acknowledges every pending interrupt bit; returns them.
    pub fn ack_interrupts(&self) -> u32 {
        let s = self.read_reg(reg::VIRTIO_MMIO_INTERRUPT_STATUS);
        self.write_reg(reg::VIRTIO_MMIO_INTERRUPT_ACK, s);
        s
    }
}

/// Exits the loop when the device raises its interrupt.
struct IrqWaiter {
    evt: EventFd,
    fired: Rc<Cell<bool>>,
}

impl<C> EventSource<C> for IrqWaiter {
    type Token = ();
    fn name(&self) -> &'static str {
        "harness-irq"
    }
    fn start(&mut self, _: &mut C, ops: &mut Ops<'_, C, ()>) {
        ops.poll_readable(self.evt.as_raw_fd(), (), true);
    }
    fn complete(&mut self, c: Completion<()>, _: &mut C, ops: &mut Ops<'_, C, ()>) -> Flow {
        let _ = self.evt.read();
        if !c.more {
            ops.poll_readable(self.evt.as_raw_fd(), (), true);
        }
        self.fired.set(true);
        ops.exit();
        Flow::Continue
    }
}

/// Exits the loop when the deadline passes, so a device that never answers fails a test instead
/// of hanging it.
struct Watchdog {
    ts: Box<Timespec>,
    deadline: Rc<Cell<Instant>>,
}

impl Watchdog {
    fn arm<C>(&self, ops: &mut Ops<'_, C, ()>) {
        // SAFETY: the timespec is boxed in this source, which is never removed.
        unsafe { ops.timeout(&self.ts, ()) };
    }
}

impl<C> EventSource<C> for Watchdog {
    type Token = ();
    fn name(&self) -> &'static str {
        "harness-watchdog"
    }
    fn start(&mut self, _: &mut C, ops: &mut Ops<'_, C, ()>) {
        self.arm(ops);
    }
    fn complete(&mut self, _: Completion<()>, _: &mut C, ops: &mut Ops<'_, C, ()>) -> Flow {
        if Instant::now() >= self.deadline.get() {
            ops.exit();
        }
        self.arm(ops);
        Flow::Continue
    }
}

/// A device, its driver and an event loop running the device's worker.
pub struct Harness<H> {
    /// The driver.
    pub driver: Driver,
    /// The device under test.
    pub device: MmioDevice<H>,
    lp: EventLoop<()>,
    fired: Rc<Cell<bool>>,
    deadline: Rc<Cell<Instant>>,
}

impl<H> std::fmt::Debug for Harness<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("driver", &self.driver)
            .finish()
    }
}

impl<H: QueueHandler + 'static> Harness<H> {
    /// Puts `device` (built over `mem`) on a fresh event loop.
    pub fn new(device: MmioDevice<H>, mem: GuestMemoryMmap) -> Self {
        let mut lp = EventLoop::new().expect("io_uring event loop");
        let fired = Rc::new(Cell::new(false));
        let deadline = Rc::new(Cell::new(Instant::now()));
        lp.add(device.event_source(), &mut ());
        lp.add(
            Box::new(IrqWaiter {
                evt: device.irqfd().expect("irqfd"),
                fired: fired.clone(),
            }),
            &mut (),
        );
        lp.add(
            Box::new(Watchdog {
                ts: Box::new(Duration::from_millis(20).into()),
                deadline: deadline.clone(),
            }),
            &mut (),
        );
        let driver = Driver::new(mem, device.transport());
        Self {
            driver,
            device,
            lp,
            fired,
            deadline,
        }
    }

    /// Adds another source to the harness's loop.
    pub fn add_source(&mut self, source: BoxedSource<()>) {
        self.lp.add(source, &mut ());
    }

    /// Runs the loop until the device interrupts or `timeout` passes; returns whether it did.
    pub fn run_until_irq(&mut self, timeout: Duration) -> bool {
        self.fired.set(false);
        self.deadline.set(Instant::now() + timeout);
        self.lp.run(&mut ()).expect("event loop");
        self.fired.get()
    }

    /// Runs the loop until `n` used entries of queue `q` arrive (or 5 s pass); returns them.
    pub fn wait_used(&mut self, q: usize, n: usize) -> Vec<Used> {
        let end = Instant::now() + Duration::from_secs(5);
        let mut out = self.driver.take_used(q);
        while out.len() < n && Instant::now() < end {
            self.run_until_irq(Duration::from_millis(500));
            self.driver.ack_interrupts();
            out.extend(self.driver.take_used(q));
        }
        out
    }

    /// Adds a chain, kicks, and waits for its completion.
    pub fn request(&mut self, q: usize, bufs: &[Buf]) -> Option<Used> {
        let head = self.driver.add_chain(q, bufs)?;
        self.driver.kick(q);
        let used = self.wait_used(q, 1);
        used.into_iter().find(|u| u.head == head)
    }
}

impl<H: QueueHandler + 'static> Harness<H> {
    /// Moves this harness's driver onto `device`, restored from a snapshot of this one into
    /// `mem` (a copy of this harness's memory): the guest goes on where it was.
    pub fn restored(self, device: MmioDevice<H>, mem: GuestMemoryMmap) -> Harness<H> {
        let mut h = Harness::new(device, mem);
        h.driver.queues = self.driver.queues;
        h.driver.next_data = self.driver.next_data;
        h
    }
}

/// A copy of `mem` (what a snapshot's memory file gives the restored VM).
pub fn copy_memory(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
    let copy = test_memory();
    let mut buf = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    copy.write_slice(&buf, GuestAddress(0)).unwrap();
    copy
}

/// The index of network interface `name` (0: none by that name).
pub fn interface_index(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a NUL-terminated name; the call reads nothing else.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// A raw packet socket (`AF_PACKET`, every ethertype) bound to interface `index`, non-blocking
/// when asked: what a test or bench reads and writes a tap's other side with. Panics on failure
/// (test and bench set-up).
pub fn packet_socket(index: u32, nonblocking: bool) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    let flags =
        libc::SOCK_RAW | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_PACKET, flags, i32::from(proto)) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: all zeroes is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: bind reads `sll`, which we own, for the size we give.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}
