//! The supervisor: the process a container engine sees as the container's. It holds the VM
//! (restored from the template, the rootfs image in its spare disk slot), talks to the agent in
//! it, and bridges the process's stdio, terminal, signals and exit status.
//!
//! One thread drives everything here with `poll(2)`: the agent's connection, stdin (or the
//! terminal), a signalfd, the control socket (`start`, `pause`, `resume` from other `kata-snap`
//! commands) and a pipe that says the VM stopped. The VM's own threads (vCPUs, the VMM thread
//! with its io_uring loop) run beside it.
//!
//! Signals: every catchable signal is blocked and read from the signalfd. Once the process runs,
//! each is sent to it in the guest (SIGWINCH becomes a terminal resize, SIGCHLD and SIGPIPE are
//! not forwarded); before `start`, a terminating signal ends the container. SIGKILL kills this
//! process and so the VM, which is what `kill -9` of a container must do; the engine then reaps
//! 137 as for runc. The exit status is the process's: its code, or 128+N for signal N.

use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_protocol::{AGENT_VSOCK_PORT, AgentClient, ClientError, HostMessage, RunRequest};
use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde::{Deserialize, Serialize};
use vmm::seccomp::SeccompMode;

use super::bridge::{AgentEvent, Bridge, HostStdio};
use super::control::{self, Reply, Request};
use super::state::{Record, Status, process_start_time, write_record};
use super::vm_handle::ContainerVm;
use crate::restore_cmd::{ModeArg, RestoreArgs};

/// The VM's vsock host socket, relative to the container's directory (the supervisor's cwd:
/// socket paths are limited to 107 bytes, and state roots can be deep).
pub const VSOCK: &str = "v.sock";
/// The guest console log in the container's directory.
pub const CONSOLE_LOG: &str = "console.log";
/// Most bytes of guest console kept per container (the guest runs `quiet`; more is a guest
/// flooding its console).
const CONSOLE_LOG_MAX: u64 = 1 << 20;
/// Bound on reaching the agent after the restore.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one agent answer during set-up.
const AGENT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Exit status when the VM ends before the process reports its exit (a guest crash).
const VM_LOST: i32 = 255;

/// Everything the supervisor needs, decided by `create` or `run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    /// The container's directory.
    pub dir: PathBuf,
    /// The record as `create` wrote it.
    pub record: Record,
    /// The template's snapshot.
    pub snapshot: PathBuf,
    /// How guest memory comes back (None: chosen by the template's working set).
    pub mode: Option<ModeArg>,
    /// The template's directory.
    pub template: PathBuf,
    /// The rootfs image for the template's spare slot.
    pub image: PathBuf,
    /// The process.
    pub request: RunRequest,
    /// Where to send the terminal's master (`--console-socket`).
    pub console_socket: Option<PathBuf>,
    /// The terminal size from config.json (rows, cols).
    pub console_size: Option<(u16, u16)>,
    /// `run` in the foreground: start at once; a terminal is the supervisor's own stdin.
    pub foreground: bool,
    /// Restore in a pre-started VMM when a pool of the template's shape runs.
    pub use_pool: bool,
    /// The host cgroup the VM goes in (`linux.cgroupsPath`).
    #[serde(default)]
    pub cgroup: Option<super::host_cgroup::Placement>,
    /// The jail's settings (none: no jail).
    #[serde(default)]
    pub jail: Option<super::jail::Settings>,
    /// The network namespace whose interface the guest takes (`linux.namespaces`, Docker, CNI,
    /// Kubernetes); none: loopback only.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The container's network namespace is a new one (as runc's init, the supervisor is in
    /// it: as root, before its create-time hooks run). When such hooks exist (Docker's
    /// default bridge), the guest then takes the interface they put there, as with
    /// [`Launch::netns`].
    #[serde(default)]
    pub own_netns: bool,
    /// The host paths the container binds, shared with the guest through the template's
    /// virtio-fs slot (staged in the jail, or in a mount namespace of the supervisor's own).
    #[serde(default)]
    pub shares: Vec<oci_bundle::HostShare>,
    /// When `run` in the foreground finished each step before the supervisor (bundle,
    /// template, rootfs image), from the process start: the first marks of the `--debug`
    /// timing line. Not sent to a daemon supervisor, whose clock starts with its own process.
    #[serde(skip)]
    pub marks: Vec<(&'static str, Duration)>,
}

