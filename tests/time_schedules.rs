//! Goal: schedules (issue 13) fire each run once, apply their overlap policy while a run is
//! slow, make downtime explicit (exact counts of runs caught up and missed after three hours
//! down, under each policy), never double a run on trigger, backfill or a clock jump, and
//! pause when a run dead-letters if asked to.
//! Method: a `ManualClock` drives every due time. A run is made slow by its effect: the
//! product entity records an `Enrich` on every command, and the test's executor holds each
//! attempt until the test releases it, so the run stays unfinished (its effect is in the
//! outbox) exactly as long as the test wants. Counts come from the schedule's status, the
//! runtime's counters and the entity's state (its revision counts the runs applied).

mod common;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use common::*;
use keystead::{
    AsyncExecutor, EffectContext, EffectError, Feedback, ManualClock, Overlap, Runtime,
    RuntimeBuilder, Schedule, ScheduleError,
};
use tokio::sync::{mpsc, Semaphore};

const MIN: u64 = 60_000;

fn mins(m: u64) -> Duration {
    Duration::from_millis(m * MIN)
}

/// Holds every enrichment until the test adds permits; tells the test when one starts.
struct Held {
    started: mpsc::UnboundedSender<String>,
    permits: Arc<Semaphore>,
}

impl AsyncExecutor<Enrich> for Held {
    async fn execute(
        &self,
        _: Enrich,
        ctx: EffectContext,
    ) -> Result<Feedback<Enrich>, EffectError> {
        let _ = self.started.send(ctx.effect_key().message_id.clone());
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| EffectError::retryable(e.to_string()))?;
        permit.forget();
        Ok(None)
    }
}

struct Slow {
    started: mpsc::UnboundedReceiver<String>,
    permits: Arc<Semaphore>,
}

fn slow_builder(path: &std::path::Path, clock: &ManualClock) -> (RuntimeBuilder, Slow) {
    let (tx, rx) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(0));
    let builder = runtime_builder(path)
        .shards(2)
        .clock(clock.clone())
        .register::<Product>()
        .async_executor::<Enrich>(Held {
            started: tx,
            permits: permits.clone(),
        });
    (
        builder,
        Slow {
            started: rx,
            permits,
        },
    )
}

async fn revision(rt: &Runtime, key: &str) -> u64 {
    rt.entity::<Product>(key).snapshot().await.unwrap().revision
}

/// Runs applied by a tally (each run adds one).
async fn applied(rt: &Runtime, key: &str) -> u64 {
    rt.entity::<TallyEntity>(key)
        .snapshot()
        .await
        .unwrap()
        .state
        .count
}

/// Each policy with a slow run: run 1 fires and hangs; runs 2 and 3 fall due meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_overlap_policy_with_a_slow_run() {
    // (policy, runs applied in the end, fired, skipped)
    for (overlap, applied, fired, skipped) in [
        (Overlap::Skip, 1, 1, 2),
        (Overlap::BufferOne, 2, 2, 1),
        (Overlap::BufferAll, 3, 3, 0),
        (Overlap::AllowAll, 3, 3, 0),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(0);
        let (builder, mut slow) = slow_builder(dir.path(), &clock);
        let rt = builder.open().unwrap();
        rt.schedules()
            .create(
                Schedule::<Product>::every("job", mins(1), ())
                    .to("p-1")
                    .overlap(overlap),
            )
            .await
            .unwrap();
        clock.advance(mins(1));
        assert_eq!(slow.started.recv().await.unwrap(), "schedule:job@60000");
        for decided in [2, 3] {
            clock.advance(mins(1));
            rt.wait_until(|s| {
                s.schedule_runs + s.schedule_runs_skipped + s.schedule_runs_buffered >= decided
            })
            .await;
        }
        let status = rt.schedules().status("job").await.unwrap().unwrap();
        assert_eq!(
            status.running,
            Some(if overlap == Overlap::AllowAll {
                3 * MIN
            } else {
                MIN
            }),
            "{overlap:?}"
        );
        slow.permits.add_permits(10);
        rt.idle().await;
        let status = rt.schedules().status("job").await.unwrap().unwrap();
        assert_eq!(revision(&rt, "p-1").await, applied, "{overlap:?}");
        assert_eq!(
            (status.fired, status.skipped, status.missed),
            (fired, skipped, 0),
            "{overlap:?}"
        );
        assert_eq!(status.buffered, 0, "{overlap:?}");
        assert_eq!(
            rt.stats().effects_done,
            applied,
            "{overlap:?}: each run's effect once"
        );
        rt.shutdown().await;
    }
}

