//! The flagship demo: the races from keystead's seed documents, replayed live on a real sled
//! database on disk, each made boring.
//!
//! ```text
//! cargo run --example orders            # first run: every scenario plays out
//! cargo run --example orders            # second run: same message ids, state survived
//! cargo run --example orders -- /tmp/db # choose the database directory
//! RUST_LOG=keystead=info cargo run --example orders   # see the per-message spans
//! ```

use std::path::PathBuf;
use std::time::Duration;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use keystead::{
    Context, Effect, EffectContext, EffectError, EffectInfo, Entity, Executor, Failure,
    FailureKind, Feedback, Outcome, Recorded, RetryPolicy, Runtime, SubmitError,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------
// Order: a small state machine with a payment, a flaky stock reservation and a carrier
// notification whose upstream is down for good.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
enum Status {
    #[default]
    Open,
    Paid,
    Shipped,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Order {
    status: Status,
    charges: u32,
    paid_cents: u64,
    stock_reserved: bool,
    carrier_notified: bool,
    /// Set by the payment provider's feedback, once the charge is captured.
    provider_ref: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
enum OrderCmd {
    Pay {
        cents: u64,
    },
    Ship,
    /// Fails with `WarehouseBusy` until the third attempt.
    ReserveStock,
    /// The carrier's API is down: fails every time.
    NotifyCarrier,
    /// Feedback from the payment provider (sent by the keystead effect workers).
    PaymentCaptured {
        provider_ref: String,
    },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
enum OrderError {
    #[error("illegal transition {from:?} -> {to:?}")]
    IllegalTransition { from: Status, to: Status },
    #[error("warehouse busy, try again")]
    WarehouseBusy,
    #[error("carrier API unavailable")]
    CarrierDown,
}

impl Failure for OrderError {
    fn kind(&self) -> FailureKind {
        match self {
            OrderError::IllegalTransition { .. } => FailureKind::Permanent,
            OrderError::WarehouseBusy | OrderError::CarrierDown => FailureKind::Retryable,
        }
    }
}

/// What an order handler answers: a receipt and the attempt that produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    text: String,
    attempt: u32,
}

struct OrderEntity;

impl Entity for OrderEntity {
    const NAME: &'static str = "order";
    type State = Order;
    type Command = OrderCmd;
    type Reply = Receipt;
    type Error = OrderError;

    fn handle(
        order: &mut Order,
        cmd: &OrderCmd,
        ctx: &mut Context<'_>,
    ) -> Result<Receipt, OrderError> {
        let text = match cmd {
            OrderCmd::Pay { cents } => {
                if order.status != Status::Open {
                    return Err(OrderError::IllegalTransition {
                        from: order.status,
                        to: Status::Paid,
                    });
                }
                order.status = Status::Paid;
                order.charges += 1;
                order.paid_cents = *cents;
                // Never call the provider from a handler: record the charge; it runs after
                // the commit, with this message's effect key as the provider's idempotency key.
                ctx.effect(ChargeCard { cents: *cents });
                format!("charged {}.{:02} EUR", cents / 100, cents % 100)
            }
            OrderCmd::Ship => {
                if order.status != Status::Paid {
                    return Err(OrderError::IllegalTransition {
                        from: order.status,
                        to: Status::Shipped,
                    });
                }
                order.status = Status::Shipped;
                "shipped".into()
            }
            OrderCmd::ReserveStock => {
                if ctx.attempt() < 3 {
                    return Err(OrderError::WarehouseBusy);
                }
                order.stock_reserved = true;
                "stock reserved".into()
            }
            OrderCmd::NotifyCarrier => return Err(OrderError::CarrierDown),
            OrderCmd::PaymentCaptured { provider_ref } => {
                order.provider_ref = Some(provider_ref.clone());
                format!("captured as {provider_ref}")
            }
        };
        Ok(Receipt {
            text,
            attempt: ctx.attempt(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Customer: a profile edited from two tabs, and a subscription fed by versioned events.

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Customer {
    email: String,
    phone: String,
    subscription: String,
}

#[derive(Debug, Serialize, Deserialize)]
enum CustomerCmd {
    Create {
        email: String,
    },
    SetEmail(String),
    SetPhone(String),
    /// A billing event; its source version is the event's sequence number.
    Subscription(String),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("never fails")]
struct NoError;
impl Failure for NoError {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}

struct CustomerEntity;

impl Entity for CustomerEntity {
    const NAME: &'static str = "customer";
    type State = Customer;
    type Command = CustomerCmd;
    type Reply = Receipt;
    type Error = NoError;

    fn handle(
        c: &mut Customer,
        cmd: &CustomerCmd,
        ctx: &mut Context<'_>,
    ) -> Result<Receipt, NoError> {
        let text = match cmd {
            CustomerCmd::Create { email } => {
                c.email = email.clone();
                ctx.effect(SendWelcome { to: email.clone() });
                "created".to_string()
            }
            CustomerCmd::SetEmail(e) => {
                c.email = e.clone();
                format!("email = {e}")
            }
            CustomerCmd::SetPhone(p) => {
                c.phone = p.clone();
                format!("phone = {p}")
            }
            CustomerCmd::Subscription(s) => {
                c.subscription = s.clone();
                format!("subscription {s}")
            }
        };
        Ok(Receipt {
            text,
            attempt: ctx.attempt(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Side effects: a payment provider and a mailer, both behind keystead's outbox, both with
// injected timeouts. Each remembers the idempotency keys it has seen, as a real provider
// does, so a repeated call is absorbed.

#[derive(Debug, Serialize, Deserialize)]
struct ChargeCard {
    cents: u64,
}
impl Effect for ChargeCard {
    const NAME: &'static str = "charge_card";
    type Origin = OrderEntity;
}

#[derive(Debug, Serialize, Deserialize)]
struct SendWelcome {
    to: String,
}
impl Effect for SendWelcome {
    const NAME: &'static str = "send_welcome";
    type Origin = CustomerEntity;
}

/// Times out on the first two attempts of every charge, then captures it.
#[derive(Default)]
struct PaymentProvider {
    calls: AtomicU32,
}
impl Executor<ChargeCard> for PaymentProvider {
    fn execute(
        &self,
        charge: &ChargeCard,
        ctx: &EffectContext,
    ) -> Result<Feedback<ChargeCard>, EffectError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if ctx.attempt() < 3 {
            return Err(EffectError::retryable("payment provider timed out"));
        }
        let provider_ref = format!("pay_{}_{}", charge.cents, ctx.effect_key().key);
        Ok(Some(OrderCmd::PaymentCaptured { provider_ref }))
    }
}

/// Times out once, then sends.
#[derive(Default)]
struct Mailer {
    calls: AtomicU32,
}
impl Executor<SendWelcome> for Mailer {
    fn execute(
        &self,
        _mail: &SendWelcome,
        ctx: &EffectContext,
    ) -> Result<Feedback<SendWelcome>, EffectError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if ctx.attempt() < 2 {
            return Err(EffectError::retryable("SMTP server timed out"));
        }
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------
// The table.

type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

struct Row {
    scenario: &'static str,
    message: String,
    outcome: String,
    attempts: String,
    revision: u64,
}

fn describe<X: std::fmt::Display>(outcome: &Outcome<Receipt, X>) -> (String, String) {
    fn first<X: std::fmt::Display>(r: &Recorded<Receipt, X>) -> String {
        match r {
            Recorded::Applied { reply, .. } => format!("applied: {}", reply.text),
            Recorded::Stale { current } => format!("stale (current v{current})"),
            Recorded::Rejected { error } => format!("rejected: {error}"),
            Recorded::DeadLettered { error, .. } => format!("dead-lettered: {error}"),
        }
    }
    match outcome {
        Outcome::Applied { reply, .. } => (
            format!("Applied: {}", reply.text),
            reply.attempt.to_string(),
        ),
        Outcome::Duplicate { first: f } => {
            (format!("Duplicate of [{}]", first(f)), "0 (not run)".into())
        }
        Outcome::Stale { current } => (format!("Stale (current v{current})"), "1".into()),
        Outcome::Rejected { error } => (format!("Rejected: {error}"), "1".into()),
        Outcome::DeadLettered { error, attempts } => {
            (format!("DeadLettered: {error}"), attempts.to_string())
        }
        _ => ("(unknown)".into(), "?".into()),
    }
}

struct Demo {
    rt: Runtime,
    rows: Vec<Row>,
}

impl Demo {
    fn push<X: std::fmt::Display>(
        &mut self,
        scenario: &'static str,
        message: String,
        outcome: &Outcome<Receipt, X>,
        revision: u64,
    ) {
        let (outcome, attempts) = describe(outcome);
        self.rows.push(Row {
            scenario,
            message,
            outcome,
            attempts,
            revision,
        });
    }

    fn push_error(
        &mut self,
        scenario: &'static str,
        message: String,
        error: &SubmitError,
        revision: u64,
    ) {
        let text = match error {
            SubmitError::Conflict {
                expected, actual, ..
            } => {
                format!("Conflict: expected r{expected}, found r{actual} -> reload")
            }
            other => format!("error: {other}"),
        };
        self.rows.push(Row {
            scenario,
            message,
            outcome: text,
            attempts: "1".into(),
            revision,
        });
    }

    async fn order_revision(&self, key: &str) -> Result<u64> {
        Ok(self
            .rt
            .entity::<OrderEntity>(key)
            .snapshot()
            .await?
            .revision)
    }

    async fn customer_revision(&self, key: &str) -> Result<u64> {
        Ok(self
            .rt
            .entity::<CustomerEntity>(key)
            .snapshot()
            .await?
            .revision)
    }

    async fn order(
        &mut self,
        scenario: &'static str,
        key: &str,
        id: &str,
        cmd: OrderCmd,
    ) -> Result<Outcome<Receipt, OrderError>> {
        let label = format!("{key} {cmd:?} [{id}]");
        let out = self.rt.entity::<OrderEntity>(key).ask(cmd).id(id).await?;
        let rev = self.order_revision(key).await?;
        self.push(scenario, label, &out, rev);
        Ok(out)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/keystead-orders-db"));
    let fresh = !path.exists();
    let payments = Arc::new(PaymentProvider::default());
    let mailer = Arc::new(Mailer::default());
    let rt = Runtime::builder(&path)
        .register::<OrderEntity>()
        .register::<CustomerEntity>()
        .executor::<ChargeCard>(SharedExecutor(payments.clone()))
        .executor::<SendWelcome>(SharedExecutor(mailer.clone()))
        .effect_retry(
            RetryPolicy::default()
                .attempts_max(5)
                .backoff_initial(Duration::from_millis(20))
                .backoff_max(Duration::from_millis(100)),
        )
        .retry(
            RetryPolicy::default()
                .attempts_max(4)
                .backoff_initial(Duration::from_millis(20))
                .backoff_max(Duration::from_millis(200)),
        )
        .open()?;
    println!(
        "keystead orders demo: database at {} ({})",
        path.display(),
        if fresh {
            "new"
        } else {
            "existing: the same message ids find their stored results, so nothing runs twice; only the conflict check is re-evaluated, since a conflict changes nothing and is not recorded"
        }
    );
    let mut demo = Demo {
        rt,
        rows: Vec::new(),
    };

    // 1. The user double-clicks "Pay": two concurrent requests, one idempotency key.
    let o1 = demo.rt.entity::<OrderEntity>("o-1001");
    let (a, b) = tokio::join!(
        o1.ask(OrderCmd::Pay { cents: 4_990 }).id("pay-o-1001"),
        o1.ask(OrderCmd::Pay { cents: 4_990 }).id("pay-o-1001"),
    );
    let (a, b) = (a?, b?);
    assert_eq!(a.reply(), b.reply(), "both clicks get the same receipt");
    let rev = demo.order_revision("o-1001").await?;
    demo.push(
        "double-click Pay",
        "o-1001 Pay (click 1) [pay-o-1001]".into(),
        &a,
        rev,
    );
    demo.push(
        "double-click Pay",
        "o-1001 Pay (click 2) [pay-o-1001]".into(),
        &b,
        rev,
    );

    // 2. A client times out although the payment went through, and retries with its key.
    demo.order(
        "retry after timeout",
        "o-1002",
        "pay-o-1002",
        OrderCmd::Pay { cents: 1_250 },
    )
    .await?;
    demo.order(
        "retry after timeout",
        "o-1002",
        "pay-o-1002",
        OrderCmd::Pay { cents: 1_250 },
    )
    .await?;

    // 3. Two tabs open the same profile at the same revision and both save.
    let alice = demo.rt.entity::<CustomerEntity>("c-alice");
    let created = alice
        .ask(CustomerCmd::Create {
            email: "alice@old.example".into(),
        })
        .id("create-alice")
        .await?;
    let seen = match &created {
        Outcome::Applied { revision, .. }
        | Outcome::Duplicate {
            first: Recorded::Applied { revision, .. },
        } => *revision,
        _ => 0,
    };
    let rev = demo.customer_revision("c-alice").await?;
    demo.push(
        "two tabs",
        "c-alice Create [create-alice]".into(),
        &created,
        rev,
    );
    let tab_a = alice
        .ask(CustomerCmd::SetEmail("alice@new.example".into()))
        .id("tab-a-email")
        .expect_revision(seen)
        .await?;
    let rev = demo.customer_revision("c-alice").await?;
    demo.push(
        "two tabs",
        format!("c-alice SetEmail, tab A saw r{seen} [tab-a-email]"),
        &tab_a,
        rev,
    );
    match alice
        .ask(CustomerCmd::SetPhone("+33 6 12 34 56 78".into()))
        .id("tab-b-phone")
        .expect_revision(seen)
        .await
    {
        Ok(out) => {
            let rev = demo.customer_revision("c-alice").await?;
            demo.push(
                "two tabs",
                format!("c-alice SetPhone, tab B saw r{seen} [tab-b-phone]"),
                &out,
                rev,
            );
        }
        Err(e) => {
            let rev = demo.customer_revision("c-alice").await?;
            demo.push_error(
                "two tabs",
                format!("c-alice SetPhone, tab B saw r{seen} [tab-b-phone]"),
                &e,
                rev,
            );
            // Tab B reloads (sees tab A's email) and saves again: nothing silently lost.
            let reloaded = alice.snapshot().await?.revision;
            let out = alice
                .ask(CustomerCmd::SetPhone("+33 6 12 34 56 78".into()))
                .id("tab-b-phone-retry")
                .expect_revision(reloaded)
                .await;
            let rev = demo.customer_revision("c-alice").await?;
            match out {
                Ok(out) => demo.push(
                    "two tabs",
                    format!("c-alice SetPhone after reload r{reloaded} [tab-b-phone-retry]"),
                    &out,
                    rev,
                ),
                Err(e) => demo.push_error(
                    "two tabs",
                    format!("c-alice SetPhone after reload r{reloaded} [tab-b-phone-retry]"),
                    &e,
                    rev,
                ),
            }
        }
    }

    // 4. Billing events arrive out of order: "renew" (seq 2) lands after "cancel" (seq 3).
    for (id, seq, what) in [
        ("ev-1", 1, "active"),
        ("ev-3", 3, "cancelled"),
        ("ev-2", 2, "renewed"),
    ] {
        let out = alice
            .ask(CustomerCmd::Subscription(what.into()))
            .id(id)
            .version(seq)
            .await?;
        let rev = demo.customer_revision("c-alice").await?;
        demo.push(
            "late renew after cancel",
            format!("c-alice Subscription {what} v{seq} [{id}]"),
            &out,
            rev,
        );
    }

    // 5. An illegal transition: the order is shipped, then a "paid" event arrives.
    demo.order(
        "illegal transition",
        "o-1003",
        "pay-o-1003",
        OrderCmd::Pay { cents: 990 },
    )
    .await?;
    demo.order(
        "illegal transition",
        "o-1003",
        "ship-o-1003",
        OrderCmd::Ship,
    )
    .await?;
    demo.order(
        "illegal transition",
        "o-1003",
        "pay-o-1003-late",
        OrderCmd::Pay { cents: 990 },
    )
    .await?;

    // 6. A flaky warehouse: busy twice, fine on the third attempt.
    demo.order(
        "flaky step",
        "o-1001",
        "reserve-o-1001",
        OrderCmd::ReserveStock,
    )
    .await?;

    // 7. The carrier API is down: the message ends in the dead-letter store.
    demo.order(
        "dead letter",
        "o-1001",
        "notify-o-1001",
        OrderCmd::NotifyCarrier,
    )
    .await?;

    print_table(&demo.rows);

    // Effects run on their own workers after each commit; wait for them to settle.
    demo.rt.idle().await;
    println!("\nEffects (outbox -> provider, idempotency key = effect key):");
    let mut effects: Vec<EffectInfo> = Vec::new();
    for key in ["o-1001", "o-1002", "o-1003"] {
        effects.extend(demo.rt.effects_of::<OrderEntity>(key).await?);
    }
    effects.extend(demo.rt.effects_of::<CustomerEntity>("c-alice").await?);
    print_effects(&effects);
    println!(
        "Calls this run: payment provider {}, mailer {} (a second run makes none: nothing is charged or sent twice)",
        payments.calls.load(Ordering::SeqCst),
        mailer.calls.load(Ordering::SeqCst)
    );

    println!("\nFinal states (read back from sled):");
    for key in ["o-1001", "o-1002", "o-1003"] {
        let s = demo.rt.entity::<OrderEntity>(key).snapshot().await?;
        println!("  order {key}: r{} {:?}", s.revision, s.state);
    }
    let s = alice.snapshot().await?;
    println!(
        "  customer c-alice: r{} v{:?} {:?}",
        s.revision, s.version, s.state
    );
    println!("\nDead letters (list / requeue / purge them through the Runtime API):");
    for letter in demo.rt.dead_letters::<OrderEntity>().await? {
        println!(
            "  {} [{}]: {} after {} attempts",
            letter.key, letter.message_id, letter.error, letter.attempts
        );
    }
    let stats = demo.rt.stats();
    println!("\nThis run: applied {}, duplicate {}, stale {}, rejected {}, dead-lettered {}, conflicts {}, retries {}",
        stats.applied, stats.duplicate, stats.stale, stats.rejected, stats.dead_lettered, stats.conflicts, stats.retries);
    if fresh {
        println!(
            "\nRun it again: the same message ids find their stored results, nothing runs twice."
        );
    }
    println!("(start over: rm -rf {})", path.display());
    demo.rt.shutdown().await;
    Ok(())
}

/// Lets the demo keep a handle on an executor to read its call count.
struct SharedExecutor<X>(Arc<X>);
impl<T: Effect, X: Executor<T>> Executor<T> for SharedExecutor<X> {
    fn execute(&self, effect: &T, ctx: &EffectContext) -> Result<Feedback<T>, EffectError> {
        self.0.execute(effect, ctx)
    }
}

fn print_effects(effects: &[EffectInfo]) {
    let wk = effects
        .iter()
        .map(|e| e.effect_key.to_string().len())
        .max()
        .unwrap_or(10)
        .max(10);
    println!(
        "{:wk$}  {:14}  {:13}  {:>8}  last error",
        "effect key", "effect", "status", "attempts"
    );
    println!("{}", "-".repeat(wk + 70));
    for e in effects {
        println!(
            "{:wk$}  {:14}  {:13}  {:>8}  {}",
            e.effect_key.to_string(),
            e.name,
            format!("{:?}", e.status),
            e.attempts,
            e.last_error.as_deref().unwrap_or("-")
        );
    }
}

fn print_table(rows: &[Row]) {
    let w = |f: fn(&Row) -> usize, min: usize| rows.iter().map(f).max().unwrap_or(0).max(min);
    let (ws, wm, wo) = (
        w(|r| r.scenario.len(), 8),
        w(|r| r.message.len(), 7),
        w(|r| r.outcome.len(), 7),
    );
    println!();
    println!(
        "{:ws$}  {:wm$}  {:wo$}  {:>11}  {:>8}",
        "scenario", "message", "outcome", "attempts", "revision"
    );
    println!("{}", "-".repeat(ws + wm + wo + 27));
    for r in rows {
        println!(
            "{:ws$}  {:wm$}  {:wo$}  {:>11}  {:>8}",
            r.scenario,
            r.message,
            r.outcome,
            r.attempts,
            format!("r{}", r.revision)
        );
    }
}
