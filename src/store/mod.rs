//! The storage boundary. The runtime, the effects and the admin queries reach storage only
//! through [`Store`]: point reads, ordered prefix scans, a compare-and-remove, and atomic
//! writes of many records ([`Op`] lists) made durable by group commit. [`Engine`] is the
//! few operations a storage engine must provide; `sled_engine` and `fjall_engine` are the
//! only modules that name an engine's types.
//!
//! Reads go straight to the engine from the calling thread. Writes are handed to
//! [`Store::commit`]; one committer thread applies every queued list in one atomic batch,
//! flushes, and only then completes each caller's future. A lone commit is applied at once;
//! batches form only under load.

mod directory;
#[cfg(feature = "fjall")]
mod fjall_engine;
mod sled_engine;

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use crate::backend::Backend;
use crate::core::keys;
pub(crate) use crate::core::ops::Op;
use crate::durability::Durability;
use crate::error::{OpenError, StoreError};
use crate::telemetry::StoreCounters;

use sled_engine::SledEngine;

/// A lazily read run of records.
pub(crate) type Scan = Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + 'static>;

/// What the runtime needs from a storage engine, and no more. Keys are ordered bytes; the
/// runtime's keyspaces (`keys.rs`) are prefixes of one ordered keyspace.
pub(crate) trait Engine: Send + Sync + 'static {
    /// The layout marker stored under the meta key `layout`: the engine and its format.
    fn layout(&self) -> &'static str;
    /// Reads one value.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// True if the engine holds anything at all (checked before the layout marker exists).
    fn has_foreign_data(&self) -> bool;
    /// Every record whose key starts with `prefix`, in key order, read lazily.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Scan, StoreError>;
    /// Every record whose key starts with `prefix` and is at least `start`, in key order.
    fn scan_from(&self, prefix: &[u8], start: &[u8]) -> Result<Scan, StoreError>;
    /// Removes `key` only if it still holds `expected`; true when removed.
    fn remove_if_unchanged(&self, key: &[u8], expected: &[u8]) -> Result<bool, StoreError>;
    /// Writes every op atomically: after a crash, all of them or none.
    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError>;
    /// Makes everything applied so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Releases the engine (later calls fail with `StoreError::Closed`). A `poisoned` engine
    /// is neither flushed nor dropped (see `StoreError::Poisoned`).
    fn close(&self, poisoned: bool);
}

/// The meta record holding the highest sequence ever committed. Inbox, outbox and effect
/// history keys embed a sequence that must never be reused for the same entity (a reused
/// outbox key would overwrite a pending effect). Each batch that uses sequences raises this
/// mark in the same atomic write, and `open` starts the counter above it.
const SEQ_HIGH_WATER: &str = "seq_high_water";

/// The meta record holding the last change feed sequence given (kept when the feed itself
/// is purged, so sequences never go back).
const FEED_HIGH_WATER: &str = "feed_high_water";

/// The end of the change feed, as the committer advances it.
#[derive(Debug, Default)]
pub(crate) struct FeedTail {
    /// The last feed sequence applied (and, in sync mode, flushed).
    pub last: AtomicU64,
    /// Woken after every batch that appended to the feed.
    pub appended: tokio::sync::Notify,
    /// Records up to this sequence are purged: scans start after it (an LSM engine keeps
    /// the deleted ones as tombstones for a while).
    pub purged_to: AtomicU64,
}

/// A stored key and its value.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// A waiting commit's answer: the number of the batch that applied it.
type Done = oneshot::Sender<Result<u64, StoreError>>;

struct Commit {
    ops: Vec<Op>,
    /// The highest inbox/outbox sequence these ops use (0: none); see `SEQ_HIGH_WATER`.
    seq: u64,
    done: Done,
}

