//! Tiny 64-bit test guests ("kernels") for the kata-snap integration tests.
//!
//! Each guest is a static ELF64 x86-64 executable linked at 1 MiB, built from
//! `guests/*.c` by `build.rs` with the system C compiler. The VMM loads it
//! with linux-loader at its `p_paddr`s and enters it at `e_entry` following
//! the Linux x86-64 64-bit boot protocol:
//!
//! - 64-bit long mode, `CS=0x08`, `DS/ES/SS=0x10`, identity map of
//!   guest-physical `0..4 GiB` (2 MiB pages), `RFLAGS=0x2`;
//! - `RSI` = guest-physical address of the Linux `boot_params` zero page
//!   (`e820_entries` at `0x1e8`, `e820_table` at `0x2d0`,
//!   `hdr.cmd_line_ptr` at `0x228`, `ext_cmd_line_ptr` at `0x0c8`,
//!   `hdr.cmdline_size` at `0x238`);
//! - `RSP` is not used: the guest switches to its own 16 KiB stack in `.bss`.
//!
//! Devices the guests use:
//!
//! - serial: 8250 UART COM1 at I/O port `0x3f8` (polling LSR `0x3fd` bit 5);
//!   lines end in a bare `\n`;
//! - guest signal port `0xf4`: writing `1` means READY;
//! - exit: i8042 reset, `outb(0x64, 0xfe)`, followed by `cli; hlt` forever.
//!
//! Parameters are read from the kernel command line as whitespace-separated
//! `key=value` words with decimal values (the last occurrence wins; a value
//! that does not start with a digit leaves the default; parsing stops at the
//! first non-digit). Numbers are printed in decimal, or as lowercase hex with
//! a `0x` prefix and no padding where noted.
//!
//! Instruction counts below are for the defaults; this project's CI host
//! runs guest code at about 1 million instructions per second.

#![deny(missing_docs)]

use std::fmt;

/// A compiled test guest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TestGuest {
    /// Short unique name, also the C file name (`guests/<name>.c`).
    pub name: &'static str,
    /// Absolute path of the ELF file (`$OUT_DIR/<name>.elf`) for VMMs that
    /// take a kernel path.
    pub path: &'static str,
    /// The ELF image itself (same bytes as the file at `path`).
    pub elf: &'static [u8],
}

impl fmt::Debug for TestGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestGuest")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("elf_len", &self.elf.len())
            .finish()
    }
}

macro_rules! test_guest {
    ($name:literal) => {
        TestGuest {
            name: $name,
            path: concat!(env!("OUT_DIR"), "/", $name, ".elf"),
            elf: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".elf")),
        }
    };
}

/// `hello`: prints one line and exits.
///
/// Output: `Hello from kata-snap test guest\n`, then i8042 reset.
/// Parameters: none. About 1 k instructions plus 32 serial bytes.
/// Used to time process start to first serial byte.
pub const HELLO: TestGuest = test_guest!("hello");

/// `ready`: the smallest guest that signals READY.
///
/// Output: `ready: signalling\n`, then READY (`1` to port `0xf4`), then
/// `ready: done\n`, then i8042 reset. Parameters: none. About 1 k
/// instructions. Used for boot-to-READY timing.
pub const READY: TestGuest = test_guest!("ready");

/// `bootinfo`: echoes the command line and the e820 map.
///
/// Output, in order:
/// - `cmdline: <cmdline>\n`: the exact command line bytes, up to the NUL
///   (bounded by `hdr.cmdline_size` when it is nonzero, and by 4096 bytes);
///   empty if `cmd_line_ptr` is 0 or beyond the 4 GiB identity map;
/// - `e820 entries: <n>\n` (decimal);
/// - for each entry: `e820: addr=0x<hex> size=0x<hex> type=<dec>\n`;
/// - `bootinfo: done\n`; then i8042 reset.
///
/// If `e820_entries` > 128 it prints `bootinfo: bad e820 count\n` right after
/// the cmdline line and resets. Parameters: none. A few k instructions.
pub const BOOTINFO: TestGuest = test_guest!("bootinfo");

