//! The jail of a container's supervisor (the process that holds the container's VM), set up at
//! its start while it is still single-threaded, after the host cgroup placement and after
//! opening what needs privilege (`/dev/kvm`, `/dev/userfaultfd`):
//!
//! 1. a uid (and gid) of its own, allocated from the config's range (`jailUidBase`,
//!    `jailUidCount`) with an `O_EXCL` file per uid in `STATE_ROOT/jail@uids/` (under an
//!    exclusive `flock` of the state root), given back by `delete`; the container's directory is
//!    chowned to it (0700), so the supervisor still writes its record, sockets and console log;
//! 2. a mount namespace of its own (mounts made private), whose root is a small read-only tmpfs
//!    holding only bind mounts of what the VM needs: the container's directory (read-write), the
//!    template's directory and the rootfs image (read-only), `/dev/null` and `/dev/urandom`;
//!    `pivot_root` into it and the old root detached (on an initramfs root, which cannot be
//!    pivoted, the tmpfs is moved over `/` and chrooted into, as runc's `--no-pivot`);
//! 3. `setgroups([])`, `setresgid`, `setresuid`; every capability gone (bounding set, ambient,
//!    effective, permitted, inheritable), `PR_SET_NO_NEW_PRIVS`, not dumpable; `RLIMIT_NOFILE`
//!    and `RLIMIT_NPROC` bounded (core dumps are off for every kata-snap process already).
//!
//! Descriptors the process inherited were closed at its start ([`close_inherited_fds`]). No PID
//! namespace: the engine must see the supervisor's pid as the container's and signal it.
//! See docs/runtime.md, "Security model", for the comparison with Firecracker's jailer.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::{Deserialize, Serialize};

use super::assets::RuntimeConfig;

mod uids;
pub use uids::{PoolShell, held_by_pool_shell, release, release_pool_shell};

/// The first uid (and gid) of the jail's range when the config sets none: far above the
/// ranges of ordinary users and of `/etc/subuid`'s usual allocations (100000 + 65536 n).
pub const DEFAULT_UID_BASE: u32 = 1_879_048_192;
/// How many uids the range holds when the config sets none.
pub const DEFAULT_UID_COUNT: u32 = 65_536;
/// The directory of the uid files in the state root (`@` is not allowed in a container id, so
/// it can never be a container's directory).
pub const UIDS_DIR: &str = "jail@uids";
/// Where the container's directory is in the jail.
pub const DIR: &str = "/container";
/// Where the template's directory is in the jail.
pub const TEMPLATE: &str = "/template";
/// Where the rootfs image is in the jail.
pub const IMAGE: &str = "/rootfs.img";
/// The working set a jailed supervisor records (in the container's directory); `delete`
/// installs it into the template, which the jail cannot write.
pub const RECORDING: &str = "workingset.rec";
/// Most descriptors a jailed supervisor may hold (its VM's devices, sockets, eventfds, up to 64
/// vsock connections, io_uring).
const MAX_FILES: u64 = 4096;
/// Most processes (threads) of the jail's uid: the supervisor's threads (vCPUs, the VMM loop,
/// page server, prefetch, watchers) and io_uring's workers.
const MAX_THREADS: u64 = 512;
/// The jail's settings, from the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Jail supervisors (as root, unless `"jail": false`).
    pub enabled: bool,
    /// First uid of the range.
    pub uid_base: u32,
    /// Uids in the range.
    pub uid_count: u32,
}

impl Settings {
    /// The settings of `cfg` for a caller that `is_root`.
    pub fn from_config(cfg: &RuntimeConfig, is_root: bool) -> Result<Self> {
        let uid_base = cfg.jail_uid_base.unwrap_or(DEFAULT_UID_BASE);
        let uid_count = cfg.jail_uid_count.unwrap_or(DEFAULT_UID_COUNT);
        if uid_base == 0
            || uid_count == 0
            || uid_base
                .checked_add(uid_count)
                .is_none_or(|end| end >= u32::MAX - 1)
        {
            bail!(
                "config file: jailUidBase {uid_base} and jailUidCount {uid_count} must name a \
                 non-empty range of uids above 0 and below 4294967294"
            );
        }
        Ok(Self {
            enabled: cfg.jail.unwrap_or(true) && is_root,
            uid_base,
            uid_count,
        })
    }
}

