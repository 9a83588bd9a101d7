//! Tier A: the real node — libp2p behaviours, Noise, yamux, Kademlia, circuit relays, MLS, the
//! relays' mailboxes, the redb store (in memory) — for every host of a scenario, in one process
//! on one thread, in virtual time.
//!
//! The runtime is tokio's current-thread runtime with its clock paused: when every task waits,
//! the clock jumps to the next timer. The network is [`tidings_node::sim::SimNetwork`] with
//! [`links::Links`] as its model (region RTTs, access links, bandwidth, jitter, loss, partitions,
//! NATs). libp2p's own timers follow the paused clock through the workspace's `futures-timer`
//! patch, and every node reads time through a [`tidings_node::Clock`] on the same clock.
//!
//! The run is driven by a [`plan::Plan`] drawn from the seed (who is where, who knows whom, when
//! each client is online, when each message is sent, which relays the faults hit) and observed
//! through the nodes' public API only: their event streams and, at the end, their stores.
//!
//! Not fully deterministic yet: every identity (peer id, account, device and MLS signature keys)
//! derives from (seed, host), and so does the plan, but Noise's ephemeral keys, MLS's own
//! randomness and the iteration order of libp2p's hash maps do not, so two runs of one seed
//! differ in detail. See docs/SIMULATOR.md.

mod links;
pub mod plan;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use rand::Rng;
use tidings_node::net::NetError;
use tidings_node::sim::{self, HostDisk, PersonHost, SimNetwork};
use tidings_node::{Clock, Node, NodeError, NodeEvent, NodeHandle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::rng::{self, SimRng, stream};
use crate::scenario::{Scenario, ScenarioError};
use crate::tierb::{
    DeliveryRecord, KadAcc, NEVER, Path, RunOptions, RunResult, Sample, Violation, bytes_figures, delivery_figures,
    dht_figures, latency_curves, partition_figures,
};
use crate::trace::{Recorder, TraceEvent};
use plan::{Plan, PlannedFault};

pub use links::port;

/// The wall-clock time the simulated world starts at (nodes stamp messages with it).
const START_MS: u64 = 1_800_000_000_000;
/// Violations kept in full (all are counted).
const MAX_VIOLATIONS_KEPT: usize = 100;
/// Longest the set-up keeps a client that is offline at the start running for its key packages
/// to reach its home relays.
const PROVISION_WAIT: Duration = Duration::from_secs(120);
/// Kinds of failed sends told apart at the end of a run.
const MAX_SEND_ERROR_KINDS: usize = 20;

/// Why a Tier A run could not be carried out. Invariant violations are not errors: they are in
/// [`RunResult::violations`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TierAError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("Tier A does not run {0} yet; Tier B does")]
    Unsupported(&'static str),
    #[error("cannot build the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("host {host} did not start: {msg}")]
    Start { host: usize, msg: String },
    #[error("cannot write events.jsonl")]
    Events(#[source] std::io::Error),
}

/// What the nodes showed, collected by one task per running node.
#[derive(Default)]
struct Seen {
    /// Message id → (client, when) for every display.
    displays: HashMap<String, Vec<(usize, u64)>>,
    /// Message id → when its sender saw every recipient device's ack.
    acked: HashMap<String, u64>,
    /// Message id → when its sender saw a relay's custody receipt.
    stored: HashMap<String, u64>,
    /// (id, from, to, when) of every message a sender's node took.
    sent: Vec<(String, usize, To, u64)>,
    /// Failed sends by the kind of error (see `spawn_send`); their sum is `sends_failed`.
    send_errors: std::collections::BTreeMap<String, u64>,
    events_lagged: u64,
    replies: u64,
    /// DHT operations by [`crate::tierb::KAD_KINDS`] index: record lookups and publications.
    dht: [KadAcc; 4],
    /// (when it ended, its trace event) of every DHT operation.
    dht_trace: Vec<(u64, TraceEvent)>,
    /// Record lookups cut short because their own node stopped (its client went offline): they
    /// have no outcome, so they are counted here and not in [`Seen::dht`].
    lookups_abandoned: u64,
}

/// Indices into [`Seen::dht`] (as Tier B's `LookupKind::index`).
const GET_RECORD: u8 = 1;
const PUT_RECORD: u8 = 2;

impl Seen {
    fn dht_done(&mut self, kind: u8, host: usize, ok: bool, started: u64, ended: u64) {
        let latency_us = ended.saturating_sub(started);
        self.dht[usize::from(kind)].add(ok, 0, latency_us);
        self.dht_trace.push((
            ended,
            TraceEvent::Lookup {
                kind,
                origin: host32(host),
                ok,
                hops: 0,
                latency_us,
            },
        ));
    }
}

/// Whom a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum To {
    /// A client index.
    Contact(usize),
    /// An index into [`Plan::groups`].
    Group(usize),
}

type Shared = Arc<Mutex<Seen>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Seen> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// µs of virtual time since `t0`.
fn since(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    FaultEnd(usize),
    FaultStart(usize),
    Down(usize),
    Up(usize),
    Send(usize),
    Lookup(usize),
    Sample,
}

struct Running {
    node: Node,
    watcher: JoinHandle<()>,
    publisher: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.watcher.abort();
        self.publisher.abort();
        self.node.shutdown().await;
    }
}

/// The world: hosts, their disks and running nodes.
struct World<'s> {
    sc: &'s Scenario,
    plan: Plan,
    net: SimNetwork,
    links: Arc<links::Links>,
    clock: Clock,
    t0: Instant,
    /// The process's peak resident memory over the set-up, when every client started once.
    setup_peak: Option<u64>,
    /// How much virtual time the set-up took (the starts, the cards, the groups).
    setup_virtual: Duration,
    /// Wall and CPU time from the start of the set-up, then of the measured run.
    stopwatch: crate::memory::Stopwatch,
    /// What the set-up took of wall time and of the process's CPU time (`None` off Linux).
    setup_wall: Duration,
    setup_cpu: Option<f64>,
    /// What each host had sent and received when the run's clock started (the set-up's bytes).
    bytes_at_start: Vec<BytesSoFar>,
    relay_disks: Vec<HostDisk>,
    /// The scenario's `[protocol]` settings as every node takes them.
    tuning: sim::HostTuning,
    relay_addrs: Vec<Multiaddr>,
    relays: Vec<Option<Node>>,
    disks: Vec<HostDisk>,
    hosts: Vec<PersonHost>,
    accounts: Vec<[u8; 32]>,
    account_index: Arc<HashMap<String, usize>>,
    cards: Vec<String>,
    clients: Vec<Option<Running>>,
    /// The id of each planned group, if the set-up made it.
    group_ids: Vec<Option<String>>,
    seen: Shared,
    samples: Vec<Sample>,
    events: Vec<(u64, TraceEvent)>,
    sent_count: u64,
    seed: u64,
}

/// What the nodes take of a scenario's `[protocol]` table. The rest (the
/// fetch page, retry backoff, direct patience, ...) are the node's own
/// constants; Tier B models them with the scenario's values, which default
/// to those constants.
fn host_tuning(p: &crate::scenario::ProtocolParams) -> sim::HostTuning {
    let d = |s: crate::scenario::SimDuration| Duration::from_micros(s.micros());
    let n = |v: u32| std::num::NonZeroUsize::new(v as usize).unwrap_or(std::num::NonZeroUsize::MIN);
    sim::HostTuning {
        net: tidings_node::net::NetTuning {
            idle_timeout: d(p.idle_timeout),
            conversation_keep_alive: d(p.conversation_keep_alive),
            kad_query_timeout: d(p.kad_query_timeout),
            kad_parallelism: n(p.kad_alpha),
            kad_replication: n(p.kad_k),
            kad_refresh: d(p.kad_refresh),
            kad_client_refresh: d(p.kad_client_refresh),
            ping_interval: d(p.ping_interval),
        },
        request_timeout: d(p.request_timeout),
        mailbox_poll: d(p.mailbox_poll),
        key_update_interval: d(p.key_update),
    }
}