/// The supervisor's answer to `create`, one JSON line on the sync socket.
#[derive(Debug, Serialize, Deserialize)]
pub enum Created {
    /// Created: the supervisor's pid.
    Ok(i32),
    /// Failed, with the reason.
    Err(String),
}

/// Signals the supervisor (and `exec`) takes from its signalfd.
pub(super) fn forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in Signal::iterator() {
        // Faults stay synchronous (a crash stays a crash); SIGSYS is how seccomp reports;
        // SIGKILL and SIGSTOP cannot be caught.
        if !matches!(
            s,
            Signal::SIGKILL
                | Signal::SIGSTOP
                | Signal::SIGSEGV
                | Signal::SIGBUS
                | Signal::SIGILL
                | Signal::SIGFPE
                | Signal::SIGSYS
                | Signal::SIGTRAP
                | Signal::SIGABRT
        ) {
            set.add(s);
        }
    }
    set
}

/// Blocks the signals a process's host side forwards (in this thread: call it before any other
/// thread exists, so that every thread inherits the mask) and returns the signalfd they arrive on.
pub(super) fn forwarding_signalfd() -> Result<SignalFd> {
    let set = forwarded_signals();
    set.thread_block().context("cannot block signals")?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("cannot create a signalfd")
}

/// The supervisor of `launch`: restores the VM, prepares the process, says so on `sync` (for
/// `create`), then runs until the process exits. Returns the exit status.
pub fn supervise(
    launch: Launch,
    sync: Option<UnixStream>,
    process_start: Instant,
    seccomp: SeccompMode,
) -> i32 {
    let mut sync = sync;
    let dir = launch.dir.clone();
    let mut record = launch.record.clone();
    match Supervisor::prepare(launch, process_start, seccomp) {
        Ok(mut sup) => {
            if let Some(s) = sync.as_mut() {
                let _ = send_created(s, Created::Ok(std::process::id() as i32));
            }
            drop(sync);
            if sup.launch.console_socket.is_some() {
                // The container's stdio is the terminal now: let go of what `create` was given
                // (a caller waiting for EOF on those would wait for the container's exit).
                detach_stdio();
            }
            let code = sup.run();
            sup.finish(code)
        }
        Err(e) => {
            let msg = crate::error_line(&e);
            let dir = if super::jail::active() {
                PathBuf::from(super::jail::DIR)
            } else {
                dir
            };
            record.status = Status::Stopped;
            let _ = write_record(&dir, &record);
            match sync.as_mut() {
                Some(s) => {
                    let _ = send_created(s, Created::Err(msg));
                }
                None => super::log::error(&msg),
            }
            1
        }
    }
}

fn detach_stdio() {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns; the Rust stdio
        // handles stay valid (they now refer to /dev/null).
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
    }
}

pub(super) fn send_created(s: &mut UnixStream, c: Created) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&c).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

