//! Goal: a `tell` with a due time (issue 13) is accepted durably at once, delivered through
//! the inbox when due, in due order, exactly once across restarts (a restart between accept
//! and due included), can be cancelled (once; never after it was delivered), and holds room
//! in its lane from acceptance.
//! Method: a `ManualClock` drives every due time; the tally entity records the tags it
//! applied in order, so order and exactly-once are read from the state alone. Orders come
//! from seeds; restarts close and reopen the runtime on the same directory.

mod common;

use std::time::Duration;

use common::*;
use keystead::{Cancelled, LaneLimits, ManualClock, OutcomeKind, Priority, SubmitError, WhenFull};

const START_MS: u64 = 1_000_000;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A small deterministic shuffle (splitmix64), so each seed sends in another order.
fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut items: Vec<u64> = (0..n).collect();
    let mut x = seed;
    for i in (1..items.len()).rev() {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        items.swap(i, (z % (i as u64 + 1)) as usize);
    }
    items
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delayed_messages_fire_in_due_order_exactly_once_across_restarts() {
        for seed in 0..8u64 {
            let dir = tempfile::tempdir().unwrap();
            let clock = ManualClock::new(START_MS);
            let open = || builder(dir.path()).clock(clock.clone()).open().unwrap();
            let rt = open();
            let tally = rt.entity::<TallyEntity>("t-1");
            // 24 messages, due 10 s apart, sent in a shuffled order; every third is sent
            // twice (a resend while it waits: one timer).
            for i in shuffled(24, seed) {
                let due = secs(10 * (i + 1));
                let first = tally.tell(add(format!("m{i:02}"))).id(format!("d-{i}")).after(due).await.unwrap();
                assert_eq!(first.due_at_ms, Some(START_MS + due.as_millis() as u64));
                if i % 3 == 0 {
                    let again = tally.tell(add(format!("m{i:02}"))).id(format!("d-{i}")).after(secs(1)).await.unwrap();
                    assert_eq!(again.due_at_ms, first.due_at_ms, "the first due time stays");
                }
            }
            assert_eq!(rt.stats().timers_pending, 24);
            assert_eq!(rt.inbox_len().await.unwrap(), 0, "nothing is in the inbox before it is due");
            // Half of them fall due while running.
            clock.advance(secs(125));
            rt.idle().await;
            assert_eq!(tally.snapshot().await.unwrap().state.count, 12);
            // A restart between accept and due: the rest fall due while the runtime is down
            // and are delivered at the next open.
            rt.shutdown().await;
            clock.advance(secs(500));
            let rt = open();
            rt.idle().await;
            let state = rt.entity::<TallyEntity>("t-1").snapshot().await.unwrap().state;
            let expected: Vec<String> = (0..24).map(|i| format!("m{i:02}")).collect();
            assert_eq!(state.applied, expected, "seed {seed}: in due order, each once");
            let stats = rt.stats();
            assert_eq!((stats.timers_pending, stats.lane(Priority::Normal).pending), (0, 0));
            rt.shutdown().await;
        }
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_message_never_arrives_and_cancelling_again_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START_MS);
        let rt = builder(dir.path()).clock(clock.clone()).open().unwrap();
        let tally = rt.entity::<TallyEntity>("t-1");
        tally.tell(add("kept")).id("keep").after(secs(60)).await.unwrap();
        tally.tell(add("dropped")).id("drop").after(secs(30)).await.unwrap();
        assert_eq!(
            tally.cancel("drop").await.unwrap(),
            Cancelled::Removed { due_at_ms: START_MS + 30_000 }
        );
        assert_eq!(tally.cancel("drop").await.unwrap(), Cancelled::NotPending, "twice: no-op");
        assert_eq!(tally.cancel("never-sent").await.unwrap(), Cancelled::NotPending);
        clock.advance(secs(90));
        rt.idle().await;
        assert_eq!(tally.snapshot().await.unwrap().state.applied, ["kept"]);
        assert_eq!(tally.cancel("keep").await.unwrap(), Cancelled::NotPending, "delivered");
        let stats = rt.stats();
        assert_eq!((stats.timers_fired, stats.timers_cancelled, stats.timers_pending), (1, 1, 0));
        // A cancelled id may be sent again: it is a new delayed message.
        tally.tell(add("dropped")).id("drop").after(secs(10)).await.unwrap();
        clock.advance(secs(10));
        rt.idle().await;
        assert_eq!(tally.snapshot().await.unwrap().state.applied, ["kept", "dropped"]);
        rt.shutdown().await;
    }
}

