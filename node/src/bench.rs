//! `tidings bench`: latency, throughput, MLS cost, memory and start-up time.
//!
//! Everything runs on this machine, on loopback, with real redb files in a
//! temporary directory and durable commits on both sides:
//!
//! 1. latency to display: `send_to` on alice until bob emits the message event,
//!    one message at a time;
//! 2. latency to durable: `send_to` until alice emits `Delivered` (bob acks only
//!    after his durable commit), measured in the same run;
//! 3. sustained one-way throughput with many sends in flight;
//! 4. MLS encrypt + decrypt per message through [`MlsEngine`] and through raw
//!    openmls calls, interleaved, on in-memory stores;
//! 5. time from spawning `tidings run` until it prints "listening on", and the
//!    resident memory of an idle node.
//!
//! Nothing here asserts performance: it prints figures next to their targets.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::multiaddr::Protocol;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{MlsGroup, MlsMessageIn, ProcessedMessageContent};
use tidings_protocol::identity::DeviceCertificate;
use tidings_protocol::mls::{Incoming, MlsEngine, signature_keys_from_seed};
use tidings_store::Store;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::core::Provider;
use crate::demo::{retry_until, start_node};
use crate::types::NodeEvent;
use crate::{Clock, Node, NodeHandle};

/// Measure latency, throughput, MLS cost, memory and start-up time.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Messages in the latency run, sent one at a time after a warm-up [default: 2000; 0 skips].
    #[arg(long, value_name = "N")]
    pub messages: Option<usize>,
    /// Messages in the throughput run [default: 20000; 0 skips].
    #[arg(long, value_name = "M")]
    pub throughput: Option<usize>,
    /// Encrypt + decrypt rounds per MLS variant [default: 5000; 0 skips].
    #[arg(long, value_name = "K")]
    pub mls: Option<usize>,
    /// Start-ups of `tidings run` to time [default: 10; 0 skips start-up and memory].
    #[arg(long, value_name = "R")]
    pub startups: Option<usize>,
    /// Also write every figure to FILE as a JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Small counts for a smoke run (100 / 2000 / 300 / 2 unless given explicitly).
    #[arg(long)]
    pub quick: bool,
}

/// Sends kept in flight during the throughput run.
const CONCURRENT_SENDS: usize = 512;
/// MLS rounds per variant before switching to the other one.
const MLS_BLOCK: usize = 500;
/// Size of every benchmark message (text and MLS payload), in bytes.
const MESSAGE_BYTES: usize = 100;
/// Longest wait for one message of the latency run.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Durable commits timed to characterise the disk.
pub(crate) const COMMIT_PROBES: usize = 50;
const COMMIT_PROBES_WARMUP: usize = 20;
/// How long the measured node idles before its memory is read.
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(3);

const TARGET_DISPLAY_P50_MS: f64 = 0.5;
const TARGET_DISPLAY_P99_MS: f64 = 3.0;
const TARGET_DURABLE_P50_MS: f64 = 2.0;
const TARGET_DURABLE_P99_MS: f64 = 10.0;
const TARGET_THROUGHPUT: f64 = 15_000.0;
const TARGET_MLS_RATIO: f64 = 1.2;
const TARGET_IDLE_RSS_MB: f64 = 40.0;

#[derive(Debug, Clone, Copy)]
struct Counts {
    messages: usize,
    warmup: usize,
    throughput: usize,
    mls: usize,
    mls_warmup: usize,
    startups: usize,
}

impl Counts {
    fn from_args(a: &BenchArgs) -> Self {
        let (messages, warmup, throughput, mls, startups) = if a.quick {
            (100, 20, 2_000, 300, 2)
        } else {
            (2_000, 200, 20_000, 5_000, 10)
        };
        let mls = a.mls.unwrap_or(mls);
        Self {
            messages: a.messages.unwrap_or(messages),
            warmup,
            throughput: a.throughput.unwrap_or(throughput),
            mls,
            mls_warmup: (mls / 10).clamp(1, 200),
            startups: a.startups.unwrap_or(startups),
        }
    }
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let counts = Counts::from_args(&args);
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut machine = Machine::read();
    let probe_dir = tmp.path().to_owned();
    (machine.commit_min_ms, machine.commit_ms) =
        tokio::task::spawn_blocking(move || commit_probe(&probe_dir, COMMIT_PROBES))
            .await
            .context("the commit probe panicked")?
            .context("cannot time a durable commit")?;
    println!("Tidings benchmark\n");
    machine.print(tmp.path());
    if cfg!(debug_assertions) {
        println!("  WARNING: this is a debug build; build with --release for meaningful figures");
    }
    println!();

