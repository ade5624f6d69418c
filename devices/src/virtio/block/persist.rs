use std::collections::BTreeSet;
use std::fs::File;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use vm_memory::GuestMemoryMmap;

use super::backend::{BackendKind, Disk};
use super::device::{Block, front, id_bytes};
use super::queue_handler::BlockHandler;
use super::request::DiskGeometry;
use crate::persist::Persist;
use crate::virtio::front::{Parts, restore_device};
use crate::virtio::mmio::{MmioTransportState, RestoreTransportError};
use crate::virtio::worker::QueuePosition;

/// The disk as the guest knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// GET_ID answer.
    pub id: String,
    /// Read-only.
    pub read_only: bool,
    /// The spare slot's name, when this disk is one.
    pub spare_slot: Option<String>,
    /// Capacity the guest saw.
    pub sectors: u64,
    /// Discard/write-zeroes offered.
    pub discard: bool,
}

/// A virtio-blk device in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Transport registers.
    pub transport: MmioTransportState,
    /// Queue positions, rewound to the oldest request that was in flight.
    pub queues: Vec<QueuePosition>,
    /// Per queue, available positions that had completed and must not be replayed.
    pub skip: Vec<Vec<u16>>,
    /// The disk.
    pub disk: DiskState,
}

/// What restoring a virtio-blk device needs.
#[derive(Debug)]
pub struct BlockArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The backing file: the same disk again, or for a spare slot the file chosen now (`None`:
    /// the slot stays empty).
    pub file: Option<File>,
    /// How I/O is done on the restored device.
    pub backend: BackendKind,
    /// The device's channels and `EventFd`s, when made ahead (see
    /// [`crate::virtio::front::restore_device`]); `None` makes fresh ones.
    pub parts: Option<Parts>,
}

/// Why a virtio-blk state was refused.
#[derive(Debug, thiserror::Error)]
pub enum BlockRestoreError {
    /// The transport state was refused.
    #[error(transparent)]
    Transport(#[from] RestoreTransportError),
    /// A disk that is not a spare slot changed size.
    #[error("disk {id:?} has {now} sectors, the snapshot {saved}")]
    SizeChanged {
        /// Disk id.
        id: String,
        /// Sectors in the snapshot.
        saved: u64,
        /// Sectors now.
        now: u64,
    },
    /// Only a spare slot may be restored without a file.
    #[error("a disk needs a backing file unless it is a spare slot")]
    NoBackingFile,
    /// The skip lists do not match the queues.
    #[error("malformed in-flight state")]
    InFlight,
    /// Inspecting the file failed.
    #[error("virtio-blk restore: {0}")]
    Io(#[from] std::io::Error),
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockArgs;
    type Error = BlockRestoreError;

    fn save(&self) -> BlockState {
        let worker = self.worker().borrow();
        let h = &worker.handler;
        let (queues, skip) = h.replay_positions(&worker.queue_positions());
        BlockState {
            transport: crate::bus::lock_device(&self.transport()).save(),
            queues,
            skip,
            disk: DiskState {
                id: String::from_utf8_lossy(&h.id)
                    .trim_end_matches('\0')
                    .to_string(),
                read_only: h.geo.read_only,
                spare_slot: h.spare_slot.clone(),
                sectors: h.geo.sectors,
                discard: h.geo.discard,
            },
        }
    }

    fn restore(args: BlockArgs, state: &BlockState) -> Result<Self, Self::Error> {
        let d = &state.disk;
        let disk = match args.file {
            Some(f) => Disk::new(f, d.read_only)?,
            None if d.spare_slot.is_some() => Disk::empty()?,
            None => return Err(BlockRestoreError::NoBackingFile),
        };
        if d.spare_slot.is_none() && disk.sectors != d.sectors {
            return Err(BlockRestoreError::SizeChanged {
                id: d.id.clone(),
                saved: d.sectors,
                now: disk.sectors,
            });
        }
        if state.skip.len() > state.queues.len().max(1) {
            return Err(BlockRestoreError::InFlight);
        }
        let geo = DiskGeometry {
            sectors: disk.sectors,
            read_only: d.read_only,
            // Offered features cannot change under a running driver: keep what it saw, as long
            // as the file still supports it (else the transport refuses acked features).
            discard: d.discard && disk.discard,
        };
        let mut handler = BlockHandler::new(disk, geo, id_bytes(&d.id), args.backend);
        handler.spare_slot = d.spare_slot.clone();
        for (q, s) in state.skip.iter().enumerate() {
            if let Some(set) = handler.skip.get_mut(q) {
                *set = s.iter().copied().collect::<BTreeSet<_>>();
            }
        }
        let device = restore_device(
            front(geo),
            handler,
            args.mem,
            args.parts,
            &state.transport,
            &state.queues,
        )?;
        // A spare slot given a disk (or a slot's disk taken away) is announced to an active
        // driver here, before any vCPU runs, so the first thing the guest reads after the
        // restore already shows it. (Announced from the worker's activation instead, a
        // pre-loaded shell's vCPUs could run before the loop got to it.)
        let t = &state.transport;
        let active = t.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !t.needs_reset;
        if geo.sectors != d.sectors && active {
            tracing::info!(
                "virtio-blk: disk changed at restore, {} sectors",
                geo.sectors
            );
            let transport = device.transport();
            let guard = transport.lock().unwrap_or_else(|e| e.into_inner());
            guard.interrupt().signal_config_change();
        }
        Ok(device)
    }
}
