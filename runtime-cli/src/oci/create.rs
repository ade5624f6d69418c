//! `create` and `run`: check everything, find (or warm) the template and the rootfs image, claim
//! the container's directory, then supervise in this process (`run`) or start the supervisor as
//! a daemon and wait until it says the container is created (`create`, `run --detach`).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vmm::seccomp::SeccompMode;

use super::state::{self, Record, Status, Store};
use super::supervisor::{self, Created, Launch};
use super::{CreateArgs, GlobalOpts, assets, host_cgroup, log, start, template, write_file_synced};

/// What the command does once the container is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Create,
    RunDetached,
    RunForeground { keep: bool },
}

/// Removes the claimed container directory unless disarmed.
struct ClaimGuard<'a> {
    store: &'a Store,
    id: String,
    armed: bool,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.store.remove(&self.id);
        }
    }
}

pub(super) fn create(
    g: &GlobalOpts,
    args: CreateArgs,
    seccomp: SeccompMode,
    t0: Instant,
    mode: Mode,
) -> Result<i32> {
    state::validate_id(&args.id)?;
    if args.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: descriptors cannot be passed into a VM",
            args.preserve_fds
        );
    }
    let store = Store::open(&g.root()?)?;
    if store.dir(&args.id).exists() {
        bail!("container with given ID already exists");
    }
    let bundle_dir = match &args.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir()?,
    };
    let bundle = oci_bundle::load(&bundle_dir)?;
    let config = &bundle.config;
    let mut marks = vec![("bundle", t0.elapsed())];
    if config.process.terminal
        && args.console_socket.is_none()
        && !matches!(mode, Mode::RunForeground { .. })
    {
        bail!("cannot allocate tty if kata-snap will detach without setting console socket");
    }
    if !config.process.terminal && args.console_socket.is_some() {
        bail!("cannot use console socket if kata-snap will not detach or allocate tty");
    }
    if let Some(sc) = &config.seccomp {
        // runc's debug line (its seccomp.bats reads the number).
        tracing::debug!("seccomp filter flags: {}", sc.flags);
    }
    // Docker's resolv.conf, hosts and hostname, read now (a copy, not a live bind).
    let files = copied_files(&config.files)?;
    check_shares(&config.shares)?;
    // A new network namespace (`linux.namespaces` `network` without a path) is the
    // supervisor's own, as runc's container init has one: whoever configures
    // `/proc/PID/ns/net` of the container's pid configures that namespace, never the host's.
    // When create-time hooks configure it (Docker's default bridge, nerdctl), the guest takes
    // what they put there, and so restores a networked template.
    let runtime_config = assets::RuntimeConfig::load()?;
    let own_netns = config.network == oci_bundle::Network::New
        && (config.hooks.any_at_create()
            || runtime_config.new_network_namespace != Some(assets::NewNetns::WithHooks));
    let spec = template::spec_for(
        config.resources.vcpus,
        config.resources.mem_mib,
        (own_netns && config.hooks.any_at_create())
            || matches!(config.network, oci_bundle::Network::Join(_)),
        !config.shares.is_empty(),
    )?;
    let data = assets::data_dir();
    let tmpl = template::ensure(&data, &spec, seccomp, &|msg| {
        tracing::info!("{msg}");
    })?;
    if tmpl.warmed {
        tracing::info!(
            "template {} warmed in {:.0} ms",
            tmpl.dir.display(),
            tmpl.elapsed.as_secs_f64() * 1e3
        );
    }
    marks.push(("template", t0.elapsed()));
    let cache = rootfs_image::ImageCache::open(&data.join("images"))?;
    let image = cache.get_or_build(&config.root)?;
    if !image.hit {
        // The cache grows only by builds: keep it within its budget, least recently used
        // images first, never one a container holds (this one is leased already).
        let budget = assets::RuntimeConfig::load()?.image_cache_bytes();
        match cache.prune(budget, std::time::Duration::ZERO) {
            Ok(r) if !r.removed.is_empty() => tracing::info!(
                "image cache over its budget of {} MiB: removed {} images ({} MiB)",
                budget >> 20,
                r.removed.len(),
                r.freed >> 20
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot prune the image cache: {e}"),
        }
    }
    marks.push(("rootfs image", t0.elapsed()));
    tracing::debug!(
        "rootfs image {} ({}, key {:.1} ms)",
        image.path.display(),
        if image.hit { "cached" } else { "built" },
        image.key_time.as_secs_f64() * 1e3
    );

    let cgroup =
        host_cgroup::Placement::plan(config.cgroups_path.as_deref(), &args.id, g.systemd_cgroup)?;
    if let Some(c) = &cgroup {
        c.check()?;
    }
    let is_root = nix::unistd::geteuid().is_root();
    let jail = super::jail::Settings::from_config(&runtime_config, is_root)?;
    if runtime_config.jail == Some(true) && !is_root {
        tracing::warn!(
            "config jail: true: without root there is no jail, the supervisor runs as you"
        );
    }
    let dir = store.claim(&args.id)?;
    let mut guard = ClaimGuard {
        store: &store,
        id: args.id.clone(),
        armed: true,
    };
    let netns = match &config.network {
        oci_bundle::Network::Join(path) => Some(path.clone()),
        oci_bundle::Network::New | oci_bundle::Network::Host => None,
    };
    let record = Record {
        id: args.id.clone(),
        bundle: bundle.dir.clone(),
        rootfs: config.root.clone(),
        created: state::rfc3339_now(),
        annotations: config.annotations.clone(),
        pid: std::process::id() as i32,
        pid_start: state::process_start_time(std::process::id() as i32).unwrap_or(0),
        status: Status::Creating,
        exit_code: None,
        cgroup: cgroup.as_ref().map(|c| c.dir.clone()),
        netns: netns.clone(),
        hooks: config.hooks.clone(),
    };
    state::write_record(&dir, &record)?;
    let launch = Launch {
        dir: dir.clone(),
        record,
        snapshot: tmpl.snapshot.clone(),
        mode: args.restore_mode,
        template: tmpl.dir.clone(),
        image: image.path.clone(),
        request: {
            let mut r = config.run_request(agent_protocol::RootfsSource::Block {
                device: template::ROOTFS_DEVICE.into(),
                fs: Some(agent_protocol::FsType::Erofs),
            });
            // runc clears ONLCR on the terminal it reads in the foreground.
            r.process.clear_onlcr = r.process.terminal
                && args.console_socket.is_none()
                && matches!(mode, Mode::RunForeground { .. });
            r.files = files;
            r
        },
        console_socket: args.console_socket.clone(),
        console_size: config.process.console_size.map(|c| (c.rows, c.cols)),
        foreground: matches!(mode, Mode::RunForeground { .. }),
        // The pool's VMMs cannot take shares yet (their jails hold only the template).
        use_pool: !args.no_pool && config.shares.is_empty(),
        shares: config.shares.clone(),
        cgroup,
        jail: Some(jail),
        netns,
        own_netns,
        marks: if matches!(mode, Mode::RunForeground { .. }) {
            marks
        } else {
            vec![]
        },
    };
    if let Mode::RunForeground { keep } = mode
        && jail.enabled
        && !keep
    {
        // The jailed supervisor cannot remove its state: this process stays outside the jail,
        // as runc's `run` beside its container's init, and does.
        guard.armed = false;
        let cgroup = launch.cgroup.clone();
        let netns = launch.netns.clone();
        let record = launch.record.clone();
        return super::jail::supervise_in_child(
            || supervisor::supervise(launch, None, t0, seccomp),
            |pid| match &args.pid_file {
                Some(p) => write_pid_file(p, pid),
                None => Ok(()),
            },
            || {
                if let Some(c) = &cgroup
                    && let Err(e) = host_cgroup::remove(&c.dir)
                {
                    tracing::warn!("{e:#}");
                }
                super::net::release(netns.as_deref());
                super::poststop(&record);
                let _ = store.remove(&args.id);
            },
        );
    }
    if let Mode::RunForeground { keep } = mode {
        if let Some(p) = &args.pid_file {
            write_pid_file(p, std::process::id() as i32)?;
        }
        guard.armed = false;
        // This process becomes the VM's: it leaves the container's cgroup before removing it.
        let origin = host_cgroup::own_cgroup();
        let cgroup = launch.cgroup.clone();
        let netns = launch.netns.clone();
        let record = launch.record.clone();
        let code = supervisor::supervise(launch, None, t0, seccomp);
        if !keep {
            if let Some(c) = cgroup
                && let Err(e) =
                    host_cgroup::leave(&origin).and_then(|()| host_cgroup::remove(&c.dir))
            {
                tracing::warn!("{e:#}");
            }
            super::net::release(netns.as_deref());
            super::poststop(&record);
            let _ = store.remove(&args.id);
        }
        return Ok(code);
    }
    let pid = spawn_supervisor(g, &launch, seccomp)?;
    if let Some(p) = &args.pid_file {
        write_pid_file(p, pid)?;
    }
    guard.armed = false;
    if mode == Mode::RunDetached {
        start(&store, &args.id)?;
    }
    Ok(0)
}

