//! The local API over real HTTP, in front of real nodes: the OpenAPI
//! document against the routes, authentication (token file, scoped tokens,
//! login links and the session cookie, the WebSocket's token), Host and
//! Origin checks, 4xx JSON errors for bad input, and chat routes end to end.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures::StreamExt as _;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidings_node::NodeHandle;

/// Every route the UI contract names, plus the routes the API had before it.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/status"),
    ("GET", "/api/card"),
    ("GET", "/api/card/qr.svg"),
    ("GET", "/api/contacts"),
    ("POST", "/api/contacts"),
    ("GET", "/api/contacts/{contact}/messages"),
    ("GET", "/api/contacts/{contact}/picture"),
    ("POST", "/api/messages"),
    ("GET", "/api/chats"),
    ("GET", "/api/chats/{chat}"),
    ("PATCH", "/api/chats/{chat}"),
    ("GET", "/api/chats/{chat}/messages"),
    ("POST", "/api/chats/{chat}/messages"),
    ("PATCH", "/api/chats/{chat}/messages/{id}"),
    ("DELETE", "/api/chats/{chat}/messages/{id}"),
    ("POST", "/api/chats/{chat}/messages/{id}/reactions"),
    ("POST", "/api/chats/{chat}/read"),
    ("POST", "/api/chats/{chat}/typing"),
    ("GET", "/api/search"),
    ("GET", "/api/settings"),
    ("PATCH", "/api/settings"),
    ("POST", "/api/settings/passphrase"),
    ("GET", "/api/presence"),
    ("GET", "/api/groups"),
    ("POST", "/api/groups"),
    ("GET", "/api/groups/{group}"),
    ("GET", "/api/groups/{group}/messages"),
    ("POST", "/api/groups/{group}/messages"),
    ("POST", "/api/groups/{group}/members"),
    ("DELETE", "/api/groups/{group}/members/{member}"),
    ("POST", "/api/groups/{group}/info"),
    ("POST", "/api/groups/{group}/relays"),
    ("POST", "/api/groups/{group}/roles"),
    ("GET", "/api/devices"),
    ("POST", "/api/devices/link"),
    ("DELETE", "/api/devices/{device}"),
    ("GET", "/api/events"),
    ("GET", "/api/ws"),
    ("GET", "/api/openapi.json"),
    ("POST", "/api/login-codes"),
    ("POST", "/api/tokens"),
    ("GET", "/login"),
];

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
    _task: tokio::task::JoinHandle<()>,
}

impl Api {
    async fn serve(h: &NodeHandle) -> Api {
        let token = "t0ken-for-tests".to_owned();
        let served = tidings_node::api::serve_api(h.clone(), "127.0.0.1:0".parse().unwrap(), &token)
            .await
            .expect("API serves");
        Api {
            base: format!("http://{}", served.addr),
            token,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            _task: served.task,
        }
    }

