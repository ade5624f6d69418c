//! The container's cgroup on the host.
//!
//! The container's own limits apply inside its VM (the agent's cgroup for the process, see
//! `update`); on the host the VM is one process, and that process (the supervisor, or the pooled
//! VMM it claimed) is placed in the bundle's `linux.cgroupsPath`, as runc places the container's
//! processes, so that what the engine set on the parent (a Kubernetes pod's or Docker's limits)
//! and its accounting cover the VM. cgroup v2 only; on a host without it nothing is placed.
//!
//! Paths resolve as runc's cgroupfs driver resolves them: an absolute path below the cgroup2
//! mount; a relative one below the parent of the runtime's own cgroup; none at all, the
//! container's id there. With `--systemd-cgroup`, `slice:prefix:name` names the scope
//! `prefix-name.scope` in that slice's directory (made here directly: kata-snap does not ask
//! systemd for the unit).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Where the unified hierarchy is mounted.
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup";
/// How long `remove` waits for the cgroup's processes to be gone.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// Whether the host has the unified (v2) hierarchy at [`CGROUP2_ROOT`].
pub fn unified() -> bool {
    Path::new(CGROUP2_ROOT).join("cgroup.controllers").is_file()
}

/// Where a container's VM goes on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The cgroup's directory.
    pub dir: PathBuf,
    /// The bundle named it: failing to enter it fails the container (as with runc). A default
    /// placement that cannot be made (no permission, a read-only hierarchy) is skipped.
    pub required: bool,
}

impl Placement {
    /// The placement for `cgroups_path` of container `id`; none on a host without cgroup v2.
    pub fn plan(cgroups_path: Option<&str>, id: &str, systemd: bool) -> Result<Option<Self>> {
        let named = cgroups_path.filter(|p| !p.is_empty());
        if !unified() {
            if let Some(p) = named {
                tracing::warn!(
                    "no cgroup v2 hierarchy at {CGROUP2_ROOT}: the VM is not placed in {p}"
                );
            }
            return Ok(None);
        }
        let dir = resolve(named, id, systemd, &own_cgroup())?;
        Ok(Some(Self {
            dir,
            required: named.is_some(),
        }))
    }

    /// What runc checks before it uses an existing cgroup: a frozen one is refused (the VM
    /// would stop as it enters), one with processes in it gets a warning.
    pub fn check(&self) -> Result<()> {
        let read =
            |f: &str| crate::oci::read_small_file(&self.dir.join(f), 1 << 20).unwrap_or_default();
        if read("cgroup.freeze").trim() == "1" {
            bail!("container's cgroup unexpectedly frozen");
        }
        let procs = read("cgroup.procs").lines().count();
        if procs > 0 {
            tracing::warn!("container's cgroup is not empty: {procs} process(es) found");
        }
        Ok(())
    }

