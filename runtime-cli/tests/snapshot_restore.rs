//! Snapshots and restores with the test guests: every restore mode continues the guest exactly
//! where it stopped, clones run side by side, and a restored VM can be snapshotted again.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{BackgroundVm, Output, kvm_usable, last_tick, run};

const MODES: [&str; 5] = ["eager", "mmap", "uffd", "uffd-prefetch", "mmap-prefetch"];
const T: Duration = Duration::from_secs(120);

fn snapshot_at_ready(guest: &str, cmdline: &str, dir: &Path, extra: &[&str]) -> Output {
    let kernel = format!("builtin:{guest}");
    let mut args = vec![
        "boot",
        "--kernel",
        &kernel,
        "--cmdline",
        cmdline,
        "--snapshot-on-ready",
        dir.to_str().unwrap(),
        "--timing",
    ];
    args.extend_from_slice(extra);
    let out = run(&args, T);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("snapshot taken at READY"),
        "{}",
        out.stderr
    );
    out
}

/// Restores `dir` in `mode`; a `uffd` restore records the start-up working set into the
/// snapshot (the template step that makes it prefetchable), which `uffd-prefetch` then uses.
fn restore(dir: &Path, mode: &str) -> Output {
    let ws = dir.join("workingset");
    let mut args = vec![
        "restore",
        "--snapshot",
        dir.to_str().unwrap(),
        "--mode",
        mode,
        "--timing",
    ];
    if mode == "uffd" {
        args.extend_from_slice(&["--record-workingset", ws.to_str().unwrap()]);
    }
    run(&args, T)
}

#[test]
fn test_restore_compute_in_every_mode_matches_uninterrupted_run() {
    if !kvm_usable() {
        return;
    }
    let iters = 30_000u64;
    let want = format!(
        "compute: result={:#x}\n",
        test_guests::compute_result(iters)
    );
    let cmdline = format!("iters={iters} ready_at=50");
    let uninterrupted = run(
        &["boot", "--kernel", "builtin:compute", "--cmdline", &cmdline],
        T,
    );
    assert!(uninterrupted.stdout.ends_with(&want));

    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("compute");
    let before = snapshot_at_ready("compute", &cmdline, &snap, &[]);
    assert!(
        before
            .stdout
            .ends_with("compute: 50%\ncompute: ready at 50%\n"),
        "{}",
        before.stdout
    );
    assert!(
        !before.stdout.contains("result="),
        "the snapshotted VM stopped at READY"
    );
    for mode in MODES {
        let out = restore(&snap, mode);
        assert_eq!(out.code(), 0, "{mode}: {}", out.stderr);
        // The restored guest picks up right after READY: the second half of the progress, then
        // the result of the uninterrupted run.
        assert_eq!(
            format!("{}{}", before.stdout, out.stdout),
            uninterrupted.stdout,
            "{mode}: output before + after the snapshot must equal an uninterrupted run"
        );
        if mode == "uffd" {
            assert!(
                snap.join("workingset").exists(),
                "a uffd restore with --record-workingset records the working set"
            );
        }
    }
    // Installed before the vCPUs start, the working set leaves nothing to fault on.
    let out = run(
        &[
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--mode",
            "uffd-prefetch",
            "--prefetch-before",
            "--timing",
        ],
        T,
    );
    assert_eq!(
        format!("{}{}", before.stdout, out.stdout),
        uninterrupted.stdout
    );
    assert!(
        out.stderr.contains("page server: 0 faults"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("hit rate 100.0% (0 faults on set pages"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("0 faults outside the set"),
        "{}",
        out.stderr
    );

    // Half the working set: the pages left out come back as faults outside the set.
    let (id, _): (_, vmm::persist::VmState) =
        snapshot::format::read_file(&snap.join("state")).unwrap();
    let pages = snapshot::workingset::read(&snap.join("workingset"), &id, 1 << 20)
        .unwrap()
        .unwrap();
    let half = &pages[..pages.len() / 2];
    snapshot::workingset::write(&snap.join("workingset"), &id, half).unwrap();
    let out = run(
        &[
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--mode",
            "uffd-prefetch",
            "--prefetch-before",
            "--fault-around",
            "1",
            "--timing",
        ],
        T,
    );
    assert_eq!(
        format!("{}{}", before.stdout, out.stdout),
        uninterrupted.stdout
    );
    let outside = out
        .stderr
        .lines()
        .find_map(|l| {
            l.split(" faults on set pages before the prefetcher reached them, ")
                .nth(1)
        })
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert_eq!(
        outside,
        pages.len() - half.len(),
        "every page left out of the set faults: {}",
        out.stderr
    );
}

#[test]
fn test_restore_memtouch_every_page_written_before_snapshot_is_back() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("memtouch");
    let pages = 24 * 256;
    let before = snapshot_at_ready(
        "memtouch",
        "touch_mib=24 touch_base_mib=40",
        &snap,
        &["--mem-mib", "512"],
    );
    assert!(
        before
            .stdout
            .contains(&format!("memtouch: wrote {pages} pages"))
    );
    assert!(!before.stdout.contains("verified"));
    let sum = test_guests::memtouch_checksum(pages);
    for mode in MODES {
        let out = restore(&snap, mode);
        assert_eq!(out.code(), 0, "{mode}: {}", out.stderr);
        assert_eq!(
            out.stdout,
            format!(
                "memtouch: ready\nmemtouch: verified {pages} pages checksum={sum:#x}\nmemtouch: OK\n"
            ),
            "{mode}"
        );
    }
}

#[test]
fn test_clones_restore_side_by_side() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("clone-src");
    let iters = 20_000u64;
    snapshot_at_ready("compute", &format!("iters={iters} ready_at=30"), &snap, &[]);
    let want = format!(
        "compute: result={:#x}\n",
        test_guests::compute_result(iters)
    );
    for mode in ["mmap", "uffd", "eager"] {
        let children: Vec<_> = (0..4)
            .map(|_| {
                let snap = snap.clone();
                let mode = mode.to_string();
                std::thread::spawn(move || restore(&snap, &mode))
            })
            .collect();
        for c in children {
            let out = c.join().unwrap();
            assert_eq!(out.code(), 0, "{mode}: {}", out.stderr);
            assert!(out.stdout.ends_with(&want), "{mode}: {}", out.stdout);
        }
    }
}

