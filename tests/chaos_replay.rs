//! Goal: the chaos testkit is itself trustworthy: a seed replays the same interleaving
//! and outcome, a real bug fails with the seed and a one-line replay command, and that
//! command reproduces the failure.
//!
//! Method: a mixed scenario (asks, versioned tells, effects with feedback, three
//! entities) run twice per seed, traces and pictures compared line by line; then a counter
//! incremented without idempotency ids, which the testkit must reject.

mod common;

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use common::{Never, Tally, TallyCmd, TallyEntity};
use keystead::testkit::{Chaos, Faults, Script};
use keystead::{Context, Effect, EffectContext, Entity};
use serde::{Deserialize, Serialize};

/// A shipment: `Ship` records a label effect whose feedback stores the tracking number.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Shipment {
    items: Vec<String>,
    tracking: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum ShipmentCmd {
    Add(String),
    Ship,
    Tracking(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct PrintLabel {
    items: usize,
}

impl Effect for PrintLabel {
    const NAME: &'static str = "print-label";
    type Origin = ShipmentEntity;
}

struct ShipmentEntity;

impl Entity for ShipmentEntity {
    const NAME: &'static str = "shipment";
    type State = Shipment;
    type Command = ShipmentCmd;
    type Reply = usize;
    type Error = Never;

    fn handle(s: &mut Shipment, cmd: &ShipmentCmd, ctx: &mut Context<'_>) -> Result<usize, Never> {
        match cmd {
            ShipmentCmd::Add(item) => s.items.push(item.clone()),
            ShipmentCmd::Ship => ctx.effect(PrintLabel {
                items: s.items.len(),
            }),
            ShipmentCmd::Tracking(number) => s.tracking = Some(number.clone()),
        }
        Ok(s.items.len())
    }
}

fn chaos() -> Chaos {
    Chaos::new(|builder, ledger| {
        builder
            .register::<ShipmentEntity>()
            .register::<TallyEntity>()
            .executor(
                ledger.executor_with(|label: &PrintLabel, ctx: &EffectContext| {
                    Some(ShipmentCmd::Tracking(format!(
                        "{} items, {}",
                        label.items,
                        ctx.effect_key()
                    )))
                }),
            )
    })
    .order_dependent()
    .check(|_| Ok(()))
}

fn mixed(s: &mut Script) {
    for (i, item) in ["book", "lamp", "mug"].into_iter().enumerate() {
        s.ask::<ShipmentEntity>("sh-1", ShipmentCmd::Add(item.into()))
            .id(format!("add-{item}"));
        s.tell::<ShipmentEntity>("sh-2", ShipmentCmd::Add(item.into()))
            .id(format!("add-2-{item}"))
            .version(i as u64 + 1);
    }
    s.ask::<ShipmentEntity>("sh-1", ShipmentCmd::Ship)
        .id("ship-1");
    s.tell::<ShipmentEntity>("sh-2", ShipmentCmd::Ship)
        .id("ship-2")
        .version(10);
    for n in 0..3 {
        s.tell::<TallyEntity>(
            "t-1",
            TallyCmd::Add {
                tag: format!("n{n}"),
            },
        )
        .id(format!("tally-{n}"));
    }
}

/// Replaying a seed gives the same interleaving (the trace: every delivery's outcome in
/// plan order, every passivation and restart) and the same final picture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_replays_the_same_trace_and_outcome() {
    let chaos = chaos();
    let mut distinct_traces = std::collections::HashSet::new();
    for seed in 0..40 {
        let first = chaos.run_seed(mixed, Some(seed)).await.expect("first run");
        let again = chaos.run_seed(mixed, Some(seed)).await.expect("replay");
        assert_eq!(
            first.trace(),
            again.trace(),
            "seed {seed}: the trace changed"
        );
        assert_eq!(
            first.picture(),
            again.picture(),
            "seed {seed}: the outcome changed"
        );
        assert!(
            first.trace().len() >= 11,
            "seed {seed}: every message delivered at least once: {:?}",
            first.trace()
        );
        distinct_traces.insert(first.trace().to_vec());
    }
    // Different seeds do explore different interleavings.
    assert!(
        distinct_traces.len() > 30,
        "{} distinct traces",
        distinct_traces.len()
    );
}

/// A counter bumped without idempotency ids double-counts when a delivery is repeated;
/// the testkit must fail it, name the seed, and print a replay command that reproduces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_idempotency_key_fails_with_a_replayable_seed() {
    fn no_ids(s: &mut Script) {
        s.ask::<TallyEntity>("t-9", TallyCmd::Add { tag: "a".into() });
        s.ask::<TallyEntity>("t-9", TallyCmd::Add { tag: "b".into() });
    }
    let chaos = Chaos::new(|builder, _| builder.register::<TallyEntity>())
        .seeds(50)
        .faults(Faults::default().reorder(false));
    // Run on this test's own thread (not a spawned task), as a user's test does: the
    // replay command names the test from it.
    let panic = match CatchUnwind(Box::pin(chaos.run(no_ids))).await {
        Err(panic) => panic,
        Ok(report) => panic!("the testkit passed a double-counting script: {report}"),
    };
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .expect("a formatted panic message");
    assert!(message.contains("differs from the calm run"), "{message}");
    let replay = message
        .lines()
        .find_map(|l| l.strip_prefix("replay: "))
        .unwrap_or_else(|| panic!("no replay line in:\n{message}"));
    assert!(
        replay.contains("cargo test --test chaos_replay -- --exact a_missing_idempotency_key_fails_with_a_replayable_seed"),
        "{replay}"
    );
    let seed: u64 = replay
        .strip_prefix("KEYSTEAD_CHAOS_SEED=")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no seed in {replay:?}"));
    // The replay reproduces the failure: the same double count, from the seed alone.
    let calm = chaos.run_seed(no_ids, None).await.expect("calm run");
    let replayed = chaos
        .run_seed(no_ids, Some(seed))
        .await
        .expect("replayed run");
    let counted = |run: &keystead::testkit::Run| {
        run.state::<TallyEntity>("t-9")
            .map(|s| s.state.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        counted(&calm),
        Tally {
            count: 2,
            applied: vec!["a".into(), "b".into()]
        }
    );
    assert!(
        counted(&replayed).count > 2,
        "seed {seed} replayed without the double count: {:?}",
        counted(&replayed)
    );
    assert!(message.contains(
        &replayed
            .picture()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    ));
}

/// Effects run under injected faults are still performed once per effect key, and their
/// feedback lands once: the ledger saw more calls than it performed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_effect_faults_are_absorbed_by_the_effect_key() {
    let report = chaos()
        .seeds(60)
        .check(move |run| {
            let labels = run
                .performed()
                .iter()
                .filter(|p| p.effect == "print-label")
                .count();
            assert_eq!(labels, 2, "one label per shipment");
            for key in ["sh-1", "sh-2"] {
                let s = run.state::<ShipmentEntity>(key).expect("state");
                assert!(s.state.tracking.is_some(), "{key}: feedback applied");
            }
            Ok(())
        })
        .run(mixed)
        .await;
    assert!(report.effect_faults > 10, "{report}");
    assert!(report.effect_calls > 2 * report.seeds, "{report}");
}

/// Turns a panic inside a future into an `Err`, polling it on the current task.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
