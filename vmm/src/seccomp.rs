//! Per-thread seccomp filters: one allow-list per kind of VMM thread, built with `seccompiler`.
//!
//! Each thread installs its filter after its own set-up and before it handles anything a guest
//! controls: a vCPU thread before its first `KVM_RUN`, the VMM thread once the VM's devices and
//! vCPUs exist (before the event loop runs), the page server and the prefetcher when they start,
//! `kata-snap`'s main thread once the VM runs, and the helper threads of the runtime (the
//! supervisor's `vm-watch`, a pool shell's `pool-client`) before they do anything. A syscall
//! outside the list kills the process ([`SeccompMode::Kill`], the default); [`SeccompMode::Log`]
//! lets it through and logs it (the kernel log shows `comm` and `syscall=`), for finding what a
//! list lacks.
//!
//! `ioctl` is filtered by request number (its second argument, compared as the 32 bits the kernel
//! reads): each kind lists the KVM, userfaultfd and terminal requests it makes, nothing else.
//!
//! The VMM thread has two lists: [`ThreadKind::Vmm`] for a VM that may write files from its loop
//! (snapshots through the control socket or at READY, a working-set recording), and
//! [`ThreadKind::VmmSealed`] for one that cannot: no `openat`, `mkdir`, `rename`, `kill` or
//! file-writing calls at all. Once the VMM runs in a jail that holds pre-opened directories
//! (issue 21, point 2), the file-writing list can shrink to `*at` calls on those.
//!
//! The programs are compiled once per process and mode ([`Filters::new`] hands out the same
//! compiled set every time): a VM's start costs no BPF compilation.
//!
//! io_uring bypasses seccomp for the operations it runs, so every ring is created before the
//! filters and limited with `IORING_REGISTER_RESTRICTIONS` to the opcodes it uses (the event loop
//! in `event-loop`, the prefetcher's in `snapshot::source`).
//!
//! Why each syscall is allowed is written beside it below.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a filter does with a syscall outside its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// No filters (debugging).
    Off,
    /// Allow and log (debugging: the kernel log names each syscall a list lacks).
    Log,
    /// Kill the process.
    #[default]
    Kill,
}

/// The kinds of thread, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread (`KVM_RUN` loop; PIO/MMIO exits go to devices on this thread).
    Vcpu,
    /// The VMM thread of a VM that may write files from its loop: the io_uring event loop,
    /// devices' workers, control socket, snapshots and working-set recordings.
    Vmm,
    /// The userfaultfd page server.
    PageServer,
    /// The working-set prefetcher.
    Prefetch,
    /// The process's main thread while the VM runs: it waits, then reports.
    Main,
    /// A thread that supervises a VM and talks to its guest over the vsock socket (the
    /// container runtime's supervisor): it bridges stdio and signals, answers its own control
    /// socket, records state files, and tears the VM down.
    Supervisor,
    /// The VMM thread of a VM that writes no files from its loop (no control socket, no
    /// snapshot at READY, no working-set recording): the loop and the devices only.
    VmmSealed,
    /// The supervisor's `vm-watch` thread: waits for its VM's stop event, writes one byte to a
    /// pipe.
    VmWatch,
    /// A pool shell's `pool-client` thread: reads signals its client forwards, stops the VM.
    PoolClient,
}

