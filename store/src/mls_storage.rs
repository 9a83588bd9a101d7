//! The openmls storage provider: [`Store`] implements
//! `StorageProvider<CURRENT_VERSION>` on top of the `mls` table.
//!
//! # Layout
//!
//! Every openmls entity is one row of the `mls` table:
//!
//! ```text
//! key   = LABEL ‖ json(key) ‖ CURRENT_VERSION (u16, big-endian)
//! value = json(entity)
//! ```
//!
//! `LABEL` is a short ASCII name per entity kind (module `label` below); it never
//! ends in a character that can start a JSON document, so rows of different
//! kinds cannot collide. Composite keys are JSON arrays:
//!
//! - a queued proposal lives under `json([group_id, proposal_ref])`;
//! - epoch encryption key pairs live under `json([group_id, epoch, leaf_index])`.
//!
//! Lists are one row holding a JSON array of the items:
//!
//! - the own leaf nodes of a group (`OwnLeafNodes`, keyed by group id);
//! - the queued proposal refs of a group (`ProposalQueueRefs`, keyed by group
//!   id), in queue order; each proposal itself is a separate row as above;
//! - the epoch encryption key pairs (written and read as a whole).
//!
//! A missing list row reads as an empty list. Values that fail to decode are
//! reported as [`StoreError::Corrupt`], never a panic.
//!
//! Every access goes through `Store::mls_get` / `mls_put` / `mls_delete`, so
//! inside [`Store::unit`] all of an MLS operation's writes commit or roll back
//! together. List updates are read-modify-write; that is sound because all
//! MLS operations of a node run on one task.

use openmls_traits::storage::{CURRENT_VERSION, StorageProvider, traits};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Store, StoreError, from_json, to_json};

type Res<T> = std::result::Result<T, StoreError>;

/// Row labels, one per entity kind (the same names openmls' memory storage uses).
mod label {
    pub const JOIN_CONFIG: &[u8] = b"MlsGroupJoinConfig";
    pub const OWN_LEAF_NODES: &[u8] = b"OwnLeafNodes";
    pub const QUEUED_PROPOSAL: &[u8] = b"QueuedProposal";
    pub const PROPOSAL_QUEUE_REFS: &[u8] = b"ProposalQueueRefs";
    pub const TREE: &[u8] = b"Tree";
    pub const INTERIM_TRANSCRIPT_HASH: &[u8] = b"InterimTranscriptHash";
    pub const GROUP_CONTEXT: &[u8] = b"GroupContext";
    pub const CONFIRMATION_TAG: &[u8] = b"ConfirmationTag";
    pub const GROUP_STATE: &[u8] = b"GroupState";
    pub const MESSAGE_SECRETS: &[u8] = b"MessageSecrets";
    pub const RESUMPTION_PSK_STORE: &[u8] = b"ResumptionPsk";
    pub const OWN_LEAF_INDEX: &[u8] = b"OwnLeafNodeIndex";
    pub const EPOCH_SECRETS: &[u8] = b"EpochSecrets";
    pub const SIGNATURE_KEY_PAIR: &[u8] = b"SignatureKeyPair";
    pub const ENCRYPTION_KEY_PAIR: &[u8] = b"EncryptionKeyPair";
    pub const EPOCH_KEY_PAIRS: &[u8] = b"EpochKeyPairs";
    pub const KEY_PACKAGE: &[u8] = b"KeyPackage";
    pub const PSK: &[u8] = b"Psk";
}

/// `label ‖ json(key) ‖ version`.
fn row_key<K: Serialize>(label: &[u8], key: &K) -> Res<Vec<u8>> {
    let json = to_json(key)?;
    let mut out = Vec::with_capacity(label.len() + json.len() + 2);
    out.extend_from_slice(label);
    out.extend_from_slice(&json);
    out.extend_from_slice(&CURRENT_VERSION.to_be_bytes());
    Ok(out)
}

