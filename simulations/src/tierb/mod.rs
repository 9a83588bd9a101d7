//! Tier B: a deterministic discrete-event model of the Tidings network for 100k+ nodes.
//!
//! The protocols are plain state machines mirroring the real ones (docs/ARCHITECTURE.md,
//! docs/PROTOCOL.md): Kademlia lookups ([`kad`]), connections, direct and relayed delivery and the
//! outbox ([`delivery`]), relay mailboxes with custody receipts, pushes, fetches and group inboxes
//! ([`mailbox`]), churn ([`churn`]) and faults. One [`World`] owns all state; events come off a heap
//! ordered by (time, sequence number); every random draw comes from ChaCha streams seeded by
//! (seed, stream). Nothing iterates a hash map. The same scenario and seed therefore give the same
//! trace hash on the same build.
//!
//! What the model leaves out is listed in docs/SIMULATOR.md ("What Tier B does not model").

mod build;
mod checks;
mod churn;
mod delivery;
pub(crate) mod event;
mod kad;
mod key;
mod mailbox;
mod net;
mod queue;
mod report;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io::Write;

use crate::rng::SimRng;
use crate::scenario::{Scenario, SimDuration};
use crate::trace::{Recorder, TraceEvent};
pub(crate) use build::draw_group_members;
use event::Ev;
pub use event::Path;
pub use report::{
    DeliveryBin, DeliveryRecord, KAD_KINDS, KadKind, RunResult, Sample, Violation, delivery_figures, latency_curves,
};
pub(crate) use report::{KadAcc, bytes_figures, dht_figures, partition_figures};

/// Simulated time in microseconds since the start of the run.
pub type Time = u64;
pub type NodeId = u32;
pub type MsgId = u32;
pub type DeliveryId = u32;

/// "Not yet" for times.
pub const NEVER: Time = u64::MAX;
const MICROS_PER_HOUR: u64 = 3_600_000_000;
const NONE: u32 = u32::MAX;
/// Most connections a node keeps track of (least recently used are forgotten first).
const MAX_CONNS: usize = 32;
/// Most outbox entries a device holds; beyond it the oldest undelivered are dropped and counted.
const MAX_OUTBOX: usize = 4_096;

/// Bytes on the wire, estimated from the real encodings (envelope framing, MLS overhead, signed
/// receipts and auth); the model never builds real frames.
mod wire {
    /// Envelope id, conversation id, kind, MLS framing and AEAD tag around the payload.
    pub const ENVELOPE_OVERHEAD: u64 = 160;
    /// A delivery status or ack.
    pub const ACK: u64 = 48;
    /// Deposit request framing plus the capability.
    pub const DEPOSIT_OVERHEAD: u64 = 220;
    /// A signed custody receipt.
    pub const RECEIPT: u64 = 230;
    /// A signed fetch / ack / subscribe request (owner auth).
    pub const AUTH_REQUEST: u64 = 180;
    /// A Kademlia request, and one peer entry (id + addresses) in a response.
    pub const KAD_REQUEST: u64 = 90;
    pub const KAD_PEER: u64 = 80;
    /// A signed user record.
    pub const RECORD: u64 = 900;
    /// Connection setup (QUIC + Noise + identify), each way.
    pub const HANDSHAKE: u64 = 1_800;
}

/// Per-node byte counters, by protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Proto {
    Kad = 0,
    Deliver = 1,
    Mailbox = 2,
    Circuit = 3,
}

impl Proto {
    pub const ALL: [Proto; 4] = [Proto::Kad, Proto::Deliver, Proto::Mailbox, Proto::Circuit];

