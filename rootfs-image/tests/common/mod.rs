//! Helpers shared by the rootfs-image integration tests.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs_image::ImageCache;
use tempfile::TempDir;

/// A small rootfs: nested dirs, a few files, a symlink.
pub fn make_tree() -> TempDir {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::create_dir_all(r.join("etc/conf.d")).unwrap();
    fs::create_dir_all(r.join("usr/bin")).unwrap();
    fs::write(r.join("etc/hostname"), "box\n").unwrap();
    fs::write(r.join("etc/conf.d/a.conf"), "a=1\n").unwrap();
    fs::write(r.join("usr/bin/tool"), vec![7u8; 10_000]).unwrap();
    fs::set_permissions(r.join("usr/bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
    t
}

/// A fresh cache in its own temporary directory.
pub fn make_cache() -> (TempDir, ImageCache) {
    let t = tempfile::tempdir().unwrap();
    let c = ImageCache::open(&t.path().join("cache")).unwrap();
    (t, c)
}

/// Running as root (mounts, device nodes, chown).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Prints why a check did not run. Never counts as a pass of that check.
pub fn skipped(what: &str, why: &str) {
    eprintln!("SKIPPED: {what}: {why}");
}

/// Files in the cache directory other than images, locks and the version memo.
pub fn stray_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            !(n.ends_with(".erofs") || n.ends_with(".lock") || n == "mkfs-erofs-version")
        })
        .collect()
}

/// Writes an executable shell script.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Runs a command, returning (success, stdout+stderr).
pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run {cmd}: {e}")),
    }
}

/// A mount undone on drop (`umount`, lazily if busy).
pub struct MountGuard(pub PathBuf);

impl MountGuard {
    /// `mount ARGS... target`; `Err(output)` if it fails.
    pub fn mount(args: &[&str], target: &Path) -> Result<Self, String> {
        let mut all: Vec<&str> = args.to_vec();
        all.push(target.to_str().unwrap());
        let (ok, out) = run("mount", &all);
        if ok {
            Ok(Self(target.to_path_buf()))
        } else {
            Err(out)
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let p = self.0.to_str().unwrap();
        if !run("umount", &[p]).0 {
            let _ = run("umount", &["-l", p]);
        }
    }
}
