//! `kata-snap restore`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, ValueEnum};
use vmm::vm::{HostResources, RecordWorkingSet, RestoreConfig, RestoreMode};

use crate::boot_cmd::{finish, serial_output};

#[derive(Debug, Args)]
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
    /// In uffd-prefetch mode, install the working set before the vCPUs start [default: while
    /// they run, the page server answering what is not there yet].
    #[arg(long)]
    pub prefetch_before: bool,
    /// Back the snapshot's spare disk slot NAME with the file PATH (repeatable); the guest sees
    /// the new capacity through a config-change interrupt.
    #[arg(long = "disk-slot", value_name = "NAME=PATH", value_parser = parse_slot)]
    pub disk_slot: Vec<(String, PathBuf)>,
    /// Print timing and page-server figures when the VM stops.
    #[arg(long)]
    pub timing: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Read the whole memory file before resuming (the baseline).
    Eager,
    /// Map the memory file privately: clones share the page cache, writes are copy-on-write.
    Mmap,
    /// Serve pages on demand through userfaultfd.
    Uffd,
    /// Install the recorded working set in batched reads first, then serve the rest on demand.
    UffdPrefetch,
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

pub fn run(args: RestoreArgs, process_start: Instant) -> Result<i32> {
    let config = RestoreConfig {
        snapshot: args.snapshot,
        mode: match args.mode {
            ModeArg::Eager => RestoreMode::Eager,
            ModeArg::Mmap => RestoreMode::Mmap,
            ModeArg::Uffd => RestoreMode::Uffd,
            ModeArg::UffdPrefetch => RestoreMode::UffdPrefetch,
        },
        api_sock: args.api_sock,
        host: HostResources {
            forward_stdin: true,
            disk_slots: args.disk_slot.into_iter().collect(),
            vsock_path: args.vsock,
            ..HostResources::new(serial_output(args.serial_log.as_ref())?)
        },
        fault_around: args.fault_around as usize,
        record_workingset: args.record_workingset.map(|path| RecordWorkingSet {
            path,
            limit: args.record_for.map(std::time::Duration::from_millis),
        }),
        prefetch_before: args.prefetch_before,
        process_start,
    };
    let report = vmm::vm::restore(config)?;
    Ok(finish(&report, args.timing))
}