/// Starts `kata-snap _supervise` as a daemon (its own process group; stdio inherited: the
/// container's), hands it the launch over a socket pair and waits for it to say the container is
/// created.
fn spawn_supervisor(g: &GlobalOpts, launch: &Launch, seccomp: SeccompMode) -> Result<i32> {
    let mut cmd = self_command(g, seccomp)?;
    let sync = SyncPair::new()?;
    cmd.arg("_supervise")
        .arg("--sync-fd")
        .arg(sync.child_fd().to_string());
    // A process group of its own: the engine's terminal signals and process group are not its.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    sync.hand_over(
        cmd,
        &serde_json::to_vec(launch)?,
        "the container's supervisor",
    )
}

/// This executable with the global flags of this invocation (root, log, debug, seccomp).
pub(super) fn self_command(g: &GlobalOpts, seccomp: SeccompMode) -> Result<std::process::Command> {
    let exe = std::fs::read_link("/proc/self/exe").context("cannot find this executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--root").arg(g.root()?);
    if let Some(l) = &g.log {
        cmd.arg("--log").arg(l);
    }
    cmd.arg("--log-format").arg(match g.log_format {
        log::LogFormat::Text => "text",
        log::LogFormat::Json => "json",
    });
    if g.debug {
        cmd.arg("--debug");
    }
    cmd.arg("--seccomp").arg(match seccomp {
        SeccompMode::Off => "off",
        SeccompMode::Log => "log",
        SeccompMode::Kill => "kill",
    });
    Ok(cmd)
}

