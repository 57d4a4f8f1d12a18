//! Goal: optimistic concurrency. A message sent with an expected revision that no longer
//! matches fails with `Conflict { expected, actual }` and changes nothing.
//! Method: the seeds' "two tabs save the same profile", then 20 concurrent tabs.

mod common;

use common::*;
use keystead::{OutcomeKind, SubmitError};

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tabs_one_wins_the_other_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).open().unwrap();
    let profile = rt.entity::<TallyEntity>("profile-7");
    profile.ask(add("created")).await.unwrap();
    let seen = profile.snapshot().await.unwrap().revision;

    let tab1 = profile
        .ask(add("tab1: email"))
        .expect_revision(seen)
        .await
        .unwrap();
    assert_eq!(tab1.kind(), OutcomeKind::Applied);
    let tab2 = profile.ask(add("tab2: phone")).expect_revision(seen).await;
    match tab2 {
        Err(SubmitError::Conflict {
            entity,
            key,
            expected,
            actual,
        }) => {
            assert_eq!(
                (entity, key.as_str(), expected, actual),
                ("tally", "profile-7", 1, 2)
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        profile.snapshot().await.unwrap().state.applied,
        vec!["created", "tab1: email"]
    );

    // Tab 2 reloads and saves again: nothing is silently lost.
    let reloaded = profile.snapshot().await.unwrap().revision;
    profile
        .ask(add("tab2: phone"))
        .expect_revision(reloaded)
        .await
        .unwrap();
    assert_eq!(
        profile.snapshot().await.unwrap().state.applied,
        vec!["created", "tab1: email", "tab2: phone"]
    );
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_saves_from_one_revision_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).open().unwrap();
    for round in 0..20 {
        let doc = rt.entity::<TallyEntity>(format!("doc-{round}"));
        let tabs: Vec<_> = (0..20)
            .map(|t| {
                let doc = doc.clone();
                tokio::spawn(
                    async move { doc.ask(add(format!("tab{t}"))).expect_revision(0).await },
                )
            })
            .collect();
        let mut wins = 0;
        let mut conflicts = 0;
        for tab in tabs {
            match tab.await.unwrap() {
                Ok(out) if out.kind() == OutcomeKind::Applied => wins += 1,
                Err(SubmitError::Conflict {
                    expected: 0,
                    actual: 1,
                    ..
                }) => conflicts += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((wins, conflicts), (1, 19), "round {round}");
        assert_eq!(doc.snapshot().await.unwrap().revision, 1);
    }
    assert_eq!(rt.stats().conflicts, 20 * 19);
    rt.shutdown().await;
}
}
