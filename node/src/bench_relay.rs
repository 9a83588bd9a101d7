//! `tidings bench-relay`: a community relay under load.
//!
//! Everything runs on this machine, on loopback, with real redb files in a
//! temporary directory and the relay's own durable commits:
//!
//! 1. deposit throughput: an in-process relay ([`start_relay_with`]) and many raw
//!    libp2p clients ([`net::spawn`], TCP) depositing 1 KiB envelopes with real
//!    capabilities into real inboxes, a few requests in flight each; every
//!    deposit must come back with a custody receipt. Then the same senders
//!    with `DepositBatch` requests of several envelopes each (one receipt per
//!    envelope, checked the same way). Also one sender alone, as a reference;
//! 2. reconnect drain: two real nodes with the relay as home relay; bob stops,
//!    alice queues messages that end up in bob's relay mailbox, then bob
//!    restarts from the same data directory and the benchmark times how long
//!    until every message is decrypted and durably in his store;
//! 3. offline-to-displayed latency: per message, from bob's restart until the
//!    message event, over that drain and over small runs;
//! 4. relay memory: a mailbox database filled directly through
//!    [`Mailboxes::deposit_batch`], served by `tidings relay` as a child
//!    process; its resident memory after start, after owner fetches over the
//!    network, and with many connected clients.
//!
//! Nothing here asserts performance: it prints figures next to their targets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use prost::Message as _;
use sha2::{Digest, Sha256};
use tidings_protocol::DeviceKey;
use tidings_protocol::mailbox::{self as mb, MailboxError, Op};
use tidings_protocol::pb::{self, mailbox_request, mailbox_response};
use tidings_store::mailbox::{DEFAULT_CACHE_BYTES, DepositRequest, MailboxLimits, Mailboxes};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use crate::bench::{
    COMMIT_PROBES, Machine, Row, Summary, Target, commit_probe, kb_field, median, ms, print_rows, stop_child,
};
use crate::core::key_of_peer;
use crate::demo::{RelayTestOptions, retry_until, start_node_with_relays, start_relay_with};
use crate::net::{self, Network};
use crate::types::NodeEvent;
use crate::{Clock, NetConfig, Node, NodeHandle};

/// Measure a community relay: deposit throughput, reconnect drain, latency after
/// reconnect and memory.
#[derive(Debug, clap::Args)]
pub struct BenchRelayArgs {
    /// Concurrent senders in the deposit run [default: 100; 0 skips figure 1].
    #[arg(long, value_name = "N")]
    pub senders: Option<usize>,
    /// Deposits per sender in each timed round [default: 300].
    #[arg(long, value_name = "N")]
    pub deposits: Option<usize>,
    /// Deposit requests each sender keeps in flight [default: 4].
    #[arg(long, value_name = "N")]
    pub in_flight: Option<usize>,
    /// Envelopes per DepositBatch request in the batched deposit run, at most
    /// 64 [default: 16; 0 skips the batched run].
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Deposits per timed round of the single-sender reference [default: 3000].
    #[arg(long, value_name = "N")]
    pub single: Option<usize>,
    /// Messages queued for the reconnect drain [default: 10000; 0 skips figures 2 and 3].
    #[arg(long, value_name = "N")]
    pub drain: Option<usize>,
    /// Messages in each small reconnect run [default: 100].
    #[arg(long, value_name = "N")]
    pub small: Option<usize>,
    /// Small reconnect runs [default: 5; 0 skips them].
    #[arg(long, value_name = "N")]
    pub small_runs: Option<usize>,
    /// Inboxes in the memory run [default: 10000; 0 skips figure 4].
    #[arg(long, value_name = "N")]
    pub inboxes: Option<usize>,
    /// Envelopes per inbox in the memory run [default: 100].
    #[arg(long, value_name = "N")]
    pub per_inbox: Option<usize>,
    /// Owner fetches before the second memory reading [default: 300].
    #[arg(long, value_name = "N")]
    pub fetches: Option<usize>,
    /// Clients connected for the last memory reading [default: 1000].
    #[arg(long, value_name = "N")]
    pub clients: Option<usize>,
    /// Also write every figure to FILE as a JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Small counts for a smoke run (20 senders × 100, 1000 queued, 500 inboxes, 100 clients
    /// unless given explicitly).
    #[arg(long)]
    pub quick: bool,
}

/// Size of every envelope in the deposit and memory runs, in bytes.
const ENVELOPE_BYTES: usize = 1024;
/// Timed rounds of each deposit run; the figure is their median.
const TIMED_ROUNDS: usize = 3;
/// Envelopes per `DepositBatch` request in the batched run, by default.
const DEFAULT_BATCH: usize = 16;
/// Every N-th receipt's signature is verified (all are checked against what was sent).
const RECEIPT_SIGNATURE_SAMPLE: usize = 16;
/// Longest wait for one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Sends kept in flight while alice queues messages.
const CONCURRENT_SENDS: usize = 512;
/// Size of the queued chat messages (as in `tidings bench`).
const MESSAGE_BYTES: usize = 100;
/// Inboxes per write transaction while filling the memory run's database.
const FILL_INBOXES_PER_BATCH: usize = 100;
/// Raw clients (and requests in flight each) for the owner fetches.
const FETCH_CLIENTS: usize = 4;
const FETCH_IN_FLIGHT: usize = 8;
/// Pause before each memory reading, so that the process settles.
const SETTLE: Duration = Duration::from_secs(2);

const TARGET_DEPOSITS_PER_S: f64 = 20_000.0;
const TARGET_DRAIN_S: f64 = 1.0;
const TARGET_RSS_MB: f64 = 512.0;

#[derive(Debug, Clone, Copy)]
struct Counts {
    senders: usize,
    deposits: usize,
    in_flight: usize,
    batch: usize,
    single: usize,
    drain: usize,
    small: usize,
    small_runs: usize,
    inboxes: usize,
    per_inbox: usize,
    fetches: usize,
    clients: usize,
}

impl Counts {
    fn from_args(a: &BenchRelayArgs) -> Self {
        let d = if a.quick {
            Self {
                senders: 20,
                deposits: 100,
                in_flight: 4,
                batch: DEFAULT_BATCH,
                single: 500,
                drain: 1_000,
                small: 100,
                small_runs: 2,
                inboxes: 500,
                per_inbox: 100,
                fetches: 100,
                clients: 100,
            }
        } else {
            Self {
                senders: 100,
                deposits: 300,
                in_flight: 4,
                batch: DEFAULT_BATCH,
                single: 3_000,
                drain: 10_000,
                small: 100,
                small_runs: 5,
                inboxes: 10_000,
                per_inbox: 100,
                fetches: 300,
                clients: 1_000,
            }
        };
        Self {
            senders: a.senders.unwrap_or(d.senders),
            deposits: a.deposits.unwrap_or(d.deposits).max(1),
            in_flight: a.in_flight.unwrap_or(d.in_flight).max(1),
            batch: a.batch.unwrap_or(d.batch).min(mb::MAX_DEPOSITS_PER_BATCH),
            single: a.single.unwrap_or(d.single),
            drain: a.drain.unwrap_or(d.drain),
            small: a.small.unwrap_or(d.small).max(1),
            small_runs: a.small_runs.unwrap_or(d.small_runs),
            inboxes: a.inboxes.unwrap_or(d.inboxes),
            per_inbox: a.per_inbox.unwrap_or(d.per_inbox).max(1),
            fetches: a.fetches.unwrap_or(d.fetches),
            clients: a.clients.unwrap_or(d.clients),
        }
    }
}

