//! virtio devices through KVM: the `virtioblk` test guest drives a virtio-blk device with a polled
//! driver (probe, features, queue, read, write, flush, get-id, a read past the end), and the test
//! checks the backing file afterwards.

mod common;

use std::time::Duration;

use common::{kvm_usable, run};

const T: Duration = Duration::from_secs(60);

/// A 1 MiB disk image whose sector 0 starts with `HELLO-FROM-HOST!`.
fn disk(dir: &std::path::Path) -> std::path::PathBuf {
    let mut d = vec![0u8; 1 << 20];
    d[..16].copy_from_slice(b"HELLO-FROM-HOST!");
    let path = dir.join("disk.img");
    std::fs::write(&path, d).unwrap();
    path
}

fn expected_sector(n: u64) -> Vec<u8> {
    let mut s: Vec<u8> = (0..512u64).map(|i| (i * 7 + n) as u8).collect();
    s[..16].copy_from_slice(b"KATA-SNAP-WROTE!");
    s
}

#[test]
fn test_virtio_blk_guest_reads_writes_flushes_through_kvm() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path());
    let spec = format!("{},id=rootfs-disk", img.display());
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:virtioblk",
            "--disk",
            &spec,
            "--cmdline",
            "write_sector=7",
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "virtioblk: base=0xd0000000\n\
         virtioblk: capacity=2048 rw\n\
         virtioblk: read sector 0 status=0 data=HELLO-FROM-HOST!\n\
         virtioblk: write sector 7 status=0\n\
         virtioblk: read back status=0 match\n\
         virtioblk: flush status=0\n\
         virtioblk: id status=0 id=rootfs-disk\n\
         virtioblk: read past end status=1\n\
         virtioblk: done\n"
    );
    let data = std::fs::read(&img).unwrap();
    assert_eq!(
        &data[7 * 512..8 * 512],
        &expected_sector(7)[..],
        "the guest's write is in the file"
    );
    assert!(
        data[512..7 * 512].iter().all(|&b| b == 0),
        "nothing else was written"
    );
    assert_eq!(&data[..16], b"HELLO-FROM-HOST!");
}

#[test]
fn test_virtio_blk_second_of_two_disks_gets_its_own_io() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let first = disk(dir.path());
    let second = dir.path().join("second.img");
    let mut d = vec![0u8; 2 << 20];
    d[..16].copy_from_slice(b"SECOND-DISK-HERE");
    std::fs::write(&second, d).unwrap();
    let before_first = std::fs::read(&first).unwrap();
    let spec2 = format!("{},id=data", second.display());
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:virtioblk",
            "--disk",
            first.to_str().unwrap(),
            "--disk",
            &spec2,
            "--cmdline",
            "disk_index=1 write_sector=5",
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("virtioblk: base=0xd0001000\nvirtioblk: capacity=4096 rw\n"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("data=SECOND-DISK-HERE"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("id=data"), "{}", out.stdout);
    assert_eq!(
        &std::fs::read(&second).unwrap()[5 * 512..6 * 512],
        &expected_sector(5)[..]
    );
    assert_eq!(
        std::fs::read(&first).unwrap(),
        before_first,
        "the other disk is untouched"
    );
}

#[test]
fn test_virtio_blk_read_only_disk_refuses_writes() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path());
    let before = std::fs::read(&img).unwrap();
    let spec = format!("{},ro", img.display());
    let out = run(
        &["boot", "--kernel", "builtin:virtioblk", "--disk", &spec],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("virtioblk: capacity=2048 ro\n"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("read sector 0 status=0 data=HELLO-FROM-HOST!"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("virtioblk: write sector 1 status=1\n"),
        "IOERR on a read-only disk: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("id=disk.img"),
        "the default id is the file name: {}",
        out.stdout
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "a read-only disk is never written"
    );
}

#[test]
fn test_virtio_devices_are_announced_in_slot_order() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path());
    let b = dir.path().join("b.img");
    std::fs::write(&b, vec![0u8; 4096]).unwrap();
    let sock = dir.path().join("vsock.sock");
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:bootinfo",
            "--cmdline",
            "console=ttyS0",
            "--disk",
            a.to_str().unwrap(),
            "--disk",
            &format!("{},ro", b.display()),
            "--vsock",
            &format!("3,{}", sock.display()),
            "--rng",
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stdout.contains(
            "cmdline: console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7 virtio_mmio.device=4K@0xd0003000:8\n"
        ),
        "{}",
        out.stdout
    );
}

