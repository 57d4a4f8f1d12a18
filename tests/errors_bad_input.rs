//! Goal: bad input and faults give typed errors that name the entity and key and say what to
//! do; nothing accepted is lost; nothing panics.
//! Method: damage stored bytes with sled directly (the key layout is documented), open a held
//! database, send to unregistered types, closed runtimes and with invalid keys, ids and
//! settings. Faults that need other processes live in `errors_process_faults.rs`: a process
//! being spawned briefly shares every open file, and with it sled's lock, so those tests
//! must not run beside tests that close and reopen databases.

mod common;

use common::*;
use keystead::{AdminError, Context, DecodeError, Entity, OpenError, OutcomeKind, SubmitError};

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_fails_its_key_only_and_stays_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = builder(dir.path()).open().unwrap();
        rt.entity::<TallyEntity>("good")
            .ask(add("a"))
            .await
            .unwrap();
        rt.entity::<TallyEntity>("bad").ask(add("a")).await.unwrap();
        rt.shutdown().await;
    }
    // Bytes written by an incompatible state type.
    with_raw_store(dir.path(), |db| {
        db.put(
            &state_key("tally", "bad"),
            &[1u8, 0xff, 0xff, 0xff, 0xff, 0xff],
        )
    });
    {
        let rt = builder(dir.path()).open().unwrap();
        let good = rt.entity::<TallyEntity>("good");
        let bad = rt.entity::<TallyEntity>("bad");
        assert_eq!(good.ask(add("b")).await.unwrap().reply(), Some(&2));
        match bad.ask(add("b")).await {
            Err(e @ SubmitError::Decode { .. }) => {
                let text = e.to_string();
                assert!(text.contains("tally") && text.contains("\"bad\""), "{text}");
                assert!(matches!(
                    e,
                    SubmitError::Decode {
                        source: DecodeError::Malformed { what: "state", .. },
                        ..
                    }
                ));
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
        // A message accepted for the broken key is kept, not lost.
        bad.tell(add("kept")).id("kept-1").await.unwrap();
        rt.idle().await;
        assert_eq!(rt.inbox_len().await.unwrap(), 1);
        assert!(matches!(bad.snapshot().await, Err(SubmitError::Decode { .. })));
        rt.shutdown().await;
    }
    // The operator repairs the record (here: resets it) ...
    with_raw_store(dir.path(), |db| {
        db.remove(&state_key("tally", "bad"))
    });
    // ... and the kept message is processed at the next open.
    let rt = builder(dir.path()).open().unwrap();
    rt.idle().await;
    assert_eq!(rt.inbox_len().await.unwrap(), 0);
    let snap = rt.entity::<TallyEntity>("bad").snapshot().await.unwrap();
    assert_eq!(snap.state.applied, vec!["kept"]);
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_inbox_entry_is_dead_lettered_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    drop(builder(dir.path()).open().unwrap());
    with_raw_store(dir.path(), |db| {
        db.put(&inbox_key("tally", "k", 7), &[1u8, 0xde, 0xad])
    });
    let rt = builder(dir.path()).open().unwrap();
    rt.idle().await;
    assert_eq!(rt.inbox_len().await.unwrap(), 0);
    let letters = rt.dead_letters::<TallyEntity>().await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].message_id.starts_with("undecodable-inbox-"));
    assert!(
        letters[0].error.contains("inbox entry"),
        "{}",
        letters[0].error
    );
    assert!(letters[0].command.is_err());
    // The entity itself keeps working.
    assert_eq!(
        rt.entity::<TallyEntity>("k")
            .ask(add("x"))
            .await
            .unwrap()
            .kind(),
        OutcomeKind::Applied
    );
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_database_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).open().unwrap();
    match builder(dir.path()).open() {
        Err(e @ OpenError::Locked { .. }) => {
            assert!(e.to_string().contains("already open elsewhere"))
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    rt.shutdown().await;
    // Released at shutdown: opening again works at once.
    builder(dir.path()).open().unwrap().shutdown().await;
}
}

struct Unregistered;
impl Entity for Unregistered {
    const NAME: &'static str = "unregistered";
    type State = u8;
    type Command = u8;
    type Reply = u8;
    type Error = Never;
    fn handle(_: &mut u8, c: &u8, _: &mut Context<'_>) -> Result<u8, Never> {
        Ok(*c)
    }
}

