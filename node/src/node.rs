//! A running node: the network task, the core task and a handle to both.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use prost::Message as _;
use tidings_protocol::group::Role;
use tidings_protocol::identity::{AccountId, AccountKey, DeviceCertificate, DeviceKey};
use tidings_protocol::mailbox;
use tidings_protocol::mls::{MlsEngine, signature_keys_from_seed};
use tidings_protocol::pb;
use tidings_protocol::record::{UserRecord, user_record_contents_digest, user_record_key};
use tidings_protocol::{CardError, ContactCard};
use tidings_store::{Contact, Identity, IntentRow, MessageState, Store};
use tokio::sync::{Mutex, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::core::{
    Core, CoreInput, GroupView, LinkOffer, LinkOffers, NodeError, Refusals, SELF_UPDATE_INTERVAL_MS, peer_id_of,
};
use crate::net::{self, NetConfig, NetError, NetEvent, Network};
use crate::relay::{MailboxService, RelayMetrics, RelayOptions};
use crate::types::{ContactView, MailGapView, MessageView, NodeEvent, NodeStatus, RefusalView};

/// How long a device certificate made by `init` is valid.
pub const DEVICE_CERT_VALIDITY_MS: u64 = 365 * 24 * 3600 * 1000;
/// Longest time direct deliveries wait for the first mailbox catch-up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(15);
/// How long a new conversation waits for a key package from the contact's
/// device before claiming one from the contact's relays (a device behind a
/// NAT, or one that is not in the DHT yet, can take a DHT lookup and several
/// dials to answer, or never answer).
const DEVICE_PATIENCE: Duration = Duration::from_secs(3);
/// How long a new conversation (or a group invitation) keeps trying to get a
/// key package of a device that neither answered nor has one on its relays:
/// a device that has just come online has no circuit reservation and has not
/// uploaded key packages to its relays for a few seconds.
const KEY_PACKAGE_PATIENCE: Duration = Duration::from_secs(20);
/// How long a send of a first message to a contact waits for the
/// conversation's set-up before it hands the message back as waiting (the
/// set-up goes on; the message is shown as waiting from the start): long
/// enough for a device that answers, or for a key package from the relays of
/// one that is offline (a record lookup and the device, [`DEVICE_PATIENCE`]
/// each, then a round trip to a relay), shorter than the whole
/// [`KEY_PACKAGE_PATIENCE`] a set-up gives someone who cannot be reached.
const SEND_SETUP_PATIENCE: Duration = Duration::from_secs(10);
/// Pause after a failed set-up of a conversation that messages wait for;
/// doubles after each failure up to [`WAITING_RETRY_MAX`].
const WAITING_RETRY: Duration = Duration::from_secs(10);
const WAITING_RETRY_MAX: Duration = Duration::from_secs(120);
/// The fastest a group inbox is fetched from a relay that does not hold
/// fetches, and the shortest pause between two rounds of the groups' upkeep.
const GROUP_TICK: Duration = Duration::from_secs(1);
/// How long after a round of the groups' upkeep a change of the store brings
/// the next one (a wake brings it at once). Each pass starts the poll of any
/// group that has none and runs a round in the core if the store changed.
const GROUP_UPKEEP_MAX: Duration = Duration::from_secs(5);
/// The longest the groups' upkeep goes without a round in the core while nothing is written to
/// the store and no deadline of its own falls due. What a round looks at is all in the store, so
/// an unchanged store gives the same round; this bounds how long upkeep that failed without
/// writing anything waits to be tried again.
const GROUP_UPKEEP_IDLE: Duration = Duration::from_secs(60);
/// How long a group fetch waits at the relay for something new.
const GROUP_WAIT: Duration = Duration::from_millis(crate::relay::MAX_FETCH_WAIT_MS);
/// How often a node checks that its account's other devices are in all its groups, and that its
/// conversations hold its contacts' current devices, when its store has changed since the last check.
const OWN_DEVICE_RECHECK: Duration = Duration::from_millis(500);
/// How often those checks run when nothing was written: retries of what failed.
const OWN_DEVICE_RETRY: Duration = Duration::from_secs(10);
/// Least time between two replacements of the conversation with one contact.
const MEND_INTERVAL: Duration = Duration::from_secs(3);

/// Longest a group change waits for an earlier change of ours to be decided.
const GROUP_CHANGE_WAIT: Duration = Duration::from_secs(30);

/// Parses a group id given in hex; anything else names no group.
fn parse_group_id(s: &str) -> Result<Vec<u8>, NodeError> {
    match hex::decode(s.trim()) {
        Ok(b) if !b.is_empty() && b.len() <= 64 => Ok(b),
        _ => Err(NodeError::UnknownGroup(format!("{} (a group id is hex)", s.trim()))),
    }
}

/// One-time key packages a device keeps on each home relay.
pub const KEY_PACKAGE_POOL: usize = 20;
/// How often a node re-checks its relay mailboxes. The relays push both
/// inboxes (normal and request) while the device is subscribed; a home relay
/// that connects again (after a restart or a broken link) or a push that could
/// not be applied whole triggers a re-check at once. So the re-check only
/// catches a subscription that lapsed unnoticed, and mail on relays given up.
pub const MAILBOX_RECHECK: Duration = Duration::from_secs(300);
/// Every this many re-checks (and whenever something wakes the mailbox sync: a
/// home relay that connects again, a push that could not be applied, a change
/// of relays), a round also re-subscribes and tops up the key-package pools.
/// The other rounds only drain the two inboxes: two authenticated requests to
/// each home relay instead of four.
pub const FULL_MAILBOX_ROUND_EVERY: u32 = 2;
/// The DHT routing table is saved (for the next start, [`NetConfig::known_peers`])
/// this long after the start, then every [`KNOWN_PEERS_SAVE`].
const KNOWN_PEERS_FIRST_SAVE: Duration = Duration::from_secs(60);
const KNOWN_PEERS_SAVE: Duration = Duration::from_secs(300);
/// How long [`Node::shutdown`] waits for the routing table to save.
const SHUTDOWN_SAVE_WAIT: Duration = Duration::from_secs(1);
/// Capacity of the core's input queue.
const CORE_QUEUE: usize = 4096;
/// Capacity of the event broadcast (slow subscribers miss events, never block the node).
const EVENT_QUEUE: usize = 16_384;

/// Everything a node needs besides its store.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub net: NetConfig,
    pub clock: Clock,
    /// Run the relay services (set `net.relay_server` too).
    pub relay: Option<RelayOptions>,
    /// This device's home relays (`…/p2p/<relay id>`): its mailboxes live there,
    /// they are published in its user record and card, and it reserves a circuit
    /// on them so that it stays reachable without a public address.
    pub home_relays: Vec<Multiaddr>,
    /// Registry for libp2p's metrics (relays export it on `/metrics`).
    pub metrics: Option<Arc<std::sync::Mutex<prometheus_client::registry::Registry>>>,
    /// How old this device's leaf keys in a group may get before it commits a
    /// self-update (post-compromise security). Default 24 hours.
    pub key_update_interval: Duration,
    /// Events kept for slow subscribers ([`NodeHandle::events`]); the channel
    /// holds this many slots from the start. Default 16,384 (a mailbox
    /// catch-up can raise thousands at once); the simulator uses fewer.
    pub event_queue: usize,
    /// How often the home relays are drained (a safety net behind their
    /// pushes); every [`FULL_MAILBOX_ROUND_EVERY`]th time they are also
    /// re-subscribed and their key-package pools topped up.
    /// Default [`MAILBOX_RECHECK`].
    pub mailbox_poll: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            net: NetConfig::default(),
            clock: Clock::system(),
            relay: None,
            home_relays: Vec::new(),
            metrics: None,
            key_update_interval: Duration::from_millis(SELF_UPDATE_INTERVAL_MS),
            event_queue: EVENT_QUEUE,
            mailbox_poll: MAILBOX_RECHECK,
        }
    }
}

/// 32 bytes from the operating system's random number generator.
pub(crate) fn random_seed() -> Result<[u8; 32], NodeError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|_| NodeError::Randomness)?;
    Ok(seed)
}

/// Creates a new identity (account, device, MLS key, device certificate) in `store`.
pub fn create_identity(store: &Store, name: &str, now_ms: u64) -> Result<Identity, NodeError> {
    if name.len() > tidings_protocol::limits::MAX_NAME {
        return Err(NodeError::InvalidInput("name is too long".into()));
    }
    let seeds = (random_seed()?, random_seed()?, random_seed()?);
    put_identity(store, name, now_ms, seeds)
}

/// Creates an identity whose keys all derive from `seed` (SHA-256 with a label per key): the
/// simulator gives every host one from (run seed, host), so that peer ids and accounts, and so
/// who is close to whom in the DHT, are the same in every run of a seed. Never for real devices:
/// anyone who knows the seed holds the keys.
pub fn create_identity_from_seed(
    store: &Store,
    name: &str,
    now_ms: u64,
    seed: [u8; 32],
) -> Result<Identity, NodeError> {
    if name.len() > tidings_protocol::limits::MAX_NAME {
        return Err(NodeError::InvalidInput("name is too long".into()));
    }
    let derive = |label: &[u8]| -> [u8; 32] {
        use sha2::Digest as _;
        sha2::Sha256::new()
            .chain_update(b"tidings/sim-identity/v1/")
            .chain_update(label)
            .chain_update(seed)
            .finalize()
            .into()
    };
    put_identity(
        store,
        name,
        now_ms,
        (derive(b"account"), derive(b"device"), derive(b"mls")),
    )
}

fn put_identity(
    store: &Store,
    name: &str,
    now_ms: u64,
    (account_seed, device_seed, mls_seed): ([u8; 32], [u8; 32], [u8; 32]),
) -> Result<Identity, NodeError> {
    let account = AccountKey::from_seed(account_seed);
    let device = DeviceKey::from_seed(device_seed);
    let mls = signature_keys_from_seed(mls_seed);
    let cert = account.certify_device(&device.public(), mls.public(), now_ms, now_ms + DEVICE_CERT_VALIDITY_MS);
    let id = Identity {
        account_seed,
        device_seed,
        mls_seed,
        device_cert: cert.to_bytes(),
        name: name.to_owned(),
        created_ms: now_ms,
    };
    store.put_identity(&id)?;
    Ok(id)
}

/// A contact as its card describes it, added at `now_ms`.
pub(crate) fn contact_from_card(card: ContactCard, now_ms: u64) -> Contact {
    Contact {
        account: *card.account.as_bytes(),
        name: card.name,
        devices: card.devices.iter().map(|d| d.to_bytes()).collect(),
        relays: card.relays,
        capabilities: card.capabilities.iter().map(|c| c.encode_to_vec()).collect(),
        record_seq: 0,
        conversations: Vec::new(),
        added_ms: now_ms,
    }
}

