//! The sled engine: the only module that names sled types.
//!
//! One sled database with one tree, opened without sled's periodic flusher (the committer
//! flushes), after removing the partial snapshot files a kill inside `open` can leave.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::{Engine, Entry, Op, Scan};
use crate::error::{OpenError, StoreError};

/// The layout marker this engine writes and reads.
pub(crate) const LAYOUT: &str = "keystead-sled-1";

pub(crate) struct SledEngine {
    path: PathBuf,
    /// `None` once closed: dropping the last `Db` handle releases sled's file lock.
    db: RwLock<Option<sled::Db>>,
}

fn store_error(op: &'static str, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(source) => StoreError::Io { op, source },
        sled::Error::Corruption { at, .. } => StoreError::Corrupt {
            op,
            detail: format!("at {at:?}"),
        },
        other => StoreError::Io {
            op,
            source: io::Error::other(other.to_string()),
        },
    }
}

/// Removes the `snap.*.generating` files a kill inside `sled::Db::open` can leave behind.
/// sled would otherwise read such a half-written file as the newest snapshot and refuse to
/// open ever again (upstream sled #1527); the log it was generated from is still intact.
fn remove_partial_snapshots(path: &Path) -> Result<usize, OpenError> {
    let io_error = |path: &Path, source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(io_error(path, source)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|source| io_error(path, source))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            fs::remove_file(entry.path()).map_err(|source| io_error(&entry.path(), source))?;
            tracing::warn!(file = %name, "removed a partial sled snapshot left by an interrupted open");
            removed += 1;
        }
    }
    Ok(removed)
}

impl SledEngine {
    /// Opens (creating if needed) the sled database at `path`.
    ///
    /// # Errors
    /// [`OpenError::Locked`] when another process or runtime holds it, [`OpenError::Io`] for
    /// an unusable directory, [`OpenError::Store`] for what sled reports.
    pub(crate) fn open(path: &Path, cache_bytes: u64) -> Result<Self, OpenError> {
        remove_partial_snapshots(path)?;
        // No background flusher: the committer flushes, and sled's periodic flusher competes
        // for sled's process-wide lock (after an I/O error it can wedge every sled database
        // in the process).
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    OpenError::Locked {
                        path: path.to_path_buf(),
                        detail: io.to_string(),
                    }
                }
                sled::Error::Io(source) => OpenError::Io {
                    path: path.to_path_buf(),
                    source,
                },
                other => OpenError::Store {
                    path: path.to_path_buf(),
                    source: store_error("open", other),
                },
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
        })
    }

    fn db(&self) -> Result<sled::Db, StoreError> {
        self.db.read().clone().ok_or(StoreError::Closed)
    }
}

impl Engine for SledEngine {
    fn layout(&self) -> &'static str {
        LAYOUT
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db()?
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| store_error("read", e))
    }

    fn has_foreign_data(&self) -> bool {
        self.db()
            .map(|db| db.iter().next().is_some() || db.tree_names().len() > 1)
            .unwrap_or(false)
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> Result<Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + 'static>, StoreError>
    {
        Ok(Box::new(self.db()?.scan_prefix(prefix).map(|r| {
            r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| store_error("scan", e))
        })))
    }

    fn scan_from(&self, prefix: &[u8], start: &[u8]) -> Result<Scan, StoreError> {
        let prefix = prefix.to_vec();
        let db = self.db()?;
        let range = match super::prefix_end(&prefix) {
            Some(end) => db.range(start.to_vec()..end),
            None => db.range(start.to_vec()..),
        };
        Ok(Box::new(
            range
                .map(|r| {
                    r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(|e| store_error("scan", e))
                })
                .take_while(move |r| r.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix))),
        ))
    }

    fn remove_if_unchanged(&self, key: &[u8], expected: &[u8]) -> Result<bool, StoreError> {
        match self
            .db()?
            .compare_and_swap(key, Some(expected), None as Option<&[u8]>)
        {
            Ok(Ok(())) => Ok(true),
            Ok(Err(_)) => Ok(false),
            Err(e) => Err(store_error("purge", e)),
        }
    }

    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                Op::Put(k, v) => batch.insert(k, v),
                Op::Delete(k) => batch.remove(k),
                // Turned into a `Put` by the committer before it reaches an engine.
                Op::Append(_) => {}
            }
        }
        self.db()?
            .apply_batch(batch)
            .map_err(|e| store_error("commit", e))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db()?
            .flush()
            .map(|_| ())
            .map_err(|e| store_error("flush", e))
    }

    fn close(&self, poisoned: bool) {
        let Some(db) = self.db.write().take() else {
            return;
        };
        if poisoned {
            // sled 0.34 flushes when its last handle drops, and after some I/O errors (a full
            // disk) that flush waits forever while holding sled's process-wide lock, which
            // would stall every other sled database in the process. So a poisoned database is
            // never dropped: its memory and file lock are released when the process exits.
            std::mem::forget(db);
            return;
        }
        if let Err(e) = db.flush() {
            tracing::error!(target: "keystead", error = %e, "final flush failed");
        }
        drop(db);
        wait_for_release(&self.path, Duration::from_secs(10));
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
