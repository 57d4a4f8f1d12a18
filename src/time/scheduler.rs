//! Schedules: named, durable, periodic sends of one command to one or more entities.
//!
//! Each schedule is one record (keyspace `C`) holding its definition and its progress (the
//! runs decided so far, the run in progress, the buffered ones, its counters). The
//! scheduler keeps the records in memory (there are few), wakes on the runtime clock when
//! the next one is due, decides each due run with the pure [`plan`], and writes the runs'
//! inbox entries and the new progress in **one atomic batch**: a crash leaves either both
//! or neither, and a run fired twice (two processes, a restart between the write and the
//! reply) carries the same message id, [`run_id`], so each target applies it once.
//!
//! A run is *unfinished* while, for one of its targets, its message is still in the inbox
//! (waiting, being processed, retrying) or an effect it recorded is still in the outbox;
//! the overlap policy reads that from the store when a run comes due. Every change to the
//! schedules goes through one async lock: schedules are few and slow, and this keeps the
//! operations (create, pause, trigger, ...) and the firing in one order.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::clock::{epoch_ms, ms_of};
use crate::core::codec;
use crate::core::effect::EffectRecord;
use crate::core::keys::{self, Space};
use crate::core::records::{InboxRecord, Meta, ScheduleRecord, ShedRecord};
use crate::core::schedule::{
    due_runs, plan, run_id, Overlap, Progress, Rules, Spec, SpecRecord, SCHEDULE_NAME_LEN_MAX,
};
use crate::entity::Entity;
use crate::error::StoreError;
use crate::priority::Priority;
use crate::runtime::inner::Inner;
use crate::runtime::shared::check_key;
use crate::store::Op;
use crate::telemetry::Stats;

/// The most target keys one schedule may have (a run writes one inbox entry per target,
/// in one batch).
pub const SCHEDULE_TARGETS_MAX: usize = 10_000;
/// The most runs one backfill may fire.
pub const BACKFILL_RUNS_MAX: u64 = 1_000;
/// After a storage error, the scheduler tries again this much later.
const RETRY_AFTER_ERROR_MS: u64 = 100;

/// A schedule's definition: what to send, to whom, and when. Build it with
/// [`Schedule::every`] or [`Schedule::cron`], then create it with
/// [`Schedules::create`].
///
/// ```
/// use std::time::Duration;
/// use keystead::{Overlap, Priority, Schedule};
/// # use keystead::{Context, Entity, Failure, FailureKind};
/// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
/// # #[error("never")] struct Never;
/// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// # struct Product;
/// # #[derive(Debug, serde::Serialize, serde::Deserialize)] enum Cmd { Refresh }
/// # impl Entity for Product {
/// #     const NAME: &'static str = "product";
/// #     type State = u64; type Command = Cmd; type Reply = (); type Error = Never;
/// #     fn handle(_: &mut u64, _: &Cmd, _: &mut Context<'_>) -> Result<(), Never> { Ok(()) }
/// # }
/// let nightly = Schedule::<Product>::cron("refresh-nightly", "0 2 * * *", Cmd::Refresh)
///     .to_each(["p-1", "p-2"])
///     .priority(Priority::Low)
///     .sheddable()
///     .overlap(Overlap::Skip)
///     .catch_up_window(Duration::from_secs(6 * 3600));
/// ```
#[must_use]
pub struct Schedule<E: Entity> {
    name: String,
    spec: SpecRecord,
    command: E::Command,
    targets: Vec<String>,
    priority: Priority,
    sheddable: bool,
    overlap: Overlap,
    buffer_max: u32,
    catch_up_window: Duration,
    catch_up_runs_max: u32,
    jitter: Duration,
    pause_on_failure: bool,
    _entity: PhantomData<fn() -> E>,
}

impl<E: Entity> Clone for Schedule<E>
where
    E::Command: Clone,
{
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            spec: self.spec.clone(),
            command: self.command.clone(),
            targets: self.targets.clone(),
            priority: self.priority,
            sheddable: self.sheddable,
            overlap: self.overlap,
            buffer_max: self.buffer_max,
            catch_up_window: self.catch_up_window,
            catch_up_runs_max: self.catch_up_runs_max,
            jitter: self.jitter,
            pause_on_failure: self.pause_on_failure,
            _entity: PhantomData,
        }
    }
}

impl<E: Entity> std::fmt::Debug for Schedule<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("name", &self.name)
            .field("entity", &E::NAME)
            .field("spec", &self.spec)
            .field("targets", &self.targets.len())
            .field("overlap", &self.overlap)
            .finish_non_exhaustive()
    }
}

