//! virtio-fs driven from the host-side driver harness against a temporary share.

use fuse_backend_rs::abi::fuse_abi::{
    Attr, AttrOut, CreateIn, EntryOut, GetattrIn, InHeader, InitIn, MkdirIn, ReadIn, SetattrIn,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::test_client::*;
use super::{Fs, FsLimits, FsShare};
use crate::virtio::test_utils::{Buf, Harness, test_memory};

#[test]
fn test_fs_config_space_has_tag_and_one_request_queue() {
    let h = fs_harness(None, false, FsLimits::default());
    let mut c = [0u8; 40];
    h.driver.read_config(0, &mut c);
    assert_eq!(&c[..7], b"share0\0");
    assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 1);
    assert!(super::check_tag("").is_err());
    assert!(super::check_tag(&"x".repeat(37)).is_err());
    assert!(super::check_tag("a,b").is_err());
    super::check_tag(&"x".repeat(36)).unwrap();
}

#[test]
fn test_fs_host_file_read_through_device() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"from the host").unwrap();
    let mut h = fs_harness(Some(dir.path()), false, FsLimits::default());
    init(&mut h);
    let e = lookup(&mut h, ROOT, "hello.txt").unwrap();
    assert_eq!(e.attr.size, 13);
    let g = GetattrIn::default();
    let (err, out) = call(&mut h, GETATTR, e.nodeid, g.as_slice(), 256);
    assert_eq!(err, 0);
    let a: AttrOut = obj(&out);
    assert_eq!(a.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let fh = open(&mut h, OPEN, e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(read(&mut h, e.nodeid, fh, 4096).unwrap(), b"from the host");
    // A host change is read back.
    std::fs::write(dir.path().join("hello.txt"), b"changed").unwrap();
    assert_eq!(read(&mut h, e.nodeid, fh, 4096).unwrap(), b"changed");
    assert!(h.device.fs_session_active());
}

#[test]
fn test_fs_create_write_mkdir_unlink_readdir_seen_on_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = fs_harness(Some(dir.path()), false, FsLimits::default());
    init(&mut h);
    let (e, fh) = create(&mut h, ROOT, "new.txt").unwrap();
    assert_eq!(write(&mut h, e.nodeid, fh, b"from the guest").unwrap(), 14);
    assert_eq!(
        std::fs::read(dir.path().join("new.txt")).unwrap(),
        b"from the guest"
    );
    let d = mkdir(&mut h, ROOT, "sub").unwrap();
    assert!(dir.path().join("sub").is_dir());
    let (e2, _) = create(&mut h, d.nodeid, "inner").unwrap();
    assert!(dir.path().join("sub/inner").is_file());
    assert!(e2.nodeid > 1);

    let dh = open(&mut h, OPENDIR, ROOT, libc::O_RDONLY | libc::O_DIRECTORY).unwrap();
    let r = ReadIn {
        fh: dh,
        size: 4096,
        ..Default::default()
    };
    let (err, out) = call(&mut h, READDIR, ROOT, r.as_slice(), 4096 + 16);
    assert_eq!(err, 0);
    let mut names = dirent_names(&out, false);
    names.sort();
    assert_eq!(names, ["new.txt", "sub"]);
    let (err, out) = call(&mut h, READDIRPLUS, ROOT, r.as_slice(), 4096 + 16);
    assert_eq!(err, 0);
    assert!(dirent_names(&out, true).contains(&"sub".to_string()));

    let (err, _) = call(&mut h, UNLINK, ROOT, &cstr("new.txt"), 64);
    assert_eq!(err, 0);
    assert!(!dir.path().join("new.txt").exists());
}

