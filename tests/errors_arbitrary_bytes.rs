//! Goal: arbitrary bytes where keystead expects its own records (an entity's state, an inbox
//! entry: envelope and payload) give typed errors or dead letters, never a panic or a hang,
//! and other keys are unaffected.
//! Method: proptest writes random bytes under chosen keys with sled directly (the layout is
//! documented), opens a runtime, then talks to the damaged keys and to a healthy one.

mod common;

use std::time::Duration;

use common::*;
use keystead::{OutcomeKind, SubmitError};
use proptest::prelude::*;

fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        // Start with the right format byte, so decoding goes past the version check.
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|mut v| {
            v.insert(0, keystead::FORMAT_VERSION);
            v
        }),
    ]
}

/// Awaits `f`, failing the test after 30 s: a bounded wait only turns a hang (a panic that
/// killed a shard thread) into a clear failure; success never waits on it.
async fn within<F: std::future::IntoFuture>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f.into_future())
        .await
        .expect("an answer, not a hang")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60, ..ProptestConfig::default() })]

    #[test]
    fn damaged_records_fail_typed_and_alone(states in proptest::collection::vec(garbage(), 1..4),
                                            inbox in proptest::collection::vec(garbage(), 0..4),
                                            on_fjall in proptest::bool::ANY) {
        // Each case picks an engine: both see the same kinds of damage over the run.
        set_backend(if on_fjall { keystead::Backend::Fjall } else { keystead::Backend::Sled });
        let dir = tempfile::tempdir().unwrap();
        drop(builder(dir.path()).open().unwrap());
        with_raw_store(dir.path(), |db| {
            for (i, bytes) in states.iter().enumerate() {
                db.put(&state_key("tally", &format!("bad{i}")), bytes);
            }
            for (i, bytes) in inbox.iter().enumerate() {
                db.put(&inbox_key("tally", "inbox-bad", i as u64 + 1), bytes);
            }
        });
        let tokio = tokio::runtime::Runtime::new().unwrap();
        tokio.block_on(async {
            let rt = builder(dir.path()).open().unwrap();
            for i in 0..states.len() {
                let e = rt.entity::<TallyEntity>(format!("bad{i}"));
                match within(e.ask(add("x"))).await {
                    Ok(out) => assert_eq!(out.kind(), OutcomeKind::Applied, "bytes that decode are a state"),
                    Err(SubmitError::Decode { key, .. }) => assert_eq!(key, format!("bad{i}")),
                    Err(other) => panic!("unexpected error {other}"),
                }
            }
            within(rt.idle()).await;
            // Undecodable inbox entries are dead-lettered, never left or lost.
            assert_eq!(rt.inbox_len().await.unwrap(), 0);
            let letters = rt.dead_letters::<TallyEntity>().await.unwrap();
            assert!(letters.len() <= inbox.len());
            let applied = rt.entity::<TallyEntity>("inbox-bad").snapshot().await.unwrap().revision;
            assert_eq!(letters.len() as u64 + applied, inbox.len() as u64, "each entry ended one way");
            // A healthy key is unaffected.
            let good = within(rt.entity::<TallyEntity>("good").ask(add("ok"))).await.unwrap();
            assert_eq!(good.kind(), OutcomeKind::Applied);
            rt.shutdown().await;
        });
    }
}
