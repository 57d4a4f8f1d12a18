//! Goal: faults involving other processes. A database held by another process is refused
//! with a typed error; a full disk refuses work cleanly, loses nothing acknowledged, and
//! recovers after the disk grows and the process restarts.
//! Method: re-run this test binary as a child process (holding a database, or filling a
//! small tmpfs); the parent checks from the data alone. The tests here take one lock so that
//! a child being spawned by one never holds the other's files (see errors_bad_input.rs).

mod common;

use std::process::Command;
use std::sync::Mutex;

use common::*;
use keystead::{OpenError, StoreError, SubmitError};

/// Serialises the tests of this file (each spawns processes).
static SPAWNING: Mutex<()> = Mutex::new(());

/// Runs the child test `name` of this binary with `env` set to `path`, on the engine under
/// test, and returns what it printed once it has succeeded.
fn run_child(name: &str, env: &str, path: &std::path::Path) -> String {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env, path)
        .env("KEYSTEAD_TEST_BACKEND", backend().name())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout).into_owned();
    assert!(
        child.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&child.stderr)
    );
    stdout
}

/// The runtime the disk-filling children open: 32 KiB commands fill a 4 MiB disk quickly.
fn open_for_filling(path: &str) -> keystead::Runtime {
    builder(std::path::Path::new(path))
        .message_size_max(1 << 20)
        .open()
        .unwrap()
}

/// A size-limited tmpfs mounted on a temporary directory, unmounted on drop. Mounting needs
/// root; this workplace's developers and CI run as root.
struct Tmpfs {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(mounted, "cannot mount a tmpfs (this test needs root)");
        Self { path, _dir: dir }
    }

    /// Changes mount options (`size=256m`, `ro`, `rw`).
    fn remount(&self, options: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(ok.success(), "remount {options}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("mount")
            .args(["-o", "remount,rw"])
            .arg(&self.path)
            .status();
        let _ = Command::new("umount").arg(&self.path).status();
    }
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

on_each_backend_in_turn! {
#[test]
fn another_process_holding_the_database_is_refused() {
    use std::io::{BufRead, BufReader};
    let _serial = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_hold_database",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KEYSTEAD_HOLD_DB", dir.path())
        .env("KEYSTEAD_TEST_BACKEND", backend().name())
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
}

/// Run as a child process by `a_full_disk_refuses_work_cleanly_and_recovers`: fills the
/// database at `KEYSTEAD_FILL_DB` until a tell is refused, checks the errors, prints how
/// many tells were acknowledged, and exits (as an application restarts after a disk fault).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_fill_disk() {
    let Ok(path) = std::env::var("KEYSTEAD_FILL_DB") else {
        return;
    };
    let rt = open_for_filling(&path);
    let e = rt.entity::<TallyEntity>("big");
    let mut acknowledged = 0u64;
    let mut refused = None;
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
    // The first refusal is the I/O error itself, or (when the entity's own processing commit
    // hit the full disk first) the poisoned store that names it.
    match &err {
        SubmitError::Storage {
            source: StoreError::Io { .. },
            ..
        } => {
            assert!(err.is_retryable(), "a full disk can clear: {err}");
            assert!(err.to_string().contains("disk space"), "{err}");
        }
        SubmitError::Storage {
            source: StoreError::Poisoned { first_error },
            ..
        } => {
            assert!(
                first_error.to_lowercase().contains("space"),
                "{first_error}"
            );
        }
        other => panic!("expected a storage error, got {other:?}"),
    }
    // From then on the runtime refuses cleanly and says what to do, and closing returns
    // (regression: sled's drop-time flush on the broken database wedged its global lock).
    let next = e.tell(add("after")).await.unwrap_err();
    assert!(
        matches!(
            &next,
            SubmitError::Storage {
                source: StoreError::Poisoned { .. },
                ..
            }
        ),
        "{next:?}"
    );
    assert!(next.to_string().contains("restart"), "{next}");
    rt.close_now();
    println!("acknowledged={acknowledged}");
}

on_each_backend_in_turn! {
/// A 4 MiB tmpfs fills up: tells fail with a typed, retryable storage error, nothing that
/// was acknowledged is lost, and after the disk grows and the process restarts, everything
/// acknowledged is processed exactly once.
#[test]
fn a_full_disk_refuses_work_cleanly_and_recovers() {
    let _serial = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
    let disk = Tmpfs::mount("4m");
    let path = disk.path.join("db");

    let stdout = run_child("child_fill_disk", "KEYSTEAD_FILL_DB", &path);
    let acknowledged: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("acknowledged=").map(|(_, n)| n))
        .expect("the child reports its count")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        acknowledged > 10,
        "only {acknowledged} acknowledged before the disk filled"
    );

    disk.remount("size=256m");
    let tokio = tokio::runtime::Runtime::new().unwrap();
    tokio.block_on(async {
        let rt = builder(&path).open().unwrap();
        rt.idle().await;
        let snap = rt.entity::<TallyEntity>("big").snapshot().await.unwrap();
        // Every acknowledged tell is applied; the refused one may or may not be (it was
        // never acknowledged), and nothing is applied twice.
        let count = snap.state.count;
        assert!(
            count == acknowledged || count == acknowledged + 1,
            "acknowledged {acknowledged}, applied {count}"
        );
        let mut ids: Vec<_> = snap
            .state
            .applied
            .iter()
            .map(|t| t[..6].to_string())
            .collect();
        ids.dedup();
        assert_eq!(ids.len() as u64, count, "nothing applied twice");
        assert_eq!(rt.inbox_len().await.unwrap(), 0);
        rt.shutdown().await;
    });
}
}

