//! Wire protocol v1: message types, the body codec, and framing over byte streams.
//!
//! `PROTOCOL.md` at the repository root is the normative description; this module is its Rust
//! implementation. A frame is a 4-byte big-endian length followed by a body; a body is a codec
//! byte, a 4-byte header length, the header (JSON, MessagePack or Python's marshal) and raw binary attachments.
//!
//! Version 2 added flow control for streams (`window` in CALL, the CREDIT message).

pub mod auth;
mod codec;
mod framed;
mod marshal;
mod message;

pub use codec::{decode, encode, Codec, ProtocolError};
pub use framed::{channel_from_io, FramedReceiver, FramedSender};
pub(crate) use message::CallShape;
pub use message::{Hello, ItemError, Message, RemoteError, Welcome};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u64 = 2;

/// How deep values may nest (maps and lists inside each other), in arguments and results. The
/// pool refuses deeper arguments before sending them; a deeper result reaches its caller as an
/// error, and the worker lives on.
pub const MAX_DEPTH: usize = 100;

/// The default largest frame (256 MiB).
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024 * 1024;

/// The key of the placeholder map that stands for attachment `N`: `{"__pypool_att__": N}`.
pub const ATTACHMENT_KEY: &str = "__pypool_att__";
