//! Relay mailboxes on redb: the durable side of a community relay's
//! store-and-forward service.
//!
//! A relay keeps its mailboxes in a database file of its own (`mailboxes.redb`),
//! separate from its node database, with a schema version of its own. The tables
//! are declared in [`crate::schema`] (the "Relay mailboxes" section).
//!
//! # Inboxes and envelopes
//!
//! An inbox is addressed by its 32-byte id and whether it is the owner's request
//! inbox. Every envelope deposited in an inbox gets the next index of that inbox:
//! indices start at 1 and only grow, and are never reused, even after the
//! envelopes before them were acked or expired (the inbox's counter row is kept
//! for that). An owner therefore fetches with a cursor (the last index it has)
//! and acks up to an index.
//!
//! Each deposit is checked against [`MailboxLimits`]: the envelope size, the
//! inbox's count and bytes, and the depositing sender's count and bytes within
//! that inbox. Counters live in tables, so the checks cost a couple of lookups.
//! An inbox never holds more than its quota.
//!
//! Envelopes are kept until acked or until `retention_ms` after their deposit.
//! [`Mailboxes::fetch`] never serves an expired envelope; [`Mailboxes::sweep`]
//! deletes them (a range scan of the expiry index).
//!
//! # Durability
//!
//! Every write commits with [`Durability::Immediate`] before the method returns,
//! so a relay may acknowledge a deposit (or hand out a key package) as soon as
//! the call returns `Ok`. Writes that store bytes supplied by others (deposits,
//! key-package uploads) also use redb's two-phase commit.
//!
//! Stored data is never trusted to be well formed: inconsistent counters or
//! missing rows give [`StoreError::Corrupt`], not a panic.

use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, WriteTransaction};

use crate::schema::*;
use crate::{Result, StoreError};

/// Most envelopes one [`Mailboxes::sweep`] call removes.
pub const SWEEP_MAX_ENVELOPES: usize = 10_000;
/// Most expired nonces one [`Mailboxes::sweep`] call forgets.
pub const SWEEP_MAX_NONCES: usize = 10_000;
/// Most expired nonces one [`Mailboxes::check_nonce`] call forgets on the side.
const CHECK_NONCE_PURGE: usize = 16;
/// Most expired envelopes a deposit into a full inbox deletes to make room.
const DEPOSIT_RECLAIM_MAX: usize = 1_000;
/// Default size of the mailbox database's page cache (see [`MailboxLimits::cache_bytes`]).
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

const KEY_SCHEMA_VERSION: &str = "mailbox_schema_version";
const KEY_INBOXES: &str = "inboxes";
const KEY_ENVELOPES: &str = "envelopes";
const KEY_BYTES: &str = "bytes";

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("mailbox: {what}"))
}

/// Limits a relay enforces on its mailboxes. Missing fields in a serialized form
/// take their defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailboxLimits {
    /// Largest envelope accepted, in bytes (default 256 KiB).
    pub max_envelope_bytes: usize,
    /// Most envelopes one inbox holds (default 10,000).
    pub inbox_max_envelopes: u64,
    /// Most bytes of envelopes one inbox holds (default 64 MiB).
    pub inbox_max_bytes: u64,
    /// Most envelopes one sender has waiting in one inbox (default 1,000).
    pub sender_max_envelopes: u64,
    /// Most bytes one sender has waiting in one inbox (default 16 MiB).
    pub sender_max_bytes: u64,
    /// How long an unacked envelope is kept after its deposit (default 14 days).
    pub retention_ms: u64,
    /// Most one-time key packages kept per owner; older ones are dropped (default 100).
    pub max_key_packages: usize,
    /// How long an owner-auth nonce is remembered (default 120 s).
    pub nonce_window_ms: u64,
    /// Memory for the database's page cache, in bytes (default 64 MiB). The
    /// cache keeps recently read and written pages, so a busy relay's
    /// mailboxes grow to about this much memory (redb's own default is 1 GiB).
    pub cache_bytes: u64,
}

impl Default for MailboxLimits {
    fn default() -> Self {
        Self {
            max_envelope_bytes: 256 * 1024,
            inbox_max_envelopes: 10_000,
            inbox_max_bytes: 64 * 1024 * 1024,
            sender_max_envelopes: 1_000,
            sender_max_bytes: 16 * 1024 * 1024,
            retention_ms: 14 * 24 * 60 * 60 * 1000,
            max_key_packages: 100,
            nonce_window_ms: 120_000,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// One envelope to deposit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepositRequest {
    /// The inbox id.
    pub inbox: [u8; 32],
    /// Whether this is the owner's request inbox.
    pub request_inbox: bool,
    /// The depositor's peer key (the sender quota is per this key, per inbox).
    pub sender: [u8; 32],
    /// The envelope, opaque to the relay.
    pub envelope: Vec<u8>,
}

/// Where an accepted envelope was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deposited {
    /// Its index in the inbox.
    pub index: u64,
    /// When the relay accepted it (the `now_ms` of the deposit).
    pub accepted_ms: u64,
    /// Until when it is kept unless acked.
    pub keep_until_ms: u64,
}

/// Why a deposit was refused. The `Display` form is the wire error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DepositRefusal {
    /// The envelope is larger than `max_envelope_bytes`.
    #[error("too_large")]
    TooLarge,
    /// The inbox or the sender's share of it is full.
    #[error("quota_exceeded")]
    QuotaExceeded,
}

/// An envelope as served to the inbox owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    pub index: u64,
    pub envelope: Vec<u8>,
    pub deposited_ms: u64,
}

/// Totals over every inbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailboxStats {
    /// Inboxes holding at least one envelope.
    pub inboxes: u64,
    /// Envelopes held (expired ones included until swept).
    pub envelopes: u64,
    /// Bytes of envelopes held.
    pub bytes: u64,
}

/// A relay's mailbox database.
pub struct Mailboxes {
    db: Database,
    limits: MailboxLimits,
}

