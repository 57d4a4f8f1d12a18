//! Many messages in one call: a batch of `tell`s accepted in one atomic write, and a batch
//! of `ask`s dispatched in one global order and answered in the caller's order.
//!
//! The order of a batch's dispatch is the lock-ordering seed's lesson: two batches over the
//! same entities, sent in opposite orders, reach the owners in the same order (entity type,
//! then key, then message id), and each caller still reads its results in its own order.
//! Nothing is held across the dispatch (an entity's owner applies one message at a time and
//! holds no lock), so this order is for fairness and predictability, not to avoid a
//! deadlock; the atomic multi-entity commands rely on it for that.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::core::apply::OutcomeOf;
use crate::core::keys;
use crate::entity::Entity;
use crate::error::{StoreError, SubmitError};
use crate::priority::{Priority, WhenFull};
use crate::runtime::address::{Accepted, Ask, PreparedTell, Tell};
use crate::runtime::inner::Inner;
use crate::store::Op;
use crate::telemetry::Stats;

/// Why a [`TellBatch`] was not accepted. Nothing of the batch was accepted in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// A tell of the batch cannot be sent at all; fix it and send the batch again.
    #[error("tell {position} of the batch cannot be sent: {source}; nothing was sent")]
    Invalid {
        /// Its position (the order of `push`, from 0).
        position: usize,
        /// Why, as sending it alone would have said.
        source: Box<SubmitError>,
    },
    /// A tell of the batch is of a kind a batch does not take; send it alone.
    #[error("tell {position} of the batch ({entity} {key:?}) cannot be batched: {reason}; nothing was sent")]
    NotBatchable {
        /// Its position (the order of `push`, from 0).
        position: usize,
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// The batch is larger than one atomic write may be; split it.
    #[error("the batch has {messages} tells and {bytes} bytes; one batch takes at most {messages_max} tells and {bytes_max} bytes: split it")]
    TooLarge {
        /// Tells in the batch.
        messages: usize,
        /// [`BATCH_MESSAGES_MAX`].
        messages_max: usize,
        /// Encoded bytes in the batch.
        bytes: usize,
        /// [`BATCH_BYTES_MAX`].
        bytes_max: usize,
    },
    /// A lane had no room for the batch's tells in it (at once, or within its
    /// [`WhenFull::Block`] wait). The batch is given back: send it again later
    /// ([`BatchError::into_batch`]), or split it.
    #[error("lane {lane} has no room for the batch ({pending} of {pending_max} messages, {pending_bytes} of {pending_bytes_max} bytes pending): nothing was accepted; send the batch again later (into_batch) or split it")]
    Overloaded {
        /// The full lane.
        lane: Priority,
        /// Messages pending in the lane.
        pending: u64,
        /// The lane's message limit.
        pending_max: u64,
        /// Bytes pending in the lane.
        pending_bytes: u64,
        /// The lane's byte limit.
        pending_bytes_max: u64,
        /// The batch, to send again.
        batch: Box<TellBatch>,
    },
    /// The atomic write failed.
    #[error("the batch could not be written: {source}; nothing was accepted")]
    Storage {
        /// What the storage said.
        source: Box<StoreError>,
    },
    /// The runtime is closed (or closing).
    #[error("the runtime is closed; nothing was accepted")]
    Closed,
}

impl BatchError {
    /// The batch given back by [`BatchError::Overloaded`], to send again.
    pub fn into_batch(self) -> Option<TellBatch> {
        match self {
            BatchError::Overloaded { batch, .. } => Some(*batch),
            _ => None,
        }
    }
}

/// The most messages in one batch.
pub const BATCH_MESSAGES_MAX: usize = 10_000;

/// The most bytes (encoded inbox entries) in one batch of `tell`s.
pub const BATCH_BYTES_MAX: usize = 64 << 20;