#[test]
fn test_fs_read_only_share_refuses_every_change_with_erofs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"keep").unwrap();
    let mut h = fs_harness(Some(dir.path()), true, FsLimits::default());
    init(&mut h);
    let f = lookup(&mut h, ROOT, "f").unwrap();
    let erofs = neg(libc::EROFS);
    assert_eq!(create(&mut h, ROOT, "x").unwrap_err(), erofs);
    assert_eq!(mkdir(&mut h, ROOT, "d").unwrap_err(), erofs);
    assert_eq!(call(&mut h, UNLINK, ROOT, &cstr("f"), 64).0, erofs);
    let mut body = cstr("l");
    body.extend_from_slice(&cstr("/etc"));
    assert_eq!(call(&mut h, SYMLINK, ROOT, &body, 256).0, erofs);
    let mut rename = 1u64.to_le_bytes().to_vec();
    rename.extend_from_slice(&cstr("f"));
    rename.extend_from_slice(&cstr("g"));
    assert_eq!(call(&mut h, RENAME, ROOT, &rename, 64).0, erofs);
    let mut link = f.nodeid.to_le_bytes().to_vec();
    link.extend_from_slice(&cstr("hard"));
    assert_eq!(call(&mut h, LINK, ROOT, &link, 256).0, erofs);
    let mut mknod = [0u8; 16];
    mknod[..4].copy_from_slice(&(libc::S_IFIFO | 0o644).to_le_bytes());
    let mut mk = mknod.to_vec();
    mk.extend_from_slice(&cstr("fifo"));
    assert_eq!(call(&mut h, MKNOD, ROOT, &mk, 256).0, erofs);
    // SETATTR (valid = size): 88 bytes of setattr_in.
    let mut sa = [0u8; 88];
    sa[..4].copy_from_slice(&(1u32 << 3).to_le_bytes());
    assert_eq!(call(&mut h, SETATTR, f.nodeid, &sa, 256).0, erofs);
    assert_eq!(
        open(&mut h, OPEN, f.nodeid, libc::O_WRONLY).unwrap_err(),
        erofs
    );
    assert_eq!(
        open(&mut h, OPEN, f.nodeid, libc::O_RDONLY | libc::O_TRUNC).unwrap_err(),
        erofs
    );
    let fh = open(&mut h, OPEN, f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(write(&mut h, f.nodeid, fh, b"x").unwrap_err(), erofs);
    let fa = [0u8; 32];
    assert_eq!(call(&mut h, FALLOCATE, f.nodeid, &fa, 64).0, erofs);
    assert_eq!(read(&mut h, f.nodeid, fh, 64).unwrap(), b"keep");
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"keep");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn test_fs_dotdot_and_slash_names_refused() {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(outer.path().join("secret"), b"outside").unwrap();
    let share = outer.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::create_dir(share.join("sub")).unwrap();
    let mut h = fs_harness(Some(&share), false, FsLimits::default());
    init(&mut h);
    let einval = neg(libc::EINVAL);
    assert_eq!(lookup(&mut h, ROOT, "..").unwrap_err(), einval);
    assert_eq!(lookup(&mut h, ROOT, "../secret").unwrap_err(), einval);
    assert_eq!(
        lookup(&mut h, ROOT, "sub/../../secret").unwrap_err(),
        einval
    );
    let sub = lookup(&mut h, ROOT, "sub").unwrap();
    assert_eq!(lookup(&mut h, sub.nodeid, "..").unwrap_err(), einval);
    assert_eq!(
        lookup(&mut h, ROOT, "secret").unwrap_err(),
        neg(libc::ENOENT)
    );
    assert_eq!(create(&mut h, ROOT, "../escaped").unwrap_err(), einval);
    assert_eq!(mkdir(&mut h, ROOT, "..").unwrap_err(), einval);
    assert!(!outer.path().join("escaped").exists());
    // An inode number the guest never got is refused, not guessed.
    assert!(lookup(&mut h, 0xdead, "x").is_err());
}

#[test]
fn test_fs_symlink_escape_never_reaches_target() {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(outer.path().join("secret"), b"outside").unwrap();
    let share = outer.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", share.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../secret", share.join("up")).unwrap();
    std::os::unix::fs::symlink("../../", share.join("upup")).unwrap();
    let mut h = fs_harness(Some(&share), false, FsLimits::default());
    init(&mut h);
    for (name, text) in [
        ("passwd", &b"/etc/passwd"[..]),
        ("up", b"../secret"),
        ("upup", b"../../"),
    ] {
        let e = lookup(&mut h, ROOT, name).unwrap();
        // The lookup returns the link itself.
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert_eq!(e.attr.size as usize, text.len());
        let (err, out) = call(&mut h, READLINK, e.nodeid, &[], 4096);
        assert_eq!(err, 0);
        assert_eq!(out, text);
        // Opening the link through the server never opens its target.
        assert!(
            open(&mut h, OPEN, e.nodeid, libc::O_RDONLY).is_err(),
            "{name}"
        );
        assert!(
            open(&mut h, OPENDIR, e.nodeid, libc::O_RDONLY).is_err(),
            "{name}"
        );
        // Names under the link are not resolved through it.
        assert!(lookup(&mut h, e.nodeid, "secret").is_err());
        assert!(create(&mut h, e.nodeid, "planted").is_err());
    }
    assert!(!outer.path().join("planted").exists());
}

