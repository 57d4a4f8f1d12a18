//! Goal: both durability modes keep their word. `Sync` (the default) is covered by every
//! other test; here `Relaxed` acknowledges before the flush yet loses nothing on a clean
//! shutdown, keeps per-entity order and dedup, and rejects a loss window it cannot honour.
//!
//! Method: concurrent asks and tells in relaxed mode with a long flush interval (so no
//! periodic flush happens during the test), a graceful shutdown, a reopen, and counts.

mod common;

use std::time::Duration;

use common::*;
use keystead::{Durability, OpenError};

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_mode_loses_nothing_on_a_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let relaxed = Durability::Relaxed {
        flush_every: Duration::from_secs(60),
    };
    let rt = builder(dir.path()).durability(relaxed).open().unwrap();
    const KEYS: usize = 20;
    const PER_KEY: usize = 50;
    let tasks: Vec<_> = (0..KEYS)
        .map(|k| {
            let e = rt.entity::<TallyEntity>(format!("k{k}"));
            tokio::spawn(async move {
                for i in 0..PER_KEY {
                    let id = format!("m{i}");
                    if i % 2 == 0 {
                        e.ask(add(&id)).id(id.clone()).await.unwrap();
                        // A resend is answered from the dedup store, as in sync mode.
                        let again = e.ask(add(&id)).id(id).await.unwrap();
                        assert!(again.is_duplicate());
                    } else {
                        e.tell(add(&id)).id(id).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    rt.idle().await;
    rt.shutdown().await;

    let rt = builder(dir.path()).open().unwrap();
    for k in 0..KEYS {
        let snap = rt
            .entity::<TallyEntity>(format!("k{k}"))
            .snapshot().await
            .unwrap();
        let expected: Vec<String> = (0..PER_KEY).map(|i| format!("m{i}")).collect();
        assert_eq!(
            snap.state.applied, expected,
            "k{k}: all kept, once, in order"
        );
    }
    assert_eq!(rt.inbox_len().await.unwrap(), 0);
    rt.shutdown().await;
}
}

on_each_backend! {
#[test]
fn a_loss_window_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for flush_every in [Duration::ZERO, Duration::from_secs(3600)] {
        let refused = builder(dir.path())
            .durability(Durability::Relaxed { flush_every })
            .open();
        match refused {
            Err(OpenError::InvalidConfig { setting, reason }) => {
                assert_eq!(setting, "durability");
                assert!(reason.contains("between 1 ms and 60 s"), "{reason}");
            }
            other => panic!("{flush_every:?} accepted: {other:?}"),
        }
    }
}
}
