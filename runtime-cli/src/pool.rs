//! `kata-snap pool`: pre-started VMM processes that take VM creation off the restore path.
//!
//! A pool is a directory and a manager process. The manager keeps `--size` *shell* processes
//! ready: each has built a [`VmShell`] (KVM VM, irqchip, PIT, vCPU fds, io_uring loop, signal
//! handling) with its guest memory's host addresses reserved and KVM memslots registered for one
//! size class (`--mem-mib`), then listens on a Unix socket `ready/v<V>-m<M>-<pid>.sock`.
//!
//! A restore claims a shell by renaming its socket into `claimed/` (rename is atomic: two clients
//! never get one shell), connects, checks that the shell runs as the caller or root
//! (`SO_PEERCRED`), and hands over its request with its stdin, stdout and stderr
//! (`SCM_RIGHTS`). The shell restores the snapshot into itself (a snapshot of another memory size
//! re-slots: its memslots are deleted and made again), answers `started`, runs the VM with the
//! client's stdio, and sends the exit status, which the client exits with; termination signals
//! the client gets are forwarded. If the shell dies before `started` the client falls back to a
//! cold start; the manager refills the pool in the background.
//!
//! ```text
//! kata-snap pool start --size 4 --vcpus 1 --mem-mib 256
//! kata-snap restore --snapshot DIR --timing     # "restore path: pool ..."
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
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use std::os::fd::AsFd;
use vmm::seccomp::SeccompMode;
use vmm::vm::{ShellConfig, VmShell};

use crate::boot_cmd::finish;
use crate::restore_cmd::{RestoreArgs, start_restore};

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
    Shell(PoolConfig),
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
}

