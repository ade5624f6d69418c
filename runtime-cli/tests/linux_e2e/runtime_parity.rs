//! The rest of runc's parity (issue 19), beside runc on the same bundles: the container's PID
//! namespace (`umask`, `cgroups`, `delete`, `exec` of runc's bats), `exec --cgroup`, seccomp in
//! the guest (`seccomp.bats`' profiles), a foreground terminal's line ends, and the mounts of
//! `mounts.bats` 3 and 4. Each test runs both runtimes; runc's results are the expectation.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::{Output, wait_deadline};
use crate::guest::*;
use crate::runtime::*;
use crate::runtime_contract::{run_on_a_terminal, start_detached};

fn edit_spec(b: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = b.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut spec);
    fs::write(&path, spec.to_string()).unwrap();
}

fn run_bundle(cmd: Command, b: &Path, id: &str) -> Output {
    run_it(
        cmd,
        &["run", "--no-pivot", "--bundle", b.to_str().unwrap(), id],
    )
}

/// The container's PID namespace as runc's: the init is pid 1 and what `exec` sees of /proc
/// is the namespace's; pid 1 moves to a sub-group of the container's (writable) cgroup mount;
/// `exec --cgroup` joins a sub-group, refuses `..` and a missing one; killing the init kills
/// a detached exec.
#[test]
fn test_pid_namespace_and_exec_cgroup_as_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    subreaper();
    let b = bundle(dir.path(), "pidns", "sleep 600", false);
    edit_spec(&b, |s| {
        // runc's set_cgroup_mount_writable.
        for m in s["mounts"].as_array_mut().unwrap() {
            if m["destination"] == "/sys/fs/cgroup" {
                let opts: Vec<serde_json::Value> = m["options"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|o| *o != "ro")
                    .cloned()
                    .collect();
                m["options"] = opts.into();
            }
        }
    });
    let mut seen = Vec::new();
    for (name, cmd) in &runtimes(e, dir.path()) {
        start_detached(cmd, dir.path(), &b, "p1");
        let ns = run_it(
            cmd(),
            &[
                "exec",
                "p1",
                "sh",
                "-c",
                "tr '\\0' ' ' < /proc/1/cmdline; echo; grep Umask /proc/1/status; ls /proc | grep -c '^[0-9]'",
            ],
        );
        let moved = run_it(
            cmd(),
            &[
                "exec",
                "p1",
                "sh",
                "-c",
                "mkdir /sys/fs/cgroup/foobar && echo 1 > /sys/fs/cgroup/foobar/cgroup.procs && grep -c foobar /proc/1/cgroup",
            ],
        );
        let sub = run_it(
            cmd(),
            &[
                "exec",
                "--cgroup",
                "foobar",
                "p1",
                "cat",
                "/proc/self/cgroup",
            ],
        );
        let missing = run_it(cmd(), &["exec", "--cgroup", "nonexistent", "p1", "true"]);
        let parent = run_it(cmd(), &["exec", "--cgroup", "..", "p1", "true"]);
        // A detached exec dies with the init (the kernel ends the namespace).
        let pid_file = dir.path().join(format!("{name}.bg.pid"));
        let mut c = cmd();
        c.args(["exec", "--detach", "--pid-file"])
            .arg(&pid_file)
            .args(["p1", "sleep", "300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        assert!(wait_deadline(&mut child, T).unwrap().success(), "{name}");
        let pid: i32 = fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(run_it(cmd(), &["kill", "p1", "KILL"]).code(), 0);
        let bg = match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap() {
            nix::sys::wait::WaitStatus::Exited(_, c) => c,
            nix::sys::wait::WaitStatus::Signaled(_, s, _) => 128 + s as i32,
            other => panic!("{name}: {other:?}"),
        };
        wait_status(cmd, "p1", "stopped");
        assert_eq!(run_it(cmd(), &["delete", "p1"]).code(), 0);
        let fields = (
            ns.code(),
            ns.stdout
                .lines()
                .take(2)
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("|"),
            moved.code(),
            moved.stdout.trim().to_string(),
            sub.code(),
            // runc without a cgroup namespace in its spec shows the whole path.
            sub.stdout.trim().ends_with("/foobar"),
            missing.code() != 0 && missing.stderr.contains("no such file or directory"),
            parent.code() != 0,
            bg,
        );
        println!(
            "{name}: {fields:?} ns={:?} sub={:?} missing={:?} parent={:?}",
            ns.stdout, sub.stdout, missing.stderr, parent.stderr
        );
        if *name == "kata-snap" {
            assert!(
                parent.stderr.contains(".. is not a sub cgroup path"),
                "{parent:?}"
            );
        }
        // sleep, sh, ls, grep: the namespace's processes only.
        let count: usize = ns
            .stdout
            .lines()
            .nth(2)
            .unwrap_or("0")
            .trim()
            .parse()
            .unwrap_or(0);
        assert!((2..=5).contains(&count), "{name}: {ns:?}");
        seen.push((*name, fields));
    }
    assert_eq!(
        seen[0].1,
        (
            0,
            "sleep 600|Umask:\t0022".to_string(),
            0,
            "1".to_string(),
            0,
            true,
            true,
            true,
            137
        ),
        "kata-snap"
    );
    if seen.len() == 2 {
        assert_eq!(seen[0].1, seen[1].1, "kata-snap vs runc");
    }
}

/// A busybox bundle running `script` under `profile` (`linux.seccomp`).
fn seccomp_bundle(
    dir: &Path,
    name: &str,
    script: &str,
    nnp: bool,
    profile: serde_json::Value,
) -> PathBuf {
    let b = bundle(dir, name, script, false);
    edit_spec(&b, |s| {
        s["process"]["noNewPrivileges"] = nnp.into();
        s["linux"]["seccomp"] = profile;
    });
    b
}

fn mkdir_profile(action: &str, errno: Option<u32>) -> serde_json::Value {
    let mut rule = serde_json::json!({"names": ["mkdir", "mkdirat"], "action": action});
    if let Some(e) = errno {
        rule["errnoRet"] = e.into();
    }
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": [rule]
    })
}

