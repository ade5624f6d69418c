//! The hostile-guest campaign (issue 14): the `hostile` test guest drives every virtio device (a
//! writable disk, a read-only disk, vsock, rng, a net slot) and random ports and MMIO with
//! malicious values, one VM (child process) per seed. Each run must end cleanly (exit 0, or 3 if
//! the guest itself faulted; never a VMM error or a death by signal, which is how a seccomp kill
//! shows), print no panic, keep the control socket answering while the guest runs, leave the
//! read-only image byte-identical, and leave every byte of the writable image outside the sectors
//! the guest may write (`WLO..WHI`) as it was, with the file's length unchanged. The guest itself
//! reports device answers the virtio spec forbids (`hostile: ANOMALY`) and well-formed requests a
//! live device left unanswered for about 10 s (`hostile: stall`), which fail the run too. Every
//! fourth seed is also snapshotted mid-run (whatever state the guest left its devices in) and the
//! snapshot restored (uffd, eager and mmap in turn) and run to its end under the same checks.
//!
//! CI runs [`DEFAULT_SEEDS`] seeds. A longer campaign: `scripts/hostile-campaign.sh 1000`, or
//! `HOSTILE_SEEDS=N HOSTILE_SEED_BASE=S HOSTILE_ITERS=I cargo test -p runtime-cli --test
//! hostile_guest -- --nocapture`; the figures are printed at the end.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{BIN, kvm_usable, wait_deadline};

/// Seeds CI runs (about 2.5 s each on the CI host, 100 s in all).
const DEFAULT_SEEDS: u64 = 40;
/// Sectors of the writable image, and the range the guest may write.
const RW_SECTORS: u64 = 256;
const WLO: u64 = 64;
const WHI: u64 = 192;
/// Sectors of the read-only image.
const RO_SECTORS: u64 = 64;
/// The host port the guest connects to (a listener that answers and reads).
const VSOCK_PORT: u32 = 5000;
/// A seed that takes longer than this is a hang.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// The control socket must answer `vm status` within this, throughout the run.
const STATUS_DEADLINE: Duration = Duration::from_secs(5);
const STATUS_EVERY: Duration = Duration::from_millis(400);
const SIGSYS: i32 = 31;
/// Every this many seeds (seed divisible by it) the VM is snapshotted mid-run and the snapshot
/// restored and run to its end too (`HOSTILE_SNAPSHOT_EVERY`, 0 = never).
const DEFAULT_SNAPSHOT_EVERY: u64 = 4;

/// The `kata-snap` under test: this build's, or `HOSTILE_KATA_SNAP` (a copy, so a long campaign
/// can run while the tree is rebuilt).
fn bin() -> String {
    std::env::var("HOSTILE_KATA_SNAP").unwrap_or_else(|_| BIN.to_string())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

/// The writable image's byte at `offset`: differs per sector and per byte.
fn rw_pattern(offset: u64) -> u8 {
    ((offset / 512).wrapping_mul(31) ^ (offset % 512).wrapping_mul(7)) as u8
}

/// The read-only image: pseudo-random bytes from the seed.
fn ro_image(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..RO_SECTORS * 512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sectors of `image` outside `[WLO, WHI)` that differ from the pattern, and its length.
fn rw_damage(image: &[u8]) -> Vec<u64> {
    let mut bad: Vec<u64> = image
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b != rw_pattern(i as u64))
        .map(|(i, _)| i as u64 / 512)
        .filter(|s| !(WLO..WHI).contains(s))
        .collect();
    bad.dedup();
    bad
}

/// A host listener on `<uds>_<port>` that greets every guest connection and reads until EOF,
/// and a host client that keeps opening connections to guest ports through `<uds>` (so the
/// guest's malice reaches host-initiated connections too).
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    fn start(uds: &Path, port: u32) -> Self {
        let listener = UnixListener::bind(format!("{}_{port}", uds.display())).unwrap();
        listener.set_nonblocking(true).unwrap();
        let uds = uds.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            let mut ticks = 0u32;
            while !flag.load(Ordering::Relaxed) {
                while let Ok((mut s, _)) = listener.accept() {
                    s.set_nonblocking(true).unwrap();
                    let _ = s.write_all(b"hello from the host\n");
                    conns.push(s);
                }
                ticks += 1;
                if ticks.is_multiple_of(40)
                    && conns.len() < 16
                    && let Ok(mut s) = UnixStream::connect(&uds)
                {
                    let _ = writeln!(s, "CONNECT {}", 1000 + ticks % 3);
                    s.set_nonblocking(true).unwrap();
                    conns.push(s);
                }
                let mut buf = [0u8; 4096];
                conns.retain_mut(|s| !matches!(s.read(&mut buf), Ok(0)));
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one seed did.
#[derive(Debug, Default)]
struct SeedRun {
    /// The guest's `hostile: summary` figures.
    figures: BTreeMap<String, u64>,
    /// Why the run failed (empty: it passed).
    failures: Vec<String>,
    exit: Option<i32>,
    signal: Option<i32>,
    hang: bool,
    panicked: bool,
    status_polls: u32,
    max_status: Duration,
    /// Snapshots taken mid-run and restored.
    snapshots: u32,
}

fn parse_summary(serial: &str) -> BTreeMap<String, u64> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("hostile: summary"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// The files and control socket of one VM process.
struct VmFiles {
    sock: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
}

impl VmFiles {
    fn new(dir: &Path, name: &str) -> Self {
        Self {
            sock: dir.join(format!("{name}.sock")),
            serial: dir.join(format!("{name}.serial")),
            stderr: dir.join(format!("{name}.stderr")),
        }
    }

    fn spawn(&self, args: &[&OsStr]) -> Child {
        Command::new(bin())
            .args(args)
            .arg("--api-sock")
            .arg(&self.sock)
            .arg("--serial-log")
            .arg(&self.serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&self.stderr).unwrap())
            .spawn()
            .unwrap()
    }

    /// The console so far (random port writes put bytes on it that are not UTF-8).
    fn serial_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.serial).unwrap_or_default()).into_owned()
    }
}

