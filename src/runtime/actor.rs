//! The entity actor: the one home of one entity. A thin actix shell around the pure core in
//! [`apply`](crate::core::apply): load, dedup lookup, evaluate, commit, reply.
//!
//! The actor keeps its own queue of [`Job`]s and a `busy` flag. While a commit or a retry
//! backoff is pending it is busy and starts nothing else, so an entity's messages are applied
//! one at a time, in arrival order; the arbiter thread is never blocked, so other entities on
//! the same shard keep running. The queue is bounded by the runtime's admission tickets.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::field::Empty;

use crate::core::apply::{self, Attempt, Loaded, OutcomeOf, Source, Verdict};
use crate::core::codec;
use crate::core::effect::{effect_lane, outbox_position_of};
use crate::core::hash::{fnv1a, splitmix64};
use crate::core::keys::{self, Space};
use crate::core::records::{
    DeadLetterRecord, DedupRecord, InboxRecord, Meta, RaiseRecord, ShedRecord, StateRecord,
};
use crate::effects::Effects;
use crate::entity::Entity;
use crate::error::{AdminError, DecodeError, Returned, StoreError, SubmitError};
use crate::outcome::{OutcomeKind, Recorded};
use crate::priority::{BacklogKind, Priority, WhenFull};
use crate::runtime::admission::Ticket;
use crate::runtime::backlog::Full;
use crate::runtime::mail::{AdminAction, AskReply, Forward, Idle, Job, Stop};
use crate::runtime::shared::Shared;
use crate::store::{Op, Store};
use crate::telemetry::{field, Stats};

/// What retiring an inbox entry removes and gives back: its lane index entry, and its room
/// in the lane's backlog.
struct Retire {
    index_key: Vec<u8>,
    lane: Priority,
    bytes: u64,
}

/// One message on its way through the attempts.
struct Work<E: Entity> {
    meta: Meta,
    command: E::Command,
    expected_revision: Option<u64>,
    /// See `Job::Ask::fresh_id`: the dedup read is skipped.
    fresh_id: bool,
    source: Source,
    attempt: u32,
    reply: Option<AskReply<E>>,
    /// For inbox work: the drain to continue once this message is retired.
    drain: Option<(u64, Option<Ticket>)>,
    /// For inbox work: its lane and encoded size, released from the backlog once retired.
    retire: Option<(Priority, u64)>,
    /// Its lane; the effects it records wait in the same one.
    priority: Priority,
    /// Held for the life of an `ask`.
    ticket: Option<Ticket>,
    /// Room in the outbox taken while the message waited for it (its effects did not fit).
    room: Option<Room>,
    /// For an `ask` waiting for outbox room: when it stops waiting.
    room_deadline: Option<Instant>,
    span: tracing::Span,
    started: Instant,
}

/// Room taken in the outbox for one message's effects: given back when dropped (the
/// message was not committed), kept once its effects are committed (the effect workers
/// give it back as each effect finishes).
struct Room {
    shared: Arc<Shared>,
    lane: Priority,
    count: u64,
    bytes: u64,
}

impl Room {
    /// Gives back what this holds beyond `count` effects and `bytes`.
    fn shrink_to(&mut self, count: u64, bytes: u64) {
        let (extra_count, extra_bytes) = (self.count - count, self.bytes - bytes);
        if extra_count > 0 || extra_bytes > 0 {
            self.shared
                .outbox
                .release_n(self.lane, extra_count, extra_bytes);
        }
        (self.count, self.bytes) = (count, bytes);
    }

    /// The effects are committed: their room stays taken until each finishes.
    fn keep(mut self) {
        (self.count, self.bytes) = (0, 0);
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if self.count > 0 || self.bytes > 0 {
            self.shared
                .outbox
                .release_n(self.lane, self.count, self.bytes);
        }
    }
}

pub(crate) struct EntityActor<E: Entity> {
    key: String,
    /// Its shard's number (for its lane index entries and its shard's inbox generation).
    shard_index: usize,
    shared: Arc<Shared>,
    store: Arc<Store>,
    effects: Arc<Effects>,
    /// The shard that owns this actor, told when it is idle.
    shard: Recipient<Idle>,
    loaded: Option<Loaded<E::State>>,
    queue: VecDeque<Job<E>>,
    busy: bool,
    stopping: bool,
    /// Jobs received from the shard; compared with the shard's count before passivation.
    received: u64,
    /// The shard's inbox generation when this entity's inbox was last found empty.
    inbox_empty_at: Option<u64>,
    idle_timer: Option<SpawnHandle>,
    /// Who asked for this passivation, told once the actor has stopped.
    stopped_reply: Option<oneshot::Sender<Result<bool, AdminError>>>,
}

impl<E: Entity> EntityActor<E> {
    pub(crate) fn new(
        key: String,
        shared: Arc<Shared>,
        store: Arc<Store>,
        effects: Arc<Effects>,
        shard: Recipient<Idle>,
    ) -> Self {
        Self {
            shard_index: shared.shard_of(E::NAME, &key),
            key,
            shared,
            store,
            effects,
            shard,
            loaded: None,
            queue: VecDeque::new(),
            busy: false,
            stopping: false,
            received: 0,
            inbox_empty_at: None,
            idle_timer: None,
            stopped_reply: None,
        }
    }

    fn submit_error(&self, source: StoreError) -> SubmitError {
        SubmitError::Storage {
            entity: E::NAME,
            key: self.key.clone(),
            source,
        }
    }

    fn decode_error(&self, source: DecodeError) -> SubmitError {
        SubmitError::Decode {
            entity: E::NAME,
            key: self.key.clone(),
            source,
        }
    }

