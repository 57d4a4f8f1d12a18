//! Goal: the change feed (issue 15) holds exactly one record per applied revision of a
//! publishing entity type, in revision order per entity, written with the change (never
//! missed, never invented), across restarts; consumers resume after what they
//! acknowledged; two consumers progress independently; purge never removes what a
//! consumer has not acknowledged; a stalled consumer is counted and warned about.
//! Method: tallies change through every path (ask, tell, tell batch, transaction,
//! duplicates, stale versions, rejections); consumers read the feed and the checks
//! compare it with the entities' own revisions.

mod common;

use std::collections::HashMap;

use common::*;
use keystead::{Change, Members, OutcomeKind, Start, Transaction, TxContext};

struct Pair;
impl Transaction for Pair {
    const NAME: &'static str = "pair";
    type Command = (String, String);
    type Reply = ();
    type Error = Never;
    fn members((a, b): &(String, String)) -> Members {
        Members::new().with::<TallyEntity>(a).with::<TallyEntity>(b)
    }
    fn handle((a, b): &(String, String), tx: &mut TxContext<'_>) -> Result<(), Never> {
        tx.state_mut::<TallyEntity>(a).count += 100;
        tx.state_mut::<TallyEntity>(b).count += 100;
        Ok(())
    }
}

fn publishing(dir: &std::path::Path) -> keystead::RuntimeBuilder {
    builder(dir).feed::<TallyEntity>().transaction::<Pair>()
}

/// Reads every change available now.
async fn drain(consumer: &mut keystead::Consumer) -> Vec<Change> {
    let mut all = Vec::new();
    loop {
        let got = consumer.try_next(100).await.unwrap();
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

/// Each entity's revisions, in feed order; and the feed's positions strictly increase.
fn by_entity(changes: &[Change]) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for w in changes.windows(2) {
        assert!(
            w[0].seq < w[1].seq,
            "feed order: {} then {}",
            w[0].seq,
            w[1].seq
        );
    }
    for c in changes {
        out.entry(c.key.clone()).or_default().push(c.revision);
    }
    out
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_record_per_applied_revision_in_order_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut read = Vec::new();
        for life in 0..3u64 {
            let rt = publishing(dir.path()).open().unwrap();
            let mut consumer = rt.feed().consumer("index", Start::Beginning).await.unwrap();
            // What this consumer read and did not acknowledge in the last life comes again:
            // acknowledge only half of what is read, and keep what comes again once.
            let t = |k: u64| rt.entity::<TallyEntity>(format!("t-{k}"));
            for i in 0..20u64 {
                t(i % 4).ask(add(format!("a{life}-{i}"))).id(format!("a{life}-{i}")).await.unwrap();
                if i % 5 == 0 {
                    // A duplicate and a stale version: no change, no record.
                    let again = t(i % 4).ask(add("dup")).id(format!("a{life}-{i}")).await.unwrap();
                    assert_eq!(again.kind(), OutcomeKind::Duplicate);
                }
            }
            t(0).tell(add("versioned")).version(100 + life).await.unwrap();
            t(0).tell(add("stale")).version(1).await.unwrap();
            t(1).ask(TallyCmd::Invalid).await.unwrap(); // rejected: no change
            let mut batch = rt.tell_batch();
            for k in 0..4 {
                batch.push(t(k).tell(add(format!("b{life}"))).id(format!("b{life}-{k}")));
            }
            batch.send().await.unwrap();
            rt.transaction::<Pair>(("t-3".into(), "t-0".into())).id(format!("p{life}")).await.unwrap();
            rt.idle().await;
            let got = drain(&mut consumer).await;
            let half = got.len() / 2;
            if let Some(c) = got.get(half) {
                consumer.ack(c.seq).await.unwrap();
            }
            read.extend(got);
            rt.shutdown().await;
        }
        // After the last restart, read to the end.
        let rt = publishing(dir.path()).open().unwrap();
        let mut consumer = rt.feed().consumer("index", Start::Beginning).await.unwrap();
        read.extend(drain(&mut consumer).await);
        // At least once: keep each (key, revision) once, by revision.
        let mut latest: HashMap<String, u64> = HashMap::new();
        let mut applied = Vec::new();
        for c in &read {
            let seen = latest.entry(c.key.clone()).or_default();
            if c.revision > *seen {
                *seen = c.revision;
                applied.push(c.clone());
            }
        }
        let revisions = by_entity(&applied);
        for k in 0..4u64 {
            let key = format!("t-{k}");
            let snap = rt.entity::<TallyEntity>(key.clone()).snapshot().await.unwrap();
            let expected: Vec<u64> = (1..=snap.revision).collect();
            assert_eq!(revisions.get(&key), Some(&expected), "{key}: one record per revision, in order");
            // The last record holds the committed state.
            let last = applied.iter().rev().find(|c| c.key == key).unwrap();
            assert_eq!(last.state::<TallyEntity>().unwrap().unwrap(), snap.state);
        }
        // Every record is a change that was committed, and a duplicate read gives the
        // same record.
        let mut by_seq: HashMap<u64, &Change> = HashMap::new();
        for c in &read {
            if let Some(first) = by_seq.insert(c.seq, c) {
                assert_eq!(first, c, "a record read twice is the same record");
            }
        }
        assert_eq!(rt.stats().feed_last, by_seq.keys().max().copied().unwrap());
        rt.shutdown().await;
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consumers_progress_apart_and_purge_keeps_what_one_has_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let rt = publishing(dir.path()).feed_retention(10).open().unwrap();
        let feed = rt.feed();
        let mut fast = feed.consumer("fast", Start::Beginning).await.unwrap();
        let mut slow = feed.consumer("slow", Start::Beginning).await.unwrap();
        let t = rt.entity::<TallyEntity>("t");
        for i in 0..30 {
            t.ask(add(format!("m{i}"))).await.unwrap();
        }
        // The fast consumer reads and acknowledges everything; the slow one nothing.
        let fast_read = drain(&mut fast).await;
        assert_eq!(fast_read.len(), 30);
        fast.ack(fast_read.last().unwrap().seq).await.unwrap();
        // The slow one is 30 behind with a retention of 10: counted, and nothing purged.
        assert!(rt.stats().feed_held_back > 0, "{:?}", rt.stats().feed_held_back);
        let slow_read = drain(&mut slow).await;
        assert_eq!(slow_read.len(), 30, "nothing the slow consumer had not acknowledged was purged");
        assert_eq!(slow_read, fast_read);
        // The slow one acknowledges 20: a consumer from the beginning now finds 10.
        slow.ack(slow_read[19].seq).await.unwrap();
        let mut late = feed.consumer("late", Start::Beginning).await.unwrap();
        let late_read = drain(&mut late).await;
        assert_eq!(late_read.len(), 10);
        assert_eq!(late_read[0].seq, slow_read[20].seq);
        // Start::Now sees only what changes from now on.
        let mut now = feed.consumer("now", Start::Now).await.unwrap();
        assert!(drain(&mut now).await.is_empty());
        t.ask(add("after")).await.unwrap();
        let after = now.next(10).await.unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].revision, 31);
        // Positions are listed and stored.
        let mut consumers = feed.consumers().await.unwrap();
        consumers.sort();
        let names: Vec<&str> = consumers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["fast", "late", "now", "slow"]);
        assert!(feed.remove_consumer("late").await.unwrap());
        assert!(!feed.remove_consumer("late").await.unwrap());
        // A bad name is a typed error.
        assert!(feed.consumer("", Start::Now).await.is_err());
        rt.shutdown().await;
    }
}

