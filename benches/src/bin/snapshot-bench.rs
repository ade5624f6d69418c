//! Snapshot and restore figures side by side in one run, printed as one table:
//! - restore latency (process start to vCPUs running) per mode at 128 MiB .. 4 GiB;
//! - restore to guest completion for a guest that reads back a large touched area, per mode;
//! - snapshot create time and on-disk size against guest memory size;
//! - page fault service time of the page server against one fault answered by one UFFDIO_COPY;
//! - prefetch throughput against a plain sequential read of the same file.
//!
//!   cargo build --release --bin kata-snap && cargo run --release -p benches --bin snapshot-bench

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use benches::{Summary, kata_snap_binary, summarize, time_boot};
use clap::Parser;
use snapshot::PAGE_SIZE;
use snapshot::memory::{HoleMap, MemoryRegion};
use snapshot::page_server::{
    PageServer, PageServerConfig, PageServerHandle, UffdRegion, create_uffd,
};

#[derive(Debug, Parser)]
#[command(
    about = "Benchmark snapshots and restores: latency per mode and size, fault service, prefetch"
)]
struct Args {
    /// Restores per measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024,2048,4096")]
    sizes: Vec<u64>,
    /// The kata-snap binary [default: next to this program].
    #[arg(long)]
    kata_snap: Option<PathBuf>,
    /// MiB the guest touches before READY (latency section).
    #[arg(long, default_value_t = 8)]
    touch_mib: u64,
    /// MiB the guest writes and reads back (completion section).
    #[arg(long, default_value_t = 64)]
    readback_mib: u64,
    /// Only the host-side sections (fault service, prefetch): no VMs.
    #[arg(long)]
    host_only: bool,
    /// Another kata-snap binary (e.g. one built before a change) to compare restore latency with,
    /// side by side: restores of both alternate, each from a snapshot the binary made itself.
    /// Only this comparison runs.
    #[arg(long, value_name = "BIN")]
    baseline: Option<PathBuf>,
}

const MODES: [&str; 5] = ["eager", "mmap", "uffd", "uffd-prefetch", "mmap-prefetch"];

fn fmt(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:>8.2} ({:.2}-{:.2})", s.median, s.p10, s.p90),
        None => format!("{:>8}", "-"),
    }
}

fn make_snapshot(bin: &Path, dir: &Path, mem: u64, touch: u64) -> Result<(f64, u64)> {
    let cmdline = format!("touch_mib={touch} touch_base_mib=16");
    let t = time_boot(
        bin,
        &[
            "--kernel",
            "builtin:memtouch",
            "--mem-mib",
            &mem.to_string(),
            "--cmdline",
            &cmdline,
            "--snapshot-on-ready",
            dir.to_str().unwrap(),
        ],
    )?;
    if t.status != Some(0) {
        bail!("snapshot of {mem} MiB failed: {}", t.stderr);
    }
    let line = t
        .stderr
        .lines()
        .find(|l| l.contains("kata-snap: snapshot: "))
        .context("no snapshot line")?;
    let ms: f64 = line
        .split("snapshot: ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|v| v.parse().ok())
        .context("snapshot time")?;
    let bytes: u64 = line
        .split(", ")
        .last()
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .context("disk bytes")?;
    Ok((ms, bytes))
}

/// One uffd restore that records the snapshot's working set into it (what uffd-prefetch reads).
/// A `legacy` binary (built before restores stopped writing into snapshots) records on its first
/// uffd restore by itself.
fn record_workingset(bin: &Path, snap: &Path, legacy: bool) -> Result<()> {
    let ws = snap.join("workingset");
    let extra: Vec<&str> = if legacy {
        vec![]
    } else {
        vec!["--record-workingset", ws.to_str().unwrap()]
    };
    restore_runs_with(bin, snap, "uffd", 1, &extra)?;
    if !ws.exists() {
        bail!("no working set was recorded into {}", snap.display());
    }
    Ok(())
}

/// Whether `bin` predates `--record-workingset FILE` (it recorded on its first uffd restore).
fn legacy_recorder(bin: &Path) -> bool {
    std::process::Command::new(bin)
        .args(["restore", "--help"])
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stdout).contains("--record-workingset <FILE>"))
        .unwrap_or(true)
}

fn restore_runs(bin: &Path, snap: &Path, mode: &str, runs: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    restore_runs_with(bin, snap, mode, runs, &[])
}

