//! VMM core figures, side by side in one run: process start to the first serial byte and to READY
//! for the smallest test guest, the VMM's resident memory without guest RAM, and PIO exits per
//! second. Prints medians with their spread (p10-p90) and the ratios that matter.
//!
//!   cargo build --release --bin kata-snap && cargo run --release -p benches --bin vmm-core-bench

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use benches::{Summary, kata_snap_binary, rss_split, summarize, time_boot};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Benchmark the VMM core: boot timings, resident memory, PIO exit rate")]
struct Args {
    /// Boots per measurement.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The kata-snap binary [default: next to this program].
    #[arg(long)]
    kata_snap: Option<PathBuf>,
    /// PIO writes per run of the PIO guest.
    #[arg(long, default_value_t = 20_000)]
    pio_iters: u64,
}

fn row(name: &str, unit: &str, s: Option<Summary>) {
    match s {
        Some(s) => println!(
            "{name:<46} {:>10.2} {unit:<6} (p10 {:.2}, p90 {:.2}, n={})",
            s.median, s.p10, s.p90, s.n
        ),
        None => println!("{name:<46} {:>10} {unit:<6}", "-"),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn resident_memory(bin: &PathBuf, mem_mib: u64) -> Result<(f64, f64)> {
    let dir =
        std::env::temp_dir().join(format!("kata-snap-bench-{}-{mem_mib}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let serial = dir.join("serial.log");
    let mut child = Command::new(bin)
        .args([
            "boot",
            "--kernel",
            "builtin:spin",
            "--mem-mib",
            &mem_mib.to_string(),
            "--serial-log",
        ])
        .arg(&serial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("tick 2")
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("spin guest did not tick");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ranges = vmm::layout::MemoryLayout::new(mem_mib)?;
    let sizes: Vec<u64> = ranges.ram.iter().map(|r| r.size / 1024).collect();
    let (total, guest) = rss_split(child.id(), &sizes)?;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(((total - guest) as f64 / 1024.0, guest as f64 / 1024.0))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = kata_snap_binary(args.kata_snap.clone()).map_err(anyhow::Error::msg)?;
    println!(
        "kata-snap VMM core benchmark: {} runs each, binary {}",
        args.runs,
        bin.display()
    );
    println!("host: {}", vmm::host::check_host().summary);
    println!();

    let (mut ext_first, mut int_first, mut ext_exit, mut int_ready, mut int_vcpus) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let t = time_boot(&bin, &["--kernel", "builtin:ready"]).context("boot builtin:ready")?;
        if t.status != Some(0) {
            bail!("builtin:ready exited with {:?}: {}", t.status, t.stderr);
        }
        ext_first.extend(t.external_first_byte.map(ms));
        ext_exit.push(ms(t.external_exit));
        int_first.extend(t.internal_ms("process start -> first serial byte"));
        int_ready.extend(t.internal_ms("process start -> READY"));
        int_vcpus.extend(t.internal_ms("process start -> vCPUs running"));
    }
    println!("== boot of the smallest guest (builtin:ready, 256 MiB, 1 vCPU)");
    row(
        "process start -> vCPUs running (VMM clock)",
        "ms",
        summarize(&int_vcpus),
    );
    row(
        "process start -> first serial byte (VMM clock)",
        "ms",
        summarize(&int_first),
    );
    row(
        "process start -> READY (VMM clock)",
        "ms",
        summarize(&int_ready),
    );
    row(
        "spawn -> first serial byte on stdout (outside)",
        "ms",
        summarize(&ext_first),
    );
    row(
        "spawn -> process exit (outside)",
        "ms",
        summarize(&ext_exit),
    );
    if let (Some(r), Some(v)) = (summarize(&int_ready), summarize(&int_vcpus)) {
        println!(
            "ratio READY / vCPUs running: {:.2} (guest time to READY is {:.2} ms of it)",
            r.median / v.median,
            r.median - v.median
        );
    }
    if let (Some(e), Some(i)) = (summarize(&ext_first), summarize(&int_first)) {
        println!(
            "ratio first byte outside / VMM clock: {:.2} (exec and pipe cost {:.2} ms)",
            e.median / i.median,
            e.median - i.median
        );
    }
    println!();

    println!("== resident memory while a guest runs (builtin:spin)");
    let mut results = Vec::new();
    for mem in [256u64, 1024] {
        let mut vmm_rss = Vec::new();
        let mut guest_rss = Vec::new();
        for _ in 0..args.runs.clamp(1, 5) {
            let (v, g) = resident_memory(&bin, mem)?;
            vmm_rss.push(v);
            guest_rss.push(g);
        }
        row(
            &format!("VMM RSS without guest RAM, {mem} MiB guest"),
            "MiB",
            summarize(&vmm_rss),
        );
        row(
            &format!("guest RAM resident, {mem} MiB guest"),
            "MiB",
            summarize(&guest_rss),
        );
        results.push(summarize(&vmm_rss).map(|s| s.median));
    }
    if let [Some(a), Some(b)] = results[..] {
        println!(
            "ratio VMM RSS 1024 MiB / 256 MiB guest: {:.2} (guest RAM is touched lazily; VMM overhead should not grow)",
            b / a
        );
    }
    println!();

    println!(
        "== PIO exits (builtin:pio, {} writes to an unclaimed port)",
        args.pio_iters
    );
    let cmdline = format!("iters={}", args.pio_iters);
    let mut rate = Vec::new();
    let mut per_exit = Vec::new();
    for _ in 0..args.runs.clamp(1, 10) {
        let t = time_boot(&bin, &["--kernel", "builtin:pio", "--cmdline", &cmdline])?;
        let run_ms = t
            .internal_ms("guest run time")
            .context("no guest run time")?;
        let exits = t
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("kata-snap: exits: "))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .context("no exit counts")?;
        rate.push(exits / (run_ms / 1e3));
        per_exit.push(run_ms * 1e3 / exits);
    }
    row(
        "PIO exits per second (whole guest run)",
        "exit/s",
        summarize(&rate),
    );
    row(
        "time per PIO exit, guest loop included",
        "us",
        summarize(&per_exit),
    );
    Ok(())
}
