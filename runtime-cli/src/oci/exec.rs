//! `exec`: one more process in a running container, with runc's contract.
//!
//! The process runs in the container's VM beside its init: `kata-snap exec` connects to the VM's
//! vsock socket (`ROOT/ID/v.sock`, one agent connection per exec), sends `Exec`, and bridges the
//! process's stdio, terminal, signals and exit status as the container's supervisor does for
//! init ([`super::bridge`]). In the foreground that is the `exec` command itself, which exits with
//! the process's status. With `--detach` it is `kata-snap _exec-supervise`, started in a session of
//! its own: `exec` waits until the process runs, writes `--pid-file` (the exec supervisor's pid,
//! which is what an engine signals and reaps) and exits 0.
//!
//! As with runc, the process is the bundle's `process` with the command line's changes (argv,
//! `--env` appended, `--cwd`, `--user`, `--tty`...) unless `--process FILE` gives it whole; a
//! failure before it runs is `exec failed: ...` with exit status 255.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_protocol::{
    AGENT_VSOCK_PORT, AgentClient, AgentMessage, ErrorKind, ExecRequest, HostMessage, Process,
    Validate,
};
use anyhow::{Context, Result, bail};
use clap::Args;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signalfd::SignalFd;
use serde::{Deserialize, Serialize};
use vmm::seccomp::SeccompMode;

use super::GlobalOpts;
use super::bridge::{AgentEvent, Bridge, BridgeError, HostStdio};
use super::control;
use super::state::{Status, Store};
use super::supervisor::{Created, VSOCK, forwarding_signalfd, send_created, vsock_connect};

/// Exit status of `exec` when the process could not be run (runc's).
pub const EXEC_FAILED: i32 = 255;
/// Exit status when the VM went away under a running exec: its process was killed with it.
const KILLED: i32 = 128 + libc::SIGKILL;
/// Bound on reaching the agent and on each of its answers before the process runs.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// `exec` flags, runc's.
#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// A Unix socket that receives the terminal's master (SCM_RIGHTS) with --tty.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Working directory of the process, in the container.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Set an environment variable (KEY=VALUE; repeatable), after the bundle's.
    #[arg(long, short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Give the process a terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Run as UID[:GID] (numbers).
    #[arg(long, short = 'u', value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// More groups for the process (repeatable).
    #[arg(long, short = 'g', value_name = "GID")]
    pub additional_gids: Vec<u32>,
    /// The process as an OCI process JSON (process.json), instead of the bundle's with the
    /// command line's changes.
    #[arg(long, short = 'p', value_name = "FILE")]
    pub process: Option<PathBuf>,
    /// Return once the process runs; a supervisor of its own bridges it until it exits.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Write the pid of the process's host side (its supervisor) to this file.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Set PR_SET_NO_NEW_PRIVS for the process.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Exec even when the container is paused (the process starts once it resumes).
    #[arg(long)]
    pub ignore_paused: bool,
    /// Pass N more descriptors: not possible into a VM, only 0.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preserve_fds: u32,
    /// Add a capability (CAP_NAME) to the process's bounding, effective and permitted sets
    /// (and ambient when it has inheritable ones), as runc does (repeatable).
    #[arg(long, short = 'c', value_name = "CAP")]
    pub cap: Vec<String>,
    /// Accepted for runc compatibility (no LSM in the guest).
    #[arg(long, hide = true)]
    pub apparmor: Option<String>,
    /// Accepted for runc compatibility (no LSM in the guest).
    #[arg(long, hide = true)]
    pub process_label: Option<String>,
    /// Run the process in a group below the container's, in its VM (`[CONTROLLERS:]PATH`,
    /// runc's `--cgroup`; cgroup v2: the path alone counts, `/` is the container's own).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Vec<String>,
    /// The container id.
    pub id: String,
    /// The command and its arguments (unless --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// What the exec's supervisor needs, decided by `exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecPlan {
    /// The container's directory (its vsock socket is there).
    pub dir: PathBuf,
    /// The process.
    pub request: ExecRequest,
    /// Where the terminal's master goes (with a terminal).
    pub console_socket: Option<PathBuf>,
    /// The terminal's size (rows, cols) from process.json.
    pub console_size: Option<(u16, u16)>,
}

