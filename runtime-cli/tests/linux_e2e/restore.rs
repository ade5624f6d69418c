//! A template taken at READY, restored in every memory mode with the container's rootfs on the
//! spare disk slot: the first vsock connection after the restore works, `SyncTime` sets the
//! guest's clock to the host's, `Reseed` makes clones read different bytes from /dev/urandom,
//! and the process runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::guest::*;

/// The template: 1 vCPU, a spare slot `rootfs`, taken at READY. Returns (dir, vsock path).
pub fn make_template(art: &Artifacts, dir: &Path) -> (PathBuf, PathBuf) {
    let template = dir.join("template");
    let mut t = Guest::boot(
        art,
        &BootOpts {
            // Read-only: the clones of the template share one rootfs image.
            slots: vec!["rootfs,ro".into()],
            snapshot_on_ready: Some(template.clone()),
            vsock: Some(dir.join("template.vsock")),
            ..Default::default()
        },
    );
    let status = t.wait_exit(READY_TIMEOUT);
    t.check(
        status.success(),
        format!("template boot ended with {status}"),
    );
    (template, t.vsock.clone())
}

fn guest_seconds(o: &agent_protocol::RunOutcome) -> i64 {
    out(o)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no date in {o:?}"))
}

#[test]
fn test_template_restores_in_every_mode_with_clock_entropy_and_first_connection() {
    let Some(art) = setup() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let (template, vsock) = make_template(&art, dir.path());
    let taken = std::time::SystemTime::now();
    let slot = [
        "--disk-slot".to_string(),
        format!("rootfs={}", rootfs.display()),
    ];
    let mut randoms = Vec::new();

    for mode in ["eager", "mmap", "uffd", "uffd-prefetch", "mmap-prefetch"] {
        if mode == "uffd-prefetch" || mode == "mmap-prefetch" {
            assert!(
                template.join("workingset").exists(),
                "the uffd restore did not record a working set"
            );
        }
        if mode == "eager" {
            // Let the template's clock fall behind, so SyncTime has something to correct.
            let behind = Duration::from_secs(6).saturating_sub(taken.elapsed().unwrap());
            std::thread::sleep(behind);
        }
        // The uffd restore records the template's start-up working set for the prefetching ones.
        let mut extra = slot.to_vec();
        if mode == "uffd" {
            extra.extend([
                "--record-workingset".to_string(),
                template.join("workingset").display().to_string(),
            ]);
        }
        let mut g = Guest::restore(&template, mode, &vsock, &extra);
        // The first connection after the restore: Hello must work on it.
        let mut c = g.agent();
        measure(
            &format!("restore_to_first_reply_{mode}"),
            ms_since(g.started),
        );

        if mode == "eager" {
            // Before SyncTime the guest shows the template's time (it slept through the gap).
            let o = g.sh_on(&mut c, "/dev/vda", "date +%s", vec![]);
            let host = (now_ns() / 1_000_000_000) as i64;
            let guest = guest_seconds(&o);
            g.check(
                guest <= host - 4,
                format!("unsynced guest clock {guest} already at host time {host}"),
            );
            c = g.agent();
        }
        let t = Instant::now();
        c.sync_time(now_ns()).unwrap();
        c.reseed(host_random()).unwrap();
        measure(&format!("sync_time_reseed_{mode}"), ms_since(t));
        let o = g.sh_on(
            &mut c,
            "/dev/vda",
            "date +%s; od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'; echo; echo ran >&2",
            vec![],
        );
        let host = (now_ns() / 1_000_000_000) as i64;
        g.check(o.code == 0, format!("{mode}: {o:?}"));
        assert_eq!(err(&o), "ran\n", "{mode}");
        let guest = guest_seconds(&o);
        assert!(
            (guest - host).abs() <= 2,
            "{mode}: guest clock {guest} vs host {host} after SyncTime"
        );
        let random = out(&o).lines().nth(1).unwrap_or_default().to_owned();
        assert_eq!(random.len(), 32, "{mode}: {random:?}");
        randoms.push((mode, random));

        // A second container through a second connection in the same clone.
        let o = g.sh("/dev/vda", "echo again", vec![]);
        assert_eq!((o.code, out(&o).as_str()), (0, "again\n"), "{mode}");
        let t = Instant::now();
        g.stop();
        measure(&format!("stop_{mode}"), ms_since(t));
    }
    for (i, (m1, r1)) in randoms.iter().enumerate() {
        for (m2, r2) in &randoms[i + 1..] {
            assert_ne!(
                r1, r2,
                "clones {m1} and {m2} read the same /dev/urandom bytes"
            );
        }
    }

    // Evidence for the record: without Reseed, do two clones read the same bytes?
    let mut plain = Vec::new();
    for _ in 0..2 {
        let mut g = Guest::restore(&template, "mmap", &vsock, &slot);
        let o = g.sh(
            "/dev/vda",
            "od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'",
            vec![],
        );
        plain.push(out(&o));
        g.stop();
    }
    println!(
        "RIG-INFO without Reseed two clones read {} /dev/urandom bytes",
        if plain[0] == plain[1] {
            "the same"
        } else {
            "different"
        }
    );
}
