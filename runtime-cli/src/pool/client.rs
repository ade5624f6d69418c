//! The client's side of a pool: claiming a pre-started VMM for a restore, handing it the
//! request with its descriptors, and following its VM to its exit status.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use std::os::fd::AsFd;
use vmm::vm::SnapshotState;

use super::claim::{claim, claim_preloaded};
use super::preload::{self, Wanted};
use super::{
    Forward, Reply, Request, WHAT, handoff, manager_preloads, monotonic_ns, pool_dir, trusted_peer,
};
use crate::restore_cmd::RestoreArgs;

/// A VM running in a pre-started VMM of the pool, for a client that holds it.
#[derive(Debug)]
pub struct PooledVm {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// The pre-started VMM's pid.
    pub pid: u32,
    /// Whether it had pre-loaded the template.
    pub preloaded: bool,
    /// Process start to the request sent.
    pub handed_off_after: Duration,
    /// The jail uid of the shell, which the container adopted (none: the shell is not jailed,
    /// or the restore is no container's).
    pub adopted: Option<u32>,
    /// The sockets this process bound for the shell: removed with this handle.
    _bound: Vec<handoff::BoundSocket>,
}

impl PooledVm {
    /// Readable when the VMM reports the exit status or goes away.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.stream)
    }

    /// Stops the VM as termination signal `signal` would.
    pub fn stop_by_signal(&mut self, signal: i32) {
        if let Ok(mut f) = serde_json::to_vec(&Forward { signal }) {
            f.push(b'\n');
            let _ = self.stream.write_all(&f);
        }
    }

    /// Reads the VMM's next line: its exit status, once it has stopped.
    pub fn read_exit(&mut self) -> Result<i32> {
        let mut text = String::new();
        if self.reader.read_line(&mut text)? == 0 {
            bail!(
                "the pre-started VMM (pid {}) ended without reporting an exit status",
                self.pid
            );
        }
        match serde_json::from_str::<Reply>(text.trim_end()) {
            Ok(Reply::Exit { code }) => Ok(code),
            Ok(Reply::Error { message }) => bail!("{message}"),
            Ok(Reply::Started { .. }) => bail!("the pre-started VMM said `started` twice"),
            Err(e) => bail!("bad answer from the pre-started VMM: {e}"),
        }
    }
}

/// What a claim of a pre-started VMM came to.
#[derive(Debug)]
pub enum Claim {
    /// A pre-started VMM runs the VM.
    Started(PooledVm),
    /// None to use, or it died during the hand-off: the caller starts cold, with the snapshot's
    /// state file when the claim read it already (nothing is read twice).
    Cold(Option<Box<SnapshotState>>),
}

/// What `manager.json` says of a pool's jail: the state root its shells' uids are allocated
/// in (none: its shells are not jailed).
fn pool_jail_root(dir: &Path) -> Option<PathBuf> {
    let text = crate::oci::read_small_file(&dir.join("manager.json"), 64 << 10).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("jail_root")?.as_str().map(PathBuf::from)
}

/// Whether the shell `cred` describes may run the caller's VM: it runs as the caller or root,
/// or, in a jailed pool (uids allocated in `jail_root`), as a uid of the configured jail range
/// that the allocator says the pool's shell of that very pid holds. Another user cannot pass:
/// the pool directory is the caller's and private, the uid files are root's in a root-only
/// directory, and a uid of the range held by a container or another pool's shell is refused.
fn shell_peer_ok(
    dir: &Path,
    jail_root: Option<&Path>,
    range: &dyn Fn() -> Option<(u32, u32)>,
    cred: &nix::sys::socket::UnixCredentials,
) -> bool {
    if trusted_peer(cred.uid()) {
        return true;
    }
    let Some(root) = jail_root else {
        return false;
    };
    let in_range = range().is_some_and(|(base, count)| {
        cred.uid() >= base && (cred.uid() as u64) < base as u64 + count as u64
    });
    in_range
        && nix::unistd::geteuid().is_root()
        && crate::oci::jail::held_by_pool_shell(root, cred.uid(), dir, cred.pid())
}

/// A container whose supervisor claims a shell: it adopts a jailed shell's uid.
#[derive(Debug)]
pub struct Adopter<'a> {
    /// The container's jail plan (state root, id, directory, template).
    pub plan: crate::oci::jail::Plan<'a>,
}

