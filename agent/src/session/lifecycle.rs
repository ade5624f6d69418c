//! Creating and starting the session's process: `Create`, `Start`, `Run`
//! (= `Create` then `Start`) for the container's init, and `Exec` for
//! another process in it, with the answers each gets on success and failure.
//! One code path ([`prepare`]) sets up every process.

use std::time::Instant;

use agent_protocol::{AgentMessage, ErrorKind, ExecRequest, FileContent, Mount, RunRequest};
use nix::unistd::Pid;

use super::{Phase, Proc, Session, SessionContext, SessionEnd, error};
use crate::exit_status::EXIT_CANNOT_INVOKE;
use crate::files::write_files;
use crate::mounts::{
    apply_masked_paths, apply_mount, apply_readonly_paths, populate_dev, prepare_dev,
    seal_readonly_mounts,
};
use crate::process::{InitMounts, Prepared, Role, Setup, SpawnError, Spawned, prepare};
use crate::restore::RestoreOps;
use crate::rootfs::prepare as prepare_rootfs;

/// Why creating or starting the process failed, and the exit status a `Run`
/// reports for it.
struct Failure {
    kind: ErrorKind,
    message: String,
    code: i32,
}

impl Failure {
    fn rootfs(e: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Rootfs,
            message: e.to_string(),
            code: EXIT_CANNOT_INVOKE,
        }
    }

    fn network(e: crate::network::NetworkError) -> Self {
        Self {
            kind: ErrorKind::Network,
            message: format!("cannot configure the container's network: {e}"),
            code: EXIT_CANNOT_INVOKE,
        }
    }

    fn cgroup(e: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Cgroup,
            message: format!("cannot put the process in the container's cgroup: {e}"),
            code: EXIT_CANNOT_INVOKE,
        }
    }
}

impl From<SpawnError> for Failure {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::Exec {
                kind,
                message,
                code,
            } => Self {
                kind,
                message,
                code,
            },
            e @ (SpawnError::Setup(_) | SpawnError::Stalled { .. }) => Self {
                kind: ErrorKind::ExecFailed,
                message: e.to_string(),
                code: EXIT_CANNOT_INVOKE,
            },
        }
    }
}

fn wire_pid(pid: Pid) -> u32 {
    u32::try_from(pid.as_raw()).unwrap_or(u32::MAX)
}

/// The session's record of a freshly set-up process.
fn proc_of(spawned: Spawned) -> Box<Proc> {
    let Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        terminal,
    } = spawned;
    if let Err(e) = nix::fcntl::fcntl(
        &stdin,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    ) {
        tracing::warn!(error = %e, "cannot make stdin non-blocking");
    }
    Box::new(Proc {
        pid,
        stdin: Some(stdin),
        stdin_queue: Vec::new(),
        stdin_close: false,
        stdout: Some(stdout),
        stderr,
        terminal,
        exit: None,
    })
}

impl Session {
    /// Ends a `Run`, `Start` or `Exec` that failed: `Error`, then
    /// `Exited{code}`, then the connection closes.
    fn fail_run(&mut self, f: Failure) {
        let Failure {
            kind,
            message,
            code,
        } = f;
        tracing::warn!(?kind, %message, code, "run failed");
        self.reply(error(kind, message));
        self.reply(AgentMessage::Exited { code });
        self.end(SessionEnd::Exited(code), true);
    }

    /// `Run`: `Create` then `Start`, answered by `Started` alone.
    pub(super) fn run<R: RestoreOps>(&mut self, req: &RunRequest, ctx: &mut SessionContext<'_, R>) {
        match self.create(req, ctx).and_then(|_| self.start_created(ctx)) {
            Ok(pid) => self.reply(AgentMessage::Started { pid }),
            Err(f) => self.fail_run(f),
        }
    }

    pub(super) fn create_and_reply<R: RestoreOps>(
        &mut self,
        req: &RunRequest,
        ctx: &mut SessionContext<'_, R>,
    ) {
        match self.create(req, ctx) {
            Ok(pid) => self.reply(AgentMessage::Created { pid }),
            Err(f) => {
                // Nothing is left of the attempt: the host may Create again.
                tracing::warn!(kind = ?f.kind, message = %f.message, "create failed");
                self.reply(error(f.kind, f.message))
            }
        }
    }

