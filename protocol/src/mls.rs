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

use crate::group::{self, CommitSummary, GROUP_META_EXTENSION, GroupError, GroupMeta, Intent};
use crate::identity::{AccountId, DeviceCertificate, IdentityError};
use crate::limits::{MAX_MLS_MESSAGE, MAX_WELCOME};

/// The one ciphersuite Tidings uses.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Past epochs whose message secrets are kept in one-to-one conversations, so
/// that messages delayed across a commit still decrypt. Trades forward secrecy
/// for tolerance (see THREAT-MODEL).
pub const MAX_PAST_EPOCHS: usize = 5;
/// Past epochs kept in groups: none. Members apply a group's messages in the
/// sequencer's order, so a message is read in the epoch it was sent in; one
/// that a commit overtook is sent again by its sender in the new epoch. (openmls
/// rewrites the past epochs' state, member list included, on every message:
/// keeping 5 made a message cost 16 ms at 1,000 members.)
pub const GROUP_PAST_EPOCHS: usize = 0;
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
    #[error("group: {0}")]
    Group(#[from] GroupError),
    #[error("not allowed: {0}")]
    Unauthorized(String),
    #[error("committing failed: {0}")]
    Commit(String),
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

/// One handshake or application message of a group, processed in the order
/// the group's sequencing relay gave it.
#[derive(Debug)]
pub enum Sequenced {
    /// An application message from another member.
    Application { sender: Vec<u8>, plaintext: Vec<u8> },
    /// A commit moved the group to `epoch`. `ours`: it was our pending commit.
    /// `lost`: we had a pending commit for the same epoch, and this one came
    /// first, so ours is void and its intent must be re-applied.
    /// `removed_us`: the commit removed this device.
    Commit {
        epoch: u64,
        ours: bool,
        lost: bool,
        removed_us: bool,
    },
    /// A proposal, kept for a later commit.
    Proposal,
    /// A commit for an epoch that an earlier commit already decided: ignored.
    Stale,
    /// One of our own messages coming back; `epoch` is the epoch it was
    /// encrypted in. An application message of an epoch older than the
    /// group's is unreadable to devices that joined since: send it again.
    Own { epoch: u64 },
    /// Invalid or not allowed: ignored; the group is unchanged.
    Refused(String),
}

/// A commit made for an intent, waiting to be sequenced. It is pending in the
/// group until the sequence shows whether it won its epoch.
#[derive(Debug, Clone)]
pub struct StagedIntent {
    /// TLS-encoded commit, for the group's relays.
    pub commit: Vec<u8>,
    /// TLS-encoded Welcome for added devices: send it only once the commit won.
    pub welcome: Option<Vec<u8>>,
    /// The epoch the commit is for.
    pub epoch: u64,
}

/// The leaf capabilities every Tidings device advertises: the defaults plus
/// the group metadata and last-resort extensions.
fn leaf_capabilities() -> Capabilities {
    Capabilities::builder()
        .extensions(vec![
            ExtensionType::Unknown(GROUP_META_EXTENSION),
            // A last-resort key package carries this extension; its leaf must list it.
            ExtensionType::LastResort,
        ])
        .build()
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
            .capabilities(leaf_capabilities())
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
        let mut builder = KeyPackage::builder().leaf_node_capabilities(leaf_capabilities());
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
        let welcome = match decode_limited(welcome, MAX_WELCOME)?.extract() {
            MlsMessageBodyIn::Welcome(w) => w,
            _ => return Err(MlsError::UnexpectedType("welcome")),
        };
        let staged =
            StagedWelcome::new_from_welcome(provider, &self.join_config, welcome, None).map_err(err(MlsError::Join))?;
        for m in staged.members() {
            verify_credential(&m.credential, &m.signature_key)?;
        }
        let mut group = staged.into_group(provider).map_err(err(MlsError::Join))?;
        if Self::group_meta(&group).is_ok() {
            // A named group: its own past-epoch policy.
            let ratchet = SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE);
            let config = MlsGroupJoinConfig::builder()
                .use_ratchet_tree_extension(true)
                .max_past_epochs(GROUP_PAST_EPOCHS)
                .sender_ratchet_configuration(ratchet)
                .build();
            group
                .set_configuration(provider.storage(), &config)
                .map_err(err(MlsError::Storage))?;
        }
        Ok(group)
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

    /// Proposes that this account leave the group: a Remove proposal for each
    /// of its other devices in the group and one for this device (a commit
    /// cannot remove its own committer). Another member commits them
    /// ([`Intent::CommitProposals`]); they lapse if a commit of the epoch
    /// leaves them out, and are then proposed again. The owner cannot leave.
    pub fn propose_leave<P: OpenMlsProvider>(
        &self,
        provider: &P,
        group: &mut MlsGroup,
    ) -> Result<Vec<Vec<u8>>, MlsError> {
        if group.pending_commit().is_some() {
            return Err(MlsError::Commit(
                "a commit of ours is still waiting for its epoch".into(),
            ));
        }
        let me = self.account()?;
        if Self::group_meta(group)?.role(me.as_bytes()) == group::Role::Owner {
            return Err(MlsError::Unauthorized(
                "the owner hands the group to someone else before leaving".into(),
            ));
        }
        let own_leaf = group.own_leaf_index();
        let mut out = Vec::new();
        for (leaf, c) in member_leaves(group) {
            if c.account == me && leaf != own_leaf {
                let (msg, _) = group
                    .propose_remove_member(provider, &self.signer, leaf)
                    .map_err(err(MlsError::Commit))?;
                out.push(msg.to_bytes().map_err(err(MlsError::Commit))?);
            }
        }
        let msg = group
            .leave_group(provider, &self.signer)
            .map_err(err(MlsError::Commit))?;
        out.push(msg.to_bytes().map_err(err(MlsError::Commit))?);
        Ok(out)
    }

    /// Whether members' leaving proposals are pending and this device is the
    /// one to commit them first: the staying member with the lowest leaf.
    pub fn first_to_commit_proposals(group: &MlsGroup) -> bool {
        let leaving: Vec<LeafNodeIndex> = group
            .pending_proposals()
            .filter_map(|p| match p.proposal() {
                Proposal::Remove(r) => Some(r.removed()),
                _ => None,
            })
            .collect();
        !leaving.is_empty()
            && group.members().map(|m| m.index).filter(|l| !leaving.contains(l)).min() == Some(group.own_leaf_index())
    }

    /// Whether any proposal waits to be committed.
    pub fn has_pending_proposals(group: &MlsGroup) -> bool {
        group.pending_proposals().next().is_some()
    }

    /// Creates a group (a chat with a name, roles and relays) that holds only
    /// this device; members are added by commits.
    pub fn create_named_group<P: OpenMlsProvider>(
        &self,
        provider: &P,
        group_id: &[u8],
        meta: &GroupMeta,
    ) -> Result<MlsGroup, MlsError> {
        meta.validate()?;
        let extensions = meta_extensions(meta).map_err(err(MlsError::Create))?;
        let ratchet = SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE);
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .capabilities(leaf_capabilities())
            .use_ratchet_tree_extension(true)
            .max_past_epochs(GROUP_PAST_EPOCHS)
            .sender_ratchet_configuration(ratchet)
            .with_group_context_extensions(extensions)
            .build();
        MlsGroup::new_with_group_id(
            provider,
            &self.signer,
            &config,
            GroupId::from_slice(group_id),
            self.credential.clone(),
        )
        .map_err(err(MlsError::Create))
    }

    /// The group's metadata in its current epoch.
    pub fn group_meta(group: &MlsGroup) -> Result<GroupMeta, MlsError> {
        let ext = group
            .extensions()
            .unknown(GROUP_META_EXTENSION)
            .ok_or(GroupError::Missing)?;
        Ok(GroupMeta::decode(&ext.0)?)
    }

    /// Makes a commit for `intent` on the group's current epoch and leaves it
    /// pending. Returns None when the intent has nothing left to do (the
    /// devices are already in, or already gone, or the metadata is current),
    /// which is how an intent that another member's commit already carried
    /// out ends. Refused while a commit of ours is still waiting for its
    /// epoch: should that one win, a second commit for the same epoch would
    /// leave us unable to follow the group.
    pub fn commit_intent<P: OpenMlsProvider>(
        &self,
        provider: &P,
        group: &mut MlsGroup,
        intent: &Intent,
        now_ms: u64,
    ) -> Result<Option<StagedIntent>, MlsError> {
        if group.pending_commit().is_some() {
            return Err(MlsError::Commit(
                "a commit of ours is still waiting for its epoch".into(),
            ));
        }
        let meta = Self::group_meta(group)?;
        let me = self.account()?;
        let members = member_leaves(group);
        let account_at = |leaf: LeafNodeIndex| members.iter().find(|(l, _)| *l == leaf).map(|(_, c)| c.account);
        let epoch = group.epoch().as_u64();
        let mut summary = CommitSummary::default();
        // Members who proposed their own leaving: any commit now takes them out
        // (openmls includes the pending proposals).
        for p in group.pending_proposals() {
            if let Proposal::Remove(r) = p.proposal()
                && let Some(account) = account_at(r.removed())
            {
                summary.left.push(*account.as_bytes());
            }
        }
        let mut new_meta: Option<GroupMeta> = None;
        let mut builder = group.commit_builder();
        match intent {
            Intent::Add(key_packages) => {
                let mut kps = Vec::new();
                for bytes in key_packages {
                    let (kp, cert) = Self::verify_any_key_package(provider, bytes, now_ms)?;
                    if members.iter().any(|(_, c)| c.device_key == cert.device_key)
                        || kps.iter().any(|(_, d)| *d == cert.device_key)
                    {
                        continue;
                    }
                    summary.added.push(*cert.account.as_bytes());
                    kps.push((kp, cert.device_key));
                }
                if kps.is_empty() {
                    return Ok(None);
                }
                builder = builder.propose_adds(kps.into_iter().map(|(kp, _)| kp));
            }
            Intent::Remove(devices) => {
                let leaves: Vec<LeafNodeIndex> = members
                    .iter()
                    .filter(|(_, c)| devices.contains(&c.device_key))
                    .map(|(leaf, c)| {
                        if c.account == me {
                            summary.left.push(*c.account.as_bytes());
                        } else {
                            summary.removed.push(*c.account.as_bytes());
                        }
                        *leaf
                    })
                    .collect();
                if leaves.is_empty() {
                    return Ok(None);
                }
                builder = builder.propose_removals(leaves);
            }
            Intent::SetMeta(new) => {
                if *new == meta && summary.left.is_empty() {
                    return Ok(None);
                }
                new_meta = Some(new.clone());
            }
            Intent::SelfUpdate => builder = builder.force_self_update(true),
            Intent::CommitProposals => {
                if summary.left.is_empty() {
                    return Ok(None);
                }
            }
        }
        // Whoever leaves must lose the group inbox too: a fresh seed in the
        // same commit moves the group to a new inbox.
        if !summary.removed.is_empty() || !summary.left.is_empty() {
            let m = new_meta.get_or_insert_with(|| meta.clone());
            if m.inbox_seed == meta.inbox_seed {
                m.inbox_seed = provider.rand().random_array().map_err(err(MlsError::Commit))?;
            }
        }
        if let Some(m) = new_meta.filter(|m| *m != meta) {
            let ext = meta_extensions(&m).map_err(err(MlsError::Commit))?;
            builder = builder
                .propose_group_context_extensions(ext)
                .map_err(err(MlsError::Commit))?;
            summary.new_meta = Some(m);
        }
        group::authorize(&meta, me.as_bytes(), &summary).map_err(MlsError::Unauthorized)?;
        let bundle = builder
            .load_psks(provider.storage())
            .map_err(err(MlsError::Commit))?
            .build(provider.rand(), provider.crypto(), &self.signer, |_| true)
            .map_err(err(MlsError::Commit))?
            .stage_commit(provider)
            .map_err(err(MlsError::Commit))?;
        let (commit, welcome, _info) = bundle.into_messages();
        Ok(Some(StagedIntent {
            commit: commit.to_bytes().map_err(err(MlsError::Commit))?,
            welcome: welcome
                .map(|w| w.to_bytes().map_err(err(MlsError::Commit)))
                .transpose()?,
            epoch,
        }))
    }

    /// Processes the next message of a group's sequence (handshake messages in
    /// the order the group's first relay gave them). The first valid, allowed
    /// commit for an epoch wins; later ones for that epoch are [`Sequenced::Stale`].
    /// `our_pending` is the commit of ours waiting for its epoch, if any.
    /// Invalid or unauthorised messages leave the group unchanged.
    pub fn process_sequenced<P: OpenMlsProvider>(
        &self,
        provider: &P,
        group: &mut MlsGroup,
        bytes: &[u8],
        our_pending: Option<&[u8]>,
    ) -> Result<Sequenced, MlsError> {
        let msg = match decode_message(bytes).and_then(|m| {
            m.try_into_protocol_message()
                .map_err(|_| MlsError::UnexpectedType("protocol message"))
        }) {
            Ok(m) => m,
            Err(e) => return Ok(Sequenced::Refused(e.to_string())),
        };
        if msg.group_id() != group.group_id() {
            return Ok(Sequenced::Refused("message for another group".into()));
        }
        let current = group.epoch().as_u64();
        let msg_epoch = msg.epoch().as_u64();
        if msg.content_type() == ContentType::Commit {
            let epoch = msg_epoch;
            if epoch < current {
                return Ok(Sequenced::Stale);
            }
            if epoch > current {
                return Ok(Sequenced::Refused(format!(
                    "commit for epoch {epoch}, the group is at {current}"
                )));
            }
            if our_pending == Some(bytes) && group.pending_commit().is_some() {
                group.merge_pending_commit(provider).map_err(err(MlsError::Merge))?;
                return Ok(Sequenced::Commit {
                    epoch: group.epoch().as_u64(),
                    ours: true,
                    lost: false,
                    removed_us: false,
                });
            }
        }
        let processed = match group.process_message(provider, msg) {
            Ok(p) => p,
            Err(e) => return Ok(Sequenced::Refused(format!("{e:?}"))),
        };
        let sender = processed.credential().clone();
        let sender_key = match processed.sender() {
            Sender::Member(leaf) => group.member_at(*leaf).map(|m| m.signature_key),
            _ => None,
        };
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                let basic = BasicCredential::try_from(sender).map_err(err(MlsError::Decode))?;
                Ok(Sequenced::Application {
                    sender: basic.identity().to_vec(),
                    plaintext: app.into_bytes(),
                })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let Some(sender_key) = sender_key else {
                    return Ok(Sequenced::Refused("commit from outside the group".into()));
                };
                let committer = match verify_credential(&sender, &sender_key) {
                    Ok(c) => c,
                    Err(e) => return Ok(Sequenced::Refused(e.to_string())),
                };
                let meta = Self::group_meta(group)?;
                let mut summary = CommitSummary::default();
                for add in staged.add_proposals() {
                    let leaf = add.add_proposal().key_package().leaf_node();
                    match verify_credential(leaf.credential(), leaf.signature_key().as_slice()) {
                        Ok(c) => summary.added.push(*c.account.as_bytes()),
                        Err(e) => return Ok(Sequenced::Refused(format!("added member: {e}"))),
                    }
                }
                let members = member_leaves(group);
                let account_at = |leaf: LeafNodeIndex| members.iter().find(|(l, _)| *l == leaf).map(|(_, c)| c.account);
                for rm in staged.remove_proposals() {
                    let Some(removed) = account_at(rm.remove_proposal().removed()) else {
                        return Ok(Sequenced::Refused("removes an unknown leaf".into()));
                    };
                    // Proposed (or committed) by a device of the same account:
                    // leaving, or revoking a device of one's own.
                    let by = match rm.sender() {
                        Sender::Member(leaf) => account_at(*leaf),
                        _ => None,
                    };
                    if by == Some(removed) {
                        summary.left.push(*removed.as_bytes());
                    } else {
                        summary.removed.push(*removed.as_bytes());
                    }
                }
                if let Some(ext) = staged.group_context().extensions().unknown(GROUP_META_EXTENSION) {
                    let new = match GroupMeta::decode(&ext.0) {
                        Ok(m) => m,
                        Err(e) => return Ok(Sequenced::Refused(e.to_string())),
                    };
                    if new != meta {
                        summary.new_meta = Some(new);
                    }
                } else {
                    return Ok(Sequenced::Refused("commit drops the group metadata".into()));
                }
                if let Err(why) = group::authorize(&meta, committer.account.as_bytes(), &summary) {
                    return Ok(Sequenced::Refused(why));
                }
                let lost = group.pending_commit().is_some();
                let removed_us = staged.self_removed();
                group
                    .merge_staged_commit(provider, *staged)
                    .map_err(err(MlsError::Merge))?;
                Ok(Sequenced::Commit {
                    epoch: group.epoch().as_u64(),
                    ours: false,
                    lost,
                    removed_us,
                })
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                // The one proposal members make is their own leaving (a commit
                // cannot remove its committer); anything else is refused.
                let members = member_leaves(group);
                let account_at = |leaf: LeafNodeIndex| members.iter().find(|(l, _)| *l == leaf).map(|(_, c)| c.account);
                let own_leaving = match (proposal.proposal(), proposal.sender()) {
                    (Proposal::Remove(r), Sender::Member(from)) => {
                        account_at(r.removed()).is_some() && account_at(r.removed()) == account_at(*from)
                    }
                    _ => false,
                };
                if !own_leaving {
                    return Ok(Sequenced::Refused("only a member's own leaving may be proposed".into()));
                }
                group
                    .store_pending_proposal(provider.storage(), *proposal)
                    .map_err(err(MlsError::Storage))?;
                Ok(Sequenced::Proposal)
            }
            ProcessedMessageContent::OwnPendingCommit => {
                group.merge_pending_commit(provider).map_err(err(MlsError::Merge))?;
                Ok(Sequenced::Commit {
                    epoch: group.epoch().as_u64(),
                    ours: true,
                    lost: false,
                    removed_us: false,
                })
            }
            ProcessedMessageContent::OwnPrivateMessage => Ok(Sequenced::Own { epoch: msg_epoch }),
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => {
                Ok(Sequenced::Refused("external joins are not accepted".into()))
            }
        }
    }

    /// The epoch a protocol message was sent in (it is in the clear).
    pub fn message_epoch(bytes: &[u8]) -> Option<u64> {
        match decode_message(bytes).map(|m| m.try_into_protocol_message()) {
            Ok(Ok(m)) => Some(m.epoch().as_u64()),
            _ => None,
        }
    }

    /// Whether `bytes` is a handshake message (commit or proposal). Group
    /// handshakes are accepted only in the sequencer's order, never directly.
    pub fn is_handshake(bytes: &[u8]) -> bool {
        match decode_message(bytes).map(|m| m.try_into_protocol_message()) {
            Ok(Ok(m)) => m.content_type() != ContentType::Application,
            _ => false,
        }
    }

    /// Decodes and validates a key package of any account.
    pub fn verify_any_key_package<P: OpenMlsProvider>(
        provider: &P,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(KeyPackage, DeviceCertificate), MlsError> {
        let kp_in = match decode_message(bytes)?.extract() {
            MlsMessageBodyIn::KeyPackage(kp) => kp,
            _ => return Err(MlsError::UnexpectedType("key package")),
        };
        let account = {
            let leaf = kp_in.unverified_credential();
            let cert = verify_credential(&leaf.credential, leaf.signature_key.as_slice())?;
            cert.account
        };
        Self::verify_key_package(provider, bytes, &account, now_ms)
    }

    fn account(&self) -> Result<AccountId, MlsError> {
        let basic = BasicCredential::try_from(self.credential.credential.clone()).map_err(err(MlsError::Decode))?;
        Ok(DeviceCertificate::from_bytes(basic.identity())?.account)
    }

    /// Loads a group from storage.
    pub fn load<P: OpenMlsProvider>(provider: &P, group_id: &[u8]) -> Result<Option<MlsGroup>, MlsError> {
        MlsGroup::load(provider.storage(), &GroupId::from_slice(group_id)).map_err(err(MlsError::Storage))
    }

    /// The device certificates of a group's members (verified when each
    /// member entered; not again here).
    pub fn members(group: &MlsGroup) -> Vec<DeviceCertificate> {
        group
            .members()
            .filter_map(|m| trusted_credential(&m.credential, &m.signature_key).ok())
            .collect()
    }
}