    let mut report = Report::default();
    if counts.messages > 0 || counts.throughput > 0 {
        let pair = Pair::start(tmp.path()).await?;
        if counts.messages > 0 {
            println!(
                "[1] latency: {} messages one at a time (after {} warm-up)…",
                counts.messages, counts.warmup
            );
            let l = latency(&pair, counts.warmup, counts.messages).await?;
            println!(
                "    display p50 {:.3} ms, durable p50 {:.3} ms",
                l.display.p50, l.durable.p50
            );
            report.latency = Some(l);
        }
        if counts.throughput > 0 {
            println!(
                "[2] throughput: {} messages, {CONCURRENT_SENDS} sends in flight…",
                counts.throughput
            );
            let t = throughput(&pair, counts.throughput).await?;
            println!(
                "    {:.0} msg/s displayed, {:.0} msg/s durable{}",
                t.display_per_s,
                t.durable_per_s,
                if t.display_counted_from_store || t.durable_counted_from_store {
                    " (event stream lagged: counted from the store)"
                } else {
                    ""
                }
            );
            report.throughput = Some(t);
        }
        pair.shutdown().await;
    }
    if counts.mls > 0 {
        println!(
            "[3] MLS: {} encrypt + decrypt rounds per variant, in blocks of {MLS_BLOCK}…",
            counts.mls
        );
        let (k, warm) = (counts.mls, counts.mls_warmup);
        let m = tokio::task::spawn_blocking(move || mls_bench(k, warm))
            .await
            .context("the MLS benchmark panicked")??;
        println!(
            "    wrapper {:.1} µs, raw {:.1} µs per round",
            m.wrapper.round_us, m.raw.round_us
        );
        report.mls = Some(m);
    }
    if counts.startups > 0 {
        println!("[4] start-up: {} × `tidings run`, then idle memory…", counts.startups);
        let exe = std::env::current_exe().context("cannot find the tidings executable")?;
        let s = startup(&exe, &tmp.path().join("run"), counts.startups).await?;
        println!("    median {:.1} ms to listening", s.median_ms);
        report.startup = Some(s);
    }

    println!();
    print_table(&report);

    if let Some(path) = &args.json {
        let v = report.to_json(&machine, &counts);
        let text = serde_json::to_string_pretty(&v)?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nfigures written to {}", path.display());
    }
    Ok(())
}

// ------------------------------------------------------------------ machine

pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) mem_total_mb: Option<f64>,
    pub(crate) kernel: String,
    /// 1, 5 and 15 minute load averages when the benchmark started.
    pub(crate) load: String,
    /// Median time of one durable redb commit of a small row in the data directory.
    pub(crate) commit_ms: f64,
    pub(crate) commit_min_ms: f64,
}

impl Machine {
    pub(crate) fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mem_total_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| kb_field(&s, "MemTotal:"))
            .map(|kb| kb as f64 / 1024.0);
        let kernel = std::fs::read_to_string("/proc/version")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| std::env::consts::OS.to_owned());
        Self {
            cpu,
            cores,
            mem_total_mb,
            kernel,
            load: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unknown".to_owned()),
            commit_ms: f64::NAN,
            commit_min_ms: f64::NAN,
        }
    }

    pub(crate) fn print(&self, tmp: &Path) {
        println!("  CPU:     {}", self.cpu);
        println!("  cores:   {}", self.cores);
        match self.mem_total_mb {
            Some(mb) => println!("  memory:  {:.1} GiB", mb / 1024.0),
            None => println!("  memory:  unknown"),
        }
        println!("  kernel:  {}", self.kernel);
        println!(
            "  load:    {} (other work on the machine skews every figure)",
            self.load
        );
        println!("  data:    {} ({})", tmp.display(), filesystem_of(tmp));
        println!(
            "  commit:  {:.3} ms per durable redb commit of one small row (median of {COMMIT_PROBES}; min {:.3} ms)",
            self.commit_ms, self.commit_min_ms
        );
    }
}

/// Times durable commits of one small row in a fresh database in `dir`: the
/// floor under every latency figure (display needs two commits, durable three).
/// Returns (minimum, median) in ms.
pub(crate) fn commit_probe(dir: &Path, n: usize) -> anyhow::Result<(f64, f64)> {
    let path = dir.join("commit-probe.redb");
    let store = Store::open(&path)?;
    let mut times = Vec::with_capacity(n);
    // The first commits grow the file; time the steady state.
    for i in 0..n + COMMIT_PROBES_WARMUP {
        let t0 = Instant::now();
        store.put_dht_record(b"probe", &i.to_be_bytes())?;
        if i >= COMMIT_PROBES_WARMUP {
            times.push(ms(t0.elapsed()));
        }
    }
    drop(store);
    let _ = std::fs::remove_file(path);
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok((min, median(&times)))
}

