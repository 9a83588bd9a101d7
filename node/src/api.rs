//! The local JSON/HTTP API, served on 127.0.0.1 only.
//!
//! Every request must be addressed to a loopback `Host`; a browser `Origin`,
//! if present, must be this server's own origin (refuses other web sites,
//! other local servers and DNS-rebinding). Every `/api` route needs one of:
//! - `Authorization: Bearer <token>`: the token in the data directory's
//!   `api-token` file (full scope), or a scoped token made with
//!   `tidings token create --scope read|send|full` (stored hashed);
//! - the `tidings_session_<port>` cookie a one-time login link (`GET /login?code=…`) sets;
//! - for the WebSocket only, `?token=<token>` (browsers cannot set its headers).
//!
//! Scopes: `read` may use every GET route and the event streams; `send` only
//! `POST /api/chats/{chat}/messages` and `POST /api/messages`; `full` all.
//! A wrong scope is 403.
//!
//! Routes (each one is in the OpenAPI document at `/api/openapi.json`, which
//! is generated from the handlers' annotations by the same calls that route them):
//! - `GET  /api/status`, `GET /api/card`, `GET /api/card/qr.svg`
//! - `GET  /api/contacts`, `POST /api/contacts` `{ "card": "...", "name": "..." }`
//! - `GET  /api/contacts/{contact}/messages`, `GET /api/contacts/{contact}/picture` (the image)
//! - `POST /api/messages` `{ "contact": "...", "text": "..." }`
//! - `GET  /api/chats`, `GET /api/chats/{chat}`, `PATCH /api/chats/{chat}`
//!   `{ "pinned"?, "muted"?, "disappearing_secs"? }`
//! - `GET  /api/chats/{chat}/messages?before=<id>&limit=<n>`,
//!   `POST /api/chats/{chat}/messages` `{ "text": "...", "reply_to"?: "<id>" }`
//! - `PATCH /api/chats/{chat}/messages/{id}` `{ "text": "..." }` (edit),
//!   `DELETE /api/chats/{chat}/messages/{id}` (delete for everyone)
//! - `POST /api/chats/{chat}/messages/{id}/reactions` `{ "emoji": "..." }`
//! - `POST /api/chats/{chat}/read` `{ "up_to": "<id>" }`, `POST /api/chats/{chat}/typing`
//! - `GET  /api/search?q=<text>&limit=<n>`
//! - `GET  /api/settings`, `PATCH /api/settings` `{ "name"?, "picture"?, "read_receipts"?, "presence"? }`
//! - `GET  /api/presence`
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
//! - `POST /api/login-codes` (a one-time login link), `POST /api/tokens` `{ "scope": "...", "name"? }`
//! - `GET  /api/events` (server-sent events) and `GET /api/ws` (WebSocket), one JSON `NodeEvent` each
//! - `GET  /api/openapi.json`
//! - `GET  /login?code=<code>` (sets the session cookie, redirects to `/`)
//!
//! Errors answer `{ "error": "..." }` with the status saying whose fault it was:
//! 400 for a malformed request or argument, 401 without a valid token or
//! session, 403 for a refused host or origin, a token of the wrong scope, a
//! change the group's rules do not allow this account ("not allowed: …"),
//! someone else's message to edit or delete, or a group this device is no
//! longer in, 404 for an unknown contact, group, chat or message, 409 for a
//! contact with no conversation yet, 502 when the network or the contact's
//! devices fail, 503 while the node stops, and 500 for storage and encryption
//! failures (never for bad input).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use tidings_store::StoreError;

use crate::core::{GroupView, NodeError};
use crate::node::NodeHandle;
use crate::types::{ContactView, MessageView, NodeStatus};

mod auth;
mod chats;

pub use auth::{LoginCodes, Scope, create_token, parse_scope, token_hash};

/// File in the data directory holding the API token.
pub const TOKEN_FILE: &str = "api-token";
/// File in the data directory holding the address the API listens on.
pub const ADDR_FILE: &str = "api-addr";

#[derive(Clone)]
pub(crate) struct ApiState {
    node: NodeHandle,
    token: Arc<str>,
    logins: LoginCodes,
    /// Where the API listens (for login links); set once bound.
    addr: Arc<OnceLock<SocketAddr>>,
}

