//! Start-up speed and clone density, side by side in one run, as one table (issue 15):
//!
//! 1. process start -> the guest's first output after restore, at 256 MiB and 4 GiB: the *floor*
//!    (this program's `floor` subcommand: KVM VM, one memslot per RAM region mapped privately from
//!    the memory file, one vCPU with the saved registers, run to the first serial byte), kata-snap
//!    cold, kata-snap through a pool of pre-started VMMs, and through a pool shell that
//!    pre-loaded the template (only the clone's host resources attached at the claim); ratio to
//!    the floor;
//! 2. process start -> the guest has read back its working set, per restore mode;
//! 3. 32 and 64 clones of one template at once: proportional memory per clone (sum of `Pss` over
//!    the clones / their number, once all have read their data back), wall time, restores/s;
//! 4. a pool shell at rest (RSS, fds) and the pool's refill rate;
//! 5. `kata-snap run` against `runc run` of one bundle (`benches::run_bench`, also alone as
//!    `run-bench`).
//!
//!   cargo build --release --bin kata-snap && cargo run --release -p benches --bin startup-bench

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use benches::{Summary, kata_snap_binary, summarize};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Start-up speed and clone density: floor, cold, pool, modes, clones")]
struct Args {
    #[command(subcommand)]
    floor: Option<Floor>,
    /// Runs per measurement.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Guest sizes in MiB for the first-output section.
    #[arg(long, value_delimiter = ',', default_value = "256,4096")]
    sizes: Vec<u64>,
    /// Clone counts for the density section.
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    clones: Vec<usize>,
    /// MiB each clone reads back.
    #[arg(long, default_value_t = 16)]
    clone_mib: u64,
    /// The kata-snap binary [default: next to this program].
    #[arg(long)]
    kata_snap: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Floor {
    /// The least a restore can do (used by the benchmark itself).
    Floor {
        /// The snapshot directory.
        #[arg(long)]
        snapshot: PathBuf,
    },
}

const MODES: [&str; 5] = ["eager", "mmap", "uffd", "uffd-prefetch", "mmap-prefetch"];

fn fmt(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:>7.2} ({:.2}-{:.2})", s.median, s.p10, s.p90),
        None => format!("{:>7}", "-"),
    }
}

/// The floor: a restore that does nothing it does not have to.
fn floor(snapshot: &Path) -> Result<()> {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};
    let start = Instant::now();
    let (_, state): (_, vmm::persist::VmState) =
        snapshot::format::read_file(&snapshot.join("state"))?;
    let file = std::fs::File::open(snapshot.join("memory"))?;
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    vm.set_tss_address(0xfffb_d000)?;
    for (slot, r) in state.memory.iter().enumerate() {
        use std::os::fd::AsRawFd;
        // SAFETY: a private mapping of the memory file, kept for the life of this process.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                r.file_offset as libc::off_t,
            )
        };
        if host == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping above lives until the process exits.
        unsafe { vm.set_user_memory_region(region)? };
    }
    let saved = &state.vcpus[0];
    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.set_sregs(&saved.sregs)?;
    vcpu.set_regs(&saved.regs)?;
    loop {
        match vcpu.run()? {
            VcpuExit::IoIn(port, data) => {
                // The guest polls the UART's line status: transmitter empty.
                let v = if port == 0x3fd { 0x60 } else { 0xff };
                data.iter_mut().for_each(|b| *b = v);
            }
            VcpuExit::IoOut(0x3f8, _) => break,
            VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => {}
            other => bail!("floor: unexpected exit {other:?}"),
        }
    }
    println!(
        "floor: process start -> first serial byte: {:.3} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn kata(bin: &Path, pool: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("KATA_SNAP_POOL_DIR", pool).stdin(Stdio::null());
    c
}

/// A `key: value ms` line of `--timing` output.
fn timing(stderr: &str, key: &str) -> Option<f64> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(&format!("kata-snap: {key}: ")))
        .and_then(|v| v.strip_suffix(" ms"))
        .and_then(|v| v.parse().ok())
}

