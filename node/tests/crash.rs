//! Faults with real processes: a receiver killed with SIGKILL loses nothing
//! and nothing arrives twice; a receiver that stops answering (SIGSTOP) does
//! not hold its mail back from its relays.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::process::*;
use common::*;
use tidings_node::NetConfig;
use tidings_node::demo::{loopback, start_node_with_net};
use tidings_store::MessageState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_receiver_gets_all_queued_messages_exactly_once_after_restart() {
    let net = Net::new().await;
    let boot = net.boot_addrs[0].to_string();
    let a_node = net.node("alice").await;
    let a = a_node.handle();

    let bdir = net.dir.path().join("bob");
    init(&bdir, "bob").await;
    let mut bob = spawn_node(&bdir, &boot).await;
    let api = Api::new(&bdir);
    let card = api.befriend(&a.card().to_uri()).await;
    a.add_contact(&card.uri, None).await.unwrap();

    for i in 0..5 {
        a.send_text(&card.account, &format!("early {i}")).await.unwrap();
    }
    eventually("early messages acknowledged", || a.store().outbox_len().unwrap() == 0).await;
    let before = api.history(&acct(&a)).await;
    assert_eq!(before.len(), 5);

    // Queue 50 messages and kill bob with SIGKILL while they are in flight.
    for i in 0..50 {
        a.send_text(&card.account, &format!("queued {i}")).await.unwrap();
        if i == 10 {
            bob.start_kill().expect("SIGKILL");
        }
    }
    bob.wait().await.unwrap();
    assert!(a.store().outbox_len().unwrap() > 0, "some messages are still queued");

    let _bob = spawn_node(&bdir, &boot).await;
    let api = Api::new(&bdir);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let history = loop {
        let h = api.history(&acct(&a)).await;
        if h.len() >= 55 && a.store().outbox_len().unwrap() == 0 {
            break h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 55 messages arrived",
            h.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(history.len(), 55, "exactly once");
    assert_eq!(history[..5], before[..], "history from before the kill is intact");
    let unique: HashSet<_> = history.iter().map(|m| m.id.clone()).collect();
    assert_eq!(unique.len(), 55);
    let queued: Vec<String> = history[5..].iter().map(|m| m.text.clone()).collect();
    let expected: Vec<String> = (0..50).map(|i| format!("queued {i}")).collect();
    assert_eq!(queued, expected, "in order");
}

/// A device that stops answering while its connection stays open (a laptop
/// put to sleep, here a process stopped with SIGSTOP) must not hold its mail
/// back: the sender gives up on the silent connection after a few seconds —
/// far sooner than its request timeout, here set to five minutes so that
/// waiting for it would fail the test — and every later batch goes straight
/// to the relays until the device connects anew. When the device wakes up, it
/// has everything exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_for_a_device_that_stopped_answering_goes_to_its_relays_without_waiting_for_timeouts() {
    let r = relays(2).await;
    let base = r.dir.path();
    let patient = NetConfig {
        listen: loopback(),
        bootstrap: vec![r.addrs[0].clone()],
        request_timeout: Duration::from_secs(300),
        ..NetConfig::default()
    };
    let a_node = start_node_with_net(&base.join("alice"), "alice", patient, r.addrs.clone())
        .await
        .unwrap();
    let a = a_node.handle();

    let bdir = base.join("bob");
    init(&bdir, "bob").await;
    let mut bob = spawn_node_with(&bdir, &r.addrs[0].to_string(), &r.addrs).await;
    let api = Api::new(&bdir);
    let card = api.befriend(&a.card().to_uri()).await;
    a.add_contact(&card.uri, None).await.unwrap();
    // Ping until a message goes over a direct connection (the first ones may
    // go through the relays while alice dials bob).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut pings = 0;
    loop {
        let ping = a.send_text(&card.account, &format!("ping {pings}")).await.unwrap();
        pings += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let h = a.history(&card.account).unwrap();
        if h.iter().any(|m| m.id == ping.id && m.state == MessageState::Delivered) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no direct connection to bob");
    }
    eventually_async("bob got the pings", || async {
        api.history(&acct(&a)).await.len() == pings
    })
    .await;

    signal(&bob, "-STOP").await;
    let t0 = std::time::Instant::now();
    for i in 0..100 {
        a.send_text(&card.account, &format!("asleep {i}")).await.unwrap();
    }
    // The sender's patience with a silent connection is 5 s; without it the
    // mail would wait for libp2p's ping to fail (20 s) or the request timeout.
    let custody = tokio::time::timeout(
        Duration::from_secs(15),
        eventually("every message is in a relay's custody", || {
            a.store().outbox_len().unwrap() == 0
        }),
    )
    .await;
    assert!(custody.is_ok(), "mail for a silent device waited on its connection");
    eprintln!("in custody after {:?}", t0.elapsed());
    let h = a.history(&card.account).unwrap();
    assert!(
        h[pings..].iter().all(|m| m.state == MessageState::Stored),
        "all went to relays"
    );

    signal(&bob, "-CONT").await;
    eventually_async("bob woke up to everything", || async {
        api.history(&acct(&a)).await.len() >= pings + 100
    })
    .await;
    // Anything that was also on its way directly must not show twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let history = api.history(&acct(&a)).await;
    assert_eq!(history.len(), pings + 100, "exactly once");
    let texts: Vec<String> = history[pings..].iter().map(|m| m.text.clone()).collect();
    let expected: Vec<String> = (0..100).map(|i| format!("asleep {i}")).collect();
    assert_eq!(texts, expected, "in order");
    bob.start_kill().expect("SIGKILL");
    drop(r.nodes);
}
