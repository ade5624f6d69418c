//! A cgroup v2 group per container (runc's `update` and `events`).
//!
//! In the VM the unified hierarchy is mounted at `/sys/fs/cgroup` (when it is
//! not already) before READY, so every clone of a template starts with it;
//! the memory, cpu, cpuset and pids controllers the kernel offers are
//! enabled in the root's and in `kata/`'s `cgroup.subtree_control`. Each
//! container gets `kata/c<N>`; its init and every exec are moved in by the
//! agent (the parent), after the child's set-up and before its go byte, so
//! nothing the container runs escapes the limits. The parent does it rather
//! than the child because the child is already chrooted into the container
//! (the cgroup tree is not in its view) and may have dropped root.
//!
//! When the container is torn down (init and execs reaped), `cgroup.kill`
//! ends whatever is left in the group (the init's background children, as
//! runc's pid namespace would) and the group is removed; a group still busy
//! is retried on later reaps.
//!
//! The root is configurable (`--cgroup-root`): harness tests on a host
//! whose cgroups are v1 point it at a plain directory, where the same code
//! writes and reads ordinary files (created as needed; `cgroup.procs` is
//! appended to, as reading the real one lists every member).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use agent_protocol::Resources;
use agent_protocol::resources::{ContainerStats, CpuStats, MemoryEvents, MemoryStats, PidsStats};
use nix::unistd::Pid;
use thiserror::Error;

pub mod parse;
pub mod procs;

use parse::{keyed, parse_err, read_bounded};

/// The directory under the root that holds the containers' groups.
pub const PARENT: &str = "kata";
/// Controllers the agent enables, in the order the kernel wants them.
pub const CONTROLLERS: [&str; 4] = ["cpuset", "cpu", "memory", "pids"];

/// Errors of the container's cgroup.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Writing a value was refused (by the kernel, usually EINVAL).
    #[error("cannot write {value:?} to {file}: {source}")]
    Write {
        /// The file name.
        file: &'static str,
        /// What was written.
        value: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A file's content is not what the kernel writes.
    #[error("{path}: {reason}")]
    Parse {
        /// The path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Mounting cgroup2 failed.
    #[error("cannot mount cgroup2 on {path}: {source}")]
    Mount {
        /// Mount point.
        path: String,
        /// Cause.
        source: nix::Error,
    },
    /// A request that cannot be applied as asked (the host's mistake).
    #[error("{0}")]
    Refused(String),
}

impl CgroupError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| CgroupError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// The agent's cgroup tree.
#[derive(Debug)]
pub struct Cgroups {
    root: PathBuf,
    /// A real cgroup2 mount (else a plain directory: the harness).
    cgroupfs: bool,
    /// Controllers enabled for the containers' groups.
    controllers: Vec<&'static str>,
}

impl Cgroups {
    /// Prepares `root`: mounts cgroup2 there first when `mount` and it is
    /// not one, creates `kata/` and enables the controllers down to it.
    pub fn setup(root: &Path, mount: bool) -> Result<Self, CgroupError> {
        let mut cgroupfs = is_cgroup2(root);
        if !cgroupfs && mount {
            std::fs::create_dir_all(root).map_err(CgroupError::io(root))?;
            let flags = nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC;
            nix::mount::mount(Some("cgroup2"), root, Some("cgroup2"), flags, None::<&str>)
                .map_err(|source| CgroupError::Mount {
                    path: root.display().to_string(),
                    source,
                })?;
            cgroupfs = true;
        }
        let available: Vec<String> = match read_bounded(&root.join("cgroup.controllers")) {
            Ok(text) => text.split_whitespace().map(str::to_owned).collect(),
            // A plain directory (the harness) offers them all.
            Err(_) if !cgroupfs => CONTROLLERS.iter().map(|c| c.to_string()).collect(),
            Err(e) => return Err(e),
        };
        let controllers: Vec<&'static str> = CONTROLLERS
            .into_iter()
            .filter(|c| available.iter().any(|a| a == c))
            .collect();
        let missing: Vec<_> = CONTROLLERS
            .iter()
            .filter(|c| !controllers.contains(c))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(?missing, "the kernel lacks cgroup controllers");
        }
        let cg = Self {
            root: root.to_owned(),
            cgroupfs,
            controllers,
        };
        let parent = root.join(PARENT);
        cg.enable(root)?;
        match std::fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(CgroupError::io(&parent)(e)),
        }
        cg.enable(&parent)?;
        tracing::info!(root = %root.display(), cgroupfs, controllers = ?cg.controllers, "cgroups ready");
        Ok(cg)
    }

    fn enable(&self, dir: &Path) -> Result<(), CgroupError> {
        for c in &self.controllers {
            write_file(
                self.cgroupfs,
                dir,
                "cgroup.subtree_control",
                &format!("+{c}"),
            )?;
        }
        Ok(())
    }

    /// Creates the group of container `id` (an existing empty one is
    /// reused).
    pub fn create_group(&self, id: u64) -> Result<Group, CgroupError> {
        let path = self.root.join(PARENT).join(format!("c{id}"));
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(CgroupError::io(&path)(e)),
        }
        Ok(Group {
            path,
            cgroupfs: self.cgroupfs,
        })
    }
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Writes `value` to `dir/file` (created in a plain directory;
/// `cgroup.procs` appended to there).
fn write_file(
    cgroupfs: bool,
    dir: &Path,
    file: &'static str,
    value: &str,
) -> Result<(), CgroupError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW);
    if !cgroupfs {
        o.create(true).mode(0o644);
        if file == "cgroup.procs" {
            o.append(true);
        } else {
            o.truncate(true);
        }
    }
    let werr = |source| CgroupError::Write {
        file,
        value: value.to_owned(),
        source,
    };
    let mut f = o.open(dir.join(file)).map_err(werr)?;
    f.write_all(format!("{value}\n").as_bytes()).map_err(werr)
}

