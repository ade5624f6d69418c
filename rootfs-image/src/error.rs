//! Why an image could not be had, one variant per cause a caller may want to tell apart.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Why the image cache could not give an image (or list or remove one).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The cache directory could not be created, opened or read.
    #[error("image cache directory {}: {what}", path.display())]
    CacheDir {
        /// The cache directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The cache directory exists but others could plant images in it.
    #[error(
        "image cache directory {} is not safe to use: {reason} (it must be a directory owned by this user, writable by no one else)",
        path.display()
    )]
    InsecureCacheDir {
        /// The cache directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The rootfs path does not exist.
    #[error("container rootfs {} does not exist", path.display())]
    RootfsMissing {
        /// The rootfs path.
        path: PathBuf,
    },
    /// The rootfs path is a symbolic link; it is not followed (give the resolved path).
    #[error("container rootfs {} is a symbolic link, not a directory (give its target)", path.display())]
    RootfsSymlink {
        /// The rootfs path.
        path: PathBuf,
    },
    /// The rootfs path exists but is not a directory.
    #[error("container rootfs {} is {kind}, not a directory", path.display())]
    RootfsNotDirectory {
        /// The rootfs path.
        path: PathBuf,
        /// What it is instead ("a FIFO", "a character device", "a regular file", ...).
        kind: &'static str,
    },
    /// The rootfs directory could not be opened for another reason (permissions, ...).
    #[error("cannot open container rootfs {}", path.display())]
    RootfsOpen {
        /// The rootfs path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An entry of the rootfs tree could not be read while computing its signature.
    #[error("cannot read {} in the container rootfs", path.display())]
    Walk {
        /// The entry.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The rootfs tree has more entries than the walk allows.
    #[error("container rootfs {} has more than {limit} entries", path.display())]
    TreeTooLarge {
        /// The rootfs path.
        path: PathBuf,
        /// The entry limit.
        limit: u64,
    },
    /// The rootfs tree nests deeper than the walk allows.
    #[error("container rootfs nests deeper than {limit} directories at {}", path.display())]
    TreeTooDeep {
        /// The directory past the limit.
        path: PathBuf,
        /// The depth limit.
        limit: usize,
    },
    /// mkfs.erofs is not installed (or not where it was said to be).
    #[error("mkfs.erofs not found ({looked}): install it with `apt-get install erofs-utils`")]
    ToolMissing {
        /// Where it was looked for.
        looked: String,
    },
    /// mkfs.erofs could not be run, or did not say its version.
    #[error("cannot run {}: {what}", path.display())]
    ToolRun {
        /// The mkfs.erofs binary.
        path: PathBuf,
        /// What went wrong.
        what: String,
        /// The underlying error, if any.
        #[source]
        source: Option<io::Error>,
    },
    /// mkfs.erofs failed on this rootfs.
    #[error("mkfs.erofs failed on {} ({status}): {stderr}", rootfs.display())]
    Mkfs {
        /// The rootfs directory.
        rootfs: PathBuf,
        /// Its exit status.
        status: ExitStatus,
        /// The start of its standard error (bounded).
        stderr: String,
    },
    /// The rootfs holds more file data than an image may.
    #[error(
        "container rootfs {} holds {bytes} bytes of file data, more than the {limit} bytes an image may hold",
        rootfs.display()
    )]
    RootfsTooLarge {
        /// The rootfs directory.
        rootfs: PathBuf,
        /// Its file data (apparent sizes).
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The rootfs's sparse files hold more holes than an image may expand (an erofs image
    /// stores a hole as data).
    #[error(
        "container rootfs {} has {holes} bytes of holes in sparse files, more than the {limit} bytes an image may expand (most in {}: {size} bytes long, {allocated} allocated)",
        rootfs.display(),
        file.display()
    )]
    SparseRootfs {
        /// The rootfs directory.
        rootfs: PathBuf,
        /// Bytes of holes in all its sparse files.
        holes: u64,
        /// The limit.
        limit: u64,
        /// The file with the most holes.
        file: PathBuf,
        /// Its apparent size.
        size: u64,
        /// Its allocated bytes.
        allocated: u64,
    },
    /// The image grew past its size limit (mkfs.erofs's `RLIMIT_FSIZE`).
    #[error(
        "the image of container rootfs {} would be larger than the limit of {limit} bytes (mkfs.erofs stopped)",
        rootfs.display()
    )]
    ImageTooLarge {
        /// The rootfs directory.
        rootfs: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// mkfs.erofs ran past its time limit (wall clock, or `RLIMIT_CPU`) and was stopped.
    #[error(
        "mkfs.erofs on container rootfs {} ran past its {what} limit of {seconds} s and was stopped",
        rootfs.display()
    )]
    MkfsTimeLimit {
        /// The rootfs directory.
        rootfs: PathBuf,
        /// "time" (wall clock) or "CPU time".
        what: &'static str,
        /// The limit in seconds.
        seconds: u64,
    },
    /// Writing, checking or installing an image file failed.
    #[error("image file {}: {what}", path.display())]
    ImageIo {
        /// The image file (temporary or final).
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A freshly built image failed the check every cached image must pass.
    #[error("mkfs.erofs produced a bad image {}: {reason}", path.display())]
    BadImage {
        /// The image file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The rootfs changed while its image was built: the image may hold a mix and is discarded.
    #[error("container rootfs {} changed while its image was built; image discarded", path.display())]
    RootfsChanged {
        /// The rootfs path.
        path: PathBuf,
    },
    /// Taking the per-key build lock failed.
    #[error("cannot lock {}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a key this cache makes (64 lowercase hex digits).
    #[error("{key:?} is not an image cache key")]
    InvalidKey {
        /// The rejected key.
        key: String,
    },
    /// No image is cached under this key.
    #[error("no cached image with key {key}")]
    NotCached {
        /// The key.
        key: String,
    },
}