/// Three hours down, a run every 10 minutes, a one-hour catch-up window, at most 3 runs
/// considered: 18 runs fell due. Exact counts per policy, across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_hour_downtime_is_caught_up_or_missed_explicitly() {
    for (overlap, fired, missed) in [
        (Overlap::Skip, 1, 17),
        (Overlap::BufferOne, 2, 16),
        (Overlap::BufferAll, 3, 15),
        (Overlap::AllowAll, 3, 15),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(0);
        let open = || builder(dir.path()).clock(clock.clone()).open().unwrap();
        let rt = open();
        let schedule = Schedule::<TallyEntity>::every("refresh", mins(10), add("run"))
            .to_each(["p-1", "p-2"])
            .overlap(overlap)
            .catch_up_window(mins(60))
            .catch_up_runs_max(3);
        rt.schedules().create(schedule).await.unwrap();
        rt.shutdown().await;
        clock.advance(mins(180));
        let rt = open();
        rt.idle().await;
        let status = rt.schedules().status("refresh").await.unwrap().unwrap();
        assert_eq!(
            (status.fired, status.missed),
            (fired, missed),
            "{overlap:?}"
        );
        assert_eq!(
            status.caught_up, fired,
            "{overlap:?}: every run fired was late"
        );
        assert_eq!(status.skipped, 0, "{overlap:?}");
        assert_eq!(status.next_due_ms, Some(190 * MIN));
        for key in ["p-1", "p-2"] {
            assert_eq!(applied(&rt, key).await, fired, "{overlap:?} {key}");
        }
        // The next run is on time again.
        clock.advance(mins(10));
        rt.idle().await;
        let status = rt.schedules().status("refresh").await.unwrap().unwrap();
        assert_eq!(
            (status.fired, status.caught_up),
            (fired + 1, fired),
            "{overlap:?}"
        );
        rt.shutdown().await;
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trigger_backfill_and_clock_jumps_never_double_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(0);
        let rt = builder(dir.path()).clock(clock.clone()).open().unwrap();
        rt.schedules()
            .create(Schedule::<TallyEntity>::every("tick", mins(1), add("run")).to("p-1").overlap(Overlap::AllowAll))
            .await
            .unwrap();
        // Creating the same definition again changes nothing.
        rt.schedules()
            .create(Schedule::<TallyEntity>::every("tick", mins(1), add("run")).to("p-1").overlap(Overlap::AllowAll))
            .await
            .unwrap();
        for _ in 0..3 {
            clock.advance(mins(1));
            rt.idle().await;
        }
        assert_eq!(applied(&rt, "p-1").await, 3);
        // Backfill the runs that already happened: each is a duplicate.
        let fired = rt
            .schedules()
            .backfill("tick", UNIX_EPOCH + mins(1), UNIX_EPOCH + mins(3))
            .await
            .unwrap();
        assert_eq!(fired, 3);
        // A trigger in the same millisecond as the run at minute 3: the same run.
        assert_eq!(rt.schedules().trigger("tick").await.unwrap(), 3 * MIN);
        rt.idle().await;
        assert_eq!(applied(&rt, "p-1").await, 3, "backfill and trigger doubled nothing");
        assert_eq!(rt.stats().duplicate, 4);
        // The clock goes back ten minutes, then forward again: no run is fired twice.
        clock.set(0);
        clock.advance(mins(3));
        rt.idle().await;
        assert_eq!(applied(&rt, "p-1").await, 3);
        clock.advance(mins(1));
        rt.idle().await;
        assert_eq!(applied(&rt, "p-1").await, 4, "minute 4 is new");
        // A backfill older than the dedup retention is refused.
        let old = rt.schedules().backfill("tick", UNIX_EPOCH, UNIX_EPOCH + mins(1)).await;
        assert!(old.is_ok(), "inside the 24 h retention: {old:?}");
        clock.advance(Duration::from_secs(48 * 3600));
        let old = rt.schedules().backfill("tick", UNIX_EPOCH, UNIX_EPOCH + mins(1)).await;
        assert!(matches!(old, Err(ScheduleError::BackfillTooOld { .. })), "{old:?}");
        rt.shutdown().await;
    }
}

