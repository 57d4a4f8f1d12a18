//! The effect workers, on a tokio runtime of their own: at most `effect_lanes_max` at once
//! (an entity's lane, or one independent effect), taken in lanes; the effect feeders that
//! find the effects waiting on disk (the outbox lane index) for the entities that had no
//! worker; the claims that let a message's effects skip the index; and each effect's
//! attempts (under a bound on attempts running at once, in lanes), status moves and
//! feedback.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::core::codec;
use crate::core::effect::effect_lane;
use crate::core::effect::{history_key_of, outbox_index_of, outbox_position_of};
use crate::core::hash::{fnv1a, splitmix64};
use crate::core::keys::{self, Space};
use crate::core::lanes::LANES;
use crate::core::records::RaiseRecord;
use crate::core::records::{InboxRecord, Meta};
use crate::error::{AdminError, StoreError};
use crate::priority::{BacklogKind, Priority};
use crate::retry::RetryPolicy;
use crate::runtime::admission::{Gate, GateConfig, GateKind, Slot};
use crate::runtime::backlog::LaneFeed;
use crate::runtime::shared::Shared;
use crate::store::{Op, Store};
use crate::telemetry::Stats;

use super::coalesce::Coalescer;
use super::executor::Registered;
use super::limits::{Parked, Ticket, TypeGate};
use super::query::find;
use crate::core::effect::{
    feedback_id, EffectContext, EffectError, EffectKey, EffectRecord, EffectStatus,
};

/// The effect workers: a tokio runtime of their own, a bounded number of entity lanes fed
/// in lane order, and a bound on effect attempts running at once.
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
    /// At most `effect_lanes_max` entities' lanes and independent effects at once, each
    /// holding a slot, admitted in lanes (so memory does not grow with the number of
    /// entities that have effects pending).
    lane_gate: Arc<Gate>,
    /// Per lane, the signals to the effect feeder that reads that lane of the outbox index.
    feeds: [LaneFeed; LANES],
    /// Active lanes, by entity.
    lanes: Mutex<HashMap<(String, String), LaneState>>,
    /// Independent effects being performed (or parked), by outbox key.
    independent: Mutex<HashSet<Vec<u8>>>,
    /// The gates of effect types with limits, by name.
    type_gates: HashMap<&'static str, Arc<TypeGate>>,
    /// Which coalescing effects are being attempted or superseded, per entity.
    coalescer: Coalescer,
}

impl fmt::Debug for Effects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Effects")
            .field("executors", &self.executors.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// One entity's active lane.
#[derive(Debug, Default)]
struct LaneState {
    /// More work arrived while the lane was scanning: it scans again before it ends.
    more: bool,
    /// Messages whose effects this lane will read, committing now: it does not end before
    /// they have (their effects have no outbox lane index entry to be found by).
    pins: u32,
    /// Woken when a pin is taken off.
    unpinned: Arc<Notify>,
    /// Parked behind an effect type's gate: no worker runs; the type's waker starts one.
    parked: bool,
}

/// A message's claim on its entity's effect worker, taken before its commit, so that the
/// message's effects need no outbox lane index entry: either its running lane, pinned
/// (it does not end until the claim is dropped, and then scans again), or a free worker
/// slot, with which a lane starts when the claim is dropped (after the commit).
pub(crate) struct Pin {
    effects: Arc<Effects>,
    id: (String, String),
    slot: Option<Slot>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let id = std::mem::take(&mut self.id);
        if let Some(slot) = self.slot.take() {
            self.effects.start_lane(id, slot);
            return;
        }
        let unpinned = self.effects.lanes.lock().get_mut(&id).map(|state| {
            state.pins = state.pins.saturating_sub(1);
            state.more = true;
            state.unpinned.clone()
        });
        if let Some(unpinned) = unpinned {
            unpinned.notify_one();
        }
    }
}