/// Runs the benchmark.
pub async fn run(args: BenchRelayArgs) -> anyhow::Result<()> {
    let counts = Counts::from_args(&args);
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut machine = Machine::read();
    let probe_dir = tmp.path().to_owned();
    (machine.commit_min_ms, machine.commit_ms) =
        tokio::task::spawn_blocking(move || commit_probe(&probe_dir, COMMIT_PROBES))
            .await
            .context("the commit probe panicked")?
            .context("cannot time a durable commit")?;
    println!("Tidings relay benchmark\n");
    machine.print(tmp.path());
    if cfg!(debug_assertions) {
        println!("  WARNING: this is a debug build; build with --release for meaningful figures");
    }
    println!();

    let mut report = Report::default();
    if counts.senders > 0 {
        println!(
            "[1] deposits: {} senders × {} in flight, {} × {} deposits of {ENVELOPE_BYTES} B per timed round…",
            counts.senders, counts.in_flight, counts.senders, counts.deposits
        );
        let d = deposits(&tmp.path().join("deposit-relay"), &counts).await?;
        println!(
            "    {:.0} envelopes/s ({} senders), {:.0} envelopes/s ({} senders, batches of {}), {:.0} envelopes/s (1 sender); {} failures",
            d.many.per_s,
            counts.senders,
            d.batched.as_ref().map_or(f64::NAN, |b| b.per_s),
            counts.senders,
            counts.batch,
            d.single.as_ref().map_or(f64::NAN, |s| s.per_s),
            d.failures()
        );
        report.deposits = Some(d);
    }
    if counts.drain > 0 {
        println!(
            "[2] reconnect drain: {} messages queued in bob's relay mailbox, then {} × {} more…",
            counts.drain, counts.small_runs, counts.small
        );
        let r = reconnect(&tmp.path().join("reconnect"), &counts).await?;
        println!(
            "    drain: {:.3} s until all {} were in bob's store ({:.0} msg/s)",
            r.drain.durable_s, r.drain.messages, r.drain.durable_per_s
        );
        report.reconnect = Some(r);
    }
    if counts.inboxes > 0 {
        let exe = std::env::current_exe().context("cannot find the tidings executable")?;
        println!(
            "[4] memory: {} inboxes × {} envelopes of {ENVELOPE_BYTES} B written with Mailboxes::deposit_batch, then `tidings relay`…",
            counts.inboxes, counts.per_inbox
        );
        let m = memory(&exe, &tmp.path().join("memory"), &counts).await?;
        report.memory = Some(m);
    }

    println!();
    print_rows(&report.rows(&counts));
    report.print_notes();

    if let Some(path) = &args.json {
        let v = report.to_json(&machine, &counts);
        let text = serde_json::to_string_pretty(&v)?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nfigures written to {}", path.display());
    }
    Ok(())
}

// ------------------------------------------------------------------ helpers

/// An inbox owner with a deterministic device key (seeded by its number).
struct Owner {
    seed: [u8; 32],
    inbox: [u8; 32],
}

impl Owner {
    fn new(n: u64) -> Self {
        let seed: [u8; 32] = Sha256::new()
            .chain_update(b"tidings bench-relay owner")
            .chain_update(n.to_be_bytes())
            .finalize()
            .into();
        let inbox = mb::inbox_id(&DeviceKey::from_seed(seed).public());
        Self { seed, inbox }
    }

    fn capability(&self, expires_ms: u64) -> pb::Capability {
        mb::issue_capability(&self.seed, expires_ms, None)
    }

    fn fetch(&self, relay: PeerId, now_ms: u64) -> pb::MailboxRequest {
        let auth = mb::sign_auth(
            &self.seed,
            Op::Fetch,
            &relay.to_bytes(),
            &self.inbox,
            now_ms,
            rand::random(),
            0,
        );
        pb::MailboxRequest {
            op: Some(mailbox_request::Op::Fetch(pb::Fetch {
                inbox_id: self.inbox.to_vec(),
                request_inbox: false,
                after_index: 0,
                limit: 512,
                auth: Some(auth),
                wait_ms: 0,
            })),
        }
    }
}

/// A valid encoded [`pb::Envelope`] of exactly `len` bytes (at least 256).
fn envelope(tag: u64, len: usize) -> Vec<u8> {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&tag.to_be_bytes());
    id[8..].copy_from_slice(&rand::random::<[u8; 8]>());
    let make = |mls: usize| {
        pb::Envelope {
            id: id.to_vec(),
            conversation_id: vec![0xc0; 32],
            kind: pb::EnvelopeKind::Message as i32,
            mls_message: vec![0x5a; mls],
            ..Default::default()
        }
        .encode_to_vec()
    };
    // 200 and the final size need a two-byte length prefix alike.
    let probe = make(200).len();
    make(200 + len - probe)
}

fn deposit_request(inbox: &[u8; 32], capability: &pb::Capability, envelope: Vec<u8>) -> pb::MailboxRequest {
    pb::MailboxRequest {
        op: Some(mailbox_request::Op::Deposit(pb::Deposit {
            inbox_id: inbox.to_vec(),
            request_inbox: false,
            capability: Some(capability.clone()),
            pow_nonce: Vec::new(),
            envelope,
        })),
    }
}

/// One `DepositBatch` request of the deposits `(inbox, capability, envelope)`.
fn batch_request<'a>(
    items: impl IntoIterator<Item = (&'a [u8; 32], &'a pb::Capability, Vec<u8>)>,
) -> pb::MailboxRequest {
    let deposits = items
        .into_iter()
        .map(|(inbox, capability, envelope)| pb::Deposit {
            inbox_id: inbox.to_vec(),
            request_inbox: false,
            capability: Some(capability.clone()),
            pow_nonce: Vec::new(),
            envelope,
        })
        .collect();
    pb::MailboxRequest {
        op: Some(mailbox_request::Op::DepositBatch(pb::DepositBatch { deposits })),
    }
}

/// The refusal a mailbox answer carries, if any.
fn refusal(resp: &pb::MailboxResponse) -> Option<MailboxError> {
    match pb::MailboxStatus::try_from(resp.status) {
        Ok(s) => {
            MailboxError::from_status(s).or_else(|| (s != pb::MailboxStatus::Ok).then_some(MailboxError::BadRequest))
        }
        Err(_) => Some(MailboxError::BadRequest),
    }
}

fn tcp_addr(addrs: Vec<Multiaddr>) -> anyhow::Result<Multiaddr> {
    addrs
        .into_iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .context("no TCP listen address")
}

fn peer_of(addr: &Multiaddr) -> anyhow::Result<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) => Ok(p),
        _ => bail!("{addr} does not end in /p2p/<peer id>"),
    }
}

/// A raw libp2p peer (the node's own swarm, no core) that knows the relay.
struct Client {
    net: Network,
    tasks: [JoinHandle<()>; 2],
}

impl Client {
    async fn start(relay: &Multiaddr) -> anyhow::Result<Self> {
        let config = NetConfig {
            listen: Vec::new(),
            bootstrap: vec![relay.clone()],
            dht_server: false,
            request_timeout: STEP_TIMEOUT,
            ..NetConfig::default()
        };
        let (net, mut events, _, task) = net::spawn(Keypair::generate_ed25519(), config, Clock::system(), None).await?;
        let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });
        Ok(Self {
            net,
            tasks: [task, drain],
        })
    }

    async fn close(self) {
        let Client { net, tasks } = self;
        drop(net);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

async fn close_all(clients: Vec<Client>) {
    for c in clients {
        c.close().await;
    }
}

/// Resident memory and its peak of a process, in MB (Linux only).
fn rss_and_peak_mb(pid: u32) -> (Option<f64>, Option<f64>) {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (None, None);
    };
    let mb = |f| kb_field(&status, f).map(|kb| kb as f64 / 1024.0);
    (mb("VmRSS:"), mb("VmHWM:"))
}

// ------------------------------------------------------------ 1. deposits

/// What went wrong with deposits (all zero in a good run).
#[derive(Debug, Default, Clone)]
struct Failures {
    /// Refusals by error code.
    refused: BTreeMap<&'static str, u64>,
    /// Requests that got no answer.
    transport: u64,
    /// OK answers without a receipt, or with a receipt for something else.
    bad_receipt: u64,
    /// Sampled receipts whose signature did not verify.
    bad_signature: u64,
    /// Receipts whose signature was verified.
    signatures_checked: u64,
}

impl Failures {
    fn total(&self) -> u64 {
        self.refused.values().sum::<u64>() + self.transport + self.bad_receipt + self.bad_signature
    }

