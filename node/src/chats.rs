//! What the API's chat routes ask of a node: chats (one-to-one and groups
//! alike, by chat id), pages of their history, replies, reactions, edits,
//! deletes for everyone, read state, typing, per-chat settings, search,
//! this account's settings and contacts' presence.

use base64::Engine as _;
use tidings_protocol::payload::{MAX_PICTURE, PICTURE_TYPES};
use tidings_store::Settings;

use crate::core::{ChatAction, ChatChange, CoreInput, NodeError, ONLINE_FOR_MS, SettingsChange};
use crate::node::NodeHandle;
use crate::types::{ChatRef, ChatView, MessageView, PresenceView};

/// Most messages one page of a chat holds.
pub const MAX_PAGE: usize = 1000;
/// Largest picture data URL the settings accept (256 KiB).
pub const MAX_PICTURE_URL: usize = 256 * 1024;

/// This account's settings as the API shows them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SettingsView {
    pub name: String,
    /// `data:image/...;base64,...`, or null.
    pub picture: Option<String>,
    pub read_receipts: bool,
    pub presence: bool,
    pub home_relays: Vec<String>,
    /// Whether this device's secrets are sealed under a passphrase.
    pub passphrase: bool,
    pub account: String,
    pub card_uri: String,
}

/// Parses a message id (32 hex digits).
pub fn parse_message_id(s: &str) -> Result<[u8; 16], NodeError> {
    let bad = || NodeError::InvalidInput(format!("not a message id (32 hex digits): {s:.80}"));
    hex::decode(s).map_err(|_| bad())?.try_into().map_err(|_| bad())
}

