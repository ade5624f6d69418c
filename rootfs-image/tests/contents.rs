//! What the image holds: owners, modes, mtimes, symlinks, device nodes, FIFOs and hard links
//! as in the tree. Checked by mounting the image (root) and with fsck.erofs / dump.erofs.

mod common;

use std::fs::{self, File, FileTimes};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{MountGuard, is_root, make_cache, run, skipped};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};

const MTIME_NS: u64 = 981_173_106_123_456_789;

/// Fills `r` with the special cases; returns whether a device node could be made.
fn special_tree(r: &Path) -> bool {
    fs::create_dir_all(r.join("d")).unwrap();
    fs::write(r.join("f"), "hello\n").unwrap();
    fs::set_permissions(r.join("f"), fs::Permissions::from_mode(0o640)).unwrap();
    File::options()
        .write(true)
        .open(r.join("f"))
        .unwrap()
        .set_times(
            FileTimes::new().set_modified(SystemTime::UNIX_EPOCH + Duration::from_nanos(MTIME_NS)),
        )
        .unwrap();
    fs::hard_link(r.join("f"), r.join("d/hl")).unwrap();
    std::os::unix::fs::symlink("../f", r.join("d/sl")).unwrap();
    nix::unistd::mkfifo(&r.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
    if is_root() {
        std::os::unix::fs::chown(r.join("f"), Some(1234), Some(5678)).unwrap();
    }
    mknod(
        &r.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .is_ok()
}

#[test]
fn test_symlink_device_hardlink_fifo_survive_in_image() {
    let tree = tempfile::tempdir().unwrap();
    let r = tree.path();
    let have_dev = special_tree(r);
    if !have_dev {
        skipped("device node in the image", "cannot mknod here (not root)");
    }
    let (_t, cache) = make_cache();
    let img = cache.get_or_build(r).unwrap();

    // Integrity of the whole image.
    let (ok, out) = run("fsck.erofs", &[img.path.to_str().unwrap()]);
    if out.contains("cannot run") {
        skipped("fsck.erofs", &out);
    } else {
        assert!(ok, "fsck.erofs: {out}");
    }

    // Metadata as the erofs tools read it.
    let dump = |p: &str| {
        run(
            "dump.erofs",
            &[&format!("--path={p}"), img.path.to_str().unwrap()],
        )
    };
    if dump("/").1.contains("cannot run") {
        skipped("dump.erofs checks", "dump.erofs not installed");
    } else {
        let (ok, f) = dump("/f");
        assert!(ok, "{f}");
        assert!(f.contains("regular file") && f.contains("Links: 2"), "{f}");
        assert!(f.contains("Access: 0640"), "{f}");
        assert!(f.contains("2001-02-03 04:05:06.123456789"), "{f}");
        if is_root() {
            assert!(f.contains("Uid: 1234") && f.contains("Gid: 5678"), "{f}");
        }
        let (_, hl) = dump("/d/hl");
        let nid = |s: &str| {
            s.split("NID: ")
                .nth(1)
                .map(|r| r.split_whitespace().next().unwrap().to_owned())
        };
        assert_eq!(nid(&hl), nid(&f), "hard link shares the inode: {hl}");
        assert!(dump("/d/sl").1.contains("symlink"));
        assert!(dump("/fifo").1.contains("FIFO"));
        if have_dev {
            assert!(dump("/null").1.contains("char dev"));
        }
    }

    // Everything, as the kernel shows it.
    if !is_root() {
        skipped("mounting the image", "not root");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let guard = match MountGuard::mount(
        &["-t", "erofs", "-o", "loop,ro", img.path.to_str().unwrap()],
        mnt.path(),
    ) {
        Ok(g) => g,
        Err(out) => {
            skipped("mounting the image", &format!("mount failed: {out}"));
            return;
        }
    };
    let m = &guard.0;
    let f = fs::symlink_metadata(m.join("f")).unwrap();
    let hl = fs::symlink_metadata(m.join("d/hl")).unwrap();
    assert_eq!(fs::read(m.join("f")).unwrap(), b"hello\n");
    assert_eq!(f.mode() & 0o7777, 0o640);
    assert_eq!((f.uid(), f.gid()), (1234, 5678));
    assert_eq!(f.nlink(), 2);
    assert_eq!(hl.ino(), f.ino());
    assert_eq!(
        f.mtime() as u64 * 1_000_000_000 + f.mtime_nsec() as u64,
        MTIME_NS
    );
    assert_eq!(fs::read_link(m.join("d/sl")).unwrap(), Path::new("../f"));
    assert!(
        fs::symlink_metadata(m.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let dev = fs::symlink_metadata(m.join("null")).unwrap();
    assert!(dev.file_type().is_char_device());
    assert_eq!(dev.rdev(), makedev(1, 3));
    let root = fs::metadata(m).unwrap();
    let src_root = fs::metadata(r).unwrap();
    assert_eq!(root.mode(), src_root.mode());
}