/// `kata-snap exec`: the process's exit status, or `Err` when it could not run (reported by the
/// caller as runc does: `exec failed: ...`, 255).
pub(super) fn exec(g: &GlobalOpts, args: ExecArgs, seccomp: SeccompMode) -> Result<i32> {
    if args.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: descriptors cannot be passed into a VM",
            args.preserve_fds
        );
    }
    if args.process.is_none() && args.command.is_empty() {
        bail!("exec: no command given (ARGS or --process)");
    }
    let store = Store::lookup(g.root());
    let record = store.load(&args.id)?;
    match record.current_status() {
        Status::Stopped => bail!("cannot exec in a stopped container"),
        Status::Paused if !args.ignore_paused => {
            bail!("cannot exec in a paused container (use --ignore-paused to override)")
        }
        _ => {}
    }
    let (process, console_size) = exec_process(&record.bundle, &args)?;
    if process.terminal && args.detach && args.console_socket.is_none() {
        bail!("cannot allocate tty if kata-snap will detach without setting console socket");
    }
    if !process.terminal && args.console_socket.is_some() {
        bail!("cannot use console socket if kata-snap will not detach or allocate tty");
    }
    let mut process = process;
    // runc clears ONLCR on the terminal it reads in the foreground.
    process.clear_onlcr = process.terminal && !args.detach && args.console_socket.is_none();
    // runc sizes the terminal before the process starts (process.json's consoleSize).
    if process.terminal {
        process.console_size = console_size;
    }
    let request = ExecRequest {
        id: exec_id(),
        process,
        cgroup: sub_cgroup(&args.cgroup)?,
    };
    request.validate().context("invalid process")?;
    let plan = ExecPlan {
        dir: store.dir(&args.id),
        request,
        console_socket: args.console_socket.clone(),
        console_size,
    };
    if !args.detach {
        if let Some(p) = &args.pid_file {
            super::create::write_pid_file(p, std::process::id() as i32)?;
        }
        return run(&plan, None);
    }
    let pid = spawn(g, &plan, seccomp)?;
    if let Some(p) = &args.pid_file {
        super::create::write_pid_file(p, pid)?;
    }
    Ok(0)
}

/// The process: `--process FILE` whole, or the bundle's with the command line's changes.
fn exec_process(bundle: &Path, args: &ExecArgs) -> Result<(Process, Option<(u16, u16)>)> {
    let load_bundle = || {
        oci_bundle::load(bundle)
            .context("cannot read the container's bundle for the process defaults")
    };
    let config = match &args.process {
        Some(file) => {
            let mut p = oci_bundle::load_process(file)?;
            // runc: a process file without capabilities gets the container's.
            if p.capabilities.is_none() {
                p.capabilities = load_bundle()?.config.process.capabilities;
            }
            p
        }
        None => {
            let mut p = load_bundle()?.config.process;
            p.args = args.command.clone();
            // runc: the exec's terminal is what --tty says, not the bundle's.
            p.terminal = false;
            p.console_size = None;
            p
        }
    };
    let mut p = config.agent_process();
    if args.tty {
        p.terminal = true;
    }
    p.env.extend(args.env.iter().cloned());
    if let Some(cwd) = &args.cwd {
        p.cwd = cwd.clone();
    }
    if let Some(u) = &args.user {
        let (uid, gid) = match u.split_once(':') {
            Some((uid, gid)) => (uid, Some(gid)),
            None => (u.as_str(), None),
        };
        p.user.uid = uid
            .parse()
            .with_context(|| format!("--user {u}: the uid is not a number"))?;
        if let Some(gid) = gid {
            p.user.gid = gid
                .parse()
                .with_context(|| format!("--user {u}: the gid is not a number"))?;
        }
    }
    p.user
        .additional_gids
        .extend(args.additional_gids.iter().copied());
    if args.no_new_privs {
        p.no_new_privileges = true;
    }
    add_caps(&mut p, &args.cap)?;
    Ok((p, config.console_size.map(|c| (c.rows, c.cols))))
}

/// `exec --cap NAME`: runc adds each to the bounding, effective and permitted sets, and to the
/// ambient set when the process has inheritable capabilities (ambient needs them). A process
/// without configured capabilities keeps all of them, so there is nothing to add.
fn add_caps(p: &mut Process, names: &[String]) -> Result<()> {
    for name in names {
        let bit = oci_bundle::capability_number(name)
            .with_context(|| format!("--cap {name}: unknown capability"))?;
        if let Some(c) = p.capabilities.as_mut() {
            let m = 1u64 << bit;
            c.bounding |= m;
            c.effective |= m;
            c.permitted |= m;
            if c.inheritable != 0 {
                c.ambient |= m;
            }
        }
    }
    Ok(())
}