    fn add(&mut self, o: &Failures) {
        for (k, v) in &o.refused {
            *self.refused.entry(k).or_insert(0) += v;
        }
        self.transport += o.transport;
        self.bad_receipt += o.bad_receipt;
        self.bad_signature += o.bad_signature;
        self.signatures_checked += o.signatures_checked;
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "total": self.total(),
            "refused": self.refused,
            "transport": self.transport,
            "bad_receipt": self.bad_receipt,
            "bad_signature": self.bad_signature,
            "signatures_checked": self.signatures_checked,
        })
    }
}

/// Checks one deposit's answer against what was sent.
fn check_receipt(
    result: Result<pb::MailboxResponse, net::NetError>,
    inbox: &[u8; 32],
    envelope: &[u8],
    relay_key: &[u8; 32],
    verify_signature: bool,
    f: &mut Failures,
) {
    let resp = match result {
        Ok(r) => r,
        Err(_) => {
            f.transport += 1;
            return;
        }
    };
    if let Some(e) = refusal(&resp) {
        *f.refused.entry(e.code()).or_insert(0) += 1;
        return;
    }
    let Some(mailbox_response::Result::Receipt(wire)) = resp.result else {
        f.bad_receipt += 1;
        return;
    };
    let Ok(body) = pb::CustodyReceiptBody::decode(wire.body.as_slice()) else {
        f.bad_receipt += 1;
        return;
    };
    if body.relay_key != relay_key[..]
        || body.inbox_id != inbox[..]
        || body.request_inbox
        || body.envelope_hash != mb::envelope_hash(envelope)[..]
        || body.keep_until_ms <= body.accepted_ms
        || body.index == 0
    {
        f.bad_receipt += 1;
        return;
    }
    if verify_signature {
        f.signatures_checked += 1;
        match mb::verify_receipt(&wire) {
            Ok(r) if r.relay_key == *relay_key && r.inbox_id == *inbox => {}
            _ => f.bad_signature += 1,
        }
    }
}

/// One envelope of a request: (its number in the sender's round, its target, its bytes).
type Sent = (usize, usize, Vec<u8>);

/// Checks the answer to a `DepositBatch` item by item, like [`check_receipt`]
/// would check each as a single deposit's answer.
fn check_batch(
    result: Result<pb::MailboxResponse, net::NetError>,
    sent: &[Sent],
    targets: &Targets,
    relay_key: &[u8; 32],
    sender_no: usize,
    f: &mut Failures,
) {
    let n = sent.len() as u64;
    let resp = match result {
        Ok(r) => r,
        Err(_) => {
            f.transport += n;
            return;
        }
    };
    if let Some(e) = refusal(&resp) {
        *f.refused.entry(e.code()).or_insert(0) += n;
        return;
    }
    let Some(mailbox_response::Result::DepositResults(r)) = resp.result else {
        f.bad_receipt += n;
        return;
    };
    if r.results.len() != sent.len() {
        f.bad_receipt += n;
        return;
    }
    for (item, (i, t, env)) in r.results.into_iter().zip(sent) {
        let answer = pb::MailboxResponse {
            status: item.status,
            detail: String::new(),
            result: item.receipt.map(mailbox_response::Result::Receipt),
        };
        let verify = (sender_no + i).is_multiple_of(RECEIPT_SIGNATURE_SAMPLE);
        check_receipt(Ok(answer), &targets.owners[*t].inbox, env, relay_key, verify, f);
    }
}

/// The inboxes senders deposit into, with a capability for each.
struct Targets {
    owners: Vec<Owner>,
    caps: Vec<pb::Capability>,
}

/// One sender's share of a round: `n` deposits into the targets in turn,
/// `in_flight` requests at a time; each request a single `Deposit`, or with
/// `batch`, a `DepositBatch` of up to that many. Returns the latencies (ms,
/// per request) and the failures.
#[allow(clippy::too_many_arguments)]
async fn sender_round(
    client: Network,
    relay: PeerId,
    relay_key: [u8; 32],
    targets: Arc<Targets>,
    sender_no: usize,
    round: u64,
    n: usize,
    in_flight: usize,
    batch: Option<usize>,
) -> (Vec<f64>, Failures) {
    let per_request = batch.unwrap_or(1).max(1);
    let mut latencies = Vec::with_capacity(n.div_ceil(per_request));
    let mut failures = Failures::default();
    let mut pending = FuturesUnordered::new();
    let mut next = 0usize;
    loop {
        while next < n && pending.len() < in_flight {
            let sent: Vec<Sent> = (next..(next + per_request).min(n))
                .map(|i| {
                    let t = (sender_no + i) % targets.owners.len();
                    let tag = (round << 48) | ((sender_no as u64) << 24) | i as u64;
                    (i, t, envelope(tag, ENVELOPE_BYTES))
                })
                .collect();
            next += sent.len();
            let req = match batch {
                None => {
                    let (_, t, env) = &sent[0];
                    deposit_request(&targets.owners[*t].inbox, &targets.caps[*t], env.clone())
                }
                Some(_) => batch_request(
                    sent.iter()
                        .map(|(_, t, env)| (&targets.owners[*t].inbox, &targets.caps[*t], env.clone())),
                ),
            };
            let client = client.clone();
            pending.push(async move {
                let t0 = Instant::now();
                let r = client.mailbox(relay, req).await;
                (sent, r, t0.elapsed())
            });
        }
        let Some((sent, r, took)) = pending.next().await else {
            break;
        };
        latencies.push(ms(took));
        match batch {
            None => {
                let (i, t, env) = &sent[0];
                let verify = (sender_no + i).is_multiple_of(RECEIPT_SIGNATURE_SAMPLE);
                check_receipt(r, &targets.owners[*t].inbox, env, &relay_key, verify, &mut failures);
            }
            Some(_) => check_batch(r, &sent, &targets, &relay_key, sender_no, &mut failures),
        }
    }
    (latencies, failures)
}

/// CPU time this process has used so far (user + system), in seconds (Linux only).
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // /proc reports clock ticks of USER_HZ, which is 100 on Linux.
    Some((utime + stime) as f64 / 100.0)
}

struct Round {
    per_s: f64,
    /// CPU the whole process (relay and clients) used in the round, in seconds.
    cpu_s: Option<f64>,
    latencies: Vec<f64>,
    failures: Failures,
}

/// One round: every client deposits `per_sender` envelopes at once.
async fn deposit_round(
    clients: &[&Network],
    relay: (PeerId, [u8; 32]),
    targets: &Arc<Targets>,
    round: u64,
    per_sender: usize,
    in_flight: usize,
    batch: Option<usize>,
) -> anyhow::Result<Round> {
    let t0 = Instant::now();
    let cpu0 = process_cpu_s();
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(sender_round(
                (*c).clone(),
                relay.0,
                relay.1,
                targets.clone(),
                i,
                round,
                per_sender,
                in_flight,
                batch,
            ))
        })
        .collect();
    let mut latencies = Vec::with_capacity(clients.len() * per_sender);
    let mut failures = Failures::default();
    for t in tasks {
        let (l, f) = t.await.context("a sender panicked")?;
        latencies.extend(l);
        failures.add(&f);
    }
    let elapsed = t0.elapsed();
    let cpu_s = process_cpu_s().zip(cpu0).map(|(b, a)| b - a);
    Ok(Round {
        per_s: (clients.len() * per_sender) as f64 / elapsed.as_secs_f64(),
        cpu_s,
        latencies,
        failures,
    })
}

struct DepositFigures {
    senders: usize,
    in_flight: usize,
    /// Envelopes per `DepositBatch` request; None for single deposits.
    batch: Option<usize>,
    per_round: usize,
    /// Envelopes sent, warm-up included.
    sent: usize,
    rounds_per_s: Vec<f64>,
    /// Median of the timed rounds.
    per_s: f64,
    /// CPU of the whole process per envelope over the timed rounds, in µs.
    cpu_us: Option<f64>,
    latency: Summary,
    failures: Failures,
}

