//! The local attacks of issue 21, each tried as another local user would, and the checks that stop
//! them: a state root or pool directory must be private to the caller (no `/tmp` fallback), a pool
//! shell must run as the caller or root (`SO_PEERCRED`) before it gets the caller's stdio, and
//! `delete`/`kill` signal only the process a record names with its start time, never follow a
//! symbolic link out of the state root, and clean up whatever is in a container's place.
//!
//! The users: a victim and an attacker, created here (`useradd`) when the tests run as root; as
//! anyone else the tests that need them print SKIPPED. The attacker's files and sockets are made
//! by a thread of this process running with the attacker's credentials (Linux credentials are
//! per thread at the syscall level), so they are owned by the attacker and `SO_PEERCRED` names
//! the attacker, as for a process of theirs.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{BIN, Output, kvm_usable, run, run_command};

const T: Duration = Duration::from_secs(60);

/// Tests that plant things in `/tmp/kata-snap-UID` (the old fallback, one path per uid) take
/// turns.
static TMP_FALLBACK: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, Copy)]
struct User {
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone, Copy)]
struct Users {
    victim: User,
    attacker: User,
}

fn user(name: &str) -> Option<User> {
    let exists = |name: &str| nix::unistd::User::from_name(name).ok().flatten();
    if exists(name).is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .output();
        match out {
            Ok(o) if o.status.success() || exists(name).is_some() => {}
            Ok(o) => {
                println!(
                    "SKIPPED: useradd {name} failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                println!("SKIPPED: cannot run useradd: {e}");
                return None;
            }
        }
    }
    let u = exists(name)?;
    Some(User {
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    })
}

/// The victim and the attacker, or None (SKIPPED printed) when they cannot be made.
fn users() -> Option<Users> {
    static USERS: OnceLock<Option<Users>> = OnceLock::new();
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: not root: cannot create the victim and attacker users");
        return None;
    }
    let u = *USERS.get_or_init(|| {
        Some(Users {
            victim: user("kssnap-victim")?,
            attacker: user("kssnap-attacker")?,
        })
    });
    if u.is_none() {
        println!("SKIPPED: the victim and attacker users could not be made");
    }
    u
}

/// `kata-snap ARGS` as `who`, with an environment that names no state root or pool directory
/// (no `XDG_RUNTIME_DIR`, no `KATA_SNAP_POOL_DIR`) unless `env` adds one.
fn ks_as(who: User, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/nonexistent")
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .current_dir("/")
        .uid(who.uid)
        .gid(who.gid)
        .args(args);
    run_command(c, T)
}

/// `kata-snap ARGS` as this (root) process, with `env`.
fn ks(env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.env_remove("XDG_RUNTIME_DIR")
        .env_remove("KATA_SNAP_POOL_DIR")
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .args(args);
    run_command(c, T)
}

/// The message of a runc-style error line, or the line itself.
fn msg(o: &Output) -> String {
    let line = o.stderr.lines().last().unwrap_or_default();
    match line.split_once(" msg=") {
        Some((_, m)) => serde_json::from_str::<String>(m).unwrap_or_else(|_| m.to_string()),
        None => line.to_string(),
    }
}

/// Runs `f` on a new thread with `who`'s credentials (raw syscalls: only that thread changes)
/// and returns its result.
fn spawn_as<R: Send + 'static>(who: User, f: impl FnOnce() -> R + Send + 'static) -> JoinHandle<R> {
    std::thread::spawn(move || {
        // Raw syscalls: each changes the credentials of the calling thread only (glibc's
        // wrappers would change every thread's).
        // SAFETY: setgroups(0, NULL) takes no memory.
        let rc = unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) };
        assert_eq!(rc, 0, "setgroups");
        // SAFETY: setresgid with plain ids.
        let rc = unsafe { libc::syscall(libc::SYS_setresgid, who.gid, who.gid, who.gid) };
        assert_eq!(rc, 0, "setresgid");
        // SAFETY: setresuid with plain ids.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, who.uid, who.uid, who.uid) };
        assert_eq!(rc, 0, "setresuid");
        f()
    })
}

