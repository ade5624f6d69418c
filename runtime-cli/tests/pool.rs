//! Restores through a pool of pre-started VMMs behave exactly as cold restores, a pool that dies
//! loses no restore (the client falls back to a cold start), and no shell serves two restores.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Output, collect, kvm_usable, run, run_command};

const T: Duration = Duration::from_secs(120);
const MODES: [&str; 5] = ["eager", "mmap", "uffd", "uffd-prefetch", "mmap-prefetch"];

/// `kata-snap ARGS` with the pool in `pool`.
fn kata(pool: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("KATA_SNAP_POOL_DIR", pool)
        .stdin(Stdio::null());
    run_command(cmd, T)
}

struct Pool<'a>(&'a Path);

impl<'a> Pool<'a> {
    fn start(dir: &'a Path, size: u32, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "pool",
            "start",
            "--size",
            &size.to_string(),
            "--mem-mib",
            "256",
        ])
        .env("KATA_SNAP_POOL_DIR", dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null());
        let out = run_command(cmd, T);
        assert_eq!(out.code(), 0, "{}", out.stderr);
        Self(dir)
    }

    fn ready_pids(&self) -> Vec<i32> {
        std::fs::read_dir(self.0.join("ready"))
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".sock")?.rsplit('-').next()?.parse().ok()
            })
            .collect()
    }

    fn manager_pid(&self) -> i32 {
        std::fs::read_to_string(self.0.join("manager.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        let _ = kata(self.0, &["pool", "stop"]);
    }
}

/// The pre-started VMM's pid in a `--timing` restore's "restore path: pool" line (a plain or a
/// pre-loaded shell).
fn pooled_pid(stderr: &str) -> Option<i32> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("kata-snap: restore path: pool"))?;
    let (_, pid) = line.split_once("pre-started VMM pid ")?;
    pid.trim_end_matches(')').parse().ok()
}

