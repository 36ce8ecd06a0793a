//! Call arguments and results: a JSON-like value plus raw binary attachments.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::protocol::ATTACHMENT_KEY;

/// A value that travels to or from a worker: JSON-compatible data plus binary attachments.
///
/// Binary data never goes through JSON: [`Payload::attach`] stores the bytes beside the value and
/// returns a placeholder to put where the bytes belong. The Python side sees `bytes` in that place,
/// and bytes a handler returns come back the same way.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use pool_core::Payload;
/// use serde_json::json;
///
/// let mut args = Payload::new(json!({"name": "model.bin"}));
/// let blob = args.attach(Bytes::from_static(b"\x00\x01\x02"));
/// args.value["data"] = blob;
/// assert_eq!(args.bytes_at(&args.value["data"]), Some(&Bytes::from_static(b"\x00\x01\x02")));
///
/// // A single blob is just as easy.
/// let raw = Payload::from_bytes(vec![7u8; 16]);
/// assert_eq!(raw.as_bytes().map(|b| b.len()), Some(16));
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Payload {
    /// The data, with `{"__pypool_att__": N}` placeholders where attachments belong.
    pub value: Value,
    /// The binary attachments the placeholders refer to.
    pub attachments: Vec<Bytes>,
}

impl Payload {
    /// A payload with no attachments.
    pub fn new(value: Value) -> Self {
        Payload {
            value,
            attachments: Vec::new(),
        }
    }

    /// A payload that is a single byte string (the worker sees `bytes`).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        let mut payload = Payload::default();
        payload.value = payload.attach(bytes.into());
        payload
    }

    /// Serializes any `serde` value (byte fields become JSON arrays; use [`attach`](Self::attach)
    /// for large binary data).
    pub fn from_serialize<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        Ok(Payload::new(serde_json::to_value(value)?))
    }

    /// Stores `bytes` as an attachment and returns the placeholder that refers to it.
    pub fn attach(&mut self, bytes: impl Into<Bytes>) -> Value {
        self.attachments.push(bytes.into());
        json!({ ATTACHMENT_KEY: self.attachments.len() - 1 })
    }

    /// The attachment a placeholder refers to, if `placeholder` is one.
    pub fn bytes_at(&self, placeholder: &Value) -> Option<&Bytes> {
        let index = placeholder_index(placeholder)?;
        self.attachments.get(index)
    }

    /// The bytes, when the whole value is one attachment (a handler that returned `bytes`).
    pub fn as_bytes(&self) -> Option<&Bytes> {
        self.bytes_at(&self.value)
    }

    /// Deserializes the value into `T` (placeholders stay maps; use [`bytes_at`](Self::bytes_at)).
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.value)
    }

    /// Total size of the attachments, in bytes.
    pub fn attachment_bytes(&self) -> usize {
        self.attachments.iter().map(Bytes::len).sum()
    }
}

/// Why a payload cannot be sent as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadProblem {
    /// A placeholder refers to an attachment that does not exist.
    Placeholder(u64),
    /// Values nest deeper than allowed.
    TooDeep,
}

impl Payload {
    /// Checks that the payload can be sent — every placeholder names an existing attachment and
    /// values nest at most `max_depth` levels — and returns an upper bound of its encoded size
    /// (the header as JSON or MessagePack, plus the attachments).
    pub(crate) fn check(&self, max_depth: usize) -> Result<usize, PayloadProblem> {
        let attachments: usize = self
            .attachments
            .iter()
            .map(|a| a.len().saturating_add(24))
            .fold(0, usize::saturating_add);
        let value = bound(&self.value, self.attachments.len(), max_depth, 1)?;
        Ok(value.saturating_add(attachments))
    }
}

/// An upper bound of the encoded size of `value` under either codec (JSON escapes a byte as at
/// most six; MessagePack frames a value in at most nine), checking placeholders and depth.
fn bound(
    value: &Value,
    attachments: usize,
    max_depth: usize,
    depth: usize,
) -> Result<usize, PayloadProblem> {
    Ok(match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 24,
        Value::String(s) => s.len().saturating_mul(6).saturating_add(9),
        Value::Array(items) => {
            if depth > max_depth {
                return Err(PayloadProblem::TooDeep);
            }
            let mut size: usize = 9;
            for item in items {
                size = size
                    .saturating_add(bound(item, attachments, max_depth, depth + 1)?)
                    .saturating_add(1);
            }
            size
        }
        Value::Object(map) => {
            if depth > max_depth {
                return Err(PayloadProblem::TooDeep);
            }
            if let Some(index) = map.get(ATTACHMENT_KEY).filter(|_| map.len() == 1) {
                return match index.as_u64() {
                    Some(i) if (i as usize) < attachments && i <= usize::MAX as u64 => Ok(32),
                    Some(i) => Err(PayloadProblem::Placeholder(i)),
                    None => Err(PayloadProblem::Placeholder(u64::MAX)),
                };
            }
            let mut size: usize = 9;
            for (key, item) in map {
                size = size
                    .saturating_add(key.len().saturating_mul(6).saturating_add(9))
                    .saturating_add(bound(item, attachments, max_depth, depth + 1)?)
                    .saturating_add(2);
            }
            size
        }
    })
}

/// The attachment index of a placeholder map `{"__pypool_att__": N}`.
pub fn placeholder_index(value: &Value) -> Option<usize> {
    let map = value.as_object()?;
    if map.len() != 1 {
        return None;
    }
    map.get(ATTACHMENT_KEY)?.as_u64().map(|n| n as usize)
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Payload::new(value)
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Payload::from_bytes(bytes)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload::from_bytes(bytes)
    }
}

impl From<()> for Payload {
    fn from(_: ()) -> Self {
        Payload::new(Value::Null)
    }
}

impl From<&str> for Payload {
    fn from(text: &str) -> Self {
        Payload::new(Value::String(text.to_owned()))
    }
}

impl From<String> for Payload {
    fn from(text: String) -> Self {
        Payload::new(Value::String(text))
    }
}