impl std::fmt::Debug for Mailboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailboxes")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Mailboxes {
    /// Opens (or creates) the mailbox database file at `path`, with a page
    /// cache of `limits.cache_bytes`.
    pub fn open(path: &Path, limits: MailboxLimits) -> Result<Self> {
        let db = Self::builder(&limits).create(path)?;
        Self::init(db, limits)
    }

    /// Opens a mailbox database that lives only in memory (tests, the simulator).
    pub fn open_in_memory(limits: MailboxLimits) -> Result<Self> {
        let db = Self::builder(&limits)
            .set_cache_size(crate::IN_MEMORY_CACHE_BYTES.min(usize::try_from(limits.cache_bytes).unwrap_or(usize::MAX)))
            .create_with_backend(crate::memory::PagedMemory::new())?;
        Self::init(db, limits)
    }

    fn builder(limits: &MailboxLimits) -> redb::Builder {
        let mut b = Database::builder();
        b.set_cache_size(usize::try_from(limits.cache_bytes).unwrap_or(usize::MAX));
        b
    }

    /// The limits this database enforces.
    pub fn limits(&self) -> &MailboxLimits {
        &self.limits
    }

    fn init(db: Database, limits: MailboxLimits) -> Result<Self> {
        let mb = Self { db, limits };
        mb.check_schema()?;
        Ok(mb)
    }

    fn check_schema(&self) -> Result<()> {
        let w = self.begin_write(false)?;
        let found = {
            let mut meta = w.open_table(MAILBOX_META)?;
            let found = meta.get(KEY_SCHEMA_VERSION)?.map(|v| {
                v.value()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| corrupt(KEY_SCHEMA_VERSION))
            });
            match found {
                Some(v) => Some(v?),
                None => {
                    meta.insert(KEY_SCHEMA_VERSION, MAILBOX_SCHEMA_VERSION.to_be_bytes().as_slice())?;
                    None
                }
            }
        };
        if let Some(found) = found
            && found != MAILBOX_SCHEMA_VERSION
        {
            w.abort()?;
            return Err(StoreError::SchemaVersion {
                found,
                expected: MAILBOX_SCHEMA_VERSION,
            });
        }
        // Create every table so that read transactions never miss one.
        w.open_table(MAILBOX_INBOXES)?;
        w.open_table(MAILBOX_SENDERS)?;
        w.open_table(MAILBOX_ENVELOPES)?;
        w.open_table(MAILBOX_ENVELOPE_META)?;
        w.open_table(MAILBOX_EXPIRY)?;
        w.open_table(MAILBOX_NONCES)?;
        w.open_table(MAILBOX_NONCE_EXPIRY)?;
        w.open_table(MAILBOX_KP_POOLS)?;
        w.open_table(MAILBOX_KEY_PACKAGES)?;
        w.open_table(MAILBOX_KP_LAST_RESORT)?;
        w.commit()?;
        Ok(())
    }

    /// A durable write transaction; `two_phase` for writes of bytes from others.
    fn begin_write(&self, two_phase: bool) -> Result<WriteTransaction> {
        let mut w = self.db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        w.set_two_phase_commit(two_phase);
        Ok(w)
    }

    // ------------------------------------------------------------ deposits

    /// Deposits one envelope. See [`Mailboxes::deposit_batch`].
    pub fn deposit(&self, req: &DepositRequest, now_ms: u64) -> Result<Result<Deposited, DepositRefusal>> {
        let mut out = self.deposit_batch(std::slice::from_ref(req), now_ms)?;
        out.pop().ok_or_else(|| corrupt("empty batch result"))
    }

    /// Deposits envelopes in one durable write transaction (two-phase commit,
    /// immediate durability); the relay may acknowledge them once this returns
    /// `Ok`. Returns one outcome per request, in order.
    ///
    /// Requests are checked in order, each against the state left by the ones
    /// before it (earlier deposits of the same batch count against the quotas):
    /// an envelope over `max_envelope_bytes` is [`DepositRefusal::TooLarge`]; one
    /// that would take the inbox or the sender's share of it over its count or
    /// byte limit is [`DepositRefusal::QuotaExceeded`]. Before refusing for quota,
    /// expired envelopes at the head of the inbox are deleted to make room.
    ///
    /// On `Err` nothing of the batch was stored.
    pub fn deposit_batch(
        &self,
        reqs: &[DepositRequest],
        now_ms: u64,
    ) -> Result<Vec<Result<Deposited, DepositRefusal>>> {
        let w = self.begin_write(true)?;
        let out = {
            let mut t = EnvelopeTables::open(&w)?;
            let mut out = Vec::with_capacity(reqs.len());
            for req in reqs {
                out.push(t.deposit(req, now_ms, &self.limits)?);
            }
            t.close(&w)?;
            out
        };
        w.commit()?;
        Ok(out)
    }

    // ---------------------------------------------------------- the owner

    /// Up to `limit` envelopes of an inbox with index greater than `after_index`,
    /// oldest first, and whether more follow. Envelopes whose keep-until time is
    /// at or before `now_ms` are skipped, swept or not. Reads committed state only.
    ///
    /// The answer holds at most `limit × max_envelope_bytes` bytes; the caller
    /// picks `limit` accordingly.
    pub fn fetch(
        &self,
        inbox: &[u8; 32],
        request_inbox: bool,
        after_index: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<(Vec<StoredEnvelope>, bool)> {
        let Some(start) = after_index.checked_add(1) else {
            return Ok((Vec::new(), false));
        };
        let r = self.db.begin_read()?;
        let meta = r.open_table(MAILBOX_ENVELOPE_META)?;
        let envelopes = r.open_table(MAILBOX_ENVELOPES)?;
        let mut out = Vec::new();
        let mut more = false;
        for e in meta.range((inbox, request_inbox, start)..=(inbox, request_inbox, u64::MAX))? {
            let (k, v) = e?;
            let index = k.value().2;
            let (_, deposited_ms, keep_until_ms, _) = v.value();
            if keep_until_ms <= now_ms {
                continue;
            }
            if out.len() >= limit {
                more = true;
                break;
            }
            let envelope = envelopes
                .get((inbox, request_inbox, index))?
                .ok_or_else(|| corrupt("envelope bytes missing"))?
                .value()
                .to_vec();
            out.push(StoredEnvelope {
                index,
                envelope,
                deposited_ms,
            });
        }
        Ok((out, more))
    }

    /// Deletes every envelope of an inbox with index at most `up_to_index` and
    /// returns how many were deleted. Commits durably. Acking an index twice, or
    /// beyond the last deposit, is harmless.
    pub fn ack(&self, inbox: &[u8; 32], request_inbox: bool, up_to_index: u64) -> Result<u64> {
        let w = self.begin_write(false)?;
        let removed = {
            let mut t = EnvelopeTables::open(&w)?;
            let mut indices = Vec::new();
            for e in t
                .meta
                .range((inbox, request_inbox, 0)..=(inbox, request_inbox, up_to_index))?
            {
                indices.push(e?.0.value().2);
            }
            let mut removed = 0;
            for index in indices {
                if t.remove(inbox, request_inbox, index)? {
                    removed += 1;
                }
            }
            t.close(&w)?;
            removed
        };
        if removed == 0 {
            w.abort()?;
        } else {
            w.commit()?;
        }
        Ok(removed)
    }

    // ------------------------------------------------------------- upkeep

    /// Deletes envelopes whose keep-until time is at or before `now_ms` and
    /// returns how many. Bounded work: at most [`SWEEP_MAX_ENVELOPES`] envelopes
    /// per call (the oldest deadlines first); call again while it returns that
    /// many. Also forgets up to [`SWEEP_MAX_NONCES`] expired nonces (not counted).
    pub fn sweep(&self, now_ms: u64) -> Result<u64> {
        let w = self.begin_write(false)?;
        let (removed, purged) = {
            let mut t = EnvelopeTables::open(&w)?;
            let mut due = Vec::new();
            for e in t
                .expiry
                .range((0, &[0u8; 32], false, 0)..=(now_ms, &[0xffu8; 32], true, u64::MAX))?
                .take(SWEEP_MAX_ENVELOPES)
            {
                let (k, _) = e?;
                let (keep_until, inbox, request_inbox, index) = k.value();
                due.push((keep_until, *inbox, request_inbox, index));
            }
            let mut removed = 0;
            for (keep_until, inbox, request_inbox, index) in due {
                if t.remove(&inbox, request_inbox, index)? {
                    removed += 1;
                } else {
                    // An index entry without its envelope: drop it so it stops coming back.
                    t.expiry.remove((keep_until, &inbox, request_inbox, index))?;
                }
            }
            t.close(&w)?;
            let mut nonces = w.open_table(MAILBOX_NONCES)?;
            let mut expiry = w.open_table(MAILBOX_NONCE_EXPIRY)?;
            let purged = purge_nonces(&mut nonces, &mut expiry, now_ms, SWEEP_MAX_NONCES)?;
            (removed, purged)
        };
        if removed == 0 && purged == 0 {
            w.abort()?;
        } else {
            w.commit()?;
        }
        Ok(removed)
    }

    /// Records an owner-auth nonce as seen until `now_ms + nonce_window_ms`.
    /// Returns `true` if it is fresh, `false` if it was seen before and has not
    /// expired (a replay). Commits durably before returning `true`. Also forgets
    /// a few expired nonces on the side.
    pub fn check_nonce(&self, nonce: &[u8; 16], now_ms: u64) -> Result<bool> {
        let w = self.begin_write(false)?;
        let (fresh, purged) = {
            let mut nonces = w.open_table(MAILBOX_NONCES)?;
            let mut expiry = w.open_table(MAILBOX_NONCE_EXPIRY)?;
            let purged = purge_nonces(&mut nonces, &mut expiry, now_ms, CHECK_NONCE_PURGE)?;
            let seen = nonces.get(nonce)?.map(|v| v.value());
            match seen {
                Some(until) if until > now_ms => (false, purged),
                _ => {
                    if let Some(until) = seen {
                        expiry.remove((until, nonce))?;
                    }
                    let until = now_ms.saturating_add(self.limits.nonce_window_ms);
                    nonces.insert(nonce, until)?;
                    expiry.insert((until, nonce), ())?;
                    (true, purged)
                }
            }
        };
        if fresh || purged > 0 {
            w.commit()?;
        } else {
            w.abort()?;
        }
        Ok(fresh)
    }

    // -------------------------------------------------------- key packages

    /// Adds one-time key packages to `owner`'s pool (after the ones it holds) and,
    /// if given, replaces its last-resort package (`None` keeps the current one).
    /// The pool keeps at most `max_key_packages`: the oldest beyond that are
    /// dropped. Returns the pool size. Commits durably (two-phase). Package sizes
    /// are the caller's to bound.
    pub fn publish_key_packages(&self, owner: &[u8; 32], kps: &[Vec<u8>], last_resort: Option<&[u8]>) -> Result<usize> {
        if kps.is_empty() && last_resort.is_none() {
            // Nothing to add: the owner is asking how many it holds.
            return self.key_packages_held(owner);
        }
        let max = self.limits.max_key_packages;
        let w = self.begin_write(true)?;
        let size = {
            let mut pools = w.open_table(MAILBOX_KP_POOLS)?;
            let mut packages = w.open_table(MAILBOX_KEY_PACKAGES)?;
            let (mut next, mut count) = pools.get(owner)?.map(|v| v.value()).unwrap_or((0, 0));
            // Only the newest `max` of this upload could survive the trim.
            for kp in &kps[kps.len().saturating_sub(max)..] {
                packages.insert((owner, next), kp.as_slice())?;
                next = next.checked_add(1).ok_or_else(|| corrupt("key-package sequence"))?;
                count = count.checked_add(1).ok_or_else(|| corrupt("key-package count"))?;
            }
            while count > max as u64 {
                let Some(seq) = oldest_key_package(&packages, owner)? else {
                    return Err(corrupt("key-package count above pool"));
                };
                packages.remove((owner, seq))?;
                count -= 1;
            }
            if count == 0 {
                pools.remove(owner)?;
            } else {
                pools.insert(owner, (next, count))?;
            }
            if let Some(lr) = last_resort {
                w.open_table(MAILBOX_KP_LAST_RESORT)?.insert(owner, lr)?;
            }
            usize::try_from(count).map_err(|_| corrupt("key-package count"))?
        };
        w.commit()?;
        Ok(size)
    }

    /// How many one-time key packages `owner`'s pool holds.
    pub fn key_packages_held(&self, owner: &[u8; 32]) -> Result<usize> {
        let r = self.db.begin_read()?;
        let count = r.open_table(MAILBOX_KP_POOLS)?.get(owner)?.map_or(0, |v| v.value().1);
        usize::try_from(count).map_err(|_| corrupt("key-package count"))
    }

    /// Takes `owner`'s oldest one-time key package out of the pool. When the pool
    /// is empty, returns the last-resort package and keeps it; `None` if there is
    /// neither. A one-time package is removed durably before it is returned, so
    /// it is never handed out twice.
    pub fn claim_key_package(&self, owner: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        let w = self.begin_write(false)?;
        let claimed = {
            let mut pools = w.open_table(MAILBOX_KP_POOLS)?;
            let mut packages = w.open_table(MAILBOX_KEY_PACKAGES)?;
            match oldest_key_package(&packages, owner)? {
                Some(seq) => {
                    let kp = packages
                        .remove((owner, seq))?
                        .map(|v| v.value().to_vec())
                        .ok_or_else(|| corrupt("key package vanished"))?;
                    let (next, count) = pools
                        .get(owner)?
                        .map(|v| v.value())
                        .ok_or_else(|| corrupt("key-package pool row missing"))?;
                    let count = count.checked_sub(1).ok_or_else(|| corrupt("key-package count"))?;
                    if count == 0 {
                        pools.remove(owner)?;
                    } else {
                        pools.insert(owner, (next, count))?;
                    }
                    Some(kp)
                }
                None => None,
            }
        };
        if claimed.is_some() {
            w.commit()?;
            return Ok(claimed);
        }
        let last_resort = w
            .open_table(MAILBOX_KP_LAST_RESORT)?
            .get(owner)?
            .map(|v| v.value().to_vec());
        w.abort()?;
        Ok(last_resort)
    }

    // -------------------------------------------------------------- stats

    /// Totals over every inbox (three counter reads).
    pub fn stats(&self) -> Result<MailboxStats> {
        let r = self.db.begin_read()?;
        let meta = r.open_table(MAILBOX_META)?;
        Ok(MailboxStats {
            inboxes: read_counter(&meta, KEY_INBOXES)?,
            envelopes: read_counter(&meta, KEY_ENVELOPES)?,
            bytes: read_counter(&meta, KEY_BYTES)?,
        })
    }
}

