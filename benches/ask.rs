//! Micro costs of the public API on a real sled database in a temporary directory:
//! one durable `ask` round trip (new id each time), a duplicate answered from the dedup
//! store, and a durable `tell` acknowledgement.
//!
//! `cargo bench --bench ask`

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion};
use keystead::Runtime;

#[path = "../examples/support/item.rs"]
mod item;
use item::Item;

fn bench(c: &mut Criterion) {
    let tokio = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = Runtime::builder(dir.path())
        .register::<Item>()
        .open()
        .expect("open");
    let e = rt.entity::<Item>("bench-key-000001");
    let n = AtomicU64::new(0);
    tokio.block_on(async { e.ask(1).id("dup").await.expect("seed") });

    c.bench_function("ask, durable, new id", |b| {
        b.to_async(&tokio).iter(|| async {
            let id = n.fetch_add(1, Ordering::Relaxed).to_string();
            e.ask(1).id(id).await.expect("ask")
        })
    });
    c.bench_function("ask, duplicate id (answered from dedup)", |b| {
        b.to_async(&tokio)
            .iter(|| async { e.ask(1).id("dup").await.expect("ask") })
    });
    c.bench_function("tell, durable acknowledgement", |b| {
        b.to_async(&tokio)
            .iter(|| async { e.tell(1).await.expect("tell") })
    });
    tokio.block_on(async {
        rt.idle().await;
        rt.shutdown().await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
