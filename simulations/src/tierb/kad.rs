//! Kademlia: 256-bit ids, k-buckets filled from the population, iterative lookups with α requests
//! in flight, records stored on the k closest, Sybils, and two defences.
//!
//! A node's routing table is drawn from the DHT servers that are online when it is built, and
//! rebuilt when older than `kad_refresh` (libp2p refreshes its buckets every 5 minutes), so it
//! holds peers that answered recently and goes stale with churn in between. Tables are built
//! lazily, each from its own ChaCha stream (node, build number), so the order in which nodes need
//! them does not change what they contain.
//!
//! A lookup keeps candidates sorted by XOR distance and ends, as libp2p's does, when the k closest
//! non-failed candidates have all answered. A request to a peer that is offline, cut off or not
//! dialable fails after `kad_rpc_timeout`. Sybils answer every request with the Sybils closest to
//! the key and drop records stored on them.
//!
//! Defences (`adversaries.sybil.mitigation`): `disjoint-paths` splits the lookup into d paths that
//! never share a peer and succeeds if any path does (S/Kademlia); `bucket-diversity` admits at most
//! `per_subnet` peers of one network prefix into a bucket and into a lookup's candidates.

use rand::Rng;

use super::event::Ev;
use super::key::{self, Key};
use super::{MsgId, NONE, Nat, NodeId, NodeRole, Proto, Time, World, wire};
use crate::rng::{self, stream};
use crate::scenario::{Mitigation, Scenario};
use crate::trace::TraceEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LookupKind {
    /// Peer routing for a device's addresses.
    FindNode { target: NodeId },
    /// A contact's user record.
    GetRecord { owner: u32 },
    /// Republishing one's own user record (lookup, then store on the k closest).
    PutRecord { owner: u32 },
    /// A lookup of the Sybils' target record.
    TargetGet { owner: u32 },
}

impl LookupKind {
    pub(super) fn index(self) -> usize {
        match self {
            LookupKind::FindNode { .. } => 0,
            LookupKind::GetRecord { .. } => 1,
            LookupKind::PutRecord { .. } => 2,
            LookupKind::TargetGet { .. } => 3,
        }
    }
}

const PENDING: u8 = 0;
const IN_FLIGHT: u8 = 1;
const ANSWERED: u8 = 2;
const FAILED: u8 = 3;

#[derive(Clone, Copy)]
struct Cand {
    dist: Key,
    node: NodeId,
    state: u8,
    depth: u8,
    path: u8,
}

struct Lookup {
    active: bool,
    generation: u32,
    origin: NodeId,
    target: Key,
    kind: LookupKind,
    started: Time,
    /// A first message waiting for this lookup (its conversation's record), or NONE.
    then: MsgId,
    cands: Vec<Cand>,
    /// Every peer any path has seen, sorted (paths never share a peer).
    seen: Vec<NodeId>,
    inflight: Vec<u8>,
    path_done: Vec<bool>,
    /// Copies of the record found so far, and the depth of the first.
    found: u32,
    found_depth: u8,
}

struct Table {
    built: Time,
    builds: u32,
    entries: Vec<NodeId>,
    /// Bucket i (peers sharing exactly i leading bits with the owner) is `entries[starts[i]..starts[i + 1]]`.
    starts: Vec<u32>,
}

pub(super) struct Kad {
    k: usize,
    alpha: usize,
    /// Every DHT server (Sybils included), sorted by key.
    servers: Vec<(Key, NodeId)>,
    sybils: Vec<NodeId>,
    tables: Vec<Option<Table>>,
    lookups: Vec<Lookup>,
    free: Vec<u32>,
    mitigation: Mitigation,
    paths: usize,
    per_subnet: usize,
    /// The Sybils sorted by distance to the last key asked about.
    sybil_cache: Option<(Key, Vec<NodeId>)>,
    scratch: Vec<usize>,
    /// Node keys and liveness, dense, for the hot loops (copies of what `Node` holds).
    keys: Vec<Key>,
    live: Vec<u64>,
    pub(super) table_builds: u64,
}

