//! The fjall engine (feature `fjall`): the only module that names fjall types.
//!
//! One fjall database with one keyspace. `apply` is one atomic write batch; `flush` is
//! `persist(SyncData)`, an `fdatasync` of the journal, which also survives a power loss on
//! a drive that honours it (sled's flush does not, see `docs/architecture.md`).

use std::io;
use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::{Mutex, RwLock};

use super::{Engine, Op, Scan};
use crate::error::{OpenError, StoreError};

/// The layout marker this engine writes and reads.
pub(crate) const LAYOUT: &str = "keystead-fjall-1";

/// The one keyspace keystead uses; its own keyspaces are key prefixes inside it.
const KEYSPACE: &str = "keystead";

/// The memtable size at which fjall seals the memtable, writes it out as a table and lets
/// its journal go. Every open replays the journal written since: with fjall's default
/// (64 MiB) a directory with 300,000 entities held a 97 MB journal that was never rotated
/// and took a second to reopen (issue 10). fjall records this setting when the keyspace is
/// created, so directories created before keep the default.
const MEMTABLE_BYTES_MAX: u64 = 16 << 20;

pub(crate) struct FjallEngine {
    /// `None` once closed.
    open: RwLock<Option<(Database, Keyspace)>>,
    /// Held by `apply` and `remove_if_unchanged`, which fjall has no compare-and-swap for:
    /// the purge's read-compare-remove must not interleave with a commit.
    writes: Mutex<()>,
}

fn store_error(op: &'static str, e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Io(source) => StoreError::Io { op, source },
        fjall::Error::Poisoned => StoreError::Io {
            op,
            source: io::Error::other("fjall refuses writes after an earlier I/O failure"),
        },
        other => StoreError::Corrupt {
            op,
            detail: format!("{other:?}"),
        },
    }
}

impl FjallEngine {
    /// Opens (creating if needed) the fjall database at `path`.
    ///
    /// # Errors
    /// [`OpenError::Locked`] when another process or runtime holds it, [`OpenError::Io`] for
    /// an unusable directory, [`OpenError::Store`] for what fjall reports.
    pub(crate) fn open(path: &Path, cache_bytes: u64) -> Result<Self, OpenError> {
        let db = Database::builder(path)
            .cache_size(cache_bytes)
            // keystead persists after every batch itself (or every `flush_every`).
            .manual_journal_persist(true)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => OpenError::Locked {
                    path: path.to_path_buf(),
                    detail: "fjall's lock file is held".into(),
                },
                fjall::Error::Io(source) => OpenError::Io {
                    path: path.to_path_buf(),
                    source,
                },
                other => OpenError::Store {
                    path: path.to_path_buf(),
                    source: store_error("open", other),
                },
            })?;
        let keyspace = db
            .keyspace(KEYSPACE, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES_MAX)
            })
            .map_err(|e| OpenError::Store {
                path: path.to_path_buf(),
                source: store_error("open", e),
            })?;
        Ok(Self {
            open: RwLock::new(Some((db, keyspace))),
            writes: Mutex::new(()),
        })
    }

    fn handles(&self) -> Result<(Database, Keyspace), StoreError> {
        self.open.read().clone().ok_or(StoreError::Closed)
    }
}

impl Engine for FjallEngine {
    fn layout(&self) -> &'static str {
        LAYOUT
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let (_, keyspace) = self.handles()?;
        keyspace
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| store_error("read", e))
    }

    fn has_foreign_data(&self) -> bool {
        self.handles().is_ok_and(|(db, keyspace)| {
            db.keyspace_count() > 1 || keyspace.first_key_value().is_some()
        })
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Scan, StoreError> {
        let (_, keyspace) = self.handles()?;
        Ok(Box::new(keyspace.prefix(prefix).map(|guard| {
            guard
                .into_inner()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| store_error("scan", e))
        })))
    }

    fn scan_from(&self, prefix: &[u8], start: &[u8]) -> Result<Scan, StoreError> {
        let (_, keyspace) = self.handles()?;
        let prefix = prefix.to_vec();
        // Bounded above by the prefix's end: an open range would walk over every deleted
        // key after the prefix (an LSM keeps them as tombstones for a while) before it
        // found the first live key past it.
        let range = match super::prefix_end(&prefix) {
            Some(end) => keyspace.range(start.to_vec()..end),
            None => keyspace.range(start.to_vec()..),
        };
        Ok(Box::new(
            range
                .map(|guard| {
                    guard
                        .into_inner()
                        .map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(|e| store_error("scan", e))
                })
                .take_while(move |r| r.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix))),
        ))
    }

    fn remove_if_unchanged(&self, key: &[u8], expected: &[u8]) -> Result<bool, StoreError> {
        let (db, keyspace) = self.handles()?;
        let _writes = self.writes.lock();
        match keyspace.get(key).map_err(|e| store_error("purge", e))? {
            Some(found) if *found == *expected => {
                let mut batch = db.batch();
                batch.remove(&keyspace, key);
                batch.commit().map_err(|e| store_error("purge", e))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let (db, keyspace) = self.handles()?;
        let _writes = self.writes.lock();
        let mut batch = db.batch();
        for op in ops {
            match op {
                Op::Put(k, v) => batch.insert(&keyspace, k, v),
                Op::Delete(k) => batch.remove(&keyspace, k),
                // Turned into a `Put` by the committer before it reaches an engine.
                Op::Append(_) => {}
            }
        }
        batch.commit().map_err(|e| store_error("commit", e))
    }

    fn flush(&self) -> Result<(), StoreError> {
        let (db, _) = self.handles()?;
        db.persist(PersistMode::SyncData)
            .map_err(|e| store_error("flush", e))
    }

    fn close(&self, poisoned: bool) {
        let Some((db, keyspace)) = self.open.write().take() else {
            return;
        };
        drop(keyspace);
        if poisoned {
            // Dropping persists the journal; after an I/O failure that is not worth risking
            // a hang for. The process is expected to restart (see `StoreError::Poisoned`).
            std::mem::forget(db);
            return;
        }
        if let Err(e) = db.persist(PersistMode::SyncData) {
            tracing::error!(target: "keystead", error = ?e, "final persist failed");
        }
        drop(db);
    }
}
