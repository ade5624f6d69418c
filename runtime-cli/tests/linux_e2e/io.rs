//! A Linux guest's I/O: a block written and fsynced on a raw virtio-blk disk is in the host's
//! image when the process exits; a file written on an ext4 disk is there too, and the filesystem
//! is clean; `/dev/hwrng` (virtio-rng, `--rng`) reads random bytes.

use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use crate::common::run_command;
use crate::guest::*;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn test_fsynced_writes_reach_the_host_image_and_hwrng_reads() {
    let Some(art) = setup() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let data = empty_ext4(dir.path(), "data", 32);
    let raw = dir.path().join("raw.img");
    fs::File::create(&raw).unwrap().set_len(8 << 20).unwrap();
    let mut g = Guest::boot(
        &art,
        &BootOpts {
            disks: vec![
                format!("{},ro", rootfs.display()),
                data.display().to_string(),
                raw.display().to_string(),
            ],
            rng: true,
            ..Default::default()
        },
    );
    g.wait_ready(READY_TIMEOUT);

    // Raw disk: 8 KiB at offset 20 KiB, fsynced by dd; the host reads it while the VM runs.
    let marker = hex(&host_random()).repeat(64).into_bytes(); // 8 KiB
    let mut c = g.agent();
    let o = c
        .run(
            request(
                "/dev/vda",
                &["dd", "of=/hostdev/vdc", "bs=4096", "seek=5", "conv=fsync"],
                vec![guest_dev()],
            ),
            Some(marker.clone()),
            RUN_DEADLINE,
        )
        .unwrap();
    g.check(o.code == 0, format!("dd failed: {o:?}"));
    let mut back = vec![0u8; marker.len()];
    fs::File::open(&raw)
        .unwrap()
        .read_exact_at(&mut back, 5 * 4096)
        .unwrap();
    assert!(back == marker, "the fsynced block is not in the host image");

    // ext4: a file written, fsynced, the filesystem unmounted.
    let content = hex(&host_random()).repeat(100).into_bytes();
    let mut c = g.agent();
    let o = c
        .run(
            request(
                "/dev/vda",
                &[
                    "sh",
                    "-c",
                    "mount -t ext4 /hostdev/vdb /mnt && dd of=/mnt/file conv=fsync 2>/dev/null \
                     && umount /mnt && echo done",
                ],
                vec![guest_dev()],
            ),
            Some(content.clone()),
            RUN_DEADLINE,
        )
        .unwrap();
    g.check(
        o.code == 0 && out(&o) == "done\n",
        format!("ext4 write failed: {o:?}"),
    );
    let (code, report) = fsck(&data);
    assert_eq!(code, 0, "e2fsck -fn after the guest's umount: {report}");
    let mut cmd = Command::new(
        ["/sbin/debugfs", "/usr/sbin/debugfs"]
            .iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("debugfs (e2fsprogs)"),
    );
    cmd.args(["-R", "cat /file"]).arg(&data);
    let read = run_command(cmd, Duration::from_secs(30));
    assert!(
        read.stdout.as_bytes() == content.as_slice(),
        "the file in the host image differs ({} bytes, expected {})",
        read.stdout.len(),
        content.len()
    );

    // virtio-rng: two reads of /dev/hwrng, 32 bytes each, differ and are not zero.
    let o = g.sh(
        "/dev/vda",
        "for i in 1 2; do dd if=/hostdev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'; echo; done",
        vec![guest_dev()],
    );
    g.check(o.code == 0, format!("hwrng read failed: {o:?}"));
    let lines: Vec<String> = out(&o).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| l.len() == 64), "{lines:?}");
    assert_ne!(lines[0], lines[1]);
    assert!(
        lines.iter().all(|l| l.chars().any(|c| c != '0')),
        "{lines:?}"
    );
    g.stop();
}

/// Measurement (no assertion on time): virtio-blk reads with the VMM's seccomp filters on against
/// off, alternating, on one 32 MiB raw disk read with O_DIRECT in 4 KiB and 64 KiB requests.
#[test]
fn test_virtio_blk_reads_with_seccomp_on_and_off() {
    let Some(art) = setup() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let raw = dir.path().join("raw.img");
    fs::File::create(&raw).unwrap().set_len(32 << 20).unwrap();
    // A release build (the rig's) refuses `--seccomp off`: only a debug build measures the pair.
    let modes: &[&str] = if cfg!(debug_assertions) {
        &["kill", "off"]
    } else {
        println!(
            "SKIPPED: seccomp off in a release build (only debug builds accept --seccomp off)"
        );
        &["kill"]
    };
    for round in 0..2 {
        for &mode in modes {
            let mut g = Guest::boot(
                &art,
                &BootOpts {
                    disks: vec![
                        format!("{},ro", rootfs.display()),
                        format!("{},ro", raw.display()),
                    ],
                    seccomp: Some(mode),
                    ..Default::default()
                },
            );
            g.wait_ready(READY_TIMEOUT);
            for bs in ["4k", "64k"] {
                // One process per connection.
                let mut c = g.agent();
                let t = std::time::Instant::now();
                let o = c
                    .run(
                        request(
                            "/dev/vda",
                            &[
                                "dd",
                                "if=/hostdev/vdb",
                                "of=/dev/null",
                                &format!("bs={bs}"),
                                "iflag=direct",
                            ],
                            vec![guest_dev()],
                        ),
                        None,
                        RUN_DEADLINE,
                    )
                    .unwrap_or_else(|e| panic!("dd with seccomp {mode}: {e}{}", g.logs()));
                g.check(o.code == 0, format!("dd failed: {o:?}"));
                let ms = ms_since(t);
                if round == 1 {
                    measure(&format!("blk_read_32mib_bs{bs}_seccomp_{mode}"), ms);
                }
            }
            g.stop();
        }
    }
}
