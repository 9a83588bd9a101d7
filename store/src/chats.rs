//! Chat-level state: per-chat settings and counters, the search index,
//! disappearing messages, paging, edits, reactions and read state, this
//! device's settings, contacts' pictures and scoped API tokens.

use redb::{ReadableDatabase, ReadableTable, WriteTransaction};

use crate::schema::MessageKey;
use crate::schema::*;
use crate::{ApiToken, ChatRow, MessageState, Result, Settings, Store, StoreError, StoredMessage, from_json, to_json};

/// Longest word the search index keeps (longer words are cut, at a char boundary).
const MAX_WORD: usize = 48;
/// Most distinct words indexed per message.
const MAX_WORDS_PER_MESSAGE: usize = 512;
/// Most candidates one query word may yield before the search gives up on it
/// being selective and falls back to the other words.
const MAX_CANDIDATES: usize = 100_000;

/// The lower-case words of a text, as the search index keeps them: runs of
/// letters and digits, deduplicated.
pub fn words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for w in text.split(|c: char| !c.is_alphanumeric()) {
        if w.is_empty() {
            continue;
        }
        let mut w = w.to_lowercase();
        if w.len() > MAX_WORD {
            let mut cut = MAX_WORD;
            while !w.is_char_boundary(cut) {
                cut -= 1;
            }
            w.truncate(cut);
        }
        if !out.contains(&w) {
            out.push(w);
            if out.len() == MAX_WORDS_PER_MESSAGE {
                break;
            }
        }
    }
    out
}

type Key = ([u8; 32], u64, [u8; 32], u64);

pub(crate) fn key_of(w: &WriteTransaction, id: &[u8; 16]) -> Result<Option<Key>> {
    let ids = w.open_table(MESSAGE_IDS)?;
    Ok(ids.get(id)?.map(|k| {
        let (p, ts, s, seq) = k.value();
        (*p, ts, *s, seq)
    }))
}

/// Adds a new row's words, expiry and chat counters (inside its insert).
pub(crate) fn index_new(w: &WriteTransaction, m: &StoredMessage, key: MessageKey) -> Result<()> {
    if !m.deleted {
        add_words(w, &m.id, &m.text)?;
    }
    if let Some(at) = m.expires_ms {
        w.open_table(EXPIRY)?.insert((at, &m.id), ())?;
    }
    let mut chats = w.open_table(CHATS)?;
    let mut row: ChatRow = chats
        .get(&m.peer)?
        .map(|v| from_json(v.value()))
        .transpose()?
        .unwrap_or_default();
    row.last_activity_ms = row.last_activity_ms.max(m.timestamp_ms);
    if !m.outgoing && !m.read {
        row.unread += 1;
        w.open_table(UNREAD)?.insert(key, ())?;
    }
    chats.insert(&m.peer, to_json(&row)?.as_slice())?;
    Ok(())
}

fn add_words(w: &WriteTransaction, id: &[u8; 16], text: &str) -> Result<()> {
    let mut t = w.open_table(WORDS)?;
    for word in words(text) {
        t.insert((word.as_str(), id), ())?;
    }
    Ok(())
}

fn remove_words(w: &WriteTransaction, id: &[u8; 16], text: &str) -> Result<()> {
    let mut t = w.open_table(WORDS)?;
    for word in words(text) {
        t.remove((word.as_str(), id))?;
    }
    Ok(())
}

impl Store {
    /// One history row by message id.
    pub fn message(&self, id: &[u8; 16]) -> Result<Option<StoredMessage>> {
        self.with_txn(false, |w| {
            let Some(k) = key_of(w, id)? else { return Ok(None) };
            let t = w.open_table(MESSAGES)?;
            t.get((&k.0, k.1, &k.2, k.3))?.map(|v| from_json(v.value())).transpose()
        })
    }

    /// Rewrites an existing row (same id, same position), keeping the search
    /// index in step with its text. Returns false if the row is gone.
    pub fn update_message(&self, m: &StoredMessage) -> Result<bool> {
        let bytes = to_json(m)?;
        self.with_txn(true, |w| {
            let Some(k) = key_of(w, &m.id)? else { return Ok(false) };
            let mut t = w.open_table(MESSAGES)?;
            let key = (&k.0, k.1, &k.2, k.3);
            let old: Option<StoredMessage> = t.get(key)?.map(|v| from_json(v.value())).transpose()?;
            t.insert(key, bytes.as_slice())?;
            drop(t);
            if let Some(old) = old {
                if !old.deleted && (old.text != m.text || m.deleted) {
                    remove_words(w, &m.id, &old.text)?;
                }
                if !m.deleted && (old.deleted || old.text != m.text) {
                    add_words(w, &m.id, &m.text)?;
                }
                if old.expires_ms != m.expires_ms {
                    let mut e = w.open_table(EXPIRY)?;
                    if let Some(at) = old.expires_ms {
                        e.remove((at, &m.id))?;
                    }
                    if let Some(at) = m.expires_ms {
                        e.insert((at, &m.id), ())?;
                    }
                }
            }
            Ok(true)
        })
    }

