//! The effect workers: one lane per entity with pending effects, run on a tokio runtime of
//! their own, under a bound on effects running at once; each effect's attempts, status moves
//! and feedback.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use tracing::Instrument;

use crate::core::codec;
use crate::core::effect::effect_lane;
use crate::core::hash::{fnv1a, splitmix64};
use crate::core::keys::{self, Space};
use crate::core::records::RaiseRecord;
use crate::core::records::{InboxRecord, Meta};
use crate::error::{AdminError, StoreError};
use crate::priority::{BacklogKind, Priority};
use crate::retry::RetryPolicy;
use crate::runtime::admission::{Gate, GateConfig, GateKind};
use crate::runtime::shared::Shared;
use crate::store::{Op, Store};
use crate::telemetry::Stats;

use super::executor::Registered;
use super::query::find;
use crate::core::effect::{
    feedback_id, EffectContext, EffectError, EffectKey, EffectRecord, EffectStatus,
};

/// The effect workers: a tokio runtime of their own, one lane per entity with pending
/// effects, and a bound on effects running at once.
pub(crate) struct Effects {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    executors: HashMap<&'static str, Registered>,
    store: Arc<Store>,
    shared: Arc<Shared>,
    retry: RetryPolicy,
    /// At most `effects_running_max` attempts at once, admitted in lanes (the lane of the
    /// message that recorded the effect, or higher after `prioritise`).
    gate: Arc<Gate>,
    /// Active lanes; `true` when more work arrived while the lane was scanning.
    lanes: Mutex<HashMap<(String, String), bool>>,
    /// Independent effects being performed, by outbox key.
    independent: Mutex<HashSet<Vec<u8>>>,
}