/// Set once this process is jailed.
static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is jailed (its paths are the jail's).
pub fn active() -> bool {
    ACTIVE.load(std::sync::atomic::Ordering::Relaxed)
}

/// The paths a jailed supervisor uses instead of the host's.
#[derive(Debug, Clone)]
pub struct Jailed {
    /// The container's uid and gid.
    pub uid: u32,
}

/// What goes into a container's jail.
#[derive(Debug)]
pub struct Plan<'a> {
    /// The state root.
    pub state_root: &'a Path,
    /// The container's id.
    pub id: &'a str,
    /// The container's directory.
    pub dir: &'a Path,
    /// The template's directory.
    pub template: &'a Path,
    /// The rootfs image.
    pub image: &'a Path,
    /// The settings.
    pub settings: Settings,
    /// The host paths the container binds, shared with its guest: share `i` is bound at
    /// `SHARED/i` in the jail, which then also has `/proc` (the fs server reopens files
    /// through `/proc/self/fd`) and keeps the file capabilities ([`FILE_CAPS`]).
    pub shares: &'a [oci_bundle::HostShare],
}

/// Where a container's shares are in its jail: the root of its virtio-fs slot.
pub const SHARED: &str = "/shared";

/// The capabilities a jail with shares keeps (effective), for its fs server to act on the
/// shared files as the guest asks, whoever owns them: CAP_CHOWN, CAP_DAC_OVERRIDE,
/// CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID. They reach only what is in the jail's mount
/// namespace: its own files, the template and image (read-only mounts), and the shares.
pub const FILE_CAPS: u32 = 0b1_1111;

/// Closes every descriptor from 3 up except `keep`: what the process inherited and does not use
/// (called first thing, before anything of this process owns a descriptor).
pub fn close_inherited_fds(keep: &[i32]) {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for fd in keep.into_iter().chain([u32::MAX]) {
        if fd > from {
            // SAFETY: close_range(2) takes plain integers; nothing of this process owns a
            // descriptor in the range yet (see above).
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        from = fd.saturating_add(1);
    }
}

/// `run` in the foreground, jailed: the jailed process cannot remove the container's state when
/// it is done, so this process stays outside as runc's `run` does with its container's init. It
/// forks; the child runs `supervise` (and jails itself); this process forwards the signals it
/// gets to the child, waits for it, runs `cleanup` and returns the child's exit status (128+N
/// when a signal N killed it). `pid` is told the child's pid first (the pid file). Call it while
/// the process is single-threaded.
pub fn supervise_in_child(
    supervise: impl FnOnce() -> i32,
    pid: impl FnOnce(i32) -> Result<()>,
    cleanup: impl FnOnce(),
) -> Result<i32> {
    use nix::sys::signal::Signal;
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    // Blocked before the fork: nothing sent in between is lost (the child's supervisor reads the
    // same signals from its own signalfd).
    let mut set = super::supervisor::forwarded_signals();
    set.add(Signal::SIGCHLD);
    set.thread_block().context("cannot block signals")?;
    let parent = nix::unistd::getpid();
    // SAFETY: the process is single-threaded here (the jail needs it too).
    let child = match unsafe { nix::unistd::fork() }.context("cannot fork the supervisor")? {
        nix::unistd::ForkResult::Child => {
            // The supervisor dies with this process: a `run` killed outright (SIGKILL) takes
            // its container down, as it did before the fork. Re-armed after the jail's change
            // of uid, which clears it.
            DIE_WITH_PARENT.store(parent.as_raw(), std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = die_with_parent() {
                tracing::warn!("{e:#}");
                // SAFETY: _exit in the child, as below.
                unsafe { libc::_exit(255) }
            }
            let code = supervise();
            // SAFETY: _exit in the child: what the parent's objects would clean up is the
            // parent's to do.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    if let Err(e) = pid(child.as_raw()) {
        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
        tracing::warn!("{e:#}");
    }
    let sfd =
        SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC).context("cannot create a signalfd")?;
    let code = loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, c)) => break c,
            Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("waiting for the supervisor: {e}"),
        }
        match sfd.read_signal() {
            Ok(Some(info)) if info.ssi_signo as i32 != libc::SIGCHLD => {
                if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                    let _ = nix::sys::signal::kill(child, sig);
                }
            }
            _ => {}
        }
    };
    cleanup();
    Ok(code)
}

