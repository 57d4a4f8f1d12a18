//! Running a [`Transaction`]: hold every member, evaluate, commit one atomic batch, release.
//!
//! Why it cannot deadlock (see `docs/architecture.md`, "Atomic multi-entity commands"):
//! 1. admission slots for all members are taken first, in shard order, before any member is
//!    held; a transaction waiting for a slot holds no member;
//! 2. members are then held in one global order, (entity type, key), one after the other;
//!    a transaction waiting for a member holds only members before it in that order, and
//!    waits for no slot;
//! 3. a held member's own messages wait behind the hold, and no single message waits for
//!    anything but its own entity's queue.
//!
//! So every wait points to a transaction further along the global order (or to a single
//! message that finishes on its own): no cycle can form.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::core::codec;
use crate::core::effect;
use crate::core::hash::{fnv1a, splitmix64};
use crate::core::keys;
use crate::core::records::{DeadLetterRecord, DedupRecord, Meta};
use crate::core::transaction::{
    check_members, evaluate, Member, Slot, Transaction, TxRecorded, TxVerdict, TX_KEY,
};
use crate::error::{Returned, SubmitError};
use crate::ids;
use crate::outcome::{Outcome, Recorded};
use crate::priority::{BacklogKind, Priority};
use crate::runtime::inner::{Held, Inner, Released};
use crate::runtime::shared::check_key;
use crate::store::Op;
use crate::telemetry::Stats;

/// The outcome type of transaction `T`.
pub type TxOutcome<T> = Outcome<<T as Transaction>::Reply, <T as Transaction>::Error>;

/// A transaction being built; await it to run. See [`Runtime::transaction`](crate::Runtime::transaction).
#[must_use = "a Transact does nothing until awaited"]
pub struct Transact<T: Transaction> {
    inner: Weak<Inner>,
    command: T::Command,
    message_id: Option<String>,
    correlation_id: Option<String>,
    version: Option<u64>,
    priority: Priority,
    expected: Vec<(Member, u64)>,
    _transaction: PhantomData<fn() -> T>,
}

impl<T: Transaction> std::fmt::Debug for Transact<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transact")
            .field("transaction", &T::NAME)
            .field("command", &self.command)
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

impl<T: Transaction> Transact<T> {
    pub(crate) fn new(inner: Weak<Inner>, command: T::Command) -> Self {
        Self {
            inner,
            command,
            message_id: None,
            correlation_id: None,
            version: None,
            priority: Priority::Normal,
            expected: Vec::new(),
            _transaction: PhantomData,
        }
    }

    /// The message id (idempotency key): a transaction run again with it returns the first
    /// run's result, and changes nothing. Default: generated.
    pub fn id(mut self, message_id: impl Into<String>) -> Self {
        self.message_id = Some(message_id.into());
        self
    }

    /// The correlation id. Default: generated.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// The source version: the transaction is `Stale` (and changes nothing) if a member
    /// has applied this version or a newer one; applied, every member's version becomes at
    /// least this. Default: none (never stale).
    pub fn version(mut self, version: u64) -> Self {
        self.version = Some(version);
        self
    }

    /// Apply only if member `key` of type `E` is still at `revision`; otherwise fail with
    /// [`SubmitError::Conflict`] naming it, and change nothing. Default: no check.
    pub fn expect_revision<E: crate::Entity>(
        mut self,
        key: impl Into<String>,
        revision: u64,
    ) -> Self {
        self.expected.push((
            Member {
                entity: E::NAME,
                key: key.into(),
            },
            revision,
        ));
        self
    }

    /// The lane its members' admission slots are taken in (and its effects wait in).
    /// Default: [`Priority::Normal`].
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }
}

impl<T: Transaction> IntoFuture for Transact<T> {
    type Output = Result<TxOutcome<T>, SubmitError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(run::<T>(self))
    }
}

/// The members it holds, released when dropped unless released explicitly.
struct Holding {
    members: Vec<(Member, Held)>,
}

impl Holding {
    /// Lets every member go, each with its new state if one is given (by index into
    /// `members`).
    fn release(self, mut next: Vec<Released>) {
        next.resize_with(self.members.len(), || None);
        for ((_, held), next) in self.members.into_iter().zip(next) {
            (held.release)(next);
        }
    }

