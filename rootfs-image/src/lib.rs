//! Container rootfs directories as read-only erofs images, cached by content.
//!
//! `kata-snap run`/`create` gives each container's rootfs to its VM as an erofs image on a
//! virtio-blk disk. Building one reads the whole tree; a restore costs a few milliseconds, so a
//! second start of the same rootfs must find its image without reading file data. The cache key
//! is therefore computed from metadata only, in one of two ways ([`KeyKind`]):
//!
//! - **Overlay** — the rootfs is itself the mount point of an `overlay` filesystem (as
//!   containerd's overlayfs snapshotter makes them, found in `/proc/self/mountinfo`) and its upper
//!   dir has no entries. What the container sees is then exactly the merge of the lower layers,
//!   and the key covers each lower (and data-only) layer's path with its `(st_dev, st_ino,
//!   st_ctime)`, the overlay's mount and super options, and the merged root's mode and owner.
//!   Costs one read of mountinfo and a `stat` per layer. Containers made from the same image share
//!   one erofs image.
//! - **TreeSignature** — otherwise: a walk of the tree that never follows symlinks, in sorted
//!   order, hashing for every entry its relative path, file type and mode, uid, gid, size, mtime
//!   and ctime (ns), inode number, rdev, link count and a symlink's target. Costs one `lstat` per
//!   entry (and a `readlink` per symlink); bounded by [`WalkLimits`].
//!
//! A tree-signature key names one tree as it is, not its content: an identical copy elsewhere
//! (other inodes and ctimes) gets another key and its own image. Sharing between containers
//! comes from the overlay key.
//!
//! Every key also covers a format version, mkfs.erofs's version and its options, so a new tool
//! or new options build new images.
//!
//! # Why that is safe, and what is assumed
//! A file's data cannot change without its ctime changing: every write, truncate, chmod, chown,
//! xattr change, rename into place or `utimensat` (restoring an mtime) sets ctime to the current
//! time, and ctime cannot be set back by any syscall. Faking it needs the system clock moved back
//! (root) or a write to the block device under a mounted filesystem; both are outside what this
//! cache defends against: whoever can do that can change the rootfs anyway. Replacing a file by
//! another with identical metadata also changes the inode number or the directory's ctime.
//! Extended attributes are not hashed, but setting or removing one changes ctime; reads change
//! only atime, which is not hashed. What is assumed and not detected:
//! - the filesystem keeps ctime honestly with sub-second resolution (a rewrite within the same
//!   clock tick as the previous change, on a filesystem with coarse timestamps, can go unseen);
//! - for an overlay key, the lower layers are immutable, as containerd's committed snapshots are:
//!   a lower layer's `st_ctime` only changes when entries are added or removed directly in its
//!   top directory, so a change deeper inside a lower layer (which overlayfs itself forbids while
//!   mounted) is not seen;
//! - a change of a file while its image is being built is detected (the key is computed again
//!   after mkfs.erofs and the image is discarded if it differs), but a change between the key
//!   and the use of a cached image is the caller's to avoid: a running container sees the image,
//!   not the directory;
//! - an image in the cache directory is trusted once it passes a cheap check (regular file,
//!   size a positive multiple of 512, erofs magic): the directory must be writable by its owner
//!   only, which [`ImageCache::open`] enforces.
//!
//! # Bounded builds
//! A build is bounded ([`BuildLimits`]): the tree is measured first (one `lstat` per entry) and
//! refused with one error if its file data or the holes of its sparse files pass their budgets
//! (an uncompressed erofs image stores a hole as data: a 2 GiB sparse file made a 2 GiB image);
//! a tree with holes under the budget is built in chunk mode, where all-zero chunks share one
//! block. mkfs.erofs then runs with `RLIMIT_FSIZE` (the image's size), `RLIMIT_CPU` and a
//! wall-clock timeout, and, for a root caller, as an unprivileged user (`nobody`) keeping only
//! `CAP_DAC_READ_SEARCH` to read the tree; it writes only the image it is handed. A build that
//! fails leaves no image and no temporary file.
//!
//! # Pruning and leases
//! Whoever uses an image holds an [`ImageLease`] (a shared `flock` on the image file) for as long
//! as a VM may read it; [`ImageCache::get_or_build`] hands one out with the image.
//! [`ImageCache::prune`] removes least recently used images until the cache fits a budget, and
//! never one that is leased (its exclusive non-blocking `flock` fails) or being built.
//!
//! # Layout of the cache directory
//! `<key>.erofs` the images (mtime = last use), `<key>.lock` the per-key build locks (`flock`),
//! `.<key>.<pid>.<n>.partial` images being built, `mkfs-erofs-version` the tool's version memo.

