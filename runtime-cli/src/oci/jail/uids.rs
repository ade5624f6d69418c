//! The jail's uids: one per live container from the config's range, allocated with an `O_EXCL`
//! file per uid in `STATE_ROOT/jail@uids/` under an exclusive `flock` of the state root, given
//! back by `delete` once no process runs as it.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{RECORDING, Settings, UIDS_DIR};

/// How long `delete` waits for a stopped container's supervisor to be gone before it gives its
/// uid back.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Bound on a uid file.
const UID_FILE_MAX: u64 = 64 << 10;

/// What a uid file says: which container holds the uid, and its template (where `delete`
/// installs a working set the jailed supervisor recorded). Root's, in a root-only directory:
/// nothing the jail can write.
#[derive(Debug, Serialize, Deserialize)]
struct UidFile {
    id: String,
    template: PathBuf,
    /// Held by a pool shell rather than a container (`id` is empty then): a container that
    /// claims the shell adopts its uid ([`adopt`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pool: Option<PoolShell>,
}

/// Which pool shell holds a uid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolShell {
    /// The pool's directory.
    pub dir: PathBuf,
    /// The shell's pid.
    pub pid: i32,
}

/// Takes an exclusive `flock` on the state root (allocation and release of uids).
fn lock_root(root: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(root)
        .with_context(|| format!("cannot open {}", root.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", root.display()))
}

/// The directory of uid files, made if missing (0700, root's).
fn uids_dir(root: &Path) -> Result<PathBuf> {
    let dir = root.join(UIDS_DIR);
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let m = fs::symlink_metadata(&dir)?;
    if !m.is_dir() || m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o077 != 0 {
        bail!("{} is not a private directory of this user", dir.display());
    }
    Ok(dir)
}

/// Reads a uid file (a regular file, not followed, bounded).
fn read_uid_file(path: &Path) -> Option<UidFile> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut s = String::new();
    f.take(UID_FILE_MAX).read_to_string(&mut s).ok()?;
    serde_json::from_str(&s).ok()
}

/// Whether a process (not a zombie) has pid `pid`.
fn pid_alive(pid: i32) -> bool {
    pid > 0
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
            .unwrap_or(false)
}

/// Whether any process runs with `uid`: first asked of the kernel, which is quick (a child as
/// `uid` sends signal 0 to every process it may signal: those whose real or saved uid is
/// `uid`); only when it finds one (a zombie counts there) are the processes' status files read.
fn uid_in_use(uid: u32) -> bool {
    match uid_signalable(uid) {
        Some(false) => false,
        _ => uid_in_status(uid),
    }
}

/// Whether a process of `uid` could signal any other process (`kill(-1, 0)` as `uid`), from a
/// forked child; `None` when that could not be asked.
fn uid_signalable(uid: u32) -> Option<bool> {
    // SAFETY: the child makes raw syscalls only and exits with `_exit`.
    match unsafe { nix::unistd::fork() }.ok()? {
        nix::unistd::ForkResult::Child => {
            // SAFETY: setresuid with integer arguments.
            let became = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } == 0;
            let code = if became {
                // SAFETY: kill with integer arguments (signal 0: nothing is sent).
                match unsafe { libc::kill(-1, 0) } {
                    0 => 1,
                    _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) => 0,
                    _ => 2,
                }
            } else {
                2
            };
            // SAFETY: _exit in the forked child.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => loop {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => return Some(false),
                Ok(nix::sys::wait::WaitStatus::Exited(_, 1)) => return Some(true),
                Err(nix::errno::Errno::EINTR) => continue,
                _ => return None,
            }
        },
    }
}

/// Whether any process that is not a zombie runs with `uid` as its real, effective, saved or
/// filesystem uid (from /proc/PID/status: slow, a few ms for a hundred processes).
fn uid_in_status(uid: u32) -> bool {
    let Ok(procs) = fs::read_dir("/proc") else {
        // Cannot tell: in use.
        return true;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        // /proc/PID is its process's effective uid's, or root's when it is not dumpable (a
        // jailed supervisor): any other owner is neither.
        if p.metadata().is_ok_and(|m| m.uid() != 0 && m.uid() != uid) {
            continue;
        }
        let Ok(status) = fs::read_to_string(p.path().join("status")) else {
            continue;
        };
        // A zombie can do nothing more.
        if status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .is_some_and(|st| st.trim_start().starts_with('Z'))
        {
            continue;
        }
        let uids = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .unwrap_or_default();
        if uids.split_whitespace().any(|u| u.parse() == Ok(uid)) {
            return true;
        }
    }
    false
}