/// A `Name:   123 kB` field of a /proc file, in kB.
pub(crate) fn kb_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The filesystem type and device holding `path` (from /proc/mounts), since
/// fsync cost depends on it.
fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "filesystem unknown".to_owned();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mount, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mount).then(|| (mount.len(), format!("{fs} on {dev}")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "filesystem unknown".to_owned(), |(_, s)| s)
}

// -------------------------------------------------------------- statistics

/// The `p`-th percentile (nearest rank) of an ascending slice; NaN if empty.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Summary {
    pub(crate) fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Self {
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({ "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max })
    }
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A benchmark message of exactly [`MESSAGE_BYTES`] bytes.
fn message_text(i: usize) -> String {
    let mut s = format!("bench message {i:010} ");
    while s.len() < MESSAGE_BYTES {
        s.push('.');
    }
    s
}

// ------------------------------------------------------------- two nodes

/// Alice and bob, contacts of each other with an MLS conversation set up.
struct Pair {
    alice_node: Node,
    bob_node: Node,
    alice: NodeHandle,
    bob: NodeHandle,
    bob_account: [u8; 32],
}

impl Pair {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let bob_node = start_node(&dir.join("bob"), "bob", Vec::new())
            .await
            .context("cannot start bob's node")?;
        let bob_addr = bob_node
            .listen_addrs()
            .into_iter()
            .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
            .context("bob listens on no TCP address")?;
        let alice_node = start_node(&dir.join("alice"), "alice", vec![bob_addr])
            .await
            .context("cannot start alice's node")?;
        let (alice, bob) = (alice_node.handle(), bob_node.handle());
        alice.add_contact(&bob.card().to_uri(), None).await?;
        bob.add_contact(&alice.card().to_uri(), None).await?;
        let bob_account = *bob.account().as_bytes();
        retry_until(STEP_TIMEOUT, || alice.start_conversation(bob_account))
            .await
            .context("alice could not start a conversation with bob")?;
        let pair = Self {
            alice_node,
            bob_node,
            alice,
            bob,
            bob_account,
        };
        // The first message carries the Welcome along; make sure it all landed.
        let (mut a_rx, mut b_rx) = (pair.alice.subscribe(), pair.bob.subscribe());
        one_message(&pair.alice, &pair.bob, &mut a_rx, &mut b_rx, &message_text(0))
            .await
            .context("the first message did not go through")?;
        Ok(pair)
    }

    async fn shutdown(self) {
        let Pair {
            alice_node,
            bob_node,
            alice,
            bob,
            ..
        } = self;
        drop((alice, bob));
        alice_node.shutdown().await;
        bob_node.shutdown().await;
    }
}

/// Sends one message and waits until bob displayed it and alice holds the ack.
/// Returns (send → display, send → durable).
async fn one_message(
    alice: &NodeHandle,
    bob: &NodeHandle,
    a_rx: &mut broadcast::Receiver<NodeEvent>,
    b_rx: &mut broadcast::Receiver<NodeEvent>,
    text: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let to = *bob.account().as_bytes();
    let id = alice.send_to(to, text).await.context("send failed")?.id;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let (mut display, mut durable) = (None, None);
    while display.is_none() || durable.is_none() {
        tokio::select! {
            r = b_rx.recv(), if display.is_none() => match r {
                Ok(NodeEvent::Message(m)) if m.id == id => display = Some(t0.elapsed()),
                Ok(_) => {}
                Err(e) => bail!("bob's event stream failed: {e}"),
            },
            r = a_rx.recv(), if durable.is_none() => match r {
                Ok(NodeEvent::Delivered { id: d, .. }) if d == id => durable = Some(t0.elapsed()),
                Ok(_) => {}
                Err(e) => bail!("alice's event stream failed: {e}"),
            },
            _ = tokio::time::sleep_until(deadline) => bail!(
                "message {id} not {} within {STEP_TIMEOUT:?} (bob holds {} messages, alice's outbox {})",
                if display.is_none() { "displayed" } else { "acknowledged" },
                bob.store().message_count().unwrap_or(u64::MAX),
                alice.store().outbox_len().unwrap_or(u64::MAX),
            ),
        }
    }
    match (display, durable) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => unreachable!("the loop ends only when both are known"),
    }
}

struct Latency {
    messages: usize,
    display: Summary,
    durable: Summary,
}

async fn latency(pair: &Pair, warmup: usize, n: usize) -> anyhow::Result<Latency> {
    let (alice, bob) = (pair.alice.clone(), pair.bob.clone());
    let (mut a_rx, mut b_rx) = (pair.alice.subscribe(), pair.bob.subscribe());
    // Measured in a runtime task, like the node's own tasks.
    let task = tokio::spawn(async move {
        let mut display = Vec::with_capacity(n);
        let mut durable = Vec::with_capacity(n);
        for i in 0..warmup + n {
            let (d, a) = one_message(&alice, &bob, &mut a_rx, &mut b_rx, &message_text(i + 1))
                .await
                .with_context(|| format!("latency run, message {}", i + 1))?;
            if i >= warmup {
                display.push(ms(d));
                durable.push(ms(a));
            }
        }
        anyhow::Ok((display, durable))
    });
    let (display, durable) = task.await.context("the latency run panicked")??;
    Ok(Latency {
        messages: n,
        display: Summary::of(display),
        durable: Summary::of(durable),
    })
}