/// When each step of the container's life happened, from the process start (for `--debug`).
#[derive(Debug)]
struct Phases {
    zero: Instant,
    marks: Vec<(&'static str, Duration)>,
}

impl Phases {
    /// Starts with the steps made before (`run` in the foreground), then `supervisor`.
    fn new(zero: Instant, before: &[(&'static str, Duration)]) -> Self {
        let mut marks = before.to_vec();
        marks.push(("supervisor", zero.elapsed()));
        Self { zero, marks }
    }

    fn mark(&mut self, what: &'static str) {
        self.marks.push((what, self.zero.elapsed()));
    }

    /// `restore 12.1 ms, agent 3.0 ms, ...`: each step's duration, then the total.
    fn summary(&self) -> String {
        let mut out = Vec::new();
        let mut last = Duration::ZERO;
        for (what, at) in &self.marks {
            out.push(format!("{what} {:.1}", (*at - last).as_secs_f64() * 1e3));
            last = *at;
        }
        format!(
            "{} ms (total {:.1} ms)",
            out.join(", "),
            last.as_secs_f64() * 1e3
        )
    }
}

struct Supervisor {
    /// Seccomp filters (the supervisor's own thread once the VM runs).
    seccomp: SeccompMode,
    /// In its jail: a working set recorded is installed by `delete`, not here.
    jailed: bool,
    /// Recording the template's working set (until the process has started).
    recorder: Option<super::template::Recorder>,
    /// The rootfs image's lease: the image cache's pruning spares it while the container lives.
    _image_lease: rootfs_image::ImageLease,
    phases: Phases,
    launch: Launch,
    record: Record,
    vm: Option<ContainerVm>,
    signals: SignalFd,
    /// The init process's stdio, signals and exit status, through the agent's connection.
    bridge: Bridge,
    listener: UnixListener,
    /// `Start` was sent and the agent has not answered yet.
    awaiting_start: bool,
    /// The `start` request waiting for that answer (none for `run` in the foreground).
    starting: Option<UnixStream>,
}

/// The VM while the supervisor prepares: stopped and waited for when dropped.
struct VmGuard(Option<ContainerVm>);

impl VmGuard {
    fn take(mut self) -> Option<ContainerVm> {
        self.0.take()
    }
}

impl std::ops::Deref for VmGuard {
    type Target = ContainerVm;
    fn deref(&self) -> &ContainerVm {
        self.0.as_ref().expect("the guard holds the VM until taken")
    }
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            vm.shutdown();
        }
    }
}

impl Supervisor {
    fn prepare(mut launch: Launch, process_start: Instant, seccomp: SeccompMode) -> Result<Self> {
        let mut phases = Phases::new(process_start, &launch.marks);
        // Before any thread exists, so that every thread inherits the mask.
        let signals = forwarding_signalfd()?;
        // SAFETY: SIG_IGN for SIGPIPE: a closed stdout gives EPIPE on write instead of killing
        // the container's supervisor.
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) }
            .context("cannot ignore SIGPIPE")?;
        std::env::set_current_dir(&launch.dir)
            .with_context(|| format!("cannot enter {}", launch.dir.display()))?;
        // Into the container's cgroup before the VM exists, so that its memory is charged
        // there; a pooled VMM joins it once claimed.
        if let Some(c) = &launch.cgroup {
            c.enter(std::process::id() as i32)?;
        }

