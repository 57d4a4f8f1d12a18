//! Goal: an idle entity actor stops and frees its memory; its next message reactivates it
//! from the store; passivation never loses a message that races with it.
//! Method: touch many keys with a short idle timeout, wait (on the runtime's own change
//! notifications, not a sleep) until every actor has passivated, then touch them again and
//! check activations and state; hammer one key while its actor keeps passivating.

mod common;

use std::time::Duration;

use common::*;

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_actors_stop_and_come_back_with_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path())
        .passivate_after(Duration::from_millis(20))
        .open()
        .unwrap();
    const KEYS: u64 = 2000;
    for k in 0..KEYS {
        rt.entity::<TallyEntity>(format!("k{k}"))
            .ask(add("first"))
            .await
            .unwrap();
    }
    assert!(rt.stats().activations >= KEYS);
    rt.wait_until(|s| s.live_entities == 0).await;
    let stats = rt.stats();
    assert_eq!(
        stats.passivations, stats.activations,
        "every actor that started has stopped"
    );

    for k in 0..KEYS {
        let out = rt
            .entity::<TallyEntity>(format!("k{k}"))
            .ask(add("second"))
            .await
            .unwrap();
        assert_eq!(
            out.reply(),
            Some(&2),
            "k{k} reactivated from its stored state"
        );
    }
    assert!(rt.stats().activations >= 2 * KEYS);
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passivation_racing_with_new_messages_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // 1 ms idle and 100 keys visited in turn: each key's gaps straddle its idle timeout, so
    // idle reports and new jobs cross each other at the shard over and over.
    let rt = builder(dir.path())
        .passivate_after(Duration::from_millis(1))
        .open()
        .unwrap();
    const KEYS: usize = 100;
    const SENDERS: usize = 4;
    const ROUNDS: usize = 30;
    let senders: Vec<_> = (0..SENDERS)
        .map(|t| {
            let refs: Vec<_> = (0..KEYS)
                .map(|k| rt.entity::<TallyEntity>(format!("hot-{k}")))
                .collect();
            tokio::spawn(async move {
                for round in 0..ROUNDS {
                    for e in &refs {
                        let tag = format!("{t}-{round}");
                        if round % 2 == 0 {
                            e.ask(add(tag)).await.unwrap();
                        } else {
                            e.tell(add(tag)).await.unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    rt.idle().await;
    for k in 0..KEYS {
        let snap = rt
            .entity::<TallyEntity>(format!("hot-{k}"))
            .snapshot().await
            .unwrap();
        assert_eq!(snap.state.count, (SENDERS * ROUNDS) as u64, "hot-{k}");
    }
    assert_eq!(rt.inbox_len().await.unwrap(), 0);
    let stats = rt.stats();
    assert!(
        stats.passivations > KEYS as u64,
        "the test must actually passivate: {stats:?}"
    );
    rt.shutdown().await;
}
}

on_each_backend! {
/// `EntityRef::passivate` (what the chaos testkit uses to restart actors) racing with
/// messages: every message is applied once, every `true` answer is a real stop, and every
/// activation ends in a stop unless the actor is still live.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passivate_on_demand_racing_with_messages_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path())
        .passivate_after(Duration::from_secs(3600))
        .open()
        .unwrap();
    let e = rt.entity::<TallyEntity>("on-demand");
    const ROUNDS: u64 = 300;
    let mut stopped = 0;
    for round in 0..ROUNDS {
        let (passivated, applied) = tokio::join!(e.passivate(), e.ask(add(format!("r{round}"))));
        stopped += u64::from(passivated.unwrap());
        assert!(applied.unwrap().reply().is_some(), "round {round}");
        // A passivation with nothing else queued always stops the actor.
        assert!(
            e.passivate().await.unwrap(),
            "round {round}: a quiet actor must stop"
        );
        stopped += 1;
    }
    let snap = e.snapshot().await.unwrap();
    assert_eq!(
        snap.state.count, ROUNDS,
        "each message applied exactly once"
    );
    let stats = rt.stats();
    assert_eq!(
        stats.live_entities, 0,
        "`passivate` answers once the actor has stopped"
    );
    assert_eq!(stats.passivations, stopped, "{stats:?}");
    assert_eq!(
        stats.activations,
        stats.passivations + stats.live_entities,
        "{stats:?}"
    );
    rt.shutdown().await;
}
}
