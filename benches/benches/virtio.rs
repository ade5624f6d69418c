//! virtio device throughput through the host-side driver harness (no guest, no KVM exits): the
//! device path from a driver's kick to its used-ring entry, run on the VMM's event loop.
//!
//! virtio-blk, io_uring backend against the synchronous pread/pwrite backend, side by side:
//! 4 KiB random reads at queue depth 1 and 32, sequential 256 KiB reads and writes.
//! virtio-vsock: bulk throughput host→guest and guest→host over the Unix-socket host side.
//!
//! Run: `cargo bench -p benches --bench virtio` (`VIRTIO_BENCH_QUICK=1`: a short run;
//! `VIRTIO_BENCH_ONLY=blk|vsock`: one part; `VIRTIO_BENCH_DIR`: where the disk image goes).
//! Prints medians over several runs and the io_uring/sync ratios, twice: on a page-cached file
//! (device and backend overhead) and with O_DIRECT (requests reach the host's disk).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use benches::summarize;
use devices::virtio::block::{BackendKind, Block, BlockConfig, BlockHandler};
use devices::virtio::test_utils::{Buf, Harness, test_memory};
use devices::virtio::vsock::packet::*;
use devices::virtio::vsock::{CONN_BUF, Vsock, VsockConfig, VsockHandler};
use vm_memory::{Bytes, GuestAddress};

const DISK_BYTES: u64 = 256 << 20;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

struct Cfg {
    runs: usize,
    qd1_ops: usize,
    qd32_ops: usize,
    seq_bytes: u64,
    vsock_bytes: usize,
}

fn cfg() -> Cfg {
    if std::env::var_os("VIRTIO_BENCH_QUICK").is_some() {
        Cfg {
            runs: 3,
            qd1_ops: 3000,
            qd32_ops: 10_000,
            seq_bytes: 64 << 20,
            vsock_bytes: 16 << 20,
        }
    } else {
        Cfg {
            runs: 5,
            qd1_ops: 20_000,
            qd32_ops: 60_000,
            seq_bytes: 512 << 20,
            vsock_bytes: 128 << 20,
        }
    }
}

/// xorshift: a cheap, reproducible stream of sector numbers.
struct Rand(u64);
impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Blk {
    h: Harness<BlockHandler>,
    hdrs: u64,
    status: u64,
    data: u64,
}

fn blk(path: &std::path::Path, backend: BackendKind, direct: bool) -> Blk {
    use std::os::unix::fs::OpenOptionsExt;
    let mem = test_memory();
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .unwrap();
    let dev = Block::new_block(
        BlockConfig {
            backend,
            ..Default::default()
        },
        Some(file),
        mem.clone(),
    )
    .unwrap();
    let mut h = Harness::new(dev, mem);
    h.driver.init(256);
    let hdrs = h.driver.alloc(16 * 64);
    let status = h.driver.alloc(64);
    // 4 KiB-aligned data buffers (O_DIRECT needs them).
    let data = (h.driver.alloc((32 << 20) + 4096) + 4095) & !4095;
    Blk {
        h,
        hdrs,
        status,
        data,
    }
}

impl Blk {
    /// Makes request `slot` available: `len` bytes at `sector`, data buffer of that slot.
    fn submit(&mut self, slot: u64, ty: u32, sector: u64, len: u32) -> u16 {
        let hdr = self.hdrs + slot * 16;
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&ty.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        self.h
            .driver
            .mem
            .write_slice(&raw, GuestAddress(hdr))
            .unwrap();
        let data = self.data + slot * u64::from(len);
        let data_buf = if ty == T_IN {
            Buf::inp(data, len)
        } else {
            Buf::out(data, len)
        };
        self.h
            .driver
            .add_chain(
                0,
                &[Buf::out(hdr, 16), data_buf, Buf::inp(self.status + slot, 1)],
            )
            .expect("free descriptors")
    }

    /// Runs `ops` requests keeping `depth` in flight; returns operations per second.
    fn run(&mut self, ops: usize, depth: usize, mut next: impl FnMut() -> (u32, u64, u32)) -> f64 {
        let start = Instant::now();
        let mut submitted = 0;
        let mut done = 0;
        let mut free_slots: Vec<u64> = (0..depth as u64).collect();
        let mut slot_of_head = std::collections::HashMap::new();
        while done < ops {
            while submitted < ops && !free_slots.is_empty() {
                let slot = free_slots.pop().unwrap();
                let (ty, sector, len) = next();
                let head = self.submit(slot, ty, sector, len);
                slot_of_head.insert(head, slot);
                submitted += 1;
            }
            self.h.driver.kick(0);
            let mut used = self.h.driver.take_used(0);
            while used.is_empty() {
                self.h.run_until_irq(Duration::from_secs(5));
                used = self.h.driver.take_used(0);
            }
            for u in used {
                let slot = slot_of_head.remove(&u.head).expect("known head");
                let s: u8 = self
                    .h
                    .driver
                    .mem
                    .read_obj(GuestAddress(self.status + slot))
                    .unwrap();
                assert_eq!(s, 0, "request failed");
                free_slots.push(slot);
                done += 1;
            }
        }
        ops as f64 / start.elapsed().as_secs_f64()
    }
}

