//! The runtime: opening the store, starting the shards, recovering the inbox, admitting
//! messages, and shutting down.

//! Layers, lowest first (each imports only those above it in this list):
//! - [`shared`]: settings, clock, counters, tickets, the key rule;
//! - [`mail`]: the messages between the parts;
//! - [`actor`]: one entity's home;
//! - [`supervisor`]: one shard, which starts and routes to its entities' actors;
//! - [`inner`]: the shards, the registry, the store and the effect workers together;
//! - [`address`]: typed entity addresses;
//! - this module: the builder and the `Runtime` handle.

pub(crate) mod actor;
pub(crate) mod address;
pub(crate) mod inner;
pub(crate) mod mail;
pub(crate) mod shared;
pub(crate) mod supervisor;

pub(crate) use inner::Inner;
use inner::{wake, Registration, ShardRef, Threads};
pub(crate) use shared::{check_key, Config, Shared};

use std::any::TypeId;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::Duration;

use actix::prelude::*;
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::backend::Backend;
use crate::clock::{Clock, SystemClock};
use crate::core::codec;
use crate::core::keys::{self, Space, ENTITY_NAME_LEN_MAX};
use crate::core::records::DedupStamp;
use crate::dead_letter::DeadLetter;
use crate::durability::Durability;
use crate::effects::{self, AsyncExecutor, Effect, EffectInfo, EffectKey, Effects, Executor};
use crate::entity::Entity;
use crate::error::{AdminError, OpenError, StoreError, SubmitError};
use crate::retry::RetryPolicy;
use crate::runtime::address::EntityRef;
use crate::runtime::supervisor::Shard;
use crate::store::{Store, StoreConfig};
use crate::telemetry::{RuntimeStats, Stats};

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
    registry_error: Option<OpenError>,
    executors: HashMap<&'static str, effects::Registered>,
    effect_retry: RetryPolicy,
    effect_workers: usize,
    effects_running_max: usize,
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
                log_payloads: false,
            },
            clock: Arc::new(SystemClock),
            cache_bytes: 64 << 20,
            batch_messages_max: 1024,
            durability: Durability::Sync,
            backend: Backend::Sled,
            registry: HashMap::new(),
            registry_error: None,
            executors: HashMap::new(),
            effect_retry: RetryPolicy::default(),
            effect_workers: 2,
            effects_running_max: 64,
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
        let problem = if name.is_empty() || name.len() > ENTITY_NAME_LEN_MAX {
            Some(format!("names must be 1 to {ENTITY_NAME_LEN_MAX} bytes"))
        } else {
            match self.registry.get(name) {
                Some(r) if r.type_id != TypeId::of::<E>() => Some(
                    "another entity type is registered under this name; names must be unique"
                        .into(),
                ),
                _ => None,
            }
        };
        if let Some(reason) = problem {
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
            },
        );
        self
    }

    /// The number of shards (actix Arbiters, one thread each). Default: the number of
    /// available cores.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
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

    /// How many messages one shard admits at once; further callers wait. Default: 1024.
    pub fn in_flight_max(mut self, messages: usize) -> Self {
        self.config.in_flight_max = messages;
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
        if let Some(e) = self.registry_error.take() {
            return Err(e);
        }
        self.validate()?;
        let total_in_flight = self.config.in_flight_max * self.shards;
        let store = Store::open(&StoreConfig {
            path: self.path.clone(),
            cache_bytes: self.cache_bytes,
            batch_messages_max: self.batch_messages_max,
            queue_max: total_in_flight + 1024,
            durability: self.durability,
            backend: self.backend,
        })?;
        let scan = scan_inbox(&store).map_err(|source| OpenError::Store {
            path: self.path.clone(),
            source,
        })?;
        let high_water = store.seq_high_water().map_err(|source| OpenError::Store {
            path: self.path.clone(),
            source,
        })?;
        let seq_start = scan.seq_max.unwrap_or(0).max(high_water).saturating_add(1);
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            clock: self.clock.clone(),
            stats: Stats::default(),
            seq: AtomicU64::new(seq_start),
        });
        shared
            .stats
            .inbox_pending
            .store(scan.entries, Ordering::Release);

        let outbox = scan_outbox(&store).map_err(|source| OpenError::Store {
            path: self.path.clone(),
            source,
        })?;
        let effects = Effects::start(
            std::mem::take(&mut self.executors),
            store.clone(),
            shared.clone(),
            self.effect_retry,
            self.effect_workers,
            self.effects_running_max,
        )
        .map_err(|e| OpenError::Threads(e.to_string()))?;
        let (system, system_thread, arbiters, addrs) =
            start_system(self.shards, shared.clone(), store.clone(), effects.clone())?;
        let shards = addrs
            .into_iter()
            .map(|addr| ShardRef {
                addr,
                permits: Arc::new(Semaphore::new(self.config.in_flight_max)),
            })
            .collect();
        let inner = Arc::new(Inner {
            shared: shared.clone(),
            store: store.clone(),
            effects: effects.clone(),
            shards,
            registry: self.registry,
            closed: AtomicBool::new(false),
            threads: Mutex::new(None),
            path: self.path.clone(),
        });
        let (purge_stop, purge_thread) = start_purge(Arc::downgrade(&inner))?;
        *inner.threads.lock() = Some(Threads {
            system,
            system_thread: Some(system_thread),
            arbiters,
            purge_stop: Some(purge_stop),
            purge_thread: Some(purge_thread),
        });
        let weak = Arc::downgrade(&inner);
        effects.bind(Arc::new(move |entity, key| {
            let weak = weak.clone();
            Box::pin(async move {
                match weak.upgrade() {
                    Some(inner) => inner.wake_entity(&entity, &key).await,
                    None => false,
                }
            })
        }));
        start_recovery(&inner, scan.entities);
        for (entity, key) in &outbox {
            effects.wake(entity, key, true);
        }
        tracing::info!(target: "keystead", path = %self.path.display(), shards = self.shards,
            recovered_messages = scan.entries, effect_lanes_resumed = outbox.len(), "runtime open");
        Ok(Runtime { inner })
    }
}