/// The `[protocol]` keys set away from their defaults that the real nodes do
/// not take (see [`host_tuning`]).
pub fn ignored_protocol_keys(p: &crate::scenario::ProtocolParams) -> Vec<&'static str> {
    let d = crate::scenario::ProtocolParams::default();
    [
        ("kad_rpc_timeout", p.kad_rpc_timeout != d.kad_rpc_timeout),
        ("connect_rtts", p.connect_rtts != d.connect_rtts),
        ("record_copies", p.record_copies != d.record_copies),
        ("direct_patience", p.direct_patience != d.direct_patience),
        ("away_for", p.away_for != d.away_for),
        ("group_poll", p.group_poll != d.group_poll),
        ("relay_redial", p.relay_redial != d.relay_redial),
        ("retention", p.retention != d.retention),
        ("fetch_page", p.fetch_page != d.fetch_page),
        ("retry_initial", p.retry_initial != d.retry_initial),
        ("retry_max", p.retry_max != d.retry_max),
        ("circuit_max_duration", p.circuit_max_duration != d.circuit_max_duration),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(k, _)| k)
    .collect()
}

/// The time between two of `n` steps (host starts, groups made) spread over `spread`.
fn spread_gap(spread: crate::scenario::SimDuration, n: usize) -> Duration {
    Duration::from_micros(spread.micros()) / u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

/// Runs a scenario in Tier A.
pub fn run(sc: &Scenario, opts: RunOptions<'_>) -> Result<RunResult, TierAError> {
    sc.validate()?;
    let a = &sc.adversaries;
    if a.sybil.is_some() || a.dropping_relays > 0.0 || a.withholding_relays > 0.0 {
        return Err(TierAError::Unsupported("adversaries"));
    }
    let RunOptions {
        seed,
        events,
        mut progress,
    } = opts;
    crate::memory::reset_peak();
    let plan = Plan::build(sc, seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(TierAError::Runtime)?;
    let mut world = runtime.block_on(World::start(sc, plan, seed, progress.is_some()))?;
    runtime.block_on(world.drive(&mut progress))?;
    let result = runtime.block_on(world.finish(events))?;
    drop(world);
    drop(runtime);
    Ok(result)
}

/// Whether `done` of `all` is a whole number of tenths short of all: where the set-up reports
/// its progress (the last one has a milestone of its own).
fn a_tenth_short_of_all(done: usize, all: usize) -> bool {
    done.is_multiple_of((all / 10).max(1)) && done < all
}

/// What one host has moved so far: on its links (both directions) and on its substreams by
/// [`sim::StreamClass`].
#[derive(Debug, Clone, Copy, Default)]
struct BytesSoFar {
    links: u64,
    streams: [u64; sim::StreamClass::ALL.len()],
    /// Connections dialled and accepted.
    dialled: u64,
    accepted: u64,
    /// Connections dialled by what they were for ([`SimNetwork::connections_dialled_for`]).
    dialled_for: [u64; sim::StreamClass::ALL.len()],
}

impl<'s> World<'s> {
    fn bytes_so_far(&self, h: usize) -> BytesSoFar {
        let p = port(h);
        BytesSoFar {
            links: self.net.bytes_sent(p) + self.net.bytes_received(p),
            streams: self.net.stream_bytes(p),
            dialled: self.net.connections_dialled(p),
            accepted: self.net.connections_accepted(p),
            dialled_for: self.net.connections_dialled_for(p),
        }
    }

    async fn start(sc: &'s Scenario, plan: Plan, seed: u64, report: bool) -> Result<World<'s>, TierAError> {
        let t0 = Instant::now();
        let stopwatch = crate::memory::Stopwatch::start();
        let links = Arc::new(links::Links::new(
            &plan,
            sc.network.jitter,
            sc.network.loss,
            sc.network.hole_punch.clone(),
            seed,
        ));
        let security = match sc.network.security {
            crate::scenario::Security::Noise => tidings_node::sim::Security::Noise,
            crate::scenario::Security::Plaintext => tidings_node::sim::Security::Plaintext,
        };
        let net = SimNetwork::with_security(links.clone(), security);
        // Milestones of a long set-up on stderr (not with --quiet): the wall time so far, the
        // process's resident size and the connection ends open, so that a set-up's growth shows.
        let wall = std::time::Instant::now();
        let watched = net.clone();
        let milestone = |what: &str| {
            if report {
                let rss = crate::memory::resident_bytes().map_or(f64::NAN, crate::memory::mib);
                eprintln!(
                    "tier A set-up: {what} ({:.0} s, {rss:.0} MiB resident, {} connection ends open)",
                    wall.elapsed().as_secs_f64(),
                    watched.open_connection_ends()
                );
            }
        };
        let clock = Clock::tokio(START_MS);
        let fail = |host: usize| {
            move |e: anyhow::Error| TierAError::Start {
                host,
                msg: format!("{e:#}"),
            }
        };

        let tuning = host_tuning(&sc.protocol);
        let mut relay_disks = Vec::new();
        let mut relay_addrs: Vec<Multiaddr> = Vec::new();
        let mut relays = Vec::new();
        let relay_gap = spread_gap(sc.relay_start_spread, plan.relays.len());
        for (ri, &h) in plan.relays.iter().enumerate() {
            if ri > 0 && !relay_gap.is_zero() {
                tokio::time::sleep(relay_gap).await;
            }
            let disk = HostDisk::relay(clock.now_ms(), Some(host_seed(seed, h))).map_err(fail(h))?;
            let boot: Vec<Multiaddr> = relay_addrs.first().cloned().into_iter().collect();
            let node = sim::start_relay_on(&net, port(h), &disk, boot, clock.clone(), &tuning)
                .await
                .map_err(fail(h))?;
            relay_addrs.push(SimNetwork::address(port(h)).with(Protocol::P2p(node.handle().peer_id())));
            relay_disks.push(disk);
            relays.push(Some(node));
            if a_tenth_short_of_all(ri + 1, plan.relays.len()) {
                milestone(&format!("{} of {} relays started", ri + 1, plan.relays.len()));
            }
        }

        milestone(&format!("{} relays started", relays.len()));
        let mut pr = rng::rng(seed, stream::POPULATION | (1 << 40));
        let mut disks = Vec::new();
        let mut hosts = Vec::new();
        for (ci, c) in plan.clients.iter().enumerate() {
            let disk = HostDisk::person(&format!("c{ci}"), clock.now_ms(), Some(host_seed(seed, c.host)))
                .map_err(fail(c.host))?;
            let home_relays: Vec<Multiaddr> = c.homes.iter().map(|&r| relay_addrs[r].clone()).collect();
            // One more relay to join the DHT through, besides the home relays.
            let extra = relay_addrs.get(pr.gen_range(0..relay_addrs.len().max(1))).cloned();
            hosts.push(PersonHost {
                port: port(c.host),
                bootstrap: extra.into_iter().collect(),
                home_relays,
                reachable: plan.hosts[c.host].nat == plan::Nat::Public,
                dht_server: plan.hosts[c.host].dht_server,
                tuning: tuning.clone(),
            });
            disks.push(disk);
        }
        let mut world = World {
            sc,
            net,
            links,
            clock,
            t0,
            setup_peak: None,
            setup_virtual: Duration::ZERO,
            stopwatch,
            setup_wall: Duration::ZERO,
            setup_cpu: None,
            bytes_at_start: Vec::new(),
            relay_disks,
            tuning,
            relay_addrs,
            relays,
            disks,
            hosts,
            accounts: Vec::new(),
            account_index: Arc::default(),
            cards: Vec::new(),
            clients: Vec::new(),
            group_ids: Vec::new(),
            seen: Shared::default(),
            samples: Vec::new(),
            events: Vec::new(),
            sent_count: 0,
            seed,
            plan,
        };

        // Everyone starts once to print their card and publish their user record and key
        // packages; those offline at the start then stop (but for the groups' makers among them),
        // as soon as that is done. The contacts are exchanged like cards handed over in person,
        // and the groups are made: those not running are invited while away and join when they
        // come online, as anyone does.
        let makers = world.group_makers();
        let keep: HashSet<usize> = makers.iter().copied().collect();
        let mut started: Vec<Option<Node>> = Vec::new();
        let mut devices: Vec<Option<[u8; 32]>> = Vec::new();
        let mut leaving: Vec<usize> = Vec::new();
        let mut first_publications = Vec::new();
        let clients = world.plan.clients.len();
        let gap = spread_gap(sc.start_spread, clients);
        for ci in 0..clients {
            if ci > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            let node = sim::start_person_on(&world.net, &world.hosts[ci], &world.disks[ci], world.clock.clone())
                .await
                .map_err(fail(world.plan.clients[ci].host))?;
            let h = node.handle();
            if a_tenth_short_of_all(ci + 1, clients) {
                milestone(&format!("{} of {clients} clients started", ci + 1));
            }
            world.accounts.push(*h.account().as_bytes());
            world.cards.push(h.card().to_uri());
            world.clients.push(None);
            devices.push(h.devices().ok().and_then(|d| d.first().map(|c| c.device_key)));
            started.push(Some(node));
            if !world.plan.clients[ci].online_at(0) && !keep.contains(&ci) {
                leaving.push(ci);
            }
            // A device publishes its user record on its first start, as `tidings run` does; the
            // run's publisher then finds it published and republishes it an interval later. So
            // the publications are spread like the starts, not all at the run's first second.
            // One that fails is left to the run's publisher, which finds it due.
            first_publications.push(tokio::spawn(async move {
                let _ = h.publish_record().await;
            }));
            world
                .leave_when_ready(&mut started, &mut leaving, &devices, &first_publications)
                .await;
        }
        milestone(&format!("{clients} clients started"));
        world.account_index = Arc::new(
            world
                .accounts
                .iter()
                .enumerate()
                .map(|(i, a)| (bs58::encode(a).into_string(), i))
                .collect(),
        );
        let now_ms = world.clock.now_ms();
        for (ci, node) in started.iter().enumerate() {
            for &other in &world.plan.clients[ci].contacts {
                let added = match node {
                    Some(node) => node.handle().add_contact(&world.cards[other], None).await.map(drop),
                    None => world.disks[ci].add_contact(&world.cards[other], now_ms),
                };
                if let Err(e) = added {
                    return Err(TierAError::Start {
                        host: world.plan.clients[ci].host,
                        msg: format!("adding a contact: {e}"),
                    });
                }
            }
        }
        set_up_wait(
            "clients offline at the start had not published key packages and their user record",
            async || {
                world
                    .leave_when_ready(&mut started, &mut leaving, &devices, &first_publications)
                    .await;
                leaving.len()
            },
        )
        .await;
        milestone("key packages of the clients offline at the start published");
        let group_gap = spread_gap(sc.group_spread, world.plan.groups.len());
        world.make_groups(&started, &devices, &makers, group_gap).await;
        for (ci, slot) in started.iter_mut().enumerate() {
            if !world.plan.clients[ci].online_at(0)
                && let Some(node) = slot.take()
            {
                node.shutdown().await;
            }
        }
        milestone(&format!("{} groups made", world.group_ids.iter().flatten().count()));
        for p in first_publications {
            let _ = p.await;
        }
        // The run's clock starts now: the set-up above is what happened before it.
        world.setup_virtual = world.t0.elapsed();
        world.t0 = Instant::now();
        (world.setup_wall, world.setup_cpu) = world.stopwatch.lap();
        world.bytes_at_start = (0..world.plan.hosts.len()).map(|h| world.bytes_so_far(h)).collect();
        world.setup_peak = crate::memory::close_phase();
        for (ci, node) in started.into_iter().enumerate() {
            let Some(node) = node else { continue };
            if world.plan.clients[ci].online_at(0) {
                let watcher = world.watch(ci, node.handle());
                let publisher = world.publish(ci, node.handle());
                world.clients[ci] = Some(Running {
                    node,
                    watcher,
                    publisher,
                });
                let host = host32(world.plan.clients[ci].host);
                world.events.push((0, TraceEvent::Up { node: host }));
            } else {
                node.shutdown().await;
            }
        }
        Ok(world)
    }

    /// Who makes each group: its first member online at the start, or its first member if none
    /// is.
    fn group_makers(&self) -> Vec<usize> {
        self.plan
            .groups
            .iter()
            .map(|g| {
                let online = g.members.iter().find(|&&m| self.plan.clients[m].online_at(0));
                online.or(g.members.first()).copied().unwrap_or(0)
            })
            .collect()
    }

    /// Makes the workload's groups once every running member's key packages are on its home
    /// relays: each group's maker (`makers[g]`, running) adds the others' cards and creates it,
    /// group `g` at `g * gap` after that (all at once if `gap` is zero), inviting those who are not
    /// running with key packages from their relays; then waits (in virtual time, at most
    /// [`PROVISION_WAIT`]) until every running member has joined. The others join from their
    /// mailboxes when they come online. A group that could not be made is left out of the run,
    /// and said so. `devices[ci]` is client `ci`'s device key.
    async fn make_groups(
        &mut self,
        started: &[Option<Node>],
        devices: &[Option<[u8; 32]>],
        makers: &[usize],
        gap: Duration,
    ) {
        if self.plan.groups.is_empty() {
            return;
        }
        // The members' key packages on their relays first, as for anyone who has run the app
        // once: a member whose device cannot be reached yet (no circuit reservation) is invited
        // with one of those.
        let members: HashSet<usize> = self
            .plan
            .groups
            .iter()
            .flat_map(|g| g.members.iter().copied())
            .collect();
        set_up_wait("group members had not published key packages", async || {
            members
                .iter()
                .filter(|&&ci| started[ci].is_some())
                .filter(|&&ci| devices[ci].is_some_and(|d| !self.key_packages_published(ci, &d)))
                .count()
        })
        .await;
        let mut tasks = Vec::with_capacity(self.plan.groups.len());
        for (g, group) in self.plan.groups.iter().enumerate() {
            let maker = makers[g];
            let Some(creator) = started[maker].as_ref().map(Node::handle) else {
                tasks.push(tokio::spawn(async move {
                    Err(format!("its maker, client {maker}, is not running"))
                }));
                continue;
            };
            let others: Vec<usize> = group.members.iter().copied().filter(|&m| m != maker).collect();
            let accounts: Vec<String> = others
                .iter()
                .map(|&m| bs58::encode(self.accounts[m]).into_string())
                .collect();
            let others: Vec<String> = others.iter().map(|&m| self.cards[m].clone()).collect();
            let at = gap * u32::try_from(g).unwrap_or(u32::MAX);
            tasks.push(tokio::spawn(async move {
                if !at.is_zero() {
                    tokio::time::sleep(at).await;
                }
                for card in &others {
                    creator.add_contact(card, None).await.map_err(|e| e.to_string())?;
                }
                let members: Vec<&str> = accounts.iter().map(String::as_str).collect();
                let view = creator
                    .create_group(&format!("g{g}"), &members)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<String, String>(view.id)
            }));
        }
        let mut failed = Vec::new();
        for (g, task) in tasks.into_iter().enumerate() {
            match task.await {
                Ok(Ok(id)) => self.group_ids.push(Some(id)),
                Ok(Err(e)) => {
                    failed.push(format!("g{g}: {e}"));
                    self.group_ids.push(None);
                }
                Err(e) => {
                    failed.push(format!("g{g}: {e}"));
                    self.group_ids.push(None);
                }
            }
        }
        set_up_wait("group memberships not joined by the end of the set-up", async || {
            let mut waiting = 0usize;
            for (g, id) in self.group_ids.iter().enumerate() {
                let Some(id) = id else { continue };
                for &m in &self.plan.groups[g].members {
                    let Some(node) = started[m].as_ref().filter(|_| m != makers[g]) else {
                        continue;
                    };
                    if node.handle().group(id).await.is_err() {
                        waiting += 1;
                    }
                }
            }
            waiting
        })
        .await;
        if !failed.is_empty() {
            eprintln!(
                "tier A: {} of {} groups could not be made and are left out: {}",
                failed.len(),
                self.plan.groups.len(),
                failed.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            );
        }
    }

    /// Stops each client of `leaving` (offline at the start) whose key packages are on each of
    /// its home relays, as they are for anyone who has run the app once (a contact can then start
    /// a conversation while the client is away, as Tier B assumes from the start), and whose
    /// first user record publication is over; the others stay in `leaving`.
    async fn leave_when_ready(
        &self,
        started: &mut [Option<Node>],
        leaving: &mut Vec<usize>,
        devices: &[Option<[u8; 32]>],
        publications: &[JoinHandle<()>],
    ) {
        let mut still = Vec::with_capacity(leaving.len());
        for &ci in leaving.iter() {
            let ready = publications[ci].is_finished()
                && devices[ci].as_ref().is_none_or(|d| self.key_packages_published(ci, d));
            match started[ci].take() {
                Some(node) if ready => node.shutdown().await,
                Some(node) => {
                    started[ci] = Some(node);
                    still.push(ci);
                }
                None => {}
            }
        }
        *leaving = still;
    }

    /// Whether client `ci`'s device (key `device`) has key packages on each of its home relays.
    fn key_packages_published(&self, ci: usize, device: &[u8; 32]) -> bool {
        self.plan.clients[ci].homes.iter().all(|&ri| {
            self.relay_disks[ri]
                .mailboxes
                .as_ref()
                .is_none_or(|m| m.key_packages_held(device).unwrap_or(0) > 0)
        })
    }

    /// A task that reads a client's events into [`Seen`] (and sends the replies the workload
    /// asks for).
    fn watch(&self, ci: usize, h: NodeHandle) -> JoinHandle<()> {
        let mut rx = h.subscribe();
        let seen = self.seen.clone();
        let t0 = self.t0;
        let index = self.account_index.clone();
        let reply_p = self.sc.workload.reply_probability;
        let reply_delay = Duration::from_micros(self.sc.workload.reply_delay.micros());
        let mut rng: SimRng = rng::rng(self.seed, stream::WORKLOAD | (1 << 40) | ci as u64);
        let online = self.plan.clients[ci].online.clone();
        tokio::spawn(async move {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        lock(&seen).events_lagged += n;
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let now = since(t0);
                match ev {
                    NodeEvent::Message(m) if !m.outgoing => {
                        lock(&seen).displays.entry(m.id.clone()).or_default().push((ci, now));
                        // Only one-to-one messages get replies (as in Tier B).
                        if !m.chat.starts_with("c:") {
                            continue;
                        }
                        let Some(&from) = index.get(&m.sender) else { continue };
                        if reply_p > 0.0 && rng.r#gen::<f64>() < reply_p {
                            let at = now + u64::try_from(reply_delay.as_micros()).unwrap_or(0);
                            if online.iter().any(|&(a, b)| a <= at && at < b) {
                                spawn_send(
                                    h.clone(),
                                    seen.clone(),
                                    t0,
                                    ci,
                                    (To::Contact(from), m.sender.clone()),
                                    reply_delay,
                                    true,
                                );
                            }
                        }
                    }
                    NodeEvent::Delivered { id, .. } => {
                        lock(&seen).acked.entry(id).or_insert(now);
                    }
                    NodeEvent::Stored { id, .. } => {
                        lock(&seen).stored.entry(id).or_insert(now);
                    }
                    _ => {}
                }
            }
        })
    }

    async fn drive(&mut self, progress: &mut Option<&mut dyn FnMut(u64, u64)>) -> Result<(), TierAError> {
        let end = self.plan.end;
        let mut timeline: Vec<(u64, Action)> = Vec::new();
        for (ci, c) in self.plan.clients.iter().enumerate() {
            for &(a, b) in &c.online {
                if a > 0 {
                    timeline.push((a, Action::Up(ci)));
                }
                if b < end {
                    timeline.push((b, Action::Down(ci)));
                }
            }
        }
        for (i, s) in self.plan.sends.iter().enumerate() {
            timeline.push((s.at, Action::Send(i)));
        }
        for (i, l) in self.plan.lookups.iter().enumerate() {
            timeline.push((l.at, Action::Lookup(i)));
        }
        for (fi, f) in self.plan.faults.iter().enumerate() {
            let (at, back) = match f {
                PlannedFault::Partition { at, heal, .. } => (*at, *heal),
                PlannedFault::Relays { at, back, .. } => (*at, *back),
            };
            timeline.push((at, Action::FaultStart(fi)));
            if let Some(b) = back.filter(|b| *b < end) {
                timeline.push((b, Action::FaultEnd(fi)));
            }
        }
        let every = self.sc.metrics.sample_every.micros().max(1);
        let mut t = 0;
        while t <= end {
            timeline.push((t, Action::Sample));
            t += every;
        }
        timeline.sort();
        for (at, action) in timeline {
            tokio::time::sleep_until(self.t0 + Duration::from_micros(at)).await;
            match action {
                Action::Up(ci) => self.up(ci).await?,
                Action::Down(ci) => self.down(ci).await,
                Action::Send(i) => self.send(i),
                Action::Lookup(i) => self.lookup(i),
                Action::FaultStart(fi) => self.fault(fi, true).await?,
                Action::FaultEnd(fi) => self.fault(fi, false).await?,
                Action::Sample => {
                    self.sample();
                    if let Some(p) = progress.as_mut() {
                        p(since(self.t0), end);
                    }
                }
            }
        }
        tokio::time::sleep_until(self.t0 + Duration::from_micros(end)).await;
        Ok(())
    }

    async fn up(&mut self, ci: usize) -> Result<(), TierAError> {
        if self.clients[ci].is_some() {
            return Ok(());
        }
        let node = sim::start_person_on(&self.net, &self.hosts[ci], &self.disks[ci], self.clock.clone())
            .await
            .map_err(|e| TierAError::Start {
                host: self.plan.clients[ci].host,
                msg: format!("{e:#}"),
            })?;
        // As `tidings run` does at every start: a device without home relays
        // connects to its contacts; one with relays does nothing.
        node.handle().reconnect_contacts().await;
        let watcher = self.watch(ci, node.handle());
        let publisher = self.publish(ci, node.handle());
        self.clients[ci] = Some(Running {
            node,
            watcher,
            publisher,
        });
        let host = host32(self.plan.clients[ci].host);
        self.events.push((since(self.t0), TraceEvent::Up { node: host }));
        Ok(())
    }

    async fn down(&mut self, ci: usize) {
        if let Some(r) = self.clients[ci].take() {
            r.stop().await;
            let host = host32(self.plan.clients[ci].host);
            self.events.push((
                since(self.t0),
                TraceEvent::Down {
                    node: host,
                    silent: false,
                },
            ));
        }
    }

    fn send(&mut self, i: usize) {
        let s = self.plan.sends[i];
        let Some(r) = &self.clients[s.from] else { return };
        let target = match s.group {
            Some(g) => {
                // A group the set-up could not make sends nothing.
                let Some(Some(id)) = self.group_ids.get(g) else { return };
                (To::Group(g), id.clone())
            }
            None => (To::Contact(s.to), bs58::encode(self.accounts[s.to]).into_string()),
        };
        self.sent_count += 1;
        spawn_send(
            r.node.handle(),
            self.seen.clone(),
            self.t0,
            s.from,
            target,
            Duration::ZERO,
            false,
        );
    }

    /// For each planned group, (client, epoch, state fingerprint) of every member running now.
    async fn group_states(&self) -> Vec<Vec<(usize, u64, String)>> {
        let mut out = Vec::with_capacity(self.plan.groups.len());
        for (g, group) in self.plan.groups.iter().enumerate() {
            let mut views = Vec::new();
            if let Some(Some(id)) = self.group_ids.get(g) {
                for &ci in &group.members {
                    let Some(r) = &self.clients[ci] else { continue };
                    if let Ok(v) = r.node.handle().group(id).await
                        && !v.left
                    {
                        views.push((ci, v.epoch, v.fingerprint));
                    }
                }
            }
            out.push(views);
        }
        out
    }

    /// Looks a contact's user record up in the DHT, in its own task, as a user adding a contact
    /// by account key would (`NodeHandle::lookup_record`). Only records whose owner has been
    /// online by then, and so has published it, are looked up: Tier B places every record at the
    /// start, and a lookup that cannot succeed measures nothing.
    fn lookup(&mut self, i: usize) {
        let l = self.plan.lookups[i];
        let Some(r) = &self.clients[l.from] else { return };
        if self.plan.clients[l.owner].online.first().is_none_or(|iv| iv.0 > l.at) {
            return;
        }
        let Ok(account) = tidings_protocol::identity::AccountId::from_bytes(&self.accounts[l.owner]) else {
            return;
        };
        let (h, seen, t0, host) = (
            r.node.handle(),
            self.seen.clone(),
            self.t0,
            self.plan.clients[l.from].host,
        );
        tokio::spawn(async move {
            let started = since(t0);
            let found = h.lookup_record(&account).await;
            let mut seen = lock(&seen);
            match found {
                Err(NodeError::Net(NetError::Stopped)) => seen.lookups_abandoned += 1,
                found => seen.dht_done(GET_RECORD, host, found.is_ok(), started, since(t0)),
            }
        });
    }

    /// Publishes the client's user record while it is online, as `tidings run` does (the node's
    /// own publisher: at once, then every `record_republish`, sooner again after a failure).
    fn publish(&self, ci: usize, h: NodeHandle) -> JoinHandle<()> {
        let (seen, t0, host) = (self.seen.clone(), self.t0, self.plan.clients[ci].host);
        let period = Duration::from_micros(self.sc.protocol.record_republish.micros());
        h.spawn_observed_record_publisher(period, move |ok, took| {
            let ended = since(t0);
            let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            lock(&seen).dht_done(PUT_RECORD, host, ok, ended.saturating_sub(took), ended);
        })
    }

    async fn fault(&mut self, fi: usize, start: bool) -> Result<(), TierAError> {
        self.events.push((
            since(self.t0),
            TraceEvent::Fault {
                index: fi as u32,
                start,
            },
        ));
        match self.plan.faults[fi].clone() {
            PlannedFault::Partition { side, .. } => self.links.set_cut(start.then_some(side)),
            PlannedFault::Relays { relays, wipe, .. } => {
                for ri in relays {
                    if start {
                        if let Some(node) = self.relays[ri].take() {
                            node.shutdown().await;
                        }
                        if wipe && let Some(m) = &self.relay_disks[ri].mailboxes {
                            let limits = m.limits().clone();
                            let fresh = tidings_store::mailbox::Mailboxes::open_in_memory(limits).map_err(|e| {
                                TierAError::Start {
                                    host: self.plan.relays[ri],
                                    msg: e.to_string(),
                                }
                            })?;
                            self.relay_disks[ri].mailboxes = Some(Arc::new(fresh));
                        }
                    } else if self.relays[ri].is_none() {
                        let h = self.plan.relays[ri];
                        let boot: Vec<Multiaddr> = self
                            .relay_addrs
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| *i != ri)
                            .map(|(_, a)| a.clone())
                            .take(1)
                            .collect();
                        let node = sim::start_relay_on(
                            &self.net,
                            port(h),
                            &self.relay_disks[ri],
                            boot,
                            self.clock.clone(),
                            &self.tuning,
                        )
                        .await
                        .map_err(|e| TierAError::Start {
                            host: h,
                            msg: format!("{e:#}"),
                        })?;
                        self.relays[ri] = Some(node);
                        self.events
                            .push((since(self.t0), TraceEvent::RelayBack { node: host32(h) }));
                    }
                }
            }
        }
        Ok(())
    }

    fn sample(&mut self) {
        let (mut total, mut max) = (0u64, 0u64);
        for (ri, d) in self.relay_disks.iter().enumerate() {
            if self.relays[ri].is_none() {
                continue;
            }
            if let Some(m) = &d.mailboxes
                && let Ok(st) = m.stats()
            {
                total += st.envelopes;
                max = max.max(st.envelopes);
            }
        }
        let outbox: u64 = self.disks.iter().filter_map(|d| d.store.outbox_len().ok()).sum();
        let online_clients = self.clients.iter().filter(|c| c.is_some()).count() as u64;
        let relays_up = self.relays.iter().filter(|r| r.is_some()).count() as u64;
        let hosts_up = (online_clients + relays_up).max(1);
        self.samples.push(Sample {
            t_s: since(self.t0) as f64 / 1e6,
            online_clients,
            relays_up,
            mailbox_total: total,
            mailbox_max_relay: max,
            outbox_pending: outbox,
            messages_sent: self.sent_count,
            connections_per_host: Some(self.net.open_connection_ends() as f64 / hosts_up as f64),
            connections_opened: Some(self.net.connections_opened()),
            rss_bytes: crate::memory::resident_bytes(),
        });
    }

    /// Stops every node, checks the invariants against what the nodes showed and what their
    /// stores hold, and turns it all into the run's figures.
    async fn finish(&mut self, out: Option<Box<dyn std::io::Write + '_>>) -> Result<RunResult, TierAError> {
        let end = self.plan.end;
        // What the measured run took, read before anything below adds to it.
        let (run_wall, run_cpu) = self.stopwatch.lap();
        // A run too short for the kernel's 10 ms ticks has no speed to report.
        let run_cpu = run_cpu.filter(|&s| s > 0.0);
        // How many connections the nodes hold at the end: the main driver of
        // Tier A's cost per node (each one is pinged, polled and buffered).
        let counts = |nodes: Vec<NodeHandle>| async move {
            let mut counts = Vec::new();
            for h in nodes {
                if let Ok(s) = h.status().await {
                    counts.push(s.connected_peers);
                }
            }
            counts
        };
        let mean_max = |counts: &[usize]| {
            let mean = counts.iter().sum::<usize>() as f64 / counts.len().max(1) as f64;
            (mean, counts.iter().copied().max().unwrap_or(0))
        };
        // Clients others can dial are DHT servers: every lookup may dial them.
        let public = |i: usize| self.plan.hosts[self.plan.clients[i].host].nat == plan::Nat::Public;
        let clients_where = |want_public: bool| -> Vec<NodeHandle> {
            (self.clients.iter().enumerate())
                .filter(|(i, _)| public(*i) == want_public)
                .filter_map(|(_, r)| r.as_ref().map(|r| r.node.handle()))
                .collect()
        };
        let public_counts = counts(clients_where(true)).await;
        let nat_counts = counts(clients_where(false)).await;
        let relay_counts = counts(self.relays.iter().flatten().map(|n| n.handle()).collect()).await;
        let (c_mean, c_max) = mean_max(&[public_counts.as_slice(), &nat_counts].concat());
        let (p_mean, p_max) = mean_max(&public_counts);
        let (n_mean, n_max) = mean_max(&nat_counts);
        let (r_mean, r_max) = mean_max(&relay_counts);
        let errors = lock(&self.seen).send_errors.clone();
        if !errors.is_empty() {
            let list: Vec<String> = errors.iter().map(|(kind, n)| format!("{n} × {kind}")).collect();
            eprintln!("tier A: sends that failed: {}", list.join(", "));
        }
        eprintln!(
            "tier A at the end: clients online hold {c_mean:.1} connections on average (most {c_max}), \
             relays {r_mean:.1} (most {r_max}); public clients {p_mean:.1} (most {p_max}), \
             clients behind a NAT {n_mean:.1} (most {n_max})"
        );
        // Read before the nodes stop. The set-up runs every client at once (to hand out cards and
        // make groups), so its peak is reported apart from the measured run's. NaN off Linux.
        // Both count the `rss_mib` samples (`memory::resident_bytes`).
        let peak_mib = crate::memory::peak_bytes().map_or(f64::NAN, crate::memory::mib);
        let run_peak_mib = crate::memory::phase_peak_bytes().map_or(f64::NAN, crate::memory::mib);
        let setup_peak_mib = self.setup_peak.map_or(f64::NAN, crate::memory::mib);
        let hosts = self.plan.hosts.len().max(1) as f64;
        let per_node_mib = peak_mib / hosts;
        if peak_mib.is_finite() {
            eprintln!(
                "tier A memory: peak {:.2} GiB, {per_node_mib:.2} MiB per node; set-up {:.2} GiB, \
                 measured run {:.2} GiB ({:.2} MiB per node)",
                peak_mib / 1024.0,
                setup_peak_mib / 1024.0,
                run_peak_mib / 1024.0,
                run_peak_mib / hosts,
            );
        }
        // Simulated node-seconds of the measured run.
        let node_seconds = hosts * end as f64 / 1e6;
        if let (Some(setup_cpu), Some(run_cpu)) = (self.setup_cpu, run_cpu) {
            eprintln!(
                "tier A time: set-up {:.0} s of wall time, {setup_cpu:.0} s of CPU; measured run {:.0} s of \
                 wall time, {run_cpu:.0} s of CPU: {:.0} node-seconds per CPU second",
                self.setup_wall.as_secs_f64(),
                run_wall.as_secs_f64(),
                node_seconds / run_cpu,
            );
        }
        let states = self.group_states().await;
        for slot in &mut self.clients {
            if let Some(r) = slot.take() {
                r.stop().await;
            }
        }
        for slot in &mut self.relays {
            if let Some(n) = slot.take() {
                n.shutdown().await;
            }
        }
        let mut seen_guard = std::mem::take(&mut *lock(&self.seen));
        let s = &mut seen_guard;
        s.sent.sort_by_key(|m| (m.3, m.1, m.2));
        let mut violations: Vec<Violation> = Vec::new();
        let mut violation_count = 0u64;
        let mut violate = |invariant: &'static str, detail: String, t: u64| {
            violation_count += 1;
            if violations.len() < MAX_VIOLATIONS_KEPT {
                violations.push(Violation {
                    invariant,
                    detail,
                    time_s: t as f64 / 1e6,
                });
            }
        };

        // What each client's store holds at the end, by message id.
        let mut held: Vec<HashMap<String, u32>> = vec![HashMap::new(); self.disks.len()];
        for (ci, d) in self.disks.iter().enumerate() {
            let group_chats = self.plan.clients[ci].groups.iter().filter_map(|&g| {
                let gid = hex::decode(self.group_ids[g].as_deref()?).ok()?;
                Some(tidings_protocol::group::group_chat_key(&gid))
            });
            let chats: Vec<[u8; 32]> = self.plan.clients[ci]
                .contacts
                .iter()
                .map(|&other| self.accounts[other])
                .chain(group_chats)
                .collect();
            for chat in chats {
                if let Ok(list) = d.store.list_messages(&chat) {
                    for m in list.iter().filter(|m| !m.outgoing) {
                        *held[ci].entry(hex::encode(m.id)).or_default() += 1;
                    }
                }
            }
        }
        let groups = check_groups(&states);
        for fork in groups.forks {
            violate("forked_group", fork, end);
        }
        let known: HashSet<&str> = s.sent.iter().map(|m| m.0.as_str()).collect();
        for (id, shows) in &s.displays {
            if !known.contains(id.as_str()) {
                violate(
                    "plaintext_to_non_member",
                    format!("message {id} shown but never sent"),
                    shows[0].1,
                );
            }
        }
        let mut records = Vec::with_capacity(s.sent.len());
        let mut trace = std::mem::take(&mut self.events);
        let (mut acked, mut lost_custody, mut group_sent) = (0u64, 0u64, 0u64);
        let mut deliveries = 0u32;
        // (sent, sender, recipient, ready, delivered) of every delivery, for the partitions' figures.
        let mut all: Vec<(u64, usize, usize, u64, u64)> = Vec::new();
        for (mi, (id, from, to, at)) in s.sent.iter().enumerate() {
            let shows = s.displays.get(id).map(Vec::as_slice).unwrap_or(&[]);
            // One delivery per recipient: the contact, or every other member of the group.
            let recipients: Vec<usize> = match *to {
                To::Contact(c) => vec![c],
                To::Group(g) => self.plan.groups[g]
                    .members
                    .iter()
                    .copied()
                    .filter(|m| m != from)
                    .collect(),
            };
            for &(who, t) in shows {
                if !recipients.contains(&who) {
                    violate(
                        "plaintext_to_non_member",
                        format!("message {id} for {to:?} shown by client {who}"),
                        t,
                    );
                }
            }
            // For a group message, the relay's custody receipt is the sender's acknowledgement;
            // for one to one, the recipient device's ack (or a relay's receipt while it is away).
            let ack = s.acked.get(id).copied();
            let custody = s.stored.get(id).copied();
            if let To::Group(_) = to {
                group_sent += 1;
            } else if let Some(t) = ack {
                acked += 1;
                if !held[recipients[0]].contains_key(id) {
                    violate(
                        "acknowledged_message_lost",
                        format!("message {id} from client {from} acknowledged by client {to:?}, not in its store"),
                        t,
                    );
                }
            }
            trace.push((
                *at,
                TraceEvent::Sent {
                    msg: mi as u32,
                    from: host32(self.plan.clients[*from].host),
                    to: match *to {
                        To::Contact(c) => host32(self.plan.clients[c].host),
                        To::Group(g) => host32(g),
                    },
                    group: matches!(to, To::Group(_)),
                    size: 0,
                },
            ));
            for &rc in &recipients {
                let mut delivered = NEVER;
                for &(who, t) in shows.iter().filter(|(who, _)| *who == rc) {
                    if delivered != NEVER {
                        violate(
                            "displayed_twice",
                            format!("message {id} shown twice by client {who}"),
                            t,
                        );
                    } else {
                        delivered = t;
                    }
                }
                let stored = held[rc].get(id).copied().unwrap_or(0);
                if stored > 1 {
                    violate(
                        "displayed_twice",
                        format!("message {id} stored twice by client {rc}"),
                        end,
                    );
                }
                if delivered != NEVER && stored == 0 {
                    violate(
                        "acknowledged_message_lost",
                        format!("message {id} shown by client {rc}, not in its store"),
                        delivered,
                    );
                }
                if custody.is_some() && delivered == NEVER {
                    lost_custody += 1;
                }
                let path = match custody {
                    Some(c) if c <= delivered => Path::Mailbox,
                    _ => Path::Direct,
                };
                let c_to = &self.plan.clients[rc];
                let ready = c_to.ready_after(*at).unwrap_or(NEVER);
                let deadline = self.sc.metrics.deadline.micros();
                let recipient_left = ready != NEVER
                    && delivered.saturating_sub(ready) > deadline
                    && c_to
                        .online_until(ready)
                        .is_some_and(|u| u < ready.saturating_add(deadline));
                let held_by = ack.or(custody).unwrap_or(NEVER);
                let sender_left = self.plan.clients[*from].online_until(*at).is_some_and(|u| u < held_by);
                all.push((*at, *from, rc, ready, delivered));
                records.push(DeliveryRecord {
                    sent: *at,
                    ready,
                    delivered,
                    path: (delivered != NEVER).then_some(path),
                    recipient_left,
                    sender_left,
                });
                if delivered != NEVER {
                    trace.push((
                        delivered,
                        TraceEvent::Delivered {
                            delivery: deliveries,
                            node: host32(c_to.host),
                            path,
                        },
                    ));
                }
                deliveries += 1;
            }
        }

        let mut summary: Vec<(String, f64)> = Vec::new();
        let mut put = |name: &str, v: f64| summary.push((name.to_string(), v));
        put("nodes", self.plan.hosts.len() as f64);
        put("relays", self.plan.relays.len() as f64);
        put("clients", self.plan.clients.len() as f64);
        put("duration_s", end as f64 / 1e6);
        put("messages_sent", s.sent.len() as f64);
        put("sends_failed", s.send_errors.values().sum::<u64>() as f64);
        put("replies", s.replies as f64);
        put("events_lagged", s.events_lagged as f64);
        put("messages_acked", acked as f64);
        put("groups", self.plan.groups.len() as f64);
        put("groups_made", self.group_ids.iter().flatten().count() as f64);
        put("group_messages_sent", group_sent as f64);
        // Of the members running at the end, the share at their group's latest epoch there.
        put(
            "group_members_at_latest_epoch",
            if groups.members == 0 {
                f64::NAN
            } else {
                groups.at_latest as f64 / groups.members as f64
            },
        );
        put("group_epoch_lag_max", groups.lag_max as f64);
        // The process's peak resident memory over the run, whole and per node.
        put("memory_peak_mib", peak_mib);
        put("memory_per_node_mib", per_node_mib);
        put("memory_setup_peak_mib", setup_peak_mib);
        put("setup_virtual_s", self.setup_virtual.as_secs_f64());
        // What the set-up and the measured run took of wall time and of the process's CPU time
        // (NaN off Linux), and the speed: simulated node-seconds of the measured run per second of
        // CPU, which a shared machine moves less than it moves the wall time.
        put("wall_setup_s", self.setup_wall.as_secs_f64());
        put("cpu_setup_s", self.setup_cpu.unwrap_or(f64::NAN));
        put("wall_run_s", run_wall.as_secs_f64());
        put("cpu_run_s", run_cpu.unwrap_or(f64::NAN));
        put("node_seconds_per_cpu_s", node_seconds / run_cpu.unwrap_or(f64::NAN));
        put("memory_run_peak_mib", run_peak_mib);
        put("memory_run_per_node_mib", run_peak_mib / hosts);
        // How many commits the groups went through (epoch 1: the members were added).
        put(
            "group_epoch_mean",
            if groups.latest.is_empty() {
                f64::NAN
            } else {
                groups.latest.iter().sum::<u64>() as f64 / groups.latest.len() as f64
            },
        );
        put("custody_not_delivered_by_end", lost_custody as f64);
        let (bins, lat) = delivery_figures(self.sc, end, records.into_iter(), &mut put);
        for (fi, f) in self.plan.faults.iter().enumerate() {
            let PlannedFault::Partition { at: start, heal, .. } = f else {
                continue;
            };
            let heal = heal.unwrap_or(end).min(end);
            let cut = || all.iter().filter(|d| *start <= d.0 && d.0 < heal);
            // Undelivered at the heal, with both ends online then.
            let backlog: Vec<u64> = cut()
                .filter(|d| {
                    (d.4 == NEVER || d.4 > heal)
                        && self.plan.clients[d.1].online_at(heal)
                        && self.plan.clients[d.2].online_at(heal)
                })
                .map(|d| d.4)
                .collect();
            partition_figures(
                fi,
                self.sc.metrics.deadline.micros(),
                heal,
                cut().map(|d| (d.3, d.4)),
                &backlog,
                &mut put,
            );
        }
        let mut all: Vec<f32> = lat.iter().flatten().copied().collect();
        all.sort_unstable_by(f32::total_cmp);
        put("invariant_violations", violation_count as f64);
        dht_figures(&mut s.dht, false, &mut put);
        put("dht_get_record_abandoned", s.lookups_abandoned as f64);
        trace.append(&mut s.dht_trace);

        let hours = end as f64 / 3.6e9;
        let mut bytes_q = Vec::new();
        for (role, relay) in [("client", false), ("relay", true)] {
            // The measured run's bytes: what each host moved since the set-up.
            let run: Vec<BytesSoFar> = (0..self.plan.hosts.len())
                .filter(|&h| self.plan.hosts[h].relay == relay)
                .map(|h| {
                    let (now, before) = (
                        self.bytes_so_far(h),
                        self.bytes_at_start.get(h).copied().unwrap_or_default(),
                    );
                    BytesSoFar {
                        links: now.links.saturating_sub(before.links),
                        streams: std::array::from_fn(|i| now.streams[i].saturating_sub(before.streams[i])),
                        dialled: now.dialled.saturating_sub(before.dialled),
                        accepted: now.accepted.saturating_sub(before.accepted),
                        dialled_for: std::array::from_fn(|i| now.dialled_for[i].saturating_sub(before.dialled_for[i])),
                    }
                })
                .collect();
            // Connections made in the measured run, per host of the role and hour: each costs a
            // handshake, identify both ways and the handlers of every protocol.
            for (what, n) in [
                ("dialled", run.iter().map(|b| b.dialled).sum::<u64>()),
                ("accepted", run.iter().map(|b| b.accepted).sum::<u64>()),
            ] {
                put(
                    &format!("connections_{what}_per_{role}_hour"),
                    n as f64 / run.len().max(1) as f64 / hours.max(1e-9),
                );
            }
            // What the dials were for: the first protocol each opened beyond identify, ping and
            // AutoNAT ("none": it opened only those).
            let per_host_hour = |n: u64| n as f64 / run.len().max(1) as f64 / hours.max(1e-9);
            let mut purposeful = 0;
            for (i, class) in sim::StreamClass::ALL.iter().enumerate() {
                let n = run.iter().map(|b| b.dialled_for[i]).sum::<u64>();
                purposeful += n;
                put(
                    &format!("connections_dialled_for_{}_per_{role}_hour", class.name()),
                    per_host_hour(n),
                );
            }
            let dialled = run.iter().map(|b| b.dialled).sum::<u64>();
            put(
                &format!("connections_dialled_for_none_per_{role}_hour"),
                per_host_hour(dialled.saturating_sub(purposeful)),
            );
            for (i, class) in sim::StreamClass::ALL.iter().enumerate() {
                let v = run.iter().map(|b| b.streams[i] as f32).collect();
                bytes_figures(role, class.name(), v, &mut put, &mut bytes_q);
            }
            // What no substream accounts for: handshakes, Noise's and yamux's framing.
            let v = run
                .iter()
                .map(|b| b.links.saturating_sub(b.streams.iter().sum()) as f32)
                .collect();
            bytes_figures(role, "connection", v, &mut put, &mut bytes_q);
            let v = run.iter().map(|b| b.links as f32).collect();
            let total = bytes_figures(role, "total", v, &mut put, &mut bytes_q);
            put(
                &format!("bytes_per_{role}_total_per_hour_mean"),
                total / hours.max(1e-9),
            );
        }
        let occ: Vec<f64> = self.samples.iter().map(|x| x.mailbox_total as f64).collect();
        put(
            "mailbox_occupancy_mean",
            if occ.is_empty() {
                f64::NAN
            } else {
                occ.iter().sum::<f64>() / occ.len() as f64
            },
        );
        put(
            "mailbox_occupancy_peak",
            self.samples.iter().map(|x| x.mailbox_total).max().unwrap_or(0) as f64,
        );

        for (_, invariant) in violations.iter().map(|v| (v.time_s, v.invariant)) {
            trace.push((end, TraceEvent::Violation { invariant }));
        }
        trace.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| trace_key(&a.1).cmp(&trace_key(&b.1))));
        let mut rec = Recorder::new(self.sc, self.seed, out);
        for (t, ev) in &trace {
            rec.record(*t, ev);
        }
        let (trace_hash, events_written, events_dropped) = rec.finish().map_err(TierAError::Events)?;
        Ok(RunResult {
            seed: self.seed,
            trace_hash,
            events_written,
            events_dropped,
            summary,
            samples: std::mem::take(&mut self.samples),
            delivery_bins: bins,
            latency_quantiles: latency_curves(&all, &lat),
            bytes_quantiles: bytes_q,
            violations,
            violation_count,
        })
    }
}

