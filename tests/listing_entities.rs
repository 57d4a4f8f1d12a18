//! Goal: an application can list an entity type's keys (paged, by prefix) and read many
//! entities at once, straight from the store (issue 15, part 1).
//! Method: entities created through every write path (ask, tell batch, transaction) are
//! listed page by page and compared with what was created; writers create and update
//! entities while the pages are read, and every key that existed throughout must appear
//! exactly once; bulk reads are compared with single snapshots.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;
use keystead::{Members, Transaction, TxContext};

struct Touch;
impl Transaction for Touch {
    const NAME: &'static str = "touch";
    type Command = (String, String);
    type Reply = ();
    type Error = Never;
    fn members((a, b): &(String, String)) -> Members {
        Members::new().with::<TallyEntity>(a).with::<TallyEntity>(b)
    }
    fn handle((a, b): &(String, String), tx: &mut TxContext<'_>) -> Result<(), Never> {
        tx.state_mut::<TallyEntity>(a).count += 1;
        tx.state_mut::<TallyEntity>(b).count += 1;
        Ok(())
    }
}

async fn all_keys(rt: &keystead::Runtime, prefix: &str, limit: usize) -> Vec<String> {
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut listing = rt.entities::<TallyEntity>().prefix(prefix).limit(limit);
        if let Some(a) = after.take() {
            listing = listing.after(a);
        }
        let page = listing.await.unwrap();
        assert!(page.entries.len() <= limit);
        keys.extend(page.entries.iter().map(|e| e.key.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => return keys,
        }
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entities_are_listed_in_key_order_by_page_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let rt = builder(dir.path()).transaction::<Touch>().open().unwrap();
        // 200 "a-" by a tell batch, 50 "b-" by asks, 2 "c-" by a transaction.
        let mut batch = rt.tell_batch();
        for i in (0..200).rev() {
            batch.push(rt.entity::<TallyEntity>(format!("a-{i:03}")).tell(add("x")));
        }
        batch.send().await.unwrap();
        for i in 0..50 {
            rt.entity::<TallyEntity>(format!("b-{i:03}")).ask(add("x")).await.unwrap();
        }
        rt.transaction::<Touch>(("c-1".into(), "c-0".into())).await.unwrap();
        rt.idle().await;
        // A key that never applied anything is not listed.
        rt.entity::<TallyEntity>("a-zzz").snapshot().await.unwrap();
        let mut expected: Vec<String> = (0..200).map(|i| format!("a-{i:03}")).collect();
        expected.extend((0..50).map(|i| format!("b-{i:03}")));
        expected.extend(["c-0".to_string(), "c-1".to_string()]);
        for limit in [1, 7, 100, 10_000] {
            assert_eq!(all_keys(&rt, "", limit).await, expected, "limit {limit}");
        }
        assert_eq!(all_keys(&rt, "b-", 13).await, expected[200..250]);
        assert!(all_keys(&rt, "z", 10).await.is_empty());
        let page = rt.entities::<TallyEntity>().prefix("a-1").limit(5).await.unwrap();
        let keys: Vec<&str> = page.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["a-100", "a-101", "a-102", "a-103", "a-104"]);
        assert_eq!(page.next.as_deref(), Some("a-104"));
        // Headers: revision, version, update time.
        rt.entity::<TallyEntity>("b-007").tell(add("y")).version(42).await.unwrap();
        rt.idle().await;
        let page = rt.entities::<TallyEntity>().prefix("b-007").await.unwrap();
        assert_eq!(page.entries.len(), 1);
        assert_eq!((page.entries[0].revision, page.entries[0].version), (2, Some(42)));
        assert!(page.entries[0].updated_at_ms > 0);
        assert_eq!(page.next, None);
        // Bulk reads, in the order asked, a missing one at its default.
        let snaps = rt.snapshots::<TallyEntity, _>(["c-1", "nobody", "b-007"]).await.unwrap();
        assert_eq!(snaps.iter().map(|s| s.revision).collect::<Vec<_>>(), [1, 0, 2]);
        assert_eq!(snaps[2].state, rt.entity::<TallyEntity>("b-007").snapshot().await.unwrap().state);
        let bad = rt.snapshots::<TallyEntity, _>(["ok", ""]).await.unwrap_err();
        assert!(matches!(bad, keystead::SubmitError::InvalidKey { .. }), "{bad}");
        rt.shutdown().await;
    }
}

on_each_backend! {
    /// Pages read while writers create new entities and update listed ones: every key that
    /// existed before the listing began appears exactly once, and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paging_under_concurrent_writes_misses_and_repeats_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(builder(dir.path()).open().unwrap());
        let mut batch = rt.tell_batch();
        for i in 0..600 {
            batch.push(rt.entity::<TallyEntity>(format!("k-{:04}", i * 2)).tell(add("x")));
        }
        batch.send().await.unwrap();
        rt.idle().await;
        let existing: BTreeSet<String> = (0..600).map(|i| format!("k-{:04}", i * 2)).collect();
        for round in 0..4 {
            let writer = {
                let rt = rt.clone();
                tokio::spawn(async move {
                    for i in 0..300 {
                        // New keys between existing ones, and updates of existing ones.
                        let new = format!("k-{:04}", (i * 2 + 1 + round * 7) % 1200);
                        rt.entity::<TallyEntity>(new).tell(add("new")).await.unwrap();
                        let old = format!("k-{:04}", (i * 4) % 1200);
                        rt.entity::<TallyEntity>(old).ask(add("update")).await.unwrap();
                    }
                })
            };
            let listed = all_keys(&rt, "k-", 17).await;
            writer.await.unwrap();
            let mut sorted = listed.clone();
            sorted.sort();
            assert_eq!(listed, sorted, "round {round}: pages in key order");
            let mut unique = listed.clone();
            unique.dedup();
            assert_eq!(unique.len(), listed.len(), "round {round}: a key repeated");
            let seen: BTreeSet<String> = listed.into_iter().collect();
            let missed: Vec<&String> = existing.difference(&seen).collect();
            assert!(missed.is_empty(), "round {round}: missed {missed:?}");
        }
    }
}
