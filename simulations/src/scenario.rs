//! The scenario format shared by both tiers: a TOML file describing a network (population, latency,
//! churn, workload, faults, adversaries), what to measure, and optionally a sweep.
//!
//! Everything here describes the network and the protocol settings, never a tier's internals, so
//! that Tier A (real nodes) and Tier B (the model) read the same files. Parsing rejects unknown keys
//! (`deny_unknown_fields`); [`Scenario::validate`] checks ranges and cross-references and returns a
//! typed [`ScenarioError`]. See `docs/SIMULATOR.md` for the reference with examples.

mod duration;
pub mod regions;
mod validate;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use duration::{DurationError, MICROS_PER_MS, MICROS_PER_SEC, SimDuration};
pub use validate::ScenarioError;

/// Upper bounds that keep a run's memory bounded (about 200 bytes per node plus 40 per delivery).
pub const MAX_NODES: u64 = 2_000_000;
/// The most message deliveries (message × recipient) a scenario may ask for.
pub const MAX_DELIVERIES: u64 = 60_000_000;

/// A whole scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Which tier the scenario is meant for; a hint only (`run --tier` decides).
    #[serde(default)]
    pub tier: TierHint,
    /// The default seed (`--seed` overrides it).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Simulated time to run.
    pub duration: SimDuration,
    /// Tier A: the clients start one after another over this much virtual time before the run
    /// (whose clock starts after the set-up), instead of all at once. A client's first minutes
    /// open connections to most DHT servers (libp2p's bootstrap); spread out, those of the early
    /// ones have closed before the last ones start, which lowers the set-up's memory peak. Tier B
    /// starts with its routing tables warm and ignores it.
    #[serde(default)]
    pub start_spread: SimDuration,
    /// Tier A: the relays start one after another over this much virtual time, before the
    /// clients, instead of all at once. Relays started together bootstrap together (4.93 GiB at
    /// a thousand relays, against 4.38 spread over 5 minutes) and refresh their routing tables
    /// together every refresh period after. Tier B ignores it.
    #[serde(default)]
    pub relay_start_spread: SimDuration,
    /// Tier A: the workload's groups are made one after another over this much virtual time,
    /// after every client has started, instead of all at once. Making a group opens connections
    /// from its maker to its members and their relays; spread out, those of the first groups
    /// close (idle timeout) before the last ones open, which lowers the set-up's memory peak.
    /// Tier B starts with its groups made and ignores it.
    #[serde(default)]
    pub group_spread: SimDuration,
    #[serde(default)]
    pub network: Network,
    /// Node classes; at least one relay class and one client class.
    pub population: Vec<NodeClass>,
    /// Clients joining and leaving; absent means everyone stays online.
    #[serde(default)]
    pub churn: Option<Churn>,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub protocol: ProtocolParams,
    #[serde(default)]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub adversaries: Adversaries,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub invariants: Invariants,
    #[serde(default)]
    pub sweep: Option<Sweep>,
}

fn default_seed() -> u64 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierHint {
    A,
    #[default]
    B,
    Any,
}

/// Regions, the RTT matrix between them, and link properties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The regions, in matrix order. Default: the built-in six ([`regions::DEFAULT_REGIONS`]).
    #[serde(default = "default_regions")]
    pub regions: Vec<Region>,
    /// Round-trip times in ms, `rtt_ms[i][j]` between regions i and j. When absent, taken from the
    /// built-in table for the regions named (all must be built-in ones).
    #[serde(default)]
    pub rtt_ms: Option<Vec<Vec<f64>>>,
    /// Each one-way latency is multiplied by a factor drawn uniformly in `1 ± jitter`.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Probability that one request or response is lost (the sender sees a timeout).
    #[serde(default)]
    pub loss: f64,
    #[serde(default)]
    pub hole_punch: HolePunch,
    /// How Tier A's real nodes secure their connections (Tier B does not model it).
    #[serde(default)]
    pub security: Security,
}

