//! The libp2p side of a node: one swarm, owned by one task.
//!
//! [`spawn`] builds the swarm and starts the event loop; the rest of the node
//! talks to it through a cloneable [`Network`] handle of bounded channels and
//! receives inbound requests as [`NetEvent`]s. Inbound requests carry an id;
//! the reply goes back with [`Network::respond_deliver`] once the core has
//! committed what it received.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{self, GetClosestPeersOk, GetRecordOk, InboundRequest, QueryResult, Quorum, Record, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, dcutr, identify, mdns, noise, ping, relay, tcp, yamux,
};
use tidings_protocol::limits::{MAX_DELIVER_FRAME, MAX_KEY_PACKAGE_FRAME, MAX_MAILBOX_FRAME, MAX_USER_RECORD};
use tidings_protocol::pb;
use tidings_protocol::record::UserRecord;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::codec::ProstCodec;

mod boxed;
mod candidates;
mod circuits;
mod dials_in_flight;
mod keep_alive;
mod ping_later;
mod refresh;
mod woken;
mod wrap;
use boxed::{Boxed, boxed};
use circuits::CircuitsWaiting;
use dials_in_flight::DialsInFlight;
use refresh::BucketRefresh;
use woken::{Rooted, Wakes, WhenWoken, rooted, when_woken, when_woken_without_peer_addresses};

pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/tidings/kad/1.0.0");
pub const DELIVER_PROTOCOL: StreamProtocol = StreamProtocol::new("/tidings/deliver/1");
pub const KEY_PACKAGE_PROTOCOL: StreamProtocol = StreamProtocol::new("/tidings/keypackage/1");
pub const MAILBOX_PROTOCOL: StreamProtocol = StreamProtocol::new("/tidings/mailbox/1");
pub const LINK_PROTOCOL: StreamProtocol = StreamProtocol::new("/tidings/link/1");
pub const IDENTIFY_PROTOCOL: &str = "/tidings/id/1.0.0";

/// A record lookup stops once it holds this many valid copies (the caller
/// takes the newest), or when the DHT runs out of closer peers.
pub const RECORD_COPIES: usize = 3;
/// Capacity of the command and event channels.
const CHANNEL_CAPACITY: usize = 1024;
/// Most inbound requests awaiting the core's reply at once.
const MAX_PENDING_INBOUND: usize = 4096;

type DeliverBehaviour = request_response::Behaviour<ProstCodec<pb::DeliverRequest, pb::DeliverResponse>>;
type KeyPackageBehaviour = request_response::Behaviour<ProstCodec<pb::KeyPackageRequest, pb::KeyPackageResponse>>;
type MailboxBehaviour = request_response::Behaviour<ProstCodec<pb::MailboxRequest, pb::MailboxResponse>>;
type LinkBehaviour = request_response::Behaviour<ProstCodec<pb::LinkRequest, pb::LinkResponse>>;

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Off on relays, which neither reserve circuits nor dial them: its
    /// handler would sit on every connection a relay serves.
    relay_client: WhenWoken<Toggle<relay::client::Behaviour>>,
    relay: WhenWoken<Toggle<relay::Behaviour>>,
    dcutr: WhenWoken<dcutr::Behaviour>,
    autonat_client: WhenWoken<candidates::DirectCandidates<autonat::v2::client::Behaviour>>,
    autonat_server: WhenWoken<Toggle<autonat::v2::server::Behaviour>>,
    identify: WhenWoken<identify::Behaviour>,
    ping: WhenWoken<ping_later::PingLater<ping::Behaviour>>,
    kad: WhenWoken<DialsInFlight<kad::Behaviour<MemoryStore>>>,
    deliver: WhenWoken<DeliverBehaviour>,
    key_package: WhenWoken<KeyPackageBehaviour>,
    mailbox: WhenWoken<MailboxBehaviour>,
    link: WhenWoken<LinkBehaviour>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    keep_alive: WhenWoken<keep_alive::KeepAlive>,
}

/// Network errors reported to callers.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    #[error("could not reach the peer: {0}")]
    Unreachable(String),
    #[error("the peer did not answer in time")]
    Timeout,
    #[error("the request failed: {0}")]
    Failed(String),
    #[error("nothing found in the DHT")]
    NotFound,
    #[error("the network task has stopped")]
    Stopped,
}

/// How the swarm is set up.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// Answer DHT queries (server mode). Nodes that cannot be reached from
    /// outside should set this to false.
    pub dht_server: bool,
    pub request_timeout: Duration,
    /// Serve as a relay: circuit relay v2 server, AutoNAT server and mailbox service.
    pub relay_server: Option<RelayServerConfig>,
    /// Addresses others can dial us on (announced; e.g. a relay's public address).
    pub external_addrs: Vec<Multiaddr>,
    /// Relays (`…/p2p/<relay id>`) to reserve a circuit on, so that peers that
    /// cannot dial us directly reach us through `/p2p-circuit`.
    pub reserve_on: Vec<Multiaddr>,
    /// Announce every bound listen address as an external address. A relay
    /// must have at least one external address to grant circuit reservations;
    /// set this when the listen addresses are the ones others dial (a specific
    /// public IP, or loopback in tests and the demo).
    pub announce_listen_addrs: bool,
    /// Run over a simulated network instead of sockets (the simulator): the
    /// node then listens and dials only `/memory/<port>` addresses.
    pub sim: Option<SimHost>,
    /// Timers and sizes of the connection and DHT layers.
    pub tuning: NetTuning,
    /// DHT servers met before (a saved routing table, see
    /// [`Network::routing_peers`]): added to the routing table at the start,
    /// next to `bootstrap`, so that a restart neither depends on the
    /// bootstrap peers nor fills its table one peer at a time.
    pub known_peers: Vec<(PeerId, Vec<Multiaddr>)>,
    /// How long ago `known_peers` were last the routing table (`None`: not
    /// known). A DHT client whose saved table is younger than its refresh
    /// period (`NetTuning::kad_client_refresh`) and full enough starts
    /// without a self-lookup (see [`start_lookup_needed`]).
    pub known_peers_age: Option<Duration>,
}

/// Timers and sizes of the connection and DHT layers. The defaults are the
/// product's; the simulator sets them from a scenario's `[protocol]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetTuning {
    /// A connection no protocol uses is closed after this long: one that
    /// served a DHT lookup, a deposit or a probe does not linger.
    pub idle_timeout: Duration,
    /// A connection to a device we exchanged messages with stays open at
    /// least this long after the last one (`keep_alive::KeepAlive`), so a
    /// conversation does not dial (or punch a hole) for every message.
    pub conversation_keep_alive: Duration,
    /// A whole DHT lookup gives up after this long.
    pub kad_query_timeout: Duration,
    /// DHT requests in flight per lookup (Kademlia's alpha).
    pub kad_parallelism: std::num::NonZeroUsize,
    /// Bucket size and replication factor (Kademlia's k).
    pub kad_replication: std::num::NonZeroUsize,
    /// How often a DHT server's routing table is refreshed: it looks up the
    /// buckets that have not changed for a period (`net::refresh`).
    pub kad_refresh: Duration,
    /// A DHT client looks itself up when it made no lookup of its own for
    /// this long (`net::refresh`): its table only starts its own lookups, and
    /// each of those refreshes it.
    pub kad_client_refresh: Duration,
    /// How often each side of a connection pings the other, the first time
    /// once the connection is this old (`net::ping_later`). Nothing reads
    /// the round trips: pings only keep idle connections' NAT mappings fresh
    /// (QUIC has its own keep-alive), so once a minute is enough.
    pub ping_interval: Duration,
}

impl Default for NetTuning {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            conversation_keep_alive: Duration::from_secs(120),
            kad_query_timeout: Duration::from_secs(20),
            kad_parallelism: kad::ALPHA_VALUE,
            kad_replication: kad::K_VALUE,
            kad_refresh: Duration::from_secs(300),
            kad_client_refresh: Duration::from_secs(3600),
            ping_interval: Duration::from_secs(60),
        }
    }
}

