//! `kata-snap run` against `runc run` of the same busybox bundle on this host, side by side,
//! and where kata-snap's time goes (issue 22).
//!
//! kata-snap's guest is the built-in test guest `agent` (config `testGuest`): this host's KVM
//! cannot boot Linux at speed, and that guest answers the agent protocol from the request's
//! argv without running a process. So the host path is measured whole (bundle, template,
//! rootfs image key, supervisor, restore, vsock, Hello, Create, Start, output, exit,
//! teardown) and the guest's own work is not: a Linux guest's boot-free restore, mounts and
//! exec come on top (rung 4 measures those, emulated). runc runs busybox for real.
//!
//! Each round runs, in turn: kata-snap, runc, kata-snap `--debug` (whose timing line gives the
//! breakdown; the `--debug` runs are not in the headline). The template is warm and its working
//! set recorded (two runs first), so every timed run restores; no pool (`KATA_SNAP_POOL_DIR`
//! points at an empty directory): the VM is created on the restore path. Both runtimes keep
//! their state (`--root`) on a tmpfs, `/dev/shm`, as their defaults under `/run` are on a usual
//! host (here `/run` is on the root disk, where each fsync of a state file costs 8-15 ms); the
//! template and image cache stay on disk, as `/var/lib/kata-snap` would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{Summary, summarize};

/// The container's process in both runtimes.
pub const ARGS: [&str; 3] = ["sh", "-c", "echo hello"];
/// What it prints.
pub const EXPECTED: &str = "hello\n";
/// runc as Debian installs it (scripts/install-deps.sh).
pub const RUNC: &str = "/usr/sbin/runc";

/// What the comparison measured, in ms.
#[derive(Debug, Clone, Default)]
pub struct RunBench {
    /// `kata-snap run`, spawn to exit.
    pub kata: Vec<f64>,
    /// `runc run`, spawn to exit.
    pub runc: Vec<f64>,
    /// `kata-snap --debug run`, spawn to exit.
    pub kata_debug: Vec<f64>,
    /// `kata-snap run` with `"jail": false` in its config (only with [`measure`]'s `jail_off`):
    /// the jail's cost, side by side.
    pub kata_no_jail: Vec<f64>,
    /// Each step of the `--debug` runs' timing line, in the order they come.
    pub phases: Vec<(String, Vec<f64>)>,
    /// The timing line's totals (process start to teardown).
    pub totals: Vec<f64>,
    /// The same of `--debug` runs with the jail off (with `jail_off`).
    pub phases_no_jail: Vec<(String, Vec<f64>)>,
    /// Their totals.
    pub totals_no_jail: Vec<f64>,
    /// Their spawn-to-exit times.
    pub kata_debug_no_jail: Vec<f64>,
}

/// Adds a timing line's steps to `phases` (name: first position seen, values).
fn add_steps(phases: &mut BTreeMap<String, (usize, Vec<f64>)>, steps: Vec<(String, f64)>) {
    for (order, (name, v)) in steps.into_iter().enumerate() {
        phases.entry(name).or_insert((order, Vec::new())).1.push(v);
    }
}

/// The steps in the order they come.
fn ordered(phases: BTreeMap<String, (usize, Vec<f64>)>) -> Vec<(String, Vec<f64>)> {
    let mut v: Vec<(usize, String, Vec<f64>)> =
        phases.into_iter().map(|(k, (o, v))| (o, k, v)).collect();
    v.sort_by_key(|(o, _, _)| *o);
    v.into_iter().map(|(_, k, v)| (k, v)).collect()
}

/// A busybox bundle in `dir` whose process is [`ARGS`] (config.json from `kata-snap spec`).
pub fn make_bundle(bin: &Path, dir: &Path) -> Result<PathBuf> {
    let b = dir.join("bundle");
    let bindir = b.join("rootfs/bin");
    std::fs::create_dir_all(&bindir)?;
    std::fs::create_dir_all(b.join("rootfs/etc"))?;
    std::fs::copy("/bin/busybox", bindir.join("busybox"))
        .context("/bin/busybox (apt install busybox-static)")?;
    for a in ["sh", "echo"] {
        std::os::unix::fs::symlink("busybox", bindir.join(a))?;
    }
    let out = Command::new(bin)
        .args(["spec", "--bundle"])
        .arg(&b)
        .output()?;
    if !out.status.success() {
        bail!("kata-snap spec: {}", String::from_utf8_lossy(&out.stderr));
    }
    let path = b.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    spec["process"]["args"] = serde_json::json!(ARGS);
    spec["process"]["terminal"] = false.into();
    spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    std::fs::write(&path, spec.to_string())?;
    Ok(b)
}

