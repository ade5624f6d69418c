//! The `state` file: header, then a postcard-encoded body.
//!
//! ```text
//! offset size
//!  0      8   magic "KSNAPx64" (per architecture)
//!  8      4   format version (little endian), independent of the binary's version
//! 12      4   reserved, zero
//! 16     16   snapshot id (also in the memory file and the working set)
//! 32      8   body length in bytes
//! 40      8   CRC-64/XZ of the id and the body
//! 48      n   body (postcard)
//! ```
//!
//! Version 2 added the snapshot id; version 1 files are refused with a version error.
//!
//! postcard is compact, has a stable wire format and is maintained; the body is only ever read by
//! the same format version, so there is no per-field versioning: a format change bumps
//! [`FORMAT_VERSION`] and adds an explicit migration.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::id::SnapshotId;

/// Magic of an x86-64 snapshot state file.
pub const MAGIC: [u8; 8] = *b"KSNAPx64";
/// The state format this binary reads and writes.
pub const FORMAT_VERSION: u32 = 2;
/// Header length.
pub const HEADER_LEN: usize = 48;
/// Largest body accepted (a state is kilobytes; this bounds what a corrupt length can make us read).
pub const MAX_BODY_LEN: u64 = 64 << 20;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// I/O on the file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than its header says.
    #[error("state file is truncated: {0}")]
    Truncated(String),
    /// Not a kata-snap state file, or another architecture's.
    #[error("not a kata-snap x86-64 snapshot state (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// Written by another format version.
    #[error(
        "snapshot format version {found} is not supported (this kata-snap reads version {FORMAT_VERSION})"
    )]
    Version {
        /// The file's version.
        found: u32,
    },
    /// A reserved header field is not zero.
    #[error("state header is corrupt: reserved field is {0:#x}, not zero")]
    Reserved(u32),
    /// The body length is absurd.
    #[error("state body length {0} exceeds the limit of {MAX_BODY_LEN} bytes")]
    TooLarge(u64),
    /// The body does not match its checksum.
    #[error(
        "state checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the snapshot is corrupt"
    )]
    Checksum {
        /// Stored CRC.
        stored: u64,
        /// Computed CRC.
        computed: u64,
    },
    /// The body passed its checksum but does not decode.
    #[error("state body does not decode: {0}")]
    Decode(String),
    /// The value could not be encoded.
    #[error("state body does not encode: {0}")]
    Encode(String),
}

fn checksum(id: &SnapshotId, body: &[u8]) -> u64 {
    let mut digest = CRC.digest();
    digest.update(&id.0);
    digest.update(body);
    digest.finalize()
}

/// Encodes `value` of snapshot `id` as a complete state file image.
pub fn encode<T: Serialize>(id: &SnapshotId, value: &T) -> Result<Vec<u8>, FormatError> {
    let body = postcard::to_allocvec(value).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(id, &body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a state file image: header checks, then the checksum, and only then the body.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(SnapshotId, T), FormatError> {
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    let magic: [u8; 8] = bytes[0..8].try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(FormatError::BadMagic(magic));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    if u32_at(12) != 0 {
        return Err(FormatError::Reserved(u32_at(12)));
    }
    let id = SnapshotId(bytes[16..32].try_into().expect("16 bytes"));
    let len = u64_at(32);
    if len > MAX_BODY_LEN {
        return Err(FormatError::TooLarge(len));
    }
    let body = &bytes[HEADER_LEN..];
    if (body.len() as u64) != len {
        return Err(FormatError::Truncated(format!(
            "header says {len} body bytes, the file has {}",
            body.len()
        )));
    }
    let stored = u64_at(40);
    let computed = checksum(&id, body);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    let value = postcard::from_bytes(body).map_err(|e| FormatError::Decode(e.to_string()))?;
    Ok((id, value))
}

/// Writes `value` to `path` (the caller handles atomicity at the directory level) and fsyncs it.
pub fn write_file<T: Serialize>(
    path: &Path,
    id: &SnapshotId,
    value: &T,
) -> Result<(), FormatError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| FormatError::Io { what, source }
    };
    let bytes = encode(id, value)?;
    let mut f = File::create(path).map_err(io("cannot create"))?;
    f.write_all(&bytes).map_err(io("cannot write"))?;
    f.sync_all().map_err(io("cannot fsync"))?;
    Ok(())
}

