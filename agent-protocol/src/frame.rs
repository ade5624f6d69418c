//! Framing: a `u32` little-endian payload length, then a postcard payload.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::MAX_MESSAGE_SIZE;
use crate::validate::{Validate, ValidationError};

/// Errors of the framing layer.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The peer closed the connection between two frames.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes received of the frame (prefix included).
        got: usize,
        /// Bytes the frame should have had.
        expected: usize,
    },
    /// A length prefix larger than [`MAX_MESSAGE_SIZE`].
    #[error("frame of {len} bytes exceeds the limit of {MAX_MESSAGE_SIZE} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
    },
    /// Reading or writing the transport failed.
    #[error("transport I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// Errors of reading or writing a message.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The frame layer failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The payload is not a valid encoding of the expected message type.
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    /// The message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    /// The message decoded but is invalid.
    #[error("invalid message: {0}")]
    Invalid(#[from] ValidationError),
}

impl ProtocolError {
    /// True when the peer closed the connection cleanly between frames.
    pub fn is_closed(&self) -> bool {
        matches!(self, ProtocolError::Frame(FrameError::Closed))
    }
}

/// Validates and encodes `msg` as a complete frame (length prefix included).
pub fn encode_message<M: Serialize + Validate>(msg: &M) -> Result<Vec<u8>, ProtocolError> {
    msg.validate()?;
    let mut buf = vec![0u8; 4];
    let mut buf =
        postcard::to_extend(msg, std::mem::take(&mut buf)).map_err(ProtocolError::Encode)?;
    let len = buf.len() - 4;
    if len > MAX_MESSAGE_SIZE {
        return Err(FrameError::TooLarge { len }.into());
    }
    // The check above bounds len to MAX_MESSAGE_SIZE, which fits a u32.
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Decodes and validates one frame payload (without its length prefix).
pub fn decode_message<M: DeserializeOwned + Validate>(payload: &[u8]) -> Result<M, ProtocolError> {
    let (msg, rest) = postcard::take_from_bytes::<M>(payload).map_err(ProtocolError::Decode)?;
    if !rest.is_empty() {
        return Err(ProtocolError::Decode(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    msg.validate()?;
    Ok(msg)
}

/// Reads exactly `buf.len()` bytes; `Ok(n)` with `n < buf.len()` means EOF.
/// A reset connection counts as EOF: a peer that closes with our bytes still
/// unread resets the connection instead of closing it cleanly.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame's payload, blocking until it is complete.
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    let got = read_full(r, &mut prefix)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < 4 {
        return Err(FrameError::Truncated { got, expected: 4 });
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_MESSAGE_SIZE {
        return Err(FrameError::TooLarge { len });
    }
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)?;
    if got < len {
        return Err(FrameError::Truncated {
            got: 4 + got,
            expected: 4 + len,
        });
    }
    Ok(payload)
}

/// Writes one frame with the given payload.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> Result<(), FrameError> {
    if payload.len() > MAX_MESSAGE_SIZE {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads, decodes and validates one message.
pub fn read_message<M: DeserializeOwned + Validate>(r: &mut impl Read) -> Result<M, ProtocolError> {
    let payload = read_frame(r)?;
    decode_message(&payload)
}

/// Validates, encodes and writes one message.
pub fn write_message<M: Serialize + Validate>(
    w: &mut impl Write,
    msg: &M,
) -> Result<(), ProtocolError> {
    let frame = encode_message(msg)?;
    w.write_all(&frame).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)?;
    Ok(())
}

/// Incremental frame decoder for non-blocking readers: feed it bytes as they
/// arrive, take complete payloads out. An oversized length prefix is an error
/// as soon as the prefix is seen, before any payload is buffered.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the transport.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered that do not yet form a complete frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next complete payload, if there is one.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_MESSAGE_SIZE {
            return Err(FrameError::TooLarge { len });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let payload = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(payload))
    }

    /// Call at end of stream: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buf.len() {
            0 => Ok(()),
            got if got < 4 => Err(FrameError::Truncated { got, expected: 4 }),
            got => {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                Err(FrameError::Truncated {
                    got,
                    expected: 4 + len,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{AgentMessage, ErrorKind, HostMessage};
    use crate::{MAX_STDIO_CHUNK, PROTOCOL_VERSION};

    #[test]
    fn test_hello_wire_layout_is_frozen() {
        let f = encode_message(&HostMessage::Hello {
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        assert_eq!(f, [2, 0, 0, 0, 0, PROTOCOL_VERSION as u8]);
        let f = encode_message(&AgentMessage::Hello {
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        assert_eq!(f, [2, 0, 0, 0, 0, PROTOCOL_VERSION as u8]);
    }

    /// postcard encodes the variant index: version 2's variants were added at
    /// the end, so every version-1 variant keeps its index.
    #[test]
    fn test_create_start_variants_appended_at_the_end() {
        let index = |f: Vec<u8>| f[4];
        assert_eq!(index(encode_message(&HostMessage::CloseStdin).unwrap()), 3);
        assert_eq!(index(encode_message(&HostMessage::Start).unwrap()), 9);
        assert_eq!(
            index(encode_message(&AgentMessage::Exited { code: 0 }).unwrap()),
            5
        );
        assert_eq!(
            index(encode_message(&AgentMessage::Created { pid: 3 }).unwrap()),
            7
        );
    }

    #[test]
    fn test_roundtrip_agent_messages_equal() {
        let msgs = vec![
            AgentMessage::Hello {
                version: PROTOCOL_VERSION,
            },
            AgentMessage::Ack,
            AgentMessage::Started { pid: 77 },
            AgentMessage::Created { pid: 78 },
            AgentMessage::Stdout(vec![0, 255, 10]),
            AgentMessage::Stderr(vec![1; MAX_STDIO_CHUNK]),
            AgentMessage::Exited { code: 143 },
            AgentMessage::Error {
                kind: ErrorKind::ExecNotFound,
                message: "nope".into(),
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            write_message(&mut wire, m).unwrap();
        }
        let mut r = wire.as_slice();
        for m in &msgs {
            assert_eq!(&read_message::<AgentMessage>(&mut r).unwrap(), m);
        }
        assert!(
            read_message::<AgentMessage>(&mut r)
                .unwrap_err()
                .is_closed()
        );
    }

    #[test]
    fn test_read_frame_oversized_prefix_rejected_without_payload() {
        let mut wire: &[u8] = &((MAX_MESSAGE_SIZE as u32 + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut wire),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn test_read_frame_truncated_payload_reported() {
        let mut wire: &[u8] = &[10, 0, 0, 0, 1, 2, 3];
        match read_frame(&mut wire) {
            Err(FrameError::Truncated { got, expected }) => assert_eq!((got, expected), (7, 14)),
            other => panic!("{other:?}"),
        }
        let mut wire: &[u8] = &[10, 0];
        assert!(matches!(
            read_frame(&mut wire),
            Err(FrameError::Truncated {
                got: 2,
                expected: 4
            })
        ));
    }

    #[test]
    fn test_decode_trailing_bytes_rejected() {
        let mut payload = postcard::to_stdvec(&AgentMessage::Ack).unwrap();
        payload.push(0);
        assert!(matches!(
            decode_message::<AgentMessage>(&payload),
            Err(ProtocolError::Decode(_))
        ));
    }

    #[test]
    fn test_decode_garbage_is_error_not_panic() {
        // Every short byte string either decodes to a valid message or errors.
        for a in 0..=255u8 {
            for b in [0u8, 1, 127, 128, 255] {
                let _ = decode_message::<HostMessage>(&[a, b]);
                let _ = decode_message::<AgentMessage>(&[a, b, b, b]);
            }
        }
        // A huge declared vector length must not allocate it.
        let r = decode_message::<AgentMessage>(&[3, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(r.is_err());
    }

    #[test]
    fn test_encode_invalid_message_refused() {
        let r = encode_message(&AgentMessage::Exited { code: 256 });
        assert!(matches!(r, Err(ProtocolError::Invalid(_))));
    }

    #[test]
    fn test_frame_decoder_reassembles_byte_by_byte() {
        let a = encode_message(&HostMessage::Signal(15)).unwrap();
        let b = encode_message(&HostMessage::CloseStdin).unwrap();
        let mut d = FrameDecoder::new();
        let mut frames = Vec::new();
        for byte in a.iter().chain(&b) {
            d.feed(std::slice::from_ref(byte));
            while let Some(p) = d.next_frame().unwrap() {
                frames.push(decode_message::<HostMessage>(&p).unwrap());
            }
        }
        assert_eq!(
            frames,
            vec![HostMessage::Signal(15), HostMessage::CloseStdin]
        );
        assert_eq!(d.pending(), 0);
        d.finish().unwrap();
    }

    #[test]
    fn test_frame_decoder_oversized_prefix_fails_immediately() {
        let mut d = FrameDecoder::new();
        d.feed(&u32::MAX.to_le_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn test_frame_decoder_finish_mid_frame_is_truncated() {
        let mut d = FrameDecoder::new();
        d.feed(&[5, 0, 0, 0, 1]);
        assert_eq!(d.next_frame().unwrap(), None);
        assert!(matches!(
            d.finish(),
            Err(FrameError::Truncated {
                got: 5,
                expected: 9
            })
        ));
    }
}
