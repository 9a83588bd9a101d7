//! `/tidings/mailbox/1` helpers: inbox ids, owner authentication, deposit
//! capabilities, custody receipts and the request-inbox proof of work.
//!
//! An inbox is addressed by `H("tidings/inbox/v1" ‖ owner key)`. The owner proves
//! itself on every fetch, ack, subscribe or key-package upload with an
//! [`pb::OwnerAuth`]: a signature over the operation, the inbox, a timestamp, a
//! fresh nonce and the operation's argument. Others deposit into the normal inbox
//! with a [`pb::Capability`] signed by the owner, or into the request inbox with
//! proof of work. A relay that accepts an envelope answers with a signed
//! [`pb::CustodyReceipt`].
//!
//! Nothing here reads a clock or draws randomness: the caller passes `now_ms` and
//! nonces. Replay detection (remembering nonces) is the relay store's job.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::pb;

const INBOX_CONTEXT: &[u8] = b"tidings/inbox/v1";
const AUTH_CONTEXT: &[u8] = b"tidings/mailbox-auth/v2";
const CAPABILITY_CONTEXT: &[u8] = b"tidings/mailbox-cap/v1";
const CUSTODY_CONTEXT: &[u8] = b"tidings/custody/v1";
const POW_CONTEXT: &[u8] = b"tidings/pow/v1";

/// How far an [`pb::OwnerAuth`] timestamp may be from the relay's clock, either way.
pub const AUTH_WINDOW_MS: u64 = 60_000;
/// Length of an [`pb::OwnerAuth`] nonce, in bytes.
pub const AUTH_NONCE_LEN: usize = 16;
/// Longest proof-of-work nonce [`pow_ok`] accepts, in bytes.
pub const MAX_POW_NONCE: usize = 16;
/// Proof-of-work difficulty a relay asks for on request-inbox deposits by default.
pub const DEFAULT_POW_BITS: u32 = 16;
/// Most deposits in one [`pb::DepositBatch`]; a relay refuses a longer batch
/// whole with [`MailboxError::BadRequest`].
pub const MAX_DEPOSITS_PER_BATCH: usize = 64;

/// Why a mailbox request was refused. The `Display` form is the error code a
/// sender sees (see [`MailboxError::code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    /// Bad signature, wrong key, or a missing or bad capability.
    #[error("unauthorized")]
    Unauthorized,
    /// The auth nonce was seen before.
    #[error("replayed")]
    Replayed,
    /// The auth timestamp is outside [`AUTH_WINDOW_MS`] of the relay's clock.
    #[error("stale")]
    Stale,
    /// The inbox or relay is full.
    #[error("quota_exceeded")]
    QuotaExceeded,
    /// The request or envelope is larger than allowed.
    #[error("too_large")]
    TooLarge,
    /// The deposit capability has expired.
    #[error("expired")]
    Expired,
    /// The request-inbox proof of work is missing or too weak.
    #[error("insufficient_work")]
    InsufficientWork,
    /// Too many requests; try again later.
    #[error("rate_limited")]
    RateLimited,
    /// The request is malformed.
    #[error("bad_request")]
    BadRequest,
    /// Nothing to return, e.g. no key package to claim.
    #[error("not_found")]
    NotFound,
    /// The relay cannot commit right now.
    #[error("unavailable")]
    Unavailable,
}

impl MailboxError {
    /// Every variant, in wire order.
    pub const ALL: [Self; 11] = [
        Self::Unauthorized,
        Self::Replayed,
        Self::Stale,
        Self::QuotaExceeded,
        Self::TooLarge,
        Self::Expired,
        Self::InsufficientWork,
        Self::RateLimited,
        Self::BadRequest,
        Self::NotFound,
        Self::Unavailable,
    ];

    /// The wire status for this error.
    pub fn status(self) -> pb::MailboxStatus {
        match self {
            Self::Unauthorized => pb::MailboxStatus::Unauthorized,
            Self::Replayed => pb::MailboxStatus::Replayed,
            Self::Stale => pb::MailboxStatus::Stale,
            Self::QuotaExceeded => pb::MailboxStatus::QuotaExceeded,
            Self::TooLarge => pb::MailboxStatus::TooLarge,
            Self::Expired => pb::MailboxStatus::Expired,
            Self::InsufficientWork => pb::MailboxStatus::InsufficientWork,
            Self::RateLimited => pb::MailboxStatus::RateLimited,
            Self::BadRequest => pb::MailboxStatus::BadRequest,
            Self::NotFound => pb::MailboxStatus::NotFound,
            Self::Unavailable => pb::MailboxStatus::Unavailable,
        }
    }

