use std::fs::File;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use vm_memory::GuestMemoryMmap;

use super::backend::{BackendKind, Disk};
use super::queue_handler::BlockHandler;
use super::request::DiskGeometry;
use crate::virtio::VIRTIO_F_VERSION_1;
use crate::virtio::front::{Front, MmioDevice, Parts};
use crate::virtio::worker::HandoffTx;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the config space image.
const CONFIG_SIZE: usize = 60;

/// A virtio-blk device: [`MmioDevice::transport`] on the MMIO bus, [`MmioDevice::event_source`]
/// on the loop.
pub type Block = MmioDevice<BlockHandler>;

/// Options of a disk (`--disk PATH[,ro][,id=NAME]`, `--disk-slot NAME=PATH`).
#[derive(Debug, Clone, Default)]
pub struct BlockConfig {
    /// The disk id returned by GET_ID (at most 20 bytes; longer ids are cut).
    pub id: String,
    /// Refuse writes and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// This disk is a spare slot of that name: its backing file is chosen at restore time.
    pub spare_slot: Option<String>,
    /// How I/O is done.
    pub backend: BackendKind,
}

/// Errors creating a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Only a spare slot may start without a backing file.
    #[error("a disk needs a backing file unless it is a spare slot")]
    NoBackingFile,
    /// The backing file could not be inspected, or an fd could not be created.
    #[error("virtio-blk: {0}")]
    Io(#[from] std::io::Error),
}

pub(super) fn id_bytes(id: &str) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut out = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let n = id.len().min(out.len());
    out[..n].copy_from_slice(&id.as_bytes()[..n]);
    out
}

pub(super) fn features(geo: &DiskGeometry) -> u64 {
    let mut f =
        (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
    if geo.read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    if geo.discard {
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// `struct virtio_blk_config` (little-endian image).
pub(super) fn config_space(geo: &DiskGeometry) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_SIZE];
    c[0..8].copy_from_slice(&geo.sectors.to_le_bytes());
    // seg_max: a chain holds the header, the status and up to this many data buffers.
    c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
    c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
    if geo.discard {
        c[36..40].copy_from_slice(&u32::MAX.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&u32::MAX.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
    }
    c
}

pub(super) fn front(geo: DiskGeometry) -> impl FnOnce(HandoffTx) -> Front {
    move |tx| {
        Front::new(
            virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            features(&geo),
            vec![QUEUE_SIZE],
            config_space(&geo),
            tx,
        )
    }
}

impl MmioDevice<BlockHandler> {
    /// A new virtio-blk device over `mem` backed by `file` (`None` only for an empty spare slot,
    /// which has capacity 0 until a snapshot is restored with a file for it).
    pub fn new_block(
        config: BlockConfig,
        file: Option<File>,
        mem: GuestMemoryMmap,
    ) -> Result<Block, BlockError> {
        let disk = match file {
            Some(f) => Disk::new(f, config.read_only)?,
            None if config.spare_slot.is_some() => Disk::empty()?,
            None => return Err(BlockError::NoBackingFile),
        };
        let geo = DiskGeometry {
            sectors: disk.sectors,
            read_only: config.read_only,
            discard: disk.discard,
        };
        let mut handler = BlockHandler::new(disk, geo, id_bytes(&config.id), config.backend);
        handler.spare_slot = config.spare_slot;
        Ok(Block::new(front(geo), handler, mem, Parts::new(1)?))
    }
}