#[test]
fn test_fs_inode_cap_reached_gives_enfile_and_forget_frees() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..4 {
        std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
    }
    let limits = FsLimits {
        max_inodes: 3,
        max_handles: 2,
    };
    let mut h = fs_harness(Some(dir.path()), false, limits);
    init(&mut h);
    let a = lookup(&mut h, ROOT, "f0").unwrap();
    lookup(&mut h, ROOT, "f1").unwrap();
    lookup(&mut h, ROOT, "f2").unwrap();
    // The same inode again is no new inode.
    lookup(&mut h, ROOT, "f0").unwrap();
    assert_eq!(lookup(&mut h, ROOT, "f3").unwrap_err(), neg(libc::ENFILE));
    assert_eq!(create(&mut h, ROOT, "f4").unwrap_err(), neg(libc::ENFILE));
    // FORGET has no reply: used length 0.
    let (e, _) = call(&mut h, FORGET, a.nodeid, &2u64.to_le_bytes(), 64);
    assert_eq!(e, i32::MIN);
    lookup(&mut h, ROOT, "f3").unwrap();
    assert_eq!(
        h.device
            .worker()
            .borrow()
            .handler
            .server()
            .unwrap()
            .fs()
            .inodes_held(),
        3
    );

    // Handles: two open, the third refused, a release frees one.
    let f1 = lookup(&mut h, ROOT, "f1").unwrap();
    let h1 = open(&mut h, OPEN, f1.nodeid, libc::O_RDONLY).unwrap();
    open(&mut h, OPEN, f1.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(
        open(&mut h, OPEN, f1.nodeid, libc::O_RDONLY).unwrap_err(),
        neg(libc::EMFILE)
    );
    assert_eq!(
        open(&mut h, OPENDIR, ROOT, libc::O_RDONLY).unwrap_err(),
        neg(libc::EMFILE)
    );
    let mut rel = h1.to_le_bytes().to_vec();
    rel.extend_from_slice(&[0u8; 16]);
    assert_eq!(call(&mut h, RELEASE, f1.nodeid, &rel, 64).0, 0);
    open(&mut h, OPEN, f1.nodeid, libc::O_RDONLY).unwrap();
}

#[test]
fn test_fs_hostile_descriptors_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"data").unwrap();
    let mut h = fs_harness(Some(dir.path()), false, FsLimits::default());
    init(&mut h);
    let hdr = InHeader {
        len: 40 + 2,
        opcode: LOOKUP,
        unique: 1,
        nodeid: ROOT,
        ..Default::default()
    };
    let mut req = hdr.as_slice().to_vec();
    req.extend_from_slice(b"f\0");
    let a = h.driver.alloc(4096);
    h.driver.mem.write_slice(&req, GuestAddress(a)).unwrap();
    let o = h.driver.alloc(4096);
    // Zero-length buffers.
    let u = h.request(1, &[Buf::out(a, 0), Buf::inp(o, 0)]).unwrap();
    assert_eq!(u.len, 0);
    // Only a writable buffer (the header where the device may write).
    let u = h.request(1, &[Buf::inp(a, 64)]).unwrap();
    assert_eq!(u.len, 0);
    // No reply buffer.
    let u = h.request(1, &[Buf::out(a, 42)]).unwrap();
    assert_eq!(u.len, 0);
    // Too long: more than the server's message bound.
    let big = h.driver.alloc(3 << 20);
    let u = h
        .request(1, &[Buf::out(big, 3 << 20), Buf::inp(o, 4096)])
        .unwrap();
    assert_eq!(u.len, 0);
    let u = h
        .request(1, &[Buf::out(a, 42), Buf::inp(big, 3 << 20)])
        .unwrap();
    assert_eq!(u.len, 0);
    // Header length lies (says 1 GiB).
    let mut lie = req.clone();
    lie[..4].copy_from_slice(&(1u32 << 30).to_le_bytes());
    h.driver.mem.write_slice(&lie, GuestAddress(a)).unwrap();
    let u = h.request(1, &[Buf::out(a, 42), Buf::inp(o, 4096)]).unwrap();
    assert!(u.len <= 4096);
    h.driver.mem.write_slice(&req, GuestAddress(a)).unwrap();
    // Many tiny descriptors: the same lookup, one byte per descriptor.
    let mut bufs: Vec<Buf> = (0..req.len() as u64).map(|i| Buf::out(a + i, 1)).collect();
    bufs.push(Buf::inp(o, 256));
    assert!(bufs.len() > 16);
    // The harness queue has 16 entries: use at most 15 tiny ones + the reply.
    let mut tiny: Vec<Buf> = (0..14).map(|i| Buf::out(a + i, 1)).collect();
    tiny.push(Buf::out(a + 14, req.len() as u32 - 14));
    tiny.push(Buf::inp(o, 256));
    let u = h.request(1, &tiny).unwrap();
    assert!(u.len >= 16, "a split header still parses");
    // Reply buffers split in tiny pieces too.
    let mut tiny: Vec<Buf> = vec![Buf::out(a, req.len() as u32)];
    tiny.extend((0..15).map(|i| Buf::inp(o + i * 8, 8)));
    let u = h.request(1, &tiny).unwrap();
    assert!(u.len <= 120);
    // The hiprio queue gets the same treatment.
    let u = h.request(0, &[Buf::out(a, 42), Buf::inp(o, 4096)]).unwrap();
    assert!(u.len <= 4096);
    // Still serving.
    assert!(lookup(&mut h, ROOT, "f").is_ok());
    // A buffer beyond guest memory: the device fails (needs reset), the VMM does not.
    let past = crate::virtio::test_utils::MEM_SIZE as u64 - 8;
    h.driver
        .add_chain(1, &[Buf::out(past, 64), Buf::inp(o, 64)])
        .unwrap();
    h.driver.kick(1);
    h.run_until_irq(std::time::Duration::from_millis(500));
    assert_ne!(
        h.driver.status() & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}

