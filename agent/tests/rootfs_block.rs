//! The VM's rootfs path: a block device holding an erofs or ext4 image,
//! mounted read-only under a tmpfs-backed overlay. Here the block device is a
//! read-only loop device over an image built from the busybox rootfs.

mod common;

use std::path::Path;
use std::process::Command;

use agent_protocol::{ErrorKind, FsType, RootfsSource};
use common::{Agent, out};

/// A loop device, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Builds an image of `rootfs` with `fs` and attaches it read-only.
fn image(rootfs: &Path, dir: &Path, fs: &str) -> Option<Loop> {
    let img = dir.join(format!("rootfs.{fs}"));
    let made = match fs {
        "erofs" => Command::new("mkfs.erofs")
            .arg("-q")
            .arg(&img)
            .arg(rootfs)
            .output(),
        _ => Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(rootfs)
            .arg(&img)
            .arg("16M")
            .output(),
    };
    match made {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIPPED: mkfs.{fs} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Err(e) => {
            println!(
                "SKIPPED: mkfs.{fs} not available ({e}); apt-get install erofs-utils e2fsprogs"
            );
            return None;
        }
    }
    match Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&img)
        .output()
    {
        Ok(o) if o.status.success() => {
            Some(Loop(String::from_utf8_lossy(&o.stdout).trim().to_owned()))
        }
        other => {
            println!("SKIPPED: cannot attach a loop device: {other:?}");
            None
        }
    }
}

fn run_on_block(fs_name: &str, fs: Option<FsType>) {
    require_harness!();
    let agent = Agent::start();
    let Some(dev) = image(&agent.rootfs, &agent.dir.path, fs_name) else {
        return;
    };
    let mut req = agent.request(&[
        "sh",
        "-c",
        "grep -c ' / overlay ' /proc/mounts; echo w > /f && cat /f",
    ]);
    req.rootfs.source = RootfsSource::Block {
        device: dev.0.clone(),
        fs,
    };
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(
        (o.code, out(&o).as_str()),
        (0, "1\nw\n"),
        "{o:?}\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains(&format!("fs=\"{fs_name}\""))
            || agent.log().contains(&format!("fs={fs_name}")),
        "{}",
        agent.log()
    );
}

#[test]
fn test_rootfs_block_erofs_image_detected_and_overlaid() {
    run_on_block("erofs", None);
}

#[test]
fn test_rootfs_block_ext4_image_detected_after_erofs_fails() {
    run_on_block("ext4", None);
}

#[test]
fn test_rootfs_block_ext4_image_explicit_type() {
    run_on_block("ext4", Some(FsType::Ext4));
}

#[test]
fn test_rootfs_block_wrong_type_clear_error() {
    require_harness!();
    let agent = Agent::start();
    let Some(dev) = image(&agent.rootfs, &agent.dir.path, "ext4") else {
        return;
    };
    let mut req = agent.request(&["true"]);
    req.rootfs.source = RootfsSource::Block {
        device: dev.0.clone(),
        fs: Some(FsType::Erofs),
    };
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 126);
    let (kind, msg) = o.error.unwrap();
    assert_eq!(kind, ErrorKind::Rootfs);
    assert!(
        msg.contains(&format!(
            "cannot mount rootfs device {} read-only as erofs",
            dev.0
        )),
        "{msg}"
    );
}

#[test]
fn test_rootfs_block_missing_device_clear_error() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["true"]);
    req.rootfs.source = RootfsSource::Block {
        device: "/dev/no-such-disk".into(),
        fs: None,
    };
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 126);
    let msg = o.error.unwrap().1;
    assert!(msg.contains("as erofs or ext4"), "{msg}");
}