        // Before the VM opens it; `create` holds its own lease until this process says it is
        // created, so the image cannot be pruned in between.
        let image_lease = rootfs_image::ImageLease::take(&launch.image)
            .context("cannot lease the container's rootfs image")?;
        // The template's first container records its start-up working set; later ones map
        // the template and prefetch that set (clean pages shared with every clone).
        let has_ws = super::template::workingset_path(&launch.template).is_file();
        let recorder = match launch.mode {
            None if !has_ws => super::template::recorder(&launch.template),
            _ => None,
        };
        // The prefetch runs on a thread beside the vCPUs: with a spare CPU it makes the restore
        // faster (read-back 0.90x of mmap on this 2-CPU host); with one CPU it can only compete
        // with the vCPU (in the one-CPU L1 rig the two modes were within noise, 0.99-1.18x), so
        // plain mmap is used there.
        let spare_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
        let mode = launch.mode.unwrap_or(if recorder.is_some() {
            ModeArg::Uffd
        } else if has_ws && spare_cpu {
            ModeArg::MmapPrefetch
        } else {
            ModeArg::Mmap
        });
        tracing::debug!(
            "restore mode {mode:?}{}",
            if recorder.is_some() {
                ", recording the template's working set"
            } else {
                ""
            }
        );
        let mut args = RestoreArgs {
            snapshot: launch.snapshot.clone(),
            mode,
            api_sock: None,
            serial_log: Some(PathBuf::from(CONSOLE_LOG)),
            serial_log_max: Some(CONSOLE_LOG_MAX),
            fault_around: 16,
            record_workingset: recorder.as_ref().map(|r| r.file.clone()),
            record_for: None,
            vsock: Some(PathBuf::from(VSOCK)),
            vsock_max_conns: 64,
            prefetch_before: false,
            disk_slot: vec![(
                super::template::ROOTFS_SLOT.to_string(),
                launch.image.clone(),
            )],
            timing: false,
            no_pool: !launch.use_pool,
            pool_dir: None,
            // The container's stdin goes to its process through the agent, never to the
            // guest's console.
            no_serial_stdin: true,
            // Given below when the container joins a network namespace.
            net_slot: Vec::new(),
            // The lead's OCI mounts -> shares wiring goes here.
            fs_slot: Vec::new(),
            net_taps: Default::default(),
            handed: Default::default(),
        };
        // The terminal (a new pty, sent to the console socket) before the jail, which has
        // neither /dev/ptmx nor the socket.
        let stdio = HostStdio::new(
            launch.request.process.terminal,
            launch.console_socket.as_deref(),
            launch.console_size,
        )?;
        // The create-time hooks, on the host and before the jail, which has neither their
        // programs nor the privileges they may need. A container with a network namespace of
        // its own is given it first (this process, whose pid the hooks read, enters it; they
        // run in the host's).
        let hooked = launch.record.hooks.any_at_create();
        let host_netns = if launch.own_netns {
            match super::hooks::enter_new_netns() {
                Ok(host) => {
                    phases.mark("network namespace");
                    Some(host)
                }
                // Without root there is none (runc needs a user namespace for one): the guest
                // has loopback only all the same, unless hooks were to configure it.
                Err(e) if !hooked && !nix::unistd::geteuid().is_root() => {
                    tracing::debug!("{e:#}");
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        if hooked {
            let pid = std::process::id() as i32;
            super::hooks::run_all(
                launch.record.hooks.at_create(),
                &super::hooks::HookState::new(&launch.record, "creating", pid),
                host_netns.as_ref().map(|f| f.as_fd()),
            )?;
            phases.mark("hooks");
        }
        // `run` in the foreground starts the process itself, once jailed, where no host
        // program can run: its start hooks run here, before the process starts.
        if launch.foreground {
            let pid = std::process::id() as i32;
            let hooks = &launch.record.hooks;
            super::hooks::run_all(
                hooks.start_container.iter().map(|h| ("startContainer", h)),
                &super::hooks::HookState::new(&launch.record, "created", pid),
                host_netns.as_ref().map(|f| f.as_fd()),
            )?;
            super::hooks::run_all_warn(
                "poststart",
                &hooks.poststart,
                &super::hooks::HookState::new(&launch.record, "running", pid),
                host_netns.as_ref().map(|f| f.as_fd()),
            );
        }
        // Its own namespace has an interface only if a hook put one there.
        let netns = match (&launch.netns, host_netns) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(_)) if hooked => Some(PathBuf::from(format!(
                "/proc/{}/ns/net",
                std::process::id()
            ))),
            _ => None,
        };
        // The container's network: a tap made in its namespace and connected to the
        // namespace's interface, whose MAC, MTU, addresses and routes the agent gives the
        // guest's. Before the jail, which has no CAP_NET_ADMIN and cannot enter namespaces.
        let net = match netns.as_deref() {
            None => None,
            Some(ns) => match super::net::connect_tap(ns, super::net::TAP_NAME) {
                // Its own namespace has an interface only if a hook put one there.
                Err(super::net::ContainerNetError::NoInterface) if launch.own_netns => {
                    tracing::debug!("no interface in the container's network namespace");
                    None
                }
                r => Some((ns, r)),
            },
        };
        if let Some((ns, net)) = net {
            let net = net.with_context(|| {
                format!(
                    "cannot connect the container to its network namespace {}",
                    ns.display()
                )
            })?;
            let (config, dropped) = net.iface.guest_config(super::template::NET_SLOT);
            for d in dropped {
                tracing::warn!("network: {d}");
            }
            args.net_slot = vec![(
                super::template::NET_SLOT.to_string(),
                super::net::TAP_NAME.to_string(),
            )];
            args.net_taps = crate::restore_cmd::OpenedTaps(vec![std::sync::Arc::new(net.tap)]);
            launch.request.network = Some(config);
            phases.mark("network");
        }
        let own_start = process_start_time(std::process::id() as i32).unwrap_or(0);
        // A pre-started VMM of the pool first (a jailed one's uid is adopted: this process is
        // jailed as it, see docs/runtime.md); else this process restores the VM, in its jail.
        let mut pooled = None;
        let mut state = None;
        let state_root = launch.dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        // The container's jail plan (the pool's adopter and both kinds of jail below).
        let plan = |settings| super::jail::Plan {
            state_root: &state_root,
            id: &launch.record.id,
            dir: &launch.dir,
            template: &launch.template,
            image: &launch.image,
            settings,
            shares: &launch.shares,
        };
        if launch.use_pool {
            let adopter = launch
                .jail
                .filter(|s| s.enabled)
                .map(|settings| crate::pool::Adopter {
                    plan: plan(settings),
                });
            match ContainerVm::pooled(&launch.dir, &args, process_start, adopter.as_ref())? {
                Ok(vm) => pooled = Some(vm),
                Err(read) => state = read.map(|s| *s),
            }
        }
        // A pooled VMM joins the container's cgroup once claimed, before this process's jail
        // hides the cgroup tree (a failure drops the claim: its VMM stops with the connection).
        if let (Some(c), Some(pid)) = (
            &launch.cgroup,
            pooled.as_ref().and_then(ContainerVm::pooled_pid),
        ) {
            c.enter(pid)?;
        }
        let adopted = pooled.as_ref().and_then(ContainerVm::adopted_uid);
        let jailed = match (launch.jail, adopted) {
            (Some(settings), Some(uid)) if settings.enabled => {
                phases.mark("restore (pool)");
                super::jail::enter_adopted(&plan(settings), uid)?;
                tracing::debug!("jailed as uid {uid} (its pre-started VMM's)");
                if let Some(vm) = pooled.as_mut() {
                    vm.rebase(Path::new(super::jail::DIR));
                }
                launch.dir = PathBuf::from(super::jail::DIR);
                phases.mark("jail");
                true
            }
            (Some(settings), _) if settings.enabled && pooled.is_none() => {
                let j = super::jail::enter(&plan(settings))?;
                tracing::debug!("jailed as uid {}", j.uid);
                let jail_template = Path::new(super::jail::TEMPLATE);
                args.snapshot = match launch.snapshot.strip_prefix(&launch.template) {
                    Ok(rel) => jail_template.join(rel),
                    Err(_) => bail!("the template's snapshot is not in its directory"),
                };
                args.disk_slot[0].1 = PathBuf::from(super::jail::IMAGE);
                if args.record_workingset.is_some() {
                    args.record_workingset = Some(PathBuf::from(super::jail::RECORDING));
                }
                launch.dir = PathBuf::from(super::jail::DIR);
                launch.template = jail_template.to_owned();
                launch.snapshot = args.snapshot.clone();
                launch.image = PathBuf::from(super::jail::IMAGE);
                phases.mark("jail");
                true
            }
            (Some(settings), _) if settings.enabled => {
                tracing::debug!(
                    "not jailed: the VM is in a pre-started VMM of a pool that is not jailed"
                );
                false
            }
            _ => false,
        };
        // The host paths the container binds: the root of the template's virtio-fs slot holds
        // one mount of each (in the jail, or in this process's own mount namespace).
        if !launch.shares.is_empty() {
            let root = if jailed {
                PathBuf::from(super::jail::SHARED)
            } else {
                super::jail::stage_shares(&launch.dir, &launch.shares)?
            };
            args.fs_slot = vec![(super::template::FS_SLOT.to_string(), root, false)];
            phases.mark("shares");
        }
        let vm = match pooled {
            Some(vm) => vm,
            None => ContainerVm::cold(&args, state, process_start, seccomp)?,
        };
        // A failure from here on stops the VM before `prepare` returns (its KVM worker threads
        // hold the container's cgroup until it is gone).
        let vm = VmGuard(Some(vm));
        if !vm.is_pooled() {
            phases.mark("restore (cold)");
        } else if !jailed {
            phases.mark("restore (pool)");
        }
        let conn = connect_agent(&vm)?;
        phases.mark("vsock connect");
        let mut agent = AgentClient::handshake(conn, AGENT_READ_TIMEOUT)
            .context("Hello with the agent failed")?;
        phases.mark("agent hello");
        agent
            .sync_time(now_ns())
            .context("cannot set the guest's clock")?;
        agent
            .reseed(host_random()?)
            .context("cannot reseed the guest's entropy")?;
        phases.mark("clock and entropy");
        // The process is prepared now (mounts, user, cwd, the executable looked up) and waits
        // for `start`: what cannot run fails `create`, as with runc.
        match agent.create(launch.request.clone()) {
            Ok(pid) => tracing::debug!("process prepared, guest pid {pid}"),
            Err(ClientError::Agent { message, .. }) => {
                bail!("unable to start container process: {message}")
            }
            Err(e) => return Err(anyhow!(e).context("cannot prepare the container process")),
        }
        phases.mark("process prepared");

        // From here on the loop owns the connection.
        let bridge = Bridge::new(agent.try_clone_stream()?, stdio)?;
        drop(agent);
        let listener = control::listen(Path::new(control::SOCKET))?;

        let mut record = launch.record.clone();
        record.pid = std::process::id() as i32;
        record.pid_start = own_start;
        record.status = Status::Created;
        write_record(&launch.dir, &record)?;
        phases.mark("created");
        Ok(Self {
            seccomp,
            jailed,
            recorder,
            _image_lease: image_lease,
            phases,
            launch,
            record,
            vm: vm.take(),
            signals,
            bridge,
            listener,
            awaiting_start: false,
            starting: None,
        })
    }

