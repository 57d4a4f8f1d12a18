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

#[cfg(feature = "fjall")]
mod fjall_engine;
mod sled_engine;

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::durability::Durability;
use crate::error::{OpenError, StoreError};
use crate::keys;
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

/// A stored key and its value.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// One write in a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Insert or overwrite.
    Put(Vec<u8>, Vec<u8>),
    /// Remove (a missing key is fine).
    Delete(Vec<u8>),
}

struct Commit {
    ops: Vec<Op>,
    /// The highest inbox/outbox sequence these ops use (0: none); see `SEQ_HIGH_WATER`.
    seq: u64,
    done: oneshot::Sender<Result<(), StoreError>>,
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
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// The file that records which engine created a directory.
const BACKEND_FILE: &str = "keystead.backend";

/// Checks that `path` was created by `backend` (or is new), and records it if not yet
/// recorded, so a directory is never opened by the wrong engine by accident.
fn claim_directory(path: &std::path::Path, backend: Backend) -> Result<(), OpenError> {
    let io_error = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let marker = path.join(BACKEND_FILE);
    let found = match fs::read_to_string(&marker) {
        Ok(found) => Some(found.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // No record: data from before the record existed, or a fresh directory. sled
            // keeps a `conf` file; fjall a `lock` file and a `journals` directory.
            if path.join("conf").exists() {
                Some(Backend::Sled.name().to_string())
            } else if path.join("journals").exists() || path.join("lock").exists() {
                Some(Backend::Fjall.name().to_string())
            } else {
                None
            }
        }
        Err(e) => return Err(io_error(e)),
    };
    match found {
        Some(found) if found != backend.name() => Err(OpenError::WrongBackend {
            path: path.to_path_buf(),
            found,
            requested: backend.name(),
        }),
        Some(_) if marker.exists() => Ok(()),
        _ => {
            let file = fs::File::create(&marker).map_err(io_error)?;
            std::io::Write::write_all(&mut &file, format!("{}\n", backend.name()).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io_error)
        }
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
        claim_directory(&path, config.backend)?;
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

        let (tx, rx) = bounded::<Commit>(config.queue_max);
        let poisoned = Arc::new(Mutex::new(None));
        let counters = Arc::new(StoreCounters::default());
        let mut threads = Vec::new();
        // Relaxed mode: a flusher thread, woken by the committer after each batch.
        let flusher = match config.durability.flush_every() {
            None => None,
            Some(every) => {
                let (dirty_tx, dirty_rx) = bounded::<Dirty>(1);
                let (db, poisoned, counters) = (engine.clone(), poisoned.clone(), counters.clone());
                threads.push(
                    thread::Builder::new()
                        .name("keystead-flusher".into())
                        .spawn(move || {
                            run_flusher(db.as_ref(), &dirty_rx, every, &poisoned, &counters);
                        })
                        .map_err(|e| OpenError::Threads(e.to_string()))?,
                );
                Some(dirty_tx)
            }
        };
        let committer = {
            let (db, poisoned, counters) = (engine.clone(), poisoned.clone(), counters.clone());
            let (batch_max, durability) = (config.batch_messages_max, config.durability);
            thread::Builder::new()
                .name("keystead-committer".into())
                .spawn(move || {
                    let sink = Sink {
                        flusher: flusher.as_ref(),
                        poisoned: &poisoned,
                        counters: &counters,
                    };
                    run_committer(db.as_ref(), &rx, batch_max, durability, &sink);
                })
                .map_err(|e| OpenError::Threads(e.to_string()))?
        };
        // The committer goes first in the list: it must stop (closing the flusher's
        // channel) before the flusher is joined.
        threads.insert(0, committer);
        Ok(Arc::new(Store {
            engine,
            commits: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            poisoned,
            counters,
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
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.engine.get(key)
    }

    /// The first record whose key starts with `prefix`, in key order.
    pub(crate) fn first_with_prefix(&self, prefix: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.engine.scan_prefix(prefix)?.next().transpose()
    }

    /// Every record whose key starts with `prefix`, in key order. Reads lazily.
    pub(crate) fn scan_prefix(&self, prefix: &[u8]) -> Result<Scan, StoreError> {
        self.engine.scan_prefix(prefix)
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
        if let Some(first_error) = &poisoned {
            tracing::error!(target: "keystead", %first_error,
                "storage failed: the database stays locked until this process exits; fix the disk and restart the process");
        }
        self.engine.close(poisoned.is_some());
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// A batch was applied since the last flush (relaxed mode: the flusher's wake-up call).
struct Dirty;

fn release(waiters: Vec<oneshot::Sender<Result<(), StoreError>>>, result: &Result<(), StoreError>) {
    for done in waiters {
        // A caller that went away (its runtime dropped) no longer needs the answer.
        let _ = done.send(match result {
            Ok(()) => Ok(()),
            Err(e) => Err(e.duplicate()),
        });
    }
}

fn poison(poisoned: &Mutex<Option<String>>, error: &StoreError) {
    tracing::error!(target: "keystead", %error, "commit failed; the store stops writing until reopened");
    let mut first = poisoned.lock();
    if first.is_none() {
        *first = Some(error.to_string());
    }
}

/// Makes everything applied so far durable, unless the store is poisoned.
fn flush(
    engine: &dyn Engine,
    poisoned: &Mutex<Option<String>>,
    counters: &StoreCounters,
) -> Result<(), StoreError> {
    if let Some(first_error) = poisoned.lock().clone() {
        return Err(StoreError::Poisoned { first_error });
    }
    counters.flushes.fetch_add(1, Ordering::Relaxed);
    engine.flush().inspect_err(|error| poison(poisoned, error))
}

/// Where the committer's results go.
struct Sink<'a> {
    /// Relaxed mode only: wakes the flusher.
    flusher: Option<&'a Sender<Dirty>>,
    poisoned: &'a Mutex<Option<String>>,
    counters: &'a StoreCounters,
}

/// Applies queued commits in batches, one `apply_batch` each. In [`Durability::Sync`] mode
/// it flushes each batch before releasing its callers; commits that arrive meanwhile form
/// the next batch, so batches grow with load and a lone commit goes at once.
///
/// Measured on the 2-core machine: this inline flush beat a pipeline that applied the next
/// batch on this thread while another thread flushed the previous one, 35,000 against
/// 16,000 asks/s with 64 senders. The pipeline applied smaller batches (4 commits instead
/// of 30) and paid a thread wake-up per batch. See `docs/performance.md`.
fn run_committer(
    engine: &dyn Engine,
    rx: &Receiver<Commit>,
    batch_max: usize,
    durability: Durability,
    sink: &Sink<'_>,
) {
    let Sink {
        flusher,
        poisoned,
        counters,
    } = *sink;
    let high_water_key = keys::meta(SEQ_HIGH_WATER);
    let mut high_water = engine
        .get(&high_water_key)
        .ok()
        .flatten()
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes);
    while let Ok(first) = rx.recv() {
        if let Some(first_error) = poisoned.lock().clone() {
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
        if let Err(error) = engine.apply(batch) {
            poison(poisoned, &error);
            release(waiters, &Err(error));
            continue;
        }
        high_water = high_water.max(batch_seq);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters
            .commits
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        match (durability, flusher) {
            (Durability::Relaxed { .. }, Some(flusher)) => {
                release(waiters, &Ok(()));
                // A full channel means a wake-up is already pending; it covers this batch.
                let _ = flusher.try_send(Dirty);
            }
            _ => release(waiters, &flush(engine, poisoned, counters)),
        }
    }
}

/// Relaxed mode: flushes at most every `every` while batches are being applied, and once
/// more when the committer stops.
fn run_flusher(
    engine: &dyn Engine,
    rx: &Receiver<Dirty>,
    every: Duration,
    poisoned: &Mutex<Option<String>>,
    counters: &StoreCounters,
) {
    let mut dirty = false;
    let mut last_flush = Instant::now();
    loop {
        match rx.recv_timeout(every.saturating_sub(last_flush.elapsed())) {
            Ok(Dirty) => dirty = true,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                if dirty {
                    let _ = flush(engine, poisoned, counters);
                }
                return;
            }
        }
        if dirty && last_flush.elapsed() >= every {
            let _ = flush(engine, poisoned, counters);
            dirty = false;
            last_flush = Instant::now();
        }
    }
}
