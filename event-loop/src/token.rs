//! What goes into an SQE's `user_data`: the source's slot, the slot's generation, and the
//! source's own typed tag.

/// A source's own tag type: a small enum (or struct) saying what an operation was for, packed into
/// 32 bits of the SQE's `user_data` (crosvm's `EventToken` idea).
///
/// `decode(encode(t)) == Some(t)` must hold for every value a source submits; raw values a source
/// never produces decode to `None` (such a completion is logged and dropped).
pub trait EventToken: Copy + std::fmt::Debug {
    /// Packs the tag into 32 bits.
    fn encode(self) -> u32;
    /// Unpacks a tag packed by [`EventToken::encode`].
    fn decode(raw: u32) -> Option<Self>;
}

/// The tag of sources with a single kind of operation.
impl EventToken for () {
    fn encode(self) -> u32 {
        0
    }

    fn decode(raw: u32) -> Option<Self> {
        (raw == 0).then_some(())
    }
}

/// Identifies an operation in `user_data`: which source submitted it (slot and generation) and
/// what for (the source's encoded tag).
///
/// The generation changes each time a slot is given to a new source, so a completion that arrives
/// after its source was removed never reaches the source that took the slot next. It is 16 bits:
/// a completion would have to stay in flight across 65536 reuses of its slot to be misdelivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    /// The source's slot.
    pub slot: u16,
    /// The slot's generation when the operation was submitted.
    pub generation: u16,
    /// The source's encoded tag.
    pub tag: u32,
}

impl Token {
    /// Packs into `user_data`: slot in bits 48..64, generation in 32..48, tag in 0..32.
    pub fn encode(self) -> u64 {
        (u64::from(self.slot) << 48) | (u64::from(self.generation) << 32) | u64::from(self.tag)
    }

    /// Unpacks from `user_data`.
    pub fn decode(data: u64) -> Self {
        Self {
            slot: (data >> 48) as u16,
            generation: (data >> 32) as u16,
            tag: data as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_token_roundtrip_extremes_keep_every_field() {
        for t in [
            Token {
                slot: 0,
                generation: 0,
                tag: 0,
            },
            Token {
                slot: 7,
                generation: 1,
                tag: u32::MAX,
            },
            Token {
                slot: u16::MAX,
                generation: u16::MAX,
                tag: 3,
            },
        ] {
            assert_eq!(Token::decode(t.encode()), t);
        }
    }

    #[test]
    fn test_unit_token_decode_other_value_is_none() {
        assert_eq!(<() as EventToken>::decode(().encode()), Some(()));
        assert_eq!(<() as EventToken>::decode(1), None);
    }
}
