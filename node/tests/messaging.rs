//! Messaging between real nodes on loopback: order, exactly-once delivery,
//! discovery through the DHT, restarts.

mod common;

use std::collections::HashSet;

use common::*;
use tidings_node::MessageView;

fn ids(h: &[MessageView]) -> Vec<String> {
    h.iter().map(|m| m.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_100_messages_each_way_in_order_exactly_once() {
    let net = Net::new().await;
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    // Set the conversation up first so that both directions use it.
    a.send_text(&acct(&b), "hello").await.expect("first send");
    eventually("bob sees hello", || b.history(&acct(&a)).unwrap().len() == 1).await;

    let (a2, b2) = (a.clone(), b.clone());
    let (ab, ba) = (acct(&b), acct(&a));
    let sa = tokio::spawn(async move {
        for i in 0..100 {
            a2.send_text(&ab, &format!("a{i}")).await.expect("alice sends");
        }
    });
    let sb = tokio::spawn(async move {
        for i in 0..100 {
            b2.send_text(&ba, &format!("b{i}")).await.expect("bob sends");
        }
    });
    sa.await.unwrap();
    sb.await.unwrap();
    eventually("201 messages on both sides", || {
        a.history(&acct(&b)).unwrap().len() == 201 && b.history(&acct(&a)).unwrap().len() == 201
    })
    .await;
    // Give duplicates, if any, a chance to show up.
    eventually("outboxes drained", || {
        a.store().outbox_len().unwrap() == 0 && b.store().outbox_len().unwrap() == 0
    })
    .await;

    let ha = a.history(&acct(&b)).unwrap();
    let hb = b.history(&acct(&a)).unwrap();
    assert_eq!(ha.len(), 201);
    assert_eq!(hb.len(), 201);
    assert_eq!(ids(&ha).into_iter().collect::<HashSet<_>>().len(), 201, "no duplicates");
    assert_eq!(ids(&ha), ids(&hb), "both sides show the same order");
    for (prefix, outgoing_on_a) in [("a", true), ("b", false)] {
        let texts: Vec<&str> = ha
            .iter()
            .filter(|m| m.outgoing == outgoing_on_a && m.text.starts_with(prefix))
            .map(|m| m.text.as_str())
            .collect();
        let expected: Vec<String> = (0..100).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(texts, expected, "{prefix}'s messages in send order");
    }
    assert!(
        ha.iter()
            .filter(|m| m.outgoing)
            .all(|m| m.state == tidings_store::MessageState::Delivered)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_finds_contact_by_account_key_through_the_dht() {
    let net = Net::new().await;
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    publish(&b).await;
    // Alice knows only bob's account key: no card, no address.
    let added = a.add_contact(&acct(&b), None).await.expect("found in the DHT");
    assert_eq!(added.name, "bob");
    assert_eq!(added.devices, 1);
    let mut rx = b.subscribe();
    let sent = a.send_text(&acct(&b), "found you").await.expect("send");
    let got = tidings_node::demo::wait_message(&mut rx, &sent.id)
        .await
        .expect("bob receives");
    assert_eq!(got.text, "found you");
    assert_eq!(got.sender, acct(&a));
    // Bob learned alice from the conversation itself.
    eventually("bob knows alice", || {
        b.contacts().unwrap().iter().any(|c| c.account == acct(&a))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_survives_restarts_of_both_nodes_and_a_key_update() {
    let net = Net::new().await;
    let (adir, bdir) = (net.dir.path().join("alice"), net.dir.path().join("bob"));
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    a.send_text(&acct(&b), "before restart").await.unwrap();
    eventually("bob got it", || b.history(&acct(&a)).unwrap().len() == 1).await;
    let epoch_before = a
        .conversation_epoch(&acct(&b))
        .await
        .unwrap()
        .expect("has a conversation");
    let (a_acct, b_acct) = (acct(&a), acct(&b));
    drop((a, b));
    a_node.shutdown().await;
    b_node.shutdown().await;

    // Both come back from disk: MLS state is reloaded from the redb provider.
    let a_node = start_at(&adir, "alice", net.boot_addrs.clone()).await;
    let b_node = start_at(&bdir, "bob", net.boot_addrs.clone()).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    assert_eq!(b.history(&a_acct).unwrap().len(), 1);
    let epoch = a.update_keys(&b_acct).await.expect("self-update");
    assert_eq!(epoch, epoch_before + 1);
    a.send_text(&b_acct, "after update").await.unwrap();
    b.send_text(&a_acct, "reply after update").await.unwrap();
    eventually("both see 3 messages", || {
        a.history(&b_acct).unwrap().len() == 3 && b.history(&a_acct).unwrap().len() == 3
    })
    .await;
    assert_eq!(b.conversation_epoch(&a_acct).await.unwrap(), Some(epoch));
}