/// A Tier A world's connection security.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Noise, as the product does.
    #[default]
    Noise,
    /// An exchange of public keys, nothing encrypted (`tidings_node::sim::plain`):
    /// cheaper in memory and CPU for the largest runs; messages stay end-to-end
    /// encrypted with MLS.
    Plaintext,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            regions: default_regions(),
            rtt_ms: None,
            jitter: default_jitter(),
            loss: 0.0,
            hole_punch: HolePunch::default(),
            security: Security::default(),
        }
    }
}

fn default_regions() -> Vec<Region> {
    regions::DEFAULT_REGIONS
        .iter()
        .map(|(n, o)| Region {
            name: (*n).to_string(),
            utc_offset_h: *o,
        })
        .collect()
}

fn default_jitter() -> f64 {
    0.1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    /// Local time offset, used by the diurnal churn factor.
    #[serde(default)]
    pub utc_offset_h: f64,
}

/// Probability that hole punching (DCUtR) turns a relayed connection into a direct one, by the
/// NAT classes of the two ends. A public end always gives a direct connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HolePunch {
    #[serde(default = "default_cone_cone")]
    pub cone_cone: f64,
    #[serde(default = "default_cone_symmetric")]
    pub cone_symmetric: f64,
    #[serde(default)]
    pub symmetric_symmetric: f64,
}

impl Default for HolePunch {
    fn default() -> Self {
        HolePunch {
            cone_cone: default_cone_cone(),
            cone_symmetric: default_cone_symmetric(),
            symmetric_symmetric: 0.0,
        }
    }
}

/// ~70% measured for DCUtR in the wild (shared/notes/ANCHORS.md).
fn default_cone_cone() -> f64 {
    0.7
}

fn default_cone_symmetric() -> f64 {
    0.1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Relay,
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhtMode {
    /// Answers DHT queries and sits in routing tables.
    Server,
    /// Only asks.
    Client,
    /// Server when publicly reachable, client behind a NAT.
    Auto,
}

impl DhtMode {
    /// Whether a node in this mode serves the DHT, given whether it is publicly reachable.
    pub fn is_server(self, public: bool) -> bool {
        match self {
            DhtMode::Server => true,
            DhtMode::Client => false,
            DhtMode::Auto => public,
        }
    }
}

/// One class of nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeClass {
    /// A label for outputs, e.g. `"relay"`, `"desktop"`.
    pub class: String,
    pub role: Role,
    pub count: u32,
    /// Access link bandwidth in Mbit/s. Default: 100 for relays, 20 for clients.
    #[serde(default)]
    pub bandwidth_mbps: Option<f64>,
    /// RTT added by the node's own last mile. Default: 1 ms for relays, 15 ms for clients.
    #[serde(default)]
    pub access_rtt_ms: Option<f64>,
    /// NAT mix, as weights. Default: all public for relays; 20/50/30 public/cone/symmetric for clients.
    #[serde(default)]
    pub nat: Option<NatMix>,
    /// Region weights by region name. Default: uniform over all regions.
    #[serde(default)]
    pub regions: BTreeMap<String, f64>,
    /// Whether `[churn]` applies to this class. Default: clients yes, relays no.
    #[serde(default)]
    pub churn: Option<bool>,
    /// Clients: number of home relays. Default 2.
    #[serde(default)]
    pub home_relays: Option<u32>,
    /// DHT mode. Default: server for relays, `auto` for clients.
    #[serde(default)]
    pub dht: Option<DhtMode>,
    /// Relays: time for a durable commit (two fsyncs), in ms. Default 2.
    #[serde(default)]
    pub commit_ms: Option<f64>,
}

impl NodeClass {
    /// The weight of each region (in `names` order) for placing this class's nodes: the class's
    /// own weights, or all regions alike.
    pub fn region_weights(&self, names: &[&str]) -> Vec<f64> {
        if self.regions.is_empty() {
            vec![1.0; names.len()]
        } else {
            names
                .iter()
                .map(|n| self.regions.get(*n).copied().unwrap_or(0.0))
                .collect()
        }
    }

    pub fn bandwidth_mbps(&self) -> f64 {
        self.bandwidth_mbps.unwrap_or(match self.role {
            Role::Relay => 100.0,
            Role::Client => 20.0,
        })
    }

    pub fn access_rtt_ms(&self) -> f64 {
        self.access_rtt_ms.unwrap_or(match self.role {
            Role::Relay => 1.0,
            Role::Client => 15.0,
        })
    }

