//! The containers the agent runs and the processes of each: the registry an
//! `Exec` on one connection uses to find the container a `Create` (or `Run`)
//! made on another.
//!
//! A VM runs one container today; the registry is keyed by container number
//! so that its shape holds more. `Exec` targets the newest container.
//!
//! ```text
//!  Create ok --> init running --(init reaped)--> stopped: execs SIGKILLed
//!   Exec ok --> exec running --(reaped)--> gone      |
//!                                                    v
//!                            every process gone --> rootfs torn down
//! ```
//!
//! The container's init is pid 1 of a PID namespace of its own and every exec
//! joins it, so the kernel kills the execs (and whatever they started) when
//! the init exits, as in runc's namespace. The registry also SIGKILLs each
//! exec's process group then: for an agent that could not make a namespace
//! (see [`crate::process`]), and harmless otherwise.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use agent_protocol::{ErrorKind, SeccompProgram};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::cgroup::{CgroupError, Group};
use crate::rootfs::PreparedRootfs;

/// runc's text for an exec into a stopped container.
pub const STOPPED_MESSAGE: &str = "cannot exec in a stopped container";
/// The text for an exec before any container exists.
pub const NO_CONTAINER_MESSAGE: &str = "container does not exist";
/// runc's text (`ErrNotRunning`) for an update of a stopped container.
pub const NOT_RUNNING_MESSAGE: &str = "container not running";

/// Why an `Exec` cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecRefused {
    /// No container was created.
    #[error("{NO_CONTAINER_MESSAGE}")]
    NoContainer,
    /// The container's init has exited.
    #[error("{STOPPED_MESSAGE}")]
    Stopped,
    /// An exec with this id runs in the container.
    #[error("an exec with id {0:?} is already running in the container")]
    DuplicateId(String),
}

impl ExecRefused {
    /// The protocol's error kind for this refusal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ExecRefused::NoContainer => ErrorKind::NoContainer,
            ExecRefused::Stopped => ErrorKind::ContainerStopped,
            ExecRefused::DuplicateId(_) => ErrorKind::InvalidRequest,
        }
    }
}

/// One container: its root, its init, its running execs.
#[derive(Debug)]
struct Container {
    root: PathBuf,
    /// `None` once torn down.
    rootfs: Option<PreparedRootfs>,
    init: Pid,
    init_exited: bool,
    execs: HashMap<String, Pid>,
    /// Its cgroup, `None` without cgroups (or once removed).
    cgroup: Option<Group>,
    /// Its seccomp filter, installed in every exec too (as runc does).
    seccomp: Option<SeccompProgram>,
}

impl Container {
    /// Tears the rootfs down and removes the cgroup once every process is
    /// gone; a cgroup still busy goes to `lingering`.
    fn teardown_if_empty(&mut self, id: u64, lingering: &mut Vec<Group>) {
        if self.init_exited
            && self.execs.is_empty()
            && let Some(r) = self.rootfs.take()
        {
            tracing::info!(
                container = id,
                "every process gone; tearing the rootfs down"
            );
            r.teardown();
            if let Some(g) = self.cgroup.take()
                && !g.remove()
            {
                lingering.push(g);
            }
        }
    }
}

/// What the reaper learnt about a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The init of this container.
    Init(u64),
    /// An exec of this container.
    Exec(u64),
    /// Not a container's process (an orphan, or already forgotten).
    Unknown,
}

/// Where an accepted `Exec` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecTarget {
    /// The container's number.
    pub container: u64,
    /// Its root directory (chroot target).
    pub root: PathBuf,
    /// Its cgroup's directory, if it has one (joined by the process itself).
    pub cgroup: Option<PathBuf>,
    /// Its init: the exec joins the init's PID namespace.
    pub init: Pid,
    /// Its seccomp filter.
    pub seccomp: Option<SeccompProgram>,
}

/// Every container of this agent, by number.
#[derive(Debug, Default)]
pub struct Containers {
    map: BTreeMap<u64, Container>,
    /// Groups of torn-down containers still busy, removed on later reaps.
    lingering: Vec<Group>,
}

