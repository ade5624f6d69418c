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
//! The programs are compiled once per binary, by the build script (`vmm/build.rs`, from the lists
//! in `lists.rs`): a VM's start compiles nothing ([`Filters::new`] hands out static programs).
//!
//! io_uring bypasses seccomp for the operations it runs, so every ring is created before the
//! filters and limited with `IORING_REGISTER_RESTRICTIONS` to the opcodes it uses (the event loop
//! in `event-loop`, the prefetcher's in `snapshot::source`).
//!
//! Why each syscall is allowed is written beside it in `lists.rs`.

use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, sock_filter};

mod lists;

pub use lists::{ThreadKind, allowed};

/// The programs the build script compiled from [`lists`]: `LOG` and `KILL`, one per kind in
/// [`ThreadKind::ALL`] order.
mod built {
    include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs"));
}

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

/// Compiles the BPF program of `kind` for `mode` now (`None` when filters are off). The
/// filters a VM uses were compiled from the same lists when this crate was built ([`Filters`]);
/// this is for checking and measuring that.
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Log => SeccompAction::Log,
        // Trap, so the process can say which syscall was refused before it ends (handler below).
        SeccompMode::Kill => SeccompAction::Trap,
    };
    let filter =
        lists::filter(kind, mismatch).map_err(|source| SeccompError::Build { kind, source })?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|source| SeccompError::Compile { kind, source })?;
    Ok(Some(prog))
}

/// Every kind's program, one per kind in [`ThreadKind::ALL`] order.
#[derive(Debug, Clone, Default)]
enum Programs {
    /// No filters.
    #[default]
    Off,
    /// Compiled at build time.
    Built(&'static [&'static [sock_filter]; ThreadKind::ALL.len()]),
    /// Compiled at run time ([`Filters::compile_uncached`]).
    Compiled(Arc<Vec<BpfProgram>>),
}

/// The filters of every thread kind, shared by a VM's threads.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    programs: Programs,
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
    put(b" (add it to its list in vmm/src/seccomp/lists.rs if it belongs there)\n");
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

