//! Parsing a virtio-blk request from a validated chain: pure logic, no I/O.
//!
//! Framing we accept (what Linux and every other driver send): a device-readable 16-byte header
//! descriptor, data descriptors, and a device-writable 1-byte status descriptor last.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::chain::{Chain, Desc};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header.
pub const HEADER_SIZE: u32 = 16;
/// Size of one discard/write-zeroes segment.
pub const SEGMENT_SIZE: u32 = 16;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data buffers.
    Read,
    /// Write the data buffers to sectors.
    Write,
    /// Make written data durable.
    Flush,
    /// Return the disk id.
    GetId,
    /// Deallocate a range.
    Discard {
        /// The range's flags (unmap).
        unmap: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// The driver allows deallocating.
        unmap: bool,
    },
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// First sector (read/write/discard/write-zeroes).
    pub sector: u64,
    /// Number of bytes to transfer or to discard/zero.
    pub len: u64,
    /// The data buffers (read/write/get-id).
    pub data: Vec<Desc>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// The result of parsing a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Do it.
    Ok(Request),
    /// Answer at once with this status (IOERR/UNSUPP) written at `status`.
    Reject {
        /// Where the status byte goes.
        status: GuestAddress,
        /// The status.
        code: u8,
    },
    /// The chain has no usable status byte: the device cannot answer and must fail.
    NoStatus,
}

/// What the device is, for checking requests.
#[derive(Debug, Clone, Copy)]
pub struct DiskGeometry {
    /// Capacity in sectors.
    pub sectors: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Discard and write-zeroes offered.
    pub discard: bool,
}

fn end_within(sector: u64, len: u64, sectors: u64) -> bool {
    len.div_ceil(SECTOR_SIZE)
        .checked_add(sector)
        .is_some_and(|end| end <= sectors)
}

/// Parses `chain` for a disk of `geo`.
pub fn parse(mem: &GuestMemoryMmap, chain: &Chain, geo: DiskGeometry) -> Parsed {
    let Some((status_desc, rest)) = chain.descs.split_last() else {
        return Parsed::NoStatus;
    };
    if !status_desc.write || status_desc.len != 1 {
        return Parsed::NoStatus;
    }
    let status = status_desc.addr;
    let reject = |code: u32| Parsed::Reject {
        status,
        code: code as u8,
    };
    let Some((header, data)) = rest.split_first() else {
        return reject(VIRTIO_BLK_S_IOERR);
    };
    if header.write || header.len != HEADER_SIZE {
        return reject(VIRTIO_BLK_S_IOERR);
    }
    let mut raw = [0u8; 16];
    if mem.read_slice(&mut raw, header.addr).is_err() {
        return reject(VIRTIO_BLK_S_IOERR);
    }
    let ty = u32::from_le_bytes(raw[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap());
    let data_len: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    let all = |write: bool| data.iter().all(|d| d.write == write);
    let ok = |kind, sector, len| {
        Parsed::Ok(Request {
            kind,
            sector,
            len,
            data: data.to_vec(),
            status,
        })
    };
    match ty {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = ty == VIRTIO_BLK_T_OUT;
            if write && geo.read_only {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            // Reads need device-writable buffers, writes device-readable ones.
            if !all(!write)
                || !data_len.is_multiple_of(SECTOR_SIZE)
                || !end_within(sector, data_len, geo.sectors)
            {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            let kind = if write {
                RequestKind::Write
            } else {
                RequestKind::Read
            };
            ok(kind, sector, data_len)
        }
        VIRTIO_BLK_T_FLUSH => ok(RequestKind::Flush, 0, 0),
        VIRTIO_BLK_T_GET_ID => {
            if data.is_empty() || !all(true) {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            ok(RequestKind::GetId, 0, data_len)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !geo.discard {
                return reject(VIRTIO_BLK_S_UNSUPP);
            }
            if geo.read_only {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            // One segment (we announce max_discard_seg = max_write_zeroes_seg = 1).
            if data.len() != 1 || data[0].write || data[0].len != SEGMENT_SIZE {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            let mut seg = [0u8; 16];
            if mem.read_slice(&mut seg, data[0].addr).is_err() {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let num = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap()));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
            let len = num * SECTOR_SIZE;
            if flags & !1 != 0 || !end_within(sector, len, geo.sectors) {
                return reject(VIRTIO_BLK_S_IOERR);
            }
            let unmap = flags & 1 != 0;
            let kind = if ty == VIRTIO_BLK_T_DISCARD {
                RequestKind::Discard { unmap }
            } else {
                RequestKind::WriteZeroes { unmap }
            };
            Parsed::Ok(Request {
                kind,
                sector,
                len,
                data: Vec::new(),
                status,
            })
        }
        _ => reject(VIRTIO_BLK_S_UNSUPP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::test_memory;

    const GEO: DiskGeometry = DiskGeometry {
        sectors: 8,
        read_only: false,
        discard: true,
    };

    fn d(addr: u64, len: u32, write: bool) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            write,
        }
    }

    fn chain_with_header(mem: &GuestMemoryMmap, ty: u32, sector: u64, data: &[Desc]) -> Chain {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x1000)).unwrap();
        let mut descs = vec![d(0x1000, 16, false)];
        descs.extend_from_slice(data);
        descs.push(d(0x3000, 1, true));
        Chain { head: 0, descs }
    }

    #[test]
    fn test_parse_read_in_range_is_ok() {
        let m = test_memory();
        let c = chain_with_header(&m, VIRTIO_BLK_T_IN, 6, &[d(0x2000, 1024, true)]);
        let Parsed::Ok(r) = parse(&m, &c, GEO) else {
            panic!()
        };
        assert_eq!((r.kind, r.sector, r.len), (RequestKind::Read, 6, 1024));
    }

    #[test]
    fn test_parse_read_past_end_is_ioerr() {
        let m = test_memory();
        let c = chain_with_header(&m, VIRTIO_BLK_T_IN, 7, &[d(0x2000, 1024, true)]);
        assert!(matches!(parse(&m, &c, GEO), Parsed::Reject { code: 1, .. }));
        let c = chain_with_header(&m, VIRTIO_BLK_T_IN, u64::MAX, &[d(0x2000, 512, true)]);
        assert!(matches!(parse(&m, &c, GEO), Parsed::Reject { code: 1, .. }));
    }

    #[test]
    fn test_parse_status_two_bytes_is_no_status() {
        let m = test_memory();
        let mut c = chain_with_header(&m, VIRTIO_BLK_T_IN, 0, &[d(0x2000, 512, true)]);
        c.descs.last_mut().unwrap().len = 2;
        assert_eq!(parse(&m, &c, GEO), Parsed::NoStatus);
    }

    #[test]
    fn test_parse_unknown_type_is_unsupp() {
        let m = test_memory();
        let c = chain_with_header(&m, 0x77, 0, &[]);
        assert!(matches!(parse(&m, &c, GEO), Parsed::Reject { code: 2, .. }));
    }
}
