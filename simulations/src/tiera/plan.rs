//! What a Tier A run will do, drawn from the scenario and the seed before any node starts: every
//! host's place (region, NAT, access link, home relays), the contact graph, every client's online
//! intervals, every message's time and recipient, and which relays the faults hit.

use rand::Rng;

use crate::rng::{self, SimRng, stream};
use crate::scenario::{Fault, MICROS_PER_MS, Role, Scenario};

/// A host's NAT class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    Public,
    Cone,
    Symmetric,
}

/// One host of the world.
#[derive(Debug, Clone)]
pub struct Host {
    pub relay: bool,
    pub region: u8,
    pub nat: Nat,
    /// One-way delay of its access link, µs.
    pub access_us: u32,
    pub mbps: f32,
    /// The class's `dht` mode for this host (relays always serve). A host
    /// behind a NAT still never serves in Tier A: `sim::start_person_on`
    /// makes only reachable hosts DHT servers.
    pub dht_server: bool,
}

/// A person's device.
#[derive(Debug, Clone)]
pub struct Client {
    /// Index into [`Plan::hosts`].
    pub host: usize,
    /// Indices into [`Plan::relays`].
    pub homes: Vec<usize>,
    /// Client indices.
    pub contacts: Vec<usize>,
    /// Online intervals `[from, to)`, µs, sorted and disjoint.
    pub online: Vec<(u64, u64)>,
    /// Indices into [`Plan::groups`].
    pub groups: Vec<usize>,
}

impl Client {
    pub fn online_at(&self, t: u64) -> bool {
        self.online.iter().any(|&(a, b)| a <= t && t < b)
    }

    /// The first time at or after `t` that the client is online.
    pub fn ready_after(&self, t: u64) -> Option<u64> {
        self.online.iter().find(|&&(_, b)| b > t).map(|&(a, _)| a.max(t))
    }

    /// The end of the online interval that holds `t`.
    pub fn online_until(&self, t: u64) -> Option<u64> {
        self.online.iter().find(|&&(a, b)| a <= t && t < b).map(|&(_, b)| b)
    }
}

/// A message the workload will send (if its sender is online then).
#[derive(Debug, Clone, Copy)]
pub struct PlannedSend {
    pub at: u64,
    pub from: usize,
    /// The contact it is for (a client index), unless it goes to `group`.
    pub to: usize,
    /// An index into [`Plan::groups`]: a message to that group.
    pub group: Option<usize>,
}

/// A group the workload uses. It exists from the start: its first member makes it during the
/// set-up (as Tier B assumes), with that member's home relays as the group's relays.
#[derive(Debug, Clone)]
pub struct PlannedGroup {
    /// Client indices; the first made the group.
    pub members: Vec<usize>,
}

/// A DHT lookup of a contact's user record the workload will make (if its client is online then).
#[derive(Debug, Clone, Copy)]
pub struct PlannedLookup {
    pub at: u64,
    pub from: usize,
    /// The client whose record is looked up.
    pub owner: usize,
}

/// A timed fault, resolved to the relays it hits.
#[derive(Debug, Clone)]
pub enum PlannedFault {
    /// Cut between region sides (`side[region]`) from `at` to `heal`.
    Partition { at: u64, heal: Option<u64>, side: Vec<u8> },
    /// Stop these relays at `at`; start them again at `back` (mailboxes emptied if `wipe`).
    Relays {
        at: u64,
        back: Option<u64>,
        relays: Vec<usize>,
        wipe: bool,
    },
}

/// Everything drawn before the run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub hosts: Vec<Host>,
    /// Host indices of the relays.
    pub relays: Vec<usize>,
    pub clients: Vec<Client>,
    pub groups: Vec<PlannedGroup>,
    /// Sorted by time.
    pub sends: Vec<PlannedSend>,
    /// Sorted by time.
    pub lookups: Vec<PlannedLookup>,
    /// One per scenario fault, in order.
    pub faults: Vec<PlannedFault>,
    /// RTT between regions, µs, row-major.
    pub rtt_us: Vec<u32>,
    pub n_regions: usize,
    pub end: u64,
}