    /// The error a wire status stands for; `None` for `OK` and `UNSPECIFIED`.
    pub fn from_status(s: pb::MailboxStatus) -> Option<Self> {
        Some(match s {
            pb::MailboxStatus::Unspecified | pb::MailboxStatus::Ok => return None,
            pb::MailboxStatus::Unauthorized => Self::Unauthorized,
            pb::MailboxStatus::Replayed => Self::Replayed,
            pb::MailboxStatus::Stale => Self::Stale,
            pb::MailboxStatus::QuotaExceeded => Self::QuotaExceeded,
            pb::MailboxStatus::TooLarge => Self::TooLarge,
            pb::MailboxStatus::Expired => Self::Expired,
            pb::MailboxStatus::InsufficientWork => Self::InsufficientWork,
            pb::MailboxStatus::RateLimited => Self::RateLimited,
            pb::MailboxStatus::BadRequest => Self::BadRequest,
            pb::MailboxStatus::NotFound => Self::NotFound,
            pb::MailboxStatus::Unavailable => Self::Unavailable,
        })
    }

    /// The short error code shown to senders, e.g. `"quota_exceeded"`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Replayed => "replayed",
            Self::Stale => "stale",
            Self::QuotaExceeded => "quota_exceeded",
            Self::TooLarge => "too_large",
            Self::Expired => "expired",
            Self::InsufficientWork => "insufficient_work",
            Self::RateLimited => "rate_limited",
            Self::BadRequest => "bad_request",
            Self::NotFound => "not_found",
            Self::Unavailable => "unavailable",
        }
    }
}

/// The inbox id of an owner key: `SHA-256("tidings/inbox/v1" ‖ owner_key)`.
pub fn inbox_id(owner_key: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(INBOX_CONTEXT);
    h.update(owner_key);
    h.finalize().into()
}

/// An owner operation covered by an [`pb::OwnerAuth`] signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Fetch envelopes; the argument is `after_index`.
    Fetch = 1,
    /// Delete envelopes; the argument is `up_to_index`.
    Ack = 2,
    /// Ask for pushes while connected; the argument is `after_index`.
    Subscribe = 3,
    /// Upload key packages; the argument is the number of key packages.
    PublishKeyPackages = 4,
}

/// The bytes an [`pb::OwnerAuth`] signs: `"tidings/mailbox-auth/v2" ‖ op ‖ relay length (1
/// byte) ‖ relay ‖ inbox_id ‖ timestamp_ms (BE) ‖ nonce ‖ argument (BE)`, where `relay` is the
/// peer id (bytes) of the relay the request is for. Naming the relay keeps one of a person's
/// relays from replaying their requests to another: a Subscribe or an Ack replayed there would
/// hand it their mail on that relay, or delete it. Relay ids longer than 255 bytes are cut there.
pub fn auth_message(op: Op, relay: &[u8], inbox_id: &[u8], timestamp_ms: u64, nonce: &[u8], argument: u64) -> Vec<u8> {
    let relay = &relay[..relay.len().min(usize::from(u8::MAX))];
    let mut msg = Vec::with_capacity(AUTH_CONTEXT.len() + 2 + relay.len() + inbox_id.len() + 8 + nonce.len() + 8);
    msg.extend_from_slice(AUTH_CONTEXT);
    msg.push(op as u8);
    msg.push(relay.len() as u8);
    msg.extend_from_slice(relay);
    msg.extend_from_slice(inbox_id);
    msg.extend_from_slice(&timestamp_ms.to_be_bytes());
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(&argument.to_be_bytes());
    msg
}

/// Signs an owner operation on relay `relay` (its peer id, as bytes) with the owner's Ed25519
/// secret seed (e.g. a device key seed). `nonce` must be fresh randomness supplied by the caller.
pub fn sign_auth(
    owner_seed: &[u8; 32],
    op: Op,
    relay: &[u8],
    inbox_id: &[u8],
    timestamp_ms: u64,
    nonce: [u8; 16],
    argument: u64,
) -> pb::OwnerAuth {
    AuthSigner::from_seed(owner_seed).sign(op, relay, inbox_id, timestamp_ms, nonce, argument)
}

/// An owner key ready to sign [`pb::OwnerAuth`]s: [`sign_auth`] without
/// deriving the public key from the seed at every request.
#[derive(Clone)]
pub struct AuthSigner {
    key: SigningKey,
}

