//! Clones of one template in the sharing mode (`mmap-prefetch`): each writes its own data to a
//! page they all share with the template and reads its own back, the template is unchanged, and
//! the clean pages are shared, as the host's memory accounting (Pss) shows against the private
//! copies of `uffd` clones.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, kvm_usable, run, wait_deadline};

const T: Duration = Duration::from_secs(120);
const TOUCH_MIB: u64 = 8;

struct CloneVm {
    child: Child,
    serial: PathBuf,
}

impl CloneVm {
    fn start(template: &Path, mode: &str, dir: &Path, i: usize) -> Self {
        let serial = dir.join(format!("{mode}-{i}.log"));
        let child = Command::new(BIN)
            .args(["restore", "--mode", mode, "--snapshot"])
            .arg(template)
            .arg("--serial-log")
            .arg(&serial)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, serial }
    }

    fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + T;
        while !self.serial_text().contains(needle) {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the clone exited early: {}",
                self.serial_text()
            );
            assert!(
                Instant::now() < deadline,
                "no {needle:?}: {}",
                self.serial_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, b: u8) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(&[b]).unwrap();
        stdin.flush().unwrap();
    }

    /// Proportional set size of the VMM process in KiB.
    fn pss_kib(&self) -> u64 {
        let text =
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.child.id())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }
}

/// Runs 8 clones in `mode`; each writes its own byte to the shared first page. Returns the mean
/// Pss per clone in KiB, taken while all of them are alive after their read-back.
fn clones(template: &Path, mode: &str, dir: &Path) -> u64 {
    let mut vms: Vec<CloneVm> = (0..8)
        .map(|i| CloneVm::start(template, mode, dir, i))
        .collect();
    for vm in &mut vms {
        vm.wait_for("memtouch: OK");
    }
    for (i, vm) in vms.iter_mut().enumerate() {
        vm.send(b'a' + i as u8);
    }
    for (i, vm) in vms.iter_mut().enumerate() {
        vm.wait_for(&format!("memtouch: clone {} ok", b'a' + i as u8));
    }
    let pss: u64 = vms.iter().map(CloneVm::pss_kib).sum::<u64>() / vms.len() as u64;
    for vm in &mut vms {
        vm.send(b'x');
        let status = wait_deadline(&mut vm.child, T).expect("the clone did not exit");
        assert!(status.success(), "{mode}: {}", vm.serial_text());
        assert!(!vm.serial_text().contains("FAIL"), "{}", vm.serial_text());
    }
    pss
}

fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

#[test]
fn test_shared_clones_write_own_page_keep_template_and_share_clean_pages() {
    if !kvm_usable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let template = root.path().join("template");
    let cmdline = format!("touch_mib={TOUCH_MIB} touch_base_mib=16 clone=1");
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:memtouch",
            "--mem-mib",
            "128",
            "--cmdline",
            &cmdline,
            "--snapshot-on-ready",
            template.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    // Record the working set (the guest reads back its area; two bytes let it finish).
    let mut rec = Command::new(BIN)
        .args(["restore", "--mode", "uffd", "--snapshot"])
        .arg(&template)
        .arg("--record-workingset")
        .arg(template.join("workingset"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    rec.stdin.as_mut().unwrap().write_all(b"zz").unwrap();
    assert!(wait_deadline(&mut rec, T).unwrap().success());
    let before = files(&template);

    let shared = clones(&template, "mmap-prefetch", root.path());
    let private = clones(&template, "uffd", root.path());
    eprintln!("Pss per clone: mmap-prefetch {shared} KiB, uffd {private} KiB");
    // Each uffd clone holds its own copy of the TOUCH_MIB it read back; shared clones hold an
    // eighth of one copy each, plus the one page they wrote.
    assert!(
        shared + (TOUCH_MIB * 1024) / 2 < private,
        "clean pages are not shared: mmap-prefetch {shared} KiB vs uffd {private} KiB per clone"
    );
    assert_eq!(files(&template), before, "the template is unchanged");
}
