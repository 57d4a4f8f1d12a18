//! Goal: an effect type's circuit breaker, rate limits and concurrency limit hold under an
//! outage (issue 12). The breaker opens after its failures, spends no attempt while open,
//! lets one probe through after each cool-down, and closes on a success; the failures it
//! takes on itself are not counted against the effects, so a long outage dead-letters
//! nothing; rate limits hold over every window; a type held back holds no effect worker,
//! so another type's effects run on.
//! Method: a `ManualClock` drives the cool-downs and refills (the test moves it; nothing
//! sleeps); a provider that records the clock reading of every call and can be switched
//! down; the test waits on the runtime's counters (`parked`, `effects_done`, breaker
//! state), then asserts the calls per clock reading and the stored effect records.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use keystead::{
    BreakerPolicy, BreakerState, Context, Effect, EffectContext, EffectError, EffectLimits,
    EffectStatus, Entity, Executor, Feedback, ManualClock, Rate, RetryPolicy, Runtime,
    RuntimeStats,
};
use serde::{Deserialize, Serialize};

const START_MS: u64 = 1_000_000;

/// An enrichment provider: records the clock reading of every call; fails while `down`.
#[derive(Clone)]
struct Provider {
    clock: ManualClock,
    down: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<(String, u64)>>>,
}

impl Provider {
    fn new(clock: &ManualClock, down: bool) -> Self {
        Self {
            clock: clock.clone(),
            down: Arc::new(AtomicBool::new(down)),
            calls: Arc::default(),
        }
    }

    /// Calls made at clock reading `at_ms` (relative to the start).
    fn calls_at(&self, at_ms: u64) -> usize {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|(_, t)| *t == START_MS + at_ms).count()
    }

    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

impl Executor<Enrich> for Provider {
    fn execute(&self, _: &Enrich, ctx: &EffectContext) -> Result<Feedback<Enrich>, EffectError> {
        use keystead::Clock;
        let key = ctx.effect_key().key.clone();
        self.calls.lock().unwrap().push((key, self.clock.now_ms()));
        if self.down.load(Ordering::SeqCst) {
            return Err(EffectError::retryable("503 from the provider"));
        }
        Ok(None)
    }
}

async fn within<F: std::future::IntoFuture>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f.into_future())
        .await
        .expect("the runtime got there, no hang")
}

/// Waits until `condition` holds for the runtime's counters; on a hang, fails showing them.
async fn wait(rt: &Runtime, condition: impl Fn(&RuntimeStats) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(60), rt.wait_until(condition)).await;
    if waited.is_err() {
        let s = rt.stats();
        panic!(
            "the runtime never got there: {:?}, done {}, lanes {}, dead {}",
            s.effect_types, s.effects_done, s.effect_lanes, s.effects_dead_lettered
        );
    }
}

fn enrich(s: &RuntimeStats) -> keystead::EffectTypeStats {
    s.effect_type("enrich").cloned().unwrap_or_default()
}

/// Few attempts, a short real-time backoff: without the breaker's rule the outage would
/// dead-letter these effects at once. (Each test's breaker opens after at most two
/// failures in a row, so an effect's own retries never run out before it opens.)
fn two_attempts() -> RetryPolicy {
    RetryPolicy::default()
        .attempts_max(2)
        .backoff_initial(Duration::from_millis(1))
        .backoff_max(Duration::from_millis(2))
}

fn open(
    dir: &std::path::Path,
    clock: &ManualClock,
    provider: Provider,
    limits: EffectLimits,
) -> Runtime {
    runtime_builder(dir)
        .clock(clock.clone())
        .effect_retry(two_attempts())
        .register::<Product>()
        .executor::<Enrich>(provider)
        .effect_limits::<Enrich>(limits)
        .open()
        .unwrap()
}

fn breaker(consecutive: u32) -> EffectLimits {
    EffectLimits::default()
        .breaker(BreakerPolicy::consecutive(consecutive).cool_down(Duration::from_secs(30)))
}

async fn tell_products(rt: &Runtime, n: usize) {
    for i in 0..n {
        rt.entity::<Product>(format!("p{i}"))
            .tell(())
            .await
            .unwrap();
    }
}