fn median(v: &[f64]) -> f64 {
    summarize(v).map_or(f64::NAN, |s| s.median)
}

fn row(name: &str, unit: &str, uring: &[f64], sync: &[f64]) {
    let (u, s) = (median(uring), median(sync));
    println!(
        "{name:<34} {u:>12.0} {s:>12.0}  {unit:<6} io_uring/sync = {:.2}",
        u / s
    );
}

fn make_disk(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("disk.img");
    let mut f = File::create(&path).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    for _ in 0..DISK_BYTES >> 20 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    path
}

/// One table: io_uring against sync on `path`; `direct` opens the file with O_DIRECT so the
/// requests reach the host disk instead of the page cache.
fn bench_blk(c: &Cfg, path: &std::path::Path, direct: bool) {
    let scale = if direct { 4 } else { 1 };
    let sectors = DISK_BYTES / 512;
    let mut results: Vec<(&str, &str, Vec<f64>, Vec<f64>)> = vec![
        ("4 KiB random read, QD 1", "IOPS", vec![], vec![]),
        ("4 KiB random read, QD 32", "IOPS", vec![], vec![]),
        ("256 KiB sequential read, QD 4", "MiB/s", vec![], vec![]),
        ("256 KiB sequential write, QD 4", "MiB/s", vec![], vec![]),
    ];
    for _ in 0..c.runs {
        for (i, backend) in [BackendKind::IoUring, BackendKind::Sync]
            .into_iter()
            .enumerate()
        {
            let mut b = blk(path, backend, direct);
            let mut rng = Rand(0x9e37_79b9_7f4a_7c15);
            let mut rand4k = || (T_IN, (rng.next() % (sectors / 8)) * 8, 4096);
            let qd1 = b.run(c.qd1_ops / scale, 1, &mut rand4k);
            let qd32 = b.run(c.qd32_ops / scale, 32, &mut rand4k);
            let seq_ops = (c.seq_bytes / (256 << 10)) as usize / scale;
            let seq = |ty: u32| {
                let mut pos = 0u64;
                move || {
                    let s = pos;
                    pos = (pos + 512) % sectors;
                    (ty, s, 256 << 10)
                }
            };
            let rd = b.run(seq_ops, 4, seq(T_IN)) * 0.25;
            let wr = b.run(seq_ops, 4, seq(T_OUT)) * 0.25;
            for (r, v) in results.iter_mut().zip([qd1, qd32, rd, wr]) {
                if i == 0 { r.2.push(v) } else { r.3.push(v) }
            }
        }
    }
    let what = if direct {
        "O_DIRECT on the host disk"
    } else {
        "page-cached file"
    };
    println!(
        "\nvirtio-blk through the harness ({} runs, medians; 256 MiB {what})",
        c.runs
    );
    println!("{:<34} {:>12} {:>12}", "", "io_uring", "sync");
    for (name, unit, u, s) in &results {
        row(name, unit, u, s);
    }
}

struct VsockBench {
    h: Harness<VsockHandler>,
    rx: std::collections::HashMap<u16, u64>,
    tx: u64,
}

const RX_BUF: u32 = (HDR_SIZE + 64 * 1024) as u32;

fn hdr(op: u16, len: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1000,
        dst_port: 7000,
        len,
        ty: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt,
    }
}

impl VsockBench {
    fn new(path: &std::path::Path) -> Self {
        let mem = test_memory();
        let dev = Vsock::new_vsock(
            VsockConfig {
                guest_cid: 3,
                uds_path: path.to_owned(),
                max_connections: devices::virtio::vsock::DEFAULT_MAX_CONNECTIONS,
            },
            mem.clone(),
        )
        .unwrap();
        let mut h = Harness::new(dev, mem);
        h.driver.init(256);
        let mut rx = std::collections::HashMap::new();
        let base = h.driver.alloc(u64::from(RX_BUF) * 64);
        for i in 0..64 {
            let a = base + i * u64::from(RX_BUF);
            rx.insert(h.driver.add_chain(0, &[Buf::inp(a, RX_BUF)]).unwrap(), a);
        }
        h.driver.kick(0);
        let tx = h.driver.alloc(4 << 20);
        Self { h, rx, tx }
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        self.h.driver.take_used(1);
        let a = self.tx;
        self.h
            .driver
            .mem
            .write_slice(&h.encode(), GuestAddress(a))
            .unwrap();
        let mut bufs = vec![Buf::out(a, HDR_SIZE as u32)];
        if !payload.is_empty() {
            self.h
                .driver
                .mem
                .write_slice(payload, GuestAddress(a + 64))
                .unwrap();
            bufs.push(Buf::out(a + 64, payload.len() as u32));
        }
        let head = self.h.driver.add_chain(1, &bufs).unwrap();
        self.h.driver.kick(1);
        loop {
            if self.h.driver.take_used(1).iter().any(|u| u.head == head) {
                return;
            }
            if !self.h.run_until_irq(Duration::from_secs(5)) {
                eprintln!("vsock: tx packet not consumed");
            }
        }
    }