/// Allocates a uid of the range for container `id` of `template` and gives it the container's
/// directory `dir` (under the lock: until then a concurrent allocation would find the uid's
/// file stale): the first uid whose file can be created (`O_EXCL`). A file left by a container
/// that is gone (its directory missing or not its uid's, and no process of the uid running) is
/// taken over.
pub(super) fn allocate(
    root: &Path,
    id: &str,
    template: &Path,
    dir: &Path,
    s: Settings,
) -> Result<u32> {
    let holder = UidFile {
        id: id.to_string(),
        template: template.to_owned(),
        pool: None,
    };
    allocate_for(root, &holder, s, |uid| give_dir(dir, uid))
}

/// Allocates a uid of the range for pool shell `shell` (named as such in its file: a container
/// that claims the shell adopts it; the pool's manager gives it back when the shell ends
/// unclaimed, [`release_pool_shell`]).
pub(super) fn allocate_pool_shell(root: &Path, shell: &PoolShell, s: Settings) -> Result<u32> {
    let holder = UidFile {
        id: String::new(),
        template: PathBuf::new(),
        pool: Some(shell.clone()),
    };
    allocate_for(root, &holder, s, |_| Ok(()))
}

fn allocate_for(
    root: &Path,
    holder: &UidFile,
    s: Settings,
    give: impl Fn(u32) -> Result<()>,
) -> Result<u32> {
    let _lock = lock_root(root)?;
    let uids = uids_dir(root)?;
    let body = serde_json::to_vec(holder)?;
    for uid in s.uid_base..s.uid_base + s.uid_count {
        let path = uids.join(uid.to_string());
        for attempt in 0..2 {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(mut f) => {
                    let given = f
                        .write_all(&body)
                        .and_then(|()| f.sync_all())
                        .with_context(|| format!("cannot write {}", path.display()))
                        .and_then(|()| give(uid));
                    if let Err(e) = given {
                        let _ = fs::remove_file(&path);
                        return Err(e);
                    }
                    return Ok(uid);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt == 0 => {
                    let stale = match read_uid_file(&path) {
                        // A pool shell's: stale once the shell is gone (it takes the uid
                        // only after this allocation) and no process runs as it.
                        Some(UidFile {
                            pool: Some(shell), ..
                        }) => !pid_alive(shell.pid) && !uid_in_use(uid),
                        Some(held) => {
                            let owner = fs::symlink_metadata(root.join(&held.id))
                                .ok()
                                .filter(|m| m.is_dir())
                                .map(|m| m.uid());
                            owner != Some(uid) && !uid_in_use(uid)
                        }
                        // Garbage (a crash half-way through the write): stale if unused.
                        None => !uid_in_use(uid),
                    };
                    if !stale {
                        break;
                    }
                    tracing::debug!("jail: taking over the stale uid {uid}");
                    let _ = fs::remove_file(&path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => break,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()));
                }
            }
        }
    }
    bail!(
        "no free uid for the jail in {}..{} (config jailUidBase, jailUidCount)",
        s.uid_base,
        s.uid_base as u64 + s.uid_count as u64
    )
}

/// Gives back the uid of container `id` (whose directory is `dir`, not removed yet), after
/// installing a working set its jailed supervisor recorded. Nothing when the directory is not
/// a jailed container's. The uid stays taken while a process of it still runs.
pub fn release(root: &Path, id: &str, dir: &Path) -> Result<()> {
    let Ok(m) = fs::symlink_metadata(dir) else {
        return Ok(());
    };
    // Root's (not jailed) or the caller's own (rootless: no jail).
    if !m.is_dir() || m.uid() == 0 || m.uid() == nix::unistd::geteuid().as_raw() {
        return Ok(());
    }
    let uid = m.uid();
    let _lock = lock_root(root)?;
    let uids = root.join(UIDS_DIR);
    let path = uids.join(uid.to_string());
    let Some(held) = read_uid_file(&path) else {
        return Ok(());
    };
    if held.id != id {
        return Ok(());
    }
    let recorded = dir.join(RECORDING);
    if fs::symlink_metadata(&recorded).is_ok() {
        match crate::oci::template::install_recording(&held.template, &recorded) {
            Ok(true) => tracing::debug!("the template's working set is recorded"),
            Ok(false) => {}
            Err(e) => tracing::warn!("the template's working set was not recorded: {e:#}"),
        }
    }
    // A stopped container's supervisor may still be on its way out.
    let end = std::time::Instant::now() + RELEASE_WAIT;
    let mut in_use = uid_in_use(uid);
    while in_use && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(5));
        in_use = uid_in_use(uid);
    }
    if in_use {
        tracing::warn!("jail uid {uid} of {id} still runs a process: it stays allocated");
        return Ok(());
    }
    fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    // Gone when no container holds a uid (fails harmlessly otherwise).
    let _ = fs::remove_dir(&uids);
    Ok(())
}

