//! Goal: the durable side of lanes (issue 11). Each lane holds at most its limit of pending
//! work; a full lane refuses with `Overloaded`, which gives the command back, or blocks up to
//! its deadline; a sheddable message goes to the durable shed log, listable and requeueable
//! (requeued twice: applied once); nothing accepted is lost; a `Critical` tell is taken ahead
//! of a `Low` backlog; `prioritise` moves an entity's pending messages up, keeping their
//! order.
//! Method: an entity whose handler fails (retryably) while its key is "held", so that its
//! drain stays busy and later messages stay pending, deterministically and without timing;
//! the test releases the key and waits on the runtime's counters. Outcomes are checked from
//! the entities' final states (which list what they applied, in order), the counters and the
//! listings.

mod common;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use keystead::{
    Context, Entity, Failure, FailureKind, LaneLimits, OutcomeKind, Priority, RetryPolicy, Runtime,
    SubmitError, WhenFull,
};
use serde::{Deserialize, Serialize};

/// Keys whose messages fail (retryably) for now.
static HELD: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn hold(key: &str) {
    HELD.lock()
        .unwrap()
        .get_or_insert_with(HashSet::new)
        .insert(key.to_string());
}

fn release(key: &str) {
    if let Some(held) = HELD.lock().unwrap().as_mut() {
        held.remove(key);
    }
}

fn held(key: &str) -> bool {
    HELD.lock()
        .unwrap()
        .as_ref()
        .is_some_and(|h| h.contains(key))
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("held")]
struct Held;

impl Failure for Held {
    fn kind(&self) -> FailureKind {
        FailureKind::Retryable
    }
}

/// Appends each command to its state, unless its key is held.
struct Log;

impl Entity for Log {
    const NAME: &'static str = "log";
    type State = Vec<String>;
    type Command = String;
    type Reply = usize;
    type Error = Held;

    fn handle(state: &mut Vec<String>, cmd: &String, ctx: &mut Context<'_>) -> Result<usize, Held> {
        if held(ctx.key()) {
            return Err(Held);
        }
        state.push(cmd.clone());
        Ok(state.len())
    }
}

/// Awaits `f`, failing the test after 60 s: the bound only turns a hang (work that never
/// gets a slot) into a clear failure; success never waits on it.
async fn within<F: std::future::IntoFuture>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f.into_future())
        .await
        .expect("the runtime got there, no hang")
}

/// Retries every millisecond or so, for long enough that a held key stays busy for the
/// whole test (it is released well before the attempts run out).
fn patient() -> RetryPolicy {
    RetryPolicy::default()
        .attempts_max(1_000_000)
        .backoff_initial(Duration::from_millis(1))
        .backoff_max(Duration::from_millis(2))
}

fn open(dir: &std::path::Path, low: LaneLimits) -> Runtime {
    runtime_builder(dir)
        .shards(1)
        .retry(patient())
        .lane_limits(Priority::Low, low)
        .register::<Log>()
        .open()
        .unwrap()
}

