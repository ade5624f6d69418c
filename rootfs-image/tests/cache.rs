//! Keying, hits and misses, rebuilds of bad images, concurrency, list and remove.

mod common;

use std::fs::{self, File, FileTimes};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::{make_cache, make_tree, stray_files};
use rootfs_image::{ImageCache, ImageError, KeyKind, SECTOR_SIZE, WalkLimits};

fn assert_good_image(path: &Path) {
    let md = fs::symlink_metadata(path).unwrap();
    assert!(md.is_file());
    assert!(
        md.len() > 0 && md.len().is_multiple_of(SECTOR_SIZE),
        "size {}",
        md.len()
    );
    let data = fs::read(path).unwrap();
    assert_eq!(&data[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
}

#[test]
fn test_get_or_build_second_call_hits_without_build() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let first = cache.get_or_build(tree.path()).unwrap();
    assert!(!first.hit);
    assert!(first.build_time.is_some());
    assert_eq!(first.key_kind, KeyKind::TreeSignature);
    assert_eq!(first.key.len(), 64);
    assert!(first.size.is_multiple_of(SECTOR_SIZE));
    assert_good_image(&first.path);
    let built_ino = fs::metadata(&first.path).unwrap().ino();

    let second = cache.get_or_build(tree.path()).unwrap();
    assert!(second.hit);
    assert_eq!(second.build_time, None);
    assert_eq!(second.key, first.key);
    assert_eq!(second.path, first.path);
    assert_eq!(second.size, first.size);
    // Not rebuilt: the same file.
    assert_eq!(fs::metadata(&second.path).unwrap().ino(), built_ino);

    let list = cache.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].key, first.key);
    assert_eq!(list[0].size, first.size);
    assert!(stray_files(cache.dir()).is_empty());
}

#[test]
fn test_get_or_build_same_content_other_cache_same_key() {
    let tree = make_tree();
    let (_t1, c1) = make_cache();
    let (_t2, c2) = make_cache();
    assert_eq!(
        c1.get_or_build(tree.path()).unwrap().key,
        c2.get_or_build(tree.path()).unwrap().key
    );
}

/// Rewrites `path` with `data` (same size) and puts its mtime back, until its ctime differs from
/// `old_ctime` (at once on any filesystem with fine timestamps).
fn rewrite_restoring_mtime(path: &Path, data: &[u8]) {
    let before = fs::symlink_metadata(path).unwrap();
    let mtime = before.modified().unwrap();
    loop {
        fs::write(path, data).unwrap();
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_times(FileTimes::new().set_modified(mtime))
            .unwrap();
        let after = fs::symlink_metadata(path).unwrap();
        assert_eq!(after.len(), before.len());
        assert_eq!(after.modified().unwrap(), mtime);
        if (after.ctime(), after.ctime_nsec()) != (before.ctime(), before.ctime_nsec()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn test_content_rewrite_same_size_restored_mtime_misses() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let first = cache.get_or_build(tree.path()).unwrap();
    rewrite_restoring_mtime(&tree.path().join("etc/hostname"), b"xyz\n");
    let second = cache.get_or_build(tree.path()).unwrap();
    assert!(!second.hit);
    assert_ne!(second.key, first.key);
}

#[test]
fn test_chmod_misses() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let first = cache.get_or_build(tree.path()).unwrap();
    fs::set_permissions(
        tree.path().join("etc/hostname"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let second = cache.get_or_build(tree.path()).unwrap();
    assert!(!second.hit);
    assert_ne!(second.key, first.key);
}

#[test]
fn test_new_file_misses_and_old_key_still_cached() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let first = cache.get_or_build(tree.path()).unwrap();
    fs::write(tree.path().join("etc/conf.d/new.conf"), "n\n").unwrap();
    let second = cache.get_or_build(tree.path()).unwrap();
    assert!(!second.hit);
    assert_ne!(second.key, first.key);
    assert_eq!(cache.list().unwrap().len(), 2);
}

#[test]
fn test_symlink_retarget_misses() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let first = cache.get_or_build(tree.path()).unwrap();
    fs::remove_file(tree.path().join("bin")).unwrap();
    std::os::unix::fs::symlink("usr/sbx", tree.path().join("bin")).unwrap();
    let second = cache.get_or_build(tree.path()).unwrap();
    assert_ne!(second.key, first.key);
}

#[test]
fn test_four_threads_same_rootfs_build_once() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let cache = Arc::new(cache);
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            let root = tree.path().to_path_buf();
            std::thread::spawn(move || {
                barrier.wait();
                cache.get_or_build(&root).unwrap()
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| !r.hit).count(), 1, "{results:#?}");
    assert!(results.iter().all(|r| r.key == results[0].key));
    assert_eq!(cache.list().unwrap().len(), 1);
    assert!(stray_files(cache.dir()).is_empty());
}

const CHILD_ENV: &str = "ROOTFS_IMAGE_TEST_CHILD";

/// Not a test on its own: the body of each process of the test below.
#[test]
fn child_process_get_or_build() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (cache_dir, rootfs) = spec.split_once('\n').unwrap();
    let cache = ImageCache::open(Path::new(cache_dir)).unwrap();
    let img = cache.get_or_build(Path::new(rootfs)).unwrap();
    println!(
        "RESULT {} {}",
        if img.hit { "hit" } else { "miss" },
        img.key
    );
}

