//! The crash torture harness, shared by `examples/crash_torture.rs` and
//! `tests/crash_torture.rs`.
//!
//! A child process runs a workload on a real directory (sled or fjall, sync or relaxed
//! durability): concurrent `tell`s and `ask`s with ids and versions, resends of
//! acknowledged ids, retryable failures, and one effect per applied message performed by a
//! provider that honours idempotency keys. Every acknowledgement is appended to a side file
//! (one `write`, which a SIGKILL cannot take back) before the next send, with the time it
//! arrived. A reader task reads snapshots meanwhile and logs every revision it was shown.
//! The parent kills the child with SIGKILL at seeded random moments (some inside
//! `Runtime::open`), restarts it on the same directory, and after the last kill drains and
//! checks, from the data alone: nothing acknowledged lost (in relaxed mode: how much was
//! lost, and how long before the kill it had been acknowledged), nothing applied twice,
//! versions never regressed, no snapshot showed a revision the restart took back, no
//! effect performed twice per effect key or for a change that was lost, the inbox empty,
//! every record decodable.
//!
//! Transactions run beside them: transfers between six purses, naming the two in either
//! order; each is all or nothing after a restart, once per id, and money is conserved.
//!
//! [`fresh_open_torture`] kills children inside the very first open of new directories.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keystead::{
    BacklogKind, Context, Effect, EffectContext, EffectError, Entity, Executor, Failure,
    FailureKind, Feedback, LaneLimits, Members, Outcome, Overlap, Priority, Recorded, RetryPolicy,
    Runtime, Schedule, SubmitError, Transaction, TxContext, WhenFull,
};
use serde::{Deserialize, Serialize};

/// The environment variable that puts a process in child mode; its value is the directory.
pub const CHILD_ENV: &str = "KEYSTEAD_TORTURE_DIR";
/// The environment variable carrying the child's run number (makes its ids unique).
pub const RUN_ENV: &str = "KEYSTEAD_TORTURE_RUN";
/// Keys the workload spreads over.
pub const KEYS: u64 = 20;
/// Concurrent senders in the child.
pub const SENDERS: u64 = 8;
/// The environment variable carrying the [`Mode`] to a child.
pub const MODE_ENV: &str = "KEYSTEAD_TORTURE_MODE";
/// Set in a child that must print `opening` just before it opens the runtime.
pub const ANNOUNCE_ENV: &str = "KEYSTEAD_TORTURE_ANNOUNCE";
/// The low lane's limit in the torture runtime.
pub const LOW_PENDING_MAX: u64 = 4;
/// The effects the low lane of the outbox may hold: small, so that low messages meet it
/// full (a low tell then waits in the inbox, a low ask is refused, not acknowledged).
pub const LOW_OUTBOX_MAX: u64 = 2;
/// The effect workers at once (`effect_lanes_max`).
pub const EFFECT_WORKERS: usize = 3;
/// The schedule every child keeps (created idempotently at each open): a run every 20 ms
/// to the first [`SCHEDULE_TARGETS`] keys.
pub const SCHEDULE: &str = "torture-tick";
/// How many keys each scheduled run goes to.
pub const SCHEDULE_TARGETS: u64 = 5;

/// The schedule every child creates (the same definition each time: a no-op after the
/// first). `AllowAll`, so that a run is written every 20 ms under the kills; after a
/// restart the latest 3 runs of the last second are caught up.
fn schedule() -> Schedule<LedgerEntity> {
    Schedule::<LedgerEntity>::every(SCHEDULE, Duration::from_millis(20), ())
        .to_each((0..SCHEDULE_TARGETS).map(|k| format!("k{k}")))
        .overlap(Overlap::AllowAll)
        .catch_up_window(Duration::from_secs(1))
        .catch_up_runs_max(3)
}

/// The engine and the durability mode a torture runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mode {
    pub backend: keystead::Backend,
    pub durability: keystead::Durability,
}

impl Mode {
    pub fn sync(backend: keystead::Backend) -> Self {
        Self {
            backend,
            durability: keystead::Durability::Sync,
        }
    }

    pub fn relaxed(backend: keystead::Backend, flush_every: Duration) -> Self {
        Self {
            backend,
            durability: keystead::Durability::Relaxed { flush_every },
        }
    }

    pub fn is_relaxed(self) -> bool {
        self.durability.flush_every().is_some()
    }

    /// `sled`, `fjall`, `sled:relaxed:20` (flush every 20 ms).
    pub fn to_env(self) -> String {
        match self.durability.flush_every() {
            None => self.backend.name().to_string(),
            Some(every) => format!("{}:relaxed:{}", self.backend.name(), every.as_millis()),
        }
    }