/// The socket pair between a command and the daemon it starts (a container's or an exec's
/// supervisor): the plan goes one way, one [`Created`] line comes back.
pub(super) struct SyncPair {
    ours: std::os::fd::OwnedFd,
    theirs: std::os::fd::OwnedFd,
}

impl SyncPair {
    pub(super) fn new() -> Result<Self> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .context("cannot create a socket pair")?;
        // Only the child's end crosses exec.
        nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )?;
        Ok(Self { ours, theirs })
    }

    /// The descriptor number the child finds its end at.
    pub(super) fn child_fd(&self) -> i32 {
        self.theirs.as_raw_fd()
    }

    /// Spawns `cmd`, sends it `plan` and waits for its one-line answer: its pid, or the error
    /// (then it is killed). `what` names it in errors.
    pub(super) fn hand_over(
        self,
        mut cmd: std::process::Command,
        plan: &[u8],
        what: &str,
    ) -> Result<i32> {
        use std::io::{BufRead, Write};
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        drop(self.theirs);
        let pid = child.id() as i32;
        // The daemon outlives this command; whoever reaps orphans (the engine's shim, a
        // subreaper) reaps it.
        drop(child);
        let mut sock = std::os::unix::net::UnixStream::from(self.ours);
        sock.write_all(plan)?;
        sock.shutdown(std::net::Shutdown::Write)?;
        sock.set_read_timeout(Some(Duration::from_secs(600)))?;
        let mut line = String::new();
        std::io::BufReader::new(sock.take(1 << 20))
            .read_line(&mut line)
            .with_context(|| format!("waiting for {what}"))?;
        let why = match serde_json::from_str::<Created>(&line) {
            Ok(Created::Ok(p)) => return Ok(p),
            Ok(Created::Err(e)) => e,
            Err(_) => format!("{what} ended before it was ready"),
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        bail!("{why}")
    }
}

pub(super) fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    // runc writes it through a temporary name too, so a reader never sees it half-written.
    write_file_synced(path, pid.to_string().as_bytes())
}

/// The host paths the bundle binds, checked before anything is made: each must be a directory
/// or a regular file (a socket, FIFO or device cannot be shared with a VM), and binding them
/// needs root (the supervisor stages them with mounts).
fn check_shares(shares: &[oci_bundle::HostShare]) -> Result<()> {
    if shares.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "mount {}: bind mounts of host paths need root (kata-snap shares them with the VM \
             through mounts of its own)",
            shares[0].destination
        );
    }
    for s in shares {
        // stat follows a link, as a bind does; it never opens (a FIFO cannot block it).
        let m = std::fs::metadata(&s.source).with_context(|| {
            format!(
                "mount {}: cannot stat the host path {}",
                s.destination,
                s.source.display()
            )
        })?;
        if !m.is_dir() && !m.is_file() {
            bail!(
                "mount {}: host path {} is neither a directory nor a regular file \
                 (a socket, FIFO or device cannot be shared with a VM)",
                s.destination,
                s.source.display()
            );
        }
    }
    Ok(())
}

