//! Chat features in the core task: replies, reactions, edits, deletes for
//! everyone, read receipts, typing indicators, disappearing messages,
//! presence, profiles and per-chat settings.
//!
//! Each is an MLS application payload (`tidings_protocol::payload::Body`).
//! Control payloads (reaction, edit, delete, read receipt, timer, profile) go
//! through the outbox like texts, so they are retried until acknowledged;
//! ephemeral ones (typing, presence) are encrypted once and pushed only to
//! devices connected right now. Every incoming control payload is checked
//! against our state: a reaction, edit or delete names a message of the same
//! chat; an edit or delete comes from the account that wrote the message
//! (anything else is ignored and logged).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tidings_protocol::limits::MAX_TEXT;
use tidings_protocol::mls::MlsEngine;
use tidings_protocol::payload::{Body, MAX_READ_IDS, MAX_TIMER_SECS, MessageId, Payload, reaction_ok};
use tidings_protocol::pb::{self, EnvelopeKind};
use tidings_store::{MessageState, Settings, StoreError, StoredMessage};
use tracing::{debug, info, warn};

use super::{Core, NodeError, load_group, new_envelope};
use crate::types::{ChatRef, ChatView, MessageView, NodeEvent, PresenceView};

/// An outbox entry made inside a unit: (account, device, entry number, envelope).
pub(crate) type Entry = ([u8; 32], [u8; 32], u64, pb::Envelope);

/// How often a device that shares presence tells its contacts it is online.
pub const PRESENCE_INTERVAL_MS: u64 = 30_000;
/// A contact counts as online this long after its last presence message.
pub const ONLINE_FOR_MS: u64 = 75_000;
/// Most disappearing messages removed per sweep (the rest follow at once).
const SWEEP_BATCH: usize = 256;

/// Most control payloads kept waiting for the message they name.
const MAX_PARKED: usize = 1024;
/// How long a control payload waits for the message it names.
const PARKED_FOR_MS: u64 = 10 * 60 * 1000;

/// Control payloads that arrived before the message they name (a group
/// member's push can overtake the sequence): target → (chat, sender, body,
/// arrival ms). Applied when the message arrives; dropped after
/// [`PARKED_FOR_MS`] or beyond [`MAX_PARKED`].
pub(crate) type Parked = HashMap<MessageId, Vec<([u8; 32], [u8; 32], Body, u64)>>;

/// Contacts who share presence: account → (said online, last seen ms).
pub(crate) type PresenceMap = Arc<Mutex<HashMap<[u8; 32], (bool, u64)>>>;

/// What the user does in a chat besides sending a text.
#[derive(Debug, Clone)]
pub(crate) enum ChatAction {
    React { target: MessageId, emoji: String },
    Edit { target: MessageId, text: String },
    Delete { target: MessageId },
    Read { up_to: MessageId },
    Typing,
}

/// Per-chat settings to change (`None`: keep).
#[derive(Debug, Clone, Default)]
pub(crate) struct ChatChange {
    pub pinned: Option<bool>,
    pub muted: Option<bool>,
    pub disappearing_secs: Option<u64>,
}

/// Settings of this account to change (`None`: keep).
#[derive(Debug, Clone, Default)]
pub(crate) struct SettingsChange {
    pub name: Option<String>,
    /// `Some(None)` removes the picture.
    pub picture: Option<Option<(String, Vec<u8>)>>,
    pub read_receipts: Option<bool>,
    pub presence: Option<bool>,
}

/// A payload sealed for a chat inside a unit: what to queue and push once it commits.
#[derive(Default)]
pub(crate) struct Sealed {
    entries: Vec<Entry>,
    /// One-to-one: devices to push to directly (ephemeral payloads).
    direct: Vec<([u8; 32], pb::Envelope)>,
    /// Groups: the envelope to push to connected members.
    group_push: Option<(Vec<u8>, pb::Envelope)>,
}

impl Sealed {
    /// The outbox entries alone (a one-to-one control payload has nothing else).
    pub(super) fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    fn extend(&mut self, other: Sealed) {
        self.entries.extend(other.entries);
        self.direct.extend(other.direct);
        if other.group_push.is_some() {
            self.group_push = other.group_push;
        }
    }
}

impl Core {
    /// The view of a row the API and events show.
    pub(crate) fn view(&self, m: &StoredMessage) -> MessageView {
        MessageView::of(&self.store, m)
    }

