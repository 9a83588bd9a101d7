//! Signed DHT user records.
//!
//! A user record lists an account's device certificates and home relays. It is
//! stored in the DHT under `H("tidings/user" ‖ account key)`, signed by the
//! account key and carries a sequence number: a node believes and stores a
//! record only if its signature verifies, its key matches its account, and its
//! sequence number is not older than what the node already holds.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::identity::{AccountId, AccountKey, DeviceCertificate, IdentityError};
use crate::limits::{MAX_DEVICES, MAX_NAME, MAX_RELAY_ADDR, MAX_RELAYS, MAX_USER_RECORD};
use crate::pb;

const USER_RECORD_CONTEXT: &[u8] = b"tidings/user-record/v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record is larger than {MAX_USER_RECORD} bytes")]
    TooLarge,
    #[error("record is malformed: {0}")]
    Decode(String),
    #[error("record exceeds limits on devices, relays or name")]
    Limits,
    #[error("record is stored under the wrong key")]
    WrongKey,
    #[error("record identity is invalid: {0}")]
    Identity(#[from] IdentityError),
    #[error("record sequence {got} is older than {have}")]
    Stale { got: u64, have: u64 },
}

/// The DHT key of an account's user record.
pub fn user_record_key(account: &AccountId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tidings/user");
    h.update(account.as_bytes());
    h.finalize().into()
}

/// A digest of what a user record says, leaving out its sequence number and
/// time: equal digests mean a republished record would tell nobody anything new.
pub fn user_record_contents_digest(devices: &[DeviceCertificate], relays: &[String], name: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tidings/user-record-contents/v1");
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(&(devices.len() as u64).to_be_bytes());
    for d in devices {
        field(&d.wire().encode_to_vec());
    }
    field(&(relays.len() as u64).to_be_bytes());
    for r in relays {
        field(r.as_bytes());
    }
    field(name.as_bytes());
    h.finalize().into()
}

/// A verified user record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub account: AccountId,
    pub seq: u64,
    pub devices: Vec<DeviceCertificate>,
    pub relays: Vec<String>,
    pub issued_ms: u64,
    pub name: String,
}

impl UserRecord {
    /// Signs a record. The caller supplies the sequence number (strictly increasing).
    pub fn sign(
        key: &AccountKey,
        seq: u64,
        devices: &[DeviceCertificate],
        relays: &[String],
        name: &str,
        issued_ms: u64,
    ) -> Vec<u8> {
        let body = pb::UserRecordBody {
            account_key: key.id().as_bytes().to_vec(),
            seq,
            devices: devices.iter().map(|d| d.wire().clone()).collect(),
            relays: relays.to_vec(),
            issued_ms,
            name: name.to_owned(),
        }
        .encode_to_vec();
        let signature = key.sign(USER_RECORD_CONTEXT, &body);
        pb::SignedUserRecord { body, signature }.encode_to_vec()
    }

