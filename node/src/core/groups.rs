//! Group chats in the core task.
//!
//! A group's traffic lives in its inbox on the group's relays, addressed by a
//! key every member derives from the group's metadata (`GroupMeta::inbox_seed`).
//! Application messages are encrypted once and deposited once per relay
//! (outbox entries for a pseudo-device per relay, see [`GroupTarget`]), and
//! also pushed to members who are connected. Commits go to the first relay
//! only: it sequences them, and every member applies the group inbox of that
//! relay in index order, so all apply the same first commit of each epoch.
//! A commit of ours stays pending until the sequence decides it; when another
//! one wins, our intent is re-applied on the new epoch.

use libp2p::{Multiaddr, PeerId};
use openmls::prelude::MlsGroup;
use sha2::{Digest, Sha256};
use tidings_protocol::group::{GroupMeta, Intent, Role, group_chat_key, group_inbox_seed};
use tidings_protocol::mailbox as mb;
use tidings_protocol::mls::{MlsEngine, Sequenced};
use tidings_protocol::payload::{Body, Payload};
use tidings_protocol::pb::{self, DeliverStatus, EnvelopeKind};
use tidings_store::{Conversation, GroupRow, GroupSent, IntentRow, MessageState, PendingCommit, StoredMessage};
use tracing::{debug, info, warn};

use super::{Abort, Apply, Core, NodeError, load_group};
use crate::types::NodeEvent;

/// A commit of ours not seen in the sequence after this long is sent again.
const PENDING_RESEND_MS: u64 = 30_000;

/// Others' leaving proposals pending this long are committed by any member
/// (not only by the one whose turn it is).
const PROPOSAL_WAIT_MS: u64 = 30_000;

/// Leaf keys of ours older than this are renewed by a self-update commit
/// (the default of [`crate::NodeConfig::key_update_interval`]).
pub(crate) const SELF_UPDATE_INTERVAL_MS: u64 = 24 * 3600 * 1000;

/// How long a group inbox capability we issue ourselves is valid.
const GROUP_CAPABILITY_MS: u64 = 365 * 24 * 3600 * 1000;

/// Where one relay of a group keeps the group inbox. Outbox entries for the
/// group on that relay use [`GroupTarget::key`] as their device.
#[derive(Debug, Clone)]
pub(crate) struct GroupTarget {
    pub relay: (PeerId, Multiaddr),
    pub inbox: [u8; 32],
    pub capability: pb::Capability,
}

/// What the group sync task needs to fetch one group's inbox.
#[derive(Debug, Clone)]
pub(crate) struct GroupInbox {
    pub group_id: Vec<u8>,
    /// Ed25519 seed of the group inbox key (signs fetches).
    pub key_seed: [u8; 32],
    pub inbox_seed: [u8; 32],
    /// The sequencing relay.
    pub relay: (PeerId, Multiaddr),
    pub cursor: u64,
}

/// What the group sync task needs for all groups: where to fetch each one,
/// and when the groups' upkeep (commits sent again, proposals committed,
/// scheduled self-updates) is next due.
#[derive(Debug, Clone)]
pub(crate) struct GroupUpkeep {
    pub inboxes: Vec<GroupInbox>,
    /// Milliseconds from now until the earliest upkeep deadline; `None` when
    /// nothing is scheduled.
    pub next_due_ms: Option<u64>,
}

/// A group as the API shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct GroupView {
    /// The group id, hex.
    pub id: String,
    pub name: String,
    pub description: String,
    pub epoch: u64,
    /// The group state this device is in, as 16 hex digits: a hash of the
    /// epoch's MLS epoch authenticator. Members at the same epoch show the same
    /// fingerprint; two members at one epoch with different fingerprints are in
    /// forked groups.
    #[serde(default)]
    pub fingerprint: String,
    pub members: Vec<GroupMemberView>,
    pub relays: Vec<String>,
    /// This device was removed or left.
    pub left: bool,
}

/// See [`GroupView::fingerprint`].
fn state_fingerprint(group: &MlsGroup) -> String {
    let digest = Sha256::new()
        .chain_update(b"tidings/group-state/v1")
        .chain_update(group.epoch_authenticator().as_slice())
        .finalize();
    hex::encode(&digest[..8])
}

/// One account in a group.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct GroupMemberView {
    pub account: String,
    pub role: String,
    pub devices: usize,
}

fn role_text(r: Role) -> &'static str {
    match r {
        Role::Owner => "owner",
        Role::Admin => "admin",
        Role::Member => "member",
    }
}

/// The outbox "device" of a group inbox on one relay.
fn target_key(inbox: &[u8; 32], relay: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tidings group target v1");
    h.update(inbox);
    h.update(relay.as_bytes());
    h.finalize().into()
}