/// The pool directory of the kata-snap runs with config `config` (a pool runs there only with
/// `--pool`; else the directory does not exist and no pool is used).
fn pool_dir(work: &Path, config: &str) -> PathBuf {
    work.join(format!("pool-{}", config.trim_end_matches(".json")))
}

/// `kata-snap` with the test guest, its own data directory, state root `root` and its pool
/// directory (no pool unless [`measure`] started one).
fn kata(bin: &Path, work: &Path, root: &Path) -> Command {
    kata_with(bin, work, root, "config.json")
}

/// As [`kata`], with the config file `config` in `work`.
fn kata_with(bin: &Path, work: &Path, root: &Path, config: &str) -> Command {
    let mut c = Command::new(bin);
    c.env("KATA_SNAP_CONFIG", work.join(config))
        .env("KATA_SNAP_DATA_DIR", work.join("data"))
        .env("KATA_SNAP_POOL_DIR", pool_dir(work, config))
        .arg("--root")
        .arg(root.join("kata-snap"));
    c
}

/// Pools started by [`measure`], stopped on drop.
struct Pools(Vec<Command>);

impl Drop for Pools {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.args(["pool", "stop"]).output();
        }
    }
}

/// A directory for the runtimes' state on a tmpfs (`/dev/shm`), else in `work`.
pub fn state_dir(work: &Path) -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    Ok(if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir_in(work)?
    })
}