#[test]
fn test_four_processes_same_rootfs_build_once() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let spec = format!("{}\n{}", cache.dir().display(), tree.path().display());
    let children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_process_get_or_build", "--nocapture"])
                .env(CHILD_ENV, &spec)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut results = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text.lines().find(|l| l.starts_with("RESULT ")).unwrap();
        results.push(line.to_owned());
    }
    assert_eq!(
        results.iter().filter(|r| r.contains(" miss ")).count(),
        1,
        "{results:?}"
    );
    let key = results[0].rsplit(' ').next().unwrap();
    assert!(results.iter().all(|r| r.ends_with(key)));
    assert_eq!(cache.list().unwrap().len(), 1);
}

#[test]
fn test_garbage_cached_image_is_rebuilt() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let first = cache.get_or_build(tree.path()).unwrap();
    // Same size, magic gone.
    fs::write(&first.path, vec![0u8; first.size as usize]).unwrap();
    let second = cache.get_or_build(tree.path()).unwrap();
    assert!(!second.hit);
    assert_eq!(second.key, first.key);
    assert_good_image(&second.path);
    assert!(cache.get_or_build(tree.path()).unwrap().hit);
}

#[test]
fn test_truncated_cached_image_is_rebuilt() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let first = cache.get_or_build(tree.path()).unwrap();
    for len in [0, 1000, 1024 + 512] {
        File::options()
            .write(true)
            .open(&first.path)
            .unwrap()
            .set_len(len)
            .unwrap();
        let again = cache.get_or_build(tree.path()).unwrap();
        assert!(!again.hit, "truncated to {len}");
        assert_eq!(again.key, first.key);
        assert_good_image(&again.path);
    }
}

#[test]
fn test_cached_image_replaced_by_symlink_is_rebuilt() {
    let tree = make_tree();
    let (t, cache) = make_cache();
    let first = cache.get_or_build(tree.path()).unwrap();
    let elsewhere = t.path().join("elsewhere.erofs");
    fs::rename(&first.path, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &first.path).unwrap();
    let second = cache.get_or_build(tree.path()).unwrap();
    assert!(!second.hit);
    assert!(fs::symlink_metadata(&second.path).unwrap().is_file());
}

#[test]
fn test_hit_touches_mtime_and_list_orders_by_last_use() {
    let (a, b) = (make_tree(), make_tree());
    fs::write(b.path().join("extra"), "b").unwrap();
    let (_t, cache) = make_cache();
    let ia = cache.get_or_build(a.path()).unwrap();
    let ib = cache.get_or_build(b.path()).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    for p in [&ia.path, &ib.path] {
        File::open(p)
            .unwrap()
            .set_times(FileTimes::new().set_modified(old))
            .unwrap();
    }
    assert!(cache.get_or_build(a.path()).unwrap().hit);
    let list = cache.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].key, ib.key, "least recently used first");
    assert_eq!(list[0].last_used, old);
    assert!(list[1].last_used > old);
}

#[test]
fn test_remove_then_miss_and_not_cached_and_invalid_key() {
    let tree = make_tree();
    let (_t, cache) = make_cache();
    let img = cache.get_or_build(tree.path()).unwrap();
    cache.remove(&img.key).unwrap();
    assert!(!img.path.exists());
    assert!(cache.list().unwrap().is_empty());
    assert!(matches!(
        cache.remove(&img.key),
        Err(ImageError::NotCached { .. })
    ));
    for bad in ["../etc", "", "ABC", &"g".repeat(64), &img.key[1..]] {
        assert!(
            matches!(cache.remove(bad), Err(ImageError::InvalidKey { .. })),
            "{bad}"
        );
    }
    assert!(!cache.get_or_build(tree.path()).unwrap().hit);
}

#[test]
fn test_open_creates_dir_0700_and_refuses_group_writable() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("a/b/cache");
    ImageCache::open(&dir).unwrap();
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(
        ImageCache::open(&dir),
        Err(ImageError::InsecureCacheDir { .. })
    ));
}

#[test]
fn test_walk_limits_depth_and_entries_error() {
    let tree = make_tree();
    fs::create_dir_all(tree.path().join("d1/d2/d3/d4")).unwrap();
    let (_t, cache) = make_cache();
    let deep = cache.with_limits(WalkLimits {
        max_entries: 1000,
        max_depth: 3,
    });
    let err = deep.get_or_build(tree.path()).unwrap_err();
    assert!(
        matches!(err, ImageError::TreeTooDeep { limit: 3, .. }),
        "{err}"
    );
    let (_t, cache) = make_cache();
    let exact = cache.with_limits(WalkLimits {
        max_entries: 1000,
        max_depth: 4,
    });
    exact.get_or_build(tree.path()).unwrap();
    let (_t, cache) = make_cache();
    let small = cache.with_limits(WalkLimits {
        max_entries: 5,
        max_depth: 256,
    });
    let err = small.get_or_build(tree.path()).unwrap_err();
    assert!(
        matches!(err, ImageError::TreeTooLarge { limit: 5, .. }),
        "{err}"
    );
    assert!(small.list().unwrap().is_empty());
}
