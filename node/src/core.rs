//! The core task: the only owner of the store's write side and of MLS state.
//!
//! Every state change runs here, one unit of work (one redb write transaction)
//! at a time: sending (encrypt + history row + outbox entries), receiving
//! (decrypt + history row + dedup id), creating and joining conversations,
//! making key packages. Network I/O never happens inside a unit: deliveries run
//! in small spawned tasks that report back as [`CoreInput::DeliverResult`].
//!
//! Invariants:
//! - an inbound envelope is acknowledged only after the unit that applied it
//!   committed durably;
//! - an outbox entry is removed only after the recipient acknowledged it;
//! - an envelope id and a message id are applied at most once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use openmls::prelude::MlsGroup;
use openmls_rust_crypto::RustCrypto;
use prost::Message as _;
use tidings_protocol::identity::{AccountId, DeviceCertificate};
use tidings_protocol::limits::{MAX_DELIVER_FRAME, MAX_ENVELOPES_PER_BATCH, MAX_MLS_MESSAGE, MAX_TEXT, MAX_WELCOME};
use tidings_protocol::mailbox as mb;
use tidings_protocol::mls::{Incoming, MlsEngine};
use tidings_protocol::payload::{Body, Payload};
use tidings_protocol::pb::{self, DeliverStatus, EnvelopeKind};
use tidings_protocol::{CardError, MlsError};
use tidings_store::{Contact, Conversation, MessageState, OutboxEntry, Store, StoreError, StoredMessage};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod chat;
mod groups;
mod link;

pub(crate) use chat::{ChatAction, ChatChange, PresenceMap, SettingsChange};
pub use chat::{ONLINE_FOR_MS, PRESENCE_INTERVAL_MS};

pub(crate) use groups::{GroupInbox, GroupUpkeep, SELF_UPDATE_INTERVAL_MS};
pub use groups::{GroupMemberView, GroupView};
pub(crate) use link::{LinkOffer, LinkOffers};

use crate::clock::Clock;
use crate::net::{NetError, NetEvent, Network};
use crate::types::{ChatRef, ChatView, ContactView, MailGapView, MessageView, NodeEvent, RefusalView};

/// Errors reported to API callers.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("unknown contact: {0}")]
    UnknownContact(String),
    #[error("no conversation with this contact yet")]
    NoConversation,
    #[error("the contact has no device we could reach: {0}")]
    Unreachable(String),
    #[error("message text is empty or longer than {MAX_TEXT} bytes")]
    BadText,
    /// No message with this id in this chat.
    #[error("unknown message: {0}")]
    UnknownMessage(String),
    #[error("invalid contact: {0}")]
    InvalidContact(String),
    /// A malformed argument that is not a contact (a relay address, a group's metadata).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No group with this id on this device (or the id is not a group id at all).
    #[error("unknown group: {0}")]
    UnknownGroup(String),
    /// This device was removed from the group (or left it): it can change and
    /// send nothing there any more.
    #[error("this device is no longer a member of group {0}")]
    NotAMember(String),
    /// The group's rules refuse the change to this member (from `MlsError::Unauthorized`).
    #[error("not allowed: {0}")]
    NotAllowed(String),
    #[error(transparent)]
    Card(#[from] CardError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("encryption: {0}")]
    Mls(MlsError),
    #[error("network: {0}")]
    Net(#[from] NetError),
    #[error("the node has stopped")]
    Stopped,
    #[error("the system's random number generator failed")]
    Randomness,
}

/// A refusal by the group's rules is the caller's fault, not an encryption failure.
impl From<MlsError> for NodeError {
    fn from(e: MlsError) -> Self {
        match e {
            MlsError::Unauthorized(why) => NodeError::NotAllowed(why),
            other => NodeError::Mls(other),
        }
    }
}

/// The openmls provider of a node: RustCrypto plus the redb store.
pub struct Provider {
    crypto: RustCrypto,
    store: Arc<Store>,
}

impl Provider {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            crypto: RustCrypto::default(),
            store,
        }
    }
}

