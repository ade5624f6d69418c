//! Pause, resume, status and stop through the control socket on a running guest.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{BackgroundVm, kvm_usable, last_tick};

#[test]
fn test_control_pause_freezes_guest_resume_continues_stop_exits_4() {
    if !kvm_usable() {
        return;
    }
    let mut vm = BackgroundVm::start("builtin:spin", &[]);
    vm.wait_for(
        || last_tick(&vm.serial_text()) >= 2,
        Duration::from_secs(20),
        "ticks",
    );

    let out = vm.vm("pause");
    assert_eq!(
        (out.code(), out.stdout.trim()),
        (0, "paused"),
        "{}",
        out.stderr
    );
    let frozen = last_tick(&vm.serial_text());
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        last_tick(&vm.serial_text()),
        frozen,
        "a paused guest must not run"
    );
    let status: serde_json::Value = serde_json::from_str(&vm.vm("status").stdout).unwrap();
    assert_eq!(status["state"], "paused");

    let out = vm.vm("resume");
    assert_eq!((out.code(), out.stdout.trim()), (0, "running"));
    vm.wait_for(
        || last_tick(&vm.serial_text()) > frozen + 1,
        Duration::from_secs(20),
        "ticks after resume",
    );

    let out = vm.vm("stop");
    assert_eq!((out.code(), out.stdout.trim()), (0, "stopping"));
    let status = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(4));
    assert!(
        vm.stderr_text()
            .contains("kata-snap: stopped by a control request")
    );
    assert!(
        !vm.sock.exists(),
        "the control socket is removed when the VM ends"
    );
}

#[test]
fn test_control_status_reports_vm_shape_and_counters() {
    if !kvm_usable() {
        return;
    }
    let vm = BackgroundVm::start("builtin:spin", &["--vcpus", "2", "--mem-mib", "128"]);
    vm.wait_for(
        || last_tick(&vm.serial_text()) >= 1,
        Duration::from_secs(20),
        "first tick",
    );
    let out = vm.vm("status");
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let s: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(s["state"], "running");
    assert_eq!(s["vcpus"], 2);
    assert_eq!(s["memory_mib"], 128);
    assert!(s["uptime_ms"].as_u64().unwrap() > 0);
    assert!(s["exits"]["pio_out"].as_u64().unwrap() >= s["serial_bytes"].as_u64().unwrap());
    assert!(s["serial_bytes"].as_u64().unwrap() >= 6, "{s}");
    assert!(
        s["ready_ms"].as_f64().unwrap() > 0.0,
        "spin signals READY after its first tick"
    );
    assert!(s["first_serial_byte_ms"].as_f64().unwrap() <= s["ready_ms"].as_f64().unwrap());
    assert!(s["host"]["summary"].as_str().unwrap().len() > 10);
    assert_eq!(s["pid"].as_u64().unwrap(), u64::from(vm.child.id()));
}

fn raw_exchange(sock: &std::path::Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    line
}

#[test]
fn test_control_bad_requests_get_errors_and_vm_keeps_running() {
    if !kvm_usable() {
        return;
    }
    let vm = BackgroundVm::start("builtin:spin", &[]);
    let r: serde_json::Value =
        serde_json::from_str(&raw_exchange(&vm.sock, b"{\"action\":\"dance\"}\n")).unwrap();
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().starts_with("bad request"),
        "{r}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&raw_exchange(&vm.sock, b"not json\n")).unwrap();
    assert_eq!(r["ok"], false);
    let huge = vec![b'x'; 10_000];
    let r: serde_json::Value = serde_json::from_str(&raw_exchange(&vm.sock, &huge)).unwrap();
    assert!(r["error"].as_str().unwrap().contains("longer than"), "{r}");

    let out = vm.vm("resume");
    assert_eq!(out.code(), 1);
    assert!(out.stderr.contains("not paused"), "{}", out.stderr);
    assert_eq!(vm.vm("pause").code(), 0);
    let out = vm.vm("pause");
    assert!(out.stderr.contains("already paused"), "{}", out.stderr);
    // Several requests on one connection each get a reply.
    let mut s = UnixStream::connect(&vm.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"{\"action\":\"status\"}\n{\"action\":\"resume\"}\n")
        .unwrap();
    let mut reader = BufReader::new(&s);
    let (mut a, mut b) = (String::new(), String::new());
    reader.read_line(&mut a).unwrap();
    reader.read_line(&mut b).unwrap();
    assert!(a.contains("\"state\":\"paused\""), "{a}");
    assert_eq!(b.trim(), r#"{"ok":true,"state":"running"}"#);
}

#[test]
fn test_sigterm_and_sigint_stop_vm_cleanly() {
    if !kvm_usable() {
        return;
    }
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let mut vm = BackgroundVm::start("builtin:spin", &[]);
        vm.wait_for(
            || last_tick(&vm.serial_text()) >= 1,
            Duration::from_secs(20),
            "first tick",
        );
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(vm.child.id() as i32, sig) }, 0);
        let status = vm.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(code));
        assert!(
            vm.stderr_text()
                .contains(&format!("stopped by signal {sig}")),
            "{}",
            vm.stderr_text()
        );
        assert!(!vm.sock.exists());
    }
}

#[test]
fn test_api_sock_in_use_is_refused() {
    if !kvm_usable() {
        return;
    }
    let vm = BackgroundVm::start("builtin:spin", &[]);
    let out = common::run(
        &[
            "boot",
            "--kernel",
            "builtin:hello",
            "--api-sock",
            vm.sock.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    out.assert_one_line_error("is in use by a running VMM");
    assert_eq!(vm.vm("status").code(), 0, "the first VM keeps its socket");
}

#[test]
fn test_stale_api_sock_file_is_replaced() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let out = common::run(
        &[
            "boot",
            "--kernel",
            "builtin:hello",
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
}
