//! `linux.seccomp` compiled on the host: the programs are checked by loading
//! them into a forked child of this test (the host kernel runs the same BPF
//! as the guest's) and making the system calls the profile names.

use agent_protocol::SeccompProgram;
use oci_bundle::ConfigError;
use oci_bundle::seccomp::compile;
use serde_json::{Value, json};

fn program(profile: Value) -> (Option<SeccompProgram>, Vec<String>) {
    let mut notes = Vec::new();
    let p = compile(&profile, &mut notes).expect("compiles");
    (p, notes)
}

fn refused(profile: Value) -> String {
    match compile(&profile, &mut Vec::new()) {
        Err(ConfigError::Seccomp(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// How a child that installed `p` and ran `f` ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signaled(i32),
}

/// Runs `f` (raw system calls only) in a forked child after installing `p`
/// (with no_new_privs, as a non-root user would need); `f`'s value is the exit
/// code.
fn in_filtered_child(p: &SeccompProgram, f: fn() -> i32) -> End {
    let filters: Vec<Vec<seccompiler::sock_filter>> = p
        .filters
        .iter()
        .map(|f| {
            f.iter()
                .map(|i| seccompiler::sock_filter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect()
        })
        .collect();
    // SAFETY: the child makes raw system calls only and leaves with _exit.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: PR_SET_NO_NEW_PRIVS takes integers.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            for f in &filters {
                let prog = libc::sock_fprog {
                    len: f.len() as u16,
                    filter: f.as_ptr() as *mut libc::sock_filter,
                };
                // SAFETY: `prog` points at `f`, which outlives the call; seccompiler's
                // sock_filter has the kernel's layout. The same raw call as the agent's.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_seccomp,
                        1,
                        p.flags,
                        &prog as *const libc::sock_fprog,
                    )
                };
                if r != 0 {
                    // SAFETY: _exit ends the child at once.
                    unsafe { libc::_exit(100) };
                }
            }
            let code = f();
            // SAFETY: as above.
            unsafe { libc::_exit(code) }
        }
        pid if pid > 0 => {
            let mut status = 0;
            // SAFETY: waits for our own child; status outlives the call.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFEXITED(status) {
                End::Exited(libc::WEXITSTATUS(status))
            } else {
                End::Signaled(libc::WTERMSIG(status))
            }
        }
        _ => panic!("fork failed"),
    }
}

/// errno of a failed raw call, 0 on success.
fn errno_of(r: libc::c_long) -> i32 {
    if r == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    }
}

fn mkdir_errno() -> i32 {
    // A path that cannot exist: mkdir fails with ENOENT when the filter lets it through.
    let path = c"/nonexistent-kata-snap-dir/x";
    // SAFETY: mkdirat with a NUL-terminated path.
    errno_of(unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, path.as_ptr(), 0o755) })
}

fn dup_errno(fd: i64) -> i32 {
    // SAFETY: dup takes an integer; a bad one is EBADF.
    errno_of(unsafe { libc::syscall(libc::SYS_dup, fd) })
}

/// runc's seccomp.bats profile: mkdir denied with EPERM, the rest allowed.
fn bats_profile(errno: Option<u32>, action: &str) -> Value {
    let mut rule = json!({"names": ["mkdir", "mkdirat"], "action": action});
    if let Some(e) = errno {
        rule["errnoRet"] = e.into();
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": [rule]
    })
}

#[test]
fn test_runc_bats_errno_default_is_eperm() {
    let (p, _) = program(bats_profile(None, "SCMP_ACT_ERRNO"));
    let p = p.expect("a program");
    assert_eq!(p.filters.len(), 1);
    assert_eq!(in_filtered_child(&p, mkdir_errno), End::Exited(libc::EPERM));
    // Unfiltered, the same call fails otherwise.
    assert_eq!(mkdir_errno(), libc::ENOENT);
}

#[test]
fn test_runc_bats_explicit_errno_returned() {
    let (p, _) = program(bats_profile(Some(100), "SCMP_ACT_ERRNO"));
    assert_eq!(
        in_filtered_child(&p.unwrap(), mkdir_errno),
        End::Exited(100)
    );
}

#[test]
fn test_runc_bats_kill_ends_the_process_with_sigsys() {
    let (p, _) = program(bats_profile(None, "SCMP_ACT_KILL"));
    assert_eq!(
        in_filtered_child(&p.unwrap(), mkdir_errno),
        End::Signaled(libc::SIGSYS)
    );
}

#[test]
fn test_default_errno_ret_and_allow_list() {
    // Default ENXIO; only what the child needs to report is allowed.
    let (p, _) = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::ENXIO,
        "syscalls": [{"names": ["exit_group", "exit", "getpid"], "action": "SCMP_ACT_ALLOW"}]
    }));
    let p = p.unwrap();
    assert_eq!(
        in_filtered_child(&p, || {
            // SAFETY: no arguments.
            let pid = unsafe { libc::syscall(libc::SYS_getpid) };
            if pid <= 0 {
                return 1;
            }
            mkdir_errno()
        }),
        End::Exited(libc::ENXIO)
    );
}

