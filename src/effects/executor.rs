//! What users implement to perform effects ([`Executor`], [`AsyncExecutor`]), and the
//! type-erased form the workers call ([`Registered`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::core::codec;
use crate::core::limits::{BreakerPolicy, Rate};
use crate::entity::Entity;

use crate::core::effect::{EffectContext, EffectError};
use crate::entity::{Effect, Feedback};

/// Performs effects of type `T` on a blocking worker thread.
///
/// See [`Effect`] for an example.
pub trait Executor<T: Effect>: Send + Sync + 'static {
    /// Performs `effect`. Pass [`EffectContext::effect_key`] to the outside service as its
    /// idempotency key: the same effect may run again after a crash.
    ///
    /// # Errors
    /// [`EffectError::Retryable`] to retry with backoff (then dead-letter), or
    /// [`EffectError::Permanent`] to record the failure and never retry.
    fn execute(&self, effect: &T, ctx: &EffectContext) -> Result<Feedback<T>, EffectError>;
}

/// Performs effects of type `T` asynchronously, on the effect workers' tokio runtime.
///
/// ```
/// # use keystead::{AsyncExecutor, Effect, EffectContext, EffectError, Feedback};
/// # use keystead::{Context, Entity, Failure, FailureKind};
/// # #[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
/// # #[error("x")] struct X;
/// # impl Failure for X { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// # struct User;
/// # impl Entity for User {
/// #     const NAME: &'static str = "user"; type State = (); type Command = (); type Reply = (); type Error = X;
/// #     fn handle(_: &mut (), _: &(), _: &mut Context<'_>) -> Result<(), X> { Ok(()) }
/// # }
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// struct Welcome { to: String }
/// impl Effect for Welcome { const NAME: &'static str = "welcome"; type Origin = User; }
///
/// struct Mailer;
/// impl AsyncExecutor<Welcome> for Mailer {
///     async fn execute(&self, mail: Welcome, ctx: EffectContext) -> Result<Feedback<Welcome>, EffectError> {
///         // mail_api.send(&mail.to, idempotency_key = ctx.effect_key()).await
///         Ok(None)
///     }
/// }
/// ```
pub trait AsyncExecutor<T: Effect>: Send + Sync + 'static {
    /// Performs `effect`; see [`Executor::execute`].
    fn execute(
        &self,
        effect: T,
        ctx: EffectContext,
    ) -> impl Future<Output = Result<Feedback<T>, EffectError>> + Send;
}

type Outcome = Result<Option<Vec<u8>>, EffectError>;
type Running = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// The limits of one effect type, set with
/// [`RuntimeBuilder::effect_limits`](crate::RuntimeBuilder::effect_limits): how many of its
/// attempts run at once, how many start per period, how long one may take, and a circuit
/// breaker. They hold for that type alone: work the limits hold back waits without holding
/// an effect worker (its entity is parked, on disk and in a small queue of the type, and
/// woken in lane order when the type may go again), so effects of other types and the fast
/// path do not notice.
///
/// ```
/// use std::time::Duration;
/// use keystead::{BreakerPolicy, EffectLimits, Rate};
/// let limits = EffectLimits::default()
///     .concurrency(8)
///     .rate(Rate::new(100, Duration::from_secs(1)))
///     .rate(Rate::new(5_000, Duration::from_secs(3_600)))
///     .attempt_timeout(Duration::from_secs(10))
///     .breaker(BreakerPolicy::consecutive(5).cool_down(Duration::from_secs(30)));
/// assert_eq!(limits.get_attempt_timeout(), Some(Duration::from_secs(10)));
/// assert_eq!(limits.get_rates().len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct EffectLimits {
    attempt_timeout: Option<Duration>,
    concurrency: Option<u32>,
    rates: Vec<Rate>,
    breaker: Option<BreakerPolicy>,
}

impl EffectLimits {
    /// How long one attempt may take. An attempt still running then is a retryable failure
    /// ("timed out"), retried under the effect retry policy with the same effect key. An
    /// async executor's attempt is cancelled; a blocking executor's thread cannot be
    /// stopped: it runs on, its result is discarded, and the provider may see the key twice
    /// (which the key is for). Default: none.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// At most `attempts` of this type run at once (zero is refused at open). Default: only
    /// `effects_running_max`, shared with every type.
    pub fn concurrency(mut self, attempts: u32) -> Self {
        self.concurrency = Some(attempts);
        self
    }

    /// Adds a rate limit on attempts started (a token bucket, see [`Rate`]). Several hold
    /// together: an attempt starts only when every one has a token. Default: none.
    pub fn rate(mut self, rate: Rate) -> Self {
        self.rates.push(rate);
        self
    }