    pub(super) fn start_and_reply<R: RestoreOps>(&mut self, ctx: &mut SessionContext<'_, R>) {
        match self.start_created(ctx) {
            Ok(pid) => self.reply(AgentMessage::Started { pid }),
            Err(f) => self.fail_run(f),
        }
    }

    /// Lets the created process exec. On success the phase is `Running`; on
    /// failure the child has been reaped, and the container learns its init
    /// is gone (killing its execs, tearing the rootfs down).
    fn start_created<R: RestoreOps>(
        &mut self,
        ctx: &mut SessionContext<'_, R>,
    ) -> Result<u32, Failure> {
        let (p, gate) = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Created(p, gate) => (p, gate),
            other => {
                self.phase = other;
                return Err(Failure {
                    kind: ErrorKind::Internal,
                    message: "no created process to start".into(),
                    code: EXIT_CANNOT_INVOKE,
                });
            }
        };
        let pid = p.pid;
        match gate.open() {
            Ok(()) => {
                tracing::info!(pid = pid.as_raw(), "process started");
                self.phase = Phase::Running(p);
                Ok(wire_pid(pid))
            }
            Err(e) => {
                // `open` reaped the child: the reaper will never see it.
                ctx.containers.process_exited(pid);
                Err(e.into())
            }
        }
    }

    /// Mounts the rootfs and the OCI mounts, prepares the init process and
    /// records the container. On success the phase is `Created`; on failure
    /// nothing is left (no child, no mounts) and the phase stays `Idle`.
    fn create<R: RestoreOps>(
        &mut self,
        req: &RunRequest,
        ctx: &mut SessionContext<'_, R>,
    ) -> Result<u32, Failure> {
        let t0 = Instant::now();
        // The network first: it leaves nothing to undo when it fails, and the
        // container shares the agent's (the VM's) network namespace, so it is
        // in place before the process exists. A second Create applies it again
        // harmlessly (addresses and routes already there are fine).
        if let Some(net) = &req.network {
            crate::network::apply(net).map_err(Failure::network)?;
            tracing::debug!(
                network_us = t0.elapsed().as_micros() as u64,
                "network configured"
            );
        }
        // The shared filesystem before the rootfs and the mounts: the binds of host paths take
        // their sources in it. It stays mounted for the VM's life (a later Create finds it).
        if let Some(fs) = &req.shared_fs {
            ctx.shared
                .ensure(fs, ctx.state_dir, crate::shared_fs::mount_virtiofs)
                .map_err(Failure::rootfs)?;
        }
        req.mounts
            .iter()
            .try_for_each(|m| ctx.shared.check_bind_source(m))
            .map_err(Failure::rootfs)?;
        let id = ctx.next_id;
        ctx.next_id += 1;
        let rootfs = prepare_rootfs(ctx.state_dir, id, &req.rootfs).map_err(Failure::rootfs)?;
        let t_rootfs = t0.elapsed();
        // The group first: a cgroup2 mount in the container shows it (below).
        let group = match &ctx.cgroups {
            Ok(cg) => match cg.create_group(id) {
                Ok(g) => Some(g),
                Err(e) => {
                    rootfs.teardown();
                    return Err(Failure::cgroup(e));
                }
            },
            Err(_) => None,
        };
        let mounts: Vec<Mount> = req
            .mounts
            .iter()
            .map(|m| cgroup_view(m, group.as_ref()))
            .collect();
        // A proc mount shows the PID namespace of the process that mounts it: the init makes
        // those itself, in its new namespace, with what goes on top of them (mounts below a
        // proc mount, read-only and masked paths there) and the read-only remount. The rest
        // is made here first (the terminal's devpts must exist before the fork).
        let split = ProcSplit::new(&mounts);
        let (child_files, parent_files): (Vec<FileContent>, Vec<FileContent>) = req
            .files
            .iter()
            .cloned()
            .partition(|f| split.below_proc(&f.path));
        let mounted = prepare_dev(&rootfs.root, &mounts, req.rootfs.readonly)
            .and_then(|()| {
                mounts
                    .iter()
                    .filter(|m| !split.in_child(m))
                    .try_for_each(|m| apply_mount(&rootfs.root, m))
            })
            .and_then(|()| populate_dev(&rootfs.root))
            .map_err(Failure::rootfs)
            // The copied host files where their binds would be (runc binds them with the
            // other mounts), before anything is made read-only.
            .and_then(|()| write_files(&rootfs.root, &parent_files).map_err(Failure::rootfs))
            // runc makes a read-only tmpfs read-only once what goes in it is made.
            .and_then(|()| {
                let mine: Vec<Mount> = mounts
                    .iter()
                    .filter(|m| !split.in_child(m))
                    .cloned()
                    .collect();
                seal_readonly_mounts(&rootfs.root, &mine).map_err(Failure::rootfs)
            })
            // runc's order: read-only paths, then masked ones.
            .and_then(|()| {
                apply_readonly_paths(&rootfs.root, &split.paths(&req.readonly_paths, false))
                    .map_err(Failure::rootfs)
            })
            .and_then(|()| {
                apply_masked_paths(&rootfs.root, &split.paths(&req.masked_paths, false))
                    .map_err(Failure::rootfs)
            });
        if let Err(e) = mounted {
            rootfs.teardown();
            if let Some(g) = &group {
                g.remove();
            }
            return Err(e);
        }
        let make_mounts = || -> Result<(), String> {
            let e = |e: &dyn std::fmt::Display| e.to_string();
            mounts
                .iter()
                .filter(|m| split.in_child(m))
                .try_for_each(|m| apply_mount(&rootfs.root, m))
                .map_err(|x| e(&x))?;
            write_files(&rootfs.root, &child_files).map_err(|x| e(&x))?;
            apply_readonly_paths(&rootfs.root, &split.paths(&req.readonly_paths, true))
                .map_err(|x| e(&x))?;
            apply_masked_paths(&rootfs.root, &split.paths(&req.masked_paths, true))
                .map_err(|x| e(&x))?;
            rootfs.seal().map_err(|x| e(&x))
        };
        let setup = Setup {
            cgroup: group.as_ref().and_then(|g| g.joinable()),
            seccomp: req.seccomp.as_ref(),
            ..Setup::new(
                &rootfs.root,
                Role::Init {
                    hostname: req.hostname.as_deref(),
                    mounts: Some(InitMounts(&make_mounts)),
                },
            )
        };
        let prepared = prepare(&setup, &req.process);
        tracing::debug!(
            rootfs_us = t_rootfs.as_micros() as u64,
            prepare_us = (t0.elapsed() - t_rootfs).as_micros() as u64,
            "create timing (prepare includes the mounts)"
        );
        // The child joined its group itself; this makes sure before its go byte.
        let attached = prepared.map_err(Failure::from).and_then(|p| match &group {
            Some(g) => match g.attach(p.process.pid) {
                Ok(()) => Ok(p),
                // Dropping `p` closes the go pipe: the child exits without exec.
                Err(e) => Err(Failure::cgroup(e)),
            },
            None => Ok(p),
        });
        let Prepared { process, gate } = match attached {
            Ok(p) => p,
            Err(f) => {
                if let Some(g) = &group {
                    g.remove();
                }
                rootfs.teardown();
                return Err(f);
            }
        };
        let pid = process.pid;
        tracing::info!(pid = pid.as_raw(), container = id, args = ?req.process.args, "process created");
        ctx.containers
            .add(id, rootfs, pid, group, req.seccomp.clone());
        self.phase = Phase::Created(proc_of(process), gate);
        Ok(wire_pid(pid))
    }

    /// `Exec`: runs another process in the newest container, chrooted in
    /// its root, without a hostname change or mounts, answered as `Run`.
    /// A refusal (no container, stopped, id in use) is `Error` alone and
    /// the session stays idle.
    pub(super) fn exec<R: RestoreOps>(
        &mut self,
        req: &ExecRequest,
        ctx: &mut SessionContext<'_, R>,
    ) {
        let target = match ctx.containers.exec_target(&req.id) {
            Ok(t) => t,
            Err(refused) => {
                tracing::info!(exec_id = %req.id, reason = %refused, "exec refused");
                return self.reply(error(refused.kind(), refused.to_string()));
            }
        };
        // runc's `exec --cgroup`: a group below the container's ("" is the container's own,
        // without the fallback); without it, the container's group, or the init's when that
        // one refuses (EBUSY: domain controllers on, processes in sub-groups).
        let (cgroup, fallback) = match (&target.cgroup, req.cgroup.as_deref()) {
            (Some(g), None) => (Some(g.clone()), init_group(g, target.init)),
            (Some(g), Some("")) => (Some(g.clone()), None),
            (Some(g), Some(sub)) => (Some(g.join(sub)), None),
            (None, _) => (None, None),
        };
        let setup = Setup {
            cgroup: cgroup.as_deref(),
            cgroup_fallback: fallback.as_deref(),
            seccomp: target.seccomp.as_ref(),
            ..Setup::new(
                &target.root,
                Role::Exec {
                    init: Some(target.init),
                },
            )
        };
        let spawned = prepare(&setup, &req.process)
            .map_err(Failure::from)
            .and_then(|p| {
                let Prepared { process, gate } = p;
                // A group the child cannot join itself (a test tree of plain files) is
                // joined here, before the go byte; on failure the dropped gate makes the
                // child exit without exec.
                if cgroup.is_none() {
                    ctx.containers
                        .attach(target.container, process.pid)
                        .map_err(Failure::cgroup)?;
                }
                gate.open().map(|()| process).map_err(Failure::from)
            });
        match spawned {
            Ok(process) => {
                let pid = process.pid;
                tracing::info!(
                    pid = pid.as_raw(),
                    container = target.container,
                    exec_id = %req.id,
                    args = ?req.process.args,
                    "exec started"
                );
                ctx.containers.add_exec(target.container, &req.id, pid);
                self.phase = Phase::Running(proc_of(process));
                self.reply(AgentMessage::Started { pid: wire_pid(pid) });
            }
            Err(f) => self.fail_run(f),
        }
    }
}