/// The contents of the bundle's copied host files (Docker's resolv.conf, hosts, hostname), for
/// the agent to write in the container's root.
fn copied_files(files: &[oci_bundle::FileCopy]) -> Result<Vec<agent_protocol::FileContent>> {
    files
        .iter()
        .map(|f| {
            let (content, mode) = read_copied_file(&f.source).with_context(|| {
                format!("mount {} (bind of a host file, copied)", f.destination)
            })?;
            tracing::debug!(
                source = %f.source.display(),
                destination = %f.destination,
                bytes = content.len(),
                "host file copied into the container"
            );
            Ok(agent_protocol::FileContent {
                path: f.destination.clone(),
                content,
                mode,
                read_only: f.read_only,
            })
        })
        .collect()
}

/// Reads a host file a bundle binds into the container, as a hostile file: a link is followed
/// (a host's resolv.conf often is one), but what is opened must be a regular file (a FIFO is
/// opened without blocking and refused, as are a directory and a device), of at most
/// [`agent_protocol::MAX_FILE_BYTES`]. Returns the content and the file's permission bits.
fn read_copied_file(path: &Path) -> Result<(Vec<u8>, u32)> {
    let max = agent_protocol::MAX_FILE_BYTES;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let meta = f
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mut content = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut content)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if content.len() > max {
        bail!(
            "{} is larger than {} KiB, the most copied into a container",
            path.display(),
            max / 1024
        );
    }
    Ok((content, meta.permissions().mode() & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(e: anyhow::Error) -> String {
        format!("{e:#}")
    }

    #[test]
    fn test_copied_file_regular_read_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resolv.conf");
        std::fs::write(&p, "nameserver 10.0.0.1\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            read_copied_file(&p).unwrap(),
            (b"nameserver 10.0.0.1\n".to_vec(), 0o640)
        );
        // A link is followed (the host's /etc/resolv.conf often is one).
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read_copied_file(&link).unwrap().1, 0o640);
        // Exactly the limit is fine; empty too.
        std::fs::write(&p, vec![b'#'; agent_protocol::MAX_FILE_BYTES]).unwrap();
        assert_eq!(
            read_copied_file(&p).unwrap().0.len(),
            agent_protocol::MAX_FILE_BYTES
        );
        std::fs::write(&p, "").unwrap();
        assert!(read_copied_file(&p).unwrap().0.is_empty());
    }

    #[test]
    fn test_copied_file_too_big_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        std::fs::write(&p, vec![b'#'; agent_protocol::MAX_FILE_BYTES + 1]).unwrap();
        let e = msg(read_copied_file(&p).unwrap_err());
        assert!(
            e.contains(&p.display().to_string()) && e.contains("64 KiB"),
            "{e}"
        );
    }

    #[test]
    fn test_copied_file_fifo_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        // No writer: a blocking open would never return.
        let (tx, rx) = std::sync::mpsc::channel();
        let q = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_copied_file(&q).map_err(msg));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("reading a FIFO blocked");
        let e = r.unwrap_err();
        assert!(e.contains("is not a regular file"), "{e}");
    }

    #[test]
    fn test_copied_file_directory_and_missing_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = msg(read_copied_file(dir.path()).unwrap_err());
        assert!(e.contains("is not a regular file"), "{e}");
        let missing = dir.path().join("missing");
        let e = msg(read_copied_file(&missing).unwrap_err());
        assert!(e.contains("cannot open") && e.contains("missing"), "{e}");
    }

    #[test]
    fn test_copied_files_named_by_destination() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o644)).unwrap();
        let copy = |source: &Path, destination: &str, read_only| oci_bundle::FileCopy {
            source: source.into(),
            destination: destination.into(),
            read_only,
        };
        let got = copied_files(&[copy(&hosts, "/etc/hosts", true)]).unwrap();
        assert_eq!(
            got,
            [agent_protocol::FileContent {
                path: "/etc/hosts".into(),
                content: b"127.0.0.1 localhost\n".to_vec(),
                mode: 0o644,
                read_only: true,
            }]
        );
        let e = msg(
            copied_files(&[copy(&dir.path().join("gone"), "/etc/resolv.conf", false)]).unwrap_err(),
        );
        assert!(
            e.contains("mount /etc/resolv.conf") && e.contains("gone"),
            "{e}"
        );
    }
}
