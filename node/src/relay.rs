//! Relay mode: the mailbox service, its configuration and its metrics.
//!
//! A relay is a node with more services: a DHT server and bootstrap peer,
//! a circuit relay v2 server, an AutoNAT server, and the store-and-forward
//! mailboxes of `/tidings/mailbox/1`. The [`MailboxService`] task owns the
//! relay's [`Mailboxes`] database. It acknowledges a deposit only after the
//! deposit's two-phase durable commit, with a signed custody receipt.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tidings_protocol::mailbox::{self as mb, MailboxError, Op};
use tidings_protocol::pb::{self, mailbox_request, mailbox_response};
use tidings_store::mailbox::{DepositRefusal, DepositRequest, Deposited, MailboxLimits, Mailboxes, StoredEnvelope};
use tokio::sync::mpsc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::net::{NetEvent, Network, RelayServerConfig};

/// Most envelopes one fetch returns.
const MAX_FETCH: usize = 512;
/// Longest a fetch may wait for something to be deposited (members of a group
/// long-poll its sequencing inbox: one signed fetch every five minutes while
/// idle). A held fetch costs the relay nothing while it waits, and each renewal
/// costs a signature check and a nonce commit; the connection's pings, not the
/// renewals, find a link that died under it.
pub const MAX_FETCH_WAIT_MS: u64 = 300_000;
/// Most fetches waiting at once, in all, and per peer.
const MAX_WAITING: usize = 50_000;
const MAX_WAITING_PER_PEER: usize = 256;
/// Most bytes one fetch returns (stays well under the mailbox frame cap).
const MAX_FETCH_BYTES: usize = 3 * 1024 * 1024;
/// Most mailbox requests folded into one pass (deposits in one transaction).
const MAX_BATCH: usize = 512;
/// Requests stop being folded into a pass once it holds this many deposits.
const MAX_PASS_DEPOSITS: usize = 1024;

/// Output format of the relay's logs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The relay's configuration file (TOML). Every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Where the relay keeps its identity and mailboxes.
    pub data_dir: PathBuf,
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Public multiaddrs to announce (when behind a port forward or on a known IP).
    pub external_addresses: Vec<String>,
    /// Other relays or bootstrap peers (`…/p2p/<peer id>`).
    pub bootstrap: Vec<String>,
    /// Address of the Prometheus `/metrics` endpoint, or `off`.
    pub metrics: String,
    pub log_format: LogFormat,
    /// Log filter (`info`, `tidings_node=debug`, …).
    pub log: String,
    /// Leading zero bits of proof of work required for a first-contact deposit.
    pub pow_bits: u32,
    /// Key packages one peer may claim per minute.
    pub key_package_claims_per_minute: u32,
    /// First-contact (request inbox) deposits one peer may make per minute.
    pub request_deposits_per_minute: u32,
    /// First-contact (request inbox) deposits all peers behind one IP address
    /// may make per minute.
    pub request_deposits_per_ip_per_minute: u32,
    /// Seconds between retention sweeps.
    pub sweep_interval_secs: u64,
    pub mailbox: MailboxLimits,
    pub circuits: RelayServerConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/tidings-relay"),
            listen: vec!["/ip4/0.0.0.0/tcp/4001".into(), "/ip4/0.0.0.0/udp/4001/quic-v1".into()],
            external_addresses: Vec::new(),
            bootstrap: Vec::new(),
            metrics: "127.0.0.1:9464".into(),
            log_format: LogFormat::Text,
            log: "info".into(),
            pow_bits: mb::DEFAULT_POW_BITS,
            key_package_claims_per_minute: 10,
            request_deposits_per_minute: 30,
            request_deposits_per_ip_per_minute: 120,
            sweep_interval_secs: 60,
            mailbox: MailboxLimits::default(),
            circuits: RelayServerConfig::default(),
        }
    }
}

impl RelayConfig {
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Where to serve `/metrics`, or None when switched off.
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigOverrideError> {
        if self.metrics == "off" {
            return Ok(None);
        }
        self.metrics.parse().map(Some).map_err(|_| {
            ConfigOverrideError::Invalid(format!("metrics: {:?} is not an address or `off`", self.metrics))
        })
    }

    /// Checks the settings that could otherwise break the relay at run time.
    pub fn validate(&self) -> Result<(), ConfigOverrideError> {
        let bad = |m: String| Err(ConfigOverrideError::Invalid(m));
        self.metrics_addr()?;
        for (what, list) in [
            ("listen", &self.listen),
            ("external_addresses", &self.external_addresses),
            ("bootstrap", &self.bootstrap),
        ] {
            for a in list {
                if a.parse::<libp2p::Multiaddr>().is_err() {
                    return bad(format!("{what}: {a:?} is not a multiaddr"));
                }
            }
        }
        if self.pow_bits > mb::DEFAULT_POW_BITS {
            return bad(format!(
                "pow_bits: clients solve {} bits; a higher setting would refuse every first contact",
                mb::DEFAULT_POW_BITS
            ));
        }
        // Nonces must be remembered for the whole ±60 s window of owner auth.
        if self.mailbox.nonce_window_ms < 120_000 {
            return bad("mailbox.nonce_window_ms: must be at least 120000 (the ±60 s auth window)".into());
        }
        // A fetch or push of one envelope must fit a frame with room to spare.
        if self.mailbox.max_envelope_bytes > MAX_ENVELOPE_LIMIT {
            return bad(format!("mailbox.max_envelope_bytes: at most {MAX_ENVELOPE_LIMIT}"));
        }
        Ok(())
    }

    /// Applies `key=value` overrides, where `key` is a dotted path into the
    /// file (`mailbox.retention_secs`, `pow_bits`) and `value` is a TOML value
    /// (a bare word that is not valid TOML is taken as a string).
    pub fn with_overrides<'a>(
        self,
        overrides: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigOverrideError> {
        let mut root = toml::Table::try_from(&self).map_err(|e| ConfigOverrideError::Invalid(e.to_string()))?;
        for (key, raw) in overrides {
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let mut parts = key.split('.').peekable();
            let mut table = &mut root;
            while let Some(part) = parts.next() {
                if parts.peek().is_none() {
                    table.insert(part.to_string(), value.clone());
                    break;
                }
                table = match table
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                {
                    toml::Value::Table(t) => t,
                    _ => return Err(ConfigOverrideError::NotATable(key.to_string())),
                };
            }
        }
        root.try_into()
            .map_err(|e: toml::de::Error| ConfigOverrideError::Invalid(e.to_string()))
    }
}

/// Most subscriptions a relay keeps (an owner's normal and request inbox count
/// one each).
const MAX_SUBSCRIPTIONS: usize = 200_000;

/// How often a push that failed over a connection that is still open is
/// tried again, and the pause before each try.
const PUSH_RETRIES: u32 = 2;
const PUSH_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Most envelope bytes in one push to a subscribed owner.
const PUSH_MAX_BYTES: usize = tidings_protocol::limits::MAX_DELIVER_FRAME / 2;

/// Largest `mailbox.max_envelope_bytes` a relay accepts (a quarter of a frame).
pub const MAX_ENVELOPE_LIMIT: usize = tidings_protocol::limits::MAX_MAILBOX_FRAME / 4;

/// Why a configuration override was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigOverrideError {
    #[error("{0:?} is not a section of the configuration")]
    NotATable(String),
    #[error("{0}")]
    Invalid(String),
}

/// The relay's own Prometheus metrics (libp2p's are registered beside them).
#[derive(Debug, Default)]
pub struct RelayMetrics {
    pub deposits: Family<Vec<(String, String)>, Counter>,
    pub requests: Family<Vec<(String, String)>, Counter>,
    pub refusals: Family<Vec<(String, String)>, Counter>,
    pub pushed: Counter,
    pub swept: Counter,
    pub inboxes: Gauge<i64, AtomicI64>,
    pub envelopes: Gauge<i64, AtomicI64>,
    pub bytes: Gauge<i64, AtomicI64>,
}

