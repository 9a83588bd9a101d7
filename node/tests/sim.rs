//! Real nodes — libp2p, MLS, mailboxes, redb in memory — over the simulated
//! network, in virtual time: tokio's clock is paused and jumps from one event
//! to the next, libp2p's timers included.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use prost::Message as _;
use tidings_node::sim::{self, LinkModel, SimNetwork};
use tidings_node::{Clock, Node, NodeHandle, net};
use tidings_protocol::mailbox as mb;
use tidings_protocol::pb;
use tidings_store::MessageState;

const START_MS: u64 = 1_800_000_000_000;

/// 25 ms one way between any two hosts, except alice (10) and bob (11) once
/// they are cut apart, and bob or alice and anyone once they are cut off;
/// while `slow_to_bob`, 15 s from the relay on port 1 to bob; while
/// `port_12_silent`, an hour to and from port 12 (a link that died without
/// closing: nothing arrives, nothing fails).
#[derive(Default)]
struct Links {
    cut: AtomicBool,
    bob_off: AtomicBool,
    alice_off: AtomicBool,
    slow_to_bob: AtomicBool,
    port_12_silent: AtomicBool,
}

impl LinkModel for Links {
    fn delay(&self, from: u64, to: u64, _bytes: usize) -> Option<Duration> {
        let pair = (from.min(to), from.max(to));
        if pair == (10, 11) && self.cut.load(Ordering::Relaxed) {
            return None;
        }
        if (from == 11 || to == 11) && self.bob_off.load(Ordering::Relaxed) {
            return None;
        }
        if (from == 10 || to == 10) && self.alice_off.load(Ordering::Relaxed) {
            return None;
        }
        if (from, to) == (1, 11) && self.slow_to_bob.load(Ordering::Relaxed) {
            return Some(Duration::from_secs(15));
        }
        if (from == 12 || to == 12) && self.port_12_silent.load(Ordering::Relaxed) {
            return Some(Duration::from_secs(3600));
        }
        Some(Duration::from_millis(25))
    }
}

fn acct(h: &NodeHandle) -> String {
    h.account().to_base58()
}

/// Waits in virtual time (polling every 50 ms) until `f` holds; panics with
/// `what` after ten virtual minutes.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn relay(net: &SimNetwork, port: u64, bootstrap: Vec<Multiaddr>, clock: &Clock) -> (Node, Multiaddr) {
    let node = sim::start_relay(net, port, bootstrap, clock.clone()).await.unwrap();
    let addr = SimNetwork::address(port).with(Protocol::P2p(node.handle().peer_id()));
    (node, addr)
}

#[tokio::test(start_paused = true)]
async fn real_nodes_talk_directly_and_through_relay_mailboxes_in_virtual_time() {
    talk_directly_and_through_relays(sim::Security::Noise).await;
}

#[tokio::test(start_paused = true)]
async fn a_plaintext_world_carries_the_same_exchange_in_fewer_bytes() {
    let noise = talk_directly_and_through_relays(sim::Security::Noise)
        .await
        .bytes_sent(10);
    let plaintext = talk_directly_and_through_relays(sim::Security::Plaintext)
        .await
        .bytes_sent(10);
    eprintln!("alice sent {noise} bytes with Noise, {plaintext} in plaintext");
    assert!(
        plaintext < noise,
        "no handshakes, no tags: {plaintext} bytes against {noise}"
    );
}

#[tokio::test(start_paused = true)]
async fn each_hosts_bytes_are_counted_by_protocol_and_fit_within_what_its_links_carried() {
    let net = talk_directly_and_through_relays(sim::Security::Noise).await;
    let class = |port, c: sim::StreamClass| {
        let i = sim::StreamClass::ALL.iter().position(|x| *x == c).unwrap();
        net.stream_bytes(port)[i]
    };
    for port in [1, 2, 10, 11] {
        let by_class: Vec<String> = sim::StreamClass::ALL
            .iter()
            .map(|c| format!("{} {}", c.name(), class(port, *c)))
            .collect();
        let wire = net.bytes_sent(port) + net.bytes_received(port);
        let streams: u64 = net.stream_bytes(port).iter().sum();
        eprintln!("host {port}: {wire} on its links, {streams} on substreams: {by_class:?}");
        assert!(
            streams < wire,
            "host {port}: substreams carried {streams} bytes of the {wire} on its links; the rest is handshakes and framing"
        );
        assert!(class(port, sim::StreamClass::Kad) > 0, "host {port} used the DHT");
        assert!(
            class(port, sim::StreamClass::Identify) > 0,
            "host {port} exchanged identify"
        );
    }
    // One message went directly from alice to bob; twenty went to bob's relays (mailbox
    // deposits), which pushed them to bob (the deliver protocol, as a sender does).
    let deliver = |port| class(port, sim::StreamClass::Deliver);
    for port in [1, 2, 10, 11] {
        assert!(deliver(port) > 0, "host {port}: a message or a push");
        assert!(
            class(port, sim::StreamClass::Mailbox) > 0,
            "host {port}: the relays' mail"
        );
    }
    assert!(
        deliver(11) > deliver(10) + deliver(1).min(deliver(2)),
        "bob took one message from alice and twenty in the relays' pushes"
    );
    // Neither person is behind a NAT, but both reserve circuits on their home relays.
    for port in [1, 2, 10, 11] {
        assert!(
            class(port, sim::StreamClass::Circuit) > 0,
            "host {port}: circuit reservations"
        );
    }
}

/// Alice and bob, each with two home relays: one message direct, then twenty
/// while they are cut apart, through bob's relays. Returns the world, for its byte counts.
async fn talk_directly_and_through_relays(security: sim::Security) -> SimNetwork {
    let wall = std::time::Instant::now();
    let start = tokio::time::Instant::now();
    let links = Arc::new(Links::default());
    let net = SimNetwork::with_security(links.clone(), security);
    let clock = Clock::tokio(START_MS);
    let (r1, r1_addr) = relay(&net, 1, Vec::new(), &clock).await;
    let (r2, r2_addr) = relay(&net, 2, vec![r1_addr.clone()], &clock).await;
    let homes = vec![r1_addr.clone(), r2_addr];
    let person = |port, name| sim::start_node(&net, port, name, vec![r1_addr.clone()], homes.clone(), clock.clone());
    let (alice, bob) = (person(10, "alice").await.unwrap(), person(11, "bob").await.unwrap());
    let (a, b) = (alice.handle(), bob.handle());
    a.add_contact(&b.card().to_uri(), None).await.unwrap();
    b.add_contact(&a.card().to_uri(), None).await.unwrap();

    let hello = a.send_text(&acct(&b), "hello").await.unwrap();
    until("bob reads hello", || b.history(&acct(&a)).unwrap().len() == 1).await;
    until("alice sees it delivered", || {
        a.history(&acct(&b))
            .unwrap()
            .iter()
            .any(|m| m.id == hello.id && m.state == MessageState::Delivered)
    })
    .await;

    // Cut alice off from bob (both still reach the relays): her mail goes to
    // bob's relays, which hand it to him.
    links.cut.store(true, Ordering::Relaxed);
    for i in 0..20 {
        a.send_text(&acct(&b), &format!("through the relays {i}"))
            .await
            .unwrap();
    }
    until("bob reads all 21", || b.history(&acct(&a)).unwrap().len() == 21).await;
    let texts: Vec<String> = b.history(&acct(&a)).unwrap().into_iter().map(|m| m.text).collect();
    let expected: Vec<String> = std::iter::once("hello".to_string())
        .chain((0..20).map(|i| format!("through the relays {i}")))
        .collect();
    assert_eq!(texts, expected, "exactly once, in order");
    until("every message left alice's outbox", || {
        a.store().outbox_len().unwrap() == 0
    })
    .await;
    let sent = a.history(&acct(&b)).unwrap();
    assert!(
        sent[1..].iter().all(|m| m.state == MessageState::Stored),
        "the relays signed for them (custody receipts), bob could not ack directly"
    );

    let virtual_time = start.elapsed();
    eprintln!(
        "4 real nodes: {:.1} s of virtual time in {:.2} s of wall time",
        virtual_time.as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );
    drop((a, b));
    for n in [alice, bob, r1, r2] {
        n.shutdown().await;
    }
    net
}