fn as_user<R: Send + 'static>(who: User, f: impl FnOnce() -> R + Send + 'static) -> R {
    spawn_as(who, f).join().unwrap()
}

/// Makes `dir` and its missing parents, each mode `mode`, as the calling thread's user.
fn mkdirs(dir: &Path, mode: u32) {
    let mut p = PathBuf::new();
    for c in dir.components() {
        p.push(c);
        if !p.exists() {
            fs::create_dir(&p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
    }
}

/// What a planted listener got.
#[derive(Debug, Default)]
struct Received {
    connections: usize,
    bytes: usize,
    fds: usize,
}

/// A Unix socket listening at `path`, bound by the attacker (its directories made by them,
/// mode 0777 as a careless or hostile owner leaves them), recording what connects to it.
struct Planted {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Received>>,
}

impl Planted {
    fn listen(attacker: User, path: &Path, make_dirs: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_owned();
        let stop2 = stop.clone();
        let thread = spawn_as(attacker, move || {
            if make_dirs {
                mkdirs(path.parent().unwrap(), 0o777);
                mkdirs(
                    &path.parent().unwrap().parent().unwrap().join("claimed"),
                    0o777,
                );
            }
            let l = UnixListener::bind(&path).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let mut got = Received::default();
            while !stop2.load(Ordering::Relaxed) {
                let Ok((conn, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                got.connections += 1;
                conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = vec![0u8; 64 << 10];
                let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 3]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                if let Ok(m) = nix::sys::socket::recvmsg::<()>(
                    conn.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    got.bytes += m.bytes;
                    for c in m.cmsgs().into_iter().flatten() {
                        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                            got.fds += fds.len();
                            for fd in fds {
                                let _ = nix::unistd::close(fd);
                            }
                        }
                    }
                }
            }
            got
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the planted listener did not start");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Received {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A process of `who` that stands for something of theirs a forged record names.
struct Bystander(Child);

impl Bystander {
    fn start(who: Option<User>) -> Self {
        let mut c = Command::new("sleep");
        c.arg("600").stdin(Stdio::null());
        if let Some(u) = who {
            c.uid(u.uid).gid(u.gid);
        }
        Self(c.spawn().unwrap())
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn start_time(&self) -> u64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(19)
            .unwrap()
            .parse()
            .unwrap()
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A container record naming `pid` (started at `start`) as its supervisor.
fn record(id: &str, pid: i32, start: u64) -> String {
    serde_json::json!({
        "id": id,
        "bundle": "/bundles/x",
        "rootfs": "/bundles/x/rootfs",
        "created": "2026-11-27T19:25:34.000000000Z",
        "annotations": {},
        "pid": pid,
        "pid_start": start,
        "status": "running",
        "exit_code": null,
    })
    .to_string()
}

/// The old fallback directory of `uid`, emptied (it is shared by every run on this host).
fn tmp_fallback(uid: u32) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/kata-snap-{uid}"));
    let _ = fs::remove_dir_all(&d);
    d
}

/// A directory the victim owns, holding something precious, with a world-readable parent.
fn victim_home(t: &Path, victim: User) -> PathBuf {
    fs::set_permissions(t, fs::Permissions::from_mode(0o755)).unwrap();
    let home = t.join("home");
    fs::create_dir_all(home.join("precious")).unwrap();
    fs::write(home.join("precious/thesis.tex"), b"years of work").unwrap();
    for p in [
        &home,
        &home.join("precious"),
        &home.join("precious/thesis.tex"),
    ] {
        std::os::unix::fs::chown(p, Some(victim.uid), Some(victim.gid)).unwrap();
    }
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    home
}

/// A snapshot (builtin:ready, 64 MiB) that every user can read.
fn readable_snapshot(t: &Path) -> PathBuf {
    let snap = t.join("snap");
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
    fs::set_permissions(t, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&snap)
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    snap
}

/// Attack 1: a socket planted in the victim's pool directory. Before, a non-root user's pool
/// directory fell back to `/tmp/kata-snap-UID/pool`, which anyone could make first: the
/// attacker's listener received the victim's stdin, stdout and stderr from `kata-snap restore`.
#[test]
fn test_a_pool_socket_planted_in_the_old_tmp_fallback_gets_nothing() {
    let Some(u) = users() else { return };
    if !kvm_usable() {
        // The snapshot whose shape the client reads is made by booting a guest.
        return;
    }
    let _turn = TMP_FALLBACK.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let snap = readable_snapshot(t.path());
    // The victim can read the snapshot: the client gets as far as looking for a pool.
    let readable = Command::new("test")
        .arg("-r")
        .arg(snap.join("state"))
        .uid(u.victim.uid)
        .gid(u.victim.gid)
        .status()
        .unwrap();
    assert!(
        readable.success(),
        "the victim must be able to read the snapshot"
    );

    let fallback = tmp_fallback(u.victim.uid);
    let planted = Planted::listen(
        u.attacker,
        &fallback.join("pool/ready/v1-m64-4242.sock"),
        true,
    );
    // The victim restores with no pool directory named: no pool is used (and this one cannot
    // open /dev/kvm, so the cold start fails; what matters is what the listener got).
    let out = ks_as(
        u.victim,
        &[],
        &["restore", "--timing", "--snapshot", snap.to_str().unwrap()],
    );
    let got = planted.finish();
    assert_eq!(got.connections, 0, "{got:?}: {out:?}");
    assert_eq!(got.fds, 0, "{got:?}: {out:?}");
    assert!(!out.stderr.contains("restore path: pool"), "{out:?}");
    // The attacker's pool directory named outright: refused in one line, nothing sent.
    let planted = Planted::listen(
        u.attacker,
        &fallback.join("pool/ready/v1-m64-4243.sock"),
        false,
    );
    let pool = fallback.join("pool");
    let out = ks_as(
        u.victim,
        &[("KATA_SNAP_POOL_DIR", &pool)],
        &["restore", "--timing", "--snapshot", snap.to_str().unwrap()],
    );
    out.assert_one_line_error(&format!(
        "the pool directory {} is inside {}, which is owned by uid {}",
        pool.display(),
        fallback.display(),
        u.attacker.uid
    ));
    let got = planted.finish();
    assert_eq!(got.connections, 0, "{got:?}");
    let _ = fs::remove_dir_all(&fallback);
}

/// Attack 1, the last wall: a socket in the caller's own (private) pool directory whose listener
/// runs as another user is refused before anything is sent (`SO_PEERCRED`), and the restore
/// starts cold instead.
#[test]
fn test_a_pool_shell_of_another_user_is_refused_by_its_peer_uid() {
    let Some(u) = users() else { return };
    if !kvm_usable() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let snap = readable_snapshot(t.path());
    // Our pool directory, private; the attacker's listener is bound in a directory of theirs and
    // its socket moved into ours (as if it had got there: the peer check must still hold).
    let pool = t.path().join("pool");
    for d in [pool.clone(), pool.join("ready"), pool.join("claimed")] {
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
    }
    let theirs = t.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(u.attacker.uid), Some(u.attacker.gid)).unwrap();
    let bound = theirs.join("l.sock");
    let planted = Planted::listen(u.attacker, &bound, false);
    let in_pool = pool.join("ready/v1-m64-4244.sock");
    fs::rename(&bound, &in_pool).unwrap();
    assert_eq!(
        fs::symlink_metadata(&in_pool).unwrap().uid(),
        u.attacker.uid
    );

    let out = ks(
        &[("KATA_SNAP_POOL_DIR", &pool)],
        &["restore", "--timing", "--snapshot", snap.to_str().unwrap()],
    );
    let got = planted.finish();
    assert_eq!(got.bytes, 0, "{got:?}: {out:?}");
    assert_eq!(got.fds, 0, "{got:?}: {out:?}");
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "refusing pool shell {}: it runs as uid {}",
            pool.join("claimed/v1-m64-4244.sock").display(),
            u.attacker.uid
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("restore path: cold start"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout, "ready: done\n");
}

/// Attack 2: a symbolic link planted where the victim's state root would be. Before,
/// `/tmp/kata-snap-UID/containers` could be the attacker's link to the victim's home, and
/// `kata-snap delete --force precious` removed `~/precious`.
#[test]
fn test_delete_force_does_not_follow_a_planted_symlink_out_of_the_state_root() {
    let Some(u) = users() else { return };
    let _turn = TMP_FALLBACK.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let home = victim_home(t.path(), u.victim);
    let fallback = tmp_fallback(u.victim.uid);
    let (f, h) = (fallback.clone(), home.clone());
    as_user(u.attacker, move || {
        mkdirs(&f, 0o777);
        symlink(&h, f.join("containers")).unwrap();
    });
    // No state root named: the command says what to set and touches nothing.
    let out = ks_as(u.victim, &[], &["delete", "--force", "precious"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(
        msg(&out),
        "no state root: pass --root DIR or set XDG_RUNTIME_DIR (kata-snap keeps no state in /tmp)"
    );
    assert!(home.join("precious/thesis.tex").exists());
    // The attacker's link (in /tmp, which is sticky) named as the state root.
    let link = PathBuf::from(format!("/tmp/kata-snap-test-link-{}", std::process::id()));
    let _ = fs::remove_file(&link);
    let (l, h) = (link.clone(), home.clone());
    as_user(u.attacker, move || symlink(&h, &l).unwrap());
    let out = ks_as(
        u.victim,
        &[],
        &[
            "--root",
            link.to_str().unwrap(),
            "delete",
            "--force",
            "precious",
        ],
    );
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        msg(&out).contains(&format!(
            "is a symbolic link owned by uid {}",
            u.attacker.uid
        )),
        "{out:?}"
    );
    fs::remove_file(&link).unwrap();
    // The attacker's directory as the runtime directory above the state root.
    let out = ks_as(
        u.victim,
        &[("XDG_RUNTIME_DIR", &fallback)],
        &["delete", "--force", "precious"],
    );
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        msg(&out).contains(&format!("which is owned by uid {}", u.attacker.uid)),
        "{out:?}"
    );
    assert!(home.join("precious/thesis.tex").exists());
    let _ = fs::remove_dir_all(&fallback);
}

/// Attack 2 inside a private state root: whatever stands in a container's place (a symbolic
/// link to a directory elsewhere, a directory holding links, a FIFO record) is removed by
/// `delete --force` itself, and nothing it points to.
#[test]
fn test_delete_force_removes_links_and_fifos_in_the_root_without_following_them() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let outside = t.path().join("outside");
    fs::create_dir_all(outside.join("dir")).unwrap();
    fs::write(outside.join("file"), b"keep").unwrap();
    fs::write(outside.join("dir/file"), b"keep").unwrap();
    // The container's place is a link to a directory outside.
    symlink(outside.join("dir"), root.join("link")).unwrap();
    // A directory whose record and more are links out, beside a FIFO.
    let c = root.join("c");
    fs::create_dir(&c).unwrap();
    symlink(outside.join("file"), c.join("state.json")).unwrap();
    symlink(&outside, c.join("sub")).unwrap();
    nix::unistd::mkfifo(&c.join("c.sock"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    // A FIFO as the record.
    let f = root.join("fifo");
    fs::create_dir(&f).unwrap();
    nix::unistd::mkfifo(&f.join("state.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    // An oversized record (over the 4 MiB bound) and garbage.
    let big = root.join("big");
    fs::create_dir(&big).unwrap();
    fs::write(big.join("state.json"), vec![b' '; (4 << 20) + 10]).unwrap();
    let junk = root.join("junk");
    fs::create_dir(&junk).unwrap();
    fs::write(junk.join("state.json"), b"\x00\xff{").unwrap();

    let r = root.to_str().unwrap();
    for id in ["link", "c", "fifo", "big", "junk"] {
        // Without --force: an error, not a hang, and nothing removed.
        let out = ks(&[], &["--root", r, "delete", id]);
        assert_eq!(out.code(), 1, "{id}: {out:?}");
        assert!(fs::symlink_metadata(root.join(id)).is_ok(), "{id}");
        let out = ks(&[], &["--root", r, "delete", "--force", id]);
        assert_eq!(out.code(), 0, "{id}: {out:?}");
        assert!(fs::symlink_metadata(root.join(id)).is_err(), "{id} is left");
    }
    assert_eq!(fs::read(outside.join("file")).unwrap(), b"keep");
    assert_eq!(fs::read(outside.join("dir/file")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
}

/// Attack 3: a forged record. Before, the attacker's `state.json` in the victim's fallback state
/// root named an unrelated process of the victim, and `kata-snap delete` SIGKILLed it.
#[test]
fn test_a_forged_record_in_a_root_the_victim_does_not_own_kills_nothing() {
    let Some(u) = users() else { return };
    let _turn = TMP_FALLBACK.lock().unwrap_or_else(|e| e.into_inner());
    let mut bystander = Bystander::start(Some(u.victim));
    let forged = record("x", bystander.pid(), bystander.start_time());
    let fallback = tmp_fallback(u.victim.uid);
    let f = fallback.clone();
    as_user(u.attacker, move || {
        mkdirs(&f.join("containers/x"), 0o777);
        fs::write(f.join("containers/x/state.json"), forged).unwrap();
    });
    let root = fallback.join("containers");
    let r = root.to_str().unwrap();
    for args in [
        &["delete", "x"][..],
        &["delete", "--force", "x"],
        &["kill", "x", "KILL"],
    ] {
        // No state root named.
        let out = ks_as(u.victim, &[], args);
        assert_eq!(out.code(), 1, "{args:?}: {out:?}");
        assert!(msg(&out).starts_with("no state root"), "{args:?}: {out:?}");
        // The attacker's directory named.
        let mut with_root = vec!["--root", r];
        with_root.extend_from_slice(args);
        let out = ks_as(u.victim, &[], &with_root);
        assert_eq!(out.code(), 1, "{args:?}: {out:?}");
        assert!(
            msg(&out).contains(&format!(
                "is inside {}, which is owned by uid {}",
                fallback.display(),
                u.attacker.uid
            )),
            "{args:?}: {out:?}"
        );
        assert!(bystander.alive(), "{args:?} killed the bystander");
    }
    assert!(root.join("x/state.json").exists());
    let _ = fs::remove_dir_all(&fallback);
}

/// Attack 3 inside the caller's own root: a record whose pid is another process (a start time
/// that does not match it, or none) is removed by `delete` without a signal; a record naming
/// another container is not acted on as that container.
#[test]
fn test_records_that_do_not_match_their_process_get_nothing_killed() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let r = root.to_str().unwrap();
    let mut bystander = Bystander::start(None);
    let start = bystander.start_time();
    for (id, start) in [("reused", start + 1), ("nostart", 0)] {
        fs::create_dir(root.join(id)).unwrap();
        fs::write(
            root.join(id).join("state.json"),
            record(id, bystander.pid(), start),
        )
        .unwrap();
        let st = ks(&[], &["--root", r, "state", id]);
        assert!(
            st.stdout.contains("\"status\": \"stopped\""),
            "{id}: {st:?}"
        );
        let k = ks(&[], &["--root", r, "kill", id, "KILL"]);
        assert_eq!(msg(&k), "container not running", "{id}: {k:?}");
        let d = ks(&[], &["--root", r, "delete", id]);
        assert_eq!(d.code(), 0, "{id}: {d:?}");
        assert!(!root.join(id).exists(), "{id}");
        assert!(bystander.alive(), "{id}: the bystander was killed");
    }
    // A record naming another container: refused as that container, cleaned up by --force.
    fs::create_dir(root.join("a")).unwrap();
    fs::write(
        root.join("a/state.json"),
        record("../../elsewhere", bystander.pid(), start),
    )
    .unwrap();
    let st = ks(&[], &["--root", r, "state", "a"]);
    assert_eq!(st.code(), 1, "{st:?}");
    assert!(msg(&st).contains("names container"), "{st:?}");
    assert_eq!(ks(&[], &["--root", r, "list", "-q"]).stdout, "");
    let d = ks(&[], &["--root", r, "delete", "--force", "a"]);
    assert_eq!(d.code(), 0, "{d:?}");
    assert!(!root.join("a").exists());
    assert!(bystander.alive(), "the bystander was killed");
}

/// The state root's checks: no root named, one others may write to, one of another user; each
/// refused in one line naming the path and what is wrong, with nothing made.
#[test]
fn test_state_root_must_be_named_and_private() {
    let t = tempfile::tempdir().unwrap();
    let open = t.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    for args in [&["list"][..], &["state", "x"], &["delete", "--force", "x"]] {
        let mut a = vec!["--root", open.to_str().unwrap()];
        a.extend_from_slice(args);
        let out = ks(&[], &a);
        assert_eq!(out.code(), 1, "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
        assert_eq!(
            msg(&out),
            format!(
                "the state root {} is writable by group or others (mode 0777): it must be \
                 private (chmod 700)",
                open.display()
            )
        );
    }
    // A new root inside a directory others may write to (not sticky) is not made.
    let inside = open.join("containers");
    let out = ks(
        &[],
        &["--root", inside.to_str().unwrap(), "delete", "--force", "x"],
    );
    assert!(msg(&out).contains("which others may write to"), "{out:?}");
    assert!(!inside.exists());
    // A root made by the runtime is 0700, and every parent it makes.
    let made = t.path().join("a/b/root");
    let bundle = t.path().join("no-bundle");
    let out = ks(
        &[],
        &[
            "--root",
            made.to_str().unwrap(),
            "create",
            "--bundle",
            bundle.to_str().unwrap(),
            "c",
        ],
    );
    assert_eq!(out.code(), 1, "{out:?}");
    for p in [t.path().join("a"), t.path().join("a/b"), made.clone()] {
        assert_eq!(
            fs::metadata(&p).unwrap().mode() & 0o777,
            0o700,
            "{}",
            p.display()
        );
    }

    let Some(u) = users() else { return };
    // As a user without XDG_RUNTIME_DIR: no /tmp fallback, one line saying what to set.
    let out = ks_as(u.victim, &[], &["list"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(
        msg(&out),
        "no state root: pass --root DIR or set XDG_RUNTIME_DIR (kata-snap keeps no state in /tmp)"
    );
    // With it: the root is made there, private.
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let xdg = t.path().join("xdg");
    fs::create_dir(&xdg).unwrap();
    std::os::unix::fs::chown(&xdg, Some(u.victim.uid), Some(u.victim.gid)).unwrap();
    fs::set_permissions(&xdg, fs::Permissions::from_mode(0o700)).unwrap();
    let out = ks_as(
        u.victim,
        &[("XDG_RUNTIME_DIR", &xdg)],
        &["create", "--bundle", bundle.to_str().unwrap(), "c"],
    );
    assert_eq!(out.code(), 1, "{out:?}");
    let root = xdg.join("kata-snap/containers");
    let m = fs::metadata(&root).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (u.victim.uid, 0o700));
    // The victim's root, as another user: refused (here they cannot even look into it).
    let out = ks_as(u.attacker, &[], &["--root", root.to_str().unwrap(), "list"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(msg(&out).contains(&root.display().to_string()), "{out:?}");
}

/// The pool directory's checks: as for the state root, and `pool stop` signals only the manager
/// it names with that manager's start time.
#[test]
fn test_pool_dir_must_be_named_and_private_and_stop_checks_the_manager() {
    let t = tempfile::tempdir().unwrap();
    let open = t.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    for args in [
        &["pool", "status"][..],
        &["pool", "stop"],
        &["pool", "start", "--size", "1"],
    ] {
        let out = ks(&[("KATA_SNAP_POOL_DIR", &open)], args);
        out.assert_one_line_error(&format!(
            "the pool directory {} is writable by group or others (mode 0777)",
            open.display()
        ));
    }
    // A manager.json whose pid is now another process (its start time differs): not signalled.
    let pool = t.path().join("pool");
    fs::create_dir(&pool).unwrap();
    fs::set_permissions(&pool, fs::Permissions::from_mode(0o700)).unwrap();
    let mut bystander = Bystander::start(None);
    fs::write(pool.join("manager.pid"), bystander.pid().to_string()).unwrap();
    fs::write(
        pool.join("manager.json"),
        serde_json::json!({
            "size": 1, "vcpus": 1, "mem_mib": 256,
            "pid": bystander.pid(), "pid_start": bystander.start_time() + 1,
        })
        .to_string(),
    )
    .unwrap();
    let out = ks(&[("KATA_SNAP_POOL_DIR", &pool)], &["pool", "stop"]);
    out.assert_one_line_error(&format!("no pool is running in {}", pool.display()));
    assert!(
        bystander.alive(),
        "pool stop killed a process that is not the manager"
    );

    let Some(u) = users() else { return };
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = ks_as(u.victim, &[], &["pool", "status"]);
    out.assert_one_line_error(
        "no pool directory: pass --dir DIR or set KATA_SNAP_POOL_DIR or XDG_RUNTIME_DIR \
         (kata-snap keeps no pool in /tmp)",
    );
    // Someone else's pool directory.
    let out = ks_as(
        u.attacker,
        &[("KATA_SNAP_POOL_DIR", &pool)],
        &["pool", "status"],
    );
    out.assert_one_line_error(&format!(
        "the pool directory {} is owned by uid 0, not by you (uid {})",
        pool.display(),
        u.attacker.uid
    ));
}

/// A running pool's directory, subdirectories and sockets are private; `pool stop` stops it.
#[test]
fn test_a_running_pool_keeps_its_sockets_private() {
    if !kvm_usable() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pool = t.path().join("a/pool");
    let out = ks(
        &[("KATA_SNAP_POOL_DIR", &pool)],
        &["pool", "start", "--size", "1", "--mem-mib", "64"],
    );
    assert_eq!(out.code(), 0, "{out:?}");
    // Stopped however the test ends.
    struct Stop<'a>(&'a Path);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = ks(&[("KATA_SNAP_POOL_DIR", self.0)], &["pool", "stop"]);
        }
    }
    let _stop = Stop(&pool);
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    for d in [
        t.path().join("a"),
        pool.clone(),
        pool.join("ready"),
        pool.join("claimed"),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    let sockets: Vec<PathBuf> = fs::read_dir(pool.join("ready"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    assert_eq!(mode(&sockets[0]), 0o600);
    for f in ["manager.log", "manager.json", "manager.pid"] {
        assert_eq!(mode(&pool.join(f)) & 0o022, 0, "{f}");
    }
    let out = ks(&[("KATA_SNAP_POOL_DIR", &pool)], &["pool", "stop"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "pool stopped\n");
}

/// The pool's fault-injection hook (`KATA_SNAP_POOL_FAULT`) is not in a release binary.
#[test]
fn test_release_builds_carry_no_pool_fault_hook() {
    if cfg!(debug_assertions) {
        println!("SKIPPED: a debug build has the hook (tests/pool.rs uses it)");
        return;
    }
    let bin = fs::read(BIN).unwrap();
    let hook = b"KATA_SNAP_POOL_FAULT";
    assert!(
        !bin.windows(hook.len()).any(|w| w == hook),
        "the release binary reads KATA_SNAP_POOL_FAULT"
    );
}