/// Waits up to 3 s for `child` to exit; whether it did.
fn exits_soon(child: &mut Child) -> bool {
    let until = Instant::now() + Duration::from_secs(3);
    while child.try_wait().unwrap().is_none() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.try_wait().unwrap().is_some()
}

/// Runs `kata-snap vm ACTION` against `sock`; Ok(answer time) if it succeeded within `limit`.
fn vm_request(sock: &Path, action: &[&str], limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut child = Command::new(bin())
        .arg("vm")
        .args(action)
        .arg("--api-sock")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    match wait_deadline(&mut child, limit) {
        None => Err(format!("vm {action:?} got no answer in {limit:?}")),
        Some(s) if s.success() => Ok(start.elapsed()),
        Some(s) => {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            Err(format!("vm {action:?} failed ({s}): {}", err.trim()))
        }
    }
}

/// Watches a running VM until it exits: `vm status` must answer throughout; with `snapshot`
/// (directory, delay) a snapshot is taken that long after the guest has set up its devices.
/// Checks how it ended; returns its console and whether the snapshot was taken.
fn watch(
    child: &mut Child,
    files: &VmFiles,
    snapshot: Option<(&Path, Duration)>,
    run: &mut SeedRun,
) -> (String, bool) {
    let deadline = Instant::now() + RUN_DEADLINE;
    let mut set_up: Option<Instant> = None;
    let mut taken = false;
    let exit: Option<ExitStatus> = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if files.sock.exists() {
            match vm_request(&files.sock, &["status"], STATUS_DEADLINE) {
                Ok(t) => {
                    run.status_polls += 1;
                    run.max_status = run.max_status.max(t);
                }
                // The VM may be stopping (the guest's reset) as the request arrives: an error
                // then is no failure, one from a VM that goes on running is.
                Err(e) if !exits_soon(child) => run.failures.push(e),
                Err(_) => {}
            }
        }
        if let Some((dir, delay)) = snapshot
            && !taken
        {
            if set_up.is_none() && files.serial_text().contains("hostile: dev 3 ") {
                set_up = Some(Instant::now());
            }
            if set_up.is_some_and(|t| t.elapsed() >= delay) {
                let out = dir.to_str().unwrap();
                match vm_request(&files.sock, &["snapshot", "--out", out], RUN_DEADLINE) {
                    Ok(_) => taken = true,
                    Err(e) if !exits_soon(child) => run.failures.push(e),
                    Err(_) => {}
                }
                set_up = None;
                if !taken {
                    break child.try_wait().unwrap();
                }
            }
        }
        std::thread::sleep(STATUS_EVERY);
    };
    let serial = files.serial_text();
    let stderr = String::from_utf8_lossy(&fs::read(&files.stderr).unwrap_or_default()).into_owned();
    match exit {
        None => {
            run.hang = true;
            run.failures
                .push(format!("no exit within {RUN_DEADLINE:?}"));
        }
        Some(s) => {
            run.exit = run.exit.max(s.code());
            run.signal = run.signal.or(s.signal());
            match (s.code(), s.signal()) {
                (Some(0), _) if !serial.contains("hostile: done\n") => run
                    .failures
                    .push("exit 0 before the guest finished".to_string()),
                (Some(0 | 3), _) => {}
                (_, Some(SIGSYS)) => run.failures.push(
                    "killed by SIGSYS: a seccomp list lacks a syscall (dmesg | grep type=1326)"
                        .to_string(),
                ),
                _ => run.failures.push(format!("VMM ended with {s}")),
            }
        }
    }
    if stderr.contains("panicked") {
        run.panicked = true;
        run.failures.push("panic on stderr".to_string());
    }
    for line in serial.lines().filter(|l| l.starts_with("hostile: ANOMALY")) {
        run.failures.push(line.to_string());
    }
    if !run.failures.is_empty() {
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        eprintln!(
            "{:?}\nserial:\n{serial}\nstderr (last lines, newest first):\n{}",
            run.failures,
            tail.join("\n")
        );
    }
    (serial, taken)
}

