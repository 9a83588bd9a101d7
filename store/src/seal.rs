//! Secrets at rest under the user's passphrase.
//!
//! The secret rows of a node's database are the identity (its account, device
//! and MLS seeds) and every row of the `mls` table (signature keys, HPKE keys,
//! epoch and message secrets). Without a passphrase they are stored as they
//! are, and the data directory's owner-only permissions are their only guard.
//!
//! With a passphrase:
//!
//! - a random 256-bit *data key* seals each secret row with XChaCha20-Poly1305
//!   (a random 192-bit nonce per write; the row's table and key are the
//!   associated data, so a sealed row cannot be moved to another row);
//! - the data key is itself sealed under a key derived from the passphrase
//!   with Argon2id (random 128-bit salt); the salt, the Argon2 parameters and
//!   the sealed data key are the `seal` row of the `meta` table.
//!
//! A database with a `seal` row opens *locked*: secret rows read as
//! [`StoreError::Locked`] until [`Store::unlock`] is given the passphrase.
//! Changing the passphrase re-seals only the data key; setting or removing it
//! rewrites every secret row, in the same transaction as the `seal` row, so a
//! crash leaves either all rows sealed or none.
//!
//! [`Store::unlock`]: crate::Store::unlock
//! [`StoreError::Locked`]: crate::StoreError::Locked

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{Result, StoreError};

/// The `meta` row that holds the [`SealHeader`].
pub(crate) const SEAL_ROW: &str = "seal";

/// Argon2id memory cost for new passphrases, in KiB (64 MiB; RFC 9106 §4).
const M_KIB: u32 = 64 * 1024;
/// Argon2id passes.
const T_COST: u32 = 3;
/// Argon2id lanes.
const P_LANES: u32 = 1;
/// Stored parameters above these are refused as corrupt: a crafted database
/// must not make the node allocate or spin without bound.
const MAX_M_KIB: u32 = 1024 * 1024;
const MAX_T_COST: u32 = 64;
const MAX_P_LANES: u32 = 16;

/// Shortest passphrase accepted, in characters (a six-digit PIN passes).
pub const MIN_PASSPHRASE_CHARS: usize = 6;
/// Longest passphrase accepted, in bytes.
pub const MAX_PASSPHRASE_BYTES: usize = 1024;

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// What the `seal` row holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SealHeader {
    version: u32,
    m_kib: u32,
    t_cost: u32,
    p_lanes: u32,
    salt: [u8; 16],
    /// `nonce ‖ ciphertext` of the data key under the passphrase key.
    sealed_key: Vec<u8>,
}

/// The key that seals secret rows. Wiped from memory when dropped.
#[derive(Clone)]
pub(crate) struct DataKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|_| StoreError::Randomness)?;
    Ok(b)
}

/// Checks a new passphrase's length.
pub fn check_passphrase(p: &str) -> Result<()> {
    if p.chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(StoreError::WeakPassphrase(format!(
            "a passphrase has at least {MIN_PASSPHRASE_CHARS} characters"
        )));
    }
    if p.len() > MAX_PASSPHRASE_BYTES {
        return Err(StoreError::WeakPassphrase(format!(
            "a passphrase has at most {MAX_PASSPHRASE_BYTES} bytes"
        )));
    }
    Ok(())
}

fn seal_with(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
    let nonce = random::<NONCE_LEN>()?;
    let cipher = XChaCha20Poly1305::new(key.into());
    let ct = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        .map_err(|_| StoreError::Corrupt("sealing failed".into()))?;
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// `None` when the tag does not verify (wrong key, or the bytes were altered).
fn open_with(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
        .ok()
}

impl DataKey {
    pub(crate) fn generate() -> Result<Self> {
        Ok(Self(Zeroizing::new(random::<32>()?)))
    }

    /// Seals the value of the row named by `aad`.
    pub(crate) fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        seal_with(&self.0, aad, plain)
    }

    /// Opens a sealed row; altered bytes or a row moved from elsewhere are corrupt.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        open_with(&self.0, aad, sealed).ok_or_else(|| StoreError::Corrupt("a sealed row does not verify".into()))
    }
}