    /// When a message stored now disappears: by the timer its sender's chat
    /// had when it was sent (0: never), not this device's own setting, which
    /// may not have caught up yet (or already moved on): a timer change and
    /// the next text are pushed separately and can arrive in either order.
    pub(super) fn expiry_for(sent_secs: u64, now: u64) -> Option<u64> {
        let secs = sent_secs.min(MAX_TIMER_SECS);
        (secs > 0).then(|| now.saturating_add(secs.saturating_mul(1000)))
    }

    /// What every new text checks first, one-to-one or group: its size and the message it
    /// quotes (in `chat`). Returns the chat's disappearing timer.
    pub(super) fn check_new_text(
        &self,
        chat: &[u8; 32],
        text: &str,
        reply_to: Option<MessageId>,
    ) -> Result<u64, NodeError> {
        if text.is_empty() || text.len() > MAX_TEXT {
            return Err(NodeError::BadText);
        }
        self.check_reply(chat, reply_to)?;
        Ok(self.store.chat(chat)?.disappearing_secs)
    }

    /// A new text's encoded payload, with a random id, the next sender sequence number and a
    /// timestamp that never goes back: (id, sender_seq, timestamp_ms, payload).
    pub(super) fn text_payload(
        &self,
        text: &str,
        reply_to: Option<MessageId>,
        timer: u64,
        now: u64,
    ) -> Result<(MessageId, u64, u64, Vec<u8>), NodeError> {
        let seq = self.store.next_counter("sender_seq")?;
        let ts = self.store.raise_counter("last_ts", now)?;
        let id: MessageId = rand::random();
        Ok((id, seq, ts, encode_text(id, seq, ts, text, reply_to, timer)))
    }

    /// Checks a quoted message: it must be in the same chat.
    pub(super) fn check_reply(&self, key: &[u8; 32], reply_to: Option<MessageId>) -> Result<(), NodeError> {
        if let Some(r) = reply_to
            && self.store.message(&r)?.is_none_or(|m| m.peer != *key)
        {
            return Err(NodeError::UnknownMessage(hex::encode(r)));
        }
        Ok(())
    }

    /// Encrypts `body` for every other device of a chat, inside the caller's unit.
    pub(super) fn seal(&mut self, chat: &ChatRef, body: Body, now: u64) -> Result<Sealed, NodeError> {
        self.seal_payload(
            chat,
            Payload {
                id: rand::random(),
                sender_seq: 0,
                timestamp_ms: now,
                body,
            },
            now,
        )
    }

    /// Encrypts a whole payload for every other device of a chat, inside the caller's unit.
    pub(super) fn seal_payload(&mut self, chat: &ChatRef, payload: Payload, now: u64) -> Result<Sealed, NodeError> {
        let ephemeral = payload.body.is_ephemeral();
        let payload = payload.encode();
        let mut out = Sealed::default();
        match chat {
            ChatRef::Contact(contact) => {
                let c = self
                    .store
                    .contact(contact)?
                    .ok_or_else(|| NodeError::UnknownContact(bs58::encode(contact).into_string()))?;
                let gid = self.send_conversation(&c)?.ok_or(NodeError::NoConversation)?;
                let group = load_group(&mut self.groups, &self.provider, &gid)?.ok_or(NodeError::NoConversation)?;
                let env = new_envelope(
                    &gid,
                    EnvelopeKind::Message,
                    self.engine.encrypt(&self.provider, group, &payload)?,
                );
                let own = self.own_device_keys();
                for device in self.member_devices(&gid)? {
                    if ephemeral {
                        out.direct.push((device, env.clone()));
                        continue;
                    }
                    let account = if own.contains(&device) {
                        *self.me.as_bytes()
                    } else {
                        *contact
                    };
                    out.entries.push(self.outbox_entry(account, device, &env, None, now)?);
                }
            }
            ChatRef::Group(gid) => {
                let conv = self
                    .store
                    .conversation(gid)?
                    .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
                match &conv.group {
                    None => return Err(NodeError::UnknownGroup(hex::encode(gid))),
                    Some(g) if g.left || g.leaving.is_some() => return Err(NodeError::NotAMember(hex::encode(gid))),
                    Some(_) => {}
                }
                let group = load_group(&mut self.groups, &self.provider, gid)?
                    .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
                let env = new_envelope(
                    gid,
                    EnvelopeKind::Message,
                    self.engine.encrypt(&self.provider, group, &payload)?,
                );
                if !ephemeral {
                    let msg_id = super::groups::envelope_id(&env);
                    self.store.put_group_sent(
                        &msg_id,
                        &tidings_store::GroupSent {
                            group_id: gid.clone(),
                            payload,
                            message_id: msg_id,
                        },
                    )?;
                    for device in self.current_target_keys(gid)? {
                        out.entries.push(self.outbox_entry(conv.peer, device, &env, None, now)?);
                    }
                }
                out.group_push = Some((gid.clone(), env));
            }
        }
        Ok(out)
    }

