//! Typed addresses: [`EntityRef<E>`] accepts only `E`'s commands, so sending the wrong
//! message type does not compile. [`Ask`] and [`Tell`] are builders that run when awaited.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::sync::oneshot;

use crate::clock::{epoch_ms, ms_of};
use crate::core::apply::{Loaded, OutcomeOf};
use crate::core::codec;
use crate::core::keys::{self, MESSAGE_ID_LEN_MAX};
use crate::core::records::{InboxRecord, Meta, ShedRecord, StateRecord};
use crate::entity::Entity;
use crate::error::{AdminError, Returned, SubmitError};
use crate::ids;
use crate::priority::{BacklogKind, Priority, WhenFull};
use crate::runtime::admission::Ticket;
use crate::runtime::delayed::Scheduled;
use crate::runtime::inner::Inner;
use crate::runtime::mail::{AdminAction, Deliver, Job};
use crate::runtime::shared::check_key;
use crate::store::Op;
use crate::telemetry::Stats;

/// The address of one entity: type `E`, key `key`.
///
/// Cheap to create and clone; it holds the runtime weakly, so keeping one does not keep a
/// closed runtime (or its database lock) alive.
///
/// ```compile_fail
/// # use keystead::{Context, Entity, Failure, FailureKind, Runtime};
/// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
/// # #[error("never")] struct Never;
/// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// # struct Counter;
/// # impl Entity for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type State = u64; type Command = u64; type Reply = u64; type Error = Never;
/// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Never> { Ok(*s) }
/// # }
/// # fn f(rt: &Runtime) {
/// // A Counter takes u64 commands; a string does not compile.
/// let _ = rt.entity::<Counter>("c").ask("not a counter command".to_string());
/// # }
/// ```
pub struct EntityRef<E: Entity> {
    inner: Weak<Inner>,
    key: String,
    /// The correlation id its messages carry unless they set one (from a
    /// [`RuntimeHandle::with_correlation_id`]).
    correlation_id: Option<Arc<str>>,
    _entity: PhantomData<fn() -> E>,
}

impl<E: Entity> Clone for EntityRef<E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            key: self.key.clone(),
            correlation_id: self.correlation_id.clone(),
            _entity: PhantomData,
        }
    }
}

/// A cheap, cloneable handle on a runtime, for code that must reach entities from where a
/// [`Runtime`](crate::Runtime) is not at hand: an effect executor
/// ([`EffectContext::runtime`](crate::EffectContext::runtime)), a task, a process manager.
/// It holds the runtime weakly: it never keeps a closed runtime (or its database lock)
/// alive, and once the runtime is closed every send through it fails with
/// [`SubmitError::Closed`] (check [`RuntimeHandle::is_closed`] to stop a loop). It may
/// carry a correlation id, which every message sent through it carries unless the message
/// sets its own.
///
/// ```
/// # use keystead::{Context, Entity, Failure, FailureKind, Runtime};
/// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
/// # #[error("never")] struct Never;
/// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// # struct Counter;
/// # impl Entity for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type State = u64; type Command = u64; type Reply = u64; type Error = Never;
/// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Never> { *s += c; Ok(*s) }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let rt = Runtime::builder(dir.path()).register::<Counter>().open()?;
/// let handle = rt.handle(); // Clone + Send + Sync + 'static
/// let task = tokio::spawn(async move { handle.entity::<Counter>("c-1").ask(2).await });
/// task.await??;
/// let handle = rt.handle();
/// rt.shutdown().await;
/// assert!(handle.is_closed());
/// assert!(handle.entity::<Counter>("c-1").ask(1).await.is_err()); // Closed, not a hang
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RuntimeHandle {
    inner: Weak<dyn std::any::Any + Send + Sync>,
    correlation_id: Option<Arc<str>>,
}

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("closed", &self.is_closed())
            .field("correlation_id", &self.correlation_id)
            .finish()
    }
}

impl RuntimeHandle {
    pub(crate) fn new(inner: Weak<dyn std::any::Any + Send + Sync>) -> Self {
        Self {
            inner,
            correlation_id: None,
        }
    }

    /// The runtime, if it is still there.
    fn runtime(&self) -> Weak<Inner> {
        self.inner
            .upgrade()
            .and_then(|any| any.downcast::<Inner>().ok())
            .map_or_else(Weak::new, |inner| Arc::downgrade(&inner))
    }

    /// The address of entity `key` of type `E`; its messages carry this handle's
    /// correlation id unless they set one.
    pub fn entity<E: Entity>(&self, key: impl Into<String>) -> EntityRef<E> {
        EntityRef {
            inner: self.runtime(),
            key: key.into(),
            correlation_id: self.correlation_id.clone(),
            _entity: PhantomData,
        }
    }

    /// Runs transaction `T` with `command` (see [`Runtime::transaction`](crate::Runtime::transaction)).
    pub fn transaction<T: crate::Transaction>(&self, command: T::Command) -> crate::Transact<T> {
        let tx = crate::Transact::new(self.runtime(), command);
        match &self.correlation_id {
            Some(id) => tx.correlation_id(id.to_string()),
            None => tx,
        }
    }

