//! Running mkfs.erofs: finding it, knowing its version cheaply, building an image into a
//! temporary file and installing it under its final name only when it is complete and durable.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tracing::{debug, warn};

use crate::image::{ImageState, SECTOR_SIZE, check_image};
use crate::{BuildLimits, ImageError};

/// The options mkfs.erofs is run with (they are part of every key). Chosen so the image shows
/// the guest exactly the tree's metadata:
/// - `--preserve-mtime`: every file keeps its own mtime to the nanosecond (an extended inode
///   where it differs from the build time). Not `-T`, which would stamp one time on all files,
///   and not `--ignore-mtime`.
/// - no `--all-root` / `--force-uid` / `--force-gid`: owners are kept as they are;
/// - xattrs kept (the default `-x2`: an xattr seen twice is shared);
/// - hard links, device nodes, FIFOs, sockets and symlinks are reproduced by default;
/// - no `-z`: uncompressed, so the guest kernel needs no erofs decompression support, builds are
///   quick, and the guest reads file data straight from the host page cache;
/// - `--quiet`: only errors are printed (they go into [`ImageError::Mkfs`]).
///
/// The process also runs without `SOURCE_DATE_EPOCH`, which newer mkfs.erofs use to clamp file
/// times, and with `LC_ALL=C` for messages that read the same everywhere.
pub(crate) const MKFS_ARGS: &[&str] = &["--quiet", "--preserve-mtime"];

/// Added to [`MKFS_ARGS`] for a tree with sparse files (holes under the budget): chunk-based
/// files of one block per chunk, identical chunks stored once, so every all-zero chunk of a hole
/// is one shared block instead of a block of zeros each. Not the default: hashing every chunk
/// makes a build about twice as slow, and small files lose their inline tails.
pub(crate) const SPARSE_ARGS: &[&str] = &["--chunksize=4096"];

/// `CAP_DAC_READ_SEARCH`: read any file and search any directory, nothing else. The one
/// capability mkfs.erofs keeps when it runs as an unprivileged user for a root caller.
const CAP_DAC_READ_SEARCH: u32 = 2;

/// How much of mkfs.erofs's output goes into an error.
const OUTPUT_LIMIT: u64 = 4096;

/// Where mkfs.erofs is looked for after `$PATH`.
const TOOL_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// The memo of the tool's version, in the cache directory.
const VERSION_MEMO: &str = "mkfs-erofs-version";

/// mkfs.erofs, found, with its version.
#[derive(Debug, Clone)]
pub(crate) struct Tool {
    /// The binary.
    pub path: PathBuf,
    /// Its version line, e.g. `mkfs.erofs 1.5`.
    pub version: String,
}

/// Finds mkfs.erofs: `explicit` if given, else in `$PATH`, else in the usual sbin/bin dirs.
pub(crate) fn find_tool(explicit: Option<&Path>) -> Result<PathBuf, ImageError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(ImageError::ToolMissing {
                looked: p.display().to_string(),
            })
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path_var)
        .chain(TOOL_DIRS.iter().map(PathBuf::from))
        .collect();
    dirs.iter()
        .map(|d| d.join("mkfs.erofs"))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::ToolMissing {
            looked: format!("$PATH and {}", TOOL_DIRS.join(", ")),
        })
}

/// The tool's version. Running it costs a process start (about a millisecond), which a cache hit
/// should not pay each time: the answer is kept in the cache directory beside the binary's
/// identity (path, device, inode, size, mtime, ctime), and asked again when that changes, as it
/// does when a package upgrade replaces the binary.
pub(crate) fn tool_version(path: &Path, cache_dir: &Path) -> Result<String, ImageError> {
    let md = std::fs::metadata(path).map_err(|e| ImageError::ToolRun {
        path: path.to_path_buf(),
        what: "cannot stat it".into(),
        source: Some(e),
    })?;
    let identity = format!(
        "{} {} {} {}.{} {}.{} {}",
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec(),
        path.display()
    );
    let memo = cache_dir.join(VERSION_MEMO);
    if let Some(version) = read_memo(&memo, &identity) {
        return Ok(version);
    }
    let version = ask_version(path)?;
    if let Err(e) = write_memo(cache_dir, &memo, &identity, &version) {
        warn!(memo = %memo.display(), error = %e, "cannot record mkfs.erofs's version");
    }
    Ok(version)
}

