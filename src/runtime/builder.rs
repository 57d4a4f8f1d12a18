//! Configuring and opening a runtime: the builder, the inbox and outbox scans at open, and
//! the actix system with its shards.

use std::any::TypeId;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use actix::prelude::*;
use parking_lot::Mutex;

use crate::backend::Backend;
use crate::clock::{Clock, SystemClock};
use crate::core::codec;
use crate::core::effect::{effect_lane, outbox_index_of, EffectRecord};
use crate::core::hash::shard_of;
use crate::core::keys::{self, Space, ENTITY_NAME_LEN_MAX};
use crate::durability::Durability;
use crate::effects::{self, AsyncExecutor, Effect, Effects, Executor};
use crate::entity::Entity;
use crate::error::{OpenError, StoreError};
use crate::priority::{LaneLimits, Priority};
use crate::retry::RetryPolicy;
use crate::runtime::admission::{Gate, GateConfig, GateKind};
use crate::runtime::backlog::Backlog;
use crate::runtime::delayed::{scan_timers, Delayed};
use crate::runtime::feeder;
use crate::runtime::supervisor::Shard;
use crate::store::{Op, Store, StoreConfig};
use crate::telemetry::Stats;
use crate::time::{self, scheduler::Scheduler};

use crate::runtime::handle::Runtime;
use crate::runtime::inner::{
    encode_state, hold, wake, Inner, Registration, ShardRef, Threads, TxClaims,
};
use crate::runtime::purge::start_purge;
use crate::runtime::shared::{Config, Shared};

impl Runtime {
    /// A builder for a runtime whose database lives in directory `path`. (Defined beside
    /// the builder, so that the handle's module need not import it.)
    pub fn builder(path: impl AsRef<Path>) -> RuntimeBuilder {
        RuntimeBuilder::new(path.as_ref().to_path_buf())
    }
}