/// `memtouch`: writes one value per 4 KiB page of a RAM range, signals READY,
/// then verifies everything.
///
/// Parameters: `touch_mib=N` (default [`MEMTOUCH_DEFAULT_TOUCH_MIB`] = 8) and
/// `touch_base_mib=M` (default [`MEMTOUCH_DEFAULT_TOUCH_BASE_MIB`] = 16): the
/// range is `[M MiB, (M + N) MiB)`, `pages = N * 256`.
///
/// Page `idx` (0-based, relative to the base) gets the 64-bit value
/// [`memtouch_value`]`(idx)` at byte offset [`memtouch_offset`]`(idx)`.
///
/// Output:
/// - `memtouch: range not in RAM\n` + reset if the range is not entirely
///   covered by e820 type-1 entries (or `M + N > 4096`);
/// - `memtouch: range overlaps guest image\n` + reset if `N > 0` and
///   `M < 8` (the guest image, stack and boot data live below 8 MiB);
/// - phase 1: `memtouch: wrote <pages> pages\n`;
/// - phase 2: READY (`1` to port `0xf4`), then `memtouch: ready\n` (a
///   snapshot taken at the READY exit must see all phase 1 writes);
/// - phase 3: `memtouch: verified <pages> pages checksum=0x<hex>\n` and
///   `memtouch: OK\n` (checksum = [`memtouch_checksum`]`(pages)`), or
///   `memtouch: FAIL page=<idx>\n` (decimal, relative index) on the first
///   mismatch; then i8042 reset.
///
/// With `clone=1` (clones of one template): after `memtouch: OK` it waits for
/// one byte `B` on the serial port, fills the range's first page with `B`,
/// checks it reads back, prints `memtouch: clone <B decimal> ok\n` (or
/// `memtouch: clone FAIL\n`), then waits for one more byte before the reset.
///
/// Defaults: 2048 pages, about 60 k instructions plus 2048 first touches
/// (about 80 ms at 40 µs each).
pub const MEMTOUCH: TestGuest = test_guest!("memtouch");

/// `compute`: a long deterministic computation with progress output.
///
/// Parameters: `iters=N` (default [`COMPUTE_DEFAULT_ITERS`] = 130000, clamped
/// to 2^56) and `ready_at=P` (percent; absent or > 100 means never).
///
/// Output:
/// - `compute: <p>%\n` for p = 10, 20, ..., 100 (decimal, no `0%` line);
/// - if `ready_at=P` is given: `compute: ready at <P>%\n` followed by READY
///   (`1` to port `0xf4`) once `P`% of the iterations are done; for `P` a
///   multiple of 10 it comes right after the `compute: <P>%` line, and
///   `ready_at=0` fires before the first iteration;
/// - `compute: result=0x<hex>\n` with the value of [`compute_result`]`(N)`;
///   then i8042 reset.
///
/// All state is in registers and on the stack, so a snapshot taken at the
/// READY exit and restored must print the same result. Each iteration is 7
/// instructions: about 0.9 M instructions with the default (measured
/// 1.2 s for 150000 iterations on a nested-KVM dev host, so ~1 s).
pub const COMPUTE: TestGuest = test_guest!("compute");

/// `spin`: runs forever, printing ticks (for control-socket tests).
///
/// Parameter: `tick_iters=N` busy-loop iterations between ticks (default
/// [`SPIN_DEFAULT_TICK_ITERS`] = 28000, 3 instructions each: about 85 k
/// instructions plus the tick line, ~100 ms here; measured 120 ms per tick
/// with 33000).
///
/// Output: `tick <n>\n` with n = 1, 2, 3, ... (decimal) after every busy
/// loop; READY (`1` to port `0xf4`) once, right after `tick 1`. Never exits
/// by itself. The tick counter lives in `.bss`.
pub const SPIN: TestGuest = test_guest!("spin");

