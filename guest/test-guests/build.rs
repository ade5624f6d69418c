//! Compiles every test guest in `guests/` into `$OUT_DIR/<name>.elf` with the
//! system C compiler (`gcc`, or `$CC` if set).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One C file per guest: `guests/<name>.c`. Keep in sync with `src/lib.rs`.
const GUESTS: &[&str] = &[
    "hello",
    "ready",
    "bootinfo",
    "memtouch",
    "compute",
    "spin",
    "triplefault",
    "halt",
    "pio",
    "virtioblk",
    "vsock",
    "hostile",
    "agent",
    "net",
];

/// Further sources (and headers) of a guest split over several files, besides `<name>.c`.
const GUEST_EXTRA_FILES: &[(&str, &[&str])] = &[
    (
        "hostile",
        &["hostile.h", "hostile_virtio.c", "hostile_requests.c"],
    ),
    ("agent", &["agent.h", "agent_protocol.c"]),
];

/// Sources linked into every guest.
const COMMON_SOURCES: &[&str] = &["start.S", "lib.c"];

/// Files every guest depends on besides its own C file (the headers are shared by some guests:
/// `virtio_mmio.h` is the polled virtio-mmio driver of `virtioblk`, `vsock` and `hostile`).
const COMMON_DEPS: &[&str] = &[
    "start.S",
    "lib.c",
    "lib.h",
    "algo.h",
    "params.h",
    "virtio_mmio.h",
    "link.ld",
];

const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-fno-stack-protector",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mno-sse",
    "-mno-mmx",
    "-nostdlib",
    "-static",
    "-O2",
    "-Wall",
    "-Werror",
    "-fno-asynchronous-unwind-tables",
    // No endbr64 / CET notes: plain code only.
    "-fcf-protection=none",
    // Stop gcc from turning loops (including memset's own) into libc calls.
    "-fno-tree-loop-distribute-patterns",
    "-Wl,--build-id=none",
    // 4 KiB segment alignment keeps each ELF a few KiB (linux-loader 0.14 does not require
    // 2 MiB-aligned segments; the default 2 MiB max-page-size would pad every file to 1 MiB).
    "-Wl,-z,max-page-size=0x1000",
];

fn main() {
    let manifest_dir = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").expect("test-guests: CARGO_MANIFEST_DIR is not set"),
    );
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("test-guests: OUT_DIR is not set"));
    let src_dir = manifest_dir.join("guests");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    for dep in COMMON_DEPS {
        println!("cargo:rerun-if-changed={}", src_dir.join(dep).display());
    }
    for guest in GUESTS {
        println!(
            "cargo:rerun-if-changed={}",
            src_dir.join(format!("{guest}.c")).display()
        );
    }
    for (_, files) in GUEST_EXTRA_FILES {
        for file in *files {
            println!("cargo:rerun-if-changed={}", src_dir.join(file).display());
        }
    }

    // `CC` may carry a wrapper and arguments, e.g. "ccache gcc".
    let cc = env::var("CC")
        .ok()
        .filter(|cc| !cc.trim().is_empty())
        .unwrap_or_else(|| "gcc".to_owned());
    let cc_words: Vec<&str> = cc.split_whitespace().collect();

    for guest in GUESTS {
        build_guest(guest, &cc_words, &src_dir, &out_dir);
    }
}

fn build_guest(guest: &str, cc: &[&str], src_dir: &Path, out_dir: &Path) {
    let output = out_dir.join(format!("{guest}.elf"));
    let mut cmd = Command::new(cc[0]);
    cmd.args(&cc[1..])
        .args(CFLAGS)
        .arg(format!("-Wl,-T,{}", src_dir.join("link.ld").display()))
        .arg("-I")
        .arg(src_dir)
        .args(COMMON_SOURCES.iter().map(|s| src_dir.join(s)))
        .arg(src_dir.join(format!("{guest}.c")))
        .args(
            GUEST_EXTRA_FILES
                .iter()
                .filter(|(name, _)| *name == guest)
                .flat_map(|(_, files)| files.iter())
                .filter(|f| f.ends_with(".c"))
                .map(|f| src_dir.join(f)),
        )
        .arg("-o")
        .arg(&output);
    let shown = format!("{cmd:?}");

    let result = match cmd.output() {
        Ok(result) => result,
        Err(err) => panic!(
            "test-guests: cannot build guest `{guest}`: failed to run C compiler `{}` \
             (install gcc or set CC): {err}; command: {shown}",
            cc[0]
        ),
    };
    if !result.status.success() {
        let stderr = String::from_utf8_lossy(&result.stderr);
        // Full, multi-line compiler output is shown by cargo with the panic.
        eprintln!("{stderr}");
        let one_line: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        panic!(
            "test-guests: building guest `{guest}` failed ({}): {}; command: {shown}",
            result.status,
            one_line.join(" | ")
        );
    }
}