fn make_template(bin: &Path, dir: &Path, mem: u64, touch: u64, clone: bool) -> Result<()> {
    let cmdline = format!(
        "touch_mib={touch} touch_base_mib=16{}",
        if clone { " clone=1" } else { "" }
    );
    let out = Command::new(bin)
        .args(["boot", "--kernel", "builtin:memtouch", "--mem-mib"])
        .arg(mem.to_string())
        .args(["--cmdline", &cmdline, "--snapshot-on-ready"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("template: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Record the working set (a clone template waits for two bytes on its console).
    let mut rec = Command::new(bin)
        .args(["restore", "--no-pool", "--mode", "uffd", "--snapshot"])
        .arg(dir)
        .arg("--record-workingset")
        .arg(dir.join("workingset"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    rec.stdin.take().context("stdin")?.write_all(b"zz")?;
    let out = rec.wait_with_output()?;
    if !out.status.success() {
        bail!("recording: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// One restore; returns (process start -> first serial byte, spawn -> exit) in ms.
fn restore_once(
    bin: &Path,
    pool: &Path,
    snap: &Path,
    mode: &str,
    pooled: bool,
) -> Result<(f64, f64)> {
    let t = Instant::now();
    let mut c = kata(bin, pool);
    c.args(["restore", "--timing", "--mode", mode, "--snapshot"])
        .arg(snap);
    if !pooled {
        c.arg("--no-pool");
    }
    let out = c.output()?;
    let wall = t.elapsed().as_secs_f64() * 1e3;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("memtouch: OK") {
        bail!("restore {mode}: {stderr}");
    }
    let path = if pooled {
        "restore path: pool"
    } else {
        "restore path: cold"
    };
    if !stderr.contains(path) {
        bail!("restore {mode} did not take the {path:?}: {stderr}");
    }
    let first = timing(&stderr, "process start -> first serial byte").context("first byte")?;
    Ok((first, wall))
}

fn start_pool(bin: &Path, pool: &Path, size: usize, mem: u64) -> Result<f64> {
    let t = Instant::now();
    let out = kata(bin, pool)
        .args([
            "pool",
            "start",
            "--size",
            &size.to_string(),
            "--mem-mib",
            &mem.to_string(),
            // Plain shells only: the pre-loaded row has its own pool.
            "--preload-size",
            "0",
        ])
        .output()?;
    if !out.status.success() {
        bail!("pool start: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// A pool whose shells pre-load `snap` (mmap-prefetch); waits until they are ready.
fn start_preloaded_pool(bin: &Path, pool: &Path, snap: &Path, mem: u64) -> Result<()> {
    let out = kata(bin, pool)
        .args(["pool", "start", "--size", "1", "--preload-size", "2"])
        .args(["--mem-mib", &mem.to_string(), "--template"])
        .arg(snap)
        .args(["--template-mode", "mmap-prefetch"])
        .output()?;
    if !out.status.success() {
        bail!("pool start: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// One restore through a pre-loaded shell (waits for one to be ready first, as a pool that
/// keeps up with its clients has one).
fn restore_preloaded(bin: &Path, pool: &Path, snap: &Path) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(pool.join("ready"))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with('t'))
    {
        if Instant::now() > deadline {
            bail!("no pre-loaded shell got ready in 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = kata(bin, pool);
    c.args([
        "restore",
        "--timing",
        "--mode",
        "mmap-prefetch",
        "--snapshot",
    ])
    .arg(snap);
    let out = c.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        || !String::from_utf8_lossy(&out.stdout).contains("memtouch: OK")
        || !stderr.contains("restore path: pool, template pre-loaded")
    {
        bail!("pre-loaded restore: {stderr}");
    }
    timing(&stderr, "process start -> first serial byte").context("first byte")
}

fn stop_pool(bin: &Path, pool: &Path) {
    let _ = kata(bin, pool).args(["pool", "stop"]).output();
}

fn first_output_section(args: &Args, bin: &Path, work: &Path) -> Result<()> {
    println!(
        "\n== process start -> first guest output after restore, ms, median (p10-p90); ratio to the floor"
    );
    println!(
        "{:>7} {:<30} {:<28} {:>6}",
        "guest", "path", "first output", "floor"
    );
    for &mem in &args.sizes {
        let snap = work.join(format!("first-{mem}"));
        make_template(bin, &snap, mem, 8, false)?;
        let pool = work.join(format!("pool-{mem}"));
        start_pool(bin, &pool, 2, mem)?;
        let pre_pool = work.join(format!("pool-pre-{mem}"));
        start_preloaded_pool(bin, &pre_pool, &snap, mem)?;
        let me = std::env::current_exe()?;
        let mut rows: Vec<(String, Vec<f64>)> = vec![("floor".into(), Vec::new())];
        for mode in ["uffd", "mmap-prefetch"] {
            rows.push((format!("kata-snap cold, {mode}"), Vec::new()));
            rows.push((format!("kata-snap pool, {mode}"), Vec::new()));
        }
        rows.push(("pre-loaded pool, mmap-prefetch".into(), Vec::new()));
        for _ in 0..args.runs {
            // Alternate every path within each round: shared-machine noise hits all alike.
            let out = Command::new(&me)
                .args(["floor", "--snapshot"])
                .arg(&snap)
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix("floor: process start -> first serial byte: "))
                .and_then(|v| v.strip_suffix(" ms"))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("floor: {}", String::from_utf8_lossy(&out.stderr)))?;
            rows[0].1.push(v);
            for (i, mode) in ["uffd", "mmap-prefetch"].iter().enumerate() {
                rows[1 + 2 * i]
                    .1
                    .push(restore_once(bin, &pool, &snap, mode, false)?.0);
                rows[2 + 2 * i]
                    .1
                    .push(restore_once(bin, &pool, &snap, mode, true)?.0);
            }
            rows[5].1.push(restore_preloaded(bin, &pre_pool, &snap)?);
        }
        stop_pool(bin, &pool);
        stop_pool(bin, &pre_pool);
        let floor_median = summarize(&rows[0].1).map(|s| s.median).unwrap_or(f64::NAN);
        for (name, v) in &rows {
            let s = summarize(v);
            println!(
                "{:>5}Mi {:<30} {:<28} {:>6.2}",
                mem,
                name,
                fmt(s),
                s.map(|s| s.median / floor_median).unwrap_or(f64::NAN)
            );
        }
        std::fs::remove_dir_all(&snap).ok();
    }
    Ok(())
}

fn readback_section(args: &Args, bin: &Path, work: &Path) -> Result<()> {
    println!(
        "\n== process start -> guest done reading back 64 MiB it wrote (512 MiB guest), ms, cold"
    );
    let snap = work.join("readback");
    make_template(bin, &snap, 512, 64, false)?;
    let nopool = work.join("no-pool");
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for _ in 0..args.runs {
        for (i, mode) in MODES.iter().enumerate() {
            results[i].push(restore_once(bin, &nopool, &snap, mode, false)?.1);
        }
    }
    let base = summarize(&results[1]).map(|s| s.median).unwrap_or(f64::NAN);
    for (mode, v) in MODES.iter().zip(&results) {
        let s = summarize(v);
        println!(
            "{:<14} {:<28} ratio to mmap {:.2}",
            mode,
            fmt(s),
            s.map(|s| s.median / base).unwrap_or(f64::NAN)
        );
    }
    std::fs::remove_dir_all(&snap).ok();
    Ok(())
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn density_section(args: &Args, bin: &Path, work: &Path) -> Result<()> {
    println!(
        "\n== clones of one template at once, each reading back {} MiB: Pss per clone, wall time to all verified, restores/s",
        args.clone_mib
    );
    let snap = work.join("clones");
    make_template(bin, &snap, 256, args.clone_mib, true)?;
    let nopool = work.join("no-pool");
    println!(
        "{:>6} {:<14} {:>14} {:>10} {:>11}",
        "clones", "mode", "Pss/clone MiB", "wall s", "restores/s"
    );
    for &n in &args.clones {
        for mode in ["mmap", "uffd", "uffd-prefetch", "mmap-prefetch"] {
            let logs: Vec<PathBuf> = (0..n)
                .map(|i| work.join(format!("clone-{i}.log")))
                .collect();
            let t = Instant::now();
            let mut children: Vec<Child> = logs
                .iter()
                .map(|log| {
                    kata(bin, &nopool)
                        .args(["restore", "--no-pool", "--mode", mode, "--snapshot"])
                        .arg(&snap)
                        .arg("--serial-log")
                        .arg(log)
                        .stdin(Stdio::piped())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                })
                .collect::<std::io::Result<_>>()?;
            let deadline = Instant::now() + Duration::from_secs(600);
            for log in &logs {
                while !std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .contains("memtouch: OK")
                {
                    if Instant::now() > deadline {
                        bail!("{mode}: a clone did not verify in time");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let wall = t.elapsed().as_secs_f64();
            let pss: u64 = children.iter().map(|c| pss_kib(c.id())).sum();
            for c in &mut children {
                let mut stdin = c.stdin.take().context("stdin")?;
                stdin.write_all(b"ab")?;
            }
            for c in &mut children {
                let status = c.wait()?;
                if !status.success() {
                    bail!("{mode}: a clone failed");
                }
            }
            for log in &logs {
                std::fs::remove_file(log).ok();
            }
            println!(
                "{:>6} {:<14} {:>14.2} {:>10.2} {:>11.1}",
                n,
                mode,
                pss as f64 / n as f64 / 1024.0,
                wall,
                n as f64 / wall
            );
        }
    }
    std::fs::remove_dir_all(&snap).ok();
    Ok(())
}

fn pool_section(bin: &Path, work: &Path) -> Result<()> {
    println!("\n== pool: a shell at rest, refill rate");
    let pool = work.join("pool-rest");
    let size = 8;
    let secs = start_pool(bin, &pool, size, 256)?;
    let shell = std::fs::read_dir(pool.join("ready"))?
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".sock")?
                .rsplit('-')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .context("no ready shell")?;
    let status = std::fs::read_to_string(format!("/proc/{shell}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    let fds = std::fs::read_dir(format!("/proc/{shell}/fd"))?.count();
    println!(
        "shell at rest: RSS {rss}, {fds} fds, Pss {} KiB",
        pss_kib(shell)
    );
    println!(
        "refill: {size} shells from none in {:.2} s = {:.1} shells/s",
        secs,
        size as f64 / secs
    );
    stop_pool(bin, &pool);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Floor::Floor { snapshot }) = &args.floor {
        return floor(snapshot);
    }
    let bin = kata_snap_binary(args.kata_snap.clone()).map_err(anyhow::Error::msg)?;
    let work = tempfile::tempdir()?;
    println!(
        "kata-snap start-up benchmark: {} runs each; binary {}",
        args.runs,
        bin.display()
    );
    println!("host: {}", vmm::host::check_host().summary);
    first_output_section(&args, &bin, work.path())?;
    readback_section(&args, &bin, work.path())?;
    density_section(&args, &bin, work.path())?;
    pool_section(&bin, work.path())?;
    benches::run_bench::section(&bin, work.path(), args.runs, false, false)
}