/// Holds `key` and sends it one low message, then waits until it is stuck retrying: from
/// here on, every message for `key` stays pending.
async fn block(rt: &Runtime, key: &str) {
    hold(key);
    rt.entity::<Log>(key)
        .tell("first".to_string())
        .priority(Priority::Low)
        .await
        .unwrap();
    within(rt.wait_until(|s| s.retries >= 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_lane_refuses_gives_the_command_back_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limits = LaneLimits::new(5, 1 << 20).when_full(WhenFull::Reject);
    let rt = open(dir.path(), limits);
    let key = "refuse-held";
    block(&rt, key).await;
    let e = rt.entity::<Log>(key);
    for i in 1..5 {
        e.tell(format!("m{i}"))
            .priority(Priority::Low)
            .await
            .unwrap();
        assert!(rt.stats().lane(Priority::Low).pending <= 5);
    }
    assert_eq!(rt.stats().lane(Priority::Low).pending, 5);
    let refused = e
        .tell("m5".to_string())
        .priority(Priority::Low)
        .await
        .unwrap_err();
    match &refused {
        SubmitError::Overloaded {
            lane,
            pending,
            pending_max,
            ..
        } => {
            assert_eq!((*lane, *pending, *pending_max), (Priority::Low, 5, 5));
        }
        other => panic!("expected Overloaded, got {other}"),
    }
    assert_eq!(refused.into_command::<String>().as_deref(), Some("m5"));
    // Other lanes do not notice.
    e.tell("normal".to_string()).await.unwrap();
    assert_eq!(rt.inbox_len().await.unwrap(), 6);
    let stats = rt.stats();
    assert_eq!(stats.lane(Priority::Low).refused, 1);
    assert_eq!(stats.lane(Priority::Low).pending, 5, "never over the limit");
    release(key);
    within(rt.idle()).await;
    let applied = e.snapshot().await.unwrap().state;
    assert_eq!(applied, vec!["first", "m1", "m2", "m3", "m4", "normal"]);
    assert_eq!(rt.stats().lane(Priority::Low).pending, 0);
    assert_eq!(rt.inbox_len().await.unwrap(), 0);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_lane_waits_for_room_up_to_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let limits = LaneLimits::new(2, 1 << 20).when_full(WhenFull::Block(Duration::from_millis(50)));
    let rt = open(dir.path(), limits);
    let key = "block-held";
    block(&rt, key).await;
    let e = rt.entity::<Log>(key);
    e.tell("m1".to_string())
        .priority(Priority::Low)
        .await
        .unwrap();
    // Full, and nothing drains while the key is held: the deadline passes.
    let refused = e.tell("late".to_string()).priority(Priority::Low).await;
    assert!(matches!(refused, Err(SubmitError::Overloaded { .. })));
    // A tell that waits longer gets in once room is made.
    let waiting = {
        let e = e.clone();
        tokio::spawn(async move { e.tell("m2".to_string()).priority(Priority::Low).await })
    };
    release(key);
    let accepted = waiting.await.unwrap();
    // The 50 ms policy applies to this tell too; it either got room or was refused, and
    // a refusal gives the command back: either way nothing is lost or applied twice.
    let m2_accepted = match accepted {
        Ok(_) => true,
        Err(refused) => {
            assert_eq!(refused.into_command::<String>().as_deref(), Some("m2"));
            false
        }
    };
    within(rt.idle()).await;
    let applied = e.snapshot().await.unwrap().state;
    let mut expected = vec!["first", "m1"];
    if m2_accepted {
        expected.push("m2");
    }
    assert_eq!(applied, expected);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sheddable_work_goes_to_the_shed_log_and_is_applied_once_when_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let limits = LaneLimits::new(1, 1 << 20).when_full(WhenFull::Reject);
    let rt = open(dir.path(), limits);
    // The held key fills the low lane; the product's refresh meets it full. (Admin actions
    // on an entity wait behind its messages, so the product is another, idle key.)
    let key = "shed-held";
    block(&rt, key).await;
    let e = rt.entity::<Log>("shed-product");
    let shed = e
        .tell("refresh".to_string())
        .id("refresh-1")
        .priority(Priority::Low)
        .sheddable()
        .await
        .unwrap();
    assert!(shed.shed, "the lane is full: shed, not refused");
    assert_eq!(rt.stats().lane(Priority::Low).shed, 1);
    let listed = rt.shed::<Log>().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].message_id, "refresh-1");
    assert_eq!(listed[0].lane, Priority::Low);
    assert_eq!(
        listed[0].command.as_ref().ok().map(String::as_str),
        Some("refresh")
    );
    // Still full: requeueing is refused and the message stays in the shed log.
    assert!(matches!(
        e.requeue_shed("refresh-1").await,
        Err(keystead::AdminError::Overloaded { .. })
    ));
    assert_eq!(rt.shed::<Log>().await.unwrap().len(), 1);
    release(key);
    within(rt.idle()).await;
    assert_eq!(rt.stats().lane(Priority::Low).pending, 0);
    // Requeue twice, even concurrently: applied once.
    let (a, b) = tokio::join!(e.requeue_shed("refresh-1"), e.requeue_shed("refresh-1"));
    assert_eq!(
        [a.unwrap(), b.unwrap()].iter().filter(|r| **r).count(),
        1,
        "one requeue found it"
    );
    assert!(!e.requeue_shed("refresh-1").await.unwrap());
    within(rt.idle()).await;
    assert_eq!(e.snapshot().await.unwrap().state, vec!["refresh"]);
    assert!(rt.shed::<Log>().await.unwrap().is_empty());
    // A shed message survives a restart.
    hold(key);
    let retries = rt.stats().retries;
    rt.entity::<Log>(key)
        .tell("again".to_string())
        .priority(Priority::Low)
        .await
        .unwrap();
    within(rt.wait_until(|s| s.retries > retries)).await;
    let shed = e
        .tell("refresh".to_string())
        .id("refresh-2")
        .priority(Priority::Low)
        .sheddable()
        .await
        .unwrap();
    assert!(shed.shed);
    rt.close_now();
    release(key);
    let rt = open(dir.path(), limits);
    within(rt.idle()).await;
    let listed = rt.shed::<Log>().await.unwrap();
    assert_eq!(listed.len(), 1, "the shed log is durable");
    assert_eq!(listed[0].message_id, "refresh-2");
    let held_state = rt.entity::<Log>(key).snapshot().await.unwrap().state;
    assert_eq!(
        held_state,
        vec!["first", "again"],
        "the pending message survived too"
    );
    let e = rt.entity::<Log>("shed-product");
    assert_eq!(e.snapshot().await.unwrap().state, vec!["refresh"]);
    assert!(e.purge_shed("refresh-2").await.unwrap());
    assert!(rt.shed::<Log>().await.unwrap().is_empty());
    rt.shutdown().await;
}