impl ThreadKind {
    /// Every kind, in `ThreadKind as u8` order.
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vcpu,
        ThreadKind::Vmm,
        ThreadKind::PageServer,
        ThreadKind::Prefetch,
        ThreadKind::Main,
        ThreadKind::Supervisor,
        ThreadKind::VmmSealed,
        ThreadKind::VmWatch,
        ThreadKind::PoolClient,
    ];

    /// The name the SIGSYS report gives a thread of this kind.
    pub const fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vmm => "vmm",
            ThreadKind::PageServer => "page-server",
            ThreadKind::Prefetch => "prefetch",
            ThreadKind::Main => "main",
            ThreadKind::Supervisor => "supervisor",
            ThreadKind::VmmSealed => "vmm-sealed",
            ThreadKind::VmWatch => "vm-watch",
            ThreadKind::PoolClient => "pool-client",
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built.
    #[error("building the {kind:?} seccomp filter: {source}")]
    Build {
        /// Which thread kind.
        kind: ThreadKind,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The filter could not be compiled to BPF.
    #[error("compiling the {kind:?} seccomp filter: {source}")]
    Compile {
        /// Which thread kind.
        kind: ThreadKind,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The filter could not be installed.
    #[error("installing the {kind:?} seccomp filter: {source}")]
    Install {
        /// Which thread kind.
        kind: ThreadKind,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
}

/// Every thread: memory allocation, locks, time, exits, signal frames, logging to stderr.
const BASE: &[(i64, &str)] = &[
    (libc::SYS_read, "eventfds, signalfd, stdin, the uffd"),
    (
        libc::SYS_write,
        "eventfds, the serial console, logs on stderr",
    ),
    (libc::SYS_close, "dropping fds"),
    (
        libc::SYS_fcntl,
        "fd flags (std checks and sets them on stdio and clones)",
    ),
    (
        libc::SYS_futex,
        "mutexes, condition variables, channels, joins",
    ),
    (libc::SYS_sched_yield, "retry loops"),
    (libc::SYS_mmap, "the allocator"),
    (libc::SYS_munmap, "the allocator"),
    (libc::SYS_mremap, "the allocator (growing buffers)"),
    (libc::SYS_brk, "the allocator"),
    (
        libc::SYS_madvise,
        "the allocator; glibc frees an exiting thread's stack",
    ),
    (
        libc::SYS_mprotect,
        "the allocator (glibc grows a thread's heap arena)",
    ),
    (
        libc::SYS_restart_syscall,
        "a wait interrupted by a signal resumes",
    ),
    (
        libc::SYS_rt_sigprocmask,
        "std and glibc around thread exit and signal handlers",
    ),
    (libc::SYS_rt_sigreturn, "return from the vCPU kick handler"),
    (
        libc::SYS_sigaltstack,
        "std's alternate signal stack at thread exit",
    ),
    (libc::SYS_exit, "thread exit"),
    (
        libc::SYS_exit_group,
        "process exit (also how a refused syscall ends the VMM)",
    ),
    (libc::SYS_clock_gettime, "Instant when the vDSO falls back"),
    (libc::SYS_clock_nanosleep, "thread::sleep"),
    (libc::SYS_nanosleep, "thread::sleep"),
    (libc::SYS_getrandom, "std's per-thread HashMap keys"),
    (libc::SYS_gettid, "logging"),
    (libc::SYS_getpid, "status reports the pid"),
];

/// A vCPU thread.
const VCPU: &[(i64, &str)] = &[
    (
        libc::SYS_ioctl,
        "KVM_RUN; vCPU state on pause/snapshot; the halt watchdog's mp_state",
    ),
    (libc::SYS_writev, "console output through std"),
];

/// The VMM thread, whatever the VM: the loop, the devices, the control socket's connections.
const VMM: &[(i64, &str)] = &[
    (
        libc::SYS_io_uring_enter,
        "the event loop (its ring is restricted to its opcodes)",
    ),
    (
        libc::SYS_ioctl,
        "KVM VM state for snapshots (irqchip, PIT, clock), FIONBIO: by request, see `ioctls`",
    ),
    (libc::SYS_tgkill, "kicking vCPU threads out of KVM_RUN"),
    (libc::SYS_accept4, "control socket connections"),
    (
        libc::SYS_socket,
        "vsock: a guest's connection to a host listener (`<uds>_<port>`); the jail will confine \
         the paths",
    ),
    (
        libc::SYS_connect,
        "vsock: a guest's connection to a host listener (`<uds>_<port>`)",
    ),
    (libc::SYS_sendto, "sockets"),
    (libc::SYS_recvfrom, "sockets"),
    (libc::SYS_sendmsg, "sockets"),
    (libc::SYS_recvmsg, "sockets"),
    (libc::SYS_shutdown, "sockets"),
    (libc::SYS_getsockopt, "socket errors (non-blocking connect)"),
    (libc::SYS_setsockopt, "socket options"),
    (libc::SYS_poll, "waiting on a socket"),
    (libc::SYS_ppoll, "waiting on a socket"),
    (libc::SYS_writev, "console and sockets through std"),
    (libc::SYS_pread64, "disk reads of the sync path"),
    (libc::SYS_preadv, "virtio-blk's synchronous backend"),
    (libc::SYS_pwritev, "virtio-blk's synchronous backend"),
    (libc::SYS_fdatasync, "virtio-blk flush (sync backend)"),
    (libc::SYS_fallocate, "virtio-blk discard and write-zeroes"),
    (
        libc::SYS_unlink,
        "removing the VM's sockets (control, vsock) when it ends",
    ),
    (libc::SYS_statx, "file metadata"),
    (libc::SYS_newfstatat, "file metadata"),
    (libc::SYS_fstat, "file metadata"),
];

/// The VMM thread of a VM that writes snapshots or a working set from its loop ([`ThreadKind::Vmm`]
/// only). Each needs a path opened after start; a jail that pre-opens the snapshot and working-set
/// directories would leave only `*at` calls relative to them.
const VMM_FILES: &[(i64, &str)] = &[
    (libc::SYS_pwrite64, "snapshot memory files"),
    (libc::SYS_lseek, "snapshot files"),
    (
        libc::SYS_openat,
        "snapshot files and directories, the working set",
    ),
    (libc::SYS_mkdir, "snapshot directories"),
    (libc::SYS_mkdirat, "snapshot directories"),
    (libc::SYS_rename, "committing a snapshot"),
    (libc::SYS_renameat, "committing a snapshot"),
    (libc::SYS_renameat2, "committing a snapshot or working set"),
    (libc::SYS_unlinkat, "removing temporaries"),
    (libc::SYS_rmdir, "removing temporaries"),
    (libc::SYS_fsync, "snapshot durability"),
    (libc::SYS_ftruncate, "sizing the memory file"),
    (
        libc::SYS_mincore,
        "which pages of anonymous memory to write",
    ),
    (libc::SYS_getdents64, "listing a snapshot directory"),
    (libc::SYS_access, "path checks"),
    (libc::SYS_readlink, "path checks"),
    (
        libc::SYS_pidfd_open,
        "whether a stale snapshot writer is alive (no `kill`: a pidfd cannot signal without \
         pidfd_send_signal, which no list allows)",
    ),
];

/// A thread that only waits for its VM to stop: `vm-watch` (the channel is futex-based, the
/// pipe a `write`, both in [`BASE`]).
const VM_WATCH: &[(i64, &str)] = &[];

/// A pool shell's `pool-client` thread: reads its client's forwarded signals and stops the VM
/// (an eventfd write and a futex wake, in [`BASE`]).
const POOL_CLIENT: &[(i64, &str)] = &[
    (
        libc::SYS_recvfrom,
        "the client's connection (std reads a socket with recv)",
    ),
    (libc::SYS_writev, "logs through std"),
];

/// The page server thread.
const PAGE_SERVER: &[(i64, &str)] = &[
    (libc::SYS_poll, "waiting on the uffd and the stop pipe"),
    (
        libc::SYS_ioctl,
        "UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE, UFFDIO_CONTINUE",
    ),
    (libc::SYS_pread64, "reading pages from the memory file"),
];

/// The prefetch thread.
const PREFETCH: &[(i64, &str)] = &[
    (
        libc::SYS_io_uring_enter,
        "batched reads (the ring is restricted to IORING_OP_READ)",
    ),
    (libc::SYS_ioctl, "UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE"),
    (
        libc::SYS_pread64,
        "reading a run again page by page after EEXIST",
    ),
];

/// The main thread of `kata-snap boot` or `restore` once the VM runs.
const MAIN: &[(i64, &str)] = &[
    (libc::SYS_writev, "printing the report"),
    (libc::SYS_exit_group, "process exit"),
    (libc::SYS_unlink, "removing sockets when the VM ends"),
    (libc::SYS_statx, "file metadata"),
    (libc::SYS_newfstatat, "file metadata"),
    (libc::SYS_fstat, "file metadata"),
    (libc::SYS_ioctl, "isatty on stderr"),
    (
        libc::SYS_sendto,
        "a pooled VMM answers its client over a Unix socket",
    ),
];

/// A supervisor thread once its VM runs and its process is prepared.
const SUPERVISOR: &[(i64, &str)] = &[
    (libc::SYS_poll, "its one loop"),
    (libc::SYS_ppoll, "its one loop"),
    (libc::SYS_recvfrom, "the agent's stream, control requests"),
    (libc::SYS_sendto, "the agent's stream, control replies"),
    (libc::SYS_writev, "output and logs through std"),
    (libc::SYS_accept4, "control requests"),
    (
        libc::SYS_setsockopt,
        "timeouts on control connections and requests",
    ),
    (
        libc::SYS_socket,
        "control requests to a pooled VMM (pause, resume)",
    ),
    (
        libc::SYS_connect,
        "control requests to a pooled VMM (pause, resume)",
    ),
    (
        libc::SYS_ioctl,
        "terminal size and mode, FIONBIO on accepted connections",
    ),
    (libc::SYS_openat, "the state record, the log, lock files"),
    (libc::SYS_statx, "file metadata"),
    (
        libc::SYS_newfstatat,
        "file metadata, removing the state dir",
    ),
    (libc::SYS_fstat, "file metadata"),
    (libc::SYS_lseek, "std file reads"),
    (libc::SYS_fsync, "the state record and its directory"),
    (
        libc::SYS_rename,
        "the state record (temporary name, rename)",
    ),
    (
        libc::SYS_renameat,
        "the state record (temporary name, rename)",
    ),
    (
        libc::SYS_renameat2,
        "the state record (temporary name, rename)",
    ),
    (libc::SYS_unlink, "the control socket, temporary files"),
    (
        libc::SYS_unlinkat,
        "removing the state directory after `run`",
    ),
    (libc::SYS_rmdir, "removing the state directory after `run`"),
    (
        libc::SYS_getdents64,
        "removing the state directory after `run`",
    ),
    (libc::SYS_chmod, "installing a template's working set"),
    (libc::SYS_fchmod, "installing a template's working set"),
    (libc::SYS_fchmodat, "installing a template's working set"),
    (libc::SYS_flock, "a template's locks"),
];

/// ioctl request numbers, computed as the kernel's `_IO*` macros do (the `kvm_ioctls` crate keeps
/// its own private).
#[allow(non_snake_case, missing_docs)]
mod nr {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
        kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    const UFFDIO: u32 = 0xAA;

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

    /// `struct uffdio_range`.
    #[repr(C)]
    pub struct UffdioRange {
        start: u64,
        len: u64,
    }
    /// `struct uffdio_copy`.
    #[repr(C)]
    pub struct UffdioCopy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }
    /// `struct uffdio_zeropage` (and `uffdio_continue`, the same layout).
    #[repr(C)]
    pub struct UffdioZeropage {
        range: UffdioRange,
        mode: u64,
        zeropage: i64,
    }
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
    ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, UffdioZeropage);
}