/// A relay keeps its subscriptions in memory, so a restart ends them. The
/// device re-subscribes as soon as its connection to the relay is back
/// (circuit reservations are retried every 15 s), not at its next mailbox
/// re-check a minute later: mail deposited meanwhile is pushed within seconds.
#[tokio::test(start_paused = true)]
async fn after_its_home_relay_restarts_a_device_gets_new_mail_pushed_long_before_the_next_recheck() {
    // Alice and bob never reach each other directly: only circuits and the mailbox.
    let links = Arc::new(Links {
        cut: AtomicBool::new(true),
        ..Links::default()
    });
    let net = SimNetwork::new(links);
    let clock = Clock::tokio(START_MS);
    let disk = sim::HostDisk::relay(clock.now_ms(), None).unwrap();
    let tuning = sim::HostTuning::default();
    assert_eq!(tuning.mailbox_poll, tidings_node::node::MAILBOX_RECHECK);
    let relay = sim::start_relay_on(&net, 1, &disk, Vec::new(), clock.clone(), &tuning)
        .await
        .unwrap();
    let r_addr = SimNetwork::address(1).with(Protocol::P2p(relay.handle().peer_id()));
    let person = |port, name| {
        sim::start_node(
            &net,
            port,
            name,
            vec![r_addr.clone()],
            vec![r_addr.clone()],
            clock.clone(),
        )
    };
    let (alice, bob) = (person(10, "alice").await.unwrap(), person(11, "bob").await.unwrap());
    let (a, b) = (alice.handle(), bob.handle());
    a.add_contact(&b.card().to_uri(), None).await.unwrap();
    b.add_contact(&a.card().to_uri(), None).await.unwrap();
    a.send_text(&acct(&b), "hello").await.unwrap();
    until("bob reads hello", || b.history(&acct(&a)).unwrap().len() == 1).await;

    relay.shutdown().await;
    let relay = sim::start_relay_on(&net, 1, &disk, Vec::new(), clock.clone(), &tuning)
        .await
        .unwrap();
    let restarted = tokio::time::Instant::now();
    a.send_text(&acct(&b), "after the restart").await.unwrap();
    until("bob reads the second message", || {
        b.history(&acct(&a)).unwrap().len() == 2
    })
    .await;
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "mail after a relay restart took {took:?}; the periodic re-check alone would take up to {:?}",
        tidings_node::node::MAILBOX_RECHECK
    );
    drop((a, b));
    for n in [alice, bob, relay] {
        n.shutdown().await;
    }
}

/// A first contact left in a device's request inbox (its sender could not
/// reach the device) is pushed by the home relay while the device is online,
/// like mail in the normal inbox: it does not wait for the next re-check.
#[tokio::test(start_paused = true)]
async fn a_first_contact_left_in_the_request_inbox_is_pushed_to_the_online_device() {
    let links = Arc::new(Links::default());
    let (net, clock, r1, bob) = bob_rechecking_hourly(&links).await;
    let inbox = stranger_leaves_a_first_contact(&net, &clock, &r1, &bob).await;
    let took = request_inbox_drained(&r1, &inbox, &clock, tokio::time::Instant::now()).await;
    assert!(
        took < Duration::from_secs(10),
        "the request inbox was drained {took:?} after the deposit; bob re-checks only hourly"
    );
    for n in [bob, r1] {
        n.shutdown().await;
    }
}

/// A push that times out while the connection stays open (the device was
/// slow to answer) is tried again: the device does not learn that a push
/// failed, so a relay that ended the subscription instead would leave the
/// mail until the device's next re-check.
#[tokio::test(start_paused = true)]
async fn a_push_that_timed_out_over_an_open_connection_is_tried_again() {
    let links = Arc::new(Links::default());
    let (net, clock, r1, bob) = bob_rechecking_hourly(&links).await;
    links.slow_to_bob.store(true, Ordering::Relaxed);
    let inbox = stranger_leaves_a_first_contact(&net, &clock, &r1, &bob).await;
    let deposited = tokio::time::Instant::now();
    // The push is on its way, 15 s to bob: longer than the relay waits for an answer (10 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    links.slow_to_bob.store(false, Ordering::Relaxed);
    let took = request_inbox_drained(&r1, &inbox, &clock, deposited).await;
    assert!(
        took < Duration::from_secs(30),
        "the request inbox was drained {took:?} after the deposit; bob re-checks only hourly"
    );
    assert!(
        !bob.handle().connections(r1.handle().peer_id()).await.is_empty(),
        "bob is still connected to his relay"
    );
    for n in [bob, r1] {
        n.shutdown().await;
    }
}

/// How long after `since` the request inbox `inbox` on `relay` was empty.
async fn request_inbox_drained(relay: &Node, inbox: &[u8; 32], clock: &Clock, since: tokio::time::Instant) -> Duration {
    let mailboxes = relay.relay_mailboxes().unwrap();
    let held = || mailboxes.fetch(inbox, true, 0, 10, clock.now_ms()).unwrap().0.len();
    until("the owner took it from the request inbox", || held() == 0).await;
    since.elapsed()
}

/// A fetch that may wait (a group member's long poll) is held by the relay
/// for the whole wait, past the request timeout, and answered as soon as
/// something is deposited.
#[tokio::test(start_paused = true)]
async fn a_held_fetch_outlasts_the_request_timeout_and_is_answered_by_the_next_deposit() {
    let net = SimNetwork::new(Arc::new(Links::default()));
    let clock = Clock::tokio(START_MS);
    let (r1, _) = relay(&net, 1, Vec::new(), &clock).await;
    let relay_peer = r1.handle().peer_id();
    let (owner, _owner_events) = bare_node(&net, &clock, 12, relay_peer).await;
    let (sender, _sender_events) = bare_node(&net, &clock, 13, relay_peer).await;
    let seed = [5u8; 32];
    let inbox = mb::inbox_id(&tidings_protocol::identity::DeviceKey::from_seed(seed).public());
    let wait = Duration::from_millis(tidings_node::relay::MAX_FETCH_WAIT_MS);
    assert!(wait > tidings_node::NetConfig::default().request_timeout);
    let fetch = || held_fetch(&seed, relay_peer, clock.now_ms(), wait);
    let fetched = |answer: pb::MailboxResponse| match answer.result {
        Some(pb::mailbox_response::Result::Fetched(f)) => f.envelopes.len(),
        other => panic!("not a fetch result: {other:?} ({})", answer.detail),
    };

    // Nothing arrives: the answer comes, empty, once the wait is over.
    let started = tokio::time::Instant::now();
    let answer = owner.mailbox_held(relay_peer, fetch(), wait).await.unwrap();
    assert_eq!(fetched(answer), 0);
    assert!(started.elapsed() >= wait, "answered after {:?}", started.elapsed());

    // Something arrives 15 s into the wait: that is the answer, at once.
    let capability = mb::issue_capability(&seed, clock.now_ms() + 3_600_000, None);
    let envelope = pb::Envelope {
        id: vec![3; 16],
        conversation_id: vec![4; 32],
        kind: pb::EnvelopeKind::Message as i32,
        mls_message: vec![1; 100],
        ..Default::default()
    }
    .encode_to_vec();
    let deposit = pb::MailboxRequest {
        op: Some(pb::mailbox_request::Op::Deposit(pb::Deposit {
            inbox_id: inbox.to_vec(),
            request_inbox: false,
            capability: Some(capability),
            pow_nonce: Vec::new(),
            envelope,
        })),
    };
    let started = tokio::time::Instant::now();
    let deposit_later = async {
        tokio::time::sleep(Duration::from_secs(15)).await;
        sender.mailbox(relay_peer, deposit).await.unwrap()
    };
    let (answer, receipt) = tokio::join!(owner.mailbox_held(relay_peer, fetch(), wait), deposit_later);
    assert_eq!(receipt.status, pb::MailboxStatus::Ok as i32, "{}", receipt.detail);
    assert_eq!(fetched(answer.unwrap()), 1);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(15) && took < Duration::from_secs(16),
        "answered after {took:?}"
    );
    r1.shutdown().await;
}

/// A held fetch on a link that went silent (nothing arrives either way, and
/// nothing fails) ends once the connection's pings go unanswered, well
/// before its wait is over: the member polls again instead of waiting out
/// the wait on a dead link.
#[tokio::test(start_paused = true)]
async fn a_held_fetch_on_a_link_gone_silent_fails_once_its_pings_go_unanswered() {
    let links = Arc::new(Links::default());
    let net = SimNetwork::new(links.clone());
    let clock = Clock::tokio(START_MS);
    let (r1, _) = relay(&net, 1, Vec::new(), &clock).await;
    let relay_peer = r1.handle().peer_id();
    let (owner, _owner_events) = bare_node(&net, &clock, 12, relay_peer).await;
    let seed = [6u8; 32];
    let wait = Duration::from_millis(tidings_node::relay::MAX_FETCH_WAIT_MS);
    let fetch = held_fetch(&seed, relay_peer, clock.now_ms(), wait);
    let started = tokio::time::Instant::now();
    let silence = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        links.port_12_silent.store(true, Ordering::Relaxed);
    };
    let (answer, ()) = tokio::join!(owner.mailbox_held(relay_peer, fetch, wait), silence);
    let took = started.elapsed();
    assert!(
        answer.is_err(),
        "a held fetch over a silent link was answered: {answer:?}"
    );
    let ping = tidings_node::NetConfig::default().tuning.ping_interval;
    assert!(
        took < ping * 2 + Duration::from_secs(10),
        "the held fetch ended {took:?} after it began; its wait was {wait:?}"
    );
    r1.shutdown().await;
}