impl openmls_traits::OpenMlsProvider for Provider {
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

pub(crate) enum CoreInput {
    Send {
        contact: [u8; 32],
        text: String,
        reply_to: Option<[u8; 16]>,
        /// Without a conversation with the contact: keep the message as
        /// [`MessageState::Waiting`] instead of failing with
        /// [`NodeError::NoConversation`]. (It waits anyway while earlier
        /// messages to the contact wait, to keep the order.)
        wait: bool,
        reply: oneshot::Sender<Result<MessageView, NodeError>>,
    },
    /// Encrypt and queue the messages that wait for the conversation with a
    /// contact (see [`MessageState::Waiting`]); answers how many went out.
    FlushWaiting {
        contact: [u8; 32],
        reply: oneshot::Sender<Result<usize, NodeError>>,
    },
    /// A reaction, edit, delete, read or typing indicator in a chat.
    ChatAction {
        chat: ChatRef,
        action: ChatAction,
        reply: oneshot::Sender<Result<Option<MessageView>, NodeError>>,
    },
    /// Pin, mute or the disappearing timer of a chat.
    ChangeChat {
        chat: ChatRef,
        change: ChatChange,
        reply: oneshot::Sender<Result<ChatView, NodeError>>,
    },
    /// Replaces our home relays: saved, handed to every contact in a new
    /// mailbox grant, and the ones given up kept for draining a while.
    SetHomeRelays {
        relays: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<tidings_store::Settings, NodeError>>,
    },
    /// This account's name, picture, read receipts and presence sharing.
    ChangeSettings {
        change: SettingsChange,
        reply: oneshot::Sender<Result<tidings_store::Settings, NodeError>>,
    },
    /// One chat's view, or every chat's.
    Chats {
        chat: Option<ChatRef>,
        reply: oneshot::Sender<Result<Vec<ChatView>, NodeError>>,
    },
    /// Tell contacts we are online (if we share presence).
    PresenceTick,
    /// Sends a control payload as is, unchecked (tests of what receivers accept).
    RawControl {
        chat: ChatRef,
        id: Option<[u8; 16]>,
        body: Body,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    /// A new one-to-one conversation; with `replace`, it retires the others.
    CreateConversation {
        contact: [u8; 32],
        key_packages: Vec<Vec<u8>>,
        replace: bool,
        reply: oneshot::Sender<Result<Vec<u8>, NodeError>>,
    },
    /// Contacts whose conversation for sending lacks one of our devices or
    /// holds one we revoked.
    ConversationsToMend { reply: oneshot::Sender<Vec<[u8; 32]>> },
    PutContact {
        contact: Contact,
        reply: oneshot::Sender<Result<Contact, NodeError>>,
    },
    /// Commit fresh leaf keys in the conversation with a contact (post-compromise security).
    UpdateKeys {
        contact: [u8; 32],
        reply: oneshot::Sender<Result<u64, NodeError>>,
    },
    /// The MLS epoch of the conversation with a contact.
    Epoch {
        contact: [u8; 32],
        reply: oneshot::Sender<Result<Option<u64>, NodeError>>,
    },
    /// The other devices the next message to a contact goes to.
    ConversationDevices {
        contact: [u8; 32],
        reply: oneshot::Sender<Result<Vec<[u8; 32]>, NodeError>>,
    },
    NextRecordSeq {
        reply: oneshot::Sender<Result<u64, NodeError>>,
    },
    DeliverResult {
        device: [u8; 32],
        ids: Vec<u64>,
        result: Result<pb::DeliverResponse, NetError>,
        /// Verified custody receipts per envelope, when the envelopes went to relays.
        receipts: Vec<Vec<Vec<u8>>>,
        /// Relays that refused a deposit, with the reason they gave.
        refusals: Vec<(PeerId, &'static str)>,
        /// A direct delivery over an open connection failed or went unanswered.
        direct_failed: bool,
    },
    /// Envelopes fetched from one of our relays' mailboxes.
    ApplyMailbox {
        relay: PeerId,
        request_inbox: bool,
        envelopes: Vec<pb::Envelope>,
        /// The mailbox index of each envelope.
        indices: Vec<u64>,
        reply: oneshot::Sender<Result<Vec<DeliverStatus>, NodeError>>,
    },
    /// While catching up from mailboxes, direct deliveries wait (they could
    /// otherwise overtake older mail by more than the ratchet tolerates).
    CatchingUp(bool),
    /// Creates a group on `relays`; replies with its id.
    CreateGroup {
        name: String,
        relays: Vec<String>,
        reply: oneshot::Sender<Result<Vec<u8>, NodeError>>,
    },
    /// Commits a change to a group; replies whether a commit was made.
    GroupIntent {
        group_id: Vec<u8>,
        intent: tidings_store::IntentRow,
        reply: oneshot::Sender<Result<bool, NodeError>>,
    },
    /// Leave a group (proposals another member commits).
    GroupLeave {
        group_id: Vec<u8>,
        reply: oneshot::Sender<Result<bool, NodeError>>,
    },
    SendGroup {
        group_id: Vec<u8>,
        text: String,
        reply_to: Option<[u8; 16]>,
        reply: oneshot::Sender<Result<MessageView, NodeError>>,
    },
    /// Where to fetch each group's sequencing inbox, after the upkeep that is due.
    GroupInboxes {
        reply: oneshot::Sender<Result<GroupUpkeep, NodeError>>,
    },
    /// Envelopes fetched from a group's sequencing inbox, with their indices.
    ApplyGroupInbox {
        group_id: Vec<u8>,
        inbox_seed: [u8; 32],
        items: Vec<(u64, pb::Envelope)>,
        reply: oneshot::Sender<Result<usize, NodeError>>,
    },
    GroupView {
        group_id: Vec<u8>,
        reply: oneshot::Sender<Result<GroupView, NodeError>>,
    },
    /// Member device keys of these accounts in a group.
    GroupMemberDevices {
        group_id: Vec<u8>,
        accounts: Vec<[u8; 32]>,
        reply: oneshot::Sender<Result<Vec<[u8; 32]>, NodeError>>,
    },
    GroupMeta {
        group_id: Vec<u8>,
        reply: oneshot::Sender<Result<tidings_protocol::group::GroupMeta, NodeError>>,
    },
    /// Adds one of our own devices to a conversation, by its key package.
    AddOwnDevice {
        group_id: Vec<u8>,
        key_package: Vec<u8>,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    /// Revokes one of our other devices; replies with the number of groups it leaves.
    RevokeDevice {
        device: [u8; 32],
        reply: oneshot::Sender<Result<usize, NodeError>>,
    },
    /// Groups lacking one of our own devices.
    MissingOwnDevices {
        reply: oneshot::Sender<Vec<(Vec<u8>, DeviceCertificate)>>,
    },
    /// Fresh key packages to publish on relays: `n` one-time ones, plus a
    /// last-resort one if asked (empty otherwise).
    MakeKeyPackages {
        n: usize,
        last_resort: bool,
        reply: oneshot::Sender<Result<KeyPackages, NodeError>>,
    },
}

/// First retry delay after a failed delivery; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Most sends folded into one unit of work.
const MAX_SENDS_PER_UNIT: usize = 256;
/// How long a device whose direct delivery failed gets its mail through its
/// relays before a direct attempt is made again (a new connection ends it sooner).
const AWAY_FOR: Duration = Duration::from_secs(60);
/// How long a direct delivery may go unanswered before the envelopes go to the
/// device's relays as well (the device deduplicates by message id).
const DIRECT_PATIENCE: Duration = Duration::from_secs(5);
/// Peers noted within the last `ttl` (bounded: at most [`MAX_AWAY`]).
struct RecentPeers {
    at: HashMap<PeerId, Instant>,
    ttl: Duration,
}

impl RecentPeers {
    fn new(ttl: Duration) -> Self {
        Self {
            at: HashMap::new(),
            ttl,
        }
    }

    /// Whether `peer` was noted less than `ttl` ago.
    fn contains(&self, peer: PeerId) -> bool {
        self.at.get(&peer).is_some_and(|t| t.elapsed() < self.ttl)
    }

    fn insert(&mut self, peer: PeerId) {
        if self.at.len() >= MAX_AWAY {
            let ttl = self.ttl;
            self.at.retain(|_, t| t.elapsed() < ttl);
            if self.at.len() >= MAX_AWAY {
                self.at.clear();
            }
        }
        self.at.insert(peer, Instant::now());
    }

    fn remove(&mut self, peer: &PeerId) {
        self.at.remove(peer);
    }
}

/// Least time between two attempts to reach a device that is away.
const RECONNECT_EVERY: Duration = Duration::from_secs(30);
/// Most devices remembered as away.
const MAX_AWAY: usize = 4096;

/// Key packages one peer may ask for per minute.
const KEY_PACKAGES_PER_MINUTE: u32 = 20;

struct DeviceQueue {
    account: [u8; 32],
    entries: VecDeque<(u64, Option<[u8; 16]>, pb::Envelope)>,
    in_flight: bool,
    backoff: Duration,
    next_try: Instant,
}

impl DeviceQueue {
    fn new(account: [u8; 32]) -> Self {
        Self {
            account,
            entries: VecDeque::new(),
            in_flight: false,
            backoff: MIN_BACKOFF,
            next_try: Instant::now(),
        }
    }
}

pub(crate) struct Core {
    pub store: Arc<Store>,
    pub provider: Provider,
    pub engine: MlsEngine,
    pub net: Network,
    pub clock: Clock,
    pub me: AccountId,
    pub my_device: [u8; 32],
    pub events: broadcast::Sender<NodeEvent>,
    pub self_tx: mpsc::Sender<CoreInput>,
    groups: HashMap<Vec<u8>, MlsGroup>,
    members: HashMap<Vec<u8>, Vec<DeviceCertificate>>,
    certs: HashMap<Vec<u8>, DeviceCertificate>,
    queues: HashMap<[u8; 32], DeviceQueue>,
    /// Outstanding outbox entries per message id (for the delivered state).
    pending_per_message: HashMap<[u8; 16], usize>,
    key_package_budget: HashMap<PeerId, (Instant, u32)>,
    /// Our home relays: envelopes they push are mailbox deliveries.
    home_relays: HashSet<PeerId>,
    catching_up: bool,
    /// Messages at least one of whose envelopes went to a relay.
    via_relay: HashSet<[u8; 16]>,
    /// When we last tried to reach each device that is away (a DHT lookup and
    /// dials): at most once per [`RECONNECT_EVERY`], not once per batch.
    reconnects: RecentPeers,
    /// Devices whose direct delivery failed while a connection looked open
    /// (a sleeping laptop, a half-closed socket), with when: their mail goes to
    /// their relays until they connect anew or [`AWAY_FOR`] passes.
    away: RecentPeers,
    /// The latest deposit refusal per (recipient account, relay), shared with the API.
    refusals: Refusals,
    /// What this device hands conversation members so they can leave it mail.
    grant: pb::MailboxGrant,
    /// Outbox entries made while applying received envelopes; queued once
    /// their unit commits, dropped if it rolls back.
    deferred: Vec<([u8; 32], [u8; 32], u64, pb::Envelope)>,
    /// Group inboxes on relays, by the pseudo-device their outbox entries use.
    group_targets: HashMap<[u8; 32], (Vec<u8>, groups::GroupTarget)>,
    /// Groups joined while applying received envelopes (targets set up after commit).
    joined_groups: Vec<Vec<u8>>,
    /// The unit being applied joined a conversation (from a Welcome).
    conversation_joined: bool,
    /// Texts taken from our mailbox in the unit under way, per contact: a
    /// delivery receipt goes back for them in the same unit.
    mailbox_texts: HashMap<[u8; 32], Vec<[u8; 16]>>,
    /// The open device-link offer, if any.
    link: LinkOffers,
    /// Our leaf keys in a group older than this are renewed by a self-update.
    pub(crate) self_update_interval_ms: u64,
    /// Wakes the mailbox sync: a home relay connected again (it may have
    /// restarted and lost our subscription), or a push could not be applied
    /// whole (the relay then stops pushing until we fetch).
    pub(crate) mailbox_wake: Arc<tokio::sync::Notify>,
    /// Wakes the group sync task: a group was joined, or its upkeep has a new
    /// deadline (a commit of ours waits to be sequenced, proposals wait to be
    /// committed, we asked to leave).
    pub(crate) group_wake: Arc<tokio::sync::Notify>,
    /// Wakes the task that sets up conversations for waiting messages (a
    /// message started waiting, or a conversation came to exist).
    pub(crate) waiting_wake: Arc<tokio::sync::Notify>,
    /// Tells that task to try every waiting contact again at once, whatever
    /// its pause: a home relay connected again, so our own connectivity may
    /// have come back (after a partition, or a network change).
    pub(crate) waiting_nudge: Arc<tokio::sync::Notify>,
    /// Per home relay and inbox (normal or request), the mailbox index of the
    /// envelope its last push stopped at, if it stopped (see `on_push_result`).
    stuck_pushes: HashMap<(PeerId, bool), u64>,
    /// Something that decides which one-to-one conversations hold our current
    /// devices changed (our device list, a new or replaced conversation)
    /// since `conversations_to_mend` last found nothing to do.
    mend_dirty: bool,
    /// Chats whose unread count or settings changed in the current unit.
    touched: HashSet<[u8; 32]>,
    /// Contacts who share presence with us, shared with the API.
    pub(crate) presence: PresenceMap,
    /// When the next disappearing message is due (the node's clock).
    next_expiry: Option<u64>,
    /// Reactions, edits and deletes that arrived before their message.
    parked: chat::Parked,
}

/// Deposit refusals the node is living with: per (recipient account, relay),
/// the latest refusal. An entry goes away once that relay signs for that
/// recipient's mail again.
pub(crate) type Refusals = Arc<std::sync::Mutex<HashMap<([u8; 32], PeerId), RefusalView>>>;

/// Most (recipient, relay) pairs whose refusals are remembered.
const MAX_REFUSALS: usize = 1024;

/// Most home relays an account names (in grants, settings and records).
pub const MAX_HOME_RELAYS: usize = 8;
/// How long a relay given up is still drained for mail: contacts who were
/// away when the change went out keep leaving mail there until they hear of it.
pub const RETIRED_RELAY_DRAIN_MS: u64 = 14 * 24 * 3600 * 1000;

enum Abort {
    Envelope(usize, String),
    Store(StoreError),
}

impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Self {
        Abort::Store(e)
    }
}

/// Anything else that stops a unit of work rolls it back like a storage failure.
impl From<NodeError> for Abort {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Store(e) => Abort::Store(e),
            other => Abort::Store(StoreError::Corrupt(other.to_string())),
        }
    }
}

impl From<MlsError> for Abort {
    fn from(e: MlsError) -> Self {
        Abort::Store(StoreError::Corrupt(e.to_string()))
    }
}

enum Apply {
    Status(DeliverStatus),
    Invalid(String),
}

fn load_group<'a>(
    groups: &'a mut HashMap<Vec<u8>, MlsGroup>,
    provider: &Provider,
    gid: &[u8],
) -> Result<Option<&'a mut MlsGroup>, MlsError> {
    if !groups.contains_key(gid) {
        match MlsEngine::load(provider, gid)? {
            Some(g) => {
                groups.insert(gid.to_vec(), g);
            }
            None => return Ok(None),
        }
    }
    Ok(groups.get_mut(gid))
}