struct Throughput {
    messages: usize,
    accepted_per_s: f64,
    display_s: f64,
    display_per_s: f64,
    durable_s: f64,
    durable_per_s: f64,
    display_counted_from_store: bool,
    durable_counted_from_store: bool,
}

/// Counts events matching `is_match` until `target`; if the stream lags (events
/// were dropped), polls `store_done` instead. Returns when the target was
/// reached and whether the store had to be used.
async fn count_events(
    mut rx: broadcast::Receiver<NodeEvent>,
    target: usize,
    deadline: tokio::time::Instant,
    is_match: fn(&NodeEvent) -> bool,
    store_done: impl Fn() -> anyhow::Result<bool>,
) -> anyhow::Result<(Instant, bool)> {
    let mut seen = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => bail!("timed out after {seen} of {target} events"),
            Ok(Ok(ev)) => {
                if is_match(&ev) {
                    seen += 1;
                    if seen >= target {
                        return Ok((Instant::now(), false));
                    }
                }
            }
            Ok(Err(RecvError::Lagged(_))) => break,
            Ok(Err(RecvError::Closed)) => bail!("event stream closed after {seen} of {target} events"),
        }
    }
    drop(rx);
    loop {
        if store_done()? {
            return Ok((Instant::now(), true));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out (event stream lagged after {seen} events; the store is not done either)");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Sends `m` messages keeping [`CONCURRENT_SENDS`] in flight; returns when all
/// were accepted (durably in alice's outbox).
async fn drive_sends(alice: NodeHandle, to: [u8; 32], m: usize) -> anyhow::Result<Instant> {
    let mut in_flight = FuturesUnordered::new();
    let (mut next, mut done) = (0usize, 0usize);
    while done < m {
        while next < m && in_flight.len() < CONCURRENT_SENDS {
            let (h, text) = (alice.clone(), message_text(next));
            in_flight.push(async move { h.send_to(to, &text).await });
            next += 1;
        }
        match in_flight.next().await {
            Some(r) => {
                r.with_context(|| format!("send failed after {done} accepted"))?;
                done += 1;
            }
            None => break,
        }
    }
    Ok(Instant::now())
}

async fn throughput(pair: &Pair, m: usize) -> anyhow::Result<Throughput> {
    let baseline = pair.bob.store().message_count()?;
    let sends_done = Arc::new(AtomicBool::new(false));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60) + Duration::from_millis(m as u64 * 5);
    let (a_rx, b_rx) = (pair.alice.subscribe(), pair.bob.subscribe());

    let t0 = Instant::now();
    let bob = pair.bob.clone();
    let display = tokio::spawn(count_events(
        b_rx,
        m,
        deadline,
        |ev| matches!(ev, NodeEvent::Message(_)),
        move || Ok(bob.store().message_count()?.saturating_sub(baseline) >= m as u64),
    ));
    let (alice, done) = (pair.alice.clone(), sends_done.clone());
    let durable = tokio::spawn(count_events(
        a_rx,
        m,
        deadline,
        |ev| matches!(ev, NodeEvent::Delivered { .. }),
        // Once every send was accepted, an empty outbox means every ack is committed.
        move || Ok(done.load(Ordering::SeqCst) && alice.store().outbox_len()? == 0),
    ));
    let driver = tokio::spawn(drive_sends(pair.alice.clone(), pair.bob_account, m));
    let accepted = match driver.await.context("the send driver panicked")? {
        Ok(t) => t,
        Err(e) => {
            display.abort();
            durable.abort();
            return Err(e.context("throughput run"));
        }
    };
    sends_done.store(true, Ordering::SeqCst);

    let status = |what: &str| {
        format!(
            "throughput run: {what} (bob holds {} new messages of {m}, alice's outbox {})",
            pair.bob
                .store()
                .message_count()
                .map_or(u64::MAX, |c| c.saturating_sub(baseline)),
            pair.alice.store().outbox_len().unwrap_or(u64::MAX),
        )
    };
    let (display_at, display_lagged) = display
        .await
        .context("the display counter panicked")?
        .with_context(|| status("bob did not display every message"))?;
    let (durable_at, durable_lagged) = durable
        .await
        .context("the ack counter panicked")?
        .with_context(|| status("alice did not get every ack"))?;
    let secs = |t: Instant| t.duration_since(t0).as_secs_f64();
    Ok(Throughput {
        messages: m,
        accepted_per_s: m as f64 / secs(accepted),
        display_s: secs(display_at),
        display_per_s: m as f64 / secs(display_at),
        durable_s: secs(durable_at),
        durable_per_s: m as f64 / secs(durable_at),
        display_counted_from_store: display_lagged,
        durable_counted_from_store: durable_lagged,
    })
}

// ------------------------------------------------------------------- MLS

/// One device for the MLS benchmark: an in-memory store with an identity.
struct Device {
    store: Arc<Store>,
    provider: Provider,
    engine: MlsEngine,
    cert: DeviceCertificate,
    mls_seed: [u8; 32],
}

impl Device {
    fn new(name: &str, now: u64) -> anyhow::Result<Self> {
        let store = Arc::new(Store::open_in_memory()?);
        let identity = crate::create_identity(&store, name, now)?;
        let cert = DeviceCertificate::from_bytes(&identity.device_cert)?;
        let engine = MlsEngine::new(identity.mls_seed, &cert)?;
        Ok(Self {
            provider: Provider::new(store.clone()),
            store,
            engine,
            cert,
            mls_seed: identity.mls_seed,
        })
    }
}

/// Sets up a two-member group the way the node does: bob's key package,
/// verified by alice, alice creates the group, bob joins from the Welcome.
fn two_member_group(a: &Device, b: &Device, gid: &[u8], now: u64) -> anyhow::Result<(MlsGroup, MlsGroup)> {
    let kp = b
        .store
        .unit(|| -> anyhow::Result<_> { Ok(b.engine.key_package(&b.provider, false)?) })?;
    let (kp, _) = MlsEngine::verify_key_package(&a.provider, &kp, &b.cert.account, now)?;
    let (ga, welcome) = a
        .store
        .unit(|| -> anyhow::Result<_> { Ok(a.engine.create_group(&a.provider, gid, &[kp])?) })?;
    let welcome = welcome.context("creating the group made no Welcome")?;
    let gb = b
        .store
        .unit(|| -> anyhow::Result<_> { Ok(b.engine.join(&b.provider, &welcome)?) })?;
    Ok((ga, gb))
}

/// Times of one round: (encrypt, decrypt).
type Round = (Duration, Duration);

/// Encrypt on alice and process on bob through the engine, each in one unit.
fn wrapper_round(
    a: &Device,
    b: &Device,
    ga: &mut MlsGroup,
    gb: &mut MlsGroup,
    payload: &[u8],
) -> anyhow::Result<Round> {
    let t0 = Instant::now();
    let ct = a
        .store
        .unit(|| -> anyhow::Result<Vec<u8>> { Ok(a.engine.encrypt(&a.provider, ga, payload)?) })?;
    let t1 = Instant::now();
    let pt = b.store.unit(|| -> anyhow::Result<Vec<u8>> {
        match b.engine.process(&b.provider, gb, &ct)? {
            Incoming::Application { plaintext, .. } => Ok(plaintext),
            other => bail!("expected an application message, got {other:?}"),
        }
    })?;
    let t2 = Instant::now();
    if pt != payload {
        bail!("the engine decrypted something else");
    }
    Ok((t1 - t0, t2 - t1))
}

/// The same round with raw openmls calls, each side in one unit.
fn raw_round(
    a: &Device,
    b: &Device,
    signer: &impl openmls_traits::signatures::Signer,
    ga: &mut MlsGroup,
    gb: &mut MlsGroup,
    payload: &[u8],
) -> anyhow::Result<Round> {
    let t0 = Instant::now();
    let ct = a.store.unit(|| -> anyhow::Result<Vec<u8>> {
        ga.create_message(&a.provider, signer, payload)
            .map_err(|e| anyhow!("create_message: {e:?}"))?
            .to_bytes()
            .map_err(|e| anyhow!("encoding: {e:?}"))
    })?;
    let t1 = Instant::now();
    let pt = b.store.unit(|| -> anyhow::Result<Vec<u8>> {
        let msg = MlsMessageIn::tls_deserialize_exact(ct.as_slice())
            .map_err(|e| anyhow!("decoding: {e:?}"))?
            .try_into_protocol_message()
            .map_err(|e| anyhow!("not a protocol message: {e:?}"))?;
        let processed = gb
            .process_message(&b.provider, msg)
            .map_err(|e| anyhow!("process_message: {e:?}"))?;
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Ok(app.into_bytes()),
            _ => bail!("expected an application message"),
        }
    })?;
    let t2 = Instant::now();
    if pt != payload {
        bail!("openmls decrypted something else");
    }
    Ok((t1 - t0, t2 - t1))
}