    pub fn from_env(text: &str) -> Self {
        let mut parts = text.split(':');
        let backend = match parts.next() {
            Some("fjall") => keystead::Backend::Fjall,
            _ => keystead::Backend::Sled,
        };
        match (parts.next(), parts.next().and_then(|ms| ms.parse().ok())) {
            (Some("relaxed"), Some(ms)) => Self::relaxed(backend, Duration::from_millis(ms)),
            _ => Self::sync(backend),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// Message ids applied, in order.
    pub applied: Vec<String>,
    /// Applied messages whose version was not above the entity's (must stay 0).
    pub regressions: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("transient failure")]
pub struct Transient;
impl Failure for Transient {
    fn kind(&self) -> FailureKind {
        FailureKind::Retryable
    }
}

pub struct LedgerEntity;
impl Entity for LedgerEntity {
    const NAME: &'static str = "ledger";
    type State = Ledger;
    type Command = ();
    type Reply = u64;
    type Error = Transient;
    fn handle(s: &mut Ledger, _: &(), ctx: &mut Context<'_>) -> Result<u64, Transient> {
        // One message in ten fails its first attempt: retries run under the kills too.
        if ctx.attempt() == 1 && ctx.message_id().len() % 10 == 3 {
            return Err(Transient);
        }
        if let (Some(incoming), Some(current)) = (ctx.message_version(), ctx.version()) {
            if incoming <= current {
                s.regressions += 1;
            }
        }
        s.applied.push(ctx.message_id().to_string());
        ctx.effect(Post);
        Ok(s.applied.len() as u64)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Post;
impl Effect for Post {
    const NAME: &'static str = "post";
    type Origin = LedgerEntity;
}

/// How many purses the transfers move money between.
pub const PURSES: u64 = 6;

/// A purse: its balance (may go below zero: the sum over all purses must stay 0) and the
/// transfers applied to it, by id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Purse {
    pub cents: i64,
    pub transfers: Vec<String>,
}

pub struct PurseEntity;
impl Entity for PurseEntity {
    const NAME: &'static str = "purse";
    type State = Purse;
    type Command = i64;
    type Reply = i64;
    type Error = Transient;
    fn handle(p: &mut Purse, cents: &i64, _: &mut Context<'_>) -> Result<i64, Transient> {
        p.cents += cents;
        Ok(p.cents)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShiftCmd {
    pub from: u64,
    pub to: u64,
    pub cents: i64,
    /// Name the members `to` first (the opposite order).
    pub reversed: bool,
}

/// Moves money between two purses, recording its id in both.
pub struct Shift;
impl Transaction for Shift {
    const NAME: &'static str = "shift";
    type Command = ShiftCmd;
    type Reply = ();
    type Error = Transient;
    fn members(c: &ShiftCmd) -> Members {
        let (a, b) = if c.reversed {
            (c.to, c.from)
        } else {
            (c.from, c.to)
        };
        Members::new()
            .with::<PurseEntity>(format!("p{a}"))
            .with::<PurseEntity>(format!("p{b}"))
    }
    fn handle(c: &ShiftCmd, tx: &mut TxContext<'_>) -> Result<(), Transient> {
        // One transfer in ten fails its first attempt: retries run under the kills too.
        if tx.attempt() == 1 && tx.message_id().len() % 10 == 4 {
            return Err(Transient);
        }
        let id = tx.message_id().to_string();
        let from = tx.state_mut::<PurseEntity>(&format!("p{}", c.from));
        from.cents -= c.cents;
        from.transfers.push(id.clone());
        let to = tx.state_mut::<PurseEntity>(&format!("p{}", c.to));
        to.cents += c.cents;
        to.transfers.push(id);
        Ok(())
    }
}

/// A provider that honours idempotency keys: it performs a key once, appending it to its
/// ledger file (one `write`, which a SIGKILL cannot take back), and absorbs repeats.
pub struct Provider {
    seen: Mutex<(HashSet<String>, File)>,
}

impl Provider {
    pub fn open(path: &Path) -> Self {
        let seen = read_lines(path).into_iter().collect();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("provider ledger");
        Self {
            seen: Mutex::new((seen, file)),
        }
    }
}

impl Executor<Post> for Provider {
    fn execute(&self, _: &Post, ctx: &EffectContext) -> Result<Feedback<Post>, EffectError> {
        let key = ctx.effect_key().to_string();
        let mut guard = self
            .seen
            .lock()
            .map_err(|_| EffectError::retryable("poisoned"))?;
        if guard.0.contains(&key) {
            return Ok(None); // a repeat after a crash: absorbed by the key
        }
        append_line_unsynced(&mut guard.1, &key).map_err(EffectError::retryable)?;
        guard.0.insert(key);
        Ok(None)
    }
}

/// Opens `path` for appending, first ending a torn last line (the process died inside a
/// write) so the next record starts on a line of its own.
pub fn open_log(path: &Path) -> File {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .expect("log file");
    let torn = std::fs::read(path)
        .map(|b| b.last().is_some_and(|c| *c != b'\n'))
        .unwrap_or(false);
    if torn {
        file.write_all(b"\n").expect("log repair");
    }
    file
}

/// Appends one record as a single write (a kill cannot split it), then fsyncs.
pub fn append_line(file: &mut File, line: &str) -> std::io::Result<()> {
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_data()
}

/// Appends one record as a single write. Once `write` returns, a SIGKILL cannot take the
/// line back (it is in the kernel's page cache), so no fsync is needed against process
/// crashes, and the record costs microseconds: the moment it logs stays close to the
/// moment it records.
pub fn append_line_unsynced(file: &mut File, line: &str) -> std::io::Result<()> {
    file.write_all(format!("{line}\n").as_bytes())
}

/// Logs an acknowledgement of `id` on `key`, with the time it arrived.
fn log_ack(acks: &Mutex<File>, key: &str, id: &str) {
    let at = unix_us();
    let mut file = acks.lock().expect("acks lock");
    append_line_unsynced(&mut file, &format!("{key} {id} {at}")).expect("ack write");
}

/// Microseconds since the Unix epoch: comparable between the parent and its children.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Lines of a file; a torn last line (no newline: the process died mid-write) is dropped.
pub fn read_lines(path: &Path) -> Vec<String> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if line.ends_with('\n') {
            out.push(line.trim_end().to_string());
        }
        line.clear();
    }
    out
}

pub fn runtime(dir: &Path, mode: Mode) -> Result<Runtime, keystead::OpenError> {
    Runtime::builder(dir.join("db"))
        .backend(mode.backend)
        .durability(mode.durability)
        .shards(2)
        .retry(
            RetryPolicy::default()
                .attempts_max(5)
                .backoff_initial(Duration::from_millis(1))
                .backoff_max(Duration::from_millis(5)),
        )
        .effect_retry(
            RetryPolicy::default()
                .attempts_max(1000)
                .backoff_initial(Duration::from_millis(1))
                .backoff_max(Duration::from_millis(5)),
        )
        // A small low lane, so that low tells meet it full: refused (not acknowledged) or,
        // when sheddable, shed to the durable shed log.
        .lane_limits(
            Priority::Low,
            LaneLimits::new(LOW_PENDING_MAX, 1 << 20).when_full(WhenFull::Reject),
        )
        .outbox_limits(
            Priority::Low,
            LaneLimits::new(LOW_OUTBOX_MAX, 1 << 20).when_full(WhenFull::Reject),
        )
        // Few effect workers, so that most effects wait on disk in the outbox lane index
        // and the others are left unindexed to a running worker when a kill comes.
        .effect_lanes_max(EFFECT_WORKERS)
        .register::<LedgerEntity>()
        .feed::<LedgerEntity>()
        .register::<PurseEntity>()
        .transaction::<Shift>()
        .executor::<Post>(Provider::open(&dir.join("provider.log")))
        .open()
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Child mode: sends until killed (or `limit` messages per sender in drain runs: 0).
pub async fn child(dir: &Path, run: u64, per_sender: u64, mode: Mode) {
    if std::env::var(ANNOUNCE_ENV).is_ok() {
        // The parent kills 0-10 ms after this line: inside the open that follows.
        let mut out = std::io::stdout();
        let _ = out.write_all(b"opening\n").and_then(|()| out.flush());
    }
    let rt = runtime(dir, mode).expect("open");
    rt.schedules()
        .create(schedule())
        .await
        .expect("the schedule");
    let append = |name: &str| {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name));
        Arc::new(Mutex::new(file.expect("an append-only log")))
    };
    let (acks, sheds) = (append("acks.log"), append("sheds.log"));
    let delayed = append("delayed.log");
    let refused = append("outbox-refused.log");
    let versions: Arc<Vec<AtomicU64>> =
        Arc::new((0..KEYS).map(|_| AtomicU64::new(run << 32)).collect());
    // A change feed reader: logs every change it reads (one `write` each), then
    // acknowledges; after a kill it resumes after its last acknowledgement.
    let feed_reader = (per_sender == u64::MAX).then(|| {
        let feed = rt.feed();
        let mut log = open_log(&dir.join("feed-reads.log"));
        tokio::spawn(async move {
            let Ok(mut consumer) = feed.consumer("reader", keystead::Start::Beginning).await else {
                return;
            };
            while let Ok(changes) = consumer.next(100).await {
                for c in &changes {
                    append_line_unsynced(&mut log, &format!("{} {}", c.key, c.revision))
                        .expect("feed log write");
                }
                if let Some(last) = changes.last() {
                    if consumer.ack(last.seq).await.is_err() {
                        return;
                    }
                }
            }
        })
    });
    // Transfers between purses, two senders, one naming the members in the opposite order.
    let transfers_log = append("transfers.log");
    let transfers: Vec<_> = (0..2u64)
        .map(|s| {
            let handle = rt.handle();
            let log = transfers_log.clone();
            tokio::spawn(async move {
                let mut rng = run.wrapping_mul(7_000_003) ^ (s + 11);
                let mut sent: Vec<(ShiftCmd, String)> = Vec::new();
                for i in 0..per_sender {
                    let roll = splitmix(&mut rng);
                    let (cmd, id) = if roll.is_multiple_of(10) && !sent.is_empty() {
                        sent[(roll as usize / 10) % sent.len()].clone() // a resend
                    } else {
                        let from = roll % PURSES;
                        let to = (from + 1 + (roll >> 8) % (PURSES - 1)) % PURSES;
                        let cmd = ShiftCmd {
                            from,
                            to,
                            cents: ((roll >> 16) % 100) as i64 + 1,
                            reversed: s == 1,
                        };
                        (cmd, format!("r{run}-x{s}-{i}"))
                    };
                    let done = handle
                        .transaction::<Shift>(cmd.clone())
                        .id(id.clone())
                        .await;
                    if let Ok(
                        Outcome::Applied { .. }
                        | Outcome::Duplicate {
                            first: Recorded::Applied { .. },
                        },
                    ) = done
                    {
                        log_ack(&log, &format!("p{}-p{}", cmd.from, cmd.to), &id);
                        sent.push((cmd, id));
                    }
                }
            })
        })
        .collect();
    let tasks: Vec<_> = (0..SENDERS)
        .map(|s| {
            let refs: Vec<_> = (0..KEYS)
                .map(|k| rt.entity::<LedgerEntity>(format!("k{k}")))
                .collect();
            let (acks, sheds, versions) = (acks.clone(), sheds.clone(), versions.clone());
            let (refused, delayed) = (refused.clone(), delayed.clone());
            tokio::spawn(async move {
                let mut rng = run.wrapping_mul(1_000_003) ^ s;
                let mut sent: Vec<(u64, String)> = Vec::new();
                for i in 0..per_sender {
                    let roll = splitmix(&mut rng);
                    let k = roll % KEYS;
                    let (k, id) = if roll.is_multiple_of(10) && !sent.is_empty() {
                        // Resend an acknowledged id: must come back as a duplicate.
                        sent[(roll as usize / 10) % sent.len()].clone()
                    } else {
                        (k, format!("r{run}-s{s}-m{i}"))
                    };
                    let version = versions[k as usize].fetch_add(1, Ordering::SeqCst) + 1;
                    let e = &refs[k as usize];
                    // Every lane, and half the low tells sheddable.
                    let priority = Priority::ALL[((roll >> 8) % 4) as usize];
                    let sheddable = priority == Priority::Low && (roll >> 12).is_multiple_of(2);
                    let ok = if roll.is_multiple_of(3) {
                        let asked = e.ask(()).id(id.clone()).version(version);
                        match asked.priority(priority).await {
                            Ok(_) => true,
                            Err(SubmitError::Overloaded {
                                backlog: BacklogKind::Outbox,
                                ..
                            }) => {
                                // Not applied, not acknowledged: its effect found no room.
                                log_ack(&refused, &format!("k{k}"), &id);
                                false
                            }
                            Err(_) => false,
                        }
                    } else {
                        // One tell in five is delayed by up to 40 ms (without a version:
                        // later sends would make it stale by the time it is due).
                        let delay = (roll >> 16)
                            .is_multiple_of(5)
                            .then(|| Duration::from_millis((roll >> 20) % 40));
                        let told = match delay {
                            Some(delay) => e.tell(()).id(id.clone()).after(delay),
                            None => e.tell(()).id(id.clone()).version(version),
                        };
                        let told = told.priority(priority);
                        let told = if sheddable {
                            told.sheddable().await
                        } else {
                            told.await
                        };
                        match told {
                            Ok(accepted) if accepted.shed => {
                                // Kept in the shed log, not the inbox: checked apart.
                                log_ack(&sheds, &format!("k{k}"), &id);
                                false
                            }
                            Ok(accepted) => {
                                if accepted.due_at_ms.is_some() {
                                    log_ack(&delayed, &format!("k{k}"), &id);
                                }
                                true
                            }
                            Err(SubmitError::Overloaded { .. }) => false,
                            Err(_) => false,
                        }
                    };
                    if ok {
                        log_ack(&acks, &format!("k{k}"), &id);
                        sent.push((k, id));
                    }
                }
            })
        })
        .collect();
    // The reader: logs every revision a snapshot showed it, before reading on. After the
    // restart, no key may be below a revision logged here (unless the mode is relaxed,
    // where reads show what was acknowledged).
    let reader = (per_sender == u64::MAX).then(|| {
        let refs: Vec<_> = (0..KEYS)
            .map(|k| rt.entity::<LedgerEntity>(format!("k{k}")))
            .collect();
        let mut log = open_log(&dir.join("reads.log"));
        tokio::spawn(async move {
            let mut shown = vec![0u64; KEYS as usize];
            loop {
                for (k, e) in refs.iter().enumerate() {
                    let Ok(snap) = e.snapshot().await else {
                        return;
                    };
                    if snap.revision > shown[k] {
                        shown[k] = snap.revision;
                        append_line_unsynced(&mut log, &format!("k{k} {}", snap.revision))
                            .expect("read log write");
                    }
                }
                tokio::task::yield_now().await;
            }
        })
    });
    // A hot key: one writer asks on k0 back to back, and a second reader polls k0 alone,
    // so that reads keep landing between a batch's apply and its flush.
    let hot = (per_sender == u64::MAX).then(|| {
        let e = rt.entity::<LedgerEntity>("k0");
        let acks = acks.clone();
        let writer = tokio::spawn(async move {
            for i in 0.. {
                let id = format!("r{run}-hot-m{i}");
                if e.ask(()).id(id.clone()).await.is_ok() {
                    log_ack(&acks, "k0", &id);
                }
            }
        });
        let e = rt.entity::<LedgerEntity>("k0");
        let mut log = open_log(&dir.join("reads.log"));
        let reader = tokio::spawn(async move {
            let mut shown = 0;
            while let Ok(snap) = e.snapshot().await {
                if snap.revision > shown {
                    shown = snap.revision;
                    append_line_unsynced(&mut log, &format!("k0 {shown}")).expect("read log");
                }
                tokio::task::yield_now().await;
            }
        });
        (writer, reader)
    });
    for t in tasks {
        let _ = t.await;
    }
    for t in transfers {
        let _ = t.await;
    }
    if let Some(reader) = reader {
        reader.abort();
    }
    if let Some(feed_reader) = feed_reader {
        feed_reader.abort();
    }
    if let Some((writer, reader)) = hot {
        writer.abort();
        reader.abort();
    }
    // A drain run stops the schedule (its runs so far are checked) and delivers every
    // delayed message before it stops.
    quiesce(&rt).await;
    rt.idle().await;
    rt.shutdown().await;
}

/// What the parent found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub mode: String,
    pub kills: u64,
    pub kills_early: u64,
    /// Children that exited with an error before being killed (e.g. a database that no
    /// longer opens: "bricked").
    pub child_failures: u64,
    pub acknowledged: u64,
    pub applied: u64,
    pub duplicates_suppressed: u64,
    pub stale_dropped: u64,
    /// Acknowledged, then gone after a restart: must be 0 in sync mode. In relaxed mode the
    /// price of the loss window; each such id is sent again and must be applied once.
    pub lost: u64,
    /// Relaxed mode: the longest time between a lost message's acknowledgement and the kill.
    pub loss_window_ms_max: f64,
    pub double_applied: u64,
    pub version_regressions: u64,
    /// Revisions a snapshot showed that the restart took back (sync mode: must be 0).
    pub dirty_reads: u64,
    /// Snapshot revisions logged by the readers.
    pub reads_logged: u64,
    pub effects_missing: u64,
    pub effects_double_run: u64,
    /// Effects performed for a change that is not in the state after the restart.
    pub effects_of_lost_changes: u64,
    pub inbox_left: u64,
    /// Sheddable tells answered "shed", by id.
    pub shed: u64,
    /// Of those, missing from the shed log after the restart (must be 0 in sync mode).
    pub shed_lost: u64,
    /// Shed messages found, requeued twice each, and applied (or dropped stale) once.
    pub shed_requeued: u64,
    /// A shed message whose two requeues both succeeded, or that was applied twice.
    pub shed_twice: u64,
    /// Low asks refused because the low outbox lane was full (logged by the children).
    pub outbox_refused: u64,
    /// Recovered low messages that waited for room in the low outbox lane at verification.
    pub outbox_waits: u64,
    /// Acknowledged tells that were delayed (`Tell::after`); counted in `acknowledged` too.
    pub delayed_acknowledged: u64,
    /// Runs the schedule recorded as fired (its durable counter).
    pub schedule_runs: u64,
    /// Fired runs missing at a target, or applied at a target and not counted fired, or
    /// applied at some targets and not others (a run is written to all in one batch).
    pub schedule_runs_wrong: u64,
    /// Transfers acknowledged (applied or duplicate of an applied one), by id.
    pub transfers_acknowledged: u64,
    /// Acknowledged, and in neither purse after the restart (sync mode: must be 0).
    pub transfers_lost: u64,
    /// In one purse and not the other: a transaction half applied (must be 0).
    pub transfers_partial: u64,
    /// In a purse twice (must be 0).
    pub transfers_doubled: u64,
    /// The sum of all purses (must be 0: money is only moved).
    pub money_off: i64,
    /// Change feed records the readers saw (logged by the children, then the rest).
    pub feed_records: u64,
    /// Applied revisions (1 to each ledger's revision) the feed never showed (must be 0).
    pub feed_missing: u64,
    /// Revisions the feed showed above the entity's committed one (sync mode: must be 0).
    pub feed_uncommitted: u64,
    pub seconds: f64,
}

impl Report {
    pub fn ok(&self) -> bool {
        let relaxed = self.mode.contains("relaxed");
        // Relaxed mode may lose its window, and shows what was acknowledged.
        (relaxed || (self.lost == 0 && self.dirty_reads == 0))
            && self.child_failures == 0
            && self.double_applied == 0
            && self.version_regressions == 0
            && self.effects_missing == 0
            && self.effects_double_run == 0
            && self.effects_of_lost_changes == 0
            && self.inbox_left == 0
            && (relaxed || self.shed_lost == 0)
            && self.shed_twice == 0
            && (relaxed || self.schedule_runs_wrong == 0)
            && (relaxed || self.transfers_lost == 0)
            && self.transfers_partial == 0
            && self.transfers_doubled == 0
            && self.money_off == 0
            && self.feed_missing == 0
            && (relaxed || self.feed_uncommitted == 0)
    }