impl RelayMetrics {
    /// Registers the metrics under the `tidings_relay` prefix.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Arc::new(Self::default());
        let r = registry.sub_registry_with_prefix("tidings_relay");
        r.register("deposits", "Deposits by result", m.deposits.clone());
        r.register("requests", "Mailbox requests by operation", m.requests.clone());
        r.register(
            "refusals",
            "Refused mailbox requests by operation and reason",
            m.refusals.clone(),
        );
        r.register(
            "pushed_envelopes",
            "Envelopes pushed to subscribed owners",
            m.pushed.clone(),
        );
        r.register(
            "swept_envelopes",
            "Envelopes removed by the retention sweep",
            m.swept.clone(),
        );
        r.register("inboxes", "Inboxes holding envelopes", m.inboxes.clone());
        r.register("envelopes", "Envelopes stored", m.envelopes.clone());
        r.register("stored_bytes", "Bytes of envelopes stored", m.bytes.clone());
        m
    }

    fn refuse(&self, op: &str, e: MailboxError) {
        self.refusals
            .get_or_create(&vec![("op".into(), op.into()), ("reason".into(), e.code().into())])
            .inc();
    }
}

/// What a relay node runs besides the node itself.
#[derive(Clone)]
pub struct RelayOptions {
    pub mailboxes: Arc<Mailboxes>,
    pub pow_bits: u32,
    pub key_package_claims_per_minute: u32,
    pub request_deposits_per_minute: u32,
    pub request_deposits_per_ip_per_minute: u32,
    pub sweep_interval: Duration,
    pub metrics: Arc<RelayMetrics>,
}

impl std::fmt::Debug for RelayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayOptions")
            .field("pow_bits", &self.pow_bits)
            .finish_non_exhaustive()
    }
}

/// Which of an owner's inboxes a subscription pushes: the normal inbox
/// (`false`) or the request inbox (`true`).
type SubKey = ([u8; 32], bool);

struct Subscription {
    peer: PeerId,
    cursor: u64,
    in_flight: bool,
}

struct PushDone {
    sub: SubKey,
    peer: PeerId,
    /// Highest index the owner acknowledged, if any; None if the push failed.
    acked: Option<u64>,
    attempted_up_to: u64,
}

/// The task that answers `/tidings/mailbox/1` on a relay.
///
/// Deposits go through three stages. The service task checks each one (size,
/// envelope, capability or proof of work, rate limits); capabilities it has
/// not seen verify on blocking threads, in parallel, and the verified ones are
/// remembered ([`CapabilityCache`]). Checked deposits are staged, and handed
/// to a commit task as soon as no commit runs: one durable redb commit of
/// everything staged, then receipts signed (in parallel on blocking threads
/// when there are many), then the answers. So while a commit runs, the
/// service checks and stages what arrives, and the next commit may run while
/// the previous one's receipts are signed. Commits never overlap, and at most
/// [`ANSWERING_PASSES`] passes are between commit and answer.
pub struct MailboxService {
    opts: RelayOptions,
    net: Network,
    /// This relay's peer id as bytes: what owners' requests must name (owner auth).
    own_id: Vec<u8>,
    clock: Clock,
    signer: Arc<mb::ReceiptSigner>,
    /// How many blocking threads verify or sign at once.
    parallel: usize,
    caps: CapabilityCache,
    /// Nonces of owner requests that came over the owner's own connection.
    own_nonces: OwnConnectionNonces,
    /// Reports when the running commit is durable, with the inboxes (normal
    /// or request) that received envelopes; None when no commit is running.
    commit: Option<oneshot::Receiver<Vec<SubKey>>>,
    /// One permit per pass between the start of its commit and its answers.
    answering: Arc<Semaphore>,
    /// Checked deposits waiting for the next commit (gathered while the
    /// current one runs).
    staged: Staged,
    /// An owner's subscription holds one entry for its normal inbox and, if
    /// it asked, one for its request inbox.
    subs: HashMap<SubKey, Subscription>,
    /// Fetches that found nothing and wait for a deposit, by inbox.
    waiting: HashMap<[u8; 32], Vec<WaitingFetch>>,
    /// No held fetch's deadline falls before this (clock ms); `None` while none is held.
    next_expiry: Option<u64>,
    waiting_per_peer: HashMap<PeerId, usize>,
    waiting_total: usize,
    claim_budget: HashMap<PeerId, (Instant, u32)>,
    request_budget: HashMap<PeerId, (Instant, u32)>,
    request_budget_ip: HashMap<IpAddr, (Instant, u32)>,
    push_tx: mpsc::Sender<PushDone>,
    push_rx: mpsc::Receiver<PushDone>,
}

/// A fetch held until something is deposited or its deadline passes.
struct WaitingFetch {
    id: u64,
    peer: PeerId,
    request_inbox: bool,
    after: u64,
    limit: usize,
    deadline: u64,
}

struct Pending {
    id: u64,
    peer: PeerId,
    ip: Option<IpAddr>,
    request: pb::MailboxRequest,
}

/// The peer id of the device whose Ed25519 key is `key` (32 bytes): libp2p
/// inlines such a key in its peer id (the identity multihash of the key's
/// protobuf encoding), so no point is decompressed to compare the two.
/// (`core::peer_id_of` gives the same id, and also checks that the key is a
/// point, which [`mb::verify_auth`] has done by the time this is asked.)
fn owner_peer(key: &[u8]) -> Option<PeerId> {
    let key: &[u8; 32] = key.try_into().ok()?;
    // libp2p's `PublicKey` protobuf: field 1 (type) = 1 (Ed25519), field 2 (data) = 32 bytes.
    let mut encoded = [0u8; 36];
    encoded[..4].copy_from_slice(&[0x08, 0x01, 0x12, 0x20]);
    encoded[4..].copy_from_slice(key);
    let hash = libp2p::multihash::Multihash::<64>::wrap(0x00, &encoded).ok()?;
    PeerId::from_multihash(hash).ok()
}

/// Most nonces [`OwnConnectionNonces`] holds; past it, requests' nonces are
/// recorded durably again.
const OWN_NONCES_MAX: usize = 1 << 20;

/// Nonces of owner requests that came over a connection from the owner's
/// own key, each until its window ends. Only the owner can send over such a
/// connection (the transport authenticates its key and encrypts what it
/// carries), so no one else could have captured the request to replay it:
/// these nonces need not survive a restart, and are kept in memory rather
/// than committed one by one. A copy of such a request arriving from anyone
/// else while the relay runs is still refused as replayed.
#[derive(Default)]
struct OwnConnectionNonces {
    until: HashMap<[u8; 16], u64>,
    /// (end of window, nonce) in the order the nonces came.
    order: VecDeque<(u64, [u8; 16])>,
}

impl OwnConnectionNonces {
    fn seen(&self, nonce: &[u8; 16], now: u64) -> bool {
        self.until.get(nonce).is_some_and(|until| *until > now)
    }

    /// Keeps `nonce` until `until`; false if there is no room.
    fn insert(&mut self, nonce: [u8; 16], until: u64, now: u64) -> bool {
        while let Some(&(end, n)) = self.order.front() {
            if end > now {
                break;
            }
            self.order.pop_front();
            if self.until.get(&n) == Some(&end) {
                self.until.remove(&n);
            }
        }
        if self.order.len() >= OWN_NONCES_MAX {
            return false;
        }
        self.until.insert(nonce, until);
        self.order.push_back((until, nonce));
        true
    }
}

/// Most verified capabilities a relay remembers.
pub const CAPABILITY_CACHE_MAX: usize = 65_536;
/// Most passes between the start of their commit and their answers.
const ANSWERING_PASSES: usize = 2;
/// Passes with fewer receipts than this sign them in the commit task itself.
const INLINE_SIGNATURES: usize = 8;
/// Smallest share of work worth a blocking thread of its own.
const MIN_CHUNK: usize = 4;