/// Many `tell`s, to entities of any registered types, accepted in **one atomic durable
/// write**: all of them or none, with one flush for the whole batch. Build it with
/// [`Runtime::tell_batch`](crate::Runtime::tell_batch), add each `tell` as you would send it
/// alone (id, version, priority), then await [`TellBatch::send`]. The answers come in the
/// order the tells were added.
///
/// The same message id twice for one entity is written once, and both positions get the
/// same [`Accepted`]. A `tell` with a due time or marked sheddable cannot be batched (send
/// it alone): the batch is refused with [`BatchError::Invalid`] naming its position.
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
/// let mut batch = rt.tell_batch();
/// for i in 0..1_000u64 {
///     batch.push(rt.entity::<Counter>(format!("c-{}", i % 10)).tell(1).id(format!("add-{i}")));
/// }
/// let accepted = batch.send().await?; // one write, one flush
/// assert_eq!(accepted.len(), 1_000);
/// assert_eq!(accepted[7].message_id, "add-7"); // in the order they were added
/// rt.idle().await;
/// assert_eq!(rt.entity::<Counter>("c-3").snapshot().await?.state, 100);
/// # rt.shutdown().await; Ok(()) }
/// ```
#[must_use = "a TellBatch does nothing until sent"]
pub struct TellBatch {
    inner: Weak<Inner>,
    /// One per `push`, in the caller's order.
    tells: Vec<PreparedTell>,
    /// The first push that could not be prepared, and why.
    invalid: Option<BatchError>,
}

impl std::fmt::Debug for TellBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TellBatch")
            .field("tells", &self.tells.len())
            .field("invalid", &self.invalid)
            .finish()
    }
}

/// Where one distinct message of a batch goes.
struct Planned {
    /// Index into `tells` of its first position.
    first: usize,
    seq: u64,
}

impl TellBatch {
    pub(crate) fn new(inner: Weak<Inner>) -> Self {
        Self {
            inner,
            tells: Vec::new(),
            invalid: None,
        }
    }

