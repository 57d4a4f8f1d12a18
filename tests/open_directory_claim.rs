//! Goal: a database directory is opened by one runtime at a time, is never mistaken for, or
//! allowed to damage, something keystead did not create, and opens again whatever moment an
//! earlier open was interrupted at (issue 10).
//! Method: race real opens of one new directory from many threads, over many rounds; and
//! lay out on disk exactly what an interrupted first open leaves (the kill itself is done by
//! `tests/crash_torture.rs`), then open it.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use keystead::{Backend, OpenError};

/// Issue 10: six threads opening one new directory got `WrongBackend("")` or `Corrupt`
/// instead of `Locked` (they read the backend record while the winner was writing it).
#[test]
fn concurrent_first_opens_leave_one_winner_and_the_rest_locked() {
    const THREADS: usize = 6;
    const ROUNDS: usize = 40;
    for backend in Backend::available() {
        for round in 0..ROUNDS {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db");
            let start = Arc::new(Barrier::new(THREADS));
            let openers: Vec<_> = (0..THREADS)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        runtime_builder(&path)
                            .backend(backend)
                            .register::<TallyEntity>()
                            .open()
                    })
                })
                .collect();
            let results: Vec<_> = openers.into_iter().map(|t| t.join().unwrap()).collect();
            let mut winners = Vec::new();
            for result in results {
                match result {
                    Ok(rt) => winners.push(rt),
                    Err(OpenError::Locked { .. }) => {}
                    Err(other) => panic!("{backend:?} round {round}: a loser got {other:?}"),
                }
            }
            assert_eq!(
                winners.len(),
                1,
                "{backend:?} round {round}: exactly one opens"
            );
            let tokio = tokio::runtime::Runtime::new().unwrap();
            tokio.block_on(async {
                let rt = winners.pop().unwrap();
                rt.entity::<TallyEntity>("k")
                    .ask(add("a"))
                    .id("a")
                    .await
                    .unwrap();
                rt.shutdown().await;
                // Nothing was left damaged: it opens again, with what was written.
                let rt = runtime_builder(&path)
                    .backend(backend)
                    .register::<TallyEntity>()
                    .open()
                    .unwrap();
                let snap = rt.entity::<TallyEntity>("k").snapshot().await.unwrap();
                assert_eq!(snap.state.applied, ["a"], "{backend:?} round {round}");
                rt.shutdown().await;
            });
        }
    }
}

/// What a kill inside the very first open leaves behind, for each engine: the creation
/// marker and a partial set of the engine's files (fjall's half-written `version`, a
/// journal that `create_new` then refuses, sled's first files), or an empty backend record
/// from an older release. Each opens, and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_first_open_is_done_again() {
    type Layout = &'static [(&'static str, &'static [u8])];
    let leftovers: [(&str, Layout); 5] = [
        ("creation marker alone", &[("keystead.creating", b"")]),
        (
            "fjall stopped after its journal",
            &[
                ("keystead.creating", b""),
                ("lock", b""),
                ("0.jnl", b"\x01\x02"),
                ("version", b"\x00"),
            ],
        ),
        (
            "sled stopped after its config",
            &[
                ("keystead.creating", b""),
                ("conf", b"segment_size: 524288\n"),
                ("db", b"\x00\x00"),
            ],
        ),
        (
            "record being renamed into place",
            &[("keystead.creating", b""), ("keystead.backend.tmp", b"sl")],
        ),
        (
            "empty record from an older release",
            &[("keystead.backend", b"")],
        ),
    ];
    for backend in Backend::available() {
        for (what, files) in leftovers {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db");
            std::fs::create_dir_all(path.join("keyspaces")).unwrap();
            for (name, bytes) in files {
                std::fs::write(path.join(name), bytes).unwrap();
            }
            if !files.iter().any(|(n, _)| *n == "lock" || *n == "conf") {
                std::fs::remove_dir(path.join("keyspaces")).unwrap();
            }
            let rt = runtime_builder(&path)
                .backend(backend)
                .register::<TallyEntity>()
                .open()
                .unwrap_or_else(|e| panic!("{backend:?}, {what}: {e}"));
            rt.entity::<TallyEntity>("k").ask(add("a")).await.unwrap();
            rt.shutdown().await;
            assert!(
                !path.join("keystead.creating").exists(),
                "{backend:?}, {what}"
            );
            assert_eq!(
                std::fs::read_to_string(path.join("keystead.backend"))
                    .unwrap()
                    .trim(),
                backend.name(),
                "{backend:?}, {what}"
            );
            let rt = runtime_builder(&path)
                .backend(backend)
                .register::<TallyEntity>()
                .open()
                .unwrap();
            assert_eq!(
                rt.entity::<TallyEntity>("k")
                    .snapshot()
                    .await
                    .unwrap()
                    .state
                    .count,
                1,
                "{backend:?}, {what}"
            );
            rt.shutdown().await;
        }
    }
}

/// keystead creates its database only in a new or empty directory: a directory holding
/// someone else's files is refused, and left as it was.
#[test]
fn a_directory_holding_other_files_is_refused_and_left_alone() {
    for backend in Backend::available() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        match runtime_builder(dir.path())
            .backend(backend)
            .register::<TallyEntity>()
            .open()
        {
            Err(err @ OpenError::NotEmpty { .. }) => {
                let text = err.to_string();
                assert!(
                    text.contains("notes.txt") && text.contains("empty"),
                    "{text}"
                );
            }
            other => panic!("{backend:?}: {other:?}"),
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "keystead.lock")
            .collect();
        assert_eq!(names, ["notes.txt"], "{backend:?}: nothing else written");
        assert_eq!(
            std::fs::read(dir.path().join("notes.txt")).unwrap(),
            b"mine"
        );
    }
}
