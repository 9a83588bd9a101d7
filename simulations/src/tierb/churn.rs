//! Clients coming and going (Weibull sessions and gaps, optional diurnal factor) and what users do
//! while online: send messages, look up contacts' records, republish their own.

use rand::Rng;
use tidings_node::node::FULL_MAILBOX_ROUND_EVERY;

use super::event::Ev;
use super::kad::LookupKind;
use super::{Drain, MICROS_PER_HOUR, NONE, NodeId, Proto, Time, World, wire};
use crate::rng;
use crate::scenario::Weibull;
use crate::trace::TraceEvent;

impl World<'_> {
    /// The diurnal factor for `node` now: sessions are this many times longer, gaps shorter.
    fn diurnal(&self, node: NodeId) -> f64 {
        let Some(d) = self.sc.churn.as_ref().and_then(|c| c.diurnal.as_ref()) else {
            return 1.0;
        };
        let offset = self.sc.network.regions[self.nodes[node as usize].region as usize].utc_offset_h;
        let hour = (self.now as f64 / MICROS_PER_HOUR as f64 + offset).rem_euclid(24.0);
        1.0 + d.amplitude * (2.0 * std::f64::consts::PI * (hour - d.peak_hour) / 24.0).cos()
    }

    fn session_length(&mut self, node: NodeId) -> Time {
        let Some(c) = self.sc.churn.as_ref() else {
            return super::NEVER;
        };
        let f = self.diurnal(node);
        let first = self.now == 0;
        let secs = self.draw_length(&c.session, first) * f;
        ((secs * 1e6) as Time).max(1_000_000)
    }

    /// A Weibull length in seconds; with `residual`, what is left of one already under way when
    /// the run starts (a length drawn in proportion to itself, cut at a uniform point), so that
    /// the run starts near the steady state rather than with every session fresh.
    fn draw_length(&mut self, w: &Weibull, residual: bool) -> f64 {
        let r = &mut self.rng_churn;
        let scale = w.scale.as_secs_f64();
        if !residual {
            return rng::weibull(r, w.shape, scale);
        }
        let draws: [f64; 16] = std::array::from_fn(|_| rng::weibull(r, w.shape, scale));
        let chosen = draws[rng::weighted(r, &draws)];
        chosen * r.r#gen::<f64>()
    }

    /// The first offline gap of a client that starts offline.
    pub(super) fn initial_gap(&mut self, node: NodeId) -> Time {
        let Some(c) = self.sc.churn.as_ref() else { return 0 };
        let f = self.diurnal(node);
        let secs = self.draw_length(&c.offline, true) / f;
        ((secs * 1e6) as Time).max(1_000_000)
    }

    pub(super) fn offline_gap(&mut self, node: NodeId) -> Time {
        let Some(c) = self.sc.churn.as_ref() else { return 0 };
        let f = self.diurnal(node);
        let secs = rng::weibull(&mut self.rng_churn, c.offline.shape, c.offline.scale.as_secs_f64()) / f;
        ((secs * 1e6) as Time).max(1_000_000)
    }

    pub(super) fn on_up(&mut self, n: NodeId) {
        let Some(ci) = self.client_of(n) else { return };
        if self.nodes[n as usize].online {
            return;
        }
        self.set_online(n, true);
        let node = &mut self.nodes[n as usize];
        node.session += 1;
        let s = node.session;
        self.clients[ci].online_since = self.now;
        self.c.reconnects += 1;
        self.trace(TraceEvent::Up { node: n });
        for d in std::mem::take(&mut self.clients[ci].waiting) {
            self.deliveries[d as usize].ready = self.now;
            self.note_ready(ci, d);
        }
        if self.clients[ci].churns {
            let len = self.session_length(n);
            self.at(len, Ev::Down(n, s));
        }
        let slots = self.clients[ci].home.len();
        self.clients[ci].drain = Some(Drain {
            start: self.now,
            left: slots as u8,
            mail: 0,
        });
        for slot in 0..slots {
            self.start_fetch(ci, slot);
        }
        for mi in 0..self.clients[ci].groups.len() {
            self.start_group_fetch(ci, mi);
        }
        let outbox = self.clients[ci].outbox.clone();
        for m in outbox {
            let msg = &mut self.msgs[m as usize];
            msg.inflight = 0;
            msg.attempt = 0;
            self.pump(m);
        }
        let w = &self.sc.workload;
        let (rate, lookups) = (w.messages_per_user_per_hour, w.record_lookups_per_user_per_hour);
        if rate > 0.0 {
            let t = rng::exp(&mut self.rng_work, MICROS_PER_HOUR as f64 / rate) as Time;
            self.at(t, Ev::SendTimer(n, s));
        }
        if lookups > 0.0 {
            let t = rng::exp(&mut self.rng_work, MICROS_PER_HOUR as f64 / lookups) as Time;
            self.at(t, Ev::LookupTimer(n, s));
        }
        let period = self.sc.protocol.record_republish.micros();
        let last = self.clients[ci].last_publish;
        let due = if last == 0 {
            self.rng_work.gen_range(0..period.max(1))
        } else {
            (last + period).saturating_sub(self.now)
        };
        self.at(due.max(1_000_000), Ev::RepublishTimer(n, s));
    }

    pub(super) fn on_down(&mut self, n: NodeId, session: u32) {
        let Some(ci) = self.live_client(n, session) else { return };
        let silent = self.rng_churn.r#gen::<f64>() < self.sc.churn.as_ref().map_or(0.0, |c| c.silent_fraction);
        self.set_online(n, false);
        self.nodes[n as usize].silent_leave = silent;
        let online_for = self.now - self.clients[ci].online_since;
        self.clients[ci].online_total += online_for;
        self.count_poll_bytes(ci, online_for);
        let horizon = self.now.saturating_sub(self.sc.metrics.deadline.micros());
        for d in std::mem::take(&mut self.clients[ci].recent) {
            let del = &mut self.deliveries[d as usize];
            if del.delivered == super::NEVER && del.ready >= horizon {
                del.flags |= super::flag::RECIPIENT_LEFT;
            }
        }
        for i in 0..self.clients[ci].outbox.len() {
            let msg = &self.msgs[self.clients[ci].outbox[i] as usize];
            if !msg.acked {
                for d in msg.first..msg.first + msg.count {
                    self.deliveries[d as usize].flags |= super::flag::SENDER_LEFT;
                }
            }
        }
        let c = &mut self.clients[ci];
        c.drain = None;
        c.conns.clear();
        for s in &mut c.subs {
            *s = (NONE, NONE);
        }
        for m in &mut c.groups {
            m.caught_up = 0;
        }
        self.drop_table(n);
        self.trace(TraceEvent::Down { node: n, silent });
        if self.sc.churn.is_some() {
            let gap = self.offline_gap(n);
            self.at(gap, Ev::Up(n));
        }
    }

    /// Traffic of the periodic mailbox rounds and group long polls, which the model counts but
    /// does not run as events: two fetches (the inbox and the request inbox) per home relay per
    /// `mailbox_poll`, plus a subscribe and a key-package count every
    /// [`FULL_MAILBOX_ROUND_EVERY`]th round; one long poll per group per `group_poll`.
    pub(super) fn count_poll_bytes(&mut self, ci: usize, online_for: Time) {
        let p = &self.sc.protocol;
        let rounds = online_for / p.mailbox_poll.micros().max(1);
        let full_rounds = rounds / u64::from(FULL_MAILBOX_ROUND_EVERY);
        let polls = online_for / p.group_poll.micros().max(1);
        let node = self.clients[ci].node;
        let request = wire::AUTH_REQUEST + wire::ACK;
        let bytes = (2 * rounds + 2 * full_rounds) * request;
        for h in self.clients[ci].home.clone() {
            self.count_bytes(node, h, Proto::Mailbox, bytes);
        }
        let firsts: Vec<NodeId> = self.clients[ci]
            .groups
            .iter()
            .filter_map(|m| self.groups[m.group as usize].relays.first().copied())
            .collect();
        for r in firsts {
            self.count_bytes(node, r, Proto::Mailbox, polls * (wire::AUTH_REQUEST + wire::ACK));
        }
    }

    pub(super) fn on_send_timer(&mut self, n: NodeId, session: u32) {
        let Some(ci) = self.live_client(n, session) else { return };
        let w = &self.sc.workload;
        let size = rng::exp(&mut self.rng_work, f64::from(w.message_bytes)).clamp(16.0, f64::from(w.message_bytes_max));
        let to_group = !self.clients[ci].groups.is_empty()
            && w.group_message_share > 0.0
            && self.rng_work.r#gen::<f64>() < w.group_message_share;
        if to_group {
            let mi = self.rng_work.gen_range(0..self.clients[ci].groups.len());
            let g = self.clients[ci].groups[mi].group;
            self.send_group(ci, g, size as u32);
        } else if !self.clients[ci].contacts.is_empty() {
            let to = self.clients[ci].contacts[self.rng_work.gen_range(0..self.clients[ci].contacts.len())];
            self.send_direct(ci, to, size as u32);
        }
        let rate = self.sc.workload.messages_per_user_per_hour;
        let t = rng::exp(&mut self.rng_work, MICROS_PER_HOUR as f64 / rate) as Time;
        self.at(t.max(1), Ev::SendTimer(n, session));
    }

    /// A shown one-to-one message may get a reply.
    pub(super) fn maybe_reply(&mut self, from: NodeId, to: NodeId) {
        let w = &self.sc.workload;
        if w.reply_probability > 0.0 && self.rng_work.r#gen::<f64>() < w.reply_probability {
            let delay = rng::exp(&mut self.rng_work, w.reply_delay.micros() as f64) as Time;
            let session = self.nodes[from as usize].session;
            self.at(delay.max(1), Ev::Reply { from, to, session });
        }
    }

    pub(super) fn on_reply(&mut self, from: NodeId, to: NodeId, session: u32) {
        let Some(ci) = self.live_client(from, session) else {
            return;
        };
        let w = &self.sc.workload;
        let size = rng::exp(&mut self.rng_work, f64::from(w.message_bytes)).clamp(16.0, f64::from(w.message_bytes_max));
        self.send_direct(ci, to, size as u32);
    }

    pub(super) fn on_lookup_timer(&mut self, n: NodeId, session: u32) {
        let Some(ci) = self.live_client(n, session) else { return };
        if !self.clients[ci].contacts.is_empty() {
            let to = self.clients[ci].contacts[self.rng_work.gen_range(0..self.clients[ci].contacts.len())];
            if let Some(owner) = self.client_of(to) {
                let target = self.clients[owner].record_key;
                self.start_lookup(n, target, LookupKind::GetRecord { owner: owner as u32 }, NONE);
            }
        }
        let rate = self.sc.workload.record_lookups_per_user_per_hour;
        let t = rng::exp(&mut self.rng_work, MICROS_PER_HOUR as f64 / rate) as Time;
        self.at(t.max(1), Ev::LookupTimer(n, session));
    }

    pub(super) fn on_republish_timer(&mut self, n: NodeId, session: u32) {
        let Some(ci) = self.live_client(n, session) else { return };
        self.clients[ci].last_publish = self.now;
        let target = self.clients[ci].record_key;
        self.start_lookup(n, target, LookupKind::PutRecord { owner: ci as u32 }, NONE);
        let period = self.sc.protocol.record_republish.micros();
        self.at(period, Ev::RepublishTimer(n, session));
    }

    pub(super) fn schedule_sybil_lookup(&mut self) {
        let rate = self
            .sc
            .adversaries
            .sybil
            .as_ref()
            .map_or(0.0, |s| s.target_lookups_per_hour);
        if rate > 0.0 {
            let t = rng::exp(&mut self.rng_work, MICROS_PER_HOUR as f64 / rate) as Time;
            self.at(t.max(1), Ev::SybilTimer);
        }
    }

    pub(super) fn on_sybil_timer(&mut self) {
        if let Some(s) = self.sc.adversaries.sybil.as_ref() {
            let target_ci = s.target_client as usize;
            for _ in 0..64 {
                let ci = self.rng_work.gen_range(0..self.clients.len());
                let node = self.clients[ci].node;
                if ci != target_ci && self.nodes[node as usize].online {
                    let target = self.clients[target_ci].record_key;
                    self.start_lookup(
                        node,
                        target,
                        LookupKind::TargetGet {
                            owner: target_ci as u32,
                        },
                        NONE,
                    );
                    break;
                }
            }
        }
        self.schedule_sybil_lookup();
    }
}
