//! What the network simulator needs from a node: a libp2p transport over
//! simulated links instead of sockets.
//!
//! A [`SimNetwork`] is one simulated world's switchboard (never a global, so
//! that several worlds can run in one process). Each host has a port and
//! listens on `/memory/<port>`; a [`LinkModel`] says how long a chunk of bytes
//! takes from one host to another, or that the two cannot reach each other
//! (a partition). Connections are ordered byte streams whose chunks arrive
//! after the model's delay, on tokio's clock: with the clock paused
//! (`tokio::time::pause`), the world runs in virtual time and jumps from one
//! delivery to the next. libp2p's own timers follow the same clock (see
//! `patches/futures-timer`).
//!
//! Noise and yamux run over these streams exactly as over TCP, so everything
//! above the socket is the real node.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::future::{BoxFuture, Ready};
use futures::{AsyncRead, AsyncWrite, FutureExt as _};
use libp2p::Multiaddr;
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p::multiaddr::Protocol;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

pub mod count;
pub mod plain;

use count::HostBytes;
pub use count::StreamClass;

/// Most bytes in flight in one direction of a connection before the writer
/// waits (a send window).
const WINDOW: usize = 1024 * 1024;
/// Largest chunk one write puts on a link.
const MAX_CHUNK: usize = 64 * 1024;
/// How long a dial into a partition hangs before it fails.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections a listener may have waiting to be accepted.
const BACKLOG: usize = 256;
/// Event slots of a simulated node: the simulator reads events as they come,
/// and every slot costs memory from the start, times thousands of nodes.
const SIM_EVENT_QUEUE: usize = 1024;

/// How the simulated network carries bytes between two hosts.
pub trait LinkModel: Send + Sync + 'static {
    /// The one-way delay of `bytes` sent now from host `from` to host `to`,
    /// or `None` while they cannot reach each other.
    fn delay(&self, from: u64, to: u64, bytes: usize) -> Option<Duration>;

    /// Whether host `to` takes a connection that host `from` dials. A host
    /// behind a NAT drops unsolicited connections: the dial times out. Hole
    /// punching is a dial both ways at once, so a model may let a pair
    /// through with the punch's chance of success.
    fn accepts(&self, _from: u64, _to: u64) -> bool {
        true
    }
}

/// Every link the same fixed one-way delay: the simplest world.
#[derive(Debug, Clone, Copy)]
pub struct FixedDelay(pub Duration);

impl LinkModel for FixedDelay {
    fn delay(&self, _from: u64, _to: u64, _bytes: usize) -> Option<Duration> {
        Some(self.0)
    }
}

/// One simulated world's switchboard: who listens on which port.
#[derive(Clone)]
pub struct SimNetwork {
    hub: Arc<Mutex<HashMap<u64, mpsc::Sender<Incoming>>>>,
    model: Arc<dyn LinkModel>,
    security: Security,
    /// What each host has sent and received.
    bytes: Arc<Mutex<HashMap<u64, Arc<HostBytes>>>>,
    conns: Arc<ConnCount>,
}

/// Connections of one world: how many ends are open now and how many
/// connections were ever opened.
#[derive(Default)]
struct ConnCount {
    open_ends: AtomicU64,
    opened: AtomicU64,
}

impl std::fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNetwork").finish_non_exhaustive()
    }
}

struct Incoming {
    conn: SimConn,
    from: u64,
}

/// How the hosts of a simulated world secure their connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Security {
    /// Noise, as the product does.
    #[default]
    Noise,
    /// An exchange of public keys ([`plain::PlainIds`]): peer ids are still
    /// exchanged and checked, but nothing is encrypted or authenticated by
    /// a handshake. Cheaper in memory and CPU for the largest runs, where
    /// no adversary sits on the links; messages stay end-to-end encrypted
    /// (MLS) either way.
    Plaintext,
}

impl SimNetwork {
    pub fn new(model: Arc<dyn LinkModel>) -> Self {
        Self::with_security(model, Security::Noise)
    }

    /// A world whose hosts secure their connections with `security`.
    pub fn with_security(model: Arc<dyn LinkModel>, security: Security) -> Self {
        Self {
            hub: Arc::default(),
            model,
            security,
            bytes: Arc::default(),
            conns: Arc::default(),
        }
    }

    /// How this world's hosts secure their connections.
    pub fn security(&self) -> Security {
        self.security
    }

