//! Every table of the node's database, in one place, and the schema version.
//!
//! Keys use redb's built-in encodings (fixed-width integers are little-endian
//! inside redb; tuples compare element by element). Values are either raw bytes
//! (MLS state, wire envelopes) or serde_json documents (rows of our own).

use redb::TableDefinition;

/// Bumped whenever a table's key or value encoding changes. `Store::open`
/// refuses a database written under another version unless a migration exists.
pub const SCHEMA_VERSION: u32 = 1;

/// Small named values: schema version, identity, counters.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// openmls storage provider entries: label ‖ json(key) ‖ version → json(value).
pub const MLS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mls");
/// Contacts by account key → json `Contact`.
pub const CONTACTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("contacts");
/// Conversations by MLS group id → json `Conversation`.
pub const CONVERSATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("conversations");
/// Position of a history row: (peer account, display timestamp, sender account, sender seq).
/// Rows sort by chat, then time, with a stable tie-break on sender and sequence.
pub type MessageKey<'a> = (&'a [u8; 32], u64, &'a [u8; 32], u64);
/// Chat history: `MessageKey` → json `StoredMessage`.
pub const MESSAGES: TableDefinition<MessageKey, &[u8]> = TableDefinition::new("messages");
/// Message id → `MessageKey`: dedup and lookup.
pub const MESSAGE_IDS: TableDefinition<&[u8; 16], MessageKey> = TableDefinition::new("message_ids");
/// Outbox: entry number → json `OutboxEntry`. Kept until the recipient acks.
pub const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Envelope ids that were durably applied → time applied (ms). Transport dedup.
pub const SEEN_ENVELOPES: TableDefinition<&[u8; 16], u64> = TableDefinition::new("seen_envelopes");
/// Records learned from or published to the DHT: DHT key → signed record bytes.
pub const DHT_RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dht_records");