    /// Queues and pushes what [`Core::seal`] made, once its unit committed.
    pub(super) fn dispatch(&mut self, sealed: Sealed) {
        for (account, device, id, env) in sealed.entries {
            self.enqueue(account, device, id, None, env);
        }
        if let Some((gid, env)) = sealed.group_push {
            self.push_to_members(&gid, env);
        }
        if !sealed.direct.is_empty() {
            let net = self.net.clone();
            tokio::spawn(async move {
                for (device, env) in sealed.direct {
                    let Some(peer) = super::peer_id_of(&device) else {
                        continue;
                    };
                    if net.is_connected(peer).await {
                        let request = pb::DeliverRequest {
                            envelopes: vec![env],
                            ..Default::default()
                        };
                        if let Err(e) = net.deliver(peer, request).await {
                            debug!(%peer, "ephemeral push failed: {e}");
                        }
                    }
                }
            });
        }
    }

    /// A reaction, edit, delete, read or typing indicator by the user.
    pub(super) fn chat_action(&mut self, chat: &ChatRef, action: ChatAction) -> Result<Option<MessageView>, NodeError> {
        let now = self.clock.now_ms();
        let me = *self.me.as_bytes();
        let key = chat.key();
        let store = self.store.clone();
        let mut events = Vec::new();
        let r = store.unit(|| -> Result<(Option<StoredMessage>, Sealed), NodeError> {
            let own_message = |target: &MessageId| -> Result<StoredMessage, NodeError> {
                store
                    .message(target)?
                    .filter(|m| m.peer == key)
                    .ok_or_else(|| NodeError::UnknownMessage(hex::encode(target)))
            };
            match action {
                ChatAction::React { target, emoji } => {
                    if !reaction_ok(&emoji) {
                        return Err(NodeError::InvalidInput(
                            "a reaction is a few emoji (at most 32 bytes), or empty to remove yours".into(),
                        ));
                    }
                    let mut m = own_message(&target)?;
                    if m.deleted {
                        return Err(NodeError::InvalidInput("the message was deleted".into()));
                    }
                    set_reaction(&mut m, me, &emoji);
                    store.update_message(&m)?;
                    let sealed = self.seal(chat, Body::Reaction { target, emoji }, now)?;
                    Ok((Some(m), sealed))
                }
                ChatAction::Edit { target, text } => {
                    if text.is_empty() || text.len() > MAX_TEXT {
                        return Err(NodeError::BadText);
                    }
                    let mut m = own_message(&target)?;
                    if !m.outgoing || m.sender != me {
                        return Err(NodeError::NotAllowed("only your own messages can be edited".into()));
                    }
                    if m.deleted {
                        return Err(NodeError::InvalidInput("the message was deleted".into()));
                    }
                    m.text = text.clone();
                    m.edited_ms = Some(now);
                    store.update_message(&m)?;
                    let sealed = self.seal(chat, Body::Edit { target, text }, now)?;
                    Ok((Some(m), sealed))
                }
                ChatAction::Delete { target } => {
                    let mut m = own_message(&target)?;
                    if !m.outgoing || m.sender != me {
                        return Err(NodeError::NotAllowed(
                            "only your own messages can be deleted for everyone".into(),
                        ));
                    }
                    mark_deleted(&mut m);
                    store.update_message(&m)?;
                    let sealed = self.seal(chat, Body::Delete { target }, now)?;
                    Ok((Some(m), sealed))
                }
                ChatAction::Read { up_to } => {
                    let read = store
                        .mark_read(&key, &up_to)?
                        .ok_or_else(|| NodeError::UnknownMessage(hex::encode(up_to)))?;
                    let mut sealed = Sealed::default();
                    if store.settings()?.read_receipts && !read.is_empty() {
                        // Newest first; a receipt names at most MAX_READ_IDS.
                        let ids: Vec<MessageId> = read.iter().take(MAX_READ_IDS).map(|m| m.id).collect();
                        sealed = match self.seal(chat, Body::Read { ids }, now) {
                            Ok(s) => s,
                            // A group we left, a contact without a conversation:
                            // reading stays local.
                            Err(NodeError::NotAMember(_) | NodeError::NoConversation) => Sealed::default(),
                            Err(e) => return Err(e),
                        };
                    }
                    events.push(NodeEvent::Chat(Box::new(self.chat_view(chat)?)));
                    Ok((None, sealed))
                }
                ChatAction::Typing => Ok((None, self.seal(chat, Body::Typing, now)?)),
            }
        });
        match r {
            Ok((m, sealed)) => {
                self.dispatch(sealed);
                let view = m.map(|m| self.view(&m));
                if let Some(v) = &view {
                    events.push(NodeEvent::MessageUpdated(Box::new(v.clone())));
                }
                for e in events {
                    let _ = self.events.send(e);
                }
                Ok(view)
            }
            Err(e) => {
                self.groups.clear();
                self.members.clear();
                Err(e)
            }
        }
    }