    /// The entity as last committed, loaded from the store on first use (and again after a
    /// panic or a failed commit, which is how the actor "restarts from its last committed
    /// state" without losing its queue).
    fn load(&mut self) -> Result<Loaded<E::State>, SubmitError> {
        if let Some(loaded) = &self.loaded {
            return Ok(loaded.clone());
        }
        let bytes = self
            .store
            .get(&keys::state(E::NAME, &self.key))
            .map_err(|e| self.submit_error(e))?;
        let loaded = match bytes {
            None => Loaded::default(),
            Some(bytes) => {
                let record: StateRecord<E::State> =
                    codec::decode("state", &bytes).map_err(|e| self.decode_error(e))?;
                Loaded::from(record)
            }
        };
        self.loaded = Some(loaded.clone());
        Ok(loaded)
    }

    fn dedup_lookup(&self, message_id: &str) -> Result<Option<apply::RecordedOf<E>>, SubmitError> {
        let bytes = self
            .store
            .get(&keys::dedup(E::NAME, &self.key, message_id))
            .map_err(|e| self.submit_error(e))?;
        match bytes {
            None => Ok(None),
            Some(bytes) => {
                let record: DedupRecord<E::Reply, E::Error> =
                    codec::decode("dedup record", &bytes).map_err(|e| self.decode_error(e))?;
                Ok(Some(record.outcome))
            }
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        while !self.busy {
            match self.queue.pop_front() {
                Some(job) => self.start(job, ctx),
                None => {
                    if self.stopping {
                        ctx.stop();
                    } else {
                        self.arm_idle(ctx);
                    }
                    return;
                }
            }
        }
    }

    fn arm_idle(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.idle_timer.take() {
            ctx.cancel_future(handle);
        }
        let after = self.shared.config.passivate_after;
        self.idle_timer = Some(ctx.run_later(after, |act, ctx| {
            act.idle_timer = None;
            if act.busy || !act.queue.is_empty() || act.stopping {
                return;
            }
            let idle = Idle {
                entity: E::NAME,
                key: act.key.clone(),
                received: act.received,
                done: None,
            };
            // The shard compares `received` with what it forwarded and answers with `Stop`
            // only if nothing is on its way; a closed shard means the runtime is stopping.
            if act.shard.try_send(idle).is_err() {
                ctx.stop();
            }
        }));
    }

    fn start(&mut self, job: Job<E>, ctx: &mut Context<Self>) {
        match job {
            mut job @ Job::Ask {
                inbox_up_to: Some(up_to),
                ..
            } if self.inbox_has_entry_up_to(up_to) => {
                // Entries acknowledged before this ask was sent go first: the ask waits
                // behind a drain of them (which runs under the ask's ticket).
                if let Job::Ask { inbox_up_to, .. } = &mut job {
                    *inbox_up_to = None;
                }
                self.queue.push_front(job);
                self.drain_next(up_to, None, ctx);
            }
            Job::Ask {
                meta,
                command,
                expected_revision,
                fresh_id,
                reply,
                ticket,
                inbox_up_to: _,
                priority,
            } => {
                let span = self.span(&meta);
                let work = Work {
                    meta,
                    command,
                    expected_revision,
                    fresh_id,
                    source: Source {
                        inbox_key: None,
                        index_key: None,
                        command_bytes: None,
                        first_failed_at_ms: None,
                    },
                    attempt: 1,
                    reply: Some(reply),
                    drain: None,
                    retire: None,
                    priority,
                    ticket: Some(ticket),
                    room: None,
                    room_deadline: None,
                    span,
                    started: Instant::now(),
                };
                self.process(work, ctx);
            }
            Job::Drain { up_to, ticket } => self.drain_next(up_to, ticket, ctx),
            Job::Admin {
                action,
                message_id,
                reply,
                ticket,
            } => self.admin(action, message_id, reply, ticket, ctx),
            Job::Prioritise {
                lane,
                reply,
                ticket,
            } => self.prioritise(lane, reply, ticket, ctx),
            mut job @ Job::Hold {
                inbox_up_to: Some(up_to),
                ..
            } if self.inbox_has_entry_up_to(up_to) => {
                if let Job::Hold { inbox_up_to, .. } = &mut job {
                    *inbox_up_to = None;
                }
                self.queue.push_front(job);
                self.drain_next(up_to, None, ctx);
            }
            Job::Hold {
                reply,
                release,
                ticket,
                inbox_up_to: _,
            } => self.hold(reply, release, ticket, ctx),
            Job::Passivate { reply, ticket } => {
                drop(ticket);
                if !self.queue.is_empty() || self.stopping {
                    let _ = reply.send(Ok(false));
                    return;
                }
                // The same handshake as the idle timer: the shard decides, so a job already
                // on its way keeps the actor alive.
                let idle = Idle {
                    entity: E::NAME,
                    key: self.key.clone(),
                    received: self.received,
                    done: Some(reply),
                };
                if self.shard.try_send(idle).is_err() {
                    // The shard is gone (the runtime is stopping); the caller sees
                    // `Interrupted`.
                    ctx.stop();
                }
            }
        }
    }

    /// Holds the entity for a transaction: answers with its committed state and applies
    /// nothing else (the actor stays busy) until the transaction releases it.
    fn hold(
        &mut self,
        reply: oneshot::Sender<Result<Loaded<E::State>, SubmitError>>,
        release: oneshot::Receiver<Option<Loaded<E::State>>>,
        ticket: Ticket,
        ctx: &mut Context<Self>,
    ) {
        let loaded = self.load();
        let held = loaded.is_ok();
        if reply.send(loaded).is_err() || !held {
            // The transaction gave up before its answer (or cannot read this entity).
            return;
        }
        self.busy = true;
        ctx.spawn(release.into_actor(self).map(move |released, act, ctx| {
            drop(ticket);
            act.busy = false;
            match released {
                Ok(Some(next)) => act.loaded = Some(next),
                Ok(None) => {}
                // Dropped: it may have committed; read again what is stored.
                Err(_) => act.loaded = None,
            }
            act.pump(ctx);
        }));
    }

    /// True if this entity's inbox holds an entry with a sequence up to `up_to`. Reads the
    /// inbox only when something may have been written to it since the actor last found it
    /// empty (the shard's inbox generation moved), so asks alone cost no read.
    fn inbox_has_entry_up_to(&mut self, up_to: u64) -> bool {
        let generation = self.shared.inbox_generation(self.shard_index);
        if self.inbox_empty_at == Some(generation) {
            return false;
        }
        let prefix = keys::entity_prefix(Space::Inbox, E::NAME, &self.key);
        match self.store.first_with_prefix(&prefix) {
            Ok(None) => {
                self.inbox_empty_at = Some(generation);
                false
            }
            Ok(Some((key, _))) => keys::parse(Space::Inbox, &key)
                .and_then(|p| keys::inbox_seq(p.suffix))
                .is_some_and(|seq| seq <= up_to),
            // The drain reports read errors; the ask goes ahead.
            Err(_) => false,
        }
    }

    fn span(&self, meta: &Meta) -> tracing::Span {
        tracing::info_span!(
            target: "keystead",
            "keystead.message",
            entity = E::NAME,
            key = %self.key,
            message_id = %meta.message_id,
            correlation_id = %meta.correlation_id,
            version = meta.version,
            attempt = Empty,
            revision = Empty,
            outcome = Empty,
            duration_us = Empty,
        )
    }

    /// Takes the oldest inbox entry (if its sequence is within `up_to`) and processes it;
    /// the drain continues from `complete` once that entry is retired.
    fn drain_next(&mut self, up_to: u64, ticket: Option<Ticket>, ctx: &mut Context<Self>) {
        let prefix = keys::entity_prefix(Space::Inbox, E::NAME, &self.key);
        let (inbox_key, bytes) = match self.store.first_with_prefix(&prefix) {
            Ok(Some(entry)) => entry,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(target: "keystead", entity = E::NAME, key = %self.key, error = %e,
                    "cannot read the inbox; its messages stay there for the next delivery");
                return;
            }
        };
        let parsed = keys::parse(Space::Inbox, &inbox_key)
            .and_then(|p| Some((keys::inbox_seq(p.suffix)?, keys::inbox_lane(p.suffix)?)));
        let Some((seq, lane)) = parsed else {
            self.quarantine(
                inbox_key,
                None,
                bytes,
                "inbox key is malformed".into(),
                up_to,
                ticket,
                ctx,
            );
            return;
        };
        if seq > up_to {
            return;
        }
        let retire = Retire {
            index_key: keys::lane_index(self.shard_index, lane, seq),
            lane,
            bytes: bytes.len() as u64,
        };
        let record: InboxRecord = match codec::decode("inbox entry", &bytes) {
            Ok(record) => record,
            Err(e) => {
                let error = e.to_string();
                self.quarantine(inbox_key, Some(retire), bytes, error, up_to, ticket, ctx);
                return;
            }
        };
        let command: E::Command = match codec::decode("command", &record.command) {
            Ok(command) => command,
            Err(e) => {
                // The envelope is readable: dead-letter it under its own id so an operator
                // can see it, fix the type, and requeue it.
                let error = e.to_string();
                let retire = Some(retire);
                self.quarantine_message(inbox_key, retire, record, error, up_to, ticket, ctx);
                return;
            }
        };
        let span = self.span(&record.meta);
        let work = Work {
            meta: record.meta,
            command,
            expected_revision: None,
            fresh_id: false,
            source: Source {
                inbox_key: Some(inbox_key),
                index_key: Some(retire.index_key),
                command_bytes: Some(record.command),
                first_failed_at_ms: None,
            },
            attempt: 1,
            reply: None,
            drain: Some((up_to, ticket)),
            retire: Some((retire.lane, retire.bytes)),
            priority: retire.lane,
            ticket: None,
            room: None,
            room_deadline: None,
            span,
            started: Instant::now(),
        };
        self.process(work, ctx);
    }