/// Whether `uid` is held by the pool shell of the pool in `pool_dir` that runs as `pid` (what
/// a client checks of a shell that is not root nor the caller before it hands it anything).
pub fn held_by_pool_shell(root: &Path, uid: u32, pool_dir: &Path, pid: i32) -> bool {
    let path = root.join(UIDS_DIR).join(uid.to_string());
    // The directory is root's and private: nothing the jail (or another user) can write.
    let private = fs::symlink_metadata(root.join(UIDS_DIR))
        .is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o077 == 0);
    private
        && read_uid_file(&path)
            .and_then(|f| f.pool)
            .is_some_and(|p| p.dir == pool_dir && p.pid == pid)
}

/// Container `id` (directory `dir`, template `template`) adopts the uid of the pool shell
/// `shell` it claimed: the uid's file names the container from now on (written to a temporary
/// and renamed), and the directory is given to the uid, so `delete` gives it back as any
/// container's. Fails unless the file names that shell.
pub(super) fn adopt(
    root: &Path,
    uid: u32,
    shell: &PoolShell,
    id: &str,
    template: &Path,
    dir: &Path,
) -> Result<()> {
    let _lock = lock_root(root)?;
    let uids = uids_dir(root)?;
    let path = uids.join(uid.to_string());
    if read_uid_file(&path).and_then(|f| f.pool).as_ref() != Some(shell) {
        bail!("jail uid {uid} is not held by pool shell {}", shell.pid);
    }
    let body = serde_json::to_vec(&UidFile {
        id: id.to_string(),
        template: template.to_owned(),
        pool: None,
    })?;
    let tmp = uids.join(format!(".{uid}.{}", std::process::id()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&body)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    give_dir(dir, uid)
}

/// Gives back the uid of pool shell `pid` of the pool in `pool_dir` once no process runs as it
/// (the shell ended unclaimed, or served a restore that was no container's). Nothing when no
/// uid file names it (a container adopted it: `delete` gives it back).
pub fn release_pool_shell(root: &Path, pool_dir: &Path, pid: i32) -> Result<()> {
    let uids = root.join(UIDS_DIR);
    if !uids.is_dir() {
        return Ok(());
    }
    let _lock = lock_root(root)?;
    let shell = PoolShell {
        dir: pool_dir.to_owned(),
        pid,
    };
    for e in fs::read_dir(&uids)?.flatten() {
        let Some(uid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if read_uid_file(&e.path()).and_then(|f| f.pool).as_ref() != Some(&shell) {
            continue;
        }
        let end = std::time::Instant::now() + RELEASE_WAIT;
        let mut in_use = uid_in_use(uid);
        while in_use && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(5));
            in_use = uid_in_use(uid);
        }
        if in_use {
            tracing::warn!("jail uid {uid} of pool shell {pid} still runs a process: it stays");
            return Ok(());
        }
        fs::remove_file(e.path())
            .with_context(|| format!("cannot remove {}", e.path().display()))?;
    }
    let _ = fs::remove_dir(&uids);
    Ok(())
}

