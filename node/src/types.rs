//! Views of node state shared by the API, the CLI and tests.

use serde::{Deserialize, Serialize};
use tidings_protocol::AccountId;
use tidings_store::{Contact, MailGap, MessageState, Store, StoredMessage};

use crate::core::NodeError;

/// A contact as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ContactView {
    pub account: String,
    pub name: String,
    pub devices: usize,
    pub conversations: usize,
    /// The relays where their mail waits while they are away.
    pub relays: Vec<String>,
}

impl ContactView {
    pub fn from_contact(c: &Contact) -> Self {
        Self {
            account: bs58::encode(c.account).into_string(),
            name: c.name.clone(),
            devices: c.devices.len(),
            conversations: c.conversations.len(),
            relays: c.relays.clone(),
        }
    }
}

/// A chat: one-to-one with a contact, or a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChatRef {
    Contact([u8; 32]),
    Group(Vec<u8>),
}

impl ChatRef {
    /// Parses `c:<account, base58>` or `g:<group id, hex>`.
    pub fn parse(s: &str) -> Result<Self, NodeError> {
        let bad = || NodeError::InvalidInput(format!("not a chat id (c:<account> or g:<group>): {s:.80}"));
        if let Some(a) = s.strip_prefix("c:") {
            let account = AccountId::from_base58(a).map_err(|_| bad())?;
            Ok(ChatRef::Contact(*account.as_bytes()))
        } else if let Some(g) = s.strip_prefix("g:") {
            let gid = hex::decode(g).map_err(|_| bad())?;
            if gid.is_empty() || gid.len() > 64 {
                return Err(bad());
            }
            Ok(ChatRef::Group(gid))
        } else {
            Err(bad())
        }
    }

    /// The key its history and settings are kept under.
    pub fn key(&self) -> [u8; 32] {
        match self {
            ChatRef::Contact(a) => *a,
            ChatRef::Group(g) => tidings_protocol::group::group_chat_key(g),
        }
    }

    pub fn id(&self) -> String {
        match self {
            ChatRef::Contact(a) => format!("c:{}", bs58::encode(a).into_string()),
            ChatRef::Group(g) => format!("g:{}", hex::encode(g)),
        }
    }

    /// The chat a history key belongs to.
    pub fn of_key(store: &Store, key: &[u8; 32]) -> Self {
        match store.group_of_chat(key) {
            Ok(Some(gid)) => ChatRef::Group(gid),
            _ => ChatRef::Contact(*key),
        }
    }
}

/// The message a reply quotes (its text cut to 200 characters).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct QuoteView {
    pub id: String,
    pub sender: String,
    pub text: String,
}

/// One emoji and the accounts that reacted with it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ReactionView {
    pub emoji: String,
    pub accounts: Vec<String>,
}

/// A history row as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct MessageView {
    pub id: String,
    /// `c:<account>` or `g:<group>`.
    #[serde(default)]
    pub chat: String,
    /// The chat's other person (or the group's chat key).
    pub contact: String,
    pub sender: String,
    #[serde(default)]
    pub sender_name: String,
    pub outgoing: bool,
    /// Plain text: shown as text, never as markup.
    pub text: String,
    pub sender_seq: u64,
    pub timestamp_ms: u64,
    pub received_ms: u64,
    #[schema(value_type = String)]
    pub state: MessageState,
    #[serde(default)]
    pub reply_to: Option<QuoteView>,
    #[serde(default)]
    pub reactions: Vec<ReactionView>,
    #[serde(default)]
    pub edited_ms: Option<u64>,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default)]
    pub expires_ms: Option<u64>,
}

/// First `n` characters of `s`.
fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl MessageView {
    /// The row alone: the chat is taken to be one-to-one, names and the quoted
    /// text are left out (see [`MessageView::of`]).
    pub fn from_stored(m: &StoredMessage) -> Self {
        let mut reactions: Vec<ReactionView> = Vec::new();
        for (account, emoji) in &m.reactions {
            let account = bs58::encode(account).into_string();
            match reactions.iter_mut().find(|r| r.emoji == *emoji) {
                Some(r) => r.accounts.push(account),
                None => reactions.push(ReactionView {
                    emoji: emoji.clone(),
                    accounts: vec![account],
                }),
            }
        }
        Self {
            id: hex::encode(m.id),
            chat: ChatRef::Contact(m.peer).id(),
            contact: bs58::encode(m.peer).into_string(),
            sender: bs58::encode(m.sender).into_string(),
            sender_name: String::new(),
            outgoing: m.outgoing,
            text: m.text.clone(),
            sender_seq: m.sender_seq,
            timestamp_ms: m.timestamp_ms,
            received_ms: m.received_ms,
            state: m.state,
            reply_to: m.reply_to.map(|id| QuoteView {
                id: hex::encode(id),
                sender: String::new(),
                text: String::new(),
            }),
            reactions,
            edited_ms: m.edited_ms,
            deleted: m.deleted,
            expires_ms: m.expires_ms,
        }
    }

    /// The row with its chat, the sender's name and the quoted message.
    pub fn of(store: &Store, m: &StoredMessage) -> Self {
        let mut v = Self::from_stored(m);
        v.chat = ChatRef::of_key(store, &m.peer).id();
        v.sender_name = if m.outgoing {
            store.identity().map(|i| i.name).unwrap_or_default()
        } else {
            store
                .contact(&m.sender)
                .ok()
                .flatten()
                .map(|c| c.name)
                .unwrap_or_default()
        };
        if let Some(q) = m.reply_to
            && let Ok(Some(quoted)) = store.message(&q)
            && let Some(r) = v.reply_to.as_mut()
        {
            r.sender = bs58::encode(quoted.sender).into_string();
            r.text = if quoted.deleted {
                String::new()
            } else {
                cut(&quoted.text, 200)
            };
        }
        v
    }
}

/// A chat as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ChatView {
    /// `c:<account>` or `g:<group>`.
    pub id: String,
    /// `contact` or `group`.
    pub kind: String,
    pub name: String,
    pub last_message: Option<MessageView>,
    pub unread: u64,
    pub pinned: bool,
    pub muted: bool,
    /// Disappearing-messages timer in seconds (0: off).
    pub disappearing_secs: u64,
    /// Accounts in the chat besides ours (1 for a one-to-one chat).
    pub members: u64,
    /// A group we left or were removed from.
    #[serde(default)]
    pub left: bool,
    pub last_activity_ms: u64,
}

/// Whether a contact who shares presence is online.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PresenceView {
    pub account: String,
    pub online: bool,
    pub last_seen_ms: Option<u64>,
}

/// What the node tells its observers (API event stream, tests, the demo).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeEvent {
    /// A message was committed: from someone else, or one of ours (sent from
    /// this device or another of ours).
    Message(Box<MessageView>),
    /// A message changed: state (delivered, read), edit, delete, reaction.
    MessageUpdated(Box<MessageView>),
    /// A disappearing message was removed.
    MessageRemoved { chat: String, id: String },
    /// Someone is typing in a chat (ephemeral; show it for a few seconds).
    Typing { chat: String, account: String },
    /// A chat's settings or unread count changed.
    Chat(Box<ChatView>),
    /// A contact who shares presence came online, was seen, or went offline.
    Presence(PresenceView),
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
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