/// What a verified capability grants: its inbox, until `expires_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grant {
    inbox: [u8; 32],
    expires_ms: u64,
}

impl Grant {
    /// The same answer [`mb::verify_capability`] gives for this capability.
    fn allows(self, inbox: &[u8; 32], now: u64) -> Result<(), MailboxError> {
        if self.inbox != *inbox {
            return Err(MailboxError::Unauthorized);
        }
        if now > self.expires_ms {
            return Err(MailboxError::Expired);
        }
        Ok(())
    }
}

/// Capabilities whose owner signature verified, by a hash of their exact
/// bytes. A sender reuses one capability for every deposit, so the signature
/// is checked once; each use still checks the inbox and the expiry
/// ([`Grant::allows`]). Two generations of at most half of
/// [`CAPABILITY_CACHE_MAX`] each: when the newer fills, the older is dropped
/// and a hit in the older one moves to the newer.
#[derive(Default)]
struct CapabilityCache {
    current: HashMap<[u8; 32], Grant>,
    previous: HashMap<[u8; 32], Grant>,
}

impl CapabilityCache {
    /// SHA-256 over the capability's body (length-prefixed) and signature.
    fn key(cap: &pb::Capability) -> [u8; 32] {
        Sha256::new()
            .chain_update(b"tidings/relay-cap-cache/v1")
            .chain_update((cap.body.len() as u64).to_be_bytes())
            .chain_update(&cap.body)
            .chain_update(&cap.signature)
            .finalize()
            .into()
    }

    fn get(&mut self, key: &[u8; 32]) -> Option<Grant> {
        if let Some(g) = self.current.get(key) {
            return Some(*g);
        }
        let g = self.previous.remove(key)?;
        self.insert(*key, g);
        Some(g)
    }

    fn insert(&mut self, key: [u8; 32], grant: Grant) {
        if self.current.len() >= CAPABILITY_CACHE_MAX / 2 {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, grant);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// [`crate::sim::off_thread`], failing as `Unavailable`.
async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, MailboxError> {
    crate::sim::off_thread(f).await.ok_or(MailboxError::Unavailable)
}

/// Runs `f` over `items` on up to `parallel` blocking threads at once, in
/// contiguous chunks of at least [`MIN_CHUNK`]; the results keep the order.
async fn parallel_map<T, R, F>(items: Vec<T>, parallel: usize, f: F) -> Result<Vec<R>, MailboxError>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> R + Send + Sync + 'static,
{
    let n = items.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    if crate::sim::inline_blocking() {
        return Ok(items.into_iter().map(f).collect());
    }
    let chunks = parallel.clamp(1, n.div_ceil(MIN_CHUNK));
    let per = n.div_ceil(chunks);
    let f = Arc::new(f);
    let mut handles = Vec::with_capacity(chunks);
    let mut rest = items.into_iter();
    loop {
        let chunk: Vec<T> = rest.by_ref().take(per).collect();
        if chunk.is_empty() {
            break;
        }
        let f = f.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            chunk.into_iter().map(|t| f(t)).collect::<Vec<R>>()
        }));
    }
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.extend(h.await.map_err(|_| MailboxError::Unavailable)?);
    }
    Ok(out)
}

/// One deposit after the service's checks.
enum Checked {
    /// Passed every check; goes to the commit.
    Ready(DepositRequest),
    /// Passed the other checks; waits for the signature check of the
    /// capability with this cache key.
    NeedsCapability(DepositRequest, [u8; 32]),
}

/// A deposit request (single or batch) on its way to an answer.
struct DepositCall {
    id: u64,
    peer: PeerId,
    /// A [`pb::DepositBatch`] (answered with [`pb::DepositResults`]).
    batch: bool,
    items: Vec<Result<Checked, MailboxError>>,
}

/// Where one item of a call stands once its checks are done.
enum Slot {
    Refused(MailboxError),
    /// Its position in the pass's commit.
    Commit(usize),
}

/// Checked deposits for the next commit, and the calls they answer.
#[derive(Default)]
struct Staged {
    calls: Vec<CommitCall>,
    reqs: Vec<DepositRequest>,
}

/// What a commit task answers.
struct CommitCall {
    id: u64,
    batch: bool,
    slots: Vec<Slot>,
}

/// What a commit task needs from the service.
#[derive(Clone)]
struct CommitContext {
    mailboxes: Arc<Mailboxes>,
    net: Network,
    metrics: Arc<RelayMetrics>,
    signer: Arc<mb::ReceiptSigner>,
    parallel: usize,
}

fn respond_err(e: MailboxError, detail: impl Into<String>) -> pb::MailboxResponse {
    pb::MailboxResponse {
        status: e.status() as i32,
        detail: detail.into(),
        result: None,
    }
}

/// A fetch answer from stored envelopes in index order, cut at
/// [`MAX_FETCH_BYTES`] (then `more` is set).
fn fetch_result(envs: impl Iterator<Item = StoredEnvelope>) -> pb::FetchResult {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    for e in envs {
        bytes += e.envelope.len() + 16;
        if bytes > MAX_FETCH_BYTES && !out.is_empty() {
            more = true;
            break;
        }
        out.push(pb::StoredEnvelope {
            index: e.index,
            envelope: e.envelope,
            deposited_ms: e.deposited_ms,
        });
    }
    pb::FetchResult { envelopes: out, more }
}

fn respond_ok(result: mailbox_response::Result) -> pb::MailboxResponse {
    pb::MailboxResponse {
        status: pb::MailboxStatus::Ok as i32,
        detail: String::new(),
        result: Some(result),
    }
}

/// The answer to a deposit request, from each item's receipt or refusal.
fn deposit_answer(batch: bool, mut items: Vec<Result<pb::CustodyReceipt, MailboxError>>) -> pb::MailboxResponse {
    if !batch {
        return match items.pop() {
            Some(Ok(receipt)) => respond_ok(mailbox_response::Result::Receipt(receipt)),
            Some(Err(MailboxError::Unavailable)) => respond_err(MailboxError::Unavailable, "cannot commit"),
            Some(Err(e)) => respond_err(e, ""),
            None => respond_err(MailboxError::BadRequest, ""),
        };
    }
    let results = items
        .into_iter()
        .map(|item| match item {
            Ok(receipt) => pb::DepositResult {
                status: pb::MailboxStatus::Ok as i32,
                receipt: Some(receipt),
            },
            Err(e) => pb::DepositResult {
                status: e.status() as i32,
                receipt: None,
            },
        })
        .collect();
    respond_ok(mailbox_response::Result::DepositResults(pb::DepositResults { results }))
}

/// A depositor's identity for per-sender quotas.
fn sender_key(peer: &PeerId) -> [u8; 32] {
    Sha256::digest(peer.to_bytes()).into()
}

fn inbox32(bytes: &[u8]) -> Result<[u8; 32], MailboxError> {
    bytes.try_into().map_err(|_| MailboxError::BadRequest)
}

/// Counts one use of `key`'s per-minute budget; false once it is spent.
fn allow<K: Eq + Hash>(budget: &mut HashMap<K, (Instant, u32)>, key: K, per_minute: u32) -> bool {
    let now = Instant::now();
    if budget.len() > 100_000 {
        budget.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
    }
    let e = budget.entry(key).or_insert((now, 0));
    if now.duration_since(e.0) >= Duration::from_secs(60) {
        *e = (now, 0);
    }
    e.1 += 1;
    e.1 <= per_minute
}

/// Deposits a request carries (for sizing a pass; a refused batch counts 1).
fn deposits_in(ev: &NetEvent) -> usize {
    match ev {
        NetEvent::Mailbox { request, .. } => match &request.op {
            Some(mailbox_request::Op::DepositBatch(b)) => b.deposits.len().clamp(1, mb::MAX_DEPOSITS_PER_BATCH),
            _ => 1,
        },
        _ => 0,
    }
}

