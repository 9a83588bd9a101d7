//! The application payload carried inside every MLS application message.

use prost::Message;

use crate::limits::{MAX_NAME, MAX_TEXT};
use crate::pb;

/// A client-chosen 16-byte message id, the dedup key of a message.
pub type MessageId = [u8; 16];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload is malformed: {0}")]
    Decode(String),
    #[error("message id must be 16 bytes")]
    BadId,
    #[error("payload has no body")]
    Empty,
    #[error("text is longer than {MAX_TEXT} bytes")]
    TooLong,
    #[error("mailbox grant holds too many or too long entries")]
    BadGrant,
    #[error("a successor conversation id must be 16 bytes")]
    BadSuccessor,
    #[error("a message reference must be 16 bytes")]
    BadTarget,
    #[error("a reaction is at most {MAX_REACTION} bytes of emoji")]
    BadReaction,
    #[error("a read receipt names 1 to {MAX_READ_IDS} messages")]
    BadReceipt,
    #[error("a disappearing timer is at most {MAX_TIMER_SECS} seconds")]
    BadTimer,
    #[error(
        "a profile name is at most {MAX_NAME} bytes and a picture at most {MAX_PICTURE} bytes of png, jpeg, gif or webp"
    )]
    BadProfile,
}

/// Most capabilities, and most relays, one [`Body::Grant`] may carry.
pub const MAX_GRANT_ENTRIES: usize = 8;
/// Longest relay address in a grant.
pub const MAX_RELAY_ADDR: usize = 512;
/// Longest reaction, in bytes: a few emoji (a skin-toned or joined emoji
/// takes up to about 28 bytes).
pub const MAX_REACTION: usize = 32;
/// Most message ids in one read receipt.
pub const MAX_READ_IDS: usize = 256;
/// Longest disappearing-messages timer: one year.
pub const MAX_TIMER_SECS: u64 = 365 * 24 * 3600;
/// Largest profile picture, in bytes (its message must fit
/// [`crate::limits::MAX_MLS_MESSAGE`]; as a data URL it stays under 256 KiB).
pub const MAX_PICTURE: usize = 192 * 1024;
/// Picture types a profile may carry.
pub const PICTURE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Text {
        text: String,
        /// The message quoted, if any.
        reply_to: Option<MessageId>,
        /// The conversation's disappearing timer when sent (0: off).
        expires_secs: u64,
    },
    /// Control: the sender device's deposit capabilities and home relays.
    /// Capabilities are checked by the receiver against the sender's device.
    Grant {
        capabilities: Vec<pb::Capability>,
        relays: Vec<String>,
    },
    /// Control, one-to-one conversations: the sender replaced this
    /// conversation by `successor`, which holds every current device of both
    /// accounts.
    Retire { successor: [u8; 16] },
    /// Control: the sender account's reaction to `target` (empty removes it).
    Reaction { target: MessageId, emoji: String },
    /// Control: new text for one of the sender account's messages.
    Edit { target: MessageId, text: String },
    /// Control: delete one of the sender account's messages for everyone.
    Delete { target: MessageId },
    /// Control: the sender read these messages.
    Read { ids: Vec<MessageId> },
    /// Control: the sender's device fetched these messages from its mailbox.
    Delivered { ids: Vec<MessageId> },
    /// Ephemeral: the sender is typing.
    Typing,
    /// Control: the conversation's disappearing-messages timer (0: off).
    Timer { secs: u64 },
    /// Ephemeral: the sender shares its presence and is online (or leaves).
    Presence { online: bool },
    /// Control: the sender account's profile name and picture.
    Profile {
        name: String,
        /// (type, bytes); `None`: no picture.
        picture: Option<(String, Vec<u8>)>,
    },
}

impl Body {
    /// Shown in the history (a text), as opposed to control and ephemeral payloads.
    pub fn is_text(&self) -> bool {
        matches!(self, Body::Text { .. })
    }

    /// Ephemeral payloads are sent once, directly, and never stored or retried.
    pub fn is_ephemeral(&self) -> bool {
        matches!(self, Body::Typing | Body::Presence { .. })
    }
}

