//! Entities and helpers shared by the integration tests. Each test file uses a subset.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use keystead::{
    Backend, Context, Effect, Entity, Failure, FailureKind, RetryPolicy, Runtime, RuntimeBuilder,
};
use serde::{Deserialize, Serialize};

/// The error of entities that never fail.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("never fails")]
pub struct Never;

impl Failure for Never {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}

/// A counter that also keeps the ids it applied, in order, so tests can check order and
/// exactly-once from the state alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub count: u64,
    pub applied: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TallyCmd {
    /// Adds one and records `tag`.
    Add { tag: String },
    /// Fails permanently.
    Invalid,
    /// Fails with a retryable error until attempt `succeed_on`, then adds one.
    FlakyUntil { succeed_on: u32, tag: String },
    /// Always fails with a retryable error.
    AlwaysTimesOut,
    /// Panics until attempt `succeed_on`, then adds one (mutating the draft before panicking).
    PanicUntil { succeed_on: u32, tag: String },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum TallyError {
    #[error("invalid command")]
    Invalid,
    #[error("upstream timed out")]
    Timeout,
}

impl Failure for TallyError {
    fn kind(&self) -> FailureKind {
        match self {
            TallyError::Invalid => FailureKind::Permanent,
            TallyError::Timeout => FailureKind::Retryable,
        }
    }
}

pub struct TallyEntity;

impl Entity for TallyEntity {
    const NAME: &'static str = "tally";
    type State = Tally;
    type Command = TallyCmd;
    type Reply = u64;
    type Error = TallyError;

    fn handle(state: &mut Tally, cmd: &TallyCmd, ctx: &mut Context<'_>) -> Result<u64, TallyError> {
        let add = |state: &mut Tally, tag: &str| {
            state.count += 1;
            state.applied.push(tag.to_string());
            Ok(state.count)
        };
        match cmd {
            TallyCmd::Add { tag } => add(state, tag),
            TallyCmd::Invalid => Err(TallyError::Invalid),
            TallyCmd::FlakyUntil { succeed_on, tag } => {
                if ctx.attempt() < *succeed_on {
                    Err(TallyError::Timeout)
                } else {
                    add(state, tag)
                }
            }
            TallyCmd::AlwaysTimesOut => Err(TallyError::Timeout),
            TallyCmd::PanicUntil { succeed_on, tag } => {
                state.count += 1000;
                if ctx.attempt() < *succeed_on {
                    panic!("handler bug on attempt {}", ctx.attempt());
                }
                state.count -= 1000;
                add(state, tag)
            }
        }
    }
}

pub fn add(tag: impl Into<String>) -> TallyCmd {
    TallyCmd::Add { tag: tag.into() }
}

/// A retry policy fast enough for tests (the delays are backoff, not synchronisation).
pub fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .attempts_max(attempts)
        .backoff_initial(Duration::from_millis(1))
        .backoff_max(Duration::from_millis(4))
}

thread_local! {
    static BACKEND: std::cell::Cell<Option<Backend>> = const { std::cell::Cell::new(None) };
}

/// Selects the storage engine for the tests on this thread (see `on_each_backend!`).
pub fn set_backend(backend: Backend) {
    BACKEND.with(|b| b.set(Some(backend)));
}

/// The engine under test: set by `on_each_backend!`, else `KEYSTEAD_TEST_BACKEND` (how a
/// test hands it to the child processes it spawns), else sled.
pub fn backend() -> Backend {
    BACKEND.with(|b| b.get()).unwrap_or_else(|| {
        match std::env::var("KEYSTEAD_TEST_BACKEND").as_deref() {
            Ok("fjall") => Backend::Fjall,
            _ => Backend::Sled,
        }
    })
}

/// Runs a test once per storage engine: `name::sled` and `name::fjall`. The contract does
/// not depend on the engine, so every contract test is written once and run on both.
#[macro_export]
macro_rules! on_each_backend {
    ($(#[$attr:meta])+ async fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$attr])+
            async fn sled() {
                $crate::common::set_backend(keystead::Backend::Sled);
                $body
            }
            $(#[$attr])+
            async fn fjall() {
                $crate::common::set_backend(keystead::Backend::Fjall);
                $body
            }
        }
    };
    ($(#[$attr:meta])+ fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$attr])+
            fn sled() {
                $crate::common::set_backend(keystead::Backend::Sled);
                $body
            }
            $(#[$attr])+
            fn fjall() {
                $crate::common::set_backend(keystead::Backend::Fjall);
                $body
            }
        }
    };
}

/// Like `on_each_backend!`, but one test that runs the engines one after the other, for
/// tests that share process-wide state (a gate, a captured-span buffer) and so must not run
/// in parallel with themselves.
#[macro_export]
macro_rules! on_each_backend_in_turn {
    ($(#[$attr:meta])+ async fn $name:ident() $body:block) => {
        $(#[$attr])+
        async fn $name() {
            for backend in keystead::Backend::available() {
                $crate::common::set_backend(backend);
                async $body.await;
            }
        }
    };
    ($(#[$attr:meta])+ fn $name:ident() $body:block) => {
        $(#[$attr])+
        fn $name() {
            for backend in keystead::Backend::available() {
                $crate::common::set_backend(backend);
                $body
            }
        }
    };
}

/// `Runtime::builder` on the engine under test.
pub fn runtime_builder(path: &Path) -> RuntimeBuilder {
    Runtime::builder(path).backend(backend())
}

/// A builder with test-friendly settings and the tally entity registered.
pub fn builder(path: &Path) -> RuntimeBuilder {
    runtime_builder(path)
        .shards(2)
        .retry(fast_retry(3))
        .register::<TallyEntity>()
}

/// Silences the default panic hook for panics the tests provoke on purpose.
pub fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let provoked = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|s| s.starts_with("handler bug"));
            if !provoked {
                default(info);
            }
        }));
    });
}

