//! Goal: effects wait in lanes too (issue 11). An effect waits for the effect workers in the
//! lane of the message that recorded it, so a `Critical` message's effect runs ahead of a
//! `Low` backlog of effects; `prioritise` raises an entity's unfinished effects, at once and
//! durably (after a restart too).
//! Method: one effect worker slot (`effects_running_max(1)`) and an executor that blocks
//! until the test hands it a token (a channel, not a timer), so every other effect queues;
//! the test waits on the runtime's counters until the queue is formed, then hands out tokens
//! and asserts the order in which the executor was entered.
//!
//! Also: the outbox is bounded per lane (`outbox_limits`). A message whose effects do not
//! fit is not applied yet: from the inbox it waits for room (nothing lost, nothing over the
//! bound), an `ask` meets its lane's policy and gets its command back; the bound is counted
//! again from the disk at open; a requeued dead-lettered effect takes room like any other.
//!
//! And: at most `effect_lanes_max` entities' effect workers exist at once, however many
//! entities have effects pending (the others wait on disk and are found through the outbox
//! lane index, in lane order, also after a restart and in a database from before the index).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use crossbeam_channel::{unbounded, Receiver, Sender};
use keystead::{
    AdminError, BacklogKind, EffectContext, EffectError, Executor, Feedback, LaneLimits, Priority,
    Runtime, RuntimeBuilder, SubmitError, WhenFull,
};

/// Logs the key of every effect it enters, then waits for a token. An effect of a key that
/// starts with "doomed" fails at once (retryable), without a token.
#[derive(Clone)]
struct Provider {
    entered: Arc<Mutex<Vec<String>>>,
    tokens: Receiver<()>,
}

impl Executor<Enrich> for Provider {
    fn execute(&self, _: &Enrich, ctx: &EffectContext) -> Result<Feedback<Enrich>, EffectError> {
        self.entered
            .lock()
            .unwrap()
            .push(ctx.effect_key().key.clone());
        if ctx.effect_key().key.starts_with("doomed") {
            return Err(EffectError::retryable("the provider refuses doomed keys"));
        }
        self.tokens
            .recv()
            .map_err(|_| EffectError::retryable("the test ended"))?;
        Ok(None)
    }
}

fn blocking_provider() -> (Provider, Sender<()>) {
    let (tx, rx) = unbounded();
    let provider = Provider {
        entered: Arc::default(),
        tokens: rx,
    };
    (provider, tx)
}

fn open(dir: &std::path::Path, provider: Provider) -> Runtime {
    open_with(dir, provider, |b| b)
}

fn open_with(
    dir: &std::path::Path,
    provider: Provider,
    settings: impl FnOnce(RuntimeBuilder) -> RuntimeBuilder,
) -> Runtime {
    settings(runtime_builder(dir).shards(1).effects_running_max(1))
        .register::<Product>()
        .executor::<Enrich>(provider)
        .open()
        .unwrap()
}

async fn within<F: std::future::IntoFuture>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f.into_future())
        .await
        .expect("the runtime got there, no hang")
}

/// "first" records a low effect, which takes the only attempt slot and blocks; then ten
/// low messages record ten more effects.
async fn record_low_effects(rt: &Runtime) {
    rt.entity::<Product>("first")
        .ask(())
        .priority(Priority::Low)
        .await
        .unwrap();
    within(rt.wait_until(|s| s.effect_priority(Priority::Low).in_flight == 1)).await;
    for i in 0..10 {
        rt.entity::<Product>(format!("low-{i}"))
            .ask(())
            .priority(Priority::Low)
            .await
            .unwrap();
    }
}