impl Kad {
    pub(super) fn new(sc: &Scenario, nodes: &[super::Node], sybils: Vec<NodeId>) -> Kad {
        let mut servers: Vec<(Key, NodeId)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.dht_server)
            .map(|(i, n)| (n.key, i as NodeId))
            .collect();
        servers.sort_unstable();
        let (mitigation, paths, per_subnet) = match &sc.adversaries.sybil {
            Some(s) => (s.mitigation, s.disjoint_paths as usize, s.per_subnet as usize),
            None => (Mitigation::None, 1, usize::MAX),
        };
        Kad {
            k: sc.protocol.kad_k as usize,
            alpha: sc.protocol.kad_alpha as usize,
            servers,
            sybils,
            tables: (0..nodes.len()).map(|_| None).collect(),
            lookups: Vec::new(),
            free: Vec::new(),
            mitigation,
            paths: if mitigation == Mitigation::DisjointPaths {
                paths.max(1)
            } else {
                1
            },
            per_subnet: if mitigation == Mitigation::BucketDiversity {
                per_subnet.max(1)
            } else {
                usize::MAX
            },
            sybil_cache: None,
            scratch: Vec::new(),
            keys: nodes.iter().map(|n| n.key).collect(),
            live: {
                let mut live = vec![0u64; nodes.len().div_ceil(64)];
                for (i, n) in nodes.iter().enumerate() {
                    if n.online {
                        live[i / 64] |= 1 << (i % 64);
                    }
                }
                live
            },
            table_builds: 0,
        }
    }

    /// Indices into `servers` of the keys whose first `bits` bits equal `k`'s.
    fn prefix_range(&self, k: &Key, bits: u32) -> (usize, usize) {
        let lo_key = key::prefix_bound(k, bits, false);
        let hi_key = key::prefix_bound(k, bits, true);
        let lo = self.servers.partition_point(|(s, _)| *s < lo_key);
        let hi = self.servers.partition_point(|(s, _)| *s <= hi_key);
        (lo, hi.max(lo))
    }

    pub(super) fn set_live(&mut self, n: NodeId, live: bool) {
        let (w, b) = (n as usize / 64, n % 64);
        if let Some(word) = self.live.get_mut(w) {
            if live {
                *word |= 1 << b;
            } else {
                *word &= !(1 << b);
            }
        }
    }

    fn is_live(&self, n: NodeId) -> bool {
        self.live.get(n as usize / 64).is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    pub(super) fn server_count(&self) -> usize {
        self.servers.len()
    }

    pub(super) fn mitigation(&self) -> Mitigation {
        self.mitigation
    }
}