/// A fetch from the start of the inbox owned by the key of `seed` on `relay`, signed at `now_ms`,
/// that may wait up to `wait` for a deposit (a group member's long poll).
fn held_fetch(seed: &[u8; 32], relay: libp2p::PeerId, now_ms: u64, wait: Duration) -> pb::MailboxRequest {
    let inbox = mb::inbox_id(&tidings_protocol::identity::DeviceKey::from_seed(*seed).public());
    let auth = mb::sign_auth(
        seed,
        mb::Op::Fetch,
        &relay.to_bytes(),
        &inbox,
        now_ms,
        rand::random(),
        0,
    );
    pb::MailboxRequest {
        op: Some(pb::mailbox_request::Op::Fetch(pb::Fetch {
            inbox_id: inbox.to_vec(),
            request_inbox: false,
            after_index: 0,
            limit: 10,
            auth: Some(auth),
            wait_ms: u32::try_from(wait.as_millis()).unwrap(),
        })),
    }
}

/// A relay on port 1 and bob on port 11, at home on it, re-checking his
/// mailboxes only hourly (pushes bring his mail); returns once he is
/// subscribed and his key packages are on the relay.
async fn bob_rechecking_hourly(links: &Arc<Links>) -> (SimNetwork, Clock, Node, Node) {
    let net = SimNetwork::new(links.clone());
    let clock = Clock::tokio(START_MS);
    let (r1, r1_addr) = relay(&net, 1, Vec::new(), &clock).await;
    let homes = vec![r1_addr];
    let mut host = public_person(11, homes.clone(), homes);
    host.tuning.mailbox_poll = Duration::from_secs(3600);
    let disk = sim::HostDisk::person("bob", clock.now_ms(), None).unwrap();
    let bob = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let bob_device = bob.handle().devices().unwrap()[0].device_key;
    let mailboxes = r1.relay_mailboxes().unwrap();
    // Bob's first round subscribes, then publishes key packages. A round
    // that connecting to the relay asked for may follow: let it end, so that
    // only pushes can bring him mail from now on.
    until("bob's key packages are on his relay", || {
        mailboxes.key_packages_held(&bob_device).unwrap() > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    (net, clock, r1, bob)
}

/// A bare libp2p node (no core, no store) on `port`, which knows the relay on port 1 as `relay`;
/// keep its events for as long as it is used.
async fn bare_node(
    net: &SimNetwork,
    clock: &Clock,
    port: u64,
    relay: libp2p::PeerId,
) -> (
    tidings_node::net::Network,
    tokio::sync::mpsc::Receiver<tidings_node::net::NetEvent>,
) {
    let config = tidings_node::NetConfig {
        listen: vec![SimNetwork::address(port)],
        sim: Some(tidings_node::net::SimHost { net: net.clone(), port }),
        dht_server: false,
        ..tidings_node::NetConfig::default()
    };
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let (network, events, _, _task) = tidings_node::net::spawn(keypair, config, clock.clone(), None)
        .await
        .unwrap();
    network.add_address(relay, SimNetwork::address(1)).await;
    (network, events)
}

/// A stranger, a bare libp2p node on port 12, leaves an envelope in the
/// request inbox of `device`'s owner on `relay`; returns that inbox.
async fn stranger_leaves_a_first_contact(net: &SimNetwork, clock: &Clock, relay: &Node, device: &Node) -> [u8; 32] {
    let relay_peer = relay.handle().peer_id();
    let (stranger, _events) = bare_node(net, clock, 12, relay_peer).await;
    let inbox = mb::inbox_id(&device.handle().devices().unwrap()[0].device_key);
    let envelope = pb::Envelope {
        id: vec![7; 16],
        conversation_id: vec![9; 32],
        kind: pb::EnvelopeKind::Welcome as i32,
        mls_message: vec![1; 300],
        ..Default::default()
    }
    .encode_to_vec();
    let pow_nonce = mb::solve_pow(&inbox, &envelope, mb::DEFAULT_POW_BITS);
    let deposit = pb::MailboxRequest {
        op: Some(pb::mailbox_request::Op::Deposit(pb::Deposit {
            inbox_id: inbox.to_vec(),
            request_inbox: true,
            capability: None,
            pow_nonce,
            envelope,
        })),
    };
    let answer = stranger.mailbox(relay_peer, deposit).await.unwrap();
    assert_eq!(answer.status, pb::MailboxStatus::Ok as i32, "{}", answer.detail);
    inbox
}

/// A first message to a device that is running but cannot be reached (a
/// laptop whose network went away) claims a key package from the device's
/// relay after a few seconds instead of waiting out every dial and lookup.
#[tokio::test(start_paused = true)]
async fn a_first_message_to_an_unreachable_device_starts_from_its_relay_within_seconds() {
    let links = Arc::new(Links::default());
    let net = SimNetwork::new(links.clone());
    let clock = Clock::tokio(START_MS);
    let (r1, r1_addr) = relay(&net, 1, Vec::new(), &clock).await;
    let homes = vec![r1_addr.clone()];
    let person = |port, name| sim::start_node(&net, port, name, homes.clone(), homes.clone(), clock.clone());
    let (alice, bob) = (person(10, "alice").await.unwrap(), person(11, "bob").await.unwrap());
    let (a, b) = (alice.handle(), bob.handle());
    let bob_device = b.devices().unwrap()[0].device_key;
    let mailboxes = r1.relay_mailboxes().unwrap();
    until("bob's key packages are on his relay", || {
        mailboxes.key_packages_held(&bob_device).unwrap() > 0
    })
    .await;
    a.add_contact(&b.card().to_uri(), None).await.unwrap();
    links.bob_off.store(true, Ordering::Relaxed);

    let started = tokio::time::Instant::now();
    let sent = a.send_text(&acct(&b), "hello").await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the first message took {took:?} to set up"
    );
    assert_ne!(
        sent.state,
        MessageState::Waiting,
        "handed back once sealed into the new conversation"
    );
    until("the relay signed for it", || {
        a.history(&acct(&b))
            .unwrap()
            .iter()
            .any(|m| m.id == sent.id && m.state == MessageState::Stored)
    })
    .await;
    drop((a, b));
    for n in [alice, bob, r1] {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_first_message_to_a_device_that_starts_seconds_later_is_sent_once_it_answers() {
    let net = SimNetwork::new(Arc::new(Links::default()));
    let clock = Clock::tokio(START_MS);
    let (r1, boot, alice) = relay_and_alice(&net, &clock).await;
    // Bob has no home relays, so only his device hands out key packages, and it is not running
    // when alice writes to him: it starts 5 s later.
    let disk = sim::HostDisk::person("bob", clock.now_ms(), None).unwrap();
    let host = public_person(11, boot.clone(), Vec::new());
    let bob = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let (card, bob_account) = (bob.handle().card().to_uri(), acct(&bob.handle()));
    let a = alice.handle();
    bob.handle().add_contact(&a.card().to_uri(), None).await.unwrap();
    bob.shutdown().await;
    a.add_contact(&card, None).await.unwrap();
    let (net2, clock2) = (net.clone(), clock.clone());
    let bob_later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        sim::start_person_on(&net2, &host, &disk, clock2).await.unwrap()
    });
    let started = tokio::time::Instant::now();
    let sent = a.send_text(&bob_account, "hello").await.unwrap();
    let bob = bob_later.await.unwrap();
    let b = bob.handle();
    until("bob shows it", || shows(&b, &a, &sent.id)).await;
    // The set-up asked again while bob's device started, rather than failing
    // and leaving the message to a retry 10 s later.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "shown {took:?} after alice wrote");
    drop((a, b));
    for n in [alice, bob, r1] {
        n.shutdown().await;
    }
}

/// Whether `h` shows the message `id` from `from`.
fn shows(h: &NodeHandle, from: &NodeHandle, id: &str) -> bool {
    h.history(&acct(from))
        .unwrap()
        .iter()
        .any(|m| m.id == id && !m.outgoing)
}

/// A relay on port 1 (with its address as the bootstrap list) and alice on port 10, at home on it.
async fn relay_and_alice(net: &SimNetwork, clock: &Clock) -> (Node, Vec<Multiaddr>, Node) {
    let (r1, r1_addr) = relay(net, 1, Vec::new(), clock).await;
    let boot = vec![r1_addr];
    let alice = sim::start_node(net, 10, "alice", boot.clone(), boot.clone(), clock.clone())
        .await
        .unwrap();
    (r1, boot, alice)
}

/// A device anyone can dial, in the DHT, on `port`.
fn public_person(port: u64, bootstrap: Vec<Multiaddr>, home_relays: Vec<Multiaddr>) -> sim::PersonHost {
    sim::PersonHost {
        port,
        bootstrap,
        home_relays,
        reachable: true,
        dht_server: true,
        tuning: sim::HostTuning::default(),
    }
}

/// Alice's and bob's devices on `alice_host` and `bob_host`, each with a new
/// disk: (disk, node) for each.
async fn start_alice_and_bob(
    net: &SimNetwork,
    clock: &Clock,
    alice_host: &sim::PersonHost,
    bob_host: &sim::PersonHost,
) -> ((sim::HostDisk, Node), (sim::HostDisk, Node)) {
    let mut started = Vec::new();
    for (name, host) in [("alice", alice_host), ("bob", bob_host)] {
        let disk = sim::HostDisk::person(name, clock.now_ms(), None).unwrap();
        let node = sim::start_person_on(net, host, &disk, clock.clone()).await.unwrap();
        started.push((disk, node));
    }
    let bob = started.pop().unwrap();
    let alice = started.pop().unwrap();
    (alice, bob)
}

/// Alice, with one home relay, and bob, with none: only his own device
/// could set up a conversation, and it is off (his disk is kept).
struct BobAway {
    links: Arc<Links>,
    net: SimNetwork,
    clock: Clock,
    relay: Node,
    alice_host: sim::PersonHost,
    alice_disk: sim::HostDisk,
    alice: Node,
    bob_host: sim::PersonHost,
    bob_disk: sim::HostDisk,
    bob_account: String,
}

impl BobAway {
    async fn new() -> Self {
        let links = Arc::new(Links::default());
        let net = SimNetwork::new(links.clone());
        let clock = Clock::tokio(START_MS);
        let (relay, r1_addr) = self::relay(&net, 1, Vec::new(), &clock).await;
        let boot = vec![r1_addr];
        let person = |port: u64, home_relays: Vec<Multiaddr>| sim::PersonHost {
            port,
            bootstrap: boot.clone(),
            home_relays,
            reachable: true,
            dht_server: true,
            tuning: sim::HostTuning::default(),
        };
        let (alice_host, bob_host) = (person(10, boot.clone()), person(11, Vec::new()));
        let ((alice_disk, alice), (bob_disk, bob)) = start_alice_and_bob(&net, &clock, &alice_host, &bob_host).await;
        let (card, bob_account) = (bob.handle().card().to_uri(), acct(&bob.handle()));
        bob.handle()
            .add_contact(&alice.handle().card().to_uri(), None)
            .await
            .unwrap();
        bob.shutdown().await;
        alice.handle().add_contact(&card, None).await.unwrap();
        Self {
            links,
            net,
            clock,
            relay,
            alice_host,
            alice_disk,
            alice,
            bob_host,
            bob_disk,
            bob_account,
        }
    }

    async fn start_bob(&self) -> Node {
        sim::start_person_on(&self.net, &self.bob_host, &self.bob_disk, self.clock.clone())
            .await
            .unwrap()
    }

    /// Alice writes `texts` to bob, who cannot be reached: each is kept as waiting.
    async fn write_to_bob(&self, texts: &[&str]) -> Vec<String> {
        let a = self.alice.handle();
        let mut ids = Vec::new();
        for text in texts {
            let m = a.send_text(&self.bob_account, text).await.unwrap();
            assert_eq!(m.state, MessageState::Waiting, "kept, not refused");
            ids.push(m.id);
        }
        assert_eq!(a.store().outbox_len().unwrap(), 0, "nothing encrypted yet");
        ids
    }
}

/// Whether `h` holds a connection to `peer` within 30 virtual seconds.
async fn connected_within_30s(h: &NodeHandle, peer: libp2p::PeerId) -> bool {
    for _ in 0..300 {
        if !h.connections(peer).await.is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Alice and bob add each other and write one message each way; returns once
/// each has read the other's.
async fn exchange_hellos(a: &NodeHandle, b: &NodeHandle) {
    a.add_contact(&b.card().to_uri(), None).await.unwrap();
    b.add_contact(&a.card().to_uri(), None).await.unwrap();
    a.send_text(&acct(b), "hello bob").await.unwrap();
    until("bob reads alice", || b.history(&acct(a)).unwrap().len() == 1).await;
    b.send_text(&acct(a), "hello alice").await.unwrap();
    until("alice reads bob", || {
        a.history(&acct(b)).unwrap().iter().any(|m| !m.outgoing)
    })
    .await;
}

/// What `b` shows from `from`: (id, text), in order.
fn shown_from(b: &NodeHandle, from: &str) -> Vec<(String, String)> {
    b.history(from)
        .unwrap()
        .into_iter()
        .filter(|m| !m.outgoing)
        .map(|m| (m.id, m.text))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn first_messages_to_someone_unreachable_wait_through_a_restart_and_arrive_in_order_once_they_are_up() {
    let mut w = BobAway::new().await;
    let back_at = tokio::time::Instant::now() + Duration::from_secs(180);
    let started = tokio::time::Instant::now();
    let ids = w.write_to_bob(&["first", "second"]).await;
    let first_took = started.elapsed();
    assert!(
        first_took >= Duration::from_secs(10) && first_took < Duration::from_secs(15),
        "the first send waited 10 s for the set-up, then handed its message back as waiting; \
         the second waited behind it at once ({first_took:?})"
    );

    // Alice's device restarts while they wait.
    w.alice.shutdown().await;
    w.alice = sim::start_person_on(&w.net, &w.alice_host, &w.alice_disk, w.clock.clone())
        .await
        .unwrap();
    let a = w.alice.handle();
    let states: Vec<MessageState> = a.history(&w.bob_account).unwrap().iter().map(|m| m.state).collect();
    assert_eq!(states, [MessageState::Waiting, MessageState::Waiting]);

    tokio::time::sleep_until(back_at).await;
    let bob = w.start_bob().await;
    let b = bob.handle();
    let alice_account = acct(&a);
    until("bob shows both", || shown_from(&b, &alice_account).len() == 2).await;
    assert_eq!(
        shown_from(&b, &alice_account),
        [
            (ids[0].clone(), "first".to_owned()),
            (ids[1].clone(), "second".to_owned())
        ],
        "each once, in the order written, with the ids alice showed"
    );
    let took = tokio::time::Instant::now() - back_at;
    assert!(took < Duration::from_secs(180), "arrived {took:?} after bob was back");
    until("alice sees both delivered", || {
        a.history(&w.bob_account)
            .unwrap()
            .iter()
            .all(|m| m.state >= MessageState::Delivered)
    })
    .await;
    drop((a, b));
    for n in [w.alice, bob, w.relay] {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_messages_go_out_within_seconds_of_the_senders_network_coming_back() {
    let w = BobAway::new().await;
    let ids = w.write_to_bob(&["hello?"]).await;
    // Alice's network goes; bob comes up meanwhile. Her tries fail, and the
    // pause before the next one grows towards two minutes: without the nudge
    // at her home relay's reconnection, her next try after this cut comes
    // 118 s after the network is back.
    w.links.alice_off.store(true, Ordering::Relaxed);
    let bob = w.start_bob().await;
    tokio::time::sleep(Duration::from_secs(330)).await;
    w.links.alice_off.store(false, Ordering::Relaxed);
    let back = tokio::time::Instant::now();
    let (a, b) = (w.alice.handle(), bob.handle());
    let alice_account = acct(&a);
    until("bob shows alice's message", || {
        shown_from(&b, &alice_account).len() == 1
    })
    .await;
    let took = back.elapsed();
    assert_eq!(shown_from(&b, &alice_account)[0].0, ids[0]);
    assert!(
        took < Duration::from_secs(30),
        "it went out {took:?} after alice's network came back (her home relay reconnected)"
    );
    drop((a, b));
    for n in [w.alice, bob, w.relay] {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_messages_go_out_as_soon_as_the_contact_starts_the_conversation() {
    let w = BobAway::new().await;
    let ids = w.write_to_bob(&["are you there?"]).await;
    // Bob is back after alice's set-up failed a few times, so her next try
    // is tens of seconds off (24 s in a run without the wake-up).
    tokio::time::sleep(Duration::from_secs(200)).await;
    let bob = w.start_bob().await;
    let (a, b) = (w.alice.handle(), bob.handle());
    let alice_account = acct(&a);
    b.send_text(&alice_account, "back now").await.unwrap();
    let wrote = tokio::time::Instant::now();
    until("bob shows alice's message", || {
        shown_from(&b, &alice_account).len() == 1
    })
    .await;
    let took = wrote.elapsed();
    assert_eq!(shown_from(&b, &alice_account)[0].0, ids[0]);
    assert!(
        took < Duration::from_secs(5),
        "it went out in bob's conversation {took:?} after he wrote"
    );
    drop((a, b));
    for n in [w.alice, bob, w.relay] {
        n.shutdown().await;
    }
}

/// Not a test: a probe of how far real nodes in virtual time go on this
/// machine, until the simulator's Tier A runner exists. `R` relays and `C`
/// people in a ring of contacts, three rounds of one message each 20 virtual
/// seconds apart; prints virtual and wall time and the process's memory.
/// `R=10 C=90 cargo test --release -p tidings-node --test sim -- --ignored --nocapture`
#[tokio::test(start_paused = true)]
#[ignore = "a measurement, run by hand"]
async fn probe_many_real_nodes_in_virtual_time() {
    let var = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (relays_n, people_n) = (var("R", 10), var("C", 90));
    let wall = std::time::Instant::now();
    let net = SimNetwork::new(Arc::new(sim::FixedDelay(Duration::from_millis(30))));
    let clock = Clock::tokio(START_MS);
    let mut relays = Vec::new();
    let mut addrs: Vec<Multiaddr> = Vec::new();
    for i in 0..relays_n {
        let (r, addr) = relay(&net, 1 + i, addrs.first().cloned().into_iter().collect(), &clock).await;
        relays.push(r);
        addrs.push(addr);
    }
    let mut people = Vec::new();
    for i in 0..people_n {
        let homes = vec![
            addrs[(i % relays_n) as usize].clone(),
            addrs[((i + 1) % relays_n) as usize].clone(),
        ];
        let name = format!("p{i}");
        people.push(
            sim::start_node(&net, 1000 + i, &name, vec![addrs[0].clone()], homes, clock.clone())
                .await
                .unwrap(),
        );
    }
    let hs: Vec<NodeHandle> = people.iter().map(|p| p.handle()).collect();
    let next = |i: usize| (i + 1) % hs.len();
    for i in 0..hs.len() {
        hs[i].add_contact(&hs[next(i)].card().to_uri(), None).await.unwrap();
        hs[next(i)].add_contact(&hs[i].card().to_uri(), None).await.unwrap();
    }
    let started = tokio::time::Instant::now();
    for round in 0..3 {
        for i in 0..hs.len() {
            hs[i]
                .send_text(&acct(&hs[next(i)]), &format!("round {round}"))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    let received: usize = (0..hs.len())
        .map(|i| {
            let from = &hs[(i + hs.len() - 1) % hs.len()];
            hs[i]
                .history(&acct(from))
                .unwrap()
                .iter()
                .filter(|m| !m.outgoing)
                .count()
        })
        .sum();
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS")).map(str::to_owned))
        .unwrap_or_default();
    eprintln!(
        "{relays_n} relays + {people_n} people: {received} of {} messages; {:.1} s virtual after start-up, {:.1} s wall in all; {rss}",
        3 * hs.len(),
        started.elapsed().as_secs_f64(),
        wall.elapsed().as_secs_f64(),
    );
}

/// Starts a record publisher on `node` with a one-hour period that counts
/// its successful publications in `count`.
fn count_publications(node: &Node, count: &Arc<std::sync::atomic::AtomicUsize>) -> tokio::task::JoinHandle<()> {
    let count = count.clone();
    node.handle()
        .spawn_observed_record_publisher(Duration::from_secs(3600), move |ok, _| {
            if ok {
                count.fetch_add(1, Ordering::Relaxed);
            }
        })
}

#[tokio::test(start_paused = true)]
async fn a_device_restarting_within_the_hour_does_not_republish_its_unchanged_record() {
    let links = Arc::new(Links::default());
    let net = SimNetwork::new(links);
    let clock = Clock::tokio(START_MS);
    let (relay, r1_addr) = self::relay(&net, 1, Vec::new(), &clock).await;
    let (relay2, _) = self::relay(&net, 2, vec![r1_addr.clone()], &clock).await;
    let host = sim::PersonHost {
        port: 10,
        bootstrap: vec![r1_addr.clone()],
        home_relays: vec![r1_addr],
        reachable: true,
        dht_server: true,
        tuning: sim::HostTuning::default(),
    };
    let disk = sim::HostDisk::person("alice", clock.now_ms(), None).unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let publisher = count_publications(&alice, &count);
    until("the first publication", || count.load(Ordering::Relaxed) == 1).await;
    let first = tokio::time::Instant::now();

    publisher.abort();
    alice.shutdown().await;
    tokio::time::sleep(Duration::from_secs(300)).await;
    let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let publisher = count_publications(&alice, &count);
    let due = alice.handle().record_due_in(Duration::from_secs(3600)).unwrap();
    assert!(
        due > Duration::from_secs(3290) && due <= Duration::from_secs(3300),
        "due an hour after the first publication, not at the restart ({due:?})"
    );
    tokio::time::sleep(Duration::from_secs(1200)).await;
    assert_eq!(
        count.load(Ordering::Relaxed),
        1,
        "no publication 20 minutes after the restart"
    );
    tokio::time::sleep_until(first + Duration::from_secs(3590)).await;
    assert_eq!(count.load(Ordering::Relaxed), 1, "none before the hour is up");
    until("the hourly publication", || count.load(Ordering::Relaxed) == 2).await;
    let second = first.elapsed();
    assert!(
        second >= Duration::from_secs(3590) && second < Duration::from_secs(3660),
        "republished an hour after the first publication ({second:?})"
    );

    // A record that said something else is due at once.
    let (at, _) = alice.handle().store().last_record_publication().unwrap().unwrap();
    alice.handle().store().set_last_record_publication(at, [0; 32]).unwrap();
    assert_eq!(
        alice.handle().record_due_in(Duration::from_secs(3600)).unwrap(),
        Duration::ZERO
    );
    publisher.abort();
    for n in [alice, relay, relay2] {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_finds_the_dht_through_saved_peers_when_its_bootstrap_peer_is_gone() {
    let net = SimNetwork::new(Arc::new(Links::default()));
    let clock = Clock::tokio(START_MS);
    let (r1, r1_addr) = self::relay(&net, 1, Vec::new(), &clock).await;
    let (r2, _) = self::relay(&net, 2, vec![r1_addr.clone()], &clock).await;
    let host = sim::PersonHost {
        port: 10,
        bootstrap: vec![r1_addr],
        home_relays: Vec::new(),
        reachable: true,
        dht_server: true,
        tuning: sim::HostTuning::default(),
    };
    let disk = sim::HostDisk::person("alice", clock.now_ms(), None).unwrap();
    let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    // Long enough for the first save of the routing table (after a minute).
    tokio::time::sleep(Duration::from_secs(90)).await;
    assert!(
        !alice.handle().store().known_peers().unwrap().is_empty(),
        "the routing table was saved"
    );
    alice.shutdown().await;
    r1.shutdown().await;

    let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let published = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if alice.handle().publish_record().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    assert!(
        published.is_ok(),
        "the record went out through the peer saved last time"
    );
    for n in [alice, r2] {
        n.shutdown().await;
    }
}

/// A public device that is a DHT client (the default of `tidings run` with home
/// relays) stays out of the relay's routing table, and is still reached: a
/// contact's first message finds it through its relay, and they end up talking
/// over a direct connection.
#[tokio::test(start_paused = true)]
async fn a_public_dht_client_stays_out_of_routing_tables_and_is_still_reached_directly() {
    let links = Arc::new(Links::default());
    let net = SimNetwork::new(links.clone());
    let clock = Clock::tokio(START_MS);
    let (r1, r1_addr) = relay(&net, 1, Vec::new(), &clock).await;
    let person = |port: u64, dht_server: bool| sim::PersonHost {
        port,
        bootstrap: vec![r1_addr.clone()],
        home_relays: vec![r1_addr.clone()],
        reachable: true,
        dht_server,
        tuning: sim::HostTuning::default(),
    };
    let (alice_host, bob_host) = (person(10, true), person(11, false));
    let ((_alice_disk, alice), (_bob_disk, bob)) = start_alice_and_bob(&net, &clock, &alice_host, &bob_host).await;
    let (a, b) = (alice.handle(), bob.handle());
    let relay = r1.handle();
    let bob_device = b.devices().unwrap()[0].device_key;
    let mailboxes = r1.relay_mailboxes().unwrap();
    until("bob's key packages are on his relay", || {
        mailboxes.key_packages_held(&bob_device).unwrap() > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        relay.status().await.unwrap().dht_peers,
        1,
        "the relay's table holds alice, a DHT server, and not bob"
    );

    exchange_hellos(&a, &b).await;
    let mut direct = false;
    for _ in 0..100 {
        let conns = a.connections(b.peer_id()).await;
        direct = conns.iter().any(|c| !c.iter().any(|p| p == Protocol::P2pCircuit));
        if direct {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(direct, "alice and bob hold a direct connection");
}

/// Two relays that met through one lookup part once the idle timeout has
/// passed, not at their next ping. libp2p-relay's server keeps every connection
/// it serves for ten seconds after its first look, and sets no timer for that:
/// the connection used to wait for its next ping (here ten minutes away) before
/// its idle timeout even started.
#[tokio::test(start_paused = true)]
async fn relays_that_met_through_a_lookup_part_after_the_idle_timeout_not_at_the_next_ping() {
    let net = SimNetwork::new(Arc::new(Links::default()));
    let clock = Clock::tokio(START_MS);
    let mut tuning = sim::HostTuning::default();
    // Nothing dials again during the test, and no ping comes before its end.
    tuning.net.kad_refresh = Duration::from_secs(3600);
    tuning.net.ping_interval = Duration::from_secs(600);
    let idle = tuning.net.idle_timeout;
    let r1_disk = sim::HostDisk::relay(clock.now_ms(), None).unwrap();
    let r1 = sim::start_relay_on(&net, 1, &r1_disk, Vec::new(), clock.clone(), &tuning)
        .await
        .unwrap();
    let r1_id = r1.handle().peer_id();
    let r1_addr = SimNetwork::address(1).with(Protocol::P2p(r1_id));
    let started = tokio::time::Instant::now();
    let r2_disk = sim::HostDisk::relay(clock.now_ms(), None).unwrap();
    let r2 = sim::start_relay_on(&net, 2, &r2_disk, vec![r1_addr], clock.clone(), &tuning)
        .await
        .unwrap();
    let h2 = r2.handle();
    assert!(
        connected_within_30s(&h2, r1_id).await,
        "the second relay joined the DHT through the first"
    );

    // The relay server's ten seconds, the idle timeout, and some slack for the
    // start-up lookups; the ping would come at ten minutes.
    let bound = Duration::from_secs(10) + idle + Duration::from_secs(30);
    let mut parted = false;
    while !parted && started.elapsed() < bound {
        parted = h2.connections(r1_id).await.is_empty();
        if !parted {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    assert!(parted, "the relays still held a connection {bound:?} after they met");
    for n in [r2, r1] {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_conversation_keeps_its_connection_and_a_lookup_does_not() {
    let net = SimNetwork::new(Arc::new(Links::default()));
    let clock = Clock::tokio(START_MS);
    let (r1, r1_addr) = relay(&net, 1, Vec::new(), &clock).await;
    let mut tuning = sim::HostTuning::default();
    // No refresh lookup dials anyone again during the test.
    tuning.net.kad_refresh = Duration::from_secs(3600);
    let (idle, kept, ping) = (
        tuning.net.idle_timeout,
        tuning.net.conversation_keep_alive,
        tuning.net.ping_interval,
    );
    let person = |port: u64| sim::PersonHost {
        port,
        bootstrap: vec![r1_addr.clone()],
        home_relays: vec![r1_addr.clone()],
        reachable: true,
        dht_server: true,
        tuning: tuning.clone(),
    };
    // Charlie, a DHT server nobody writes to, is up first: alice's start-up
    // lookups and her record's publication reach him.
    let charlie_disk = sim::HostDisk::person("charlie", clock.now_ms(), None).unwrap();
    let charlie = sim::start_person_on(&net, &person(12), &charlie_disk, clock.clone())
        .await
        .unwrap();
    let ((_alice_disk, alice), (_bob_disk, bob)) = start_alice_and_bob(&net, &clock, &person(10), &person(11)).await;
    let (a, b, c) = (alice.handle(), bob.handle(), charlie.handle().peer_id());
    assert!(
        connected_within_30s(&a, c).await,
        "alice's start-up lookups connected her to charlie"
    );

    exchange_hellos(&a, &b).await;

    // Past the idle timeout and a ping, within the conversation's keep-alive.
    tokio::time::sleep(idle + ping - Duration::from_secs(15)).await;
    assert!(
        a.connections(c).await.is_empty(),
        "the lookups' connection closed once idle"
    );
    assert!(
        !a.connections(b.peer_id()).await.is_empty(),
        "the conversation's is kept"
    );

    // Past the keep-alive, the next ping (within a minute) and the idle
    // timeout after it.
    tokio::time::sleep(kept + Duration::from_secs(30)).await;
    assert!(
        a.connections(b.peer_id()).await.is_empty(),
        "the conversation's connection closed once it went quiet"
    );
    assert!(
        !a.connections(r1.handle().peer_id()).await.is_empty(),
        "the home relay's connection stays: it holds the circuit reservation"
    );
}

#[tokio::test(start_paused = true)]
async fn a_contact_added_to_a_stopped_device_is_known_when_it_starts_and_its_own_card_is_refused() {
    let net = SimNetwork::new(Arc::new(Links::default()));
    let clock = Clock::tokio(START_MS);
    let (r1, boot, alice) = relay_and_alice(&net, &clock).await;
    let a = alice.handle();
    let disk = sim::HostDisk::person("bob", clock.now_ms(), None).unwrap();
    let host = public_person(11, boot.clone(), boot.clone());
    let bob = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let bob_card = bob.handle().card().to_uri();
    bob.shutdown().await;

    disk.add_contact(&a.card().to_uri(), clock.now_ms()).unwrap();
    let own = disk.add_contact(&bob_card, clock.now_ms());
    assert!(
        matches!(own, Err(tidings_node::NodeError::InvalidContact(_))),
        "{own:?}"
    );
    a.add_contact(&bob_card, None).await.unwrap();

    let bob = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let b = bob.handle();
    let known: Vec<(String, String)> = b.contacts().unwrap().into_iter().map(|c| (c.account, c.name)).collect();
    assert_eq!(known, vec![(acct(&a), "alice".to_owned())]);
    let sent = b.send_text(&acct(&a), "hello").await.unwrap();
    until("alice shows it", || shows(&a, &b, &sent.id)).await;
    drop((a, b));
    for n in [alice, bob, r1] {
        n.shutdown().await;
    }
}

/// Six relays on ports 1 to 6, joined through the first, with buckets of
/// three so that they fill more than one, 30 s after their start: the world,
/// its clock, the tuning (for the clients too), the relays and their addresses.
async fn six_relays_with_buckets_of_three() -> (
    SimNetwork,
    Clock,
    sim::HostTuning,
    Vec<(Node, sim::HostDisk)>,
    Vec<Multiaddr>,
) {
    let net = SimNetwork::new(Arc::new(Links::default()));
    let clock = Clock::tokio(START_MS);
    let mut tuning = sim::HostTuning::default();
    tuning.net.kad_replication = std::num::NonZeroUsize::new(3).unwrap();
    let mut relays = Vec::new();
    let mut boot: Vec<Multiaddr> = Vec::new();
    for port in 1..=6 {
        let disk = sim::HostDisk::relay(clock.now_ms(), None).unwrap();
        let node = sim::start_relay_on(
            &net,
            port,
            &disk,
            boot.iter().take(1).cloned().collect(),
            clock.clone(),
            &tuning,
        )
        .await
        .unwrap();
        boot.push(SimNetwork::address(port).with(Protocol::P2p(node.handle().peer_id())));
        relays.push((node, disk));
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    (net, clock, tuning, relays, boot)
}

/// `tuning` with connections let go 100 ms after they fall idle.
fn idle_at_once(mut tuning: sim::HostTuning) -> sim::HostTuning {
    tuning.net.idle_timeout = Duration::from_millis(100);
    tuning
}

/// Shuts alice and the relays down.
async fn stop_all(alice: Node, relays: Vec<(Node, sim::HostDisk)>) {
    alice.shutdown().await;
    for (node, _) in relays {
        node.shutdown().await;
    }
}

/// Alice on port 10 of `six_relays_with_buckets_of_three`: a DHT client behind
/// a NAT, without home relays, bootstrapping from the first relay.
fn alice_on_six_relays(boot: &[Multiaddr], tuning: sim::HostTuning) -> sim::PersonHost {
    sim::PersonHost {
        port: 10,
        bootstrap: vec![boot[0].clone()],
        home_relays: Vec::new(),
        reachable: false,
        dht_server: false,
        tuning,
    }
}

/// The index of DHT substreams in the simulator's per-class counts.
fn kad_class() -> usize {
    sim::StreamClass::ALL
        .iter()
        .position(|c| *c == sim::StreamClass::Kad)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_dht_client_back_within_its_refresh_period_starts_without_a_self_lookup() {
    let (net, clock, tuning, relays, boot) = six_relays_with_buckets_of_three().await;
    let host = alice_on_six_relays(&boot, tuning);
    let disk = sim::HostDisk::person("alice", clock.now_ms(), None).unwrap();
    // Runs alice from `disk` for about half a minute, less than the first
    // periodic save of her routing table (a minute), so that what the next
    // start finds is what she saved as she stopped; returns the connections
    // she dialled in the first 30 s.
    let run = async || {
        let before = net.connections_dialled(10);
        let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        let dialled = net.connections_dialled(10) - before;
        let found = alice.handle().publish_record().await;
        alice.shutdown().await;
        (dialled, found)
    };

    let (first, found) = run().await;
    assert!(found.is_ok(), "the first start published: {found:?}");
    assert!(
        first > 1,
        "the first start looked itself up beyond the bootstrap relay ({first} dials)"
    );
    assert!(
        disk.store.known_peers().unwrap().len() >= 3,
        "a bucket's worth of peers was saved"
    );

    tokio::time::sleep(Duration::from_secs(20 * 60)).await;
    let (soon, found) = run().await;
    assert_eq!(
        soon, 1,
        "back after 20 minutes: only the bootstrap relay is dialled at the start"
    );
    assert!(found.is_ok(), "and the saved table still finds the DHT: {found:?}");

    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    let (late, _) = run().await;
    assert!(
        late > 1,
        "back after two hours: the start looks itself up again ({late} dials)"
    );
    for (node, _) in relays {
        node.shutdown().await;
    }
}

/// A fresh DHT client looks itself up once as it starts. libp2p arms a
/// bootstrap whenever a peer joins a table of fewer than 20, as the start's own
/// lookup fills it; that second lookup would find nothing the first did not.
#[tokio::test(start_paused = true)]
async fn a_fresh_dht_client_looks_itself_up_once_as_it_starts() {
    let (net, clock, tuning, relays, boot) = six_relays_with_buckets_of_three().await;
    // Alice lets a connection go as soon as it is idle, so a second lookup
    // would dial the relays again.
    let host = alice_on_six_relays(&boot, idle_at_once(tuning));
    let disk = sim::HostDisk::person("alice", clock.now_ms(), None).unwrap();
    let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let kad = kad_class();
    let kad_dials = net.connections_dialled_for(10)[kad];
    assert!(
        kad_dials >= 2,
        "alice looked herself up beyond the bootstrap relay ({kad_dials} dials)"
    );
    assert!(
        kad_dials <= relays.len() as u64,
        "one lookup asks each of the {} relays at most once; alice dialled {kad_dials} for the DHT",
        relays.len()
    );
    stop_all(alice, relays).await;
}

/// A fresh DHT client's start needs a self-lookup, but a lookup of its own
/// fills its table just as well: the self-lookup waits
/// (`net::START_LOOKUP_GRACE`) and is dropped when the user record's
/// publication comes first, as it does at a first start.
#[tokio::test(start_paused = true)]
async fn a_fresh_dht_client_publishing_within_the_grace_makes_no_separate_self_lookup() {
    let (net, clock, tuning, relays, boot) = six_relays_with_buckets_of_three().await;
    // Alice lets a connection go as soon as it is idle, so every lookup dials.
    let host = alice_on_six_relays(&boot, idle_at_once(tuning));
    let disk = sim::HostDisk::person("alice", clock.now_ms(), None).unwrap();
    let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        net.connections_dialled(10),
        1,
        "in her first two seconds alice dialled her bootstrap relay and looked nothing up"
    );
    let published = alice.handle().publish_record().await;
    assert!(published.is_ok(), "the publication found the DHT: {published:?}");
    assert!(
        net.connections_dialled(10) > 1,
        "the publication's lookup dialled the relays"
    );
    // DHT requests, one substream each (libp2p's liveness dials of table
    // entries open none).
    let kad = kad_class();
    let after_publication = net.streams_opened(10)[kad];
    tokio::time::sleep(net::START_LOOKUP_GRACE + Duration::from_secs(20)).await;
    assert_eq!(
        net.streams_opened(10)[kad],
        after_publication,
        "no self-lookup followed the publication"
    );
    stop_all(alice, relays).await;
}

/// A node renews its record at the servers its last publication found nearest
/// the key, one store request each, without looking the key up again, after a
/// restart too (the set is saved with the publication); once that set is older
/// than `net::RECORD_HOLDERS_FRESH`, it looks the key up anew.
#[tokio::test(start_paused = true)]
async fn a_record_renewal_goes_straight_to_the_servers_the_last_lookup_found() {
    let (net, clock, tuning, relays, boot) = six_relays_with_buckets_of_three().await;
    let k = tuning.net.kad_replication.get() as u64;
    let host = alice_on_six_relays(&boot, tuning);
    let disk = sim::HostDisk::person("alice", clock.now_ms(), None).unwrap();
    let kad = kad_class();
    // Kad streams a publication opens: one per request.
    let publish = async |node: &Node| {
        let before = net.streams_opened(10)[kad];
        let published = node.handle().publish_record().await;
        assert!(published.is_ok(), "published: {published:?}");
        net.streams_opened(10)[kad] - before
    };
    let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let first = publish(&alice).await;
    assert!(
        first > k,
        "the first publication looked the key up before storing it at {k} servers ({first} requests)"
    );
    // Waits are off the half-hour marks of the client's refresh check, whose
    // self-lookup would count here.
    tokio::time::sleep(Duration::from_secs(50 * 60)).await;
    let renewal = publish(&alice).await;
    assert_eq!(
        renewal, k,
        "50 minutes later the record went straight to each of the {k} servers found then"
    );
    alice.shutdown().await;
    tokio::time::sleep(Duration::from_secs(50 * 60)).await;
    let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let after_restart = publish(&alice).await;
    assert_eq!(after_restart, k, "after a restart too");
    tokio::time::sleep(net::RECORD_HOLDERS_FRESH + Duration::from_secs(7 * 60)).await;
    let late = publish(&alice).await;
    assert!(
        late > k,
        "once the set is stale, the key is looked up again ({late} requests)"
    );
    let found = alice.handle().lookup_record(&alice.handle().account()).await;
    assert!(found.is_ok(), "the record is found: {found:?}");
    stop_all(alice, relays).await;
}

/// Relays on ports 1 to n (each joining the DHT through the first), and
/// alice (port 10) and bob (port 11): reachable DHT clients, at home on
/// relays 1 and 2.
struct AtHomeOnTwoRelays {
    net: SimNetwork,
    clock: Clock,
    relays: Vec<(Node, Multiaddr)>,
    alice: Node,
    bob: Node,
    _disks: (sim::HostDisk, sim::HostDisk),
}

impl AtHomeOnTwoRelays {
    async fn new(relays: u64) -> Self {
        let net = SimNetwork::new(Arc::new(Links::default()));
        let clock = Clock::tokio(START_MS);
        let mut started: Vec<(Node, Multiaddr)> = Vec::new();
        for port in 1..=relays.max(2) {
            let boot = started.first().map(|(_, a)| a.clone()).into_iter().collect();
            started.push(relay(&net, port, boot, &clock).await);
        }
        let person = |port: u64, home: &Multiaddr| sim::PersonHost {
            port,
            bootstrap: vec![started[0].1.clone()],
            home_relays: vec![home.clone()],
            reachable: true,
            dht_server: false,
            tuning: sim::HostTuning::default(),
        };
        let (alice_host, bob_host) = (person(10, &started[0].1), person(11, &started[1].1));
        let ((alice_disk, alice), (bob_disk, bob)) = start_alice_and_bob(&net, &clock, &alice_host, &bob_host).await;
        Self {
            net,
            clock,
            relays: started,
            alice,
            bob,
            _disks: (alice_disk, bob_disk),
        }
    }

    async fn shutdown(self) {
        self.alice.shutdown().await;
        self.bob.shutdown().await;
        for (r, _) in self.relays {
            r.shutdown().await;
        }
    }
}

/// A device with home relays is a DHT client: no routing table holds it. So a
/// sender that finds it away reaches it through its relays' circuits and does
/// not look it up in the DHT (a lookup of some twenty requests, most on fresh
/// connections, that could not find it), and the circuit does not put the
/// device in the sender's routing table, where it would draw her lookups.
#[tokio::test(start_paused = true)]
async fn a_device_with_home_relays_is_sought_through_them_not_in_the_dht() {
    let w = AtHomeOnTwoRelays::new(3).await;
    let (net, a, b) = (&w.net, w.alice.handle(), w.bob.handle());
    exchange_hellos(&a, &b).await;
    // Past the conversation's keep-alive and the idle timeout: alice and bob
    // hold no connection, and alice's table holds the three relays.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(
        a.connections(b.peer_id()).await.is_empty(),
        "the conversation's connection closed"
    );
    assert_eq!(a.status().await.unwrap().dht_peers, 3, "alice's table holds the relays");

    let kad = |port| {
        let i = kad_class();
        net.stream_bytes(port)[i]
    };
    let before = kad(10);
    let sent = a.send_text(&acct(&b), "are you there?").await.unwrap();
    until("bob shows it", || shows(&b, &a, &sent.id)).await;
    assert!(
        connected_within_30s(&a, b.peer_id()).await,
        "alice reached bob again, through his relay"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(kad(10), before, "alice sent no DHT request to reach bob");
    assert_eq!(
        a.status().await.unwrap().dht_peers,
        3,
        "bob, reached through a circuit, is not in alice's routing table"
    );
    drop((a, b));
    w.shutdown().await;
}

/// A first message needs a key package of each of the contact's devices. A
/// device with home relays is not looked up in the DHT for it (it is a DHT
/// client, which no lookup finds): it answers if it can be reached, and its
/// relays hand out its key packages if not. The only DHT traffic of the first
/// message is the lookup of a newer user record.
#[tokio::test(start_paused = true)]
async fn a_key_package_of_a_device_with_home_relays_away_is_not_sought_in_the_dht() {
    let AtHomeOnTwoRelays {
        net,
        relays,
        alice,
        bob,
        _disks,
        ..
    } = AtHomeOnTwoRelays::new(3).await;
    let (a, b) = (alice.handle(), bob.handle());
    // Past the start-up's lookups and the idle timeout; bob has left his key
    // packages on his relay and goes away.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let card = b.card().to_uri();
    let account = b.account();
    drop(b);
    bob.shutdown().await;
    let kad = || {
        let i = kad_class();
        net.stream_bytes(10)[i]
    };
    let before = kad();
    // Bob's record was never published: this lookup, like the one of the
    // first message, asks every relay.
    let _ = a.lookup_record(&account).await;
    let one_lookup = kad() - before;
    a.add_contact(&card, None).await.unwrap();
    let before = kad();
    a.send_text(&account.to_base58(), "hello bob").await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let sending = kad() - before;
    assert!(
        sending <= one_lookup + one_lookup / 2,
        "the first message to bob made one record lookup ({one_lookup} bytes) and no peer lookup: {sending} bytes"
    );
    drop(a);
    alice.shutdown().await;
    for (r, _) in relays {
        r.shutdown().await;
    }
}

/// Pings keep long-lived connections (and their NAT mappings) fresh, so they
/// start once a connection has lived a ping interval: a connection made for one
/// exchange (here the DHT requests of a record publication) closes at the idle
/// timeout without one, and the connection to the home relay pings from its
/// first minute on, from the device that dialled it only: the relay answers.
#[tokio::test(start_paused = true)]
async fn connections_ping_only_once_they_have_lived_a_ping_interval() {
    let net = SimNetwork::new(Arc::new(Links::default()));
    let clock = Clock::tokio(START_MS);
    let (r1, r1_addr) = relay(&net, 1, Vec::new(), &clock).await;
    let (r2, _) = relay(&net, 2, vec![r1_addr.clone()], &clock).await;
    let (r3, _) = relay(&net, 3, vec![r1_addr.clone()], &clock).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let host = sim::PersonHost {
        port: 10,
        bootstrap: vec![r1_addr.clone()],
        home_relays: vec![r1_addr.clone()],
        reachable: false,
        dht_server: false,
        tuning: sim::HostTuning::default(),
    };
    let disk = sim::HostDisk::person("alice", clock.now_ms(), None).unwrap();
    let alice = sim::start_person_on(&net, &host, &disk, clock.clone()).await.unwrap();
    let a = alice.handle();
    let ping = || {
        let i = sim::StreamClass::ALL
            .iter()
            .position(|c| *c == sim::StreamClass::Ping)
            .unwrap();
        net.stream_bytes(10)[i]
    };
    a.publish_record().await.unwrap();
    assert!(
        !a.connections(r2.handle().peer_id()).await.is_empty()
            || !a.connections(r3.handle().peer_id()).await.is_empty(),
        "the publication dialled beyond the home relay"
    );
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(ping(), 0, "no connection pinged in its first minute");
    for r in [&r2, &r3] {
        assert!(
            a.connections(r.handle().peer_id()).await.is_empty(),
            "the publication's connections closed at the idle timeout"
        );
    }
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(ping() > 0, "the home relay's connection pings once it is a minute old");
    assert!(!a.connections(r1.handle().peer_id()).await.is_empty(), "and stays open");
    let ping_class = sim::StreamClass::ALL
        .iter()
        .position(|c| *c == sim::StreamClass::Ping)
        .unwrap();
    assert_eq!(net.streams_opened(10)[ping_class], 1, "alice pings on one substream");
    assert_eq!(
        net.streams_opened(1)[ping_class],
        0,
        "the relay she dialled only answers"
    );
    drop(a);
    for n in [alice, r1, r2, r3] {
        n.shutdown().await;
    }
}

/// libp2p's relay client drops a circuit whose relay it is still dialling; the
/// network task holds such a circuit until the relay's connection is up, so a
/// device is reached however its relay's connection and the circuit race (a
/// restart's reconnections, a deposit's dials to the same relays).
#[tokio::test(start_paused = true)]
async fn a_circuit_dialled_while_its_relay_is_still_being_dialled_connects() {
    let w = AtHomeOnTwoRelays::new(2).await;
    let (a, b) = (w.alice.handle(), w.bob.handle());
    tokio::time::sleep(Duration::from_secs(600)).await;
    let (r2, r2_addr) = (&w.relays[1].0, w.relays[1].1.clone());
    let r2_peer = r2.handle().peer_id();
    assert!(
        a.connections(r2_peer).await.is_empty(),
        "alice holds no connection to bob's relay"
    );
    assert!(a.connections(b.peer_id()).await.is_empty());

    let circuit = r2_addr
        .clone()
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(b.peer_id()));
    a.dial(r2_addr.clone()).await.unwrap();
    a.dial(circuit).await.unwrap();
    assert!(
        connected_within_30s(&a, b.peer_id()).await,
        "the circuit dialled while its relay was being dialled reached bob"
    );
    drop((a, b));
    w.shutdown().await;
}

/// A device without home relays has its mail held in its contacts' outboxes
/// while it is away, so as it starts it connects to them (`tidings run` calls
/// `reconnect_contacts`), and their outboxes send at once. A device with home
/// relays finds its mail there: it dials none of its contacts. (Alice and bob
/// are DHT clients, so that no refresh of a routing table dials one from the
/// other.)
#[tokio::test(start_paused = true)]
async fn only_a_device_without_home_relays_dials_its_contacts_as_it_starts() {
    let w = AtHomeOnTwoRelays::new(2).await;
    let boot = vec![w.relays[0].1.clone()];
    let carol = sim::start_node(&w.net, 12, "carol", boot, Vec::new(), w.clock.clone())
        .await
        .unwrap();
    let (a, b, c) = (w.alice.handle(), w.bob.handle(), carol.handle());
    exchange_hellos(&a, &b).await;
    exchange_hellos(&c, &b).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(a.connections(b.peer_id()).await.is_empty());
    assert!(c.connections(b.peer_id()).await.is_empty());

    a.reconnect_contacts().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        a.connections(b.peer_id()).await.is_empty(),
        "alice, with a home relay, left bob alone"
    );
    c.reconnect_contacts().await;
    assert!(
        connected_within_30s(&c, b.peer_id()).await,
        "carol, without relays, reached bob"
    );
    drop((a, b, c));
    carol.shutdown().await;
    w.shutdown().await;
}
