//! Encoding and decoding frame bodies: codec byte, header length, header, attachments.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use serde_json::Value;

use super::marshal;
use super::message::{ItemError, Message, RemoteError};

/// How a frame header is encoded. Workers announce what they read and write in HELLO and the
/// pool picks the fastest both have (msgpack, else marshal, else JSON); more codecs may come, so
/// a `match` on this needs a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Codec {
    /// JSON (UTF-8). Always available; used for the handshake.
    Json,
    /// MessagePack, when both sides have it.
    Msgpack,
    /// Python's `marshal` (version 2, the subset described in `marshal.rs`): the binary codec
    /// every interpreter has, used when the worker has no msgpack.
    Marshal,
}

impl Codec {
    /// The codec byte at the start of a body.
    pub const fn tag(self) -> u8 {
        match self {
            Codec::Json => b'J',
            Codec::Msgpack => b'M',
            Codec::Marshal => b'S',
        }
    }

    /// The name used in HELLO and WELCOME.
    pub const fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Msgpack => "msgpack",
            Codec::Marshal => "marshal",
        }
    }

    /// Parses a name from HELLO/WELCOME.
    pub fn from_name(name: &str) -> Option<Codec> {
        match name {
            "json" => Some(Codec::Json),
            "msgpack" => Some(Codec::Msgpack),
            "marshal" => Some(Codec::Marshal),
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
    /// The codec byte is none of `J`, `M` and `S`.
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
    /// A well-formed RESULT or CHUNK for call `id` whose value this side cannot take as it is
    /// (nested deeper than [`MAX_DEPTH`](super::MAX_DEPTH), or an integer beyond 64 bits, which
    /// would silently become a float). The frame itself is intact: the call can fail with this
    /// reason and the channel goes on.
    #[error("the value of call {id} cannot be decoded: {reason}")]
    Value {
        /// The call the frame belongs to.
        id: u64,
        /// What is wrong with the value.
        reason: String,
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

/// RESULT and CHUNK, the messages that carry values back, read straight into their fields: the
/// general path (a tagged enum inside a flattened envelope) buffers the whole header in serde's
/// intermediate form first, which for a batch reply of a thousand values costs more than the
/// rest of its decoding.
#[derive(Deserialize)]
struct ReplyIn {
    #[serde(rename = "type")]
    kind: ReplyKind,
    id: u64,
    #[serde(default)]
    ok: Option<Value>,
    #[serde(default)]
    error: Option<RemoteError>,
    #[serde(default)]
    errors: Vec<ItemError>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    value: Value,
    #[serde(default)]
    att: Vec<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ReplyKind {
    Result,
    Chunk,
}

/// The fast path of [`decode`] for a header that starts like a RESULT or CHUNK (workers write
/// `type` first); `None` sends the header down the general path, which also reports any error.
fn decode_reply(codec: Codec, header: &[u8]) -> Option<EnvelopeIn> {
    let reply: ReplyIn = match codec {
        Codec::Json => {
            if !(header.starts_with(br#"{"type":"result""#)
                || header.starts_with(br#"{"type":"chunk""#))
            {
                return None;
            }
            serde_json::from_slice(header).ok()?
        }
        Codec::Msgpack => {
            // A map (fixmap or map16), then the key "type", then "result" or "chunk".
            let rest = match header.first()? {
                0x80..=0x8f => &header[1..],
                0xde => header.get(3..)?,
                _ => return None,
            };
            if !(rest.starts_with(b"\xa4type\xa6result") || rest.starts_with(b"\xa4type\xa5chunk"))
            {
                return None;
            }
            let mut deserializer = rmp_serde::Deserializer::new(header);
            deserializer.set_max_depth(MSGPACK_MAX_DEPTH);
            ReplyIn::deserialize(&mut deserializer).ok()?
        }
        Codec::Marshal => {
            // A dict whose first key is "type", then "result" or "chunk" (as Python writes it).
            if !(header.starts_with(b"{u\x04\x00\x00\x00typeu\x06\x00\x00\x00result")
                || header.starts_with(b"{u\x04\x00\x00\x00typeu\x05\x00\x00\x00chunk"))
            {
                return None;
            }
            marshal::from_slice(header, MSGPACK_MAX_DEPTH).ok()?
        }
    };
    let msg = match reply.kind {
        ReplyKind::Result => Message::Result {
            id: reply.id,
            ok: reply.ok,
            error: reply.error,
            errors: reply.errors,
        },
        ReplyKind::Chunk => Message::Chunk {
            id: reply.id,
            seq: reply.seq?,
            value: reply.value,
        },
    };
    Some(EnvelopeIn {
        msg,
        att: reply.att,
    })
}

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
        Codec::Marshal => {
            marshal::to_vec(&envelope).map_err(|e| ProtocolError::Header(e.to_string()))?
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
        b'S' => Codec::Marshal,
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
    let parsed: Result<EnvelopeIn, String> = match decode_reply(codec, header) {
        Some(envelope) => Ok(envelope),
        None => match codec {
            Codec::Json => serde_json::from_slice(header).map_err(|e| e.to_string()),
            Codec::Msgpack => {
                let mut deserializer = rmp_serde::Deserializer::new(header);
                deserializer.set_max_depth(MSGPACK_MAX_DEPTH);
                EnvelopeIn::deserialize(&mut deserializer).map_err(|e| e.to_string())
            }
            Codec::Marshal => {
                marshal::from_slice(header, MSGPACK_MAX_DEPTH).map_err(|e| e.to_string())
            }
        },
    };
    let envelope = match parsed {
        Ok(envelope) => envelope,
        // A reply the pool cannot take fails its call, not the worker: the frame is intact.
        Err(reason) => {
            return Err(match reply_id(codec, header) {
                Some(id) => ProtocolError::Value { id, reason },
                None => ProtocolError::Header(reason),
            })
        }
    };
    if codec == Codec::Json {
        if let Message::Result { id, .. } | Message::Chunk { id, .. } = &envelope.msg {
            if let Some(literal) = integer_beyond_64_bits(header) {
                return Err(ProtocolError::Value {
                    id: *id,
                    reason: format!(
                        "the integer {literal} does not fit in 64 bits and would lose its value; \
                         send it as a string"
                    ),
                });
            }
        }
    }
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

/// The depth limit for MessagePack and marshal headers, the same as `serde_json`'s built-in one
/// (values nest inside the message map), so every codec takes the same values.
const MSGPACK_MAX_DEPTH: usize = 128;

/// The call id of a RESULT or CHUNK header that could not be decoded as a whole, read from its
/// `type` and `id` fields, which must come before the value that cannot be decoded (a worker
/// writes them first). `None` for anything else.
fn reply_id(codec: Codec, header: &[u8]) -> Option<u64> {
    let mut prefix = ReplyPrefix::default();
    // The visitor stops early on purpose, so the outcome is an error either way; what it saw
    // is in `prefix`.
    let _ = match codec {
        Codec::Json => {
            let mut deserializer = serde_json::Deserializer::from_slice(header);
            serde::Deserializer::deserialize_map(&mut deserializer, PrefixVisitor(&mut prefix))
                .map_err(|_| ())
        }
        Codec::Msgpack => {
            let mut deserializer = rmp_serde::Deserializer::new(header);
            serde::Deserializer::deserialize_map(&mut deserializer, PrefixVisitor(&mut prefix))
                .map_err(|_| ())
        }
        Codec::Marshal => {
            marshal::deserialize_map(header, MSGPACK_MAX_DEPTH, PrefixVisitor(&mut prefix))
                .map_err(|_| ())
        }
    };
    match prefix.kind.as_deref() {
        Some("result" | "chunk") => prefix.id,
        _ => None,
    }
}

#[derive(Default)]
struct ReplyPrefix {
    kind: Option<String>,
    id: Option<u64>,
}

struct PrefixVisitor<'a>(&'a mut ReplyPrefix);

impl<'de> serde::de::Visitor<'de> for PrefixVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a message map")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::Error;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "type" => self.0.kind = Some(map.next_value()?),
                "id" => self.0.id = Some(map.next_value()?),
                // Skipping a value too deep to decode fails, and ends the search with it.
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            if self.0.kind.is_some() && self.0.id.is_some() {
                return Err(A::Error::custom("done"));
            }
        }
        Ok(())
    }
}

/// The first integer literal in a JSON text that fits neither `u64` nor `i64` (it would become a
/// lossy float), outside strings.
fn integer_beyond_64_bits(json: &[u8]) -> Option<String> {
    // u64::MAX has 20 digits and i64::MIN 19: only runs of 19 or more digits can be too large.
    // Checking for one first keeps the common case to one pass over the bytes.
    let mut run = 0;
    if !json.iter().any(|b| {
        run = if b.is_ascii_digit() { run + 1 } else { 0 };
        run >= 19
    }) {
        return None;
    }
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                // Skip the string, escapes included.
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                if json[i] == b'-' {
                    i += 1;
                }
                let digits_start = i;
                while i < json.len() && json[i].is_ascii_digit() {
                    i += 1;
                }
                let digits = &json[digits_start..i];
                let mut integral = true;
                while i < json.len()
                    && matches!(json[i], b'.' | b'e' | b'E' | b'+' | b'-' | b'0'..=b'9')
                {
                    integral = false;
                    i += 1;
                }
                if integral && digits.len() >= 19 {
                    let literal = std::str::from_utf8(&json[start..digits_start + digits.len()])
                        .unwrap_or_default();
                    let fits = literal.parse::<u64>().is_ok() || literal.parse::<i64>().is_ok();
                    if !fits {
                        return Some(literal.to_owned());
                    }
                }
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Hello, ItemError, RemoteError};
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
                window: Some(16),
                batch: false,
                scalars: false,
            },
            Message::Call {
                id: 8,
                command: "score".into(),
                args: json!([1, 2, 3]),
                session: None,
                timeout_ms: None,
                window: Some(16),
                batch: true,
                scalars: true,
            },
            Message::Credit { id: 7, n: 8 },
            Message::Result {
                id: 7,
                ok: Some(json!(1)),
                error: None,
                errors: Vec::new(),
            },
            Message::Result {
                id: 8,
                ok: Some(json!([1, null, 3])),
                error: None,
                errors: vec![ItemError {
                    index: 1,
                    error: RemoteError {
                        kind: "ValueError".into(),
                        message: "no".into(),
                        traceback: None,
                    },
                }],
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
    fn every_message_round_trips_in_every_codec() {
        let att = [
            Bytes::from_static(b"\x00\x01"),
            Bytes::new(),
            Bytes::from_static(b"xyz"),
        ];
        for codec in [Codec::Json, Codec::Msgpack, Codec::Marshal] {
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
    fn replies_take_the_fast_path_and_read_as_the_general_path_does() {
        let mut replies = 0;
        for codec in [Codec::Json, Codec::Msgpack, Codec::Marshal] {
            for msg in all_messages() {
                let body = encode(&msg, codec, &[Bytes::from_static(b"ab")]).unwrap();
                let header_len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
                let header = &body[PREFIX..PREFIX + header_len];
                let fast = decode_reply(codec, header);
                if !matches!(msg, Message::Result { .. } | Message::Chunk { .. }) {
                    assert!(fast.is_none(), "{msg:?} took the reply path");
                    continue;
                }
                replies += 1;
                let fast = fast.unwrap_or_else(|| panic!("{codec:?} {msg:?} missed the fast path"));
                assert_eq!(fast.msg, msg);
                assert_eq!(fast.att, vec![2]);
            }
        }
        assert_eq!(replies, 3 * 3);
        // What the Python runtime writes, `type` and `id` first; a null `ok` is a null value.
        let python = br#"{"type":"result","id":9,"ok":null,"unknown":1}"#;
        let fast = decode_reply(Codec::Json, python).expect("fast path");
        assert_eq!(
            fast.msg,
            Message::Result {
                id: 9,
                ok: None,
                error: None,
                errors: Vec::new()
            }
        );
        // A chunk without its seq is left to the general path, which rejects it.
        assert!(decode_reply(Codec::Json, br#"{"type":"chunk","id":1,"value":2}"#).is_none());
    }

    #[test]
    fn protocol_md_example_is_byte_exact() {
        let msg = Message::Call {
            id: 7,
            command: "echo".into(),
            args: json!({"data": {"__pypool_att__": 0}}),
            session: None,
            timeout_ms: None,
            window: None,
            batch: false,
            scalars: false,
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

    fn json_body(header: &str) -> Bytes {
        let mut body = vec![b'J'];
        body.extend_from_slice(&(header.len() as u32).to_be_bytes());
        body.extend_from_slice(header.as_bytes());
        Bytes::from(body)
    }

    #[test]
    fn a_result_nested_too_deep_fails_its_call_not_the_channel() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let header = format!(r#"{{"type":"result","id":9,"ok":{deep}}}"#);
        match decode(json_body(&header)) {
            Err(ProtocolError::Value { id: 9, reason }) => {
                assert!(reason.contains("recursion"), "{reason}")
            }
            other => panic!("expected a value error for call 9, got {other:?}"),
        }
        // The same under msgpack.
        let mut value = json!(1);
        for _ in 0..200 {
            value = json!([value]);
        }
        let packed =
            rmp_serde::to_vec_named(&json!({"type": "chunk", "id": 4, "seq": 0, "value": value}))
                .unwrap();
        let mut body = vec![b'M'];
        body.extend_from_slice(&(packed.len() as u32).to_be_bytes());
        body.extend_from_slice(&packed);
        assert!(matches!(
            decode(Bytes::from(body)),
            Err(ProtocolError::Value { id: 4, .. })
        ));
        // And under marshal.
        let chunk = Message::Chunk {
            id: 4,
            seq: 0,
            value,
        };
        let body = encode(&chunk, Codec::Marshal, &[]).unwrap();
        assert!(matches!(
            decode(body),
            Err(ProtocolError::Value { id: 4, .. })
        ));
        // Just under the limit decodes.
        let ok = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let header = format!(r#"{{"type":"result","id":9,"ok":{ok}}}"#);
        assert!(decode(json_body(&header)).is_ok());
        // Anything that is not a reply stays a protocol error.
        let header = format!(r#"{{"type":"pong","id":1,"x":{deep}}}"#);
        assert!(matches!(
            decode(json_body(&header)),
            Err(ProtocolError::Header(_))
        ));
    }

    #[test]
    fn integers_beyond_64_bits_are_refused_not_rounded() {
        for big in [
            "18446744073709551616",
            "-9223372036854775809",
            "1180591620717411303424",
        ] {
            let header = format!(r#"{{"type":"result","id":3,"ok":[1,{{"n":{big}}}]}}"#);
            match decode(json_body(&header)) {
                Err(ProtocolError::Value { id: 3, reason }) => {
                    assert!(reason.contains(big), "{reason}")
                }
                other => panic!("{big}: expected a value error, got {other:?}"),
            }
        }
        // Under marshal, a long of five 15-bit digits holding 2**64 (what Python writes for it).
        let mut header = b"{u\x04\x00\x00\x00typeu\x06\x00\x00\x00resultu\x02\x00\x00\x00id\
                           i\x03\x00\x00\x00u\x02\x00\x00\x00okl\x05\x00\x00\x00"
            .to_vec();
        header.extend_from_slice(b"\x00\x00\x00\x00\x00\x00\x00\x00\x10\x000");
        let mut body = vec![b'S'];
        body.extend_from_slice(&(header.len() as u32).to_be_bytes());
        body.extend_from_slice(&header);
        match decode(Bytes::from(body)) {
            Err(ProtocolError::Value { id: 3, reason }) => {
                assert!(reason.contains("64 bits"), "{reason}")
            }
            other => panic!("marshal: expected a value error, got {other:?}"),
        }
        for fine in [
            "18446744073709551615",
            "-9223372036854775808",
            "1.8446744073709552e19",
            "12345678901234567890123.5",
            r#""18446744073709551616""#,
            r#""a \" 18446744073709551616""#,
        ] {
            let header = format!(r#"{{"type":"result","id":3,"ok":{fine}}}"#);
            assert!(decode(json_body(&header)).is_ok(), "{fine}");
        }
    }
}
