//! The pool manager: keeps `--size` plain shells and `--preload-size` shells pre-loaded with the
//! pool's template ready, refills them as clients claim them, and retires the pre-loaded shells
//! of a template that changed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::ValueEnum;
use vmm::seccomp::SeccompMode;

use super::preload::{self, Wanted};
use super::{PoolConfig, pool_dir, ready_sockets};

struct Member {
    child: Child,
    ready: Option<PathBuf>,
    /// The key of the template it pre-loads (`None`: a plain shell).
    key: Option<String>,
}

/// How often the manager looks at the template it pre-loads (a changed one retires its shells).
const TEMPLATE_CHECK: Duration = Duration::from_millis(100);

/// The manager: keeps `size` unclaimed plain shells and `preload_size` shells pre-loaded with
/// the pool's template alive until SIGTERM; retires the pre-loaded shells of a template that
/// changed.
pub(super) fn manage(c: PoolConfig, seccomp: SeccompMode) -> Result<i32> {
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
    let mut busy: Vec<Child> = Vec::new();
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
        busy.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        let mut kept = Vec::with_capacity(members.len());
        for mut m in members.drain(..) {
            if let Ok(Some(status)) = m.child.try_wait() {
                if let (Some(k), None, false) = (&m.key, &m.ready, status.success()) {
                    tracing::warn!("pool manager: pre-loading template {k} failed ({status})");
                    refused.push(k.clone());
                }
                continue;
            }
            let stale = m.key.is_some() && m.key.as_deref() != current;
            match &m.ready {
                Some(p) if !p.exists() => busy.push(m.child),
                Some(p) if stale => {
                    // Retired: once its socket is gone no client can claim it, and it exits.
                    // A client that renamed it first has it.
                    let _ = std::fs::remove_file(p);
                    busy.push(m.child);
                }
                Some(_) => kept.push(m),
                None => {
                    m.ready = ready_sockets(&dir).into_iter().find(|p| {
                        p.to_string_lossy()
                            .ends_with(&format!("-{}.sock", m.child.id()))
                    });
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
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
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
            spawned += 1;
            Ok(Member {
                child,
                ready: None,
                key: preload.map(|(_, k)| k.clone()),
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
    for m in &mut members {
        // SAFETY: SIGTERM to a shell this manager started and has not reaped.
        unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for m in &mut members {
        while matches!(m.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = m.child.kill();
        let _ = m.child.wait();
        if let Some(p) = &m.ready {
            let _ = std::fs::remove_file(p);
        }
    }
    let _ = std::fs::remove_file(dir.join("manager.pid"));
    tracing::info!("pool manager stopped after starting {spawned} shells");
    Ok(0)
}