fn to_value<T: Serialize>(v: &T) -> Res<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Typed row access for the provider methods below.
impl Store {
    fn kv_get<K: Serialize, V: DeserializeOwned>(&self, label: &[u8], key: &K) -> Res<Option<V>> {
        self.mls_get(&row_key(label, key)?)?.map(|b| from_json(&b)).transpose()
    }

    fn kv_put<K: Serialize, V: Serialize>(&self, label: &[u8], key: &K, value: &V) -> Res<()> {
        self.mls_put(&row_key(label, key)?, &to_json(value)?)
    }

    fn kv_delete<K: Serialize>(&self, label: &[u8], key: &K) -> Res<()> {
        self.mls_delete(&row_key(label, key)?)
    }

    /// A list row; absent reads as empty.
    fn kv_list<K: Serialize, V: DeserializeOwned>(&self, label: &[u8], key: &K) -> Res<Vec<V>> {
        Ok(self.kv_get(label, key)?.unwrap_or_default())
    }

    /// Appends `item` to a list row.
    fn kv_append<K: Serialize, V: Serialize>(&self, label: &[u8], key: &K, item: &V) -> Res<()> {
        let mut list: Vec<serde_json::Value> = self.kv_list(label, key)?;
        list.push(to_value(item)?);
        self.kv_put(label, key, &list)
    }

    /// Removes the first occurrence of `item` from a list row (dropping the
    /// row once it is empty).
    fn kv_remove<K: Serialize, V: Serialize>(&self, label: &[u8], key: &K, item: &V) -> Res<()> {
        let mut list: Vec<serde_json::Value> = self.kv_list(label, key)?;
        let item = to_value(item)?;
        let Some(pos) = list.iter().position(|v| *v == item) else {
            return Ok(());
        };
        list.remove(pos);
        if list.is_empty() {
            self.kv_delete(label, key)
        } else {
            self.kv_put(label, key, &list)
        }
    }
}

impl StorageProvider<CURRENT_VERSION> for Store {
    type Error = StoreError;

    // ------------------------------------------------ group state writers

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Res<()> {
        self.kv_put(label::JOIN_CONFIG, group_id, config)
    }