    /// A batch of `tell`s (see [`TellBatch`](crate::TellBatch)).
    pub fn tell_batch(&self) -> crate::TellBatch {
        crate::TellBatch::new(self.runtime())
    }

    /// A batch of `ask`s (see [`AskBatch`](crate::AskBatch)).
    pub fn ask_batch(&self) -> crate::AskBatch {
        crate::AskBatch::default()
    }

    /// The same handle, carrying correlation id `id` into every message sent through it
    /// (a message that sets its own keeps its own).
    #[must_use]
    pub fn with_correlation_id(&self, id: impl Into<String>) -> Self {
        Self {
            inner: self.inner.clone(),
            correlation_id: Some(Arc::from(id.into())),
        }
    }

    /// True once the runtime is closed (or dropped): every send through the handle fails.
    pub fn is_closed(&self) -> bool {
        self.runtime()
            .upgrade()
            .is_none_or(|inner| inner.is_closed())
    }
}

impl crate::EffectContext {
    /// A handle on the runtime that runs this effect, carrying the correlation id of the
    /// message that recorded it: an executor uses it to send to other entities (a process
    /// manager, a saga step). See [`RuntimeHandle`].
    pub fn runtime(&self) -> RuntimeHandle {
        RuntimeHandle {
            inner: self
                .runtime
                .clone()
                .unwrap_or_else(|| Weak::<Inner>::new() as Weak<dyn std::any::Any + Send + Sync>),
            correlation_id: Some(Arc::from(self.correlation_id.as_str())),
        }
    }
}

impl<E: Entity> std::fmt::Debug for EntityRef<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntityRef")
            .field("entity", &E::NAME)
            .field("key", &self.key)
            .finish()
    }
}

/// An entity's committed state, as read by [`EntityRef::snapshot`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Snapshot<S> {
    /// Changes applied so far (0 for an entity that has applied none).
    pub revision: u64,
    /// The highest source version applied, if any.
    pub version: Option<u64>,
    /// The state.
    pub state: S,
}

/// The snapshot of entity (`E`, `key`) from its stored state record (`None`: it never
/// applied a message, so its default state at revision 0).
pub(crate) fn snapshot_from<E: Entity>(
    key: &str,
    bytes: Option<Vec<u8>>,
) -> Result<Snapshot<E::State>, SubmitError> {
    let loaded = match bytes {
        None => Loaded::default(),
        Some(bytes) => {
            let record: StateRecord<E::State> =
                codec::decode("state", &bytes).map_err(|source| SubmitError::Decode {
                    entity: E::NAME,
                    key: key.to_string(),
                    source,
                })?;
            Loaded::from(record)
        }
    };
    Ok(Snapshot {
        revision: loaded.revision,
        version: loaded.version,
        state: loaded.state,
    })
}

/// What `tell` returns once the message is durably in the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Accepted {
    /// The message id (given or generated): resend with it to stay idempotent.
    pub message_id: String,
    /// The correlation id (given or generated).
    pub correlation_id: String,
    /// True when the message was sheddable and its lane full: it went to the shed log
    /// ([`Runtime::shed`](crate::Runtime::shed)) instead of the inbox, and is processed only
    /// if requeued.
    pub shed: bool,
    /// For a delayed message ([`Tell::after`], [`Tell::at`]): when it is due, ms since the
    /// epoch on the runtime's clock. If the same id was already waiting, its due time (the
    /// first one stays). `None` for a message accepted into the inbox at once.
    pub due_at_ms: Option<u64>,
}

/// What [`EntityRef::cancel`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cancelled {
    /// The delayed message was waiting and is removed: it will never be delivered.
    Removed {
        /// When it was due, ms since the epoch.
        due_at_ms: u64,
    },
    /// No delayed message with that id is waiting: it was delivered already (it is then in
    /// the inbox or applied, and cancelling cannot take it back), cancelled already, or never
    /// sent with a due time. Nothing changed.
    NotPending,
}

type Submit<T> = Pin<Box<dyn Future<Output = Result<T, SubmitError>> + Send>>;

/// Options shared by `ask` and `tell`.
#[derive(Debug, Default)]
struct Options {
    message_id: Option<String>,
    correlation_id: Option<String>,
    version: Option<u64>,
    priority: Priority,
    sheddable: bool,
    due: Option<Due>,
}

/// When a delayed `tell` is due.
#[derive(Debug, Clone, Copy)]
enum Due {
    At(u64),
    After(std::time::Duration),
}

impl Options {
    fn meta<E: Entity>(&self, key: &str, now_ms: u64) -> Result<Meta, SubmitError> {
        let message_id = match self.message_id.clone() {
            Some(id) => {
                let reason = if id.is_empty() {
                    Some("the id is empty".to_string())
                } else if id.len() > MESSAGE_ID_LEN_MAX {
                    Some(format!(
                        "the id is {} bytes, the limit is {MESSAGE_ID_LEN_MAX}",
                        id.len()
                    ))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Err(SubmitError::InvalidMessageId {
                        entity: E::NAME,
                        key: key.to_string(),
                        reason,
                    });
                }
                id
            }
            None => ids::generate(),
        };
        Ok(Meta {
            message_id,
            correlation_id: self.correlation_id.clone().unwrap_or_else(ids::generate),
            version: self.version,
            accepted_at_ms: now_ms,
        })
    }
}