/// The guest's memory (`MemTotal` of `/proc/meminfo`), in bytes.
pub fn mem_total() -> Result<u64, CgroupError> {
    let p = Path::new("/proc/meminfo");
    parse::parse_mem_total(&read_bounded(p)?).map_err(|r| parse_err(p, r))
}

/// Most sub-groups of a container's group removed with it, and how deep.
const MAX_SUBGROUPS: usize = 4096;
const MAX_SUBGROUP_DEPTH: usize = 16;

/// Removes the (emptied) groups below `dir`, deepest first, within `budget` directories and
/// [`MAX_SUBGROUP_DEPTH`] levels; what is left stays (the caller's `rmdir` then says busy).
fn remove_subgroups(dir: &Path, depth: usize, budget: &mut usize) {
    if depth >= MAX_SUBGROUP_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        // cgroupfs directories are groups; files are the controllers' interfaces.
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let sub = e.path();
            remove_subgroups(&sub, depth + 1, budget);
            if let Err(err) = std::fs::remove_dir(&sub) {
                tracing::debug!(path = %sub.display(), error = %err, "sub-group busy");
            }
        }
    }
}

/// One container's group.
#[derive(Debug)]
pub struct Group {
    path: PathBuf,
    cgroupfs: bool,
}

fn limit_str(v: i64) -> String {
    if v < 0 { "max".into() } else { v.to_string() }
}

