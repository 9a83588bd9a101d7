//! NAT traversal: a node that cannot be dialled directly is reached through a
//! circuit on its relay.

mod common;

use common::*;
use tidings_node::demo::{start_node_behind_nat, start_node_with_net, start_relay, wait_message};
use tidings_node::{NetConfig, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_a_listen_address_is_reached_through_a_relay_circuit() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&dir.path().join("relay"), Vec::new()).await.unwrap();
    let relay_addr = relay.listen_addrs()[0].clone();

    // Bob listens on nothing: nobody can dial him directly.
    let b_node = start_node_behind_nat(&dir.path().join("bob"), "bob", Vec::new(), vec![relay_addr.clone()])
        .await
        .unwrap();
    let b = b_node.handle();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let s = b.status().await.unwrap();
        if s.listen_addrs.iter().any(|a| a.contains("p2p-circuit")) {
            assert!(
                s.listen_addrs.iter().all(|a| a.contains("p2p-circuit")),
                "no direct address"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no circuit reservation");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Alice has no relays of her own and knows bob only by his card.
    let a_node = tidings_node::demo::start_node(&dir.path().join("alice"), "alice", vec![relay_addr.clone()])
        .await
        .unwrap();
    let a = a_node.handle();
    a.add_contact(&b.card().to_uri(), None).await.unwrap();
    let mut rx = b.subscribe();
    // Starting the conversation fetches a key package from bob's device itself.
    a.start_conversation(*b.account().as_bytes())
        .await
        .expect("reached bob's device");
    assert!(a.is_connected(b.peer_id()).await, "connected to bob through the relay");
    let sent = a.send_text(&acct(&b), "through the circuit").await.unwrap();
    let got = wait_message(&mut rx, &sent.id).await.expect("bob receives");
    assert_eq!(got.text, "through the circuit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_connection_is_upgraded_to_a_direct_one_by_hole_punching() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&dir.path().join("relay"), Vec::new()).await.unwrap();
    let relay_addr = relay.listen_addrs()[0].clone();

    // Both listen, but neither address is published anywhere (no DHT server
    // mode, nothing announced): at first each can reach the other only
    // through the relay's circuits. Hole punching must find the direct path.
    let b_node = start_unlisted(&dir.path().join("bob"), "bob", &relay_addr).await;
    let a_node = start_unlisted(&dir.path().join("alice"), "alice", &relay_addr).await;
    let (a, b) = (a_node.handle(), b_node.handle());
    let found = a.find_peer(b.peer_id()).await.unwrap_or_default();
    assert!(
        found.iter().all(|a| a.to_string().contains("p2p-circuit")),
        "bob published a direct address: {found:?}"
    );
    a.add_contact(&b.card().to_uri(), None).await.unwrap();
    let mut rx = b.subscribe();
    a.start_conversation(*b.account().as_bytes())
        .await
        .expect("reached bob's device");
    let sent = a.send_text(&acct(&b), "hello").await.unwrap();
    wait_message(&mut rx, &sent.id).await.expect("bob receives");

    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let conns = a.connections(b.peer_id()).await;
        if conns.iter().any(|c| !c.to_string().contains("p2p-circuit")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no direct connection after hole punching: {conns:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A node that listens on loopback but publishes no address: a DHT client
/// with one home relay.
async fn start_unlisted(dir: &std::path::Path, name: &str, relay: &libp2p::Multiaddr) -> Node {
    let net = NetConfig {
        listen: tidings_node::demo::loopback(),
        dht_server: false,
        ..NetConfig::default()
    };
    start_node_with_net(dir, name, net, vec![relay.clone()]).await.unwrap()
}

/// Logs with `RUST_LOG=…` when a test needs looking into.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