on_each_backend! {
    /// A consumer waiting for changes is woken by a commit, and by the runtime closing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_consumer_wakes_on_a_change_and_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let rt = publishing(dir.path()).open().unwrap();
        let mut consumer = rt.feed().consumer("waiter", Start::Now).await.unwrap();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let waiting = tokio::spawn(async move {
            let first = consumer.next(10).await.map(|c| c.len());
            let _ = first_tx.send(first);
            consumer.next(10).await.is_err()
        });
        rt.entity::<TallyEntity>("t").ask(add("x")).await.unwrap();
        assert_eq!(first_rx.await.unwrap().unwrap(), 1, "woken by the change");
        rt.shutdown().await;
        let closed = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
            .await
            .expect("a waiting consumer hung across the close")
            .unwrap();
        assert!(closed, "the second wait ends with Closed");
    }
}

/// A type that does not publish writes no record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_that_does_not_publish_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).open().unwrap();
    let mut consumer = rt.feed().consumer("c", Start::Beginning).await.unwrap();
    rt.entity::<TallyEntity>("t").ask(add("x")).await.unwrap();
    rt.idle().await;
    assert!(drain(&mut consumer).await.is_empty());
    assert_eq!(rt.stats().feed_last, 0);
    rt.shutdown().await;
}

on_each_backend! {
    /// Concurrent writers: a committed batch holds many changes (one feed segment), and a
    /// consumer reading a few at a time, acknowledging mid-segment, resumes exactly after
    /// what it acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_reads_across_segments_resume_after_the_acknowledged_change() {
        let dir = tempfile::tempdir().unwrap();
        let rt = std::sync::Arc::new(publishing(dir.path()).open().unwrap());
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let rt = rt.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        rt.entity::<TallyEntity>(format!("w{w}")).ask(add(format!("{i}"))).await.unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        rt.idle().await;
        assert_eq!(rt.stats().feed_last, 400);
        let feed = rt.feed();
        let mut consumer = feed.consumer("pager", Start::Beginning).await.unwrap();
        let mut read = Vec::new();
        for _ in 0..10 {
            read.extend(consumer.next(7).await.unwrap());
        }
        // Acknowledge in the middle of what was read, then start over as a restart would.
        consumer.ack(read[33].seq).await.unwrap();
        let mut again = feed.consumer("pager", Start::Beginning).await.unwrap();
        assert_eq!(again.acked(), read[33].seq);
        let rest = drain(&mut again).await;
        assert_eq!(rest.first().map(|c| c.seq), Some(read[33].seq + 1));
        let mut all: Vec<Change> = read[..34].to_vec();
        all.extend(rest);
        assert_eq!(all.len(), 400);
        let revisions = by_entity(&all);
        for w in 0..8 {
            assert_eq!(revisions[&format!("w{w}")], (1..=50).collect::<Vec<u64>>(), "w{w}");
        }
    }
}