    pub fn name(self) -> &'static str {
        match self {
            Proto::Kad => "kad",
            Proto::Deliver => "deliver",
            Proto::Mailbox => "mailbox",
            Proto::Circuit => "circuit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nat {
    Public,
    Cone,
    Symmetric,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeRole {
    Relay(u32),
    Client(u32),
    Sybil,
}

pub(crate) struct Node {
    key: key::Key,
    subnet: u32,
    region: u8,
    nat: Nat,
    role: NodeRole,
    dht_server: bool,
    online: bool,
    /// The last departure closed no connections.
    silent_leave: bool,
    /// Incremented each time a client comes online; 0 = never online.
    session: u32,
    /// Half the access RTT, in µs.
    access_us: u32,
    mbps: f32,
    /// When the uplink is free again.
    tx_free: Time,
    bytes: [u64; 4],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Adv {
    Honest,
    Dropping,
    Withholding,
}

pub(crate) struct Relay {
    node: NodeId,
    up: bool,
    /// Incremented on every crash: subscriptions, circuits and commits of an older epoch are void.
    epoch: u32,
    adv: Adv,
    commit_us: u64,
    /// Envelopes held (personal inboxes, group inboxes, withheld mail).
    occupancy: u64,
    /// Clients with this relay as home relay `slot`.
    homed: Vec<(u32, u8)>,
    /// Groups whose sequencing (first) relay this is.
    first_of: Vec<u32>,
    destroyed: bool,
}

#[derive(Clone, Copy)]
pub(crate) struct Conn {
    peer: NodeId,
    path: Path,
    relay: NodeId,
    relay_epoch: u32,
    peer_session: u32,
    my_session: u32,
    connected: bool,
    last_used: Time,
    expires: Time,
    away_until: Time,
    dialing_until: Time,
}

pub(crate) struct Membership {
    group: u32,
    /// Position in the group's member list.
    pos: u32,
    /// Next group-inbox index to read on catch-up.
    cursor: u64,
    /// Session in which the member caught up and holds a long poll (0 = not caught up).
    caught_up: u32,
}

pub(crate) struct Drain {
    start: Time,
    left: u8,
    mail: u32,
}

pub(crate) struct Client {
    node: NodeId,
    churns: bool,
    home: Vec<NodeId>,
    contacts: Vec<NodeId>,
    groups: Vec<Membership>,
    outbox: Vec<MsgId>,
    /// Deliveries sent to this client while it was offline, not yet `ready`.
    waiting: Vec<DeliveryId>,
    /// Deliveries that became ready while this client was online, not yet known to be delivered.
    recent: Vec<DeliveryId>,
    conns: Vec<Conn>,
    /// What home relay `slot` holds for this client: (delivery, committed at).
    inbox: Vec<VecDeque<(DeliveryId, Time)>>,
    /// Subscription per home relay: (relay epoch, session), or NONE.
    subs: Vec<(u32, u32)>,
    drain: Option<Drain>,
    tick_phase: Time,
    online_since: Time,
    online_total: Time,
    last_publish: Time,
    record_key: key::Key,
    record_holders: Vec<NodeId>,
}

pub(crate) struct Message {
    sender: NodeId,
    group: u32,
    /// Group messages: the sender's position in the member list (deliveries skip it).
    sender_pos: u32,
    size: u32,
    first: DeliveryId,
    count: u32,
    sent: Time,
    /// The sender holds an ack: the recipient's direct ack or a custody receipt (for a group, the
    /// sequencing relay's receipt).
    acked: bool,
    /// Left the sender's outbox.
    done: bool,
    inflight: u16,
    attempt: u8,
    /// Group messages: home-relay slots of the group still without a receipt (bit per relay).
    relays_pending: u8,
    /// Group messages: index in the sequencing relay's group inbox, or NEVER.
    group_index: u64,
    /// A first message to a contact waits while its conversation is set up.
    held: bool,
}

pub(crate) mod flag {
    pub const COMMITTED_HONEST: u8 = 1;
    pub const COMMITTED_ADV: u8 = 2;
    pub const DESTROYED: u8 = 4;
    pub const EXPIRED: u8 = 8;
    pub const LOST: u8 = 16;
    pub const DROPPED_FROM_OUTBOX: u8 = 32;
    /// The recipient went offline within the deadline after the delivery became ready.
    pub const RECIPIENT_LEFT: u8 = 64;
    /// The sender went offline before it held an ack for the message.
    pub const SENDER_LEFT: u8 = 128;
}

pub(crate) struct Delivery {
    msg: MsgId,
    recipient: NodeId,
    /// When the recipient was first online at or after the sending (NEVER: not yet).
    ready: Time,
    delivered: Time,
    path: u8,
    /// Honest relay copies the recipient will read.
    copies: u8,
    flags: u8,
    /// Displays seen by the checker (not by the model's dedup).
    displays: u8,
}

pub(crate) struct Group {
    members: Vec<NodeId>,
    relays: Vec<NodeId>,
    /// The sequencing relay's group inbox: (message, committed at); `base` is the index of the front.
    inbox: VecDeque<(MsgId, Time)>,
    base: u64,
}

pub(crate) struct Partition {
    side: Vec<u8>,
    active: bool,
    start: Time,
    heal: Time,
    /// First delivery made after the cut started.
    first_delivery: DeliveryId,
    /// Deliveries made during the cut, still not shown at the heal, whose both ends are online then.
    backlog: Vec<DeliveryId>,
}

/// Counters kept during the run.
#[derive(Default)]
pub(crate) struct Counters {
    events: u64,
    kad: [report::KadAcc; 4],
    drains_ms: Vec<f32>,
    reconnects: u64,
    reconnects_with_mail: u64,
    lost_excused: u64,
    lost_expired: u64,
    outbox_overflow: u64,
    samples: Vec<Sample>,
}

/// Options for one run.
pub struct RunOptions<'a> {
    pub seed: u64,
    /// Where events.jsonl goes (None: nowhere; the trace hash is computed anyway).
    pub events: Option<Box<dyn Write + 'a>>,
    /// Called now and then with (simulated now, end), both in µs.
    pub progress: Option<&'a mut dyn FnMut(Time, Time)>,
}

/// Why a run could not be carried out (bad scenario, output failure). Invariant violations are
/// not errors: they are reported in [`RunResult::violations`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TierBError {
    #[error(transparent)]
    Scenario(#[from] crate::scenario::ScenarioError),
    #[error("cannot write events.jsonl")]
    Events(#[source] std::io::Error),
}

/// The whole model state.
pub(crate) struct World<'a> {
    sc: &'a Scenario,
    seed: u64,
    now: Time,
    end: Time,
    q: queue::EventQueue,
    nodes: Vec<Node>,
    relays: Vec<Relay>,
    clients: Vec<Client>,
    groups: Vec<Group>,
    msgs: Vec<Message>,
    deliveries: Vec<Delivery>,
    /// Pairs of clients that have a one-to-one conversation (see `conv_key`).
    convs: std::collections::HashSet<u64>,
    parts: Vec<Partition>,
    /// Partition index per fault index (NONE for other faults).
    part_of_fault: Vec<u32>,
    /// RTT between regions, µs.
    rtt_us: Vec<u32>,
    n_regions: usize,
    kad: kad::Kad,
    rng_net: SimRng,
    rng_work: SimRng,
    rng_churn: SimRng,
    rng_faults: SimRng,
    rec: Recorder<'a>,
    checks: checks::Checks,
    c: Counters,
}

/// Runs a scenario in Tier B.
pub fn run(sc: &Scenario, opts: RunOptions<'_>) -> Result<RunResult, TierBError> {
    sc.validate()?;
    let RunOptions {
        seed,
        events,
        mut progress,
    } = opts;
    let rec = Recorder::new(sc, seed, events);
    let mut w = build::build(sc, seed, rec);
    w.start();
    let end = w.end;
    w.run_until(end, |now, end| {
        if let Some(p) = progress.as_mut() {
            p(now, end);
        }
    });
    w.now = w.end;
    w.finish_checks();
    if let Some(p) = progress.as_mut() {
        p(w.end, w.end);
    }
    report::build(w).map_err(TierBError::Events)
}

impl World<'_> {
    /// Processes every event up to and including time `until`.
    fn run_until(&mut self, until: Time, mut progress: impl FnMut(Time, Time)) {
        let mut next_progress = self.c.events;
        while self.q.peek_time().is_some_and(|t| t <= until) {
            let Some((t, ev)) = self.q.pop() else { break };
            self.now = t;
            self.c.events += 1;
            self.dispatch(ev);
            if self.c.events >= next_progress {
                next_progress = self.c.events + 65_536;
                progress(self.now, self.end);
            }
        }
        self.now = self.now.max(until.min(self.end));
    }

    /// The one place where a node's liveness changes (the DHT keeps a bitset copy).
    fn set_online(&mut self, n: NodeId, online: bool) {
        self.nodes[n as usize].online = online;
        self.kad.set_live(n, online);
    }

    fn at(&mut self, delay: Time, ev: Ev) {
        self.q.push(self.now.saturating_add(delay), ev);
    }

    fn trace(&mut self, ev: TraceEvent) {
        self.rec.record(self.now, &ev);
    }

    fn start(&mut self) {
        let sc = self.sc;
        for i in 0..self.clients.len() {
            let node = self.clients[i].node;
            if self.nodes[node as usize].online {
                self.q.push(0, Ev::Up(node));
                self.set_online(node, false);
            } else {
                let gap = self.initial_gap(node);
                self.q.push(gap, Ev::Up(node));
            }
        }
        for (i, f) in sc.faults.iter().enumerate() {
            self.q.push(f.at().micros(), Ev::Fault(i as u16));
        }
        self.q.push(0, Ev::Sample);
        self.q.push(SimDuration::from_secs(3_600).micros(), Ev::RetentionSweep);
        if sc
            .adversaries
            .sybil
            .as_ref()
            .is_some_and(|s| s.target_lookups_per_hour > 0.0)
        {
            self.schedule_sybil_lookup();
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Up(n) => self.on_up(n),
            Ev::Down(n, s) => self.on_down(n, s),
            Ev::SendTimer(n, s) => self.on_send_timer(n, s),
            Ev::Reply { from, to, session } => self.on_reply(from, to, session),
            Ev::LookupTimer(n, s) => self.on_lookup_timer(n, s),
            Ev::RepublishTimer(n, s) => self.on_republish_timer(n, s),
            Ev::SybilTimer => self.on_sybil_timer(),
            Ev::Sample => self.on_sample(),
            Ev::RetentionSweep => self.on_retention_sweep(),
            Ev::Fault(i) => self.on_fault(usize::from(i)),
            Ev::Heal(i) => self.on_heal(usize::from(i)),
            Ev::RelayBack(r) => self.on_relay_back(r),
            Ev::DirectArrive { d, peer_session, path } => self.on_direct_arrive(d, peer_session, path),
            Ev::DirectAck { d, session } => self.on_direct_ack(d, session),
            Ev::DirectFail { m, session } => self.on_direct_fail(m, session),
            Ev::DepositArrive { m, relay, session } => self.on_deposit_arrive(m, relay, session),
            Ev::Commit {
                m,
                relay,
                epoch,
                session,
            } => self.on_commit(m, relay, epoch, session),
            Ev::Receipt { m, relay, session } => self.on_receipt(m, relay, session),
            Ev::DepositFail { m, session } => self.on_deposit_fail(m, session),
            Ev::Retry { m, session } => self.on_retry(m, session),
            Ev::RecordLookedUp { m } => self.setup_after_lookup(m),
            Ev::SetupDone { m, session } => self.on_setup_done(m, session),
            Ev::Push {
                d,
                relay,
                epoch,
                session,
            } => self.on_push(d, relay, epoch, session),
            Ev::FetchReply {
                client,
                slot,
                session,
                epoch,
            } => self.on_fetch_reply(client, slot, session, epoch),
            Ev::Tick { client, slot, session } => self.on_tick(client, slot, session),
            Ev::GroupFetch {
                client,
                membership,
                session,
            } => self.on_group_fetch(client, membership, session),
            Ev::GroupArrive { d, session, path } => self.on_group_arrive(d, session, path),
            Ev::DialDone {
                from,
                to,
                path,
                relay,
                sessions,
            } => self.on_dial_done(from, to, path, relay, sessions),
            Ev::HolePunched { from, to, sessions } => self.on_hole_punched(from, to, sessions),
            Ev::Kad {
                lookup,
                generation,
                peer,
                ok,
            } => self.on_kad(lookup, generation, peer, ok),
        }
    }

    fn client_of(&self, node: NodeId) -> Option<usize> {
        match self.nodes.get(node as usize)?.role {
            NodeRole::Client(c) => Some(c as usize),
            _ => None,
        }
    }

    fn relay_of(&self, node: NodeId) -> Option<usize> {
        match self.nodes.get(node as usize)?.role {
            NodeRole::Relay(r) => Some(r as usize),
            _ => None,
        }
    }

    /// The client behind `node` if it is online in `session`.
    fn live_client(&self, node: NodeId, session: u32) -> Option<usize> {
        let n = self.nodes.get(node as usize)?;
        if !n.online || n.session != session {
            return None;
        }
        self.client_of(node)
    }

    fn on_sample(&mut self) {
        let online = self
            .clients
            .iter()
            .filter(|c| self.nodes[c.node as usize].online)
            .count() as u64;
        let relays_up = self.relays.iter().filter(|r| r.up).count() as u64;
        let occupancy: u64 = self.relays.iter().map(|r| r.occupancy).sum();
        let max_relay = self.relays.iter().map(|r| r.occupancy).max().unwrap_or(0);
        let pending: u64 = self.clients.iter().map(|c| c.outbox.len() as u64).sum();
        self.c.samples.push(Sample {
            t_s: self.now as f64 / 1e6,
            online_clients: online,
            relays_up,
            mailbox_total: occupancy,
            mailbox_max_relay: max_relay,
            outbox_pending: pending,
            messages_sent: self.msgs.len() as u64,
            connections_per_host: None,
            connections_opened: None,
            rss_bytes: None,
        });
        let every = self.sc.metrics.sample_every.micros();
        self.at(every, Ev::Sample);
    }
}
