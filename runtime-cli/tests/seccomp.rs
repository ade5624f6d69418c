//! The VMM's threads run under seccomp filters that kill the process on a syscall outside their
//! allow-lists (the default). Regressions of syscalls found missing.

mod common;

use std::time::Duration;

use common::{kvm_usable, run};

const T: Duration = Duration::from_secs(120);

/// glibc's thread arenas read `/proc/sys/vm/overcommit_memory` the first time they shrink a heap:
/// the page server freeing its grown working-set record did that, and was killed.
#[test]
fn test_recording_a_large_working_set_under_seccomp_kill() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let snap = root.path().join("snap");
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:memtouch",
            "--mem-mib",
            "512",
            "--cmdline",
            "touch_mib=64 touch_base_mib=16",
            "--snapshot-on-ready",
            snap.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let ws = snap.join("workingset");
    for _ in 0..2 {
        let out = run(
            &[
                "--seccomp",
                "kill",
                "restore",
                "--no-pool",
                "--snapshot",
                snap.to_str().unwrap(),
                "--record-workingset",
                ws.to_str().unwrap(),
            ],
            T,
        );
        assert_eq!(out.code(), 0, "killed? {:?} {}", out.status, out.stderr);
        assert!(out.stdout.ends_with("memtouch: OK\n"), "{}", out.stdout);
    }
    for mode in ["uffd-prefetch", "mmap-prefetch"] {
        let out = run(
            &[
                "restore",
                "--no-pool",
                "--mode",
                mode,
                "--snapshot",
                snap.to_str().unwrap(),
            ],
            T,
        );
        assert_eq!(out.code(), 0, "{mode}: {:?} {}", out.status, out.stderr);
    }
}
