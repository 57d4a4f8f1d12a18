//! Goal: the storage engine is a choice the data remembers. Both engines run the same
//! runtime; a directory created by one is refused by the other with an error naming both;
//! a directory from before the record existed is recognised by its files.
//!
//! Method: open, write, reopen and cross-open real directories with each engine.

mod common;

use common::*;
use keystead::{Backend, OpenError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_backend_keeps_what_it_acknowledged_across_a_reopen() {
    for backend in Backend::available() {
        let dir = tempfile::tempdir().unwrap();
        let rt = builder(dir.path()).backend(backend).open().unwrap();
        let e = rt.entity::<TallyEntity>("k");
        e.ask(add("a")).id("a").await.unwrap();
        e.tell(add("b")).id("b").await.unwrap();
        rt.idle().await;
        rt.shutdown().await;

        let rt = builder(dir.path()).backend(backend).open().unwrap();
        let e = rt.entity::<TallyEntity>("k");
        assert!(
            e.ask(add("a")).id("a").await.unwrap().is_duplicate(),
            "{backend:?}"
        );
        assert_eq!(
            e.snapshot().await.unwrap().state.applied,
            ["a", "b"],
            "{backend:?}"
        );
        rt.shutdown().await;
        let recorded = std::fs::read_to_string(dir.path().join("keystead.backend")).unwrap();
        assert_eq!(recorded.trim(), backend.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_backend_is_refused_with_both_names() {
    for (created, other) in [
        (Backend::Sled, Backend::Fjall),
        (Backend::Fjall, Backend::Sled),
    ] {
        let dir = tempfile::tempdir().unwrap();
        open_and_close(dir.path(), created).await;
        // Also without the record: the engine's own files give it away.
        for remove_record in [false, true] {
            if remove_record {
                std::fs::remove_file(dir.path().join("keystead.backend")).unwrap();
            }
            match builder(dir.path()).backend(other).open() {
                Err(OpenError::WrongBackend {
                    found, requested, ..
                }) => {
                    assert_eq!((found.as_str(), requested), (created.name(), other.name()));
                    let text = OpenError::WrongBackend {
                        path: dir.path().into(),
                        found,
                        requested,
                    }
                    .to_string();
                    assert!(text.contains(created.name()) && text.contains(other.name()));
                }
                Err(e) => panic!("{created:?} opened as {other:?}: unexpected error {e}"),
                Ok(_) => panic!("{created:?} directory opened as {other:?}"),
            }
        }
        // The right engine still opens it, and records it again.
        open_and_close(dir.path(), created).await;
        assert!(dir.path().join("keystead.backend").exists());
    }
}

async fn open_and_close(path: &std::path::Path, backend: Backend) {
    builder(path)
        .backend(backend)
        .open()
        .unwrap()
        .shutdown()
        .await;
}