/// Complete `tick N` lines must count up by one.
fn assert_ticks_consecutive(text: &str) {
    let ticks: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(ticks.len() >= 2, "{text}");
    for w in ticks.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ticks jump: {ticks:?}");
    }
}

#[test]
fn test_snapshot_of_a_restored_vm_restores_too() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s1 = dir.path().join("s1");
    let s2 = dir.path().join("s2");
    // A live snapshot of a running guest through the control socket; the guest runs on.
    let mut vm = BackgroundVm::start("builtin:spin", &["--mem-mib", "128"]);
    vm.wait_for(
        || last_tick(&vm.serial_text()) >= 3,
        Duration::from_secs(30),
        "ticks",
    );
    let out = run(
        &[
            "vm",
            "snapshot",
            "--api-sock",
            vm.sock.to_str().unwrap(),
            "--out",
            s1.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let at_s1 = last_tick(&vm.serial_text());
    vm.wait_for(
        || last_tick(&vm.serial_text()) >= at_s1 + 2,
        Duration::from_secs(30),
        "ticks after a live snapshot",
    );
    assert_eq!(vm.vm("stop").code(), 0);
    vm.wait_exit(Duration::from_secs(10));

    // Restore s1 lazily, let it tick, snapshot the restored VM.
    let mut r1 = BackgroundVm::start_restore(&s1, "uffd");
    r1.wait_for(
        || last_tick(&r1.serial_text()) >= at_s1 + 3,
        Duration::from_secs(30),
        "ticks after restore",
    );
    let out = run(
        &[
            "vm",
            "snapshot",
            "--api-sock",
            r1.sock.to_str().unwrap(),
            "--out",
            s2.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let r1_text = r1.serial_text();
    assert_eq!(r1.vm("stop").code(), 0);
    r1.wait_exit(Duration::from_secs(10));
    assert_ticks_consecutive(&r1_text);
    let first_r1 = r1_text
        .lines()
        .find_map(|l| l.strip_prefix("tick ")?.parse::<u64>().ok())
        .unwrap();
    assert!(
        first_r1 <= at_s1 + 1,
        "the restored guest continues from the snapshot: {first_r1} vs {at_s1}"
    );

    // Restore the snapshot of the restored VM.
    let mut r2 = BackgroundVm::start_restore(&s2, "eager");
    let at_s2 = last_tick(&r1_text);
    r2.wait_for(
        || last_tick(&r2.serial_text()) >= at_s2 + 2,
        Duration::from_secs(30),
        "ticks after the second restore",
    );
    assert_eq!(r2.vm("stop").code(), 0);
    r2.wait_exit(Duration::from_secs(10));
    assert_ticks_consecutive(&r2.serial_text());
}

#[test]
fn test_live_snapshot_mid_computation_restores_to_same_result() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("live");
    let iters = 60_000u64;
    let want = format!(
        "compute: result={:#x}\n",
        test_guests::compute_result(iters)
    );
    let mut vm = BackgroundVm::start("builtin:compute", &["--cmdline", &format!("iters={iters}")]);
    vm.wait_for(
        || vm.serial_text().contains("compute: 20%"),
        Duration::from_secs(30),
        "20 %",
    );
    let out = run(
        &[
            "vm",
            "snapshot",
            "--api-sock",
            vm.sock.to_str().unwrap(),
            "--out",
            snap.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(
        vm.serial_text().ends_with(&want),
        "the original finishes after a live snapshot"
    );
    let out = restore(&snap, "uffd");
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stdout.ends_with(&want), "{}", out.stdout);
}

#[test]
fn test_snapshot_on_ready_refuses_existing_directory() {
    let dir = tempfile::tempdir().unwrap();
    run(
        &[
            "boot",
            "--kernel",
            "builtin:ready",
            "--snapshot-on-ready",
            dir.path().to_str().unwrap(),
        ],
        T,
    )
    .assert_one_line_error("already exists");
}
