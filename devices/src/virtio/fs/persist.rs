use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::confined::FsLimits;
use super::device::{FsError, check_tag, front, handler};
use super::server::{FsShare, ThreadSetup};
use super::{Fs, FsHandler};
use crate::persist::Persist;
use crate::virtio::front::{Parts, restore_device};
use crate::virtio::mmio::{MmioTransportState, RestoreTransportError};
use crate::virtio::worker::QueuePosition;

/// A virtio-fs device in a snapshot: transport and queues, and its tag. The share is not part
/// of it (a snapshot is refused while the guest has a FUSE session, see
/// [`Fs::fs_session_active`]); the restorer attaches one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// Transport registers.
    pub transport: MmioTransportState,
    /// Queue positions.
    pub queues: Vec<QueuePosition>,
    /// The tag.
    pub tag: String,
}

/// What restoring a virtio-fs device needs.
pub struct FsArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's channels and `EventFd`s, when made ahead; `None` makes fresh ones.
    pub parts: Option<Parts>,
    /// The directory to attach (`None`: the slot stays empty).
    pub share: Option<FsShare>,
    /// Caps for the share's server.
    pub limits: FsLimits,
    /// Runs first on the share's server thread.
    pub setup: Option<ThreadSetup>,
}

impl std::fmt::Debug for FsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsArgs")
            .field("share", &self.share)
            .field("limits", &self.limits)
            .field("setup", &self.setup.is_some())
            .finish()
    }
}

/// Why a virtio-fs state was refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreFsError {
    /// The transport or queues were refused.
    #[error(transparent)]
    Transport(#[from] RestoreTransportError),
    /// The saved tag is invalid, or the share's server could not start.
    #[error(transparent)]
    Device(#[from] FsError),
}

impl Persist for Fs {
    type State = FsState;
    type ConstructorArgs = FsArgs;
    type Error = RestoreFsError;

    fn save(&self) -> FsState {
        let worker = self.worker().borrow();
        FsState {
            transport: crate::bus::lock_device(&self.transport()).save(),
            queues: worker.queue_positions(),
            tag: worker.handler.tag().to_string(),
        }
    }

    fn restore(args: FsArgs, state: &FsState) -> Result<Self, Self::Error> {
        check_tag(&state.tag)?;
        let h: FsHandler = handler(&state.tag, args.share.as_ref(), args.limits, args.setup)?;
        Ok(restore_device(
            front(&state.tag),
            h,
            args.mem,
            args.parts,
            &state.transport,
            &state.queues,
        )?)
    }
}