impl Containers {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records container `id`, mounted at `rootfs`, whose init is `init`,
    /// in `cgroup` (already holding `init`). Stopped containers that are
    /// fully torn down are forgotten (the newest one is kept until then, so
    /// `Exec` can say it stopped).
    pub fn add(
        &mut self,
        id: u64,
        rootfs: PreparedRootfs,
        init: Pid,
        cgroup: Option<Group>,
        seccomp: Option<SeccompProgram>,
    ) {
        self.map
            .retain(|_, c| !(c.init_exited && c.execs.is_empty() && c.rootfs.is_none()));
        self.map.insert(
            id,
            Container {
                root: rootfs.root.clone(),
                rootfs: Some(rootfs),
                init,
                init_exited: false,
                execs: HashMap::new(),
                cgroup,
                seccomp,
            },
        );
    }

    /// Moves `pid` (an exec waiting for its go byte) into the cgroup of
    /// `container`; nothing to do without one.
    pub fn attach(&self, container: u64, pid: Pid) -> Result<(), CgroupError> {
        match self.map.get(&container).and_then(|c| c.cgroup.as_ref()) {
            Some(g) => g.attach(pid),
            None => Ok(()),
        }
    }

    /// The cgroup `Update` and `Stats` act on: the newest container's,
    /// while its init runs (runc refuses both on a stopped container).
    pub fn cgroup(&self) -> Result<&Group, (ErrorKind, String)> {
        let (_, c) = self
            .map
            .iter()
            .next_back()
            .ok_or((ErrorKind::NoContainer, NO_CONTAINER_MESSAGE.to_owned()))?;
        if c.init_exited {
            return Err((ErrorKind::ContainerStopped, NOT_RUNNING_MESSAGE.to_owned()));
        }
        c.cgroup.as_ref().ok_or((
            ErrorKind::Cgroup,
            "the container has no cgroup (the guest has no cgroup v2)".to_owned(),
        ))
    }

    /// Where an exec named `exec_id` would run, or why it cannot.
    pub fn exec_target(&self, exec_id: &str) -> Result<ExecTarget, ExecRefused> {
        let (&id, c) = self
            .map
            .iter()
            .next_back()
            .ok_or(ExecRefused::NoContainer)?;
        if c.init_exited {
            return Err(ExecRefused::Stopped);
        }
        if c.execs.contains_key(exec_id) {
            return Err(ExecRefused::DuplicateId(exec_id.to_owned()));
        }
        Ok(ExecTarget {
            container: id,
            root: c.root.clone(),
            cgroup: c
                .cgroup
                .as_ref()
                .and_then(|g| g.joinable())
                .map(Path::to_path_buf),
            init: c.init,
            seccomp: c.seccomp.clone(),
        })
    }

    /// Records a started exec.
    pub fn add_exec(&mut self, container: u64, exec_id: &str, pid: Pid) {
        match self.map.get_mut(&container) {
            Some(c) => {
                c.execs.insert(exec_id.to_owned(), pid);
            }
            None => tracing::error!(container, "exec started in an unknown container"),
        }
    }

    /// Bookkeeping for a process that exited (called before it is reaped):
    /// an init's exit SIGKILLs the container's execs; the rootfs is torn down
    /// once init and every exec are gone.
    pub fn process_exited(&mut self, pid: Pid) -> Role {
        self.lingering.retain(|g| !g.remove());
        let lingering = &mut self.lingering;
        for (&id, c) in self.map.iter_mut() {
            if c.init == pid && !c.init_exited {
                c.init_exited = true;
                for (exec_id, &p) in &c.execs {
                    tracing::info!(
                        container = id,
                        exec_id = %exec_id,
                        pid = p.as_raw(),
                        "init exited; killing the exec"
                    );
                    // The exec leads its own process group (setsid): kill the
                    // group, and the exec itself should it have left it.
                    let _ = killpg(p, Signal::SIGKILL);
                    let _ = kill(p, Signal::SIGKILL);
                }
                c.teardown_if_empty(id, lingering);
                return Role::Init(id);
            }
            if let Some(exec_id) = c
                .execs
                .iter()
                .find_map(|(k, &p)| (p == pid).then(|| k.clone()))
            {
                c.execs.remove(&exec_id);
                c.teardown_if_empty(id, lingering);
                return Role::Exec(id);
            }
        }
        Role::Unknown
    }
}
