//! One writer or many readers per disk image: a second read-write `--disk` on an image, in the same
//! VM or another one, is refused with one line naming the file; the lock goes with the VM.

mod common;

use std::time::Duration;

use common::{BackgroundVm, boot_builtin, kvm_usable, path_str};

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

#[test]
fn test_disk_same_image_twice_read_write_in_one_vm_is_refused() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let out = boot_builtin(
        "hello",
        &["--disk", path_str(&img), "--disk", path_str(&img)],
    );
    out.assert_one_line_error(&format!("disk image {} is in use", img.display()));
}

#[test]
fn test_disk_same_image_twice_read_only_boots() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let ro = format!("{},ro", img.display());
    let out = boot_builtin("hello", &["--disk", &ro, "--disk", &ro]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
}

#[test]
fn test_disk_second_vm_writer_refused_until_first_vm_ends() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut first = BackgroundVm::start("builtin:spin", &["--disk", path_str(&img)]);

    let out = boot_builtin("hello", &["--disk", path_str(&img)]);
    out.assert_one_line_error(&format!("disk image {} is in use", img.display()));
    let ro = format!("{},ro", img.display());
    let out = boot_builtin("hello", &["--disk", &ro]);
    out.assert_one_line_error(&format!("disk image {} is in use", img.display()));

    first.vm("stop");
    first.wait_exit(Duration::from_secs(20));
    let out = boot_builtin("hello", &["--disk", path_str(&img)]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
}
