//! The jail of a container's supervisor (issue 21): what `/proc` shows of a created
//! container's supervisor (no capabilities, no new privileges, a uid of its own, its own mount
//! namespace holding only the jail's mounts, only the descriptors it needs), that the container
//! still runs, that uids are per container and given back, and that `"jail": false` turns it
//! off. With the built-in test guest `agent` (config `testGuest`), as root with KVM.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::runtime_env::{Env, fds_of, field, mounts_of, process_alive, status_of, usable};
/// The tests' uid range (the config's `jailUidBase`): none of the host's.
const UID_BASE: u32 = 3_700_000_000;

#[test]
fn test_a_created_containers_supervisor_is_jailed_and_the_container_runs() {
    if !usable() {
        return;
    }
    let env = Env::new(serde_json::json!({"testGuest": "agent", "jailUidBase": UID_BASE}));
    let b = env.bundle("b", &["sh", "-c", "echo from the jail; exit 0"]);
    // A descriptor without CLOEXEC in the engine: nothing of it may reach the supervisor.
    let planted = env.dir.path().join("planted-secret");
    fs::write(&planted, "x").unwrap();
    let f = fs::File::open(&planted).unwrap();
    nix::fcntl::fcntl(
        &f,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let (pid, out) = env.create(&b, "c1");
    drop(f);
    assert!(process_alive(pid));

    let st = status_of(pid);
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&st, cap), "0000000000000000", "{cap}: {st:?}");
    }
    assert_eq!(field(&st, "NoNewPrivs"), "1");
    let uids: Vec<u32> = field(&st, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    let gids: Vec<u32> = field(&st, "Gid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids.len(), 4);
    let uid = uids[0];
    assert!(uids.iter().all(|&u| u == uid), "{uids:?}");
    assert!(
        (UID_BASE..UID_BASE + 65_536).contains(&uid),
        "uid {uid} is not of the config's range"
    );
    assert!(gids.iter().all(|&g| g == uid), "{gids:?}");
    assert_eq!(field(&st, "Groups"), "");

    // Its own mount namespace, holding only the jail.
    let ns = |p: &str| fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"), "same mount namespace");
    let (points, root_opts) = mounts_of(pid);
    assert_eq!(
        points,
        [
            "/",
            "/container",
            "/dev/null",
            "/dev/urandom",
            "/rootfs.img",
            "/template"
        ],
        "mounts"
    );
    assert!(root_opts.starts_with("ro,"), "the jail's root: {root_opts}");

    // Only what it needs: the devices, the VM's anonymous files, sockets, pipes, the jail's
    // files, and the rootfs image's lease (taken before the jail, by its host path).
    let image_dir = env.dir.path().join("data/images");
    let template_dir = env.dir.path().join("data/templates");
    let mut kinds = std::collections::BTreeSet::new();
    for (fd, target) in fds_of(pid) {
        assert!(
            !target.contains("planted-secret"),
            "fd {fd} is the engine's {target}"
        );
        let known = fd <= 2
            || matches!(
                target.as_str(),
                "/dev/kvm" | "/dev/userfaultfd" | "/dev/null" | "/rootfs.img" | "/container/console.log"
            )
            // The template's memory file, read-only in the jail.
            || target.starts_with("/template/snapshot/")
            || target.starts_with("anon_inode:")
            || target.starts_with("socket:")
            || target.starts_with("pipe:")
            || (target.starts_with(image_dir.to_str().unwrap()) && target.ends_with(".erofs"))
            // The template's first container records its working set under this lock.
            || (target.starts_with(template_dir.to_str().unwrap()) && target.ends_with(".ws.lock"));
        assert!(known, "fd {fd} -> {target} is not one the supervisor needs");
        kinds.insert(target);
    }
    assert!(kinds.contains("/dev/kvm"), "{kinds:?}");
    assert!(kinds.contains("/rootfs.img"), "{kinds:?}");

    // The container's directory is the jail uid's, private; the uid is the container's.
    let m = fs::metadata(env.root().join("c1")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (uid, uid, 0o700));
    let uid_file = env.root().join("jail@uids").join(uid.to_string());
    assert!(uid_file.is_file(), "{} missing", uid_file.display());

    // The container still runs, and its uid goes back at delete.
    env.start_wait_delete("c1", pid);
    assert_eq!(fs::read_to_string(&out).unwrap(), "from the jail\n");
    assert!(!uid_file.exists(), "the uid stays allocated");
    assert_eq!(
        fs::read_dir(env.root()).unwrap().count(),
        0,
        "the state root is empty"
    );
}

#[test]
fn test_each_container_gets_its_own_uid_and_the_range_is_a_bound() {
    if !usable() {
        return;
    }
    let env = Env::new(
        serde_json::json!({"testGuest": "agent", "jailUidBase": UID_BASE + 100, "jailUidCount": 2}),
    );
    let b = env.bundle("b", &["true"]);
    let (p1, _) = env.create(&b, "a");
    let (p2, _) = env.create(&b, "b");
    let uid = |pid| field(&status_of(pid), "Uid");
    let (u1, u2) = (uid(p1), uid(p2));
    assert_ne!(u1, u2, "two containers share a uid");
    // Both uids of the range are taken.
    let o = env.run(&["create", "--bundle", b.to_str().unwrap(), "c"]);
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(o.stderr.contains("no free uid"), "{o:?}");
    assert!(!env.root().join("c").exists());
    // One given back: the next container gets it.
    env.start_wait_delete("a", p1);
    let (p3, _) = env.create(&b, "c");
    assert_eq!(uid(p3), u1);
    env.start_wait_delete("b", p2);
    env.start_wait_delete("c", p3);
    assert_eq!(
        fs::read_dir(env.root()).unwrap().count(),
        0,
        "the state root is empty"
    );
}

#[test]
fn test_run_in_the_foreground_is_jailed_and_leaves_nothing() {
    if !usable() {
        return;
    }
    let env = Env::new(serde_json::json!({"testGuest": "agent", "jailUidBase": UID_BASE + 200}));
    let b = env.bundle("b", &["sh", "-c", "echo hello; exit 7"]);
    let o = env.run(&["--debug", "run", "--bundle", b.to_str().unwrap(), "r1"]);
    assert_eq!(o.code(), 7, "{o:?}");
    assert_eq!(o.stdout, "hello\n");
    assert!(
        o.stderr
            .contains(&format!("jailed as uid {}", UID_BASE + 200)),
        "{}",
        o.stderr
    );
    assert!(
        !o.stderr.contains("level=warning msg=\"jail"),
        "{}",
        o.stderr
    );
    assert_eq!(
        fs::read_dir(env.root()).unwrap().count(),
        0,
        "the state root is empty"
    );
}

#[test]
fn test_jail_false_in_the_config_turns_it_off() {
    if !usable() {
        return;
    }
    let env = Env::new(serde_json::json!({"testGuest": "agent", "jail": false}));
    let b = env.bundle("b", &["true"]);
    let (pid, _) = env.create(&b, "c1");
    let st = status_of(pid);
    assert_eq!(field(&st, "Uid").split_whitespace().next(), Some("0"));
    let ns = |p: &str| fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_eq!(ns(&pid.to_string()), ns("self"));
    assert!(!env.root().join("jail@uids").exists());
    env.start_wait_delete("c1", pid);
}
