//! The VM lifecycle's promises to whoever restores a template: clones get their own host
//! resources, a restore never writes into the snapshot (a read-only template restores in every
//! mode, many times at once), and parts of different snapshots are never restored together (in
//! `snapshot_corruption.rs`).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, BackgroundVm, collect, kvm_usable, last_tick, run};

const T: Duration = Duration::from_secs(120);

/// Every file under `dir` with its bytes, and its mode bits (nothing may be added, changed or
/// removed by a restore).
fn tree(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        out.insert(
            e.path(),
            (fs::read(e.path()).unwrap(), meta.permissions().mode()),
        );
    }
    out
}

/// Makes `dir` read-only for real: a read-only bind mount as root (root ignores permission bits),
/// `chmod -R a-w` otherwise. Returns the read-only path and a guard that undoes it.
struct ReadOnly {
    path: PathBuf,
    mounted: bool,
}

impl ReadOnly {
    fn new(dir: &Path, at: &Path) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            fs::create_dir(at).unwrap();
            let ok = |args: &[&str]| {
                Command::new("mount")
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !ok(&["--bind", dir.to_str().unwrap(), at.to_str().unwrap()]) {
                eprintln!("SKIPPED: cannot bind-mount the template read-only");
                return None;
            }
            let ro = ok(&["-o", "remount,bind,ro", at.to_str().unwrap()]);
            let guard = Self {
                path: at.to_path_buf(),
                mounted: true,
            };
            if !ro {
                eprintln!("SKIPPED: cannot remount the template read-only");
                return None;
            }
            Some(guard)
        } else {
            assert!(
                Command::new("chmod")
                    .args(["-R", "a-w", dir.to_str().unwrap()])
                    .status()
                    .unwrap()
                    .success()
            );
            Some(Self {
                path: dir.to_path_buf(),
                mounted: false,
            })
        }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.path).status();
        } else {
            let _ = Command::new("chmod")
                .args(["-R", "u+w", self.path.to_str().unwrap()])
                .status();
        }
    }
}