    /// Lets every member go unchanged.
    fn release_unchanged(self) {
        self.release(Vec::new());
    }
}

fn invalid<T: Transaction>(reason: impl Into<String>) -> SubmitError {
    SubmitError::InvalidTransaction {
        transaction: T::NAME,
        reason: reason.into(),
    }
}

async fn run<T: Transaction>(tx: Transact<T>) -> Result<TxOutcome<T>, SubmitError> {
    let closed = || SubmitError::Closed {
        entity: T::NAME,
        key: TX_KEY.to_string(),
    };
    let inner = tx
        .inner
        .upgrade()
        .filter(|i| !i.is_closed())
        .ok_or_else(closed)?;
    if inner.transactions.get(T::NAME) != Some(&std::any::TypeId::of::<T>()) {
        return Err(SubmitError::NotRegistered { entity: T::NAME });
    }
    let members = T::members(&tx.command);
    if let Some(reason) = check_members(&members) {
        return Err(invalid::<T>(reason));
    }
    for m in &members.list {
        if !inner.registry.contains_key(m.entity) {
            return Err(SubmitError::NotRegistered { entity: m.entity });
        }
        check_key(m.entity, &m.key)?;
    }
    if let Some((m, _)) = tx.expected.iter().find(|(m, _)| !members.list.contains(m)) {
        return Err(invalid::<T>(format!(
            "it expects a revision of {} {:?}, which is not a member",
            m.entity, m.key
        )));
    }
    let now_ms = inner.shared.clock.now_ms();
    let fresh_id = tx.message_id.is_none();
    let message_id = match tx.message_id {
        Some(id) if id.is_empty() || id.len() > keys::MESSAGE_ID_LEN_MAX => {
            return Err(SubmitError::InvalidMessageId {
                entity: T::NAME,
                key: TX_KEY.to_string(),
                reason: format!(
                    "the id must be 1 to {} bytes, it is {}",
                    keys::MESSAGE_ID_LEN_MAX,
                    id.len()
                ),
            })
        }
        Some(id) => id,
        None => ids::generate(),
    };
    let meta = Meta {
        message_id: message_id.clone(),
        correlation_id: tx.correlation_id.unwrap_or_else(ids::generate),
        version: tx.version,
        accepted_at_ms: now_ms,
    };
    let storage = |source| SubmitError::Storage {
        entity: T::NAME,
        key: TX_KEY.to_string(),
        source,
    };
    // One run per id at a time: a second one waits, then finds the first's dedup record.
    let _claim = inner.tx_claims.claim(T::NAME, &message_id).await;
    let dedup_key = keys::dedup(T::NAME, TX_KEY, &message_id);
    if !fresh_id {
        if let Some(bytes) = inner.store.get(&dedup_key).map_err(storage)? {
            let record: DedupRecord<T::Reply, T::Error> = codec::decode("dedup record", &bytes)
                .map_err(|source| SubmitError::Decode {
                    entity: T::NAME,
                    key: TX_KEY.to_string(),
                    source,
                })?;
            Stats::bump(&inner.shared.stats.duplicate);
            return Ok(Outcome::Duplicate {
                first: record.outcome,
            });
        }
    }
    let shared = inner.shared.clone();
    shared.stats.work_up(&shared.stats.in_flight);
    let result = attempts::<T>(
        &inner,
        &tx.command,
        &members.list,
        &tx.expected,
        &meta,
        tx.priority,
        dedup_key,
    )
    .await;
    shared.stats.work_down(&shared.stats.in_flight);
    shared.stats.notify();
    // A refusal under load gives the command back.
    result.map_err(|e| e.giving_back(Returned::new(tx.command)))
}

