//! A live `vm snapshot` of a Linux guest in the middle of disk I/O (a loop writing and fsyncing
//! files on ext4) restores, and the guest's filesystem is consistent: every file completed
//! before the snapshot reads back intact in the restored guest, it keeps writing, unmounts
//! cleanly, and `e2fsck -fn` finds nothing wrong.

use std::time::{Duration, Instant};

use agent_protocol::AgentMessage;

use crate::guest::*;

/// File `f$i` holds `yes $i | head -c 65536`.
const WRITER: &str = "mount -t ext4 /hostdev/vdb /mnt || exit 1; i=0; \
    while :; do i=$((i+1)); yes $i | head -c 65536 > /mnt/f$i; sync /mnt/f$i; echo $i; done";

const CHECKER: &str = "mount -t ext4 /hostdev/vdb /mnt || exit 1; \
    n=$(ls /mnt | grep -c '^f'); last=0; bad=0; \
    for f in /mnt/f*; do i=${f#/mnt/f}; [ $i -gt $last ] && last=$i; done; \
    for f in /mnt/f*; do i=${f#/mnt/f}; [ $i -eq $last ] && continue; \
      yes $i | head -c 65536 | cmp -s - $f || { echo bad $f; bad=1; }; done; \
    yes after | head -c 65536 > /mnt/after && sync /mnt/after && umount /mnt || exit 2; \
    echo files $n last $last; exit $bad";

#[test]
fn test_live_snapshot_during_disk_io_restores_with_a_consistent_filesystem() {
    let Some(art) = setup() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let data = empty_ext4(dir.path(), "data", 64);
    let mut g = Guest::boot(
        &art,
        &BootOpts {
            disks: vec![
                format!("{},ro", rootfs.display()),
                data.display().to_string(),
            ],
            ..Default::default()
        },
    );
    g.wait_ready(READY_TIMEOUT);
    let mut c = g.agent();
    c.start(request(
        "/dev/vda",
        &["sh", "-c", WRITER],
        vec![guest_dev()],
    ))
    .unwrap_or_else(|e| panic!("writer: {e}{}", g.logs()));
    // Let it complete a few files.
    let end = Instant::now() + Duration::from_secs(60);
    let mut written = 0u64;
    while written < 5 {
        g.check(Instant::now() < end, "the writer did not get going");
        match c.recv().unwrap() {
            AgentMessage::Stdout(b) => {
                if let Some(n) = String::from_utf8_lossy(&b)
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .max()
                {
                    written = n;
                }
            }
            other => panic!("writer: {other:?}{}", g.logs()),
        }
    }
    // Snapshot it mid-loop: pause, snapshot, keep the disk as it is at that moment, stop.
    let snap = dir.path().join("live");
    let o = g.vm(&["pause"]);
    g.check(o.code() == 0, format!("pause: {}", o.stderr));
    let o = g.vm(&["snapshot", "--out", snap.to_str().unwrap()]);
    g.check(
        o.code() == 0,
        format!("vm snapshot: {} {}", o.stdout, o.stderr),
    );
    let frozen = dir.path().join("data.frozen");
    std::fs::copy(&data, &frozen).unwrap();
    g.stop();
    drop(c);
    std::fs::rename(&frozen, &data).unwrap();

    let mut r = Guest::restore(&snap, "uffd", &g.vsock, &[]);
    let o = r.sh("/dev/vda", CHECKER, vec![guest_dev()]);
    r.check(o.code == 0, format!("after restore: {o:?}"));
    let summary = out(&o);
    let last: u64 = summary
        .split_whitespace()
        .last()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(
        last >= written,
        "{summary}: the snapshot had {written} files done"
    );
    r.stop();
    let (code, report) = fsck(&data);
    assert_eq!(
        code, 0,
        "e2fsck -fn after the restored guest's umount: {report}"
    );
}