/// The pid of the unjailed parent of a foreground `run`'s supervisor (0: none), whose death
/// must kill the supervisor.
static DIE_WITH_PARENT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Arms `PR_SET_PDEATHSIG` with SIGKILL (cleared by a change of uid: armed again after it)
/// and fails if the parent is already gone.
fn die_with_parent() -> Result<()> {
    let parent = DIE_WITH_PARENT.load(std::sync::atomic::Ordering::SeqCst);
    prctl(
        "PR_SET_PDEATHSIG",
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
    )?;
    if nix::unistd::getppid().as_raw() != parent {
        bail!("the foreground run that started this supervisor is gone");
    }
    Ok(())
}

fn io_err(what: &str) -> impl FnOnce(nix::errno::Errno) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("jail: {what}: {e}")
}

/// An `O_PATH` descriptor of `path` (what a bind mount is made from once the path is hidden).
fn path_fd(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| anyhow::anyhow!("jail: cannot open {}: {e}", path.display()))
}

/// Bind-mounts `from` (an `O_PATH` descriptor) on `to` (in the current directory), then
/// remounts it nosuid, noexec and, with `dev` false, nodev, and read-only unless `rw`.
fn bind(from: &OwnedFd, to: &str, rw: bool, dev: bool, recursive: bool) -> Result<()> {
    let src = format!("/proc/self/fd/{}", from.as_raw_fd());
    let rec = if recursive {
        MsFlags::MS_REC
    } else {
        MsFlags::empty()
    };
    mount(
        Some(src.as_str()),
        to,
        None::<&str>,
        MsFlags::MS_BIND | rec,
        None::<&str>,
    )
    .map_err(io_err(to))?;
    let mut flags =
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    if !rw {
        flags |= MsFlags::MS_RDONLY;
    }
    if !dev {
        flags |= MsFlags::MS_NODEV;
    }
    mount(None::<&str>, to, None::<&str>, flags, None::<&str>).map_err(io_err(to))
}

/// An empty file to bind a file on.
fn mount_point_file(name: &str) -> Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(name)
        .map(drop)
        .with_context(|| format!("jail: cannot create {name}"))
}

/// One bind mount in a jail.
#[derive(Debug)]
pub struct Bind<'a> {
    /// The host's path.
    pub from: &'a Path,
    /// Where it is in the jail (absolute; below [`SHARED`] for a share).
    pub to: String,
    /// A directory (else a file).
    pub dir: bool,
    /// Writable (else read-only).
    pub rw: bool,
    /// With the mounts below it (`rbind`).
    pub recursive: bool,
}

/// A jail: what it holds and where its process starts. Every jail also holds `/dev/null` and
/// `/dev/urandom`.
#[derive(Debug)]
pub struct Confinement<'a> {
    /// A directory of the host the jail's tmpfs root is mounted over (in the jail's mount
    /// namespace only: any directory would do).
    pub root_on: &'a Path,
    /// What is bound in.
    pub binds: Vec<Bind<'a>>,
    /// The cwd in the jail.
    pub cwd: &'static str,
    /// Open `/dev/kvm` and `/dev/userfaultfd` before the jail, for a VM made in it.
    pub devices: bool,
    /// It holds shares ([`SHARED`]): `/proc` is mounted (hidepid) and [`FILE_CAPS`] kept.
    pub shares: bool,
}