fn read_counter(meta: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<u64> {
    match meta.get(key)? {
        Some(v) => v.value().try_into().map(u64::from_be_bytes).map_err(|_| corrupt(key)),
        None => Ok(0),
    }
}

/// The sequence number of `owner`'s oldest one-time key package.
fn oldest_key_package(
    packages: &impl ReadableTable<(&'static [u8; 32], u64), &'static [u8]>,
    owner: &[u8; 32],
) -> Result<Option<u64>> {
    let mut range = packages.range((owner, 0)..=(owner, u64::MAX))?;
    match range.next() {
        Some(e) => Ok(Some(e?.0.value().1)),
        None => Ok(None),
    }
}

/// Forgets up to `max` nonces whose expiry is at or before `now_ms`; returns how many.
fn purge_nonces(
    nonces: &mut Table<'_, &'static [u8; 16], u64>,
    expiry: &mut Table<'_, (u64, &'static [u8; 16]), ()>,
    now_ms: u64,
    max: usize,
) -> Result<usize> {
    let mut due = Vec::new();
    for e in expiry.range((0, &[0u8; 16])..=(now_ms, &[0xffu8; 16]))?.take(max) {
        let (k, _) = e?;
        let (until, nonce) = k.value();
        due.push((until, *nonce));
    }
    for (until, nonce) in &due {
        expiry.remove((*until, nonce))?;
        // The nonce may have been seen again since (a newer expiry): keep that.
        let current = nonces.get(nonce)?.map(|v| v.value());
        if current == Some(*until) {
            nonces.remove(nonce)?;
        }
    }
    Ok(due.len())
}

/// Global totals, loaded at the start of a write and stored at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Totals {
    inboxes: u64,
    envelopes: u64,
    bytes: u64,
}