/// Runs `c` with `args` to its end; checks it printed [`EXPECTED`] and exited 0. Returns the
/// spawn-to-exit time in ms and stderr.
fn timed(mut c: Command, args: &[&str]) -> Result<(f64, String)> {
    c.args(args).stdin(Stdio::null());
    let t = Instant::now();
    let out = c.output().with_context(|| format!("{c:?}"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() || out.stdout != EXPECTED.as_bytes() {
        bail!(
            "{:?} {args:?}: {}, stdout {:?}, stderr {stderr}",
            c.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok((ms, stderr))
}

/// The steps of a `timing: bundle 3.2, template 0.5, ... ms (total 100.7 ms)` line.
pub fn parse_timing(stderr: &str) -> Option<(Vec<(String, f64)>, f64)> {
    let line = stderr
        .lines()
        .find_map(|l| l.split_once("timing: ").map(|(_, t)| t))?;
    let (steps, total) = line.split_once(" ms (total ")?;
    let total = total.split(' ').next()?.parse().ok()?;
    let steps = steps
        .split(", ")
        .map(|p| {
            let (name, v) = p.rsplit_once(' ')?;
            Some((name.to_string(), v.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((steps, total))
}

/// Runs the comparison: `runs` alternating rounds after two warm-up runs, in `work`; with
/// `jail_off`, each round also runs kata-snap with its jail off (config `"jail": false`; the
/// others run with the default, jailed as root).
pub fn measure(
    bin: &Path,
    work: &Path,
    runs: usize,
    jail_off: bool,
    pool: bool,
) -> Result<RunBench> {
    if !Path::new(RUNC).exists() {
        bail!("{RUNC} missing: scripts/install-deps.sh installs it");
    }
    std::fs::write(work.join("config.json"), r#"{"testGuest": "agent"}"#)?;
    std::fs::write(
        work.join("config-no-jail.json"),
        r#"{"testGuest": "agent", "jail": false}"#,
    )?;
    let b = make_bundle(bin, work)?;
    let state = state_dir(work)?;
    let root = state.path();
    let bundle = b.to_str().context("bundle path")?;
    let mut pools = Pools(Vec::new());
    let configs: &[&str] = if jail_off {
        &["config.json", "config-no-jail.json"]
    } else {
        &["config.json"]
    };
    if pool {
        // A pool per config (its shells jailed as its config says), each VM of the template's
        // size class; the first restores through each teach it the template it pre-loads.
        for config in configs {
            std::fs::create_dir_all(pool_dir(work, config))?;
            let mut c = kata_with(bin, work, root, config);
            c.args(["pool", "start", "--size", "2", "--mem-mib", "256"]);
            let out = c.output()?;
            if !out.status.success() {
                bail!("pool start: {}", String::from_utf8_lossy(&out.stderr));
            }
            pools.0.push(kata_with(bin, work, root, config));
        }
    }
    // The first run warms the template and records its working set; the second restores it as
    // every later one does (through a pool: the pool learns the template; the next runs find
    // it pre-loaded once the pool refilled).
    for i in 0..(if pool { 4 } else { 2 }) {
        for config in configs {
            timed(
                kata_with(bin, work, root, config),
                &["run", "--bundle", bundle, &format!("w{i}{}", config.len())],
            )?;
        }
        if pool {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
    let mut r = RunBench::default();
    let mut phases: BTreeMap<String, (usize, Vec<f64>)> = BTreeMap::new();
    let mut phases_no_jail: BTreeMap<String, (usize, Vec<f64>)> = BTreeMap::new();
    for i in 0..runs {
        let id = format!("k{i}");
        r.kata
            .push(timed(kata(bin, work, root), &["run", "--bundle", bundle, &id])?.0);
        let mut c = Command::new(RUNC);
        c.arg("--root").arg(root.join("runc"));
        r.runc
            .push(timed(c, &["run", "--bundle", bundle, &format!("r{i}")])?.0);
        let (ms, stderr) = timed(
            kata(bin, work, root),
            &["--debug", "run", "--bundle", bundle, &format!("d{i}")],
        )?;
        r.kata_debug.push(ms);
        if jail_off {
            r.kata_no_jail.push(
                timed(
                    kata_with(bin, work, root, "config-no-jail.json"),
                    &["run", "--bundle", bundle, &format!("n{i}")],
                )?
                .0,
            );
            let (ms, stderr) = timed(
                kata_with(bin, work, root, "config-no-jail.json"),
                &["--debug", "run", "--bundle", bundle, &format!("nd{i}")],
            )?;
            r.kata_debug_no_jail.push(ms);
            let (steps, total) =
                parse_timing(&stderr).with_context(|| format!("no timing line in {stderr}"))?;
            add_steps(&mut phases_no_jail, steps);
            r.totals_no_jail.push(total);
        }
        let (steps, total) =
            parse_timing(&stderr).with_context(|| format!("no timing line in {stderr}"))?;
        add_steps(&mut phases, steps);
        r.totals.push(total);
        if pool {
            // The pools refill between rounds (each run took a shell).
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
    drop(pools);
    r.phases = ordered(phases);
    r.phases_no_jail = ordered(phases_no_jail);
    Ok(r)
}

fn cell(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:>7.1} ({:.1}-{:.1})", s.median, s.p10, s.p90),
        None => format!("{:>7}", "-"),
    }
}

fn median(v: &[f64]) -> f64 {
    summarize(v).map(|s| s.median).unwrap_or(f64::NAN)
}

/// What each step of the timing line covers.
fn explain(step: &str) -> &'static str {
    match step {
        "bundle" => "process start, flags, config.json parsed and checked",
        "template" => "config file, template key, template found",
        "rootfs image" => "rootfs keyed (tree signature), erofs image found in the cache",
        "supervisor" => "state directory claimed, record written",
        "network namespace" => {
            "stdio, image lease, the container's own network namespace made (unshare)"
        }
        "jail" => "uid, chown, devices opened, mount namespace, pivot_root, privileges dropped",
        s if s.starts_with("restore") => "VM created, snapshot loaded, memory mapped, vCPUs run",
        "vsock connect" => "CONNECT 1024 through the VM's vsock socket, guest accepts",
        "agent hello" => "Hello both ways",
        "clock and entropy" => "SyncTime, Reseed",
        "process prepared" => "Create (the bundle's process) answered Created",
        "created" => "stdio, control socket, record: created",
        "until start" => "run starts at once",
        "exec" => "Start answered Started",
        "process" => "the process's output and exit status",
        "teardown" => "VM stopped, its threads joined, record: stopped",
        _ => "",
    }
}

/// Prints the table.
pub fn print(r: &RunBench) {
    let (k, rc) = (median(&r.kata), median(&r.runc));
    let paired: Vec<f64> = r.kata.iter().zip(&r.runc).map(|(a, b)| a / b).collect();
    println!(
        "{:<44} {:<24} {:>7}",
        "spawn -> exit, ms", "median (p10-p90)", "/ runc"
    );
    for (name, v) in [
        ("runc run", &r.runc),
        ("kata-snap run (test guest agent)", &r.kata),
        ("kata-snap --debug run (for the breakdown)", &r.kata_debug),
    ] {
        println!(
            "{:<44} {:<24} {:>7.2}",
            name,
            cell(summarize(v)),
            median(v) / rc
        );
    }
    println!(
        "ratio kata-snap / runc: {:.2} (medians {k:.1} / {rc:.1} ms); median of the {} per-round ratios {:.2}",
        k / rc,
        paired.len(),
        median(&paired)
    );
    if !r.kata_no_jail.is_empty() {
        let off = median(&r.kata_no_jail);
        println!(
            "{:<44} {:<24} {:>7.2}",
            "kata-snap run, \"jail\": false",
            cell(summarize(&r.kata_no_jail)),
            off / rc
        );
        let rounds: Vec<f64> = r
            .kata
            .iter()
            .zip(&r.kata_no_jail)
            .map(|(a, b)| a / b)
            .collect();
        println!(
            "the jail's cost: jailed / not jailed {:.3} (medians {k:.1} / {off:.1} ms, {:+.1} ms); \
             median of the {} per-round ratios {:.3}",
            k / off,
            k - off,
            rounds.len(),
            median(&rounds)
        );
    }
    println!("\nwhere kata-snap run's time goes (--debug runs), ms, median (p10-p90):");
    let mut sum = 0.0;
    for (name, v) in &r.phases {
        sum += median(v);
        println!(
            "  {:<20} {:<24} {}",
            name,
            cell(summarize(v)),
            explain(name)
        );
    }
    let total = median(&r.totals);
    let wall = median(&r.kata_debug);
    println!(
        "  {:<20} {:<24} (steps' medians add up to {sum:.1})",
        "total (timing line)",
        cell(summarize(&r.totals))
    );
    println!(
        "  {:<20} {:>7.1}                  state directory removed, process exit, and the spawn \
         before main (wall - total)",
        "after teardown",
        wall - total
    );
    if !r.phases_no_jail.is_empty() {
        println!("\nthe same, jailed (above) and with the jail off, ms, median (p10-p90):");
        let col = |phases: &[(String, Vec<f64>)], name: &str| {
            cell(
                phases
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, v)| summarize(v)),
            )
        };
        let mut names: Vec<&String> = r.phases.iter().map(|(n, _)| n).collect();
        for (n, _) in &r.phases_no_jail {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        for name in names {
            println!(
                "  {:<20} {:<24} {:<24}",
                name,
                col(&r.phases, name),
                col(&r.phases_no_jail, name)
            );
        }
        println!(
            "  {:<20} {:<24} {:<24}",
            "total (timing line)",
            cell(summarize(&r.totals)),
            cell(summarize(&r.totals_no_jail))
        );
        println!(
            "  {:<20} {:>7.1}{:<17} {:>7.1}",
            "after teardown",
            wall - total,
            "",
            median(&r.kata_debug_no_jail) - median(&r.totals_no_jail)
        );
    }
}

/// The section of startup-bench: measures and prints.
pub fn section(bin: &Path, work: &Path, runs: usize, jail_off: bool, pool: bool) -> Result<()> {
    println!(
        "\n== kata-snap run vs runc run of one busybox bundle (`sh -c 'echo hello'`), {runs} alternating rounds; \
         kata-snap's guest is the test guest `agent` (host path only, no Linux guest)"
    );
    let dir = work.join("run-bench");
    std::fs::create_dir_all(&dir)?;
    if pool {
        println!("kata-snap restores through a running pool (2 shells per config, pre-loaded)");
    }
    let r = measure(bin, &dir, runs, jail_off, pool)?;
    print(&r);
    Ok(())
}

/// This host's load, for the report: `/proc/loadavg`'s first three fields and the CPU count.
pub fn load() -> String {
    let avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let avg: Vec<&str> = avg.split_whitespace().take(3).collect();
    format!(
        "load average {} on {} CPUs",
        avg.join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_timing_reads_steps_and_total() {
        let err = "time=\"x\" level=debug msg=\"restore mode Mmap\"\n\
                   time=\"x\" level=debug msg=\"timing: bundle 3.2, restore (cold) 20.0, \
                   teardown 36.7 ms (total 59.9 ms)\"\n";
        let (steps, total) = parse_timing(err).unwrap();
        assert_eq!(
            steps,
            vec![
                ("bundle".to_string(), 3.2),
                ("restore (cold)".to_string(), 20.0),
                ("teardown".to_string(), 36.7)
            ]
        );
        assert_eq!(total, 59.9);
        assert!(parse_timing("no line").is_none());
        assert!(parse_timing("timing: bundle x ms (total 1 ms)").is_none());
    }
}
