//! Relay mode: the mailbox service, its configuration and its metrics.
//!
//! A relay is a node with more services: a DHT server and bootstrap peer,
//! a circuit relay v2 server, an AutoNAT server, and the store-and-forward
//! mailboxes of `/tidings/mailbox/1`. The [`MailboxService`] task owns the
//! relay's [`Mailboxes`] database. It acknowledges a deposit only after the
//! deposit's two-phase durable commit, with a signed custody receipt.

use std::collections::HashMap;
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
use tidings_store::mailbox::{DepositRequest, MailboxLimits, Mailboxes};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::net::{NetEvent, Network, RelayServerConfig};

/// Most envelopes one fetch returns.
const MAX_FETCH: usize = 512;
/// Most bytes one fetch returns (stays well under the mailbox frame cap).
const MAX_FETCH_BYTES: usize = 3 * 1024 * 1024;
/// Most mailbox requests folded into one pass (deposits in one transaction).
const MAX_BATCH: usize = 512;

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

struct Subscription {
    peer: PeerId,
    cursor: u64,
    in_flight: bool,
}

struct PushDone {
    inbox: [u8; 32],
    peer: PeerId,
    /// Highest index the owner acknowledged, if any; None if the push failed.
    acked: Option<u64>,
    attempted_up_to: u64,
}

/// The task that answers `/tidings/mailbox/1` on a relay.
pub struct MailboxService {
    opts: RelayOptions,
    net: Network,
    clock: Clock,
    relay_seed: [u8; 32],
    subs: HashMap<[u8; 32], Subscription>,
    claim_budget: HashMap<PeerId, (Instant, u32)>,
    request_budget: HashMap<PeerId, (Instant, u32)>,
    request_budget_ip: HashMap<IpAddr, (Instant, u32)>,
    push_tx: mpsc::Sender<PushDone>,
    push_rx: mpsc::Receiver<PushDone>,
}

struct Pending {
    id: u64,
    peer: PeerId,
    ip: Option<IpAddr>,
    request: pb::MailboxRequest,
}

fn respond_err(e: MailboxError, detail: impl Into<String>) -> pb::MailboxResponse {
    pb::MailboxResponse {
        status: e.status() as i32,
        detail: detail.into(),
        result: None,
    }
}

