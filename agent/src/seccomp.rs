//! Installing the container's seccomp filter (compiled by the host from the
//! bundle's `linux.seccomp`) in a child just before it execs.
//!
//! The programs go in with `seccomp(SECCOMP_SET_MODE_FILTER)` in the order
//! given; the kernel checks each one (`EINVAL` for a bad program) and refuses
//! without `no_new_privs` or `CAP_SYS_ADMIN` (`EACCES`), which is why the
//! child installs it where runc does (see [`crate::process`]).

use agent_protocol::{BpfInstruction, SeccompProgram};

/// `SECCOMP_SET_MODE_FILTER`.
const SET_MODE_FILTER: libc::c_uint = 1;

/// Installs every program of `p` in the calling thread (the agent's child is
/// single-threaded). Stops at the first refusal; programs installed before
/// it stay (the child then exits without exec).
pub fn install(p: &SeccompProgram) -> std::io::Result<()> {
    for f in &p.filters {
        install_one(f, p.flags)?;
    }
    Ok(())
}

fn install_one(insns: &[BpfInstruction], flags: u32) -> std::io::Result<()> {
    let filter: Vec<libc::sock_filter> = insns
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let len =
        u16::try_from(filter.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let prog = libc::sock_fprog {
        len,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `filter`, `len` instructions that outlive the call; the kernel
    // copies the program and does not keep the pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SET_MODE_FILTER,
            libc::c_uint::try_from(flags).unwrap_or(0),
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LD_NR: BpfInstruction = BpfInstruction {
        code: 0x20, // BPF_LD | BPF_W | BPF_ABS
        jt: 0,
        jf: 0,
        k: 0, // offsetof(seccomp_data, nr)
    };

    fn ret(k: u32) -> BpfInstruction {
        BpfInstruction {
            code: 0x06,
            jt: 0,
            jf: 0,
            k,
        }
    }

    /// `nr == sys ? ERRNO(errno) : ALLOW`.
    fn deny(sys: i64, errno: u32) -> Vec<BpfInstruction> {
        vec![
            LD_NR,
            BpfInstruction {
                code: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
                jt: 0,
                jf: 1,
                k: sys as u32,
            },
            ret(libc::SECCOMP_RET_ERRNO | errno),
            ret(libc::SECCOMP_RET_ALLOW),
        ]
    }

    /// Runs `f` in a forked child and returns its exit code.
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only runs `f` and `_exit`s; tests may run threads, but `f` only
        // makes plain system calls.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(99);
                // SAFETY: _exit ends the child without running the test harness's handlers.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                match nix::sys::wait::waitpid(child, None).unwrap() {
                    nix::sys::wait::WaitStatus::Exited(_, c) => c,
                    other => panic!("child ended as {other:?}"),
                }
            }
        }
    }

    #[test]
    fn test_install_denied_syscall_returns_errno_others_work() {
        let code = in_child(|| {
            // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let p = SeccompProgram {
                filters: vec![deny(libc::SYS_getppid, libc::ENETDOWN as u32)],
                flags: 0,
            };
            if install(&p).is_err() {
                return 2;
            }
            // SAFETY: getppid and getpid take no arguments.
            let denied = unsafe { libc::syscall(libc::SYS_getppid) };
            let err = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: as above.
            let allowed = unsafe { libc::syscall(libc::SYS_getpid) };
            if denied == -1 && err == Some(libc::ENETDOWN) && allowed > 0 {
                0
            } else {
                3
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn test_install_several_programs_most_severe_wins() {
        let code = in_child(|| {
            // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let p = SeccompProgram {
                filters: vec![
                    deny(libc::SYS_getppid, libc::EPERM as u32),
                    deny(libc::SYS_getuid, libc::ENXIO as u32),
                ],
                flags: 0,
            };
            if install(&p).is_err() {
                return 2;
            }
            // SAFETY: no arguments.
            let a = unsafe { libc::syscall(libc::SYS_getppid) };
            let ea = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: no arguments.
            let b = unsafe { libc::syscall(libc::SYS_getuid) };
            let eb = std::io::Error::last_os_error().raw_os_error();
            if a == -1 && ea == Some(libc::EPERM) && b == -1 && eb == Some(libc::ENXIO) {
                0
            } else {
                3
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn test_install_bad_program_refused_by_kernel() {
        let code = in_child(|| {
            // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            // A program that does not end in a return.
            let p = SeccompProgram {
                filters: vec![vec![LD_NR]],
                flags: 0,
            };
            match install(&p) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => 0,
                _ => 3,
            }
        });
        assert_eq!(code, 0);
    }
}
