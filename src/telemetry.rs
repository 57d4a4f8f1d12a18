//! Names of spans and fields, and the runtime's counters.
//!
//! The library emits `tracing` spans and events and never installs a subscriber. Each
//! message is handled inside one span named [`SPAN_MESSAGE`] with the fields listed below;
//! payloads and replies are recorded only when `RuntimeBuilder::log_payloads(true)`.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::outcome::OutcomeKind;
use crate::priority::Priority;

/// The span around the processing of one message.
pub const SPAN_MESSAGE: &str = "keystead.message";
/// The event emitted when a message reaches its outcome.
pub const EVENT_OUTCOME: &str = "keystead.outcome";
/// The tracing target of every span and event keystead emits.
pub const TARGET: &str = "keystead";

/// Field names carried by [`SPAN_MESSAGE`].
pub mod field {
    /// Entity type name.
    pub const ENTITY: &str = "entity";
    /// Entity key.
    pub const KEY: &str = "key";
    /// Message id.
    pub const MESSAGE_ID: &str = "message_id";
    /// Correlation id.
    pub const CORRELATION_ID: &str = "correlation_id";
    /// Attempt number (1-based) of the last attempt.
    pub const ATTEMPT: &str = "attempt";
    /// The message's source version, if any.
    pub const VERSION: &str = "version";
    /// The entity's revision after the message.
    pub const REVISION: &str = "revision";
    /// The outcome (see [`OutcomeKind::as_str`](crate::OutcomeKind::as_str)), or "conflict" / "error".
    pub const OUTCOME: &str = "outcome";
    /// Processing time in microseconds, from the first attempt to the reply.
    pub const DURATION_US: &str = "duration_us";
}