impl<E: Entity> EntityRef<E> {
    pub(crate) fn new(inner: Weak<Inner>, key: String) -> Self {
        Self {
            inner,
            key,
            correlation_id: None,
            _entity: PhantomData,
        }
    }

    /// Options with this address's default correlation id.
    fn options(&self) -> Options {
        Options {
            correlation_id: self.correlation_id.as_deref().map(str::to_string),
            ..Options::default()
        }
    }

    /// The entity key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Sends `command` and waits for its outcome. The returned builder sets options; await
    /// it to send. The reply arrives only once the change is durable.
    ///
    /// See [`Runtime`](crate::Runtime) for an example.
    pub fn ask(&self, command: E::Command) -> Ask<E> {
        Ask {
            target: self.clone(),
            command,
            options: self.options(),
            expected_revision: None,
        }
    }

    /// Sends `command` fire-and-forget: awaiting it returns once the message is flushed to
    /// the durable inbox; it is processed afterwards, even across a crash.
    ///
    /// ```
    /// # use keystead::{Context, Entity, Failure, FailureKind, Runtime};
    /// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
    /// # #[error("down")] struct Down;
    /// # impl Failure for Down { fn kind(&self) -> FailureKind { FailureKind::Retryable } }
    /// # struct Counter;
    /// # impl Entity for Counter {
    /// #     const NAME: &'static str = "counter";
    /// #     type State = u64; type Command = u64; type Reply = u64; type Error = Down;
    /// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Down> {
    /// #         if *c == 0 { return Err(Down) } *s += c; Ok(*s)
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let rt = Runtime::builder(dir.path()).register::<Counter>().open()?;
    /// let counter = rt.entity::<Counter>("c-1");
    /// let accepted = counter.tell(2).id("evt-1").version(1).await?; // on disk now
    /// assert_eq!(accepted.message_id, "evt-1");
    /// rt.idle().await; // processed in the background
    /// assert_eq!(counter.snapshot().await?.state, 2);
    /// # rt.shutdown().await; Ok(()) }
    /// ```
    pub fn tell(&self, command: E::Command) -> Tell<E> {
        Tell {
            target: self.clone(),
            command,
            options: self.options(),
        }
    }

    fn runtime(&self) -> Result<Arc<Inner>, SubmitError> {
        let inner = self.inner.upgrade().filter(|i| !i.is_closed());
        let inner = inner.ok_or_else(|| SubmitError::Closed {
            entity: E::NAME,
            key: self.key.clone(),
        })?;
        if !inner.registered::<E>() {
            return Err(SubmitError::NotRegistered { entity: E::NAME });
        }
        check_key(E::NAME, &self.key)?;
        Ok(inner)
    }

    /// Reads the entity's committed state from the store (without activating its actor).
    ///
    /// It shows only durable state: a change that a crash could still take back is not
    /// shown, so what you read, and act on, survives a restart. (The read waits, at most for
    /// the flush under way, when the latest writes are applied but not yet flushed.) With
    /// [`Durability::Relaxed`](crate::Durability::Relaxed) it shows what was acknowledged,
    /// which a crash can take back within the same loss window as the acknowledgement.
    ///
    /// ```
    /// # use keystead::{Context, Entity, Failure, FailureKind, Runtime};
    /// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
    /// # #[error("down")] struct Down;
    /// # impl Failure for Down { fn kind(&self) -> FailureKind { FailureKind::Retryable } }
    /// # struct Counter;
    /// # impl Entity for Counter {
    /// #     const NAME: &'static str = "counter";
    /// #     type State = u64; type Command = u64; type Reply = u64; type Error = Down;
    /// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Down> {
    /// #         if *c == 0 { return Err(Down) } *s += c; Ok(*s)
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let rt = Runtime::builder(dir.path()).register::<Counter>().open()?;
    /// let counter = rt.entity::<Counter>("c-1");
    /// assert_eq!(counter.snapshot().await?.revision, 0); // never written: the default state
    /// counter.ask(5).await?;
    /// let snap = counter.snapshot().await?;
    /// assert_eq!((snap.revision, snap.state), (1, 5));
    /// # rt.shutdown().await; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`SubmitError::Decode`] if the stored state does not decode as `E::State`;
    /// [`SubmitError::Storage`], [`SubmitError::Closed`], [`SubmitError::NotRegistered`].
    pub async fn snapshot(&self) -> Result<Snapshot<E::State>, SubmitError> {
        let inner = self.runtime()?;
        let storage = |source| SubmitError::Storage {
            entity: E::NAME,
            key: self.key.clone(),
            source,
        };
        let bytes = inner
            .store
            .get(&keys::state(E::NAME, &self.key))
            .map_err(storage)?;
        // Show only what a crash cannot take back: the committer applies a batch before it
        // flushes it, so the read may have seen a change that is not durable yet.
        let durable = inner.store.reads_durable();
        drop(inner);
        durable.await.map_err(storage)?;
        snapshot_from::<E>(&self.key, bytes)
    }

