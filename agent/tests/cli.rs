//! The binary's command line and its refusal to run VM mode on a host.

use std::process::Command;

#[test]
fn test_cli_vm_mode_outside_pid1_refused_clearly() {
    let o = Command::new(env!("CARGO_BIN_EXE_kata-agent"))
        .args([
            "--listen",
            "vsock:5999",
            "--state-dir",
            "/nonexistent/never-created",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("only runs as PID 1"), "{err}");
    assert!(!std::path::Path::new("/nonexistent/never-created").exists());
}

#[test]
fn test_cli_bad_listen_address_rejected() {
    let o = Command::new(env!("CARGO_BIN_EXE_kata-agent"))
        .args(["--listen", "tcp:1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("expected vsock, vsock:PORT or unix:PATH"),
        "{err}"
    );
}
