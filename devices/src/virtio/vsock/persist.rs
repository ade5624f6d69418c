use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::VsockHandler;
use super::device::{Vsock, VsockError, bind, front, max_connections_here};
use crate::persist::Persist;
use crate::virtio::front::{Parts, restore_device};
use crate::virtio::mmio::{MmioTransportState, RestoreTransportError};
use crate::virtio::worker::QueuePosition;

/// A vsock device in a snapshot. Connections are not saved: the restored guest is sent
/// TRANSPORT_RESET and reconnects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Transport registers.
    pub transport: MmioTransportState,
    /// Queue positions.
    pub queues: Vec<QueuePosition>,
    /// The guest's CID.
    pub guest_cid: u64,
}

/// What restoring a vsock device needs.
#[derive(Debug)]
pub struct VsockArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Where the restored VM listens (may differ from the template's).
    pub uds_path: PathBuf,
    /// Most connections at once (see [`super::VsockConfig::max_connections`]).
    pub max_connections: usize,
    /// The listening socket at `uds_path`, when the restorer bound it (a jailed VMM cannot
    /// bind its client's path); `None` binds `uds_path` here.
    pub listener: Option<std::os::unix::net::UnixListener>,
    /// The device's channels and `EventFd`s, when made ahead (see
    /// [`crate::virtio::front::restore_device`]); `None` makes fresh ones.
    pub parts: Option<Parts>,
}

/// Why a vsock state was refused.
#[derive(Debug, thiserror::Error)]
pub enum VsockRestoreError {
    /// The transport state was refused.
    #[error(transparent)]
    Transport(#[from] RestoreTransportError),
    /// The socket could not be set up.
    #[error(transparent)]
    Device(#[from] VsockError),
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockArgs;
    type Error = VsockRestoreError;

    fn save(&self) -> VsockState {
        let worker = self.worker().borrow();
        VsockState {
            transport: crate::bus::lock_device(&self.transport()).save(),
            queues: worker.queue_positions(),
            guest_cid: worker.handler.cid,
        }
    }

    fn restore(args: VsockArgs, state: &VsockState) -> Result<Self, Self::Error> {
        if state.guest_cid < 3 || state.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(state.guest_cid).into());
        }
        let listener = match args.listener {
            Some(l) => l,
            None => bind(&args.uds_path)?,
        };
        let handler = VsockHandler::new(
            state.guest_cid,
            args.uds_path,
            listener,
            max_connections_here(args.max_connections),
        )
        .map_err(VsockError::Io)?;
        Ok(restore_device(
            front(state.guest_cid),
            handler,
            args.mem,
            args.parts,
            &state.transport,
            &state.queues,
        )?)
    }
}