/// One seed: boots the guest on fresh images (every `snapshot_every`-th seed also snapshots it
/// mid-run and restores the snapshot once the first VM is done), then checks the images.
fn run_seed(seed: u64, iters: Option<u64>, snapshot_every: u64) -> SeedRun {
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw.img");
    let ro = dir.path().join("ro.img");
    let snap = dir.path().join("snap");
    fs::write(
        &rw,
        (0..RW_SECTORS * 512).map(rw_pattern).collect::<Vec<u8>>(),
    )
    .unwrap();
    let ro_bytes = ro_image(seed);
    fs::write(&ro, &ro_bytes).unwrap();

    let mut cmdline = format!("seed={seed} wlo={WLO} whi={WHI} port={VSOCK_PORT}");
    if let Some(n) = iters {
        cmdline += &format!(" iters={n}");
    }
    let uds = dir.path().join("v.sock");
    let listener = Listener::start(&uds, VSOCK_PORT);
    let boot = VmFiles::new(dir.path(), "boot");
    let ro_arg = format!("{},ro", ro.display());
    // virtio-fs: a share in the seed's directory, except on seeds that snapshot, which get a slot
    // (a snapshot is refused once the guest has a FUSE session, which random INITs open).
    let share = dir.path().join("share");
    fs::create_dir(&share).unwrap();
    fs::write(share.join("f"), b"share").unwrap();
    let snapshots_here = snapshot_every > 0 && seed.is_multiple_of(snapshot_every);
    let fs_arg = if snapshots_here {
        "hfs".to_string()
    } else {
        format!("hfs={}", share.display())
    };
    let vsock_arg = format!("3,{}", uds.display());
    let mut child = boot.spawn(&[
        "boot".as_ref(),
        "--kernel".as_ref(),
        "builtin:hostile".as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
        "--rng".as_ref(),
        "--disk".as_ref(),
        rw.as_os_str(),
        "--disk".as_ref(),
        ro_arg.as_ref(),
        "--vsock".as_ref(),
        vsock_arg.as_ref(),
        // A net slot (no tap: no root needed): transmit chains of every kind are parsed and
        // dropped; receive buffers are posted, broken ones too.
        "--net".as_ref(),
        "n0".as_ref(),
        "--fs".as_ref(),
        fs_arg.as_ref(),
    ]);
    let mut run = SeedRun::default();
    let snapshot = (snapshot_every > 0 && seed.is_multiple_of(snapshot_every)).then(|| {
        (
            snap.as_path(),
            Duration::from_millis(100 + seed * 397 % 1500),
        )
    });
    let (serial, taken) = watch(&mut child, &boot, snapshot, &mut run);
    // Well-formed requests a live device left unanswered for ~10 s: a device hang.
    for line in serial.lines().filter(|l| l.starts_with("hostile: stall")) {
        run.failures.push(line.to_string());
    }
    run.figures = parse_summary(&serial);
    drop(listener);

    if taken {
        // The snapshot continues where it was taken, on the same images.
        run.snapshots += 1;
        let uds = dir.path().join("v2.sock");
        let _listener = Listener::start(&uds, VSOCK_PORT);
        let restored = VmFiles::new(dir.path(), "restore");
        let mut child = restored.spawn(&[
            "restore".as_ref(),
            "--snapshot".as_ref(),
            snap.as_os_str(),
            "--mode".as_ref(),
            // Every way memory comes back: with uffd the devices' first accesses to guest pages
            // fault into the page server.
            ["uffd", "eager", "mmap"][(seed / snapshot_every % 3) as usize].as_ref(),
            "--vsock".as_ref(),
            uds.as_os_str(),
        ]);
        watch(&mut child, &restored, None, &mut run);
    }

    if fs::read(&ro).unwrap() != ro_bytes {
        run.failures.push("the read-only image changed".to_string());
    }
    let image = fs::read(&rw).unwrap();
    if image.len() as u64 != RW_SECTORS * 512 {
        run.failures.push(format!(
            "the writable image is {} bytes, not {}",
            image.len(),
            RW_SECTORS * 512
        ));
    }
    let damage = rw_damage(&image);
    if !damage.is_empty() {
        run.failures.push(format!(
            "writes outside sectors {WLO}..{WHI}: sectors {damage:?}"
        ));
    }
    if !run.failures.is_empty() {
        eprintln!("seed {seed} failed: {:?}", run.failures);
    }
    run
}

