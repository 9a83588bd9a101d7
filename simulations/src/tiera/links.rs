//! The link model of a Tier A world: the delay of every chunk of bytes between two hosts (the
//! region RTT matrix, access links, serialisation at the sender's bandwidth, jitter, loss as a
//! retransmission), partitions that cut and heal, and NATs that drop unsolicited connections.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tidings_node::sim::LinkModel;

use super::plan::{Nat, Plan};
use crate::scenario::HolePunch;

/// Ports are host index + 1 (`/memory/0` means "any port" to libp2p).
pub fn port(host: usize) -> u64 {
    host as u64 + 1
}

fn host_of(port: u64) -> usize {
    port.saturating_sub(1) as usize
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform draw in [0, 1) from a hash.
fn unit(x: u64) -> f64 {
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}

pub struct Links {
    region: Vec<u8>,
    nat: Vec<Nat>,
    access_us: Vec<u32>,
    mbps: Vec<f32>,
    rtt_us: Vec<u32>,
    k: usize,
    jitter: f64,
    loss: f64,
    punch: HolePunch,
    seed: u64,
    draws: AtomicU64,
    /// The side of each region while a partition is on.
    cut: Mutex<Option<Vec<u8>>>,
}

impl Links {
    pub fn new(plan: &Plan, jitter: f64, loss: f64, punch: HolePunch, seed: u64) -> Self {
        Links {
            region: plan.hosts.iter().map(|h| h.region).collect(),
            nat: plan.hosts.iter().map(|h| h.nat).collect(),
            access_us: plan.hosts.iter().map(|h| h.access_us).collect(),
            mbps: plan.hosts.iter().map(|h| h.mbps).collect(),
            rtt_us: plan.rtt_us.clone(),
            k: plan.n_regions,
            jitter,
            loss,
            punch,
            seed: mix(seed ^ 0x4c49_4e4b),
            draws: AtomicU64::new(0),
            cut: Mutex::new(None),
        }
    }

    /// Cuts the network between region sides, or heals it (`None`).
    pub fn set_cut(&self, side: Option<Vec<u8>>) {
        *self.cut.lock().unwrap_or_else(|p| p.into_inner()) = side;
    }

    fn draw(&self) -> f64 {
        unit(self.seed ^ self.draws.fetch_add(1, Ordering::Relaxed))
    }

    /// Chance that a hole punch between `a` and `b` works.
    fn punch_chance(&self, a: Nat, b: Nat) -> f64 {
        match (a, b) {
            (Nat::Public, _) | (_, Nat::Public) => 1.0,
            (Nat::Cone, Nat::Cone) => self.punch.cone_cone,
            (Nat::Symmetric, Nat::Symmetric) => self.punch.symmetric_symmetric,
            _ => self.punch.cone_symmetric,
        }
    }
}

impl LinkModel for Links {
    fn delay(&self, from: u64, to: u64, bytes: usize) -> Option<Duration> {
        let (a, b) = (host_of(from), host_of(to));
        let (ra, rb) = (*self.region.get(a)? as usize, *self.region.get(b)? as usize);
        if let Some(side) = self.cut.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && side.get(ra) != side.get(rb)
        {
            return None;
        }
        let rtt = f64::from(self.rtt_us[ra * self.k + rb]);
        let mut us = rtt / 2.0 + f64::from(self.access_us[a]) + f64::from(self.access_us[b]);
        if self.jitter > 0.0 {
            us *= 1.0 + self.jitter * (2.0 * self.draw() - 1.0);
        }
        if self.loss > 0.0 && bytes > 0 && self.draw() < self.loss {
            // A lost segment comes again after a round trip.
            us += rtt;
        }
        let mbps = f64::from(self.mbps[a]).max(0.001);
        us += bytes as f64 * 8.0 / mbps;
        Some(Duration::from_micros(us as u64))
    }

    fn accepts(&self, from: u64, to: u64) -> bool {
        let (a, b) = (host_of(from), host_of(to));
        let (Some(&na), Some(&nb)) = (self.nat.get(a), self.nat.get(b)) else {
            return false;
        };
        if nb == Nat::Public {
            return true;
        }
        // A pair either can punch through or cannot, for the whole run.
        let pair = (a.min(b) as u64) << 32 | a.max(b) as u64;
        unit(self.seed ^ mix(pair)) < self.punch_chance(na, nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        let sc = crate::scenario::two_classes("t", 2, 40, "nat = { public = 0.0, cone = 1.0, symmetric = 0.0 }");
        Plan::build(&sc, 1)
    }

    #[test]
    fn a_partition_cuts_links_between_sides_only_until_it_heals() {
        let p = plan();
        let links = Links::new(&p, 0.0, 0.0, HolePunch::default(), 1);
        let (a, b) = (port(0), port(1));
        assert!(links.delay(a, b, 100).is_some());
        let mut side = vec![0u8; p.n_regions];
        let (ra, rb) = (p.hosts[0].region as usize, p.hosts[1].region as usize);
        if ra != rb {
            side[rb] = 1;
            links.set_cut(Some(side));
            assert!(links.delay(a, b, 100).is_none());
            links.set_cut(None);
            assert!(links.delay(a, b, 100).is_some());
        }
    }

    #[test]
    fn hosts_behind_cone_nats_take_direct_connections_from_about_the_configured_share_of_peers() {
        let p = plan();
        let links = Links::new(&p, 0.0, 0.0, HolePunch::default(), 1);
        let clients: Vec<u64> = (p.relays.len()..p.hosts.len()).map(port).collect();
        let mut ok = 0;
        let mut all = 0;
        for &x in &clients {
            for &y in &clients {
                if x != y {
                    all += 1;
                    ok += usize::from(links.accepts(x, y));
                    assert_eq!(
                        links.accepts(x, y),
                        links.accepts(y, x),
                        "a pair punches through or not"
                    );
                }
            }
            assert!(links.accepts(x, port(p.relays[0])), "relays are public");
        }
        let share = ok as f64 / all as f64;
        assert!((share - HolePunch::default().cone_cone).abs() < 0.1, "share {share}");
    }
}