/// A cancel racing with the due time either removes the message or finds it delivered,
/// never both: over many rounds, each message is applied exactly when its cancel said
/// `NotPending`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_with_the_due_time_either_removes_or_finds_it_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let rt = builder(dir.path()).clock(clock.clone()).open().unwrap();
    let tally = rt.entity::<TallyEntity>("t-1");
    let mut expected = Vec::new();
    for round in 0..60u64 {
        let ids: Vec<String> = (0..20).map(|i| format!("r-{round}-{i}")).collect();
        for id in &ids {
            tally
                .tell(add(id.clone()))
                .id(id.clone())
                .after(secs(1))
                .await
                .unwrap();
        }
        let cancels: Vec<_> = ids
            .iter()
            .map(|id| {
                let (tally, id) = (tally.clone(), id.clone());
                tokio::spawn(async move { tally.cancel(&id).await.unwrap() })
            })
            .collect();
        clock.advance(secs(1));
        for (id, cancel) in ids.into_iter().zip(cancels) {
            if cancel.await.unwrap() == Cancelled::NotPending {
                expected.push(id);
            }
        }
        rt.idle().await;
    }
    assert_eq!(tally.snapshot().await.unwrap().state.applied, expected);
    let stats = rt.stats();
    assert_eq!(stats.timers_fired + stats.timers_cancelled, 1200);
    assert!(
        stats.timers_fired > 0 && stats.timers_cancelled > 0,
        "both sides won: {stats:?}"
    );
    rt.shutdown().await;
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delayed_message_holds_room_in_its_lane_from_acceptance() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START_MS);
        let rt = builder(dir.path())
            .clock(clock.clone())
            .lane_limits(Priority::Low, LaneLimits::new(2, 1 << 20).when_full(WhenFull::Reject))
            .open()
            .unwrap();
        let tally = rt.entity::<TallyEntity>("t-1");
        for i in 0..2 {
            tally.tell(add(format!("late-{i}"))).priority(Priority::Low).after(secs(60)).await.unwrap();
        }
        let refused = tally.tell(add("third")).priority(Priority::Low).after(secs(60)).await;
        let Err(error @ SubmitError::Overloaded { .. }) = refused else {
            panic!("a full lane refuses a delayed message too: {refused:?}");
        };
        assert!(matches!(error.into_command::<TallyCmd>(), Some(TallyCmd::Add { .. })));
        // Shed instead when sheddable, and kept.
        let shed = tally.tell(add("shed")).priority(Priority::Low).sheddable().after(secs(60)).await.unwrap();
        assert!(shed.shed);
        clock.advance(secs(60));
        rt.idle().await;
        assert_eq!(tally.snapshot().await.unwrap().state.count, 2);
        assert_eq!(rt.stats().lane(Priority::Low).pending, 0, "room given back once applied");
        assert_eq!(rt.shed::<TallyEntity>().await.unwrap().len(), 1);
        rt.shutdown().await;
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_clock_going_back_delays_and_never_repeats_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START_MS);
        let rt = builder(dir.path()).clock(clock.clone()).open().unwrap();
        let tally = rt.entity::<TallyEntity>("t-1");
        tally.tell(add("a")).id("a").after(secs(10)).await.unwrap();
        tally.tell(add("b")).id("b").after(secs(20)).await.unwrap();
        clock.advance(secs(10));
        rt.idle().await;
        // Back before both due times: nothing fires again, nothing fires early.
        clock.set(START_MS);
        clock.advance(secs(15));
        rt.idle().await;
        assert_eq!(tally.snapshot().await.unwrap().state.applied, ["a"]);
        // A jump far forward delivers what is due, once.
        clock.advance(secs(3600));
        rt.idle().await;
        assert_eq!(tally.snapshot().await.unwrap().state.applied, ["a", "b"]);
        // The same id sent again after delivery is a duplicate for the entity.
        tally.tell(add("b")).id("b").after(secs(1)).await.unwrap();
        clock.advance(secs(1));
        rt.idle().await;
        assert_eq!(tally.snapshot().await.unwrap().state.applied, ["a", "b"]);
        assert_eq!(rt.stats().duplicate, 1);
        rt.shutdown().await;
    }
}

/// A due time not in the future delivers at once, through the inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_time_in_the_past_delivers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let rt = builder(dir.path()).clock(clock.clone()).open().unwrap();
    let tally = rt.entity::<TallyEntity>("t-1");
    let past = std::time::UNIX_EPOCH + Duration::from_millis(START_MS - 1);
    let accepted = tally.tell(add("now")).at(past).await.unwrap();
    assert_eq!(accepted.due_at_ms, None);
    rt.idle().await;
    let out = tally.ask(add("after")).await.unwrap();
    assert_eq!(out.kind(), OutcomeKind::Applied);
    assert_eq!(
        tally.snapshot().await.unwrap().state.applied,
        ["now", "after"]
    );
    rt.shutdown().await;
}

on_each_backend! {
    /// The firer starts its scans past the timers it already fired (a floor), so an LSM
    /// engine's tombstones are not walked again. Timers accepted while a pass scans, due
    /// before what that pass found next, must still fire: many concurrent accepts, in a
    /// shuffled due order, each waking the firer, then the clock moves past them all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timers_accepted_while_the_firer_scans_all_fire() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START_MS);
        let rt = builder(dir.path()).clock(clock.clone()).open().unwrap();
        const PER_ROUND: u64 = 64;
        for round in 0..20u64 {
            let far = rt.entity::<TallyEntity>(format!("far-{round}"));
            far.tell(add("far")).id("far").after(secs(3600)).await.unwrap();
            let sends: Vec<_> = shuffled(PER_ROUND, round)
                .into_iter()
                .map(|i| {
                    let tally = rt.entity::<TallyEntity>(format!("r{round}-{i}"));
                    let due = Duration::from_millis(1_000 + i);
                    tokio::spawn(async move { tally.tell(add("near")).id("near").after(due).await })
                })
                .collect();
            for send in sends {
                send.await.unwrap().unwrap();
            }
            clock.advance(secs(10));
            rt.idle().await;
            for i in 0..PER_ROUND {
                let state = rt.entity::<TallyEntity>(format!("r{round}-{i}")).snapshot().await.unwrap().state;
                assert_eq!(state.applied, ["near"], "round {round}: timer {i} did not fire");
            }
            assert!(far.snapshot().await.unwrap().state.applied.is_empty());
        }
        assert_eq!(rt.stats().timers_fired, 20 * PER_ROUND);
        rt.shutdown().await;
    }
}