fn compute_snapshot(dir: &Path) -> (std::path::PathBuf, String, String) {
    let iters = 30_000u64;
    let cmdline = format!("iters={iters} ready_at=50");
    let uninterrupted = run(
        &["boot", "--kernel", "builtin:compute", "--cmdline", &cmdline],
        T,
    );
    let snap = dir.join("compute");
    let before = run(
        &[
            "boot",
            "--kernel",
            "builtin:compute",
            "--cmdline",
            &cmdline,
            "--mem-mib",
            "256",
            "--snapshot-on-ready",
            snap.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(before.code(), 0, "{}", before.stderr);
    let ws = snap.join("workingset");
    let rec = run(
        &[
            "restore",
            "--no-pool",
            "--snapshot",
            snap.to_str().unwrap(),
            "--record-workingset",
            ws.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(rec.code(), 0, "{}", rec.stderr);
    (snap, before.stdout, uninterrupted.stdout)
}

#[test]
fn test_pool_restores_match_cold_restores_in_every_mode() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (snap, before, uninterrupted) = compute_snapshot(root.path());
    let pool_dir = root.path().join("pool");
    let pool = Pool::start(&pool_dir, 2, &[]);
    for mode in MODES {
        for pooled in [true, false] {
            let mut args = vec!["restore", "--timing", "--mode", mode, "--snapshot"];
            args.push(snap.to_str().unwrap());
            if !pooled {
                args.push("--no-pool");
            }
            let out = kata(pool.0, &args);
            assert_eq!(out.code(), 0, "{mode} pooled={pooled}: {}", out.stderr);
            assert_eq!(
                format!("{before}{}", out.stdout),
                uninterrupted,
                "{mode} pooled={pooled}: the guest continues exactly as uninterrupted"
            );
            let path = if pooled {
                "restore path: pool"
            } else {
                "restore path: cold start"
            };
            assert!(out.stderr.contains(path), "{mode}: {}", out.stderr);
        }
    }
    // A snapshot of another memory size goes through the pool too (re-slotted).
    let small = root.path().join("small");
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:ready",
            "--mem-mib",
            "64",
            "--snapshot-on-ready",
            small.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0);
    let out = kata(
        pool.0,
        &["restore", "--timing", "--snapshot", small.to_str().unwrap()],
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("restore path: pool"), "{}", out.stderr);
    assert_eq!(out.stdout, "ready: done\n");
}

#[test]
fn test_pool_that_dies_loses_no_restore() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (snap, before, uninterrupted) = compute_snapshot(root.path());

    // Shells that die right after taking the request (mid-hand-off): the client starts cold.
    // The fault is injected through a hook that only debug builds have.
    if cfg!(debug_assertions) {
        let crash_dir = root.path().join("crash");
        let crash = Pool::start(
            &crash_dir,
            1,
            &[("KATA_SNAP_POOL_FAULT", "die-after-request")],
        );
        let out = kata(
            crash.0,
            &["restore", "--timing", "--snapshot", snap.to_str().unwrap()],
        );
        assert_eq!(out.code(), 0, "{}", out.stderr);
        assert!(
            out.stderr.contains("ended during the hand-off"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("restore path: cold start"),
            "{}",
            out.stderr
        );
        assert_eq!(format!("{before}{}", out.stdout), uninterrupted);
        drop(crash);
    } else {
        println!("SKIPPED (crash part): KATA_SNAP_POOL_FAULT exists in debug builds only");
    }

    // A pool whose manager and shells were killed: the dead sockets are skipped.
    let dead_dir = root.path().join("dead");
    let dead = Pool::start(&dead_dir, 2, &[]);
    // SAFETY: SIGKILL to processes of this test's pool.
    unsafe { libc::kill(dead.manager_pid(), libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(100));
    for pid in dead.ready_pids() {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(100));
    let out = kata(
        dead.0,
        &["restore", "--timing", "--snapshot", snap.to_str().unwrap()],
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("restore path: cold start"),
        "{}",
        out.stderr
    );
    assert_eq!(format!("{before}{}", out.stdout), uninterrupted);
}

#[test]
fn test_pool_never_hands_one_shell_out_twice() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (snap, before, uninterrupted) = compute_snapshot(root.path());
    let pool_dir = root.path().join("pool");
    let pool = Pool::start(&pool_dir, 4, &[]);
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(BIN)
                .args(["restore", "--timing", "--snapshot"])
                .arg(&snap)
                .env("KATA_SNAP_POOL_DIR", pool.0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut pids = Vec::new();
    for child in children {
        let Output {
            status,
            stdout,
            stderr,
        } = collect(child, T, "a restore");
        assert!(status.success(), "{stderr}");
        assert_eq!(format!("{before}{stdout}"), uninterrupted, "{stderr}");
        if let Some(pid) = pooled_pid(&stderr) {
            pids.push(pid.to_string());
        }
    }
    assert!(!pids.is_empty(), "some restores went through the pool");
    let mut unique = pids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        pids.len(),
        "a shell served two restores: {pids:?}"
    );
}

#[test]
fn test_a_killed_client_takes_its_pooled_vm_with_it() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    // A guest that runs until it is stopped.
    let snap = root.path().join("long");
    let before = run(
        &[
            "boot",
            "--kernel",
            "builtin:spin",
            "--mem-mib",
            "256",
            "--snapshot-on-ready",
            snap.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(before.code(), 0, "{}", before.stderr);
    let pool_dir = root.path().join("pool");
    let pool = Pool::start(&pool_dir, 1, &[]);
    let err = root.path().join("client.err");
    let mut client = Command::new(BIN)
        .args(["restore", "--timing", "--snapshot", snap.to_str().unwrap()])
        .env("KATA_SNAP_POOL_DIR", pool.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + T;
    let vmm: i32 = loop {
        let text = std::fs::read_to_string(&err).unwrap_or_default();
        if let Some(pid) = pooled_pid(&text) {
            break pid;
        }
        assert!(std::time::Instant::now() < end, "no pooled restore: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    client.kill().unwrap();
    client.wait().unwrap();
    let gone = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    };
    while !gone(vmm) {
        assert!(
            std::time::Instant::now() < end,
            "the pooled VMM {vmm} outlived its killed client"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
