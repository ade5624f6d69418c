//! Bad input gets one clear line and a non-zero exit: no panic, no backtrace, no hang.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{BIN, run, run_command};

const T: Duration = Duration::from_secs(20);

#[test]
fn test_missing_kernel_file_is_one_line_error() {
    run(&["boot", "--kernel", "/nonexistent/vmlinux"], T).assert_one_line_error(
        "cannot open kernel /nonexistent/vmlinux: No such file or directory",
    );
}

#[test]
fn test_directory_as_kernel_is_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    run(&["boot", "--kernel", dir.path().to_str().unwrap()], T)
        .assert_one_line_error("cannot open kernel");
}

#[test]
fn test_file_that_is_not_a_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("notes.txt");
    std::fs::write(&f, "just some text, long enough to look at ".repeat(40)).unwrap();
    run(&["boot", "--kernel", f.to_str().unwrap()], T)
        .assert_one_line_error("neither an ELF vmlinux nor a bzImage");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    run(&["boot", "--kernel", empty.to_str().unwrap()], T)
        .assert_one_line_error("neither an ELF vmlinux nor a bzImage");
    // A 32-bit ELF is refused before anything is created.
    let elf32 = dir.path().join("elf32");
    let mut bytes = vec![0u8; 64];
    bytes[..4].copy_from_slice(b"\x7fELF");
    bytes[4] = 1;
    std::fs::write(&elf32, bytes).unwrap();
    run(&["boot", "--kernel", elf32.to_str().unwrap()], T)
        .assert_one_line_error("not a 64-bit x86 executable");
}

#[test]
fn test_truncated_elf_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("cut.elf");
    std::fs::write(&f, &test_guests::HELLO.elf[..200]).unwrap();
    let out = run(&["boot", "--kernel", f.to_str().unwrap()], T);
    if !common::kvm_usable() {
        return;
    }
    out.assert_one_line_error("cannot load the Elf kernel");
}

#[test]
fn test_memory_too_small_or_too_large_is_refused() {
    run(&["boot", "--kernel", "builtin:hello", "--mem-mib", "8"], T)
        .assert_one_line_error("too small: at least 16 MiB");
    run(
        &["boot", "--kernel", "builtin:hello", "--mem-mib", "900000"],
        T,
    )
    .assert_one_line_error("more than this host's");
    run(
        &[
            "boot",
            "--kernel",
            "builtin:hello",
            "--mem-mib",
            "99999999999",
        ],
        T,
    )
    .assert_one_line_error("too large");
}

#[test]
fn test_vcpu_count_out_of_range_is_refused() {
    run(&["boot", "--kernel", "builtin:hello", "--vcpus", "0"], T).assert_one_line_error("--vcpus");
    run(&["boot", "--kernel", "builtin:hello", "--vcpus", "33"], T)
        .assert_one_line_error("between 1 and 32, not 33");
    // A count past the type's range gets the same message.
    run(&["boot", "--kernel", "builtin:hello", "--vcpus", "256"], T)
        .assert_one_line_error("between 1 and 32, not 256");
}

#[test]
fn test_unknown_builtin_guest_lists_the_known_ones() {
    run(&["boot", "--kernel", "builtin:nope"], T).assert_one_line_error("there are: hello, ready");
}

#[test]
fn test_missing_initrd_is_one_line_error() {
    run(
        &[
            "boot",
            "--kernel",
            "builtin:hello",
            "--initrd",
            "/nonexistent/initrd",
        ],
        T,
    )
    .assert_one_line_error("cannot open initrd /nonexistent/initrd");
}

#[test]
fn test_vm_command_without_vmm_says_how_to_fix() {
    run(&["vm", "status", "--api-sock", "/nonexistent/api.sock"], T)
        .assert_one_line_error("is the VM running with --api-sock");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn test_no_dev_kvm_is_one_line_error() {
    // A private mount namespace with an empty /dev: /dev/kvm does not exist there.
    if !have("unshare") || !is_root() {
        eprintln!("SKIPPED: needs root and unshare(1) to hide /dev/kvm");
        return;
    }
    let mut cmd = Command::new("unshare");
    cmd.args([
        "-m",
        "sh",
        "-c",
        &format!("mount -t tmpfs none /dev && exec {BIN} boot --kernel builtin:hello"),
    ]);
    let out = run_command(cmd, T);
    if out.stderr.contains("unshare failed") || out.stderr.contains("mount:") {
        eprintln!(
            "SKIPPED: cannot create a mount namespace here: {}",
            out.stderr.trim()
        );
        return;
    }
    out.assert_one_line_error("cannot open /dev/kvm: No such file or directory");
    assert!(
        out.stderr.contains("KVM is not available"),
        "{}",
        out.stderr
    );
}

#[test]
fn test_no_permission_on_dev_kvm_is_one_line_error() {
    if !have("setpriv") || !is_root() {
        eprintln!("SKIPPED: needs root and setpriv(1) to drop to an unprivileged user");
        return;
    }
    let meta = std::fs::metadata("/dev/kvm");
    if meta
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 != 0)
        .unwrap_or(true)
    {
        eprintln!("SKIPPED: /dev/kvm is missing or world-accessible here");
        return;
    }
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        BIN,
        "boot",
        "--kernel",
        "builtin:hello",
    ]);
    run_command(cmd, T).assert_one_line_error("no permission");
}

#[test]
fn test_help_answers_the_main_questions() {
    let out = run(&["boot", "--help"], T);
    assert_eq!(out.code(), 0);
    // Help text is wrapped to the terminal: compare with whitespace collapsed.
    let text = out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        "--kernel",
        "builtin:hello",
        "--mem-mib",
        "[default: 256]",
        "--vcpus",
        "--api-sock",
        "--serial-log",
        "Exit status",
    ] {
        assert!(text.contains(needle), "boot --help lacks {needle}");
    }
    let out = run(&["vm", "--help"], T);
    for needle in ["pause", "resume", "status", "stop", "JSON"] {
        assert!(out.stdout.contains(needle), "vm --help lacks {needle}");
    }
}

#[test]
fn test_snapshot_on_ready_into_missing_directory_is_refused_before_boot() {
    let out = run(
        &[
            "boot",
            "--kernel",
            "builtin:ready",
            "--snapshot-on-ready",
            "/nonexistent-kata-snap-dir/snap",
        ],
        T,
    );
    out.assert_one_line_error("its parent directory does not exist");
    assert!(
        out.stdout.is_empty(),
        "the guest must not run: {}",
        out.stdout
    );
}
