//! Kill -9 crash torture: a workload in a child process is killed at seeded random moments
//! (a third of them inside `Runtime::open`), restarted on the same directory, and finally
//! checked from the data alone. Exits non-zero if anything acknowledged was lost (sync
//! mode), applied twice, shown by a snapshot and then taken back (sync mode), or had its
//! effect performed twice or for a lost change.
//!
//! ```text
//! cargo run --release --example crash_torture -- --kills 1000 [--backend sled|fjall] [--seed N] [--dir PATH] [--max-life-ms 400] [--relaxed-ms 20]
//! cargo run --release --example crash_torture -- --fresh 500 [--backend sled|fjall] [--seed N]
//! ```
//!
//! `--relaxed-ms N` runs with `Durability::Relaxed { flush_every: N ms }` and reports how
//! much acknowledged work the kills took back, and how long before the kill it had been
//! acknowledged. `--fresh N` kills 1 to 3 children inside the very first open of each of N
//! new directories (0-10 ms into it), then checks that each directory opens again.

#[path = "support/torture.rs"]
mod torture;

use std::time::Duration;

fn main() {
    if torture::run_child_if_asked() {
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let kills: u64 = get("--kills").map_or(100, |v| v.parse().expect("--kills N"));
    let seed: u64 = get("--seed").map_or_else(
        || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        },
        |v| v.parse().expect("--seed N"),
    );
    let max_life = Duration::from_millis(
        get("--max-life-ms").map_or(400, |v| v.parse().expect("--max-life-ms N")),
    );
    let backend = match get("--backend").as_deref() {
        None | Some("sled") => keystead::Backend::Sled,
        Some("fjall") => keystead::Backend::Fjall,
        Some(other) => panic!("--backend sled|fjall, not {other}"),
    };
    let mode = match get("--relaxed-ms") {
        None => torture::Mode::sync(backend),
        Some(ms) => torture::Mode::relaxed(
            backend,
            Duration::from_millis(ms.parse().expect("--relaxed-ms N")),
        ),
    };
    let (dir, _temp) = torture::work_dir(get("--dir").map(Into::into));
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let spawn = torture::spawner(Vec::new());
    if let Some(directories) = get("--fresh") {
        let directories: u64 = directories.parse().expect("--fresh N");
        println!(
            "fresh-directory torture: mode={} directories={directories} seed={seed} dir={}",
            mode.to_env(),
            dir.display()
        );
        let report = tokio.block_on(torture::fresh_open_torture(
            &dir,
            directories,
            seed,
            &spawn,
            mode,
        ));
        report.print();
        if !report.ok() {
            eprintln!(
                "FAILED. Replay: cargo run --release --example crash_torture -- --fresh {directories} --backend {} --seed {seed}",
                backend.name()
            );
            std::process::exit(1);
        }
        return;
    }
    println!(
        "crash torture: mode={} kills={kills} seed={seed} max_life_ms={} dir={}",
        mode.to_env(),
        max_life.as_millis(),
        dir.display()
    );
    let report = tokio.block_on(torture::torture(&dir, kills, seed, max_life, &spawn, mode));
    report.print();
    if !report.ok() {
        let relaxed = get("--relaxed-ms").map_or(String::new(), |ms| format!(" --relaxed-ms {ms}"));
        eprintln!(
            "FAILED. Replay: cargo run --release --example crash_torture -- --backend {} --kills {kills} --seed {seed} --max-life-ms {}{relaxed}",
            backend.name(),
            max_life.as_millis()
        );
        std::process::exit(1);
    }
}
