//! What users implement to perform effects ([`Executor`], [`AsyncExecutor`]), and the
//! type-erased form the workers call ([`Registered`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::core::codec;
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
/// [`RuntimeBuilder::effect_limits`](crate::RuntimeBuilder::effect_limits).
///
/// ```
/// use std::time::Duration;
/// use keystead::EffectLimits;
/// let limits = EffectLimits::default().attempt_timeout(Duration::from_secs(10));
/// assert_eq!(limits.get_attempt_timeout(), Some(Duration::from_secs(10)));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EffectLimits {
    attempt_timeout: Option<Duration>,
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

    /// The per-attempt timeout, if any.
    pub fn get_attempt_timeout(&self) -> Option<Duration> {
        self.attempt_timeout
    }
}

/// A registered executor with its types erased: payload bytes in, encoded feedback out.
pub(crate) struct Registered {
    pub origin: &'static str,
    pub(crate) run: Arc<dyn Fn(Vec<u8>, EffectContext) -> Running + Send + Sync>,
    pub(crate) limits: EffectLimits,
}

impl Registered {
    pub(crate) fn blocking<T: Effect, X: Executor<T>>(executor: X) -> Self {
        let executor = Arc::new(executor);
        Self {
            origin: <T::Origin as Entity>::NAME,
            limits: EffectLimits::default(),
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
