//! Rootfs paths that are not directories, a missing or failing mkfs.erofs, a rootfs that changes
//! during its build.

mod common;

use std::fs;
use std::path::Path;

use common::{make_cache, make_tree, script, stray_files};
use rootfs_image::{BuildLimits, ImageCache, ImageError};

fn cache_and_tmp() -> (tempfile::TempDir, ImageCache) {
    make_cache()
}

#[test]
fn test_rootfs_fifo_is_not_a_directory_and_does_not_block() {
    let (t, cache) = cache_and_tmp();
    let fifo = t.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let err = cache.get_or_build(&fifo).unwrap_err();
    assert!(
        matches!(&err, ImageError::RootfsNotDirectory { kind: "a FIFO", path } if path == &fifo),
        "{err}"
    );
    assert!(err.to_string().contains(fifo.to_str().unwrap()));
}

#[test]
fn test_rootfs_missing_error_names_path() {
    let (t, cache) = cache_and_tmp();
    let missing = t.path().join("no/such/rootfs");
    let err = cache.get_or_build(&missing).unwrap_err();
    assert!(
        matches!(&err, ImageError::RootfsMissing { path } if path == &missing),
        "{err}"
    );
    assert!(err.to_string().contains("no/such/rootfs"));
}

#[test]
fn test_rootfs_regular_file_is_not_a_directory() {
    let (t, cache) = cache_and_tmp();
    let file = t.path().join("file");
    fs::write(&file, "x").unwrap();
    let err = cache.get_or_build(&file).unwrap_err();
    assert!(
        matches!(
            &err,
            ImageError::RootfsNotDirectory {
                kind: "a regular file",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn test_rootfs_char_device_is_not_a_directory() {
    let (_t, cache) = cache_and_tmp();
    let err = cache.get_or_build(Path::new("/dev/null")).unwrap_err();
    assert!(
        matches!(
            &err,
            ImageError::RootfsNotDirectory {
                kind: "a character device",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn test_rootfs_symlink_to_directory_refused() {
    let tree = make_tree();
    let (t, cache) = cache_and_tmp();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(tree.path(), &link).unwrap();
    let err = cache.get_or_build(&link).unwrap_err();
    assert!(
        matches!(&err, ImageError::RootfsSymlink { path } if path == &link),
        "{err}"
    );
}

#[test]
fn test_mkfs_missing_says_apt_get_install() {
    let tree = make_tree();
    let (_t, cache) = cache_and_tmp();
    let cache = cache.with_mkfs_erofs(Path::new("/nonexistent/mkfs.erofs"));
    let err = cache.get_or_build(tree.path()).unwrap_err();
    assert!(matches!(err, ImageError::ToolMissing { .. }), "{err}");
    assert!(
        err.to_string().contains("apt-get install erofs-utils"),
        "{err}"
    );
}

#[test]
fn test_mkfs_failure_output_in_error_and_no_file_left() {
    let tree = make_tree();
    let (t, cache) = cache_and_tmp();
    let fake = script(
        t.path(),
        "mkfs.erofs",
        r#"if [ "$1" = -V ]; then echo "mkfs.erofs 9.9-fake"; exit 0; fi
echo "boom: cannot build this" >&2
exit 3"#,
    );
    let cache = cache.with_mkfs_erofs(&fake);
    let err = cache.get_or_build(tree.path()).unwrap_err();
    match &err {
        ImageError::Mkfs { stderr, status, .. } => {
            assert!(stderr.contains("boom: cannot build this"), "{stderr}");
            assert_eq!(status.code(), Some(3));
        }
        other => panic!("{other}"),
    }
    assert!(cache.list().unwrap().is_empty());
    assert!(
        stray_files(cache.dir()).is_empty(),
        "{:?}",
        stray_files(cache.dir())
    );
}

#[test]
fn test_mkfs_long_output_is_bounded() {
    let tree = make_tree();
    let (t, cache) = cache_and_tmp();
    let fake = script(
        t.path(),
        "mkfs.erofs",
        r#"if [ "$1" = -V ]; then echo "mkfs.erofs 9.9-fake"; exit 0; fi
yes "a long line of complaints" | head -n 100000 >&2
exit 1"#,
    );
    let err = cache
        .with_mkfs_erofs(&fake)
        .get_or_build(tree.path())
        .unwrap_err();
    let ImageError::Mkfs { stderr, .. } = &err else {
        panic!("{err}")
    };
    assert!(stderr.len() < 5000, "{}", stderr.len());
    assert!(stderr.ends_with("[...]"));
}

#[test]
fn test_other_mkfs_version_other_key() {
    let tree = make_tree();
    let (t, cache) = cache_and_tmp();
    let real = cache.get_or_build(tree.path()).unwrap();
    // Says another version, builds with the real tool.
    let fake = script(
        t.path(),
        "mkfs.erofs",
        r#"if [ "$1" = -V ]; then echo "mkfs.erofs 9.9-fake"; exit 0; fi
exec mkfs.erofs "$@""#,
    );
    let (_t2, cache2) = cache_and_tmp();
    let other = cache2
        .with_mkfs_erofs(&fake)
        .get_or_build(tree.path())
        .unwrap();
    assert!(!other.hit);
    assert_ne!(other.key, real.key);
}

#[test]
fn test_rootfs_changed_during_build_discards_image() {
    let tree = make_tree();
    let (t, cache) = cache_and_tmp();
    // Builds, then changes the rootfs (its last argument) as if someone wrote to it meanwhile.
    let fake = script(
        t.path(),
        "mkfs.erofs",
        r#"if [ "$1" = -V ]; then echo "mkfs.erofs 9.9-fake"; exit 0; fi
for last; do :; done
mkfs.erofs "$@" || exit $?
echo late > "$last/late-file""#,
    );
    // The fake writes into the rootfs as the caller would: it keeps the caller's uid (a root
    // caller's build runs as nobody by default, who may not write there).
    let cache = cache.with_mkfs_erofs(&fake).with_build_limits(BuildLimits {
        run_as: None,
        ..BuildLimits::default()
    });
    let err = cache.get_or_build(tree.path()).unwrap_err();
    assert!(matches!(err, ImageError::RootfsChanged { .. }), "{err}");
    assert!(cache.list().unwrap().is_empty());
    assert!(stray_files(cache.dir()).is_empty());
    // Every build changes it again: never installed.
    assert!(
        cache
            .get_or_build(tree.path())
            .is_err_and(|e| matches!(e, ImageError::RootfsChanged { .. }))
    );
}
