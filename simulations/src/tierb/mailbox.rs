//! Relays: durable commits and custody receipts, pushes to subscribed owners, fetch-and-ack on
//! reconnect and every mailbox round, group inboxes read by long polls, adversarial relays, relay
//! crashes and restarts, retention, and partitions.
//!
//! A deposit is committed `commit_ms` after it arrives and only then receipted; a crash in between
//! voids the commit (no receipt, the sender retries), so committed mail survives a crash
//! (`data = "kept"`) and is gone only with the disk (`data = "lost"`).

use rand::seq::SliceRandom;

use super::event::{Ev, Path};
use super::{Adv, DeliveryId, MsgId, NEVER, NONE, NodeId, Proto, Time, World, flag, wire};
use crate::scenario::{DataFate, Fault};
use crate::trace::TraceEvent;

impl World<'_> {
    pub(super) fn on_commit(&mut self, m: MsgId, relay: NodeId, epoch: u32, session: u32) {
        let Some(ri) = self.relay_of(relay) else { return };
        if !self.relays[ri].up || self.relays[ri].epoch != epoch {
            self.at(
                self.sc.protocol.request_timeout.micros(),
                super::Ev::DepositFail { m, session },
            );
            return;
        }
        let adv = self.relays[ri].adv;
        let msg = &self.msgs[m as usize];
        let (group, first, count, sender) = (msg.group, msg.first, msg.count, msg.sender);
        if group == NONE {
            let d = first;
            let to = self.deliveries[d as usize].recipient;
            let slot = self
                .client_of(to)
                .and_then(|rc| self.clients[rc].home.iter().position(|h| *h == relay));
            match (adv, slot, self.client_of(to)) {
                (Adv::Honest, Some(slot), Some(rc)) => {
                    self.clients[rc].inbox[slot].push_back((d, self.now));
                    let del = &mut self.deliveries[d as usize];
                    del.copies = del.copies.saturating_add(1);
                    del.flags |= flag::COMMITTED_HONEST;
                    self.relays[ri].occupancy += 1;
                    self.maybe_push(rc, slot, d);
                }
                (Adv::Withholding, _, _) => {
                    self.deliveries[d as usize].flags |= flag::COMMITTED_ADV;
                    self.relays[ri].occupancy += 1;
                }
                (Adv::Dropping, _, _) => self.deliveries[d as usize].flags |= flag::COMMITTED_ADV,
                _ => {}
            }
        } else if self.groups[group as usize].relays.first() == Some(&relay) {
            match adv {
                Adv::Honest => {
                    if self.msgs[m as usize].group_index == NEVER {
                        let g = &mut self.groups[group as usize];
                        let index = g.base + g.inbox.len() as u64;
                        g.inbox.push_back((m, self.now));
                        self.msgs[m as usize].group_index = index;
                        self.relays[ri].occupancy += 1;
                        for d in first..first + count {
                            self.deliveries[d as usize].flags |= flag::COMMITTED_HONEST;
                        }
                        self.wake_group(group, m, relay);
                    }
                }
                Adv::Dropping | Adv::Withholding => {
                    for d in first..first + count {
                        self.deliveries[d as usize].flags |= flag::COMMITTED_ADV;
                    }
                }
            }
        }
        if self.reachable(relay, sender) && !self.lost() {
            let lat = self.transfer(relay, sender, Proto::Mailbox, wire::RECEIPT);
            self.at(lat, Ev::Receipt { m, relay, session });
        } else {
            self.at(
                self.sc.protocol.request_timeout.micros(),
                Ev::DepositFail { m, session },
            );
        }
    }

    /// Whether client `rc` holds a live subscription on its home relay `slot`.
    fn subscribed(&self, rc: usize, slot: usize) -> bool {
        let c = &self.clients[rc];
        let node = &self.nodes[c.node as usize];
        let relay = c.home[slot];
        let Some(ri) = self.relay_of(relay) else { return false };
        node.online
            && self.relays[ri].up
            && c.subs[slot] == (self.relays[ri].epoch, node.session)
            && !self.cut(relay, c.node)
    }

    fn maybe_push(&mut self, rc: usize, slot: usize, d: DeliveryId) {
        if !self.subscribed(rc, slot) {
            return;
        }
        let (client, relay) = (self.clients[rc].node, self.clients[rc].home[slot]);
        let Some(ri) = self.relay_of(relay) else { return };
        let epoch = self.relays[ri].epoch;
        let session = self.nodes[client as usize].session;
        let size = u64::from(self.msgs[self.deliveries[d as usize].msg as usize].size);
        let lat = self.transfer(relay, client, Proto::Mailbox, size + wire::ENVELOPE_OVERHEAD);
        self.at(
            lat,
            Ev::Push {
                d,
                relay,
                epoch,
                session,
            },
        );
    }

    pub(super) fn on_push(&mut self, d: DeliveryId, relay: NodeId, epoch: u32, session: u32) {
        let client = self.deliveries[d as usize].recipient;
        let Some(rc) = self.live_client(client, session) else {
            return;
        };
        let Some(slot) = self.clients[rc].home.iter().position(|h| *h == relay) else {
            return;
        };
        let Some(ri) = self.relay_of(relay) else { return };
        if !self.relays[ri].up || self.relays[ri].epoch != epoch || self.cut(relay, client) {
            // The push failed: the relay drops the subscription; the owner fetches next round.
            self.clients[rc].subs[slot] = (NONE, NONE);
            self.schedule_tick(rc, slot);
            return;
        }
        self.apply(d, client, Path::Mailbox);
        self.count_bytes(client, relay, Proto::Mailbox, wire::ACK);
        if self.take_inbox_entry(rc, slot, d) {
            self.relays[ri].occupancy = self.relays[ri].occupancy.saturating_sub(1);
        }
    }

    /// Removes one copy of `d` from the inbox (after the owner's ack).
    fn take_inbox_entry(&mut self, rc: usize, slot: usize, d: DeliveryId) -> bool {
        let inbox = &mut self.clients[rc].inbox[slot];
        let Some(pos) = inbox.iter().position(|(x, _)| *x == d) else {
            return false;
        };
        inbox.remove(pos);
        let del = &mut self.deliveries[d as usize];
        del.copies = del.copies.saturating_sub(1);
        true
    }

    /// Fetches the next page from home relay `slot`, or waits for the next round if it is out of reach.
    pub(super) fn start_fetch(&mut self, rc: usize, slot: usize) {
        let (client, relay) = (self.clients[rc].node, self.clients[rc].home[slot]);
        let up = self
            .relay_of(relay)
            .map(|ri| (self.relays[ri].up, self.relays[ri].epoch));
        match up {
            Some((true, epoch)) if self.reachable(client, relay) && !self.lost() => {
                let page = self.sc.protocol.fetch_page as usize;
                let bytes: u64 = self.clients[rc].inbox[slot]
                    .iter()
                    .take(page)
                    .map(|(d, _)| {
                        u64::from(self.msgs[self.deliveries[*d as usize].msg as usize].size) + wire::ENVELOPE_OVERHEAD
                    })
                    .sum();
                let setup = u64::from(self.sc.protocol.connect_rtts) * self.round_trip(client, relay);
                let ask = self.transfer(client, relay, Proto::Mailbox, wire::AUTH_REQUEST);
                let answer = self.transfer(relay, client, Proto::Mailbox, bytes + wire::ACK);
                let session = self.nodes[client as usize].session;
                self.at(
                    setup + ask + answer,
                    Ev::FetchReply {
                        client,
                        slot: slot as u8,
                        session,
                        epoch,
                    },
                );
            }
            _ => self.schedule_tick(rc, slot),
        }
    }

    pub(super) fn on_fetch_reply(&mut self, client: NodeId, slot: u8, session: u32, epoch: u32) {
        let Some(rc) = self.live_client(client, session) else {
            return;
        };
        let slot = usize::from(slot);
        let relay = self.clients[rc].home[slot];
        let Some(ri) = self.relay_of(relay) else { return };
        if !self.relays[ri].up || self.relays[ri].epoch != epoch {
            self.schedule_tick(rc, slot);
            return;
        }
        let page = self.sc.protocol.fetch_page as usize;
        let n = self.clients[rc].inbox[slot].len().min(page);
        let mut fresh = 0u32;
        for _ in 0..n {
            let Some((d, _)) = self.clients[rc].inbox[slot].pop_front() else {
                break;
            };
            let del = &mut self.deliveries[d as usize];
            del.copies = del.copies.saturating_sub(1);
            if self.apply(d, client, Path::Mailbox) {
                fresh += 1;
            }
        }
        self.relays[ri].occupancy = self.relays[ri].occupancy.saturating_sub(n as u64);
        if n > 0 {
            self.count_bytes(client, relay, Proto::Mailbox, wire::AUTH_REQUEST);
        }
        if let Some(dr) = self.clients[rc].drain.as_mut() {
            dr.mail += fresh;
        }
        if !self.clients[rc].inbox[slot].is_empty() {
            self.start_fetch(rc, slot);
            return;
        }
        self.clients[rc].subs[slot] = (epoch, session);
        let now = self.now;
        let done = match self.clients[rc].drain.as_mut() {
            Some(dr) => {
                dr.left = dr.left.saturating_sub(1);
                (dr.left == 0).then_some((dr.start, dr.mail))
            }
            None => None,
        };
        if let Some((start, mail)) = done {
            self.clients[rc].drain = None;
            if mail > 0 {
                self.c.reconnects_with_mail += 1;
                self.c.drains_ms.push(((now - start) as f64 / 1_000.0) as f32);
            }
        }
    }

    /// The next mailbox round of client `rc` after now
    /// ([`crate::scenario::ProtocolParams::unsubscribed_retry`]).
    pub(super) fn schedule_tick(&mut self, rc: usize, slot: usize) {
        let client = self.clients[rc].node;
        if !self.nodes[client as usize].online {
            return;
        }
        let t = self.next_round(rc);
        let session = self.nodes[client as usize].session;
        self.q.push(
            t,
            Ev::Tick {
                client,
                slot: slot as u8,
                session,
            },
        );
    }

    fn next_round(&self, rc: usize) -> Time {
        let poll = self.sc.protocol.unsubscribed_retry().micros().max(1);
        let phase = self.clients[rc].tick_phase;
        let k = (self.now.saturating_sub(phase)) / poll + 1;
        phase + k * poll
    }

    pub(super) fn on_tick(&mut self, client: NodeId, slot: u8, session: u32) {
        let Some(rc) = self.live_client(client, session) else {
            return;
        };
        if !self.subscribed(rc, usize::from(slot)) {
            self.start_fetch(rc, usize::from(slot));
        }
    }

    // ---- groups ----

    /// Reads group membership `mi` of client `rc` from its cursor on the sequencing relay.
    pub(super) fn start_group_fetch(&mut self, rc: usize, mi: usize) {
        let client = self.clients[rc].node;
        let g = self.clients[rc].groups[mi].group as usize;
        let Some(&relay) = self.groups[g].relays.first() else {
            return;
        };
        let up = self.relay_of(relay).is_some_and(|ri| self.relays[ri].up);
        let session = self.nodes[client as usize].session;
        if up && self.reachable(client, relay) && !self.lost() {
            let cursor = self.clients[rc].groups[mi].cursor.max(self.groups[g].base);
            let from = (cursor - self.groups[g].base) as usize;
            let bytes: u64 = self.groups[g]
                .inbox
                .iter()
                .skip(from)
                .map(|(m, _)| u64::from(self.msgs[*m as usize].size) + wire::ENVELOPE_OVERHEAD)
                .sum();
            let setup = u64::from(self.sc.protocol.connect_rtts) * self.round_trip(client, relay);
            let ask = self.transfer(client, relay, Proto::Mailbox, wire::AUTH_REQUEST);
            let answer = self.transfer(relay, client, Proto::Mailbox, bytes + wire::ACK);
            self.at(
                setup + ask + answer,
                Ev::GroupFetch {
                    client,
                    membership: mi as u16,
                    session,
                },
            );
        } else {
            let t = self.next_round(rc);
            self.q.push(
                t,
                Ev::GroupFetch {
                    client,
                    membership: mi as u16 | 0x8000,
                    session,
                },
            );
        }
    }

    /// A group read came back (or, with the top bit of `membership` set, it is time to retry one).
    pub(super) fn on_group_fetch(&mut self, client: NodeId, membership: u16, session: u32) {
        let Some(rc) = self.live_client(client, session) else {
            return;
        };
        let mi = usize::from(membership & 0x7fff);
        if membership & 0x8000 != 0 {
            if self.clients[rc].groups.get(mi).is_some_and(|m| m.caught_up != session) {
                self.start_group_fetch(rc, mi);
            }
            return;
        }
        let Some(mem) = self.clients[rc].groups.get(mi) else {
            return;
        };
        let (g, pos) = (mem.group as usize, mem.pos);
        let relay = self.groups[g].relays[0];
        if !self.relay_of(relay).is_some_and(|ri| self.relays[ri].up) {
            let t = self.next_round(rc);
            self.q.push(
                t,
                Ev::GroupFetch {
                    client,
                    membership: membership | 0x8000,
                    session,
                },
            );
            return;
        }
        let base = self.groups[g].base;
        let cursor = self.clients[rc].groups[mi].cursor.max(base);
        let msgs: Vec<MsgId> = self.groups[g]
            .inbox
            .iter()
            .skip((cursor - base) as usize)
            .map(|(m, _)| *m)
            .collect();
        for m in msgs {
            if self.msgs[m as usize].sender != client {
                let d = self.group_delivery(m, pos);
                self.apply(d, client, Path::Mailbox);
            }
        }
        let end = self.groups[g].base + self.groups[g].inbox.len() as u64;
        let mem = &mut self.clients[rc].groups[mi];
        mem.cursor = end;
        mem.caught_up = session;
    }

    /// The sequencing relay answers the long polls of members who are caught up.
    fn wake_group(&mut self, g: u32, m: MsgId, relay: NodeId) {
        let members = self.groups[g as usize].members.clone();
        let sender = self.msgs[m as usize].sender;
        let bytes = u64::from(self.msgs[m as usize].size) + wire::ENVELOPE_OVERHEAD;
        for (pos, member) in members.into_iter().enumerate() {
            if member == sender || !self.nodes[member as usize].online {
                continue;
            }
            let Some(rc) = self.client_of(member) else { continue };
            let session = self.nodes[member as usize].session;
            let Some(mi) = self.clients[rc].groups.iter().position(|x| x.group == g) else {
                continue;
            };
            if self.clients[rc].groups[mi].caught_up != session {
                continue;
            }
            if self.cut(relay, member) {
                self.clients[rc].groups[mi].caught_up = 0;
                self.start_group_fetch(rc, mi);
                continue;
            }
            let lat = self.transfer(relay, member, Proto::Mailbox, bytes);
            let d = self.group_delivery(m, pos as u32);
            self.at(
                lat,
                Ev::GroupArrive {
                    d,
                    session,
                    path: Path::Mailbox,
                },
            );
        }
    }

    pub(super) fn on_group_arrive(&mut self, d: DeliveryId, session: u32, path: Path) {
        let member = self.deliveries[d as usize].recipient;
        if self.live_client(member, session).is_some() {
            self.apply(d, member, path);
        }
    }

    // ---- faults ----

    pub(super) fn on_fault(&mut self, i: usize) {
        let Some(fault) = self.sc.faults.get(i) else { return };
        self.trace(TraceEvent::Fault {
            index: i as u32,
            start: true,
        });
        match fault {
            Fault::Partition(p) => {
                let pi = self.part_of_fault[i] as usize;
                self.parts[pi].active = true;
                self.parts[pi].first_delivery = self.deliveries.len() as DeliveryId;
                if let Some(heal) = p.heal {
                    self.q.push(heal.micros(), Ev::Heal(i as u16));
                }
                // Devices notice at their next mailbox round; group long polls fail at once.
                for rc in 0..self.clients.len() {
                    let node = self.clients[rc].node;
                    if !self.nodes[node as usize].online {
                        continue;
                    }
                    for slot in 0..self.clients[rc].home.len() {
                        if self.cut(node, self.clients[rc].home[slot]) {
                            // The connection to the relay dies, and the subscription with it.
                            self.clients[rc].subs[slot] = (NONE, NONE);
                            self.schedule_tick(rc, slot);
                        }
                    }
                    for mi in 0..self.clients[rc].groups.len() {
                        let g = self.clients[rc].groups[mi].group as usize;
                        if self.groups[g].relays.first().is_some_and(|r| self.cut(node, *r)) {
                            self.clients[rc].groups[mi].caught_up = 0;
                            self.start_group_fetch(rc, mi);
                        }
                    }
                }
            }
            Fault::KillRelays(k) => {
                let chosen = self.pick_relays(k.fraction);
                for ri in chosen {
                    self.kill_relay(ri, k.data == DataFate::Lost);
                    if let Some(after) = k.restart_after {
                        self.at(after.micros(), Ev::RelayBack(self.relays[ri].node));
                    }
                }
            }
            Fault::RestartRelays(r) => {
                let chosen = self.pick_relays(r.fraction);
                for ri in chosen {
                    self.kill_relay(ri, false);
                    self.at(r.downtime.micros(), Ev::RelayBack(self.relays[ri].node));
                }
            }
        }
    }

    pub(super) fn on_heal(&mut self, i: usize) {
        if let Some(&pi) = self.part_of_fault.get(i)
            && let Some(p) = self.parts.get_mut(pi as usize)
        {
            p.active = false;
            let first = p.first_delivery as usize;
            let backlog: Vec<DeliveryId> = (first..self.deliveries.len())
                .filter(|d| {
                    let del = &self.deliveries[*d];
                    let sender = self.msgs[del.msg as usize].sender;
                    del.delivered == NEVER
                        && self.nodes[del.recipient as usize].online
                        && self.nodes[sender as usize].online
                })
                .map(|d| d as DeliveryId)
                .collect();
            self.parts[pi as usize].backlog = backlog;
            self.trace(TraceEvent::Fault {
                index: i as u32,
                start: false,
            });
        }
    }

    /// A deterministic choice of `fraction` of the relays that are up.
    fn pick_relays(&mut self, fraction: f64) -> Vec<usize> {
        let mut up: Vec<usize> = (0..self.relays.len()).filter(|ri| self.relays[*ri].up).collect();
        up.shuffle(&mut self.rng_faults);
        let n = (fraction * self.relays.len() as f64).round() as usize;
        up.truncate(n);
        up.sort_unstable();
        up
    }

    fn kill_relay(&mut self, ri: usize, data_lost: bool) {
        let relay = self.relays[ri].node;
        self.relays[ri].up = false;
        self.relays[ri].epoch += 1;
        self.set_online(relay, false);
        if data_lost {
            self.relays[ri].destroyed = true;
            self.relays[ri].occupancy = 0;
            for (rc, slot) in self.relays[ri].homed.clone() {
                let lost: Vec<DeliveryId> = self.clients[rc as usize].inbox[usize::from(slot)]
                    .drain(..)
                    .map(|(d, _)| d)
                    .collect();
                for d in lost {
                    let del = &mut self.deliveries[d as usize];
                    del.copies = del.copies.saturating_sub(1);
                    del.flags |= flag::DESTROYED;
                    self.check_loss(d);
                }
            }
            for g in self.relays[ri].first_of.clone() {
                let group = &mut self.groups[g as usize];
                let gone: Vec<MsgId> = group.inbox.drain(..).map(|(m, _)| m).collect();
                group.base += gone.len() as u64;
                for m in gone {
                    self.mark_group_gone(m, flag::DESTROYED);
                }
            }
        }
        // Owners notice the closed connection and retry at their next round.
        for (rc, slot) in self.relays[ri].homed.clone() {
            self.schedule_tick(rc as usize, usize::from(slot));
        }
        self.requeue_group_readers(ri);
    }

    pub(super) fn on_relay_back(&mut self, relay: NodeId) {
        let Some(ri) = self.relay_of(relay) else { return };
        self.relays[ri].up = true;
        self.set_online(relay, true);
        self.trace(TraceEvent::RelayBack { node: relay });
        for (rc, slot) in self.relays[ri].homed.clone() {
            self.schedule_tick(rc as usize, usize::from(slot));
        }
        self.requeue_group_readers(ri);
    }

    /// Members of the groups sequenced by relay `ri` catch up again at their next round.
    fn requeue_group_readers(&mut self, ri: usize) {
        for g in self.relays[ri].first_of.clone() {
            for member in self.groups[g as usize].members.clone() {
                let Some(rc) = self.client_of(member) else { continue };
                if !self.nodes[member as usize].online {
                    continue;
                }
                let session = self.nodes[member as usize].session;
                if let Some(mi) = self.clients[rc].groups.iter().position(|x| x.group == g) {
                    self.clients[rc].groups[mi].caught_up = 0;
                    let t = self.next_round(rc);
                    self.q.push(
                        t,
                        Ev::GroupFetch {
                            client: member,
                            membership: mi as u16 | 0x8000,
                            session,
                        },
                    );
                }
            }
        }
    }

    fn mark_group_gone(&mut self, m: MsgId, why: u8) {
        let (first, count) = (self.msgs[m as usize].first, self.msgs[m as usize].count);
        for d in first..first + count {
            self.deliveries[d as usize].flags |= why;
            self.check_loss(d);
        }
    }

    /// Relays drop mail older than the retention period.
    pub(super) fn on_retention_sweep(&mut self) {
        let keep = self.sc.protocol.retention.micros();
        if self.now >= keep {
            let cutoff = self.now - keep;
            for rc in 0..self.clients.len() {
                for slot in 0..self.clients[rc].inbox.len() {
                    while self.clients[rc].inbox[slot].front().is_some_and(|(_, t)| *t <= cutoff) {
                        let Some((d, _)) = self.clients[rc].inbox[slot].pop_front() else {
                            break;
                        };
                        let relay = self.clients[rc].home[slot];
                        if let Some(ri) = self.relay_of(relay) {
                            self.relays[ri].occupancy = self.relays[ri].occupancy.saturating_sub(1);
                        }
                        let del = &mut self.deliveries[d as usize];
                        del.copies = del.copies.saturating_sub(1);
                        del.flags |= flag::EXPIRED;
                        self.check_loss(d);
                    }
                }
            }
            for g in 0..self.groups.len() {
                while self.groups[g].inbox.front().is_some_and(|(_, t)| *t <= cutoff) {
                    let Some((m, _)) = self.groups[g].inbox.pop_front() else {
                        break;
                    };
                    self.groups[g].base += 1;
                    if let Some(ri) = self.groups[g].relays.first().and_then(|r| self.relay_of(*r)) {
                        self.relays[ri].occupancy = self.relays[ri].occupancy.saturating_sub(1);
                    }
                    self.mark_group_gone(m, flag::EXPIRED);
                }
            }
        }
        self.at(3_600_000_000, Ev::RetentionSweep);
    }
}
