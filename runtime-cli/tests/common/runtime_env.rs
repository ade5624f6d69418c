//! The runtime tests' set-up (`tests/run_host_path.rs`, `tests/jail.rs`, `tests/pool_jail.rs`): a data directory, config and
//! state root of their own, busybox bundles, and what `/proc` shows of a process.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{BIN, Output, kvm_usable, run_command};

pub const T: Duration = Duration::from_secs(120);

/// A data directory, config and state root of their own; every container deleted on drop.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// The pool directory its commands use (none runs there unless a test starts one).
    pub pool: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        let Ok(entries) = fs::read_dir(self.root()) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let mut c = self.ks();
            c.args(["delete", "--force", &id]);
            let _ = run_command(c, T);
        }
    }
}

impl Env {
    pub fn new(config: serde_json::Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let pool = dir.path().join("no-pool");
        Self { dir, pool }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn ks(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("KATA_SNAP_CONFIG", self.dir.path().join("config.json"))
            .env("KATA_SNAP_DATA_DIR", self.dir.path().join("data"))
            .env("KATA_SNAP_POOL_DIR", &self.pool)
            .arg("--root")
            .arg(self.root());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let mut c = self.ks();
        c.args(args);
        run_command(c, T)
    }

    /// A busybox bundle whose process is `args`.
    pub fn bundle(&self, name: &str, args: &[&str]) -> PathBuf {
        let b = self.dir.path().join(name);
        let bin = b.join("rootfs/bin");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(b.join("rootfs/etc")).unwrap();
        fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
        for a in ["sh", "echo", "true", "false"] {
            std::os::unix::fs::symlink("busybox", bin.join(a)).unwrap();
        }
        let o = super::run(&["spec", "--bundle", b.to_str().unwrap()], T);
        assert_eq!(o.code(), 0, "{o:?}");
        let mut spec: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(b.join("config.json")).unwrap()).unwrap();
        spec["process"]["args"] = serde_json::json!(args);
        spec["process"]["terminal"] = false.into();
        spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
        fs::write(b.join("config.json"), spec.to_string()).unwrap();
        b
    }

    /// `create` with the container's stdio in files, and `inherit` (a descriptor without
    /// CLOEXEC) open in the command; returns the supervisor's pid and the stdout file.
    pub fn create(&self, bundle: &Path, id: &str) -> (i32, PathBuf) {
        let out = self.dir.path().join(format!("{id}.stdout"));
        let err = self.dir.path().join(format!("{id}.stderr"));
        let pid_file = self.dir.path().join(format!("{id}.pid"));
        let mut c = self.ks();
        c.args(["create", "--bundle", bundle.to_str().unwrap(), "--pid-file"])
            .arg(&pid_file)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let status = super::wait_deadline(&mut c.spawn().unwrap(), T).expect("create finishes");
        let stderr = fs::read_to_string(&err).unwrap();
        assert_eq!(status.code(), Some(0), "create {id}: {stderr}");
        let pid = fs::read_to_string(&pid_file).unwrap().parse().unwrap();
        (pid, out)
    }

    /// Nothing of container `id` is left: no state directory.
    pub fn assert_gone(&self, id: &str) {
        assert!(
            !self.root().join(id).exists(),
            "the state of {id} is left in {}",
            self.root().display()
        );
    }

    pub fn status(&self, id: &str) -> String {
        let o = self.run(&["state", id]);
        assert_eq!(o.code(), 0, "{o:?}");
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        v["status"].as_str().unwrap_or_default().to_string()
    }

    /// Starts `id`, waits until it stopped and its supervisor `pid` is gone, deletes it.
    pub fn start_wait_delete(&self, id: &str, pid: i32) {
        let o = self.run(&["start", id]);
        assert_eq!(o.code(), 0, "{o:?}");
        let end = Instant::now() + T;
        while self.status(id) != "stopped" || process_alive(pid) {
            assert!(Instant::now() < end, "{id} never stopped");
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = self.run(&["delete", id]);
        assert_eq!(o.code(), 0, "{o:?}");
        assert!(!self.root().join(id).exists(), "{id} is left");
    }
}

pub fn process_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

pub fn usable() -> bool {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: the jail needs root");
        return false;
    }
    if !kvm_usable() || !Path::new("/bin/busybox").exists() {
        println!("SKIPPED: needs /dev/kvm and /bin/busybox");
        return false;
    }
    let ok = Path::new("/usr/bin/mkfs.erofs").exists();
    if !ok {
        println!("SKIPPED: mkfs.erofs missing (scripts/install-deps.sh)");
    }
    ok
}

/// `/proc/PID/status` as (key, value) lines.
pub fn status_of(pid: i32) -> Vec<(String, String)> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

pub fn field(status: &[(String, String)], key: &str) -> String {
    status
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {key} in /proc/PID/status"))
}

/// The mount points of `pid`'s namespace (field 5 of mountinfo) and the root's options.
pub fn mounts_of(pid: i32) -> (Vec<String>, String) {
    let info = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mut points = Vec::new();
    let mut root_opts = String::new();
    for l in info.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f[4] == "/" {
            root_opts = f[5].to_string();
        }
        points.push(f[4].to_string());
    }
    points.sort();
    (points, root_opts)
}

/// What each of `pid`'s descriptors is (the link targets in /proc/PID/fd).
pub fn fds_of(pid: i32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    out.sort();
    out
}