/// The ioctl requests a kind may make; `ioctl` is allowed only with one of them.
fn ioctls(kind: ThreadKind) -> Vec<(u64, &'static str)> {
    let uffd = [
        (nr::UFFDIO_COPY(), "UFFDIO_COPY: installing a page"),
        (nr::UFFDIO_ZEROPAGE(), "UFFDIO_ZEROPAGE: installing a hole"),
        (
            nr::UFFDIO_WAKE(),
            "UFFDIO_WAKE: a page another path installed",
        ),
        (
            nr::UFFDIO_CONTINUE(),
            "UFFDIO_CONTINUE: a page of a shared backing",
        ),
    ];
    let fionbio = (libc::FIONBIO, "std's set_nonblocking on sockets");
    let tcgets = (libc::TCGETS, "isatty (std's is_terminal, logging)");
    match kind {
        ThreadKind::Vcpu => vec![
            (nr::KVM_RUN(), "KVM_RUN"),
            (nr::KVM_GET_MP_STATE(), "the halt watchdog; vCPU state"),
            (nr::KVM_GET_REGS(), "the halt watchdog; vCPU state"),
            (nr::KVM_GET_SREGS(), "vCPU state for a snapshot"),
            (nr::KVM_GET_XSAVE(), "vCPU state for a snapshot"),
            (nr::KVM_GET_XCRS(), "vCPU state for a snapshot"),
            (nr::KVM_GET_LAPIC(), "vCPU state for a snapshot"),
            (nr::KVM_GET_VCPU_EVENTS(), "vCPU state for a snapshot"),
            (nr::KVM_GET_DEBUGREGS(), "vCPU state for a snapshot"),
            (nr::KVM_GET_MSRS(), "vCPU state for a snapshot"),
            (nr::KVM_GET_CPUID2(), "vCPU state for a snapshot"),
            tcgets,
        ],
        ThreadKind::Vmm => vec![
            (nr::KVM_GET_IRQCHIP(), "VM state for a snapshot"),
            (nr::KVM_GET_PIT2(), "VM state for a snapshot"),
            (nr::KVM_GET_CLOCK(), "VM state for a snapshot"),
            fionbio,
            tcgets,
        ],
        ThreadKind::VmmSealed => vec![fionbio, tcgets],
        ThreadKind::PageServer | ThreadKind::Prefetch => uffd.to_vec(),
        ThreadKind::Main => vec![tcgets],
        ThreadKind::Supervisor => vec![
            fionbio,
            tcgets,
            (libc::TCSETS, "restoring the terminal's mode"),
            (libc::TIOCGWINSZ, "the terminal's size"),
            (libc::TIOCSWINSZ, "resizing the container's terminal"),
        ],
        ThreadKind::VmWatch | ThreadKind::PoolClient => vec![],
    }
}

