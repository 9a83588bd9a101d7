//! Tidings durable state, on redb.
//!
//! One database per node. All tables are declared in [`schema`]. The store is
//! also the openmls `StorageProvider` ([`mls_storage`]), so MLS state lives in
//! the same database as contacts, messages and the outbox.
//!
//! # Units of work
//!
//! [`Store::unit`] opens one redb write transaction and routes every read and
//! write of the store (the MLS provider's included) through it until the
//! closure returns: `Ok` commits durably, `Err` rolls everything back. An MLS
//! operation and the rows it implies (outbox entry, history row, dedup id)
//! therefore commit together or not at all, and a crash never tears a group.
//! Outside a unit, each call is its own transaction. A unit belongs to the
//! thread that opened it: calls from other threads never join it, they wait
//! for it to commit and then run in a transaction of their own.
//!
//! The `list_*` and `snapshot_*` readers use separate read transactions and see
//! only committed state; they are safe to call from any task.

mod chats;
pub mod mailbox;
pub mod memory;
pub mod mls_storage;
pub mod schema;
pub mod seal;
mod types;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::task::{Poll, Waker};
use std::thread::{self, ThreadId};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};

pub use chats::words;
pub use types::*;

use schema::*;
use seal::{DataKey, IDENTITY_AAD, SEAL_ROW, SealHeader, SealState, mls_aad};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    #[error("database schema version {found} is not supported (this build uses {expected})")]
    SchemaVersion { found: u32, expected: u32 },
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    #[error("no identity in this data directory (run `tidings init`)")]
    NoIdentity,
    #[error("store lock poisoned")]
    Poisoned,
    #[error("the data directory is locked by a passphrase")]
    Locked,
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("{0}")]
    WeakPassphrase(String),
    #[error("the operating system gave no randomness")]
    Randomness,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.into()) }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The `META` row holding when the user record was last published and what it said.
const RECORD_PUBLISHED_ROW: &str = "record_published";

/// The `META` row holding the DHT peers this device knew when it last saved them.
const KNOWN_PEERS_ROW: &str = "known_peers";
/// The `META` row holding when (ms, little-endian) the saved DHT peers were last
/// the device's routing table.
const KNOWN_PEERS_CURRENT_ROW: &str = "known_peers_current_ms";
/// At most this many known peers are kept, each with at most
/// [`MAX_KNOWN_PEER_ADDRS`] addresses of at most [`MAX_KNOWN_PEER_BYTES`] bytes
/// (its id too); a longer list is cut, a row larger than their product refused.
pub const MAX_KNOWN_PEERS: usize = 64;
pub const MAX_KNOWN_PEER_ADDRS: usize = 4;
pub const MAX_KNOWN_PEER_BYTES: usize = 256;

/// A DHT peer as saved: its peer id and addresses, as bytes.
pub type KnownPeer = (Vec<u8>, Vec<Vec<u8>>);

/// The `META` row holding the DHT servers the last lookup for the user record's
/// publication found nearest its key, and when (ms): where renewals go.
const RECORD_HOLDERS_ROW: &str = "record_holders";

/// `peers` as a JSON row: the first [`MAX_KNOWN_PEERS`], without addresses or ids longer than
/// [`MAX_KNOWN_PEER_BYTES`], at most [`MAX_KNOWN_PEER_ADDRS`] addresses each, none without one.
fn peers_row(peers: &[KnownPeer]) -> Result<Vec<u8>> {
    let fits = |b: &Vec<u8>| b.len() <= MAX_KNOWN_PEER_BYTES;
    let saved: Vec<(String, Vec<String>)> = peers
        .iter()
        .filter(|(id, _)| fits(id))
        .map(|(id, addrs)| {
            let addrs = addrs
                .iter()
                .filter(|a| fits(a))
                .take(MAX_KNOWN_PEER_ADDRS)
                .map(hex::encode);
            (hex::encode(id), addrs.collect::<Vec<_>>())
        })
        .filter(|(_, addrs)| !addrs.is_empty())
        .take(MAX_KNOWN_PEERS)
        .collect();
    to_json(&saved)
}

/// The peers of a row written by [`peers_row`]; `row` names it in errors.
fn peers_from_row(row: &str, bytes: &[u8]) -> Result<Vec<KnownPeer>> {
    // Hex doubles the bytes; JSON adds a little per field.
    let cap = MAX_KNOWN_PEERS * (MAX_KNOWN_PEER_ADDRS + 1) * (2 * MAX_KNOWN_PEER_BYTES + 8);
    if bytes.len() > cap {
        return Err(StoreError::Corrupt(format!("{row} is larger than {cap} bytes")));
    }
    let saved: Vec<(String, Vec<String>)> = from_json(bytes)?;
    let unhex = |h: &str| hex::decode(h).map_err(|e| StoreError::Corrupt(format!("{row}: {e}")));
    saved
        .iter()
        .take(MAX_KNOWN_PEERS)
        .map(|(id, addrs)| {
            let addrs = addrs
                .iter()
                .take(MAX_KNOWN_PEER_ADDRS)
                .map(|a| unhex(a))
                .collect::<Result<_>>()?;
            Ok((unhex(id)?, addrs))
        })
        .collect()
}

/// Page cache of a node's database. A device's working set (MLS state, recent
/// history, the outbox) is small; redb's default of 1 GiB would let a long-running
/// node grow far beyond what it needs.
pub const NODE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Page cache of a database that lives in memory: its pages are in memory
/// already, so redb's cache would only hold second copies of them (about a
/// third of a megabyte per node in the simulator; SIMULATOR.md, "smaller page
/// caches", which measured the same CPU with this size).
pub const IN_MEMORY_CACHE_BYTES: usize = 64 * 1024;

