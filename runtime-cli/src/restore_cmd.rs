//! `kata-snap restore`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use vmm::seccomp::SeccompMode;
use vmm::vm::virtio::{NetTap, VsockHost};
use vmm::vm::{
    CheckedSnapshot, Guest, HostResources, KvmSystem, PreloadedVm, RecordWorkingSet, RestoreMode,
    RunningVm, ShellConfig, SnapshotSpec, SnapshotState, VmShell,
};

use crate::boot_cmd::{finish, serial_output_capped};

#[derive(Debug, Clone, Args, serde::Serialize, serde::Deserialize)]
pub struct RestoreArgs {
    /// The snapshot directory (from `boot --snapshot-on-ready` or `vm snapshot`).
    #[arg(long, value_name = "DIR")]
    pub snapshot: PathBuf,
    /// How guest memory comes back.
    #[arg(long, value_enum, default_value = "uffd")]
    pub mode: ModeArg,
    /// Listen for control requests on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Append the guest's serial console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_log: Option<PathBuf>,
    /// Keep at most this many bytes of the guest console in --serial-log (the rest is dropped
    /// and counted).
    #[arg(long, value_name = "BYTES", requires = "serial_log")]
    pub serial_log_max: Option<u64>,
    /// Pages installed per fault in the uffd modes (1 = only the faulting page).
    #[arg(long, value_name = "PAGES", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=512))]
    pub fault_around: u64,
    /// In uffd mode, record the start-up working set (the pages the guest touches, in
    /// first-touch order) to FILE, written atomically. Recording ends at the first of: the guest
    /// saying READY, a `finish_workingset` control request, --record-for, the VM stopping.
    /// uffd-prefetch restores read `DIR/workingset`, so name that file to make a template
    /// prefetchable. The snapshot itself is never written otherwise.
    #[arg(long, value_name = "FILE")]
    pub record_workingset: Option<PathBuf>,
    /// End working-set recording after this many milliseconds.
    #[arg(long, value_name = "MS", requires = "record_workingset")]
    pub record_for: Option<u64>,
    /// The host Unix socket of the snapshot's vsock device (required when it has one): connect to
    /// it and send `CONNECT <port>\n` to reach a guest port; guest connections to port P arrive on
    /// `PATH_P`. The guest's CID stays as snapshotted. Each restore of a template gives its own.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// Most vsock connections at once (as for `boot`).
    #[arg(long, value_name = "N", default_value_t = crate::boot_cmd::DEFAULT_MAX_CONNECTIONS, requires = "vsock", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub vsock_max_conns: u32,
    /// In uffd-prefetch mode, install the working set before the vCPUs start [default: while
    /// they run, the page server answering what is not there yet].
    #[arg(long)]
    pub prefetch_before: bool,
    /// Back the snapshot's spare disk slot NAME with the file PATH (repeatable); the guest sees
    /// the new capacity through a config-change interrupt.
    #[arg(long = "disk-slot", value_name = "NAME=PATH", value_parser = parse_slot)]
    pub disk_slot: Vec<(String, PathBuf)>,
    /// Attach the tap TAP (opened, or created with CAP_NET_ADMIN, in this process's network
    /// namespace) to the snapshot's net device ID (repeatable); its link comes up with a
    /// config-change interrupt. A net device left out has no link. The guest keeps the MAC it
    /// read at boot: a clone gets its own through the agent.
    #[arg(long = "net-slot", value_name = "ID=TAP", value_parser = parse_net_slot)]
    pub net_slot: Vec<(String, String)>,
    /// Attach the host directory DIR to the snapshot's virtio-fs slot TAG (repeatable); `ro`
    /// refuses every change (EROFS). A slot left out stays empty. The VMM opens DIR by path (a
    /// restore with a share does not go through a pre-started VMM of the pool).
    #[arg(long = "fs-slot", value_name = "TAG=DIR[,ro]", value_parser = parse_fs_slot)]
    #[serde(default)]
    pub fs_slot: Vec<(String, PathBuf, bool)>,
    /// The taps of `net_slot`, in its order, when opened already (a pool shell receives them
    /// from its client); else each is opened by name.
    #[arg(skip)]
    #[serde(skip)]
    pub net_taps: OpenedTaps,
    /// Descriptors a pool shell received for the paths above (it opens none of them itself).
    #[arg(skip)]
    #[serde(skip)]
    pub handed: crate::pool::Handed,
    /// Print timing and page-server figures when the VM stops (and which path the restore
    /// took: a pre-started VMM from the pool, or a cold start).
    #[arg(long)]
    pub timing: bool,
    /// Never use a pre-started VMM from a running pool (`kata-snap pool start`).
    #[arg(long)]
    pub no_pool: bool,
    /// The pool directory, private to the caller [default: $KATA_SNAP_POOL_DIR, else
    /// /run/kata-snap/pool as root, else $XDG_RUNTIME_DIR/kata-snap/pool; with none of them no
    /// pool is used].
    #[arg(long, value_name = "DIR")]
    pub pool_dir: Option<PathBuf>,
    /// Do not feed this process's stdin to the guest's serial port (it belongs to someone
    /// else: a container's stdin goes to its process through the agent).
    #[arg(long)]
    pub no_serial_stdin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum ModeArg {
    /// Read the whole memory file before resuming (the baseline).
    Eager,
    /// Map the memory file privately: clones share the page cache, writes are copy-on-write.
    Mmap,
    /// Serve pages on demand through userfaultfd.
    Uffd,
    /// Install the recorded working set in batched reads first, then serve the rest on demand.
    UffdPrefetch,
    /// Map the memory file privately and make the recorded working set present beside the
    /// vCPUs (MADV_POPULATE_READ): lazy, prefetched, clean pages shared between clones.
    MmapPrefetch,
}

/// Tap fds opened ahead for `--net-slot`, shared by clones of the arguments.
#[derive(Debug, Clone, Default)]
pub struct OpenedTaps(pub Vec<Arc<std::os::fd::OwnedFd>>);

/// At most this many `--net-slot`s (the pool hand-off carries their fds in one message).
pub const MAX_NET_SLOTS: usize = 8;

fn parse_fs_slot(s: &str) -> Result<(String, PathBuf, bool), String> {
    let spec = crate::boot_cmd::parse_fs_share(s, true)?;
    let share = spec.share.ok_or("expected TAG=DIR[,ro]")?;
    Ok((spec.tag, share.dir, share.read_only))
}

fn parse_net_slot(s: &str) -> Result<(String, String), String> {
    let (id, tap) = s.split_once('=').ok_or("expected ID=TAP")?;
    if id.is_empty() {
        return Err("the net device id is empty".into());
    }
    if tap.is_empty() || tap.len() > 15 || tap.contains('\0') {
        return Err("the tap name must be 1 to 15 bytes".into());
    }
    Ok((id.to_string(), tap.to_string()))
}

/// The taps of `args.net_slot`: the ones opened ahead, else opened by name now.
pub fn net_taps(args: &RestoreArgs) -> Result<Vec<NetTap>> {
    if args.net_slot.len() > MAX_NET_SLOTS {
        anyhow::bail!("at most {MAX_NET_SLOTS} --net-slot");
    }
    args.net_slot
        .iter()
        .enumerate()
        .map(|(i, (id, tap))| {
            let fd = match args.net_taps.0.get(i) {
                Some(fd) => fd.try_clone().context("duplicating a tap fd")?,
                None => vmm::vm::virtio::open_tap_fd(tap)
                    .with_context(|| format!("--net-slot {id}={tap}"))?,
            };
            Ok(NetTap {
                id: id.clone(),
                tap: fd,
            })
        })
        .collect()
}

fn parse_slot(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or("expected NAME=PATH")?;
    if name.is_empty() {
        return Err("the slot name is empty".into());
    }
    let path = PathBuf::from(path);
    if !path.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    Ok((name.to_string(), path))
}

pub fn run(args: RestoreArgs, process_start: Instant, seccomp: SeccompMode) -> Result<i32> {
    let mut state = None;
    if !args.no_pool && args.fs_slot.is_empty() {
        match crate::pool::restore_through_pool(&args, process_start)? {
            Ok(code) => return Ok(code),
            Err(read) => state = read.map(|s| *s),
        }
    }
    if args.timing {
        eprintln!("kata-snap: restore path: cold start (no pre-started VMM)");
    }
    let vm = start_restore(&args, None, state, process_start, seccomp, true)?;
    vm.restrict_caller()?;
    let report = vm.wait()?;
    Ok(finish(&report, args.timing))
}

/// The memory mode `args` ask for.
pub fn restore_mode(args: &RestoreArgs) -> RestoreMode {
    restore_mode_of(args.mode)
}

/// The memory mode of `mode`.
pub fn restore_mode_of(mode: ModeArg) -> RestoreMode {
    match mode {
        ModeArg::Eager => RestoreMode::Eager,
        ModeArg::Mmap => RestoreMode::Mmap,
        ModeArg::Uffd => RestoreMode::Uffd,
        ModeArg::UffdPrefetch => RestoreMode::UffdPrefetch,
        ModeArg::MmapPrefetch => RestoreMode::MmapPrefetch,
    }
}

/// What a restore of `args` loads, from its checked snapshot.
pub fn snapshot_spec(args: &RestoreArgs, snapshot: CheckedSnapshot) -> Result<SnapshotSpec> {
    Ok(SnapshotSpec::new(
        snapshot,
        args.fault_around as usize,
        args.prefetch_before,
        args.record_workingset.clone().map(|path| RecordWorkingSet {
            path,
            limit: args.record_for.map(std::time::Duration::from_millis),
        }),
    )?)
}

/// The VM's host resources `args` give: console, stdin, spare disk slots, vsock socket.
/// What a pool shell was handed replaces the paths (it opens none of them).
fn host_resources(args: &RestoreArgs) -> Result<HostResources> {
    let h = &args.handed;
    let serial = match h.serial_log()? {
        Some(file) => crate::boot_cmd::serial_file_capped(file, args.serial_log_max),
        None => serial_output_capped(args.serial_log.as_ref(), args.serial_log_max)?,
    };
    let disk_files = h.disk_files()?;
    Ok(HostResources {
        forward_stdin: !args.no_serial_stdin,
        disk_slots: args
            .disk_slot
            .iter()
            .filter(|(n, _)| !disk_files.contains_key(n))
            .cloned()
            .collect(),
        disk_files,
        net: net_taps(args)?,
        fs: args
            .fs_slot
            .iter()
            .map(|(tag, dir, read_only)| vmm::vm::virtio::FsSlot {
                tag: tag.clone(),
                share: vmm::vm::virtio::FsShare {
                    dir: dir.clone(),
                    read_only: *read_only,
                },
            })
            .collect(),
        vsock: args.vsock.clone().map(|path| VsockHost {
            path,
            max_connections: args.vsock_max_conns as usize,
        }),
        vsock_listener: h.vsock_listener()?,
        ..HostResources::new(serial)
    })
}

/// The snapshot's state: from the files handed over, else read from its directory.
fn read_state(args: &RestoreArgs) -> Result<SnapshotState> {
    Ok(match args.handed.snapshot_files()? {
        Some(files) => SnapshotState::from_files(&args.snapshot, files)?,
        None => SnapshotState::read(&args.snapshot)?,
    })
}

/// The restore lifecycle: check (everything about the snapshot, before any guest is loaded),
/// shell (a fresh one, or `shell` from a pool), load, start. `stop_on_signals`: SIGINT, SIGTERM
/// and SIGHUP stop the VM (false: the caller reads them itself).
///
/// `state`: the snapshot's state file when the caller read it already.
pub fn start_restore(
    args: &RestoreArgs,
    shell: Option<VmShell>,
    state: Option<SnapshotState>,
    process_start: Instant,
    seccomp: SeccompMode,
    stop_on_signals: bool,
) -> Result<RunningVm> {
    let mode = restore_mode(args);
    // Cold: build the shell (KVM VM, vCPUs, rings) on a thread while this one checks the
    // snapshot; a snapshot that fails its checks drops the shell before any guest state is in
    // it. /dev/kvm is opened once, by that thread, which hands it over for the check.
    let state = match state {
        Some(s) => s,
        None => read_state(args)?,
    };
    let (kvm_tx, kvm_rx) = std::sync::mpsc::channel::<Option<Arc<KvmSystem>>>();
    let shell = match shell {
        Some(shell) => {
            let _ = kvm_tx.send(Some(shell.kvm().clone()));
            Ok(shell)
        }
        None => {
            let vcpus = state.vcpus()?;
            // The memslots are made with the VM, before its vCPUs (see `ShellConfig`).
            let mem_mib = state.mem_mib();
            vmm::vm::block_termination_signals()?;
            let api_sock = args.api_sock.clone();
            Err(std::thread::spawn(move || {
                let kvm = match KvmSystem::open() {
                    Ok(k) => Arc::new(k),
                    Err(e) => {
                        let _ = kvm_tx.send(None);
                        return Err(e);
                    }
                };
                let _ = kvm_tx.send(Some(kvm.clone()));
                VmShell::new(ShellConfig {
                    vcpus,
                    api_sock,
                    process_start,
                    seccomp,
                    memory_class: Some(mem_mib),
                    stop_on_signals,
                    kvm: Some(kvm),
                })
            }))
        }
    };
    // `None`: KVM could not be opened; the shell's error says why.
    let checked = (|| -> Result<Option<(SnapshotSpec, HostResources)>> {
        let Ok(Some(kvm)) = kvm_rx.recv() else {
            return Ok(None);
        };
        let spec = snapshot_spec(args, state.check(mode, &kvm)?)?;
        Ok(Some((spec, host_resources(args)?)))
    })();
    let shell = match shell {
        Ok(shell) => {
            shell.set_process_start(process_start);
            if let Some(path) = &args.api_sock {
                match args.handed.api_listener()? {
                    Some(l) => shell.listen_on(path, l)?,
                    None => shell.listen(path)?,
                }
            }
            shell
        }
        Err(thread) => {
            let built = thread
                .join()
                .map_err(|_| anyhow::anyhow!("the VM set-up thread panicked"))?;
            // The snapshot's own error comes first: it is what the user must fix.
            let checked = checked?;
            let built = built?;
            let (spec, host) = checked.context("KVM could not be opened")?;
            return Ok(built.load(Guest::Snapshot(Box::new(spec)), host)?.start()?);
        }
    };
    let (spec, host) = checked?.context("KVM could not be opened")?;
    Ok(shell.load(Guest::Snapshot(Box::new(spec)), host)?.start()?)
}

/// Finishes a restore in a VM whose template `args.snapshot` a pool shell has loaded already:
/// only the host resources are attached (console, disks, vsock, control socket), then the
/// vCPUs start.
pub fn attach_restore(
    args: &RestoreArgs,
    vm: PreloadedVm,
    process_start: Instant,
) -> Result<RunningVm> {
    vm.set_process_start(process_start);
    let host = host_resources(args)?;
    if let Some(path) = &args.api_sock {
        match args.handed.api_listener()? {
            Some(l) => vm.listen_on(path, l)?,
            None => vm.listen(path)?,
        }
    }
    Ok(vm.attach(host)?.start()?)
}