#[test]
fn test_fs_slot_without_share_answers_zero_bytes() {
    let mut h = fs_harness(None, false, FsLimits::default());
    let i = InitIn::default();
    let (e, _) = call(&mut h, INIT, 0, i.as_slice(), 256);
    assert_eq!(e, i32::MIN, "no share: used length 0");
    assert!(!h.device.fs_session_active());
}

#[test]
fn test_fs_slot_snapshot_roundtrip_attaches_share_at_restore() {
    use crate::persist::Persist;
    use crate::virtio::test_utils::copy_memory;
    let mut h = fs_harness(None, false, FsLimits::default());
    // The activation reaches the worker on the loop's next round.
    h.run_until_irq(std::time::Duration::from_millis(30));
    assert!(h.device.is_quiescent());
    let state = h.device.save();
    assert_eq!(state.tag, "share0");
    let json = serde_json::to_string(&state).unwrap();
    let state: super::FsState = serde_json::from_str(&json).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("attached"), b"yes").unwrap();
    let mem = copy_memory(&h.driver.mem);
    let dev = Fs::restore(
        super::FsArgs {
            mem: mem.clone(),
            parts: None,
            share: Some(FsShare {
                dir: dir.path().to_path_buf(),
                read_only: true,
            }),
            limits: FsLimits::default(),
            setup: None,
        },
        &state,
    )
    .unwrap();
    let mut h = h.restored(dev, mem);
    assert_eq!(h.device.save(), state);
    init(&mut h);
    let e = lookup(&mut h, ROOT, "attached").unwrap();
    let fh = open(&mut h, OPEN, e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(read(&mut h, e.nodeid, fh, 64).unwrap(), b"yes");
    assert!(h.device.fs_session_active());
    // A bad saved tag is refused.
    let mut bad = state.clone();
    bad.tag = String::new();
    assert!(
        Fs::restore(
            super::FsArgs {
                mem: test_memory(),
                parts: None,
                share: None,
                limits: FsLimits::default(),
                setup: None,
            },
            &bad
        )
        .is_err()
    );
}

#[test]
fn test_fs_reset_ends_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = fs_harness(Some(dir.path()), false, FsLimits::default());
    init(&mut h);
    assert!(h.device.fs_session_active());
    h.driver
        .write_reg(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS, 0);
    // The reset reaches the fs thread through the loop.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while h.device.fs_session_active() && std::time::Instant::now() < end {
        h.run_until_irq(std::time::Duration::from_millis(20));
    }
    assert!(!h.device.fs_session_active());
    h.driver.init(16);
    init(&mut h);
    assert!(lookup(&mut h, ROOT, "nothing").is_err());
}

