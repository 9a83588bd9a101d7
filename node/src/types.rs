//! Views of node state shared by the API, the CLI and tests.

use serde::{Deserialize, Serialize};
use tidings_protocol::AccountId;
use tidings_store::{Contact, MessageState, StoredMessage};

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
}

pub fn account_text(a: &AccountId) -> String {
    a.to_base58()
}
