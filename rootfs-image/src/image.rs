//! The cheap check every cached image passes before it is handed out, and the touch that marks
//! its last use.

use std::fs::{File, FileTimes, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::SystemTime;

/// The erofs superblock magic, little-endian at [`EROFS_SUPER_OFFSET`].
pub const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// Where the erofs superblock starts.
pub const EROFS_SUPER_OFFSET: u64 = 1024;
/// An image is a virtio-blk disk: its size is a whole number of these.
pub const SECTOR_SIZE: u64 = 512;

/// What the check found at an image's path.
#[derive(Debug)]
pub(crate) enum ImageState {
    /// Nothing there.
    Missing,
    /// Something there that must not be used (the reason is logged).
    Bad(String),
    /// A plausible erofs image, open read-only, of this size.
    Good(File, u64),
}

/// Checks the image at `path` reading only the head of its superblock: a regular file (not
/// followed if a symlink), size > 0 and a multiple of 512, the erofs magic at byte 1024, and the
/// size the superblock's block count gives (padded to a sector).
pub(crate) fn check_image(path: &Path) -> ImageState {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ImageState::Missing,
        Err(e) => return ImageState::Bad(format!("cannot open: {e}")),
    };
    let md = match file.metadata() {
        Ok(md) => md,
        Err(e) => return ImageState::Bad(format!("cannot stat: {e}")),
    };
    if !md.is_file() {
        return ImageState::Bad(format!("not a regular file ({:?})", md.file_type()));
    }
    let size = md.len();
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return ImageState::Bad(format!("size {size} is not a positive multiple of 512"));
    }
    // The superblock's head: magic at 0, log2 of the block size at 12, block count at 36.
    let mut sb = [0u8; 40];
    if let Err(e) = file.read_exact_at(&mut sb, EROFS_SUPER_OFFSET) {
        return ImageState::Bad(format!("cannot read the superblock: {e}"));
    }
    let magic = u32::from_le_bytes(sb[0..4].try_into().expect("4 bytes"));
    if magic != EROFS_MAGIC {
        return ImageState::Bad(format!("superblock magic {magic:#010x}, not erofs"));
    }
    // Also cheap, and it catches an image cut short behind an intact superblock: the size the
    // superblock gives, rounded up to a sector as the build pads it.
    let blkszbits = sb[12];
    let blocks = u64::from(u32::from_le_bytes(sb[36..40].try_into().expect("4 bytes")));
    if !(9..=16).contains(&blkszbits) {
        return ImageState::Bad(format!("block size 2^{blkszbits}"));
    }
    let expected = (blocks << blkszbits).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    if size != expected {
        return ImageState::Bad(format!(
            "size {size}, the superblock says {blocks} blocks of {} bytes",
            1u64 << blkszbits
        ));
    }
    ImageState::Good(file, size)
}

/// Sets the image's mtime to now: the last use, for pruning least recently used images.
pub(crate) fn touch(file: &File) -> std::io::Result<()> {
    // futimens with the access time left as it is (UTIME_OMIT); works on a read-only fd for
    // the file's owner.
    file.set_times(FileTimes::new().set_modified(SystemTime::now()))
}
