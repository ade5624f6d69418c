//! The OCI runtime: runc's command-line contract (`create`, `start`, `run`, `state`, `kill`,
//! `delete`, `list`, `ps`, `pause`, `resume`, `spec`, `features`), each container in a VM
//! restored from a template. See docs/runtime.md.

pub mod assets;
pub mod bridge;
mod caches;
pub mod console;
pub mod control;
mod create;
pub mod exec;
pub mod hooks;
pub mod host_cgroup;
pub mod jail;
pub mod log;
pub mod net;
pub mod ps;
pub mod state;
pub mod supervisor;
pub mod template;
pub mod update;
pub mod vm_handle;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use vmm::seccomp::SeccompMode;

use crate::restore_cmd::ModeArg;
use state::{Record, Status, Store};
use supervisor::Launch;

/// runc's global flags (they come before the command, as go-runc passes them).
#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// Directory for the containers' state, private to the caller [default:
    /// /run/kata-snap/containers as root, else $XDG_RUNTIME_DIR/kata-snap/containers].
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Append errors (and the VMM's log) to this file instead of stderr only.
    #[arg(long, global = true, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Format of --log: text or json.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: log::LogFormat,
    /// Debug logging (as --log-level debug).
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for runc compatibility: cgroups belong to the VM, not to the host.
    #[arg(long, global = true, hide = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility (ignored).
    #[arg(long, global = true, hide = true, value_name = "PATH")]
    pub criu: Option<PathBuf>,
}

impl GlobalOpts {
    fn root(&self) -> Result<PathBuf> {
        match &self.root {
            Some(r) => Ok(r.clone()),
            None => assets::default_root(),
        }
    }
}

/// `create` flags (also `run`'s).
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The bundle directory (config.json and the rootfs) [default: the current directory].
    #[arg(long, short = 'b', value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// A Unix socket that receives the terminal's master (SCM_RIGHTS) when config.json asks
    /// for a terminal.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Write the container's pid (the VMM process) to this file.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility (the VM has its own root).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Pass N more descriptors (3..3+N) to the process: not possible into a VM, only 0.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preserve_fds: u32,
    /// How guest memory comes back from the template [default: mmap-prefetch of the template's
    /// working set once one is recorded (the template's first container records it, in uffd
    /// mode), mmap until then].
    #[arg(long, value_enum, hide = true)]
    pub restore_mode: Option<ModeArg>,
    /// Never restore in a pre-started VMM of a running pool (`kata-snap pool start`).
    #[arg(long, hide = true)]
    pub no_pool: bool,
    /// The container id.
    pub id: String,
}

/// `run` flags.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Return once the process runs instead of waiting for it.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Accepted for runc compatibility (the state is deleted when the container exits unless
    /// --keep).
    #[arg(long)]
    pub no_subreaper: bool,
    /// Keep the container's state after it exits (then `delete` it).
    #[arg(long)]
    pub keep: bool,
}