impl AuthSigner {
    pub fn from_seed(owner_seed: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(owner_seed),
        }
    }

    /// As [`sign_auth`] with this signer's seed.
    pub fn sign(
        &self,
        op: Op,
        relay: &[u8],
        inbox_id: &[u8],
        timestamp_ms: u64,
        nonce: [u8; 16],
        argument: u64,
    ) -> pb::OwnerAuth {
        let signature = self
            .key
            .sign(&auth_message(op, relay, inbox_id, timestamp_ms, &nonce, argument));
        pb::OwnerAuth {
            owner_key: self.key.verifying_key().to_bytes().to_vec(),
            timestamp_ms,
            nonce: nonce.to_vec(),
            signature: signature.to_bytes().to_vec(),
        }
    }
}

/// Verifies an owner's proof for `op` on `inbox_id` with `argument`, at relay time `now_ms`.
///
/// Returns the nonce; the caller must refuse it with [`MailboxError::Replayed`] if it
/// was seen within the last [`AUTH_WINDOW_MS`] either way.
pub fn verify_auth(
    auth: &pb::OwnerAuth,
    op: Op,
    relay: &[u8],
    inbox_id: &[u8],
    argument: u64,
    now_ms: u64,
) -> Result<[u8; 16], MailboxError> {
    let (owner_key, key) = parse_key(&auth.owner_key)?;
    if self::inbox_id(&owner_key)[..] != *inbox_id {
        return Err(MailboxError::Unauthorized);
    }
    let nonce: [u8; AUTH_NONCE_LEN] = auth.nonce[..].try_into().map_err(|_| MailboxError::BadRequest)?;
    if auth.timestamp_ms.abs_diff(now_ms) > AUTH_WINDOW_MS {
        return Err(MailboxError::Stale);
    }
    let msg = auth_message(op, relay, inbox_id, auth.timestamp_ms, &nonce, argument);
    verify_signature(&key, &msg, &auth.signature)?;
    Ok(nonce)
}

/// What a verified deposit capability says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapabilityInfo {
    /// The inbox owner's Ed25519 public key, which signed the capability.
    pub owner_key: [u8; 32],
    /// Last millisecond at which the capability is valid.
    pub expires_ms: u64,
    /// The account the capability was issued to, if the owner named one.
    pub holder: Option<[u8; 32]>,
}

/// Issues a capability to deposit into the inbox of the owner whose secret seed is
/// `owner_seed`, valid until `expires_ms`, optionally naming its `holder`.
pub fn issue_capability(owner_seed: &[u8; 32], expires_ms: u64, holder: Option<&[u8; 32]>) -> pb::Capability {
    let key = SigningKey::from_bytes(owner_seed);
    let owner_key = key.verifying_key().to_bytes();
    let body = pb::CapabilityBody {
        inbox_id: inbox_id(&owner_key).to_vec(),
        owner_key: owner_key.to_vec(),
        expires_ms,
        holder: holder.map(|h| h.to_vec()).unwrap_or_default(),
    }
    .encode_to_vec();
    let signature = key.sign(&with_context(CAPABILITY_CONTEXT, &body)).to_bytes().to_vec();
    pb::Capability { body, signature }
}

/// Verifies a deposit capability for `inbox_id` at relay time `now_ms`.
pub fn verify_capability(cap: &pb::Capability, inbox_id: &[u8], now_ms: u64) -> Result<CapabilityInfo, MailboxError> {
    let (inbox, info) = verify_capability_signature(cap)?;
    if inbox[..] != *inbox_id {
        return Err(MailboxError::Unauthorized);
    }
    if now_ms > info.expires_ms {
        return Err(MailboxError::Expired);
    }
    Ok(info)
}

/// Checks everything about a deposit capability that does not depend on the
/// deposit or the time: its body decodes, its owner key is a valid Ed25519 key
/// whose inbox id the body names, and the owner's signature verifies. Returns
/// the inbox it grants and what it says.
///
/// A relay may remember the answer for the capability's exact bytes; every use
/// must still check the inbox and the expiry, as [`verify_capability`] does.
pub fn verify_capability_signature(cap: &pb::Capability) -> Result<([u8; 32], CapabilityInfo), MailboxError> {
    let body = pb::CapabilityBody::decode(&cap.body[..]).map_err(|_| MailboxError::Unauthorized)?;
    let (owner_key, key) = parse_key(&body.owner_key)?;
    let inbox = self::inbox_id(&owner_key);
    if body.inbox_id != inbox[..] {
        return Err(MailboxError::Unauthorized);
    }
    verify_signature(&key, &with_context(CAPABILITY_CONTEXT, &cap.body), &cap.signature)?;
    let holder = match body.holder.len() {
        0 => None,
        _ => Some(body.holder[..].try_into().map_err(|_| MailboxError::Unauthorized)?),
    };
    Ok((
        inbox,
        CapabilityInfo {
            owner_key,
            expires_ms: body.expires_ms,
            holder,
        },
    ))
}