    /// Moves the dead letter `message_id` back into this entity's inbox, keeping its id, and
    /// processes it. Returns `false` if there is no such dead letter (so requeueing twice
    /// cannot apply a message twice).
    ///
    /// ```
    /// # use keystead::{Context, Entity, Failure, FailureKind, Runtime};
    /// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
    /// # #[error("down")] struct Down;
    /// # impl Failure for Down { fn kind(&self) -> FailureKind { FailureKind::Retryable } }
    /// # struct Counter;
    /// # impl Entity for Counter {
    /// #     const NAME: &'static str = "counter";
    /// #     type State = u64; type Command = u64; type Reply = u64; type Error = Down;
    /// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Down> {
    /// #         if *c == 0 { return Err(Down) } *s += c; Ok(*s)
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use keystead::{OutcomeKind, RetryPolicy};
    /// let rt = Runtime::builder(dir.path())
    ///     .retry(RetryPolicy::default().attempts_max(2).backoff_initial(std::time::Duration::from_millis(1)))
    ///     .register::<Counter>()
    ///     .open()?;
    /// let counter = rt.entity::<Counter>("c-1");
    /// let out = counter.ask(0).id("job-7").await?; // 0 always fails: retried, then dead-lettered
    /// assert_eq!(out.kind(), OutcomeKind::DeadLettered);
    /// let letters = rt.dead_letters::<Counter>().await?;
    /// assert_eq!((letters[0].message_id.as_str(), letters[0].attempts), ("job-7", 2));
    /// assert!(counter.requeue("job-7").await?); // back in the inbox, same id, processed
    /// rt.idle().await;
    /// assert_eq!(rt.dead_letters::<Counter>().await?.len(), 1); // 0 always fails: dead again
    /// assert!(counter.purge_dead_letter("job-7").await?);
    /// assert!(!counter.requeue("job-7").await?); // nothing left to requeue
    /// # rt.shutdown().await; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`AdminError`] if the runtime is closed, the type unregistered, or the store fails.
    pub async fn requeue(&self, message_id: &str) -> Result<bool, AdminError> {
        self.admin(AdminAction::Requeue, message_id).await
    }

    /// Moves the shed message `message_id` back into this entity's inbox, in its lane,
    /// keeping its id. Returns `false` if there is no such shed message (so requeueing twice
    /// cannot apply a message twice).
    ///
    /// # Errors
    /// [`AdminError::Overloaded`] if its lane is still full (it stays in the shed log);
    /// [`AdminError`] if the runtime is closed, the type unregistered, or the store fails.
    pub async fn requeue_shed(&self, message_id: &str) -> Result<bool, AdminError> {
        self.admin(AdminAction::RequeueShed, message_id).await
    }

    /// Cancels this entity's delayed message `message_id` (sent with [`Tell::after`] or
    /// [`Tell::at`]) if it is still waiting for its due time: it is removed durably and never
    /// delivered, and its room in its lane is given back. Cancelling one that was delivered
    /// already, cancelled already or never delayed changes nothing and answers
    /// [`Cancelled::NotPending`]. A cancel racing with the due time either removes it or
    /// finds it delivered, never both.
    ///
    /// # Errors
    /// [`AdminError`] if the runtime is closed, the type unregistered, the key invalid, or
    /// the store fails.
    pub async fn cancel(&self, message_id: &str) -> Result<Cancelled, AdminError> {
        let inner = self.runtime().map_err(AdminError::from_refusal)?;
        let found = inner
            .delayed
            .cancel(&inner.store, &inner.shared, E::NAME, &self.key, message_id)
            .await?;
        inner.shared.stats.notify();
        Ok(match found {
            Some(due_at_ms) => Cancelled::Removed { due_at_ms },
            None => Cancelled::NotPending,
        })
    }

    /// Deletes the shed message `message_id`. Returns `false` if there was none.
    ///
    /// # Errors
    /// [`AdminError`] if the runtime is closed, the type unregistered, or the store fails.
    pub async fn purge_shed(&self, message_id: &str) -> Result<bool, AdminError> {
        self.admin(AdminAction::PurgeShed, message_id).await
    }

    /// Deletes the dead letter `message_id`. Returns `false` if there was none.
    ///
    /// # Errors
    /// [`AdminError`] if the runtime is closed, the type unregistered, or the store fails.
    pub async fn purge_dead_letter(&self, message_id: &str) -> Result<bool, AdminError> {
        self.admin(AdminAction::Purge, message_id).await
    }

