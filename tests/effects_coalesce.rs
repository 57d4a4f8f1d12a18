//! Goal: coalescing effects (issue 12). A newer effect of a coalescing type replaces the
//! entity's older ones that have not started, in the same batch: the outbox grows with the
//! number of entities, not of writes; each replaced effect is recorded as superseded (never
//! silently lost); the one running is never replaced; the newest always runs; no effect
//! both runs and is superseded, whatever the interleaving with the workers.
//! Method: an item entity records a coalescing `Refresh { data }` on every update; the
//! provider records every call's effect key and data; tests hold the provider (blocked on a
//! channel, or down behind an open breaker) or race it with concurrent writers, then check
//! the stored effect records against the calls.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use keystead::{
    BreakerPolicy, BreakerState, Context, Effect, EffectContext, EffectError, EffectLimits,
    EffectStatus, Entity, Executor, Feedback, ManualClock, Priority, RetryPolicy, Runtime,
    RuntimeStats,
};
use serde::{Deserialize, Serialize};

struct Item;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Refresh {
    data: u64,
}

impl Effect for Refresh {
    const NAME: &'static str = "refresh";
    const COALESCE: bool = true;
    type Origin = Item;
}

impl Entity for Item {
    const NAME: &'static str = "item";
    type State = u64;
    type Command = u64;
    type Reply = u64;
    type Error = Never;

    fn handle(state: &mut u64, data: &u64, ctx: &mut Context<'_>) -> Result<u64, Never> {
        *state = *data;
        ctx.effect(Refresh { data: *data });
        Ok(*state)
    }
}

/// Every successful call: (entity key, effect key text, data).
type Calls = Arc<Mutex<Vec<(String, String, u64)>>>;

/// A provider that waits for a token per call when `hold` is given, fails while `down`.
#[derive(Clone, Default)]
struct Provider {
    hold: Option<crossbeam_channel::Receiver<()>>,
    down: Arc<AtomicBool>,
    calls: Calls,
    /// Told the data of every call as it enters.
    entered: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
}

impl Executor<Refresh> for Provider {
    fn execute(&self, r: &Refresh, ctx: &EffectContext) -> Result<Feedback<Refresh>, EffectError> {
        if let Some(entered) = &self.entered {
            let _ = entered.send(r.data);
        }
        if let Some(hold) = &self.hold {
            let _ = hold.recv();
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(EffectError::retryable("down"));
        }
        let key = ctx.effect_key();
        self.calls
            .lock()
            .unwrap()
            .push((key.key.clone(), key.to_string(), r.data));
        Ok(None)
    }
}

async fn wait(rt: &Runtime, condition: impl Fn(&RuntimeStats) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(60), rt.wait_until(condition)).await;
    if waited.is_err() {
        let s = rt.stats();
        panic!(
            "the runtime never got there: done {}, superseded {}, lanes {}, types {:?}",
            s.effects_done, s.effects_superseded, s.effect_lanes, s.effect_types
        );
    }
}

