//! `kata-snap demo`: the whole idea in one command. Cold-boots the built-in test guest, which
//! writes a memory area and says READY; takes a snapshot at that exact exit; restores it in every
//! mode (the guest then reads the area back and checks every page); prints what each took.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use vmm::vm::{
    AfterSnapshot, HostResources, RecordWorkingSet, RestoreConfig, RestoreMode, SnapshotOnReady,
    VmReport,
};
use vmm::{KernelImage, SerialOutput, VmConfig};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    pub mem_mib: u64,
    /// MiB the guest writes before READY and verifies after the restore.
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub touch_mib: u64,
    /// Restores per mode (the table shows medians).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub runs: u32,
    /// Keep the snapshot in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<std::path::PathBuf>,
}

const MODES: [(RestoreMode, &str); 5] = [
    (RestoreMode::Eager, "eager"),
    (RestoreMode::Mmap, "mmap"),
    (RestoreMode::Uffd, "uffd"),
    (RestoreMode::UffdPrefetch, "uffd-prefetch"),
    (RestoreMode::MmapPrefetch, "mmap-prefetch"),
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Row {
    mode: &'static str,
    to_vcpus: f64,
    to_done: f64,
    faults: String,
    prefetched: String,
    ok: bool,
}

fn restore_once(
    snapshot: &Path,
    mode: RestoreMode,
    out: &Path,
    record: bool,
    seccomp: vmm::seccomp::SeccompMode,
) -> Result<(VmReport, Duration)> {
    let start = Instant::now();
    let serial = std::fs::File::create(out)?;
    let report = vmm::vm::restore(RestoreConfig {
        snapshot: snapshot.to_path_buf(),
        mode,
        api_sock: None,
        host: HostResources::new(SerialOutput::File(serial)),
        fault_around: 16,
        // The first uffd restore records the working set the uffd-prefetch runs then use.
        record_workingset: record.then(|| RecordWorkingSet {
            path: snapshot.join("workingset"),
            limit: None,
        }),
        prefetch_before: false,
        process_start: start,
        seccomp,
    })?;
    Ok((report, start.elapsed()))
}

pub fn run(args: DemoArgs, seccomp: vmm::seccomp::SeccompMode) -> Result<i32> {
    let guest = &test_guests::MEMTOUCH;
    println!("kata-snap demo: {}", vmm::host::check_host().summary);
    let tmp = tempfile::tempdir()?;
    let snapshot = match &args.keep {
        Some(dir) => dir.clone(),
        None => tmp.path().join("template"),
    };
    let total = 1 + MODES.len() as u64 * u64::from(args.runs.max(1)) + 1;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("cold boot, snapshot at READY");
    let cold_serial = tmp.path().join("cold.log");
    let cold_start = Instant::now();
    let cold = vmm::vm::run(VmConfig {
        kernel: KernelImage::Builtin {
            name: guest.name,
            bytes: guest.elf,
        },
        initrd: None,
        cmdline: format!("touch_mib={} touch_base_mib=16", args.touch_mib),
        mem_mib: args.mem_mib,
        vcpus: 1,
        api_sock: None,
        serial: SerialOutput::File(std::fs::File::create(&cold_serial)?),
        forward_stdin: false,
        virtio: Default::default(),
        snapshot_on_ready: Some(SnapshotOnReady {
            dir: snapshot.clone(),
            after: AfterSnapshot::Exit,
        }),
        process_start: cold_start,
        seccomp,
    })?;
    bar.inc(1);
    let snap = cold
        .snapshot
        .clone()
        .context("the guest stopped without a snapshot")?;
    if cold.reason.exit_code() != 0 {
        bar.finish_and_clear();
        bail!("cold boot ended: {}", cold.reason);
    }
    let pages = args.touch_mib * 256;
    let want = format!(
        "memtouch: verified {pages} pages checksum={:#x}\nmemtouch: OK\n",
        test_guests::memtouch_checksum(pages)
    );
    let mut rows = Vec::new();
    for (mode, name) in MODES {
        let (mut to_vcpus, mut to_done) = (Vec::new(), Vec::new());
        let (mut faults, mut prefetched, mut ok) = (String::from("-"), String::from("-"), true);
        for i in 0..args.runs.max(1) {
            bar.set_message(format!("restore {name} ({}/{})", i + 1, args.runs.max(1)));
            let out = tmp.path().join(format!("{name}-{i}.log"));
            let record = mode == RestoreMode::Uffd && i == 0;
            let (report, elapsed) = restore_once(&snapshot, mode, &out, record, seccomp)?;
            ok &= report.reason.exit_code() == 0 && std::fs::read_to_string(&out)?.ends_with(&want);
            to_vcpus.push(ms(report.vcpus_started_after));
            to_done.push(ms(elapsed));
            if let Some(ps) = &report.page_server {
                faults = ps.faults.to_string();
                prefetched = ps.prefetched_pages.to_string();
            }
            bar.inc(1);
        }
        rows.push(Row {
            mode: name,
            to_vcpus: median(to_vcpus),
            to_done: median(to_done),
            faults,
            prefetched,
            ok,
        });
    }
    bar.finish_and_clear();

    println!();
    println!(
        "cold boot of '{}' ({} MiB, writes {} MiB, READY): {:.1} ms to READY",
        guest.name,
        args.mem_mib,
        args.touch_mib,
        cold.ready_after.map(ms).unwrap_or(f64::NAN)
    );
    println!(
        "snapshot at READY: {:.1} ms, {} MiB of data in a {} MiB memory file ({:.1} MiB on disk)",
        snap.elapsed_ms,
        (snap.memory.data_pages * 4096) >> 20,
        snap.memory.total_bytes >> 20,
        snap.disk_bytes as f64 / 1048576.0
    );
    println!();
    println!(
        "{:<14} {:>16} {:>22} {:>8} {:>11} {:>9}",
        "restore mode",
        "start->vCPUs ms",
        "start->all pages ok ms",
        "faults",
        "prefetched",
        "verified"
    );
    for r in &rows {
        println!(
            "{:<14} {:>16.2} {:>22.2} {:>8} {:>11} {:>9}",
            r.mode,
            r.to_vcpus,
            r.to_done,
            r.faults,
            r.prefetched,
            if r.ok { "yes" } else { "NO" }
        );
    }
    println!();
    println!(
        "medians of {} restores each; the guest reads back every page it wrote before the snapshot.",
        args.runs.max(1)
    );
    if let Some(dir) = &args.keep {
        println!("snapshot kept in {}", dir.display());
    }
    Ok(if rows.iter().all(|r| r.ok) { 0 } else { 1 })
}