    /// Adds `tell` at the next position. A `tell` that cannot be sent (an unregistered
    /// type, an invalid key or id, too large, another runtime's address, a due time,
    /// sheddable) makes the whole batch fail at [`send`](TellBatch::send), naming its
    /// position.
    pub fn push<E: Entity>(&mut self, tell: Tell<E>) -> &mut Self {
        let position = self.tells.len() + usize::from(self.invalid.is_some());
        if self.invalid.is_some() {
            return self;
        }
        let refuse = |reason: &'static str| BatchError::NotBatchable {
            position,
            entity: E::NAME,
            key: tell.key().to_string(),
            reason,
        };
        let prepared = match tell.prepare() {
            Err(e) => Err(BatchError::Invalid {
                position,
                source: Box::new(e),
            }),
            Ok((inner, _)) if !std::ptr::eq(Arc::as_ptr(&inner), self.inner.as_ptr()) => Err(
                refuse("it is addressed through another runtime than the batch's"),
            ),
            Ok((_, p)) if p.due_ms.is_some() => Err(refuse("it has a due time (after, at)")),
            Ok((_, p)) if p.sheddable => Err(refuse("it is sheddable")),
            Ok((_, p)) => Ok(p),
        };
        match prepared {
            Ok(p) => self.tells.push(p),
            Err(e) => self.invalid = Some(e),
        }
        self
    }

    /// How many tells were added.
    pub fn len(&self) -> usize {
        self.tells.len() + usize::from(self.invalid.is_some())
    }

    /// True if none was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes every tell of the batch into the durable inbox in one atomic batch (all or
    /// none) and returns one [`Accepted`] per tell, in the order they were added. Room in
    /// each lane is taken for the whole batch at once, lanes in priority order, waiting as
    /// each lane's [`WhenFull`] says.
    ///
    /// # Errors
    /// [`BatchError::Invalid`] (nothing sent) naming the first tell that cannot be sent or
    /// the batch's size; [`BatchError::Overloaded`] (nothing accepted) with the batch given
    /// back to send again; [`BatchError::Storage`] (nothing accepted: the write is atomic);
    /// [`BatchError::Closed`].
    pub async fn send(self) -> Result<Vec<Accepted>, BatchError> {
        if let Some(invalid) = self.invalid {
            return Err(invalid);
        }
        if self.tells.is_empty() {
            return Ok(Vec::new());
        }
        let inner = self
            .inner
            .upgrade()
            .filter(|i| !i.is_closed())
            .ok_or(BatchError::Closed)?;
        let bytes: usize = self.tells.iter().map(|t| t.bytes.len()).sum();
        if self.tells.len() > BATCH_MESSAGES_MAX || bytes > BATCH_BYTES_MAX {
            return Err(BatchError::TooLarge {
                messages: self.tells.len(),
                messages_max: BATCH_MESSAGES_MAX,
                bytes,
                bytes_max: BATCH_BYTES_MAX,
            });
        }
        // One write per distinct message: a repeated id for one entity is the same message.
        let mut distinct: HashMap<(&'static str, &str, &str), usize> = HashMap::new();
        let mut first_of = Vec::with_capacity(self.tells.len());
        for (i, t) in self.tells.iter().enumerate() {
            let id = (t.entity, t.key.as_str(), t.accepted.message_id.as_str());
            first_of.push(*distinct.entry(id).or_insert(i));
        }
        let mut lanes: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
        for (i, t) in self.tells.iter().enumerate() {
            if first_of[i] == i {
                let lane = lanes.entry(t.priority.index()).or_default();
                lane.0 += 1;
                lane.1 += t.bytes.len() as u64;
            }
        }
        // Room for the whole batch in each lane, lanes in one order (Critical first), so
        // two batches never hold part of what the other waits for in a cycle.
        let backlog = &inner.shared.backlog;
        let mut reserved: Vec<(Priority, u64, u64)> = Vec::new();
        let release = |reserved: &[(Priority, u64, u64)]| {
            for &(lane, count, bytes) in reserved {
                backlog.release_n(lane, count, bytes);
            }
        };
        for (&index, &(count, bytes)) in &lanes {
            let lane = Priority::from_index(index as u8).unwrap_or_default();
            let room = match backlog.try_reserve_n(lane, count, bytes) {
                Err(_) => match backlog.limits(lane).when_full_policy() {
                    WhenFull::Reject => backlog.try_reserve_n(lane, count, bytes),
                    WhenFull::Block(wait_max) => {
                        Stats::bump(&inner.shared.stats.lanes[index].blocked);
                        inner.shared.stats.notify();
                        let deadline = Instant::now() + wait_max;
                        backlog
                            .reserve_until(lane, count, bytes, Some(deadline))
                            .await
                    }
                },
                room => room,
            };
            if let Err(full) = room {
                release(&reserved);
                Stats::bump(&inner.shared.stats.lanes[index].refused);
                return Err(BatchError::Overloaded {
                    lane,
                    pending: full.pending,
                    pending_max: full.limits.pending_max(),
                    pending_bytes: full.pending_bytes,
                    pending_bytes_max: full.limits.pending_bytes_max(),
                    batch: Box::new(TellBatch {
                        inner: self.inner,
                        tells: self.tells,
                        invalid: None,
                    }),
                });
            }
            reserved.push((lane, count, bytes));
        }
        // One write permit per shard written to, in shard order.
        let mut shards: Vec<usize> = self
            .tells
            .iter()
            .map(|t| inner.shard_index(t.entity, &t.key))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let mut accepting = Vec::with_capacity(shards.len());
        for shard in shards {
            match inner.accept_on(shard).await {
                Some(permit) => accepting.push(permit),
                None => {
                    release(&reserved);
                    return Err(BatchError::Closed);
                }
            }
        }
        let mut planned = Vec::new();
        let mut ops = Vec::new();
        let mut seq_max = 0;
        for (i, t) in self.tells.iter().enumerate() {
            if first_of[i] != i {
                continue;
            }
            let seq = inner.shared.next_seq();
            seq_max = seq;
            let inbox_key = keys::inbox_in(t.entity, &t.key, seq, t.priority);
            let index_key = inner.shared.lane_index(t.entity, &t.key, t.priority, seq);
            ops.push(Op::Put(index_key, inbox_key.clone()));
            ops.push(Op::Put(inbox_key, t.bytes.clone()));
            planned.push(Planned { first: i, seq });
        }
        if let Err(source) = inner.store.commit_with_seq(ops, seq_max).await {
            release(&reserved);
            return Err(BatchError::Storage {
                source: Box::new(source),
            });
        }
        // Durable from here on.
        for p in &planned {
            let t = &self.tells[p.first];
            inner.shared.accepted(t.entity, &t.key, t.priority, p.seq);
        }
        drop(accepting);
        // A repeated message is answered as its first position (the one written).
        Ok(first_of
            .iter()
            .map(|&first| self.tells[first].accepted.clone())
            .collect())
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Erased = Box<dyn Any + Send>;
/// An ask's reply still to come (or its error already known).
struct Waiting(BoxFuture<Erased>);
type SubmitFn = Box<dyn FnOnce() -> BoxFuture<Waiting> + Send>;

/// One `ask` of a batch, its type erased.
struct Pending {
    entity: &'static str,
    key: String,
    /// The message id, if the caller gave one (else it is generated, and unique).
    id: Option<String>,
    /// Admits and delivers the ask; resolves to a future of its typed result.
    submit: SubmitFn,
    /// Copies a typed result, if it is a success (for a repeated id).
    copy: fn(&Erased) -> Option<Erased>,
}

/// Many `ask`s, to entities of any registered types, **dispatched in one global order**
/// (entity type, then key, then message id) and answered **in the caller's order**, each
/// with its own outcome (each is applied and made durable on its own, as an `ask` is).
/// Build it with [`Runtime::ask_batch`](crate::Runtime::ask_batch); [`AskBatch::push`]
/// returns an [`Answer`] to read that ask's result from the [`Answers`].
///
/// The same message id twice for one entity is dispatched once, and both positions get a
/// copy of its outcome. (If it failed to be delivered at all, the later position is
/// dispatched on its own, once the first has failed.)
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
/// let mut batch = rt.ask_batch();
/// let b = batch.push(rt.entity::<Counter>("b").ask(2).id("add-2"));
/// let a = batch.push(rt.entity::<Counter>("a").ask(5).id("add-5"));
/// let mut answers = batch.send().await;
/// assert_eq!(answers.take(a)?.reply(), Some(&5));
/// assert_eq!(answers.take(b)?.reply(), Some(&2));
/// # rt.shutdown().await; Ok(()) }
/// ```
#[must_use = "an AskBatch does nothing until sent"]
#[derive(Default)]
pub struct AskBatch {
    asks: Vec<Pending>,
}

impl std::fmt::Debug for AskBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AskBatch")
            .field("asks", &self.asks.len())
            .finish()
    }
}