struct InboxScan {
    entries: u64,
    seq_max: Option<u64>,
    entities: Vec<(String, String)>,
}

/// Counts the inbox, finds its highest sequence and the entities that have entries.
fn scan_inbox(store: &Store) -> Result<InboxScan, StoreError> {
    let mut scan = InboxScan {
        entries: 0,
        seq_max: None,
        entities: Vec::new(),
    };
    for entry in store.scan_prefix(&[Space::Inbox as u8])? {
        let (key, _) = entry?;
        scan.entries += 1;
        let Some(parsed) = keys::parse(Space::Inbox, &key) else {
            tracing::error!(target: "keystead", "malformed inbox key skipped at recovery");
            continue;
        };
        if let Some(seq) = keys::inbox_seq(parsed.suffix) {
            scan.seq_max = Some(scan.seq_max.map_or(seq, |m| m.max(seq)));
        }
        let is_new = scan
            .entities
            .last()
            .is_none_or(|(e, k)| e != parsed.entity || k != parsed.key);
        if is_new {
            scan.entities
                .push((parsed.entity.to_string(), parsed.key.to_string()));
        }
    }
    Ok(scan)
}

/// The entities that have unfinished effects, in key order.
fn scan_outbox(store: &Store) -> Result<Vec<(String, String)>, StoreError> {
    let mut entities: Vec<(String, String)> = Vec::new();
    for entry in store.scan_prefix(&[Space::Outbox as u8])? {
        let (key, _) = entry?;
        let Some(parsed) = keys::parse(Space::Outbox, &key) else {
            continue;
        };
        let is_new = entities
            .last()
            .is_none_or(|(e, k)| e != parsed.entity || k != parsed.key);
        if is_new {
            entities.push((parsed.entity.to_string(), parsed.key.to_string()));
        }
    }
    Ok(entities)
}

type Started = (
    System,
    thread::JoinHandle<()>,
    Vec<Arbiter>,
    Vec<Addr<Shard>>,
);

fn start_system(
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

/// Clears the "recovering" flag however recovery ends (done, runtime closed, or dropped).
struct RecoveryDone(Weak<Inner>);

impl Drop for RecoveryDone {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner
                .shared
                .stats
                .recovering
                .store(false, Ordering::Release);
            inner.shared.stats.notify();
        }
    }
}

/// Wakes every entity that has inbox entries, in the background, taking tickets like any
/// caller (so recovery of a large inbox is bounded in memory too).
fn start_recovery(inner: &Arc<Inner>, entities: Vec<(String, String)>) {
    if entities.is_empty() {
        return;
    }
    inner.shared.stats.recovering.store(true, Ordering::Release);
    let weak = Arc::downgrade(inner);
    let done = RecoveryDone(weak.clone());
    let recovery = async move {
        let _done = done;
        for (entity, key) in entities {
            let Some(inner) = weak.upgrade() else { return };
            if !inner.wake_entity(&entity, &key).await {
                return;
            }
        }
    };
    // Run on a shard's arbiter: recovery only awaits tickets, it never blocks the thread.
    let threads = inner.threads.lock();
    let spawned = threads
        .as_ref()
        .and_then(|t| t.arbiters.first())
        .is_some_and(|arbiter| arbiter.spawn(recovery));
    if !spawned {
        tracing::error!(target: "keystead", "could not start inbox recovery; reopen the runtime");
    }
}

fn start_purge(inner: Weak<Inner>) -> Result<(Sender<()>, thread::JoinHandle<()>), OpenError> {
    let (stop, stopped) = bounded::<()>(0);
    let every = inner.upgrade().map_or(Duration::from_secs(3600), |i| {
        i.shared.config.dedup_purge_every
    });
    let handle = thread::Builder::new()
        .name("keystead-dedup-purge".into())
        .spawn(move || loop {
            // The channel is a timer that shutdown can interrupt; it never carries a value.
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let Some(inner) = inner.upgrade() else { return };
            match purge_expired(&inner) {
                Ok(removed) => tracing::debug!(target: "keystead", removed, "dedup purge"),
                Err(e) => {
                    tracing::warn!(target: "keystead", error = %e, "dedup purge failed; will retry")
                }
            }
        })
        .map_err(|e| OpenError::Threads(e.to_string()))?;
    Ok((stop, handle))
}