fn list(kind: ThreadKind) -> Vec<(i64, &'static str)> {
    let extra: &[&[(i64, &str)]] = match kind {
        ThreadKind::Vcpu => &[VCPU],
        ThreadKind::Vmm => &[VMM, VMM_FILES],
        ThreadKind::VmmSealed => &[VMM],
        ThreadKind::PageServer => &[PAGE_SERVER],
        ThreadKind::Prefetch => &[PREFETCH],
        ThreadKind::Main => &[MAIN],
        ThreadKind::Supervisor => &[SUPERVISOR],
        ThreadKind::VmWatch => &[VM_WATCH],
        ThreadKind::PoolClient => &[POOL_CLIENT],
    };
    BASE.iter()
        .chain(extra.iter().flat_map(|l| l.iter()))
        .copied()
        .collect()
}

/// The syscall numbers a thread kind may make.
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    let mut v: Vec<i64> = list(kind).into_iter().map(|(n, _)| n).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Builds the BPF program of `kind` for `mode` (`None` when filters are off).
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Log => SeccompAction::Log,
        // Trap, so the process can say which syscall was refused before it ends (handler below).
        SeccompMode::Kill => SeccompAction::Trap,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
        .into_iter()
        .filter(|&n| n != libc::SYS_ioctl)
        .map(|n| (n, Vec::new()))
        .collect();
    let ioctl_rules = ioctls(kind)
        .into_iter()
        .map(|(request, _)| {
            // The kernel reads the request as an `unsigned int`: compare those 32 bits.
            let cond =
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?;
            SeccompRule::new(vec![cond])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| SeccompError::Build { kind, source })?;
    if !ioctl_rules.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| SeccompError::Build { kind, source })?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|source| SeccompError::Compile { kind, source })?;
    Ok(Some(prog))
}