    /// Connection ends open now, over all hosts: a connection between two
    /// hosts counts once at each, so this over the hosts up is the number of
    /// connections a host holds on average.
    pub fn open_connection_ends(&self) -> u64 {
        self.conns.open_ends.load(Ordering::Relaxed)
    }

    /// Connections opened since the world began (each counted once).
    pub fn connections_opened(&self) -> u64 {
        self.conns.opened.load(Ordering::Relaxed)
    }

    /// Bytes host `port` has sent on all its connections so far (libp2p's
    /// framing, Noise and yamux included).
    pub fn bytes_sent(&self, port: u64) -> u64 {
        self.host_bytes(port).sent.load(Ordering::Relaxed)
    }

    /// Bytes host `port` has received on all its connections so far.
    pub fn bytes_received(&self, port: u64) -> u64 {
        self.host_bytes(port).received.load(Ordering::Relaxed)
    }

    /// Connections host `port` has dialled so far (those that reached the
    /// other host; relayed circuits are substreams, not counted here).
    pub fn connections_dialled(&self, port: u64) -> u64 {
        self.host_bytes(port).dialled.load(Ordering::Relaxed)
    }

    /// Connections host `port` has dialled so far, by what each was for: the class of the first
    /// substream it opened on one that is not identify, ping or AutoNAT, in
    /// [`StreamClass::ALL`]'s order. Dials that never opened one are the rest of
    /// [`Self::connections_dialled`].
    pub fn connections_dialled_for(&self, port: u64) -> [u64; StreamClass::ALL.len()] {
        self.host_bytes(port).dialled_for()
    }

    /// Substreams host `port` has opened so far, by protocol class, in [`StreamClass::ALL`]'s
    /// order: for request-response protocols and the DHT, one per request.
    pub fn streams_opened(&self, port: u64) -> [u64; StreamClass::ALL.len()] {
        self.host_bytes(port).opened()
    }

    /// Connections host `port` has accepted so far.
    pub fn connections_accepted(&self, port: u64) -> u64 {
        self.host_bytes(port).accepted.load(Ordering::Relaxed)
    }

    /// Bytes host `port` has sent and received on substreams of each protocol class so far, in
    /// [`StreamClass::ALL`]'s order: the protocols' own bytes, their negotiation included, without
    /// the connections' framing (see [`count`]). Relayed connections count at the relay and at
    /// both ends as [`StreamClass::Circuit`]: their bytes travel on its substreams.
    pub fn stream_bytes(&self, port: u64) -> [u64; StreamClass::ALL.len()] {
        self.host_bytes(port).by_class()
    }

    pub(crate) fn host_bytes(&self, port: u64) -> Arc<HostBytes> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        bytes.entry(port).or_default().clone()
    }

    /// The address of host `port`.
    pub fn address(port: u64) -> Multiaddr {
        Multiaddr::empty().with(Protocol::Memory(port))
    }

    /// The transport of host `port` (it listens on [`SimNetwork::address`]).
    pub fn transport(&self, port: u64) -> SimTransport {
        SimTransport {
            net: self.clone(),
            port,
            listeners: Vec::new(),
            events: VecDeque::new(),
        }
    }

    fn hub(&self) -> MutexGuard<'_, HashMap<u64, mpsc::Sender<Incoming>>> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a connection from `from` to `to`: one trip there and one back
    /// before it is usable, like a TCP handshake.
    async fn connect(self, from: u64, to: u64) -> io::Result<SimConn> {
        let Some(there) = self.model.delay(from, to, 0) else {
            tokio::time::sleep(DIAL_TIMEOUT).await;
            return Err(io::ErrorKind::TimedOut.into());
        };
        if !self.model.accepts(from, to) {
            tokio::time::sleep(DIAL_TIMEOUT).await;
            return Err(io::ErrorKind::TimedOut.into());
        }
        tokio::time::sleep(there).await;
        let listener = self.hub().get(&to).cloned();
        let Some(listener) = listener else {
            return Err(io::ErrorKind::ConnectionRefused.into());
        };
        let (ours, theirs) = SimConn::pair(
            self.model.clone(),
            self.conns.clone(),
            (from, self.host_bytes(from)),
            (to, self.host_bytes(to)),
        );
        listener
            .try_send(Incoming { conn: theirs, from })
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        let back = self.model.delay(to, from, 0).unwrap_or(there);
        tokio::time::sleep(back).await;
        Ok(ours)
    }
}

