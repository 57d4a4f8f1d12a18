//! Schedules as values: when a schedule's runs are due, and what happens to each run that
//! comes due (fired, buffered, skipped, missed), decided by one pure function, [`plan`].
//!
//! Nothing here reads a clock or the disk: the scheduler (`time/scheduler.rs`) passes the
//! time in, tells whether the run in progress has finished, and carries out the decisions.
//! A run is identified by its schedule's name and its *nominal* time (the time the spec
//! gives, before jitter), so the same run always has the same message id ([`run_id`]).

use std::collections::VecDeque;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::core::hash::{fnv1a, splitmix64};

/// What a schedule does with a run that comes due while the previous run is unfinished
/// (its message, or an effect it recorded, still pending for one of the targets).
///
/// `Cancel` and `Terminate` (as Temporal offers them) have no sound meaning here: a run is
/// committed work, applied atomically per entity; it cannot be taken back half-way, and its
/// message may already be applied. So keystead offers the four policies that never undo.
///
/// ```
/// assert_eq!(keystead::Overlap::default(), keystead::Overlap::Skip);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Overlap {
    /// The new run is skipped (counted), never started. The default.
    #[default]
    Skip,
    /// The first run that comes due meanwhile waits and starts when the previous one
    /// finishes; further ones are skipped.
    BufferOne,
    /// Runs that come due meanwhile wait, in order, up to the schedule's `buffer_max`;
    /// further ones are skipped.
    BufferAll,
    /// Every run starts when due, whatever is still running.
    AllowAll,
}

impl Overlap {
    /// The policy's name in logs and listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::BufferOne => "buffer_one",
            Overlap::BufferAll => "buffer_all",
            Overlap::AllowAll => "allow_all",
        }
    }
}

/// The prefix of every scheduled run's message id.
pub(crate) const RUN_ID_PREFIX: &str = "schedule:";

/// The longest schedule name accepted, in bytes (its run ids must fit a message id).
pub(crate) const SCHEDULE_NAME_LEN_MAX: usize = 200;

/// The message id of the run of schedule `name` at nominal time `nominal_ms`: the same in
/// every process and after every restart, so a run fired twice is applied once.
pub(crate) fn run_id(name: &str, nominal_ms: u64) -> String {
    format!("{RUN_ID_PREFIX}{name}@{nominal_ms}")
}

/// A run fired more than this after its due time counts as caught up (late).
pub(crate) const LATE_AFTER_MS: u64 = 1_000;

/// The most due runs one wake of a schedule walks through; beyond it (a clock jump of
/// years on a per-second schedule), the rest is skipped over and counted as missed in one
/// step (see [`DueRuns::saturated`]).
pub(crate) const DUE_WALK_MAX: u64 = 1_000_000;

/// When runs are due: a fixed interval from an anchor, or a cron expression in a time zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SpecRecord {
    /// Every `every_ms`, at `anchor_ms + k * every_ms`.
    Every { every_ms: u64, anchor_ms: u64 },
    /// A cron expression (5 fields, or 6 with seconds first), in `time_zone` (an IANA
    /// name; `None` is UTC).
    Cron {
        expr: String,
        time_zone: Option<String>,
    },
}

/// A time zone a cron expression is read in.
#[derive(Debug, Clone)]
pub(crate) enum Zone {
    Utc,
    #[cfg(feature = "time-zones")]
    Named(chrono_tz::Tz),
}

/// A parsed spec, ready to compute due times.
#[derive(Debug, Clone)]
pub(crate) enum Spec {
    Every { every_ms: u64, anchor_ms: u64 },
    Cron { cron: Box<croner::Cron>, zone: Zone },
}