    /// Removes a row entirely (a disappearing message): history, id, search
    /// index, expiry entry and, if unread, the chat's unread count.
    pub fn remove_message(&self, id: &[u8; 16]) -> Result<Option<StoredMessage>> {
        self.with_txn(true, |w| {
            let Some(k) = key_of(w, id)? else { return Ok(None) };
            let mut t = w.open_table(MESSAGES)?;
            let old: Option<StoredMessage> = t
                .remove((&k.0, k.1, &k.2, k.3))?
                .map(|v| from_json(v.value()))
                .transpose()?;
            drop(t);
            w.open_table(MESSAGE_IDS)?.remove(id)?;
            if let Some(m) = &old {
                if m.outgoing && m.state == MessageState::Waiting {
                    w.open_table(WAITING)?.remove((&m.peer, m.sender_seq))?;
                }
                if !m.deleted {
                    remove_words(w, id, &m.text)?;
                }
                if let Some(at) = m.expires_ms {
                    w.open_table(EXPIRY)?.remove((at, id))?;
                }
                if !m.outgoing && !m.read {
                    w.open_table(UNREAD)?.remove((&k.0, k.1, &k.2, k.3))?;
                    let mut chats = w.open_table(CHATS)?;
                    let row: Option<ChatRow> = chats.get(&m.peer)?.map(|v| from_json(v.value())).transpose()?;
                    if let Some(mut row) = row {
                        row.unread = row.unread.saturating_sub(1);
                        chats.insert(&m.peer, to_json(&row)?.as_slice())?;
                    }
                }
            }
            Ok(old)
        })
    }

    /// Ids of messages whose time ran out by `now_ms` (at most `limit`).
    pub fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<[u8; 16]>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(EXPIRY)?;
        let mut out = Vec::new();
        for e in t.range((0u64, &[0u8; 16])..=(now_ms, &[0xffu8; 16]))? {
            let (k, _) = e?;
            out.push(*k.value().1);
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// When the next message disappears, if any does.
    pub fn next_expiry(&self) -> Result<Option<u64>> {
        self.with_txn(false, |w| {
            let t = w.open_table(EXPIRY)?;
            Ok(t.first()?.map(|(k, _)| k.value().0))
        })
    }

    /// Up to `limit` rows of one chat before message `before` (or the newest
    /// ones), oldest first.
    pub fn messages_before(
        &self,
        peer: &[u8; 32],
        before: Option<&[u8; 16]>,
        limit: usize,
    ) -> Result<Option<Vec<StoredMessage>>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(MESSAGES)?;
        let lo = (peer, 0u64, &[0u8; 32], 0u64);
        let hi_owned: ([u8; 32], u64, [u8; 32], u64) = match before {
            Some(id) => {
                let ids = r.open_table(MESSAGE_IDS)?;
                let Some(k) = ids.get(id)? else { return Ok(None) };
                let (p, ts, s, seq) = k.value();
                if p != peer {
                    return Ok(None);
                }
                (*p, ts, *s, seq)
            }
            None => (*peer, u64::MAX, [0xff; 32], u64::MAX),
        };
        let hi = (&hi_owned.0, hi_owned.1, &hi_owned.2, hi_owned.3);
        let mut out = Vec::new();
        let range = if before.is_some() {
            t.range(lo..hi)?
        } else {
            t.range(lo..=hi)?
        };
        for e in range.rev() {
            if out.len() == limit {
                break;
            }
            let (_, v) = e?;
            out.push(from_json::<StoredMessage>(v.value())?);
        }
        out.reverse();
        Ok(Some(out))
    }

    /// The newest row of a chat.
    pub fn last_message(&self, peer: &[u8; 32]) -> Result<Option<StoredMessage>> {
        Ok(self.messages_before(peer, None, 1)?.and_then(|mut v| v.pop()))
    }