/// Waits until the running commit is durable; never returns if none runs.
async fn commit_finished(
    commit: &mut Option<oneshot::Receiver<Vec<SubKey>>>,
) -> Result<Vec<SubKey>, oneshot::error::RecvError> {
    match commit {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}

impl MailboxService {
    pub fn new(opts: RelayOptions, net: Network, clock: Clock, relay_seed: [u8; 32]) -> Self {
        let (push_tx, push_rx) = mpsc::channel(1024);
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        Self {
            opts,
            own_id: net.peer_id().to_bytes(),
            own_nonces: OwnConnectionNonces::default(),
            net,
            clock,
            signer: Arc::new(mb::ReceiptSigner::new(&relay_seed)),
            parallel,
            caps: CapabilityCache::default(),
            commit: None,
            answering: Arc::new(Semaphore::new(ANSWERING_PASSES)),
            staged: Staged::default(),
            subs: HashMap::new(),
            waiting: HashMap::new(),
            next_expiry: None,
            waiting_per_peer: HashMap::new(),
            waiting_total: 0,
            claim_budget: HashMap::new(),
            request_budget: HashMap::new(),
            request_budget_ip: HashMap::new(),
            push_tx,
            push_rx,
        }
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<NetEvent>) {
        let mut sweep = tokio::time::interval(self.opts.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Held fetches are answered at their deadlines: one timer, set to the earliest.
        let expiry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(expiry);
        let mut armed: Option<u64> = None;
        self.update_gauges().await;
        loop {
            if armed != self.next_expiry {
                armed = self.next_expiry;
                if let Some(at) = armed {
                    let wait = Duration::from_millis(at.saturating_sub(self.clock.now_ms()));
                    expiry.as_mut().reset(tokio::time::Instant::now() + wait);
                }
            }
            tokio::select! {
                // Read no more while a full pass waits for the running commit.
                ev = rx.recv(), if self.staged.reqs.len() < MAX_PASS_DEPOSITS => {
                    let Some(first) = ev else { break };
                    let mut batch = Vec::new();
                    let mut deposits = self.staged.reqs.len();
                    let mut next = Some(first);
                    while let Some(ev) = next {
                        deposits += deposits_in(&ev);
                        if let NetEvent::Mailbox { id, peer, ip, request } = ev {
                            batch.push(Pending { id, peer, ip, request });
                        }
                        next = if batch.len() < MAX_BATCH && deposits < MAX_PASS_DEPOSITS {
                            rx.try_recv().ok()
                        } else {
                            None
                        };
                    }
                    self.on_batch(batch).await;
                }
                done = commit_finished(&mut self.commit) => {
                    self.commit = None;
                    self.after_commit(done);
                }
                Some(done) = self.push_rx.recv() => self.on_push_done(done).await,
                _ = sweep.tick() => self.sweep().await,
                _ = &mut expiry, if armed.is_some() => {
                    armed = None;
                    self.expire_waiting();
                }
            }
            self.start_commit().await;
        }
        // Commit what was checked and let it be answered before stopping
        // (answers are sent by the commit tasks).
        loop {
            if let Some(rx) = self.commit.take() {
                let done = rx.await;
                self.after_commit(done);
            }
            if self.staged.reqs.is_empty() {
                break;
            }
            self.start_commit().await;
        }
        debug!("mailbox service stopped");
    }

    /// Hands everything staged to a commit task, unless a commit runs.
    async fn start_commit(&mut self) {
        if self.commit.is_some() || self.staged.reqs.is_empty() {
            return;
        }
        // Room among the passes still signing and answering.
        let permit = match self.answering.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => {
                // The semaphore is never closed; answer rather than drop.
                warn!("deposit pass refused: no commit slot");
                let Staged { calls, .. } = std::mem::take(&mut self.staged);
                for call in calls {
                    let items = call.slots.iter().map(|s| match s {
                        Slot::Refused(e) => Err(*e),
                        Slot::Commit(_) => Err(MailboxError::Unavailable),
                    });
                    self.net
                        .respond_mailbox(call.id, deposit_answer(call.batch, items.collect()))
                        .await;
                }
                return;
            }
        };
        let Staged { calls, reqs } = std::mem::take(&mut self.staged);
        let (committed_tx, committed_rx) = oneshot::channel();
        let ctx = CommitContext {
            mailboxes: self.opts.mailboxes.clone(),
            net: self.net.clone(),
            metrics: self.opts.metrics.clone(),
            signer: self.signer.clone(),
            parallel: self.parallel,
        };
        let now = self.clock.now_ms();
        self.commit = Some(committed_rx);
        tokio::spawn(commit_deposits(ctx, calls, reqs, now, committed_tx, permit));
    }

    fn after_commit(&mut self, done: Result<Vec<SubKey>, oneshot::error::RecvError>) {
        match done {
            Ok(touched) => {
                for sub in touched {
                    self.push(sub);
                    self.wake(sub);
                }
            }
            Err(_) => warn!("a deposit commit task ended without reporting"),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Mailboxes) -> T + Send + 'static,
    ) -> Result<T, MailboxError> {
        let m = self.opts.mailboxes.clone();
        off_thread(move || f(&m)).await
    }

    async fn update_gauges(&self) {
        if let Ok(Ok(s)) = self.blocking(|m| m.stats()).await {
            self.opts.metrics.inboxes.set(s.inboxes as i64);
            self.opts.metrics.envelopes.set(s.envelopes as i64);
            self.opts.metrics.bytes.set(s.bytes as i64);
        }
    }

    async fn sweep(&mut self) {
        let now = self.clock.now_ms();
        // Each call does bounded work; keep going while a call comes back full.
        let mut removed = 0;
        loop {
            match self.blocking(move |m| m.sweep(now)).await {
                Ok(Ok(n)) => {
                    removed += n;
                    self.opts.metrics.swept.inc_by(n);
                    if n < tidings_store::mailbox::SWEEP_MAX_ENVELOPES as u64 {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    warn!("retention sweep failed: {e}");
                    break;
                }
                Err(e) => {
                    warn!("retention sweep failed: {e}");
                    break;
                }
            }
        }
        if removed > 0 {
            info!(removed, "retention sweep");
        }
        self.update_gauges().await;
    }

    async fn on_batch(&mut self, batch: Vec<Pending>) {
        let now = self.clock.now_ms();
        let mut calls: Vec<DepositCall> = Vec::new();
        // Capabilities to verify in this pass, by cache key (each once).
        let mut uncached: HashMap<[u8; 32], pb::Capability> = HashMap::new();
        for mut p in batch {
            let op = match &p.request.op {
                Some(mailbox_request::Op::Deposit(_)) => "deposit",
                Some(mailbox_request::Op::DepositBatch(_)) => "deposit_batch",
                Some(mailbox_request::Op::Fetch(_)) => "fetch",
                Some(mailbox_request::Op::Ack(_)) => "ack",
                Some(mailbox_request::Op::Subscribe(_)) => "subscribe",
                Some(mailbox_request::Op::ClaimKeyPackage(_)) => "claim_key_package",
                Some(mailbox_request::Op::PublishKeyPackages(_)) => "publish_key_packages",
                None => "none",
            };
            self.opts
                .metrics
                .requests
                .get_or_create(&vec![("op".into(), op.into())])
                .inc();
            let result = match p.request.op.take() {
                Some(mailbox_request::Op::Deposit(d)) => {
                    let sender = sender_key(&p.peer);
                    let item = self.check_deposit(&sender, &p.peer, p.ip, d, now, &mut uncached);
                    if let Err(e) = item {
                        // Refused before any work: answer at once.
                        self.refuse_item(&p.peer, e);
                        self.net
                            .respond_mailbox(p.id, deposit_answer(false, vec![Err(e)]))
                            .await;
                        continue;
                    }
                    calls.push(DepositCall {
                        id: p.id,
                        peer: p.peer,
                        batch: false,
                        items: vec![item],
                    });
                    continue;
                }
                Some(mailbox_request::Op::DepositBatch(b))
                    if !b.deposits.is_empty() && b.deposits.len() <= mb::MAX_DEPOSITS_PER_BATCH =>
                {
                    let sender = sender_key(&p.peer);
                    let items = b
                        .deposits
                        .into_iter()
                        .map(|d| self.check_deposit(&sender, &p.peer, p.ip, d, now, &mut uncached))
                        .collect();
                    calls.push(DepositCall {
                        id: p.id,
                        peer: p.peer,
                        batch: true,
                        items,
                    });
                    continue;
                }
                // Empty, or more than a batch may hold: refused whole.
                Some(mailbox_request::Op::DepositBatch(_)) => Err(MailboxError::BadRequest),
                Some(mailbox_request::Op::Fetch(f)) => match self.fetch(&p.peer, &f, now).await {
                    // Nothing yet, and the fetcher will wait: answered later.
                    Ok(mailbox_response::Result::Fetched(r))
                        if r.envelopes.is_empty() && f.wait_ms > 0 && self.hold(&p, &f, now) =>
                    {
                        continue;
                    }
                    r => r,
                },
                Some(mailbox_request::Op::Ack(a)) => self.ack(&p.peer, &a, now).await,
                Some(mailbox_request::Op::Subscribe(s)) => self.subscribe(p.peer, &s, now).await,
                Some(mailbox_request::Op::ClaimKeyPackage(c)) => self.claim(p.peer, &c).await,
                Some(mailbox_request::Op::PublishKeyPackages(k)) => self.publish(&p.peer, &k, now).await,
                None => Err(MailboxError::BadRequest),
            };
            let response = match result {
                Ok(r) => respond_ok(r),
                Err(e) => {
                    self.opts.metrics.refuse(op, e);
                    debug!(peer = %p.peer, op, "refused: {e}");
                    respond_err(e, "")
                }
            };
            self.net.respond_mailbox(p.id, response).await;
        }
        if !calls.is_empty() {
            self.finish_deposits(calls, uncached, now).await;
        }
    }

    fn refuse_item(&self, peer: &PeerId, e: MailboxError) {
        self.opts.metrics.refuse("deposit", e);
        debug!(%peer, op = "deposit", "refused: {e}");
    }

    /// The checks of one deposit that need no signature verification. A
    /// capability seen before is settled from the cache; one not seen before
    /// is added to `uncached` and settled in [`Self::finish_deposits`].
    fn check_deposit(
        &mut self,
        sender: &[u8; 32],
        peer: &PeerId,
        ip: Option<IpAddr>,
        d: pb::Deposit,
        now: u64,
        uncached: &mut HashMap<[u8; 32], pb::Capability>,
    ) -> Result<Checked, MailboxError> {
        let inbox = inbox32(&d.inbox_id)?;
        if d.envelope.len() > self.opts.mailboxes.limits().max_envelope_bytes {
            return Err(MailboxError::TooLarge);
        }
        if pb::Envelope::decode(d.envelope.as_slice()).is_err() {
            return Err(MailboxError::BadRequest);
        }
        if d.request_inbox {
            if !allow(&mut self.request_budget, *peer, self.opts.request_deposits_per_minute) {
                return Err(MailboxError::RateLimited);
            }
            if let Some(ip) = ip
                && !allow(
                    &mut self.request_budget_ip,
                    ip,
                    self.opts.request_deposits_per_ip_per_minute,
                )
            {
                return Err(MailboxError::RateLimited);
            }
            if !mb::pow_ok(&inbox, &d.envelope, &d.pow_nonce, self.opts.pow_bits) {
                return Err(MailboxError::InsufficientWork);
            }
        }
        let req = DepositRequest {
            inbox,
            request_inbox: d.request_inbox,
            sender: *sender,
            envelope: d.envelope,
        };
        if d.request_inbox {
            return Ok(Checked::Ready(req));
        }
        let cap = d.capability.ok_or(MailboxError::Unauthorized)?;
        let key = CapabilityCache::key(&cap);
        match self.caps.get(&key) {
            Some(grant) => {
                grant.allows(&inbox, now)?;
                Ok(Checked::Ready(req))
            }
            None => {
                uncached.entry(key).or_insert(cap);
                Ok(Checked::NeedsCapability(req, key))
            }
        }
    }

    /// Verifies the pass's new capabilities in parallel, answers the calls
    /// that have nothing left to commit, and stages the rest.
    async fn finish_deposits(
        &mut self,
        calls: Vec<DepositCall>,
        uncached: HashMap<[u8; 32], pb::Capability>,
        now: u64,
    ) {
        let verified: HashMap<[u8; 32], Result<Grant, MailboxError>> =
            match parallel_map(uncached.into_iter().collect(), self.parallel, |(key, cap)| {
                let grant = mb::verify_capability_signature(&cap).map(|(inbox, info)| Grant {
                    inbox,
                    expires_ms: info.expires_ms,
                });
                (key, grant)
            })
            .await
            {
                Ok(v) => v.into_iter().collect(),
                Err(e) => {
                    warn!("capability verification failed: {e}");
                    HashMap::new()
                }
            };
        for (key, grant) in &verified {
            if let Ok(g) = grant
                && now <= g.expires_ms
            {
                self.caps.insert(*key, *g);
            }
        }

        for call in calls {
            let mut slots = Vec::with_capacity(call.items.len());
            for item in call.items {
                let settled = match item {
                    Ok(Checked::Ready(req)) => Ok(req),
                    Ok(Checked::NeedsCapability(req, key)) => match verified.get(&key) {
                        Some(Ok(grant)) => grant.allows(&req.inbox, now).map(|()| req),
                        Some(Err(e)) => Err(*e),
                        None => Err(MailboxError::Unavailable),
                    },
                    Err(e) => Err(e),
                };
                slots.push(match settled {
                    Ok(req) => {
                        self.staged.reqs.push(req);
                        Slot::Commit(self.staged.reqs.len() - 1)
                    }
                    Err(e) => {
                        self.refuse_item(&call.peer, e);
                        Slot::Refused(e)
                    }
                });
            }
            if slots.iter().any(|s| matches!(s, Slot::Commit(_))) {
                self.staged.calls.push(CommitCall {
                    id: call.id,
                    batch: call.batch,
                    slots,
                });
            } else {
                let items = slots
                    .into_iter()
                    .map(|s| match s {
                        Slot::Refused(e) => Err(e),
                        Slot::Commit(_) => Err(MailboxError::Unavailable),
                    })
                    .collect();
                self.net
                    .respond_mailbox(call.id, deposit_answer(call.batch, items))
                    .await;
            }
        }
    }

    /// Checks an owner's request (`PROTOCOL.md`, "Owner authentication").
    /// A request that came over a connection from the owner's own key
    /// (`peer`) has its nonce kept in memory ([`OwnConnectionNonces`]);
    /// any other has it recorded durably before the answer.
    async fn owner_check(
        &mut self,
        peer: &PeerId,
        auth: Option<&pb::OwnerAuth>,
        op: Op,
        inbox: &[u8; 32],
        arg: u64,
        now: u64,
    ) -> Result<(), MailboxError> {
        let auth = auth.ok_or(MailboxError::Unauthorized)?;
        let nonce = mb::verify_auth(auth, op, &self.own_id, inbox, arg, now)?;
        if self.own_nonces.seen(&nonce, now) {
            return Err(MailboxError::Replayed);
        }
        if owner_peer(&auth.owner_key) == Some(*peer) {
            let until = now.saturating_add(self.opts.mailboxes.limits().nonce_window_ms);
            if self.own_nonces.insert(nonce, until, now) {
                return Ok(());
            }
        }
        match self.blocking(move |m| m.check_nonce(&nonce, now)).await? {
            Ok(true) => Ok(()),
            Ok(false) => Err(MailboxError::Replayed),
            Err(_) => Err(MailboxError::Unavailable),
        }
    }

    async fn fetch(
        &mut self,
        peer: &PeerId,
        f: &pb::Fetch,
        now: u64,
    ) -> Result<mailbox_response::Result, MailboxError> {
        let inbox = inbox32(&f.inbox_id)?;
        self.owner_check(peer, f.auth.as_ref(), Op::Fetch, &inbox, f.after_index, now)
            .await?;
        let (request_inbox, after) = (f.request_inbox, f.after_index);
        let limit = (f.limit as usize).clamp(1, MAX_FETCH);
        let (envs, more) = self
            .blocking(move |m| m.fetch(&inbox, request_inbox, after, limit, now))
            .await?
            .map_err(|_| MailboxError::Unavailable)?;
        let mut result = fetch_result(envs.into_iter());
        result.more |= more;
        Ok(mailbox_response::Result::Fetched(result))
    }

    /// Keeps an empty fetch that asked to wait, within the limits; false if
    /// it must be answered now.
    fn hold(&mut self, p: &Pending, f: &pb::Fetch, now: u64) -> bool {
        let Ok(inbox) = inbox32(&f.inbox_id) else { return false };
        let held = self.waiting_per_peer.get(&p.peer).copied().unwrap_or(0);
        if held >= MAX_WAITING_PER_PEER || self.waiting_total >= MAX_WAITING {
            return false;
        }
        *self.waiting_per_peer.entry(p.peer).or_insert(0) += 1;
        self.waiting_total += 1;
        let deadline = now + u64::from(f.wait_ms).min(MAX_FETCH_WAIT_MS);
        self.next_expiry = Some(self.next_expiry.map_or(deadline, |e| e.min(deadline)));
        self.waiting.entry(inbox).or_default().push(WaitingFetch {
            id: p.id,
            peer: p.peer,
            request_inbox: f.request_inbox,
            after: f.after_index,
            limit: (f.limit as usize).clamp(1, MAX_FETCH),
            deadline,
        });
        true
    }

    fn release(&mut self, held: &[WaitingFetch]) {
        self.waiting_total = self.waiting_total.saturating_sub(held.len());
        for w in held {
            if let Some(n) = self.waiting_per_peer.get_mut(&w.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.waiting_per_peer.remove(&w.peer);
                }
            }
        }
    }

    /// Answers the fetches waiting on inbox `key` with what was just deposited.
    fn wake(&mut self, key: SubKey) {
        let (inbox, request_inbox) = key;
        let Some(all) = self.waiting.remove(&inbox) else {
            return;
        };
        let (held, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|w| w.request_inbox == request_inbox);
        if !rest.is_empty() {
            self.waiting.insert(inbox, rest);
        }
        if held.is_empty() {
            return;
        }
        self.release(&held);
        let m = self.opts.mailboxes.clone();
        let net = self.net.clone();
        let now = self.clock.now_ms();
        // One read serves every waiter (members of a group usually wait at
        // the same cursor).
        let after = held.iter().map(|w| w.after).min().unwrap_or(0);
        tokio::spawn(async move {
            let fetched = off_thread(move || m.fetch(&inbox, request_inbox, after, MAX_FETCH, now)).await;
            let envs = match fetched {
                Ok(Ok((envs, _))) => envs,
                _ => Vec::new(),
            };
            for w in held {
                let result = fetch_result(envs.iter().filter(|e| e.index > w.after).take(w.limit).cloned());
                net.respond_mailbox(w.id, respond_ok(mailbox_response::Result::Fetched(result)))
                    .await;
            }
        });
    }

    /// Answers waiting fetches whose deadline passed: nothing new.
    fn expire_waiting(&mut self) {
        let now = self.clock.now_ms();
        let mut due = Vec::new();
        self.waiting.retain(|_, held| {
            due.extend(held.extract_if(.., |w| w.deadline <= now));
            !held.is_empty()
        });
        self.next_expiry = self.waiting.values().flatten().map(|w| w.deadline).min();
        if due.is_empty() {
            return;
        }
        self.release(&due);
        let net = self.net.clone();
        tokio::spawn(async move {
            for w in due {
                let empty = fetch_result(std::iter::empty());
                net.respond_mailbox(w.id, respond_ok(mailbox_response::Result::Fetched(empty)))
                    .await;
            }
        });
    }

    async fn ack(&mut self, peer: &PeerId, a: &pb::Ack, now: u64) -> Result<mailbox_response::Result, MailboxError> {
        let inbox = inbox32(&a.inbox_id)?;
        self.owner_check(peer, a.auth.as_ref(), Op::Ack, &inbox, a.up_to_index, now)
            .await?;
        let (request_inbox, up_to) = (a.request_inbox, a.up_to_index);
        let n = self
            .blocking(move |m| m.ack(&inbox, request_inbox, up_to))
            .await?
            .map_err(|_| MailboxError::Unavailable)?;
        Ok(mailbox_response::Result::Deleted(n))
    }

    async fn subscribe(
        &mut self,
        peer: PeerId,
        s: &pb::Subscribe,
        now: u64,
    ) -> Result<mailbox_response::Result, MailboxError> {
        let inbox = inbox32(&s.inbox_id)?;
        self.owner_check(&peer, s.auth.as_ref(), Op::Subscribe, &inbox, s.after_index, now)
            .await?;
        if self.subs.len() > MAX_SUBSCRIPTIONS && !self.subs.contains_key(&(inbox, false)) {
            return Err(MailboxError::RateLimited);
        }
        let mut start = |sub: SubKey, cursor: u64| {
            let fresh = Subscription {
                peer,
                cursor,
                in_flight: false,
            };
            self.subs.insert(sub, fresh);
            self.push(sub);
        };
        start((inbox, false), s.after_index);
        // The request inbox is pushed from its oldest envelope: its cursor is
        // not the one the owner gave for its normal inbox.
        if s.include_request_inbox {
            start((inbox, true), 0);
        } else {
            self.subs.remove(&(inbox, true));
        }
        Ok(mailbox_response::Result::Deleted(0))
    }

    async fn claim(&mut self, peer: PeerId, c: &pb::ClaimKeyPackage) -> Result<mailbox_response::Result, MailboxError> {
        let owner = inbox32(&c.owner_key)?;
        if !allow(&mut self.claim_budget, peer, self.opts.key_package_claims_per_minute) {
            return Err(MailboxError::RateLimited);
        }
        let kp = self
            .blocking(move |m| m.claim_key_package(&owner))
            .await?
            .map_err(|_| MailboxError::Unavailable)?
            .ok_or(MailboxError::NotFound)?;
        Ok(mailbox_response::Result::KeyPackage(kp))
    }

    async fn publish(
        &mut self,
        peer: &PeerId,
        k: &pb::PublishKeyPackages,
        now: u64,
    ) -> Result<mailbox_response::Result, MailboxError> {
        let inbox = inbox32(&k.inbox_id)?;
        if k.key_packages.len() > self.opts.mailboxes.limits().max_key_packages
            || k.key_packages
                .iter()
                .chain(std::iter::once(&k.last_resort))
                .any(|kp| kp.len() > 16 * 1024)
        {
            return Err(MailboxError::TooLarge);
        }
        let auth = k.auth.as_ref().ok_or(MailboxError::Unauthorized)?;
        self.owner_check(
            peer,
            Some(auth),
            Op::PublishKeyPackages,
            &inbox,
            k.key_packages.len() as u64,
            now,
        )
        .await?;
        let owner = inbox32(&auth.owner_key)?;
        let kps = k.key_packages.clone();
        let last = (!k.last_resort.is_empty()).then(|| k.last_resort.clone());
        let n = self
            .blocking(move |m| m.publish_key_packages(&owner, &kps, last.as_deref()))
            .await?
            .map_err(|_| MailboxError::Unavailable)?;
        Ok(mailbox_response::Result::Deleted(n as u64))
    }

    /// Pushes new envelopes of inbox `key` to its subscribed owner, if idle.
    fn push(&mut self, key: SubKey) {
        let Some(sub) = self.subs.get_mut(&key) else { return };
        if sub.in_flight {
            return;
        }
        sub.in_flight = true;
        let (peer, cursor) = (sub.peer, sub.cursor);
        let (inbox, request_inbox) = key;
        let m = self.opts.mailboxes.clone();
        let net = self.net.clone();
        let tx = self.push_tx.clone();
        let now = self.clock.now_ms();
        tokio::spawn(async move {
            // Pushes go only over an open connection: a relay never dials an
            // owner who went away (it fetches from its cursor when back).
            if !net.is_connected(peer).await {
                let _ = tx
                    .send(PushDone {
                        sub: key,
                        peer,
                        acked: None,
                        attempted_up_to: cursor,
                    })
                    .await;
                return;
            }
            let fetched = off_thread(move || m.fetch(&inbox, request_inbox, cursor, 256, now)).await;
            let envs = match fetched {
                Ok(Ok((envs, _))) => envs,
                _ => Vec::new(),
            };
            if envs.is_empty() {
                let _ = tx
                    .send(PushDone {
                        sub: key,
                        peer,
                        acked: Some(cursor),
                        attempted_up_to: cursor,
                    })
                    .await;
                return;
            }
            // One push must fit a delivery frame: stop at the byte budget
            // (always at least one envelope; a single one fits by config).
            let mut budget = PUSH_MAX_BYTES;
            let envs: Vec<_> = envs
                .into_iter()
                .enumerate()
                .take_while(|(i, e)| {
                    let fits = *i == 0 || e.envelope.len() <= budget;
                    budget = budget.saturating_sub(e.envelope.len());
                    fits
                })
                .map(|(_, e)| e)
                .collect();
            let attempted_up_to = envs.last().map_or(cursor, |e| e.index);
            let mut indices = Vec::new();
            let mut envelopes = Vec::new();
            for e in envs {
                if let Ok(env) = pb::Envelope::decode(e.envelope.as_slice()) {
                    indices.push(e.index);
                    envelopes.push(env);
                }
            }
            let request = pb::DeliverRequest {
                envelopes,
                mailbox_indices: indices.clone(),
                request_inbox,
            };
            // A push that failed while the connection stays open (the owner was
            // slow to answer) goes again: the owner would not notice that its
            // subscription ended, and would find the mail only at its next
            // re-check. The owner drops a copy it already applied as a duplicate.
            let mut tries = 0;
            let delivered = loop {
                match net.deliver(peer, request.clone()).await {
                    Err(_) if tries < PUSH_RETRIES && net.is_connected(peer).await => {
                        tries += 1;
                        tokio::time::sleep(PUSH_RETRY_PAUSE).await;
                    }
                    result => break result,
                }
            };
            let acked = match delivered {
                Ok(resp) => {
                    let mut acked = cursor;
                    for (i, s) in indices.iter().zip(resp.statuses) {
                        match pb::DeliverStatus::try_from(s) {
                            Ok(
                                pb::DeliverStatus::Accepted
                                | pb::DeliverStatus::Duplicate
                                | pb::DeliverStatus::Rejected,
                            ) => acked = *i,
                            _ => break,
                        }
                    }
                    Some(acked)
                }
                Err(_) => None,
            };
            let _ = tx
                .send(PushDone {
                    sub: key,
                    peer,
                    acked,
                    attempted_up_to,
                })
                .await;
        });
    }

    async fn on_push_done(&mut self, done: PushDone) {
        let Some(sub) = self.subs.get_mut(&done.sub) else {
            return;
        };
        if sub.peer != done.peer {
            return;
        }
        sub.in_flight = false;
        match done.acked {
            None => {
                // The owner went away; it fetches from its cursor when it is back.
                self.subs.remove(&done.sub);
            }
            Some(acked) => {
                let previous = sub.cursor;
                let progressed = acked > previous;
                sub.cursor = acked;
                if progressed {
                    let (inbox, request_inbox) = done.sub;
                    // Indices are dense per inbox, so this counts pushed envelopes.
                    self.opts.metrics.pushed.inc_by(acked - previous);
                    let _ = self.blocking(move |m| m.ack(&inbox, request_inbox, acked)).await;
                    self.push(done.sub);
                } else if done.attempted_up_to > acked {
                    // The owner could not apply them yet; it will fetch later.
                    self.subs.remove(&done.sub);
                }
            }
        }
    }
}

/// Commits one pass's checked deposits in one durable transaction, reports
/// the inboxes that received envelopes on `committed`, then signs a
/// receipt for each stored deposit (in parallel) and answers every call. No
/// receipt is signed before the commit returned. Holds `_permit` until the
/// answers are sent.
async fn commit_deposits(
    ctx: CommitContext,
    calls: Vec<CommitCall>,
    reqs: Vec<DepositRequest>,
    now: u64,
    committed: oneshot::Sender<Vec<SubKey>>,
    _permit: OwnedSemaphorePermit,
) {
    let n = reqs.len();
    let reqs = Arc::new(reqs);
    let (m, r2) = (ctx.mailboxes.clone(), reqs.clone());
    let started = std::time::Instant::now();
    let result = off_thread(move || m.deposit_batch(&r2, now)).await;
    let commit_done = std::time::Instant::now();
    let stored: Vec<Result<Deposited, MailboxError>> = match result {
        Ok(Ok(o)) if o.len() == n => o
            .into_iter()
            .map(|outcome| {
                let e = match outcome {
                    Ok(dep) => {
                        ctx.metrics
                            .deposits
                            .get_or_create(&vec![("result".into(), "ok".into())])
                            .inc();
                        return Ok(dep);
                    }
                    Err(DepositRefusal::TooLarge) => MailboxError::TooLarge,
                    Err(DepositRefusal::QuotaExceeded) => MailboxError::QuotaExceeded,
                };
                ctx.metrics
                    .deposits
                    .get_or_create(&vec![("result".into(), e.code().into())])
                    .inc();
                ctx.metrics.refuse("deposit", e);
                Err(e)
            })
            .collect(),
        other => {
            match other {
                Ok(Err(e)) => warn!("deposit commit failed: {e}"),
                Err(e) => warn!("deposit commit failed: {e}"),
                Ok(Ok(_)) => warn!("deposit commit returned a wrong count"),
            }
            for _ in 0..n {
                ctx.metrics.refuse("deposit", MailboxError::Unavailable);
            }
            vec![Err(MailboxError::Unavailable); n]
        }
    };

    // Durably committed (or failed): the next pass may commit now.
    let mut touched: Vec<SubKey> = stored
        .iter()
        .zip(reqs.iter())
        .filter(|(s, _)| s.is_ok())
        .map(|(_, req)| (req.inbox, req.request_inbox))
        .collect();
    touched.sort();
    touched.dedup();
    let _ = committed.send(touched);

    // Sign the receipts.
    let to_sign: Vec<(usize, Deposited)> = stored
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().ok().map(|dep| (i, *dep)))
        .collect();
    let (signer, r3) = (ctx.signer.clone(), reqs.clone());
    let sign = move |(i, dep): (usize, Deposited)| {
        let req = &r3[i];
        let receipt = signer.sign(&mb::Receipt {
            relay_key: [0; 32],
            inbox_id: req.inbox,
            request_inbox: req.request_inbox,
            envelope_hash: mb::envelope_hash(&req.envelope),
            index: dep.index,
            accepted_ms: dep.accepted_ms,
            keep_until_ms: dep.keep_until_ms,
        });
        (i, receipt)
    };
    // A few signatures cost less than handing them to other threads.
    let signed = if to_sign.len() < INLINE_SIGNATURES {
        Ok(to_sign.into_iter().map(&sign).collect::<Vec<_>>())
    } else {
        parallel_map(to_sign, ctx.parallel, sign).await
    };
    debug!(
        deposits = n,
        requests = calls.len(),
        commit_us = (commit_done - started).as_micros() as u64,
        sign_us = commit_done.elapsed().as_micros() as u64,
        "deposit pass committed"
    );
    let mut receipts: Vec<Option<pb::CustodyReceipt>> = vec![None; n];
    match signed {
        Ok(signed) => {
            for (i, r) in signed {
                receipts[i] = Some(r);
            }
        }
        // Stored, but without a receipt the sender must retry (recipients
        // drop the duplicate by envelope id).
        Err(e) => warn!("signing custody receipts failed: {e}"),
    }

    for call in calls {
        let items = call
            .slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Refused(e) => Err(e),
                Slot::Commit(i) => match (&stored[i], receipts[i].take()) {
                    (Ok(_), Some(receipt)) => Ok(receipt),
                    (Ok(_), None) => Err(MailboxError::Unavailable),
                    (Err(e), _) => Err(*e),
                },
            })
            .collect();
        ctx.net
            .respond_mailbox(call.id, deposit_answer(call.batch, items))
            .await;
    }
}