    /// Raises this entity's pending work to lane `lane`, so that it is taken ahead of the
    /// lanes below: its inbox messages (accepted by `tell`, not yet processed) and its
    /// unfinished effects (a product a user just searched for gets its pending refresh and
    /// its enrichment first). Work already in `lane` or above keeps its lane; the entity still
    /// applies its messages, and performs its ordered effects, in their order. Reads only this
    /// entity's inbox and outbox, and the raise is durable. Returns how many messages and
    /// effects were raised.
    ///
    /// ```
    /// # use keystead::{Context, Entity, Failure, FailureKind, Priority, Runtime};
    /// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
    /// # #[error("never")] struct Never;
    /// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
    /// # struct Counter;
    /// # impl Entity for Counter {
    /// #     const NAME: &'static str = "counter";
    /// #     type State = u64; type Command = u64; type Reply = u64; type Error = Never;
    /// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Never> { *s += c; Ok(*s) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let rt = Runtime::builder(dir.path()).register::<Counter>().open()?;
    /// let product = rt.entity::<Counter>("p-1");
    /// product.tell(1).priority(Priority::Low).await?;
    /// let moved = product.prioritise(Priority::Critical).await?; // 0 if already processed
    /// assert!(moved <= 1);
    /// rt.idle().await;
    /// assert_eq!(product.snapshot().await?.state, 1);
    /// # rt.shutdown().await; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`AdminError`] if the runtime is closed, the type unregistered, or the store fails.
    pub async fn prioritise(&self, lane: Priority) -> Result<u64, AdminError> {
        self.submit_admin(|reply, ticket| Job::<E>::Prioritise {
            lane,
            reply,
            ticket,
        })
        .await
    }

    /// Stops this entity's actor once the jobs before this call are done, as the runtime
    /// does by itself after [`RuntimeBuilder::passivate_after`](crate::RuntimeBuilder::passivate_after).
    /// The state stays on disk and the next message activates a fresh actor that reloads it.
    /// Returns `true` once the actor has stopped, `false` if more work had already arrived
    /// for it (it then stays active). Tests use it to restart an actor between two messages.
    ///
    /// ```
    /// # use keystead::{Context, Entity, Failure, FailureKind, Runtime};
    /// # #[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
    /// # #[error("never")] struct Never;
    /// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
    /// # struct Counter;
    /// # impl Entity for Counter {
    /// #     const NAME: &'static str = "counter"; type State = u64; type Command = u64;
    /// #     type Reply = u64; type Error = Never;
    /// #     fn handle(s: &mut u64, by: &u64, _: &mut Context<'_>) -> Result<u64, Never> { *s += by; Ok(*s) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let rt = Runtime::builder(dir.path()).register::<Counter>().open()?;
    /// let counter = rt.entity::<Counter>("c-1");
    /// counter.ask(2).await?;
    /// assert!(counter.passivate().await?);
    /// assert_eq!(rt.stats().live_entities, 0);
    /// counter.ask(3).await?; // a fresh actor, state reloaded from disk
    /// assert_eq!(counter.snapshot().await?.state, 5);
    /// # rt.shutdown().await; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`AdminError::Closed`] or [`AdminError::Interrupted`] if the runtime stops first,
    /// [`AdminError::NotRegistered`] for an unregistered type.
    pub async fn passivate(&self) -> Result<bool, AdminError> {
        self.submit_admin(|reply, ticket| Job::<E>::Passivate { reply, ticket })
            .await
    }

    async fn admin(&self, action: AdminAction, message_id: &str) -> Result<bool, AdminError> {
        let message_id = message_id.to_string();
        self.submit_admin(|reply, ticket| Job::<E>::Admin {
            action,
            message_id,
            reply,
            ticket,
        })
        .await
    }

    async fn submit_admin<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, AdminError>>, Ticket) -> Job<E>,
    ) -> Result<T, AdminError> {
        let inner = self.runtime().map_err(AdminError::from_refusal)?;
        let shard = inner.shard_index(E::NAME, &self.key);
        // An operator is waiting for this answer.
        let ticket = inner
            .admit(E::NAME, &self.key, Priority::High)
            .await
            .ok_or(AdminError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let job = job(reply, ticket);
        inner.shards[shard]
            .addr
            .try_send(Deliver {
                key: self.key.clone(),
                job,
            })
            .map_err(|_| AdminError::Closed)?;
        drop(inner);
        answer.await.unwrap_or(Err(AdminError::Interrupted {
            entity: E::NAME,
            key: self.key.clone(),
        }))
    }
}

/// An `ask` being built; await it to send. See [`EntityRef::ask`].
#[must_use = "an Ask does nothing until awaited"]
pub struct Ask<E: Entity> {
    target: EntityRef<E>,
    command: E::Command,
    options: Options,
    expected_revision: Option<u64>,
}

impl<E: Entity> std::fmt::Debug for Ask<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ask")
            .field("target", &self.target)
            .field("options", &self.options)
            .field("expected_revision", &self.expected_revision)
            .finish_non_exhaustive()
    }
}