#![deny(missing_docs)]

mod build;
mod error;
mod image;
mod key;
mod mountinfo;
mod scan;

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

pub use error::ImageError;
pub use image::{EROFS_MAGIC, EROFS_SUPER_OFFSET, SECTOR_SIZE};

use build::Tool;
use image::ImageState;

/// How a rootfs was keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// From the lower layers of the overlay mount the rootfs is (its upper dir empty).
    Overlay,
    /// From a signature of every entry's metadata.
    TreeSignature,
}

/// Bounds of the tree walk, so a hostile or runaway tree ends in an error, not an endless walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkLimits {
    /// Most entries (files, directories, links, ...), the root included.
    pub max_entries: u64,
    /// Most nested directories below the root.
    pub max_depth: usize,
}

impl Default for WalkLimits {
    fn default() -> Self {
        Self {
            max_entries: 4_000_000,
            max_depth: 256,
        }
    }
}

/// Bounds of one image build (see the crate docs, "Bounded builds").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLimits {
    /// Largest image in bytes: mkfs.erofs's `RLIMIT_FSIZE`.
    pub max_image_bytes: u64,
    /// Most bytes of regular-file data (apparent sizes, a hard link once) a rootfs may hold.
    pub max_data_bytes: u64,
    /// Most bytes of holes in the rootfs's sparse files (each file with at least 1 MiB of
    /// holes counts).
    pub max_hole_bytes: u64,
    /// mkfs.erofs's `RLIMIT_CPU`, in seconds.
    pub cpu_seconds: u64,
    /// Wall-clock bound of one mkfs.erofs run.
    pub timeout: Duration,
    /// The uid and gid mkfs.erofs runs as when this process is root; `None` keeps root.
    pub run_as: Option<(u32, u32)>,
}

/// The `nobody` user and `nogroup` group of Debian and most distributions.
pub const NOBODY: (u32, u32) = (65534, 65534);

impl Default for BuildLimits {
    fn default() -> Self {
        Self {
            max_image_bytes: 16 << 30,
            max_data_bytes: 16 << 30,
            max_hole_bytes: 256 << 20,
            cpu_seconds: 300,
            timeout: Duration::from_secs(600),
            run_as: Some(NOBODY),
        }
    }
}

/// A shared `flock` on a cached image, held while a VM may read it: [`ImageCache::prune`] skips
/// a leased image. Clones share the lock; it is released when the last one is dropped (or the
/// process ends).
#[derive(Debug, Clone)]
pub struct ImageLease(Arc<File>);

impl ImageLease {
    /// Leases the image at `path` (as handed out by [`ImageCache::get_or_build`], to a process
    /// that got only the path): opens it read-only without following a symlink and takes a
    /// shared lock, waiting while a prune removes it. Fails if it is gone.
    pub fn take(path: &Path) -> Result<Self, ImageError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| ImageError::ImageIo { path, what, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(io("cannot open it to lease it"))?;
        let lease = Self::lock(file).map_err(io("cannot lock it"))?;
        if !lease.linked() {
            return Err(io("it was removed from the cache")(std::io::Error::from(
                std::io::ErrorKind::NotFound,
            )));
        }
        Ok(lease)
    }

    fn lock(file: File) -> std::io::Result<Self> {
        file.lock_shared()?;
        Ok(Self(Arc::new(file)))
    }

    /// Whether the leased file is still in the cache (a prune may have removed it between
    /// the open and the lock).
    fn linked(&self) -> bool {
        self.0.metadata().is_ok_and(|m| m.nlink() > 0)
    }
}

/// What [`ImageCache::prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Keys of the images removed, least recently used first.
    pub removed: Vec<String>,
    /// Bytes freed.
    pub freed: u64,
    /// Images spared because they are leased (in use) or being built.
    pub in_use: usize,
    /// Bytes of images left in the cache.
    pub total: u64,
}

/// An image handed out by [`ImageCache::get_or_build`].
#[derive(Debug, Clone)]
pub struct CachedImage {
    /// The image file (`<cache>/<key>.erofs`), to be opened read-only.
    pub path: PathBuf,
    /// The cache key.
    pub key: String,
    /// Found in the cache (possibly built meanwhile by another caller that held the lock).
    pub hit: bool,
    /// How the rootfs was keyed.
    pub key_kind: KeyKind,
    /// Time spent computing the key (rootfs checks included).
    pub key_time: Duration,
    /// Time spent building the image, on a miss (mkfs.erofs, the check of the rootfs afterwards,
    /// fsyncs and rename).
    pub build_time: Option<Duration>,
    /// Image size in bytes, a multiple of [`SECTOR_SIZE`].
    pub size: u64,
    /// The lease on the image: keep it (or take one of your own with [`ImageLease::take`]) for
    /// as long as a VM may read the image.
    pub lease: ImageLease,
}