/// Configures and opens a [`Runtime`].
///
/// ```
/// use std::time::Duration;
/// # use keystead::{Context, Entity, Failure, FailureKind, Runtime};
/// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
/// # #[error("never")] struct Never;
/// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// # struct Counter;
/// # impl Entity for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type State = u64; type Command = u64; type Reply = u64; type Error = Never;
/// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Never> { *s += c; Ok(*s) }
/// # }
/// let dir = tempfile::tempdir()?;
/// let rt = Runtime::builder(dir.path())
///     .shards(2)
///     .passivate_after(Duration::from_secs(60))
///     .register::<Counter>()
///     .open()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub struct RuntimeBuilder {
    path: PathBuf,
    shards: usize,
    config: Config,
    clock: Arc<dyn Clock>,
    cache_bytes: u64,
    batch_messages_max: usize,
    durability: Durability,
    backend: Backend,
    registry: HashMap<&'static str, Registration>,
    transactions: HashMap<&'static str, TypeId>,
    registry_error: Option<OpenError>,
    executors: HashMap<&'static str, effects::Registered>,
    effect_limits: HashMap<&'static str, effects::EffectLimits>,
    effect_retry: RetryPolicy,
    effect_workers: usize,
    effects_running_max: usize,
    effect_lanes_max: usize,
    entity_in_flight_max: Option<usize>,
    lane_limits: [LaneLimits; 4],
    outbox_limits: [LaneLimits; 4],
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("path", &self.path)
            .field("shards", &self.shards)
            .field("config", &self.config)
            .field("entities", &self.registry.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl RuntimeBuilder {
    fn new(path: PathBuf) -> Self {
        let shards = thread::available_parallelism().map_or(2, usize::from);
        Self {
            path,
            shards,
            config: Config {
                retry: RetryPolicy::default(),
                dedup_retention: Duration::from_secs(24 * 3600),
                dedup_purge_every: Duration::from_secs(3600),
                passivate_after: Duration::from_secs(60),
                message_size_max: 1 << 20,
                in_flight_max: 1024,
                shards,
                entity_in_flight_max: 0,
                lane_promote_after: 16,
                log_payloads: false,
                feeds: Default::default(),
                feed_retention: 1_000_000,
            },
            clock: Arc::new(SystemClock),
            cache_bytes: 64 << 20,
            batch_messages_max: 1024,
            durability: Durability::Sync,
            backend: Backend::Sled,
            registry: HashMap::new(),
            transactions: HashMap::new(),
            registry_error: None,
            executors: HashMap::new(),
            effect_limits: HashMap::new(),
            effect_retry: RetryPolicy::default(),
            effect_workers: 2,
            effects_running_max: 64,
            effect_lanes_max: 1024,
            entity_in_flight_max: None,
            lane_limits: [LaneLimits::default(); 4],
            outbox_limits: [LaneLimits::default(); 4],
        }
    }

    fn add_executor<T: Effect>(mut self, registered: effects::Registered) -> Self {
        let name = T::NAME;
        if name.is_empty() || name.len() > ENTITY_NAME_LEN_MAX || self.executors.contains_key(name)
        {
            self.registry_error.get_or_insert(OpenError::EntityName {
                name: name.to_string(),
                reason: "effect names must be 1 to 255 bytes and have one executor".into(),
            });
            return self;
        }
        self.executors.insert(name, registered);
        self
    }

    /// Registers the executor of effect type `T`; it runs on a blocking worker thread. An
    /// applied message that records an effect without an executor is dead-lettered instead.
    pub fn executor<T: Effect>(self, executor: impl Executor<T>) -> Self {
        self.add_executor::<T>(effects::Registered::blocking::<T, _>(executor))
    }

    /// Registers an async executor of effect type `T`; it runs on the effect workers' tokio
    /// runtime.
    pub fn async_executor<T: Effect>(self, executor: impl AsyncExecutor<T>) -> Self {
        self.add_executor::<T>(effects::Registered::non_blocking::<T, _>(executor))
    }

    /// The limits of effect type `T` (see [`EffectLimits`](crate::EffectLimits)). Register
    /// its executor too, before or after: limits for an effect type with no executor are
    /// refused at open.
    pub fn effect_limits<T: Effect>(mut self, limits: effects::EffectLimits) -> Self {
        self.effect_limits.insert(T::NAME, limits);
        self
    }

    /// How failing effects are retried. Default: [`RetryPolicy::default`].
    pub fn effect_retry(mut self, policy: RetryPolicy) -> Self {
        self.effect_retry = policy;
        self
    }

    /// Threads of the effect workers' tokio runtime. Default: 2.
    pub fn effect_workers(mut self, threads: usize) -> Self {
        self.effect_workers = threads;
        self
    }

    /// The most effects performed at once, across all entities. Default: 64.
    pub fn effects_running_max(mut self, effects: usize) -> Self {
        self.effects_running_max = effects;
        self
    }

    /// Registers entity type `E`. Every type you send to must be registered, so that the
    /// runtime can process its recovered inbox entries after a restart.
    pub fn register<E: Entity>(mut self) -> Self {
        let name = E::NAME;
        let taken = self.registry.get(name).map(|r| r.type_id);
        if let Some(reason) = name_problem(name, taken, TypeId::of::<E>(), "entity type") {
            self.registry_error.get_or_insert(OpenError::EntityName {
                name: name.to_string(),
                reason,
            });
            return self;
        }
        self.registry.insert(
            name,
            Registration {
                type_id: TypeId::of::<E>(),
                wake: wake::<E>,
                hold: hold::<E>,
                encode_state: encode_state::<E>,
            },
        );
        self
    }

    /// Publishes every applied change of entity type `E` (registered too) to the change
    /// feed, in the same atomic batch as the change; read it with
    /// [`Runtime::feed`](crate::Runtime::feed). Off by default: a type that does not
    /// publish pays nothing.
    pub fn feed<E: Entity>(mut self) -> Self {
        self.config.feeds.insert(E::NAME);
        self
    }

    /// Change feed records to keep beyond the slowest consumer's position before the feed
    /// warns that a stalled consumer holds it back (counter `feed_held_back`); with no
    /// consumer, the most kept (older ones are purged). Default: 1,000,000.
    pub fn feed_retention(mut self, records: u64) -> Self {
        self.config.feed_retention = records.max(1);
        self
    }

    /// Registers transaction `T` (an atomic command over several entities; see
    /// [`Transaction`](crate::Transaction)). Its members' entity types must be registered
    /// too. Its name must differ from every entity type's and other transaction's.
    pub fn transaction<T: crate::Transaction>(mut self) -> Self {
        let name = T::NAME;
        let taken = self.transactions.get(name).copied();
        if let Some(reason) = name_problem(name, taken, TypeId::of::<T>(), "transaction") {
            self.registry_error.get_or_insert(OpenError::EntityName {
                name: name.to_string(),
                reason,
            });
            return self;
        }
        self.transactions.insert(name, TypeId::of::<T>());
        self
    }

    /// The number of shards (actix Arbiters, one thread each). Default: the number of
    /// available cores.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self.config.shards = shards;
        self
    }

    /// How retryable failures are retried. Default: [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// How long a processed message id is remembered. Default: 24 hours. A message whose id
    /// has aged out is processed as new.
    pub fn dedup_retention(mut self, retention: Duration) -> Self {
        self.config.dedup_retention = retention;
        self
    }

    /// How often the background purge of expired dedup records runs. Default: 1 hour.
    pub fn dedup_purge_every(mut self, every: Duration) -> Self {
        self.config.dedup_purge_every = every;
        self
    }

    /// How long an entity actor may stay idle before it stops and frees its memory.
    /// Default: 60 s.
    pub fn passivate_after(mut self, idle: Duration) -> Self {
        self.config.passivate_after = idle;
        self
    }

    /// The largest encoded command `tell` accepts, in bytes. Default: 1 MiB; at most 32 MiB.
    pub fn message_size_max(mut self, bytes: usize) -> Self {
        self.config.message_size_max = bytes;
        self
    }

    /// How many messages one shard admits at once; further callers wait, in their lanes
    /// (see [`Priority`]). Default: 1024. Lower lanes may not take the last slots: `High`
    /// leaves 1/16 of them free, `Normal` 1/8, `Low` 1/4, for the lanes above.
    pub fn in_flight_max(mut self, messages: usize) -> Self {
        self.config.in_flight_max = messages;
        self
    }

    /// How many of its shard's `in_flight_max` slots one entity may hold. Further callers of
    /// that entity wait behind it, so a hot key's flood does not take the capacity other
    /// keys on its shard need. Default: 1/8 of `in_flight_max` (128 of 1024), at least 1.
    pub fn entity_in_flight_max(mut self, messages: usize) -> Self {
        self.entity_in_flight_max = Some(messages);
        self
    }

    /// The most durable work lane `lane` may hold (messages accepted by `tell` and not yet
    /// processed), and what a `tell` meets when it is full. Default for every lane:
    /// [`LaneLimits::default`] (1,000,000 messages, 1 GiB, block up to 30 s).
    pub fn lane_limits(mut self, lane: Priority, limits: LaneLimits) -> Self {
        self.lane_limits[lane.index()] = limits;
        self
    }

    /// The most effects lane `lane` of the outbox may hold (recorded by handlers of
    /// messages in that lane and not yet finished), counted and in payload bytes. A message
    /// whose effects do not fit is not applied yet: a message from the inbox waits for room
    /// (its entity's later messages wait behind it, and the inbox fills, so backpressure
    /// reaches `tell`); an `ask` waits as the lane's [`WhenFull`](crate::WhenFull) says and
    /// then gets [`SubmitError::Overloaded`](crate::SubmitError::Overloaded) with its
    /// command back. Default for every lane: [`LaneLimits::default`] (1,000,000 effects,
    /// 1 GiB); `pending_max` must be at least 1.
    pub fn outbox_limits(mut self, lane: Priority, limits: LaneLimits) -> Self {
        self.outbox_limits[lane.index()] = limits;
        self
    }

    /// How many entities' effect workers may exist at once (each entity with unfinished
    /// effects gets one while it is active, and each independent effect one of its own).
    /// The others wait on disk, found in lane order by the outbox lane index, so memory
    /// stays flat however many entities have effects pending. Taken in lanes, with the
    /// same reserves as admission (`Low` may not take the last quarter). Default: 1024.
    pub fn effect_lanes_max(mut self, workers: usize) -> Self {
        self.effect_lanes_max = workers;
        self
    }

    /// How many admissions may pass over a waiting lane before its oldest caller is admitted
    /// anyway (promoted), so no lane starves under a flood of higher ones. A lane that keeps
    /// callers waiting is admitted within `admissions + 3` admissions. Default: 16.
    pub fn lane_promote_after(mut self, admissions: u32) -> Self {
        self.config.lane_promote_after = admissions;
        self
    }

    /// The most messages in one group commit. Default: 1024.
    pub fn batch_messages_max(mut self, messages: usize) -> Self {
        self.batch_messages_max = messages;
        self
    }

    /// The storage engine. Default: [`Backend::Sled`]. [`Backend::Fjall`] needs keystead's
    /// `fjall` feature; without it `open` returns [`OpenError::BackendNotBuilt`].
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// When writes are acknowledged: after their flush ([`Durability::Sync`], the default)
    /// or once applied, with a bounded loss window ([`Durability::Relaxed`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The storage engine's cache size in bytes (sled's page cache, fjall's block cache).
    /// Default: 64 MiB.
    pub fn cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// The clock handlers and retention read. Default: [`SystemClock`].
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Log commands and outcomes (payloads) in the outcome event. Default: off, so secrets
    /// in commands and replies stay out of logs.
    pub fn log_payloads(mut self, on: bool) -> Self {
        self.config.log_payloads = on;
        self
    }

    fn validate(&self) -> Result<(), OpenError> {
        let invalid = |setting, reason: &str| {
            Err(OpenError::InvalidConfig {
                setting,
                reason: reason.to_string(),
            })
        };
        if self.shards == 0 || self.shards > 1024 {
            return invalid("shards", "must be between 1 and 1024");
        }
        if self.config.in_flight_max == 0 || self.config.in_flight_max > 1 << 20 {
            return invalid("in_flight_max", "must be between 1 and 1048576");
        }
        if let Some(n) = self.entity_in_flight_max {
            if n == 0 || n > self.config.in_flight_max {
                return invalid(
                    "entity_in_flight_max",
                    "must be between 1 and in_flight_max (one entity's share of its shard)",
                );
            }
        }
        if let Some(name) = self
            .effect_limits
            .keys()
            .find(|name| !self.executors.contains_key(*name))
        {
            return invalid(
                "effect_limits",
                &format!("limits are set for effect type {name:?}, which has no executor; register one with RuntimeBuilder::executor or async_executor"),
            );
        }
        let mut limits: Vec<_> = self.effect_limits.iter().collect();
        limits.sort_by_key(|(name, _)| **name);
        if let Some((name, why)) = limits
            .iter()
            .find_map(|(name, l)| l.invalid().map(|why| (name, why)))
        {
            return invalid("effect_limits", &format!("effect type {name:?} has {why}"));
        }
        if self.effect_lanes_max == 0 || self.effect_lanes_max > 1 << 20 {
            return invalid("effect_lanes_max", "must be between 1 and 1048576");
        }
        if self.outbox_limits.iter().any(|l| l.pending_max() == 0) {
            return invalid(
                "outbox_limits",
                "pending_max must be at least 1 (a lane that can hold no effect would hold back every message that records one)",
            );
        }
        if self.config.lane_promote_after == 0 {
            return invalid(
                "lane_promote_after",
                "must be at least 1 (a lower lane is promoted after this many admissions)",
            );
        }
        if self.batch_messages_max == 0 {
            return invalid("batch_messages_max", "must be at least 1");
        }
        if self.config.message_size_max == 0
            || self.config.message_size_max > crate::core::codec::RECORD_BYTES_MAX / 2
        {
            return invalid(
                "message_size_max",
                "must be between 1 byte and 32 MiB (a stored record is at most 64 MiB)",
            );
        }
        if self.config.passivate_after.is_zero() {
            return invalid("passivate_after", "must be longer than zero");
        }
        if self.config.dedup_retention.is_zero() {
            return invalid("dedup_retention", "must be longer than zero");
        }
        if self.config.dedup_purge_every.is_zero() {
            return invalid("dedup_purge_every", "must be longer than zero");
        }
        if self.cache_bytes < 1 << 20 {
            return invalid("cache_bytes", "must be at least 1 MiB");
        }
        if let Some(every) = self.durability.flush_every() {
            if every < Duration::from_millis(1) || every > Duration::from_secs(60) {
                return invalid(
                    "durability",
                    "Relaxed flush_every must be between 1 ms and 60 s (it is the loss window)",
                );
            }
        }
        if let Err(reason) = self.config.retry.validate() {
            return invalid("retry", &reason);
        }
        if let Err(reason) = self.effect_retry.validate() {
            return invalid("effect_retry", &reason);
        }
        if self.effect_workers == 0 || self.effects_running_max == 0 {
            return invalid(
                "effect_workers",
                "effect_workers and effects_running_max must be at least 1",
            );
        }
        if let Some((name, r)) = self
            .executors
            .iter()
            .find(|(_, r)| !self.registry.contains_key(r.origin))
        {
            return invalid(
                "executor",
                &format!(
                    "effect {name} belongs to entity type {}, which is not registered",
                    r.origin
                ),
            );
        }
        Ok(())
    }

    /// Opens the database (creating it if needed), starts the shards, and starts processing
    /// every message left in the inbox by an earlier run.
    ///
    /// # Errors
    /// [`OpenError`] for an invalid setting, a duplicate entity name, a database held by
    /// another process, an unusable directory, or data in a foreign layout.
    pub fn open(mut self) -> Result<Runtime, OpenError> {
        if let Some(name) = self
            .config
            .feeds
            .iter()
            .find(|n| !self.registry.contains_key(*n))
        {
            self.registry_error.get_or_insert(OpenError::EntityName {
                name: name.to_string(),
                reason: "it publishes to the change feed but is not registered; call register::<..>() too"
                    .into(),
            });
        }
        if let Some(name) = self
            .transactions
            .keys()
            .find(|n| self.registry.contains_key(*n))
        {
            self.registry_error.get_or_insert(OpenError::EntityName {
                name: name.to_string(),
                reason: "a transaction and an entity type share this name; names must differ"
                    .into(),
            });
        }
        if let Some(e) = self.registry_error.take() {
            return Err(e);
        }
        self.validate()?;
        self.config.entity_in_flight_max = self
            .entity_in_flight_max
            .unwrap_or((self.config.in_flight_max / 8).max(1));
        let total_in_flight = self.config.in_flight_max * self.shards;
        let store = Store::open(&StoreConfig {
            path: self.path.clone(),
            cache_bytes: self.cache_bytes,
            batch_messages_max: self.batch_messages_max,
            queue_max: total_in_flight + 1024,
            durability: self.durability,
            backend: self.backend,
        })?;
        let backlog = Backlog::new(self.lane_limits);
        let scan = scan_inbox(&store, &backlog).map_err(|source| OpenError::Store {
            path: self.path.clone(),
            source,
        })?;
        let high_water = store.seq_high_water().map_err(|source| OpenError::Store {
            path: self.path.clone(),
            source,
        })?;
        let seq_start = scan.seq_max.unwrap_or(0).max(high_water).saturating_add(1);
        let store_error = |source| OpenError::Store {
            path: self.path.clone(),
            source,
        };
        let indexed = ensure_lane_index(&store, self.shards).map_err(store_error)?;
        ensure_entity_index(&store).map_err(store_error)?;
        // Delayed messages hold room in their lanes from acceptance.
        let timers = scan_timers(&store, &backlog).map_err(store_error)?;
        let scheduler = Arc::new(Scheduler::load(&store).map_err(store_error)?);
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            clock: self.clock.clone(),
            stats: Stats::default(),
            seq: AtomicU64::new(seq_start),
            backlog,
            outbox: Backlog::new(self.outbox_limits),
            feeds: (0..self.shards).map(|_| Default::default()).collect(),
            inbox_generations: (0..self.shards).map(|_| AtomicU64::new(0)).collect(),
            runtime: Default::default(),
        });
        shared.stats.timers_pending.store(timers, Ordering::Release);
        // Every lane feeder (one per shard and lane, and the effect feeders, one per lane)
        // starts behind: each reads its whole lane once (recovery).
        shared.stats.feeds_behind.store(
            ((self.shards + 1) * Priority::ALL.len()) as u64,
            Ordering::Release,
        );

        let (effects_pending, outbox_indexed) =
            scan_outbox(&store, &shared.outbox).map_err(store_error)?;
        let mut executors = std::mem::take(&mut self.executors);
        for (name, limits) in &self.effect_limits {
            if let Some(registered) = executors.get_mut(name) {
                registered.limits = limits.clone();
            }
        }
        let effects = Effects::start(
            executors,
            store.clone(),
            shared.clone(),
            self.effect_retry,
            self.effect_workers,
            self.effects_running_max,
            self.effect_lanes_max,
        )
        .map_err(|e| OpenError::Threads(e.to_string()))?;
        let gate = GateConfig {
            capacity: self.config.in_flight_max,
            entity_max: self.config.entity_in_flight_max,
            promote_after: self.config.lane_promote_after,
            kind: GateKind::Shard,
        };
        let (system, system_thread, arbiters, addrs) =
            start_system(self.shards, shared.clone(), store.clone(), effects.clone())?;
        let shards = addrs
            .into_iter()
            .map(|addr| ShardRef {
                addr,
                gate: Gate::new(gate, shared.clone()),
                accepting: Arc::new(tokio::sync::Semaphore::new(self.config.in_flight_max)),
                draining: Default::default(),
            })
            .collect();
        let inner = Arc::new(Inner {
            shared: shared.clone(),
            store: store.clone(),
            effects: effects.clone(),
            delayed: Arc::new(Delayed::default()),
            shards,
            registry: self.registry,
            transactions: self.transactions,
            tx_claims: TxClaims::default(),
            closed: AtomicBool::new(false),
            threads: Mutex::new(None),
            path: self.path.clone(),
        });
        let weak: std::sync::Weak<Inner> = Arc::downgrade(&inner);
        let _ = shared.runtime.set(weak);
        let (purge_stop, purge_thread) = start_purge(Arc::downgrade(&inner))?;
        *inner.threads.lock() = Some(Threads {
            system,
            system_thread: Some(system_thread),
            arbiters,
            purge_stop: Some(purge_stop),
            purge_thread: Some(purge_thread),
            time_thread: None,
        });
        let handles: Vec<ArbiterHandle> = inner
            .threads
            .lock()
            .as_ref()
            .map(|t| t.arbiters.iter().map(Arbiter::handle).collect())
            .unwrap_or_default();
        for (shard, handle) in handles.iter().enumerate() {
            if !feeder::start(&inner, shard, handle) {
                return Err(OpenError::Threads(
                    "a shard thread stopped before its lane feeders started".into(),
                ));
            }
        }
        // The timer firer and the scheduler start last: what they fire finds its feeders.
        let time_thread = time::start(Arc::downgrade(&inner), scheduler.clone())?;
        if let Some(threads) = inner.threads.lock().as_mut() {
            threads.time_thread = Some(time_thread);
        }
        tracing::info!(target: "keystead", path = %self.path.display(), shards = self.shards,
            recovered_messages = scan.entries, delayed_messages = timers, lane_index_written = indexed,
            effects_pending, outbox_index_added = outbox_indexed, "runtime open");
        Ok(Runtime { inner, scheduler })
    }
}