/// A snapshot of the runtime's counters since it was opened.
///
/// ```
/// let stats = keystead::RuntimeStats::default();
/// assert_eq!(stats.applied, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeStats {
    /// Entity actors alive now.
    pub live_entities: u64,
    /// Entity actors started (first activation or reactivation).
    pub activations: u64,
    /// Entity actors stopped after being idle.
    pub passivations: u64,
    /// Admitted messages and jobs not finished yet.
    pub in_flight: u64,
    /// Messages accepted into the inbox and not yet retired: the sum of the lanes'
    /// `pending` (counted from the disk at open, then as they come and go).
    pub inbox_pending: u64,
    /// Messages applied.
    pub applied: u64,
    /// Duplicates answered from the dedup store.
    pub duplicate: u64,
    /// Stale messages dropped.
    pub stale: u64,
    /// Messages rejected by their handler.
    pub rejected: u64,
    /// Messages moved to the dead letters.
    pub dead_lettered: u64,
    /// Conflicts reported to callers.
    pub conflicts: u64,
    /// Retries scheduled.
    pub retries: u64,
    /// Handler panics caught.
    pub handler_panics: u64,
    /// Entities whose effects are being performed now (lanes), plus independent effects
    /// running on their own.
    pub effect_lanes: u64,
    /// Effects performed.
    pub effects_done: u64,
    /// Effects that failed permanently.
    pub effects_failed: u64,
    /// Effects whose attempts ran out.
    pub effects_dead_lettered: u64,
    /// Effects superseded by a newer one of their coalescing type before they started
    /// ([`Effect::COALESCE`](crate::Effect::COALESCE)).
    pub effects_superseded: u64,
    /// Effect retries scheduled.
    pub effect_retries: u64,
    /// Write requests committed (one per message step, acceptance or admin action).
    pub commits: u64,
    /// Atomic batches applied: many commits each under load (group commit).
    pub commit_batches: u64,
    /// Flushes to disk: one per batch or fewer (a flush covers every batch applied before it).
    pub flushes: u64,
    /// Shard admission, per lane, indexed as [`Priority::ALL`] (highest first); read one
    /// with [`RuntimeStats::lane`].
    pub lanes: [LaneStats; 4],
    /// The effect workers' admission, per lane (an effect waits in the lane of the message
    /// that recorded it), indexed as [`Priority::ALL`]; read one with
    /// [`RuntimeStats::effect_priority`]. Here `pending` and `pending_bytes` count the
    /// outbox (effects not finished, their payload bytes), `refused` counts `ask`s refused
    /// because their effects found no room, `blocked` messages that waited for room, and
    /// `shed` stays 0.
    pub effect_priorities: [LaneStats; 4],
    /// Entities' effect workers admitted, per lane: at most
    /// [`RuntimeBuilder::effect_lanes_max`](crate::RuntimeBuilder::effect_lanes_max) run at
    /// once, so memory stays flat however many entities have effects pending (the rest wait
    /// on disk, found in order by the outbox lane index). Read one with
    /// [`RuntimeStats::effect_activation`]; `pending`, `pending_bytes`, `refused`, `shed`
    /// and `blocked` stay 0 here.
    pub effect_activations: [LaneStats; 4],
    /// Times a caller waited because its entity already held its share of the shard
    /// ([`RuntimeBuilder::entity_in_flight_max`](crate::RuntimeBuilder::entity_in_flight_max)).
    pub entity_capped: u64,
    /// Delayed messages accepted and waiting for their due time (`Tell::after`, `Tell::at`).
    /// They are counted in their lane's `pending` too.
    pub timers_pending: u64,
    /// Delayed messages moved into the inbox at their due time.
    pub timers_fired: u64,
    /// Delayed messages cancelled before they were due.
    pub timers_cancelled: u64,
    /// Runs fired by schedules (on time, caught up, from a buffer, triggered, backfilled).
    pub schedule_runs: u64,
    /// Scheduled runs skipped because the previous run was unfinished (or the schedule
    /// paused), summed over the schedules.
    pub schedule_runs_skipped: u64,
    /// Scheduled runs missed (fell due while the process was down, or the clock jumped),
    /// summed over the schedules.
    pub schedule_runs_missed: u64,
    /// Scheduled runs put in a buffer to wait for the previous one.
    pub schedule_runs_buffered: u64,
    /// Times the change feed found more than `feed_retention` records behind its slowest
    /// consumer (it keeps them, and warns: acknowledge, or remove the consumer).
    pub feed_held_back: u64,
    /// The last change feed position given (0: none yet).
    pub feed_last: u64,
    /// Per effect type with limits ([`EffectLimits`](crate::EffectLimits) beyond a
    /// timeout), in name order: its breaker and parked work. Read one with
    /// [`RuntimeStats::effect_type`].
    pub effect_types: Vec<EffectTypeStats>,
}

/// One effect type's limits, live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EffectTypeStats {
    /// The effect type's name.
    pub name: String,
    /// Where its circuit breaker is (`Closed` without one).
    pub breaker: crate::BreakerState,
    /// Times the breaker opened (a failed probe reopens it: counted too).
    pub breaker_opened: u64,
    /// Times its cool-down ended and it let a probe through.
    pub breaker_half_opened: u64,
    /// Times a probe succeeded and closed it.
    pub breaker_closed: u64,
    /// Probe attempts handed out.
    pub probes: u64,
    /// Attempts of this type running now.
    pub running: u64,
    /// Entities (and independent effects) parked now, waiting for the type to open up
    /// without holding a worker.
    pub parked: u64,
    /// Times work parked, since open.
    pub parks: u64,
    /// Times parked work was handed an admission and a worker again.
    pub resumed: u64,
    /// While the breaker is open: when its cool-down ends, ms since the epoch on the
    /// runtime clock (0 otherwise).
    pub breaker_open_until_ms: u64,
    /// Retryable failures not counted against their effect's attempts because the breaker
    /// was open after them (the provider's failure, not the effect's).
    pub attempts_uncounted: u64,
}

impl RuntimeStats {
    /// The limits counters of effect type `name`, if it has limits.
    ///
    /// ```
    /// assert!(keystead::RuntimeStats::default().effect_type("enrich").is_none());
    /// ```
    pub fn effect_type(&self, name: &str) -> Option<&EffectTypeStats> {
        self.effect_types.iter().find(|t| t.name == name)
    }