impl World<'_> {
    fn is_sybil(&self, n: NodeId) -> bool {
        self.nodes[n as usize].role == NodeRole::Sybil
    }

    /// Whether admitting `n` keeps at most `per_subnet` peers of its subnet among `picked`.
    fn diverse(&self, picked: &[NodeId], n: NodeId) -> bool {
        let per = self.kad.per_subnet;
        if per == usize::MAX {
            return true;
        }
        let subnet = self.nodes[n as usize].subnet;
        picked
            .iter()
            .filter(|p| self.nodes[**p as usize].subnet == subnet)
            .count()
            < per
    }

    fn ensure_table(&mut self, x: NodeId) {
        let refresh = self.sc.protocol.kad_refresh.micros();
        let builds = match &self.kad.tables[x as usize] {
            Some(t) if self.now.saturating_sub(t.built) < refresh => return,
            Some(t) => t.builds + 1,
            None => 1,
        };
        let mut r = rng::rng(
            self.seed,
            stream::KAD_TABLE | (u64::from(x) << 20) | u64::from(builds & 0xF_FFFF),
        );
        let me = self.nodes[x as usize].key;
        let k = self.kad.k;
        let mut entries = Vec::new();
        let mut starts = Vec::new();
        for i in 0..256u32 {
            let (lo_all, hi_all) = self.kad.prefix_range(&me, i);
            let others = (hi_all - lo_all).saturating_sub(usize::from(self.nodes[x as usize].dht_server));
            if others == 0 {
                break;
            }
            starts.push(entries.len() as u32);
            let (lo, hi) = self.kad.prefix_range(&key::flip_bit(&me, i), i + 1);
            let mut picked: Vec<NodeId> = Vec::with_capacity(k);
            let usable = |w: &World<'_>, n: NodeId, picked: &[NodeId]| {
                n != x && w.kad.is_live(n) && !picked.contains(&n) && w.diverse(picked, n)
            };
            if hi - lo <= 4 * k {
                // A partial Fisher–Yates over the range: random order, each index once.
                let mut idx = std::mem::take(&mut self.kad.scratch);
                idx.clear();
                idx.extend(lo..hi);
                let mut left = idx.len();
                while left > 0 && picked.len() < k {
                    let j = r.gen_range(0..left);
                    left -= 1;
                    idx.swap(j, left);
                    let n = self.kad.servers[idx[left]].1;
                    if usable(self, n, &picked) {
                        picked.push(n);
                    }
                }
                self.kad.scratch = idx;
            } else {
                let mut attempts = 0;
                while picked.len() < k && attempts < 8 * k {
                    attempts += 1;
                    let n = self.kad.servers[r.gen_range(lo..hi)].1;
                    if usable(self, n, &picked) {
                        picked.push(n);
                    }
                }
            }
            entries.extend_from_slice(&picked);
        }
        starts.push(entries.len() as u32);
        self.kad.table_builds += 1;
        self.kad.tables[x as usize] = Some(Table {
            built: self.now,
            builds,
            entries,
            starts,
        });
    }

    /// Forgets a departed node's table (it is rebuilt on its next lookup).
    pub(super) fn drop_table(&mut self, x: NodeId) {
        if let Some(t) = self.kad.tables.get_mut(x as usize) {
            *t = None;
        }
    }

    /// The k entries of `x`'s routing table closest to `target`.
    ///
    /// Entries of bucket c = cpl(x, target) share more than c bits with the target; entries of
    /// every bucket above c share exactly c bits; those of a bucket j below c share j bits. So the
    /// closest come from bucket c, then from all buckets above it, then from c − 1, c − 2, …, and
    /// only the groups needed to reach k are sorted.
    fn table_closest(&mut self, x: NodeId, target: &Key) -> Vec<NodeId> {
        self.ensure_table(x);
        let k = self.kad.k;
        let Some(t) = self.kad.tables[x as usize].as_ref() else {
            return Vec::new();
        };
        let nb = t.starts.len().saturating_sub(1);
        let c = (key::cpl(&self.nodes[x as usize].key, target) as usize).min(nb);
        let keys = &self.kad.keys;
        let mut out: Vec<(Key, NodeId)> = Vec::with_capacity(2 * k);
        let add = |i: usize, out: &mut Vec<(Key, NodeId)>| {
            for &n in &t.entries[t.starts[i] as usize..t.starts[i + 1] as usize] {
                out.push((key::xor(&keys[n as usize], target), n));
            }
        };
        if c < nb {
            add(c, &mut out);
        }
        if out.len() < k {
            for i in c + 1..nb {
                add(i, &mut out);
            }
        }
        let mut i = c;
        while out.len() < k && i > 0 {
            i -= 1;
            add(i, &mut out);
        }
        if out.len() > k {
            out.select_nth_unstable(k - 1);
            out.truncate(k);
        }
        out.sort_unstable();
        out.into_iter().map(|(_, n)| n).collect()
    }

    /// What a Sybil answers: the Sybils closest to the key.
    fn sybil_closest(&mut self, target: &Key) -> Vec<NodeId> {
        let k = self.kad.k;
        if let Some((t, list)) = &self.kad.sybil_cache
            && t == target
        {
            return list.iter().take(k).copied().collect();
        }
        let mut list = self.kad.sybils.clone();
        let nodes = &self.nodes;
        list.sort_unstable_by_key(|n| key::xor(&nodes[*n as usize].key, target));
        let out = list.iter().take(k).copied().collect();
        self.kad.sybil_cache = Some((*target, list));
        out
    }

    /// The k DHT servers closest to `target` (with the diversity rule when it is on), as a perfect
    /// lookup would find them.
    fn oracle_closest(&self, target: &Key) -> Vec<NodeId> {
        let k = self.kad.k;
        let servers = &self.kad.servers;
        if servers.is_empty() {
            return Vec::new();
        }
        let pos = servers.partition_point(|(s, _)| s < target);
        let mut bits = 0u32;
        for j in [pos.saturating_sub(1), pos.min(servers.len() - 1)] {
            bits = bits.max(key::cpl(&servers[j].0, target));
        }
        let want = if self.kad.per_subnet == usize::MAX { k } else { 8 * k };
        let (mut lo, mut hi) = self.kad.prefix_range(target, bits);
        while hi - lo < want && bits > 0 {
            bits -= 1;
            (lo, hi) = self.kad.prefix_range(target, bits);
        }
        let mut range: Vec<NodeId> = servers[lo..hi].iter().map(|(_, n)| *n).collect();
        range.sort_unstable_by_key(|n| key::xor(&self.nodes[*n as usize].key, target));
        let mut out = Vec::with_capacity(k);
        for n in range {
            if out.len() >= k {
                break;
            }
            if self.diverse(&out, n) {
                out.push(n);
            }
        }
        out
    }

    /// Records as a steady state would have them: on the k closest servers (Sybils drop theirs).
    pub(super) fn place_initial_records(&mut self) {
        for ci in 0..self.clients.len() {
            let target = self.clients[ci].record_key;
            let holders: Vec<NodeId> = self
                .oracle_closest(&target)
                .into_iter()
                .filter(|n| !self.is_sybil(*n))
                .collect();
            self.clients[ci].record_holders = holders;
        }
    }

    /// Starts a lookup; when it ends, the conversation set-up of message `then` goes on (NONE:
    /// nothing waits for it).
    pub(super) fn start_lookup(&mut self, origin: NodeId, target: Key, kind: LookupKind, then: MsgId) {
        let initial = self.table_closest(origin, &target);
        let paths = self.kad.paths;
        let id = match self.kad.free.pop() {
            Some(i) => i,
            None => {
                self.kad.lookups.push(Lookup {
                    active: false,
                    generation: 0,
                    origin,
                    target,
                    kind,
                    started: 0,
                    then: NONE,
                    cands: Vec::new(),
                    seen: Vec::new(),
                    inflight: Vec::new(),
                    path_done: Vec::new(),
                    found: 0,
                    found_depth: 0,
                });
                self.kad.lookups.len() as u32 - 1
            }
        };
        let l = &mut self.kad.lookups[id as usize];
        l.active = true;
        l.generation = l.generation.wrapping_add(1);
        l.origin = origin;
        l.target = target;
        l.kind = kind;
        l.started = self.now;
        l.then = then;
        l.cands.clear();
        l.seen.clear();
        l.inflight.clear();
        l.inflight.resize(paths, 0);
        l.path_done.clear();
        l.path_done.resize(paths, false);
        l.found = 0;
        l.found_depth = 0;
        for (i, n) in initial.into_iter().enumerate() {
            self.add_cand(id, n, 1, (i % paths) as u8);
        }
        if self.kad.lookups[id as usize].cands.is_empty() {
            self.finish_lookup(id, false, 0);
            return;
        }
        for p in 0..paths {
            self.step(id, p);
        }
    }

    fn add_cand(&mut self, id: u32, n: NodeId, depth: u8, path: u8) {
        let target = self.kad.lookups[id as usize].target;
        let origin = self.kad.lookups[id as usize].origin;
        if n == origin {
            return;
        }
        let l = &self.kad.lookups[id as usize];
        let Err(seen_at) = l.seen.binary_search(&n) else { return };
        if self.kad.per_subnet != usize::MAX {
            let subnet = self.nodes[n as usize].subnet;
            let same = l
                .cands
                .iter()
                .filter(|c| c.path == path && self.nodes[c.node as usize].subnet == subnet)
                .count();
            if same >= self.kad.per_subnet {
                return;
            }
        }
        let cap = 8 * self.kad.k * self.kad.paths;
        let dist = key::xor(&self.kad.keys[n as usize], &target);
        let l = &mut self.kad.lookups[id as usize];
        if l.cands.len() >= cap {
            match l.cands.last() {
                Some(last) if last.state == PENDING && last.dist > dist => {
                    l.cands.pop();
                }
                _ => return,
            }
        }
        l.seen.insert(seen_at, n);
        let at = l.cands.partition_point(|c| c.dist < dist);
        l.cands.insert(
            at,
            Cand {
                dist,
                node: n,
                state: PENDING,
                depth,
                path,
            },
        );
    }

    /// Keeps α requests in flight on path `p`, or marks the path done.
    fn step(&mut self, id: u32, p: usize) {
        let k = self.kad.k;
        loop {
            let l = &self.kad.lookups[id as usize];
            if usize::from(l.inflight[p]) >= self.kad.alpha {
                return;
            }
            let mut counted = 0;
            let mut pick = None;
            for (i, c) in l.cands.iter().enumerate() {
                if c.path as usize != p || c.state == FAILED {
                    continue;
                }
                counted += 1;
                if counted > k {
                    break;
                }
                if c.state == PENDING {
                    pick = Some(i);
                    break;
                }
            }
            let Some(i) = pick else {
                if l.inflight[p] == 0 {
                    self.kad.lookups[id as usize].path_done[p] = true;
                    if self.kad.lookups[id as usize].path_done.iter().all(|d| *d) {
                        self.end_lookup(id);
                    }
                }
                return;
            };
            self.query(id, i);
        }
    }

    fn query(&mut self, id: u32, i: usize) {
        let l = &mut self.kad.lookups[id as usize];
        let (origin, generation) = (l.origin, l.generation);
        let c = &mut l.cands[i];
        c.state = IN_FLIGHT;
        let (peer, path) = (c.node, c.path as usize);
        l.inflight[path] += 1;
        let dialable = self.nodes[peer as usize].nat == Nat::Public;
        let ok = dialable && self.reachable(origin, peer) && !self.lost();
        self.count_bytes(origin, peer, Proto::Kad, wire::KAD_REQUEST);
        let lat = if ok {
            let rtts = u64::from(self.sc.protocol.connect_rtts);
            let setup = rtts * self.round_trip(origin, peer) + self.one_way(origin, peer);
            setup + self.transfer(peer, origin, Proto::Kad, self.kad.k as u64 * wire::KAD_PEER)
        } else {
            self.sc.protocol.kad_rpc_timeout.micros()
        };
        self.at(
            lat,
            Ev::Kad {
                lookup: id,
                generation,
                peer,
                ok,
            },
        );
    }

    pub(super) fn on_kad(&mut self, id: u32, generation: u32, peer: NodeId, ok: bool) {
        let Some(l) = self.kad.lookups.get_mut(id as usize) else {
            return;
        };
        if !l.active || l.generation != generation {
            return;
        }
        let Some(i) = l.cands.iter().position(|c| c.node == peer) else {
            return;
        };
        let c = &mut l.cands[i];
        c.state = if ok { ANSWERED } else { FAILED };
        let (depth, path) = (c.depth, c.path);
        l.inflight[path as usize] = l.inflight[path as usize].saturating_sub(1);
        let (kind, target, started) = (l.kind, l.target, l.started);
        if self.now.saturating_sub(started) > self.sc.protocol.kad_query_timeout.micros() {
            self.finish_lookup(id, false, depth);
            return;
        }
        if ok {
            let found = match kind {
                LookupKind::FindNode { target } => peer == target,
                LookupKind::GetRecord { owner } | LookupKind::TargetGet { owner } => {
                    self.clients[owner as usize].record_holders.contains(&peer)
                }
                LookupKind::PutRecord { .. } => false,
            };
            if found {
                if !matches!(kind, LookupKind::GetRecord { .. } | LookupKind::TargetGet { .. }) {
                    self.finish_lookup(id, true, depth);
                    return;
                }
                // The node reads on until `record_copies` valid copies are in (the newest of them
                // wins) or the lookup runs out of peers; the holder names closer peers as well.
                self.count_bytes(peer, self.kad.lookups[id as usize].origin, Proto::Kad, wire::RECORD);
                let l = &mut self.kad.lookups[id as usize];
                if l.found == 0 {
                    l.found_depth = depth;
                }
                l.found += 1;
                if l.found >= self.sc.protocol.record_copies {
                    let first = l.found_depth;
                    self.finish_lookup(id, true, first);
                    return;
                }
            }
            let answer = if self.is_sybil(peer) {
                self.sybil_closest(&target)
            } else {
                self.table_closest(peer, &target)
            };
            for n in answer {
                self.add_cand(id, n, depth.saturating_add(1), path);
            }
        }
        self.step(id, path as usize);
    }

    /// All paths are done without an early success.
    fn end_lookup(&mut self, id: u32) {
        let l = &self.kad.lookups[id as usize];
        let max_depth = l
            .cands
            .iter()
            .filter(|c| c.state == ANSWERED)
            .map(|c| c.depth)
            .max()
            .unwrap_or(0);
        let LookupKind::PutRecord { owner } = l.kind else {
            let (found, first) = (l.found > 0, l.found_depth);
            self.finish_lookup(id, found, if found { first } else { max_depth });
            return;
        };
        let origin = l.origin;
        let closest: Vec<NodeId> = l
            .cands
            .iter()
            .filter(|c| c.state == ANSWERED)
            .take(self.kad.k)
            .map(|c| c.node)
            .collect();
        let stored = closest.len();
        let mut holders: Vec<NodeId> = closest.iter().copied().filter(|n| !self.is_sybil(*n)).collect();
        for n in &closest {
            self.count_bytes(origin, *n, Proto::Kad, wire::RECORD);
        }
        // Earlier copies stay where they were until they expire (48 h).
        let old = std::mem::take(&mut self.clients[owner as usize].record_holders);
        for n in old {
            if holders.len() >= 2 * self.kad.k {
                break;
            }
            if !holders.contains(&n) {
                holders.push(n);
            }
        }
        self.clients[owner as usize].record_holders = holders;
        self.finish_lookup(id, stored > 0, max_depth);
    }

    fn finish_lookup(&mut self, id: u32, success: bool, hops: u8) {
        let l = &mut self.kad.lookups[id as usize];
        l.active = false;
        let (kind, origin, started, then) = (l.kind, l.origin, l.started, l.then);
        l.then = NONE;
        self.kad.free.push(id);
        let latency = self.now - started;
        self.c.kad[kind.index()].add(success, hops, latency);
        self.trace(TraceEvent::Lookup {
            kind: kind.index() as u8,
            origin,
            ok: success,
            hops,
            latency_us: latency,
        });
        if then != NONE {
            // As an event: the caller may still use this lookup's slot, which a lookup started
            // by the set-up would take over.
            self.at(0, Ev::RecordLookedUp { m: then });
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::scenario::Scenario;
    use crate::tierb::{build, key};
    use crate::trace::Recorder;

    fn static_network(extra: &str) -> Scenario {
        let text = format!(
            r#"
name = "kad-test"
duration = "10m"
[[population]]
class = "relay"
role = "relay"
count = 300
[[population]]
class = "client"
role = "client"
count = 50
nat = {{ cone = 1.0 }}
[workload]
contacts_per_user = 2
{extra}
"#
        );
        Scenario::from_toml(&text).unwrap()
    }

    #[test]
    fn lookup_finds_the_closest_node_in_a_static_network() {
        let sc = static_network("");
        let mut w = build::build(&sc, 9, Recorder::new(&sc, 9, None));
        let origin = w.clients[0].node;
        w.nodes[origin as usize].online = true;
        let target_node = w.relays[123].node;
        let target = w.nodes[target_node as usize].key;
        w.start_lookup(
            origin,
            target,
            super::LookupKind::FindNode { target: target_node },
            super::NONE,
        );
        while let Some((t, ev)) = w.q.pop() {
            w.now = t;
            w.dispatch(ev);
        }
        let acc = &w.c.kad[0];
        assert_eq!((acc.lookups, acc.ok), (1, 1), "the lookup reaches the target");
        assert!(acc.hops_sum >= 1 && acc.hops_sum <= 6, "hops: {}", acc.hops_sum);
        // And the oracle agrees that the closest server to the target's key is the target.
        assert_eq!(w.oracle_closest(&target).first(), Some(&target_node));
        assert_eq!(key::cpl(&target, &target), 256);
    }

    #[test]
    fn a_record_lookup_reads_on_until_it_holds_record_copies_copies() {
        let run = |copies: u32| {
            let sc = static_network(&format!("[protocol]\nrecord_copies = {copies}"));
            let mut w = build::build(&sc, 9, Recorder::new(&sc, 9, None));
            let origin = w.clients[0].node;
            w.nodes[origin as usize].online = true;
            let owner = 5;
            let target = w.clients[owner].record_key;
            let kad_bytes =
                |w: &crate::tierb::World<'_>| w.nodes[origin as usize].bytes[crate::tierb::Proto::Kad as usize];
            let bytes_before = kad_bytes(&w);
            w.start_lookup(
                origin,
                target,
                super::LookupKind::GetRecord { owner: owner as u32 },
                super::NONE,
            );
            while let Some((t, ev)) = w.q.pop() {
                w.now = t;
                w.dispatch(ev);
            }
            let acc = &w.c.kad[super::LookupKind::GetRecord { owner: 0 }.index()];
            assert_eq!((acc.lookups, acc.ok), (1, 1), "copies = {copies}: the record is found");
            (acc.latency_ms[0], kad_bytes(&w) - bytes_before)
        };
        let (first_ms, first_bytes) = run(1);
        let (three_ms, three_bytes) = run(3);
        assert!(
            three_ms > first_ms,
            "three copies take longer: {three_ms} vs {first_ms} ms"
        );
        assert!(
            three_bytes > first_bytes,
            "and bring more records: {three_bytes} vs {first_bytes} B"
        );
    }

    #[test]
    fn sybils_next_to_a_key_eclipse_it_unless_buckets_are_diverse() {
        let sybil = |m: &str| {
            format!(
                "[adversaries.sybil]\nnodes = 40\ntarget_client = 3\ntarget_lookups_per_hour = 0\nmitigation = \"{m}\""
            )
        };
        let sc = static_network(&sybil("none"));
        let w = build::build(&sc, 9, Recorder::new(&sc, 9, None));
        assert!(
            w.clients[3].record_holders.is_empty(),
            "every closest server is a Sybil"
        );
        let sc = static_network(&sybil("bucket-diversity"));
        let w = build::build(&sc, 9, Recorder::new(&sc, 9, None));
        assert!(
            w.clients[3].record_holders.len() >= 15,
            "honest servers keep the record"
        );
    }
}
