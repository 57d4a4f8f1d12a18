//! How long a runtime takes to reopen a directory after a clean run that wrote N entities
//! (each once, 200-byte states, 64 senders), on either engine.
//!
//! ```text
//! cargo run --release --example reopen -- 300000 fjall
//! cargo run --release --example reopen -- 300000 sled
//! ```
//!
//! fjall replays on every open the journal written since its memtable was last written
//! out, so the reopen time follows the journal's size (printed too); see
//! `docs/performance.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keystead::{Backend, Context, Entity, Failure, FailureKind, Runtime};

#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("never")]
struct Never;
impl Failure for Never {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}

struct Item;
impl Entity for Item {
    const NAME: &'static str = "item";
    type State = Vec<u8>;
    type Command = u64;
    type Reply = ();
    type Error = Never;
    fn handle(s: &mut Vec<u8>, c: &u64, _: &mut Context<'_>) -> Result<(), Never> {
        *s = vec![*c as u8; 200];
        Ok(())
    }
}

fn journal_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jnl"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args.first().map_or(Ok(100_000), |a| a.parse())?;
    let backend = match args.get(1).map(String::as_str) {
        Some("sled") => Backend::Sled,
        _ => Backend::Fjall,
    };
    let dir = tempfile::tempdir()?;
    let builder = || {
        Runtime::builder(dir.path())
            .backend(backend)
            .register::<Item>()
            .passivate_after(Duration::from_millis(50))
    };
    let rt = Arc::new(builder().open()?);
    let started = Instant::now();
    let senders: Vec<_> = (0..64u64)
        .map(|s| {
            let rt = rt.clone();
            tokio::spawn(async move {
                for i in (s..n).step_by(64) {
                    rt.entity::<Item>(format!("key-{i:08}")).ask(i).await?;
                }
                Ok::<_, keystead::SubmitError>(())
            })
        })
        .collect();
    for sender in senders {
        sender.await??;
    }
    let wrote = started.elapsed();
    Arc::try_unwrap(rt)
        .map_err(|_| "the runtime is still shared")?
        .shutdown()
        .await;
    println!(
        "{backend:?}: wrote {n} entities in {wrote:.1?}; journal {:.1} MB",
        journal_bytes(dir.path()) as f64 / 1e6
    );
    for _ in 0..3 {
        let started = Instant::now();
        let rt = builder().open()?;
        let opened = started.elapsed();
        rt.shutdown().await;
        println!("{backend:?}: reopened in {opened:.1?}");
    }
    Ok(())
}