/// What the members of the groups showed at the end of a run.
#[derive(Debug, Default, PartialEq)]
struct GroupCheck {
    /// One line per pair of members at one epoch in different group states.
    forks: Vec<String>,
    /// Members seen, and of them those at their group's latest epoch among those seen.
    members: u64,
    at_latest: u64,
    /// The latest epoch of each group with a member seen.
    latest: Vec<u64>,
    /// The most epochs any member seen was behind its group's latest.
    lag_max: u64,
}

/// Checks "no forked group": members at one epoch share one group state (the same MLS epoch
/// authenticator). `states[g]` holds (client, epoch, state fingerprint) of group `g`'s members.
fn check_groups(states: &[Vec<(usize, u64, String)>]) -> GroupCheck {
    let mut out = GroupCheck::default();
    for (g, views) in states.iter().enumerate() {
        let latest = views.iter().map(|v| v.1).max().unwrap_or(0);
        if !views.is_empty() {
            out.latest.push(latest);
        }
        let mut by_epoch: HashMap<u64, (usize, &str)> = HashMap::new();
        for (ci, epoch, fingerprint) in views {
            out.members += 1;
            out.at_latest += u64::from(*epoch == latest);
            out.lag_max = out.lag_max.max(latest - epoch);
            let first = by_epoch.entry(*epoch).or_insert((*ci, fingerprint.as_str()));
            if first.1 != fingerprint {
                out.forks.push(format!(
                    "group g{g} at epoch {epoch}: clients {} and {ci} are in different group states",
                    first.0
                ));
            }
        }
    }
    out
}

