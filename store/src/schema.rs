//! Every table of the node's database, in one place, and the schema version.
//!
//! Keys use redb's built-in encodings (fixed-width integers are little-endian
//! inside redb; tuples compare element by element). Values are either raw bytes
//! (MLS state, wire envelopes) or serde_json documents (rows of our own).

use redb::TableDefinition;

/// Bumped whenever a table's key or value encoding changes. `Store::open`
/// refuses a database written under another version unless a migration exists.
pub const SCHEMA_VERSION: u32 = 2;
/// Versions `Store::open` migrates from (version 1 lacks the chat, search,
/// expiry, picture and token tables; its rows read unchanged).
pub const MIGRATES_FROM: [u32; 1] = [1];

/// Small named values: schema version, identity, counters.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// openmls storage provider entries: label ‖ json(key) ‖ version → json(value).
pub const MLS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mls");
/// Contacts by account key → json `Contact`.
pub const CONTACTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("contacts");
/// Conversations by MLS group id → json `Conversation`.
pub const CONVERSATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("conversations");
/// Position of a history row: (peer account, display timestamp, sender account,
/// sender seq << 16 | the message id's first two bytes). Rows sort by chat, then
/// time, with a stable tie-break on sender, sequence and id, the same on every
/// device (devices of one account number their messages independently).
pub type MessageKey<'a> = (&'a [u8; 32], u64, &'a [u8; 32], u64);
/// Chat history: `MessageKey` → json `StoredMessage`.
pub const MESSAGES: TableDefinition<MessageKey, &[u8]> = TableDefinition::new("messages");
/// Message id → `MessageKey`: dedup and lookup.
pub const MESSAGE_IDS: TableDefinition<&[u8; 16], MessageKey> = TableDefinition::new("message_ids");
/// Outgoing messages in state `Waiting` (no conversation with the peer yet):
/// (peer account, sender seq) → message id. Kept by `Store` in step with
/// the rows' states: a row leaves when its message leaves `Waiting`.
pub const WAITING: TableDefinition<(&[u8; 32], u64), &[u8; 16]> = TableDefinition::new("waiting_messages");
/// Outbox: entry number → json `OutboxEntry`. Kept until the recipient acks.
pub const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Envelope ids that were durably applied → time applied (ms). Transport dedup.
pub const SEEN_ENVELOPES: TableDefinition<&[u8; 16], u64> = TableDefinition::new("seen_envelopes");
/// Custody receipts relays signed for our envelopes: (message or envelope id, relay key) → receipt.
pub const RECEIPTS: TableDefinition<(&[u8; 16], &[u8; 32]), &[u8]> = TableDefinition::new("receipts");
/// Per relay inbox of ours: (relay key, is the request inbox) → highest mailbox
/// index applied. Advanced in the same commit as the messages it covers.
pub const MAIL_CURSORS: TableDefinition<(&[u8; 32], bool), u64> = TableDefinition::new("mail_cursors");
/// Mailbox indices a relay never handed us: (relay key, is the request inbox,
/// first missing index) → (last missing index, detected ms). Indices are dense
/// per inbox, so a jump past the cursor is mail the relay dropped (or expired).
pub const MAIL_GAPS: TableDefinition<(&[u8; 32], bool, u64), (u64, u64)> = TableDefinition::new("mail_gaps");
/// Our group application messages not yet seen in their group's sequence:
/// envelope id → json `GroupSent`. Lets a message that a commit overtook be
/// encrypted again for devices that joined in between.
pub const GROUP_SENT: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("group_sent");
/// Per chat (one-to-one: the contact's account; group: its chat key) → json
/// `ChatRow`: pinned, muted, disappearing timer, unread count, last activity.
pub const CHATS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("chats");
/// A group's chat key → its MLS group id (kept by `put_conversation`).
pub const GROUP_CHATS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("group_chats");
/// Search index: (lower-case word of a message's text, message id) → ().
/// A message's words are added with it and removed when it is edited,
/// deleted for everyone or expires.
pub const WORDS: TableDefinition<(&str, &[u8; 16]), ()> = TableDefinition::new("words");
/// Incoming messages not read yet, by their `MessageKey` (so a chat's unread
/// ones up to a point are one range, whatever order they arrived in).
pub const UNREAD: TableDefinition<MessageKey, ()> = TableDefinition::new("unread");
/// Disappearing messages: (expires ms, message id) → (). Sorted by time.
pub const EXPIRY: TableDefinition<(u64, &[u8; 16]), ()> = TableDefinition::new("expiry");
/// Profile pictures of contacts: account → picture type ‖ 0 ‖ picture bytes.
pub const PICTURES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("pictures");
/// Scoped API tokens: SHA-256 of the token (hex) → json `ApiToken`.
pub const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Records learned from or published to the DHT: DHT key → signed record bytes.
pub const DHT_RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dht_records");