/// A mount namespace of this process's own, in which nothing mounted propagates to the host,
/// nor the host's mounts here. Call it while the process is single-threaded.
fn private_mount_namespace() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(io_err("unshare (the process must be single-threaded)"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(io_err("private mounts"))
}

/// An empty directory (`dir`) or file to bind on, at `to`.
fn mount_point(to: &str, dir: bool) -> Result<()> {
    if dir {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(to)
            .with_context(|| format!("jail: cannot create {to}"))
    } else {
        mount_point_file(to)
    }
}

/// The mount namespace: `pivot_root` into a tmpfs that holds only the confinement's binds.
fn enter_mount_namespace(c: &Confinement) -> Result<()> {
    private_mount_namespace()?;
    // Descriptors of what goes in (in this namespace: a bind mount's source must be one of
    // its mounts) before the tmpfs hides what is below `root_on`.
    let sources = c
        .binds
        .iter()
        .map(|b| path_fd(b.from))
        .collect::<Result<Vec<_>>>()?;
    let null = path_fd(Path::new("/dev/null"))?;
    let urandom = path_fd(Path::new("/dev/urandom"))?;
    mount(
        Some("tmpfs"),
        c.root_on,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=64"),
    )
    .map_err(io_err("tmpfs"))?;
    std::env::set_current_dir(c.root_on).context("jail: cannot enter its root")?;
    mount_point("dev", true)?;
    if c.shares {
        for d in [&SHARED[1..], "proc"] {
            mount_point(d, true)?;
        }
    }
    for b in &c.binds {
        mount_point(&b.to[1..], b.dir)?;
    }
    for f in ["dev/null", "dev/urandom"] {
        mount_point_file(f)?;
    }
    for (b, fd) in c.binds.iter().zip(&sources) {
        bind(fd, &b.to[1..], b.rw, false, b.recursive)?;
    }
    if c.shares {
        // Its own processes only (hidepid): the fs server reopens through /proc/self/fd.
        mount(
            Some("proc"),
            "proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("hidepid=2"),
        )
        .map_err(io_err("proc"))?;
    }
    bind(&null, "dev/null", true, true, false)?;
    bind(&urandom, "dev/urandom", false, true, false)?;
    // The old root goes on top of the new one, then is detached.
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH).map_err(io_err("detaching the old root"))?;
        }
        // The root is the initial ramfs (a host booted from an initramfs with no real root,
        // such as this project's L1 rig): it cannot be pivoted away. As runc's --no-pivot
        // does, the jail's tmpfs is moved over `/` and the process chroots into it; the old
        // root stays below, unreachable without CAP_SYS_CHROOT, which goes with the rest.
        Err(nix::errno::Errno::EINVAL) => {
            tracing::debug!("jail: the root cannot be pivoted (initramfs?): move and chroot");
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(io_err("moving the jail over /"))?;
            nix::unistd::chroot(".").map_err(io_err("chroot"))?;
        }
        Err(e) => return Err(io_err("pivot_root")(e)),
    }
    std::env::set_current_dir("/").context("jail: chdir /")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(io_err("read-only root"))?;
    std::env::set_current_dir(c.cwd).with_context(|| format!("jail: cannot enter {}", c.cwd))?;
    Ok(())
}