/// The port of a `/memory/<port>` address (a trailing `/p2p/…` is allowed).
fn memory_port(addr: &Multiaddr) -> Option<u64> {
    let mut it = addr.iter();
    let port = match it.next()? {
        Protocol::Memory(p) => p,
        _ => return None,
    };
    match it.next() {
        None | Some(Protocol::P2p(_)) if it.next().is_none() => Some(port),
        _ => None,
    }
}

/// A host's libp2p transport in a [`SimNetwork`].
pub struct SimTransport {
    net: SimNetwork,
    port: u64,
    listeners: Vec<(ListenerId, mpsc::Receiver<Incoming>)>,
    events: VecDeque<TransportEvent<Ready<io::Result<SimConn>>, io::Error>>,
}

impl Transport for SimTransport {
    type Output = SimConn;
    type Error = io::Error;
    type ListenerUpgrade = Ready<io::Result<SimConn>>;
    type Dial = BoxFuture<'static, io::Result<SimConn>>;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<io::Error>> {
        match memory_port(&addr) {
            Some(p) if p == self.port || p == 0 => {}
            _ => return Err(TransportError::MultiaddrNotSupported(addr)),
        }
        let (tx, rx) = mpsc::channel(BACKLOG);
        self.net.hub().insert(self.port, tx);
        self.listeners.push((id, rx));
        self.events.push_back(TransportEvent::NewAddress {
            listener_id: id,
            listen_addr: SimNetwork::address(self.port),
        });
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        let before = self.listeners.len();
        self.listeners.retain(|(l, _)| *l != id);
        if self.listeners.len() == before {
            return false;
        }
        if self.listeners.is_empty() {
            self.net.hub().remove(&self.port);
        }
        self.events.push_back(TransportEvent::ListenerClosed {
            listener_id: id,
            reason: Ok(()),
        });
        true
    }

    fn dial(&mut self, addr: Multiaddr, _opts: DialOpts) -> Result<Self::Dial, TransportError<io::Error>> {
        let Some(to) = memory_port(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        Ok(self.net.clone().connect(self.port, to).boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        if let Some(ev) = self.events.pop_front() {
            return Poll::Ready(ev);
        }
        let port = self.port;
        for (id, rx) in self.listeners.iter_mut() {
            if let Poll::Ready(Some(inc)) = rx.poll_recv(cx) {
                return Poll::Ready(TransportEvent::Incoming {
                    listener_id: *id,
                    upgrade: futures::future::ready(Ok(inc.conn)),
                    local_addr: SimNetwork::address(port),
                    send_back_addr: SimNetwork::address(inc.from),
                });
            }
        }
        Poll::Pending
    }
}

/// One direction of a connection: chunks with the time they arrive.
#[derive(Default)]
struct Half {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes of the front chunk already read.
    pos: usize,
    queued: usize,
    /// Arrival time of the last chunk (a link delivers in order).
    last: Option<Instant>,
    /// When the last chunk was written: later writes of the same instant join it.
    burst: Option<Instant>,
    /// The writer closed this direction (after its chunks, the reader sees the end).
    closed: bool,
    /// The link broke (a partition cut it): the reader gets an error.
    broken: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

type Shared = Arc<Mutex<Half>>;

fn lock(h: &Shared) -> MutexGuard<'_, Half> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

/// One end of a simulated connection.
pub struct SimConn {
    rx: Shared,
    tx: Shared,
    model: Arc<dyn LinkModel>,
    local: u64,
    remote: u64,
    timer: Option<Pin<Box<Sleep>>>,
    /// What the local host has sent and received (shared by all its connections).
    bytes: Arc<HostBytes>,
    conns: Arc<ConnCount>,
}

impl std::fmt::Debug for SimConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConn")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl SimConn {
    fn pair(
        model: Arc<dyn LinkModel>,
        conns: Arc<ConnCount>,
        a: (u64, Arc<HostBytes>),
        b: (u64, Arc<HostBytes>),
    ) -> (SimConn, SimConn) {
        let (ab, ba): (Shared, Shared) = (Arc::default(), Arc::default());
        conns.opened.fetch_add(1, Ordering::Relaxed);
        conns.open_ends.fetch_add(2, Ordering::Relaxed);
        a.1.dialled.fetch_add(1, Ordering::Relaxed);
        b.1.accepted.fetch_add(1, Ordering::Relaxed);
        (
            SimConn {
                rx: ba.clone(),
                tx: ab.clone(),
                model: model.clone(),
                local: a.0,
                remote: b.0,
                timer: None,
                bytes: a.1,
                conns: conns.clone(),
            },
            SimConn {
                rx: ab,
                tx: ba,
                model,
                local: b.0,
                remote: a.0,
                timer: None,
                bytes: b.1,
                conns,
            },
        )
    }
}

impl AsyncRead for SimConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            let rx = self.rx.clone();
            let mut h = lock(&rx);
            let due = match h.chunks.front() {
                Some((at, _)) => *at,
                None if h.broken => return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
                None if h.closed => return Poll::Ready(Ok(0)),
                None => {
                    h.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            };
            if due <= Instant::now() {
                let pos = h.pos;
                let Some((_, data)) = h.chunks.front() else { continue };
                let n = buf.len().min(data.len() - pos);
                buf[..n].copy_from_slice(&data[pos..pos + n]);
                let len = data.len();
                if pos + n == len {
                    h.chunks.pop_front();
                    h.pos = 0;
                    h.queued -= len;
                    if let Some(w) = h.writer.take() {
                        w.wake();
                    }
                } else {
                    h.pos += n;
                }
                drop(h);
                self.timer = None;
                self.bytes.received.fetch_add(n as u64, Ordering::Relaxed);
                return Poll::Ready(Ok(n));
            }
            drop(h);
            // The front chunk is still on its way: wait for its arrival.
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl AsyncWrite for SimConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut h = lock(&self.tx);
        if h.closed || h.broken {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if h.queued >= WINDOW {
            h.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(MAX_CHUNK).min(WINDOW - h.queued);
        let Some(delay) = self.model.delay(self.local, self.remote, n) else {
            h.broken = true;
            if let Some(w) = h.reader.take() {
                w.wake();
            }
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        };
        let now = Instant::now();
        let at = (now + delay).max(h.last.unwrap_or(now));
        h.last = Some(at);
        // Writes of one instant travel together, as back-to-back segments do: the burst arrives
        // when its last part would, in one piece, so the reader wakes once for it, not once per
        // latency draw.
        let burst = h.burst == Some(now);
        match h.chunks.back_mut() {
            Some((due, data)) if burst && *due > now && data.len() + n <= MAX_CHUNK => {
                *due = at;
                data.extend_from_slice(&buf[..n]);
            }
            _ => {
                h.chunks.push_back((at, buf[..n].to_vec()));
                h.burst = Some(now);
            }
        }
        h.queued += n;
        self.bytes.sent.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(w) = h.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut h = lock(&self.tx);
        h.closed = true;
        if let Some(w) = h.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for SimConn {
    fn drop(&mut self) {
        self.conns.open_ends.fetch_sub(1, Ordering::Relaxed);
        // Both directions end: the peer reads what is on its way, then the end,
        // and its writes fail.
        for half in [&self.tx, &self.rx] {
            let mut h = lock(half);
            h.closed = true;
            for w in [h.reader.take(), h.writer.take()].into_iter().flatten() {
                w.wake();
            }
        }
    }
}

/// Whether blocking work should run inline: on a current-thread runtime (the
/// simulator's), a blocking thread would let paused, virtual time jump ahead
/// while the work runs.
pub(crate) fn inline_blocking() -> bool {
    tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
}

/// Runs blocking store or crypto work on a blocking thread, or inline when
/// [`inline_blocking`]; `None` if the blocking thread failed.
pub(crate) async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    if inline_blocking() {
        return Some(f());
    }
    tokio::task::spawn_blocking(f).await.ok()
}

/// What a simulated host keeps across restarts: its store (identity,
/// conversations, outbox) and, for a relay, its mailboxes. All in memory.
#[derive(Clone)]
pub struct HostDisk {
    pub store: Arc<tidings_store::Store>,
    pub mailboxes: Option<Arc<tidings_store::mailbox::Mailboxes>>,
}

impl std::fmt::Debug for HostDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDisk")
            .field("relay", &self.mailboxes.is_some())
            .finish_non_exhaustive()
    }
}

impl HostDisk {
    /// A new person's device: a fresh identity named `name`, from the operating system's
    /// randomness or, with `seed`, derived from it (the same peer id and account every time).
    pub fn person(name: &str, now_ms: u64, seed: Option<[u8; 32]>) -> anyhow::Result<Self> {
        let store = tidings_store::Store::open_in_memory()?;
        new_identity(&store, name, now_ms, seed)?;
        Ok(Self {
            store: Arc::new(store),
            mailboxes: None,
        })
    }

    /// A new relay: a fresh identity (from `seed` if given, as for [`HostDisk::person`]) and
    /// empty mailboxes with the limits test and demo relays have.
    pub fn relay(now_ms: u64, seed: Option<[u8; 32]>) -> anyhow::Result<Self> {
        let store = tidings_store::Store::open_in_memory()?;
        new_identity(&store, "relay", now_ms, seed)?;
        let limits = crate::demo::RelayTestOptions::default().limits;
        Ok(Self {
            store: Arc::new(store),
            mailboxes: Some(Arc::new(tidings_store::mailbox::Mailboxes::open_in_memory(limits)?)),
        })
    }

    /// Adds a contact from its card (a `tidings:` URI) to this device while no node runs on it,
    /// as [`crate::NodeHandle::add_contact`] adds one to a running device: the device knows the
    /// contact from its next start. Its own card is refused.
    pub fn add_contact(&self, card_uri: &str, now_ms: u64) -> Result<(), crate::NodeError> {
        let card = tidings_protocol::card::ContactCard::from_uri(card_uri.trim())?;
        let own = tidings_protocol::identity::AccountKey::from_seed(self.store.identity()?.account_seed).id();
        if card.account == own {
            return Err(crate::NodeError::InvalidContact("that is your own card".into()));
        }
        crate::core::merge_contact(&self.store, crate::node::contact_from_card(card, now_ms))?;
        Ok(())
    }
}

fn new_identity(store: &tidings_store::Store, name: &str, now_ms: u64, seed: Option<[u8; 32]>) -> anyhow::Result<()> {
    match seed {
        Some(seed) => crate::create_identity_from_seed(store, name, now_ms, seed)?,
        None => crate::create_identity(store, name, now_ms)?,
    };
    Ok(())
}

/// How a person's device sits in the simulated network.
#[derive(Debug, Clone)]
pub struct PersonHost {
    pub port: u64,
    pub bootstrap: Vec<Multiaddr>,
    /// Home relays (`/memory/<port>/p2p/<id>`).
    pub home_relays: Vec<Multiaddr>,
    /// Others can dial it: it announces its address and answers DHT
    /// queries. A device behind a NAT does neither; others reach it through
    /// its home relays' circuits (and hole punching, as the link model allows).
    pub reachable: bool,
    /// Answers DHT queries and sits in others' routing tables. A device
    /// nobody can dial should not be one.
    pub dht_server: bool,
    pub tuning: HostTuning,
}

/// The protocol timers and sizes a scenario may set, for every host alike
/// (defaults: the product's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTuning {
    pub net: crate::net::NetTuning,
    /// Mailbox and deliver request timeout.
    pub request_timeout: std::time::Duration,
    /// See [`crate::NodeConfig::mailbox_poll`].
    pub mailbox_poll: std::time::Duration,
    /// See [`crate::NodeConfig::key_update_interval`].
    pub key_update_interval: std::time::Duration,
}

