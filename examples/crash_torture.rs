//! Kill -9 crash torture: a workload in a child process is killed at seeded random moments
//! (a third of them inside `Runtime::open`), restarted on the same directory, and finally
//! checked from the data alone. Exits non-zero if anything acknowledged was lost, applied
//! twice, or had its effect performed twice.
//!
//! ```text
//! cargo run --release --example crash_torture -- --kills 1000 [--backend sled|fjall] [--seed N] [--dir PATH] [--max-life-ms 400]
//! ```

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
    let (dir, _temp) = torture::work_dir(get("--dir").map(Into::into));
    println!(
        "crash torture: backend={} kills={kills} seed={seed} max_life_ms={} dir={}",
        backend.name(),
        max_life.as_millis(),
        dir.display()
    );
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let report = tokio.block_on(torture::torture(
        &dir,
        kills,
        seed,
        max_life,
        &torture::spawner(Vec::new()),
        backend,
    ));
    report.print();
    if !report.ok() {
        eprintln!(
            "FAILED. Replay: cargo run --release --example crash_torture -- --backend {} --kills {kills} --seed {seed} --max-life-ms {}",
            backend.name(),
            max_life.as_millis()
        );
        std::process::exit(1);
    }
}
