//! What can happen in the model. Events that belong to a client's session carry the session number
//! they were scheduled in; a handler ignores them once the client has gone offline since (its
//! timers and in-flight requests died with the session).

use super::{DeliveryId, MsgId, NodeId};

/// How a delivery reached its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Path {
    Direct = 0,
    Relayed = 1,
    Mailbox = 2,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Direct, Path::Relayed, Path::Mailbox];

    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relayed => "relayed",
            Path::Mailbox => "mailbox",
        }
    }

    pub fn from_u8(v: u8) -> Option<Path> {
        Path::ALL.get(usize::from(v)).copied()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ev {
    /// A client comes online.
    Up(NodeId),
    /// A client goes offline (session).
    Down(NodeId, u32),
    /// The user sends a message.
    SendTimer(NodeId, u32),
    /// The user replies to `to` (session of the replier).
    Reply { from: NodeId, to: NodeId, session: u32 },
    /// The user looks up a contact's DHT record.
    LookupTimer(NodeId, u32),
    /// The device republishes its own DHT record.
    RepublishTimer(NodeId, u32),
    /// Someone looks up the Sybils' target.
    SybilTimer,
    /// Time-series sample.
    Sample,
    /// Hourly retention sweep on every relay.
    RetentionSweep,
    /// Fault `i` starts.
    Fault(u16),
    /// Partition fault `i` heals.
    Heal(u16),
    /// A killed relay starts again.
    RelayBack(NodeId),
    /// A message sent over a connection arrives (delivery, recipient's session, path).
    DirectArrive {
        d: DeliveryId,
        peer_session: u32,
        path: Path,
    },
    /// The recipient's ack arrives at the sender.
    DirectAck { d: DeliveryId, session: u32 },
    /// No direct ack within the patience: deposit instead.
    DirectFail { m: MsgId, session: u32 },
    /// A deposit reaches a relay.
    DepositArrive { m: MsgId, relay: NodeId, session: u32 },
    /// The relay's durable commit of a deposit finishes.
    Commit {
        m: MsgId,
        relay: NodeId,
        epoch: u32,
        session: u32,
    },
    /// A custody receipt reaches the sender.
    Receipt { m: MsgId, relay: NodeId, session: u32 },
    /// A deposit got no receipt (timeout or refusal).
    DepositFail { m: MsgId, session: u32 },
    /// Outbox retry after backoff.
    Retry { m: MsgId, session: u32 },
    /// The record lookup of a first message's conversation ended.
    RecordLookedUp { m: MsgId },
    /// A first message's conversation is set up (record looked up, key package fetched).
    SetupDone { m: MsgId, session: u32 },
    /// A relay's push of one envelope reaches the owner.
    Push {
        d: DeliveryId,
        relay: NodeId,
        epoch: u32,
        session: u32,
    },
    /// A fetch page comes back from home relay `slot`.
    FetchReply {
        client: NodeId,
        slot: u8,
        session: u32,
        epoch: u32,
    },
    /// The 10-second mailbox round for home relay `slot`.
    Tick { client: NodeId, slot: u8, session: u32 },
    /// A group inbox read (catch-up) comes back.
    GroupFetch {
        client: NodeId,
        membership: u16,
        session: u32,
    },
    /// A group message reaches a member (long-poll answer or direct push).
    GroupArrive { d: DeliveryId, session: u32, path: Path },
    /// A dial finished; both ends now hold a connection.
    DialDone {
        from: NodeId,
        to: NodeId,
        path: Path,
        relay: NodeId,
        sessions: (u32, u32),
    },
    /// Hole punching over a relayed connection succeeded.
    HolePunched {
        from: NodeId,
        to: NodeId,
        sessions: (u32, u32),
    },
    /// A DHT request's answer (or its timeout).
    Kad {
        lookup: u32,
        generation: u32,
        peer: NodeId,
        ok: bool,
    },
}
