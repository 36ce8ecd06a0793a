//! The AUTH step of transports whose peers could be anyone on the machine or network (ipc, zmq):
//! the pool sends CHALLENGE with a fresh nonce; the worker must answer AUTH with the HMAC-SHA256 of
//! the nonce under the per-pool secret, within a deadline, before anything else.

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::{decode, encode, Codec, Message};
use crate::launcher::Channel;

type HmacSha256 = Hmac<Sha256>;

/// A per-pool secret shared with the workers the pool launches (never via argv).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    /// 32 fresh random bytes.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Secret(bytes)
    }

    /// The hex form handed to workers (`PYPOOL_SECRET`).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The raw key.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A fresh random nonce (32 bytes, hex).
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The lowercase hex HMAC-SHA256 of `nonce` under `key`, as a worker computes it.
pub fn mac(key: &[u8], nonce: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(nonce.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a worker's answer in constant time.
pub fn verify(key: &[u8], nonce: &str, answer_hex: &str) -> bool {
    let Ok(answer) = hex::decode(answer_hex) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(nonce.as_bytes());
    mac.verify_slice(&answer).is_ok()
}

/// Why a peer was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No answer within the deadline.
    #[error("no AUTH answer within {0:?}")]
    Timeout(Duration),
    /// The channel failed or closed.
    #[error("channel closed during authentication: {0}")]
    Channel(String),
    /// The first frame was not a valid AUTH message.
    #[error("expected AUTH, got {0}")]
    Unexpected(String),
    /// The MAC was wrong.
    #[error("wrong HMAC: the peer does not know the pool's secret")]
    BadMac,
}

/// Runs the pool's side of AUTH on a fresh channel: CHALLENGE out, a correct AUTH back within
/// `deadline`. Anything else rejects the peer.
pub async fn challenge(
    channel: &mut Channel,
    secret: &Secret,
    deadline: Duration,
) -> Result<(), AuthError> {
    let nonce = new_nonce();
    let body = encode(
        &Message::Challenge {
            nonce: nonce.clone(),
        },
        Codec::Json,
        &[],
    )
    .map_err(|e| AuthError::Channel(e.to_string()))?;
    let exchange = async {
        channel
            .sender
            .send(body)
            .await
            .map_err(|e| AuthError::Channel(e.to_string()))?;
        match channel.receiver.recv().await {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(AuthError::Channel("end of stream".into())),
            Err(e) => Err(AuthError::Channel(e.to_string())),
        }
    };
    let frame = tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| AuthError::Timeout(deadline))??;
    match decode(frame) {
        Ok((Message::Auth { mac }, _)) if verify(secret.as_bytes(), &nonce, &mac) => Ok(()),
        Ok((Message::Auth { .. }, _)) => Err(AuthError::BadMac),
        Ok((other, _)) => Err(AuthError::Unexpected(other.type_name().into())),
        Err(err) => Err(AuthError::Unexpected(format!("a bad frame ({err})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_matches_a_known_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            mac(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verify_accepts_only_the_right_answer() {
        let secret = Secret::generate();
        let nonce = new_nonce();
        let answer = mac(secret.as_bytes(), &nonce);
        assert!(verify(secret.as_bytes(), &nonce, &answer));
        assert!(!verify(secret.as_bytes(), &new_nonce(), &answer));
        assert!(!verify(Secret::generate().as_bytes(), &nonce, &answer));
        assert!(!verify(secret.as_bytes(), &nonce, "not hex"));
        assert_eq!(format!("{secret:?}"), "Secret(..)");
    }
}