    /// Changes a chat's pin, mute or disappearing timer; a new timer is sent
    /// to every member.
    pub(super) fn change_chat(&mut self, chat: &ChatRef, change: ChatChange) -> Result<ChatView, NodeError> {
        let now = self.clock.now_ms();
        let key = chat.key();
        if let Some(secs) = change.disappearing_secs
            && secs > MAX_TIMER_SECS
        {
            return Err(NodeError::InvalidInput(format!(
                "disappearing_secs is at most {MAX_TIMER_SECS}"
            )));
        }
        self.chat_exists(chat)?;
        let store = self.store.clone();
        let r = store.unit(|| -> Result<Sealed, NodeError> {
            let mut row = store.chat(&key)?;
            row.pinned = change.pinned.unwrap_or(row.pinned);
            row.muted = change.muted.unwrap_or(row.muted);
            let mut sealed = Sealed::default();
            if let Some(secs) = change.disappearing_secs
                && secs != row.disappearing_secs
            {
                row.disappearing_secs = secs;
                sealed = self.seal(chat, Body::Timer { secs }, now)?;
            }
            store.put_chat(&key, &row)?;
            Ok(sealed)
        });
        match r {
            Ok(sealed) => {
                self.dispatch(sealed);
                let view = self.chat_view(chat)?;
                let _ = self.events.send(NodeEvent::Chat(Box::new(view.clone())));
                Ok(view)
            }
            Err(e) => {
                self.groups.clear();
                self.members.clear();
                Err(e)
            }
        }
    }

    /// Changes this account's settings; a new name or picture goes to every
    /// contact, a change of presence sharing too.
    pub(super) fn change_settings(&mut self, change: SettingsChange) -> Result<Settings, NodeError> {
        let now = self.clock.now_ms();
        let store = self.store.clone();
        let r = store.unit(|| -> Result<(Settings, Sealed), NodeError> {
            let mut s = store.settings()?;
            let mut profile = false;
            if let Some(name) = &change.name {
                store.set_name(name)?;
                profile = true;
            }
            if let Some(p) = change.picture.clone() {
                s.picture = p;
                profile = true;
            }
            s.read_receipts = change.read_receipts.unwrap_or(s.read_receipts);
            let presence_changed = change.presence.is_some_and(|p| p != s.presence);
            s.presence = change.presence.unwrap_or(s.presence);
            store.put_settings(&s)?;
            let mut sealed = Sealed::default();
            if profile {
                // The identity reader sees committed state only: the new name is ours to give.
                let name = match &change.name {
                    Some(n) => n.clone(),
                    None => store.identity()?.name,
                };
                sealed.extend(self.seal_for_contacts(
                    Body::Profile {
                        name,
                        picture: s.picture.clone(),
                    },
                    now,
                )?);
            }
            if presence_changed {
                sealed.extend(self.seal_for_contacts(Body::Presence { online: s.presence }, now)?);
            }
            Ok((s, sealed))
        });
        match r {
            Ok((s, sealed)) => {
                self.dispatch(sealed);
                if change.presence == Some(false)
                    && let Ok(mut p) = self.presence.lock()
                {
                    p.clear();
                }
                Ok(s)
            }
            Err(e) => {
                self.groups.clear();
                self.members.clear();
                Err(e)
            }
        }
    }