impl Plan {
    pub fn build(sc: &Scenario, seed: u64) -> Plan {
        let mut r = rng::rng(seed, stream::POPULATION);
        let (region_names, rtt_us) = sc.rtt_matrix_us();
        let k = region_names.len();
        let mut hosts = Vec::new();
        let mut relays = Vec::new();
        let mut client_hosts = Vec::new();
        for class in &sc.population {
            let weights = class.region_weights(&region_names);
            let nat = class.nat();
            let nat_w = [nat.public, nat.cone, nat.symmetric];
            for _ in 0..class.count {
                let region = rng::weighted(&mut r, &weights) as u8;
                let nat = match rng::weighted(&mut r, &nat_w) {
                    0 => Nat::Public,
                    1 => Nat::Cone,
                    _ => Nat::Symmetric,
                };
                let relay = class.role == Role::Relay;
                let nat = if relay { Nat::Public } else { nat };
                let dht_server = relay || class.dht().is_server(nat == Nat::Public);
                let index = hosts.len();
                hosts.push(Host {
                    relay,
                    region,
                    nat,
                    access_us: (class.access_rtt_ms() * MICROS_PER_MS as f64 / 2.0) as u32,
                    mbps: class.bandwidth_mbps() as f32,
                    dht_server,
                });
                if relay {
                    relays.push(index);
                } else {
                    client_hosts.push((index, class.home_relays(), class.churns() && sc.churn.is_some()));
                }
            }
        }

        let end = sc.duration.micros();
        let mut cr = rng::rng(seed, stream::CHURN);
        let mut clients: Vec<Client> = client_hosts
            .iter()
            .map(|&(host, n_homes, churns)| {
                let mut homes = Vec::new();
                let want = (n_homes as usize).min(relays.len());
                while homes.len() < want {
                    let cand = r.gen_range(0..relays.len());
                    if !homes.contains(&cand) {
                        homes.push(cand);
                    }
                }
                let online = match (&sc.churn, churns) {
                    (Some(ch), true) => {
                        let mut iv = Vec::new();
                        let mut on = cr.r#gen::<f64>() >= ch.offline_fraction();
                        let mut t = 0u64;
                        while t < end {
                            let w = if on { &ch.session } else { &ch.offline };
                            let len = rng::weibull(&mut cr, w.shape, w.scale.micros() as f64).max(1.0) as u64;
                            let next = t.saturating_add(len).min(end);
                            if on {
                                iv.push((t, next));
                            }
                            t = next;
                            on = !on;
                        }
                        iv
                    }
                    _ => vec![(0, end)],
                };
                Client {
                    host,
                    homes,
                    contacts: Vec::new(),
                    online,
                    groups: Vec::new(),
                }
            })
            .collect();

        let n = clients.len();
        let half = sc.workload.contacts_per_user.div_ceil(2) as usize;
        if n > 1 {
            for ci in 0..n {
                for _ in 0..half {
                    let other = r.gen_range(0..n);
                    if other != ci {
                        clients[ci].contacts.push(other);
                        clients[other].contacts.push(ci);
                    }
                }
            }
        }
        for c in &mut clients {
            c.contacts.sort_unstable();
            c.contacts.dedup();
        }

        let groups = draw_groups(sc, &mut clients, &mut rng::rng(seed, stream::POPULATION | (3 << 40)));

        // The workload: messages at the scenario's rate, sent only while online, each to a
        // contact or (at the group message share) to one of the sender's groups, and lookups of a
        // contact's user record (as Tier B's), each from its own random stream.
        let mut wr = rng::rng(seed, stream::WORKLOAD);
        let mut gr = rng::rng(seed, stream::WORKLOAD | (3 << 40));
        let share = sc.workload.group_message_share;
        let mut sends: Vec<PlannedSend> =
            contact_events(&clients, sc.workload.messages_per_user_per_hour, end, &mut wr)
                .into_iter()
                .map(|(at, from, to)| {
                    let mine = &clients[from].groups;
                    let group = (!mine.is_empty() && share > 0.0 && gr.r#gen::<f64>() < share)
                        .then(|| mine[gr.gen_range(0..mine.len())]);
                    PlannedSend { at, from, to, group }
                })
                .collect();
        sends.sort_by_key(|s| (s.at, s.from));
        let mut lr = rng::rng(seed, stream::WORKLOAD | (2 << 40));
        let mut lookups: Vec<PlannedLookup> =
            contact_events(&clients, sc.workload.record_lookups_per_user_per_hour, end, &mut lr)
                .into_iter()
                .map(|(at, from, owner)| PlannedLookup { at, from, owner })
                .collect();
        lookups.sort_by_key(|l| (l.at, l.from));

        let mut fr = rng::rng(seed, stream::FAULTS);
        let mut pick = |fraction: f64| {
            let want = (fraction * relays.len() as f64).round() as usize;
            let mut order: Vec<usize> = (0..relays.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, fr.gen_range(0..=i));
            }
            order.truncate(want);
            order
        };
        let faults = sc
            .faults
            .iter()
            .map(|f| match f {
                Fault::Partition(p) => {
                    let mut side = vec![0u8; k];
                    for (s, names) in p.sides.iter().enumerate() {
                        for name in names {
                            if let Some(ri) = region_names.iter().position(|n| n == name) {
                                side[ri] = s as u8;
                            }
                        }
                    }
                    PlannedFault::Partition {
                        at: p.at.micros(),
                        heal: p.heal.map(|h| h.micros()),
                        side,
                    }
                }
                Fault::KillRelays(kf) => PlannedFault::Relays {
                    at: kf.at.micros(),
                    back: kf.restart_after.map(|d| kf.at.micros() + d.micros()),
                    relays: pick(kf.fraction),
                    wipe: kf.data == crate::scenario::DataFate::Lost,
                },
                Fault::RestartRelays(rf) => PlannedFault::Relays {
                    at: rf.at.micros(),
                    back: Some(rf.at.micros() + rf.downtime.micros()),
                    relays: pick(rf.fraction),
                    wipe: false,
                },
            })
            .collect();

        Plan {
            hosts,
            relays,
            clients,
            groups,
            sends,
            lookups,
            faults,
            rtt_us,
            n_regions: k,
            end,
        }
    }
}

