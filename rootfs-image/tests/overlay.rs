//! A rootfs that is an overlay mount, as containerd makes them (root only).

mod common;

use std::fs;
use std::path::Path;

use common::{MountGuard, is_root, make_cache, run, skipped};
use rootfs_image::KeyKind;

/// Mounts an overlay of `lowers` (topmost first) with a fresh upper dir under `base/name`.
fn overlay(base: &Path, name: &str, lowers: &[&Path]) -> Result<MountGuard, String> {
    let upper = base.join(format!("{name} upper"));
    let work = base.join(format!("{name}-work"));
    // A space in the mount point: mountinfo shows it as \040.
    let merged = base.join(format!("{name} merged"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    // A colon in a layer path is written \: in lowerdir=.
    let esc = |p: &Path| p.to_str().unwrap().replace(':', r"\:");
    let lowerdir = lowers.iter().map(|p| esc(p)).collect::<Vec<_>>().join(":");
    let opts = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        esc(&upper),
        esc(&work)
    );
    MountGuard::mount(&["-t", "overlay", "overlay", "-o", &opts], &merged)
}

#[test]
fn test_overlay_rootfs_keys_by_lowers_until_upper_written() {
    if !is_root() {
        skipped("overlay keying", "not root (cannot mount overlay)");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let l1 = base.path().join("layer:1");
    let l2 = base.path().join("layer 2");
    fs::create_dir_all(l1.join("etc")).unwrap();
    fs::create_dir_all(l2.join("usr/bin")).unwrap();
    fs::write(l1.join("etc/os-release"), "ID=test\n").unwrap();
    fs::write(l2.join("usr/bin/sh"), vec![1u8; 5000]).unwrap();

    let m1 = match overlay(base.path(), "c1", &[&l1, &l2]) {
        Ok(m) => m,
        Err(out) => {
            skipped("overlay keying", &format!("mount -t overlay failed: {out}"));
            return;
        }
    };
    let (_t, cache) = make_cache();
    let first = cache.get_or_build(&m1.0).unwrap();
    assert_eq!(first.key_kind, KeyKind::Overlay);
    assert!(!first.hit);
    let again = cache.get_or_build(&m1.0).unwrap();
    assert_eq!(again.key_kind, KeyKind::Overlay);
    assert!(again.hit);
    assert_eq!(again.key, first.key);

    // The image holds both layers.
    for p in ["/etc/os-release", "/usr/bin/sh"] {
        let (ok, out) = run(
            "dump.erofs",
            &[&format!("--path={p}"), first.path.to_str().unwrap()],
        );
        if out.contains("cannot run") {
            skipped("dump.erofs check of the overlay image", &out);
            break;
        }
        assert!(ok && out.contains("regular file"), "{p}: {out}");
    }

    // Another container from the same layers shares the image.
    let m2 = overlay(base.path(), "c2", &[&l1, &l2]).unwrap();
    let other = cache.get_or_build(&m2.0).unwrap();
    assert_eq!(other.key_kind, KeyKind::Overlay);
    assert!(other.hit);
    assert_eq!(other.key, first.key);

    // Other layer order: another filesystem, another key.
    let m3 = overlay(base.path(), "c3", &[&l2, &l1]).unwrap();
    let swapped = cache.get_or_build(&m3.0).unwrap();
    assert_eq!(swapped.key_kind, KeyKind::Overlay);
    assert_ne!(swapped.key, first.key);

    // A write in the container lands in the upper dir: the lowers no longer say it all.
    fs::write(m1.0.join("etc/new"), "x").unwrap();
    let written = cache.get_or_build(&m1.0).unwrap();
    assert_eq!(written.key_kind, KeyKind::TreeSignature);
    assert!(!written.hit);
    assert_ne!(written.key, first.key);
    // The untouched container still hits.
    assert!(cache.get_or_build(&m2.0).unwrap().hit);
}

#[test]
fn test_plain_directory_under_overlay_keys_by_tree() {
    if !is_root() {
        skipped("overlay subdirectory keying", "not root");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let l1 = base.path().join("l1");
    fs::create_dir_all(l1.join("sub")).unwrap();
    fs::write(l1.join("sub/f"), "f").unwrap();
    let m = match overlay(base.path(), "c", &[&l1]) {
        Ok(m) => m,
        Err(out) => {
            skipped("overlay subdirectory keying", &out);
            return;
        }
    };
    // Only the mount point itself is keyed by layers.
    let (_t, cache) = make_cache();
    let img = cache.get_or_build(&m.0.join("sub")).unwrap();
    assert_eq!(img.key_kind, KeyKind::TreeSignature);
}
