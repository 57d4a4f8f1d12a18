//! The second showcase: a product catalog with a fast path and a slow one, through a
//! 20-minute enrichment outage compressed to 20 seconds, on a real database on disk.
//!
//! ```text
//! cargo run --release --example catalog             # the database goes to target/catalog-db
//! cargo run --release --example catalog -- /tmp/db  # choose the directory (emptied first)
//! ```
//!
//! Products arrive at a steady rate. The fast path validates them, stores name, brand and
//! price, and makes them findable at once through a fast effect that updates an in-process
//! search index. The slow path enriches each product through an external API that is slow,
//! rate-limited and, for 20 seconds, down. A schedule refreshes stale details periodically,
//! in the `Low` lane. The first part of this file is all a user writes (156 lines of code
//! as rustfmt lays them out, without comments and blank lines: the entity, its two effects,
//! their executors, the refresh schedule and the runtime's settings); the rest simulates
//! the API and the supplier feed, and prints what happened.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keystead::merge::{Max, Newest, Owned, Owner};
use keystead::{
    AsyncExecutor, BreakerPolicy, BreakerState, Context, Effect, EffectContext, EffectError,
    EffectLimits, Entity, Executor, Failure, FailureKind, Feedback, Priority, Rate, RetryPolicy,
    Runtime, Schedule, SubmitError,
};
use serde::{Deserialize, Serialize};

#[path = "support/proc.rs"]
mod proc;
use proc::status_kib;

// ---------------------------------------------------------------------------------------
// The catalog: what a user writes.

/// The fast path owns the price: nothing the enrichment returns may change it.
struct Fast;
impl Owner for Fast {
    const PATH: &'static str = "fast";
}