pub(crate) fn peer_id_of(device: &[u8; 32]) -> Option<PeerId> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(device).ok()?;
    Some(libp2p::identity::PublicKey::from(pk).to_peer_id())
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        engine: MlsEngine,
        net: Network,
        clock: Clock,
        me: AccountId,
        my_device: [u8; 32],
        events: broadcast::Sender<NodeEvent>,
        self_tx: mpsc::Sender<CoreInput>,
        home_relays: HashSet<PeerId>,
        refusals: Refusals,
        grant: pb::MailboxGrant,
        link: LinkOffers,
    ) -> Result<Self, StoreError> {
        let mut core = Self {
            provider: Provider::new(store.clone()),
            store,
            engine,
            net,
            clock,
            me,
            my_device,
            events,
            self_tx,
            groups: HashMap::new(),
            members: HashMap::new(),
            certs: HashMap::new(),
            queues: HashMap::new(),
            pending_per_message: HashMap::new(),
            key_package_budget: HashMap::new(),
            home_relays,
            catching_up: false,
            via_relay: HashSet::new(),
            away: RecentPeers::new(AWAY_FOR),
            reconnects: RecentPeers::new(RECONNECT_EVERY),
            refusals,
            grant,
            deferred: Vec::new(),
            group_targets: HashMap::new(),
            joined_groups: Vec::new(),
            conversation_joined: false,
            mailbox_texts: HashMap::new(),
            link,
            self_update_interval_ms: SELF_UPDATE_INTERVAL_MS,
            mailbox_wake: Arc::default(),
            group_wake: Arc::default(),
            waiting_wake: Arc::default(),
            waiting_nudge: Arc::default(),
            stuck_pushes: HashMap::new(),
            mend_dirty: true,
            touched: HashSet::new(),
            presence: PresenceMap::default(),
            next_expiry: None,
            parked: chat::Parked::new(),
        };
        core.next_expiry = core.store.next_expiry()?;
        core.load_group_targets();
        for e in core.store.list_outbox()? {
            match pb::Envelope::decode(e.envelope.as_slice()) {
                Ok(env) => core.enqueue(e.account, e.device, e.id, e.message_id, env),
                Err(err) => warn!(id = e.id, "dropping undecodable outbox entry: {err}"),
            }
        }
        Ok(core)
    }

    fn enqueue(
        &mut self,
        account: [u8; 32],
        device: [u8; 32],
        id: u64,
        message_id: Option<[u8; 16]>,
        env: pb::Envelope,
    ) {
        if let Some(m) = message_id {
            *self.pending_per_message.entry(m).or_default() += 1;
        }
        self.queues
            .entry(device)
            .or_insert_with(|| DeviceQueue::new(account))
            .entries
            .push_back((id, message_id, env));
    }

    pub async fn run(mut self, mut inputs: mpsc::Receiver<CoreInput>, mut net_events: mpsc::Receiver<NetEvent>) {
        loop {
            self.sweep_expired();
            self.pump();
            let mut due = self.next_due();
            // Disappearing messages: due by the node's clock, which may not
            // follow tokio's; look again at least once a second until then.
            if let Some(at) = self.next_expiry {
                // At least 50 ms: a sweep that failed must not spin the loop.
                let wait = Duration::from_millis(at.saturating_sub(self.clock.now_ms()).clamp(50, 1000));
                let t = Instant::now() + wait;
                due = Some(due.map_or(t, |d| d.min(t)));
            }
            tokio::select! {
                input = inputs.recv() => {
                    let Some(first) = input else { break };
                    let mut batch = vec![first];
                    while batch.len() < MAX_SENDS_PER_UNIT {
                        match inputs.try_recv() {
                            Ok(i) => batch.push(i),
                            Err(_) => break,
                        }
                    }
                    self.on_inputs(batch);
                }
                ev = net_events.recv() => match ev {
                    Some(ev) => self.on_net_event(ev).await,
                    None => break,
                },
                _ = sleep_until_opt(due) => {}
            }
        }
        debug!("core task stopped");
    }

    // ------------------------------------------------------------- inputs

    fn on_inputs(&mut self, batch: Vec<CoreInput>) {
        let mut sends = Vec::new();
        for input in batch {
            match input {
                CoreInput::Send {
                    contact,
                    text,
                    reply_to,
                    wait,
                    reply,
                } => sends.push((contact, text, reply_to, wait, reply)),
                other => {
                    self.flush_sends(std::mem::take(&mut sends));
                    self.on_input(other);
                }
            }
        }
        self.flush_sends(sends);
    }

    fn on_input(&mut self, input: CoreInput) {
        match input {
            // Sends are folded into units by `on_inputs` and never reach here.
            CoreInput::Send { .. } => {}
            CoreInput::ChatAction { chat, action, reply } => {
                let _ = reply.send(self.chat_action(&chat, action));
            }
            CoreInput::ChangeChat { chat, change, reply } => {
                let _ = reply.send(self.change_chat(&chat, change));
            }
            CoreInput::ChangeSettings { change, reply } => {
                let _ = reply.send(self.change_settings(change));
            }
            CoreInput::SetHomeRelays { relays, reply } => {
                let _ = reply.send(self.set_home_relays(relays));
            }
            CoreInput::Chats { chat, reply } => {
                let r = match chat {
                    Some(c) => self.chat_view(&c).map(|v| vec![v]),
                    None => self.chat_views(),
                };
                let _ = reply.send(r);
            }
            CoreInput::PresenceTick => self.presence_heartbeat(),
            CoreInput::RawControl { chat, id, body, reply } => {
                let now = self.clock.now_ms();
                let store = self.store.clone();
                let payload = Payload {
                    id: id.unwrap_or_else(rand::random),
                    sender_seq: 0,
                    timestamp_ms: now,
                    body,
                };
                let r = store.unit(|| self.seal_payload(&chat, payload, now));
                let r = match r {
                    Ok(sealed) => {
                        self.dispatch(sealed);
                        Ok(())
                    }
                    Err(e) => {
                        self.groups.clear();
                        self.members.clear();
                        Err(e)
                    }
                };
                let _ = reply.send(r);
            }
            CoreInput::CreateConversation {
                contact,
                key_packages,
                replace,
                reply,
            } => {
                let r = self.create_conversation(contact, key_packages, replace);
                if r.is_ok() {
                    self.send_profile_to(contact);
                    self.waiting_wake.notify_one();
                }
                let _ = reply.send(r);
            }
            CoreInput::FlushWaiting { contact, reply } => {
                let _ = reply.send(self.on_flush_waiting(contact));
            }
            CoreInput::ConversationsToMend { reply } => {
                let _ = reply.send(self.conversations_to_mend());
            }
            CoreInput::PutContact { contact, reply } => {
                let r = self.put_contact(contact);
                let _ = reply.send(r);
            }
            CoreInput::UpdateKeys { contact, reply } => {
                let r = self.update_keys(contact);
                let _ = reply.send(r);
            }
            CoreInput::Epoch { contact, reply } => {
                let r = self.epoch(&contact);
                let _ = reply.send(r);
            }
            CoreInput::ConversationDevices { contact, reply } => {
                let r = match self.store.contact(&contact) {
                    Ok(Some(c)) => match self.send_conversation(&c) {
                        Ok(Some(gid)) => self.member_devices(&gid),
                        Ok(None) => Ok(Vec::new()),
                        Err(e) => Err(e.into()),
                    },
                    Ok(None) => Err(NodeError::UnknownContact(bs58::encode(contact).into_string())),
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(r);
            }
            CoreInput::NextRecordSeq { reply } => {
                let now = self.clock.now_ms();
                let store = self.store.clone();
                let r = store
                    .unit(|| -> Result<u64, StoreError> {
                        let next = store.next_counter("record_seq")?;
                        store.raise_counter("record_seq", next.max(now))
                    })
                    .map_err(NodeError::from);
                let _ = reply.send(r);
            }
            CoreInput::DeliverResult {
                device,
                ids,
                result,
                receipts,
                refusals,
                direct_failed,
            } => {
                if direct_failed && let Some(peer) = peer_id_of(&device) {
                    self.away.insert(peer);
                }
                self.on_deliver_result(device, ids, result, receipts, refusals)
            }
            CoreInput::ApplyMailbox {
                relay,
                request_inbox,
                envelopes,
                indices,
                reply,
            } => {
                let request = pb::DeliverRequest {
                    envelopes,
                    mailbox_indices: indices,
                    request_inbox,
                };
                let (resp, events) = self.apply_batch(relay, request, Some(request_inbox));
                for e in events {
                    let _ = self.events.send(e);
                }
                let statuses = resp
                    .statuses
                    .iter()
                    .map(|s| DeliverStatus::try_from(*s).unwrap_or(DeliverStatus::NotProcessed))
                    .collect();
                let _ = reply.send(Ok(statuses));
            }
            CoreInput::CatchingUp(on) => self.catching_up = on,
            CoreInput::CreateGroup { name, relays, reply } => {
                let _ = reply.send(self.create_group(&name, relays));
            }
            CoreInput::GroupIntent {
                group_id,
                intent,
                reply,
            } => {
                let _ = reply.send(self.group_intent(&group_id, intent));
            }
            CoreInput::GroupLeave { group_id, reply } => {
                let _ = reply.send(self.leave_group(&group_id).map(|()| true));
            }
            CoreInput::SendGroup {
                group_id,
                text,
                reply_to,
                reply,
            } => {
                let now = self.clock.now_ms();
                let store = self.store.clone();
                let r = store.unit(|| self.send_group_one(&group_id, &text, reply_to, now));
                let r = match r {
                    Ok((msg, entries)) => {
                        let env = entries.first().map(|(_, _, _, e)| e.clone());
                        for (account, device, id, env) in entries {
                            self.enqueue(account, device, id, Some(msg.id), env);
                        }
                        if let Some(env) = env {
                            self.push_to_members(&group_id, env);
                        }
                        self.note_expiry(msg.expires_ms);
                        let view = self.view(&msg);
                        let _ = self.events.send(NodeEvent::Message(Box::new(view.clone())));
                        Ok(view)
                    }
                    Err(e) => {
                        self.groups.remove(group_id.as_slice());
                        Err(e)
                    }
                };
                let _ = reply.send(r);
            }
            CoreInput::GroupInboxes { reply } => {
                let _ = reply.send(self.group_inboxes());
            }
            CoreInput::ApplyGroupInbox {
                group_id,
                inbox_seed,
                items,
                reply,
            } => {
                let _ = reply.send(self.apply_group_inbox(&group_id, inbox_seed, items));
            }
            CoreInput::GroupView { group_id, reply } => {
                let _ = reply.send(self.group_view(&group_id));
            }
            CoreInput::GroupMemberDevices {
                group_id,
                accounts,
                reply,
            } => {
                let _ = reply.send(self.member_devices_of(&group_id, &accounts));
            }
            CoreInput::GroupMeta { group_id, reply } => {
                let _ = reply.send(self.group_meta_of(&group_id));
            }
            CoreInput::AddOwnDevice {
                group_id,
                key_package,
                reply,
            } => {
                let _ = reply.send(self.add_own_device(&group_id, key_package));
            }
            CoreInput::RevokeDevice { device, reply } => {
                let _ = reply.send(self.revoke_device(device));
            }
            CoreInput::MissingOwnDevices { reply } => {
                let _ = reply.send(self.missing_own_devices());
            }
            CoreInput::MakeKeyPackages { n, last_resort, reply } => {
                let store = self.store.clone();
                let r = store.unit(|| -> Result<_, NodeError> {
                    let mut kps = Vec::with_capacity(n);
                    for _ in 0..n {
                        kps.push(self.engine.key_package(&self.provider, false)?);
                    }
                    let last = if last_resort {
                        self.engine.key_package(&self.provider, true)?
                    } else {
                        Vec::new()
                    };
                    Ok((kps, last))
                });
                let _ = reply.send(r);
            }
        }
    }

    fn put_contact(&mut self, contact: Contact) -> Result<Contact, NodeError> {
        let merged = merge_contact(&self.store, contact)?;
        let _ = self.events.send(NodeEvent::Contact(ContactView::from_contact(&merged)));
        Ok(merged)
    }

    fn flush_sends(&mut self, sends: Vec<PendingSend>) {
        if sends.is_empty() {
            return;
        }
        let now = self.clock.now_ms();
        let store = self.store.clone();
        // Fast path: every send of the batch in one unit (one durable commit).
        let mut results = Vec::with_capacity(sends.len());
        let batch = store.unit(|| -> Result<(), NodeError> {
            for (contact, text, reply_to, wait, _) in &sends {
                results.push(self.send_one(contact, text, *reply_to, *wait, now)?);
            }
            Ok(())
        });
        let results = match batch {
            Ok(()) => results.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(_) => {
                // Something failed: state rolled back. Redo each send alone so
                // that one bad send does not fail the others.
                self.groups.clear();
                sends
                    .iter()
                    .map(|(contact, text, reply_to, wait, _)| {
                        let r = store.unit(|| self.send_one(contact, text, *reply_to, *wait, now));
                        if r.is_err() {
                            self.groups.clear();
                        }
                        r
                    })
                    .collect()
            }
        };
        for ((_, _, _, _, reply), r) in sends.into_iter().zip(results) {
            let r = r.map(|(msg, entries)| {
                if msg.state == MessageState::Waiting {
                    // Committed: the set-up task sees it now.
                    self.waiting_wake.notify_one();
                }
                for (account, device, id, env) in entries {
                    self.enqueue(account, device, id, Some(msg.id), env);
                }
                self.note_expiry(msg.expires_ms);
                let view = self.view(&msg);
                let _ = self.events.send(NodeEvent::Message(Box::new(view.clone())));
                view
            });
            let _ = reply.send(r);
        }
    }

    #[allow(clippy::type_complexity)]
    fn send_one(
        &mut self,
        contact: &[u8; 32],
        text: &str,
        reply_to: Option<[u8; 16]>,
        wait: bool,
        now: u64,
    ) -> Result<(StoredMessage, Vec<OutboxRow>), NodeError> {
        let timer = self.check_new_text(contact, text, reply_to)?;
        let c = self
            .store
            .contact(contact)?
            .ok_or_else(|| NodeError::UnknownContact(bs58::encode(contact).into_string()))?;
        // Sent now only into an existing conversation, and behind no waiting
        // message (the order is kept); otherwise it waits, if it may.
        let gid = match (self.send_conversation(&c)?, self.store.has_waiting(contact)?) {
            (Some(gid), false) => Some(gid),
            (None, false) if !wait => return Err(NodeError::NoConversation),
            _ => None,
        };
        // A contact without a single valid device certificate could never be
        // reached: such a send fails instead of waiting.
        if gid.is_none() && !has_valid_device(&c, now) {
            return Err(NodeError::Unreachable("the contact has no valid device".into()));
        }
        let (id, seq, ts, payload) = self.text_payload(text, reply_to, timer, now)?;
        let (state, entries) = match gid {
            Some(gid) => {
                let entries = self.seal_for_conversation(&gid, contact, &payload, id, now)?;
                (sent_state(&entries), entries)
            }
            // Numbered and timed now, encrypted once the conversation exists
            // (`flush_waiting`).
            None => (MessageState::Waiting, Vec::new()),
        };
        let mut msg = StoredMessage::new_text(
            id,
            *contact,
            *self.me.as_bytes(),
            seq,
            ts,
            now,
            true,
            text.to_owned(),
            state,
        );
        msg.reply_to = reply_to;
        msg.expires_ms = Self::expiry_for(timer, now);
        self.store.insert_message(&msg)?;
        Ok((msg, entries))
    }

    /// Encrypts `payload` (message `id`) in conversation `gid` with `contact`
    /// and queues it for every other device of it, inside the caller's unit.
    fn seal_for_conversation(
        &mut self,
        gid: &[u8],
        contact: &[u8; 32],
        payload: &[u8],
        id: [u8; 16],
        now: u64,
    ) -> Result<Vec<OutboxRow>, NodeError> {
        let group = load_group(&mut self.groups, &self.provider, gid)?.ok_or(NodeError::NoConversation)?;
        let ct = self.engine.encrypt(&self.provider, group, payload)?;
        let env = new_envelope(gid, EnvelopeKind::Message, ct);
        let mut entries = Vec::new();
        let own = self.own_device_keys();
        for device in self.member_devices(gid)? {
            // Our other devices are reached at our own relays.
            let account = if own.contains(&device) {
                *self.me.as_bytes()
            } else {
                *contact
            };
            entries.push(self.outbox_entry(account, device, &env, Some(id), now)?);
        }
        Ok(entries)
    }

    /// Encrypts and queues, in the order they were written, our messages that
    /// waited for a conversation with `contact`, inside the caller's unit.
    /// Each keeps the id, number and time it got when it was written.
    fn flush_waiting(
        &mut self,
        contact: &[u8; 32],
        now: u64,
    ) -> Result<Vec<(StoredMessage, Vec<OutboxRow>)>, NodeError> {
        let waiting = self.store.waiting_messages(contact)?;
        if waiting.is_empty() {
            return Ok(Vec::new());
        }
        let c = self
            .store
            .contact(contact)?
            .ok_or_else(|| NodeError::UnknownContact(bs58::encode(contact).into_string()))?;
        let gid = self.send_conversation(&c)?.ok_or(NodeError::NoConversation)?;
        let mut out = Vec::with_capacity(waiting.len());
        for mut msg in waiting {
            let timer = msg.expires_ms.map_or(0, |at| at.saturating_sub(msg.received_ms) / 1000);
            let payload = chat::encode_text(msg.id, msg.sender_seq, msg.timestamp_ms, &msg.text, msg.reply_to, timer);
            let entries = self.seal_for_conversation(&gid, contact, &payload, msg.id, now)?;
            msg.state = sent_state(&entries);
            self.store.set_message_state(&msg.id, msg.state)?;
            out.push((msg, entries));
        }
        Ok(out)
    }

    /// [`Core::flush_waiting`] as one unit of work; queues what it sealed.
    fn on_flush_waiting(&mut self, contact: [u8; 32]) -> Result<usize, NodeError> {
        let now = self.clock.now_ms();
        let store = self.store.clone();
        let sent = match store.unit(|| self.flush_waiting(&contact, now)) {
            Ok(sent) => sent,
            Err(e) => {
                // The unit rolled back; cached groups may be ahead of storage.
                self.groups.clear();
                self.members.clear();
                return Err(e);
            }
        };
        let n = sent.len();
        for (msg, entries) in sent {
            for (account, device, id, env) in entries {
                self.enqueue(account, device, id, Some(msg.id), env);
            }
            let _ = self.events.send(NodeEvent::Message(Box::new(self.view(&msg))));
        }
        Ok(n)
    }

    /// Devices of a group other than this one.
    fn member_devices(&mut self, gid: &[u8]) -> Result<Vec<[u8; 32]>, NodeError> {
        if !self.members.contains_key(gid) {
            let group = load_group(&mut self.groups, &self.provider, gid)?.ok_or(NodeError::NoConversation)?;
            let certs = MlsEngine::members(group);
            self.members.insert(gid.to_vec(), certs);
        }
        Ok(self.members[gid]
            .iter()
            .map(|c| c.device_key)
            .filter(|d| *d != self.my_device)
            .collect())
    }

    fn epoch(&mut self, contact: &[u8; 32]) -> Result<Option<u64>, NodeError> {
        let Some(c) = self.store.contact(contact)? else {
            return Ok(None);
        };
        let Some(gid) = self.send_conversation(&c)? else {
            return Ok(None);
        };
        Ok(load_group(&mut self.groups, &self.provider, &gid)?.map(|g| g.epoch().as_u64()))
    }

    /// The conversation to send in with a contact: the smallest id among those
    /// not replaced by one we have (see `Body::Retire`); if every one was,
    /// the smallest id of all.
    pub(crate) fn send_conversation(&self, c: &Contact) -> Result<Option<Vec<u8>>, StoreError> {
        let mut live = Vec::new();
        for gid in &c.conversations {
            let replaced = self
                .store
                .conversation(gid)?
                .and_then(|conv| conv.superseded_by)
                .is_some_and(|s| s != *gid && c.conversations.contains(&s));
            if !replaced {
                live.push(gid);
            }
        }
        Ok(live.into_iter().min().or_else(|| c.conversations.iter().min()).cloned())
    }

    fn update_keys(&mut self, contact: [u8; 32]) -> Result<u64, NodeError> {
        let now = self.clock.now_ms();
        let store = self.store.clone();
        let result = store.unit(|| -> Result<_, NodeError> {
            let c = store
                .contact(&contact)?
                .ok_or_else(|| NodeError::UnknownContact(bs58::encode(contact).into_string()))?;
            let gid = self.send_conversation(&c)?.ok_or(NodeError::NoConversation)?;
            let group = load_group(&mut self.groups, &self.provider, &gid)?.ok_or(NodeError::NoConversation)?;
            let commit = self.engine.self_update(&self.provider, group)?;
            let epoch = group.epoch().as_u64();
            let env = pb::Envelope {
                id: rand::random::<[u8; 16]>().to_vec(),
                conversation_id: gid.clone(),
                kind: EnvelopeKind::Message as i32,
                mls_message: commit,
                ..Default::default()
            };
            let bytes = env.encode_to_vec();
            let mut entries = Vec::new();
            for device in self.member_devices(&gid)? {
                let oid = store.push_outbox(OutboxEntry {
                    id: 0,
                    device,
                    account: contact,
                    envelope: bytes.clone(),
                    message_id: None,
                    created_ms: now,
                })?;
                entries.push((device, oid, env.clone()));
            }
            Ok((epoch, entries))
        });
        match result {
            Ok((epoch, entries)) => {
                for (d, id, env) in entries {
                    self.enqueue(contact, d, id, None, env);
                }
                Ok(epoch)
            }
            Err(e) => {
                self.groups.clear();
                Err(e)
            }
        }
    }

    /// Creates a one-to-one conversation with the devices whose key packages
    /// are given: the contact's, and our own other devices'. With `replace`,
    /// every other conversation with the contact is retired in favour of the
    /// new one (`Body::Retire`), so that both sides move over to it.
    fn create_conversation(
        &mut self,
        contact: [u8; 32],
        key_packages: Vec<Vec<u8>>,
        replace: bool,
    ) -> Result<Vec<u8>, NodeError> {
        let now = self.clock.now_ms();
        let account = AccountId::from_bytes(&contact).map_err(|e| NodeError::InvalidContact(e.to_string()))?;
        let mut kps = Vec::new();
        let mut certs = Vec::new();
        for bytes in &key_packages {
            let verified = MlsEngine::verify_key_package(&self.provider, bytes, &account, now)
                .or_else(|_| MlsEngine::verify_key_package(&self.provider, bytes, &self.me, now));
            match verified {
                Ok((_, cert)) if cert.device_key == self.my_device => {}
                Ok((kp, cert)) => {
                    kps.push(kp);
                    certs.push(cert);
                }
                Err(e) => warn!("ignoring invalid key package: {e}"),
            }
        }
        if !certs.iter().any(|c| c.account == account) {
            return Err(NodeError::Unreachable("no valid key package".into()));
        }
        let gid: [u8; 16] = rand::random();
        let store = self.store.clone();
        let result = store.unit(|| -> Result<_, NodeError> {
            let mut c = store
                .contact(&contact)?
                .ok_or_else(|| NodeError::UnknownContact(account.to_base58()))?;
            let (mut group, welcome) = self.engine.create_group(&self.provider, &gid, &kps)?;
            let welcome = welcome.ok_or(NodeError::NoConversation)?;
            store.put_conversation(&Conversation {
                group_id: gid.to_vec(),
                peer: contact,
                created_ms: now,
                group: None,
                superseded_by: None,
            })?;
            let older = c.conversations.clone();
            c.conversations.push(gid.to_vec());
            c.conversations.sort();
            store.put_contact(&c)?;
            self.mend_dirty = true;
            let env = pb::Envelope {
                id: rand::random::<[u8; 16]>().to_vec(),
                conversation_id: gid.to_vec(),
                kind: EnvelopeKind::Welcome as i32,
                mls_message: welcome,
                ..Default::default()
            };
            let mut entries = Vec::new();
            for cert in &certs {
                entries.push(self.outbox_entry(*cert.account.as_bytes(), cert.device_key, &env, None, now)?);
            }
            // Right behind the Welcome: what the new member needs to leave us mail.
            let grant = self.grant_envelope(&mut group, &gid, now)?;
            for cert in &certs {
                entries.push(self.outbox_entry(*cert.account.as_bytes(), cert.device_key, &grant, None, now)?);
            }
            self.groups.insert(gid.to_vec(), group);
            if replace {
                for old in &older {
                    entries.extend(self.retire_entries(old, contact, gid, now)?);
                }
            }
            Ok(entries)
        });
        match result {
            Ok(entries) => {
                self.members.remove(gid.as_slice());
                for (account, d, id, env) in entries {
                    self.enqueue(account, d, id, None, env);
                }
                info!(contact = %account, replace, "conversation created");
                Ok(gid.to_vec())
            }
            Err(e) => {
                // Retiring others advanced their ratchets in the cache only.
                self.groups.clear();
                self.members.clear();
                Err(e)
            }
        }
    }

    // ------------------------------------------------------------ inbound

    async fn on_net_event(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Deliver { id, peer, request } => {
                let pushed = self
                    .home_relays
                    .contains(&peer)
                    .then(|| (request.request_inbox, request.mailbox_indices.clone()));
                let (response, events) = self.on_deliver(peer, request);
                if let Some((request_inbox, indices)) = pushed {
                    self.on_push_result((peer, request_inbox), &indices, &response);
                }
                self.net.respond_deliver(id, response).await;
                for e in events {
                    let _ = self.events.send(e);
                }
            }
            NetEvent::KeyPackage { id, peer, request: _ } => {
                let response = if self.key_package_allowed(peer) {
                    let store = self.store.clone();
                    match store.unit(|| -> Result<_, NodeError> { Ok(self.engine.key_package(&self.provider, false)?) })
                    {
                        Ok(kp) => pb::KeyPackageResponse { key_package: kp },
                        Err(e) => {
                            warn!("cannot make a key package: {e}");
                            pb::KeyPackageResponse::default()
                        }
                    }
                } else {
                    info!(%peer, "key package request refused: rate limited");
                    pb::KeyPackageResponse::default()
                };
                self.net.respond_key_package(id, response).await;
            }
            NetEvent::Link { id, peer, request } => {
                let response = self.on_link(peer, request);
                self.net.respond_link(id, response).await;
            }
            NetEvent::Mailbox { id, .. } => {
                // Only relays run the mailbox service; they route these elsewhere.
                let response = pb::MailboxResponse {
                    status: pb::MailboxStatus::Unavailable as i32,
                    detail: "this node keeps no mailboxes".into(),
                    result: None,
                };
                self.net.respond_mailbox(id, response).await;
            }
            NetEvent::Connected(peer) => {
                if self.home_relays.contains(&peer) {
                    self.mailbox_wake.notify_one();
                    self.waiting_nudge.notify_one();
                }
                self.away.remove(&peer);
                self.reconnects.remove(&peer);
                let now = Instant::now();
                for (device, q) in self.queues.iter_mut() {
                    if peer_id_of(device) == Some(peer) {
                        q.next_try = now;
                        q.backoff = MIN_BACKOFF;
                    }
                }
            }
        }
    }

    /// A push from `inbox` (a home relay, and whether the push came from the
    /// request inbox) that could not be applied whole ends that subscription:
    /// the mailbox sync runs a round at once (the
    /// Welcome it waited for may be in the request inbox), but only once per
    /// stuck envelope, or an envelope that can never be applied would make
    /// subscribe, push and fetch go round without pause.
    fn on_push_result(&mut self, inbox: (PeerId, bool), indices: &[u64], response: &pb::DeliverResponse) {
        let stuck = response.statuses.iter().position(|s| {
            matches!(
                DeliverStatus::try_from(*s),
                Ok(DeliverStatus::UnknownConversation | DeliverStatus::NotProcessed)
            )
        });
        match stuck.and_then(|i| indices.get(i)) {
            Some(&index) => {
                if self.stuck_pushes.insert(inbox, index) != Some(index) {
                    self.mailbox_wake.notify_one();
                }
            }
            None => {
                self.stuck_pushes.remove(&inbox);
            }
        }
    }

    fn key_package_allowed(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        if self.key_package_budget.len() > 10_000 {
            self.key_package_budget
                .retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let entry = self.key_package_budget.entry(peer).or_insert((now, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(60) {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= KEY_PACKAGES_PER_MINUTE
    }

    /// Handles a direct delivery (or a push from one of our relays).
    pub(crate) fn on_deliver(
        &mut self,
        peer: PeerId,
        req: pb::DeliverRequest,
    ) -> (pb::DeliverResponse, Vec<NodeEvent>) {
        // A relay of ours pushing mailbox envelopes is mail, not a direct delivery.
        let via_mailbox = self.home_relays.contains(&peer);
        if self.catching_up && !via_mailbox {
            let n = req.envelopes.len();
            return (statuses(vec![DeliverStatus::NotProcessed; n]), Vec::new());
        }
        // A push says which inbox it comes from.
        let request_inbox = req.request_inbox;
        self.apply_batch(peer, req, via_mailbox.then_some(request_inbox))
    }

    /// Applies a batch of envelopes in one unit of work and returns one status
    /// per envelope plus the events to emit once the unit committed.
    /// `mailbox`: the envelopes come from one of our inboxes on relay `peer`
    /// (`Some(request_inbox)`), so the transport peer is the relay, not the
    /// sender; their mailbox indices advance our cursor on that relay in the
    /// same commit, and any index skipped is reported as missing mail.
    fn apply_batch(
        &mut self,
        peer: PeerId,
        req: pb::DeliverRequest,
        mailbox: Option<bool>,
    ) -> (pb::DeliverResponse, Vec<NodeEvent>) {
        let via_mailbox = mailbox.is_some();
        let n = req.envelopes.len();
        let relay_key = key_of_peer(&peer);
        if n > MAX_ENVELOPES_PER_BATCH {
            warn!(%peer, n, "delivery batch too large; refused");
            return (statuses(vec![DeliverStatus::Rejected; n]), Vec::new());
        }
        // Structural checks first: these need no state and no rollback.
        let mut pre: Vec<Option<DeliverStatus>> = req
            .envelopes
            .iter()
            .map(|e| {
                let ok = e.id.len() == 16
                    && !e.conversation_id.is_empty()
                    && e.conversation_id.len() <= 64
                    && (e.mls_message.len() <= MAX_MLS_MESSAGE
                        || (e.kind == EnvelopeKind::Welcome as i32 && e.mls_message.len() <= MAX_WELCOME))
                    && matches!(
                        EnvelopeKind::try_from(e.kind),
                        Ok(EnvelopeKind::Welcome | EnvelopeKind::Message)
                    );
                (!ok).then_some(DeliverStatus::Rejected)
            })
            .collect();
        let now = self.clock.now_ms();
        let store = self.store.clone();
        loop {
            let mut out = Vec::with_capacity(n);
            let mut events = Vec::new();
            self.mailbox_texts.clear();
            let result = store.unit(|| -> Result<(), Abort> {
                let mut stop = false;
                for (i, env) in req.envelopes.iter().enumerate() {
                    if let Some(s) = pre[i] {
                        out.push(s);
                        continue;
                    }
                    if stop {
                        out.push(DeliverStatus::NotProcessed);
                        continue;
                    }
                    match self.apply(peer, env, now, via_mailbox, &mut events)? {
                        Apply::Status(s) => {
                            if s == DeliverStatus::UnknownConversation {
                                stop = true;
                            }
                            out.push(s);
                        }
                        Apply::Invalid(why) => return Err(Abort::Envelope(i, why)),
                    }
                }
                if let (Some(request_inbox), Some(relay)) = (mailbox, relay_key.as_ref())
                    && req.mailbox_indices.len() == n
                {
                    // Only the applied prefix: the rest comes again later.
                    let applied: Vec<u64> = req
                        .mailbox_indices
                        .iter()
                        .zip(&out)
                        .take_while(|(_, s)| {
                            matches!(
                                s,
                                DeliverStatus::Accepted | DeliverStatus::Duplicate | DeliverStatus::Rejected
                            )
                        })
                        .map(|(i, _)| *i)
                        .collect();
                    for gap in self.store.record_mail_indices(relay, request_inbox, &applied, now)? {
                        warn!(
                            relay = %peer,
                            request_inbox,
                            from = gap.from,
                            to = gap.to,
                            "relay skipped mailbox indices: mail it accepted was not delivered"
                        );
                        events.push(NodeEvent::MailMissing(MailGapView::from_gap(&gap)));
                    }
                }
                self.seal_delivery_receipts(now)?;
                // Every envelope applied: show new messages now, before the
                // durable commit. That is safe: the sender keeps them until our
                // ack, which only follows the commit. Should the commit fail,
                // the sender retries and the message is shown again.
                for e in events.drain(..) {
                    let _ = self.events.send(e);
                }
                Ok(())
            });
            let deferred = std::mem::take(&mut self.deferred);
            let joined = std::mem::take(&mut self.joined_groups);
            let conversation_joined = std::mem::take(&mut self.conversation_joined);
            match result {
                Ok(()) => {
                    for (account, device, oid, env) in deferred {
                        self.enqueue(account, device, oid, None, env);
                    }
                    if conversation_joined {
                        self.waiting_wake.notify_one();
                    }
                    for gid in joined {
                        self.refresh_group_targets(&gid);
                    }
                    self.emit_touched();
                    return (statuses(out), events);
                }
                Err(Abort::Envelope(i, why)) => {
                    self.touched.clear();
                    // The unit rolled back; cached groups may be ahead of storage.
                    info!(%peer, "refused envelope: {why}");
                    self.groups.clear();
                    self.members.clear();
                    pre[i] = Some(DeliverStatus::Rejected);
                }
                Err(Abort::Store(e)) => {
                    warn!("cannot commit received envelopes: {e}");
                    self.groups.clear();
                    self.members.clear();
                    return (statuses(vec![DeliverStatus::NotProcessed; n]), Vec::new());
                }
            }
        }
    }

    fn apply(
        &mut self,
        peer: PeerId,
        env: &pb::Envelope,
        now: u64,
        via_mailbox: bool,
        events: &mut Vec<NodeEvent>,
    ) -> Result<Apply, Abort> {
        let id: [u8; 16] = env
            .id
            .as_slice()
            .try_into()
            .map_err(|_| Abort::Envelope(0, "bad id".into()))?;
        if self.store.envelope_seen(&id)? {
            return Ok(Apply::Status(DeliverStatus::Duplicate));
        }
        let gid = env.conversation_id.as_slice();
        match EnvelopeKind::try_from(env.kind) {
            Ok(EnvelopeKind::Welcome) => {
                if self.store.conversation(gid)?.is_some() {
                    return Ok(Apply::Status(DeliverStatus::Rejected));
                }
                let group = match self.engine.join(&self.provider, &env.mls_message) {
                    Ok(g) => g,
                    Err(e) => return Ok(Apply::Invalid(format!("welcome: {e}"))),
                };
                if group.group_id().as_slice() != gid {
                    return Ok(Apply::Invalid("welcome for another conversation id".into()));
                }
                let members = MlsEngine::members(&group);
                if !via_mailbox && !members.iter().any(|c| peer_id_of(&c.device_key) == Some(peer)) {
                    return Ok(Apply::Invalid("welcome from a peer outside the group".into()));
                }
                if let Some(row) = Self::joined_group_row(&group, env.sequence_start, now) {
                    self.store.put_conversation(&Conversation {
                        group_id: gid.to_vec(),
                        peer: tidings_protocol::group::group_chat_key(gid),
                        created_ms: now,
                        group: Some(row),
                        superseded_by: None,
                    })?;
                    self.members.insert(gid.to_vec(), members);
                    self.group_wake.notify_one();
                    self.groups.insert(gid.to_vec(), group);
                    self.joined_groups.push(gid.to_vec());
                    info!(group = %hex::encode(gid), "joined a group");
                    self.store.mark_envelope_seen(&id, now)?;
                    return Ok(Apply::Status(DeliverStatus::Accepted));
                }
                let others: HashSet<AccountId> = members.iter().map(|c| c.account).filter(|a| *a != self.me).collect();
                if others.len() != 1 {
                    return Ok(Apply::Invalid("not a one-to-one conversation".into()));
                }
                let Some(other) = others.into_iter().next() else {
                    return Ok(Apply::Invalid("no other member".into()));
                };
                let mut contact = self.store.contact(other.as_bytes())?.unwrap_or_else(|| Contact {
                    account: *other.as_bytes(),
                    name: String::new(),
                    devices: Vec::new(),
                    relays: Vec::new(),
                    capabilities: Vec::new(),
                    record_seq: 0,
                    conversations: Vec::new(),
                    added_ms: now,
                });
                for c in members.iter().filter(|c| c.account == other) {
                    let b = c.to_bytes();
                    if !contact.devices.contains(&b) {
                        contact.devices.push(b);
                    }
                }
                contact.conversations.push(gid.to_vec());
                contact.conversations.sort();
                self.store.put_contact(&contact)?;
                self.mend_dirty = true;
                self.store.put_conversation(&Conversation {
                    group_id: gid.to_vec(),
                    peer: *other.as_bytes(),
                    created_ms: now,
                    group: None,
                    superseded_by: None,
                })?;
                // Messages of ours that waited for a conversation with them go
                // out in it: the set-up task looks once this unit committed.
                self.conversation_joined = true;
                // Hand the other side what it needs to leave us mail.
                let mut group = group;
                let grant = match self.grant_envelope(&mut group, gid, now) {
                    Ok(g) => Some(g),
                    Err(NodeError::Store(e)) => return Err(Abort::Store(e)),
                    Err(e) => {
                        warn!("cannot seal our mailbox grant: {e}");
                        None
                    }
                };
                let devices = members.iter().map(|c| c.device_key).filter(|d| *d != self.my_device);
                for (device, grant) in devices.zip(std::iter::repeat(grant).flatten()) {
                    let oid = self.store.push_outbox(OutboxEntry {
                        id: 0,
                        device,
                        account: *other.as_bytes(),
                        envelope: grant.encode_to_vec(),
                        message_id: None,
                        created_ms: now,
                    })?;
                    self.deferred.push((*other.as_bytes(), device, oid, grant.clone()));
                }
                self.members.insert(gid.to_vec(), members);
                self.groups.insert(gid.to_vec(), group);
                // Our picture, if we have one (the name came with our card or record).
                match self.profile_for(*other.as_bytes(), now) {
                    Ok(sealed) => self.deferred.extend(sealed.into_entries()),
                    Err(NodeError::Store(e)) => return Err(Abort::Store(e)),
                    Err(e) => debug!("profile not sent to a new contact: {e}"),
                }
                events.push(NodeEvent::Contact(ContactView::from_contact(&contact)));
            }
            Ok(EnvelopeKind::Message) => {
                let Some(conv) = self.store.conversation(gid)? else {
                    return Ok(Apply::Status(DeliverStatus::UnknownConversation));
                };
                if conv.group.is_some() {
                    return self.apply_group_push(&conv, &id, env, now, events);
                }
                let group = match load_group(&mut self.groups, &self.provider, gid) {
                    Ok(Some(g)) => g,
                    Ok(None) => return Ok(Apply::Status(DeliverStatus::UnknownConversation)),
                    Err(e) => return Err(Abort::Store(StoreError::Corrupt(e.to_string()))),
                };
                match self.engine.process(&self.provider, group, &env.mls_message) {
                    Err(e) => return Ok(Apply::Invalid(e.to_string())),
                    Ok(Incoming::Application { sender, plaintext }) => {
                        let cert = match self.cert_for(&sender) {
                            Ok(c) => c,
                            Err(e) => return Ok(Apply::Invalid(format!("sender credential: {e}"))),
                        };
                        let payload = match Payload::decode(&plaintext) {
                            Ok(p) => p,
                            Err(e) => return Ok(Apply::Invalid(format!("payload: {e}"))),
                        };
                        let (text, reply_to, expires_secs) = match payload.body {
                            Body::Text {
                                text,
                                reply_to,
                                expires_secs,
                            } => (text, reply_to, expires_secs),
                            Body::Grant { capabilities, relays } => {
                                if cert.account != self.me {
                                    self.accept_grant(conv.peer, &cert, capabilities, relays, now, events)?;
                                }
                                self.store.mark_envelope_seen(&id, now)?;
                                return Ok(Apply::Status(DeliverStatus::Accepted));
                            }
                            Body::Retire { successor } => {
                                if successor.as_slice() != gid {
                                    debug!(
                                        conversation = %hex::encode(gid),
                                        successor = %hex::encode(successor),
                                        "a member replaced this conversation"
                                    );
                                    let mut conv = conv;
                                    conv.superseded_by = Some(successor.to_vec());
                                    self.mend_dirty = true;
                                    self.store.put_conversation(&conv)?;
                                }
                                self.store.mark_envelope_seen(&id, now)?;
                                return Ok(Apply::Status(DeliverStatus::Accepted));
                            }
                            body => {
                                self.apply_control(conv.peer, *cert.account.as_bytes(), body, now, events)?;
                                self.store.mark_envelope_seen(&id, now)?;
                                return Ok(Apply::Status(DeliverStatus::Accepted));
                            }
                        };
                        let mut msg = StoredMessage::new_text(
                            payload.id,
                            conv.peer,
                            *cert.account.as_bytes(),
                            payload.sender_seq,
                            // A sender's clock may not push its messages into the future.
                            payload.timestamp_ms.min(now + MAX_FUTURE_MS),
                            now,
                            cert.account == self.me,
                            text,
                            MessageState::Received,
                        );
                        msg.reply_to = reply_to;
                        msg.expires_ms = Self::expiry_for(expires_secs, now);
                        if msg.outgoing {
                            msg.state = MessageState::Delivered;
                        }
                        let inserted = self.store.insert_message(&msg)?;
                        if inserted && via_mailbox && !msg.outgoing {
                            self.mailbox_texts.entry(conv.peer).or_default().push(msg.id);
                        }
                        if inserted {
                            self.note_expiry(msg.expires_ms);
                            if !msg.outgoing {
                                self.touched.insert(msg.peer);
                            }
                            events.push(NodeEvent::Message(Box::new(self.view(&msg))));
                            self.unpark(&msg, now, events)?;
                        }
                    }
                    Ok(Incoming::Commit { epoch }) => {
                        debug!(epoch, "applied commit");
                        self.members.remove(gid);
                    }
                    Ok(Incoming::Proposal) => {}
                }
            }
            _ => return Ok(Apply::Invalid("unknown envelope kind".into())),
        }
        self.store.mark_envelope_seen(&id, now)?;
        Ok(Apply::Status(DeliverStatus::Accepted))
    }

    /// Delivery receipts for the texts this unit took from our mailbox (a
    /// direct delivery is acknowledged on the connection instead), into the
    /// unit's deferred sends.
    fn seal_delivery_receipts(&mut self, now: u64) -> Result<(), Abort> {
        for (contact, ids) in std::mem::take(&mut self.mailbox_texts) {
            for chunk in ids.chunks(tidings_protocol::payload::MAX_READ_IDS) {
                let body = Body::Delivered { ids: chunk.to_vec() };
                match self.seal(&ChatRef::Contact(contact), body, now) {
                    Ok(sealed) => self.deferred.extend(sealed.into_entries()),
                    Err(NodeError::Store(e)) => return Err(Abort::Store(e)),
                    Err(e) => debug!("no delivery receipt for mail from a contact: {e}"),
                }
            }
        }
        Ok(())
    }

    /// Outbox entries telling every other member of the one-to-one
    /// conversation `old` that `successor` replaces it; marks it replaced here.
    #[allow(clippy::type_complexity)]
    fn retire_entries(
        &mut self,
        old: &[u8],
        contact: [u8; 32],
        successor: [u8; 16],
        now: u64,
    ) -> Result<Vec<([u8; 32], [u8; 32], u64, pb::Envelope)>, NodeError> {
        let Some(mut conv) = self.store.conversation(old)? else {
            return Ok(Vec::new());
        };
        conv.superseded_by = Some(successor.to_vec());
        self.store.put_conversation(&conv)?;
        let payload = Payload {
            id: rand::random(),
            sender_seq: 0,
            timestamp_ms: now,
            body: Body::Retire { successor },
        };
        let Some(group) = load_group(&mut self.groups, &self.provider, old)? else {
            return Ok(Vec::new());
        };
        let env = new_envelope(
            old,
            EnvelopeKind::Message,
            self.engine.encrypt(&self.provider, group, &payload.encode())?,
        );
        let own = self.own_device_keys();
        let mut entries = Vec::new();
        for device in self.member_devices(old)? {
            let account = if own.contains(&device) {
                *self.me.as_bytes()
            } else {
                contact
            };
            entries.push(self.outbox_entry(account, device, &env, None, now)?);
        }
        Ok(entries)
    }

    /// Encrypts our mailbox grant as a control message in `group`.
    fn grant_envelope(&self, group: &mut MlsGroup, gid: &[u8], now: u64) -> Result<pb::Envelope, NodeError> {
        let payload = Payload {
            id: rand::random(),
            sender_seq: 0,
            timestamp_ms: now,
            body: Body::Grant {
                capabilities: self.grant.capabilities.clone(),
                relays: self.grant.relays.clone(),
            },
        };
        let ct = self.engine.encrypt(&self.provider, group, &payload.encode())?;
        Ok(pb::Envelope {
            id: rand::random::<[u8; 16]>().to_vec(),
            conversation_id: gid.to_vec(),
            kind: EnvelopeKind::Message as i32,
            mls_message: ct,
            ..Default::default()
        })
    }

    /// Takes a contact device's mailbox grant: the capabilities that its own
    /// device key issued for its own inbox replace the ones we held for that
    /// inbox, and its relays (if it names any) replace the ones we knew: a
    /// grant comes through the conversation, from the contact's own device,
    /// and the newest one tells where its mail goes now. Anything else is
    /// ignored.
    fn accept_grant(
        &mut self,
        account: [u8; 32],
        cert: &DeviceCertificate,
        capabilities: Vec<pb::Capability>,
        relays: Vec<String>,
        now: u64,
        events: &mut Vec<NodeEvent>,
    ) -> Result<(), StoreError> {
        if *cert.account.as_bytes() != account {
            return Ok(());
        }
        let Some(mut contact) = self.store.contact(&account)? else {
            return Ok(());
        };
        let inbox = mb::inbox_id(&cert.device_key);
        let valid: Vec<Vec<u8>> = capabilities
            .iter()
            .filter(|c| mb::verify_capability(c, &inbox, now).is_ok())
            .map(|c| c.encode_to_vec())
            .collect();
        if valid.is_empty() {
            return Ok(());
        }
        contact.capabilities.retain(|b| {
            pb::Capability::decode(b.as_slice())
                .ok()
                .and_then(|c| pb::CapabilityBody::decode(c.body.as_slice()).ok())
                .is_none_or(|body| body.inbox_id != inbox)
        });
        contact.capabilities.extend(valid);
        let relays: Vec<String> = relays
            .into_iter()
            .filter(|r| crate::net::parse_relay(r).is_some())
            .take(MAX_HOME_RELAYS)
            .collect();
        if !relays.is_empty() {
            contact.relays = relays;
        }
        self.store.put_contact(&contact)?;
        debug!(contact = %bs58::encode(account).into_string(), "mailbox grant taken");
        events.push(NodeEvent::Contact(ContactView::from_contact(&contact)));
        Ok(())
    }

    fn cert_for(&mut self, credential_identity: &[u8]) -> Result<DeviceCertificate, MlsError> {
        if let Some(c) = self.certs.get(credential_identity) {
            return Ok(c.clone());
        }
        let cert = DeviceCertificate::from_bytes(credential_identity)?;
        if self.certs.len() > 4096 {
            self.certs.clear();
        }
        self.certs.insert(credential_identity.to_vec(), cert.clone());
        Ok(cert)
    }

    // ------------------------------------------------------------- outbox

    fn next_due(&self) -> Option<Instant> {
        self.queues
            .values()
            .filter(|q| !q.in_flight && !q.entries.is_empty())
            .map(|q| q.next_try)
            .min()
    }

    /// Starts a delivery for every device queue that is due and idle.
    fn pump(&mut self) {
        let now = Instant::now();
        let due: Vec<[u8; 32]> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.in_flight && !q.entries.is_empty() && q.next_try <= now)
            .map(|(d, _)| *d)
            .collect();
        for device in due {
            if let Some((_, target)) = self.group_targets.get(&device).cloned() {
                self.pump_group(device, target);
                continue;
            }
            let Some(peer) = peer_id_of(&device) else { continue };
            let away = self.away.contains(peer);
            // Try to reach it again at most once per RECONNECT_EVERY.
            let reconnect = !self.reconnects.contains(peer);
            if reconnect {
                self.reconnects.insert(peer);
            }
            let target = self
                .queues
                .get(&device)
                .and_then(|q| self.mailbox_target(&q.account, &device));
            let Some(q) = self.queues.get_mut(&device) else {
                continue;
            };
            let mut ids = Vec::new();
            let mut envelopes = Vec::new();
            let mut bytes = 0usize;
            for (id, _, env) in q.entries.iter().take(MAX_ENVELOPES_PER_BATCH) {
                bytes += env.encoded_len() + 8;
                if bytes > MAX_DELIVER_FRAME / 2 && !envelopes.is_empty() {
                    break;
                }
                ids.push(*id);
                envelopes.push(env.clone());
            }
            q.in_flight = true;
            let net = self.net.clone();
            let tx = self.self_tx.clone();
            let now_ms = self.clock.now_ms();
            tokio::spawn(async move {
                let request = pb::DeliverRequest {
                    envelopes,
                    ..Default::default()
                };
                let mut direct_failed = false;
                let (result, Deposited { receipts, refusals }) = match target {
                    // Not connected (or known to be away), and the device has relays:
                    // its mail goes there at once (dialling a device that is away can
                    // take seconds), while a connection attempt runs in the background.
                    // Once connected, the next batches go direct.
                    // The attempt starts once the deposits are done, which leave
                    // connections to the relays for the circuits to use (a circuit
                    // whose relay is still being dialled waits in the network task
                    // for that connection: `net/circuits.rs`).
                    Some(target) if away || !net.is_connected(peer).await => {
                        let receipts = deposit_all(&net, &target, &request.envelopes, now_ms).await;
                        if reconnect {
                            reconnect_in_background(&net, &target, peer);
                        }
                        (Err(NetError::Unreachable("not connected".into())), receipts)
                    }
                    // Connected, with relays to fall back on: a connection that went
                    // silent must not hold the mail for a whole request timeout.
                    Some(target) => {
                        let result = tokio::time::timeout(DIRECT_PATIENCE, net.deliver(peer, request.clone()))
                            .await
                            .unwrap_or(Err(NetError::Timeout));
                        match result {
                            Ok(response) => (Ok(response), Deposited::default()),
                            Err(e) => {
                                direct_failed = true;
                                let deposited = deposit_all(&net, &target, &request.envelopes, now_ms).await;
                                if reconnect {
                                    reconnect_in_background(&net, &target, peer);
                                }
                                (Err(e), deposited)
                            }
                        }
                    }
                    // No relays: the device itself is the only way; look it up anew
                    // if its address went stale.
                    None => {
                        let mut result = net.deliver(peer, request.clone()).await;
                        if matches!(result, Err(NetError::Unreachable(_)))
                            && net.find_peer(peer).await.is_ok_and(|a| !a.is_empty())
                        {
                            result = net.deliver(peer, request.clone()).await;
                        }
                        (result, Deposited::default())
                    }
                };
                let _ = tx
                    .send(CoreInput::DeliverResult {
                        device,
                        ids,
                        result,
                        receipts,
                        refusals,
                        direct_failed,
                    })
                    .await;
            });
        }
    }

    /// Where a device's mail goes when the device is away: its account's relays,
    /// its inbox there, and the capability it gave us (if any).
    /// Queues `env` for `device` in the outbox, inside the caller's unit of
    /// work; returns the entry to hand to [`Core::enqueue`] once it commits.
    pub(crate) fn outbox_entry(
        &self,
        account: [u8; 32],
        device: [u8; 32],
        env: &pb::Envelope,
        message_id: Option<[u8; 16]>,
        now: u64,
    ) -> Result<([u8; 32], [u8; 32], u64, pb::Envelope), StoreError> {
        let oid = self.store.push_outbox(OutboxEntry {
            id: 0,
            device,
            account,
            envelope: env.encode_to_vec(),
            message_id,
            created_ms: now,
        })?;
        Ok((account, device, oid, env.clone()))
    }

    /// Deposits a batch of a group's outbox into the group inbox on one relay.
    fn pump_group(&mut self, device: [u8; 32], target: groups::GroupTarget) {
        let Some(q) = self.queues.get_mut(&device) else { return };
        let mut ids = Vec::new();
        let mut envelopes = Vec::new();
        for (id, _, env) in q.entries.iter().take(MAX_ENVELOPES_PER_BATCH) {
            ids.push(*id);
            envelopes.push(env.clone());
        }
        q.in_flight = true;
        let net = self.net.clone();
        let tx = self.self_tx.clone();
        let now_ms = self.clock.now_ms();
        tokio::spawn(async move {
            let t = MailboxTarget {
                relays: vec![target.relay],
                inbox: target.inbox,
                capability: Some(target.capability),
            };
            let Deposited { receipts, refusals } = deposit_all(&net, &t, &envelopes, now_ms).await;
            let _ = tx
                .send(CoreInput::DeliverResult {
                    device,
                    ids,
                    result: Err(NetError::Unreachable("group inbox".into())),
                    receipts,
                    refusals,
                    direct_failed: false,
                })
                .await;
        });
    }

    fn mailbox_target(&self, account: &[u8; 32], device: &[u8; 32]) -> Option<MailboxTarget> {
        let contact = self.store.contact(account).ok()??;
        let relays: Vec<(PeerId, Multiaddr)> = contact
            .relays
            .iter()
            .filter_map(|r| {
                let addr: Multiaddr = r.parse().ok()?;
                match addr.iter().last() {
                    Some(Protocol::P2p(p)) => Some((p, addr)),
                    _ => None,
                }
            })
            .collect();
        if relays.is_empty() {
            return None;
        }
        let inbox = mb::inbox_id(device);
        let now = self.clock.now_ms();
        let capability = contact
            .capabilities
            .iter()
            .filter_map(|c| pb::Capability::decode(c.as_slice()).ok())
            .find(|c| mb::verify_capability(c, &inbox, now).is_ok());
        Some(MailboxTarget {
            relays,
            inbox,
            capability,
        })
    }

    fn on_deliver_result(
        &mut self,
        device: [u8; 32],
        ids: Vec<u64>,
        result: Result<pb::DeliverResponse, NetError>,
        receipts: Vec<Vec<Vec<u8>>>,
        refusals: Vec<(PeerId, &'static str)>,
    ) {
        let Some(q) = self.queues.get_mut(&device) else { return };
        q.in_flight = false;
        let account = q.account;
        self.note_refusals(account, &receipts, refusals);
        let Some(q) = self.queues.get_mut(&device) else { return };
        let statuses: Vec<DeliverStatus> = match result {
            Ok(resp) if resp.statuses.len() == ids.len() => resp
                .statuses
                .iter()
                .map(|s| DeliverStatus::try_from(*s).unwrap_or(DeliverStatus::NotProcessed))
                .collect(),
            Ok(_) => {
                warn!("malformed delivery response; will retry");
                vec![DeliverStatus::NotProcessed; ids.len()]
            }
            Err(e) => {
                debug!("delivery failed: {e}; will retry");
                vec![DeliverStatus::NotProcessed; ids.len()]
            }
        };
        if statuses
            .iter()
            .any(|s| matches!(s, DeliverStatus::Accepted | DeliverStatus::Duplicate))
        {
            // The device itself takes our mail again: nothing is stuck behind refusals.
            self.refusals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(a, _), _| *a != account);
        }
        let mut done = Vec::new();
        let mut stored: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
        let mut retry = false;
        for (i, (id, s)) in ids.iter().zip(statuses).enumerate() {
            match s {
                DeliverStatus::Accepted | DeliverStatus::Duplicate => done.push(*id),
                DeliverStatus::Rejected => {
                    warn!(entry = id, "recipient rejected an envelope; dropping it");
                    done.push(*id);
                }
                _ => match receipts.get(i) {
                    // A relay signed for it: it leaves the outbox, the receipt stays.
                    Some(r) if !r.is_empty() => {
                        done.push(*id);
                        stored.insert(*id, r.clone());
                    }
                    _ => retry = true,
                },
            }
        }
        let done_set: HashSet<u64> = done.iter().copied().collect();
        let mut finished_messages = Vec::new();
        let mut receipt_rows: Vec<([u8; 16], Vec<Vec<u8>>)> = Vec::new();
        q.entries.retain(|(id, mid, env)| {
            if done_set.contains(id) {
                if let Some(r) = stored.remove(id) {
                    let key = mid.unwrap_or_else(|| env.id.as_slice().try_into().unwrap_or([0; 16]));
                    receipt_rows.push((key, r));
                }
                if let Some(m) = mid {
                    finished_messages.push(*m);
                }
                false
            } else {
                true
            }
        });
        for (key, _) in &receipt_rows {
            self.via_relay.insert(*key);
        }
        if retry {
            q.next_try = Instant::now() + q.backoff;
            q.backoff = (q.backoff * 2).min(MAX_BACKOFF);
        } else {
            q.backoff = MIN_BACKOFF;
            q.next_try = Instant::now();
        }
        if q.entries.is_empty() {
            self.queues.remove(&device);
        }
        let mut delivered = Vec::new();
        let mut relayed = Vec::new();
        for m in finished_messages {
            if let Some(n) = self.pending_per_message.get_mut(&m) {
                *n -= 1;
                if *n == 0 {
                    self.pending_per_message.remove(&m);
                    if self.via_relay.remove(&m) {
                        relayed.push(m);
                    } else {
                        delivered.push(m);
                    }
                }
            }
        }
        if done.is_empty() {
            return;
        }
        let store = self.store.clone();
        let r = store.unit(|| -> Result<(), StoreError> {
            store.remove_outbox(&done)?;
            for (key, receipts) in &receipt_rows {
                for bytes in receipts {
                    if let Ok(r) = pb::CustodyReceipt::decode(bytes.as_slice())
                        && let Ok(rc) = mb::verify_receipt(&r)
                    {
                        store.add_receipt(key, &rc.relay_key, bytes)?;
                    }
                }
            }
            for m in &delivered {
                store.set_message_state(m, MessageState::Delivered)?;
            }
            for m in &relayed {
                store.set_message_state(m, MessageState::Stored)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            // The entries stay on disk and are re-sent after a restart; the
            // receiver answers Duplicate.
            warn!("cannot remove acknowledged outbox entries: {e}");
        }
        for m in relayed.iter().chain(&delivered) {
            if let Ok(Some(row)) = self.store.message(m) {
                let _ = self.events.send(NodeEvent::MessageUpdated(Box::new(self.view(&row))));
            }
        }
        let contact = bs58::encode(account).into_string();
        for m in relayed {
            let _ = self.events.send(NodeEvent::Stored {
                id: hex::encode(m),
                contact: contact.clone(),
            });
        }
        for m in delivered {
            let _ = self.events.send(NodeEvent::Delivered {
                id: hex::encode(m),
                contact: contact.clone(),
            });
        }
    }
}

impl Core {
    /// Remembers relays' refusals to hold mail for `account` (and tells
    /// observers), and forgets those of relays that signed for it this time.
    fn note_refusals(&mut self, account: [u8; 32], receipts: &[Vec<Vec<u8>>], refusals: Vec<(PeerId, &'static str)>) {
        let signed: HashSet<[u8; 32]> = receipts
            .iter()
            .flatten()
            .filter_map(|b| pb::CustodyReceipt::decode(b.as_slice()).ok())
            .filter_map(|r| mb::verify_receipt(&r).ok())
            .map(|r| r.relay_key)
            .collect();
        let now = self.clock.now_ms();
        let contact = bs58::encode(account).into_string();
        let mut events = Vec::new();
        {
            let mut map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|(a, relay), _| !(*a == account && key_of_peer(relay).is_some_and(|k| signed.contains(&k))));
            for (relay, code) in refusals {
                if map.len() >= MAX_REFUSALS && !map.contains_key(&(account, relay)) {
                    continue;
                }
                let view = map.entry((account, relay)).or_insert_with(|| RefusalView {
                    contact: contact.clone(),
                    relay: relay.to_string(),
                    code: code.to_string(),
                    count: 0,
                    last_ms: now,
                });
                view.code = code.to_string();
                view.count += 1;
                view.last_ms = now;
                events.push(NodeEvent::DepositRefused(view.clone()));
            }
        }
        for e in events {
            let _ = self.events.send(e);
        }
    }
}

/// What a round of deposits on a device's relays brought back.
#[derive(Default)]
struct Deposited {
    /// Per envelope, the encoded custody receipts that verified.
    receipts: Vec<Vec<Vec<u8>>>,
    /// Relays that refused, with their reason.
    refusals: Vec<(PeerId, &'static str)>,
}

/// A send waiting for its unit: recipient account, text, reply, whether it
/// may wait for a conversation.
type PendingSend = (
    [u8; 32],
    String,
    Option<[u8; 16]>,
    bool,
    oneshot::Sender<Result<MessageView, NodeError>>,
);

/// An outbox row made inside a unit, to queue once it commits:
/// (account, device, outbox entry number, envelope).
type OutboxRow = ([u8; 32], [u8; 32], u64, pb::Envelope);

/// The state of a message just sealed into `entries`: pending until they are
/// acknowledged, delivered at once when no other device is to get it.
fn sent_state(entries: &[OutboxRow]) -> MessageState {
    if entries.is_empty() {
        MessageState::Delivered
    } else {
        MessageState::Pending
    }
}

/// Writes `contact` to `store`, merged with what it already holds of that
/// account: the conversations and the date it was added are kept, and the
/// newer device list (by record sequence number), name and capabilities win.
pub(crate) fn merge_contact(store: &Store, mut contact: Contact) -> Result<Contact, NodeError> {
    store.unit(|| -> Result<Contact, NodeError> {
        if let Some(old) = store.contact(&contact.account)? {
            contact.conversations = old.conversations;
            contact.added_ms = old.added_ms;
            if contact.name.is_empty() {
                contact.name = old.name;
            }
            if contact.record_seq < old.record_seq {
                contact.devices = old.devices;
                contact.relays = old.relays;
                contact.record_seq = old.record_seq;
            }
            if contact.capabilities.is_empty() {
                contact.capabilities = old.capabilities;
            }
        }
        store.put_contact(&contact)?;
        Ok(contact)
    })
}

/// Whether a contact has a device certificate valid at `now` (one that could
/// ever be reached).
pub(crate) fn has_valid_device(c: &Contact, now: u64) -> bool {
    c.devices.iter().any(|bytes| {
        DeviceCertificate::from_bytes(bytes).is_ok_and(|cert| {
            DeviceCertificate::verify(cert.wire(), now).is_ok() && peer_id_of(&cert.device_key).is_some()
        })
    })
}

/// One-time key packages plus a last-resort one, TLS-encoded.
pub(crate) type KeyPackages = (Vec<Vec<u8>>, Vec<u8>);

/// A device's mailboxes: its account's relays, its inbox id, our capability.
struct MailboxTarget {
    relays: Vec<(PeerId, Multiaddr)>,
    inbox: [u8; 32],
    capability: Option<pb::Capability>,
}

/// A new envelope of conversation `gid` carrying `mls_message`.
pub(crate) fn new_envelope(gid: &[u8], kind: EnvelopeKind, mls_message: Vec<u8>) -> pb::Envelope {
    pb::Envelope {
        id: rand::random::<[u8; 16]>().to_vec(),
        conversation_id: gid.to_vec(),
        kind: kind as i32,
        mls_message,
        ..Default::default()
    }
}

/// The Ed25519 key behind a PeerId (relays sign receipts with it).
pub(crate) fn key_of_peer(peer: &PeerId) -> Option<[u8; 32]> {
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(peer.as_ref().digest()).ok()?;
    Some(pk.try_into_ed25519().ok()?.to_bytes())
}

/// Tries to reach a device that is away: through its relays' circuits (see
/// [`reach_device`]).
fn reconnect_in_background(net: &Network, target: &MailboxTarget, peer: PeerId) {
    let net = net.clone();
    let circuits: Vec<Multiaddr> = target
        .relays
        .iter()
        .filter(|(relay, _)| *relay != peer)
        .map(|(_, addr)| addr.clone().with(Protocol::P2pCircuit).with(Protocol::P2p(peer)))
        .collect();
    tokio::spawn(async move { reach_device(&net, peer, circuits).await });
}

/// Dials a device through `circuits`, the ones its home relays offer, where a
/// device with home relays answers (behind a NAT, only there). Only a device
/// without relays is looked up in the DHT: one with relays is a DHT client,
/// which no routing table holds, so the lookup (some twenty requests, most on
/// fresh connections) could not find it.
pub(crate) async fn reach_device(net: &Network, peer: PeerId, circuits: Vec<Multiaddr>) {
    if !circuits.is_empty() {
        for c in circuits {
            let _ = net.dial(c).await;
        }
        return;
    }
    if let Ok(addrs) = net.find_peer(peer).await {
        for a in addrs {
            let _ = net.dial(a.with(Protocol::P2p(peer))).await;
        }
    }
}

/// Deposits every envelope in the device's inbox on every relay: in order on
/// each relay (the receiver must apply a sender's messages roughly in order,
/// within the ratchet's out-of-order tolerance), all relays at once. Returns,
/// per envelope, the encoded custody receipts that verified, and the relays
/// that refused.
async fn deposit_all(net: &Network, t: &MailboxTarget, envelopes: &[pb::Envelope], now_ms: u64) -> Deposited {
    let mut prepared = Vec::with_capacity(envelopes.len());
    for env in envelopes {
        let bytes = env.encode_to_vec();
        let hash = mb::envelope_hash(&bytes);
        let pow_nonce = if t.capability.is_none() {
            // First contact: no capability, so the request inbox and proof of work.
            let (inbox, b) = (t.inbox, bytes.clone());
            crate::sim::off_thread(move || mb::solve_pow(&inbox, &b, mb::DEFAULT_POW_BITS))
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        prepared.push((bytes, hash, pow_nonce));
    }
    let per_relay = t.relays.iter().map(|(peer, addr)| {
        let prepared = &prepared;
        async move {
            net.add_address(*peer, addr.clone()).await;
            let mut got: Vec<Option<Vec<u8>>> = vec![None; prepared.len()];
            let mut refused = None;
            let mut next = 0;
            // In order, up to MAX_DEPOSITS_PER_BATCH per request; a relay
            // stores a batch in one durable commit.
            'chunks: for chunk in prepared.chunks(mb::MAX_DEPOSITS_PER_BATCH) {
                let deposits: Vec<pb::Deposit> = chunk
                    .iter()
                    .map(|(bytes, _, pow_nonce)| pb::Deposit {
                        inbox_id: t.inbox.to_vec(),
                        request_inbox: t.capability.is_none(),
                        capability: t.capability.clone(),
                        pow_nonce: pow_nonce.clone(),
                        envelope: bytes.clone(),
                    })
                    .collect();
                let outcomes = match deposit_chunk(net, *peer, deposits).await {
                    Ok(o) => o,
                    Err(DepositFailure::Transport(e)) => {
                        // Later envelopes must not overtake these on this relay.
                        debug!(relay = %peer, "deposit failed: {e}");
                        break;
                    }
                    Err(DepositFailure::Refused(code)) => {
                        info!(relay = %peer, "deposit refused: {code}");
                        refused = Some((*peer, code));
                        break;
                    }
                };
                for ((_, hash, _), (status, receipt)) in chunk.iter().zip(outcomes) {
                    match receipt {
                        Some(r) if status == pb::MailboxStatus::Ok as i32 => match mb::verify_receipt(&r) {
                            Ok(rc)
                                if Some(rc.relay_key) == key_of_peer(peer)
                                    && rc.inbox_id == t.inbox
                                    && rc.envelope_hash == *hash
                                    && rc.keep_until_ms > now_ms =>
                            {
                                got[next] = Some(r.encode_to_vec());
                                next += 1;
                            }
                            _ => {
                                warn!(relay = %peer, "relay returned an invalid custody receipt");
                                break 'chunks;
                            }
                        },
                        _ => {
                            let code = status_code(status);
                            info!(relay = %peer, "deposit refused: {code}");
                            refused = Some((*peer, code));
                            break 'chunks;
                        }
                    }
                }
            }
            (got, refused)
        }
    });
    let results = futures::future::join_all(per_relay).await;
    let mut receipts = vec![Vec::new(); envelopes.len()];
    let mut refusals = Vec::new();
    for (got, refused) in results {
        refusals.extend(refused);
        for (i, r) in got.into_iter().enumerate() {
            if let Some(r) = r {
                receipts[i].push(r);
            }
        }
    }
    // A receipt counts only if every earlier envelope also has one, so that a
    // later envelope never leaves the outbox ahead of an earlier one.
    if let Some(first_missing) = receipts.iter().position(|r| r.is_empty()) {
        for r in receipts.iter_mut().skip(first_missing) {
            r.clear();
        }
    }
    Deposited { receipts, refusals }
}

enum DepositFailure {
    Transport(NetError),
    Refused(&'static str),
}

fn status_code(status: i32) -> &'static str {
    pb::MailboxStatus::try_from(status)
        .ok()
        .and_then(mb::MailboxError::from_status)
        .map_or("unknown", |e| e.code())
}

/// Sends one chunk of deposits to a relay: a plain `Deposit` for one, a
/// `DepositBatch` for more. Returns (status, receipt) per deposit, in order.
async fn deposit_chunk(
    net: &Network,
    relay: PeerId,
    mut deposits: Vec<pb::Deposit>,
) -> Result<Vec<(i32, Option<pb::CustodyReceipt>)>, DepositFailure> {
    let n = deposits.len();
    let op = if n == 1 {
        pb::mailbox_request::Op::Deposit(deposits.remove(0))
    } else {
        pb::mailbox_request::Op::DepositBatch(pb::DepositBatch { deposits })
    };
    let resp = net
        .mailbox(relay, pb::MailboxRequest { op: Some(op) })
        .await
        .map_err(DepositFailure::Transport)?;
    match resp.result {
        Some(pb::mailbox_response::Result::Receipt(r)) if n == 1 => Ok(vec![(resp.status, Some(r))]),
        Some(pb::mailbox_response::Result::DepositResults(rs))
            if n > 1 && resp.status == pb::MailboxStatus::Ok as i32 && rs.results.len() == n =>
        {
            Ok(rs.results.into_iter().map(|r| (r.status, r.receipt)).collect())
        }
        _ if resp.status != pb::MailboxStatus::Ok as i32 => Err(DepositFailure::Refused(status_code(resp.status))),
        _ => Err(DepositFailure::Refused("bad_response")),
    }
}

/// How far ahead of our clock a sender's timestamp may be.
const MAX_FUTURE_MS: u64 = 5 * 60 * 1000;

fn statuses(s: Vec<DeliverStatus>) -> pb::DeliverResponse {
    pb::DeliverResponse {
        statuses: s.into_iter().map(|s| s as i32).collect(),
    }
}

pub(crate) async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