impl Default for HostTuning {
    fn default() -> Self {
        Self {
            net: crate::net::NetTuning::default(),
            request_timeout: crate::NetConfig::default().request_timeout,
            mailbox_poll: crate::node::MAILBOX_RECHECK,
            key_update_interval: crate::NodeConfig::default().key_update_interval,
        }
    }
}

/// Starts a relay on host `port` of `net` from `disk` (made with
/// [`HostDisk::relay`]), on `clock`.
pub async fn start_relay_on(
    net: &SimNetwork,
    port: u64,
    disk: &HostDisk,
    bootstrap: Vec<Multiaddr>,
    clock: crate::Clock,
    tuning: &HostTuning,
) -> anyhow::Result<crate::Node> {
    let Some(mailboxes) = disk.mailboxes.clone() else {
        anyhow::bail!("a relay needs mailboxes (HostDisk::relay)");
    };
    let opts = crate::demo::RelayTestOptions {
        clock: clock.clone(),
        ..crate::demo::RelayTestOptions::default()
    };
    let config = crate::NodeConfig {
        net: host_config(
            net,
            port,
            bootstrap,
            Some(crate::net::RelayServerConfig::default()),
            true,
            tuning,
        ),
        clock,
        relay: Some(opts.relay_options(mailboxes)),
        event_queue: SIM_EVENT_QUEUE,
        mailbox_poll: tuning.mailbox_poll,
        ..crate::NodeConfig::default()
    };
    crate::Node::start_shared(disk.store.clone(), config).await
}