/// A product, each field stamped with the source version that set it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Product {
    name: Newest<String>,
    brand: Newest<String>,
    price_cents: Owned<u64, Fast>,
    /// `None` until enriched: shown as "details loading...".
    details: Newest<String>,
    /// When the details were last fetched (runtime clock, ms).
    enriched_at_ms: Max<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum ProductCmd {
    /// From the supplier feed: the fast path.
    Upsert {
        name: String,
        brand: String,
        price_cents: u64,
        version: u64,
    },
    /// From the enrichment API (effect feedback), computed from source `version`.
    Enriched {
        details: String,
        price_cents: u64,
        version: u64,
    },
    /// From the refresh schedule: fetch the details again if older than `max_age_ms`.
    Refresh { max_age_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("invalid product: {0}")]
struct Invalid(String);
impl Failure for Invalid {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}

impl Entity for Product {
    const NAME: &'static str = "product";
    type State = Product;
    type Command = ProductCmd;
    type Reply = ();
    type Error = Invalid;

    fn handle(p: &mut Product, cmd: &ProductCmd, ctx: &mut Context<'_>) -> Result<(), Invalid> {
        match cmd {
            ProductCmd::Upsert {
                name,
                brand,
                price_cents,
                version,
            } => {
                if name.trim().is_empty() || *price_cents == 0 {
                    return Err(Invalid(format!("{name:?} at {price_cents} cents")));
                }
                p.name.set(name.clone(), *version);
                p.brand.set(brand.clone(), *version);
                let _ = p.price_cents.set(Fast::PATH, *price_cents, *version);
                ctx.effect(Index {
                    name: name.clone(),
                    version: *version,
                });
                ctx.effect(Enrich {
                    name: name.clone(),
                    price_cents: *price_cents,
                    version: *version,
                    refresh: false,
                });
            }
            ProductCmd::Enriched {
                details,
                price_cents,
                version,
            } => {
                p.details.set(details.clone(), *version);
                p.enriched_at_ms.set(ctx.now_ms());
                // The API's price is refused (`NotOwner`): the fast path's stays.
                let _ = p.price_cents.set("enrichment", *price_cents, *version);
            }
            ProductCmd::Refresh { max_age_ms } => {
                let age = |at: &u64| ctx.now_ms().saturating_sub(*at);
                if let (Some(name), Some(price), true) = (
                    p.name.get(),
                    p.price_cents.get(),
                    p.enriched_at_ms
                        .get()
                        .is_some_and(|at| age(at) >= *max_age_ms),
                ) {
                    ctx.effect(Enrich {
                        name: name.clone(),
                        price_cents: *price,
                        version: ctx.version().unwrap_or(0),
                        refresh: true,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Findable now: an independent effect, so it never waits behind a slow enrichment.
#[derive(Debug, Serialize, Deserialize)]
struct Index {
    name: String,
    version: u64,
}
impl Effect for Index {
    const NAME: &'static str = "index";
    const INDEPENDENT: bool = true;
    type Origin = Product;
}

/// The slow path: only the latest data of a product is worth enriching.
#[derive(Debug, Serialize, Deserialize)]
struct Enrich {
    name: String,
    price_cents: u64,
    version: u64,
    refresh: bool,
}
impl Effect for Enrich {
    const NAME: &'static str = "enrich";
    const COALESCE: bool = true;
    type Origin = Product;
}

/// The in-process search index: product key -> (version, lower-case name).
#[derive(Clone, Default)]
struct SearchIndex(Arc<Mutex<HashMap<String, (u64, String)>>>);
impl Executor<Index> for SearchIndex {
    fn execute(&self, i: &Index, ctx: &EffectContext) -> Result<Feedback<Index>, EffectError> {
        let mut index = self
            .0
            .lock()
            .map_err(|_| EffectError::retryable("index poisoned"))?;
        let entry = index.entry(ctx.effect_key().key.clone()).or_default();
        if i.version >= entry.0 {
            *entry = (i.version, i.name.to_lowercase());
        }
        Ok(None)
    }
}

fn open(dir: &std::path::Path, index: SearchIndex, api: EnrichmentApi) -> Runtime {
    Runtime::builder(dir)
        .register::<Product>()
        .executor::<Index>(index)
        .async_executor::<Enrich>(api)
        .effect_retry(RetryPolicy::default().attempts_max(8))
        .effect_limits::<Enrich>(
            EffectLimits::default()
                .concurrency(32)
                .rate(Rate::new(RATE_PER_S, Duration::from_secs(1)))
                .attempt_timeout(Duration::from_secs(2))
                .breaker(BreakerPolicy::consecutive(5).cool_down(Duration::from_secs(2))),
        )
        .open()
        .expect("open the catalog")
}

/// The slow path's periodic refresh: every `REFRESH_EVERY`, each product of `keys` is told
/// to fetch its details again if they are older than `REFRESH_AGE`. Low priority and
/// sheddable: it never delays the fast path, and a full lane sets it aside, not the feed.
fn refresh(keys: impl IntoIterator<Item = String>) -> Schedule<Product> {
    let max_age_ms = REFRESH_AGE.as_millis() as u64;
    Schedule::every("refresh", REFRESH_EVERY, ProductCmd::Refresh { max_age_ms })
        .to_each(keys)
        .priority(Priority::Low)
        .sheddable()
}

// ---------------------------------------------------------------------------------------
// The world around it: a simulated enrichment API, the supplier feed, the clock.

const RATE_PER_S: u32 = 500;
const NEW_PER_S: u64 = 100;
const OUTAGE: Duration = Duration::from_secs(20);
/// A day and an hour, compressed as the outage is.
const REFRESH_EVERY: Duration = Duration::from_secs(10);
const REFRESH_AGE: Duration = Duration::from_secs(10);

/// 15 ms per call; down while `down`. Counts every call and remembers who succeeded when.
#[derive(Clone, Default)]
struct EnrichmentApi {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    refreshed: Arc<AtomicU64>,
    enriched: Arc<Mutex<Vec<(String, Instant)>>>,
}
impl AsyncExecutor<Enrich> for EnrichmentApi {
    async fn execute(
        &self,
        e: Enrich,
        ctx: EffectContext,
    ) -> Result<Feedback<Enrich>, EffectError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(15)).await;
        if self.down.load(Ordering::Relaxed) {
            return Err(EffectError::retryable("503 Service Unavailable"));
        }
        if e.refresh {
            self.refreshed.fetch_add(1, Ordering::Relaxed);
        } else if let Ok(mut enriched) = self.enriched.lock() {
            enriched.push((ctx.effect_key().key.clone(), Instant::now()));
        }
        let details = format!("{} - spec sheet, 4 photos, 12 reviews", e.name);
        // The supplier's list price: the catalog must not take it.
        Ok(Some(ProductCmd::Enriched {
            details,
            price_cents: e.price_cents + 999,
            version: e.version,
        }))
    }
}

fn peak_rss_mib() -> u64 {
    status_kib("VmHWM:") / 1024
}

/// Fast-path latencies (µs) of the current phase.
#[derive(Clone, Default)]
struct Latencies(Arc<Mutex<Vec<u64>>>);
impl Latencies {
    fn take_p50_p99_ms(&self) -> (f64, f64) {
        let mut v = std::mem::take(&mut *self.0.lock().unwrap());
        v.sort_unstable();
        let at = |q: f64| v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)));
        let ms = |x: Option<&u64>| x.map_or(0.0, |us| *us as f64 / 1000.0);
        (ms(at(0.50)), ms(at(0.99)))
    }
}

/// The supplier feed: `NEW_PER_S` new products a second, and half as many price changes of
/// products already there, each an `ask` in the `High` lane; refused ones are counted.
async fn feed(
    rt: Arc<Runtime>,
    stop: Arc<AtomicBool>,
    lat: Latencies,
    newest: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / NEW_PER_S));
    let mut versions: HashMap<u64, u64> = HashMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let mut keys = vec![n];
        if n % 2 == 1 {
            keys.push((n * 7919) % n.max(1)); // a price change of an older product
        }
        newest.store(n, Ordering::Relaxed);
        n += 1;
        for k in keys {
            let version = versions.entry(k).and_modify(|v| *v += 1).or_insert(1);
            let cmd = ProductCmd::Upsert {
                name: format!("Lamp model {k}"),
                brand: ["Nordlys", "Lumo", "Brasso"][(k % 3) as usize].into(),
                price_cents: 1_000 + 10 * *version,
                version: *version,
            };
            let started = Instant::now();
            match rt
                .entity::<Product>(format!("p-{k}"))
                .ask(cmd)
                .priority(Priority::High)
                .await
            {
                Ok(_) => lat
                    .0
                    .lock()
                    .unwrap()
                    .push(started.elapsed().as_micros() as u64),
                Err(SubmitError::Overloaded { .. }) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => eprintln!("fast path error: {e}"),
            }
        }
    }
}

