//! The storage boundary: one sled database, one tree, and one committer thread that turns
//! many callers' writes into one atomic, flushed `apply_batch` (group commit).
//!
//! Reads go straight to sled from the calling thread (they are served from sled's cache and
//! never wait on the disk lock). Writes are [`Op`] lists handed to [`Store::commit`]; the
//! committer applies every queued list in one batch, flushes, and only then completes each
//! caller's future. A lone commit is applied at once; batches form only under load.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::durability::Durability;
use crate::error::{OpenError, StoreError};
use crate::keys;
use crate::telemetry::StoreCounters;

/// The layout marker this release writes and reads.
pub(crate) const LAYOUT: &str = "keystead-sled-1";

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
}

/// The open database and its committer.
pub(crate) struct Store {
    path: PathBuf,
    /// `None` once closed: dropping the last `Db` handle releases sled's file lock, so a
    /// closed runtime's directory can be opened again at once.
    db: RwLock<Option<sled::Db>>,
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

/// Removes the `snap.*.generating` files a kill inside `sled::Db::open` can leave behind.
/// sled would otherwise read such a half-written file as the newest snapshot and refuse to
/// open ever again (upstream sled #1527); the log it was generated from is still intact.
fn remove_partial_snapshots(path: &Path) -> Result<usize, OpenError> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(OpenError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            fs::remove_file(entry.path()).map_err(|source| OpenError::Io {
                path: entry.path(),
                source,
            })?;
            tracing::warn!(file = %name, "removed a partial sled snapshot left by an interrupted open");
            removed += 1;
        }
    }
    Ok(removed)
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
        remove_partial_snapshots(&path)?;
        // No background flusher: the committer flushes after every batch, and sled's
        // periodic flusher competes for sled's process-wide lock (after an I/O error it can
        // wedge every sled database in the process).
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(config.cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    OpenError::Locked {
                        path: path.clone(),
                        detail: io.to_string(),
                    }
                }
                sled::Error::Io(source) => OpenError::Io {
                    path: path.clone(),
                    source,
                },
                other => OpenError::Store {
                    path: path.clone(),
                    source: StoreError::from_sled("open", other),
                },
            })?;
        Self::check_layout(&db, &path)?;

        let (tx, rx) = bounded::<Commit>(config.queue_max);
        let poisoned = Arc::new(Mutex::new(None));
        let counters = Arc::new(StoreCounters::default());
        let mut threads = Vec::new();
        // Relaxed mode: a flusher thread, woken by the committer after each batch.
        let flusher = match config.durability.flush_every() {
            None => None,
            Some(every) => {
                let (dirty_tx, dirty_rx) = bounded::<Dirty>(1);
                let (db, poisoned, counters) = (db.clone(), poisoned.clone(), counters.clone());
                threads.push(
                    thread::Builder::new()
                        .name("keystead-flusher".into())
                        .spawn(move || run_flusher(&db, &dirty_rx, every, &poisoned, &counters))
                        .map_err(|e| OpenError::Threads(e.to_string()))?,
                );
                Some(dirty_tx)
            }
        };
        let committer = {
            let (db, poisoned, counters) = (db.clone(), poisoned.clone(), counters.clone());
            let (batch_max, durability) = (config.batch_messages_max, config.durability);
            thread::Builder::new()
                .name("keystead-committer".into())
                .spawn(move || {
                    let sink = Sink {
                        flusher: flusher.as_ref(),
                        poisoned: &poisoned,
                        counters: &counters,
                    };
                    run_committer(&db, &rx, batch_max, durability, &sink);
                })
                .map_err(|e| OpenError::Threads(e.to_string()))?
        };
        // The committer goes first in the list: it must stop (closing the flusher's
        // channel) before the flusher is joined.
        threads.insert(0, committer);
        Ok(Arc::new(Store {
            path: path.clone(),
            db: RwLock::new(Some(db)),
            commits: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            poisoned,
            counters,
        }))
    }

    fn check_layout(db: &sled::Db, path: &Path) -> Result<(), OpenError> {
        let store_err = |source| OpenError::Store {
            path: path.to_path_buf(),
            source,
        };
        let marker = keys::meta("layout");
        match db
            .get(&marker)
            .map_err(|e| store_err(StoreError::from_sled("open", e)))?
        {
            Some(found) if found.as_ref() == LAYOUT.as_bytes() => Ok(()),
            Some(found) => Err(OpenError::Layout {
                path: path.to_path_buf(),
                found: String::from_utf8_lossy(&found).into_owned(),
                expected: LAYOUT.into(),
            }),
            None => {
                let has_data = db.iter().next().is_some() || db.tree_names().len() > 1;
                if has_data {
                    return Err(OpenError::Layout {
                        path: path.to_path_buf(),
                        found: "unmarked data".into(),
                        expected: LAYOUT.into(),
                    });
                }
                db.insert(&marker, LAYOUT.as_bytes())
                    .map_err(|e| store_err(StoreError::from_sled("open", e)))?;
                db.flush()
                    .map_err(|e| store_err(StoreError::from_sled("open", e)))?;
                Ok(())
            }
        }
    }

    fn db(&self) -> Result<sled::Db, StoreError> {
        self.db.read().clone().ok_or(StoreError::Closed)
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
        self.db()?
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| StoreError::from_sled("read", e))
    }

    /// The first record whose key starts with `prefix`, in key order.
    pub(crate) fn first_with_prefix(&self, prefix: &[u8]) -> Result<Option<Entry>, StoreError> {
        match self.db()?.scan_prefix(prefix).next() {
            None => Ok(None),
            Some(Ok((k, v))) => Ok(Some((k.to_vec(), v.to_vec()))),
            Some(Err(e)) => Err(StoreError::from_sled("scan", e)),
        }
    }

    /// Every record whose key starts with `prefix`, in key order. Reads lazily.
    pub(crate) fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> Result<impl Iterator<Item = Result<Entry, StoreError>>, StoreError> {
        Ok(self.db()?.scan_prefix(prefix).map(|r| {
            r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| StoreError::from_sled("scan", e))
        }))
    }

    /// Removes `key` only if it still holds `expected`; true when removed. Used by the dedup
    /// purge so that a record rewritten since it was read is never removed.
    pub(crate) fn remove_if_unchanged(
        &self,
        key: &[u8],
        expected: &[u8],
    ) -> Result<bool, StoreError> {
        match self
            .db()?
            .compare_and_swap(key, Some(expected), None as Option<&[u8]>)
        {
            Ok(Ok(())) => Ok(true),
            Ok(Err(_)) => Ok(false),
            Err(e) => Err(StoreError::from_sled("purge", e)),
        }
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
        let db = self.db.write().take();
        if let Some(first_error) = self.poisoned.lock().as_ref() {
            // sled 0.34 flushes when its last handle drops, and after some I/O errors (a full
            // disk) that flush waits forever while holding sled's process-wide lock, which
            // would stall every other sled database in the process. So a poisoned database is
            // never dropped: its memory and file lock are released when the process exits.
            tracing::error!(target: "keystead", %first_error,
                "storage failed: the database stays locked until this process exits; fix the disk and restart the process");
            std::mem::forget(db);
            return;
        }
        if let Some(db) = db {
            if let Err(e) = db.flush() {
                tracing::error!(target: "keystead", error = %e, "final flush failed");
            }
            drop(db);
            wait_for_release(&self.path, Duration::from_secs(10));
        }
    }
}