impl<E: Entity> Ask<E> {
    /// The message id (idempotency key). Default: generated. Reuse the same id when you
    /// retry, so the retry returns the first result instead of running twice.
    pub fn id(mut self, message_id: impl Into<String>) -> Self {
        self.options.message_id = Some(message_id.into());
        self
    }
    /// The source version (a sequence or an updated-at). Default: none (never stale).
    pub fn version(mut self, version: u64) -> Self {
        self.options.version = Some(version);
        self
    }
    /// Apply only if the entity is still at `revision`; otherwise fail with
    /// [`SubmitError::Conflict`] and change nothing. Default: no check.
    pub fn expect_revision(mut self, revision: u64) -> Self {
        self.expected_revision = Some(revision);
        self
    }
    /// The correlation id carried into logs. Default: generated.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.options.correlation_id = Some(id.into());
        self
    }
    /// The lane this message waits in for admission. Default: [`Priority::Normal`].
    /// It orders this message against other entities' messages, never against this
    /// entity's own (see [`Priority`]).
    pub fn priority(mut self, priority: Priority) -> Self {
        self.options.priority = priority;
        self
    }
}

/// An `ask` admitted and delivered to its entity's shard, its reply still to come.
pub(crate) struct Submitted<E: Entity> {
    key: String,
    message_id: String,
    answer: oneshot::Receiver<Result<OutcomeOf<E>, SubmitError>>,
}

impl<E: Entity> Submitted<E> {
    /// Waits for the reply.
    pub(crate) async fn reply(self) -> Result<OutcomeOf<E>, SubmitError> {
        self.answer.await.unwrap_or_else(|_| {
            Err(SubmitError::ReplyLost {
                entity: E::NAME,
                key: self.key,
                message_id: self.message_id,
            })
        })
    }
}

impl<E: Entity> Ask<E> {
    /// The entity type, key and message id (if given): the order of a batch's dispatch.
    pub(crate) fn order_key(&self) -> (&'static str, &str, Option<&str>) {
        (
            E::NAME,
            &self.target.key,
            self.options.message_id.as_deref(),
        )
    }

    /// Waits for admission and hands the ask to its entity's shard; the reply comes later.
    pub(crate) async fn submit(self) -> Result<Submitted<E>, SubmitError> {
        let inner = self.target.runtime()?;
        let key = self.target.key;
        let fresh_id = self.options.message_id.is_none();
        let priority = self.options.priority;
        let meta = self.options.meta::<E>(&key, inner.shared.clock.now_ms())?;
        let closed = || SubmitError::Closed {
            entity: E::NAME,
            key: key.clone(),
        };
        let shard = inner.shard_index(E::NAME, &key);
        let ticket = inner
            .admit(E::NAME, &key, priority)
            .await
            .ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        let message_id = meta.message_id.clone();
        let job = Job::<E>::Ask {
            meta,
            command: self.command,
            expected_revision: self.expected_revision,
            fresh_id,
            reply,
            ticket,
            inbox_up_to: Some(inner.shared.seq.load(Ordering::Acquire)),
            priority,
        };
        inner.shards[shard]
            .addr
            .try_send(Deliver {
                key: key.clone(),
                job,
            })
            .map_err(|_| closed())?;
        Ok(Submitted {
            key,
            message_id,
            answer,
        })
    }
}

impl<E: Entity> IntoFuture for Ask<E> {
    type Output = Result<OutcomeOf<E>, SubmitError>;
    type IntoFuture = Submit<OutcomeOf<E>>;

    fn into_future(self) -> Self::IntoFuture {
        // The runtime is not kept alive while waiting for the reply: a dropped runtime must
        // be able to close its database.
        Box::pin(async move { self.submit().await?.reply().await })
    }
}

/// A `tell` being built; await it to send. See [`EntityRef::tell`].
#[must_use = "a Tell does nothing until awaited"]
pub struct Tell<E: Entity> {
    target: EntityRef<E>,
    command: E::Command,
    options: Options,
}

