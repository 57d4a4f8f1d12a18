//! What a user writes: an [`Entity`] type with a synchronous, deterministic handler.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// How the runtime treats a handler error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// Bad input or an illegal transition: the message is rejected at once (outcome
    /// `Rejected`), recorded, and never retried.
    Permanent,
    /// A passing condition (timeout, rate limit): the message is retried with exponential
    /// backoff and jitter up to the retry policy's attempt limit, then dead-lettered.
    Retryable,
}

/// A handler error that says whether retrying can help.
///
/// ```
/// use keystead::{Failure, FailureKind};
/// #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
/// enum PayError {
///     #[error("order is already shipped")]
///     AlreadyShipped,
///     #[error("bank timed out")]
///     Timeout,
/// }
/// impl Failure for PayError {
///     fn kind(&self) -> FailureKind {
///         match self {
///             PayError::AlreadyShipped => FailureKind::Permanent,
///             PayError::Timeout => FailureKind::Retryable,
///         }
///     }
/// }
/// assert_eq!(PayError::Timeout.kind(), FailureKind::Retryable);
/// ```
pub trait Failure: std::error::Error + Serialize + DeserializeOwned + Send + 'static {
    /// Permanent or retryable.
    fn kind(&self) -> FailureKind;
}

/// An entity type: its state, the commands it accepts, its replies and its errors, and the one
/// function that applies a command to the state.
///
/// The handler must be deterministic and free of I/O: it reads time, the attempt number and
/// the message's identity only through the [`Context`]. It runs on a copy of the state; the
/// copy replaces the state only if the handler returns `Ok` and the commit succeeds, so an
/// error or a panic leaves no trace.
///
/// ```
/// use keystead::{Context, Entity, Failure, FailureKind};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// struct Counter { total: u64 }
///
/// #[derive(Debug, Serialize, Deserialize)]
/// enum CounterCmd { Add(u64) }
///
/// #[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
/// #[error("overflow")]
/// struct Overflow;
/// impl Failure for Overflow { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
///
/// struct CounterEntity;
/// impl Entity for CounterEntity {
///     const NAME: &'static str = "counter";
///     type State = Counter;
///     type Command = CounterCmd;
///     type Reply = u64;
///     type Error = Overflow;
///     fn handle(state: &mut Counter, cmd: &CounterCmd, _ctx: &mut Context<'_>) -> Result<u64, Overflow> {
///         match cmd {
///             CounterCmd::Add(n) => {
///                 state.total = state.total.checked_add(*n).ok_or(Overflow)?;
///                 Ok(state.total)
///             }
///         }
///     }
/// }
/// ```
pub trait Entity: Send + 'static {
    /// The stable name stored on disk and shown in logs (1 to 255 bytes; never rename it
    /// once data exists).
    const NAME: &'static str;
    /// The entity's state; `Default` is the state of an entity that has never applied a
    /// message.
    type State: Serialize + DeserializeOwned + Clone + Default + Send + Unpin + 'static;
    /// The commands it accepts. `Debug` is used only when payload logging is switched on.
    type Command: Serialize + DeserializeOwned + fmt::Debug + Send + Unpin + 'static;
    /// The reply to a successfully applied command; stored for deduplication.
    type Reply: Serialize + DeserializeOwned + Clone + fmt::Debug + PartialEq + Send + 'static;
    /// The handler's error; stored when it is permanent.
    type Error: Failure + Clone + PartialEq;

    /// Applies `command` to `state`.
    ///
    /// # Errors
    /// Returns the entity's error; its [`Failure::kind`] decides between rejection and retry.
    fn handle(
        state: &mut Self::State,
        command: &Self::Command,
        ctx: &mut Context<'_>,
    ) -> Result<Self::Reply, Self::Error>;
}

/// What a handler may know about the message it applies. Built by the runtime.
///
/// ```
/// # use keystead::Context;
/// fn uses(ctx: &Context<'_>) -> bool { ctx.attempt() >= 1 && !ctx.message_id().is_empty() }
/// ```
#[derive(Debug)]
pub struct Context<'a> {
    pub(crate) effects: Vec<crate::core::effect::Recorded>,
    pub(crate) entity: &'static str,
    pub(crate) key: &'a str,
    pub(crate) message_id: &'a str,
    pub(crate) correlation_id: &'a str,
    pub(crate) attempt: u32,
    pub(crate) now_ms: u64,
    pub(crate) revision: u64,
    pub(crate) version: Option<u64>,
    pub(crate) message_version: Option<u64>,
}