impl<E: Entity> Schedule<E> {
    fn new(name: impl Into<String>, spec: SpecRecord, command: E::Command) -> Self {
        Self {
            name: name.into(),
            spec,
            command,
            targets: Vec::new(),
            priority: Priority::Normal,
            sheddable: false,
            overlap: Overlap::Skip,
            buffer_max: 16,
            catch_up_window: Duration::from_secs(24 * 3600),
            catch_up_runs_max: 1,
            jitter: Duration::ZERO,
            pause_on_failure: false,
            _entity: PhantomData,
        }
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The keys it sends to, in the order given.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// A schedule named `name` that sends `command` every `interval`, on a grid from the
    /// Unix epoch (an hourly schedule runs on the hour, UTC, whenever it was created).
    pub fn every(name: impl Into<String>, interval: Duration, command: E::Command) -> Self {
        let every_ms = ms_of(interval);
        Self::new(
            name,
            SpecRecord::Every {
                every_ms,
                anchor_ms: 0,
            },
            command,
        )
    }

    /// A schedule named `name` that sends `command` when the cron expression `expr`
    /// matches: five fields (minute, hour, day of month, month, day of week) or six with
    /// seconds first, plus `L`, `W`, `#` and aliases such as `@hourly` (the
    /// [croner](https://docs.rs/croner) dialect). In UTC unless [`Schedule::time_zone`]
    /// says otherwise.
    pub fn cron(name: impl Into<String>, expr: impl Into<String>, command: E::Command) -> Self {
        Self::new(
            name,
            SpecRecord::Cron {
                expr: expr.into(),
                time_zone: None,
            },
            command,
        )
    }

    /// Reads the cron expression in the IANA time zone `zone` (`"Europe/Paris"`), with
    /// croner's daylight-saving rules: when the clocks go forward, a run whose time does
    /// not exist that day runs at the first time after the gap; when they go back, a
    /// fixed-time run (`30 2 * * *`) runs once, at its first occurrence, and an interval
    /// run (`*/15 * * * *`) runs in both hours. Needs keystead's `time-zones` feature
    /// (refused at creation without it). Default: UTC. No effect on [`Schedule::every`].
    pub fn time_zone(mut self, zone: impl Into<String>) -> Self {
        if let SpecRecord::Cron { time_zone, .. } = &mut self.spec {
            *time_zone = Some(zone.into());
        }
        self
    }

    /// Sends each run to entity `key` (call again, or use [`Schedule::to_each`], for
    /// more). At least one target is required; at most [`SCHEDULE_TARGETS_MAX`].
    pub fn to(mut self, key: impl Into<String>) -> Self {
        self.targets.push(key.into());
        self
    }

    /// Sends each run to every key in `keys`, in that order.
    pub fn to_each<K: Into<String>>(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.targets.extend(keys.into_iter().map(Into::into));
        self
    }

    /// The lane each run's messages wait in. Default: [`Priority::Normal`].
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// A run whose lane is full goes to the shed log (requeue it from there) instead of
    /// being refused for that target (counted in [`ScheduleStatus::targets_refused`] and
    /// logged). Default: not sheddable.
    pub fn sheddable(mut self) -> Self {
        self.sheddable = true;
        self
    }

    /// What a run that comes due while the previous one is unfinished does. Default:
    /// [`Overlap::Skip`].
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// For [`Overlap::BufferAll`], the most runs waiting (1 to 1,000). Default: 16.
    pub fn buffer_max(mut self, runs: u32) -> Self {
        self.buffer_max = runs;
        self
    }

    /// How late a run may still fire: a run due longer ago than this (the process was
    /// down, or the clock jumped) is counted missed instead. At least 1 s. Default: 24 h.
    pub fn catch_up_window(mut self, window: Duration) -> Self {
        self.catch_up_window = window;
        self
    }

    /// When several runs fell due while the process was down (or the clock jumped), at most
    /// the latest `runs` of those inside the catch-up window are considered (and then the
    /// overlap policy applies: under `Skip`, one fires); the older ones are missed. 1 to
    /// 1,000. Default: 1.
    pub fn catch_up_runs_max(mut self, runs: u32) -> Self {
        self.catch_up_runs_max = runs;
        self
    }

    /// Spreads each run's due time by a fixed offset in `[0, jitter)`, derived from the
    /// schedule's name and the run's nominal time (so every restart agrees). The run's id
    /// keeps the nominal time. For [`Schedule::every`], less than the interval. Default: 0.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Pauses the schedule when one of its runs dead-letters for a target (seen before its
    /// next run fires), with the reason in [`ScheduleStatus::paused`]; resume it with
    /// [`Schedules::resume`]. Default: off.
    pub fn pause_on_failure(mut self) -> Self {
        self.pause_on_failure = true;
        self
    }

    fn into_record(
        self,
        now_ms: u64,
        message_size_max: usize,
    ) -> Result<(ScheduleRecord, Spec), ScheduleError> {
        let name = self.name;
        let invalid = |setting: &'static str, reason: String| ScheduleError::Invalid {
            name: name.clone(),
            setting,
            reason,
        };
        if name.is_empty() || name.len() > SCHEDULE_NAME_LEN_MAX {
            return Err(invalid(
                "name",
                format!("a name is 1 to {SCHEDULE_NAME_LEN_MAX} bytes"),
            ));
        }
        if self.targets.is_empty() || self.targets.len() > SCHEDULE_TARGETS_MAX {
            return Err(invalid(
                "targets",
                format!(
                    "{} targets; give 1 to {SCHEDULE_TARGETS_MAX} keys with to() or to_each()",
                    self.targets.len()
                ),
            ));
        }
        for key in &self.targets {
            check_key(E::NAME, key).map_err(|e| invalid("targets", e.to_string()))?;
        }
        let spec = Spec::parse(&self.spec).map_err(|reason| invalid("spec", reason))?;
        let jitter_ms = ms_of(self.jitter);
        if let SpecRecord::Every { every_ms, .. } = self.spec {
            if jitter_ms >= every_ms {
                return Err(invalid(
                    "jitter",
                    "the jitter must be shorter than the interval, or runs would reorder".into(),
                ));
            }
        }
        if self.catch_up_window < Duration::from_secs(1) {
            return Err(invalid(
                "catch_up_window",
                "at least 1 s: a run fired a moment late must not count as missed".into(),
            ));
        }
        if !(1..=1000).contains(&self.buffer_max) || !(1..=1000).contains(&self.catch_up_runs_max) {
            return Err(invalid(
                "buffer_max",
                "buffer_max and catch_up_runs_max must be 1 to 1,000".into(),
            ));
        }
        let command = codec::encode(&self.command).map_err(|e| invalid("command", e))?;
        if command.len() > message_size_max {
            return Err(invalid(
                "command",
                format!(
                    "the command is {} bytes, over message_size_max ({message_size_max})",
                    command.len()
                ),
            ));
        }
        let record = ScheduleRecord {
            name,
            entity: E::NAME.to_string(),
            targets: self.targets,
            command,
            lane: self.priority.index() as u8,
            sheddable: self.sheddable,
            spec: self.spec,
            jitter_ms,
            overlap: self.overlap,
            buffer_max: self.buffer_max,
            catch_up_window_ms: ms_of(self.catch_up_window),
            catch_up_runs_max: self.catch_up_runs_max,
            pause_on_failure: self.pause_on_failure,
            created_at_ms: now_ms,
            progress: Progress {
                handled_until_ms: now_ms,
                ..Progress::default()
            },
        };
        Ok((record, spec))
    }
}