/// The compiled filters of every thread kind of one VM, shared by its threads.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    programs: Arc<BTreeMap<u8, BpfProgram>>,
}

fn key(kind: ThreadKind) -> u8 {
    kind as u8
}

/// How many malloc arenas glibc may use: one, the main arena (grown with `brk`). A thread arena
/// reads files the filtered threads may not open: `/sys/devices/system/cpu/online` to size the
/// arena limit, and `/proc/sys/vm/overcommit_memory` the first time it shrinks a heap (seen on
/// the page server freeing its grown working-set record).
const MALLOC_ARENAS: i32 = 1;

/// SIGSYS handler of [`SeccompMode::Kill`]: a filtered thread made a syscall outside its list.
/// Writes one line naming the syscall and the thread to stderr and ends the process (status 159,
/// 128 + SIGSYS). Only async-signal-safe calls, all allowed by every list.
extern "C" fn refused_syscall(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS from seccomp the kernel fills `_sigsys` { call_addr: *void, syscall:
    // i32, arch: u32 } right after the three i32 header fields and their padding (offset 16);
    // the syscall number is at byte 24 of the siginfo it passes.
    let at = info.cast::<u8>().wrapping_add(24).cast::<i32>();
    // SAFETY: as above: `at` points at the syscall number inside the kernel's siginfo.
    let nr = unsafe { at.read_unaligned() };
    let name: &[u8] = ThreadKind::ALL
        .get(usize::from(FILTERED_AS.with(std::cell::Cell::get)))
        .map_or(b"?", |k| k.name().as_bytes());
    let mut line = [0u8; 192];
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if n < line.len() {
                line[n] = b;
                n += 1;
            }
        }
    };
    put(b"kata-snap: seccomp refused syscall ");
    let mut digits = [0u8; 12];
    let mut d = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        d -= 1;
        digits[d] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[d..]);
    if i64::from(nr) == libc::SYS_ioctl && !ctx.is_null() {
        // SAFETY: for a signal handler installed with SA_SIGINFO, the third argument is the
        // interrupted context, a `ucontext_t`; at a seccomp trap its registers hold the
        // syscall's arguments (x86-64: the second in rsi).
        let request =
            unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize] }
                as u32;
        put(b" (ioctl request 0x");
        let mut hex = [0u8; 8];
        for (i, h) in hex.iter_mut().enumerate() {
            let nibble = (request >> (28 - 4 * i)) & 0xf;
            *h = b"0123456789abcdef"[nibble as usize];
        }
        put(&hex);
        put(b")");
    }
    put(b" on thread ");
    put(name);
    put(b" (add it to its list in vmm/src/seccomp.rs if it belongs there)\n");
    // SAFETY: write(2) of a local buffer, then _exit: both async-signal-safe.
    unsafe {
        libc::write(2, line.as_ptr().cast(), n);
    }
    // SAFETY: as above.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

