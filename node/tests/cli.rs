//! The group and device commands end to end: people run real `tidings run`
//! processes on loopback relays, and everything goes through the `tidings`
//! CLI and the node's local HTTP API, as a user would drive them.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::process::*;
use common::*;
use reqwest::StatusCode;
use serde_json::json;
use tidings_node::GroupView;
use tidings_node::api::{ADDR_FILE, DeviceView, TOKEN_FILE};
use tokio::process::Child;

/// One person: a data directory with a running `tidings run` process.
struct Person {
    dir: PathBuf,
    account: String,
    uri: String,
    api: Api,
    _node: Child,
}

impl Person {
    /// `tidings init`, then `tidings run` with both relays as home relays.
    async fn start(r: &Relays, name: &str) -> Person {
        let dir = r.dir.path().join(name);
        init(&dir, name).await;
        let node = spawn_node_with(&dir, &r.addrs[0].to_string(), &r.addrs).await;
        let (uri, account, shown_name) = parse_card(&cli(&dir, &["card"]).await);
        assert_eq!(shown_name, name, "the card shows the name given to init");
        let api = Api::new(&dir);
        Person {
            dir,
            account,
            uri,
            api,
            _node: node,
        }
    }

    async fn cli(&self, args: &[&str]) -> String {
        cli(&self.dir, args).await
    }

    /// `tidings contact add <card>` for `other`'s card.
    async fn add_contact(&self, other: &Person) {
        let out = self.cli(&["contact", "add", &other.uri]).await;
        assert!(
            out.contains(&format!("({})", other.account)),
            "contact add names the account: {out}"
        );
    }

    /// The group as `tidings group list` shows it, if it is listed.
    async fn listed(&self, gid: &str) -> Option<Shown> {
        parse_groups(&self.cli(&["group", "list"]).await)
            .into_iter()
            .find(|g| g.id == gid)
    }

    /// The group as `tidings group members` shows it.
    async fn members(&self, gid: &str) -> Shown {
        let mut groups = parse_groups(&self.cli(&["group", "members", gid]).await);
        assert_eq!(groups.len(), 1, "group members shows one group");
        groups.remove(0)
    }

    /// The texts of `tidings group log`, with who sent each.
    async fn log(&self, gid: &str) -> Vec<(String, String)> {
        parse_log(&self.cli(&["group", "log", gid]).await)
    }

    async fn texts(&self, gid: &str) -> Vec<String> {
        self.log(gid).await.into_iter().map(|(_, t)| t).collect()
    }

    async fn wait_joined(&self, gid: &str) {
        eventually_async("the group is listed and joined", || async {
            self.listed(gid).await.is_some_and(|g| !g.left)
        })
        .await;
    }

    async fn wait_text(&self, gid: &str, text: &str) {
        eventually_async(&format!("{text:?} in the group log"), || async {
            self.texts(gid).await.iter().any(|t| t == text)
        })
        .await;
    }

    async fn send(&self, gid: &str, text: &str) {
        let out = self.cli(&["group", "send", gid, text]).await;
        assert!(out.starts_with("queued "), "group send: {out}");
    }

    /// GETs `path` from the API and returns the status and the JSON answer,
    /// whatever the status (for error paths).
    async fn get_status(&self, path: &str) -> (StatusCode, serde_json::Value) {
        let addr = std::fs::read_to_string(self.dir.join(ADDR_FILE)).expect("api-addr");
        let token = std::fs::read_to_string(self.dir.join(TOKEN_FILE)).expect("api-token");
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", addr.trim()))
            .bearer_auth(token.trim())
            .send()
            .await
            .expect("api reachable");
        let status = r.status();
        let json = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {status}, not JSON: {e}"));
        (status, json)
    }
}

/// The `error` text of an API answer.
fn error_of(body: &serde_json::Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("an error answer has an error text: {body}"))
}