/// The envelope tables of one write transaction, and the totals they imply.
struct EnvelopeTables<'t> {
    inboxes: Table<'t, InboxKey<'static>, (u64, u64, u64)>,
    senders: Table<'t, SenderKey<'static>, (u64, u64)>,
    envelopes: Table<'t, EnvelopeKey<'static>, &'static [u8]>,
    meta: Table<'t, EnvelopeKey<'static>, EnvelopeMeta>,
    expiry: Table<'t, ExpiryKey<'static>, ()>,
    totals: Totals,
    loaded: Totals,
}

impl<'t> EnvelopeTables<'t> {
    fn open(w: &'t WriteTransaction) -> Result<Self> {
        let totals = {
            let meta = w.open_table(MAILBOX_META)?;
            Totals {
                inboxes: read_counter(&meta, KEY_INBOXES)?,
                envelopes: read_counter(&meta, KEY_ENVELOPES)?,
                bytes: read_counter(&meta, KEY_BYTES)?,
            }
        };
        Ok(Self {
            inboxes: w.open_table(MAILBOX_INBOXES)?,
            senders: w.open_table(MAILBOX_SENDERS)?,
            envelopes: w.open_table(MAILBOX_ENVELOPES)?,
            meta: w.open_table(MAILBOX_ENVELOPE_META)?,
            expiry: w.open_table(MAILBOX_EXPIRY)?,
            totals,
            loaded: totals,
        })
    }

    /// Closes the tables and stores the totals if they changed.
    fn close(self, w: &WriteTransaction) -> Result<()> {
        let Self { totals, loaded, .. } = self;
        if totals != loaded {
            let mut meta = w.open_table(MAILBOX_META)?;
            meta.insert(KEY_INBOXES, totals.inboxes.to_be_bytes().as_slice())?;
            meta.insert(KEY_ENVELOPES, totals.envelopes.to_be_bytes().as_slice())?;
            meta.insert(KEY_BYTES, totals.bytes.to_be_bytes().as_slice())?;
        }
        Ok(())
    }

    /// (next index, count, bytes) of an inbox; a new inbox starts at index 1.
    fn inbox(&self, inbox: &[u8; 32], request_inbox: bool) -> Result<(u64, u64, u64)> {
        Ok(self
            .inboxes
            .get((inbox, request_inbox))?
            .map(|v| v.value())
            .unwrap_or((1, 0, 0)))
    }

    /// (count, bytes) a sender holds in an inbox.
    fn sender(&self, inbox: &[u8; 32], request_inbox: bool, sender: &[u8; 32]) -> Result<(u64, u64)> {
        Ok(self
            .senders
            .get((inbox, request_inbox, sender))?
            .map(|v| v.value())
            .unwrap_or((0, 0)))
    }

