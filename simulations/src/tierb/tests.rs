//! Tests of the model's pieces on small hand-made worlds.

use super::event::Path;
use super::{NEVER, World, build};
use crate::scenario::Scenario;
use crate::trace::Recorder;

/// Two relays and a few clients in one region, no churn, no background traffic.
fn quiet(extra: &str) -> Scenario {
    let text = format!(
        r#"
name = "unit"
duration = "1h"
[network]
regions = [{{ name = "a" }}, {{ name = "b" }}]
rtt_ms = [[10.0, 80.0], [80.0, 10.0]]
jitter = 0.0
[[population]]
class = "relay"
role = "relay"
count = 2
regions = {{ a = 1.0 }}
[[population]]
class = "client"
role = "client"
count = 4
home_relays = 2
nat = {{ symmetric = 1.0 }}
regions = {{ a = 1.0 }}
[workload]
contacts_per_user = 2
messages_per_user_per_hour = 0
record_lookups_per_user_per_hour = 0
[protocol]
record_republish = "24h"
{extra}
"#
    );
    Scenario::from_toml(&text).unwrap()
}

fn started(sc: &Scenario) -> World<'_> {
    let mut w = build::build(sc, 5, Recorder::new(sc, 5, None));
    w.start();
    w.run_until(2_000_000, |_, _| {});
    w
}

fn secs(s: u64) -> u64 {
    s * 1_000_000
}

#[test]
fn mailbox_delivers_after_reconnect() {
    let sc = quiet("");
    let mut w = started(&sc);
    let (a, b) = (w.clients[0].node, w.clients[1].node);
    let session = w.nodes[b as usize].session;
    w.on_down(b, session);
    w.send_direct(0, b, 500);
    w.run_until(secs(60), |_, _| {});
    let d = &w.deliveries[0];
    assert_eq!(d.delivered, NEVER, "the recipient is away");
    assert_eq!(d.copies, 2, "both home relays hold a copy");
    assert!(
        w.msgs[0].acked && w.msgs[0].done,
        "a custody receipt took it out of the outbox"
    );
    assert!(w.clients[0].outbox.is_empty());
    w.now = secs(60);
    w.on_up(b);
    w.run_until(secs(70), |_, _| {});
    let d = &w.deliveries[0];
    assert!(
        d.delivered >= secs(60) && d.delivered < secs(61),
        "fetched on reconnect: {}",
        d.delivered
    );
    assert_eq!(d.path, Path::Mailbox as u8);
    assert_eq!((d.copies, d.displays), (0, 1), "both copies acked away, shown once");
    assert_eq!(w.checks.count, 0);
    assert_ne!(a, b);
}

#[test]
fn online_recipient_gets_mail_by_push_then_directly_once_connected() {
    let sc = quiet("");
    let mut w = started(&sc);
    let b = w.clients[1].node;
    // A conversation that exists already: no set-up before the first send.
    w.convs.insert(super::delivery::conv_key(w.clients[0].node, b));
    w.send_direct(0, b, 500);
    w.run_until(secs(5), |_, _| {});
    assert_eq!(
        w.deliveries[0].path,
        Path::Mailbox as u8,
        "not connected yet: deposited and pushed"
    );
    assert!(w.deliveries[0].delivered - w.deliveries[0].ready < 1_000_000);
    // The background dial made a relayed connection (both are behind symmetric NATs).
    w.send_direct(0, b, 500);
    w.run_until(secs(10), |_, _| {});
    assert_eq!(w.deliveries[1].path, Path::Relayed as u8);
    assert_eq!(w.checks.count, 0);
}

#[test]
fn duplicate_copies_are_shown_once() {
    let sc = quiet("");
    let mut w = started(&sc);
    let b = w.clients[1].node;
    let session = w.nodes[b as usize].session;
    w.on_down(b, session);
    w.send_direct(0, b, 500);
    w.run_until(secs(30), |_, _| {});
    // The sender did not see a receipt and deposits again: now four copies on two relays.
    let m = &mut w.msgs[0];
    (m.acked, m.done, m.inflight) = (false, false, 0);
    w.clients[0].outbox.push(0);
    w.pump(0);
    w.run_until(secs(60), |_, _| {});
    assert_eq!(w.deliveries[0].copies, 4);
    w.on_up(b);
    w.run_until(secs(70), |_, _| {});
    assert_eq!((w.deliveries[0].copies, w.deliveries[0].displays), (0, 1));
    assert_eq!(w.checks.count, 0);
}

#[test]
fn relay_crash_keeps_committed_mail() {
    let sc = quiet("[[faults]]\nkind = \"restart-relays\"\nat = \"30s\"\nfraction = 1.0\ndowntime = \"1m\"\n");
    let mut w = started(&sc);
    let b = w.clients[1].node;
    let session = w.nodes[b as usize].session;
    w.on_down(b, session);
    w.send_direct(0, b, 500);
    w.run_until(secs(20), |_, _| {});
    assert_eq!(w.deliveries[0].copies, 2);
    w.run_until(secs(40), |_, _| {});
    assert!(w.relays.iter().all(|r| !r.up), "both relays are down");
    w.on_up(b);
    w.run_until(secs(85), |_, _| {});
    assert_eq!(
        w.deliveries[0].delivered, NEVER,
        "nothing to fetch from while they are down"
    );
    w.run_until(secs(120), |_, _| {});
    let d = &w.deliveries[0];
    assert!(
        d.delivered > secs(90) && d.delivered <= secs(101),
        "fetched at the first round after the restart"
    );
    assert_eq!(w.checks.count, 0);
}