/// Pause, resume, and pause-on-failure: a run that dead-letters pauses the schedule before
/// its next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_run_pauses_the_schedule_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let rt = builder(dir.path())
        .retry(fast_retry(1))
        .clock(clock.clone())
        .open()
        .unwrap();
    rt.schedules()
        .create(
            Schedule::<TallyEntity>::every("flaky", mins(1), TallyCmd::AlwaysTimesOut)
                .to("t-1")
                .pause_on_failure(),
        )
        .await
        .unwrap();
    clock.advance(mins(1));
    rt.idle().await;
    assert_eq!(rt.dead_letters::<TallyEntity>().await.unwrap().len(), 1);
    clock.advance(mins(1));
    rt.idle().await;
    let status = rt.schedules().status("flaky").await.unwrap().unwrap();
    assert!(
        status
            .paused
            .as_deref()
            .unwrap_or("")
            .contains("dead-lettered"),
        "{status:?}"
    );
    assert_eq!(
        (status.fired, status.skipped, status.runs_dead_lettered),
        (1, 1, 1)
    );
    clock.advance(mins(1));
    rt.idle().await;
    assert_eq!(
        rt.schedules()
            .status("flaky")
            .await
            .unwrap()
            .unwrap()
            .skipped,
        2
    );
    let resumed = rt.schedules().resume("flaky").await.unwrap();
    assert!(resumed.paused.is_none());
    clock.advance(mins(1));
    rt.idle().await;
    assert_eq!(
        rt.schedules().status("flaky").await.unwrap().unwrap().fired,
        2
    );
    // An operator pause, then delete.
    rt.schedules().pause("flaky").await.unwrap();
    clock.advance(mins(1));
    rt.idle().await;
    assert_eq!(
        rt.schedules().status("flaky").await.unwrap().unwrap().fired,
        2
    );
    assert!(rt.schedules().delete("flaky").await.unwrap());
    assert!(!rt.schedules().delete("flaky").await.unwrap());
    assert!(rt.schedules().list().await.unwrap().is_empty());
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_schedules_are_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).register::<Product>().open().unwrap();
    let cases: Vec<(Schedule<Product>, &str)> = vec![
        (Schedule::every("no-target", mins(1), ()), "targets"),
        (Schedule::every("", mins(1), ()).to("p"), "name"),
        (Schedule::every("zero", Duration::ZERO, ()).to("p"), "spec"),
        (Schedule::cron("bad", "every tuesday", ()).to("p"), "spec"),
        (
            Schedule::every("jit", mins(1), ()).to("p").jitter(mins(2)),
            "jitter",
        ),
        (Schedule::every("key", mins(1), ()).to(""), "targets"),
        (
            Schedule::every("win", mins(1), ())
                .to("p")
                .catch_up_window(Duration::ZERO),
            "catch_up_window",
        ),
        (
            Schedule::cron("tz", "0 * * * *", ())
                .to("p")
                .time_zone("Mars/Olympus"),
            "spec",
        ),
    ];
    for (schedule, setting) in cases {
        match rt.schedules().create(schedule).await {
            Err(ScheduleError::Invalid {
                setting: s, reason, ..
            }) => {
                assert_eq!(s, setting, "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("expected Invalid {setting}, got {other:?}"),
        }
    }
    assert!(rt.schedules().list().await.unwrap().is_empty());
    assert!(matches!(
        rt.schedules().trigger("nothing").await,
        Err(ScheduleError::NotFound { .. })
    ));
    rt.shutdown().await;
}

/// A cron schedule in a time zone comes due on that zone's wall clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_schedule_follows_its_time_zone() {
    let dir = tempfile::tempdir().unwrap();
    // 2026-01-15 00:00 UTC; Paris is UTC+1 in winter, so 02:00 Paris is 01:00 UTC.
    let start = 1_768_435_200_000;
    let clock = ManualClock::new(start);
    let rt = builder(dir.path()).clock(clock.clone()).open().unwrap();
    let status = rt
        .schedules()
        .create(
            Schedule::<TallyEntity>::cron("nightly", "0 2 * * *", add("run"))
                .to("p-1")
                .time_zone("Europe/Paris"),
        )
        .await
        .unwrap();
    assert_eq!(status.next_due_ms, Some(start + 3_600_000));
    clock.advance(Duration::from_secs(3600));
    rt.idle().await;
    assert_eq!(applied(&rt, "p-1").await, 1);
    rt.shutdown().await;
}