    pub fn nat(&self) -> NatMix {
        self.nat.clone().unwrap_or(match self.role {
            Role::Relay => NatMix {
                public: 1.0,
                cone: 0.0,
                symmetric: 0.0,
            },
            Role::Client => NatMix {
                public: 0.2,
                cone: 0.5,
                symmetric: 0.3,
            },
        })
    }

    pub fn churns(&self) -> bool {
        self.churn.unwrap_or(self.role == Role::Client)
    }

    pub fn home_relays(&self) -> u32 {
        self.home_relays.unwrap_or(2)
    }

    pub fn dht(&self) -> DhtMode {
        self.dht.unwrap_or(match self.role {
            Role::Relay => DhtMode::Server,
            Role::Client => DhtMode::Auto,
        })
    }

    pub fn commit_ms(&self) -> f64 {
        self.commit_ms.unwrap_or(2.0)
    }
}

/// Weights of the three NAT classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatMix {
    #[serde(default)]
    pub public: f64,
    #[serde(default)]
    pub cone: f64,
    #[serde(default)]
    pub symmetric: f64,
}

/// A Weibull distribution of lengths: `scale · (−ln U)^(1/shape)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weibull {
    pub shape: f64,
    pub scale: SimDuration,
}

impl Weibull {
    /// The mean, `scale · Γ(1 + 1/shape)`, in seconds.
    pub fn mean_secs(&self) -> f64 {
        self.scale.as_secs_f64() * gamma(1.0 + 1.0 / self.shape)
    }
}

/// Γ(x) for x > 0 (Lanczos approximation, g = 7), good to ~1e-13.
pub fn gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * a
}

/// Online sessions and offline gaps of clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Length of an online session.
    pub session: Weibull,
    /// Length of an offline gap.
    pub offline: Weibull,
    /// Fraction of departures that close no connections (sleep, lost Wi-Fi); the rest are clean.
    #[serde(default = "default_silent")]
    pub silent_fraction: f64,
    #[serde(default)]
    pub diurnal: Option<Diurnal>,
}

impl Churn {
    /// Long-run fraction of time offline, `E[off] / (E[on] + E[off])`, ignoring the diurnal factor.
    pub fn offline_fraction(&self) -> f64 {
        let on = self.session.mean_secs();
        let off = self.offline.mean_secs();
        off / (on + off)
    }
}

fn default_silent() -> f64 {
    0.5
}

/// Daily rhythm: at local hour `h`, sessions are `1 + a·cos(2π(h − peak)/24)` times longer and
/// offline gaps that many times shorter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Diurnal {
    pub amplitude: f64,
    #[serde(default = "default_peak")]
    pub peak_hour: f64,
}

fn default_peak() -> f64 {
    20.0
}

/// What users do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Mean contacts per client (the contact graph is random and symmetric).
    #[serde(default = "default_contacts")]
    pub contacts_per_user: u32,
    /// Messages each client sends per hour while online (Poisson).
    #[serde(default = "default_rate")]
    pub messages_per_user_per_hour: f64,
    /// Mean message size in bytes (sizes are exponential, clamped to 16..=`message_bytes_max`).
    #[serde(default = "default_bytes")]
    pub message_bytes: u32,
    #[serde(default = "default_bytes_max")]
    pub message_bytes_max: u32,
    /// Group memberships per client on average (0 = no groups).
    #[serde(default)]
    pub groups_per_user: f64,
    /// Group sizes, uniform in `[min, max]` members.
    #[serde(default = "default_group_size")]
    pub group_size: [u32; 2],
    /// Fraction of messages sent to a group rather than a contact (needs groups).
    #[serde(default)]
    pub group_message_share: f64,
    /// DHT user-record lookups per client per hour (for contacts' records).
    #[serde(default = "default_record_lookups")]
    pub record_lookups_per_user_per_hour: f64,
    /// Chance that a one-to-one message shown to its recipient gets a reply (which may get a reply
    /// in turn): conversations come in bursts. Replies are on top of `messages_per_user_per_hour`,
    /// which counts conversation starts; the mean burst is 1 / (1 − p) messages.
    #[serde(default)]
    pub reply_probability: f64,
    /// Mean time before a reply (exponential).
    #[serde(default = "default_reply_delay")]
    pub reply_delay: SimDuration,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            contacts_per_user: default_contacts(),
            messages_per_user_per_hour: default_rate(),
            message_bytes: default_bytes(),
            message_bytes_max: default_bytes_max(),
            groups_per_user: 0.0,
            group_size: default_group_size(),
            group_message_share: 0.0,
            record_lookups_per_user_per_hour: default_record_lookups(),
            reply_probability: 0.0,
            reply_delay: default_reply_delay(),
        }
    }
}

