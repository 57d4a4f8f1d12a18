//! Goal: per effect type limits hold (issue 12). An attempt that runs longer than its type's
//! `attempt_timeout` fails retryably and is retried with the same key, then dead-lettered
//! when its attempts run out; an async executor's attempt is cancelled; a quick executor is
//! untouched; limits for an effect type without an executor, or a zero timeout, are refused
//! at open with the setting named.
//! Method: executors that never answer (an async one pending for ever, a blocking one
//! waiting on a channel nobody sends to) and one that answers at once; the test waits on the
//! runtime's counters, then reads the effect's stored record.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keystead::{
    AsyncExecutor, Effect, EffectContext, EffectError, EffectKey, EffectLimits, EffectStatus,
    Executor, Feedback, OpenError,
};
use serde::{Deserialize, Serialize};

/// An async provider that never answers; counts the attempts it saw start, and the ones
/// cancelled (dropped before they ended).
#[derive(Clone, Default)]
struct Hanging {
    started: Arc<AtomicU64>,
    cancelled: Arc<AtomicU64>,
}

struct CountDrop(Arc<AtomicU64>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl AsyncExecutor<Enrich> for Hanging {
    async fn execute(&self, _: Enrich, _: EffectContext) -> Result<Feedback<Enrich>, EffectError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let _cancelled = CountDrop(self.cancelled.clone());
        std::future::pending::<()>().await;
        Ok(None)
    }
}

/// A blocking provider that waits for a token that never comes (until the test ends).
struct Stuck(crossbeam_channel::Receiver<()>);

impl Executor<Enrich> for Stuck {
    fn execute(&self, _: &Enrich, _: &EffectContext) -> Result<Feedback<Enrich>, EffectError> {
        let _ = self.0.recv();
        Err(EffectError::retryable("the test ended"))
    }
}

/// A second effect type of the same entity (never recorded: only its limits matter here).
#[derive(Debug, Serialize, Deserialize)]
struct Note;

impl Effect for Note {
    const NAME: &'static str = "note";
    type Origin = Product;
}

/// A provider that answers at once.
struct Quick;

impl Executor<Note> for Quick {
    fn execute(&self, _: &Note, _: &EffectContext) -> Result<Feedback<Note>, EffectError> {
        Ok(None)
    }
}

impl Executor<Enrich> for Quick {
    fn execute(&self, _: &Enrich, _: &EffectContext) -> Result<Feedback<Enrich>, EffectError> {
        Ok(None)
    }
}

async fn within<F: std::future::IntoFuture>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f.into_future())
        .await
        .expect("the runtime got there, no hang")
}

fn timeout_of(ms: u64) -> EffectLimits {
    EffectLimits::default().attempt_timeout(Duration::from_millis(ms))
}