/// Takes every member's admission slot (shard order), then holds every member (global
/// order: entity type, key).
async fn hold_all(
    inner: &Arc<Inner>,
    members: &[Member],
    priority: Priority,
) -> Result<Holding, SubmitError> {
    let mut by_shard: Vec<&Member> = members.iter().collect();
    by_shard.sort_by_key(|m| {
        (
            inner.shard_index(m.entity, &m.key),
            m.entity,
            m.key.as_str(),
        )
    });
    let mut tickets = Vec::with_capacity(members.len());
    for m in by_shard {
        let ticket = inner
            .admit(m.entity, &m.key, priority)
            .await
            .ok_or_else(|| SubmitError::Closed {
                entity: m.entity,
                key: m.key.clone(),
            })?;
        tickets.push((m.clone(), ticket));
    }
    // The global order of holds.
    tickets.sort_by(|(a, _), (b, _)| a.cmp(b));
    let mut holding = Holding {
        members: Vec::with_capacity(members.len()),
    };
    let up_to = inner.shared.seq.load(Ordering::Acquire);
    for (m, ticket) in tickets {
        let Some(registration) = inner.registry.get(m.entity) else {
            holding.release_unchanged();
            return Err(SubmitError::NotRegistered { entity: m.entity });
        };
        match (registration.hold)(inner, m.key.clone(), ticket, up_to).await {
            Ok(held) => holding.members.push((m, held)),
            Err(e) => {
                holding.release_unchanged();
                return Err(e);
            }
        }
    }
    Ok(holding)
}

#[allow(clippy::too_many_arguments)]
async fn attempts<T: Transaction>(
    inner: &Arc<Inner>,
    command: &T::Command,
    members: &[Member],
    expected: &[(Member, u64)],
    meta: &Meta,
    priority: Priority,
    dedup_key: Vec<u8>,
) -> Result<TxOutcome<T>, SubmitError> {
    let storage = |source| SubmitError::Storage {
        entity: T::NAME,
        key: TX_KEY.to_string(),
        source,
    };
    let encode_error = |reason| SubmitError::Encode {
        entity: T::NAME,
        key: TX_KEY.to_string(),
        reason,
    };
    let policy = inner.shared.config.retry;
    let attempts_max = policy.get_attempts_max().max(1);
    let mut attempt = 1;
    let mut first_failed_at_ms = None;
    loop {
        let mut holding = hold_all(inner, members, priority).await?;
        let now_ms = inner.shared.clock.now_ms();
        let mut slots: Vec<Slot> = holding
            .members
            .iter_mut()
            .map(|(m, held)| Slot {
                entity: m.entity,
                key: m.key.clone(),
                revision: held.revision,
                version: held.version,
                // The handler works on this copy; the actor keeps its own.
                state: std::mem::replace(&mut held.state, Box::new(())),
                effects: Vec::new(),
            })
            .collect();
        let verdict = evaluate::<T>(
            &mut slots,
            command,
            meta.version,
            expected,
            (&meta.message_id, &meta.correlation_id),
            (attempt, attempts_max, now_ms),
        );
        let verdict = check_effects::<T>(inner, &slots, verdict);
        let dedup = |outcome: TxRecorded<T>| -> Result<Op, SubmitError> {
            let record = DedupRecord {
                recorded_at_ms: now_ms,
                outcome,
            };
            Ok(Op::Put(
                dedup_key.clone(),
                codec::encode(&record).map_err(encode_error)?,
            ))
        };
        match verdict {
            TxVerdict::Conflict {
                entity,
                key,
                expected,
                actual,
            } => {
                holding.release_unchanged();
                Stats::bump(&inner.shared.stats.conflicts);
                return Err(SubmitError::Conflict {
                    entity,
                    key,
                    expected,
                    actual,
                });
            }
            TxVerdict::Retry { error, panicked } => {
                holding.release_unchanged();
                if panicked {
                    Stats::bump(&inner.shared.stats.handler_panics);
                }
                Stats::bump(&inner.shared.stats.retries);
                first_failed_at_ms.get_or_insert(now_ms);
                let seed = splitmix64(fnv1a(meta.message_id.as_bytes()));
                let delay = policy.backoff(attempt, seed);
                tracing::debug!(target: "keystead", transaction = T::NAME, message_id = %meta.message_id,
                    attempt, %error, "retryable failure of a transaction; will retry");
                // A backoff, not a synchronisation: nothing is held meanwhile.
                tokio::time::sleep(delay).await;
                attempt += 1;
                if inner.is_closed() {
                    return Err(SubmitError::Closed {
                        entity: T::NAME,
                        key: TX_KEY.to_string(),
                    });
                }
            }
            TxVerdict::Stale { current } => {
                let ops = vec![dedup(Recorded::Stale { current })?];
                let committed = inner.store.commit(ops).await;
                holding.release_unchanged();
                committed.map_err(storage)?;
                Stats::bump(&inner.shared.stats.stale);
                return Ok(Outcome::Stale { current });
            }
            TxVerdict::Rejected { error } => {
                let ops = vec![dedup(Recorded::Rejected {
                    error: error.clone(),
                })?];
                let committed = inner.store.commit(ops).await;
                holding.release_unchanged();
                committed.map_err(storage)?;
                Stats::bump(&inner.shared.stats.rejected);
                return Ok(Outcome::Rejected { error });
            }
            TxVerdict::DeadLetter { error, panicked } => {
                if panicked {
                    Stats::bump(&inner.shared.stats.handler_panics);
                }
                let letter = DeadLetterRecord {
                    meta: meta.clone(),
                    command: codec::encode(command).map_err(encode_error)?,
                    error: error.clone(),
                    attempts: attempt,
                    first_failed_at_ms: first_failed_at_ms.unwrap_or(now_ms),
                    last_failed_at_ms: now_ms,
                };
                let ops = vec![
                    Op::Put(
                        keys::dead_letter(T::NAME, TX_KEY, &meta.message_id),
                        codec::encode(&letter).map_err(encode_error)?,
                    ),
                    dedup(Recorded::DeadLettered {
                        error: error.clone(),
                        attempts: attempt,
                    })?,
                ];
                let committed = inner.store.commit(ops).await;
                holding.release_unchanged();
                committed.map_err(storage)?;
                Stats::bump(&inner.shared.stats.dead_lettered);
                tracing::error!(target: "keystead", transaction = T::NAME, message_id = %meta.message_id,
                    %error, attempts = attempt, "transaction dead-lettered");
                return Ok(Outcome::DeadLettered {
                    error,
                    attempts: attempt,
                });
            }
            TxVerdict::Applied { reply } => {
                return commit_applied::<T>(
                    inner, holding, slots, reply, meta, priority, now_ms, dedup,
                )
                .await;
            }
        }
    }
}