    fn set_status(&mut self, status: Status) {
        self.record.status = status;
        if let Err(e) = write_record(&self.launch.dir, &self.record) {
            tracing::warn!("{e:#}");
        }
    }

    /// Sends `Start`; the agent's answer comes back through the loop ([`Self::on_started`]).
    fn start(&mut self) -> Result<()> {
        if self.record.status != Status::Created {
            bail!(
                "cannot start a container in state {}",
                self.record.status.as_str()
            );
        }
        self.set_status(Status::Running);
        self.phases.mark("until start");
        self.bridge.send(&HostMessage::Start);
        self.awaiting_start = true;
        Ok(())
    }

    /// The process runs: stdin flows, the terminal gets its size, `start` is answered.
    fn on_started(&mut self, pid: u32) {
        self.phases.mark("exec");
        self.install_workingset();
        tracing::debug!("process started, guest pid {pid}");
        self.bridge.set_started();
        let size = match (self.bridge.terminal(), &self.launch.console_socket) {
            (Some(t), None) => t.size(),
            _ => self.launch.console_size,
        };
        if let Some((rows, cols)) = size {
            self.bridge.send(&HostMessage::Resize { rows, cols });
        }
        self.answer_start(Reply::Ok);
    }

    /// The agent answered `Start`: tells whoever waits (`start`, or for `run` in the foreground,
    /// the log when it failed).
    fn answer_start(&mut self, reply: Reply) {
        self.awaiting_start = false;
        match (self.starting.take(), reply) {
            (Some(mut conn), reply) => {
                let _ = control::write_reply(&mut conn, &reply);
            }
            (None, Reply::Err(e)) if self.launch.foreground => super::log::error(&e),
            (None, _) => {}
        }
    }

