//! Damaged snapshots are refused with one clear line before any VM is created: one test per kind
//! of damage, and random bit flips in `state`.

mod common;

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{kvm_usable, run};
use vmm::persist::VmState;

const T: Duration = Duration::from_secs(30);

/// A fresh, valid snapshot of the `ready` guest.
fn good_snapshot(root: &Path) -> PathBuf {
    let dir = root.join("snap");
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:ready",
            "--mem-mib",
            "64",
            "--snapshot-on-ready",
            dir.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    dir
}

fn restore_err(dir: &Path, mode: &str, needle: &str) {
    let out = run(
        &[
            "restore",
            "--snapshot",
            dir.to_str().unwrap(),
            "--mode",
            mode,
        ],
        T,
    );
    out.assert_one_line_error(needle);
    assert!(out.stdout.is_empty(), "no guest may run: {}", out.stdout);
}

/// Rewrites the state with a valid checksum after `edit`: damage the checksum cannot catch.
fn edit_state(dir: &Path, edit: impl FnOnce(&mut VmState)) {
    let (id, mut state): (_, VmState) = snapshot::format::read_file(&dir.join("state")).unwrap();
    edit(&mut state);
    fs::write(
        dir.join("state"),
        snapshot::format::encode(&id, &state).unwrap(),
    )
    .unwrap();
}

/// The snapshot id in a state file.
fn snapshot_id(dir: &Path) -> snapshot::SnapshotId {
    snapshot::format::read_file::<VmState>(&dir.join("state"))
        .unwrap()
        .0
}

fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut data = fs::read(path).unwrap();
    data[offset..offset + bytes.len()].copy_from_slice(bytes);
    fs::write(path, data).unwrap();
}

#[test]
fn test_restore_missing_snapshot_parts_are_named() {
    let root = tempfile::tempdir().unwrap();
    restore_err(
        &root.path().join("nope"),
        "uffd",
        "is not a snapshot: the directory is missing",
    );
    if !kvm_usable() {
        return;
    }
    let dir = good_snapshot(root.path());
    fs::remove_file(dir.join("memory")).unwrap();
    restore_err(&dir, "eager", "the memory file is missing");
}

#[test]
fn test_restore_wrong_magic_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = good_snapshot(root.path());
    patch(&dir.join("state"), 0, b"NOTSNAP!");
    restore_err(&dir, "uffd", "not a kata-snap x86-64 snapshot state");
}

#[test]
fn test_restore_other_format_version_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = good_snapshot(root.path());
    patch(&dir.join("state"), 8, &99u32.to_le_bytes());
    restore_err(&dir, "uffd", "snapshot format version 99 is not supported");
}

#[test]
fn test_restore_checksum_mismatch_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = good_snapshot(root.path());
    let len = fs::metadata(dir.join("state")).unwrap().len() as usize;
    let mut data = fs::read(dir.join("state")).unwrap();
    data[len / 2] ^= 0xff;
    fs::write(dir.join("state"), data).unwrap();
    restore_err(&dir, "mmap", "checksum mismatch");
}

#[test]
fn test_restore_truncated_state_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = good_snapshot(root.path());
    let f = OpenOptions::new()
        .write(true)
        .open(dir.join("state"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 100).unwrap();
    restore_err(&dir, "uffd", "truncated");
}

#[test]
fn test_restore_truncated_or_resized_memory_file_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = good_snapshot(root.path());
    let f = OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    restore_err(&dir, "eager", "truncated or resized");
    f.set_len(len + 4096).unwrap();
    restore_err(&dir, "uffd", "truncated or resized");
}

#[test]
fn test_restore_layout_that_does_not_match_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = good_snapshot(root.path());
    // A state that passes its checksum but claims a memory size its layout does not have.
    edit_state(&dir, |state| state.mem_mib = 128);
    restore_err(&dir, "uffd", "does not match 128 MiB of guest memory");
}

#[test]
fn test_restore_workingset_out_of_range_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = good_snapshot(root.path());
    let pages = 64 * 256;
    let id = snapshot_id(&dir);
    snapshot::workingset::write(&dir.join("workingset"), &id, &[1, 2, pages + 7]).unwrap();
    restore_err(&dir, "uffd-prefetch", &format!("names page {}", pages + 7));
    fs::write(dir.join("workingset"), b"KSNAPWS2 garbage").unwrap();
    restore_err(&dir, "uffd-prefetch", "working set is corrupt");
    fs::remove_file(dir.join("workingset")).unwrap();
    restore_err(
        &dir,
        "uffd-prefetch",
        "has no working set: record one with `restore --mode uffd --record-workingset",
    );
}