/// runc's seccomp.bats profiles: ERRNO (EPERM by default, an explicit errno), KILL, with and
/// without no_new_privs; an exec gets the container's filter; an allow-list profile with a
/// default errno lets a shell run.
#[test]
fn test_seccomp_profiles_as_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    subreaper();
    let d = dir.path();
    let mk = "mkdir /dev/shm/foo";
    let cases = [
        (
            "eperm",
            seccomp_bundle(
                d,
                "sc-eperm",
                mk,
                false,
                mkdir_profile("SCMP_ACT_ERRNO", None),
            ),
        ),
        (
            "eperm-nnp",
            seccomp_bundle(d, "sc-nnp", mk, true, mkdir_profile("SCMP_ACT_ERRNO", None)),
        ),
        (
            "errno100",
            seccomp_bundle(
                d,
                "sc-100",
                mk,
                false,
                mkdir_profile("SCMP_ACT_ERRNO", Some(100)),
            ),
        ),
        (
            "kill",
            seccomp_bundle(
                d,
                "sc-kill",
                mk,
                false,
                mkdir_profile("SCMP_ACT_KILL", None),
            ),
        ),
        (
            "allowed",
            seccomp_bundle(
                d,
                "sc-ok",
                "echo ok; mkdir /dev/shm/d && echo made",
                false,
                mkdir_profile("SCMP_ACT_ALLOW", None),
            ),
        ),
    ];
    let exec_b = seccomp_bundle(
        d,
        "sc-exec",
        "sleep 600",
        false,
        mkdir_profile("SCMP_ACT_ERRNO", None),
    );
    let mut seen = Vec::new();
    for (name, cmd) in &runtimes(e, d) {
        let mut results = Vec::new();
        for (case, b) in &cases {
            let o = run_bundle(cmd(), b, &format!("s-{case}"));
            let text = format!("{}{}", o.stdout, o.stderr);
            let reason = if text.contains("Operation not permitted") {
                "EPERM"
            } else if text.contains("Network is down") {
                "ENETDOWN"
            } else if text.contains("made") {
                "made"
            } else {
                "-"
            };
            println!("{name} {case}: {} {text:?}", o.code());
            results.push((*case, o.code(), reason));
        }
        start_detached(cmd, d, &exec_b, "s-exec");
        let ex = run_it(cmd(), &["exec", "s-exec", "mkdir", "/dev/shm/x"]);
        let ok = run_it(cmd(), &["exec", "s-exec", "echo", "fine"]);
        results.push((
            "exec",
            ex.code(),
            if ex.stderr.contains("Operation not permitted") {
                "EPERM"
            } else {
                "-"
            },
        ));
        results.push((
            "exec-ok",
            ok.code(),
            if ok.stdout.trim() == "fine" {
                "made"
            } else {
                "-"
            },
        ));
        assert_eq!(run_it(cmd(), &["kill", "s-exec", "KILL"]).code(), 0);
        wait_status(cmd, "s-exec", "stopped");
        assert_eq!(run_it(cmd(), &["delete", "s-exec"]).code(), 0);
        seen.push((*name, results));
    }
    let ks = &seen[0].1;
    assert_eq!(
        ks.iter()
            .map(|(c, code, r)| (*c, *code != 0, *r))
            .collect::<Vec<_>>(),
        [
            ("eperm", true, "EPERM"),
            ("eperm-nnp", true, "EPERM"),
            ("errno100", true, "ENETDOWN"),
            ("kill", true, "-"),
            ("allowed", false, "made"),
            ("exec", true, "EPERM"),
            ("exec-ok", false, "made"),
        ]
    );
    // SIGSYS: 128 + 31.
    assert_eq!(ks[3].1, 159, "kata-snap kill");
    if seen.len() == 2 {
        assert_eq!(seen[0].1, seen[1].1, "kata-snap vs runc");
    }
}