/// Starts a person's device on `host` of `net` from `disk`, on `clock`.
pub async fn start_person_on(
    net: &SimNetwork,
    host: &PersonHost,
    disk: &HostDisk,
    clock: crate::Clock,
) -> anyhow::Result<crate::Node> {
    let mut netc = host_config(
        net,
        host.port,
        host.bootstrap.clone(),
        None,
        host.reachable,
        &host.tuning,
    );
    netc.dht_server = host.reachable && host.dht_server;
    let config = crate::NodeConfig {
        net: netc,
        clock,
        home_relays: host.home_relays.clone(),
        event_queue: SIM_EVENT_QUEUE,
        mailbox_poll: host.tuning.mailbox_poll,
        key_update_interval: host.tuning.key_update_interval,
        ..crate::NodeConfig::default()
    };
    crate::Node::start_shared(disk.store.clone(), config).await
}

/// Starts a new relay on host `port` of `net`: its identity, store and
/// mailboxes in memory, on `clock`.
pub async fn start_relay(
    net: &SimNetwork,
    port: u64,
    bootstrap: Vec<Multiaddr>,
    clock: crate::Clock,
) -> anyhow::Result<crate::Node> {
    let disk = HostDisk::relay(clock.now_ms(), None)?;
    start_relay_on(net, port, &disk, bootstrap, clock, &HostTuning::default()).await
}