/// Whether `emoji` is an acceptable reaction: empty (removes ours), or at most
/// [`MAX_REACTION`] bytes holding no letters, digits, spaces or control
/// characters from ASCII (keycap emoji excepted: a digit followed by U+20E3).
pub fn reaction_ok(emoji: &str) -> bool {
    if emoji.len() > MAX_REACTION {
        return false;
    }
    let keycap = emoji.contains('\u{20e3}');
    emoji.chars().all(|c| {
        !c.is_control()
            && !c.is_whitespace()
            && (!c.is_ascii() || (keycap && (c.is_ascii_digit() || c == '#' || c == '*')))
    })
}

/// Whether a profile picture's type and size are acceptable.
pub fn picture_ok(kind: &str, bytes: &[u8]) -> bool {
    PICTURE_TYPES.contains(&kind) && !bytes.is_empty() && bytes.len() <= MAX_PICTURE
}

fn target(b: &[u8]) -> Result<MessageId, PayloadError> {
    b.try_into().map_err(|_| PayloadError::BadTarget)
}

/// The ids of a read or delivery receipt: 1 to [`MAX_READ_IDS`] message ids.
fn receipt_ids(ids: &[Vec<u8>]) -> Result<Vec<MessageId>, PayloadError> {
    if ids.is_empty() || ids.len() > MAX_READ_IDS {
        return Err(PayloadError::BadReceipt);
    }
    ids.iter().map(|i| target(i)).collect()
}

/// A decoded, validated application payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub id: MessageId,
    pub sender_seq: u64,
    pub timestamp_ms: u64,
    pub body: Body,
}