/// A foreground terminal (`run` and `exec -t` without `--console-socket`) has ONLCR cleared
/// as runc's: lines end in `\n`.
#[test]
fn test_foreground_terminal_line_ends_as_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    subreaper();
    let b = bundle(dir.path(), "nl", "echo one; echo two", true);
    let bg = bundle(dir.path(), "nl-bg", "sleep 600", false);
    let mut seen = Vec::new();
    for (name, cmd) in &runtimes(e, dir.path()) {
        let run = run_on_a_terminal(
            cmd(),
            &b,
            &["run", "--no-pivot", "--bundle", b.to_str().unwrap(), "n1"],
        );
        start_detached(cmd, dir.path(), &bg, "n2");
        let exec = run_on_a_terminal(cmd(), &bg, &["exec", "-t", "n2", "echo", "three"]);
        assert_eq!(run_it(cmd(), &["kill", "n2", "KILL"]).code(), 0);
        wait_status(cmd, "n2", "stopped");
        assert_eq!(run_it(cmd(), &["delete", "n2"]).code(), 0);
        seen.push((*name, (run.code(), run.stdout, exec.code(), exec.stdout)));
    }
    assert_eq!(
        seen[0].1,
        (0, "one\ntwo\n".to_string(), 0, "three\n".to_string()),
        "kata-snap"
    );
    if seen.len() == 2 {
        assert_eq!(seen[0].1, seen[1].1, "kata-snap vs runc");
    }
}

/// mounts.bats 3 and 4: the default /dev tmpfs read-only (the /dev/pts, /dev/shm and
/// /dev/mqueue mount points are made in it afterwards), and a tmpfs whose destination goes
/// through an absolute symbolic link inside the rootfs.
#[test]
fn test_mounts_read_only_dev_and_symlinked_destination_as_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let ro = bundle_args(
        dir.path(),
        "ro-dev",
        &["grep", "^tmpfs /dev ", "/proc/mounts"],
        false,
    );
    edit_spec(&ro, |s| {
        for m in s["mounts"].as_array_mut().unwrap() {
            if m["destination"] == "/dev" {
                m["options"].as_array_mut().unwrap().push("ro".into());
            }
        }
    });
    let link = bundle_args(dir.path(), "link", &["ls", "-ld", "/conf/stack/"], false);
    fs::create_dir_all(link.join("rootfs/real/conf")).unwrap();
    std::os::unix::fs::symlink("/real/conf", link.join("rootfs/conf")).unwrap();
    edit_spec(&link, |s| {
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "type": "tmpfs", "source": "tmpfs", "destination": "/conf/stack",
            "options": ["ro", "relatime"]
        }));
    });
    let mut seen = Vec::new();
    for (name, cmd) in &runtimes(e, dir.path()) {
        let a = run_bundle(cmd(), &ro, "m3");
        let b = run_bundle(cmd(), &link, "m4");
        println!("{name}: {a:?} {b:?}");
        let first = |o: &Output| o.stdout.lines().next().unwrap_or_default().to_string();
        seen.push((
            *name,
            (
                a.code(),
                first(&a)
                    .split_whitespace()
                    .nth(3)
                    .unwrap_or_default()
                    .starts_with("ro,"),
                b.code(),
                first(&b).starts_with("drwxrwxrwt"),
            ),
        ));
    }
    assert_eq!(seen[0].1, (0, true, 0, true), "kata-snap");
    if seen.len() == 2 {
        assert_eq!(seen[0].1, seen[1].1, "kata-snap vs runc");
    }
}
