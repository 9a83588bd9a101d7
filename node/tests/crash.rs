//! Crash safety with real processes: a receiver killed with SIGKILL loses
//! nothing, and nothing arrives twice.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tidings_node::MessageView;
use tidings_node::api::{ADDR_FILE, AddContactBody, CardView, TOKEN_FILE};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn tidings() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidings"));
    c.kill_on_drop(true);
    c
}

/// Starts `tidings run` for `dir` and waits until its API is up.
async fn spawn_node(dir: &Path, bootstrap: &str) -> Child {
    let _ = std::fs::remove_file(dir.join(ADDR_FILE));
    let mut child = tidings()
        .arg("--data-dir")
        .arg(dir)
        .args(["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", bootstrap])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn tidings run");
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

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(dir: &Path) -> Api {
        let addr = std::fs::read_to_string(dir.join(ADDR_FILE)).expect("api-addr");
        let token = std::fs::read_to_string(dir.join(TOKEN_FILE)).expect("api-token");
        Api {
            base: format!("http://{}", addr.trim()),
            token: token.trim().to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
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

    async fn history(&self, contact: &str) -> Vec<MessageView> {
        self.get(&format!("/api/contacts/{contact}/messages")).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_receiver_gets_all_queued_messages_exactly_once_after_restart() {
    let net = Net::new().await;
    let boot = net.boot_addrs[0].to_string();
    let a_node = net.node("alice").await;
    let a = a_node.handle();

    let bdir = net.dir.path().join("bob");
    let status = tidings()
        .arg("--data-dir")
        .arg(&bdir)
        .args(["init", "--name", "bob"])
        .status()
        .await
        .expect("init");
    assert!(status.success());
    let mut bob = spawn_node(&bdir, &boot).await;
    let api = Api::new(&bdir);
    let card: CardView = api.get("/api/card").await;
    let r = api
        .http
        .post(format!("{}/api/contacts", api.base))
        .bearer_auth(&api.token)
        .json(&AddContactBody {
            card: a.card().to_uri(),
            name: None,
        })
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    a.add_contact(&card.uri, None).await.unwrap();

    for i in 0..5 {
        a.send_text(&card.account, &format!("early {i}")).await.unwrap();
    }
    eventually("early messages acknowledged", || a.store().outbox_len().unwrap() == 0).await;
    let before = api.history(&acct(&a)).await;
    assert_eq!(before.len(), 5);

    // Queue 50 messages and kill bob with SIGKILL while they are in flight.
    for i in 0..50 {
        a.send_text(&card.account, &format!("queued {i}")).await.unwrap();
        if i == 10 {
            bob.start_kill().expect("SIGKILL");
        }
    }
    bob.wait().await.unwrap();
    assert!(a.store().outbox_len().unwrap() > 0, "some messages are still queued");

    let _bob = spawn_node(&bdir, &boot).await;
    let api = Api::new(&bdir);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let history = loop {
        let h = api.history(&acct(&a)).await;
        if h.len() >= 55 && a.store().outbox_len().unwrap() == 0 {
            break h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 55 messages arrived",
            h.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(history.len(), 55, "exactly once");
    assert_eq!(history[..5], before[..], "history from before the kill is intact");
    let unique: HashSet<_> = history.iter().map(|m| m.id.clone()).collect();
    assert_eq!(unique.len(), 55);
    let queued: Vec<String> = history[5..].iter().map(|m| m.text.clone()).collect();
    let expected: Vec<String> = (0..50).map(|i| format!("queued {i}")).collect();
    assert_eq!(queued, expected, "in order");
}