impl SealHeader {
    /// Seals `key` under `passphrase` with a fresh salt.
    pub(crate) fn new(passphrase: &str, key: &DataKey) -> Result<Self> {
        let mut header = SealHeader {
            version: 1,
            m_kib: M_KIB,
            t_cost: T_COST,
            p_lanes: P_LANES,
            salt: random::<16>()?,
            sealed_key: Vec::new(),
        };
        let kek = header.derive(passphrase)?;
        header.sealed_key = seal_with(&kek, b"tidings/seal/v1", key.0.as_slice())?;
        Ok(header)
    }

    /// The data key, if `passphrase` is the right one.
    pub(crate) fn unseal(&self, passphrase: &str) -> Result<DataKey> {
        let kek = self.derive(passphrase)?;
        let plain =
            Zeroizing::new(open_with(&kek, b"tidings/seal/v1", &self.sealed_key).ok_or(StoreError::WrongPassphrase)?);
        let key: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt("sealed data key has the wrong length".into()))?;
        Ok(DataKey(Zeroizing::new(key)))
    }

    fn derive(&self, passphrase: &str) -> Result<Zeroizing<[u8; 32]>> {
        if self.version != 1 || self.m_kib > MAX_M_KIB || self.t_cost > MAX_T_COST || self.p_lanes > MAX_P_LANES {
            return Err(StoreError::Corrupt("seal parameters out of range".into()));
        }
        let params = Params::new(self.m_kib, self.t_cost, self.p_lanes, Some(32))
            .map_err(|e| StoreError::Corrupt(format!("seal parameters: {e}")))?;
        let mut out = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(passphrase.as_bytes(), &self.salt, out.as_mut_slice())
            .map_err(|e| StoreError::Corrupt(format!("key derivation: {e}")))?;
        Ok(out)
    }
}

/// Whether secret rows are sealed, and with what.
#[derive(Debug)]
pub(crate) enum SealState {
    /// No passphrase: secret rows are stored as they are.
    Plain,
    /// A passphrase is set and has not been given yet.
    Locked,
    /// A passphrase is set and was given.
    Open(DataKey),
}

impl SealState {
    /// The stored form of a secret row's value.
    pub(crate) fn seal(&self, aad: &[u8], plain: Vec<u8>) -> Result<Vec<u8>> {
        match self {
            SealState::Plain => Ok(plain),
            SealState::Locked => Err(StoreError::Locked),
            SealState::Open(k) => k.seal(aad, &plain),
        }
    }

    /// A secret row's value from its stored form.
    pub(crate) fn open(&self, aad: &[u8], stored: &[u8]) -> Result<Vec<u8>> {
        match self {
            SealState::Plain => Ok(stored.to_vec()),
            SealState::Locked => Err(StoreError::Locked),
            SealState::Open(k) => k.open(aad, stored),
        }
    }
}

/// The associated data of an `mls` row.
pub(crate) fn mls_aad(key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(4 + key.len());
    aad.extend_from_slice(b"mls\0");
    aad.extend_from_slice(key);
    aad
}

/// The associated data of the identity row.
pub(crate) const IDENTITY_AAD: &[u8] = b"meta\0identity";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_sealed_for_one_place_does_not_open_in_another() {
        let k = DataKey::generate().unwrap();
        let sealed = k.seal(&mls_aad(b"a"), b"secret").unwrap();
        assert_eq!(k.open(&mls_aad(b"a"), &sealed).unwrap(), b"secret");
        assert!(matches!(k.open(&mls_aad(b"b"), &sealed), Err(StoreError::Corrupt(_))));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(k.open(&mls_aad(b"a"), &flipped), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            k.open(&mls_aad(b"a"), &sealed[..10]),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn the_data_key_opens_only_with_its_passphrase() {
        let k = DataKey::generate().unwrap();
        let h = SealHeader::new("correct horse", &k).unwrap();
        assert_eq!(*h.unseal("correct horse").unwrap().0, *k.0);
        assert!(matches!(h.unseal("correct hors"), Err(StoreError::WrongPassphrase)));
    }

    #[test]
    fn absurd_stored_parameters_are_refused_before_any_work() {
        let k = DataKey::generate().unwrap();
        let mut h = SealHeader::new("correct horse", &k).unwrap();
        h.m_kib = u32::MAX;
        assert!(matches!(h.unseal("correct horse"), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn short_and_huge_passphrases_are_refused() {
        assert!(check_passphrase("12345").is_err());
        assert!(check_passphrase("123456").is_ok());
        assert!(check_passphrase(&"x".repeat(MAX_PASSPHRASE_BYTES + 1)).is_err());
    }
}