fn restore_runs_with(
    bin: &Path,
    snap: &Path,
    mode: &str,
    runs: usize,
    extra: &[&str],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut to_vcpus, mut to_exit) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let start = Instant::now();
        let out = std::process::Command::new(bin)
            .args(["restore", "--timing", "--mode", mode, "--snapshot"])
            .arg(snap)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()?;
        let elapsed = start.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("memtouch: OK") {
            bail!("restore {mode} of {} failed: {stderr}", snap.display());
        }
        let v = stderr
            .lines()
            .find_map(|l| l.strip_prefix("kata-snap: process start -> vCPUs running: "))
            .and_then(|v| v.strip_suffix(" ms"))
            .and_then(|v| v.parse().ok())
            .context("no vCPUs running time")?;
        to_vcpus.push(v);
        to_exit.push(elapsed.as_secs_f64() * 1e3);
    }
    Ok((to_vcpus, to_exit))
}

/// Registers `pages` pages of anonymous memory with a new userfaultfd.
fn uffd_region(pages: usize) -> Result<(userfaultfd::Uffd, usize)> {
    let len = pages * PAGE_SIZE;
    // SAFETY: a fresh private anonymous mapping, unmapped when the process ends.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        bail!("mmap failed");
    }
    let uffd = create_uffd()?;
    PageServer::register(&uffd, ptr as usize, len)?;
    Ok((uffd, ptr as usize))
}