#[derive(Debug, Clone, Copy)]
struct MlsFigures {
    encrypt_us: f64,
    decrypt_us: f64,
    round_us: f64,
}

impl MlsFigures {
    fn of(rounds: &[Round]) -> Self {
        let enc: Vec<f64> = rounds.iter().map(|r| us(r.0)).collect();
        let dec: Vec<f64> = rounds.iter().map(|r| us(r.1)).collect();
        let all: Vec<f64> = rounds.iter().map(|r| us(r.0 + r.1)).collect();
        Self {
            encrypt_us: median(&enc),
            decrypt_us: median(&dec),
            round_us: median(&all),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "encrypt_us": self.encrypt_us,
            "decrypt_us": self.decrypt_us,
            "round_us": self.round_us,
        })
    }
}

struct Mls {
    rounds: usize,
    wrapper: MlsFigures,
    raw: MlsFigures,
    ratio: f64,
}

/// K rounds through the engine and K through raw openmls, on two groups between
/// the same two in-memory stores, interleaved in blocks of [`MLS_BLOCK`].
/// Both variants run every encrypt in one store unit on alice's store and every
/// decrypt in one unit on bob's store, as the node does.
fn mls_bench(k: usize, warmup: usize) -> anyhow::Result<Mls> {
    let now = Clock::system().now_ms();
    let alice = Device::new("alice", now)?;
    let bob = Device::new("bob", now)?;
    let signer = signature_keys_from_seed(alice.mls_seed);
    let (mut wa, mut wb) = two_member_group(&alice, &bob, b"bench-wrapper", now)?;
    let (mut ra, mut rb) = two_member_group(&alice, &bob, b"bench-raw", now)?;
    let payload: Vec<u8> = (0..MESSAGE_BYTES).map(|i| i as u8).collect();

    for _ in 0..warmup {
        wrapper_round(&alice, &bob, &mut wa, &mut wb, &payload)?;
        raw_round(&alice, &bob, &signer, &mut ra, &mut rb, &payload)?;
    }
    let mut wrapper = Vec::with_capacity(k);
    let mut raw = Vec::with_capacity(k);
    let mut wrapper_first = true;
    while wrapper.len() < k {
        let n = MLS_BLOCK.min(k - wrapper.len());
        for pass in 0..2 {
            // Alternate which variant goes first so neither always follows the other.
            if (pass == 0) == wrapper_first {
                for _ in 0..n {
                    wrapper.push(wrapper_round(&alice, &bob, &mut wa, &mut wb, &payload)?);
                }
            } else {
                for _ in 0..n {
                    raw.push(raw_round(&alice, &bob, &signer, &mut ra, &mut rb, &payload)?);
                }
            }
        }
        wrapper_first = !wrapper_first;
    }
    let (wrapper, raw) = (MlsFigures::of(&wrapper), MlsFigures::of(&raw));
    Ok(Mls {
        rounds: k,
        ratio: wrapper.round_us / raw.round_us,
        wrapper,
        raw,
    })
}