/// A cached image, as [`ImageCache::list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The cache key.
    pub key: String,
    /// The image file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// When it was built or last handed out (its mtime).
    pub last_used: SystemTime,
}

/// The cache: a directory of erofs images named by key.
#[derive(Debug)]
pub struct ImageCache {
    dir: PathBuf,
    mkfs: Option<PathBuf>,
    limits: WalkLimits,
    build_limits: BuildLimits,
    tool: OnceLock<Tool>,
}

impl ImageCache {
    /// Opens the cache directory, creating it (and missing parents) with mode 0700. An existing
    /// one must be a directory owned by this user and not writable by group or others.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let err = |what| {
            let path = dir.to_path_buf();
            move |source| ImageError::CacheDir { path, what, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err("cannot create it"))?;
        let md = std::fs::metadata(dir).map_err(err("cannot stat it"))?;
        let insecure = |reason: String| ImageError::InsecureCacheDir {
            path: dir.to_path_buf(),
            reason,
        };
        if !md.is_dir() {
            return Err(insecure("not a directory".into()));
        }
        let euid = nix::unistd::geteuid().as_raw();
        if md.uid() != euid {
            return Err(insecure(format!("owned by uid {}, not {euid}", md.uid())));
        }
        if md.mode() & 0o022 != 0 {
            return Err(insecure(format!("mode {:o}", md.mode() & 0o7777)));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            mkfs: None,
            limits: WalkLimits::default(),
            build_limits: BuildLimits::default(),
            tool: OnceLock::new(),
        })
    }

    /// Uses this mkfs.erofs binary instead of looking for one in `$PATH`.
    pub fn with_mkfs_erofs(mut self, path: &Path) -> Self {
        self.mkfs = Some(path.to_path_buf());
        self.tool = OnceLock::new();
        self
    }

    /// Uses these bounds for the tree walk instead of [`WalkLimits::default`].
    pub fn with_limits(mut self, limits: WalkLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Builds within these bounds instead of [`BuildLimits::default`].
    pub fn with_build_limits(mut self, limits: BuildLimits) -> Self {
        self.build_limits = limits;
        self
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The erofs image of `rootfs` (a directory): found by key on a hit (its mtime touched),
    /// built on a miss. Concurrent calls for the same rootfs, from threads or processes, build
    /// it once; different rootfs build in parallel.
    pub fn get_or_build(&self, rootfs: &Path) -> Result<CachedImage, ImageError> {
        let start = Instant::now();
        let (rootfs, root_md) = open_rootfs(rootfs)?;
        let tool = self.tool()?;
        let (key, key_kind) = self.key(&rootfs, &root_md, tool)?;
        let key_time = start.elapsed();
        let path = self.image_path(&key);
        // A hit: leased, then checked to be still in the cache (a prune removes an image while
        // it holds the exclusive lock, which the shared one waits for).
        let hit = |file: File, size| -> Result<Option<CachedImage>, ImageError> {
            if let Err(e) = image::touch(&file) {
                warn!(image = %path.display(), error = %e, "cannot mark the image as used");
            }
            let lease = ImageLease::lock(file).map_err(|source| ImageError::ImageIo {
                path: path.clone(),
                what: "cannot lock it",
                source,
            })?;
            if !lease.linked() {
                return Ok(None);
            }
            debug!(rootfs = %rootfs.display(), key, ?key_kind, ?key_time, "rootfs image cache hit");
            Ok(Some(CachedImage {
                path: path.clone(),
                key: key.clone(),
                hit: true,
                key_kind,
                key_time,
                build_time: None,
                size,
                lease,
            }))
        };
        if let ImageState::Good(file, size) = image::check_image(&path)
            && let Some(found) = hit(file, size)?
        {
            return Ok(found);
        }

        let _lock = self.lock(&key)?;
        match image::check_image(&path) {
            // Built by another caller while this one waited for the lock.
            ImageState::Good(file, size) => {
                if let Some(found) = hit(file, size)? {
                    return Ok(found);
                }
            }
            ImageState::Bad(reason) => {
                warn!(image = %path.display(), reason, "cached image is bad, rebuilding it");
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(ImageError::ImageIo {
                            path,
                            what: "cannot remove the bad image",
                            source,
                        });
                    }
                }
            }
            ImageState::Missing => {}
        }
        build::remove_stale_temps(&self.dir, &key);
        let build_start = Instant::now();
        let sparse = self.check_tree(&rootfs)?;
        let temp = build::build_temp(tool, &rootfs, &self.dir, &key, &self.build_limits, sparse)?;
        // mkfs.erofs read the tree while it may have been changing: the image is the key's
        // only if the key is still the same.
        let (_, root_md) = open_rootfs(&rootfs)?;
        if self.key(&rootfs, &root_md, tool)?.0 != key {
            return Err(ImageError::RootfsChanged { path: rootfs });
        }
        let size = temp.install(&path)?;
        // Leased before the key's lock is released: no prune can take it from under us.
        let lease = ImageLease::take(&path)?;
        let build_time = build_start.elapsed();
        info!(
            rootfs = %rootfs.display(), key, ?key_kind, ?key_time, ?build_time, size,
            "built rootfs image"
        );
        Ok(CachedImage {
            path,
            key,
            hit: false,
            key_kind,
            key_time,
            build_time: Some(build_time),
            size,
            lease,
        })
    }

    /// Measures the tree mkfs.erofs is about to read and refuses it if it passes the build's
    /// budgets; returns whether it has sparse files (then it is built in chunk mode).
    fn check_tree(&self, rootfs: &Path) -> Result<bool, ImageError> {
        let limits = &self.build_limits;
        let data = scan::scan(rootfs, &self.limits)?;
        if data.data_bytes > limits.max_data_bytes {
            return Err(ImageError::RootfsTooLarge {
                rootfs: rootfs.to_path_buf(),
                bytes: data.data_bytes,
                limit: limits.max_data_bytes,
            });
        }
        if data.hole_bytes > limits.max_hole_bytes {
            let (file, size, allocated) = data.most_holes.unwrap_or_default();
            return Err(ImageError::SparseRootfs {
                rootfs: rootfs.to_path_buf(),
                holes: data.hole_bytes,
                limit: limits.max_hole_bytes,
                file,
                size,
                allocated,
            });
        }
        Ok(data.hole_bytes > 0)
    }

    /// Removes least recently used images until the cache holds at most `budget` bytes, sparing
    /// every image that is leased (in use by a VM) or being built, and every image used less
    /// than `min_age` ago.
    pub fn prune(&self, budget: u64, min_age: Duration) -> Result<PruneReport, ImageError> {
        let images = self.list()?;
        let mut report = PruneReport {
            total: images.iter().map(|i| i.size).sum(),
            ..PruneReport::default()
        };
        let cutoff = SystemTime::now()
            .checked_sub(min_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        for i in images {
            if report.total <= budget {
                break;
            }
            if i.last_used > cutoff {
                continue;
            }
            if self.remove_unused(&i.key)? {
                report.total -= i.size;
                report.freed += i.size;
                report.removed.push(i.key);
            } else {
                report.in_use += 1;
            }
        }
        if !report.removed.is_empty() {
            build::sync_dir(&self.dir)?;
            info!(
                removed = report.removed.len(),
                freed = report.freed,
                total = report.total,
                budget,
                "pruned the rootfs image cache"
            );
        }
        Ok(report)
    }

    /// Removes the image `key` unless it is leased or being built; `false` when it was spared.
    fn remove_unused(&self, key: &str) -> Result<bool, ImageError> {
        let Some(lock) = self.try_lock(key)? else {
            return Ok(false);
        };
        let path = self.image_path(key);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(ImageError::ImageIo {
                    path,
                    what: "cannot open it",
                    source,
                });
            }
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(ImageError::Lock { path, source });
            }
        }
        std::fs::remove_file(&path).map_err(|source| ImageError::ImageIo {
            path: path.clone(),
            what: "cannot remove it",
            source,
        })?;
        let _ = std::fs::remove_file(self.lock_path(key));
        drop(file);
        drop(lock);
        debug!(key, "pruned rootfs image");
        Ok(true)
    }

    /// The cached images, least recently used first.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let err = |source| ImageError::CacheDir {
            path: self.dir.clone(),
            what: "cannot read it",
            source,
        };
        let mut images = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".erofs")) else {
                continue;
            };
            if !key::is_valid_key(key) {
                continue;
            }
            // Gone since the directory was read: not listed.
            let Ok(md) = entry.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            images.push(ImageInfo {
                key: key.to_owned(),
                path: entry.path(),
                size: md.len(),
                last_used: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        images.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.key.cmp(&b.key)));
        Ok(images)
    }

    /// Removes the image with this key (under its lock, so never while it is being built).
    /// A VM that already opened it keeps reading it.
    pub fn remove(&self, key: &str) -> Result<(), ImageError> {
        if !key::is_valid_key(key) {
            return Err(ImageError::InvalidKey {
                key: key.to_owned(),
            });
        }
        let lock = self.lock(key)?;
        let path = self.image_path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotCached {
                    key: key.to_owned(),
                });
            }
            Err(source) => {
                return Err(ImageError::ImageIo {
                    path,
                    what: "cannot remove it",
                    source,
                });
            }
        }
        // The lock file goes too, or they pile up. A caller waiting on it then holds a lock on
        // a removed file while a new caller locks a new one: at worst both build the same image
        // and one rename replaces the other with identical content.
        let _ = std::fs::remove_file(self.lock_path(key));
        drop(lock);
        build::sync_dir(&self.dir)?;
        info!(key, "removed rootfs image");
        Ok(())
    }

    fn image_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.erofs"))
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.lock"))
    }

    /// Opens (creating it, mode 0600, never through a link) the lock file of `key`.
    fn lock_file(&self, key: &str) -> Result<(File, PathBuf), ImageError> {
        let path = self.lock_path(key);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| ImageError::Lock {
                path: path.clone(),
                source,
            })?;
        Ok((file, path))
    }

    /// Takes the exclusive `flock` of `key`, waiting for it. Released when the file is dropped.
    fn lock(&self, key: &str) -> Result<File, ImageError> {
        let (file, path) = self.lock_file(key)?;
        file.lock()
            .map_err(|source| ImageError::Lock { path, source })?;
        Ok(file)
    }

    /// Takes the exclusive `flock` of `key` if no one holds it.
    fn try_lock(&self, key: &str) -> Result<Option<File>, ImageError> {
        let (file, path) = self.lock_file(key)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(source)) => Err(ImageError::Lock { path, source }),
        }
    }

    /// mkfs.erofs and its version, found once per cache.
    fn tool(&self) -> Result<&Tool, ImageError> {
        if let Some(t) = self.tool.get() {
            return Ok(t);
        }
        let path = build::find_tool(self.mkfs.as_deref())?;
        let version = build::tool_version(&path, &self.dir)?;
        Ok(self.tool.get_or_init(|| Tool { path, version }))
    }

    /// The key of `rootfs` (canonical) and how it was made.
    fn key(
        &self,
        rootfs: &Path,
        root_md: &Metadata,
        tool: &Tool,
    ) -> Result<(String, KeyKind), ImageError> {
        let inputs = key::KeyInputs {
            tool_version: &tool.version,
            mkfs_args: build::MKFS_ARGS,
        };
        match key::overlay_key(rootfs, root_md, &inputs) {
            Ok(key) => Ok((key, KeyKind::Overlay)),
            Err(why) => {
                debug!(rootfs = %rootfs.display(), why, "keying by tree signature");
                let (key, entries) = key::tree_signature(rootfs, root_md, &inputs, &self.limits)?;
                debug!(entries, "tree signature computed");
                Ok((key, KeyKind::TreeSignature))
            }
        }
    }
}

