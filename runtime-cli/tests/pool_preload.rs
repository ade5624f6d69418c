//! Pre-loaded pool shells: a shell that loaded the pool's template before any client came runs a
//! restore of it exactly as a cold restore does, gives each claim its own host resources, is
//! retired when its template changes, and leaves nothing behind when attaching fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Output, collect, kvm_usable, run, run_command};

const T: Duration = Duration::from_secs(120);
const PRELOADED: &str = "kata-snap: restore path: pool, template pre-loaded (pre-started VMM pid ";

/// A pool with `preload` shells pre-loaded with `template` (in `mode`) and one plain shell.
struct Pool(PathBuf);

impl Pool {
    fn start(dir: &Path, template: &Path, mode: &str, preload: u32) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["pool", "start", "--size", "1", "--mem-mib", "256"])
            .args(["--preload-size", &preload.to_string(), "--template"])
            .arg(template)
            .args(["--template-mode", mode])
            .env("KATA_SNAP_POOL_DIR", dir)
            .stdin(Stdio::null());
        let out = run_command(cmd, T);
        assert_eq!(out.code(), 0, "{}", out.stderr);
        Self(dir.to_path_buf())
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("KATA_SNAP_POOL_DIR", &self.0)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        run_command(self.command(args), T)
    }

    /// Pre-loaded shells ready: (socket name, pid).
    fn preloaded(&self) -> Vec<(String, i32)> {
        std::fs::read_dir(self.0.join("ready"))
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                let pid = name
                    .strip_suffix(".sock")?
                    .rsplit('-')
                    .next()?
                    .parse()
                    .ok()?;
                name.starts_with('t').then_some((name, pid))
            })
            .collect()
    }

    /// Waits until `n` pre-loaded shells are ready for which `ok` holds.
    fn wait_preloaded(&self, n: usize, ok: impl Fn(&(String, i32)) -> bool) -> Vec<(String, i32)> {
        let end = Instant::now() + T;
        loop {
            let ready: Vec<_> = self.preloaded().into_iter().filter(|p| ok(p)).collect();
            if ready.len() >= n {
                return ready;
            }
            assert!(Instant::now() < end, "no {n} pre-loaded shells: {ready:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.run(&["pool", "stop"]);
    }
}

/// A client killed with the test if an assertion fails first.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether process `pid` is gone (or a zombie of another parent).
fn gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

fn wait_gone(pid: i32, what: &str) {
    let end = Instant::now() + T;
    while !gone(pid) {
        assert!(Instant::now() < end, "{what} (pid {pid}) did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VMM pid a `--timing` restore through a pre-loaded shell names.
fn preloaded_pid(stderr: &str) -> Option<i32> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(PRELOADED))
        .and_then(|p| p.trim_end_matches(')').parse().ok())
}

/// A compute-guest template at `snap` (stopped at READY mid-way through `iters` iterations):
/// returns (output before the snapshot, output of an uninterrupted run).
fn compute_template(snap: &Path, iters: u64) -> (String, String) {
    let cmdline = format!("iters={iters} ready_at=50");
    let uninterrupted = run(
        &["boot", "--kernel", "builtin:compute", "--cmdline", &cmdline],
        T,
    );
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
    (before.stdout, uninterrupted.stdout)
}

#[test]
fn test_preloaded_claim_runs_the_guest_as_a_cold_restore_in_every_mode() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let snap = root.path().join("compute");
    let (before, uninterrupted) = compute_template(&snap, 30_000);
    let rec = run(
        &[
            "restore",
            "--no-pool",
            "--snapshot",
            snap.to_str().unwrap(),
            "--record-workingset",
            snap.join("workingset").to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(rec.code(), 0, "{}", rec.stderr);
    for mode in ["mmap-prefetch", "uffd", "uffd-prefetch", "eager", "mmap"] {
        let pool = Pool::start(&root.path().join(format!("pool-{mode}")), &snap, mode, 1);
        pool.wait_preloaded(1, |_| true);
        let out = pool.run(&[
            "restore",
            "--timing",
            "--mode",
            mode,
            "--snapshot",
            snap.to_str().unwrap(),
        ]);
        assert_eq!(out.code(), 0, "{mode}: {}", out.stderr);
        assert!(
            preloaded_pid(&out.stderr).is_some(),
            "{mode}: {}",
            out.stderr
        );
        assert_eq!(
            format!("{before}{}", out.stdout),
            uninterrupted,
            "{mode}: the guest continues exactly as uninterrupted"
        );
    }
}

#[test]
fn test_two_preloaded_claims_of_one_template_get_their_own_disks() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tmpl = root.path().join("template");
    // The template's disk slot is empty when the guest probes it and says READY.
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:virtioblk",
            "--mem-mib",
            "256",
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
    let pool = Pool::start(&root.path().join("pool"), &tmpl, "mmap", 2);
    pool.wait_preloaded(2, |_| true);
    let images: Vec<PathBuf> = ["ONE", "TWO"]
        .iter()
        .map(|tag| {
            let mut d = vec![0u8; 1 << 20];
            d[..16].copy_from_slice(format!("HELLO-FROM-{tag}!!").as_bytes());
            let path = root.path().join(format!("{tag}.img"));
            std::fs::write(&path, d).unwrap();
            path
        })
        .collect();
    // Both at once: two pre-loaded shells run side by side.
    let children: Vec<Child> = images
        .iter()
        .map(|img| {
            let slot = format!("rootfs={}", img.display());
            pool.command(&[
                "restore",
                "--timing",
                "--mode",
                "mmap",
                "--snapshot",
                tmpl.to_str().unwrap(),
                "--disk-slot",
                &slot,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut pids = Vec::new();
    for (child, tag) in children.into_iter().zip(["ONE", "TWO"]) {
        let out = collect(child, T, "a restore");
        assert!(out.status.success(), "{}", out.stderr);
        pids.push(preloaded_pid(&out.stderr).expect(&out.stderr));
        assert!(
            out.stdout
                .starts_with("virtioblk: after ready: capacity=2048 config-changed\n"),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout
                .contains(&format!("read sector 0 status=0 data=HELLO-FROM-{tag}!!")),
            "each clone reads its own disk: {}",
            out.stdout
        );
    }
    assert_ne!(pids[0], pids[1], "two claims, two shells");
    for img in &images {
        let data = std::fs::read(img).unwrap();
        assert_eq!(
            &data[512..528],
            b"KATA-SNAP-WROTE!",
            "each clone wrote its own disk"
        );
    }
}

/// A spinning guest with a vsock device and an empty disk slot, snapshotted at READY.
fn spin_template(root: &Path) -> PathBuf {
    let tmpl = root.join("spin");
    let vsock = format!("3,{}", root.join("template-vsock.sock").display());
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:spin",
            "--mem-mib",
            "256",
            "--vsock",
            &vsock,
            "--disk-slot",
            "rootfs",
            "--snapshot-on-ready",
            tmpl.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    tmpl
}

#[test]
fn test_two_preloaded_claims_listen_on_their_own_sockets() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tmpl = spin_template(root.path());
    let pool = Pool::start(&root.path().join("pool"), &tmpl, "mmap", 2);
    pool.wait_preloaded(2, |_| true);
    let clones: Vec<(Client, PathBuf, PathBuf, PathBuf)> = ["a", "b"]
        .iter()
        .map(|n| {
            let vsock = root.path().join(format!("{n}.vsock"));
            let api = root.path().join(format!("{n}.api"));
            let err = root.path().join(format!("{n}.err"));
            let child = pool
                .command(&[
                    "restore",
                    "--timing",
                    "--mode",
                    "mmap",
                    "--snapshot",
                    tmpl.to_str().unwrap(),
                    "--vsock",
                    vsock.to_str().unwrap(),
                    "--api-sock",
                    api.to_str().unwrap(),
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&err).unwrap())
                .spawn()
                .unwrap();
            (Client(child), vsock, api, err)
        })
        .collect();
    let end = Instant::now() + T;
    let mut pids = Vec::new();
    for (_, vsock, api, err) in &clones {
        let pid = loop {
            let text = std::fs::read_to_string(err).unwrap_or_default();
            if let Some(pid) = preloaded_pid(&text) {
                break pid;
            }
            assert!(Instant::now() < end, "no pre-loaded restore: {text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        pids.push(pid);
        // Its own vsock socket, bound by its own VMM, and its own control socket.
        std::os::unix::net::UnixStream::connect(vsock).expect("the clone's vsock socket");
        let status = run(
            &["vm", "status", "--api-sock", api.to_str().unwrap()],
            Duration::from_secs(20),
        );
        assert_eq!(status.code(), 0, "{}", status.stderr);
        assert!(
            status.stdout.contains(&format!("\"pid\": {pid},")),
            "each control socket is its own VMM's: {}",
            status.stdout
        );
    }
    assert_ne!(pids[0], pids[1]);
    assert!(
        !root.path().join("template-vsock.sock").exists(),
        "no clone binds the template's own socket"
    );
    // The client bound its sockets (a jailed shell cannot): killed outright, it leaves their
    // names, which lead nowhere once its VMM is gone (the next restore there replaces them; the
    // VMM's io_uring may hold a listener a moment after the process is gone).
    for ((child, vsock, api, _), pid) in clones.into_iter().zip(pids) {
        drop(child);
        wait_gone(pid, "a pooled VMM whose client was killed");
        let end = Instant::now() + T;
        for s in [&vsock, &api] {
            while std::os::unix::net::UnixStream::connect(s).is_ok() {
                assert!(
                    Instant::now() < end,
                    "{} still leads somewhere",
                    s.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn test_a_changed_template_retires_its_preloaded_shells() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let snap = root.path().join("compute");
    compute_template(&snap, 30_000);
    let pool = Pool::start(&root.path().join("pool"), &snap, "mmap", 1);
    let old = pool.wait_preloaded(1, |_| true);
    let (old_name, old_pid) = old[0].clone();
    // The template is made again at the same path (as a re-warmed template is): another guest.
    std::fs::remove_dir_all(&snap).unwrap();
    let (before, uninterrupted) = compute_template(&snap, 40_000);
    wait_gone(old_pid, "the shell of the old template");
    let new = pool.wait_preloaded(1, |(n, _)| {
        n.split('-').next() != old_name.split('-').next()
    });
    let out = pool.run(&[
        "restore",
        "--timing",
        "--mode",
        "mmap",
        "--snapshot",
        snap.to_str().unwrap(),
    ]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(preloaded_pid(&out.stderr), Some(new[0].1), "{}", out.stderr);
    assert_eq!(
        format!("{before}{}", out.stdout),
        uninterrupted,
        "the new template's guest runs"
    );
}

#[test]
fn test_a_failed_attach_leaves_no_shell_behind() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tmpl = spin_template(root.path());
    let pool = Pool::start(&root.path().join("pool"), &tmpl, "mmap", 1);
    let (_, shell) = pool.wait_preloaded(1, |_| true)[0].clone();
    let vsock = root.path().join("clone.vsock");
    // The vsock socket is bound, then the unknown disk slot fails the attach.
    let slot = format!("nope={}", tmpl.join("state").display());
    let out = pool.run(&[
        "restore",
        "--timing",
        "--mode",
        "mmap",
        "--snapshot",
        tmpl.to_str().unwrap(),
        "--vsock",
        vsock.to_str().unwrap(),
        "--disk-slot",
        &slot,
    ]);
    assert_ne!(out.code(), 0);
    assert!(
        out.stderr
            .contains("the snapshot has no spare disk slot named \"nope\""),
        "{}",
        out.stderr
    );
    wait_gone(shell, "the shell whose attach failed");
    assert!(!vsock.exists(), "the clone's vsock socket is removed");
    let claimed: Vec<_> = std::fs::read_dir(pool.0.join("claimed")).unwrap().collect();
    assert!(claimed.is_empty(), "{claimed:?}");
    // The pool refills, and the next claim runs.
    let (_, next) = pool.wait_preloaded(1, |&(_, pid)| pid != shell)[0].clone();
    let api = root.path().join("clone.api");
    let child = pool
        .command(&[
            "restore",
            "--mode",
            "mmap",
            "--snapshot",
            tmpl.to_str().unwrap(),
            "--vsock",
            vsock.to_str().unwrap(),
            "--api-sock",
            api.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _client = Client(child);
    let end = Instant::now() + T;
    while !(vsock.exists() && api.exists()) {
        assert!(Instant::now() < end, "the next claim did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!gone(next));
    assert!(
        !pool.preloaded().iter().any(|&(_, pid)| pid == next),
        "claimed"
    );
}