/// Every product's one effect, done with at most `attempts_max` counted attempts.
async fn assert_all_done(rt: &Runtime, n: usize) {
    for i in 0..n {
        let effects = rt.effects_of::<Product>(&format!("p{i}")).await.unwrap();
        assert_eq!(effects.len(), 1, "p{i}: {effects:?}");
        assert_eq!(effects[0].status, EffectStatus::Done, "p{i}: {effects:?}");
        assert!(effects[0].attempts <= 2, "p{i}: {effects:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_waits_probes_and_closes_without_spending_attempts() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START_MS);
        let provider = Provider::new(&clock, true);
        // Two failures in a row open it, and each effect may fail twice: an effect's own
        // failures open the breaker before its attempts run out.
        let rt = open(dir.path(), &clock, provider.clone(), breaker(2));
        tell_products(&rt, 20).await;
        // Every effect ends up parked, none dead-lettered.
        wait(&rt, |s| {
            enrich(s).breaker == BreakerState::Open && enrich(s).parked == 20
        })
        .await;
        let before = provider.calls();
        assert!((2..=20).contains(&before), "round {round}: {before} calls");
        assert_eq!(provider.calls_at(0), before, "all at the start");
        // 29 s: still open, nothing runs. 30 s: one probe, which fails and reopens it.
        clock.advance(Duration::from_secs(29));
        clock.advance(Duration::from_secs(1));
        wait(&rt, |s| {
            enrich(s).breaker_opened == 2 && enrich(s).parked == 20
        })
        .await;
        assert_eq!(
            provider.calls_at(29_000),
            0,
            "round {round}: nothing while open"
        );
        assert_eq!(provider.calls_at(30_000), 1, "round {round}: one probe");
        // Five more failed cool-downs: one probe each, still nothing dead-lettered.
        for k in 2..7u64 {
            clock.advance(Duration::from_secs(30));
            wait(&rt, |s| {
                enrich(s).breaker_opened == k + 1 && enrich(s).parked == 20
            })
            .await;
            assert_eq!(
                provider.calls_at(30_000 * k),
                1,
                "round {round}: one probe at {k}"
            );
        }
        // The provider is back: the next probe closes it and everything drains.
        provider.down.store(false, Ordering::SeqCst);
        clock.advance(Duration::from_secs(30));
        wait(&rt, |s| s.effects_done == 20).await;
        within(rt.idle()).await;
        let s = rt.stats();
        let t = enrich(&s);
        assert_eq!(s.effects_dead_lettered, 0, "round {round}");
        assert_eq!(
            (t.breaker, t.breaker_closed, t.breaker_opened),
            (BreakerState::Closed, 1, 7)
        );
        assert_eq!(t.probes, 7, "round {round}");
        assert_eq!(
            provider.calls_at(210_000),
            20,
            "round {round}: the probe and the other 19"
        );
        assert_eq!(
            provider.calls(),
            before + 6 + 20,
            "round {round}: no other call"
        );
        assert_eq!(t.parked, 0);
        assert_all_done(&rt, 20).await;
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_effect_probed_through_a_long_outage_is_not_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let provider = Provider::new(&clock, true);
    // Its first failure opens the breaker; with one attempt allowed, counting that failure
    // or any probe would dead-letter it.
    let rt = runtime_builder(dir.path())
        .clock(clock.clone())
        .effect_retry(two_attempts().attempts_max(1))
        .register::<Product>()
        .executor::<Enrich>(provider.clone())
        .effect_limits::<Enrich>(breaker(1))
        .open()
        .unwrap();
    tell_products(&rt, 1).await;
    for k in 1..=40u64 {
        wait(&rt, |s| {
            enrich(s).breaker_opened == k && enrich(s).parked == 1
        })
        .await;
        if k == 40 {
            // The 20-minute outage is over: the next probe, the 41st call, succeeds.
            provider.down.store(false, Ordering::SeqCst);
        }
        clock.advance(Duration::from_secs(30));
    }
    wait(&rt, |s| s.effects_done == 1).await;
    let s = rt.stats();
    assert_eq!(s.effects_dead_lettered, 0);
    assert_eq!(enrich(&s).attempts_uncounted, 40);
    assert_eq!(provider.calls(), 41);
    let effects = rt.effects_of::<Product>("p0").await.unwrap();
    assert_eq!(
        (effects[0].status, effects[0].attempts),
        (EffectStatus::Done, 1)
    );
    rt.shutdown().await;
}

/// Waits until `expected` effects are done and every other one is parked with none
/// running (nothing can move until the clock does); returns how many are done then.
async fn settled(rt: &Runtime, n: u64, expected: u64) -> u64 {
    wait(rt, |s| {
        let t = enrich(s);
        s.effects_done >= expected && t.running == 0 && t.parked + s.effects_done == n
    })
    .await;
    rt.stats().effects_done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_together_over_their_windows() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START_MS);
        let provider = Provider::new(&clock, false);
        // 5 per second and 8 per 10 seconds, together.
        let limits = EffectLimits::default()
            .rate(Rate::new(5, Duration::from_secs(1)))
            .rate(Rate::new(8, Duration::from_secs(10)));
        let rt = open(dir.path(), &clock, provider.clone(), limits);
        tell_products(&rt, 20).await;
        // t=0: a burst of 5 (the first bucket). t=1 s: the first has 5 again, the second
        // 3.8: 3 go. t=2 s: the second has 1.6: 1 goes. t=2.2 s: 1.76: none.
        assert_eq!(settled(&rt, 20, 5).await, 5, "round {round}");
        clock.advance(Duration::from_secs(1));
        assert_eq!(settled(&rt, 20, 8).await, 8, "round {round}");
        clock.advance(Duration::from_secs(1));
        assert_eq!(settled(&rt, 20, 9).await, 9, "round {round}");
        clock.advance(Duration::from_millis(200));
        assert_eq!(settled(&rt, 20, 9).await, 9, "round {round}");
        // t=12 s: the second bucket is full again (8), the first has 5: 5 go.
        clock.advance(Duration::from_millis(9_800));
        assert_eq!(settled(&rt, 20, 14).await, 14, "round {round}");
        let at: Vec<usize> = [0, 1_000, 2_000, 2_200, 12_000]
            .iter()
            .map(|t| provider.calls_at(*t))
            .collect();
        assert_eq!(at, [5, 3, 1, 0, 5], "round {round}");
        assert_eq!(provider.calls(), 14);
        rt.shutdown().await;
    }
}