#[test]
fn test_read_only_template_restores_in_every_mode_eight_at_once_and_stays_identical() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let template = root.path().join("template");
    let pages = 4 * 256;
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:memtouch",
            "--mem-mib",
            "64",
            "--cmdline",
            "touch_mib=4 touch_base_mib=16",
            "--snapshot-on-ready",
            template.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    // The template step: record the working set into the template, then freeze it.
    let ws = template.join("workingset");
    let out = run(
        &[
            "restore",
            "--snapshot",
            template.to_str().unwrap(),
            "--mode",
            "uffd",
            "--record-workingset",
            ws.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(ws.exists());
    let before = tree(&template);
    let Some(ro) = ReadOnly::new(&template, &root.path().join("ro")) else {
        return;
    };
    // Writing into the template must really fail now.
    assert!(fs::write(ro.path.join("probe"), b"x").is_err());

    let want = format!(
        "memtouch: ready\nmemtouch: verified {pages} pages checksum={:#x}\nmemtouch: OK\n",
        test_guests::memtouch_checksum(pages)
    );
    for mode in ["eager", "mmap", "uffd", "uffd-prefetch", "mmap-prefetch"] {
        let children: Vec<_> = (0..8)
            .map(|_| {
                Command::new(BIN)
                    .args(["restore", "--mode", mode, "--snapshot"])
                    .arg(&ro.path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (i, child) in children.into_iter().enumerate() {
            let out = collect(child, T, "a restore");
            assert!(out.status.success(), "{mode} clone {i}: {}", out.stderr);
            assert_eq!(out.stdout, want, "{mode} clone {i}");
        }
    }
    drop(ro);
    assert_eq!(
        tree(&template),
        before,
        "the template's files are byte-identical after 40 restores"
    );
}

#[test]
fn test_two_clones_each_get_their_own_vsock_socket() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let template = root.path().join("template");
    let original = root.path().join("original.vsock");
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:spin",
            "--vsock",
            &format!("3,{}", original.display()),
            "--snapshot-on-ready",
            template.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let before = tree(&template);

    // Without a socket of its own, a restore is refused before any VM exists.
    let out = run(&["restore", "--snapshot", template.to_str().unwrap()], T);
    out.assert_one_line_error("give its host socket with --vsock PATH");

    let paths: Vec<PathBuf> = (0..2)
        .map(|i| root.path().join(format!("clone{i}.vsock")))
        .collect();
    let clones: Vec<BackgroundVm> = paths
        .iter()
        .map(|p| {
            BackgroundVm::start_restore_with(&template, "uffd", &["--vsock", p.to_str().unwrap()])
        })
        .collect();
    for (vm, path) in clones.iter().zip(&paths) {
        vm.wait_for(|| last_tick(&vm.serial_text()) >= 2, T, "the clone to run");
        vm.wait_for(
            || path.exists(),
            Duration::from_secs(10),
            "the clone's vsock socket",
        );
        // The host reaches each clone through its own socket.
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        drop(s);
    }
    assert!(
        !original.exists(),
        "no clone binds the snapshotted VM's socket"
    );
    for mut vm in clones {
        let out = vm.vm("stop");
        assert_eq!(out.code(), 0, "{}", out.stderr);
        assert_eq!(vm.wait_exit(Duration::from_secs(20)).code(), Some(4));
    }
    for p in &paths {
        assert!(!p.exists(), "{} is removed when its VM ends", p.display());
    }
    assert_eq!(tree(&template), before, "the template is untouched");
}

#[test]
fn test_control_snapshot_path_must_be_absolute() {
    if !kvm_usable() {
        return;
    }
    let vm = BackgroundVm::start("builtin:spin", &[]);
    vm.wait_for(|| last_tick(&vm.serial_text()) >= 1, T, "the guest to run");
    let out = run(
        &["vm", "status", "--api-sock", vm.sock.to_str().unwrap()],
        T,
    );
    assert_eq!(out.code(), 0);
    let resp = vmm::control::send_request(
        &vm.sock,
        vmm::control::ControlRequest::Snapshot {
            path: "relative-snap".into(),
        },
    )
    .unwrap();
    assert!(!resp.ok);
    assert!(
        resp.error
            .as_deref()
            .unwrap_or_default()
            .contains("must be absolute"),
        "{resp:?}"
    );
    assert!(!Path::new("relative-snap").exists());
}

#[test]
fn test_read_only_spare_slot_is_shared_by_clones_read_write_one_is_not() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let image = root.path().join("rootfs.img");
    fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    for (slot, shared) in [("rootfs,ro", true), ("rootfs", false)] {
        let template = root.path().join(format!("template-{shared}"));
        let out = run(
            &[
                "boot",
                "--kernel",
                "builtin:spin",
                "--disk-slot",
                slot,
                "--snapshot-on-ready",
                template.to_str().unwrap(),
            ],
            T,
        );
        assert_eq!(out.code(), 0, "{}", out.stderr);
        let backing = format!("rootfs={}", image.display());
        let first = BackgroundVm::start_restore_with(&template, "uffd", &["--disk-slot", &backing]);
        first.wait_for(
            || last_tick(&first.serial_text()) >= 2,
            T,
            "the first clone",
        );
        if shared {
            let second =
                BackgroundVm::start_restore_with(&template, "uffd", &["--disk-slot", &backing]);
            second.wait_for(
                || last_tick(&second.serial_text()) >= 2,
                T,
                "the second clone",
            );
            assert_eq!(second.vm("stop").code(), 0);
        } else {
            let out = run(
                &[
                    "restore",
                    "--snapshot",
                    template.to_str().unwrap(),
                    "--disk-slot",
                    &backing,
                ],
                T,
            );
            out.assert_one_line_error("is in use by another disk or VM");
        }
        assert_eq!(first.vm("stop").code(), 0);
    }
    assert_eq!(fs::read(&image).unwrap(), vec![7u8; 1 << 20]);
}