impl Payload {
    pub fn text(id: MessageId, sender_seq: u64, timestamp_ms: u64, text: impl Into<String>) -> Self {
        Self {
            id,
            sender_seq,
            timestamp_ms,
            body: Body::Text {
                text: text.into(),
                reply_to: None,
                expires_secs: 0,
            },
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        use pb::app_payload::Body as B;
        let body = match &self.body {
            Body::Text {
                text,
                reply_to,
                expires_secs,
            } => B::Text(pb::Text {
                text: text.clone(),
                reply_to: reply_to.map(|r| r.to_vec()).unwrap_or_default(),
                expires_secs: *expires_secs,
            }),
            Body::Grant { capabilities, relays } => B::Grant(pb::MailboxGrant {
                capabilities: capabilities.clone(),
                relays: relays.clone(),
            }),
            Body::Retire { successor } => B::Retire(pb::Retire {
                successor: successor.to_vec(),
            }),
            Body::Reaction { target, emoji } => B::Reaction(pb::Reaction {
                target: target.to_vec(),
                emoji: emoji.clone(),
            }),
            Body::Edit { target, text } => B::Edit(pb::Edit {
                target: target.to_vec(),
                text: text.clone(),
            }),
            Body::Delete { target } => B::Delete(pb::Delete {
                target: target.to_vec(),
            }),
            Body::Read { ids } => B::Read(pb::ReadReceipt {
                ids: ids.iter().map(|i| i.to_vec()).collect(),
            }),
            Body::Delivered { ids } => B::Delivered(pb::DeliveryReceipt {
                ids: ids.iter().map(|i| i.to_vec()).collect(),
            }),
            Body::Typing => B::Typing(pb::Typing {}),
            Body::Timer { secs } => B::Timer(pb::DisappearingTimer { secs: *secs }),
            Body::Presence { online } => B::Presence(pb::Presence { online: *online }),
            Body::Profile { name, picture } => {
                let (picture_type, picture) = picture.clone().unwrap_or_default();
                B::Profile(pb::Profile {
                    name: name.clone(),
                    picture,
                    picture_type,
                })
            }
        };
        pb::AppPayload {
            message_id: self.id.to_vec(),
            sender_seq: self.sender_seq,
            timestamp_ms: self.timestamp_ms,
            body: Some(body),
        }
        .encode_to_vec()
    }

    /// Decodes and validates a payload. The caller caps `bytes` (it is an MLS
    /// plaintext, at most [`crate::limits::MAX_MLS_MESSAGE`]); every field is
    /// checked here, ownership (edits, deletes) by the receiver's state.
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        use pb::app_payload::Body as B;
        let p = pb::AppPayload::decode(bytes).map_err(|e| PayloadError::Decode(e.to_string()))?;
        let id: MessageId = p.message_id.as_slice().try_into().map_err(|_| PayloadError::BadId)?;
        let body = match p.body.ok_or(PayloadError::Empty)? {
            B::Text(t) => {
                if t.text.len() > MAX_TEXT {
                    return Err(PayloadError::TooLong);
                }
                if t.expires_secs > MAX_TIMER_SECS {
                    return Err(PayloadError::BadTimer);
                }
                Body::Text {
                    text: t.text,
                    reply_to: if t.reply_to.is_empty() {
                        None
                    } else {
                        Some(target(&t.reply_to)?)
                    },
                    expires_secs: t.expires_secs,
                }
            }
            B::Grant(g) => {
                if g.capabilities.len() > MAX_GRANT_ENTRIES
                    || g.relays.len() > MAX_GRANT_ENTRIES
                    || g.relays.iter().any(|r| r.len() > MAX_RELAY_ADDR)
                {
                    return Err(PayloadError::BadGrant);
                }
                Body::Grant {
                    capabilities: g.capabilities,
                    relays: g.relays,
                }
            }
            B::Retire(r) => Body::Retire {
                successor: r
                    .successor
                    .as_slice()
                    .try_into()
                    .map_err(|_| PayloadError::BadSuccessor)?,
            },
            B::Reaction(r) => {
                if !reaction_ok(&r.emoji) {
                    return Err(PayloadError::BadReaction);
                }
                Body::Reaction {
                    target: target(&r.target)?,
                    emoji: r.emoji,
                }
            }
            B::Edit(e) => {
                if e.text.is_empty() || e.text.len() > MAX_TEXT {
                    return Err(PayloadError::TooLong);
                }
                Body::Edit {
                    target: target(&e.target)?,
                    text: e.text,
                }
            }
            B::Delete(d) => Body::Delete {
                target: target(&d.target)?,
            },
            B::Read(r) => Body::Read {
                ids: receipt_ids(&r.ids)?,
            },
            B::Delivered(r) => Body::Delivered {
                ids: receipt_ids(&r.ids)?,
            },
            B::Typing(_) => Body::Typing,
            B::Timer(t) => {
                if t.secs > MAX_TIMER_SECS {
                    return Err(PayloadError::BadTimer);
                }
                Body::Timer { secs: t.secs }
            }
            B::Presence(p) => Body::Presence { online: p.online },
            B::Profile(p) => {
                if p.name.len() > MAX_NAME || p.name.chars().any(char::is_control) {
                    return Err(PayloadError::BadProfile);
                }
                let picture = if p.picture.is_empty() && p.picture_type.is_empty() {
                    None
                } else if picture_ok(&p.picture_type, &p.picture) {
                    Some((p.picture_type, p.picture))
                } else {
                    return Err(PayloadError::BadProfile);
                };
                Body::Profile { name: p.name, picture }
            }
        };
        Ok(Self {
            id,
            sender_seq: p.sender_seq,
            timestamp_ms: p.timestamp_ms,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let p = Payload::text([1; 16], 3, 99, "hello");
        assert_eq!(Payload::decode(&p.encode()).unwrap(), p);
    }

    #[test]
    fn retire_round_trips_and_needs_a_16_byte_successor() {
        let p = Payload {
            id: [5; 16],
            sender_seq: 0,
            timestamp_ms: 1,
            body: Body::Retire { successor: [6; 16] },
        };
        assert_eq!(Payload::decode(&p.encode()).unwrap(), p);
        let bad = pb::AppPayload {
            message_id: vec![5; 16],
            sender_seq: 0,
            timestamp_ms: 1,
            body: Some(pb::app_payload::Body::Retire(pb::Retire { successor: vec![6; 15] })),
        };
        assert_eq!(
            Payload::decode(&prost::Message::encode_to_vec(&bad)),
            Err(PayloadError::BadSuccessor)
        );
    }

    #[test]
    fn grant_round_trips_and_oversized_grants_are_refused() {
        let cap = pb::Capability {
            body: vec![1; 40],
            signature: vec![2; 64],
        };
        let p = Payload {
            id: [4; 16],
            sender_seq: 0,
            timestamp_ms: 7,
            body: Body::Grant {
                capabilities: vec![cap.clone()],
                relays: vec!["/ip4/1.2.3.4/tcp/1/p2p/x".into()],
            },
        };
        assert_eq!(Payload::decode(&p.encode()).unwrap(), p);
        let many = Payload {
            body: Body::Grant {
                capabilities: vec![cap; MAX_GRANT_ENTRIES + 1],
                relays: Vec::new(),
            },
            ..p.clone()
        };
        assert_eq!(Payload::decode(&many.encode()), Err(PayloadError::BadGrant));
        let long = Payload {
            body: Body::Grant {
                capabilities: Vec::new(),
                relays: vec!["x".repeat(MAX_RELAY_ADDR + 1)],
            },
            ..p
        };
        assert_eq!(Payload::decode(&long.encode()), Err(PayloadError::BadGrant));
    }

    fn with(body: Body) -> Payload {
        Payload {
            id: [7; 16],
            sender_seq: 0,
            timestamp_ms: 1,
            body,
        }
    }

    #[test]
    fn every_new_payload_round_trips() {
        for body in [
            Body::Text {
                text: "re".into(),
                reply_to: Some([1; 16]),
                expires_secs: 5,
            },
            Body::Reaction {
                target: [1; 16],
                emoji: "\u{1f44d}\u{1f3fd}".into(),
            },
            Body::Reaction {
                target: [1; 16],
                emoji: String::new(),
            },
            Body::Edit {
                target: [2; 16],
                text: "new".into(),
            },
            Body::Delete { target: [3; 16] },
            Body::Read {
                ids: vec![[4; 16], [5; 16]],
            },
            Body::Delivered { ids: vec![[6; 16]] },
            Body::Typing,
            Body::Timer { secs: 60 },
            Body::Presence { online: true },
            Body::Profile {
                name: "Alice".into(),
                picture: Some(("image/png".into(), vec![1, 2, 3])),
            },
            Body::Profile {
                name: "Al".into(),
                picture: None,
            },
        ] {
            let p = with(body);
            assert_eq!(Payload::decode(&p.encode()).unwrap(), p);
        }
    }

    #[test]
    fn oversized_or_malformed_fields_of_new_payloads_are_refused() {
        let cases = [
            (
                Body::Reaction {
                    target: [1; 16],
                    emoji: "\u{1f600}".repeat(9),
                },
                PayloadError::BadReaction,
            ),
            (
                Body::Reaction {
                    target: [1; 16],
                    emoji: "lol".into(),
                },
                PayloadError::BadReaction,
            ),
            (
                Body::Read {
                    ids: vec![[0; 16]; MAX_READ_IDS + 1],
                },
                PayloadError::BadReceipt,
            ),
            (Body::Read { ids: Vec::new() }, PayloadError::BadReceipt),
            (
                Body::Delivered {
                    ids: vec![[0; 16]; MAX_READ_IDS + 1],
                },
                PayloadError::BadReceipt,
            ),
            (Body::Delivered { ids: Vec::new() }, PayloadError::BadReceipt),
            (
                Body::Timer {
                    secs: MAX_TIMER_SECS + 1,
                },
                PayloadError::BadTimer,
            ),
            (
                Body::Edit {
                    target: [1; 16],
                    text: "x".repeat(MAX_TEXT + 1),
                },
                PayloadError::TooLong,
            ),
            (
                Body::Profile {
                    name: "n".repeat(MAX_NAME + 1),
                    picture: None,
                },
                PayloadError::BadProfile,
            ),
            (
                Body::Profile {
                    name: "n".into(),
                    picture: Some(("image/png".into(), vec![0; MAX_PICTURE + 1])),
                },
                PayloadError::BadProfile,
            ),
            (
                Body::Profile {
                    name: "n".into(),
                    picture: Some(("text/html".into(), vec![0; 10])),
                },
                PayloadError::BadProfile,
            ),
        ];
        for (body, err) in cases {
            assert_eq!(Payload::decode(&with(body).encode()), Err(err));
        }
        let short_target = pb::AppPayload {
            message_id: vec![1; 16],
            body: Some(pb::app_payload::Body::Delete(pb::Delete { target: vec![1; 3] })),
            ..Default::default()
        };
        assert_eq!(
            Payload::decode(&short_target.encode_to_vec()),
            Err(PayloadError::BadTarget)
        );
        assert!(reaction_ok("1\u{fe0f}\u{20e3}"), "keycap emoji are reactions");
    }

    #[test]
    fn garbage_payload_is_a_typed_error() {
        assert!(matches!(
            Payload::decode(&[0xff, 0xff, 0xff]),
            Err(PayloadError::Decode(_))
        ));
        let no_body = pb::AppPayload {
            message_id: vec![0; 16],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(Payload::decode(&no_body), Err(PayloadError::Empty));
    }
}
