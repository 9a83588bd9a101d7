//! A real relay (libp2p on loopback, mailboxes on redb) against hostile and
//! greedy clients: unauthorised owner operations, deposits without a
//! capability or work, quotas, size caps, garbage frames, retention and a
//! flood from many peers. Clients are raw libp2p peers (`net::spawn`) that
//! speak `/tidings/mailbox/1` directly; the relay runs on an injected manual
//! clock, so signatures, capabilities and retention never race the wall clock.

mod common;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt, stream};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};
use prost::Message as _;
use tidings_node::demo::{RelayTestOptions, retry_until, start_relay_with};
use tidings_node::net::{self, MAILBOX_PROTOCOL, Network};
use tidings_node::relay::RelayMetrics;
use tidings_node::{Clock, NetConfig, Node};
use tidings_protocol::DeviceKey;
use tidings_protocol::limits::MAX_MAILBOX_FRAME;
use tidings_protocol::mailbox::{self as mb, MailboxError, Op};
use tidings_protocol::pb::{self, mailbox_request, mailbox_response};
use tidings_store::mailbox::{MailboxLimits, MailboxStats, Mailboxes};

const DAY_MS: u64 = 24 * 3600 * 1000;
const HOUR_MS: u64 = 3600 * 1000;
/// Every operation label the relay's metrics use.
const OPS: [&str; 8] = [
    "deposit",
    "deposit_batch",
    "fetch",
    "ack",
    "subscribe",
    "claim_key_package",
    "publish_key_packages",
    "none",
];

/// What one mailbox request came to: the result of an OK answer, or the refusal.
type Outcome = Result<mailbox_response::Result, MailboxError>;

// ------------------------------------------------------------------ the relay

/// A relay started with [`start_relay_with`] and what the tests read from it.
struct Relay {
    node: Node,
    /// Its TCP address, ending in `/p2p/<peer id>`.
    addr: Multiaddr,
    peer: PeerId,
    /// Its Ed25519 device key: the key that signs custody receipts.
    key: [u8; 32],
    metrics: Arc<RelayMetrics>,
    mailboxes: Arc<Mailboxes>,
}

impl Relay {
    async fn start(dir: &Path, opts: RelayTestOptions) -> Relay {
        // A restarted relay may find its database still held for a moment.
        let node = retry_until(TIMEOUT, || start_relay_with(dir, Vec::new(), opts.clone()))
            .await
            .expect("relay starts");
        let addr = node
            .listen_addrs()
            .into_iter()
            .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
            .expect("a TCP listen address");
        let peer = node.handle().peer_id();
        let key = libp2p::identity::PublicKey::try_decode_protobuf(peer.as_ref().digest())
            .expect("an inline public key")
            .try_into_ed25519()
            .expect("an Ed25519 key")
            .to_bytes();
        let metrics = node.relay_metrics().expect("a relay has metrics");
        let mailboxes = node.relay_mailboxes().expect("a relay has mailboxes");
        Relay {
            node,
            addr,
            peer,
            key,
            metrics,
            mailboxes,
        }
    }

    /// A relay with default settings on a manual clock starting at the wall time.
    async fn with_manual_clock(dir: &Path) -> (Relay, Arc<AtomicU64>) {
        let (time, clock) = manual_clock();
        let relay = Relay::start(
            dir,
            RelayTestOptions {
                clock,
                ..RelayTestOptions::default()
            },
        )
        .await;
        (relay, time)
    }

    async fn shutdown(self) {
        let Relay {
            node,
            metrics,
            mailboxes,
            ..
        } = self;
        drop((metrics, mailboxes));
        node.shutdown().await;
    }

    /// Sends one request from `client` and decodes the answer; every request must be answered.
    async fn ask(&self, client: &Network, req: pb::MailboxRequest) -> Outcome {
        let resp = tokio::time::timeout(TIMEOUT, client.mailbox(self.peer, req))
            .await
            .expect("the relay answers in time")
            .expect("the relay answers");
        outcome(resp)
    }

    /// Deposits and checks the custody receipt against what was sent.
    async fn deposit_ok(&self, client: &Network, req: pb::MailboxRequest) -> mb::Receipt {
        let Some(mailbox_request::Op::Deposit(d)) = &req.op else {
            panic!("not a deposit")
        };
        let (inbox, request_inbox, envelope) = (inbox32(&d.inbox_id), d.request_inbox, d.envelope.clone());
        let result = self.ask(client, req).await.expect("deposit accepted");
        self.check_receipt(result, &inbox, request_inbox, &envelope)
    }

    fn check_receipt(
        &self,
        result: mailbox_response::Result,
        inbox: &[u8; 32],
        request_inbox: bool,
        envelope: &[u8],
    ) -> mb::Receipt {
        let mailbox_response::Result::Receipt(wire) = result else {
            panic!("a deposit is answered with a custody receipt, got {result:?}")
        };
        let r = mb::verify_receipt(&wire).expect("the custody receipt's signature verifies");
        assert_eq!(r.relay_key, self.key, "signed by the relay we deposited to");
        assert_eq!(&r.inbox_id, inbox);
        assert_eq!(r.request_inbox, request_inbox);
        assert_eq!(r.envelope_hash, mb::envelope_hash(envelope));
        assert!(r.keep_until_ms > r.accepted_ms);
        r
    }

    /// Sends a [`batch`] and returns each item's receipt or refusal, in order;
    /// the batch itself must be accepted for examination.
    async fn ask_batch(
        &self,
        client: &Network,
        req: pb::MailboxRequest,
    ) -> Vec<Result<pb::CustodyReceipt, MailboxError>> {
        let Some(mailbox_request::Op::DepositBatch(b)) = &req.op else {
            panic!("not a batch")
        };
        let n = b.deposits.len();
        let result = self.ask(client, req).await.expect("the batch is examined");
        let mailbox_response::Result::DepositResults(r) = result else {
            panic!("a batch is answered with deposit results, got {result:?}")
        };
        assert_eq!(r.results.len(), n, "one result per item");
        r.results
            .into_iter()
            .map(|item| {
                let status = pb::MailboxStatus::try_from(item.status).expect("a known status");
                match MailboxError::from_status(status) {
                    None => {
                        assert_eq!(status, pb::MailboxStatus::Ok, "never UNSPECIFIED");
                        Ok(item.receipt.expect("an accepted item carries a receipt"))
                    }
                    Some(e) => {
                        assert!(item.receipt.is_none(), "a refused item ({e}) carries no receipt");
                        Err(e)
                    }
                }
            })
            .collect()
    }

    /// Everything the owner can fetch from one of its inboxes now (following `more`).
    async fn holdings(
        &self,
        client: &Network,
        owner: &Owner,
        now: u64,
        request_inbox: bool,
    ) -> Vec<pb::StoredEnvelope> {
        let mut out: Vec<pb::StoredEnvelope> = Vec::new();
        loop {
            let after = out.last().map_or(0, |e| e.index);
            let req = fetch(
                &owner.inbox,
                request_inbox,
                after,
                owner.auth(self, Op::Fetch, now, after),
            );
            let Ok(mailbox_response::Result::Fetched(f)) = self.ask(client, req).await else {
                panic!("the owner's fetch succeeds")
            };
            out.extend(f.envelopes);
            if !f.more {
                return out;
            }
        }
    }

    fn stats(&self) -> MailboxStats {
        self.mailboxes.stats().expect("mailbox stats")
    }

    fn refusals(&self, op: &str, reason: MailboxError) -> u64 {
        let labels = vec![
            ("op".to_owned(), op.to_owned()),
            ("reason".to_owned(), reason.code().to_owned()),
        ];
        self.metrics.refusals.get(&labels).map_or(0, |c| c.get())
    }

    fn all_refusals(&self) -> u64 {
        OPS.iter()
            .flat_map(|op| MailboxError::ALL.iter().map(move |e| self.refusals(op, *e)))
            .sum()
    }

    fn requests(&self, op: &str) -> u64 {
        let labels = vec![("op".to_owned(), op.to_owned())];
        self.metrics.requests.get(&labels).map_or(0, |c| c.get())
    }

    fn deposits(&self, result: &str) -> u64 {
        let labels = vec![("result".to_owned(), result.to_owned())];
        self.metrics.deposits.get(&labels).map_or(0, |c| c.get())
    }
}

fn outcome(resp: pb::MailboxResponse) -> Outcome {
    let status = pb::MailboxStatus::try_from(resp.status).expect("a known status");
    match MailboxError::from_status(status) {
        None => {
            assert_eq!(status, pb::MailboxStatus::Ok, "never UNSPECIFIED");
            Ok(resp.result.expect("an OK answer carries a result"))
        }
        Some(e) => {
            assert!(resp.result.is_none(), "a refusal ({e}) carries no result");
            Err(e)
        }
    }
}