/// Claims a pre-started VMM for `args` when a pool runs: one that pre-loaded the template, else
/// one of the snapshot's shape. Hands it `args` with `stdio` (stdin, stdout, stderr of its VM)
/// and, for every path of `args`, a descriptor (the sockets bound and the files opened here),
/// and waits until its VM runs. `adopter`: a container's supervisor, which adopts the uid of a
/// jailed shell (and skips a jailed pool whose uids are not in its state root).
pub fn claim_and_start(
    args: &RestoreArgs,
    process_start: Instant,
    stdio: [RawFd; 3],
    adopter: Option<&Adopter>,
) -> Result<Claim> {
    // No pool directory can be named: no pool can have been started by this user.
    let Ok(dir) = pool_dir(args.pool_dir.as_deref()) else {
        return Ok(Claim::Cold(None));
    };
    // A recording writes its file by path: the first restore of a template starts cold.
    if args.record_workingset.is_some() {
        return Ok(Claim::Cold(None));
    }
    // A missing directory holds no pool; one that is not private is refused. Its
    // subdirectories are checked below it (the path above was checked once).
    use crate::oci::assets::{private_dir, private_subdir};
    if !private_dir(&dir, false, WHAT)?
        || !private_subdir(&dir, "ready", WHAT)?
        || !private_subdir(&dir, "claimed", WHAT)?
    {
        return Ok(Claim::Cold(None));
    }
    let jail_root = pool_jail_root(&dir);
    if let (Some(a), Some(root)) = (adopter, &jail_root)
        && a.plan.settings.enabled
        && root.as_path() != a.plan.state_root
    {
        tracing::debug!(
            "the pool's shells take their uids in {}, not in this state root: not used",
            root.display()
        );
        return Ok(Claim::Cold(None));
    }
    let range = || -> Option<(u32, u32)> {
        if let Some(a) = adopter {
            return Some((a.plan.settings.uid_base, a.plan.settings.uid_count));
        }
        let cfg = crate::oci::assets::RuntimeConfig::load().ok()?;
        let s = crate::oci::jail::Settings::from_config(&cfg, true).ok()?;
        Some((s.uid_base, s.uid_count))
    };
    let peer_ok = |cred: &nix::sys::socket::UnixCredentials| {
        shell_peer_ok(&dir, jail_root.as_deref(), &range, cred)
    };
    // The taps are opened here, in the client's network namespace, before a shell is claimed,
    // and handed over with stdio. One that does not open: the cold path reports it.
    let Ok(taps) = crate::restore_cmd::net_taps(args) else {
        return Ok(Claim::Cold(None));
    };
    let template = Wanted::of(args).and_then(|w| w.key().map(|k| (w, k)));
    let mut after_hand_off = None;
    let preloaded = template
        .as_ref()
        .and_then(|(_, key)| claim_preloaded(&dir, key, &peer_ok));
    let (claimed, stream, cred, state) = match preloaded {
        Some((claimed, stream, cred)) => (claimed, stream, cred, None),
        None => {
            // Next time this template is pre-loaded: the manager learns it from here (after
            // the hand-off, off this restore's path).
            let learn = || {
                if let Some((w, _)) = &template
                    && manager_preloads(&dir)
                    && let Err(e) = preload::want(&dir, w)
                {
                    tracing::warn!("cannot name the pool's template: {e:#}");
                }
            };
            let Ok(state) = SnapshotState::read(&args.snapshot) else {
                return Ok(Claim::Cold(None)); // the cold path reports what is wrong
            };
            let (Ok(vcpus), mem_mib) = (state.vcpus(), state.mem_mib()) else {
                return Ok(Claim::Cold(None));
            };
            let Some((claimed, stream, cred)) = claim(&dir, vcpus, mem_mib, &peer_ok) else {
                learn();
                return Ok(Claim::Cold(Some(Box::new(state))));
            };
            after_hand_off = Some(learn);
            (claimed, stream, cred, Some(Box::new(state)))
        }
    };
    let plain = state.is_some();
    // A jailed shell: the container adopts its uid (its directory and the sockets bound here
    // become the uid's, so that the supervisor, jailed as it, still reaches them).
    let jailed_shell = !trusted_peer(cred.uid());
    let adopted = match adopter {
        Some(a) if jailed_shell => {
            let shell = crate::oci::jail::PoolShell {
                dir: dir.clone(),
                pid: cred.pid(),
            };
            crate::oci::jail::adopt(&a.plan, cred.uid(), &shell)?;
            Some(cred.uid())
        }
        _ => None,
    };
    tracing::debug!(
        "claimed pool shell pid {} (uid {}{})",
        cred.pid(),
        cred.uid(),
        if adopted.is_some() { ", adopted" } else { "" }
    );
    // The spare slots' modes: a read-only slot's file is opened read-only.
    let slots = if args.disk_slot.is_empty() {
        Vec::new()
    } else {
        match &state {
            Some(s) => s.spare_slots(),
            None => SnapshotState::read(&args.snapshot)?.spare_slots(),
        }
    };
    let out = handoff::open_for_shell(args, &slots, plain, adopted)?;
    let mut handed: Vec<RawFd> = stdio.to_vec();
    let mut roles = Vec::new();
    for (i, t) in taps.iter().enumerate() {
        handed.push(t.tap.as_raw_fd());
        roles.push(handoff::Role::Tap(i));
    }
    handed.extend(out.fds.iter().map(|f| f.as_raw_fd()));
    roles.extend(out.roles.iter().cloned());
    let started_ago = process_start.elapsed();
    let req = Request {
        args: args.clone(),
        client_start_ns: monotonic_ns().saturating_sub(started_ago.as_nanos() as u64),
        template_key: state
            .is_none()
            .then(|| template.as_ref().map(|(_, k)| k.clone()))
            .flatten(),
        fds: roles,
    };
    let preloaded = req.template_key.is_some();
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    let iov = [std::io::IoSlice::new(&line)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&handed)],
        MsgFlags::empty(),
        None,
    );
    // The shell has its own copies now.
    let bound = out.bound;
    drop(out.fds);
    if let Err(e) = sent {
        tracing::warn!(
            "pool hand-off to {} failed ({e}); starting cold",
            claimed.display()
        );
        return Ok(Claim::Cold(state));
    }
    let handed_off_after = process_start.elapsed();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut text = String::new();
    if reader.read_line(&mut text)? == 0 {
        tracing::warn!("the pre-started VMM ended during the hand-off: starting cold");
        drop(bound);
        return Ok(Claim::Cold(state));
    }
    if let Some(learn) = after_hand_off {
        learn();
    }
    match serde_json::from_str::<Reply>(text.trim_end()) {
        Ok(Reply::Started { pid }) => Ok(Claim::Started(PooledVm {
            stream,
            reader,
            pid,
            preloaded,
            handed_off_after,
            adopted,
            _bound: bound,
        })),
        Ok(Reply::Error { message }) => bail!("{message}"),
        Ok(Reply::Exit { .. }) => bail!("the pre-started VMM exited before it started"),
        Err(e) => bail!("bad answer from the pre-started VMM: {e}"),
    }
}

