//! Boots each test guest through `kata-snap boot` and checks what it prints and how it ends.

mod common;

use common::{boot_builtin, kvm_usable};
use vmm::layout::MemoryLayout;

#[test]
fn test_boot_hello_prints_greeting_exits_zero() {
    if !kvm_usable() {
        return;
    }
    let out = boot_builtin("hello", &["--timing"]);
    assert_eq!(out.stdout, "Hello from kata-snap test guest\n");
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("kata-snap: guest reset (i8042 reset line)"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("process start -> first serial byte: "),
        "{}",
        out.stderr
    );
}

/// Parses `e820: addr=0x.. size=0x.. type=N` lines.
fn e820_lines(stdout: &str) -> Vec<(u64, u64, u32)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("e820: "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |s: &str, k: &str| {
                u64::from_str_radix(s.strip_prefix(k).unwrap().trim_start_matches("0x"), 16)
                    .unwrap()
            };
            (
                hex(f[0], "addr="),
                hex(f[1], "size="),
                f[2].strip_prefix("type=").unwrap().parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn test_boot_bootinfo_echoes_cmdline_and_e820_of_layout() {
    if !kvm_usable() {
        return;
    }
    for mem in [64u64, 256, 3072, 5000] {
        let cmdline = format!("console=ttyS0 kata.test=yes mem_case={mem}");
        let mem_arg = mem.to_string();
        let out = boot_builtin("bootinfo", &["--mem-mib", &mem_arg, "--cmdline", &cmdline]);
        assert_eq!(out.code(), 0, "{}", out.stderr);
        assert!(
            out.stdout.contains(&format!("cmdline: {cmdline}\n")),
            "{}",
            out.stdout
        );
        let want: Vec<(u64, u64, u32)> = MemoryLayout::new(mem)
            .unwrap()
            .e820()
            .iter()
            .map(|e| (e.addr, e.size, e.kind))
            .collect();
        assert_eq!(e820_lines(&out.stdout), want, "{mem} MiB");
        assert!(
            out.stdout
                .contains(&format!("e820 entries: {}\n", want.len()))
        );
        let total: u64 = want.iter().map(|e| e.1).sum();
        // All RAM but the legacy hole (EBDA up to 1 MiB) is in the map.
        assert_eq!(total, (mem << 20) - (0x10_0000 - 0x9_fc00), "{mem} MiB");
    }
}

#[test]
fn test_boot_memtouch_verifies_every_page_written() {
    if !kvm_usable() {
        return;
    }
    let out = boot_builtin("memtouch", &["--cmdline", "touch_mib=16 touch_base_mib=32"]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let pages = 16 * 256;
    assert!(
        out.stdout
            .contains(&format!("memtouch: wrote {pages} pages\n")),
        "{}",
        out.stdout
    );
    let sum = test_guests::memtouch_checksum(pages);
    assert!(
        out.stdout.contains(&format!(
            "memtouch: verified {pages} pages checksum={sum:#x}\n"
        )),
        "{}",
        out.stdout
    );
    assert!(out.stdout.ends_with("memtouch: OK\n"), "{}", out.stdout);
    // READY was signalled between writing and verifying.
    assert!(out.stderr.contains("guest READY"), "{}", out.stderr);
}

#[test]
fn test_boot_memtouch_range_outside_ram_is_reported_by_guest() {
    if !kvm_usable() {
        return;
    }
    let out = boot_builtin(
        "memtouch",
        &[
            "--mem-mib",
            "32",
            "--cmdline",
            "touch_mib=64 touch_base_mib=16",
        ],
    );
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("memtouch: range not in RAM"),
        "{}",
        out.stdout
    );
}

#[test]
fn test_boot_compute_reports_progress_and_exact_result() {
    if !kvm_usable() {
        return;
    }
    let iters = 20_000u64;
    let cmdline = format!("iters={iters} ready_at=50");
    let out = boot_builtin("compute", &["--cmdline", &cmdline]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let progress: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.ends_with('%') && !l.contains("ready"))
        .collect();
    let want: Vec<String> = (1..=10).map(|p| format!("compute: {}%", p * 10)).collect();
    assert_eq!(progress, want);
    assert!(out.stdout.contains("compute: ready at 50%"));
    let result = test_guests::compute_result(iters);
    assert!(
        out.stdout
            .contains(&format!("compute: result={result:#x}\n")),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("guest READY"), "{}", out.stderr);
}

#[test]
fn test_boot_ready_guest_logs_boot_to_ready_time() {
    if !kvm_usable() {
        return;
    }
    let out = boot_builtin("ready", &["--timing"]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(out.stdout, "ready: signalling\nready: done\n");
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("guest READY"))
        .expect("READY log line");
    assert!(line.contains("ms after process start"), "{line}");
    let ready = out
        .stderr
        .lines()
        .find(|l| l.contains("process start -> READY: "))
        .unwrap();
    assert!(ready.ends_with(" ms"), "{ready}");
}

#[test]
fn test_boot_triplefault_exits_3_with_reason() {
    if !kvm_usable() {
        return;
    }
    let out = boot_builtin("triplefault", &[]);
    assert_eq!(out.stdout, "triplefault: now\n");
    assert_eq!(out.code(), 3, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("kata-snap: guest crashed: triple fault on vCPU 0"),
        "{}",
        out.stderr
    );
}

#[test]
fn test_boot_halt_with_interrupts_off_stops_with_zero() {
    if !kvm_usable() {
        return;
    }
    let out = boot_builtin("halt", &[]);
    assert_eq!(out.stdout, "halt: interrupts off\n");
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("guest halted with interrupts disabled on every vCPU"),
        "{}",
        out.stderr
    );
}

#[test]
fn test_boot_four_vcpus_guest_runs_to_completion() {
    if !kvm_usable() {
        return;
    }
    let out = boot_builtin("ready", &["--vcpus", "4", "--mem-mib", "128"]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(out.stdout, "ready: signalling\nready: done\n");
}

#[test]
fn test_boot_serial_log_gets_console_and_stdout_stays_empty() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    std::fs::write(&log, "earlier line\n").unwrap();
    let out = boot_builtin("hello", &["--serial-log", log.to_str().unwrap()]);
    assert_eq!(out.code(), 0);
    assert_eq!(out.stdout, "");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "earlier line\nHello from kata-snap test guest\n",
        "the log is appended to"
    );
}