/// Opens the node database in `data_dir`.
pub fn open_store(data_dir: &Path) -> Result<Store, NodeError> {
    restrict_to_owner(data_dir);
    Ok(Store::open(&data_dir.join("tidings.redb"))?)
}

/// The data directory holds this device's secret keys: only its owner may
/// read it, whatever the umask (on Unix; elsewhere the system's ACLs apply).
fn restrict_to_owner(data_dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)) {
            warn!(dir = %data_dir.display(), "cannot restrict the data directory to its owner: {e}");
        }
    }
    #[cfg(not(unix))]
    let _ = data_dir;
}

/// A running node.
pub struct Node {
    handle: NodeHandle,
    tasks: Vec<JoinHandle<()>>,
    listen_addrs: Vec<Multiaddr>,
    relay: Option<RelayOptions>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.handle.peer_id())
    }
}

impl Inner {
    pub(crate) fn clock_now(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// A relay's peer id and its address.
type RelayAddr = (PeerId, Multiaddr);

pub(crate) struct Inner {
    tx: mpsc::Sender<CoreInput>,
    net: Network,
    pub(crate) store: Arc<Store>,
    events: broadcast::Sender<NodeEvent>,
    account_seed: [u8; 32],
    device_seed: [u8; 32],
    /// Signs this device's owner requests to its relays.
    owner_signer: mailbox::AuthSigner,
    /// Our home relays as they are now (they can change while we run).
    home_relays: std::sync::RwLock<Vec<Multiaddr>>,
    /// Wakes the mailbox sync task (home relays changed).
    mailbox_wake: Arc<tokio::sync::Notify>,
    mailbox_poll: Duration,
    account: AccountId,
    cert: DeviceCertificate,
    name: String,
    clock: Clock,
    conversation_lock: Mutex<()>,
    refusals: Refusals,
    /// Wakes the group sync task.
    group_wake: Arc<tokio::sync::Notify>,
    /// The open device-link offer.
    link: LinkOffers,
    /// Contacts who share presence with us (kept by the core).
    pub(crate) presence: crate::core::PresenceMap,
}

/// A cloneable handle to a running node: what the API, the CLI and tests use.
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeHandle({})", self.inner.account)
    }
}

impl Node {
    /// Starts a node on `store`, which must hold an identity.
    pub async fn start(store: Store, config: NodeConfig) -> Result<Node, anyhow::Error> {
        Self::start_shared(Arc::new(store), config).await
    }