    /// Moves process `pid` in; whether it is in.
    pub fn enter(&self, pid: i32) -> Result<bool> {
        match enter(&self.dir, pid) {
            Ok(()) => Ok(true),
            Err(e) if !self.required => {
                tracing::debug!("the VM stays in its cgroup: {e:#}");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Moves the calling process back into `cgroup` (a path as /proc/self/cgroup gives it), so
/// that the one it was placed in can be removed.
pub fn leave(cgroup: &str) -> Result<()> {
    let mut dir = PathBuf::from(CGROUP2_ROOT);
    push_clean(&mut dir, Path::new(cgroup))?;
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("cannot move back into the cgroup {}", dir.display()))
}

/// The directory below the cgroup2 root for `cgroups_path` of container `id`; `own` is the
/// runtime's own cgroup (the `0::` line of /proc/self/cgroup). Refuses `..` and, with
/// `systemd`, a path that is not `slice:prefix:name`.
pub fn resolve(cgroups_path: Option<&str>, id: &str, systemd: bool, own: &str) -> Result<PathBuf> {
    let inner: PathBuf = match cgroups_path.filter(|p| !p.is_empty()) {
        Some(p) if systemd => systemd_path(p)?,
        Some(p) => PathBuf::from(p),
        None if systemd => systemd_path(&format!("system.slice:kata-snap:{id}"))?,
        None => PathBuf::from(id),
    };
    let mut out = PathBuf::from(CGROUP2_ROOT);
    if inner.is_relative() {
        // The runtime's own cgroup has processes (this one), so children go beside it.
        let parent = Path::new(own).parent().unwrap_or(Path::new("/"));
        push_clean(&mut out, parent)?;
    }
    push_clean(&mut out, &inner)?;
    if out == Path::new(CGROUP2_ROOT) {
        bail!("cgroupsPath {cgroups_path:?} names the root cgroup");
    }
    Ok(out)
}

/// `slice:prefix:name` to `a.slice/a-b.slice/prefix-name.scope` (systemd's slice nesting).
fn systemd_path(p: &str) -> Result<PathBuf> {
    let parts: Vec<&str> = p.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        bail!("cgroupsPath {p:?}: with --systemd-cgroup it must be slice:prefix:name");
    };
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let Some(stem) = slice.strip_suffix(".slice") else {
        bail!("cgroupsPath {p:?}: {slice:?} is not a slice name");
    };
    if [stem, prefix, name].iter().any(|s| s.contains('/')) || name.is_empty() {
        bail!("cgroupsPath {p:?}: not a valid systemd cgroup name");
    }
    let mut out = PathBuf::from("/");
    if stem != "-" {
        let mut acc = String::new();
        for piece in stem.split('-') {
            if piece.is_empty() {
                bail!("cgroupsPath {p:?}: {slice:?} is not a valid slice name");
            }
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(piece);
            out.push(format!("{acc}.slice"));
        }
    }
    let unit = if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    out.push(unit);
    Ok(out)
}

/// Appends `p`'s normal components to `out`; `..` is refused (a config must not reach out of
/// the hierarchy), `.` and extra slashes are dropped.
fn push_clean(out: &mut PathBuf, p: &Path) -> Result<()> {
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                bail!("cgroupsPath {}: `..` is not allowed", p.display())
            }
        }
    }
    Ok(())
}

/// The calling process's cgroup (v2), from /proc/self/cgroup.
pub fn own_cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        })
        .unwrap_or_else(|| "/".into())
}

/// Creates `dir` (and its parents, mode 0755) and moves process `pid` (all its threads) into
/// it.
pub fn enter(dir: &Path, pid: i32) -> Result<()> {
    check_below_root(dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("cannot create the cgroup {}", dir.display()))?;
    enable_controllers(dir);
    let procs = dir.join("cgroup.procs");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&procs)
        .with_context(|| format!("cannot open {}", procs.display()))?;
    f.write_all(pid.to_string().as_bytes())
        .with_context(|| format!("cannot move pid {pid} into the cgroup {}", dir.display()))
}

/// As runc does: every controller a level has is enabled for its children, from the root down
/// to `dir`'s parent, so the container's cgroup has them all (the engine's limits on a level
/// need its controllers). Best effort: a level with processes of its own refuses, and keeps
/// what it had.
fn enable_controllers(dir: &Path) {
    let mut level = PathBuf::from(CGROUP2_ROOT);
    let Ok(rest) = dir.strip_prefix(CGROUP2_ROOT) else {
        return;
    };
    for c in rest.components() {
        let have = std::fs::read_to_string(level.join("cgroup.controllers")).unwrap_or_default();
        for ctl in have.split_whitespace() {
            if let Err(e) = std::fs::write(level.join("cgroup.subtree_control"), format!("+{ctl}"))
            {
                tracing::debug!("controller {ctl} of {} not enabled: {e}", level.display());
            }
        }
        level.push(c);
    }
}

/// Removes the cgroup `dir` once its processes are gone (they may still be exiting); a cgroup
/// that is gone already is fine. Only directories below the cgroup2 root are touched (the path
/// comes from a state record, which is not trusted).
pub fn remove(dir: &Path) -> Result<()> {
    check_below_root(dir)?;
    let end = Instant::now() + REMOVE_WAIT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY: a process has not left yet.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot remove the cgroup {}", dir.display()));
            }
        }
    }
}