/// Where to read one `ask`'s result in the [`Answers`] of its batch.
#[must_use]
pub struct Answer<E: Entity> {
    position: usize,
    _entity: PhantomData<fn() -> E>,
}

impl<E: Entity> std::fmt::Debug for Answer<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("entity", &E::NAME)
            .field("position", &self.position)
            .finish()
    }
}

impl<E: Entity> Answer<E> {
    /// Its position in the batch (the order of `push`, from 0).
    pub fn position(&self) -> usize {
        self.position
    }
}

/// The results of an [`AskBatch`], one per `ask`, in the caller's order.
pub struct Answers {
    results: Vec<Option<Erased>>,
}

impl std::fmt::Debug for Answers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answers")
            .field("results", &self.results.len())
            .finish()
    }
}

impl Answers {
    /// The result of the ask at `answer`, as awaiting that `ask` alone would have returned
    /// it.
    ///
    /// # Errors
    /// The ask's own [`SubmitError`]; [`SubmitError::NoSuchAnswer`] if this answer was
    /// already taken or belongs to another batch.
    pub fn take<E: Entity>(&mut self, answer: Answer<E>) -> Result<OutcomeOf<E>, SubmitError> {
        let taken = self
            .results
            .get_mut(answer.position)
            .and_then(Option::take)
            .and_then(|r| r.downcast::<Result<OutcomeOf<E>, SubmitError>>().ok());
        match taken {
            Some(result) => *result,
            None => Err(SubmitError::NoSuchAnswer {
                position: answer.position,
            }),
        }
    }

    /// How many asks the batch had.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }
}