/// How far the committer has got, in batch numbers (1, 2, ...), so that a reader can wait
/// until what it read is durable.
///
/// The committer applies a batch, then flushes it (`Durability::Sync`; in relaxed mode the
/// flusher flushes later), so a read that goes straight to the engine can see a write that
/// a crash then takes back. A reader that must not show such a write reads `begun` after
/// its read: every batch it could have seen had begun by then (the committer raises
/// `begun` before applying), so once `durable` reaches that number, everything it read is
/// durable.
#[derive(Debug)]
struct Marks {
    /// The last batch the committer has started to apply.
    begun: AtomicU64,
    /// The last batch whose apply has returned: what a flush started now covers.
    applied: AtomicU64,
    /// The last batch known durable. Waiters are woken on every change, and once more when
    /// the store is poisoned or closed.
    durable: watch::Sender<u64>,
    /// Set when the store is closed: no batch will become durable any more.
    closed: AtomicBool,
}

impl Marks {
    fn new() -> Self {
        Self {
            begun: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            durable: watch::Sender::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Records that every batch up to `batch` is durable.
    fn made_durable(&self, batch: u64) {
        self.durable.send_if_modified(|durable| {
            let raised = batch > *durable;
            if raised {
                *durable = batch;
            }
            raised
        });
    }

    /// Wakes every waiter to look again (after a poisoning or the close).
    fn wake_all(&self) {
        self.durable.send_modify(|_| {});
    }
}

/// Settings for the store.
#[derive(Debug, Clone)]
pub(crate) struct StoreConfig {
    pub path: PathBuf,
    pub cache_bytes: u64,
    pub batch_messages_max: usize,
    pub queue_max: usize,
    pub durability: Durability,
    pub backend: Backend,
}

/// The open database and its committer.
pub(crate) struct Store {
    /// The engine, shared with the committer thread.
    engine: Arc<dyn Engine>,
    commits: Mutex<Option<Sender<Commit>>>,
    /// The committer thread, and in relaxed mode the flusher thread.
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
    /// The first commit failure, once there has been one. From then on nothing is written
    /// or flushed (see `StoreError::Poisoned`).
    poisoned: Arc<Mutex<Option<String>>>,
    pub(crate) counters: Arc<StoreCounters>,
    /// The end of the change feed.
    pub(crate) feed: Arc<FeedTail>,
    /// Which batches are durable; see [`Marks`].
    marks: Arc<Marks>,
    /// Relaxed mode acknowledges before the flush; reads then show what was acknowledged.
    relaxed: bool,
    /// The directory's lock, released after the engine is closed.
    lock: Mutex<Option<directory::DirectoryLock>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `config.path` and starts the committer.
    ///
    /// # Errors
    /// [`OpenError::Locked`] when another process or runtime holds the database,
    /// [`OpenError::Io`] for an unusable directory, [`OpenError::Layout`] for foreign data.
    pub(crate) fn open(config: &StoreConfig) -> Result<Arc<Store>, OpenError> {
        let path = config.path.clone();
        fs::create_dir_all(&path).map_err(|source| OpenError::Io {
            path: path.clone(),
            source,
        })?;
        // The lock comes first: a second opener must see `Locked`, never a directory that
        // this one is still creating.
        let lock = directory::lock(&path)?;
        #[cfg(not(feature = "fjall"))]
        if config.backend == Backend::Fjall {
            return Err(OpenError::BackendNotBuilt {
                backend: "fjall",
                feature: "fjall",
            });
        }
        let claim = directory::claim(&path, config.backend)?;
        let engine: Arc<dyn Engine> = match config.backend {
            Backend::Sled => Arc::new(SledEngine::open(&path, config.cache_bytes)?),
            #[cfg(feature = "fjall")]
            Backend::Fjall => Arc::new(fjall_engine::FjallEngine::open(&path, config.cache_bytes)?),
            #[cfg(not(feature = "fjall"))]
            Backend::Fjall => {
                return Err(OpenError::BackendNotBuilt {
                    backend: "fjall",
                    feature: "fjall",
                })
            }
        };
        Self::check_layout(engine.as_ref(), &path)?;
        if claim == directory::Claim::Creating {
            directory::finish_creation(&path, config.backend)?;
        }
        Self::start(engine, config, Some(lock))
    }

    /// Starts the committer (and in relaxed mode the flusher) on an open engine.
    fn start(
        engine: Arc<dyn Engine>,
        config: &StoreConfig,
        lock: Option<directory::DirectoryLock>,
    ) -> Result<Arc<Store>, OpenError> {
        let (tx, rx) = bounded::<Commit>(config.queue_max);
        let poisoned = Arc::new(Mutex::new(None));
        let marks = Arc::new(Marks::new());
        let counters = Arc::new(StoreCounters::default());
        let feed = Arc::new(FeedTail::default());
        let mut threads = Vec::new();
        // Relaxed mode: a flusher thread, woken by the committer after each batch.
        let flusher = match config.durability.flush_every() {
            None => None,
            Some(every) => {
                let (dirty_tx, dirty_rx) = bounded::<Dirty>(1);
                let sink = Sink {
                    flusher: None,
                    poisoned: poisoned.clone(),
                    counters: counters.clone(),
                    marks: marks.clone(),
                    feed: feed.clone(),
                };
                let db = engine.clone();
                threads.push(
                    thread::Builder::new()
                        .name("keystead-flusher".into())
                        .spawn(move || run_flusher(db.as_ref(), &dirty_rx, every, &sink))
                        .map_err(|e| OpenError::Threads(e.to_string()))?,
                );
                Some(dirty_tx)
            }
        };
        let committer = {
            let sink = Sink {
                flusher,
                poisoned: poisoned.clone(),
                counters: counters.clone(),
                marks: marks.clone(),
                feed: feed.clone(),
            };
            let db = engine.clone();
            let batch_max = config.batch_messages_max;
            thread::Builder::new()
                .name("keystead-committer".into())
                .spawn(move || run_committer(db.as_ref(), &rx, batch_max, &sink))
                .map_err(|e| OpenError::Threads(e.to_string()))?
        };
        // The committer goes first in the list: it must stop (closing the flusher's
        // channel) before the flusher is joined.
        threads.insert(0, committer);
        Ok(Arc::new(Store {
            feed,
            engine,
            commits: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            poisoned,
            counters,
            marks,
            relaxed: config.durability.flush_every().is_some(),
            lock: Mutex::new(lock),
        }))
    }

    fn check_layout(engine: &dyn Engine, path: &std::path::Path) -> Result<(), OpenError> {
        let store_err = |source| OpenError::Store {
            path: path.to_path_buf(),
            source,
        };
        let marker = keys::meta("layout");
        let expected = engine.layout();
        match engine.get(&marker).map_err(store_err)? {
            Some(found) if found == expected.as_bytes() => Ok(()),
            Some(found) => Err(OpenError::Layout {
                path: path.to_path_buf(),
                found: String::from_utf8_lossy(&found).into_owned(),
                expected: expected.into(),
            }),
            None => {
                if engine.has_foreign_data() {
                    return Err(OpenError::Layout {
                        path: path.to_path_buf(),
                        found: "unmarked data".into(),
                        expected: expected.into(),
                    });
                }
                engine
                    .apply(vec![Op::Put(marker, expected.as_bytes().to_vec())])
                    .map_err(store_err)?;
                engine.flush().map_err(store_err)
            }
        }
    }

    /// The highest sequence any committed batch used (0 for a new database).
    pub(crate) fn seq_high_water(&self) -> Result<u64, StoreError> {
        Ok(self
            .get(&keys::meta(SEQ_HIGH_WATER))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Reads one value.
    ///
    /// An I/O error poisons the store, as a failed commit does: the engine cannot be trusted
    /// to flush any more (seen: sled reads failing with "no space left" on a full disk, after
    /// which its flush never returns).
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.engine.get(key).inspect_err(|e| self.poison_on_io(e))
    }

    /// The first record whose key starts with `prefix`, in key order.
    pub(crate) fn first_with_prefix(&self, prefix: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.scan_prefix(prefix)?.next().transpose()
    }

    /// Every record whose key starts with `prefix`, in key order. Reads lazily. I/O errors
    /// poison the store (see [`Store::get`]).
    pub(crate) fn scan_prefix(&self, prefix: &[u8]) -> Result<Scan, StoreError> {
        let scan = self
            .engine
            .scan_prefix(prefix)
            .inspect_err(|e| self.poison_on_io(e))?;
        let (poisoned, marks) = (self.poisoned.clone(), self.marks.clone());
        Ok(Box::new(scan.inspect(move |entry| {
            if let Err(error @ StoreError::Io { .. }) = entry {
                poison(&poisoned, &marks, error);
            }
        })))
    }

    /// Writes `ops` atomically and flushes them, straight to the engine. Only for `open`,
    /// before anything else can commit (the runtime uses it to rebuild its lane index).
    pub(crate) fn write_at_open(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        self.engine
            .apply(ops)
            .inspect_err(|e| self.poison_on_io(e))?;
        self.engine.flush().inspect_err(|e| self.poison_on_io(e))
    }

    /// Like [`Store::scan_prefix`], from key `start` on (the lane feeders' cursors).
    pub(crate) fn scan_from(&self, prefix: &[u8], start: &[u8]) -> Result<Scan, StoreError> {
        let scan = self
            .engine
            .scan_from(prefix, start)
            .inspect_err(|e| self.poison_on_io(e))?;
        let (poisoned, marks) = (self.poisoned.clone(), self.marks.clone());
        Ok(Box::new(scan.inspect(move |entry| {
            if let Err(error @ StoreError::Io { .. }) = entry {
                poison(&poisoned, &marks, error);
            }
        })))
    }

    fn poison_on_io(&self, error: &StoreError) {
        if matches!(error, StoreError::Io { .. }) {
            poison(&self.poisoned, &self.marks, error);
        }
    }

    /// Removes `key` only if it still holds `expected`; true when removed. Used by the dedup
    /// purge so that a record rewritten since it was read is never removed.
    pub(crate) fn remove_if_unchanged(
        &self,
        key: &[u8],
        expected: &[u8],
    ) -> Result<bool, StoreError> {
        self.engine.remove_if_unchanged(key, expected)
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        match self.poisoned.lock().as_ref() {
            Some(first_error) => Err(StoreError::Poisoned {
                first_error: first_error.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Queues `ops` for the next group commit. The returned future completes once they are
    /// applied atomically and flushed. Never blocks the calling thread.
    pub(crate) fn commit(
        &self,
        ops: Vec<Op>,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        self.commit_with_seq(ops, 0)
    }

    /// Like [`Store::commit`], for ops whose keys use sequence numbers up to `seq`: the
    /// batch also raises the durable high-water mark to at least `seq`.
    pub(crate) fn commit_with_seq(
        &self,
        ops: Vec<Op>,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let batch = self.commit_batch(ops, seq);
        async move { batch.await.map(|_| ()) }
    }

    /// Like [`Store::commit`], but completes only once the ops are durable in every
    /// durability mode (in relaxed mode `commit` completes once they are applied). An effect
    /// starts only after such a commit, so no effect of a change that a crash takes back
    /// ever runs.
    pub(crate) fn commit_durable(
        &self,
        ops: Vec<Op>,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let batch = self.commit_batch(ops, 0);
        let durable = self.durable_waiter();
        async move { durable.wait(batch.await?).await }
    }

    /// Waits until everything a read made before this call could have seen is durable, so
    /// that what the caller shows or acts on cannot be taken back by a crash. In relaxed
    /// mode it returns at once: reads there show what was acknowledged, and a crash can take
    /// back the same loss window as the acknowledgements.
    ///
    /// Usually immediate; otherwise it waits for the flush under way (batches of other
    /// entities can be applied but not yet flushed).
    ///
    /// # Errors
    /// [`StoreError::Poisoned`] when the store stopped writing before that flush, so the
    /// read may show writes that were never made durable; [`StoreError::Closed`] likewise
    /// for a store closed meanwhile.
    pub(crate) fn reads_durable(
        &self,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let mark = self.marks.begun.load(Ordering::SeqCst);
        let ready = self.relaxed || *self.marks.durable.borrow() >= mark;
        let durable = (!ready).then(|| self.durable_waiter());
        async move {
            match durable {
                None => Ok(()),
                Some(durable) => durable.wait(mark).await,
            }
        }
    }

    /// True when everything any read so far could have seen is durable (relaxed mode: always),
    /// so an answer built from reads needs no [`Store::reads_durable`] wait.
    pub(crate) fn reads_are_durable(&self) -> bool {
        self.relaxed || *self.marks.durable.borrow() >= self.marks.begun.load(Ordering::SeqCst)
    }

    fn durable_waiter(&self) -> DurableWaiter {
        DurableWaiter {
            durable: self.marks.durable.subscribe(),
            marks: self.marks.clone(),
            poisoned: self.poisoned.clone(),
        }
    }

    fn commit_batch(
        &self,
        ops: Vec<Op>,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<u64, StoreError>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        let queued = self
            .check_poisoned()
            .and_then(|()| match self.commits.lock().as_ref() {
                None => Err(StoreError::Closed),
                Some(tx) => match tx.try_send(Commit { ops, seq, done }) {
                    Ok(()) => Ok(()),
                    Err(TrySendError::Full(_)) => Err(StoreError::Busy),
                    Err(TrySendError::Disconnected(_)) => Err(StoreError::Closed),
                },
            });
        async move {
            queued?;
            rx.await.unwrap_or(Err(StoreError::Closed))
        }
    }

    /// Stops accepting commits, lets the committer finish what is queued, joins it, flushes
    /// and releases the database. Later calls on this store fail with `StoreError::Closed`.
    pub(crate) fn close(&self) {
        drop(self.commits.lock().take());
        // The committer exits once its queue is drained, which closes the flusher's queue;
        // the flusher then flushes what is left and exits.
        for handle in std::mem::take(&mut *self.threads.lock()) {
            if handle.join().is_err() {
                tracing::error!(target: "keystead", "a storage thread panicked");
            }
        }
        let poisoned = self.poisoned.lock().clone();
        self.marks.closed.store(true, Ordering::SeqCst);
        self.marks.wake_all();
        if let Some(first_error) = &poisoned {
            tracing::error!(target: "keystead", %first_error,
                "storage failed: the database stays locked until this process exits; fix the disk and restart the process");
        }
        self.engine.close(poisoned.is_some());
        drop(self.lock.lock().take());
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// A batch was applied since the last flush (relaxed mode: the flusher's wake-up call).
struct Dirty;

fn release(waiters: Vec<Done>, result: &Result<u64, StoreError>) {
    for done in waiters {
        // A caller that went away (its runtime dropped) no longer needs the answer.
        let _ = done.send(match result {
            Ok(batch) => Ok(*batch),
            Err(e) => Err(e.duplicate()),
        });
    }
}

/// Waits for a batch to become durable (see [`Marks`]).
struct DurableWaiter {
    durable: watch::Receiver<u64>,
    marks: Arc<Marks>,
    poisoned: Arc<Mutex<Option<String>>>,
}

impl DurableWaiter {
    /// Completes once batch `batch` is durable.
    ///
    /// # Errors
    /// [`StoreError::Poisoned`] or [`StoreError::Closed`] once it never will be.
    async fn wait(mut self, batch: u64) -> Result<(), StoreError> {
        let (marks, poisoned) = (&self.marks, &self.poisoned);
        let ended = |durable: &u64| {
            *durable >= batch || poisoned.lock().is_some() || marks.closed.load(Ordering::SeqCst)
        };
        // The sender lives in `marks`, which this waiter holds: it cannot be dropped.
        let durable = self.durable.wait_for(ended).await.map_or(0, |d| *d);
        if durable >= batch {
            return Ok(());
        }
        match self.poisoned.lock().clone() {
            Some(first_error) => Err(StoreError::Poisoned { first_error }),
            None => Err(StoreError::Closed),
        }
    }
}

/// Where the committer's and the flusher's results go.
struct Sink {
    /// Relaxed mode, committer only: wakes the flusher.
    flusher: Option<Sender<Dirty>>,
    poisoned: Arc<Mutex<Option<String>>>,
    counters: Arc<StoreCounters>,
    marks: Arc<Marks>,
    feed: Arc<FeedTail>,
}

/// Records the first storage failure: from then on the store writes and flushes nothing
/// (see `StoreError::Poisoned`), and waiters for durability are told so.
fn poison(poisoned: &Mutex<Option<String>>, marks: &Marks, error: &StoreError) {
    tracing::error!(target: "keystead", %error, "storage failed; the store stops writing until reopened");
    {
        let mut first = poisoned.lock();
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }
    marks.wake_all();
}

impl Sink {
    fn poison(&self, error: &StoreError) {
        poison(&self.poisoned, &self.marks, error);
    }

    fn poisoned(&self) -> Option<String> {
        self.poisoned.lock().clone()
    }

    /// Makes every batch applied so far durable, unless the store is poisoned.
    fn flush(&self, engine: &dyn Engine) -> Result<(), StoreError> {
        if let Some(first_error) = self.poisoned() {
            return Err(StoreError::Poisoned { first_error });
        }
        // Everything applied before the flush starts is covered by it.
        let covered = self.marks.applied.load(Ordering::SeqCst);
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        engine.flush().inspect_err(|error| self.poison(error))?;
        self.marks.made_durable(covered);
        Ok(())
    }
}

/// Applies queued commits in batches, one `apply_batch` each. In [`Durability::Sync`] mode
/// it flushes each batch before releasing its callers; commits that arrive meanwhile form
/// the next batch, so batches grow with load and a lone commit goes at once.
///
/// Measured on the 2-core machine: this inline flush beat a pipeline that applied the next
/// batch on this thread while another thread flushed the previous one, 35,000 against
/// 16,000 asks/s with 64 senders. The pipeline applied smaller batches (4 commits instead
/// of 30) and paid a thread wake-up per batch. See `docs/performance.md`.
fn run_committer(engine: &dyn Engine, rx: &Receiver<Commit>, batch_max: usize, sink: &Sink) {
    let high_water_key = keys::meta(SEQ_HIGH_WATER);
    let read_u64 = |key: &[u8]| {
        engine
            .get(key)
            .ok()
            .flatten()
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes)
    };
    let mut high_water = read_u64(&high_water_key);
    let feed_key = keys::meta(FEED_HIGH_WATER);
    let mut feed_seq = read_u64(&feed_key);
    sink.feed.last.store(feed_seq, Ordering::SeqCst);
    while let Ok(first) = rx.recv() {
        if let Some(first_error) = sink.poisoned() {
            // Refuse without touching the engine: after an I/O error sled cannot be trusted
            // to flush, and a stuck flush holds sled's process-wide lock.
            let _ = first.done.send(Err(StoreError::Poisoned { first_error }));
            continue;
        }
        let mut waiters = Vec::with_capacity(batch_max.min(64));
        let mut batch: Vec<Op> = Vec::new();
        let mut next = Some(first);
        let mut batch_seq = 0;
        while let Some(commit) = next.take() {
            batch_seq = batch_seq.max(commit.seq);
            batch.extend(commit.ops);
            waiters.push(commit.done);
            if waiters.len() < batch_max {
                next = rx.try_recv().ok();
            }
        }
        if batch_seq > high_water {
            batch.push(Op::Put(
                high_water_key.clone(),
                batch_seq.to_be_bytes().to_vec(),
            ));
        }
        // Change feed records take their sequences here, in commit order, so a reader at
        // any position never sees a later record before an earlier one. A batch's records
        // go into one *segment*, keyed by its last sequence: one more key per batch, not
        // per change (a key costs the engine far more than its bytes).
        let feed_before = feed_seq;
        if batch.iter().any(|op| matches!(op, Op::Append(_))) {
            let mut records = Vec::new();
            batch.retain_mut(|op| match op {
                Op::Append(record) => {
                    records.push(std::mem::take(record));
                    false
                }
                _ => true,
            });
            feed_seq += records.len() as u64;
            match crate::core::codec::encode(&records) {
                Ok(segment) => {
                    batch.push(Op::Put(keys::feed(feed_seq), segment));
                    batch.push(Op::Put(feed_key.clone(), feed_seq.to_be_bytes().to_vec()));
                }
                Err(reason) => {
                    let error = StoreError::Corrupt {
                        op: "encode a change feed segment",
                        detail: reason,
                    };
                    sink.poison(&error);
                    release(waiters, &Err(error));
                    continue;
                }
            }
        }
        // Raised before the apply: a reader that sees any of this batch sees this number.
        let number = sink.marks.begun.fetch_add(1, Ordering::SeqCst) + 1;
        if let Err(error) = engine.apply(batch) {
            sink.poison(&error);
            release(waiters, &Err(error));
            continue;
        }
        sink.marks.applied.store(number, Ordering::SeqCst);
        high_water = high_water.max(batch_seq);
        let appended = feed_seq > feed_before;
        sink.counters.batches.fetch_add(1, Ordering::Relaxed);
        sink.counters
            .commits
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        // The feed's end moves before the callers are released, so whoever learns of a
        // change from its caller finds it in the feed.
        let feed_moved = || {
            if appended {
                sink.feed.last.store(feed_seq, Ordering::SeqCst);
                sink.feed.appended.notify_waiters();
            }
        };
        match &sink.flusher {
            Some(flusher) => {
                feed_moved();
                release(waiters, &Ok(number));
                // A full channel means a wake-up is already pending; it covers this batch.
                let _ = flusher.try_send(Dirty);
            }
            None => {
                let flushed = sink.flush(engine).map(|()| number);
                if flushed.is_ok() {
                    feed_moved();
                }
                release(waiters, &flushed);
            }
        }
    }
}

/// Relaxed mode: flushes at most every `every` while batches are being applied, and once
/// more when the committer stops.
fn run_flusher(engine: &dyn Engine, rx: &Receiver<Dirty>, every: Duration, sink: &Sink) {
    let mut dirty = false;
    let mut last_flush = Instant::now();
    loop {
        match rx.recv_timeout(every.saturating_sub(last_flush.elapsed())) {
            Ok(Dirty) => dirty = true,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                if dirty {
                    let _ = sink.flush(engine);
                }
                return;
            }
        }
        if dirty && last_flush.elapsed() >= every {
            let _ = sink.flush(engine);
            dirty = false;
            last_flush = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    //! Goal: a read never shows, and a durable commit never completes on, a write that is
    //! applied but not yet flushed. Method: a real engine whose flush waits for the test's
    //! word, so the window between apply and flush stays open as long as the test needs.

    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// A real engine whose `flush` blocks until the test sends `true` (flush) or `false`
    /// (fail, as a full disk does); `apply` reports each batch applied.
    struct GatedFlush {
        inner: Box<dyn Engine>,
        gate: Receiver<bool>,
        applied: Sender<()>,
    }

    impl Engine for GatedFlush {
        fn layout(&self) -> &'static str {
            self.inner.layout()
        }
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn has_foreign_data(&self) -> bool {
            self.inner.has_foreign_data()
        }
        fn scan_prefix(&self, prefix: &[u8]) -> Result<Scan, StoreError> {
            self.inner.scan_prefix(prefix)
        }
        fn scan_from(&self, prefix: &[u8], start: &[u8]) -> Result<Scan, StoreError> {
            self.inner.scan_from(prefix, start)
        }
        fn remove_if_unchanged(&self, key: &[u8], expected: &[u8]) -> Result<bool, StoreError> {
            self.inner.remove_if_unchanged(key, expected)
        }
        fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
            self.inner.apply(ops)?;
            let _ = self.applied.send(());
            Ok(())
        }
        fn flush(&self) -> Result<(), StoreError> {
            match self.gate.recv() {
                Ok(true) => self.inner.flush(),
                _ => Err(StoreError::Io {
                    op: "flush",
                    source: std::io::Error::other("the test failed this flush"),
                }),
            }
        }
        fn close(&self, poisoned: bool) {
            self.inner.close(poisoned);
        }
    }

    /// The gate is declared first so that it drops first: a test that fails with a flush
    /// still waiting lets the committer go (its flush fails) and the store close.
    struct Gated {
        gate: Sender<bool>,
        store: Arc<Store>,
        applied: Receiver<()>,
        _dir: tempfile::TempDir,
    }

    fn engines() -> Vec<Backend> {
        Backend::available().to_vec()
    }

    fn gated(backend: Backend, durability: Durability) -> Gated {
        let dir = tempfile::tempdir().expect("temporary directory");
        let inner: Box<dyn Engine> = match backend {
            Backend::Sled => Box::new(SledEngine::open(dir.path(), 1 << 20).expect("sled")),
            #[cfg(feature = "fjall")]
            Backend::Fjall => {
                Box::new(fjall_engine::FjallEngine::open(dir.path(), 1 << 20).expect("fjall"))
            }
            #[cfg(not(feature = "fjall"))]
            Backend::Fjall => unreachable!("not in Backend::available()"),
        };
        let (gate, gate_rx) = bounded(16);
        let (applied_tx, applied) = bounded(16);
        let engine = Arc::new(GatedFlush {
            inner,
            gate: gate_rx,
            applied: applied_tx,
        });
        let config = StoreConfig {
            path: dir.path().to_path_buf(),
            cache_bytes: 1 << 20,
            batch_messages_max: 64,
            queue_max: 64,
            durability,
            backend,
        };
        Gated {
            gate,
            store: Store::start(engine, &config, None).expect("store"),
            applied,
            _dir: dir,
        }
    }

    /// Polls once: `Some` if the future is already complete.
    fn poll_now<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
        match std::pin::Pin::new(future).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_read_waits_until_what_it_saw_is_durable() {
        for backend in engines() {
            let g = gated(backend, Durability::Sync);
            let mut commit = Box::pin(g.store.commit(vec![Op::Put(b"k".to_vec(), b"v".to_vec())]));
            assert!(poll_now(&mut commit).is_none(), "{backend:?}");
            g.applied.recv().expect("the batch is applied");
            // The engine shows the write already; the flush has not happened.
            assert_eq!(g.store.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
            assert!(!g.store.reads_are_durable(), "{backend:?}");
            let mut read = Box::pin(g.store.reads_durable());
            assert!(
                poll_now(&mut read).is_none(),
                "{backend:?}: a read of an unflushed write must wait for its flush"
            );
            g.gate.send(true).unwrap();
            read.await.expect("durable once flushed");
            commit.await.expect("committed");
            assert!(g.store.reads_are_durable(), "{backend:?}");
            // Nothing in flight: a read is durable at once.
            assert!(poll_now(&mut Box::pin(g.store.reads_durable())).is_some());
            g.store.close();
        }
    }

    #[tokio::test]
    async fn a_read_of_a_write_whose_flush_failed_is_refused() {
        for backend in engines() {
            let g = gated(backend, Durability::Sync);
            let commit = g.store.commit(vec![Op::Put(b"k".to_vec(), b"v".to_vec())]);
            let committing = tokio::spawn(commit);
            g.applied.recv().expect("the batch is applied");
            let read = g.store.reads_durable();
            g.gate.send(false).unwrap();
            assert!(committing.await.unwrap().is_err(), "{backend:?}");
            match read.await {
                Err(StoreError::Poisoned { first_error }) => {
                    assert!(
                        first_error.contains("the test failed this flush"),
                        "{first_error}"
                    );
                }
                other => panic!("{backend:?}: expected Poisoned, got {other:?}"),
            }
            g.store.close();
        }
    }

    #[tokio::test]
    async fn relaxed_reads_show_what_was_acknowledged_but_a_durable_commit_waits() {
        for backend in engines() {
            let g = gated(
                backend,
                Durability::Relaxed {
                    flush_every: Duration::from_millis(1),
                },
            );
            g.store
                .commit(vec![Op::Put(b"a".to_vec(), b"1".to_vec())])
                .await
                .expect("acknowledged once applied");
            g.applied.recv().unwrap();
            assert!(poll_now(&mut Box::pin(g.store.reads_durable())).is_some());
            let mut durable = Box::pin(
                g.store
                    .commit_durable(vec![Op::Put(b"b".to_vec(), b"2".to_vec())]),
            );
            g.applied.recv().unwrap();
            assert!(
                poll_now(&mut durable).is_none(),
                "{backend:?}: a durable commit must wait for the flush"
            );
            // Let the flusher's flushes through (one may have started before `b` was
            // applied and cover only `a`; spare openings are never used).
            for _ in 0..8 {
                g.gate.send(true).unwrap();
            }
            durable.await.expect("durable");
            g.store.close();
        }
    }
}

/// The first key after every key that starts with `prefix` (`None` when there is none:
/// the prefix is empty or all `0xFF`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod prefix_end_tests {
    use super::prefix_end;

    #[test]
    fn the_end_of_a_prefix_is_past_all_its_keys_and_before_the_next() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF, 0xFF]), None);
        assert_eq!(prefix_end(b""), None);
        let end = prefix_end(&[7, 0xFF]).unwrap();
        assert!([7u8, 0xFF, 0xFF, 0xFF].as_slice() < end.as_slice());
        assert!(end.as_slice() <= [8u8].as_slice());
    }
}
