//! Sending: the outbox, connections (direct, relayed through a circuit, upgraded by hole punching),
//! direct delivery with the patience rule, deposits on the recipient's relays, receipts, retries
//! with backoff, and applying a delivery at the recipient (dedup by message id).
//!
//! This follows "Sending through relays" in docs/PROTOCOL.md: a device that is not connected gets
//! the message deposited at once while a dial runs in the background; a connected one gets it
//! directly, and if no ack comes within the patience (5 s) the message is deposited and the device
//! counts as away for 60 s. An outbox entry leaves on the recipient's ack or one custody receipt.

use super::event::{Ev, Path};
use super::kad::LookupKind;
use super::{
    Conn, Delivery, DeliveryId, MAX_CONNS, MAX_OUTBOX, Message, MsgId, NEVER, NONE, NodeId, Proto, Time, World, flag,
    wire,
};
use crate::trace::TraceEvent;

impl World<'_> {
    pub(super) fn send_direct(&mut self, ci: usize, to: NodeId, size: u32) {
        let from = self.clients[ci].node;
        let m = self.msgs.len() as MsgId;
        let d = self.deliveries.len() as DeliveryId;
        self.msgs.push(Message {
            sender: from,
            group: NONE,
            sender_pos: NONE,
            size,
            first: d,
            count: 1,
            sent: self.now,
            acked: false,
            done: false,
            inflight: 0,
            attempt: 0,
            relays_pending: 0,
            group_index: NEVER,
            held: false,
        });
        self.push_delivery(m, to);
        self.trace(TraceEvent::Sent {
            msg: m,
            from,
            to,
            group: false,
            size,
        });
        self.outbox_push(ci, m);
        if self.convs.insert(conv_key(from, to))
            && let Some(owner) = self.client_of(to)
        {
            // The first message to a contact waits for its conversation, as in the node's
            // `new_conversation`: the contact's user record is looked up in the DHT, then a key
            // package comes from the device (over a new connection) or, if it cannot be reached,
            // from one of its relays; only then is the message (with the Welcome) sent.
            self.msgs[m as usize].held = true;
            let target = self.clients[owner].record_key;
            self.start_lookup(from, target, LookupKind::GetRecord { owner: owner as u32 }, m);
            return;
        }
        self.pump(m);
    }

    /// The record lookup of a first message's conversation ended: fetch a key package.
    pub(super) fn setup_after_lookup(&mut self, m: MsgId) {
        let msg = &self.msgs[m as usize];
        let (sender, to) = (msg.sender, self.deliveries[msg.first as usize].recipient);
        let Some(ci) = self.client_of(sender) else { return };
        if msg.done || !self.nodes[sender as usize].online {
            self.msgs[m as usize].held = false;
            return;
        }
        let session = self.nodes[sender as usize].session;
        let rtts = u64::from(self.sc.protocol.connect_rtts);
        let usable = self.usable_conn(ci, to).is_some();
        let dial = if usable { None } else { self.maybe_dial(ci, to) };
        let delay = match dial {
            // The request rides the connection the dial opens, which then stays.
            Some(connect) => connect + self.round_trip(sender, to),
            None if usable => self.round_trip(sender, to),
            None => {
                let relays = self
                    .client_of(to)
                    .map(|rc| self.clients[rc].home.clone())
                    .unwrap_or_default();
                match relays
                    .into_iter()
                    .find(|r| self.reachable(sender, *r) && self.relay_epoch(*r).is_some())
                {
                    Some(r) => (rtts + 1) * self.round_trip(sender, r),
                    None => self.sc.protocol.request_timeout.micros(),
                }
            }
        };
        self.at(delay.max(1), Ev::SetupDone { m, session });
    }

    pub(super) fn on_setup_done(&mut self, m: MsgId, session: u32) {
        self.msgs[m as usize].held = false;
        let sender = self.msgs[m as usize].sender;
        if self.nodes[sender as usize].session == session {
            self.pump(m);
        }
    }

    pub(super) fn send_group(&mut self, ci: usize, g: u32, size: u32) {
        let from = self.clients[ci].node;
        let m = self.msgs.len() as MsgId;
        let first = self.deliveries.len() as DeliveryId;
        let members = self.groups[g as usize].members.clone();
        let sender_pos = members.iter().position(|n| *n == from).unwrap_or(0) as u32;
        for &member in members.iter().filter(|n| **n != from) {
            self.push_delivery(m, member);
        }
        let n_relays = self.groups[g as usize].relays.len().min(8);
        self.msgs.push(Message {
            sender: from,
            group: g,
            sender_pos,
            size,
            first,
            count: members.len() as u32 - 1,
            sent: self.now,
            acked: false,
            done: false,
            inflight: 0,
            attempt: 0,
            relays_pending: ((1u16 << n_relays) - 1) as u8,
            group_index: NEVER,
            held: false,
        });
        self.trace(TraceEvent::Sent {
            msg: m,
            from,
            to: g,
            group: true,
            size,
        });
        self.outbox_push(ci, m);
        // Pushed directly to members over connections believed up; the group inbox covers the rest.
        let bytes = u64::from(size) + wire::ENVELOPE_OVERHEAD;
        for (pos, &member) in members.iter().enumerate() {
            if member == from {
                continue;
            }
            let Some(idx) = self.usable_conn(ci, member) else {
                continue;
            };
            let conn = self.clients[ci].conns[idx];
            self.clients[ci].conns[idx].last_used = self.now;
            if self.conn_alive(from, &conn) && !self.lost() {
                let lat = self.conn_transfer(from, &conn, bytes);
                let d = self.group_delivery(m, pos as u32);
                self.at(
                    lat,
                    Ev::GroupArrive {
                        d,
                        session: conn.peer_session,
                        path: conn.path,
                    },
                );
            }
        }
        self.pump(m);
    }

    fn push_delivery(&mut self, m: MsgId, to: NodeId) {
        let d = self.deliveries.len() as DeliveryId;
        let mut del = Delivery::new(m, to);
        if let Some(rc) = self.client_of(to) {
            if self.nodes[to as usize].online {
                del.ready = self.now;
                self.note_ready(rc, d);
            } else {
                self.clients[rc].waiting.push(d);
            }
        }
        self.deliveries.push(del);
    }

    /// Remembers a ready delivery, so that a departure within the deadline can be noted.
    pub(super) fn note_ready(&mut self, rc: usize, d: DeliveryId) {
        let recent = &mut self.clients[rc].recent;
        if recent.len() >= 64 {
            let horizon = self.now.saturating_sub(self.sc.metrics.deadline.micros());
            let dels = &self.deliveries;
            recent.retain(|x| {
                dels.get(*x as usize)
                    .is_none_or(|del| del.delivered == NEVER && del.ready >= horizon)
            });
        }
        recent.push(d);
    }

    /// The delivery of group message `m` for the member at `pos` in the group's member list.
    pub(super) fn group_delivery(&self, m: MsgId, pos: u32) -> DeliveryId {
        let msg = &self.msgs[m as usize];
        msg.first + pos - u32::from(pos > msg.sender_pos)
    }

    fn outbox_push(&mut self, ci: usize, m: MsgId) {
        if self.clients[ci].outbox.len() >= MAX_OUTBOX {
            let old = self.clients[ci].outbox.remove(0);
            let msg = &mut self.msgs[old as usize];
            msg.done = true;
            let (first, count) = (msg.first, msg.count);
            for d in first..first + count {
                self.deliveries[d as usize].flags |= flag::DROPPED_FROM_OUTBOX;
            }
            self.c.outbox_overflow += 1;
        }
        self.clients[ci].outbox.push(m);
    }

    fn outbox_remove(&mut self, m: MsgId) {
        let msg = &mut self.msgs[m as usize];
        msg.done = true;
        msg.inflight = 0;
        let sender = msg.sender;
        if let Some(ci) = self.client_of(sender)
            && let Some(pos) = self.clients[ci].outbox.iter().position(|x| *x == m)
        {
            self.clients[ci].outbox.remove(pos);
        }
    }

    /// Sends or deposits an outbox entry that has nothing in flight.
    pub(super) fn pump(&mut self, m: MsgId) {
        let msg = &self.msgs[m as usize];
        if msg.done || msg.inflight > 0 || msg.held {
            return;
        }
        let sender = msg.sender;
        let Some(ci) = self.client_of(sender) else { return };
        if !self.nodes[sender as usize].online {
            return;
        }
        if msg.group != NONE {
            self.deposit(m);
            return;
        }
        let to = self.deliveries[msg.first as usize].recipient;
        let Some(idx) = self.usable_conn(ci, to) else {
            self.deposit(m);
            self.maybe_dial(ci, to);
            return;
        };
        let conn = self.clients[ci].conns[idx];
        self.clients[ci].conns[idx].last_used = self.now;
        let session = self.nodes[sender as usize].session;
        self.msgs[m as usize].inflight = 1;
        if self.conn_alive(sender, &conn) && !self.lost() {
            let bytes = u64::from(self.msgs[m as usize].size) + wire::ENVELOPE_OVERHEAD;
            let lat = self.conn_transfer(sender, &conn, bytes);
            let d = self.msgs[m as usize].first;
            self.at(
                lat,
                Ev::DirectArrive {
                    d,
                    peer_session: conn.peer_session,
                    path: conn.path,
                },
            );
        } else {
            self.at(self.sc.protocol.direct_patience.micros(), Ev::DirectFail { m, session });
        }
    }

    /// Timing and byte counts of `bytes` over a connection.
    fn conn_transfer(&mut self, from: NodeId, conn: &Conn, bytes: u64) -> Time {
        match conn.path {
            Path::Relayed => {
                let a = self.transfer(from, conn.relay, Proto::Circuit, bytes);
                let b = self.transfer(conn.relay, conn.peer, Proto::Circuit, bytes);
                // The ends count it as delivery traffic; the relay as circuit traffic.
                for n in [from, conn.peer] {
                    let c = &mut self.nodes[n as usize].bytes;
                    c[Proto::Circuit as usize] -= bytes;
                    c[Proto::Deliver as usize] += bytes;
                }
                a + b
            }
            _ => self.transfer(from, conn.peer, Proto::Deliver, bytes),
        }
    }

    /// Deposits `m` on every relay that still owes a receipt.
    fn deposit(&mut self, m: MsgId) {
        let msg = &self.msgs[m as usize];
        let sender = msg.sender;
        let session = self.nodes[sender as usize].session;
        let bytes = u64::from(msg.size) + wire::ENVELOPE_OVERHEAD + wire::DEPOSIT_OVERHEAD;
        let targets: Vec<NodeId> = if msg.group != NONE {
            let pending = msg.relays_pending;
            self.groups[msg.group as usize]
                .relays
                .iter()
                .enumerate()
                .filter(|(i, _)| *i < 8 && pending & (1 << i) != 0)
                .map(|(_, r)| *r)
                .collect()
        } else {
            let to = self.deliveries[msg.first as usize].recipient;
            self.client_of(to)
                .map(|rc| self.clients[rc].home.clone())
                .unwrap_or_default()
        };
        let own_home = self
            .client_of(sender)
            .map(|ci| self.clients[ci].home.clone())
            .unwrap_or_default();
        for relay in targets {
            self.msgs[m as usize].inflight += 1;
            if self.reachable(sender, relay) && !self.lost() {
                let setup = if own_home.contains(&relay) {
                    0
                } else {
                    u64::from(self.sc.protocol.connect_rtts) * self.round_trip(sender, relay)
                };
                let lat = setup + self.transfer(sender, relay, Proto::Mailbox, bytes);
                self.at(lat, Ev::DepositArrive { m, relay, session });
            } else {
                self.at(
                    self.sc.protocol.request_timeout.micros(),
                    Ev::DepositFail { m, session },
                );
            }
        }
    }

    pub(super) fn on_direct_arrive(&mut self, d: DeliveryId, peer_session: u32, path: Path) {
        let del = &self.deliveries[d as usize];
        let (to, m) = (del.recipient, del.msg);
        let sender = self.msgs[m as usize].sender;
        let sender_session = self.nodes[sender as usize].session;
        let to_node = &self.nodes[to as usize];
        if to_node.online && to_node.session == peer_session && !self.cut(sender, to) {
            self.apply(d, to, path);
            let lat = self.transfer(to, sender, Proto::Deliver, wire::ACK);
            self.at(
                lat,
                Ev::DirectAck {
                    d,
                    session: sender_session,
                },
            );
        } else {
            self.at(
                self.sc.protocol.direct_patience.micros(),
                Ev::DirectFail {
                    m,
                    session: sender_session,
                },
            );
        }
    }

    pub(super) fn on_direct_ack(&mut self, d: DeliveryId, session: u32) {
        let m = self.deliveries[d as usize].msg;
        let sender = self.msgs[m as usize].sender;
        if self.live_client(sender, session).is_none() || self.msgs[m as usize].done {
            return;
        }
        self.msgs[m as usize].acked = true;
        self.outbox_remove(m);
    }

    pub(super) fn on_direct_fail(&mut self, m: MsgId, session: u32) {
        let sender = self.msgs[m as usize].sender;
        let Some(ci) = self.live_client(sender, session) else {
            return;
        };
        if self.msgs[m as usize].done {
            return;
        }
        self.msgs[m as usize].inflight = 0;
        let to = self.deliveries[self.msgs[m as usize].first as usize].recipient;
        let away = self.now + self.sc.protocol.away_for.micros();
        if let Some(c) = self.clients[ci].conns.iter_mut().find(|c| c.peer == to) {
            c.away_until = away;
            c.connected = false;
        }
        self.deposit(m);
    }

    pub(super) fn on_deposit_arrive(&mut self, m: MsgId, relay: NodeId, session: u32) {
        match self.relay_of(relay) {
            Some(ri) if self.relays[ri].up => {
                let (epoch, commit) = (self.relays[ri].epoch, self.relays[ri].commit_us);
                self.at(
                    commit,
                    Ev::Commit {
                        m,
                        relay,
                        epoch,
                        session,
                    },
                );
            }
            _ => self.at(
                self.sc.protocol.request_timeout.micros(),
                Ev::DepositFail { m, session },
            ),
        }
    }

    pub(super) fn on_receipt(&mut self, m: MsgId, relay: NodeId, session: u32) {
        let sender = self.msgs[m as usize].sender;
        if self.live_client(sender, session).is_none() {
            return;
        }
        let msg = &mut self.msgs[m as usize];
        msg.inflight = msg.inflight.saturating_sub(1);
        if msg.done {
            return;
        }
        if msg.group == NONE {
            msg.acked = true;
            let d = msg.first;
            self.outbox_remove(m);
            self.check_loss(d);
            return;
        }
        let g = msg.group as usize;
        let relays = &self.groups[g].relays;
        if let Some(i) = relays.iter().position(|r| *r == relay) {
            msg.relays_pending &= !(1u8 << i.min(7));
            if i == 0 {
                msg.acked = true;
            }
        }
        let (acked, pending, inflight, first, count) =
            (msg.acked, msg.relays_pending, msg.inflight, msg.first, msg.count);
        if acked {
            for d in first..first + count {
                self.check_loss(d);
            }
        }
        if pending == 0 {
            self.outbox_remove(m);
        } else if inflight == 0 {
            self.schedule_retry(m, session);
        }
    }

    pub(super) fn on_deposit_fail(&mut self, m: MsgId, session: u32) {
        let sender = self.msgs[m as usize].sender;
        if self.live_client(sender, session).is_none() {
            return;
        }
        let msg = &mut self.msgs[m as usize];
        msg.inflight = msg.inflight.saturating_sub(1);
        if msg.inflight == 0 && !msg.done {
            self.schedule_retry(m, session);
        }
    }

    fn schedule_retry(&mut self, m: MsgId, session: u32) {
        let p = &self.sc.protocol;
        let msg = &mut self.msgs[m as usize];
        let delay = p
            .retry_initial
            .micros()
            .saturating_mul(1u64 << msg.attempt.min(40))
            .min(p.retry_max.micros());
        msg.attempt = msg.attempt.saturating_add(1);
        self.at(delay, Ev::Retry { m, session });
    }

    pub(super) fn on_retry(&mut self, m: MsgId, session: u32) {
        if self.live_client(self.msgs[m as usize].sender, session).is_some() {
            self.pump(m);
        }
    }

    /// Applies a delivery at `node`: shown once, duplicates dropped by message id.
    pub(super) fn apply(&mut self, d: DeliveryId, node: NodeId, path: Path) -> bool {
        let del = &self.deliveries[d as usize];
        if del.recipient != node {
            let detail = format!(
                "delivery {d} (message {}) for node {} reached node {node}",
                del.msg, del.recipient
            );
            self.violation("delivered to a non-recipient", detail);
            return false;
        }
        if del.delivered != NEVER {
            return false;
        }
        let del = &mut self.deliveries[d as usize];
        del.delivered = self.now;
        del.path = path as u8;
        del.displays = del.displays.saturating_add(1);
        if del.displays > 1 {
            let detail = format!(
                "delivery {d} (message {}) shown {} times at node {node}",
                del.msg, del.displays
            );
            self.violation("message displayed twice", detail);
        }
        self.trace(TraceEvent::Delivered {
            delivery: d,
            node,
            path,
        });
        let m = self.deliveries[d as usize].msg as usize;
        if self.msgs[m].group == NONE {
            self.maybe_reply(node, self.msgs[m].sender);
        }
        true
    }

    // ---- connections ----

    /// A connection from client `ci` to `peer` that the client believes is up and may use.
    pub(super) fn usable_conn(&self, ci: usize, peer: NodeId) -> Option<usize> {
        let c = &self.clients[ci];
        let me = &self.nodes[c.node as usize];
        let idx = c.conns.iter().position(|x| x.peer == peer)?;
        let conn = &c.conns[idx];
        let p = &self.nodes[peer as usize];
        // Messages keep a connection for `conversation_keep_alive`, anything else for the idle
        // timeout; deliveries are all this model sends over them.
        let (idle, kept) = (
            &self.sc.protocol.idle_timeout,
            &self.sc.protocol.conversation_keep_alive,
        );
        let believed = conn.connected
            && conn.my_session == me.session
            && self.now < conn.expires
            && self.now.saturating_sub(conn.last_used) < idle.micros().max(kept.micros())
            && p.session == conn.peer_session
            && (p.online || p.silent_leave)
            && (conn.path != Path::Relayed || self.relay_epoch(conn.relay) == Some(conn.relay_epoch));
        (believed && conn.away_until <= self.now).then_some(idx)
    }

    fn relay_epoch(&self, relay: NodeId) -> Option<u32> {
        let ri = self.relay_of(relay)?;
        self.relays[ri].up.then_some(self.relays[ri].epoch)
    }

    /// Whether the connection really carries traffic now.
    fn conn_alive(&self, me: NodeId, conn: &Conn) -> bool {
        let p = &self.nodes[conn.peer as usize];
        if !p.online || p.session != conn.peer_session {
            return false;
        }
        match conn.path {
            Path::Relayed => {
                self.relay_epoch(conn.relay) == Some(conn.relay_epoch)
                    && !self.cut(me, conn.relay)
                    && !self.cut(conn.relay, conn.peer)
            }
            _ => !self.cut(me, conn.peer),
        }
    }

    /// Starts a background dial to `to` unless one is under way or a connection is believed up.
    /// Dials `to` unless a dial runs or it is known to be away; returns the time until the new
    /// connection is up, if one was started and can succeed.
    fn maybe_dial(&mut self, ci: usize, to: NodeId) -> Option<Time> {
        let from = self.clients[ci].node;
        if let Some(c) = self.clients[ci].conns.iter().find(|c| c.peer == to)
            && (c.dialing_until > self.now || (c.connected && c.away_until > self.now))
        {
            return None;
        }
        if self.nodes[to as usize].dht_server {
            // Addresses of a publicly reachable device come from peer routing (FIND_NODE).
            let target = self.nodes[to as usize].key;
            self.start_lookup(from, target, LookupKind::FindNode { target: to }, NONE);
        }
        let sessions = (self.nodes[from as usize].session, self.nodes[to as usize].session);
        let timeout = self.sc.protocol.request_timeout.micros();
        let plan = self.dial_plan(from, to);
        let until = self.now + plan.map_or(timeout, |(_, _, t)| t + 1);
        self.upsert_conn(ci, to, |c| c.dialing_until = until);
        let (path, relay, t) = plan?;
        self.count_bytes(from, to, Proto::Deliver, 2 * wire::HANDSHAKE);
        self.at(
            t,
            Ev::DialDone {
                from,
                to,
                path,
                relay,
                sessions,
            },
        );
        Some(t)
    }

    /// How a dial from `from` to `to` would go: the path, the relay of a circuit, and the time
    /// until the connection is up; `None` if it cannot succeed now.
    fn dial_plan(&mut self, from: NodeId, to: NodeId) -> Option<(Path, NodeId, Time)> {
        let rtts = u64::from(self.sc.protocol.connect_rtts);
        if !self.reachable(from, to) {
            None
        } else if self.direct_dialable(from, to) {
            let extra = if self.nodes[to as usize].nat == super::Nat::Public {
                0
            } else {
                1
            };
            Some((Path::Direct, NONE, (rtts + extra) * self.round_trip(from, to)))
        } else {
            let relays = self
                .client_of(to)
                .map(|rc| self.clients[rc].home.clone())
                .unwrap_or_default();
            let via = relays
                .into_iter()
                .find(|r| self.reachable(from, *r) && self.reachable(*r, to));
            via.map(|r| {
                let rtt = self.round_trip(from, r) + self.round_trip(r, to);
                (Path::Relayed, r, rtts * rtt)
            })
        }
    }

    /// Finds or makes the entry for `peer`, evicting the least recently used beyond the cap.
    fn upsert_conn(&mut self, ci: usize, peer: NodeId, f: impl FnOnce(&mut Conn)) {
        let conns = &mut self.clients[ci].conns;
        let idx = match conns.iter().position(|c| c.peer == peer) {
            Some(i) => i,
            None => {
                if conns.len() >= MAX_CONNS
                    && let Some((oldest, _)) = conns.iter().enumerate().min_by_key(|(_, c)| c.last_used)
                {
                    conns.swap_remove(oldest);
                }
                conns.push(Conn {
                    peer,
                    path: Path::Direct,
                    relay: NONE,
                    relay_epoch: 0,
                    peer_session: 0,
                    my_session: 0,
                    connected: false,
                    last_used: self.now,
                    expires: NEVER,
                    away_until: 0,
                    dialing_until: 0,
                });
                conns.len() - 1
            }
        };
        f(&mut conns[idx]);
    }

    pub(super) fn on_dial_done(&mut self, from: NodeId, to: NodeId, path: Path, relay: NodeId, sessions: (u32, u32)) {
        let (Some(a), Some(b)) = (self.live_client(from, sessions.0), self.live_client(to, sessions.1)) else {
            return;
        };
        let relay_epoch = if path == Path::Relayed {
            match self.relay_epoch(relay) {
                Some(e) if !self.cut(from, relay) && !self.cut(relay, to) => e,
                _ => return,
            }
        } else if self.cut(from, to) {
            return;
        } else {
            0
        };
        let now = self.now;
        let expires = if path == Path::Relayed {
            now + self.sc.protocol.circuit_max_duration.micros()
        } else {
            NEVER
        };
        for (ci, peer, my, theirs) in [(a, to, sessions.0, sessions.1), (b, from, sessions.1, sessions.0)] {
            self.upsert_conn(ci, peer, |c| {
                *c = Conn {
                    peer,
                    path,
                    relay,
                    relay_epoch,
                    peer_session: theirs,
                    my_session: my,
                    connected: true,
                    last_used: now,
                    expires,
                    away_until: 0,
                    dialing_until: 0,
                };
            });
        }
        if path == Path::Relayed && self.hole_punch(from, to) {
            let t = 2 * self.round_trip(from, to);
            self.at(t, Ev::HolePunched { from, to, sessions });
        }
        self.flush_to(a, to);
        self.flush_to(b, from);
    }

    pub(super) fn on_hole_punched(&mut self, from: NodeId, to: NodeId, sessions: (u32, u32)) {
        let (Some(a), Some(b)) = (self.live_client(from, sessions.0), self.live_client(to, sessions.1)) else {
            return;
        };
        if self.cut(from, to) {
            return;
        }
        for (ci, peer) in [(a, to), (b, from)] {
            if let Some(c) = self.clients[ci]
                .conns
                .iter_mut()
                .find(|c| c.peer == peer && c.connected)
            {
                c.path = Path::Direct;
                c.relay = NONE;
                c.expires = NEVER;
            }
        }
    }

    /// A new connection resets the backoff of everything queued for that peer.
    fn flush_to(&mut self, ci: usize, peer: NodeId) {
        let queued: Vec<MsgId> = self.clients[ci]
            .outbox
            .iter()
            .copied()
            .filter(|m| {
                let msg = &self.msgs[*m as usize];
                msg.group == NONE && msg.inflight == 0 && self.deliveries[msg.first as usize].recipient == peer
            })
            .collect();
        for m in queued {
            self.msgs[m as usize].attempt = 0;
            self.pump(m);
        }
    }
}

impl Delivery {
    fn new(msg: MsgId, recipient: NodeId) -> Self {
        Delivery {
            msg,
            recipient,
            ready: NEVER,
            delivered: NEVER,
            path: u8::MAX,
            copies: 0,
            flags: 0,
            displays: 0,
        }
    }
}

/// The key of the one-to-one conversation between two nodes (either order).
pub(super) fn conv_key(a: NodeId, b: NodeId) -> u64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    (u64::from(lo) << 32) | u64::from(hi)
}
