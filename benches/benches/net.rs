//! virtio-net throughput through the host-side driver harness (no guest, no KVM exits): the
//! device path from a driver's kick to its used-ring entry, on the VMM's event loop, with the
//! host side as a datagram socket pair (the device's own cost) and, as root, a tap (the device
//! and the host's tap: transmitted frames enter the host's stack, received frames are sent out
//! of the tap's interface by a packet socket).
//!
//! Run: `cargo bench -p benches --bench net` (`NET_BENCH_QUICK=1`: a short run). Prints, per
//! backend and direction, the median frames/s and Gbit/s over several runs of 1514-byte frames
//! (plus the 12-byte virtio-net header), and of 65000-byte frames guest → host on the datagram
//! backend (a tap refuses a frame above its MTU unless its header asks for segmentation).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use benches::summarize;
use devices::virtio::net::{Backend, Net, NetConfig, NetHandler, VNET_HDR_LEN};
use devices::virtio::test_utils::{Buf, Harness, interface_index, packet_socket, test_memory};
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
const MAC: [u8; 6] = [0x02, 0x6b, 0x73, 0x6e, 0, 1];
const ETH_FRAME: usize = 1514;
/// A local experimental ethertype: the host's stack drops these frames at once.
const ETHERTYPE: u16 = 0x88b5;

fn quick() -> bool {
    std::env::var_os("NET_BENCH_QUICK").is_some()
}

fn harness(backend: Backend) -> Harness<NetHandler> {
    let mem = test_memory();
    let dev = Net::new_net(
        NetConfig {
            id: "bench".into(),
            mac: MAC,
        },
        Some(backend),
        mem.clone(),
    )
    .unwrap();
    let mut h = Harness::new(dev, mem);
    h.driver.init(256);
    h
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.resize(VNET_HDR_LEN + len, 0x5a);
    f
}

/// Guest → host: `frames` frames of `len` bytes, up to 128 in flight; returns frames/s.
fn tx(h: &mut Harness<NetHandler>, frames: usize, len: usize) -> f64 {
    let f = frame(len);
    let a = h.driver.alloc(f.len() as u64);
    h.driver.mem.write_slice(&f, GuestAddress(a)).unwrap();
    let (mut sent, mut done) = (0usize, 0usize);
    let start = Instant::now();
    while done < frames {
        let mut added = false;
        while sent < frames && sent - done < 128 {
            h.driver
                .add_chain(TX, &[Buf::out(a, f.len() as u32)])
                .unwrap();
            sent += 1;
            added = true;
        }
        if added {
            h.driver.kick(TX);
        }
        h.run_until_irq(Duration::from_secs(5));
        h.driver.ack_interrupts();
        done += h.driver.take_used(TX).len();
    }
    frames as f64 / start.elapsed().as_secs_f64()
}

/// Host → guest for `secs` seconds with 256 buffers of 2 KiB posted; returns frames/s.
fn rx(h: &mut Harness<NetHandler>, secs: f64) -> f64 {
    let base = h.driver.alloc(256 * 2048);
    let mut addr = std::collections::HashMap::new();
    for i in 0..256u64 {
        let head = h
            .driver
            .add_chain(RX, &[Buf::inp(base + i * 2048, 2048)])
            .unwrap();
        addr.insert(head, base + i * 2048);
    }
    h.driver.kick(RX);
    let start = Instant::now();
    let mut got = 0usize;
    while start.elapsed().as_secs_f64() < secs {
        h.run_until_irq(Duration::from_millis(100));
        h.driver.ack_interrupts();
        let used = h.driver.take_used(RX);
        got += used.len();
        let used: Vec<u64> = used.iter().map(|u| addr.remove(&u.head).unwrap()).collect();
        for a in used {
            let head = h.driver.add_chain(RX, &[Buf::inp(a, 2048)]).unwrap();
            addr.insert(head, a);
        }
        h.driver.kick(RX);
    }
    got as f64 / start.elapsed().as_secs_f64()
}

/// A thread sending `f` on `send` until stopped.
fn feeder(
    stop: Arc<AtomicBool>,
    send: impl Fn(&[u8]) + Send + 'static,
    f: Vec<u8>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            send(&f);
        }
    })
}