/// Builds the on-disk key of an entity's state record, as documented in
/// docs/architecture.md ("Keys"), so tests can damage or inspect stored bytes.
pub fn state_key(entity: &str, key: &str) -> Vec<u8> {
    let mut out = vec![b'S', entity.len() as u8];
    out.extend_from_slice(entity.as_bytes());
    out.extend_from_slice(&(key.len() as u16).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

/// Builds the on-disk key of an inbox entry.
pub fn inbox_key(entity: &str, key: &str, seq: u64) -> Vec<u8> {
    let mut out = state_key(entity, key);
    out[0] = b'I';
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

/// Direct access to the stored bytes, to damage or inspect them.
pub trait RawStore {
    /// Writes one record.
    fn put(&self, key: &[u8], value: &[u8]);
    /// Removes one record; returns whether it was there.
    fn remove(&self, key: &[u8]) -> bool;
    /// Reads one record.
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    /// How many records start with `prefix`.
    fn count_prefix(&self, prefix: &[u8]) -> usize;
    /// Removes every record that starts with `prefix`; returns how many there were.
    fn remove_prefix(&self, prefix: &[u8]) -> usize;
}

impl RawStore for sled::Db {
    fn put(&self, key: &[u8], value: &[u8]) {
        self.insert(key, value).unwrap();
    }
    fn remove(&self, key: &[u8]) -> bool {
        sled::Tree::remove(self, key).unwrap().is_some()
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        sled::Tree::get(self, key).unwrap().map(|v| v.to_vec())
    }
    fn count_prefix(&self, prefix: &[u8]) -> usize {
        self.scan_prefix(prefix).count()
    }
    fn remove_prefix(&self, prefix: &[u8]) -> usize {
        let keys: Vec<_> = self
            .scan_prefix(prefix)
            .keys()
            .map(Result::unwrap)
            .collect();
        for key in &keys {
            sled::Tree::remove(self, key).unwrap();
        }
        keys.len()
    }
}

struct RawFjall(fjall::Database, fjall::Keyspace);

impl RawStore for RawFjall {
    fn put(&self, key: &[u8], value: &[u8]) {
        self.1.insert(key, value).unwrap();
    }
    fn remove(&self, key: &[u8]) -> bool {
        let was = self.1.get(key).unwrap().is_some();
        self.1.remove(key).unwrap();
        was
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.1.get(key).unwrap().map(|v| v.to_vec())
    }
    fn count_prefix(&self, prefix: &[u8]) -> usize {
        self.1.prefix(prefix).count()
    }
    fn remove_prefix(&self, prefix: &[u8]) -> usize {
        let keys: Vec<Vec<u8>> = self
            .1
            .prefix(prefix)
            .map(|guard| guard.key().unwrap().to_vec())
            .collect();
        for key in &keys {
            self.1.remove(key.as_slice()).unwrap();
        }
        keys.len()
    }
}

/// Opens the database directly with the engine under test, runs `f`, and returns once the
/// engine has released the directory, so a runtime can open it right after.
pub fn with_raw_store<T>(path: &Path, f: impl FnOnce(&dyn RawStore) -> T) -> T {
    match backend() {
        Backend::Fjall => {
            let db = fjall::Database::builder(path).open().unwrap();
            let keyspace = db
                .keyspace("keystead", fjall::KeyspaceCreateOptions::default)
                .unwrap();
            let raw = RawFjall(db, keyspace);
            let out = f(&raw);
            raw.0.persist(fjall::PersistMode::SyncAll).unwrap();
            out
        }
        _ => with_raw_sled(path, |db| f(db)),
    }
}

/// Opens the database directly with sled (to damage or inspect stored bytes), runs `f`, and
/// returns once sled has released the directory, so a runtime can open it right after.
pub fn with_raw_sled<T>(path: &Path, f: impl FnOnce(&sled::Db) -> T) -> T {
    let db = sled::Config::new()
        .path(path)
        .flush_every_ms(None)
        .open()
        .unwrap();
    let out = f(&db);
    db.flush().unwrap();
    drop(db);
    // sled can hold its lock file a moment after the last handle drops (see
    // keystead's store::wait_for_release); wait on the lock itself.
    let lock = path.join("db");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::File::open(&lock)
        .map(|f| f.try_lock().is_err())
        .unwrap_or(false)
    {
        assert!(std::time::Instant::now() < deadline, "sled kept its lock");
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

/// A product whose every command records one `Enrich` (the effect tests' slow stage).
pub struct Product;

/// The enrichment a `Product` records on every command.
#[derive(Debug, Serialize, Deserialize)]
pub struct Enrich;

impl Effect for Enrich {
    const NAME: &'static str = "enrich";
    type Origin = Product;
}

impl Entity for Product {
    const NAME: &'static str = "product";
    type State = u64;
    type Command = ();
    type Reply = u64;
    type Error = Never;

    fn handle(state: &mut u64, _: &(), ctx: &mut Context<'_>) -> Result<u64, Never> {
        *state += 1;
        ctx.effect(Enrich);
        Ok(*state)
    }
}