/// Starts a new person's device on host `port` of `net`, with `home_relays`
/// (`/memory/<port>/p2p/<id>`): identity and store in memory, on `clock`.
pub async fn start_node(
    net: &SimNetwork,
    port: u64,
    name: &str,
    bootstrap: Vec<Multiaddr>,
    home_relays: Vec<Multiaddr>,
    clock: crate::Clock,
) -> anyhow::Result<crate::Node> {
    let disk = HostDisk::person(name, clock.now_ms(), None)?;
    let host = PersonHost {
        port,
        bootstrap,
        home_relays,
        reachable: true,
        dht_server: true,
        tuning: HostTuning::default(),
    };
    start_person_on(net, &host, &disk, clock).await
}

fn host_config(
    net: &SimNetwork,
    port: u64,
    bootstrap: Vec<Multiaddr>,
    relay_server: Option<crate::net::RelayServerConfig>,
    announce: bool,
    tuning: &HostTuning,
) -> crate::NetConfig {
    crate::NetConfig {
        listen: vec![SimNetwork::address(port)],
        bootstrap,
        relay_server,
        announce_listen_addrs: announce,
        sim: Some(crate::net::SimHost { net: net.clone(), port }),
        request_timeout: tuning.request_timeout,
        tuning: tuning.net.clone(),
        ..crate::NetConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};

    fn dial_opts() -> DialOpts {
        DialOpts {
            role: libp2p::core::Endpoint::Dialer,
            port_use: libp2p::core::transport::PortUse::New,
        }
    }

    /// Host 2 dials host 1 of `net`: the dialler's end, the listener's end, and the address
    /// the listener saw the connection come from.
    async fn connect(net: &SimNetwork) -> (SimConn, SimConn, Multiaddr) {
        let mut server = net.transport(1);
        server.listen_on(ListenerId::next(), SimNetwork::address(1)).unwrap();
        let mut client = net.transport(2);
        let dial = client.dial(SimNetwork::address(1), dial_opts()).unwrap();
        let accept = async {
            loop {
                if let TransportEvent::Incoming {
                    upgrade,
                    send_back_addr,
                    ..
                } = futures::future::poll_fn(|cx| Pin::new(&mut server).poll(cx)).await
                {
                    return (upgrade.await.unwrap(), send_back_addr);
                }
            }
        };
        let (ours, (theirs, from)) = futures::join!(async { dial.await.unwrap() }, accept);
        (ours, theirs, from)
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_arrive_in_order_after_the_links_delay_in_virtual_time() {
        let net = SimNetwork::new(Arc::new(FixedDelay(Duration::from_millis(40))));
        let start = Instant::now();
        let (mut ours, mut theirs, from) = connect(&net).await;
        assert_eq!(from, SimNetwork::address(2));
        assert_eq!(start.elapsed(), Duration::from_millis(80), "a round trip to connect");
        ours.write_all(b"hello ").await.unwrap();
        ours.write_all(b"world").await.unwrap();
        let sent = Instant::now();
        let mut got = [0u8; 11];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        assert_eq!(sent.elapsed(), Duration::from_millis(40), "one way");
        assert_eq!(
            (net.bytes_sent(2), net.bytes_received(1)),
            (11, 11),
            "counted at both ends"
        );
        assert_eq!((net.bytes_sent(1), net.bytes_received(2)), (0, 0));
        drop(ours);
        let mut rest = Vec::new();
        assert_eq!(
            theirs.read_to_end(&mut rest).await.unwrap(),
            0,
            "the end once the peer is gone"
        );
        assert!(theirs.write_all(b"anyone?").await.is_err());
    }

    /// 40 ms on every link, except the delays queued in `next`, taken one per write.
    struct Scripted {
        next: Mutex<VecDeque<Duration>>,
    }

    impl LinkModel for Scripted {
        fn delay(&self, _from: u64, _to: u64, _bytes: usize) -> Option<Duration> {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            Some(next.pop_front().unwrap_or(Duration::from_millis(40)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn writes_of_one_instant_arrive_together_when_the_last_of_them_would() {
        let model = Arc::new(Scripted {
            next: Mutex::new(VecDeque::new()),
        });
        let net = SimNetwork::new(model.clone());
        let (mut ours, mut theirs, _) = connect(&net).await;
        // The first part draws 50 ms, the second 70 ms: apart, the reader would get "hello "
        // at 50 ms and wake again at 70 ms for "world".
        model
            .next
            .lock()
            .unwrap()
            .extend([Duration::from_millis(50), Duration::from_millis(70)]);
        ours.write_all(b"hello ").await.unwrap();
        ours.write_all(b"world").await.unwrap();
        let sent = Instant::now();
        let mut got = [0u8; 64];
        let n = theirs.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"hello world", "the burst in one read");
        assert_eq!(sent.elapsed(), Duration::from_millis(70), "when its last part arrives");
        // A write of a later instant travels on its own.
        tokio::time::sleep(Duration::from_millis(5)).await;
        model.next.lock().unwrap().push_back(Duration::from_millis(10));
        ours.write_all(b"again").await.unwrap();
        let n = theirs.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"again");
        assert_eq!(sent.elapsed(), Duration::from_millis(85));
    }

    #[test]
    fn hosts_made_from_one_seed_have_the_same_identity_and_other_seeds_other_ones() {
        let ident = |seed| HostDisk::person("p", 0, seed).unwrap().store.identity().unwrap();
        let (a, b) = (ident(Some([7; 32])), ident(Some([7; 32])));
        assert_eq!(
            (a.account_seed, a.device_seed, a.mls_seed, a.device_cert.clone()),
            (b.account_seed, b.device_seed, b.mls_seed, b.device_cert.clone())
        );
        assert_ne!(a.account_seed, a.device_seed, "each key its own");
        assert_ne!(ident(Some([8; 32])).account_seed, a.account_seed);
        assert_ne!(ident(None).account_seed, ident(None).account_seed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_to_nobody_is_refused_and_into_a_partition_times_out() {
        struct Cut;
        impl LinkModel for Cut {
            fn delay(&self, from: u64, to: u64, _: usize) -> Option<Duration> {
                (from / 100 == to / 100).then_some(Duration::from_millis(5))
            }
        }
        let net = SimNetwork::new(Arc::new(Cut));
        let mut far = net.transport(201);
        far.listen_on(ListenerId::next(), SimNetwork::address(201)).unwrap();
        let mut client = net.transport(101);
        let refused = client.dial(SimNetwork::address(102), dial_opts()).unwrap().await;
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        let start = Instant::now();
        let cut = client.dial(SimNetwork::address(201), dial_opts()).unwrap().await;
        assert_eq!(cut.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), DIAL_TIMEOUT);
        assert!(client.dial("/ip4/1.2.3.4/tcp/1".parse().unwrap(), dial_opts()).is_err());
    }
}
