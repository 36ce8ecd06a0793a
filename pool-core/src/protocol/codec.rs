//! Encoding and decoding frame bodies: codec byte, header length, header, attachments.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::message::Message;

/// How a frame header is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// JSON (UTF-8). Always available; used for the handshake.
    Json,
    /// MessagePack, when both sides have it.
    Msgpack,
}

impl Codec {
    /// The codec byte at the start of a body.
    pub const fn tag(self) -> u8 {
        match self {
            Codec::Json => b'J',
            Codec::Msgpack => b'M',
        }
    }

    /// The name used in HELLO and WELCOME.
    pub const fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Msgpack => "msgpack",
        }
    }

    /// Parses a name from HELLO/WELCOME.
    pub fn from_name(name: &str) -> Option<Codec> {
        match name {
            "json" => Some(Codec::Json),
            "msgpack" => Some(Codec::Msgpack),
            _ => None,
        }
    }
}

/// A frame that does not follow PROTOCOL.md.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The body is shorter than its fixed prefix.
    #[error("frame body of {0} bytes is shorter than the 5-byte prefix")]
    TooShort(usize),
    /// The codec byte is neither `J` nor `M`.
    #[error("unknown codec byte 0x{0:02x}")]
    UnknownCodec(u8),
    /// The header length points past the end of the body.
    #[error("header length {header_len} exceeds the {available} bytes after the prefix")]
    HeaderLength {
        /// Declared header length.
        header_len: usize,
        /// Bytes actually there.
        available: usize,
    },
    /// The attachment lengths do not add up to the rest of the body.
    #[error("attachment lengths add up to {declared} bytes but {actual} follow the header")]
    AttachmentLengths {
        /// Sum of the lengths in `att`.
        declared: u64,
        /// Bytes actually there.
        actual: usize,
    },
    /// The header could not be decoded, or lacks fields its type requires.
    #[error("bad header: {0}")]
    Header(String),
    /// A frame larger than the maximum was announced or about to be sent.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The frame's length.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    #[serde(flatten)]
    msg: &'a Message,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    att: Vec<u64>,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    #[serde(flatten)]
    msg: Message,
    #[serde(default)]
    att: Vec<u64>,
}

const PREFIX: usize = 5;

/// Encodes a message and its attachments into one frame body (without the length prefix).
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use pool_core::protocol::{decode, encode, Codec, Message};
///
/// let msg = Message::Ping { id: 3 };
/// let body = encode(&msg, Codec::Json, &[Bytes::from_static(b"raw")]).unwrap();
/// let (back, attachments) = decode(body).unwrap();
/// assert_eq!(back, msg);
/// assert_eq!(attachments, vec![Bytes::from_static(b"raw")]);
/// ```
pub fn encode(msg: &Message, codec: Codec, attachments: &[Bytes]) -> Result<Bytes, ProtocolError> {
    let envelope = EnvelopeOut {
        msg,
        att: attachments.iter().map(|a| a.len() as u64).collect(),
    };
    let header = match codec {
        Codec::Json => {
            serde_json::to_vec(&envelope).map_err(|e| ProtocolError::Header(e.to_string()))?
        }
        Codec::Msgpack => {
            rmp_serde::to_vec_named(&envelope).map_err(|e| ProtocolError::Header(e.to_string()))?
        }
    };
    let header_len = u32::try_from(header.len()).map_err(|_| ProtocolError::FrameTooLarge {
        len: header.len(),
        max: u32::MAX as usize,
    })?;
    let total = PREFIX + header.len() + attachments.iter().map(Bytes::len).sum::<usize>();
    let mut body = BytesMut::with_capacity(total);
    body.put_u8(codec.tag());
    body.put_u32(header_len);
    body.extend_from_slice(&header);
    for attachment in attachments {
        body.extend_from_slice(attachment);
    }
    Ok(body.freeze())
}