/// The node's database.
pub struct Store {
    db: Database,
    unit: Mutex<Option<(ThreadId, WriteTransaction)>>,
    /// How secret rows are sealed ([`seal`]). Lock order: a write transaction
    /// first, then this; never the other way round.
    seal: RwLock<SealState>,
    /// Write transactions committed through this handle ([`Store::changes`]).
    changes: AtomicU64,
    /// Tasks waiting in [`Store::changed`] for the next commit.
    change_waiters: Mutex<Vec<Waker>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::init(Database::builder().set_cache_size(NODE_CACHE_BYTES).create(path)?)
    }

    /// Opens a database that lives only in memory (tests, the simulator).
    pub fn open_in_memory() -> Result<Self> {
        let db = Database::builder()
            .set_cache_size(IN_MEMORY_CACHE_BYTES)
            .create_with_backend(memory::PagedMemory::new())?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self> {
        let mut store = Self {
            db,
            unit: Mutex::new(None),
            seal: RwLock::new(SealState::Plain),
            changes: AtomicU64::new(0),
            change_waiters: Mutex::new(Vec::new()),
        };
        store.check_schema()?;
        if store.seal_header()?.is_some() {
            store.seal = RwLock::new(SealState::Locked);
        }
        Ok(store)
    }

    fn check_schema(&self) -> Result<()> {
        let w = self.db.begin_write()?;
        let found = {
            let mut meta = w.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| {
                let b = v.value();
                b.try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("schema_version".into()))
            });
            match found {
                Some(v) => Some(v?),
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION.to_be_bytes().as_slice())?;
                    None
                }
            }
        };
        let migrate = match found {
            Some(found) if found == SCHEMA_VERSION => false,
            Some(found) if MIGRATES_FROM.contains(&found) => true,
            Some(found) => {
                w.abort()?;
                return Err(StoreError::SchemaVersion {
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
            None => false,
        };
        // Create every table so that read transactions never miss one.
        w.open_table(MLS)?;
        w.open_table(CONTACTS)?;
        w.open_table(CONVERSATIONS)?;
        w.open_table(MESSAGES)?;
        w.open_table(MESSAGE_IDS)?;
        w.open_table(OUTBOX)?;
        w.open_table(WAITING)?;
        w.open_table(SEEN_ENVELOPES)?;
        w.open_table(DHT_RECORDS)?;
        w.open_table(RECEIPTS)?;
        w.open_table(MAIL_CURSORS)?;
        w.open_table(MAIL_GAPS)?;
        w.open_table(GROUP_SENT)?;
        w.open_table(CHATS)?;
        w.open_table(GROUP_CHATS)?;
        w.open_table(WORDS)?;
        w.open_table(EXPIRY)?;
        w.open_table(UNREAD)?;
        w.open_table(PICTURES)?;
        w.open_table(TOKENS)?;
        if migrate {
            // Version 1 → 2 in the same transaction: all of it or none.
            Self::migrate_from_1(&w)?;
            w.open_table(META)?
                .insert("schema_version", SCHEMA_VERSION.to_be_bytes().as_slice())?;
        }
        w.commit()?;
        Ok(())
    }

    /// Overwrites the stored schema version (tests of version checks only).
    #[doc(hidden)]
    pub fn force_schema_version(&self, v: u32) -> Result<()> {
        self.with_txn(true, |w| {
            w.open_table(META)?
                .insert("schema_version", v.to_be_bytes().as_slice())?;
            Ok(())
        })
    }

    /// Empties the search index and the chats table (tests of the migration only).
    #[doc(hidden)]
    pub fn wipe_search_index_for_tests(&self) -> Result<()> {
        self.with_txn(true, |w| {
            w.delete_table(WORDS)?;
            w.delete_table(CHATS)?;
            Ok(())
        })
    }

    /// Runs `f` as one unit of work: every store access inside it goes through
    /// one write transaction, committed durably if `f` returns `Ok` and rolled
    /// back otherwise. Units do not nest: an inner call joins the outer unit.
    pub fn unit<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let me = thread::current().id();
        {
            let slot = self.unit.lock().map_err(|_| StoreError::Poisoned)?;
            if slot.as_ref().is_some_and(|(owner, _)| *owner == me) {
                drop(slot);
                return f();
            }
        }
        // Another thread's unit (if any) must finish first: begin_write waits for it.
        let mut w = self.db.begin_write().map_err(StoreError::from)?;
        w.set_durability(Durability::Immediate).map_err(StoreError::from)?;
        *self.unit.lock().map_err(|_| StoreError::Poisoned)? = Some((me, w));
        let out = f();
        let w = self.unit.lock().map_err(|_| StoreError::Poisoned)?.take();
        if let Some((_, w)) = w {
            match &out {
                Ok(_) => {
                    w.commit().map_err(StoreError::from)?;
                    self.committed();
                }
                Err(_) => w.abort().map_err(StoreError::from)?,
            }
        }
        out
    }

    /// How many write transactions this handle has committed since it was opened. Equal readings
    /// mean nothing was written between them: a cheap test for periodic checks whose answer
    /// depends only on what is stored.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Waits until [`Store::changes`] differs from `seen`, and returns its new reading: a task
    /// whose work depends only on what is stored sleeps here instead of polling on a timer.
    /// Any executor will do; a dropped wait leaves at most one stale waker per task behind, which
    /// the next commit wakes and drops.
    pub fn changed(&self, seen: u64) -> impl Future<Output = u64> + '_ {
        std::future::poll_fn(move |cx| {
            let now = self.changes();
            if now != seen {
                return Poll::Ready(now);
            }
            let mut waiters = self.change_waiters.lock().unwrap_or_else(|p| p.into_inner());
            // A commit between the reading above and this lock has woken the waiters already:
            // read again under the lock, which every commit takes after counting itself.
            let now = self.changes();
            if now != seen {
                return Poll::Ready(now);
            }
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    /// Counts a committed write transaction and wakes the tasks waiting for one.
    fn committed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        let waiters = std::mem::take(&mut *self.change_waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for w in waiters {
            w.wake();
        }
    }

    /// Runs `f` in the open unit, or in a transaction of its own.
    fn with_txn<T>(&self, write: bool, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let slot = self.unit.lock().map_err(|_| StoreError::Poisoned)?;
        if let Some((owner, w)) = slot.as_ref()
            && *owner == thread::current().id()
        {
            return f(w);
        }
        drop(slot);
        let mut w = self.db.begin_write()?;
        if write {
            w.set_durability(Durability::Immediate)?;
            let out = f(&w)?;
            w.commit()?;
            self.committed();
            Ok(out)
        } else {
            let out = f(&w);
            w.abort()?;
            out
        }
    }

    // ------------------------------------------------------------ MLS rows

    pub(crate) fn mls_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.with_txn(false, |w| {
            let t = w.open_table(MLS)?;
            let Some(v) = t.get(key)? else { return Ok(None) };
            let seal = self.seal.read().map_err(|_| StoreError::Poisoned)?;
            Ok(Some(seal.open(&mls_aad(key), v.value())?))
        })
    }

    pub(crate) fn mls_put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.with_txn(true, |w| {
            let sealed = self
                .seal
                .read()
                .map_err(|_| StoreError::Poisoned)?
                .seal(&mls_aad(key), value.to_vec())?;
            w.open_table(MLS)?.insert(key, sealed.as_slice())?;
            Ok(())
        })
    }

    /// Writes one raw row of the MLS table, sealed like any other
    /// (benchmarks of the passphrase only; openmls goes through the provider).
    #[doc(hidden)]
    pub fn put_mls_row_for_bench(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.mls_put(key, value)
    }

    pub(crate) fn mls_delete(&self, key: &[u8]) -> Result<()> {
        self.with_txn(true, |w| {
            w.open_table(MLS)?.remove(key)?;
            Ok(())
        })
    }

    // ------------------------------------------------------------ identity

    pub fn put_identity(&self, id: &Identity) -> Result<()> {
        self.with_txn(true, |w| self.write_identity(w, id))
    }

    pub(crate) fn write_identity(&self, w: &WriteTransaction, id: &Identity) -> Result<()> {
        let bytes = self
            .seal
            .read()
            .map_err(|_| StoreError::Poisoned)?
            .seal(IDENTITY_AAD, to_json(id)?)?;
        w.open_table(META)?.insert("identity", bytes.as_slice())?;
        Ok(())
    }

    pub fn identity(&self) -> Result<Identity> {
        // The seal state is read before the snapshot is taken, so that a
        // passphrase change committing in between cannot pair the two wrongly.
        let seal = self.seal.read().map_err(|_| StoreError::Poisoned)?;
        let r = self.db.begin_read()?;
        let t = r.open_table(META)?;
        let v = t.get("identity")?.ok_or(StoreError::NoIdentity)?;
        from_json(&seal.open(IDENTITY_AAD, v.value())?)
    }

    pub(crate) fn identity_in(&self, w: &WriteTransaction) -> Result<Identity> {
        let t = w.open_table(META)?;
        let v = t.get("identity")?.ok_or(StoreError::NoIdentity)?;
        let seal = self.seal.read().map_err(|_| StoreError::Poisoned)?;
        from_json(&seal.open(IDENTITY_AAD, v.value())?)
    }

    /// Whether this database holds an identity (readable or locked).
    pub fn has_identity(&self) -> Result<bool> {
        let r = self.db.begin_read()?;
        Ok(r.open_table(META)?.get("identity")?.is_some())
    }

    // ------------------------------------------------------------ passphrase

    fn seal_header(&self) -> Result<Option<SealHeader>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(META)?;
        t.get(SEAL_ROW)?.map(|v| from_json(v.value())).transpose()
    }

    /// Whether secrets are sealed under a passphrase.
    pub fn has_passphrase(&self) -> Result<bool> {
        Ok(self.seal_header()?.is_some())
    }

    /// Whether secrets are sealed and the passphrase has not been given yet.
    pub fn is_locked(&self) -> Result<bool> {
        Ok(matches!(
            *self.seal.read().map_err(|_| StoreError::Poisoned)?,
            SealState::Locked
        ))
    }

    /// Opens the sealed secrets with `passphrase` (a no-op without one set).
    /// Takes a fraction of a second on purpose (Argon2id).
    pub fn unlock(&self, passphrase: &str) -> Result<()> {
        let Some(header) = self.seal_header()? else {
            return Ok(());
        };
        let key = header.unseal(passphrase)?;
        *self.seal.write().map_err(|_| StoreError::Poisoned)? = SealState::Open(key);
        Ok(())
    }

    /// Sets, changes or removes the passphrase. `current` must be the
    /// passphrase in force, if any; `new = None` removes it. Setting or
    /// removing rewrites every secret row in one transaction; changing
    /// re-seals only the data key.
    pub fn set_passphrase(&self, current: Option<&str>, new: Option<&str>) -> Result<()> {
        if let Some(p) = new {
            seal::check_passphrase(p)?;
        }
        // Argon2 runs before any lock is taken.
        let before = self.seal_header()?;
        let old_key = match (&before, current) {
            (None, _) => None,
            (Some(h), Some(c)) => Some(h.unseal(c)?),
            (Some(_), None) => return Err(StoreError::WrongPassphrase),
        };
        let rewrite_rows = old_key.is_some() != new.is_some();
        let (header, new_key) = match (new, old_key) {
            (None, _) => (None, None),
            (Some(p), Some(k)) => (Some(SealHeader::new(p, &k)?), Some(k)),
            (Some(p), None) => {
                let k = DataKey::generate()?;
                (Some(SealHeader::new(p, &k)?), Some(k))
            }
        };
        // Never from inside a unit: the rows are rewritten in a transaction of
        // their own, committed before the state changes (and a second write
        // transaction on this thread would wait for itself).
        let in_unit = self
            .unit
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .as_ref()
            .is_some_and(|(owner, _)| *owner == thread::current().id());
        if in_unit {
            return Err(StoreError::Corrupt("set_passphrase inside a unit of work".into()));
        }
        let mut w = self.db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        let mut state = self.seal.write().map_err(|_| StoreError::Poisoned)?;
        let now: Option<SealHeader> = w
            .open_table(META)?
            .get(SEAL_ROW)?
            .map(|v| from_json(v.value()))
            .transpose()?;
        if now != before {
            // Another change committed since the passphrase was checked.
            w.abort()?;
            return Err(StoreError::WrongPassphrase);
        }
        if rewrite_rows {
            let to = match &new_key {
                Some(k) => SealState::Open(k.clone()),
                None => SealState::Plain,
            };
            if let Err(e) = Self::reseal_rows(&w, &state, &to) {
                w.abort()?;
                return Err(e);
            }
        }
        {
            let mut meta = w.open_table(META)?;
            match &header {
                Some(h) => meta.insert(SEAL_ROW, to_json(h)?.as_slice())?,
                None => meta.remove(SEAL_ROW)?,
            };
        }
        w.commit()?;
        self.committed();
        *state = match new_key {
            Some(k) => SealState::Open(k),
            None => SealState::Plain,
        };
        Ok(())
    }

    /// Rewrites the identity and every `mls` row from `from`'s form to `to`'s.
    fn reseal_rows(w: &WriteTransaction, from: &SealState, to: &SealState) -> Result<()> {
        let mut meta = w.open_table(META)?;
        let id = meta.get("identity")?.map(|v| v.value().to_vec());
        if let Some(stored) = id {
            let plain = from.open(IDENTITY_AAD, &stored)?;
            meta.insert("identity", to.seal(IDENTITY_AAD, plain)?.as_slice())?;
        }
        let mut mls = w.open_table(MLS)?;
        let rows: Vec<(Vec<u8>, Vec<u8>)> = mls
            .iter()?
            .map(|r| r.map(|(k, v)| (k.value().to_vec(), v.value().to_vec())))
            .collect::<std::result::Result<_, _>>()?;
        for (k, stored) in rows {
            let aad = mls_aad(&k);
            let plain = from.open(&aad, &stored)?;
            mls.insert(k.as_slice(), to.seal(&aad, plain)?.as_slice())?;
        }
        Ok(())
    }

    /// Increments and returns a named counter (starts at 1).
    /// Encoded certificates of every device of this account we know of
    /// (this one included once linking happened; empty before).
    pub fn own_devices(&self) -> Result<Vec<Vec<u8>>> {
        self.with_txn(false, |w| {
            let t = w.open_table(META)?;
            t.get("own_devices")?
                .map(|v| from_json(v.value()))
                .transpose()
                .map(Option::unwrap_or_default)
        })
    }

    pub fn put_own_devices(&self, certs: &[Vec<u8>]) -> Result<()> {
        let bytes = to_json(&certs)?;
        self.with_txn(true, |w| {
            w.open_table(META)?.insert("own_devices", bytes.as_slice())?;
            Ok(())
        })
    }

    /// Up to `limit` history rows of every chat, in table order, after the
    /// first `after`; and whether more follow.
    pub fn messages_page(&self, after: u64, limit: usize) -> Result<(Vec<StoredMessage>, bool)> {
        let r = self.db.begin_read()?;
        let t = r.open_table(MESSAGES)?;
        let mut out = Vec::new();
        let mut more = false;
        for e in t.iter()?.skip(usize::try_from(after).unwrap_or(usize::MAX)) {
            if out.len() == limit {
                more = true;
                break;
            }
            let (_, v) = e?;
            out.push(from_json(v.value())?);
        }
        Ok((out, more))
    }

    pub fn next_counter(&self, name: &str) -> Result<u64> {
        let key = format!("counter/{name}");
        self.with_txn(true, |w| {
            let mut t = w.open_table(META)?;
            let cur = match t.get(key.as_str())? {
                Some(v) => u64::from_be_bytes(v.value().try_into().map_err(|_| StoreError::Corrupt(key.clone()))?),
                None => 0,
            };
            let next = cur + 1;
            t.insert(key.as_str(), next.to_be_bytes().as_slice())?;
            Ok(next)
        })
    }

    /// When this account's user record was last published, and the digest of
    /// what it said (see `tidings_protocol::record::user_record_contents_digest`).
    pub fn last_record_publication(&self) -> Result<Option<(u64, [u8; 32])>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(META)?;
        let Some(v) = t.get(RECORD_PUBLISHED_ROW)? else {
            return Ok(None);
        };
        let bytes = v.value();
        let corrupt = || StoreError::Corrupt(RECORD_PUBLISHED_ROW.into());
        let (at, digest) = bytes.split_at_checked(8).ok_or_else(corrupt)?;
        let at = u64::from_be_bytes(at.try_into().map_err(|_| corrupt())?);
        let digest: [u8; 32] = digest.try_into().map_err(|_| corrupt())?;
        Ok(Some((at, digest)))
    }

    /// Notes that the user record saying `digest` was published at `at_ms`.
    pub fn set_last_record_publication(&self, at_ms: u64, digest: [u8; 32]) -> Result<()> {
        let mut row = Vec::with_capacity(40);
        row.extend_from_slice(&at_ms.to_be_bytes());
        row.extend_from_slice(&digest);
        self.with_txn(true, |w| {
            w.open_table(META)?.insert(RECORD_PUBLISHED_ROW, row.as_slice())?;
            Ok(())
        })
    }

    /// The DHT servers saved by [`Self::set_record_holders`] and when they were
    /// found (ms); `None` if none are saved.
    pub fn record_holders(&self) -> Result<Option<(u64, Vec<KnownPeer>)>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(META)?;
        let Some(v) = t.get(RECORD_HOLDERS_ROW)? else {
            return Ok(None);
        };
        let corrupt = || StoreError::Corrupt(RECORD_HOLDERS_ROW.into());
        let (at, peers) = v.value().split_at_checked(8).ok_or_else(corrupt)?;
        let at = u64::from_be_bytes(at.try_into().map_err(|_| corrupt())?);
        Ok(Some((at, peers_from_row(RECORD_HOLDERS_ROW, peers)?)))
    }

    /// Saves the DHT servers a lookup found nearest the user record's key at
    /// `found_ms` (limits as [`Self::set_known_peers`]), or forgets them (`None`).
    pub fn set_record_holders(&self, holders: Option<(u64, &[KnownPeer])>) -> Result<()> {
        let row = match holders {
            Some((found_ms, peers)) => {
                let mut row = found_ms.to_be_bytes().to_vec();
                row.extend(peers_row(peers)?);
                Some(row)
            }
            None => None,
        };
        self.with_txn(true, |w| {
            let mut t = w.open_table(META)?;
            match &row {
                Some(row) => t.insert(RECORD_HOLDERS_ROW, row.as_slice())?,
                None => t.remove(RECORD_HOLDERS_ROW)?,
            };
            Ok(())
        })
    }

    /// The DHT peers saved by [`Self::set_known_peers`].
    pub fn known_peers(&self) -> Result<Vec<KnownPeer>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(META)?;
        let Some(v) = t.get(KNOWN_PEERS_ROW)? else {
            return Ok(Vec::new());
        };
        peers_from_row(KNOWN_PEERS_ROW, v.value())
    }

    /// Saves the DHT peers to start from next time, replacing those saved
    /// before: the first [`MAX_KNOWN_PEERS`], without addresses or ids longer
    /// than [`MAX_KNOWN_PEER_BYTES`]. They are the routing table at `now_ms`
    /// (see [`Self::known_peers_current_ms`]).
    pub fn set_known_peers(&self, peers: &[KnownPeer], now_ms: u64) -> Result<()> {
        let row = peers_row(peers)?;
        self.with_txn(true, |w| {
            let mut t = w.open_table(META)?;
            t.insert(KNOWN_PEERS_ROW, row.as_slice())?;
            t.insert(KNOWN_PEERS_CURRENT_ROW, now_ms.to_le_bytes().as_slice())?;
            Ok(())
        })
    }

    /// Records that the saved DHT peers were still the routing table at `now_ms`.
    pub fn mark_known_peers_current(&self, now_ms: u64) -> Result<()> {
        self.with_txn(true, |w| {
            w.open_table(META)?
                .insert(KNOWN_PEERS_CURRENT_ROW, now_ms.to_le_bytes().as_slice())?;
            Ok(())
        })
    }

    /// When the saved DHT peers were last known to be the routing table
    /// (ms); `None` if no peers were saved with a time.
    pub fn known_peers_current_ms(&self) -> Result<Option<u64>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(META)?;
        let Some(v) = t.get(KNOWN_PEERS_CURRENT_ROW)? else {
            return Ok(None);
        };
        let bytes: [u8; 8] = v
            .value()
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("{KNOWN_PEERS_CURRENT_ROW} is not 8 bytes")))?;
        Ok(Some(u64::from_le_bytes(bytes)))
    }

    /// Raises a named counter to at least `value` and returns the new value.
    pub fn raise_counter(&self, name: &str, value: u64) -> Result<u64> {
        let key = format!("counter/{name}");
        self.with_txn(true, |w| {
            let mut t = w.open_table(META)?;
            let cur = match t.get(key.as_str())? {
                Some(v) => u64::from_be_bytes(v.value().try_into().map_err(|_| StoreError::Corrupt(key.clone()))?),
                None => 0,
            };
            let next = cur.max(value);
            t.insert(key.as_str(), next.to_be_bytes().as_slice())?;
            Ok(next)
        })
    }

    // ------------------------------------------------------------ contacts

    pub fn put_contact(&self, c: &Contact) -> Result<()> {
        let bytes = to_json(c)?;
        self.with_txn(true, |w| {
            w.open_table(CONTACTS)?.insert(&c.account, bytes.as_slice())?;
            Ok(())
        })
    }

    pub fn contact(&self, account: &[u8; 32]) -> Result<Option<Contact>> {
        self.with_txn(false, |w| {
            let t = w.open_table(CONTACTS)?;
            t.get(account)?.map(|v| from_json(v.value())).transpose()
        })
    }

    pub fn list_contacts(&self) -> Result<Vec<Contact>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(CONTACTS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            out.push(from_json(v.value())?);
        }
        Ok(out)
    }

    // ------------------------------------------------------- conversations

    pub fn put_conversation(&self, c: &Conversation) -> Result<()> {
        let bytes = to_json(c)?;
        self.with_txn(true, |w| {
            w.open_table(CONVERSATIONS)?
                .insert(c.group_id.as_slice(), bytes.as_slice())?;
            if c.group.is_some() {
                w.open_table(GROUP_CHATS)?.insert(&c.peer, c.group_id.as_slice())?;
            }
            Ok(())
        })
    }

    pub fn conversation(&self, group_id: &[u8]) -> Result<Option<Conversation>> {
        self.with_txn(false, |w| {
            let t = w.open_table(CONVERSATIONS)?;
            t.get(group_id)?.map(|v| from_json(v.value())).transpose()
        })
    }

    /// Every group chat, in group id order (committed state).
    pub fn list_groups(&self) -> Result<Vec<Conversation>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(CONVERSATIONS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            let c: Conversation = from_json(v.value())?;
            if c.group.is_some() {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Remembers a group message of ours until it is seen in the sequence.
    pub fn put_group_sent(&self, envelope_id: &[u8; 16], sent: &GroupSent) -> Result<()> {
        let bytes = to_json(sent)?;
        self.with_txn(true, |w| {
            w.open_table(GROUP_SENT)?.insert(envelope_id, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Takes (removes and returns) a group message of ours by envelope id.
    pub fn take_group_sent(&self, envelope_id: &[u8; 16]) -> Result<Option<GroupSent>> {
        self.with_txn(true, |w| {
            let mut t = w.open_table(GROUP_SENT)?;
            let v = t.remove(envelope_id)?;
            v.map(|v| from_json(v.value())).transpose()
        })
    }

    /// Takes every group message of ours in `group_id` not yet seen in its sequence.
    pub fn take_group_sent_of(&self, group_id: &[u8]) -> Result<Vec<GroupSent>> {
        self.with_txn(true, |w| {
            let mut t = w.open_table(GROUP_SENT)?;
            let mut ids = Vec::new();
            let mut out = Vec::new();
            for e in t.iter()? {
                let (k, v) = e?;
                let sent: GroupSent = from_json(v.value())?;
                if sent.group_id == group_id {
                    ids.push(*k.value());
                    out.push(sent);
                }
            }
            for id in ids {
                t.remove(&id)?;
            }
            Ok(out)
        })
    }

    // ------------------------------------------------------------ messages

    /// Stores a history row unless a message with the same id exists.
    /// Returns whether it was inserted.
    pub fn insert_message(&self, m: &StoredMessage) -> Result<bool> {
        let bytes = to_json(m)?;
        self.with_txn(true, |w| {
            let mut ids = w.open_table(MESSAGE_IDS)?;
            if ids.get(&m.id)?.is_some() {
                return Ok(false);
            }
            // Devices of one account count their sequence numbers apart, so
            // two of them can send with the same time and number: the key's
            // last part also carries the start of the message id (the same
            // on every device, so every device orders alike), and a clash
            // beyond that moves to the next free slot.
            let mut slot = (m.sender_seq << 16) | u64::from(u16::from_be_bytes([m.id[0], m.id[1]]));
            let mut messages = w.open_table(MESSAGES)?;
            while messages.get((&m.peer, m.timestamp_ms, &m.sender, slot))?.is_some() {
                slot = slot.wrapping_add(1);
            }
            let key = (&m.peer, m.timestamp_ms, &m.sender, slot);
            ids.insert(&m.id, key)?;
            messages.insert(key, bytes.as_slice())?;
            drop((ids, messages));
            if m.outgoing && m.state == MessageState::Waiting {
                w.open_table(WAITING)?.insert((&m.peer, m.sender_seq), &m.id)?;
            }
            chats::index_new(w, m, key)?;
            Ok(true)
        })
    }

    /// Whether a message id is already in the history.
    pub fn has_message(&self, id: &[u8; 16]) -> Result<bool> {
        self.with_txn(false, |w| Ok(w.open_table(MESSAGE_IDS)?.get(id)?.is_some()))
    }

    /// Updates the delivery state of an outgoing message.
    pub fn set_message_state(&self, id: &[u8; 16], state: MessageState) -> Result<()> {
        self.with_txn(true, |w| {
            let ids = w.open_table(MESSAGE_IDS)?;
            let Some(key) = ids.get(id)?.map(|k| {
                let (p, ts, s, seq) = k.value();
                (*p, ts, *s, seq)
            }) else {
                return Ok(());
            };
            drop(ids);
            let mut t = w.open_table(MESSAGES)?;
            let k = (&key.0, key.1, &key.2, key.3);
            let m = t.get(k)?.map(|v| from_json::<StoredMessage>(v.value())).transpose()?;
            if let Some(mut m) = m
                && m.state < state
            {
                if m.state == MessageState::Waiting {
                    w.open_table(WAITING)?.remove((&m.peer, m.sender_seq))?;
                }
                m.state = state;
                t.insert(k, to_json(&m)?.as_slice())?;
            }
            Ok(())
        })
    }

    /// Our messages to `peer` that wait for a conversation, in the order
    /// they were written.
    pub fn waiting_messages(&self, peer: &[u8; 32]) -> Result<Vec<StoredMessage>> {
        self.with_txn(false, |w| {
            let ids: Vec<[u8; 16]> = w
                .open_table(WAITING)?
                .range((peer, 0)..=(peer, u64::MAX))?
                .map(|e| e.map(|(_, v)| *v.value()))
                .collect::<std::result::Result<_, _>>()?;
            let mut keys = Vec::with_capacity(ids.len());
            for id in ids {
                keys.extend(chats::key_of(w, &id)?);
            }
            let messages = w.open_table(MESSAGES)?;
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                let m: Option<StoredMessage> = messages
                    .get((&k.0, k.1, &k.2, k.3))?
                    .map(|v| from_json(v.value()))
                    .transpose()?;
                out.extend(m.filter(|m| m.state == MessageState::Waiting));
            }
            Ok(out)
        })
    }

    /// Whether any message of ours to `peer` waits for a conversation.
    pub fn has_waiting(&self, peer: &[u8; 32]) -> Result<bool> {
        self.with_txn(false, |w| {
            Ok(w.open_table(WAITING)?
                .range((peer, 0)..=(peer, u64::MAX))?
                .next()
                .transpose()?
                .is_some())
        })
    }

    /// The accounts we have messages waiting for (see [`Store::waiting_messages`]).
    pub fn waiting_peers(&self) -> Result<Vec<[u8; 32]>> {
        self.with_txn(false, |w| {
            let mut peers: Vec<[u8; 32]> = Vec::new();
            for e in w.open_table(WAITING)?.iter()? {
                let (k, _) = e?;
                let peer = *k.value().0;
                if peers.last() != Some(&peer) {
                    peers.push(peer);
                }
            }
            Ok(peers)
        })
    }

    /// The history with one peer, oldest first (display order).
    pub fn list_messages(&self, peer: &[u8; 32]) -> Result<Vec<StoredMessage>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(MESSAGES)?;
        let lo = (peer, 0u64, &[0u8; 32], 0u64);
        let hi = (peer, u64::MAX, &[0xffu8; 32], u64::MAX);
        let mut out = Vec::new();
        for e in t.range(lo..=hi)? {
            let (_, v) = e?;
            out.push(from_json(v.value())?);
        }
        Ok(out)
    }

    pub fn message_count(&self) -> Result<u64> {
        let r = self.db.begin_read()?;
        Ok(r.open_table(MESSAGES)?.len()?)
    }

    // -------------------------------------------------------------- outbox

    /// Appends an entry to the outbox and returns its number.
    pub fn push_outbox(&self, mut e: OutboxEntry) -> Result<u64> {
        let id = self.next_counter("outbox")?;
        e.id = id;
        let bytes = to_json(&e)?;
        self.with_txn(true, |w| {
            w.open_table(OUTBOX)?.insert(id, bytes.as_slice())?;
            Ok(id)
        })
    }

    pub fn remove_outbox(&self, ids: &[u64]) -> Result<()> {
        self.with_txn(true, |w| {
            let mut t = w.open_table(OUTBOX)?;
            for id in ids {
                t.remove(id)?;
            }
            Ok(())
        })
    }

    /// Every outbox entry, oldest first (committed state).
    pub fn list_outbox(&self) -> Result<Vec<OutboxEntry>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            out.push(from_json(v.value())?);
        }
        Ok(out)
    }

    pub fn outbox_len(&self) -> Result<u64> {
        let r = self.db.begin_read()?;
        Ok(r.open_table(OUTBOX)?.len()?)
    }

    // -------------------------------------------------- envelope dedup

    pub fn envelope_seen(&self, id: &[u8; 16]) -> Result<bool> {
        self.with_txn(false, |w| Ok(w.open_table(SEEN_ENVELOPES)?.get(id)?.is_some()))
    }

    pub fn mark_envelope_seen(&self, id: &[u8; 16], now_ms: u64) -> Result<()> {
        self.with_txn(true, |w| {
            w.open_table(SEEN_ENVELOPES)?.insert(id, now_ms)?;
            Ok(())
        })
    }

    // ------------------------------------------------------------ receipts

    /// Keeps a relay's custody receipt for a message (or envelope) id.
    pub fn add_receipt(&self, id: &[u8; 16], relay: &[u8; 32], receipt: &[u8]) -> Result<()> {
        self.with_txn(true, |w| {
            w.open_table(RECEIPTS)?.insert((id, relay), receipt)?;
            Ok(())
        })
    }

    /// The custody receipts held for a message (or envelope) id.
    pub fn receipts(&self, id: &[u8; 16]) -> Result<Vec<Vec<u8>>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(RECEIPTS)?;
        let mut out = Vec::new();
        for e in t.range((id, &[0u8; 32])..=(id, &[0xffu8; 32]))? {
            let (_, v) = e?;
            out.push(v.value().to_vec());
        }
        Ok(out)
    }

    // ------------------------------------------------------- mail cursors

    /// Records that envelopes with `indices` (in the order applied) came from
    /// our inbox on `relay`: advances the cursor, records every index skipped
    /// over as missing, and clears missing indices that arrive late. Returns
    /// the gaps found by this call. Inside a unit this commits with the
    /// messages the envelopes carried.
    pub fn record_mail_indices(
        &self,
        relay: &[u8; 32],
        request_inbox: bool,
        indices: &[u64],
        now_ms: u64,
    ) -> Result<Vec<MailGap>> {
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        self.with_txn(true, |w| {
            let mut cursors = w.open_table(MAIL_CURSORS)?;
            let mut gaps = w.open_table(MAIL_GAPS)?;
            let mut cursor = cursors.get((relay, request_inbox))?.map_or(0, |v| v.value());
            let mut found = Vec::new();
            for &i in indices {
                if i > cursor {
                    if i > cursor + 1 {
                        let gap = MailGap {
                            relay: *relay,
                            request_inbox,
                            from: cursor + 1,
                            to: i - 1,
                            detected_ms: now_ms,
                        };
                        gaps.insert((relay, request_inbox, gap.from), (gap.to, now_ms))?;
                        found.push(gap);
                    }
                    cursor = i;
                    continue;
                }
                // At or behind the cursor: a late arrival may fill a gap.
                let hit = gaps
                    .range((relay, request_inbox, 0)..=(relay, request_inbox, i))?
                    .next_back()
                    .transpose()?
                    .map(|(k, v)| (k.value().2, v.value()));
                if let Some((from, (to, detected))) = hit
                    && i <= to
                {
                    gaps.remove((relay, request_inbox, from))?;
                    if from < i {
                        gaps.insert((relay, request_inbox, from), (i - 1, detected))?;
                    }
                    if i < to {
                        gaps.insert((relay, request_inbox, i + 1), (to, detected))?;
                    }
                    found.retain(|g: &MailGap| !(g.from <= i && i <= g.to));
                }
            }
            cursors.insert((relay, request_inbox), cursor)?;
            Ok(found)
        })
    }

    /// Highest mailbox index applied from our inbox on `relay`.
    pub fn mail_cursor(&self, relay: &[u8; 32], request_inbox: bool) -> Result<u64> {
        let r = self.db.begin_read()?;
        let t = r.open_table(MAIL_CURSORS)?;
        Ok(t.get((relay, request_inbox))?.map_or(0, |v| v.value()))
    }

    /// Every range of mailbox indices a relay skipped, oldest relay key first.
    pub fn mail_gaps(&self) -> Result<Vec<MailGap>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(MAIL_GAPS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let (relay, request_inbox, from) = k.value();
            let (to, detected_ms) = v.value();
            out.push(MailGap {
                relay: *relay,
                request_inbox,
                from,
                to,
                detected_ms,
            });
        }
        Ok(out)
    }

    // --------------------------------------------------------- DHT records

    pub fn put_dht_record(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.with_txn(true, |w| {
            w.open_table(DHT_RECORDS)?.insert(key, value)?;
            Ok(())
        })
    }

    pub fn dht_record(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(DHT_RECORDS)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_count_as_changes_and_reads_and_failed_units_do_not() {
        let s = Store::open_in_memory().unwrap();
        let start = s.changes();
        s.own_devices().unwrap();
        assert_eq!(s.changes(), start, "a read");
        s.put_own_devices(&[b"cert".to_vec()]).unwrap();
        assert_eq!(s.changes(), start + 1, "a write");
        // Two writes in one unit are one commit.
        s.unit(|| {
            s.put_own_devices(&[b"a".to_vec()])?;
            s.put_own_devices(&[b"b".to_vec()])
        })
        .unwrap();
        assert_eq!(s.changes(), start + 2, "a unit");
        let failed: Result<()> = s.unit(|| {
            s.put_own_devices(&[b"c".to_vec()])?;
            Err(StoreError::Poisoned)
        });
        assert!(failed.is_err());
        assert_eq!(s.changes(), start + 2, "an aborted unit");
        assert_eq!(s.own_devices().unwrap(), vec![b"b".to_vec()]);
    }

    /// A waker that counts how often it was woken.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wait_for_a_change_sleeps_through_reads_and_failed_units_and_ends_at_the_next_commit() {
        let s = Store::open_in_memory().unwrap();
        let wakes = std::sync::Arc::new(Wakes(Default::default()));
        let waker = Waker::from(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let seen = s.changes();
        let mut wait = std::pin::pin!(s.changed(seen));
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        // Polled again by the same task: still one waker held, not two.
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert_eq!(s.change_waiters.lock().unwrap().len(), 1);
        s.own_devices().unwrap();
        let failed: Result<()> = s.unit(|| {
            s.put_own_devices(&[b"c".to_vec()])?;
            Err(StoreError::Poisoned)
        });
        assert!(failed.is_err());
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "a read and an aborted unit wake nobody"
        );
        s.put_own_devices(&[b"cert".to_vec()]).unwrap();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "a commit wakes the waiter");
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(seen + 1));
        // A wait from a reading already behind ends at once.
        let mut behind = std::pin::pin!(s.changed(seen));
        assert_eq!(behind.as_mut().poll(&mut cx), Poll::Ready(seen + 1));
        assert!(s.change_waiters.lock().unwrap().is_empty());
    }

    #[test]
    fn data_dir_from_another_schema_version_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put_dht_record(b"k", b"v").unwrap();
            s.force_schema_version(SCHEMA_VERSION + 1).unwrap();
        }
        match Store::open(&path) {
            Err(StoreError::SchemaVersion { found, expected }) => {
                assert_eq!((found, expected), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            }
            other => panic!("expected a schema version error, got {other:?}"),
        }
        // Refusing did not rewrite the stored version.
        assert!(matches!(Store::open(&path), Err(StoreError::SchemaVersion { .. })));
    }

    #[test]
    fn the_last_record_publication_survives_a_reopen_and_the_newest_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.last_record_publication().unwrap(), None);
            s.set_last_record_publication(10, [1; 32]).unwrap();
            s.set_last_record_publication(20, [2; 32]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.last_record_publication().unwrap(), Some((20, [2; 32])));
    }

    #[test]
    fn known_peers_survive_a_reopen_within_their_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let peer = |i: u8| {
            (
                vec![i; 38],
                vec![vec![i; 10], vec![i; MAX_KNOWN_PEER_BYTES + 1], vec![i; 20]],
            )
        };
        let mut peers: Vec<KnownPeer> = (0..70).map(peer).collect();
        peers.insert(0, (vec![200; 38], vec![vec![0; MAX_KNOWN_PEER_BYTES + 1]]));
        {
            let s = Store::open(&path).unwrap();
            assert!(s.known_peers().unwrap().is_empty());
            assert_eq!(s.known_peers_current_ms().unwrap(), None);
            s.set_known_peers(&peers, 1_000).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let known = s.known_peers().unwrap();
        assert_eq!(known.len(), MAX_KNOWN_PEERS, "the first 64 with an address that fits");
        assert_eq!(
            known[0],
            (vec![0; 38], vec![vec![0; 10], vec![0; 20]]),
            "too long an address is left out"
        );
        assert_eq!(known[63].0, vec![63; 38]);
        assert_eq!(
            s.known_peers_current_ms().unwrap(),
            Some(1_000),
            "the time survives too"
        );
        s.set_known_peers(&peers[1..3], 2_000).unwrap();
        assert_eq!(s.known_peers().unwrap().len(), 2, "a save replaces the last");
        assert_eq!(s.known_peers_current_ms().unwrap(), Some(2_000));
        s.mark_known_peers_current(3_000).unwrap();
        assert_eq!(s.known_peers().unwrap().len(), 2, "marking keeps the peers");
        assert_eq!(s.known_peers_current_ms().unwrap(), Some(3_000));
    }

    #[test]
    fn record_holders_survive_a_reopen_apart_from_the_known_peers_and_can_be_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let holders: Vec<KnownPeer> = (0..3).map(|i| (vec![i; 38], vec![vec![i; 12]])).collect();
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.record_holders().unwrap(), None);
            s.set_record_holders(Some((5_000, &holders))).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.record_holders().unwrap(), Some((5_000, holders.clone())));
        assert!(
            s.known_peers().unwrap().is_empty(),
            "the routing table's row is another"
        );
        s.set_record_holders(None).unwrap();
        assert_eq!(s.record_holders().unwrap(), None, "forgotten");
    }

    #[test]
    fn skipped_mailbox_indices_are_recorded_as_gaps_and_late_arrivals_fill_them() {
        let s = Store::open_in_memory().unwrap();
        let relay = [7u8; 32];
        assert!(s.record_mail_indices(&relay, false, &[1, 2, 3], 10).unwrap().is_empty());
        let found = s.record_mail_indices(&relay, false, &[4, 8, 9], 20).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].from, found[0].to, found[0].detected_ms), (5, 7, 20));
        assert_eq!(s.mail_cursor(&relay, false).unwrap(), 9);
        // The request inbox and other relays keep cursors of their own.
        assert_eq!(s.mail_cursor(&relay, true).unwrap(), 0);
        assert_eq!(s.mail_cursor(&[8; 32], false).unwrap(), 0);
        // Index 6 arrives late: the gap splits around it.
        s.record_mail_indices(&relay, false, &[6], 30).unwrap();
        let gaps: Vec<_> = s.mail_gaps().unwrap().iter().map(|g| (g.from, g.to)).collect();
        assert_eq!(gaps, vec![(5, 5), (7, 7)]);
        // Re-deliveries of applied indices change nothing.
        s.record_mail_indices(&relay, false, &[2, 9], 40).unwrap();
        assert_eq!(s.mail_gaps().unwrap().len(), 2);
        s.record_mail_indices(&relay, false, &[5, 7], 50).unwrap();
        assert!(s.mail_gaps().unwrap().is_empty());
        assert_eq!(s.mail_cursor(&relay, false).unwrap(), 9);
    }

    #[test]
    fn two_devices_sending_with_the_same_time_and_number_keep_both_rows_in_one_order() {
        let row = |id: [u8; 16], text: &str| {
            StoredMessage::new_text(
                id,
                [2; 32],
                [3; 32],
                7,
                100,
                100,
                false,
                text.into(),
                MessageState::Received,
            )
        };
        // Arrival order differs between two devices; the history order does not.
        for order in [[0, 1], [1, 0]] {
            let s = Store::open_in_memory().unwrap();
            let rows = [row([9; 16], "from device b"), row([1; 16], "from device a")];
            for i in order {
                assert!(s.insert_message(&rows[i]).unwrap());
            }
            let texts: Vec<String> = s.list_messages(&[2; 32]).unwrap().into_iter().map(|m| m.text).collect();
            assert_eq!(texts, ["from device a", "from device b"]);
        }
    }

    #[test]
    fn waiting_messages_are_listed_in_order_until_they_leave_the_waiting_state_or_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let waiting = |i: u32, peer: u8| {
            let mut m = msg(i, peer, &format!("m{i}"));
            m.outgoing = true;
            m.state = MessageState::Waiting;
            m
        };
        {
            let s = Store::open(&path).unwrap();
            // Written out of id order; listed by sequence number.
            for m in [waiting(3, 7), waiting(1, 7), waiting(2, 8), waiting(4, 7)] {
                assert!(s.insert_message(&m).unwrap());
            }
            // Incoming and outgoing rows in other states are not waiting.
            s.insert_message(&msg(5, 7, "received")).unwrap();
            let mut pending = waiting(6, 7);
            pending.state = MessageState::Pending;
            s.insert_message(&pending).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let texts = |peer: u8| -> Vec<String> {
            s.waiting_messages(&[peer; 32])
                .unwrap()
                .into_iter()
                .map(|m| m.text)
                .collect()
        };
        assert_eq!(s.waiting_peers().unwrap(), [[7; 32], [8; 32]]);
        assert_eq!(texts(7), ["m1", "m3", "m4"]);
        s.set_message_state(&waiting(1, 7).id, MessageState::Pending).unwrap();
        assert_eq!(texts(7), ["m3", "m4"]);
        s.remove_message(&waiting(3, 7).id).unwrap();
        assert_eq!(texts(7), ["m4"]);
        s.set_message_state(&waiting(2, 8).id, MessageState::Stored).unwrap();
        assert_eq!(s.waiting_peers().unwrap(), [[7; 32]]);
        assert!(texts(8).is_empty());
    }

    #[test]
    fn duplicate_message_ids_are_stored_once() {
        let s = Store::open_in_memory().unwrap();
        let m = StoredMessage::new_text(
            [1; 16],
            [2; 32],
            [2; 32],
            1,
            5,
            6,
            false,
            "hi".into(),
            MessageState::Received,
        );
        assert!(s.insert_message(&m).unwrap());
        assert!(
            !s.insert_message(&StoredMessage {
                timestamp_ms: 9,
                ..m.clone()
            })
            .unwrap()
        );
        assert_eq!(s.list_messages(&[2; 32]).unwrap(), vec![m]);
    }

    #[test]
    fn a_unit_belongs_to_its_thread() {
        let s = std::sync::Arc::new(Store::open_in_memory().unwrap());
        let s2 = s.clone();
        let r: Result<()> = s.unit(|| {
            s.put_dht_record(b"inside", b"1")?;
            // Another thread does not join this unit: its write waits and lands on its own.
            let h = std::thread::spawn(move || s2.put_dht_record(b"other", b"2"));
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!h.is_finished(), "the other thread waits for the unit");
            Err(StoreError::Corrupt("roll back".into()))
        });
        assert!(r.is_err());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(s.dht_record(b"inside").unwrap(), None, "rolled back");
        assert_eq!(s.dht_record(b"other").unwrap(), Some(b"2".to_vec()));
    }

    fn file_holds(path: &std::path::Path, needle: &[u8]) -> bool {
        let bytes = std::fs::read(path).unwrap();
        bytes.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn secrets_under_a_passphrase_never_reach_the_file_in_the_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let id = Identity {
            account_seed: [0xA5; 32],
            device_seed: [0x5A; 32],
            mls_seed: [0x3C; 32],
            device_cert: vec![1, 2, 3],
            name: "alice".into(),
            created_ms: 1,
        };
        let mls_secret = [0xC3u8; 48];
        {
            let store = Store::open(&path).unwrap();
            store.put_identity(&id).unwrap();
            store.mls_put(b"EpochSecrets-g", &mls_secret).unwrap();
            assert!(!store.has_passphrase().unwrap());
        }
        // The scan finds secrets when they are there.
        assert!(file_holds(&path, &mls_secret));

        // Set: every secret row is rewritten sealed; redb reuses freed pages
        // only after later commits, so churn a little before scanning.
        {
            let store = Store::open(&path).unwrap();
            store.set_passphrase(None, Some("correct horse")).unwrap();
            store.set_name("alice 2").unwrap();
            store.mls_put(b"other", b"x").unwrap();
            for i in 0..20u64 {
                store.put_dht_record(&i.to_be_bytes(), &[0; 64]).unwrap();
            }
            assert_eq!(store.identity().unwrap().name, "alice 2");
        }
        assert!(!file_holds(&path, &id.account_seed));
        assert!(!file_holds(&path, &id.device_seed));
        assert!(!file_holds(&path, &mls_secret));

        // Reopened: locked until the right passphrase is given.
        let store = Store::open(&path).unwrap();
        assert!(store.is_locked().unwrap());
        assert!(store.has_identity().unwrap());
        assert!(matches!(store.identity(), Err(StoreError::Locked)));
        assert!(matches!(store.mls_get(b"EpochSecrets-g"), Err(StoreError::Locked)));
        assert!(matches!(store.mls_put(b"k", b"v"), Err(StoreError::Locked)));
        assert!(matches!(store.unlock("correct hors"), Err(StoreError::WrongPassphrase)));
        store.unlock("correct horse").unwrap();
        assert_eq!(store.identity().unwrap().account_seed, id.account_seed);
        assert_eq!(store.mls_get(b"EpochSecrets-g").unwrap().unwrap(), mls_secret);

        // Changed: the old passphrase no longer opens it, the new one does.
        assert!(matches!(
            store.set_passphrase(Some("wrong horse"), Some("battery staple")),
            Err(StoreError::WrongPassphrase)
        ));
        assert!(matches!(
            store.set_passphrase(Some("correct horse"), Some("short")),
            Err(StoreError::WeakPassphrase(_))
        ));
        store
            .set_passphrase(Some("correct horse"), Some("battery staple"))
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(matches!(
            store.unlock("correct horse"),
            Err(StoreError::WrongPassphrase)
        ));
        store.unlock("battery staple").unwrap();

        // Removed: secrets are plain again and open without a passphrase.
        store.set_passphrase(Some("battery staple"), None).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(!store.is_locked().unwrap());
        assert_eq!(store.identity().unwrap().mls_seed, id.mls_seed);
        assert_eq!(store.mls_get(b"EpochSecrets-g").unwrap().unwrap(), mls_secret);
    }

    #[test]
    fn a_sealed_row_moved_to_another_key_does_not_open() {
        let store = Store::open_in_memory().unwrap();
        store.set_passphrase(None, Some("correct horse")).unwrap();
        store.mls_put(b"a", b"secret a").unwrap();
        let sealed = store
            .with_txn(false, |w| {
                Ok(w.open_table(MLS)?.get(&b"a"[..])?.map(|v| v.value().to_vec()))
            })
            .unwrap()
            .unwrap();
        assert!(!sealed.windows(8).any(|w| w == b"secret a"));
        store
            .with_txn(true, |w| {
                w.open_table(MLS)?.insert(&b"b"[..], sealed.as_slice())?;
                Ok(())
            })
            .unwrap();
        assert!(matches!(store.mls_get(b"b"), Err(StoreError::Corrupt(_))));
    }

    fn msg(i: u32, peer: u8, text: &str) -> StoredMessage {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        id[15] = peer;
        StoredMessage::new_text(
            id,
            [peer; 32],
            [peer; 32],
            u64::from(i) + 1,
            1_000 + u64::from(i),
            1_000 + u64::from(i),
            false,
            text.into(),
            MessageState::Received,
        )
    }

    #[test]
    fn search_over_10000_messages_finds_every_word_prefix_newest_first() {
        let s = Store::open_in_memory().unwrap();
        s.unit(|| -> Result<()> {
            for i in 0..10_000u32 {
                let text = if i % 1000 == 7 {
                    format!("Meet at the Lighthouse {i}")
                } else {
                    format!("ordinary chatter number {i} about nothing")
                };
                s.insert_message(&msg(i, (i % 3) as u8 + 1, &text))?;
            }
            Ok(())
        })
        .unwrap();
        let found = s.search("lightho", 50).unwrap();
        assert_eq!(found.len(), 10);
        assert!(
            found.windows(2).all(|w| w[0].timestamp_ms >= w[1].timestamp_ms),
            "newest first"
        );
        assert!(found.iter().all(|m| m.text.contains("Lighthouse")));
        // Every word of the query must start a word of the text.
        assert_eq!(s.search("meet lighthouse", 50).unwrap().len(), 10);
        assert!(s.search("meet nothing", 50).unwrap().is_empty());
        let common = s.search("chatter", 20).unwrap();
        assert_eq!(common.len(), 20);
        assert_eq!(
            common[0].text, "ordinary chatter number 9999 about nothing",
            "the newest first"
        );
    }

    #[test]
    fn a_page_of_100_anywhere_in_a_10000_message_chat_holds_the_right_rows() {
        let s = Store::open_in_memory().unwrap();
        let rows: Vec<StoredMessage> = (0..10_000u32).map(|i| msg(i, 1, &format!("message {i}"))).collect();
        s.unit(|| -> Result<()> {
            for r in &rows {
                s.insert_message(r)?;
            }
            Ok(())
        })
        .unwrap();
        let newest = s.messages_before(&[1; 32], None, 100).unwrap().unwrap();
        let middle = s
            .messages_before(&[1; 32], Some(&rows[5_000].id), 100)
            .unwrap()
            .unwrap();
        assert_eq!(newest.last().map(|m| m.id), Some(rows[9_999].id));
        assert_eq!(middle.first().map(|m| m.id), Some(rows[4_900].id));
        assert_eq!(middle.last().map(|m| m.id), Some(rows[4_999].id));
    }

    #[test]
    fn edits_deletes_and_removals_keep_the_search_index_in_step() {
        let s = Store::open_in_memory().unwrap();
        let mut m = msg(1, 2, "old words here");
        s.insert_message(&m).unwrap();
        assert_eq!(s.search("old", 10).unwrap().len(), 1);
        m.text = "fresh text".into();
        s.update_message(&m).unwrap();
        assert!(s.search("old", 10).unwrap().is_empty());
        assert_eq!(s.search("fresh", 10).unwrap().len(), 1);
        m.deleted = true;
        m.text.clear();
        s.update_message(&m).unwrap();
        assert!(s.search("fresh", 10).unwrap().is_empty());
        let other = msg(2, 2, "gone soon");
        s.insert_message(&other).unwrap();
        assert!(s.remove_message(&other.id).unwrap().is_some());
        assert!(s.search("gone", 10).unwrap().is_empty());
        assert!(s.message(&other.id).unwrap().is_none());
        assert!(!s.has_message(&other.id).unwrap());
    }

    #[test]
    fn pages_before_a_message_come_oldest_first() {
        let s = Store::open_in_memory().unwrap();
        let rows: Vec<StoredMessage> = (0..10).map(|i| msg(i, 4, &format!("m{i}"))).collect();
        for r in &rows {
            s.insert_message(r).unwrap();
        }
        s.insert_message(&msg(50, 5, "other chat")).unwrap();
        let newest = s.messages_before(&[4; 32], None, 3).unwrap().unwrap();
        assert_eq!(
            newest.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["m7", "m8", "m9"]
        );
        let older = s.messages_before(&[4; 32], Some(&rows[7].id), 4).unwrap().unwrap();
        assert_eq!(
            older.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["m3", "m4", "m5", "m6"]
        );
        // A message of another chat is no page marker here.
        assert!(s.messages_before(&[5; 32], Some(&rows[7].id), 4).unwrap().is_none());
    }

    #[test]
    fn reading_up_to_a_message_clears_the_unread_count_of_its_chat() {
        let s = Store::open_in_memory().unwrap();
        let rows: Vec<StoredMessage> = (0..5).map(|i| msg(i, 6, "hi")).collect();
        for r in &rows {
            s.insert_message(r).unwrap();
        }
        assert_eq!(s.chat(&[6; 32]).unwrap().unread, 5);
        let read = s.mark_read(&[6; 32], &rows[2].id).unwrap().unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(s.chat(&[6; 32]).unwrap().unread, 2);
        assert!(s.mark_read(&[6; 32], &rows[2].id).unwrap().unwrap().is_empty());
        s.mark_read(&[6; 32], &rows[4].id).unwrap();
        assert_eq!(s.chat(&[6; 32]).unwrap().unread, 0);
        assert!(s.message(&rows[0].id).unwrap().unwrap().read);
    }

    #[test]
    fn a_message_that_arrives_late_with_an_older_time_is_still_counted_and_read() {
        let s = Store::open_in_memory().unwrap();
        let newer = msg(5, 9, "newer");
        s.insert_message(&newer).unwrap();
        s.mark_read(&[9; 32], &newer.id).unwrap();
        // Older by its time, arriving after the newer one was read.
        let late = msg(1, 9, "late");
        s.insert_message(&late).unwrap();
        assert_eq!(s.chat(&[9; 32]).unwrap().unread, 1);
        let read = s.mark_read(&[9; 32], &newer.id).unwrap().unwrap();
        assert_eq!(read.iter().map(|m| m.id).collect::<Vec<_>>(), vec![late.id]);
        assert_eq!(s.chat(&[9; 32]).unwrap().unread, 0);
    }

    #[test]
    fn expiring_rows_are_listed_when_due() {
        let s = Store::open_in_memory().unwrap();
        let mut m = msg(1, 7, "vanish");
        m.expires_ms = Some(5_000);
        s.insert_message(&m).unwrap();
        s.insert_message(&msg(2, 7, "stay")).unwrap();
        assert_eq!(s.next_expiry().unwrap(), Some(5_000));
        assert!(s.expired(4_999, 10).unwrap().is_empty());
        assert_eq!(s.expired(5_000, 10).unwrap(), vec![m.id]);
        s.remove_message(&m.id).unwrap();
        assert_eq!(s.next_expiry().unwrap(), None);
        assert_eq!(s.chat(&[7; 32]).unwrap().unread, 1);
    }

    #[test]
    fn a_version_1_database_is_migrated_with_its_history_searchable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let s = Store::open(&path).unwrap();
            s.insert_message(&msg(1, 8, "kept from before")).unwrap();
            s.wipe_search_index_for_tests().unwrap();
            s.force_schema_version(1).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.search("before", 10).unwrap().len(), 1);
        assert_eq!(s.chat(&[8; 32]).unwrap().unread, 0, "old rows count as read");
        drop(s);
        // Reopening does not migrate again.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.search("kept", 10).unwrap().len(), 1);
    }
}
