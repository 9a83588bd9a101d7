//! The routing table's upkeep: which buckets a DHT server refreshes, and the
//! keys it looks up to refresh them.
//!
//! Kademlia refreshes a bucket only when nothing has shown it alive for a
//! while: "any bucket to which it has not performed a node lookup in the past
//! hour"; BitTorrent's DHT (BEP 5) also counts a node of the bucket that was
//! added or answered. libp2p-kad's periodic bootstrap instead looks up a random
//! key in every bucket past the nearest non-empty one, every period, whatever
//! traffic went through them: with a thousand DHT servers that is about ten
//! lookups per server per period, each dialling some twenty to forty servers.
//!
//! [`BucketRefresh`] keeps, per bucket, when it last *changed*: a lookup of ours
//! for a key in it, a peer of it added to the table, or a connection with a
//! peer of it that the table holds. A DHT server's refresh (every half period)
//! looks up only the buckets unchanged for a whole period: one self-lookup for
//! the nearest two (where its neighbours are) and one lookup of a key in each
//! farther one. Far buckets hold most of the network and see traffic all the
//! time, so in a busy network they rarely need a lookup of their own.
//!
//! A DHT client keeps no records and nobody routes through it: its table only
//! gives its own lookups somewhere to start, and every lookup it makes meets
//! live servers and drops dead ones. So a client looks itself up only when it
//! has made no lookup of its own for a whole (longer) period
//! ([`super::NetTuning::kad_client_refresh`], an hour: the Kademlia paper's
//! own interval), not every few minutes.
//!
//! A farther bucket's lookup asks for the [`FAR_BUCKET_RESULTS`] servers
//! nearest its key, not twenty: it refreshes the bucket with the live servers
//! it meets there, and only a record needs the twenty nearest a key. The
//! nearest buckets' self-lookup still asks for twenty: those are the servers
//! that must hold this one in their tables. In a world of a hundred relays, a
//! lookup of twenty dialled some two dozen servers, each on a connection of
//! its own, and the relays' refreshes took a fifth of the CPU of a simulated
//! 10 minutes (SIMULATOR.md, "2026-12-05 (night)").
//!
//! A bucket that a refresh finds as it was (no peer of it joined or left the
//! table, none failed a dial, since its last refresh) waits twice as long for
//! the next, up to an hour ([`QUIET_MAX`], the Kademlia paper's own interval);
//! any such change brings it back to the period. A network of stable servers
//! (community relays) so refreshes about hourly, and one whose servers come
//! and go keeps refreshing every period where they do.
//!
//! The refresh keys are derived from the node's peer id, the refresh round and
//! the bucket, and the refresh's phase within its period from the peer id (no
//! randomness), so a simulated world does the same refreshes in every run of
//! one seed, and nodes that start together do not refresh together.

use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::kad::KBucketKey;
use libp2p::multihash::Multihash;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Buckets of a routing table: one per bit of the 256-bit key space.
const BUCKETS: usize = 256;

/// Candidate keys tried when looking for one in a given bucket. A random key
/// falls in bucket `i` with probability 2^(i − 256), so this finds one for the
/// buckets within about eleven of the farthest (all that a network of a few
/// thousand servers has past its nearest two) and otherwise keeps the nearest
/// miss.
const KEY_TRIES: u32 = 2048;

/// How many servers nearest its key a farther bucket's refresh lookup asks for.
pub(super) const FAR_BUCKET_RESULTS: NonZeroUsize = NonZeroUsize::new(5).unwrap();

/// The buckets nearest to our own key that a self-lookup refreshes.
const SELF_LOOKUP_BUCKETS: usize = 2;

/// The longest a bucket that keeps its peers waits between refreshes.
const QUIET_MAX: Duration = Duration::from_secs(3600);

/// Doublings of the period a quiet bucket can reach (five reach an hour from
/// five minutes; [`QUIET_MAX`] caps them).
const QUIET_DOUBLINGS: u8 = 5;

/// What one refresh looks up.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Look up our own key (refreshes the nearest buckets).
    pub self_lookup: bool,
    /// One lookup each, a key in each stale farther bucket.
    pub targets: Vec<PeerId>,
}

impl Plan {
    /// The lookups to start: each key, and how many servers nearest it to ask for.
    pub fn lookups(self, me: PeerId) -> impl Iterator<Item = (PeerId, NonZeroUsize)> {
        let own = self.self_lookup.then_some((me, libp2p::kad::K_VALUE));
        own.into_iter()
            .chain(self.targets.into_iter().map(|t| (t, FAR_BUCKET_RESULTS)))
    }
}

