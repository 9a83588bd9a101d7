//! Account keys, device keys and device certificates.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;

use crate::pb;

const DEVICE_CERT_CONTEXT: &[u8] = b"tidings/device-cert/v1";

/// Errors from decoding or verifying identities.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("malformed public key")]
    BadKey,
    #[error("malformed encoding: {0}")]
    Decode(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("certificate expired or not yet valid")]
    Expired,
    #[error("certificate is for another account")]
    WrongAccount,
}

/// The public identity of a person: their account's Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId([u8; 32]);

impl AccountId {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| IdentityError::BadKey)?;
        VerifyingKey::from_bytes(&arr).map_err(|_| IdentityError::BadKey)?;
        Ok(Self(arr))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Base58 text form, as shown to people.
    pub fn to_base58(&self) -> String {
        bs58::encode(self.0).into_string()
    }

    pub fn from_base58(s: &str) -> Result<Self, IdentityError> {
        let bytes = bs58::decode(s)
            .into_vec()
            .map_err(|e| IdentityError::Decode(e.to_string()))?;
        Self::from_bytes(&bytes)
    }

    pub(crate) fn verify(&self, context: &[u8], body: &[u8], sig: &[u8]) -> Result<(), IdentityError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| IdentityError::BadKey)?;
        let sig = Signature::from_slice(sig).map_err(|_| IdentityError::BadSignature)?;
        let mut msg = Vec::with_capacity(context.len() + body.len());
        msg.extend_from_slice(context);
        msg.extend_from_slice(body);
        key.verify_strict(&msg, &sig).map_err(|_| IdentityError::BadSignature)
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({})", self.to_base58())
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base58())
    }
}

/// The secret account key. It signs device certificates and user records.
pub struct AccountKey(SigningKey);

impl AccountKey {
    /// Derives the key from 32 bytes of secret randomness supplied by the caller.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn id(&self) -> AccountId {
        AccountId(self.0.verifying_key().to_bytes())
    }

    pub(crate) fn sign(&self, context: &[u8], body: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(context.len() + body.len());
        msg.extend_from_slice(context);
        msg.extend_from_slice(body);
        self.0.sign(&msg).to_bytes().to_vec()
    }

    /// Certifies a device: its libp2p key and its MLS signature key.
    pub fn certify_device(
        &self,
        device_key: &[u8; 32],
        mls_signature_key: &[u8],
        created_ms: u64,
        expires_ms: u64,
    ) -> DeviceCertificate {
        let body = pb::DeviceCertificateBody {
            account_key: self.id().0.to_vec(),
            device_key: device_key.to_vec(),
            mls_signature_key: mls_signature_key.to_vec(),
            created_ms,
            expires_ms,
        };
        let body_bytes = body.encode_to_vec();
        let signature = self.sign(DEVICE_CERT_CONTEXT, &body_bytes);
        DeviceCertificate {
            account: self.id(),
            device_key: *device_key,
            mls_signature_key: mls_signature_key.to_vec(),
            created_ms,
            expires_ms,
            wire: pb::DeviceCertificate {
                body: body_bytes,
                signature,
            },
        }
    }
}

impl fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountKey({})", self.id())
    }
}

/// A device's secret Ed25519 key. Its public half is the device's libp2p identity.
pub struct DeviceKey([u8; 32]);

impl DeviceKey {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(seed)
    }

    pub fn seed(&self) -> [u8; 32] {
        self.0
    }

    pub fn public(&self) -> [u8; 32] {
        SigningKey::from_bytes(&self.0).verifying_key().to_bytes()
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

/// A verified device certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceCertificate {
    pub account: AccountId,
    pub device_key: [u8; 32],
    pub mls_signature_key: Vec<u8>,
    pub created_ms: u64,
    pub expires_ms: u64,
    wire: pb::DeviceCertificate,
}

impl DeviceCertificate {
    /// Verifies a certificate from the wire. `now_ms` is checked against its validity window.
    pub fn verify(wire: &pb::DeviceCertificate, now_ms: u64) -> Result<Self, IdentityError> {
        let cert = Self::verify_signature(wire)?;
        if now_ms < cert.created_ms.saturating_sub(CLOCK_SKEW_MS) || now_ms > cert.expires_ms {
            return Err(IdentityError::Expired);
        }
        Ok(cert)
    }

    /// Verifies only the signature, not the validity window (for history display).
    pub fn verify_signature(wire: &pb::DeviceCertificate) -> Result<Self, IdentityError> {
        let cert = Self::parse(wire.clone())?;
        VerifyingKey::from_bytes(&cert.device_key).map_err(|_| IdentityError::BadKey)?;
        cert.account.verify(DEVICE_CERT_CONTEXT, &wire.body, &wire.signature)?;
        Ok(cert)
    }

    /// Decodes the body and checks the keys' lengths; no signature check.
    fn parse(wire: pb::DeviceCertificate) -> Result<Self, IdentityError> {
        let body =
            pb::DeviceCertificateBody::decode(&wire.body[..]).map_err(|e| IdentityError::Decode(e.to_string()))?;
        let account = AccountId::from_bytes(&body.account_key)?;
        let device_key: [u8; 32] = body
            .device_key
            .as_slice()
            .try_into()
            .map_err(|_| IdentityError::BadKey)?;
        if body.mls_signature_key.len() != 32 {
            return Err(IdentityError::BadKey);
        }
        Ok(Self {
            account,
            device_key,
            mls_signature_key: body.mls_signature_key,
            created_ms: body.created_ms,
            expires_ms: body.expires_ms,
            wire,
        })
    }

    /// Decodes a certificate whose signature was verified before (one taken
    /// from our own group state, checked when its member entered). Checks the
    /// keys' shapes but not the account's signature.
    pub fn from_trusted_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        Self::parse(pb::DeviceCertificate::decode(bytes).map_err(|e| IdentityError::Decode(e.to_string()))?)
    }

    /// Decodes and verifies the signature of an encoded certificate.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        let wire = pb::DeviceCertificate::decode(bytes).map_err(|e| IdentityError::Decode(e.to_string()))?;
        Self::verify_signature(&wire)
    }

    pub fn wire(&self) -> &pb::DeviceCertificate {
        &self.wire
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.wire.encode_to_vec()
    }
}

impl fmt::Debug for DeviceCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCertificate")
            .field("account", &self.account)
            .field("device_key", &bs58::encode(self.device_key).into_string())
            .field("expires_ms", &self.expires_ms)
            .finish()
    }
}

/// Clock skew tolerated when checking a certificate's start time.
pub const CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_round_trips_and_verifies() {
        let account = AccountKey::from_seed([1; 32]);
        let device = DeviceKey::from_seed([2; 32]);
        let cert = account.certify_device(&device.public(), &[3; 32], 1_000, 10_000);
        let back = DeviceCertificate::from_bytes(&cert.to_bytes()).unwrap();
        assert_eq!(back, cert);
        assert!(DeviceCertificate::verify(cert.wire(), 5_000).is_ok());
        assert_eq!(
            DeviceCertificate::verify(cert.wire(), 20_000),
            Err(IdentityError::Expired)
        );
    }

    #[test]
    fn tampered_certificate_is_refused() {
        let account = AccountKey::from_seed([1; 32]);
        let cert = account.certify_device(&DeviceKey::from_seed([2; 32]).public(), &[3; 32], 0, 10);
        let mut wire = cert.wire().clone();
        let last = wire.body.len() - 1;
        wire.body[last] ^= 1;
        assert!(DeviceCertificate::verify_signature(&wire).is_err());
    }
}