    /// Replaces our home relays (checked by the caller): saved with the ones
    /// given up (drained until [`super::RETIRED_RELAY_DRAIN_MS`] from now),
    /// and a new mailbox grant naming them goes to every contact.
    pub(super) fn set_home_relays(&mut self, relays: Vec<libp2p::Multiaddr>) -> Result<Settings, NodeError> {
        let now = self.clock.now_ms();
        let names: Vec<String> = relays.iter().map(ToString::to_string).collect();
        let store = self.store.clone();
        let r = store.unit(|| -> Result<(Settings, Sealed), NodeError> {
            let mut s = store.settings()?;
            let before = s.home_relays.clone().unwrap_or_else(|| self.grant.relays.clone());
            s.retired_relays.retain(|(r, until)| *until > now && !names.contains(r));
            for r in before {
                if !names.contains(&r) && !s.retired_relays.iter().any(|(x, _)| *x == r) {
                    s.retired_relays.push((r, now + super::RETIRED_RELAY_DRAIN_MS));
                }
            }
            s.home_relays = Some(names.clone());
            store.put_settings(&s)?;
            let grant = Body::Grant {
                capabilities: self.grant.capabilities.clone(),
                relays: names.clone(),
            };
            Ok((s, self.seal_for_contacts(grant, now)?))
        });
        match r {
            Ok((s, sealed)) => {
                self.home_relays = relays.iter().filter_map(crate::net::peer_of).collect();
                self.grant.relays = names;
                self.dispatch(sealed);
                info!(relays = self.home_relays.len(), "home relays changed");
                Ok(s)
            }
            Err(e) => {
                self.groups.clear();
                self.members.clear();
                Err(e)
            }
        }
    }

    /// Our profile for a contact we just got a conversation with, if we have
    /// a picture (the name travels in cards and user records already).
    pub(super) fn profile_for(&mut self, contact: [u8; 32], now: u64) -> Result<Sealed, NodeError> {
        let s = self.store.settings()?;
        if s.picture.is_none() {
            return Ok(Sealed::default());
        }
        let name = self.store.identity()?.name;
        self.seal(
            &ChatRef::Contact(contact),
            Body::Profile {
                name,
                picture: s.picture,
            },
            now,
        )
    }

    /// Sends our profile to a contact (after we made a conversation with it).
    pub(super) fn send_profile_to(&mut self, contact: [u8; 32]) {
        let now = self.clock.now_ms();
        let store = self.store.clone();
        match store.unit(|| self.profile_for(contact, now)) {
            Ok(sealed) => self.dispatch(sealed),
            Err(e) => {
                self.groups.clear();
                self.members.clear();
                debug!("profile not sent to a new contact: {e}");
            }
        }
    }

    /// Tells every contact we have a conversation with that we are online
    /// (only while we share presence).
    pub(super) fn presence_heartbeat(&mut self) {
        let now = self.clock.now_ms();
        if !self.store.settings().is_ok_and(|s| s.presence) {
            return;
        }
        let store = self.store.clone();
        match store.unit(|| self.seal_for_contacts(Body::Presence { online: true }, now)) {
            Ok(sealed) => self.dispatch(sealed),
            Err(e) => {
                self.groups.clear();
                self.members.clear();
                debug!("presence heartbeat not sent: {e}");
            }
        }
    }