on_each_backend_in_turn! {
/// A read-only disk: opening is refused with a typed error naming the directory, and once
/// the disk is writable again everything acknowledged before is there. (Linux refuses to
/// remount a filesystem read-only while files on it are open for writing, so the switch is
/// staged between two runs rather than under a running runtime.)
#[test]
fn a_read_only_disk_refuses_cleanly_and_recovers() {
    let _serial = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
    let disk = Tmpfs::mount("64m");
    let path = disk.path.join("db");
    let tokio = tokio::runtime::Runtime::new().unwrap();
    tokio.block_on(async {
        let rt = builder(&path).open().unwrap();
        for i in 0..10 {
            rt.entity::<TallyEntity>("ro")
                .tell(add(format!("m{i}")))
                .id(format!("m{i}"))
                .await
                .unwrap();
        }
        rt.shutdown().await; // drains; the runtime's files are closed
    });
    disk.remount("ro");
    let refused = builder(&path).open().unwrap_err();
    eprintln!("read-only open refused: {refused}");
    assert!(
        matches!(
            refused,
            keystead::OpenError::Io { .. } | keystead::OpenError::Store { .. }
        ),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains(&path.display().to_string()),
        "{refused}"
    );
    disk.remount("rw");
    tokio.block_on(async {
        let rt = builder(&path).open().unwrap();
        rt.idle().await;
        let e = rt.entity::<TallyEntity>("ro");
        assert_eq!(
            e.snapshot().await.unwrap().state.count,
            10,
            "everything acknowledged is there"
        );
        assert_eq!(
            e.ask(add("after")).await.unwrap().kind(),
            keystead::OutcomeKind::Applied
        );
        rt.shutdown().await;
    });
}
}

/// Run as a child process by `a_reply_whose_first_run_never_became_durable_is_no_duplicate`:
/// asks with ids on the full disk at `KEYSTEAD_POISON_DB` until one is refused, then sends
/// that id again and reads the entity. Prints what it saw and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_poison_then_resend() {
    let Ok(path) = std::env::var("KEYSTEAD_POISON_DB") else {
        return;
    };
    let rt = open_for_filling(&path);
    let e = rt.entity::<TallyEntity>("big");
    let mut refused = None;
    for i in 0..400 {
        let id = format!("m{i}");
        if let Err(err) = e
            .ask(add(format!("{i:06}-{}", "x".repeat(32 * 1024))))
            .id(id.clone())
            .await
        {
            refused = Some((id, err));
            break;
        }
    }
    let (id, err) = refused.expect("the disk never filled up");
    println!("refused={id}: {err}");
    // The refused ask may have been applied in memory before its flush failed: its dedup
    // record is then readable, but it never became durable, so it must not be answered as
    // a duplicate (the caller was told it failed), and no read may show it.
    let again = e.ask(add("again")).id(id.clone()).await;
    println!(
        "resend={}",
        match &again {
            Ok(outcome) if outcome.is_duplicate() => "duplicate",
            Ok(_) => "ok",
            Err(SubmitError::Storage {
                source: StoreError::Poisoned { .. },
                ..
            }) => "poisoned",
            Err(_) => "other-error",
        }
    );
    println!(
        "snapshot={}",
        match e.snapshot().await {
            Ok(snap) => format!("revision {}", snap.revision),
            Err(SubmitError::Storage {
                source: StoreError::Poisoned { .. },
                ..
            }) => "poisoned".into(),
            Err(other) => format!("error {other}"),
        }
    );
    rt.close_now();
}

on_each_backend_in_turn! {
/// Issue 10: if the committer applies a batch and then its flush fails (a full disk), a
/// resend of that batch's ask would find the dedup record in memory and could answer
/// "duplicate" with a reply whose first run never became durable (its caller was told it
/// failed), and a snapshot could show that state. The refused id must come back as an
/// error, and no read may show it. (On these engines a full tmpfs fails the apply itself,
/// so this guards the outcome; `store::tests` hold the apply-then-failed-flush window open.
/// It also caught a sled read failing with ENOSPC before any commit did, after which the
/// unpoisoned store's close hung in sled's flush.)
#[test]
fn a_reply_whose_first_run_never_became_durable_is_no_duplicate() {
    let _serial = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
    let disk = Tmpfs::mount("4m");
    let stdout = run_child(
        "child_poison_then_resend",
        "KEYSTEAD_POISON_DB",
        &disk.path.join("db"),
    );
    let seen = |what: &str| {
        stdout
            .lines()
            .find_map(|l| l.split_once(&format!("{what}=")).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| panic!("the child reports {what}:\n{stdout}"))
    };
    let refused = seen("refused");
    eprintln!("{:?}: refused {refused}; resend {}; snapshot {}", backend(), seen("resend"), seen("snapshot"));
    // Asks m0..m{n-1} were acknowledged (revision n); m{n} was refused.
    let acknowledged: u64 = refused[1..refused.find(':').unwrap()].parse().unwrap();
    let resend = seen("resend");
    assert!(resend == "poisoned" || resend == "other-error", "the refused ask came back as {resend}:\n{stdout}");
    let snapshot = seen("snapshot");
    assert!(
        snapshot == "poisoned" || snapshot.starts_with("error") || snapshot == format!("revision {acknowledged}"),
        "a snapshot showed the refused ask: {snapshot} after {acknowledged} acknowledged:\n{stdout}"
    );
}
}
