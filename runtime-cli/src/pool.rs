//! `kata-snap pool`: pre-started VMM processes that take VM creation off the restore path.
//!
//! A pool is a directory and a manager process. The manager keeps `--size` *shell* processes
//! ready: each has built a [`VmShell`] (KVM VM, irqchip, PIT, vCPU fds, io_uring loop, signal
//! handling) with its guest memory's host addresses reserved and KVM memslots registered for one
//! size class (`--mem-mib`), then listens on a Unix socket `ready/v<V>-m<M>-<pid>.sock`.
//!
//! A restore claims a shell by renaming its socket into `claimed/` (rename is atomic: two clients
//! never get one shell), connects, checks that the shell runs as the caller or root, or as the
//! jail uid the allocator gives that shell (`SO_PEERCRED`), and hands over its request with its
//! stdin, stdout and stderr and a descriptor for every path of the request ([`handoff`]:
//! `SCM_RIGHTS`). As root the shells run jailed ([`shell`]), and a container's supervisor
//! adopts the uid of the shell it claimed. The shell restores the snapshot into itself (a snapshot of another memory size
//! re-slots: its memslots are deleted and made again), answers `started`, runs the VM with the
//! client's stdio, and sends the exit status, which the client exits with; termination signals
//! the client gets are forwarded. If the shell dies before `started` the client falls back to a
//! cold start; the manager refills the pool in the background.
//!
//! Beside them the manager keeps `--preload-size` shells that have *pre-loaded* the pool's
//! template ([`preload`]): its guest state is in them before any client comes, so a restore of
//! that template only attaches the clone's host resources and starts the vCPUs. A client tries
//! those first (by the template's key in the socket name), then a plain shell, then starts cold.
//!
//! ```text
//! kata-snap pool start --size 4 --vcpus 1 --mem-mib 256 [--template DIR --template-mode MODE]
//! kata-snap restore --snapshot DIR --timing     # "restore path: pool[, template pre-loaded] ..."
//! kata-snap pool status
//! kata-snap pool stop
//! ```
//!
//! The directory must be private to the caller (owned by them, writable by no one else: see
//! [`crate::oci::assets::private_dir`]), or every command refuses it: sockets planted there by
//! another user would receive the caller's stdio. Its sockets are mode 0600, its subdirectories
//! 0700.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use serde::{Deserialize, Serialize};
use vmm::seccomp::SeccompMode;

use crate::boot_cmd::finish;
use crate::restore_cmd::{ModeArg, RestoreArgs, attach_restore, start_restore};

mod claim;
mod client;
mod handoff;
mod manager;
mod preload;
mod shell;
pub use client::{Adopter, Claim, PooledVm, claim_and_start, restore_through_pool};
pub use handoff::Handed;
use manager::manage;
use preload::Wanted;
use shell::{ShellVm, shell};

/// What a jailed pool is: its shells' uids are allocated in `root` (a state root) from
/// `settings`' range.
#[derive(Debug, Clone)]
struct PoolJail {
    root: PathBuf,
    settings: crate::oci::jail::Settings,
}

/// The jail of a pool started by this process: as root unless the config says `"jail": false`,
/// its uids in `root` (the `--root` state root, else the default).
fn pool_jail(root: Option<&Path>) -> Result<Option<PoolJail>> {
    let is_root = nix::unistd::geteuid().is_root();
    let cfg = crate::oci::assets::RuntimeConfig::load()?;
    let settings = crate::oci::jail::Settings::from_config(&cfg, is_root)?;
    if !settings.enabled {
        return Ok(None);
    }
    let root = match root {
        Some(r) => std::path::absolute(r)?,
        None => crate::oci::assets::default_root()?,
    };
    Ok(Some(PoolJail { root, settings }))
}

/// Longest request line a shell accepts.
const MAX_REQUEST: usize = 64 << 10;
/// How long a claimed shell waits for its client to connect.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct PoolArgs {
    #[command(subcommand)]
    action: PoolAction,
}

