//! `tidings demo`: a whole Tidings network on loopback, in one process.
//!
//! A bootstrap node, a community relay and three people (alice, bob, carol)
//! with temporary data directories. Alice and bob exchange contact cards (which
//! carry no addresses), find each other through the DHT and talk both ways over
//! MLS; bob stops while alice keeps writing and the relay keeps her messages in
//! his mailbox (with signed custody receipts); the demo checks that bob's
//! history survived and the queued messages arrived exactly once. Carol is
//! behind a NAT (no listen address) and is reached through a relay circuit. It
//! exits non-zero if any step fails.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use libp2p::Multiaddr;
use tokio::sync::broadcast;

use crate::types::{MessageView, NodeEvent};
use crate::{Clock, NetConfig, Node, NodeConfig, NodeHandle};

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Loopback listen addresses: TCP and QUIC on any free port.
pub fn loopback() -> Vec<Multiaddr> {
    crate::net::any_port_addrs(std::net::Ipv4Addr::LOCALHOST)
}

/// Creates (if needed) and starts a node whose data lives in `dir`.
pub async fn start_node(dir: &Path, name: &str, bootstrap: Vec<Multiaddr>) -> anyhow::Result<Node> {
    start_node_with_relays(dir, name, bootstrap, Vec::new()).await
}

/// Creates (if needed) and starts a relay on loopback whose data lives in `dir`.
pub async fn start_relay(dir: &Path, bootstrap: Vec<Multiaddr>) -> anyhow::Result<Node> {
    start_relay_with(dir, bootstrap, RelayTestOptions::default()).await
}

/// Settings of a relay started by [`start_relay_with`].
#[derive(Debug, Clone)]
pub struct RelayTestOptions {
    pub limits: tidings_store::mailbox::MailboxLimits,
    pub clock: Clock,
    pub pow_bits: u32,
    pub sweep_interval: Duration,
    pub key_package_claims_per_minute: u32,
    pub request_deposits_per_minute: u32,
    pub request_deposits_per_ip_per_minute: u32,
}

impl Default for RelayTestOptions {
    fn default() -> Self {
        Self {
            limits: tidings_store::mailbox::MailboxLimits::default(),
            clock: Clock::system(),
            pow_bits: tidings_protocol::mailbox::DEFAULT_POW_BITS,
            sweep_interval: Duration::from_secs(60),
            key_package_claims_per_minute: 60,
            request_deposits_per_minute: 600,
            request_deposits_per_ip_per_minute: 2400,
        }
    }
}

impl RelayTestOptions {
    /// The relay settings these options stand for, over `mailboxes`.
    pub(crate) fn relay_options(
        &self,
        mailboxes: std::sync::Arc<tidings_store::mailbox::Mailboxes>,
    ) -> crate::relay::RelayOptions {
        let mut registry = prometheus_client::registry::Registry::default();
        crate::relay::RelayOptions {
            mailboxes,
            pow_bits: self.pow_bits,
            key_package_claims_per_minute: self.key_package_claims_per_minute,
            request_deposits_per_minute: self.request_deposits_per_minute,
            request_deposits_per_ip_per_minute: self.request_deposits_per_ip_per_minute,
            sweep_interval: self.sweep_interval,
            metrics: crate::relay::RelayMetrics::register(&mut registry),
        }
    }
}

/// Like [`start_relay`], with explicit limits, clock and intervals (tests).
pub async fn start_relay_with(dir: &Path, bootstrap: Vec<Multiaddr>, opts: RelayTestOptions) -> anyhow::Result<Node> {
    std::fs::create_dir_all(dir)?;
    let store = crate::open_store(dir)?;
    let clock = opts.clock.clone();
    if !store.has_identity()? {
        crate::create_identity(&store, "relay", clock.now_ms())?;
    }
    let mailboxes = std::sync::Arc::new(tidings_store::mailbox::Mailboxes::open(
        &dir.join("mailboxes.redb"),
        opts.limits.clone(),
    )?);
    let relay = opts.relay_options(mailboxes);
    let net = NetConfig {
        listen: loopback(),
        bootstrap,
        relay_server: Some(crate::net::RelayServerConfig::default()),
        announce_listen_addrs: true,
        ..NetConfig::default()
    };
    Node::start(
        store,
        NodeConfig {
            net,
            clock,
            relay: Some(relay),
            ..NodeConfig::default()
        },
    )
    .await
}

fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
}

/// A node behind a NAT: it listens on nothing, so nobody can dial it; it is a
/// DHT client and reachable only through circuits it reserves on its relays.
pub async fn start_node_behind_nat(
    dir: &Path,
    name: &str,
    bootstrap: Vec<Multiaddr>,
    home_relays: Vec<Multiaddr>,
) -> anyhow::Result<Node> {
    let net = NetConfig {
        listen: Vec::new(),
        bootstrap,
        dht_server: false,
        ..NetConfig::default()
    };
    start_node_with_net(dir, name, net, home_relays).await
}

/// Waits until `h` holds a circuit reservation; returns its circuit address.
pub async fn wait_circuit(h: &NodeHandle) -> anyhow::Result<String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let status = h.status().await?;
        if let Some(a) = status.listen_addrs.iter().find(|a| a.contains("/p2p-circuit")) {
            return Ok(a.clone());
        }
        if Instant::now() >= deadline {
            bail!("no circuit reservation on the relay");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`start_node`], with home relays (`…/p2p/<relay id>`).
pub async fn start_node_with_relays(
    dir: &Path,
    name: &str,
    bootstrap: Vec<Multiaddr>,
    home_relays: Vec<Multiaddr>,
) -> anyhow::Result<Node> {
    let net = NetConfig {
        listen: loopback(),
        bootstrap,
        ..NetConfig::default()
    };
    start_node_with_net(dir, name, net, home_relays).await
}

/// Creates (if needed) and starts a node whose data lives in `dir`, with the
/// given network settings and home relays.
pub async fn start_node_with_net(
    dir: &Path,
    name: &str,
    net: NetConfig,
    home_relays: Vec<Multiaddr>,
) -> anyhow::Result<Node> {
    let config = NodeConfig {
        net,
        home_relays,
        ..NodeConfig::default()
    };
    start_node_with_config(dir, name, config).await
}

/// Creates (if needed) and starts a node whose data lives in `dir`, with a
/// whole node configuration.
pub async fn start_node_with_config(dir: &Path, name: &str, config: NodeConfig) -> anyhow::Result<Node> {
    std::fs::create_dir_all(dir)?;
    let store = crate::open_store(dir)?;
    if !store.has_identity()? {
        crate::create_identity(&store, name, config.clock.now_ms())?;
    }
    Node::start(store, config).await
}

/// Waits for `pred` to match an event.
pub async fn wait_event<T>(
    rx: &mut broadcast::Receiver<NodeEvent>,
    timeout: Duration,
    mut pred: impl FnMut(&NodeEvent) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => bail!("timed out"),
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(e)) => bail!("event stream closed: {e}"),
            Ok(Ok(ev)) => ev,
        };
        if let Some(v) = pred(&ev) {
            return Ok(v);
        }
    }
}

/// Waits until the message `id` arrives.
pub async fn wait_message(rx: &mut broadcast::Receiver<NodeEvent>, id: &str) -> anyhow::Result<MessageView> {
    wait_event(rx, STEP_TIMEOUT, |ev| match ev {
        NodeEvent::Message(m) if m.id == id => Some(MessageView::clone(m)),
        _ => None,
    })
    .await
}

