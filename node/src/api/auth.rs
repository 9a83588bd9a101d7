//! Who may use the API: the full-scope token file, scoped tokens, one-time
//! login links and the session cookie they set; and the WebSocket event stream.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tidings_store::{ApiToken, TokenScope};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiState, body, is_read};

/// The session cookie's name is this, then `_` and the API's port: browsers
/// share cookies between the ports of one host, so two nodes on one machine
/// must not overwrite each other's session.
pub const SESSION_COOKIE: &str = "tidings_session";

/// This API's session cookie name.
pub(crate) fn session_cookie(state: &ApiState) -> String {
    match state.addr.get() {
        Some(a) => format!("{SESSION_COOKIE}_{}", a.port()),
        None => SESSION_COOKIE.to_owned(),
    }
}
/// How long a login code stays valid.
pub const LOGIN_CODE_MS: u64 = 10 * 60 * 1000;
/// Most login codes outstanding, and most sessions, at once.
const MAX_CODES: usize = 64;
const MAX_SESSIONS: usize = 256;

/// What a request may do.
pub type Scope = TokenScope;

/// One-time login codes and the sessions they opened (in memory: a restart
/// logs browsers out; `tidings ui-link` prints a new link).
#[derive(Debug, Clone, Default)]
pub struct LoginCodes(Arc<Mutex<Logins>>);

#[derive(Debug, Default)]
struct Logins {
    /// code → expires ms
    codes: HashMap<String, u64>,
    sessions: HashSet<String>,
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The hash under which a scoped token is stored (SHA-256, hex).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl LoginCodes {
    /// A new one-time code, valid for [`LOGIN_CODE_MS`].
    pub fn issue(&self, now_ms: u64) -> String {
        let code = random_hex();
        if let Ok(mut l) = self.0.lock() {
            l.codes.retain(|_, exp| *exp > now_ms);
            if l.codes.len() >= MAX_CODES
                && let Some(oldest) = l.codes.iter().min_by_key(|(_, e)| **e).map(|(c, _)| c.clone())
            {
                l.codes.remove(&oldest);
            }
            l.codes.insert(code.clone(), now_ms + LOGIN_CODE_MS);
        }
        code
    }

    /// Spends a code: a new session if it was valid.
    fn redeem(&self, code: &str, now_ms: u64) -> Option<String> {
        let mut l = self.0.lock().ok()?;
        let exp = l.codes.remove(code)?;
        if exp <= now_ms {
            return None;
        }
        if l.sessions.len() >= MAX_SESSIONS {
            l.sessions.clear();
        }
        let session = random_hex();
        l.sessions.insert(session.clone());
        Some(session)
    }

    fn has_session(&self, s: &str) -> bool {
        self.0.lock().is_ok_and(|l| l.sessions.contains(s))
    }
}

/// The scope of a token: the token file's (full), or a stored scoped one's.
fn token_scope(state: &ApiState, token: &str) -> Option<Scope> {
    if token.is_empty() {
        return None;
    }
    if constant_time_eq(token.as_bytes(), state.token.as_bytes()) {
        return Some(Scope::Full);
    }
    state
        .node
        .store()
        .token(&token_hash(token))
        .ok()
        .flatten()
        .map(|t| t.scope)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Who is asking: a bearer token, the session cookie, or (the WebSocket
/// only) a `token` query parameter.
pub(super) fn scope_of(state: &ApiState, headers: &HeaderMap, req: &Request) -> Option<Scope> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
    {
        return token_scope(state, t.trim());
    }
    if let Some(s) = cookie(headers, &session_cookie(state))
        && state.logins.has_session(s)
    {
        return Some(Scope::Full);
    }
    if req.uri().path() == "/api/ws" {
        let q = req.uri().query().unwrap_or("");
        let t = q
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v)?;
        return token_scope(state, t);
    }
    None
}

/// Routes a `send` token may use.
const SEND_ROUTES: [(&str, &str); 2] = [("POST", "/api/chats/{chat}/messages"), ("POST", "/api/messages")];

/// Refuses a request its token's scope does not cover (after routing, so
/// that the route is known).
pub(super) async fn check_scope(req: Request, next: Next) -> Response {
    let scope = req.extensions().get::<Scope>().copied();
    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let method = req.method().clone();
    let allowed = match scope {
        Some(Scope::Full) => true,
        Some(Scope::Read) => is_read(&method),
        Some(Scope::Send) => path
            .as_deref()
            .is_some_and(|p| SEND_ROUTES.contains(&(method.as_str(), p))),
        // `/login` carries its own credential.
        None => path.as_deref() == Some("/login"),
    };
    if !allowed {
        let scope = match scope {
            Some(Scope::Read) => "read",
            Some(Scope::Send) => "send",
            _ => "none",
        };
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token scope '{scope}' does not allow {method} {}",
                path.as_deref().unwrap_or("this route")
            ),
        )
        .into_response();
    }
    next.run(req).await
}

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(login_code))
        .routes(routes!(create_token_route))
        .routes(routes!(ws))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct LoginQuery {
    /// The one-time code of a login link.
    code: Option<String>,
}