/// Which mounts and paths the init makes itself: the proc mounts and everything below one.
struct ProcSplit {
    /// The destinations of the proc mounts, without a trailing `/`.
    procs: Vec<String>,
}

impl ProcSplit {
    fn new(mounts: &[Mount]) -> Self {
        Self {
            procs: mounts
                .iter()
                .filter(|m| m.fs_type == "proc")
                .map(|m| m.destination.trim_end_matches('/').to_owned())
                .collect(),
        }
    }

    fn below_proc(&self, path: &str) -> bool {
        self.procs.iter().any(|p| {
            path.strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    fn in_child(&self, m: &Mount) -> bool {
        m.fs_type == "proc" || self.below_proc(m.destination.trim_end_matches('/'))
    }

    /// The paths of `list` the init handles (`child`), or the others.
    fn paths(&self, list: &[String], child: bool) -> Vec<String> {
        list.iter()
            .filter(|p| self.below_proc(p) == child)
            .cloned()
            .collect()
    }
}

/// The group the container's init is in now, when it is below `group` (the container's own
/// directory): where runc's exec goes when the container's group refuses it.
fn init_group(group: &std::path::Path, init: Pid) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{init}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    // The agent sees the whole hierarchy: the group's directory ends with the init's path
    // up to the container's group; what the init's path has beyond it is the sub-group.
    let name = group.file_name()?.to_str()?;
    let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    let at = parts.iter().position(|c| *c == name)?;
    let below = &parts[at + 1..];
    if below.is_empty() || below.contains(&"..") {
        return None;
    }
    Some(group.join(below.join("/")))
}

/// A cgroup2 mount in a container that has a group is a bind mount of that group (with the
/// mount's own flags): the container sees its cgroup as the hierarchy's root, as in runc's
/// cgroup namespace, where a cgroup2 mount made inside the namespace is rooted there.
fn cgroup_view(m: &Mount, group: Option<&crate::cgroup::Group>) -> Mount {
    match group {
        Some(g) if m.fs_type == "cgroup2" => {
            let mut options: Vec<String> = m
                .options
                .iter()
                .filter(|o| !matches!(o.as_str(), "bind" | "rbind"))
                .cloned()
                .collect();
            options.push("bind".into());
            Mount {
                destination: m.destination.clone(),
                fs_type: "bind".into(),
                source: g.path().to_string_lossy().into_owned(),
                options,
            }
        }
        _ => m.clone(),
    }
}