/// The stored record of the effect of `key`'s first message.
async fn the_effect(rt: &keystead::Runtime, key: &str) -> keystead::EffectInfo {
    let effects = rt.effects_of::<Product>(key).await.unwrap();
    assert_eq!(effects.len(), 1, "{effects:?}");
    effects.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_outlasts_its_timeout_fails_and_is_retried_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Hanging::default();
    let rt = runtime_builder(dir.path())
        .effect_retry(fast_retry(3))
        .register::<Product>()
        .async_executor::<Enrich>(provider.clone())
        .effect_limits::<Enrich>(timeout_of(20))
        .open()
        .unwrap();
    rt.entity::<Product>("p").ask(()).await.unwrap();
    within(rt.wait_until(|s| s.effects_dead_lettered == 1)).await;
    let effect = the_effect(&rt, "p").await;
    assert_eq!(effect.status, EffectStatus::DeadLettered);
    assert_eq!(effect.attempts, 3, "every attempt spent, each timed out");
    let error = effect.last_error.unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    assert_eq!(provider.started.load(Ordering::SeqCst), 3);
    assert_eq!(
        provider.cancelled.load(Ordering::SeqCst),
        3,
        "each timed-out async attempt was cancelled, not left running"
    );
    assert_eq!(rt.stats().effect_retries, 2);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_attempt_that_outlasts_its_timeout_fails_too() {
    let dir = tempfile::tempdir().unwrap();
    let (release, rx) = crossbeam_channel::unbounded();
    let rt = runtime_builder(dir.path())
        .effect_retry(fast_retry(2))
        .register::<Product>()
        .executor::<Enrich>(Stuck(rx))
        .effect_limits::<Enrich>(timeout_of(20))
        .open()
        .unwrap();
    rt.entity::<Product>("p").ask(()).await.unwrap();
    within(rt.wait_until(|s| s.effects_dead_lettered == 1)).await;
    let effect = the_effect(&rt, "p").await;
    assert_eq!(
        (effect.status, effect.attempts),
        (EffectStatus::DeadLettered, 2)
    );
    assert!(effect.last_error.unwrap_or_default().contains("timed out"));
    drop(release); // the two threads still waiting give up
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_executor_is_untouched_by_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime_builder(dir.path())
        .register::<Product>()
        .executor::<Enrich>(Quick)
        .effect_limits::<Enrich>(timeout_of(10_000))
        .open()
        .unwrap();
    for i in 0..20 {
        rt.entity::<Product>(format!("p{i}")).ask(()).await.unwrap();
    }
    within(rt.idle()).await;
    let s = rt.stats();
    assert_eq!((s.effects_done, s.effect_retries), (20, 0));
    let effect = the_effect(&rt, "p7").await;
    assert_eq!((effect.status, effect.attempts), (EffectStatus::Done, 1));
    assert_eq!(
        effect.effect_key,
        EffectKey::new("product", "p7", effect.effect_key.message_id.as_str(), 0)
    );
    rt.shutdown().await;
}

/// Asserts that `refused` is an `InvalidConfig` of `effect_limits` naming effect `name`.
fn assert_refused_naming(refused: &OpenError, name: &str) {
    match refused {
        OpenError::InvalidConfig { setting, reason } => {
            assert_eq!(*setting, "effect_limits");
            assert!(reason.contains(&format!("{name:?}")), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn limits_without_an_executor_or_with_a_zero_timeout_are_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let refused = runtime_builder(dir.path())
        .register::<Product>()
        .effect_limits::<Enrich>(timeout_of(100))
        .open()
        .unwrap_err();
    assert_refused_naming(&refused, "enrich");
    let refused = runtime_builder(dir.path())
        .register::<Product>()
        .executor::<Enrich>(Quick)
        .effect_limits::<Enrich>(timeout_of(0))
        .open()
        .unwrap_err();
    assert_refused_naming(&refused, "enrich");
    // A zero timeout is found whichever type has it, beside valid limits of another.
    for _ in 0..8 {
        let refused = runtime_builder(dir.path())
            .register::<Product>()
            .executor::<Enrich>(Quick)
            .executor::<Note>(Quick)
            .effect_limits::<Enrich>(timeout_of(100))
            .effect_limits::<Note>(timeout_of(0))
            .open()
            .unwrap_err();
        assert_refused_naming(&refused, "note");
    }
}

#[test]
fn limits_that_would_let_nothing_through_are_refused_at_open() {
    use keystead::{BreakerPolicy, Rate};
    let dir = tempfile::tempdir().unwrap();
    let refusals = [
        (
            EffectLimits::default().concurrency(0),
            "concurrency of zero",
        ),
        (
            EffectLimits::default().rate(Rate::new(0, Duration::from_secs(1))),
            "rate",
        ),
        (
            EffectLimits::default().rate(Rate::new(10, Duration::ZERO)),
            "rate",
        ),
        (
            EffectLimits::default().breaker(BreakerPolicy::consecutive(0)),
            "consecutive",
        ),
        (
            EffectLimits::default()
                .breaker(BreakerPolicy::consecutive(3).cool_down(Duration::ZERO)),
            "cool_down",
        ),
        (
            EffectLimits::default().breaker(BreakerPolicy::consecutive(3).failure_ratio(
                0.0,
                10,
                Duration::from_secs(60),
            )),
            "failure_ratio",
        ),
    ];
    for (limits, named) in refusals {
        let refused = runtime_builder(dir.path())
            .register::<Product>()
            .executor::<Enrich>(Quick)
            .effect_limits::<Enrich>(limits.clone())
            .open()
            .unwrap_err();
        assert_refused_naming(&refused, "enrich");
        assert!(refused.to_string().contains(named), "{limits:?}: {refused}");
    }
}
