//! Views of node state shared by the API, the CLI and tests.

use serde::{Deserialize, Serialize};
use tidings_protocol::AccountId;
use tidings_store::{Contact, MailGap, MessageState, StoredMessage};

/// A contact as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContactView {
    pub account: String,
    pub name: String,
    pub devices: usize,
    pub conversations: usize,
}

impl ContactView {
    pub fn from_contact(c: &Contact) -> Self {
        Self {
            account: bs58::encode(c.account).into_string(),
            name: c.name.clone(),
            devices: c.devices.len(),
            conversations: c.conversations.len(),
        }
    }
}

/// A history row as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageView {
    pub id: String,
    /// The chat's other person.
    pub contact: String,
    pub sender: String,
    pub outgoing: bool,
    pub text: String,
    pub sender_seq: u64,
    pub timestamp_ms: u64,
    pub received_ms: u64,
    pub state: MessageState,
}

impl MessageView {
    pub fn from_stored(m: &StoredMessage) -> Self {
        Self {
            id: hex::encode(m.id),
            contact: bs58::encode(m.peer).into_string(),
            sender: bs58::encode(m.sender).into_string(),
            outgoing: m.outgoing,
            text: m.text.clone(),
            sender_seq: m.sender_seq,
            timestamp_ms: m.timestamp_ms,
            received_ms: m.received_ms,
            state: m.state,
        }
    }
}

/// What the node tells its observers (API event stream, tests, the demo).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeEvent {
    /// A message from someone else was decrypted and committed.
    Message(MessageView),
    /// Every recipient device acknowledged one of our messages after its durable commit.
    Delivered { id: String, contact: String },
    /// One of our messages left the outbox with a relay's custody receipt (the device was away).
    Stored { id: String, contact: String },
    /// A contact was added or changed.
    Contact(ContactView),
    /// One of our relays skipped mailbox indices: it accepted mail for us
    /// (and signed receipts for it) that it never delivered.
    MailMissing(MailGapView),
    /// A relay refused to hold our mail for a contact; the mail stays in the
    /// outbox (other relays or a direct delivery may still take it).
    DepositRefused(RefusalView),
}

/// A relay's latest refusal to hold our mail for one contact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusalView {
    pub contact: String,
    /// The relay's peer id.
    pub relay: String,
    /// The relay's error code: `quota_exceeded`, `too_large`, `unauthorized`, ...
    pub code: String,
    /// Refusals since this relay last signed for this contact's mail.
    pub count: u64,
    pub last_ms: u64,
}

/// Mailbox indices a relay skipped, as the API shows them. The senders hold
/// the relay's signed receipts naming these indices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MailGapView {
    /// The relay's peer id.
    pub relay: String,
    pub request_inbox: bool,
    /// First and last missing index (inclusive).
    pub from: u64,
    pub to: u64,
    pub detected_ms: u64,
}

impl MailGapView {
    pub fn from_gap(g: &MailGap) -> Self {
        let relay = libp2p::identity::ed25519::PublicKey::try_from_bytes(&g.relay)
            .map(|k| libp2p::PeerId::from_public_key(&k.into()).to_string())
            .unwrap_or_else(|_| hex::encode(g.relay));
        Self {
            relay,
            request_inbox: g.request_inbox,
            from: g.from,
            to: g.to,
            detected_ms: g.detected_ms,
        }
    }
}

/// `tidings status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub account: String,
    pub name: String,
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub connected_peers: usize,
    pub dht_peers: usize,
    /// Relayed connections upgraded to direct ones by hole punching.
    pub hole_punches: u64,
    pub outbox: u64,
    /// Mail our relays accepted but never handed over (see [`MailGapView`]).
    #[serde(default)]
    pub mail_missing: Vec<MailGapView>,
    /// This device's home relays (its mailboxes). Fewer than two leaves its
    /// mail with a single operator.
    #[serde(default)]
    pub home_relays: Vec<String>,
    /// Relays currently refusing to hold our mail for a contact.
    #[serde(default)]
    pub deposit_refusals: Vec<RefusalView>,
}

pub fn account_text(a: &AccountId) -> String {
    a.to_base58()
}