/// A schedule's definition and progress, as listed by [`Schedules::status`] and
/// [`Schedules::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScheduleStatus {
    /// The schedule's name.
    pub name: String,
    /// The entity type its runs go to.
    pub entity: String,
    /// How many keys each run goes to.
    pub targets: usize,
    /// `every <ms> ms` or `cron <expr> [zone]`.
    pub spec: String,
    /// Its overlap policy.
    pub overlap: Overlap,
    /// Why it is paused (`None` when it runs).
    pub paused: Option<String>,
    /// The nominal time of the last run fired, ms since the epoch.
    pub last_run_ms: Option<u64>,
    /// When that run was fired, on the runtime clock.
    pub last_fired_at_ms: Option<u64>,
    /// When the next run is due (jitter included), if one ever is.
    pub next_due_ms: Option<u64>,
    /// The run in progress (or the last one fired) whose finish the overlap policy waits
    /// for: its nominal time.
    pub running: Option<u64>,
    /// Runs waiting for it (buffered).
    pub buffered: usize,
    /// Runs fired when due, caught up, or from the buffer (not triggered or backfilled).
    pub fired: u64,
    /// Of those, fired late: after a downtime or a clock jump, or from the buffer of one.
    pub caught_up: u64,
    /// Runs skipped because the previous one was unfinished (or the schedule paused).
    pub skipped: u64,
    /// Runs not fired because they fell due while the process was down (or the clock
    /// jumped): outside the catch-up window, beyond `catch_up_runs_max`, or refused by the
    /// overlap policy while catching up.
    pub missed: u64,
    /// Runs fired by [`Schedules::trigger`].
    pub triggered: u64,
    /// Runs fired by [`Schedules::backfill`].
    pub backfilled: u64,
    /// Target messages refused because their lane was full (not sheddable).
    pub targets_refused: u64,
    /// Target messages moved to the shed log because their lane was full.
    pub targets_shed: u64,
    /// Runs seen dead-lettered for a target.
    pub runs_dead_lettered: u64,
}

/// A schedule operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The definition is not valid; nothing was written.
    #[error("schedule {name:?}: invalid {setting}: {reason}")]
    Invalid {
        /// The schedule's name.
        name: String,
        /// The setting concerned.
        setting: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// No schedule has this name.
    #[error("no schedule is named {name:?}; list them with Runtime::schedules().list()")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// The entity type is not registered.
    #[error("entity type {entity} is not registered; call RuntimeBuilder::register::<{entity}>() before open()")]
    NotRegistered {
        /// The entity type.
        entity: &'static str,
    },
    /// A backfill reaches back further than the dedup retention: runs that old may have
    /// happened and been forgotten, so firing them again could apply them twice.
    #[error("schedule {name:?}: a backfill from {from_ms} reaches before {horizon_ms} (now minus the dedup retention); runs before it may have happened and been forgotten, so they are not fired again: backfill a later range, or raise RuntimeBuilder::dedup_retention")]
    BackfillTooOld {
        /// The schedule's name.
        name: String,
        /// The start asked for, ms since the epoch.
        from_ms: u64,
        /// The earliest start accepted.
        horizon_ms: u64,
    },
    /// A backfill would fire more runs than [`BACKFILL_RUNS_MAX`].
    #[error(
        "schedule {name:?}: the range holds {runs} runs, more than {max} per backfill; split it"
    )]
    TooManyRuns {
        /// The schedule's name.
        name: String,
        /// Runs in the range (at least).
        runs: u64,
        /// The limit.
        max: u64,
    },
    /// The runtime was shut down.
    #[error("the runtime is closed; open it again")]
    Closed,
    /// The store failed; nothing was changed.
    #[error("{0}")]
    Storage(#[from] StoreError),
}