use crate::net::parse_relay;

/// The group row of `conv` if this device may change the group now: still a
/// member, with no commit of ours undecided (the caller retries later).
fn row_for_change<'a>(conv: &'a mut Conversation, gid: &[u8]) -> Result<&'a mut GroupRow, NodeError> {
    let Some(row) = conv.group.as_mut() else {
        return Err(NodeError::UnknownGroup(hex::encode(gid)));
    };
    if row.left {
        return Err(NodeError::NotAMember(hex::encode(gid)));
    }
    if row.pending.is_some() {
        return Err(NodeError::Unreachable(
            "a change of ours to this group is still waiting for the relay".into(),
        ));
    }
    Ok(row)
}

pub(crate) fn intent_of(row: &IntentRow) -> Result<Intent, NodeError> {
    Ok(match row {
        IntentRow::Add { key_packages } => Intent::Add(key_packages.clone()),
        IntentRow::Remove { devices } => Intent::Remove(devices.clone()),
        IntentRow::SetMeta { meta } => Intent::SetMeta(
            GroupMeta::decode(meta).map_err(|e| NodeError::InvalidInput(format!("group metadata: {e}")))?,
        ),
        IntentRow::SelfUpdate => Intent::SelfUpdate,
        IntentRow::CommitProposals => Intent::CommitProposals,
    })
}

impl Core {
    /// Recomputes the outbox targets of every group we are in.
    pub(super) fn load_group_targets(&mut self) {
        self.group_targets.clear();
        let groups = match self.store.list_groups() {
            Ok(g) => g,
            Err(e) => {
                warn!("cannot list groups: {e}");
                return;
            }
        };
        for c in groups {
            if c.group.as_ref().is_some_and(|g| !g.left) {
                self.refresh_group_targets(&c.group_id);
            }
        }
    }

    /// Adds one group's outbox targets for its current metadata. Targets of
    /// earlier inboxes stay, so that what is queued for them still goes out.
    pub(super) fn refresh_group_targets(&mut self, gid: &[u8]) {
        let meta = match load_group(&mut self.groups, &self.provider, gid) {
            Ok(Some(g)) if g.is_active() => MlsEngine::group_meta(g),
            _ => return,
        };
        let Ok(meta) = meta else { return };
        let key_seed = group_inbox_seed(&meta.inbox_seed);
        let inbox = mb::inbox_id(&ed25519_public(&key_seed));
        let capability = mb::issue_capability(&key_seed, self.clock.now_ms() + GROUP_CAPABILITY_MS, None);
        for r in &meta.relays {
            if let Some(relay) = parse_relay(r) {
                let target = GroupTarget {
                    relay,
                    inbox,
                    capability: capability.clone(),
                };
                self.group_targets.insert(target_key(&inbox, r), (gid.to_vec(), target));
            }
        }
    }

    /// Creates a group owned by us on `relays` (at least one; the first
    /// sequences commits). Returns the group id.
    pub(super) fn create_group(&mut self, name: &str, relays: Vec<String>) -> Result<Vec<u8>, NodeError> {
        if relays.iter().filter_map(|r| parse_relay(r)).count() == 0 {
            return Err(NodeError::Unreachable(
                "a group needs at least one relay (run with --relay)".into(),
            ));
        }
        let gid: [u8; 16] = rand::random();
        let meta = GroupMeta::new(name, &self.me, relays, rand::random());
        meta.validate()
            .map_err(|e| NodeError::InvalidInput(format!("group: {e}")))?;
        let now = self.clock.now_ms();
        let store = self.store.clone();
        let result = store.unit(|| -> Result<MlsGroup, NodeError> {
            let group = self.engine.create_named_group(&self.provider, &gid, &meta)?;
            store.put_conversation(&Conversation {
                group_id: gid.to_vec(),
                peer: group_chat_key(&gid),
                created_ms: now,
                group: Some(GroupRow {
                    cursor: 0,
                    cursor_seed: meta.inbox_seed,
                    pending: None,
                    retry: None,
                    left: false,
                    updated_ms: now,
                    leaving: None,
                    proposals_since_ms: None,
                }),
                superseded_by: None,
            })?;
            Ok(group)
        });
        match result {
            Ok(group) => {
                self.groups.insert(gid.to_vec(), group);
                self.refresh_group_targets(&gid);
                info!(group = %hex::encode(gid), "group created");
                Ok(gid.to_vec())
            }
            Err(e) => {
                self.groups.remove(gid.as_slice());
                Err(e)
            }
        }
    }