// ---------------------------------------------------------------- start-up

struct Startup {
    runs: usize,
    times_ms: Vec<f64>,
    median_ms: f64,
    idle_rss_mb: Option<f64>,
}

async fn startup(exe: &Path, dir: &Path, runs: usize) -> anyhow::Result<Startup> {
    std::fs::create_dir_all(dir)?;
    let out = tokio::process::Command::new(exe)
        .arg("--data-dir")
        .arg(dir)
        .args(["init", "--name", "bench"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "`tidings init` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut times_ms = Vec::with_capacity(runs);
    let mut idle_rss_mb = None;
    for i in 0..runs {
        let (elapsed, mut child) = start_child(exe, dir)
            .await
            .with_context(|| format!("start-up {}", i + 1))?;
        times_ms.push(ms(elapsed));
        if i + 1 == runs {
            tokio::time::sleep(IDLE_BEFORE_RSS).await;
            idle_rss_mb = child.id().and_then(rss_mb);
        }
        stop_child(&mut child).await?;
    }
    Ok(Startup {
        runs,
        median_ms: median(&times_ms),
        times_ms,
        idle_rss_mb,
    })
}

/// Spawns `tidings run` and waits for its first "listening on" line.
async fn start_child(exe: &Path, dir: &Path) -> anyhow::Result<(Duration, tokio::process::Child)> {
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .arg("--data-dir")
        .arg(dir)
        .args(["run", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut lines = BufReader::new(stdout).lines();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("listening on") {
                return anyhow::Ok(());
            }
        }
        bail!("`tidings run` exited before listening")
    };
    match tokio::time::timeout(STEP_TIMEOUT, wait).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("`tidings run` did not listen within {STEP_TIMEOUT:?}"),
    }
    let elapsed = t0.elapsed();
    // Keep reading so the child never writes into a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((elapsed, child))
}

/// Asks the child to stop (SIGTERM on Unix), killing it if it does not within 10 s.
pub(crate) async fn stop_child(child: &mut tokio::process::Child) -> anyhow::Result<()> {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        child.start_kill()?;
        child.wait().await?;
    }
    Ok(())
}