    pub fn print(&self) {
        let rows: [(&str, String); 36] = [
            ("mode", self.mode.clone()),
            ("kills (SIGKILL)", self.kills.to_string()),
            (
                "  of which within 60 ms of start (inside open)",
                self.kills_early.to_string(),
            ),
            ("BRICKED / failed starts", self.child_failures.to_string()),
            ("messages acknowledged", self.acknowledged.to_string()),
            ("acknowledged and applied", self.applied.to_string()),
            (
                "duplicates suppressed (resent ids)",
                self.duplicates_suppressed.to_string(),
            ),
            (
                "stale dropped (reordered versions)",
                self.stale_dropped.to_string(),
            ),
            (
                "LOST (acknowledged, gone after restart)",
                self.lost.to_string(),
            ),
            (
                "  longest ack-to-kill time of a lost one, ms",
                format!("{:.1}", self.loss_window_ms_max),
            ),
            ("DOUBLE-APPLIED", self.double_applied.to_string()),
            ("version regressions", self.version_regressions.to_string()),
            ("snapshot revisions logged", self.reads_logged.to_string()),
            (
                "DIRTY READS (shown, then taken back)",
                self.dirty_reads.to_string(),
            ),
            ("effects missing", self.effects_missing.to_string()),
            (
                "EFFECTS DOUBLE-RUN (same key performed twice)",
                self.effects_double_run.to_string(),
            ),
            (
                "EFFECTS OF LOST CHANGES",
                self.effects_of_lost_changes.to_string(),
            ),
            ("inbox entries left", self.inbox_left.to_string()),
            (
                "sheddable tells shed (answered shed)",
                self.shed.to_string(),
            ),
            (
                "SHED LOST (answered shed, not in the shed log)",
                self.shed_lost.to_string(),
            ),
            (
                "shed messages requeued and applied once",
                self.shed_requeued.to_string(),
            ),
            (
                "SHED APPLIED TWICE (or requeued twice)",
                self.shed_twice.to_string(),
            ),
            (
                "low asks refused: outbox lane full",
                self.outbox_refused.to_string(),
            ),
            (
                "messages that waited for outbox room (verification)",
                self.outbox_waits.to_string(),
            ),
            (
                "delayed tells acknowledged (of the above)",
                self.delayed_acknowledged.to_string(),
            ),
            ("scheduled runs fired", self.schedule_runs.to_string()),
            (
                "SCHEDULED RUNS LOST, EXTRA OR PARTIAL",
                self.schedule_runs_wrong.to_string(),
            ),
            (
                "transfers acknowledged (transactions)",
                self.transfers_acknowledged.to_string(),
            ),
            ("TRANSFERS LOST", self.transfers_lost.to_string()),
            (
                "TRANSFERS HALF APPLIED (one purse only)",
                self.transfers_partial.to_string(),
            ),
            (
                "TRANSFERS APPLIED TWICE",
                self.transfers_doubled.to_string(),
            ),
            (
                "MONEY NOT CONSERVED (sum of purses)",
                self.money_off.to_string(),
            ),
            ("change feed records read", self.feed_records.to_string()),
            ("FEED REVISIONS MISSING", self.feed_missing.to_string()),
            (
                "FEED SHOWED UNCOMMITTED REVISIONS",
                self.feed_uncommitted.to_string(),
            ),
            ("seconds", format!("{:.1}", self.seconds)),
        ];
        println!("{:<48} {:>12}", "crash torture", "value");
        println!("{}", "-".repeat(61));
        for (name, value) in rows {
            println!("{name:<48} {value:>12}");
        }
    }
}

/// How a child is started.
pub struct Spawn<'a> {
    pub dir: &'a Path,
    pub run: u64,
    /// Messages per sender; `u64::MAX` sends until killed, 0 only drains.
    pub per_sender: u64,
    pub mode: Mode,
    /// Print `opening` on stdout (piped) just before opening.
    pub announce: bool,
}