/// The SHA-256 of an envelope's bytes, as named in custody receipts.
pub fn envelope_hash(envelope: &[u8]) -> [u8; 32] {
    Sha256::digest(envelope).into()
}

/// A relay's promise to keep an envelope (the body of a [`pb::CustodyReceipt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The relay's Ed25519 device key (its PeerId), which signed the receipt.
    pub relay_key: [u8; 32],
    /// The inbox the envelope was deposited into.
    pub inbox_id: [u8; 32],
    /// Whether it went to the owner's request inbox.
    pub request_inbox: bool,
    /// [`envelope_hash`] of the deposited envelope.
    pub envelope_hash: [u8; 32],
    /// The envelope's index in the inbox.
    pub index: u64,
    /// When the relay accepted it.
    pub accepted_ms: u64,
    /// Until when the relay promises to keep it.
    pub keep_until_ms: u64,
}

/// Signs a custody receipt with the relay's secret seed. The receipt's `relay_key`
/// is always the seed's public key; `r.relay_key` is ignored.
pub fn sign_receipt(relay_seed: &[u8; 32], r: &Receipt) -> pb::CustodyReceipt {
    ReceiptSigner::new(relay_seed).sign(r)
}

/// A relay's receipt-signing key, expanded once (deriving the key from the seed
/// costs about as much as a signature). Signs exactly like [`sign_receipt`].
#[derive(Clone)]
pub struct ReceiptSigner {
    key: SigningKey,
    public: [u8; 32],
}

impl std::fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptSigner")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl ReceiptSigner {
    /// The signer for the relay whose secret seed is `relay_seed`.
    pub fn new(relay_seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(relay_seed);
        let public = key.verifying_key().to_bytes();
        Self { key, public }
    }

    /// The relay key every receipt names.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Signs a custody receipt; `r.relay_key` is ignored (see [`sign_receipt`]).
    pub fn sign(&self, r: &Receipt) -> pb::CustodyReceipt {
        let body = pb::CustodyReceiptBody {
            relay_key: self.public.to_vec(),
            inbox_id: r.inbox_id.to_vec(),
            request_inbox: r.request_inbox,
            envelope_hash: r.envelope_hash.to_vec(),
            index: r.index,
            accepted_ms: r.accepted_ms,
            keep_until_ms: r.keep_until_ms,
        }
        .encode_to_vec();
        let signature = self.key.sign(&with_context(CUSTODY_CONTEXT, &body)).to_bytes().to_vec();
        pb::CustodyReceipt { body, signature }
    }
}

/// Verifies a custody receipt's signature by the relay key it names.
///
/// The caller must still check that `relay_key` is the relay it deposited to and
/// that `inbox_id` and `envelope_hash` match what it sent.
pub fn verify_receipt(wire: &pb::CustodyReceipt) -> Result<Receipt, MailboxError> {
    let body = pb::CustodyReceiptBody::decode(&wire.body[..]).map_err(|_| MailboxError::BadRequest)?;
    let (relay_key, key) = parse_key(&body.relay_key)?;
    verify_signature(&key, &with_context(CUSTODY_CONTEXT, &wire.body), &wire.signature)?;
    Ok(Receipt {
        relay_key,
        inbox_id: body.inbox_id[..].try_into().map_err(|_| MailboxError::BadRequest)?,
        request_inbox: body.request_inbox,
        envelope_hash: body.envelope_hash[..]
            .try_into()
            .map_err(|_| MailboxError::BadRequest)?,
        index: body.index,
        accepted_ms: body.accepted_ms,
        keep_until_ms: body.keep_until_ms,
    })
}

/// Whether `nonce` is enough proof of work to deposit `envelope` into the request
/// inbox `inbox_id`: `SHA-256("tidings/pow/v1" ‖ inbox_id ‖ SHA-256(envelope) ‖ nonce)`
/// must start with at least `difficulty_bits` zero bits. Nonces longer than
/// [`MAX_POW_NONCE`] bytes are refused.
pub fn pow_ok(inbox_id: &[u8], envelope: &[u8], nonce: &[u8], difficulty_bits: u32) -> bool {
    if nonce.len() > MAX_POW_NONCE {
        return false;
    }
    let mut h = pow_prefix(inbox_id, &envelope_hash(envelope));
    h.update(nonce);
    leading_zero_bits(&h.finalize()) >= difficulty_bits
}