thread_local! {
    /// The kind of filter this thread runs under (`ThreadKind as u8`; 255 none), for the SIGSYS
    /// handler's message.
    static FILTERED_AS: std::cell::Cell<u8> = const { std::cell::Cell::new(255) };
}

/// Installs the SIGSYS handler (once per process).
fn install_refusal_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: all-zero is a valid sigaction (no handler, empty mask, no flags).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = refused_syscall as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs a handler that only makes async-signal-safe calls.
        unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) };
    });
}

/// Prepares the process for filtered threads: limits malloc to its main arena (see
/// [`MALLOC_ARENAS`]). Call it first thing in `main`, before any thread exists: a thread that
/// got a thread arena before keeps it. [`Filters::new`] calls it too, as a fallback.
pub fn prepare_process() {
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
}

/// Every kind's program for `mode`, compiled.
fn compile_all(mode: SeccompMode) -> Result<BTreeMap<u8, BpfProgram>, SeccompError> {
    let mut programs = BTreeMap::new();
    for kind in ThreadKind::ALL {
        if let Some(p) = program(kind, mode)? {
            programs.insert(key(kind), p);
        }
    }
    Ok(programs)
}

impl Filters {
    /// Every kind's filter for `mode`: compiled on the first call for that mode in this process,
    /// the same compiled programs handed out on every later call (a VM's start compiles nothing).
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        if mode != SeccompMode::Off {
            prepare_process();
        }
        if mode == SeccompMode::Kill {
            install_refusal_handler();
        }
        static COMPILED: [OnceLock<Arc<BTreeMap<u8, BpfProgram>>>; 3] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let cell = &COMPILED[mode as usize];
        if let Some(programs) = cell.get() {
            return Ok(Self {
                programs: programs.clone(),
            });
        }
        let programs = Arc::new(compile_all(mode)?);
        // Two first callers may both compile; the programs are equal, one is kept.
        Ok(Self {
            programs: cell.get_or_init(|| programs).clone(),
        })
    }

    /// Compiles every kind's filter for `mode` afresh, bypassing the per-process cache (to
    /// measure what [`Filters::new`] saves).
    pub fn compile_uncached(mode: SeccompMode) -> Result<Self, SeccompError> {
        Ok(Self {
            programs: Arc::new(compile_all(mode)?),
        })
    }

    /// Whether two handles share the same compiled programs.
    pub fn same_programs(&self, other: &Filters) -> bool {
        Arc::ptr_eq(&self.programs, &other.programs)
    }

    /// Installs `kind`'s filter on the calling thread (nothing when filters are off).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match self.programs.get(&key(kind)) {
            Some(p) => seccompiler::apply_filter(p)
                .inspect(|()| FILTERED_AS.with(|k| k.set(kind as u8)))
                .map_err(|source| SeccompError::Install { kind, source }),
            None => Ok(()),
        }
    }

    /// Whether filters are on.
    pub fn enabled(&self) -> bool {
        !self.programs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_kind_compiles_and_lists_are_distinct() {
        for mode in [SeccompMode::Log, SeccompMode::Kill] {
            let f = Filters::new(mode).unwrap();
            assert!(f.enabled());
        }
        assert!(!Filters::new(SeccompMode::Off).unwrap().enabled());
        assert!(allowed(ThreadKind::Vcpu).contains(&libc::SYS_ioctl));
        assert!(!allowed(ThreadKind::Vcpu).contains(&libc::SYS_openat));
        assert!(!allowed(ThreadKind::PageServer).contains(&libc::SYS_socket));
        assert!(allowed(ThreadKind::Main).contains(&libc::SYS_exit_group));
        assert!(!allowed(ThreadKind::Vmm).contains(&libc::SYS_execve));
    }

    /// The VMM loop never signals a process, and a sealed one opens, creates and renames
    /// nothing; the runtime's helper threads touch no files, sockets or ioctls.
    #[test]
    fn test_vmm_lists_have_no_kill_and_sealed_no_file_creation() {
        for kind in ThreadKind::ALL {
            for nr in [libc::SYS_kill, libc::SYS_execve, libc::SYS_ptrace] {
                assert!(!allowed(kind).contains(&nr), "{kind:?} allows {nr}");
            }
        }
        let sealed = allowed(ThreadKind::VmmSealed);
        for nr in [
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_rename,
            libc::SYS_renameat2,
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
            libc::SYS_pidfd_open,
        ] {
            assert!(!sealed.contains(&nr), "VmmSealed allows {nr}");
        }
        assert!(allowed(ThreadKind::Vmm).contains(&libc::SYS_openat));
        for kind in [ThreadKind::VmWatch, ThreadKind::PoolClient] {
            for nr in [
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_ioctl,
                libc::SYS_unlink,
                libc::SYS_sendto,
            ] {
                assert!(!allowed(kind).contains(&nr), "{kind:?} allows {nr}");
            }
        }
    }

    /// The computed request numbers are the kernel's (values from its headers).
    #[test]
    fn test_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(nr::KVM_RUN(), 0xae80);
        assert_eq!(nr::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(nr::KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(nr::KVM_GET_MP_STATE(), 0x8004_ae98);
        assert_eq!(nr::KVM_GET_IRQCHIP(), 0xc208_ae62);
        assert_eq!(nr::KVM_GET_CLOCK(), 0x8030_ae7c);
        assert_eq!(nr::UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(nr::UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(nr::UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(nr::UFFDIO_CONTINUE(), 0xc020_aa07);
        // Every kind that may call ioctl lists its requests; none lists KVM_CREATE_VM (0xae01)
        // or KVM_SET_USER_MEMORY_REGION (0x4020ae46): a running VM creates nothing.
        for kind in ThreadKind::ALL {
            let reqs: Vec<u64> = ioctls(kind).iter().map(|&(n, _)| n).collect();
            assert_eq!(
                allowed(kind).contains(&libc::SYS_ioctl),
                !reqs.is_empty(),
                "{kind:?}"
            );
            assert!(
                !reqs.contains(&0xae01) && !reqs.contains(&0x4020_ae46),
                "{kind:?}"
            );
        }
    }

    /// The programs are compiled once per process and mode: every VM shares them.
    #[test]
    fn test_filters_compiled_once_per_mode() {
        let a = Filters::new(SeccompMode::Kill).unwrap();
        let b = Filters::new(SeccompMode::Kill).unwrap();
        assert!(a.same_programs(&b));
        let fresh = Filters::compile_uncached(SeccompMode::Kill).unwrap();
        assert!(!a.same_programs(&fresh));
        assert!(!a.same_programs(&Filters::new(SeccompMode::Log).unwrap()));
    }

    /// Runs `f` in a child with `kind`'s filter installed and stderr captured; returns the
    /// child's exit status and what it wrote to stderr.
    fn in_filtered_child(kind: ThreadKind, f: impl FnOnce()) -> (i32, String) {
        let filters = Filters::new(SeccompMode::Kill).unwrap();
        let mut pipe = [0i32; 2];
        // SAFETY: pipe(2) fills the two-element array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: fork in a test; the child only redirects stderr, installs a filter and makes
        // the syscalls of `f`, then leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: dup2 of the pipe's write end onto stderr, in the child only.
            unsafe { libc::dup2(pipe[1], 2) };
            if filters.apply(kind).is_err() {
                // SAFETY: leaving the child at once.
                unsafe { libc::_exit(2) };
            }
            f();
            // SAFETY: leaving the child.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closing our copy of the write end, which we own.
        unsafe { libc::close(pipe[1]) };
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reading into a local buffer from the pipe's read end.
            let n = unsafe { libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        // SAFETY: closing the read end, which we own.
        unsafe { libc::close(pipe[0]) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        (status, String::from_utf8_lossy(&out).into_owned())
    }

    /// An ioctl request on the list goes through (here to a closed fd: EBADF); one that is not
    /// kills the process, and the report names the request.
    #[test]
    fn test_ioctl_not_on_the_list_is_refused_and_named() {
        let (status, out) = in_filtered_child(ThreadKind::PageServer, || {
            // SAFETY: an ioctl on an fd that is not open fails with EBADF and touches nothing.
            let r = unsafe { libc::ioctl(-1, nr::UFFDIO_WAKE() as _, std::ptr::null_mut::<u8>()) };
            if r != -1 {
                // SAFETY: leaving the child.
                unsafe { libc::_exit(3) };
            }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {out}"
        );
        // KVM_CREATE_VM (0xae01) is on no list.
        let (status, out) = in_filtered_child(ThreadKind::PageServer, || {
            // SAFETY: as above; the filter refuses it before the kernel looks at the fd.
            unsafe { libc::ioctl(-1, 0xae01 as _, 0) };
        });
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS, "{out}");
        let expected = format!(
            "syscall {} (ioctl request 0x0000ae01) on thread page-server",
            libc::SYS_ioctl
        );
        assert!(out.contains(&expected), "{out:?}");
        // The vCPU's list has KVM_RUN but not a terminal's TIOCSWINSZ.
        let (status, out) = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: as above.
            unsafe { libc::ioctl(-1, libc::TIOCSWINSZ as _, 0) };
        });
        assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS, "{out}");
        assert!(out.contains("on thread vcpu"), "{out:?}");
    }

    /// A forbidden syscall on a filtered thread kills the process: shown in a child process.
    #[test]
    fn test_forbidden_syscall_on_filtered_thread_kills_the_process() {
        let filters = Filters::new(SeccompMode::Kill).unwrap();
        // SAFETY: fork in a test; the child only installs a filter and makes syscalls, then exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if filters.apply(ThreadKind::PageServer).is_err() {
                // SAFETY: leaving the child at once.
                unsafe { libc::_exit(2) };
            }
            // Allowed: getpid. Forbidden for the page server: socket().
            // SAFETY: a plain syscall without memory arguments.
            unsafe { libc::getpid() };
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            // SAFETY: leaving the child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        // The SIGSYS handler names the syscall on stderr and exits with 128 + SIGSYS.
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS);
    }

    #[test]
    fn test_every_kind_has_its_own_name_in_order() {
        for (i, kind) in ThreadKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{kind:?} is out of order in ALL");
        }
        let mut names: Vec<&str> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ThreadKind::ALL.len(), "{names:?}");
    }

    /// The report of a refused syscall names the thread kind, for every kind (the supervisor's
    /// used to read `?`).
    #[test]
    fn test_refusal_report_names_every_thread_kind() {
        let filters = Filters::new(SeccompMode::Kill).unwrap();
        for kind in ThreadKind::ALL {
            // sysinfo(2) only reads; no list allows it.
            assert!(!allowed(kind).contains(&libc::SYS_sysinfo), "{kind:?}");
            let mut pipe = [0i32; 2];
            // SAFETY: pipe(2) fills the two-element array.
            assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
            // SAFETY: fork in a test; the child only redirects stderr, installs a filter and
            // makes one refused syscall (the handler ends it).
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                // SAFETY: dup2 of the pipe's write end onto stderr, in the child only.
                unsafe { libc::dup2(pipe[1], 2) };
                if filters.apply(kind).is_err() {
                    // SAFETY: leaving the child at once.
                    unsafe { libc::_exit(2) };
                }
                // SAFETY: all-zero is a valid `sysinfo` (integers and a padding array).
                let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
                // SAFETY: sysinfo(2) writes the struct we pass; the filter refuses it first.
                unsafe { libc::syscall(libc::SYS_sysinfo, &mut info) };
                // SAFETY: leaving the child.
                unsafe { libc::_exit(0) };
            }
            // SAFETY: closing our copy of the write end, which we own.
            unsafe { libc::close(pipe[1]) };
            let mut out = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                // SAFETY: reading into a local buffer from the pipe's read end.
                let n = unsafe { libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n as usize]);
            }
            // SAFETY: closing the read end, which we own.
            unsafe { libc::close(pipe[0]) };
            let mut status = 0;
            // SAFETY: waiting for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status), "{kind:?}: status {status:#x}");
            assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS, "{kind:?}");
            let line = String::from_utf8_lossy(&out);
            let expected = format!("syscall {} on thread {} (", libc::SYS_sysinfo, kind.name());
            assert!(line.contains(&expected), "{kind:?}: {line:?}");
        }
    }
}