/// Warm-up, then [`TIMED_ROUNDS`] timed rounds.
async fn deposit_run(
    clients: &[&Network],
    relay: (PeerId, [u8; 32]),
    targets: &Arc<Targets>,
    first_round: u64,
    per_sender: usize,
    in_flight: usize,
    batch: Option<usize>,
) -> anyhow::Result<DepositFigures> {
    let warm_per_sender = (per_sender / 3).max(10);
    let warm = deposit_round(clients, relay, targets, first_round, warm_per_sender, in_flight, batch).await?;
    let mut failures = warm.failures;
    let mut rounds_per_s = Vec::new();
    let mut latencies = Vec::new();
    let mut cpu_s = Some(0.0);
    for r in 0..TIMED_ROUNDS as u64 {
        let round = deposit_round(
            clients,
            relay,
            targets,
            first_round + 1 + r,
            per_sender,
            in_flight,
            batch,
        )
        .await?;
        rounds_per_s.push(round.per_s);
        cpu_s = cpu_s.zip(round.cpu_s).map(|(a, b)| a + b);
        latencies.extend(round.latencies);
        failures.add(&round.failures);
    }
    Ok(DepositFigures {
        senders: clients.len(),
        in_flight,
        batch,
        per_round: clients.len() * per_sender,
        sent: clients.len() * (warm_per_sender + TIMED_ROUNDS * per_sender),
        per_s: median(&rounds_per_s),
        cpu_us: cpu_s.map(|c| c * 1e6 / (TIMED_ROUNDS * clients.len() * per_sender) as f64),
        rounds_per_s,
        latency: Summary::of(latencies),
        failures,
    })
}

struct Deposits {
    many: DepositFigures,
    /// The same senders with `DepositBatch` requests.
    batched: Option<DepositFigures>,
    single: Option<DepositFigures>,
    /// Deposits the relay counted as stored (its `deposits{result="ok"}` metric).
    relay_ok: u64,
    /// Receipts the senders got.
    receipts: u64,
    /// Envelopes in the relay's database at the end.
    stored: u64,
}

impl Deposits {
    fn runs(&self) -> impl Iterator<Item = &DepositFigures> {
        std::iter::once(&self.many)
            .chain(self.batched.as_ref())
            .chain(self.single.as_ref())
    }

    fn failures(&self) -> u64 {
        self.runs().map(|d| d.failures.total()).sum()
    }
}

async fn deposits(dir: &Path, counts: &Counts) -> anyhow::Result<Deposits> {
    // Quotas out of the way: this measures throughput, not refusals.
    let limits = MailboxLimits {
        inbox_max_envelopes: u64::MAX,
        inbox_max_bytes: u64::MAX,
        sender_max_envelopes: u64::MAX,
        sender_max_bytes: u64::MAX,
        ..MailboxLimits::default()
    };
    let relay = start_relay_with(
        dir,
        Vec::new(),
        RelayTestOptions {
            limits,
            ..RelayTestOptions::default()
        },
    )
    .await
    .context("cannot start the relay")?;
    let addr = tcp_addr(relay.listen_addrs())?;
    let relay_peer = relay.handle().peer_id();
    let relay_key = key_of_peer(&relay_peer).context("the relay's PeerId holds no Ed25519 key")?;
    let expires = Clock::system().now_ms() + 24 * 3600 * 1000;
    let owners: Vec<Owner> = (0..counts.senders.max(1) as u64).map(Owner::new).collect();
    let caps = owners.iter().map(|o| o.capability(expires)).collect();
    let targets = Arc::new(Targets { owners, caps });

    let mut clients = Vec::with_capacity(counts.senders);
    for _ in 0..counts.senders {
        clients.push(Client::start(&addr).await?);
    }
    let nets: Vec<&Network> = clients.iter().map(|c| &c.net).collect();
    let result = async {
        let many = deposit_run(
            &nets,
            (relay_peer, relay_key),
            &targets,
            0,
            counts.deposits,
            counts.in_flight,
            None,
        )
        .await?;
        let batched = if counts.batch > 0 {
            Some(
                deposit_run(
                    &nets,
                    (relay_peer, relay_key),
                    &targets,
                    20,
                    counts.deposits,
                    counts.in_flight,
                    Some(counts.batch),
                )
                .await?,
            )
        } else {
            None
        };
        let single = if counts.single > 0 {
            Some(
                deposit_run(
                    &nets[..1],
                    (relay_peer, relay_key),
                    &targets,
                    10,
                    counts.single,
                    counts.in_flight,
                    None,
                )
                .await?,
            )
        } else {
            None
        };
        anyhow::Ok((many, batched, single))
    }
    .await;
    close_all(clients).await;
    let (many, batched, single) = result?;
    let runs = || std::iter::once(&many).chain(batched.as_ref()).chain(single.as_ref());
    let total: u64 = runs().map(|d| d.sent as u64).sum();
    let failed: u64 = runs().map(|d| d.failures.total()).sum();
    let metrics = relay.relay_metrics().context("a relay has metrics")?;
    let relay_ok = metrics
        .deposits
        .get(&vec![("result".to_owned(), "ok".to_owned())])
        .map_or(0, |c| c.get());
    let stored = relay
        .relay_mailboxes()
        .context("a relay has mailboxes")?
        .stats()?
        .envelopes;
    drop(metrics);
    relay.shutdown().await;
    Ok(Deposits {
        many,
        batched,
        single,
        relay_ok,
        receipts: total - failed,
        stored,
    })
}

// ------------------------------------------------- 2 + 3. reconnect drain

/// One offline period: alice queues `messages`, bob comes back.
struct Offline {
    messages: usize,
    /// Alice's sends until every message is in the relay's custody (setup).
    custody_s: f64,
    /// Messages with a custody receipt in alice's store.
    with_receipt: usize,
    /// From bob's restart until `Node::start` returned.
    start_s: f64,
    /// Until the first message event.
    first_display_s: f64,
    /// Until the last message event.
    display_s: f64,
    /// Until all are in bob's store (committed).
    durable_s: f64,
    durable_per_s: f64,
    /// From the restart to each message's event, ms.
    per_message_ms: Vec<f64>,
    /// The event stream lagged; completion was read from the store.
    counted_from_store: bool,
    /// Bob's history holds each message exactly once.
    exactly_once: bool,
}

struct Reconnect {
    drain: Offline,
    drain_latency: Summary,
    small: Vec<Offline>,
    small_latency: Option<Summary>,
}

/// Alice and bob with the relay as their home relay, and a conversation.
struct People {
    relay_addr: Multiaddr,
    alice_node: Node,
    alice: NodeHandle,
    /// None only while bob is away.
    bob_node: Option<Node>,
    bob_dir: PathBuf,
    bob_account: [u8; 32],
}

async fn start_bob(dir: &Path, relay_addr: &Multiaddr) -> anyhow::Result<Node> {
    start_node_with_relays(dir, "bob", vec![relay_addr.clone()], vec![relay_addr.clone()]).await
}

fn message_text(i: usize) -> String {
    let mut s = format!("queued message {i:010} ");
    while s.len() < MESSAGE_BYTES {
        s.push('.');
    }
    s
}

/// Sends `n` messages with [`CONCURRENT_SENDS`] in flight; returns their ids.
async fn send_many(alice: &NodeHandle, to: [u8; 32], n: usize, offset: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0usize;
    while ids.len() < n {
        while next < n && in_flight.len() < CONCURRENT_SENDS {
            let (h, text) = (alice.clone(), message_text(offset + next));
            in_flight.push(async move { h.send_to(to, &text).await });
            next += 1;
        }
        match in_flight.next().await {
            Some(r) => ids.push(r.context("send failed")?.id),
            None => break,
        }
    }
    Ok(ids)
}

