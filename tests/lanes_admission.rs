//! Goal: shard admission in lanes (issue 11). A waiting lower lane is admitted within its
//! bound under a flood of `Critical`; a flood of `Low` leaves room for `Critical`; a hot
//! key's flood waits behind itself, not in front of other keys on its shard; per-lane
//! counters count what happened.
//! Method: one shard and a small `in_flight_max`, so that every caller beyond it queues; each
//! test queues a flood, waits (on the runtime's counters, never on time) until the flood is
//! queued, and sends one more message. With one slot (the first test) application order is
//! admission order, so a handler's log of the order is exact and the test asserts the late
//! message's place in it. With several slots, the moment a message is applied depends on
//! thread scheduling after its admission, so those tests assert on the gate's own counters
//! instead: a message admitted at once adds one to its lane's `admitted` and nothing to its
//! `waited`. Without the rule under test it would have queued behind the flood. Several
//! rounds each.

mod common;

use std::sync::Mutex;

use common::*;
use keystead::{Context, Entity, OutcomeKind, Priority, Runtime};

static APPLIED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Logs every key it applies a message for, in order.
struct Logged;

impl Entity for Logged {
    const NAME: &'static str = "logged";
    type State = u64;
    type Command = u64;
    type Reply = u64;
    type Error = Never;

    fn handle(state: &mut u64, by: &u64, ctx: &mut Context<'_>) -> Result<u64, Never> {
        APPLIED.lock().unwrap().push(ctx.key().to_string());
        *state += by;
        Ok(*state)
    }
}

/// The keys applied so far that start with `prefix`, in order.
fn applied(prefix: &str) -> Vec<String> {
    APPLIED
        .lock()
        .unwrap()
        .iter()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect()
}

fn open(dir: &std::path::Path, in_flight: usize) -> keystead::RuntimeBuilder {
    runtime_builder(dir)
        .shards(1)
        .in_flight_max(in_flight)
        .register::<Logged>()
}

/// Sends `n` asks in lane `priority` to keys made by `key`, all at once, and returns their
/// tasks.
fn flood(
    rt: &Runtime,
    n: usize,
    priority: Priority,
    key: impl Fn(usize) -> String,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let e = rt.entity::<Logged>(key(i));
            tokio::spawn(async move {
                let out = e.ask(1).priority(priority).await.expect("admitted");
                assert_eq!(out.kind(), OutcomeKind::Applied);
            })
        })
        .collect()
}

async fn join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_ask_is_admitted_within_the_bound_under_a_critical_flood() {
    const PROMOTE_AFTER: u32 = 4;
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let rt = open(dir.path(), 1)
            .lane_promote_after(PROMOTE_AFTER)
            .open()
            .unwrap();
        let prefix = format!("starve-{round}-");
        let criticals = flood(&rt, 300, Priority::Critical, |i| format!("{prefix}c{i}"));
        rt.wait_until(|s| s.lane(Priority::Critical).waiting >= 200)
            .await;
        let low_key = format!("{prefix}low");
        let low = rt.entity::<Logged>(low_key.clone());
        let low_task = tokio::spawn(async move { low.ask(1).priority(Priority::Low).await });
        rt.wait_until(|s| s.lane(Priority::Low).waiting + s.lane(Priority::Low).admitted >= 1)
            .await;
        // Everything applied from here on was admitted after the low ask queued.
        let before = applied(&prefix).len();
        let out = low_task.await.unwrap().unwrap();
        assert_eq!(out.kind(), OutcomeKind::Applied);
        let order = applied(&prefix);
        let at = order
            .iter()
            .position(|k| *k == low_key)
            .expect("low applied");
        // One message in flight when it queued, then at most PROMOTE_AFTER + 3 admissions
        // passed it over.
        let bound = before + 1 + PROMOTE_AFTER as usize + 3;
        assert!(
            at <= bound,
            "round {round}: low applied at {at}, bound {bound} ({before} before it queued)"
        );
        assert!(
            at < 250,
            "round {round}: low did not wait for the flood ({at})"
        );
        join(criticals).await;
        let stats = rt.stats();
        assert_eq!(stats.lane(Priority::Critical).admitted, 300);
        assert_eq!(stats.lane(Priority::Low).admitted, 1);
        assert_eq!(
            stats.lane(Priority::Low).promoted,
            1,
            "admitted by promotion"
        );
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_low_leaves_room_for_critical() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        // Low may hold 6 of 8 slots; the last two are for the lanes above.
        let rt = open(dir.path(), 8).open().unwrap();
        let prefix = format!("reserve-{round}-");
        let lows = flood(&rt, 300, Priority::Low, |i| format!("{prefix}l{i}"));
        rt.wait_until(|s| s.lane(Priority::Low).waiting >= 200)
            .await;
        assert!(
            rt.stats().lane(Priority::Low).in_flight <= 6,
            "low keeps out of the reserve"
        );
        let out = rt
            .entity::<Logged>(format!("{prefix}critical"))
            .ask(1)
            .priority(Priority::Critical)
            .await
            .unwrap();
        assert_eq!(out.kind(), OutcomeKind::Applied);
        // Admitted at once, into the reserve the low flood may not take: without the reserve
        // every slot is low's and the critical ask queues (and counts as waited).
        let stats = rt.stats();
        assert_eq!(stats.lane(Priority::Critical).admitted, 1, "round {round}");
        assert_eq!(
            stats.lane(Priority::Critical).waited,
            0,
            "round {round}: the critical ask waited"
        );
        join(lows).await;
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_flood_waits_behind_itself() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        // 16 slots; one entity may hold 2 of them (the default share, 1/8).
        let rt = open(dir.path(), 16).open().unwrap();
        let prefix = format!("hot-{round}-");
        let hot_key = format!("{prefix}hot");
        let hot = flood(&rt, 300, Priority::Normal, |_| hot_key.clone());
        // Every hot caller has arrived (admitted or queued), so from here on only the cold
        // key can be admitted at once.
        rt.wait_until(|s| {
            let normal = s.lane(Priority::Normal);
            normal.waiting >= 200 && normal.waiting + normal.admitted >= 300
        })
        .await;
        let at_once = |s: &keystead::RuntimeStats| {
            let normal = s.lane(Priority::Normal);
            normal.admitted - normal.waited
        };
        let before = at_once(&rt.stats());
        let cold_key = format!("{prefix}cold");
        rt.entity::<Logged>(cold_key.clone()).ask(1).await.unwrap();
        // The cold key was admitted at once, past the hot key's queue: without the per-entity
        // cap the hot key holds every slot and the cold key queues behind its flood.
        assert_eq!(
            at_once(&rt.stats()),
            before + 1,
            "round {round}: the cold key waited behind the hot key's flood"
        );
        join(hot).await;
        let stats = rt.stats();
        assert!(
            stats.entity_capped >= 200,
            "the hot key's callers waited on its cap"
        );
        let snap = rt.entity::<Logged>(hot_key).snapshot().await.unwrap();
        assert_eq!(snap.state, 300, "every hot message applied once");
        rt.shutdown().await;
    }
}