/// A picture as a data URL.
pub fn picture_url(kind: &str, bytes: &[u8]) -> String {
    format!(
        "data:{kind};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Parses a picture data URL (`data:image/png;base64,...`, at most 256 KiB).
pub fn parse_picture_url(url: &str) -> Result<(String, Vec<u8>), NodeError> {
    if url.len() > MAX_PICTURE_URL {
        return Err(NodeError::InvalidInput(format!(
            "a picture is at most {MAX_PICTURE_URL} bytes as a data URL"
        )));
    }
    let bad = || {
        NodeError::InvalidInput(format!(
            "a picture is a data URL: data:<{}>;base64,<data>",
            PICTURE_TYPES.join("|")
        ))
    };
    let rest = url.strip_prefix("data:").ok_or_else(bad)?;
    let (kind, data) = rest.split_once(";base64,").ok_or_else(bad)?;
    if !PICTURE_TYPES.contains(&kind) {
        return Err(bad());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| bad())?;
    if bytes.is_empty() || bytes.len() > MAX_PICTURE {
        return Err(bad());
    }
    Ok((kind.to_owned(), bytes))
}

impl NodeHandle {
    /// Every chat, pinned first, then by latest activity.
    pub async fn chats(&self) -> Result<Vec<ChatView>, NodeError> {
        self.core(|reply| CoreInput::Chats { chat: None, reply }).await
    }

    /// One chat by id (`c:<account>` or `g:<group>`).
    pub async fn chat(&self, chat: &str) -> Result<ChatView, NodeError> {
        let chat = ChatRef::parse(chat)?;
        let id = chat.id();
        self.core(|reply| CoreInput::Chats {
            chat: Some(chat),
            reply,
        })
        .await?
        .pop()
        .ok_or(NodeError::InvalidInput(id))
    }

    /// The view of a stored message.
    pub fn message_view(&self, id: &[u8; 16]) -> Result<Option<MessageView>, NodeError> {
        let store = self.store();
        Ok(store.message(id)?.map(|m| MessageView::of(store, &m)))
    }

    /// Up to `limit` messages of a chat before message `before` (or the
    /// newest), oldest first.
    pub async fn chat_messages(
        &self,
        chat: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MessageView>, NodeError> {
        let chat = ChatRef::parse(chat)?;
        let before = before.map(parse_message_id).transpose()?;
        // Unknown chats are 404s, not empty pages.
        self.core(|reply| CoreInput::Chats {
            chat: Some(chat.clone()),
            reply,
        })
        .await?;
        let store = self.store();
        let rows = store
            .messages_before(&chat.key(), before.as_ref(), limit.clamp(1, MAX_PAGE))?
            .ok_or_else(|| NodeError::UnknownMessage(before.map(hex::encode).unwrap_or_default()))?;
        Ok(rows.iter().map(|m| MessageView::of(store, m)).collect())
    }

    /// Sends a text to a chat, optionally as a reply.
    pub async fn send_chat(&self, chat: &str, text: &str, reply_to: Option<&str>) -> Result<MessageView, NodeError> {
        let chat = ChatRef::parse(chat)?;
        let reply_to = reply_to.map(parse_message_id).transpose()?;
        match chat {
            ChatRef::Contact(contact) => self.send_to_contact(contact, text, reply_to).await,
            ChatRef::Group(group_id) => {
                let text = text.to_owned();
                let m = self
                    .core(|reply| CoreInput::SendGroup {
                        group_id,
                        text,
                        reply_to,
                        reply,
                    })
                    .await?;
                self.group_sync_now();
                Ok(m)
            }
        }
    }

    async fn chat_action(&self, chat: &str, action: ChatAction) -> Result<Option<MessageView>, NodeError> {
        let chat = ChatRef::parse(chat)?;
        let group = matches!(chat, ChatRef::Group(_));
        let r = self.core(|reply| CoreInput::ChatAction { chat, action, reply }).await?;
        if group {
            self.group_sync_now();
        }
        Ok(r)
    }

    fn updated(r: Option<MessageView>) -> Result<MessageView, NodeError> {
        r.ok_or_else(|| NodeError::InvalidInput("no message".into()))
    }

    /// Edits one of our messages (for everyone).
    pub async fn edit_message(&self, chat: &str, id: &str, text: &str) -> Result<MessageView, NodeError> {
        let target = parse_message_id(id)?;
        let action = ChatAction::Edit {
            target,
            text: text.to_owned(),
        };
        Self::updated(self.chat_action(chat, action).await?)
    }

    /// Deletes one of our messages for everyone.
    pub async fn delete_message(&self, chat: &str, id: &str) -> Result<MessageView, NodeError> {
        let target = parse_message_id(id)?;
        Self::updated(self.chat_action(chat, ChatAction::Delete { target }).await?)
    }

    /// Sets our reaction to a message (empty removes it).
    pub async fn react(&self, chat: &str, id: &str, emoji: &str) -> Result<MessageView, NodeError> {
        let target = parse_message_id(id)?;
        let action = ChatAction::React {
            target,
            emoji: emoji.to_owned(),
        };
        Self::updated(self.chat_action(chat, action).await?)
    }

    /// Marks a chat read up to a message; sends a read receipt unless they are off.
    pub async fn mark_read(&self, chat: &str, up_to: &str) -> Result<(), NodeError> {
        let up_to = parse_message_id(up_to)?;
        self.chat_action(chat, ChatAction::Read { up_to }).await.map(|_| ())
    }

    /// Tells the chat's members we are typing (ephemeral).
    pub async fn typing(&self, chat: &str) -> Result<(), NodeError> {
        self.chat_action(chat, ChatAction::Typing).await.map(|_| ())
    }

    /// Pins, mutes or sets the disappearing timer of a chat.
    pub async fn change_chat(
        &self,
        chat: &str,
        pinned: Option<bool>,
        muted: Option<bool>,
        disappearing_secs: Option<u64>,
    ) -> Result<ChatView, NodeError> {
        let chat = ChatRef::parse(chat)?;
        let change = ChatChange {
            pinned,
            muted,
            disappearing_secs,
        };
        let attempt =
            |chat: ChatRef, change: ChatChange| self.core(|reply| CoreInput::ChangeChat { chat, change, reply });
        match (attempt(chat.clone(), change.clone()).await, &chat) {
            // A timer goes to the contact: a conversation must exist first.
            (Err(NodeError::NoConversation), ChatRef::Contact(contact)) => {
                self.start_conversation(*contact).await?;
                attempt(chat, change).await
            }
            (r, _) => r,
        }
    }

    /// Messages whose words start with every word of `query`, newest first.
    pub fn search(&self, query: &str, limit: usize) -> Result<Vec<MessageView>, NodeError> {
        let store = self.store();
        Ok(store
            .search(query, limit.clamp(1, MAX_PAGE))?
            .iter()
            .map(|m| MessageView::of(store, m))
            .collect())
    }

    fn settings_view(&self, s: &Settings) -> Result<SettingsView, NodeError> {
        let card = self.card();
        Ok(SettingsView {
            name: self.name(),
            picture: s.picture.as_ref().map(|(k, b)| picture_url(k, b)),
            read_receipts: s.read_receipts,
            presence: s.presence,
            home_relays: card.relays.clone(),
            passphrase: self.store().has_passphrase()?,
            account: card.account.to_base58(),
            card_uri: card.to_uri(),
        })
    }

    pub fn settings(&self) -> Result<SettingsView, NodeError> {
        self.settings_view(&self.store().settings()?)
    }

    /// Changes this account's settings. `picture`: `Some("")` removes it.
    pub async fn change_settings(
        &self,
        name: Option<&str>,
        picture: Option<&str>,
        read_receipts: Option<bool>,
        presence: Option<bool>,
    ) -> Result<SettingsView, NodeError> {
        if let Some(n) = name
            && (n.trim().is_empty() || n.len() > tidings_protocol::limits::MAX_NAME || n.chars().any(char::is_control))
        {
            return Err(NodeError::InvalidInput(format!(
                "a name is 1 to {} bytes of text",
                tidings_protocol::limits::MAX_NAME
            )));
        }
        let picture = match picture {
            None => None,
            Some("") => Some(None),
            Some(url) => Some(Some(parse_picture_url(url)?)),
        };
        let change = SettingsChange {
            name: name.map(|n| n.trim().to_owned()),
            picture,
            read_receipts,
            presence,
        };
        let s = self.core(|reply| CoreInput::ChangeSettings { change, reply }).await?;
        self.settings_view(&s)
    }

    /// Sets, changes or removes the passphrase that seals this device's
    /// secrets at rest (`tidings_store::seal`). `current` must be the one in
    /// force, if any; `new = None` removes it. One change at a time, since
    /// each runs Argon2id over 64 MiB.
    pub async fn set_passphrase(
        &self,
        current: Option<String>,
        new: Option<String>,
    ) -> Result<SettingsView, NodeError> {
        static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _turn = ONE_AT_A_TIME.lock().await;
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.set_passphrase(current.as_deref(), new.as_deref()))
            .await
            .map_err(|_| NodeError::Stopped)??;
        self.settings()
    }

    /// Sends a control payload to a chat exactly as given, without the checks
    /// the other methods make: lets tests play a member who misbehaves.
    #[doc(hidden)]
    pub async fn send_raw_control(&self, chat: &str, body: tidings_protocol::payload::Body) -> Result<(), NodeError> {
        self.send_raw_payload(chat, None, body).await
    }

    /// Like [`NodeHandle::send_raw_control`], with a chosen message id.
    #[doc(hidden)]
    pub async fn send_raw_payload(
        &self,
        chat: &str,
        id: Option<[u8; 16]>,
        body: tidings_protocol::payload::Body,
    ) -> Result<(), NodeError> {
        let chat = ChatRef::parse(chat)?;
        let group = matches!(chat, ChatRef::Group(_));
        self.core(|reply| CoreInput::RawControl { chat, id, body, reply })
            .await?;
        if group {
            self.group_sync_now();
        }
        Ok(())
    }

    /// Contacts who share their presence (only while we share ours).
    pub fn presence(&self) -> Result<Vec<PresenceView>, NodeError> {
        if !self.store().settings()?.presence {
            return Ok(Vec::new());
        }
        let now = self.inner.clock_now();
        let map = self.inner.presence.lock().map(|m| m.clone()).unwrap_or_default();
        let mut out: Vec<PresenceView> = map
            .into_iter()
            .map(|(account, (online, seen))| PresenceView {
                account: bs58::encode(account).into_string(),
                online: online && now.saturating_sub(seen) < ONLINE_FOR_MS,
                last_seen_ms: Some(seen),
            })
            .collect();
        out.sort_by(|a, b| a.account.cmp(&b.account));
        Ok(out)
    }
}