/// One schedule in memory: its record and its parsed spec.
struct Entry {
    record: ScheduleRecord,
    spec: Spec,
    next_due_ms: Option<u64>,
}

/// The scheduler's state, shared by the runtime handle (the operations) and the
/// `keystead-time` thread (the firing).
pub(crate) struct Scheduler {
    entries: tokio::sync::Mutex<BTreeMap<String, Entry>>,
    /// Woken when a schedule changes.
    wake: Notify,
    /// The earliest due time of any schedule (`u64::MAX` for none), for `Runtime::idle`.
    next_due_ms: AtomicU64,
    /// Runs buffered in all schedules, for `Runtime::idle`.
    buffered: AtomicU64,
    /// The work epoch read at the start of the last pass that found nothing to do, for
    /// `Runtime::idle`: buffered runs wait for work to finish, and the scheduler has seen
    /// every change up to it.
    checked_epoch: AtomicU64,
}

impl Scheduler {
    /// Loads every schedule from the store. A record that does not decode or whose spec
    /// no longer parses is left in place and logged.
    pub(crate) fn load(store: &crate::store::Store) -> Result<Scheduler, StoreError> {
        let mut entries = BTreeMap::new();
        for entry in store.scan_prefix(&[Space::Schedule as u8])? {
            let (key, value) = entry?;
            let record = match codec::decode::<ScheduleRecord>("schedule", &value) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(target: "keystead", key = ?key, error = %e, "a schedule cannot be read; it is left in place and not run");
                    continue;
                }
            };
            let spec = match Spec::parse(&record.spec) {
                Ok(spec) => spec,
                Err(reason) => {
                    tracing::error!(target: "keystead", schedule = %record.name, %reason, "a schedule's spec no longer parses; it is not run");
                    continue;
                }
            };
            entries.insert(
                record.name.clone(),
                Entry {
                    record,
                    spec,
                    next_due_ms: None,
                },
            );
        }
        Ok(Scheduler {
            entries: tokio::sync::Mutex::new(entries),
            wake: Notify::new(),
            next_due_ms: AtomicU64::new(0),
            buffered: AtomicU64::new(0),
            checked_epoch: AtomicU64::new(u64::MAX),
        })
    }

    /// True when the scheduler has nothing due at `now_ms` and has seen every change of
    /// the work it may be waiting for (`epoch`).
    pub(crate) fn idle_at(&self, now_ms: u64, epoch: u64) -> bool {
        self.next_due_ms.load(Ordering::SeqCst) > now_ms
            && (self.buffered.load(Ordering::SeqCst) == 0
                || self.checked_epoch.load(Ordering::SeqCst) == epoch)
    }

    /// Lowers the earliest due time `idle` reads to `due` (a schedule just created or
    /// changed), before the scheduler's next pass has looked at it.
    fn due_by(&self, due: Option<u64>) {
        if let Some(due) = due {
            self.next_due_ms.fetch_min(due, Ordering::SeqCst);
        }
    }

    /// One look at every schedule: decides and fires what is due. Returns when to wake
    /// next, and whether runs are buffered (then finished work must wake it too).
    async fn pass(&self, inner: &Inner) -> (Option<u64>, bool) {
        let stats = &inner.shared.stats;
        let epoch = stats.work_epoch.load(Ordering::SeqCst);
        let mut entries = self.entries.lock().await;
        let now = inner.shared.clock.now_ms();
        let (mut next, mut buffered) = (None::<u64>, 0u64);
        for entry in entries.values_mut() {
            match decide(inner, entry, now).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(target: "keystead", schedule = %entry.record.name, error = %e,
                        "a schedule's runs could not be written; trying again");
                    entry.next_due_ms = Some(now.saturating_add(RETRY_AFTER_ERROR_MS));
                }
            }
            if let Some(due) = entry.next_due_ms {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
            // Runs buffered in a paused schedule wait for its resume, not for work.
            if entry.record.progress.paused.is_none() {
                buffered += entry.record.progress.buffered.len() as u64;
            }
        }
        self.next_due_ms
            .store(next.unwrap_or(u64::MAX), Ordering::SeqCst);
        self.buffered.store(buffered, Ordering::SeqCst);
        // Every change of work up to `epoch` has been looked at (what this pass fired moved
        // the epoch on, and is in flight).
        self.checked_epoch.store(epoch, Ordering::SeqCst);
        // Always: `idle` may be waiting for this pass's due time (the first pass after open
        // replaces the initial 0).
        stats.notify();
        (next, buffered > 0)
    }
}