    /// `Start` failed (when one is waiting for its answer): says why, as runc words it.
    fn fail_start(&mut self, why: &str) {
        if self.awaiting_start {
            self.answer_start(Reply::Err(format!(
                "unable to start container process: {why}"
            )));
        }
    }

    /// Ends the recording of the template's working set (restore to exec) and installs it.
    fn install_workingset(&mut self) {
        let Some(rec) = self.recorder.take() else {
            return;
        };
        let Some(vm) = &self.vm else { return };
        if self.jailed {
            // The template is read-only in the jail: `delete` installs the recording.
            if let Err(e) = vm.finish_recording() {
                tracing::warn!("the template's working set was not recorded: {e:#}");
            }
            drop(rec);
            return;
        }
        match vm.finish_recording().and_then(|()| rec.install()) {
            Ok(()) => tracing::debug!("the template's working set is recorded"),
            Err(e) => tracing::warn!("the template's working set was not recorded: {e:#}"),
        }
    }

    /// The loop; returns the exit status.
    fn run(&mut self) -> i32 {
        // From here on this thread handles what the guest sends: it gets its own allow-list,
        // as the VM's threads have theirs.
        let filter = vmm::seccomp::Filters::new(self.seccomp)
            .and_then(|f| f.apply(vmm::seccomp::ThreadKind::Supervisor));
        if let Err(e) = filter {
            super::log::error(&format!("cannot restrict the supervisor's syscalls: {e}"));
            return 1;
        }
        if self.launch.foreground
            && let Err(e) = self.start()
        {
            super::log::error(&crate::error_line(&e));
        }
        loop {
            if let Some(code) = self.bridge.exit() {
                return code;
            }
            let mut fds = vec![
                self.bridge.agent_fd(),
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(
                    self.vm
                        .as_ref()
                        .map(|v| v.stopped_fd())
                        .unwrap_or(self.signals.as_fd()),
                    PollFlags::POLLIN,
                ),
            ];
            if let Some(fd) = self.bridge.input_fd() {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("poll: {e}");
                    return 1;
                }
            }
            let revents: Vec<PollFlags> = fds
                .iter()
                .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                .collect();
            drop(fds);
            if !revents[0].is_empty() {
                match self.bridge.on_agent(revents[0]) {
                    Ok(events) => {
                        for ev in events {
                            self.on_agent_event(ev);
                        }
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        self.fail_start(&e.to_string());
                        return VM_LOST;
                    }
                }
            }
            if !revents[1].is_empty() {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    // Created (the process waits for `start`), running or paused: to the
                    // process, as runc's kill reaches its init; its death comes back as
                    // Exited{128+N}.
                    self.bridge.forward_signal(info.ssi_signo as i32);
                }
            }
            if !revents[2].is_empty() {
                self.on_control();
            }
            if !revents[3].is_empty() && self.bridge.exit().is_none() {
                tracing::error!("the container's VM stopped before its process exited");
                self.fail_start("the VM stopped");
                return VM_LOST;
            }
            if revents.get(4).is_some_and(|r| !r.is_empty()) {
                self.bridge.on_input();
            }
        }
    }

    fn on_agent_event(&mut self, ev: AgentEvent) {
        match ev {
            AgentEvent::Started(pid) => self.on_started(pid),
            // The agent says why (the exec itself failed) and reports the exit status next.
            AgentEvent::Error(kind, message) if self.awaiting_start => {
                tracing::debug!("agent: {kind:?}: {message}");
                self.fail_start(&message);
            }
            AgentEvent::Error(kind, message) => tracing::warn!("agent: {kind:?}: {message}"),
            AgentEvent::Exited(code) => {
                self.phases.mark("process");
                // A created process killed before it could exec (a signal before `start`).
                self.fail_start(&format!("it exited with status {code}"));
            }
        }
    }

    fn on_control(&mut self) {
        let Ok((mut conn, _)) = self.listener.accept() else {
            return;
        };
        let reply = match control::read_request(&mut conn) {
            Ok(Request::Start) => match self.start() {
                // Answered once the agent says the process runs (or why it does not).
                Ok(()) => {
                    self.starting = Some(conn);
                    return;
                }
                Err(e) => Reply::Err(crate::error_line(&e)),
            },
            Ok(Request::Pause) => self.pause(true),
            Ok(Request::Resume) => self.pause(false),
            Err(e) => Reply::Err(format!("{e:#}")),
        };
        let _ = control::write_reply(&mut conn, &reply);
    }

    fn pause(&mut self, pause: bool) -> Reply {
        let (from, to) = if pause {
            (Status::Running, Status::Paused)
        } else {
            (Status::Paused, Status::Running)
        };
        if self.record.status != from {
            return Reply::Err(if pause {
                "container not running".into()
            } else {
                "container not paused".into()
            });
        }
        let Some(vm) = &self.vm else {
            return Reply::Err("the VM is gone".into());
        };
        let res = if pause { vm.pause() } else { vm.resume() };
        match res {
            Ok(()) => {
                self.set_status(to);
                Reply::Ok
            }
            Err(e) => Reply::Err(format!("{e:#}")),
        }
    }

    /// Stops the VM and records the exit; returns the exit status.
    fn finish(mut self, code: i32) -> i32 {
        if let Some(vm) = self.vm.take() {
            vm.shutdown();
        }
        self.phases.mark("teardown");
        tracing::debug!("timing: {}", self.phases.summary());
        self.record.exit_code = Some(code);
        self.set_status(Status::Stopped);
        let _ = std::fs::remove_file(control::SOCKET);
        code
    }
}