/// Serves the Prometheus text format on `http://addr/metrics`.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    registry: Arc<std::sync::Mutex<Registry>>,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                let ok = registry
                    .lock()
                    .ok()
                    .is_some_and(|r| prometheus_client::encoding::text::encode(&mut body, &r).is_ok());
                if ok {
                    (
                        axum::http::StatusCode::OK,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                } else {
                    (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain")],
                        String::new(),
                    )
                }
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("metrics server stopped: {e}");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_key_names_the_peer_id_libp2p_derives_from_it() {
        for _ in 0..100 {
            let key = libp2p::identity::ed25519::Keypair::generate().public();
            let peer = libp2p::identity::PublicKey::from(key.clone()).to_peer_id();
            assert_eq!(owner_peer(&key.to_bytes()), Some(peer));
        }
        assert_eq!(owner_peer(&[7u8; 31]), None);
        assert_eq!(owner_peer(&[7u8; 33]), None);
    }

    #[test]
    fn own_connection_nonces_count_as_seen_until_their_window_ends() {
        let mut nonces = OwnConnectionNonces::default();
        assert!(nonces.insert([1; 16], 1_100, 1_000));
        assert!(nonces.seen(&[1; 16], 1_000));
        assert!(nonces.seen(&[1; 16], 1_099));
        assert!(!nonces.seen(&[2; 16], 1_000));
        assert!(!nonces.seen(&[1; 16], 1_100), "its window is over");
        // A later insert forgets what ended.
        assert!(nonces.insert([2; 16], 1_300, 1_200));
        assert_eq!(nonces.until.len(), 1);
        assert_eq!(nonces.order.len(), 1);
        assert!(nonces.seen(&[2; 16], 1_200));
    }

    #[test]
    fn own_connection_nonces_refuse_more_than_they_may_hold() {
        let mut nonces = OwnConnectionNonces::default();
        for i in 0..OWN_NONCES_MAX as u64 {
            let mut n = [0u8; 16];
            n[..8].copy_from_slice(&i.to_be_bytes());
            assert!(nonces.insert(n, 10_000, 0));
        }
        assert!(
            !nonces.insert([0xff; 16], 10_000, 0),
            "full: the caller records it durably"
        );
        assert!(
            nonces.insert([0xff; 16], 20_000, 10_000),
            "room again once the windows ended"
        );
    }

    #[test]
    fn overrides_reach_nested_limits_and_keep_other_settings() {
        let cfg = RelayConfig::default()
            .with_overrides([
                ("mailbox.retention_ms", "3600000"),
                ("pow_bits", "12"),
                ("log", "debug"),
                ("metrics", "127.0.0.1:9999"),
                ("mailbox.cache_bytes", "1073741824"),
            ])
            .unwrap();
        assert_eq!(cfg.mailbox.retention_ms, 3_600_000);
        assert_eq!(cfg.mailbox.cache_bytes, 1 << 30);
        assert_eq!(cfg.pow_bits, 12);
        assert_eq!(cfg.log, "debug");
        assert_eq!(cfg.metrics, "127.0.0.1:9999");
        cfg.validate().unwrap();
        assert_eq!(cfg.sweep_interval_secs, RelayConfig::default().sweep_interval_secs);
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        assert!(RelayConfig::default().with_overrides([("no_such_key", "1")]).is_err());
        assert!(RelayConfig::default().with_overrides([("pow_bits", "many")]).is_err());
        assert!(RelayConfig::default().with_overrides([("pow_bits.x", "1")]).is_err());
        assert!(
            RelayConfig::default()
                .with_overrides([("mailbox.no_such_limit", "1")])
                .is_err()
        );
    }
}

