//! Interop with a non-Rust libp2p implementation: js-libp2p (from npm, see
//! `interop/js/`) talks identify, ping, Kademlia on `/tidings/kad/1.0.0` and
//! circuit relay v2 to a real Tidings relay.
//!
//! Needs Node.js and npm on the PATH. When `interop/js/node_modules` is
//! missing the test runs `npm ci` there first. Without Node.js the test fails:
//! it never passes without having run the js side.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde_json::Value;
use tidings_node::demo::{start_node, start_relay};
use tidings_node::net::RelayServerConfig;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

/// The whole js run (a cold `npm ci` is not part of this).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(600);
const RESERVED_PREFIX: &str = "TIDINGS-INTEROP RESERVED ";

fn js_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/js");
    dir.canonicalize().unwrap_or(dir)
}

/// Checks that `tool --version` runs; panics with a clear message otherwise.
async fn require_tool(tool: &str) -> String {
    match Command::new(tool).arg("--version").output().await {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => panic!(
            "`{tool} --version` failed ({}): the js-libp2p interop test needs Node.js 20+ and npm \
             (e.g. `apt-get install -y nodejs npm`)",
            out.status
        ),
        Err(e) => panic!(
            "`{tool}` not found ({e}): the js-libp2p interop test needs Node.js 20+ and npm \
             (e.g. `apt-get install -y nodejs npm`); it does not pass without them"
        ),
    }
}

/// Installs the pinned js dependencies unless they are there and no older
/// than `package-lock.json` (npm keeps a copy in `node_modules/.package-lock.json`).
async fn ensure_node_modules(dir: &Path) {
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let installed = modified(dir.join("node_modules/.package-lock.json"));
    let locked = modified(dir.join("package-lock.json")).expect("interop/js/package-lock.json");
    if installed.is_some_and(|i| i >= locked) && dir.join("node_modules/libp2p/package.json").exists() {
        return;
    }
    let npm = require_tool("npm").await;
    eprintln!(
        "interop_js: node_modules missing or older than package-lock.json; running `npm ci` (npm {npm}) in {}",
        dir.display()
    );
    let t0 = Instant::now();
    let mut cmd = Command::new("npm");
    cmd.args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .kill_on_drop(true);
    let status = tokio::time::timeout(NPM_CI_TIMEOUT, cmd.status())
        .await
        .expect("`npm ci` timed out")
        .expect("`npm ci` could not start");
    assert!(status.success(), "`npm ci` in {} failed: {status}", dir.display());
    eprintln!("interop_js: npm ci took {:.1} s", t0.elapsed().as_secs_f64());
}