/// Decides schedule `entry`'s due runs at `now_ms` and fires them, with its new progress,
/// in one commit. Returns whether anything was written.
async fn decide(inner: &Inner, entry: &mut Entry, now_ms: u64) -> Result<bool, StoreError> {
    let record = &entry.record;
    let rules = rules_of(record);
    let (due, next_due) = due_runs(
        &entry.spec,
        &record.name,
        &rules,
        record.progress.handled_until_ms,
        now_ms,
    );
    entry.next_due_ms = next_due;
    let progress = &record.progress;
    if due.count == 0 && progress.buffered.is_empty() {
        // Nothing due and nothing waiting: nothing to decide (and no copy of the record).
        return Ok(false);
    }
    let check = progress.running.filter(|_| progress.paused.is_none());
    let mut next = record.clone();
    let mut finished = true;
    if let Some(running) = check {
        let found = check_run(inner, record, running)?;
        finished = found.finished;
        if let Some(target) = found.dead_lettered {
            if record.pause_on_failure {
                next.progress.paused = Some(format!(
                    "run {} dead-lettered for {target:?} (pause_on_failure)",
                    run_id(&record.name, running)
                ));
            }
            next.progress.counters.runs_dead_lettered += 1;
            // Reported once: the run is over.
            next.progress.running = None;
        }
    }
    let buffered_before = next.progress.buffered.len() as u64;
    let decisions = plan(&mut next.progress, &rules, &due, finished, now_ms);
    let nominals: Vec<u64> = decisions.fire.iter().map(|(nominal, _)| *nominal).collect();
    fire(inner, &mut next, &nominals, now_ms).await?;
    let (before, after) = (record.progress.counters, next.progress.counters);
    let stats = &inner.shared.stats;
    stats
        .schedule_runs_skipped
        .fetch_add(after.skipped - before.skipped, Ordering::Relaxed);
    stats
        .schedule_runs_missed
        .fetch_add(after.missed - before.missed, Ordering::Relaxed);
    // At most one buffered run fires per wake (the first, when the running one finished).
    let popped = u64::from(
        record
            .progress
            .buffered
            .front()
            .is_some_and(|(buffered, _)| {
                decisions
                    .fire
                    .first()
                    .is_some_and(|(fired, _)| fired == buffered)
            }),
    );
    let entered = (next.progress.buffered.len() as u64 + popped).saturating_sub(buffered_before);
    stats
        .schedule_runs_buffered
        .fetch_add(entered, Ordering::Relaxed);
    entry.record = next;
    Ok(true)
}

fn rules_of(record: &ScheduleRecord) -> Rules {
    Rules {
        overlap: record.overlap,
        buffer_max: record.buffer_max,
        catch_up_window_ms: record.catch_up_window_ms,
        catch_up_runs_max: record.catch_up_runs_max,
        jitter_ms: record.jitter_ms,
    }
}

fn lane_of(record: &ScheduleRecord) -> Priority {
    Priority::from_index(record.lane).unwrap_or_default()
}

/// What the store says of one run.
struct RunCheck {
    /// No target holds its message in the inbox or an effect of it in the outbox.
    finished: bool,
    /// A target whose copy of it was dead-lettered.
    dead_lettered: Option<String>,
}

/// Reads, for each target, whether run `nominal` of `record` is still pending there.
fn check_run(inner: &Inner, record: &ScheduleRecord, nominal: u64) -> Result<RunCheck, StoreError> {
    let id = run_id(&record.name, nominal);
    let store = &inner.store;
    let mut found = RunCheck {
        finished: true,
        dead_lettered: None,
    };
    for target in &record.targets {
        let inbox = keys::entity_prefix(Space::Inbox, &record.entity, target);
        for entry in store.scan_prefix(&inbox)? {
            let (_, value) = entry?;
            if codec::decode::<InboxRecord>("inbox entry", &value)
                .is_ok_and(|r| r.meta.message_id == id)
            {
                found.finished = false;
                return Ok(found);
            }
        }
        let outbox = keys::entity_prefix(Space::Outbox, &record.entity, target);
        for entry in store.scan_prefix(&outbox)? {
            let (_, value) = entry?;
            if codec::decode::<EffectRecord>("effect record", &value)
                .is_ok_and(|r| r.info.effect_key.message_id == id)
            {
                found.finished = false;
                return Ok(found);
            }
        }
        if found.dead_lettered.is_none()
            && store
                .get(&keys::dead_letter(&record.entity, target, &id))?
                .is_some()
        {
            found.dead_lettered = Some(target.clone());
        }
    }
    Ok(found)
}

