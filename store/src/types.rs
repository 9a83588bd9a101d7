//! Rows of our own tables.

use serde::{Deserialize, Serialize};

/// This device's identity and secrets.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    pub account_seed: [u8; 32],
    pub device_seed: [u8; 32],
    pub mls_seed: [u8; 32],
    /// Encoded device certificate.
    pub device_cert: Vec<u8>,
    pub name: String,
    pub created_ms: u64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Someone we talk to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Contact {
    pub account: [u8; 32],
    pub name: String,
    /// Encoded device certificates we know of (from the card or the DHT).
    pub devices: Vec<Vec<u8>>,
    pub relays: Vec<String>,
    /// Encoded deposit capabilities (`pb::Capability`) for their devices' inboxes.
    #[serde(default)]
    pub capabilities: Vec<Vec<u8>>,
    /// Highest user-record sequence number seen.
    pub record_seq: u64,
    /// MLS group ids of conversations with this contact, oldest first.
    /// The smallest id is the one we send in (see PROTOCOL.md).
    pub conversations: Vec<Vec<u8>>,
    pub added_ms: u64,
}

impl Contact {
    /// The account key in its base58 text form.
    pub fn account_text(&self) -> String {
        bs58_encode(&self.account)
    }
}

fn bs58_encode(bytes: &[u8]) -> String {
    tidings_protocol::AccountId::from_bytes(bytes)
        .map(|a| a.to_base58())
        .unwrap_or_default()
}

/// An MLS group and who it is with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conversation {
    pub group_id: Vec<u8>,
    /// The other person's account (one-to-one conversations), or the group's
    /// chat key (`group::group_chat_key`) under which its history is kept.
    pub peer: [u8; 32],
    pub created_ms: u64,
    /// Set for group chats.
    #[serde(default)]
    pub group: Option<GroupRow>,
    /// One-to-one conversations: the conversation that replaced this one (a
    /// member sent `Retire`). Once that one is here, nothing is sent in this
    /// one any more; what arrives in it is still read.
    #[serde(default)]
    pub superseded_by: Option<Vec<u8>>,
}

/// A group chat's local state besides its MLS state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupRow {
    /// Highest index of the group's sequencing inbox applied (in the same
    /// commit as what it carried).
    pub cursor: u64,
    /// The inbox seed the cursor belongs to; a new seed starts at index 0.
    pub cursor_seed: [u8; 32],
    /// Our commit waiting for its epoch, if any.
    pub pending: Option<PendingCommit>,
    /// An intent whose commit lost its epoch, to re-apply.
    pub retry: Option<IntentRow>,
    /// This device was removed (or left).
    pub left: bool,
    /// When a commit of ours last won (or we joined): the leaf keys' age.
    #[serde(default)]
    pub updated_ms: u64,
    /// We asked to leave: the epoch our leaving proposals were made in
    /// (proposed again if an epoch passes without them).
    #[serde(default)]
    pub leaving: Option<u64>,
    /// Since when others' leaving proposals wait for a commit (any member
    /// commits them once they waited long enough).
    #[serde(default)]
    pub proposals_since_ms: Option<u64>,
}

/// A commit of ours sent to the sequencer and not yet decided.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingCommit {
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    pub epoch: u64,
    pub intent: IntentRow,
    /// When the commit was last handed to the sequencer.
    #[serde(default)]
    pub sent_ms: u64,
}

/// A group change, kept so that it can be re-applied when another commit wins.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum IntentRow {
    Add {
        key_packages: Vec<Vec<u8>>,
    },
    Remove {
        devices: Vec<[u8; 32]>,
    },
    SetMeta {
        meta: Vec<u8>,
    },
    SelfUpdate,
    /// Commit the leaving proposals of others.
    CommitProposals,
}

/// Delivery state of a message, in increasing order.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// Ours, kept until a conversation with the contact exists (none could be
    /// set up yet: no device or relay of theirs answered); not encrypted yet,
    /// nothing in the outbox. Sent, in order, once the conversation exists.
    Waiting,
    /// Committed to our outbox, not yet acknowledged.
    Pending,
    /// A relay signed a custody receipt for it; the device has not acknowledged it yet.
    Stored,
    /// Acknowledged by every recipient device after its durable commit.
    Delivered,
    /// Every other member account sent a read receipt for it.
    Read,
    /// Received from someone else.
    Received,
}

