//! The pool manager: keeps `--size` plain shells and `--preload-size` shells pre-loaded with the
//! pool's template ready, refills them as clients claim them, and retires the pre-loaded shells
//! of a template that changed. It publishes each shell's socket when the shell says it is ready
//! (`ready NAME` on its stdout), retires a shell by removing its socket and signalling it, ends
//! a claimed shell whose client never connected, and gives a jailed shell's uid back when the
//! shell ends unclaimed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::ValueEnum;
use vmm::seccomp::SeccompMode;

use super::preload::{self, Wanted};
use super::shell::starting_name;
use super::{CLAIM_TIMEOUT, PoolConfig, PoolJail, pool_dir};

struct Member {
    child: Child,
    ready: Option<PathBuf>,
    /// The key of the template it pre-loads (`None`: a plain shell).
    key: Option<String>,
    /// What it said on its stdout so far (until `ready NAME`).
    said: Vec<u8>,
}

/// A shell no longer in the pool: claimed (its client runs a VM in it), or retired.
struct Gone {
    child: Child,
    /// When it left the pool.
    since: Instant,
    /// Signalled already (retired, or claimed by a client that never connected).
    signalled: bool,
}

/// Longest `ready NAME` line.
const READY_LINE_MAX: usize = 256;

/// Reads what `m` said (non-blocking) and, on `ready NAME`, publishes its socket as
/// `ready/NAME`. NAME must be a plain file name ending in `-PID.sock`.
fn publish(dir: &std::path::Path, m: &mut Member) -> Option<PathBuf> {
    use std::io::Read;
    let out = m.child.stdout.as_mut()?;
    let mut buf = [0u8; 256];
    while let Ok(n) = out.read(&mut buf) {
        if n == 0 {
            break;
        }
        m.said.extend_from_slice(&buf[..n]);
        if m.said.len() > READY_LINE_MAX {
            m.said.clear();
            return None;
        }
    }
    let line = m
        .said
        .split(|&b| b == b'\n')
        .next()
        .filter(|_| m.said.contains(&b'\n'))?;
    let name = std::str::from_utf8(line).ok()?.strip_prefix("ready ")?;
    let pid = m.child.id();
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with('.');
    if !plain || !name.ends_with(&format!("-{pid}.sock")) {
        tracing::warn!("pool manager: shell {pid} said a bad name {name:?}");
        return None;
    }
    let ready = dir.join("ready").join(name);
    match std::fs::rename(dir.join(starting_name(pid)), &ready) {
        Ok(()) => Some(ready),
        Err(e) => {
            tracing::warn!("pool manager: cannot publish shell {pid}: {e}");
            None
        }
    }
}

