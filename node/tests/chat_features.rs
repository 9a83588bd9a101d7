//! Chat features end to end between real nodes on loopback (real redb, real
//! openmls): replies, reactions, edits, deletes for everyone, read receipts,
//! typing, presence, profiles and disappearing messages.

mod common;

use std::time::Duration;

use common::*;
use tidings_node::{MessageView, NodeEvent, NodeHandle};
use tidings_protocol::payload::Body;
use tidings_store::MessageState;

async fn wait_left(h: &NodeHandle, group: &str) {
    eventually_async("left the group", || {
        let (h, group) = (h.clone(), group.to_owned());
        async move { h.group(&group).await.is_ok_and(|g| g.left) }
    })
    .await;
}

fn chat_of(h: &NodeHandle) -> String {
    format!("c:{}", acct(h))
}

async fn page(h: &NodeHandle, chat: &str) -> Vec<MessageView> {
    h.chat_messages(chat, None, 1000).await.expect("page")
}

async fn find(h: &NodeHandle, chat: &str, id: &str) -> Option<MessageView> {
    page(h, chat).await.into_iter().find(|m| m.id == id)
}

/// Waits until `f` holds for message `id` in `chat` on `h`.
async fn until(h: &NodeHandle, chat: &str, id: &str, what: &str, f: impl Fn(&MessageView) -> bool) -> MessageView {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(m) = find(h, chat, id).await
            && f(&m)
        {
            return m;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Alice and bob, contacts of each other, with a conversation and one
/// message from alice that bob has.
async fn alice_and_bob(net: &Net) -> (tidings_node::Node, tidings_node::Node, String) {
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    let hello = a.send_chat(&chat_of(&b), "hello bob", None).await.expect("send");
    until(&b, &chat_of(&a), &hello.id, "bob has hello", |_| true).await;
    (a_node, b_node, hello.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_reaction_edit_and_delete_show_on_both_sides() {
    let net = Net::new().await;
    let (a_node, b_node, hello) = alice_and_bob(&net).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let (ca, cb) = (chat_of(&a), chat_of(&b));

    // Reply: the quote travels with the message.
    let reply = b.send_chat(&ca, "hi alice", Some(&hello)).await.unwrap();
    let got = until(&a, &cb, &reply.id, "alice has the reply", |_| true).await;
    let quote = got.reply_to.expect("a quote");
    assert_eq!((quote.id.as_str(), quote.text.as_str()), (hello.as_str(), "hello bob"));
    assert_eq!(quote.sender, acct(&a));
    assert_eq!(got.chat, cb);
    assert_eq!(got.sender_name, "bob");

    // Reactions: one per account; a new one replaces the old; empty removes.
    b.react(&ca, &hello, "\u{1f44d}").await.unwrap();
    until(&a, &cb, &hello, "alice sees bob's thumbs up", |m| {
        m.reactions.len() == 1 && m.reactions[0].emoji == "\u{1f44d}" && m.reactions[0].accounts == [acct(&b)]
    })
    .await;
    b.react(&ca, &hello, "\u{2764}\u{fe0f}").await.unwrap();
    a.react(&cb, &hello, "\u{2764}\u{fe0f}").await.unwrap();
    for (h, chat) in [(&a, &cb), (&b, &ca)] {
        until(h, chat, &hello, "one heart from each, no thumbs up", |m| {
            m.reactions.len() == 1 && m.reactions[0].emoji == "\u{2764}\u{fe0f}" && m.reactions[0].accounts.len() == 2
        })
        .await;
    }
    b.react(&ca, &hello, "").await.unwrap();
    until(&a, &cb, &hello, "bob's reaction removed", |m| {
        m.reactions.len() == 1 && m.reactions[0].accounts == [acct(&a)]
    })
    .await;
    assert!(
        b.react(&ca, &hello, "no words please").await.is_err(),
        "a reaction is emoji"
    );

    // Edit: only the sender's own messages.
    let edited = a.edit_message(&cb, &hello, "hello bob, edited").await.unwrap();
    assert!(edited.edited_ms.is_some());
    until(&b, &ca, &hello, "bob sees the edit", |m| {
        m.text == "hello bob, edited" && m.edited_ms.is_some()
    })
    .await;
    let refused = b.edit_message(&ca, &hello, "bob rewrites alice").await;
    assert!(
        matches!(refused, Err(tidings_node::NodeError::NotAllowed(_))),
        "{refused:?}"
    );

    // Delete for everyone: text and reactions gone on both sides.
    a.delete_message(&cb, &hello).await.unwrap();
    let gone = until(&b, &ca, &hello, "bob sees the delete", |m| m.deleted).await;
    assert_eq!(gone.text, "");
    assert!(gone.reactions.is_empty());
    assert!(
        a.search("edited", 10).unwrap().is_empty(),
        "a deleted text is not found"
    );
    assert!(b.search("edited", 10).unwrap().is_empty());
    // An edit of a deleted message is refused.
    assert!(a.edit_message(&cb, &hello, "back again").await.is_err());
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_deletes_of_someone_elses_message_are_ignored_by_receivers() {
    let net = Net::new().await;
    let (a_node, b_node, hello) = alice_and_bob(&net).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let (ca, cb) = (chat_of(&a), chat_of(&b));
    let target: [u8; 16] = hex::decode(&hello).unwrap().try_into().unwrap();
    // Bob's node sends what a hostile client could: an edit and a delete of alice's message.
    b.send_raw_control(
        &ca,
        Body::Edit {
            target,
            text: "forged".into(),
        },
    )
    .await
    .unwrap();
    b.send_raw_control(&ca, Body::Delete { target }).await.unwrap();
    // Then something alice does apply, to know the forgeries arrived before it.
    let marker = b.send_chat(&ca, "after the forgeries", None).await.unwrap();
    until(&a, &cb, &marker.id, "alice has the marker", |_| true).await;
    let m = find(&a, &cb, &hello).await.unwrap();
    assert_eq!(m.text, "hello bob");
    assert!(!m.deleted && m.edited_ms.is_none());
    // A reaction to a message alice never had changes nothing and breaks nothing.
    b.send_raw_control(
        &ca,
        Body::Reaction {
            target: [9; 16],
            emoji: "\u{1f600}".into(),
        },
    )
    .await
    .unwrap();
    let after = b.send_chat(&ca, "still fine", None).await.unwrap();
    until(&a, &cb, &after.id, "alice still receives", |_| true).await;
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_mark_messages_read_and_none_are_sent_when_turned_off() {
    let net = Net::new().await;
    let (a_node, b_node, hello) = alice_and_bob(&net).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let (ca, cb) = (chat_of(&a), chat_of(&b));
    assert_eq!(b.chat(&ca).await.unwrap().unread, 1);
    until(&a, &cb, &hello, "delivered", |m| m.state == MessageState::Delivered).await;
    b.mark_read(&ca, &hello).await.unwrap();
    assert_eq!(b.chat(&ca).await.unwrap().unread, 0);
    until(&a, &cb, &hello, "alice sees it read", |m| m.state == MessageState::Read).await;

    // Read receipts off: bob reads, alice's message stays delivered.
    b.change_settings(None, None, Some(false), None).await.unwrap();
    let second = a.send_chat(&cb, "second", None).await.unwrap();
    until(&b, &ca, &second.id, "bob has it", |_| true).await;
    until(&a, &cb, &second.id, "delivered", |m| m.state == MessageState::Delivered).await;
    b.mark_read(&ca, &second.id).await.unwrap();
    assert_eq!(b.chat(&ca).await.unwrap().unread, 0, "read locally all the same");
    // A later message from bob shows that anything bob sent before it arrived.
    let marker = b.send_chat(&ca, "marker", None).await.unwrap();
    until(&a, &cb, &marker.id, "alice has the marker", |_| true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        find(&a, &cb, &second.id).await.unwrap().state,
        MessageState::Delivered,
        "no read receipt was sent"
    );
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_other_side_as_an_event_and_is_not_stored() {
    let net = Net::new().await;
    let (a_node, b_node, _) = alice_and_bob(&net).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let mut events = b.subscribe();
    let rows_before = b.store().message_count().unwrap();
    // What alice queued before (her first message, its controls) leaves the outbox first, so
    // that the check below is about the typing indicator alone.
    tokio::time::timeout(TIMEOUT, async {
        while a.store().outbox_len().unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
    .expect("alice's outbox empties");
    a.typing(&chat_of(&b)).await.unwrap();
    let got = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Ok(NodeEvent::Typing { chat, account }) = events.recv().await {
                return (chat, account);
            }
        }
    })
    .await
    .expect("a typing event");
    assert_eq!(got, (chat_of(&a), acct(&a)));
    assert_eq!(b.store().message_count().unwrap(), rows_before);
    assert_eq!(a.store().outbox_len().unwrap(), 0, "typing is never queued for retry");
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_seen_only_when_both_sides_share_it() {
    let net = Net::new().await;
    let (a_node, b_node, _) = alice_and_bob(&net).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    // Alice shares, bob does not: bob learns nothing.
    a.change_settings(None, None, None, Some(true)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b.presence().unwrap().is_empty());
    // Bob shares too: his announcement reaches alice, who shares.
    let mut events = a.subscribe();
    b.change_settings(None, None, None, Some(true)).await.unwrap();
    let seen = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Ok(NodeEvent::Presence(p)) = events.recv().await {
                return p;
            }
        }
    })
    .await
    .expect("a presence event");
    assert_eq!(seen.account, acct(&b));
    assert!(seen.online);
    eventually("alice lists bob as online", || {
        a.presence().unwrap().iter().any(|p| p.account == acct(&b) && p.online)
    })
    .await;
    // Alice stops sharing: she sees nobody.
    a.change_settings(None, None, None, Some(false)).await.unwrap();
    assert!(a.presence().unwrap().is_empty());
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_profile_name_and_picture_reach_contacts() {
    let net = Net::new().await;
    let (a_node, b_node, _) = alice_and_bob(&net).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let png = "data:image/png;base64,iVBORw0KGgo=";
    let s = a
        .change_settings(Some("Alice A."), Some(png), None, None)
        .await
        .unwrap();
    assert_eq!((s.name.as_str(), s.picture.as_deref()), ("Alice A.", Some(png)));
    eventually("bob knows alice's new name", || {
        b.contacts().unwrap().iter().any(|c| c.name == "Alice A.")
    })
    .await;
    let pic = b.store().picture(a.account().as_bytes()).unwrap().expect("picture");
    assert_eq!(pic.0, "image/png");
    // Too large or not an image: refused before anything is sent.
    let big = format!("data:image/png;base64,{}", "A".repeat(300 * 1024));
    assert!(a.change_settings(None, Some(&big), None, None).await.is_err());
    assert!(
        a.change_settings(None, Some("data:text/html;base64,PHA+"), None, None)
            .await
            .is_err()
    );
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disappearing_messages_vanish_from_both_stores_and_search_after_the_timer() {
    let net = Net::new().await;
    let (a_node, b_node, hello) = alice_and_bob(&net).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let (ca, cb) = (chat_of(&a), chat_of(&b));
    let view = a.change_chat(&cb, None, None, Some(1)).await.unwrap();
    assert_eq!(view.disappearing_secs, 1);
    eventually_async("bob's chat has the timer", || {
        let b = b.clone();
        let ca = ca.clone();
        async move { b.chat(&ca).await.is_ok_and(|c| c.disappearing_secs == 1) }
    })
    .await;
    let mut a_events = a.subscribe();
    let mut b_events = b.subscribe();
    let secret = a.send_chat(&cb, "ephemeral secret", None).await.unwrap();
    assert!(secret.expires_ms.is_some());
    let on_b = until(&b, &ca, &secret.id, "bob has it", |_| true).await;
    assert!(on_b.expires_ms.is_some(), "bob's copy disappears too");
    // Gone from both stores, their pages, and search.
    for (h, chat) in [(&a, &cb), (&b, &ca)] {
        eventually_async("the message vanished", || {
            let (h, chat, id) = (h.clone(), chat.clone(), secret.id.clone());
            async move { find(&h, &chat, &id).await.is_none() }
        })
        .await;
        assert!(h.search("ephemeral", 10).unwrap().is_empty());
        assert!(
            h.message_view(&hex::decode(&secret.id).unwrap().try_into().unwrap())
                .unwrap()
                .is_none()
        );
        // The message from before the timer stays.
        assert!(find(h, chat, &hello).await.is_some());
    }
    for events in [&mut a_events, &mut b_events] {
        let removed = tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Ok(NodeEvent::MessageRemoved { id, .. }) = events.recv().await {
                    return id;
                }
            }
        })
        .await
        .expect("a message_removed event");
        assert_eq!(removed, secret.id);
    }
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_payloads_come_back_as_exactly_the_text_sent() {
    let net = Net::new().await;
    let (a_node, b_node, _) = alice_and_bob(&net).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    for text in ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"] {
        let sent = a.send_chat(&chat_of(&b), text, None).await.unwrap();
        let got = until(&b, &chat_of(&a), &sent.id, "bob has it", |_| true).await;
        assert_eq!(got.text, text);
    }
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_group_replies_reactions_typing_edits_and_timers_reach_everyone_read_needs_every_member_and_one_who_left_still_reads()
 {
    let n = relays(2).await;
    let base = n.dir.path();
    let nodes = [
        user(base, "alice", &n).await,
        user(base, "bob", &n).await,
        user(base, "carol", &n).await,
    ];
    let [a, b, c] = [nodes[0].handle(), nodes[1].handle(), nodes[2].handle()];
    for h in [&b, &c] {
        befriend(&a, h).await;
    }
    let gid = a.create_group("club", &[&acct(&b), &acct(&c)]).await.unwrap().id;
    for h in [&b, &c] {
        wait_joined(h, &gid).await;
    }
    let chat = format!("g:{gid}");
    let first = a.send_chat(&chat, "welcome all", None).await.unwrap();
    assert_eq!(first.chat, chat);
    for h in [&b, &c] {
        until(h, &chat, &first.id, "the member has it", |_| true).await;
    }
    // A reply and a reaction from bob reach carol and alice.
    let reply = b.send_chat(&chat, "thanks", Some(&first.id)).await.unwrap();
    b.react(&chat, &first.id, "\u{1f389}").await.unwrap();
    for h in [&a, &c] {
        let m = until(h, &chat, &reply.id, "the reply", |_| true).await;
        assert_eq!(m.reply_to.map(|q| q.text), Some("welcome all".to_owned()));
        until(h, &chat, &first.id, "bob's reaction", |m| {
            m.reactions.iter().any(|r| r.accounts == [acct(&b)])
        })
        .await;
    }
    // Typing in a group reaches the members connected now.
    let mut a_events = a.subscribe();
    c.typing(&chat).await.unwrap();
    let typing = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Ok(NodeEvent::Typing { chat, account }) = a_events.recv().await {
                return (chat, account);
            }
        }
    })
    .await
    .expect("a typing event");
    assert_eq!(typing, (chat.clone(), acct(&c)));
    // Alice's edit reaches both.
    a.edit_message(&chat, &first.id, "welcome, all").await.unwrap();
    for h in [&b, &c] {
        until(h, &chat, &first.id, "the edit", |m| m.text == "welcome, all").await;
    }
    // Read: bob alone is not enough; carol too, and it is read.
    b.mark_read(&chat, &first.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = find(&a, &chat, &first.id).await.unwrap();
    assert_ne!(m.state, MessageState::Read, "one of two readers");
    c.mark_read(&chat, &first.id).await.unwrap();
    until(&a, &chat, &first.id, "read by every member", |m| {
        m.state == MessageState::Read
    })
    .await;
    // A timer set by carol applies to every member's copies.
    c.change_chat(&chat, None, None, Some(1)).await.unwrap();
    for h in [&a, &b] {
        eventually_async("the member has the timer", || {
            let (h, chat) = (h.clone(), chat.clone());
            async move { h.chat(&chat).await.is_ok_and(|v| v.disappearing_secs == 1) }
        })
        .await;
    }
    let mut subs = [a.subscribe(), b.subscribe(), c.subscribe()];
    let gone = a.send_chat(&chat, "short lived", None).await.unwrap();
    for (h, events) in [&a, &b, &c].into_iter().zip(subs.iter_mut()) {
        // Each member stored it (a removal follows only a stored row) and removed it.
        let removed = tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Ok(NodeEvent::MessageRemoved { id, chat: c }) = events.recv().await
                    && id == gone.id
                {
                    return c;
                }
            }
        })
        .await
        .expect("the message came and went");
        assert_eq!(removed, chat);
        assert!(find(h, &chat, &gone.id).await.is_none());
        assert!(h.search("short", 5).unwrap().is_empty());
    }
    // Someone who left can still read what is there: no receipt, no error.
    b.change_chat(&chat, None, None, Some(0)).await.unwrap();
    let bye = b.send_chat(&chat, "bye for now", None).await.unwrap();
    until(&c, &chat, &bye.id, "carol has it", |m| m.expires_ms.is_none()).await;
    c.leave_group(&gid).await.unwrap();
    wait_left(&c, &gid).await;
    assert!(c.chat(&chat).await.unwrap().unread > 0);
    c.mark_read(&chat, &bye.id).await.unwrap();
    assert_eq!(c.chat(&chat).await.unwrap().unread, 0);
    drop(nodes);
    drop(n.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaction_and_an_edit_that_overtake_their_message_apply_once_it_arrives() {
    let net = Net::new().await;
    let (a_node, b_node, _) = alice_and_bob(&net).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let (ca, cb) = (chat_of(&a), chat_of(&b));
    let target = [0x5a; 16];
    // Bob's reaction and edit name a message alice does not have yet...
    b.send_raw_control(
        &ca,
        Body::Reaction {
            target,
            emoji: "\u{1f44b}".into(),
        },
    )
    .await
    .unwrap();
    b.send_raw_control(
        &ca,
        Body::Edit {
            target,
            text: "late but edited".into(),
        },
    )
    .await
    .unwrap();
    // ...which then arrives.
    b.send_raw_payload(
        &ca,
        Some(target),
        Body::Text {
            text: "the original".into(),
            reply_to: None,
            expires_secs: 0,
        },
    )
    .await
    .unwrap();
    let id = hex::encode(target);
    let m = until(&a, &cb, &id, "the message with what waited for it", |m| {
        m.text == "late but edited" && m.reactions.len() == 1
    })
    .await;
    assert_eq!(m.reactions[0].accounts, [acct(&b)]);
    assert_eq!(a.search("edited", 5).unwrap().len(), 1);
    assert!(a.search("original", 5).unwrap().is_empty());
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disappearing_messages_follow_the_node_clock_not_the_wall_clock() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tidings_node::demo::{loopback, start_node_with_config};
    use tidings_node::{Clock, NetConfig, NodeConfig};

    let net = Net::new().await;
    let start = Clock::system().now_ms();
    let times = [Arc::new(AtomicU64::new(start)), Arc::new(AtomicU64::new(start))];
    let mut nodes = Vec::new();
    for (name, t) in ["alice", "bob"].into_iter().zip(&times) {
        let config = NodeConfig {
            net: NetConfig {
                listen: loopback(),
                bootstrap: net.boot_addrs.clone(),
                ..NetConfig::default()
            },
            clock: Clock::manual(t.clone()),
            ..NodeConfig::default()
        };
        nodes.push(
            start_node_with_config(&net.dir.path().join(name), name, config)
                .await
                .unwrap(),
        );
    }
    let (a, b) = (nodes[0].handle(), nodes[1].handle());
    befriend(&a, &b).await;
    let (ca, cb) = (chat_of(&a), chat_of(&b));
    // An hour's timer: by the wall clock nothing would go for an hour.
    a.change_chat(&cb, None, None, Some(3600)).await.unwrap();
    let m = a.send_chat(&cb, "for an hour", None).await.unwrap();
    assert_eq!(m.expires_ms, Some(start + 3_600_000));
    until(&b, &ca, &m.id, "bob has it", |m| {
        m.expires_ms == Some(start + 3_600_000)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        find(&b, &ca, &m.id).await.is_some(),
        "still there before the node clock says so"
    );
    // The node clocks move an hour on: both remove it within a sweep.
    for t in &times {
        t.store(start + 3_600_001, Ordering::Relaxed);
    }
    for (h, chat) in [(&a, &cb), (&b, &ca)] {
        eventually_async("gone by the node clock", || {
            let (h, chat, id) = (h.clone(), chat.clone(), m.id.clone());
            async move { find(&h, &chat, &id).await.is_none() }
        })
        .await;
    }
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_set_before_meeting_someone_reaches_them_with_the_first_conversation() {
    let net = Net::new().await;
    let (a_node, b_node, c_node) = (net.node("alice").await, net.node("bob").await, net.node("carol").await);
    let (a, b, c) = (a_node.handle(), b_node.handle(), c_node.handle());
    let png = "data:image/png;base64,iVBORw0KGgo=";
    a.change_settings(None, Some(png), None, None).await.unwrap();
    c.change_settings(None, Some(png), None, None).await.unwrap();
    // Alice starts the conversation with bob; carol is started with by bob.
    befriend(&a, &b).await;
    befriend(&b, &c).await;
    a.send_chat(&chat_of(&b), "hi bob", None).await.unwrap();
    b.send_chat(&chat_of(&c), "hi carol", None).await.unwrap();
    for who in [&a, &c] {
        eventually("bob has the picture", || {
            b.store().picture(who.account().as_bytes()).ok().flatten().is_some()
        })
        .await;
    }
    drop((a_node, b_node, c_node));
}
