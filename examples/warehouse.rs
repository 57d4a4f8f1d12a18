//! Many entities at once (issue 14): a batch upsert of 1,000 products answered in the
//! caller's order, then stock transfers between warehouses racing each other, as atomic
//! transactions, on a real database on disk.
//!
//! ```text
//! cargo run --release --example warehouse             # the database goes to target/warehouse-db
//! cargo run --release --example warehouse -- /tmp/db  # choose the directory (emptied first)
//! ```
//!
//! Four warehouses hold stock of 20 products. 16 movers move stock between random pairs
//! of warehouses, half of them naming the two in the opposite order (the lock-ordering
//! seed's recipe for a deadlock), some with an expected revision read just before (so a
//! concurrent move makes theirs a `Conflict`). Every move changes two warehouses or none;
//! the total stock of each product never changes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use keystead::{
    Context, Entity, Failure, FailureKind, Members, OutcomeKind, Runtime, SubmitError, Transaction,
    TxContext,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------
// What a user writes.

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("never")]
struct Never;
impl Failure for Never {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}

/// A product of the catalog.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Product {
    name: String,
    price_cents: u64,
}
impl Entity for Product {
    const NAME: &'static str = "product";
    type State = Product;
    type Command = Product;
    type Reply = String;
    type Error = Never;
    fn handle(p: &mut Product, new: &Product, ctx: &mut Context<'_>) -> Result<String, Never> {
        *p = new.clone();
        Ok(format!("{}@r{}", ctx.key(), ctx.revision() + 1))
    }
}