/// Touches every page from a separate thread and times each first touch.
fn touch_all(addr: usize, pages: usize, stride: usize) -> Vec<f64> {
    std::thread::spawn(move || {
        (0..pages)
            .step_by(stride)
            .map(|p| {
                let t = Instant::now();
                // SAFETY: inside the registered mapping; the server under test fills the page.
                unsafe { std::ptr::read_volatile((addr + p * PAGE_SIZE) as *const u8) };
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect()
    })
    .join()
    .unwrap_or_default()
}

fn data_file(dir: &Path, pages: usize) -> Result<(File, PathBuf)> {
    let path = dir.join("memory");
    let f = File::create(&path)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x243f_6a88_85a3_08d3;
    for i in 0..(pages * PAGE_SIZE).div_ceil(chunk.len()) {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        f.write_all_at(&chunk, (i * chunk.len()) as u64)?;
    }
    f.sync_all()?;
    Ok((File::open(&path)?, path))
}

fn page_server_for(
    file: &File,
    pages: usize,
    fault_around: usize,
) -> Result<(Arc<PageServer>, usize)> {
    let (uffd, addr) = uffd_region(pages)?;
    let file = file.try_clone()?;
    let holes = HoleMap::from_file(&file, (pages * PAGE_SIZE) as u64)?;
    let region = UffdRegion {
        host_addr: addr,
        region: MemoryRegion {
            guest_addr: 0,
            size: (pages * PAGE_SIZE) as u64,
            file_offset: 0,
        },
    };
    Ok((
        Arc::new(PageServer::new(
            uffd,
            vec![region],
            Arc::new(snapshot::source::FileSource::new(file, holes)),
            PageServerConfig {
                fault_around,
                record: false,
            },
        )),
        addr,
    ))
}

/// The baseline: a thread that answers each fault with one UFFDIO_COPY of a ready page.
fn baseline_faults(pages: usize) -> Result<Vec<f64>> {
    let (uffd, addr) = uffd_region(pages)?;
    let uffd = Arc::new(uffd);
    let server = {
        let uffd = uffd.clone();
        std::thread::spawn(move || {
            let page = vec![0x5au8; PAGE_SIZE];
            let mut served = 0;
            while served < pages {
                let mut fds = [libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&*uffd),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: polling one valid fd.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
                while let Ok(Some(userfaultfd::Event::Pagefault { addr, .. })) = uffd.read_event() {
                    let dst = (addr as usize) & !(PAGE_SIZE - 1);
                    // SAFETY: dst is a page of the registered mapping; `page` holds a page.
                    let _ = unsafe {
                        uffd.copy(
                            page.as_ptr().cast(),
                            dst as *mut libc::c_void,
                            PAGE_SIZE,
                            true,
                        )
                    };
                    served += 1;
                }
            }
        })
    };
    let times = touch_all(addr, pages, 1);
    server.join().ok();
    Ok(times)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = kata_snap_binary(args.kata_snap.clone()).map_err(anyhow::Error::msg)?;
    let work = tempfile::tempdir()?;
    println!(
        "kata-snap snapshot benchmark: {} runs each; binary {}",
        args.runs,
        bin.display()
    );
    println!("host: {}", vmm::host::check_host().summary);

    if let Some(baseline) = &args.baseline {
        return compare_sections(&args, &bin, baseline, work.path());
    }
    if !args.host_only {
        vm_sections(&args, &bin, work.path())?;
    }
    host_sections(&args, work.path())
}

/// Restore latency of this binary against a baseline binary, runs alternating.
fn compare_sections(args: &Args, bin: &Path, baseline: &Path, work: &Path) -> Result<()> {
    println!(
        "\n== restore latency, this binary vs baseline {} (alternating runs): process start -> vCPUs running, ms, median (p10-p90)",
        baseline.display()
    );
    println!(
        "{:>8} {:<14} {:<26}{:<26}{:>8}",
        "guest", "mode", "this", "baseline", "ratio"
    );
    for &mem in &args.sizes {
        let new_snap = work.join(format!("new-{mem}"));
        let old_snap = work.join(format!("old-{mem}"));
        make_snapshot(bin, &new_snap, mem, args.touch_mib)?;
        make_snapshot(baseline, &old_snap, mem, args.touch_mib)?;
        record_workingset(bin, &new_snap, false)?;
        record_workingset(baseline, &old_snap, legacy_recorder(baseline))?;
        // The modes both builds have.
        for mode in &MODES[..4] {
            let (mut new, mut old) = (Vec::new(), Vec::new());
            for _ in 0..args.runs {
                new.extend(restore_runs(bin, &new_snap, mode, 1)?.0);
                old.extend(restore_runs(baseline, &old_snap, mode, 1)?.0);
            }
            let (n, o) = (summarize(&new), summarize(&old));
            let ratio = match (n, o) {
                (Some(n), Some(o)) => format!("{:.2}", n.median / o.median),
                _ => "-".into(),
            };
            println!(
                "{:>6}Mi {:<14} {:<26}{:<26}{:>8}",
                mem,
                mode,
                fmt(n),
                fmt(o),
                ratio
            );
        }
        std::fs::remove_dir_all(&new_snap).ok();
        std::fs::remove_dir_all(&old_snap).ok();
    }
    Ok(())
}

fn vm_sections(args: &Args, bin: &Path, work: &Path) -> Result<()> {
    let bin = bin.to_path_buf();
    println!(
        "\n== restore latency: process start -> vCPUs running, ms, median (p10-p90); guest touched {} MiB",
        args.touch_mib
    );
    println!(
        "{:>8} {:>12} {:>10}   {:<24}{:<24}{:<24}{:<24}{:<24}",
        "guest", "snapshot ms", "disk MiB", MODES[0], MODES[1], MODES[2], MODES[3], MODES[4]
    );
    let mut first_row: Option<Vec<f64>> = None;
    let mut last_row: Vec<f64> = Vec::new();
    for &mem in &args.sizes {
        let snap = work.join(format!("lat-{mem}"));
        let (snap_ms, disk) = make_snapshot(&bin, &snap, mem, args.touch_mib)?;
        // One uffd restore records the working set that uffd-prefetch uses.
        record_workingset(&bin, &snap, false)?;
        let mut cells = Vec::new();
        let mut medians = Vec::new();
        for mode in MODES {
            let (v, _) = restore_runs(&bin, &snap, mode, args.runs)?;
            let s = summarize(&v);
            medians.push(s.map(|s| s.median).unwrap_or(f64::NAN));
            cells.push(fmt(s));
        }
        println!(
            "{:>6}Mi {:>12.1} {:>10.1}   {:<24}{:<24}{:<24}{:<24}{:<24}",
            mem,
            snap_ms,
            disk as f64 / 1048576.0,
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4]
        );
        if first_row.is_none() {
            first_row = Some(medians.clone());
        }
        last_row = medians;
        std::fs::remove_dir_all(&snap).ok();
    }
    if let (Some(first), [_, ..]) = (&first_row, &last_row[..]) {
        let ratios: Vec<String> = MODES
            .iter()
            .zip(first.iter().zip(&last_row))
            .map(|(m, (a, b))| format!("{m} {:.2}", b / a))
            .collect();
        println!("ratio largest / smallest guest: {}", ratios.join(", "));
    }

    println!(
        "\n== restore -> guest done: the guest reads back {} MiB it wrote before the snapshot (512 MiB guest), ms",
        args.readback_mib
    );
    let snap = work.join("readback");
    make_snapshot(&bin, &snap, 512, args.readback_mib)?;
    record_workingset(&bin, &snap, false)?;
    let mut done = Vec::new();
    for mode in MODES {
        let (_, exit) = restore_runs(&bin, &snap, mode, args.runs)?;
        let s = summarize(&exit);
        done.push(s.map(|s| s.median).unwrap_or(f64::NAN));
        println!("{:<14} {}", mode, fmt(s));
    }
    println!(
        "ratio to eager: {}",
        MODES
            .iter()
            .zip(&done)
            .map(|(m, d)| format!("{m} {:.2}", d / done[0]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn host_sections(args: &Args, work: &Path) -> Result<()> {
    println!(
        "\n== page fault service, one 4 KiB page per fault, first touch from another thread, us"
    );
    let pages = 4096;
    let base = summarize(&baseline_faults(pages)?);
    let (file, path) = data_file(work, pages)?;
    let mut warm = Vec::new();
    File::open(&path)?.read_to_end(&mut warm)?;
    let (server, addr) = page_server_for(&file, pages, 1)?;
    let mut handle = PageServerHandle::spawn(server.clone())?;
    let ours = summarize(&touch_all(addr, pages, 1));
    handle.stop()?;
    let (server16, addr16) = page_server_for(&file, pages, 16)?;
    let mut handle16 = PageServerHandle::spawn(server16.clone())?;
    let t16 = Instant::now();
    touch_all(addr16, pages, 1);
    let per_page_16 = t16.elapsed().as_secs_f64() * 1e6 / pages as f64;
    handle16.stop()?;
    println!(
        "{:<44} {}",
        "baseline: one UFFDIO_COPY of a ready page",
        fmt(base).trim_start()
    );
    println!(
        "{:<44} {}",
        "page server: file read + UFFDIO_COPY",
        fmt(ours).trim_start()
    );
    if let (Some(b), Some(o)) = (base, ours) {
        println!(
            "ratio page server / baseline: median {:.2}, p90 {:.2}",
            o.median / b.median,
            o.p90 / b.p90
        );
    }
    let mut times = server
        .stats
        .service_ns
        .lock()
        .map(|t| t.clone())
        .unwrap_or_default();
    times.sort_unstable();
    if !times.is_empty() {
        println!(
            "page server service time inside the server: median {:.1} us, p99 {:.1} us ({} faults)",
            f64::from(times[times.len() / 2]) / 1e3,
            f64::from(times[times.len() * 99 / 100]) / 1e3,
            times.len()
        );
    }
    println!(
        "fault-around 16: {per_page_16:.2} us per page touched ({} faults for {pages} pages)",
        server16
            .stats
            .faults
            .load(std::sync::atomic::Ordering::Relaxed)
    );

    println!(
        "\n== prefetch of a whole working set against a sequential read of the same file (page cache warm)"
    );
    let bytes = (pages * PAGE_SIZE) as f64;
    let mut seq = Vec::new();
    let mut fresh = Vec::new();
    let mut pre = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        let mut f = File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        while f.read(&mut buf)? > 0 {}
        seq.push(bytes / t.elapsed().as_secs_f64() / 1048576.0);
        // What eager restore does: read(2) into fresh anonymous memory (every page first-touched).
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let t = Instant::now();
        // SAFETY: the mapping is `len` bytes and ours alone.
        let dst = unsafe { std::slice::from_raw_parts_mut(mem.cast::<u8>(), len) };
        file.read_exact_at(dst, 0)?;
        fresh.push(bytes / t.elapsed().as_secs_f64() / 1048576.0);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(mem, len) };
        let (server, _addr) = page_server_for(&file, pages, 1)?;
        let ws: Vec<u64> = (0..pages as u64).collect();
        let st = snapshot::prefetch::prefetch(&server, &ws)?;
        pre.push(bytes / st.elapsed.as_secs_f64() / 1048576.0);
    }
    let (s, p) = (summarize(&seq), summarize(&pre));
    println!(
        "{:<44} {} MiB/s",
        "sequential read(2), one reused 1 MiB buffer",
        fmt(s).trim_start()
    );
    let fr = summarize(&fresh);
    println!(
        "{:<44} {} MiB/s",
        "read(2) into fresh memory (eager restore)",
        fmt(fr).trim_start()
    );
    println!(
        "{:<44} {} MiB/s",
        "prefetch: io_uring reads + UFFDIO_COPY",
        fmt(p).trim_start()
    );
    if let (Some(s), Some(p), Some(fr)) = (s, p, fr) {
        println!(
            "ratio prefetch / sequential read: {:.2}; prefetch / read into fresh memory: {:.2}",
            p.median / s.median,
            p.median / fr.median
        );
    }
    Ok(())
}
