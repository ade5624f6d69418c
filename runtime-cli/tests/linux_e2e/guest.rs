//! Helpers: artifacts, rootfs images, Linux guests under `kata-snap` and their agent.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::{
    AgentClient, FsType, Mount, Process, RootfsSource, RootfsSpec, RunOutcome, RunRequest, User,
};

use crate::common::{BIN, Output, run, run_command, wait_deadline};

/// The agent's vsock port (`agent_protocol::AGENT_VSOCK_PORT`).
pub const AGENT_PORT: u32 = agent_protocol::AGENT_VSOCK_PORT;
/// Guest CID of every test VM.
pub const CID: u64 = 3;
/// Bound on one agent read.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one container process.
pub const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// Bound on a cold boot reaching READY.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest's command line: serial console, reset through the i8042, no PCI, quiet (every
/// console byte is an exit).
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodules quiet \
                           i8042.noaux i8042.nomux i8042.dumbkbd";

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "sleep",
    "true",
    "false",
    "dd",
    "head",
    "od",
    "date",
    "mount",
    "umount",
    "sync",
    "mkdir",
    "ls",
    "wc",
    "yes",
    "cmp",
    "seq",
    "taskset",
    "awk",
    "grep",
    "sed",
    "rm",
    "mv",
    "nproc",
    "tr",
    "test",
    "[",
    "id",
    "hostname",
    "pwd",
    "tty",
    "stty",
    "sha256sum",
    "env",
    "touch",
    "stat",
    "ip",
    "ping",
    "nc",
    "wget",
    "httpd",
    "nslookup",
    "ln",
];

/// The guest kernel and initramfs.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("KATA_SNAP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kata-snap")
        })
}

