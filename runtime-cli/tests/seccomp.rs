//! The VMM's threads run under seccomp filters that kill the process on a syscall outside their
//! allow-lists (the default). Regressions of syscalls found missing.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, kvm_usable, last_tick, run, wait_deadline};

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

/// Each task of process `pid`: (thread name, `Seccomp:` mode, `Seccomp_filters:` count).
fn tasks(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = e.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("?")
                .trim()
                .to_owned()
        };
        out.push((
            comm.trim().to_owned(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out.sort();
    out
}

/// Starts `kata-snap ARGS --serial-log DIR/serial` (no control socket: the loop is sealed) and
/// waits for the spin guest's second tick.
fn spawn_ticking(dir: &Path, args: &[&str]) -> Child {
    let serial = dir.join("serial");
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--serial-log")
        .arg(&serial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + T;
    while last_tick(&std::fs::read_to_string(&serial).unwrap_or_default()) < 2 {
        assert!(Instant::now() < deadline, "no ticks from {args:?}");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{args:?} ended with {status:?} before ticking");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_deadline(&mut child, T).expect("the VMM did not stop on SIGTERM");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
}

/// Issue 21 point 3: every thread of a running VMM runs under a filter (mode 2, one filter),
/// for a cold boot and for a lazy restore (page server, prefetch); none is left unfiltered.
#[test]
fn test_every_thread_of_a_running_vm_is_filtered() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let snap = root.path().join("snap");
    let boot_dir = root.path().join("boot");
    std::fs::create_dir(&boot_dir).unwrap();
    let booted = spawn_ticking(
        &boot_dir,
        &[
            "boot",
            "--kernel",
            "builtin:spin",
            "--snapshot-on-ready",
            snap.to_str().unwrap(),
            "--after-snapshot",
            "continue",
        ],
    );
    let boot_tasks = tasks(booted.id());
    stop(booted);
    let names: Vec<&str> = boot_tasks.iter().map(|t| t.0.as_str()).collect();
    assert!(
        names.contains(&"vmm") && names.contains(&"vcpu0"),
        "{boot_tasks:?}"
    );
    for (name, mode, filters) in &boot_tasks {
        assert_eq!(
            (mode.as_str(), filters.as_str()),
            ("2", "1"),
            "{name}: {boot_tasks:?}"
        );
    }

    // uffd records the working set (written when the VM stops) that uffd-prefetch then loads
    // on its prefetch thread.
    let ws = snap.join("workingset");
    for mode in ["uffd", "uffd-prefetch"] {
        let dir = root.path().join(mode);
        std::fs::create_dir(&dir).unwrap();
        let mut args = vec![
            "restore",
            "--no-pool",
            "--mode",
            mode,
            "--snapshot",
            snap.to_str().unwrap(),
        ];
        if mode == "uffd" {
            args.extend(["--record-workingset", ws.to_str().unwrap()]);
        }
        let vm = spawn_ticking(&dir, &args);
        let t = tasks(vm.id());
        stop(vm);
        let names: Vec<&str> = t.iter().map(|t| t.0.as_str()).collect();
        for want in ["vmm", "vcpu0", "page-server"] {
            assert!(names.contains(&want), "{mode}: no {want} in {t:?}");
        }
        for (name, m, filters) in &t {
            assert_eq!(
                (m.as_str(), filters.as_str()),
                ("2", "1"),
                "{mode} {name}: {t:?}"
            );
        }
    }
}

/// A pool shell's threads, `pool-client` included, run under filters once it serves a client.
#[test]
fn test_pool_shell_threads_all_filtered() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let snap = root.path().join("snap");
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:spin",
            "--mem-mib",
            "128",
            "--snapshot-on-ready",
            snap.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let pool = root.path().join("pool");
    let kata = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("KATA_SNAP_POOL_DIR", &pool)
            .stdin(Stdio::null());
        common::run_command(cmd, T)
    };
    let started = kata(&["pool", "start", "--size", "1", "--mem-mib", "128"]);
    assert_eq!(started.code(), 0, "{}", started.stderr);
    let result = std::panic::catch_unwind(|| {
        let ready = pool.join("ready");
        let deadline = Instant::now() + T;
        let shell: u32 = loop {
            let pid = std::fs::read_dir(&ready).ok().and_then(|d| {
                d.filter_map(|e| {
                    let n = e.ok()?.file_name().to_string_lossy().into_owned();
                    n.strip_suffix(".sock")?.rsplit('-').next()?.parse().ok()
                })
                .next()
            });
            if let Some(pid) = pid {
                break pid;
            }
            assert!(Instant::now() < deadline, "no ready shell");
            std::thread::sleep(Duration::from_millis(20));
        };
        let dir = root.path().join("client");
        std::fs::create_dir(&dir).unwrap();
        let serial = dir.join("serial");
        let mut client = Command::new(BIN)
            .args([
                "restore",
                "--snapshot",
                snap.to_str().unwrap(),
                "--serial-log",
            ])
            .arg(&serial)
            .env("KATA_SNAP_POOL_DIR", &pool)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        while last_tick(&std::fs::read_to_string(&serial).unwrap_or_default()) < 2 {
            assert!(Instant::now() < deadline, "no ticks from the pooled VM");
            std::thread::sleep(Duration::from_millis(20));
        }
        let t = tasks(shell);
        // SAFETY: signalling our own child; it forwards the signal to the pooled VM.
        unsafe { libc::kill(client.id() as i32, libc::SIGTERM) };
        let _ = wait_deadline(&mut client, T);
        let names: Vec<&str> = t.iter().map(|t| t.0.as_str()).collect();
        for want in ["vmm", "vcpu0", "pool-client"] {
            assert!(names.contains(&want), "no {want} in the shell's {t:?}");
        }
        for (name, m, filters) in &t {
            assert_eq!((m.as_str(), filters.as_str()), ("2", "1"), "{name}: {t:?}");
        }
    });
    let _ = kata(&["pool", "stop"]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// A debug build (the tests') still honours `KATA_SNAP_SECCOMP=off`; a release build ignores it
/// (unit test `test_seccomp_mode_release_ignores_env_and_refuses_off` in main.rs).
#[test]
fn test_seccomp_off_from_env_in_a_debug_build_leaves_threads_unfiltered() {
    if !kvm_usable() || !cfg!(debug_assertions) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial");
    let child = Command::new(BIN)
        .args(["boot", "--kernel", "builtin:spin", "--serial-log"])
        .arg(&serial)
        .env("KATA_SNAP_SECCOMP", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + T;
    while last_tick(&std::fs::read_to_string(&serial).unwrap_or_default()) < 2 {
        assert!(Instant::now() < deadline, "no ticks");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = tasks(child.id());
    stop(child);
    assert!(t.iter().all(|(_, m, _)| m == "0"), "{t:?}");
}
