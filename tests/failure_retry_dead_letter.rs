//! Goal: permanent failures are rejected at once and never retried; retryable ones are
//! retried with backoff up to the attempt limit, then dead-lettered with their last error;
//! dead letters can be listed, requeued (same id, applied once even if requeued twice) and
//! purged; a panic is a retryable failure of that message only.
//! Method: drive each path through the public API and assert outcomes, attempts, counters
//! and final state.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use keystead::{Context, Entity, Failure, FailureKind, Outcome, OutcomeKind, Recorded};
use serde::{Deserialize, Serialize};

on_each_backend_in_turn! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_is_rejected_once_retryable_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).retry(fast_retry(5)).open().unwrap();
    let e = rt.entity::<TallyEntity>("k");

    assert_eq!(
        e.ask(TallyCmd::Invalid).id("bad").await.unwrap(),
        Outcome::Rejected {
            error: TallyError::Invalid
        }
    );
    assert_eq!(
        rt.stats().retries,
        0,
        "a permanent failure is never retried"
    );
    assert_eq!(
        e.ask(TallyCmd::Invalid).id("bad").await.unwrap(),
        Outcome::Duplicate {
            first: Recorded::Rejected {
                error: TallyError::Invalid
            }
        }
    );

    let flaky = e
        .ask(TallyCmd::FlakyUntil {
            succeed_on: 3,
            tag: "third time".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        flaky,
        Outcome::Applied {
            reply: 1,
            revision: 1
        }
    );
    assert_eq!(rt.stats().retries, 2, "attempts 1 and 2 failed");
    rt.shutdown().await;
}
}

on_each_backend_in_turn! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_dead_letter_with_the_last_error() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).retry(fast_retry(3)).open().unwrap();
    let e = rt.entity::<TallyEntity>("k");
    let out = e
        .ask(TallyCmd::AlwaysTimesOut)
        .id("doomed")
        .correlation_id("req-9")
        .await
        .unwrap();
    assert_eq!(
        out,
        Outcome::DeadLettered {
            error: "upstream timed out".into(),
            attempts: 3
        }
    );
    let letters = rt.dead_letters::<TallyEntity>().await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.key.as_str(), letter.message_id.as_str()),
        ("k", "doomed")
    );
    assert_eq!(letter.correlation_id, "req-9");
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.error, "upstream timed out");
    assert!(matches!(letter.command, Ok(TallyCmd::AlwaysTimesOut)));
    assert!(letter.first_failed_at_ms <= letter.last_failed_at_ms);
    // The caller's retry with the same id learns the outcome instead of running again.
    let again = e.ask(TallyCmd::AlwaysTimesOut).id("doomed").await.unwrap();
    assert!(matches!(
        again,
        Outcome::Duplicate {
            first: Recorded::DeadLettered { attempts: 3, .. }
        }
    ));
    assert_eq!(rt.stats().retries, 2);

    assert!(e.purge_dead_letter("doomed").await.unwrap());
    assert!(
        !e.purge_dead_letter("doomed").await.unwrap(),
        "already purged"
    );
    assert!(rt.dead_letters::<TallyEntity>().await.unwrap().is_empty());
    rt.shutdown().await;
}
}

static UPSTREAM_UP: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("upstream down")]
struct Down;
impl Failure for Down {
    fn kind(&self) -> FailureKind {
        FailureKind::Retryable
    }
}

/// Succeeds only while the (test-controlled) upstream is up.
struct Sync;
impl Entity for Sync {
    const NAME: &'static str = "sync";
    type State = u64;
    type Command = ();
    type Reply = u64;
    type Error = Down;
    fn handle(n: &mut u64, _: &(), _: &mut Context<'_>) -> Result<u64, Down> {
        if !UPSTREAM_UP.load(Ordering::SeqCst) {
            return Err(Down);
        }
        *n += 1;
        Ok(*n)
    }
}

on_each_backend_in_turn! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_keeps_the_id_and_twice_applies_once() {
    UPSTREAM_UP.store(false, Ordering::SeqCst); // down again for each engine's turn
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime_builder(dir.path())
        .shards(2)
        .retry(fast_retry(2))
        .register::<Sync>()
        .open()
        .unwrap();
    let e = rt.entity::<Sync>("s");
    // One by ask, one by tell: both end in the dead letters.
    assert_eq!(
        e.ask(()).id("job-1").await.unwrap().kind(),
        OutcomeKind::DeadLettered
    );
    e.tell(()).id("job-2").await.unwrap();
    rt.idle().await;
    assert_eq!(rt.dead_letters::<Sync>().await.unwrap().len(), 2);
    assert_eq!(rt.inbox_len().await.unwrap(), 0);

    UPSTREAM_UP.store(true, Ordering::SeqCst);
    for id in ["job-1", "job-2"] {
        let (a, b) = tokio::join!(e.requeue(id), e.requeue(id));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(
            a ^ b,
            "exactly one of two concurrent requeues finds the letter ({a}, {b})"
        );
        assert!(
            !e.requeue(id).await.unwrap(),
            "a third requeue finds nothing"
        );
    }
    rt.idle().await;
    assert_eq!(
        e.snapshot().await.unwrap().state,
        2,
        "each requeued message applied once"
    );
    assert!(rt.dead_letters::<Sync>().await.unwrap().is_empty());
    // The id kept its identity: resending it now is a duplicate of the applied run.
    let again = e.ask(()).id("job-1").await.unwrap();
    assert!(
        matches!(
            again,
            Outcome::Duplicate {
                first: Recorded::Applied { .. }
            }
        ),
        "{again:?}"
    );
    rt.shutdown().await;
}
}

on_each_backend_in_turn! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_entity_does_not_disturb_the_others() {
    quiet_panics();
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).retry(fast_retry(3)).open().unwrap();
    let bad = rt.entity::<TallyEntity>("bad");
    let poison = {
        let bad = bad.clone();
        tokio::spawn(async move {
            bad.ask(TallyCmd::PanicUntil {
                succeed_on: 99,
                tag: "never".into(),
            })
            .await
        })
    };
    let others: Vec<_> = (0..200)
        .map(|i| {
            let e = rt.entity::<TallyEntity>(format!("good-{i}"));
            tokio::spawn(async move { e.ask(add("ok")).await })
        })
        .collect();
    for o in others {
        assert_eq!(o.await.unwrap().unwrap().kind(), OutcomeKind::Applied);
    }
    let poisoned = poison.await.unwrap().unwrap();
    match poisoned {
        Outcome::DeadLettered { error, attempts } => {
            assert_eq!(attempts, 3);
            assert!(error.contains("handler panicked"), "{error}");
        }
        other => panic!("expected a dead letter, got {other:?}"),
    }
    assert_eq!(rt.stats().handler_panics, 3);
    // The entity itself restarted from its last committed state and still works.
    assert_eq!(bad.ask(add("fine")).await.unwrap().reply(), Some(&1));
    assert_eq!(bad.snapshot().await.unwrap().state.count, 1);
    rt.shutdown().await;
}
}