/// The workload's groups, drawn as Tier B draws them; each client learns its own.
fn draw_groups(sc: &Scenario, clients: &mut [Client], r: &mut SimRng) -> Vec<PlannedGroup> {
    let drawn = crate::tierb::draw_group_members(sc, clients.len(), r);
    for (g, members) in drawn.iter().enumerate() {
        for &ci in members {
            clients[ci].groups.push(g);
        }
    }
    drawn.into_iter().map(|members| PlannedGroup { members }).collect()
}

/// `(time, client, contact)` at `per_hour` per client (a Poisson process each, over the whole run),
/// a random contact each time, kept only while the client is online.
fn contact_events(clients: &[Client], per_hour: f64, end: u64, r: &mut SimRng) -> Vec<(u64, usize, usize)> {
    let per_us = per_hour / 3.6e9;
    let mut out = Vec::new();
    if per_us > 0.0 {
        for (ci, c) in clients.iter().enumerate().filter(|(_, c)| !c.contacts.is_empty()) {
            let mut t = rng::exp(r, 1.0 / per_us);
            while (t as u64) < end {
                let at = t as u64;
                let to = c.contacts[r.gen_range(0..c.contacts.len())];
                if c.online_at(at) {
                    out.push((at, ci, to));
                }
                t += rng::exp(r, 1.0 / per_us);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dht_servers(extra: &str) -> (usize, usize, usize) {
        let sc = crate::scenario::two_classes("t", 3, 60, extra);
        let p = Plan::build(&sc, 1);
        let clients = p.hosts.iter().filter(|h| !h.relay);
        let public = clients.clone().filter(|h| h.nat == Nat::Public).count();
        let servers = clients.filter(|h| h.dht_server).count();
        let relays = p.hosts.iter().filter(|h| h.relay && h.dht_server).count();
        (relays, public, servers)
    }

    #[test]
    fn clients_serve_the_dht_as_their_class_says_and_relays_always_do() {
        let (relays, public, servers) = dht_servers("nat = { public = 0.5, cone = 0.5 }");
        assert_eq!(relays, 3);
        assert!(public > 0 && public < 60, "a mix: {public} public");
        assert_eq!(servers, public, "auto: the public clients");
        let (relays, _, servers) = dht_servers("nat = { public = 0.5, cone = 0.5 }\ndht = \"client\"");
        assert_eq!((relays, servers), (3, 0));
        let (_, _, servers) = dht_servers("nat = { public = 0.5, cone = 0.5 }\ndht = \"server\"");
        assert_eq!(servers, 60);
    }
}