/// A JSON error body: `{ "error": "..." }`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub error: String,
    #[serde(skip)]
    status: u16,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self {
            error: msg.into(),
            status: status.as_u16(),
        }
    }

    pub(crate) fn bad(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
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
            NodeError::Store(StoreError::WrongPassphrase) => StatusCode::FORBIDDEN,
            NodeError::Store(StoreError::WeakPassphrase(_)) => StatusCode::BAD_REQUEST,
            NodeError::Store(_) | NodeError::Mls(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match &e {
            NodeError::Store(s @ (StoreError::WrongPassphrase | StoreError::WeakPassphrase(_))) => s.to_string(),
            _ => e.to_string(),
        };
        ApiError::new(status, message)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::bad(e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad(e.body_text())
    }
}

/// Request bodies: unknown fields are refused, so a typo is a 400, not a silent no-op.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CardView {
    pub uri: String,
    pub account: String,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AddContactBody {
    pub card: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SendBody {
    pub contact: String,
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateGroupBody {
    pub name: String,
    #[serde(default)]
    pub members: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupTextBody {
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InviteBody {
    pub contacts: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RelaysBody {
    pub relays: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupInfoBody {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RoleBody {
    pub member: String,
    pub role: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LinkCodeView {
    pub code: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    /// The device key, hex.
    pub device: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub this_device: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevokedView {
    /// Groups the device was removed from.
    pub groups: usize,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tidings local API",
        description = "The API a Tidings node serves on 127.0.0.1 for its web UI, its command line, scripts and bots."
    ),
    components(schemas(ApiError, crate::types::NodeEvent)),
    modifiers(&Security)
)]
struct ApiDoc;

/// Declares the bearer token and the session cookie.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new("tidings_session_<port>"))),
        );
    }
}

/// The OpenAPI document, built once from the routes.
static OPENAPI: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();

/// Every route of the API with its handler and its OpenAPI description:
/// `routes!` registers both from one annotation, so the document and the
/// router cannot disagree.
fn api_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(status))
        .routes(routes!(card))
        .routes(routes!(card_qr))
        .routes(routes!(contacts, add_contact))
        .routes(routes!(history))
        .routes(routes!(send))
        .routes(routes!(groups, create_group))
        .routes(routes!(group))
        .routes(routes!(group_history, send_group))
        .routes(routes!(invite))
        .routes(routes!(remove_member))
        .routes(routes!(group_info))
        .routes(routes!(group_role))
        .routes(routes!(group_relays))
        .routes(routes!(devices))
        .routes(routes!(link_device))
        .routes(routes!(revoke_device))
        .routes(routes!(events))
        .routes(routes!(openapi))
        .merge(chats::routes())
        .merge(auth::routes())
}

/// The OpenAPI document of every route.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    OPENAPI.get_or_init(|| api_routes().into_openapi()).clone()
}

/// Builds the API router (with fresh login codes and no known address).
pub fn router(node: NodeHandle, token: &str) -> Router {
    router_with(node, token, LoginCodes::default(), Arc::new(OnceLock::new()))
}

fn router_with(node: NodeHandle, token: &str, logins: LoginCodes, addr: Arc<OnceLock<SocketAddr>>) -> Router {
    let state = ApiState {
        node,
        token: Arc::from(token),
        logins,
        addr,
    };
    let (api, doc) = api_routes().split_for_parts();
    let _ = OPENAPI.set(doc);
    api.route_layer(middleware::from_fn(auth::check_scope))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .merge(crate::ui::router())
        .with_state(state)
}

/// A served API: where it listens, its task, and its login codes.
#[derive(Debug)]
pub struct Served {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
    pub logins: LoginCodes,
}

impl Served {
    /// A fresh one-time login link (valid for ten minutes).
    pub fn login_url(&self, now_ms: u64) -> String {
        format!("http://{}/login?code={}", self.addr, self.logins.issue(now_ms))
    }
}

/// Binds `addr` (must be a loopback address) and serves the API until the task is aborted.
pub async fn serve(
    node: NodeHandle,
    addr: SocketAddr,
    token: &str,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let s = serve_api(node, addr, token).await?;
    Ok((s.addr, s.task))
}

/// Like [`serve`], keeping the login codes (to print a login link).
pub async fn serve_api(node: NodeHandle, addr: SocketAddr, token: &str) -> anyhow::Result<Served> {
    if !addr.ip().is_loopback() {
        anyhow::bail!("the API only listens on loopback addresses, not {addr}");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let logins = LoginCodes::default();
    let bound = Arc::new(OnceLock::new());
    let _ = bound.set(local);
    let app = router_with(node, token, logins.clone(), bound);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("API server stopped: {e}");
        }
    });
    Ok(Served {
        addr: local,
        task,
        logins,
    })
}

pub(crate) fn host_is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    matches!(name, "127.0.0.1" | "localhost" | "::1")
}