/// `tidings card`: the URI on the first line, then a QR code, then
/// `account: <account>  name: <name>`.
fn parse_card(out: &str) -> (String, String, String) {
    let uri = out.lines().next().unwrap_or_default().to_owned();
    assert!(uri.starts_with("tidings:"), "card starts with its URI: {out}");
    let last = out.lines().last().unwrap_or_default();
    let (account, name) = last
        .strip_prefix("account: ")
        .and_then(|l| l.split_once("  name: "))
        .unwrap_or_else(|| panic!("card ends with the account: {out}"));
    (uri, account.to_owned(), name.to_owned())
}

/// A group as the CLI prints it: `<id>  <name>[ (you left)]  epoch <n>`, then
/// `  <role> <account>  devices: <n>` per member and `  relay   <addr>` per relay.
#[derive(Debug)]
struct Shown {
    id: String,
    name: String,
    left: bool,
    epoch: u64,
    /// Account → role.
    members: BTreeMap<String, String>,
    relays: Vec<String>,
}

fn parse_groups(out: &str) -> Vec<Shown> {
    let mut groups: Vec<Shown> = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("  ") {
            let g = groups
                .last_mut()
                .unwrap_or_else(|| panic!("an indented line before any group: {out}"));
            match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["relay", addr] => g.relays.push((*addr).to_owned()),
                [role, account, "devices:", n] => {
                    assert!(n.parse::<usize>().is_ok_and(|n| n >= 1), "devices: {line}");
                    g.members.insert((*account).to_owned(), (*role).to_owned());
                }
                _ => panic!("unexpected line {line:?} in {out}"),
            }
        } else {
            let (id, rest) = line.split_once("  ").unwrap_or_else(|| panic!("group line {line:?}"));
            let (name, epoch) = rest
                .rsplit_once("  epoch ")
                .unwrap_or_else(|| panic!("group line {line:?}"));
            let (name, left) = match name.strip_suffix(" (you left)") {
                Some(n) => (n, true),
                None => (name, false),
            };
            groups.push(Shown {
                id: id.to_owned(),
                name: name.to_owned(),
                left,
                epoch: epoch.parse().unwrap_or_else(|_| panic!("epoch in {line:?}")),
                members: BTreeMap::new(),
                relays: Vec::new(),
            });
        }
    }
    groups
}

/// `tidings group log`: `<hh:mm:ssZ> <who>: <text>`, `who` being `me` or the
/// sender's account cut to eight characters.
fn parse_log(out: &str) -> Vec<(String, String)> {
    out.lines()
        .map(|line| {
            let (head, text) = line.split_once(": ").unwrap_or_else(|| panic!("log line {line:?}"));
            let who = head
                .split_whitespace()
                .nth(1)
                .unwrap_or_else(|| panic!("log line {line:?}"));
            (who.to_owned(), text.to_owned())
        })
        .collect()
}

