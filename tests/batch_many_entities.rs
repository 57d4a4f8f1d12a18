//! Goal: many messages in one call (issue 14). A batch of tells is one atomic durable write
//! (all or none, one flush) answered in the caller's order; a batch of asks is dispatched
//! in one global order (type, key, id) and answered in the caller's order; the same id
//! twice is applied once and both positions get the same answer; a refusal gives the
//! batch back.
//! Method: the tally entity records the tags it applied in order; the runtime's counters
//! give the commits and flushes; lane room is held by delayed messages (which hold it from
//! acceptance) to fill a lane on purpose.

mod common;

use std::time::Duration;

use common::*;
use keystead::{BatchError, LaneLimits, ManualClock, OutcomeKind, Priority, WhenFull};

/// A second entity type, so batches cross types.
struct Shelf;
impl keystead::Entity for Shelf {
    const NAME: &'static str = "shelf";
    type State = Vec<String>;
    type Command = String;
    type Reply = usize;
    type Error = Never;
    fn handle(
        s: &mut Vec<String>,
        item: &String,
        _: &mut keystead::Context<'_>,
    ) -> Result<usize, Never> {
        s.push(item.clone());
        Ok(s.len())
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_tells_is_one_atomic_write_answered_in_the_callers_order() {
        let dir = tempfile::tempdir().unwrap();
        let rt = builder(dir.path()).register::<Shelf>().open().unwrap();
        rt.idle().await;
        let before = rt.stats();
        let mut batch = rt.tell_batch();
        // 1,000 tells to 20 tallies and 5 shelves, interleaved.
        let mut expected_ids = Vec::new();
        for i in 0..1_000u64 {
            let id = format!("m-{i}");
            if i % 4 == 3 {
                batch.push(rt.entity::<Shelf>(format!("s-{}", i % 5)).tell(format!("item-{i}")).id(id.clone()));
            } else {
                batch.push(rt.entity::<TallyEntity>(format!("t-{}", i % 20)).tell(add(id.clone())).id(id.clone()));
            }
            expected_ids.push(id);
        }
        assert_eq!(batch.len(), 1_000);
        let accepted = batch.send().await.unwrap();
        let ids: Vec<&str> = accepted.iter().map(|a| a.message_id.as_str()).collect();
        assert_eq!(ids, expected_ids, "answered in the caller's order");
        // The batch is one commit and one flush; but its tells start being processed as
        // soon as it is durable, and each processed tell commits, so the counters read
        // here include some of those (up to 13 commits and 5 flushes seen). One write per
        // tell would be 1,000 of each. (The exact figure is the bench's: tells per flush.)
        let after = rt.stats();
        let (commits, flushes) = (after.commits - before.commits, after.flushes - before.flushes);
        assert!(
            commits <= 100 && flushes <= 50,
            "about one commit and one flush for the whole batch: {commits} commits, {flushes} flushes"
        );
        rt.idle().await;
        let mut tallied = 0;
        for k in 0..20 {
            let t = rt.entity::<TallyEntity>(format!("t-{k}")).snapshot().await.unwrap().state;
            let mut seen = t.applied.clone();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), t.applied.len(), "t-{k} applied an id twice: {:?}", t.applied);
            tallied += t.applied.len();
        }
        let mut shelved = 0;
        for k in 0..5 {
            shelved += rt.entity::<Shelf>(format!("s-{k}")).snapshot().await.unwrap().state.len();
        }
        assert_eq!(tallied, 750);
        assert_eq!(shelved, 250);
        assert_eq!(rt.stats().applied - before.applied, 1_000);
        rt.shutdown().await;
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_id_twice_in_a_batch_is_written_once_and_answered_twice() {
        let dir = tempfile::tempdir().unwrap();
        let rt = builder(dir.path()).open().unwrap();
        let t = rt.entity::<TallyEntity>("t-1");
        let mut batch = rt.tell_batch();
        batch.push(t.tell(add("x")).id("x"));
        batch.push(t.tell(add("y")).id("y"));
        batch.push(t.tell(add("x again")).id("x"));
        let accepted = batch.send().await.unwrap();
        assert_eq!(accepted[0], accepted[2], "both positions get the same answer");
        rt.idle().await;
        assert_eq!(t.snapshot().await.unwrap().state.applied, ["x", "y"]);
        assert_eq!(rt.stats().duplicate, 0, "written once: no second entry met its dedup record");
        // Asks: the same.
        let mut asks = rt.ask_batch();
        let a = asks.push(t.ask(add("z")).id("z"));
        let b = asks.push(t.ask(add("z again")).id("z"));
        let mut answers = asks.send().await;
        let (a, b) = (answers.take(a).unwrap(), answers.take(b).unwrap());
        assert_eq!(a, b, "both positions get the same outcome");
        assert_eq!(a.kind(), OutcomeKind::Applied);
        assert_eq!(t.snapshot().await.unwrap().state.applied, ["x", "y", "z"]);
        rt.shutdown().await;
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_tell_refuses_the_whole_batch_and_names_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let rt = builder(dir.path()).open().unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let other = builder(other_dir.path()).open().unwrap();
        let t = rt.entity::<TallyEntity>("t-1");
        let cases: Vec<(keystead::TellBatch, usize, &str)> = vec![
            {
                let mut b = rt.tell_batch();
                b.push(t.tell(add("a"))).push(rt.entity::<TallyEntity>("").tell(add("b")));
                (b, 1, "key")
            },
            {
                let mut b = rt.tell_batch();
                b.push(t.tell(add("a"))).push(t.tell(add("b"))).push(t.tell(add("c")).after(Duration::from_secs(5)));
                (b, 2, "due time")
            },
            {
                let mut b = rt.tell_batch();
                b.push(t.tell(add("a")).sheddable());
                (b, 0, "sheddable")
            },
            {
                let mut b = rt.tell_batch();
                b.push(t.tell(add("a"))).push(other.entity::<TallyEntity>("t-1").tell(add("b")));
                (b, 1, "another runtime")
            },
            {
                let mut b = rt.tell_batch();
                b.push(rt.entity::<Shelf>("s").tell("unregistered".into()));
                (b, 0, "registered")
            },
        ];
        for (batch, at, what) in cases {
            let err = batch.send().await.unwrap_err();
            let text = err.to_string();
            match &err {
                BatchError::Invalid { position, .. } | BatchError::NotBatchable { position, .. } => {
                    assert_eq!(*position, at, "{what}: {text}");
                }
                other => panic!("{what}: {other:?}"),
            }
            assert!(text.contains(&format!("tell {at}")) && text.contains("nothing was sent"), "{text}");
        }
        rt.idle().await;
        assert_eq!(rt.inbox_len().await.unwrap(), 0);
        assert_eq!(t.snapshot().await.unwrap().revision, 0, "nothing of any batch was applied");
        // Too many for one atomic write.
        let mut big = rt.tell_batch();
        for i in 0..=keystead::BATCH_MESSAGES_MAX {
            big.push(t.tell(add("x")).id(format!("big-{i}")));
        }
        assert!(matches!(big.send().await, Err(BatchError::TooLarge { .. })));
        assert_eq!(rt.inbox_len().await.unwrap(), 0);
        other.shutdown().await;
        rt.shutdown().await;
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_lane_refuses_the_whole_batch_and_gives_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000_000);
        let rt = builder(dir.path())
            .clock(clock.clone())
            .lane_limits(Priority::Low, LaneLimits::new(10, 1 << 20).when_full(WhenFull::Reject))
            .open()
            .unwrap();
        // Six delayed messages hold six of the Low lane's ten places.
        let waiting = rt.entity::<TallyEntity>("waiting");
        for i in 0..6 {
            waiting.tell(add("later")).id(format!("later-{i}")).priority(Priority::Low).after(Duration::from_secs(3600)).await.unwrap();
        }
        let mut batch = rt.tell_batch();
        for i in 0..5 {
            batch.push(rt.entity::<TallyEntity>(format!("t-{i}")).tell(add("now")).id(format!("now-{i}")).priority(Priority::Low));
        }
        // A Normal one in the same batch: refused with the rest (all or none).
        batch.push(rt.entity::<TallyEntity>("normal").tell(add("n")).id("n"));
        let err = batch.send().await.unwrap_err();
        assert!(matches!(err, BatchError::Overloaded { lane: Priority::Low, pending: 6, pending_max: 10, .. }), "{err:?}");
        rt.idle().await;
        assert_eq!(rt.inbox_len().await.unwrap(), 0, "nothing accepted");
        assert_eq!(rt.entity::<TallyEntity>("normal").snapshot().await.unwrap().revision, 0);
        let batch = err.into_batch().expect("the batch comes back");
        assert_eq!(batch.len(), 6);
        // Room comes back (two delayed messages cancelled): the same batch goes in.
        waiting.cancel("later-0").await.unwrap();
        waiting.cancel("later-1").await.unwrap();
        let accepted = batch.send().await.unwrap();
        assert_eq!(accepted.len(), 6);
        rt.idle().await;
        for i in 0..5 {
            let s = rt.entity::<TallyEntity>(format!("t-{i}")).snapshot().await.unwrap().state;
            assert_eq!(s.applied, ["now"]);
        }
        assert_eq!(rt.entity::<TallyEntity>("normal").snapshot().await.unwrap().state.applied, ["n"]);
        rt.shutdown().await;
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_asks_is_dispatched_in_one_order_and_answered_in_the_callers() {
        let dir = tempfile::tempdir().unwrap();
        let rt = builder(dir.path()).register::<Shelf>().open().unwrap();
        let t = rt.entity::<TallyEntity>("t-1");
        let mut batch = rt.ask_batch();
        // Pushed in descending id order to one tally, and to shelves of two keys: one
        // entity's messages are applied in dispatch order, (type, key, id).
        let mut tally_answers = Vec::new();
        let mut shelf_answers = Vec::new();
        for i in (0..10).rev() {
            tally_answers.push((i, batch.push(t.ask(add(format!("m-{i}"))).id(format!("m-{i}")))));
            shelf_answers.push((i, batch.push(rt.entity::<Shelf>(format!("s-{}", i % 2)).ask(format!("item-{i}")).id(format!("i-{i}")))));
        }
        // One that fails: its own outcome, the others unaffected.
        let failing = batch.push(t.ask(TallyCmd::Invalid).id("bad"));
        let mut answers = batch.send().await;
        assert_eq!(answers.len(), 21);
        for (i, answer) in tally_answers {
            let outcome = answers.take(answer).unwrap();
            // Dispatched in id order: "m-i" is applied as the (i + 1)-th message.
            assert_eq!(outcome.reply(), Some(&(i + 1)), "m-{i}");
        }
        for (i, answer) in shelf_answers {
            let outcome = answers.take(answer).unwrap();
            assert_eq!(outcome.reply(), Some(&((i / 2 + 1) as usize)), "item-{i}");
        }
        assert_eq!(answers.take(failing).unwrap().kind(), OutcomeKind::Rejected);
        let applied = t.snapshot().await.unwrap().state.applied;
        let expected: Vec<String> = (0..10).map(|i| format!("m-{i}")).collect();
        assert_eq!(applied, expected);
        rt.shutdown().await;
    }
}