/// Resident memory of a process, in MB (Linux only).
#[cfg(target_os = "linux")]
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kb_field(&status, "VmRSS:").map(|kb| kb as f64 / 1024.0)
}

#[cfg(not(target_os = "linux"))]
fn rss_mb(_pid: u32) -> Option<f64> {
    None
}

// ------------------------------------------------------------------ report

#[derive(Default)]
struct Report {
    latency: Option<Latency>,
    throughput: Option<Throughput>,
    mls: Option<Mls>,
    startup: Option<Startup>,
}

#[derive(Clone, Copy)]
pub(crate) enum Target {
    AtMost(f64),
    AtLeast(f64),
    None,
}

impl Target {
    pub(crate) fn met(self, v: f64) -> Option<bool> {
        match self {
            _ if v.is_nan() => None,
            Target::AtMost(t) => Some(v <= t),
            Target::AtLeast(t) => Some(v >= t),
            Target::None => None,
        }
    }

    pub(crate) fn json(self, v: f64) -> serde_json::Value {
        match self {
            Target::AtMost(t) => serde_json::json!({ "at_most": t, "met": self.met(v) }),
            Target::AtLeast(t) => serde_json::json!({ "at_least": t, "met": self.met(v) }),
            Target::None => serde_json::Value::Null,
        }
    }
}

pub(crate) struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    decimals: usize,
    target: Target,
}

impl Row {
    pub(crate) fn new(
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        decimals: usize,
        target: Target,
    ) -> Self {
        Self {
            name: name.into(),
            value,
            unit,
            decimals,
            target,
        }
    }
}

impl Report {
    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        if let Some(l) = &self.latency {
            for (what, s, p50, p99) in [
                ("display", &l.display, TARGET_DISPLAY_P50_MS, TARGET_DISPLAY_P99_MS),
                ("durable", &l.durable, TARGET_DURABLE_P50_MS, TARGET_DURABLE_P99_MS),
            ] {
                let name = |p: &str| format!("latency send → {what} {p}");
                rows.push(Row::new(name("p50"), s.p50, "ms", 3, Target::AtMost(p50)));
                rows.push(Row::new(name("p90"), s.p90, "ms", 3, Target::None));
                rows.push(Row::new(name("p99"), s.p99, "ms", 3, Target::AtMost(p99)));
                rows.push(Row::new(name("max"), s.max, "ms", 3, Target::None));
            }
        }
        if let Some(t) = &self.throughput {
            let star = |lagged: bool| if lagged { " *" } else { "" };
            rows.push(Row::new(
                format!("throughput to display{}", star(t.display_counted_from_store)),
                t.display_per_s,
                "msg/s",
                0,
                Target::AtLeast(TARGET_THROUGHPUT),
            ));
            rows.push(Row::new(
                format!("throughput to durable{}", star(t.durable_counted_from_store)),
                t.durable_per_s,
                "msg/s",
                0,
                Target::AtLeast(TARGET_THROUGHPUT),
            ));
            rows.push(Row::new(
                "sends accepted (in outbox)",
                t.accepted_per_s,
                "msg/s",
                0,
                Target::None,
            ));
        }
        if let Some(m) = &self.mls {
            for (what, f) in [("engine", &m.wrapper), ("raw openmls", &m.raw)] {
                rows.push(Row::new(
                    format!("MLS {what} encrypt"),
                    f.encrypt_us,
                    "µs",
                    1,
                    Target::None,
                ));
                rows.push(Row::new(
                    format!("MLS {what} decrypt"),
                    f.decrypt_us,
                    "µs",
                    1,
                    Target::None,
                ));
                rows.push(Row::new(
                    format!("MLS {what} encrypt + decrypt"),
                    f.round_us,
                    "µs",
                    1,
                    Target::None,
                ));
            }
            rows.push(Row::new(
                "MLS engine / raw openmls",
                m.ratio,
                "×",
                3,
                Target::AtMost(TARGET_MLS_RATIO),
            ));
        }
        if let Some(s) = &self.startup {
            rows.push(Row::new(
                "start-up to listening (median)",
                s.median_ms,
                "ms",
                1,
                Target::None,
            ));
            rows.push(Row::new(
                "idle node RSS",
                s.idle_rss_mb.unwrap_or(f64::NAN),
                "MB",
                1,
                Target::AtMost(TARGET_IDLE_RSS_MB),
            ));
        }
        rows
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
                "latency_messages": counts.messages,
                "latency_warmup": counts.warmup,
                "throughput_messages": counts.throughput,
                "concurrent_sends": CONCURRENT_SENDS,
                "mls_rounds": counts.mls,
                "mls_warmup": counts.mls_warmup,
                "mls_block": MLS_BLOCK,
                "message_bytes": MESSAGE_BYTES,
                "startups": counts.startups,
            },
        });
        if let Some(l) = &self.latency {
            v["latency"] = json!({
                "messages": l.messages,
                "display_ms": l.display.json(),
                "durable_ms": l.durable.json(),
                "targets": {
                    "display_p50": Target::AtMost(TARGET_DISPLAY_P50_MS).json(l.display.p50),
                    "display_p99": Target::AtMost(TARGET_DISPLAY_P99_MS).json(l.display.p99),
                    "durable_p50": Target::AtMost(TARGET_DURABLE_P50_MS).json(l.durable.p50),
                    "durable_p99": Target::AtMost(TARGET_DURABLE_P99_MS).json(l.durable.p99),
                },
            });
        }
        if let Some(t) = &self.throughput {
            v["throughput"] = json!({
                "messages": t.messages,
                "accepted_per_s": t.accepted_per_s,
                "display_seconds": t.display_s,
                "display_per_s": t.display_per_s,
                "durable_seconds": t.durable_s,
                "durable_per_s": t.durable_per_s,
                "display_counted_from_store": t.display_counted_from_store,
                "durable_counted_from_store": t.durable_counted_from_store,
                "targets": {
                    "display_per_s": Target::AtLeast(TARGET_THROUGHPUT).json(t.display_per_s),
                    "durable_per_s": Target::AtLeast(TARGET_THROUGHPUT).json(t.durable_per_s),
                },
            });
        }
        if let Some(m) = &self.mls {
            v["mls"] = json!({
                "rounds": m.rounds,
                "store_units": "one unit per encrypt and one per decrypt, in both variants",
                "engine": m.wrapper.json(),
                "raw_openmls": m.raw.json(),
                "ratio": m.ratio,
                "targets": { "ratio": Target::AtMost(TARGET_MLS_RATIO).json(m.ratio) },
            });
        }
        if let Some(s) = &self.startup {
            v["startup"] = json!({
                "runs": s.runs,
                "times_ms": s.times_ms,
                "median_ms": s.median_ms,
                "idle_rss_mb": s.idle_rss_mb,
                "targets": {
                    "idle_rss_mb": Target::AtMost(TARGET_IDLE_RSS_MB).json(s.idle_rss_mb.unwrap_or(f64::NAN)),
                },
            });
        }
        v
    }
}