#[cfg(test)]
mod deposit_tests {
    use super::*;

    fn grant(n: u8, expires_ms: u64) -> Grant {
        Grant {
            inbox: [n; 32],
            expires_ms,
        }
    }

    #[test]
    fn a_grant_allows_only_its_inbox_and_only_until_it_expires() {
        let g = grant(1, 100);
        assert_eq!(g.allows(&[1; 32], 100), Ok(()));
        assert_eq!(g.allows(&[1; 32], 101), Err(MailboxError::Expired));
        assert_eq!(g.allows(&[2; 32], 50), Err(MailboxError::Unauthorized));
        assert_eq!(g.allows(&[2; 32], 101), Err(MailboxError::Unauthorized));
    }

    #[test]
    fn the_capability_cache_stays_bounded_and_keeps_recently_used_entries() {
        let mut cache = CapabilityCache::default();
        let key = |i: u64| -> [u8; 32] { Sha256::digest(i.to_be_bytes()).into() };
        cache.insert(key(0), grant(0, 1));
        for i in 1..(3 * CAPABILITY_CACHE_MAX as u64) {
            cache.insert(key(i), grant(1, i));
            // Entry 0 is used all the time, so it is never dropped.
            assert_eq!(cache.get(&key(0)), Some(grant(0, 1)));
            assert!(cache.len() <= CAPABILITY_CACHE_MAX);
        }
        assert_eq!(cache.get(&key(1)), None, "an old unused entry is gone");
    }

