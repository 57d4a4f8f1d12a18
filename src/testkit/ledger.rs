//! The ledger: a fake outside world for effects that honours idempotency keys, as a real
//! payment provider or mail API must, and records what it actually performed.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::core::hash::splitmix64;
use crate::effects::{Effect, EffectContext, EffectError, Executor, Feedback};

/// One effect the outside world performed (once per effect key, however often it was
/// called).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub struct Performed {
    /// The effect type's name.
    pub effect: &'static str,
    /// The entity type that recorded it.
    pub entity: String,
    /// The entity key.
    pub key: String,
    /// The effect, as `{:?}`.
    pub payload: String,
    /// The message that recorded it (a generated id differs from run to run).
    pub message_id: String,
    /// Its index among that message's effects.
    pub index: u32,
}

impl fmt::Display for Performed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} for {}/{}: {}",
            self.effect, self.entity, self.key, self.payload
        )
    }
}

#[derive(Debug, Default)]
struct Book {
    /// By effect key: what was performed.
    performed: BTreeMap<String, Performed>,
    calls: u64,
    faults: u64,
    /// Effect keys called at least once while up: only a first call gets a fault.
    seen: HashSet<String>,
    /// Down for everything (`Chaos::outage`).
    down: bool,
    outage_calls: u64,
}

/// The outside world of one seed's run. [`Chaos`](super::Chaos) makes a fresh one per seed
/// and hands it to the setup closure; register its executors in place of the real ones.
///
/// ```
/// # use keystead::{Context, Effect, Entity, Failure, FailureKind};
/// # #[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
/// # #[error("never")] struct Never;
/// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// # struct Order;
/// # impl Entity for Order {
/// #     const NAME: &'static str = "order"; type State = (); type Command = (); type Reply = ();
/// #     type Error = Never;
/// #     fn handle(_: &mut (), _: &(), _: &mut Context<'_>) -> Result<(), Never> { Ok(()) }
/// # }
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// struct Charge { cents: u64 }
/// impl Effect for Charge { const NAME: &'static str = "charge"; type Origin = Order; }
///
/// use keystead::testkit::Chaos;
/// let chaos = Chaos::new(|builder, ledger| {
///     builder.register::<Order>().executor(ledger.executor::<Charge>())
/// });
/// # let _ = chaos;
/// ```
#[derive(Clone)]
pub struct Ledger {
    book: Arc<Mutex<Book>>,
    seed: u64,
    faults: bool,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let book = self.book.lock();
        f.debug_struct("Ledger")
            .field("performed", &book.performed.len())
            .field("calls", &book.calls)
            .finish()
    }
}

/// What the ledger does with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Refuse before performing: "service unavailable".
    Unavailable,
    /// Perform, then fail as if the reply had timed out.
    TimeoutAfterSuccess,
}

impl Ledger {
    pub(crate) fn new(seed: u64, faults: bool) -> Self {
        Self {
            book: Arc::default(),
            seed,
            faults,
        }
    }

    /// An executor for `T` that performs into this ledger and feeds nothing back.
    pub fn executor<T: Effect>(&self) -> LedgerExecutor<T> {
        self.executor_with(|_: &T, _: &EffectContext| None)
    }

    /// An executor for `T` that performs into this ledger and answers with
    /// `feedback(effect, ctx)`, a command delivered to the entity that recorded the effect
    /// (a captured payment, a delivery receipt).
    pub fn executor_with<T: Effect>(
        &self,
        feedback: impl Fn(&T, &EffectContext) -> Feedback<T> + Send + Sync + 'static,
    ) -> LedgerExecutor<T> {
        LedgerExecutor {
            ledger: self.clone(),
            feedback: Box::new(feedback),
        }
    }

    /// What was performed, sorted, once per effect key.
    pub fn performed(&self) -> Vec<Performed> {
        let mut all: Vec<Performed> = self.book.lock().performed.values().cloned().collect();
        all.sort();
        all
    }

    /// Calls received, repeats included.
    pub fn calls(&self) -> u64 {
        self.book.lock().calls
    }

    /// Faults injected (first calls refused or answered with a timeout).
    pub fn faults_injected(&self) -> u64 {
        self.book.lock().faults
    }

    /// Calls that met the outage ([`Chaos::outage`](super::Chaos::outage)).
    pub fn outage_calls(&self) -> u64 {
        self.book.lock().outage_calls
    }

    pub(crate) fn set_down(&self, down: bool) {
        self.book.lock().down = down;
    }

    /// The fault for this call: a pure function of the seed, the effect's origin, index and
    /// payload, so a replay injects the same faults. Only the first call for an effect key
    /// (made while the world is up) may fail, so every effect succeeds by its second call.
    /// (Not the attempt number: a circuit breaker gives a failed attempt back.)
    fn fault(&self, first_call: bool, ctx: &EffectContext, payload: &str) -> Fault {
        if !self.faults || !first_call {
            return Fault::None;
        }
        let key = ctx.effect_key();
        let mut h = self.seed;
        for part in [
            key.entity.as_bytes(),
            key.key.as_bytes(),
            &key.index.to_le_bytes(),
            payload.as_bytes(),
        ] {
            for &b in part {
                h = splitmix64(h ^ u64::from(b));
            }
            h = splitmix64(h ^ 0xff);
        }
        match h % 4 {
            0 => Fault::Unavailable,
            1 => Fault::TimeoutAfterSuccess,
            _ => Fault::None,
        }
    }
}

/// An [`Executor`] backed by a [`Ledger`]; see [`Ledger::executor`].
pub struct LedgerExecutor<T: Effect> {
    ledger: Ledger,
    feedback: FeedbackFn<T>,
}

type FeedbackFn<T> = Box<dyn Fn(&T, &EffectContext) -> Feedback<T> + Send + Sync>;

impl<T: Effect> fmt::Debug for LedgerExecutor<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerExecutor")
            .field("effect", &T::NAME)
            .finish_non_exhaustive()
    }
}

impl<T: Effect> Executor<T> for LedgerExecutor<T> {
    fn execute(&self, effect: &T, ctx: &EffectContext) -> Result<Feedback<T>, EffectError> {
        let payload = format!("{effect:?}");
        {
            let mut book = self.ledger.book.lock();
            book.calls += 1;
            if book.down {
                book.outage_calls += 1;
                return Err(EffectError::retryable(
                    "injected by the testkit: the outside world is down (Chaos::outage)",
                ));
            }
            let first_call = book.seen.insert(ctx.effect_key().to_string());
            let fault = self.ledger.fault(first_call, ctx, &payload);
            if fault == Fault::Unavailable {
                book.faults += 1;
                return Err(EffectError::retryable(
                    "injected by the testkit: service unavailable",
                ));
            }
            let key = ctx.effect_key();
            // Like a real provider: the idempotency key makes a repeat a no-op.
            book.performed
                .entry(key.to_string())
                .or_insert_with(|| Performed {
                    effect: T::NAME,
                    entity: key.entity.clone(),
                    key: key.key.clone(),
                    payload,
                    message_id: key.message_id.clone(),
                    index: key.index,
                });
            if fault == Fault::TimeoutAfterSuccess {
                book.faults += 1;
                return Err(EffectError::retryable(
                    "injected by the testkit: performed, then the reply timed out",
                ));
            }
        }
        Ok((self.feedback)(effect, ctx))
    }
}
