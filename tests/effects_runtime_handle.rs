//! Goal: work that continues on another entity (issue 14). An effect executor reaches any
//! entity through `EffectContext::runtime()`, which carries the correlation id on and closes
//! with the runtime; a saga built on it compensates exactly once, even when its step runs
//! twice.
//! Method: an account wires money to an outside bank (an effect). The bank refuses some
//! wires; the executor then refunds the account through the handle, with an id derived from
//! the effect key, and notes every step in a journal entity. The executor's first attempt
//! of each wire fails after doing its work (a timeout after success), so every step runs
//! twice: the refunds and notes must still apply once, and carry the wire's correlation id.

mod common;

use std::sync::Arc;

use common::*;
use keystead::{
    Context, Effect, EffectContext, EffectError, Entity, Executor, Feedback, Outcome, RuntimeHandle,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
enum AccountCmd {
    Wire { cents: i64, to: String },
    Refund { cents: i64 },
}

struct Account;
impl Entity for Account {
    const NAME: &'static str = "account";
    type State = i64;
    type Command = AccountCmd;
    type Reply = i64;
    type Error = Never;
    fn handle(balance: &mut i64, cmd: &AccountCmd, ctx: &mut Context<'_>) -> Result<i64, Never> {
        match cmd {
            AccountCmd::Wire { cents, to } => {
                *balance -= cents;
                ctx.effect(WireOut {
                    cents: *cents,
                    to: to.clone(),
                });
            }
            AccountCmd::Refund { cents } => *balance += cents,
        }
        Ok(*balance)
    }
}

/// The journal: every saga step, with the correlation id it came with.
struct Journal;
impl Entity for Journal {
    const NAME: &'static str = "journal";
    type State = Vec<(String, String)>;
    type Command = String;
    type Reply = ();
    type Error = Never;
    fn handle(
        notes: &mut Vec<(String, String)>,
        note: &String,
        ctx: &mut Context<'_>,
    ) -> Result<(), Never> {
        notes.push((note.clone(), ctx.correlation_id().to_string()));
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WireOut {
    cents: i64,
    to: String,
}
impl Effect for WireOut {
    const NAME: &'static str = "wire-out";
    type Origin = Account;
}

/// The outside bank and the saga step: refuses wires to "closed-*" accounts; then refunds.
#[derive(Clone, Default)]
struct Bank {
    wired: Arc<Mutex<Vec<String>>>,
    attempts: Arc<Mutex<std::collections::HashMap<String, u32>>>,
}

impl Executor<WireOut> for Bank {
    fn execute(&self, w: &WireOut, ctx: &EffectContext) -> Result<Feedback<WireOut>, EffectError> {
        let key = ctx.effect_key().to_string();
        let attempt = {
            let mut attempts = self.attempts.lock();
            let n = attempts.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        let rt: RuntimeHandle = ctx.runtime();
        let account = ctx.effect_key().key.clone();
        // Executors are synchronous here: run the async sends on a small runtime of their
        // own (an AsyncExecutor would await them directly).
        let block = |f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| EffectError::retryable(e.to_string()))
                .map(|r| r.block_on(f))
        };
        if w.to.starts_with("closed-") {
            // Compensate: refund the account, once per wire whatever the attempts.
            let (rt2, key2, account2, cents) = (rt.clone(), key.clone(), account.clone(), w.cents);
            block(Box::pin(async move {
                rt2.entity::<Account>(account2)
                    .tell(AccountCmd::Refund { cents })
                    .id(format!("refund:{key2}"))
                    .await
                    .expect("refund accepted");
                rt2.entity::<Journal>("j")
                    .tell(format!("refunded {cents} for {key2}"))
                    .id(format!("note-refund:{key2}"))
                    .await
                    .expect("note accepted");
            }))?;
        } else {
            if attempt == 1 {
                self.wired.lock().push(key.clone());
            }
            let key2 = key.clone();
            block(Box::pin(async move {
                rt.entity::<Journal>("j")
                    .tell(format!("wired for {key2}"))
                    .id(format!("note-wire:{key2}"))
                    .await
                    .expect("note accepted");
            }))?;
        }
        if attempt == 1 {
            // The work is done, but the reply is lost: the step runs again.
            return Err(EffectError::retryable("timed out after the bank answered"));
        }
        Ok(None)
    }
}

on_each_backend! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_saga_step_compensates_once_through_the_runtime_handle() {
        let dir = tempfile::tempdir().unwrap();
        let bank = Bank::default();
        let rt = runtime_builder(dir.path())
            .shards(2)
            .retry(fast_retry(3))
            .effect_retry(fast_retry(5))
            .register::<Account>()
            .register::<Journal>()
            .executor::<WireOut>(bank.clone())
            .open()
            .unwrap();
        let alice = rt.entity::<Account>("alice");
        alice.ask(AccountCmd::Refund { cents: 1_000 }).id("open").await.unwrap();
        let wires = [("w-1", "bob", 100), ("w-2", "closed-carol", 250), ("w-3", "dave", 50), ("w-4", "closed-erin", 75)];
        for (id, to, cents) in wires {
            let outcome = alice
                .ask(AccountCmd::Wire { cents, to: to.into() })
                .id(id)
                .correlation_id(format!("corr-{id}"))
                .await
                .unwrap();
            assert!(matches!(outcome, Outcome::Applied { .. }));
        }
        rt.idle().await;
        // Refused wires refunded exactly once, though each step ran twice.
        assert_eq!(alice.snapshot().await.unwrap().state, 1_000 - 100 - 50);
        assert_eq!(bank.wired.lock().len(), 2);
        assert!(bank.attempts.lock().values().all(|n| *n == 2), "every step ran twice");
        // Each note once, with the correlation id of the wire that started the saga.
        let mut notes = rt.entity::<Journal>("j").snapshot().await.unwrap().state;
        notes.sort();
        assert_eq!(notes.len(), 4, "{notes:?}");
        for (id, to, _) in wires {
            let note = notes
                .iter()
                .find(|(_, corr)| *corr == format!("corr-{id}"))
                .unwrap_or_else(|| panic!("no note for {id}: {notes:?}"));
            let expected = if to.starts_with("closed-") { "refunded" } else { "wired" };
            assert!(note.0.starts_with(expected), "{note:?}");
        }
        // A handle outlives nothing: after shutdown it says closed and sends fail.
        let handle = rt.handle().with_correlation_id("late");
        rt.shutdown().await;
        assert!(handle.is_closed());
        let late = handle.entity::<Journal>("j").tell("late".into()).await;
        assert!(matches!(late, Err(keystead::SubmitError::Closed { .. })), "{late:?}");
    }
}