/// Host and Origin checks for every request, then who is asking: the scope
/// of its token or session goes into the request for [`auth::check_scope`].
async fn guard(State(state): State<ApiState>, headers: HeaderMap, mut req: Request, next: Next) -> Response {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if !host_is_loopback(host) {
        return ApiError::new(StatusCode::FORBIDDEN, "requests must be addressed to a loopback host").into_response();
    }
    // A browser's Origin must be this very server (scheme, host and port): a
    // page served by another local program shares the cookie's site (cookies
    // ignore ports) but not the origin.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| host_is_loopback(o) && o.eq_ignore_ascii_case(host));
        if !ok {
            return ApiError::new(StatusCode::FORBIDDEN, "cross-origin requests are refused").into_response();
        }
    }
    // The login link itself carries its credential.
    if req.uri().path() == "/login" {
        return next.run(req).await;
    }
    match auth::scope_of(&state, &headers, &req) {
        Some(scope) => {
            req.extensions_mut().insert(scope);
            next.run(req).await
        }
        None => ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API token or session").into_response(),
    }
}

/// Unwraps a JSON body or answers 400 with what is wrong with it.
pub(crate) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    Ok(b?.0)
}

#[utoipa::path(get, path = "/api/status", tag = "node",
    responses((status = 200, body = NodeStatus), (status = 401, body = ApiError)))]
async fn status(State(s): State<ApiState>) -> Result<Json<NodeStatus>, ApiError> {
    Ok(Json(s.node.status().await?))
}

#[utoipa::path(get, path = "/api/card", tag = "node", responses((status = 200, body = CardView)))]
async fn card(State(s): State<ApiState>) -> Json<CardView> {
    let card = s.node.card();
    Json(CardView {
        uri: card.to_uri(),
        account: card.account.to_base58(),
        name: card.name,
    })
}

#[utoipa::path(get, path = "/api/card/qr.svg", tag = "node",
    responses((status = 200, description = "our card as a QR code", content_type = "image/svg+xml", body = String)))]
async fn card_qr(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let uri = s.node.card().to_uri();
    let code = qrcode::QrCode::new(uri.as_bytes())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("QR code: {e}")))?;
    let svg = code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(256, 256)
        .build();
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

#[utoipa::path(get, path = "/api/contacts", tag = "contacts", responses((status = 200, body = Vec<ContactView>)))]
async fn contacts(State(s): State<ApiState>) -> Result<Json<Vec<ContactView>>, ApiError> {
    Ok(Json(s.node.contacts()?))
}

#[utoipa::path(post, path = "/api/contacts", tag = "contacts", request_body = AddContactBody,
    responses((status = 200, body = ContactView), (status = 400, body = ApiError)))]
async fn add_contact(
    State(s): State<ApiState>,
    b: Result<Json<AddContactBody>, JsonRejection>,
) -> Result<Json<ContactView>, ApiError> {
    let b = body(b)?;
    Ok(Json(s.node.add_contact(&b.card, b.name.as_deref()).await?))
}

#[utoipa::path(get, path = "/api/contacts/{contact}/messages", tag = "contacts",
    params(("contact" = String, Path, description = "account (base58) or name")),
    responses((status = 200, body = Vec<MessageView>), (status = 404, body = ApiError)))]
async fn history(State(s): State<ApiState>, Path(contact): Path<String>) -> Result<Json<Vec<MessageView>>, ApiError> {
    Ok(Json(s.node.history(&contact)?))
}

#[utoipa::path(post, path = "/api/messages", tag = "contacts", request_body = SendBody,
    responses((status = 200, body = MessageView), (status = 400, body = ApiError)))]
async fn send(
    State(s): State<ApiState>,
    b: Result<Json<SendBody>, JsonRejection>,
) -> Result<Json<MessageView>, ApiError> {
    let b = body(b)?;
    Ok(Json(s.node.send_text(&b.contact, &b.text).await?))
}

#[utoipa::path(get, path = "/api/groups", tag = "groups", responses((status = 200, body = Vec<GroupView>)))]
async fn groups(State(s): State<ApiState>) -> Result<Json<Vec<GroupView>>, ApiError> {
    Ok(Json(s.node.groups().await?))
}

#[utoipa::path(post, path = "/api/groups", tag = "groups", request_body = CreateGroupBody,
    responses((status = 200, body = GroupView), (status = 400, body = ApiError)))]
async fn create_group(
    State(s): State<ApiState>,
    b: Result<Json<CreateGroupBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let b = body(b)?;
    let members: Vec<&str> = b.members.iter().map(String::as_str).collect();
    Ok(Json(s.node.create_group(&b.name, &members).await?))
}

#[utoipa::path(get, path = "/api/groups/{group}", tag = "groups", params(("group" = String, Path)),
    responses((status = 200, body = GroupView), (status = 404, body = ApiError)))]
async fn group(State(s): State<ApiState>, Path(group): Path<String>) -> Result<Json<GroupView>, ApiError> {
    Ok(Json(s.node.group(&group).await?))
}