#[derive(Debug, Subcommand)]
enum PoolAction {
    /// Start a pool in the background: a manager keeping SIZE pre-started VMMs ready.
    Start(PoolConfig),
    /// Print the pool's state as JSON: manager pid, size class, ready shells.
    Status(DirArg),
    /// Stop the pool: the manager and its unclaimed shells (VMs already running stay).
    Stop(DirArg),
    /// The manager itself, in the foreground (what `start` runs).
    #[command(hide = true)]
    Run(PoolConfig),
    /// One pre-started VMM (what the manager runs).
    #[command(hide = true)]
    Shell(ShellArgs),
}

#[derive(Debug, Clone, Args)]
struct DirArg {
    /// The pool directory, private to the caller [default: $KATA_SNAP_POOL_DIR, else
    /// /run/kata-snap/pool as root, else $XDG_RUNTIME_DIR/kata-snap/pool].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct PoolConfig {
    #[command(flatten)]
    dir: DirArg,
    /// Pre-started VMMs kept ready.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    size: u32,
    /// vCPUs of each VMM (restores of snapshots with another count start cold).
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory size class in MiB: memslots are registered ahead for guests of this size
    /// (other sizes re-slot at restore).
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Pre-loaded VMMs kept ready for the pool's template [default: --size]: each has loaded
    /// the template's guest state, so a restore of it only attaches the clone's console, disks
    /// and sockets. The template is --template, else the last one restored through the pool
    /// that found none pre-loaded.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=64))]
    preload_size: Option<u32>,
    /// The template (snapshot directory) to pre-load from the start.
    #[arg(long, value_name = "DIR")]
    template: Option<PathBuf>,
    /// The memory mode of --template's restores.
    #[arg(
        long,
        value_enum,
        default_value = "mmap-prefetch",
        requires = "template"
    )]
    template_mode: ModeArg,
}

impl PoolConfig {
    fn preload_size(&self) -> u32 {
        self.preload_size.unwrap_or(self.size)
    }
}

/// What the manager tells a shell.
#[derive(Debug, Clone, Args)]
struct ShellArgs {
    #[command(flatten)]
    pool: PoolConfig,
    /// Pre-load this template (its snapshot directory) ...
    #[arg(long, value_name = "DIR", requires = "key")]
    preload: Option<PathBuf>,
    /// ... in this memory mode ...
    #[arg(long, value_enum, default_value = "mmap-prefetch")]
    preload_mode: ModeArg,
    /// ... with this fault-around ...
    #[arg(long, default_value_t = 16)]
    preload_fault_around: u64,
    /// ... as the manager found it (its key).
    #[arg(long)]
    key: Option<String>,
}

/// What a client sends a shell.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    args: RestoreArgs,
    /// The client's process start, CLOCK_MONOTONIC nanoseconds.
    client_start_ns: u64,
    /// The key of the template the client expects pre-loaded (when it claimed such a shell).
    #[serde(default)]
    template_key: Option<String>,
    /// What each descriptor after stdio is (see [`handoff`]).
    #[serde(default)]
    fds: Vec<handoff::Role>,
}

/// What a shell answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Started { pid: u32 },
    Error { message: String },
    Exit { code: i32 },
}

/// What a client sends after `started`.
#[derive(Debug, Serialize, Deserialize)]
struct Forward {
    signal: i32,
}

/// What a pool directory is called in errors.
const WHAT: &str = "pool directory";

/// The pool directory to use: `explicit`, else `$KATA_SNAP_POOL_DIR`, else
/// `/run/kata-snap/pool` as root, else `$XDG_RUNTIME_DIR/kata-snap/pool`; an error saying what
/// to set without any of them.
pub fn pool_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = explicit {
        return Ok(std::path::absolute(d)?);
    }
    if let Some(d) = std::env::var_os("KATA_SNAP_POOL_DIR").filter(|d| !d.is_empty()) {
        return Ok(std::path::absolute(PathBuf::from(d))?);
    }
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/run/kata-snap/pool"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => Ok(PathBuf::from(d).join("kata-snap/pool")),
        None => bail!(
            "no pool directory: pass --dir DIR or set KATA_SNAP_POOL_DIR or XDG_RUNTIME_DIR \
             (kata-snap keeps no pool in /tmp)"
        ),
    }
}

