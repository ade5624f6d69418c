//! OCI hooks (runtime-spec `config.md`, "POSIX-platform Hooks"): host programs the runtime runs
//! at points of a container's lifecycle, each with the container's state as JSON on its stdin.
//!
//! All of them run on the host, in the host's namespaces, as the runtime's user: runc runs
//! `createContainer` and `startContainer` in the container's namespaces, which for kata-snap are
//! inside the VM, where the hook's program is not. The `pid` they read is the supervisor's (the
//! VM's process, the container's pid for the engine); when the container has a network
//! namespace of its own (`linux.namespaces` `network` without a path), the supervisor is in it,
//! so that a hook configuring `/proc/PID/ns/net` (Docker's `libnetwork-setkey`, nerdctl's
//! `oci-hook`, a CNI wrapper) configures the namespace whose interface the guest takes.
//!
//! As runc: a failing `prestart`, `createRuntime`, `createContainer` or `startContainer` hook
//! fails the operation, naming the hook with its stdout and stderr; a failing `poststart` or
//! `poststop` hook is a warning. A hook's `timeout` kills it; without one it may run as long as
//! it likes (as with runc).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use oci_bundle::Hook;
use serde::Serialize;

use super::state::OCI_VERSION;

/// Bytes of a hook's stdout and of its stderr kept for the error message (the rest is read and
/// dropped, so that a chatty hook never blocks on a full pipe).
const OUTPUT_KEPT: usize = 4 << 10;
/// How long a hook's output is still read once it has exited (a child it left behind may hold
/// the pipe open forever).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// The state a hook reads on its stdin (runtime-spec `runtime.md`, "State").
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookState<'a> {
    /// The runtime-spec version.
    pub oci_version: &'a str,
    /// The container id.
    pub id: &'a str,
    /// `creating`, `created`, `running` or `stopped`.
    pub status: &'a str,
    /// The supervisor's pid (0 once it is gone).
    pub pid: i32,
    /// The bundle directory.
    pub bundle: &'a Path,
    /// The bundle's annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: &'a BTreeMap<String, String>,
}

impl<'a> HookState<'a> {
    /// The state of container `record` in `status`, its process `pid`.
    pub fn new(record: &'a super::state::Record, status: &'a str, pid: i32) -> Self {
        Self {
            oci_version: OCI_VERSION,
            id: &record.id,
            status,
            pid,
            bundle: &record.bundle,
            annotations: &record.annotations,
        }
    }
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// It could not be started.
    #[error("error running {kind} hook #{index} ({path}): {reason}")]
    Start {
        /// Its kind (`prestart`, ...).
        kind: &'static str,
        /// Its index in that list.
        index: usize,
        /// Its executable.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// It ran and failed, or ran past its timeout.
    #[error(
        "error running {kind} hook #{index} ({path}): {how}, stdout: {stdout}, stderr: {stderr}"
    )]
    Failed {
        /// Its kind (`prestart`, ...).
        kind: &'static str,
        /// Its index in that list.
        index: usize,
        /// Its executable.
        path: String,
        /// Its exit status, its signal, or its timeout.
        how: String,
        /// The start of its stdout.
        stdout: String,
        /// The start of its stderr.
        stderr: String,
    },
}

/// Runs `hooks` (each with its kind) in order, stopping at the first that fails. A hook's index
/// in its error counts within its kind, as runc counts. `netns`: the network namespace the hooks
/// run in when the calling thread is in another (the container's own).
pub fn run_all<'h>(
    hooks: impl IntoIterator<Item = (&'static str, &'h Hook)>,
    state: &HookState<'_>,
    netns: Option<BorrowedFd<'_>>,
) -> Result<(), HookError> {
    let json = serde_json::to_vec(state).expect("the hook state serializes");
    let mut index: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (kind, hook) in hooks {
        let i = index.entry(kind).or_default();
        run_one(kind, *i, hook, &json, netns)?;
        *i += 1;
    }
    Ok(())
}

/// Runs `hooks` in order, each whatever became of the one before; a failure is logged as a
/// warning (`poststart`, `poststop`). `netns` as for [`run_all`].
pub fn run_all_warn(
    kind: &'static str,
    hooks: &[Hook],
    state: &HookState<'_>,
    netns: Option<BorrowedFd<'_>>,
) {
    let json = serde_json::to_vec(state).expect("the hook state serializes");
    for (i, hook) in hooks.iter().enumerate() {
        if let Err(e) = run_one(kind, i, hook, &json, netns) {
            tracing::warn!("{e}");
        }
    }
}

fn run_one(
    kind: &'static str,
    index: usize,
    hook: &Hook,
    state: &[u8],
    netns: Option<BorrowedFd<'_>>,
) -> Result<(), HookError> {
    let path = hook.path.display().to_string();
    let start_err = |reason: String| HookError::Start {
        kind,
        index,
        path: path.clone(),
        reason,
    };
    let mut cmd = Command::new(&hook.path);
    if let Some((arg0, rest)) = hook.args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    // The hook's environment is its `env`, nothing inherited.
    cmd.env_clear();
    for e in &hook.env {
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                cmd.env(k, v);
            }
            _ => tracing::warn!("{kind} hook {path}: environment entry {e:?} skipped (no NAME=)"),
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        let fd = ns.as_raw_fd();
        let enter = move || {
            // SAFETY: setns(2) on a descriptor the parent keeps open until the spawn returns;
            // no memory is passed.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: `enter` runs in the forked child before exec and makes one plain system
        // call (async-signal-safe): no allocation, no lock.
        unsafe {
            cmd.pre_exec(enter);
        }
    }
    let mut child = cmd.spawn().map_err(|e| start_err(e.to_string()))?;
    tracing::debug!(kind, index, path = %path, pid = child.id(), "hook started");
    // The state goes in from a thread of its own: a hook that never reads its stdin must not
    // block this one (the state of a container with many annotations can fill a pipe).
    let mut stdin = child.stdin.take().expect("piped");
    let input = state.to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let stdout = drain(child.stdout.take().expect("piped"));
    let stderr = drain(child.stderr.take().expect("piped"));
    let deadline = hook
        .timeout
        .map(|t| Instant::now() + Duration::from_secs(u64::from(t)));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e.to_string()),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            break Err(format!(
                "timed out after {} s",
                hook.timeout.unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let how = match status {
        Ok(s) if s.success() => return Ok(()),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => e,
    };
    Err(HookError::Failed {
        kind,
        index,
        path,
        how,
        stdout: collected(stdout),
        stderr: collected(stderr),
    })
}

/// Reads `r` to its end on a thread, keeping the first [`OUTPUT_KEPT`] bytes.
fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = OUTPUT_KEPT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        let _ = tx.send(kept);
    });
    rx
}