    /// Moves an inbox entry that cannot be decoded at all to the dead letters, under a
    /// synthetic id, so it is neither lost nor retried forever.
    #[allow(clippy::too_many_arguments)]
    fn quarantine(
        &mut self,
        inbox_key: Vec<u8>,
        retire: Option<Retire>,
        raw: Vec<u8>,
        error: String,
        up_to: u64,
        ticket: Option<Ticket>,
        ctx: &mut Context<Self>,
    ) {
        let now = self.shared.clock.now_ms();
        let suffix: String = inbox_key
            .iter()
            .rev()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        let record = InboxRecord {
            meta: Meta {
                message_id: format!("undecodable-inbox-{suffix}"),
                correlation_id: String::new(),
                version: None,
                accepted_at_ms: now,
            },
            command: raw,
        };
        self.quarantine_message(inbox_key, retire, record, error, up_to, ticket, ctx);
    }

    #[allow(clippy::too_many_arguments)]
    fn quarantine_message(
        &mut self,
        inbox_key: Vec<u8>,
        retire: Option<Retire>,
        record: InboxRecord,
        error: String,
        up_to: u64,
        ticket: Option<Ticket>,
        ctx: &mut Context<Self>,
    ) {
        let now = self.shared.clock.now_ms();
        tracing::error!(target: "keystead", entity = E::NAME, key = %self.key,
            message_id = %record.meta.message_id, %error,
            "inbox entry cannot be decoded; moved to the dead letters");
        let letter = DeadLetterRecord {
            meta: record.meta.clone(),
            command: record.command,
            error,
            attempts: 0,
            first_failed_at_ms: now,
            last_failed_at_ms: now,
        };
        let ops = match codec::encode(&letter) {
            Ok(bytes) => {
                let mut ops = vec![
                    Op::Put(
                        keys::dead_letter(E::NAME, &self.key, &record.meta.message_id),
                        bytes,
                    ),
                    Op::Delete(inbox_key),
                ];
                if let Some(retire) = &retire {
                    ops.push(Op::Delete(retire.index_key.clone()));
                }
                ops
            }
            Err(e) => {
                tracing::error!(target: "keystead", error = %e, "cannot encode a dead letter; the entry stays in the inbox");
                return;
            }
        };
        self.busy = true;
        let commit = self.store.commit(ops);
        ctx.spawn(commit.into_actor(self).map(move |result, act, ctx| {
            act.busy = false;
            if result.is_ok() {
                if let Some(retire) = &retire {
                    act.shared.backlog.release(retire.lane, retire.bytes);
                }
                act.shared.stats.outcome(OutcomeKind::DeadLettered);
                act.queue.push_front(Job::Drain { up_to, ticket });
            }
            act.pump(ctx);
        }));
    }