/// What a client sends a shell.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    args: RestoreArgs,
    /// The client's process start, CLOCK_MONOTONIC nanoseconds.
    client_start_ns: u64,
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
        return Ok(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("KATA_SNAP_POOL_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
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

pub fn run(args: PoolArgs, seccomp: SeccompMode) -> Result<i32> {
    match args.action {
        PoolAction::Start(c) => start(c),
        PoolAction::Status(d) => status(&pool_dir(d.dir.as_deref())?),
        PoolAction::Stop(d) => stop(&pool_dir(d.dir.as_deref())?),
        PoolAction::Run(c) => manage(c, seccomp),
        PoolAction::Shell(c) => shell(c, seccomp),
    }
}

fn start(c: PoolConfig) -> Result<i32> {
    let dir = pool_dir(c.dir.dir.as_deref())?;
    crate::oci::assets::private_dir(&dir, true, WHAT)?;
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
    let log = create_private(&dir.join("manager.log"))?;
    let exe = std::env::current_exe().context("cannot find the kata-snap binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["pool", "run", "--dir"])
        .arg(&dir)
        .args(["--size", &c.size.to_string()])
        .args(["--vcpus", &c.vcpus.to_string()])
        .args(["--mem-mib", &c.mem_mib.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // Its own process group: a terminal's Ctrl-C for the caller does not reach the pool.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("cannot start the pool manager")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready_sockets(&dir).len() < c.size as usize {
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

struct Member {
    child: Child,
    ready: Option<PathBuf>,
}

/// The manager: keeps `size` unclaimed shells alive until SIGTERM.
fn manage(c: PoolConfig, seccomp: SeccompMode) -> Result<i32> {
    let dir = pool_dir(c.dir.dir.as_deref())?;
    let signals = vmm::vm::termination_signalfd()?;
    let pid = std::process::id() as i32;
    let pid_start = crate::oci::state::process_start_time(pid).unwrap_or(0);
    crate::oci::write_file_synced(&dir.join("manager.pid"), pid.to_string().as_bytes())?;
    crate::oci::write_file_synced(
        &dir.join("manager.json"),
        serde_json::json!({
            "size": c.size, "vcpus": c.vcpus, "mem_mib": c.mem_mib,
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
    // Claimed shells run their client's VM; reaped when they end.
    let mut busy: Vec<Child> = Vec::new();
    let mut spawned = 0u64;
    loop {
        if let Ok(Some(sig)) = signals.read_signal() {
            tracing::info!("pool manager: signal {}, stopping", sig.ssi_signo);
            break;
        }
        // Forget shells that exited; a shell whose socket was claimed now runs a VM for its
        // client and no longer counts.
        busy.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        let mut kept = Vec::with_capacity(members.len());
        for mut m in members.drain(..) {
            if matches!(m.child.try_wait(), Ok(Some(_))) {
                continue;
            }
            match &m.ready {
                Some(p) if !p.exists() => busy.push(m.child),
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
        while members.len() < c.size as usize {
            let child = Command::new(&exe)
                .args(["--seccomp", seccomp_arg, "pool", "shell", "--dir"])
                .arg(&dir)
                .args(["--vcpus", &c.vcpus.to_string()])
                .args(["--mem-mib", &c.mem_mib.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()?;
            spawned += 1;
            members.push(Member { child, ready: None });
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

/// One pre-started VMM: builds its shell, waits to be claimed, restores its client's snapshot.
fn shell(c: PoolConfig, seccomp: SeccompMode) -> Result<i32> {
    let dir = pool_dir(c.dir.dir.as_deref())?;
    let vm_shell = VmShell::new(ShellConfig {
        vcpus: c.vcpus,
        api_sock: None,
        process_start: Instant::now(),
        seccomp,
        memory_class: Some(c.mem_mib),
        stop_on_signals: true,
    })?;
    let pid = std::process::id();
    let name = format!("v{}-m{}-{pid}.sock", c.vcpus, c.mem_mib);
    let starting = dir.join(format!(".starting-{pid}.sock"));
    let listener = UnixListener::bind(&starting)?;
    {
        // Only the owner may connect; set before the socket appears in ready/.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&starting, std::fs::Permissions::from_mode(0o600))?;
    }
    let ready = dir.join("ready").join(&name);
    std::fs::rename(&starting, &ready)?;
    let claimed = dir.join("claimed").join(&name);
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
            return Ok(0);
        }
        if !ready.exists() {
            let at = *claimed_at.get_or_insert_with(Instant::now);
            if !claimed.exists() || at.elapsed() > CLAIM_TIMEOUT {
                // Claimed by a client that went away, or the pool was stopped.
                let _ = std::fs::remove_file(&claimed);
                return Ok(0);
            }
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(&claimed);
    serve(vm_shell, stream)
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

/// Receives the request and the client's stdio, restores, runs, reports.
fn serve(vm_shell: VmShell, mut stream: UnixStream) -> Result<i32> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    let (n, fds) = {
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
        (msg.bytes, fds)
    };
    fault("die-after-request");
    let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or_default();
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            send_reply(
                &mut stream,
                &Reply::Error {
                    message: format!("bad pool request: {e}"),
                },
            )?;
            return Ok(1);
        }
    };
    if fds.len() != 3 {
        send_reply(
            &mut stream,
            &Reply::Error {
                message: "the pool request must carry stdin, stdout and stderr".into(),
            },
        )?;
        return Ok(1);
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
    let vm = match start_restore(&req.args, Some(vm_shell), start, SeccompMode::Off, true) {
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

/// Claims a ready shell of the snapshot's shape: exact size class first, else one that re-slots.
fn claim(dir: &Path, vcpus: u8, mem_mib: u64) -> Option<(PathBuf, UnixStream)> {
    let exact = format!("v{vcpus}-m{mem_mib}-");
    let any = format!("v{vcpus}-m");
    let mut candidates = ready_sockets(dir);
    candidates.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&exact))
    });
    for ready in candidates {
        let Some(name) = ready.file_name().map(|n| n.to_os_string()) else {
            continue;
        };
        if !name.to_string_lossy().starts_with(&any) {
            continue;
        }
        let claimed = dir.join("claimed").join(&name);
        if std::fs::rename(&ready, &claimed).is_err() {
            continue; // another client was first
        }
        match UnixStream::connect(&claimed) {
            // The shell gets the caller's stdio: it must run as the caller (or root).
            Ok(s) => match peer_uid(&s) {
                Ok(uid) if trusted_peer(uid) => return Some((claimed, s)),
                Ok(uid) => {
                    tracing::warn!(
                        "refusing pool shell {}: it runs as uid {uid}, not as you or root",
                        claimed.display()
                    );
                    let _ = std::fs::remove_file(&claimed);
                }
                Err(e) => {
                    tracing::warn!("refusing pool shell {}: {e:#}", claimed.display());
                    let _ = std::fs::remove_file(&claimed);
                }
            },
            Err(e) => {
                tracing::warn!(
                    "pool shell {} is gone ({e}); trying another",
                    claimed.display()
                );
                let _ = std::fs::remove_file(&claimed);
            }
        }
    }
    None
}

/// A VM running in a pre-started VMM of the pool, for a client that holds it.
#[derive(Debug)]
pub struct PooledVm {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// The pre-started VMM's pid.
    pub pid: u32,
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

/// Claims a pre-started VMM of the snapshot's shape when a pool runs, hands it `args` with
/// `stdio` (stdin, stdout, stderr of its VM) and waits until its VM runs. `None` when there is
/// none to use, or it died during the hand-off: the caller starts cold.
pub fn claim_and_start(
    args: &RestoreArgs,
    process_start: Instant,
    stdio: [RawFd; 3],
) -> Result<Option<PooledVm>> {
    // No pool directory can be named: no pool can have been started by this user.
    let Ok(dir) = pool_dir(args.pool_dir.as_deref()) else {
        return Ok(None);
    };
    // A missing directory holds no pool; one that is not private is refused.
    if !crate::oci::assets::private_dir(&dir, false, WHAT)? || !dir.join("ready").is_dir() {
        return Ok(None);
    }
    crate::oci::assets::private_dir(&dir.join("ready"), false, WHAT)?;
    crate::oci::assets::private_dir(&dir.join("claimed"), false, WHAT)?;
    let Ok((vcpus, mem_mib)) = vmm::vm::snapshot_shape(&args.snapshot) else {
        return Ok(None); // the cold path reports what is wrong with the snapshot
    };
    let Some((claimed, stream)) = claim(&dir, vcpus, mem_mib) else {
        return Ok(None);
    };
    let started_ago = process_start.elapsed();
    let req = Request {
        args: args.clone(),
        client_start_ns: monotonic_ns().saturating_sub(started_ago.as_nanos() as u64),
    };
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    let iov = [std::io::IoSlice::new(&line)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&stdio)],
        MsgFlags::empty(),
        None,
    );
    if let Err(e) = sent {
        tracing::warn!(
            "pool hand-off to {} failed ({e}); starting cold",
            claimed.display()
        );
        return Ok(None);
    }
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut text = String::new();
    if reader.read_line(&mut text)? == 0 {
        tracing::warn!("the pre-started VMM ended during the hand-off: starting cold");
        return Ok(None);
    }
    match serde_json::from_str::<Reply>(text.trim_end()) {
        Ok(Reply::Started { pid }) => Ok(Some(PooledVm {
            stream,
            reader,
            pid,
        })),
        Ok(Reply::Error { message }) => bail!("{message}"),
        Ok(Reply::Exit { .. }) => bail!("the pre-started VMM exited before it started"),
        Err(e) => bail!("bad answer from the pre-started VMM: {e}"),
    }
}

/// Restores through a pre-started VMM when a pool runs; `None` when there is none to use (or
/// it died during the hand-off), so the caller starts cold.
pub fn restore_through_pool(args: &RestoreArgs, process_start: Instant) -> Result<Option<i32>> {
    // Signals are taken before the hand-off, so none is lost while the VM starts.
    let signals = vmm::vm::termination_signalfd()?;
    let Some(mut vm) = claim_and_start(args, process_start, [0, 1, 2])? else {
        return Ok(None);
    };
    if args.timing {
        eprintln!(
            "kata-snap: restore path: pool (pre-started VMM pid {})",
            vm.pid
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
            return vm.read_exit().map(Some);
        }
    }
}