fn mkfs_ext4() -> Option<PathBuf> {
    ["/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4", "/sbin/mke2fs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The artifacts, or None after printing `SKIPPED: <reason>`. A host that can boot Linux but
/// lacks an artifact fails in CI (the rung would silently vanish otherwise).
pub fn setup() -> Option<Artifacts> {
    let host = vmm::host::check_host();
    if !host.can_boot_linux {
        println!(
            "SKIPPED: {}; rung 4 runs these tests in the rig (scripts/rig/rung4.sh)",
            host.summary
        );
        return None;
    }
    let kernel = std::env::var_os("KATA_SNAP_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("kernel/latest/bzImage"));
    let initramfs = std::env::var_os("KATA_SNAP_GUEST_INITRAMFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("initramfs/initramfs.cpio"));
    let missing = [
        (kernel.clone(), "guest/kernel/build.sh"),
        (initramfs.clone(), "guest/initramfs/build.sh"),
        (PathBuf::from(BUSYBOX), "apt-get install busybox-static"),
    ]
    .into_iter()
    .find(|(p, _)| !p.exists())
    .map(|(p, how)| format!("{} not found ({how})", p.display()))
    .or_else(|| {
        mkfs_ext4()
            .is_none()
            .then(|| "mkfs.ext4 not found (apt-get install e2fsprogs)".to_string())
    });
    if let Some(why) = missing {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide the rung-4 artifacts: {why}"
        );
        println!("SKIPPED: {why}");
        return None;
    }
    Some(Artifacts { kernel, initramfs })
}

/// Prints one measurement for `scripts/rig/rung4.sh` to collect.
pub fn measure(name: &str, ms: f64) {
    println!("RIG-MEASURE {name} {ms:.1} ms");
}

/// Prints a progress line (shown with `--nocapture`; the rig's console log keeps it).
pub fn step(what: impl std::fmt::Display) {
    eprintln!("RIG-STEP {what}");
}

/// Milliseconds since `t`.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// An ext4 image of `size_mib` MiB holding a busybox rootfs under `dir`.
pub fn rootfs_image(dir: &Path, name: &str, size_mib: u64) -> PathBuf {
    let root = busybox_tree(&dir.join(format!("{name}.d")));
    let image = dir.join(format!("{name}.img"));
    mkfs(&image, size_mib, Some(&root));
    image
}

/// A busybox root filesystem tree at `root` (created): the applets the tests use, /etc/passwd
/// and /etc/group for root.
pub fn busybox_tree(root: &Path) -> PathBuf {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "mnt"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(root.join("etc/hostname"), "image\n").unwrap();
    root.to_owned()
}

/// An empty ext4 image of `size_mib` MiB.
pub fn empty_ext4(dir: &Path, name: &str, size_mib: u64) -> PathBuf {
    let image = dir.join(format!("{name}.img"));
    mkfs(&image, size_mib, None);
    image
}

fn mkfs(image: &Path, size_mib: u64, content: Option<&Path>) {
    let f = fs::File::create(image).unwrap();
    f.set_len(size_mib << 20).unwrap();
    drop(f);
    let mut cmd = Command::new(mkfs_ext4().unwrap());
    cmd.args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0"]);
    if let Some(d) = content {
        cmd.arg("-d").arg(d);
    }
    cmd.arg(image);
    let out = run_command(cmd, Duration::from_secs(60));
    assert_eq!(out.code(), 0, "mkfs.ext4 failed: {}", out.stderr);
}

/// `e2fsck -fn IMAGE`: the exit status and the report.
pub fn fsck(image: &Path) -> (i32, String) {
    let mut cmd = Command::new(
        ["/sbin/e2fsck", "/usr/sbin/e2fsck"]
            .iter()
            .find(|p| Path::new(p).exists())
            .expect("e2fsck (e2fsprogs)"),
    );
    cmd.arg("-fn").arg(image);
    let out = run_command(cmd, Duration::from_secs(60));
    (out.code(), format!("{}{}", out.stdout, out.stderr))
}

/// How a guest is started.
#[derive(Debug, Clone, Default)]
pub struct BootOpts {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// `--disk` arguments.
    pub disks: Vec<String>,
    /// `--disk-slot` names.
    pub slots: Vec<String>,
    pub rng: bool,
    /// Take a template at READY into this directory and exit.
    pub snapshot_on_ready: Option<PathBuf>,
    /// `--seccomp MODE` for the VMM [default: the VMM's default, kill].
    pub seccomp: Option<&'static str>,
    /// The vsock's host socket [default: in the guest's temporary directory, which goes away
    /// with it: give a path for a template, whose restores bind the same path].
    pub vsock: Option<PathBuf>,
    /// `--net` arguments.
    pub nets: Vec<String>,
    /// Run the VMM in this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

/// A `kata-snap boot` or `restore` of a Linux guest running in the background.
pub struct Guest {
    pub child: std::process::Child,
    pub dir: tempfile::TempDir,
    pub serial: PathBuf,
    pub api: PathBuf,
    pub stderr: PathBuf,
    /// The vsock's host socket (hybrid vsock: `CONNECT <port>\n`).
    pub vsock: PathBuf,
    pub started: Instant,
}

impl Guest {
    fn spawn(args: Vec<String>, dir: tempfile::TempDir, vsock: PathBuf) -> Self {
        Self::spawn_in(None, args, dir, vsock)
    }

    /// Spawns `kata-snap ARGS`, inside network namespace `netns` when given.
    fn spawn_in(
        netns: Option<&str>,
        args: Vec<String>,
        dir: tempfile::TempDir,
        vsock: PathBuf,
    ) -> Self {
        let serial = dir.path().join("serial.log");
        let api = dir.path().join("api.sock");
        let stderr = dir.path().join("stderr.log");
        step(format!("kata-snap {}", args.join(" ")));
        let started = Instant::now();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(&args)
            .arg("--serial-log")
            .arg(&serial)
            .arg("--api-sock")
            .arg(&api)
            .env(
                "RUST_LOG",
                std::env::var("KATA_SNAP_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn kata-snap");
        Self {
            child,
            dir,
            serial,
            api,
            stderr,
            vsock,
            started,
        }
    }

    /// `kata-snap boot` of the guest kernel and agent with vsock (CID 3) and `opts`.
    pub fn boot(art: &Artifacts, opts: &BootOpts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vsock = opts
            .vsock
            .clone()
            .unwrap_or_else(|| dir.path().join("vsock.sock"));
        let mut args: Vec<String> = Vec::new();
        if let Some(mode) = opts.seccomp {
            args.extend(["--seccomp".into(), mode.into()]);
        }
        args.extend::<Vec<String>>(vec![
            "boot".into(),
            "--kernel".into(),
            art.kernel.display().to_string(),
            "--initrd".into(),
            art.initramfs.display().to_string(),
            "--cmdline".into(),
            CMDLINE.into(),
            "--mem-mib".into(),
            opts.mem_mib.max(256).to_string(),
            "--vcpus".into(),
            opts.vcpus.max(1).to_string(),
            "--vsock".into(),
            format!("{CID},{}", vsock.display()),
        ]);
        for d in &opts.disks {
            args.extend(["--disk".into(), d.clone()]);
        }
        for s in &opts.slots {
            args.extend(["--disk-slot".into(), s.clone()]);
        }
        if opts.rng {
            args.push("--rng".into());
        }
        for n in &opts.nets {
            args.extend(["--net".into(), n.clone()]);
        }
        if let Some(dir) = &opts.snapshot_on_ready {
            args.extend(["--snapshot-on-ready".into(), dir.display().to_string()]);
        }
        Self::spawn_in(opts.netns.as_deref(), args, dir, vsock)
    }

    /// `kata-snap restore --snapshot SNAP --mode MODE --vsock VSOCK EXTRA...`: the restored
    /// guest's vsock device gets the host socket `vsock` (each clone its own).
    pub fn restore(snapshot: &Path, mode: &str, vsock: &Path, extra: &[String]) -> Self {
        Self::restore_in(None, snapshot, mode, vsock, extra)
    }

    /// As [`Guest::restore`], the VMM in network namespace `netns` when given.
    pub fn restore_in(
        netns: Option<&str>,
        snapshot: &Path,
        mode: &str,
        vsock: &Path,
        extra: &[String],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = vec![
            "restore".into(),
            "--snapshot".into(),
            snapshot.display().to_string(),
            "--mode".into(),
            mode.into(),
            "--vsock".into(),
            vsock.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        Self::spawn_in(netns, args, dir, vsock.to_owned())
    }

    pub fn serial_text(&self) -> String {
        fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Serial console, VMM log and where the VMM's threads are, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "\n--- serial ---\n{}\n--- kata-snap stderr ---\n{}\n--- diagnosis ---\n{}",
            self.serial_text(),
            self.stderr_text(),
            self.diagnose()
        )
    }

    /// Twice, one second apart: the VMM's status (exit counters: do the vCPUs still exit?) and
    /// each of its threads' state, wait channel and kernel stack (is a vCPU waiting for a page,
    /// is the page server waiting for a fault, or is a vCPU inside KVM_RUN?).
    pub fn diagnose(&self) -> String {
        let pid = self.child.id();
        let mut out = String::new();
        out += &kvm_exits(pid);
        for round in 0..2 {
            if round == 1 {
                std::thread::sleep(Duration::from_secs(1));
            }
            out += &format!("round {round}:\n");
            if let Ok(mut s) = UnixStream::connect(&self.api) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"{\"action\":\"status\"}\n");
                let mut reply = String::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    reply.push(b[0] as char);
                }
                out += &format!("  status {reply}\n");
            }
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                out += "  (process gone)\n";
                continue;
            };
            for t in tasks.flatten() {
                let p = t.path();
                let read = |f: &str| fs::read_to_string(p.join(f)).unwrap_or_default();
                let stat = read("stat");
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .unwrap_or("?")
                    .to_owned();
                let stack: Vec<String> = read("stack")
                    .lines()
                    .take(6)
                    .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_owned())
                    .collect();
                out += &format!(
                    "  {} {:<16} {} wchan={} stack={}\n",
                    t.file_name().to_string_lossy(),
                    read("comm").trim(),
                    state,
                    read("wchan"),
                    stack.join("<")
                );
            }
        }
        out
    }

    /// Panics with the logs unless `cond`.
    pub fn check(&self, cond: bool, what: impl std::fmt::Display) {
        if !cond {
            panic!("{what}{}", self.logs());
        }
    }

    /// The process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// One control request (`{"action":ACTION}`), answered with its reply.
    pub fn control(&self, action: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.api)
            .unwrap_or_else(|e| panic!("control socket: {e}{}", self.logs()));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        writeln!(s, "{{\"action\":\"{action}\"}}").unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("control reply {line:?}: {e}{}", self.logs()))
    }

    /// `kata-snap vm ARGS... --api-sock API`.
    pub fn vm(&self, args: &[&str]) -> Output {
        let mut all = vec!["vm"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--api-sock", self.api.to_str().unwrap()]);
        run(&all, Duration::from_secs(60))
    }

    /// Waits until the control socket answers and the guest has said READY; returns the VMM's
    /// `ready_ms` (process start to READY).
    pub fn wait_ready(&mut self, timeout: Duration) -> f64 {
        let end = Instant::now() + timeout;
        loop {
            let alive = self.alive();
            self.check(alive, "kata-snap exited before READY");
            if self.api.exists() {
                let st = self.control("status");
                if let Some(ms) = st["status"]["ready_ms"].as_f64() {
                    return ms;
                }
            }
            self.check(Instant::now() < end, format!("no READY within {timeout:?}"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit (killing it after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match wait_deadline(&mut self.child, timeout) {
            Some(s) => s,
            None => panic!("kata-snap did not exit within {timeout:?}{}", self.logs()),
        }
    }

    /// Stops the VM through the control socket and waits for the exit (status 4).
    pub fn stop(&mut self) {
        step("stop");
        let reply = self.control("stop");
        self.check(reply["ok"] == true, format!("stop answered {reply}"));
        let status = self.wait_exit(Duration::from_secs(30));
        self.check(
            status.code() == Some(4),
            format!("stop ended with {status}"),
        );
    }

    /// Opens a connection to guest port `port` through the hybrid vsock socket: waits (up to
    /// `timeout`) for the socket to accept, sends `CONNECT`, reads `OK`. Only a connect() that
    /// fails (socket not bound yet) is retried: a refused or closed CONNECT is an error.
    pub fn connect_port(&self, port: u32, timeout: Duration) -> Result<UnixStream, String> {
        let end = Instant::now() + timeout;
        let mut s = loop {
            match UnixStream::connect(&self.vsock) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= end => {
                    return Err(format!("connect {}: {e}", self.vsock.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|e| format!("send CONNECT: {e}"))?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b) {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) => line.push(b[0]),
                Ok(_) => return Err(format!("closed after CONNECT ({line:?} so far)")),
                Err(e) => return Err(format!("reading the CONNECT answer: {e}")),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(format!(
                "CONNECT answered {:?}",
                String::from_utf8_lossy(&line)
            ));
        }
        Ok(s)
    }

    /// A client that completed `Hello` with the agent, retrying a CONNECT the VMM closed: a
    /// guest starved of CPU (many VMs on the rig's two emulated CPUs) may not answer within the
    /// VMM's connect timeout. Only where the first connection is not what is tested.
    pub fn agent_retrying(&self, timeout: Duration) -> AgentClient<UnixStream> {
        step("connect to the agent (retrying)");
        let end = Instant::now() + timeout;
        loop {
            match self.connect_port(AGENT_PORT, Duration::from_secs(30)) {
                Ok(s) => {
                    return AgentClient::handshake(s, READ_TIMEOUT).unwrap_or_else(|e| {
                        panic!("Hello with the agent failed: {e}{}", self.logs())
                    });
                }
                Err(e) if Instant::now() >= end => panic!("{e}{}", self.logs()),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// A client that completed `Hello` with the agent, on the first connection made.
    pub fn agent(&self) -> AgentClient<UnixStream> {
        step("connect to the agent");
        let s = self
            .connect_port(AGENT_PORT, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}{}", self.logs()));
        AgentClient::handshake(s, READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("Hello with the agent failed: {e}{}", self.logs()))
    }

    /// Runs `sh -c SCRIPT` in a container over the rootfs on `device`, on a new connection.
    pub fn sh(&self, device: &str, script: &str, mounts: Vec<Mount>) -> RunOutcome {
        let mut c = self.agent();
        self.sh_on(&mut c, device, script, mounts)
    }

    /// As [`Guest::sh`], on an open client.
    pub fn sh_on(
        &self,
        c: &mut AgentClient<UnixStream>,
        device: &str,
        script: &str,
        mounts: Vec<Mount>,
    ) -> RunOutcome {
        step(format!("run {script:?}"));
        c.run(
            request(device, &["sh", "-c", script], mounts),
            None,
            RUN_DEADLINE,
        )
        .unwrap_or_else(|e| panic!("running {script:?} failed: {e}{}", self.logs()))
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last KVM exits of process `pid`'s vCPU threads over half a second (reason and guest
/// RIP, from the kvm:kvm_exit trace event), when tracefs is there and we may use it (the rig).
fn kvm_exits(pid: u32) -> String {
    let t = Path::new("/sys/kernel/tracing");
    let enable = t.join("events/kvm/kvm_exit/enable");
    if !enable.exists() || fs::write(t.join("trace"), "").is_err() {
        return String::new();
    }
    let _ = fs::write(&enable, "1");
    std::thread::sleep(Duration::from_millis(500));
    let _ = fs::write(&enable, "0");
    let trace = fs::read_to_string(t.join("trace")).unwrap_or_default();
    let tids: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mine: Vec<&str> = trace
        .lines()
        .filter(|l| {
            tids.iter().any(|tid| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|w| w.ends_with(&format!("-{tid}")))
            })
        })
        .collect();
    let mut out = format!("kvm_exit events in 0.5 s: {}\n", mine.len());
    for l in mine.iter().rev().take(8).rev() {
        out += &format!("  {}\n", l.trim());
    }
    out
}

/// A container run request: `args` in the ext4 rootfs on `device`, root, PATH=/bin, /proc.
pub fn request(device: &str, args: &[&str], extra_mounts: Vec<Mount>) -> RunRequest {
    let mut mounts = vec![Mount {
        destination: "/proc".into(),
        fs_type: "proc".into(),
        source: "proc".into(),
        options: vec!["nosuid".into(), "noexec".into(), "nodev".into()],
    }];
    mounts.extend(extra_mounts);
    RunRequest {
        process: Process {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin".into(), "HOME=/root".into()],
            cwd: "/".into(),
            user: User {
                uid: 0,
                gid: 0,
                additional_gids: vec![],
            },
            rlimits: vec![],
            terminal: false,
            no_new_privileges: false,
            umask: None,
            capabilities: None,
            clear_onlcr: false,
            console_size: None,
        },
        hostname: None,
        mounts,
        rootfs: RootfsSpec {
            source: RootfsSource::Block {
                device: device.into(),
                fs: Some(FsType::Ext4),
            },
            readonly: false,
        },
        masked_paths: vec![],
        readonly_paths: vec![],
        seccomp: None,
        network: None,
        files: vec![],
        shared_fs: None,
    }
}

/// The guest's /dev bound at /hostdev in the container (to reach its disks and /dev/hwrng).
pub fn guest_dev() -> Mount {
    Mount {
        destination: "/hostdev".into(),
        fs_type: "bind".into(),
        source: "/dev".into(),
        options: vec!["bind".into()],
    }
}

/// stdout as text.
pub fn out(o: &RunOutcome) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn err(o: &RunOutcome) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// 64 bytes from the host's getrandom.
pub fn host_random() -> Vec<u8> {
    let mut b = vec![0u8; 64];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b
}
