//! Hard size limits applied before anything from the network or disk is decoded.

/// Largest `/tidings/deliver/1` request or response, in bytes.
pub const MAX_DELIVER_FRAME: usize = 4 * 1024 * 1024;
/// Most envelopes in one delivery batch.
pub const MAX_ENVELOPES_PER_BATCH: usize = 512;
/// Largest single MLS message inside an envelope (a Welcome excepted).
pub const MAX_MLS_MESSAGE: usize = 256 * 1024;
/// Largest Welcome: it carries the whole ratchet tree, about 360 bytes per
/// member, so this admits groups of about 10,000 and still fits a delivery frame.
pub const MAX_WELCOME: usize = MAX_DELIVER_FRAME - 256 * 1024;
/// Largest `/tidings/keypackage/1` frame.
pub const MAX_KEY_PACKAGE_FRAME: usize = 16 * 1024;
/// Largest signed user record (must fit a Kademlia packet).
pub const MAX_USER_RECORD: usize = 8 * 1024;
/// Most device certificates in a record or card.
pub const MAX_DEVICES: usize = 16;
/// Most relays in a record or card.
pub const MAX_RELAYS: usize = 8;
/// Largest relay multiaddr string.
pub const MAX_RELAY_ADDR: usize = 256;
/// Largest profile name, in bytes.
pub const MAX_NAME: usize = 64;
/// Largest text body, in bytes.
pub const MAX_TEXT: usize = 64 * 1024;
/// Largest contact card URI, in characters.
pub const MAX_CARD_URI: usize = 4096;
/// Largest `/tidings/mailbox/1` request or response, in bytes.
pub const MAX_MAILBOX_FRAME: usize = 4 * 1024 * 1024;