#[test]
fn test_fs_attr_layout_matches_kernel_abi() {
    assert_eq!(std::mem::size_of::<Attr>(), 88);
    assert_eq!(std::mem::size_of::<EntryOut>(), 128);
    assert_eq!(std::mem::size_of::<InHeader>(), 40);
}

/// Whether the tests run as root (the ownership tests need `CAP_CHOWN`); prints a SKIPPED line
/// when not.
fn root_or_skip(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        println!("SKIPPED: {test}: needs root (CAP_CHOWN)");
    }
    root
}

/// CREATE (0644) of `name` under `parent` by the guest user `who`.
fn create_as(
    h: &mut Harness<super::FsHandler>,
    who: (u32, u32),
    parent: u64,
    name: &str,
) -> Result<EntryOut, i32> {
    let c = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0o022,
        fuse_flags: 0,
    };
    let mut body = c.as_slice().to_vec();
    body.extend_from_slice(&cstr(name));
    let (e, out) = call_as(h, who, CREATE, parent, &body, 512);
    if e != 0 {
        return Err(e);
    }
    Ok(obj(&out))
}

/// MKDIR (0755), SYMLINK (to `/nowhere`) and MKNOD (a FIFO) of `name` by `who`.
fn make_as(
    h: &mut Harness<super::FsHandler>,
    who: (u32, u32),
    op: u32,
    parent: u64,
    name: &str,
) -> Result<EntryOut, i32> {
    let body = match op {
        MKDIR => {
            let mut b = MkdirIn {
                mode: 0o755,
                umask: 0,
            }
            .as_slice()
            .to_vec();
            b.extend_from_slice(&cstr(name));
            b
        }
        SYMLINK => {
            let mut b = cstr(name);
            b.extend_from_slice(&cstr("/nowhere"));
            b
        }
        MKNOD => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&(libc::S_IFIFO | 0o644).to_le_bytes());
            let mut b = b.to_vec();
            b.extend_from_slice(&cstr(name));
            b
        }
        _ => unreachable!("not a making request"),
    };
    let (e, out) = call_as(h, who, op, parent, &body, 256);
    if e != 0 {
        return Err(e);
    }
    Ok(obj(&out))
}

/// uid and gid of `path` on the host, links not followed.
fn owner(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid())
}

const GUEST_USER: (u32, u32) = (1234, 5678);

#[test]
fn test_fs_new_entries_owned_by_the_requesting_guest_user() {
    if !root_or_skip("test_fs_new_entries_owned_by_the_requesting_guest_user") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut h = fs_harness(Some(dir.path()), false, FsLimits::default());
    init(&mut h);
    let f = create_as(&mut h, GUEST_USER, ROOT, "f").unwrap();
    assert_eq!(owner(&dir.path().join("f")), GUEST_USER);
    // The guest is told the owner it now has.
    assert_eq!((f.attr.uid, f.attr.gid), GUEST_USER);
    for (op, name) in [(MKDIR, "d"), (SYMLINK, "l"), (MKNOD, "p")] {
        let e = make_as(&mut h, GUEST_USER, op, ROOT, name).unwrap();
        assert_eq!(owner(&dir.path().join(name)), GUEST_USER, "{name}");
        assert_eq!((e.attr.uid, e.attr.gid), GUEST_USER, "{name}");
    }
    assert!(
        std::fs::symlink_metadata(dir.path().join("l"))
            .unwrap()
            .is_symlink()
    );
    // Below a directory the guest user made, too.
    let d = lookup(&mut h, ROOT, "d").unwrap();
    create_as(&mut h, GUEST_USER, d.nodeid, "inner").unwrap();
    assert_eq!(owner(&dir.path().join("d/inner")), GUEST_USER);

    // Root's entries stay root's.
    create_as(&mut h, (0, 0), ROOT, "f0").unwrap();
    for (op, name) in [(MKDIR, "d0"), (SYMLINK, "l0"), (MKNOD, "p0")] {
        make_as(&mut h, (0, 0), op, ROOT, name).unwrap();
    }
    for name in ["f0", "d0", "l0", "p0"] {
        assert_eq!(owner(&dir.path().join(name)), (0, 0), "{name}");
    }

    // A hard link is the same inode: its owner does not change.
    let f0 = lookup(&mut h, ROOT, "f0").unwrap();
    let mut link = f0.nodeid.to_le_bytes().to_vec();
    link.extend_from_slice(&cstr("hard"));
    assert_eq!(call_as(&mut h, GUEST_USER, LINK, ROOT, &link, 256).0, 0);
    assert_eq!(owner(&dir.path().join("hard")), (0, 0));
    assert_eq!(owner(&dir.path().join("f0")), (0, 0));
}