fn default_contacts() -> u32 {
    10
}
fn default_rate() -> f64 {
    2.0
}
fn default_bytes() -> u32 {
    400
}
fn default_bytes_max() -> u32 {
    64 * 1024
}
fn default_group_size() -> [u32; 2] {
    [3, 20]
}
fn default_record_lookups() -> f64 {
    0.5
}
fn default_reply_delay() -> SimDuration {
    SimDuration::from_secs(30)
}

/// Protocol settings, with the real node's values as defaults (see docs/ARCHITECTURE.md and
/// docs/PROTOCOL.md). Tier A maps them onto the node's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolParams {
    pub kad_k: u32,
    pub kad_alpha: u32,
    /// Time before an unanswered DHT request counts as failed.
    pub kad_rpc_timeout: SimDuration,
    /// Time after which a whole lookup gives up.
    pub kad_query_timeout: SimDuration,
    /// DHT servers' routing tables reflect who was online at most this long ago (the node's
    /// refresh of the buckets that did not change for this long).
    pub kad_refresh: SimDuration,
    /// A DHT client refreshes its table (a self-lookup) when it made no lookup of its own for this
    /// long. Tier A only: Tier B charges no refresh traffic, and rebuilds any table that a lookup
    /// finds older than `kad_refresh`, as a client's own lookups keep its table fresh.
    pub kad_client_refresh: SimDuration,
    /// Owners republish their user record this often.
    pub record_republish: SimDuration,
    /// A record lookup reads on until it holds this many valid copies (the newest wins), or runs
    /// out of peers (the node's `get_record`).
    pub record_copies: u32,
    /// Round trips to open a connection before the first request (QUIC ≈ 2).
    pub connect_rtts: u32,
    /// Mailbox and deliver request timeout.
    pub request_timeout: SimDuration,
    /// How long a sender waits for a direct ack before depositing (DIRECT_PATIENCE).
    pub direct_patience: SimDuration,
    /// How long a peer that did not answer counts as away (AWAY_FOR).
    pub away_for: SimDuration,
    /// Devices drain and re-subscribe their home relays this often.
    pub mailbox_poll: SimDuration,
    /// Devices redial a home relay they lost this often (RESERVATION_RETRY), and drain and
    /// re-subscribe as soon as it answers.
    pub relay_redial: SimDuration,
    /// Group long-poll length.
    pub group_poll: SimDuration,
    /// Relay retention of undelivered mail.
    pub retention: SimDuration,
    /// Envelopes per fetch page.
    pub fetch_page: u32,
    /// Outbox retry backoff: first delay, doubling up to `retry_max`.
    pub retry_initial: SimDuration,
    pub retry_max: SimDuration,
    /// A relayed (circuit) connection is closed after this long.
    pub circuit_max_duration: SimDuration,
    /// An unused connection is closed after this long.
    pub idle_timeout: SimDuration,
    /// A connection to a device messages went to or came from stays open at least this long
    /// after the last one (Tier B: its contact connections last the longer of this and
    /// `idle_timeout`).
    pub conversation_keep_alive: SimDuration,
    /// Each side of a connection pings the other this often (libp2p ping; Tier A only).
    pub ping_interval: SimDuration,
    /// Each device renews its own keys in each of its groups this often: an MLS commit that
    /// every member applies (Tier A only; Tier B has no MLS).
    pub key_update: SimDuration,
}