/// Finds a nonce that satisfies [`pow_ok`] by trying an 8-byte little-endian counter
/// from zero. Deterministic; expected work is `2^difficulty_bits` hashes. For
/// difficulties above 256 bits no nonce exists and a nonce that fails is returned.
pub fn solve_pow(inbox_id: &[u8], envelope: &[u8], difficulty_bits: u32) -> Vec<u8> {
    if difficulty_bits > 256 {
        return 0u64.to_le_bytes().to_vec();
    }
    let prefix = pow_prefix(inbox_id, &envelope_hash(envelope));
    let mut counter: u64 = 0;
    loop {
        let nonce = counter.to_le_bytes();
        let mut h = prefix.clone();
        h.update(nonce);
        if leading_zero_bits(&h.finalize()) >= difficulty_bits || counter == u64::MAX {
            return nonce.to_vec();
        }
        counter += 1;
    }
}

fn pow_prefix(inbox_id: &[u8], envelope_hash: &[u8; 32]) -> Sha256 {
    let mut h = Sha256::new();
    h.update(POW_CONTEXT);
    h.update(inbox_id);
    h.update(envelope_hash);
    h
}

fn leading_zero_bits(digest: &[u8]) -> u32 {
    let mut bits = 0;
    for &b in digest {
        bits += b.leading_zeros();
        if b != 0 {
            break;
        }
    }
    bits
}

fn with_context(context: &[u8], body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(context.len() + body.len());
    msg.extend_from_slice(context);
    msg.extend_from_slice(body);
    msg
}

/// Parses a 32-byte Ed25519 public key; anything else is `Unauthorized`.
fn parse_key(bytes: &[u8]) -> Result<([u8; 32], VerifyingKey), MailboxError> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| MailboxError::Unauthorized)?;
    let key = VerifyingKey::from_bytes(&arr).map_err(|_| MailboxError::Unauthorized)?;
    Ok((arr, key))
}