fn print_table(report: &Report) {
    print_rows(&report.rows());
    if let Some(t) = &report.throughput
        && (t.display_counted_from_store || t.durable_counted_from_store)
    {
        println!("* the event stream lagged; completion was read from the store instead");
    }
    if report.mls.is_some() {
        println!(
            "MLS figures: medians per message; both variants run each encrypt and each decrypt in one store unit."
        );
    }
}

/// Prints figures as a table: name, value, target and whether it was met.
pub(crate) fn print_rows(rows: &[Row]) {
    let fmt_value = |r: &Row| {
        if r.value.is_nan() {
            "n/a".to_owned()
        } else {
            format!("{:.*} {}", r.decimals, r.value, r.unit)
        }
    };
    let fmt_target = |r: &Row| match r.target {
        Target::AtMost(t) => format!("≤ {t} {}", r.unit),
        Target::AtLeast(t) => format!("≥ {t} {}", r.unit),
        Target::None => "-".to_owned(),
    };
    let w0 = rows.iter().map(|r| r.name.chars().count()).max().unwrap_or(0).max(6);
    let w1 = rows
        .iter()
        .map(|r| fmt_value(r).chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let w2 = rows
        .iter()
        .map(|r| fmt_target(r).chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    println!("{:<w0$}  {:>w1$}  {:<w2$}  result", "figure", "value", "target");
    println!("{}", "-".repeat(w0 + w1 + w2 + 12));
    for r in rows {
        let result = match r.target.met(r.value) {
            Some(true) => "MET",
            Some(false) => "MISSED",
            None if matches!(r.target, Target::None) => "",
            None => "n/a",
        };
        let line = format!(
            "{:<w0$}  {:>w1$}  {:<w2$}  {result}",
            r.name,
            fmt_value(r),
            fmt_target(r)
        );
        println!("{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 90.0), 90.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
        let s = Summary::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.p50, s.max), (2.0, 3.0));
    }

    #[test]
    fn benchmark_messages_have_the_same_size() {
        assert_eq!(message_text(0).len(), MESSAGE_BYTES);
        assert_eq!(message_text(usize::MAX / 2).len(), MESSAGE_BYTES);
    }

    #[test]
    fn proc_fields_are_read_in_kb() {
        let status = "Name:\ttidings\nVmRSS:\t   12345 kB\n";
        assert_eq!(kb_field(status, "VmRSS:"), Some(12345));
        assert_eq!(kb_field(status, "VmHWM:"), None);
    }
}