#[test]
fn test_bad_device_options_are_one_line_errors() {
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:hello",
            "--disk",
            "/nonexistent.img",
        ],
        T,
    );
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent.img is not a file"),
        "{}",
        out.stderr
    );
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path());
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:hello",
            "--disk",
            &format!("{},rw", img.display()),
        ],
        T,
    );
    assert!(
        out.stderr.contains("unknown disk option \"rw\""),
        "{}",
        out.stderr
    );
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:hello",
            "--vsock",
            "2,/tmp/x.sock",
        ],
        T,
    );
    assert!(
        out.stderr.contains("CID 2 must be 3 or more"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"));
}

#[test]
fn test_snapshot_mid_io_restore_keeps_writes_before_and_after() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path());
    let snap = dir.path().join("snap");
    // The guest writes sector 3, says READY (snapshot), then writes sector 4 and reads 3 back.
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:virtioblk",
            "--disk",
            img.to_str().unwrap(),
            "--cmdline",
            "ready_after_write=1 write_sector=3",
            "--snapshot-on-ready",
            snap.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stdout.ends_with("virtioblk: write sector 3 status=0\n"),
        "{}",
        out.stdout
    );
    let after_snapshot = std::fs::read(&img).unwrap();
    for mode in ["uffd", "eager", "mmap"] {
        std::fs::write(&img, &after_snapshot).unwrap();
        let out = run(
            &[
                "restore",
                "--snapshot",
                snap.to_str().unwrap(),
                "--mode",
                mode,
            ],
            T,
        );
        assert_eq!(out.code(), 0, "{mode}: {}", out.stderr);
        assert_eq!(
            out.stdout,
            "virtioblk: write sector 4 status=0\n\
             virtioblk: read back status=0 match\n\
             virtioblk: flush status=0\n\
             virtioblk: id status=0 id=disk.img\n\
             virtioblk: read past end status=1\n\
             virtioblk: done\n",
            "{mode}"
        );
        let data = std::fs::read(&img).unwrap();
        assert_eq!(
            &data[3 * 512..4 * 512],
            &expected_sector(3)[..],
            "{mode}: the write before the snapshot"
        );
        assert_eq!(
            &data[4 * 512..5 * 512],
            &expected_sector(4)[..],
            "{mode}: the write after the restore"
        );
    }
}

#[test]
fn test_spare_slot_backed_at_restore_is_announced_by_config_change() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tmpl = dir.path().join("template");
    // The template's disk slot is empty when the guest probes it and says READY.
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:virtioblk",
            "--disk-slot",
            "rootfs",
            "--cmdline",
            "ready_after_probe=1",
            "--snapshot-on-ready",
            tmpl.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("virtioblk: capacity=0 rw\n"),
        "{}",
        out.stdout
    );
    // Two restores of one template, each with its own rootfs.
    for n in [1u8, 2] {
        let sub = dir.path().join(format!("c{n}"));
        std::fs::create_dir_all(&sub).unwrap();
        let img = disk(&sub);
        let slot = format!("rootfs={}", img.display());
        let out = run(
            &[
                "restore",
                "--snapshot",
                tmpl.to_str().unwrap(),
                "--disk-slot",
                &slot,
            ],
            T,
        );
        assert_eq!(out.code(), 0, "{}", out.stderr);
        assert!(
            out.stdout
                .starts_with("virtioblk: after ready: capacity=2048 config-changed\n"),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout
                .contains("read sector 0 status=0 data=HELLO-FROM-HOST!"),
            "{}",
            out.stdout
        );
        assert!(out.stdout.contains("id=rootfs"), "{}", out.stdout);
        assert_eq!(
            &std::fs::read(&img).unwrap()[512..1024],
            &expected_sector(1)[..]
        );
    }
    let out = run(
        &[
            "restore",
            "--snapshot",
            tmpl.to_str().unwrap(),
            "--disk-slot",
            &format!("nope={}", tmpl.join("memory").display()),
        ],
        T,
    );
    out.assert_one_line_error("the snapshot has no spare disk slot named \"nope\"");
}