#[test]
fn test_hostile_guest_seeds_no_panic_hang_or_write_outside_images() {
    if !kvm_usable() {
        return;
    }
    let seeds = env_u64("HOSTILE_SEEDS", DEFAULT_SEEDS);
    let base = env_u64("HOSTILE_SEED_BASE", 1);
    let iters = std::env::var("HOSTILE_ITERS")
        .ok()
        .map(|_| env_u64("HOSTILE_ITERS", 0));
    let snapshot_every = env_u64("HOSTILE_SNAPSHOT_EVERY", DEFAULT_SNAPSHOT_EVERY);
    let started = Instant::now();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed: Vec<(u64, Vec<String>)> = Vec::new();
    let (mut hangs, mut panics, mut sigsys, mut guest_faults, mut polls) = (0, 0, 0, 0, 0);
    let mut snapshots = 0;
    let mut max_status = Duration::ZERO;
    for seed in base..base + seeds {
        let run = run_seed(seed, iters, snapshot_every);
        for (k, v) in &run.figures {
            if k != "seed" {
                *totals.entry(k.clone()).or_default() += v;
            }
        }
        hangs += u64::from(run.hang);
        panics += u64::from(run.panicked);
        sigsys += u64::from(run.signal == Some(SIGSYS));
        guest_faults += u64::from(run.exit == Some(3));
        polls += run.status_polls;
        snapshots += run.snapshots;
        max_status = max_status.max(run.max_status);
        if !run.failures.is_empty() {
            failed.push((seed, run.failures));
        }
    }
    let figures: Vec<String> = totals.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "hostile campaign: seeds {base}..{} ({seeds}) in {:.0?}: {} failed, {panics} panics, \
         {hangs} hangs, {sigsys} seccomp kills, {guest_faults} guest faults (exit 3); \
         vm status answered {polls} times, slowest {max_status:.0?}; {snapshots} snapshots taken \
         mid-run and restored\n\
         hostile campaign: guest totals: {}",
        base + seeds,
        started.elapsed(),
        failed.len(),
        figures.join(" ")
    );
    assert!(
        failed.is_empty(),
        "failing seeds (rerun one with HOSTILE_SEED_BASE=N HOSTILE_SEEDS=1): {failed:?}"
    );
    // The campaign must have reached every device and the bus (a guest that found no device or
    // stopped early would pass every check above without testing anything).
    for key in [
        "blk",
        "vsock_tx",
        "net_tx",
        "rng",
        "transport",
        "pio",
        "mmio",
        "chain_attacks",
    ] {
        assert!(
            totals.get(key).copied().unwrap_or(0) > 0,
            "only {:?} {key} over {seeds} seeds",
            totals.get(key)
        );
    }
    assert!(polls >= 1, "the control socket was never polled");
    if snapshot_every > 0 && seeds >= 2 * snapshot_every {
        assert!(snapshots > 0, "no snapshot was taken mid-run");
    }
}