/// A host in a simulated network: its world and its port there.
#[derive(Debug, Clone)]
pub struct SimHost {
    pub net: crate::sim::SimNetwork,
    pub port: u64,
}

/// Limits of the circuit relay v2 server.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayServerConfig {
    pub max_reservations: usize,
    pub max_reservations_per_peer: usize,
    pub reservation_duration_secs: u64,
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    pub max_circuit_duration_secs: u64,
    pub max_circuit_bytes: u64,
}

impl Default for RelayServerConfig {
    fn default() -> Self {
        Self {
            max_reservations: 1024,
            max_reservations_per_peer: 4,
            reservation_duration_secs: 3600,
            max_circuits: 256,
            max_circuits_per_peer: 8,
            max_circuit_duration_secs: 120,
            max_circuit_bytes: 1 << 20,
        }
    }
}

/// The peer an address ends in (`…/p2p/<peer id>`), if it names one.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) => Some(p),
        _ => None,
    }
}

/// A relay address (`…/p2p/<relay id>`) as text: its peer and the address.
pub fn parse_relay(r: &str) -> Option<(PeerId, Multiaddr)> {
    let addr: Multiaddr = r.parse().ok()?;
    Some((peer_of(&addr)?, addr))
}

/// TCP and QUIC listen addresses on `ip`, any free port.
pub fn any_port_addrs(ip: std::net::Ipv4Addr) -> Vec<Multiaddr> {
    use libp2p::multiaddr::Protocol;
    let base = Multiaddr::empty().with(Protocol::Ip4(ip));
    vec![
        base.clone().with(Protocol::Tcp(0)),
        base.with(Protocol::Udp(0)).with(Protocol::QuicV1),
    ]
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: any_port_addrs(std::net::Ipv4Addr::UNSPECIFIED),
            bootstrap: Vec::new(),
            mdns: false,
            dht_server: true,
            request_timeout: Duration::from_secs(10),
            relay_server: None,
            external_addrs: Vec::new(),
            reserve_on: Vec::new(),
            announce_listen_addrs: false,
            sim: None,
            tuning: NetTuning::default(),
            known_peers: Vec::new(),
            known_peers_age: None,
        }
    }
}

/// Requests from the network that the core must answer.
#[derive(Debug)]
pub enum NetEvent {
    Mailbox {
        id: u64,
        peer: PeerId,
        /// IP address the request's connection comes from (for per-IP limits).
        ip: Option<IpAddr>,
        request: pb::MailboxRequest,
    },
    Deliver {
        id: u64,
        peer: PeerId,
        request: pb::DeliverRequest,
    },
    KeyPackage {
        id: u64,
        peer: PeerId,
        request: pb::KeyPackageRequest,
    },
    /// A device of ours being linked (`/tidings/link/1`).
    Link {
        id: u64,
        peer: PeerId,
        request: pb::LinkRequest,
    },
    Connected(PeerId),
}

/// A snapshot of the swarm for `tidings status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NetStatus {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub connected_peers: usize,
    pub dht_peers: usize,
    /// Relayed connections upgraded to direct ones by hole punching (DCUtR).
    pub hole_punches: u64,
}