/// The checks a single message's effects get (an executor for each, the right origin, a
/// payload that encodes): a failing one dead-letters the transaction.
fn check_effects<T: Transaction>(
    inner: &Inner,
    slots: &[Slot],
    verdict: TxVerdict<T>,
) -> TxVerdict<T> {
    if !matches!(verdict, TxVerdict::Applied { .. }) {
        return verdict;
    }
    let problem = slots
        .iter()
        .flat_map(|s| s.effects.iter())
        .find_map(|e| inner.effects.refuses(e));
    match problem {
        None => verdict,
        Some(error) => TxVerdict::DeadLetter {
            error,
            panicked: false,
        },
    }
}

#[allow(clippy::too_many_arguments)]
async fn commit_applied<T: Transaction>(
    inner: &Arc<Inner>,
    holding: Holding,
    slots: Vec<Slot>,
    reply: T::Reply,
    meta: &Meta,
    priority: Priority,
    now_ms: u64,
    dedup: impl Fn(TxRecorded<T>) -> Result<Op, SubmitError>,
) -> Result<TxOutcome<T>, SubmitError> {
    let encode_error = |reason| SubmitError::Encode {
        entity: T::NAME,
        key: TX_KEY.to_string(),
        reason,
    };
    // Room in the outbox lane for every effect recorded, at once or not at all.
    let (count, bytes) = slots
        .iter()
        .flat_map(|s| s.effects.iter())
        .fold((0u64, 0u64), |(c, b), e| {
            (c + 1, b + e.payload.as_ref().map_or(0, |p| p.len() as u64))
        });
    if count > 0 {
        if let Err(full) = inner.shared.outbox.try_reserve_n(priority, count, bytes) {
            holding.release_unchanged();
            Stats::bump(&inner.shared.stats.lanes[priority.index()].refused);
            // The caller puts the command in (it owns it).
            return Err(SubmitError::Overloaded {
                entity: T::NAME,
                key: TX_KEY.to_string(),
                backlog: BacklogKind::Outbox,
                lane: priority,
                pending: full.pending,
                pending_max: full.limits.pending_max(),
                pending_bytes: full.pending_bytes,
                pending_bytes_max: full.limits.pending_bytes_max(),
                command: Returned::new(()),
            });
        }
    }
    let release_room = || {
        if count > 0 {
            inner.shared.outbox.release_n(priority, count, bytes);
        }
    };
    let outbox_seq = if count > 0 {
        inner.shared.next_seq()
    } else {
        0
    };
    let mut ops = Vec::new();
    let mut next = Vec::with_capacity(slots.len());
    let mut first_revision = None;
    for (slot, (m, _)) in slots.iter().zip(&holding.members) {
        debug_assert!(slot.entity == m.entity && slot.key == m.key);
        let revision = slot.revision + 1;
        let version = match (meta.version, slot.version) {
            (Some(v), Some(c)) => Some(v.max(c)),
            (v, c) => v.or(c),
        };
        let Some(registration) = inner.registry.get(slot.entity) else {
            holding.release_unchanged();
            release_room();
            return Err(SubmitError::NotRegistered {
                entity: slot.entity,
            });
        };
        let state =
            match (registration.encode_state)(slot.state.as_ref(), revision, version, now_ms) {
                Ok(state) => state,
                Err(reason) => {
                    holding.release_unchanged();
                    release_room();
                    return Err(encode_error(reason));
                }
            };
        if inner.shared.config.feeds.contains(slot.entity) {
            let change = crate::core::records::ChangeRecord {
                entity: slot.entity.to_string(),
                key: slot.key.clone(),
                message_id: meta.message_id.clone(),
                correlation_id: meta.correlation_id.clone(),
                state: state.clone(),
            };
            match codec::encode(&change) {
                Ok(record) => ops.push(Op::Append(record)),
                Err(reason) => {
                    holding.release_unchanged();
                    release_room();
                    return Err(encode_error(reason));
                }
            }
        }
        ops.push(Op::Put(keys::state(slot.entity, &slot.key), state));
        if revision == 1 {
            ops.push(Op::Put(
                keys::entity_index(slot.entity, &slot.key),
                Vec::new(),
            ));
        }
        if !slot.effects.is_empty() {
            match effect::outbox_ops(
                slot.entity,
                &slot.key,
                meta,
                (outbox_seq, priority),
                &slot.effects,
                now_ms,
                true,
            ) {
                Ok(effect_ops) => ops.extend(effect_ops),
                Err(reason) => {
                    holding.release_unchanged();
                    release_room();
                    return Err(encode_error(reason));
                }
            }
        }
        first_revision.get_or_insert(revision);
        next.push((revision, version));
    }
    let revision = first_revision.unwrap_or(0);
    let dedup_op = match dedup(Recorded::Applied {
        reply: reply.clone(),
        revision,
    }) {
        Ok(op) => op,
        Err(e) => {
            holding.release_unchanged();
            release_room();
            return Err(e);
        }
    };
    ops.push(dedup_op);
    let committed = inner.store.commit_with_seq(ops, outbox_seq).await;
    if let Err(source) = committed {
        // The batch may have reached the engine before the flush failed: the members'
        // actors reload what is stored (dropping the releases does that).
        drop(holding);
        release_room();
        return Err(SubmitError::Storage {
            entity: T::NAME,
            key: TX_KEY.to_string(),
            source,
        });
    }
    // Durable. Each member goes back to its actor with what was committed.
    let woken: Vec<(&'static str, String, bool)> = slots
        .iter()
        .filter(|s| !s.effects.is_empty())
        .map(|s| {
            (
                s.entity,
                s.key.clone(),
                s.effects.iter().any(|e| e.independent),
            )
        })
        .collect();
    let released = slots
        .into_iter()
        .zip(next)
        .map(|(slot, (revision, version))| Some((slot.state, revision, version)))
        .collect();
    holding.release(released);
    for (entity, key, independent) in woken {
        inner
            .effects
            .wake(entity, &key, priority, outbox_seq, independent);
    }
    Stats::bump(&inner.shared.stats.applied);
    Ok(Outcome::Applied { reply, revision })
}