fn outbox_pending(s: &RuntimeStats) -> u64 {
    Priority::ALL
        .iter()
        .map(|p| s.effect_priority(*p).pending)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_replaces_the_waiting_and_the_running_one_is_kept() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (release, hold) = crossbeam_channel::unbounded();
        let (entered, mut entering) = tokio::sync::mpsc::unbounded_channel();
        let provider = Provider {
            hold: Some(hold),
            entered: Some(entered),
            ..Provider::default()
        };
        let rt = runtime_builder(dir.path())
            .register::<Item>()
            .executor::<Refresh>(provider.clone())
            .open()
            .unwrap();
        let item = rt.entity::<Item>("i");
        item.ask(1).await.unwrap();
        // The first refresh has started (it waits in the provider): it is never replaced.
        assert_eq!(entering.recv().await, Some(1));
        for data in 2..=11 {
            item.ask(data).await.unwrap();
        }
        let s = rt.stats();
        assert_eq!(s.effects_superseded, 9, "round {round}: 2..=10 replaced");
        assert_eq!(
            outbox_pending(&s),
            2,
            "round {round}: the running one and the newest"
        );
        for _ in 0..2 {
            release.send(()).unwrap();
        }
        wait(&rt, |s| s.effects_done == 2).await;
        let data: Vec<u64> = provider.calls.lock().unwrap().iter().map(|c| c.2).collect();
        assert_eq!(data, [1, 11], "round {round}: the first and the newest ran");
        let effects = rt.effects_of::<Item>("i").await.unwrap();
        assert_eq!(effects.len(), 11, "round {round}: none lost: {effects:?}");
        let superseded: Vec<_> = effects
            .iter()
            .filter(|e| e.status == EffectStatus::Superseded)
            .collect();
        assert_eq!(superseded.len(), 9);
        for e in &superseded {
            let by = e.last_error.clone().unwrap_or_default();
            assert!(by.starts_with("superseded by item/i/"), "{by}");
            assert_eq!(e.attempts, 0, "never run");
        }
        let done = effects
            .iter()
            .filter(|e| e.status == EffectStatus::Done)
            .count();
        assert_eq!(done, 2);
        assert_eq!(outbox_pending(&rt.stats()), 0);
        rt.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_an_outage_the_outbox_holds_one_effect_per_entity() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let provider = Provider::default();
    provider.down.store(true, Ordering::SeqCst);
    let rt = runtime_builder(dir.path())
        .clock(clock.clone())
        .effect_retry(
            RetryPolicy::default()
                .attempts_max(3)
                .backoff_initial(Duration::from_millis(1)),
        )
        .register::<Item>()
        .executor::<Refresh>(provider.clone())
        .effect_limits::<Refresh>(
            EffectLimits::default()
                .breaker(BreakerPolicy::consecutive(2).cool_down(Duration::from_secs(30))),
        )
        .open()
        .unwrap();
    const ITEMS: u64 = 50;
    const WRITES: u64 = 20;
    for data in 1..=WRITES {
        for i in 0..ITEMS {
            rt.entity::<Item>(format!("i{i}")).tell(data).await.unwrap();
        }
    }
    wait(&rt, |s| {
        s.in_flight == 0
            && s.inbox_pending == 0
            && s.effect_type("refresh").is_some_and(|t| t.parked == ITEMS)
    })
    .await;
    let s = rt.stats();
    assert_eq!(outbox_pending(&s), ITEMS, "one per item, not one per write");
    assert_eq!(s.effects_superseded, ITEMS * (WRITES - 1));
    assert_eq!(s.effects_dead_lettered, 0);
    // The provider is back: each item is refreshed once, with its newest data.
    provider.down.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(30));
    wait(&rt, |s| s.effects_done == ITEMS).await;
    rt.idle().await;
    let calls = provider.calls.lock().unwrap().clone();
    assert_eq!(calls.len() as u64, ITEMS, "once each");
    assert!(calls.iter().all(|c| c.2 == WRITES), "the newest data");
    assert_eq!(
        rt.stats().effect_type("refresh").unwrap().breaker,
        BreakerState::Closed
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_effect_both_runs_and_is_superseded_under_concurrent_writes() {
    for round in 0..6 {
        let dir = tempfile::tempdir().unwrap();
        let provider = Provider::default();
        let rt = runtime_builder(dir.path())
            .register::<Item>()
            .executor::<Refresh>(provider.clone())
            .open()
            .unwrap();
        const ITEMS: u64 = 8;
        const WRITES: u64 = 60;
        let writers: Vec<_> = (0..ITEMS)
            .map(|i| {
                let item = rt.entity::<Item>(format!("i{i}"));
                tokio::spawn(async move {
                    for data in 1..=WRITES {
                        item.ask(data).await.unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        rt.idle().await;
        let calls = provider.calls.lock().unwrap().clone();
        let called: HashSet<&str> = calls.iter().map(|c| c.1.as_str()).collect();
        assert_eq!(
            called.len(),
            calls.len(),
            "round {round}: each effect ran at most once"
        );
        let mut last: HashMap<&str, u64> = HashMap::new();
        for c in &calls {
            last.insert(c.0.as_str(), c.2);
        }
        let s = rt.stats();
        assert_eq!(
            s.effects_done + s.effects_superseded,
            ITEMS * WRITES,
            "round {round}"
        );
        for i in 0..ITEMS {
            let key = format!("i{i}");
            assert_eq!(
                last.get(key.as_str()),
                Some(&WRITES),
                "round {round}: {key} ran its newest last"
            );
            let effects = rt.effects_of::<Item>(&key).await.unwrap();
            assert_eq!(effects.len() as u64, WRITES, "round {round}: none lost");
            for e in &effects {
                let ran = called.contains(e.effect_key.to_string().as_str());
                match e.status {
                    EffectStatus::Done => assert!(ran, "round {round}: done but not run: {e:?}"),
                    EffectStatus::Superseded => {
                        assert!(!ran, "round {round}: run and superseded: {e:?}")
                    }
                    other => panic!("round {round}: {other:?}: {e:?}"),
                }
            }
        }
        assert_eq!(outbox_pending(&s), 0);
        rt.shutdown().await;
    }
}