fn check_below_root(dir: &Path) -> Result<()> {
    let below = dir
        .strip_prefix(CGROUP2_ROOT)
        .ok()
        .filter(|rest| !rest.as_os_str().is_empty())
        .is_some_and(|rest| rest.components().all(|c| matches!(c, Component::Normal(_))));
    if !below {
        bail!("{} is not a cgroup below {CGROUP2_ROOT}", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(p: Option<&str>, systemd: bool, own: &str) -> Result<PathBuf> {
        resolve(p, "ctr1", systemd, own)
    }

    #[test]
    fn absolute_relative_and_default_paths_resolve_as_runc_does() {
        let root = Path::new(CGROUP2_ROOT);
        assert_eq!(
            r(Some("/a/b"), false, "/user.slice/x.scope").unwrap(),
            root.join("a/b")
        );
        assert_eq!(
            r(Some("a/b"), false, "/user.slice/x.scope").unwrap(),
            root.join("user.slice/a/b")
        );
        assert_eq!(r(None, false, "/").unwrap(), root.join("ctr1"));
        assert_eq!(
            r(Some(""), false, "/init.scope").unwrap(),
            root.join("ctr1")
        );
        assert_eq!(r(Some("//a/./b/"), false, "/").unwrap(), root.join("a/b"));
    }

    #[test]
    fn escapes_and_the_root_are_refused() {
        for p in ["/a/../../etc", "../x", "a/.."] {
            let e = r(Some(p), false, "/x/y").unwrap_err().to_string();
            assert!(e.contains("`..`"), "{p}: {e}");
        }
        assert!(r(Some("/"), false, "/").is_err());
    }

    #[test]
    fn systemd_paths_name_a_scope_in_nested_slices() {
        let root = Path::new(CGROUP2_ROOT);
        assert_eq!(
            r(Some("system.slice:docker:abc"), true, "/").unwrap(),
            root.join("system.slice/docker-abc.scope")
        );
        assert_eq!(
            r(Some("kubepods-besteffort-pod1.slice:cri-containerd:abc"), true, "/").unwrap(),
            root.join(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            r(Some("-.slice::abc"), true, "/").unwrap(),
            root.join("abc.scope")
        );
        assert_eq!(
            r(None, true, "/").unwrap(),
            root.join("system.slice/kata-snap-ctr1.scope")
        );
        for bad in [
            "a/b",
            "x.slice:p",
            "notaslice:p:n",
            "a--b.slice:p:n",
            "x.slice:p:",
        ] {
            assert!(r(Some(bad), true, "/").is_err(), "{bad}");
        }
    }

    #[test]
    fn remove_touches_nothing_outside_the_hierarchy() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("keep");
        std::fs::create_dir(&victim).unwrap();
        assert!(remove(&victim).is_err());
        assert!(victim.is_dir());
        assert!(remove(Path::new("/sys/fs/cgroup/../../tmp")).is_err());
        assert!(remove(Path::new(CGROUP2_ROOT)).is_err());
        assert!(enter(&victim, 1).is_err());
    }

    #[test]
    fn enter_and_remove_move_a_process_in_and_out() {
        if !unified() || !nix::unistd::Uid::effective().is_root() {
            println!("SKIPPED: needs root and cgroup v2 at {CGROUP2_ROOT}");
            return;
        }
        let own = own_cgroup();
        let dir = resolve(
            Some(&format!("kata-snap-test-{}", std::process::id())),
            "x",
            false,
            &own,
        )
        .unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        if let Err(e) = enter(&dir, pid) {
            // A host whose own cgroup's parent is not writable here (a container's
            // delegation): nothing to test.
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir(&dir);
            println!(
                "SKIPPED: cannot place a process in {}: {e:#}",
                dir.display()
            );
            return;
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), pid.to_string());
        let seen = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            seen.trim()
                .ends_with(dir.strip_prefix(CGROUP2_ROOT).unwrap().to_str().unwrap())
        );
        child.kill().unwrap();
        child.wait().unwrap();
        remove(&dir).unwrap();
        assert!(!dir.exists());
        remove(&dir).unwrap();
    }
}