impl<E: Entity> std::fmt::Debug for Tell<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tell")
            .field("target", &self.target)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<E: Entity> Tell<E> {
    /// The message id (idempotency key). Default: generated.
    pub fn id(mut self, message_id: impl Into<String>) -> Self {
        self.options.message_id = Some(message_id.into());
        self
    }
    /// The source version. Default: none (never stale).
    pub fn version(mut self, version: u64) -> Self {
        self.options.version = Some(version);
        self
    }
    /// The correlation id carried into logs. Default: generated.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.options.correlation_id = Some(id.into());
        self
    }
    /// The lane this message waits in: for admission, and in the durable inbox until its
    /// entity takes it (a lane's feeder wakes entities in lane order). Default:
    /// [`Priority::Normal`]. The lane's [`LaneLimits`](crate::LaneLimits) bound what it holds.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.options.priority = priority;
        self
    }
    /// Marks the message as sheddable (a refresh, a recomputation that a later one
    /// replaces): if its lane is full, it goes to the durable shed log
    /// ([`Runtime::shed`](crate::Runtime::shed)) and `tell` returns `Ok` with
    /// [`Accepted::shed`] set, instead of waiting or being refused. Default: not sheddable.
    pub fn sheddable(mut self) -> Self {
        self.options.sheddable = true;
        self
    }
    /// Delivers the message once `delay` has passed on the runtime's clock (see
    /// [`Tell::at`]). Default: at once.
    pub fn after(mut self, delay: std::time::Duration) -> Self {
        self.options.due = Some(Due::After(delay));
        self
    }
    /// Delivers the message at `at` (wall-clock time, read on the runtime's
    /// [`Clock`](crate::Clock)), not before. It is accepted durably now, with its id,
    /// version and lane; it waits on disk (a timer costs no memory), survives restarts, and
    /// when due goes into the inbox and the normal way: dedup, version, lanes. One that
    /// fell due while the process was down is delivered at the next open. Timers are
    /// delivered in due order; one entity applies its delayed messages in that order, each
    /// after whatever reached its inbox before it fell due. A time not in the future
    /// delivers at once. It holds room in its lane from now (see
    /// [`LaneLimits`](crate::LaneLimits)). Cancel it with [`EntityRef::cancel`]. Sending the
    /// same id again while it waits changes nothing (the first due time stays; the answer
    /// says it). Default: at once.
    ///
    /// ```
    /// # use keystead::{Context, Entity, Failure, FailureKind, Runtime};
    /// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
    /// # #[error("never")] struct Never;
    /// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
    /// # struct Counter;
    /// # impl Entity for Counter {
    /// #     const NAME: &'static str = "counter";
    /// #     type State = u64; type Command = u64; type Reply = u64; type Error = Never;
    /// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Never> { *s += c; Ok(*s) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use keystead::{Cancelled, ManualClock};
    /// let clock = ManualClock::new(1_000_000);
    /// # let dir = tempfile::tempdir()?;
    /// let rt = Runtime::builder(dir.path()).clock(clock.clone()).register::<Counter>().open()?;
    /// let counter = rt.entity::<Counter>("c-1");
    /// let accepted = counter.tell(5).id("remind-1").after(Duration::from_secs(60)).await?;
    /// assert_eq!(accepted.due_at_ms, Some(1_060_000));
    /// counter.tell(7).id("remind-2").after(Duration::from_secs(90)).await?;
    /// assert!(matches!(counter.cancel("remind-2").await?, Cancelled::Removed { .. }));
    /// clock.advance(Duration::from_secs(120)); // due: delivered through the inbox
    /// rt.idle().await;
    /// assert_eq!(counter.snapshot().await?.state, 5);
    /// assert_eq!(counter.cancel("remind-1").await?, Cancelled::NotPending); // delivered
    /// # rt.shutdown().await; Ok(()) }
    /// ```
    pub fn at(mut self, at: std::time::SystemTime) -> Self {
        self.options.due = Some(Due::At(epoch_ms(at)));
        self
    }
}

/// A `tell` checked and encoded, not yet written.
pub(crate) struct PreparedTell {
    pub entity: &'static str,
    pub key: String,
    pub record: InboxRecord,
    /// The encoded inbox entry.
    pub bytes: Vec<u8>,
    pub accepted: Accepted,
    pub priority: Priority,
    pub sheddable: bool,
    /// When it is due, for a delayed message whose due time is in the future.
    pub due_ms: Option<u64>,
}

impl<E: Entity> Tell<E> {
    /// The key it is addressed to.
    pub(crate) fn key(&self) -> &str {
        &self.target.key
    }

    /// Checks the tell against its runtime (registered type, key, id, size) and encodes it.
    pub(crate) fn prepare(&self) -> Result<(Arc<Inner>, PreparedTell), SubmitError> {
        let inner = self.target.runtime()?;
        let key = self.target.key.clone();
        let now_ms = inner.shared.clock.now_ms();
        let due_ms = match self.options.due {
            None => None,
            Some(Due::At(ms)) => Some(ms),
            Some(Due::After(delay)) => Some(now_ms.saturating_add(ms_of(delay))),
        }
        .filter(|due| *due > now_ms);
        let meta = self.options.meta::<E>(&key, now_ms)?;
        let encode_error = |reason| SubmitError::Encode {
            entity: E::NAME,
            key: key.clone(),
            reason,
        };
        let command = codec::encode(&self.command).map_err(encode_error)?;
        let max = inner.shared.config.message_size_max;
        if command.len() > max {
            return Err(SubmitError::TooLarge {
                entity: E::NAME,
                key,
                size: command.len(),
                max,
            });
        }
        let accepted = Accepted {
            message_id: meta.message_id.clone(),
            correlation_id: meta.correlation_id.clone(),
            shed: false,
            due_at_ms: None,
        };
        let record = InboxRecord { meta, command };
        let bytes = codec::encode(&record).map_err(encode_error)?;
        let prepared = PreparedTell {
            entity: E::NAME,
            key,
            record,
            bytes,
            accepted,
            priority: self.options.priority,
            sheddable: self.options.sheddable,
            due_ms,
        };
        Ok((inner, prepared))
    }
}