/// After shell `pid` ended: its leftover socket names, and its jail uid given back (when no
/// container adopted it).
fn after_shell(dir: &std::path::Path, jail: Option<&PoolJail>, pid: u32) {
    let _ = std::fs::remove_file(dir.join(starting_name(pid)));
    for sub in ["ready", "claimed"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .ends_with(&format!("-{pid}.sock"))
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    if let Some(j) = jail
        && let Err(e) = crate::oci::jail::release_pool_shell(&j.root, dir, pid as i32)
    {
        tracing::warn!("pool manager: the uid of shell {pid}: {e:#}");
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill with integer arguments, to a child this manager started and has not reaped.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// How often the manager looks at the template it pre-loads (a changed one retires its shells).
const TEMPLATE_CHECK: Duration = Duration::from_millis(100);

/// The manager: keeps `size` unclaimed plain shells and `preload_size` shells pre-loaded with
/// the pool's template alive until SIGTERM; retires the pre-loaded shells of a template that
/// changed.
pub(super) fn manage(c: PoolConfig, seccomp: SeccompMode, jail: Option<PoolJail>) -> Result<i32> {
    let dir = pool_dir(c.dir.dir.as_deref())?;
    let signals = vmm::vm::termination_signalfd()?;
    let pid = std::process::id() as i32;
    let pid_start = crate::oci::state::process_start_time(pid).unwrap_or(0);
    crate::oci::write_file_synced(&dir.join("manager.pid"), pid.to_string().as_bytes())?;
    crate::oci::write_file_synced(
        &dir.join("manager.json"),
        serde_json::json!({
            "size": c.size, "vcpus": c.vcpus, "mem_mib": c.mem_mib,
            "preload_size": c.preload_size(),
            "pid": pid, "pid_start": pid_start,
            "jail_root": jail.as_ref().map(|j| j.root.clone()),
        })
        .to_string()
        .as_bytes(),
    )?;
    let exe = std::env::current_exe()?;
    let seccomp_arg = match seccomp {
        SeccompMode::Off => "off",
        SeccompMode::Log => "log",
        SeccompMode::Kill => "kill",
    };
    let mut members: Vec<Member> = Vec::new();
    // Claimed shells run their client's VM, retired ones are on their way out; reaped when they
    // end.
    let mut busy: Vec<Gone> = Vec::new();
    let mut spawned = 0u64;
    // The template to pre-load and its key, looked at every TEMPLATE_CHECK.
    let mut template: Option<(Wanted, String)> = None;
    let mut checked_at: Option<Instant> = None;
    // Templates whose pre-load failed (a shell exited with an error before it was ready): not
    // tried again until their key changes.
    let mut refused: Vec<String> = Vec::new();
    loop {
        if let Ok(Some(sig)) = signals.read_signal() {
            tracing::info!("pool manager: signal {}, stopping", sig.ssi_signo);
            break;
        }
        if checked_at.is_none_or(|t| t.elapsed() >= TEMPLATE_CHECK) {
            checked_at = Some(Instant::now());
            template = (c.preload_size() > 0)
                .then(|| preload::wanted(&dir))
                .flatten()
                .and_then(|w| w.key().map(|k| (w, k)))
                .filter(|(_, k)| !refused.contains(k));
        }
        let current = template.as_ref().map(|(_, k)| k.as_str());
        // Forget shells that exited; a shell whose socket was claimed now runs a VM for its
        // client and no longer counts.
        busy.retain_mut(|g| {
            if !matches!(g.child.try_wait(), Ok(None)) {
                after_shell(&dir, jail.as_ref(), g.child.id());
                return false;
            }
            // Claimed by a client that never connected (the client removes the claimed name
            // once it has): the shell waits for nobody.
            let pid = g.child.id();
            if !g.signalled && g.since.elapsed() > CLAIM_TIMEOUT {
                let waiting = std::fs::read_dir(dir.join("claimed")).is_ok_and(|rd| {
                    rd.flatten().any(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .ends_with(&format!("-{pid}.sock"))
                    })
                });
                if waiting {
                    signal(&g.child, libc::SIGTERM);
                }
                g.signalled = true;
            }
            true
        });
        let mut kept = Vec::with_capacity(members.len());
        for mut m in members.drain(..) {
            if let Ok(Some(status)) = m.child.try_wait() {
                if let (Some(k), None, false) = (&m.key, &m.ready, status.success()) {
                    tracing::warn!("pool manager: pre-loading template {k} failed ({status})");
                    refused.push(k.clone());
                }
                after_shell(&dir, jail.as_ref(), m.child.id());
                continue;
            }
            let stale = m.key.is_some() && m.key.as_deref() != current;
            let gone = |child, signalled| Gone {
                child,
                since: Instant::now(),
                signalled,
            };
            match &m.ready {
                Some(p) if !p.exists() => busy.push(gone(m.child, false)),
                Some(p) if stale => {
                    // Retired: once its socket is gone no client can claim it; it is told to
                    // end. A client that renamed it first has it.
                    let retired = std::fs::remove_file(p).is_ok();
                    if retired {
                        signal(&m.child, libc::SIGTERM);
                    }
                    busy.push(gone(m.child, retired));
                }
                Some(_) => kept.push(m),
                None => {
                    m.ready = publish(&dir, &mut m);
                    kept.push(m);
                }
            }
        }
        members = kept;
        let count = |members: &[Member], key: Option<&str>| {
            members.iter().filter(|m| m.key.as_deref() == key).count()
        };
        let mut spawn = |preload: Option<&(Wanted, String)>| -> Result<Member> {
            let mut cmd = Command::new(&exe);
            cmd.args(["--seccomp", seccomp_arg, "pool", "shell", "--dir"])
                .arg(&dir)
                .args(["--vcpus", &c.vcpus.to_string()])
                .args(["--mem-mib", &c.mem_mib.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            if let Some(j) = &jail {
                cmd.arg("--root").arg(&j.root);
            }
            if let Some((w, key)) = preload {
                let mode = w
                    .mode
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default();
                cmd.arg("--preload")
                    .arg(&w.snapshot)
                    .args(["--preload-mode", &mode])
                    .args(["--preload-fault-around", &w.fault_around.to_string()])
                    .args(["--key", key]);
            }
            let child = cmd.spawn()?;
            if let Some(out) = &child.stdout {
                nix::fcntl::fcntl(
                    out,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                )?;
            }
            spawned += 1;
            Ok(Member {
                child,
                ready: None,
                key: preload.map(|(_, k)| k.clone()),
                said: Vec::new(),
            })
        };
        for _ in count(&members, None)..c.size as usize {
            members.push(spawn(None)?);
        }
        if let Some(t) = &template {
            for _ in count(&members, Some(&t.1))..c.preload_size() as usize {
                members.push(spawn(Some(t))?);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // A shell whose socket a client renamed first is that client's: it keeps running.
    members.retain(|m| {
        let claimed = m
            .ready
            .as_ref()
            .is_some_and(|p| std::fs::remove_file(p).is_err());
        if !claimed {
            signal(&m.child, libc::SIGTERM);
        }
        !claimed
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    for m in &mut members {
        while matches!(m.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = m.child.kill();
        let _ = m.child.wait();
        after_shell(&dir, jail.as_ref(), m.child.id());
    }
    let _ = std::fs::remove_file(dir.join("manager.pid"));
    tracing::info!("pool manager stopped after starting {spawned} shells");
    Ok(0)
}
