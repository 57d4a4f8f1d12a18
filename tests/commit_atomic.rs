//! Goal: state, revision, version, dedup record and inbox removal commit together; a handler
//! that fails or panics leaves no trace in state.
//! Method: drive each failure kind and read back the committed snapshot and the stored
//! bytes; after tells are processed, the inbox is empty and every id is remembered.

mod common;

use common::*;
use keystead::{Outcome, OutcomeKind, Recorded, FORMAT_VERSION};

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_panics_leave_no_trace() {
    quiet_panics();
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).open().unwrap();
    let e = rt.entity::<TallyEntity>("acct");
    e.ask(add("seed")).await.unwrap();

    let rejected = e.ask(TallyCmd::Invalid).await.unwrap();
    assert_eq!(
        rejected,
        Outcome::Rejected {
            error: TallyError::Invalid
        }
    );
    let snap = e.snapshot().await.unwrap();
    assert_eq!(
        (snap.revision, snap.state.count),
        (1, 1),
        "a rejection changes nothing"
    );

    // Panics on attempts 1 and 2 after adding 1000 to its draft; succeeds on attempt 3.
    let out = e
        .ask(TallyCmd::PanicUntil {
            succeed_on: 3,
            tag: "after-panics".into(),
        })
        .await
        .unwrap();
    assert_eq!(out.kind(), OutcomeKind::Applied);
    let snap = e.snapshot().await.unwrap();
    assert_eq!(
        snap.state.count, 2,
        "the panicked drafts never reached the state"
    );
    assert_eq!(snap.revision, 2);
    assert_eq!(rt.stats().handler_panics, 2);
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processed_tell_is_retired_with_its_dedup_record_and_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = builder(dir.path()).open().unwrap();
        for i in 0..200 {
            let e = rt.entity::<TallyEntity>(format!("k{}", i % 10));
            e.tell(add(format!("m{i}")))
                .id(format!("m{i}"))
                .await
                .unwrap();
        }
        rt.idle().await;
        assert_eq!(rt.inbox_len().await.unwrap(), 0);
        for i in 0..200 {
            let e = rt.entity::<TallyEntity>(format!("k{}", i % 10));
            let again = e
                .ask(add(format!("m{i}")))
                .id(format!("m{i}"))
                .await
                .unwrap();
            assert!(
                matches!(
                    again,
                    Outcome::Duplicate {
                        first: Recorded::Applied { .. }
                    }
                ),
                "m{i}: {again:?}"
            );
        }
        rt.shutdown().await;
    }
    // Stored bytes: every state record starts with the format version byte.
    with_raw_store(dir.path(), |db| {
        for k in 0..10 {
            let bytes = db
                .get(&state_key("tally", &format!("k{k}")))
                .expect("state stored");
            assert_eq!(bytes[0], FORMAT_VERSION);
        }
        let inbox = db.count_prefix(b"I");
        assert_eq!(inbox, 0, "inbox entries left on disk");
    });
}
}
