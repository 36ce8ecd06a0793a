//! The messages of protocol v1, as they appear in a frame header.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A structured error raised by a handler (or by the worker runtime), as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// The exception's class name, e.g. `ValueError` or `mymodule.ModelError`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The exception's message.
    pub message: String,
    /// The formatted traceback, when the worker sent one.
    #[serde(default)]
    pub traceback: Option<String>,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// One failed item of a batch call: its 0-based position in the batch and its error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemError {
    /// Position of the item in the batch's `args`.
    pub index: u64,
    /// What the handler raised for that item.
    pub error: RemoteError,
}

/// The worker's introduction: the first message on a channel (after AUTH where there is one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version; this crate speaks [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).
    pub protocol: u64,
    /// Runtime name and version, e.g. `pypool_worker/0.1.0`.
    #[serde(default)]
    pub runtime: String,
    /// Interpreter version, e.g. `3.11.7`.
    #[serde(default)]
    pub python: String,
    /// The worker's process id.
    #[serde(default)]
    pub pid: u64,
    /// The id the pool gave the worker, echoed back.
    #[serde(default)]
    pub worker_id: String,
    /// Header codecs the worker reads and writes.
    #[serde(default)]
    pub codecs: Vec<String>,
    /// The commands (handler names) it serves.
    #[serde(default)]
    pub commands: Vec<String>,
    /// How many calls it accepts at once.
    pub max_in_flight: u64,
    /// Optional capabilities (`stream`, `cancel`, `async`, `session_state`).
    #[serde(default)]
    pub features: Vec<String>,
}

/// The pool's acceptance of a HELLO; the worker is ready once it has this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The codec both sides use from now on.
    pub codec: String,
    /// The pool's name.
    pub pool: String,
    /// The worker's id in the pool.
    pub worker_id: String,
    /// The largest frame the worker may send.
    pub max_frame: u64,
}

/// One protocol message (the header of a frame; attachments travel beside it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Message {
    /// Pool → worker: authentication challenge.
    Challenge {
        /// Fresh random hex nonce.
        nonce: String,
    },
    /// Worker → pool: HMAC-SHA256 of the nonce, hex.
    Auth {
        /// The MAC.
        mac: String,
    },
    /// Worker → pool: handshake.
    Hello(Hello),
    /// Worker → pool: the worker cannot start; it exits next.
    StartupError {
        /// What failed.
        error: RemoteError,
    },
    /// Pool → worker: handshake accepted.
    Welcome(Welcome),
    /// Pool → worker: run a handler.
    Call {
        /// Request id, unique per channel.
        id: u64,
        /// Handler name.
        command: String,
        /// Arguments (with attachment placeholders).
        #[serde(default)]
        args: Value,
        /// The session the call belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// How long the caller waits, in milliseconds from sending.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        /// Flow control: how many stream items the worker may send before it needs CREDIT.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u32>,
        /// A batch (one chunk of a map): `args` is a list, the handler runs once per item, and
        /// the RESULT's `ok` is the list of their results, with `errors` for the items that
        /// failed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        batch: bool,
        /// With `batch`: every item is one plain value (a number, string or bool), so the
        /// worker may pass each to the handler as its one argument without looking at it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        scalars: bool,
    },
    /// Pool → worker: the consumer took `n` more stream items of call `id`; the worker may send
    /// that many more.
    Credit {
        /// Request id.
        id: u64,
        /// Items granted.
        n: u32,
    },
    /// Worker → pool: the final reply to a call.
    Result {
        /// Request id.
        id: u64,
        /// The value, when the call succeeded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ok: Option<Value>,
        /// The error, when it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<RemoteError>,
        /// For a batch: the items that failed (their places in `ok` hold `null`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        errors: Vec<ItemError>,
    },
    /// Worker → pool: one streamed item.
    Chunk {
        /// Request id.
        id: u64,
        /// 0-based position in the stream.
        seq: u64,
        /// The item.
        #[serde(default)]
        value: Value,
    },
    /// Worker → pool: the stream finished.
    End {
        /// Request id.
        id: u64,
    },
    /// Pool → worker: stop the call if possible.
    Cancel {
        /// Request id.
        id: u64,
    },
    /// Worker → pool: the call stopped because of CANCEL.
    Cancelled {
        /// Request id.
        id: u64,
    },
    /// Pool → worker: health check.
    Ping {
        /// Ping id.
        id: u64,
    },
    /// Worker → pool: answer to PING.
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// Pool → worker: drop the state of a session.
    SessionEnd {
        /// Session id.
        session: String,
    },
    /// Pool → worker: exit.
    Shutdown,
    /// Worker → pool: exiting.
    Goodbye,
}

impl Message {
    /// The wire name of the message type, for logs and errors.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Challenge { .. } => "challenge",
            Message::Auth { .. } => "auth",
            Message::Hello(_) => "hello",
            Message::StartupError { .. } => "startup_error",
            Message::Welcome(_) => "welcome",
            Message::Call { .. } => "call",
            Message::Result { .. } => "result",
            Message::Chunk { .. } => "chunk",
            Message::End { .. } => "end",
            Message::Cancel { .. } => "cancel",
            Message::Credit { .. } => "credit",
            Message::Cancelled { .. } => "cancelled",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::SessionEnd { .. } => "session_end",
            Message::Shutdown => "shutdown",
            Message::Goodbye => "goodbye",
        }
    }
}

/// How a CALL's `args` are read: one call's arguments, or a batch of items' arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallShape {
    /// The arguments of one call.
    One,
    /// A batch (a chunk of a map): `args` is the list of the items' arguments; `scalars` when
    /// every item is one plain value (see [`Message::Call`]).
    Batch { scalars: bool },
}

impl CallShape {
    pub(crate) fn is_batch(self) -> bool {
        matches!(self, CallShape::Batch { .. })
    }
}