/// The first effect takes the only worker slot and blocks; then ten low messages record
/// ten more effects, which queue for the slot.
async fn queue_low_effects(rt: &Runtime) {
    record_low_effects(rt).await;
    within(rt.wait_until(|s| s.effect_priority(Priority::Low).waiting == 10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_messages_effect_runs_ahead_of_a_low_backlog() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (provider, tokens) = blocking_provider();
        let entered = provider.entered.clone();
        let rt = open(dir.path(), provider);
        queue_low_effects(&rt).await;
        rt.entity::<Product>("urgent")
            .ask(())
            .priority(Priority::Critical)
            .await
            .unwrap();
        within(rt.wait_until(|s| s.effect_priority(Priority::Critical).waiting == 1)).await;
        for _ in 0..12 {
            tokens.send(()).unwrap();
        }
        within(rt.idle()).await;
        let order = entered.lock().unwrap().clone();
        assert_eq!(
            order.len(),
            12,
            "round {round}: every effect performed once: {order:?}"
        );
        assert_eq!(order[0], "first");
        assert_eq!(
            order[1], "urgent",
            "round {round}: the critical effect went next: {order:?}"
        );
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prioritise_raises_waiting_effects_at_once_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (provider, tokens) = blocking_provider();
    let entered = provider.entered.clone();
    let rt = open(dir.path(), provider);
    queue_low_effects(&rt).await;
    // A user looks at low-7: its waiting effect moves up at once.
    assert_eq!(
        rt.entity::<Product>("low-7")
            .prioritise(Priority::Critical)
            .await
            .unwrap(),
        1
    );
    within(rt.wait_until(|s| s.effect_priority(Priority::Critical).waiting == 1)).await;
    tokens.send(()).unwrap(); // "first" finishes
    tokens.send(()).unwrap(); // the next one: low-7
    within(rt.wait_until(|s| s.effects_done == 2)).await;
    // (The next one may already have entered the executor and be waiting for its token.)
    assert_eq!(entered.lock().unwrap()[..2], ["first", "low-7"]);
    // low-3 is raised, then the runtime stops with nine effects unfinished (one of them
    // entered the executor: it runs again, with the same key, after the restart).
    assert_eq!(
        rt.entity::<Product>("low-3")
            .prioritise(Priority::High)
            .await
            .unwrap(),
        1
    );
    rt.close_now();
    drop(tokens); // the executor thread still blocked on the old runtime gives up
                  // After a restart the raise still holds: low-3 runs first among those that wait.
    let (provider, tokens) = blocking_provider();
    let entered = provider.entered.clone();
    let rt = open(dir.path(), provider);
    within(rt.wait_until(|s| {
        s.effect_priority(Priority::Low).waiting + s.effect_priority(Priority::High).waiting >= 8
    }))
    .await;
    for _ in 0..9 {
        tokens.send(()).unwrap();
    }
    within(rt.idle()).await;
    let order = entered.lock().unwrap().clone();
    let unique: std::collections::HashSet<&String> = order.iter().collect();
    assert!(
        order.len() == 9 && unique.len() == 9,
        "the nine left ran once: {order:?}"
    );
    // The first one granted after the restart takes the free slot at once, before the
    // others have queued; of those that queue, the raised one goes first.
    let at = order.iter().position(|k| k == "low-3").expect("low-3 ran");
    assert!(at <= 1, "low-3 was raised: {order:?}");
    rt.shutdown().await;
}

/// Outbox lane `Low` holds at most three effects.
fn low_outbox_of_three(b: RuntimeBuilder) -> RuntimeBuilder {
    b.outbox_limits(Priority::Low, LaneLimits::new(3, 1 << 20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_lane_holds_messages_back_and_loses_none() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (provider, tokens) = blocking_provider();
        let entered = provider.entered.clone();
        let rt = open_with(dir.path(), provider, low_outbox_of_three);
        for i in 0..20 {
            rt.entity::<Product>(format!("p-{i}"))
                .tell(())
                .priority(Priority::Low)
                .await
                .unwrap();
        }
        // Three messages are applied and their effects fill the lane; the next one waits
        // for room without being applied, and the rest wait in the inbox behind it.
        within(rt.wait_until(|s| s.applied == 3 && s.effect_priority(Priority::Low).blocked >= 1))
            .await;
        let s = rt.stats();
        assert_eq!(s.effect_priority(Priority::Low).pending, 3, "round {round}");
        assert_eq!(
            s.lane(Priority::Low).pending,
            17,
            "round {round}: in the inbox"
        );
        let mut recorded = 0;
        for i in 0..20 {
            let effects = rt.effects_of::<Product>(&format!("p-{i}")).await.unwrap();
            let state = rt
                .entity::<Product>(format!("p-{i}"))
                .snapshot()
                .await
                .unwrap()
                .state;
            assert_eq!(effects.len() as u64, state, "round {round}: p-{i}");
            recorded += effects.len();
        }
        assert_eq!(
            recorded, 3,
            "round {round}: never more effects than the bound"
        );
        // Each finished effect lets one more message through, never over the bound.
        for done in 1..=20u64 {
            tokens.send(()).unwrap();
            within(rt.wait_until(|s| s.effects_done == done)).await;
            let s = rt.stats();
            assert!(
                s.effect_priority(Priority::Low).pending <= 3,
                "round {round}: {:?}",
                s.effect_priority(Priority::Low)
            );
        }
        within(rt.idle()).await;
        let order = entered.lock().unwrap().clone();
        let unique: std::collections::HashSet<&String> = order.iter().collect();
        assert!(
            order.len() == 20 && unique.len() == 20,
            "round {round}: every message applied, every effect performed once: {order:?}"
        );
        for i in 0..20 {
            let snapshot = rt
                .entity::<Product>(format!("p-{i}"))
                .snapshot()
                .await
                .unwrap();
            assert_eq!(snapshot.state, 1, "round {round}: p-{i}");
        }
        let s = rt.stats();
        assert_eq!(s.effect_priority(Priority::Low).pending, 0);
        assert_eq!(s.lane(Priority::Low).pending, 0);
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_meets_a_full_outbox_lane_with_its_policy_and_gets_its_command_back() {
    // Reject: refused at once, nothing applied, the command given back.
    let dir = tempfile::tempdir().unwrap();
    let (provider, tokens) = blocking_provider();
    let rt = open_with(dir.path(), provider, |b| {
        b.outbox_limits(
            Priority::Normal,
            LaneLimits::new(1, 1 << 20).when_full(WhenFull::Reject),
        )
    });
    rt.entity::<Product>("a").ask(()).await.unwrap();
    let refused = rt.entity::<Product>("b").ask(()).await.unwrap_err();
    assert!(refused.is_retryable());
    match &refused {
        SubmitError::Overloaded {
            backlog,
            lane,
            pending,
            pending_max,
            ..
        } => {
            assert_eq!(*backlog, BacklogKind::Outbox);
            assert_eq!(*lane, Priority::Normal);
            assert_eq!((*pending, *pending_max), (1, 1));
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert!(refused.to_string().contains("outbox_limits"), "{refused}");
    assert_eq!(refused.into_command::<()>(), Some(()));
    let b = rt.entity::<Product>("b").snapshot().await.unwrap();
    assert_eq!((b.state, b.revision), (0, 0), "nothing of b was applied");
    assert_eq!(rt.stats().effect_priority(Priority::Normal).refused, 1);
    tokens.send(()).unwrap();
    within(rt.wait_until(|s| s.effects_done == 1)).await;
    assert_eq!(
        rt.entity::<Product>("b").ask(()).await.unwrap().reply(),
        Some(&1)
    );
    tokens.send(()).unwrap();
    within(rt.idle()).await;
    rt.shutdown().await;

    // Block: the ask waits for room and is applied once an effect finishes.
    let dir = tempfile::tempdir().unwrap();
    let (provider, tokens) = blocking_provider();
    let entered = provider.entered.clone();
    let rt = open_with(dir.path(), provider, |b| {
        b.outbox_limits(
            Priority::Normal,
            LaneLimits::new(1, 1 << 20).when_full(WhenFull::Block(Duration::from_secs(60))),
        )
    });
    rt.entity::<Product>("a").ask(()).await.unwrap();
    let b = rt.entity::<Product>("b");
    let waiting = tokio::spawn(async move { b.ask(()).await });
    within(rt.wait_until(|s| s.effect_priority(Priority::Normal).blocked == 1)).await;
    let snapshot = rt.entity::<Product>("b").snapshot().await.unwrap();
    assert_eq!(snapshot.state, 0, "b waits, not applied");
    assert!(!waiting.is_finished());
    tokens.send(()).unwrap();
    let answer = within(waiting).await.unwrap().unwrap();
    assert_eq!(answer.reply(), Some(&1));
    tokens.send(()).unwrap();
    within(rt.idle()).await;
    assert_eq!(*entered.lock().unwrap(), ["a", "b"]);
    rt.shutdown().await;

    // Block with a deadline that passes: refused with the command once it has.
    let dir = tempfile::tempdir().unwrap();
    let (provider, tokens) = blocking_provider();
    let rt = open_with(dir.path(), provider, |b| {
        b.outbox_limits(
            Priority::Normal,
            LaneLimits::new(1, 1 << 20).when_full(WhenFull::Block(Duration::from_millis(20))),
        )
    });
    rt.entity::<Product>("a").ask(()).await.unwrap();
    let refused = within(rt.entity::<Product>("b").ask(())).await.unwrap_err();
    assert!(matches!(
        refused,
        SubmitError::Overloaded {
            backlog: BacklogKind::Outbox,
            ..
        }
    ));
    assert_eq!(refused.into_command::<()>(), Some(()));
    assert_eq!(rt.entity::<Product>("b").snapshot().await.unwrap().state, 0);
    tokens.send(()).unwrap();
    within(rt.idle()).await;
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_bound_is_counted_again_from_the_disk_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (provider, tokens) = blocking_provider();
    let rt = open_with(dir.path(), provider, low_outbox_of_three);
    for key in ["x", "y", "z"] {
        rt.entity::<Product>(key)
            .ask(())
            .priority(Priority::Low)
            .await
            .unwrap();
    }
    rt.close_now();
    drop(tokens);
    let (provider, tokens) = blocking_provider();
    let entered = provider.entered.clone();
    let rt = open_with(dir.path(), provider, |b| {
        b.outbox_limits(
            Priority::Low,
            LaneLimits::new(3, 1 << 20).when_full(WhenFull::Reject),
        )
    });
    assert_eq!(rt.stats().effect_priority(Priority::Low).pending, 3);
    let refused = rt
        .entity::<Product>("w")
        .ask(())
        .priority(Priority::Low)
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        SubmitError::Overloaded {
            backlog: BacklogKind::Outbox,
            pending: 3,
            ..
        }
    ));
    for _ in 0..3 {
        tokens.send(()).unwrap();
    }
    within(rt.wait_until(|s| s.effects_done == 3)).await;
    assert_eq!(rt.stats().effect_priority(Priority::Low).pending, 0);
    rt.entity::<Product>("w")
        .ask(())
        .priority(Priority::Low)
        .await
        .unwrap();
    tokens.send(()).unwrap();
    within(rt.idle()).await;
    let mut order = entered.lock().unwrap().clone();
    order.sort();
    assert_eq!(order, ["w", "x", "y", "z"]);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_dead_lettered_effect_takes_room_in_its_outbox_lane() {
    let dir = tempfile::tempdir().unwrap();
    let (provider, tokens) = blocking_provider();
    let rt = open_with(dir.path(), provider, |b| {
        b.effect_retry(fast_retry(1)).outbox_limits(
            Priority::Normal,
            LaneLimits::new(1, 1 << 20).when_full(WhenFull::Reject),
        )
    });
    rt.entity::<Product>("doomed").ask(()).await.unwrap();
    within(rt.wait_until(|s| s.effects_dead_lettered == 1)).await;
    assert_eq!(rt.stats().effect_priority(Priority::Normal).pending, 0);
    rt.entity::<Product>("held").ask(()).await.unwrap();
    let letter = rt.effect_dead_letters().await.unwrap().remove(0).effect_key;
    let refused = rt.requeue_effect(&letter).await.unwrap_err();
    assert!(
        matches!(
            refused,
            AdminError::Overloaded {
                backlog: BacklogKind::Outbox,
                lane: Priority::Normal,
                pending: 1,
                ..
            }
        ),
        "{refused:?}"
    );
    assert_eq!(
        rt.effect_dead_letters().await.unwrap().len(),
        1,
        "still there"
    );
    tokens.send(()).unwrap();
    within(rt.wait_until(|s| s.effects_done == 1)).await;
    assert!(rt.requeue_effect(&letter).await.unwrap());
    within(rt.wait_until(|s| s.effects_dead_lettered == 2)).await;
    within(rt.idle()).await;
    assert_eq!(rt.stats().effect_priority(Priority::Normal).pending, 0);
    rt.shutdown().await;
}

/// Four effect workers at most, one effect attempt at a time.
fn four_workers(b: RuntimeBuilder) -> RuntimeBuilder {
    b.effect_lanes_max(4)
}

/// With four workers: the first low effect blocks in the executor, then ten more low
/// messages record effects. Low may hold three workers (the last quarter is reserved), so
/// two low effects wait for the attempt slot and eight wait on disk, the low effect feeder
/// waiting for a worker.
async fn queue_low_effects_on_disk(rt: &Runtime) {
    record_low_effects(rt).await;
    within(rt.wait_until(|s| {
        s.effect_priority(Priority::Low).waiting == 2
            && s.effect_activation(Priority::Low).waiting == 1
    }))
    .await;
    assert_eq!(rt.stats().effect_lanes, 3);
}

/// Once a critical effect waits for the attempt slot, hands out `n` tokens one at a time
/// and returns the order the executor was entered in (every effect once).
async fn release_after_critical(
    rt: &Runtime,
    tokens: &Sender<()>,
    entered: &Mutex<Vec<String>>,
    n: u64,
) -> Vec<String> {
    within(rt.wait_until(|s| s.effect_priority(Priority::Critical).waiting == 1)).await;
    release_one_by_one(rt, tokens, n).await;
    within(rt.idle()).await;
    let order = entered.lock().unwrap().clone();
    assert_eq!(order.len() as u64, n, "{order:?}");
    order
}

/// Hands out `n` tokens one at a time; after each, no more than four workers exist.
async fn release_one_by_one(rt: &Runtime, tokens: &Sender<()>, n: u64) {
    for done in 1..=n {
        tokens.send(()).unwrap();
        within(rt.wait_until(|s| s.effects_done >= done)).await;
        let lanes = rt.stats().effect_lanes;
        assert!(lanes <= 4, "{lanes} effect workers, at most 4");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_entities_with_pending_effects_get_at_most_effect_lanes_max_workers() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (provider, tokens) = blocking_provider();
        let entered = provider.entered.clone();
        let rt = open_with(dir.path(), provider, four_workers);
        for i in 0..30 {
            rt.entity::<Product>(format!("p-{i}"))
                .ask(())
                .await
                .unwrap();
        }
        // Four workers (an eighth of four reserves nothing for higher lanes), and the
        // effect feeder waits for one to free.
        within(rt.wait_until(|s| s.effect_activation(Priority::Normal).waiting == 1)).await;
        let s = rt.stats();
        assert_eq!(s.effect_lanes, 4, "round {round}: {s:?}");
        assert_eq!(s.effect_priority(Priority::Normal).pending, 30);
        release_one_by_one(&rt, &tokens, 30).await;
        within(rt.idle()).await;
        let order = entered.lock().unwrap().clone();
        let unique: std::collections::HashSet<&String> = order.iter().collect();
        assert!(
            order.len() == 30 && unique.len() == 30,
            "round {round}: every effect performed once: {order:?}"
        );
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_effect_gets_a_worker_when_low_ones_hold_all_they_may() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (provider, tokens) = blocking_provider();
        let entered = provider.entered.clone();
        let rt = open_with(dir.path(), provider, four_workers);
        queue_low_effects_on_disk(&rt).await;
        rt.entity::<Product>("urgent")
            .ask(())
            .priority(Priority::Critical)
            .await
            .unwrap();
        let order = release_after_critical(&rt, &tokens, &entered, 12).await;
        assert_eq!(
            order[1], "urgent",
            "round {round}: the critical effect went next: {order:?}"
        );
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prioritise_moves_effects_that_wait_on_disk_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let (provider, tokens) = blocking_provider();
    let entered = provider.entered.clone();
    let rt = open_with(dir.path(), provider, four_workers);
    queue_low_effects_on_disk(&rt).await;
    // low-8 has no worker yet: its effect waits on disk, in the low lane of the index.
    assert_eq!(
        rt.entity::<Product>("low-8")
            .prioritise(Priority::Critical)
            .await
            .unwrap(),
        1
    );
    let order = release_after_critical(&rt, &tokens, &entered, 11).await;
    assert_eq!(
        order[1], "low-8",
        "raised ahead of the low backlog: {order:?}"
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_effects_resume_after_a_restart_and_in_a_database_from_before_the_index() {
    for old_database in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (provider, tokens) = blocking_provider();
        let rt = open_with(dir.path(), provider, four_workers);
        for i in 0..20 {
            rt.entity::<Product>(format!("p-{i}"))
                .ask(())
                .await
                .unwrap();
        }
        rt.close_now();
        drop(tokens);
        // The four effects that found a worker at once were left to it, unindexed; the
        // other sixteen waited on disk in the index. The restart must find all twenty.
        with_raw_store(dir.path(), |raw| {
            assert_eq!(raw.count_prefix(b"O"), 20);
            assert_eq!(raw.count_prefix(b"P"), 16);
            if old_database {
                // As written before the outbox lane index existed.
                assert_eq!(raw.remove_prefix(b"P"), 16);
            }
            // An index entry whose effect is gone (as a `prioritise` racing the effect's
            // end leaves behind): removed at open.
            let mut stale = vec![b'P', 0];
            stale.extend_from_slice(&u64::MAX.to_be_bytes());
            stale.extend_from_slice(&0u32.to_be_bytes());
            raw.put(&stale, b"Ogone");
        });
        let (provider, tokens) = blocking_provider();
        let entered = provider.entered.clone();
        let rt = open_with(dir.path(), provider, four_workers);
        release_one_by_one(&rt, &tokens, 20).await;
        within(rt.idle()).await;
        let order = entered.lock().unwrap().clone();
        let unique: std::collections::HashSet<&String> = order.iter().collect();
        assert_eq!(unique.len(), 20, "old database {old_database}: {order:?}");
        rt.shutdown().await;
        with_raw_store(dir.path(), |raw| {
            assert_eq!(
                raw.count_prefix(b"P"),
                0,
                "no index entry outlives its effect"
            );
            assert_eq!(raw.count_prefix(b"O"), 0);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn effects_left_to_a_running_worker_are_never_orphaned() {
    // Two messages to each of many entities, back to back: the second one's effect is
    // often left (unindexed) to the worker still running the first one's, which is about to
    // end. It must still run before the runtime idles, with no later message to find it.
    const KEYS: usize = 1_200;
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (provider, tokens) = blocking_provider();
        let entered = provider.entered.clone();
        for _ in 0..2 * KEYS {
            tokens.send(()).unwrap();
        }
        let rt = Arc::new(open_with(dir.path(), provider, |b| {
            b.effects_running_max(64).shards(2)
        }));
        let senders: Vec<_> = (0..64)
            .map(|s| {
                let rt = rt.clone();
                tokio::spawn(async move {
                    for k in (s..KEYS).step_by(64) {
                        let entity = rt.entity::<Product>(format!("k{k}"));
                        entity.ask(()).await.unwrap();
                        entity.ask(()).await.unwrap();
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.await.unwrap();
        }
        within(rt.idle()).await;
        let s = rt.stats();
        assert_eq!(s.applied, 2 * KEYS as u64, "round {round}");
        assert_eq!(
            (s.effects_done, entered.lock().unwrap().len()),
            (2 * KEYS as u64, 2 * KEYS),
            "round {round}: every effect ran once, none left behind: {:?}",
            s.effect_priority(Priority::Normal)
        );
        assert_eq!(s.effect_priority(Priority::Normal).pending, 0);
        if let Ok(rt) = Arc::try_unwrap(rt) {
            rt.shutdown().await;
        }
    }
}
