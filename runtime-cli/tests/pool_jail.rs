//! The jail of a root pool's shells (issue 21): each pre-started VMM runs jailed from its start
//! (no capabilities, a uid of its own from the allocator, named as a pool shell, its own mount
//! namespace with nothing of the host's, only its own descriptors); a container restored in one
//! adopts its uid and its supervisor is jailed too; a restore by hand still goes through the
//! pool; every uid goes back after `delete` and after `pool stop`. As root with KVM.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::runtime_env::{Env, T, fds_of, field, mounts_of, process_alive, status_of, usable};
use common::{BIN, run, run_command};

/// The tests' uid range: none of the host's, none of `tests/jail.rs`'s.
const UID_BASE: u32 = 3_700_200_000;

/// A pool in `env.pool`, its shells' uids in `env`'s state root; stopped on drop.
struct Pool<'a>(&'a Env);

impl<'a> Pool<'a> {
    fn start(env: &'a Env, size: u32) -> Self {
        let o = env.run(&[
            "pool",
            "start",
            "--size",
            &size.to_string(),
            "--mem-mib",
            "256",
        ]);
        assert_eq!(o.code(), 0, "{o:?}");
        Self(env)
    }

    /// The ready shells' pids.
    fn ready(&self) -> Vec<i32> {
        let mut v: Vec<i32> = fs::read_dir(self.0.pool.join("ready"))
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".sock")?.rsplit('-').next()?.parse().ok()
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["pool", "stop"]);
    }
}

fn uid_of(pid: i32) -> u32 {
    let uids: Vec<u32> = field(&status_of(pid), "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|&u| u == uids[0]), "{uids:?}");
    uids[0]
}

/// Asserts `pid` runs jailed: no capabilities, no new privileges, a uid of the tests' range,
/// its own mount namespace. Returns its uid.
fn assert_jailed(pid: i32, what: &str) -> u32 {
    let st = status_of(pid);
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&st, cap), "0000000000000000", "{what}: {cap}");
    }
    assert_eq!(field(&st, "NoNewPrivs"), "1", "{what}");
    assert_eq!(field(&st, "Groups"), "", "{what}");
    let uid = uid_of(pid);
    assert!(
        (UID_BASE..UID_BASE + 65_536).contains(&uid),
        "{what}: uid {uid} is not of the config's range"
    );
    let ns = |p: &str| fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(&pid.to_string()),
        ns("self"),
        "{what}: same mount namespace"
    );
    uid
}

fn uid_files(env: &Env) -> Vec<(u32, String)> {
    let Ok(rd) = fs::read_dir(env.root().join("jail@uids")) else {
        return Vec::new();
    };
    let mut v: Vec<(u32, String)> = rd
        .flatten()
        .filter_map(|e| {
            let uid = e.file_name().to_str()?.parse().ok()?;
            Some((uid, fs::read_to_string(e.path()).ok()?))
        })
        .collect();
    v.sort();
    v
}

