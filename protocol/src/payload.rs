//! The application payload carried inside every MLS application message.

use prost::Message;

use crate::limits::MAX_TEXT;
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
}

/// Most capabilities, and most relays, one [`Body::Grant`] may carry.
pub const MAX_GRANT_ENTRIES: usize = 8;
/// Longest relay address in a grant.
pub const MAX_RELAY_ADDR: usize = 512;

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Text(String),
    /// Control: the sender device's deposit capabilities and home relays.
    /// Capabilities are checked by the receiver against the sender's device.
    Grant {
        capabilities: Vec<pb::Capability>,
        relays: Vec<String>,
    },
    /// Control, one-to-one conversations: the sender replaced this
    /// conversation by `successor`, which holds every current device of both
    /// accounts.
    Retire {
        successor: [u8; 16],
    },
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
            body: Body::Text(text.into()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let body = match &self.body {
            Body::Text(t) => pb::app_payload::Body::Text(pb::Text { text: t.clone() }),
            Body::Grant { capabilities, relays } => pb::app_payload::Body::Grant(pb::MailboxGrant {
                capabilities: capabilities.clone(),
                relays: relays.clone(),
            }),
            Body::Retire { successor } => pb::app_payload::Body::Retire(pb::Retire {
                successor: successor.to_vec(),
            }),
        };
        pb::AppPayload {
            message_id: self.id.to_vec(),
            sender_seq: self.sender_seq,
            timestamp_ms: self.timestamp_ms,
            body: Some(body),
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let p = pb::AppPayload::decode(bytes).map_err(|e| PayloadError::Decode(e.to_string()))?;
        let id: MessageId = p.message_id.as_slice().try_into().map_err(|_| PayloadError::BadId)?;
        let body = match p.body.ok_or(PayloadError::Empty)? {
            pb::app_payload::Body::Text(t) => {
                if t.text.len() > MAX_TEXT {
                    return Err(PayloadError::TooLong);
                }
                Body::Text(t.text)
            }
            pb::app_payload::Body::Grant(g) => {
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
            pb::app_payload::Body::Retire(r) => Body::Retire {
                successor: r
                    .successor
                    .as_slice()
                    .try_into()
                    .map_err(|_| PayloadError::BadSuccessor)?,
            },
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