/// Restores through a pre-started VMM when a pool runs; `Cold` when there is none to use (or
/// it died during the hand-off), so the caller starts cold.
pub fn restore_through_pool(
    args: &RestoreArgs,
    process_start: Instant,
) -> Result<Result<i32, Option<Box<SnapshotState>>>> {
    // Signals are taken before the hand-off, so none is lost while the VM starts.
    let signals = vmm::vm::termination_signalfd()?;
    let mut vm = match claim_and_start(args, process_start, [0, 1, 2], None)? {
        Claim::Started(vm) => vm,
        Claim::Cold(state) => return Ok(Err(state)),
    };
    if args.timing {
        eprintln!(
            "kata-snap: restore path: pool{} (pre-started VMM pid {})",
            if vm.preloaded {
                ", template pre-loaded"
            } else {
                ""
            },
            vm.pid
        );
        eprintln!(
            "kata-snap: process start -> pool hand-off: {:.2} ms",
            vm.handed_off_after.as_secs_f64() * 1e3
        );
    }
    loop {
        // Wait for the exit status or a signal to forward.
        let mut fds = [
            PollFd::new(vm.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue; // EINTR
        }
        let (exit_ready, signal_ready) = (
            fds[0].revents().is_some_and(|r| !r.is_empty()),
            fds[1].revents().is_some_and(|r| !r.is_empty()),
        );
        if signal_ready && let Ok(Some(sig)) = signals.read_signal() {
            vm.stop_by_signal(sig.ssi_signo as i32);
        }
        if exit_ready {
            return vm.read_exit().map(Ok);
        }
    }
}