    /// Seals `body` in the conversation with every contact that has one.
    fn seal_for_contacts(&mut self, body: Body, now: u64) -> Result<Sealed, NodeError> {
        let mut all = Sealed::default();
        for c in self.store.list_contacts()? {
            if c.conversations.is_empty() {
                continue;
            }
            match self.seal(&ChatRef::Contact(c.account), body.clone(), now) {
                Ok(s) => all.extend(s),
                Err(NodeError::NoConversation) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(all)
    }

    /// Applies a control or ephemeral payload from `sender` in chat `key`.
    /// Returns nothing: whatever is not allowed is ignored (and logged).
    pub(super) fn apply_control(
        &mut self,
        key: [u8; 32],
        sender: [u8; 32],
        body: Body,
        now: u64,
        events: &mut Vec<NodeEvent>,
    ) -> Result<(), StoreError> {
        let who = bs58::encode(sender).into_string();
        let in_chat = |store: &tidings_store::Store, target: &MessageId| -> Result<Option<StoredMessage>, StoreError> {
            Ok(store.message(target)?.filter(|m| m.peer == key))
        };
        match body {
            Body::Reaction { target, emoji } => {
                let Some(mut m) = in_chat(&self.store, &target)? else {
                    debug!(from = %who, "reaction to a message we do not have (yet)");
                    self.park(target, key, sender, Body::Reaction { target, emoji }, now);
                    return Ok(());
                };
                if m.deleted {
                    return Ok(());
                }
                set_reaction(&mut m, sender, &emoji);
                self.store.update_message(&m)?;
                events.push(NodeEvent::MessageUpdated(Box::new(self.view(&m))));
            }
            Body::Edit { target, text } => {
                let Some(mut m) = in_chat(&self.store, &target)? else {
                    debug!(from = %who, "edit of a message we do not have (yet)");
                    self.park(target, key, sender, Body::Edit { target, text }, now);
                    return Ok(());
                };
                if m.sender != sender {
                    warn!(from = %who, "edit of someone else's message; ignored");
                    return Ok(());
                }
                if m.deleted {
                    debug!(from = %who, "edit of a deleted message; ignored");
                    return Ok(());
                }
                m.text = text;
                m.edited_ms = Some(now);
                self.store.update_message(&m)?;
                events.push(NodeEvent::MessageUpdated(Box::new(self.view(&m))));
            }
            Body::Delete { target } => {
                let Some(mut m) = in_chat(&self.store, &target)? else {
                    debug!(from = %who, "delete of a message we do not have (yet)");
                    self.park(target, key, sender, Body::Delete { target }, now);
                    return Ok(());
                };
                if m.sender != sender {
                    warn!(from = %who, "delete of someone else's message; ignored");
                    return Ok(());
                }
                if !m.deleted {
                    mark_deleted(&mut m);
                    self.store.update_message(&m)?;
                    events.push(NodeEvent::MessageUpdated(Box::new(self.view(&m))));
                }
            }
            Body::Delivered { ids } => {
                // One-to-one only (groups show delivery by the relays' receipts and reads).
                if sender == *self.me.as_bytes() || self.store.group_of_chat(&key)?.is_some() {
                    return Ok(());
                }
                for id in ids {
                    let Some(mut m) = in_chat(&self.store, &id)? else {
                        continue;
                    };
                    if m.outgoing && m.state < MessageState::Delivered {
                        self.store.set_message_state(&id, MessageState::Delivered)?;
                        m.state = MessageState::Delivered;
                        events.push(NodeEvent::MessageUpdated(Box::new(self.view(&m))));
                    }
                }
            }
            Body::Read { ids } => {
                if sender == *self.me.as_bytes() {
                    // Another device of ours read them: nothing to show.
                    return Ok(());
                }
                let readers = self.other_accounts(&key);
                for id in ids {
                    let Some(mut m) = in_chat(&self.store, &id)? else {
                        continue;
                    };
                    if !m.outgoing || m.read_by.contains(&sender) {
                        continue;
                    }
                    m.read_by.push(sender);
                    if m.read_by.len() >= readers && m.state < MessageState::Read {
                        m.state = MessageState::Read;
                    }
                    self.store.update_message(&m)?;
                    events.push(NodeEvent::MessageUpdated(Box::new(self.view(&m))));
                }
            }
            Body::Typing => {
                if sender != *self.me.as_bytes() {
                    events.push(NodeEvent::Typing {
                        chat: ChatRef::of_key(&self.store, &key).id(),
                        account: who,
                    });
                }
            }
            Body::Timer { secs } => {
                let mut row = self.store.chat(&key)?;
                if row.disappearing_secs != secs {
                    row.disappearing_secs = secs;
                    self.store.put_chat(&key, &row)?;
                    info!(chat = %ChatRef::of_key(&self.store, &key).id(), secs, by = %who, "disappearing timer set");
                    self.touched.insert(key);
                }
            }
            Body::Presence { online } => {
                if sender == *self.me.as_bytes() || !self.store.settings()?.presence {
                    return Ok(());
                }
                if let Ok(mut p) = self.presence.lock() {
                    if p.len() > 10_000 {
                        p.clear();
                    }
                    p.insert(sender, (online, now));
                }
                events.push(NodeEvent::Presence(PresenceView {
                    account: who,
                    online,
                    last_seen_ms: Some(now),
                }));
            }
            Body::Profile { name, picture } => {
                if sender == *self.me.as_bytes() {
                    return Ok(());
                }
                let Some(mut c) = self.store.contact(&sender)? else {
                    return Ok(());
                };
                let name = name.trim().to_owned();
                if !name.is_empty() {
                    c.name = name;
                    self.store.put_contact(&c)?;
                }
                self.store
                    .put_picture(&sender, picture.as_ref().map(|(k, b)| (k.as_str(), b.as_slice())))?;
                events.push(NodeEvent::Contact(crate::types::ContactView::from_contact(&c)));
            }
            Body::Text { .. } | Body::Grant { .. } | Body::Retire { .. } => {}
        }
        Ok(())
    }

    /// Keeps a control payload until the message it names arrives.
    fn park(&mut self, target: MessageId, key: [u8; 32], sender: [u8; 32], body: Body, now: u64) {
        if self.parked.len() >= MAX_PARKED {
            self.parked
                .retain(|_, v| v.iter().any(|(_, _, _, at)| now.saturating_sub(*at) < PARKED_FOR_MS));
            if self.parked.len() >= MAX_PARKED {
                self.parked.clear();
            }
        }
        let list = self.parked.entry(target).or_default();
        if list.len() < 16 {
            list.push((key, sender, body, now));
        }
    }

    /// A message was stored: applies what waited for it (in the same unit).
    pub(super) fn unpark(
        &mut self,
        m: &StoredMessage,
        now: u64,
        events: &mut Vec<NodeEvent>,
    ) -> Result<(), StoreError> {
        let Some(waiting) = self.parked.remove(&m.id) else {
            return Ok(());
        };
        for (key, sender, body, at) in waiting {
            if key == m.peer && now.saturating_sub(at) < PARKED_FOR_MS {
                self.apply_control(key, sender, body, now, events)?;
            }
        }
        Ok(())
    }

    /// How many other accounts must read a message of ours in chat `key`
    /// before it shows as read.
    fn other_accounts(&mut self, key: &[u8; 32]) -> usize {
        let Ok(Some(gid)) = self.store.group_of_chat(key) else {
            return 1;
        };
        match load_group(&mut self.groups, &self.provider, &gid) {
            Ok(Some(g)) => {
                let me = self.me;
                let accounts: HashSet<_> = MlsEngine::members(g)
                    .into_iter()
                    .map(|c| c.account)
                    .filter(|a| *a != me)
                    .collect();
                accounts.len().max(1)
            }
            _ => 1,
        }
    }

    /// Chats whose unread count or timer changed in the last unit: their views.
    pub(super) fn emit_touched(&mut self) {
        let touched: Vec<[u8; 32]> = self.touched.drain().collect();
        for key in touched {
            let chat = ChatRef::of_key(&self.store, &key);
            if let Ok(v) = self.chat_view(&chat) {
                let _ = self.events.send(NodeEvent::Chat(Box::new(v)));
            }
        }
    }

    fn chat_exists(&mut self, chat: &ChatRef) -> Result<(), NodeError> {
        match chat {
            ChatRef::Contact(a) => {
                self.store
                    .contact(a)?
                    .ok_or_else(|| NodeError::UnknownContact(bs58::encode(a).into_string()))?;
            }
            ChatRef::Group(g) => {
                self.store
                    .conversation(g)?
                    .filter(|c| c.group.is_some())
                    .ok_or_else(|| NodeError::UnknownGroup(hex::encode(g)))?;
            }
        }
        Ok(())
    }

    /// A chat as the API shows it.
    pub(super) fn chat_view(&mut self, chat: &ChatRef) -> Result<ChatView, NodeError> {
        let key = chat.key();
        let row = self.store.chat(&key)?;
        let mut left = false;
        let (kind, name, members, since) = match chat {
            ChatRef::Contact(a) => {
                let c = self
                    .store
                    .contact(a)?
                    .ok_or_else(|| NodeError::UnknownContact(bs58::encode(a).into_string()))?;
                ("contact", c.name, 1, c.added_ms)
            }
            ChatRef::Group(gid) => {
                let conv = self
                    .store
                    .conversation(gid)?
                    .filter(|c| c.group.is_some())
                    .ok_or_else(|| NodeError::UnknownGroup(hex::encode(gid)))?;
                left = conv.group.as_ref().is_some_and(|g| g.left);
                let since = conv.created_ms;
                let me = self.me;
                match load_group(&mut self.groups, &self.provider, gid)? {
                    Some(g) => {
                        let name = MlsEngine::group_meta(g).map(|m| m.name).unwrap_or_default();
                        let accounts: HashSet<_> = MlsEngine::members(g)
                            .into_iter()
                            .map(|c| c.account)
                            .filter(|a| *a != me)
                            .collect();
                        ("group", name, accounts.len() as u64, since)
                    }
                    None => ("group", String::new(), 0, since),
                }
            }
        };
        let last = self.store.last_message(&key)?;
        Ok(ChatView {
            id: chat.id(),
            kind: kind.into(),
            name,
            last_activity_ms: row
                .last_activity_ms
                .max(since)
                .max(last.as_ref().map_or(0, |m| m.timestamp_ms)),
            last_message: last.map(|m| self.view(&m)),
            unread: row.unread,
            pinned: row.pinned,
            muted: row.muted,
            disappearing_secs: row.disappearing_secs,
            members,
            left,
        })
    }

    /// Every chat: contacts and groups, pinned first, then newest activity first.
    pub(super) fn chat_views(&mut self) -> Result<Vec<ChatView>, NodeError> {
        let mut chats = Vec::new();
        for c in self.store.list_contacts()? {
            chats.push(ChatRef::Contact(c.account));
        }
        for g in self.store.list_groups()? {
            chats.push(ChatRef::Group(g.group_id));
        }
        let mut out = Vec::with_capacity(chats.len());
        for c in &chats {
            out.push(self.chat_view(c)?);
        }
        out.sort_by(|a, b| {
            b.pinned
                .cmp(&a.pinned)
                .then(b.last_activity_ms.cmp(&a.last_activity_ms))
                .then(a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// Removes the disappearing messages whose time ran out (by the node's clock).
    pub(super) fn sweep_expired(&mut self) {
        let now = self.clock.now_ms();
        if self.next_expiry.is_none_or(|t| t > now) {
            return;
        }
        loop {
            let due = match self.store.expired(now, SWEEP_BATCH) {
                Ok(d) => d,
                Err(e) => {
                    warn!("cannot read expiring messages: {e}");
                    return;
                }
            };
            if due.is_empty() {
                break;
            }
            let store = self.store.clone();
            let removed = store.unit(|| -> Result<Vec<StoredMessage>, StoreError> {
                let mut out = Vec::new();
                for id in &due {
                    if let Some(m) = store.remove_message(id)? {
                        out.push(m);
                    }
                }
                Ok(out)
            });
            match removed {
                Ok(rows) => {
                    for m in rows {
                        let chat = ChatRef::of_key(&self.store, &m.peer).id();
                        let _ = self.events.send(NodeEvent::MessageRemoved {
                            chat,
                            id: hex::encode(m.id),
                        });
                        self.touched.insert(m.peer);
                    }
                }
                Err(e) => {
                    warn!("cannot remove expired messages: {e}");
                    return;
                }
            }
            if due.len() < SWEEP_BATCH {
                break;
            }
        }
        self.emit_touched();
        self.next_expiry = self.store.next_expiry().ok().flatten();
    }

    /// Notes that a row with an expiry was stored.
    pub(super) fn note_expiry(&mut self, at: Option<u64>) {
        if let Some(at) = at {
            self.next_expiry = Some(self.next_expiry.map_or(at, |t| t.min(at)));
        }
    }
}

/// Sets `account`'s reaction on `m` (one per account; empty removes it).
fn set_reaction(m: &mut StoredMessage, account: [u8; 32], emoji: &str) {
    m.reactions.retain(|(a, _)| *a != account);
    if !emoji.is_empty() {
        m.reactions.push((account, emoji.to_owned()));
    }
}

/// Deleted for everyone: no text, no reactions, no quote.
fn mark_deleted(m: &mut StoredMessage) {
    m.deleted = true;
    m.text.clear();
    m.reactions.clear();
    m.reply_to = None;
}

/// The encoded payload of text message `id`, numbered `seq`, written at `ts`.
pub(super) fn encode_text(
    id: MessageId,
    seq: u64,
    ts: u64,
    text: &str,
    reply_to: Option<MessageId>,
    timer: u64,
) -> Vec<u8> {
    Payload {
        id,
        sender_seq: seq,
        timestamp_ms: ts,
        body: Body::Text {
            text: text.to_owned(),
            reply_to,
            expires_secs: timer,
        },
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_disappears_by_its_senders_timer_and_never_when_it_had_none() {
        let now = 1_000_000;
        assert_eq!(Core::expiry_for(0, now), None);
        assert_eq!(Core::expiry_for(30, now), Some(now + 30_000));
        assert_eq!(
            Core::expiry_for(u64::MAX, now),
            Some(now + MAX_TIMER_SECS * 1000),
            "capped at the longest timer"
        );
    }
}