fn read_memo(memo: &Path, identity: &str) -> Option<String> {
    let mut text = String::new();
    File::open(memo)
        .ok()?
        .take(4096)
        .read_to_string(&mut text)
        .ok()?;
    let mut lines = text.lines();
    (lines.next()? == identity)
        .then(|| lines.next().map(str::to_owned))
        .flatten()
        .filter(|v| !v.is_empty())
}

fn write_memo(dir: &Path, memo: &Path, identity: &str, version: &str) -> io::Result<()> {
    let tmp = dir.join(format!(
        ".{VERSION_MEMO}.{}.{}.partial",
        std::process::id(),
        unique()
    ));
    // A new file (O_EXCL|O_NOFOLLOW): nothing planted under its name is written through.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    io::Write::write_all(&mut f, format!("{identity}\n{version}\n").as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, memo).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Runs the tool to learn its version: newer ones answer `-V`; 1.5 does not know `-V` but
/// prints `mkfs.erofs 1.5` on its standard output before complaining.
fn ask_version(path: &Path) -> Result<String, ImageError> {
    let out = Command::new(path)
        .arg("-V")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(path, e))?;
    [&out.stdout, &out.stderr]
        .iter()
        .flat_map(|o| o.split(|&b| b == b'\n'))
        .map(|l| String::from_utf8_lossy(l).trim().to_owned())
        .find(|l| l.starts_with("mkfs.erofs") && l.bytes().any(|b| b.is_ascii_digit()))
        .ok_or_else(|| ImageError::ToolRun {
            path: path.to_path_buf(),
            what: "it printed no version line".into(),
            source: None,
        })
}

fn spawn_error(path: &Path, e: io::Error) -> ImageError {
    if e.kind() == io::ErrorKind::NotFound {
        ImageError::ToolMissing {
            looked: path.display().to_string(),
        }
    } else {
        ImageError::ToolRun {
            path: path.to_path_buf(),
            what: "cannot start it".into(),
            source: Some(e),
        }
    }
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The prefix of `key`'s temporary files: `.<key>.<pid>.<n>.partial`.
fn temp_prefix(key: &str) -> String {
    format!(".{key}.")
}

/// Removes temporary files a crashed build of `key` left. Only called with `key`'s lock held, so
/// no live build of `key` owns any of them.
pub(crate) fn remove_stale_temps(dir: &Path, key: &str) {
    let prefix = temp_prefix(key);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".partial") {
            debug!(file = %entry.path().display(), "removing a stale temporary image");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// An image being built: removed on drop unless installed.
#[derive(Debug)]
pub(crate) struct TempImage {
    path: PathBuf,
    file: Option<File>,
    size: u64,
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::ImageIo { path, what, source }
}

/// Builds the image of `rootfs` into a new temporary file in `dir`: runs mkfs.erofs (within
/// `limits`, in chunk mode if `sparse`), pads the file to a whole number of sectors, checks it,
/// and makes it durable (fsync).
pub(crate) fn build_temp(
    tool: &Tool,
    rootfs: &Path,
    dir: &Path,
    key: &str,
    limits: &BuildLimits,
    sparse: bool,
) -> Result<TempImage, ImageError> {
    let (path, file) = loop {
        let path = dir.join(format!(
            "{}{}.{}.partial",
            temp_prefix(key),
            std::process::id(),
            unique()
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => break (path, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&path, "cannot create it")(e)),
        }
    };
    let mut temp = TempImage {
        path,
        file: Some(file),
        size: 0,
    };
    let file = temp.file.as_ref().expect("temp image is open");
    run_mkfs(tool, rootfs, file, &temp.path, limits, sparse)?;
    // mkfs.erofs truncated and rewrote the file we created, through its own descriptor.
    let len = file
        .metadata()
        .map_err(io_err(&temp.path, "cannot stat it"))?
        .len();
    let padded = len.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    if padded != len {
        debug!(
            len,
            padded, "padding the image to a whole number of sectors"
        );
        file.set_len(padded)
            .map_err(io_err(&temp.path, "cannot pad it"))?;
    }
    if let ImageState::Bad(reason) = check_image(&temp.path) {
        return Err(ImageError::BadImage {
            path: temp.path.clone(),
            reason,
        });
    }
    file.sync_all()
        .map_err(io_err(&temp.path, "cannot sync it"))?;
    temp.size = padded;
    Ok(temp)
}

impl TempImage {
    /// Renames the image to `dest` and syncs the directory, so a crash leaves either no image
    /// or a complete one under `dest`. Returns its size.
    pub(crate) fn install(mut self, dest: &Path) -> Result<u64, ImageError> {
        std::fs::rename(&self.path, dest).map_err(io_err(&self.path, "cannot rename it"))?;
        self.file = None;
        sync_dir(dest.parent().unwrap_or(Path::new(".")))?;
        Ok(self.size)
    }
}

/// fsyncs a directory, making renames and removals in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ImageError::CacheDir {
            path: dir.to_path_buf(),
            what: "cannot sync it",
            source,
        })
}

