//! Chat routes: chats, pages of messages, replies, edits, deletes for
//! everyone, reactions, read state, typing, chat settings, search, this
//! account's settings and presence.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiState, body};
use crate::chats::{MAX_PAGE, SettingsView};
use crate::types::{ChatView, MessageView, PresenceView};

/// Messages a page holds unless asked otherwise.
const DEFAULT_PAGE: usize = 100;

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_chats))
        .routes(routes!(get_chat, patch_chat))
        .routes(routes!(list_messages, send_message))
        .routes(routes!(edit_message, delete_message))
        .routes(routes!(react))
        .routes(routes!(read))
        .routes(routes!(typing))
        .routes(routes!(search))
        .routes(routes!(get_settings, patch_settings))
        .routes(routes!(change_passphrase))
        .routes(routes!(presence))
        .routes(routes!(contact_picture))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// A message id: the page ends just before it (default: the newest messages).
    before: Option<String>,
    /// At most this many messages (default 100, at most 1000).
    limit: Option<usize>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SearchQuery {
    /// Words; each must start a word of the message (case-insensitive).
    q: String,
    /// At most this many messages (default 100, at most 1000).
    limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageBody {
    pub text: String,
    /// The id of the message this one replies to.
    #[serde(default)]
    pub reply_to: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditBody {
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReactionBody {
    /// A few emoji; empty removes ours.
    pub emoji: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadBody {
    /// Incoming messages up to this one (included) are read.
    pub up_to: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatPatch {
    #[serde(default)]
    pub pinned: Option<bool>,
    #[serde(default)]
    pub muted: Option<bool>,
    /// Disappearing-messages timer for every member (0: off).
    #[serde(default)]
    pub disappearing_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    #[serde(default)]
    pub name: Option<String>,
    /// A `data:image/(png|jpeg|gif|webp);base64,…` URL of at most 256 KiB; "" removes it.
    #[serde(default)]
    pub picture: Option<String>,
    #[serde(default)]
    pub read_receipts: Option<bool>,
    #[serde(default)]
    pub presence: Option<bool>,
    /// Home relays, each `…/p2p/<relay id>` (at most 8): replaces the list.
    #[serde(default)]
    pub home_relays: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PassphraseChange {
    /// The passphrase in force, if one is set.
    #[serde(default)]
    pub current: Option<String>,
    /// The new passphrase (6 characters to 1 KiB); absent or null removes it.
    #[serde(default)]
    pub new: Option<String>,
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    Ok(q?.0)
}

#[utoipa::path(get, path = "/api/chats", tag = "chats",
    responses((status = 200, description = "pinned first, then newest activity first", body = Vec<ChatView>)))]
async fn list_chats(State(s): State<ApiState>) -> Result<Json<Vec<ChatView>>, ApiError> {
    Ok(Json(s.node.chats().await?))
}

#[utoipa::path(get, path = "/api/chats/{chat}", tag = "chats",
    params(("chat" = String, Path, description = "c:<account> or g:<group>")),
    responses((status = 200, body = ChatView), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn get_chat(State(s): State<ApiState>, Path(chat): Path<String>) -> Result<Json<ChatView>, ApiError> {
    Ok(Json(s.node.chat(&chat).await?))
}

#[utoipa::path(patch, path = "/api/chats/{chat}", tag = "chats",
    params(("chat" = String, Path, description = "c:<account> or g:<group>")), request_body = ChatPatch,
    responses((status = 200, body = ChatView), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn patch_chat(
    State(s): State<ApiState>,
    Path(chat): Path<String>,
    b: Result<Json<ChatPatch>, JsonRejection>,
) -> Result<Json<ChatView>, ApiError> {
    let b = body(b)?;
    Ok(Json(
        s.node
            .change_chat(&chat, b.pinned, b.muted, b.disappearing_secs)
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/chats/{chat}/messages", tag = "chats",
    params(("chat" = String, Path, description = "c:<account> or g:<group>"), PageQuery),
    responses((status = 200, description = "oldest first", body = Vec<MessageView>), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn list_messages(
    State(s): State<ApiState>,
    Path(chat): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Vec<MessageView>>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad(format!("limit is 1 to {MAX_PAGE}")));
    }
    Ok(Json(s.node.chat_messages(&chat, q.before.as_deref(), limit).await?))
}

#[utoipa::path(post, path = "/api/chats/{chat}/messages", tag = "chats",
    params(("chat" = String, Path, description = "c:<account> or g:<group>")), request_body = ChatMessageBody,
    responses((status = 201, body = MessageView), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn send_message(
    State(s): State<ApiState>,
    Path(chat): Path<String>,
    b: Result<Json<ChatMessageBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let b = body(b)?;
    let m = s.node.send_chat(&chat, &b.text, b.reply_to.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(m)).into_response())
}

#[utoipa::path(patch, path = "/api/chats/{chat}/messages/{id}", tag = "chats",
    params(("chat" = String, Path), ("id" = String, Path, description = "message id")), request_body = EditBody,
    responses((status = 200, body = MessageView), (status = 400, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn edit_message(
    State(s): State<ApiState>,
    Path((chat, id)): Path<(String, String)>,
    b: Result<Json<EditBody>, JsonRejection>,
) -> Result<Json<MessageView>, ApiError> {
    let b = body(b)?;
    Ok(Json(s.node.edit_message(&chat, &id, &b.text).await?))
}

#[utoipa::path(delete, path = "/api/chats/{chat}/messages/{id}", tag = "chats",
    params(("chat" = String, Path), ("id" = String, Path, description = "message id")),
    responses((status = 204, description = "deleted for everyone"), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
async fn delete_message(
    State(s): State<ApiState>,
    Path((chat, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.node.delete_message(&chat, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/chats/{chat}/messages/{id}/reactions", tag = "chats",
    params(("chat" = String, Path), ("id" = String, Path, description = "message id")), request_body = ReactionBody,
    responses((status = 200, body = MessageView), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn react(
    State(s): State<ApiState>,
    Path((chat, id)): Path<(String, String)>,
    b: Result<Json<ReactionBody>, JsonRejection>,
) -> Result<Json<MessageView>, ApiError> {
    let b = body(b)?;
    Ok(Json(s.node.react(&chat, &id, &b.emoji).await?))
}

#[utoipa::path(post, path = "/api/chats/{chat}/read", tag = "chats",
    params(("chat" = String, Path)), request_body = ReadBody,
    responses((status = 204, description = "read; a receipt goes to the senders unless read receipts are off"), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn read(
    State(s): State<ApiState>,
    Path(chat): Path<String>,
    b: Result<Json<ReadBody>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let b = body(b)?;
    s.node.mark_read(&chat, &b.up_to).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/chats/{chat}/typing", tag = "chats", params(("chat" = String, Path)),
    responses((status = 204, description = "a typing indicator went to members connected now"), (status = 404, body = ApiError)))]
async fn typing(State(s): State<ApiState>, Path(chat): Path<String>) -> Result<StatusCode, ApiError> {
    s.node.typing(&chat).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/search", tag = "chats", params(SearchQuery),
    responses((status = 200, description = "newest first, across all chats", body = Vec<MessageView>), (status = 400, body = ApiError)))]
async fn search(
    State(s): State<ApiState>,
    q: Result<Query<SearchQuery>, QueryRejection>,
) -> Result<Json<Vec<MessageView>>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad(format!("limit is 1 to {MAX_PAGE}")));
    }
    if q.q.len() > 256 {
        return Err(ApiError::bad("a search is at most 256 bytes"));
    }
    Ok(Json(s.node.search(&q.q, limit)?))
}

#[utoipa::path(get, path = "/api/settings", tag = "settings", responses((status = 200, body = SettingsView)))]
async fn get_settings(State(s): State<ApiState>) -> Result<Json<SettingsView>, ApiError> {
    Ok(Json(s.node.settings()?))
}

#[utoipa::path(patch, path = "/api/settings", tag = "settings", request_body = SettingsPatch,
    responses((status = 200, body = SettingsView), (status = 400, body = ApiError)))]
async fn patch_settings(
    State(s): State<ApiState>,
    b: Result<Json<SettingsPatch>, JsonRejection>,
) -> Result<Json<SettingsView>, ApiError> {
    let b = body(b)?;
    if let Some(relays) = &b.home_relays {
        s.node.set_home_relays(relays).await?;
    }
    Ok(Json(
        s.node
            .change_settings(b.name.as_deref(), b.picture.as_deref(), b.read_receipts, b.presence)
            .await?,
    ))
}

/// Sets, changes or removes the passphrase that seals this device's keys at rest.
#[utoipa::path(post, path = "/api/settings/passphrase", tag = "settings", request_body = PassphraseChange,
    responses((status = 200, body = SettingsView), (status = 400, body = ApiError), (status = 403, body = ApiError)))]
async fn change_passphrase(
    State(s): State<ApiState>,
    b: Result<Json<PassphraseChange>, JsonRejection>,
) -> Result<Json<SettingsView>, ApiError> {
    let b = body(b)?;
    Ok(Json(s.node.set_passphrase(b.current, b.new).await?))
}

#[utoipa::path(get, path = "/api/presence", tag = "settings",
    responses((status = 200, description = "contacts who share presence (empty unless we share ours)", body = Vec<PresenceView>)))]
async fn presence(State(s): State<ApiState>) -> Result<Json<Vec<PresenceView>>, ApiError> {
    Ok(Json(s.node.presence()?))
}

#[utoipa::path(get, path = "/api/contacts/{contact}/picture", tag = "contacts",
    params(("contact" = String, Path, description = "account (base58) or name")),
    responses((status = 200, description = "the contact's profile picture", content_type = "image/*", body = Vec<u8>), (status = 404, body = ApiError)))]
async fn contact_picture(State(s): State<ApiState>, Path(contact): Path<String>) -> Result<Response, ApiError> {
    let c = s.node.find_contact(&contact)?;
    let Some((kind, bytes)) = s
        .node
        .store()
        .picture(&c.account)
        .map_err(crate::core::NodeError::from)?
    else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no picture"));
    };
    // Only the image types a profile may carry ever get here; still, never sniff
    // and never run anything.
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::CONTENT_SECURITY_POLICY, "default-src 'none'".to_owned()),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
        ],
        bytes,
    )
        .into_response())
}