    /// One attempt at `work`.
    fn process(&mut self, mut work: Work<E>, ctx: &mut Context<Self>) {
        let now = self.shared.clock.now_ms();
        let current = match self.load() {
            Ok(current) => current,
            Err(e) => return self.fail(work, e),
        };
        // An id the runtime generated for this ask has never been seen (ids.rs), so there is
        // nothing to look up; every other message is checked against the dedup store.
        let dedup = if work.fresh_id {
            None
        } else {
            match self.dedup_lookup(&work.meta.message_id) {
                Ok(dedup) => dedup,
                Err(e) => return self.fail(work, e),
            }
        };
        let attempts_max = self.shared.config.retry.get_attempts_max();
        let verdict = {
            let _entered = work.span.enter();
            apply::evaluate::<E>(
                &current,
                dedup,
                &Attempt {
                    key: &self.key,
                    meta: &work.meta,
                    command: &work.command,
                    expected_revision: work.expected_revision,
                    attempt: work.attempt,
                    attempts_max,
                    now_ms: now,
                },
            )
        };
        match verdict {
            Verdict::Retry { error, panicked } => {
                self.after_failure(panicked);
                Stats::bump(&self.shared.stats.retries);
                self.shared.stats.notify();
                work.source.first_failed_at_ms.get_or_insert(now);
                let seed = splitmix64(fnv1a(work.meta.message_id.as_bytes()));
                let delay = self.shared.config.retry.backoff(work.attempt, seed);
                tracing::debug!(target: "keystead", parent: &work.span, attempt = work.attempt,
                    %error, delay_us = delay.as_micros() as u64, "retryable failure; will retry");
                work.attempt += 1;
                self.busy = true;
                ctx.run_later(delay, move |act, ctx| {
                    act.busy = false;
                    act.process(work, ctx);
                    act.pump(ctx);
                });
            }
            Verdict::Conflict { expected, actual } => {
                Stats::bump(&self.shared.stats.conflicts);
                debug_assert!(
                    work.source.inbox_key.is_none(),
                    "only ask carries an expected revision"
                );
                self.record_span(&work, "conflict", current.revision);
                let error = SubmitError::Conflict {
                    entity: E::NAME,
                    key: self.key.clone(),
                    expected,
                    actual,
                };
                self.after_reads_durable(ctx, move |act, durable| {
                    let answer = match durable {
                        Ok(()) => error,
                        Err(e) => act.submit_error(e),
                    };
                    if let Some(reply) = work.reply.take() {
                        let _ = reply.send(Err(answer));
                    }
                });
            }
            verdict => {
                let verdict = self.check_effects(verdict);
                if let Verdict::DeadLetter { panicked, .. } = &verdict {
                    self.after_failure(*panicked);
                }
                let has_effects =
                    matches!(&verdict, Verdict::Applied { effects, .. } if !effects.is_empty());
                let has_independent = matches!(&verdict,
                    Verdict::Applied { effects, .. } if effects.iter().any(|e| e.independent));
                // Coalescing effects recorded: (type, index) of each.
                let coalescing: Vec<(&'static str, u32)> = match &verdict {
                    Verdict::Applied { effects, .. } => effects
                        .iter()
                        .filter(|e| e.coalesce)
                        .map(|e| (e.name, e.index))
                        .collect(),
                    _ => Vec::new(),
                };
                let effects_need = match &verdict {
                    Verdict::Applied { effects, .. } if !effects.is_empty() => Some((
                        effects.len() as u64,
                        effects
                            .iter()
                            .map(|e| e.payload.as_ref().map_or(0, |p| p.len() as u64))
                            .sum::<u64>(),
                    )),
                    _ => None,
                };
                let room = match self.outbox_room(&mut work, effects_need) {
                    Ok(room) => room,
                    Err((need, full)) => return self.wait_for_outbox(work, need, full, ctx),
                };
                // Ordered effects read by a worker already claimed for them need no outbox
                // lane index entry (independent ones always get one).
                let pin = (has_effects && !has_independent)
                    .then(|| self.effects.claim(E::NAME, &self.key, work.priority))
                    .flatten();
                let outbox_seq = if has_effects {
                    self.shared.next_seq()
                } else {
                    0
                };
                let planned = apply::writes::<E>(
                    &self.key,
                    &work.meta,
                    &work.source,
                    &work.command,
                    &verdict,
                    apply::Stamp {
                        attempt: work.attempt,
                        now_ms: now,
                        outbox_seq,
                        lane: work.priority,
                        index_effects: pin.is_none(),
                        feed: self.shared.config.feeds.contains(E::NAME),
                    },
                );
                let (mut ops, outcome) = match planned {
                    Ok(Some(planned)) => planned,
                    Ok(None) => unreachable!("retry and conflict are handled above"),
                    Err(reason) => {
                        let error = SubmitError::Encode {
                            entity: E::NAME,
                            key: self.key.clone(),
                            reason,
                        };
                        return self.fail(work, error);
                    }
                };
                // The effects they replace leave the outbox in the same batch.
                let mut superseding = match self.supersede(&work, &coalescing, now) {
                    Ok(superseding) => superseding,
                    Err(e) => return self.fail(work, e),
                };
                if let Some(superseding) = superseding.as_mut() {
                    ops.append(&mut superseding.ops);
                }
                let next = match verdict {
                    Verdict::Applied { next, .. } => Some(next),
                    _ => None,
                };
                if ops.is_empty() {
                    // Nothing to commit (a duplicate answered from its dedup record): the
                    // answer comes from reads, so it goes out once they are durable.
                    return self.after_reads_durable(ctx, move |act, durable| match durable {
                        Ok(()) => act.complete(work, next, outcome),
                        Err(e) => {
                            act.loaded = None;
                            let error = act.submit_error(e);
                            act.fail(work, error);
                        }
                    });
                }
                self.busy = true;
                let commit = self.store.commit_with_seq(ops, outbox_seq);
                ctx.spawn(commit.into_actor(self).map(move |result, act, ctx| {
                    act.busy = false;
                    match result {
                        Ok(()) => {
                            if let Some(room) = room {
                                room.keep();
                            }
                            if let Some(superseding) = superseding {
                                superseding.landed();
                            }
                            if has_effects && pin.is_none() {
                                let lane = work.priority;
                                act.effects.wake(
                                    E::NAME,
                                    &act.key,
                                    lane,
                                    outbox_seq,
                                    has_independent,
                                );
                            }
                            // The claimed worker reads the effects now.
                            drop(pin);
                            act.complete(work, next, outcome)
                        }
                        Err(e) => {
                            // The batch may have reached sled before the flush failed: forget
                            // the cached state so the next message reloads what is stored.
                            act.loaded = None;
                            let error = act.submit_error(e);
                            act.fail(work, error);
                        }
                    }
                    act.pump(ctx);
                }));
            }
        }
    }

