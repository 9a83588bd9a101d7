//! Real `tidings` processes: `tidings init`, `tidings run` and one-shot CLI
//! commands against a data directory, and a plain HTTP client of a running
//! node's API.

use std::path::Path;
use std::process::Stdio;

use libp2p::Multiaddr;
use tidings_node::MessageView;
use tidings_node::api::{ADDR_FILE, AddContactBody, CardView, TOKEN_FILE};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::TIMEOUT;

/// The `tidings` binary, killed when its handle is dropped.
pub fn tidings() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidings"));
    c.kill_on_drop(true);
    c
}

/// Starts `tidings run` for `dir` and waits until its API is up.
pub async fn spawn_node(dir: &Path, bootstrap: &str) -> Child {
    spawn_node_with(dir, bootstrap, &[]).await
}

/// Like [`spawn_node`], with home relays.
pub async fn spawn_node_with(dir: &Path, bootstrap: &str, relays: &[Multiaddr]) -> Child {
    let _ = std::fs::remove_file(dir.join(ADDR_FILE));
    let mut cmd = tidings();
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", bootstrap]);
    for r in relays {
        cmd.arg("--relay").arg(r.to_string());
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn tidings run");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("API on") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true), "tidings run did not come up");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Runs `tidings --data-dir <dir> <args…>` to completion, asserts that it
/// succeeded and returns its stdout. The command finds the running node's API
/// through the address and token files in `dir`.
pub async fn cli(dir: &Path, args: &[&str]) -> String {
    let out = run_cli(dir, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`tidings {}` failed ({}):\nstderr: {}\nstdout: {stdout}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
    );
    stdout
}

/// Runs a CLI command that must fail and returns its stderr.
pub async fn cli_err(dir: &Path, args: &[&str]) -> String {
    let out = run_cli(dir, args).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "`tidings {}` should have failed:\nstdout: {}\nstderr: {stderr}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
    );
    stderr
}

async fn run_cli(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = tidings();
    cmd.arg("--data-dir").arg(dir).args(args).stdin(Stdio::null());
    tokio::time::timeout(TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`tidings {}` did not finish", args.join(" ")))
        .expect("run tidings")
}

/// A plain HTTP client of a running node's API.
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(dir: &Path) -> Api {
        let addr = std::fs::read_to_string(dir.join(ADDR_FILE)).expect("api-addr");
        let token = std::fs::read_to_string(dir.join(TOKEN_FILE)).expect("api-token");
        Api {
            base: format!("http://{}", addr.trim()),
            token: token.trim().to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("api reachable");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("json")
    }

    /// POSTs `body` and returns the status and the JSON answer, whatever the
    /// status (for error paths).
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> (reqwest::StatusCode, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .expect("api reachable");
        let status = r.status();
        let text = r.text().await.expect("body");
        let json =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {status}, not JSON ({e}): {text}"));
        (status, json)
    }

    pub async fn history(&self, contact: &str) -> Vec<MessageView> {
        self.get(&format!("/api/contacts/{contact}/messages")).await
    }

    /// Adds a contact by card and returns our own card.
    pub async fn befriend(&self, card: &str) -> CardView {
        let r = self
            .http
            .post(format!("{}/api/contacts", self.base))
            .bearer_auth(&self.token)
            .json(&AddContactBody {
                card: card.to_owned(),
                name: None,
            })
            .send()
            .await
            .expect("api reachable");
        assert!(r.status().is_success(), "POST /api/contacts: {}", r.status());
        self.get("/api/card").await
    }
}

/// `tidings init --name <name>` in `dir`.
pub async fn init(dir: &Path, name: &str) {
    let status = tidings()
        .arg("--data-dir")
        .arg(dir)
        .args(["init", "--name", name])
        .status()
        .await
        .expect("init");
    assert!(status.success());
}

/// Sends a signal to a child process with the system's `kill`.
pub async fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("running child").to_string();
    let status = Command::new("kill").args([sig, &pid]).status().await.expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}