/// Starts a child.
pub type Spawner<'a> = &'a dyn Fn(&Spawn<'_>) -> Child;

/// Parent mode: `kills` cycles of spawn + SIGKILL at a seeded moment, then a drain run
/// and the checks.
pub async fn torture(
    dir: &Path,
    kills: u64,
    seed: u64,
    max_life: Duration,
    spawn: Spawner<'_>,
    mode: Mode,
) -> Report {
    let started = Instant::now();
    let mut rng = seed;
    let mut report = Report {
        mode: mode.to_env(),
        ..Report::default()
    };
    let mut killed_at_us: HashMap<u64, u64> = HashMap::new();
    for run in 0..kills {
        let roll = splitmix(&mut rng);
        // A third of the kills land in the first 60 ms: inside Runtime::open.
        let life_ms = if roll.is_multiple_of(3) {
            roll % 60
        } else {
            roll % (max_life.as_millis() as u64).max(1)
        };
        let mut child = spawn(&Spawn {
            dir,
            run,
            per_sender: u64::MAX,
            mode,
            announce: false,
        });
        // The delay is the fault being injected (when to kill), not synchronisation.
        std::thread::sleep(Duration::from_millis(life_ms));
        if let Ok(Some(status)) = child.try_wait() {
            if !status.success() {
                eprintln!("run {run}: the child failed on its own: {status:?}");
                report.child_failures += 1;
            }
        }
        let _ = child.kill();
        killed_at_us.insert(run, unix_us());
        let _ = child.wait();
        report.kills += 1;
        if life_ms < 60 {
            report.kills_early += 1;
        }
    }
    // A last, uninterrupted run drains everything (and sends nothing).
    let status = spawn(&Spawn {
        dir,
        run: kills,
        per_sender: 0,
        mode,
        announce: false,
    })
    .wait()
    .expect("drain child");
    assert!(status.success(), "the drain run failed: {status:?}");
    verify(dir, mode, &killed_at_us, &mut report).await;
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// Acknowledgements logged by the children: (key, id, microseconds since the epoch).
/// Every tell answered "shed" is in the shed log after the kills; each is requeued twice
/// (one requeue finds it) and then applied, or dropped as stale, exactly once.
async fn verify_shed(dir: &Path, mode: Mode, rt: &Runtime, report: &mut Report) {
    let answered: Vec<(String, String)> = read_lines(&dir.join("sheds.log"))
        .iter()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect();
    report.shed = answered.len() as u64;
    let listed: HashSet<(String, String)> = rt
        .shed::<LedgerEntity>()
        .await
        .expect("shed log decodes")
        .into_iter()
        .map(|s| (s.key, s.message_id))
        .collect();
    for (key, id) in &answered {
        if !listed.contains(&(key.clone(), id.clone())) {
            if !mode.is_relaxed() {
                eprintln!("SHED LOST: {key} {id}");
            }
            report.shed_lost += 1;
        }
    }
    for (key, id) in &listed {
        let e = rt.entity::<LedgerEntity>(key.as_str());
        let mut found = 0;
        for _ in 0..2 {
            // The low lane is small: wait for room when a requeue meets it full.
            loop {
                match e.requeue_shed(id).await {
                    Ok(true) => found += 1,
                    Ok(false) => {}
                    Err(keystead::AdminError::Overloaded { .. }) => {
                        rt.idle().await;
                        continue;
                    }
                    Err(other) => panic!("requeue {key} {id}: {other}"),
                }
                break;
            }
        }
        if found != 1 {
            report.shed_twice += 1;
        }
    }
    rt.idle().await;
    for (key, id) in &listed {
        let outcome = rt
            .entity::<LedgerEntity>(key.as_str())
            .ask(())
            .id(id.clone())
            .await;
        match outcome {
            Ok(Outcome::Duplicate { .. }) => report.shed_requeued += 1,
            other => {
                eprintln!("SHED NOT APPLIED AFTER REQUEUE: {key} {id}: {other:?}");
                report.shed_lost += 1;
            }
        }
    }
}

fn acknowledgements(dir: &Path) -> Vec<(String, String, u64)> {
    read_lines(&dir.join("acks.log"))
        .into_iter()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let (key, id) = (parts.next()?, parts.next()?);
            let at = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
            Some((key.to_string(), id.to_string(), at))
        })
        .collect()
}

