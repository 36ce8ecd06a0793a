//! The pool's secret, the per-connection session key, and message signing with sequence numbers.
//!
//! On `tcp://` endpoints every message after AUTH starts with a 40-byte envelope frame:
//! `HMAC-SHA256(session_key, direction || seq || body)` followed by `seq` as a big-endian `u64`.
//! The session key is `HMAC-SHA256(secret, "pypool-zmq-session-v1" 0 pool_nonce 0 worker_nonce)`,
//! so it is fresh for every connection (both nonces are), a message recorded on one connection
//! means nothing on another, and a message reflected back to its sender fails (direction). `seq`
//! counts 0, 1, 2, ... in each direction and must arrive exactly in that order: ZeroMQ over TCP
//! neither loses nor reorders messages, so any other number is a replay or an injection.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of the signature in an envelope.
pub const MAC_LEN: usize = 32;
/// Length of the envelope frame: signature and sequence number.
pub const ENVELOPE_LEN: usize = MAC_LEN + 8;
/// Direction byte of messages from the pool to a worker.
pub(crate) const TO_WORKER: u8 = 0;
/// Direction byte of messages from a worker to the pool.
pub(crate) const TO_POOL: u8 = 1;
const SESSION_LABEL: &[u8] = b"pypool-zmq-session-v1";
/// The shortest secret accepted (bytes, after hex decoding).
pub const MIN_KEY_LEN: usize = 16;

/// The secret a pool shares with its workers: the HMAC key of AUTH and of message signing.
///
/// Local workers receive it on an inherited pipe; remote workers read it from a file
/// (`--secret-file`) holding it as hex text, e.g. made with `openssl rand -hex 32`. `Debug` never
/// shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Arc<[u8]>);

impl Key {
    /// 32 fresh random bytes.
    pub fn generate() -> Key {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Key(Arc::from(&bytes[..]))
    }

    /// A key from its hex text (surrounding whitespace ignored); at least [`MIN_KEY_LEN`] bytes.
    pub fn from_hex(text: &str) -> Result<Key, KeyError> {
        let bytes = hex::decode(text.trim()).map_err(|_| KeyError::NotHex)?;
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(Key(Arc::from(bytes)))
    }

    /// Reads a key file: hex text, as [`from_hex`](Self::from_hex) takes it.
    pub fn from_file(path: impl AsRef<Path>) -> io::Result<Key> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)?;
        Key::from_hex(&text).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {err}", path.display()),
            )
        })
    }

    /// The key as hex text, the form workers are given.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    /// The raw key.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Why a text is not a usable key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not hex text.
    #[error("the secret is not hex text")]
    NotHex,
    /// Fewer than [`MIN_KEY_LEN`] bytes.
    #[error(
        "the secret is {0} bytes; at least {MIN_KEY_LEN} are needed (make one with `openssl rand -hex 32`)"
    )]
    TooShort(usize),
}

/// The signing key of one connection, from the secret and both nonces.
pub(crate) fn session_key(key: &Key, pool_nonce: &str, worker_nonce: &str) -> [u8; 32] {
    let mut mac = keyed(key.as_bytes());
    mac.update(SESSION_LABEL);
    mac.update(&[0]);
    mac.update(pool_nonce.as_bytes());
    mac.update(&[0]);
    mac.update(worker_nonce.as_bytes());
    mac.finalize().into_bytes().into()
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    }
}

/// Signs the messages of one direction of a connection.
pub(crate) struct Signer {
    base: HmacSha256,
    direction: u8,
    seq: u64,
}

impl Signer {
    pub(crate) fn new(session_key: &[u8; 32], direction: u8) -> Self {
        Signer {
            base: keyed(session_key),
            direction,
            seq: 0,
        }
    }

    /// The envelope of the next message, whose body is `parts` back to back.
    pub(crate) fn envelope(&mut self, parts: &[&[u8]]) -> [u8; ENVELOPE_LEN] {
        let seq = self.seq.to_be_bytes();
        self.seq += 1;
        let mut mac = self.base.clone();
        mac.update(&[self.direction]);
        mac.update(&seq);
        for part in parts {
            mac.update(part);
        }
        let mut envelope = [0u8; ENVELOPE_LEN];
        envelope[..MAC_LEN].copy_from_slice(&mac.finalize().into_bytes());
        envelope[MAC_LEN..].copy_from_slice(&seq);
        envelope
    }
}