/// Another entity and effect type, with no limits: it must not notice the first's outage.
struct Mailbox;

#[derive(Debug, Serialize, Deserialize)]
struct Mail;

impl Effect for Mail {
    const NAME: &'static str = "mail";
    type Origin = Mailbox;
}

impl Entity for Mailbox {
    const NAME: &'static str = "mailbox";
    type State = u64;
    type Command = ();
    type Reply = u64;
    type Error = Never;

    fn handle(state: &mut u64, _: &(), ctx: &mut Context<'_>) -> Result<u64, Never> {
        *state += 1;
        ctx.effect(Mail);
        Ok(*state)
    }
}

struct Postman;

impl Executor<Mail> for Postman {
    fn execute(&self, _: &Mail, _: &EffectContext) -> Result<Feedback<Mail>, EffectError> {
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_held_back_holds_no_worker_and_other_types_run_on() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let provider = Provider::new(&clock, true);
    // Four effect workers in all; 40 products wait behind the open breaker.
    let rt = runtime_builder(dir.path())
        .clock(clock.clone())
        .effect_retry(two_attempts())
        .effect_lanes_max(4)
        .register::<Product>()
        .register::<Mailbox>()
        .executor::<Enrich>(provider.clone())
        .executor::<Mail>(Postman)
        .effect_limits::<Enrich>(breaker(2))
        .open()
        .unwrap();
    tell_products(&rt, 40).await;
    // The parked hold no worker (were they waiting in their workers, the four would stay
    // busy and no mail would go).
    wait(&rt, |s| {
        enrich(s).breaker == BreakerState::Open && enrich(s).parked == 40 && s.effect_lanes == 0
    })
    .await;
    for i in 0..30 {
        rt.entity::<Mailbox>(format!("m{i}"))
            .tell(())
            .await
            .unwrap();
    }
    wait(&rt, |s| s.effects_done == 30).await;
    let s = rt.stats();
    assert_eq!(enrich(&s).parked, 40, "still waiting, untouched");
    assert_eq!(s.effects_dead_lettered, 0);
    provider.down.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(30));
    wait(&rt, |s| s.effects_done == 70).await;
    assert_all_done(&rt, 40).await;
    rt.shutdown().await;
}