impl Filters {
    /// Every kind's filter for `mode`. The programs were compiled when this crate was built
    /// (`build.rs`): getting them costs nothing, for any number of VMs.
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        if mode != SeccompMode::Off {
            prepare_process();
        }
        if mode == SeccompMode::Kill {
            install_refusal_handler();
        }
        let programs = match mode {
            SeccompMode::Off => Programs::Off,
            SeccompMode::Log => Programs::Built(&built::LOG),
            SeccompMode::Kill => Programs::Built(&built::KILL),
        };
        Ok(Self { programs })
    }

    /// Compiles every kind's filter for `mode` now, as every VM's start did before the programs
    /// were compiled at build time (to measure that, and to check the build's programs).
    pub fn compile_uncached(mode: SeccompMode) -> Result<Self, SeccompError> {
        let mut programs = Vec::with_capacity(ThreadKind::ALL.len());
        for kind in ThreadKind::ALL {
            match program(kind, mode)? {
                Some(p) => programs.push(p),
                None => return Ok(Self::default()),
            }
        }
        Ok(Self {
            programs: Programs::Compiled(Arc::new(programs)),
        })
    }

    /// Whether two handles share the same programs (the build's, or one run-time compilation).
    pub fn same_programs(&self, other: &Filters) -> bool {
        match (&self.programs, &other.programs) {
            (Programs::Off, Programs::Off) => true,
            (Programs::Built(a), Programs::Built(b)) => std::ptr::eq(*a, *b),
            (Programs::Compiled(a), Programs::Compiled(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// `kind`'s program, if filters are on.
    fn get(&self, kind: ThreadKind) -> Option<&[sock_filter]> {
        let i = kind as usize;
        match &self.programs {
            Programs::Off => None,
            Programs::Built(p) => p.get(i).copied(),
            Programs::Compiled(p) => p.get(i).map(Vec::as_slice),
        }
    }

    /// Installs `kind`'s filter on the calling thread (nothing when filters are off).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match self.get(kind) {
            Some(p) => seccompiler::apply_filter(p)
                .inspect(|()| FILTERED_AS.with(|k| k.set(kind as u8)))
                .map_err(|source| SeccompError::Install { kind, source }),
            None => Ok(()),
        }
    }

    /// Whether filters are on.
    pub fn enabled(&self) -> bool {
        !matches!(self.programs, Programs::Off)
    }
}

/// The lists' ioctl numbers computed from the kernel structures (checked in a test).
#[cfg(test)]
#[allow(non_snake_case, missing_docs, dead_code)]
mod nr_check {
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

/// The set-up each virtio-fs server thread runs first: installs the [`ThreadKind::Fs`] filter
/// on it (nothing when seccomp is off).
pub fn fs_thread_setup(
    filters: &Filters,
) -> impl Fn() -> Option<devices::virtio::fs::ThreadSetup> + use<> {
    let filters = filters.clone();
    move || {
        let f = filters.clone();
        Some(
            Box::new(move || f.apply(ThreadKind::Fs).map_err(std::io::Error::other))
                as devices::virtio::fs::ThreadSetup,
        )
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

    /// The request numbers, computed here from the kernel structures' sizes, are the lists'.
    #[test]
    fn test_ioctl_numbers_match_the_kernel_structures() {
        use lists::nr;
        use nr_check as c;
        let pairs = [
            (nr::KVM_RUN, c::KVM_RUN()),
            (nr::KVM_GET_REGS, c::KVM_GET_REGS()),
            (nr::KVM_GET_SREGS, c::KVM_GET_SREGS()),
            (nr::KVM_GET_MSRS, c::KVM_GET_MSRS()),
            (nr::KVM_GET_LAPIC, c::KVM_GET_LAPIC()),
            (nr::KVM_GET_CPUID2, c::KVM_GET_CPUID2()),
            (nr::KVM_GET_MP_STATE, c::KVM_GET_MP_STATE()),
            (nr::KVM_GET_VCPU_EVENTS, c::KVM_GET_VCPU_EVENTS()),
            (nr::KVM_GET_DEBUGREGS, c::KVM_GET_DEBUGREGS()),
            (nr::KVM_GET_XSAVE, c::KVM_GET_XSAVE()),
            (nr::KVM_GET_XCRS, c::KVM_GET_XCRS()),
            (nr::KVM_GET_IRQCHIP, c::KVM_GET_IRQCHIP()),
            (nr::KVM_GET_CLOCK, c::KVM_GET_CLOCK()),
            (nr::KVM_GET_PIT2, c::KVM_GET_PIT2()),
            (nr::UFFDIO_WAKE, c::UFFDIO_WAKE()),
            (nr::UFFDIO_COPY, c::UFFDIO_COPY()),
            (nr::UFFDIO_ZEROPAGE, c::UFFDIO_ZEROPAGE()),
            (nr::UFFDIO_CONTINUE, c::UFFDIO_CONTINUE()),
        ];
        for (i, (listed, computed)) in pairs.iter().enumerate() {
            assert_eq!(listed, computed, "entry {i}: {listed:#x} vs {computed:#x}");
        }
        // Known values from the kernel headers.
        assert_eq!(nr::KVM_RUN, 0xae80);
        assert_eq!(nr::UFFDIO_COPY, 0xc028_aa03);
        // Every kind that may call ioctl lists its requests; none lists KVM_CREATE_VM (0xae01)
        // or KVM_SET_USER_MEMORY_REGION (0x4020ae46): a running VM creates nothing.
        for kind in ThreadKind::ALL {
            let reqs: Vec<u64> = lists::ioctls(kind).iter().map(|&(n, _)| n).collect();
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

    /// The programs built into the binary are what the lists compile to now.
    #[test]
    fn test_build_time_programs_equal_a_fresh_compile() {
        for mode in [SeccompMode::Log, SeccompMode::Kill] {
            let built = Filters::new(mode).unwrap();
            let fresh = Filters::compile_uncached(mode).unwrap();
            for kind in ThreadKind::ALL {
                assert_eq!(built.get(kind), fresh.get(kind), "{mode:?} {kind:?}");
                assert!(built.get(kind).is_some_and(|p| !p.is_empty()));
            }
        }
    }

    /// The programs are compiled once per binary: every VM shares them.
    #[test]
    fn test_filters_compiled_once_per_binary() {
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
            let r =
                unsafe { libc::ioctl(-1, lists::nr::UFFDIO_WAKE as _, std::ptr::null_mut::<u8>()) };
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

    /// A virtio-fs server thread under its Kill filter serves a whole FUSE session (init, create,
    /// write, read, mkdir, lookup, readdir, unlink, symlink, readlink) without a refused syscall:
    /// in a child process, which a refusal would end with 128 + SIGSYS.
    #[test]
    fn test_fs_thread_serves_fuse_under_its_kill_filter() {
        use devices::virtio::fs::test_client::*;
        use devices::virtio::fs::{Fs, FsConfig, FsLimits, FsShare};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("host.txt"), b"host").unwrap();
        let filters = Filters::new(SeccompMode::Kill).unwrap();
        // SAFETY: fork in a test; the child runs the device and exits without returning.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = std::panic::catch_unwind(|| {
                let mem = devices::virtio::test_utils::test_memory();
                let config = FsConfig {
                    tag: "share0".into(),
                    share: Some(FsShare {
                        dir: dir.path().to_path_buf(),
                        read_only: false,
                    }),
                    limits: FsLimits::default(),
                };
                let setup = fs_thread_setup(&filters)();
                let dev = Fs::new_fs(&config, mem.clone(), setup).unwrap();
                let mut h = devices::virtio::test_utils::Harness::new(dev, mem);
                h.driver.init(16);
                init(&mut h);
                let (e, fh) = create(&mut h, ROOT, "g.txt").unwrap();
                assert_eq!(write(&mut h, e.nodeid, fh, b"guest").unwrap(), 5);
                let f = lookup(&mut h, ROOT, "host.txt").unwrap();
                let fh = open(&mut h, OPEN, f.nodeid, libc::O_RDONLY).unwrap();
                assert_eq!(read(&mut h, f.nodeid, fh, 64).unwrap(), b"host");
                mkdir(&mut h, ROOT, "d").unwrap();
                let dh = open(&mut h, OPENDIR, ROOT, libc::O_RDONLY).unwrap();
                let r = fuse_backend_rs_read_in(dh);
                assert_eq!(call(&mut h, READDIRPLUS, ROOT, &r, 4096).0, 0);
                let mut body = cstr("l");
                body.extend_from_slice(&cstr("/etc/passwd"));
                assert_eq!(call(&mut h, SYMLINK, ROOT, &body, 256).0, 0);
                let l = lookup(&mut h, ROOT, "l").unwrap();
                assert_eq!(call(&mut h, READLINK, l.nodeid, &[], 256).1, b"/etc/passwd");
                assert_eq!(call(&mut h, UNLINK, ROOT, &cstr("g.txt"), 64).0, 0);
            });
            // SAFETY: leaving the child without running the parent's destructors.
            unsafe { libc::_exit(if code.is_ok() { 0 } else { 3 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "128 + SIGSYS = 159 is a refused syscall"
        );
        assert!(dir.path().join("d").is_dir());
        assert!(!dir.path().join("g.txt").exists());
    }

    /// A READDIR(PLUS) body (fuse_read_in) for handle `fh`, 4000 bytes from offset 0.
    fn fuse_backend_rs_read_in(fh: u64) -> Vec<u8> {
        let mut b = vec![0u8; 40];
        b[..8].copy_from_slice(&fh.to_le_bytes());
        b[16..20].copy_from_slice(&4000u32.to_le_bytes());
        b
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
        for kind in ThreadKind::ALL {
            // sysinfo(2) only reads; no list allows it.
            assert!(!allowed(kind).contains(&libc::SYS_sysinfo), "{kind:?}");
            let (status, line) = in_filtered_child(kind, || {
                // SAFETY: all-zero is a valid `sysinfo` (integers and a padding array).
                let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
                // SAFETY: sysinfo(2) writes the struct we pass; the filter refuses it first.
                unsafe { libc::syscall(libc::SYS_sysinfo, &mut info) };
            });
            assert!(libc::WIFEXITED(status), "{kind:?}: status {status:#x}");
            assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS, "{kind:?}");
            let expected = format!("syscall {} on thread {} (", libc::SYS_sysinfo, kind.name());
            assert!(line.contains(&expected), "{kind:?}: {line:?}");
        }
    }
}