/// Waits until the message `id` is acknowledged by every recipient device.
pub async fn wait_delivered(rx: &mut broadcast::Receiver<NodeEvent>, id: &str) -> anyhow::Result<()> {
    wait_event(rx, STEP_TIMEOUT, |ev| match ev {
        NodeEvent::Delivered { id: d, .. } if d == id => Some(()),
        _ => None,
    })
    .await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Line {
    from: &'static str,
    to: &'static str,
    text: String,
    path: &'static str,
    display_ms: f64,
    ack_ms: f64,
}

/// Sends a group message from `members[sender]` and waits until every other
/// member displays it and the group's relays hold it.
async fn group_exchange(
    sender: usize,
    members: &[(&'static str, NodeHandle)],
    gid: &str,
    text: &str,
    lines: &mut Vec<Line>,
) -> anyhow::Result<()> {
    let from = (members[sender].0, &members[sender].1);
    let others: Vec<_> = members.iter().filter(|(n, _)| *n != from.0).collect();
    let mut rxs: Vec<_> = others.iter().map(|(_, h)| h.subscribe()).collect();
    let mut from_rx = from.1.subscribe();
    let t0 = Instant::now();
    let sent = from
        .1
        .send_group(gid, text)
        .await
        .with_context(|| format!("{} could not send to the group", from.0))?;
    for ((name, _), rx) in others.iter().zip(rxs.iter_mut()) {
        let got = wait_message(rx, &sent.id)
            .await
            .with_context(|| format!("{name} never received {text:?}"))?;
        if got.text != text {
            bail!("{name} received {:?} instead of {text:?}", got.text);
        }
    }
    let display = t0.elapsed();
    wait_settled(&mut from_rx, &sent.id)
        .await
        .with_context(|| format!("the relays never signed for {text:?}"))?;
    lines.push(Line {
        from: from.0,
        to: "group",
        text: text.to_owned(),
        path: "group",
        display_ms: ms(display),
        ack_ms: ms(t0.elapsed()),
    });
    Ok(())
}

/// Waits until message `id` is acknowledged by the device (`direct`) or held
/// by a relay with a custody receipt (`mailbox`).
pub async fn wait_settled(rx: &mut broadcast::Receiver<NodeEvent>, id: &str) -> anyhow::Result<&'static str> {
    wait_event(rx, STEP_TIMEOUT, |ev| match ev {
        NodeEvent::Delivered { id: d, .. } if d == id => Some("direct"),
        NodeEvent::Stored { id: d, .. } if d == id => Some("mailbox"),
        _ => None,
    })
    .await
}

async fn exchange(
    from: (&'static str, &NodeHandle),
    to: (&'static str, &NodeHandle),
    text: &str,
    lines: &mut Vec<Line>,
) -> anyhow::Result<()> {
    let mut to_rx = to.1.subscribe();
    let mut from_rx = from.1.subscribe();
    let t0 = Instant::now();
    let sent = from
        .1
        .send_text(&to.1.account().to_base58(), text)
        .await
        .with_context(|| format!("{} could not send", from.0))?;
    let got = wait_message(&mut to_rx, &sent.id)
        .await
        .with_context(|| format!("{} never received {:?}", to.0, text))?;
    let display = t0.elapsed();
    // The connection the message just crossed (checked before either side
    // has reason to open another).
    let conns = from.1.connections(to.1.peer_id()).await;
    let path = wait_settled(&mut from_rx, &sent.id)
        .await
        .with_context(|| format!("{} never got the ack for {:?}", from.0, text))?;
    let ack = t0.elapsed();
    // "direct" over a relayed connection is a delivery through a circuit.
    let path = if path == "direct" && !conns.is_empty() && conns.iter().all(is_circuit) {
        "circuit"
    } else {
        path
    };
    if got.text != text {
        bail!("{} received {:?} instead of {:?}", to.0, got.text, text);
    }
    lines.push(Line {
        from: from.0,
        to: to.0,
        text: text.to_owned(),
        path,
        display_ms: ms(display),
        ack_ms: ms(ack),
    });
    Ok(())
}

/// Runs the demo.
pub async fn run() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let started = Instant::now();
    println!("Tidings demo: a bootstrap node, two community relays and three people on loopback, then a group.\n");

    let boot = start_node(&tmp.path().join("bootstrap"), "bootstrap", Vec::new()).await?;
    let boot_addrs: Vec<Multiaddr> = boot.listen_addrs();
    println!("[1] bootstrap node listening on {}", boot_addrs[0]);
    // Everyone keeps mailboxes on two relays run by different communities, so
    // no single operator can lose (or withhold) their mail.
    let mut relays = Vec::new();
    let mut relay_addrs = Vec::new();
    for name in ["relay-a", "relay-b"] {
        let relay = start_relay(&tmp.path().join(name), boot_addrs.clone()).await?;
        relay_addrs.push(relay.listen_addrs()[0].clone());
        println!("    community relay {name} listening on {}", relay.listen_addrs()[0]);
        relays.push(relay);
    }

    let alice_dir = tmp.path().join("alice");
    let bob_dir = tmp.path().join("bob");
    let alice_node = start_node_with_relays(&alice_dir, "alice", boot_addrs.clone(), relay_addrs.clone()).await?;
    let mut bob_node = start_node_with_relays(&bob_dir, "bob", boot_addrs.clone(), relay_addrs.clone()).await?;
    let alice = alice_node.handle();
    let mut bob = bob_node.handle();
    println!(
        "[2] alice ({}) and bob ({}) joined; both keep their mailboxes on the two relays",
        alice.account(),
        bob.account()
    );

    for (who, h) in [("alice", &alice), ("bob", &bob)] {
        retry_until(STEP_TIMEOUT, || h.publish_record())
            .await
            .with_context(|| format!("{who} could not publish the user record"))?;
    }
    println!("[3] both published their signed user records (devices and home relays) in the DHT");

    let alice_card = alice.card().to_uri();
    let bob_card = bob.card().to_uri();
    alice.add_contact(&bob_card, None).await?;
    bob.add_contact(&alice_card, None).await?;
    println!(
        "[4] they exchanged contact cards (relays and deposit capability inside, no device address): {}…",
        &bob_card[..40]
    );

    let found = alice.find_peer(bob.peer_id()).await?;
    if found.is_empty() {
        bail!("alice could not find bob's device in the DHT");
    }
    println!("[5] alice found bob's device in the DHT at {}", found[0]);

    let mut lines = Vec::new();
    exchange(("alice", &alice), ("bob", &bob), "Hi Bob! This is Tidings.", &mut lines).await?;
    println!("[6] alice started an MLS conversation with bob (key package fetched from bob's device)");
    exchange(
        ("bob", &bob),
        ("alice", &alice),
        "Hi Alice, loud and clear.",
        &mut lines,
    )
    .await?;
    for i in 1..=3 {
        exchange(
            ("alice", &alice),
            ("bob", &bob),
            &format!("Message {i} from alice"),
            &mut lines,
        )
        .await?;
        exchange(
            ("bob", &bob),
            ("alice", &alice),
            &format!("Reply {i} from bob"),
            &mut lines,
        )
        .await?;
    }
    let before = bob.history(&alice.account().to_base58())?;
    println!(
        "[7] {} messages exchanged; bob's history holds {}",
        lines.len(),
        before.len()
    );

    drop(bob);
    bob_node.shutdown().await;
    println!("[8] bob's node stopped");
    let bob_account = bob_card_account(&bob_card)?;
    let mut alice_rx = alice.subscribe();
    let mut queued = Vec::new();
    for text in [
        "Are you there, Bob?",
        "The relays keep these for you.",
        "Write back when you are online.",
    ] {
        let t0 = Instant::now();
        let m = alice.send_text(&bob_account, text).await?;
        let path = wait_settled(&mut alice_rx, &m.id)
            .await
            .with_context(|| format!("the relay never signed for {text:?}"))?;
        queued.push((m, path, ms(t0.elapsed())));
    }
    let receipts: usize = queued
        .iter()
        .filter_map(|(m, _, _)| hex::decode(&m.id).ok()?.try_into().ok())
        .map(|id: [u8; 16]| alice.store().receipts(&id).map(|r| r.len()).unwrap_or(0))
        .sum();
    let outbox = alice.status().await?.outbox;
    println!(
        "    alice wrote {} messages while bob was away: both relays hold them ({receipts} signed custody receipts), her outbox holds {outbox}",
        queued.len()
    );

    let t_restart = Instant::now();
    bob_node = start_node_with_relays(&bob_dir, "bob", boot_addrs.clone(), relay_addrs.clone()).await?;
    bob = bob_node.handle();
    let mut bob_rx = bob.subscribe();
    let after = bob.history(&alice.account().to_base58())?;
    if after.len() < before.len() || after[..before.len()] != before[..] {
        bail!("bob's history did not survive the restart");
    }
    println!(
        "[9] bob restarted from the same data directory; his {} messages are intact",
        before.len()
    );
    for (m, path, stored_ms) in &queued {
        let got = wait_message(&mut bob_rx, &m.id)
            .await
            .with_context(|| format!("bob never received the queued {:?}", m.text))?;
        lines.push(Line {
            from: "alice",
            to: "bob",
            text: got.text.clone(),
            path,
            display_ms: ms(t_restart.elapsed()),
            ack_ms: *stored_ms,
        });
    }
    // Messages are shown before the receiver's commit; the history follows it.
    let expected = before.len() + queued.len();
    let mut final_history = bob.history(&alice.account().to_base58())?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while final_history.len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        final_history = bob.history(&alice.account().to_base58())?;
    }
    if final_history.len() != expected {
        bail!("bob has {} messages, expected exactly {expected}", final_history.len());
    }
    let missing = bob.status().await?.mail_missing;
    if !missing.is_empty() {
        bail!("a relay skipped mail for bob: {missing:?}");
    }
    println!(
        "[10] bob fetched the messages from his mailboxes on both relays, each shown exactly once; no relay skipped any"
    );

    let carol_node = start_node_behind_nat(
        &tmp.path().join("carol"),
        "carol",
        boot_addrs.clone(),
        relay_addrs.clone(),
    )
    .await?;
    let carol = carol_node.handle();
    retry_until(STEP_TIMEOUT, || carol.publish_record())
        .await
        .context("carol could not publish the user record")?;
    let circuit = wait_circuit(&carol).await?;
    if carol
        .status()
        .await?
        .listen_addrs
        .iter()
        .any(|a| !a.contains("/p2p-circuit"))
    {
        bail!("carol should have no direct address");
    }
    println!("[11] carol joined from behind a NAT: no address anyone can dial; reachable only through her relays");
    println!("     at {}…", &circuit[..circuit.len().min(72)]);
    alice.add_contact(&carol.card().to_uri(), None).await?;
    let before_carol = lines.len();
    exchange(
        ("alice", &alice),
        ("carol", &carol),
        "Hi Carol, through your relays!",
        &mut lines,
    )
    .await?;
    exchange(
        ("carol", &carol),
        ("alice", &alice),
        "Hi Alice, NAT or not.",
        &mut lines,
    )
    .await?;
    if lines[before_carol].path == "mailbox" {
        bail!("alice never reached carol's device; her message waited in the mailbox");
    }
    // Either side may be the one that sees the upgrade complete.
    let punched = alice.status().await?.hole_punches + carol.status().await?.hole_punches;
    if punched > 0 {
        println!(
            "     alice reached carol's device through the relay circuit; hole punching (DCUtR) then made the connection direct"
        );
    } else {
        println!("     alice reached carol's device through the relay circuit");
    }

    // Alice links her phone: a second device of her account.
    let code = alice.link_offer().await?;
    let phone_dir = tmp.path().join("alice-phone");
    let joined = crate::link::join_account(&phone_dir, &code, &Clock::system(), None)
        .await
        .context("alice's phone could not join her account")?;
    let phone_node = start_node_with_relays(&phone_dir, "alice", boot_addrs.clone(), relay_addrs.clone()).await?;
    let phone = phone_node.handle();
    if phone.account() != alice.account() {
        bail!("the phone holds another account");
    }
    println!(
        "[12] alice linked her phone with a one-time code: same account, her {} contacts and {} history rows came over directly",
        joined.contacts, joined.history
    );

    // A group of three people (four devices): created on alice's relays, with bob away for part of it.
    let members = [
        ("alice", alice.clone()),
        ("phone", phone.clone()),
        ("bob", bob.clone()),
        ("carol", carol.clone()),
    ];
    bob.add_contact(&carol.card().to_uri(), None).await?;
    let group = alice
        .create_group("weekend", &[&bob.account().to_base58(), &carol.account().to_base58()])
        .await
        .context("alice could not create the group")?;
    let gid = group.id.clone();
    for (who, h) in members.iter().skip(1) {
        // (alice's phone is added by alice's own device once the group exists.)
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !h.group(&gid).await.is_ok_and(|g| !g.left) {
            if Instant::now() > deadline {
                bail!("{who} never joined the group");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!(
        "[13] alice created the group \"weekend\" with bob and carol; her phone joined it too; its first relay orders every change"
    );
    group_exchange(0, &members, &gid, "Who is in for Saturday?", &mut lines).await?;
    group_exchange(2, &members, &gid, "Me!", &mut lines).await?;
    group_exchange(3, &members, &gid, "Me too.", &mut lines).await?;
    group_exchange(1, &members, &gid, "(from my phone) Great!", &mut lines).await?;
    drop((bob, members));
    bob_node.shutdown().await;
    let online = [
        ("alice", alice.clone()),
        ("phone", phone.clone()),
        ("carol", carol.clone()),
    ];
    group_exchange(0, &online, &gid, "Bob is away; we pick the place.", &mut lines).await?;
    group_exchange(2, &online, &gid, "The lake, at ten.", &mut lines).await?;
    bob_node = start_node_with_relays(&bob_dir, "bob", boot_addrs.clone(), relay_addrs.clone()).await?;
    let bob = bob_node.handle();
    let expected = alice.group_history(&gid)?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while bob.group_history(&gid)?.len() < expected.len() {
        if Instant::now() > deadline {
            bail!("bob did not catch up with the group");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let order = |h: &NodeHandle| -> anyhow::Result<Vec<String>> {
        Ok(h.group_history(&gid)?.into_iter().map(|m| m.id).collect())
    };
    if order(&bob)? != order(&alice)? || order(&carol)? != order(&alice)? || order(&phone)? != order(&alice)? {
        bail!("the group's devices disagree on its history");
    }
    println!(
        "[14] bob was away for two group messages; back, he read them from the group inbox: all four devices hold the same {} messages in the same order",
        expected.len()
    );
    println!();

    println!("Transcript (path; latency from send to the receiver's display, and to the sender holding the");
    println!("device's ack or the relay's custody receipt; mailbox display times count from bob's restart;");
    println!("a group message counts until every other member shows it and the group's relays hold it):");
    for l in &lines {
        println!(
            "  {:>5} → {:<5} {:<34} {:<8} display {:7.2} ms  ack {:7.2} ms",
            l.from,
            l.to,
            format!("{:?}", l.text),
            l.path,
            l.display_ms,
            l.ack_ms
        );
    }
    println!("\nAll steps passed in {:.1} s.", started.elapsed().as_secs_f64());

    drop((alice, bob, carol, phone));
    phone_node.shutdown().await;
    carol_node.shutdown().await;
    alice_node.shutdown().await;
    bob_node.shutdown().await;
    for relay in relays {
        relay.shutdown().await;
    }
    boot.shutdown().await;
    Ok(())
}

fn bob_card_account(card: &str) -> anyhow::Result<String> {
    Ok(tidings_protocol::ContactCard::from_uri(card)?.account.to_base58())
}

/// Retries `f` until it succeeds or `timeout` passes.
pub async fn retry_until<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => bail!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
