//! Invariants checked in every run.
//!
//! - **No acknowledged message lost.** A delivery is *acknowledged* once its sender holds the
//!   recipient's direct ack or a custody receipt (for a group message: the sequencing relay's). It
//!   is *lost* when it was acknowledged, never shown, and no honest relay still holds a copy the
//!   recipient will read (personal inbox copies; for groups, the sequencing relay's group inbox).
//!   A loss is excused only when its cause is one the scenario allows: every copy sat on relays
//!   killed with `data = "lost"` (`allow_loss_on_destroyed_relays`), or every receipt came from
//!   dropping or withholding relays (`allow_loss_on_adversarial_relays`). Mail expired by relay
//!   retention is counted apart: the receipt only promised to keep it that long. Any other loss
//!   fails the run.
//! - **No message displayed twice**: counted per delivery, apart from the model's own dedup.
//! - **No message delivered to a non-recipient**: checked on every apply.

use super::{DeliveryId, NEVER, NONE, World, flag};
use crate::trace::TraceEvent;

/// At most this many violations are kept in detail.
const MAX_KEPT: usize = 20;

#[derive(Default)]
pub(crate) struct Checks {
    pub(crate) violations: Vec<super::Violation>,
    pub(crate) count: u64,
}

impl World<'_> {
    pub(super) fn violation(&mut self, invariant: &'static str, detail: String) {
        self.checks.count += 1;
        if self.checks.violations.len() < MAX_KEPT {
            self.checks.violations.push(super::Violation {
                invariant,
                detail,
                time_s: self.now as f64 / 1e6,
            });
        }
        self.trace(TraceEvent::Violation { invariant });
    }

    /// Whether a copy the recipient will read still exists somewhere.
    fn held(&self, d: DeliveryId) -> bool {
        let del = &self.deliveries[d as usize];
        let msg = &self.msgs[del.msg as usize];
        if msg.group == NONE {
            return del.copies > 0;
        }
        msg.group_index != NEVER && msg.group_index >= self.groups[msg.group as usize].base
    }

    /// Called whenever a copy may have disappeared, and for every delivery at the end.
    pub(super) fn check_loss(&mut self, d: DeliveryId) {
        let del = &self.deliveries[d as usize];
        let msg = &self.msgs[del.msg as usize];
        if del.delivered != NEVER || del.flags & flag::LOST != 0 || !msg.acked || self.held(d) {
            return;
        }
        let flags = del.flags;
        self.deliveries[d as usize].flags |= flag::LOST;
        let inv = &self.sc.invariants;
        let (cause, allowed) = if flags & flag::EXPIRED != 0 {
            ("retention", true)
        } else if flags & flag::DESTROYED != 0 {
            ("destroyed-relay", inv.allow_loss_on_destroyed_relays)
        } else if flags & flag::COMMITTED_ADV != 0 && flags & flag::COMMITTED_HONEST == 0 {
            ("adversarial-relay", inv.allow_loss_on_adversarial_relays)
        } else {
            ("unexplained", false)
        };
        self.trace(TraceEvent::Lost { delivery: d, cause });
        if cause == "retention" {
            self.c.lost_expired += 1;
        } else if allowed {
            self.c.lost_excused += 1;
        } else {
            let (recipient, m) = (self.deliveries[d as usize].recipient, self.deliveries[d as usize].msg);
            let detail = format!(
                "delivery {d} (message {m} to node {recipient}, sent at {:.3} s) was acknowledged and then lost; cause: {cause}{}",
                self.msgs[m as usize].sent as f64 / 1e6,
                if cause == "unexplained" {
                    ""
                } else {
                    " (not allowed by [invariants])"
                }
            );
            self.violation("no acknowledged message lost", detail);
        }
    }

    pub(super) fn finish_checks(&mut self) {
        for d in 0..self.deliveries.len() as DeliveryId {
            self.check_loss(d);
        }
    }
}