/// Writes runs `nominals` of `record` (an inbox entry per target, or a shed entry when the
/// lane is full and the schedule is sheddable) and `record` itself, in one commit, then
/// tells the lane feeders. On failure nothing is written and the room taken is given back.
async fn fire(
    inner: &Inner,
    record: &mut ScheduleRecord,
    nominals: &[u64],
    now_ms: u64,
) -> Result<(), StoreError> {
    let shared = &inner.shared;
    let lane = lane_of(record);
    let mut ops = Vec::new();
    let mut accepted = Vec::new();
    let (mut taken, mut taken_bytes, mut seq_max) = (0u64, 0u64, 0u64);
    for &nominal in nominals {
        let id = run_id(&record.name, nominal);
        let inbox = InboxRecord {
            meta: Meta {
                message_id: id.clone(),
                correlation_id: id.clone(),
                version: None,
                accepted_at_ms: now_ms,
            },
            command: record.command.clone(),
        };
        let bytes = codec::encode(&inbox).map_err(|detail| StoreError::Corrupt {
            op: "encode a scheduled run",
            detail,
        })?;
        for target in &record.targets {
            let size = bytes.len() as u64;
            match shared.backlog.try_reserve(lane, size) {
                Ok(()) => {
                    taken += 1;
                    taken_bytes += size;
                    let seq = shared.next_seq();
                    seq_max = seq;
                    let inbox_key = keys::inbox_in(&record.entity, target, seq, lane);
                    ops.push(Op::Put(
                        shared.lane_index(&record.entity, target, lane, seq),
                        inbox_key.clone(),
                    ));
                    ops.push(Op::Put(inbox_key, bytes.clone()));
                    accepted.push((target.clone(), seq));
                }
                Err(_) if record.sheddable => {
                    let shed = ShedRecord {
                        meta: inbox.meta.clone(),
                        command: inbox.command.clone(),
                        lane: record.lane,
                        shed_at_ms: now_ms,
                    };
                    let shed = codec::encode(&shed).map_err(|detail| StoreError::Corrupt {
                        op: "encode a shed run",
                        detail,
                    })?;
                    ops.push(Op::Put(keys::shed(&record.entity, target, &id), shed));
                    record.progress.counters.targets_shed += 1;
                    Stats::bump(&shared.stats.lanes[lane.index()].shed);
                }
                Err(full) => {
                    record.progress.counters.targets_refused += 1;
                    Stats::bump(&shared.stats.lanes[lane.index()].refused);
                    tracing::warn!(target: "keystead", schedule = %record.name, entity = %record.entity,
                        key = %target, message_id = %id, lane = %lane, pending = full.pending,
                        "a scheduled run was refused for this target: its lane is full (mark the schedule sheddable to keep such runs in the shed log)");
                }
            }
        }
    }
    let bytes = codec::encode(&*record).map_err(|detail| StoreError::Corrupt {
        op: "encode a schedule",
        detail,
    })?;
    ops.push(Op::Put(keys::schedule(&record.name), bytes));
    // Inbox entries being written are work `idle` waits for, until their feeders know;
    // a write of the progress alone (a skipped run's count) is not.
    let work = !accepted.is_empty();
    if work {
        shared.stats.work_up(&shared.stats.time_firing);
    }
    let committed = inner.store.commit_with_seq(ops, seq_max).await;
    if committed.is_ok() {
        for (target, seq) in &accepted {
            shared.accepted(&record.entity, target, lane, *seq);
        }
    } else {
        shared.backlog.release_n(lane, taken, taken_bytes);
    }
    if work {
        shared.stats.work_down(&shared.stats.time_firing);
    }
    committed?;
    shared
        .stats
        .schedule_runs
        .fetch_add(nominals.len() as u64, Ordering::Relaxed);
    if !nominals.is_empty() {
        tracing::info!(target: "keystead", schedule = %record.name, runs = nominals.len(),
            targets = record.targets.len(), "scheduled runs fired");
    }
    Ok(())
}

/// The scheduler's loop on `keystead-time`.
pub(crate) async fn run(inner: Weak<Inner>, scheduler: Arc<Scheduler>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.is_closed() {
            return;
        }
        let (shared, delayed) = (strong.shared.clone(), strong.delayed.clone());
        let closing = delayed.wake.notified();
        let changed = scheduler.wake.notified();
        let finished = shared.stats.changed.notified();
        tokio::pin!(closing, changed, finished);
        closing.as_mut().enable();
        changed.as_mut().enable();
        finished.as_mut().enable();
        let (next, buffered) = scheduler.pass(&strong).await;
        drop(strong);
        let clock = shared.clock.clone();
        let sleep = async {
            match next {
                Some(at) => clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let work = async {
            if buffered {
                finished.await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = closing => {}
            _ = changed => {}
            _ = work => {}
        }
    }
}

/// The schedules of a runtime: create, update, pause, resume, trigger, backfill, delete,
/// and read their status. Get it with [`Runtime::schedules`](crate::Runtime::schedules).
/// Every operation is durable (written before it returns) and idempotent.
///
/// ```
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
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use keystead::{ManualClock, Schedule};
/// let clock = ManualClock::new(0);
/// # let dir = tempfile::tempdir()?;
/// let rt = Runtime::builder(dir.path()).clock(clock.clone()).register::<Counter>().open()?;
/// rt.schedules()
///     .create(Schedule::<Counter>::every("tick", Duration::from_secs(60), 1).to("c-1"))
///     .await?;
/// clock.advance(Duration::from_secs(60)); // the first run falls due
/// rt.idle().await;
/// assert_eq!(rt.entity::<Counter>("c-1").snapshot().await?.state, 1);
/// let status = rt.schedules().status("tick").await?.expect("created");
/// assert_eq!((status.fired, status.next_due_ms), (1, Some(120_000)));
/// # rt.shutdown().await; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Schedules {
    pub(crate) inner: Weak<Inner>,
    pub(crate) scheduler: Arc<Scheduler>,
}

impl std::fmt::Debug for Schedules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedules").finish_non_exhaustive()
    }
}