enum Command {
    Deliver {
        peer: PeerId,
        request: pb::DeliverRequest,
        reply: oneshot::Sender<Result<pb::DeliverResponse, NetError>>,
    },
    KeyPackage {
        peer: PeerId,
        request: pb::KeyPackageRequest,
        reply: oneshot::Sender<Result<pb::KeyPackageResponse, NetError>>,
    },
    RespondDeliver {
        id: u64,
        response: pb::DeliverResponse,
    },
    RespondKeyPackage {
        id: u64,
        response: pb::KeyPackageResponse,
    },
    Link {
        peer: PeerId,
        request: pb::LinkRequest,
        reply: oneshot::Sender<Result<pb::LinkResponse, NetError>>,
    },
    RespondLink {
        id: u64,
        response: pb::LinkResponse,
    },
    Mailbox {
        peer: PeerId,
        request: pb::MailboxRequest,
        reply: oneshot::Sender<Result<pb::MailboxResponse, NetError>>,
    },
    RespondMailbox {
        id: u64,
        response: pb::MailboxResponse,
    },
    FindPeer {
        peer: PeerId,
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    PutRecord {
        key: Vec<u8>,
        value: Vec<u8>,
        holders: Option<Holders>,
        reply: PutRecordReply,
    },
    GetRecord {
        key: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<Vec<u8>>, NetError>>,
    },
    Dial {
        addr: Multiaddr,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    RoutingPeers {
        max: usize,
        reply: oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>)>>,
    },
    SetRelays {
        relays: Vec<Multiaddr>,
    },
    IsConnected {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    Connections {
        peer: PeerId,
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    LocalRecord {
        key: Vec<u8>,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    Status {
        reply: oneshot::Sender<NetStatus>,
    },
}

/// Handle to the network task.
#[derive(Clone)]
pub struct Network {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    /// How long a mailbox request waits for its answer (a held fetch waits
    /// longer: [`Network::mailbox_held`]).
    request_timeout: Duration,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Network({})", self.peer_id)
    }
}

impl Network {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    pub async fn deliver(&self, peer: PeerId, request: pb::DeliverRequest) -> Result<pb::DeliverResponse, NetError> {
        self.call(|reply| Command::Deliver { peer, request, reply }).await?
    }

    pub async fn fetch_key_package(
        &self,
        peer: PeerId,
        request: pb::KeyPackageRequest,
    ) -> Result<pb::KeyPackageResponse, NetError> {
        self.call(|reply| Command::KeyPackage { peer, request, reply }).await?
    }

    /// Sends a mailbox request to a relay; gives up after the request timeout.
    pub async fn mailbox(&self, peer: PeerId, request: pb::MailboxRequest) -> Result<pb::MailboxResponse, NetError> {
        self.mailbox_within(peer, request, self.request_timeout).await
    }

    /// Sends a fetch that the relay may hold for up to `wait` (`Fetch::wait_ms`,
    /// at most [`crate::relay::MAX_FETCH_WAIT_MS`]) until something arrives: it
    /// gives up after `wait` plus the request timeout.
    pub async fn mailbox_held(
        &self,
        peer: PeerId,
        request: pb::MailboxRequest,
        wait: Duration,
    ) -> Result<pb::MailboxResponse, NetError> {
        self.mailbox_within(peer, request, self.request_timeout + wait).await
    }

    async fn mailbox_within(
        &self,
        peer: PeerId,
        request: pb::MailboxRequest,
        limit: Duration,
    ) -> Result<pb::MailboxResponse, NetError> {
        let call = self.call(|reply| Command::Mailbox { peer, request, reply });
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result?,
            Err(_) => Err(NetError::Timeout),
        }
    }

    pub async fn respond_mailbox(&self, id: u64, response: pb::MailboxResponse) {
        let _ = self.tx.send(Command::RespondMailbox { id, response }).await;
    }

    pub async fn respond_deliver(&self, id: u64, response: pb::DeliverResponse) {
        let _ = self.tx.send(Command::RespondDeliver { id, response }).await;
    }

    pub async fn respond_key_package(&self, id: u64, response: pb::KeyPackageResponse) {
        let _ = self.tx.send(Command::RespondKeyPackage { id, response }).await;
    }

    /// Sends a link request to a device of our account.
    pub async fn link(&self, peer: PeerId, request: pb::LinkRequest) -> Result<pb::LinkResponse, NetError> {
        self.call(|reply| Command::Link { peer, request, reply }).await?
    }

    pub async fn respond_link(&self, id: u64, response: pb::LinkResponse) {
        let _ = self.tx.send(Command::RespondLink { id, response }).await;
    }

    /// Looks a peer up in the DHT and remembers the addresses found.
    pub async fn find_peer(&self, peer: PeerId) -> Result<Vec<Multiaddr>, NetError> {
        self.call(|reply| Command::FindPeer { peer, reply }).await
    }

    /// Publishes a record: at `holders`, the servers an earlier lookup found
    /// nearest the key, if given; otherwise at those a lookup finds now, which
    /// it returns for the next publication (see `RECORD_HOLDERS_FRESH`).
    pub async fn put_record(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        holders: Option<Holders>,
    ) -> Result<Option<Holders>, NetError> {
        self.call(|reply| Command::PutRecord {
            key,
            value,
            holders,
            reply,
        })
        .await?
    }

    /// Every validated copy of a record found in the DHT.
    pub async fn get_record(&self, key: Vec<u8>) -> Result<Vec<Vec<u8>>, NetError> {
        self.call(|reply| Command::GetRecord { key, reply }).await?
    }

    /// Whether a connection to `peer` is open.
    pub async fn is_connected(&self, peer: PeerId) -> bool {
        self.call(|reply| Command::IsConnected { peer, reply })
            .await
            .unwrap_or(false)
    }

    /// Remote addresses of our open connections to `peer`; a relayed one
    /// contains `/p2p-circuit`.
    pub async fn connections(&self, peer: PeerId) -> Vec<Multiaddr> {
        self.call(|reply| Command::Connections { peer, reply })
            .await
            .unwrap_or_default()
    }

    /// Remembers an address for a peer (used when dialling it).
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) {
        let _ = self.tx.send(Command::AddAddress { peer, addr }).await;
    }

    /// Up to `max` peers of the DHT routing table with their addresses, taken
    /// in turn from each bucket (near and far ones alike), connected ones
    /// first within a bucket. Empty once the network task has stopped.
    pub async fn routing_peers(&self, max: usize) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::RoutingPeers { max, reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Holds circuit reservations on exactly these relays (`…/p2p/<relay id>`):
    /// new ones are dialled and reserved on, dropped ones are let go.
    pub async fn set_relays(&self, relays: Vec<Multiaddr>) {
        let _ = self.tx.send(Command::SetRelays { relays }).await;
    }

    /// The record this node's own DHT store holds under `key`.
    pub async fn local_record(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, NetError> {
        self.call(|reply| Command::LocalRecord { key, reply }).await
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.tx
            .send(Command::Dial { addr })
            .await
            .map_err(|_| NetError::Stopped)
    }

    pub async fn status(&self) -> Result<NetStatus, NetError> {
        self.call(|reply| Command::Status { reply }).await
    }
}

/// What the behaviours are made from (the same over sockets and in the simulator).
struct BehaviourParams {
    peer_id: PeerId,
    mdns: bool,
    relay: Option<RelayServerConfig>,
    request_timeout: Duration,
    tuning: NetTuning,
}

fn behaviour(
    key: &libp2p::identity::Keypair,
    relay_client: relay::client::Behaviour,
    params: &BehaviourParams,
) -> Result<Boxed<Rooted<Behaviour>>, Box<dyn std::error::Error + Send + Sync>> {
    let (peer_id, mdns_on, relay_cfg, request_timeout) =
        (params.peer_id, params.mdns, &params.relay, params.request_timeout);
    let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
    kad_cfg
        .set_record_filtering(kad::StoreInserts::FilterBoth)
        .set_query_timeout(params.tuning.kad_query_timeout)
        .set_parallelism(params.tuning.kad_parallelism)
        .set_replication_factor(params.tuning.kad_replication)
        .set_kbucket_size(params.tuning.kad_replication)
        // The node refreshes its table itself (`EventLoop::run` and
        // `refresh::BucketRefresh`): a DHT server only the buckets that have
        // not changed for a period, a client by looking itself up.
        .set_periodic_bootstrap_interval(None);
    let store = MemoryStore::with_config(
        peer_id,
        MemoryStoreConfig {
            max_records: 4096,
            max_value_bytes: MAX_USER_RECORD,
            ..Default::default()
        },
    );
    let kad = kad::Behaviour::with_config(peer_id, store, kad_cfg);
    let rr_cfg = request_response::Config::default().with_request_timeout(request_timeout);
    let deliver = request_response::Behaviour::with_codec(
        ProstCodec::new(MAX_DELIVER_FRAME),
        [(DELIVER_PROTOCOL, ProtocolSupport::Full)],
        rr_cfg.clone().with_max_concurrent_streams(256),
    );
    let key_package = request_response::Behaviour::with_codec(
        ProstCodec::new(MAX_KEY_PACKAGE_FRAME),
        [(KEY_PACKAGE_PROTOCOL, ProtocolSupport::Full)],
        rr_cfg.clone(),
    );
    // Only relays answer mailbox requests; everyone can ask.
    let mailbox_support = if relay_cfg.is_some() {
        ProtocolSupport::Full
    } else {
        ProtocolSupport::Outbound
    };
    // A relay holds a long-polling fetch for up to MAX_FETCH_WAIT_MS, so
    // libp2p's own limit (on both sides) leaves room for that; the client's
    // calls keep the request timeout of their own (`Network::mailbox`).
    let mailbox_limit = request_timeout + Duration::from_millis(crate::relay::MAX_FETCH_WAIT_MS);
    let mailbox = request_response::Behaviour::with_codec(
        ProstCodec::new(MAX_MAILBOX_FRAME),
        [(MAILBOX_PROTOCOL, mailbox_support)],
        rr_cfg
            .with_request_timeout(mailbox_limit)
            .with_max_concurrent_streams(1024),
    );
    let link = request_response::Behaviour::with_codec(
        ProstCodec::new(MAX_DELIVER_FRAME),
        [(LINK_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
    );
    let relay = relay_cfg.as_ref().map(|c| {
        relay::Behaviour::new(
            peer_id,
            relay::Config {
                max_reservations: c.max_reservations,
                max_reservations_per_peer: c.max_reservations_per_peer,
                reservation_duration: Duration::from_secs(c.reservation_duration_secs),
                max_circuits: c.max_circuits,
                max_circuits_per_peer: c.max_circuits_per_peer,
                max_circuit_duration: Duration::from_secs(c.max_circuit_duration_secs),
                max_circuit_bytes: c.max_circuit_bytes,
                ..relay::Config::default()
            },
        )
    });
    let autonat_server = relay_cfg.as_ref().map(|_| autonat::v2::server::Behaviour::default());
    let mdns = if mdns_on {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?)
    } else {
        None
    };
    // One word of wake flags per connection for all the handlers below, and
    // one registration of the connection task's waker per poll (`rooted`).
    let wakes = Wakes::default();
    let behaviour = Behaviour {
        relay_client: when_woken(relay_cfg.is_none().then_some(relay_client).into(), &wakes),
        relay: when_woken(relay.into(), &wakes),
        dcutr: when_woken(dcutr::Behaviour::new(peer_id), &wakes),
        autonat_client: when_woken(
            candidates::direct_candidates(autonat::v2::client::Behaviour::default()),
            &wakes,
        ),
        autonat_server: when_woken(autonat_server.into(), &wakes),
        identify: when_woken(
            identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                    .with_agent_version(format!("tidings/{}", env!("CARGO_PKG_VERSION")))
                    .with_interval(IDENTIFY_INTERVAL),
            ),
            &wakes,
        ),
        ping: when_woken(
            ping_later::ping_later(
                ping::Behaviour::new(ping::Config::new().with_interval(params.tuning.ping_interval)),
                params.tuning.ping_interval,
            ),
            &wakes,
        ),
        kad: when_woken(DialsInFlight::new(kad), &wakes),
        // Of the four request-response behaviours, the mailbox's keeps the peers' addresses that
        // every dial is offered (see `when_woken_without_peer_addresses`).
        deliver: when_woken_without_peer_addresses(deliver, &wakes),
        key_package: when_woken_without_peer_addresses(key_package, &wakes),
        mailbox: when_woken(mailbox, &wakes),
        link: when_woken_without_peer_addresses(link, &wakes),
        mdns: mdns.into(),
        keep_alive: when_woken(keep_alive::KeepAlive::default(), &wakes),
    };
    Ok(boxed(rooted(behaviour, &wakes)))
}

/// How often the two ends of a long-lived connection identify each other again
/// after the exchange at its start (libp2p's default is 5 minutes). Nothing in
/// an identify that Tidings reads changes while a connection lives: a DHT
/// server's listen addresses are fixed, a change of protocols is pushed at
/// once, and devices' addresses travel in their user records. Each repeat is
/// a substream, two messages and a round in the routing table for every
/// connection to a home relay.
const IDENTIFY_INTERVAL: Duration = Duration::from_secs(30 * 60);

/// How long a DHT client whose start needs a self-lookup waits for a lookup of
/// its own instead (its user record's publication, a record or peer lookup):
/// that lookup fills the table from the bootstrap peers just as well.
pub const START_LOOKUP_GRACE: Duration = Duration::from_secs(10);

/// How long a node renews its own record at the servers its last full
/// publication found nearest the key, without looking the key up again. The
/// servers holding a record hand it on hourly to whoever is now nearest
/// (libp2p's replication), so a newcomer near the key gets it anyway; the
/// owner's lookup every few hours keeps its own set from drifting.
pub const RECORD_HOLDERS_FRESH: Duration = Duration::from_secs(6 * 3600);

/// Whether a node's start needs a self-lookup. A DHT server does: it meets
/// its neighbours, who add it to their tables. A DHT client is in nobody's
/// table and its own only gives its lookups a place to start; one that saved
/// at least a bucket's worth of peers less than its refresh period ago starts
/// from those, and its first lookup meets whoever has changed.
fn start_lookup_needed(config: &NetConfig) -> bool {
    let recent = config
        .known_peers_age
        .is_some_and(|age| age < config.tuning.kad_client_refresh);
    config.dht_server || !recent || config.known_peers.len() < config.tuning.kad_replication.get()
}

/// Builds the swarm, starts listening and spawns the event loop.
/// Returns once every listen address is bound.
pub async fn spawn(
    keypair: Keypair,
    config: NetConfig,
    clock: Clock,
    metrics: Option<libp2p::metrics::Metrics>,
) -> anyhow::Result<(
    Network,
    mpsc::Receiver<NetEvent>,
    Vec<Multiaddr>,
    tokio::task::JoinHandle<()>,
)> {
    let peer_id = keypair.public().to_peer_id();
    let mdns_on = config.mdns;
    let relay_cfg = config.relay_server.clone();
    let request_timeout = config.request_timeout;
    let params = BehaviourParams {
        peer_id,
        mdns: mdns_on,
        relay: relay_cfg,
        request_timeout,
        tuning: config.tuning.clone(),
    };
    let idle_timeout = config.tuning.idle_timeout;
    let idle = move |c: libp2p::swarm::Config| c.with_idle_connection_timeout(idle_timeout);
    let mut swarm = match &config.sim {
        None => libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_quic()
            .with_dns()?
            .with_relay_client(noise::Config::new, yamux::Config::default)?
            .with_behaviour(|key, relay_client| behaviour(key, relay_client, &params))?
            .with_swarm_config(idle)
            .build(),
        Some(host) => {
            // One swarm over the simulated links, secured as the world says; the
            // builder's types differ by security, hence a macro rather than a function.
            macro_rules! sim_swarm {
                ($security:expr, $relay_security:expr) => {
                    libp2p::SwarmBuilder::with_existing_identity(keypair)
                        .with_tokio()
                        .with_other_transport(|key| {
                            use libp2p::core::Transport as _;
                            let counters = host.net.host_bytes(host.port);
                            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                                host.net
                                    .transport(host.port)
                                    .upgrade(libp2p::core::upgrade::Version::V1)
                                    .authenticate($security(key)?)
                                    .multiplex(yamux::Config::default())
                                    .map(
                                        move |(peer, muxer), endpoint: libp2p::core::ConnectedPoint| {
                                            let dialled = endpoint.is_dialer();
                                            (
                                                peer,
                                                crate::sim::count::CountingMuxer::new(muxer, counters, dialled),
                                            )
                                        },
                                    ),
                            )
                        })?
                        .with_relay_client($relay_security, yamux::Config::default)?
                        .with_behaviour(|key, relay_client| behaviour(key, relay_client, &params))?
                        .with_swarm_config(idle)
                        .build()
                };
            }
            let plaintext = |key: &libp2p::identity::Keypair| {
                Ok::<_, std::convert::Infallible>(crate::sim::plain::PlainIds::new(key))
            };
            match host.net.security() {
                crate::sim::Security::Noise => sim_swarm!(noise::Config::new, noise::Config::new),
                crate::sim::Security::Plaintext => sim_swarm!(plaintext, plaintext),
            }
        }
    };

    // Fixed either way: in automatic mode a circuit reservation (which the relay
    // client reports as a confirmed external address) would turn a node behind
    // a NAT into a DHT server that publishes addresses nobody can dial.
    let mode = if config.dht_server {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    };
    swarm.behaviour_mut().kad.set_mode(Some(mode));
    if let Some(relay) = swarm.behaviour_mut().relay.as_mut() {
        // Serve circuits even before an external address is confirmed (LANs, tests).
        relay.set_status(Some(relay::Status::Enable));
    }
    for addr in &config.external_addrs {
        swarm.add_external_address(addr.clone());
    }
    for addr in &config.listen {
        swarm.listen_on(addr.clone())?;
    }
    // Wait until every listener reports its address.
    let mut listen_addrs = Vec::new();
    while listen_addrs.len() < config.listen.len() {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { address, .. } => listen_addrs.push(address),
            SwarmEvent::ListenerError { error, .. } => anyhow::bail!("listening failed: {error}"),
            SwarmEvent::ListenerClosed { reason: Err(e), .. } => anyhow::bail!("listening failed: {e}"),
            _ => {}
        }
    }
    if config.announce_listen_addrs {
        for addr in &listen_addrs {
            swarm.add_external_address(addr.clone());
        }
    }
    for addr in &config.bootstrap {
        match addr.iter().last() {
            Some(Protocol::P2p(peer)) => {
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                swarm.add_peer_address(peer, addr.clone());
            }
            _ => warn!(%addr, "bootstrap address has no /p2p/<peer id>; dialling it anyway"),
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%addr, "cannot dial bootstrap peer: {e}");
        }
    }
    // Known peers go in before the bootstrap starts: with 20 or more in the
    // table, libp2p does not start a second bootstrap as the first one adds
    // peers (see `BucketRefresh`).
    for (peer, addrs) in &config.known_peers {
        if peer != swarm.local_peer_id() {
            for addr in addrs {
                swarm.behaviour_mut().kad.add_address(peer, addr.clone());
            }
        }
    }
    let mut quiet_bootstraps = HashSet::new();
    let mut start_lookup_due = None;
    if !config.bootstrap.is_empty() || !config.known_peers.is_empty() {
        // libp2p bootstraps on its own half a second after the first listen
        // address while nothing is connected; starting one here resets that.
        let started = swarm.behaviour_mut().kad.bootstrap();
        let needed = start_lookup_needed(&config);
        if (!needed || !config.dht_server)
            && let Ok(id) = started
            && let Some(mut q) = swarm.behaviour_mut().kad.query_mut(&id)
        {
            // Ended before its first request: the bucket lookups libp2p then
            // queues end the same way (`on_kad_event`).
            q.finish();
            quiet_bootstraps.insert(id);
            if needed {
                // A client's first lookup of its own is usually moments away
                // (a first start publishes the user record at once); the
                // self-lookup waits for it and is dropped if it comes.
                debug!("the start's self-lookup waits for a lookup of this node's own");
                start_lookup_due = Some(tokio::time::Instant::now() + START_LOOKUP_GRACE);
            } else {
                debug!("starting without a self-lookup: the saved routing table is recent");
            }
        }
    }
    // Circuits are reserved once the connection to the relay is up (see
    // `EventLoop::reserve_circuits`): a reservation dial racing the bootstrap
    // dial to the same relay would be refused and end the listener.
    let mut reservations = HashMap::new();
    for relay_addr in &config.reserve_on {
        match relay_addr.iter().last() {
            Some(Protocol::P2p(relay)) => {
                swarm.add_peer_address(relay, relay_addr.clone());
                if !config.bootstrap.contains(relay_addr)
                    && let Err(e) = swarm.dial(relay_addr.clone())
                {
                    warn!(%relay_addr, "cannot dial relay: {e}");
                }
                reservations.insert(
                    relay,
                    Reservation {
                        circuit: relay_addr.clone().with(Protocol::P2pCircuit),
                        listener: None,
                    },
                );
            }
            _ => warn!(%relay_addr, "relay address has no /p2p/<peer id>; cannot reserve a circuit"),
        }
    }