/// A drainer of the host end of a datagram pair until stopped.
fn drainer(host: UnixDatagram, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    host.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 70_000];
        while !stop.load(Ordering::Relaxed) {
            let _ = host.recv(&mut buf);
        }
    })
}

/// Frames must not have been dropped for a figure to mean anything.
fn dropped(h: &Harness<NetHandler>, what: &str) {
    let s = h.device.worker().borrow().handler.stats();
    assert_eq!(s.tx_dropped, 0, "{what}: the backend refused frames");
}

fn report(name: &str, fps: &[f64], frame_len: usize) {
    let m = summarize(fps).map_or(f64::NAN, |s| s.median);
    println!(
        "{name:<40} {:>12.0} frames/s {:>8.2} Gbit/s",
        m,
        m * frame_len as f64 * 8.0 / 1e9
    );
}

fn bench_datagram(runs: usize, frames: usize, secs: f64) {
    let (mut t, mut t64, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (dev, host) = UnixDatagram::pair().unwrap();
        let mut h = harness(Backend::datagram(dev.into()).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let d = drainer(host.try_clone().unwrap(), stop.clone());
        t.push(tx(&mut h, frames, ETH_FRAME));
        t64.push(tx(&mut h, frames / 8, 65_000));
        dropped(&h, "guest -> host");
        stop.store(true, Ordering::Relaxed);
        d.join().unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        host.set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let f = feeder(
            stop.clone(),
            move |f| {
                let _ = host.send(f);
            },
            frame(ETH_FRAME),
        );
        r.push(rx(&mut h, secs));
        stop.store(true, Ordering::Relaxed);
        f.join().unwrap();
    }
    println!("\nvirtio-net, datagram backend ({runs} runs, medians)");
    report("guest -> host, 1514-byte frames", &t, ETH_FRAME);
    report("guest -> host, 65000-byte frames", &t64, 65_000);
    report("host -> guest, 1514-byte frames", &r, ETH_FRAME);
}

fn bench_tap(runs: usize, frames: usize, secs: f64) {
    let name = format!("ksn-bench{}", std::process::id() % 10_000);
    let (mut t, mut r) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let backend = match Backend::open_tap(&name) {
            Ok(b) => b,
            Err(e) => {
                println!("\nvirtio-net, tap backend: SKIPPED ({e})");
                return;
            }
        };
        let up = std::process::Command::new("ip")
            .args(["link", "set", "dev", &name, "up"])
            .status();
        if !up.is_ok_and(|s| s.success()) {
            println!("\nvirtio-net, tap backend: SKIPPED (ip link set up failed)");
            return;
        }
        let index = interface_index(&name);
        let mut h = harness(backend);
        t.push(tx(&mut h, frames, ETH_FRAME));
        dropped(&h, "guest -> tap");
        let sock = Arc::new(packet_socket(index, false));
        let stop = Arc::new(AtomicBool::new(false));
        let f = feeder(
            stop.clone(),
            move |f| {
                let e = &f[VNET_HDR_LEN..];
                // SAFETY: send reads `e` for its length; the fd is open.
                unsafe { libc::send(sock.as_raw_fd(), e.as_ptr().cast(), e.len(), 0) };
            },
            frame(ETH_FRAME),
        );
        r.push(rx(&mut h, secs));
        stop.store(true, Ordering::Relaxed);
        f.join().unwrap();
    }
    println!("\nvirtio-net, tap backend ({runs} runs, medians)");
    report("guest -> tap, 1514-byte frames", &t, ETH_FRAME);
    report("tap -> guest, 1514-byte frames", &r, ETH_FRAME);
}

fn main() {
    let (runs, frames, secs) = if quick() {
        (3, 20_000, 0.5)
    } else {
        (5, 200_000, 2.0)
    };
    bench_datagram(runs, frames, secs);
    if nix_is_root() {
        bench_tap(runs, frames, secs);
    } else {
        println!("\nvirtio-net, tap backend: SKIPPED (needs root)");
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