    /// [`Node::start`] on a store the caller keeps, so that a stopped node can
    /// start again on it (the simulator restarts hosts this way). Only one
    /// running node may use a store at a time.
    pub async fn start_shared(store: Arc<Store>, config: NodeConfig) -> Result<Node, anyhow::Error> {
        let identity = store.identity()?;
        let account_key = AccountKey::from_seed(identity.account_seed);
        let cert = DeviceCertificate::from_bytes(&identity.device_cert)?;
        if cert.account != account_key.id() {
            anyhow::bail!("device certificate belongs to another account");
        }
        let engine = MlsEngine::new(identity.mls_seed, &cert)?;
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(identity.device_seed)?;
        let libp2p_metrics = config
            .metrics
            .as_ref()
            .and_then(|r| r.lock().ok().map(|mut r| libp2p::metrics::Metrics::new(&mut r)));
        let mut net_config = config.net.clone();
        for relay in &config.home_relays {
            if !net_config.bootstrap.contains(relay) {
                net_config.bootstrap.push(relay.clone());
            }
            if !net_config.reserve_on.contains(relay) {
                net_config.reserve_on.push(relay.clone());
            }
        }
        net_config.known_peers = known_peers(&store);
        // A time ahead of the clock says nothing of the table's age.
        net_config.known_peers_age = match store.known_peers_current_ms() {
            Ok(saved) => saved
                .and_then(|t| config.clock.now_ms().checked_sub(t))
                .map(Duration::from_millis),
            Err(e) => {
                warn!("cannot tell how old the saved DHT peers are: {e}");
                None
            }
        };
        let (net, mut net_events, listen_addrs, net_task) =
            net::spawn(keypair, net_config, config.clock.clone(), libp2p_metrics).await?;
        let mut tasks = vec![
            net_task,
            spawn_known_peers_saver(net.clone(), store.clone(), config.clock.clone()),
        ];
        if let Some(opts) = config.relay.clone() {
            // Mailbox requests go to the mailbox service, everything else to the core.
            let (svc_tx, svc_rx) = mpsc::channel(4096);
            let (core_tx, core_rx) = mpsc::channel(4096);
            tasks.push(tokio::spawn(async move {
                while let Some(ev) = net_events.recv().await {
                    let target = if matches!(ev, NetEvent::Mailbox { .. }) {
                        &svc_tx
                    } else {
                        &core_tx
                    };
                    if target.send(ev).await.is_err() {
                        break;
                    }
                }
            }));
            let service = MailboxService::new(opts, net.clone(), config.clock.clone(), identity.device_seed);
            tasks.push(tokio::spawn(service.run(svc_rx)));
            net_events = core_rx;
        }
        let (tx, rx) = mpsc::channel(CORE_QUEUE);
        let (events, _) = broadcast::channel(config.event_queue.max(1));
        let refusals = Refusals::default();
        let link = LinkOffers::default();
        let mut core = Core::new(
            store.clone(),
            engine,
            net.clone(),
            config.clock.clone(),
            account_key.id(),
            cert.device_key,
            events.clone(),
            tx.clone(),
            config.home_relays.iter().filter_map(crate::net::peer_of).collect(),
            refusals.clone(),
            pb::MailboxGrant {
                capabilities: vec![mailbox::issue_capability(&identity.device_seed, cert.expires_ms, None)],
                relays: config.home_relays.iter().map(|a| a.to_string()).collect(),
            },
            link.clone(),
        )?;
        core.self_update_interval_ms = u64::try_from(config.key_update_interval.as_millis()).unwrap_or(u64::MAX);
        let mailbox_wake = core.mailbox_wake.clone();
        let group_wake = core.group_wake.clone();
        let waiting = (core.waiting_wake.clone(), core.waiting_nudge.clone());
        let presence = core.presence.clone();
        tasks.push(tokio::spawn(core.run(rx, net_events)));
        let handle = NodeHandle {
            inner: Arc::new(Inner {
                tx,
                net,
                store,
                events,
                account_seed: identity.account_seed,
                device_seed: identity.device_seed,
                owner_signer: mailbox::AuthSigner::from_seed(&identity.device_seed),
                home_relays: std::sync::RwLock::new(config.home_relays.clone()),
                mailbox_wake,
                mailbox_poll: config.mailbox_poll,
                account: account_key.id(),
                cert,
                name: identity.name,
                clock: config.clock,
                conversation_lock: Mutex::new(()),
                refusals,
                group_wake,
                link,
                presence,
            }),
        };
        info!(account = %handle.account(), peer = %handle.peer_id(), "node started");
        tasks.push(handle.spawn_contact_resolver());
        tasks.push(tokio::spawn(handle.clone().mailbox_sync()));
        tasks.push(tokio::spawn(handle.clone().group_sync()));
        tasks.push(tokio::spawn(handle.clone().send_waiting(waiting.0, waiting.1)));
        // Presence: a heartbeat to contacts while this account shares it. While it does not,
        // the task sleeps until the store changes (the setting may have) instead of ticking.
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            let every = Duration::from_millis(crate::core::PRESENCE_INTERVAL_MS);
            loop {
                tokio::time::sleep(every).await;
                let seen = h.inner.store.changes();
                if !h.inner.store.settings().is_ok_and(|s| s.presence) {
                    h.inner.store.changed(seen).await;
                    continue;
                }
                if h.inner.tx.send(CoreInput::PresenceTick).await.is_err() {
                    break;
                }
            }
        }));
        // Adding our own devices fetches key packages, which can take a while:
        // a task of its own, so that it never holds the groups back. What the
        // checks look at is all in the store, so the task sleeps until a write
        // (then lets the burst settle for a moment) or until what failed is due
        // to be tried again; an idle node does not wake for it at all.
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            let mut mended = std::collections::HashMap::new();
            let mut seen = None;
            let mut retry: Option<tokio::time::Instant> = None;
            loop {
                match seen {
                    // The first check, a moment after the start.
                    None => {}
                    Some(seen) => tokio::select! {
                        _ = h.inner.store.changed(seen) => {}
                        _ = crate::core::sleep_until_opt(retry) => {}
                    },
                }
                tokio::time::sleep(OWN_DEVICE_RECHECK).await;
                seen = Some(h.inner.store.changes());
                let missing = h.add_own_devices().await;
                h.mend_conversations(&mut mended).await;
                let now = tokio::time::Instant::now();
                retry = match (missing, mended.values().min()) {
                    (true, _) => Some(now + OWN_DEVICE_RETRY),
                    // A contact mended a moment ago may be due again once its interval is over.
                    (false, Some(&last)) => Some((last + MEND_INTERVAL).max(now)),
                    (false, None) => None,
                };
            }
        }));
        Ok(Node {
            handle,
            tasks,
            listen_addrs,
            relay: config.relay,
        })
    }

    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Addresses the swarm listens on, each ending in `/p2p/<peer id>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let p = self.handle.peer_id();
        self.listen_addrs
            .iter()
            .map(|a| a.clone().with(libp2p::multiaddr::Protocol::P2p(p)))
            .collect()
    }

    /// The relay's metrics, if this node runs the relay services.
    pub fn relay_metrics(&self) -> Option<Arc<RelayMetrics>> {
        self.relay.as_ref().map(|r| r.metrics.clone())
    }

    /// The relay's mailbox database, if this node runs the relay services.
    pub fn relay_mailboxes(&self) -> Option<Arc<tidings_store::mailbox::Mailboxes>> {
        self.relay.as_ref().map(|r| r.mailboxes.clone())
    }

    /// Stops the node. Every unit of work is atomic, so stopping between units
    /// loses nothing; the outbox resumes on the next start.
    pub async fn shutdown(self) {
        // The routing table as it is now, for the next start: one saved
        // minutes ago may be smaller (a session shorter than the first save
        // left none), and a start without a recent table of a bucket's worth
        // of peers looks itself up.
        let inner = &self.handle.inner;
        let mut saved = Vec::new();
        let save = save_known_peers(&inner.net, &inner.store, inner.clock.now_ms(), &mut saved);
        if tokio::time::timeout(SHUTDOWN_SAVE_WAIT, save).await.is_err() {
            debug!("the network task did not answer; the routing table saved last stays");
        }
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The DHT peers saved in `store`, as far as they parse (a bad row costs the
/// saved peers, not the start).
fn known_peers(store: &Store) -> Vec<(PeerId, Vec<Multiaddr>)> {
    let saved = match store.known_peers() {
        Ok(saved) => saved,
        Err(e) => {
            warn!("starting without the saved DHT peers: {e}");
            return Vec::new();
        }
    };
    peers_of_rows(saved)
}

/// Saved DHT peers as far as they parse, those left without an address left out.
fn peers_of_rows(saved: Vec<tidings_store::KnownPeer>) -> Vec<(PeerId, Vec<Multiaddr>)> {
    saved
        .into_iter()
        .filter_map(|(id, addrs)| {
            let peer = PeerId::from_bytes(&id).ok()?;
            let addrs: Vec<Multiaddr> = addrs.into_iter().filter_map(|a| Multiaddr::try_from(a).ok()).collect();
            (!addrs.is_empty()).then_some((peer, addrs))
        })
        .collect()
}

/// DHT peers as the store saves them.
fn rows_of_peers(peers: &[(PeerId, Vec<Multiaddr>)]) -> Vec<tidings_store::KnownPeer> {
    peers
        .iter()
        .map(|(p, addrs)| (p.to_bytes(), addrs.iter().map(|a| a.to_vec()).collect()))
        .collect()
}

/// Whether two lists of saved DHT peers hold the same peers with the same
/// addresses, in whatever order. The routing table lists the peers it is
/// connected to first, so its order changes with every connection that opens
/// or closes; a table that only changed order is not written again.
fn same_peers(a: &[tidings_store::KnownPeer], b: &[tidings_store::KnownPeer]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    fn sorted(rows: &[tidings_store::KnownPeer]) -> Vec<&tidings_store::KnownPeer> {
        let mut rows: Vec<&tidings_store::KnownPeer> = rows.iter().collect();
        rows.sort();
        rows
    }
    sorted(a) == sorted(b)
}

/// Saves the DHT routing table to `store` now and then, for the next start
/// (and [`Node::shutdown`] once more at the end).
fn spawn_known_peers_saver(net: Network, store: Arc<Store>, clock: Clock) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(KNOWN_PEERS_FIRST_SAVE).await;
        let mut saved: Vec<tidings_store::KnownPeer> = Vec::new();
        loop {
            save_known_peers(&net, &store, clock.now_ms(), &mut saved).await;
            tokio::time::sleep(KNOWN_PEERS_SAVE).await;
        }
    })
}

/// Saves the routing table to `store`, or only the time it was last seen
/// current while it is `saved`, what this run saved last (which it then
/// becomes). An empty table keeps what was saved.
async fn save_known_peers(net: &Network, store: &Store, now: u64, saved: &mut Vec<tidings_store::KnownPeer>) {
    let peers = net.routing_peers(tidings_store::MAX_KNOWN_PEERS).await;
    let rows = rows_of_peers(&peers);
    if rows.is_empty() {
        // Nothing worth saving yet; keep what was saved.
    } else if same_peers(&rows, saved) {
        if let Err(e) = store.mark_known_peers_current(now) {
            warn!("cannot save the DHT peers' time: {e}");
        }
    } else {
        match store.set_known_peers(&rows, now) {
            Ok(()) => *saved = rows,
            Err(e) => warn!("cannot save the DHT peers: {e}"),
        }
    }
}

impl NodeHandle {
    pub fn account(&self) -> AccountId {
        self.inner.account
    }

    pub fn peer_id(&self) -> PeerId {
        self.inner.net.peer_id()
    }

    /// Our profile name (as last set).
    pub fn name(&self) -> String {
        self.inner
            .store
            .identity()
            .map(|i| i.name)
            .unwrap_or_else(|_| self.inner.name.clone())
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// Our home relays as they are now.
    pub fn home_relays(&self) -> Vec<String> {
        self.home_relay_addrs().iter().map(ToString::to_string).collect()
    }

    fn home_relay_addrs(&self) -> Vec<Multiaddr> {
        self.inner.home_relays.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// Replaces our home relays while the node runs: saved in the settings,
    /// circuits reserved on the new ones and let go on the old, a new mailbox
    /// grant to every contact, the user record republished. Relays given up
    /// are still drained for mail for [`crate::core::RETIRED_RELAY_DRAIN_MS`].
    pub async fn set_home_relays(&self, relays: &[String]) -> Result<(), NodeError> {
        if relays.len() > crate::core::MAX_HOME_RELAYS {
            return Err(NodeError::InvalidInput(format!(
                "at most {} home relays",
                crate::core::MAX_HOME_RELAYS
            )));
        }
        let mut addrs: Vec<Multiaddr> = Vec::new();
        for r in relays {
            let a: Multiaddr = r
                .trim()
                .parse()
                .map_err(|_| NodeError::InvalidInput(format!("not a multiaddr: {r:.200}")))?;
            if crate::net::peer_of(&a).is_none() {
                return Err(NodeError::InvalidInput(format!(
                    "relay address {a} must end in /p2p/<relay id>"
                )));
            }
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        self.core(|reply| CoreInput::SetHomeRelays {
            relays: addrs.clone(),
            reply,
        })
        .await?;
        if let Ok(mut r) = self.inner.home_relays.write() {
            *r = addrs.clone();
        }
        self.inner.net.set_relays(addrs).await;
        self.inner.mailbox_wake.notify_one();
        if let Err(e) = self.publish_record().await {
            debug!("user record not republished after the relay change: {e}");
        }
        Ok(())
    }

    pub fn card(&self) -> ContactCard {
        ContactCard {
            account: self.inner.account,
            name: self.name(),
            devices: vec![self.inner.cert.clone()],
            relays: self.home_relays(),
            capabilities: vec![mailbox::issue_capability(
                &self.inner.device_seed,
                self.inner.cert.expires_ms,
                None,
            )],
        }
    }

    pub(crate) async fn core<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> CoreInput,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.inner.tx.send(make(tx)).await.map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// What this account's user record says now: the valid certificates of
    /// its devices (this one among them), its home relays and its name.
    fn record_contents(&self) -> Result<(Vec<DeviceCertificate>, Vec<String>, String), NodeError> {
        let now = self.inner.clock.now_ms();
        let mut devices: Vec<DeviceCertificate> = self
            .inner
            .store
            .own_devices()?
            .iter()
            .filter_map(|b| DeviceCertificate::from_bytes(b).ok())
            .filter(|c| DeviceCertificate::verify(c.wire(), now).is_ok())
            .collect();
        if !devices.iter().any(|c| c.device_key == self.inner.cert.device_key) {
            devices.push(self.inner.cert.clone());
        }
        Ok((devices, self.home_relays(), self.name()))
    }

    /// Signs and publishes this account's user record in the DHT, and notes
    /// in the store when and what it published.
    pub async fn publish_record(&self) -> Result<(), NodeError> {
        let seq = self.core(|reply| CoreInput::NextRecordSeq { reply }).await?;
        let key = AccountKey::from_seed(self.inner.account_seed);
        let (devices, relays, name) = self.record_contents()?;
        let now = self.inner.clock.now_ms();
        let record = UserRecord::sign(&key, seq, &devices, &relays, &name, now);
        let dht_key = user_record_key(&self.inner.account);
        let holders = self.record_holders(now);
        let renewal = holders.is_some();
        let found = match self.inner.net.put_record(dht_key.to_vec(), record, holders).await {
            Ok(found) => found,
            Err(e) => {
                if renewal {
                    // The next try looks the key up afresh.
                    self.inner.store.set_record_holders(None)?;
                }
                return Err(e.into());
            }
        };
        let digest = user_record_contents_digest(&devices, &relays, &name);
        // One commit for the publication and the servers its lookup found.
        self.inner.store.unit(|| {
            if let Some(found) = &found {
                self.inner
                    .store
                    .set_record_holders(Some((now, &rows_of_peers(found))))?;
            }
            self.inner.store.set_last_record_publication(now, digest)
        })?;
        Ok(())
    }

    /// The servers the last lookup for this account's record found nearest its
    /// key, if that was less than `net::RECORD_HOLDERS_FRESH` ago.
    fn record_holders(&self, now_ms: u64) -> Option<net::Holders> {
        let (found_ms, saved) = match self.inner.store.record_holders() {
            Ok(Some(saved)) => saved,
            Ok(None) => return None,
            Err(e) => {
                warn!("looking the record's key up again: {e}");
                return None;
            }
        };
        let age = Duration::from_millis(now_ms.checked_sub(found_ms)?);
        if age >= net::RECORD_HOLDERS_FRESH {
            return None;
        }
        let holders = peers_of_rows(saved);
        (!holders.is_empty()).then_some(holders)
    }

    /// How long until the user record is due again when it is republished
    /// every `interval`: at once if it was never published, if what it says
    /// has changed since, or if the clock reads earlier than the last
    /// publication; otherwise `interval` after the last publication. A node
    /// restarting minutes after it published does not publish again.
    pub fn record_due_in(&self, interval: Duration) -> Result<Duration, NodeError> {
        let Some((at, digest)) = self.inner.store.last_record_publication()? else {
            return Ok(Duration::ZERO);
        };
        let (devices, relays, name) = self.record_contents()?;
        let now = self.inner.clock.now_ms();
        if digest != user_record_contents_digest(&devices, &relays, &name) || at > now {
            return Ok(Duration::ZERO);
        }
        Ok(interval.saturating_sub(Duration::from_millis(now - at)))
    }

    /// Publishes the user record whenever it is due (see [`Self::record_due_in`]):
    /// at once on a first start or after a change, then every `interval`,
    /// retrying quickly until each publication succeeds.
    pub fn spawn_record_publisher(&self, interval: Duration) -> JoinHandle<()> {
        self.spawn_observed_record_publisher(interval, |_, _| {})
    }

    /// [`Self::spawn_record_publisher`], telling `observe` whether each
    /// publication succeeded and how long it took (the simulator counts them).
    pub fn spawn_observed_record_publisher(
        &self,
        interval: Duration,
        mut observe: impl FnMut(bool, Duration) + Send + 'static,
    ) -> JoinHandle<()> {
        let h = self.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            let mut published = false;
            loop {
                let due = match h.record_due_in(interval) {
                    Ok(due) => due,
                    Err(NodeError::Stopped) => return,
                    Err(e) => {
                        debug!("cannot tell when the user record was last published: {e}");
                        if published { interval } else { Duration::ZERO }
                    }
                };
                if !due.is_zero() {
                    tokio::time::sleep(due).await;
                    published = false;
                    continue;
                }
                let started = tokio::time::Instant::now();
                let res = h.publish_record().await;
                if !matches!(res, Err(NodeError::Stopped)) {
                    observe(res.is_ok(), started.elapsed());
                }
                match res {
                    Ok(()) => {
                        debug!("user record published");
                        wait = Duration::from_secs(1);
                        published = true;
                    }
                    Err(NodeError::Stopped) => return,
                    Err(e) => {
                        debug!("publishing user record failed: {e}; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(60));
                    }
                }
            }
        })
    }

    /// Fills in contacts that arrived without a name (someone who started a
    /// conversation with us) from their user record in the DHT.
    fn spawn_contact_resolver(&self) -> JoinHandle<()> {
        let h = self.clone();
        let mut rx = self.subscribe();
        tokio::spawn(async move {
            loop {
                let c = match rx.recv().await {
                    Ok(NodeEvent::Contact(c)) if c.name.is_empty() => c,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Ok(account) = AccountId::from_base58(&c.account) else {
                    continue;
                };
                let h = h.clone();
                tokio::spawn(async move {
                    for attempt in 0..5u32 {
                        if let Ok(r) = h.lookup_record(&account).await {
                            if r.name.is_empty() {
                                return;
                            }
                            let contact = Contact {
                                account: *account.as_bytes(),
                                name: r.name.clone(),
                                devices: r.devices.iter().map(|d| d.to_bytes()).collect(),
                                relays: r.relays.clone(),
                                capabilities: Vec::new(),
                                record_seq: r.seq,
                                conversations: Vec::new(),
                                added_ms: h.inner.clock.now_ms(),
                            };
                            let _ = h.core(|reply| CoreInput::PutContact { contact, reply }).await;
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                    }
                });
            }
        })
    }

    /// Finds an account's newest valid user record in the DHT.
    pub async fn lookup_record(&self, account: &AccountId) -> Result<UserRecord, NodeError> {
        let key = user_record_key(account);
        let found = self.inner.net.get_record(key.to_vec()).await?;
        let now = self.inner.clock.now_ms();
        found
            .iter()
            .filter_map(|b| UserRecord::verify(b, &key, now).ok())
            .max_by_key(|r| r.seq)
            .ok_or(NodeError::Net(NetError::NotFound))
    }

    /// Adds a contact from a `tidings:` card URI or a bare account key (looked up in the DHT).
    pub async fn add_contact(&self, input: &str, name: Option<&str>) -> Result<ContactView, NodeError> {
        let input = input.trim();
        let now = self.inner.clock.now_ms();
        let mut contact = if input.starts_with(tidings_protocol::card::URI_SCHEME) {
            contact_from_card(ContactCard::from_uri(input)?, now)
        } else {
            let account = AccountId::from_base58(input).map_err(|_| CardError::Scheme)?;
            let record = self.lookup_record(&account).await?;
            Contact {
                account: *account.as_bytes(),
                name: record.name,
                devices: record.devices.iter().map(|d| d.to_bytes()).collect(),
                relays: record.relays,
                capabilities: Vec::new(),
                record_seq: record.seq,
                conversations: Vec::new(),
                added_ms: now,
            }
        };
        if contact.account == *self.inner.account.as_bytes() {
            return Err(NodeError::InvalidContact("that is your own card".into()));
        }
        if let Some(n) = name {
            if n.len() > tidings_protocol::limits::MAX_NAME {
                return Err(NodeError::InvalidContact("name is too long".into()));
            }
            contact.name = n.to_owned();
        }
        let c = self.core(|reply| CoreInput::PutContact { contact, reply }).await?;
        Ok(ContactView::from_contact(&c))
    }

    /// Finds a contact by account key (base58) or by name.
    pub fn find_contact(&self, who: &str) -> Result<Contact, NodeError> {
        let contacts = self.inner.store.list_contacts()?;
        if let Ok(account) = AccountId::from_base58(who)
            && let Some(c) = contacts.iter().find(|c| c.account == *account.as_bytes())
        {
            return Ok(c.clone());
        }
        let mut named = contacts.into_iter().filter(|c| c.name == who);
        match (named.next(), named.next()) {
            (Some(c), None) => Ok(c),
            (Some(_), Some(_)) => Err(NodeError::UnknownContact(format!(
                "{who} (several contacts have this name; use the account key)"
            ))),
            _ => Err(NodeError::UnknownContact(who.to_owned())),
        }
    }

    pub fn contacts(&self) -> Result<Vec<ContactView>, NodeError> {
        Ok(self
            .inner
            .store
            .list_contacts()?
            .iter()
            .map(ContactView::from_contact)
            .collect())
    }

    pub fn history(&self, who: &str) -> Result<Vec<MessageView>, NodeError> {
        let c = self.find_contact(who)?;
        Ok(self
            .inner
            .store
            .list_messages(&c.account)?
            .iter()
            .map(|m| MessageView::of(&self.inner.store, m))
            .collect())
    }

    /// Sends a text message. Returns once it is durably in the outbox: from then
    /// on it is retried until every recipient device acknowledged it.
    ///
    /// A message to a contact without a conversation is kept as
    /// [`MessageState::Waiting`] (as is every later one while it waits) and
    /// sent once a conversation exists: the node sets one up in the
    /// background (`send_waiting`), tries again while no device or relay of
    /// theirs answers, and takes one the contact starts. Such a send returns
    /// once the message is sent, or after [`SEND_SETUP_PATIENCE`] as waiting.
    pub async fn send_text(&self, who: &str, text: &str) -> Result<MessageView, NodeError> {
        let contact = self.find_contact(who)?.account;
        self.send_to_contact(contact, text, None).await
    }

    /// [`NodeHandle::send_text`] to an account, optionally as a reply.
    pub(crate) async fn send_to_contact(
        &self,
        contact: [u8; 32],
        text: &str,
        reply_to: Option<[u8; 16]>,
    ) -> Result<MessageView, NodeError> {
        let send = |wait| self.send_message(contact, text.to_owned(), reply_to, wait);
        match send(false).await {
            Err(NodeError::NoConversation) => {
                // Kept as waiting, which starts the set-up in `send_waiting`;
                // handed back once it is sent, or as waiting after SEND_SETUP_PATIENCE.
                let mut events = self.subscribe();
                let view = send(true).await?;
                let deadline = tokio::time::Instant::now() + SEND_SETUP_PATIENCE;
                // The flush announces each message it sends (`NodeEvent::Message`);
                // only after missed events is the row itself read.
                loop {
                    match tokio::time::timeout_at(deadline, events.recv()).await {
                        Ok(Ok(NodeEvent::Message(m))) if m.id == view.id && m.state != MessageState::Waiting => {
                            return Ok(*m);
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                            let id = crate::chats::parse_message_id(&view.id)?;
                            if let Some(m) = self.inner.store.message(&id)?
                                && m.state != MessageState::Waiting
                            {
                                return Ok(MessageView::of(&self.inner.store, &m));
                            }
                        }
                        Err(_) | Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(view),
                    }
                }
            }
            r => r,
        }
    }

    /// Sends to a contact's account directly (no name lookup); for benchmarks.
    pub async fn send_to(&self, contact: [u8; 32], text: &str) -> Result<MessageView, NodeError> {
        self.send_message(contact, text.to_owned(), None, false).await
    }

    async fn send_message(
        &self,
        contact: [u8; 32],
        text: String,
        reply_to: Option<[u8; 16]>,
        wait: bool,
    ) -> Result<MessageView, NodeError> {
        self.core(|reply| CoreInput::Send {
            contact,
            text,
            reply_to,
            wait,
            reply,
        })
        .await
    }

    /// Sets up the conversations our waiting messages wait for, and sends
    /// them once one exists. A contact is tried as soon as a message to them
    /// waits, then [`WAITING_RETRY`] after a failed try, twice as long after
    /// each further one, up to [`WAITING_RETRY_MAX`]; a conversation the
    /// contact started is used as soon as it exists, and every contact is
    /// tried again at once on a `nudge` (a home relay connected again). Set-ups
    /// run side by side, at most one per contact, so one contact who cannot
    /// be reached does not hold up the others.
    async fn send_waiting(self, wake: Arc<tokio::sync::Notify>, nudge: Arc<tokio::sync::Notify>) {
        // Per contact: when to try next, and the pause after the last failure.
        let mut retry: HashMap<[u8; 32], (tokio::time::Instant, Duration)> = HashMap::new();
        let mut trying: tokio::task::JoinSet<([u8; 32], Result<usize, NodeError>)> = tokio::task::JoinSet::new();
        let mut in_flight: HashMap<tokio::task::Id, [u8; 32]> = HashMap::new();
        loop {
            let peers = self.inner.store.waiting_peers().unwrap_or_default();
            retry.retain(|p, _| peers.contains(p));
            let now = tokio::time::Instant::now();
            for peer in peers {
                if in_flight.values().any(|p| *p == peer) {
                    continue;
                }
                let has_conversation = self
                    .inner
                    .store
                    .contact(&peer)
                    .ok()
                    .flatten()
                    .is_some_and(|c| !c.conversations.is_empty());
                let (at, _) = *retry.entry(peer).or_insert((now, Duration::ZERO));
                if !has_conversation && at > now {
                    continue;
                }
                let node = self.clone();
                let task = trying.spawn(async move {
                    let sent = match node.start_conversation(peer).await {
                        Ok(()) => {
                            node.core(|reply| CoreInput::FlushWaiting { contact: peer, reply })
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    (peer, sent)
                });
                in_flight.insert(task.id(), peer);
            }
            let next = retry
                .iter()
                .filter(|(p, _)| !in_flight.values().any(|q| q == *p))
                .map(|(_, (at, _))| *at)
                .min();
            tokio::select! {
                _ = wake.notified() => {}
                _ = nudge.notified() => {
                    let now = tokio::time::Instant::now();
                    for (at, _) in retry.values_mut() {
                        *at = now;
                    }
                }
                _ = tokio::time::sleep_until(next.unwrap_or(now)), if next.is_some() => {}
                Some(done) = trying.join_next_with_id(), if !trying.is_empty() => {
                    let (peer, sent) = match done {
                        Ok((id, (peer, sent))) => {
                            in_flight.remove(&id);
                            (peer, sent)
                        }
                        Err(e) => {
                            // A set-up that panicked counts as failed.
                            let Some(peer) = in_flight.remove(&e.id()) else { continue };
                            (peer, Err(NodeError::Unreachable(format!("the set-up stopped: {e}"))))
                        }
                    };
                    match sent {
                        Ok(n) => {
                            debug!(contact = %bs58::encode(peer).into_string(), n, "waiting messages sent");
                            retry.remove(&peer);
                        }
                        Err(e) => {
                            let pause = retry
                                .get(&peer)
                                .map_or(WAITING_RETRY, |(_, p)| (*p * 2).clamp(WAITING_RETRY, WAITING_RETRY_MAX));
                            debug!(contact = %bs58::encode(peer).into_string(), "no conversation yet ({e}); again in {pause:?}");
                            retry.insert(peer, (tokio::time::Instant::now() + pause, pause));
                        }
                    }
                }
            }
        }
    }

    /// Creates the MLS conversation with a contact: refreshes their devices from
    /// the DHT, fetches a key package from each device, and hands them to the core.
    pub async fn start_conversation(&self, account: [u8; 32]) -> Result<(), NodeError> {
        self.new_conversation(account, false).await
    }

    /// Replaces the conversation with a contact by a new one holding every
    /// current device of both accounts (after one of ours was linked or
    /// revoked). Only if a key package came from each of our other devices:
    /// otherwise the new conversation would lack one again.
    async fn replace_conversation(&self, account: [u8; 32]) -> Result<(), NodeError> {
        self.new_conversation(account, true).await
    }

    async fn new_conversation(&self, account: [u8; 32], replace: bool) -> Result<(), NodeError> {
        let _guard = self.inner.conversation_lock.lock().await;
        let mut contact = self
            .inner
            .store
            .list_contacts()?
            .into_iter()
            .find(|c| c.account == account)
            .ok_or_else(|| NodeError::UnknownContact(bs58::encode(account).into_string()))?;
        if !replace && !contact.conversations.is_empty() {
            return Ok(());
        }
        let id = AccountId::from_bytes(&account).map_err(|e| NodeError::InvalidContact(e.to_string()))?;
        // A newer record may list devices the card did not; a DHT peer that does
        // not answer holds the lookup up, so it gets DEVICE_PATIENCE at most (a
        // device list that changes later is mended then).
        if let Ok(Ok(record)) = tokio::time::timeout(DEVICE_PATIENCE, self.lookup_record(&id)).await
            && record.seq > contact.record_seq
        {
            contact.devices = record.devices.iter().map(|d| d.to_bytes()).collect();
            contact.relays = record.relays.clone();
            contact.record_seq = record.seq;
            if contact.name.is_empty() {
                contact.name = record.name.clone();
            }
            contact = self
                .core(|reply| CoreInput::PutContact {
                    contact: contact.clone(),
                    reply,
                })
                .await?;
        }
        let mut key_packages = self.key_packages_for(&contact).await?;
        let own_wanted = self.devices()?.len().saturating_sub(1);
        let own = self.own_key_packages().await;
        if replace && own.len() < own_wanted {
            return Err(NodeError::Unreachable("not every device of ours answered".into()));
        }
        key_packages.extend(own);
        self.core(|reply| CoreInput::CreateConversation {
            contact: account,
            key_packages,
            replace,
            reply,
        })
        .await?;
        Ok(())
    }

    /// One key package from each of our other devices that answers (or from
    /// our relays when it is away).
    async fn own_key_packages(&self) -> Vec<Vec<u8>> {
        let relays: Vec<String> = self.home_relays();
        let mut out = Vec::new();
        for cert in self.devices().unwrap_or_default() {
            if cert.device_key == self.inner.cert.device_key {
                continue;
            }
            let Some(peer) = peer_id_of(&cert.device_key) else {
                continue;
            };
            out.extend(self.key_package_of(peer, &relays, &cert.device_key).await.ok());
        }
        out
    }

    /// A key package of `device` (PeerId `peer`), asked for again after 1 s,
    /// 2 s, 4 s, ... for up to [`KEY_PACKAGE_PATIENCE`] while neither the
    /// device nor its relays hand one out.
    async fn key_package_of(&self, peer: PeerId, relays: &[String], device: &[u8; 32]) -> Result<Vec<u8>, String> {
        let deadline = tokio::time::Instant::now() + KEY_PACKAGE_PATIENCE;
        let mut pause = Duration::from_secs(1);
        loop {
            match self.key_package_once(peer, relays, device).await {
                Ok(kp) => return Ok(kp),
                Err(e) if tokio::time::Instant::now() + pause < deadline => {
                    debug!(%peer, "no key package yet ({e}); asking again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One try at a key package of `device`: from the device itself if it
    /// answers within [`DEVICE_PATIENCE`], else claimed from its `relays`;
    /// if they have none, the device gets the rest of its time (it may have
    /// just started and not be in the DHT yet). Only a device without relays
    /// is looked up in the DHT.
    async fn key_package_once(&self, peer: PeerId, relays: &[String], device: &[u8; 32]) -> Result<Vec<u8>, String> {
        let fetch = self.fetch_key_package(peer, relays.is_empty());
        tokio::pin!(fetch);
        let early = tokio::time::timeout(DEVICE_PATIENCE, &mut fetch).await;
        if let Ok(Ok(kp)) = early {
            return Ok(kp);
        }
        if let Some(kp) = self.claim_key_package(relays, device).await {
            return Ok(kp);
        }
        match early {
            Ok(Err(e)) => Err(e.to_string()),
            _ => fetch.await.map_err(|e| e.to_string()),
        }
    }

    /// One key package for each of a contact's devices: fetched from the
    /// device, or claimed from its relays when the device is away.
    async fn key_packages_for(&self, contact: &Contact) -> Result<Vec<Vec<u8>>, NodeError> {
        let now = self.inner.clock.now_ms();
        let mut key_packages = Vec::new();
        let mut last_error = String::from("no devices known");
        for bytes in &contact.devices {
            let Ok(cert) = DeviceCertificate::from_bytes(bytes) else {
                continue;
            };
            if DeviceCertificate::verify(cert.wire(), now).is_err() {
                continue;
            }
            let Some(peer) = peer_id_of(&cert.device_key) else {
                continue;
            };
            // A device behind a NAT is reachable only through its relays' circuits.
            add_circuit_addresses(&self.inner.net, peer, &contact.relays).await;
            match self.key_package_of(peer, &contact.relays, &cert.device_key).await {
                Ok(kp) => key_packages.push(kp),
                Err(e) => last_error = e,
            }
        }
        if key_packages.is_empty() {
            return Err(NodeError::Unreachable(last_error));
        }
        Ok(key_packages)
    }

    // ------------------------------------------------------------- groups

    /// Creates a group on this device's home relays and invites `members`
    /// (contacts, by name or account).
    ///
    /// Every member is resolved before the group exists, so a refused create
    /// leaves nothing behind: an unknown or ambiguous contact fails with
    /// [`NodeError::UnknownContact`], a contact without a valid device
    /// certificate with [`NodeError::Unreachable`]. A contact named twice is
    /// invited once.
    ///
    /// The members' key packages are fetched only once the group exists
    /// (that takes the network). Should that fail for any member (or the
    /// commit adding them be refused), the group stays with this device as
    /// its only member, nobody is invited, and the error is returned; the
    /// group is then listed by [`NodeHandle::groups`] and the members can be
    /// invited to it with [`NodeHandle::invite`].
    pub async fn create_group(&self, name: &str, members: &[&str]) -> Result<GroupView, NodeError> {
        let now = self.inner.clock.now_ms();
        let mut accounts: Vec<String> = Vec::new();
        for who in members {
            let contact = self.find_contact(who)?;
            if !crate::core::has_valid_device(&contact, now) {
                return Err(NodeError::Unreachable(format!("{who} has no valid device")));
            }
            let account = bs58::encode(contact.account).into_string();
            if !accounts.contains(&account) {
                accounts.push(account);
            }
        }
        let relays: Vec<String> = self.home_relays();
        let name = name.to_owned();
        let gid = self
            .core(|reply| CoreInput::CreateGroup { name, relays, reply })
            .await?;
        self.group_sync_now();
        if !accounts.is_empty() {
            let accounts: Vec<&str> = accounts.iter().map(String::as_str).collect();
            self.invite(&hex::encode(&gid), &accounts).await?;
        }
        self.group(&hex::encode(&gid)).await
    }

    /// Adds contacts to a group: claims a key package for each of their
    /// devices and commits the add. The Welcome goes out once the group's
    /// sequencing relay has put the commit first in its epoch.
    pub async fn invite(&self, group: &str, contacts: &[&str]) -> Result<(), NodeError> {
        let group_id = parse_group_id(group)?;
        let mut key_packages = Vec::new();
        for who in contacts {
            let contact = self.find_contact(who)?;
            key_packages.extend(self.key_packages_for(&contact).await?);
        }
        self.group_change(group_id, IntentRow::Add { key_packages }).await
    }

    /// Removes a contact's devices from a group (admins; see `group::authorize`).
    pub async fn remove_member(&self, group: &str, who: &str) -> Result<(), NodeError> {
        let group_id = parse_group_id(group)?;
        let account = match self.find_contact(who) {
            Ok(c) => c.account,
            Err(e) => *AccountId::from_base58(who).map_err(|_| e)?.as_bytes(),
        };
        let devices = self
            .core(|reply| CoreInput::GroupMemberDevices {
                group_id: group_id.clone(),
                accounts: vec![account],
                reply,
            })
            .await?;
        if devices.is_empty() {
            return Err(NodeError::UnknownContact(format!("{who} is not in the group")));
        }
        self.group_change(group_id, IntentRow::Remove { devices }).await
    }

    /// Leaves a group: proposes the removal of every device of this account
    /// from it; another member commits that, and this device then shows the
    /// group as left. The owner hands the group over first.
    pub async fn leave_group(&self, group: &str) -> Result<(), NodeError> {
        let group_id = parse_group_id(group)?;
        self.group_change_with(|reply| CoreInput::GroupLeave {
            group_id: group_id.clone(),
            reply,
        })
        .await
    }

    /// Renames a group, or changes its description (admins).
    pub async fn set_group_info(
        &self,
        group: &str,
        name: Option<&str>,
        description: Option<&str>,
    ) -> Result<(), NodeError> {
        let group_id = parse_group_id(group)?;
        let mut meta = self
            .core(|reply| CoreInput::GroupMeta {
                group_id: group_id.clone(),
                reply,
            })
            .await?;
        if let Some(n) = name {
            meta.name = n.to_owned();
        }
        if let Some(d) = description {
            meta.description = d.to_owned();
        }
        self.group_change(group_id, IntentRow::SetMeta { meta: meta.encode() })
            .await
    }

    /// Moves a group to other relays (admins): the commit names the new relays
    /// and a new group inbox, which the first of them sequences from then on.
    pub async fn move_group(&self, group: &str, relays: Vec<String>) -> Result<(), NodeError> {
        let group_id = parse_group_id(group)?;
        for r in &relays {
            let addr: Multiaddr = r
                .parse()
                .map_err(|e| NodeError::InvalidInput(format!("relay address {r}: {e}")))?;
            if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
                return Err(NodeError::InvalidInput(format!(
                    "relay address {r} lacks /p2p/<peer id>"
                )));
            }
        }
        if relays.is_empty() {
            return Err(NodeError::InvalidInput("a group needs at least one relay".into()));
        }
        let mut meta = self
            .core(|reply| CoreInput::GroupMeta {
                group_id: group_id.clone(),
                reply,
            })
            .await?;
        meta.relays = relays;
        meta.inbox_seed = random_seed()?;
        self.group_change(group_id, IntentRow::SetMeta { meta: meta.encode() })
            .await
    }

    /// Gives a member a role (owner only); making someone owner transfers
    /// ownership (this account becomes an admin).
    pub async fn set_group_role(&self, group: &str, who: &str, role: Role) -> Result<(), NodeError> {
        let group_id = parse_group_id(group)?;
        let account = match self.find_contact(who) {
            Ok(c) => c.account,
            Err(e) => *AccountId::from_base58(who).map_err(|_| e)?.as_bytes(),
        };
        let mut meta = self
            .core(|reply| CoreInput::GroupMeta {
                group_id: group_id.clone(),
                reply,
            })
            .await?;
        if role == Role::Owner {
            meta.roles.insert(*self.inner.account.as_bytes(), Role::Admin);
        }
        if role == Role::Member {
            meta.roles.remove(&account);
        } else {
            meta.roles.insert(account, role);
        }
        self.group_change(group_id, IntentRow::SetMeta { meta: meta.encode() })
            .await
    }

    /// Commits a change, waiting (bounded) while an earlier change of ours is
    /// still undecided.
    async fn group_change(&self, group_id: Vec<u8>, intent: IntentRow) -> Result<(), NodeError> {
        self.group_change_with(|reply| CoreInput::GroupIntent {
            group_id: group_id.clone(),
            intent: intent.clone(),
            reply,
        })
        .await
    }

    /// Asks the core for a group change, waiting (bounded) while an earlier
    /// change of ours is still undecided.
    async fn group_change_with(
        &self,
        make: impl Fn(oneshot::Sender<Result<bool, NodeError>>) -> CoreInput,
    ) -> Result<(), NodeError> {
        let deadline = tokio::time::Instant::now() + GROUP_CHANGE_WAIT;
        loop {
            let r = self.core(&make).await;
            match r {
                Ok(_) => {
                    self.group_sync_now();
                    return Ok(());
                }
                Err(NodeError::Unreachable(why))
                    if why.contains("still waiting") && tokio::time::Instant::now() < deadline =>
                {
                    self.group_sync_now();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a text to a group.
    pub async fn send_group(&self, group: &str, text: &str) -> Result<MessageView, NodeError> {
        let group_id = parse_group_id(group)?;
        let text = text.to_owned();
        let m = self
            .core(|reply| CoreInput::SendGroup {
                group_id,
                text,
                reply_to: None,
                reply,
            })
            .await?;
        self.group_sync_now();
        Ok(m)
    }

    /// A group's history, oldest first.
    pub fn group_history(&self, group: &str) -> Result<Vec<MessageView>, NodeError> {
        let group_id = parse_group_id(group)?;
        let key = tidings_protocol::group::group_chat_key(&group_id);
        Ok(self
            .inner
            .store
            .list_messages(&key)?
            .iter()
            .map(|m| MessageView::of(&self.inner.store, m))
            .collect())
    }

    /// A group's name, members, roles and relays.
    pub async fn group(&self, group: &str) -> Result<GroupView, NodeError> {
        let group_id = parse_group_id(group)?;
        self.core(|reply| CoreInput::GroupView { group_id, reply }).await
    }

    /// Every group this device is (or was) in.
    pub async fn groups(&self) -> Result<Vec<GroupView>, NodeError> {
        let mut out = Vec::new();
        for c in self.inner.store.list_groups()? {
            let group_id = c.group_id;
            out.push(self.core(|reply| CoreInput::GroupView { group_id, reply }).await?);
        }
        Ok(out)
    }

    // ------------------------------------------------------------ devices

    /// Opens a link offer for a new device of this account and returns the
    /// code to give it (`tidings init --link <code>`), valid for five minutes.
    pub async fn link_offer(&self) -> Result<String, NodeError> {
        let now = self.inner.clock.now_ms();
        let mut secret = [0u8; 16];
        secret.copy_from_slice(&random_seed()?[..16]);
        let peer = self.peer_id();
        let status = self.inner.net.status().await?;
        let code = tidings_protocol::link::LinkCode {
            peer_id: peer.to_bytes(),
            addrs: status.listen_addrs,
            secret,
            expires_ms: now + tidings_protocol::link::LINK_VALIDITY_MS,
        };
        if code.addrs.is_empty() {
            return Err(NodeError::Unreachable(
                "this node listens on no address a new device could dial".into(),
            ));
        }
        *self.inner.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(LinkOffer {
            secret,
            expires_ms: code.expires_ms,
            bound: None,
        });
        Ok(code.to_text())
    }

    /// Revokes another device of this account (by its device key, hex): it is
    /// removed from every group and from the published user record.
    pub async fn revoke_device(&self, device: &str) -> Result<usize, NodeError> {
        let device: [u8; 32] = hex::decode(device.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| NodeError::InvalidInput("a device is named by its 64-hex-digit key".into()))?;
        let groups = self.core(|reply| CoreInput::RevokeDevice { device, reply }).await?;
        self.group_sync_now();
        // One-to-one conversations holding the device are replaced right away.
        self.mend_conversations(&mut std::collections::HashMap::new()).await;
        if let Err(e) = self.publish_record().await {
            warn!("republishing the user record after a revocation failed: {e}");
        }
        Ok(groups)
    }

    /// Every device certificate of this account known here.
    pub fn devices(&self) -> Result<Vec<DeviceCertificate>, NodeError> {
        let mut out: Vec<DeviceCertificate> = self
            .inner
            .store
            .own_devices()?
            .iter()
            .filter_map(|b| DeviceCertificate::from_bytes(b).ok())
            .collect();
        if !out.iter().any(|c| c.device_key == self.inner.cert.device_key) {
            out.push(self.inner.cert.clone());
        }
        Ok(out)
    }

    /// Replaces each one-to-one conversation that does not hold exactly our
    /// current devices (see `Core::conversations_to_mend`), at most once per
    /// [`MEND_INTERVAL`] per contact.
    async fn mend_conversations(&self, last: &mut std::collections::HashMap<[u8; 32], tokio::time::Instant>) {
        let Some(contacts) = self.core_plain(|reply| CoreInput::ConversationsToMend { reply }).await else {
            return;
        };
        last.retain(|_, t| t.elapsed() < MEND_INTERVAL);
        for account in contacts {
            if last.contains_key(&account) {
                continue;
            }
            last.insert(account, tokio::time::Instant::now());
            match self.replace_conversation(account).await {
                Ok(()) => {
                    info!(contact = %bs58::encode(account).into_string(), "conversation replaced for our devices")
                }
                Err(e) => {
                    debug!(contact = %bs58::encode(account).into_string(), "replacing a conversation failed: {e}")
                }
            }
        }
    }

    /// Adds our own devices to the groups they are missing from (after a new
    /// device was linked): a key package from the device, or from our relays.
    /// Returns whether one is still missing (to be tried again).
    async fn add_own_devices(&self) -> bool {
        let missing = match self.core_plain(|reply| CoreInput::MissingOwnDevices { reply }).await {
            Some(m) => m,
            None => return false,
        };
        let mut left = false;
        let relays: Vec<String> = self.home_relays();
        for (group_id, cert) in missing {
            let kp = match peer_id_of(&cert.device_key) {
                Some(peer) => match self.fetch_key_package(peer, relays.is_empty()).await {
                    Ok(kp) => Some(kp),
                    Err(_) => self.claim_key_package(&relays, &cert.device_key).await,
                },
                None => None,
            };
            let Some(kp) = kp else {
                left = true;
                continue;
            };
            match self
                .core(|reply| CoreInput::AddOwnDevice {
                    group_id: group_id.clone(),
                    key_package: kp,
                    reply,
                })
                .await
            {
                Ok(()) => info!(conversation = %hex::encode(&group_id), "adding our new device"),
                Err(e) => {
                    left = true;
                    debug!(conversation = %hex::encode(&group_id), "adding our device failed: {e}")
                }
            }
        }
        left
    }

    async fn core_plain<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> CoreInput) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.inner.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Wakes the group sync task.
    pub(crate) fn group_sync_now(&self) {
        self.inner.group_wake.notify_one();
    }

    /// Keeps every group applied. Each group's sequencing inbox is read by
    /// a long poll of its own: the relay answers as soon as something is
    /// deposited there, or with nothing after [`GROUP_WAIT`]. This loop starts
    /// the polls and runs the groups' upkeep in the core (commits sent again,
    /// proposals committed, scheduled self-updates, leaving): when woken, and
    /// at the upkeep's next deadline. A change of the store brings a round
    /// [`GROUP_UPKEEP_MAX`] after the last one (and whenever a poll ends, it
    /// looks whether the store changed); while nothing is written, the last
    /// round's answer stands (for at most [`GROUP_UPKEEP_IDLE`]), and the loop
    /// sleeps.
    async fn group_sync(self) {
        use futures::StreamExt as _;
        // The polls are futures of this task (not tasks of their own), so
        // that stopping this task drops them, and the node's state with them.
        let mut polling = std::collections::HashSet::new();
        let mut polls = futures::stream::FuturesUnordered::new();
        // The last round: the store's change count before it, when the next one is due
        // whatever is written, and the inboxes it listed.
        let mut last: Option<(u64, tokio::time::Instant, Vec<crate::core::GroupInbox>)> = None;
        let mut last_round = tokio::time::Instant::now();
        let mut woken = true;
        loop {
            let changes = self.inner.store.changes();
            let now = tokio::time::Instant::now();
            let current = !woken
                && last
                    .as_ref()
                    .is_some_and(|(seen, due, _)| *seen == changes && now < *due);
            if !current {
                let Ok(upkeep) = self.core(|reply| CoreInput::GroupInboxes { reply }).await else {
                    return;
                };
                let due = upkeep
                    .next_due_ms
                    .map_or(GROUP_UPKEEP_IDLE, Duration::from_millis)
                    .clamp(GROUP_TICK, GROUP_UPKEEP_IDLE);
                last = Some((changes, now + due, upkeep.inboxes));
                last_round = now;
            }
            let Some((seen, due, inboxes)) = &last else { return };
            for g in inboxes {
                if polling.insert((g.group_id.clone(), g.inbox_seed)) {
                    polls.push(self.poll_group(g.clone()));
                }
            }
            // The next pass: when woken, when a poll ends, at the upkeep's deadline, or once the
            // store has changed, but not sooner than GROUP_UPKEEP_MAX after the last round.
            let due = (*due).max(tokio::time::Instant::now() + GROUP_TICK);
            let seen = *seen;
            let store = &self.inner.store;
            woken = tokio::select! {
                _ = self.inner.group_wake.notified() => true,
                _ = tokio::time::sleep_until(due) => false,
                _ = async {
                    store.changed(seen).await;
                    tokio::time::sleep_until(last_round + GROUP_UPKEEP_MAX).await;
                } => false,
                Some(done) = polls.next(), if !polls.is_empty() => {
                    polling.remove(&done);
                    false
                }
            };
        }
    }

    /// One long poll of a group's sequencing inbox, applied; returns the
    /// (group, inbox seed) it polled once it may be polled again.
    async fn poll_group(&self, g: crate::core::GroupInbox) -> (Vec<u8>, [u8; 32]) {
        let started = tokio::time::Instant::now();
        let pause = match self.fetch_group(&g, GROUP_WAIT).await {
            Ok(true) => Duration::ZERO,
            // A relay that does not hold fetches answers at once: never ask
            // faster than once a tick.
            Ok(false) => GROUP_TICK.saturating_sub(started.elapsed()),
            Err(e) => {
                debug!(group = %hex::encode(&g.group_id), "group fetch failed: {e}");
                GROUP_TICK
            }
        };
        tokio::time::sleep(pause).await;
        (g.group_id, g.inbox_seed)
    }

    /// Fetches one page of a group's sequencing inbox and applies it.
    /// Returns whether there may be more.
    async fn fetch_group(&self, g: &crate::core::GroupInbox, wait: Duration) -> Result<bool, NodeError> {
        let (relay, addr) = &g.relay;
        self.inner.net.add_address(*relay, addr.clone()).await;
        let key = tidings_protocol::DeviceKey::from_seed(g.key_seed).public();
        let inbox = mailbox::inbox_id(&key);
        let auth = self.signed_auth(&g.key_seed, mailbox::Op::Fetch, *relay, &inbox, g.cursor)?;
        let resp = self
            .mailbox_call_held(
                *relay,
                pb::mailbox_request::Op::Fetch(pb::Fetch {
                    inbox_id: inbox.to_vec(),
                    request_inbox: false,
                    after_index: g.cursor,
                    limit: 256,
                    auth: Some(auth),
                    wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
                }),
                wait,
            )
            .await?;
        let Some(pb::mailbox_response::Result::Fetched(fetched)) = resp.result else {
            return Ok(false);
        };
        if fetched.envelopes.is_empty() {
            return Ok(false);
        }
        let items: Vec<(u64, pb::Envelope)> = fetched
            .envelopes
            .iter()
            .map(|e| (e.index, pb::Envelope::decode(e.envelope.as_slice()).unwrap_or_default()))
            .collect();
        let applied = self
            .core(|reply| CoreInput::ApplyGroupInbox {
                group_id: g.group_id.clone(),
                inbox_seed: g.inbox_seed,
                items,
                reply,
            })
            .await?;
        Ok(applied > 0)
    }

    /// Claims a key package of `device` from one of `relays`.
    async fn claim_key_package(&self, relays: &[String], device: &[u8; 32]) -> Option<Vec<u8>> {
        for r in relays {
            let Ok(addr) = r.parse::<Multiaddr>() else { continue };
            let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
                continue;
            };
            self.inner.net.add_address(peer, addr).await;
            let request = pb::MailboxRequest {
                op: Some(pb::mailbox_request::Op::ClaimKeyPackage(pb::ClaimKeyPackage {
                    owner_key: device.to_vec(),
                })),
            };
            match self.inner.net.mailbox(peer, request).await {
                Ok(pb::MailboxResponse {
                    result: Some(pb::mailbox_response::Result::KeyPackage(kp)),
                    ..
                }) if !kp.is_empty() => return Some(kp),
                Ok(resp) => debug!(relay = %peer, status = resp.status, "no key package from relay"),
                Err(e) => debug!(relay = %peer, "claiming a key package failed: {e}"),
            }
        }
        None
    }

    /// Owner auth for this device's own inboxes, for a request to `relay`.
    fn owner_auth(
        &self,
        op: mailbox::Op,
        relay: PeerId,
        inbox: &[u8; 32],
        argument: u64,
    ) -> Result<pb::OwnerAuth, NodeError> {
        self.signed_with(&self.inner.owner_signer, op, relay, inbox, argument)
    }

    /// Owner auth for a request to `relay`, signed with the key of `seed` (a group inbox's).
    fn signed_auth(
        &self,
        seed: &[u8; 32],
        op: mailbox::Op,
        relay: PeerId,
        inbox: &[u8; 32],
        argument: u64,
    ) -> Result<pb::OwnerAuth, NodeError> {
        self.signed_with(&mailbox::AuthSigner::from_seed(seed), op, relay, inbox, argument)
    }

    fn signed_with(
        &self,
        signer: &mailbox::AuthSigner,
        op: mailbox::Op,
        relay: PeerId,
        inbox: &[u8; 32],
        argument: u64,
    ) -> Result<pb::OwnerAuth, NodeError> {
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&random_seed()?[..16]);
        Ok(signer.sign(op, &relay.to_bytes(), inbox, self.inner.clock.now_ms(), nonce, argument))
    }

    async fn mailbox_call(&self, relay: PeerId, op: pb::mailbox_request::Op) -> Result<pb::MailboxResponse, NodeError> {
        self.mailbox_call_held(relay, op, Duration::ZERO).await
    }

    /// [`Self::mailbox_call`] for a fetch the relay may hold for `wait`.
    async fn mailbox_call_held(
        &self,
        relay: PeerId,
        op: pb::mailbox_request::Op,
        wait: Duration,
    ) -> Result<pb::MailboxResponse, NodeError> {
        let resp = self
            .inner
            .net
            .mailbox_held(relay, pb::MailboxRequest { op: Some(op) }, wait)
            .await?;
        match pb::MailboxStatus::try_from(resp.status)
            .ok()
            .and_then(mailbox::MailboxError::from_status)
        {
            None => Ok(resp),
            Some(e) => Err(NodeError::Unreachable(format!("relay refused: {}", e.code()))),
        }
    }

    /// [`Self::drain_inbox`], logging the outcome; 0 when it failed.
    async fn drain_logged(&self, relay: PeerId, request_inbox: bool) -> usize {
        match self.drain_inbox(relay, request_inbox).await {
            Ok(n) => {
                if n > 0 {
                    info!(relay = %relay, n, request_inbox, "fetched mail");
                }
                n
            }
            Err(e) => {
                debug!(relay = %relay, request_inbox, "fetching mail failed: {e}");
                0
            }
        }
    }

    /// Fetches, applies and acknowledges everything waiting in one inbox on a
    /// relay. Returns the number of envelopes applied.
    async fn drain_inbox(&self, relay: PeerId, request_inbox: bool) -> Result<usize, NodeError> {
        let device = self.inner.cert.device_key;
        let inbox = mailbox::inbox_id(&device);
        let mut cursor = 0u64;
        let mut applied = 0usize;
        loop {
            let auth = self.owner_auth(mailbox::Op::Fetch, relay, &inbox, cursor)?;
            let resp = self
                .mailbox_call(
                    relay,
                    pb::mailbox_request::Op::Fetch(pb::Fetch {
                        inbox_id: inbox.to_vec(),
                        request_inbox,
                        after_index: cursor,
                        limit: 512,
                        auth: Some(auth),
                        wait_ms: 0,
                    }),
                )
                .await?;
            let Some(pb::mailbox_response::Result::Fetched(fetched)) = resp.result else {
                return Ok(applied);
            };
            if fetched.envelopes.is_empty() {
                return Ok(applied);
            }
            let mut indices = Vec::new();
            let mut envelopes = Vec::new();
            let mut up_to = None;
            for e in fetched.envelopes {
                match pb::Envelope::decode(e.envelope.as_slice()) {
                    Ok(env) => {
                        indices.push(e.index);
                        envelopes.push(env);
                    }
                    // Nothing we could ever apply (relays refuse such deposits):
                    // acknowledge it away.
                    Err(_) if envelopes.is_empty() => up_to = Some(e.index),
                    Err(_) => {}
                }
            }
            let n = envelopes.len();
            let statuses = self
                .core(|reply| CoreInput::ApplyMailbox {
                    relay,
                    request_inbox,
                    envelopes,
                    indices: indices.clone(),
                    reply,
                })
                .await?;
            let mut complete = statuses.len() == n;
            for (idx, st) in indices.iter().zip(&statuses) {
                match st {
                    pb::DeliverStatus::Accepted | pb::DeliverStatus::Duplicate | pb::DeliverStatus::Rejected => {
                        up_to = Some(*idx);
                        applied += 1;
                    }
                    _ => {
                        complete = false;
                        break;
                    }
                }
            }
            if let Some(u) = up_to {
                let auth = self.owner_auth(mailbox::Op::Ack, relay, &inbox, u)?;
                self.mailbox_call(
                    relay,
                    pb::mailbox_request::Op::Ack(pb::Ack {
                        inbox_id: inbox.to_vec(),
                        request_inbox,
                        up_to_index: u,
                        auth: Some(auth),
                    }),
                )
                .await?;
                cursor = u;
            }
            if !complete || !fetched.more {
                return Ok(applied);
            }
        }
    }

    /// Keeps this device's pool of one-time key packages on a relay topped up,
    /// so that people can start a conversation with it while it is away: asks
    /// how many are left and, when fewer than half of [`KEY_PACKAGE_POOL`],
    /// fills the pool up again. `with_last_resort` also replaces the
    /// last-resort package. Returns how many were published.
    async fn top_up_key_packages(&self, relay: PeerId, with_last_resort: bool) -> Result<usize, NodeError> {
        let held = match self.publish_key_packages(relay, Vec::new(), Vec::new()).await? {
            pb::MailboxResponse {
                result: Some(pb::mailbox_response::Result::Deleted(n)),
                ..
            } => usize::try_from(n).unwrap_or(usize::MAX),
            _ => 0,
        };
        if held >= KEY_PACKAGE_POOL / 2 && !with_last_resort {
            return Ok(0);
        }
        let n = KEY_PACKAGE_POOL.saturating_sub(held);
        let (kps, last_resort) = self
            .core(|reply| CoreInput::MakeKeyPackages {
                n,
                last_resort: with_last_resort,
                reply,
            })
            .await?;
        self.publish_key_packages(relay, kps, last_resort).await?;
        Ok(n)
    }

    async fn publish_key_packages(
        &self,
        relay: PeerId,
        key_packages: Vec<Vec<u8>>,
        last_resort: Vec<u8>,
    ) -> Result<pb::MailboxResponse, NodeError> {
        let inbox = mailbox::inbox_id(&self.inner.cert.device_key);
        let auth = self.owner_auth(
            mailbox::Op::PublishKeyPackages,
            relay,
            &inbox,
            key_packages.len() as u64,
        )?;
        self.mailbox_call(
            relay,
            pb::mailbox_request::Op::PublishKeyPackages(pb::PublishKeyPackages {
                inbox_id: inbox.to_vec(),
                key_packages,
                last_resort,
                auth: Some(auth),
            }),
        )
        .await
    }

    /// The relays to fetch our mail from: the home relays, then the ones
    /// given up that are still drained.
    fn mail_relays(&self) -> (Vec<RelayAddr>, Vec<RelayAddr>) {
        let with_peer = |a: Multiaddr| Some((crate::net::peer_of(&a)?, a));
        let home: Vec<RelayAddr> = self.home_relay_addrs().into_iter().filter_map(with_peer).collect();
        let now = self.inner.clock.now_ms();
        let retired = self
            .inner
            .store
            .settings()
            .map(|s| s.retired_relays)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, until)| *until > now)
            .filter_map(|(a, _)| crate::net::parse_relay(&a))
            .filter(|(p, _)| !home.iter().any(|(h, _)| h == p))
            .collect();
        (home, retired)
    }

    /// Keeps this device's relay mailboxes drained: on start it fetches
    /// everything that waited while it was away (direct deliveries wait until
    /// then), then subscribes for pushes, and re-checks periodically.
    async fn mailbox_sync(self) {
        let _ = self.inner.tx.send(CoreInput::CatchingUp(true)).await;
        // Unreachable relays must not hold direct deliveries back for long.
        let tx = self.inner.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CATCH_UP_LIMIT).await;
            let _ = tx.send(CoreInput::CatchingUp(false)).await;
        });
        let mut published = std::collections::HashSet::new();
        let mut first = true;
        // Rounds since the last full one; the first round is full.
        let mut light_rounds = 0u32;
        let mut woken = true;
        loop {
            let full = woken || light_rounds + 1 >= FULL_MAILBOX_ROUND_EVERY;
            light_rounds = if full { 0 } else { light_rounds + 1 };
            let (relays, retired) = self.mail_relays();
            for (relay, addr) in relays.iter().chain(&retired) {
                self.inner.net.add_address(*relay, addr.clone()).await;
                self.drain_logged(*relay, false).await;
                // Mail that waited for a Welcome from the request inbox goes in
                // right after it, not a round later.
                if self.drain_logged(*relay, true).await > 0 {
                    self.drain_logged(*relay, false).await;
                }
            }
            if first {
                // Everything that waited is in: direct deliveries may go ahead
                // (before subscribing and key-package upkeep, which take a while).
                first = false;
                let _ = self.inner.tx.send(CoreInput::CatchingUp(false)).await;
            }
            // A relay's subscription outlives the rounds, so re-subscribing and counting the
            // key-package pool wait for a full round; the drains above catch anything a lapsed
            // subscription missed in the meantime.
            for (relay, _) in relays.iter().filter(|_| full) {
                let inbox = mailbox::inbox_id(&self.inner.cert.device_key);
                let Ok(auth) = self.owner_auth(mailbox::Op::Subscribe, *relay, &inbox, 0) else {
                    continue;
                };
                let _ = self
                    .mailbox_call(
                        *relay,
                        pb::mailbox_request::Op::Subscribe(pb::Subscribe {
                            inbox_id: inbox.to_vec(),
                            after_index: 0,
                            auth: Some(auth),
                            include_request_inbox: true,
                        }),
                    )
                    .await;
                // The last-resort package is replaced once per run; the
                // one-time pool is topped up whenever claims ran it low.
                match self.top_up_key_packages(*relay, !published.contains(relay)).await {
                    Ok(n) => {
                        published.insert(*relay);
                        if n > 0 {
                            debug!(relay = %relay, n, "key packages published");
                        }
                    }
                    Err(e) => debug!(relay = %relay, "publishing key packages failed: {e}"),
                }
            }
            woken = tokio::select! {
                _ = tokio::time::sleep(self.inner.mailbox_poll) => false,
                _ = self.inner.mailbox_wake.notified() => true,
            };
        }
    }

    /// A key package from the device `peer` itself. `look_up`: whether the
    /// DHT may be asked for its address when none is known. A device with home
    /// relays is a DHT client, which no routing table holds, so a lookup (some
    /// twenty requests, most on fresh connections, four times over) could not
    /// find it; its relays hand out its key packages instead.
    async fn fetch_key_package(&self, peer: PeerId, look_up: bool) -> Result<Vec<u8>, NetError> {
        let request = pb::KeyPackageRequest {
            account_key: self.inner.account.as_bytes().to_vec(),
        };
        let net = &self.inner.net;
        let mut result = net.fetch_key_package(peer, request.clone()).await;
        // A request whose connection closed under it (two dials that crossed, one of the two
        // connections closed) fails as a whole: once more, on the connection that is left.
        if matches!(result, Err(NetError::Failed(_))) {
            result = net.fetch_key_package(peer, request.clone()).await;
        }
        // Not connected and no known address: ask the DHT, then try again. A
        // device that just started may not be in the DHT yet, so the lookup
        // and the request get four tries over about two and a half seconds.
        for wait in [0u64, 250, 750, 1500] {
            if !look_up || !matches!(result, Err(NetError::Unreachable(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if net.find_peer(peer).await.is_ok_and(|found| !found.is_empty()) {
                result = net.fetch_key_package(peer, request.clone()).await;
            }
        }
        let resp = result?;
        if resp.key_package.is_empty() {
            return Err(NetError::Failed("the device refused to hand out a key package".into()));
        }
        Ok(resp.key_package)
    }

    /// Commits fresh keys for this device in the conversation with `who`
    /// (post-compromise security). Returns the new epoch.
    pub async fn update_keys(&self, who: &str) -> Result<u64, NodeError> {
        let contact = self.find_contact(who)?.account;
        self.core(|reply| CoreInput::UpdateKeys { contact, reply }).await
    }

    /// The MLS epoch of the conversation with `who`, if there is one.
    /// The other devices (the contact's and our own) that the next message to
    /// a contact goes to, as hex device keys; empty before the first message.
    pub async fn conversation_devices(&self, who: &str) -> Result<Vec<String>, NodeError> {
        let contact = self.find_contact(who)?.account;
        let devices = self
            .core(|reply| CoreInput::ConversationDevices { contact, reply })
            .await?;
        Ok(devices.iter().map(hex::encode).collect())
    }

    pub async fn conversation_epoch(&self, who: &str) -> Result<Option<u64>, NodeError> {
        let contact = self.find_contact(who)?.account;
        self.core(|reply| CoreInput::Epoch { contact, reply }).await
    }

    /// The copy of a DHT record this node's own record store holds (what it
    /// would answer to others), if any.
    pub async fn local_dht_record(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, NodeError> {
        Ok(self.inner.net.local_record(key).await?)
    }

    /// A device without home relays connects to every known device of every
    /// contact, so that their outboxes, which hold its mail meanwhile, learn
    /// at once that it is back online: through the contact's relays, or, for
    /// a contact without relays, at the addresses the DHT has for the device
    /// (`core::reach_device`). A device with home relays does nothing here:
    /// its contacts left its mail on those relays, and it fetches it from
    /// them as it starts. Dialling every contact at every start would cost it
    /// two circuits per contact, and each contact a connection, for nothing.
    pub async fn reconnect_contacts(&self) {
        if !self.home_relays().is_empty() {
            return;
        }
        let Ok(contacts) = self.inner.store.list_contacts() else {
            return;
        };
        for c in contacts {
            for bytes in &c.devices {
                let Some(peer) = DeviceCertificate::from_bytes(bytes)
                    .ok()
                    .and_then(|d| peer_id_of(&d.device_key))
                else {
                    continue;
                };
                let net = self.inner.net.clone();
                let relays = c.relays.clone();
                tokio::spawn(async move {
                    let circuits = add_circuit_addresses(&net, peer, &relays).await;
                    crate::core::reach_device(&net, peer, circuits).await;
                });
            }
        }
    }

    /// Dials an address (for example a bootstrap node).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        Ok(self.inner.net.dial(addr).await?)
    }

    /// Whether this node has a connection to `peer` right now.
    pub async fn is_connected(&self, peer: PeerId) -> bool {
        self.inner.net.is_connected(peer).await
    }

    /// Remote addresses of this node's open connections to `peer`; a relayed
    /// connection's address contains `/p2p-circuit`.
    pub async fn connections(&self, peer: PeerId) -> Vec<Multiaddr> {
        self.inner.net.connections(peer).await
    }

    /// Looks a peer up in the DHT.
    pub async fn find_peer(&self, peer: PeerId) -> Result<Vec<Multiaddr>, NodeError> {
        Ok(self.inner.net.find_peer(peer).await?)
    }

    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let net = self.inner.net.status().await?;
        let peer = self.peer_id();
        Ok(NodeStatus {
            account: self.inner.account.to_base58(),
            name: self.name(),
            peer_id: net.peer_id,
            listen_addrs: net.listen_addrs.iter().map(|a| format!("{a}/p2p/{peer}")).collect(),
            connected_peers: net.connected_peers,
            dht_peers: net.dht_peers,
            hole_punches: net.hole_punches,
            outbox: self.inner.store.outbox_len()?,
            home_relays: self.home_relays(),
            mail_missing: self
                .inner
                .store
                .mail_gaps()?
                .iter()
                .map(MailGapView::from_gap)
                .collect(),
            deposit_refusals: {
                let map = self.inner.refusals.lock().unwrap_or_else(|p| p.into_inner());
                let mut v: Vec<RefusalView> = map.values().cloned().collect();
                v.sort_by(|a, b| (&a.contact, &a.relay).cmp(&(&b.contact, &b.relay)));
                v
            },
        })
    }
}

/// Tells the swarm that `peer` can be reached through a circuit on each of
/// `relays` (`…/p2p/<relay>`): `<relay>/p2p-circuit/p2p/<peer>`. Returns
/// those circuit addresses.
pub(crate) async fn add_circuit_addresses(net: &Network, peer: PeerId, relays: &[String]) -> Vec<Multiaddr> {
    use libp2p::multiaddr::Protocol;
    let mut circuits = Vec::new();
    for r in relays {
        let Ok(addr) = r.parse::<Multiaddr>() else { continue };
        let Some(Protocol::P2p(relay)) = addr.iter().last() else {
            continue;
        };
        if relay == peer {
            continue;
        }
        net.add_address(relay, addr.clone()).await;
        let circuit = addr.with(Protocol::P2pCircuit).with(Protocol::P2p(peer));
        net.add_address(peer, circuit.clone()).await;
        circuits.push(circuit);
    }
    circuits
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_routing_table_that_only_changed_order_counts_as_the_saved_one() {
        use super::same_peers;
        let peer = |n: u8, addr: u8| (vec![n; 38], vec![vec![addr; 8]]);
        let saved = vec![peer(1, 1), peer(2, 2), peer(3, 3)];
        assert!(same_peers(&[peer(3, 3), peer(1, 1), peer(2, 2)], &saved));
        assert!(!same_peers(&[peer(3, 3), peer(1, 1)], &saved), "one left");
        assert!(
            !same_peers(&[peer(3, 3), peer(1, 1), peer(4, 4)], &saved),
            "one replaced"
        );
        assert!(
            !same_peers(&[peer(3, 3), peer(1, 1), peer(2, 9)], &saved),
            "an address changed"
        );
    }

    #[test]
    fn data_directory_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        let store = super::open_store(&data).unwrap();
        drop(store);
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
