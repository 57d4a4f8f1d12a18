//! Goal: a message whose source version is not greater than the entity's is dropped with
//! `Stale { current }`, leaves the state untouched, and is recorded so it is never retried.
//! Method: the seeds' "late renew after cancel", by ask and by tell, then a redelivery.

mod common;

use common::*;
use keystead::{Outcome, Recorded};

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_renew_after_cancel_is_dropped_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).open().unwrap();
    let sub = rt.entity::<TallyEntity>("sub-1");
    sub.ask(add("renew")).id("ev-1").version(1).await.unwrap();
    sub.ask(add("cancel")).id("ev-3").version(3).await.unwrap();

    let late = sub.ask(add("renew")).id("ev-2").version(2).await.unwrap();
    assert_eq!(late, Outcome::Stale { current: 3 });
    let equal = sub.ask(add("again")).id("ev-3b").version(3).await.unwrap();
    assert_eq!(equal, Outcome::Stale { current: 3 }, "equal is not newer");

    let snap = sub.snapshot().await.unwrap();
    assert_eq!(snap.state.applied, vec!["renew", "cancel"]);
    assert_eq!((snap.revision, snap.version), (2, Some(3)));

    // Redelivered: the stored stale outcome comes back; nothing runs.
    let redelivered = sub.ask(add("renew")).id("ev-2").version(2).await.unwrap();
    assert_eq!(
        redelivered,
        Outcome::Duplicate {
            first: Recorded::Stale { current: 3 }
        }
    );

    // A stale tell is retired from the inbox like any other outcome.
    sub.tell(add("renew"))
        .id("ev-2-tell")
        .version(1)
        .await
        .unwrap();
    rt.idle().await;
    assert_eq!(rt.inbox_len().await.unwrap(), 0);
    assert_eq!(rt.stats().stale, 3);
    assert_eq!(sub.snapshot().await.unwrap().revision, 2);

    // Messages without a version are never stale, and keep the version.
    sub.ask(add("note")).await.unwrap();
    let snap = sub.snapshot().await.unwrap();
    assert_eq!((snap.revision, snap.version), (3, Some(3)));
    rt.shutdown().await;
}
}
