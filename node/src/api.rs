//! The local JSON/HTTP API, served on 127.0.0.1 only.
//!
//! Every request must carry `Authorization: Bearer <token>` (the token lives in
//! the data directory, readable only by its owner) and a loopback `Host`
//! header; a browser `Origin`, if present, must be a loopback origin too. That
//! refuses other local users, other web sites and DNS-rebinding attacks.
//!
//! Routes:
//! - `GET  /api/status`
//! - `GET  /api/card`
//! - `GET  /api/contacts`, `POST /api/contacts` `{ "card": "...", "name": "..." }`
//! - `GET  /api/contacts/{contact}/messages`
//! - `POST /api/messages` `{ "contact": "...", "text": "..." }`
//! - `GET  /api/groups`, `POST /api/groups` `{ "name": "...", "members": ["contact", ...] }`
//! - `GET  /api/groups/{group}`, `GET /api/groups/{group}/messages`,
//!   `POST /api/groups/{group}/messages` `{ "text": "..." }`
//! - `POST /api/groups/{group}/members` `{ "contacts": ["...", ...] }` (invite)
//! - `DELETE /api/groups/{group}/members/{member}` (remove; your own account: leave)
//! - `POST /api/groups/{group}/info` `{ "name": "...", "description": "..." }`
//! - `POST /api/groups/{group}/relays` `{ "relays": ["/ip4/…/p2p/…", ...] }` (move; admins)
//! - `POST /api/groups/{group}/roles` `{ "member": "...", "role": "owner" | "admin" | "member" }`
//! - `POST /api/devices/link` (a link code for a new device), `GET /api/devices`,
//!   `DELETE /api/devices/{device}` (revoke)
//! - `GET  /api/events` (server-sent events, one JSON `NodeEvent` each)
//!
//! Errors answer `{ "error": "..." }` with the status saying whose fault it was:
//! 400 for a malformed request or argument, 401 without the right token, 403
//! for a refused host or origin, a change the group's rules do not allow this
//! account ("not allowed: …") or a group this device is no longer in, 404 for
//! an unknown contact or group, 409 for a contact with no conversation yet, 502
//! when the network or the contact's devices fail, 503 while the node stops,
//! and 500 for storage and encryption failures.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;

use crate::core::{GroupView, NodeError};
use crate::node::NodeHandle;
use crate::types::{ContactView, MessageView, NodeStatus};

/// File in the data directory holding the API token.
pub const TOKEN_FILE: &str = "api-token";
/// File in the data directory holding the address the API listens on.
pub const ADDR_FILE: &str = "api-addr";

#[derive(Clone)]
struct ApiState {
    node: NodeHandle,
    token: Arc<str>,
}