/// The first address of `addrs` that is plain TCP.
fn tcp_addr(addrs: &[Multiaddr]) -> Multiaddr {
    addrs
        .iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .cloned()
        .expect("a TCP listen address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_libp2p_speaks_identify_ping_kademlia_and_circuit_relay_with_a_relay() {
    let dir = js_dir();
    let node_version = require_tool("node").await;
    let major: u32 = node_version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "the js-libp2p interop test needs Node.js 20+, found {node_version}"
    );
    ensure_node_modules(&dir).await;

    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(&tmp.path().join("relay"), Vec::new()).await.unwrap();
    let relay_addr = tcp_addr(&relay.listen_addrs());
    let relay_handle = relay.handle();

    // A Rust Tidings node in the relay's DHT. The js side knows only its peer
    // id and must learn its addresses from the relay's Kademlia.
    let bob_node = start_node(&tmp.path().join("bob"), "bob", vec![relay_addr.clone()])
        .await
        .unwrap();
    let bob = bob_node.handle();
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay_handle.status().await.unwrap().dht_peers == 0 {
        assert!(Instant::now() < deadline, "bob never entered the relay's routing table");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let t0 = Instant::now();
    let mut child = Command::new("node")
        .arg(dir.join("interop.mjs"))
        .args(["--relay", &relay_addr.to_string()])
        .args(["--peer", &bob.peer_id().to_string()])
        .args(["--expect-dial-from", &bob.peer_id().to_string()])
        .args(["--timeout-ms", &(SCRIPT_TIMEOUT.as_millis() - 10_000).to_string()])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `node` ({node_version}): {e}"));

    // stderr: progress, and the circuit address bob must dial through the relay.
    let stderr = child.stderr.take().unwrap();
    let dialer = bob.clone();
    let stderr_task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut dialled = None;
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[js] {line}");
            if let Some(addr) = line.strip_prefix(RESERVED_PREFIX) {
                let addr: Multiaddr = addr.trim().parse().expect("circuit address");
                dialer.dial(addr.clone()).await.expect("bob dials through the relay");
                dialled = Some(addr);
            }
        }
        dialled
    });
    let mut stdout = child.stdout.take().unwrap();
    let stdout_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s).await;
        s
    });

    let status = match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => {
            let _ = child.kill().await;
            panic!("interop.mjs did not finish within {SCRIPT_TIMEOUT:?}");
        }
    };
    let elapsed = t0.elapsed();
    let out = stdout_task.await.unwrap();
    let dialled = stderr_task.await.unwrap();
    eprintln!(
        "interop_js: node {node_version}, script ran {:.1} s, exit {status}",
        elapsed.as_secs_f64()
    );
    eprintln!("interop_js: result {out}");

    let line = out
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no JSON on stdout (exit {status})"));
    let r: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"));
    assert!(status.success(), "interop.mjs failed: {}", r["errors"]);
    assert_eq!(r["ok"], true);

    // a. identify over TCP/Noise/Yamux, with the standard protocols listed.
    let id = &r["identify"];
    assert_eq!(id["ok"], true, "identify: {id}");
    assert_eq!(id["encryption"], "/noise");
    assert_eq!(id["multiplexer"], "/yamux/1.0.0");
    assert!(id["agent_version"].as_str().unwrap().starts_with("tidings/"), "{id}");
    let protocols: Vec<&str> = id["protocols"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for p in [
        "/ipfs/id/1.0.0",
        "/ipfs/ping/1.0.0",
        "/tidings/kad/1.0.0",
        "/libp2p/circuit/relay/0.2.0/hop",
    ] {
        assert!(protocols.contains(&p), "relay does not advertise {p}: {protocols:?}");
    }

    // b. ping.
    assert_eq!(r["ping"]["ok"], true);
    assert_eq!(r["ping"]["rtt_ms"].as_array().unwrap().len(), 3);

    // c. Kademlia: the relay answered a js FIND_NODE with bob and his addresses,
    // and the js node reached bob at one of them.
    let kad = &r["kad"];
    assert_eq!(kad["ok"], true, "kad: {kad}");
    assert_eq!(kad["answered_by"], relay_handle.peer_id().to_string());
    assert_eq!(kad["target"], bob.peer_id().to_string());
    assert!(kad["direct_ping_rtt_ms"].is_number());

    // d. circuit relay v2: a js node holds a reservation; another js node and
    // bob (rust-libp2p relay client) reach it through the relay and ping it.
    let c = &r["circuit"];
    assert_eq!(c["ok"], true, "circuit: {c}");
    let reservation = c["reservation_addr"].as_str().unwrap();
    assert!(
        reservation.starts_with(&format!("{relay_addr}/p2p-circuit/p2p/")),
        "{reservation}"
    );
    assert!(c["js_dial"]["remote_addr"].as_str().unwrap().contains("/p2p-circuit"));
    assert!(c["js_dial"]["rtt_ms"].is_number());
    let inbound = &c["inbound_dial"];
    assert_eq!(inbound["from"], bob.peer_id().to_string());
    assert_eq!(inbound["direction"], "inbound");
    assert!(inbound["remote_addr"].as_str().unwrap().contains("/p2p-circuit"));
    assert!(inbound["rtt_ms"].is_number());
    assert_eq!(dialled.map(|a| a.to_string()).as_deref(), Some(reservation));
    // Both ends of a circuit learn the relay's limits (circuit relay v2 `Limit`):
    // the js dialer from the HOP reply, the js listener from the STOP request.
    let limits = RelayServerConfig::default();
    for (side, l) in [("dialer", &c["js_dial"]["limits"]), ("listener", &inbound["limits"])] {
        let secs = l["seconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{side}: no duration limit: {l}"));
        assert!(secs > 0 && secs <= limits.max_circuit_duration_secs, "{side}: {l}");
        let bytes = l["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{side}: no data limit: {l}"));
        assert!(bytes > 0 && bytes <= limits.max_circuit_bytes, "{side}: {l}");
    }

    drop((bob, relay_handle));
    bob_node.shutdown().await;
    relay.shutdown().await;
}
