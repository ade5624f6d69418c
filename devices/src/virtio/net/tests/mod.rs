//! virtio-net driven through the harness, with a datagram socket pair as the backend (one
//! datagram, one frame: what a tap does, without root); `tap.rs` runs the same device on a real
//! tap when root.

mod flow;
mod hostile;
mod tap;

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Backend, Net, NetConfig, NetHandler, NetStats, VNET_HDR_LEN};
use crate::virtio::test_utils::{Buf, Harness, interface_index, packet_socket, test_memory};

pub(crate) const MAC: [u8; 6] = [0x02, 0x6b, 0x73, 0x6e, 0x00, 0x01];
pub(crate) const RX: usize = 0;
pub(crate) const TX: usize = 1;

/// A frame: a virtio-net header (all zero: no offload) and `payload`.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(payload);
    f
}

/// `len` bytes of a recognizable pattern (seeded).
pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A datagram backend and the host's end of it.
pub(crate) fn datagram_pair() -> (Backend, UnixDatagram) {
    let (dev, host) = UnixDatagram::pair().unwrap();
    // Room for big frames on the host's end.
    host.set_nonblocking(false).unwrap();
    (Backend::datagram(dev.into()).unwrap(), host)
}

pub(crate) fn net_device(mem: GuestMemoryMmap, backend: Option<Backend>) -> Net {
    Net::new_net(
        NetConfig {
            id: "net0".into(),
            mac: MAC,
        },
        backend,
        mem,
    )
    .unwrap()
}

/// The guest side: a driver, its receive buffers, and the host's end of the backend.
pub(crate) struct NetGuest {
    pub h: Harness<NetHandler>,
    pub host: Option<UnixDatagram>,
    /// Receive buffers posted, by head: (address, length).
    rx_bufs: HashMap<u16, (u64, u32)>,
    tx_scratch: u64,
}

impl NetGuest {
    /// A device with a datagram backend; the driver acks every offered feature but `drop`.
    pub fn new(drop_features: u64) -> Self {
        let (backend, host) = datagram_pair();
        let mut g = Self::with_backend(Some(backend), drop_features);
        g.host = Some(host);
        g
    }

    pub fn with_backend(backend: Option<Backend>, drop_features: u64) -> Self {
        let mem = test_memory();
        let h = Harness::new(net_device(mem.clone(), backend), mem);
        let mut g = Self::with_harness(h);
        g.init(drop_features);
        g
    }

    pub fn with_harness(h: Harness<NetHandler>) -> Self {
        let mut h = h;
        let tx_scratch = h.driver.alloc(2 * super::MAX_FRAME_BUF as u64);
        Self {
            h,
            host: None,
            rx_bufs: HashMap::new(),
            tx_scratch,
        }
    }