impl<E: Entity> IntoFuture for Tell<E> {
    type Output = Result<Accepted, SubmitError>;
    type IntoFuture = Submit<Accepted>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let (inner, prepared) = self.prepare()?;
            let PreparedTell {
                key,
                record,
                bytes,
                accepted,
                priority,
                sheddable,
                due_ms,
                ..
            } = prepared;
            let encode_error = |reason| SubmitError::Encode {
                entity: E::NAME,
                key: key.clone(),
                reason,
            };
            let size = bytes.len() as u64;
            // Room in the lane first, holding nothing while we wait for it: the work that
            // makes room needs admission slots.
            let backlog = &inner.shared.backlog;
            let room = match backlog.try_reserve(priority, size) {
                Err(_)
                    if !sheddable
                        && backlog.limits(priority).when_full_policy() != WhenFull::Reject =>
                {
                    Stats::bump(&inner.shared.stats.lanes[priority.index()].blocked);
                    inner.shared.stats.notify();
                    backlog.reserve(priority, size).await
                }
                room => room,
            };
            let storage = |source| SubmitError::Storage {
                entity: E::NAME,
                key: key.clone(),
                source,
            };
            let closed = || SubmitError::Closed {
                entity: E::NAME,
                key: key.clone(),
            };
            if let Err(full) = room {
                let counters = &inner.shared.stats.lanes[priority.index()];
                if !sheddable {
                    Stats::bump(&counters.refused);
                    return Err(SubmitError::Overloaded {
                        entity: E::NAME,
                        key: key.clone(),
                        backlog: BacklogKind::Inbox,
                        lane: priority,
                        pending: full.pending,
                        pending_max: full.limits.pending_max(),
                        pending_bytes: full.pending_bytes,
                        pending_bytes_max: full.limits.pending_bytes_max(),
                        command: Returned::new(self.command),
                    });
                }
                // Kept, not dropped: the shed log is durable, listable and requeueable.
                let shed = ShedRecord {
                    meta: record.meta,
                    command: record.command,
                    lane: priority.index() as u8,
                    shed_at_ms: inner.shared.clock.now_ms(),
                };
                let shed_bytes = codec::encode(&shed).map_err(encode_error)?;
                let shed_key = keys::shed(E::NAME, &key, &accepted.message_id);
                let _accepting = inner.accept(E::NAME, &key).await.ok_or_else(closed)?;
                let commit = inner.store.commit(vec![Op::Put(shed_key, shed_bytes)]);
                commit.await.map_err(storage)?;
                Stats::bump(&counters.shed);
                tracing::info!(target: "keystead", entity = E::NAME, key = %key,
                    message_id = %accepted.message_id, lane = %priority, "lane full; sheddable message moved to the shed log");
                return Ok(Accepted {
                    shed: true,
                    ..accepted
                });
            }
            // This bounds the memory of messages being written; it is released once the
            // entry is durable, and the entry waits on disk for its lane's feeder.
            let Some(accepting) = inner.accept(E::NAME, &key).await else {
                backlog.release(priority, size);
                return Err(closed());
            };
            if let Some(due_ms) = due_ms {
                let message_id = accepted.message_id.clone();
                let scheduled = inner
                    .delayed
                    .accept(
                        &inner.store,
                        &inner.shared,
                        E::NAME,
                        &key,
                        &message_id,
                        priority,
                        due_ms,
                        bytes,
                    )
                    .await;
                drop(accepting);
                let due_at_ms = match scheduled {
                    Ok(Scheduled::New(due)) => due,
                    Ok(Scheduled::AlreadyPending(due)) => {
                        backlog.release(priority, size);
                        due
                    }
                    Err(source) => {
                        backlog.release(priority, size);
                        return Err(storage(source));
                    }
                };
                return Ok(Accepted {
                    due_at_ms: Some(due_at_ms),
                    ..accepted
                });
            }
            // When its entity is idle and a slot is free in its lane, the message goes to
            // the entity straight after its commit, with no lane index entry (a crash before
            // it is processed leaves it unindexed: the next open indexes it).
            let direct = inner.claim_direct(E::NAME, &key, priority);
            let seq = inner.shared.next_seq();
            let inbox_key = keys::inbox_in(E::NAME, &key, seq, priority);
            let index = direct.is_none().then(|| {
                let index_key = inner.shared.lane_index(E::NAME, &key, priority, seq);
                Op::Put(index_key, inbox_key.clone())
            });
            let ops = std::iter::once(Op::Put(inbox_key, bytes))
                .chain(index)
                .collect();
            if let Err(source) = inner.store.commit_with_seq(ops, seq).await {
                backlog.release(priority, size);
                return Err(storage(source));
            }
            // Durable from here on: the message will be processed even if what follows
            // fails (then at the next open).
            match direct {
                Some(ticket) => {
                    inner.shared.inbox_written(E::NAME, &key);
                    inner.send_drain(E::NAME, key.clone(), ticket);
                }
                None => inner.shared.accepted(E::NAME, &key, priority, seq),
            }
            drop(accepting);
            Ok(accepted)
        })
    }
}
