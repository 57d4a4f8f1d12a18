//! Measures what an entity costs: RAM per live actor, RAM once actors have passivated, and
//! disk per stored entity. Prints one table.
//!
//! ```text
//! cargo run --release --example memory              # 200,000 keys
//! cargo run --release --example memory -- 1000000   # one million keys
//! ```
//! Figures come from /proc/self/status (VmRSS, VmHWM) and the database directory's size.

use std::path::Path;
use std::time::{Duration, Instant};

use keystead::Runtime;

#[path = "support/item.rs"]
mod item;
use item::Item;

#[path = "support/proc.rs"]
mod proc;
use proc::status_kib;

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Sends one message to each of `keys` keys from 64 concurrent senders. With
/// `conflict`, each message expects a revision the entity does not have: the actor is
/// activated and loads its state, but nothing is written.
async fn touch_all(rt: &Runtime, keys: u64, first: u64, conflict: bool) {
    let senders = 64;
    let tasks: Vec<_> = (0..senders)
        .map(|s| {
            let refs: Vec<_> = (0..keys)
                .filter(|k| k % senders == s)
                .map(|k| rt.entity::<Item>(format!("item-{:010}", first + k)))
                .collect();
            tokio::spawn(async move {
                for e in refs {
                    if conflict {
                        let refused = e.ask(1).expect_revision(u64::MAX).await;
                        assert!(matches!(
                            refused,
                            Err(keystead::SubmitError::Conflict { .. })
                        ));
                    } else {
                        e.ask(1).await.expect("ask");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("sender task");
    }
}

/// Phase "actors": RAM per live actor, isolated from storage (nothing is written).
async fn phase_actors(keys: u64) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir_in(".")?;
    let rt = Runtime::builder(dir.path())
        .passivate_after(Duration::from_secs(5))
        .register::<Item>()
        .open()?;
    let before = status_kib("VmRSS:");
    touch_all(&rt, keys, 0, true).await;
    let live = rt.stats().live_entities;
    let after = status_kib("VmRSS:");
    rt.wait_until(|s| s.live_entities == 0).await;
    println!("live_actors={live}");
    println!("rss_before_kib={before}");
    println!("rss_live_kib={after}");
    println!(
        "per_actor_b={:.0}",
        (after.saturating_sub(before)) as f64 * 1024.0 / live.max(1) as f64
    );
    println!("rss_after_passivation_kib={}", status_kib("VmRSS:"));
    // A second wave of new keys: the allocator keeps freed pages, so passivation shows as
    // memory being reused rather than RSS falling.
    touch_all(&rt, keys, keys, true).await;
    println!("rss_second_wave_kib={}", status_kib("VmRSS:"));
    rt.shutdown().await;
    Ok(())
}

/// Phase "stored": every key written once with a short idle timeout; disk per entity and
/// the process's peak RSS.
async fn phase_stored(keys: u64) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir_in(".")?;
    let rt = Runtime::builder(dir.path())
        .passivate_after(Duration::from_millis(50))
        .register::<Item>()
        .open()?;
    let t = Instant::now();
    touch_all(&rt, keys, 0, false).await;
    let secs = t.elapsed().as_secs_f64();
    let activations = rt.stats().activations;
    rt.wait_until(|s| s.live_entities == 0).await;
    rt.shutdown().await;
    println!("activations={activations}");
    println!("asks_per_s={:.0}", keys as f64 / secs);
    println!(
        "disk_per_entity_b={:.0}",
        dir_bytes(dir.path()) as f64 / keys as f64
    );
    println!("peak_rss_kib={}", status_kib("VmHWM:"));
    Ok(())
}

fn run_phase(phase: &str, keys: u64) -> Result<Vec<(String, String)>, Box<dyn std::error::Error>> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([phase, &keys.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "phase {phase} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("actors") => return phase_actors(args[1].parse()?).await,
        Some("stored") => return phase_stored(args[1].parse()?).await,
        _ => {}
    }
    let keys: u64 = args.first().map_or(Ok(200_000), |a| a.parse())?;
    // Each phase runs in a fresh process so that its RSS figures are its own.
    let actors = run_phase("actors", keys)?;
    let stored = run_phase("stored", keys)?;
    let get = |rows: &[(String, String)], k: &str| {
        rows.iter()
            .find(|(n, _)| n == k)
            .map_or("?".to_string(), |(_, v)| v.clone())
    };
    println!("keystead memory, {keys} keys, 200-byte state, 64 senders (release build)");
    println!("{:<62} {:>12}", "measure", "value");
    println!("{}", "-".repeat(75));
    let rows = [
        (
            "live actors (activated, nothing written)",
            get(&actors, "live_actors"),
        ),
        (
            "RSS before / with all live (KiB)",
            format!(
                "{} / {}",
                get(&actors, "rss_before_kib"),
                get(&actors, "rss_live_kib")
            ),
        ),
        (
            "RAM per live actor: actix actor, queue, map entry, state (B)",
            get(&actors, "per_actor_b"),
        ),
        (
            "RSS after every actor passivated (KiB)",
            get(&actors, "rss_after_passivation_kib"),
        ),
        (
            "RSS after a second wave of as many new keys (KiB)",
            get(&actors, "rss_second_wave_kib"),
        ),
        (
            "entities written once, 50 ms idle timeout: activations",
            get(&stored, "activations"),
        ),
        (
            "  ask rate while writing (asks/s)",
            get(&stored, "asks_per_s"),
        ),
        (
            "  disk per stored entity: state + dedup + sled overhead (B)",
            get(&stored, "disk_per_entity_b"),
        ),
        (
            "  peak RSS of that process (KiB)",
            get(&stored, "peak_rss_kib"),
        ),
    ];
    for (name, value) in rows {
        println!("{name:<62} {value:>12}");
    }
    Ok(())
}
