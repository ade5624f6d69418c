//! The allow-lists: which syscalls (and ioctl requests) each kind of thread may make, and why.
//! Shared by the library and its build script, which compiles them to BPF at build time (so this
//! file uses only `std`, `libc` and `seccompiler`).

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

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
    /// A virtio-fs share's FUSE server thread: file operations beneath its shared directory.
    Fs,
}

impl ThreadKind {
    /// Every kind, in `ThreadKind as u8` order.
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Vcpu,
        ThreadKind::Vmm,
        ThreadKind::PageServer,
        ThreadKind::Prefetch,
        ThreadKind::Main,
        ThreadKind::Supervisor,
        ThreadKind::VmmSealed,
        ThreadKind::VmWatch,
        ThreadKind::PoolClient,
        ThreadKind::Fs,
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
            ThreadKind::Fs => "fs",
        }
    }
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

/// A virtio-fs server thread: `fuse-backend-rs`'s `PassthroughFs`. Every name is opened with
/// `openat` relative to a directory fd of the share (`O_NOFOLLOW`), regular files and directories
/// are reopened through `/proc/self/fd`, and the share's root is reopened by its path at each
/// FUSE_INIT. No `setresuid`/`capset` (the server never takes the guest's identity), no sockets,
/// no `ioctl`, no exec.
const FS: &[(i64, &str)] = &[
    (
        libc::SYS_openat,
        "lookups (O_PATH | O_NOFOLLOW beneath a share fd), reopens through /proc/self/fd, the root",
    ),
    (libc::SYS_statx, "attributes"),
    (libc::SYS_newfstatat, "attributes"),
    (libc::SYS_fstat, "attributes"),
    (libc::SYS_fstatfs, "STATFS"),
    (libc::SYS_readlinkat, "READLINK"),
    (libc::SYS_getdents64, "READDIR"),
    (libc::SYS_lseek, "READDIR offsets, LSEEK"),
    (libc::SYS_preadv, "READ into guest buffers"),
    (libc::SYS_pwritev, "WRITE from guest buffers"),
    (libc::SYS_pread64, "READ"),
    (libc::SYS_pwrite64, "WRITE"),
    (libc::SYS_mkdirat, "MKDIR"),
    (libc::SYS_mknodat, "MKNOD (regular, fifo, socket only)"),
    (libc::SYS_symlinkat, "SYMLINK"),
    (libc::SYS_linkat, "LINK"),
    (libc::SYS_unlinkat, "UNLINK, RMDIR"),
    (libc::SYS_renameat2, "RENAME"),
    (libc::SYS_fchmod, "SETATTR mode"),
    (libc::SYS_fchmodat, "SETATTR mode"),
    (libc::SYS_fchownat, "SETATTR owner"),
    (libc::SYS_utimensat, "SETATTR times"),
    (libc::SYS_ftruncate, "SETATTR size, O_TRUNC"),
    (libc::SYS_fallocate, "FALLOCATE"),
    (libc::SYS_fsync, "FSYNC"),
    (libc::SYS_fdatasync, "FSYNC (datasync)"),
    (libc::SYS_dup, "handles of opened inodes"),
    (
        libc::SYS_umask,
        "PassthroughFs clears it at FUSE_INIT; the server puts it back",
    ),
    (libc::SYS_getuid, "PassthroughFs's own checks"),
    (libc::SYS_getgid, "PassthroughFs's own checks"),
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

/// ioctl request numbers, as the kernel's `_IO*` macros make them for x86-64 (the `kvm_ioctls`
/// crate keeps its own private). Plain values, so the build script can compile the filters; a
/// unit test checks each against the kernel structures' sizes.
pub(crate) mod nr {
    pub const KVM_RUN: u64 = 0xae80;
    pub const KVM_GET_REGS: u64 = 0x8090_ae81;
    pub const KVM_GET_SREGS: u64 = 0x8138_ae83;
    pub const KVM_GET_MSRS: u64 = 0xc008_ae88;
    pub const KVM_GET_LAPIC: u64 = 0x8400_ae8e;
    pub const KVM_GET_CPUID2: u64 = 0xc008_ae91;
    pub const KVM_GET_MP_STATE: u64 = 0x8004_ae98;
    pub const KVM_GET_VCPU_EVENTS: u64 = 0x8040_ae9f;
    pub const KVM_GET_DEBUGREGS: u64 = 0x8080_aea1;
    pub const KVM_GET_XSAVE: u64 = 0x9000_aea4;
    pub const KVM_GET_XCRS: u64 = 0x8188_aea6;
    pub const KVM_GET_IRQCHIP: u64 = 0xc208_ae62;
    pub const KVM_GET_CLOCK: u64 = 0x8030_ae7c;
    pub const KVM_GET_PIT2: u64 = 0x8070_ae9f;
    pub const UFFDIO_WAKE: u64 = 0x8010_aa02;
    pub const UFFDIO_COPY: u64 = 0xc028_aa03;
    pub const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
    pub const UFFDIO_CONTINUE: u64 = 0xc020_aa07;
}

/// The ioctl requests a kind may make; `ioctl` is allowed only with one of them.
pub(crate) fn ioctls(kind: ThreadKind) -> Vec<(u64, &'static str)> {
    let uffd = [
        (nr::UFFDIO_COPY, "UFFDIO_COPY: installing a page"),
        (nr::UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE: installing a hole"),
        (
            nr::UFFDIO_WAKE,
            "UFFDIO_WAKE: a page another path installed",
        ),
        (
            nr::UFFDIO_CONTINUE,
            "UFFDIO_CONTINUE: a page of a shared backing",
        ),
    ];
    let fionbio = (libc::FIONBIO, "std's set_nonblocking on sockets");
    let tun_offload = (
        libc::TUNSETOFFLOAD,
        "virtio-net: the tap's offloads follow what the guest driver acks (on activation)",
    );
    let tcgets = (libc::TCGETS, "isatty (std's is_terminal, logging)");
    match kind {
        ThreadKind::Vcpu => vec![
            (nr::KVM_RUN, "KVM_RUN"),
            (nr::KVM_GET_MP_STATE, "the halt watchdog; vCPU state"),
            (nr::KVM_GET_REGS, "the halt watchdog; vCPU state"),
            (nr::KVM_GET_SREGS, "vCPU state for a snapshot"),
            (nr::KVM_GET_XSAVE, "vCPU state for a snapshot"),
            (nr::KVM_GET_XCRS, "vCPU state for a snapshot"),
            (nr::KVM_GET_LAPIC, "vCPU state for a snapshot"),
            (nr::KVM_GET_VCPU_EVENTS, "vCPU state for a snapshot"),
            (nr::KVM_GET_DEBUGREGS, "vCPU state for a snapshot"),
            (nr::KVM_GET_MSRS, "vCPU state for a snapshot"),
            (nr::KVM_GET_CPUID2, "vCPU state for a snapshot"),
            tcgets,
        ],
        ThreadKind::Vmm => vec![
            (nr::KVM_GET_IRQCHIP, "VM state for a snapshot"),
            (nr::KVM_GET_PIT2, "VM state for a snapshot"),
            (nr::KVM_GET_CLOCK, "VM state for a snapshot"),
            fionbio,
            tcgets,
            tun_offload,
        ],
        ThreadKind::VmmSealed => vec![fionbio, tcgets, tun_offload],
        ThreadKind::PageServer | ThreadKind::Prefetch => uffd.to_vec(),
        ThreadKind::Main => vec![tcgets],
        ThreadKind::Supervisor => vec![
            fionbio,
            tcgets,
            (libc::TCSETS, "restoring the terminal's mode"),
            (libc::TIOCGWINSZ, "the terminal's size"),
            (libc::TIOCSWINSZ, "resizing the container's terminal"),
        ],
        ThreadKind::VmWatch | ThreadKind::PoolClient | ThreadKind::Fs => vec![],
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
        ThreadKind::Fs => &[FS],
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

/// The filter of `kind`: its syscalls allowed (`ioctl` only with its requests), `mismatch` for
/// anything else.
pub(crate) fn filter(
    kind: ThreadKind,
    mismatch: SeccompAction,
) -> Result<SeccompFilter, seccompiler::BackendError> {
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
        .collect::<Result<Vec<_>, _>>()?;
    if !ioctl_rules.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules);
    }
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
}