impl Schedules {
    fn runtime(&self) -> Result<Arc<Inner>, ScheduleError> {
        self.inner
            .upgrade()
            .filter(|i| !i.is_closed())
            .ok_or(ScheduleError::Closed)
    }

    /// Creates schedule `schedule`, or updates the one of that name: an identical
    /// definition changes nothing (creating twice is safe), another one replaces it and
    /// keeps its progress and counters (runs already decided stay decided). The first run
    /// is the first one due after now. Returns its status.
    ///
    /// # Errors
    /// [`ScheduleError::Invalid`] naming the setting; [`ScheduleError::NotRegistered`];
    /// [`ScheduleError::Storage`]; [`ScheduleError::Closed`].
    pub async fn create<E: Entity>(
        &self,
        schedule: Schedule<E>,
    ) -> Result<ScheduleStatus, ScheduleError> {
        let inner = self.runtime()?;
        if !inner.registered::<E>() {
            return Err(ScheduleError::NotRegistered { entity: E::NAME });
        }
        let now = inner.shared.clock.now_ms();
        let (mut record, spec) = schedule.into_record(now, inner.shared.config.message_size_max)?;
        let mut entries = self.scheduler.entries.lock().await;
        if let Some(existing) = entries.get(&record.name) {
            let same = ScheduleRecord {
                created_at_ms: existing.record.created_at_ms,
                progress: existing.record.progress.clone(),
                ..record.clone()
            };
            if same == existing.record {
                return Ok(status_of(existing));
            }
            record.created_at_ms = existing.record.created_at_ms;
            record.progress = existing.record.progress.clone();
        }
        write(&inner, &record).await?;
        let entry = Entry {
            next_due_ms: next_due(&spec, &record),
            record,
            spec,
        };
        let status = status_of(&entry);
        self.scheduler.due_by(entry.next_due_ms);
        entries.insert(entry.record.name.clone(), entry);
        drop(entries);
        self.scheduler.wake.notify_waiters();
        Ok(status)
    }

    /// The status of schedule `name`, or `None` if there is none.
    ///
    /// # Errors
    /// [`ScheduleError::Closed`].
    pub async fn status(&self, name: &str) -> Result<Option<ScheduleStatus>, ScheduleError> {
        let _inner = self.runtime()?;
        let entries = self.scheduler.entries.lock().await;
        Ok(entries.get(name).map(status_of))
    }

    /// Every schedule's status, in name order.
    ///
    /// # Errors
    /// [`ScheduleError::Closed`].
    pub async fn list(&self) -> Result<Vec<ScheduleStatus>, ScheduleError> {
        let _inner = self.runtime()?;
        let entries = self.scheduler.entries.lock().await;
        Ok(entries.values().map(status_of).collect())
    }

    /// Pauses schedule `name`: its runs that fall due are counted skipped (or missed, when
    /// late) and not fired, until [`Schedules::resume`]. Pausing a paused schedule changes
    /// nothing.
    ///
    /// # Errors
    /// [`ScheduleError::NotFound`], [`ScheduleError::Storage`], [`ScheduleError::Closed`].
    pub async fn pause(&self, name: &str) -> Result<ScheduleStatus, ScheduleError> {
        self.change(name, |record| {
            record
                .progress
                .paused
                .get_or_insert_with(|| "paused by an operator".to_string());
        })
        .await
    }

    /// Resumes schedule `name`: the next run due fires (runs that fell due while paused
    /// stay skipped). Resuming a running schedule changes nothing.
    ///
    /// # Errors
    /// [`ScheduleError::NotFound`], [`ScheduleError::Storage`], [`ScheduleError::Closed`].
    pub async fn resume(&self, name: &str) -> Result<ScheduleStatus, ScheduleError> {
        self.change(name, |record| record.progress.paused = None)
            .await
    }

