//! The MLS engine: one-to-one (and later group) conversations over openmls.
//!
//! The engine holds a device's MLS signing key and the group configuration. It
//! is generic over the openmls provider, so the caller decides where state
//! lives (the store crate's redb provider in the node, memory in unit tests)
//! and where randomness comes from. It never persists anything itself: every
//! operation writes through the provider's storage, and the caller wraps each
//! call in one storage transaction together with its own rows.
//!
//! A member's MLS credential is a `BasicCredential` whose identity is the
//! device's encoded [`DeviceCertificate`]; its signature key must equal the
//! certificate's MLS signature key. Every credential that enters a group (key
//! packages we add, members of a group we join, members added by a commit)
//! is checked against that rule.

use ::tls_codec::Deserialize as _;
use ed25519_dalek::SigningKey;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;

use crate::identity::{AccountId, DeviceCertificate, IdentityError};
use crate::limits::MAX_MLS_MESSAGE;

/// The one ciphersuite Tidings uses.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Past epochs whose message secrets are kept, so that messages delayed across a
/// commit still decrypt. Trades forward secrecy for tolerance (see THREAT-MODEL).
pub const MAX_PAST_EPOCHS: usize = 5;
/// Out-of-order tolerance and maximum forward distance of the sender ratchet.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 64;
pub const MAX_FORWARD_DISTANCE: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum MlsError {
    #[error("MLS message is larger than {MAX_MLS_MESSAGE} bytes")]
    TooLarge,
    #[error("MLS message is malformed: {0}")]
    Decode(String),
    #[error("unexpected MLS message type: expected {0}")]
    UnexpectedType(&'static str),
    #[error("member credential is invalid: {0}")]
    Credential(#[from] IdentityError),
    #[error("member credential does not match its signature key")]
    CredentialKeyMismatch,
    #[error("key package belongs to another account")]
    WrongAccount,
    #[error("key package is invalid: {0}")]
    KeyPackage(String),
    #[error("creating the group failed: {0}")]
    Create(String),
    #[error("joining from the Welcome failed: {0}")]
    Join(String),
    #[error("encrypting failed: {0}")]
    Encrypt(String),
    #[error("processing the message failed: {0}")]
    Process(String),
    #[error("merging the commit failed: {0}")]
    Merge(String),
    #[error("self-update failed: {0}")]
    Update(String),
    #[error("storage failed: {0}")]
    Storage(String),
}

fn err<E: std::fmt::Debug>(f: fn(String) -> MlsError) -> impl Fn(E) -> MlsError {
    move |e| f(format!("{e:?}"))
}

/// What processing an incoming MLS message produced.
#[derive(Debug)]
pub enum Incoming {
    /// An application message. `sender` is the sender's credential identity
    /// (an encoded device certificate, verified when the member joined).
    Application { sender: Vec<u8>, plaintext: Vec<u8> },
    /// A commit from another member was applied; the group is now at `epoch`.
    Commit { epoch: u64 },
    /// A proposal was stored for a later commit.
    Proposal,
}

/// Derives the Ed25519 MLS signature key pair from a secret seed.
pub fn signature_keys_from_seed(seed: [u8; 32]) -> SignatureKeyPair {
    let sk = SigningKey::from_bytes(&seed);
    SignatureKeyPair::from_raw(
        CIPHERSUITE.signature_algorithm(),
        sk.to_bytes().to_vec(),
        sk.verifying_key().to_bytes().to_vec(),
    )
}

/// Checks that `credential` is a device certificate that certifies `signature_key`,
/// and returns the certificate.
pub fn verify_credential(credential: &Credential, signature_key: &[u8]) -> Result<DeviceCertificate, MlsError> {
    let basic = BasicCredential::try_from(credential.clone()).map_err(|e| MlsError::Decode(format!("{e:?}")))?;
    let cert = DeviceCertificate::from_bytes(basic.identity())?;
    if cert.mls_signature_key != signature_key {
        return Err(MlsError::CredentialKeyMismatch);
    }
    Ok(cert)
}

/// A device's MLS engine.
pub struct MlsEngine {
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    create_config: MlsGroupCreateConfig,
    join_config: MlsGroupJoinConfig,
}

impl std::fmt::Debug for MlsEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MlsEngine")
    }
}