#[test]
fn test_fs_new_entry_in_a_setgid_directory_keeps_its_group() {
    if !root_or_skip("test_fs_new_entry_in_a_setgid_directory_keeps_its_group") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sg = dir.path().join("sg");
    std::fs::create_dir(&sg).unwrap();
    std::os::unix::fs::chown(&sg, None, Some(4242)).unwrap();
    std::fs::set_permissions(&sg, std::fs::Permissions::from_mode(0o2777)).unwrap();
    let mut h = fs_harness(Some(dir.path()), false, FsLimits::default());
    init(&mut h);
    let d = lookup(&mut h, ROOT, "sg").unwrap();
    create_as(&mut h, GUEST_USER, d.nodeid, "f").unwrap();
    make_as(&mut h, GUEST_USER, MKDIR, d.nodeid, "sub").unwrap();
    assert_eq!(owner(&sg.join("f")), (GUEST_USER.0, 4242));
    assert_eq!(owner(&sg.join("sub")), (GUEST_USER.0, 4242));
}

#[test]
fn test_fs_guest_chown_goes_through_and_is_refused_on_a_read_only_share() {
    if !root_or_skip("test_fs_guest_chown_goes_through_and_is_refused_on_a_read_only_share") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    let chown = SetattrIn {
        valid: (1 << 1) | (1 << 2),
        uid: 777,
        gid: 888,
        ..Default::default()
    };
    {
        let mut h = fs_harness(Some(dir.path()), true, FsLimits::default());
        init(&mut h);
        let f = lookup(&mut h, ROOT, "f").unwrap();
        let (e, _) = call(&mut h, SETATTR, f.nodeid, chown.as_slice(), 256);
        assert_eq!(e, neg(libc::EROFS));
        assert_eq!(owner(&dir.path().join("f")), (0, 0));
    }
    let mut h = fs_harness(Some(dir.path()), false, FsLimits::default());
    init(&mut h);
    let f = lookup(&mut h, ROOT, "f").unwrap();
    let (e, out) = call(&mut h, SETATTR, f.nodeid, chown.as_slice(), 256);
    assert_eq!(e, 0);
    let a: AttrOut = obj(&out);
    assert_eq!((a.attr.uid, a.attr.gid), (777, 888));
    assert_eq!(owner(&dir.path().join("f")), (777, 888));
}

/// Drops `CAP_CHOWN` from this thread's effective set (threads it starts inherit that).
fn drop_cap_chown_in_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget(2) writes two `Data` (version 3) into the array it is given; both structs
    // have the kernel's layout.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr as *mut Header, data.as_mut_ptr()) };
    assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
    // CAP_CHOWN is capability 0.
    data[0].effective &= !1;
    // SAFETY: capset(2) reads the header and two `Data`; pid 0 is this thread only (the raw
    // system call, not a library wrapper that would apply it to every thread).
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) };
    assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
}

#[test]
fn test_fs_create_without_cap_chown_keeps_the_vmm_owner_and_succeeds() {
    if !root_or_skip("test_fs_create_without_cap_chown_keeps_the_vmm_owner_and_succeeds") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    // On a thread of its own: the server thread the harness starts inherits its credentials.
    std::thread::spawn(move || {
        drop_cap_chown_in_this_thread();
        let mut h = fs_harness(Some(&path), false, FsLimits::default());
        init(&mut h);
        let f = create_as(&mut h, GUEST_USER, ROOT, "f").unwrap();
        assert_eq!((f.attr.uid, f.attr.gid), (0, 0));
        make_as(&mut h, GUEST_USER, MKDIR, ROOT, "d").unwrap();
        make_as(&mut h, GUEST_USER, SYMLINK, ROOT, "l").unwrap();
        for name in ["f", "d", "l"] {
            assert_eq!(owner(&path.join(name)), (0, 0), "{name}");
        }
    })
    .join()
    .expect("the test thread");
}
