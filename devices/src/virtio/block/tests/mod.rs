//! virtio-blk driven through the harness, split by feature.

mod io;
mod malformed;
pub(crate) mod persist;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use vm_memory::{Bytes, GuestAddress};

use super::{BackendKind, Block, BlockConfig, BlockHandler};
use crate::virtio::test_utils::{Buf, Harness, Used, test_memory};

pub(crate) const SECTORS: u64 = 64;

/// A temp file of `sectors` sectors; byte `i` of sector `s` is `(s * 7 + i) as u8`.
pub(crate) fn disk_file(sectors: u64) -> NamedTempFile {
    let mut f = NamedTempFile::new().unwrap();
    let mut data = vec![0u8; (sectors * 512) as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = ((i / 512) * 7 + i % 512) as u8;
    }
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    f
}

pub(crate) fn file_bytes(f: &NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut file = File::open(f.path()).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut out = vec![0u8; len];
    file.read_exact(&mut out).unwrap();
    out
}

pub(crate) fn harness_with(config: BlockConfig, f: &NamedTempFile) -> Harness<BlockHandler> {
    let mem = test_memory();
    let file = File::options()
        .read(true)
        .write(!config.read_only)
        .open(f.path())
        .unwrap();
    let dev = Block::new_block(config, Some(file), mem.clone()).unwrap();
    let mut h = Harness::new(dev, mem);
    h.driver.init(256);
    h
}

pub(crate) fn harness(backend: BackendKind, f: &NamedTempFile) -> Harness<BlockHandler> {
    harness_with(
        BlockConfig {
            id: "disk0".into(),
            backend,
            ..Default::default()
        },
        f,
    )
}

/// Lays out a request (header, `data`, status) and returns its buffers.
pub(crate) fn request_bufs(
    h: &mut Harness<BlockHandler>,
    ty: u32,
    sector: u64,
    data: &[Buf],
) -> (Vec<Buf>, u64) {
    let hdr = h.driver.alloc(16);
    let status = h.driver.alloc(1);
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&ty.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    h.driver.mem.write_slice(&raw, GuestAddress(hdr)).unwrap();
    h.driver
        .mem
        .write_obj(0xffu8, GuestAddress(status))
        .unwrap();
    let mut bufs = vec![Buf::out(hdr, 16)];
    bufs.extend_from_slice(data);
    bufs.push(Buf::inp(status, 1));
    (bufs, status)
}

/// Sends one request and returns its used entry and status byte.
pub(crate) fn blk_request(
    h: &mut Harness<BlockHandler>,
    ty: u32,
    sector: u64,
    data: &[Buf],
) -> (Used, u8) {
    let (bufs, status) = request_bufs(h, ty, sector, data);
    let used = h.request(0, &bufs).expect("request completed");
    let s: u8 = h.driver.mem.read_obj(GuestAddress(status)).unwrap();
    (used, s)
}

/// Reads `sectors` sectors at `sector` and returns the bytes.
pub(crate) fn read_sectors(h: &mut Harness<BlockHandler>, sector: u64, sectors: u32) -> Vec<u8> {
    let buf = h.driver.alloc(u64::from(sectors) * 512);
    let (used, status) = blk_request(h, VIRTIO_BLK_T_IN, sector, &[Buf::inp(buf, sectors * 512)]);
    assert_eq!(status, 0);
    assert_eq!(used.len, sectors * 512 + 1);
    let mut out = vec![0u8; sectors as usize * 512];
    h.driver
        .mem
        .read_slice(&mut out, GuestAddress(buf))
        .unwrap();
    out
}
