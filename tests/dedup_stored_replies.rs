//! Goal: a message id that was already processed is never applied again; its sender gets
//! `Duplicate` carrying the first run's stored result; ids are scoped per entity and key;
//! records expire only after the retention window.
//! Method: concurrent asks with one id, repeated over many rounds; a manual clock drives the
//! retention window and the purge.

mod common;

use std::time::Duration;

use common::*;
use keystead::{ManualClock, Outcome, OutcomeKind, Recorded};

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_asks_with_one_id_apply_once() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).open().unwrap();
    for round in 0..20 {
        let order = rt.entity::<TallyEntity>(format!("order-{round}"));
        let id = format!("pay-{round}");
        let asks: Vec<_> = (0..50)
            .map(|_| {
                let order = order.clone();
                let id = id.clone();
                tokio::spawn(async move { order.ask(add("pay")).id(id).await })
            })
            .collect();
        let mut applied = 0;
        let mut duplicates = 0;
        let mut replies = Vec::new();
        for ask in asks {
            let outcome = ask.await.unwrap().unwrap();
            match outcome.kind() {
                OutcomeKind::Applied => applied += 1,
                OutcomeKind::Duplicate => duplicates += 1,
                other => panic!("unexpected outcome {other:?}"),
            }
            replies.push(*outcome.reply().expect("both kinds carry the reply"));
        }
        assert_eq!((applied, duplicates), (1, 49), "round {round}");
        assert!(
            replies.iter().all(|r| *r == 1),
            "50 identical replies: {replies:?}"
        );
        let snap = order.snapshot().await.unwrap();
        assert_eq!(snap.state.count, 1, "charged once");
        assert_eq!(snap.revision, 1);
    }
    assert_eq!(rt.stats().applied, 20);
    assert_eq!(rt.stats().duplicate, 20 * 49);
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_scoped_per_entity_key_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = builder(dir.path()).open().unwrap();
        let a = rt.entity::<TallyEntity>("a");
        let b = rt.entity::<TallyEntity>("b");
        assert_eq!(
            a.ask(add("x")).id("same").await.unwrap().kind(),
            OutcomeKind::Applied
        );
        assert_eq!(
            b.ask(add("x")).id("same").await.unwrap().kind(),
            OutcomeKind::Applied
        );
        rt.shutdown().await;
    }
    // The retry after a timeout that had succeeded: the first run's reply comes back.
    let rt = builder(dir.path()).open().unwrap();
    let a = rt.entity::<TallyEntity>("a");
    let again = a.ask(add("x")).id("same").await.unwrap();
    assert_eq!(
        again,
        Outcome::Duplicate {
            first: Recorded::Applied {
                reply: 1,
                revision: 1
            }
        }
    );
    assert_eq!(a.snapshot().await.unwrap().state.count, 1);
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_expire_only_after_the_retention_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let rt = builder(dir.path())
        .clock(clock.clone())
        .dedup_retention(Duration::from_secs(3600))
        .open()
        .unwrap();
    let e = rt.entity::<TallyEntity>("k");
    e.ask(add("first")).id("m1").await.unwrap();

    // Exactly at the edge of the window: still kept.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(rt.purge_expired_dedup().unwrap(), 0);
    assert!(e.ask(add("first")).id("m1").await.unwrap().is_duplicate());

    // A record written later is inside its own window when the first one expires.
    e.ask(add("second")).id("m2").await.unwrap();
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        rt.purge_expired_dedup().unwrap(),
        1,
        "only m1 is past the window"
    );
    assert!(e.ask(add("second")).id("m2").await.unwrap().is_duplicate());

    // An id that aged out is processed as new (documented behaviour).
    let reborn = e.ask(add("first")).id("m1").await.unwrap();
    assert_eq!(reborn.kind(), OutcomeKind::Applied);
    assert_eq!(e.snapshot().await.unwrap().state.count, 3);
    rt.shutdown().await;
}
}