/// `triplefault`: makes the vCPU triple fault.
///
/// Output: `triplefault: now\n`, then it loads an IDT with limit 0 and
/// executes `ud2`, which triple-faults (#UD -> #GP -> #DF -> shutdown): KVM
/// reports `KVM_EXIT_SHUTDOWN`. (`int3` is avoided: on a nested KVM host it
/// is emulated and gives `KVM_EXIT_INTERNAL_ERROR` instead.) Parameters:
/// none.
pub const TRIPLEFAULT: TestGuest = test_guest!("triplefault");

/// `halt`: halts with interrupts disabled.
///
/// Output: `halt: interrupts off\n`, then `cli; hlt` in a loop (KVM reports
/// `KVM_EXIT_HLT` with IF=0). Parameters: none.
pub const HALT: TestGuest = test_guest!("halt");

/// `pio`: a tight loop of port writes, for measuring PIO exits per second.
///
/// Parameter: `iters=N` (default [`PIO_DEFAULT_ITERS`]). Output: `pio: start\n`, READY, then
/// `iters` one-byte writes to port `0x80` (no device: one unhandled PIO exit each), then
/// `pio: done <iters>\n`, exit via i8042.
pub const PIO: TestGuest = test_guest!("pio");

/// `virtioblk`: a polled virtio-blk driver over virtio-mmio, for the device path through KVM.
///
/// Finds the device from the `disk_index=N`-th (default 0) `virtio_mmio.device=4K@0x<base>:<irq>`
/// on the command line, negotiates
/// VIRTIO_F_VERSION_1 (and RO when offered), sets up queue 0, and prints one line per step:
/// `virtioblk: base=0x..`, `virtioblk: capacity=<sectors> ro|rw`,
/// `virtioblk: read sector 0 status=<s> data=<first printable bytes, up to 16>`,
/// `virtioblk: write sector <n> status=<s>` (parameter `write_sector=N`, default 1; the sector is
/// filled with `KATA-SNAP-WROTE!` then bytes `(i * 7 + n) as u8`), `virtioblk: read back status=<s>
/// match|differs`, `virtioblk: flush status=<s>`, `virtioblk: id status=<s> id=<id>`,
/// `virtioblk: read past end status=<s>`, `virtioblk: done`; or `virtioblk: FAIL <why>`. Exits via
/// i8042.
pub const VIRTIOBLK: TestGuest = test_guest!("virtioblk");

/// `vsock`: a polled virtio-vsock driver over virtio-mmio that opens connections to a host port,
/// for hostile-guest tests of the vsock device.
///
/// Finds the device from the `dev_index=N`-th (default 0) `virtio_mmio.device=` on the command
/// line, negotiates VIRTIO_F_VERSION_1, sets up its three queues, and sends `conns=N` (default 1,
/// at most 60000) connection REQUESTs to host port `port=P` (default 5000) from guest ports
/// 10000, 10001, ..., without waiting for answers. Output: `vsock: sent <N>`, READY, then (once
/// every request has its RESPONSE or RST) `vsock: responses=<r> rst=<s>`; then it spins forever.
/// `vsock: FAIL <why>` and an i8042 exit on a driver error.
pub const VSOCK: TestGuest = test_guest!("vsock");

/// `net`: a polled virtio-net driver over virtio-mmio that asks the host for its MAC with ARP.
///
/// Finds the device from the `dev_index=N`-th (default 0) `virtio_mmio.device=` on the command
/// line, negotiates VIRTIO_F_VERSION_1, MAC and STATUS (no offloads, no mergeable buffers), sets
/// up its two queues and posts receive buffers. Output: `net: mac=<aa:bb:..> link=<0|1>`, READY
/// (a template is snapshotted here), then once the link is up (a restore that attaches a tap
/// announces it) `net: link up`; then it sends ARP requests for `10.<subnet>.0.1` from
/// `10.<subnet>.0.2` (`subnet=N`, default 77) until the reply arrives: `net: arp reply from
/// <host mac> to <the mac the host answered> after <n> requests`, and an i8042 exit. `net: FAIL <why>` and an exit on a driver error,
/// a link that never comes up or no reply.
pub const NET: TestGuest = test_guest!("net");