impl Spec {
    /// Parses a stored spec. The error says what is wrong and what is accepted.
    pub(crate) fn parse(record: &SpecRecord) -> Result<Spec, String> {
        match record {
            SpecRecord::Every {
                every_ms,
                anchor_ms,
            } => {
                if *every_ms == 0 {
                    return Err("the interval is zero; give at least 1 ms".into());
                }
                Ok(Spec::Every {
                    every_ms: *every_ms,
                    anchor_ms: *anchor_ms,
                })
            }
            SpecRecord::Cron { expr, time_zone } => {
                let cron = croner::Cron::from_str(expr).map_err(|e| {
                    format!("the cron expression {expr:?} does not parse ({e}); give 5 fields (minute hour day month weekday) or 6 with seconds first")
                })?;
                let zone = zone(time_zone.as_deref())?;
                let spec = Spec::Cron {
                    cron: Box::new(cron),
                    zone,
                };
                // An expression that never matches (February 30th) is refused now rather
                // than found silent later.
                if spec.next_after(0).is_none() {
                    return Err(format!(
                        "the cron expression {expr:?} never comes due; check its day and month fields"
                    ));
                }
                Ok(spec)
            }
        }
    }

    /// The first nominal time strictly after `after_ms`, or `None` if there is none (a
    /// cron expression that no longer matches, or past the year 9999).
    pub(crate) fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self {
            Spec::Every {
                every_ms,
                anchor_ms,
            } => {
                if after_ms < *anchor_ms {
                    return Some(*anchor_ms);
                }
                let steps = (after_ms - anchor_ms) / every_ms + 1;
                steps.checked_mul(*every_ms)?.checked_add(*anchor_ms)
            }
            Spec::Cron { cron, zone } => {
                let after = i64::try_from(after_ms).ok()?;
                let at = Utc.timestamp_millis_opt(after).single()?;
                let next = match zone {
                    Zone::Utc => next_in(cron, &at)?,
                    #[cfg(feature = "time-zones")]
                    Zone::Named(tz) => next_in(cron, &at.with_timezone(tz))?,
                };
                u64::try_from(next).ok()
            }
        }
    }
}

impl Spec {
    /// The nominal time `runs` runs back from `at_ms` (at or before it), if there is one.
    fn back_from(&self, at_ms: u64, runs: u64) -> Option<u64> {
        match self {
            Spec::Every {
                every_ms,
                anchor_ms,
            } => {
                let last = anchor_ms + (at_ms.checked_sub(*anchor_ms)? / every_ms) * every_ms;
                last.checked_sub((runs - 1).checked_mul(*every_ms)?)
                    .filter(|t| t >= anchor_ms)
            }
            Spec::Cron { cron, zone } => {
                let mut cursor = Utc
                    .timestamp_millis_opt(i64::try_from(at_ms).ok()?.checked_add(1)?)
                    .single()?;
                for _ in 0..runs {
                    cursor = match zone {
                        Zone::Utc => cron.find_previous_occurrence(&cursor, false).ok()?,
                        #[cfg(feature = "time-zones")]
                        Zone::Named(tz) => cron
                            .find_previous_occurrence(&cursor.with_timezone(tz), false)
                            .ok()?
                            .with_timezone(&Utc),
                    };
                }
                u64::try_from(cursor.timestamp_millis()).ok()
            }
        }
    }
}

fn next_in<Tz: TimeZone>(cron: &croner::Cron, at: &DateTime<Tz>) -> Option<i64> {
    cron.find_next_occurrence(at, false)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(feature = "time-zones")]
fn zone(name: Option<&str>) -> Result<Zone, String> {
    match name {
        None | Some("UTC") => Ok(Zone::Utc),
        Some(name) => chrono_tz::Tz::from_str(name).map(Zone::Named).map_err(|_| {
            format!("unknown time zone {name:?}; give an IANA name such as \"Europe/Paris\"")
        }),
    }
}

#[cfg(not(feature = "time-zones"))]
fn zone(name: Option<&str>) -> Result<Zone, String> {
    match name {
        None | Some("UTC") => Ok(Zone::Utc),
        Some(name) => Err(format!(
            "time zone {name:?} needs keystead's `time-zones` cargo feature; without it schedules run in UTC"
        )),
    }
}