    fn append_own_leaf_node<GroupId: traits::GroupId<CURRENT_VERSION>, LeafNode: traits::LeafNode<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Res<()> {
        self.kv_append(label::OWN_LEAF_NODES, group_id, leaf_node)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Res<()> {
        self.kv_put(label::QUEUED_PROPOSAL, &(group_id, proposal_ref), proposal)?;
        self.kv_append(label::PROPOSAL_QUEUE_REFS, group_id, proposal_ref)
    }

    fn write_tree<GroupId: traits::GroupId<CURRENT_VERSION>, TreeSync: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Res<()> {
        self.kv_put(label::TREE, group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Res<()> {
        self.kv_put(label::INTERIM_TRANSCRIPT_HASH, group_id, interim_transcript_hash)
    }

    fn write_context<GroupId: traits::GroupId<CURRENT_VERSION>, GroupContext: traits::GroupContext<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Res<()> {
        self.kv_put(label::GROUP_CONTEXT, group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Res<()> {
        self.kv_put(label::CONFIRMATION_TAG, group_id, confirmation_tag)
    }

    fn write_group_state<GroupState: traits::GroupState<CURRENT_VERSION>, GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Res<()> {
        self.kv_put(label::GROUP_STATE, group_id, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Res<()> {
        self.kv_put(label::MESSAGE_SECRETS, group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Res<()> {
        self.kv_put(label::RESUMPTION_PSK_STORE, group_id, resumption_psk_store)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Res<()> {
        self.kv_put(label::OWN_LEAF_INDEX, group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Res<()> {
        self.kv_put(label::EPOCH_SECRETS, group_id, group_epoch_secrets)
    }

    // ---------------------------------------------- crypto object writers

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Res<()> {
        self.kv_put(label::SIGNATURE_KEY_PAIR, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Res<()> {
        self.kv_put(label::ENCRYPTION_KEY_PAIR, public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Res<()> {
        self.kv_put(label::EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index), &key_pairs)
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Res<()> {
        self.kv_put(label::KEY_PACKAGE, hash_ref, key_package)
    }

    fn write_psk<PskId: traits::PskId<CURRENT_VERSION>, PskBundle: traits::PskBundle<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Res<()> {
        self.kv_put(label::PSK, psk_id, psk)
    }

    // ------------------------------------------------ group state getters

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<MlsGroupJoinConfig>> {
        self.kv_get(label::JOIN_CONFIG, group_id)
    }

    fn own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>, LeafNode: traits::LeafNode<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Vec<LeafNode>> {
        self.kv_list(label::OWN_LEAF_NODES, group_id)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Vec<ProposalRef>> {
        self.kv_list(label::PROPOSAL_QUEUE_REFS, group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Vec<(ProposalRef, QueuedProposal)>> {
        let refs: Vec<ProposalRef> = self.queued_proposal_refs(group_id)?;
        refs.into_iter()
            .map(|r| match self.kv_get(label::QUEUED_PROPOSAL, &(group_id, &r))? {
                Some(p) => Ok((r, p)),
                None => Err(StoreError::Corrupt("queued proposal ref without a proposal".into())),
            })
            .collect()
    }

    fn tree<GroupId: traits::GroupId<CURRENT_VERSION>, TreeSync: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<TreeSync>> {
        self.kv_get(label::TREE, group_id)
    }

    fn group_context<GroupId: traits::GroupId<CURRENT_VERSION>, GroupContext: traits::GroupContext<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<GroupContext>> {
        self.kv_get(label::GROUP_CONTEXT, group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<InterimTranscriptHash>> {
        self.kv_get(label::INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<ConfirmationTag>> {
        self.kv_get(label::CONFIRMATION_TAG, group_id)
    }

    fn group_state<GroupState: traits::GroupState<CURRENT_VERSION>, GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<GroupState>> {
        self.kv_get(label::GROUP_STATE, group_id)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<MessageSecrets>> {
        self.kv_get(label::MESSAGE_SECRETS, group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<ResumptionPskStore>> {
        self.kv_get(label::RESUMPTION_PSK_STORE, group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<LeafNodeIndex>> {
        self.kv_get(label::OWN_LEAF_INDEX, group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<GroupEpochSecrets>> {
        self.kv_get(label::EPOCH_SECRETS, group_id)
    }

    // ---------------------------------------------- crypto object getters

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Res<Option<SignatureKeyPair>> {
        self.kv_get(label::SIGNATURE_KEY_PAIR, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Res<Option<HpkeKeyPair>> {
        self.kv_get(label::ENCRYPTION_KEY_PAIR, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Res<Vec<HpkeKeyPair>> {
        self.kv_list(label::EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Res<Option<KeyPackage>> {
        self.kv_get(label::KEY_PACKAGE, hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Res<Option<PskBundle>> {
        self.kv_get(label::PSK, psk_id)
    }

    // ----------------------------------------------- group state deleters

    fn remove_proposal<GroupId: traits::GroupId<CURRENT_VERSION>, ProposalRef: traits::ProposalRef<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Res<()> {
        self.kv_remove(label::PROPOSAL_QUEUE_REFS, group_id, proposal_ref)?;
        self.kv_delete(label::QUEUED_PROPOSAL, &(group_id, proposal_ref))
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::OWN_LEAF_NODES, group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::JOIN_CONFIG, group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::TREE, group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::CONFIRMATION_TAG, group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::GROUP_STATE, group_id)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::GROUP_CONTEXT, group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::MESSAGE_SECRETS, group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Res<()> {
        self.kv_delete(label::RESUMPTION_PSK_STORE, group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::OWN_LEAF_INDEX, group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &GroupId) -> Res<()> {
        self.kv_delete(label::EPOCH_SECRETS, group_id)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<()> {
        let refs: Vec<ProposalRef> = self.queued_proposal_refs(group_id)?;
        for r in &refs {
            self.kv_delete(label::QUEUED_PROPOSAL, &(group_id, r))?;
        }
        self.kv_delete(label::PROPOSAL_QUEUE_REFS, group_id)
    }

    // --------------------------------------------- crypto object deleters

    fn delete_signature_key_pair<SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>>(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Res<()> {
        self.kv_delete(label::SIGNATURE_KEY_PAIR, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Res<()> {
        self.kv_delete(label::ENCRYPTION_KEY_PAIR, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Res<()> {
        self.kv_delete(label::EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Res<()> {
        self.kv_delete(label::KEY_PACKAGE, hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(&self, psk_id: &PskKey) -> Res<()> {
        self.kv_delete(label::PSK, psk_id)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;
    use std::path::Path;

    use openmls::prelude::hash_ref::ProposalRef;
    use openmls::prelude::tls_codec::Deserialize as _;
    use openmls::prelude::*;
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::RustCrypto;
    use openmls_traits::storage::StorageProvider as _;

    use super::{label, row_key};
    use crate::{Store, StoreError};

    type TestResult<T = ()> = std::result::Result<T, Box<dyn Error>>;

    const CS: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

    /// A provider whose storage is a [`Store`].
    struct P {
        crypto: RustCrypto,
        store: Store,
    }

    impl OpenMlsProvider for P {
        type CryptoProvider = RustCrypto;
        type RandProvider = RustCrypto;
        type StorageProvider = Store;

        fn storage(&self) -> &Store {
            &self.store
        }

        fn crypto(&self) -> &RustCrypto {
            &self.crypto
        }

        fn rand(&self) -> &RustCrypto {
            &self.crypto
        }
    }

    fn provider(store: Store) -> P {
        P {
            crypto: RustCrypto::default(),
            store,
        }
    }

    fn open(path: &Path) -> TestResult<P> {
        Ok(provider(Store::open(path)?))
    }

    fn in_memory() -> TestResult<P> {
        Ok(provider(Store::open_in_memory()?))
    }

    /// A fresh signer (stored in `p`) and its credential.
    fn identity(p: &P, name: &str) -> TestResult<(SignatureKeyPair, CredentialWithKey)> {
        let keys = SignatureKeyPair::new(CS.signature_algorithm())?;
        keys.store(p.storage())?;
        let cred = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: keys.to_public_vec().into(),
        };
        Ok((keys, cred))
    }

    fn reload_keys(p: &P, public: &[u8]) -> TestResult<SignatureKeyPair> {
        SignatureKeyPair::read(p.storage(), public, CS.signature_algorithm()).ok_or_else(|| "signer missing".into())
    }

    fn group_config() -> MlsGroupCreateConfig {
        MlsGroupCreateConfig::builder()
            .ciphersuite(CS)
            .use_ratchet_tree_extension(true)
            .build()
    }

    fn key_package(p: &P, name: &str) -> TestResult<KeyPackage> {
        let (keys, cred) = identity(p, name)?;
        Ok(KeyPackage::builder().build(CS, p, &keys, cred)?.key_package().clone())
    }

    /// Serializes and parses a message, as the network would.
    fn wire(m: &MlsMessageOut) -> TestResult<MlsMessageIn> {
        Ok(MlsMessageIn::tls_deserialize_exact(m.to_bytes()?)?)
    }

    fn send(g: &mut MlsGroup, p: &P, keys: &SignatureKeyPair, text: &str) -> TestResult<MlsMessageIn> {
        wire(&g.create_message(p, keys, text.as_bytes())?)
    }

    fn receive(g: &mut MlsGroup, p: &P, m: MlsMessageIn) -> TestResult<ProcessedMessageContent> {
        Ok(g.process_message(p, m.try_into_protocol_message()?)?.into_content())
    }

    fn receive_text(g: &mut MlsGroup, p: &P, m: MlsMessageIn) -> TestResult<String> {
        match receive(g, p, m)? {
            ProcessedMessageContent::ApplicationMessage(a) => Ok(String::from_utf8(a.into_bytes())?),
            _ => Err("expected an application message".into()),
        }
    }

    fn load(p: &P, group_id: &GroupId) -> TestResult<MlsGroup> {
        MlsGroup::load(p.storage(), group_id)?.ok_or_else(|| "group missing".into())
    }

    #[test]
    fn group_lifecycle_survives_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (a_path, b_path) = (dir.path().join("a.redb"), dir.path().join("b.redb"));

        // --- first session: create, add, join, one message
        let (pa, pb) = (open(&a_path)?, open(&b_path)?);
        let (a_keys, a_cred) = identity(&pa, "alice")?;
        let (b_keys, b_cred) = identity(&pb, "bob")?;
        let cfg = group_config();
        let mut ga = MlsGroup::new(&pa, &a_keys, &cfg, a_cred)?;
        let bob_kp = KeyPackage::builder().build(CS, &pb, &b_keys, b_cred)?;

        // Adding bob and merging the commit form one unit of work.
        let welcome = pa.store.unit(|| -> TestResult<MlsMessageOut> {
            let (_commit, welcome, _info) = ga.add_members(&pa, &a_keys, &[bob_kp.key_package().clone()])?;
            ga.merge_pending_commit(&pa)?;
            Ok(welcome)
        })?;
        let MlsMessageBodyIn::Welcome(welcome) = wire(&welcome)?.extract() else {
            return Err("expected a Welcome".into());
        };
        let mut gb = pb.store.unit(|| -> TestResult<MlsGroup> {
            let staged = StagedWelcome::new_from_welcome(&pb, cfg.join_config(), welcome, None)?;
            Ok(staged.into_group(&pb)?)
        })?;

        let m = send(&mut ga, &pa, &a_keys, "hello bob")?;
        assert_eq!(receive_text(&mut gb, &pb, m)?, "hello bob");

        let group_id = ga.group_id().clone();
        let epoch = ga.epoch();
        let (a_pub, b_pub) = (a_keys.to_public_vec(), b_keys.to_public_vec());
        drop((ga, gb, a_keys, b_keys));
        drop((pa, pb));

        // --- second session: everything comes back from the files
        let (pa, pb) = (open(&a_path)?, open(&b_path)?);
        let (a_keys, b_keys) = (reload_keys(&pa, &a_pub)?, reload_keys(&pb, &b_pub)?);
        let mut ga = load(&pa, &group_id)?;
        let mut gb = load(&pb, &group_id)?;
        assert_eq!(ga.epoch(), epoch);
        assert_eq!(gb.epoch(), epoch);
        assert_eq!(ga.members().count(), 2);

        let (commit, _welcome, _info) = ga
            .self_update(&pa, &a_keys, LeafNodeParameters::default())?
            .into_messages();
        ga.merge_pending_commit(&pa)?;
        match receive(&mut gb, &pb, wire(&commit)?)? {
            ProcessedMessageContent::StagedCommitMessage(sc) => gb.merge_staged_commit(&pb, *sc)?,
            _ => return Err("expected a commit".into()),
        }
        assert_eq!(ga.epoch().as_u64(), epoch.as_u64() + 1);
        assert_eq!(gb.epoch(), ga.epoch());

        let m = send(&mut ga, &pa, &a_keys, "after reopen")?;
        assert_eq!(receive_text(&mut gb, &pb, m)?, "after reopen");
        let m = send(&mut gb, &pb, &b_keys, "hi alice")?;
        assert_eq!(receive_text(&mut ga, &pa, m)?, "hi alice");
        Ok(())
    }

    #[test]
    fn a_group_sealed_under_a_passphrase_comes_back_only_with_it() -> TestResult {
        let dir = tempfile::tempdir()?;
        let a_path = dir.path().join("a.redb");
        let (pa, pb) = (open(&a_path)?, in_memory()?);
        let (a_keys, a_cred) = identity(&pa, "alice")?;
        let (b_keys, b_cred) = identity(&pb, "bob")?;
        let cfg = group_config();
        let mut ga = MlsGroup::new(&pa, &a_keys, &cfg, a_cred)?;
        let bob_kp = KeyPackage::builder().build(CS, &pb, &b_keys, b_cred)?;
        let (_commit, welcome, _info) = ga.add_members(&pa, &a_keys, &[bob_kp.key_package().clone()])?;
        ga.merge_pending_commit(&pa)?;
        let MlsMessageBodyIn::Welcome(welcome) = wire(&welcome)?.extract() else {
            return Err("expected a Welcome".into());
        };
        let mut gb = StagedWelcome::new_from_welcome(&pb, cfg.join_config(), welcome, None)?.into_group(&pb)?;

        // The rows written so far are sealed when the passphrase is set, the
        // ones written after it are sealed as they are written.
        pa.store.set_passphrase(None, Some("correct horse"))?;
        let m = send(&mut ga, &pa, &a_keys, "sealed")?;
        assert_eq!(receive_text(&mut gb, &pb, m)?, "sealed");
        let (group_id, a_pub) = (ga.group_id().clone(), a_keys.to_public_vec());
        drop((ga, a_keys, pa));

        let pa = open(&a_path)?;
        assert!(pa.store.is_locked()?);
        assert!(matches!(
            MlsGroup::load(pa.storage(), &group_id),
            Err(StoreError::Locked)
        ));
        assert!(matches!(
            pa.store.unlock("wrong horse"),
            Err(StoreError::WrongPassphrase)
        ));
        pa.store.unlock("correct horse")?;
        let a_keys = reload_keys(&pa, &a_pub)?;
        let mut ga = load(&pa, &group_id)?;
        let m = send(&mut ga, &pa, &a_keys, "after the restart")?;
        assert_eq!(receive_text(&mut gb, &pb, m)?, "after the restart");
        Ok(())
    }

    #[test]
    fn failed_unit_rolls_back() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("s.redb"))?;

        let out = store.unit(|| -> Result<(), StoreError> {
            store.mls_put(b"k", b"v")?;
            // Inside the unit the write is visible.
            assert_eq!(store.mls_get(b"k")?.as_deref(), Some(&b"v"[..]));
            Err(StoreError::Corrupt("boom".into()))
        });
        assert!(matches!(out, Err(StoreError::Corrupt(_))));
        assert_eq!(store.mls_get(b"k")?, None);

        store.unit(|| store.mls_put(b"k", b"v"))?;
        assert_eq!(store.mls_get(b"k")?.as_deref(), Some(&b"v"[..]));
        Ok(())
    }

    #[test]
    fn failed_unit_rolls_back_an_mls_operation() -> TestResult {
        let p = in_memory()?;
        let (keys, cred) = identity(&p, "alice")?;
        let mut g = MlsGroup::new(&p, &keys, &group_config(), cred)?;
        let gid = g.group_id().clone();
        let epoch = g.epoch();

        let out = p.store.unit(|| -> TestResult {
            g.self_update(&p, &keys, LeafNodeParameters::default())?;
            g.merge_pending_commit(&p)?;
            assert_eq!(g.epoch().as_u64(), epoch.as_u64() + 1);
            Err("the send failed".into())
        });
        assert!(out.is_err());

        // The in-memory group is ahead of storage; the stored one is intact.
        let mut g = load(&p, &gid)?;
        assert_eq!(g.epoch(), epoch);
        g.self_update(&p, &keys, LeafNodeParameters::default())?;
        g.merge_pending_commit(&p)?;
        assert_eq!(load(&p, &gid)?.epoch().as_u64(), epoch.as_u64() + 1);
        Ok(())
    }

    #[test]
    fn proposal_queue_round_trips() -> TestResult {
        let (pa, pb, pc) = (in_memory()?, in_memory()?, in_memory()?);
        let (keys, cred) = identity(&pa, "alice")?;
        let mut g = MlsGroup::new(&pa, &keys, &group_config(), cred)?;
        let gid = g.group_id().clone();

        let (_m, bob_ref) = g.propose_add_member(&pa, &keys, &key_package(&pb, "bob")?)?;
        let (_m, carol_ref) = g.propose_add_member(&pa, &keys, &key_package(&pc, "carol")?)?;
        let refs: Vec<ProposalRef> = pa.store.queued_proposal_refs(&gid)?;
        assert_eq!(refs, [bob_ref.clone(), carol_ref.clone()]);

        // The queue is restored by load.
        let mut g = load(&pa, &gid)?;
        assert_eq!(g.pending_proposals().count(), 2);

        g.remove_pending_proposal(pa.storage(), &bob_ref)?;
        let refs: Vec<ProposalRef> = pa.store.queued_proposal_refs(&gid)?;
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0], carol_ref);
        assert_eq!(
            pa.store.mls_get(&row_key(label::QUEUED_PROPOSAL, &(&gid, &bob_ref))?)?,
            None
        );
        assert_eq!(load(&pa, &gid)?.pending_proposals().count(), 1);

        g.commit_to_pending_proposals(&pa, &keys)?;
        g.merge_pending_commit(&pa)?;
        assert_eq!(g.members().count(), 2);
        let refs: Vec<ProposalRef> = pa.store.queued_proposal_refs(&gid)?;
        assert!(refs.is_empty());
        assert_eq!(
            pa.store
                .mls_get(&row_key(label::QUEUED_PROPOSAL, &(&gid, &carol_ref))?)?,
            None
        );
        assert_eq!(load(&pa, &gid)?.pending_proposals().count(), 0);
        Ok(())
    }

    #[test]
    fn absent_and_corrupt_rows() -> TestResult {
        let p = in_memory()?;
        let s = &p.store;
        let gid = GroupId::from_slice(b"nobody");

        // Absent: None, empty lists, and deletes that succeed.
        assert!(s.own_leaf_nodes::<GroupId, LeafNode>(&gid)?.is_empty());
        assert!(s.queued_proposal_refs::<GroupId, ProposalRef>(&gid)?.is_empty());
        assert!(s.own_leaf_index::<GroupId, LeafNodeIndex>(&gid)?.is_none());
        s.delete_tree(&gid)?;
        s.delete_own_leaf_nodes(&gid)?;
        s.clear_proposal_queue::<GroupId, ProposalRef>(&gid)?;
        assert!(MlsGroup::load(s, &gid)?.is_none());

        // Corrupt: an error, not a panic.
        s.mls_put(&row_key(label::OWN_LEAF_NODES, &gid)?, b"{not json")?;
        let r = s.own_leaf_nodes::<GroupId, LeafNode>(&gid);
        assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
        s.mls_put(&row_key(label::OWN_LEAF_INDEX, &gid)?, b"\"seven\"")?;
        let r = s.own_leaf_index::<GroupId, LeafNodeIndex>(&gid);
        assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");

        // A real group whose tree row is damaged fails to load cleanly.
        let (keys, cred) = identity(&p, "alice")?;
        let g = MlsGroup::new(&p, &keys, &group_config(), cred)?;
        let gid = g.group_id().clone();
        drop(g);
        s.mls_put(&row_key(label::TREE, &gid)?, b"[1,2,3]")?;
        assert!(matches!(MlsGroup::load(s, &gid), Err(StoreError::Corrupt(_))));
        Ok(())
    }
}