/// `hostile`: a malicious virtio-mmio driver and bus prodder for the hostile-guest campaign
/// (`runtime-cli/tests/hostile_guest.rs`). Every choice comes from a PRNG seeded by `seed=N`.
///
/// Sets up every announced virtio device (block, vsock, rng, net) as a polled driver, then runs
/// `iters=N` (default 200) steps: requests with broken chains (loops, next or head out of range,
/// indirect descriptors, buffers outside RAM or in MMIO, lengths 0/huge/wrapping, wrong
/// directions, available index far ahead or back) and device-level malice (block requests of
/// every type with sectors past the end, bad framing and segments; vsock packets with bad
/// headers, ops, CIDs, ports and lengths, and real traffic to host port `port=P`, default 5000;
/// rng requests with odd buffers; net transmit chains with random or broken headers and frames of
/// any length, receive buffers re-posted sometimes broken), transport attacks (bad queue sizes or ring addresses, status
/// bits out of order, unoffered features, bad selects and notifies, config and register accesses
/// of every width, a reset with a request in flight), random port I/O (never the i8042 reset)
/// and random MMIO in the 3-4 GiB gap (never the IOAPIC or LAPIC page). A device it broke is
/// reset and set up again. Writes that could reach the writable disk go to sectors
/// `[wlo, whi)` (default none) or must be refused.
///
/// Output: `hostile: seed=<n> iters=<n> devices=<n>`, `hostile: dev <i> type=<id> base=0x<hex>`
/// (block: ` capacity=<sectors> ro|rw`) per device, `hostile: ANOMALY <what> dev=<i>` for each
/// answer the virtio spec forbids (a refused write reported OK, a bad status byte, a wrong used
/// id, more rng bytes than buffer, a net transmit chain written to, a bad received frame), then `hostile: summary` with ` key=<decimal>` figures (`blk`,
/// `blk_ok`, `blk_ioerr`, `blk_unsupp`, `vsock_tx`, `vsock_rx`, `net_tx`, `net_rx`, `rng`, `rng_bytes`,
/// `chain_attacks`, `transport`, `regs`, `pio`, `mmio`, `needs_reset`, `late`, `reset_under`,
/// `quiet`, `stalls`, `inits`, `init_fail`, `anomalies`, and more), `hostile: done`, and an i8042
/// exit. `hostile: stall dev=<i> q=<q> ...` when a live device left well-formed requests
/// unanswered for about 10 s (TSC). `hostile: FAIL <why>` + exit
/// when there is no device or the scratch area (16..32 MiB) is not RAM.
pub const HOSTILE: TestGuest = test_guest!("hostile");

/// `agent`: a stand-in for the guest agent that speaks enough of the agent protocol for
/// `kata-snap run`, `create` and `start` to complete against it (the runtime's config key
/// `testGuest`), so the host path can be run and timed where KVM cannot boot Linux at speed. It
/// runs no process and mounts nothing.
///
/// Finds the virtio-vsock device among the `virtio_mmio.device=` entries, sets it up (polled,
/// interrupts off), prints `agent: listening on 1024`, signals READY, then serves one connection
/// at a time on vsock port 1024 (a new REQUEST replaces the old one; a TRANSPORT_RESET after a
/// restore drops it): `Hello` is answered `Hello{4}`, `SyncTime` and `Reseed` `Ack`, `Create`
/// `Created{pid}` (pids from 100) or `Error{ExecNotFound}` with `exec: "NAME": executable file
/// not found in $PATH`, `Signal(N)` before `Start` `Exited{128+N}`, `Start` `Started{pid}`,
/// `Stdout`, `Stderr`, `Exited{status}` then a vsock SHUTDOWN; `Stdin`, `CloseStdin` and
/// `Resize` are ignored, anything else is `Error{Protocol}`; a frame over 16 KiB is skipped and
/// answered `Error{InvalidRequest}`.
///
/// The "process", by the basename of `args[0]`: `echo W...` prints the words joined by spaces
/// and a newline (status 0); `true`, `false` give 0 and 1; `sh -c SCRIPT` runs `;`-separated
/// commands split on spaces (no quoting): `echo`, `true`, `false`, `exit [N]`, anything else
/// prints `sh: CMD: not found` on stderr with status 127; `sh` alone gives 0; any other name is
/// not found. Output is cut at 1 KiB per stream. `agent: FAIL <why>` and an i8042 exit on a
/// driver error.
pub const AGENT: TestGuest = test_guest!("agent");

