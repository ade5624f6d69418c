use vm_memory::GuestMemoryMmap;

use super::confined::FsLimits;
use super::queue_handler::FsHandler;
use super::server::{FsShare, ServerError, ServerThread, ThreadSetup};
use crate::virtio::VIRTIO_F_VERSION_1;
use crate::virtio::front::{Front, MmioDevice, Parts};
use crate::virtio::worker::HandoffTx;

/// The virtio device id of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 128;
/// Queues: the high-priority queue and one request queue.
pub const NUM_QUEUES: usize = 2;
/// Bytes of the tag in the config space.
pub const TAG_LEN: usize = 36;

/// A virtio-fs device.
pub type Fs = MmioDevice<FsHandler>;

/// Options of a virtio-fs device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The tag the guest mounts it by (`mount -t virtiofs TAG /dir`).
    pub tag: String,
    /// The shared directory; `None` makes a slot that a restore attaches a directory to.
    pub share: Option<FsShare>,
    /// Caps on what the guest can make the server hold.
    pub limits: FsLimits,
}

/// Errors making a virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, longer than 36 bytes, or holds a NUL, `,` or `=`.
    #[error("virtio-fs tag {0:?}: 1 to 36 bytes, no NUL, ',' or '='")]
    Tag(String),
    /// The share's server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The device's channels and `EventFd`s could not be made.
    #[error("virtio-fs: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks a tag: 1 to [`TAG_LEN`] bytes, no NUL (and no `,` or `=`, which the command line uses).
pub fn check_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty()
        || tag.len() > TAG_LEN
        || tag.bytes().any(|b| b == 0 || b == b',' || b == b'=')
    {
        return Err(FsError::Tag(tag.to_string()));
    }
    Ok(())
}

/// The config space: `tag[36]` (NUL-padded) then `num_request_queues` (le32) = 1.
pub fn config_space(tag: &str) -> Vec<u8> {
    let mut c = vec![0u8; TAG_LEN + 4];
    let n = tag.len().min(TAG_LEN);
    c[..n].copy_from_slice(&tag.as_bytes()[..n]);
    c[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
    c
}

pub(super) fn front(tag: &str) -> impl FnOnce(HandoffTx) -> Front + use<> {
    let config = config_space(tag);
    move |tx| {
        Front::new(
            VIRTIO_ID_FS,
            1 << VIRTIO_F_VERSION_1,
            vec![QUEUE_SIZE; NUM_QUEUES],
            config,
            tx,
        )
    }
}

/// Starts the server of `share` (if any) for device `tag`.
pub(super) fn handler(
    tag: &str,
    share: Option<&FsShare>,
    limits: FsLimits,
    setup: Option<ThreadSetup>,
) -> Result<FsHandler, FsError> {
    check_tag(tag)?;
    let server = share
        .map(|s| ServerThread::spawn(tag, s, limits, setup))
        .transpose()?;
    Ok(FsHandler::new(tag.to_string(), server))
}

impl MmioDevice<FsHandler> {
    /// A new virtio-fs device over `mem`. `setup` runs first on the share's server thread (the
    /// VMM installs its seccomp filter there).
    pub fn new_fs(
        config: &FsConfig,
        mem: GuestMemoryMmap,
        setup: Option<ThreadSetup>,
    ) -> Result<Fs, FsError> {
        let handler = handler(&config.tag, config.share.as_ref(), config.limits, setup)?;
        Ok(Fs::new(
            front(&config.tag),
            handler,
            mem,
            Parts::new(NUM_QUEUES)?,
        ))
    }

    /// Whether the guest has a FUSE session on this device: its inodes and open files live in
    /// this process and cannot be carried by a snapshot, so a snapshot must be refused.
    pub fn fs_session_active(&self) -> bool {
        self.worker().borrow().handler.session_active()
    }
}