/// When each bucket last changed, and which ones a refresh looks up.
pub(super) struct BucketRefresh {
    dht_server: bool,
    period: Duration,
    local: KBucketKey<PeerId>,
    start: Instant,
    /// Seconds after `start` at which each bucket (by index: the base-2
    /// logarithm of the distance, 0 nearest) last changed.
    changed: Box<[u32; BUCKETS]>,
    /// Refreshes in a row of each bucket with no change of its peers in
    /// between: its wait is the period doubled this often.
    quiet: Box<[u8; BUCKETS]>,
    /// Refreshes so far; part of every refresh key.
    round: u64,
    /// A client's last lookup of its own (or refresh), in seconds after
    /// `start`; the start counts, as the node bootstraps then.
    last_lookup: u32,
}

impl BucketRefresh {
    pub fn new(local: PeerId, dht_server: bool, period: Duration, start: Instant) -> Self {
        Self {
            dht_server,
            period,
            local: KBucketKey::from(local),
            start,
            changed: Box::new([0; BUCKETS]),
            quiet: Box::new([0; BUCKETS]),
            round: 0,
            last_lookup: 0,
        }
    }

    pub fn dht_server(&self) -> bool {
        self.dht_server
    }

    /// How often [`Self::due`] (a server) or [`Self::client_due`] is asked:
    /// every half period.
    pub fn tick(&self) -> Duration {
        self.period / 2
    }

    /// How long after the first [`Self::tick`] this node's ticks fall: a
    /// fraction of a tick derived from its key. Nodes that start together
    /// (a relay operator's restart, a simulated world) would otherwise refresh
    /// together, and none would find its buckets changed by the others'
    /// refreshes.
    pub fn phase(&self) -> Duration {
        let mut first = [0u8; 8];
        for (to, from) in first.iter_mut().zip(self.local.hashed_bytes()) {
            *to = *from;
        }
        let tick_ms = u64::try_from(self.tick().as_millis()).unwrap_or(u64::MAX).max(1);
        Duration::from_millis(u64::from_be_bytes(first) % tick_ms)
    }