impl fmt::Debug for Effects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Effects")
            .field("executors", &self.executors.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The lane feedback is delivered in.
const FEEDBACK_LANE: Priority = Priority::Normal;

/// How many outbox entries a lane reads per scan.
const SCAN_MAX: usize = 64;

impl Effects {
    pub(crate) fn start(
        executors: HashMap<&'static str, Registered>,
        store: Arc<Store>,
        shared: Arc<Shared>,
        retry: RetryPolicy,
        workers: usize,
        running_max: usize,
    ) -> std::io::Result<Arc<Self>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .max_blocking_threads(running_max.max(1))
            .thread_name("keystead-effects")
            .enable_time()
            .build()?;
        let gate = Gate::new(
            GateConfig {
                capacity: running_max,
                entity_max: running_max,
                promote_after: shared.config.lane_promote_after,
                kind: GateKind::Effects,
            },
            shared.clone(),
        );
        Ok(Arc::new(Self {
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
            executors,
            store,
            shared,
            retry,
            gate,
            lanes: Mutex::new(HashMap::new()),
            independent: Mutex::new(HashSet::new()),
        }))
    }

    /// True when an executor is registered for effect `name` recorded by entity `origin`.
    pub(crate) fn accepts(&self, name: &str, origin: &str) -> bool {
        self.executors.get(name).is_some_and(|r| r.origin == origin)
    }

    /// Stops the workers without waiting for executors that block: their effects stay in
    /// the outbox (a running one runs again, with the same key, at the next open).
    pub(crate) fn shutdown(&self) {
        if let Some(runtime) = self.runtime.lock().take() {
            runtime.shutdown_background();
        }
    }

    /// Makes sure a lane runs for entity (`entity`, `key`); with `independent`, also starts
    /// its independent effects at once (they must not wait behind an ordered effect that is
    /// retrying). Pass `independent` only when there may be some: it costs an outbox scan.
    pub(crate) fn wake(self: &Arc<Self>, entity: &str, key: &str, independent: bool) {
        if independent {
            self.start_independent(&keys::entity_prefix(Space::Outbox, entity, key));
        }
        let id = (entity.to_string(), key.to_string());
        {
            let mut lanes = self.lanes.lock();
            if let Some(more) = lanes.get_mut(&id) {
                *more = true;
                return;
            }
            lanes.insert(id.clone(), false);
        }
        Stats::bump(&self.shared.stats.effect_lanes);
        let this = self.clone();
        self.handle.spawn(async move { this.lane(id).await });
    }

    async fn lane(self: Arc<Self>, id: (String, String)) {
        let prefix = keys::entity_prefix(Space::Outbox, &id.0, &id.1);
        loop {
            let batch = match self.pending(&prefix, false) {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(target: "keystead", entity = %id.0, key = %id.1, error = %e,
                        "cannot read the outbox; its effects wait for the next wake or open");
                    break;
                }
            };
            let mut progressed = false;
            for (outbox_key, record) in batch {
                match self.clone().perform(&outbox_key, record).await {
                    Ok(()) => progressed = true,
                    Err(()) => break,
                }
            }
            if !progressed {
                let mut lanes = self.lanes.lock();
                if lanes.get(&id).copied().unwrap_or(false) {
                    lanes.insert(id.clone(), false);
                    continue;
                }
                lanes.remove(&id);
                break;
            }
        }
        self.lanes.lock().remove(&id);
        Stats::drop_one(&self.shared.stats.effect_lanes);
        self.shared.stats.notify();
    }

    /// Spawns every unfinished independent effect of one entity that is not running yet.
    fn start_independent(self: &Arc<Self>, prefix: &[u8]) {
        let batch = match self.pending(prefix, true) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(target: "keystead", error = %e, "cannot read the outbox");
                return;
            }
        };
        for (outbox_key, record) in batch {
            if !self.independent.lock().insert(outbox_key.clone()) {
                continue;
            }
            let this = self.clone();
            Stats::bump(&self.shared.stats.effect_lanes);
            self.handle.spawn(async move {
                let _ = this.clone().perform(&outbox_key, record).await;
                this.independent.lock().remove(&outbox_key);
                Stats::drop_one(&this.shared.stats.effect_lanes);
                this.shared.stats.notify();
            });
        }
    }

    /// The first unfinished outbox entries of one entity of one kind (ordered or
    /// independent), in recorded order, skipping independent effects already running.
    fn pending(
        &self,
        prefix: &[u8],
        independent: bool,
    ) -> Result<Vec<(Vec<u8>, EffectRecord)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.store.scan_prefix(prefix)? {
            let (key, value) = entry?;
            if self.independent.lock().contains(&key) {
                continue;
            }
            match codec::decode::<EffectRecord>("effect record", &value) {
                Ok(record)
                    if !record.info.status.finished() && record.independent == independent =>
                {
                    out.push((key, record))
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(target: "keystead", error = %e, "undecodable outbox entry skipped; it stays in the outbox");
                }
            }
            if out.len() >= SCAN_MAX {
                break;
            }
        }
        Ok(out)
    }

    /// Performs one effect through its attempts. `Ok` when it reached an end (done, failed,
    /// dead-lettered); `Err` when it must wait for a later wake (no executor, store error).
    async fn perform(
        self: Arc<Self>,
        outbox_key: &[u8],
        mut record: EffectRecord,
    ) -> Result<(), ()> {
        let Some(executor) = self.executors.get(record.info.name.as_str()) else {
            tracing::error!(target: "keystead", effect = %record.info.name,
                "no executor registered for this effect type; it waits in the outbox. Register it with RuntimeBuilder::executor");
            return Err(());
        };
        let run = executor.run.clone();
        let span = tracing::info_span!(target: "keystead", "keystead.effect",
            effect = %record.info.name, effect_key = %record.info.effect_key,
            correlation_id = %record.info.correlation_id, attempt = tracing::field::Empty,
            status = tracing::field::Empty);
        loop {
            let lane = self.lane_of(outbox_key);
            let Some(_permit) = self
                .gate
                .acquire(executor.origin, &record.info.effect_key.key, lane)
                .await
            else {
                return Err(());
            };
            record.info.attempts += 1;
            self.transition(&mut record, EffectStatus::Running, None);
            // Durable in every mode before the effect runs: this batch follows the one that
            // recorded the effect, so no effect of a change a crash takes back ever runs
            // (in relaxed mode a plain commit completes before its flush).
            let running = Op::Put(outbox_key.to_vec(), encode(&record)?);
            if let Err(e) = self.store.commit_durable(vec![running]).await {
                tracing::warn!(target: "keystead", error = %e,
                    "cannot record that an effect starts; it stays in the outbox and runs later");
                return Err(());
            }
            span.record("attempt", record.info.attempts);
            let ctx = EffectContext {
                key: record.info.effect_key.clone(),
                correlation_id: record.info.correlation_id.clone(),
                attempt: record.info.attempts,
            };
            let result = run(record.payload.clone(), ctx)
                .instrument(span.clone())
                .await;
            drop(_permit);
            match result {
                Ok(feedback) => {
                    self.transition(&mut record, EffectStatus::Done, None);
                    span.record("status", "done");
                    let mut ops = self.finish_ops(outbox_key, &record)?;
                    let feedback = match feedback {
                        Some(command) => {
                            let seq = self.shared.next_seq();
                            let (feedback_ops, size) = self.feedback_ops(&record, seq, command)?;
                            ops.extend(feedback_ops);
                            Some((seq, size))
                        }
                        None => None,
                    };
                    // Feedback ends work already accepted: it is counted in its lane, never
                    // refused (refusing it would lose the effect's result).
                    if let Some((_, size)) = feedback {
                        self.shared.backlog.force(FEEDBACK_LANE, size);
                    }
                    let seq = feedback.map_or(0, |(seq, _)| seq);
                    if let Err(()) = self.commit_with_seq(ops, seq).await {
                        if let Some((_, size)) = feedback {
                            self.shared.backlog.release(FEEDBACK_LANE, size);
                        }
                        return Err(());
                    }
                    self.finished(outbox_key, &record);
                    Stats::bump(&self.shared.stats.effects_done);
                    tracing::info!(target: "keystead", parent: &span, "effect done");
                    if feedback.is_some() {
                        let key = &record.info.effect_key;
                        self.shared
                            .accepted(&key.entity, &key.key, FEEDBACK_LANE, seq);
                    }
                    return Ok(());
                }
                Err(EffectError::Permanent(reason)) => {
                    self.transition(&mut record, EffectStatus::Failed, Some(reason.clone()));
                    span.record("status", "failed");
                    self.commit(self.finish_ops(outbox_key, &record)?).await?;
                    self.finished(outbox_key, &record);
                    Stats::bump(&self.shared.stats.effects_failed);
                    tracing::warn!(target: "keystead", parent: &span, error = %reason, "effect failed permanently");
                    return Ok(());
                }
                Err(EffectError::Retryable(reason))
                    if record.info.attempts >= self.retry.get_attempts_max() =>
                {
                    self.transition(
                        &mut record,
                        EffectStatus::DeadLettered,
                        Some(reason.clone()),
                    );
                    span.record("status", "dead_lettered");
                    self.commit(self.finish_ops(outbox_key, &record)?).await?;
                    self.finished(outbox_key, &record);
                    Stats::bump(&self.shared.stats.effects_dead_lettered);
                    tracing::warn!(target: "keystead", parent: &span, error = %reason, "effect dead-lettered");
                    return Ok(());
                }
                Err(EffectError::Retryable(reason)) => {
                    self.transition(&mut record, EffectStatus::Pending, Some(reason.clone()));
                    self.commit(vec![Op::Put(outbox_key.to_vec(), encode(&record)?)])
                        .await?;
                    Stats::bump(&self.shared.stats.effect_retries);
                    self.shared.stats.notify();
                    let seed = splitmix64(fnv1a(record.info.effect_key.to_string().as_bytes()));
                    let delay = self.retry.backoff(record.info.attempts, seed);
                    tracing::debug!(target: "keystead", parent: &span, error = %reason,
                        delay_us = delay.as_micros() as u64, "effect failed; will retry");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The lane an attempt at the effect under `outbox_key` waits in: its own (the recording
    /// message's), raised by a `prioritise` of its entity that came after it was recorded.
    fn lane_of(&self, outbox_key: &[u8]) -> Priority {
        let own = effect_lane(Space::Outbox, outbox_key);
        let Some(parsed) = keys::parse(Space::Outbox, outbox_key) else {
            return own;
        };
        let seq = parsed
            .suffix
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes);
        let raised = match self.store.get(&keys::raise(parsed.entity, parsed.key)) {
            Ok(Some(bytes)) => codec::decode::<RaiseRecord>("raise", &bytes).ok(),
            _ => None,
        };
        match (raised, seq) {
            (Some(raise), Some(seq)) if seq <= raise.up_to_seq => own.max(
                Priority::ALL
                    .get(usize::from(raise.lane))
                    .copied()
                    .unwrap_or(own),
            ),
            _ => own,
        }
    }

    /// Moves the entity's effects waiting for an attempt below `lane` up to `lane` (their
    /// stored raise is written by the entity's `prioritise`).
    pub(crate) fn raise(&self, entity: &'static str, key: &str, lane: Priority) {
        self.gate.raise(entity, key, lane);
    }

    fn transition(&self, record: &mut EffectRecord, next: EffectStatus, error: Option<String>) {
        let from = record.info.status;
        debug_assert!(
            from.can_move_to(next),
            "effect status {from:?} -> {next:?} is not an allowed move"
        );
        if !from.can_move_to(next) {
            tracing::error!(target: "keystead", ?from, ?next, "unexpected effect status move");
        }
        record.info.status = next;
        record.info.updated_at_ms = self.shared.clock.now_ms();
        if error.is_some() {
            record.info.last_error = error;
        }
    }

    /// An effect left the outbox (its end is committed): its room in its lane is free.
    fn finished(&self, outbox_key: &[u8], record: &EffectRecord) {
        let lane = effect_lane(Space::Outbox, outbox_key);
        self.shared
            .outbox
            .release_n(lane, 1, record.payload.len() as u64);
    }

    /// Moves a finished effect from the outbox to the history.
    fn finish_ops(&self, outbox_key: &[u8], record: &EffectRecord) -> Result<Vec<Op>, ()> {
        let mut history_key = outbox_key.to_vec();
        history_key[0] = Space::EffectHistory as u8;
        Ok(vec![
            Op::Delete(outbox_key.to_vec()),
            Op::Put(history_key, encode(record)?),
        ])
    }

    /// The inbox entry (and its lane index entry) that delivers an executor's feedback to
    /// the entity, and its encoded size.
    fn feedback_ops(
        &self,
        record: &EffectRecord,
        seq: u64,
        command: Vec<u8>,
    ) -> Result<(Vec<Op>, u64), ()> {
        let key = &record.info.effect_key;
        let inbox = InboxRecord {
            meta: Meta {
                message_id: feedback_id(key),
                correlation_id: record.info.correlation_id.clone(),
                version: None,
                accepted_at_ms: self.shared.clock.now_ms(),
            },
            command,
        };
        let bytes = encode(&inbox)?;
        let size = bytes.len() as u64;
        let inbox_key = keys::inbox_in(&key.entity, &key.key, seq, FEEDBACK_LANE);
        let index_key = self
            .shared
            .lane_index(&key.entity, &key.key, FEEDBACK_LANE, seq);
        Ok((
            vec![
                Op::Put(inbox_key.clone(), bytes),
                Op::Put(index_key, inbox_key),
            ],
            size,
        ))
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<(), ()> {
        self.commit_with_seq(ops, 0).await
    }

    async fn commit_with_seq(&self, ops: Vec<Op>, seq: u64) -> Result<(), ()> {
        match self.store.commit_with_seq(ops, seq).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(target: "keystead", error = %e,
                    "cannot record an effect's progress; it stays in the outbox and runs again (same key) later");
                Err(())
            }
        }
    }

    /// Moves a dead-lettered effect back to the outbox with its attempts reset; true when
    /// there was one. It takes room in its outbox lane like any effect: refused, and left
    /// where it is, when the lane is full.
    pub(crate) async fn requeue(self: &Arc<Self>, key: &EffectKey) -> Result<bool, AdminError> {
        let Some((history_key, mut record)) = find(&self.store, Space::EffectHistory, key)? else {
            return Ok(false);
        };
        if record.info.status != EffectStatus::DeadLettered {
            return Ok(false);
        }
        let lane = effect_lane(Space::EffectHistory, &history_key);
        let bytes = record.payload.len() as u64;
        if let Err(full) = self.shared.outbox.try_reserve_n(lane, 1, bytes) {
            return Err(AdminError::Overloaded {
                entity: self
                    .executors
                    .get(record.info.name.as_str())
                    .map_or("unregistered", |r| r.origin),
                key: key.key.clone(),
                backlog: BacklogKind::Outbox,
                lane,
                pending: full.pending,
                pending_max: full.limits.pending_max(),
            });
        }
        self.transition(&mut record, EffectStatus::Pending, None);
        record.info.attempts = 0;
        let mut outbox_key = history_key.clone();
        outbox_key[0] = Space::Outbox as u8;
        let encoded = codec::encode(&record).map_err(|e| StoreError::Io {
            op: "requeue effect",
            source: std::io::Error::other(e),
        });
        let encoded = match encoded {
            Ok(encoded) => encoded,
            Err(e) => {
                self.shared.outbox.release_n(lane, 1, bytes);
                return Err(e.into());
            }
        };
        let moved = self
            .store
            .commit(vec![Op::Delete(history_key), Op::Put(outbox_key, encoded)])
            .await;
        if let Err(e) = moved {
            self.shared.outbox.release_n(lane, 1, bytes);
            return Err(e.into());
        }
        self.wake(&key.entity, &key.key, record.independent);
        Ok(true)
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ()> {
    codec::encode(value).map_err(|e| {
        tracing::error!(target: "keystead", error = %e, "cannot encode an effect record");
    })
}