/// How one effect's attempts ended for now.
enum Performed {
    /// Done, failed or dead-lettered.
    Ended,
    /// It waits for a later wake (no executor, a store error).
    Wait,
    /// Its type holds it back: park its work behind that gate, in that lane.
    Park(Arc<TypeGate>, Priority),
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
        lanes_max: usize,
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
        let lane_gate = Gate::new(
            GateConfig {
                capacity: lanes_max,
                entity_max: lanes_max,
                promote_after: shared.config.lane_promote_after,
                kind: GateKind::EffectLanes,
            },
            shared.clone(),
        );
        let type_gates: HashMap<&'static str, Arc<TypeGate>> = executors
            .iter()
            .filter(|(_, r)| r.limits.gated())
            .map(|(name, r)| (*name, TypeGate::new(name, &r.limits, shared.clone())))
            .collect();
        let effects = Arc::new(Self {
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
            executors,
            store,
            shared,
            retry,
            gate,
            lane_gate,
            feeds: Default::default(),
            lanes: Mutex::new(HashMap::new()),
            independent: Mutex::new(HashSet::new()),
            type_gates,
            coalescer: Coalescer::default(),
        });
        for lane in Priority::ALL {
            effects.handle.spawn(effects.clone().feed(lane));
        }
        for gate in effects.type_gates.values() {
            let this = effects.clone();
            let resume = move |parked, lane, ticket| this.clone().resume(parked, lane, ticket);
            effects.handle.spawn(gate.clone().serve(resume));
        }
        Ok(effects)
    }

    pub(crate) fn coalescer(&self) -> &Coalescer {
        &self.coalescer
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Why recorded effect `e` cannot be committed (no executor for it, a payload that
    /// did not encode), if it cannot: the message or transaction that recorded it is then
    /// dead-lettered.
    pub(crate) fn refuses(&self, e: &crate::core::effect::Recorded) -> Option<String> {
        if !self.accepts(e.name, e.origin) {
            return Some(format!(
                "no executor for effect {}; register one with RuntimeBuilder::executor",
                e.name
            ));
        }
        e.payload
            .as_ref()
            .err()
            .map(|reason| format!("effect {} does not encode: {reason}", e.name))
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

    /// Makes sure a lane runs for entity (`entity`, `key`), whose message in lane `lane`
    /// just committed effects with outbox sequence `seq`; with `independent`, also starts its
    /// independent effects at once (they must not wait behind an ordered effect that is
    /// retrying). Pass `independent` only when there may be some: it costs an outbox scan.
    /// Never waits: when `effect_lanes_max` workers already run, the lane's effect feeder is
    /// told instead, and finds the effects in the outbox lane index once a worker is free.
    pub(crate) fn wake(
        self: &Arc<Self>,
        entity: &'static str,
        key: &str,
        lane: Priority,
        seq: u64,
        independent: bool,
    ) {
        if independent {
            self.start_independent(entity, key);
        }
        let id = (entity.to_string(), key.to_string());
        if let Some(state) = self.lanes.lock().get_mut(&id) {
            state.more = true;
            return;
        }
        match self.lane_gate.try_acquire(entity, key, lane) {
            Some(slot) => self.start_lane(id, slot),
            None => self.feeds[lane.index()].accepted(seq, &self.shared.stats),
        }
    }

    /// A claim, before its commit, on the effect worker of entity (`entity`, `key`) for the
    /// ordered effects a message in lane `lane` records: its running lane, pinned, or a new
    /// lane if a worker is free. `None` when every worker the lane may take is busy: then
    /// the effects need their outbox lane index entries, and a `wake` after the commit.
    pub(crate) fn claim(
        self: &Arc<Self>,
        entity: &'static str,
        key: &str,
        lane: Priority,
    ) -> Option<Pin> {
        let id = (entity.to_string(), key.to_string());
        if let Some(state) = self.lanes.lock().get_mut(&id) {
            state.pins += 1;
            return Some(Pin {
                effects: self.clone(),
                id,
                slot: None,
            });
        }
        let slot = self.lane_gate.try_acquire(entity, key, lane)?;
        Some(Pin {
            effects: self.clone(),
            id,
            slot: Some(slot),
        })
    }

    /// Starts the lane of entity `id` with its worker slot, unless one runs already (then
    /// it is told that more came, and the slot goes back).
    fn start_lane(self: &Arc<Self>, id: (String, String), slot: Slot) {
        let unpinned = Arc::new(Notify::new());
        {
            let mut lanes = self.lanes.lock();
            if let Some(state) = lanes.get_mut(&id) {
                state.more = true;
                return;
            }
            let state = LaneState {
                more: false,
                pins: 0,
                unpinned: unpinned.clone(),
                parked: false,
            };
            lanes.insert(id.clone(), state);
        }
        self.spawn_lane(id, slot, unpinned, None);
    }

    fn spawn_lane(
        self: &Arc<Self>,
        id: (String, String),
        slot: Slot,
        unpinned: Arc<Notify>,
        ticket: Option<Ticket>,
    ) {
        self.shared.stats.work_up(&self.shared.stats.effect_lanes);
        let this = self.clone();
        self.handle
            .spawn(async move { this.lane(id, slot, unpinned, ticket).await });
    }

    /// Gives work parked behind an effect type a worker again, with the admission its
    /// type's waker took for it. False once the workers are closing.
    async fn resume(self: Arc<Self>, parked: Parked, lane: Priority, ticket: Ticket) -> bool {
        let id = parked.entity().clone();
        let Some(origin) = self.origin(&id.0) else {
            return true;
        };
        let Some(slot) = self.lane_gate.acquire(origin, &id.1, lane).await else {
            return false;
        };
        match parked {
            Parked::Lane(id) => {
                let unpinned = {
                    let mut lanes = self.lanes.lock();
                    let state = lanes.entry(id.clone()).or_default();
                    state.parked = false;
                    state.unpinned.clone()
                };
                self.spawn_lane(id, slot, unpinned, Some(ticket));
            }
            Parked::Independent(outbox_key, _) => {
                let record = match self.store.get(&outbox_key) {
                    Ok(Some(bytes)) => codec::decode::<EffectRecord>("effect record", &bytes).ok(),
                    _ => None,
                };
                match record {
                    Some(record) if !record.info.status.finished() => {
                        self.spawn_independent(outbox_key, record, slot, Some(ticket));
                    }
                    // Gone (requeue races aside, nothing else ends a parked effect): it
                    // leaves the set of independent effects at work.
                    _ => {
                        self.independent.lock().remove(&outbox_key);
                    }
                }
            }
        }
        true
    }

    async fn lane(
        self: Arc<Self>,
        id: (String, String),
        slot: Slot,
        unpinned: Arc<Notify>,
        mut ticket: Option<Ticket>,
    ) {
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
                match self.clone().perform(&outbox_key, record, &mut ticket).await {
                    Performed::Ended => progressed = true,
                    Performed::Wait => break,
                    Performed::Park(gate, lane) => {
                        // Marked parked before it is queued, so the waker finds it parked.
                        if let Some(state) = self.lanes.lock().get_mut(&id) {
                            state.parked = true;
                            state.more = false;
                        }
                        gate.park(Parked::Lane(id), lane);
                        drop(slot);
                        self.shared.stats.work_down(&self.shared.stats.effect_lanes);
                        self.shared.stats.notify();
                        return;
                    }
                }
            }
            drop(ticket.take());
            if !progressed {
                {
                    let mut lanes = self.lanes.lock();
                    match lanes.get_mut(&id) {
                        Some(state) if state.more => {
                            state.more = false;
                            continue;
                        }
                        Some(state) if state.pins > 0 => {}
                        _ => {
                            lanes.remove(&id);
                            break;
                        }
                    }
                }
                // A message pinned this lane and is committing effects it will read (an
                // unpin since the check above left a permit: `notify_one`).
                unpinned.notified().await;
            }
        }
        self.lanes.lock().remove(&id);
        drop(slot);
        self.shared.stats.work_down(&self.shared.stats.effect_lanes);
        self.shared.stats.notify();
    }

    /// Starts every unfinished independent effect of one entity that is not running yet and
    /// finds a worker slot at once; the others are left to their lane's effect feeder.
    fn start_independent(self: &Arc<Self>, entity: &'static str, key: &str) {
        let prefix = keys::entity_prefix(Space::Outbox, entity, key);
        let batch = match self.pending(&prefix, true) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(target: "keystead", error = %e, "cannot read the outbox");
                return;
            }
        };
        for (outbox_key, record) in batch {
            let lane = effect_lane(Space::Outbox, &outbox_key);
            let Some(slot) = self.lane_gate.try_acquire(entity, key, lane) else {
                let seq = outbox_position_of(&outbox_key).map_or(0, |(seq, _)| seq);
                self.feeds[lane.index()].accepted(seq, &self.shared.stats);
                return;
            };
            self.start_one_independent(outbox_key, record, slot);
        }
    }

    /// The limits counters of every effect type with limits, in name order.
    pub(crate) fn type_stats(&self) -> Vec<crate::telemetry::EffectTypeStats> {
        let mut out: Vec<_> = self.type_gates.values().map(|g| g.stats()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Runs one independent effect with its worker slot, unless it runs already.
    fn start_one_independent(
        self: &Arc<Self>,
        outbox_key: Vec<u8>,
        record: EffectRecord,
        slot: Slot,
    ) {
        if !self.independent.lock().insert(outbox_key.clone()) {
            return;
        }
        self.spawn_independent(outbox_key, record, slot, None);
    }

    /// Runs one independent effect (already in the set of those at work) with its worker
    /// slot; parked behind its type, it stays in that set and gives the slot back.
    fn spawn_independent(
        self: &Arc<Self>,
        outbox_key: Vec<u8>,
        record: EffectRecord,
        slot: Slot,
        mut ticket: Option<Ticket>,
    ) {
        let this = self.clone();
        self.shared.stats.work_up(&self.shared.stats.effect_lanes);
        self.handle.spawn(async move {
            let id = (
                record.info.effect_key.entity.clone(),
                record.info.effect_key.key.clone(),
            );
            let performed = this.clone().perform(&outbox_key, record, &mut ticket).await;
            match performed {
                Performed::Park(gate, lane) => gate.park(Parked::Independent(outbox_key, id), lane),
                Performed::Ended | Performed::Wait => {
                    this.independent.lock().remove(&outbox_key);
                }
            }
            drop(slot);
            this.shared.stats.work_down(&this.shared.stats.effect_lanes);
            this.shared.stats.notify();
        });
    }

    /// The effect feeder of lane `lane`: reads that lane of the outbox lane index in order
    /// and gives each entity found (or independent effect) a worker once one is free in the
    /// lane, so however many entities have effects pending, at most `effect_lanes_max`
    /// workers exist and the rest wait on disk. At open it reads its whole lane once: that
    /// is how the outbox left by a crash is resumed.
    async fn feed(self: Arc<Self>, lane: Priority) {
        let prefix = keys::outbox_index_prefix(lane);
        let feed = &self.feeds[lane.index()];
        let mut next = prefix.clone();
        loop {
            let pass = feed.begin();
            if let Some(seq) = pass.rewind {
                let rewind = keys::outbox_index(lane, seq, 0);
                if rewind < next {
                    next = rewind;
                }
            }
            let batch: Result<Vec<_>, StoreError> = self
                .store
                .scan_from(&prefix, &next)
                .and_then(|scan| scan.take(SCAN_MAX).collect());
            let batch = batch.unwrap_or_else(|e| {
                tracing::warn!(target: "keystead", lane = %lane, error = %e,
                    "cannot read the outbox lane index; its effects wait for the next signal or open");
                Vec::new()
            });
            let found = !batch.is_empty();
            for (index_key, outbox_key) in batch {
                next = index_key;
                next.push(0);
                if !self.activate(lane, &outbox_key).await {
                    return;
                }
            }
            if !found {
                feed.caught_up(pass.generation, &self.shared.stats);
                feed.changed().await;
            }
        }
    }

    /// Gives the effect under `outbox_key` a worker in lane `lane`: its entity's lane, or
    /// its own if it is independent; nothing when one runs already (the running lane reads
    /// its entity's whole outbox before it ends). False once the workers are closing.
    async fn activate(self: &Arc<Self>, lane: Priority, outbox_key: &[u8]) -> bool {
        let Some(parsed) = keys::parse(Space::Outbox, outbox_key) else {
            return true;
        };
        let Some(origin) = self.origin(parsed.entity) else {
            tracing::error!(target: "keystead", entity = %parsed.entity,
                "effects of an entity type with no registered executor wait in the outbox; register them with RuntimeBuilder::executor");
            return true;
        };
        let record = match self.store.get(outbox_key) {
            Ok(Some(bytes)) => match codec::decode::<EffectRecord>("effect record", &bytes) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(target: "keystead", error = %e, "undecodable outbox entry skipped; it stays in the outbox");
                    return true;
                }
            },
            // Finished since it was read (or an entry `prioritise` moved meanwhile).
            Ok(None) => return true,
            Err(e) => {
                tracing::warn!(target: "keystead", error = %e, "cannot read the outbox");
                return true;
            }
        };
        if record.independent {
            if self.independent.lock().contains(outbox_key) {
                return true;
            }
            let Some(slot) = self.lane_gate.acquire(origin, parsed.key, lane).await else {
                return false;
            };
            self.start_one_independent(outbox_key.to_vec(), record, slot);
        } else {
            let id = (parsed.entity.to_string(), parsed.key.to_string());
            if let Some(state) = self.lanes.lock().get_mut(&id) {
                state.more = true;
                return true;
            }
            let Some(slot) = self.lane_gate.acquire(origin, parsed.key, lane).await else {
                return false;
            };
            self.start_lane(id, slot);
        }
        true
    }

    /// The registered name of entity type `name`, if an executor of its effects is
    /// registered.
    fn origin(&self, name: &str) -> Option<&'static str> {
        self.executors
            .values()
            .map(|r| r.origin)
            .find(|&origin| origin == name)
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

    /// Performs one effect through its attempts, with `ticket` (an admission its type's
    /// waker took) for the first if it is of that type.
    async fn perform(
        self: Arc<Self>,
        outbox_key: &[u8],
        record: EffectRecord,
        ticket: &mut Option<Ticket>,
    ) -> Performed {
        match self.attempts(outbox_key, record, ticket).await {
            Ok(None) => Performed::Ended,
            Ok(Some((gate, lane))) => Performed::Park(gate, lane),
            Err(()) => Performed::Wait,
        }
    }

    /// The attempts of one effect. `Ok(None)` when it reached an end (done, failed,
    /// dead-lettered); `Ok(Some(gate, lane))` when its type holds it back (park it there);
    /// `Err` when it must wait for a later wake (no executor, store error).
    async fn attempts(
        self: &Arc<Self>,
        outbox_key: &[u8],
        mut record: EffectRecord,
        ticket: &mut Option<Ticket>,
    ) -> Result<Option<(Arc<TypeGate>, Priority)>, ()> {
        let Some(executor) = self.executors.get(record.info.name.as_str()) else {
            tracing::error!(target: "keystead", effect = %record.info.name,
                "no executor registered for this effect type; it waits in the outbox. Register it with RuntimeBuilder::executor");
            return Err(());
        };
        let (run, attempt_timeout) = (executor.run.clone(), executor.limits.get_attempt_timeout());
        let span = tracing::info_span!(target: "keystead", "keystead.effect",
            effect = %record.info.name, effect_key = %record.info.effect_key,
            correlation_id = %record.info.correlation_id, attempt = tracing::field::Empty,
            status = tracing::field::Empty);
        let type_gate = self.type_gates.get(record.info.name.as_str());
        // A coalescing effect is marked as being attempted for each attempt (from before
        // its `Running` commit to its end or its `Pending` commit), so no message supersedes
        // it meanwhile; while it waits to retry it is unmarked, and one superseded is skipped.
        let mut current = None;
        loop {
            if executor.coalesce {
                match self.start_coalescing(outbox_key, &record)? {
                    Some(mark) => drop(current.replace(mark)),
                    None => return Ok(None),
                }
            }
            let lane = self.lane_of(outbox_key);
            // The type's admission first, without waiting: held back, the effect parks.
            let mut admitted = match type_gate {
                None => None,
                Some(gate) => match ticket.take() {
                    Some(t) if Arc::ptr_eq(t.gate(), gate) => Some(t),
                    other => {
                        drop(other);
                        match gate.try_admit(lane) {
                            Some(t) => Some(t),
                            None => return Ok(Some((gate.clone(), lane))),
                        }
                    }
                },
            };
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
                runtime: self.shared.runtime.get().cloned(),
            };
            let attempt = run(record.payload.clone(), ctx).instrument(span.clone());
            let result = match attempt_timeout {
                None => attempt.await,
                Some(timeout) => tokio::time::timeout(timeout, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(EffectError::retryable(format!(
                            "the attempt timed out after {timeout:?} (EffectLimits::attempt_timeout)"
                        )))
                    }),
            };
            drop(_permit);
            let failed = matches!(result, Err(EffectError::Retryable(_)));
            let breaker_open = admitted.as_mut().is_some_and(|t| t.ended(failed));
            drop(admitted);
            match result {
                Ok(feedback) => {
                    self.transition(&mut record, EffectStatus::Done, None);
                    span.record("status", "done");
                    let mut ops = self.finish_ops(outbox_key, &record, lane)?;
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
                    return Ok(None);
                }
                Err(EffectError::Permanent(reason)) => {
                    self.transition(&mut record, EffectStatus::Failed, Some(reason.clone()));
                    span.record("status", "failed");
                    self.commit(self.finish_ops(outbox_key, &record, lane)?)
                        .await?;
                    self.finished(outbox_key, &record);
                    Stats::bump(&self.shared.stats.effects_failed);
                    tracing::warn!(target: "keystead", parent: &span, error = %reason, "effect failed permanently");
                    return Ok(None);
                }
                Err(EffectError::Retryable(reason))
                    if !breaker_open && record.info.attempts >= self.retry.get_attempts_max() =>
                {
                    self.transition(
                        &mut record,
                        EffectStatus::DeadLettered,
                        Some(reason.clone()),
                    );
                    span.record("status", "dead_lettered");
                    self.commit(self.finish_ops(outbox_key, &record, lane)?)
                        .await?;
                    self.finished(outbox_key, &record);
                    Stats::bump(&self.shared.stats.effects_dead_lettered);
                    tracing::warn!(target: "keystead", parent: &span, error = %reason, "effect dead-lettered");
                    return Ok(None);
                }
                Err(EffectError::Retryable(reason)) => {
                    if breaker_open {
                        // The provider's failure, not the effect's: not counted.
                        record.info.attempts = record.info.attempts.saturating_sub(1);
                    }
                    self.transition(&mut record, EffectStatus::Pending, Some(reason.clone()));
                    self.commit(vec![Op::Put(outbox_key.to_vec(), encode(&record)?)])
                        .await?;
                    Stats::bump(&self.shared.stats.effect_retries);
                    self.shared.stats.notify();
                    if breaker_open {
                        // No backoff: the next attempt waits for the breaker, parked.
                        drop(current.take());
                        continue;
                    }
                    let seed = splitmix64(fnv1a(record.info.effect_key.to_string().as_bytes()));
                    let delay = self.retry.backoff(record.info.attempts, seed);
                    tracing::debug!(target: "keystead", parent: &span, error = %reason,
                        delay_us = delay.as_micros() as u64, "effect failed; will retry");
                    drop(current.take());
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
            (Some(raise), Some(seq)) if seq <= raise.up_to_seq => {
                own.max(Priority::from_index(raise.lane).unwrap_or(own))
            }
            _ => own,
        }
    }

    /// Moves the entity's effects waiting below `lane` up to `lane`: attempts waiting for a
    /// slot, a feeder waiting to give the entity a worker, and (their index entries moved,
    /// from sequence `from_seq` on) the effects not yet found (their stored raise and index
    /// entries are written by the entity's `prioritise`).
    pub(crate) fn raise(&self, entity: &'static str, key: &str, lane: Priority, from_seq: u64) {
        let id = (entity.to_string(), key.to_string());
        for gate in self.type_gates.values() {
            gate.raise(&id, lane);
        }
        self.gate.raise(entity, key, lane);
        self.lane_gate.raise(entity, key, lane);
        if from_seq != u64::MAX {
            self.feeds[lane.index()].accepted(from_seq, &self.shared.stats);
        }
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

    /// Moves a finished effect from the outbox to the history, and removes its outbox lane
    /// index entry (in its own lane, and in `raised`, the lane its last attempt waited in,
    /// where `prioritise` moved it). An index entry a `prioritise` moved during that last
    /// attempt stays behind, pointing at nothing: the effect feeder skips it, and the next
    /// open removes it (`reconcile`).
    fn finish_ops(
        &self,
        outbox_key: &[u8],
        record: &EffectRecord,
        raised: Priority,
    ) -> Result<Vec<Op>, ()> {
        let own = effect_lane(Space::Outbox, outbox_key);
        let mut ops = vec![
            Op::Delete(outbox_key.to_vec()),
            Op::Put(history_key_of(outbox_key), encode(record)?),
        ];
        let raised = (raised != own).then_some(raised);
        for lane in std::iter::once(own).chain(raised) {
            if let Some(index_key) = outbox_index_of(lane, outbox_key) {
                ops.push(Op::Delete(index_key));
            }
        }
        Ok(ops)
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
        let mut ops = vec![
            Op::Delete(history_key),
            Op::Put(outbox_key.clone(), encoded),
        ];
        if let Some(index_key) = outbox_index_of(lane, &outbox_key) {
            ops.push(Op::Put(index_key, outbox_key.clone()));
        }
        if let Err(e) = self.store.commit(ops).await {
            self.shared.outbox.release_n(lane, 1, bytes);
            return Err(e.into());
        }
        let seq = outbox_position_of(&outbox_key).map_or(0, |(seq, _)| seq);
        match self.origin(&key.entity) {
            Some(origin) => self.wake(origin, &key.key, lane, seq, record.independent),
            None => self.feeds[lane.index()].accepted(seq, &self.shared.stats),
        }
        Ok(true)
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ()> {
    codec::encode(value).map_err(|e| {
        tracing::error!(target: "keystead", error = %e, "cannot encode an effect record");
    })
}
