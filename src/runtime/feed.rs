//! The change feed: every applied change of a publishing entity type
//! ([`RuntimeBuilder::feed`](crate::RuntimeBuilder::feed)), in commit order, written in the
//! same atomic batch as the change; and its named, durable consumers.
//!
//! A consumer reads from its position, handles what it read, and acknowledges a position;
//! after a restart or a crash it resumes after the last acknowledged one. Delivery is at
//! least once: what was read and not acknowledged comes again. A read model that keeps,
//! per entity, the revision it last applied sees each revision at most once by skipping
//! any change whose revision is not above it (see `docs/read-models.md`).
//!
//! The feed keeps every record not yet acknowledged by every consumer; acknowledged
//! records are purged as the slowest consumer moves on. When more than
//! `feed_retention` records wait behind the slowest consumer, the feed says so (a
//! warning and the counter `feed_held_back`) and still keeps them: nothing a consumer has
//! not acknowledged is removed. With no consumer, only the latest `feed_retention`
//! records are kept.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::core::codec;
use crate::core::keys::{self, Space};
use crate::core::records::{ChangeRecord, StateHeader, StateRecord};
use crate::entity::Entity;
use crate::error::{AdminError, DecodeError};
use crate::runtime::inner::Inner;
use crate::runtime::Runtime;
use crate::store::Op;
use crate::telemetry::Stats;

/// The longest consumer name accepted, in bytes.
pub const FEED_CONSUMER_NAME_MAX: usize = 255;

/// Where a consumer that has no stored position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Start {
    /// At the oldest record the feed still keeps: a replay of what is kept.
    Beginning,
    /// After the last record now in the feed: only what changes from now on.
    Now,
}

/// One applied change, as the feed recorded it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Change {
    /// Its position in the feed (commit order); acknowledge it with [`Consumer::ack`].
    pub seq: u64,
    /// Entity type.
    pub entity: String,
    /// Entity key.
    pub key: String,
    /// The entity's revision after this change.
    pub revision: u64,
    /// The entity's version after this change.
    pub version: Option<u64>,
    /// The message (or transaction) id that made it.
    pub message_id: String,
    /// Its correlation id.
    pub correlation_id: String,
    /// When it was committed, ms since the epoch on the runtime's clock.
    pub committed_at_ms: u64,
    state: Vec<u8>,
}

impl Change {
    /// The entity's new state, decoded with its type `E`; `None` if the change is of
    /// another entity type.
    ///
    /// # Errors
    /// A [`DecodeError`] if the state does not decode as `E::State`.
    pub fn state<E: Entity>(&self) -> Option<Result<E::State, DecodeError>> {
        (self.entity == E::NAME)
            .then(|| codec::decode::<StateRecord<E::State>>("state", &self.state).map(|r| r.state))
    }
}

/// The change feed of a runtime; see [`Runtime::feed`].
#[derive(Debug, Clone)]
pub struct Feed {
    inner: Weak<Inner>,
}

impl Runtime {
    /// The change feed (see [`Feed`]).
    pub fn feed(&self) -> Feed {
        Feed {
            inner: Arc::downgrade(&self.inner),
        }
    }
}

fn runtime(inner: &Weak<Inner>) -> Result<Arc<Inner>, AdminError> {
    inner
        .upgrade()
        .filter(|i| !i.is_closed())
        .ok_or(AdminError::Closed)
}

fn read_position(inner: &Inner, name: &str) -> Result<Option<u64>, AdminError> {
    Ok(inner
        .store
        .get(&keys::feed_consumer(name))?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes))
}

impl Feed {
    /// Consumer `name`: resumes after its stored position if it has one (it acknowledged
    /// before, in this process or an earlier one), else starts as `start` says and stores
    /// that position at once (so the feed keeps what it has not read from then on).
    ///
    /// # Errors
    /// [`AdminError::InvalidKey`] for an empty or too long name; [`AdminError::Storage`];
    /// [`AdminError::Closed`].
    pub async fn consumer(&self, name: &str, start: Start) -> Result<Consumer, AdminError> {
        if name.is_empty() || name.len() > FEED_CONSUMER_NAME_MAX {
            return Err(AdminError::InvalidKey {
                entity: "feed consumer",
                reason: format!(
                    "a consumer name must be 1 to {FEED_CONSUMER_NAME_MAX} bytes, not {}",
                    name.len()
                ),
            });
        }
        let inner = runtime(&self.inner)?;
        let position = match read_position(&inner, name)? {
            Some(position) => position,
            None => {
                let position = match start {
                    Start::Beginning => 0,
                    Start::Now => inner.store.feed.last.load(Ordering::SeqCst),
                };
                inner
                    .store
                    .commit(vec![Op::Put(
                        keys::feed_consumer(name),
                        position.to_be_bytes().to_vec(),
                    )])
                    .await?;
                position
            }
        };
        Ok(Consumer {
            inner: self.inner.clone(),
            name: name.to_string(),
            acked: position,
            read: position,
        })
    }