/// The user mkfs.erofs runs as: `limits.run_as` when this process is root, else none (it runs
/// as the caller, who is unprivileged already).
fn drop_to(limits: &BuildLimits) -> Option<(u32, u32)> {
    limits.run_as.filter(|_| nix::unistd::geteuid().is_root())
}

/// Runs mkfs.erofs into `out` (the temporary image at `out_path`) within `limits`; its output
/// (both streams, one pipe) goes into the error, bounded.
///
/// The child gets, before it executes mkfs.erofs: `RLIMIT_FSIZE` (the image, and any temporary
/// file it writes, stop at `max_image_bytes`), `RLIMIT_CPU`, no core dumps, death with this
/// process, no new privileges, and for a root caller the uid and gid `run_as` with one
/// capability, `CAP_DAC_READ_SEARCH`, to read the whole rootfs. It then writes only the image,
/// which it opens as `/proc/self/fd/N`, owned by it for the build. A wall-clock timeout kills it.
fn run_mkfs(
    tool: &Tool,
    rootfs: &Path,
    out: &File,
    out_path: &Path,
    limits: &BuildLimits,
    sparse: bool,
) -> Result<(), ImageError> {
    let run_err = |what: &str| {
        let path = tool.path.clone();
        let what = what.to_owned();
        move |e: io::Error| ImageError::ToolRun {
            path,
            what,
            source: Some(e),
        }
    };
    let (mut reader, writer) =
        io::pipe().map_err(run_err("cannot create a pipe for its output"))?;
    let writer2 = writer
        .try_clone()
        .map_err(run_err("cannot duplicate its output pipe"))?;
    let drop_to = drop_to(limits);
    let out_fd = out.as_raw_fd();
    let out_arg = if drop_to.is_some() {
        PathBuf::from(format!("/proc/self/fd/{out_fd}"))
    } else {
        out_path.to_path_buf()
    };
    if let Some((uid, gid)) = drop_to {
        nix::unistd::fchown(out.as_fd(), Some(uid.into()), Some(gid.into()))
            .map_err(|e| io_err(out_path, "cannot hand it to the build's user")(e.into()))?;
    }
    let mut cmd = Command::new(&tool.path);
    cmd.args(MKFS_ARGS)
        .args(if sparse { SPARSE_ARGS } else { &[] })
        .arg(&out_arg)
        .arg(rootfs)
        .env_remove("SOURCE_DATE_EPOCH")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2);
    let child_limits = ChildLimits {
        fsize: limits.max_image_bytes,
        cpu: limits.cpu_seconds,
        drop_to,
        keep_fd: drop_to.map(|_| out_fd),
    };
    // SAFETY: the closure runs in the forked child before exec and makes only raw syscalls
    // (no allocation, no locks), which is what pre_exec requires.
    unsafe { cmd.pre_exec(move || child_limits.apply()) };
    debug!(cmd = ?cmd, ?limits, sparse, "building an erofs image");
    let started = Instant::now();
    let child = cmd.spawn().map_err(|e| spawn_error(&tool.path, e));
    // The write ends live on in `cmd`: close them, or the read below never sees end of file.
    drop(cmd);
    let mut child = child?;
    let (output, status) = read_until_exit(&mut child, &mut reader, started, limits)
        .map_err(run_err("cannot wait for it"))?;
    if let Some((uid, gid)) = drop_to.map(|_| (nix::unistd::geteuid(), nix::unistd::getegid())) {
        nix::unistd::fchown(out.as_fd(), Some(uid), Some(gid))
            .map_err(|e| io_err(out_path, "cannot take it back from the build's user")(e.into()))?;
    }
    let Some(status) = status else {
        return Err(ImageError::MkfsTimeLimit {
            rootfs: rootfs.to_path_buf(),
            what: "time",
            seconds: limits.timeout.as_secs(),
        });
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output).trim().to_owned();
    match status.signal() {
        Some(libc::SIGXFSZ) => {
            return Err(ImageError::ImageTooLarge {
                rootfs: rootfs.to_path_buf(),
                limit: limits.max_image_bytes,
            });
        }
        Some(libc::SIGXCPU) => {
            return Err(ImageError::MkfsTimeLimit {
                rootfs: rootfs.to_path_buf(),
                what: "CPU time",
                seconds: limits.cpu_seconds,
            });
        }
        _ => {}
    }
    // A tool that handles SIGXFSZ itself sees EFBIG ("File too large") and exits.
    if stderr.contains("File too large")
        || out
            .metadata()
            .is_ok_and(|m| m.len() >= limits.max_image_bytes)
    {
        return Err(ImageError::ImageTooLarge {
            rootfs: rootfs.to_path_buf(),
            limit: limits.max_image_bytes,
        });
    }
    if output.len() as u64 >= OUTPUT_LIMIT {
        stderr.push_str(" [...]");
    }
    Err(ImageError::Mkfs {
        rootfs: rootfs.to_path_buf(),
        status,
        stderr,
    })
}

