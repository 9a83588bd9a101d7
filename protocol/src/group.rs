//! Group chats: metadata, roles, and who may change what.
//!
//! A group is an MLS group whose GroupContext carries a [`GroupMeta`] as the
//! extension [`GROUP_META_EXTENSION`]. Because the GroupContext is part of
//! every epoch's key schedule, all members agree on the metadata of each
//! epoch, and only a commit changes it. The rules here decide whether a
//! member's commit is allowed; [`crate::mls`] applies them to every commit
//! before merging it.
//!
//! Rules (the sender is the account of the committing device):
//! - anyone may update their own leaf (self-update);
//! - adding devices: admins and the owner may add anyone; any member may add
//!   devices of their own account (linking a new device);
//! - removing devices: admins and the owner may remove devices of plain
//!   members; only the owner may remove an admin's devices; the owner's devices
//!   can only be removed by the owner; any member may remove devices of their
//!   own account (leaving, or revoking a device);
//! - metadata: admins and the owner may change name, description and relays;
//!   only the owner may change roles, and the new metadata must keep exactly
//!   one owner (so ownership moves only by the owner's own commit).

use std::collections::BTreeMap;

use prost::Message;

use crate::identity::AccountId;
use crate::pb;

/// The GroupContext extension type that holds a group's [`GroupMeta`].
pub const GROUP_META_EXTENSION: u16 = 0xf1d0;
/// Longest group name, in bytes.
pub const MAX_GROUP_NAME: usize = 64;
/// Longest group description, in bytes.
pub const MAX_GROUP_DESCRIPTION: usize = 1024;
/// Most relays a group lists.
pub const MAX_GROUP_RELAYS: usize = 8;
/// Longest relay address.
pub const MAX_GROUP_RELAY_ADDR: usize = 512;
/// Most accounts with a role above member.
pub const MAX_GROUP_ROLES: usize = 256;
/// Largest encoded metadata accepted.
pub const MAX_GROUP_META: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("group metadata is malformed: {0}")]
    Decode(String),
    #[error("group metadata is larger than {MAX_GROUP_META} bytes")]
    TooLarge,
    #[error("group name, description or relay list is too long")]
    TooLong,
    #[error("group metadata must name exactly one owner")]
    Owner,
    #[error("the group has no metadata")]
    Missing,
}

/// A member's standing in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    fn to_pb(self) -> pb::Role {
        match self {
            Role::Member => pb::Role::Member,
            Role::Admin => pb::Role::Admin,
            Role::Owner => pb::Role::Owner,
        }
    }

    fn from_pb(r: i32) -> Option<Self> {
        match pb::Role::try_from(r).ok()? {
            pb::Role::Member => Some(Role::Member),
            pb::Role::Admin => Some(Role::Admin),
            pb::Role::Owner => Some(Role::Owner),
        }
    }
}

/// A group's name, description, roles and relays, as every member sees them
/// in the current epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMeta {
    pub name: String,
    pub description: String,
    /// Accounts with a role above member, by account key.
    pub roles: BTreeMap<[u8; 32], Role>,
    /// The group's relays; the first sequences handshake messages.
    pub relays: Vec<String>,
    /// The group inbox key derives from this ([`group_inbox_seed`]). Only
    /// members learn it; it is replaced when someone is removed.
    pub inbox_seed: [u8; 32],
}