    /// A circuit breaker for this type (see [`BreakerPolicy`]). While it is open, the
    /// type's effects wait without spending attempts; after the cool-down one probe goes,
    /// and its success closes the breaker, which lets the waiting effects go in lane order
    /// (at the rate limit, if any). A retryable failure after which the breaker is open (the
    /// one that opened it, a failed probe, one that ended while it was open) is the
    /// provider's, not the effect's: it is not counted against the effect retry policy's
    /// `attempts_max`, so an outage of any length dead-letters nothing. Default: none.
    pub fn breaker(mut self, policy: BreakerPolicy) -> Self {
        self.breaker = Some(policy);
        self
    }

    /// The per-attempt timeout, if any.
    pub fn get_attempt_timeout(&self) -> Option<Duration> {
        self.attempt_timeout
    }

    /// The concurrency limit, if any.
    pub fn get_concurrency(&self) -> Option<u32> {
        self.concurrency
    }

    /// The rate limits.
    pub fn get_rates(&self) -> &[Rate] {
        &self.rates
    }

    /// The breaker policy, if any.
    pub fn get_breaker(&self) -> Option<&BreakerPolicy> {
        self.breaker.as_ref()
    }

    /// True when something beyond the timeout needs the type's gate.
    pub(crate) fn gated(&self) -> bool {
        self.concurrency.is_some() || !self.rates.is_empty() || self.breaker.is_some()
    }

    /// What is wrong with these limits, if anything.
    pub(crate) fn invalid(&self) -> Option<String> {
        if self.attempt_timeout.is_some_and(|t| t.is_zero()) {
            return Some("an attempt timeout of zero, which would fail every attempt; give it more than zero".into());
        }
        if self.concurrency == Some(0) {
            return Some(
                "a concurrency of zero, which would run nothing; give it at least 1".into(),
            );
        }
        if let Some(rate) = self.rates.iter().find(|r| !r.is_valid()) {
            return Some(format!("the rate {rate:?}, which lets nothing through; give it a count and a period of at least 1 ms"));
        }
        self.breaker
            .as_ref()
            .and_then(BreakerPolicy::invalid)
            .map(str::to_string)
    }
}

/// A registered executor with its types erased: payload bytes in, encoded feedback out.
pub(crate) struct Registered {
    pub origin: &'static str,
    pub(crate) run: Arc<dyn Fn(Vec<u8>, EffectContext) -> Running + Send + Sync>,
    pub(crate) limits: EffectLimits,
    /// `Effect::COALESCE` of the type.
    pub(crate) coalesce: bool,
}

impl Registered {
    pub(crate) fn blocking<T: Effect, X: Executor<T>>(executor: X) -> Self {
        let executor = Arc::new(executor);
        Self {
            origin: <T::Origin as Entity>::NAME,
            limits: EffectLimits::default(),
            coalesce: T::COALESCE,
            run: Arc::new(move |payload, ctx| {
                let executor = executor.clone();
                joined(tokio::task::spawn_blocking(move || {
                    let effect = decode_effect::<T>(&payload)?;
                    encode_feedback::<T>(executor.execute(&effect, &ctx)?)
                }))
            }),
        }
    }

    pub(crate) fn non_blocking<T: Effect, X: AsyncExecutor<T>>(executor: X) -> Self {
        let executor = Arc::new(executor);
        Self {
            origin: <T::Origin as Entity>::NAME,
            limits: EffectLimits::default(),
            coalesce: T::COALESCE,
            run: Arc::new(move |payload, ctx| {
                let executor = executor.clone();
                joined(tokio::spawn(async move {
                    let effect = decode_effect::<T>(&payload)?;
                    encode_feedback::<T>(executor.execute(effect, ctx).await?)
                }))
            }),
        }
    }
}

/// Awaits an executor's task; a panic in the executor is a retryable failure of that effect.
/// Dropping the future (an attempt timed out, or the workers stopped) aborts the task (an
/// async executor stops at its next await; a blocking one that started runs on).
fn joined(task: tokio::task::JoinHandle<Outcome>) -> Running {
    let task = AbortOnDrop(task);
    Box::pin(async move {
        let mut task = task;
        (&mut task.0)
            .await
            .unwrap_or_else(|e| Err(EffectError::retryable(format!("executor panicked: {e}"))))
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<Outcome>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A stored payload that no longer decodes as `T` can never succeed: a permanent failure.
fn decode_effect<T: Effect>(payload: &[u8]) -> Result<T, EffectError> {
    codec::decode("effect", payload).map_err(EffectError::permanent)
}

fn encode_feedback<T: Effect>(feedback: Feedback<T>) -> Outcome {
    feedback
        .map(|cmd| codec::encode(&cmd).map_err(EffectError::permanent))
        .transpose()
}