/// The OCI runtime's commands.
#[derive(Debug, Subcommand)]
pub enum OciCommand {
    /// Create a container: restore a VM from the template (warming it on first use), give it
    /// the bundle's rootfs, prepare the process; `start` runs it. Prints nothing; the container's
    /// pid (the VMM process) goes to --pid-file.
    Create(CreateArgs),
    /// Run the process of a created container.
    Start {
        /// The container id.
        id: String,
    },
    /// Create and start a container and wait for it: exits with its status (128+N for signal
    /// N), as `runc run` does.
    Run(RunArgs),
    /// Run one more process in a running container (runc's `exec`): exits with its status, or
    /// with --detach once it runs. A failure before it runs is `exec failed: ...`, status 255.
    Exec(Box<exec::ExecArgs>),
    /// Change the container's resource limits (its cgroup in the VM), as `runc update`.
    Update(Box<update::UpdateArgs>),
    /// Print the container's stats (--stats) or stats and OOM events until it stops, as
    /// `runc events`.
    Events(update::EventsArgs),
    /// Refused: checkpoint/restore is not supported by kata-snap.
    Checkpoint(update::CheckpointArgs),
    /// Print a container's state as OCI state JSON.
    State {
        /// The container id.
        id: String,
    },
    /// Send a signal (name or number, default TERM) to the container's process.
    Kill {
        /// Send it to every process of the container (there is one: the VM's).
        #[arg(long, short = 'a')]
        all: bool,
        /// The container id.
        id: String,
        /// The signal: a name (TERM, SIGTERM) or a number.
        signal: Option<String>,
    },
    /// Delete a stopped (or created) container and everything it left.
    Delete {
        /// Kill it first if it is running.
        #[arg(long, short = 'f')]
        force: bool,
        /// The container id.
        id: String,
    },
    /// List containers.
    List {
        /// table or json.
        #[arg(long, short = 'f', default_value = "table", value_parser = ["table", "json"])]
        format: String,
        /// Only the ids.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// List the container's host processes (its VMM), as runc does: `ps` (default `-ef`, or
    /// the arguments after the id) filtered to them, or their pids as JSON.
    Ps {
        /// table or json.
        #[arg(long, short = 'f', default_value = "table", value_parser = ["table", "json"])]
        format: String,
        /// The container id.
        id: String,
        /// Arguments for ps(1) [default: -ef].
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Pause the container's VM.
    Pause {
        /// The container id.
        id: String,
    },
    /// Resume the container's VM.
    Resume {
        /// The container id.
        id: String,
    },
    /// Write a config.json for a new bundle (runc's default, with the mounts kata-snap makes).
    Spec {
        /// The bundle directory to write it in.
        #[arg(long, short = 'b', value_name = "DIR")]
        bundle: Option<PathBuf>,
        /// Accepted for runc compatibility: the spec is the same.
        #[arg(long)]
        rootless: bool,
    },
    /// Print what this runtime supports, as `runc features` does (JSON).
    Features,
    /// The VM templates: list, warm ahead of time, remove.
    Template(caches::TemplateArgs),
    /// The rootfs images (erofs, one per distinct rootfs): list, remove, prune.
    Image(caches::ImageArgs),
    /// The supervisor of one container (started by `create`).
    #[command(name = "_supervise", hide = true)]
    Supervise {
        /// The socket `create` waits on.
        #[arg(long)]
        sync_fd: i32,
    },
    /// The supervisor of one detached exec (started by `exec --detach`).
    #[command(name = "_exec-supervise", hide = true)]
    ExecSupervise {
        /// The socket `exec` waits on.
        #[arg(long)]
        sync_fd: i32,
    },
}

impl OciCommand {
    /// For a command whose process becomes a container's supervisor (`_supervise`, `run` in
    /// the foreground), the inherited descriptors it keeps (the sync socket); the others are
    /// closed at its start (a container takes none: `--preserve-fds` is refused).
    pub fn keeps_inherited_fds(&self) -> Option<Vec<i32>> {
        match self {
            OciCommand::Supervise { sync_fd } => Some(vec![*sync_fd]),
            OciCommand::Run(args) if !args.detach => Some(vec![]),
            _ => None,
        }
    }

    /// The command only prints (no socket, child or VM of its own).
    pub fn only_prints(&self) -> bool {
        matches!(
            self,
            OciCommand::State { .. }
                | OciCommand::List { .. }
                | OciCommand::Ps { .. }
                | OciCommand::Spec { .. }
                | OciCommand::Features
        )
    }
}

/// Runs an OCI command; errors are reported as runc reports them and give exit status 1.
pub fn run(cmd: OciCommand, global: &GlobalOpts, seccomp: SeccompMode, start: Instant) -> i32 {
    match dispatch(cmd, global, seccomp, start) {
        Ok(code) => code,
        Err(e) => {
            log::error(&crate::error_line(&e));
            1
        }
    }
}

fn dispatch(cmd: OciCommand, g: &GlobalOpts, seccomp: SeccompMode, t0: Instant) -> Result<i32> {
    let store = || Store::lookup(g.root());
    match cmd {
        OciCommand::Create(args) => create::create(g, args, seccomp, t0, create::Mode::Create),
        OciCommand::Run(args) => {
            let mode = if args.detach {
                create::Mode::RunDetached
            } else {
                create::Mode::RunForeground { keep: args.keep }
            };
            create::create(g, args.create, seccomp, t0, mode)
        }
        OciCommand::Start { id } => start(&store(), &id).map(|()| 0),
        OciCommand::Exec(args) => match exec::exec(g, *args, seccomp) {
            Ok(code) => Ok(code),
            Err(e) => {
                log::error(&format!("exec failed: {}", crate::error_line(&e)));
                Ok(exec::EXEC_FAILED)
            }
        },
        OciCommand::Update(args) => update::update(g, *args).map(|()| 0),
        OciCommand::Events(args) => update::events(g, args),
        OciCommand::Checkpoint(_) => update::checkpoint(),
        OciCommand::ExecSupervise { sync_fd } => exec::supervise(supervisor::sync_socket(sync_fd)?),
        OciCommand::State { id } => {
            let r = store().load(&id)?;
            println!("{}", serde_json::to_string_pretty(&r.oci_state())?);
            Ok(0)
        }
        OciCommand::Kill { all, id, signal } => {
            kill(&store(), &id, signal.as_deref().unwrap_or("TERM"), all).map(|()| 0)
        }
        OciCommand::Delete { force, id } => delete(&store(), &id, force).map(|()| 0),
        OciCommand::List { format, quiet } => list(&store(), &format, quiet).map(|()| 0),
        OciCommand::Ps {
            format,
            id,
            ps_args,
        } => {
            let store = store();
            let r = store.load(&id)?;
            let running = r.current_status() != Status::Stopped;
            if format == "json" {
                // The container's process on the host: the VM's (engines run host tools on it).
                let pids: Vec<i32> = if running { vec![r.pid] } else { vec![] };
                println!("{}", serde_json::to_string(&pids)?);
                return Ok(0);
            }
            let shape = ps::shape(&ps_args)?;
            if !running {
                println!("{}", ps::header(shape));
                return Ok(0);
            }
            if r.current_status() == Status::Paused {
                bail!("container {id} is paused: its VM cannot answer (resume it first)");
            }
            let procs = exec::connect(&store.dir(&id))?
                .processes()
                .map_err(update::agent_error)?;
            print!("{}", ps::table(shape, &procs, ps::now(), &ps::host_user));
            Ok(0)
        }
        OciCommand::Pause { id } => {
            let store = store();
            call(&store, &store.load(&id)?, control::Request::Pause).map(|()| 0)
        }
        OciCommand::Resume { id } => {
            let store = store();
            call(&store, &store.load(&id)?, control::Request::Resume).map(|()| 0)
        }
        OciCommand::Spec {
            bundle,
            rootless: _,
        } => {
            let dir = bundle.unwrap_or_else(|| PathBuf::from("."));
            let path = dir.join("config.json");
            if path.exists() {
                bail!("File {} exists. Remove it first", path.display());
            }
            let text = serde_json::to_vec_pretty(&oci_bundle::default_spec())?;
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(0)
        }
        OciCommand::Features => {
            println!("{}", serde_json::to_string_pretty(&oci_bundle::features())?);
            Ok(0)
        }
        OciCommand::Template(t) => caches::template_cmd(t.command, seccomp),
        OciCommand::Image(i) => caches::image_cmd(i.command),
        OciCommand::Supervise { sync_fd } => {
            let mut sync = supervisor::sync_socket(sync_fd)?;
            let mut text = String::new();
            (&mut sync)
                .take(16 << 20)
                .read_to_string(&mut text)
                .context("cannot read the launch from create")?;
            let launch: Launch = serde_json::from_str(&text).context("bad launch from create")?;
            Ok(supervisor::supervise(launch, Some(sync), t0, seccomp))
        }
    }
}

/// Reads a small regular file without blocking on a FIFO; a file over `max` bytes is refused.
pub(crate) fn read_small_file(path: &Path, max: u64) -> Result<String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if !f.metadata()?.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mut s = String::new();
    f.take(max + 1)
        .read_to_string(&mut s)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if s.len() as u64 > max {
        bail!("{} is larger than {max} bytes", path.display());
    }
    Ok(s)
}

/// Writes `bytes` to `path` (mode 0644) through a temporary name in the same directory: written,
/// fsynced, renamed, then the directory fsynced, so a reader sees the old file or the new one
/// and a crash loses neither. The temporary is a new file (`O_EXCL|O_NOFOLLOW`, a name not
/// used before): nothing planted under its name (a symbolic link, a FIFO) is written through.
pub(crate) fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let res = (|| -> std::io::Result<()> {
        let (tmp, mut f) = {
            let mut attempt = 0;
            loop {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = dir.join(format!(
                    ".{name}.{}.{serial}.{nanos:08x}",
                    std::process::id()
                ));
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&tmp)
                {
                    Ok(f) => break (tmp, f),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                        attempt += 1
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let written = (|| {
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::File::open(dir)?.sync_all()
    })();
    res.with_context(|| format!("cannot write {}", path.display()))
}

fn start(store: &Store, id: &str) -> Result<()> {
    let r = store.load(id)?;
    match r.current_status() {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped"),
        Status::Running => bail!("cannot start an already running container"),
        s => bail!("cannot start a container in the {} state", s.as_str()),
    }
    // On the host, before the process runs (runc runs them in the container: here that is
    // the guest, where their programs are not).
    hooks::run_all(
        r.hooks
            .start_container
            .iter()
            .map(|h| ("startContainer", h)),
        &hooks::HookState::new(&r, "created", r.pid),
        None,
    )?;
    call(store, &r, control::Request::Start)?;
    hooks::run_all_warn(
        "poststart",
        &r.hooks.poststart,
        &hooks::HookState::new(&r, "running", r.pid),
        None,
    );
    Ok(())
}

/// The `poststop` hooks of container `r`, once its VM is gone; failures are warnings.
fn poststop(r: &Record) {
    hooks::run_all_warn(
        "poststop",
        &r.hooks.poststop,
        &hooks::HookState::new(r, "stopped", 0),
        None,
    );
}

/// Sends `req` to the supervisor of the container `r`.
fn call(store: &Store, r: &Record, req: control::Request) -> Result<()> {
    if r.current_status() == Status::Stopped {
        bail!("container not running");
    }
    match control::call(&store.dir(&r.id), req, Duration::from_secs(120))? {
        control::Reply::Ok => Ok(()),
        control::Reply::Err(e) => bail!("{e}"),
    }
}

/// runc's signal parsing: a number, or a name with or without `SIG`, any case.
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal: {s}");
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| anyhow::anyhow!("unknown signal {s:?}"))
}

fn kill(store: &Store, id: &str, signal: &str, all: bool) -> Result<()> {
    // Signal 0 asks only whether the container runs, as kill(2) does (runc passes it on).
    let sig = if signal == "0" {
        0
    } else {
        parse_signal(signal)?
    };
    let r = store.load(id)?;
    if r.current_status() == Status::Stopped {
        // runc: `--all` signals every process left in the container's cgroup, none once it
        // stopped, and succeeds.
        if all {
            return Ok(());
        }
        bail!("container not running");
    }
    // The supervisor forwards what it can catch to the process in the guest; SIGKILL ends it,
    // and so the VM. Only the process the record names, with its start time.
    if !state::signal_process(r.pid, r.pid_start, sig).context("kill")? {
        bail!("container not running");
    }
    Ok(())
}

fn delete(store: &Store, id: &str, force: bool) -> Result<()> {
    let r = match store.load(id) {
        Ok(r) => r,
        // runc --force succeeds on a missing container, cleaning up what it can: here also
        // whatever is in the place of one whose record cannot be read (a FIFO, a symbolic link,
        // garbage), without signalling anything.
        Err(_) if force => {
            state::validate_id(id)?;
            return store.remove(id);
        }
        Err(e) => return Err(e),
    };
    let remove_cgroup = |r: &Record| {
        if let Some(dir) = &r.cgroup
            && let Err(e) = host_cgroup::remove(dir)
        {
            tracing::warn!("{e:#}");
        }
    };
    match r.current_status() {
        Status::Stopped => {}
        // runc deletes a created container without --force.
        Status::Created | Status::Creating => kill_and_wait(&r)?,
        s if force => {
            let _ = s;
            kill_and_wait(&r)?
        }
        s => bail!(
            "cannot delete container {id} that is not stopped: {}",
            s.as_str()
        ),
    }
    remove_cgroup(&r);
    net::release(r.netns.as_deref());
    poststop(&r);
    store.remove(id)
}

fn kill_and_wait(r: &Record) -> Result<()> {
    // Only the process the record names, with its start time (gone already: nothing to wait
    // for).
    if !state::signal_process(r.pid, r.pid_start, libc::SIGKILL)? {
        return Ok(());
    }
    let end = Instant::now() + Duration::from_secs(10);
    while state::process_alive(r.pid, r.pid_start) {
        if Instant::now() > end {
            bail!(
                "container {} (pid {}) did not die after SIGKILL",
                r.id,
                r.pid
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn owner_name(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(dir) else {
        return String::new();
    };
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(m.uid()))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("#{}", m.uid()))
}

fn list(store: &Store, format: &str, quiet: bool) -> Result<()> {
    let records = store.list()?;
    if quiet {
        for r in &records {
            println!("{}", r.id);
        }
        return Ok(());
    }
    if format == "json" {
        // runc's field order (ociVersion, id, pid, status, ...): a struct, not a sorted map.
        let owners: Vec<String> = records
            .iter()
            .map(|r| owner_name(&store.dir(&r.id)))
            .collect();
        let states: Vec<state::OciState<'_>> = records
            .iter()
            .zip(&owners)
            .map(|(r, o)| r.oci_state().with_owner(o))
            .collect();
        // runc prints `null` for no containers.
        if states.is_empty() {
            println!("null");
        } else {
            println!("{}", serde_json::to_string(&states)?);
        }
        return Ok(());
    }
    let mut rows = vec![[
        "ID".to_string(),
        "PID".into(),
        "STATUS".into(),
        "BUNDLE".into(),
        "CREATED".into(),
        "OWNER".into(),
    ]];
    for r in &records {
        let s = r.oci_state();
        let v = serde_json::to_value(&s)?;
        rows.push([
            r.id.clone(),
            v["pid"].to_string(),
            v["status"].as_str().unwrap_or_default().into(),
            r.bundle.display().to_string(),
            r.created.clone(),
            owner_name(&store.dir(&r.id)),
        ]);
    }
    // runc's tabwriter: cells padded by 3, at least 12 wide.
    let widths: Vec<usize> = (0..6)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len() + 3)
                .max()
                .unwrap_or(0)
                .max(12)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c == 5 {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}", w = widths[c]));
            }
        }
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_signals_parse_as_runc_parses_them() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), libc::SIGUSR1);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
    }
}