impl GroupMeta {
    /// Metadata of a new group owned by `owner`; `inbox_seed` must be random.
    pub fn new(name: impl Into<String>, owner: &AccountId, relays: Vec<String>, inbox_seed: [u8; 32]) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            roles: BTreeMap::from([(*owner.as_bytes(), Role::Owner)]),
            relays,
            inbox_seed,
        }
    }

    /// The role of `account` (plain member if it holds none).
    pub fn role(&self, account: &[u8; 32]) -> Role {
        self.roles.get(account).copied().unwrap_or(Role::Member)
    }

    /// The owner's account key.
    pub fn owner(&self) -> Option<[u8; 32]> {
        self.roles.iter().find(|(_, r)| **r == Role::Owner).map(|(a, _)| *a)
    }

    /// Checks the limits and that there is exactly one owner.
    pub fn validate(&self) -> Result<(), GroupError> {
        if self.name.len() > MAX_GROUP_NAME
            || self.description.len() > MAX_GROUP_DESCRIPTION
            || self.relays.len() > MAX_GROUP_RELAYS
            || self.relays.iter().any(|r| r.len() > MAX_GROUP_RELAY_ADDR)
            || self.roles.len() > MAX_GROUP_ROLES
        {
            return Err(GroupError::TooLong);
        }
        if self.roles.values().filter(|r| **r == Role::Owner).count() != 1 {
            return Err(GroupError::Owner);
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        pb::GroupMeta {
            name: self.name.clone(),
            description: self.description.clone(),
            roles: self
                .roles
                .iter()
                .filter(|(_, r)| **r != Role::Member)
                .map(|(a, r)| pb::GroupRole {
                    account: a.to_vec(),
                    role: r.to_pb() as i32,
                })
                .collect(),
            relays: self.relays.clone(),
            inbox_seed: self.inbox_seed.to_vec(),
        }
        .encode_to_vec()
    }

    /// Decodes and validates metadata.
    pub fn decode(bytes: &[u8]) -> Result<Self, GroupError> {
        if bytes.len() > MAX_GROUP_META {
            return Err(GroupError::TooLarge);
        }
        let m = pb::GroupMeta::decode(bytes).map_err(|e| GroupError::Decode(e.to_string()))?;
        let mut roles = BTreeMap::new();
        for r in m.roles {
            let account: [u8; 32] = r
                .account
                .as_slice()
                .try_into()
                .map_err(|_| GroupError::Decode("account key must be 32 bytes".into()))?;
            let role = Role::from_pb(r.role).ok_or_else(|| GroupError::Decode("unknown role".into()))?;
            if role != Role::Member && roles.insert(account, role).is_some() {
                return Err(GroupError::Decode("an account is listed twice".into()));
            }
        }
        let inbox_seed = m
            .inbox_seed
            .as_slice()
            .try_into()
            .map_err(|_| GroupError::Decode("inbox seed must be 32 bytes".into()))?;
        let meta = Self {
            name: m.name,
            description: m.description,
            roles,
            relays: m.relays,
            inbox_seed,
        };
        meta.validate()?;
        Ok(meta)
    }
}

/// The Ed25519 seed of a group's inbox key: the inbox on the group's relays is
/// `mailbox::inbox_id` of its public key, members sign fetches with it and
/// issue themselves deposit capabilities with it.
pub fn group_inbox_seed(inbox_seed: &[u8; 32]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"tidings group inbox v1");
    h.update(inbox_seed);
    h.finalize().into()
}

/// The account-sized key under which a group's history rows are kept.
pub fn group_chat_key(group_id: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"tidings group chat v1");
    h.update(group_id);
    h.finalize().into()
}

/// What a member wants to change. A commit carries one intent; when another
/// member's commit wins the epoch, the intent is re-applied on the new epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// Add the devices behind these TLS-encoded key packages.
    Add(Vec<Vec<u8>>),
    /// Remove these devices (by device key).
    Remove(Vec<[u8; 32]>),
    /// Replace the metadata.
    SetMeta(GroupMeta),
    /// Fresh leaf keys for this device (post-compromise security).
    SelfUpdate,
    /// Commit the pending proposals (members leaving); nothing if none.
    CommitProposals,
}

/// What a commit changes, as far as the rules care.
#[derive(Debug, Clone, Default)]
pub struct CommitSummary {
    /// Accounts of the devices added.
    pub added: Vec<[u8; 32]>,
    /// Accounts of the devices removed by someone of another account.
    pub removed: Vec<[u8; 32]>,
    /// Accounts of the devices removed on their own account's proposal or
    /// commit (leaving, revoking a device): allowed to anyone.
    pub left: Vec<[u8; 32]>,
    /// The metadata after the commit, if the commit changes it.
    pub new_meta: Option<GroupMeta>,
}

