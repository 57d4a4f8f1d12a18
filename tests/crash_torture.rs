//! Goal: nothing acknowledged is lost, applied twice, or has its effect performed twice,
//! whatever moment the process is killed at, including inside `Runtime::open`.
//! Method: the shared harness (examples/support/torture.rs) re-runs this test binary as a
//! child workload, SIGKILLs it 25 times at seeded moments (a third within 60 ms of start),
//! then drains and checks from the data alone. The long version is
//! `cargo run --release --example crash_torture -- --kills 1000`.

#[path = "../examples/support/torture.rs"]
mod torture;

use std::time::Duration;

/// Child mode entry point: does nothing unless the harness started this process.
#[test]
fn torture_child() {
    torture::run_child_if_asked();
}

#[test]
fn twenty_five_kills_per_backend_lose_nothing_and_double_nothing() {
    if std::env::var(torture::CHILD_ENV).is_ok() {
        return;
    }
    let seed = std::env::var("KEYSTEAD_TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_123);
    for backend in keystead::Backend::available() {
        let dir = tempfile::tempdir().unwrap();
        let spawn = torture::spawner(vec![
            "--exact".into(),
            "torture_child".into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ]);
        let tokio = tokio::runtime::Runtime::new().unwrap();
        let report = tokio.block_on(torture::torture(
            dir.path(),
            25,
            seed,
            Duration::from_millis(300),
            &spawn,
            backend,
        ));
        println!("{backend:?}:");
        report.print();
        assert!(
            report.kills_early > 0,
            "{backend:?}: some kills must land inside open"
        );
        assert!(
            report.acknowledged > 100,
            "{backend:?}: the workload must do real work: {report:?}"
        );
        assert!(
            report.ok(),
            "{backend:?}: crash torture failed: {report:?}\nreplay: KEYSTEAD_TORTURE_SEED={seed} cargo test --test crash_torture"
        );
    }
}