/// Removes dedup records strictly older than the retention window; never one inside it,
/// and never one rewritten since it was read.
fn purge_expired(inner: &Inner) -> Result<u64, StoreError> {
    let now = inner.shared.clock.now_ms();
    let retention_ms =
        u64::try_from(inner.shared.config.dedup_retention.as_millis()).unwrap_or(u64::MAX);
    let mut removed = 0;
    for entry in inner.store.scan_prefix(&[Space::Dedup as u8])? {
        let (key, value) = entry?;
        let stamp = value
            .split_first()
            .filter(|(version, _)| **version == codec::FORMAT_VERSION)
            .and_then(|(_, body)| {
                bincode::serde::decode_from_slice::<DedupStamp, _>(
                    body,
                    bincode::config::standard(),
                )
                .ok()
            });
        let Some((stamp, _)) = stamp else {
            tracing::warn!(target: "keystead", "undecodable dedup record kept by the purge");
            continue;
        };
        let age_ms = now.saturating_sub(stamp.recorded_at_ms);
        if age_ms > retention_ms && inner.store.remove_if_unchanged(&key, &value)? {
            removed += 1;
        }
    }
    // Finished effects (done or failed) leave the history after the same window; dead
    // letters stay until an operator requeues or inspects them.
    for entry in inner.store.scan_prefix(&[Space::EffectHistory as u8])? {
        let (key, value) = entry?;
        let Ok(record) = codec::decode::<effects::EffectRecord>("effect record", &value) else {
            continue;
        };
        let finished = matches!(
            record.info.status,
            effects::EffectStatus::Done | effects::EffectStatus::Failed
        );
        let age_ms = now.saturating_sub(record.info.updated_at_ms);
        if finished && age_ms > retention_ms && inner.store.remove_if_unchanged(&key, &value)? {
            removed += 1;
        }
    }
    Ok(removed)
}

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
    inner: Arc<Inner>,
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
    /// A builder for a runtime whose database lives in directory `path`.
    pub fn builder(path: impl AsRef<Path>) -> RuntimeBuilder {
        RuntimeBuilder::new(path.as_ref().to_path_buf())
    }

    /// A typed address of entity `key` of type `E`. Cheap; creates nothing until a message
    /// is sent. Only `E`'s commands can be sent through it.
    pub fn entity<E: Entity>(&self, key: impl Into<String>) -> EntityRef<E> {
        EntityRef::new(Arc::downgrade(&self.inner), key.into())
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

    /// A snapshot of the counters.
    pub fn stats(&self) -> RuntimeStats {
        let mut stats = self.inner.shared.stats.snapshot();
        let store = &self.inner.store.counters;
        stats.commits = store.commits.load(Ordering::Relaxed);
        stats.commit_batches = store.batches.load(Ordering::Relaxed);
        stats.flushes = store.flushes.load(Ordering::Relaxed);
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
    /// been handed to its entities, and no effect is being performed or waiting to retry. Messages that cannot be processed now (an unregistered
    /// type, an undecodable state) stay in the inbox and do not hold this up.
    pub async fn idle(&self) {
        let stats = &self.inner.shared.stats;
        self.wait_until(|s| {
            s.in_flight == 0 && s.effect_lanes == 0 && !stats.recovering.load(Ordering::Acquire)
        })
        .await;
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
        if !self.inner.registered::<E>() {
            return Err(AdminError::NotRegistered { entity: E::NAME });
        }
        let mut prefix = vec![Space::DeadLetter as u8, E::NAME.len() as u8];
        prefix.extend_from_slice(E::NAME.as_bytes());
        let mut letters = Vec::new();
        for entry in self.inner.store.scan_prefix(&prefix)? {
            let (key, value) = entry?;
            letters.push(DeadLetter::<E>::from_stored(&key, &value)?);
        }
        self.inner.store.reads_durable().await?;
        Ok(letters)
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
        check_key(E::NAME, key).map_err(|e| match e {
            SubmitError::InvalidKey { entity, reason } => AdminError::InvalidKey { entity, reason },
            _ => AdminError::Closed,
        })?;
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
    /// [`AdminError::Closed`] after shutdown; [`AdminError::Storage`] if the store fails.
    pub async fn requeue_effect(&self, key: &EffectKey) -> Result<bool, AdminError> {
        if self.inner.is_closed() {
            return Err(AdminError::Closed);
        }
        Ok(self.inner.effects.requeue(key).await?)
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
        for shard in &self.inner.shards {
            shard.permits.close();
        }
        let stats = &self.inner.shared.stats;
        self.wait_until(|s| s.in_flight == 0 && !stats.recovering.load(Ordering::Acquire))
            .await;
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