/// Two kinds of batches (a worker's batch update and a batch upsert, the lock-ordering
/// seed) over the same keys in opposite orders, from 16 concurrent senders, many rounds:
/// every batch completes (a watchdog turns a hang into a failure), every answer is its own
/// message's, and every message is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_order_batches_over_the_same_keys_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let rt = std::sync::Arc::new(builder(dir.path()).open().unwrap());
    const KEYS: usize = 12;
    const SENDERS: usize = 16;
    const ROUNDS: usize = 20;
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let rt = rt.clone();
        senders.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let mut keys: Vec<usize> = (0..KEYS).collect();
                if s % 2 == 1 {
                    keys.reverse();
                }
                if s % 4 < 2 {
                    let mut batch = rt.ask_batch();
                    let answers: Vec<_> = keys
                        .iter()
                        .map(|k| {
                            let id = format!("s{s}-r{round}-k{k}");
                            (
                                id.clone(),
                                batch.push(
                                    rt.entity::<TallyEntity>(format!("t-{k}"))
                                        .ask(add(id.clone()))
                                        .id(id),
                                ),
                            )
                        })
                        .collect();
                    let mut results = batch.send().await;
                    for (id, answer) in answers {
                        let outcome = results.take(answer).unwrap();
                        assert_eq!(outcome.kind(), OutcomeKind::Applied, "{id}");
                    }
                } else {
                    let mut batch = rt.tell_batch();
                    let ids: Vec<String> =
                        keys.iter().map(|k| format!("s{s}-r{round}-k{k}")).collect();
                    for (k, id) in keys.iter().zip(&ids) {
                        batch.push(
                            rt.entity::<TallyEntity>(format!("t-{k}"))
                                .tell(add(id.clone()))
                                .id(id.clone()),
                        );
                    }
                    let accepted = batch.send().await.unwrap();
                    let got: Vec<&str> = accepted.iter().map(|a| a.message_id.as_str()).collect();
                    assert_eq!(got, ids, "answered in the caller's order");
                }
            }
        }));
    }
    let all = async {
        for s in senders {
            s.await.unwrap();
        }
        rt.idle().await;
    };
    // A watchdog, not a synchronisation: a hang fails the test instead of hanging it.
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("a batch never completed: deadlock or lost wake-up");
    let mut total = 0;
    for k in 0..KEYS {
        let t = rt
            .entity::<TallyEntity>(format!("t-{k}"))
            .snapshot()
            .await
            .unwrap();
        let mut ids = t.state.applied.clone();
        ids.sort();
        ids.dedup();
        assert_eq!(
            ids.len(),
            t.state.applied.len(),
            "t-{k}: an id applied twice"
        );
        assert_eq!(
            t.revision as usize,
            t.state.applied.len(),
            "t-{k}: no revision skipped"
        );
        total += t.state.applied.len();
    }
    assert_eq!(total, SENDERS * ROUNDS * KEYS);
}
