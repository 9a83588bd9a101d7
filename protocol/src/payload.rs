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
}

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Text(String),
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