    fn secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.start).as_secs()).unwrap_or(u32::MAX)
    }

    fn period_secs(&self) -> u32 {
        u32::try_from(self.period.as_secs()).unwrap_or(u32::MAX)
    }

    fn bucket_of<T>(&self, key: &KBucketKey<T>) -> Option<usize> {
        self.local.distance(key).ilog2().map(|i| i as usize)
    }

    /// A peer of the bucket was added to the table or connected with.
    /// Only a DHT server refreshes buckets, so only a server keeps track
    /// (and hashes the key).
    pub fn touch_peer(&mut self, peer: PeerId, now: Instant) {
        if self.dht_server {
            self.touch(&KBucketKey::from(peer), now);
        }
    }

    /// A peer of the bucket joined or left the table, or a dial to a peer the
    /// table holds failed: the bucket goes back to being refreshed every period.
    pub fn peers_changed(&mut self, peer: PeerId, now: Instant) {
        if self.dht_server
            && let Some(i) = self.bucket_of(&KBucketKey::from(peer))
        {
            self.changed[i] = self.secs(now);
            self.quiet[i] = 0;
        }
    }

    /// How long bucket `i` waits, in seconds, after its last change.
    fn wait_secs(&self, i: usize) -> u32 {
        let max = u32::try_from(QUIET_MAX.as_secs()).unwrap_or(u32::MAX);
        let doubled = self
            .period_secs()
            .saturating_mul(1 << self.quiet[i].min(QUIET_DOUBLINGS));
        doubled.min(max.max(self.period_secs()))
    }

    /// We started a lookup of `key` (a DHT key or a peer id's bytes).
    pub fn touch_key(&mut self, key: Vec<u8>, now: Instant) {
        if self.dht_server {
            self.touch(&KBucketKey::new(key), now);
        } else {
            self.last_lookup = self.secs(now);
        }
    }

    /// Whether a client's refresh at `now` looks itself up: only when it made
    /// no lookup of its own for a whole period. The refresh counts as one.
    pub fn client_due(&mut self, now: Instant) -> bool {
        let (now_s, period) = (self.secs(now), self.period_secs());
        if now_s.saturating_sub(self.last_lookup) < period {
            return false;
        }
        self.last_lookup = now_s;
        true
    }

    fn touch<T>(&mut self, key: &KBucketKey<T>, now: Instant) {
        if let Some(i) = self.bucket_of(key) {
            self.changed[i] = self.secs(now);
        }
    }

    /// The lookups a refresh at `now` makes, given the index of the nearest
    /// non-empty bucket (`None`: an empty table, nothing to refresh from).
    /// Every bucket planned counts as changed now.
    pub fn due(&mut self, nearest: Option<usize>, now: Instant) -> Plan {
        let mut plan = Plan::default();
        let Some(nearest) = nearest.filter(|&n| n < BUCKETS) else {
            return plan;
        };
        let now_s = self.secs(now);
        self.round += 1;
        for i in nearest..BUCKETS {
            if now_s.saturating_sub(self.changed[i]) < self.wait_secs(i) {
                continue;
            }
            if i < nearest + SELF_LOOKUP_BUCKETS {
                plan.self_lookup = true;
            } else {
                plan.targets.push(self.key_in_bucket(i));
            }
            self.changed[i] = now_s;
            // Quieter still, unless the refresh finds (or meanwhile something
            // shows) a change of its peers.
            self.quiet[i] = self.quiet[i].saturating_add(1).min(QUIET_DOUBLINGS);
        }
        plan
    }

    /// A peer id whose key falls in bucket `bucket`, or the nearest miss.
    fn key_in_bucket(&self, bucket: usize) -> PeerId {
        let mut best: Option<(usize, PeerId)> = None;
        for n in 0..KEY_TRIES {
            let digest = Sha256::new()
                .chain_update(b"tidings/kad-refresh")
                .chain_update(self.local.preimage().to_bytes())
                .chain_update(self.round.to_be_bytes())
                .chain_update((bucket as u32).to_be_bytes())
                .chain_update(n.to_be_bytes())
                .finalize();
            // An identity multihash of 32 bytes, as `PeerId::random` makes.
            let Some(peer) = Multihash::<64>::wrap(0, &digest)
                .ok()
                .and_then(|m| PeerId::from_multihash(m).ok())
            else {
                continue;
            };
            let Some(i) = self.bucket_of(&KBucketKey::from(peer)) else {
                continue;
            };
            if i == bucket {
                return peer;
            }
            if best.is_none_or(|(b, _)| i.abs_diff(bucket) < b.abs_diff(bucket)) {
                best = Some((i, peer));
            }
        }
        best.map_or(*self.local.preimage(), |(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_secs(300);

    fn peer(byte: u8) -> PeerId {
        PeerId::from_multihash(Multihash::wrap(0, &[byte; 32]).unwrap()).unwrap()
    }

    fn server() -> (BucketRefresh, Instant) {
        let start = Instant::now();
        (BucketRefresh::new(peer(7), true, PERIOD, start), start)
    }

    fn buckets(r: &BucketRefresh, plan: &Plan) -> Vec<usize> {
        plan.targets
            .iter()
            .filter_map(|p| r.bucket_of(&KBucketKey::from(*p)))
            .collect()
    }

    #[test]
    fn a_refresh_asks_for_twenty_servers_near_itself_and_five_near_each_farther_key() {
        let (mut r, start) = server();
        let me = PeerId::random();
        let plan = r.due(Some(246), start + PERIOD);
        let targets = plan.targets.clone();
        let lookups: Vec<_> = plan.lookups(me).collect();
        assert_eq!(
            lookups[0],
            (me, NonZeroUsize::new(20).unwrap()),
            "the self-lookup first"
        );
        assert_eq!(lookups.len(), 1 + targets.len());
        for ((key, n), target) in lookups[1..].iter().zip(&targets) {
            assert_eq!((key, n.get()), (target, 5));
        }
        let quiet = Plan {
            self_lookup: false,
            targets: targets.clone(),
        };
        assert!(quiet.lookups(me).all(|(key, n)| key != me && n.get() == 5));
    }

    #[test]
    fn nothing_is_refreshed_within_a_period_of_the_start() {
        let (mut r, start) = server();
        assert_eq!(r.due(Some(246), start + PERIOD / 2), Plan::default());
        assert_eq!(r.due(None, start + PERIOD * 10), Plan::default(), "an empty table");
    }

    #[test]
    fn an_idle_server_refreshes_every_bucket_from_its_nearest_once_a_period() {
        let (mut r, start) = server();
        let plan = r.due(Some(246), start + PERIOD);
        assert!(plan.self_lookup, "the nearest buckets by a self-lookup");
        assert_eq!(
            buckets(&r, &plan),
            (248..256).collect::<Vec<_>>(),
            "one key in each farther bucket"
        );
        assert_eq!(
            r.due(Some(246), start + PERIOD + PERIOD / 2),
            Plan::default(),
            "refreshed buckets wait another period"
        );
        assert_eq!(
            r.due(Some(246), start + PERIOD * 2),
            Plan::default(),
            "a bucket refreshed without a change waits twice as long"
        );
        assert_eq!(r.due(Some(246), start + PERIOD * 3).targets.len(), 8);
    }

    #[test]
    fn quiet_buckets_are_refreshed_ever_more_rarely_up_to_an_hour() {
        let (mut r, start) = server();
        let mut at = Vec::new();
        let mut t = start;
        while t < start + Duration::from_secs(4 * 3600) {
            t += PERIOD / 2;
            if r.due(Some(246), t).self_lookup {
                at.push((t - start).as_secs() / 60);
            }
        }
        assert_eq!(at, vec![5, 15, 35, 75, 135, 195]);
    }

    #[test]
    fn a_change_of_a_buckets_peers_brings_back_the_period() {
        let (mut r, start) = server();
        let far = r.key_in_bucket(255);
        assert_eq!(r.due(Some(246), start + PERIOD).targets.len(), 8);
        assert!(r.due(Some(246), start + PERIOD * 3).self_lookup, "quiet: 10 minutes");
        // A peer of bucket 255 joined the table (or one of it failed a dial).
        r.peers_changed(far, start + PERIOD * 3);
        let plan = r.due(Some(246), start + PERIOD * 3 + PERIOD / 2);
        assert_eq!(plan, Plan::default(), "a change shows the bucket alive for a period");
        let plan = r.due(Some(246), start + PERIOD * 4);
        assert_eq!(buckets(&r, &plan), vec![255], "and the bucket is back to the period");
        assert!(!plan.self_lookup, "the quiet ones wait on (20 minutes)");
    }

    #[test]
    fn a_bucket_with_traffic_is_not_refreshed() {
        let (mut r, start) = server();
        let now = start + PERIOD - Duration::from_secs(1);
        // Keys in buckets 255 and 254, touched as a lookup's targets and as peers.
        let far = r.key_in_bucket(255);
        let near = r.key_in_bucket(254);
        r.touch_key(far.to_bytes(), now);
        r.touch_peer(near, now);
        let plan = r.due(Some(246), start + PERIOD);
        assert_eq!(buckets(&r, &plan), (248..254).collect::<Vec<_>>());
        assert!(plan.self_lookup);
    }

    #[test]
    fn a_client_looks_itself_up_only_after_a_period_without_a_lookup_of_its_own() {
        let start = Instant::now();
        let mut r = BucketRefresh::new(peer(5), false, PERIOD, start);
        assert_eq!(r.tick(), PERIOD / 2);
        assert!(!r.client_due(start + PERIOD / 2), "the start's bootstrap counts");
        assert!(r.client_due(start + PERIOD));
        assert!(
            !r.client_due(start + PERIOD + PERIOD / 2),
            "the refresh counts as a lookup"
        );
        // A lookup of its own puts the next refresh off by a period from it.
        r.touch_key(b"a record key".to_vec(), start + PERIOD * 2 - Duration::from_secs(1));
        assert!(!r.client_due(start + PERIOD * 2));
        assert!(!r.client_due(start + PERIOD * 5 / 2));
        assert!(r.client_due(start + PERIOD * 3));
        // A client keeps no buckets.
        r.touch_peer(peer(6), start + PERIOD * 3);
        assert!(r.changed.iter().all(|&c| c == 0));
    }

    #[test]
    fn nodes_tick_at_phases_of_their_own_within_a_tick() {
        let start = Instant::now();
        let phases: Vec<Duration> = (0..16)
            .map(|b| BucketRefresh::new(peer(b), true, PERIOD, start).phase())
            .collect();
        assert!(phases.iter().all(|p| *p < PERIOD / 2));
        let mut distinct = phases.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 12, "{phases:?}");
        assert_eq!(BucketRefresh::new(peer(3), true, PERIOD, start).phase(), phases[3]);
    }

    #[test]
    fn refresh_keys_follow_the_peer_id_and_round() {
        let local = peer(9);
        let start = Instant::now();
        let mut a = BucketRefresh::new(local, true, PERIOD, start);
        let mut b = BucketRefresh::new(local, true, PERIOD, start);
        let (pa, pb) = (a.due(Some(250), start + PERIOD), b.due(Some(250), start + PERIOD));
        assert_eq!(pa, pb, "same peer, same round: same keys");
        let next = a.due(Some(250), start + PERIOD * 2);
        assert_ne!(pa.targets, next.targets, "a new round looks up new keys");
    }

    #[test]
    fn a_key_is_found_in_deep_buckets_or_the_nearest_miss_is_kept() {
        let (r, _) = server();
        for bucket in [255, 252, 248] {
            let i = r.bucket_of(&KBucketKey::from(r.key_in_bucket(bucket)));
            assert_eq!(i, Some(bucket));
        }
        let deep = r.bucket_of(&KBucketKey::from(r.key_in_bucket(100)));
        assert!(deep.is_some_and(|i| i < 250), "the nearest miss: {deep:?}");
    }
}