impl ProtocolParams {
    /// How soon the owner of an inbox with no live subscription tries its relay again: it
    /// redials at the reservation retry and drains as soon as it connects, or re-checks at the
    /// mailbox poll, whichever comes first.
    pub fn unsubscribed_retry(&self) -> SimDuration {
        self.mailbox_poll.min(self.relay_redial)
    }
}

impl Default for ProtocolParams {
    fn default() -> Self {
        ProtocolParams {
            kad_k: 20,
            kad_alpha: 3,
            kad_rpc_timeout: SimDuration::from_secs(10),
            kad_query_timeout: SimDuration::from_secs(20),
            kad_refresh: SimDuration::from_secs(300),
            kad_client_refresh: SimDuration::from_secs(3600),
            record_republish: SimDuration::from_secs(3_600),
            record_copies: tidings_node::net::RECORD_COPIES as u32,
            connect_rtts: 2,
            request_timeout: SimDuration::from_secs(10),
            direct_patience: SimDuration::from_secs(5),
            away_for: SimDuration::from_secs(60),
            mailbox_poll: SimDuration::from_std(tidings_node::node::MAILBOX_RECHECK),
            relay_redial: SimDuration::from_std(tidings_node::net::RESERVATION_RETRY),
            group_poll: SimDuration::from_millis(tidings_node::relay::MAX_FETCH_WAIT_MS),
            retention: SimDuration::from_secs(14 * 86_400),
            fetch_page: 512,
            retry_initial: SimDuration::from_millis(100),
            retry_max: SimDuration::from_secs(30),
            circuit_max_duration: SimDuration::from_secs(120),
            idle_timeout: SimDuration::from_std(tidings_node::net::NetTuning::default().idle_timeout),
            conversation_keep_alive: SimDuration::from_std(
                tidings_node::net::NetTuning::default().conversation_keep_alive,
            ),
            ping_interval: SimDuration::from_std(tidings_node::net::NetTuning::default().ping_interval),
            key_update: SimDuration::from_std(tidings_node::NodeConfig::default().key_update_interval),
        }
    }
}

/// A timed fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// Cut the network between groups of regions from `at` until `heal` (absolute times).
    Partition(PartitionFault),
    /// Crash a fraction of the relays at `at`.
    KillRelays(KillRelaysFault),
    /// Crash a fraction of the relays and start them again after `downtime`, data kept.
    RestartRelays(RestartRelaysFault),
}