impl<'a> Context<'a> {
    /// The entity type name.
    pub fn entity(&self) -> &'static str {
        self.entity
    }
    /// The entity key.
    pub fn key(&self) -> &str {
        self.key
    }
    /// The message id (the idempotency key).
    pub fn message_id(&self) -> &str {
        self.message_id
    }
    /// The correlation id, propagated from the caller or generated.
    pub fn correlation_id(&self) -> &str {
        self.correlation_id
    }
    /// The attempt number, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The runtime clock's time when this attempt started, in ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }
    /// The entity's revision before this message (0 for a new entity).
    pub fn revision(&self) -> u64 {
        self.revision
    }
    /// The highest source version applied so far, if any.
    pub fn version(&self) -> Option<u64> {
        self.version
    }
    /// The source version this message carries, if any.
    pub fn message_version(&self) -> Option<u64> {
        self.message_version
    }

    /// Records a side effect (an email, a payment, a call) to run after this message's
    /// change commits, on the effect workers, never inside the handler. It is written in
    /// the same atomic batch as the state: if the change does not commit (error, panic,
    /// crash, duplicate, stale), the effect never runs. Its executor receives a stable
    /// [`EffectKey`](crate::EffectKey) to pass on as the outside service's idempotency key.
    ///
    /// See [`Effect`](crate::Effect) for an example.
    pub fn effect<T: crate::Effect>(&mut self, effect: T) {
        record_effect(&mut self.effects, &effect);
    }
}

/// Appends `effect` to `effects` as the next one recorded (a message's, or a transaction
/// member's).
pub(crate) fn record_effect<T: crate::Effect>(
    effects: &mut Vec<crate::core::effect::Recorded>,
    effect: &T,
) {
    let index = u32::try_from(effects.len()).unwrap_or(u32::MAX);
    effects.push(crate::core::effect::Recorded {
        name: T::NAME,
        origin: <T::Origin as Entity>::NAME,
        independent: T::INDEPENDENT,
        coalesce: T::COALESCE,
        index,
        payload: crate::core::codec::encode(effect),
    });
}

/// A side effect a handler can record: an email to send, a card to charge, a call to make.
///
/// ```
/// use keystead::{Context, Effect, EffectContext, EffectError, Entity, Executor, Failure, FailureKind};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct Charge { cents: u64 }
///
/// impl Effect for Charge {
///     const NAME: &'static str = "charge";
///     type Origin = Order; // the entity that records it and receives its feedback
/// }
///
/// # #[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
/// # #[error("paid")] struct Paid;
/// # impl Failure for Paid { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// struct Order;
/// impl Entity for Order {
///     const NAME: &'static str = "order";
///     type State = Option<String>; // the provider's reference, once captured
///     type Command = OrderCmd;
///     type Reply = ();
///     type Error = Paid;
///     fn handle(s: &mut Option<String>, cmd: &OrderCmd, ctx: &mut Context<'_>) -> Result<(), Paid> {
///         match cmd {
///             OrderCmd::Pay { cents } => ctx.effect(Charge { cents: *cents }),
///             OrderCmd::Captured { provider_ref } => *s = Some(provider_ref.clone()),
///         }
///         Ok(())
///     }
/// }
/// #[derive(Debug, Serialize, Deserialize)]
/// enum OrderCmd { Pay { cents: u64 }, Captured { provider_ref: String } }
///
/// /// Calls the payment provider with the effect key as its idempotency key.
/// struct Payments;
/// impl Executor<Charge> for Payments {
///     fn execute(&self, charge: &Charge, ctx: &EffectContext) -> Result<Option<OrderCmd>, EffectError> {
///         let provider_ref = format!("ch_{}", ctx.effect_key()); // provider.charge(key, cents)
///         Ok(Some(OrderCmd::Captured { provider_ref })) // fed back to the order, deduplicated
///     }
/// }
/// ```
pub trait Effect: Serialize + DeserializeOwned + fmt::Debug + Send + Sync + 'static {
    /// The stable name stored on disk (1 to 255 bytes; never rename it once data exists).
    const NAME: &'static str;
    /// Independent effects may run before earlier effects of the same entity finish.
    /// Default: false, effects of one entity run in the order they were recorded.
    const INDEPENDENT: bool = false;
    /// Coalescing effects keep only the latest: when a message records one, every effect of
    /// the same type for the same entity that has not started yet (pending, not being
    /// attempted) is *superseded* in the same atomic batch: moved to the effect history
    /// with status [`Superseded`](crate::EffectStatus::Superseded), never run. So "enrich
    /// this product with its latest data" runs once per burst of updates, and the outbox
    /// holds one such effect per entity, not one per write. An effect whose attempt is
    /// under way is never replaced (the new one runs after it); one waiting to retry, or
    /// parked behind its type's limits, is.
    /// Default: false.
    const COALESCE: bool = false;
    /// The entity type that records this effect and receives its feedback.
    type Origin: Entity;
}

/// What an executor may return as feedback: a command for the entity that recorded the
/// effect, delivered durably with a message id derived from the effect key.
pub type Feedback<T> = Option<<<T as Effect>::Origin as Entity>::Command>;