fn roles(pairs: &[(&Person, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(p, role)| (p.account.clone(), (*role).to_owned()))
        .collect()
}

/// Lets anything still in flight arrive before checking that it did not.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commands_work_end_to_end_through_the_cli_and_api() {
    let r = relays(2).await;
    let alice = Person::start(&r, "alice").await;
    let bob = Person::start(&r, "bob").await;
    let carol = Person::start(&r, "carol").await;
    for (a, b) in [(&alice, &bob), (&alice, &carol), (&bob, &carol)] {
        a.add_contact(b).await;
        b.add_contact(a).await;
    }
    let contacts = alice.cli(&["contacts"]).await;
    for (p, name) in [(&bob, "bob"), (&carol, "carol")] {
        assert!(
            contacts.lines().any(|l| l.starts_with(name) && l.contains(&p.account)),
            "alice's contacts list {name} by the name on the card: {contacts}"
        );
    }

    // A create naming someone who is not a contact fails, before anything is
    // created: no group is left behind, not even one with alice alone.
    let refused = cli_err(
        &alice.dir,
        &["group", "create", "ghosts", "--member", "bob", "--member", "nobody"],
    )
    .await;
    assert!(refused.contains("unknown contact: nobody"), "{refused}");
    let (status, body) = alice
        .api
        .post_json("/api/groups", &json!({ "name": "ghosts", "members": ["nobody"] }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(error_of(&body).starts_with("unknown contact"), "{body}");
    let listed = alice.cli(&["group", "list"]).await;
    assert!(
        parse_groups(&listed).is_empty(),
        "a failed create left a group: {listed}"
    );
    let groups: Vec<GroupView> = alice.api.get("/api/groups").await;
    assert!(groups.is_empty(), "a failed create left a group: {groups:?}");

    // Create with a member named as a contact; the printed id is the group's.
    let created = parse_groups(&alice.cli(&["group", "create", "friends", "--member", "bob"]).await);
    assert_eq!(created.len(), 1, "group create shows the new group");
    let gid = created[0].id.clone();
    assert!(
        gid.len() >= 16 && gid.chars().all(|c| c.is_ascii_hexdigit()),
        "group id is hex: {gid}"
    );
    assert_eq!(created[0].name, "friends");
    assert_eq!(
        created[0].members.get(&alice.account).map(String::as_str),
        Some("owner")
    );
    bob.wait_joined(&gid).await;
    let seen = bob.listed(&gid).await.expect("bob lists the group");
    assert_eq!(seen.name, "friends");
    assert_eq!(seen.members, roles(&[(&alice, "owner"), (&bob, "member")]));
    assert!(
        carol.listed(&gid).await.is_none(),
        "carol was not invited and does not list the group"
    );

    // Messages both ways, attributed to their senders.
    alice.send(&gid, "hello bob").await;
    bob.wait_text(&gid, "hello bob").await;
    let alice_short: String = alice.account.chars().take(8).collect();
    assert_eq!(bob.log(&gid).await, [(alice_short, "hello bob".to_owned())]);
    bob.send(&gid, "hi alice").await;
    alice.wait_text(&gid, "hi alice").await;
    let bob_short: String = bob.account.chars().take(8).collect();
    assert_eq!(
        alice.log(&gid).await,
        [
            ("me".to_owned(), "hello bob".to_owned()),
            (bob_short, "hi alice".to_owned())
        ]
    );

    // Carol is invited, joins and reads on from there, not before.
    let invited = parse_groups(&alice.cli(&["group", "invite", &gid, &carol.account]).await);
    assert_eq!(invited.len(), 1);
    assert_eq!(invited[0].id, gid);
    carol.wait_joined(&gid).await;
    let everyone = roles(&[(&alice, "owner"), (&bob, "member"), (&carol, "member")]);
    for p in [&alice, &bob, &carol] {
        eventually_async("three members with alice as owner", || async {
            p.members(&gid).await.members == everyone
        })
        .await;
    }
    let shown = carol.members(&gid).await;
    let home: Vec<String> = r.addrs.iter().map(|a| a.to_string()).collect();
    assert_eq!(shown.relays, home, "the group lives on alice's home relays");
    alice.send(&gid, "welcome carol").await;
    carol.wait_text(&gid, "welcome carol").await;
    assert_eq!(
        carol.texts(&gid).await,
        ["welcome carol"],
        "carol reads nothing from before she joined"
    );

    // Rename with a description: everyone sees it, and the epoch moves on.
    let epoch = alice.members(&gid).await.epoch;
    alice
        .cli(&["group", "rename", &gid, "best friends", "--description", "since school"])
        .await;
    for p in [&alice, &bob, &carol] {
        eventually_async("the new name is listed", || async {
            p.listed(&gid).await.is_some_and(|g| g.name == "best friends")
        })
        .await;
    }
    assert!(alice.members(&gid).await.epoch > epoch, "the rename is a commit");
    let view: GroupView = bob.api.get(&format!("/api/groups/{gid}")).await;
    assert_eq!(view.description, "since school");

    // A member may not rename; an unknown role is refused by name.
    let refused = cli_err(&carol.dir, &["group", "rename", &gid, "carol's"]).await;
    assert!(refused.contains("only admins"), "{refused}");
    assert!(
        !refused.contains("encryption"),
        "a refusal is no encryption failure: {refused}"
    );
    let (status, body) = carol
        .api
        .post_json(&format!("/api/groups/{gid}/info"), &json!({ "name": "carol's" }))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(error_of(&body).starts_with("not allowed: "), "{body}");
    let refused = cli_err(&alice.dir, &["group", "role", &gid, "bob", "king"]).await;
    assert!(refused.contains("role must be owner, admin or member"), "{refused}");

    // Bob becomes an admin: the members output of every member shows it.
    alice.cli(&["group", "role", &gid, "bob", "admin"]).await;
    let with_admin = roles(&[(&alice, "owner"), (&bob, "admin"), (&carol, "member")]);
    for p in [&alice, &bob, &carol] {
        eventually_async("bob is an admin", || async {
            p.members(&gid).await.members == with_admin
        })
        .await;
    }
    assert_eq!(
        carol.listed(&gid).await.map(|g| g.name),
        Some("best friends".to_owned()),
        "the role change kept the name"
    );

    // Carol is removed: her node says so, and she reads nothing more.
    alice.cli(&["group", "remove", &gid, "carol"]).await;
    eventually_async("carol's node reports the group as left", || async {
        carol.api.get::<GroupView>(&format!("/api/groups/{gid}")).await.left
    })
    .await;
    assert!(carol.listed(&gid).await.is_some_and(|g| g.left), "listed as left");
    let two = roles(&[(&alice, "owner"), (&bob, "admin")]);
    for p in [&alice, &bob] {
        eventually_async("two members left", || async { p.members(&gid).await.members == two }).await;
    }
    bob.send(&gid, "carol is gone").await;
    alice.wait_text(&gid, "carol is gone").await;
    settle().await;
    let carols = carol.texts(&gid).await;
    assert!(
        !carols.iter().any(|t| t == "carol is gone"),
        "a removed member reads on: {carols:?}"
    );
    assert_eq!(carols, ["welcome carol"], "carol keeps what she had");
    let refused = cli_err(&carol.dir, &["group", "send", &gid, "let me back"]).await;
    assert!(refused.contains("no longer a member of group"), "{refused}");
    let (status, body) = carol
        .api
        .post_json(
            &format!("/api/groups/{gid}/messages"),
            &json!({ "text": "let me back" }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let error = error_of(&body);
    assert!(
        error.contains("group") && !error.contains("conversation") && !error.contains("contact"),
        "{body}"
    );

    drop((alice, bob, carol));
    drop(r.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_shows_this_device_and_the_api_refuses_bad_group_requests() {
    let r = relays(2).await;
    let alice = Person::start(&r, "alice").await;

    // One device, this one, the same through the CLI and the API.
    let out = alice.cli(&["device", "list"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one device: {out}");
    let devices: Vec<DeviceView> = alice.api.get("/api/devices").await;
    assert_eq!(devices.len(), 1);
    assert!(devices[0].this_device);
    assert!(devices[0].expires_ms > devices[0].created_ms);
    let key = &devices[0].device;
    assert!(
        key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit()),
        "device key is hex: {key}"
    );
    assert!(lines[0].starts_with(&format!("{key}  since ")), "{out}");
    assert!(lines[0].ends_with("(this device)"), "{out}");

    let gid = parse_groups(&alice.cli(&["group", "create", "notes"]).await)
        .pop()
        .expect("group create shows the group")
        .id;
    let before: GroupView = alice.api.get(&format!("/api/groups/{gid}")).await;
    assert_eq!(before.members.len(), 1);

    // An empty text.
    let (status, body) = alice
        .api
        .post_json(&format!("/api/groups/{gid}/messages"), &json!({ "text": "" }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("empty")), "{body}");

    // A group that does not exist (a well-formed id, and not hex at all):
    // 404 and "unknown group", whether read, sent to or changed.
    for unknown in ["00112233445566778899aabbccddeeff", "not-a-group"] {
        let (status, body) = alice
            .api
            .post_json(&format!("/api/groups/{unknown}/messages"), &json!({ "text": "hello?" }))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}: {body}");
        assert!(
            error_of(&body).starts_with(&format!("unknown group: {unknown}")),
            "{body}"
        );
        let (status, body) = alice.get_status(&format!("/api/groups/{unknown}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}: {body}");
        assert!(error_of(&body).starts_with("unknown group: "), "{body}");
        let (status, body) = alice
            .api
            .post_json(&format!("/api/groups/{unknown}/info"), &json!({ "name": "x" }))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}: {body}");
        assert!(error_of(&body).starts_with("unknown group: "), "{body}");
        let refused = cli_err(&alice.dir, &["group", "send", unknown, "hello?"]).await;
        assert!(refused.contains("unknown group"), "{refused}");
    }

    // A body without the text field.
    let (status, body) = alice
        .api
        .post_json(&format!("/api/groups/{gid}/messages"), &json!({ "txt": "typo" }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("text")), "{body}");

    // Moving a group to no relays at all, or to an address without a peer id.
    let (status, body) = alice
        .api
        .post_json(&format!("/api/groups/{gid}/relays"), &json!({ "relays": [] }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error_of(&body),
        "invalid input: a group needs at least one relay",
        "{body}"
    );
    let (status, body) = alice
        .api
        .post_json(
            &format!("/api/groups/{gid}/relays"),
            &json!({ "relays": ["/ip4/127.0.0.1/tcp/1"] }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_of(&body).contains("/p2p/"), "{body}");
    assert!(
        !error_of(&body).contains("contact"),
        "a relay address is no contact: {body}"
    );

    // Nothing of that changed the group or its history.
    let after: GroupView = alice.api.get(&format!("/api/groups/{gid}")).await;
    assert_eq!(after.relays, before.relays);
    assert_eq!(after.epoch, before.epoch);
    assert!(alice.texts(&gid).await.is_empty());

    drop(alice);
    drop(r.nodes);
}

/// Leaving is a proposal (a commit cannot remove its own committer) that the
/// other member commits: the leaver's node then shows the group as left,
/// and what is sent afterwards never reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_leaves_through_the_cli_is_out_and_reads_nothing_more() {
    let r = relays(2).await;
    let alice = Person::start(&r, "alice").await;
    let bob = Person::start(&r, "bob").await;
    alice.add_contact(&bob).await;
    bob.add_contact(&alice).await;
    let gid = parse_groups(&alice.cli(&["group", "create", "pair", "--member", "bob"]).await)
        .pop()
        .expect("group create shows the group")
        .id;
    bob.wait_joined(&gid).await;
    bob.send(&gid, "bye").await;
    alice.wait_text(&gid, "bye").await;

    // Bob leaves: his node says so, alice is alone and bob reads nothing more.
    let out = bob.cli(&["group", "leave", &gid]).await;
    assert_eq!(out.trim(), format!("left {gid}"));
    eventually_async("bob's node reports the group as left", || async {
        bob.api.get::<GroupView>(&format!("/api/groups/{gid}")).await.left
    })
    .await;
    let alone = roles(&[(&alice, "owner")]);
    eventually_async("alice is the only member", || async {
        alice.members(&gid).await.members == alone
    })
    .await;
    alice.send(&gid, "anyone here?").await;
    alice.wait_text(&gid, "anyone here?").await;
    settle().await;
    let bobs = bob.texts(&gid).await;
    assert!(
        !bobs.iter().any(|t| t == "anyone here?"),
        "bob reads on after leaving: {bobs:?}"
    );
    assert!(bobs.iter().any(|t| t == "bye"), "bob keeps his history");

    drop((alice, bob));
    drop(r.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_from_the_cli_work_with_or_without_a_running_node_and_ui_link_logs_a_browser_in() {
    let r = relays(1).await;
    let dir = r.dir.path().join("alice");
    init(&dir, "alice").await;
    // No node running: the token goes straight into the store.
    let read = cli(&dir, &["token", "create", "--scope", "read", "--name", "dashboard"]).await;
    let read = read.trim().to_owned();
    assert!(
        read.len() == 64 && read.chars().all(|c| c.is_ascii_hexdigit()),
        "{read}"
    );
    assert!(
        cli_err(&dir, &["token", "create", "--scope", "admin"])
            .await
            .contains("--scope")
    );
    let _node = spawn_node_with(&dir, &r.addrs[0].to_string(), &r.addrs).await;
    // A node running: through its API.
    let send = cli(&dir, &["token", "create", "--scope", "send"])
        .await
        .trim()
        .to_owned();
    let addr = std::fs::read_to_string(dir.join(ADDR_FILE)).unwrap();
    let base = format!("http://{}", addr.trim());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |token: &str| http.get(format!("{base}/api/chats")).bearer_auth(token).send();
    assert_eq!(get(&read).await.unwrap().status(), 200);
    assert_eq!(get(&send).await.unwrap().status(), 403);
    let r2 = http
        .post(format!("{base}/api/tokens"))
        .bearer_auth(&read)
        .json(&json!({ "scope": "full" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 403, "a read token makes no tokens");
    // `tidings ui-link` prints a one-time login link to this node.
    let out = cli(&dir, &["ui-link"]).await;
    let url = out.trim().strip_prefix("open ").expect("open <url>").to_owned();
    assert!(url.starts_with(&format!("{base}/login?code=")), "{url}");
    let login = http.get(&url).send().await.unwrap();
    assert_eq!(login.status(), 303);
    assert!(
        login.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with(&format!("tidings_session_{}=", base.rsplit(':').next().unwrap()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidings_run_prints_a_login_link_that_works_once() {
    let r = relays(1).await;
    let dir = r.dir.path().join("alice");
    init(&dir, "alice").await;
    let mut child = tidings_run(&dir, &r.addrs[0]).spawn().unwrap();
    let url = login_link(&mut child).await;
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/login?code="),
        "{url}"
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    assert_eq!(http.get(&url).send().await.unwrap().status(), 303);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401, "single use");
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_initialised_with_a_passphrase_runs_only_when_given_it() {
    let r = relays(1).await;
    let dir = r.dir.path().join("alice");
    let (good, bad) = (r.dir.path().join("good"), r.dir.path().join("bad"));
    std::fs::write(&good, "correct horse\n").unwrap();
    std::fs::write(&bad, "wrong horse\n").unwrap();
    let out = tidings()
        .arg("--data-dir")
        .arg(&dir)
        .args(["init", "--name", "alice", "--passphrase-file"])
        .arg(&good)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = tidings_node::open_store(&dir).unwrap();
    assert!(store.is_locked().unwrap(), "sealed from the first write");
    drop(store);

    let run = |file: Option<&PathBuf>| {
        let mut c = tidings_run(&dir, &r.addrs[0]);
        c.stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(f) = file {
            c.arg("--passphrase-file").arg(f);
        }
        c
    };
    // Without a terminal or a file, and with the wrong passphrase: refused.
    let out = run(None).output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sealed by a passphrase"), "{err}");
    let out = run(Some(&bad)).output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong passphrase"), "{err}");

    // With it: the node runs and serves its UI.
    let mut child = run(Some(&good)).spawn().unwrap();
    let url = login_link(&mut child).await;
    assert!(url.contains("/login?code="), "{url}");
    drop(child);
}

/// The login link a `tidings run` child prints (its stdout piped); the rest of
/// its output is read and dropped.
async fn login_link(child: &mut Child) -> String {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("open ") {
                return url.to_owned();
            }
        }
        panic!("no login link printed");
    })
    .await
    .expect("a login link");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    url
}

/// `tidings run` for `dir` on loopback, bootstrapping from `boot`, its stdout piped.
fn tidings_run(dir: &std::path::Path, boot: &libp2p::Multiaddr) -> tokio::process::Command {
    let mut c = tidings();
    c.arg("--data-dir")
        .arg(dir)
        .args([
            "run",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            &boot.to_string(),
        ])
        .stdout(std::process::Stdio::piped());
    c
}
