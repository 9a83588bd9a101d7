//! Building the world from a scenario: nodes by class, home relays, the contact graph, groups,
//! adversaries, Sybils and the partitions to come.

use std::collections::VecDeque;

use rand::Rng;
use rand::seq::SliceRandom;

use super::key::{self, Key};
use super::{
    Adv, Client, Counters, Group, Membership, NONE, Nat, Node, NodeId, NodeRole, Partition, Relay, World, checks, kad,
    queue,
};
use crate::rng::{self, stream};
use crate::scenario::{Fault, MICROS_PER_MS, Role, Scenario};
use crate::trace::Recorder;

pub(super) fn build<'a>(sc: &'a Scenario, seed: u64, rec: Recorder<'a>) -> World<'a> {
    let mut r = rng::rng(seed, stream::POPULATION);
    let (region_names, rtt_us) = sc.rtt_matrix_us();
    let k = region_names.len();

    let mut nodes: Vec<Node> = Vec::with_capacity(sc.node_count() as usize);
    let mut relays = Vec::new();
    let mut clients = Vec::new();
    let mut client_homes = Vec::new();
    let mut client_churns = Vec::new();
    for class in &sc.population {
        let weights = class.region_weights(&region_names);
        let nat = class.nat();
        let nat_w = [nat.public, nat.cone, nat.symmetric];
        for _ in 0..class.count {
            let id = nodes.len() as NodeId;
            let region = rng::weighted(&mut r, &weights) as u8;
            let nat = match rng::weighted(&mut r, &nat_w) {
                0 => Nat::Public,
                1 => Nat::Cone,
                _ => Nat::Symmetric,
            };
            let role = match class.role {
                Role::Relay => {
                    relays.push(Relay {
                        node: id,
                        up: true,
                        epoch: 1,
                        adv: Adv::Honest,
                        commit_us: (class.commit_ms() * MICROS_PER_MS as f64) as u64,
                        occupancy: 0,
                        homed: Vec::new(),
                        first_of: Vec::new(),
                        destroyed: false,
                    });
                    NodeRole::Relay(relays.len() as u32 - 1)
                }
                Role::Client => {
                    client_homes.push(class.home_relays());
                    client_churns.push(class.churns() && sc.churn.is_some());
                    NodeRole::Client(client_homes.len() as u32 - 1)
                }
            };
            let dht_server = class.dht().is_server(nat == Nat::Public);
            nodes.push(Node {
                key: key::random_key(&mut r),
                subnet: r.r#gen(),
                region,
                nat,
                role,
                dht_server,
                online: class.role == Role::Relay,
                silent_leave: false,
                session: 0,
                access_us: (class.access_rtt_ms() * MICROS_PER_MS as f64 / 2.0) as u32,
                mbps: class.bandwidth_mbps() as f32,
                tx_free: 0,
                bytes: [0; 4],
            });
        }
    }

    // Adversarial relays.
    let mut ar = rng::rng(seed, stream::ADVERSARY);
    let mut order: Vec<usize> = (0..relays.len()).collect();
    order.shuffle(&mut ar);
    let n_drop = (sc.adversaries.dropping_relays * relays.len() as f64).round() as usize;
    let n_hold = (sc.adversaries.withholding_relays * relays.len() as f64).round() as usize;
    for (i, &ri) in order.iter().enumerate() {
        if i < n_drop {
            relays[ri].adv = Adv::Dropping;
        } else if i < n_drop + n_hold {
            relays[ri].adv = Adv::Withholding;
        }
    }

    // Clients: home relays, record keys, contacts.
    let relay_nodes: Vec<NodeId> = relays.iter().map(|x| x.node).collect();
    let client_nodes: Vec<NodeId> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.role, NodeRole::Client(_)))
        .map(|(i, _)| i as NodeId)
        .collect();
    let poll = sc.protocol.unsubscribed_retry().micros().max(1);
    let mut cr = rng::rng(seed, stream::CHURN);
    let p_online = sc.churn.as_ref().map_or(1.0, |c| 1.0 - c.offline_fraction());
    for (ci, &node) in client_nodes.iter().enumerate() {
        let mut home: Vec<NodeId> = Vec::new();
        let want = (client_homes[ci] as usize).min(relay_nodes.len());
        while home.len() < want {
            let cand = relay_nodes[r.gen_range(0..relay_nodes.len())];
            if !home.contains(&cand) {
                home.push(cand);
            }
        }
        let mut acct = [0u8; 32];
        r.fill(&mut acct);
        let record_key = key::hash_key(&[b"tidings/user", &acct]);
        let churns = client_churns[ci];
        let online = !churns || cr.r#gen::<f64>() < p_online;
        nodes[node as usize].online = online;
        clients.push(Client {
            node,
            churns,
            inbox: vec![VecDeque::new(); home.len()],
            subs: vec![(NONE, NONE); home.len()],
            home,
            contacts: Vec::new(),
            groups: Vec::new(),
            outbox: Vec::new(),
            waiting: Vec::new(),
            recent: Vec::new(),
            conns: Vec::new(),
            drain: None,
            tick_phase: r.gen_range(0..poll),
            online_since: 0,
            online_total: 0,
            last_publish: 0,
            record_key,
            record_holders: Vec::new(),
        });
    }
    for (ci, c) in clients.iter().enumerate() {
        for (slot, &h) in c.home.iter().enumerate() {
            if let NodeRole::Relay(ri) = nodes[h as usize].role {
                relays[ri as usize].homed.push((ci as u32, slot as u8));
            }
        }
    }
    let n_clients = clients.len();
    let half = sc.workload.contacts_per_user.div_ceil(2) as usize;
    if n_clients > 1 {
        for ci in 0..n_clients {
            for _ in 0..half {
                let other = r.gen_range(0..n_clients);
                if other != ci {
                    let (a, b) = (clients[ci].node, clients[other].node);
                    clients[ci].contacts.push(b);
                    clients[other].contacts.push(a);
                }
            }
        }
    }
    for c in &mut clients {
        c.contacts.sort_unstable();
        c.contacts.dedup();
    }

    // Groups: sequencing relay = the creator's first home relay.
    let mut groups = Vec::new();
    for (g, members) in draw_group_members(sc, n_clients, &mut r).into_iter().enumerate() {
        let members: Vec<u32> = members.into_iter().map(|ci| ci as u32).collect();
        for (pos, &ci) in members.iter().enumerate() {
            clients[ci as usize].groups.push(Membership {
                group: g as u32,
                pos: pos as u32,
                cursor: 0,
                caught_up: 0,
            });
        }
        let group_relays = clients[members[0] as usize].home.clone();
        if let Some(NodeRole::Relay(ri)) = group_relays.first().map(|h| nodes[*h as usize].role) {
            relays[ri as usize].first_of.push(g as u32);
        }
        groups.push(Group {
            members: members.iter().map(|ci| clients[*ci as usize].node).collect(),
            relays: group_relays,
            inbox: VecDeque::new(),
            base: 0,
        });
    }

    // Sybils, placed next to the target's record key.
    let mut sybils = Vec::new();
    if let Some(s) = &sc.adversaries.sybil {
        let target: Key = clients[s.target_client as usize].record_key;
        let subnets: Vec<u32> = (0..s.subnets).map(|_| ar.r#gen()).collect();
        for i in 0..s.nodes {
            let id = nodes.len() as NodeId;
            nodes.push(Node {
                key: key::key_near(&target, s.shared_prefix_bits, &mut ar),
                subnet: subnets[i as usize % subnets.len()],
                region: ar.gen_range(0..k) as u8,
                nat: Nat::Public,
                role: NodeRole::Sybil,
                dht_server: true,
                online: true,
                silent_leave: false,
                session: 1,
                access_us: 500,
                mbps: 1_000.0,
                tx_free: 0,
                bytes: [0; 4],
            });
            sybils.push(id);
        }
    }

    // Partitions.
    let mut parts = Vec::new();
    let mut part_of_fault = vec![NONE; sc.faults.len()];
    for (i, f) in sc.faults.iter().enumerate() {
        if let Fault::Partition(p) = f {
            let mut side = vec![0u8; k];
            for (s, regions) in p.sides.iter().enumerate() {
                for name in regions {
                    if let Some(ri) = region_names.iter().position(|n| n == name) {
                        side[ri] = s as u8;
                    }
                }
            }
            part_of_fault[i] = parts.len() as u32;
            parts.push(Partition {
                side,
                active: false,
                start: p.at.micros(),
                heal: p.heal.map_or(super::NEVER, |h| h.micros()),
                first_delivery: 0,
                backlog: Vec::new(),
            });
        }
    }

    let kad = kad::Kad::new(sc, &nodes, sybils);
    let mut w = World {
        sc,
        seed,
        now: 0,
        end: sc.duration.micros(),
        q: queue::EventQueue::default(),
        nodes,
        relays,
        clients,
        groups,
        msgs: Vec::new(),
        convs: std::collections::HashSet::new(),
        deliveries: Vec::new(),
        parts,
        part_of_fault,
        rtt_us,
        n_regions: k,
        kad,
        rng_net: rng::rng(seed, stream::NETWORK),
        rng_work: rng::rng(seed, stream::WORKLOAD),
        rng_churn: cr,
        rng_faults: rng::rng(seed, stream::FAULTS),
        rec,
        checks: checks::Checks::default(),
        c: Counters::default(),
    };
    w.place_initial_records();
    w
}

/// The workload's groups as client indices, drawn the same way in both tiers: `groups_per_user`
/// memberships per client on average, sizes uniform in `group_size`, members at random.
pub(crate) fn draw_group_members(sc: &Scenario, n_clients: usize, r: &mut impl Rng) -> Vec<Vec<usize>> {
    let [lo, hi] = sc.workload.group_size;
    let mean_size = f64::from(lo + hi) / 2.0;
    let count = (n_clients as f64 * sc.workload.groups_per_user / mean_size).round() as usize;
    (0..count)
        .map(|_| {
            let size = (r.gen_range(lo..=hi) as usize).min(n_clients);
            let mut members: Vec<usize> = Vec::with_capacity(size);
            while members.len() < size {
                let ci = r.gen_range(0..n_clients);
                if !members.contains(&ci) {
                    members.push(ci);
                }
            }
            members
        })
        .collect()
}
