//! Property test: random descriptor tables and available rings thrown at every device.
//!
//! Guest memory is filled with a canary; after the device has processed the random ring, every
//! byte that changed must lie in the used ring or in a buffer some descriptor marks
//! device-writable. The device must not panic or hang (the harness's watchdog bounds each run).

use std::time::Duration;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::front::MmioDevice;
use super::test_utils::{Harness, MEM_SIZE, test_memory};
use super::worker::QueueHandler;

const QSIZE: u16 = 16;
const CANARY: u8 = 0xa5;
/// Descriptor addresses are drawn from here: mostly inside memory, some straddling or past its end.
const ADDR_SPACE: u64 = 4 << 20;

#[derive(Debug, Clone)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Debug, Clone)]
struct Ring {
    descs: Vec<RawDesc>,
    heads: Vec<u16>,
    /// Added to the number of heads when publishing the available index (0: honest).
    idx_skew: u16,
    /// First 16 bytes written at every in-memory descriptor address (plausible headers).
    header: [u8; 16],
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0x20_0000u64..ADDR_SPACE,
        1 => Just(MEM_SIZE as u64 - 0x100),
        1 => (MEM_SIZE as u64)..(MEM_SIZE as u64 + 0x1_0000),
        1 => Just(0x1_0000u64), // the descriptor table itself
    ]
}

/// Lengths biased towards what requests are made of (headers, status bytes, sectors).
fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => Just(16u32),
        2 => Just(1u32),
        2 => Just(512u32),
        1 => Just(44u32),
        3 => 0u32..0x3000,
    ]
}

fn ring() -> impl Strategy<Value = Ring> {
    let desc =
        (addr(), len(), 0u16..8, 0u16..(QSIZE + 4)).prop_map(|(addr, len, flags, next)| RawDesc {
            addr,
            len,
            flags,
            next,
        });
    (
        prop::collection::vec(desc, QSIZE as usize),
        prop::collection::vec(0u16..(QSIZE + 4), 0..(QSIZE as usize + 2)),
        prop_oneof![8 => Just(0u16), 1 => any::<u16>()],
        (0u32..16, 0u64..80),
    )
        .prop_map(|(descs, heads, idx_skew, (ty, sector))| {
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&ty.to_le_bytes());
            header[8..16].copy_from_slice(&sector.to_le_bytes());
            Ring {
                descs,
                heads,
                idx_skew,
                header,
            }
        })
}

/// Runs `ring` on queue `q` of a fresh device; checks the canary outside allowed ranges.
fn check<H: QueueHandler + 'static>(
    build: impl Fn(vm_memory::GuestMemoryMmap) -> MmioDevice<H>,
    q: usize,
    ring: &Ring,
) {
    let mem = test_memory();
    mem.write_slice(&vec![CANARY; MEM_SIZE - 0x20_0000], GuestAddress(0x20_0000))
        .unwrap();
    let mut h = Harness::new(build(mem.clone()), mem.clone());
    h.driver.init(QSIZE);
    let dq_used = h.driver.queues[q].used;
    for (i, d) in ring.descs.iter().enumerate() {
        h.driver
            .write_desc(q, i as u16, d.addr, d.len, d.flags, d.next);
        if d.addr + 16 <= MEM_SIZE as u64 && d.addr >= 0x20_0000 {
            mem.write_slice(&ring.header, GuestAddress(d.addr)).unwrap();
        }
    }
    for &head in &ring.heads {
        h.driver.publish(q, head);
    }
    let idx = (ring.heads.len() as u16).wrapping_add(ring.idx_skew);
    h.driver.set_avail_idx(q, idx);
    let before = {
        let mut v = vec![0u8; MEM_SIZE];
        mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    };
    h.driver.kick(q);
    h.run_until_irq(Duration::from_millis(50));
    h.run_until_irq(Duration::from_millis(5));

    let mut allowed: Vec<(u64, u64)> = ring
        .descs
        .iter()
        .filter(|d| d.flags & 2 != 0)
        .map(|d| (d.addr, d.addr + u64::from(d.len)))
        .collect();
    allowed.push((dq_used, dq_used + 4 + 8 * u64::from(QSIZE) + 2));
    let mut after = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut after, GuestAddress(0)).unwrap();
    // Compare page by page (memcmp), then byte by byte only where a page changed.
    for (page, (a, b)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
        if a == b {
            continue;
        }
        for (j, (x, y)) in a.iter().zip(b).enumerate() {
            let i = (page * 4096 + j) as u64;
            assert!(
                x == y || allowed.iter().any(|&(s, e)| s <= i && i < e),
                "device wrote guest byte {i:#x} outside every writable buffer"
            );
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn test_prop_rng_random_ring_stays_in_writable_buffers(r in ring()) {
        check(|mem| super::rng::Rng::new_rng(Default::default(), mem).unwrap(), 0, &r);
    }

    #[test]
    fn test_prop_block_random_ring_stays_in_writable_buffers(r in ring(), sync in any::<bool>()) {
        let f = super::block::tests::disk_file(64);
        let backend = if sync { super::block::BackendKind::Sync } else { super::block::BackendKind::IoUring };
        check(
            |mem| {
                let file = std::fs::File::options().read(true).write(true).open(f.path()).unwrap();
                super::block::Block::new_block(
                    super::block::BlockConfig { backend, ..Default::default() },
                    Some(file),
                    mem,
                )
                .unwrap()
            },
            0,
            &r,
        );
    }

    #[test]
    fn test_prop_vsock_random_tx_ring_stays_in_writable_buffers(r in ring()) {
        let dir = tempfile::tempdir().unwrap();
        check(
            |mem| {
                super::vsock::Vsock::new_vsock(
                    super::vsock::VsockConfig {
                        guest_cid: 3,
                        uds_path: dir.path().join("v.sock"),
                        max_connections: super::vsock::DEFAULT_MAX_CONNECTIONS,
                    },
                    mem,
                )
                .unwrap()
            },
            1,
            &r,
        );
    }

    #[test]
    fn test_prop_net_random_tx_ring_stays_in_writable_buffers(r in ring()) {
        let hosts = std::cell::RefCell::new(Vec::new());
        check(
            |mem| {
                let (backend, host) = super::net::tests::datagram_pair();
                hosts.borrow_mut().push(host);
                super::net::tests::net_device(mem, Some(backend))
            },
            1,
            &r,
        );
    }

    #[test]
    fn test_prop_net_random_rx_ring_stays_in_writable_buffers(r in ring(), len in 0usize..5000) {
        let hosts = std::cell::RefCell::new(Vec::new());
        check(
            |mem| {
                let (backend, host) = super::net::tests::datagram_pair();
                // Frames waiting in the backend, so the device fills whatever buffers it finds.
                for i in 0..4u8 {
                    host.send(&super::net::tests::frame(&super::net::tests::pattern(len, i))).unwrap();
                }
                hosts.borrow_mut().push(host);
                super::net::tests::net_device(mem, Some(backend))
            },
            0,
            &r,
        );
    }

    #[test]
    fn test_prop_fs_random_ring_stays_in_writable_buffers(r in ring(), q in 0usize..2) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"data").unwrap();
        check(
            |mem| {
                let config = super::fs::FsConfig {
                    tag: "p".into(),
                    share: Some(super::fs::FsShare { dir: dir.path().to_path_buf(), read_only: false }),
                    limits: super::fs::FsLimits::default(),
                };
                super::fs::Fs::new_fs(&config, mem, None).unwrap()
            },
            q,
            &r,
        );
    }
}