impl Group {
    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory a process joins itself (on a real cgroup2 mount; a test tree of plain
    /// files is joined by [`Group::attach`] only).
    pub fn joinable(&self) -> Option<&Path> {
        self.cgroupfs.then_some(self.path.as_path())
    }

    /// Moves `pid` into the group.
    pub fn attach(&self, pid: Pid) -> Result<(), CgroupError> {
        write_file(self.cgroupfs, &self.path, "cgroup.procs", &pid.to_string())
    }

    fn read(&self, file: &str) -> Result<String, CgroupError> {
        read_bounded(&self.path.join(file))
    }

    fn value(&self, file: &str) -> Result<u64, CgroupError> {
        parse::parse_value(&self.read(file)?).map_err(|r| parse_err(&self.path.join(file), r))
    }

    fn keyed(&self, file: &str) -> Result<Vec<(String, u64)>, CgroupError> {
        parse::parse_keyed(&self.read(file)?).map_err(|r| parse_err(&self.path.join(file), r))
    }

    /// Applies `r` as runc's cgroup v2 driver does, after checking it
    /// whole: a memory limit above `mem_total` (the guest's memory) and a
    /// swap limit that cannot be converted are refused before anything is
    /// written. Quota and period keep the other half of `cpu.max`.
    pub fn update(&self, r: &Resources, mem_total: u64) -> Result<(), CgroupError> {
        if let Some(m) = r.memory_limit
            && m > 0
            && m as u64 > mem_total
        {
            return Err(CgroupError::Refused(format!(
                "memory limit {m} bytes is above the VM's memory (MemTotal {mem_total} bytes)"
            )));
        }
        // runc: memory set to unlimited without a swap value unlimits swap too.
        let swap = r
            .memory_swap
            .or(r.memory_limit.filter(|&m| m == -1).map(|_| -1));
        let swap_v2 = match swap {
            None => None,
            Some(s) => {
                let memory = match r.memory_limit {
                    Some(m) => m,
                    None => match self.value("memory.max")? {
                        u64::MAX => -1,
                        v => i64::try_from(v).unwrap_or(i64::MAX),
                    },
                };
                Some(parse::swap_to_v2(s, memory).map_err(CgroupError::Refused)?)
            }
        };
        let cpu_max = if r.cpu_quota.is_some() || r.cpu_period.is_some() {
            let file = self.path.join("cpu.max");
            let (quota, period) = match (r.cpu_quota, r.cpu_period) {
                (Some(q), Some(p)) => (q, p),
                _ => {
                    let (cq, cp) = parse::parse_cpu_max(&read_bounded(&file)?)
                        .map_err(|e| parse_err(&file, e))?;
                    let cq = cq.map_or(-1, |q| i64::try_from(q).unwrap_or(-1));
                    (r.cpu_quota.unwrap_or(cq), r.cpu_period.unwrap_or(cp))
                }
            };
            Some(format!("{} {period}", limit_str(quota)))
        } else {
            None
        };
        let w =
            |file: &'static str, value: String| write_file(self.cgroupfs, &self.path, file, &value);
        if let Some(s) = swap_v2 {
            let value = limit_str(s);
            match w("memory.swap.max", value.clone()) {
                // No swap accounting: unlimiting or disabling swap is moot (runc).
                Err(CgroupError::Write { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound
                        && (value == "max" || value == "0") => {}
                other => other?,
            }
        }
        if let Some(m) = r.memory_limit {
            w("memory.max", limit_str(m))?;
        }
        if let Some(m) = r.memory_reservation {
            w("memory.low", limit_str(m))?;
        }
        if let Some(s) = r.cpu_shares {
            w("cpu.weight", parse::shares_to_weight(s).to_string())?;
        }
        if let Some(v) = cpu_max {
            w("cpu.max", v)?;
        }
        if let Some(c) = &r.cpuset_cpus {
            w("cpuset.cpus", c.clone())?;
        }
        if let Some(m) = &r.cpuset_mems {
            w("cpuset.mems", m.clone())?;
        }
        if let Some(p) = r.pids_limit {
            w("pids.max", limit_str(p))?;
        }
        Ok(())
    }

    /// Reads the group's figures (runc's cgroup v2 `Stats`): swap files
    /// are optional (no swap accounting), every other file must be there.
    pub fn stats(&self) -> Result<ContainerStats, CgroupError> {
        let cpu = self.keyed("cpu.stat")?;
        let events = self.keyed("memory.events")?;
        let optional = |file: &str| match self.value(file) {
            Err(CgroupError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(0)
            }
            other => other,
        };
        Ok(ContainerStats {
            cpu: CpuStats {
                usage_usec: keyed(&cpu, "usage_usec"),
                user_usec: keyed(&cpu, "user_usec"),
                system_usec: keyed(&cpu, "system_usec"),
                nr_periods: keyed(&cpu, "nr_periods"),
                nr_throttled: keyed(&cpu, "nr_throttled"),
                throttled_usec: keyed(&cpu, "throttled_usec"),
            },
            memory: MemoryStats {
                usage: self.value("memory.current")?,
                limit: self.value("memory.max")?,
                swap_usage: optional("memory.swap.current")?,
                swap_limit: optional("memory.swap.max")?,
                raw: self.keyed("memory.stat")?,
                events: MemoryEvents {
                    low: keyed(&events, "low"),
                    high: keyed(&events, "high"),
                    max: keyed(&events, "max"),
                    oom: keyed(&events, "oom"),
                    oom_kill: keyed(&events, "oom_kill"),
                },
            },
            pids: PidsStats {
                current: self.value("pids.current")?,
                limit: self.value("pids.max")?,
            },
        })
    }

    /// Ends what is left in the group and removes it. Returns false when
    /// it is still busy (try again later).
    pub fn remove(&self) -> bool {
        if !self.cgroupfs {
            return match std::fs::remove_dir_all(&self.path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the group");
                    true
                }
            };
        }
        match std::fs::remove_dir(&self.path) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) => {}
        }
        if let Err(e) = write_file(true, &self.path, "cgroup.kill", "1") {
            tracing::debug!(error = %e, "cgroup.kill");
        }
        // Groups the container made below its own (`exec --cgroup`, runc's tests) go first.
        let mut budget = MAX_SUBGROUPS;
        remove_subgroups(&self.path, 0, &mut budget);
        match std::fs::remove_dir(&self.path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "group busy; retried later");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_remove_subgroups_deepest_first_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["a/b/c", "d"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        // A file (an interface file, as cgroupfs has) is not a group and stays.
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        let mut budget = MAX_SUBGROUPS;
        remove_subgroups(dir.path(), 0, &mut budget);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["cgroup.procs"]);
        // Out of budget: nothing more is touched.
        std::fs::create_dir_all(dir.path().join("e/f")).unwrap();
        let mut none = 0;
        remove_subgroups(dir.path(), 0, &mut none);
        assert!(dir.path().join("e/f").exists());
    }
}