    /// Removes consumer `name` (its position): the feed no longer keeps records for it.
    /// Returns whether it existed.
    ///
    /// # Errors
    /// [`AdminError::Storage`]; [`AdminError::Closed`].
    pub async fn remove_consumer(&self, name: &str) -> Result<bool, AdminError> {
        let inner = runtime(&self.inner)?;
        let existed = read_position(&inner, name)?.is_some();
        inner
            .store
            .commit(vec![Op::Delete(keys::feed_consumer(name))])
            .await?;
        purge(&inner).await?;
        Ok(existed)
    }

    /// Every consumer and its acknowledged position, by name.
    ///
    /// # Errors
    /// [`AdminError::Storage`]; [`AdminError::Closed`].
    pub async fn consumers(&self) -> Result<Vec<(String, u64)>, AdminError> {
        let inner = runtime(&self.inner)?;
        consumers(&inner)
    }

    /// The last feed position given to a change.
    ///
    /// # Errors
    /// [`AdminError::Closed`].
    pub fn last(&self) -> Result<u64, AdminError> {
        Ok(runtime(&self.inner)?.store.feed.last.load(Ordering::SeqCst))
    }
}

fn consumers(inner: &Inner) -> Result<Vec<(String, u64)>, AdminError> {
    let mut out = Vec::new();
    for entry in inner.store.scan_prefix(&[Space::FeedConsumer as u8])? {
        let (key, value) = entry?;
        let name = String::from_utf8_lossy(&key[1..]).into_owned();
        let position = <[u8; 8]>::try_from(value.as_slice())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        out.push((name, position));
    }
    Ok(out)
}

/// Removes the records every consumer has acknowledged (with none, all but the latest
/// `feed_retention`), and counts a held-back feed.
async fn purge(inner: &Inner) -> Result<(), AdminError> {
    let last = inner.store.feed.last.load(Ordering::SeqCst);
    let retention = inner.shared.config.feed_retention;
    let positions = consumers(inner)?;
    let up_to = match positions.iter().map(|(_, p)| *p).min() {
        Some(slowest) => {
            let behind = last.saturating_sub(slowest);
            if behind > retention {
                Stats::bump(&inner.shared.stats.feed_held_back);
                tracing::warn!(target: "keystead", behind, retention, slowest,
                    "the change feed is held back by a stalled consumer: it keeps every record the consumer has not acknowledged; acknowledge, or remove the consumer");
            }
            slowest
        }
        None => last.saturating_sub(retention),
    };
    let from = inner.store.feed.purged_to.load(Ordering::SeqCst);
    if up_to <= from {
        return Ok(());
    }
    let mut ops = Vec::new();
    let start = keys::feed(from.saturating_add(1));
    let mut purged = from;
    for entry in inner.store.scan_from(&[Space::Feed as u8], &start)? {
        let (key, _) = entry?;
        // A segment goes once every record in it (up to its last) is acknowledged.
        match keys::feed_seq(&key) {
            Some(last) if last <= up_to => {
                ops.push(Op::Delete(key));
                purged = last;
            }
            _ => break,
        }
        if ops.len() == 1000 {
            inner.store.commit(std::mem::take(&mut ops)).await?;
        }
    }
    if !ops.is_empty() {
        inner.store.commit(ops).await?;
    }
    inner
        .store
        .feed
        .purged_to
        .fetch_max(purged, Ordering::SeqCst);
    Ok(())
}

/// Keeps the feed trimmed while the runtime runs: after appends, purges once the records
/// kept exceed `feed_retention` by a tenth (with consumers, only what they all
/// acknowledged goes; see [`purge`]). Runs on `keystead-time`.
pub(crate) async fn janitor(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade().filter(|i| !i.is_closed()) else {
            return;
        };
        let (store, delayed) = (strong.store.clone(), strong.delayed.clone());
        let appended = store.feed.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        // Woken at close too (and by timers; a spurious wake only loops).
        let closing = delayed.wake.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        let last = strong.store.feed.last.load(Ordering::SeqCst);
        let purged = strong.store.feed.purged_to.load(Ordering::SeqCst);
        let retention = strong.shared.config.feed_retention;
        if last.saturating_sub(purged) > retention.saturating_add(retention / 10) {
            if let Err(e) = purge(&strong).await {
                tracing::warn!(target: "keystead", error = %e, "cannot purge the change feed now; trying again after the next change");
            }
        }
        drop(strong);
        tokio::select! {
            _ = &mut appended => {}
            _ = &mut closing => {}
        }
    }
}

