//! One pool shell: a pre-started VMM (plain, or with the pool's template pre-loaded) that
//! waits for a client to claim it.
//!
//! It binds its socket (`.starting-PID.sock` in the pool directory) first, then, in a jailed
//! pool, jails itself ([`crate::oci::jail::enter_pool_shell`]: a uid of its own, a mount
//! namespace holding only the template for a pre-loaded shell, no privileges) before its VM
//! exists, builds its VM, and says `ready NAME` on its stdout: the manager renames the socket
//! into `ready/NAME` (a jailed shell cannot reach the pool directory), retires it with SIGTERM,
//! and gives its uid back when it ends unclaimed.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use vmm::seccomp::SeccompMode;
use vmm::vm::{PreloadedVm, ShellConfig, SnapshotSpec, SnapshotState, VmShell};

use super::preload::{self, Wanted};
use super::{PoolJail, ShellArgs, peer_uid, pool_dir, serve};

/// What a shell serves its client with.
pub(super) enum ShellVm {
    /// A shell with no guest: the client's snapshot is loaded after the claim.
    Plain(VmShell),
    /// A shell that loaded the template of this key: only host resources are attached.
    Preloaded(PreloadedVm, String),
}

/// One pre-started VMM: builds its shell (and pre-loads a template, when told to), waits to be
/// claimed, restores its client's snapshot.
pub(super) fn shell(a: ShellArgs, seccomp: SeccompMode, jail: Option<PoolJail>) -> Result<i32> {
    // Nothing the manager's process had open reaches the VM (stdio: /dev/null, the pipe the
    // shell says `ready` on, the manager's log).
    crate::oci::jail::close_inherited_fds(&[]);
    let c = &a.pool;
    let dir = pool_dir(c.dir.dir.as_deref())?;
    let pid = std::process::id();
    // Who may claim it: the pool's owner (or root), whatever uid the jail gives this process.
    let owner = nix::unistd::geteuid().as_raw();
    let manager = nix::unistd::getppid();
    let listener = bind_starting(&dir)?;
    let preload = a.preload.as_ref().zip(a.key.as_ref());
    // Where the template is once jailed (its snapshot directory, bound read-only).
    let mut template_here = preload.map(|(snapshot, _)| snapshot.clone());
    if let Some(j) = &jail {
        let shell = crate::oci::jail::PoolShell {
            dir: dir.clone(),
            pid: pid as i32,
        };
        let template = preload.map(|(snapshot, _)| snapshot.as_path());
        let uid = crate::oci::jail::enter_pool_shell(&j.root, j.settings, &shell, template)?;
        tracing::debug!("pool shell {pid}: jailed as uid {uid}");
        if template.is_some() {
            template_here = Some(crate::oci::jail::POOL_TEMPLATE.into());
        }
    }
    let (vm, name) = match (preload, template_here) {
        (Some((snapshot, key)), Some(here)) => {
            let w = Wanted {
                snapshot: snapshot.clone(),
                mode: a.preload_mode,
                fault_around: a.preload_fault_around,
            };
            let state = SnapshotState::read(&here)?;
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
            if w.key_in(&here).as_deref() != Some(key.as_str()) {
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
    let listener = listen(listener)?;
    // The manager publishes the socket under this name.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready {name}")?;
        out.flush()?;
    }
    match wait_for_client(listener, owner, manager)? {
        Some(stream) => serve(vm, stream),
        None => Ok(0),
    }
}

/// The name a shell's socket is bound at before the manager publishes it.
pub(super) fn starting_name(pid: u32) -> String {
    format!(".starting-{pid}.sock")
}

/// Binds the shell's socket in the pool directory (before any jail), mode 0600; it listens
/// once the shell is ready ([`listen`]), so that `SO_PEERCRED` tells its clients the uid it
/// runs as then (the jail's), not root's.
fn bind_starting(dir: &Path) -> Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
    let starting = dir.join(starting_name(std::process::id()));
    let _ = std::fs::remove_file(&starting);
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(&starting)?)?;
    // Only the owner may connect; set before the socket appears in ready/.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&starting, std::fs::Permissions::from_mode(0o600))?;
    Ok(fd)
}

/// Listens on the socket [`bind_starting`] bound.
fn listen(fd: std::os::fd::OwnedFd) -> Result<UnixListener> {
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(16)?)?;
    Ok(UnixListener::from(fd))
}

/// Waits for a client on `listener`; `None` when the shell is to end (a termination signal: the
/// pool stopped or retired it, or a claim whose client went away; or its manager is gone).
/// Only the pool's owner (`owner`) or root is served.
fn wait_for_client(
    listener: UnixListener,
    owner: u32,
    manager: nix::unistd::Pid,
) -> Result<Option<UnixStream>> {
    // Until a client comes, a termination signal ends this shell (the VM's loop, which reads
    // them later, does not run yet).
    let signals = vmm::vm::termination_signalfd()?;
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
                Ok(uid) if uid == owner || uid == 0 => break conn,
                Ok(uid) => tracing::warn!("pool shell: refusing a client running as uid {uid}"),
                Err(e) => tracing::warn!("pool shell: refusing a client: {e:#}"),
            }
            continue;
        }
        if n > 0 && fds[1].revents != 0 && matches!(signals.read_signal(), Ok(Some(_))) {
            return Ok(None);
        }
        if nix::unistd::getppid() != manager {
            // The manager died: nobody publishes or retires this shell any more.
            return Ok(None);
        }
    };
    drop(listener);
    Ok(Some(stream))
}
