//! Effects throughput: 64 senders ask on 10,000 keys for N seconds; each applied message
//! records one effect with a no-op executor. Prints asks/s and effects done/s (counted
//! until every effect is done). Used to A/B the effect workers' gate (issue 11).
//!
//! ```text
//! cargo run --release --example effects_rate -- 6
//! ```
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystead::{
    Context, Effect, EffectContext, EffectError, Entity, Executor, Failure, FailureKind, Feedback,
    Runtime,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("never")]
struct Never;
impl Failure for Never {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}
struct Item;
#[derive(Debug, Serialize, Deserialize)]
struct Touch;
impl Effect for Touch {
    const NAME: &'static str = "touch";
    type Origin = Item;
}
impl Entity for Item {
    const NAME: &'static str = "item";
    type State = u64;
    type Command = u8;
    type Reply = u64;
    type Error = Never;
    fn handle(s: &mut u64, _: &u8, ctx: &mut Context<'_>) -> Result<u64, Never> {
        *s += 1;
        ctx.effect(Touch);
        Ok(*s)
    }
}
struct Noop;
impl Executor<Touch> for Noop {
    fn execute(&self, _: &Touch, _: &EffectContext) -> Result<Feedback<Touch>, EffectError> {
        Ok(None)
    }
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(6.0);
    let dir = tempfile::tempdir_in(".").unwrap();
    let rt = Arc::new(
        Runtime::builder(dir.path())
            .register::<Item>()
            .executor::<Touch>(Noop)
            .open()
            .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..64u64)
        .map(|s| {
            let (rt, stop, sent) = (rt.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut k = s;
                while !stop.load(Ordering::Relaxed) {
                    k = k
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    rt.entity::<Item>(format!("item-{:011}", (k >> 33) % 10_000))
                        .ask(1)
                        .await
                        .unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    rt.idle().await;
    let elapsed = started.elapsed().as_secs_f64();
    let stats = rt.stats();
    println!(
        "asks/s={:.0} effects_done/s={:.0} (effects {} of {} asks, {:.1} s)",
        sent.load(Ordering::Relaxed) as f64 / elapsed,
        stats.effects_done as f64 / elapsed,
        stats.effects_done,
        sent.load(Ordering::Relaxed),
        elapsed
    );
}