/// Confines this process as `uid` in the jail `c`: what needs privilege opened first (with
/// `c.devices`), then the mount namespace, then the privileges dropped. The one way into a jail
/// for a container's supervisor and a pool's shells. Call it while the process is
/// single-threaded; the uid is the caller's to allocate and give back.
pub fn confine(c: &Confinement, uid: u32) -> Result<()> {
    if c.devices {
        vmm::vm::KvmSystem::preopen().context("jail: cannot open /dev/kvm")?;
        snapshot::page_server::preopen_uffd_device()
            .context("jail: cannot open /dev/userfaultfd")?;
    }
    enter_mount_namespace(c)?;
    drop_privileges(uid, if c.shares { FILE_CAPS } else { 0 })?;
    ACTIVE.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// `struct __user_cap_header_struct` of <linux/capability.h>.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_V3: u32 = 0x2008_0522;

fn prctl(what: &str, op: libc::c_int, arg: libc::c_ulong) -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            op,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    } != 0
    {
        bail!("jail: {what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The uid, no capabilities but `keep` (a mask of the first 32), no new privileges, not
/// dumpable, bounded rlimits.
fn drop_privileges(uid: u32, keep: u32) -> Result<()> {
    // The bounding set while CAP_SETPCAP is still there; up to the last capability this kernel
    // knows (EINVAL past it).
    for cap in 0..64 {
        if cap < 32 && keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            bail!(
                "jail: cannot drop capability {cap} from the bounding set: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    prctl(
        "clearing the ambient capabilities",
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )?;
    nix::unistd::setgroups(&[]).map_err(io_err("setgroups"))?;
    let gid = nix::unistd::Gid::from_raw(uid);
    nix::unistd::setresgid(gid, gid, gid).map_err(io_err("setresgid"))?;
    if keep != 0 {
        // The permitted set survives the uid change; the effective set is set below.
        prctl("keeping capabilities", libc::PR_SET_KEEPCAPS, 1)?;
    }
    let u = nix::unistd::Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(io_err("setresuid"))?;
    if keep != 0 {
        prctl("keeping capabilities", libc::PR_SET_KEEPCAPS, 0)?;
    }
    if DIE_WITH_PARENT.load(std::sync::atomic::Ordering::SeqCst) != 0 {
        die_with_parent()?;
    }
    // setresuid cleared the effective and ambient sets, and the permitted set unless kept; the
    // inheritable set stays unless cleared.
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    data[0].effective = keep;
    data[0].permitted = keep;
    // SAFETY: capset reads one header and two data structs (version 3) that live across the
    // call.
    if unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    } != 0
    {
        bail!("jail: capset: {}", std::io::Error::last_os_error());
    }
    prctl("no new privileges", libc::PR_SET_NO_NEW_PRIVS, 1)?;
    // After the uid change, which resets it.
    prctl("not dumpable", libc::PR_SET_DUMPABLE, 0)?;
    for (what, res, limit) in [
        ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, MAX_FILES),
        ("RLIMIT_NPROC", libc::RLIMIT_NPROC, MAX_THREADS),
    ] {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit that lives across the call.
        unsafe { libc::getrlimit(res, &mut cur) };
        let lim = libc::rlimit {
            rlim_cur: limit.min(cur.rlim_max),
            rlim_max: limit.min(cur.rlim_max),
        };
        // SAFETY: setrlimit reads one rlimit that lives across the call.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            bail!("jail: {what}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The jail of a container's supervisor: its directory (read-write), and for a VM restored
/// in the supervisor itself the template's directory and the rootfs image (read-only).
fn container_confinement<'a>(plan: &Plan<'a>, vm_here: bool) -> Confinement<'a> {
    let mut binds = vec![Bind {
        from: plan.dir,
        to: DIR.into(),
        dir: true,
        rw: true,
        recursive: false,
    }];
    if vm_here {
        binds.push(Bind {
            from: plan.template,
            to: TEMPLATE.into(),
            dir: true,
            rw: false,
            recursive: false,
        });
        binds.push(Bind {
            from: plan.image,
            to: IMAGE.into(),
            dir: false,
            rw: false,
            recursive: false,
        });
        for (i, s) in plan.shares.iter().enumerate() {
            binds.push(Bind {
                from: &s.source,
                to: format!("{SHARED}/{i}"),
                dir: s.source.is_dir(),
                rw: !s.read_only,
                recursive: s.recursive,
            });
        }
    }
    Confinement {
        root_on: plan.dir,
        binds,
        cwd: DIR,
        devices: vm_here,
        shares: vm_here && !plan.shares.is_empty(),
    }
}

/// Stages a container's shares for a supervisor that is not jailed (the jail is off): in a
/// mount namespace of this process's own, `DIR/shared/i` is a bind of share `i` (read-only
/// unless the share is writable). Returns `DIR/shared`, the root of the virtio-fs slot. Call it
/// while the process is single-threaded.
pub fn stage_shares(dir: &Path, shares: &[oci_bundle::HostShare]) -> Result<PathBuf> {
    private_mount_namespace()?;
    let root = dir.join("shared");
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&root)
        .with_context(|| format!("cannot create {}", root.display()))?;
    for (i, s) in shares.iter().enumerate() {
        let fd = path_fd(&s.source)?;
        let to = root.join(i.to_string());
        let to = to
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", to.display()))?;
        mount_point(to, s.source.is_dir())?;
        bind(&fd, to, !s.read_only, false, s.recursive)?;
    }
    Ok(root)
}