/// A provider that blocks until the test sends a token, counting how many are inside.
#[derive(Clone)]
struct Gated {
    tokens: crossbeam_channel::Receiver<()>,
    inside: Arc<Mutex<(u32, u32)>>,
}

impl Executor<Enrich> for Gated {
    fn execute(&self, _: &Enrich, _: &EffectContext) -> Result<Feedback<Enrich>, EffectError> {
        {
            let mut inside = self.inside.lock().unwrap();
            inside.0 += 1;
            inside.1 = inside.1.max(inside.0);
        }
        let _ = self.tokens.recv();
        self.inside.lock().unwrap().0 -= 1;
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_holds_and_parks_the_rest() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (release, tokens) = crossbeam_channel::unbounded();
        let provider = Gated {
            tokens,
            inside: Arc::default(),
        };
        let rt = runtime_builder(dir.path())
            .register::<Product>()
            .executor::<Enrich>(provider.clone())
            .effect_limits::<Enrich>(EffectLimits::default().concurrency(2))
            .open()
            .unwrap();
        tell_products(&rt, 12).await;
        // Only the two running hold workers.
        wait(&rt, |s| {
            enrich(s).running == 2 && enrich(s).parked == 10 && s.effect_lanes == 2
        })
        .await;
        assert_eq!(provider.inside.lock().unwrap().0, 2, "round {round}");
        for _ in 0..12 {
            release.send(()).unwrap();
        }
        wait(&rt, |s| s.effects_done == 12).await;
        assert_eq!(
            provider.inside.lock().unwrap().1,
            2,
            "round {round}: never more than 2 inside"
        );
        assert_all_done(&rt, 12).await;
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_parked_behind_an_open_breaker_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let provider = Provider::new(&clock, true);
    let rt = open(dir.path(), &clock, provider.clone(), breaker(2));
    tell_products(&rt, 30).await;
    wait(&rt, |s| {
        enrich(s).breaker == BreakerState::Open && enrich(s).parked == 30
    })
    .await;
    rt.close_now();
    // Parked work lives in the outbox: the next open finds it (its breaker starts closed).
    let provider = Provider::new(&clock, false);
    let rt = open(dir.path(), &clock, provider.clone(), breaker(2));
    wait(&rt, |s| s.effects_done == 30).await;
    assert_eq!(provider.calls(), 30, "each once after the restart");
    assert_all_done(&rt, 30).await;
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_breaker_closes_the_backlog_drains_in_lane_order() {
    use keystead::Priority;
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START_MS);
        let provider = Provider::new(&clock, true);
        // One call at a time, so the order of the calls is the order of admission.
        let limits = breaker(2).concurrency(1);
        let rt = open(dir.path(), &clock, provider.clone(), limits);
        for i in 0..12 {
            rt.entity::<Product>(format!("p{i}"))
                .tell(())
                .priority(Priority::Low)
                .await
                .unwrap();
        }
        wait(&rt, |s| {
            enrich(s).breaker == BreakerState::Open && enrich(s).parked == 12
        })
        .await;
        // While it is open: one more product arrives in `High`, and a user looks at p9.
        rt.entity::<Product>("urgent")
            .tell(())
            .priority(Priority::High)
            .await
            .unwrap();
        rt.entity::<Product>("p9")
            .prioritise(Priority::Critical)
            .await
            .unwrap();
        wait(&rt, |s| enrich(s).parked == 13).await;
        let before = provider.calls();
        provider.down.store(false, Ordering::SeqCst);
        clock.advance(Duration::from_secs(30));
        wait(&rt, |s| s.effects_done == 13).await;
        let calls = provider.calls.lock().unwrap().clone();
        let order: Vec<&str> = calls[before..].iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(order.len(), 13, "round {round}: {order:?}");
        assert_eq!(
            &order[..2],
            ["p9", "urgent"],
            "round {round}: Critical, then High, then the Low backlog: {order:?}"
        );
        rt.shutdown().await;
    }
}