/// Reads and decodes the state file at `path` (a regular file, read with a bound).
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<(SnapshotId, T), FormatError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| FormatError::Io { what, source }
    };
    let f = crate::file::open_regular(path).map_err(io("cannot open"))?;
    read_from(f, path)
}

/// As [`read_file`], from the file `f` already opened (read from its start; `path` names it in
/// errors).
pub fn read_from<T: DeserializeOwned>(
    mut f: File,
    path: &Path,
) -> Result<(SnapshotId, T), FormatError> {
    use std::io::Seek;
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| FormatError::Io { what, source }
    };
    f.rewind().map_err(io("cannot read"))?;
    let len = f.metadata().map_err(io("cannot stat"))?.len();
    if len > MAX_BODY_LEN + HEADER_LEN as u64 {
        return Err(FormatError::TooLarge(len));
    }
    let bytes = crate::file::read_bounded(&mut f, MAX_BODY_LEN + HEADER_LEN as u64)
        .map_err(io("cannot read"))?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        flag: bool,
    }

    const ID: SnapshotId = SnapshotId([7; 16]);

    #[test]
    fn test_state_id_flip_fails_checksum() {
        let mut bytes = encode(&ID, &sample()).unwrap();
        bytes[20] ^= 1;
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FormatError::Checksum { .. })
        ));
    }

    fn sample() -> Sample {
        Sample {
            name: "vm".into(),
            regs: (0..64).map(|i| i * 0x1234_5678).collect(),
            flag: true,
        }
    }

    #[test]
    fn test_state_roundtrip() {
        let bytes = encode(&ID, &sample()).unwrap();
        assert_eq!(&bytes[..8], b"KSNAPx64");
        assert_eq!(decode::<Sample>(&bytes).unwrap(), (ID, sample()));
    }

    #[test]
    fn test_state_bad_magic_refused() {
        let mut bytes = encode(&ID, &sample()).unwrap();
        bytes[0] = b'X';
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FormatError::BadMagic(_))
        ));
    }

    #[test]
    fn test_state_other_version_refused() {
        let mut bytes = encode(&ID, &sample()).unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        let err = decode::<Sample>(&bytes).unwrap_err();
        assert!(matches!(err, FormatError::Version { found: 7 }));
        assert!(err.to_string().contains("reads version 2"));
    }

    #[test]
    fn test_state_truncated_refused() {
        let bytes = encode(&ID, &sample()).unwrap();
        for cut in [0, 10, HEADER_LEN, bytes.len() - 1] {
            assert!(
                matches!(
                    decode::<Sample>(&bytes[..cut]),
                    Err(FormatError::Truncated(_))
                ),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode::<Sample>(&longer),
            Err(FormatError::Truncated(_))
        ));
    }

    #[test]
    fn test_state_huge_length_refused_without_reading() {
        let mut bytes = encode(&ID, &sample()).unwrap();
        bytes[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FormatError::TooLarge(_))
        ));
    }

    #[test]
    fn test_state_body_flip_fails_checksum_before_parse() {
        let mut bytes = encode(&ID, &sample()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn test_state_valid_checksum_bad_body_is_decode_error() {
        let body = [0xffu8; 5];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&ID.0);
        bytes.extend_from_slice(&5u64.to_le_bytes());
        bytes.extend_from_slice(&checksum(&ID, &body).to_le_bytes());
        bytes.extend_from_slice(&body);
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FormatError::Decode(_))
        ));
    }

    proptest! {
        /// Any single-bit flip anywhere in the file is refused, never accepted or panicking.
        #[test]
        fn prop_state_any_bit_flip_is_refused(bit in 0usize..(8 * 600)) {
            let mut bytes = encode(&ID, &sample()).unwrap();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode::<Sample>(&bytes).is_err());
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn prop_state_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode::<Sample>(&bytes);
        }
    }
}