    /// Whether one more envelope of `len` bytes from `req.sender` fits.
    fn fits(&self, req: &DepositRequest, len: u64, limits: &MailboxLimits) -> Result<bool> {
        let (_, count, bytes) = self.inbox(&req.inbox, req.request_inbox)?;
        let (s_count, s_bytes) = self.sender(&req.inbox, req.request_inbox, &req.sender)?;
        Ok(count < limits.inbox_max_envelopes
            && bytes.saturating_add(len) <= limits.inbox_max_bytes
            && s_count < limits.sender_max_envelopes
            && s_bytes.saturating_add(len) <= limits.sender_max_bytes)
    }

    fn deposit(
        &mut self,
        req: &DepositRequest,
        now_ms: u64,
        limits: &MailboxLimits,
    ) -> Result<Result<Deposited, DepositRefusal>> {
        if req.envelope.len() > limits.max_envelope_bytes {
            return Ok(Err(DepositRefusal::TooLarge));
        }
        let len = req.envelope.len() as u64;
        let (inbox, request_inbox) = (&req.inbox, req.request_inbox);
        if !self.fits(req, len, limits)? {
            self.reclaim_expired(inbox, request_inbox, now_ms)?;
            if !self.fits(req, len, limits)? {
                return Ok(Err(DepositRefusal::QuotaExceeded));
            }
        }
        let (index, count, bytes) = self.inbox(inbox, request_inbox)?;
        let (s_count, s_bytes) = self.sender(inbox, request_inbox, &req.sender)?;
        let overflow = || corrupt("counter overflow");
        let next = index.checked_add(1).ok_or_else(overflow)?;
        let keep_until_ms = now_ms.saturating_add(limits.retention_ms);

        self.envelopes
            .insert((inbox, request_inbox, index), req.envelope.as_slice())?;
        self.meta
            .insert((inbox, request_inbox, index), (req.sender, now_ms, keep_until_ms, len))?;
        self.expiry.insert((keep_until_ms, inbox, request_inbox, index), ())?;
        self.senders.insert(
            (inbox, request_inbox, &req.sender),
            (s_count + 1, s_bytes.checked_add(len).ok_or_else(overflow)?),
        )?;
        self.inboxes.insert(
            (inbox, request_inbox),
            (next, count + 1, bytes.checked_add(len).ok_or_else(overflow)?),
        )?;
        if count == 0 {
            self.totals.inboxes = self.totals.inboxes.checked_add(1).ok_or_else(overflow)?;
        }
        self.totals.envelopes = self.totals.envelopes.checked_add(1).ok_or_else(overflow)?;
        self.totals.bytes = self.totals.bytes.checked_add(len).ok_or_else(overflow)?;
        Ok(Ok(Deposited {
            index,
            accepted_ms: now_ms,
            keep_until_ms,
        }))
    }

    /// Deletes the expired envelopes at the head of an inbox (bounded).
    fn reclaim_expired(&mut self, inbox: &[u8; 32], request_inbox: bool, now_ms: u64) -> Result<()> {
        let mut due = Vec::new();
        for e in self
            .meta
            .range((inbox, request_inbox, 0)..=(inbox, request_inbox, u64::MAX))?
            .take(DEPOSIT_RECLAIM_MAX)
        {
            let (k, v) = e?;
            if v.value().2 > now_ms {
                break;
            }
            due.push(k.value().2);
        }
        for index in due {
            self.remove(inbox, request_inbox, index)?;
        }
        Ok(())
    }

