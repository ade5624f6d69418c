//! The container state directory (runc's `--root`): one directory per container holding its
//! record (`state.json`), the supervisor's control socket and the VM's vsock socket.
//!
//! The record is written atomically (temporary name, fsync, rename). Its `status` is what the
//! supervisor last wrote; the status reported is corrected by whether the supervisor process is
//! still alive (its pid *and* its start time, so a reused pid is not mistaken for it): a
//! supervisor killed with SIGKILL leaves a `running` record that reads as `stopped`, and the next
//! `delete` cleans it up.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The record file in a container's directory.
pub const RECORD: &str = "state.json";
/// Largest record accepted (a record holds the annotations, which the bundle bounds).
const MAX_RECORD: u64 = 4 << 20;
/// Longest container id (runc has no limit; the id is a file name).
const MAX_ID: usize = 200;

/// The OCI version this runtime reports.
pub const OCI_VERSION: &str = "1.0.2";

/// A container's lifecycle status, as `state` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `create` is running: the VM is being restored.
    Creating,
    /// The process is ready to start (`start` not called yet).
    Created,
    /// The process runs.
    Running,
    /// The VM is paused.
    Paused,
    /// The process ended (or its VM is gone).
    Stopped,
}

impl Status {
    /// The name runc uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// What the runtime keeps about a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The container id.
    pub id: String,
    /// The bundle directory (absolute).
    pub bundle: PathBuf,
    /// The rootfs directory (absolute).
    pub rootfs: PathBuf,
    /// When `create` ran, RFC 3339 with nanoseconds, UTC.
    pub created: String,
    /// The bundle's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The supervisor's pid (the VMM process, which the engine sees as the container's
    /// process); while creating, the `create` command's.
    pub pid: i32,
    /// That process's start time (field 22 of /proc/PID/stat), to tell a reused pid apart.
    pub pid_start: u64,
    /// The status last written.
    pub status: Status,
    /// The container process's exit status, once known.
    pub exit_code: Option<i32>,
    /// The host cgroup the VM was placed in (removed by `delete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The network namespace the container's tap was made in (its redirects are removed by
    /// `delete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The bundle's hooks: `start` runs `startContainer` and `poststart`, `delete` runs
    /// `poststop` (the bundle may be gone by then).
    #[serde(default, skip_serializing_if = "no_hooks")]
    pub hooks: oci_bundle::Hooks,
}

fn no_hooks(h: &oci_bundle::Hooks) -> bool {
    *h == oci_bundle::Hooks::default()
}

/// The OCI state JSON of `runc state`, in runc's field order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState<'a> {
    oci_version: &'a str,
    id: &'a str,
    pid: i32,
    status: &'a str,
    bundle: &'a Path,
    rootfs: &'a Path,
    created: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
    owner: &'a str,
}

impl<'a> OciState<'a> {
    /// With the owner's name, as `list` prints it (`state` leaves it empty, as runc does).
    pub fn with_owner(mut self, owner: &'a str) -> Self {
        self.owner = owner;
        self
    }
}

impl Record {
    /// The status as it is now: a live record whose process is gone reads as stopped.
    pub fn current_status(&self) -> Status {
        match self.status {
            Status::Stopped => Status::Stopped,
            s if process_alive(self.pid, self.pid_start) => s,
            _ => Status::Stopped,
        }
    }

    /// The OCI state of this container (pid 0 once stopped, as runc prints it).
    pub fn oci_state(&self) -> OciState<'_> {
        let status = self.current_status();
        OciState {
            oci_version: OCI_VERSION,
            id: &self.id,
            pid: if status == Status::Stopped {
                0
            } else {
                self.pid
            },
            status: status.as_str(),
            bundle: &self.bundle,
            rootfs: &self.rootfs,
            created: &self.created,
            annotations: &self.annotations,
            owner: "",
        }
    }
}

/// Whether `pid` runs and started at `start`. A record without a start time (0) names no process
/// that can be told apart from a later one with its pid: it never matches.
pub fn process_alive(pid: i32, start: u64) -> bool {
    if pid <= 0 || start == 0 {
        return false;
    }
    process_start_time(pid) == Some(start)
}