/// Same name as the registered tally entity, different Rust type.
struct Impostor;
impl Entity for Impostor {
    const NAME: &'static str = "tally";
    type State = u8;
    type Command = u8;
    type Reply = u8;
    type Error = Never;
    fn handle(_: &mut u8, c: &u8, _: &mut Context<'_>) -> Result<u8, Never> {
        Ok(*c)
    }
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).message_size_max(1024).open().unwrap();
    assert!(matches!(
        rt.entity::<Unregistered>("x").ask(1).await,
        Err(SubmitError::NotRegistered {
            entity: "unregistered"
        })
    ));
    assert!(matches!(
        rt.entity::<Impostor>("x").tell(1).await,
        Err(SubmitError::NotRegistered { entity: "tally" })
    ));
    assert!(matches!(
        rt.entity::<TallyEntity>("").ask(add("x")).await,
        Err(SubmitError::InvalidKey { .. })
    ));
    assert!(matches!(
        rt.entity::<TallyEntity>("k".repeat(1025))
            .tell(add("x"))
            .await,
        Err(SubmitError::InvalidKey { .. })
    ));
    assert!(matches!(
        rt.entity::<TallyEntity>("k").ask(add("x")).id("").await,
        Err(SubmitError::InvalidMessageId { .. })
    ));
    match rt
        .entity::<TallyEntity>("k")
        .tell(add("x".repeat(5000)))
        .await
    {
        Err(SubmitError::TooLarge {
            size, max: 1024, ..
        }) => assert!(size > 5000),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(rt.inbox_len().await.unwrap(), 0, "nothing refused was stored");

    let kept = rt.entity::<TallyEntity>("k");
    rt.shutdown().await;
    let closed = kept.ask(add("x")).await;
    assert!(
        matches!(
            closed,
            Err(SubmitError::Closed {
                entity: "tally",
                ..
            })
        ),
        "{closed:?}"
    );
    assert!(matches!(
        kept.tell(add("x")).await,
        Err(SubmitError::Closed { .. })
    ));
}
}

on_each_backend! {
#[test]
fn invalid_settings_and_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(dir.path()).shards(0).open().unwrap_err();
    assert!(
        matches!(
            e,
            OpenError::InvalidConfig {
                setting: "shards",
                ..
            }
        ),
        "{e}"
    );
    let e = builder(dir.path()).retry(fast_retry(0)).open().unwrap_err();
    assert!(
        matches!(
            e,
            OpenError::InvalidConfig {
                setting: "retry",
                ..
            }
        ),
        "{e}"
    );
    let e = builder(dir.path())
        .register::<Impostor>()
        .open()
        .unwrap_err();
    assert!(matches!(e, OpenError::EntityName { .. }), "{e}");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let e = builder(&file).open().unwrap_err();
    assert!(matches!(e, OpenError::Io { .. }), "{e}");
    // A directory with someone else's data is not adopted silently.
    let foreign = dir.path().join("foreign");
    with_raw_store(&foreign, |db| {
        db.put(b"their-key", b"their-value")
    });
    let e = builder(&foreign).open().unwrap_err();
    assert!(matches!(e, OpenError::Layout { .. }), "{e}");
}
}

/// sled only: the partial snapshot file is a sled quirk (upstream sled #1527).
#[test]
fn a_partial_snapshot_left_by_a_killed_open_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    drop(builder(dir.path()).open().unwrap());
    let partial = dir.path().join("snap.00000000000DEAD.generating");
    std::fs::write(&partial, b"half-written").unwrap();
    drop(builder(dir.path()).open().unwrap());
    assert!(!partial.exists());
}

/// Issue 10: admin calls on an empty or over-long key said "the runtime is closed" on an
/// open runtime. They must name what is wrong with the key, as `ask` does, and change
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_on_invalid_keys_say_what_is_wrong_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).open().unwrap();
    let over_long = "k".repeat(keystead::ENTITY_KEY_LEN_MAX + 1);
    for key in [String::new(), over_long] {
        let e = rt.entity::<TallyEntity>(key.as_str());
        let answers = [
            ("passivate", e.passivate().await),
            ("requeue", e.requeue("m1").await),
            ("purge_dead_letter", e.purge_dead_letter("m1").await),
            (
                "effects_of",
                rt.effects_of::<TallyEntity>(&key).await.map(|_| true),
            ),
        ];
        for (call, answer) in answers {
            match answer {
                Err(
                    err @ AdminError::InvalidKey {
                        entity: "tally", ..
                    },
                ) => {
                    let text = err.to_string();
                    assert!(text.contains("key"), "{call}: {text}");
                    assert!(!text.contains("closed"), "{call}: {text}");
                }
                other => panic!("{call} on a key of {} bytes: {other:?}", key.len()),
            }
        }
    }
    // The runtime was open all along, and still is.
    rt.entity::<TallyEntity>("k").ask(add("x")).await.unwrap();
    assert_eq!(rt.stats().live_entities, 1);
    rt.shutdown().await;
}