    async fn change(
        &self,
        name: &str,
        edit: impl FnOnce(&mut ScheduleRecord),
    ) -> Result<ScheduleStatus, ScheduleError> {
        let inner = self.runtime()?;
        let mut entries = self.scheduler.entries.lock().await;
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| ScheduleError::NotFound {
                name: name.to_string(),
            })?;
        let mut record = entry.record.clone();
        edit(&mut record);
        if record != entry.record {
            write(&inner, &record).await?;
            entry.record = record;
        }
        let status = status_of(entry);
        self.scheduler.due_by(status.next_due_ms);
        drop(entries);
        self.scheduler.wake.notify_waiters();
        Ok(status)
    }

    /// Deletes schedule `name`; returns whether it existed. Runs already fired are not
    /// taken back.
    ///
    /// # Errors
    /// [`ScheduleError::Storage`], [`ScheduleError::Closed`].
    pub async fn delete(&self, name: &str) -> Result<bool, ScheduleError> {
        let inner = self.runtime()?;
        let mut entries = self.scheduler.entries.lock().await;
        if !entries.contains_key(name) {
            return Ok(false);
        }
        inner
            .store
            .commit(vec![Op::Delete(keys::schedule(name))])
            .await?;
        entries.remove(name);
        drop(entries);
        self.scheduler.wake.notify_waiters();
        Ok(true)
    }

    /// Fires a run of schedule `name` now, whatever its spec, overlap policy or pause: its
    /// nominal time is now (ms on the runtime clock), returned, and its id derives from it
    /// like any run's. A trigger in the same millisecond as a run that already happened
    /// has that run's id, so it is applied once.
    ///
    /// # Errors
    /// [`ScheduleError::NotFound`], [`ScheduleError::Storage`], [`ScheduleError::Closed`].
    pub async fn trigger(&self, name: &str) -> Result<u64, ScheduleError> {
        let inner = self.runtime()?;
        let now = inner.shared.clock.now_ms();
        let mut entries = self.scheduler.entries.lock().await;
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| ScheduleError::NotFound {
                name: name.to_string(),
            })?;
        let mut record = entry.record.clone();
        record.progress.counters.triggered += 1;
        fire(&inner, &mut record, &[now], now).await?;
        entry.record = record;
        Ok(now)
    }

    /// Fires every run of schedule `name` whose nominal time is in `from..=to`, oldest
    /// first, at once (not through the overlap policy), with their usual ids: a run that
    /// already happened is applied once by each target (its id is remembered for the dedup
    /// retention, which is why the range may not start before now minus that retention).
    /// Returns how many runs were fired.
    ///
    /// # Errors
    /// [`ScheduleError::BackfillTooOld`], [`ScheduleError::TooManyRuns`],
    /// [`ScheduleError::NotFound`], [`ScheduleError::Storage`], [`ScheduleError::Closed`].
    pub async fn backfill(
        &self,
        name: &str,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<u64, ScheduleError> {
        let inner = self.runtime()?;
        let (from_ms, to_ms) = (epoch_ms(from), epoch_ms(to));
        let now = inner.shared.clock.now_ms();
        let retention = ms_of(inner.shared.config.dedup_retention);
        let horizon_ms = now.saturating_sub(retention);
        if from_ms < horizon_ms {
            return Err(ScheduleError::BackfillTooOld {
                name: name.to_string(),
                from_ms,
                horizon_ms,
            });
        }
        let mut entries = self.scheduler.entries.lock().await;
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| ScheduleError::NotFound {
                name: name.to_string(),
            })?;
        let mut nominals = Vec::new();
        let mut cursor = from_ms.saturating_sub(1);
        while let Some(nominal) = entry.spec.next_after(cursor) {
            if nominal > to_ms {
                break;
            }
            if nominals.len() as u64 == BACKFILL_RUNS_MAX {
                return Err(ScheduleError::TooManyRuns {
                    name: name.to_string(),
                    runs: BACKFILL_RUNS_MAX + 1,
                    max: BACKFILL_RUNS_MAX,
                });
            }
            nominals.push(nominal);
            cursor = nominal;
        }
        let mut record = entry.record.clone();
        record.progress.counters.backfilled += nominals.len() as u64;
        fire(&inner, &mut record, &nominals, now).await?;
        entry.record = record;
        Ok(nominals.len() as u64)
    }
}

async fn write(inner: &Inner, record: &ScheduleRecord) -> Result<(), ScheduleError> {
    let bytes = codec::encode(record).map_err(|reason| ScheduleError::Invalid {
        name: record.name.clone(),
        setting: "command",
        reason,
    })?;
    inner
        .store
        .commit(vec![Op::Put(keys::schedule(&record.name), bytes)])
        .await?;
    Ok(())
}

fn next_due(spec: &Spec, record: &ScheduleRecord) -> Option<u64> {
    let nominal = spec.next_after(record.progress.handled_until_ms)?;
    Some(nominal.saturating_add(crate::core::schedule::jitter_of(
        &record.name,
        nominal,
        record.jitter_ms,
    )))
}

fn status_of(entry: &Entry) -> ScheduleStatus {
    let record = &entry.record;
    let progress = &record.progress;
    let counters = progress.counters;
    ScheduleStatus {
        name: record.name.clone(),
        entity: record.entity.clone(),
        targets: record.targets.len(),
        spec: match &record.spec {
            SpecRecord::Every { every_ms, .. } => format!("every {every_ms} ms"),
            SpecRecord::Cron { expr, time_zone } => match time_zone {
                Some(zone) => format!("cron {expr} {zone}"),
                None => format!("cron {expr}"),
            },
        },
        overlap: record.overlap,
        paused: progress.paused.clone(),
        last_run_ms: progress.last_fired.map(|(nominal, _)| nominal),
        last_fired_at_ms: progress.last_fired.map(|(_, at)| at),
        next_due_ms: next_due(&entry.spec, record),
        running: progress.running,
        buffered: progress.buffered.len(),
        fired: counters.fired,
        caught_up: counters.caught_up,
        skipped: counters.skipped,
        missed: counters.missed,
        triggered: counters.triggered,
        backfilled: counters.backfilled,
        targets_refused: counters.targets_refused,
        targets_shed: counters.targets_shed,
        runs_dead_lettered: counters.runs_dead_lettered,
    }
}