fn copy_success<E: Entity>(result: &Erased) -> Option<Erased> {
    match result.downcast_ref::<Result<OutcomeOf<E>, SubmitError>>() {
        Some(Ok(outcome)) => Some(Box::new(Ok::<_, SubmitError>(outcome.clone()))),
        _ => None,
    }
}

impl AskBatch {
    /// Adds `ask` at the next position; returns where to read its result.
    pub fn push<E: Entity>(&mut self, ask: Ask<E>) -> Answer<E> {
        let position = self.asks.len();
        let (entity, key, id) = ask.order_key();
        let (key, id) = (key.to_string(), id.map(str::to_string));
        let submit = move || -> BoxFuture<Waiting> {
            Box::pin(async move {
                let waiting: BoxFuture<Erased> = match ask.submit().await {
                    Ok(submitted) => {
                        Box::pin(async move { Box::new(submitted.reply().await) as Erased })
                    }
                    Err(e) => {
                        let result: Result<OutcomeOf<E>, SubmitError> = Err(e);
                        let erased = Box::new(result) as Erased;
                        Box::pin(async move { erased })
                    }
                };
                Waiting(waiting)
            })
        };
        self.asks.push(Pending {
            entity,
            key,
            id,
            submit: Box::new(submit),
            copy: copy_success::<E>,
        });
        Answer {
            position,
            _entity: PhantomData,
        }
    }

    /// How many asks were added.
    pub fn len(&self) -> usize {
        self.asks.len()
    }

    /// True if none was added.
    pub fn is_empty(&self) -> bool {
        self.asks.is_empty()
    }

    /// Dispatches every ask in one global order (entity type, key, message id; asks
    /// without an id after those with one, in the caller's order), each waiting for
    /// admission as an `ask` does, then waits for all the replies.
    pub async fn send(self) -> Answers {
        let count = self.asks.len();
        let mut order: Vec<usize> = (0..count).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&self.asks[a], &self.asks[b]);
            (x.entity, &x.key, x.id.is_none(), &x.id, a).cmp(&(
                y.entity,
                &y.key,
                y.id.is_none(),
                &y.id,
                b,
            ))
        });
        // A repeated (type, key, id) follows its first position.
        let mut first_of: Vec<usize> = (0..count).collect();
        let mut seen: HashMap<(&'static str, String, String), usize> = HashMap::new();
        for &i in &order {
            let p = &self.asks[i];
            if let Some(id) = &p.id {
                first_of[i] = *seen
                    .entry((p.entity, p.key.clone(), id.clone()))
                    .or_insert(i);
            }
        }
        let copies: Vec<fn(&Erased) -> Option<Erased>> = self.asks.iter().map(|p| p.copy).collect();
        let mut submits: Vec<Option<SubmitFn>> =
            self.asks.into_iter().map(|p| Some(p.submit)).collect();
        let mut replies: Vec<Option<Waiting>> = (0..count).map(|_| None).collect();
        for &i in &order {
            if first_of[i] != i {
                continue;
            }
            if let Some(submit) = submits[i].take() {
                replies[i] = Some(submit().await);
            }
        }
        // Every ask is with its owner by now: waiting for the replies one by one costs no
        // more than the slowest.
        let mut results: Vec<Option<Erased>> = (0..count).map(|_| None).collect();
        for i in 0..count {
            if let Some(Waiting(reply)) = replies[i].take() {
                results[i] = Some(reply.await);
            }
        }
        // Repeated ids: a copy of the first's success; after a failure, on their own.
        for &i in &order {
            let first = first_of[i];
            if first == i {
                continue;
            }
            let copied = results[first].as_ref().and_then(|r| copies[i](r));
            results[i] = match copied {
                Some(copy) => Some(copy),
                None => match submits[i].take() {
                    Some(submit) => Some(submit().await.0.await),
                    None => None,
                },
            };
        }
        Answers { results }
    }
}

impl IntoFuture for TellBatch {
    type Output = Result<Vec<Accepted>, BatchError>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

impl IntoFuture for AskBatch {
    type Output = Answers;
    type IntoFuture = BoxFuture<Answers>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}