impl Fault {
    pub fn at(&self) -> SimDuration {
        match self {
            Fault::Partition(f) => f.at,
            Fault::KillRelays(f) => f.at,
            Fault::RestartRelays(f) => f.at,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionFault {
    pub at: SimDuration,
    /// When the cut heals; absent means never.
    #[serde(default)]
    pub heal: Option<SimDuration>,
    /// Each region in exactly one side; traffic flows only within a side.
    pub sides: Vec<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRelaysFault {
    pub at: SimDuration,
    pub fraction: f64,
    /// Start the killed relays again after this long; absent means they stay down.
    #[serde(default)]
    pub restart_after: Option<SimDuration>,
    /// What happens to their mailboxes: `kept` (a crash: committed mail survives) or `lost` (the
    /// disk is gone too).
    #[serde(default)]
    pub data: DataFate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartRelaysFault {
    pub at: SimDuration,
    pub fraction: f64,
    pub downtime: SimDuration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFate {
    #[default]
    Kept,
    Lost,
}

/// Hostile participants.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adversaries {
    /// Fraction of relays that sign custody receipts and then discard the mail.
    #[serde(default)]
    pub dropping_relays: f64,
    /// Fraction of relays that sign receipts and keep the mail but never hand it over.
    #[serde(default)]
    pub withholding_relays: f64,
    #[serde(default)]
    pub sybil: Option<Sybil>,
}

/// Sybil DHT servers whose ids are placed next to one client's user-record key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sybil {
    /// Number of Sybil nodes.
    pub nodes: u32,
    /// Index of the target among all clients (0-based, in population order).
    #[serde(default)]
    pub target_client: u32,
    /// How many leading bits of the target key each Sybil id shares.
    #[serde(default = "default_prefix_bits")]
    pub shared_prefix_bits: u32,
    /// Distinct network prefixes (/24s) the Sybils come from.
    #[serde(default = "default_one")]
    pub subnets: u32,
    /// Lookups of the target's record per hour, from random online clients.
    #[serde(default = "default_target_lookups")]
    pub target_lookups_per_hour: f64,
    /// The defence honest nodes run.
    #[serde(default)]
    pub mitigation: Mitigation,
    /// `disjoint-paths`: number of paths.
    #[serde(default = "default_paths")]
    pub disjoint_paths: u32,
    /// `bucket-diversity`: most entries from one subnet per bucket and per lookup.
    #[serde(default = "default_per_subnet")]
    pub per_subnet: u32,
}

fn default_prefix_bits() -> u32 {
    48
}
fn default_one() -> u32 {
    1
}
fn default_target_lookups() -> f64 {
    120.0
}
fn default_paths() -> u32 {
    3
}
fn default_per_subnet() -> u32 {
    2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mitigation {
    #[default]
    None,
    /// S/Kademlia-style lookups over d disjoint paths; success if any path succeeds.
    DisjointPaths,
    /// At most `per_subnet` entries from one subnet in a bucket and in a lookup's candidates.
    BucketDiversity,
}

/// What to measure and record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// A delivery counts as on time within this long of sending.
    pub deadline: SimDuration,
    /// Optional target for the on-time delivery ratio, reported as met or not.
    pub expect_delivery_ratio: Option<f64>,
    /// Time-series resolution.
    pub sample_every: SimDuration,
    /// `full`, `sampled` or `none` for events.jsonl.
    pub events: EventsMode,
    /// Fraction of nodes whose events are written in `sampled` mode.
    pub event_sample: f64,
    /// Hard cap on lines in events.jsonl.
    pub max_events: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            deadline: SimDuration::from_secs(60),
            expect_delivery_ratio: None,
            sample_every: SimDuration::from_secs(60),
            events: EventsMode::Sampled,
            event_sample: 0.01,
            max_events: 200_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsMode {
    Full,
    #[default]
    Sampled,
    None,
}

/// Which losses of acknowledged mail the scenario expects (any other loss fails the run).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Invariants {
    /// Mail whose every custody receipt came from dropping or withholding relays may be lost.
    pub allow_loss_on_adversarial_relays: bool,
    /// Mail whose every copy sat on relays killed with `data = "lost"` (or adversarial ones) may be lost.
    pub allow_loss_on_destroyed_relays: bool,
}

/// A sweep: the cartesian product of `params` × `seeds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    pub seeds: Seeds,
    /// Key path (dotted, with numeric indices into arrays, e.g. `"population.1.count"`) → values.
    #[serde(default)]
    pub params: BTreeMap<String, Vec<toml::Value>>,
}

/// Either a count (seeds `seed, seed+1, …`) or an explicit list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Seeds {
    Count(u32),
    List(Vec<u64>),
}

impl Scenario {
    /// The regions' names and the RTT between each pair in µs, row-major: the scenario's matrix,
    /// or the shipped one (100 ms for a pair it does not know).
    pub fn rtt_matrix_us(&self) -> (Vec<&str>, Vec<u32>) {
        let names: Vec<&str> = self.network.regions.iter().map(|x| x.name.as_str()).collect();
        let k = names.len();
        let mut rtt_us = vec![0u32; k * k];
        for i in 0..k {
            for j in 0..k {
                let ms = match &self.network.rtt_ms {
                    Some(m) => m[i][j],
                    None => regions::default_rtt(names[i], names[j]).unwrap_or(100.0),
                };
                rtt_us[i * k + j] = (ms * MICROS_PER_MS as f64) as u32;
            }
        }
        (names, rtt_us)
    }

    /// Parses and validates scenario text.
    pub fn from_toml(text: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse(Box::new(e)))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<(Scenario, String), ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok((Scenario::from_toml(&text)?, text))
    }

    /// Total number of nodes (Sybils included).
    pub fn node_count(&self) -> u64 {
        let classes: u64 = self.population.iter().map(|c| u64::from(c.count)).sum();
        classes + self.adversaries.sybil.as_ref().map_or(0, |s| u64::from(s.nodes))
    }

    pub fn client_count(&self) -> u64 {
        self.population
            .iter()
            .filter(|c| c.role == Role::Client)
            .map(|c| u64::from(c.count))
            .sum()
    }

    pub fn relay_count(&self) -> u64 {
        self.population
            .iter()
            .filter(|c| c.role == Role::Relay)
            .map(|c| u64::from(c.count))
            .sum()
    }
}

/// Sets `value` at a dotted key path in a TOML document, creating tables on the way. Numeric
/// segments index arrays, which must already hold that index.
pub fn set_key_path(doc: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), ScenarioError> {
    let bad = |reason: &str| ScenarioError::BadKeyPath {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let segments: Vec<&str> = path.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(bad("empty segment"));
    }
    let (last, parents) = segments.split_last().ok_or_else(|| bad("empty path"))?;
    let mut cur: &mut toml::Value = doc
        .entry(parents.first().copied().unwrap_or(last).to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if parents.is_empty() {
        *cur = value;
        return Ok(());
    }
    for seg in parents.iter().skip(1).chain(std::iter::once(last)) {
        cur = match cur {
            toml::Value::Table(t) => t
                .entry(seg.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
            toml::Value::Array(a) => {
                let i: usize = seg.parse().map_err(|_| bad("an array needs a numeric index"))?;
                let len = a.len();
                a.get_mut(i)
                    .ok_or_else(|| bad(&format!("index {i} is past the array's {len} elements")))?
            }
            _ => return Err(bad("a segment goes through a value that is not a table or an array")),
        };
    }
    *cur = value;
    Ok(())
}

/// A one-minute scenario named `name` with `relays` relays and `clients` desktop clients, then
/// `extra` TOML (a client table such as `nat = {...}` first, then any other tables): what unit
/// tests of the tiers build their worlds from.
#[cfg(test)]
pub(crate) fn two_classes(name: &str, relays: u32, clients: u32, extra: &str) -> Scenario {
    let text = format!(
        "name = \"{name}\"\nduration = \"1m\"\n[[population]]\nclass = \"relay\"\nrole = \"relay\"\ncount = {relays}\n\
         [[population]]\nclass = \"desktop\"\nrole = \"client\"\ncount = {clients}\n{extra}\n"
    );
    match Scenario::from_toml(&text) {
        Ok(sc) => sc,
        Err(e) => panic!("test scenario: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_matches_known_values() {
        assert!((gamma(1.0) - 1.0).abs() < 1e-12);
        assert!((gamma(5.0) - 24.0).abs() < 1e-9);
        assert!((gamma(0.5) - std::f64::consts::PI.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn connection_security_is_noise_unless_a_scenario_asks_for_plaintext() {
        let smoke = include_str!("../scenarios/smoke.toml");
        assert_eq!(Scenario::from_toml(smoke).unwrap().network.security, Security::Noise);
        let mut doc: toml::Table = toml::from_str(smoke).unwrap();
        set_key_path(&mut doc, "network.security", "plaintext".into()).unwrap();
        let sc = Scenario::from_toml(&toml::to_string(&doc).unwrap()).unwrap();
        assert_eq!(sc.network.security, Security::Plaintext);
        set_key_path(&mut doc, "network.security", "tls".into()).unwrap();
        assert!(Scenario::from_toml(&toml::to_string(&doc).unwrap()).is_err());
    }

    #[test]
    fn key_paths_reach_into_tables_and_arrays() {
        let mut doc: toml::Table = toml::from_str("a = 1\n[[p]]\nx = 1\n[[p]]\nx = 2\n").unwrap();
        set_key_path(&mut doc, "p.1.x", toml::Value::Integer(7)).unwrap();
        set_key_path(&mut doc, "q.r", toml::Value::Integer(3)).unwrap();
        set_key_path(&mut doc, "a", toml::Value::Integer(2)).unwrap();
        assert_eq!(doc["p"][1]["x"].as_integer(), Some(7));
        assert_eq!(doc["q"]["r"].as_integer(), Some(3));
        assert_eq!(doc["a"].as_integer(), Some(2));
        assert!(set_key_path(&mut doc, "p.5.x", toml::Value::Integer(1)).is_err());
        assert!(set_key_path(&mut doc, "a.b", toml::Value::Integer(1)).is_err());
    }
}
