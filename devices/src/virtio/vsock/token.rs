//! The tags of the vsock handler's io_uring operations.

use event_loop::EventToken;

/// Connection ids (in tags) have this many bits.
pub(super) const CONN_ID_BITS: u32 = 29;
/// The largest connection id.
pub(super) const MAX_CONN_ID: u32 = (1 << CONN_ID_BITS) - 1;

/// What one of the vsock handler's operations is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VsockToken {
    /// The listening socket is readable (multishot).
    Listener,
    /// The connect-timeout sweep.
    Sweep,
    /// Retry of guest connections waiting for room in a host listener's backlog.
    ConnectRetry,
    /// The host socket of connection `id` (or of a pending host connection) is readable.
    Read(u32),
    /// The host socket of connection `id` is writable.
    Write(u32),
}

/// Bits 29..31 say the kind, bits 0..29 the connection id (30 bits in all, below the worker's
/// handler bit).
impl EventToken for VsockToken {
    fn encode(self) -> u32 {
        match self {
            Self::Listener => 0,
            Self::Sweep => 1,
            Self::ConnectRetry => 2,
            Self::Read(id) => (1 << CONN_ID_BITS) | (id & MAX_CONN_ID),
            Self::Write(id) => (2 << CONN_ID_BITS) | (id & MAX_CONN_ID),
        }
    }

    fn decode(raw: u32) -> Option<Self> {
        let id = raw & MAX_CONN_ID;
        match raw >> CONN_ID_BITS {
            0 => match raw {
                0 => Some(Self::Listener),
                1 => Some(Self::Sweep),
                2 => Some(Self::ConnectRetry),
                _ => None,
            },
            1 => Some(Self::Read(id)),
            2 => Some(Self::Write(id)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vsock_token_roundtrip_every_kind_and_extreme_id() {
        for t in [
            VsockToken::Listener,
            VsockToken::Sweep,
            VsockToken::ConnectRetry,
            VsockToken::Read(0),
            VsockToken::Read(MAX_CONN_ID),
            VsockToken::Write(0),
            VsockToken::Write(MAX_CONN_ID),
        ] {
            assert_eq!(VsockToken::decode(t.encode()), Some(t));
            assert!(
                t.encode() < 1 << 31,
                "{t:?} is too wide for the worker's handler bit"
            );
        }
    }

    #[test]
    fn test_vsock_token_unknown_raw_decodes_to_none() {
        assert_eq!(VsockToken::decode(3), None);
        assert_eq!(VsockToken::decode(3 << CONN_ID_BITS), None);
    }
}