/// A group's GroupContext extensions: its metadata, and the requirement
/// that every member supports the metadata extension (which lets commits
/// change it).
fn meta_extensions(meta: &GroupMeta) -> Result<Extensions<GroupContext>, InvalidExtensionError> {
    Extensions::from_vec(vec![
        Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
            &[ExtensionType::Unknown(GROUP_META_EXTENSION)],
            &[],
            &[],
        )),
        Extension::Unknown(GROUP_META_EXTENSION, UnknownExtension(meta.encode())),
    ])
}

/// Leaf index and certificate of every member (verified when it entered).
fn member_leaves(group: &MlsGroup) -> Vec<(LeafNodeIndex, DeviceCertificate)> {
    group
        .members()
        .filter_map(|m| Some((m.index, trusted_credential(&m.credential, &m.signature_key).ok()?)))
        .collect()
}

/// The certificate of a credential already in our group state: its signature
/// was checked when the member entered, so only its shape and key are.
fn trusted_credential(credential: &Credential, signature_key: &[u8]) -> Result<DeviceCertificate, MlsError> {
    let basic = BasicCredential::try_from(credential.clone()).map_err(|e| MlsError::Decode(format!("{e:?}")))?;
    let cert = DeviceCertificate::from_trusted_bytes(basic.identity())?;
    if cert.mls_signature_key != signature_key {
        return Err(MlsError::CredentialKeyMismatch);
    }
    Ok(cert)
}

fn decode_message(bytes: &[u8]) -> Result<MlsMessageIn, MlsError> {
    decode_limited(bytes, MAX_MLS_MESSAGE)
}

fn decode_limited(bytes: &[u8], limit: usize) -> Result<MlsMessageIn, MlsError> {
    if bytes.len() > limit {
        return Err(MlsError::TooLarge);
    }
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Decode(e.to_string()))
}