/// `exec --cgroup` as runc 1.1 reads it on cgroup v2: `[CONTROLLERS:]PATH`, the last one
/// given; the path is below the container's group (`/` or empty: the container's own, which
/// turns off the fall-back to the init's group). `None` without the flag.
fn sub_cgroup(given: &[String]) -> Result<Option<String>> {
    let Some(last) = given.last() else {
        return Ok(None);
    };
    let path = last.split_once(':').map_or(last.as_str(), |(_, p)| p);
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        bail!("{path} is not a sub cgroup path");
    }
    let sub = parts.join("/");
    if !sub.is_empty() {
        agent_protocol::validate::validate_sub_cgroup(&sub)
            .with_context(|| format!("{path} is not a sub cgroup path"))?;
    }
    Ok(Some(sub))
}

/// An id for the exec, unique among the container's running execs.
fn exec_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("exec-{}-{nanos:08x}", std::process::id())
}

/// Starts `kata-snap _exec-supervise` in a session of its own (stdio inherited: the process's),
/// hands it the plan and waits until the process runs; returns the supervisor's pid.
fn spawn(g: &GlobalOpts, plan: &ExecPlan, seccomp: SeccompMode) -> Result<i32> {
    let mut cmd = super::create::self_command(g, seccomp)?;
    let sync = super::create::SyncPair::new()?;
    cmd.arg("_exec-supervise")
        .arg("--sync-fd")
        .arg(sync.child_fd().to_string());
    // A session of its own: the engine's terminal signals are not its, and a terminal from
    // --console-socket can become its controlling terminal (resizes arrive as SIGWINCH).
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid().map(|_| ()).map_err(Into::into)
        });
    }
    sync.hand_over(cmd, &serde_json::to_vec(plan)?, "the exec's supervisor")
}

/// `_exec-supervise`: reads the plan from `exec` over `sync` and runs the process.
pub(super) fn supervise(mut sync: UnixStream) -> Result<i32> {
    let mut text = String::new();
    (&mut sync)
        .take(16 << 20)
        .read_to_string(&mut text)
        .context("cannot read the plan from exec")?;
    let plan: ExecPlan = serde_json::from_str(&text).context("bad plan from exec")?;
    run(&plan, Some(sync))
}

/// Runs the process and bridges it until it exits; returns its exit status. Before it runs,
/// failures are `Err` (or, for a detached exec, reported over `sync` and exit status 255).
fn run(plan: &ExecPlan, mut sync: Option<UnixStream>) -> Result<i32> {
    let started = start(plan);
    let (bridge, signals) = match started {
        Ok(s) => s,
        Err(e) => {
            if let Some(s) = sync.as_mut() {
                let _ = send_created(s, Created::Err(crate::error_line(&e)));
                return Ok(EXEC_FAILED);
            }
            return Err(e);
        }
    };
    if let Some(s) = sync.as_mut() {
        let _ = send_created(s, Created::Ok(std::process::id() as i32));
    }
    drop(sync);
    Ok(bridge_loop(bridge, &signals))
}

/// Connects to the agent, sends `Exec` and waits until the process runs.
fn start(plan: &ExecPlan) -> Result<(Bridge, SignalFd)> {
    // Before anything else, so that no signal for the process is lost in between.
    let signals = forwarding_signalfd()?;
    let mut agent = connect(&plan.dir)?;
    let stdio = HostStdio::new(
        plan.request.process.terminal,
        plan.console_socket.as_deref(),
        plan.console_size,
    )?;
    agent.send(&HostMessage::Exec(Box::new(plan.request.clone())))?;
    let pid = match agent.recv()? {
        AgentMessage::Started { pid } => pid,
        // The container is gone or not there yet (the agent's words are runc's).
        AgentMessage::Error {
            kind: ErrorKind::NoContainer | ErrorKind::ContainerStopped,
            message,
        } => bail!("{message}"),
        AgentMessage::Error { message, .. } => {
            // For a process that could not exec, `Exited{126|127}` follows: nothing to wait for.
            bail!("unable to start container process: {message}")
        }
        other => bail!("unexpected answer from the agent: {other:?}"),
    };
    tracing::debug!("exec {} runs, guest pid {pid}", plan.request.id);
    let mut bridge = Bridge::new(agent.try_clone_stream()?, stdio)?;
    drop(agent);
    bridge.set_started();
    let size = match (bridge.terminal(), &plan.console_socket) {
        (Some(t), None) => t.size(),
        _ => plan.console_size,
    };
    if let Some((rows, cols)) = size {
        bridge.send(&HostMessage::Resize { rows, cols });
    }
    Ok((bridge, signals))
}