/// Opens `path` as a directory without following a symlink and without blocking on a FIFO,
/// and says what it is if it is not one. Returns its canonical path and metadata.
fn open_rootfs(path: &Path) -> Result<(PathBuf, Metadata), ImageError> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| classify_open_error(path, e))?;
    let md = dir.metadata().map_err(|source| ImageError::RootfsOpen {
        path: path.to_path_buf(),
        source,
    })?;
    if !md.is_dir() {
        return Err(ImageError::RootfsNotDirectory {
            path: path.to_path_buf(),
            kind: kind_name(&md),
        });
    }
    // The directory just opened, by the path the kernel knows it at (no `..` or symlinks left).
    let canonical = std::fs::canonicalize(path).map_err(|source| ImageError::RootfsOpen {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((canonical, md))
}

fn classify_open_error(path: &Path, e: std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    match std::fs::symlink_metadata(&path) {
        Err(le) if le.kind() == std::io::ErrorKind::NotFound => ImageError::RootfsMissing { path },
        Ok(md) if md.file_type().is_symlink() => ImageError::RootfsSymlink { path },
        Ok(md) if !md.is_dir() => ImageError::RootfsNotDirectory {
            path,
            kind: kind_name(&md),
        },
        _ => ImageError::RootfsOpen { path, source: e },
    }
}

fn kind_name(md: &Metadata) -> &'static str {
    let t = md.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "of an unknown file type"
    }
}