    /// The effects of this entity that the coalescing effects a message records
    /// (`coalescing`: type and index) supersede (see `Effect::COALESCE`).
    fn supersede(
        &self,
        work: &Work<E>,
        coalescing: &[(&'static str, u32)],
        now_ms: u64,
    ) -> Result<Option<crate::effects::Superseding>, SubmitError> {
        if coalescing.is_empty() {
            return Ok(None);
        }
        let by: Vec<(&str, crate::effects::EffectKey)> = coalescing
            .iter()
            .map(|(name, index)| {
                let new = crate::effects::EffectKey::new(
                    E::NAME,
                    self.key.as_str(),
                    work.meta.message_id.as_str(),
                    *index,
                );
                (*name, new)
            })
            .collect();
        self.effects
            .supersede(E::NAME, &self.key, &by, now_ms)
            .map_err(|e| self.submit_error(e))
    }

    /// Room in the outbox for the effects a message records (`need`: how many, and their
    /// payload bytes), in the message's lane: the room it already took while waiting, or
    /// new room. The error says what the lane holds.
    #[allow(clippy::type_complexity)]
    fn outbox_room(
        &self,
        work: &mut Work<E>,
        need: Option<(u64, u64)>,
    ) -> Result<Option<Room>, ((u64, u64), Full)> {
        let held = work.room.take();
        let Some((count, bytes)) = need else {
            return Ok(None);
        };
        if let Some(mut held) = held {
            if held.count >= count && held.bytes >= bytes {
                held.shrink_to(count, bytes);
                return Ok(Some(held));
            }
        }
        let lane = work.priority;
        match self.shared.outbox.try_reserve_n(lane, count, bytes) {
            Ok(()) => Ok(Some(Room {
                shared: self.shared.clone(),
                lane,
                count,
                bytes,
            })),
            Err(full) => Err(((count, bytes), full)),
        }
    }

    /// The message's effects do not fit in its outbox lane: it is not applied yet. A
    /// message from the inbox waits for room as long as it takes (it is accepted; the
    /// entity's later messages wait behind it, so the inbox fills and backpressure reaches
    /// `tell`). An `ask` waits as the lane's policy says, then is refused with its command.
    /// Once room is taken the message is evaluated again (its state has not changed: the
    /// actor is busy meanwhile).
    fn wait_for_outbox(
        &mut self,
        mut work: Work<E>,
        (count, bytes): (u64, u64),
        full: Full,
        ctx: &mut Context<Self>,
    ) {
        let lane = work.priority;
        let deadline = if work.source.inbox_key.is_some() {
            None
        } else {
            match full.limits.when_full_policy() {
                WhenFull::Reject => return self.refuse_outbox(work, full),
                WhenFull::Block(wait_max) => Some(
                    *work
                        .room_deadline
                        .get_or_insert_with(|| Instant::now() + wait_max),
                ),
            }
        };
        Stats::bump(&self.shared.stats.effect_priorities[lane.index()].blocked);
        self.shared.stats.notify();
        tracing::debug!(target: "keystead", parent: &work.span, lane = lane.as_str(),
            pending = full.pending, pending_max = full.limits.pending_max(),
            "the outbox lane is full; the message waits for room for its effects");
        self.busy = true;
        let shared = self.shared.clone();
        let wait = async move {
            shared
                .outbox
                .reserve_until(lane, count, bytes, deadline)
                .await
        };
        ctx.spawn(wait.into_actor(self).map(move |result, act, ctx| {
            act.busy = false;
            match result {
                Ok(()) => {
                    work.room = Some(Room {
                        shared: act.shared.clone(),
                        lane,
                        count,
                        bytes,
                    });
                    act.process(work, ctx);
                }
                Err(full) => act.refuse_outbox(work, full),
            }
            act.pump(ctx);
        }));
    }

    /// Refuses an `ask` whose effects found no room in its outbox lane, giving its command
    /// back. Nothing was written.
    fn refuse_outbox(&mut self, work: Work<E>, full: Full) {
        let lane = work.priority;
        Stats::bump(&self.shared.stats.effect_priorities[lane.index()].refused);
        self.shared.stats.notify();
        let Work {
            command,
            reply,
            span,
            ..
        } = work;
        span.record(field::OUTCOME, "overloaded");
        tracing::info!(target: "keystead", parent: &span, lane = lane.as_str(),
            "the outbox lane is full; the ask is refused with its command");
        let error = SubmitError::Overloaded {
            entity: E::NAME,
            key: self.key.clone(),
            backlog: BacklogKind::Outbox,
            lane,
            pending: full.pending,
            pending_max: full.limits.pending_max(),
            pending_bytes: full.pending_bytes,
            pending_bytes_max: full.limits.pending_bytes_max(),
            command: Returned::new(command),
        };
        if let Some(reply) = reply {
            let _ = reply.send(Err(error));
        }
    }

    /// Runs `then` once everything this actor has read is durable: at once when it is
    /// (almost always), else after the flush under way, with the actor busy meanwhile so
    /// that its messages stay in order. An answer that commits nothing (a duplicate's stored
    /// reply, a conflict) is built from reads alone, and the committer applies a batch before
    /// flushing it; without this wait such an answer could show a first run that a crash
    /// then takes back. `then` gets the error when that flush never comes (the store is
    /// poisoned or closed).
    fn after_reads_durable(
        &mut self,
        ctx: &mut Context<Self>,
        then: impl FnOnce(&mut Self, Result<(), StoreError>) + 'static,
    ) {
        if self.store.reads_are_durable() {
            return then(self, Ok(()));
        }
        self.busy = true;
        let durable = self.store.reads_durable();
        ctx.spawn(durable.into_actor(self).map(move |result, act, ctx| {
            act.busy = false;
            then(act, result);
            act.pump(ctx);
        }));
    }

    /// An applied message whose effects cannot run (no executor registered for them, an
    /// effect recorded for another entity type, an effect that does not encode) is not
    /// applied: it is dead-lettered with the reason, so nothing commits that cannot finish.
    fn check_effects(&self, verdict: Verdict<E>) -> Verdict<E> {
        let Verdict::Applied { effects, .. } = &verdict else {
            return verdict;
        };
        let problem = effects.iter().find_map(|e| {
            if e.origin != E::NAME {
                Some(format!(
                    "effect {} belongs to entity type {}, not {}",
                    e.name,
                    e.origin,
                    E::NAME
                ))
            } else {
                self.effects.refuses(e)
            }
        });
        match problem {
            None => verdict,
            Some(error) => {
                tracing::error!(target: "keystead", entity = E::NAME, key = %self.key, %error, "message dead-lettered");
                Verdict::DeadLetter {
                    error,
                    panicked: false,
                }
            }
        }
    }

    fn after_failure(&mut self, panicked: bool) {
        if panicked {
            Stats::bump(&self.shared.stats.handler_panics);
            // Restart from the last committed state: the handler ran on a copy, but reload
            // anyway so nothing the panic may have touched survives.
            self.loaded = None;
        }
    }

    fn record_span(&self, work: &Work<E>, outcome: &str, revision: u64) {
        let span = &work.span;
        span.record(field::ATTEMPT, work.attempt);
        span.record(field::REVISION, revision);
        span.record(field::OUTCOME, outcome);
        span.record(
            field::DURATION_US,
            work.started.elapsed().as_micros() as u64,
        );
    }

    /// The message reached its outcome and it is durable: update the cache, count, log,
    /// reply, and continue the drain it belongs to.
    fn complete(&mut self, work: Work<E>, next: Option<Loaded<E::State>>, outcome: OutcomeOf<E>) {
        if let Some(next) = next {
            self.loaded = Some(next);
        }
        let revision = self.loaded.as_ref().map_or(0, |l| l.revision);
        let kind = outcome.kind();
        self.shared.stats.outcome(kind);
        if let Some((lane, bytes)) = work.retire {
            self.shared.backlog.release(lane, bytes);
        }
        self.record_span(&work, kind.as_str(), revision);
        if self.shared.config.log_payloads {
            tracing::info!(target: "keystead", parent: &work.span, outcome = kind.as_str(),
                command = ?work.command, result = ?outcome, "keystead.outcome");
        } else if kind == OutcomeKind::DeadLettered {
            tracing::warn!(target: "keystead", parent: &work.span, outcome = kind.as_str(), "keystead.outcome");
        } else {
            tracing::info!(target: "keystead", parent: &work.span, outcome = kind.as_str(), "keystead.outcome");
        }
        if let Some(reply) = work.reply {
            let _ = reply.send(Ok(outcome));
        }
        if let Some((up_to, ticket)) = work.drain {
            self.queue.push_front(Job::Drain { up_to, ticket });
        }
        drop(work.ticket);
    }

    /// The message could not be processed now. An `ask` gets the error; an inbox message
    /// stays in the inbox (nothing was committed) and its drain stops until the next
    /// delivery or the next open.
    fn fail(&mut self, mut work: Work<E>, error: SubmitError) {
        work.span.record(field::OUTCOME, "error");
        tracing::warn!(target: "keystead", parent: &work.span, error = %error,
            "message not processed; an inbox message stays in the inbox");
        if let Some(reply) = work.reply.take() {
            let _ = reply.send(Err(error));
        }
    }

    fn admin(
        &mut self,
        action: AdminAction,
        message_id: String,
        reply: oneshot::Sender<Result<bool, AdminError>>,
        ticket: Ticket,
        ctx: &mut Context<Self>,
    ) {
        let record_key = match action {
            AdminAction::Requeue | AdminAction::Purge => {
                keys::dead_letter(E::NAME, &self.key, &message_id)
            }
            AdminAction::RequeueShed | AdminAction::PurgeShed => {
                keys::shed(E::NAME, &self.key, &message_id)
            }
        };
        let bytes = match self.store.get(&record_key) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                let _ = reply.send(Ok(false));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(AdminError::Storage(e)));
                return;
            }
        };
        let decode_error = |source| AdminError::Decode {
            entity: E::NAME,
            key: self.key.clone(),
            source,
        };
        // What goes back into the inbox, in which lane.
        let (meta, command, lane) = match action {
            AdminAction::Purge | AdminAction::PurgeShed => {
                return self.admin_commit(vec![Op::Delete(record_key)], None, reply, ticket, ctx);
            }
            AdminAction::Requeue => {
                match codec::decode::<DeadLetterRecord>("dead letter", &bytes) {
                    Ok(letter) => (letter.meta, letter.command, Priority::Normal),
                    Err(source) => {
                        let _ = reply.send(Err(decode_error(source)));
                        return;
                    }
                }
            }
            AdminAction::RequeueShed => match codec::decode::<ShedRecord>("shed message", &bytes) {
                Ok(shed) => {
                    let lane = Priority::from_index(shed.lane).unwrap_or_default();
                    (shed.meta, shed.command, lane)
                }
                Err(source) => {
                    let _ = reply.send(Err(decode_error(source)));
                    return;
                }
            },
        };
        let inbox_bytes = match codec::encode(&InboxRecord { meta, command }) {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = reply.send(Err(AdminError::Storage(StoreError::Io {
                    op: "requeue",
                    source: std::io::Error::other(e),
                })));
                return;
            }
        };
        // A requeued message takes room in its lane like any other: never over the limit.
        let size = inbox_bytes.len() as u64;
        if let Err(full) = self.shared.backlog.try_reserve(lane, size) {
            let _ = reply.send(Err(AdminError::Overloaded {
                entity: E::NAME,
                key: self.key.clone(),
                backlog: BacklogKind::Inbox,
                lane,
                pending: full.pending,
                pending_max: full.limits.pending_max(),
            }));
            return;
        }
        let seq = self.shared.next_seq();
        let mut ops = vec![
            Op::Delete(record_key),
            Op::Put(keys::inbox_in(E::NAME, &self.key, seq, lane), inbox_bytes),
            Op::Put(
                keys::lane_index(self.shard_index, lane, seq),
                keys::inbox_in(E::NAME, &self.key, seq, lane),
            ),
        ];
        // The id keeps its identity: drop only the "dead-lettered" dedup record, so the
        // requeued message is processed, and never a record of another outcome.
        if let Ok(Some(Recorded::DeadLettered { .. })) = self.dedup_lookup(&message_id) {
            ops.push(Op::Delete(keys::dedup(E::NAME, &self.key, &message_id)));
        }
        self.admin_commit(ops, Some((lane, seq, size)), reply, ticket, ctx);
    }

    /// Moves every pending inbox entry of this entity whose lane is below `lane` into
    /// `lane`: same sequence (so the entity's order is kept), new lane byte, new index entry.
    /// Reads only this entity's inbox. The work moves with its room in the backlog; it is
    /// not new work, so the higher lane takes it even when full.
    fn prioritise(
        &mut self,
        lane: Priority,
        reply: oneshot::Sender<Result<u64, AdminError>>,
        ticket: Ticket,
        ctx: &mut Context<Self>,
    ) {
        let prefix = keys::entity_prefix(Space::Inbox, E::NAME, &self.key);
        let mut ops = Vec::new();
        let mut moves = Vec::new();
        let entries = match self.store.scan_prefix(&prefix) {
            Ok(scan) => scan,
            Err(e) => {
                let _ = reply.send(Err(AdminError::Storage(e)));
                return;
            }
        };
        for entry in entries {
            let (key, value) = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    let _ = reply.send(Err(AdminError::Storage(e)));
                    return;
                }
            };
            let parsed = keys::parse(Space::Inbox, &key)
                .and_then(|p| Some((keys::inbox_seq(p.suffix)?, keys::inbox_lane(p.suffix)?)));
            let Some((seq, from)) = parsed else { continue };
            if from >= lane {
                continue;
            }
            let moved = keys::inbox_in(E::NAME, &self.key, seq, lane);
            ops.push(Op::Delete(key));
            ops.push(Op::Delete(keys::lane_index(self.shard_index, from, seq)));
            ops.push(Op::Put(
                keys::lane_index(self.shard_index, lane, seq),
                moved.clone(),
            ));
            moves.push((from, seq, value.len() as u64));
            ops.push(Op::Put(moved, value));
        }
        // Its unfinished effects: raised through a record the effect workers read, not by
        // moving keys a worker may be using; their outbox lane index entries move up, so the
        // effect feeder of the higher lane finds them.
        let outbox = keys::entity_prefix(Space::Outbox, E::NAME, &self.key);
        let mut effects_raised = 0u64;
        let mut raised_from_seq = u64::MAX;
        match self.store.scan_prefix(&outbox) {
            Ok(scan) => {
                for entry in scan {
                    match entry {
                        Ok((key, _)) if effect_lane(Space::Outbox, &key) < lane => {
                            effects_raised += 1;
                            if let Some((seq, index)) = outbox_position_of(&key) {
                                raised_from_seq = raised_from_seq.min(seq);
                                for other in Priority::ALL.into_iter().filter(|&l| l != lane) {
                                    ops.push(Op::Delete(keys::outbox_index(other, seq, index)));
                                }
                                ops.push(Op::Put(keys::outbox_index(lane, seq, index), key));
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = reply.send(Err(AdminError::Storage(e)));
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                let _ = reply.send(Err(AdminError::Storage(e)));
                return;
            }
        }
        if moves.is_empty() && effects_raised == 0 {
            let _ = reply.send(Ok(0));
            return;
        }
        if effects_raised > 0 {
            let raise = RaiseRecord {
                lane: lane.index() as u8,
                up_to_seq: self.shared.seq.load(std::sync::atomic::Ordering::Acquire),
            };
            match codec::encode(&raise) {
                Ok(bytes) => ops.push(Op::Put(keys::raise(E::NAME, &self.key), bytes)),
                Err(e) => {
                    let _ = reply.send(Err(AdminError::Storage(StoreError::Io {
                        op: "prioritise",
                        source: std::io::Error::other(e),
                    })));
                    return;
                }
            }
        }
        self.busy = true;
        let commit = self.store.commit(ops);
        ctx.spawn(commit.into_actor(self).map(move |result, act, ctx| {
            act.busy = false;
            match result {
                Ok(()) => {
                    for &(from, seq, size) in &moves {
                        act.shared.backlog.release(from, size);
                        act.shared.backlog.force(lane, size);
                        act.shared.accepted_on(act.shard_index, lane, seq);
                    }
                    if effects_raised > 0 {
                        act.effects.raise(E::NAME, &act.key, lane, raised_from_seq);
                    }
                    let _ = reply.send(Ok(moves.len() as u64 + effects_raised));
                }
                Err(e) => {
                    let _ = reply.send(Err(AdminError::Storage(e)));
                }
            }
            drop(ticket);
            act.pump(ctx);
        }));
    }

    /// Commits an admin action; a requeue (`lane`, `seq`, `size`) is then handed to its
    /// lane's feeder, or its room given back if the commit failed.
    fn admin_commit(
        &mut self,
        ops: Vec<Op>,
        requeued: Option<(Priority, u64, u64)>,
        reply: oneshot::Sender<Result<bool, AdminError>>,
        ticket: Ticket,
        ctx: &mut Context<Self>,
    ) {
        self.busy = true;
        let seq = requeued.map_or(0, |(_, seq, _)| seq);
        let commit = self.store.commit_with_seq(ops, seq);
        ctx.spawn(commit.into_actor(self).map(move |result, act, ctx| {
            act.busy = false;
            match result {
                Ok(()) => {
                    if let Some((lane, seq, _)) = requeued {
                        act.shared.accepted_on(act.shard_index, lane, seq);
                    }
                    let _ = reply.send(Ok(true));
                }
                Err(e) => {
                    if let Some((lane, _, size)) = requeued {
                        act.shared.backlog.release(lane, size);
                    }
                    let _ = reply.send(Err(AdminError::Storage(e)));
                }
            }
            drop(ticket);
            act.pump(ctx);
        }));
    }
}

impl<E: Entity> Actor for EntityActor<E> {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        Stats::bump(&self.shared.stats.activations);
        Stats::bump(&self.shared.stats.live_entities);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        Stats::drop_one(&self.shared.stats.live_entities);
        if self.stopping {
            Stats::bump(&self.shared.stats.passivations);
        }
        self.shared.stats.notify();
        if let Some(done) = self.stopped_reply.take() {
            let _ = done.send(Ok(true));
        }
    }
}

impl<E: Entity> Handler<Forward<E>> for EntityActor<E> {
    type Result = ();

    fn handle(&mut self, Forward(job): Forward<E>, ctx: &mut Context<Self>) {
        self.received += 1;
        self.queue.push_back(job);
        self.pump(ctx);
    }
}

impl<E: Entity> Handler<Stop> for EntityActor<E> {
    type Result = ();

    fn handle(&mut self, stop: Stop, ctx: &mut Context<Self>) {
        self.stopping = true;
        self.stopped_reply = stop.done;
        self.pump(ctx);
    }
}