/// Sends `sig` to `pid` if it is the process that started at `start`, through a pidfd: the start
/// time is checked on the process the pidfd holds, so a pid reused between the check and the
/// signal is not hit. Ok(false) when no such process runs.
pub fn signal_process(pid: i32, start: u64, sig: i32) -> Result<bool> {
    if pid <= 0 || start == 0 {
        return Ok(false);
    }
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(false);
        }
        return Err(e).with_context(|| format!("pidfd_open({pid})"));
    }
    // SAFETY: the descriptor was just returned to us and nothing else owns it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // The pidfd holds one process: if the pid was reused before pidfd_open, the start time now
    // read is the new process's and does not match.
    if process_start_time(pid) != Some(start) {
        return Ok(false);
    }
    // SAFETY: pidfd_send_signal(2) with our pidfd, a signal number, no siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(false);
        }
        return Err(e).with_context(|| format!("cannot signal pid {pid}"));
    }
    Ok(true)
}

/// Field 22 of /proc/PID/stat (the start time in clock ticks since boot); None for a process
/// that is gone or a zombie (a zombie's status no longer matters: it has exited).
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3 (state): field 22 is the 20th from here.
    fields.nth(18)?.parse().ok()
}

/// Checks a container id as runc does: letters, digits and `_+-.`, not `.` or `..`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "_+-.".contains(c);
    if id.is_empty() || id == "." || id == ".." || id.len() > MAX_ID || !id.chars().all(ok_char) {
        bail!("invalid container id format: {id}");
    }
    Ok(())
}

/// The state root (`--root`). It must be private to the caller (see
/// [`super::assets::private_dir`]): a root another user can write to would let them plant
/// records, symbolic links or sockets that the caller's commands then act on.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Why the root cannot be used, for every command that needs it.
    unusable: Option<String>,
}

impl Store {
    /// The store at `root`, created (mode 0700) if missing and checked.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_absolute() {
            bail!("--root must be an absolute path, not {}", root.display());
        }
        super::assets::private_dir(root, true, "state root")?;
        Ok(Self {
            root: root.to_owned(),
            unusable: None,
        })
    }

    /// The store at `root`, checked but not created (for commands that do not create
    /// containers). A root that cannot be named or fails the check makes every command that
    /// uses the store fail with that reason.
    pub fn lookup(root: Result<PathBuf>) -> Self {
        let checked = root.and_then(|r| {
            if !r.is_absolute() {
                bail!("--root must be an absolute path, not {}", r.display());
            }
            super::assets::private_dir(&r, false, "state root").map(|_| r)
        });
        match checked {
            Ok(root) => Self {
                root,
                unusable: None,
            },
            Err(e) => Self {
                root: PathBuf::new(),
                unusable: Some(crate::error_line(&e)),
            },
        }
    }

    fn usable(&self) -> Result<()> {
        match &self.unusable {
            Some(why) => bail!("{why}"),
            None => Ok(()),
        }
    }

    /// The directory of container `id`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Claims `id`: makes its directory. An existing one is refused as runc refuses it.
    pub fn claim(&self, id: &str) -> Result<PathBuf> {
        self.usable()?;
        validate_id(id)?;
        let dir = self.dir(id);
        // 0700: nothing of another user needs to reach into it (runc makes 0711).
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container with given ID already exists")
            }
            Err(e) => Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }

    /// The record of `id`; "container does not exist" as runc says it. The container's
    /// directory must be a directory (not a symbolic link) and its record must name `id`: the
    /// directory's name is the container's, whatever the record says.
    pub fn load(&self, id: &str) -> Result<Record> {
        self.usable()?;
        validate_id(id)?;
        let dir = self.dir(id);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{} is not a directory", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("container does not exist")
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        }
        match read_record(&dir.join(RECORD)) {
            Ok(r) if r.id == id => Ok(r),
            Ok(r) => bail!(
                "{} names container {:?}, not {id:?}",
                dir.join(RECORD).display(),
                r.id
            ),
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
            {
                bail!("container does not exist")
            }
            Err(e) => Err(e),
        }
    }

    /// Every container with a readable record, sorted by id. A directory whose record is
    /// missing, unreadable or names another container (a `create` that is still starting, or
    /// was killed before it wrote one) is skipped.
    pub fn list(&self) -> Result<Vec<Record>> {
        self.usable()?;
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.root.display()));
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str() else { continue };
            // file_type() does not follow a symbolic link.
            if validate_id(id).is_err() || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Ok(r) = read_record(&entry.path().join(RECORD))
                && r.id == id
            {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Removes the entry of `id` in the root, whatever it is: a directory and everything in it
    /// (symbolic links inside are removed, never followed), or a symbolic link or file planted
    /// in its place (removed itself).
    pub fn remove(&self, id: &str) -> Result<()> {
        self.usable()?;
        validate_id(id)?;
        let dir = self.dir(id);
        // The jail's uid goes back (and a working set its supervisor recorded goes into the
        // template) before the directory that says which uid it was.
        if let Err(e) = super::jail::release(&self.root, id, &dir) {
            tracing::warn!("{e:#}");
        }
        let res = match fs::symlink_metadata(&dir) {
            // remove_dir_all does not follow symbolic links, at the top or inside.
            Ok(m) if m.is_dir() => fs::remove_dir_all(&dir),
            Ok(_) => fs::remove_file(&dir),
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
        }
    }
}

