//! One pool shell: a pre-started VMM (plain, or with the pool's template pre-loaded) that
//! publishes its socket in `ready/` and waits for a client to claim it.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use vmm::seccomp::SeccompMode;
use vmm::vm::{PreloadedVm, ShellConfig, SnapshotSpec, SnapshotState, VmShell};

use super::preload::{self, Wanted};
use super::{CLAIM_TIMEOUT, ShellArgs, peer_uid, pool_dir, serve, trusted_peer};

/// What a shell serves its client with.
pub(super) enum ShellVm {
    /// A shell with no guest: the client's snapshot is loaded after the claim.
    Plain(VmShell),
    /// A shell that loaded the template of this key: only host resources are attached.
    Preloaded(PreloadedVm, String),
}

/// One pre-started VMM: builds its shell (and pre-loads a template, when told to), waits to be
/// claimed, restores its client's snapshot.
pub(super) fn shell(a: ShellArgs, seccomp: SeccompMode) -> Result<i32> {
    let c = &a.pool;
    let dir = pool_dir(c.dir.dir.as_deref())?;
    let pid = std::process::id();
    let (vm, name) = match (&a.preload, &a.key) {
        (Some(snapshot), Some(key)) => {
            let w = Wanted {
                snapshot: snapshot.clone(),
                mode: a.preload_mode,
                fault_around: a.preload_fault_around,
            };
            let state = SnapshotState::read(&w.snapshot)?;
            if state.vcpus()? != c.vcpus {
                bail!(
                    "template {} has {} vCPUs, the pool's shells {}",
                    w.snapshot.display(),
                    state.vcpus()?,
                    c.vcpus
                );
            }
            let mem_mib = state.mem_mib();
            let vm_shell = VmShell::new(ShellConfig {
                vcpus: c.vcpus,
                api_sock: None,
                process_start: Instant::now(),
                seccomp,
                memory_class: Some(mem_mib),
                stop_on_signals: true,
                kvm: None,
            })?;
            let checked =
                state.check(crate::restore_cmd::restore_mode_of(w.mode), vm_shell.kvm())?;
            // No client waits: the working set is installed now, not beside the vCPUs.
            let spec = SnapshotSpec::new(checked, w.fault_around as usize, true, None)?;
            let vm = vm_shell.preload(spec)?;
            // The template may have changed while it loaded: then it is another key's.
            if w.key().as_deref() != Some(key.as_str()) {
                tracing::info!("pool shell: template {key} changed while it loaded");
                return Ok(0);
            }
            let name = format!(
                "{}v{}-m{mem_mib}-{pid}.sock",
                preload::socket_prefix(key),
                c.vcpus
            );
            (ShellVm::Preloaded(vm, key.clone()), name)
        }
        _ => {
            let vm_shell = VmShell::new(ShellConfig {
                vcpus: c.vcpus,
                api_sock: None,
                process_start: Instant::now(),
                seccomp,
                memory_class: Some(c.mem_mib),
                stop_on_signals: true,
                kvm: None,
            })?;
            (
                ShellVm::Plain(vm_shell),
                format!("v{}-m{}-{pid}.sock", c.vcpus, c.mem_mib),
            )
        }
    };
    match wait_for_client(&dir, &name)? {
        Some(stream) => serve(vm, stream),
        None => Ok(0),
    }
}

/// Publishes the shell's socket as `ready/NAME` and waits for a client to claim it; `None` when
/// the shell is to end (a termination signal, a claim whose client went away, or its socket
/// removed: the pool stopped or retired it).
fn wait_for_client(dir: &Path, name: &str) -> Result<Option<UnixStream>> {
    let pid = std::process::id();
    let starting = dir.join(format!(".starting-{pid}.sock"));
    let listener = UnixListener::bind(&starting)?;
    {
        // Only the owner may connect; set before the socket appears in ready/.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&starting, std::fs::Permissions::from_mode(0o600))?;
    }
    let ready = dir.join("ready").join(name);
    std::fs::rename(&starting, &ready)?;
    let claimed = dir.join("claimed").join(name);
    // Until a client comes, a termination signal ends this shell (the VM's loop, which reads
    // them later, does not run yet).
    let signals = vmm::vm::termination_signalfd()?;
    let mut claimed_at: Option<Instant> = None;
    let stream = loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling two valid fds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 500) };
        if n > 0 && fds[0].revents != 0 {
            let (conn, _) = listener.accept()?;
            // The client's request runs with this shell's privileges.
            match peer_uid(&conn) {
                Ok(uid) if trusted_peer(uid) => break conn,
                Ok(uid) => tracing::warn!("pool shell: refusing a client running as uid {uid}"),
                Err(e) => tracing::warn!("pool shell: refusing a client: {e:#}"),
            }
            continue;
        }
        if n > 0 && fds[1].revents != 0 && matches!(signals.read_signal(), Ok(Some(_))) {
            let _ = std::fs::remove_file(&ready);
            return Ok(None);
        }
        if !ready.exists() {
            let at = *claimed_at.get_or_insert_with(Instant::now);
            if !claimed.exists() || at.elapsed() > CLAIM_TIMEOUT {
                // Claimed by a client that went away, or the pool was stopped or retired it.
                let _ = std::fs::remove_file(&claimed);
                return Ok(None);
            }
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(&claimed);
    Ok(Some(stream))
}
