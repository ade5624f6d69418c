//! Rung 3 of the test ladder: Debian's cloud kernel boots under `kata-snap boot`, and its banner and
//! its e820 map (matching --mem-mib) appear on the serial console; then the VM is stopped through
//! the control socket.
//!
//! The kernel comes from `scripts/fetch-linux-kernel.sh` (run by `.ci/run`): the package's bzImage
//! and the ELF vmlinux extracted from it. Set KATA_SNAP_LINUX_DIR to use another directory.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{BackgroundVm, kvm_usable};
use vmm::layout::MemoryLayout;

fn kernel_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KATA_SNAP_LINUX_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("KATA_SNAP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kata-snap")
        });
    cache.join("linux")
}

/// The kernel file, or None after printing why the test is skipped. In CI a missing kernel fails.
fn kernel(name: &str) -> Option<PathBuf> {
    let path = kernel_dir().join(name);
    if path.exists() {
        return Some(path);
    }
    let why = format!(
        "{} not found: run scripts/fetch-linux-kernel.sh",
        path.display()
    );
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must fetch the Linux kernel: {why}"
    );
    eprintln!("SKIPPED: {why}");
    None
}

/// What Linux prints for one e820 entry: `BIOS-e820: [mem 0x...-0x...] usable` (end inclusive).
fn linux_e820_line(addr: u64, size: u64) -> String {
    format!(
        "BIOS-e820: [mem {:#018x}-{:#018x}] usable",
        addr,
        addr + size - 1
    )
}

#[test]
fn test_linux_vmlinux_prints_banner_and_e820_map() {
    if !kvm_usable() {
        return;
    }
    let Some(vmlinux) = kernel("vmlinux") else {
        return;
    };
    let mem = 512u64;
    // An initrd of an odd size: Linux reports where it found it, which must be where the VMM put it
    // (page-aligned at the top of low RAM).
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.img");
    let initrd_len = 300_000u64;
    std::fs::write(&initrd, vec![0x5au8; initrd_len as usize]).unwrap();
    let initrd_start = ((mem << 20) - initrd_len) & !0xfff;
    let ramdisk_line = format!(
        "RAMDISK: [mem {:#010x}-{:#010x}]",
        initrd_start,
        (mem << 20) - 1
    );
    let mut vm = BackgroundVm::start(
        vmlinux.to_str().unwrap(),
        &[
            "--mem-mib",
            &mem.to_string(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 earlyprintk=serial reboot=k panic=1 pci=off",
        ],
    );
    let want: Vec<String> = MemoryLayout::new(mem)
        .unwrap()
        .e820()
        .iter()
        .map(|e| linux_e820_line(e.addr, e.size))
        .collect();
    // Emulated guest code (kvm_pvm) needs about 20 s to get here; hardware KVM well under one.
    vm.wait_for(
        || {
            let s = vm.serial_text();
            s.contains("Linux version ")
                && want.iter().all(|w| s.contains(w.as_str()))
                && s.contains(&ramdisk_line)
        },
        Duration::from_secs(300),
        "the Linux banner, e820 map and initrd",
    );
    let serial = vm.serial_text();
    let banner = serial
        .lines()
        .find(|l| l.contains("Linux version "))
        .unwrap();
    assert!(banner.contains("cloud-amd64"), "{banner}");
    let got: Vec<&str> = serial
        .lines()
        .filter(|l| l.contains("BIOS-e820:"))
        .collect();
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (g, w) in got.iter().zip(&want) {
        assert!(g.ends_with(w.as_str()), "{g} != {w}");
    }
    // Linux read our command line from boot_params.
    assert!(
        serial.contains("Command line: console=ttyS0 earlyprintk=serial reboot=k panic=1 pci=off")
    );

    let stop = vm.vm("stop");
    let status = vm.wait_exit(Duration::from_secs(30));
    // On hardware KVM the kernel may already have panicked (no root fs) and rebooted: exit 0.
    if stop.code() == 0 {
        assert_eq!(status.code(), Some(4), "{}", vm.stderr_text());
    } else {
        assert_eq!(status.code(), Some(0), "{}", vm.stderr_text());
    }
}

#[test]
fn test_linux_bzimage_enters_its_decompressor_with_our_boot_params() {
    if !kvm_usable() {
        return;
    }
    let Some(bzimage) = kernel("vmlinuz") else {
        return;
    };
    let vm = BackgroundVm::start(
        bzimage.to_str().unwrap(),
        &[
            "--mem-mib",
            "256",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial",
        ],
    );
    // The decompressor sets up the UART only when it finds earlyprintk=serial in the command line
    // it reads through boot_params: 8 port writes to COM1 and one read. On an emulated host it
    // then spends minutes decompressing, so the test stops there.
    vm.wait_for(
        || {
            let out = vm.vm("status");
            let s: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
            s["exits"]["pio_out"].as_u64().unwrap_or(0) >= 8 || s.is_null()
        },
        Duration::from_secs(120),
        "the bzImage decompressor's serial set-up",
    );
    let out = vm.vm("stop");
    assert!(
        out.code() == 0 || vm.serial_text().contains("Linux version"),
        "{}",
        out.stderr
    );
}