    /// Deletes one envelope and updates every counter and index. Returns whether
    /// it existed.
    fn remove(&mut self, inbox: &[u8; 32], request_inbox: bool, index: u64) -> Result<bool> {
        let Some((sender, _, keep_until_ms, len)) = self.meta.remove((inbox, request_inbox, index))?.map(|v| v.value())
        else {
            return Ok(false);
        };
        self.envelopes.remove((inbox, request_inbox, index))?;
        self.expiry.remove((keep_until_ms, inbox, request_inbox, index))?;

        let underflow = |what: &str| corrupt(&format!("{what} counter below its envelopes"));
        let (s_count, s_bytes) = self
            .senders
            .get((inbox, request_inbox, &sender))?
            .map(|v| v.value())
            .ok_or_else(|| corrupt("sender counters missing"))?;
        let s_count = s_count.checked_sub(1).ok_or_else(|| underflow("sender"))?;
        let s_bytes = s_bytes.checked_sub(len).ok_or_else(|| underflow("sender bytes"))?;
        if s_count == 0 {
            self.senders.remove((inbox, request_inbox, &sender))?;
        } else {
            self.senders
                .insert((inbox, request_inbox, &sender), (s_count, s_bytes))?;
        }

        let (next, count, bytes) = self
            .inboxes
            .get((inbox, request_inbox))?
            .map(|v| v.value())
            .ok_or_else(|| corrupt("inbox counters missing"))?;
        let count = count.checked_sub(1).ok_or_else(|| underflow("inbox"))?;
        let bytes = bytes.checked_sub(len).ok_or_else(|| underflow("inbox bytes"))?;
        // The row stays when empty: it holds the next index, which is never reused.
        self.inboxes.insert((inbox, request_inbox), (next, count, bytes))?;

        let t = &mut self.totals;
        if count == 0 {
            t.inboxes = t.inboxes.checked_sub(1).ok_or_else(|| underflow("total inboxes"))?;
        }
        t.envelopes = t.envelopes.checked_sub(1).ok_or_else(|| underflow("total envelopes"))?;
        t.bytes = t.bytes.checked_sub(len).ok_or_else(|| underflow("total bytes"))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INBOX: [u8; 32] = [7; 32];
    const ALICE: [u8; 32] = [1; 32];
    const BOB: [u8; 32] = [2; 32];

    fn mem(limits: MailboxLimits) -> Mailboxes {
        Mailboxes::open_in_memory(limits).unwrap()
    }

    fn req(inbox: [u8; 32], sender: [u8; 32], envelope: &[u8]) -> DepositRequest {
        DepositRequest {
            inbox,
            request_inbox: false,
            sender,
            envelope: envelope.to_vec(),
        }
    }

    fn put(mb: &Mailboxes, sender: [u8; 32], envelope: &[u8], now_ms: u64) -> Result<Deposited, DepositRefusal> {
        mb.deposit(&req(INBOX, sender, envelope), now_ms).unwrap()
    }

    fn indices(envs: &[StoredEnvelope]) -> Vec<u64> {
        envs.iter().map(|e| e.index).collect()
    }

    #[test]
    fn deposits_get_increasing_indices_and_fetch_pages_from_a_cursor() {
        let mb = mem(MailboxLimits::default());
        for i in 1..=5u8 {
            let d = put(&mb, ALICE, &[i; 3], 100 + u64::from(i)).unwrap();
            assert_eq!(d.index, u64::from(i));
            assert_eq!(d.accepted_ms, 100 + u64::from(i));
            assert_eq!(d.keep_until_ms, d.accepted_ms + MailboxLimits::default().retention_ms);
        }
        let (page, more) = mb.fetch(&INBOX, false, 0, 2, 200).unwrap();
        assert_eq!(indices(&page), vec![1, 2]);
        assert_eq!(page[0].envelope, vec![1; 3]);
        assert_eq!(page[1].deposited_ms, 102);
        assert!(more);
        let (page, more) = mb.fetch(&INBOX, false, 2, 2, 200).unwrap();
        assert_eq!(indices(&page), vec![3, 4]);
        assert!(more);
        let (page, more) = mb.fetch(&INBOX, false, 4, 2, 200).unwrap();
        assert_eq!(indices(&page), vec![5]);
        assert!(!more);
        // The request inbox with the same id is a different inbox.
        assert_eq!(mb.fetch(&INBOX, true, 0, 10, 200).unwrap(), (vec![], false));
        assert_eq!(mb.fetch(&INBOX, false, u64::MAX, 10, 200).unwrap(), (vec![], false));
        assert_eq!(
            mb.stats().unwrap(),
            MailboxStats {
                inboxes: 1,
                envelopes: 5,
                bytes: 15
            }
        );
    }

    #[test]
    fn sender_over_quota_is_refused_while_others_get_through_and_inbox_quota_holds() {
        let limits = MailboxLimits {
            inbox_max_envelopes: 10,
            sender_max_envelopes: 4,
            ..MailboxLimits::default()
        };
        let quota = limits.inbox_max_envelopes;
        let mb = mem(limits);
        for _ in 0..4 {
            put(&mb, ALICE, b"a", 1).unwrap();
        }
        assert_eq!(put(&mb, ALICE, b"a", 1), Err(DepositRefusal::QuotaExceeded));
        assert!(put(&mb, BOB, b"b", 1).is_ok());

        // Many senders try to deposit quota + 5 envelopes in all: the inbox stops at its quota.
        let mut accepted = 0;
        for i in 0..(quota + 5) {
            let sender = [100 + i as u8; 32];
            if put(&mb, sender, b"x", 1).is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(accepted, quota - 5);
        let (all, more) = mb.fetch(&INBOX, false, 0, 1000, 1).unwrap();
        assert_eq!(all.len() as u64, quota);
        assert!(!more);
        assert_eq!(mb.stats().unwrap().envelopes, quota);
    }

    #[test]
    fn byte_quotas_are_enforced_per_sender_and_per_inbox() {
        let mb = mem(MailboxLimits {
            inbox_max_bytes: 100,
            sender_max_bytes: 60,
            ..MailboxLimits::default()
        });
        assert!(put(&mb, ALICE, &[0; 50], 1).is_ok());
        assert_eq!(put(&mb, ALICE, &[0; 11], 1), Err(DepositRefusal::QuotaExceeded));
        assert!(put(&mb, ALICE, &[0; 10], 1).is_ok());
        assert_eq!(put(&mb, BOB, &[0; 41], 1), Err(DepositRefusal::QuotaExceeded));
        assert!(put(&mb, BOB, &[0; 40], 1).is_ok());
        assert_eq!(mb.stats().unwrap().bytes, 100);
    }

    #[test]
    fn too_large_envelopes_are_refused() {
        let mb = mem(MailboxLimits {
            max_envelope_bytes: 16,
            ..MailboxLimits::default()
        });
        assert!(put(&mb, ALICE, &[0; 16], 1).is_ok());
        assert_eq!(put(&mb, ALICE, &[0; 17], 1), Err(DepositRefusal::TooLarge));
        assert_eq!(DepositRefusal::TooLarge.to_string(), "too_large");
        assert_eq!(DepositRefusal::QuotaExceeded.to_string(), "quota_exceeded");
        assert_eq!(mb.stats().unwrap().envelopes, 1);
    }

    #[test]
    fn ack_deletes_up_to_an_index_and_frees_quota() {
        let mb = mem(MailboxLimits {
            inbox_max_envelopes: 3,
            ..MailboxLimits::default()
        });
        for _ in 0..3 {
            put(&mb, ALICE, b"abc", 1).unwrap();
        }
        assert_eq!(put(&mb, BOB, b"b", 1), Err(DepositRefusal::QuotaExceeded));
        assert_eq!(mb.ack(&INBOX, false, 2).unwrap(), 2);
        assert_eq!(mb.ack(&INBOX, false, 2).unwrap(), 0, "acking again is harmless");
        let (left, _) = mb.fetch(&INBOX, false, 0, 10, 1).unwrap();
        assert_eq!(indices(&left), vec![3]);
        assert_eq!(
            mb.stats().unwrap(),
            MailboxStats {
                inboxes: 1,
                envelopes: 1,
                bytes: 3
            }
        );
        assert!(put(&mb, BOB, b"b", 1).is_ok());
        assert!(put(&mb, BOB, b"b", 1).is_ok());
        assert_eq!(put(&mb, BOB, b"b", 1), Err(DepositRefusal::QuotaExceeded));
        assert_eq!(mb.ack(&INBOX, false, u64::MAX).unwrap(), 3);
        assert_eq!(mb.stats().unwrap(), MailboxStats::default());
    }

    #[test]
    fn indices_are_never_reused_after_ack() {
        let mb = mem(MailboxLimits::default());
        for _ in 0..3 {
            put(&mb, ALICE, b"m", 1).unwrap();
        }
        assert_eq!(mb.ack(&INBOX, false, 3).unwrap(), 3);
        assert_eq!(put(&mb, ALICE, b"m", 2).unwrap().index, 4);
        assert_eq!(mb.ack(&INBOX, false, 4).unwrap(), 1);
        assert_eq!(mb.sweep(u64::MAX).unwrap(), 0);
        assert_eq!(put(&mb, BOB, b"m", 3).unwrap().index, 5);
        // A cursor from before the acks still sees the new envelope.
        let (page, _) = mb.fetch(&INBOX, false, 4, 10, 3).unwrap();
        assert_eq!(indices(&page), vec![5]);
    }

    #[test]
    fn expired_envelopes_are_never_fetched_and_are_swept() {
        let mb = mem(MailboxLimits {
            retention_ms: 1_000,
            inbox_max_envelopes: 3,
            ..MailboxLimits::default()
        });
        put(&mb, ALICE, b"old", 0).unwrap(); // keep until 1000
        put(&mb, ALICE, b"mid", 500).unwrap(); // keep until 1500
        put(&mb, BOB, b"new", 900).unwrap(); // keep until 1900

        let (page, _) = mb.fetch(&INBOX, false, 0, 10, 999).unwrap();
        assert_eq!(indices(&page), vec![1, 2, 3]);
        let (page, more) = mb.fetch(&INBOX, false, 0, 10, 1_000).unwrap();
        assert_eq!(indices(&page), vec![2, 3], "expiry is inclusive of keep_until");
        assert!(!more);
        let (page, more) = mb.fetch(&INBOX, false, 0, 1, 1_000).unwrap();
        assert_eq!(indices(&page), vec![2]);
        assert!(more);
        let (page, more) = mb.fetch(&INBOX, false, 0, 10, 1_900).unwrap();
        assert!(page.is_empty() && !more);

        assert_eq!(mb.sweep(1_500).unwrap(), 2);
        assert_eq!(mb.stats().unwrap().envelopes, 1);
        assert_eq!(mb.sweep(1_500).unwrap(), 0);
        assert_eq!(mb.sweep(1_900).unwrap(), 1);
        assert_eq!(mb.stats().unwrap(), MailboxStats::default());
        assert_eq!(put(&mb, ALICE, b"again", 2_000).unwrap().index, 4);
    }

    #[test]
    fn a_full_inbox_of_expired_envelopes_makes_room_without_a_sweep() {
        let mb = mem(MailboxLimits {
            retention_ms: 10,
            inbox_max_envelopes: 2,
            ..MailboxLimits::default()
        });
        put(&mb, ALICE, b"1", 0).unwrap();
        put(&mb, ALICE, b"2", 5).unwrap();
        assert_eq!(put(&mb, BOB, b"3", 9), Err(DepositRefusal::QuotaExceeded));
        // At 10 the first has expired: it is deleted to make room.
        assert_eq!(put(&mb, BOB, b"3", 10).unwrap().index, 3);
        let (page, _) = mb.fetch(&INBOX, false, 0, 10, 10).unwrap();
        assert_eq!(indices(&page), vec![2, 3]);
        assert_eq!(mb.stats().unwrap().envelopes, 2);
    }

    #[test]
    fn replayed_nonce_is_detected_within_the_window_and_accepted_after() {
        let mb = mem(MailboxLimits {
            nonce_window_ms: 100,
            ..MailboxLimits::default()
        });
        let n = [9u8; 16];
        assert!(mb.check_nonce(&n, 1_000).unwrap());
        assert!(!mb.check_nonce(&n, 1_050).unwrap());
        assert!(!mb.check_nonce(&n, 1_099).unwrap());
        assert!(mb.check_nonce(&[8u8; 16], 1_099).unwrap(), "another nonce is fresh");
        assert!(mb.check_nonce(&n, 1_100).unwrap(), "expired: accepted again");
        assert!(!mb.check_nonce(&n, 1_150).unwrap(), "and remembered anew");
        // A sweep forgets expired nonces but not live ones.
        mb.sweep(1_199).unwrap();
        assert!(!mb.check_nonce(&n, 1_199).unwrap());
        mb.sweep(5_000).unwrap();
        let r = mb.db.begin_read().unwrap();
        assert_eq!(r.open_table(MAILBOX_NONCES).unwrap().iter().unwrap().count(), 0);
        assert_eq!(r.open_table(MAILBOX_NONCE_EXPIRY).unwrap().iter().unwrap().count(), 0);
    }

    #[test]
    fn key_package_pool_hands_out_oldest_first_then_the_last_resort() {
        let mb = mem(MailboxLimits {
            max_key_packages: 3,
            ..MailboxLimits::default()
        });
        let owner = [5u8; 32];
        assert_eq!(mb.claim_key_package(&owner).unwrap(), None);
        let kps: Vec<Vec<u8>> = (1..=2u8).map(|i| vec![i]).collect();
        assert_eq!(mb.publish_key_packages(&owner, &kps, Some(b"last")).unwrap(), 2);
        // Two more overflow the pool of 3: the oldest (1) is dropped.
        let kps: Vec<Vec<u8>> = (3..=4u8).map(|i| vec![i]).collect();
        assert_eq!(mb.publish_key_packages(&owner, &kps, None).unwrap(), 3);
        assert_eq!(mb.claim_key_package(&[6u8; 32]).unwrap(), None, "pools are per owner");
        for want in [vec![2], vec![3], vec![4]] {
            assert_eq!(mb.claim_key_package(&owner).unwrap(), Some(want));
        }
        for _ in 0..3 {
            assert_eq!(mb.claim_key_package(&owner).unwrap(), Some(b"last".to_vec()));
        }
        // An upload larger than the pool keeps its newest packages.
        let kps: Vec<Vec<u8>> = (10..=15u8).map(|i| vec![i]).collect();
        assert_eq!(mb.publish_key_packages(&owner, &kps, Some(b"last2")).unwrap(), 3);
        assert_eq!(mb.claim_key_package(&owner).unwrap(), Some(vec![13]));
        assert_eq!(mb.publish_key_packages(&owner, &[], None).unwrap(), 2);
        assert_eq!(mb.claim_key_package(&owner).unwrap(), Some(vec![14]));
        assert_eq!(mb.claim_key_package(&owner).unwrap(), Some(vec![15]));
        assert_eq!(mb.claim_key_package(&owner).unwrap(), Some(b"last2".to_vec()));
    }

    #[test]
    fn a_batch_refuses_some_deposits_and_stores_the_rest() {
        let mb = mem(MailboxLimits {
            max_envelope_bytes: 8,
            sender_max_envelopes: 2,
            ..MailboxLimits::default()
        });
        let other = [3u8; 32];
        let batch = vec![
            req(INBOX, ALICE, b"one"),
            req(INBOX, ALICE, b"far too large"),
            req(INBOX, ALICE, b"two"),
            req(INBOX, ALICE, b"three"), // third from Alice: over her quota, counting this batch
            req(INBOX, BOB, b"bob"),
            req(other, ALICE, b"else"), // another inbox: its own sender quota
        ];
        let out = mb.deposit_batch(&batch, 42).unwrap();
        let summary: Vec<_> = out.iter().map(|r| r.map(|d| d.index)).collect();
        assert_eq!(
            summary,
            vec![
                Ok(1),
                Err(DepositRefusal::TooLarge),
                Ok(2),
                Err(DepositRefusal::QuotaExceeded),
                Ok(3),
                Ok(1),
            ]
        );
        let (page, _) = mb.fetch(&INBOX, false, 0, 10, 42).unwrap();
        let bodies: Vec<_> = page.iter().map(|e| e.envelope.as_slice()).collect();
        assert_eq!(bodies, vec![&b"one"[..], b"two", b"bob"]);
        assert_eq!(
            mb.stats().unwrap(),
            MailboxStats {
                inboxes: 2,
                envelopes: 4,
                bytes: 13
            }
        );
        assert_eq!(mb.deposit_batch(&[], 43).unwrap(), vec![]);
    }

    #[test]
    fn mailboxes_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailboxes.redb");
        {
            let mb = Mailboxes::open(&path, MailboxLimits::default()).unwrap();
            put(&mb, ALICE, b"acked", 10).unwrap();
            put(&mb, BOB, b"kept", 11).unwrap();
            mb.ack(&INBOX, false, 1).unwrap();
            mb.publish_key_packages(&ALICE, &[b"kp".to_vec()], Some(b"lr")).unwrap();
            assert!(mb.check_nonce(&[1; 16], 10).unwrap());
        }
        let mb = Mailboxes::open(&path, MailboxLimits::default()).unwrap();
        let (page, more) = mb.fetch(&INBOX, false, 0, 10, 12).unwrap();
        assert_eq!(
            page,
            vec![StoredEnvelope {
                index: 2,
                envelope: b"kept".to_vec(),
                deposited_ms: 11
            }]
        );
        assert!(!more);
        assert_eq!(put(&mb, ALICE, b"next", 13).unwrap().index, 3);
        assert!(!mb.check_nonce(&[1; 16], 20).unwrap());
        assert_eq!(mb.claim_key_package(&ALICE).unwrap(), Some(b"kp".to_vec()));
        assert_eq!(mb.claim_key_package(&ALICE).unwrap(), Some(b"lr".to_vec()));
        assert_eq!(mb.stats().unwrap().envelopes, 2);
    }

    #[test]
    fn a_mailbox_file_from_another_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailboxes.redb");
        {
            let mb = Mailboxes::open(&path, MailboxLimits::default()).unwrap();
            let w = mb.db.begin_write().unwrap();
            w.open_table(MAILBOX_META)
                .unwrap()
                .insert(
                    KEY_SCHEMA_VERSION,
                    (MAILBOX_SCHEMA_VERSION + 1).to_be_bytes().as_slice(),
                )
                .unwrap();
            w.commit().unwrap();
        }
        match Mailboxes::open(&path, MailboxLimits::default()) {
            Err(StoreError::SchemaVersion { found, expected }) => {
                assert_eq!((found, expected), (MAILBOX_SCHEMA_VERSION + 1, MAILBOX_SCHEMA_VERSION));
            }
            other => panic!("expected a schema version error, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_counters_give_an_error_not_a_panic() {
        let mb = mem(MailboxLimits::default());
        put(&mb, ALICE, b"m", 1).unwrap();
        {
            let w = mb.db.begin_write().unwrap();
            w.open_table(MAILBOX_SENDERS)
                .unwrap()
                .remove((&INBOX, false, &ALICE))
                .unwrap();
            w.commit().unwrap();
        }
        assert!(matches!(mb.ack(&INBOX, false, 1), Err(StoreError::Corrupt(_))));
        assert!(matches!(mb.sweep(u64::MAX), Err(StoreError::Corrupt(_))));
        // The failed ack and sweep rolled back: the envelope is still there.
        assert_eq!(mb.fetch(&INBOX, false, 0, 10, 1).unwrap().0.len(), 1);
        {
            let w = mb.db.begin_write().unwrap();
            w.open_table(MAILBOX_META)
                .unwrap()
                .insert(KEY_BYTES, b"xx".as_slice())
                .unwrap();
            w.commit().unwrap();
        }
        assert!(matches!(mb.stats(), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            mb.deposit(&req(INBOX, BOB, b"b"), 2),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn stats_track_many_inboxes() {
        let mb = mem(MailboxLimits::default());
        let batch: Vec<_> = (0..10_000u32)
            .map(|i| {
                let mut inbox = [0u8; 32];
                inbox[..4].copy_from_slice(&i.to_be_bytes());
                req(inbox, ALICE, b"hi")
            })
            .collect();
        assert!(mb.deposit_batch(&batch, 1).unwrap().iter().all(Result::is_ok));
        assert_eq!(
            mb.stats().unwrap(),
            MailboxStats {
                inboxes: 10_000,
                envelopes: 10_000,
                bytes: 20_000
            }
        );
        assert_eq!(mb.ack(&batch[0].inbox, false, 1).unwrap(), 1);
        assert_eq!(mb.stats().unwrap().inboxes, 9_999);
        assert_eq!(mb.sweep(u64::MAX).unwrap(), 9_999);
        assert_eq!(mb.stats().unwrap(), MailboxStats::default());
    }

    #[test]
    fn limits_deserialize_with_defaults_for_missing_fields() {
        let l: MailboxLimits = serde_json::from_str(r#"{"inbox_max_envelopes": 5}"#).unwrap();
        assert_eq!(
            l,
            MailboxLimits {
                inbox_max_envelopes: 5,
                ..MailboxLimits::default()
            }
        );
    }
}