/// The jitter of the run at `nominal_ms`: a fixed offset in `[0, jitter_ms)` derived from
/// the schedule's name and the nominal time, so every process and every restart agree on
/// when a run is due.
pub(crate) fn jitter_of(name: &str, nominal_ms: u64, jitter_ms: u64) -> u64 {
    if jitter_ms == 0 {
        return 0;
    }
    splitmix64(fnv1a(name.as_bytes()) ^ nominal_ms) % jitter_ms
}

/// The rules a schedule's runs are decided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rules {
    pub overlap: Overlap,
    /// For `BufferAll`: the most runs waiting.
    pub buffer_max: u32,
    /// A run due longer ago than this is missed, not fired.
    pub catch_up_window_ms: u64,
    /// When several runs are due at once (after a downtime or a clock jump), at most the
    /// latest this many are considered; the older ones are missed.
    pub catch_up_runs_max: u32,
    pub jitter_ms: u64,
}

/// A schedule's durable progress and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Progress {
    /// Every run with a nominal time up to this one has been decided.
    pub handled_until_ms: u64,
    /// The run whose finish the overlap policy waits for (its nominal time).
    pub running: Option<u64>,
    /// Runs waiting for the one running to finish: (nominal time, late when buffered).
    pub buffered: VecDeque<(u64, bool)>,
    /// Why the schedule is paused, if it is.
    pub paused: Option<String>,
    pub counters: Counters,
    /// The last run fired: its nominal time and when it was fired (ms since the epoch).
    pub last_fired: Option<(u64, u64)>,
}

/// What happened to a schedule's runs since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counters {
    pub fired: u64,
    pub caught_up: u64,
    pub skipped: u64,
    pub missed: u64,
    pub triggered: u64,
    pub backfilled: u64,
    pub targets_refused: u64,
    pub targets_shed: u64,
    pub runs_dead_lettered: u64,
}

/// The runs that came due since the schedule's progress, as found at one wake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DueRuns {
    /// How many runs came due in all.
    pub count: u64,
    /// Of those, how many are missed before any policy applies: due longer ago than the
    /// catch-up window, or older than the latest `catch_up_runs_max` of a batch.
    pub missed: u64,
    /// The rest, oldest first: (nominal time, due time).
    pub considered: Vec<(u64, u64)>,
    /// The nominal time of the last run that came due (the new `handled_until_ms`).
    pub last_nominal: Option<u64>,
    /// True when the walk stopped at [`DUE_WALK_MAX`] runs: the runs beyond it were counted
    /// missed without being looked at one by one.
    pub saturated: bool,
}

/// The runs of `spec` due at `now_ms` since `handled_until_ms` (exclusive), with the
/// catch-up window and run count applied, and the next due time after them (when the
/// scheduler must wake next).
pub(crate) fn due_runs(
    spec: &Spec,
    name: &str,
    rules: &Rules,
    handled_until_ms: u64,
    now_ms: u64,
) -> (DueRuns, Option<u64>) {
    let mut due = DueRuns::default();
    let mut eligible: VecDeque<(u64, u64)> = VecDeque::new();
    let keep = rules.catch_up_runs_max.max(1) as usize;
    let mut cursor = handled_until_ms;
    let next_due = loop {
        let Some(nominal) = spec.next_after(cursor) else {
            break None;
        };
        let due_at = nominal.saturating_add(jitter_of(name, nominal, rules.jitter_ms));
        if due_at > now_ms {
            break Some(due_at);
        }
        if due.count == DUE_WALK_MAX && !due.saturated {
            // Too many to look at one by one: count the runs up to the last few before now
            // as missed in one step, and walk only those last few.
            due.saturated = true;
            let resume = spec
                .back_from(now_ms, keep as u64 + 1)
                .unwrap_or(cursor)
                .max(cursor);
            let skipped = estimate_between(spec, cursor, resume);
            due.missed += skipped + eligible.len() as u64;
            due.count += skipped;
            eligible.clear();
            cursor = resume;
            if skipped > 0 {
                due.last_nominal = Some(cursor);
            }
            continue;
        }
        due.count += 1;
        due.last_nominal = Some(nominal);
        cursor = nominal;
        if now_ms - due_at > rules.catch_up_window_ms {
            due.missed += 1;
            continue;
        }
        eligible.push_back((nominal, due_at));
        if eligible.len() > keep {
            eligible.pop_front();
            due.missed += 1;
        }
    };
    due.considered = eligible.into();
    (due, next_due)
}