/// A warehouse: stock per product.
struct Warehouse;
impl Entity for Warehouse {
    const NAME: &'static str = "warehouse";
    type State = BTreeMap<String, u64>;
    type Command = (String, u64); // receive a delivery
    type Reply = u64;
    type Error = Never;
    fn handle(
        stock: &mut BTreeMap<String, u64>,
        (sku, n): &(String, u64),
        _: &mut Context<'_>,
    ) -> Result<u64, Never> {
        *stock.entry(sku.clone()).or_default() += n;
        Ok(stock[sku])
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Move {
    from: String,
    to: String,
    sku: String,
    qty: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("only {0} in stock")]
struct Short(u64);
impl Failure for Short {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}

/// Moves stock between two warehouses: both change, or neither.
struct MoveStock;
impl Transaction for MoveStock {
    const NAME: &'static str = "move-stock";
    type Command = Move;
    type Reply = ();
    type Error = Short;
    fn members(m: &Move) -> Members {
        Members::new()
            .with::<Warehouse>(&m.from)
            .with::<Warehouse>(&m.to)
    }
    fn handle(m: &Move, tx: &mut TxContext<'_>) -> Result<(), Short> {
        let have = tx
            .state::<Warehouse>(&m.from)
            .get(&m.sku)
            .copied()
            .unwrap_or(0);
        if have < m.qty {
            return Err(Short(have));
        }
        *tx.state_mut::<Warehouse>(&m.from)
            .entry(m.sku.clone())
            .or_default() -= m.qty;
        *tx.state_mut::<Warehouse>(&m.to)
            .entry(m.sku.clone())
            .or_default() += m.qty;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The run.

const PRODUCTS: usize = 1_000;
const WAREHOUSES: u64 = 4;
const STOCKED: u64 = 20;
const MOVERS: u64 = 16;
const MOVES_EACH: u64 = 500;

fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn total_stock(rt: &Runtime) -> Result<BTreeMap<String, u64>, SubmitError> {
    let mut total = BTreeMap::new();
    for w in 0..WAREHOUSES {
        for (sku, n) in rt
            .entity::<Warehouse>(format!("wh-{w}"))
            .snapshot()
            .await?
            .state
        {
            *total.entry(sku).or_default() += n;
        }
    }
    Ok(total)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| "target/warehouse-db".into(), std::path::PathBuf::from);
    let _ = std::fs::remove_dir_all(&dir);
    let rt = Arc::new(
        Runtime::builder(&dir)
            .register::<Product>()
            .register::<Warehouse>()
            .transaction::<MoveStock>()
            .open()?,
    );
    println!("warehouse on {}", dir.display());

    // 1. A batch upsert of 1,000 products, built in descending SKU order: keystead
    //    dispatches it in its own global order, and answers in ours.
    let started = Instant::now();
    let mut batch = rt.ask_batch();
    let answers: Vec<_> = (0..PRODUCTS)
        .rev()
        .map(|i| {
            let sku = format!("sku-{i:04}");
            let product = Product {
                name: format!("Lamp {i}"),
                price_cents: 1_000 + i as u64,
            };
            (
                sku.clone(),
                batch.push(
                    rt.entity::<Product>(sku.clone())
                        .ask(product)
                        .id(format!("upsert-{sku}")),
                ),
            )
        })
        .collect();
    let mut results = batch.send().await;
    let mut references = Vec::new();
    for (sku, answer) in answers {
        let reference = results.take(answer)?.reply().cloned().unwrap_or_default();
        assert!(
            reference.starts_with(&sku),
            "answers come in the caller's order"
        );
        references.push(reference);
    }
    println!(
        "upserted {PRODUCTS} products in {:.0} ms; references in the caller's order: {}, {}, ... {}",
        started.elapsed().as_secs_f64() * 1000.0,
        references[0],
        references[1],
        references[PRODUCTS - 1]
    );

    // 2. Stock: every warehouse receives 1,000 of each of 20 products, in one tell batch.
    let mut deliveries = rt.tell_batch();
    for w in 0..WAREHOUSES {
        for s in 0..STOCKED {
            deliveries.push(
                rt.entity::<Warehouse>(format!("wh-{w}"))
                    .tell((format!("sku-{s:04}"), 1_000))
                    .id(format!("delivery-{w}-{s}")),
            );
        }
    }
    deliveries.send().await?;
    rt.idle().await;
    let before = total_stock(&rt).await?;

    // 3. Movers race each other.
    let (applied, short, conflicts) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let started = Instant::now();
    let mut movers = Vec::new();
    for m in 0..MOVERS {
        let (rt, applied, short, conflicts) = (
            rt.clone(),
            applied.clone(),
            short.clone(),
            conflicts.clone(),
        );
        movers.push(tokio::spawn(async move {
            let mut seed = m + 1;
            for i in 0..MOVES_EACH {
                let a = next(&mut seed) % WAREHOUSES;
                let b = (a + 1 + next(&mut seed) % (WAREHOUSES - 1)) % WAREHOUSES;
                // Half the movers name the pair in the opposite order.
                let (from, to) = if m % 2 == 0 { (a, b) } else { (b, a) };
                let mv = Move {
                    from: format!("wh-{from}"),
                    to: format!("wh-{to}"),
                    sku: format!("sku-{:04}", next(&mut seed) % STOCKED),
                    qty: next(&mut seed) % 400 + 1,
                };
                let mut tx = rt
                    .transaction::<MoveStock>(mv.clone())
                    .id(format!("move-{m}-{i}"));
                if m % 4 == 3 {
                    // Optimistic: only if the source has not changed since we looked.
                    let seen = rt
                        .entity::<Warehouse>(mv.from.clone())
                        .snapshot()
                        .await
                        .expect("read")
                        .revision;
                    tx = tx.expect_revision::<Warehouse>(mv.from.clone(), seen);
                }
                match tx.await {
                    Ok(o) if o.kind() == OutcomeKind::Applied => {
                        applied.fetch_add(1, Ordering::Relaxed)
                    }
                    Ok(_) => short.fetch_add(1, Ordering::Relaxed),
                    Err(SubmitError::Conflict { .. }) => conflicts.fetch_add(1, Ordering::Relaxed),
                    Err(e) => panic!("move failed: {e}"),
                };
            }
        }));
    }
    for mover in movers {
        mover.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    rt.idle().await;
    let after = total_stock(&rt).await?;
    let (applied, short, conflicts) = (
        applied.load(Ordering::Relaxed),
        short.load(Ordering::Relaxed),
        conflicts.load(Ordering::Relaxed),
    );
    println!(
        "{} moves from {MOVERS} movers in {secs:.1} s ({:.0}/s): {applied} applied, {short} refused for short stock, {conflicts} conflicts (a concurrent move changed the source); every move finished (no deadlock)",
        MOVERS * MOVES_EACH,
        (MOVERS * MOVES_EACH) as f64 / secs
    );
    let conserved = before == after;
    println!(
        "total stock of {STOCKED} products across {WAREHOUSES} warehouses: {} before, {} after: {}",
        before.values().sum::<u64>(),
        after.values().sum::<u64>(),
        if conserved {
            "conserved, product by product"
        } else {
            "NOT CONSERVED"
        }
    );
    for w in 0..WAREHOUSES {
        let snap = rt.entity::<Warehouse>(format!("wh-{w}")).snapshot().await?;
        println!(
            "  wh-{w}: revision {}, {} units of sku-0000",
            snap.revision,
            snap.state.get("sku-0000").copied().unwrap_or(0)
        );
    }
    if let Ok(rt) = Arc::try_unwrap(rt) {
        rt.shutdown().await;
    }
    if !conserved {
        return Err("stock was not conserved".into());
    }
    Ok(())
}
