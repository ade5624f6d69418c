use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use vm_memory::GuestMemoryMmap;

use super::backend::Backend;
use super::device::{Net, NetError, check_mac, front};
use super::handler::NetHandler;
use crate::persist::Persist;
use crate::virtio::front::{Parts, restore_device};
use crate::virtio::mmio::{MmioTransportState, RestoreTransportError};
use crate::virtio::worker::QueuePosition;

/// A virtio-net device in a snapshot. The backend is not: whoever restores gives one (or none,
/// and the link is down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Transport registers.
    pub transport: MmioTransportState,
    /// Queue positions.
    pub queues: Vec<QueuePosition>,
    /// The device's id (the slot a restore attaches a tap to).
    pub id: String,
    /// The MAC the guest read at probe (a clone's guest keeps it until told another).
    pub mac: [u8; 6],
    /// Whether the link was up (the device had a backend).
    pub link_up: bool,
}

/// What restoring a virtio-net device needs.
#[derive(Debug)]
pub struct NetArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The restored VM's own backend (`None`: link down, frames dropped).
    pub backend: Option<Backend>,
    /// The device's channels and `EventFd`s, when made ahead (see
    /// [`crate::virtio::front::restore_device`]); `None` makes fresh ones.
    pub parts: Option<Parts>,
}

/// Why a virtio-net state was refused.
#[derive(Debug, thiserror::Error)]
pub enum NetRestoreError {
    /// The transport state was refused.
    #[error(transparent)]
    Transport(#[from] RestoreTransportError),
    /// The saved MAC is invalid, or an fd could not be made.
    #[error(transparent)]
    Device(#[from] NetError),
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = NetRestoreError;

    fn save(&self) -> NetState {
        let worker = self.worker().borrow();
        let h = &worker.handler;
        NetState {
            transport: crate::bus::lock_device(&self.transport()).save(),
            queues: worker.queue_positions(),
            id: h.id.clone(),
            mac: h.mac,
            link_up: h.backend.is_some(),
        }
    }

    fn restore(args: NetArgs, state: &NetState) -> Result<Self, Self::Error> {
        check_mac(&state.mac)?;
        let link_up = args.backend.is_some();
        let handler = NetHandler::new(state.id.clone(), state.mac, args.backend);
        let device = restore_device(
            front(state.mac, link_up),
            handler,
            args.mem,
            args.parts,
            &state.transport,
            &state.queues,
        )?;
        // A slot given a tap (or a device left without one) shows its new link state to an
        // active driver before any vCPU runs, as a spare disk slot does.
        let t = &state.transport;
        let active = t.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !t.needs_reset;
        if link_up != state.link_up && active {
            tracing::info!(
                "virtio-net {}: link {} at restore",
                state.id,
                if link_up { "up" } else { "down" }
            );
            let transport = device.transport();
            let guard = transport.lock().unwrap_or_else(|e| e.into_inner());
            guard.interrupt().signal_config_change();
        }
        Ok(device)
    }
}
