//! Shared helpers: run `kata-snap` as a child process (one per test, so a crashing guest or VMM
//! cannot take the test runner down), with deadlines so nothing hangs.

#![allow(dead_code)]

pub mod runtime_env;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_kata-snap");

/// Whether /dev/kvm can be used; when not, the caller prints SKIPPED and returns.
pub fn kvm_usable() -> bool {
    let ok = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: /dev/kvm is not accessible on this host");
    }
    ok
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Asserts the failure is one clear line, with no panic or backtrace.
    pub fn assert_one_line_error(&self, needle: &str) {
        assert_eq!(self.code(), 1, "stderr: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line, got: {:?}", self.stderr);
        assert!(lines[0].starts_with("kata-snap: error: "), "{}", lines[0]);
        assert!(
            lines[0].contains(needle),
            "{:?} not in {:?}",
            needle,
            lines[0]
        );
        assert!(!self.stderr.contains("panicked") && !self.stderr.contains("backtrace"));
    }
}

/// Runs `kata-snap ARGS` to completion, killing it after `timeout` (and failing the test).
pub fn run(args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    run_command(cmd, timeout)
}

pub fn run_command(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn kata-snap");
    collect(child, timeout, &format!("kata-snap {:?}", cmd.get_args()))
}

/// Waits for `child` (spawned with piped stdout and stderr) up to `timeout` and returns what it
/// printed; panics naming `what` when it does not finish in time.
pub fn collect(mut child: Child, timeout: Duration, what: &str) -> Output {
    let status = wait_deadline(&mut child, timeout)
        .unwrap_or_else(|| panic!("{what} did not finish within {timeout:?}"));
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Waits for `child` up to `timeout`; kills it and returns None when it is still running.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots a built-in guest with `extra` arguments.
pub fn boot_builtin(guest: &str, extra: &[&str]) -> Output {
    let kernel = format!("builtin:{guest}");
    let mut args = vec!["boot", "--kernel", kernel.as_str()];
    args.extend_from_slice(extra);
    run(&args, Duration::from_secs(60))
}

/// A VM running in the background with its serial console in a file and a control socket.
pub struct BackgroundVm {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub serial: PathBuf,
    pub sock: PathBuf,
    pub stderr: PathBuf,
}

impl BackgroundVm {
    /// `kata-snap boot --kernel KERNEL EXTRA...` in the background.
    pub fn start(kernel: &str, extra: &[&str]) -> Self {
        let mut args = vec!["boot", "--kernel", kernel];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    /// `kata-snap restore --snapshot DIR --mode MODE` in the background.
    pub fn start_restore(snapshot: &Path, mode: &str) -> Self {
        Self::spawn(&[
            "restore",
            "--mode",
            mode,
            "--snapshot",
            snapshot.to_str().unwrap(),
        ])
    }

    /// `kata-snap restore --snapshot DIR --mode MODE EXTRA...` in the background.
    pub fn start_restore_with(snapshot: &Path, mode: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "restore",
            "--mode",
            mode,
            "--snapshot",
            snapshot.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    /// Runs `kata-snap ARGS --serial-log <tmp> --api-sock <tmp>` and waits for its socket.
    fn spawn(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let sock = dir.path().join("api.sock");
        let stderr = dir.path().join("stderr.log");
        let child = Command::new(BIN)
            .args(args)
            .arg("--serial-log")
            .arg(&serial)
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn kata-snap");
        let vm = Self {
            child,
            dir,
            serial,
            sock,
            stderr,
        };
        vm.wait_for(
            || vm.sock.exists(),
            Duration::from_secs(20),
            "control socket",
        );
        vm
    }

    pub fn serial_text(&self) -> String {
        fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Polls `cond` until true or `timeout`; panics naming `what` on timeout.
    pub fn wait_for(&self, mut cond: impl FnMut() -> bool, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; serial: {}",
                self.serial_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kata-snap vm ACTION --api-sock SOCK`.
    pub fn vm(&self, action: &str) -> Output {
        run(
            &["vm", action, "--api-sock", self.sock.to_str().unwrap()],
            Duration::from_secs(20),
        )
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_deadline(&mut self.child, timeout).expect("VM did not exit in time")
    }
}

impl Drop for BackgroundVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Highest `tick N` the spin guest has printed.
pub fn last_tick(serial: &str) -> u64 {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A container record as the runtime writes it, whose "supervisor" is `pid` (a stand-in
/// process: the runtime follows its pid and start time).
pub fn plant(root: &Path, id: &str, pid: i32, status: &str) -> PathBuf {
    plant_with_bundle(root, id, pid, status, Path::new("/bundles/x"))
}

/// As [`plant`], for the bundle in `bundle`.
pub fn plant_with_bundle(root: &Path, id: &str, pid: i32, status: &str, bundle: &Path) -> PathBuf {
    let dir = root.join(id);
    fs::create_dir_all(&dir).unwrap();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let record = serde_json::json!({
        "id": id,
        "bundle": bundle,
        "rootfs": bundle.join("rootfs"),
        "created": "2026-11-27T19:25:34.000000000Z",
        "annotations": std::collections::BTreeMap::from([("k", "v")]),
        "pid": pid,
        "pid_start": start,
        "status": status,
        "exit_code": null,
    });
    fs::write(dir.join("state.json"), record.to_string()).unwrap();
    dir
}