/// A named, durable reader of the feed; see [`Feed::consumer`].
#[derive(Debug)]
pub struct Consumer {
    inner: Weak<Inner>,
    name: String,
    /// The position acknowledged (stored).
    acked: u64,
    /// The position read up to.
    read: u64,
}

impl Consumer {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The position it acknowledged last (stored: a restart resumes after it).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Up to `max` changes after what it read so far, in feed order, waiting until there
    /// is at least one. Durable changes only.
    ///
    /// # Errors
    /// [`AdminError::Closed`] once the runtime closes (also while waiting);
    /// [`AdminError::Storage`], [`AdminError::Decode`].
    pub async fn next(&mut self, max: usize) -> Result<Vec<Change>, AdminError> {
        loop {
            let inner = runtime(&self.inner)?;
            let (store, delayed) = (inner.store.clone(), inner.delayed.clone());
            let appended = store.feed.appended.notified();
            tokio::pin!(appended);
            // Registered before the read, so a change committed in between wakes it.
            appended.as_mut().enable();
            // Woken at close too (and by timers; a spurious wake only reads again).
            let closing = delayed.wake.notified();
            tokio::pin!(closing);
            closing.as_mut().enable();
            let changes = self.read_after(&inner, max.max(1)).await?;
            if !changes.is_empty() {
                return Ok(changes);
            }
            drop(inner);
            tokio::select! {
                _ = &mut appended => {}
                _ = &mut closing => {}
            }
        }
    }

    /// Up to `max` changes after what it read so far, without waiting (possibly none).
    ///
    /// # Errors
    /// As [`Consumer::next`].
    pub async fn try_next(&mut self, max: usize) -> Result<Vec<Change>, AdminError> {
        let inner = runtime(&self.inner)?;
        self.read_after(&inner, max.max(1)).await
    }

    async fn read_after(&mut self, inner: &Inner, max: usize) -> Result<Vec<Change>, AdminError> {
        let from = self.read.saturating_add(1);
        let mut changes = Vec::new();
        // The first segment whose last record is at or after `from` holds it.
        for entry in inner
            .store
            .scan_from(&[Space::Feed as u8], &keys::feed(from))?
        {
            let (key, bytes) = entry?;
            let Some(last) = keys::feed_seq(&key) else {
                continue;
            };
            let decode = |source| AdminError::Decode {
                entity: "change feed",
                key: last.to_string(),
                source,
            };
            let records: Vec<Vec<u8>> =
                codec::decode("change feed segment", &bytes).map_err(decode)?;
            let first = last.saturating_sub(records.len() as u64).saturating_add(1);
            for (i, bytes) in records.iter().enumerate() {
                let seq = first + i as u64;
                if seq < from {
                    continue;
                }
                let record: ChangeRecord = codec::decode("change", bytes).map_err(decode)?;
                let header: StateHeader =
                    codec::decode_head("state", &record.state).map_err(decode)?;
                changes.push(Change {
                    seq,
                    entity: record.entity,
                    key: record.key,
                    revision: header.revision,
                    version: header.version,
                    message_id: record.message_id,
                    correlation_id: record.correlation_id,
                    committed_at_ms: header.updated_at_ms,
                    state: record.state,
                });
                if changes.len() == max {
                    break;
                }
            }
            if changes.len() == max {
                break;
            }
        }
        // Show only what a crash cannot take back.
        inner.store.reads_durable().await?;
        if let Some(last) = changes.last() {
            self.read = last.seq;
        }
        Ok(changes)
    }

    /// Acknowledges every change up to `seq` (a change's [`Change::seq`]): stored at once,
    /// so a restart resumes after it; the feed may then purge what every consumer has
    /// acknowledged. Acknowledging less than before changes nothing.
    ///
    /// # Errors
    /// [`AdminError::Storage`]; [`AdminError::Closed`].
    pub async fn ack(&mut self, seq: u64) -> Result<(), AdminError> {
        if seq <= self.acked {
            return Ok(());
        }
        let inner = runtime(&self.inner)?;
        inner
            .store
            .commit(vec![Op::Put(
                keys::feed_consumer(&self.name),
                seq.to_be_bytes().to_vec(),
            )])
            .await?;
        self.acked = seq;
        self.read = self.read.max(seq);
        purge(&inner).await
    }

    /// Reads again from the acknowledged position (what was read and not acknowledged
    /// comes again), as a restart would.
    pub fn rewind(&mut self) {
        self.read = self.acked;
    }
}