/// The run number in an id `r{run}-s{sender}-m{i}`.
fn run_of(id: &str) -> Option<u64> {
    id.strip_prefix('r')?.split('-').next()?.parse().ok()
}

async fn states(rt: &Runtime) -> HashMap<String, (u64, Ledger)> {
    let mut out = HashMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let snap = rt
            .entity::<LedgerEntity>(key.as_str())
            .snapshot()
            .await
            .expect("state decodes");
        out.insert(key, (snap.revision, snap.state));
    }
    out
}

fn double_applied(states: &HashMap<String, (u64, Ledger)>) -> u64 {
    states
        .values()
        .map(|(_, s)| {
            let distinct: HashSet<&String> = s.applied.iter().collect();
            (s.applied.len() - distinct.len()) as u64
        })
        .sum()
}

async fn verify(dir: &Path, mode: Mode, killed_at_us: &HashMap<u64, u64>, report: &mut Report) {
    let rt = runtime(dir, mode).expect("open for verification");
    quiesce(&rt).await;
    rt.idle().await;
    report.inbox_left = rt.inbox_len().await.expect("inbox");
    let acked = acknowledgements(dir);
    report.acknowledged = acked.len() as u64;
    // Before anything is sent again: what survived the kills.
    let before = states(&rt).await;
    for (_, state) in before.values() {
        report.version_regressions += state.regressions;
    }
    report.double_applied += double_applied(&before);
    report.delayed_acknowledged = read_lines(&dir.join("delayed.log")).len() as u64;
    verify_schedule(&rt, &before, report).await;
    verify_transfers(dir, mode, &rt, report).await;
    verify_feed(dir, &rt, &before, report).await;
    for line in read_lines(&dir.join("reads.log")) {
        let Some((key, revision)) = line.split_once(' ') else {
            continue;
        };
        let (Some((now, _)), Ok(shown)) = (before.get(key), revision.parse::<u64>()) else {
            continue;
        };
        report.reads_logged += 1;
        if shown > *now {
            if !mode.is_relaxed() {
                eprintln!("DIRTY READ: {key} was shown at revision {shown}, restarted at {now}");
            }
            report.dirty_reads += 1;
        }
    }
    // Every effect performed so far belongs to a change that survived.
    let performed = read_lines(&dir.join("provider.log"));
    for effect_key in &performed {
        let mut parts = effect_key.split('/');
        let (Some(_), Some(key), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let survived = before
            .get(key)
            .is_some_and(|(_, s)| s.applied.iter().any(|a| a == id));
        if !survived {
            eprintln!("EFFECT OF A LOST CHANGE: {effect_key}");
            report.effects_of_lost_changes += 1;
        }
    }
    verify_shed(dir, mode, &rt, report).await;
    let mut seen_ack: HashSet<(String, String)> = HashSet::new();
    for (key, id, acked_at_us) in acked {
        if !seen_ack.insert((key.clone(), id.clone())) {
            report.duplicates_suppressed += 1; // a resend, acknowledged again
            continue;
        }
        // Resending with the same id returns the stored first outcome, or runs it if lost.
        let outcome = rt
            .entity::<LedgerEntity>(key.as_str())
            .ask(())
            .id(id.clone())
            .await;
        match outcome {
            Ok(Outcome::Duplicate {
                first: Recorded::Applied { .. },
            }) => report.applied += 1,
            Ok(Outcome::Duplicate {
                first: Recorded::Stale { .. },
            }) => report.stale_dropped += 1,
            other => {
                if !mode.is_relaxed() {
                    eprintln!("LOST: {key} {id}: {other:?}");
                }
                report.lost += 1;
                let killed = run_of(&id).and_then(|run| killed_at_us.get(&run));
                if let Some(killed) = killed {
                    let window_ms = killed.saturating_sub(acked_at_us) as f64 / 1000.0;
                    report.loss_window_ms_max = report.loss_window_ms_max.max(window_ms);
                }
            }
        }
    }
    rt.idle().await;
    report.outbox_waits += rt.stats().effect_priority(Priority::Low).blocked;
    report.outbox_refused = read_lines(&dir.join("outbox-refused.log")).len() as u64;
    // After the resends: a lost id sent again is applied once, never twice.
    let states = states(&rt).await;
    report.double_applied += double_applied(&states);
    // Effects: every applied message's effect performed exactly once at the provider.
    let performed = read_lines(&dir.join("provider.log"));
    let mut counts: HashMap<String, u64> = HashMap::new();
    for key in performed {
        *counts.entry(key).or_default() += 1;
    }
    report.effects_double_run = counts.values().filter(|n| **n > 1).count() as u64;
    for (key, (_, state)) in &states {
        for id in &state.applied {
            if !counts.contains_key(&format!("ledger/{key}/{id}/0")) {
                let effect_key = keystead::EffectKey::new("ledger", key.as_str(), id.as_str(), 0);
                eprintln!(
                    "EFFECT MISSING: {effect_key}: {:?}",
                    rt.effect(&effect_key).await
                );
                report.effects_missing += 1;
            }
        }
    }
    rt.dead_letters::<LedgerEntity>()
        .await
        .expect("dead letters decode");
    rt.shutdown().await;
}

/// Stops the schedule, if a child created it (a run every 20 ms would keep the runtime from
/// ever being idle; the runs so far stay to be checked), and waits until every delayed
/// message is delivered (each is due within 40 ms of its acceptance).
async fn quiesce(rt: &Runtime) {
    match rt.schedules().pause(SCHEDULE).await {
        Ok(_) | Err(keystead::ScheduleError::NotFound { .. }) => {}
        Err(e) => panic!("pausing the schedule: {e}"),
    }
    rt.wait_until(|s| s.timers_pending == 0).await;
}

/// The change feed showed every applied revision of every ledger (what the children's
/// reader logged, plus what the same consumer reads now after its last acknowledgement),
/// and nothing above a ledger's committed revision.
async fn verify_feed(
    dir: &Path,
    rt: &Runtime,
    states: &HashMap<String, (u64, Ledger)>,
    report: &mut Report,
) {
    let mut seen: HashMap<String, HashSet<u64>> = HashMap::new();
    for line in read_lines(&dir.join("feed-reads.log")) {
        if let Some((key, revision)) = line.split_once(' ') {
            if let Ok(revision) = revision.parse::<u64>() {
                seen.entry(key.to_string()).or_default().insert(revision);
                report.feed_records += 1;
            }
        }
    }
    let mut consumer = rt
        .feed()
        .consumer("reader", keystead::Start::Beginning)
        .await
        .expect("the feed reader");
    loop {
        let changes = consumer.try_next(1000).await.expect("the feed reads");
        if changes.is_empty() {
            break;
        }
        for c in &changes {
            seen.entry(c.key.clone()).or_default().insert(c.revision);
            report.feed_records += 1;
        }
        if let Some(last) = changes.last() {
            consumer.ack(last.seq).await.expect("ack");
        }
    }
    for (key, (revision, _)) in states {
        let shown = seen.remove(key).unwrap_or_default();
        let missing = (1..=*revision).filter(|r| !shown.contains(r)).count() as u64;
        let above = shown.iter().filter(|r| **r > *revision).count() as u64;
        if missing + above > 0 {
            eprintln!("FEED: {key} at revision {revision}: {missing} revisions never shown, {above} shown above it");
        }
        report.feed_missing += missing;
        report.feed_uncommitted += above;
    }
    // A key the feed showed that has no state at all: shown, then lost.
    report.feed_uncommitted += seen.values().map(|s| s.len() as u64).sum::<u64>();
}

/// Every transfer is in both its purses or neither, once; every acknowledged one is there;
/// the purses sum to zero.
async fn verify_transfers(dir: &Path, mode: Mode, rt: &Runtime, report: &mut Report) {
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut sum = 0;
    for p in 0..PURSES {
        let purse = rt
            .entity::<PurseEntity>(format!("p{p}"))
            .snapshot()
            .await
            .expect("a purse decodes")
            .state;
        sum += purse.cents;
        let mut here = HashSet::new();
        for id in &purse.transfers {
            if !here.insert(id.clone()) {
                eprintln!("TRANSFER APPLIED TWICE: {id} in p{p}");
                report.transfers_doubled += 1;
            }
            *seen.entry(id.clone()).or_default() += 1;
        }
    }
    report.money_off = sum;
    for (id, n) in &seen {
        if *n != 2 {
            eprintln!("TRANSFER HALF APPLIED: {id} in {n} purse(s)");
            report.transfers_partial += 1;
        }
    }
    let acked: HashSet<String> = read_lines(&dir.join("transfers.log"))
        .iter()
        .filter_map(|line| line.split(' ').nth(1).map(str::to_string))
        .collect();
    report.transfers_acknowledged = acked.len() as u64;
    for id in &acked {
        if !seen.contains_key(id) {
            if !mode.is_relaxed() {
                eprintln!("TRANSFER LOST: {id}");
            }
            report.transfers_lost += 1;
        }
    }
}

/// Every run the schedule counted fired is applied once at every target, and nothing else:
/// the runs' inbox entries and the schedule's counter are written in one batch.
async fn verify_schedule(
    rt: &Runtime,
    states: &HashMap<String, (u64, Ledger)>,
    report: &mut Report,
) {
    let status = rt
        .schedules()
        .status(SCHEDULE)
        .await
        .expect("schedules")
        .expect("the schedule exists");
    report.schedule_runs = status.fired;
    let runs_at = |k: u64| -> HashSet<&String> {
        states
            .get(&format!("k{k}"))
            .map(|(_, s)| {
                s.applied
                    .iter()
                    .filter(|id| id.starts_with("schedule:"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let first = runs_at(0);
    for k in 0..SCHEDULE_TARGETS {
        let runs = runs_at(k);
        let partial = runs.symmetric_difference(&first).count() as u64;
        let count_off = (runs.len() as u64).abs_diff(status.fired);
        if partial + count_off > 0 {
            eprintln!(
                "SCHEDULED RUNS: k{k} applied {} runs, {partial} not at k0; the schedule fired {}",
                runs.len(),
                status.fired
            );
        }
        report.schedule_runs_wrong += partial + count_off;
    }
}

/// What [`fresh_open_torture`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FreshReport {
    pub mode: String,
    pub directories: u64,
    pub kills: u64,
    /// Kills that landed after the child announced its open (0-10 ms into it).
    pub kills_announced: u64,
    /// Directories that did not open again after the kills.
    pub bricked: u64,
    pub acknowledged: u64,
    pub lost: u64,
    pub seconds: f64,
}

impl FreshReport {
    pub fn ok(&self) -> bool {
        self.bricked == 0 && self.lost == 0
    }

    pub fn print(&self) {
        println!(
            "fresh-directory torture ({}): {} directories, {} kills ({} inside the first opens, 0-10 ms after `opening`), BRICKED {}, acknowledged {}, LOST {}, {:.1} s",
            self.mode,
            self.directories,
            self.kills,
            self.kills_announced,
            self.bricked,
            self.acknowledged,
            self.lost,
            self.seconds
        );
    }
}

/// Kills children inside the very first open of new directories: for each of
/// `directories` new directories, 1 to 3 children in turn are SIGKILLed 0-10 ms (seeded,
/// in microseconds) after they announce that they are opening it; then the directory must
/// open again, here, with everything the children acknowledged in it.
pub async fn fresh_open_torture(
    base: &Path,
    directories: u64,
    seed: u64,
    spawn: Spawner<'_>,
    mode: Mode,
) -> FreshReport {
    let started = Instant::now();
    let mut rng = seed;
    let mut report = FreshReport {
        mode: mode.to_env(),
        directories,
        ..FreshReport::default()
    };
    for d in 0..directories {
        let dir = base.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).expect("work directory");
        let kills = 1 + splitmix(&mut rng) % 3;
        for run in 0..kills {
            let delay_us = splitmix(&mut rng) % 10_000;
            let mut child = spawn(&Spawn {
                dir: &dir,
                run,
                per_sender: u64::MAX,
                mode,
                announce: true,
            });
            // Wait for the child's word that it is opening (or its end). Other lines (a
            // test harness's own) come first; the pipe stays open until the child is dead.
            let mut out = child.stdout.take().map(BufReader::new);
            let announced = out.as_mut().is_some_and(|out| {
                let mut line = String::new();
                while out.read_line(&mut line).unwrap_or(0) > 0 {
                    // After "test torture_child ... " when a test harness runs the child.
                    if line.trim_end().ends_with("opening") {
                        return true;
                    }
                    line.clear();
                }
                false
            });
            // The delay is the fault being injected (when to kill), not synchronisation.
            std::thread::sleep(Duration::from_micros(delay_us));
            let _ = child.kill();
            let _ = child.wait();
            drop(out);
            report.kills += 1;
            if announced {
                report.kills_announced += 1;
            }
        }
        let rt = match runtime(&dir, mode) {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("BRICKED: {} after {kills} kill(s): {e}", dir.display());
                report.bricked += 1;
                continue;
            }
        };
        // The schedule (if a child got as far as creating it) stops: a run every 20 ms
        // would keep the runtime from ever being idle. Delayed tells are delivered first.
        quiesce(&rt).await;
        // Accepted tells are processed from the inbox first; a resend is then a duplicate.
        rt.idle().await;
        for (key, id, _) in acknowledgements(&dir) {
            report.acknowledged += 1;
            let outcome = rt
                .entity::<LedgerEntity>(key.as_str())
                .ask(())
                .id(id.clone())
                .await;
            if !matches!(outcome, Ok(Outcome::Duplicate { .. })) {
                eprintln!("LOST: {} {key} {id}: {outcome:?}", dir.display());
                report.lost += 1;
            }
        }
        rt.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// The directory to use: `--dir` or a fresh temporary one.
pub fn work_dir(arg: Option<PathBuf>) -> (PathBuf, Option<tempfile::TempDir>) {
    match arg {
        Some(p) => {
            std::fs::create_dir_all(&p).expect("dir");
            (p, None)
        }
        None => {
            let t = tempfile::tempdir().expect("tempdir");
            (t.path().to_path_buf(), Some(t))
        }
    }
}

/// Spawns this executable in child mode with `args` prepended (the test harness needs
/// its filter arguments).
pub fn spawner(args: Vec<String>) -> impl Fn(&Spawn<'_>) -> Child {
    move |spec| {
        let mut command = Command::new(std::env::current_exe().expect("exe"));
        command
            .args(&args)
            .env(CHILD_ENV, spec.dir)
            .env(RUN_ENV, format!("{}:{}", spec.run, spec.per_sender))
            .env(MODE_ENV, spec.mode.to_env())
            .stdout(if spec.announce {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            });
        if spec.announce {
            command.env(ANNOUNCE_ENV, "1");
        }
        command.spawn().expect("spawn child")
    }
}

/// In child mode, runs the child and returns true.
pub fn run_child_if_asked() -> bool {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let spec = std::env::var(RUN_ENV).unwrap_or_default();
    let (run, per_sender) = spec.split_once(':').unwrap_or(("0", "0"));
    let run: u64 = run.parse().unwrap_or(0);
    let per_sender: u64 = per_sender.parse().unwrap_or(0);
    let mode = Mode::from_env(&std::env::var(MODE_ENV).unwrap_or_default());
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    tokio.block_on(child(Path::new(&dir), run, per_sender, mode));
    true
}
