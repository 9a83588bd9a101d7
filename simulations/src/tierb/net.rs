//! The network between nodes: latency from the region matrix plus access links and jitter,
//! uplink serialisation, loss, partitions, NAT classes and hole punching.

use rand::Rng;

use super::{Nat, NodeId, Proto, Time, World};

impl World<'_> {
    /// Whether an active partition separates `a` and `b`.
    pub(super) fn cut(&self, a: NodeId, b: NodeId) -> bool {
        if self.parts.is_empty() {
            return false;
        }
        let ra = self.nodes[a as usize].region as usize;
        let rb = self.nodes[b as usize].region as usize;
        self.parts.iter().any(|p| p.active && p.side[ra] != p.side[rb])
    }

    /// `b` is online and no partition separates it from `a`.
    pub(super) fn reachable(&self, a: NodeId, b: NodeId) -> bool {
        self.nodes[b as usize].online && self.nodes[a as usize].online && !self.cut(a, b)
    }

    /// A request or response is lost on the way.
    pub(super) fn lost(&mut self) -> bool {
        let p = self.sc.network.loss;
        p > 0.0 && self.rng_net.r#gen::<f64>() < p
    }

    /// One-way propagation delay from `a` to `b`, µs, with jitter.
    pub(super) fn one_way(&mut self, a: NodeId, b: NodeId) -> Time {
        let na = &self.nodes[a as usize];
        let nb = &self.nodes[b as usize];
        let base = f64::from(self.rtt_us[na.region as usize * self.n_regions + nb.region as usize]) / 2.0
            + f64::from(na.access_us)
            + f64::from(nb.access_us);
        let j = self.sc.network.jitter;
        let factor = if j > 0.0 {
            1.0 + j * (2.0 * self.rng_net.r#gen::<f64>() - 1.0)
        } else {
            1.0
        };
        (base * factor).max(1.0) as Time
    }

    /// A round trip between `a` and `b`, µs.
    pub(super) fn round_trip(&mut self, a: NodeId, b: NodeId) -> Time {
        self.one_way(a, b) + self.one_way(b, a)
    }

    /// Sends `bytes` from `a` to `b`: queues them on `a`'s uplink, counts them on both ends, and
    /// returns the delay until the last byte arrives.
    pub(super) fn transfer(&mut self, a: NodeId, b: NodeId, proto: Proto, bytes: u64) -> Time {
        let now = self.now;
        let na = &mut self.nodes[a as usize];
        let tx = (bytes as f64 * 8.0 / f64::from(na.mbps.max(0.001))) as Time;
        na.tx_free = na.tx_free.max(now) + tx;
        let queued = na.tx_free - now;
        na.bytes[proto as usize] += bytes;
        self.nodes[b as usize].bytes[proto as usize] += bytes;
        queued + self.one_way(a, b)
    }

    /// Counts bytes without timing them (for traffic whose timing the model does not follow).
    pub(super) fn count_bytes(&mut self, a: NodeId, b: NodeId, proto: Proto, bytes: u64) {
        self.nodes[a as usize].bytes[proto as usize] += bytes;
        self.nodes[b as usize].bytes[proto as usize] += bytes;
    }

    /// Whether `a` can open a direct connection to `b` without help: one of them is public.
    pub(super) fn direct_dialable(&self, a: NodeId, b: NodeId) -> bool {
        self.nodes[a as usize].nat == Nat::Public || self.nodes[b as usize].nat == Nat::Public
    }

    /// Draws whether hole punching between two NATed nodes succeeds.
    pub(super) fn hole_punch(&mut self, a: NodeId, b: NodeId) -> bool {
        let h = &self.sc.network.hole_punch;
        let p = match (self.nodes[a as usize].nat, self.nodes[b as usize].nat) {
            (Nat::Public, _) | (_, Nat::Public) => 1.0,
            (Nat::Cone, Nat::Cone) => h.cone_cone,
            (Nat::Symmetric, Nat::Symmetric) => h.symmetric_symmetric,
            _ => h.cone_symmetric,
        };
        self.rng_net.r#gen::<f64>() < p
    }
}

#[cfg(test)]
mod tests {
    use crate::scenario::Scenario;
    use crate::tierb::build;
    use crate::trace::Recorder;

    const TWO_REGIONS: &str = r#"
name = "net-test"
duration = "1m"
[network]
regions = [{ name = "a" }, { name = "b" }]
rtt_ms = [[10.0, 100.0], [100.0, 10.0]]
jitter = 0.0
[[population]]
class = "relay"
role = "relay"
count = 2
access_rtt_ms = 0.0
regions = { a = 1.0 }
[[population]]
class = "client"
role = "client"
count = 4
access_rtt_ms = 0.0
regions = { b = 1.0 }
[workload]
contacts_per_user = 2
[[faults]]
kind = "partition"
at = "10s"
heal = "20s"
sides = [["a"], ["b"]]
"#;

    #[test]
    fn latency_follows_the_region_matrix() {
        let sc = Scenario::from_toml(TWO_REGIONS).unwrap();
        let mut w = build::build(&sc, 1, Recorder::new(&sc, 1, None));
        let relay = w.relays[0].node;
        let client = w.clients[0].node;
        assert_eq!(w.round_trip(relay, client), 100_000);
        assert_eq!(w.round_trip(relay, w.relays[1].node), 10_000);
    }

    #[test]
    fn partition_blocks_then_heals() {
        let sc = Scenario::from_toml(TWO_REGIONS).unwrap();
        let mut w = build::build(&sc, 1, Recorder::new(&sc, 1, None));
        let relay = w.relays[0].node;
        let client = w.clients[0].node;
        w.nodes[client as usize].online = true;
        assert!(w.reachable(client, relay));
        w.now = 10_000_000;
        w.on_fault(0);
        assert!(w.cut(client, relay));
        assert!(!w.reachable(client, relay));
        assert!(w.reachable(relay, w.relays[1].node), "same side stays connected");
        w.now = 20_000_000;
        w.on_heal(0);
        assert!(w.reachable(client, relay));
    }
}
