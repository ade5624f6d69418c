//! The test every virtio device passes: activate, do I/O, save, restore into a fresh device
//! (state through serde, memory copied as a snapshot would), save again and compare, then go on
//! doing I/O on the restored device.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;
use vm_memory::GuestMemoryMmap;

use super::front::MmioDevice;
use super::test_utils::{Harness, copy_memory, test_memory};
use super::worker::QueueHandler;
use crate::persist::Persist;

/// Runs the conformance sequence for one device kind.
pub fn check_device<H, A>(
    build: impl Fn(GuestMemoryMmap) -> MmioDevice<H>,
    args: impl Fn(GuestMemoryMmap) -> A,
    io: impl Fn(&mut Harness<H>, u32),
) where
    H: QueueHandler + 'static,
    MmioDevice<H>: Persist<ConstructorArgs = A>,
    <MmioDevice<H> as Persist>::State: Serialize + DeserializeOwned + PartialEq + Debug,
    <MmioDevice<H> as Persist>::Error: Debug,
{
    let mem = test_memory();
    let mut h = Harness::new(build(mem.clone()), mem.clone());
    h.driver.init(16);
    io(&mut h, 0);
    assert!(h.device.is_quiescent(), "device busy at save");
    let saved = h.device.save();
    let json = serde_json::to_string(&saved).unwrap();
    let loaded: <MmioDevice<H> as Persist>::State = serde_json::from_str(&json).unwrap();
    assert_eq!(loaded, saved);

    let mem2 = copy_memory(&mem);
    let restored = MmioDevice::<H>::restore(args(mem2.clone()), &loaded).unwrap();
    assert_eq!(restored.save(), saved, "save after restore differs");
    let mut h2 = h.restored(restored, mem2);
    io(&mut h2, 1);
}

#[test]
fn test_conformance_rng_save_restore_continues() {
    use super::rng::{Rng, RngArgs, RngConfig};
    check_device(
        |mem| Rng::new_rng(RngConfig::default(), mem).unwrap(),
        |mem| RngArgs {
            mem,
            // Channels made ahead, as the VMM makes them for a pre-loaded template.
            parts: Some(super::front::Parts::new(1).unwrap()),
        },
        super::rng::tests::rng_io,
    );
}

#[test]
fn test_conformance_block_save_restore_continues() {
    use super::block::{BackendKind, Block, BlockArgs, BlockConfig};
    use std::fs::File;
    let f = super::block::tests::disk_file(super::block::tests::SECTORS);
    let open = || {
        File::options()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap()
    };
    check_device(
        |mem| Block::new_block(BlockConfig::default(), Some(open()), mem).unwrap(),
        |mem| BlockArgs {
            mem,
            file: Some(open()),
            backend: BackendKind::IoUring,
            parts: None,
        },
        super::block::tests::persist::blk_io,
    );
}

#[test]
fn test_conformance_vsock_save_restore_continues() {
    use super::vsock::{Vsock, VsockArgs, VsockConfig};
    let dir = tempfile::tempdir().unwrap();
    let restored_path = dir.path().join("restored.sock");
    check_device(
        |mem| {
            Vsock::new_vsock(
                VsockConfig {
                    guest_cid: 3,
                    uds_path: dir.path().join("v.sock"),
                    max_connections: super::vsock::DEFAULT_MAX_CONNECTIONS,
                },
                mem,
            )
            .unwrap()
        },
        |mem| VsockArgs {
            mem,
            uds_path: restored_path.clone(),
            max_connections: super::vsock::DEFAULT_MAX_CONNECTIONS,
            listener: None,
            parts: None,
        },
        super::vsock::tests::vsock_io,
    );
}

#[test]
fn test_conformance_net_save_restore_continues() {
    use super::net::NetArgs;
    use super::net::tests::{CONFORMANCE_HOST, datagram_pair, net_device, net_io};
    let (first, host0) = datagram_pair();
    let (second, host1) = datagram_pair();
    CONFORMANCE_HOST.with(|c| *c.borrow_mut() = vec![host0, host1]);
    let first = std::cell::RefCell::new(Some(first));
    let second = std::cell::RefCell::new(Some(second));
    check_device::<_, NetArgs>(
        |mem| net_device(mem, first.borrow_mut().take()),
        |mem| NetArgs {
            mem,
            backend: second.borrow_mut().take(),
            parts: Some(super::front::Parts::new(2).unwrap()),
        },
        net_io,
    );
}

#[test]
fn test_conformance_fs_slot_save_restore_continues() {
    use super::fs::{Fs, FsArgs, FsConfig, FsLimits};
    check_device(
        |mem| {
            let config = FsConfig {
                tag: "slot".into(),
                share: None,
                limits: FsLimits::default(),
            };
            Fs::new_fs(&config, mem, None).unwrap()
        },
        |mem| FsArgs {
            mem,
            parts: Some(super::front::Parts::new(super::fs::NUM_QUEUES).unwrap()),
            share: None,
            limits: FsLimits::default(),
            setup: None,
        },
        |h, _round| {
            // A slot answers every request with 0 bytes (used length 0), in order.
            for _ in 0..3 {
                let (e, _) = super::fs::test_client::call(
                    h,
                    super::fs::test_client::INIT,
                    0,
                    &[0u8; 16],
                    64,
                );
                assert_eq!(e, i32::MIN);
            }
            assert!(!h.device.fs_session_active());
        },
    );
}