/// One row of chat history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: [u8; 16],
    /// The conversation's other person (the chat this row belongs to).
    pub peer: [u8; 32],
    /// Who wrote it (our own account for outgoing messages).
    pub sender: [u8; 32],
    pub sender_seq: u64,
    pub timestamp_ms: u64,
    pub received_ms: u64,
    pub outgoing: bool,
    pub text: String,
    pub state: MessageState,
    /// The message this one quotes.
    #[serde(default)]
    pub reply_to: Option<[u8; 16]>,
    /// One reaction per account: (account, emoji).
    #[serde(default)]
    pub reactions: Vec<([u8; 32], String)>,
    /// When the sender last edited it (our clock).
    #[serde(default)]
    pub edited_ms: Option<u64>,
    /// Deleted for everyone by its sender: the text is empty.
    #[serde(default)]
    pub deleted: bool,
    /// When it disappears (our clock), if the chat had a timer.
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// Incoming: we read it.
    #[serde(default)]
    pub read: bool,
    /// Outgoing: the accounts that sent a read receipt for it.
    #[serde(default)]
    pub read_by: Vec<[u8; 32]>,
}

impl StoredMessage {
    /// A new text row with every later-added field at its default.
    #[allow(clippy::too_many_arguments)]
    pub fn new_text(
        id: [u8; 16],
        peer: [u8; 32],
        sender: [u8; 32],
        sender_seq: u64,
        timestamp_ms: u64,
        received_ms: u64,
        outgoing: bool,
        text: String,
        state: MessageState,
    ) -> Self {
        Self {
            id,
            peer,
            sender,
            sender_seq,
            timestamp_ms,
            received_ms,
            outgoing,
            text,
            state,
            reply_to: None,
            reactions: Vec::new(),
            edited_ms: None,
            deleted: false,
            expires_ms: None,
            read: false,
            read_by: Vec::new(),
        }
    }
}

/// A chat's local settings and counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatRow {
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub muted: bool,
    /// Disappearing-messages timer (0: off), as the members last set it.
    #[serde(default)]
    pub disappearing_secs: u64,
    /// Incoming messages not read yet.
    #[serde(default)]
    pub unread: u64,
    /// Time of the newest message (or of the chat's creation).
    #[serde(default)]
    pub last_activity_ms: u64,
}

/// Settings of this account kept on this device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Settings {
    /// Send read receipts.
    #[serde(default = "yes")]
    pub read_receipts: bool,
    /// Share presence with contacts (and see theirs).
    #[serde(default)]
    pub presence: bool,
    /// Our profile picture: (type, bytes).
    #[serde(default)]
    pub picture: Option<(String, Vec<u8>)>,
    /// Home relays as last chosen (`None`: never chosen, the command line decides).
    #[serde(default)]
    pub home_relays: Option<Vec<String>>,
    /// Relays given up, with the time (ms) until which they are still drained
    /// for mail that contacts left there before they heard of the change.
    #[serde(default)]
    pub retired_relays: Vec<(String, u64)>,
}

fn yes() -> bool {
    true
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            read_receipts: true,
            presence: false,
            picture: None,
            home_relays: None,
            retired_relays: Vec::new(),
        }
    }
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    /// Every read (GET) and the event streams.
    Read,
    /// Sending messages only.
    Send,
    /// Everything.
    Full,
}

/// A scoped API token (only its hash is stored).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    pub scope: TokenScope,
    pub created_ms: u64,
}

/// One envelope waiting for a recipient device's ack.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Assigned by `Store::push_outbox`.
    pub id: u64,
    /// The recipient device's Ed25519 public key (its libp2p identity).
    pub device: [u8; 32],
    /// The recipient's account.
    pub account: [u8; 32],
    /// Encoded `pb::Envelope`.
    pub envelope: Vec<u8>,
    /// The message this envelope carries, if it is a chat message.
    pub message_id: Option<[u8; 16]>,
    pub created_ms: u64,
}

/// Mailbox indices a relay skipped when handing us our mail: envelopes it
/// accepted (and signed receipts for) but never delivered, unless they
/// expired after the relay's retention while we were away.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct MailGap {
    pub relay: [u8; 32],
    pub request_inbox: bool,
    pub from: u64,
    pub to: u64,
    pub detected_ms: u64,
}

/// One of our group messages waiting to be seen in the group's sequence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupSent {
    pub group_id: Vec<u8>,
    /// The encoded application payload (same message id when sent again).
    pub payload: Vec<u8>,
    pub message_id: [u8; 16],
}