    /// Messages whose words start with every word of `query` (case-insensitive),
    /// newest first, at most `limit`. Uses the word index: the cost follows the
    /// number of matches, not the size of the history.
    pub fn search(&self, query: &str, limit: usize) -> Result<Vec<StoredMessage>> {
        let terms = words(query);
        if terms.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let r = self.db.begin_read()?;
        let index = r.open_table(WORDS)?;
        let mut candidates: Option<std::collections::HashSet<[u8; 16]>> = None;
        // Longest words first: they are usually the most selective.
        let mut terms = terms;
        terms.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for term in &terms {
            let mut found = std::collections::HashSet::new();
            for e in index.range((term.as_str(), &[0u8; 16])..)? {
                let (k, _) = e?;
                let (word, id) = k.value();
                if !word.starts_with(term.as_str()) {
                    break;
                }
                if candidates.as_ref().is_none_or(|c| c.contains(id)) {
                    found.insert(*id);
                }
                if found.len() > MAX_CANDIDATES {
                    break;
                }
            }
            candidates = Some(found);
            if candidates.as_ref().is_some_and(|c| c.is_empty()) {
                return Ok(Vec::new());
            }
        }
        let ids = r.open_table(MESSAGE_IDS)?;
        let mut keys: Vec<Key> = Vec::new();
        for id in candidates.unwrap_or_default() {
            if let Some(k) = ids.get(&id)? {
                let (p, ts, s, seq) = k.value();
                keys.push((*p, ts, *s, seq));
            }
        }
        keys.sort_by(|a, b| b.1.cmp(&a.1).then(b.cmp(a)));
        let t = r.open_table(MESSAGES)?;
        let mut out = Vec::new();
        for k in keys.into_iter().take(limit) {
            if let Some(v) = t.get((&k.0, k.1, &k.2, k.3))? {
                out.push(from_json(v.value())?);
            }
        }
        Ok(out)
    }

    /// Marks the incoming messages of a chat read, up to and including
    /// `up_to`; returns the rows that were unread. The chat's unread count
    /// drops accordingly.
    pub fn mark_read(&self, peer: &[u8; 32], up_to: &[u8; 16]) -> Result<Option<Vec<StoredMessage>>> {
        self.with_txn(true, |w| {
            let Some(k) = key_of(w, up_to)? else { return Ok(None) };
            if k.0 != *peer {
                return Ok(None);
            }
            // The chat's unread rows up to `up_to`, from the unread index:
            // also those that arrived late with an older time.
            let lo = (peer, 0u64, &[0u8; 32], 0u64);
            let hi = (&k.0, k.1, &k.2, k.3);
            let mut keys: Vec<Key> = Vec::new();
            {
                let unread = w.open_table(UNREAD)?;
                for e in unread.range(lo..=hi)? {
                    let (key, _) = e?;
                    let (p, ts, s, seq) = key.value();
                    keys.push((*p, ts, *s, seq));
                }
            }
            let mut unread = w.open_table(UNREAD)?;
            let mut t = w.open_table(MESSAGES)?;
            let mut changed: Vec<(Key, StoredMessage)> = Vec::new();
            for k in keys {
                let key = (&k.0, k.1, &k.2, k.3);
                unread.remove(key)?;
                let m: Option<StoredMessage> = t.get(key)?.map(|v| from_json(v.value())).transpose()?;
                if let Some(mut m) = m
                    && !m.read
                {
                    m.read = true;
                    t.insert(key, to_json(&m)?.as_slice())?;
                    changed.push((k, m));
                }
            }
            drop((t, unread));
            // Newest first: a receipt names the newest ones if there are many.
            changed.reverse();
            let changed: Vec<StoredMessage> = changed.into_iter().map(|(_, m)| m).collect();
            let mut chats = w.open_table(CHATS)?;
            let mut row: ChatRow = chats
                .get(peer)?
                .map(|v| from_json(v.value()))
                .transpose()?
                .unwrap_or_default();
            row.unread = row.unread.saturating_sub(changed.len() as u64);
            chats.insert(peer, to_json(&row)?.as_slice())?;
            Ok(Some(changed))
        })
    }

    // ------------------------------------------------------------- chats

    /// A chat's settings and counters (defaults if it has none yet).
    pub fn chat(&self, peer: &[u8; 32]) -> Result<ChatRow> {
        self.with_txn(false, |w| {
            let t = w.open_table(CHATS)?;
            Ok(t.get(peer)?
                .map(|v| from_json(v.value()))
                .transpose()?
                .unwrap_or_default())
        })
    }

    pub fn put_chat(&self, peer: &[u8; 32], row: &ChatRow) -> Result<()> {
        let bytes = to_json(row)?;
        self.with_txn(true, |w| {
            w.open_table(CHATS)?.insert(peer, bytes.as_slice())?;
            Ok(())
        })
    }