/// Connects to the agent through the VM's vsock socket (hybrid vsock: `CONNECT <port>\n`,
/// answered `OK <port>\n`); the caller says `Hello`. A guest that is slow to answer (a loaded
/// host) makes the VMM close the CONNECT: that is retried until [`AGENT_TIMEOUT`].
fn connect_agent(vm: &ContainerVm) -> Result<UnixStream> {
    let end = Instant::now() + AGENT_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < end {
        if !vm.alive() {
            bail!("the VM stopped before its agent answered ({last})");
        }
        let conn = UnixStream::connect(VSOCK)
            .with_context(|| format!("connect {VSOCK}"))
            .and_then(|s| vsock_connect(s, AGENT_VSOCK_PORT));
        match conn {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "the agent did not answer within {} s: {last}",
        AGENT_TIMEOUT.as_secs()
    )
}

/// The hybrid vsock handshake on a connection to a VM's vsock socket: `CONNECT <port>\n`,
/// answered `OK <port>\n`.
pub(super) fn vsock_connect(mut s: UnixStream, port: u32) -> Result<UnixStream> {
    s.set_read_timeout(Some(AGENT_READ_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b)? {
            1 if b[0] == b'\n' => break,
            1 => line.push(b[0]),
            _ => bail!("the VMM closed the connection after CONNECT"),
        }
    }
    if !line.starts_with(b"OK ") {
        bail!("CONNECT answered {:?}", String::from_utf8_lossy(&line));
    }
    Ok(s)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn host_random() -> Result<Vec<u8>> {
    let mut b = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    Ok(b)
}

/// Takes the sync socket the `create` command passed as fd `fd`.
pub fn sync_socket(fd: i32) -> Result<UnixStream> {
    // Only fds 3 and up are ours to take, and only a socket.
    if fd < 3 {
        bail!("--sync-fd {fd} is not a passed descriptor");
    }
    // SAFETY: `create` passed this descriptor to this process for it alone, and nothing else in
    // the process uses it; fstat below checks it is a socket before it is used.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = nix::sys::stat::fstat(owned.as_fd()).context("--sync-fd")?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("--sync-fd {fd} is not a socket");
    }
    nix::fcntl::fcntl(
        owned.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(UnixStream::from(owned))
}
