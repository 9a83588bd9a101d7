//! Shared helpers for the node's integration tests: real nodes on loopback
//! with real redb files in temporary directories.
#![allow(dead_code)]

pub mod process;

use std::path::Path;
use std::time::Duration;

use libp2p::Multiaddr;
use tidings_node::demo::{RelayTestOptions, retry_until, start_node, start_node_with_relays, start_relay_with};
use tidings_node::{Node, NodeHandle};

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A bootstrap node plus helpers to start more nodes that use it.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub boot: Node,
    pub boot_addrs: Vec<Multiaddr>,
}

impl Net {
    pub async fn new() -> Net {
        let dir = tempfile::tempdir().expect("tempdir");
        let boot = start_node(&dir.path().join("boot"), "boot", Vec::new())
            .await
            .expect("bootstrap node");
        let boot_addrs = vec![boot.listen_addrs()[0].clone()];
        Net { dir, boot, boot_addrs }
    }

    pub async fn node(&self, name: &str) -> Node {
        start_at(&self.dir.path().join(name), name, self.boot_addrs.clone()).await
    }
}

pub async fn start_at(dir: &Path, name: &str, bootstrap: Vec<Multiaddr>) -> Node {
    start_node(dir, name, bootstrap).await.expect("node starts")
}

/// Publishes the user record, retrying until the DHT has peers.
pub async fn publish(h: &NodeHandle) {
    retry_until(TIMEOUT, || h.publish_record())
        .await
        .expect("record published");
}

/// Makes two nodes contacts of each other by card.
pub async fn befriend(a: &NodeHandle, b: &NodeHandle) {
    a.add_contact(&b.card().to_uri(), None).await.expect("add contact");
    b.add_contact(&a.card().to_uri(), None).await.expect("add contact");
}

/// Polls `f` until it returns true or the timeout passes.
pub async fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(TIMEOUT, what, f).await
}

/// Like [`eventually`], with a timeout of its own.
pub async fn eventually_within(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`eventually`], for conditions that need to await.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !f().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn acct(h: &NodeHandle) -> String {
    h.account().to_base58()
}

/// Community relays on loopback, each bootstrapping from the ones before.
pub struct Relays {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub addrs: Vec<Multiaddr>,
}

/// Logs to the test's output when `RUST_LOG` is set (for a failure that
/// needs the nodes' story); silent otherwise.
pub fn log_from_env() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub async fn relays(n: usize) -> Relays {
    relays_with(n, RelayTestOptions::default()).await
}

/// [`relays`] with other mailbox limits or rates.
pub async fn relays_with(n: usize, opts: RelayTestOptions) -> Relays {
    log_from_env();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = Vec::new();
    let mut addrs: Vec<Multiaddr> = Vec::new();
    for i in 0..n {
        let r = start_relay_with(&dir.path().join(format!("relay{i}")), addrs.clone(), opts.clone())
            .await
            .unwrap();
        addrs.push(r.listen_addrs()[0].clone());
        nodes.push(r);
    }
    Relays { dir, nodes, addrs }
}

/// A person's node in `dir/name`, with every relay of `r` as a home relay.
pub async fn user(dir: &Path, name: &str, r: &Relays) -> Node {
    start_node_with_relays(&dir.join(name), name, vec![r.addrs[0].clone()], r.addrs.clone())
        .await
        .unwrap()
}

/// Waits until `h` is a member of `group` (and was not removed).
pub async fn wait_joined(h: &NodeHandle, group: &str) {
    eventually_async("joined the group", || {
        let (h, group) = (h.clone(), group.to_owned());
        async move { h.group(&group).await.is_ok_and(|g| !g.left) }
    })
    .await;
}