fn verify_signature(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> Result<(), MailboxError> {
    let sig = Signature::from_slice(sig).map_err(|_| MailboxError::Unauthorized)?;
    key.verify_strict(msg, &sig).map_err(|_| MailboxError::Unauthorized)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: [u8; 32] = [7; 32];
    const OTHER: [u8; 32] = [8; 32];
    const RELAY: [u8; 32] = [9; 32];
    const NOW: u64 = 1_700_000_000_000;

    fn public(seed: &[u8; 32]) -> [u8; 32] {
        SigningKey::from_bytes(seed).verifying_key().to_bytes()
    }

    fn owner_inbox() -> [u8; 32] {
        inbox_id(&public(&OWNER))
    }

    /// A simple deterministic byte generator (SHA-256 in counter mode).
    struct Bytes(u64);

    impl Bytes {
        fn next<const N: usize>(&mut self) -> [u8; N] {
            let mut out = [0; N];
            for chunk in out.chunks_mut(32) {
                self.0 += 1;
                let d = Sha256::digest(self.0.to_le_bytes());
                chunk.copy_from_slice(&d[..chunk.len()]);
            }
            out
        }
    }

    #[test]
    fn inbox_id_is_hash_of_context_and_key() {
        let key = public(&OWNER);
        let mut h = Sha256::new();
        h.update(b"tidings/inbox/v1");
        h.update(key);
        assert_eq!(inbox_id(&key), <[u8; 32]>::from(h.finalize()));
        assert_ne!(inbox_id(&key), inbox_id(&public(&OTHER)));
    }

    #[test]
    fn auth_message_layout() {
        let m = auth_message(Op::Ack, &[0xcc; 3], &[0xaa; 32], 0x0102, &[0xbb; 16], 0x0304);
        let mut want = b"tidings/mailbox-auth/v2".to_vec();
        want.push(2);
        want.extend_from_slice(&[3, 0xcc, 0xcc, 0xcc]);
        want.extend_from_slice(&[0xaa; 32]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        want.extend_from_slice(&[0xbb; 16]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 3, 4]);
        assert_eq!(m, want);
    }

    #[test]
    fn signed_auth_verifies_and_returns_its_nonce() {
        let inbox = owner_inbox();
        for op in [Op::Fetch, Op::Ack, Op::Subscribe, Op::PublishKeyPackages] {
            let auth = sign_auth(&OWNER, op, &RELAY, &inbox, NOW, [3; 16], 42);
            assert_eq!(verify_auth(&auth, op, &RELAY, &inbox, 42, NOW + 1_000), Ok([3; 16]));
        }
    }

    #[test]
    fn a_reused_signer_signs_what_a_fresh_one_signs() {
        let inbox = owner_inbox();
        let signer = AuthSigner::from_seed(&OWNER);
        for (i, op) in [Op::Fetch, Op::Ack, Op::Subscribe, Op::PublishKeyPackages]
            .into_iter()
            .enumerate()
        {
            let nonce = [i as u8; 16];
            let auth = signer.sign(op, &RELAY, &inbox, NOW, nonce, 42);
            assert_eq!(auth, sign_auth(&OWNER, op, &RELAY, &inbox, NOW, nonce, 42));
            assert_eq!(verify_auth(&auth, op, &RELAY, &inbox, 42, NOW), Ok(nonce));
        }
    }

    #[test]
    fn auth_for_one_relay_is_refused_by_another() {
        let inbox = owner_inbox();
        for op in [Op::Fetch, Op::Ack, Op::Subscribe, Op::PublishKeyPackages] {
            let auth = sign_auth(&OWNER, op, &RELAY, &inbox, NOW, [3; 16], 42);
            assert_eq!(
                verify_auth(&auth, op, &[8; 32], &inbox, 42, NOW),
                Err(MailboxError::Unauthorized)
            );
        }
    }

    #[test]
    fn auth_at_the_edge_of_the_window_is_accepted() {
        let inbox = owner_inbox();
        let auth = sign_auth(&OWNER, Op::Fetch, &RELAY, &inbox, NOW, [3; 16], 0);
        assert!(verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 0, NOW + AUTH_WINDOW_MS).is_ok());
        assert!(verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 0, NOW - AUTH_WINDOW_MS).is_ok());
    }

    #[test]
    fn auth_by_another_owner_is_refused() {
        let inbox = owner_inbox();
        let auth = sign_auth(&OTHER, Op::Fetch, &RELAY, &inbox, NOW, [3; 16], 0);
        assert_eq!(
            verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 0, NOW),
            Err(MailboxError::Unauthorized)
        );
    }

    #[test]
    fn auth_with_forged_signature_is_refused() {
        let inbox = owner_inbox();
        let mut auth = sign_auth(&OWNER, Op::Fetch, &RELAY, &inbox, NOW, [3; 16], 0);
        auth.signature = Bytes(1).next::<64>().to_vec();
        assert_eq!(
            verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 0, NOW),
            Err(MailboxError::Unauthorized)
        );
        // A random key signing for its own inbox, presented with the owner's key.
        let forger = Bytes(2).next::<32>();
        let mut auth = sign_auth(&forger, Op::Fetch, &RELAY, &inbox, NOW, [3; 16], 0);
        auth.owner_key = public(&OWNER).to_vec();
        assert_eq!(
            verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 0, NOW),
            Err(MailboxError::Unauthorized)
        );
    }

    #[test]
    fn auth_with_tampered_argument_or_op_is_refused() {
        let inbox = owner_inbox();
        let auth = sign_auth(&OWNER, Op::Ack, &RELAY, &inbox, NOW, [3; 16], 10);
        assert_eq!(
            verify_auth(&auth, Op::Ack, &RELAY, &inbox, 11, NOW),
            Err(MailboxError::Unauthorized)
        );
        assert_eq!(
            verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 10, NOW),
            Err(MailboxError::Unauthorized)
        );
    }

    #[test]
    fn auth_outside_the_window_is_stale() {
        let inbox = owner_inbox();
        let old = sign_auth(&OWNER, Op::Fetch, &RELAY, &inbox, NOW - 61_000, [3; 16], 0);
        assert_eq!(
            verify_auth(&old, Op::Fetch, &RELAY, &inbox, 0, NOW),
            Err(MailboxError::Stale)
        );
        let future = sign_auth(&OWNER, Op::Fetch, &RELAY, &inbox, NOW + 61_000, [3; 16], 0);
        assert_eq!(
            verify_auth(&future, Op::Fetch, &RELAY, &inbox, 0, NOW),
            Err(MailboxError::Stale)
        );
    }

    #[test]
    fn auth_with_wrong_length_nonce_is_a_bad_request() {
        let inbox = owner_inbox();
        let mut auth = sign_auth(&OWNER, Op::Fetch, &RELAY, &inbox, NOW, [3; 16], 0);
        auth.nonce = vec![3; 15];
        assert_eq!(
            verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 0, NOW),
            Err(MailboxError::BadRequest)
        );
        auth.nonce = vec![3; 17];
        assert_eq!(
            verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 0, NOW),
            Err(MailboxError::BadRequest)
        );
    }

    #[test]
    fn auth_with_malformed_owner_key_is_refused() {
        let inbox = owner_inbox();
        let mut auth = sign_auth(&OWNER, Op::Fetch, &RELAY, &inbox, NOW, [3; 16], 0);
        auth.owner_key.pop();
        assert_eq!(
            verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 0, NOW),
            Err(MailboxError::Unauthorized)
        );
        auth.owner_key.clear();
        assert_eq!(
            verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 0, NOW),
            Err(MailboxError::Unauthorized)
        );
    }

    #[test]
    fn a_thousand_unauthorised_attempts_all_fail() {
        let inbox = owner_inbox();
        let genuine = sign_auth(&OWNER, Op::Fetch, &RELAY, &inbox, NOW, [3; 16], 5);
        let mut rng = Bytes(1000);
        let mut successes = 0;
        for i in 0..1_000u64 {
            let auth = match i % 5 {
                // A random key (possibly not even a curve point) with a random signature.
                0 => pb::OwnerAuth {
                    owner_key: rng.next::<32>().to_vec(),
                    timestamp_ms: NOW,
                    nonce: rng.next::<16>().to_vec(),
                    signature: rng.next::<64>().to_vec(),
                },
                // The owner's key with a random signature.
                1 => pb::OwnerAuth {
                    owner_key: public(&OWNER).to_vec(),
                    timestamp_ms: NOW,
                    nonce: rng.next::<16>().to_vec(),
                    signature: rng.next::<64>().to_vec(),
                },
                // A random signer, correctly signing the owner's inbox.
                2 => sign_auth(&rng.next::<32>(), Op::Fetch, &RELAY, &inbox, NOW, rng.next::<16>(), 5),
                // Another user's key, signing a message for this inbox.
                3 => sign_auth(&OTHER, Op::Fetch, &RELAY, &inbox, NOW, rng.next::<16>(), 5),
                // The genuine owner, but stale or from the future.
                _ => {
                    let skew = AUTH_WINDOW_MS + 1 + u64::from(u32::from_le_bytes(rng.next::<4>()));
                    let ts = if i % 2 == 0 { NOW - skew } else { NOW + skew };
                    sign_auth(&OWNER, Op::Fetch, &RELAY, &inbox, ts, rng.next::<16>(), 5)
                }
            };
            if verify_auth(&auth, Op::Fetch, &RELAY, &inbox, 5, NOW).is_ok() {
                successes += 1;
            }
        }
        assert_eq!(successes, 0);
        // The genuine request still passes, so the failures are not vacuous.
        assert!(verify_auth(&genuine, Op::Fetch, &RELAY, &inbox, 5, NOW).is_ok());
    }

    #[test]
    fn capability_round_trips() {
        let holder = public(&OTHER);
        let cap = issue_capability(&OWNER, NOW + 1_000, Some(&holder));
        let info = verify_capability(&cap, &owner_inbox(), NOW).unwrap();
        assert_eq!(
            info,
            CapabilityInfo {
                owner_key: public(&OWNER),
                expires_ms: NOW + 1_000,
                holder: Some(holder),
            }
        );
        let open = issue_capability(&OWNER, NOW + 1_000, None);
        assert_eq!(verify_capability(&open, &owner_inbox(), NOW).unwrap().holder, None);
    }

    #[test]
    fn expired_capability_is_refused() {
        let cap = issue_capability(&OWNER, NOW, None);
        assert!(verify_capability(&cap, &owner_inbox(), NOW).is_ok());
        assert_eq!(
            verify_capability(&cap, &owner_inbox(), NOW + 1),
            Err(MailboxError::Expired)
        );
    }

    #[test]
    fn capability_for_another_inbox_is_refused() {
        let cap = issue_capability(&OTHER, NOW + 1_000, None);
        assert_eq!(
            verify_capability(&cap, &owner_inbox(), NOW),
            Err(MailboxError::Unauthorized)
        );
    }

    #[test]
    fn tampered_capability_is_refused() {
        let inbox = owner_inbox();
        let cap = issue_capability(&OWNER, NOW + 1_000, None);

        let mut longer = cap.clone();
        let mut body = pb::CapabilityBody::decode(&longer.body[..]).unwrap();
        body.expires_ms = u64::MAX;
        longer.body = body.encode_to_vec();
        assert_eq!(verify_capability(&longer, &inbox, NOW), Err(MailboxError::Unauthorized));

        let mut bad_sig = cap.clone();
        bad_sig.signature[0] ^= 1;
        assert_eq!(
            verify_capability(&bad_sig, &inbox, NOW),
            Err(MailboxError::Unauthorized)
        );

        let mut garbage = cap;
        garbage.body = vec![0xff; 8];
        assert_eq!(
            verify_capability(&garbage, &inbox, NOW),
            Err(MailboxError::Unauthorized)
        );
    }

    #[test]
    fn capability_signature_check_names_the_granted_inbox_whatever_the_time() {
        let cap = issue_capability(&OWNER, NOW, None);
        let (inbox, info) = verify_capability_signature(&cap).unwrap();
        assert_eq!(inbox, owner_inbox());
        assert_eq!(info.expires_ms, NOW);
        let mut bad_sig = cap.clone();
        bad_sig.signature[3] ^= 1;
        assert_eq!(verify_capability_signature(&bad_sig), Err(MailboxError::Unauthorized));
        // A body naming another inbox than its owner key's is refused.
        let mut body = pb::CapabilityBody::decode(&cap.body[..]).unwrap();
        body.inbox_id = inbox_id(&public(&OTHER)).to_vec();
        let body = body.encode_to_vec();
        let key = SigningKey::from_bytes(&OWNER);
        let signature = key.sign(&with_context(CAPABILITY_CONTEXT, &body)).to_bytes().to_vec();
        let misnamed = pb::Capability { body, signature };
        assert_eq!(verify_capability_signature(&misnamed), Err(MailboxError::Unauthorized));
    }

    #[test]
    fn receipt_signer_signs_exactly_like_sign_receipt() {
        let signer = ReceiptSigner::new(&RELAY);
        assert_eq!(signer.public(), public(&RELAY));
        assert_eq!(signer.sign(&receipt()), sign_receipt(&RELAY, &receipt()));
    }

    fn receipt() -> Receipt {
        Receipt {
            relay_key: [0; 32],
            inbox_id: owner_inbox(),
            request_inbox: true,
            envelope_hash: envelope_hash(b"envelope"),
            index: 17,
            accepted_ms: NOW,
            keep_until_ms: NOW + 86_400_000,
        }
    }

    #[test]
    fn receipt_round_trips_with_the_relays_own_key() {
        let wire = sign_receipt(&RELAY, &receipt());
        let got = verify_receipt(&wire).unwrap();
        assert_eq!(
            got,
            Receipt {
                relay_key: public(&RELAY),
                ..receipt()
            }
        );
    }

    #[test]
    fn tampered_receipt_is_refused() {
        let wire = sign_receipt(&RELAY, &receipt());

        let mut moved = wire.clone();
        let mut body = pb::CustodyReceiptBody::decode(&moved.body[..]).unwrap();
        body.index += 1;
        moved.body = body.encode_to_vec();
        assert_eq!(verify_receipt(&moved), Err(MailboxError::Unauthorized));

        let mut reassigned = wire.clone();
        let mut body = pb::CustodyReceiptBody::decode(&reassigned.body[..]).unwrap();
        body.relay_key = public(&OTHER).to_vec();
        reassigned.body = body.encode_to_vec();
        assert_eq!(verify_receipt(&reassigned), Err(MailboxError::Unauthorized));

        let mut bad_sig = wire;
        bad_sig.signature[10] ^= 1;
        assert_eq!(verify_receipt(&bad_sig), Err(MailboxError::Unauthorized));
    }

    #[test]
    fn envelope_hash_is_sha256() {
        assert_eq!(envelope_hash(b""), <[u8; 32]>::from(Sha256::digest(b"")));
    }

    #[test]
    fn solved_pow_is_accepted_and_bound_to_the_envelope() {
        let inbox = owner_inbox();
        let nonce = solve_pow(&inbox, b"hello", 12);
        assert_eq!(nonce.len(), 8);
        assert!(pow_ok(&inbox, b"hello", &nonce, 12));
        assert!(!pow_ok(&inbox, b"goodbye", &nonce, 12));
        assert!(!pow_ok(&[0; 32], b"hello", &nonce, 12));
        assert_eq!(solve_pow(&inbox, b"hello", 12), nonce, "solve_pow is deterministic");
    }

    #[test]
    fn pow_refuses_long_nonces_and_impossible_difficulty() {
        let inbox = owner_inbox();
        assert!(pow_ok(&inbox, b"x", &[0; 16], 0));
        assert!(!pow_ok(&inbox, b"x", &[0; 17], 0));
        assert!(!pow_ok(&inbox, b"x", &solve_pow(&inbox, b"x", 257), 257));
    }

    #[test]
    fn leading_zero_bits_counts_across_bytes() {
        assert_eq!(leading_zero_bits(&[0, 0, 0x10, 0xff]), 19);
        assert_eq!(leading_zero_bits(&[0x80]), 0);
        assert_eq!(leading_zero_bits(&[0; 4]), 32);
    }

    #[test]
    fn status_round_trips_for_every_error() {
        for e in MailboxError::ALL {
            assert_eq!(MailboxError::from_status(e.status()), Some(e));
            assert_eq!(e.to_string(), e.code());
        }
        assert_eq!(MailboxError::from_status(pb::MailboxStatus::Ok), None);
        assert_eq!(MailboxError::from_status(pb::MailboxStatus::Unspecified), None);
        let statuses: std::collections::HashSet<_> = MailboxError::ALL.iter().map(|e| e.status()).collect();
        assert_eq!(statuses.len(), MailboxError::ALL.len());
    }
}