/// Whether the process `uid` runs as may serve or be served by this one: the same user, or root.
fn trusted_peer(uid: u32) -> bool {
    uid == nix::unistd::geteuid().as_raw() || uid == 0
}

/// The uid of the process at the other end of `stream` (for a listening socket's connection:
/// the process that listened), from `SO_PEERCRED`.
fn peer_uid(stream: &UnixStream) -> Result<u32> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .context("SO_PEERCRED")?;
    Ok(cred.uid())
}

/// Opens `name` in the pool directory for writing, truncated, mode 0600, without following a
/// symbolic link.
fn create_private(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `Instant` of a CLOCK_MONOTONIC timestamp taken by another process (Instant is
/// CLOCK_MONOTONIC on Linux).
fn instant_of(ns: u64) -> Instant {
    let now = Instant::now();
    let ago = monotonic_ns().saturating_sub(ns);
    now.checked_sub(Duration::from_nanos(ago)).unwrap_or(now)
}

/// The manager's pid and start time (`manager.json`, which the manager writes), when that
/// process still runs: a pid reused by another process does not count.
fn manager(dir: &Path) -> Option<(i32, u64)> {
    let text = crate::oci::read_small_file(&dir.join("manager.json"), 64 << 10).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pid = i32::try_from(v.get("pid")?.as_i64()?).ok()?;
    let start = v.get("pid_start")?.as_u64()?;
    crate::oci::state::process_alive(pid, start).then_some((pid, start))
}

/// Whether the pool in `dir` runs and keeps pre-loaded shells.
fn manager_preloads(dir: &Path) -> bool {
    let preloads = || -> Option<bool> {
        let text = crate::oci::read_small_file(&dir.join("manager.json"), 64 << 10).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(v.get("preload_size")?.as_u64()? > 0)
    };
    preloads().unwrap_or(false) && manager(dir).is_some()
}

fn manager_pid(dir: &Path) -> Option<i32> {
    manager(dir).map(|(pid, _)| pid)
}

fn ready_sockets(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("ready"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// `root`: the global `--root` (the state root where a jailed pool's uids are allocated).
pub fn run(args: PoolArgs, seccomp: SeccompMode, root: Option<PathBuf>) -> Result<i32> {
    match args.action {
        PoolAction::Start(c) => start(c, root.as_deref()),
        PoolAction::Status(d) => status(&pool_dir(d.dir.as_deref())?),
        PoolAction::Stop(d) => stop(&pool_dir(d.dir.as_deref())?),
        PoolAction::Run(c) => manage(c, seccomp, pool_jail(root.as_deref())?),
        PoolAction::Shell(c) => shell(c, seccomp, pool_jail(root.as_deref())?),
    }
}

fn start(c: PoolConfig, root: Option<&Path>) -> Result<i32> {
    let dir = pool_dir(c.dir.dir.as_deref())?;
    crate::oci::assets::private_dir(&dir, true, WHAT)?;
    // A jailed pool's shells take their uids from the state root's allocator.
    let jail = pool_jail(root)?;
    if let Some(j) = &jail {
        crate::oci::assets::private_dir(&j.root, true, "state root")?;
    }
    if let Some(pid) = manager_pid(&dir) {
        bail!(
            "a pool is already running in {} (manager pid {pid}): `kata-snap pool stop` first",
            dir.display()
        );
    }
    // Only the pool's owner may hand its VMMs requests (they run with its privileges).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", dir.display()))?;
    }
    for sub in ["ready", "claimed"] {
        crate::oci::assets::private_dir(&dir.join(sub), true, WHAT)?;
    }
    // Sockets left by a pool that was killed lead nowhere.
    for sub in ["ready", "claimed"] {
        for e in std::fs::read_dir(dir.join(sub))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Some(t) = &c.template {
        let w = Wanted {
            snapshot: std::path::absolute(t)?,
            mode: c.template_mode,
            fault_around: 16,
        };
        if w.key().is_none() {
            bail!(
                "{} is not a template that can be pre-loaded in {:?} mode (state, memory{} needed)",
                t.display(),
                c.template_mode,
                if matches!(
                    c.template_mode,
                    ModeArg::MmapPrefetch | ModeArg::UffdPrefetch
                ) {
                    " and workingset"
                } else {
                    ""
                }
            );
        }
        preload::want(&dir, &w)?;
    } else {
        let _ = std::fs::remove_file(dir.join("preload.json"));
    }
    let log = create_private(&dir.join("manager.log"))?;
    let exe = std::env::current_exe().context("cannot find the kata-snap binary")?;
    let mut cmd = Command::new(exe);
    if let Some(j) = &jail {
        cmd.arg("--root").arg(&j.root);
    }
    cmd.args(["pool", "run", "--dir"])
        .arg(&dir)
        .args(["--size", &c.size.to_string()])
        .args(["--vcpus", &c.vcpus.to_string()])
        .args(["--mem-mib", &c.mem_mib.to_string()])
        .args(["--preload-size", &c.preload_size().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // Its own process group: a terminal's Ctrl-C for the caller does not reach the pool.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("cannot start the pool manager")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Pre-loaded shells of a --template are ready too before this returns.
    let want_ready = c.size as usize
        + if c.template.is_some() {
            c.preload_size() as usize
        } else {
            0
        };
    while ready_sockets(&dir).len() < want_ready {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the pool manager exited ({status}); see {}",
                dir.join("manager.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the pool did not get ready in 20 s; see {}",
                dir.join("manager.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "pool started in {}: manager pid {}, {} pre-started VMMs ({} vCPU, {} MiB class)",
        dir.display(),
        child.id(),
        c.size,
        c.vcpus,
        c.mem_mib
    );
    Ok(0)
}

fn status(dir: &Path) -> Result<i32> {
    crate::oci::assets::private_dir(dir, false, WHAT)?;
    let ready = ready_sockets(dir);
    let config = std::fs::read_to_string(dir.join("manager.json")).ok();
    let status = serde_json::json!({
        "dir": dir,
        "manager_pid": manager_pid(dir),
        "config": config.and_then(|c| serde_json::from_str::<serde_json::Value>(&c).ok()),
        "ready": ready.len(),
        "ready_sockets": ready,
        "template": preload::wanted(dir),
    });
    println!("{status}");
    Ok(if manager_pid(dir).is_some() { 0 } else { 1 })
}

fn stop(dir: &Path) -> Result<i32> {
    crate::oci::assets::private_dir(dir, false, WHAT)?;
    // The manager's pid and start time: a pid since reused by another process is not signalled.
    let Some((pid, start)) = manager(dir) else {
        bail!("no pool is running in {}", dir.display());
    };
    if !crate::oci::state::signal_process(pid, start, libc::SIGTERM)? {
        bail!("no pool is running in {}", dir.display());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while manager_pid(dir).is_some() {
        if Instant::now() > deadline {
            bail!("the pool manager (pid {pid}) did not stop in 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("pool stopped");
    Ok(0)
}

/// Test hook: `KATA_SNAP_POOL_FAULT=die-after-request` makes a shell die right after it received
/// its client's request, as a crash mid-hand-off would. Debug builds only: a release binary
/// reads no such variable.
#[cfg(debug_assertions)]
fn fault(point: &str) {
    if std::env::var("KATA_SNAP_POOL_FAULT").is_ok_and(|v| v == point) {
        // SAFETY: ending the process at once, as a crash would.
        unsafe { libc::_exit(9) };
    }
}

#[cfg(not(debug_assertions))]
fn fault(_point: &str) {}

fn send_reply(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Receives the request with the client's stdio and descriptors, restores, runs, reports.
fn serve(vm: ShellVm, mut stream: UnixStream) -> Result<i32> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut cmsg = nix::cmsg_space!([RawFd; handoff::MAX_FDS]);
    let (n, fds, truncated) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in this process for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC))
    };
    fault("die-after-request");
    let refuse = |stream: &mut UnixStream, message: String| -> Result<i32> {
        send_reply(stream, &Reply::Error { message })?;
        Ok(1)
    };
    if truncated {
        // The kernel closed what did not fit; what did is closed here (dropped).
        return refuse(
            &mut stream,
            format!(
                "the pool request carries more than {} descriptors",
                handoff::MAX_FDS
            ),
        );
    }
    let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or_default();
    let mut req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return refuse(&mut stream, format!("bad pool request: {e}")),
    };
    if fds.len() < 3 {
        return refuse(
            &mut stream,
            "the pool request must carry stdin, stdout and stderr".into(),
        );
    }
    let mut fds = fds;
    let rest = fds.split_off(3);
    let plain = matches!(vm, ShellVm::Plain(_));
    if let Err(e) = handoff::receive(&mut req.args, rest, &req.fds, plain) {
        return refuse(&mut stream, crate::error_line(&e));
    }
    // From here on the VM's console, stdin and logs are the client's.
    for (target, fd) in fds.iter().enumerate() {
        // SAFETY: dup2 onto fds 0-2 of this process, which only the VM uses from now on.
        if unsafe { libc::dup2(fd.as_raw_fd(), target as i32) } < 0 {
            bail!("dup2: {}", std::io::Error::last_os_error());
        }
    }
    drop(fds);
    let start = instant_of(req.client_start_ns);
    let timing = req.args.timing;
    let started = match vm {
        ShellVm::Plain(vm_shell) => start_restore(
            &req.args,
            Some(vm_shell),
            None,
            start,
            SeccompMode::Off,
            true,
        ),
        // The client chose this shell by the key of its template as it found it: the guest
        // loaded here is what it asked for.
        ShellVm::Preloaded(vm, key) if req.template_key.as_ref() == Some(&key) => {
            attach_restore(&req.args, vm, start)
        }
        ShellVm::Preloaded(_, key) => Err(anyhow::anyhow!(
            "this pool shell pre-loaded template {key}, not the one asked for"
        )),
    };
    let vm = match started {
        Ok(vm) => vm,
        Err(e) => {
            send_reply(
                &mut stream,
                &Reply::Error {
                    message: crate::error_line(&e),
                },
            )?;
            return Ok(1);
        }
    };
    send_reply(
        &mut stream,
        &Reply::Started {
            pid: std::process::id(),
        },
    )?;
    // The client forwards its termination signals. A client that goes away (killed, even with
    // SIGKILL) closes the connection: its VM must not outlive it.
    let reader = stream.try_clone()?;
    let stopper = vm.stop_handle();
    let filters = vm.seccomp().clone();
    std::thread::Builder::new()
        .name("pool-client".into())
        .spawn(move || {
            if let Err(e) = filters.apply(vmm::seccomp::ThreadKind::PoolClient) {
                tracing::error!("pool-client: {e}");
                stopper.stop_by_signal(libc::SIGKILL);
                return;
            }
            let reader = BufReader::new(reader.take(1 << 20));
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Ok(f) = serde_json::from_str::<Forward>(&line) {
                    stopper.stop_by_signal(f.signal);
                }
            }
            stopper.stop_by_signal(libc::SIGKILL);
        })?;
    vm.restrict_caller()?;
    let report = vm.wait()?;
    let code = finish(&report, timing);
    let _ = send_reply(&mut stream, &Reply::Exit { code });
    Ok(code)
}