// ------------------------------------------------------------------------
// Relay mailboxes (`mailbox::Mailboxes`), kept in a database file of their own
// (`mailboxes.redb`), with a schema version of their own. None of these tables
// exist in the node database.
// ------------------------------------------------------------------------

/// Bumped whenever a mailbox table's key or value encoding changes.
/// `Mailboxes::open` refuses a mailbox database written under another version.
pub const MAILBOX_SCHEMA_VERSION: u32 = 1;

/// An inbox: (inbox id, is the request inbox).
pub type InboxKey<'a> = (&'a [u8; 32], bool);
/// One stored envelope: (inbox id, is the request inbox, index). Indices start
/// at 1 and only grow within an inbox.
pub type EnvelopeKey<'a> = (&'a [u8; 32], bool, u64);
/// A sender's share of an inbox: (inbox id, is the request inbox, sender peer key).
pub type SenderKey<'a> = (&'a [u8; 32], bool, &'a [u8; 32]);
/// An expiry index entry: (keep-until ms, inbox id, is the request inbox, index).
pub type ExpiryKey<'a> = (u64, &'a [u8; 32], bool, u64);
/// Envelope metadata: (sender peer key, deposited ms, keep-until ms, length in bytes).
pub type EnvelopeMeta = ([u8; 32], u64, u64, u64);

/// Small named values of the mailbox database: `mailbox_schema_version` (u32 BE)
/// and the global counters `inboxes`, `envelopes`, `bytes` (u64 BE).
pub const MAILBOX_META: TableDefinition<&str, &[u8]> = TableDefinition::new("mailbox_meta");
/// Per-inbox counters: `InboxKey` → (next index, envelopes held, bytes held).
/// The row outlives the inbox's envelopes so that indices are never reused.
pub const MAILBOX_INBOXES: TableDefinition<InboxKey, (u64, u64, u64)> = TableDefinition::new("mailbox_inboxes");
/// Per-sender counters within an inbox: `SenderKey` → (envelopes held, bytes held).
/// Removed when the sender holds nothing.
pub const MAILBOX_SENDERS: TableDefinition<SenderKey, (u64, u64)> = TableDefinition::new("mailbox_senders");
/// Envelope bytes: `EnvelopeKey` → the envelope as deposited.
pub const MAILBOX_ENVELOPES: TableDefinition<EnvelopeKey, &[u8]> = TableDefinition::new("mailbox_envelopes");
/// Envelope metadata: `EnvelopeKey` → `EnvelopeMeta`. Lets ack, sweep and fetch's
/// expiry filter work without reading envelope bytes.
pub const MAILBOX_ENVELOPE_META: TableDefinition<EnvelopeKey, EnvelopeMeta> =
    TableDefinition::new("mailbox_envelope_meta");
/// Expiry index: `ExpiryKey` → (). Sorted by time, so a sweep is a range scan
/// from the start.
pub const MAILBOX_EXPIRY: TableDefinition<ExpiryKey, ()> = TableDefinition::new("mailbox_expiry");
/// Owner-auth nonces seen: nonce → expires ms.
pub const MAILBOX_NONCES: TableDefinition<&[u8; 16], u64> = TableDefinition::new("mailbox_nonces");
/// Nonce expiry index: (expires ms, nonce) → (), for bounded purges.
pub const MAILBOX_NONCE_EXPIRY: TableDefinition<(u64, &[u8; 16]), ()> = TableDefinition::new("mailbox_nonce_expiry");
/// Key-package pools: owner → (next sequence number, one-time packages held).
pub const MAILBOX_KP_POOLS: TableDefinition<&[u8; 32], (u64, u64)> = TableDefinition::new("mailbox_kp_pools");
/// One-time key packages: (owner, sequence number) → package bytes. Oldest first.
pub const MAILBOX_KEY_PACKAGES: TableDefinition<(&[u8; 32], u64), &[u8]> = TableDefinition::new("mailbox_key_packages");
/// Last-resort key package per owner: owner → package bytes. Never consumed.
pub const MAILBOX_KP_LAST_RESORT: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("mailbox_kp_last_resort");