#[test]
fn test_restore_mixed_snapshot_parts_refused_before_any_vm() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let a = good_snapshot(root.path());
    let b_root = root.path().join("b");
    fs::create_dir(&b_root).unwrap();
    let b = good_snapshot(&b_root);
    assert_ne!(
        snapshot_id(&a),
        snapshot_id(&b),
        "each snapshot has its own id"
    );
    // The state of A with the memory of B (same guest, same size).
    fs::rename(b.join("memory"), root.path().join("memory-b")).unwrap();
    fs::rename(a.join("memory"), b.join("memory")).unwrap();
    fs::rename(root.path().join("memory-b"), a.join("memory")).unwrap();
    for mode in ["eager", "mmap", "uffd"] {
        restore_err(&a, mode, "parts of different snapshots were mixed");
    }
    // Put A's memory back; a working set recorded for B is refused with A.
    fs::rename(a.join("memory"), root.path().join("memory-b")).unwrap();
    fs::rename(b.join("memory"), a.join("memory")).unwrap();
    snapshot::workingset::write(&a.join("workingset"), &snapshot_id(&b), &[1, 2]).unwrap();
    restore_err(&a, "uffd-prefetch", "working set belongs to snapshot");
    snapshot::workingset::write(&a.join("workingset"), &snapshot_id(&a), &[1, 2]).unwrap();
    let out = run(
        &[
            "restore",
            "--snapshot",
            a.to_str().unwrap(),
            "--mode",
            "uffd-prefetch",
        ],
        T,
    );
    assert_eq!(out.code(), 0, "the matching parts restore: {}", out.stderr);
}

#[test]
fn test_restore_snapshot_from_other_cpu_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = good_snapshot(root.path());
    // Claim the snapshotting host offered every leaf-7 feature.
    edit_state(&dir, |state| {
        for e in state
            .host_cpuid
            .iter_mut()
            .filter(|e| e.function == 7 && e.index == 0)
        {
            e.ebx = u32::MAX;
        }
    });
    restore_err(&dir, "uffd", "taken on a host with different CPU features");
    // Claim the other vendor than this host's.
    edit_state(&dir, |state| {
        const INTEL: (u32, u32, u32) = (0x756e_6547, 0x4965_6e69, 0x6c65_746e); // "GenuineIntel"
        const AMD: (u32, u32, u32) = (0x6874_7541, 0x6974_6e65, 0x444d_4163); // "AuthenticAMD"
        for e in state.host_cpuid.iter_mut().filter(|e| e.function == 0) {
            let other = if (e.ebx, e.edx, e.ecx) == INTEL {
                AMD
            } else {
                INTEL
            };
            (e.ebx, e.edx, e.ecx) = other;
        }
    });
    restore_err(&dir, "uffd", "vendor differs");
}

#[test]
fn test_restore_random_bit_flips_in_state_all_refused() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = good_snapshot(root.path());
    let pristine = fs::read(dir.join("state")).unwrap();
    // A fixed-seed xorshift picks 40 bits anywhere in the file (header and body).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..40 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bit = (x % (pristine.len() as u64 * 8)) as usize;
        let mut data = pristine.clone();
        data[bit / 8] ^= 1 << (bit % 8);
        fs::write(dir.join("state"), &data).unwrap();
        let out = run(
            &[
                "restore",
                "--snapshot",
                dir.to_str().unwrap(),
                "--mode",
                "uffd",
            ],
            T,
        );
        assert_eq!(out.code(), 1, "bit {bit}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "bit {bit}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"));
        assert!(out.stdout.is_empty());
    }
    fs::write(dir.join("state"), &pristine).unwrap();
    let out = run(
        &[
            "restore",
            "--snapshot",
            dir.to_str().unwrap(),
            "--mode",
            "uffd",
        ],
        T,
    );
    assert_eq!(
        out.code(),
        0,
        "the pristine state still restores: {}",
        out.stderr
    );
}