    fn req(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self.req(method, path, Some(&self.token));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn token(&self, scope: &str) -> String {
        let (status, v) = self
            .call(
                Method::POST,
                "/api/tokens",
                Some(json!({ "scope": scope, "name": "test" })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["token"].as_str().unwrap().to_owned()
    }
}

fn fill(path: &str, chat: &str) -> String {
    path.replace("{chat}", chat)
        .replace("{id}", &"ab".repeat(16))
        .replace("{contact}", "nobody")
        .replace("{group}", "00ff")
        .replace("{member}", "nobody")
        .replace("{device}", "00")
}

fn method(m: &str) -> Method {
    Method::from_bytes(m.as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_in_the_openapi_document_and_every_documented_route_is_served() {
    let net = Net::new().await;
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    let api = Api::serve(&a).await;
    let (status, doc) = api.call(Method::GET, "/api/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    // The event streams' messages are described too.
    assert!(
        doc["components"]["schemas"]["NodeEvent"].is_object(),
        "NodeEvent schema"
    );
    assert!(doc["components"]["schemas"]["MessageView"].is_object());
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in ["get", "post", "patch", "delete", "put"] {
            if item.get(m).is_some() {
                documented.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, expected, "the document lists exactly the API's routes");
    // Each documented route is routed: the router's own 404/405 has no JSON body.
    let chat = format!("c:{}", acct(&b));
    for (m, p) in &documented {
        let url = fill(p, &chat);
        let mut r = api.req(method(m), &url, Some(&api.token));
        if m != "GET" && m != "DELETE" {
            r = r.json(&json!({}));
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        if p == "/api/events" {
            assert_eq!(status, StatusCode::OK);
            continue;
        }
        let body = resp.bytes().await.unwrap();
        if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
            let v: Value = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("{m} {p}: {status} from the router, not from a handler"));
            assert!(v["error"].is_string(), "{m} {p}: {v}");
        }
        assert!(!status.is_server_error(), "{m} {p}: {status}");
    }
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_credentials_are_401_and_wrong_scopes_403() {
    let net = Net::new().await;
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    let api = Api::serve(&a).await;
    let chat = format!("c:{}", acct(&b));
    for (m, p) in ROUTES {
        if *p == "/login" {
            continue;
        }
        let resp = api.req(method(m), &fill(p, &chat), None).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{m} {p} without a token");
        let resp = api
            .req(method(m), &fill(p, &chat), Some("not-a-token"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{m} {p} with a wrong token");
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"].is_string());
    }

    let read = api.token("read").await;
    let send = api.token("send").await;
    let full = api.token("full").await;
    // Read: every GET, nothing else.
    let r = api.req(Method::GET, "/api/chats", Some(&read)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = api
        .req(Method::POST, &format!("/api/chats/{chat}/messages"), Some(&read))
        .json(&json!({ "text": "hi" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().starts_with("token scope"), "{v}");
    let r = api
        .req(Method::PATCH, "/api/settings", Some(&read))
        .json(&json!({ "presence": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Send: sending only.
    let r = api.req(Method::GET, "/api/chats", Some(&send)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = api
        .req(Method::POST, "/api/tokens", Some(&send))
        .json(&json!({ "scope": "full" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a send token cannot make a full one");
    let r = api
        .req(Method::POST, &format!("/api/chats/{chat}/messages"), Some(&send))
        .json(&json!({ "text": "from a bot" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Full: anything.
    let r = api
        .req(Method::PATCH, &format!("/api/chats/{chat}"), Some(&full))
        .json(&json!({ "pinned": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_and_origins_including_other_local_ports_are_refused_on_every_route() {
    let net = Net::new().await;
    let a_node = net.node("alice").await;
    let api = Api::serve(&a_node.handle()).await;
    for (m, p) in ROUTES {
        let url = fill(p, "c:x");
        let r = api
            .req(method(m), &url, Some(&api.token))
            .header("Host", "evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{m} {p} for host evil.example");
        let r = api
            .req(method(m), &url, Some(&api.token))
            .header("Origin", "http://evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{m} {p} from origin evil.example");
        // Another server on this machine is another origin, though the same site.
        let r = api
            .req(method(m), &url, Some(&api.token))
            .header("Origin", "http://127.0.0.1:1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{m} {p} from another local port");
    }
    // The node's own origin passes.
    let own = api.base.clone();
    let r = api
        .req(Method::GET, "/api/chats", Some(&api.token))
        .header("Origin", own)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    drop(a_node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_and_arguments_are_400_with_a_json_error() {
    let net = Net::new().await;
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    let api = Api::serve(&a).await;
    let chat = format!("c:{}", acct(&b));
    let sent = a.send_chat(&chat, "hello", None).await.unwrap();
    for (m, p) in ROUTES {
        if *m == "GET" || *m == "DELETE" || p.contains("{group}") || p.contains("/devices") {
            continue;
        }
        let url = fill(p, &chat).replace(&"ab".repeat(16), &sent.id);
        for bad in [
            "{not json",
            "[1,2]",
            "{\"text\": 5, \"scope\": 7, \"up_to\": 1, \"emoji\": 2}",
        ] {
            let r = api
                .req(method(m), &url, Some(&api.token))
                .header("Content-Type", "application/json")
                .body(bad)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            // Routes without a body ignore it; every other one refuses it.
            if p.ends_with("/typing") || *p == "/api/login-codes" || *p == "/api/devices/link" {
                assert!(status.is_success(), "{m} {p}: {status}");
                continue;
            }
            assert_eq!(status, StatusCode::BAD_REQUEST, "{m} {p} with {bad}: {v}");
            assert!(v["error"].is_string(), "{m} {p}: {v}");
        }
    }
    let bad_args: &[(Method, String, Option<Value>)] = &[
        (Method::GET, "/api/chats/nonsense".into(), None),
        (Method::GET, "/api/chats/c:notbase58!".into(), None),
        (Method::GET, format!("/api/chats/{chat}/messages?limit=abc"), None),
        (Method::GET, format!("/api/chats/{chat}/messages?limit=0"), None),
        (Method::GET, format!("/api/chats/{chat}/messages?before=xyz"), None),
        (Method::GET, "/api/search".into(), None),
        (
            Method::POST,
            format!("/api/chats/{chat}/messages"),
            Some(json!({ "text": "" })),
        ),
        (
            Method::POST,
            format!("/api/chats/{chat}/messages"),
            Some(json!({ "text": "x", "reply_to": "zz" })),
        ),
        (
            Method::POST,
            format!("/api/chats/{chat}/messages"),
            Some(json!({ "text": "x", "extra": 1 })),
        ),
        (
            Method::POST,
            format!("/api/chats/{chat}/messages/{}/reactions", sent.id),
            Some(json!({ "emoji": "lol" })),
        ),
        (
            Method::PATCH,
            format!("/api/chats/{chat}"),
            Some(json!({ "disappearing_secs": u64::MAX })),
        ),
        (
            Method::PATCH,
            "/api/settings".into(),
            Some(json!({ "picture": "http://example.com/x.png" })),
        ),
        (Method::PATCH, "/api/settings".into(), Some(json!({ "name": "" }))),
        (
            Method::POST,
            "/api/settings/passphrase".into(),
            Some(json!({ "new": "short" })),
        ),
        (Method::POST, "/api/tokens".into(), Some(json!({ "scope": "admin" }))),
    ];
    for (m, p, body) in bad_args {
        let (status, v) = api.call(m.clone(), p, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{m} {p}: {v}");
        assert!(v["error"].is_string(), "{m} {p}: {v}");
    }
    // Too large: a text over 64 KiB, a body over the server's limit.
    let long = "x".repeat(64 * 1024 + 1);
    let (status, v) = api
        .call(
            Method::POST,
            &format!("/api/chats/{chat}/messages"),
            Some(json!({ "text": long })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    // The server stops reading past its limit: the client sees a 4xx with a
    // JSON error, or, if it was still sending, the connection closed. Never a 5xx.
    // It goes on a client of its own: the server closes that connection, and a
    // pooled client could hand the dying connection to the next request.
    let huge = "y".repeat(3 << 20);
    let once = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let sent = once
        .post(format!("{}/api/chats/{chat}/messages", api.base))
        .bearer_auth(&api.token)
        .json(&json!({ "text": huge }))
        .send()
        .await;
    if let Ok(r) = sent {
        let status = r.status();
        assert!(status.is_client_error(), "{status}");
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(v["error"].is_string(), "{v}");
    }
    // Unknown things are 404s.
    let unknown: &[(Method, String)] = &[
        (Method::GET, format!("/api/chats/c:{}", acct(&a_node.handle()))),
        (
            Method::GET,
            format!("/api/chats/{chat}/messages?before={}", "cd".repeat(16)),
        ),
        (
            Method::DELETE,
            format!("/api/chats/{chat}/messages/{}", "cd".repeat(16)),
        ),
        (Method::GET, "/api/chats/g:00ff".into()),
    ];
    for (m, p) in unknown {
        let (status, v) = api.call(m.clone(), p, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{m} {p}: {v}");
    }
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_link_works_once_and_its_cookie_opens_the_api() {
    let net = Net::new().await;
    let a_node = net.node("alice").await;
    let api = Api::serve(&a_node.handle()).await;
    let (status, v) = api.call(Method::POST, "/api/login-codes", None).await;
    assert_eq!(status, StatusCode::OK);
    let url = v["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&format!("{}/login?code=", api.base)), "{url}");
    let r = api.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Path=/"));
    let session = cookie.split(';').next().unwrap().to_owned();
    let r = api
        .http
        .get(format!("{}/api/settings", api.base))
        .header("Cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Single use.
    let r = api.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = api
        .http
        .get(format!("{}/api/settings", api.base))
        .header(
            "Cookie",
            format!("tidings_session_{}=forged", api.base.rsplit(':').next().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    drop(a_node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_routes_work_end_to_end_and_the_websocket_streams_events() {
    let net = Net::new().await;
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    let (api_a, api_b) = (Api::serve(&a).await, Api::serve(&b).await);
    let (chat_b, chat_a) = (format!("c:{}", acct(&b)), format!("c:{}", acct(&a)));
    // Bob watches his events over a WebSocket with a read token.
    let read = api_b.token("read").await;
    let ws_url = format!("{}/api/ws?token={read}", api_b.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.expect("websocket");
    // A WebSocket without credentials is refused.
    let refused = tokio_tungstenite::connect_async(format!("{}/api/ws", api_b.base.replace("http://", "ws://"))).await;
    assert!(refused.is_err());

    let mut sent = Vec::new();
    for text in ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"] {
        let (status, v) = api_a
            .call(
                Method::POST,
                &format!("/api/chats/{chat_b}/messages"),
                Some(json!({ "text": text })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        sent.push(v["id"].as_str().unwrap().to_owned());
    }
    // The WebSocket carries them as JSON message events, text untouched.
    let mut seen = Vec::new();
    tokio::time::timeout(TIMEOUT, async {
        while seen.len() < 2 {
            let Some(Ok(msg)) = ws.next().await else {
                panic!("websocket closed")
            };
            if let Ok(text) = msg.into_text() {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] == "message" {
                    seen.push(v["text"].as_str().unwrap().to_owned());
                }
            }
        }
    })
    .await
    .expect("two message events");
    assert_eq!(seen, ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]);
    // Bob's page of the chat: oldest first, exact text, JSON.
    let r = api_b
        .req(
            Method::GET,
            &format!("/api/chats/{chat_a}/messages?limit=10"),
            Some(&api_b.token),
        )
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let page: Vec<Value> = r.json().await.unwrap();
    let texts: Vec<&str> = page.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]);
    // Paging before the second gives the first.
    let (_, older) = api_b
        .call(
            Method::GET,
            &format!("/api/chats/{chat_a}/messages?before={}&limit=5", sent[1]),
            None,
        )
        .await;
    assert_eq!(older.as_array().unwrap().len(), 1);
    // Chats, unread, read, search, reactions, edit, delete through the API.
    let (_, chats) = api_b.call(Method::GET, "/api/chats", None).await;
    let c = chats
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == chat_a)
        .unwrap()
        .clone();
    assert_eq!((c["kind"].as_str(), c["unread"].as_u64()), (Some("contact"), Some(2)));
    let (status, _) = api_b
        .call(
            Method::POST,
            &format!("/api/chats/{chat_a}/read"),
            Some(json!({ "up_to": sent[1] })),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The UI percent-encodes chat ids in paths (`c%3A…`).
    let (status, c) = api_b
        .call(Method::GET, &format!("/api/chats/{}", chat_a.replace(':', "%3A")), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c["unread"], 0);
    let (_, found) = api_b.call(Method::GET, "/api/search?q=onerror&limit=5", None).await;
    assert_eq!(found.as_array().unwrap().len(), 1);
    let (status, m) = api_b
        .call(
            Method::POST,
            &format!("/api/chats/{chat_a}/messages/{}/reactions", sent[0]),
            Some(json!({ "emoji": "\u{1f44d}" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{m}");
    assert_eq!(m["reactions"][0]["emoji"], "\u{1f44d}");
    let (status, _) = api_b
        .call(
            Method::PATCH,
            &format!("/api/chats/{chat_a}/messages/{}", sent[0]),
            Some(json!({ "text": "mine now" })),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "bob cannot edit alice's message");
    let (status, _) = api_b
        .call(
            Method::DELETE,
            &format!("/api/chats/{chat_a}/messages/{}", sent[0]),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "bob cannot delete alice's message");
    let (status, m) = api_a
        .call(
            Method::PATCH,
            &format!("/api/chats/{chat_b}/messages/{}", sent[0]),
            Some(json!({ "text": "fixed" })),
        )
        .await;
    assert_eq!((status, m["text"].as_str()), (StatusCode::OK, Some("fixed")));
    let (status, _) = api_a
        .call(
            Method::DELETE,
            &format!("/api/chats/{chat_b}/messages/{}", sent[1]),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Bob's side follows, and alice sees both read.
    eventually_async("bob sees the edit and the delete", || {
        let b = b.clone();
        let (chat_a, s0, s1) = (chat_a.clone(), sent[0].clone(), sent[1].clone());
        async move {
            let page = b.chat_messages(&chat_a, None, 10).await.unwrap();
            page.iter().any(|m| m.id == s0 && m.text == "fixed") && page.iter().any(|m| m.id == s1 && m.deleted)
        }
    })
    .await;
    // Alice's picture reaches bob, who serves it as an image.
    let (status, _) = api_a
        .call(
            Method::PATCH,
            "/api/settings",
            Some(json!({ "picture": "data:image/png;base64,iVBORw0KGgo=" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let pic_url = format!("/api/contacts/{}/picture", acct(&a));
    eventually_async("bob serves alice's picture", || {
        let r = api_b.req(Method::GET, &pic_url, Some(&api_b.token)).send();
        async move { r.await.is_ok_and(|r| r.status() == StatusCode::OK) }
    })
    .await;
    let r = api_b
        .req(Method::GET, &pic_url, Some(&api_b.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"\x89PNG\r\n\x1a\n");
    // Settings, presence and the QR code.
    let (status, s) = api_a.call(Method::GET, "/api/settings", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s["account"], acct(&a));
    assert_eq!(s["read_receipts"], true);
    let (status, p) = api_a.call(Method::GET, "/api/presence", None).await;
    assert_eq!((status, p), (StatusCode::OK, json!([])));
    let r = api_a
        .req(Method::GET, "/api/card/qr.svg", Some(&api_a.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    assert!(r.text().await.unwrap().contains("<svg"));
    drop((a_node, b_node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_set_over_the_api_seals_the_keys_until_it_is_given_again() {
    let net = Net::new().await;
    let dir = net.dir.path().join("alice");
    let a_node = net.node("alice").await;
    let account = a_node.handle().account();
    let api = Api::serve(&a_node.handle()).await;
    let read = api.token("read").await;

    let r = api
        .req(Method::POST, "/api/settings/passphrase", Some(&read))
        .json(&json!({ "new": "correct horse" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "only a full token sets the passphrase"
    );
    let (status, v) = api
        .call(
            Method::POST,
            "/api/settings/passphrase",
            Some(json!({ "new": "correct horse" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["passphrase"], true);
    let (status, v) = api
        .call(
            Method::POST,
            "/api/settings/passphrase",
            Some(json!({ "current": "wrong horse", "new": "battery staple" })),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"], "wrong passphrase");
    let (status, _) = api
        .call(
            Method::POST,
            "/api/settings/passphrase",
            Some(json!({ "current": "correct horse", "new": "battery staple" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // The node keeps working on the sealed store.
    let (status, v) = api
        .call(Method::PATCH, "/api/settings", Some(json!({ "name": "alice 2" })))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // The HTTP client's idle connections keep server tasks (and the store) alive.
    let Api { _task: task, http, .. } = api;
    drop(http);
    task.abort();
    let _ = task.await;
    a_node.shutdown().await;

    // Restarted from its data directory: locked, and no node starts on it
    // until the passphrase opens it. (Tasks that held the store end shortly
    // after the shutdown.)
    let open = || async {
        let t0 = std::time::Instant::now();
        loop {
            match tidings_node::open_store(&dir) {
                Ok(s) => return s,
                Err(_) if t0.elapsed() < TIMEOUT => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("the data directory stays open: {e}"),
            }
        }
    };
    let store = open().await;
    assert!(store.is_locked().unwrap());
    assert!(matches!(store.identity(), Err(tidings_store::StoreError::Locked)));
    assert!(
        tidings_node::Node::start(store, tidings_node::NodeConfig::default())
            .await
            .is_err()
    );
    let store = open().await;
    assert!(matches!(
        store.unlock("correct horse"),
        Err(tidings_store::StoreError::WrongPassphrase)
    ));
    store.unlock("battery staple").unwrap();
    let node = tidings_node::Node::start(store, tidings_node::NodeConfig::default())
        .await
        .unwrap();
    assert_eq!(node.handle().account(), account);
    assert_eq!(node.handle().name(), "alice 2");
    assert!(node.handle().settings().unwrap().passphrase);
    node.shutdown().await;
}
