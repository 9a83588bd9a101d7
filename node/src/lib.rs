//! The Tidings node: libp2p networking, the core state machine around the
//! store and the MLS engine, the local API and the `tidings` command line.

pub mod api;
pub mod bench;
pub mod bench_groups;
pub mod bench_relay;
pub mod chats;
pub mod clock;
pub mod codec;
pub mod core;
pub mod demo;
pub mod link;
pub mod net;
pub mod node;
pub mod relay;
pub mod sim;
pub mod types;
pub mod ui;

pub use clock::Clock;
pub use core::{GroupMemberView, GroupView, NodeError};
pub use net::NetConfig;
pub use node::{Node, NodeConfig, NodeHandle, create_identity, create_identity_from_seed, open_store};
pub use types::{
    ChatRef, ChatView, ContactView, MailGapView, MessageView, NodeEvent, NodeStatus, PresenceView, RefusalView,
};
