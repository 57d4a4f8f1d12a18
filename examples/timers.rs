//! Delayed messages, measured (issue 13): how late a timer is delivered when 10,000 fall due
//! in the same second, and what 100,000 pending timers cost in memory.
//!
//! `cargo run --release --example timers [TIMERS] [PENDING]` (defaults 10000 and 100000).
//! Real clock (`SystemClock`), sled, release build. Lateness is the handler's clock reading
//! minus the due time: the firer's wake-up, the move into the inbox (1,024 per batch), the
//! lane feeder and the entity's commit, all included. Memory is VmRSS from /proc, before and
//! after accepting the pending timers (due an hour later, so none fires).

use std::time::{Duration, Instant};

use keystead::{Context, Entity, Failure, FailureKind, Runtime};
use serde::{Deserialize, Serialize};

#[path = "support/proc.rs"]
mod proc;
use proc::status_kib;

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("never")]
struct Never;
impl Failure for Never {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}

/// Records how late its one message arrived.
struct Probe;
impl Entity for Probe {
    const NAME: &'static str = "probe";
    type State = Option<u64>;
    type Command = u64;
    type Reply = ();
    type Error = Never;
    fn handle(late: &mut Option<u64>, due_ms: &u64, ctx: &mut Context<'_>) -> Result<(), Never> {
        *late = Some(ctx.now_ms().saturating_sub(*due_ms));
        Ok(())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let timers: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let pending: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir()?;
    let rt = Runtime::builder(dir.path()).register::<Probe>().open()?;

    // 1. Accuracy: `timers` timers due over one second, starting 3 s from now (time to send
    //    them all first), each to its own entity.
    let start = now_ms() + 3_000;
    let sent = Instant::now();
    let mut sends = Vec::new();
    for i in 0..timers {
        let due = start + i * 1_000 / timers.max(1);
        let probe = rt.entity::<Probe>(format!("p-{i}"));
        sends.push(tokio::spawn(async move {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(due);
            probe.tell(due).id("probe").at(at).await.map(|_| ())
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
    println!(
        "accepted {timers} delayed messages in {:.2} s",
        sent.elapsed().as_secs_f64()
    );
    rt.wait_until(|s| s.applied >= timers).await;
    let mut late = Vec::with_capacity(timers as usize);
    for i in 0..timers {
        let state = rt.entity::<Probe>(format!("p-{i}")).snapshot().await?.state;
        late.push(state.ok_or("a probe never arrived")?);
    }
    late.sort_unstable();
    let pct = |p: f64| late[((late.len() as f64 - 1.0) * p) as usize];
    println!(
        "{timers} timers due within one second: late p50 {} ms, p99 {} ms, max {} ms",
        pct(0.5),
        pct(0.99),
        late.last().copied().unwrap_or(0)
    );

    // 2. Memory: `pending` timers due in an hour.
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