    /// Received packets: (header, payload length); buffers re-posted.
    fn recv(&mut self) -> Vec<(Header, usize)> {
        self.h.driver.ack_interrupts();
        let used: Vec<_> = self
            .h
            .driver
            .take_used(0)
            .into_iter()
            .map(|u| self.rx.remove(&u.head).unwrap())
            .collect();
        let mut out = Vec::new();
        for &a in &used {
            let mut raw = [0u8; HDR_SIZE];
            self.h
                .driver
                .mem
                .read_slice(&mut raw, GuestAddress(a))
                .unwrap();
            let h = Header::decode(&raw);
            out.push((h, h.len as usize));
        }
        for a in used {
            let head = self.h.driver.add_chain(0, &[Buf::inp(a, RX_BUF)]).unwrap();
            self.rx.insert(head, a);
        }
        if !out.is_empty() {
            self.h.driver.kick(0);
        }
        out
    }

    fn wait(&mut self, op: u16) -> Header {
        loop {
            if let Some((h, _)) = self.recv().into_iter().find(|(h, _)| h.op == op) {
                return h;
            }
            if !self.h.run_until_irq(Duration::from_secs(5)) {
                eprintln!("vsock: waiting for op {op}");
            }
        }
    }
}

fn bench_vsock(c: &Cfg) -> (Vec<f64>, Vec<f64>) {
    let (mut h2g, mut g2h) = (Vec::new(), Vec::new());
    for _ in 0..c.runs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut v = VsockBench::new(&path);
        let listener = UnixListener::bind(format!("{}_7000", path.display())).unwrap();
        v.send(hdr(OP_REQUEST, 0, 0), &[]);
        v.wait(OP_RESPONSE);
        let (mut host, _) = listener.accept().unwrap();

        // host -> guest
        let total = c.vsock_bytes;
        let mut writer_side = host.try_clone().unwrap();
        let start = Instant::now();
        let writer = std::thread::spawn(move || {
            let chunk = vec![0x5au8; 1 << 20];
            for _ in 0..total >> 20 {
                writer_side.write_all(&chunk).unwrap();
            }
        });
        let (mut got, mut acked) = (0usize, 0usize);
        while got < total {
            for (h, n) in v.recv() {
                if h.op == OP_RW {
                    got += n;
                }
            }
            if got - acked >= 256 << 10 || got == total {
                acked = got;
                v.send(hdr(OP_CREDIT_UPDATE, 0, acked as u32), &[]);
            } else if !v.h.run_until_irq(Duration::from_secs(5)) {
                eprintln!("vsock h2g stalled: got {got} acked {acked}");
            }
        }
        h2g.push(total as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64);
        writer.join().unwrap();

        // guest -> host
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            while n < total {
                n += host.read(&mut buf).unwrap();
            }
        });
        let payload = vec![0xa5u8; 60 * 1024];
        let start = Instant::now();
        let (mut sent, mut fwd) = (0usize, 0u32);
        while sent < total {
            for (h, _) in v.recv() {
                fwd = h.fwd_cnt;
            }
            let credit = CONN_BUF as usize - (sent - fwd as usize);
            if credit == 0 {
                if !v.h.run_until_irq(Duration::from_secs(5)) {
                    eprintln!("vsock g2h stalled: sent {sent} fwd {fwd}");
                }
                continue;
            }
            let n = credit.min(payload.len()).min(total - sent);
            v.send(hdr(OP_RW, n as u32, acked as u32), &payload[..n]);
            sent += n;
        }
        // The device may still buffer data: keep its loop running until the host has it all.
        while !reader.is_finished() {
            v.h.run_until_irq(Duration::from_millis(10));
        }
        reader.join().unwrap();
        g2h.push(total as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64);
    }
    (h2g, g2h)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let c = cfg();
    let only = std::env::var("VIRTIO_BENCH_ONLY").unwrap_or_default();
    if only != "vsock" {
        let dir =
            tempfile::tempdir_in(std::env::var("VIRTIO_BENCH_DIR").unwrap_or(".".into())).unwrap();
        let path = make_disk(&dir);
        bench_blk(&c, &path, false);
        bench_blk(&c, &path, true);
    }
    if only == "blk" {
        return;
    }
    let (h2g, g2h) = bench_vsock(&c);
    println!(
        "\nvirtio-vsock through the harness ({} runs, medians)",
        c.runs
    );
    println!("{:<34} {:>12.0}  MiB/s", "host -> guest", median(&h2g));
    println!("{:<34} {:>12.0}  MiB/s", "guest -> host", median(&g2h));
}
