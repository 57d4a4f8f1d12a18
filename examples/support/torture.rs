//! The crash torture harness, shared by `examples/crash_torture.rs` and
//! `tests/crash_torture.rs`.
//!
//! A child process runs a workload on a real sled directory: concurrent `tell`s and `ask`s
//! with ids and versions, resends of acknowledged ids, retryable failures, and one effect
//! per applied message performed by a provider that honours idempotency keys. Every
//! acknowledgement is appended to a side file and fsynced before the next send. The parent
//! kills the child with SIGKILL at seeded random moments (some inside `Runtime::open`),
//! restarts it on the same directory, and after the last kill drains and checks, from the
//! data alone: nothing acknowledged lost, nothing applied twice, versions never regressed,
//! no effect performed twice per effect key, the inbox empty, every record decodable.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keystead::{
    Context, Effect, EffectContext, EffectError, Entity, Executor, Failure, FailureKind, Feedback,
    Outcome, Recorded, RetryPolicy, Runtime,
};
use serde::{Deserialize, Serialize};

/// The environment variable that puts a process in child mode; its value is the directory.
pub const CHILD_ENV: &str = "KEYSTEAD_TORTURE_DIR";
/// The environment variable carrying the child's run number (makes its ids unique).
pub const RUN_ENV: &str = "KEYSTEAD_TORTURE_RUN";
/// Keys the workload spreads over.
pub const KEYS: u64 = 20;
/// Concurrent senders in the child.
pub const SENDERS: u64 = 8;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// Message ids applied, in order.
    pub applied: Vec<String>,
    /// Applied messages whose version was not above the entity's (must stay 0).
    pub regressions: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("transient failure")]
pub struct Transient;
impl Failure for Transient {
    fn kind(&self) -> FailureKind {
        FailureKind::Retryable
    }
}

pub struct LedgerEntity;
impl Entity for LedgerEntity {
    const NAME: &'static str = "ledger";
    type State = Ledger;
    type Command = ();
    type Reply = u64;
    type Error = Transient;
    fn handle(s: &mut Ledger, _: &(), ctx: &mut Context<'_>) -> Result<u64, Transient> {
        // One message in ten fails its first attempt: retries run under the kills too.
        if ctx.attempt() == 1 && ctx.message_id().len() % 10 == 3 {
            return Err(Transient);
        }
        if let (Some(incoming), Some(current)) = (ctx.message_version(), ctx.version()) {
            if incoming <= current {
                s.regressions += 1;
            }
        }
        s.applied.push(ctx.message_id().to_string());
        ctx.effect(Post);
        Ok(s.applied.len() as u64)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Post;
impl Effect for Post {
    const NAME: &'static str = "post";
    type Origin = LedgerEntity;
}

/// A provider that honours idempotency keys: it performs a key once, appending it to its
/// ledger file (fsynced), and absorbs repeats.
pub struct Provider {
    seen: Mutex<(HashSet<String>, File)>,
}

impl Provider {
    pub fn open(path: &Path) -> Self {
        let seen = read_lines(path).into_iter().collect();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("provider ledger");
        Self {
            seen: Mutex::new((seen, file)),
        }
    }
}

impl Executor<Post> for Provider {
    fn execute(&self, _: &Post, ctx: &EffectContext) -> Result<Feedback<Post>, EffectError> {
        let key = ctx.effect_key().to_string();
        let mut guard = self
            .seen
            .lock()
            .map_err(|_| EffectError::retryable("poisoned"))?;
        if guard.0.contains(&key) {
            return Ok(None); // a repeat after a crash: absorbed by the key
        }
        append_line(&mut guard.1, &key).map_err(EffectError::retryable)?;
        guard.0.insert(key);
        Ok(None)
    }
}

/// Opens `path` for appending, first ending a torn last line (the process died inside a
/// write) so the next record starts on a line of its own.
pub fn open_log(path: &Path) -> File {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .expect("log file");
    let torn = std::fs::read(path)
        .map(|b| b.last().is_some_and(|c| *c != b'\n'))
        .unwrap_or(false);
    if torn {
        file.write_all(b"\n").expect("log repair");
    }
    file
}

/// Appends one record as a single write (a kill cannot split it), then fsyncs.
pub fn append_line(file: &mut File, line: &str) -> std::io::Result<()> {
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_data()
}

/// Lines of a file; a torn last line (no newline: the process died mid-write) is dropped.
pub fn read_lines(path: &Path) -> Vec<String> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if line.ends_with('\n') {
            out.push(line.trim_end().to_string());
        }
        line.clear();
    }
    out
}