/// One shard of 4 slots (`Low` may hold 3), one slot per entity.
fn small_shard(dir: &std::path::Path) -> Runtime {
    runtime_builder(dir)
        .shards(1)
        .in_flight_max(4)
        .entity_in_flight_max(1)
        .retry(patient())
        .register::<Log>()
        .open()
        .unwrap()
}

/// Holds three keys named after `prefix` and sends each a low message: their drains, stuck
/// retrying, take every slot `Low` may hold on a `small_shard`. Returns the keys.
async fn fill_low_lane(rt: &Runtime, prefix: &str) -> Vec<String> {
    let keys: Vec<String> = (0..3).map(|i| format!("{prefix}-{i}")).collect();
    for key in &keys {
        hold(key);
        rt.entity::<Log>(key.clone())
            .tell("low".to_string())
            .priority(Priority::Low)
            .await
            .unwrap();
    }
    within(rt.wait_until(|s| s.lane(Priority::Low).in_flight == 3)).await;
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_tell_is_taken_ahead_of_a_low_backlog() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        // 4 slots: Low may hold 3, the fourth is kept for the lanes above.
        let rt = small_shard(dir.path());
        // Three held keys take Low's three slots; 200 more low messages wait on disk.
        let held_keys = fill_low_lane(&rt, &format!("ahead-{round}-held")).await;
        for i in 0..200 {
            rt.entity::<Log>(format!("ahead-{round}-low-{i}"))
                .tell("low".to_string())
                .priority(Priority::Low)
                .await
                .unwrap();
        }
        let critical = rt.entity::<Log>(format!("ahead-{round}-critical"));
        critical
            .tell("urgent".to_string())
            .priority(Priority::Critical)
            .await
            .unwrap();
        // It is applied while the low backlog still waits behind the held keys.
        within(rt.wait_until(|s| {
            let critical = s.lane(Priority::Critical);
            critical.admitted >= 1 && critical.in_flight == 0 && critical.pending == 0
        }))
        .await;
        assert_eq!(critical.snapshot().await.unwrap().state, vec!["urgent"]);
        let waiting_low = rt.stats().lane(Priority::Low).pending;
        assert!(
            waiting_low >= 200,
            "round {round}: low backlog {waiting_low} still waits"
        );
        for key in &held_keys {
            release(key);
        }
        within(rt.idle()).await;
        assert_eq!(rt.stats().lane(Priority::Low).pending, 0);
        for i in 0..200 {
            let s = rt
                .entity::<Log>(format!("ahead-{round}-low-{i}"))
                .snapshot()
                .await
                .unwrap();
            assert_eq!(s.state, vec!["low"], "round {round}: low-{i} applied once");
        }
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prioritise_moves_pending_messages_up_and_keeps_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let rt = small_shard(dir.path());
    // Low's three slots are held by stuck keys; the product's low messages wait on disk.
    let stuck = fill_low_lane(&rt, "stuck").await;
    let product = rt.entity::<Log>("product");
    for i in 0..3 {
        product
            .tell(format!("p{i}"))
            .priority(Priority::Low)
            .await
            .unwrap();
    }
    assert_eq!(rt.stats().lane(Priority::Low).pending, 6);
    let moved = product.prioritise(Priority::High).await.unwrap();
    assert_eq!(moved, 3);
    // Now taken through High's room, ahead of the stuck Low lane, in their order.
    within(rt.wait_until(|s| {
        s.lane(Priority::High).pending == 0 && s.lane(Priority::High).in_flight == 0
    }))
    .await;
    assert_eq!(
        product.snapshot().await.unwrap().state,
        vec!["p0", "p1", "p2"]
    );
    assert_eq!(
        rt.stats().lane(Priority::Low).pending,
        3,
        "only the stuck keys' messages"
    );
    assert_eq!(
        product.prioritise(Priority::Critical).await.unwrap(),
        0,
        "nothing left"
    );
    for key in &stuck {
        release(key);
    }
    within(rt.idle()).await;
    assert_eq!(rt.inbox_len().await.unwrap(), 0);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callers_tell_then_ask_apply_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path(), LaneLimits::default());
    for round in 0..50 {
        let e = rt.entity::<Log>(format!("order-{round}"));
        e.tell("told".to_string())
            .priority(Priority::Low)
            .await
            .unwrap();
        let out = e
            .ask("asked".to_string())
            .priority(Priority::Critical)
            .await
            .unwrap();
        assert_eq!(out.kind(), OutcomeKind::Applied);
        assert_eq!(
            out.reply(),
            Some(&2),
            "round {round}: the told message went first"
        );
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_backlog_drains_under_a_continuous_critical_flood() {
    let dir = tempfile::tempdir().unwrap();
    // Four slots: a critical flood of eight callers always has callers waiting, so `Low`
    // gets in only by promotion (after `lane_promote_after` admissions passed it over).
    let rt = std::sync::Arc::new(
        runtime_builder(dir.path())
            .shards(1)
            .in_flight_max(4)
            .lane_promote_after(8)
            .retry(patient())
            .register::<Log>()
            .open()
            .unwrap(),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood: Vec<_> = (0..8)
        .map(|t| {
            let (rt, stop) = (rt.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let e = rt.entity::<Log>(format!("flood-{t}-{}", sent % 50));
                    e.ask("c".to_string())
                        .priority(Priority::Critical)
                        .await
                        .unwrap();
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    within(rt.wait_until(|s| s.lane(Priority::Critical).waiting >= 1)).await;
    for i in 0..50 {
        rt.entity::<Log>(format!("backlog-{i}"))
            .tell("low".to_string())
            .priority(Priority::Low)
            .await
            .unwrap();
    }
    // The backlog drains while the flood goes on (the flood stops only afterwards).
    within(rt.wait_until(|s| s.lane(Priority::Low).pending == 0)).await;
    let promoted = rt.stats().lane(Priority::Low).promoted;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut flood_sent = 0;
    for t in flood {
        flood_sent += t.await.unwrap();
    }
    assert!(promoted >= 1, "low got in by promotion, {promoted} times");
    for i in 0..50 {
        let s = rt
            .entity::<Log>(format!("backlog-{i}"))
            .snapshot()
            .await
            .unwrap();
        assert_eq!(s.state, vec!["low"], "backlog-{i} applied once");
    }
    assert!(
        flood_sent > 50,
        "the flood ran throughout ({flood_sent} asks)"
    );
    within(rt.idle()).await;
    std::sync::Arc::try_unwrap(rt)
        .ok()
        .unwrap()
        .shutdown()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_work_survives_a_reopen_with_another_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let open_with = |shards: usize| {
        runtime_builder(dir.path())
            .shards(shards)
            .retry(patient())
            .register::<Log>()
            .open()
            .unwrap()
    };
    let rt = open_with(2);
    let key = "reshard-held";
    hold(key);
    let e = rt.entity::<Log>(key);
    for i in 0..20 {
        let lane = Priority::ALL[i % 4];
        e.tell(format!("m{i}")).priority(lane).await.unwrap();
    }
    for i in 0..30 {
        rt.entity::<Log>(format!("reshard-{i}"))
            .tell("x".to_string())
            .priority(Priority::ALL[i % 4])
            .await
            .unwrap();
    }
    within(rt.wait_until(|s| s.retries >= 1)).await;
    rt.close_now();
    release(key);
    // The lane index is kept per shard: three shards means it is rebuilt at open.
    let rt = open_with(3);
    within(rt.idle()).await;
    let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(
        rt.entity::<Log>(key).snapshot().await.unwrap().state,
        expected,
        "in order, once"
    );
    for i in 0..30 {
        let s = rt
            .entity::<Log>(format!("reshard-{i}"))
            .snapshot()
            .await
            .unwrap();
        assert_eq!(s.state.len(), 1, "reshard-{i} applied once");
    }
    assert_eq!(rt.inbox_len().await.unwrap(), 0);
    for lane in Priority::ALL {
        assert_eq!(rt.stats().lane(lane).pending, 0);
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_handed_straight_to_their_entity_are_found_after_a_crash() {
    // A tell to an idle entity with a free slot is written without a lane index entry and
    // handed to the entity at once. If the process dies before it is processed, the next
    // open must index it, or it would wait in the inbox until some later message came.
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            runtime_builder(dir.path())
                .shards(2)
                .retry(patient())
                .register::<Log>()
                .open()
                .unwrap()
        };
        let rt = open();
        let keys: Vec<String> = (0..8).map(|i| format!("direct-{round}-{i}")).collect();
        for key in &keys {
            hold(key);
            rt.entity::<Log>(key.clone())
                .tell("x".to_string())
                .await
                .unwrap();
        }
        within(rt.wait_until(|s| s.retries >= 8)).await;
        rt.close_now();
        with_raw_store(dir.path(), |raw| {
            assert_eq!(raw.count_prefix(b"I"), 8, "round {round}: all in the inbox");
            assert_eq!(raw.count_prefix(b"Q"), 0, "round {round}: none indexed");
        });
        for key in &keys {
            release(key);
        }
        let rt = open();
        within(rt.idle()).await;
        for key in &keys {
            let s = rt.entity::<Log>(key.clone()).snapshot().await.unwrap();
            assert_eq!(s.state, ["x"], "round {round}: {key} applied once");
        }
        assert_eq!(rt.inbox_len().await.unwrap(), 0);
        rt.shutdown().await;
        with_raw_store(dir.path(), |raw| {
            assert_eq!(
                raw.count_prefix(b"Q"),
                0,
                "no index entry outlives its message"
            );
        });
    }
}