fn inbox32(bytes: &[u8]) -> [u8; 32] {
    bytes.try_into().expect("32-byte inbox id")
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A manual clock starting at the wall time.
fn manual_clock() -> (Arc<AtomicU64>, Clock) {
    let time = Arc::new(AtomicU64::new(wall_ms()));
    (time.clone(), Clock::manual(time))
}

/// A raw libp2p peer (the node's own swarm, no core) that knows the relay's address.
/// With a `seed` it is that device; otherwise a fresh random identity.
async fn client(seed: Option<[u8; 32]>, relay: &Multiaddr) -> Network {
    let keypair = match seed {
        Some(seed) => Keypair::ed25519_from_bytes(seed).expect("Ed25519 seed"),
        None => Keypair::generate_ed25519(),
    };
    let config = NetConfig {
        listen: Vec::new(),
        bootstrap: vec![relay.clone()],
        dht_server: false,
        request_timeout: TIMEOUT,
        ..NetConfig::default()
    };
    let (net, mut events, _, _task) = net::spawn(keypair, config, Clock::system(), None)
        .await
        .expect("client network");
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    net
}

// ------------------------------------------------------------ owners, requests

/// A person's device identity, made by the node's own `create_identity`: its
/// device key owns an inbox on the relay.
struct Owner {
    seed: [u8; 32],
    inbox: [u8; 32],
}

impl Owner {
    fn new(dir: &Path, name: &str) -> Owner {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let store = tidings_node::open_store(&dir).unwrap();
        let seed = tidings_node::create_identity(&store, name, wall_ms())
            .unwrap()
            .device_seed;
        let inbox = mb::inbox_id(&DeviceKey::from_seed(seed).public());
        Owner { seed, inbox }
    }

    fn public(&self) -> [u8; 32] {
        DeviceKey::from_seed(self.seed).public()
    }

    /// A genuine owner auth for its own inbox on `relay`, with a fresh nonce.
    fn auth(&self, relay: &Relay, op: Op, ts: u64, arg: u64) -> pb::OwnerAuth {
        mb::sign_auth(
            &self.seed,
            op,
            &relay.peer.to_bytes(),
            &self.inbox,
            ts,
            rand::random(),
            arg,
        )
    }

    fn capability(&self, expires_ms: u64) -> pb::Capability {
        mb::issue_capability(&self.seed, expires_ms, None)
    }
}

fn fetch(inbox: &[u8; 32], request_inbox: bool, after: u64, auth: pb::OwnerAuth) -> pb::MailboxRequest {
    pb::MailboxRequest {
        op: Some(mailbox_request::Op::Fetch(pb::Fetch {
            inbox_id: inbox.to_vec(),
            request_inbox,
            after_index: after,
            limit: 512,
            auth: Some(auth),
            wait_ms: 0,
        })),
    }
}

fn ack(inbox: &[u8; 32], up_to: u64, auth: pb::OwnerAuth) -> pb::MailboxRequest {
    pb::MailboxRequest {
        op: Some(mailbox_request::Op::Ack(pb::Ack {
            inbox_id: inbox.to_vec(),
            request_inbox: false,
            up_to_index: up_to,
            auth: Some(auth),
        })),
    }
}

fn deposit(inbox: &[u8; 32], capability: Option<pb::Capability>, envelope: &[u8]) -> pb::MailboxRequest {
    pb::MailboxRequest {
        op: Some(mailbox_request::Op::Deposit(pb::Deposit {
            inbox_id: inbox.to_vec(),
            request_inbox: false,
            capability,
            pow_nonce: Vec::new(),
            envelope: envelope.to_vec(),
        })),
    }
}

fn request_deposit(inbox: &[u8; 32], pow_nonce: Vec<u8>, envelope: &[u8]) -> pb::MailboxRequest {
    pb::MailboxRequest {
        op: Some(mailbox_request::Op::Deposit(pb::Deposit {
            inbox_id: inbox.to_vec(),
            request_inbox: true,
            capability: None,
            pow_nonce,
            envelope: envelope.to_vec(),
        })),
    }
}

/// One `DepositBatch` of the deposits in `reqs` (made with [`deposit`] or [`request_deposit`]).
fn batch(reqs: impl IntoIterator<Item = pb::MailboxRequest>) -> pb::MailboxRequest {
    let deposits = reqs
        .into_iter()
        .map(|r| match r.op {
            Some(mailbox_request::Op::Deposit(d)) => d,
            other => panic!("not a deposit: {other:?}"),
        })
        .collect();
    pb::MailboxRequest {
        op: Some(mailbox_request::Op::DepositBatch(pb::DepositBatch { deposits })),
    }
}

/// An encoded envelope of exactly `len` bytes (at least 128) whose conversation
/// id starts with `tag`, so that the owner can tell who deposited it.
fn envelope(tag: &str, len: usize) -> Vec<u8> {
    assert!(len >= 128 && tag.len() <= 60);
    let id = rand::random::<[u8; 16]>().to_vec();
    let make = |conversation: Vec<u8>, mls: usize| {
        pb::Envelope {
            id: id.clone(),
            conversation_id: conversation,
            kind: pb::EnvelopeKind::Message as i32,
            mls_message: vec![0x5a; mls],
            ..Default::default()
        }
        .encode_to_vec()
    };
    let mls = len - 100;
    let short = make(tag.as_bytes().to_vec(), mls).len();
    let mut conversation = tag.as_bytes().to_vec();
    conversation.resize(tag.len() + (len - short), b'.');
    let e = make(conversation, mls);
    assert_eq!(e.len(), len);
    e
}

/// The tag of a stored envelope (see [`envelope`]).
fn tag_of(stored: &pb::StoredEnvelope) -> String {
    let e = pb::Envelope::decode(stored.envelope.as_slice()).expect("a stored envelope decodes");
    String::from_utf8(e.conversation_id)
        .unwrap()
        .trim_end_matches('.')
        .to_owned()
}

/// A proof-of-work nonce that does not meet `bits` for this envelope (checked, not assumed).
fn insufficient_nonce(inbox: &[u8; 32], envelope: &[u8], bits: u32) -> Vec<u8> {
    (0u64..)
        .map(|n| n.to_le_bytes().to_vec())
        .find(|n| !mb::pow_ok(inbox, envelope, n, bits))
        .unwrap()
}

fn count_tags(held: &[pb::StoredEnvelope]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in held {
        *m.entry(tag_of(e)).or_insert(0) += 1;
    }
    m
}

// ---------------------------------------------------------------------- tests

/// One of alice's home relays replays her requests to another: her acks and
/// fetches name the relay they are for, so the other refuses them and keeps
/// her mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_signed_for_one_relay_is_refused_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, time) = Relay::with_manual_clock(&dir.path().join("relay")).await;
    let (other, _) = Relay::with_manual_clock(&dir.path().join("other")).await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let sender = client(None, &other.addr).await;
    let cap = alice.capability(now + DAY_MS);
    for i in 0..3 {
        let env = envelope(&format!("m{i}"), 300);
        other
            .deposit_ok(&sender, deposit(&alice.inbox, Some(cap.clone()), &env))
            .await;
    }
    let owner = client(Some(alice.seed), &other.addr).await;
    // Signed for `relay`, presented to `other`.
    let replayed_ack = ack(&alice.inbox, u64::MAX, alice.auth(&relay, Op::Ack, now, u64::MAX));
    assert_eq!(other.ask(&owner, replayed_ack).await, Err(MailboxError::Unauthorized));
    let replayed_fetch = fetch(&alice.inbox, false, 0, alice.auth(&relay, Op::Fetch, now, 0));
    assert_eq!(other.ask(&owner, replayed_fetch).await, Err(MailboxError::Unauthorized));
    // Her own request to `other` works, and all three are still there.
    let own_fetch = fetch(&alice.inbox, false, 0, alice.auth(&other, Op::Fetch, now, 0));
    let Ok(mailbox_response::Result::Fetched(f)) = other.ask(&owner, own_fetch).await else {
        panic!("the owner's fetch succeeds")
    };
    assert_eq!(f.envelopes.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_is_committed_unless_the_request_came_over_the_owners_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (time, clock) = manual_clock();
    let opts = RelayTestOptions {
        clock,
        ..RelayTestOptions::default()
    };
    let relay_dir = dir.path().join("relay");
    let relay = Relay::start(&relay_dir, opts.clone()).await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let owner = client(Some(alice.seed), &relay.addr).await;
    let carrier = client(None, &relay.addr).await;
    let signed = |relay: &Relay, nonce: [u8; 16]| {
        let auth = mb::sign_auth(
            &alice.seed,
            Op::Fetch,
            &relay.peer.to_bytes(),
            &alice.inbox,
            now,
            nonce,
            0,
        );
        fetch(&alice.inbox, false, 0, auth)
    };
    let fetched = |o: &Outcome| matches!(o, Ok(mailbox_response::Result::Fetched(_)));

    // Over her own connection: answered, and a copy from anyone else is a replay.
    let own_nonce: [u8; 16] = rand::random();
    let own = signed(&relay, own_nonce);
    assert!(fetched(&relay.ask(&owner, own.clone()).await));
    assert_eq!(relay.ask(&carrier, own).await, Err(MailboxError::Replayed));

    // Signed by her, carried by another peer: answered, then refused as a replay.
    let carried_nonce: [u8; 16] = rand::random();
    let carried = signed(&relay, carried_nonce);
    assert!(fetched(&relay.ask(&carrier, carried.clone()).await));
    assert_eq!(relay.ask(&carrier, carried.clone()).await, Err(MailboxError::Replayed));

    // Only the carried request's nonce was committed: it outlives a restart.
    relay.shutdown().await;
    let relay = Relay::start(&relay_dir, opts).await;
    let carrier = client(None, &relay.addr).await;
    assert_eq!(relay.ask(&carrier, carried).await, Err(MailboxError::Replayed));
    assert!(!relay.mailboxes.check_nonce(&carried_nonce, now).unwrap());
    assert!(
        relay.mailboxes.check_nonce(&own_nonce, now).unwrap(),
        "the nonce of a request over the owner's own connection is not committed"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorised_fetch_and_ack_attempts_all_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, time) = Relay::with_manual_clock(&dir.path().join("relay")).await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let mallory = Owner::new(dir.path(), "mallory");

    // A contact fills alice's inbox.
    let sender = client(None, &relay.addr).await;
    let cap = alice.capability(now + DAY_MS);
    let mut deposited = Vec::new();
    for i in 0..20 {
        let env = envelope(&format!("m{i}"), 300);
        let r = relay
            .deposit_ok(&sender, deposit(&alice.inbox, Some(cap.clone()), &env))
            .await;
        assert_eq!(r.index, i + 1);
        deposited.push(env);
    }

    // Alice fetches once and acks nothing (index 0): two requests that succeeded
    // and that an eavesdropper will replay verbatim.
    let owner = client(Some(alice.seed), &relay.addr).await;
    let genuine_fetch = fetch(&alice.inbox, false, 0, alice.auth(&relay, Op::Fetch, now, 0));
    let Ok(mailbox_response::Result::Fetched(f)) = relay.ask(&owner, genuine_fetch.clone()).await else {
        panic!("the owner's fetch succeeds")
    };
    assert_eq!(f.envelopes.len(), 20);
    let genuine_ack = ack(&alice.inbox, 0, alice.auth(&relay, Op::Ack, now, 0));
    assert_eq!(
        relay.ask(&owner, genuine_ack.clone()).await,
        Ok(mailbox_response::Result::Deleted(0))
    );
    assert_eq!(relay.all_refusals(), 0);

    // 1,000 attempts, 100 of each kind.
    let random_inbox: [u8; 32] = rand::random();
    let random_sig = || {
        let mut s = rand::random::<[u8; 32]>().to_vec();
        s.extend_from_slice(&rand::random::<[u8; 32]>());
        s
    };
    let mut attempts: Vec<(&'static str, pb::MailboxRequest, &'static str, MailboxError)> = Vec::new();
    let relay_id = relay.peer.to_bytes();
    for i in 0..1000u64 {
        let nonce: [u8; 16] = rand::random();
        // `seed` signing `op` with `arg` for `inbox` on this relay, now, with this round's nonce.
        let signed = |seed: &[u8; 32], op: Op, inbox: &[u8; 32], arg: u64| {
            mb::sign_auth(seed, op, &relay_id, inbox, now, nonce, arg)
        };
        let even = (i / 10) % 2 == 0;
        let skew = mb::AUTH_WINDOW_MS + 1 + rand::random::<u64>() % DAY_MS;
        let attempt = match i % 10 {
            0 => {
                let auth = pb::OwnerAuth {
                    owner_key: rand::random::<[u8; 32]>().to_vec(),
                    timestamp_ms: now,
                    nonce: nonce.to_vec(),
                    signature: random_sig(),
                };
                let req = if even {
                    fetch(&alice.inbox, false, 0, auth)
                } else {
                    ack(&alice.inbox, u64::MAX, auth)
                };
                ("random key and signature", req, MailboxError::Unauthorized)
            }
            1 => {
                let seed: [u8; 32] = rand::random();
                let req = if even {
                    fetch(&alice.inbox, false, 0, signed(&seed, Op::Fetch, &alice.inbox, 0))
                } else {
                    ack(&alice.inbox, u64::MAX, signed(&seed, Op::Ack, &alice.inbox, u64::MAX))
                };
                ("random key signing for alice's inbox", req, MailboxError::Unauthorized)
            }
            2 => {
                let auth = pb::OwnerAuth {
                    owner_key: alice.public().to_vec(),
                    timestamp_ms: now,
                    nonce: nonce.to_vec(),
                    signature: random_sig(),
                };
                let req = if even {
                    fetch(&alice.inbox, false, 0, auth)
                } else {
                    ack(&alice.inbox, u64::MAX, auth)
                };
                ("alice's key, forged signature", req, MailboxError::Unauthorized)
            }
            3 => {
                let req = if even {
                    fetch(
                        &alice.inbox,
                        false,
                        0,
                        signed(&mallory.seed, Op::Fetch, &alice.inbox, 0),
                    )
                } else {
                    ack(
                        &alice.inbox,
                        u64::MAX,
                        signed(&mallory.seed, Op::Ack, &alice.inbox, u64::MAX),
                    )
                };
                (
                    "mallory's key signing for alice's inbox",
                    req,
                    MailboxError::Unauthorized,
                )
            }
            4 => {
                // Mallory's genuine auth for her own inbox, aimed at alice's.
                let req = if even {
                    fetch(&alice.inbox, false, 0, mallory.auth(&relay, Op::Fetch, now, 0))
                } else {
                    ack(&alice.inbox, u64::MAX, mallory.auth(&relay, Op::Ack, now, u64::MAX))
                };
                ("mallory's own auth, retargeted", req, MailboxError::Unauthorized)
            }
            5 | 6 => {
                let (ts, what) = if i % 10 == 5 {
                    (now - skew, "alice's auth, older than the window")
                } else {
                    (now + skew, "alice's auth, beyond the window in the future")
                };
                let req = if even {
                    fetch(&alice.inbox, false, 0, alice.auth(&relay, Op::Fetch, ts, 0))
                } else {
                    ack(&alice.inbox, u64::MAX, alice.auth(&relay, Op::Ack, ts, u64::MAX))
                };
                (what, req, MailboxError::Stale)
            }
            7 => {
                let req = if even {
                    genuine_fetch.clone()
                } else {
                    genuine_ack.clone()
                };
                ("a request that succeeded, replayed", req, MailboxError::Replayed)
            }
            8 => {
                let signed_for = if even { &mallory.inbox } else { &random_inbox };
                let req = if (i / 20) % 2 == 0 {
                    fetch(&alice.inbox, false, 0, signed(&alice.seed, Op::Fetch, signed_for, 0))
                } else {
                    ack(
                        &alice.inbox,
                        u64::MAX,
                        signed(&alice.seed, Op::Ack, signed_for, u64::MAX),
                    )
                };
                (
                    "alice's signature over another inbox id",
                    req,
                    MailboxError::Unauthorized,
                )
            }
            _ => {
                let req = if even {
                    // A fetch signature presented as an ack.
                    ack(&alice.inbox, 0, alice.auth(&relay, Op::Fetch, now, 0))
                } else {
                    // An ack of nothing stretched to an ack of everything.
                    ack(&alice.inbox, u64::MAX, alice.auth(&relay, Op::Ack, now, 0))
                };
                (
                    "alice's signature, other op or argument",
                    req,
                    MailboxError::Unauthorized,
                )
            }
        };
        let (what, req, want) = attempt;
        let op = match &req.op {
            Some(mailbox_request::Op::Fetch(_)) => "fetch",
            Some(mailbox_request::Op::Ack(_)) => "ack",
            _ => unreachable!(),
        };
        attempts.push((what, req, op, want));
    }

    // Mallory and four anonymous peers send them, 50 in flight.
    let mut attackers = vec![client(Some(mallory.seed), &relay.addr).await];
    for _ in 0..4 {
        attackers.push(client(None, &relay.addr).await);
    }
    let t0 = Instant::now();
    let results: Vec<(usize, Outcome)> = stream::iter(attempts.iter().enumerate())
        .map(|(i, (_, req, _, _))| {
            let (net, relay) = (attackers[i % attackers.len()].clone(), &relay);
            async move { (i, relay.ask(&net, req.clone()).await) }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    eprintln!("1,000 unauthorised attempts answered in {:?}", t0.elapsed());

    assert_eq!(results.len(), 1000);
    let successes = results.iter().filter(|(_, r)| r.is_ok()).count();
    assert_eq!(successes, 0, "no unauthorised attempt succeeds");
    let wrong: Vec<String> = results
        .iter()
        .filter(|(i, r)| *r != Err(attempts[*i].3))
        .map(|(i, r)| format!("{}: expected {}, got {r:?}", attempts[*i].0, attempts[*i].3))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} with the wrong status, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    // The relay counted every refusal by operation and reason.
    let mut expected: HashMap<(&str, &str), (MailboxError, u64)> = HashMap::new();
    for (_, _, op, want) in &attempts {
        expected.entry((op, want.code())).or_insert((*want, 0)).1 += 1;
    }
    assert_eq!(
        expected.len(),
        6,
        "fetch and ack, each unauthorized, stale and replayed"
    );
    for ((op, _), (reason, n)) in &expected {
        assert_eq!(relay.refusals(op, *reason), *n, "refusals{{op={op}, reason={reason}}}");
    }
    assert_eq!(relay.all_refusals(), 1000);

    // Alice still fetches, and every envelope is still there.
    let held = relay.holdings(&owner, &alice, now, false).await;
    assert_eq!(
        held.iter().map(|e| e.index).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    assert_eq!(held.iter().map(|e| e.envelope.clone()).collect::<Vec<_>>(), deposited);
    assert_eq!(relay.stats().envelopes, 20, "nothing was acked by an attacker");
    // And her own ack works, so the refusals above were not a broken ack path.
    assert_eq!(
        relay
            .ask(&owner, ack(&alice.inbox, 20, alice.auth(&relay, Op::Ack, now, 20)))
            .await,
        Ok(mailbox_response::Result::Deleted(20))
    );
    assert_eq!(relay.stats().envelopes, 0);
    assert_eq!(relay.all_refusals(), 1000);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_without_a_capability_is_refused() {
    const POW_BITS: u32 = 16;
    let dir = tempfile::tempdir().unwrap();
    let (time, clock) = manual_clock();
    let relay = Relay::start(
        &dir.path().join("relay"),
        RelayTestOptions {
            clock,
            pow_bits: POW_BITS,
            ..RelayTestOptions::default()
        },
    )
    .await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let mallory = Owner::new(dir.path(), "mallory");
    let sender = client(None, &relay.addr).await;

    let env = envelope("hello", 300);
    let genuine = alice.capability(now + DAY_MS);
    let forged = pb::Capability {
        body: genuine.body.clone(),
        signature: mallory.capability(now + DAY_MS).signature,
    };
    let other_env = envelope("other", 300);
    let for_other = mb::solve_pow(&alice.inbox, &other_env, POW_BITS);
    assert!(!mb::pow_ok(&alice.inbox, &env, &for_other, POW_BITS));
    // Some work, but 8 bits short.
    let weak = (0u64..)
        .map(|n| n.to_le_bytes().to_vec())
        .find(|n| mb::pow_ok(&alice.inbox, &env, n, POW_BITS - 8) && !mb::pow_ok(&alice.inbox, &env, n, POW_BITS))
        .unwrap();
    let no_work = insufficient_nonce(&alice.inbox, &env, POW_BITS);
    let mut with_cap_no_work = request_deposit(&alice.inbox, no_work.clone(), &env);
    if let Some(mailbox_request::Op::Deposit(d)) = &mut with_cap_no_work.op {
        d.capability = Some(genuine.clone());
    }
    let unauthorized = MailboxError::Unauthorized;
    let insufficient = MailboxError::InsufficientWork;
    let cases: Vec<(&str, pb::MailboxRequest, MailboxError)> = vec![
        ("no capability", deposit(&alice.inbox, None, &env), unauthorized),
        (
            "mallory's capability for her own inbox",
            deposit(&alice.inbox, Some(mallory.capability(now + DAY_MS)), &env),
            unauthorized,
        ),
        (
            "alice's capability used on mallory's inbox",
            deposit(&mallory.inbox, Some(genuine.clone()), &env),
            unauthorized,
        ),
        (
            "alice's capability signed by mallory",
            deposit(&alice.inbox, Some(forged), &env),
            unauthorized,
        ),
        (
            "an expired capability",
            deposit(&alice.inbox, Some(alice.capability(now - 1)), &env),
            MailboxError::Expired,
        ),
        (
            "request inbox, a nonce that is no proof of work",
            request_deposit(&alice.inbox, no_work, &env),
            insufficient,
        ),
        (
            "request inbox, work done for another envelope",
            request_deposit(&alice.inbox, for_other, &env),
            insufficient,
        ),
        (
            "request inbox, too little work",
            request_deposit(&alice.inbox, weak, &env),
            insufficient,
        ),
        (
            "request inbox, a capability instead of work",
            with_cap_no_work,
            insufficient,
        ),
        (
            "request inbox, an over-long nonce",
            request_deposit(&alice.inbox, vec![0; mb::MAX_POW_NONCE + 1], &env),
            insufficient,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(relay.ask(&sender, req).await, Err(want), "{what}");
    }
    assert_eq!(relay.refusals("deposit", unauthorized), 4);
    assert_eq!(relay.refusals("deposit", MailboxError::Expired), 1);
    assert_eq!(relay.refusals("deposit", insufficient), 5);
    assert_eq!(relay.all_refusals(), 10);
    assert_eq!(relay.stats(), MailboxStats::default(), "nothing was stored");

    // A capability at the last millisecond of its validity still works.
    time.store(now + DAY_MS, Ordering::Relaxed);
    let r = relay
        .deposit_ok(&sender, deposit(&alice.inbox, Some(genuine.clone()), &env))
        .await;
    assert_eq!((r.index, r.accepted_ms), (1, now + DAY_MS));
    assert_eq!(r.keep_until_ms, now + DAY_MS + MailboxLimits::default().retention_ms);
    time.store(now, Ordering::Relaxed);
    // A first-contact deposit with enough work.
    let first = envelope("first contact", 300);
    let nonce = mb::solve_pow(&alice.inbox, &first, POW_BITS);
    let r = relay
        .deposit_ok(&sender, request_deposit(&alice.inbox, nonce, &first))
        .await;
    assert_eq!((r.index, r.accepted_ms, r.request_inbox), (1, now, true));
    assert_eq!(relay.deposits("ok"), 2);
    assert_eq!(relay.all_refusals(), 10);

    // The receipt check is not vacuous: a receipt with a flipped bit fails.
    let again = envelope("again", 300);
    let Ok(mailbox_response::Result::Receipt(mut wire)) =
        relay.ask(&sender, deposit(&alice.inbox, Some(genuine), &again)).await
    else {
        panic!("deposit accepted")
    };
    assert!(mb::verify_receipt(&wire).is_ok());
    wire.signature[7] ^= 1;
    assert!(mb::verify_receipt(&wire).is_err());

    // Alice finds exactly the accepted envelopes.
    let owner = client(Some(alice.seed), &relay.addr).await;
    let held = relay.holdings(&owner, &alice, now, false).await;
    assert_eq!(
        held.iter().map(|e| e.envelope.clone()).collect::<Vec<_>>(),
        vec![env, again]
    );
    let requests = relay.holdings(&owner, &alice, now, true).await;
    assert_eq!(
        requests.iter().map(|e| e.envelope.clone()).collect::<Vec<_>>(),
        vec![first]
    );
    assert_eq!(relay.stats().envelopes, 3);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_over_quota_gets_quota_exceeded_and_others_still_get_through() {
    const SMALL: usize = 256;
    const BIG: usize = 8192;
    let limits = MailboxLimits {
        sender_max_envelopes: 5,
        inbox_max_envelopes: 12,
        // Two big envelopes per sender, five per inbox (the counts never bind for them).
        sender_max_bytes: (2 * BIG + BIG / 2) as u64,
        inbox_max_bytes: (5 * BIG + BIG / 2) as u64,
        ..MailboxLimits::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let (time, clock) = manual_clock();
    let relay = Relay::start(
        &dir.path().join("relay"),
        RelayTestOptions {
            clock,
            limits: limits.clone(),
            ..RelayTestOptions::default()
        },
    )
    .await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let bob = Owner::new(dir.path(), "bob");
    let (alice_cap, bob_cap) = (alice.capability(now + DAY_MS), bob.capability(now + DAY_MS));
    let mut senders = Vec::new();
    for _ in 0..4 {
        senders.push(client(None, &relay.addr).await);
    }
    let alice_dev = client(Some(alice.seed), &relay.addr).await;
    let bob_dev = client(Some(bob.seed), &relay.addr).await;

    // `n` concurrent deposits from sender `s` into `inbox`; returns (accepted, quota_exceeded).
    let burst = |s: usize, inbox: [u8; 32], cap: pb::Capability, n: usize, len: usize| {
        let (net, relay) = (senders[s].clone(), &relay);
        async move {
            let results: Vec<(Vec<u8>, Outcome)> = stream::iter(0..n)
                .map(|_| {
                    let (net, cap) = (net.clone(), cap.clone());
                    let env = envelope(&format!("s{s}"), len);
                    async move {
                        let r = relay.ask(&net, deposit(&inbox, Some(cap), &env)).await;
                        (env, r)
                    }
                })
                .buffer_unordered(n)
                .collect()
                .await;
            let mut ok = 0;
            let mut refused = 0;
            for (env, r) in results {
                match r {
                    Ok(result) => {
                        relay.check_receipt(result, &inbox, false, &env);
                        ok += 1;
                    }
                    Err(MailboxError::QuotaExceeded) => refused += 1,
                    Err(e) => panic!("sender {s}: unexpected refusal {e}"),
                }
            }
            (ok, refused)
        }
    };

    // Count quotas (alice): sender 0 bursts past its share.
    assert_eq!(burst(0, alice.inbox, alice_cap.clone(), 10, SMALL).await, (5, 5));
    assert_eq!(burst(0, alice.inbox, alice_cap.clone(), 1, SMALL).await, (0, 1));
    assert_eq!(relay.stats().envelopes, 5, "the sender holds exactly its quota");
    // Others still get through, up to the inbox quota (12).
    assert_eq!(burst(1, alice.inbox, alice_cap.clone(), 5, SMALL).await, (5, 0));
    assert_eq!(burst(2, alice.inbox, alice_cap.clone(), 5, SMALL).await, (2, 3));
    assert_eq!(burst(3, alice.inbox, alice_cap.clone(), 3, SMALL).await, (0, 3));
    let held = relay.holdings(&alice_dev, &alice, now, false).await;
    assert_eq!(held.len(), 12, "the inbox never holds more than its quota");
    assert_eq!(relay.stats().envelopes, 12);
    let by_sender = count_tags(&held);
    assert_eq!((by_sender["s0"], by_sender["s1"], by_sender["s2"]), (5, 5, 2));
    assert!(!by_sender.contains_key("s3"));
    // Quotas bound what is held, not what was ever sent: once alice acks
    // sender 0's five, sender 2 gets the rest of its own share and no more.
    let s0_last = held
        .iter()
        .filter(|e| tag_of(e) == "s0")
        .map(|e| e.index)
        .max()
        .unwrap();
    assert_eq!(s0_last, 5, "sender 0 deposited first");
    let acked = relay
        .ask(&alice_dev, ack(&alice.inbox, 5, alice.auth(&relay, Op::Ack, now, 5)))
        .await;
    assert_eq!(acked, Ok(mailbox_response::Result::Deleted(5)));
    assert_eq!(burst(2, alice.inbox, alice_cap.clone(), 5, SMALL).await, (3, 2));
    assert_eq!(relay.holdings(&alice_dev, &alice, now, false).await.len(), 10);

    // Byte quotas (bob): two big envelopes per sender, five per inbox.
    assert_eq!(burst(0, bob.inbox, bob_cap.clone(), 4, BIG).await, (2, 2));
    assert_eq!(burst(1, bob.inbox, bob_cap.clone(), 4, BIG).await, (2, 2));
    assert_eq!(burst(2, bob.inbox, bob_cap.clone(), 4, BIG).await, (1, 3));
    // What still fits the inbox's bytes gets in; a big one does not.
    assert_eq!(burst(3, bob.inbox, bob_cap.clone(), 1, SMALL).await, (1, 0));
    assert_eq!(burst(3, bob.inbox, bob_cap.clone(), 1, BIG).await, (0, 1));
    let held = relay.holdings(&bob_dev, &bob, now, false).await;
    let bytes: usize = held.iter().map(|e| e.envelope.len()).sum();
    assert_eq!(bytes, 5 * BIG + SMALL);
    assert!(bytes as u64 <= limits.inbox_max_bytes);
    let by_sender = count_tags(&held);
    assert_eq!(
        (by_sender["s0"], by_sender["s1"], by_sender["s2"], by_sender["s3"]),
        (2, 2, 1, 1)
    );

    let refused = 5 + 1 + 3 + 3 + 2 + 2 + 2 + 3 + 1;
    assert_eq!(relay.refusals("deposit", MailboxError::QuotaExceeded), refused);
    assert_eq!(relay.deposits("quota_exceeded"), refused);
    assert_eq!(relay.all_refusals(), refused);
    assert_eq!(relay.deposits("ok"), 5 + 5 + 2 + 3 + 2 + 2 + 1 + 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_over_the_size_cap_is_refused_as_too_large() {
    const CAP: usize = 64 * 1024;
    const POW_BITS: u32 = 8;
    let dir = tempfile::tempdir().unwrap();
    let (time, clock) = manual_clock();
    let relay = Relay::start(
        &dir.path().join("relay"),
        RelayTestOptions {
            clock,
            pow_bits: POW_BITS,
            limits: MailboxLimits {
                max_envelope_bytes: CAP,
                ..MailboxLimits::default()
            },
            ..RelayTestOptions::default()
        },
    )
    .await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let cap = alice.capability(now + DAY_MS);
    let sender = client(None, &relay.addr).await;

    for len in [CAP + 1, 2 * CAP, 3 * 1024 * 1024] {
        let env = envelope("big", len);
        assert_eq!(
            relay.ask(&sender, deposit(&alice.inbox, Some(cap.clone()), &env)).await,
            Err(MailboxError::TooLarge),
            "{len} bytes"
        );
    }
    let env = envelope("big request", CAP + 1);
    let nonce = mb::solve_pow(&alice.inbox, &env, POW_BITS);
    assert_eq!(
        relay.ask(&sender, request_deposit(&alice.inbox, nonce, &env)).await,
        Err(MailboxError::TooLarge),
        "the request inbox has the same cap"
    );
    assert_eq!(relay.refusals("deposit", MailboxError::TooLarge), 4);
    assert_eq!(relay.stats(), MailboxStats::default());

    // Exactly at the cap is accepted.
    let at_cap = envelope("at cap", CAP);
    relay
        .deposit_ok(&sender, deposit(&alice.inbox, Some(cap), &at_cap))
        .await;
    let owner = client(Some(alice.seed), &relay.addr).await;
    let held = relay.holdings(&owner, &alice, now, false).await;
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].envelope, at_cap);
    assert_eq!(relay.all_refusals(), 4);
    relay.shutdown().await;
}

/// Sends and reads arbitrary bytes, like a hostile peer would.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut b = Vec::new();
        io.take(16 << 20).read_to_end(&mut b).await?;
        Ok(b)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut b = Vec::new();
        io.take(16 << 20).read_to_end(&mut b).await?;
        Ok(b)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&r).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&r).await?;
        io.close().await
    }
}

type RawPeer = Swarm<request_response::Behaviour<RawCodec>>;

/// A peer that writes raw frames on `/tidings/mailbox/1`.
fn raw_peer() -> RawPeer {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(MAILBOX_PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(TIMEOUT),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Writes `bytes` as one request frame and returns the raw answer or the failure.
async fn raw_request(swarm: &mut RawPeer, relay: &Relay, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    swarm.add_peer_address(relay.peer, relay.addr.clone());
    let id = swarm.behaviour_mut().send_request(&relay.peer, bytes);
    loop {
        match tokio::time::timeout(TIMEOUT, swarm.select_next_some())
            .await
            .expect("a swarm event in time")
        {
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            }) if request_id == id => return Ok(response),
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. })
                if request_id == id =>
            {
                return Err(error.to_string());
            }
            _ => {}
        }
    }
}

/// Whether the relay refused to answer: a stream error, or the stream closed without an answer.
fn unanswered(r: &Result<Vec<u8>, String>) -> bool {
    match r {
        Err(_) => true,
        Ok(bytes) => bytes.is_empty(),
    }
}

fn raw_outcome(r: Result<Vec<u8>, String>) -> Outcome {
    let bytes = r.expect("an answer");
    outcome(pb::MailboxResponse::decode(bytes.as_slice()).expect("a decodable answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_mailbox_frames_are_refused_and_the_relay_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, time) = Relay::with_manual_clock(&dir.path().join("relay")).await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let cap = alice.capability(now + DAY_MS);
    let mut evil = raw_peer();

    // Not a protobuf at all (every byte a varint continuation).
    let garbage: Vec<u8> = (0..4096).map(|i| (i * 7 + 3) as u8 | 0x80).collect();
    let r = raw_request(&mut evil, &relay, garbage).await;
    assert!(unanswered(&r), "garbage: {r:?}");
    // A valid deposit cut inside its envelope.
    let valid = deposit(&alice.inbox, Some(cap.clone()), &envelope("cut", 2000)).encode_to_vec();
    let r = raw_request(&mut evil, &relay, valid[..valid.len() / 2].to_vec()).await;
    assert!(unanswered(&r), "truncated: {r:?}");
    // One byte over the frame cap, then far over it: refused before decoding.
    let mut over = deposit(&alice.inbox, Some(cap.clone()), &envelope("huge", 1024)).encode_to_vec();
    over.resize(MAX_MAILBOX_FRAME + 1, 0);
    let r = raw_request(&mut evil, &relay, over).await;
    assert!(unanswered(&r), "frame cap + 1: {r:?}");
    let huge = deposit(&alice.inbox, Some(cap.clone()), &envelope("huge", 5 << 20)).encode_to_vec();
    let r = raw_request(&mut evil, &relay, huge).await;
    assert!(unanswered(&r), "5 MiB frame: {r:?}");
    assert_eq!(relay.all_refusals(), 0, "undecodable frames never reach the service");

    // Well-formed frames with bad contents get a status.
    let empty = raw_request(&mut evil, &relay, Vec::new()).await;
    assert_eq!(raw_outcome(empty), Err(MailboxError::BadRequest), "no operation");
    let not_an_envelope = deposit(&alice.inbox, Some(cap.clone()), &[0xff; 300]).encode_to_vec();
    let r = raw_request(&mut evil, &relay, not_an_envelope).await;
    assert_eq!(
        raw_outcome(r),
        Err(MailboxError::BadRequest),
        "envelope bytes that do not decode"
    );
    let mut short_inbox = deposit(&[0; 32], Some(cap.clone()), &envelope("x", 300));
    if let Some(mailbox_request::Op::Deposit(d)) = &mut short_inbox.op {
        d.inbox_id.pop();
    }
    let r = raw_request(&mut evil, &relay, short_inbox.encode_to_vec()).await;
    assert_eq!(raw_outcome(r), Err(MailboxError::BadRequest), "a 31-byte inbox id");
    let mut auth = alice.auth(&relay, Op::Fetch, now, 0);
    auth.nonce.pop();
    let r = raw_request(&mut evil, &relay, fetch(&alice.inbox, false, 0, auth).encode_to_vec()).await;
    assert_eq!(raw_outcome(r), Err(MailboxError::BadRequest), "a 15-byte nonce");
    assert_eq!(relay.refusals("none", MailboxError::BadRequest), 1);
    assert_eq!(relay.refusals("deposit", MailboxError::BadRequest), 2);
    assert_eq!(relay.refusals("fetch", MailboxError::BadRequest), 1);
    assert_eq!(relay.all_refusals(), 4);
    assert_eq!(relay.stats(), MailboxStats::default());

    // The relay stays up: the same hostile peer, then a fresh one, deposit legitimately.
    let env = envelope("after the garbage", 300);
    let r = raw_request(
        &mut evil,
        &relay,
        deposit(&alice.inbox, Some(cap.clone()), &env).encode_to_vec(),
    )
    .await;
    relay.check_receipt(raw_outcome(r).expect("accepted"), &alice.inbox, false, &env);
    let sender = client(None, &relay.addr).await;
    let env2 = envelope("from a fresh peer", 300);
    relay.deposit_ok(&sender, deposit(&alice.inbox, Some(cap), &env2)).await;
    let owner = client(Some(alice.seed), &relay.addr).await;
    let held = relay.holdings(&owner, &alice, now, false).await;
    assert_eq!(
        held.iter().map(|e| e.envelope.clone()).collect::<Vec<_>>(),
        vec![env, env2]
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_envelopes_are_never_served_and_are_swept() {
    const RETENTION: u64 = HOUR_MS;
    const POW_BITS: u32 = 8;
    let dir = tempfile::tempdir().unwrap();
    let relay_dir = dir.path().join("relay");
    let (time, clock) = manual_clock();
    let opts = RelayTestOptions {
        clock,
        pow_bits: POW_BITS,
        limits: MailboxLimits {
            retention_ms: RETENTION,
            ..MailboxLimits::default()
        },
        // No sweep after the one at start: what fetch leaves out, it leaves out by itself.
        sweep_interval: Duration::from_secs(24 * 3600),
        ..RelayTestOptions::default()
    };
    let relay = Relay::start(&relay_dir, opts.clone()).await;
    let t0 = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let cap = alice.capability(t0 + 30 * DAY_MS);
    let sender = client(None, &relay.addr).await;

    // Batch A at t0: six envelopes and two first-contact requests.
    let mut a = Vec::new();
    for i in 0..6 {
        let env = envelope(&format!("a{i}"), 300);
        let r = relay
            .deposit_ok(&sender, deposit(&alice.inbox, Some(cap.clone()), &env))
            .await;
        assert_eq!(r.keep_until_ms, t0 + RETENTION);
        a.push(env);
    }
    for i in 0..2 {
        let env = envelope(&format!("r{i}"), 300);
        let nonce = mb::solve_pow(&alice.inbox, &env, POW_BITS);
        relay
            .deposit_ok(&sender, request_deposit(&alice.inbox, nonce, &env))
            .await;
    }
    // Batch B half an hour later.
    time.store(t0 + RETENTION / 2, Ordering::Relaxed);
    let mut b = Vec::new();
    for i in 0..4 {
        let env = envelope(&format!("b{i}"), 300);
        let r = relay
            .deposit_ok(&sender, deposit(&alice.inbox, Some(cap.clone()), &env))
            .await;
        assert_eq!(r.keep_until_ms, t0 + RETENTION / 2 + RETENTION);
        b.push(env);
    }
    let owner = client(Some(alice.seed), &relay.addr).await;
    let envelopes = |held: Vec<pb::StoredEnvelope>| held.into_iter().map(|e| e.envelope).collect::<Vec<_>>();

    // One millisecond before A's deadline everything is served.
    let now = t0 + RETENTION - 1;
    time.store(now, Ordering::Relaxed);
    let all: Vec<Vec<u8>> = a.iter().chain(&b).cloned().collect();
    assert_eq!(envelopes(relay.holdings(&owner, &alice, now, false).await), all);
    assert_eq!(relay.holdings(&owner, &alice, now, true).await.len(), 2);
    // At A's deadline, A is no longer served, though nothing was swept yet.
    let now = t0 + RETENTION;
    time.store(now, Ordering::Relaxed);
    assert_eq!(envelopes(relay.holdings(&owner, &alice, now, false).await), b);
    assert!(relay.holdings(&owner, &alice, now, true).await.is_empty());
    let stats = relay.stats();
    assert_eq!(
        stats.envelopes, 12,
        "expired envelopes are still stored: fetch filtered them"
    );
    assert_eq!(relay.metrics.swept.get(), 0);
    // A fetch after an index inside A does not bring them back either.
    let req = fetch(&alice.inbox, false, 2, alice.auth(&relay, Op::Fetch, now, 2));
    let Ok(mailbox_response::Result::Fetched(f)) = relay.ask(&owner, req).await else {
        panic!("fetch succeeds")
    };
    assert_eq!(f.envelopes.into_iter().map(|e| e.envelope).collect::<Vec<_>>(), b);

    // The same relay again, now sweeping every 50 ms.
    drop((sender, owner));
    relay.shutdown().await;
    let relay = Relay::start(
        &relay_dir,
        RelayTestOptions {
            sweep_interval: Duration::from_millis(50),
            ..opts
        },
    )
    .await;
    eventually("the sweep removes batch A", || relay.stats().envelopes == 4).await;
    eventually("the swept metric counts them", || relay.metrics.swept.get() == 8).await;
    eventually("the gauge follows", || relay.metrics.envelopes.get() == 4).await;
    assert_eq!(relay.stats().bytes, 4 * 300);
    let owner = client(Some(alice.seed), &relay.addr).await;
    assert_eq!(envelopes(relay.holdings(&owner, &alice, now, false).await), b);
    assert!(relay.holdings(&owner, &alice, now, true).await.is_empty());

    // Past B's deadline: not served, then swept.
    let now = t0 + RETENTION / 2 + RETENTION;
    time.store(now, Ordering::Relaxed);
    assert!(relay.holdings(&owner, &alice, now, false).await.is_empty());
    eventually("the sweep removes batch B", || relay.stats() == MailboxStats::default()).await;
    eventually("the swept metric counts all", || relay.metrics.swept.get() == 12).await;
    assert_eq!(relay.metrics.swept.get(), 12, "nothing counted twice");
    assert_eq!(relay.all_refusals(), 0);
    relay.shutdown().await;
}

/// What a flooding peer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Spray {
    /// A normal-inbox deposit without a capability.
    NoCapability,
    /// A deposit with a valid capability: accepted until the sender's quota is full.
    OverQuota,
    /// A request-inbox deposit without enough proof of work.
    NoWork,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_deposits_from_many_peers_does_not_block_a_legitimate_user() {
    const FLOODERS: usize = 50;
    const IN_FLIGHT_PER_FLOODER: usize = 4;
    const MAX_PER_FLOODER: usize = 5_000;
    const QUOTA: u64 = 10;
    const POW_BITS: u32 = 16;
    const LEGIT: u64 = 10;
    /// Longest a legitimate deposit may take during the flood.
    const BOUND: Duration = Duration::from_secs(5);
    let dir = tempfile::tempdir().unwrap();
    let (time, clock) = manual_clock();
    let relay = Relay::start(
        &dir.path().join("relay"),
        RelayTestOptions {
            clock,
            pow_bits: POW_BITS,
            limits: MailboxLimits {
                sender_max_envelopes: QUOTA,
                ..MailboxLimits::default()
            },
            ..RelayTestOptions::default()
        },
    )
    .await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let carol = Owner::new(dir.path(), "carol");
    let cap = alice.capability(now + DAY_MS);

    let stop = Arc::new(AtomicBool::new(false));
    let mut flooders = Vec::new();
    for i in 0..FLOODERS {
        let net = client(None, &relay.addr).await;
        let (peer, stop, cap, inbox) = (relay.peer, stop.clone(), cap.clone(), alice.inbox);
        flooders.push(tokio::spawn(async move {
            stream::iter(0..MAX_PER_FLOODER)
                .take_while(|_| futures::future::ready(!stop.load(Ordering::Relaxed)))
                .map(|j| {
                    let (net, cap) = (net.clone(), cap.clone());
                    async move {
                        let env = envelope(&format!("flood{i}"), 256);
                        let (spray, req) = match (i + j) % 3 {
                            0 => (Spray::NoCapability, deposit(&inbox, None, &env)),
                            1 => (Spray::OverQuota, deposit(&inbox, Some(cap), &env)),
                            _ => (
                                Spray::NoWork,
                                request_deposit(&inbox, insufficient_nonce(&inbox, &env, POW_BITS), &env),
                            ),
                        };
                        let answer = tokio::time::timeout(TIMEOUT, net.mailbox(peer, req)).await;
                        (
                            spray,
                            answer
                                .map_err(|_| "timed out".to_owned())
                                .and_then(|r| r.map(outcome).map_err(|e| e.to_string())),
                        )
                    }
                })
                .buffer_unordered(IN_FLIGHT_PER_FLOODER)
                .collect::<Vec<_>>()
                .await
        }));
    }

    // Once the flood is in full swing (every kind refused many times over)...
    eventually("the flood is under way", || {
        relay.refusals("deposit", MailboxError::Unauthorized) >= 500
            && relay.refusals("deposit", MailboxError::InsufficientWork) >= 500
            && relay.refusals("deposit", MailboxError::QuotaExceeded) >= 100
    })
    .await;
    // ...carol's deposits into alice's inbox are accepted with receipts, promptly.
    let legit = client(Some(carol.seed), &relay.addr).await;
    let mut latencies = Vec::new();
    let mut mine = Vec::new();
    for i in 0..LEGIT {
        let env = envelope(&format!("carol{i}"), 256);
        let t = Instant::now();
        let r = tokio::time::timeout(
            BOUND,
            relay.deposit_ok(&legit, deposit(&alice.inbox, Some(cap.clone()), &env)),
        )
        .await
        .unwrap_or_else(|_| panic!("carol's deposit {i} took longer than {BOUND:?} during the flood"));
        latencies.push(t.elapsed());
        mine.push((r.index, env));
    }
    let still_flooding = !flooders.iter().any(|f| f.is_finished());
    stop.store(true, Ordering::Relaxed);
    assert!(still_flooding, "the flood lasted through carol's deposits");
    latencies.sort();
    eprintln!(
        "carol's deposits during the flood: median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );

    // Every flood request was answered with the refusal its kind calls for.
    let mut tally: HashMap<(Spray, &str), u64> = HashMap::new();
    let mut accepted_per_flooder = Vec::new();
    let mut failures = Vec::new();
    for f in flooders {
        let mut accepted = 0;
        for (spray, answer) in f.await.expect("flooder") {
            match answer {
                Err(e) => failures.push(e),
                Ok(o) => {
                    let o = o.map(|_| ());
                    let expected = match spray {
                        Spray::NoCapability => o == Err(MailboxError::Unauthorized),
                        Spray::OverQuota => o.is_ok() || o == Err(MailboxError::QuotaExceeded),
                        Spray::NoWork => {
                            o == Err(MailboxError::InsufficientWork) || o == Err(MailboxError::RateLimited)
                        }
                    };
                    assert!(expected, "{spray:?} answered {o:?}");
                    if o.is_ok() {
                        accepted += 1;
                    }
                    *tally
                        .entry((spray, o.err().map_or("ok", MailboxError::code)))
                        .or_insert(0) += 1;
                }
            }
        }
        accepted_per_flooder.push(accepted);
    }
    assert!(
        failures.is_empty(),
        "{} flood requests unanswered: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let total: u64 = tally.values().sum();
    eprintln!("{total} flood requests from {FLOODERS} peers: {tally:?}");
    assert!(
        accepted_per_flooder.iter().all(|&n| n <= QUOTA),
        "no flooder got more than its quota in: {accepted_per_flooder:?}"
    );
    let flood_accepted: u64 = accepted_per_flooder.iter().sum();
    assert!(flood_accepted > 0);
    let count = |spray, e: MailboxError| tally.get(&(spray, e.code())).copied().unwrap_or(0);

    // The metrics counted every refusal.
    assert_eq!(
        relay.refusals("deposit", MailboxError::Unauthorized),
        count(Spray::NoCapability, MailboxError::Unauthorized)
    );
    assert_eq!(
        relay.refusals("deposit", MailboxError::QuotaExceeded),
        count(Spray::OverQuota, MailboxError::QuotaExceeded)
    );
    assert_eq!(
        relay.refusals("deposit", MailboxError::InsufficientWork),
        count(Spray::NoWork, MailboxError::InsufficientWork)
    );
    assert_eq!(
        relay.refusals("deposit", MailboxError::RateLimited),
        count(Spray::NoWork, MailboxError::RateLimited)
    );
    assert_eq!(relay.all_refusals(), total - flood_accepted);
    assert_eq!(relay.deposits("ok"), flood_accepted + LEGIT);

    // Alice's inbox holds carol's envelopes and each flooder's quota, nothing more.
    let owner = client(Some(alice.seed), &relay.addr).await;
    let held = relay.holdings(&owner, &alice, now, false).await;
    assert_eq!(held.len() as u64, flood_accepted + LEGIT);
    for (index, env) in &mine {
        assert!(
            held.iter().any(|e| e.index == *index && e.envelope == *env),
            "carol's envelope {index} is held"
        );
    }
    assert!(
        relay.holdings(&owner, &alice, now, true).await.is_empty(),
        "no request got in without work"
    );
    drop((owner, legit));
    relay.shutdown().await;
}

// ------------------------------------------------------------- batched deposits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_deposits_gets_one_receipt_per_item_with_consecutive_indices() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, time) = Relay::with_manual_clock(&dir.path().join("relay")).await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let bob = Owner::new(dir.path(), "bob");
    let (alice_cap, bob_cap) = (alice.capability(now + DAY_MS), bob.capability(now + DAY_MS));
    let sender = client(None, &relay.addr).await;

    // A single deposit first: the batch continues alice's indices after it.
    let first = envelope("first", 300);
    let r = relay
        .deposit_ok(&sender, deposit(&alice.inbox, Some(alice_cap.clone()), &first))
        .await;
    assert_eq!(r.index, 1);

    // 24 items, alternating between alice's and bob's inboxes.
    let items: Vec<([u8; 32], Vec<u8>)> = (0..24)
        .map(|i| {
            let inbox = if i % 2 == 0 { alice.inbox } else { bob.inbox };
            (inbox, envelope(&format!("b{i}"), 300 + i))
        })
        .collect();
    let req = batch(items.iter().map(|(inbox, env)| {
        let cap = if *inbox == alice.inbox { &alice_cap } else { &bob_cap };
        deposit(inbox, Some(cap.clone()), env)
    }));
    let results = relay.ask_batch(&sender, req).await;
    let receipts: Vec<mb::Receipt> = results
        .into_iter()
        .zip(&items)
        .map(|(r, (inbox, env))| {
            let wire = r.expect("every item is accepted");
            // Signed by the relay, for this item's inbox and envelope hash.
            relay.check_receipt(mailbox_response::Result::Receipt(wire), inbox, false, env)
        })
        .collect();
    assert_ne!(
        receipts[0].envelope_hash,
        mb::envelope_hash(&items[2].1),
        "each receipt names its own envelope"
    );
    let indices = |inbox: [u8; 32]| -> Vec<u64> {
        receipts
            .iter()
            .zip(&items)
            .filter(|(_, (i, _))| *i == inbox)
            .map(|(r, _)| r.index)
            .collect()
    };
    assert_eq!(indices(alice.inbox), (2..=13).collect::<Vec<u64>>(), "in batch order");
    assert_eq!(indices(bob.inbox), (1..=12).collect::<Vec<u64>>(), "in batch order");
    assert!(receipts.iter().all(|r| r.accepted_ms == now));

    // Each owner finds exactly its envelopes, under the indices its receipts name.
    for (owner, mut expected) in [(&alice, vec![(1, first)]), (&bob, Vec::new())] {
        expected.extend(
            receipts
                .iter()
                .zip(&items)
                .filter(|(_, (i, _))| *i == owner.inbox)
                .map(|(r, (_, env))| (r.index, env.clone())),
        );
        let dev = client(Some(owner.seed), &relay.addr).await;
        let held = relay.holdings(&dev, owner, now, false).await;
        assert_eq!(
            held.into_iter().map(|e| (e.index, e.envelope)).collect::<Vec<_>>(),
            expected
        );
    }
    assert_eq!(relay.deposits("ok"), 25, "each item counts as a deposit");
    assert_eq!((relay.requests("deposit_batch"), relay.requests("deposit")), (1, 1));
    assert_eq!(relay.all_refusals(), 0);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixing_refused_items_answers_each_and_stores_the_valid_ones() {
    const CAP: usize = 4096;
    const POW_BITS: u32 = 8;
    let dir = tempfile::tempdir().unwrap();
    let (time, clock) = manual_clock();
    let relay = Relay::start(
        &dir.path().join("relay"),
        RelayTestOptions {
            clock,
            pow_bits: POW_BITS,
            limits: MailboxLimits {
                sender_max_envelopes: 3,
                max_envelope_bytes: CAP,
                ..MailboxLimits::default()
            },
            ..RelayTestOptions::default()
        },
    )
    .await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let cap = alice.capability(now + DAY_MS);
    let sender = client(None, &relay.addr).await;

    let valid: Vec<Vec<u8>> = (0..4).map(|i| envelope(&format!("a{i}"), 300)).collect();
    let first_contact = envelope("first contact", 300);
    let work = mb::solve_pow(&alice.inbox, &first_contact, POW_BITS);
    let lazy = envelope("no work", 300);
    // Each item, and what it should come to: accepted (into the request inbox
    // or not, with this envelope) or refused.
    type Expect<'a> = Result<(bool, &'a [u8]), MailboxError>;
    let items: Vec<(pb::MailboxRequest, Expect)> = vec![
        (
            deposit(&alice.inbox, Some(cap.clone()), &valid[0]),
            Ok((false, &valid[0])),
        ),
        (
            deposit(&alice.inbox, None, &envelope("no capability", 300)),
            Err(MailboxError::Unauthorized),
        ),
        (
            deposit(&alice.inbox, Some(cap.clone()), &envelope("big", CAP + 1)),
            Err(MailboxError::TooLarge),
        ),
        (
            deposit(&alice.inbox, Some(cap.clone()), &valid[1]),
            Ok((false, &valid[1])),
        ),
        (
            request_deposit(&alice.inbox, insufficient_nonce(&alice.inbox, &lazy, POW_BITS), &lazy),
            Err(MailboxError::InsufficientWork),
        ),
        (
            deposit(&alice.inbox, Some(cap.clone()), &valid[2]),
            Ok((false, &valid[2])),
        ),
        // The sender's fourth envelope: earlier items of the batch fill its quota of three.
        (
            deposit(&alice.inbox, Some(cap.clone()), &valid[3]),
            Err(MailboxError::QuotaExceeded),
        ),
        (
            request_deposit(&alice.inbox, work, &first_contact),
            Ok((true, &first_contact)),
        ),
        (
            deposit(&alice.inbox, Some(alice.capability(now - 1)), &envelope("late", 300)),
            Err(MailboxError::Expired),
        ),
    ];
    let expected: Vec<_> = items.iter().map(|(_, e)| *e).collect();
    let results = relay
        .ask_batch(&sender, batch(items.iter().map(|(r, _)| r.clone())))
        .await;
    let mut receipts = Vec::new();
    for (i, (got, want)) in results.into_iter().zip(expected).enumerate() {
        match (got, want) {
            (Ok(wire), Ok((request_inbox, env))) => receipts.push(relay.check_receipt(
                mailbox_response::Result::Receipt(wire),
                &alice.inbox,
                request_inbox,
                env,
            )),
            (got, want) => assert_eq!(got.map(|_| ()), want.map(|_| ()), "item {i}"),
        }
    }
    let indices: Vec<(bool, u64)> = receipts.iter().map(|r| (r.request_inbox, r.index)).collect();
    assert_eq!(indices, vec![(false, 1), (false, 2), (false, 3), (true, 1)]);

    // Only the accepted items were stored.
    let owner = client(Some(alice.seed), &relay.addr).await;
    let held = relay.holdings(&owner, &alice, now, false).await;
    assert_eq!(
        held.into_iter().map(|e| e.envelope).collect::<Vec<_>>(),
        valid[..3].to_vec()
    );
    let requests = relay.holdings(&owner, &alice, now, true).await;
    assert_eq!(
        requests.into_iter().map(|e| e.envelope).collect::<Vec<_>>(),
        vec![first_contact]
    );
    assert_eq!(relay.stats().envelopes, 4);

    // Every item was counted like a single deposit.
    assert_eq!(relay.deposits("ok"), 4);
    assert_eq!(relay.deposits("quota_exceeded"), 1);
    for e in [
        MailboxError::Unauthorized,
        MailboxError::TooLarge,
        MailboxError::InsufficientWork,
        MailboxError::QuotaExceeded,
        MailboxError::Expired,
    ] {
        assert_eq!(relay.refusals("deposit", e), 1, "{e}");
    }
    assert_eq!(relay.all_refusals(), 5);
    assert_eq!(relay.requests("deposit_batch"), 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_limit_is_refused_whole_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, time) = Relay::with_manual_clock(&dir.path().join("relay")).await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let cap = alice.capability(now + DAY_MS);
    let sender = client(None, &relay.addr).await;
    let envelopes: Vec<Vec<u8>> = (0..=mb::MAX_DEPOSITS_PER_BATCH)
        .map(|i| envelope(&format!("e{i}"), 300))
        .collect();
    let deposits = |envs: &[Vec<u8>]| batch(envs.iter().map(|e| deposit(&alice.inbox, Some(cap.clone()), e)));

    assert_eq!(
        relay.ask(&sender, deposits(&envelopes)).await,
        Err(MailboxError::BadRequest),
        "{} valid deposits in one batch",
        envelopes.len()
    );
    assert_eq!(
        relay.ask(&sender, deposits(&[])).await,
        Err(MailboxError::BadRequest),
        "an empty batch"
    );
    assert_eq!(relay.stats(), MailboxStats::default(), "nothing was stored");
    assert_eq!(relay.deposits("ok"), 0);
    assert_eq!(relay.refusals("deposit_batch", MailboxError::BadRequest), 2);
    assert_eq!(relay.all_refusals(), 2);

    // Exactly the limit is accepted, item by item.
    let at_limit = &envelopes[..mb::MAX_DEPOSITS_PER_BATCH];
    let results = relay.ask_batch(&sender, deposits(at_limit)).await;
    for (i, (r, env)) in results.into_iter().zip(at_limit).enumerate() {
        let wire = r.expect("accepted");
        let r = relay.check_receipt(mailbox_response::Result::Receipt(wire), &alice.inbox, false, env);
        assert_eq!(r.index, i as u64 + 1);
    }
    assert_eq!(relay.stats().envelopes, mb::MAX_DEPOSITS_PER_BATCH as u64);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capability_for_another_inbox_is_refused_even_after_a_valid_one_was_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, time) = Relay::with_manual_clock(&dir.path().join("relay")).await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let bob = Owner::new(dir.path(), "bob");
    let mallory = Owner::new(dir.path(), "mallory");
    let genuine = alice.capability(now + DAY_MS);
    let sender = client(None, &relay.addr).await;
    let other_sender = client(None, &relay.addr).await;

    // Alice's capability is verified and remembered, and used again.
    for i in 0..2 {
        let env = envelope(&format!("ok{i}"), 300);
        relay
            .deposit_ok(&sender, deposit(&alice.inbox, Some(genuine.clone()), &env))
            .await;
    }
    // It opens alice's inbox only: alone, in a batch, from any sender.
    let env = envelope("elsewhere", 300);
    assert_eq!(
        relay
            .ask(&sender, deposit(&bob.inbox, Some(genuine.clone()), &env))
            .await,
        Err(MailboxError::Unauthorized)
    );
    assert_eq!(
        relay
            .ask(&other_sender, deposit(&mallory.inbox, Some(genuine.clone()), &env))
            .await,
        Err(MailboxError::Unauthorized)
    );
    let in_batch = relay
        .ask_batch(
            &sender,
            batch([
                deposit(&bob.inbox, Some(genuine.clone()), &env),
                deposit(&alice.inbox, Some(genuine.clone()), &env),
                deposit(&mallory.inbox, Some(genuine.clone()), &env),
            ]),
        )
        .await;
    let codes: Vec<_> = in_batch
        .iter()
        .map(|r| r.as_ref().map(|_| ()).map_err(|e| *e))
        .collect();
    assert_eq!(
        codes,
        vec![Err(MailboxError::Unauthorized), Ok(()), Err(MailboxError::Unauthorized)]
    );
    // The cached body with another signature is not the cached capability.
    let mut bad_sig = genuine.clone();
    bad_sig.signature[5] ^= 1;
    let forged = pb::Capability {
        body: genuine.body.clone(),
        signature: mallory.capability(now + DAY_MS).signature,
    };
    for cap in [bad_sig, forged] {
        assert_eq!(
            relay.ask(&sender, deposit(&alice.inbox, Some(cap), &env)).await,
            Err(MailboxError::Unauthorized)
        );
    }
    assert_eq!(relay.refusals("deposit", MailboxError::Unauthorized), 6);
    assert_eq!(relay.all_refusals(), 6);
    let stats = relay.stats();
    assert_eq!(
        (stats.inboxes, stats.envelopes),
        (1, 3),
        "only alice's inbox holds mail"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_capability_is_refused_even_if_it_was_cached_while_valid() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, time) = Relay::with_manual_clock(&dir.path().join("relay")).await;
    let t0 = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let cap = alice.capability(t0 + HOUR_MS);
    let sender = client(None, &relay.addr).await;

    // Used (and remembered) while valid, up to its last millisecond.
    relay
        .deposit_ok(
            &sender,
            deposit(&alice.inbox, Some(cap.clone()), &envelope("early", 300)),
        )
        .await;
    time.store(t0 + HOUR_MS, Ordering::Relaxed);
    let r = relay
        .deposit_ok(
            &sender,
            deposit(&alice.inbox, Some(cap.clone()), &envelope("last", 300)),
        )
        .await;
    assert_eq!(r.accepted_ms, t0 + HOUR_MS);

    // One millisecond later it is expired, alone or in a batch.
    time.store(t0 + HOUR_MS + 1, Ordering::Relaxed);
    let late = envelope("late", 300);
    assert_eq!(
        relay
            .ask(&sender, deposit(&alice.inbox, Some(cap.clone()), &late))
            .await,
        Err(MailboxError::Expired)
    );
    let renewed = alice.capability(t0 + DAY_MS);
    let results = relay
        .ask_batch(
            &sender,
            batch([
                deposit(&alice.inbox, Some(cap.clone()), &late),
                deposit(&alice.inbox, Some(renewed), &late),
            ]),
        )
        .await;
    assert_eq!(results[0], Err(MailboxError::Expired));
    let wire = results[1].clone().expect("a renewed capability works");
    let r = relay.check_receipt(mailbox_response::Result::Receipt(wire), &alice.inbox, false, &late);
    assert_eq!(r.index, 3);
    assert_eq!(relay.refusals("deposit", MailboxError::Expired), 2);
    assert_eq!(relay.all_refusals(), 2);
    assert_eq!(relay.stats().envelopes, 3);
    relay.shutdown().await;
}

/// A fetch that finds nothing and may wait is held by the relay: answered as
/// soon as something is deposited in that inbox, or with nothing once its
/// wait is over (the relay's timer for it fires after the wait, and its clock,
/// moved by hand here, is past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_may_wait_is_answered_when_mail_arrives_or_empty_when_the_wait_is_over() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, time) = Relay::with_manual_clock(&dir.path().join("relay")).await;
    let now = time.load(Ordering::Relaxed);
    let alice = Owner::new(dir.path(), "alice");
    let owner = client(Some(alice.seed), &relay.addr).await;
    let sender = client(None, &relay.addr).await;
    let waiting = |after: u64, ts: u64, wait_ms: u32| {
        let mut req = fetch(&alice.inbox, false, after, alice.auth(&relay, Op::Fetch, ts, after));
        if let Some(mailbox_request::Op::Fetch(f)) = req.op.as_mut() {
            f.wait_ms = wait_ms;
        }
        req
    };

    // Nothing there: the answer waits for the deposit.
    let (net, peer) = (owner.clone(), relay.peer);
    let req = waiting(0, now, 15_000);
    let held = tokio::spawn(async move { net.mailbox(peer, req).await });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert!(!held.is_finished(), "an empty fetch that may wait is held");
    let env = envelope("first", 200);
    relay
        .deposit_ok(
            &sender,
            deposit(&alice.inbox, Some(alice.capability(now + DAY_MS)), &env),
        )
        .await;
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), held)
        .await
        .expect("answered once mail arrived")
        .unwrap()
        .unwrap();
    let Ok(mailbox_response::Result::Fetched(f)) = outcome(answer) else {
        panic!("a fetch result")
    };
    assert_eq!(f.envelopes.len(), 1);
    assert_eq!((f.envelopes[0].index, f.envelopes[0].envelope.clone()), (1, env));

    // Something already past the cursor: answered at once, wait or not.
    let Ok(mailbox_response::Result::Fetched(f)) = relay.ask(&owner, waiting(0, now, 15_000)).await else {
        panic!("a fetch result")
    };
    assert_eq!(f.envelopes.len(), 1);

    // Nothing new past index 1: held until its wait is over, then empty.
    let (net, peer) = (owner.clone(), relay.peer);
    let req = waiting(1, now, 1_500);
    let held = tokio::spawn(async move { net.mailbox(peer, req).await });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert!(!held.is_finished());
    time.fetch_add(2_000, Ordering::Relaxed);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), held)
        .await
        .expect("answered when the wait was over")
        .unwrap()
        .unwrap();
    let Ok(mailbox_response::Result::Fetched(f)) = outcome(answer) else {
        panic!("a fetch result")
    };
    assert!(f.envelopes.is_empty());
    relay.shutdown().await;
}