/// Sends one message in its own task, so that the run goes on while the sender's node works
/// (a first message sets up the conversation over the network). `target` is whom it is for and
/// their address: an account for a contact, a group id for a group.
fn spawn_send(
    h: NodeHandle,
    seen: Shared,
    t0: Instant,
    from: usize,
    (to, address): (To, String),
    after: Duration,
    reply: bool,
) {
    tokio::spawn(async move {
        if !after.is_zero() {
            tokio::time::sleep(after).await;
        }
        let at = since(t0);
        let sent = match to {
            To::Contact(c) => h.send_text(&address, &format!("m{from}-{c}-{at}")).await,
            To::Group(g) => h.send_group(&address, &format!("m{from}-g{g}-{at}")).await,
        };
        match sent {
            Ok(m) => {
                let mut s = lock(&seen);
                s.sent.push((m.id, from, to, at));
                s.replies += u64::from(reply);
            }
            Err(e) => {
                // The error's first two parts ("kind: detail"), cut short; at most
                // MAX_SEND_ERROR_KINDS of them, the rest counted together.
                let text = e.to_string();
                let kind: String = text.splitn(3, ':').take(2).collect::<Vec<_>>().join(":");
                let mut kind: String = kind.chars().take(100).collect();
                let mut s = lock(&seen);
                if s.send_errors.len() >= MAX_SEND_ERROR_KINDS && !s.send_errors.contains_key(&kind) {
                    kind = "others".into();
                }
                *s.send_errors.entry(kind).or_default() += 1;
            }
        }
    });
}