/// Decodes a frame body into its message and attachments. Attachments share the body's memory.
pub fn decode(body: Bytes) -> Result<(Message, Vec<Bytes>), ProtocolError> {
    if body.len() < PREFIX {
        return Err(ProtocolError::TooShort(body.len()));
    }
    let codec = match body[0] {
        b'J' => Codec::Json,
        b'M' => Codec::Msgpack,
        other => return Err(ProtocolError::UnknownCodec(other)),
    };
    let header_len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let available = body.len() - PREFIX;
    if header_len > available {
        return Err(ProtocolError::HeaderLength {
            header_len,
            available,
        });
    }
    let header = &body[PREFIX..PREFIX + header_len];
    let envelope: EnvelopeIn = match codec {
        Codec::Json => {
            serde_json::from_slice(header).map_err(|e| ProtocolError::Header(e.to_string()))?
        }
        Codec::Msgpack => {
            rmp_serde::from_slice(header).map_err(|e| ProtocolError::Header(e.to_string()))?
        }
    };
    let rest = available - header_len;
    let declared = envelope
        .att
        .iter()
        .try_fold(0u64, |acc, len| acc.checked_add(*len))
        .unwrap_or(u64::MAX);
    if declared != rest as u64 {
        return Err(ProtocolError::AttachmentLengths {
            declared,
            actual: rest,
        });
    }
    let mut offset = PREFIX + header_len;
    let mut attachments = Vec::with_capacity(envelope.att.len());
    for len in envelope.att {
        // The sum check above bounds every length by the body size.
        let len = len as usize;
        attachments.push(body.slice(offset..offset + len));
        offset += len;
    }
    Ok((envelope.msg, attachments))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Hello, RemoteError};
    use serde_json::json;

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Challenge { nonce: "ab".into() },
            Message::Auth { mac: "cd".into() },
            Message::Hello(Hello {
                protocol: 1,
                runtime: "pypool_worker/0.1.0".into(),
                python: "3.11.7".into(),
                pid: 42,
                worker_id: "w1".into(),
                codecs: vec!["json".into()],
                commands: vec!["echo".into()],
                max_in_flight: 2,
                features: vec!["stream".into()],
            }),
            Message::StartupError {
                error: RemoteError {
                    kind: "ImportError".into(),
                    message: "no".into(),
                    traceback: None,
                },
            },
            Message::Call {
                id: 7,
                command: "echo".into(),
                args: json!({"a": [1, 2.5, null, "x"]}),
                session: Some("s".into()),
                timeout_ms: Some(5),
            },
            Message::Result {
                id: 7,
                ok: Some(json!(1)),
                error: None,
            },
            Message::Chunk {
                id: 7,
                seq: 0,
                value: json!("x"),
            },
            Message::End { id: 7 },
            Message::Cancel { id: 7 },
            Message::Cancelled { id: 7 },
            Message::Ping { id: 1 },
            Message::Pong { id: 1 },
            Message::SessionEnd {
                session: "s".into(),
            },
            Message::Shutdown,
            Message::Goodbye,
        ]
    }

    #[test]
    fn every_message_round_trips_in_both_codecs() {
        let att = [
            Bytes::from_static(b"\x00\x01"),
            Bytes::new(),
            Bytes::from_static(b"xyz"),
        ];
        for codec in [Codec::Json, Codec::Msgpack] {
            for msg in all_messages() {
                let body = encode(&msg, codec, &att).unwrap();
                assert_eq!(body[0], codec.tag());
                let (back, attachments) = decode(body).unwrap();
                assert_eq!(back, msg, "{codec:?}");
                assert_eq!(attachments, att.to_vec());
            }
        }
    }

    #[test]
    fn protocol_md_example_is_byte_exact() {
        let msg = Message::Call {
            id: 7,
            command: "echo".into(),
            args: json!({"data": {"__pypool_att__": 0}}),
            session: None,
            timeout_ms: None,
        };
        let body = encode(&msg, Codec::Json, &[Bytes::from_static(b"\x00\x01")]).unwrap();
        let header = br#"{"type":"call","id":7,"command":"echo","args":{"data":{"__pypool_att__":0}},"att":[2]}"#;
        assert_eq!(body.len(), 93);
        assert_eq!(&body[1..5], &(header.len() as u32).to_be_bytes());
        assert_eq!(&body[5..5 + header.len()], header);
    }

    #[test]
    fn malformed_bodies_are_rejected_with_a_reason() {
        assert_eq!(
            decode(Bytes::from_static(b"J\x00")),
            Err(ProtocolError::TooShort(2))
        );
        assert_eq!(
            decode(Bytes::from_static(b"X\x00\x00\x00\x00")),
            Err(ProtocolError::UnknownCodec(b'X'))
        );
        assert!(matches!(
            decode(Bytes::from_static(b"J\x00\x00\x00\x09{}")),
            Err(ProtocolError::HeaderLength {
                header_len: 9,
                available: 2
            })
        ));
        assert!(matches!(
            decode(Bytes::from_static(b"J\x00\x00\x00\x02{}")),
            Err(ProtocolError::Header(_))
        ));
        let unknown = br#"{"type":"teleport","id":1}"#;
        let mut body = vec![b'J'];
        body.extend_from_slice(&(unknown.len() as u32).to_be_bytes());
        body.extend_from_slice(unknown);
        assert!(matches!(
            decode(Bytes::from(body)),
            Err(ProtocolError::Header(_))
        ));

        let ping = encode(
            &Message::Ping { id: 1 },
            Codec::Json,
            &[Bytes::from_static(b"ab")],
        )
        .unwrap();
        let truncated = ping.slice(..ping.len() - 1);
        assert!(matches!(
            decode(truncated),
            Err(ProtocolError::AttachmentLengths {
                declared: 2,
                actual: 1
            })
        ));
    }

    #[test]
    fn unknown_header_fields_are_ignored() {
        let header = br#"{"type":"pong","id":4,"future_field":[1,2]}"#;
        let mut body = vec![b'J'];
        body.extend_from_slice(&(header.len() as u32).to_be_bytes());
        body.extend_from_slice(header);
        let (msg, att) = decode(Bytes::from(body)).unwrap();
        assert_eq!(msg, Message::Pong { id: 4 });
        assert!(att.is_empty());
    }
}