fn collected(rx: mpsc::Receiver<Vec<u8>>) -> String {
    let bytes = rx.recv_timeout(OUTPUT_GRACE).unwrap_or_default();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

/// The container's own network namespace, for a container whose create-time hooks configure
/// one (`linux.namespaces` `network` without a path): the calling thread (the main thread, so
/// that `/proc/PID/ns/net` is it) moves into a new, empty namespace; the host's is returned for
/// the hooks, which run there.
pub fn enter_new_netns() -> anyhow::Result<OwnedFd> {
    use anyhow::Context;
    let host: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")
        .context("cannot open this thread's network namespace")?
        .into();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("cannot create the container's network namespace (its hooks configure one)")?;
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn hook(path: &Path, args: &[&str], env: &[&str], timeout: Option<u32>) -> Hook {
        Hook {
            path: path.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            timeout,
        }
    }

    fn state<'a>(annotations: &'a BTreeMap<String, String>) -> HookState<'a> {
        HookState {
            oci_version: OCI_VERSION,
            id: "c1",
            status: "creating",
            pid: 4242,
            bundle: Path::new("/b"),
            annotations,
        }
    }

    #[test]
    fn test_hooks_get_state_args_and_only_their_env_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let line = format!(
            "echo \"$1 A=$A HOME=${{HOME:-unset}} $(cat)\" >> {}",
            out.display()
        );
        // argv[0] as given: the shell's own command line shows it.
        let argv0 = format!(
            "head -c 10 /proc/$$/cmdline >> {o}; echo >> {o}; {line}",
            o = out.display()
        );
        let h = script(dir.path(), "h", &line);
        let a = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let first = hook(
            Path::new("/bin/sh"),
            &["hook-name", "-c", &argv0, "sh", "x"],
            &["A=1"],
            None,
        );
        let second = hook(&h, &[], &[], Some(5));
        run_all(
            [("prestart", &first), ("createRuntime", &second)],
            &state(&a),
            None,
        )
        .unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<_> = got.lines().collect();
        let json = r#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":4242,"bundle":"/b","annotations":{"k":"v"}}"#;
        assert_eq!(lines.len(), 3, "{got}");
        assert_eq!(lines[0], "hook-name\0");
        assert_eq!(lines[1], format!("x A=1 HOME=unset {json}"));
        // No args: the script alone, nothing of this process's environment.
        assert_eq!(lines[2], format!(" A= HOME=unset {json}"));
    }

    #[test]
    fn test_failing_hook_stops_the_list_and_names_itself_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let ok = script(dir.path(), "ok", "exit 0");
        let bad = script(dir.path(), "bad", "echo out; echo why >&2; exit 3");
        let never = dir.path().join("never-ran");
        let after = script(dir.path(), "after", &format!("touch {}", never.display()));
        let a = BTreeMap::new();
        let (h0, h1, h2) = (
            hook(&ok, &[], &[], None),
            hook(&bad, &[], &[], None),
            hook(&after, &[], &[], None),
        );
        let e = run_all(
            [
                ("createRuntime", &h0),
                ("createRuntime", &h1),
                ("createContainer", &h2),
            ],
            &state(&a),
            None,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            format!(
                "error running createRuntime hook #1 ({}): exit status 3, stdout: out, stderr: why",
                bad.display()
            )
        );
        assert!(!never.exists());
        let e = run_all(
            [(
                "prestart",
                &hook(&dir.path().join("missing"), &[], &[], None),
            )],
            &state(&a),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("error running prestart hook #0") && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn test_hook_past_its_timeout_is_killed_even_if_its_child_keeps_the_pipe() {
        let dir = tempfile::tempdir().unwrap();
        // Never reads stdin; a background child holds stdout open after it is killed.
        let slow = script(dir.path(), "slow", "sleep 30 & sleep 30");
        let a = BTreeMap::new();
        let t0 = Instant::now();
        let e = run_all(
            [("createRuntime", &hook(&slow, &[], &[], Some(1)))],
            &state(&a),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("timed out after 1 s"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    }

    #[test]
    fn test_warn_hooks_all_run_whatever_fails() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let bad = script(dir.path(), "bad", "exit 1");
        let good = script(dir.path(), "good", &format!("cat > {}", out.display()));
        let a = BTreeMap::new();
        let mut s = state(&a);
        s.status = "stopped";
        s.pid = 0;
        run_all_warn(
            "poststop",
            &[hook(&bad, &[], &[], None), hook(&good, &[], &[], None)],
            &s,
            None,
        );
        let got = std::fs::read_to_string(&out).unwrap();
        assert!(got.contains(r#""status":"stopped","pid":0"#), "{got}");
    }
}