/// Gives the container's directory to `uid` (and its gid), mode 0700.
fn give_dir(dir: &Path, uid: u32) -> Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(uid))
        .with_context(|| format!("jail: cannot give {} to uid {uid}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_allocate_gives_distinct_uids_and_takes_over_stale_ones() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: needs root (uid files are checked to be root's)");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let s = Settings {
            enabled: true,
            uid_base: 3_900_000_000,
            uid_count: 3,
        };
        let t = Path::new("/t");
        let alloc = |id: &str| {
            let d = root.path().join(id);
            let _ = fs::create_dir(&d);
            allocate(root.path(), id, t, &d, s)
        };
        let a = alloc("a").unwrap();
        let b = alloc("b").unwrap();
        assert_ne!(a, b);
        let m = fs::metadata(root.path().join("b")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (b, b, 0o700));
        // "c" allocates and its directory is gone without a delete: its uid is stale.
        let c = alloc("c").unwrap();
        fs::remove_dir(root.path().join("c")).unwrap();
        assert_eq!(alloc("d").unwrap(), c, "c's uid is stale (no directory)");
        let d_file = read_uid_file(&root.path().join(UIDS_DIR).join(c.to_string())).unwrap();
        assert_eq!(d_file.id, "d");
        // Full: a, b, d live.
        let e = alloc("e").unwrap_err();
        assert!(e.to_string().contains("no free uid"), "{e}");
        // Release gives b's back; a release naming another id gives nothing.
        release(root.path(), "x", &root.path().join("b")).unwrap();
        assert!(alloc("e").is_err());
        release(root.path(), "b", &root.path().join("b")).unwrap();
        fs::remove_dir(root.path().join("b")).unwrap();
        assert_eq!(alloc("e").unwrap(), b);
    }

    #[test]
    fn test_pool_shell_uid_is_held_adopted_by_its_container_and_given_back() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: needs root (uid files are checked to be root's)");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let s = Settings {
            enabled: true,
            uid_base: 3_900_000_200,
            uid_count: 4,
        };
        let pool = root.path().join("pool");
        let shell = |pid| PoolShell {
            dir: pool.clone(),
            pid,
        };
        // Live pids (this process and init): a shell holds its uid before it runs as it.
        let (mine, init) = (std::process::id() as i32, 1);
        let a = allocate_pool_shell(root.path(), &shell(mine), s).unwrap();
        let b = allocate_pool_shell(root.path(), &shell(init), s).unwrap();
        assert_ne!(a, b);
        assert!(held_by_pool_shell(root.path(), a, &pool, mine));
        assert!(
            !held_by_pool_shell(root.path(), a, &pool, init),
            "another shell's pid"
        );
        assert!(!held_by_pool_shell(
            root.path(),
            a,
            Path::new("/other"),
            mine
        ));
        // A container adopts a's uid: only as the shell that holds it.
        let dir = root.path().join("c1");
        fs::create_dir(&dir).unwrap();
        let t = Path::new("/t");
        assert!(adopt(root.path(), a, &shell(init), "c1", t, &dir).is_err());
        adopt(root.path(), a, &shell(mine), "c1", t, &dir).unwrap();
        assert!(
            !held_by_pool_shell(root.path(), a, &pool, mine),
            "still the shell's"
        );
        let held = read_uid_file(&root.path().join(UIDS_DIR).join(a.to_string())).unwrap();
        assert_eq!((held.id.as_str(), held.pool), ("c1", None));
        assert_eq!(fs::metadata(&dir).unwrap().uid(), a);
        // The manager's release after the shell ends leaves an adopted uid alone.
        release_pool_shell(root.path(), &pool, mine).unwrap();
        assert!(root.path().join(UIDS_DIR).join(a.to_string()).exists());
        // b ends unclaimed: given back; a at the container's delete.
        release_pool_shell(root.path(), &pool, init).unwrap();
        assert!(!root.path().join(UIDS_DIR).join(b.to_string()).exists());
        release(root.path(), "c1", &dir).unwrap();
        assert!(!root.path().join(UIDS_DIR).exists(), "every uid is back");
    }

    #[test]
    fn test_uid_in_use_sees_a_live_process_not_a_zombie() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: needs root (to run a process as another uid)");
            return;
        }
        let uid = 3_900_000_100;
        assert!(!uid_in_use(uid));
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: fork in a test; the child makes raw syscalls and exits.
        let child = match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                drop(w);
                // SAFETY: setresuid with integer arguments.
                unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
                let mut b = [0u8; 1];
                let _ = nix::unistd::read(&r, &mut b);
                // SAFETY: _exit in the forked child.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => child,
        };
        drop(r);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !uid_in_use(uid) {
            assert!(
                std::time::Instant::now() < end,
                "the child's uid is not seen"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(uid_in_status(uid));
        drop(w);
        // A zombie (not reaped yet) is not in use.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while uid_in_use(uid) {
            assert!(std::time::Instant::now() < end, "the zombie counts");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        nix::sys::wait::waitpid(child, None).unwrap();
        assert!(!uid_in_use(uid));
    }
}