/// Jails this process as `plan` says. Call it while the process is single-threaded (no VMM
/// thread yet). On return the process is in the jail, its cwd the container's directory
/// ([`DIR`]).
pub fn enter(plan: &Plan) -> Result<Jailed> {
    let uid = uids::allocate(
        plan.state_root,
        plan.id,
        plan.template,
        plan.dir,
        plan.settings,
    )?;
    let res = (|| -> Result<()> {
        // The jail's uid reads the image through its bind mount (the cache's directory stays
        // private: 0700, root's); the cache writes images 0600.
        let m = fs::metadata(plan.image)?;
        if m.mode() & 0o004 == 0 {
            fs::set_permissions(plan.image, fs::Permissions::from_mode(0o444))?;
        }
        confine(&container_confinement(plan, true), uid)
    })();
    if let Err(e) = res {
        // Not jailed: the uid goes back at once (a half-made jail is this process's only, and
        // the process fails).
        let _ = fs::remove_file(plan.state_root.join(UIDS_DIR).join(uid.to_string()));
        return Err(e);
    }
    Ok(Jailed { uid })
}

/// Container `plan.id` adopts the uid of the pool shell `shell` that runs its VM (the uid's
/// file names the container from now on, its directory is the uid's): call it once the shell
/// is claimed and checked, before anything is handed to it.
pub fn adopt(plan: &Plan, uid: u32, shell: &PoolShell) -> Result<()> {
    uids::adopt(
        plan.state_root,
        uid,
        shell,
        plan.id,
        plan.template,
        plan.dir,
    )
}

/// Jails the supervisor of a container whose VM runs in a pool shell, as the uid it adopted
/// ([`adopt`]): only its directory is in the jail (no VM is made here, no device opened).
pub fn enter_adopted(plan: &Plan, uid: u32) -> Result<Jailed> {
    confine(&container_confinement(plan, false), uid)?;
    Ok(Jailed { uid })
}

/// Where a pre-loaded pool shell finds its template in its jail.
pub const POOL_TEMPLATE: &str = "/template";

/// Jails a pool shell (this process, single-threaded, before its VM exists) with a uid of its
/// own from `settings`' range, allocated in `state_root` and named as pool shell `shell`: only
/// the template's snapshot directory (read-only, for a pre-loaded shell) at [`POOL_TEMPLATE`]
/// is there; the cwd is `/`. Everything of its client comes as descriptors.
pub fn enter_pool_shell(
    state_root: &Path,
    settings: Settings,
    shell: &PoolShell,
    template: Option<&Path>,
) -> Result<u32> {
    let uid = uids::allocate_pool_shell(state_root, shell, settings)?;
    let binds = template
        .map(|t| Bind {
            from: t,
            to: POOL_TEMPLATE.into(),
            dir: true,
            rw: false,
            recursive: false,
        })
        .into_iter()
        .collect();
    let c = Confinement {
        root_on: &shell.dir,
        binds,
        cwd: "/",
        devices: true,
        shares: false,
    };
    if let Err(e) = confine(&c, uid) {
        let _ = fs::remove_file(state_root.join(UIDS_DIR).join(uid.to_string()));
        return Err(e);
    }
    Ok(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_settings_default_on_as_root_only_and_range_checked() {
        let cfg = RuntimeConfig::default();
        let s = Settings::from_config(&cfg, true).unwrap();
        assert!(s.enabled);
        assert_eq!(
            (s.uid_base, s.uid_count),
            (DEFAULT_UID_BASE, DEFAULT_UID_COUNT)
        );
        assert!(!Settings::from_config(&cfg, false).unwrap().enabled);
        let off = RuntimeConfig {
            jail: Some(false),
            ..Default::default()
        };
        assert!(!Settings::from_config(&off, true).unwrap().enabled);
        for (base, count) in [(0, 10), (100, 0), (u32::MAX - 10, 100)] {
            let bad = RuntimeConfig {
                jail_uid_base: Some(base),
                jail_uid_count: Some(count),
                ..Default::default()
            };
            assert!(Settings::from_config(&bad, true).is_err(), "{base} {count}");
        }
    }

    #[test]
    fn test_close_inherited_fds_keeps_only_the_named() {
        // In a child: closing descriptors of the test harness would break it.
        // SAFETY: fork in a test; the child only makes syscalls and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let a = fs::File::open("/dev/null").unwrap();
                let b = fs::File::open("/dev/null").unwrap();
                let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
                std::mem::forget((a, b));
                close_inherited_fds(&[rb]);
                // SAFETY: F_GETFD only queries.
                let open = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
                let ok = !open(ra) && open(rb) && open(0) && open(1) && open(2);
                // SAFETY: _exit in the forked child.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