impl MlsEngine {
    /// Builds the engine from the device's MLS signing seed and its certificate.
    pub fn new(signing_seed: [u8; 32], cert: &DeviceCertificate) -> Result<Self, MlsError> {
        let signer = signature_keys_from_seed(signing_seed);
        if signer.public() != cert.mls_signature_key.as_slice() {
            return Err(MlsError::CredentialKeyMismatch);
        }
        let credential = CredentialWithKey {
            credential: BasicCredential::new(cert.to_bytes()).into(),
            signature_key: signer.to_public_vec().into(),
        };
        let ratchet = SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE);
        let create_config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(ratchet)
            .build();
        let join_config = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(ratchet)
            .build();
        Ok(Self {
            signer,
            credential,
            create_config,
            join_config,
        })
    }

    /// Creates a fresh key package (its private keys go to the provider's storage)
    /// and returns it TLS-encoded as an MLSMessage.
    pub fn key_package<P: OpenMlsProvider>(&self, provider: &P, last_resort: bool) -> Result<Vec<u8>, MlsError> {
        let mut builder = KeyPackage::builder();
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(CIPHERSUITE, provider, &self.signer, self.credential.clone())
            .map_err(err(MlsError::KeyPackage))?;
        MlsMessageOut::from(bundle.key_package().clone())
            .to_bytes()
            .map_err(err(MlsError::KeyPackage))
    }

    /// Decodes and validates a key package claimed to belong to `account`.
    pub fn verify_key_package<P: OpenMlsProvider>(
        provider: &P,
        bytes: &[u8],
        account: &AccountId,
        now_ms: u64,
    ) -> Result<(KeyPackage, DeviceCertificate), MlsError> {
        let kp_in = match decode_message(bytes)?.extract() {
            MlsMessageBodyIn::KeyPackage(kp) => kp,
            _ => return Err(MlsError::UnexpectedType("key package")),
        };
        let kp = kp_in
            .validate(provider.crypto(), ProtocolVersion::Mls10)
            .map_err(err(MlsError::KeyPackage))?;
        if kp.ciphersuite() != CIPHERSUITE {
            return Err(MlsError::KeyPackage("wrong ciphersuite".into()));
        }
        let leaf = kp.leaf_node();
        let cert = verify_credential(leaf.credential(), leaf.signature_key().as_slice())?;
        DeviceCertificate::verify(cert.wire(), now_ms)?;
        if cert.account != *account {
            return Err(MlsError::WrongAccount);
        }
        Ok((kp, cert))
    }

    /// Creates a conversation with the given group id containing this device
    /// and the devices behind `key_packages`. Returns the group and the
    /// TLS-encoded Welcome for the added devices (None if nobody was added).
    pub fn create_group<P: OpenMlsProvider>(
        &self,
        provider: &P,
        group_id: &[u8],
        key_packages: &[KeyPackage],
    ) -> Result<(MlsGroup, Option<Vec<u8>>), MlsError> {
        let mut group = MlsGroup::new_with_group_id(
            provider,
            &self.signer,
            &self.create_config,
            GroupId::from_slice(group_id),
            self.credential.clone(),
        )
        .map_err(err(MlsError::Create))?;
        if key_packages.is_empty() {
            return Ok((group, None));
        }
        let (_commit, welcome, _info) = group
            .add_members(provider, &self.signer, key_packages)
            .map_err(err(MlsError::Create))?;
        group.merge_pending_commit(provider).map_err(err(MlsError::Merge))?;
        let welcome = welcome.to_bytes().map_err(err(MlsError::Create))?;
        Ok((group, Some(welcome)))
    }

    /// Joins a group from a Welcome. Every member's credential is checked.
    pub fn join<P: OpenMlsProvider>(&self, provider: &P, welcome: &[u8]) -> Result<MlsGroup, MlsError> {
        let welcome = match decode_message(welcome)?.extract() {
            MlsMessageBodyIn::Welcome(w) => w,
            _ => return Err(MlsError::UnexpectedType("welcome")),
        };
        let staged =
            StagedWelcome::new_from_welcome(provider, &self.join_config, welcome, None).map_err(err(MlsError::Join))?;
        for m in staged.members() {
            verify_credential(&m.credential, &m.signature_key)?;
        }
        staged.into_group(provider).map_err(err(MlsError::Join))
    }

    /// Encrypts an application message; returns the TLS-encoded MLSMessage.
    pub fn encrypt<P: OpenMlsProvider>(
        &self,
        provider: &P,
        group: &mut MlsGroup,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, MlsError> {
        group
            .create_message(provider, &self.signer, plaintext)
            .map_err(err(MlsError::Encrypt))?
            .to_bytes()
            .map_err(err(MlsError::Encrypt))
    }

    /// Processes an incoming protocol message for `group`.
    pub fn process<P: OpenMlsProvider>(
        &self,
        provider: &P,
        group: &mut MlsGroup,
        bytes: &[u8],
    ) -> Result<Incoming, MlsError> {
        let msg = decode_message(bytes)?
            .try_into_protocol_message()
            .map_err(|_| MlsError::UnexpectedType("protocol message"))?;
        if msg.group_id() != group.group_id() {
            return Err(MlsError::Process("message for another group".into()));
        }
        let processed = group.process_message(provider, msg).map_err(err(MlsError::Process))?;
        let sender = processed.credential().clone();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                // The sender's credential was verified when it entered the group.
                let basic = BasicCredential::try_from(sender).map_err(err(MlsError::Decode))?;
                Ok(Incoming::Application {
                    sender: basic.identity().to_vec(),
                    plaintext: app.into_bytes(),
                })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                for add in staged.add_proposals() {
                    let leaf = add.add_proposal().key_package().leaf_node();
                    verify_credential(leaf.credential(), leaf.signature_key().as_slice())?;
                }
                group
                    .merge_staged_commit(provider, *staged)
                    .map_err(err(MlsError::Merge))?;
                Ok(Incoming::Commit {
                    epoch: group.epoch().as_u64(),
                })
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                group
                    .store_pending_proposal(provider.storage(), *proposal)
                    .map_err(err(MlsError::Storage))?;
                Ok(Incoming::Proposal)
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(MlsError::UnexpectedType(
                "member message (external joins are not accepted)",
            )),
            ProcessedMessageContent::OwnPendingCommit => {
                group.merge_pending_commit(provider).map_err(err(MlsError::Merge))?;
                Ok(Incoming::Commit {
                    epoch: group.epoch().as_u64(),
                })
            }
            ProcessedMessageContent::OwnPrivateMessage => Err(MlsError::UnexpectedType("message from another member")),
        }
    }

    /// Commits a self-update (fresh leaf keys: post-compromise security).
    /// Returns the TLS-encoded commit to send to the other members.
    pub fn self_update<P: OpenMlsProvider>(&self, provider: &P, group: &mut MlsGroup) -> Result<Vec<u8>, MlsError> {
        let bundle = group
            .self_update(provider, &self.signer, LeafNodeParameters::default())
            .map_err(err(MlsError::Update))?;
        let commit = bundle.into_messages().0;
        group.merge_pending_commit(provider).map_err(err(MlsError::Merge))?;
        commit.to_bytes().map_err(err(MlsError::Update))
    }

    /// Loads a group from storage.
    pub fn load<P: OpenMlsProvider>(provider: &P, group_id: &[u8]) -> Result<Option<MlsGroup>, MlsError> {
        MlsGroup::load(provider.storage(), &GroupId::from_slice(group_id)).map_err(err(MlsError::Storage))
    }

    /// The verified device certificates of a group's members.
    pub fn members(group: &MlsGroup) -> Vec<DeviceCertificate> {
        group
            .members()
            .filter_map(|m| verify_credential(&m.credential, &m.signature_key).ok())
            .collect()
    }
}

fn decode_message(bytes: &[u8]) -> Result<MlsMessageIn, MlsError> {
    if bytes.len() > MAX_MLS_MESSAGE {
        return Err(MlsError::TooLarge);
    }
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Decode(e.to_string()))
}