    /// The group id of a group chat key, if it is one.
    pub fn group_of_chat(&self, chat: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        self.with_txn(false, |w| {
            let t = w.open_table(GROUP_CHATS)?;
            Ok(t.get(chat)?.map(|v| v.value().to_vec()))
        })
    }

    // ---------------------------------------------------------- settings

    pub fn settings(&self) -> Result<Settings> {
        self.with_txn(false, |w| {
            let t = w.open_table(META)?;
            Ok(t.get("settings")?
                .map(|v| from_json(v.value()))
                .transpose()?
                .unwrap_or_default())
        })
    }

    pub fn put_settings(&self, s: &Settings) -> Result<()> {
        let bytes = to_json(s)?;
        self.with_txn(true, |w| {
            w.open_table(META)?.insert("settings", bytes.as_slice())?;
            Ok(())
        })
    }

    /// Changes the profile name of this device's identity.
    pub fn set_name(&self, name: &str) -> Result<()> {
        self.with_txn(true, |w| {
            let mut id = self.identity_in(w)?;
            id.name = name.to_owned();
            self.write_identity(w, &id)
        })
    }

    /// A contact's picture: (type, bytes).
    pub fn picture(&self, account: &[u8; 32]) -> Result<Option<(String, Vec<u8>)>> {
        self.with_txn(false, |w| {
            let t = w.open_table(PICTURES)?;
            let Some(v) = t.get(account)? else { return Ok(None) };
            let b = v.value();
            let Some(split) = b.iter().position(|x| *x == 0) else {
                return Err(StoreError::Corrupt("picture".into()));
            };
            let kind = String::from_utf8(b[..split].to_vec()).map_err(|_| StoreError::Corrupt("picture".into()))?;
            Ok(Some((kind, b[split + 1..].to_vec())))
        })
    }

    pub fn put_picture(&self, account: &[u8; 32], picture: Option<(&str, &[u8])>) -> Result<()> {
        self.with_txn(true, |w| {
            let mut t = w.open_table(PICTURES)?;
            match picture {
                Some((kind, bytes)) => {
                    let mut v = Vec::with_capacity(kind.len() + 1 + bytes.len());
                    v.extend_from_slice(kind.as_bytes());
                    v.push(0);
                    v.extend_from_slice(bytes);
                    t.insert(account, v.as_slice())?;
                }
                None => {
                    t.remove(account)?;
                }
            }
            Ok(())
        })
    }

    // ------------------------------------------------------------ tokens

    /// Stores a scoped token under the hash of its secret.
    pub fn put_token(&self, hash_hex: &str, token: &ApiToken) -> Result<()> {
        let bytes = to_json(token)?;
        self.with_txn(true, |w| {
            w.open_table(TOKENS)?.insert(hash_hex, bytes.as_slice())?;
            Ok(())
        })
    }

    /// The scoped token with this hash, if any (committed state).
    pub fn token(&self, hash_hex: &str) -> Result<Option<ApiToken>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(TOKENS)?;
        t.get(hash_hex)?.map(|v| from_json(v.value())).transpose()
    }

    /// Builds what schema version 2 added over version 1: the search index,
    /// the group chat keys and the chats' last activity, from the rows there are.
    pub(crate) fn migrate_from_1(w: &WriteTransaction) -> Result<()> {
        let mut rows: Vec<(Key, StoredMessage)> = Vec::new();
        {
            let t = w.open_table(MESSAGES)?;
            for e in t.iter()? {
                let (k, v) = e?;
                let (p, ts, s, seq) = k.value();
                rows.push(((*p, ts, *s, seq), from_json::<StoredMessage>(v.value())?));
            }
        }
        // Old rows count as read: version 1 kept no read state.
        for (k, m) in &mut rows {
            m.read = true;
            index_new(w, m, (&k.0, k.1, &k.2, k.3))?;
            w.open_table(MESSAGES)?
                .insert((&k.0, k.1, &k.2, k.3), to_json(m)?.as_slice())?;
        }
        let mut groups = Vec::new();
        {
            let t = w.open_table(CONVERSATIONS)?;
            for e in t.iter()? {
                let (_, v) = e?;
                let c: crate::Conversation = from_json(v.value())?;
                if c.group.is_some() {
                    groups.push((c.peer, c.group_id));
                }
            }
        }
        let mut gc = w.open_table(GROUP_CHATS)?;
        for (chat, gid) in groups {
            gc.insert(&chat, gid.as_slice())?;
        }
        Ok(())
    }
}