pub(crate) struct InboxScan {
    entries: u64,
    seq_max: Option<u64>,
}

/// Counts the inbox (into `backlog`, per lane) and finds its highest sequence.
pub(crate) fn scan_inbox(store: &Store, backlog: &Backlog) -> Result<InboxScan, StoreError> {
    let mut scan = InboxScan {
        entries: 0,
        seq_max: None,
    };
    for entry in store.scan_prefix(&[Space::Inbox as u8])? {
        let (key, value) = entry?;
        scan.entries += 1;
        let Some(parsed) = keys::parse(Space::Inbox, &key) else {
            tracing::error!(target: "keystead", "malformed inbox key skipped at recovery");
            continue;
        };
        if let Some(seq) = keys::inbox_seq(parsed.suffix) {
            scan.seq_max = Some(scan.seq_max.map_or(seq, |m| m.max(seq)));
        }
        let lane = keys::inbox_lane(parsed.suffix).unwrap_or_default();
        backlog.force(lane, value.len() as u64);
    }
    Ok(scan)
}

/// The meta record naming the shard count the lane index was built for.
const LANE_INDEX: &str = "lane_index_shards";

/// Makes sure the lane index covers the inbox, for `shards`: one index entry per inbox
/// entry, under the shard its entity hashes to. Returns how many index entries it wrote
/// (see [`ensure_index`]).
pub(crate) fn ensure_lane_index(store: &Store, shards: usize) -> Result<u64, StoreError> {
    let index = Index {
        marker: LANE_INDEX,
        version: (shards as u16).to_be_bytes().to_vec(),
        space: Space::LaneIndex,
        source: Space::Inbox,
    };
    ensure_index(store, &index, |key| {
        let parsed = keys::parse(Space::Inbox, key)?;
        let seq = keys::inbox_seq(parsed.suffix)?;
        let lane = keys::inbox_lane(parsed.suffix)?;
        Some(keys::lane_index(
            shard_of(parsed.entity, parsed.key, shards),
            lane,
            seq,
        ))
    })
}