#[test]
fn destroyed_relays_lose_acknowledged_mail_only_when_the_scenario_allows_it() {
    for allow in [false, true] {
        let extra = format!(
            "[[faults]]\nkind = \"kill-relays\"\nat = \"30s\"\nfraction = 1.0\ndata = \"lost\"\n\
             [invariants]\nallow_loss_on_destroyed_relays = {allow}\n"
        );
        let sc = quiet(&extra);
        let mut w = started(&sc);
        let b = w.clients[1].node;
        let session = w.nodes[b as usize].session;
        w.on_down(b, session);
        w.send_direct(0, b, 500);
        w.run_until(secs(60), |_, _| {});
        assert_ne!(w.deliveries[0].flags & super::flag::LOST, 0);
        assert_eq!(w.checks.count, u64::from(!allow), "allow = {allow}");
        assert_eq!(w.c.lost_excused, u64::from(allow));
    }
}

#[test]
fn a_dropping_relay_alone_loses_mail_and_is_named_as_the_cause() {
    let sc = quiet("[adversaries]\ndropping_relays = 1.0\n[invariants]\nallow_loss_on_adversarial_relays = true\n");
    let mut w = started(&sc);
    let b = w.clients[1].node;
    let session = w.nodes[b as usize].session;
    w.on_down(b, session);
    w.send_direct(0, b, 500);
    w.run_until(secs(30), |_, _| {});
    assert!(w.msgs[0].acked, "the relay signed a receipt");
    assert_ne!(w.deliveries[0].flags & super::flag::LOST, 0);
    assert_eq!((w.c.lost_excused, w.checks.count), (1, 0));
}

#[test]
fn partition_holds_mail_until_it_heals() {
    let text = "[[faults]]\nkind = \"partition\"\nat = \"10s\"\nheal = \"5m\"\nsides = [[\"a\"], [\"b\"]]\n";
    let sc = quiet(text);
    let mut w = started(&sc);
    // Move the recipient to the other side of the cut.
    let b = w.clients[1].node;
    w.nodes[b as usize].region = 1;
    w.run_until(secs(20), |_, _| {});
    w.send_direct(0, b, 500);
    w.run_until(secs(299), |_, _| {});
    assert_eq!(w.deliveries[0].delivered, NEVER, "cut off from its relays");
    assert_eq!(w.deliveries[0].copies, 2, "deposited on the sender's side");
    w.run_until(secs(330), |_, _| {});
    let d = &w.deliveries[0];
    // The recipient redials its relays every `relay_redial` and drains on connecting.
    let redial = sc.protocol.relay_redial.micros();
    assert!(
        d.delivered > secs(300) && d.delivered <= secs(301) + redial,
        "at the first redial after the heal: {}",
        d.delivered
    );
    assert_eq!(w.checks.count, 0);
}

#[test]
fn a_group_message_reaches_every_member_once() {
    let mut sc = quiet("");
    sc.workload.groups_per_user = 3.0;
    sc.workload.group_size = [4, 4];
    sc.validate().unwrap();
    let mut w = started(&sc);
    assert!(!w.groups.is_empty());
    let g = 0u32;
    let members = w.groups[0].members.clone();
    let sender = w.client_of(members[0]).unwrap();
    let away = members[3];
    let session = w.nodes[away as usize].session;
    w.on_down(away, session);
    w.send_group(sender, g, 300);
    w.run_until(secs(30), |_, _| {});
    let shown: Vec<bool> = (0..3).map(|i| w.deliveries[i].delivered != NEVER).collect();
    assert_eq!(
        shown,
        vec![true, true, false],
        "online members by long poll, not the one away"
    );
    w.on_up(away);
    w.run_until(secs(40), |_, _| {});
    assert!((0..3).all(|i| w.deliveries[i].displays == 1));
    assert_eq!(w.checks.count, 0);
}

#[test]
fn a_first_message_waits_for_its_conversation_then_rides_the_connection_the_key_package_fetch_opened() {
    let sc = quiet("");
    let mut w = started(&sc);
    let b = w.clients[1].node;
    let lookups = w.c.kad[1].lookups;
    w.send_direct(0, b, 500);
    assert!(w.msgs[0].held, "held while the conversation is set up");
    w.run_until(secs(10), |_, _| {});
    assert_eq!(w.c.kad[1].lookups, lookups + 1, "the contact's record was looked up");
    let d = &w.deliveries[0];
    assert!(d.delivered != NEVER && !w.msgs[0].held);
    // Both are behind symmetric NATs: the key-package fetch dialled through a relay's circuit,
    // and the message followed on that connection instead of a mailbox.
    assert_eq!(d.path, Path::Relayed as u8);
    // A second message needs no set-up.
    w.send_direct(0, b, 500);
    assert!(!w.msgs[1].held);
    w.run_until(secs(20), |_, _| {});
    assert_eq!(w.c.kad[1].lookups, lookups + 1);
    assert_eq!(w.checks.count, 0);
}