/// Whether `sender` may make the changes in `summary` to a group whose
/// current metadata is `meta`. Returns the reason when not.
pub fn authorize(meta: &GroupMeta, sender: &[u8; 32], summary: &CommitSummary) -> Result<(), String> {
    let role = meta.role(sender);
    for added in &summary.added {
        if role < Role::Admin && added != sender {
            return Err("only admins add other people".into());
        }
    }
    for removed in &summary.removed {
        if removed == sender {
            continue;
        }
        let needed = match meta.role(removed) {
            Role::Member => Role::Admin,
            Role::Admin | Role::Owner => Role::Owner,
        };
        if meta.role(removed) == Role::Owner || role < needed {
            return Err("not allowed to remove that member".into());
        }
    }
    if let Some(new) = &summary.new_meta {
        new.validate().map_err(|e| e.to_string())?;
        // A removal always moves the group to a new inbox; whoever may remove
        // may do that. Anything else about the group is for admins.
        let only_inbox = !(summary.removed.is_empty() && summary.left.is_empty()) && {
            let mut same = new.clone();
            same.inbox_seed = meta.inbox_seed;
            same == *meta
        };
        if role < Role::Admin && !only_inbox {
            return Err("only admins change the group".into());
        }
        if new.roles != meta.roles && role != Role::Owner {
            return Err("only the owner changes roles".into());
        }
        // Members read the group inbox from a cursor on its first relay: a move
        // to other relays starts a new inbox, so no cursor points into another
        // relay's sequence.
        if new.relays != meta.relays && (new.relays.is_empty() || new.inbox_seed == meta.inbox_seed) {
            return Err("a move to other relays needs a new inbox and at least one relay".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AccountKey;

    fn acct(n: u8) -> AccountId {
        AccountKey::from_seed([n; 32]).id()
    }

    #[test]
    fn metadata_round_trips_and_needs_exactly_one_owner() {
        let owner = acct(1);
        let mut m = GroupMeta::new("friends", &owner, vec!["/ip4/1.2.3.4/tcp/1/p2p/x".into()], [9; 32]);
        m.roles.insert(*acct(2).as_bytes(), Role::Admin);
        assert_eq!(GroupMeta::decode(&m.encode()).unwrap(), m);
        let mut two = m.clone();
        two.roles.insert(*acct(3).as_bytes(), Role::Owner);
        assert_eq!(GroupMeta::decode(&two.encode()), Err(GroupError::Owner));
        let mut none = m.clone();
        none.roles.remove(owner.as_bytes());
        assert_eq!(GroupMeta::decode(&none.encode()), Err(GroupError::Owner));
        let mut long = m;
        long.name = "x".repeat(MAX_GROUP_NAME + 1);
        assert_eq!(GroupMeta::decode(&long.encode()), Err(GroupError::TooLong));
        assert!(matches!(GroupMeta::decode(&[0xff; 8]), Err(GroupError::Decode(_))));
    }

    #[test]
    fn only_admins_change_membership_except_for_their_own_devices() {
        let (owner, admin, member, other) = (acct(1), acct(2), acct(3), acct(4));
        let mut meta = GroupMeta::new("g", &owner, Vec::new(), [9; 32]);
        meta.roles.insert(*admin.as_bytes(), Role::Admin);
        let add = |a: &AccountId| CommitSummary {
            added: vec![*a.as_bytes()],
            ..Default::default()
        };
        let remove = |a: &AccountId| CommitSummary {
            removed: vec![*a.as_bytes()],
            ..Default::default()
        };
        let m = member.as_bytes();
        assert!(authorize(&meta, m, &add(&other)).is_err(), "members do not add others");
        assert!(
            authorize(&meta, m, &add(&member)).is_ok(),
            "members link their own devices"
        );
        assert!(authorize(&meta, m, &remove(&member)).is_ok(), "members leave");
        assert!(authorize(&meta, m, &remove(&other)).is_err());
        assert!(authorize(&meta, admin.as_bytes(), &add(&other)).is_ok());
        assert!(authorize(&meta, admin.as_bytes(), &remove(&member)).is_ok());
        assert!(authorize(&meta, admin.as_bytes(), &remove(&owner)).is_err());
        assert!(authorize(&meta, owner.as_bytes(), &remove(&admin)).is_ok());
        assert!(
            authorize(&meta, admin.as_bytes(), &remove(&admin)).is_ok(),
            "admins leave too"
        );
    }

    #[test]
    fn only_the_owner_changes_roles_and_ownership_moves_by_the_owner() {
        let (owner, admin, member) = (acct(1), acct(2), acct(3));
        let mut meta = GroupMeta::new("g", &owner, Vec::new(), [9; 32]);
        meta.roles.insert(*admin.as_bytes(), Role::Admin);
        let mut renamed = meta.clone();
        renamed.name = "new name".into();
        let set = |m: &GroupMeta| CommitSummary {
            new_meta: Some(m.clone()),
            ..Default::default()
        };
        assert!(authorize(&meta, admin.as_bytes(), &set(&renamed)).is_ok());
        assert!(authorize(&meta, member.as_bytes(), &set(&renamed)).is_err());
        let mut promoted = meta.clone();
        promoted.roles.insert(*member.as_bytes(), Role::Admin);
        assert!(authorize(&meta, admin.as_bytes(), &set(&promoted)).is_err());
        assert!(authorize(&meta, owner.as_bytes(), &set(&promoted)).is_ok());
        // Transfer: the admin becomes owner, the old owner an admin.
        let mut transferred = meta.clone();
        transferred.roles.insert(*admin.as_bytes(), Role::Owner);
        transferred.roles.insert(*owner.as_bytes(), Role::Admin);
        assert!(authorize(&meta, owner.as_bytes(), &set(&transferred)).is_ok());
        assert!(authorize(&meta, admin.as_bytes(), &set(&transferred)).is_err());
        let mut ownerless = meta.clone();
        ownerless.roles.remove(owner.as_bytes());
        assert!(authorize(&meta, owner.as_bytes(), &set(&ownerless)).is_err());
    }

    #[test]
    fn a_move_to_other_relays_is_for_admins_and_needs_a_new_inbox() {
        let (owner, member) = (acct(1), acct(3));
        let meta = GroupMeta::new("g", &owner, vec!["/ip4/10.0.0.1/tcp/1/p2p/a".into()], [9; 32]);
        let set = |m: &GroupMeta| CommitSummary {
            new_meta: Some(m.clone()),
            ..Default::default()
        };
        let mut moved = meta.clone();
        moved.relays = vec!["/ip4/10.0.0.2/tcp/1/p2p/b".into()];
        assert!(
            authorize(&meta, owner.as_bytes(), &set(&moved)).is_err(),
            "same inbox on another relay"
        );
        moved.inbox_seed = [7; 32];
        assert!(authorize(&meta, owner.as_bytes(), &set(&moved)).is_ok());
        assert!(authorize(&meta, member.as_bytes(), &set(&moved)).is_err());
        let mut nowhere = meta.clone();
        nowhere.relays.clear();
        nowhere.inbox_seed = [7; 32];
        assert!(authorize(&meta, owner.as_bytes(), &set(&nowhere)).is_err());
    }

    #[test]
    fn anyone_commits_a_members_own_leaving_with_the_new_inbox_it_needs() {
        let (owner, member, other) = (acct(1), acct(3), acct(4));
        let meta = GroupMeta::new("g", &owner, vec!["/ip4/10.0.0.1/tcp/1/p2p/a".into()], [9; 32]);
        let mut rotated = meta.clone();
        rotated.inbox_seed = [7; 32];
        let leaving = CommitSummary {
            left: vec![*other.as_bytes()],
            new_meta: Some(rotated),
            ..Default::default()
        };
        assert!(authorize(&meta, member.as_bytes(), &leaving).is_ok());
        let mut renamed = meta.clone();
        renamed.inbox_seed = [7; 32];
        renamed.name = "mine now".into();
        let sneaky = CommitSummary {
            left: vec![*other.as_bytes()],
            new_meta: Some(renamed),
            ..Default::default()
        };
        assert!(
            authorize(&meta, member.as_bytes(), &sneaky).is_err(),
            "a leave carries no other change"
        );
    }
}