/// Every test guest.
pub const ALL: &[TestGuest] = &[
    HELLO,
    READY,
    BOOTINFO,
    MEMTOUCH,
    COMPUTE,
    SPIN,
    TRIPLEFAULT,
    HALT,
    PIO,
    VIRTIOBLK,
    VSOCK,
    HOSTILE,
    AGENT,
    NET,
];

/// Finds a test guest by its [`TestGuest::name`].
pub fn by_name(name: &str) -> Option<&'static TestGuest> {
    ALL.iter().find(|guest| guest.name == name)
}

/// Default `touch_mib` of [`MEMTOUCH`].
pub const MEMTOUCH_DEFAULT_TOUCH_MIB: u64 = 8;
/// Default `touch_base_mib` of [`MEMTOUCH`].
pub const MEMTOUCH_DEFAULT_TOUCH_BASE_MIB: u64 = 16;
/// Default `iters` of [`COMPUTE`].
pub const COMPUTE_DEFAULT_ITERS: u64 = 130_000;
/// Default `tick_iters` of [`SPIN`].
pub const SPIN_DEFAULT_TICK_ITERS: u64 = 28_000;
/// Default `iters` of [`PIO`].
pub const PIO_DEFAULT_ITERS: u64 = 10_000;

const GOLDEN64: u64 = 0x9E37_79B9_7F4A_7C15;
const COMPUTE_SEED: u64 = 0x0123_4567_89AB_CDEF;
const COMPUTE_MAX_ITERS: u64 = 1 << 56;

/// The 64-bit value [`MEMTOUCH`] stores in page `idx` (relative to the base).
pub fn memtouch_value(idx: u64) -> u64 {
    idx.wrapping_add(1).wrapping_mul(GOLDEN64) ^ 0x5A5A_5A5A_5A5A_5A5A
}

/// The byte offset inside page `idx` where [`MEMTOUCH`] stores its value.
pub fn memtouch_offset(idx: u64) -> u64 {
    idx.wrapping_mul(72) & 0xff8
}

/// The checksum [`MEMTOUCH`] prints after verifying `pages` pages
/// (`touch_mib * 256`); independent of the base.
pub fn memtouch_checksum(pages: u64) -> u64 {
    (0..pages).fold(0, |sum, idx| sum.rotate_left(7) ^ memtouch_value(idx))
}