    fn init(&mut self, drop_features: u64) {
        let d = &mut self.h.driver;
        let features = d.device_features() & !drop_features;
        assert!(d.negotiate(features));
        d.setup_queues(256);
        let s = d.status();
        d.write_reg(reg::VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    pub fn host(&self) -> &UnixDatagram {
        self.host.as_ref().expect("datagram backend")
    }

    pub fn stats(&self) -> NetStats {
        self.h.device.worker().borrow().handler.stats()
    }

    pub fn needs_reset(&self) -> bool {
        self.h.driver.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    /// Posts `count` receive buffers of `len` bytes each and notifies the device.
    pub fn post_rx(&mut self, count: usize, len: u32) {
        let base = self.h.driver.alloc(u64::from(len) * count as u64);
        for i in 0..count as u64 {
            let a = base + i * u64::from(len);
            let head = self.h.driver.add_chain(RX, &[Buf::inp(a, len)]).unwrap();
            self.rx_bufs.insert(head, (a, len));
        }
        self.h.driver.kick(RX);
    }

    /// Sends `frame` (header included) on the transmit queue in `pieces` descriptors and waits
    /// until the device has returned the chain.
    pub fn send(&mut self, frame: &[u8], pieces: usize) {
        let a = self.tx_scratch;
        self.h
            .driver
            .mem
            .write_slice(frame, GuestAddress(a))
            .unwrap();
        let step = frame.len().div_ceil(pieces.max(1)).max(1);
        let bufs: Vec<Buf> = (0..frame.len())
            .step_by(step)
            .map(|off| Buf::out(a + off as u64, (frame.len() - off).min(step) as u32))
            .collect();
        self.send_chain(&bufs);
    }

    /// Adds a raw transmit chain, notifies, waits for it to come back.
    pub fn send_chain(&mut self, bufs: &[Buf]) {
        let head = self.h.driver.add_chain(TX, bufs).unwrap();
        self.h.driver.kick(TX);
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if self.h.driver.take_used(TX).iter().any(|u| u.head == head) {
                return;
            }
            assert!(Instant::now() < end, "transmit chain not returned");
            self.h.run_until_irq(Duration::from_millis(100));
            self.h.driver.ack_interrupts();
        }
    }

    /// Runs the loop a little (lets the device read what the host sent).
    pub fn run(&mut self) {
        self.h.run_until_irq(Duration::from_millis(50));
    }

    /// The frames the device delivered since the last call, merged per `num_buffers` (header
    /// included, as the guest sees them). Their buffers are not re-posted.
    pub fn received(&mut self) -> Vec<Vec<u8>> {
        self.h.driver.ack_interrupts();
        let used = self.h.driver.take_used(RX);
        let mut out = Vec::new();
        let mut i = 0;
        while i < used.len() {
            let (a, _) = self.rx_bufs.remove(&used[i].head).expect("known buffer");
            let mut first = vec![0u8; used[i].len as usize];
            self.h
                .driver
                .mem
                .read_slice(&mut first, GuestAddress(a))
                .unwrap();
            let n = u16::from_le_bytes([first[10], first[11]]) as usize;
            assert!(n >= 1, "num_buffers is 0");
            for u in &used[i + 1..i + n] {
                let (a, _) = self.rx_bufs.remove(&u.head).expect("known buffer");
                let mut more = vec![0u8; u.len as usize];
                self.h
                    .driver
                    .mem
                    .read_slice(&mut more, GuestAddress(a))
                    .unwrap();
                first.extend_from_slice(&more);
            }
            out.push(first);
            i += n;
        }
        out
    }

    /// Waits until `n` frames have been delivered; returns them.
    pub fn wait_received(&mut self, n: usize) -> Vec<Vec<u8>> {
        let end = Instant::now() + Duration::from_secs(5);
        let mut out = self.received();
        while out.len() < n && Instant::now() < end {
            self.h.run_until_irq(Duration::from_millis(100));
            out.extend(self.received());
        }
        out
    }
}

/// Sends one frame each way (used by the conformance test, before and after a restore).
pub(crate) fn net_io(h: &mut Harness<NetHandler>, round: u32) {
    // The conformance test restores onto a backend of its own; the host end is in a global.
    let host = CONFORMANCE_HOST.with(|c| c.borrow()[round as usize].try_clone().unwrap());
    let tx = h.driver.alloc(4096);
    let rx = h.driver.alloc(4096);
    let f = frame(&pattern(200, round as u8));
    h.driver.mem.write_slice(&f, GuestAddress(tx)).unwrap();
    let u = h
        .request(TX, &[Buf::out(tx, 12), Buf::out(tx + 12, 200)])
        .unwrap();
    assert_eq!(u.len, 0);
    let mut got = vec![0u8; 4096];
    let n = host.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);

    let back = frame(&pattern(300, 100 + round as u8));
    host.send(&back).unwrap();
    let u = h.request(RX, &[Buf::inp(rx, 4096)]).unwrap();
    assert_eq!(u.len as usize, back.len());
    let mut seen = vec![0u8; back.len()];
    h.driver
        .mem
        .read_slice(&mut seen, GuestAddress(rx))
        .unwrap();
    assert_eq!(&seen[12..], &back[12..]);
    assert_eq!(u16::from_le_bytes([seen[10], seen[11]]), 1);
}

thread_local! {
    /// The host ends of the conformance test's two backends (before and after the restore).
    pub(crate) static CONFORMANCE_HOST: std::cell::RefCell<Vec<UnixDatagram>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The mergeable-buffers feature bit, for tests that turn it off.
pub(crate) const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
