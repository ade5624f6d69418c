//! The identity of one snapshot: a random 128-bit id written into each of its files (`state`,
//! `memory`, `workingset`), so that parts of different snapshots are never restored together.

use serde::{Deserialize, Serialize};

/// A snapshot's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// A new random id (from the host's getrandom).
    pub fn random() -> std::io::Result<Self> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self(id))
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_random_ids_differ_and_print_as_hex() {
        let a = SnapshotId::random().unwrap();
        let b = SnapshotId::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 32);
        assert!(a.to_string().chars().all(|c| c.is_ascii_hexdigit()));
    }
}
