//! A relay process killed with SIGKILL during deposits loses nothing it
//! acknowledged, and the recipient still gets every message exactly once.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use libp2p::Multiaddr;
use prost::Message as _;
use tidings_node::demo::{start_node_with_relays, start_relay};
use tidings_protocol::{mailbox, pb};
use tidings_store::mailbox::{MailboxLimits, Mailboxes};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `tidings relay` as a child process and returns it with its address.
async fn spawn_relay(dir: &Path, port: u16, bootstrap: &Multiaddr) -> (Child, Multiaddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .arg("--data-dir")
        .arg(dir)
        .args(["relay", "--metrics", "off", "--listen"])
        .arg(format!("/ip4/127.0.0.1/tcp/{port}"))
        .arg("--bootstrap")
        .arg(bootstrap.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tidings relay");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.parse::<Multiaddr>().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("relay listening");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_during_deposits_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let r1 = start_relay(&dir.path().join("relay1"), Vec::new()).await.unwrap();
    let r1_addr = r1.listen_addrs()[0].clone();
    let r2_dir = dir.path().join("relay2");
    let port = free_port();
    let (mut r2, r2_addr) = spawn_relay(&r2_dir, port, &r1_addr).await;
    let relays = vec![r1_addr.clone(), r2_addr.clone()];

    let a_node = start_node_with_relays(
        &dir.path().join("alice"),
        "alice",
        vec![r1_addr.clone()],
        relays.clone(),
    )
    .await
    .unwrap();
    let bdir = dir.path().join("bob");
    let b_node = start_node_with_relays(&bdir, "bob", vec![r1_addr.clone()], relays.clone())
        .await
        .unwrap();
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    a.send_text(&acct(&b), "hello").await.unwrap();
    eventually("bob got hello", || b.history(&acct(&a)).unwrap().len() == 1).await;
    let (a_acct, b_acct) = (acct(&a), acct(&b));
    let b_device = b.card().devices[0].device_key;
    drop(b);
    b_node.shutdown().await;

    // Alice writes while bob is away; relay 2 is killed in the middle of it.
    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(a.send_text(&b_acct, &format!("m{i}")).await.unwrap().id);
        if i == 150 {
            r2.start_kill().unwrap();
            r2.wait().await.unwrap();
        }
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (r2_again, _) = spawn_relay(&r2_dir, port, &r1_addr).await;
    eventually("every message in a relay's custody", || {
        a.store().outbox_len().unwrap() == 0
    })
    .await;

    // Every receipt relay 2 signed, before or after the kill, names an envelope
    // it still holds.
    let r2_key = match r2_addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => {
            libp2p::identity::PublicKey::try_decode_protobuf(p.as_ref().digest())
                .unwrap()
                .try_into_ed25519()
                .unwrap()
                .to_bytes()
        }
        _ => panic!("relay address without peer id"),
    };
    let mut r2_receipts = Vec::new();
    for id in &ids {
        let id: [u8; 16] = hex::decode(id).unwrap().try_into().unwrap();
        for bytes in a.store().receipts(&id).unwrap() {
            let r = mailbox::verify_receipt(&pb::CustodyReceipt::decode(bytes.as_slice()).unwrap()).unwrap();
            if r.relay_key == r2_key {
                r2_receipts.push(r);
            }
        }
    }
    assert!(!r2_receipts.is_empty(), "relay 2 signed receipts before it was killed");
    let mut r2_again = r2_again;
    r2_again.start_kill().unwrap();
    r2_again.wait().await.unwrap();
    {
        let m = Mailboxes::open(&r2_dir.join("mailboxes.redb"), MailboxLimits::default()).unwrap();
        let (held, _) = m.fetch(&mailbox::inbox_id(&b_device), false, 0, 10_000, 0).unwrap();
        let held: HashSet<(u64, [u8; 32])> = held
            .iter()
            .map(|e| (e.index, mailbox::envelope_hash(&e.envelope)))
            .collect();
        for r in &r2_receipts {
            assert!(
                held.contains(&(r.index, r.envelope_hash)),
                "acknowledged envelope {} lost",
                r.index
            );
        }
    }
    let (_r2, _) = spawn_relay(&r2_dir, port, &r1_addr).await;

    // Bob comes back and gets everything exactly once, in order.
    let b_node = start_node_with_relays(&bdir, "bob", vec![r1_addr.clone()], relays.clone())
        .await
        .unwrap();
    let b = b_node.handle();
    eventually("bob got all 301", || b.history(&a_acct).unwrap().len() >= 301).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = b.history(&a_acct).unwrap();
    assert_eq!(h.len(), 301, "none duplicated");
    let texts: Vec<&str> = h[1..].iter().map(|m| m.text.as_str()).collect();
    let expected: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected);
    drop(r1);
}
