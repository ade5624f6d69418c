//! Running mkfs.erofs: finding it, knowing its version cheaply, building an image into a
//! temporary file and installing it under its final name only when it is complete and durable.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

use crate::ImageError;
use crate::image::{ImageState, SECTOR_SIZE, check_image};

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

/// Builds the image of `rootfs` into a new temporary file in `dir`: runs mkfs.erofs, pads the
/// file to a whole number of sectors, checks it, and makes it durable (fsync).
pub(crate) fn build_temp(
    tool: &Tool,
    rootfs: &Path,
    dir: &Path,
    key: &str,
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
    run_mkfs(tool, rootfs, &temp.path)?;
    // mkfs.erofs truncated and rewrote the file we created, through its own descriptor.
    let file = temp.file.as_ref().expect("temp image is open");
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

/// Runs mkfs.erofs; its output (both streams, one pipe) goes into the error, bounded.
fn run_mkfs(tool: &Tool, rootfs: &Path, out: &Path) -> Result<(), ImageError> {
    let (mut reader, writer) = io::pipe().map_err(|e| ImageError::ToolRun {
        path: tool.path.clone(),
        what: "cannot create a pipe for its output".into(),
        source: Some(e),
    })?;
    let writer2 = writer.try_clone().map_err(|e| ImageError::ToolRun {
        path: tool.path.clone(),
        what: "cannot duplicate its output pipe".into(),
        source: Some(e),
    })?;
    let mut cmd = Command::new(&tool.path);
    cmd.args(MKFS_ARGS)
        .arg(out)
        .arg(rootfs)
        .env_remove("SOURCE_DATE_EPOCH")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2);
    debug!(cmd = ?cmd, "building an erofs image");
    let mut child = cmd.spawn().map_err(|e| spawn_error(&tool.path, e))?;
    // The write ends live on in `cmd`: close them, or the read below never sees end of file.
    drop(cmd);
    let mut output = Vec::new();
    let read = (&mut reader)
        .take(OUTPUT_LIMIT)
        .read_to_end(&mut output)
        .and_then(|_| io::copy(&mut reader, &mut io::sink()));
    let status = child.wait().map_err(|e| ImageError::ToolRun {
        path: tool.path.clone(),
        what: "cannot wait for it".into(),
        source: Some(e),
    })?;
    if let Err(e) = read {
        warn!(error = %e, "cannot read mkfs.erofs's output");
    }
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output).trim().to_owned();
    if output.len() as u64 >= OUTPUT_LIMIT {
        stderr.push_str(" [...]");
    }
    Err(ImageError::Mkfs {
        rootfs: rootfs.to_path_buf(),
        status,
        stderr,
    })
}