#[test]
fn test_argument_conditions_and_or_masked_eq() {
    let (p, _) = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            // One index twice: either value matches (runc makes a rule per condition).
            {"names": ["dup"], "action": "SCMP_ACT_ERRNO", "errnoRet": 71,
             "args": [{"index": 0, "value": 700, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 701, "op": "SCMP_CMP_EQ"}]},
            // (arg0 & 0xff00) == 0x0300.
            {"names": ["dup"], "action": "SCMP_ACT_ERRNO", "errnoRet": 72,
             "args": [{"index": 0, "value": 65280, "valueTwo": 768, "op": "SCMP_CMP_MASKED_EQ"}]},
            // Two indexes: both must hold.
            {"names": ["dup2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 73,
             "args": [{"index": 0, "value": 900, "op": "SCMP_CMP_EQ"},
                      {"index": 1, "value": 901, "op": "SCMP_CMP_GE"}]}
        ]
    }));
    let p = p.unwrap();
    assert_eq!(p.filters.len(), 3);
    let got = in_filtered_child(&p, || {
        let dup2 = |a: i64, b: i64| {
            // SAFETY: dup2 takes integers; bad descriptors are EBADF.
            errno_of(unsafe { libc::syscall(libc::SYS_dup2, a, b) })
        };
        let checks = [
            dup_errno(700) == 71,
            dup_errno(701) == 71,
            dup_errno(702) == libc::EBADF,
            dup_errno(0x0301) == 72,
            dup_errno(0x0401) == libc::EBADF,
            dup2(900, 905) == 73,
            dup2(900, 800) == libc::EBADF,
            dup2(899, 905) == libc::EBADF,
        ];
        checks
            .iter()
            .position(|ok| !ok)
            .map_or(0, |i| 10 + i as i32)
    });
    assert_eq!(got, End::Exited(0));
}

#[test]
fn test_several_actions_each_applies() {
    let (p, _) = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["exit_group", "exit", "getpid", "dup"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42},
            {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}
        ]
    }));
    let p = p.unwrap();
    assert_eq!(p.filters.len(), 3);
    // Default EPERM for an unnamed call, 42 for mkdirat, dup allowed (EBADF).
    assert_eq!(
        in_filtered_child(&p, || {
            // SAFETY: no arguments.
            let e = errno_of(unsafe { libc::syscall(libc::SYS_getuid) });
            match (e, mkdir_errno(), dup_errno(9999)) {
                (libc::EPERM, 42, libc::EBADF) => 0,
                _ => 1,
            }
        }),
        End::Exited(0)
    );
    assert_eq!(
        in_filtered_child(&p, || {
            // SAFETY: no arguments.
            unsafe { libc::syscall(libc::SYS_getppid) };
            0
        }),
        End::Signaled(libc::SIGSYS)
    );
}

#[test]
fn test_unknown_names_skipped_with_a_note() {
    let (p, notes) = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["no_such_syscall", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
    }));
    assert!(p.is_some());
    assert!(
        notes.iter().any(|n| n.contains("no_such_syscall")),
        "{notes:?}"
    );
}

#[test]
fn test_allow_everything_needs_no_program() {
    let (p, _) = program(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdirat"], "action": "SCMP_ACT_ALLOW"}]
    }));
    assert!(p.is_none());
}

#[test]
fn test_flags_as_runc_passes_them() {
    let with = |flags: Option<Value>| {
        let mut v = bats_profile(None, "SCMP_ACT_ERRNO");
        if let Some(f) = flags {
            v["flags"] = f;
        }
        program(v).0.unwrap().flags
    };
    assert_eq!(with(None), 4, "no field: SPEC_ALLOW");
    assert_eq!(with(Some(json!([]))), 0);
    assert_eq!(
        with(Some(json!([
            "SECCOMP_FILTER_FLAG_TSYNC",
            "SECCOMP_FILTER_FLAG_LOG"
        ]))),
        2
    );
    assert_eq!(
        with(Some(json!([
            "SECCOMP_FILTER_FLAG_LOG",
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW"
        ]))),
        6
    );
    let mut v = bats_profile(None, "SCMP_ACT_ERRNO");
    v["flags"] = json!(["SECCOMP_FILTER_FLAG_NEW"]);
    assert!(refused(v).contains("SECCOMP_FILTER_FLAG_NEW"));
}

#[test]
fn test_notify_and_listener_refused_in_one_line() {
    let m = refused(bats_profile(None, "SCMP_ACT_NOTIFY"));
    assert!(m.contains("SCMP_ACT_NOTIFY"), "{m}");
    assert!(!m.contains('\n'));
    let mut v = bats_profile(None, "SCMP_ACT_ERRNO");
    v["listenerPath"] = "/run/agent.sock".into();
    assert!(refused(v).contains("listenerPath"));
    assert!(refused(bats_profile(None, "SCMP_ACT_WHATEVER")).contains("unknown action"));
}

#[test]
fn test_large_allow_list_fits_the_kernel_bounds() {
    // Docker's default profile allows about 350 calls by name with default ERRNO.
    let names: Vec<String> = (0..450)
        .filter_map(|n| syscalls::Sysno::new(n).map(|s| s.name().to_owned()))
        .collect();
    assert!(names.len() > 300);
    let (p, _) = program(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]
    }));
    let p = p.unwrap();
    assert!(p.filters[0].len() <= agent_protocol::seccomp::BPF_MAXINSNS);
    agent_protocol::Validate::validate(&p).unwrap();
    // Everything named works, including what the child does.
    assert_eq!(
        in_filtered_child(&p, mkdir_errno),
        End::Exited(libc::ENOENT)
    );
}
