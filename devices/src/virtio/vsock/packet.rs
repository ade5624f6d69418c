//! virtio-vsock packet headers (virtio 1.2, 5.10.6): pure encoding and decoding.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type supported.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset / refused.
pub const OP_RST: u16 = 3;
/// Half or full shutdown (see `SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit information.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks for credit information.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// The sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Event id: the transport was reset (after a restore); the guest drops its connections.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// A packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub ty: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a little-endian header.
    pub fn decode(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            ty: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes little-endian.
    pub fn encode(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.ty.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_header_encode_decode_roundtrip() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 52,
            len: 99,
            ty: TYPE_STREAM,
            op: OP_RW,
            flags: 3,
            buf_alloc: 1 << 18,
            fwd_cnt: 77,
        };
        assert_eq!(Header::decode(&h.encode()), h);
        assert_eq!(&h.encode()[30..32], &[5, 0]);
    }
}