/// Asks `pending` every 500 ms of virtual time until it answers 0 or [`PROVISION_WAIT`] has
/// passed, and then says how many were still pending (`what` they were).
async fn set_up_wait(what: &str, mut pending: impl AsyncFnMut() -> usize) {
    let deadline = Instant::now() + PROVISION_WAIT;
    loop {
        let n = pending().await;
        if n == 0 {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("tier A: {n} {what}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The seed of host `h`'s identity in a run of `seed`.
fn host_seed(seed: u64, h: usize) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::new()
        .chain_update(b"tidings-sim/host/")
        .chain_update(seed.to_le_bytes())
        .chain_update((h as u64).to_le_bytes())
        .finalize()
        .into()
}

fn host32(h: usize) -> u32 {
    u32::try_from(h).unwrap_or(u32::MAX)
}

/// A total order among events at the same time, so the trace does not depend on task order.
fn trace_key(ev: &TraceEvent) -> (u8, u64) {
    match ev {
        TraceEvent::Fault { index, start } => (0, u64::from(*index) << 1 | u64::from(*start)),
        TraceEvent::RelayBack { node } => (1, u64::from(*node)),
        TraceEvent::Down { node, .. } => (2, u64::from(*node)),
        TraceEvent::Up { node } => (3, u64::from(*node)),
        TraceEvent::Sent { msg, .. } => (4, u64::from(*msg)),
        TraceEvent::Delivered { delivery, .. } => (5, u64::from(*delivery)),
        TraceEvent::Lookup { origin, .. } => (6, u64::from(*origin)),
        TraceEvent::Lost { delivery, .. } => (7, u64::from(*delivery)),
        TraceEvent::Violation { .. } => (8, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_at_one_epoch_in_different_states_are_a_fork_and_lagging_members_are_not() {
        let v = |ci: usize, epoch: u64, f: &str| (ci, epoch, f.to_string());
        let states = vec![
            // Converged, one member an epoch behind: no fork.
            vec![v(0, 3, "aa"), v(1, 3, "aa"), v(2, 2, "bb")],
            // Two states at epoch 5.
            vec![v(3, 5, "cc"), v(4, 5, "dd"), v(5, 5, "cc")],
            // Made but nobody running at the end.
            vec![],
        ];
        let check = check_groups(&states);
        assert_eq!(check.forks.len(), 1, "{:?}", check.forks);
        assert!(check.forks[0].contains("g1 at epoch 5"), "{:?}", check.forks);
        assert!(check.forks[0].contains("clients 3 and 4"), "{:?}", check.forks);
        assert_eq!((check.members, check.at_latest), (6, 5));
        assert_eq!(check.latest, [3, 5]);
        assert_eq!(check.lag_max, 1);
    }
}