/// The result [`COMPUTE`] prints for `iters=iters`.
pub fn compute_result(iters: u64) -> u64 {
    (0..iters.min(COMPUTE_MAX_ITERS)).fold(COMPUTE_SEED, |x, i| {
        let x = x ^ (x >> 29);
        x.wrapping_mul(GOLDEN64).wrapping_add(i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const PF_X: u32 = 1;
    const MIB: u64 = 1 << 20;

    struct Elf {
        class: u8,
        data: u8,
        e_type: u16,
        e_machine: u16,
        e_entry: u64,
        phdrs: Vec<Phdr>,
    }

    struct Phdr {
        p_type: u32,
        p_flags: u32,
        p_offset: u64,
        p_vaddr: u64,
        p_paddr: u64,
        p_filesz: u64,
        p_memsz: u64,
        p_align: u64,
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Minimal ELF64 little-endian header + program header parser.
    fn parse(b: &[u8]) -> Elf {
        assert!(b.len() >= 64, "file too short for an ELF64 header");
        assert_eq!(&b[..4], b"\x7fELF", "bad ELF magic");
        let phoff = usize::try_from(u64_at(b, 0x20)).unwrap();
        let phentsize = usize::from(u16_at(b, 0x36));
        let phnum = usize::from(u16_at(b, 0x38));
        assert_eq!(phentsize, 56, "unexpected e_phentsize");
        assert!(phoff >= 64 && phoff + phnum * phentsize <= b.len());
        let phdrs = (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Phdr {
                    p_type: u32_at(b, p),
                    p_flags: u32_at(b, p + 4),
                    p_offset: u64_at(b, p + 8),
                    p_vaddr: u64_at(b, p + 16),
                    p_paddr: u64_at(b, p + 24),
                    p_filesz: u64_at(b, p + 32),
                    p_memsz: u64_at(b, p + 40),
                    p_align: u64_at(b, p + 48),
                }
            })
            .collect();
        Elf {
            class: b[4],
            data: b[5],
            e_type: u16_at(b, 0x10),
            e_machine: u16_at(b, 0x12),
            e_entry: u64_at(b, 0x18),
            phdrs,
        }
    }

    fn loads(elf: &Elf) -> impl Iterator<Item = &Phdr> {
        elf.phdrs.iter().filter(|p| p.p_type == PT_LOAD)
    }

    #[test]
    fn test_elf_header_all_guests_is_elf64_x86_64_exec() {
        for guest in ALL {
            let elf = parse(guest.elf);
            assert_eq!(elf.class, 2, "{}: not ELFCLASS64", guest.name);
            assert_eq!(elf.data, 1, "{}: not little endian", guest.name);
            assert_eq!(elf.e_type, 2, "{}: not ET_EXEC", guest.name);
            assert_eq!(elf.e_machine, 62, "{}: not EM_X86_64", guest.name);
        }
    }

    #[test]
    fn test_program_headers_all_guests_have_no_interp_or_dynamic() {
        for guest in ALL {
            let elf = parse(guest.elf);
            for p in &elf.phdrs {
                assert_ne!(p.p_type, PT_INTERP, "{}: has PT_INTERP", guest.name);
                assert_ne!(p.p_type, PT_DYNAMIC, "{}: has PT_DYNAMIC", guest.name);
            }
        }
    }

    #[test]
    fn test_entry_all_guests_is_inside_executable_load() {
        for guest in ALL {
            let elf = parse(guest.elf);
            let inside = loads(&elf).any(|p| {
                p.p_flags & PF_X != 0
                    && p.p_paddr <= elf.e_entry
                    && elf.e_entry < p.p_paddr + p.p_filesz
            });
            assert!(
                inside,
                "{}: e_entry {:#x} not in an executable PT_LOAD",
                guest.name, elf.e_entry
            );
        }
    }

    #[test]
    fn test_load_segments_all_guests_lie_between_1mib_and_8mib() {
        for guest in ALL {
            let elf = parse(guest.elf);
            assert!(loads(&elf).count() > 0, "{}: no PT_LOAD", guest.name);
            for p in loads(&elf) {
                assert!(p.p_paddr >= MIB, "{}: p_paddr {:#x}", guest.name, p.p_paddr);
                assert!(
                    p.p_paddr + p.p_memsz <= 8 * MIB,
                    "{}: segment ends at {:#x}",
                    guest.name,
                    p.p_paddr + p.p_memsz
                );
                assert_eq!(p.p_vaddr, p.p_paddr, "{}: vaddr != paddr", guest.name);
            }
        }
    }

    #[test]
    fn test_load_segments_all_guests_are_loadable_by_linux_loader() {
        for guest in ALL {
            let elf = parse(guest.elf);
            for p in loads(&elf) {
                // Page-aligned segments, so the file stays small and loads at p_paddr.
                assert_eq!(p.p_align % 0x1000, 0, "{}: p_align", guest.name);
                assert!(
                    guest.elf.len() < 64 * 1024,
                    "{}: ELF is {} bytes",
                    guest.name,
                    guest.elf.len()
                );
                assert!(p.p_filesz <= p.p_memsz, "{}: filesz > memsz", guest.name);
                let end = p.p_offset + p.p_filesz;
                assert!(end <= guest.elf.len() as u64, "{}: truncated", guest.name);
                // linux-loader skips segments with no file bytes when computing
                // kernel_end; .bss must be inside a loaded segment.
                assert!(p.p_filesz > 0, "{}: PT_LOAD with p_filesz 0", guest.name);
            }
        }
    }

    #[test]
    fn test_load_segments_all_guests_do_not_overlap() {
        for guest in ALL {
            let elf = parse(guest.elf);
            let segs: Vec<&Phdr> = loads(&elf).collect();
            for (i, a) in segs.iter().enumerate() {
                for b in &segs[i + 1..] {
                    let disjoint =
                        a.p_paddr + a.p_memsz <= b.p_paddr || b.p_paddr + b.p_memsz <= a.p_paddr;
                    assert!(disjoint, "{}: overlapping PT_LOADs", guest.name);
                }
            }
        }
    }

    #[test]
    fn test_names_all_guests_are_unique() {
        for (i, a) in ALL.iter().enumerate() {
            for b in &ALL[i + 1..] {
                assert_ne!(a.name, b.name);
            }
        }
    }

    #[test]
    fn test_by_name_each_guest_is_found() {
        for guest in ALL {
            assert_eq!(by_name(guest.name), Some(guest));
        }
    }

    #[test]
    fn test_by_name_unknown_name_returns_none() {
        assert_eq!(by_name("no-such-guest"), None);
        assert_eq!(by_name(""), None);
    }

    #[test]
    fn test_path_all_guests_holds_embedded_elf() {
        for guest in ALL {
            assert!(guest.path.ends_with(&format!("/{}.elf", guest.name)));
            let on_disk = std::fs::read(guest.path).unwrap();
            assert_eq!(on_disk, guest.elf, "{}: file differs", guest.name);
        }
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[test]
    fn test_strings_each_guest_contains_its_documented_output() {
        let expected: &[(&TestGuest, &[&str])] = &[
            (&HELLO, &["Hello from kata-snap test guest\n"]),
            (&READY, &["ready: signalling\n", "ready: done\n"]),
            (
                &BOOTINFO,
                &[
                    "cmdline: ",
                    "e820 entries: ",
                    "e820: addr=",
                    " size=",
                    " type=",
                    "bootinfo: done\n",
                    "bootinfo: bad e820 count\n",
                ],
            ),
            (
                &MEMTOUCH,
                &[
                    "touch_mib",
                    "touch_base_mib",
                    "memtouch: range not in RAM\n",
                    "memtouch: range overlaps guest image\n",
                    "memtouch: wrote ",
                    " pages\n",
                    "memtouch: ready\n",
                    "memtouch: verified ",
                    " pages checksum=",
                    "memtouch: OK\n",
                    "memtouch: FAIL page=",
                ],
            ),
            (
                &COMPUTE,
                &[
                    "iters",
                    "ready_at",
                    "compute: ",
                    "%\n",
                    "compute: ready at ",
                    "compute: result=",
                ],
            ),
            (&SPIN, &["tick_iters", "tick "]),
            (&TRIPLEFAULT, &["triplefault: now\n"]),
            (&HALT, &["halt: interrupts off\n"]),
            (&PIO, &["iters", "pio: start\n", "pio: done "]),
            (
                &VIRTIOBLK,
                &["virtio_mmio.device=", "virtioblk: done\n", "write_sector"],
            ),
            (&VSOCK, &["virtio_mmio.device=", "vsock: sent ", "conns"]),
            (
                &NET,
                &[
                    "virtio_mmio.device=",
                    "net: link up\n",
                    "net: arp reply from ",
                    "subnet",
                ],
            ),
            (
                &AGENT,
                &[
                    "agent: listening on ",
                    "executable file not found in $PATH",
                    ": not found\n",
                    "virtio_mmio.device=",
                ],
            ),
            (
                &HOSTILE,
                &[
                    "virtio_mmio.device=",
                    "seed",
                    "hostile: summary",
                    "hostile: done\n",
                    "hostile: ANOMALY ",
                ],
            ),
        ];
        assert_eq!(expected.len(), ALL.len());
        for (guest, strings) in expected {
            for s in *strings {
                assert!(contains(guest.elf, s), "{}: missing {s:?}", guest.name);
            }
        }
    }

    #[test]
    fn test_defaults_params_h_matches_rust_constants() {
        let params = include_str!("../guests/params.h");
        let value = |name: &str| -> u64 {
            let line = params
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name))
                .unwrap_or_else(|| panic!("{name} not in params.h"));
            let raw = line.split_whitespace().nth(2).unwrap();
            raw.trim_end_matches("ULL").parse().unwrap()
        };
        assert_eq!(
            value("MEMTOUCH_DEFAULT_TOUCH_MIB"),
            MEMTOUCH_DEFAULT_TOUCH_MIB
        );
        assert_eq!(
            value("MEMTOUCH_DEFAULT_TOUCH_BASE_MIB"),
            MEMTOUCH_DEFAULT_TOUCH_BASE_MIB
        );
        assert_eq!(value("COMPUTE_DEFAULT_ITERS"), COMPUTE_DEFAULT_ITERS);
        assert_eq!(value("SPIN_DEFAULT_TICK_ITERS"), SPIN_DEFAULT_TICK_ITERS);
    }

    #[test]
    fn test_memtouch_offset_any_index_is_aligned_inside_page() {
        for idx in 0..4096 {
            let off = memtouch_offset(idx);
            assert_eq!(off % 8, 0);
            assert!(off + 8 <= 4096);
        }
        // Not always offset 0: all 512 slots are used by 512 consecutive pages.
        let mut slots: Vec<u64> = (0..512).map(memtouch_offset).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), 512);
    }

    #[test]
    fn test_memtouch_checksum_known_inputs_match_guest_formula() {
        // Values cross-checked against guests/algo.h compiled for the host and
        // against the output of the guest booted under a KVM smoke runner.
        assert_eq!(memtouch_checksum(0), 0);
        assert_eq!(memtouch_checksum(1), memtouch_value(0));
        assert_eq!(
            memtouch_checksum(2),
            memtouch_value(0).rotate_left(7) ^ memtouch_value(1)
        );
        assert_eq!(memtouch_checksum(2048), MEMTOUCH_CHECKSUM_2048);
        assert_eq!(memtouch_checksum(8192), 0x9fab_d1b3_689e_ab98);
    }

    #[test]
    fn test_compute_result_known_inputs_match_guest_formula() {
        // Values cross-checked against guests/algo.h compiled for the host and
        // against the output of the guest booted under a KVM smoke runner.
        assert_eq!(compute_result(0), COMPUTE_SEED);
        assert_eq!(
            compute_result(COMPUTE_DEFAULT_ITERS),
            COMPUTE_RESULT_DEFAULT
        );
        assert_eq!(compute_result(1000), 0xb0e2_6246_c55b_b2cb);
        assert_ne!(compute_result(1000), compute_result(1001));
    }

    const MEMTOUCH_CHECKSUM_2048: u64 = 0x1322_0ff4_c19e_b771;
    const COMPUTE_RESULT_DEFAULT: u64 = 0xf8db_bace_84ed_1535;
}