/// Reads a record: a regular file (opened without blocking, so a FIFO planted there cannot
/// hang the runtime), at most [`MAX_RECORD`] bytes.
pub fn read_record(path: &Path) -> Result<Record> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mut text = String::new();
    file.take(MAX_RECORD + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() as u64 > MAX_RECORD {
        bail!("{} is larger than {MAX_RECORD} bytes", path.display());
    }
    serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
}

/// Writes `record` into `dir` atomically (see [`super::write_file_synced`]).
pub fn write_record(dir: &Path, record: &Record) -> Result<()> {
    super::write_file_synced(&dir.join(RECORD), &serde_json::to_vec(record)?)
}

/// Now as RFC 3339 in UTC with nanoseconds (`2026-11-27T19:25:34.123456789Z`), as runc writes
/// `created`.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as RFC 3339 in UTC with nanoseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn test_rfc3339_known_instants() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
        // 2000-02-29 (a leap day in a century leap year) 12:34:56.5
        let t = SystemTime::UNIX_EPOCH + Duration::new(951_827_696, 500_000_000);
        assert_eq!(rfc3339(t), "2000-02-29T12:34:56.500000000Z");
        // 2026-11-27 19:25:34
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_807_534);
        assert_eq!(rfc3339(t), "2026-11-27T19:25:34.000000000Z");
    }

    #[test]
    fn test_ids_as_runc_accepts_them() {
        for ok in ["a", "web-1", "x_y.z+1", "0123456789abcdef"] {
            validate_id(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            "../x",
            &"x".repeat(MAX_ID + 1),
        ] {
            let e = validate_id(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid container id format"), "{bad:?}: {e}");
        }
    }

    fn record(id: &str, pid: i32, start: u64, status: Status) -> Record {
        Record {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: rfc3339_now(),
            annotations: BTreeMap::new(),
            pid,
            pid_start: start,
            status,
            exit_code: None,
            cgroup: None,
            netns: None,
            hooks: Default::default(),
        }
    }

    #[test]
    fn test_status_follows_the_supervisor_process() {
        let me = std::process::id() as i32;
        let start = process_start_time(me).unwrap();
        assert_eq!(
            record("a", me, start, Status::Running).current_status(),
            Status::Running
        );
        // Same pid, another start time: a reused pid.
        assert_eq!(
            record("a", me, start + 1, Status::Running).current_status(),
            Status::Stopped
        );
        // A pid that has exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert_eq!(
            record("a", pid, 0, Status::Created).current_status(),
            Status::Stopped
        );
        let r = record("a", pid, 0, Status::Created);
        let json = serde_json::to_value(r.oci_state()).unwrap();
        assert_eq!(json["pid"], 0);
        assert_eq!(json["status"], "stopped");
        assert!(json.get("annotations").is_none());
    }

    #[test]
    fn test_store_claim_load_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("root")).unwrap();
        let d = store.claim("c1").unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        let e = store.claim("c1").unwrap_err().to_string();
        assert_eq!(e, "container with given ID already exists");
        // A claimed directory without a record is not listed and does not exist yet.
        assert!(store.list().unwrap().is_empty());
        assert_eq!(
            store.load("c1").unwrap_err().to_string(),
            "container does not exist"
        );
        let r = record("c1", 1, 0, Status::Created);
        write_record(&d, &r).unwrap();
        assert_eq!(store.load("c1").unwrap(), r);
        assert_eq!(store.list().unwrap(), vec![r]);
        store.remove("c1").unwrap();
        assert!(!d.exists());
        assert_eq!(
            store.load("c1").unwrap_err().to_string(),
            "container does not exist"
        );
    }

    #[test]
    fn test_signals_reach_only_the_process_with_the_recorded_start() {
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = process_start_time(pid).unwrap();
        // Another start time (a reused pid), or none recorded: no signal.
        assert!(!signal_process(pid, start + 1, libc::SIGKILL).unwrap());
        assert!(!signal_process(pid, 0, libc::SIGKILL).unwrap());
        assert!(!process_alive(pid, 0));
        assert!(child.try_wait().unwrap().is_none(), "signalled anyway");
        assert!(!signal_process(-1, start, libc::SIGKILL).unwrap());
        assert!(!signal_process(0, start, libc::SIGKILL).unwrap());
        assert!(signal_process(pid, start, libc::SIGKILL).unwrap());
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // Gone (reaped): nothing to signal.
        assert!(!signal_process(pid, start, libc::SIGKILL).unwrap());
    }

    #[test]
    fn test_records_are_written_without_following_planted_links() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("root")).unwrap();
        let d = store.claim("c1").unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep").unwrap();
        // The record's name and the temporary name the old writer used, both links out.
        std::os::unix::fs::symlink(&outside, d.join(RECORD)).unwrap();
        std::os::unix::fs::symlink(
            &outside,
            d.join(format!(".{RECORD}.{}", std::process::id())),
        )
        .unwrap();
        let r = record("c1", 1, 0, Status::Created);
        write_record(&d, &r).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        assert!(fs::symlink_metadata(d.join(RECORD)).unwrap().is_file());
        assert_eq!(store.load("c1").unwrap(), r);
        // No temporary is left behind.
        let names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn test_the_directory_name_is_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.claim("c1").unwrap();
        write_record(&d, &record("../c2", 1, 0, Status::Created)).unwrap();
        let e = store.load("c1").unwrap_err().to_string();
        assert!(e.ends_with("names container \"../c2\", not \"c1\""), "{e}");
        assert!(store.list().unwrap().is_empty());
        // A link in a container's place is not followed, and removing it removes the link.
        let elsewhere = dir.path().join("elsewhere");
        store.claim("elsewhere").unwrap();
        write_record(&elsewhere, &record("elsewhere", 1, 0, Status::Created)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("link")).unwrap();
        let e = store.load("link").unwrap_err().to_string();
        assert!(e.ends_with("is not a directory"), "{e}");
        assert_eq!(store.list().unwrap().len(), 1);
        store.remove("link").unwrap();
        assert!(fs::symlink_metadata(dir.path().join("link")).is_err());
        assert!(elsewhere.join(RECORD).is_file());
    }

    #[test]
    fn test_a_root_that_is_not_private_is_refused_by_every_command() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let store = Store::lookup(Ok(dir.path().to_owned()));
        for e in [
            store.load("c1").unwrap_err(),
            store.list().unwrap_err(),
            store.remove("c1").unwrap_err(),
            store.claim("c1").unwrap_err(),
        ] {
            assert!(
                e.to_string().contains("is writable by group or others"),
                "{e}"
            );
        }
        assert!(Store::open(dir.path()).is_err());
        let store = Store::lookup(Err(anyhow::anyhow!("no state root: set it")));
        assert_eq!(
            store.list().unwrap_err().to_string(),
            "no state root: set it"
        );
        let e = Store::lookup(Ok("rel".into()))
            .list()
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be an absolute path"), "{e}");
    }

    #[test]
    fn test_hostile_records_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.claim("fifo").unwrap();
        nix::unistd::mkfifo(&d.join(RECORD), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = format!("{:#}", store.load("fifo").unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        let d = store.claim("junk").unwrap();
        fs::write(d.join(RECORD), b"{\"id\": 3").unwrap();
        let e = format!("{:#}", store.load("junk").unwrap_err());
        assert!(e.contains("is corrupt"), "{e}");
        // Neither breaks the listing.
        assert!(store.list().unwrap().is_empty());
    }
}