fn respond_ok(result: mailbox_response::Result) -> pb::MailboxResponse {
    pb::MailboxResponse {
        status: pb::MailboxStatus::Ok as i32,
        detail: String::new(),
        result: Some(result),
    }
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

impl MailboxService {
    pub fn new(opts: RelayOptions, net: Network, clock: Clock, relay_seed: [u8; 32]) -> Self {
        let (push_tx, push_rx) = mpsc::channel(1024);
        Self {
            opts,
            net,
            clock,
            relay_seed,
            subs: HashMap::new(),
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
        self.update_gauges().await;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(first) = ev else { break };
                    let mut batch = Vec::new();
                    let mut next = Some(first);
                    while let Some(ev) = next {
                        if let NetEvent::Mailbox { id, peer, ip, request } = ev {
                            batch.push(Pending { id, peer, ip, request });
                        }
                        next = if batch.len() < MAX_BATCH { rx.try_recv().ok() } else { None };
                    }
                    self.on_batch(batch).await;
                }
                Some(done) = self.push_rx.recv() => self.on_push_done(done).await,
                _ = sweep.tick() => self.sweep().await,
            }
        }
        debug!("mailbox service stopped");
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Mailboxes) -> T + Send + 'static,
    ) -> Result<T, MailboxError> {
        let m = self.opts.mailboxes.clone();
        tokio::task::spawn_blocking(move || f(&m))
            .await
            .map_err(|_| MailboxError::Unavailable)
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
        let mut deposits: Vec<(Pending, DepositRequest)> = Vec::new();
        for p in batch {
            let op = match &p.request.op {
                Some(mailbox_request::Op::Deposit(_)) => "deposit",
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
            let result = match &p.request.op {
                Some(mailbox_request::Op::Deposit(d)) => match self.check_deposit(&p.peer, p.ip, d, now) {
                    Ok(req) => {
                        deposits.push((p, req));
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Some(mailbox_request::Op::Fetch(f)) => self.fetch(f, now).await,
                Some(mailbox_request::Op::Ack(a)) => self.ack(a, now).await,
                Some(mailbox_request::Op::Subscribe(s)) => self.subscribe(p.peer, s, now).await,
                Some(mailbox_request::Op::ClaimKeyPackage(c)) => self.claim(p.peer, c).await,
                Some(mailbox_request::Op::PublishKeyPackages(k)) => self.publish(k, now).await,
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
        if !deposits.is_empty() {
            self.commit_deposits(deposits, now).await;
        }
    }

    fn check_deposit(
        &mut self,
        peer: &PeerId,
        ip: Option<IpAddr>,
        d: &pb::Deposit,
        now: u64,
    ) -> Result<DepositRequest, MailboxError> {
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
        } else {
            let cap = d.capability.as_ref().ok_or(MailboxError::Unauthorized)?;
            mb::verify_capability(cap, &inbox, now)?;
        }
        Ok(DepositRequest {
            inbox,
            request_inbox: d.request_inbox,
            sender: sender_key(peer),
            envelope: d.envelope.clone(),
        })
    }

    async fn commit_deposits(&mut self, deposits: Vec<(Pending, DepositRequest)>, now: u64) {
        let (pending, reqs): (Vec<Pending>, Vec<DepositRequest>) = deposits.into_iter().unzip();
        let reqs = Arc::new(reqs);
        let r2 = reqs.clone();
        let result = self.blocking(move |m| m.deposit_batch(&r2, now)).await;
        let outcomes = match result {
            Ok(Ok(o)) if o.len() == pending.len() => o,
            other => {
                match other {
                    Ok(Err(e)) => warn!("deposit commit failed: {e}"),
                    Err(e) => warn!("deposit commit failed: {e}"),
                    Ok(Ok(_)) => warn!("deposit commit returned a wrong count"),
                }
                for p in pending {
                    self.opts.metrics.refuse("deposit", MailboxError::Unavailable);
                    self.net
                        .respond_mailbox(p.id, respond_err(MailboxError::Unavailable, "cannot commit"))
                        .await;
                }
                return;
            }
        };
        let mut touched = Vec::new();
        for ((p, req), outcome) in pending.into_iter().zip(reqs.iter()).zip(outcomes) {
            let response = match outcome {
                Ok(dep) => {
                    self.opts
                        .metrics
                        .deposits
                        .get_or_create(&vec![("result".into(), "ok".into())])
                        .inc();
                    if !req.request_inbox {
                        touched.push(req.inbox);
                    }
                    let receipt = mb::sign_receipt(
                        &self.relay_seed,
                        &mb::Receipt {
                            relay_key: [0; 32],
                            inbox_id: req.inbox,
                            request_inbox: req.request_inbox,
                            envelope_hash: mb::envelope_hash(&req.envelope),
                            index: dep.index,
                            accepted_ms: dep.accepted_ms,
                            keep_until_ms: dep.keep_until_ms,
                        },
                    );
                    respond_ok(mailbox_response::Result::Receipt(receipt))
                }
                Err(refusal) => {
                    let e = match refusal {
                        tidings_store::mailbox::DepositRefusal::TooLarge => MailboxError::TooLarge,
                        tidings_store::mailbox::DepositRefusal::QuotaExceeded => MailboxError::QuotaExceeded,
                    };
                    self.opts
                        .metrics
                        .deposits
                        .get_or_create(&vec![("result".into(), e.code().into())])
                        .inc();
                    self.opts.metrics.refuse("deposit", e);
                    respond_err(e, "")
                }
            };
            self.net.respond_mailbox(p.id, response).await;
        }
        touched.sort();
        touched.dedup();
        for inbox in touched {
            self.push(inbox);
        }
    }

    async fn owner_check(
        &self,
        auth: Option<&pb::OwnerAuth>,
        op: Op,
        inbox: &[u8; 32],
        arg: u64,
        now: u64,
    ) -> Result<(), MailboxError> {
        let auth = auth.ok_or(MailboxError::Unauthorized)?;
        let nonce = mb::verify_auth(auth, op, inbox, arg, now)?;
        match self.blocking(move |m| m.check_nonce(&nonce, now)).await? {
            Ok(true) => Ok(()),
            Ok(false) => Err(MailboxError::Replayed),
            Err(_) => Err(MailboxError::Unavailable),
        }
    }

    async fn fetch(&mut self, f: &pb::Fetch, now: u64) -> Result<mailbox_response::Result, MailboxError> {
        let inbox = inbox32(&f.inbox_id)?;
        self.owner_check(f.auth.as_ref(), Op::Fetch, &inbox, f.after_index, now)
            .await?;
        let (request_inbox, after) = (f.request_inbox, f.after_index);
        let limit = (f.limit as usize).clamp(1, MAX_FETCH);
        let (envs, mut more) = self
            .blocking(move |m| m.fetch(&inbox, request_inbox, after, limit, now))
            .await?
            .map_err(|_| MailboxError::Unavailable)?;
        let mut out = Vec::with_capacity(envs.len());
        let mut bytes = 0;
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
        Ok(mailbox_response::Result::Fetched(pb::FetchResult {
            envelopes: out,
            more,
        }))
    }

    async fn ack(&mut self, a: &pb::Ack, now: u64) -> Result<mailbox_response::Result, MailboxError> {
        let inbox = inbox32(&a.inbox_id)?;
        self.owner_check(a.auth.as_ref(), Op::Ack, &inbox, a.up_to_index, now)
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
        self.owner_check(s.auth.as_ref(), Op::Subscribe, &inbox, s.after_index, now)
            .await?;
        if self.subs.len() > 100_000 && !self.subs.contains_key(&inbox) {
            return Err(MailboxError::RateLimited);
        }
        self.subs.insert(
            inbox,
            Subscription {
                peer,
                cursor: s.after_index,
                in_flight: false,
            },
        );
        self.push(inbox);
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

    /// Pushes new envelopes of `inbox` to its subscribed owner, if idle.
    fn push(&mut self, inbox: [u8; 32]) {
        let Some(sub) = self.subs.get_mut(&inbox) else { return };
        if sub.in_flight {
            return;
        }
        sub.in_flight = true;
        let (peer, cursor) = (sub.peer, sub.cursor);
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
                        inbox,
                        peer,
                        acked: None,
                        attempted_up_to: cursor,
                    })
                    .await;
                return;
            }
            let fetched = tokio::task::spawn_blocking(move || m.fetch(&inbox, false, cursor, 256, now)).await;
            let envs = match fetched {
                Ok(Ok((envs, _))) => envs,
                _ => Vec::new(),
            };
            if envs.is_empty() {
                let _ = tx
                    .send(PushDone {
                        inbox,
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
            };
            let acked = match net.deliver(peer, request).await {
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
                    inbox,
                    peer,
                    acked,
                    attempted_up_to,
                })
                .await;
        });
    }

    async fn on_push_done(&mut self, done: PushDone) {
        let Some(sub) = self.subs.get_mut(&done.inbox) else {
            return;
        };
        if sub.peer != done.peer {
            return;
        }
        sub.in_flight = false;
        match done.acked {
            None => {
                // The owner went away; it fetches from its cursor when it is back.
                self.subs.remove(&done.inbox);
            }
            Some(acked) => {
                let previous = sub.cursor;
                let progressed = acked > previous;
                sub.cursor = acked;
                if progressed {
                    let inbox = done.inbox;
                    // Indices are dense per inbox, so this counts pushed envelopes.
                    self.opts.metrics.pushed.inc_by(acked - previous);
                    let _ = self.blocking(move |m| m.ack(&inbox, false, acked)).await;
                    self.push(done.inbox);
                } else if done.attempted_up_to > acked {
                    // The owner could not apply them yet; it will fetch later.
                    self.subs.remove(&done.inbox);
                }
            }
        }
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
