//! Offline delivery through community relays: mailboxes, custody receipts,
//! key packages claimed while the recipient is away.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use libp2p::Multiaddr;
use tidings_node::NodeEvent;
use tidings_node::demo::{RelayTestOptions, start_relay_with};
use tidings_protocol::mailbox;
use tidings_protocol::pb;
use tidings_store::MessageState;
use tidings_store::mailbox::MailboxLimits;

/// Alice and bob on every relay of `r`, contacts, and bob holding alice's "hello".
async fn talking(base: &std::path::Path, r: &Relays) -> (tidings_node::Node, tidings_node::Node) {
    let a_node = user(base, "alice", r).await;
    let b_node = user(base, "bob", r).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    a.send_text(&acct(&b), "hello").await.unwrap();
    eventually("bob got hello", || b.history(&acct(&a)).unwrap().len() == 1).await;
    // A delivery bob was slow to answer (over 5 s, under load) also goes to
    // his relays, and "hello" leaves alice's outbox only once that copy is in
    // their custody: wait for that first, or the copy may land after the
    // relays were seen empty. A push drains it at once, bob's next mailbox
    // round (MAILBOX_RECHECK) at the latest. Only then do the tests' counts of what the
    // relays hold start from nothing.
    eventually("hello settled in alice's outbox", || {
        a.store().outbox_len().unwrap() == 0
    })
    .await;
    let wait = 2 * tidings_node::node::MAILBOX_RECHECK + Duration::from_secs(30);
    for relay in &r.nodes {
        let mailboxes = relay.relay_mailboxes().unwrap();
        eventually_within(wait, "bob's relays hold no mail for him", || {
            mailboxes.stats().unwrap().envelopes == 0
        })
        .await;
    }
    (a_node, b_node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_1000_messages_exactly_once_in_order_with_receipts() {
    // The default sender quota is 1,000 envelopes per inbox, and alice may
    // already hold a few in bob's: a copy of something bob also got direct
    // (a delivery he took over 5 s to answer goes to his relays as well) stays
    // until he fetches it. Room for them, so the 1,000 sends all fit.
    let r = relays_with(
        2,
        RelayTestOptions {
            limits: MailboxLimits {
                sender_max_envelopes: 1_100,
                ..MailboxLimits::default()
            },
            ..RelayTestOptions::default()
        },
    )
    .await;
    let base = r.dir.path();
    let (a_node, b_node) = talking(base, &r).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let (a_acct, b_acct) = (acct(&a), acct(&b));
    drop(b);
    b_node.shutdown().await;

    let t0 = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..1000 {
        ids.push(a.send_text(&b_acct, &format!("m{i}")).await.unwrap().id);
    }
    eprintln!("sent in {:?}", t0.elapsed());
    eventually("every message is in a relay's custody", || {
        a.store().outbox_len().unwrap() == 0
    })
    .await;
    eprintln!("in custody after {:?}", t0.elapsed());
    for id in &ids {
        let id: [u8; 16] = hex::decode(id).unwrap().try_into().unwrap();
        let receipts = a.store().receipts(&id).unwrap();
        assert!(!receipts.is_empty(), "a custody receipt for every message");
        for bytes in receipts {
            let receipt = mailbox::verify_receipt(&prost::Message::decode(bytes.as_slice()).unwrap()).unwrap();
            assert_eq!(receipt.inbox_id, mailbox::inbox_id(&b_node_device(&a, &b_acct)));
        }
    }
    let h = a.history(&b_acct).unwrap();
    assert!(
        h.iter()
            .filter(|m| m.outgoing && m.text != "hello")
            .all(|m| m.state == MessageState::Stored)
    );

    let b_node = user(base, "bob", &r).await;
    let b = b_node.handle();
    eventually("bob fetched all 1001", || b.history(&a_acct).unwrap().len() >= 1001).await;
    eprintln!("fetched after {:?}", t0.elapsed());
    let h = b.history(&a_acct).unwrap();
    assert_eq!(h.len(), 1001, "exactly once");
    let texts: Vec<&str> = h[1..].iter().map(|m| m.text.as_str()).collect();
    let expected: Vec<String> = (0..1000).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected, "in order");
    assert_eq!(h.iter().map(|m| &m.id).collect::<HashSet<_>>().len(), 1001);
    drop(r.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_that_drops_accepted_mail_is_caught_by_the_recipient_and_the_mail_still_arrives() {
    let r = relays(2).await;
    let base = r.dir.path();
    let (a_node, b_node) = talking(base, &r).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let (a_acct, b_acct) = (acct(&a), acct(&b));
    let b_peer = b_node.handle().peer_id();
    drop(b);
    b_node.shutdown().await;
    // Once the relays see bob gone, nothing of what follows can reach him
    // before he is back.
    for relay in &r.nodes {
        let h = relay.handle();
        eventually_async("relay saw bob leave", || {
            let h = h.clone();
            async move { !h.is_connected(b_peer).await }
        })
        .await;
    }

    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(a.send_text(&b_acct, &format!("m{i}")).await.unwrap().id);
    }
    eventually("all in custody", || a.store().outbox_len().unwrap() == 0).await;
    // Relay 0 misbehaves: it silently deletes the first three envelopes it
    // accepted (and signed receipts for) before bob comes back.
    let bad = &r.nodes[0];
    let bad_key = bad.handle().card().devices[0].device_key;
    let inbox = mailbox::inbox_id(&b_node_device(&a, &b_acct));
    let dropped_indices: Vec<u64> = ids[..3]
        .iter()
        .map(|id| {
            let id: [u8; 16] = hex::decode(id).unwrap().try_into().unwrap();
            let receipts = a.store().receipts(&id).unwrap();
            receipts
                .iter()
                .map(|b| mailbox::verify_receipt(&prost::Message::decode(b.as_slice()).unwrap()).unwrap())
                .find(|rc| rc.relay_key == bad_key)
                .expect("a receipt from the misbehaving relay")
                .index
        })
        .collect();
    let last_dropped = *dropped_indices.iter().max().unwrap();
    // What it deletes: everything up to the last of them. That is those three,
    // and anything else it still held before them (an envelope deposited twice
    // or a late copy of an earlier message would be; which, was never seen).
    let (held, _) = bad.relay_mailboxes().unwrap().fetch(&inbox, false, 0, 100, 0).unwrap();
    let deleted: Vec<u64> = held.iter().map(|e| e.index).filter(|i| *i <= last_dropped).collect();
    assert!(dropped_indices.iter().all(|i| deleted.contains(i)));
    assert_eq!(
        bad.relay_mailboxes().unwrap().ack(&inbox, false, last_dropped).unwrap(),
        deleted.len() as u64
    );

    let b_node = user(base, "bob", &r).await;
    let b = b_node.handle();
    eventually("bob has every message, through the honest relay", || {
        b.history(&a_acct).unwrap().len() == 11
    })
    .await;
    let texts: Vec<String> = b.history(&a_acct).unwrap()[1..]
        .iter()
        .map(|m| m.text.clone())
        .collect();
    assert_eq!(texts, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // Bob's node noticed which indices the bad relay skipped: exactly the ones
    // it deleted, among them all that alice holds its signed receipts for.
    let status = b.status().await.unwrap();
    let bad_peer = bad.handle().peer_id().to_string();
    let missing: Vec<u64> = status
        .mail_missing
        .iter()
        .inspect(|g| assert_eq!(g.relay, bad_peer, "only the misbehaving relay is blamed"))
        .flat_map(|g| g.from..=g.to)
        .collect();
    assert_eq!(missing, deleted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refusal_reaches_the_sender_and_the_mail_waits_in_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let limits = MailboxLimits {
        sender_max_envelopes: 3,
        ..MailboxLimits::default()
    };
    let relay = start_relay_with(
        &dir.path().join("relay"),
        Vec::new(),
        RelayTestOptions {
            limits,
            ..RelayTestOptions::default()
        },
    )
    .await
    .unwrap();
    let r = Relays {
        addrs: relay.listen_addrs()[..1].to_vec(),
        nodes: vec![relay],
        dir,
    };
    let base = r.dir.path();
    let (a_node, b_node) = talking(base, &r).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let (a_acct, b_acct) = (acct(&a), acct(&b));
    let b_peer = b.peer_id();
    drop(b);
    b_node.shutdown().await;
    let relay = r.nodes[0].handle();
    eventually_async("relay saw bob leave", || {
        let h = relay.clone();
        async move { !h.is_connected(b_peer).await }
    })
    .await;

    let mut events = a.subscribe();
    for i in 0..5 {
        a.send_text(&b_acct, &format!("m{i}")).await.unwrap();
    }
    // The relay holds three from alice, then says why it takes no more.
    let refusal = loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Ok(NodeEvent::DepositRefused(r))) => break r,
            Ok(Ok(_)) => {}
            other => panic!("no refusal event: {other:?}"),
        }
    };
    assert_eq!(refusal.code, "quota_exceeded");
    assert_eq!(refusal.contact, b_acct);
    assert_eq!(refusal.relay, relay.peer_id().to_string());
    let status = a.status().await.unwrap();
    assert!(
        status
            .deposit_refusals
            .iter()
            .any(|r| r.code == "quota_exceeded" && r.contact == b_acct)
    );
    eventually("the three held leave the outbox, the two refused stay", || {
        a.store().outbox_len().unwrap() == 2
    })
    .await;

    // Bob comes back: he drains the three, alice's other two reach him, and
    // the refusal is over.
    let b_node = user(base, "bob", &r).await;
    let b = b_node.handle();
    eventually("bob has all five", || b.history(&a_acct).unwrap().len() == 6).await;
    eventually("outbox empty", || a.store().outbox_len().unwrap() == 0).await;
    eventually_async("refusal cleared", || {
        let a = a.clone();
        async move { a.status().await.unwrap().deposit_refusals.is_empty() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_who_learned_of_us_from_a_welcome_leaves_mail_with_a_capability() {
    let r = relays(1).await;
    let base = r.dir.path();
    let a_node = user(base, "alice", &r).await;
    let b_node = user(base, "bob", &r).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    // Only alice has bob's card; bob learns of alice from her Welcome.
    a.add_contact(&b.card().to_uri(), None).await.unwrap();
    a.send_text(&acct(&b), "hi bob").await.unwrap();
    let a_acct = acct(&a);
    eventually("bob has alice's capability and relays", || {
        b.find_contact(&a_acct)
            .is_ok_and(|c| !c.capabilities.is_empty() && !c.relays.is_empty())
    })
    .await;
    eventually("bob read it", || b.history(&a_acct).unwrap().len() == 1).await;

    let a_peer = a.peer_id();
    drop(a);
    a_node.shutdown().await;
    let relay = r.nodes[0].handle();
    eventually_async("relay saw alice leave", || {
        let h = relay.clone();
        async move { !h.is_connected(a_peer).await }
    })
    .await;
    let reply = b.send_text(&a_acct, "hi alice").await.unwrap();
    eventually("reply in the relay's custody", || b.store().outbox_len().unwrap() == 0).await;
    let id: [u8; 16] = hex::decode(&reply.id).unwrap().try_into().unwrap();
    let receipts = b.store().receipts(&id).unwrap();
    assert!(!receipts.is_empty());
    for bytes in receipts {
        let rc = mailbox::verify_receipt(&prost::Message::decode(bytes.as_slice()).unwrap()).unwrap();
        assert!(!rc.request_inbox, "deposited with a capability, not as first contact");
    }

    let a_node = user(base, "alice", &r).await;
    let a = a_node.handle();
    eventually("alice got the reply", || {
        a.history(&acct(&b))
            .unwrap()
            .iter()
            .any(|m| m.text == "hi alice" && !m.outgoing)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_package_pool_on_the_relay_is_topped_up_after_claims() {
    let r = relays(1).await;
    // Bob tops his pool up on each full mailbox round: every 5 rounds of 2 s here (the default,
    // 5 rounds of 60 s, is longer than this test waits).
    let config = tidings_node::NodeConfig {
        net: tidings_node::NetConfig {
            listen: tidings_node::demo::loopback(),
            bootstrap: vec![r.addrs[0].clone()],
            ..tidings_node::NetConfig::default()
        },
        home_relays: r.addrs.clone(),
        mailbox_poll: std::time::Duration::from_secs(2),
        ..tidings_node::NodeConfig::default()
    };
    let b_node = tidings_node::demo::start_node_with_config(&r.dir.path().join("bob"), "bob", config)
        .await
        .unwrap();
    let b = b_node.handle();
    let owner = b.card().devices[0].device_key;
    let mailboxes = r.nodes[0].relay_mailboxes().unwrap();
    let pool = tidings_node::node::KEY_PACKAGE_POOL;
    eventually("bob's pool is full", || {
        mailboxes.key_packages_held(&owner).unwrap() == pool
    })
    .await;
    // Strangers claim all of it while bob stays online.
    let mut claimed = HashSet::new();
    for _ in 0..pool {
        claimed.insert(mailboxes.claim_key_package(&owner).unwrap().unwrap());
    }
    assert_eq!(claimed.len(), pool, "each one-time package handed out once");
    // Bob tops the pool up when a round finds fewer than half of it left. A round that counted
    // while the claims above were still going can leave it between half and full, so half is
    // what the test can wait for; with no claims after it, the next round fills it.
    eventually("bob filled the pool up again", || {
        mailboxes.key_packages_held(&owner).unwrap() >= pool / 2
    })
    .await;
    // Fresh packages, none of them one handed out before.
    let held = mailboxes.key_packages_held(&owner).unwrap();
    for _ in 0..held {
        let kp = mailboxes.claim_key_package(&owner).unwrap().unwrap();
        assert!(!claimed.contains(&kp));
    }
}

fn b_node_device(a: &tidings_node::NodeHandle, b_acct: &str) -> [u8; 32] {
    let c = a.find_contact(b_acct).unwrap();
    tidings_protocol::DeviceCertificate::from_bytes(&c.devices[0])
        .unwrap()
        .device_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_to_an_offline_person_uses_a_key_package_from_their_relay() {
    let r = relays(1).await;
    let base = r.dir.path();
    let a_node = user(base, "alice", &r).await;
    let b_node = user(base, "bob", &r).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    // Bob's node publishes key packages on his relay; wait until one can be claimed.
    let bob_card = b.card().to_uri();
    let bob_device = b.card().devices[0].device_key;
    let relay = r.nodes[0].handle();
    let _ = relay;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let b_acct = acct(&b);
    drop(b);
    b_node.shutdown().await;

    a.add_contact(&bob_card, None).await.unwrap();
    let sent = a
        .send_text(&b_acct, "you were away")
        .await
        .expect("conversation via relay key package");
    let id: [u8; 16] = hex::decode(&sent.id).unwrap().try_into().unwrap();
    // The send may hand the message back while the set-up still runs (as
    // waiting, on a slow machine); either way the relay ends up holding it.
    eventually("welcome and message in the relay's custody", || {
        a.store().outbox_len().unwrap() == 0 && !a.store().receipts(&id).unwrap().is_empty()
    })
    .await;
    let _ = (bob_device, pb::DeliverStatus::Accepted);

    let b_node = user(base, "bob", &r).await;
    let b = b_node.handle();
    eventually("bob joined and read it", || {
        b.history(&acct(&a))
            .map(|h| h.iter().any(|m| m.text == "you were away"))
            .unwrap_or(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_relay_change_reaches_contacts_and_their_mail_then_waits_on_the_new_relay() {
    let r = relays(2).await;
    let base = r.dir.path();
    let start = |name: &'static str, home: Multiaddr| {
        let boot = vec![r.addrs[0].clone()];
        async move {
            tidings_node::demo::start_node_with_relays(&base.join(name), name, boot, vec![home])
                .await
                .unwrap()
        }
    };
    let a_node = start("alice", r.addrs[0].clone()).await;
    let b_node = start("bob", r.addrs[0].clone()).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    a.send_text(&acct(&b), "hello").await.unwrap();
    eventually("bob got hello", || b.history(&acct(&a)).unwrap().len() == 1).await;

    // Bad lists are refused whole.
    assert!(a.set_home_relays(&["/ip4/127.0.0.1/tcp/1".into()]).await.is_err());
    let nine: Vec<String> = (0..9).map(|_| r.addrs[1].to_string()).collect();
    assert!(a.set_home_relays(&nine).await.is_err());

    let new = r.addrs[1].to_string();
    a.set_home_relays(std::slice::from_ref(&new)).await.unwrap();
    assert_eq!(a.home_relays(), vec![new.clone()]);
    assert_eq!(a.card().relays, vec![new.clone()]);
    let saved = a.store().settings().unwrap();
    assert_eq!(saved.home_relays, Some(vec![new.clone()]));
    assert_eq!(
        saved.retired_relays.len(),
        1,
        "the old relay is still drained for a while"
    );
    assert_eq!(saved.retired_relays[0].0, r.addrs[0].to_string());
    let a_account: [u8; 32] = bs58::decode(acct(&a)).into_vec().unwrap().try_into().unwrap();
    eventually("bob heard of alice's new relay", || {
        b.store().contact(&a_account).unwrap().unwrap().relays == vec![new.clone()]
    })
    .await;

    // Alice goes away: bob's mail for her waits on the new relay, not the old one.
    let a_acct = acct(&a);
    drop(a);
    a_node.shutdown().await;
    let sent = b.send_text(&a_acct, "on the new relay").await.unwrap();
    let id: [u8; 16] = hex::decode(&sent.id).unwrap().try_into().unwrap();
    eventually("in a relay's custody", || {
        b.store().outbox_len().unwrap() == 0 && !b.store().receipts(&id).unwrap().is_empty()
    })
    .await;
    for bytes in b.store().receipts(&id).unwrap() {
        let receipt = mailbox::verify_receipt(&prost::Message::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(
            receipt.relay_key,
            r.nodes[1].handle().card().devices[0].device_key,
            "custody taken by the new relay"
        );
    }
    let a_node = start("alice", r.addrs[1].clone()).await;
    let a = a_node.handle();
    eventually("alice got it from her new relay", || {
        a.history(&acct(&b))
            .unwrap()
            .iter()
            .any(|m| m.text == "on the new relay")
    })
    .await;
    drop(r.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_taken_from_a_mailbox_shows_as_delivered_to_its_sender() {
    let r = relays(1).await;
    let base = r.dir.path();
    let (a_node, b_node) = talking(base, &r).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let b_acct = acct(&b);
    drop(b);
    b_node.shutdown().await;

    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(a.send_text(&b_acct, &format!("away {i}")).await.unwrap().id);
        }
        ids
    };
    let state_of = |id: &str| {
        a.history(&b_acct)
            .unwrap()
            .into_iter()
            .find(|m| m.id == id)
            .map(|m| m.state)
    };
    eventually("stored on the relay", || {
        ids.iter().all(|id| state_of(id) == Some(MessageState::Stored))
    })
    .await;

    // Bob comes back and takes them from his mailbox; he reads nothing, so
    // "delivered" (not "read") is what alice sees.
    let b_node = user(base, "bob", &r).await;
    eventually("delivered", || {
        ids.iter().all(|id| state_of(id) == Some(MessageState::Delivered))
    })
    .await;
    drop(b_node);
    drop(r.nodes);
}
