//! Goal: effects wait in lanes too (issue 11). An effect waits for the effect workers in the
//! lane of the message that recorded it, so a `Critical` message's effect runs ahead of a
//! `Low` backlog of effects; `prioritise` raises an entity's unfinished effects, at once and
//! durably (after a restart too).
//! Method: one effect worker slot (`effects_running_max(1)`) and an executor that blocks
//! until the test hands it a token (a channel, not a timer), so every other effect queues;
//! the test waits on the runtime's counters until the queue is formed, then hands out tokens
//! and asserts the order in which the executor was entered.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use crossbeam_channel::{unbounded, Receiver, Sender};
use keystead::{
    Context, Effect, EffectContext, EffectError, Entity, Executor, Feedback, Priority, Runtime,
};
use serde::{Deserialize, Serialize};

/// Records one `Enrich` per command.
struct Product;

#[derive(Debug, Serialize, Deserialize)]
struct Enrich;

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

/// Logs the key of every effect it enters, then waits for a token.
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
    runtime_builder(dir)
        .shards(1)
        .effects_running_max(1)
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

/// The first effect takes the only worker slot and blocks; then ten low messages record
/// ten more effects, which queue for the slot.
async fn queue_low_effects(rt: &Runtime) {
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