#[utoipa::path(get, path = "/api/groups/{group}/messages", tag = "groups", params(("group" = String, Path)),
    responses((status = 200, body = Vec<MessageView>), (status = 404, body = ApiError)))]
async fn group_history(
    State(s): State<ApiState>,
    Path(group): Path<String>,
) -> Result<Json<Vec<MessageView>>, ApiError> {
    Ok(Json(s.node.group_history(&group)?))
}

#[utoipa::path(post, path = "/api/groups/{group}/messages", tag = "groups", params(("group" = String, Path)),
    request_body = GroupTextBody, responses((status = 200, body = MessageView), (status = 400, body = ApiError)))]
async fn send_group(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    b: Result<Json<GroupTextBody>, JsonRejection>,
) -> Result<Json<MessageView>, ApiError> {
    let b = body(b)?;
    Ok(Json(s.node.send_group(&group, &b.text).await?))
}

#[utoipa::path(post, path = "/api/groups/{group}/members", tag = "groups", params(("group" = String, Path)),
    request_body = InviteBody, responses((status = 200, body = GroupView), (status = 400, body = ApiError)))]
async fn invite(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    b: Result<Json<InviteBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let b = body(b)?;
    let contacts: Vec<&str> = b.contacts.iter().map(String::as_str).collect();
    s.node.invite(&group, &contacts).await?;
    Ok(Json(s.node.group(&group).await?))
}

#[utoipa::path(delete, path = "/api/groups/{group}/members/{member}", tag = "groups",
    params(("group" = String, Path), ("member" = String, Path)),
    responses((status = 200, body = GroupView), (status = 403, body = ApiError)))]
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

#[utoipa::path(post, path = "/api/groups/{group}/info", tag = "groups", params(("group" = String, Path)),
    request_body = GroupInfoBody, responses((status = 200, body = GroupView), (status = 403, body = ApiError)))]
async fn group_info(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    b: Result<Json<GroupInfoBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let b = body(b)?;
    s.node
        .set_group_info(&group, b.name.as_deref(), b.description.as_deref())
        .await?;
    Ok(Json(s.node.group(&group).await?))
}

#[utoipa::path(post, path = "/api/groups/{group}/relays", tag = "groups", params(("group" = String, Path)),
    request_body = RelaysBody, responses((status = 200, body = GroupView), (status = 403, body = ApiError)))]
async fn group_relays(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    b: Result<Json<RelaysBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let b = body(b)?;
    s.node.move_group(&group, b.relays).await?;
    Ok(Json(s.node.group(&group).await?))
}

#[utoipa::path(post, path = "/api/groups/{group}/roles", tag = "groups", params(("group" = String, Path)),
    request_body = RoleBody, responses((status = 200, body = GroupView), (status = 403, body = ApiError)))]
async fn group_role(
    State(s): State<ApiState>,
    Path(group): Path<String>,
    b: Result<Json<RoleBody>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let b = body(b)?;
    let role = parse_role(&b.role).ok_or_else(|| ApiError::bad("role must be owner, admin or member"))?;
    s.node.set_group_role(&group, &b.member, role).await?;
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

#[utoipa::path(post, path = "/api/devices/link", tag = "devices", responses((status = 200, body = LinkCodeView)))]
async fn link_device(State(s): State<ApiState>) -> Result<Json<LinkCodeView>, ApiError> {
    Ok(Json(LinkCodeView {
        code: s.node.link_offer().await?,
    }))
}

#[utoipa::path(get, path = "/api/devices", tag = "devices", responses((status = 200, body = Vec<DeviceView>)))]
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

#[utoipa::path(delete, path = "/api/devices/{device}", tag = "devices", params(("device" = String, Path)),
    responses((status = 200, body = RevokedView), (status = 400, body = ApiError)))]
async fn revoke_device(State(s): State<ApiState>, Path(device): Path<String>) -> Result<Json<RevokedView>, ApiError> {
    let groups = s.node.revoke_device(&device).await?;
    Ok(Json(RevokedView { groups }))
}

#[utoipa::path(get, path = "/api/events", tag = "events",
    responses((status = 200, description = "server-sent events, one JSON NodeEvent each", content_type = "text/event-stream", body = String)))]
async fn events(State(s): State<ApiState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = BroadcastStream::new(s.node.subscribe()).filter_map(|ev| {
        let ev = ev.ok()?;
        let data = serde_json::to_string(&ev).ok()?;
        Some(Ok(Event::default().data(data)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[utoipa::path(get, path = "/api/openapi.json", tag = "node",
    responses((status = 200, description = "this document", content_type = "application/json", body = Object)))]
async fn openapi() -> Response {
    Json(openapi_document()).into_response()
}

/// Whether a request method only reads.
pub(crate) fn is_read(m: &Method) -> bool {
    m == Method::GET || m == Method::HEAD
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