    /// The counters of one lane.
    ///
    /// ```
    /// use keystead::{Priority, RuntimeStats};
    /// assert_eq!(RuntimeStats::default().lane(Priority::Low).admitted, 0);
    /// ```
    pub fn lane(&self, priority: Priority) -> &LaneStats {
        &self.lanes[priority.index()]
    }

    /// The effect workers' counters of one lane.
    pub fn effect_priority(&self, priority: Priority) -> &LaneStats {
        &self.effect_priorities[priority.index()]
    }

    /// The counters of entities' effect workers admitted in one lane.
    pub fn effect_activation(&self, priority: Priority) -> &LaneStats {
        &self.effect_activations[priority.index()]
    }
}

/// One lane's admission counters, summed over the shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LaneStats {
    /// Slots held now by this lane's messages.
    pub in_flight: u64,
    /// Callers waiting for a slot now.
    pub waiting: u64,
    /// Callers admitted since open.
    pub admitted: u64,
    /// Of those, how many had to wait.
    pub waited: u64,
    /// Of those, how many were admitted by promotion (the lane had been passed over
    /// [`RuntimeBuilder::lane_promote_after`](crate::RuntimeBuilder::lane_promote_after)
    /// times, or took a slot of a higher lane's reserve that way).
    pub promoted: u64,
    /// The longest wait for a slot, in microseconds.
    pub wait_us_max: u64,
    /// Messages of this lane accepted into the durable inbox and not yet processed.
    pub pending: u64,
    /// Their encoded size in bytes.
    pub pending_bytes: u64,
    /// `tell`s refused with `SubmitError::Overloaded` because the lane was full.
    pub refused: u64,
    /// Sheddable `tell`s moved to the shed log because the lane was full.
    pub shed: u64,
    /// Work that waited for room because the lane's backlog was full: `tell`s under
    /// [`WhenFull::Block`](crate::WhenFull::Block) (shard lanes), messages whose effects
    /// waited for room in the outbox (effect lanes).
    pub blocked: u64,
}

/// One lane's live counters.
#[derive(Debug, Default)]
pub(crate) struct LaneCounters {
    pub in_flight: AtomicU64,
    pub waiting: AtomicU64,
    pub admitted: AtomicU64,
    pub waited: AtomicU64,
    pub promoted: AtomicU64,
    pub wait_us_max: AtomicU64,
    pub refused: AtomicU64,
    pub shed: AtomicU64,
    pub blocked: AtomicU64,
}

impl LaneCounters {
    fn snapshot(&self) -> LaneStats {
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        LaneStats {
            in_flight: get(&self.in_flight),
            waiting: get(&self.waiting),
            admitted: get(&self.admitted),
            waited: get(&self.waited),
            promoted: get(&self.promoted),
            wait_us_max: get(&self.wait_us_max),
            pending: 0,
            pending_bytes: 0,
            refused: get(&self.refused),
            shed: get(&self.shed),
            blocked: get(&self.blocked),
        }
    }
}

/// The store's counters (written by the committer and flusher threads).
#[derive(Debug, Default)]
pub(crate) struct StoreCounters {
    pub commits: AtomicU64,
    pub batches: AtomicU64,
    pub flushes: AtomicU64,
}

/// Live counters shared by every part of the runtime.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub live_entities: AtomicU64,
    pub activations: AtomicU64,
    pub passivations: AtomicU64,
    pub in_flight: AtomicU64,
    pub applied: AtomicU64,
    pub duplicate: AtomicU64,
    pub stale: AtomicU64,
    pub rejected: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub conflicts: AtomicU64,
    pub retries: AtomicU64,
    pub handler_panics: AtomicU64,
    pub effect_lanes: AtomicU64,
    pub effects_done: AtomicU64,
    pub effects_failed: AtomicU64,
    pub effects_dead_lettered: AtomicU64,
    pub effects_superseded: AtomicU64,
    pub effect_retries: AtomicU64,
    /// Lane feeders (one per shard and lane) that have not read everything accepted.
    pub feeds_behind: AtomicU64,
    /// Bumped at every change of the counters `idle` reads (work in flight, effect
    /// workers, feeders behind, parked and running work of effect types), so that `idle`
    /// can tell a consistent reading of them from one torn by a change in the middle.
    pub work_epoch: AtomicU64,
    pub lanes: [LaneCounters; 4],
    pub effect_priorities: [LaneCounters; 4],
    pub effect_activations: [LaneCounters; 4],
    pub entity_capped: AtomicU64,
    pub timers_pending: AtomicU64,
    pub timers_fired: AtomicU64,
    pub timers_cancelled: AtomicU64,
    pub schedule_runs: AtomicU64,
    pub schedule_runs_skipped: AtomicU64,
    pub schedule_runs_missed: AtomicU64,
    pub schedule_runs_buffered: AtomicU64,
    pub feed_held_back: AtomicU64,
    /// Passes of the timer firer and runs of the scheduler being written now (work `idle`
    /// waits for).
    pub time_firing: AtomicU64,
    /// Woken whenever work finishes or an actor stops, for [`Runtime::idle`](crate::Runtime::idle)
    /// and [`Runtime::wait_until`](crate::Runtime::wait_until).
    pub changed: Notify,
}

