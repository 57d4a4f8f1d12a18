//! The `Runtime` handle: entity addresses, stats, the operator reads, and closing.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::core::codec;
use crate::core::keys::Space;
use crate::dead_letter::{DeadLetter, Shed};
use crate::effects::{self, EffectInfo, EffectKey};
use crate::entity::Entity;
use crate::error::AdminError;
use crate::priority::Priority;
use crate::runtime::address::EntityRef;
use crate::telemetry::RuntimeStats;
use crate::time::scheduler::Scheduler;
use crate::time::Schedules;

use crate::runtime::inner::Inner;
use crate::runtime::purge::purge_expired;
use crate::runtime::shared::check_key;

/// A running keystead: entity actors on actix shards over one database (sled by default).
///
/// Open it with [`Runtime::builder`], talk to entities with [`Runtime::entity`], and close it
/// with [`Runtime::shutdown`] (or drop it: accepted messages are safe in the inbox either
/// way).
///
/// ```
/// # use keystead::{Context, Entity, Failure, FailureKind, Outcome, Runtime};
/// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
/// # #[error("never")] struct Never;
/// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// # struct Counter;
/// # impl Entity for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type State = u64; type Command = u64; type Reply = u64; type Error = Never;
/// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Never> { *s += c; Ok(*s) }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let rt = Runtime::builder(dir.path()).register::<Counter>().open()?;
/// let counter = rt.entity::<Counter>("c-1");
/// let first = counter.ask(5).id("add-5").await?;
/// let again = counter.ask(5).id("add-5").await?; // a retry: not applied twice
/// assert_eq!(first, Outcome::Applied { reply: 5, revision: 1 });
/// assert!(again.is_duplicate());
/// assert_eq!(again.reply(), Some(&5));
/// rt.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
    pub(crate) scheduler: Arc<Scheduler>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("path", &self.inner.path)
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// A typed address of entity `key` of type `E`. Cheap; creates nothing until a message
    /// is sent. Only `E`'s commands can be sent through it.
    pub fn entity<E: Entity>(&self, key: impl Into<String>) -> EntityRef<E> {
        EntityRef::new(Arc::downgrade(&self.inner), key.into())
    }

    /// A cheap, cloneable handle on this runtime (see
    /// [`RuntimeHandle`](crate::RuntimeHandle)): `Send + Sync + 'static`, weak, and closed
    /// with the runtime.
    pub fn handle(&self) -> crate::RuntimeHandle {
        let weak: std::sync::Weak<Inner> = Arc::downgrade(&self.inner);
        crate::RuntimeHandle::new(weak)
    }

    /// Runs transaction `T` (registered with
    /// [`RuntimeBuilder::transaction`](crate::RuntimeBuilder::transaction)) with `command`:
    /// an atomic change of several entities. The returned builder sets its id, version,
    /// expected revisions and lane; await it. See [`Transaction`](crate::Transaction).
    pub fn transaction<T: crate::Transaction>(&self, command: T::Command) -> crate::Transact<T> {
        crate::Transact::new(Arc::downgrade(&self.inner), command)
    }

    /// A batch of `tell`s to entities of any registered types, written in one atomic
    /// durable write. See [`TellBatch`](crate::TellBatch).
    pub fn tell_batch(&self) -> crate::TellBatch {
        crate::TellBatch::new(Arc::downgrade(&self.inner))
    }

    /// A batch of `ask`s dispatched in one global order and answered in the caller's
    /// order. See [`AskBatch`](crate::AskBatch).
    pub fn ask_batch(&self) -> crate::AskBatch {
        crate::AskBatch::default()
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// The shard (0-based) that owns entity `key` of type `E`: a stable hash, the same in
    /// every run with the same shard count.
    pub fn shard_of<E: Entity>(&self, key: &str) -> usize {
        self.inner.shard_index(E::NAME, key)
    }

    /// The runtime's schedules: create, pause, trigger, backfill, list (see [`Schedules`]).
    pub fn schedules(&self) -> Schedules {
        Schedules {
            inner: Arc::downgrade(&self.inner),
            scheduler: self.scheduler.clone(),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RuntimeStats {
        let mut stats = self.inner.shared.stats.snapshot();
        let store = &self.inner.store.counters;
        stats.commits = store.commits.load(Ordering::Relaxed);
        stats.commit_batches = store.batches.load(Ordering::Relaxed);
        stats.flushes = store.flushes.load(Ordering::Relaxed);
        stats.feed_last = self.inner.store.feed.last.load(Ordering::SeqCst);
        for lane in Priority::ALL {
            let (pending, bytes) = self.inner.shared.backlog.pending(lane);
            stats.lanes[lane.index()].pending = pending;
            stats.lanes[lane.index()].pending_bytes = bytes;
            stats.inbox_pending += pending;
            let (effects, effect_bytes) = self.inner.shared.outbox.pending(lane);
            stats.effect_priorities[lane.index()].pending = effects;
            stats.effect_priorities[lane.index()].pending_bytes = effect_bytes;
        }
        stats.effect_types = self.inner.effects.type_stats();
        stats
    }

    /// Waits until `condition` holds for the counters. Woken on every finished message and
    /// every stopped actor, so it never polls.
    pub async fn wait_until(&self, condition: impl Fn(&RuntimeStats) -> bool) {
        loop {
            let changed = self.inner.shared.stats.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if condition(&self.stats()) || self.inner.is_closed() {
                return;
            }
            changed.await;
        }
    }

    /// Waits until every admitted message has finished, the inbox recovered at open has
    /// been handed to its entities, and no effect is being performed, waiting to retry or
    /// waiting for its type's concurrency or rate limit. Messages that cannot be processed
    /// now (an unregistered type, an undecodable state) stay in the inbox and do not hold
    /// this up, and neither do effects parked behind an open circuit breaker (they wait for
    /// the outside world; see [`RuntimeStats::effect_type`]).
    pub async fn idle(&self) {
        self.idle_snapshot().await;
    }

    /// Waits as [`Runtime::idle`] does and returns the counters it found idle. They are
    /// read as one consistent snapshot: the counters `idle` watches are read between two
    /// readings of the work epoch (bumped by every change to them), and a reading torn by
    /// a change is taken again. (Work moving on bumps its next stage's counter before it
    /// leaves its stage, so a consistent reading of zero means nothing is left.)
    pub(crate) async fn idle_snapshot(&self) -> RuntimeStats {
        let stats = &self.inner.shared.stats;
        loop {
            let changed = stats.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let before = stats.work_epoch.load(Ordering::SeqCst);
            let s = self.stats();
            let feeds_behind = stats.feeds_behind.load(Ordering::SeqCst);
            let firing = stats.time_firing.load(Ordering::SeqCst);
            // Delayed messages and scheduled runs already due are work too (their firer
            // may not have woken yet).
            let now = self.inner.shared.clock.now_ms();
            let timers_due = self
                .inner
                .delayed
                .next_due(&self.inner.store)
                .ok()
                .flatten()
                .is_some_and(|due| due <= now);
            let schedules_idle = self.scheduler.idle_at(now, before);
            let consistent = stats.work_epoch.load(Ordering::SeqCst) == before;
            let idle = s.in_flight == 0
                && firing == 0
                && !timers_due
                && schedules_idle
                && s.effect_lanes == 0
                && feeds_behind == 0
                && s.effect_types.iter().all(|t| {
                    t.running == 0 && (t.parked == 0 || t.breaker != crate::BreakerState::Closed)
                });
            if (idle && consistent) || self.inner.is_closed() {
                return s;
            }
            if idle {
                // Torn by a change in the middle: read again once the change has settled.
                tokio::task::yield_now().await;
                continue;
            }
            changed.await;
        }
    }

    /// Counts the inbox entries on disk: accepted messages not yet retired. Like every
    /// read of the runtime's records, it answers from durable data only (see
    /// [`EntityRef::snapshot`]).
    ///
    /// # Errors
    /// [`AdminError::Storage`] if the store cannot be read.
    pub async fn inbox_len(&self) -> Result<u64, AdminError> {
        let mut n = 0;
        for entry in self.inner.store.scan_prefix(&[Space::Inbox as u8])? {
            entry?;
            n += 1;
        }
        self.inner.store.reads_durable().await?;
        Ok(n)
    }

    /// Every dead letter of entity type `E`, in key order.
    ///
    /// # Errors
    /// [`AdminError::NotRegistered`] if `E` is not registered; [`AdminError::Storage`] or
    /// [`AdminError::Decode`] if a record cannot be read.
    pub async fn dead_letters<E: Entity>(&self) -> Result<Vec<DeadLetter<E>>, AdminError> {
        self.list::<E, _>(Space::DeadLetter, DeadLetter::<E>::from_stored)
            .await
    }

    /// Every record of entity type `E` in keyspace `space`, read with `read`, durable only.
    async fn list<E: Entity, T>(
        &self,
        space: Space,
        read: fn(&[u8], &[u8]) -> Result<T, AdminError>,
    ) -> Result<Vec<T>, AdminError> {
        if !self.inner.registered::<E>() {
            return Err(AdminError::NotRegistered { entity: E::NAME });
        }
        let mut prefix = vec![space as u8, E::NAME.len() as u8];
        prefix.extend_from_slice(E::NAME.as_bytes());
        let mut out = Vec::new();
        for entry in self.inner.store.scan_prefix(&prefix)? {
            let (key, value) = entry?;
            out.push(read(&key, &value)?);
        }
        self.inner.store.reads_durable().await?;
        Ok(out)
    }

    /// Every shed message of entity type `E`, in key order: sheddable `tell`s that met a
    /// full lane. Requeue one with [`EntityRef::requeue_shed`] (same id: applied once).
    ///
    /// # Errors
    /// [`AdminError::NotRegistered`] if `E` is not registered; [`AdminError::Storage`] or
    /// [`AdminError::Decode`] if a record cannot be read.
    pub async fn shed<E: Entity>(&self) -> Result<Vec<Shed<E>>, AdminError> {
        self.list::<E, _>(Space::Shed, Shed::<E>::from_stored).await
    }

    /// The status of one effect, from the outbox or the effect history.
    ///
    /// # Errors
    /// [`AdminError::Storage`] if the store cannot be read.
    pub async fn effect(&self, key: &EffectKey) -> Result<Option<EffectInfo>, AdminError> {
        let mut found = None;
        for space in [Space::Outbox, Space::EffectHistory] {
            if let Some((_, record)) = effects::find(&self.inner.store, space, key)? {
                found = Some(record.info);
                break;
            }
        }
        self.inner.store.reads_durable().await?;
        Ok(found)
    }

    /// Every effect recorded by entity `key` of type `E`: unfinished ones first, in the order
    /// they were recorded, then finished ones.
    ///
    /// # Errors
    /// [`AdminError::InvalidKey`] for an empty or over-long key; [`AdminError::Storage`] if
    /// the store cannot be read.
    pub async fn effects_of<E: Entity>(&self, key: &str) -> Result<Vec<EffectInfo>, AdminError> {
        check_key(E::NAME, key).map_err(AdminError::from_refusal)?;
        let found = effects::of_entity(&self.inner.store, E::NAME, key)?;
        self.inner.store.reads_durable().await?;
        Ok(found)
    }

    /// Every dead-lettered effect, of every entity.
    ///
    /// # Errors
    /// [`AdminError::Storage`] if the store cannot be read.
    pub async fn effect_dead_letters(&self) -> Result<Vec<EffectInfo>, AdminError> {
        let mut out = Vec::new();
        for entry in self
            .inner
            .store
            .scan_prefix(&[Space::EffectHistory as u8])?
        {
            let (_, value) = entry?;
            if let Ok(record) = codec::decode::<effects::EffectRecord>("effect record", &value) {
                if record.info.status == effects::EffectStatus::DeadLettered {
                    out.push(record.info);
                }
            }
        }
        self.inner.store.reads_durable().await?;
        Ok(out)
    }

    /// Moves a dead-lettered effect back to the outbox (attempts reset, same effect key) and
    /// runs it. Returns `false` if there is no such dead letter.
    ///
    /// # Errors
    /// [`AdminError::Closed`] after shutdown; [`AdminError::Storage`] if the store fails;
    /// [`AdminError::Overloaded`] if its outbox lane is full (see
    /// [`RuntimeBuilder::outbox_limits`](crate::RuntimeBuilder::outbox_limits)): it stays a
    /// dead letter.
    pub async fn requeue_effect(&self, key: &EffectKey) -> Result<bool, AdminError> {
        if self.inner.is_closed() {
            return Err(AdminError::Closed);
        }
        self.inner.effects.requeue(key).await
    }

    /// Removes dedup records, and finished (done or failed) effect records, older than the
    /// retention window now (a background thread also does this every `dedup_purge_every`).
    /// Dead-lettered effects are kept. Returns how many records were removed.
    ///
    /// # Errors
    /// [`AdminError::Storage`] if the store fails; [`AdminError::Closed`] after shutdown.
    pub fn purge_expired_dedup(&self) -> Result<u64, AdminError> {
        if self.inner.is_closed() {
            return Err(AdminError::Closed);
        }
        Ok(purge_expired(&self.inner)?)
    }

    /// Stops admitting messages, waits for the admitted ones to finish, then stops the
    /// actors and the effect workers and closes the database. Messages still in the inbox
    /// (for example waiting on an unregistered type) stay there for the next open. Effects
    /// not finished yet (a provider that is down, an executor still running) are not waited
    /// for: they stay in the outbox and run again, with the same effect key, at the next
    /// open. Await [`Runtime::idle`] first to let them finish.
    pub async fn shutdown(self) {
        self.inner.stop_admitting();
        self.wait_until(|s| s.in_flight == 0).await;
        self.inner.close();
    }

    /// Like dropping the runtime, but explicit: stops everything at once without waiting.
    /// Admitted messages not yet durable are not acknowledged; accepted ones stay in the
    /// inbox and are processed at the next open.
    pub fn close_now(self) {
        self.inner.close();
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.inner.close();
    }
}
