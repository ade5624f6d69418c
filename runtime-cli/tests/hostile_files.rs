//! Files are hostile input: a kernel, initrd or snapshot file that is a FIFO, `/dev/zero` or
//! `/dev/urandom` is refused at once with one line, never read forever or waited on.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use common::{kvm_usable, run};

/// A hang shows up as this timeout expiring (the run helper kills the child and fails).
const T: Duration = Duration::from_secs(20);

fn mkfifo(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// `/dev/zero`, `/dev/urandom` and a FIFO in `dir`.
fn hostile(dir: &Path) -> Vec<std::path::PathBuf> {
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    vec!["/dev/zero".into(), "/dev/urandom".into(), fifo]
}

#[test]
fn test_kernel_and_initrd_that_are_not_regular_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in hostile(dir.path()) {
        let out = run(&["boot", "--kernel", bad.to_str().unwrap()], T);
        out.assert_one_line_error("not a regular file");
        if !kvm_usable() {
            continue;
        }
        let out = run(
            &[
                "boot",
                "--kernel",
                "builtin:hello",
                "--initrd",
                bad.to_str().unwrap(),
            ],
            T,
        );
        out.assert_one_line_error("not a regular file");
        assert!(out.stdout.is_empty(), "no guest may run: {}", out.stdout);
    }
}

#[test]
fn test_snapshot_files_that_are_not_regular_files_are_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let snap = root.path().join("snap");
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:ready",
            "--mem-mib",
            "64",
            "--snapshot-on-ready",
            snap.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let ws = snap.join("workingset");
    let out = run(
        &[
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--record-workingset",
            ws.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    for file in ["state", "memory", "workingset"] {
        let saved = root.path().join(format!("{file}.good"));
        std::fs::rename(snap.join(file), &saved).unwrap();
        let fifo_dir = root.path().join(format!("fifo-{file}"));
        std::fs::create_dir(&fifo_dir).unwrap();
        // A working set is only read by uffd-prefetch.
        let modes: &[&str] = if file == "workingset" {
            &["uffd-prefetch", "mmap-prefetch"]
        } else {
            &["eager", "mmap", "uffd", "uffd-prefetch"]
        };
        for bad in hostile(&fifo_dir) {
            let _ = std::fs::remove_file(snap.join(file));
            symlink(&bad, snap.join(file)).unwrap();
            for mode in modes {
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
                out.assert_one_line_error("not a regular file");
                assert!(out.stdout.is_empty(), "{file} -> {}: {mode}", bad.display());
            }
        }
        std::fs::remove_file(snap.join(file)).unwrap();
        std::fs::rename(&saved, snap.join(file)).unwrap();
    }
    let out = run(
        &[
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--mode",
            "uffd-prefetch",
        ],
        T,
    );
    assert_eq!(
        out.code(),
        0,
        "the restored parts work again: {}",
        out.stderr
    );
}