/// The meta record that says the listing index covers every stored entity.
pub(crate) const ENTITY_INDEX_MARKER: &str = "entity_index";

/// Builds the listing index (`E`) of a database from before it, once: every state record
/// gets its entry, then the marker is written. A crash before the marker builds it again
/// at the next open (the entries are idempotent). Afterwards each new entity's entry is
/// written in the batch that creates it (`core/apply.rs` `writes`), so it never drifts.
pub(crate) fn ensure_entity_index(store: &Store) -> Result<u64, StoreError> {
    let marker = keys::meta(ENTITY_INDEX_MARKER);
    if store.get(&marker)?.is_some() {
        return Ok(0);
    }
    let mut ops = Chunks::new(store);
    let mut written = 0;
    for entry in store.scan_prefix(&[Space::State as u8])? {
        let (key, _) = entry?;
        if let Some(parsed) = keys::parse(Space::State, &key) {
            ops.push(Op::Put(
                keys::entity_index(parsed.entity, parsed.key),
                Vec::new(),
            ))?;
            written += 1;
        }
    }
    ops.push(Op::Put(marker, b"1".to_vec()))?;
    ops.finish()?;
    if written > 0 {
        tracing::info!(target: "keystead", entities = written, "built the listing index");
    }
    Ok(written)
}

