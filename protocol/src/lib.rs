//! Tidings protocol: wire types, identities, signed records and the MLS engine.
//!
//! This crate does no I/O. It never reads a clock or a socket: time is passed in
//! as milliseconds since the Unix epoch, and randomness as seeds or through the
//! openmls provider the caller supplies. That keeps it deterministic under test
//! and in the simulator.

pub mod card;
pub mod group;
pub mod identity;
pub mod limits;
pub mod link;
pub mod mailbox;
pub mod mls;
pub mod payload;
pub mod record;

/// Generated prost types for `proto/tidings.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tidings.v1.rs"));
}

pub use card::{CardError, ContactCard};
pub use identity::{AccountId, AccountKey, DeviceCertificate, DeviceKey, IdentityError};
pub use mls::{MlsEngine, MlsError};
pub use payload::{MessageId, Payload, PayloadError};
pub use record::{RecordError, UserRecord};
