//! Goal: bad input and faults give typed errors that name the entity and key and say what to
//! do; nothing accepted is lost; nothing panics.
//! Method: damage stored bytes with sled directly (the key layout is documented), open a held
//! database, send to unregistered types, closed runtimes and with invalid keys, ids and
//! settings, and fill a small tmpfs until the disk is full.

mod common;

use std::process::Command;

use common::*;
use keystead::{
    Context, DecodeError, Entity, Failure, FailureKind, OpenError, OutcomeKind, StoreError,
    SubmitError,
};
use serde::{Deserialize, Serialize};

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
    {
        // Bytes written by an incompatible state type.
        let db = sled::open(dir.path()).unwrap();
        db.insert(
            state_key("tally", "bad"),
            vec![1u8, 0xff, 0xff, 0xff, 0xff, 0xff],
        )
        .unwrap();
        db.flush().unwrap();
    }
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
        assert_eq!(rt.inbox_len().unwrap(), 1);
        assert!(matches!(bad.snapshot(), Err(SubmitError::Decode { .. })));
        rt.shutdown().await;
    }
    {
        // The operator repairs the record (here: resets it) ...
        let db = sled::open(dir.path()).unwrap();
        db.remove(state_key("tally", "bad")).unwrap();
        db.flush().unwrap();
    }
    // ... and the kept message is processed at the next open.
    let rt = builder(dir.path()).open().unwrap();
    rt.idle().await;
    assert_eq!(rt.inbox_len().unwrap(), 0);
    let snap = rt.entity::<TallyEntity>("bad").snapshot().unwrap();
    assert_eq!(snap.state.applied, vec!["kept"]);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_inbox_entry_is_dead_lettered_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    drop(builder(dir.path()).open().unwrap());
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert(inbox_key("tally", "k", 7), vec![1u8, 0xde, 0xad])
            .unwrap();
        db.flush().unwrap();
    }
    let rt = builder(dir.path()).open().unwrap();
    rt.idle().await;
    assert_eq!(rt.inbox_len().unwrap(), 0);
    let letters = rt.dead_letters::<TallyEntity>().unwrap();
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

/// Run as a child process by `another_process_holding_the_database_is_refused`: holds the
/// database open until its stdin closes.
#[test]
fn child_hold_database() {
    let Ok(path) = std::env::var("KEYSTEAD_HOLD_DB") else {
        return;
    };
    let _rt = builder(std::path::Path::new(&path)).open().unwrap();
    println!("holding");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
}

#[test]
fn another_process_holding_the_database_is_refused() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_hold_database",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KEYSTEAD_HOLD_DB", dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("holding") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "child exited before holding the db"
        );
    }
    let result = builder(dir.path()).open();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert!(
        matches!(result, Err(OpenError::Locked { .. })),
        "{result:?}"
    );
}

struct Unregistered;
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("never")]
struct Never;
impl Failure for Never {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}
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
    assert_eq!(rt.inbox_len().unwrap(), 0, "nothing refused was stored");

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
    // A directory with someone else's sled data is not adopted silently.
    let foreign = dir.path().join("foreign");
    {
        let db = sled::open(&foreign).unwrap();
        db.insert(b"their-key", b"their-value").unwrap();
        db.flush().unwrap();
    }
    let e = builder(&foreign).open().unwrap_err();
    assert!(matches!(e, OpenError::Layout { .. }), "{e}");
}

#[test]
fn a_partial_snapshot_left_by_a_killed_open_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    drop(builder(dir.path()).open().unwrap());
    let partial = dir.path().join("snap.00000000000DEAD.generating");
    std::fs::write(&partial, b"half-written").unwrap();
    drop(builder(dir.path()).open().unwrap());
    assert!(!partial.exists());
}

/// A 4 MiB tmpfs fills up: tells fail with a typed, retryable storage error, nothing that
/// was acknowledged is lost, and after the disk grows everything acknowledged is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_work_cleanly_and_recovers() {
    // Mounting needs root; this workplace's developers and CI run as root.
    let mount = tempfile::tempdir().unwrap();
    let mnt = mount.path().to_path_buf();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(mounted, "cannot mount a tmpfs (this test needs root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let path = mnt.join("db");

    let mut acknowledged = 0u64;
    let mut refused = None;
    {
        let rt = builder(&path).message_size_max(1 << 20).open().unwrap();
        let e = rt.entity::<TallyEntity>("big");
        for i in 0..400 {
            match e
                .tell(add(format!("{i:06}-{}", "x".repeat(32 * 1024))))
                .id(format!("m{i}"))
                .await
            {
                Ok(_) => acknowledged += 1,
                Err(err) => {
                    refused = Some(err);
                    break;
                }
            }
        }
        let err = refused.expect("the disk never filled up");
        assert!(matches!(err, SubmitError::Storage { .. }), "{err:?}");
        assert!(err.is_retryable(), "a full disk can clear: {err}");
        eprintln!("refusal: {err}");
        assert!(err.to_string().contains("disk space"), "{err}");
        assert!(matches!(
            &err,
            SubmitError::Storage {
                source: StoreError::Io { .. },
                ..
            }
        ));
        rt.close_now();
    }
    eprintln!("full disk: {acknowledged} acknowledged before the first refusal");
    assert!(
        acknowledged > 10,
        "only {acknowledged} acknowledged before the disk filled"
    );
    let grown = Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(grown.success());
    let rt = builder(&path).open().unwrap();
    rt.idle().await;
    let snap = rt.entity::<TallyEntity>("big").snapshot().unwrap();
    assert!(
        snap.state.count >= acknowledged,
        "acknowledged {acknowledged}, applied {}",
        snap.state.count
    );
    let mut ids: Vec<_> = snap.state.applied.iter().map(|t| &t[..6]).collect();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "nothing applied twice");
    rt.shutdown().await;
}