    #[test]
    fn the_cache_key_covers_body_and_signature() {
        let cap = mb::issue_capability(&[7; 32], 10, None);
        let mut other_sig = cap.clone();
        other_sig.signature[0] ^= 1;
        let mut moved = cap.clone();
        let b = moved.signature.remove(0);
        moved.body.push(b);
        let k = CapabilityCache::key(&cap);
        assert_ne!(k, CapabilityCache::key(&other_sig));
        assert_ne!(k, CapabilityCache::key(&moved));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_map_keeps_the_order() {
        for n in [0usize, 1, 3, 4, 5, 17, 100] {
            let out = parallel_map((0..n).collect(), 2, |i| i * 10).await.unwrap();
            assert_eq!(out, (0..n).map(|i| i * 10).collect::<Vec<_>>());
        }
    }
}

#[cfg(test)]
mod validation_tests {
    use super::*;

    #[test]
    fn printed_config_with_metrics_off_reads_back_as_off() {
        let cfg = RelayConfig::default().with_overrides([("metrics", "off")]).unwrap();
        let again = RelayConfig::from_toml(&cfg.to_toml()).unwrap();
        assert_eq!(again.metrics_addr().unwrap(), None);
    }

    #[test]
    fn settings_that_would_break_the_relay_are_refused() {
        for (k, v) in [
            ("pow_bits", "24"),
            ("mailbox.nonce_window_ms", "1000"),
            ("mailbox.max_envelope_bytes", "4194304"),
            ("metrics", "nowhere"),
            ("listen", "[\"not an address\"]"),
        ] {
            let cfg = RelayConfig::default().with_overrides([(k, v)]).unwrap();
            assert!(cfg.validate().is_err(), "{k}={v} accepted");
        }
        RelayConfig::default().validate().unwrap();
    }
}