/// Reaches the agent through the container's vsock socket. The VMM answers a CONNECT only
/// while the guest is responsive, so a refused one is tried again for a while.
pub(super) fn connect(dir: &Path) -> Result<AgentClient<UnixStream>> {
    let end = Instant::now() + AGENT_TIMEOUT;
    loop {
        let attempt = control::connect_in(dir, VSOCK)
            .and_then(|s| vsock_connect(s, AGENT_VSOCK_PORT))
            .and_then(|s| {
                AgentClient::handshake(s, AGENT_TIMEOUT).context("Hello with the agent failed")
            });
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= end => {
                return Err(e.context("cannot reach the container's agent"));
            }
            Err(e) => tracing::debug!("agent not reached yet: {e:#}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bridges the running process until it exits; returns its status.
fn bridge_loop(mut bridge: Bridge, signals: &SignalFd) -> i32 {
    loop {
        if let Some(code) = bridge.exit() {
            return code;
        }
        let mut fds = vec![
            bridge.agent_fd(),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(fd) = bridge.input_fd() {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!("poll: {e}");
                return EXEC_FAILED;
            }
        }
        let revents: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(fds);
        if !revents[0].is_empty() {
            match bridge.on_agent(revents[0]) {
                Ok(events) => {
                    for ev in events {
                        if let AgentEvent::Error(kind, message) = ev {
                            tracing::warn!("agent: {kind:?}: {message}");
                        }
                    }
                }
                // The container (its VM) is gone, and the process with it.
                Err(BridgeError::Closed) => {
                    tracing::debug!("the container's VM went away under the exec");
                    return KILLED;
                }
                Err(e) => {
                    tracing::error!("{e}");
                    return EXEC_FAILED;
                }
            }
        }
        if !revents[1].is_empty() {
            while let Ok(Some(info)) = signals.read_signal() {
                bridge.forward_signal(info.ssi_signo as i32);
            }
        }
        if revents.get(2).is_some_and(|r| !r.is_empty()) {
            bridge.on_input();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(caps: Option<agent_protocol::Capabilities>) -> Process {
        Process {
            args: vec!["sh".into()],
            env: vec![],
            cwd: "/".into(),
            user: agent_protocol::User {
                uid: 0,
                gid: 0,
                additional_gids: vec![],
            },
            rlimits: vec![],
            terminal: false,
            no_new_privileges: false,
            umask: None,
            capabilities: caps,
            clear_onlcr: false,
            console_size: None,
        }
    }

    #[test]
    fn test_exec_cgroup_flag_read_as_runc_v2() {
        let sub = |v: &[&str]| sub_cgroup(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(sub(&[]).unwrap(), None);
        assert_eq!(sub(&["/"]).unwrap().as_deref(), Some(""));
        assert_eq!(sub(&["foobar"]).unwrap().as_deref(), Some("foobar"));
        assert_eq!(sub(&["/a/b/"]).unwrap().as_deref(), Some("a/b"));
        // A controller prefix is v1's; on v2 the path alone counts. The last flag wins.
        assert_eq!(
            sub(&["x", "memory:second"]).unwrap().as_deref(),
            Some("second")
        );
        for bad in ["..", "a/../..", "cpu:../x"] {
            let e = format!("{:#}", sub(&[bad]).unwrap_err());
            assert!(e.contains("is not a sub cgroup path"), "{bad}: {e}");
        }
    }

    #[test]
    fn test_exec_cap_added_as_runc_adds_it() {
        let kill = 1u64 << 5;
        let base = agent_protocol::Capabilities {
            bounding: kill,
            effective: kill,
            permitted: kill,
            inheritable: 0,
            ambient: 0,
        };
        let mut p = process(Some(base));
        add_caps(&mut p, &["CAP_SYS_ADMIN".into()]).unwrap();
        let admin = 1u64 << 21;
        let c = p.capabilities.unwrap();
        assert_eq!(
            (c.bounding, c.effective, c.permitted),
            (kill | admin, kill | admin, kill | admin)
        );
        // No inheritable set: ambient stays empty (it could not be raised).
        assert_eq!((c.inheritable, c.ambient), (0, 0));
        let mut p = process(Some(agent_protocol::Capabilities {
            inheritable: kill,
            ..base
        }));
        add_caps(&mut p, &["CAP_SYS_ADMIN".into()]).unwrap();
        assert_eq!(p.capabilities.unwrap().ambient, admin);
        let e = add_caps(&mut p, &["CAP_BOGUS".into()]).unwrap_err();
        assert!(e.to_string().contains("CAP_BOGUS"), "{e}");
        // A process with every capability has nothing to add.
        let mut p = process(None);
        add_caps(&mut p, &["CAP_SYS_ADMIN".into()]).unwrap();
        assert_eq!(p.capabilities, None);
    }
}