/// Why a signed message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No envelope, or one of the wrong size.
    NoEnvelope,
    /// The signature does not match: forged or altered.
    BadSignature(u64),
    /// A genuine message out of order: replayed (or lost).
    OutOfSequence { got: u64, expected: u64 },
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::NoEnvelope => f.write_str("a message without a valid signature envelope"),
            Refused::BadSignature(n) => {
                write!(f, "message {n} has a wrong signature (forged or altered)")
            }
            Refused::OutOfSequence { got, expected } => write!(
                f,
                "a replayed message: sequence number {got} where {expected} was due"
            ),
        }
    }
}

/// Checks the messages of one direction of a connection.
pub(crate) struct Verifier {
    base: HmacSha256,
    direction: u8,
    seq: u64,
}

impl Verifier {
    pub(crate) fn new(session_key: &[u8; 32], direction: u8) -> Self {
        Verifier {
            base: keyed(session_key),
            direction,
            seq: 0,
        }
    }

    /// Checks a message's envelope against its body frames, in constant time.
    pub(crate) fn check(&mut self, envelope: &[u8], body: &[&[u8]]) -> Result<(), Refused> {
        if envelope.len() != ENVELOPE_LEN {
            return Err(Refused::NoEnvelope);
        }
        let (signature, seq_bytes) = envelope.split_at(MAC_LEN);
        let mut mac = self.base.clone();
        mac.update(&[self.direction]);
        mac.update(seq_bytes);
        for part in body {
            mac.update(part);
        }
        if mac.verify_slice(signature).is_err() {
            return Err(Refused::BadSignature(self.seq));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(seq_bytes);
        let got = u64::from_be_bytes(seq);
        if got != self.seq {
            return Err(Refused::OutOfSequence {
                got,
                expected: self.seq,
            });
        }
        self.seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Signer, Verifier) {
        let key = session_key(&Key::generate(), "pool-nonce", "worker-nonce");
        (Signer::new(&key, TO_POOL), Verifier::new(&key, TO_POOL))
    }

    #[test]
    fn genuine_messages_in_order_pass() {
        let (mut signer, mut verifier) = pair();
        for body in [&b"first"[..], b"", b"third"] {
            let envelope = signer.envelope(&[body]);
            assert_eq!(verifier.check(&envelope, &[body]), Ok(()));
        }
    }

    #[test]
    fn a_body_split_differently_signs_the_same() {
        let (mut signer, mut verifier) = pair();
        let envelope = signer.envelope(&[b"head", b"attachment"]);
        assert_eq!(verifier.check(&envelope, &[b"headattachment"]), Ok(()));
    }

    #[test]
    fn replays_tampering_and_reflection_fail() {
        let (mut signer, mut verifier) = pair();
        let first = signer.envelope(&[b"one"]);
        assert_eq!(verifier.check(&first, &[b"one"]), Ok(()));
        assert_eq!(
            verifier.check(&first, &[b"one"]),
            Err(Refused::OutOfSequence {
                got: 0,
                expected: 1
            })
        );
        let second = signer.envelope(&[b"two"]);
        assert_eq!(
            verifier.check(&second, &[b"tw0"]),
            Err(Refused::BadSignature(1))
        );
        assert_eq!(
            verifier.check(&second[..10], &[b"two"]),
            Err(Refused::NoEnvelope)
        );
        // The same session key in the other direction: a reflected message fails.
        let key = session_key(&Key::generate(), "p", "w");
        let mut to_worker = Signer::new(&key, TO_WORKER);
        let mut at_pool = Verifier::new(&key, TO_POOL);
        let envelope = to_worker.envelope(&[b"x"]);
        assert_eq!(
            at_pool.check(&envelope, &[b"x"]),
            Err(Refused::BadSignature(0))
        );
    }

    #[test]
    fn another_connection_has_another_key() {
        let key = Key::generate();
        assert_ne!(session_key(&key, "a", "b"), session_key(&key, "a", "c"));
        assert_ne!(session_key(&key, "a", "b"), session_key(&key, "c", "b"));
    }

    #[test]
    fn keys_parse_from_hex_and_hide_in_debug() {
        let key = Key::generate();
        assert_eq!(
            Key::from_hex(&format!(" {}\n", key.to_hex())),
            Ok(key.clone())
        );
        assert_eq!(Key::from_hex("zz"), Err(KeyError::NotHex));
        assert_eq!(Key::from_hex("00ff"), Err(KeyError::TooShort(2)));
        assert_eq!(format!("{key:?}"), "Key(..)");
    }
}