/// The engine the run uses: the one recorded in the database directory (`torture` records
/// it before the first child starts), so parent and children agree without a flag.
fn backend_of(dir: &Path) -> keystead::Backend {
    match std::fs::read_to_string(dir.join("db").join("keystead.backend")).as_deref() {
        Ok(name) if name.trim() == "fjall" => keystead::Backend::Fjall,
        _ => keystead::Backend::Sled,
    }
}

pub fn runtime(dir: &Path) -> Result<Runtime, keystead::OpenError> {
    Runtime::builder(dir.join("db"))
        .backend(backend_of(dir))
        .shards(2)
        .retry(
            RetryPolicy::default()
                .attempts_max(5)
                .backoff_initial(Duration::from_millis(1))
                .backoff_max(Duration::from_millis(5)),
        )
        .effect_retry(
            RetryPolicy::default()
                .attempts_max(1000)
                .backoff_initial(Duration::from_millis(1))
                .backoff_max(Duration::from_millis(5)),
        )
        .register::<LedgerEntity>()
        .executor::<Post>(Provider::open(&dir.join("provider.log")))
        .open()
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Child mode: sends until killed (or `limit` messages per sender in drain runs: 0).
pub async fn child(dir: &Path, run: u64, per_sender: u64) {
    let rt = runtime(dir).expect("open");
    let acks = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("acks.log"))
            .expect("acks"),
    ));
    let versions: Arc<Vec<AtomicU64>> =
        Arc::new((0..KEYS).map(|_| AtomicU64::new(run << 32)).collect());
    let tasks: Vec<_> = (0..SENDERS)
        .map(|s| {
            let refs: Vec<_> = (0..KEYS)
                .map(|k| rt.entity::<LedgerEntity>(format!("k{k}")))
                .collect();
            let (acks, versions) = (acks.clone(), versions.clone());
            tokio::spawn(async move {
                let mut rng = run.wrapping_mul(1_000_003) ^ s;
                let mut sent: Vec<(u64, String)> = Vec::new();
                for i in 0..per_sender {
                    let roll = splitmix(&mut rng);
                    let k = roll % KEYS;
                    let (k, id) = if roll.is_multiple_of(10) && !sent.is_empty() {
                        // Resend an acknowledged id: must come back as a duplicate.
                        sent[(roll as usize / 10) % sent.len()].clone()
                    } else {
                        (k, format!("r{run}-s{s}-m{i}"))
                    };
                    let version = versions[k as usize].fetch_add(1, Ordering::SeqCst) + 1;
                    let e = &refs[k as usize];
                    let ok = if roll.is_multiple_of(3) {
                        e.ask(()).id(id.clone()).version(version).await.is_ok()
                    } else {
                        e.tell(()).id(id.clone()).version(version).await.is_ok()
                    };
                    if ok {
                        let mut f = acks.lock().expect("acks lock");
                        append_line(&mut f, &format!("k{k} {id}")).expect("ack write");
                        sent.push((k, id));
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    rt.idle().await;
    rt.shutdown().await;
}

/// What the parent found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub kills: u64,
    pub kills_early: u64,
    /// Children that exited with an error before being killed (e.g. a database that no
    /// longer opens: "bricked").
    pub child_failures: u64,
    pub acknowledged: u64,
    pub applied: u64,
    pub duplicates_suppressed: u64,
    pub stale_dropped: u64,
    pub lost: u64,
    pub double_applied: u64,
    pub version_regressions: u64,
    pub effects_missing: u64,
    pub effects_double_run: u64,
    pub inbox_left: u64,
    pub seconds: f64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.child_failures == 0
            && self.double_applied == 0
            && self.version_regressions == 0
            && self.effects_missing == 0
            && self.effects_double_run == 0
            && self.inbox_left == 0
    }

    pub fn print(&self) {
        let rows: [(&str, String); 14] = [
            ("kills (SIGKILL)", self.kills.to_string()),
            (
                "  of which within 60 ms of start (inside open)",
                self.kills_early.to_string(),
            ),
            ("BRICKED / failed starts", self.child_failures.to_string()),
            ("messages acknowledged", self.acknowledged.to_string()),
            ("acknowledged and applied", self.applied.to_string()),
            (
                "duplicates suppressed (resent ids)",
                self.duplicates_suppressed.to_string(),
            ),
            (
                "stale dropped (reordered versions)",
                self.stale_dropped.to_string(),
            ),
            (
                "LOST (acknowledged, never processed)",
                self.lost.to_string(),
            ),
            ("DOUBLE-APPLIED", self.double_applied.to_string()),
            ("version regressions", self.version_regressions.to_string()),
            ("effects missing", self.effects_missing.to_string()),
            (
                "EFFECTS DOUBLE-RUN (same key performed twice)",
                self.effects_double_run.to_string(),
            ),
            ("inbox entries left", self.inbox_left.to_string()),
            ("seconds", format!("{:.1}", self.seconds)),
        ];
        println!("{:<48} {:>10}", "crash torture", "value");
        println!("{}", "-".repeat(59));
        for (name, value) in rows {
            println!("{name:<48} {value:>10}");
        }
    }
}

/// Parent mode: `kills` cycles of spawn + SIGKILL at a seeded moment, then a drain run
/// and the checks. `spawn` starts a child for run number `run` on `dir`.
pub async fn torture(
    dir: &Path,
    kills: u64,
    seed: u64,
    max_life: Duration,
    spawn: &dyn Fn(&Path, u64, u64) -> Child,
    backend: keystead::Backend,
) -> Report {
    // Record the engine before the first child opens the directory (see `backend_of`).
    let db = dir.join("db");
    std::fs::create_dir_all(&db).expect("database directory");
    std::fs::write(db.join("keystead.backend"), format!("{}\n", backend.name()))
        .expect("record the engine");
    let started = Instant::now();
    let mut rng = seed;
    let mut report = Report::default();
    for run in 0..kills {
        let roll = splitmix(&mut rng);
        // A third of the kills land in the first 60 ms: inside Runtime::open.
        let life_ms = if roll.is_multiple_of(3) {
            roll % 60
        } else {
            roll % (max_life.as_millis() as u64).max(1)
        };
        let mut child = spawn(dir, run, u64::MAX);
        // The delay is the fault being injected (when to kill), not synchronisation.
        std::thread::sleep(Duration::from_millis(life_ms));
        if let Ok(Some(status)) = child.try_wait() {
            if !status.success() {
                eprintln!("run {run}: the child failed on its own: {status:?}");
                report.child_failures += 1;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        report.kills += 1;
        if life_ms < 60 {
            report.kills_early += 1;
        }
    }
    // A last, uninterrupted run drains everything (and sends nothing).
    let status = spawn(dir, kills, 0).wait().expect("drain child");
    assert!(status.success(), "the drain run failed: {status:?}");
    verify(dir, &mut report).await;
    report.seconds = started.elapsed().as_secs_f64();
    report
}

async fn verify(dir: &Path, report: &mut Report) {
    let rt = runtime(dir).expect("open for verification");
    rt.idle().await;
    report.inbox_left = rt.inbox_len().expect("inbox");
    let acked: Vec<(String, String)> = read_lines(&dir.join("acks.log"))
        .into_iter()
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(k, id)| (k.to_string(), id.to_string()))
        })
        .collect();
    report.acknowledged = acked.len() as u64;
    let mut states: HashMap<String, Ledger> = HashMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let snap = rt
            .entity::<LedgerEntity>(key.as_str())
            .snapshot()
            .expect("state decodes");
        report.version_regressions += snap.state.regressions;
        let distinct: HashSet<&String> = snap.state.applied.iter().collect();
        report.double_applied += (snap.state.applied.len() - distinct.len()) as u64;
        states.insert(key, snap.state);
    }
    let mut seen_ack: HashSet<(String, String)> = HashSet::new();
    for (key, id) in acked {
        if !seen_ack.insert((key.clone(), id.clone())) {
            report.duplicates_suppressed += 1; // a resend, acknowledged again
            continue;
        }
        // Resending with the same id returns the stored first outcome, or runs it if lost.
        match rt
            .entity::<LedgerEntity>(key.as_str())
            .ask(())
            .id(id.clone())
            .await
        {
            Ok(Outcome::Duplicate {
                first: Recorded::Applied { .. },
            }) => report.applied += 1,
            Ok(Outcome::Duplicate {
                first: Recorded::Stale { .. },
            }) => report.stale_dropped += 1,
            Ok(other) => {
                eprintln!("LOST: {key} {id}: {other:?}");
                report.lost += 1;
            }
            Err(e) => {
                eprintln!("LOST: {key} {id}: {e}");
                report.lost += 1;
            }
        }
    }
    rt.idle().await;
    // Effects: every applied message's effect performed exactly once at the provider.
    let performed = read_lines(&dir.join("provider.log"));
    let mut counts: HashMap<String, u64> = HashMap::new();
    for key in performed {
        *counts.entry(key).or_default() += 1;
    }
    report.effects_double_run = counts.values().filter(|n| **n > 1).count() as u64;
    for (key, state) in &states {
        for id in &state.applied {
            if !counts.contains_key(&format!("ledger/{key}/{id}/0")) {
                let effect_key = keystead::EffectKey::new("ledger", key.as_str(), id.as_str(), 0);
                eprintln!("EFFECT MISSING: {effect_key}: {:?}", rt.effect(&effect_key));
                report.effects_missing += 1;
            }
        }
    }
    rt.dead_letters::<LedgerEntity>()
        .expect("dead letters decode");
    rt.shutdown().await;
}

/// The directory to use: `--dir` or a fresh temporary one.
pub fn work_dir(arg: Option<PathBuf>) -> (PathBuf, Option<tempfile::TempDir>) {
    match arg {
        Some(p) => {
            std::fs::create_dir_all(&p).expect("dir");
            (p, None)
        }
        None => {
            let t = tempfile::tempdir().expect("tempdir");
            (t.path().to_path_buf(), Some(t))
        }
    }
}

/// Spawns this executable in child mode with `args` prepended (the test harness needs
/// its filter arguments).
pub fn spawner(args: Vec<String>) -> impl Fn(&Path, u64, u64) -> Child {
    move |dir, run, per_sender| {
        Command::new(std::env::current_exe().expect("exe"))
            .args(&args)
            .env(CHILD_ENV, dir)
            .env(RUN_ENV, format!("{run}:{per_sender}"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn child")
    }
}

/// In child mode, runs the child and returns true.
pub fn run_child_if_asked() -> bool {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let spec = std::env::var(RUN_ENV).unwrap_or_default();
    let (run, per_sender) = spec.split_once(':').unwrap_or(("0", "0"));
    let run: u64 = run.parse().unwrap_or(0);
    let per_sender: u64 = per_sender.parse().unwrap_or(0);
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    tokio.block_on(child(Path::new(&dir), run, per_sender));
    true
}