/// A one-time login link: sets the session cookie and goes to the UI.
#[utoipa::path(get, path = "/login", tag = "auth", params(LoginQuery),
    responses((status = 303, description = "logged in: the session cookie is set"), (status = 401, description = "unknown, used or expired code")))]
async fn login(
    State(s): State<ApiState>,
    q: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let now = s.node.inner.clock_now();
    let session = q
        .ok()
        .and_then(|Query(q)| q.code)
        .and_then(|c| s.logins.redeem(&c, now));
    match session {
        Some(session) => (
            StatusCode::SEE_OTHER,
            [
                (
                    header::SET_COOKIE,
                    format!("{}={session}; HttpOnly; SameSite=Strict; Path=/", session_cookie(&s)),
                ),
                (header::LOCATION, "/".to_owned()),
                (header::CACHE_CONTROL, "no-store".to_owned()),
            ],
        )
            .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "This login link is unknown, used or expired. Run `tidings ui-link` for a new one.\n",
        )
            .into_response(),
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginLinkView {
    /// `http://127.0.0.1:<port>/login?code=…`, single use, valid for ten minutes.
    pub url: String,
}

#[utoipa::path(post, path = "/api/login-codes", tag = "auth",
    responses((status = 200, body = LoginLinkView), (status = 403, body = ApiError)))]
async fn login_code(State(s): State<ApiState>, headers: HeaderMap) -> Json<LoginLinkView> {
    let code = s.logins.issue(s.node.inner.clock_now());
    let host = match s.addr.get() {
        Some(a) => a.to_string(),
        None => headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1")
            .to_owned(),
    };
    Json(LoginLinkView {
        url: format!("http://{host}/login?code={code}"),
    })
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// `read`, `send` or `full`.
    pub scope: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    /// Shown once; only its hash is kept.
    pub token: String,
    pub scope: String,
    pub name: String,
}

/// Parses `read`, `send` or `full`.
pub fn parse_scope(s: &str) -> Option<Scope> {
    match s {
        "read" => Some(Scope::Read),
        "send" => Some(Scope::Send),
        "full" => Some(Scope::Full),
        _ => None,
    }
}

/// Makes a scoped token and stores its hash in `store`.
pub fn create_token(
    store: &tidings_store::Store,
    scope: Scope,
    name: &str,
    now_ms: u64,
) -> Result<String, tidings_store::StoreError> {
    let token = random_hex();
    store.put_token(
        &token_hash(&token),
        &ApiToken {
            name: name.to_owned(),
            scope,
            created_ms: now_ms,
        },
    )?;
    Ok(token)
}

#[utoipa::path(post, path = "/api/tokens", tag = "auth", request_body = TokenBody,
    responses((status = 200, body = TokenView), (status = 400, body = ApiError), (status = 403, body = ApiError)))]
async fn create_token_route(
    State(s): State<ApiState>,
    b: Result<Json<TokenBody>, JsonRejection>,
) -> Result<Json<TokenView>, ApiError> {
    let b = body(b)?;
    let scope = parse_scope(&b.scope).ok_or_else(|| ApiError::bad("scope must be read, send or full"))?;
    let name = b.name.unwrap_or_default();
    if name.len() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::bad("a token name is at most 64 bytes of text"));
    }
    let token = create_token(s.node.store(), scope, &name, s.node.inner.clock_now())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(TokenView {
        token,
        scope: b.scope,
        name,
    }))
}

/// The event stream as a WebSocket: one JSON `NodeEvent` per text message.
#[utoipa::path(get, path = "/api/ws", tag = "events",
    params(("token" = Option<String>, Query, description = "a token, for clients that cannot send headers")),
    responses((status = 101, description = "WebSocket: one JSON NodeEvent per message")))]
async fn ws(State(s): State<ApiState>, upgrade: WebSocketUpgrade) -> Response {
    let events = s.node.subscribe();
    upgrade
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| forward(socket, events))
}

async fn forward(mut socket: WebSocket, mut events: tokio::sync::broadcast::Receiver<crate::types::NodeEvent>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => {
                    let Ok(text) = serde_json::to_string(&ev) else { continue };
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => tracing::debug!(n, "a WebSocket client missed events"),
                Err(RecvError::Closed) => return,
            },
            msg = socket.recv() => match msg {
                // Clients have nothing to say; anything but a close is ignored.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
