//! Group chats between real nodes: MLS groups whose commits a relay
//! sequences, with messages deposited once per relay and pushed to members
//! who are online.

mod common;

use std::path::Path;

use common::*;
use libp2p::Multiaddr;
use tidings_node::demo::{loopback, start_node_with_config, start_node_with_relays};
use tidings_node::{NetConfig, Node, NodeConfig, NodeHandle};

fn texts(h: &NodeHandle, group: &str) -> Vec<String> {
    h.group_history(group).unwrap().into_iter().map(|m| m.text).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_people_see_every_group_message_once_in_the_same_order() {
    let n = relays(2).await;
    let base = n.dir.path();
    let nodes = alice_bob_carol(base, &n).await;
    let [a, b, c] = [nodes[0].handle(), nodes[1].handle(), nodes[2].handle()];

    let view = a.create_group("friends", &[&acct(&b), &acct(&c)]).await.unwrap();
    let gid = view.id.clone();
    for h in [&b, &c] {
        wait_joined(h, &gid).await;
    }
    let v = b.group(&gid).await.unwrap();
    assert_eq!(v.name, "friends");
    assert_eq!(v.members.len(), 3);
    assert_eq!(
        v.members
            .iter()
            .find(|m| m.account == acct(&a))
            .map(|m| m.role.as_str()),
        Some("owner")
    );

    let mut expected = Vec::new();
    for round in 0..3 {
        for (who, h) in [("alice", &a), ("bob", &b), ("carol", &c)] {
            let t = format!("{who} {round}");
            h.send_group(&gid, &t).await.unwrap();
            expected.push(t);
        }
    }
    for h in [&a, &b, &c] {
        eventually("all 9 messages", || texts(h, &gid).len() >= 9).await;
    }
    let reference = texts(&a, &gid);
    assert_eq!(reference.len(), 9, "exactly once");
    let mut sorted = reference.clone();
    sorted.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(sorted, want);
    for h in [&b, &c] {
        assert_eq!(texts(h, &gid), reference, "the same order everywhere");
    }
    drop(nodes);
    drop(n.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_added_later_reads_on_and_someone_removed_reads_nothing_more() {
    let n = relays(2).await;
    let base = n.dir.path();
    let nodes = people(base, &n, ["alice", "bob", "carol", "dave"]).await;
    let [a, b, c, d] = nodes.each_ref().map(Node::handle);
    for h in [&b, &c, &d] {
        befriend(&a, h).await;
    }
    let gid = a.create_group("club", &[&acct(&b), &acct(&c)]).await.unwrap().id;
    for h in [&b, &c] {
        wait_joined(h, &gid).await;
    }
    b.send_group(&gid, "before dave").await.unwrap();
    eventually("carol got it", || texts(&c, &gid).len() == 1).await;

    a.invite(&gid, &[&acct(&d)]).await.unwrap();
    wait_joined(&d, &gid).await;
    c.send_group(&gid, "hello dave").await.unwrap();
    eventually("dave reads on", || texts(&d, &gid) == ["hello dave"]).await;

    // Bob writes while alice removes carol: whichever lands first, the message
    // reaches everyone who stays (the removal moves the group to a new inbox).
    let c_acct = acct(&c);
    let (removed, during) = tokio::join!(a.remove_member(&gid, &c_acct), b.send_group(&gid, "during the removal"));
    removed.unwrap();
    during.unwrap();
    for h in [&a, &d] {
        eventually("the message sent during the removal arrives", || {
            texts(h, &gid).contains(&"during the removal".to_string())
        })
        .await;
    }
    eventually_async("carol knows she was removed", || {
        let (c, gid) = (c.clone(), gid.clone());
        async move { c.group(&gid).await.is_ok_and(|g| g.left) }
    })
    .await;
    eventually_async("bob sees three members", || {
        let (b, gid) = (b.clone(), gid.clone());
        async move { b.group(&gid).await.is_ok_and(|g| g.members.len() == 3) }
    })
    .await;
    b.send_group(&gid, "after carol left").await.unwrap();
    eventually("dave got it", || {
        texts(&d, &gid).contains(&"after carol left".to_string())
    })
    .await;
    eventually("alice got it", || {
        texts(&a, &gid).contains(&"after carol left".to_string())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!texts(&c, &gid).contains(&"after carol left".to_string()));
    assert!(c.send_group(&gid, "let me back").await.is_err());
    drop(nodes);
    drop(n.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_offline_across_ten_epochs_catches_up_in_order() {
    let n = relays(2).await;
    let base = n.dir.path();
    let [a_node, b_node, c_node] = alice_bob_carol(base, &n).await;
    let (a, b, c) = (a_node.handle(), b_node.handle(), c_node.handle());
    let gid = a.create_group("travel", &[&acct(&b), &acct(&c)]).await.unwrap().id;
    for h in [&b, &c] {
        wait_joined(h, &gid).await;
    }
    let start_epoch = a.group(&gid).await.unwrap().epoch;
    drop(b);
    b_node.shutdown().await;

    // Ten commits (renames) while bob is away, with messages in every epoch.
    let mut sent = Vec::new();
    for i in 0..10 {
        a.set_group_info(&gid, Some(&format!("travel {i}")), None)
            .await
            .unwrap();
        eventually_async("the rename landed", || {
            let (a, gid) = (a.clone(), gid.clone());
            async move { a.group(&gid).await.is_ok_and(|g| g.epoch == start_epoch + i + 1) }
        })
        .await;
        let sender = if i % 2 == 0 { &a } else { &c };
        let t = format!("epoch {}", start_epoch + i + 1);
        sender.send_group(&gid, &t).await.unwrap();
        sent.push(t);
    }
    let b_node = user(base, "bob", &n).await;
    let b = b_node.handle();
    eventually("bob caught up", || texts(&b, &gid).len() == 10).await;
    let mut got = texts(&b, &gid);
    got.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(got, want);
    let v = b.group(&gid).await.unwrap();
    assert_eq!(v.epoch, start_epoch + 10);
    assert_eq!(v.name, "travel 9");
    drop(n.nodes);
}

/// A raw libp2p client of a relay (a stranger, not a Tidings node).
async fn stranger(relay: &Multiaddr) -> tidings_node::net::Network {
    let config = tidings_node::NetConfig {
        listen: Vec::new(),
        bootstrap: vec![relay.clone()],
        dht_server: false,
        ..tidings_node::NetConfig::default()
    };
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let (net, mut events, _, _task) = tidings_node::net::spawn(keypair, config, tidings_node::Clock::system(), None)
        .await
        .unwrap();
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    net
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_claiming_10000_key_packages_is_rate_limited_and_cannot_stop_an_invite() {
    use tidings_protocol::pb;
    let n = relays(1).await;
    let base = n.dir.path();
    let a_node = user(base, "alice", &n).await;
    let b_node = user(base, "bob", &n).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    let bob_device = b.card().devices[0].device_key;
    let b_acct = acct(&b);
    let mailboxes = n.nodes[0].relay_mailboxes().unwrap();
    eventually("bob's key packages are on the relay", || {
        mailboxes.key_packages_held(&bob_device).unwrap() == tidings_node::node::KEY_PACKAGE_POOL
    })
    .await;
    // Bob goes away: from now on only his relay can hand out his key packages.
    drop(b);
    b_node.shutdown().await;

    let attacker = stranger(&n.addrs[0]).await;
    let relay_peer = n.nodes[0].handle().peer_id();
    let (mut got, mut limited) = (0, 0);
    for _ in 0..10_000 {
        let request = pb::MailboxRequest {
            op: Some(pb::mailbox_request::Op::ClaimKeyPackage(pb::ClaimKeyPackage {
                owner_key: bob_device.to_vec(),
            })),
        };
        match attacker.mailbox(relay_peer, request).await {
            Ok(r) if r.status == pb::MailboxStatus::Ok as i32 => got += 1,
            Ok(r) if r.status == pb::MailboxStatus::RateLimited as i32 => limited += 1,
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    eprintln!("attacker: {got} key packages, {limited} refusals as rate limited");
    assert!(got <= 60, "claims per requester are limited per minute ({got} served)");
    assert_eq!(got + limited, 10_000);
    assert_eq!(
        mailboxes.key_packages_held(&bob_device).unwrap(),
        0,
        "the one-time pool is gone"
    );

    // Alice still adds bob: the relay hands her bob's last-resort package.
    let gid = a.create_group("still works", &[&b_acct]).await.unwrap().id;
    let b_node = user(base, "bob", &n).await;
    let b = b_node.handle();
    wait_joined(&b, &gid).await;
    a.send_group(&gid, "welcome back").await.unwrap();
    eventually("bob reads", || texts(&b, &gid) == ["welcome back"]).await;
    drop(n.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_admins_adding_at_the_same_time_converge_on_one_membership() {
    let n = relays(2).await;
    let base = n.dir.path();
    let nodes = people(base, &n, ["alice", "bob", "carol", "dave"]).await;
    let [a, b, c, d] = nodes.each_ref().map(Node::handle);
    befriend(&a, &b).await;
    befriend(&a, &c).await;
    befriend(&b, &d).await;
    let gid = a.create_group("team", &[&acct(&b)]).await.unwrap().id;
    wait_joined(&b, &gid).await;
    a.set_group_role(&gid, &acct(&b), tidings_protocol::group::Role::Admin)
        .await
        .unwrap();
    eventually_async("bob is an admin", || {
        let (b, gid, me) = (b.clone(), gid.clone(), acct(&b));
        async move {
            b.group(&gid)
                .await
                .is_ok_and(|g| g.members.iter().any(|m| m.account == me && m.role == "admin"))
        }
    })
    .await;
    // Both add someone in the same epoch.
    eventually_async("alice applied her own change too", || {
        let (a, b, gid) = (a.clone(), b.clone(), gid.clone());
        async move { a.group(&gid).await.unwrap().epoch == b.group(&gid).await.unwrap().epoch }
    })
    .await;
    let epoch = a.group(&gid).await.unwrap().epoch;
    let before_race = a.group(&gid).await.unwrap().fingerprint;
    assert_eq!(b.group(&gid).await.unwrap().fingerprint, before_race);
    let (c_acct, d_acct) = (acct(&c), acct(&d));
    let (cs, ds) = ([c_acct.as_str()], [d_acct.as_str()]);
    let (ra, rb) = tokio::join!(a.invite(&gid, &cs), b.invite(&gid, &ds));
    ra.unwrap();
    rb.unwrap();
    // One wins the epoch; the other's add is re-applied on the next. Both land.
    for h in [&a, &b, &c, &d] {
        eventually_async("four members, one epoch", || {
            let (h, gid) = (h.clone(), gid.clone());
            async move {
                h.group(&gid)
                    .await
                    .is_ok_and(|g| !g.left && g.members.len() == 4 && g.epoch == epoch + 2)
            }
        })
        .await;
    }
    // One group state, not two that happen to share an epoch number.
    let mut fingerprints = Vec::new();
    for h in [&a, &b, &c, &d] {
        fingerprints.push(h.group(&gid).await.unwrap().fingerprint);
    }
    assert_eq!(fingerprints[0].len(), 16);
    assert!(fingerprints.iter().all(|f| *f == fingerprints[0]), "{fingerprints:?}");
    assert_ne!(fingerprints[0], before_race, "a new epoch, a new state");
    for (i, h) in [&a, &b, &c, &d].into_iter().enumerate() {
        h.send_group(&gid, &format!("hello from {i}")).await.unwrap();
    }
    for h in [&a, &b, &c, &d] {
        eventually("everyone reads everyone", || texts(h, &gid).len() == 4).await;
    }
    let reference = texts(&a, &gid);
    for h in [&b, &c, &d] {
        assert_eq!(texts(h, &gid), reference);
    }
    drop(nodes);
    drop(n.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_gets_the_history_and_joins_every_group() {
    let n = relays(2).await;
    let base = n.dir.path();
    let [a1_node, b_node] = alice_and_bob(base, &n).await;
    let (a1, b) = (a1_node.handle(), b_node.handle());
    a1.send_text(&acct(&b), "one to one, before linking").await.unwrap();
    let gid = a1.create_group("family", &[&acct(&b)]).await.unwrap().id;
    wait_joined(&b, &gid).await;
    b.send_group(&gid, "before the new device").await.unwrap();
    eventually("alice has it", || texts(&a1, &gid).len() == 1).await;

    // Alice links a second device.
    let code = a1.link_offer().await.unwrap();
    let joined = tidings_node::link::join_account(&base.join("alice2"), &code, &tidings_node::Clock::system(), None)
        .await
        .unwrap();
    assert_eq!(joined.contacts, 1);
    assert!(joined.history >= 2, "history moved over: {}", joined.history);
    // The code is bound to that device now: another one cannot use it.
    let stolen =
        tidings_node::link::join_account(&base.join("mallory"), &code, &tidings_node::Clock::system(), None).await;
    assert!(stolen.is_err());

    let a2_node = user(base, "alice2", &n).await;
    let a2 = a2_node.handle();
    assert_eq!(a2.account(), a1.account());
    assert_eq!(
        texts(&a2, &gid),
        ["before the new device"],
        "the prior history is on the new device"
    );
    assert!(
        a2.history(&acct(&b))
            .unwrap()
            .iter()
            .any(|m| m.text == "one to one, before linking" && m.outgoing)
    );
    wait_joined(&a2, &gid).await;
    eventually_async("bob sees both of alice's devices", || {
        let (b, gid, a) = (b.clone(), gid.clone(), acct(&a1));
        async move {
            b.group(&gid)
                .await
                .is_ok_and(|g| g.members.iter().any(|m| m.account == a && m.devices == 2))
        }
    })
    .await;

    // The one-to-one conversation with bob takes in the new device too.
    eventually("the new device is in the conversation with bob", || {
        a2.find_contact(&acct(&b)).is_ok_and(|c| !c.conversations.is_empty())
    })
    .await;
    let a2_device = hex::encode(a2.card().devices[0].device_key);
    eventually_async("bob's conversation with alice holds her new device", || {
        let (b, a, key) = (b.clone(), acct(&a1), a2_device.clone());
        async move { b.conversation_devices(&a).await.is_ok_and(|d| d.contains(&key)) }
    })
    .await;
    b.send_text(&acct(&a1), "one to one, to both devices").await.unwrap();
    for h in [&a1, &a2] {
        eventually("both devices read bob's direct message", || {
            h.history(&acct(&b))
                .unwrap()
                .iter()
                .any(|m| m.text == "one to one, to both devices")
        })
        .await;
    }
    a2.send_text(&acct(&b), "answered from the new device").await.unwrap();
    eventually("bob reads it as alice's", || {
        b.history(&acct(&a1))
            .unwrap()
            .iter()
            .any(|m| m.text == "answered from the new device" && !m.outgoing)
    })
    .await;
    eventually("alice's first device shows it as hers", || {
        a1.history(&acct(&b))
            .unwrap()
            .iter()
            .any(|m| m.text == "answered from the new device" && m.outgoing)
    })
    .await;

    b.send_group(&gid, "hello, both of you").await.unwrap();
    for h in [&a1, &a2] {
        eventually("both of alice's devices get it", || {
            texts(h, &gid).contains(&"hello, both of you".to_string())
        })
        .await;
    }
    a2.send_group(&gid, "from alice's second device").await.unwrap();
    eventually("bob gets it", || {
        texts(&b, &gid).contains(&"from alice's second device".to_string())
    })
    .await;
    eventually("alice's first device shows it as hers", || {
        a1.group_history(&gid)
            .unwrap()
            .iter()
            .any(|m| m.text == "from alice's second device" && m.outgoing)
    })
    .await;

    // The second device is lost: alice revokes it from her first one.
    let a2_key = hex::encode(a2.card().devices[0].device_key);
    assert_eq!(a1.revoke_device(&a2_key).await.unwrap(), 1);
    eventually_async("the revoked device is out", || {
        let (a2, gid) = (a2.clone(), gid.clone());
        async move { a2.group(&gid).await.is_ok_and(|g| g.left) }
    })
    .await;
    assert_eq!(a1.devices().unwrap().len(), 1);
    eventually_async("bob sees one device of alice's", || {
        let (b, gid, a) = (b.clone(), gid.clone(), acct(&a1));
        async move {
            b.group(&gid)
                .await
                .is_ok_and(|g| g.members.iter().any(|m| m.account == a && m.devices == 1))
        }
    })
    .await;
    // Bob's next direct message goes to alice's remaining device only (the
    // conversation was replaced by one without the revoked device).
    let a1_key = hex::encode(a1.card().devices[0].device_key);
    eventually_async("bob's conversation with alice holds only her first device", || {
        let (b, a, a1_key, a2_key) = (b.clone(), acct(&a1), a1_key.clone(), a2_key.clone());
        async move {
            b.conversation_devices(&a)
                .await
                .is_ok_and(|d| d.contains(&a1_key) && !d.contains(&a2_key))
        }
    })
    .await;
    b.send_group(&gid, "after the revocation").await.unwrap();
    eventually("alice's remaining device gets it", || {
        texts(&a1, &gid).contains(&"after the revocation".to_string())
    })
    .await;
    b.send_text(&acct(&a1), "one to one, after the revocation")
        .await
        .unwrap();
    eventually("alice's remaining device reads the direct message", || {
        a1.history(&acct(&b))
            .unwrap()
            .iter()
            .any(|m| m.text == "one to one, after the revocation")
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!texts(&a2, &gid).contains(&"after the revocation".to_string()));
    assert!(
        !a2.history(&acct(&b))
            .unwrap()
            .iter()
            .any(|m| m.text == "one to one, after the revocation"),
        "the revoked device is out of the one-to-one conversation too"
    );
    drop(n.nodes);
}

/// Alice and bob on the relays of `n`, contacts of each other.
async fn alice_and_bob(base: &Path, n: &Relays) -> [Node; 2] {
    let people = [user(base, "alice", n).await, user(base, "bob", n).await];
    befriend(&people[0].handle(), &people[1].handle()).await;
    people
}

/// Alice, bob and carol on the relays of `n`; alice is a contact of both.
async fn alice_bob_carol(base: &Path, n: &Relays) -> [Node; 3] {
    let nodes = people(base, n, ["alice", "bob", "carol"]).await;
    befriend(&nodes[0].handle(), &nodes[1].handle()).await;
    befriend(&nodes[0].handle(), &nodes[2].handle()).await;
    nodes
}

/// One person per name on the relays of `n`, started in order.
async fn people<const N: usize>(base: &Path, n: &Relays, names: [&str; N]) -> [Node; N] {
    let mut nodes = Vec::with_capacity(N);
    for name in names {
        nodes.push(user(base, name, n).await);
    }
    match nodes.try_into() {
        Ok(nodes) => nodes,
        Err(_) => unreachable!("one node per name"),
    }
}

/// Links a second device to the account of `first`, starts it and returns it.
async fn second_device(base: &Path, name: &str, first: &NodeHandle, n: &Relays) -> Node {
    let code = first.link_offer().await.unwrap();
    tidings_node::link::join_account(&base.join(name), &code, &tidings_node::Clock::system(), None)
        .await
        .unwrap();
    user(base, name, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_people_with_two_devices_each_and_one_added_later_see_every_message_once_in_one_order() {
    let n = relays(2).await;
    let base = n.dir.path();
    let firsts = [
        user(base, "alice", &n).await,
        user(base, "bob", &n).await,
        user(base, "carol", &n).await,
        user(base, "dave", &n).await,
    ];
    let [a1, b1, c1, d1] = [
        firsts[0].handle(),
        firsts[1].handle(),
        firsts[2].handle(),
        firsts[3].handle(),
    ];
    for h in [&b1, &c1, &d1] {
        befriend(&a1, h).await;
    }
    let seconds = [
        second_device(base, "alice2", &a1, &n).await,
        second_device(base, "bob2", &b1, &n).await,
        second_device(base, "carol2", &c1, &n).await,
    ];
    let [a2, b2, c2] = [seconds[0].handle(), seconds[1].handle(), seconds[2].handle()];
    let gid = a1
        .create_group("six devices", &[&acct(&b1), &acct(&c1)])
        .await
        .unwrap()
        .id;
    let six = [&a1, &a2, &b1, &b2, &c1, &c2];
    for h in six {
        eventually_async("every device is in the group", || {
            let (h, gid) = (h.clone(), gid.clone());
            async move {
                h.group(&gid)
                    .await
                    .is_ok_and(|g| !g.left && g.members.iter().all(|m| m.devices == 2))
            }
        })
        .await;
    }
    for (i, h) in six.iter().enumerate() {
        h.send_group(&gid, &format!("first round, device {i}")).await.unwrap();
    }
    for h in six {
        eventually("six messages everywhere", || texts(h, &gid).len() == 6).await;
    }

    // Dave joins later, with one device.
    a1.invite(&gid, &[&acct(&d1)]).await.unwrap();
    wait_joined(&d1, &gid).await;
    let seven = [&a1, &a2, &b1, &b2, &c1, &c2, &d1];
    for h in seven {
        eventually_async("everyone sees dave", || {
            let (h, gid) = (h.clone(), gid.clone());
            async move { h.group(&gid).await.is_ok_and(|g| g.members.len() == 4) }
        })
        .await;
    }
    for (i, h) in seven.iter().enumerate() {
        h.send_group(&gid, &format!("second round, device {i}")).await.unwrap();
    }
    for h in six {
        eventually("thirteen messages on each early device", || texts(h, &gid).len() >= 13).await;
    }
    eventually("seven on dave's", || texts(&d1, &gid).len() >= 7).await;
    let reference = texts(&a1, &gid);
    assert_eq!(reference.len(), 13, "exactly once");
    for h in six {
        assert_eq!(texts(h, &gid), reference, "one order on every device");
    }
    let later: Vec<String> = reference.iter().filter(|t| t.starts_with("second")).cloned().collect();
    assert_eq!(
        texts(&d1, &gid),
        later,
        "dave sees everything from his joining on, in the same order"
    );
    drop((firsts, seconds));
    drop(n.nodes);
}

/// A group moves from two relays to two others by a commit; once every member
/// follows, the old relays go away and the group carries on: messages, the
/// same order everywhere, and a newcomer added through the new sequencer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_moved_to_other_relays_carries_on_when_the_old_ones_are_gone() {
    let mut r = relays(4).await;
    let base = r.dir.path().to_path_buf();
    let (old, new) = (r.addrs[..2].to_vec(), r.addrs[2..].to_vec());
    let boot = vec![r.addrs[3].clone()];
    let person = |name: &'static str, home: Vec<Multiaddr>| {
        let (base, boot) = (base.clone(), boot.clone());
        async move {
            start_node_with_relays(&base.join(name), name, boot, home)
                .await
                .expect("node starts")
        }
    };
    let nodes = [
        person("alice", old.clone()).await,
        person("bob", old.clone()).await,
        person("carol", old.clone()).await,
        person("dave", new.clone()).await,
    ];
    let [a, b, c, d] = [
        nodes[0].handle(),
        nodes[1].handle(),
        nodes[2].handle(),
        nodes[3].handle(),
    ];
    for h in [&b, &c, &d] {
        befriend(&a, h).await;
    }
    let gid = a.create_group("movers", &[&acct(&b), &acct(&c)]).await.unwrap().id;
    assert_eq!(a.group(&gid).await.unwrap().relays.len(), 2);
    for h in [&b, &c] {
        wait_joined(h, &gid).await;
    }
    b.send_group(&gid, "before the move").await.unwrap();
    for h in [&a, &c] {
        eventually("the first message", || texts(h, &gid) == ["before the move"]).await;
    }

    let new_text: Vec<String> = new.iter().map(|a| a.to_string()).collect();
    a.move_group(&gid, new_text.clone()).await.unwrap();
    for h in [&a, &b, &c] {
        eventually_async("every member follows the move", || {
            let (h, gid, want) = (h.clone(), gid.clone(), new_text.clone());
            async move { h.group(&gid).await.is_ok_and(|g| g.relays == want) }
        })
        .await;
    }
    for old_relay in r.nodes.drain(..2) {
        old_relay.shutdown().await;
    }

    c.send_group(&gid, "carol after the move").await.unwrap();
    b.send_group(&gid, "bob after the move").await.unwrap();
    for h in [&a, &b, &c] {
        eventually("both messages after the move", || texts(h, &gid).len() >= 3).await;
    }
    a.invite(&gid, &[&acct(&d)]).await.unwrap();
    wait_joined(&d, &gid).await;
    b.send_group(&gid, "hello dave").await.unwrap();
    eventually("dave reads on", || texts(&d, &gid) == ["hello dave"]).await;
    for h in [&a, &c] {
        eventually("everyone got the last message", || texts(h, &gid).len() == 4).await;
    }
    let reference = texts(&a, &gid);
    assert_eq!(reference[0], "before the move");
    for h in [&b, &c] {
        assert_eq!(texts(h, &gid), reference, "the same order everywhere");
    }
    let mut after: Vec<String> = reference[1..3].to_vec();
    after.sort();
    assert_eq!(after, ["bob after the move", "carol after the move"]);
    // A move that would keep the inbox on other relays, or go nowhere, is refused.
    assert!(
        b.move_group(&gid, new_text.clone()).await.is_err(),
        "members do not move groups"
    );
    assert!(a.move_group(&gid, Vec::new()).await.is_err());
    drop(nodes);
    drop(r.nodes);
}

/// A device renews its leaf keys in every group on a schedule (post-compromise
/// security) without anyone asking: here bob's interval is two seconds, and
/// the group's epoch moves on by his self-updates alone while messages keep
/// flowing both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_renews_its_group_keys_on_schedule_and_the_group_carries_on() {
    let r = relays(2).await;
    let base = r.dir.path();
    let a_node = user(base, "alice", &r).await;
    let config = NodeConfig {
        net: NetConfig {
            listen: loopback(),
            bootstrap: vec![r.addrs[0].clone()],
            ..NetConfig::default()
        },
        home_relays: r.addrs.clone(),
        key_update_interval: std::time::Duration::from_secs(2),
        ..NodeConfig::default()
    };
    let b_node = start_node_with_config(&base.join("bob"), "bob", config).await.unwrap();
    let c_node = user(base, "carol", &r).await;
    let [a, b, c] = [a_node.handle(), b_node.handle(), c_node.handle()];
    befriend(&a, &b).await;
    befriend(&a, &c).await;
    let gid = a.create_group("fresh keys", &[&acct(&b), &acct(&c)]).await.unwrap().id;
    for h in [&b, &c] {
        wait_joined(h, &gid).await;
    }
    let start = a.group(&gid).await.unwrap().epoch;
    for h in [&a, &c] {
        eventually_async("two self-updates of bob's reach everyone", || {
            let (h, gid) = (h.clone(), gid.clone());
            async move { h.group(&gid).await.is_ok_and(|g| g.epoch >= start + 2) }
        })
        .await;
    }
    a.send_group(&gid, "still here").await.unwrap();
    c.send_group(&gid, "me too").await.unwrap();
    b.send_group(&gid, "with new keys").await.unwrap();
    for h in [&a, &b, &c] {
        eventually("three messages after the updates", || texts(h, &gid).len() >= 3).await;
    }
    let reference = texts(&a, &gid);
    assert_eq!(reference.len(), 3);
    for h in [&b, &c] {
        assert_eq!(texts(h, &gid), reference, "the same order everywhere");
    }
    assert_eq!(
        a.group(&gid).await.unwrap().members.len(),
        3,
        "the updates changed nobody's membership"
    );
    drop((a_node, b_node, c_node));
    drop(r.nodes);
}

/// Both people link a new device at the same moment: each side adds its new
/// device to their one-to-one conversation by a commit in the same epoch.
/// The conversation must not end up split: afterwards every device of both
/// reads what any device of the other sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_people_linking_a_device_at_once_leaves_their_conversation_whole() {
    let n = relays(2).await;
    let base = n.dir.path();
    let [a1_node, b1_node] = alice_and_bob(base, &n).await;
    let (a1, b1) = (a1_node.handle(), b1_node.handle());
    a1.send_text(&acct(&b1), "before").await.unwrap();
    eventually("bob has it", || b1.history(&acct(&a1)).unwrap().len() == 1).await;

    let (a_code, b_code) = (a1.link_offer().await.unwrap(), b1.link_offer().await.unwrap());
    let clock = tidings_node::Clock::system();
    let (a2_dir, b2_dir) = (base.join("alice2"), base.join("bob2"));
    let (a_join, b_join) = tokio::join!(
        tidings_node::link::join_account(&a2_dir, &a_code, &clock, None),
        tidings_node::link::join_account(&b2_dir, &b_code, &clock, None),
    );
    a_join.unwrap();
    b_join.unwrap();
    let (a2_node, b2_node) = tokio::join!(user(base, "alice2", &n), user(base, "bob2", &n));
    let (a2, b2) = (a2_node.handle(), b2_node.handle());

    // Each side replaces the conversation by one holding its new device; until
    // both have moved over, a message may miss a new device. Probe until one
    // reaches all four.
    let reads = |reader: &NodeHandle, text: &str| {
        let other = if reader.account() == a1.account() { &b1 } else { &a1 };
        reader.history(&acct(other)).unwrap().iter().any(|m| m.text == text)
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    for probe in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the conversation never became whole"
        );
        let text = format!("probe {probe}");
        a1.send_text(&acct(&b1), &text).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        if [&a2, &b1, &b2].iter().all(|h| reads(h, &text)) {
            break;
        }
    }
    // From then on every message from any device reaches every device of both.
    let everyone = [(&a1, &b1), (&a2, &b1), (&b1, &a1), (&b2, &a1)];
    for (round, (from, to)) in everyone.iter().enumerate() {
        let text = format!("after {round}");
        from.send_text(&acct(to), &text).await.unwrap();
        for reader in [&a1, &a2, &b1, &b2] {
            eventually("every device of both reads it", || reads(reader, &text)).await;
        }
    }
    drop((a1_node, a2_node, b1_node, b2_node));
    drop(n.nodes);
}

/// Bob, with two devices, leaves a group of three people: his proposals
/// remove both devices once another member commits them, both of his devices
/// show the group as left, the others carry on without him, and the owner
/// cannot leave without handing the group over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_with_two_devices_leaves_and_both_devices_are_out() {
    let n = relays(2).await;
    let base = n.dir.path();
    let [a_node, b1_node, c_node] = alice_bob_carol(base, &n).await;
    let (a, b1, c) = (a_node.handle(), b1_node.handle(), c_node.handle());
    let b2_node = second_device(base, "bob2", &b1, &n).await;
    let b2 = b2_node.handle();
    let gid = a.create_group("book club", &[&acct(&b1), &acct(&c)]).await.unwrap().id;
    for h in [&b1, &b2, &c] {
        wait_joined(h, &gid).await;
    }
    eventually_async("both of bob's devices are members", || {
        let (a, gid, b) = (a.clone(), gid.clone(), acct(&b1));
        async move {
            a.group(&gid)
                .await
                .is_ok_and(|g| g.members.iter().any(|m| m.account == b && m.devices == 2))
        }
    })
    .await;
    assert!(
        a.leave_group(&gid).await.is_err(),
        "the owner hands the group over first"
    );

    b2.leave_group(&gid).await.unwrap();
    for h in [&b1, &b2] {
        eventually_async("bob's device shows the group as left", || {
            let (h, gid) = (h.clone(), gid.clone());
            async move { h.group(&gid).await.is_ok_and(|g| g.left) }
        })
        .await;
    }
    for h in [&a, &c] {
        eventually_async("the others see two members", || {
            let (h, gid) = (h.clone(), gid.clone());
            async move { h.group(&gid).await.is_ok_and(|g| g.members.len() == 2 && !g.left) }
        })
        .await;
    }
    c.send_group(&gid, "after bob left").await.unwrap();
    eventually("alice reads it", || texts(&a, &gid) == ["after bob left"]).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for h in [&b1, &b2] {
        assert!(texts(h, &gid).is_empty(), "bob reads nothing after leaving");
        assert!(h.send_group(&gid, "still here?").await.is_err());
    }
    drop((a_node, b1_node, b2_node, c_node));
    drop(n.nodes);
}