    let (cmd_tx, cmd_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (ev_tx, ev_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let event_loop = EventLoop {
        swarm,
        commands: cmd_rx,
        events: ev_tx,
        clock,
        metrics,
        conversation_keep_alive: config.tuning.conversation_keep_alive,
        next_inbound: 0,
        inbound_deliver: HashMap::new(),
        inbound_key_package: HashMap::new(),
        inbound_link: HashMap::new(),
        inbound_mailbox: HashMap::new(),
        outbound_mailbox: HashMap::new(),
        outbound_deliver: HashMap::new(),
        outbound_key_package: HashMap::new(),
        outbound_link: HashMap::new(),
        find_peer: HashMap::new(),
        put_record: HashMap::new(),
        put_lookups: HashMap::new(),
        replication: config.tuning.kad_replication,
        get_record: HashMap::new(),
        reservations,
        circuits_waiting: CircuitsWaiting::default(),
        quiet_bootstraps,
        start_lookup_due,
        connections: HashMap::new(),
        hole_punches: 0,
        refresh: BucketRefresh::new(
            peer_id,
            config.dht_server,
            if config.dht_server {
                config.tuning.kad_refresh
            } else {
                config.tuning.kad_client_refresh
            },
            tokio::time::Instant::now(),
        ),
    };
    let task = tokio::spawn(event_loop.run());
    let network = Network {
        tx: cmd_tx,
        peer_id,
        request_timeout,
    };
    Ok((network, ev_rx, listen_addrs, task))
}

/// A peer lookup: the target and everyone waiting for its addresses.
type FindPeerQuery = (PeerId, Vec<oneshot::Sender<Vec<Multiaddr>>>);
/// The servers a lookup found nearest a record key, with their addresses.
pub type Holders = Vec<(PeerId, Vec<Multiaddr>)>;
/// Where a publication's outcome goes: the holders its lookup found, if it made one.
type PutRecordReply = oneshot::Sender<Result<Option<Holders>, NetError>>;
/// A publication's caller, the holders its lookup found (none if it was given
/// them), and how many servers it stores at.
type PutRecordQuery = (PutRecordReply, Option<Holders>, usize);
/// A record lookup: the key, the valid values found so far, the caller.
type GetRecordQuery = (Vec<u8>, Vec<Vec<u8>>, oneshot::Sender<Result<Vec<Vec<u8>>, NetError>>);

struct EventLoop {
    swarm: Swarm<Boxed<Rooted<Behaviour>>>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    clock: Clock,
    metrics: Option<libp2p::metrics::Metrics>,
    /// How long a conversation keeps its connections (`NetTuning`).
    conversation_keep_alive: Duration,
    next_inbound: u64,
    inbound_deliver: HashMap<u64, ResponseChannel<pb::DeliverResponse>>,
    inbound_key_package: HashMap<u64, ResponseChannel<pb::KeyPackageResponse>>,
    inbound_link: HashMap<u64, ResponseChannel<pb::LinkResponse>>,
    outbound_deliver: HashMap<OutboundRequestId, oneshot::Sender<Result<pb::DeliverResponse, NetError>>>,
    outbound_key_package: HashMap<OutboundRequestId, oneshot::Sender<Result<pb::KeyPackageResponse, NetError>>>,
    outbound_link: HashMap<OutboundRequestId, oneshot::Sender<Result<pb::LinkResponse, NetError>>>,
    inbound_mailbox: HashMap<u64, ResponseChannel<pb::MailboxResponse>>,
    outbound_mailbox: HashMap<OutboundRequestId, oneshot::Sender<Result<pb::MailboxResponse, NetError>>>,
    find_peer: HashMap<kad::QueryId, FindPeerQuery>,
    put_record: HashMap<kad::QueryId, PutRecordQuery>,
    /// Publications whose first step, a lookup of the servers nearest the key, is running.
    put_lookups: HashMap<kad::QueryId, (Record, PutRecordReply)>,
    /// How many servers a record is stored at (Kademlia's k).
    replication: std::num::NonZeroUsize,
    get_record: HashMap<kad::QueryId, GetRecordQuery>,
    /// Circuits we hold (or want) on relays, by relay.
    reservations: HashMap<PeerId, Reservation>,
    /// Circuits to other devices, dialled once their relay's connection is up.
    circuits_waiting: CircuitsWaiting,
    /// Bootstraps this node started only to end them before their first
    /// request (see `on_kad_event`), until libp2p reports their end.
    quiet_bootstraps: HashSet<kad::QueryId>,
    /// When a DHT client's start looks itself up, unless a lookup of its own
    /// comes first (see `START_LOOKUP_GRACE`).
    start_lookup_due: Option<tokio::time::Instant>,
    hole_punches: u64,
    /// Peer and remote address of each open connection.
    connections: HashMap<ConnectionId, (PeerId, Multiaddr)>,
    /// When each bucket of the routing table last changed (see `BucketRefresh`).
    refresh: BucketRefresh,
}

/// A circuit reservation on one relay.
struct Reservation {
    /// `<relay addr>/p2p/<relay>/p2p-circuit`.
    circuit: Multiaddr,
    /// The relay-client listener holding the reservation, while it is alive.
    listener: Option<ListenerId>,
}

/// How often lost circuit reservations are retried.
pub const RESERVATION_RETRY: Duration = Duration::from_secs(15);

/// The IP address a multiaddr starts with, if any.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

fn outbound_error(e: &request_response::OutboundFailure) -> NetError {
    use request_response::OutboundFailure as F;
    match e {
        F::DialFailure => NetError::Unreachable("dial failed".into()),
        F::Timeout => NetError::Timeout,
        F::ConnectionClosed => NetError::Unreachable("connection closed".into()),
        other => NetError::Failed(other.to_string()),
    }
}

impl EventLoop {
    async fn run(mut self) {
        let mut retry = tokio::time::interval(RESERVATION_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tick = self.refresh.tick();
        let first = tokio::time::Instant::now() + tick + self.refresh.phase();
        let mut refresh = tokio::time::interval_at(first, tick);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let start_lookup = tokio::time::sleep_until(self.start_lookup_due.unwrap_or(first));
        tokio::pin!(start_lookup);
        loop {
            tokio::select! {
                biased;
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev).await,
                _ = retry.tick(), if !self.reservations.is_empty() => self.reserve_circuits(true),
                _ = refresh.tick() => self.refresh_buckets(),
                _ = &mut start_lookup, if self.start_lookup_due.is_some() => {
                    self.start_lookup_due = None;
                    debug!("no lookup of this node's own since the start: a self-lookup");
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
        }
        debug!("network task stopped");
    }

    /// A client looks itself up if it made no lookup of its own for a period;
    /// a DHT server looks up the buckets that have not changed for a period.
    fn refresh_buckets(&mut self) {
        let me = *self.swarm.local_peer_id();
        let kad = &mut self.swarm.behaviour_mut().kad;
        if !self.refresh.dht_server() {
            if self.refresh.client_due(tokio::time::Instant::now()) {
                debug!("refreshing the routing table: a self-lookup");
                kad.get_closest_peers(me);
            }
            return;
        }
        let nearest = kad
            .kbuckets()
            .next()
            .and_then(|b| b.range().0.ilog2())
            .map(|i| i as usize);
        let plan = self.refresh.due(nearest, tokio::time::Instant::now());
        debug!(
            self_lookup = plan.self_lookup,
            buckets = plan.targets.len(),
            "refreshing the routing table"
        );
        for (key, results) in plan.lookups(me) {
            kad.get_n_closest_peers(key, results);
        }
    }

    /// A connection with a peer the routing table holds shows its bucket alive.
    fn touch_if_routed(&mut self, peer: PeerId) {
        if self.routed(peer) {
            self.refresh.touch_peer(peer, tokio::time::Instant::now());
        }
    }

    /// Whether a DHT server's routing table holds `peer` (false on a client,
    /// whose refresh keeps no buckets).
    fn routed(&mut self, peer: PeerId) -> bool {
        if !self.refresh.dht_server() {
            return false;
        }
        let kad = &mut self.swarm.behaviour_mut().kad;
        kad.kbucket(peer)
            .is_some_and(|b| b.iter().any(|e| e.node.key.preimage() == &peer))
    }

    fn next_id(&mut self) -> u64 {
        self.next_inbound += 1;
        self.next_inbound
    }

    fn on_command(&mut self, cmd: Command) {
        let b = self.swarm.behaviour_mut();
        match cmd {
            Command::Deliver { peer, request, reply } => {
                b.keep_alive.keep(peer, self.conversation_keep_alive);
                let id = b.deliver.send_request(&peer, request);
                self.outbound_deliver.insert(id, reply);
            }
            Command::KeyPackage { peer, request, reply } => {
                let id = b.key_package.send_request(&peer, request);
                self.outbound_key_package.insert(id, reply);
            }
            Command::RespondDeliver { id, response } => {
                if let Some(ch) = self.inbound_deliver.remove(&id) {
                    let _ = b.deliver.send_response(ch, response);
                }
            }
            Command::RespondKeyPackage { id, response } => {
                if let Some(ch) = self.inbound_key_package.remove(&id) {
                    let _ = b.key_package.send_response(ch, response);
                }
            }
            Command::Link { peer, request, reply } => {
                let id = b.link.send_request(&peer, request);
                self.outbound_link.insert(id, reply);
            }
            Command::RespondLink { id, response } => {
                if let Some(ch) = self.inbound_link.remove(&id) {
                    let _ = b.link.send_response(ch, response);
                }
            }
            Command::Mailbox { peer, request, reply } => {
                let id = b.mailbox.send_request(&peer, request);
                self.outbound_mailbox.insert(id, reply);
            }
            Command::RespondMailbox { id, response } => {
                if let Some(ch) = self.inbound_mailbox.remove(&id) {
                    let _ = b.mailbox.send_response(ch, response);
                }
            }
            Command::FindPeer { peer, reply } => {
                if let Some((_, waiting)) = self.find_peer.values_mut().find(|(p, _)| *p == peer) {
                    waiting.push(reply);
                } else {
                    // The addresses our table holds for a peer we look for
                    // failed or are about to be replaced (a table saved before
                    // the peer moved): a lookup that starts from them asks the
                    // peer there, fails, and keeps it out of the result even
                    // when another peer tells its new address. So the lookup
                    // starts without it.
                    if !self.swarm.is_connected(&peer) {
                        self.swarm.behaviour_mut().kad.remove_peer(&peer);
                    }
                    let qid = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                    self.find_peer.insert(qid, (peer, vec![reply]));
                    self.start_lookup_due = None;
                    self.refresh.touch_key(peer.to_bytes(), tokio::time::Instant::now());
                }
            }
            Command::PutRecord {
                key,
                value,
                holders,
                reply,
            } => {
                let now = tokio::time::Instant::now();
                self.refresh.touch_key(key.clone(), now);
                self.start_lookup_due = None;
                let mut record = Record::new(RecordKey::new(&key), value);
                // Ours: libp2p's replication passes it over, and its own
                // publication job renews it only after 22 hours.
                record.publisher = Some(*self.swarm.local_peer_id());
                // Keep our own copy too, so that we answer for it; a full store
                // still lets the record out.
                if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().put(record.clone()) {
                    warn!("cannot keep our own copy of a record we publish: {e}");
                }
                match holders {
                    Some(holders) if !holders.is_empty() => {
                        let n = holders.len();
                        self.put_record_to(record, holders, (reply, None, n));
                    }
                    _ => {
                        let qid = self
                            .swarm
                            .behaviour_mut()
                            .kad
                            .get_n_closest_peers(key, self.replication);
                        self.put_lookups.insert(qid, (record, reply));
                    }
                }
            }
            Command::GetRecord { key, reply } => {
                let qid = b.kad.get_record(RecordKey::new(&key));
                self.refresh.touch_key(key.clone(), tokio::time::Instant::now());
                self.get_record.insert(qid, (key, Vec::new(), reply));
                self.start_lookup_due = None;
            }
            Command::Dial { addr } => {
                // A direct address may be a DHT server's. A circuit leads to a
                // device with home relays, a DHT client: in the routing table it
                // would only draw lookups' requests, each a circuit through a
                // relay, that it cannot answer.
                let relay = circuits::relay_of(&addr);
                if let Some(Protocol::P2p(peer)) = addr.iter().last()
                    && relay.is_none()
                {
                    b.kad.add_address(&peer, addr.clone());
                }
                // The relay client drops a circuit whose relay is not connected
                // but already being dialled (`net/circuits.rs`): such a circuit
                // waits for the relay's connection.
                if let Some((relay, relay_addr)) = relay
                    && !self.swarm.is_connected(&relay)
                {
                    if !self
                        .circuits_waiting
                        .hold(relay, addr.clone(), tokio::time::Instant::now())
                    {
                        warn!(%addr, "too many circuits waiting for their relays; not dialled");
                        return;
                    }
                    let opts = DialOpts::peer_id(relay)
                        .addresses(vec![relay_addr])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(%relay, "relay of a circuit not dialled again: {e}");
                    }
                } else if let Err(e) = self.swarm.dial(addr.clone()) {
                    warn!(%addr, "dial failed: {e}");
                }
            }
            Command::IsConnected { peer, reply } => {
                let _ = reply.send(self.swarm.is_connected(&peer));
            }
            Command::Connections { peer, reply } => {
                let addrs = self
                    .connections
                    .values()
                    .filter(|(p, _)| *p == peer)
                    .map(|(_, a)| a.clone())
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::AddAddress { peer, addr } => {
                self.swarm.add_peer_address(peer, addr);
            }
            Command::RoutingPeers { max, reply } => {
                let mut buckets: Vec<std::collections::VecDeque<(PeerId, Vec<Multiaddr>)>> = b
                    .kad
                    .kbuckets()
                    .map(|bucket| {
                        let mut entries: Vec<_> = bucket
                            .iter()
                            .map(|e| {
                                let connected = e.status == kad::NodeStatus::Connected;
                                (
                                    !connected,
                                    *e.node.key.preimage(),
                                    e.node.value.iter().cloned().collect(),
                                )
                            })
                            .collect();
                        entries.sort_by_key(|(disconnected, ..)| *disconnected);
                        entries.into_iter().map(|(_, peer, addrs)| (peer, addrs)).collect()
                    })
                    .collect();
                let mut peers = Vec::new();
                while peers.len() < max && buckets.iter().any(|b| !b.is_empty()) {
                    for bucket in &mut buckets {
                        if peers.len() < max
                            && let Some(p) = bucket.pop_front()
                        {
                            peers.push(p);
                        }
                    }
                }
                let _ = reply.send(peers);
            }
            Command::SetRelays { relays } => self.set_relays(relays),
            Command::LocalRecord { key, reply } => {
                let rec = b.kad.store_mut().get(&RecordKey::new(&key)).map(|r| r.value.clone());
                let _ = reply.send(rec);
            }
            Command::Status { reply } => {
                let dht_peers = b.kad.kbuckets().map(|k| k.num_entries()).sum();
                let _ = reply.send(NetStatus {
                    peer_id: self.swarm.local_peer_id().to_string(),
                    listen_addrs: self.swarm.listeners().map(|a| a.to_string()).collect(),
                    connected_peers: self.swarm.connected_peers().count(),
                    dht_peers,
                    hole_punches: self.hole_punches,
                });
            }
        }
    }

    async fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        if let Some(m) = &self.metrics {
            use libp2p::metrics::Recorder;
            m.record(&ev);
            match &ev {
                SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => m.record(e),
                _ => {}
            }
        }
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
                if info.protocols.contains(&KAD_PROTOCOL) =>
            {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            // libp2p leaves a connection open when its pings go unanswered. A link that died
            // without a word (a NAT that forgot the mapping, a cable pulled) would then hold
            // whatever waits on it, a long-polling group fetch among them, until its own
            // timeout: close it, so that those fail now and are tried again.
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e @ (ping::Failure::Timeout | ping::Failure::Other { .. })),
            })) => {
                debug!(%peer, "closing a connection whose ping failed: {e}");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(peers))) => {
                for (peer, addr) in peers {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => self.on_kad_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Deliver(ev)) => match ev {
                request_response::Event::Message { peer, message, .. } => match message {
                    request_response::Message::Request { request, channel, .. } => {
                        if self.inbound_deliver.len() >= MAX_PENDING_INBOUND {
                            warn!(%peer, "too many pending deliveries; dropping request");
                            return;
                        }
                        let keep = self.conversation_keep_alive;
                        self.swarm.behaviour_mut().keep_alive.keep(peer, keep);
                        let id = self.next_id();
                        self.inbound_deliver.insert(id, channel);
                        if self.events.send(NetEvent::Deliver { id, peer, request }).await.is_err() {
                            self.inbound_deliver.remove(&id);
                        }
                    }
                    request_response::Message::Response { request_id, response } => {
                        if let Some(reply) = self.outbound_deliver.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                },
                request_response::Event::OutboundFailure {
                    request_id,
                    error,
                    peer,
                    ..
                } => {
                    debug!(%peer, "delivery failed: {error}");
                    if let Some(reply) = self.outbound_deliver.remove(&request_id) {
                        let _ = reply.send(Err(outbound_error(&error)));
                    }
                }
                request_response::Event::InboundFailure { peer, error, .. } => {
                    info!(%peer, "refused inbound delivery: {error}");
                }
                request_response::Event::ResponseSent { .. } => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::KeyPackage(ev)) => match ev {
                request_response::Event::Message { peer, message, .. } => match message {
                    request_response::Message::Request { request, channel, .. } => {
                        if self.inbound_key_package.len() >= MAX_PENDING_INBOUND {
                            return;
                        }
                        let id = self.next_id();
                        self.inbound_key_package.insert(id, channel);
                        if self
                            .events
                            .send(NetEvent::KeyPackage { id, peer, request })
                            .await
                            .is_err()
                        {
                            self.inbound_key_package.remove(&id);
                        }
                    }
                    request_response::Message::Response { request_id, response } => {
                        if let Some(reply) = self.outbound_key_package.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                },
                request_response::Event::OutboundFailure { request_id, error, .. } => {
                    if let Some(reply) = self.outbound_key_package.remove(&request_id) {
                        let _ = reply.send(Err(outbound_error(&error)));
                    }
                }
                request_response::Event::InboundFailure { peer, error, .. } => {
                    info!(%peer, "refused inbound key package request: {error}");
                }
                request_response::Event::ResponseSent { .. } => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::Link(ev)) => match ev {
                request_response::Event::Message { peer, message, .. } => match message {
                    request_response::Message::Request { request, channel, .. } => {
                        if self.inbound_link.len() >= 16 {
                            return;
                        }
                        let id = self.next_id();
                        self.inbound_link.insert(id, channel);
                        if self.events.send(NetEvent::Link { id, peer, request }).await.is_err() {
                            self.inbound_link.remove(&id);
                        }
                    }
                    request_response::Message::Response { request_id, response } => {
                        if let Some(reply) = self.outbound_link.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                },
                request_response::Event::OutboundFailure { request_id, error, .. } => {
                    if let Some(reply) = self.outbound_link.remove(&request_id) {
                        let _ = reply.send(Err(outbound_error(&error)));
                    }
                }
                request_response::Event::InboundFailure { peer, error, .. } => {
                    info!(%peer, "refused inbound link request: {error}");
                }
                request_response::Event::ResponseSent { .. } => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::Mailbox(ev)) => match ev {
                request_response::Event::Message {
                    peer,
                    connection_id,
                    message,
                } => match message {
                    request_response::Message::Request { request, channel, .. } => {
                        if self.inbound_mailbox.len() >= MAX_PENDING_INBOUND {
                            warn!(%peer, "too many pending mailbox requests; dropping one");
                            return;
                        }
                        let id = self.next_id();
                        self.inbound_mailbox.insert(id, channel);
                        let ip = self.connections.get(&connection_id).and_then(|(_, a)| ip_of(a));
                        let event = NetEvent::Mailbox { id, peer, ip, request };
                        if self.events.send(event).await.is_err() {
                            self.inbound_mailbox.remove(&id);
                        }
                    }
                    request_response::Message::Response { request_id, response } => {
                        if let Some(reply) = self.outbound_mailbox.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                },
                request_response::Event::OutboundFailure { request_id, error, .. } => {
                    if let Some(reply) = self.outbound_mailbox.remove(&request_id) {
                        let _ = reply.send(Err(outbound_error(&error)));
                    }
                }
                request_response::Event::InboundFailure { peer, error, .. } => {
                    info!(%peer, "refused inbound mailbox request: {error}");
                }
                request_response::Event::ResponseSent { .. } => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                ..
            })) => info!(relay = %relay_peer_id, "circuit reservation accepted"),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => match result {
                Ok(_) => {
                    self.hole_punches += 1;
                    info!(peer = %remote_peer_id, "upgraded a relayed connection to a direct one");
                }
                Err(e) => debug!(peer = %remote_peer_id, "hole punching failed: {e}"),
            },
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, "dial failed: {error}");
                if let Some(peer) = peer_id
                    && !matches!(error, DialError::Aborted)
                    && self.routed(peer)
                {
                    self.refresh.peers_changed(peer, tokio::time::Instant::now());
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                self.connections
                    .insert(connection_id, (peer_id, endpoint.get_remote_address().clone()));
                if self.reservations.get(&peer_id).is_some_and(|r| r.listener.is_none()) {
                    self.reserve_circuits(false);
                }
                for circuit in self.circuits_waiting.take(&peer_id, tokio::time::Instant::now()) {
                    if let Err(e) = self.swarm.dial(circuit.clone()) {
                        warn!(%circuit, "dial failed: {e}");
                    }
                }
                self.touch_if_routed(peer_id);
                let _ = self.events.try_send(NetEvent::Connected(peer_id));
            }
            SwarmEvent::ConnectionClosed { connection_id, .. } => {
                self.connections.remove(&connection_id);
            }
            SwarmEvent::ListenerClosed {
                listener_id, reason, ..
            } => {
                if let Some((relay, r)) = self
                    .reservations
                    .iter_mut()
                    .find(|(_, r)| r.listener == Some(listener_id))
                {
                    match reason {
                        Ok(()) => info!(%relay, "circuit reservation ended; will renew"),
                        Err(e) => warn!(%relay, "circuit reservation failed: {e}; will retry"),
                    }
                    r.listener = None;
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => info!(%address, "listening"),
            _ => {}
        }
    }

    fn set_relays(&mut self, relays: Vec<Multiaddr>) {
        let wanted: HashMap<PeerId, Multiaddr> = relays.into_iter().filter_map(|a| Some((peer_of(&a)?, a))).collect();
        let dropped: Vec<PeerId> = self
            .reservations
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for relay in dropped {
            if let Some(Reservation { listener: Some(id), .. }) = self.reservations.remove(&relay) {
                self.swarm.remove_listener(id);
            }
        }
        for (relay, addr) in wanted {
            if self.reservations.contains_key(&relay) {
                continue;
            }
            self.swarm.add_peer_address(relay, addr.clone());
            self.swarm.behaviour_mut().kad.add_address(&relay, addr.clone());
            self.reservations.insert(
                relay,
                Reservation {
                    circuit: addr.with(Protocol::P2pCircuit),
                    listener: None,
                },
            );
        }
        self.reserve_circuits(true);
    }

    /// Starts a reservation on every relay we are connected to and hold none
    /// on; with `redial`, also dials the relays we are not connected to.
    fn reserve_circuits(&mut self, redial: bool) {
        for (relay, r) in self.reservations.iter_mut() {
            if r.listener.is_some() {
                continue;
            }
            if self.swarm.is_connected(relay) {
                match self.swarm.listen_on(r.circuit.clone()) {
                    Ok(id) => r.listener = Some(id),
                    Err(e) => warn!(circuit = %r.circuit, "cannot reserve a circuit: {e}"),
                }
            } else if redial {
                let _ = self.swarm.dial(*relay);
            }
        }
    }

    /// Stores `record` at `holders`, the servers a lookup found nearest its key.
    fn put_record_to(&mut self, record: Record, holders: Holders, query: PutRecordQuery) {
        // A holder the routing table has no room for is dialled at the
        // address the lookup gave.
        for (peer, addrs) in &holders {
            for a in addrs {
                self.swarm.add_peer_address(*peer, a.clone());
            }
        }
        let peers = holders.into_iter().map(|(p, _)| p).collect::<Vec<_>>().into_iter();
        // Every holder is waited for: with a lower quorum the store would end at
        // the first answer, before the holders still being dialled are asked.
        let qid = self.swarm.behaviour_mut().kad.put_record_to(record, peers, Quorum::All);
        self.put_record.insert(qid, query);
    }

    /// Once no lookup runs, calls off the dials lookups asked for that no
    /// one waits for any longer (see `dials_in_flight`).
    fn call_off_lookup_dials(&mut self) {
        let kad = &self.swarm.behaviour().kad;
        if kad.iter_queries().next().is_some() {
            return;
        }
        for peer in kad.only_ours() {
            if !self.swarm.is_connected(&peer) {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// Disarms libp2p's next bootstrap by starting one and ending it before
    /// its first request: a bootstrap that starts resets libp2p's timer.
    fn disarm_bootstrap(&mut self) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        if let Ok(id) = kad.bootstrap() {
            if let Some(mut q) = kad.query_mut(&id) {
                q.finish();
            }
            self.quiet_bootstraps.insert(id);
        }
    }

    fn on_kad_event(&mut self, ev: kad::Event) {
        if let kad::Event::OutboundQueryProgressed { step, .. } = &ev
            && step.last
        {
            self.call_off_lookup_dials();
        }
        match ev {
            kad::Event::InboundRequest {
                request:
                    InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => {
                let existing = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .get(&record.key)
                    .map(|r| r.value.clone());
                match UserRecord::verify_replacement(
                    &record.value,
                    existing.as_deref(),
                    record.key.as_ref(),
                    self.clock.now_ms(),
                ) {
                    Ok(_) => {
                        if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().put(record) {
                            warn!(%source, "cannot store DHT record: {e}");
                        }
                    }
                    Err(e) => info!(%source, "refused DHT record: {e}"),
                }
            }
            kad::Event::RoutingUpdated {
                peer,
                is_new_peer,
                old_peer,
                ..
            } => {
                let now = tokio::time::Instant::now();
                if is_new_peer {
                    self.refresh.peers_changed(peer, now);
                } else {
                    self.refresh.touch_peer(peer, now);
                }
                if let Some(old) = old_peer {
                    self.refresh.peers_changed(old, now);
                }
                // libp2p arms a bootstrap (a self-lookup, half a second on)
                // whenever a peer joins a table of fewer than 20. A DHT client
                // keeps its own schedule: the start's self-lookup, unless a
                // lookup of its own comes first, and `refresh_buckets`.
                if is_new_peer && !self.refresh.dht_server() {
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    let entries: usize = kad.kbuckets().map(|b| b.num_entries()).sum();
                    if entries < kad::K_VALUE.get() {
                        self.disarm_bootstrap();
                    }
                }
            }
            kad::Event::OutboundQueryProgressed { id, result, step, .. } => match result {
                QueryResult::Bootstrap(_) => {
                    // libp2p bootstraps on its own whenever a peer joins a table of
                    // fewer than 20, and a bootstrap goes on from its self-lookup to
                    // a lookup per bucket. The self-lookup is what matters at a start:
                    // it meets the neighbours, who add a new server to their tables.
                    // The buckets are left to `refresh_buckets`. Finishing the bucket
                    // lookup just queued ends it before it sends a request; libp2p
                    // then queues the next one, which ends here in turn.
                    //
                    // While a bootstrap runs, every peer that joins a table of
                    // fewer than 20 arms libp2p's next one, half a second after
                    // this one ends: a second self-lookup that would ask the
                    // same peers again. A bootstrap that starts disarms it, so
                    // one is started and ended before its first request.
                    if !step.last {
                        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                            q.finish();
                        }
                    } else if !self.quiet_bootstraps.remove(&id) {
                        self.disarm_bootstrap();
                    }
                }
                QueryResult::GetClosestPeers(res) => {
                    let peers = match res {
                        Ok(GetClosestPeersOk { peers, .. }) => peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    if let Some((record, reply)) = self.put_lookups.remove(&id) {
                        let holders: Vec<(PeerId, Vec<Multiaddr>)> =
                            peers.into_iter().map(|p| (p.peer_id, p.addrs)).collect();
                        if holders.is_empty() {
                            let _ = reply.send(Err(NetError::NotFound));
                            return;
                        }
                        let n = holders.len();
                        self.put_record_to(record, holders.clone(), (reply, Some(holders), n));
                        return;
                    }
                    if let Some((target, waiting)) = self.find_peer.remove(&id) {
                        let addrs: Vec<Multiaddr> = peers
                            .into_iter()
                            .filter(|p| p.peer_id == target)
                            .flat_map(|p| p.addrs)
                            .collect();
                        for a in &addrs {
                            self.swarm.add_peer_address(target, a.clone());
                        }
                        for w in waiting {
                            let _ = w.send(addrs.clone());
                        }
                    }
                }
                QueryResult::PutRecord(res) => {
                    if let Some((reply, found, asked)) = self.put_record.remove(&id) {
                        // Stored at half the holders or more counts as published; the
                        // rest may be away for now, and the servers' hourly replication
                        // fills them in.
                        let stored = match &res {
                            Ok(_) => asked,
                            Err(
                                kad::PutRecordError::QuorumFailed { success, .. }
                                | kad::PutRecordError::Timeout { success, .. },
                            ) => success.len(),
                        };
                        let out = if stored > 0 && 2 * stored >= asked {
                            Ok(found)
                        } else {
                            Err(res.err().map_or_else(
                                || NetError::Failed("stored nowhere".into()),
                                |e| NetError::Failed(e.to_string()),
                            ))
                        };
                        let _ = reply.send(out);
                    }
                }
                QueryResult::GetRecord(res) => {
                    if let Some(entry) = self.get_record.get_mut(&id) {
                        if let Ok(GetRecordOk::FoundRecord(peer_record)) = res {
                            let rec = peer_record.record;
                            match UserRecord::verify(&rec.value, &entry.0, self.clock.now_ms()) {
                                Ok(_) => entry.1.push(rec.value),
                                Err(e) => info!("ignored invalid DHT record: {e}"),
                            }
                        }
                        if step.last {
                            if let Some((_, found, reply)) = self.get_record.remove(&id) {
                                let out = if found.is_empty() {
                                    Err(NetError::NotFound)
                                } else {
                                    Ok(found)
                                };
                                let _ = reply.send(out);
                            }
                        } else if entry.1.len() >= RECORD_COPIES
                            && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id)
                        {
                            q.finish();
                        }
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
}
