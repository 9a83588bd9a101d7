//! Linking a new device to an account: the code an existing device shows, and
//! the proof the new device gives that it read it.
//!
//! The code names the existing device (its PeerId and addresses) and holds a
//! one-time secret. The new device connects to it (Noise authenticates the
//! existing device by its PeerId) and proves knowledge of the secret with an
//! HMAC over its own keys, so the existing device certifies exactly the keys
//! of whoever read the code.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::pb;

/// Prefix of a link code.
pub const LINK_SCHEME: &str = "tidings-link:";
/// Longest link code accepted, in characters.
pub const MAX_LINK_CODE: usize = 2048;
/// How long a link code is valid.
pub const LINK_VALIDITY_MS: u64 = 5 * 60 * 1000;

const PROOF_CONTEXT: &[u8] = b"tidings link v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("not a tidings-link: code")]
    Scheme,
    #[error("the link code is malformed")]
    Malformed,
    #[error("the link code has expired")]
    Expired,
}

/// A decoded link code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkCode {
    pub peer_id: Vec<u8>,
    pub addrs: Vec<String>,
    pub secret: [u8; 16],
    pub expires_ms: u64,
}

impl LinkCode {
    pub fn to_text(&self) -> String {
        let bytes = pb::LinkCode {
            peer_id: self.peer_id.clone(),
            addrs: self.addrs.clone(),
            secret: self.secret.to_vec(),
            expires_ms: self.expires_ms,
        }
        .encode_to_vec();
        format!("{LINK_SCHEME}{}", bs58::encode(bytes).into_string())
    }

    /// Parses a code and checks that it is still valid at `now_ms`.
    pub fn parse(text: &str, now_ms: u64) -> Result<Self, LinkError> {
        let text = text.trim();
        if text.len() > MAX_LINK_CODE {
            return Err(LinkError::Malformed);
        }
        let rest = text.strip_prefix(LINK_SCHEME).ok_or(LinkError::Scheme)?;
        let bytes = bs58::decode(rest).into_vec().map_err(|_| LinkError::Malformed)?;
        let c = pb::LinkCode::decode(bytes.as_slice()).map_err(|_| LinkError::Malformed)?;
        let secret = c.secret.as_slice().try_into().map_err(|_| LinkError::Malformed)?;
        if c.peer_id.is_empty() || c.addrs.is_empty() || c.addrs.len() > 16 {
            return Err(LinkError::Malformed);
        }
        if now_ms > c.expires_ms {
            return Err(LinkError::Expired);
        }
        Ok(Self {
            peer_id: c.peer_id,
            addrs: c.addrs,
            secret,
            expires_ms: c.expires_ms,
        })
    }
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; 64];
    k[..key.len().min(64)].copy_from_slice(&key[..key.len().min(64)]);
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The new device's proof that it read the code.
pub fn link_proof(secret: &[u8; 16], device_key: &[u8], mls_signature_key: &[u8]) -> [u8; 32] {
    hmac_sha256(secret, &[PROOF_CONTEXT, device_key, mls_signature_key])
}

/// Checks a proof in constant time.
pub fn verify_link_proof(secret: &[u8; 16], device_key: &[u8], mls_signature_key: &[u8], proof: &[u8]) -> bool {
    let want = link_proof(secret, device_key, mls_signature_key);
    proof.len() == want.len() && proof.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_round_trips_and_expires() {
        let c = LinkCode {
            peer_id: vec![1, 2, 3],
            addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            secret: [7; 16],
            expires_ms: 1000,
        };
        assert_eq!(LinkCode::parse(&c.to_text(), 999).unwrap(), c);
        assert_eq!(LinkCode::parse(&c.to_text(), 1001), Err(LinkError::Expired));
        assert_eq!(LinkCode::parse("tidings:abc", 0), Err(LinkError::Scheme));
        assert_eq!(LinkCode::parse("tidings-link:0OIl", 0), Err(LinkError::Malformed));
    }

    #[test]
    fn proof_binds_the_secret_and_both_keys() {
        let p = link_proof(&[1; 16], b"device", b"mls");
        assert!(verify_link_proof(&[1; 16], b"device", b"mls", &p));
        assert!(!verify_link_proof(&[2; 16], b"device", b"mls", &p));
        assert!(!verify_link_proof(&[1; 16], b"other", b"mls", &p));
        assert!(!verify_link_proof(&[1; 16], b"device", b"other", &p));
        assert!(!verify_link_proof(&[1; 16], b"device", b"mls", &p[..31]));
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