/// A JSON error body: `{ "error": "..." }`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(skip)]
    status: u16,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self {
            error: msg.into(),
            status: status.as_u16(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({ "error": self.error }))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::UnknownContact(_) | NodeError::UnknownGroup(_) | NodeError::UnknownMessage(_) => {
                StatusCode::NOT_FOUND
            }
            NodeError::BadText | NodeError::InvalidContact(_) | NodeError::InvalidInput(_) | NodeError::Card(_) => {
                StatusCode::BAD_REQUEST
            }
            NodeError::NoConversation => StatusCode::CONFLICT,
            NodeError::NotAMember(_) | NodeError::NotAllowed(_) => StatusCode::FORBIDDEN,
            NodeError::Unreachable(_) | NodeError::Net(_) => StatusCode::BAD_GATEWAY,
            NodeError::Stopped | NodeError::Randomness => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::Mls(tidings_protocol::MlsError::Unauthorized(_)) => StatusCode::FORBIDDEN,
            NodeError::Store(_) | NodeError::Mls(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CardView {
    pub uri: String,
    pub account: String,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AddContactBody {
    pub card: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SendBody {
    pub contact: String,
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateGroupBody {
    pub name: String,
    #[serde(default)]
    pub members: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GroupTextBody {
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InviteBody {
    pub contacts: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RelaysBody {
    pub relays: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GroupInfoBody {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RoleBody {
    pub member: String,
    pub role: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LinkCodeView {
    pub code: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceView {
    /// The device key, hex.
    pub device: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub this_device: bool,
}

/// Builds the API router.
pub fn router(node: NodeHandle, token: &str) -> Router {
    let state = ApiState {
        node,
        token: Arc::from(token),
    };
    Router::new()
        .route("/api/status", get(status))
        .route("/api/card", get(card))
        .route("/api/contacts", get(contacts).post(add_contact))
        .route("/api/contacts/{contact}/messages", get(history))
        .route("/api/messages", post(send))
        .route("/api/groups", get(groups).post(create_group))
        .route("/api/groups/{group}", get(group))
        .route("/api/groups/{group}/messages", get(group_history).post(send_group))
        .route("/api/groups/{group}/members", post(invite))
        .route("/api/groups/{group}/members/{member}", delete(remove_member))
        .route("/api/groups/{group}/info", post(group_info))
        .route("/api/groups/{group}/roles", post(group_role))
        .route("/api/groups/{group}/relays", post(group_relays))
        .route("/api/devices", get(devices))
        .route("/api/devices/link", post(link_device))
        .route("/api/devices/{device}", delete(revoke_device))
        .route("/api/events", get(events))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Binds `addr` (must be a loopback address) and serves the API until the task is aborted.
pub async fn serve(
    node: NodeHandle,
    addr: SocketAddr,
    token: &str,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    if !addr.ip().is_loopback() {
        anyhow::bail!("the API only listens on loopback addresses, not {addr}");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(node, token);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("API server stopped: {e}");
        }
    });
    Ok((local, task))
}

fn host_is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    matches!(name, "127.0.0.1" | "localhost" | "::1")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn guard(State(state): State<ApiState>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if !host_is_loopback(host) {
        return ApiError::new(StatusCode::FORBIDDEN, "requests must be addressed to a loopback host").into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(host_is_loopback);
        if !ok {
            return ApiError::new(StatusCode::FORBIDDEN, "cross-origin requests are refused").into_response();
        }
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(token.as_bytes(), state.token.as_bytes()) {
        return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API token").into_response();
    }
    next.run(req).await
}

async fn status(State(s): State<ApiState>) -> Result<Json<NodeStatus>, ApiError> {
    Ok(Json(s.node.status().await?))
}

async fn card(State(s): State<ApiState>) -> Json<CardView> {
    let card = s.node.card();
    Json(CardView {
        uri: card.to_uri(),
        account: card.account.to_base58(),
        name: card.name,
    })
}

async fn contacts(State(s): State<ApiState>) -> Result<Json<Vec<ContactView>>, ApiError> {
    Ok(Json(s.node.contacts()?))
}

async fn add_contact(
    State(s): State<ApiState>,
    body: Result<Json<AddContactBody>, JsonRejection>,
) -> Result<Json<ContactView>, ApiError> {
    let Json(body) = body?;
    Ok(Json(s.node.add_contact(&body.card, body.name.as_deref()).await?))
}

async fn history(State(s): State<ApiState>, Path(contact): Path<String>) -> Result<Json<Vec<MessageView>>, ApiError> {
    Ok(Json(s.node.history(&contact)?))
}

async fn send(
    State(s): State<ApiState>,
    body: Result<Json<SendBody>, JsonRejection>,
) -> Result<Json<MessageView>, ApiError> {
    let Json(body) = body?;
    Ok(Json(s.node.send_text(&body.contact, &body.text).await?))
}

async fn groups(State(s): State<ApiState>) -> Result<Json<Vec<GroupView>>, ApiError> {
    Ok(Json(s.node.groups().await?))
}

async fn create_group(
    State(s): State<ApiState>,
    body: Result<Json<CreateGroupBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let Json(body) = body?;
    let members: Vec<&str> = body.members.iter().map(String::as_str).collect();
    Ok(Json(s.node.create_group(&body.name, &members).await?))
}

async fn group(State(s): State<ApiState>, Path(group): Path<String>) -> Result<Json<GroupView>, ApiError> {
    Ok(Json(s.node.group(&group).await?))
}

async fn group_history(
    State(s): State<ApiState>,
    Path(group): Path<String>,
) -> Result<Json<Vec<MessageView>>, ApiError> {
    Ok(Json(s.node.group_history(&group)?))
}

async fn send_group(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    body: Result<Json<GroupTextBody>, JsonRejection>,
) -> Result<Json<MessageView>, ApiError> {
    let Json(body) = body?;
    Ok(Json(s.node.send_group(&group, &body.text).await?))
}

async fn invite(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    body: Result<Json<InviteBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let Json(body) = body?;
    let contacts: Vec<&str> = body.contacts.iter().map(String::as_str).collect();
    s.node.invite(&group, &contacts).await?;
    Ok(Json(s.node.group(&group).await?))
}

async fn remove_member(
    State(s): State<ApiState>,
    Path((group, member)): Path<(String, String)>,
) -> Result<Json<GroupView>, ApiError> {
    if member == s.node.account().to_base58() {
        s.node.leave_group(&group).await?;
    } else {
        s.node.remove_member(&group, &member).await?;
    }
    Ok(Json(s.node.group(&group).await?))
}

async fn group_info(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    body: Result<Json<GroupInfoBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let Json(body) = body?;
    s.node
        .set_group_info(&group, body.name.as_deref(), body.description.as_deref())
        .await?;
    Ok(Json(s.node.group(&group).await?))
}

async fn group_relays(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    body: Result<Json<RelaysBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let Json(body) = body?;
    s.node.move_group(&group, body.relays).await?;
    Ok(Json(s.node.group(&group).await?))
}

async fn group_role(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    body: Result<Json<RoleBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let Json(body) = body?;
    let role = parse_role(&body.role)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "role must be owner, admin or member"))?;
    s.node.set_group_role(&group, &body.member, role).await?;
    Ok(Json(s.node.group(&group).await?))
}

/// `owner`, `admin` or `member`.
pub fn parse_role(s: &str) -> Option<tidings_protocol::group::Role> {
    use tidings_protocol::group::Role;
    match s {
        "owner" => Some(Role::Owner),
        "admin" => Some(Role::Admin),
        "member" => Some(Role::Member),
        _ => None,
    }
}

async fn link_device(State(s): State<ApiState>) -> Result<Json<LinkCodeView>, ApiError> {
    Ok(Json(LinkCodeView {
        code: s.node.link_offer().await?,
    }))
}

async fn devices(State(s): State<ApiState>) -> Result<Json<Vec<DeviceView>>, ApiError> {
    let me = s.node.card().devices.first().map(|d| d.device_key);
    Ok(Json(
        s.node
            .devices()?
            .iter()
            .map(|c| DeviceView {
                device: hex::encode(c.device_key),
                created_ms: c.created_ms,
                expires_ms: c.expires_ms,
                this_device: Some(c.device_key) == me,
            })
            .collect(),
    ))
}

async fn revoke_device(
    State(s): State<ApiState>,
    Path(device): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let groups = s.node.revoke_device(&device).await?;
    Ok(Json(serde_json::json!({ "groups": groups })))
}

async fn events(State(s): State<ApiState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = BroadcastStream::new(s.node.subscribe()).filter_map(|ev| {
        let ev = ev.ok()?;
        let data = serde_json::to_string(&ev).ok()?;
        Some(Ok(Event::default().data(data)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        assert!(host_is_loopback("127.0.0.1:8080"));
        assert!(host_is_loopback("localhost:1"));
        assert!(host_is_loopback("[::1]:80"));
        assert!(!host_is_loopback("evil.example:80"));
        assert!(!host_is_loopback("127.0.0.1.evil.example"));
    }

    fn status_of(e: NodeError) -> (u16, String) {
        let api = ApiError::from(e);
        (api.status, api.error)
    }

    #[test]
    fn group_errors_have_their_own_status_and_words() {
        let (status, msg) = status_of(NodeError::UnknownGroup("00ff".into()));
        assert_eq!((status, msg.as_str()), (404, "unknown group: 00ff"));
        let (status, msg) = status_of(NodeError::NotAMember("00ff".into()));
        assert_eq!(status, 403);
        assert!(msg.contains("no longer a member of group 00ff"), "{msg}");
        let (status, msg) = status_of(NodeError::InvalidInput("a group needs at least one relay".into()));
        assert_eq!(
            (status, msg.as_str()),
            (400, "invalid input: a group needs at least one relay")
        );
        // Neither speaks of a contact or a conversation.
        for e in [NodeError::UnknownGroup("x".into()), NodeError::NotAMember("x".into())] {
            let (_, msg) = status_of(e);
            assert!(!msg.contains("contact") && !msg.contains("conversation"), "{msg}");
        }
        assert_eq!(status_of(NodeError::NoConversation).0, 409);
        assert_eq!(status_of(NodeError::UnknownContact("bob".into())).0, 404);
    }

    #[test]
    fn a_refusal_by_the_group_rules_is_forbidden_and_says_so() {
        let e = NodeError::from(tidings_protocol::MlsError::Unauthorized(
            "only admins change the group".into(),
        ));
        assert!(matches!(e, NodeError::NotAllowed(_)), "{e:?}");
        let (status, msg) = status_of(e);
        assert_eq!(
            (status, msg.as_str()),
            (403, "not allowed: only admins change the group")
        );
        // Other MLS failures stay internal errors.
        let (status, msg) = status_of(tidings_protocol::MlsError::Encrypt("x".into()).into());
        assert_eq!(status, 500);
        assert!(msg.starts_with("encryption: "), "{msg}");
    }
}