/// Roughly how many runs `spec` has in `(from_ms, to_ms]`, for a walk that saturated: exact
/// for an interval, a count capped at one more walk for cron.
fn estimate_between(spec: &Spec, from_ms: u64, to_ms: u64) -> u64 {
    if to_ms <= from_ms {
        return 0;
    }
    match spec {
        Spec::Every { every_ms, .. } => (to_ms - from_ms) / every_ms,
        Spec::Cron { .. } => {
            let mut n = 0;
            let mut cursor = from_ms;
            while let Some(next) = spec.next_after(cursor) {
                if next > to_ms || n == DUE_WALK_MAX {
                    break;
                }
                n += 1;
                cursor = next;
            }
            n
        }
    }
}

/// What [`plan`] decided for one wake: the runs to fire now, oldest first, each with
/// whether it is late (caught up).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Decisions {
    pub fire: Vec<(u64, bool)>,
}

/// Decides every run in `due` (and the buffered ones) against the overlap policy, and moves
/// `progress` on: what fires, what waits, what is skipped or missed, counted. The run in
/// progress (`progress.running`) is unfinished unless `running_finished`. Pure: the
/// scheduler fires what it returns, in the same commit as the new progress.
pub(crate) fn plan(
    progress: &mut Progress,
    rules: &Rules,
    due: &DueRuns,
    running_finished: bool,
    now_ms: u64,
) -> Decisions {
    let mut decisions = Decisions::default();
    let counters = &mut progress.counters;
    counters.missed += due.missed;
    if let Some(last) = due.last_nominal {
        assert!(
            last >= progress.handled_until_ms,
            "runs are decided in nominal order"
        );
        progress.handled_until_ms = last;
    }
    // A wake that finds more than one run due is catching up (a downtime, a clock jump):
    // whatever of it does not fire is missed, and what fires is caught up.
    let batch = due.count > 1;
    if progress.paused.is_some() {
        for &(_, due_at) in &due.considered {
            if batch || now_ms - due_at > LATE_AFTER_MS {
                counters.missed += 1;
            } else {
                counters.skipped += 1;
            }
        }
        return decisions;
    }
    let mut busy = progress.running.is_some() && !running_finished;
    if !busy {
        progress.running = None;
        if let Some((nominal, late)) = progress.buffered.pop_front() {
            decisions.fire.push((nominal, late));
            progress.running = Some(nominal);
            busy = true;
        }
    }
    for &(nominal, due_at) in &due.considered {
        let late = batch || now_ms - due_at > LATE_AFTER_MS;
        if !busy || rules.overlap == Overlap::AllowAll {
            decisions.fire.push((nominal, late));
            progress.running = Some(nominal);
            busy = true;
            continue;
        }
        let room = match rules.overlap {
            Overlap::BufferOne => progress.buffered.is_empty(),
            Overlap::BufferAll => progress.buffered.len() < rules.buffer_max as usize,
            Overlap::Skip | Overlap::AllowAll => false,
        };
        if room {
            progress.buffered.push_back((nominal, late));
        } else if late {
            counters.missed += 1;
        } else {
            counters.skipped += 1;
        }
    }
    for &(nominal, late) in &decisions.fire {
        counters.fired += 1;
        if late {
            counters.caught_up += 1;
        }
        progress.last_fired = Some((nominal, now_ms));
    }
    decisions
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn every(ms: u64) -> Spec {
        Spec::parse(&SpecRecord::Every {
            every_ms: ms,
            anchor_ms: 0,
        })
        .expect("valid")
    }

    fn rules(overlap: Overlap) -> Rules {
        Rules {
            overlap,
            buffer_max: 10,
            catch_up_window_ms: 60 * MIN,
            catch_up_runs_max: 3,
            jitter_ms: 0,
        }
    }

    #[test]
    fn an_interval_comes_due_on_its_grid() {
        let spec = every(10 * MIN);
        assert_eq!(spec.next_after(0), Some(10 * MIN));
        assert_eq!(spec.next_after(10 * MIN - 1), Some(10 * MIN));
        assert_eq!(spec.next_after(10 * MIN), Some(20 * MIN));
    }

    #[test]
    fn a_cron_expression_comes_due_on_its_minutes() {
        let spec = Spec::parse(&SpecRecord::Cron {
            expr: "*/15 * * * *".into(),
            time_zone: None,
        })
        .expect("valid");
        assert_eq!(spec.next_after(0), Some(15 * MIN));
        assert_eq!(spec.next_after(15 * MIN), Some(30 * MIN));
        let bad = Spec::parse(&SpecRecord::Cron {
            expr: "not cron".into(),
            time_zone: None,
        });
        assert!(bad.unwrap_err().contains("does not parse"));
        let never = Spec::parse(&SpecRecord::Cron {
            expr: "0 0 30 2 *".into(),
            time_zone: None,
        });
        assert!(never.is_err(), "February 30th never comes");
    }

    #[test]
    fn one_run_on_time_fires_and_the_next_overlaps_per_policy() {
        let spec = every(10 * MIN);
        for (overlap, fired, skipped, buffered) in [
            (Overlap::Skip, 1, 1, 0),
            (Overlap::BufferOne, 1, 0, 1),
            (Overlap::BufferAll, 1, 0, 1),
            (Overlap::AllowAll, 2, 0, 0),
        ] {
            let r = rules(overlap);
            let mut p = Progress::default();
            let (due, next) = due_runs(&spec, "s", &r, 0, 10 * MIN);
            assert_eq!(next, Some(20 * MIN));
            assert_eq!(
                plan(&mut p, &r, &due, true, 10 * MIN).fire,
                [(10 * MIN, false)]
            );
            let (due, _) = due_runs(&spec, "s", &r, p.handled_until_ms, 20 * MIN);
            plan(&mut p, &r, &due, false, 20 * MIN);
            assert_eq!(p.counters.fired, fired, "{overlap:?}");
            assert_eq!(p.counters.skipped, skipped, "{overlap:?}");
            assert_eq!(p.buffered.len(), buffered, "{overlap:?}");
            assert_eq!(p.counters.missed, 0);
        }
    }

    #[test]
    fn a_buffered_run_fires_once_the_running_one_finishes() {
        let spec = every(10 * MIN);
        let r = rules(Overlap::BufferOne);
        let mut p = Progress::default();
        let (due, _) = due_runs(&spec, "s", &r, 0, 10 * MIN);
        plan(&mut p, &r, &due, true, 10 * MIN);
        let (due, _) = due_runs(&spec, "s", &r, p.handled_until_ms, 20 * MIN);
        assert!(plan(&mut p, &r, &due, false, 20 * MIN).fire.is_empty());
        // No run due, but the running one finished: the buffered one goes.
        let none = DueRuns::default();
        assert_eq!(
            plan(&mut p, &r, &none, true, 21 * MIN).fire,
            [(20 * MIN, false)]
        );
        assert_eq!(p.running, Some(20 * MIN));
        assert_eq!(p.counters.fired, 2);
    }

    /// Three hours down, a run every 10 minutes, a one-hour window, at most 3 considered:
    /// 18 runs came due; 11 are older than the window, 4 more are older than the latest 3.
    #[test]
    fn a_three_hour_downtime_is_caught_up_per_policy() {
        let spec = every(10 * MIN);
        let now = 180 * MIN;
        for (overlap, fired_now, buffered, missed) in [
            (Overlap::Skip, 1, 0, 17),
            (Overlap::BufferOne, 1, 1, 16),
            (Overlap::BufferAll, 1, 2, 15),
            (Overlap::AllowAll, 3, 0, 15),
        ] {
            let r = rules(overlap);
            let mut p = Progress::default();
            let (due, next) = due_runs(&spec, "s", &r, 0, now);
            assert_eq!(due.count, 18);
            assert_eq!(next, Some(190 * MIN));
            let fired = plan(&mut p, &r, &due, true, now).fire;
            assert_eq!(fired.len(), fired_now, "{overlap:?}");
            assert_eq!(
                fired[0],
                (160 * MIN, true),
                "{overlap:?}: the oldest considered"
            );
            assert_eq!(p.buffered.len(), buffered, "{overlap:?}");
            assert_eq!(p.counters.missed, missed, "{overlap:?}");
            assert_eq!(p.counters.caught_up, fired_now as u64);
            assert_eq!(p.handled_until_ms, now);
            // Whatever waits fires as each run finishes, counted caught up; nothing else.
            while !p.buffered.is_empty() {
                plan(&mut p, &r, &DueRuns::default(), true, now + 1);
            }
            assert_eq!(p.counters.fired + p.counters.missed, 18, "{overlap:?}");
            assert_eq!(p.counters.caught_up, p.counters.fired);
        }
    }

    #[test]
    fn a_paused_schedule_counts_what_it_did_not_fire() {
        let spec = every(10 * MIN);
        let r = rules(Overlap::AllowAll);
        let mut p = Progress {
            paused: Some("operator".into()),
            ..Progress::default()
        };
        let (due, _) = due_runs(&spec, "s", &r, 0, 10 * MIN);
        assert!(plan(&mut p, &r, &due, true, 10 * MIN).fire.is_empty());
        assert_eq!((p.counters.skipped, p.counters.fired), (1, 0));
        assert_eq!(p.handled_until_ms, 10 * MIN, "never decided twice");
    }

    #[test]
    fn a_clock_that_goes_back_fires_nothing_again() {
        let spec = every(10 * MIN);
        let r = rules(Overlap::AllowAll);
        let mut p = Progress::default();
        let (due, _) = due_runs(&spec, "s", &r, 0, 30 * MIN);
        plan(&mut p, &r, &due, true, 30 * MIN);
        let fired = p.counters.fired;
        // Back to minute 5: nothing is due until minute 40.
        let (due, next) = due_runs(&spec, "s", &r, p.handled_until_ms, 5 * MIN);
        assert_eq!(due.count, 0);
        assert_eq!(next, Some(40 * MIN));
        plan(&mut p, &r, &due, true, 5 * MIN);
        assert_eq!(p.counters.fired, fired);
    }

    #[test]
    fn jitter_is_fixed_per_run_and_within_its_bound() {
        for nominal in (0..50).map(|i| i * 10 * MIN) {
            let j = jitter_of("refresh", nominal, 30_000);
            assert!(j < 30_000);
            assert_eq!(j, jitter_of("refresh", nominal, 30_000));
        }
        assert_eq!(jitter_of("refresh", 5, 0), 0);
    }

    #[test]
    fn a_walk_of_years_is_bounded() {
        let spec = every(1);
        let r = rules(Overlap::Skip);
        let (due, _) = due_runs(&spec, "s", &r, 0, 3 * DUE_WALK_MAX);
        assert!(due.saturated);
        assert_eq!(due.count, 3 * DUE_WALK_MAX, "every run is counted");
        assert_eq!(due.missed + due.considered.len() as u64, due.count);
    }

    #[test]
    fn run_ids_are_stable_and_fit_a_message_id() {
        let name = "n".repeat(SCHEDULE_NAME_LEN_MAX);
        let id = run_id(&name, u64::MAX);
        assert!(id.len() <= crate::core::keys::MESSAGE_ID_LEN_MAX);
        assert_eq!(run_id("refresh", 42), "schedule:refresh@42");
    }
}