/// Reads the child's output (the first [`OUTPUT_LIMIT`] bytes kept) until it exits or the
/// timeout passes; on timeout kills it and returns no status.
fn read_until_exit(
    child: &mut Child,
    reader: &mut io::PipeReader,
    started: Instant,
    limits: &BuildLimits,
) -> io::Result<(Vec<u8>, Option<ExitStatus>)> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = started + limits.timeout;
    let mut output = Vec::new();
    let mut open = true;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((output, None));
        }
        if !open {
            if let Some(status) = child.try_wait()? {
                return Ok((output, Some(status)));
            }
            std::thread::sleep(left.min(std::time::Duration::from_millis(20)));
            continue;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        match reader.read(&mut buf) {
            Ok(0) => open = false,
            Ok(n) => {
                let keep = (OUTPUT_LIMIT as usize).saturating_sub(output.len()).min(n);
                output.extend_from_slice(&buf[..keep]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!(error = %e, "cannot read mkfs.erofs's output");
                open = false;
            }
        }
    }
}

/// What the child sets on itself before it executes mkfs.erofs (plain values: it runs after
/// fork, where only raw syscalls are safe).
#[derive(Debug, Clone, Copy)]
struct ChildLimits {
    fsize: u64,
    cpu: u64,
    drop_to: Option<(u32, u32)>,
    keep_fd: Option<i32>,
}

impl ChildLimits {
    fn apply(&self) -> io::Result<()> {
        let check = |r: libc::c_long| {
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let set = |res, soft: u64, hard: u64| {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit reads the struct we pass.
            check(unsafe { libc::setrlimit(res, &lim) }.into())
        };
        set(libc::RLIMIT_FSIZE, self.fsize, self.fsize)?;
        // SIGXCPU at the soft limit, SIGKILL a little later if it is caught.
        set(libc::RLIMIT_CPU, self.cpu, self.cpu.saturating_add(5))?;
        set(libc::RLIMIT_CORE, 0, 0)?;
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }.into())?;
        if let Some(fd) = self.keep_fd {
            // The image's descriptor stays open across exec (as /proc/self/fd/N).
            // SAFETY: F_SETFD on a descriptor this process holds.
            check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }.into())?;
        }
        if let Some((uid, gid)) = self.drop_to {
            // Raw syscalls: glibc's wrappers would try to reach threads the child does not have.
            // SAFETY: setgroups with an empty list reads no memory; it changes this process only.
            check(unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()) })?;
            // SAFETY: integers only.
            check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })?;
            // SAFETY: integers only; keeps the permitted capabilities across the uid change.
            check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }.into())?;
            // SAFETY: integers only.
            check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })?;
            // Permitted, effective and inheritable: CAP_DAC_READ_SEARCH alone; then ambient, so
            // it survives the exec of a binary without file capabilities.
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            #[repr(C)]
            #[derive(Clone, Copy)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let header = Header {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let bit = 1u32 << CAP_DAC_READ_SEARCH;
            let data = [
                Data {
                    effective: bit,
                    permitted: bit,
                    inheritable: bit,
                },
                Data {
                    effective: 0,
                    permitted: 0,
                    inheritable: 0,
                },
            ];
            // SAFETY: capset reads the header and the two data structs (version 3 layout).
            check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) })?;
            check(
                // SAFETY: prctl with integer arguments only.
                unsafe {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE,
                        libc::c_ulong::from(CAP_DAC_READ_SEARCH),
                        0,
                        0,
                    )
                }
                .into(),
            )?;
        }
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())?;
        Ok(())
    }
}