/// An index keyspace whose entries each hold the key of one entry of its source keyspace.
struct Index {
    /// The meta record that says the index was built, and what it holds for it.
    marker: &'static str,
    version: Vec<u8>,
    space: Space,
    source: Space,
}

/// Makes sure `index` covers its source. Built from scratch when its marker is missing or
/// differs (a database from before the index, or another shard count); crash-safe: the
/// marker goes first, the new index after, the marker last. Otherwise reconciled
/// ([`reconcile`]). Returns how many index entries it wrote.
fn ensure_index(
    store: &Store,
    index: &Index,
    entry_of: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Result<u64, StoreError> {
    let marker = keys::meta(index.marker);
    if store.get(&marker)?.as_deref() == Some(index.version.as_slice()) {
        return reconcile(store, index.space, index.source, entry_of);
    }
    tracing::info!(target: "keystead", index = index.marker, "building an index");
    store.write_at_open(vec![Op::Delete(marker.clone())])?;
    let mut ops = Chunks::new(store);
    for entry in store.scan_prefix(&[index.space as u8])? {
        ops.push(Op::Delete(entry?.0))?;
    }
    let mut written = 0;
    for entry in store.scan_prefix(&[index.source as u8])? {
        let (key, _) = entry?;
        if let Some(index_key) = entry_of(&key) {
            ops.push(Op::Put(index_key, key))?;
            written += 1;
        }
    }
    ops.push(Op::Put(marker, index.version.clone()))?;
    ops.finish()?;
    Ok(written)
}

/// Gives every entry of keyspace `source` its index entry in `space` where it has none
/// (work handed straight to a worker is not indexed; a crash leaves it so), and removes
/// index entries whose source entry is gone. Returns how many entries it added.
fn reconcile(
    store: &Store,
    space: Space,
    source: Space,
    entry_of: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Result<u64, StoreError> {
    let mut ops = Chunks::new(store);
    let mut added = 0;
    for entry in store.scan_prefix(&[source as u8])? {
        let (key, _) = entry?;
        let Some(index_key) = entry_of(&key) else {
            continue;
        };
        if store.get(&index_key)?.is_none() {
            ops.push(Op::Put(index_key, key))?;
            added += 1;
        }
    }
    for entry in store.scan_prefix(&[space as u8])? {
        let (index_key, source_key) = entry?;
        if store.get(&source_key)?.is_none() {
            ops.push(Op::Delete(index_key))?;
        }
    }
    ops.finish()?;
    Ok(added)
}

/// Writes at open, a thousand operations at a time.
struct Chunks<'a> {
    store: &'a Store,
    ops: Vec<Op>,
}

impl<'a> Chunks<'a> {
    const SIZE: usize = 1000;

    fn new(store: &'a Store) -> Self {
        Self {
            store,
            ops: Vec::with_capacity(Self::SIZE),
        }
    }

    fn push(&mut self, op: Op) -> Result<(), StoreError> {
        self.ops.push(op);
        if self.ops.len() == Self::SIZE {
            self.store.write_at_open(std::mem::take(&mut self.ops))?;
        }
        Ok(())
    }

    fn finish(self) -> Result<(), StoreError> {
        if self.ops.is_empty() {
            return Ok(());
        }
        self.store.write_at_open(self.ops)
    }
}

/// Counts the outbox into `outbox`, per lane (the lane each effect was recorded in) and in
/// payload bytes, and reconciles the outbox lane index with it ([`reconcile`]): an effect
/// left to a worker that a crash took has no index entry, and an entry `prioritise` moved
/// while its effect finished points at nothing. Returns how many effects are pending and
/// how many index entries were added.
pub(crate) fn scan_outbox(store: &Store, outbox: &Backlog) -> Result<(u64, u64), StoreError> {
    let mut pending = 0;
    for entry in store.scan_prefix(&[Space::Outbox as u8])? {
        let (key, value) = entry?;
        pending += 1;
        let bytes = codec::decode::<EffectRecord>("effect record", &value)
            .map_or(0, |record| record.payload.len() as u64);
        outbox.force_n(effect_lane(Space::Outbox, &key), 1, bytes);
    }
    let added = reconcile(store, Space::OutboxIndex, Space::Outbox, |key| {
        outbox_index_of(effect_lane(Space::Outbox, key), key)
    })?;
    Ok((pending, added))
}

pub(crate) type Started = (
    System,
    thread::JoinHandle<()>,
    Vec<Arbiter>,
    Vec<Addr<Shard>>,
);

pub(crate) fn start_system(
    shards: usize,
    shared: Arc<Shared>,
    store: Arc<Store>,
    effects: Arc<Effects>,
) -> Result<Started, OpenError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = thread::Builder::new()
        .name("keystead-system".into())
        .spawn(move || {
            let runner = System::new();
            let mut arbiters = Vec::with_capacity(shards);
            let mut addrs = Vec::with_capacity(shards);
            for _ in 0..shards {
                let arbiter = Arbiter::new();
                let (shared, store, effects) = (shared.clone(), store.clone(), effects.clone());
                // Build the shard on its own thread and hand its address back only once the
                // mailbox capacity is set: `start_in_arbiter` returns the address before its
                // closure runs, and a burst of sends in that window would park the sender
                // at actix's default capacity and have every later send refused.
                let (addr_tx, addr_rx) = std::sync::mpsc::channel();
                let built = arbiter.spawn_fn(move || {
                    let addr = Shard::create(move |ctx| {
                        // Capacity 0: never park senders; admission tickets bound this mailbox.
                        ctx.set_mailbox_capacity(0);
                        Shard::new(shared, store, effects)
                    });
                    let _ = addr_tx.send(addr);
                });
                let Some(addr) = built.then(|| addr_rx.recv().ok()).flatten() else {
                    tracing::error!(target: "keystead", "a shard thread did not start");
                    return;
                };
                arbiters.push(arbiter);
                addrs.push(addr);
            }
            if tx.send((System::current(), arbiters, addrs)).is_err() {
                return;
            }
            if let Err(e) = runner.run() {
                tracing::error!(target: "keystead", error = %e, "actor system stopped with an error");
            }
        })
        .map_err(|e| OpenError::Threads(e.to_string()))?;
    let (system, arbiters, addrs) = rx
        .recv()
        .map_err(|_| OpenError::Threads("the actor system thread did not start".into()))?;
    Ok((system, handle, arbiters, addrs))
}

/// Why `name` cannot be registered for a `what` of type `want`, if it cannot: its length,
/// or another type of the same kind registered under it (`taken`).
fn name_problem(name: &str, taken: Option<TypeId>, want: TypeId, what: &str) -> Option<String> {
    if name.is_empty() || name.len() > ENTITY_NAME_LEN_MAX {
        return Some(format!("names must be 1 to {ENTITY_NAME_LEN_MAX} bytes"));
    }
    match taken {
        Some(t) if t != want => Some(format!(
            "another {what} is registered under this name; names must be unique"
        )),
        _ => None,
    }
}
