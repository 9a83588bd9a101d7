//! Contact cards: `tidings:` URIs that carry an account key, its devices and home relays.
//!
//! Encoding: `tidings:` followed by base58 of (prost `ContactCard` ‖ first 4 bytes of
//! SHA-256 over it). The checksum catches typos and truncated copies.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::identity::{AccountId, DeviceCertificate, IdentityError};
use crate::limits::{MAX_CARD_URI, MAX_DEVICES, MAX_NAME, MAX_RELAY_ADDR, MAX_RELAYS};
use crate::pb;

pub const URI_SCHEME: &str = "tidings:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CardError {
    #[error("not a tidings: URI")]
    Scheme,
    #[error("card is too long")]
    TooLong,
    #[error("card is not valid base58")]
    Base58,
    #[error("card checksum does not match (truncated or mistyped?)")]
    Checksum,
    #[error("card is malformed: {0}")]
    Decode(String),
    #[error("card has too many devices, relays or too long a name")]
    Limits,
    #[error("card identity is invalid: {0}")]
    Identity(#[from] IdentityError),
}

/// A decoded and verified contact card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactCard {
    pub account: AccountId,
    pub name: String,
    pub devices: Vec<DeviceCertificate>,
    pub relays: Vec<String>,
    /// Deposit capabilities for the devices' relay inboxes (see `mailbox`).
    pub capabilities: Vec<pb::Capability>,
}

impl ContactCard {
    pub fn to_uri(&self) -> String {
        let wire = pb::ContactCard {
            account_key: self.account.as_bytes().to_vec(),
            name: self.name.clone(),
            devices: self.devices.iter().map(|d| d.wire().clone()).collect(),
            relays: self.relays.clone(),
            capabilities: self.capabilities.clone(),
        };
        let mut bytes = wire.encode_to_vec();
        let sum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&sum[..4]);
        format!("{URI_SCHEME}{}", bs58::encode(bytes).into_string())
    }

    /// Parses a card URI. Device certificates must be signed by the card's
    /// account; their validity window is not checked here (the DHT record is
    /// the fresh source).
    pub fn from_uri(uri: &str) -> Result<Self, CardError> {
        let uri = uri.trim();
        if uri.len() > MAX_CARD_URI {
            return Err(CardError::TooLong);
        }
        let body = uri.strip_prefix(URI_SCHEME).ok_or(CardError::Scheme)?;
        let bytes = bs58::decode(body).into_vec().map_err(|_| CardError::Base58)?;
        if bytes.len() < 4 {
            return Err(CardError::Checksum);
        }
        let (data, sum) = bytes.split_at(bytes.len() - 4);
        if Sha256::digest(data)[..4] != *sum {
            return Err(CardError::Checksum);
        }
        let wire = pb::ContactCard::decode(data).map_err(|e| CardError::Decode(e.to_string()))?;
        if wire.devices.len() > MAX_DEVICES
            || wire.capabilities.len() > MAX_DEVICES
            || wire.relays.len() > MAX_RELAYS
            || wire.name.len() > MAX_NAME
            || wire.relays.iter().any(|r| r.len() > MAX_RELAY_ADDR)
        {
            return Err(CardError::Limits);
        }
        let account = AccountId::from_bytes(&wire.account_key)?;
        let mut devices = Vec::with_capacity(wire.devices.len());
        for d in &wire.devices {
            let cert = DeviceCertificate::verify_signature(d)?;
            if cert.account != account {
                return Err(CardError::Identity(IdentityError::WrongAccount));
            }
            devices.push(cert);
        }
        Ok(Self {
            account,
            name: wire.name,
            devices,
            relays: wire.relays,
            capabilities: wire.capabilities,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AccountKey, DeviceKey};

    fn card() -> ContactCard {
        let account = AccountKey::from_seed([7; 32]);
        let cert = account.certify_device(&DeviceKey::from_seed([8; 32]).public(), &[9; 32], 0, u64::MAX);
        ContactCard {
            account: account.id(),
            name: "alice".into(),
            devices: vec![cert],
            relays: vec![],
            capabilities: vec![],
        }
    }

    #[test]
    fn card_uri_round_trips() {
        let c = card();
        assert_eq!(ContactCard::from_uri(&c.to_uri()).unwrap(), c);
    }

    #[test]
    fn corrupt_card_uris_are_refused_with_typed_errors() {
        let uri = card().to_uri();
        assert_eq!(ContactCard::from_uri("mailto:x"), Err(CardError::Scheme));
        assert_eq!(ContactCard::from_uri(&uri[..uri.len() - 5]), Err(CardError::Checksum));
        assert_eq!(ContactCard::from_uri("tidings:0OIl"), Err(CardError::Base58));
        let mut flipped: Vec<char> = uri.chars().collect();
        let i = flipped.len() / 2;
        flipped[i] = if flipped[i] == 'a' { 'b' } else { 'a' };
        let flipped: String = flipped.into_iter().collect();
        assert!(ContactCard::from_uri(&flipped).is_err());
        assert_eq!(ContactCard::from_uri(&"x".repeat(10_000)), Err(CardError::TooLong));
        assert_eq!(ContactCard::from_uri("tidings:"), Err(CardError::Checksum));
    }
}