/// Searches the index for `query`; each hit with its details or "details loading...".
async fn search(rt: &Runtime, index: &SearchIndex, query: &str) -> Vec<String> {
    let hits: Vec<String> = {
        let index = index.0.lock().unwrap();
        let mut hits: Vec<String> = index
            .iter()
            .filter(|(_, (_, name))| name.ends_with(query))
            .map(|(k, _)| k.clone())
            .collect();
        hits.sort();
        hits
    };
    let mut out = Vec::new();
    for key in hits {
        let p = rt
            .entity::<Product>(key.clone())
            .snapshot()
            .await
            .expect("snapshot")
            .state;
        let details = p
            .details
            .get()
            .cloned()
            .unwrap_or_else(|| "details loading...".into());
        out.push(format!(
            "{key}: {} ({}), {} cents - {details}",
            p.name.get().cloned().unwrap_or_default(),
            p.brand.get().cloned().unwrap_or_default(),
            p.price_cents.get().copied().unwrap_or(0)
        ));
    }
    out
}

fn report(rt: &Runtime, phase: &str, lat: &Latencies, api: &EnrichmentApi, refused: &AtomicU64) {
    let s = rt.stats();
    let enrich = s.effect_type("enrich").cloned().unwrap_or_default();
    let (p50, p99) = lat.take_p50_p99_ms();
    let backlog: Vec<String> = Priority::ALL
        .iter()
        .map(|p| format!("{p}={}", s.effect_priority(*p).pending))
        .collect();
    println!(
        "[{phase:>8}] fast ask p50 {p50:.2} ms p99 {p99:.2} ms | outbox {} | breaker {:?} (opened {}, probes {}) | parked {} | api calls {} | enriched {} | refresh runs {} refreshed {} | superseded {} | dead {} | refused {} | shed {} | peak RSS {} MiB",
        backlog.join(" "), enrich.breaker, enrich.breaker_opened, enrich.probes, enrich.parked,
        api.calls.load(Ordering::Relaxed), api.enriched.lock().unwrap().len(),
        s.schedule_runs, api.refreshed.load(Ordering::Relaxed),
        s.effects_superseded, s.effects_dead_lettered, refused.load(Ordering::Relaxed),
        s.lanes.iter().map(|l| l.shed).sum::<u64>(), peak_rss_mib(),
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| "target/catalog-db".into(), std::path::PathBuf::from);
    let _ = std::fs::remove_dir_all(&dir);
    let (index, api) = (SearchIndex::default(), EnrichmentApi::default());
    let rt = Arc::new(open(&dir, index.clone(), api.clone()));
    let (stop, lat) = (Arc::new(AtomicBool::new(false)), Latencies::default());
    let (newest, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let producer = tokio::spawn(feed(
        rt.clone(),
        stop.clone(),
        lat.clone(),
        newest.clone(),
        refused.clone(),
    ));
    let every = Duration::from_secs(5);

    println!("catalog on {}: {NEW_PER_S} new products/s plus price changes, enrichment limited to {RATE_PER_S}/s", dir.display());
    tokio::time::sleep(every).await;
    report(&rt, "before", &lat, &api, &refused);
    // The products so far get a periodic refresh of their details.
    let known = (0..=newest.load(Ordering::Relaxed)).map(|k| format!("p-{k}"));
    let status = rt
        .schedules()
        .create(refresh(known))
        .await
        .expect("refresh");
    println!(
        "refresh schedule for {} products: every {:?}, details older than {:?}, Low and sheddable",
        status.targets, REFRESH_EVERY, REFRESH_AGE
    );

    // The enrichment API goes down for 20 s (a 20-minute outage, compressed).
    api.down.store(true, Ordering::Relaxed);
    let outage = Instant::now();
    let calls_before = api.calls.load(Ordering::Relaxed);
    let changed = "p-42";
    let mut searched = String::new();
    let mut reported = 0;
    while outage.elapsed() < OUTAGE {
        tokio::time::sleep(every).await;
        reported += 1;
        if reported == 1 {
            // A price changes during the outage, on the fast path.
            let cmd = ProductCmd::Upsert {
                name: "Lamp model 42".into(),
                brand: "Brasso".into(),
                price_cents: 4_200,
                version: 1_000,
            };
            rt.entity::<Product>(changed)
                .ask(cmd)
                .priority(Priority::High)
                .await
                .expect("price change");
            // A user searches for a product that arrived during the outage: findable now,
            // its details still loading...
            let n = newest.load(Ordering::Relaxed).saturating_sub(100);
            searched = format!("p-{n}");
            for line in search(&rt, &index, &format!("model {n}")).await {
                println!("  search \"model {n}\" during the outage: {line}");
            }
            // ... and its enrichment jumps the queue of waiting ones.
            rt.entity::<Product>(searched.as_str())
                .prioritise(Priority::Critical)
                .await
                .expect("prioritise");
        }
        report(&rt, "outage", &lat, &api, &refused);
    }

    api.down.store(false, Ordering::Relaxed);
    let recovered = Instant::now();
    let calls_in_outage = api.calls.load(Ordering::Relaxed) - calls_before;
    let backlog_at_recovery = rt.stats().effect_type("enrich").map_or(0, |t| t.parked);
    println!("the API is back; {backlog_at_recovery} products wait for enrichment");
    rt.wait_until(|s| {
        s.effect_type("enrich")
            .is_some_and(|t| t.parked == 0 && t.breaker == BreakerState::Closed)
    })
    .await;
    let drained_in = recovered.elapsed();
    report(&rt, "after", &lat, &api, &refused);
    stop.store(true, Ordering::Relaxed);
    producer.await.expect("feed");
    let refresh = rt
        .schedules()
        .pause("refresh")
        .await
        .expect("pause refresh");
    rt.idle().await;

    let enriched = api.enriched.lock().unwrap().clone();
    let after: Vec<&(String, Instant)> = enriched.iter().filter(|(_, t)| *t >= recovered).collect();
    let position = after.iter().position(|(k, _)| *k == searched);
    let window: Vec<_> = after
        .iter()
        .filter(|(_, t)| *t <= recovered + drained_in)
        .collect();
    let secs = drained_in.as_secs_f64().max(0.001);
    println!(
        "drained {} enrichments in {secs:.1} s: a burst of {RATE_PER_S} (the bucket), then {:.0}/s against a limit of {RATE_PER_S}/s; the searched {searched} was enriched {} after recovery",
        window.len(), window.len().saturating_sub(RATE_PER_S as usize) as f64 / secs,
        position.map_or("never".to_string(), |p| format!("#{}", p + 1)),
    );
    let p = rt
        .entity::<Product>(changed)
        .snapshot()
        .await
        .expect("snapshot")
        .state;
    println!("{changed}: price {} cents (set during the outage; the API's list price was refused), details: {}",
        p.price_cents.get().copied().unwrap_or(0), p.details.get().cloned().unwrap_or_else(|| "details loading...".into()));
    let query = searched.replace("p-", "model ");
    for line in search(&rt, &index, &query).await {
        println!("  search \"{query}\" after recovery: {line}");
    }
    let s = rt.stats();
    println!("products {}, effects done {}, superseded (coalesced) {}, dead-lettered {}, api calls {} ({} during the 20 s outage)",
        newest.load(Ordering::Relaxed) + 1, s.effects_done, s.effects_superseded, s.effects_dead_lettered,
        api.calls.load(Ordering::Relaxed), calls_in_outage);
    println!(
        "refresh: {} runs ({} skipped while one was unfinished, {} missed, {} targets shed), {} products refreshed; details fetched again only when older than {:?}",
        refresh.fired, refresh.skipped, refresh.missed, refresh.targets_shed,
        api.refreshed.load(Ordering::Relaxed), REFRESH_AGE
    );
    drop(s);
    if let Ok(rt) = Arc::try_unwrap(rt) {
        rt.shutdown().await;
    }
}