    /// Decodes and verifies a record found under DHT key `dht_key`.
    ///
    /// Device certificates whose validity window does not include `now_ms` are
    /// dropped from the result rather than failing the record.
    pub fn verify(bytes: &[u8], dht_key: &[u8], now_ms: u64) -> Result<Self, RecordError> {
        if bytes.len() > MAX_USER_RECORD {
            return Err(RecordError::TooLarge);
        }
        let signed = pb::SignedUserRecord::decode(bytes).map_err(|e| RecordError::Decode(e.to_string()))?;
        let body = pb::UserRecordBody::decode(&signed.body[..]).map_err(|e| RecordError::Decode(e.to_string()))?;
        if body.devices.len() > MAX_DEVICES
            || body.relays.len() > MAX_RELAYS
            || body.name.len() > MAX_NAME
            || body.relays.iter().any(|r| r.len() > MAX_RELAY_ADDR)
        {
            return Err(RecordError::Limits);
        }
        let account = AccountId::from_bytes(&body.account_key)?;
        if user_record_key(&account)[..] != *dht_key {
            return Err(RecordError::WrongKey);
        }
        account.verify(USER_RECORD_CONTEXT, &signed.body, &signed.signature)?;
        let mut devices = Vec::with_capacity(body.devices.len());
        for d in &body.devices {
            match DeviceCertificate::verify(d, now_ms) {
                Ok(cert) if cert.account == account => devices.push(cert),
                Ok(_) => return Err(RecordError::Identity(IdentityError::WrongAccount)),
                Err(IdentityError::Expired) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Self {
            account,
            seq: body.seq,
            devices,
            relays: body.relays,
            issued_ms: body.issued_ms,
            name: body.name,
        })
    }

    /// Verifies `incoming` and accepts it only if it is not older than `existing`.
    /// Equal sequence numbers are accepted only for byte-identical records.
    pub fn verify_replacement(
        incoming: &[u8],
        existing: Option<&[u8]>,
        dht_key: &[u8],
        now_ms: u64,
    ) -> Result<Self, RecordError> {
        let new = Self::verify(incoming, dht_key, now_ms)?;
        if let Some(old_bytes) = existing
            && let Ok(old) = Self::verify(old_bytes, dht_key, now_ms)
            && (new.seq < old.seq || (new.seq == old.seq && incoming != old_bytes))
        {
            return Err(RecordError::Stale {
                got: new.seq,
                have: old.seq,
            });
        }
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceKey;

    fn setup() -> (AccountKey, DeviceCertificate) {
        let a = AccountKey::from_seed([4; 32]);
        let c = a.certify_device(&DeviceKey::from_seed([5; 32]).public(), &[6; 32], 0, 1_000_000);
        (a, c)
    }

    #[test]
    fn record_verifies_under_its_key() {
        let (a, c) = setup();
        let bytes = UserRecord::sign(&a, 1, std::slice::from_ref(&c), &[], "a", 10);
        let key = user_record_key(&a.id());
        let r = UserRecord::verify(&bytes, &key, 100).unwrap();
        assert_eq!(r.devices, vec![c]);
        assert_eq!(r.seq, 1);
    }

    #[test]
    fn contents_digest_changes_with_devices_relays_and_name() {
        let (a, c) = setup();
        let other = a.certify_device(&DeviceKey::from_seed([7; 32]).public(), &[8; 32], 0, 1_000_000);
        let relays = vec!["/ip4/1.2.3.4/tcp/1".to_owned()];
        let base = user_record_contents_digest(std::slice::from_ref(&c), &relays, "a");
        assert_eq!(
            base,
            user_record_contents_digest(std::slice::from_ref(&c), &relays, "a")
        );
        assert_ne!(base, user_record_contents_digest(&[c.clone(), other], &relays, "a"));
        assert_ne!(base, user_record_contents_digest(std::slice::from_ref(&c), &[], "a"));
        assert_ne!(
            base,
            user_record_contents_digest(std::slice::from_ref(&c), &relays, "b")
        );
        // An empty relay address is not the same as no relay and a name moved into it.
        assert_ne!(
            user_record_contents_digest(&[], &[String::new()], "a"),
            user_record_contents_digest(&[], &[], "a")
        );
    }

    #[test]
    fn record_with_bad_signature_is_refused() {
        let (a, c) = setup();
        let bytes = UserRecord::sign(&a, 1, &[c], &[], "a", 10);
        let mut signed = pb::SignedUserRecord::decode(&bytes[..]).unwrap();
        signed.signature[0] ^= 0xff;
        let key = user_record_key(&a.id());
        assert!(matches!(
            UserRecord::verify(&signed.encode_to_vec(), &key, 100),
            Err(RecordError::Identity(IdentityError::BadSignature))
        ));
    }

    #[test]
    fn record_under_wrong_key_is_refused() {
        let (a, c) = setup();
        let bytes = UserRecord::sign(&a, 1, &[c], &[], "a", 10);
        assert_eq!(UserRecord::verify(&bytes, &[0; 32], 100), Err(RecordError::WrongKey));
    }

    #[test]
    fn older_sequence_number_is_refused() {
        let (a, c) = setup();
        let key = user_record_key(&a.id());
        let v1 = UserRecord::sign(&a, 1, std::slice::from_ref(&c), &[], "a", 10);
        let v2 = UserRecord::sign(&a, 2, &[c], &[], "a", 20);
        assert!(UserRecord::verify_replacement(&v2, Some(&v1), &key, 100).is_ok());
        assert_eq!(
            UserRecord::verify_replacement(&v1, Some(&v2), &key, 100),
            Err(RecordError::Stale { got: 1, have: 2 })
        );
    }

    #[test]
    fn expired_devices_are_dropped_from_a_record() {
        let (a, c) = setup();
        let key = user_record_key(&a.id());
        let bytes = UserRecord::sign(&a, 1, &[c], &[], "a", 10);
        assert!(UserRecord::verify(&bytes, &key, 2_000_000).unwrap().devices.is_empty());
    }
}
