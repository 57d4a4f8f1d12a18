//! Delayed messages, measured (issue 13): how late a timer is delivered when 10,000 fall due
//! in the same second, and what 100,000 pending timers cost in memory.
//!
//! `cargo run --release --example timers [TIMERS] [PENDING] [sled|fjall]` (defaults 10000,
//! 100000, sled). Real clock (`SystemClock`), release build. Lateness is the handler's
//! clock reading minus the due time: the firer's wake-up, the move into the inbox (1,024 per
//! batch), the lane feeder and the entity's commit, all included. Memory is VmRSS from
//! /proc, before and after accepting the pending timers (due an hour later, so none fires).

use std::time::{Duration, Instant};

use keystead::{Backend, Runtime};

#[path = "support/item.rs"]
#[allow(dead_code)] // only its `Never`
mod item;
#[path = "support/proc.rs"]
mod proc;
#[path = "support/timers.rs"]
mod timers;
use proc::status_kib;
use timers::{lateness, Error, Probe};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let timers: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let pending: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let backend = match args.next().as_deref() {
        None | Some("sled") => Backend::Sled,
        Some("fjall") => Backend::Fjall,
        Some(other) => return Err(format!("unknown engine {other:?}: sled or fjall").into()),
    };

    // 1. Accuracy: `timers` timers due over one second, starting 3 s from now (time to send
    //    them all first), each to its own entity.
    let dir = tempfile::tempdir()?;
    let builder = Runtime::builder(dir.path()).backend(backend);
    let (late, accepted_in) = lateness(builder, timers, Duration::from_secs(3), false).await?;
    println!(
        "{}: accepted {timers} delayed messages in {:.2} s",
        backend.name(),
        accepted_in.as_secs_f64()
    );
    let pct = |p: f64| late[((late.len() as f64 - 1.0) * p) as usize];
    println!(
        "{timers} timers due within one second: late p50 {} ms, p99 {} ms, max {} ms",
        pct(0.5),
        pct(0.99),
        late.last().copied().unwrap_or(0)
    );

    // The same burst without timers: plain tells sent at their due times.
    let dir = tempfile::tempdir()?;
    let builder = Runtime::builder(dir.path()).backend(backend);
    let (plain, _) = lateness(builder, timers, Duration::from_secs(3), true).await?;
    let pct = |p: f64| plain[((plain.len() as f64 - 1.0) * p) as usize];
    println!(
        "the same burst as plain tells sent when due: late p50 {} ms, p99 {} ms, max {} ms",
        pct(0.5),
        pct(0.99),
        plain.last().copied().unwrap_or(0)
    );

    // 2. Memory: `pending` timers due in an hour, on a fresh runtime.
    let dir = tempfile::tempdir()?;
    let rt = Runtime::builder(dir.path())
        .backend(backend)
        .register::<Probe>()
        .open()?;
    let before = status_kib("VmRSS:");
    let sent = Instant::now();
    let due = std::time::SystemTime::now() + Duration::from_secs(3600);
    let mut sends = Vec::new();
    for i in 0..pending {
        let probe = rt.entity::<Probe>(format!("q-{i}"));
        sends.push(tokio::spawn(async move {
            probe.tell(0).id("later").at(due).await.map(|_| ())
        }));
        if sends.len() == 64 {
            for s in sends.drain(..) {
                s.await??;
            }
        }
    }
    for s in sends {
        s.await??;
    }
    let after = status_kib("VmRSS:");
    println!(
        "{pending} pending timers accepted in {:.1} s ({:.0}/s); RSS {} MiB before, {} MiB after (+{} MiB), peak {} MiB; timers_pending {}",
        sent.elapsed().as_secs_f64(),
        pending as f64 / sent.elapsed().as_secs_f64(),
        before / 1024,
        after / 1024,
        after.saturating_sub(before) / 1024,
        status_kib("VmHWM:") / 1024,
        rt.stats().timers_pending
    );
    rt.shutdown().await;
    Ok(())
}