impl Stats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Decrements without wrapping: a counter that would go below zero stays at zero (the
    /// inbox count starts from a scan and must never underflow on a message counted twice).
    pub(crate) fn drop_one(counter: &AtomicU64) {
        let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
    }

    /// Work entered a stage `idle` watches (`counter` is one of its counters).
    pub(crate) fn work_up(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.work_moved();
    }

    /// Work left a stage `idle` watches.
    pub(crate) fn work_down(&self, counter: &AtomicU64) {
        let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1));
        self.work_moved();
    }

    /// A change to what `idle` reads (for counters kept elsewhere, such as an effect type's
    /// parked work).
    pub(crate) fn work_moved(&self) {
        self.work_epoch.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn outcome(&self, kind: OutcomeKind) {
        Self::bump(match kind {
            OutcomeKind::Applied => &self.applied,
            OutcomeKind::Duplicate => &self.duplicate,
            OutcomeKind::Stale => &self.stale,
            OutcomeKind::Rejected => &self.rejected,
            OutcomeKind::DeadLettered => &self.dead_lettered,
        });
    }

    pub(crate) fn snapshot(&self) -> RuntimeStats {
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        RuntimeStats {
            live_entities: get(&self.live_entities),
            activations: get(&self.activations),
            passivations: get(&self.passivations),
            in_flight: get(&self.in_flight),
            // The lanes' backlog holds it; `Runtime::stats` fills it in.
            inbox_pending: 0,
            applied: get(&self.applied),
            duplicate: get(&self.duplicate),
            stale: get(&self.stale),
            rejected: get(&self.rejected),
            dead_lettered: get(&self.dead_lettered),
            conflicts: get(&self.conflicts),
            retries: get(&self.retries),
            handler_panics: get(&self.handler_panics),
            effect_lanes: get(&self.effect_lanes),
            effects_done: get(&self.effects_done),
            effects_failed: get(&self.effects_failed),
            effects_dead_lettered: get(&self.effects_dead_lettered),
            effects_superseded: get(&self.effects_superseded),
            effect_retries: get(&self.effect_retries),
            commits: 0,
            commit_batches: 0,
            flushes: 0,
            lanes: std::array::from_fn(|i| self.lanes[i].snapshot()),
            effect_priorities: std::array::from_fn(|i| self.effect_priorities[i].snapshot()),
            effect_activations: std::array::from_fn(|i| self.effect_activations[i].snapshot()),
            entity_capped: get(&self.entity_capped),
            timers_pending: get(&self.timers_pending),
            timers_fired: get(&self.timers_fired),
            timers_cancelled: get(&self.timers_cancelled),
            schedule_runs: get(&self.schedule_runs),
            schedule_runs_skipped: get(&self.schedule_runs_skipped),
            schedule_runs_missed: get(&self.schedule_runs_missed),
            schedule_runs_buffered: get(&self.schedule_runs_buffered),
            feed_held_back: get(&self.feed_held_back),
            feed_last: 0,
            effect_types: Vec::new(),
        }
    }

    pub(crate) fn notify(&self) {
        self.changed.notify_waiters();
    }
}