/// Stops bob, has alice queue `n` messages into his mailbox, restarts bob and
/// times the drain.
async fn offline(p: &mut People, n: usize, offset: usize) -> anyhow::Result<Offline> {
    let bob_node = p.bob_node.take().context("bob is not running")?;
    let baseline = bob_node.handle().store().message_count()?;
    bob_node.shutdown().await;

    let t_send = Instant::now();
    let ids = send_many(&p.alice, p.bob_account, n, offset).await?;
    let deadline = Instant::now() + STEP_TIMEOUT + Duration::from_millis(n as u64 * 5);
    while p.alice.store().outbox_len()? > 0 {
        if Instant::now() > deadline {
            bail!(
                "alice's outbox still holds {} envelopes: the relay did not sign for every message",
                p.alice.store().outbox_len()?
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let custody_s = t_send.elapsed().as_secs_f64();
    let mut with_receipt = 0;
    for id in &ids {
        let key: [u8; 16] = hex::decode(id)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("a message id is not 16 bytes"))?;
        if !p.alice.store().receipts(&key)?.is_empty() {
            with_receipt += 1;
        }
    }

    let expected: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let bob_node = start_bob(&p.bob_dir, &p.relay_addr).await?;
    let bob = bob_node.handle();
    let mut rx = bob.subscribe();
    let start_s = t0.elapsed().as_secs_f64();
    p.bob_node = Some(bob_node);

    let mut seen: HashMap<String, f64> = HashMap::with_capacity(n);
    let mut counted_from_store = false;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT + Duration::from_millis(n as u64);
    while seen.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => bail!("bob displayed {} of {n} queued messages in time", seen.len()),
            Ok(Ok(NodeEvent::Message(m))) if expected.contains(m.id.as_str()) => {
                seen.entry(m.id).or_insert_with(|| ms(t0.elapsed()));
            }
            Ok(Ok(_)) => {}
            Ok(Err(RecvError::Lagged(_))) => {
                counted_from_store = true;
                break;
            }
            Ok(Err(RecvError::Closed)) => bail!("bob's event stream closed"),
        }
    }
    let display_s = if counted_from_store {
        f64::NAN
    } else {
        t0.elapsed().as_secs_f64()
    };
    // Messages are shown before the commit of their batch; the store follows.
    let target = baseline + n as u64;
    let durable_s = loop {
        if bob.store().message_count()? >= target {
            break t0.elapsed().as_secs_f64();
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "bob's store holds {} of {target} messages",
                bob.store().message_count()?
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let history = bob.history(&p.alice.account().to_base58())?;
    let queued_rows = history.iter().filter(|m| expected.contains(m.id.as_str())).count();
    let distinct: HashSet<&str> = history.iter().map(|m| m.id.as_str()).collect();
    let exactly_once = queued_rows == n && distinct.len() == history.len() && history.len() as u64 == target;

    let mut per_message_ms: Vec<f64> = seen.into_values().collect();
    per_message_ms.sort_by(f64::total_cmp);
    Ok(Offline {
        messages: n,
        custody_s,
        with_receipt,
        start_s,
        first_display_s: per_message_ms.first().map_or(f64::NAN, |v| v / 1000.0),
        display_s,
        durable_s,
        durable_per_s: n as f64 / durable_s,
        per_message_ms,
        counted_from_store,
        exactly_once,
    })
}

async fn reconnect(dir: &Path, counts: &Counts) -> anyhow::Result<Reconnect> {
    // The default per-sender quota (1,000 per inbox) would refuse most of the queue.
    let limits = MailboxLimits {
        inbox_max_envelopes: u64::MAX,
        inbox_max_bytes: u64::MAX,
        sender_max_envelopes: u64::MAX,
        sender_max_bytes: u64::MAX,
        ..MailboxLimits::default()
    };
    let relay = start_relay_with(
        &dir.join("relay"),
        Vec::new(),
        RelayTestOptions {
            limits,
            ..RelayTestOptions::default()
        },
    )
    .await
    .context("cannot start the relay")?;
    let relay_addr = tcp_addr(relay.listen_addrs())?;
    let alice_node = start_node_with_relays(
        &dir.join("alice"),
        "alice",
        vec![relay_addr.clone()],
        vec![relay_addr.clone()],
    )
    .await
    .context("cannot start alice's node")?;
    let bob_dir = dir.join("bob");
    let bob_node = start_bob(&bob_dir, &relay_addr)
        .await
        .context("cannot start bob's node")?;
    let (alice, bob) = (alice_node.handle(), bob_node.handle());
    alice.add_contact(&bob.card().to_uri(), None).await?;
    bob.add_contact(&alice.card().to_uri(), None).await?;
    let bob_account = *bob.account().as_bytes();
    retry_until(STEP_TIMEOUT, || alice.start_conversation(bob_account))
        .await
        .context("alice could not start a conversation with bob")?;
    let mut rx = bob.subscribe();
    let hello = alice.send_to(bob_account, "hello").await?.id;
    crate::demo::wait_event(&mut rx, STEP_TIMEOUT, |ev| match ev {
        NodeEvent::Message(m) if m.id == hello => Some(()),
        _ => None,
    })
    .await
    .context("bob never got the first message")?;
    // Shown before its commit: wait for the commit too, so that counts start right.
    let deadline = Instant::now() + STEP_TIMEOUT;
    while bob.store().message_count()? < 1 {
        if Instant::now() > deadline {
            bail!("bob never stored the first message");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop((bob, rx));
    let mut people = People {
        relay_addr,
        alice_node,
        alice,
        bob_node: Some(bob_node),
        bob_dir,
        bob_account,
    };

    let result = async {
        let drain = offline(&mut people, counts.drain, 0).await?;
        let mut small = Vec::new();
        for r in 0..counts.small_runs {
            small.push(offline(&mut people, counts.small, counts.drain + r * counts.small).await?);
        }
        anyhow::Ok((drain, small))
    }
    .await;
    let People {
        alice_node,
        alice,
        bob_node,
        ..
    } = people;
    drop(alice);
    if let Some(b) = bob_node {
        b.shutdown().await;
    }
    alice_node.shutdown().await;
    relay.shutdown().await;
    let (drain, small) = result?;
    let small_latency =
        (!small.is_empty()).then(|| Summary::of(small.iter().flat_map(|s| s.per_message_ms.clone()).collect()));
    Ok(Reconnect {
        drain_latency: Summary::of(drain.per_message_ms.clone()),
        drain,
        small,
        small_latency,
    })
}

// --------------------------------------------------------------- 4. memory

/// One `tidings relay` child over the filled database.
struct MemoryRun {
    /// What the run changes (e.g. the cache setting).
    label: String,
    /// `--set` overrides passed to the relay.
    sets: Vec<String>,
    after_start_mb: Option<f64>,
    after_fetches_mb: Option<f64>,
    fetches: usize,
    after_all_owners_mb: Option<f64>,
    with_clients_mb: Option<f64>,
    clients: usize,
    peak_mb: Option<f64>,
    fetch_failures: u64,
    envelopes_fetched: u64,
    all_owners_s: f64,
    clients_connected: usize,
}

struct Memory {
    inboxes: usize,
    per_inbox: usize,
    fill_s: f64,
    file_mb: f64,
    runs: Vec<MemoryRun>,
}

/// Fills `mailboxes.redb` in `dir` directly, in write transactions of
/// [`FILL_INBOXES_PER_BATCH`] inboxes, like the relay's own deposit batches.
fn fill(dir: &Path, owners: &[Owner], per_inbox: usize) -> anyhow::Result<()> {
    let mailboxes = Mailboxes::open(&dir.join("mailboxes.redb"), MailboxLimits::default())?;
    let now = Clock::system().now_ms();
    for (b, chunk) in owners.chunks(FILL_INBOXES_PER_BATCH).enumerate() {
        let mut batch = Vec::with_capacity(chunk.len() * per_inbox);
        for (i, o) in chunk.iter().enumerate() {
            for j in 0..per_inbox {
                let sender = [(j % 16) as u8; 32];
                let tag = ((b * FILL_INBOXES_PER_BATCH + i) as u64) << 24 | j as u64;
                batch.push(DepositRequest {
                    inbox: o.inbox,
                    request_inbox: false,
                    sender,
                    envelope: envelope(tag, ENVELOPE_BYTES),
                });
            }
        }
        let out = mailboxes.deposit_batch(&batch, now)?;
        if let Some(e) = out.iter().find_map(|r| r.err()) {
            bail!("filling the mailboxes: a deposit was refused ({e})");
        }
    }
    let stats = mailboxes.stats()?;
    if stats.envelopes != (owners.len() * per_inbox) as u64 {
        bail!("the filled database holds {} envelopes", stats.envelopes);
    }
    Ok(())
}

/// Starts `tidings relay` on `dir`; returns it, its address and its log file.
async fn start_relay_child(
    exe: &Path,
    dir: &Path,
    sets: &[String],
    log: &Path,
) -> anyhow::Result<(tokio::process::Child, Multiaddr)> {
    let log = std::fs::File::create(log)?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["relay", "--listen", "/ip4/127.0.0.1/tcp/0", "--metrics", "off"]);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut lines = BufReader::new(stdout).lines();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(a) = line.strip_prefix("listening on ")
                && let Ok(addr) = a.trim().parse::<Multiaddr>()
                && addr.iter().any(|p| matches!(p, Protocol::Tcp(_)))
            {
                return anyhow::Ok(addr);
            }
        }
        bail!("`tidings relay` exited before listening")
    };
    let addr = match tokio::time::timeout(STEP_TIMEOUT, wait).await {
        Ok(r) => r?,
        Err(_) => bail!("`tidings relay` did not listen within {STEP_TIMEOUT:?}"),
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

/// Owner fetches of `owners` through a few raw clients. Returns (envelopes
/// fetched, failures).
async fn fetch_owners(clients: &[Client], relay: PeerId, owners: &[Owner], per_inbox: usize) -> (u64, u64) {
    let per_client = owners.len().div_ceil(clients.len().max(1));
    let tasks = clients.iter().zip(owners.chunks(per_client.max(1))).map(|(c, chunk)| {
        let net = c.net.clone();
        async move {
            let (mut fetched, mut failed) = (0u64, 0u64);
            let mut pending = FuturesUnordered::new();
            let mut it = chunk.iter();
            loop {
                while pending.len() < FETCH_IN_FLIGHT {
                    let Some(o) = it.next() else { break };
                    let req = o.fetch(relay, Clock::system().now_ms());
                    let net = net.clone();
                    pending.push(async move { net.mailbox(relay, req).await });
                }
                let Some(r) = pending.next().await else { break };
                match r {
                    Ok(pb::MailboxResponse {
                        status,
                        result: Some(mailbox_response::Result::Fetched(f)),
                        ..
                    }) if status == pb::MailboxStatus::Ok as i32 && f.envelopes.len() == per_inbox => {
                        fetched += f.envelopes.len() as u64;
                    }
                    _ => failed += 1,
                }
            }
            (fetched, failed)
        }
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

async fn memory_run(
    exe: &Path,
    dir: &Path,
    owners: &[Owner],
    counts: &Counts,
    label: &str,
    sets: Vec<String>,
    log: &Path,
) -> anyhow::Result<MemoryRun> {
    let (mut child, addr) = start_relay_child(exe, dir, &sets, log).await?;
    let pid = child.id().context("the relay has no pid")?;
    let relay = peer_of(&addr)?;
    let mut run = MemoryRun {
        label: label.to_owned(),
        sets,
        after_start_mb: None,
        after_fetches_mb: None,
        fetches: counts.fetches.min(owners.len()),
        after_all_owners_mb: None,
        with_clients_mb: None,
        clients: counts.clients,
        peak_mb: None,
        fetch_failures: 0,
        envelopes_fetched: 0,
        all_owners_s: f64::NAN,
        clients_connected: 0,
    };
    let result = async {
        tokio::time::sleep(SETTLE).await;
        run.after_start_mb = rss_and_peak_mb(pid).0;
        println!(
            "    {label}: {:.1} MB after start",
            run.after_start_mb.unwrap_or(f64::NAN)
        );

        let mut fetchers = Vec::new();
        for _ in 0..FETCH_CLIENTS {
            fetchers.push(Client::start(&addr).await?);
        }
        let (fetched, failed) = fetch_owners(&fetchers, relay, &owners[..run.fetches], counts.per_inbox).await;
        run.envelopes_fetched += fetched;
        run.fetch_failures += failed;
        tokio::time::sleep(SETTLE).await;
        run.after_fetches_mb = rss_and_peak_mb(pid).0;
        println!(
            "    {label}: {:.1} MB after {} owner fetches",
            run.after_fetches_mb.unwrap_or(f64::NAN),
            run.fetches
        );

        let t0 = Instant::now();
        let (fetched, failed) = fetch_owners(&fetchers, relay, &owners[run.fetches..], counts.per_inbox).await;
        run.all_owners_s = t0.elapsed().as_secs_f64();
        run.envelopes_fetched += fetched;
        run.fetch_failures += failed;
        close_all(fetchers).await;
        tokio::time::sleep(SETTLE).await;
        run.after_all_owners_mb = rss_and_peak_mb(pid).0;
        println!(
            "    {label}: {:.1} MB after every owner fetched once ({:.1} s)",
            run.after_all_owners_mb.unwrap_or(f64::NAN),
            run.all_owners_s
        );

        if counts.clients > 0 {
            let mut clients = Vec::with_capacity(counts.clients);
            for _ in 0..counts.clients {
                clients.push(Client::start(&addr).await?);
            }
            let deadline = Instant::now() + STEP_TIMEOUT;
            loop {
                let mut connected = 0;
                for c in &clients {
                    if c.net.is_connected(relay).await {
                        connected += 1;
                    }
                }
                run.clients_connected = connected;
                if connected == clients.len() || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(SETTLE).await;
            run.with_clients_mb = rss_and_peak_mb(pid).0;
            println!(
                "    {label}: {:.1} MB with {} of {} clients connected",
                run.with_clients_mb.unwrap_or(f64::NAN),
                run.clients_connected,
                counts.clients
            );
            close_all(clients).await;
        }
        run.peak_mb = rss_and_peak_mb(pid).1;
        anyhow::Ok(())
    }
    .await;
    stop_child(&mut child).await?;
    result?;
    Ok(run)
}

async fn memory(exe: &Path, dir: &Path, counts: &Counts) -> anyhow::Result<Memory> {
    std::fs::create_dir_all(dir)?;
    let owners: Vec<Owner> = (0..counts.inboxes as u64).map(|i| Owner::new(1_000_000 + i)).collect();
    let owners = Arc::new(owners);
    let t0 = Instant::now();
    let (d, o, per_inbox) = (dir.to_owned(), owners.clone(), counts.per_inbox);
    tokio::task::spawn_blocking(move || fill(&d, &o, per_inbox))
        .await
        .context("filling the mailboxes panicked")??;
    let fill_s = t0.elapsed().as_secs_f64();
    let file_mb = std::fs::metadata(dir.join("mailboxes.redb"))?.len() as f64 / 1e6;
    println!("    filled in {fill_s:.1} s; mailboxes.redb is {file_mb:.0} MB");

    // The relay's default page cache, then redb's own default (what relays
    // used before `mailbox.cache_bytes` existed).
    let default_mib = DEFAULT_CACHE_BYTES / (1024 * 1024);
    let configs = [
        (format!("cache {default_mib} MiB (default)"), Vec::new()),
        (
            "cache 1 GiB (redb default)".to_owned(),
            vec![format!("mailbox.cache_bytes={}", 1u64 << 30)],
        ),
    ];
    let mut runs = Vec::new();
    for (label, sets) in configs {
        let label = label.as_str();
        let log = dir.join(format!("relay-{}.log", runs.len()));
        runs.push(memory_run(exe, dir, &owners, counts, label, sets, &log).await?);
    }
    Ok(Memory {
        inboxes: counts.inboxes,
        per_inbox: counts.per_inbox,
        fill_s,
        file_mb,
        runs,
    })
}

// ------------------------------------------------------------------ report

#[derive(Default)]
struct Report {
    deposits: Option<Deposits>,
    reconnect: Option<Reconnect>,
    memory: Option<Memory>,
}

fn opt(v: Option<f64>) -> f64 {
    v.unwrap_or(f64::NAN)
}

impl Report {
    fn rows(&self, counts: &Counts) -> Vec<Row> {
        let mut rows = Vec::new();
        if let Some(d) = &self.deposits {
            let m = &d.many;
            rows.push(Row::new(
                format!(
                    "[1] deposits of 1 KiB, {} senders × {} in flight (median of {TIMED_ROUNDS})",
                    m.senders, m.in_flight
                ),
                m.per_s,
                "env/s",
                0,
                Target::AtLeast(TARGET_DEPOSITS_PER_S),
            ));
            rows.push(Row::new(
                format!("[1] deposit latency p50, {} senders", m.senders),
                m.latency.p50,
                "ms",
                2,
                Target::None,
            ));
            rows.push(Row::new(
                format!("[1] deposit latency p99, {} senders", m.senders),
                m.latency.p99,
                "ms",
                2,
                Target::None,
            ));
            if let Some(b) = &d.batched {
                let per = b.batch.unwrap_or(1);
                rows.push(Row::new(
                    format!(
                        "[1] deposits of 1 KiB in batches of {per}, {} senders × {} in flight (median of {TIMED_ROUNDS})",
                        b.senders, b.in_flight
                    ),
                    b.per_s,
                    "env/s",
                    0,
                    Target::AtLeast(TARGET_DEPOSITS_PER_S),
                ));
                rows.push(Row::new(
                    format!("[1] batch of {per} latency p50, {} senders", b.senders),
                    b.latency.p50,
                    "ms",
                    2,
                    Target::None,
                ));
                rows.push(Row::new(
                    format!("[1] batch of {per} latency p99, {} senders", b.senders),
                    b.latency.p99,
                    "ms",
                    2,
                    Target::None,
                ));
            }
            if let Some(s) = &d.single {
                rows.push(Row::new(
                    format!("[1] deposits, 1 sender × {} in flight (reference)", s.in_flight),
                    s.per_s,
                    "env/s",
                    0,
                    Target::None,
                ));
                rows.push(Row::new(
                    "[1] deposit latency p50 / 1 sender",
                    s.latency.p50,
                    "ms",
                    2,
                    Target::None,
                ));
                rows.push(Row::new(
                    "[1] deposit latency p99 / 1 sender",
                    s.latency.p99,
                    "ms",
                    2,
                    Target::None,
                ));
            }
            rows.push(Row::new(
                "[1] deposits without a valid receipt",
                d.failures() as f64,
                "",
                0,
                Target::AtMost(0.0),
            ));
        }
        if let Some(r) = &self.reconnect {
            let d = &r.drain;
            rows.push(Row::new(
                format!("[2] drain {}: restart → all in bob's store", d.messages),
                d.durable_s,
                "s",
                3,
                Target::AtMost(TARGET_DRAIN_S),
            ));
            rows.push(Row::new(
                format!("[2] drain {}: rate", d.messages),
                d.durable_per_s,
                "msg/s",
                0,
                Target::None,
            ));
            rows.push(Row::new(
                format!("[2] drain {}: restart → all displayed", d.messages),
                d.display_s,
                "s",
                3,
                Target::None,
            ));
            rows.push(Row::new(
                format!("[2] drain {}: restart → first displayed", d.messages),
                d.first_display_s,
                "s",
                3,
                Target::None,
            ));
            rows.push(Row::new(
                format!("[3] restart → displayed p50, drain of {}", d.messages),
                r.drain_latency.p50,
                "ms",
                1,
                Target::None,
            ));
            rows.push(Row::new(
                format!("[3] restart → displayed p99, drain of {}", d.messages),
                r.drain_latency.p99,
                "ms",
                1,
                Target::None,
            ));
            if let Some(s) = &r.small_latency {
                let label = format!("{} × {}", r.small.len(), counts.small);
                rows.push(Row::new(
                    format!("[3] restart → displayed p50, {label}"),
                    s.p50,
                    "ms",
                    1,
                    Target::None,
                ));
                rows.push(Row::new(
                    format!("[3] restart → displayed p99, {label}"),
                    s.p99,
                    "ms",
                    1,
                    Target::None,
                ));
                let drains: Vec<f64> = r.small.iter().map(|s| s.durable_s).collect();
                rows.push(Row::new(
                    format!(
                        "[3] restart → all {} in store (median of {})",
                        counts.small,
                        r.small.len()
                    ),
                    median(&drains),
                    "s",
                    3,
                    Target::None,
                ));
            }
        }
        if let Some(m) = &self.memory {
            for run in &m.runs {
                let holding = format!("{}×{}", m.inboxes, m.per_inbox);
                let at = |what: &str| format!("[4] relay RSS, {holding}, {}: {what}", run.label);
                let t = Target::AtMost(TARGET_RSS_MB);
                rows.push(Row::new(at("after start"), opt(run.after_start_mb), "MB", 1, t));
                rows.push(Row::new(
                    at(&format!("after {} fetches", run.fetches)),
                    opt(run.after_fetches_mb),
                    "MB",
                    1,
                    t,
                ));
                rows.push(Row::new(
                    at("every owner fetched"),
                    opt(run.after_all_owners_mb),
                    "MB",
                    1,
                    t,
                ));
                if run.clients > 0 {
                    rows.push(Row::new(
                        at(&format!("+{} clients", run.clients_connected)),
                        opt(run.with_clients_mb),
                        "MB",
                        1,
                        t,
                    ));
                }
            }
        }
        rows
    }

    fn print_notes(&self) {
        if let Some(d) = &self.deposits {
            let f = d.runs().fold(Failures::default(), |mut f, r| {
                f.add(&r.failures);
                f
            });
            let cpu: Vec<String> = d
                .runs()
                .map(|r| {
                    format!(
                        "{} × {}{}: {:.0} µs",
                        r.senders,
                        r.in_flight,
                        r.batch.map_or(String::new(), |b| format!(" × batches of {b}")),
                        opt(r.cpu_us)
                    )
                })
                .collect();
            println!(
                "[1] CPU of the whole process (relay and clients, both cores) per envelope: {}",
                cpu.join("; ")
            );
            println!(
                "[1] every receipt checked against what was sent; {} signatures verified; relay stored {} (metric) / {} (database), senders hold {} receipts{}",
                f.signatures_checked,
                d.relay_ok,
                d.stored,
                d.receipts,
                if f.total() > 0 {
                    format!("; failures: {}", f.json())
                } else {
                    String::new()
                }
            );
        }
        if let Some(r) = &self.reconnect {
            let all = std::iter::once(&r.drain).chain(&r.small);
            let bad: Vec<String> = all
                .filter(|o| !o.exactly_once || o.with_receipt != o.messages || o.counted_from_store)
                .map(|o| {
                    format!(
                        "{} messages: exactly once {}, receipts {}, events lagged {}",
                        o.messages, o.exactly_once, o.with_receipt, o.counted_from_store
                    )
                })
                .collect();
            println!(
                "[2] setup (not timed): alice's {} sends reached the relay's custody in {:.1} s ({:.0} msg/s), each with a verified receipt",
                r.drain.messages,
                r.drain.custody_s,
                r.drain.messages as f64 / r.drain.custody_s
            );
            println!(
                "[2] bob's Node::start took {:.1} ms; history checked exactly once after every run{}",
                r.drain.start_s * 1000.0,
                if bad.is_empty() {
                    String::new()
                } else {
                    format!(" — PROBLEMS: {}", bad.join("; "))
                }
            );
        }
        if let Some(m) = &self.memory {
            println!(
                "[4] {} inboxes × {} envelopes of {ENVELOPE_BYTES} B written with Mailboxes::deposit_batch ({} inboxes per durable commit) in {:.1} s; mailboxes.redb {:.0} MB",
                m.inboxes, m.per_inbox, FILL_INBOXES_PER_BATCH, m.fill_s, m.file_mb
            );
            for run in &m.runs {
                println!(
                    "[4] {}: `tidings relay` child{}; {} envelopes fetched by owners over the network, {} failed fetches; peak RSS {:.1} MB",
                    run.label,
                    if run.sets.is_empty() {
                        String::new()
                    } else {
                        format!(" with --set {}", run.sets.join(" --set "))
                    },
                    run.envelopes_fetched,
                    run.fetch_failures,
                    opt(run.peak_mb)
                );
            }
        }
    }

    fn to_json(&self, machine: &Machine, counts: &Counts) -> serde_json::Value {
        use serde_json::json;
        let mut v = json!({
            "machine": {
                "cpu": machine.cpu,
                "cores": machine.cores,
                "memory_total_mb": machine.mem_total_mb,
                "kernel": machine.kernel,
                "load_average": machine.load,
                "durable_commit_ms": { "median": machine.commit_ms, "min": machine.commit_min_ms },
                "release_build": !cfg!(debug_assertions),
            },
            "counts": {
                "senders": counts.senders,
                "deposits_per_sender_per_round": counts.deposits,
                "in_flight_per_sender": counts.in_flight,
                "deposits_per_batch": counts.batch,
                "single_sender_deposits_per_round": counts.single,
                "timed_rounds": TIMED_ROUNDS,
                "envelope_bytes": ENVELOPE_BYTES,
                "drain_messages": counts.drain,
                "small_messages": counts.small,
                "small_runs": counts.small_runs,
                "message_bytes": MESSAGE_BYTES,
                "inboxes": counts.inboxes,
                "envelopes_per_inbox": counts.per_inbox,
                "owner_fetches": counts.fetches,
                "clients": counts.clients,
            },
        });
        let dep = |d: &DepositFigures| {
            json!({
                "senders": d.senders,
                "in_flight": d.in_flight,
                "deposits_per_request": d.batch.unwrap_or(1),
                "deposits_per_round": d.per_round,
                "deposits_sent": d.sent,
                "rounds_per_s": d.rounds_per_s,
                "per_s": d.per_s,
                "cpu_us_per_envelope": d.cpu_us,
                "latency_ms": d.latency.json(),
                "failures": d.failures.json(),
            })
        };
        if let Some(d) = &self.deposits {
            v["deposits"] = json!({
                "many": dep(&d.many),
                "batched": d.batched.as_ref().map(dep),
                "single": d.single.as_ref().map(dep),
                "relay_ok_metric": d.relay_ok,
                "relay_stored": d.stored,
                "receipts": d.receipts,
                "targets": {
                    "per_s": Target::AtLeast(TARGET_DEPOSITS_PER_S).json(d.many.per_s),
                    "batched_per_s": d.batched.as_ref().map(|b| Target::AtLeast(TARGET_DEPOSITS_PER_S).json(b.per_s)),
                },
            });
        }
        let off = |o: &Offline| {
            json!({
                "messages": o.messages,
                "custody_seconds": o.custody_s,
                "with_receipt": o.with_receipt,
                "node_start_seconds": o.start_s,
                "first_display_seconds": o.first_display_s,
                "display_seconds": o.display_s,
                "durable_seconds": o.durable_s,
                "durable_per_s": o.durable_per_s,
                "counted_from_store": o.counted_from_store,
                "exactly_once": o.exactly_once,
            })
        };
        if let Some(r) = &self.reconnect {
            v["reconnect"] = json!({
                "drain": off(&r.drain),
                "drain_latency_ms": r.drain_latency.json(),
                "small": r.small.iter().map(off).collect::<Vec<_>>(),
                "small_latency_ms": r.small_latency.as_ref().map(Summary::json),
                "targets": {
                    "drain_seconds": Target::AtMost(TARGET_DRAIN_S).json(r.drain.durable_s),
                },
            });
        }
        if let Some(m) = &self.memory {
            v["memory"] = json!({
                "inboxes": m.inboxes,
                "envelopes_per_inbox": m.per_inbox,
                "filled_with": "Mailboxes::deposit_batch",
                "fill_seconds": m.fill_s,
                "file_mb": m.file_mb,
                "runs": m.runs.iter().map(|r| json!({
                    "label": r.label,
                    "set": r.sets,
                    "rss_mb": {
                        "after_start": r.after_start_mb,
                        "after_fetches": r.after_fetches_mb,
                        "after_every_owner": r.after_all_owners_mb,
                        "with_clients": r.with_clients_mb,
                        "peak": r.peak_mb,
                    },
                    "fetches": r.fetches,
                    "every_owner_seconds": r.all_owners_s,
                    "envelopes_fetched": r.envelopes_fetched,
                    "fetch_failures": r.fetch_failures,
                    "clients": r.clients,
                    "clients_connected": r.clients_connected,
                    "targets": {
                        "rss_mb": Target::AtMost(TARGET_RSS_MB).json(
                            [r.after_start_mb, r.after_fetches_mb, r.after_all_owners_mb, r.with_clients_mb]
                                .into_iter()
                                .flatten()
                                .fold(f64::NAN, f64::max)
                        ),
                    },
                })).collect::<Vec<_>>(),
            });
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_have_the_requested_size_and_decode() {
        for tag in [0, 1 << 40, u64::MAX] {
            let e = envelope(tag, ENVELOPE_BYTES);
            assert_eq!(e.len(), ENVELOPE_BYTES);
            let d = pb::Envelope::decode(e.as_slice()).unwrap();
            assert_eq!(d.id.len(), 16);
        }
        assert_eq!(envelope(7, 300).len(), 300);
    }

    #[test]
    fn a_good_receipt_passes_and_a_wrong_one_is_counted() {
        let relay_seed = [3u8; 32];
        let relay_key = DeviceKey::from_seed(relay_seed).public();
        let owner = Owner::new(1);
        let env = envelope(1, 512);
        let receipt = |hash| {
            mb::sign_receipt(
                &relay_seed,
                &mb::Receipt {
                    relay_key: [0; 32],
                    inbox_id: owner.inbox,
                    request_inbox: false,
                    envelope_hash: hash,
                    index: 1,
                    accepted_ms: 1,
                    keep_until_ms: 2,
                },
            )
        };
        let ok = |r| pb::MailboxResponse {
            status: pb::MailboxStatus::Ok as i32,
            detail: String::new(),
            result: Some(mailbox_response::Result::Receipt(r)),
        };
        let mut f = Failures::default();
        check_receipt(
            Ok(ok(receipt(mb::envelope_hash(&env)))),
            &owner.inbox,
            &env,
            &relay_key,
            true,
            &mut f,
        );
        assert_eq!((f.total(), f.signatures_checked), (0, 1));
        check_receipt(Ok(ok(receipt([0; 32]))), &owner.inbox, &env, &relay_key, true, &mut f);
        assert_eq!(f.bad_receipt, 1);
        let refused = pb::MailboxResponse {
            status: pb::MailboxStatus::QuotaExceeded as i32,
            detail: String::new(),
            result: None,
        };
        check_receipt(Ok(refused), &owner.inbox, &env, &relay_key, false, &mut f);
        assert_eq!(f.refused.get("quota_exceeded"), Some(&1));
        assert_eq!(f.total(), 2);
    }

    #[test]
    fn batch_answers_are_checked_item_by_item() {
        let relay_seed = [3u8; 32];
        let relay_key = DeviceKey::from_seed(relay_seed).public();
        let owners: Vec<Owner> = (0..2).map(Owner::new).collect();
        let caps = owners.iter().map(|o| o.capability(10)).collect();
        let targets = Targets { owners, caps };
        let sent: Vec<Sent> = (0..3).map(|i| (i, i % 2, envelope(i as u64, 300))).collect();
        let item = |(_, t, env): &Sent, index| pb::DepositResult {
            status: pb::MailboxStatus::Ok as i32,
            receipt: Some(mb::sign_receipt(
                &relay_seed,
                &mb::Receipt {
                    relay_key: [0; 32],
                    inbox_id: targets.owners[*t].inbox,
                    request_inbox: false,
                    envelope_hash: mb::envelope_hash(env),
                    index,
                    accepted_ms: 1,
                    keep_until_ms: 2,
                },
            )),
        };
        let answer = |results| {
            Ok(pb::MailboxResponse {
                status: pb::MailboxStatus::Ok as i32,
                detail: String::new(),
                result: Some(mailbox_response::Result::DepositResults(pb::DepositResults { results })),
            })
        };
        let mut f = Failures::default();
        let good: Vec<_> = sent.iter().zip(1..).map(|(s, i)| item(s, i)).collect();
        check_batch(answer(good.clone()), &sent, &targets, &relay_key, 0, &mut f);
        assert_eq!((f.total(), f.signatures_checked), (0, 1));
        // A refused item, a receipt for another envelope, a missing item.
        let mut mixed = good.clone();
        mixed[0] = pb::DepositResult {
            status: pb::MailboxStatus::QuotaExceeded as i32,
            receipt: None,
        };
        mixed[1] = item(&sent[2], 2);
        check_batch(answer(mixed), &sent, &targets, &relay_key, 0, &mut f);
        assert_eq!((f.refused.get("quota_exceeded"), f.bad_receipt), (Some(&1), 1));
        check_batch(answer(good[..2].to_vec()), &sent, &targets, &relay_key, 0, &mut f);
        assert_eq!(f.bad_receipt, 4, "a short answer fails every item");
    }
}
