//! Goal: side effects run only for committed changes, at least once with a stable
//! idempotency key (so exactly once at a provider that honours the key), on their own
//! workers, in order per entity, with classified failures, dead letters and deduplicated
//! feedback.
//! Method: a fake provider counts calls and charges per idempotency key; the seeds'
//! "double-clicked Pay", "retry after a timeout that had succeeded" and "welcome email from
//! both the web request and a background job" run for 200 users with concurrent senders;
//! crashes are simulated by closing the runtime while an executor is held at a gate, then
//! reopening with a working executor.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use crossbeam_channel::{bounded, Receiver, Sender};
use keystead::{
    AsyncExecutor, Context, Effect, EffectContext, EffectError, EffectKey, EffectStatus, Entity,
    Executor, Failure, FailureKind, Feedback, OutcomeKind, RetryPolicy, RuntimeBuilder,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Account {
    welcomed: bool,
    orders: Vec<String>,
    captured: Vec<String>,
    notes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
enum AccountCmd {
    SignUp,
    Pay {
        order: String,
    },
    Captured {
        order: String,
        provider_ref: String,
    },
    /// Records a charge, then fails permanently: the charge must never run.
    PayThenReject {
        order: String,
    },
    /// Records a charge, then fails with a retryable error on every attempt.
    PayThenTimeOut {
        order: String,
    },
    Note,
    Audit,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
enum AccountError {
    #[error("order already paid")]
    AlreadyPaid,
    #[error("rejected")]
    Rejected,
    #[error("timed out")]
    Timeout,
}
impl Failure for AccountError {
    fn kind(&self) -> FailureKind {
        match self {
            AccountError::Timeout => FailureKind::Retryable,
            _ => FailureKind::Permanent,
        }
    }
}

struct AccountEntity;
impl Entity for AccountEntity {
    const NAME: &'static str = "account";
    type State = Account;
    type Command = AccountCmd;
    type Reply = bool;
    type Error = AccountError;
    fn handle(
        s: &mut Account,
        cmd: &AccountCmd,
        ctx: &mut Context<'_>,
    ) -> Result<bool, AccountError> {
        match cmd {
            AccountCmd::SignUp => {
                if s.welcomed {
                    return Ok(false);
                }
                s.welcomed = true;
                ctx.effect(SendWelcome {
                    to: ctx.key().to_string(),
                });
                Ok(true)
            }
            AccountCmd::Pay { order } => {
                if s.orders.contains(order) {
                    return Err(AccountError::AlreadyPaid);
                }
                s.orders.push(order.clone());
                ctx.effect(Charge {
                    order: order.clone(),
                });
                Ok(true)
            }
            AccountCmd::Captured { provider_ref, .. } => {
                s.captured.push(provider_ref.clone());
                Ok(true)
            }
            AccountCmd::PayThenReject { order } => {
                ctx.effect(Charge {
                    order: order.clone(),
                });
                Err(AccountError::Rejected)
            }
            AccountCmd::PayThenTimeOut { order } => {
                ctx.effect(Charge {
                    order: order.clone(),
                });
                Err(AccountError::Timeout)
            }
            AccountCmd::Note => {
                s.notes += 1;
                Ok(true)
            }
            AccountCmd::Audit => {
                ctx.effect(AuditEntry { n: s.notes });
                Ok(true)
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SendWelcome {
    to: String,
}
impl Effect for SendWelcome {
    const NAME: &'static str = "send_welcome";
    type Origin = AccountEntity;
}

#[derive(Debug, Serialize, Deserialize)]
struct Charge {
    order: String,
}
impl Effect for Charge {
    const NAME: &'static str = "charge";
    type Origin = AccountEntity;
}

#[derive(Debug, Serialize, Deserialize)]
struct AuditEntry {
    n: u64,
}
impl Effect for AuditEntry {
    const NAME: &'static str = "audit";
    const INDEPENDENT: bool = true;
    type Origin = AccountEntity;
}

/// A provider that honours idempotency keys: it counts every call per key, performs the
/// work once per key, and can be switched down.
#[derive(Default)]
struct Provider {
    calls: Mutex<HashMap<String, u32>>,
    performed: Mutex<Vec<String>>,
    down: AtomicBool,
}

impl Provider {
    fn call(&self, key: &EffectKey) -> Result<String, EffectError> {
        let key = key.to_string();
        *self.calls.lock().unwrap().entry(key.clone()).or_default() += 1;
        if self.down.load(Ordering::SeqCst) {
            return Err(EffectError::retryable("provider down"));
        }
        let mut performed = self.performed.lock().unwrap();
        if !performed.contains(&key) {
            performed.push(key.clone());
        }
        Ok(format!("ref-{key}"))
    }
    fn calls(&self, key: &EffectKey) -> u32 {
        self.calls
            .lock()
            .unwrap()
            .get(&key.to_string())
            .copied()
            .unwrap_or(0)
    }
    fn performed_for(&self, entity_key: &str) -> Vec<String> {
        let needle = format!("account/{entity_key}/");
        self.performed
            .lock()
            .unwrap()
            .iter()
            .filter(|k| k.starts_with(&needle))
            .cloned()
            .collect()
    }
}

struct Payments(Arc<Provider>);
impl Executor<Charge> for Payments {
    fn execute(
        &self,
        charge: &Charge,
        ctx: &EffectContext,
    ) -> Result<Feedback<Charge>, EffectError> {
        let provider_ref = self.0.call(ctx.effect_key())?;
        Ok(Some(AccountCmd::Captured {
            order: charge.order.clone(),
            provider_ref,
        }))
    }
}

struct Mailer(Arc<Provider>);
impl Executor<SendWelcome> for Mailer {
    fn execute(
        &self,
        _: &SendWelcome,
        ctx: &EffectContext,
    ) -> Result<Feedback<SendWelcome>, EffectError> {
        self.0.call(ctx.effect_key()).map(|_| None)
    }
}

struct Auditor(Arc<Provider>);
impl AsyncExecutor<AuditEntry> for Auditor {
    async fn execute(
        &self,
        _: AuditEntry,
        ctx: EffectContext,
    ) -> Result<Feedback<AuditEntry>, EffectError> {
        // A separate "service" that is never down.
        let key = ctx.effect_key().to_string();
        *self.0.calls.lock().unwrap().entry(key.clone()).or_default() += 1;
        self.0.performed.lock().unwrap().push(key);
        Ok(None)
    }
}

fn effect_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .attempts_max(attempts)
        .backoff_initial(Duration::from_millis(1))
        .backoff_max(Duration::from_millis(4))
}

fn base(path: &std::path::Path) -> RuntimeBuilder {
    runtime_builder(path)
        .shards(2)
        .retry(fast_retry(3))
        .effect_retry(effect_retry(5))
        .register::<AccountEntity>()
}

fn with_all(path: &std::path::Path, provider: &Arc<Provider>) -> RuntimeBuilder {
    base(path)
        .executor::<Charge>(Payments(provider.clone()))
        .executor::<SendWelcome>(Mailer(provider.clone()))
        .async_executor::<AuditEntry>(Auditor(provider.clone()))
}

/// A runtime whose provider is down, with effects retried (almost) forever: an effect stays
/// stuck until the test brings the provider back.
fn with_provider_down(path: &std::path::Path) -> (Arc<Provider>, keystead::Runtime) {
    let provider = Arc::new(Provider::default());
    provider.down.store(true, Ordering::SeqCst);
    let rt = with_all(path, &provider)
        .effect_retry(effect_retry(100_000))
        .open()
        .unwrap();
    (provider, rt)
}

fn charge_key(user: &str, message_id: &str) -> EffectKey {
    EffectKey::new("account", user, message_id, 0)
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_races_charge_once_and_welcome_once_for_200_users() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let rt = with_all(dir.path(), &provider).open().unwrap();
    const USERS: usize = 200;
    let tasks: Vec<_> = (0..USERS)
        .map(|u| {
            let user = rt.entity::<AccountEntity>(format!("u{u}"));
            tokio::spawn(async move {
                // The web request and the background job both try to welcome the user.
                let web = user.ask(AccountCmd::SignUp).id(format!("signup-u{u}"));
                let job = user
                    .tell(AccountCmd::SignUp)
                    .id(format!("welcome-job-u{u}"));
                // The user double-clicks "Pay".
                let pay = || {
                    user.ask(AccountCmd::Pay {
                        order: format!("o{u}"),
                    })
                    .id(format!("pay-u{u}"))
                };
                let (web, job, click1, click2) = tokio::join!(web, job, pay(), pay());
                web.unwrap();
                job.unwrap();
                let (click1, click2) = (click1.unwrap(), click2.unwrap());
                assert_eq!(
                    click1.reply(),
                    click2.reply(),
                    "both clicks get the same answer"
                );
                // The client timed out although the payment went through, and retries.
                let retry = pay().await.unwrap();
                assert_eq!(retry.kind(), OutcomeKind::Duplicate);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    rt.idle().await;
    for u in 0..USERS {
        let user = format!("u{u}");
        let charge = charge_key(&user, &format!("pay-u{u}"));
        assert_eq!(provider.calls(&charge), 1, "one charge call for {user}");
        let welcome_calls: u32 = ["signup", "welcome-job"]
            .iter()
            .map(|p| provider.calls(&EffectKey::new("account", &user, format!("{p}-u{u}"), 0)))
            .sum();
        assert_eq!(welcome_calls, 1, "one welcome email for {user}");
        assert_eq!(
            provider.performed_for(&user).len(),
            2,
            "{user}: one charge + one email"
        );
        let state = rt
            .entity::<AccountEntity>(user.as_str())
            .snapshot().await
            .unwrap()
            .state;
        assert_eq!(
            state.captured,
            vec![format!("ref-{charge}")],
            "feedback applied once"
        );
        assert_eq!(
            rt.effect(&charge).await.unwrap().unwrap().status,
            EffectStatus::Done
        );
    }
    assert_eq!(rt.stats().effects_done, (2 * USERS) as u64);
    rt.shutdown().await;
}
}

/// Holds its executor until the test drops the sender; never calls the provider.
struct HeldBefore(Receiver<()>);
impl Executor<Charge> for HeldBefore {
    fn execute(&self, _: &Charge, _: &EffectContext) -> Result<Feedback<Charge>, EffectError> {
        let _ = self.0.recv();
        Err(EffectError::retryable("released"))
    }
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_execution_runs_the_effect_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let (release, held) = bounded::<()>(0);
    {
        let rt = base(dir.path())
            .executor::<Charge>(HeldBefore(held))
            .open()
            .unwrap();
        let out = rt
            .entity::<AccountEntity>("a")
            .ask(AccountCmd::Pay { order: "o1".into() })
            .id("pay-1")
            .await
            .unwrap();
        assert_eq!(out.kind(), OutcomeKind::Applied);
        rt.close_now(); // the process "dies" with the effect committed but not performed
    }
    assert_eq!(provider.calls(&charge_key("a", "pay-1")), 0);
    let rt = with_all(dir.path(), &provider).open().unwrap();
    rt.idle().await;
    drop(release);
    assert_eq!(provider.calls(&charge_key("a", "pay-1")), 1);
    let state = rt.entity::<AccountEntity>("a").snapshot().await.unwrap().state;
    assert_eq!(state.captured.len(), 1);
    rt.shutdown().await;
}
}

/// Calls the provider, reports it, then hangs: the process dies before the effect is
/// marked done.
struct HeldAfter {
    provider: Arc<Provider>,
    called: Sender<()>,
    held: Receiver<()>,
}
impl Executor<Charge> for HeldAfter {
    fn execute(&self, _: &Charge, ctx: &EffectContext) -> Result<Feedback<Charge>, EffectError> {
        self.provider.call(ctx.effect_key())?;
        let _ = self.called.send(());
        let _ = self.held.recv();
        Err(EffectError::retryable("released"))
    }
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_provider_call_repeats_it_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let (called_tx, called) = bounded::<()>(1);
    let (release, held) = bounded::<()>(0);
    let key = charge_key("a", "pay-1");
    {
        let executor = HeldAfter {
            provider: provider.clone(),
            called: called_tx,
            held,
        };
        let rt = base(dir.path())
            .executor::<Charge>(executor)
            .open()
            .unwrap();
        rt.entity::<AccountEntity>("a")
            .ask(AccountCmd::Pay { order: "o1".into() })
            .id("pay-1")
            .await
            .unwrap();
        // A bounded wait turns a hang into a failure; the signal comes from the executor.
        called
            .recv_timeout(Duration::from_secs(30))
            .expect("the executor called the provider");
        assert_eq!(
            rt.effect(&key).await.unwrap().unwrap().status,
            EffectStatus::Running
        );
        rt.close_now();
    }
    let rt = with_all(dir.path(), &provider).open().unwrap();
    rt.idle().await;
    drop(release);
    assert_eq!(
        provider.calls(&key),
        2,
        "the provider saw the same key twice"
    );
    assert_eq!(provider.performed_for("a").len(), 1, "and charged once");
    let info = rt.effect(&key).await.unwrap().unwrap();
    assert_eq!((info.status, info.attempts), (EffectStatus::Done, 2));
    let state = rt.entity::<AccountEntity>("a").snapshot().await.unwrap().state;
    assert_eq!(state.captured.len(), 1, "feedback applied once");
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_down_provider_never_blocks_the_entity_and_effects_catch_up_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (provider, rt) = with_provider_down(dir.path());
    let user = rt.entity::<AccountEntity>("busy");
    user.ask(AccountCmd::Pay { order: "o1".into() })
        .id("pay-1")
        .await
        .unwrap();
    rt.wait_until(|s| s.effect_retries >= 3).await;
    // The provider is down and its effect keeps retrying: the entity keeps working.
    for i in 0..20 {
        let out = user
            .ask(AccountCmd::Note)
            .id(format!("note-{i}"))
            .await
            .unwrap();
        assert_eq!(out.kind(), OutcomeKind::Applied);
    }
    for o in 2..=4 {
        user.ask(AccountCmd::Pay {
            order: format!("o{o}"),
        })
        .id(format!("pay-{o}"))
        .await
        .unwrap();
    }
    assert_eq!(rt.stats().effects_done, 0, "nothing performed while down");
    assert_eq!(user.snapshot().await.unwrap().state.notes, 20);
    provider.down.store(false, Ordering::SeqCst);
    rt.idle().await;
    let expected: Vec<String> = (1..=4)
        .map(|o| charge_key("busy", &format!("pay-{o}")).to_string())
        .collect();
    assert_eq!(
        provider.performed_for("busy"),
        expected,
        "caught up in recorded order"
    );
    assert_eq!(user.snapshot().await.unwrap().state.captured.len(), 4);
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_of_messages_that_did_not_apply_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let rt = with_all(dir.path(), &provider).open().unwrap();
    let user = rt.entity::<AccountEntity>("u");
    user.ask(AccountCmd::Pay { order: "o1".into() })
        .id("pay-1")
        .version(5)
        .await
        .unwrap();
    // Duplicate: the same id again.
    let dup = user
        .ask(AccountCmd::Pay { order: "o1".into() })
        .id("pay-1")
        .version(5)
        .await
        .unwrap();
    assert_eq!(dup.kind(), OutcomeKind::Duplicate);
    // Stale: an older version.
    let stale = user
        .ask(AccountCmd::Pay { order: "o2".into() })
        .id("pay-2")
        .version(4)
        .await
        .unwrap();
    assert_eq!(stale.kind(), OutcomeKind::Stale);
    // Rejected: the handler recorded a charge, then refused.
    let rejected = user
        .ask(AccountCmd::PayThenReject { order: "o3".into() })
        .id("pay-3")
        .await
        .unwrap();
    assert_eq!(rejected.kind(), OutcomeKind::Rejected);
    // Failed: every attempt recorded a charge and timed out.
    let failed = user
        .ask(AccountCmd::PayThenTimeOut { order: "o4".into() })
        .id("pay-4")
        .await
        .unwrap();
    assert_eq!(failed.kind(), OutcomeKind::DeadLettered);
    rt.idle().await;
    assert_eq!(
        provider.performed_for("u"),
        vec![charge_key("u", "pay-1").to_string()]
    );
    let recorded = rt.effects_of::<AccountEntity>("u").await.unwrap();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    for id in ["pay-2", "pay-3", "pay-4"] {
        assert_eq!(provider.calls(&charge_key("u", id)), 0, "{id}");
        assert!(rt.effect(&charge_key("u", id)).await.unwrap().is_none(), "{id}");
    }
    rt.shutdown().await;
}
}

/// Refuses every order whose name starts with "bad"; otherwise delegates.
struct Picky(Arc<Provider>);
impl Executor<Charge> for Picky {
    fn execute(
        &self,
        charge: &Charge,
        ctx: &EffectContext,
    ) -> Result<Feedback<Charge>, EffectError> {
        if charge.order.starts_with("bad") {
            return Err(EffectError::permanent("card declined"));
        }
        Payments(self.0.clone()).execute(charge, ctx)
    }
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effect_failures_are_classified_and_dead_letters_can_be_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let rt = base(dir.path())
        .executor::<Charge>(Picky(provider.clone()))
        .effect_retry(effect_retry(3))
        .open()
        .unwrap();
    let user = rt.entity::<AccountEntity>("f");
    user.ask(AccountCmd::Pay {
        order: "bad-card".into(),
    })
    .id("pay-bad")
    .await
    .unwrap();
    rt.idle().await;
    let declined = rt.effect(&charge_key("f", "pay-bad")).await.unwrap().unwrap();
    assert_eq!(
        (declined.status, declined.attempts),
        (EffectStatus::Failed, 1),
        "never retried"
    );
    assert_eq!(declined.last_error.as_deref(), Some("card declined"));

    provider.down.store(true, Ordering::SeqCst);
    user.ask(AccountCmd::Pay { order: "o2".into() })
        .id("pay-2")
        .await
        .unwrap();
    rt.idle().await;
    let key = charge_key("f", "pay-2");
    let dead = rt.effect(&key).await.unwrap().unwrap();
    assert_eq!(
        (dead.status, dead.attempts),
        (EffectStatus::DeadLettered, 3)
    );
    assert_eq!(rt.effect_dead_letters().await.unwrap().len(), 1);
    assert_eq!(rt.stats().effects_dead_lettered, 1);

    provider.down.store(false, Ordering::SeqCst);
    assert!(rt.requeue_effect(&key).await.unwrap());
    rt.idle().await;
    assert!(
        !rt.requeue_effect(&key).await.unwrap(),
        "nothing left to requeue"
    );
    let done = rt.effect(&key).await.unwrap().unwrap();
    assert_eq!(done.status, EffectStatus::Done);
    assert_eq!(
        provider.calls(&key),
        4,
        "3 failed attempts, then one after the requeue"
    );
    assert!(rt.effect_dead_letters().await.unwrap().is_empty());
    assert_eq!(user.snapshot().await.unwrap().state.captured.len(), 1);
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_effects_do_not_wait_behind_a_stuck_one() {
    let dir = tempfile::tempdir().unwrap();
    let (provider, rt) = with_provider_down(dir.path());
    let user = rt.entity::<AccountEntity>("i");
    user.ask(AccountCmd::Pay { order: "o1".into() })
        .id("pay-1")
        .await
        .unwrap();
    user.ask(AccountCmd::Audit).id("audit-1").await.unwrap();
    // A bounded wait only turns a failure into a clear message; success wakes it.
    tokio::time::timeout(
        Duration::from_secs(60),
        rt.wait_until(|s| s.effects_done >= 1),
    )
    .await
    .expect("the independent effect ran while the ordered one was stuck");
    assert_eq!(
        provider.calls(&EffectKey::new("account", "i", "audit-1", 0)),
        1
    );
    // The charge is still retrying (between attempts or in one), not done.
    let stuck = rt
        .effect(&charge_key("i", "pay-1")).await
        .unwrap()
        .unwrap()
        .status;
    assert!(
        matches!(stuck, EffectStatus::Pending | EffectStatus::Running),
        "{stuck:?}"
    );
    assert_eq!(
        rt.stats().effects_done,
        1,
        "only the independent effect is done"
    );
    provider.down.store(false, Ordering::SeqCst);
    rt.idle().await;
    assert_eq!(
        rt.effect(&charge_key("i", "pay-1")).await
            .unwrap()
            .unwrap()
            .status,
        EffectStatus::Done
    );
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_without_an_executor_dead_letters_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let rt = base(dir.path())
        .executor::<Charge>(Payments(provider))
        .open()
        .unwrap();
    let out = rt
        .entity::<AccountEntity>("m")
        .ask(AccountCmd::SignUp)
        .await
        .unwrap();
    match out {
        keystead::Outcome::DeadLettered { error, .. } => assert!(
            error.contains("no executor for effect send_welcome"),
            "{error}"
        ),
        other => panic!("expected a dead letter, got {other:?}"),
    }
    assert!(
        !rt.entity::<AccountEntity>("m")
            .snapshot().await
            .unwrap()
            .state
            .welcomed,
        "not applied"
    );
    rt.shutdown().await;
}
}

/// Panics on the first attempt, then delegates.
struct PanicsOnce(Arc<Provider>);
impl Executor<Charge> for PanicsOnce {
    fn execute(
        &self,
        charge: &Charge,
        ctx: &EffectContext,
    ) -> Result<Feedback<Charge>, EffectError> {
        if ctx.attempt() == 1 {
            panic!("handler bug in the executor");
        }
        Payments(self.0.clone()).execute(charge, ctx)
    }
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_executor_is_a_retryable_failure_of_that_effect() {
    quiet_panics();
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let rt = base(dir.path())
        .executor::<Charge>(PanicsOnce(provider.clone()))
        .open()
        .unwrap();
    rt.entity::<AccountEntity>("p")
        .ask(AccountCmd::Pay { order: "o1".into() })
        .id("pay-1")
        .await
        .unwrap();
    rt.idle().await;
    let info = rt.effect(&charge_key("p", "pay-1")).await.unwrap().unwrap();
    assert_eq!((info.status, info.attempts), (EffectStatus::Done, 2));
    assert!(info.last_error.unwrap().contains("executor panicked"));
    assert_eq!(provider.calls(&charge_key("p", "pay-1")), 1);
    rt.shutdown().await;
}
}

on_each_backend! {
/// Regression (found by tests/crash_torture.rs): the sequence in outbox keys restarted from
/// the inbox's highest entry at open, so after a reopen with an empty inbox a new effect of
/// the same entity reused a pending effect's key and overwrote it; that effect never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_effect_survives_a_reopen_followed_by_new_effects() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let (release, held) = bounded::<()>(0);
    {
        let rt = base(dir.path())
            .executor::<Charge>(HeldBefore(held.clone()))
            .open()
            .unwrap();
        rt.entity::<AccountEntity>("s")
            .ask(AccountCmd::Pay { order: "o1".into() })
            .id("pay-1")
            .await
            .unwrap();
        rt.close_now();
    }
    {
        // Reopen (inbox empty) and record a second effect for the same entity.
        let rt = base(dir.path())
            .executor::<Charge>(HeldBefore(held))
            .open()
            .unwrap();
        rt.entity::<AccountEntity>("s")
            .ask(AccountCmd::Pay { order: "o2".into() })
            .id("pay-2")
            .await
            .unwrap();
        assert!(
            rt.effect(&charge_key("s", "pay-1")).await.unwrap().is_some(),
            "the first effect is still recorded"
        );
        rt.close_now();
    }
    let rt = with_all(dir.path(), &provider).open().unwrap();
    rt.idle().await;
    drop(release);
    assert_eq!(provider.calls(&charge_key("s", "pay-1")), 1);
    assert_eq!(provider.calls(&charge_key("s", "pay-2")), 1);
    rt.shutdown().await;
}
}

on_each_backend! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_effects_leave_the_history_after_the_retention_window() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(Provider::default());
    let clock = keystead::ManualClock::new(1_000_000);
    let rt = with_all(dir.path(), &provider)
        .clock(clock.clone())
        .dedup_retention(Duration::from_secs(60))
        .effect_retry(effect_retry(1))
        .open()
        .unwrap();
    let user = rt.entity::<AccountEntity>("h");
    user.ask(AccountCmd::Pay { order: "o1".into() })
        .id("pay-1")
        .await
        .unwrap();
    rt.idle().await; // the first charge is done before the provider goes down
    provider.down.store(true, Ordering::SeqCst);
    user.ask(AccountCmd::Pay { order: "o2".into() })
        .id("pay-2")
        .await
        .unwrap();
    rt.idle().await;
    assert_eq!(
        rt.effect(&charge_key("h", "pay-2")).await
            .unwrap()
            .unwrap()
            .status,
        EffectStatus::DeadLettered
    );
    clock.advance(Duration::from_secs(60));
    rt.purge_expired_dedup().unwrap();
    assert!(
        rt.effect(&charge_key("h", "pay-1")).await.unwrap().is_some(),
        "kept inside the window"
    );
    clock.advance(Duration::from_millis(1));
    let removed = rt.purge_expired_dedup().unwrap();
    let left = rt.effect(&charge_key("h", "pay-1")).await.unwrap();
    assert!(
        left.is_none(),
        "done: purged after it ({removed} removed, now {}): {left:?}",
        keystead::Clock::now_ms(&clock)
    );
    assert!(
        rt.effect(&charge_key("h", "pay-2")).await.unwrap().is_some(),
        "dead letters are kept"
    );
    rt.shutdown().await;
}
}