    /// Commits a change to a group and hands the commit to the sequencer.
    /// Returns false when there was nothing to do. Refused while a commit of
    /// ours is still undecided (the caller retries later).
    pub(super) fn group_intent(&mut self, gid: &[u8], intent: IntentRow) -> Result<bool, NodeError> {
        let now = self.clock.now_ms();
        let store = self.store.clone();
        let result = store.unit(|| -> Result<_, NodeError> { self.commit_in_unit(gid, intent.clone(), now) });
        match result {
            Ok(entries) => {
                let sent = !entries.is_empty();
                for (account, device, oid, env) in entries {
                    self.enqueue(account, device, oid, None, env);
                }
                Ok(sent)
            }
            Err(e) => {
                self.groups.remove(gid);
                Err(e)
            }
        }
    }

    /// Inside a unit: commits `intent` and queues the commit for the
    /// sequencing relay. Returns the outbox entries to queue after the commit.
    #[allow(clippy::type_complexity)]
    fn commit_in_unit(
        &mut self,
        gid: &[u8],
        intent: IntentRow,
        now: u64,
    ) -> Result<Vec<([u8; 32], [u8; 32], u64, pb::Envelope)>, NodeError> {
        let mut conv = self
            .store
            .conversation(gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        let row = row_for_change(&mut conv, gid)?;
        if row.leaving.is_some() {
            return Err(NodeError::NotAMember(hex::encode(gid)));
        }
        let group = load_group(&mut self.groups, &self.provider, gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        let meta = MlsEngine::group_meta(group)?;
        let Some(staged) = self
            .engine
            .commit_intent(&self.provider, group, &intent_of(&intent)?, now)?
        else {
            row.retry = None;
            self.store.put_conversation(&conv)?;
            return Ok(Vec::new());
        };
        let env = super::new_envelope(gid, EnvelopeKind::Message, staged.commit.clone());
        row.pending = Some(PendingCommit {
            commit: staged.commit,
            welcome: staged.welcome,
            epoch: staged.epoch,
            intent,
            sent_ms: now,
        });
        row.retry = None;
        self.store.put_conversation(&conv)?;
        self.group_wake.notify_one();
        Ok(vec![self.sequencer_entry(gid, &meta, env, now)?])
    }

    /// Asks to leave a group: proposals removing every device of ours from it
    /// go to the sequencer (a commit cannot remove its own committer), and
    /// another member commits them. Proposed again by [`Core::group_inboxes`]
    /// if an epoch passes without them.
    pub(super) fn leave_group(&mut self, gid: &[u8]) -> Result<(), NodeError> {
        let now = self.clock.now_ms();
        let store = self.store.clone();
        let result = store.unit(|| -> Result<_, NodeError> {
            let mut conv = store
                .conversation(gid)?
                .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
            let row = row_for_change(&mut conv, gid)?;
            let group = load_group(&mut self.groups, &self.provider, gid)?
                .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
            let epoch = group.epoch().as_u64();
            let proposals = self.engine.propose_leave(&self.provider, group)?;
            let meta = MlsEngine::group_meta(group)?;
            row.leaving = Some(epoch);
            row.retry = None;
            store.put_conversation(&conv)?;
            self.group_wake.notify_one();
            let mut entries = Vec::new();
            for p in proposals {
                let env = super::new_envelope(gid, EnvelopeKind::Message, p);
                entries.push(self.sequencer_entry(gid, &meta, env, now)?);
            }
            Ok(entries)
        });
        match result {
            Ok(entries) => {
                for (account, device, oid, env) in entries {
                    self.enqueue(account, device, oid, None, env);
                }
                info!(group = %hex::encode(gid), "asked to leave the group");
                Ok(())
            }
            Err(e) => {
                self.groups.remove(gid);
                Err(e)
            }
        }
    }

    /// Commits others' leaving proposals: at once if this device is the one
    /// to (the staying member with the lowest leaf), or when `waited` (they
    /// have been pending too long for whoever that is).
    fn commit_proposals(&mut self, gid: &[u8], waited: bool) {
        let Ok(Some(Conversation { group: Some(row), .. })) = self.store.conversation(gid) else {
            return;
        };
        if row.left || row.leaving.is_some() || row.pending.is_some() {
            return;
        }
        let ours = match load_group(&mut self.groups, &self.provider, gid) {
            Ok(Some(g)) => MlsEngine::has_pending_proposals(g) && (waited || MlsEngine::first_to_commit_proposals(g)),
            _ => false,
        };
        if ours && let Err(e) = self.group_intent(gid, IntentRow::CommitProposals) {
            debug!(group = %hex::encode(gid), "committing leaving proposals failed: {e}");
        }
    }

    /// An outbox entry handing a commit to the group's sequencing relay.
    fn sequencer_entry(
        &mut self,
        gid: &[u8],
        meta: &GroupMeta,
        env: pb::Envelope,
        now: u64,
    ) -> Result<([u8; 32], [u8; 32], u64, pb::Envelope), NodeError> {
        let Some(first) = meta.relays.iter().find(|r| parse_relay(r).is_some()) else {
            return Err(NodeError::Unreachable("the group has no relay".into()));
        };
        let key_seed = group_inbox_seed(&meta.inbox_seed);
        let inbox = mb::inbox_id(&ed25519_public(&key_seed));
        let device = target_key(&inbox, first);
        Ok(self.outbox_entry(group_chat_key(gid), device, &env, None, now)?)
    }

    /// Hands a pending commit to the sequencer again when it has not shown up
    /// in the sequence for [`PENDING_RESEND_MS`] (a relay lost or withheld
    /// it). Should both copies arrive, the later one is stale.
    fn resend_pending(&mut self, gid: &[u8], now: u64) -> Result<(), NodeError> {
        let store = self.store.clone();
        let entries = store.unit(|| -> Result<_, NodeError> {
            let Some(mut conv) = store.conversation(gid)? else {
                return Ok(None);
            };
            let Some(row) = conv.group.as_mut() else {
                return Ok(None);
            };
            let Some(p) = row.pending.as_mut() else { return Ok(None) };
            if now.saturating_sub(p.sent_ms) < PENDING_RESEND_MS {
                return Ok(None);
            }
            p.sent_ms = now;
            let env = super::new_envelope(gid, EnvelopeKind::Message, p.commit.clone());
            store.put_conversation(&conv)?;
            let group = load_group(&mut self.groups, &self.provider, gid)?
                .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
            let meta = MlsEngine::group_meta(group)?;
            Ok(Some(self.sequencer_entry(gid, &meta, env, now)?))
        })?;
        if let Some((account, device, oid, env)) = entries {
            debug!(group = %hex::encode(gid), "our commit has not been sequenced yet; sending it again");
            self.enqueue(account, device, oid, None, env);
        }
        Ok(())
    }

    /// Encrypts a text once for the group: one outbox entry per relay, plus a
    /// best-effort push to members who are connected.
    #[allow(clippy::type_complexity)]
    pub(super) fn send_group_one(
        &mut self,
        gid: &[u8],
        text: &str,
        reply_to: Option<[u8; 16]>,
        now: u64,
    ) -> Result<(StoredMessage, Vec<([u8; 32], [u8; 32], u64, pb::Envelope)>), NodeError> {
        let timer = self.check_new_text(&group_chat_key(gid), text, reply_to)?;
        let conv = self
            .store
            .conversation(gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        if conv.group.as_ref().is_none_or(|g| g.left || g.leaving.is_some()) {
            return Err(match conv.group {
                None => NodeError::UnknownGroup(hex::encode(gid)),
                Some(_) => NodeError::NotAMember(hex::encode(gid)),
            });
        }
        let (id, seq, ts, payload) = self.text_payload(text, reply_to, timer, now)?;
        let group = load_group(&mut self.groups, &self.provider, gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        let ct = self.engine.encrypt(&self.provider, group, &payload)?;
        let env = super::new_envelope(gid, EnvelopeKind::Message, ct);
        let mut entries = Vec::new();
        self.store.put_group_sent(
            &envelope_id(&env),
            &GroupSent {
                group_id: gid.to_vec(),
                payload,
                message_id: id,
            },
        )?;
        for device in self.current_target_keys(gid)? {
            entries.push(self.outbox_entry(conv.peer, device, &env, Some(id), now)?);
        }
        let mut msg = StoredMessage::new_text(
            id,
            conv.peer,
            *self.me.as_bytes(),
            seq,
            ts,
            now,
            true,
            text.to_owned(),
            MessageState::Pending,
        );
        msg.reply_to = reply_to;
        msg.expires_ms = Self::expiry_for(timer, now);
        self.store.insert_message(&msg)?;
        Ok((msg, entries))
    }

    /// The outbox devices of a group's inbox on each of its relays, from the
    /// group's current metadata.
    pub(super) fn current_target_keys(&mut self, gid: &[u8]) -> Result<Vec<[u8; 32]>, NodeError> {
        let group = load_group(&mut self.groups, &self.provider, gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        let meta = MlsEngine::group_meta(group)?;
        let inbox = mb::inbox_id(&ed25519_public(&group_inbox_seed(&meta.inbox_seed)));
        Ok(meta
            .relays
            .iter()
            .filter(|r| parse_relay(r).is_some())
            .map(|r| target_key(&inbox, r))
            .collect())
    }

    /// Encrypts one of our messages again in the group's current epoch (a
    /// commit overtook it in the sequence, so devices added by that commit
    /// cannot read the first copy). Same message id: others drop the copy.
    #[allow(clippy::type_complexity)]
    fn resend_in_unit(
        &mut self,
        gid: &[u8],
        chat: [u8; 32],
        sent: GroupSent,
        now: u64,
    ) -> Result<Vec<([u8; 32], [u8; 32], u64, pb::Envelope)>, NodeError> {
        let group = load_group(&mut self.groups, &self.provider, gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        let ct = self.engine.encrypt(&self.provider, group, &sent.payload)?;
        let env = super::new_envelope(gid, EnvelopeKind::Message, ct);
        self.store.put_group_sent(&envelope_id(&env), &sent)?;
        let mut out = Vec::new();
        for device in self.current_target_keys(gid)? {
            out.push(self.outbox_entry(chat, device, &env, None, now)?);
        }
        Ok(out)
    }

    /// After a group send committed: push the envelope to members that are
    /// connected now (the relays have it in any case).
    pub(super) fn push_to_members(&mut self, gid: &[u8], env: pb::Envelope) {
        let devices = match self.member_devices(gid) {
            Ok(d) => d,
            Err(_) => return,
        };
        let net = self.net.clone();
        tokio::spawn(async move {
            for device in devices {
                let Some(peer) = super::peer_id_of(&device) else {
                    continue;
                };
                if net.is_connected(peer).await {
                    let request = pb::DeliverRequest {
                        envelopes: vec![env.clone()],
                        ..Default::default()
                    };
                    if let Err(e) = net.deliver(peer, request).await {
                        debug!(%peer, "group push failed: {e}");
                    }
                }
            }
        });
    }

    /// What the group sync task fetches: one entry per group we are in, and
    /// when to call again. Runs the upkeep that is due: sends again our
    /// commits not yet sequenced, commits others' proposals that waited too
    /// long, and starts the periodic self-update of groups whose leaf keys of
    /// ours are older than the node's key update interval (post-compromise security).
    pub(super) fn group_inboxes(&mut self) -> Result<GroupUpkeep, NodeError> {
        let mut out = Vec::new();
        let now = self.clock.now_ms();
        // The earliest deadline among the upkeep that is not done in this pass
        // (what is done now schedules its own follow-up: a resent commit is
        // due again a full period later, a new commit wakes the sync task).
        let mut next_due: Option<u64> = None;
        let mut due_at = |at: u64| next_due = Some(next_due.map_or(at, |d| d.min(at)));
        for c in self.store.list_groups()? {
            let Some(row) = c.group else { continue };
            if row.left {
                continue;
            }
            if let Some(p) = &row.pending {
                let resend_at = p.sent_ms.saturating_add(PENDING_RESEND_MS);
                due_at(if resend_at <= now {
                    now.saturating_add(PENDING_RESEND_MS)
                } else {
                    resend_at
                });
                if let Err(e) = self.resend_pending(&c.group_id, now) {
                    debug!(group = %hex::encode(&c.group_id), "re-sending our commit failed: {e}");
                }
            }
            if row.pending.is_none() && row.retry.is_none() && row.leaving.is_none() {
                let update_at = row.updated_ms.saturating_add(self.self_update_interval_ms);
                if now > update_at {
                    if let Err(e) = self.group_intent(&c.group_id, IntentRow::SelfUpdate) {
                        debug!(group = %hex::encode(&c.group_id), "scheduled self-update failed: {e}");
                    }
                } else {
                    due_at(update_at.saturating_add(1));
                }
            }
            if let Some(t) = row.proposals_since_ms {
                let commit_at = t.saturating_add(PROPOSAL_WAIT_MS);
                if now > commit_at {
                    self.commit_proposals(&c.group_id, true);
                } else {
                    due_at(commit_at.saturating_add(1));
                }
            }
            let Ok(Some(group)) = load_group(&mut self.groups, &self.provider, &c.group_id) else {
                continue;
            };
            // Our leaving proposals lapse with their epoch: propose again.
            if row.leaving.is_some_and(|e| e != group.epoch().as_u64())
                && let Err(e) = self.leave_group(&c.group_id)
            {
                debug!(group = %hex::encode(&c.group_id), "proposing to leave again failed: {e}");
            }
            let Ok(Some(group)) = load_group(&mut self.groups, &self.provider, &c.group_id) else {
                continue;
            };
            let Ok(meta) = MlsEngine::group_meta(group) else {
                continue;
            };
            let Some(relay) = meta.relays.iter().find_map(|r| parse_relay(r)) else {
                continue;
            };
            let cursor = if row.cursor_seed == meta.inbox_seed {
                row.cursor
            } else {
                0
            };
            out.push(GroupInbox {
                group_id: c.group_id,
                key_seed: group_inbox_seed(&meta.inbox_seed),
                inbox_seed: meta.inbox_seed,
                relay,
                cursor,
            });
        }
        Ok(GroupUpkeep {
            inboxes: out,
            next_due_ms: next_due.map(|d| d.saturating_sub(now)),
        })
    }

    /// Applies envelopes fetched from a group's sequencing inbox (the one of
    /// `inbox_seed`), in index order, in one unit of work with the cursor.
    /// Returns how many were applied; 0 if the group moved to another inbox.
    pub(super) fn apply_group_inbox(
        &mut self,
        gid: &[u8],
        inbox_seed: [u8; 32],
        items: Vec<(u64, pb::Envelope)>,
    ) -> Result<usize, NodeError> {
        let now = self.clock.now_ms();
        let store = self.store.clone();
        let mut events = Vec::new();
        let mut deferred = Vec::new();
        let mut refresh = false;
        let mut proposals = false;
        let result = store.unit(|| -> Result<usize, Abort> {
            let Some(mut conv) = store.conversation(gid)? else {
                return Ok(0);
            };
            let Some(mut row) = conv.group.take() else { return Ok(0) };
            if row.left {
                return Ok(0);
            }
            if row.cursor_seed != inbox_seed {
                // Only the current inbox is applied; a new one starts at 0.
                let current = load_group(&mut self.groups, &self.provider, gid)?
                    .and_then(|g| MlsEngine::group_meta(g).ok())
                    .map(|m| m.inbox_seed);
                if current != Some(inbox_seed) {
                    return Ok(0);
                }
                row.cursor_seed = inbox_seed;
                row.cursor = 0;
            }
            let mut applied = 0;
            for (index, env) in items {
                if index <= row.cursor {
                    continue;
                }
                row.cursor = index;
                applied += 1;
                let Ok(id) = <[u8; 16]>::try_from(env.id.as_slice()) else {
                    continue;
                };
                if env.conversation_id != gid || store.envelope_seen(&id)? {
                    continue;
                }
                // One of our own messages: groups keep no past epochs, so it is
                // recognised by its envelope id, not by decrypting it.
                if !MlsEngine::is_handshake(&env.mls_message)
                    && let Some(sent) = store.take_group_sent(&id)?
                {
                    store.mark_envelope_seen(&id, now)?;
                    let sent_epoch = MlsEngine::message_epoch(&env.mls_message).unwrap_or(0);
                    let current = load_group(&mut self.groups, &self.provider, gid)
                        .ok()
                        .flatten()
                        .map_or(0, |g| g.epoch().as_u64());
                    if sent_epoch < current {
                        debug!(group = %hex::encode(gid), "a commit overtook our message; sending it again");
                        let entries = self.resend_in_unit(gid, conv.peer, sent, now)?;
                        deferred.extend(entries);
                    }
                    continue;
                }
                let pending = row.pending.as_ref().map(|p| p.commit.clone());
                let group = load_group(&mut self.groups, &self.provider, gid)?.ok_or(Abort::Store(
                    tidings_store::StoreError::Corrupt("group state missing".into()),
                ))?;
                let out = self
                    .engine
                    .process_sequenced(&self.provider, group, &env.mls_message, pending.as_deref())?;
                store.mark_envelope_seen(&id, now)?;
                match out {
                    Sequenced::Application { sender, plaintext } => {
                        self.group_payload(&conv, &sender, &plaintext, now, &mut events)?;
                    }
                    Sequenced::Commit {
                        ours, lost, removed_us, ..
                    } => {
                        self.members.remove(gid);
                        refresh = true;
                        // Members or roles may have changed: pages redraw the chat.
                        self.touched.insert(conv.peer);
                        // A commit ends the epoch's proposals (taken in, or lapsed).
                        row.proposals_since_ms = None;
                        proposals = false;
                        if ours {
                            row.updated_ms = now;
                            if let Some(p) = row.pending.take()
                                && let Some(welcome) = p.welcome
                            {
                                deferred.extend(self.welcome_entries(gid, &p.intent, welcome, index, now)?);
                            }
                        } else if lost && let Some(p) = row.pending.take() {
                            debug!(group = %hex::encode(gid), "our commit lost its epoch; re-applying");
                            row.retry = Some(p.intent);
                        }
                        if removed_us {
                            info!(group = %hex::encode(gid), "removed from the group");
                            row.left = true;
                            row.pending = None;
                            row.retry = None;
                            break;
                        }
                        // A new inbox: the rest of this one is read no more.
                        let moved = load_group(&mut self.groups, &self.provider, gid)
                            .ok()
                            .flatten()
                            .and_then(|g| MlsEngine::group_meta(g).ok())
                            .is_some_and(|m| m.inbox_seed != row.cursor_seed);
                        if moved {
                            // Our messages not seen yet may sit in the old inbox
                            // behind this commit, where nobody reads: send them
                            // again in the new one (same message ids).
                            for sent in store.take_group_sent_of(gid)? {
                                let entries = self.resend_in_unit(gid, conv.peer, sent, now)?;
                                deferred.extend(entries);
                            }
                            break;
                        }
                    }
                    Sequenced::Proposal => {
                        row.proposals_since_ms.get_or_insert(now);
                        self.group_wake.notify_one();
                        proposals = true;
                    }
                    Sequenced::Refused(why) => debug!(group = %hex::encode(gid), index, "ignored: {why}"),
                    // Our own messages were recognised by envelope id above.
                    Sequenced::Stale | Sequenced::Own { .. } => {}
                }
            }
            conv.group = Some(row);
            store.put_conversation(&conv)?;
            Ok(applied)
        });
        match result {
            Ok(n) => {
                for e in events {
                    let _ = self.events.send(e);
                }
                self.emit_touched();
                for (account, device, oid, env) in deferred {
                    self.enqueue(account, device, oid, None, env);
                }
                if refresh {
                    self.refresh_group_targets(gid);
                }
                self.retry_group_intent(gid);
                if proposals {
                    self.commit_proposals(gid, false);
                }
                Ok(n)
            }
            Err(Abort::Store(e)) => {
                self.groups.remove(gid);
                self.members.remove(gid);
                Err(NodeError::Store(e))
            }
            Err(Abort::Envelope(_, why)) => {
                self.groups.remove(gid);
                Err(NodeError::Unreachable(why))
            }
        }
    }

    /// A group application message pushed directly by a member. Handshake
    /// messages are refused: they count only in the sequencer's order. A
    /// message we cannot read yet (an epoch ahead of ours) is left for the
    /// group inbox.
    pub(super) fn apply_group_push(
        &mut self,
        conv: &Conversation,
        id: &[u8; 16],
        env: &pb::Envelope,
        now: u64,
        events: &mut Vec<NodeEvent>,
    ) -> Result<Apply, Abort> {
        if conv.group.as_ref().is_none_or(|g| g.left) || MlsEngine::is_handshake(&env.mls_message) {
            return Ok(Apply::Status(DeliverStatus::Rejected));
        }
        let gid = conv.group_id.as_slice();
        let group = load_group(&mut self.groups, &self.provider, gid)?.ok_or(Abort::Store(
            tidings_store::StoreError::Corrupt("group state missing".into()),
        ))?;
        let out = self
            .engine
            .process_sequenced(&self.provider, group, &env.mls_message, None)?;
        match out {
            Sequenced::Application { sender, plaintext } => {
                self.group_payload(conv, &sender, &plaintext, now, events)?;
            }
            Sequenced::Own { .. } => {}
            _ => return Ok(Apply::Status(DeliverStatus::NotProcessed)),
        }
        self.store.mark_envelope_seen(id, now)?;
        Ok(Apply::Status(DeliverStatus::Accepted))
    }

    /// Re-applies an intent whose commit lost its epoch, if any.
    fn retry_group_intent(&mut self, gid: &[u8]) {
        let retry = match self.store.conversation(gid) {
            Ok(Some(Conversation {
                group:
                    Some(GroupRow {
                        retry: Some(r),
                        pending: None,
                        left: false,
                        ..
                    }),
                ..
            })) => r,
            _ => return,
        };
        if let Err(e) = self.group_intent(gid, retry) {
            warn!(group = %hex::encode(gid), "re-applying a group change failed: {e}");
        }
    }

    /// Applies a group application message: a text becomes a history row,
    /// a control payload is applied; anything invalid is ignored.
    fn group_payload(
        &mut self,
        conv: &Conversation,
        sender: &[u8],
        plaintext: &[u8],
        now: u64,
        events: &mut Vec<NodeEvent>,
    ) -> Result<(), tidings_store::StoreError> {
        let Ok(cert) = self.cert_for(sender) else {
            return Ok(());
        };
        let payload = match Payload::decode(plaintext) {
            Ok(p) => p,
            Err(e) => {
                debug!(group = %hex::encode(&conv.group_id), "ignored a group payload: {e}");
                return Ok(());
            }
        };
        let (text, reply_to, expires_secs) = match payload.body {
            Body::Text {
                text,
                reply_to,
                expires_secs,
            } => (text, reply_to, expires_secs),
            body => return self.apply_control(conv.peer, *cert.account.as_bytes(), body, now, events),
        };
        let mut msg = StoredMessage::new_text(
            payload.id,
            conv.peer,
            *cert.account.as_bytes(),
            payload.sender_seq,
            payload.timestamp_ms.min(now + super::MAX_FUTURE_MS),
            now,
            cert.account == self.me,
            text,
            MessageState::Received,
        );
        msg.reply_to = reply_to;
        msg.expires_ms = Self::expiry_for(expires_secs, now);
        if self.store.insert_message(&msg)? {
            self.note_expiry(msg.expires_ms);
            if !msg.outgoing {
                self.touched.insert(msg.peer);
            }
            events.push(NodeEvent::Message(Box::new(self.view(&msg))));
            self.unpark(&msg, now, events)?;
        }
        Ok(())
    }

    /// Outbox entries carrying a Welcome to each device our winning commit
    /// added. `index` is the commit's position in the sequencing inbox.
    #[allow(clippy::type_complexity)]
    fn welcome_entries(
        &mut self,
        gid: &[u8],
        intent: &IntentRow,
        welcome: Vec<u8>,
        index: u64,
        now: u64,
    ) -> Result<Vec<([u8; 32], [u8; 32], u64, pb::Envelope)>, tidings_store::StoreError> {
        let IntentRow::Add { key_packages } = intent else {
            return Ok(Vec::new());
        };
        let env = pb::Envelope {
            id: rand::random::<[u8; 16]>().to_vec(),
            conversation_id: gid.to_vec(),
            kind: EnvelopeKind::Welcome as i32,
            mls_message: welcome,
            sequence_start: index,
        };
        let mut out = Vec::new();
        for kp in key_packages {
            let Ok((_, cert)) = MlsEngine::verify_any_key_package(&self.provider, kp, now) else {
                continue;
            };
            out.push(self.outbox_entry(*cert.account.as_bytes(), cert.device_key, &env, None, now)?);
        }
        Ok(out)
    }

    /// After joining from a Welcome: whether it is a group, and if so its row.
    pub(super) fn joined_group_row(group: &MlsGroup, sequence_start: u64, now: u64) -> Option<GroupRow> {
        let meta = MlsEngine::group_meta(group).ok()?;
        Some(GroupRow {
            cursor: sequence_start,
            cursor_seed: meta.inbox_seed,
            pending: None,
            retry: None,
            left: false,
            updated_ms: now,
            leaving: None,
            proposals_since_ms: None,
        })
    }

    /// The API's view of a group.
    pub(super) fn group_view(&mut self, gid: &[u8]) -> Result<GroupView, NodeError> {
        let conv = self
            .store
            .conversation(gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        let left = conv.group.as_ref().is_none_or(|g| g.left);
        let group = load_group(&mut self.groups, &self.provider, gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        let meta = MlsEngine::group_meta(group)?;
        let mut members: Vec<GroupMemberView> = Vec::new();
        let mut accounts: Vec<([u8; 32], usize)> = Vec::new();
        for c in MlsEngine::members(group) {
            match accounts.iter_mut().find(|(a, _)| a == c.account.as_bytes()) {
                Some((_, n)) => *n += 1,
                None => accounts.push((*c.account.as_bytes(), 1)),
            }
        }
        accounts.sort();
        for (a, n) in accounts {
            members.push(GroupMemberView {
                account: bs58::encode(a).into_string(),
                role: role_text(meta.role(&a)).into(),
                devices: n,
            });
        }
        Ok(GroupView {
            id: hex::encode(gid),
            name: meta.name,
            description: meta.description,
            epoch: group.epoch().as_u64(),
            fingerprint: state_fingerprint(group),
            members,
            relays: meta.relays,
            left,
        })
    }

    /// The device keys of the accounts given, as members of a group.
    pub(super) fn member_devices_of(&mut self, gid: &[u8], accounts: &[[u8; 32]]) -> Result<Vec<[u8; 32]>, NodeError> {
        let group = load_group(&mut self.groups, &self.provider, gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        Ok(MlsEngine::members(group)
            .iter()
            .filter(|c| accounts.contains(c.account.as_bytes()))
            .map(|c| c.device_key)
            .collect())
    }

    /// The group's metadata.
    pub(super) fn group_meta_of(&mut self, gid: &[u8]) -> Result<GroupMeta, NodeError> {
        let group = load_group(&mut self.groups, &self.provider, gid)?
            .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
        Ok(MlsEngine::group_meta(group)?)
    }
}

pub(super) fn envelope_id(env: &pb::Envelope) -> [u8; 16] {
    env.id.as_slice().try_into().unwrap_or([0; 16])
}

/// The Ed25519 public key of a seed.
pub(crate) fn ed25519_public(seed: &[u8; 32]) -> [u8; 32] {
    tidings_protocol::DeviceKey::from_seed(*seed).public()
}
