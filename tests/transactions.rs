//! Goal: atomic multi-entity commands (issue 14) change all their members or none, exactly
//! once per id, and cannot deadlock, whatever order callers name the members in.
//! Method: accounts and transfers. 10,000 transfers among 8 accounts from 16 concurrent
//! senders, in random and opposite orders, with resends and single deposits mixed in: a
//! watchdog turns a hang into a failure; money is conserved; each account's revision
//! counts exactly the messages and transfers applied to it. Then each failure class,
//! the checks (expected revision, version), effects, and the seed's deadlock.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keystead::{
    Context, Effect, EffectContext, EffectError, Entity, Executor, Failure, FailureKind, Feedback,
    Members, OutcomeKind, Recorded, RuntimeBuilder, SubmitError, Transaction, TxContext,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Balance {
    cents: i64,
    /// Transfer ids applied here, in order.
    transfers: Vec<String>,
}

struct Account;
impl Entity for Account {
    const NAME: &'static str = "account";
    type State = Balance;
    type Command = i64;
    type Reply = i64;
    type Error = Never;
    fn handle(b: &mut Balance, cents: &i64, _: &mut Context<'_>) -> Result<i64, Never> {
        b.cents += cents;
        Ok(b.cents)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
enum TransferError {
    #[error("insufficient funds: {0} available")]
    Insufficient(i64),
    #[error("the bank is busy")]
    Busy,
}
impl Failure for TransferError {
    fn kind(&self) -> FailureKind {
        match self {
            TransferError::Insufficient(_) => FailureKind::Permanent,
            TransferError::Busy => FailureKind::Retryable,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Move {
    /// The members in the order the caller names them (opposite orders on purpose).
    accounts: Vec<String>,
    from: String,
    to: String,
    cents: i64,
    /// Fail retryably until this attempt; panic instead when `panic` is set.
    fail_until: u32,
    panic: bool,
    /// Record a receipt effect on the receiving account.
    receipt: bool,
}

impl Move {
    fn new(from: &str, to: &str, cents: i64) -> Self {
        Self {
            accounts: vec![from.into(), to.into()],
            from: from.into(),
            to: to.into(),
            cents,
            fail_until: 0,
            panic: false,
            receipt: false,
        }
    }
}

struct Transfer;
impl Transaction for Transfer {
    const NAME: &'static str = "transfer";
    type Command = Move;
    type Reply = i64;
    type Error = TransferError;
    fn members(m: &Move) -> Members {
        m.accounts
            .iter()
            .fold(Members::new(), |members, a| members.with::<Account>(a))
    }
    fn handle(m: &Move, tx: &mut TxContext<'_>) -> Result<i64, TransferError> {
        if tx.attempt() < m.fail_until {
            if m.panic {
                panic!("the bank's handler broke on attempt {}", tx.attempt());
            }
            return Err(TransferError::Busy);
        }
        let available = tx.state::<Account>(&m.from).cents;
        if available < m.cents {
            return Err(TransferError::Insufficient(available));
        }
        let id = tx.message_id().to_string();
        let from = tx.state_mut::<Account>(&m.from);
        from.cents -= m.cents;
        from.transfers.push(id.clone());
        let to = tx.state_mut::<Account>(&m.to);
        to.cents += m.cents;
        to.transfers.push(id.clone());
        if m.receipt {
            tx.effect(&m.to, Receipt { transfer: id });
        }
        Ok(available - m.cents)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    transfer: String,
}
impl Effect for Receipt {
    const NAME: &'static str = "receipt";
    const INDEPENDENT: bool = true;
    type Origin = Account;
}

#[derive(Clone, Default)]
struct Receipts(Arc<parking_lot::Mutex<Vec<String>>>);
impl Executor<Receipt> for Receipts {
    fn execute(&self, r: &Receipt, _: &EffectContext) -> Result<Feedback<Receipt>, EffectError> {
        self.0.lock().push(r.transfer.clone());
        Ok(None)
    }
}

fn bank(path: &std::path::Path) -> RuntimeBuilder {
    runtime_builder(path)
        .shards(2)
        .retry(fast_retry(4))
        .register::<Account>()
        .transaction::<Transfer>()
}

/// A deterministic generator (splitmix64).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_colliding_transfers_conserve_money_and_apply_once() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(bank(dir.path()).open().unwrap());
        const ACCOUNTS: u64 = 8;
        const SENDERS: u64 = 16;
        const PER_SENDER: u64 = 625; // 10,000 transfers
        for a in 0..ACCOUNTS {
            rt.entity::<Account>(format!("a-{a}")).ask(1_000).id("open").await.unwrap();
        }
        let applied = Arc::new(AtomicU64::new(0));
        let deposits = Arc::new(AtomicU64::new(0));
        let mut senders = Vec::new();
        for s in 0..SENDERS {
            let (rt, applied, deposits) = (rt.clone(), applied.clone(), deposits.clone());
            senders.push(tokio::spawn(async move {
                let mut seed = s + 1;
                for i in 0..PER_SENDER {
                    let from = next(&mut seed) % ACCOUNTS;
                    let to = (from + 1 + next(&mut seed) % (ACCOUNTS - 1)) % ACCOUNTS;
                    let (from, to) = (format!("a-{from}"), format!("a-{to}"));
                    let mut m = Move::new(&from, &to, (next(&mut seed) % 50) as i64 + 1);
                    if s % 2 == 1 {
                        m.accounts.reverse(); // opposite orders
                    }
                    let id = format!("t-{s}-{i}");
                    let outcome = rt.transaction::<Transfer>(m.clone()).id(id.clone()).await.unwrap();
                    match outcome.kind() {
                        OutcomeKind::Applied => {
                            applied.fetch_add(1, Ordering::Relaxed);
                        }
                        OutcomeKind::Rejected => {}
                        other => panic!("{id}: {other:?}"),
                    }
                    if i % 10 == 0 {
                        // A resend: the first result, nothing applied twice.
                        let again = rt.transaction::<Transfer>(m).id(id.clone()).await.unwrap();
                        assert_eq!(again.kind(), OutcomeKind::Duplicate, "{id}");
                    }
                    if i % 25 == 0 {
                        // A single deposit to a member, racing the transfers.
                        rt.entity::<Account>(to).ask(7).id(format!("d-{s}-{i}")).await.unwrap();
                        deposits.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let all = async {
            for s in senders {
                s.await.unwrap();
            }
        };
        // A watchdog, not a synchronisation: a deadlock fails the test instead of hanging it.
        tokio::time::timeout(Duration::from_secs(240), all)
            .await
            .expect("transfers stopped making progress: deadlock");
        rt.idle().await;
        let (applied, deposits) = (applied.load(Ordering::Relaxed), deposits.load(Ordering::Relaxed));
        let mut total = 0;
        let mut legs = 0;
        let mut ids = std::collections::HashSet::new();
        for a in 0..ACCOUNTS {
            let snap = rt.entity::<Account>(format!("a-{a}")).snapshot().await.unwrap();
            total += snap.state.cents;
            legs += snap.state.transfers.len() as u64;
            for id in &snap.state.transfers {
                ids.insert(id.clone());
            }
            let deposits_here = snap.revision - 1 - snap.state.transfers.len() as u64;
            assert!(snap.state.cents >= 0, "a-{a} overdrawn: {}", snap.state.cents);
            // Every revision is a message or a transfer: the opening, the transfers it
            // took part in, the deposits it got (counted below in the total).
            let _ = deposits_here;
        }
        assert_eq!(total, (ACCOUNTS * 1_000 + deposits * 7) as i64, "money conserved");
        assert_eq!(legs, 2 * applied, "each applied transfer changed both accounts once");
        assert_eq!(ids.len() as u64, applied, "each transfer applied exactly once");
        let mut revisions = 0;
        for a in 0..ACCOUNTS {
            revisions += rt.entity::<Account>(format!("a-{a}")).snapshot().await.unwrap().revision;
        }
        assert_eq!(revisions, ACCOUNTS + 2 * applied + deposits, "no revision skipped or doubled");
        assert!(applied > 9_000, "most transfers applied: {applied}");
    }
}

/// The lock-ordering seed in keystead terms: a worker's batch update and a batch upsert
/// touch the same rows in opposite orders at once. Here both are transactions over the
/// same 6 accounts, one naming them in ascending order, the other descending, over many
/// rounds from 8 concurrent senders. keystead takes members in one global order, so they
/// never deadlock: a watchdog would report a hang as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_order_transactions_over_the_same_entities_never_deadlock() {
    for backend in keystead::Backend::available() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(bank(dir.path()).backend(backend).open().unwrap());
        let names: Vec<String> = (0..6).map(|a| format!("a-{a}")).collect();
        for n in &names {
            rt.entity::<Account>(n.clone())
                .ask(1_000_000)
                .id("open")
                .await
                .unwrap();
        }
        let mut senders = Vec::new();
        for s in 0..8u64 {
            let (rt, names) = (rt.clone(), names.clone());
            senders.push(tokio::spawn(async move {
                for round in 0..150 {
                    let mut m = Move::new(&names[0], &names[5], 1);
                    m.accounts = names.clone();
                    if s % 2 == 1 {
                        m.accounts.reverse();
                    }
                    let outcome = rt
                        .transaction::<Transfer>(m)
                        .id(format!("s{s}-r{round}"))
                        .await
                        .unwrap();
                    assert_eq!(outcome.kind(), OutcomeKind::Applied);
                }
            }));
        }
        let all = async {
            for s in senders {
                s.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .unwrap_or_else(|_| {
                panic!("{}: opposite-order transactions deadlocked", backend.name())
            });
        let first = rt.entity::<Account>("a-0").snapshot().await.unwrap();
        assert_eq!(first.state.cents, 1_000_000 - 8 * 150);
        assert_eq!(first.revision, 1 + 8 * 150);
        let middle = rt.entity::<Account>("a-3").snapshot().await.unwrap();
        assert_eq!(
            middle.revision,
            1 + 8 * 150,
            "a member that only reads is a member too"
        );
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_failure_class_of_a_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let receipts = Receipts::default();
        let rt = bank(dir.path()).executor::<Receipt>(receipts.clone()).open().unwrap();
        rt.entity::<Account>("a").ask(100).await.unwrap();
        let a = || rt.entity::<Account>("a");
        let b = || rt.entity::<Account>("b");
        // Rejected (permanent): nothing changes; stored: the same id answers the same.
        let too_much = rt.transaction::<Transfer>(Move::new("a", "b", 500)).id("big").await.unwrap();
        assert_eq!(too_much.kind(), OutcomeKind::Rejected);
        let again = rt.transaction::<Transfer>(Move::new("a", "b", 1)).id("big").await.unwrap();
        assert!(matches!(again, keystead::Outcome::Duplicate { first: Recorded::Rejected { .. } }), "{again:?}");
        assert_eq!((a().snapshot().await.unwrap().revision, b().snapshot().await.unwrap().revision), (1, 0));
        // Retryable, then applied on attempt 3.
        let mut flaky = Move::new("a", "b", 10);
        flaky.fail_until = 3;
        let outcome = rt.transaction::<Transfer>(flaky).id("flaky").await.unwrap();
        assert_eq!(outcome.reply(), Some(&90));
        // A panic on every attempt: dead-lettered after 4, nothing changed.
        let mut broken = Move::new("a", "b", 10);
        broken.fail_until = 99;
        broken.panic = true;
        let outcome = rt.transaction::<Transfer>(broken).id("broken").await.unwrap();
        assert!(matches!(outcome, keystead::Outcome::DeadLettered { attempts: 4, .. }), "{outcome:?}");
        assert_eq!(a().snapshot().await.unwrap().state.cents, 90);
        assert!(rt.stats().handler_panics >= 4);
        // Expected revisions: a stale one is a Conflict naming the member; nothing changes.
        let conflict = rt
            .transaction::<Transfer>(Move::new("a", "b", 5))
            .expect_revision::<Account>("a", 2)
            .expect_revision::<Account>("b", 7)
            .await
            .unwrap_err();
        assert!(matches!(&conflict, SubmitError::Conflict { entity: "account", key, expected: 7, actual: 1 } if key == "b"), "{conflict:?}");
        let ok = rt
            .transaction::<Transfer>(Move::new("a", "b", 5))
            .expect_revision::<Account>("a", 2)
            .expect_revision::<Account>("b", 1)
            .await
            .unwrap();
        assert_eq!(ok.kind(), OutcomeKind::Applied);
        // Versions: every member takes the transaction's version; an older one is stale.
        rt.transaction::<Transfer>(Move::new("a", "b", 1)).version(10).await.unwrap();
        assert_eq!(b().snapshot().await.unwrap().version, Some(10));
        let stale = rt.transaction::<Transfer>(Move::new("b", "a", 1)).version(9).await.unwrap();
        assert_eq!(stale.kind(), OutcomeKind::Stale);
        // An effect on a member runs after the commit, once.
        let mut with_receipt = Move::new("a", "b", 1);
        with_receipt.receipt = true;
        rt.transaction::<Transfer>(with_receipt.clone()).id("r-1").await.unwrap();
        rt.transaction::<Transfer>(with_receipt).id("r-1").await.unwrap();
        rt.idle().await;
        assert_eq!(*receipts.0.lock(), ["r-1"]);
        assert_eq!(a().snapshot().await.unwrap().state.cents + b().snapshot().await.unwrap().state.cents, 100);
        // Bad declarations: typed errors naming what is wrong.
        let twice = rt.transaction::<Transfer>(Move::new("a", "a", 1)).await.unwrap_err();
        assert!(matches!(&twice, SubmitError::InvalidTransaction { transaction: "transfer", reason } if reason.contains("twice")), "{twice}");
        let outsider = rt
            .transaction::<Transfer>(Move::new("a", "b", 1))
            .expect_revision::<Account>("c", 0)
            .await
            .unwrap_err();
        assert!(outsider.to_string().contains("not a member"), "{outsider}");
        rt.shutdown().await;
    }
}

on_each_backend! {
    /// A transaction's outcome and its id survive a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_survives_a_restart_and_its_id_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        {
            let rt = bank(dir.path()).open().unwrap();
            rt.entity::<Account>("a").ask(100).await.unwrap();
            rt.transaction::<Transfer>(Move::new("a", "b", 40)).id("t-1").await.unwrap();
            rt.shutdown().await;
        }
        let rt = bank(dir.path()).open().unwrap();
        let again = rt.transaction::<Transfer>(Move::new("a", "b", 40)).id("t-1").await.unwrap();
        assert_eq!(again.kind(), OutcomeKind::Duplicate);
        assert_eq!(rt.entity::<Account>("a").snapshot().await.unwrap().state.cents, 60);
        assert_eq!(rt.entity::<Account>("b").snapshot().await.unwrap().state.cents, 40);
        // Unregistered: a typed error.
        struct Other;
        impl Transaction for Other {
            const NAME: &'static str = "other";
            type Command = ();
            type Reply = ();
            type Error = Never;
            fn members(_: &()) -> Members {
                Members::new().with::<Account>("a")
            }
            fn handle(_: &(), _: &mut TxContext<'_>) -> Result<(), Never> {
                Ok(())
            }
        }
        assert!(matches!(rt.transaction::<Other>(()).await, Err(SubmitError::NotRegistered { entity: "other" })));
        rt.shutdown().await;
    }
}

on_each_backend! {
    /// A runtime closing while transactions run: none hangs, each has either committed
    /// wholly or not at all (checked after reopening), and the answers say which
    /// (`Applied`, or an error: `Closed`, `ReplyLost`, a storage error on the way down).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runtime_closing_mid_transaction_leaves_each_whole_or_absent() {
        for round in 0..20u64 {
            let dir = tempfile::tempdir().unwrap();
            let rt = bank(dir.path()).open().unwrap();
            let mut senders = Vec::new();
            for s in 0..8u64 {
                let rt = rt.handle();
                senders.push(tokio::spawn(async move {
                    let mut applied = Vec::new();
                    for i in 0..200u64 {
                        let (from, to) = (format!("a-{}", (s + i) % 4), format!("a-{}", (s + i + 1) % 4));
                        let mut m = Move::new(&from, &to, 0);
                        if s % 2 == 1 {
                            m.accounts.reverse();
                        }
                        let id = format!("c{round}-s{s}-{i}");
                        match rt.transaction::<Transfer>(m).id(id.clone()).await {
                            Ok(o) if o.kind() == OutcomeKind::Applied => applied.push(id),
                            Ok(other) => panic!("{id}: {other:?}"),
                            Err(_) => return applied, // closed under it
                        }
                    }
                    applied
                }));
            }
            // Let some commit, then close with transactions in flight (the first replies
            // are the signal, not a sleep).
            rt.wait_until(|s| s.applied >= 20 + (round % 5) * 10).await;
            rt.close_now();
            let mut acknowledged = Vec::new();
            let all = async {
                for s in senders {
                    acknowledged.extend(s.await.unwrap());
                }
            };
            tokio::time::timeout(Duration::from_secs(60), all)
                .await
                .expect("a transaction hung across the close");
            let rt = bank(dir.path()).open().unwrap();
            let mut seen: std::collections::HashMap<String, u32> = Default::default();
            for a in 0..4 {
                let snap = rt.entity::<Account>(format!("a-{a}")).snapshot().await.unwrap();
                for id in snap.state.transfers {
                    *seen.entry(id).or_default() += 1;
                }
            }
            for (id, n) in &seen {
                assert_eq!(*n, 2, "round {round}: {id} in {n} account(s): half applied");
            }
            for id in &acknowledged {
                assert!(seen.contains_key(id), "round {round}: {id} acknowledged, then lost");
            }
            // The close came mid-run: some were applied, and not all of them.
            assert!(
                !acknowledged.is_empty() && acknowledged.len() < 1_600,
                "round {round}: {} of 1,600 acknowledged",
                acknowledged.len()
            );
            rt.shutdown().await;
        }
    }
}