/// Whether a uid file names container `id` or pool shell `shell` (a freed uid is taken again
/// by the shell that refills the pool: the number alone says nothing).
fn uid_held_by(env: &Env, id: Option<&str>, shell: Option<i32>) -> bool {
    uid_files(env).iter().any(|(_, f)| {
        let v: serde_json::Value = serde_json::from_str(f).unwrap_or_default();
        id.is_some_and(|id| v["id"] == id) || shell.is_some_and(|p| v["pool"]["pid"] == p)
    })
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + T;
    while !ok() {
        assert!(std::time::Instant::now() < end, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn test_pool_shells_are_jailed_and_their_uids_go_back_at_pool_stop() {
    if !usable() {
        return;
    }
    let mut env = Env::new(serde_json::json!({"testGuest": "agent", "jailUidBase": UID_BASE}));
    env.pool = env.dir.path().join("pool");
    let pool = Pool::start(&env, 2);
    let shells = pool.ready();
    assert_eq!(shells.len(), 2, "{shells:?}");
    let mut uids = Vec::new();
    for &pid in &shells {
        let uid = assert_jailed(pid, "pool shell");
        uids.push(uid);
        // Nothing of the host in its mount namespace.
        let (points, root_opts) = mounts_of(pid);
        assert_eq!(points, ["/", "/dev/null", "/dev/urandom"], "mounts");
        assert!(root_opts.starts_with("ro,"), "{root_opts}");
        // Only its own descriptors: stdio (/dev/null, its `ready` pipe, the pool's log), its
        // socket, the devices it opened before the jail and its VM's.
        let log = env.pool.join("manager.log");
        for (fd, target) in fds_of(pid) {
            let known = matches!(
                target.as_str(),
                "/dev/null" | "/dev/kvm" | "/dev/userfaultfd"
            ) || target == log.to_string_lossy()
                || target.starts_with("anon_inode:")
                || target.starts_with("socket:")
                || target.starts_with("pipe:");
            assert!(known, "shell {pid}: fd {fd} -> {target}");
        }
        // Named as a pool shell in the allocator.
        let file = fs::read_to_string(env.root().join("jail@uids").join(uid.to_string())).unwrap();
        let v: serde_json::Value = serde_json::from_str(&file).unwrap();
        assert_eq!(v["pool"]["pid"], pid, "{file}");
        assert_eq!(v["pool"]["dir"], env.pool.to_str().unwrap(), "{file}");
    }
    assert_ne!(uids[0], uids[1], "two shells share a uid");
    drop(pool);
    for pid in shells {
        wait_for("a shell outlives pool stop", || !process_alive(pid));
    }
    assert_eq!(uid_files(&env), [], "uids stay allocated after pool stop");
}

#[test]
fn test_a_container_through_a_jailed_pool_adopts_the_shells_uid_and_runs_jailed() {
    if !usable() {
        return;
    }
    let mut env =
        Env::new(serde_json::json!({"testGuest": "agent", "jailUidBase": UID_BASE + 100}));
    env.pool = env.dir.path().join("pool");
    let b = env.bundle("b", &["sh", "-c", "echo through the pool; exit 5"]);
    // The template warms on a first (cold) run; the pool then restores its containers.
    let o = env.run(&["run", "--bundle", b.to_str().unwrap(), "warm"]);
    assert_eq!(o.code(), 5, "{o:?}");
    let pool = Pool::start(&env, 1);
    let shells = pool.ready();
    let shell_uid = uid_of(shells[0]);
    let (pid, out) = env.create(&b, "c1");
    // Its VM is in the shell it claimed, which still runs (jailed) for it.
    assert!(process_alive(shells[0]), "the claimed shell is gone");
    let uid = assert_jailed(pid, "supervisor");
    assert_eq!(
        uid, shell_uid,
        "the container did not adopt its shell's uid"
    );
    assert_eq!(assert_jailed(shells[0], "pooled VMM"), uid);
    let (points, _) = mounts_of(pid);
    assert_eq!(
        points,
        ["/", "/container", "/dev/null", "/dev/urandom"],
        "the pooled supervisor's mounts"
    );
    for (fd, target) in fds_of(pid) {
        let known = fd <= 2
            || matches!(target.as_str(), "/dev/null")
            || target.starts_with("anon_inode:")
            || target.starts_with("socket:")
            || target.starts_with("pipe:")
            // The image's lease, taken before the jail by its host path.
            || target.ends_with(".erofs");
        assert!(known, "supervisor: fd {fd} -> {target}");
    }
    // The uid is the container's now, and its directory is the uid's.
    let file = fs::read_to_string(env.root().join("jail@uids").join(uid.to_string())).unwrap();
    let v: serde_json::Value = serde_json::from_str(&file).unwrap();
    assert_eq!(v["id"], "c1", "{file}");
    assert!(v.get("pool").is_none(), "{file}");
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(env.root().join("c1")).unwrap().uid(), uid);
    }
    // It runs, prints, exits with its status; delete gives the uid back.
    env.start_wait_delete("c1", pid);
    assert_eq!(fs::read_to_string(&out).unwrap(), "through the pool\n");
    let o = env.run(&["state", "c1"]);
    assert_ne!(o.code(), 0);
    wait_for("the claimed shell outlives its container", || {
        !process_alive(shells[0])
    });
    wait_for("the container's uid given back", || {
        !uid_held_by(&env, Some("c1"), None)
    });
    // A foreground run through the pool: the same.
    let o = env.run(&["--debug", "run", "--bundle", b.to_str().unwrap(), "r1"]);
    assert_eq!(o.code(), 5, "{o:?}");
    assert_eq!(o.stdout, "through the pool\n");
    assert!(o.stderr.contains("restore path: pool"), "{}", o.stderr);
    assert!(o.stderr.contains("(its pre-started VMM's)"), "{}", o.stderr);
    drop(pool);
    assert_eq!(uid_files(&env), [], "uids stay allocated");
}

/// A compute snapshot (256 MiB class) in `dir` and what a cold restore of it prints.
fn compute_snapshot(dir: &Path) -> (PathBuf, String) {
    let snap = dir.join("compute");
    let boot = run(
        &[
            "boot",
            "--kernel",
            "builtin:compute",
            "--cmdline",
            "iters=30000 ready_at=50",
            "--mem-mib",
            "256",
            "--snapshot-on-ready",
            snap.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(boot.code(), 0, "{}", boot.stderr);
    let cold = run(
        &["restore", "--no-pool", "--snapshot", snap.to_str().unwrap()],
        T,
    );
    assert_eq!(cold.code(), 0, "{}", cold.stderr);
    (snap, cold.stdout)
}

#[test]
fn test_a_restore_by_hand_goes_through_a_jailed_pool() {
    if !usable() {
        return;
    }
    let mut env = Env::new(serde_json::json!({"jailUidBase": UID_BASE + 200}));
    env.pool = env.dir.path().join("pool");
    let (snap, cold) = compute_snapshot(env.dir.path());
    let pool = Pool::start(&env, 1);
    let shell = pool.ready()[0];
    assert_jailed(shell, "pool shell");
    let log = env.dir.path().join("serial.log");
    let mut c = Command::new(BIN);
    c.env("KATA_SNAP_CONFIG", env.dir.path().join("config.json"))
        .env("KATA_SNAP_POOL_DIR", &env.pool)
        .args(["restore", "--timing", "--snapshot", snap.to_str().unwrap()])
        .arg("--serial-log")
        .arg(&log);
    let o = run_command(c, T);
    assert_eq!(o.code(), 0, "{o:?}");
    assert!(
        o.stderr
            .contains(&format!("restore path: pool (pre-started VMM pid {shell})")),
        "{}",
        o.stderr
    );
    // The shell wrote the log it was handed (it could not open the path).
    assert_eq!(fs::read_to_string(&log).unwrap(), cold);
    wait_for("the shell outlives its restore", || !process_alive(shell));
    wait_for("the shell's uid given back", || {
        !uid_held_by(&env, None, Some(shell))
    });
    drop(pool);
}