/// Waits until sled's file lock on `path` is free, at most `deadline`.
///
/// sled releases its lock when the last handle to its file closes, and one of its I/O pool
/// jobs can still hold that handle for a moment after the `Db` is dropped. Closing a runtime
/// promises that its directory can be opened again at once, so closing waits on the lock
/// itself (taking and releasing the same `flock` sled takes) rather than on a guessed delay.
pub(crate) fn wait_for_release(path: &Path, deadline: Duration) -> bool {
    let lock_file = path.join("db");
    let started = Instant::now();
    loop {
        match fs::File::open(&lock_file).map(|f| f.try_lock()) {
            // No file: nothing holds it. Lock taken: it was free (dropping `f` releases it).
            Err(_) | Ok(Ok(())) => return true,
            Ok(Err(_)) if started.elapsed() >= deadline => {
                tracing::warn!(target: "keystead", path = %path.display(),
                    "the database lock was not released in time; another process may hold it");
                return false;
            }
            Ok(Err(_)) => thread::sleep(Duration::from_millis(1)),
        }
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
    db: &sled::Db,
    poisoned: &Mutex<Option<String>>,
    counters: &StoreCounters,
) -> Result<(), StoreError> {
    if let Some(first_error) = poisoned.lock().clone() {
        return Err(StoreError::Poisoned { first_error });
    }
    counters.flushes.fetch_add(1, Ordering::Relaxed);
    db.flush().map(|_| ()).map_err(|e| {
        let error = StoreError::from_sled("flush", e);
        poison(poisoned, &error);
        error
    })
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
    db: &sled::Db,
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
    let mut high_water = db
        .get(&high_water_key)
        .ok()
        .flatten()
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    while let Ok(first) = rx.recv() {
        if let Some(first_error) = poisoned.lock().clone() {
            // Refuse without touching sled: after an I/O error it cannot be trusted to
            // flush, and a stuck flush holds sled's process-wide lock.
            let _ = first.done.send(Err(StoreError::Poisoned { first_error }));
            continue;
        }
        let mut waiters = Vec::with_capacity(batch_max.min(64));
        let mut batch = sled::Batch::default();
        let mut next = Some(first);
        let mut batch_seq = 0;
        while let Some(commit) = next.take() {
            batch_seq = batch_seq.max(commit.seq);
            for op in commit.ops {
                match op {
                    Op::Put(k, v) => batch.insert(k, v),
                    Op::Delete(k) => batch.remove(k),
                }
            }
            waiters.push(commit.done);
            if waiters.len() < batch_max {
                next = rx.try_recv().ok();
            }
        }
        if batch_seq > high_water {
            batch.insert(high_water_key.clone(), &batch_seq.to_be_bytes());
        }
        if let Err(e) = db.apply_batch(batch) {
            let error = StoreError::from_sled("commit", e);
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
            _ => release(waiters, &flush(db, poisoned, counters)),
        }
    }
}

/// Relaxed mode: flushes at most every `every` while batches are being applied, and once
/// more when the committer stops.
fn run_flusher(
    db: &sled::Db,
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
                    let _ = flush(db, poisoned, counters);
                }
                return;
            }
        }
        if dirty && last_flush.elapsed() >= every {
            let _ = flush(db, poisoned, counters);
            dirty = false;
            last_flush = Instant::now();
        }
    }
}
