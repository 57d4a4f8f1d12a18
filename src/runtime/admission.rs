//! Shard admission in lanes: every caller waits here for a slot of its entity's shard before
//! anything reaches an actor, and holds the slot until its message is finished.
//!
//! What the gate enforces, all under one short lock per shard (never held across a wait):
//! - **capacity**: at most `capacity` slots held at once, which bounds every in-memory queue
//!   behind it (shard mailbox, actor queues, commit queue);
//! - **reserves**: a lane may take a free slot only while fewer than its limit are held, so a
//!   flood of `Low` leaves room for `Critical` (limits: all slots for `Critical`, less 1/16
//!   for `High`, 1/8 for `Normal`, 1/4 for `Low`, at least one each);
//! - **lanes**: a freed slot goes to the lane [`LanePicker`] chooses: strict priority, with a
//!   lane promoted once it has been passed over `promote_after` times, so none starves;
//! - **per-entity cap**: one entity holds at most `entity_max` slots. Within a lane, entities
//!   take turns (round robin), each entity's callers in arrival order, and an entity at its
//!   cap leaves the turn until one of its slots frees; so a hot key's flood waits behind
//!   itself and not in front of other keys.
//!
//! The invariant that makes this live: an entity with callers waiting in a lane and fewer
//! than `entity_max` slots held is in that lane's turn queue (`ready`). A caller that gave up
//! (its future was dropped) is skipped when its turn comes. The slot travels in the oneshot;
//! if nobody receives it, dropping it frees it again, so no slot can leak.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::core::lanes::{LanePicker, LANES};
use crate::priority::Priority;
use crate::runtime::shared::Shared;
use crate::telemetry::{LaneCounters, Stats};

/// Who holds a slot: entity type and key.
type EntityId = (&'static str, String);

/// Entities being drained on one shard, with the highest lane in which more work came for
/// each meanwhile (see `runtime/feeder.rs`).
pub(crate) type Draining = Arc<Mutex<HashMap<EntityId, Option<Priority>>>>;

/// The settings of one gate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GateConfig {
    pub capacity: usize,
    pub entity_max: usize,
    pub promote_after: u32,
    /// Which counters it keeps.
    pub kind: GateKind,
}

/// What a gate admits: messages to a shard, effect attempts to the effect workers, or
/// entities' effect workers (each entity with unfinished effects runs one while active).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GateKind {
    Shard,
    Effects,
    EffectLanes,
}

impl GateConfig {
    /// The most slots lane `lane` may hold without being promoted.
    pub(crate) fn limit(&self, lane: usize) -> usize {
        let reserve = match lane {
            0 => 0,
            1 => self.capacity / 16,
            2 => self.capacity / 8,
            _ => self.capacity / 4,
        };
        (self.capacity - reserve).max(1)
    }
}

struct Waiter {
    /// When it started waiting, for the wait statistics.
    since: Instant,
    tx: oneshot::Sender<Slot>,
}

/// One entity's slots and callers.
#[derive(Default)]
struct Callers {
    held: usize,
    waiting: [VecDeque<Waiter>; LANES],
    /// In `State::ready[lane]` now.
    queued: [bool; LANES],
}

impl Callers {
    fn is_empty(&self) -> bool {
        self.held == 0 && self.waiting.iter().all(VecDeque::is_empty)
    }
}

struct State {
    closed: bool,
    held: usize,
    entities: HashMap<EntityId, Callers>,
    /// Per lane, the entities whose turn it is, in order.
    ready: [VecDeque<EntityId>; LANES],
    picker: LanePicker,
}

/// One shard's admission.
pub(crate) struct Gate {
    config: GateConfig,
    state: Mutex<State>,
    shared: Arc<Shared>,
}

/// The answer of [`Gate::enter`].
pub(crate) enum Entry {
    Granted(Slot),
    Wait(oneshot::Receiver<Slot>),
    Closed,
}

/// A held slot; dropping it frees the slot and grants it to the next waiter.
pub(crate) struct Slot {
    gate: Arc<Gate>,
    entity: Option<EntityId>,
    lane: usize,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("lane", &self.lane).finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(entity) = self.entity.take() {
            self.gate.release(entity, self.lane);
        }
    }
}

impl Gate {
    pub(crate) fn new(config: GateConfig, shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            config,
            state: Mutex::new(State {
                closed: false,
                held: 0,
                entities: HashMap::new(),
                ready: Default::default(),
                picker: LanePicker::new(config.promote_after),
            }),
            shared,
        })
    }

    fn lane_stats(&self, lane: usize) -> &LaneCounters {
        match self.config.kind {
            GateKind::Shard => &self.shared.stats.lanes[lane],
            GateKind::Effects => &self.shared.stats.effect_priorities[lane],
            GateKind::EffectLanes => &self.shared.stats.effect_activations[lane],
        }
    }

    /// Moves entity (`entity`, `key`)'s callers waiting in lanes below `to` into `to`, in
    /// their order (for `prioritise`). Cheap: only that entity's callers are touched.
    pub(crate) fn raise(self: &Arc<Self>, entity: &'static str, key: &str, to: Priority) {
        let to = to.index();
        {
            let mut state = self.state.lock();
            let entity_max = self.config.entity_max;
            let id = (entity, key.to_string());
            let state = &mut *state;
            let Some(callers) = state.entities.get_mut(&id) else {
                return;
            };
            let mut moved = 0;
            for lane in (to + 1)..LANES {
                let waiters: Vec<Waiter> = callers.waiting[lane].drain(..).collect();
                for _ in &waiters {
                    Stats::drop_one(&self.lane_stats(lane).waiting);
                    Stats::bump(&self.lane_stats(to).waiting);
                }
                moved += waiters.len();
                callers.waiting[to].extend(waiters);
            }
            if moved == 0 {
                return;
            }
            // (Its turn in the lanes it left is skipped: nobody is left there.)
            if callers.held < entity_max && !callers.queued[to] {
                callers.queued[to] = true;
                state.ready[to].push_back(id);
            }
        }
        self.dispatch();
    }

    /// Waits for a slot for entity (`entity`, `key`) in lane `priority`. `None` once the gate
    /// is closed.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        entity: &'static str,
        key: &str,
        priority: Priority,
    ) -> Option<Slot> {
        match self.enter(entity, key, priority) {
            Entry::Granted(slot) => Some(slot),
            Entry::Wait(rx) => rx.await.ok(),
            Entry::Closed => None,
        }
    }

    /// Takes a free slot at once if one is free for `priority` and nobody is queued ahead,
    /// without queueing otherwise (so a caller that will not wait leaves nothing behind).
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        entity: &'static str,
        key: &str,
        priority: Priority,
    ) -> Option<Slot> {
        match self.admit(entity, key, priority, false) {
            Entry::Granted(slot) => Some(slot),
            Entry::Wait(_) | Entry::Closed => None,
        }
    }

    /// Takes a free slot at once, or joins the entity's callers in its lane and returns
    /// where the slot will arrive.
    pub(crate) fn enter(
        self: &Arc<Self>,
        entity: &'static str,
        key: &str,
        priority: Priority,
    ) -> Entry {
        self.admit(entity, key, priority, true)
    }

    fn admit(
        self: &Arc<Self>,
        entity: &'static str,
        key: &str,
        priority: Priority,
        queue: bool,
    ) -> Entry {
        let lane = priority.index();
        let id = (entity, key.to_string());
        let rx = {
            let mut state = self.state.lock();
            if state.closed {
                return Entry::Closed;
            }
            let capacity_free = state.held < self.config.limit(lane);
            // Nobody of this lane or a higher one is queued: no queue to respect. (No lower
            // lane is starving: while a slot is free, dispatch has admitted every starving
            // caller; this grant may make one starve, so dispatch runs again below.)
            let nobody_ahead = state.ready[..=lane].iter().all(VecDeque::is_empty);
            let callers = state.entities.entry(id.clone()).or_default();
            let entity_free =
                callers.held < self.config.entity_max && callers.waiting[lane].is_empty();
            if nobody_ahead && entity_free && capacity_free {
                // The common case: a free slot, taken at once.
                let waiting = state.lanes_waiting();
                let slot = self.grant(&mut state, id, lane, waiting);
                Stats::bump(&self.lane_stats(lane).admitted);
                drop(state);
                if waiting.contains(&true) {
                    self.dispatch();
                }
                return Entry::Granted(slot);
            }
            if !queue {
                if callers.is_empty() {
                    state.entities.remove(&id);
                }
                let (_, rx) = oneshot::channel();
                return Entry::Wait(rx);
            }
            let (tx, rx) = oneshot::channel();
            callers.waiting[lane].push_back(Waiter {
                since: Instant::now(),
                tx,
            });
            Stats::bump(&self.lane_stats(lane).waiting);
            // Whoever waits on the counters (`Runtime::wait_until`) may wait for this.
            self.shared.stats.notify();
            if callers.held >= self.config.entity_max {
                Stats::bump(&self.shared.stats.entity_capped);
            } else if !callers.queued[lane] {
                callers.queued[lane] = true;
                state.ready[lane].push_back(id);
            }
            rx
        };
        self.dispatch();
        Entry::Wait(rx)
    }

    /// Marks a slot held by `id` in `lane` and counts the grant.
    fn grant(
        self: &Arc<Self>,
        state: &mut State,
        id: EntityId,
        lane: usize,
        waiting: [bool; LANES],
    ) -> Slot {
        state.held += 1;
        state.entities.entry(id.clone()).or_default().held += 1;
        state.picker.granted(lane, waiting);
        Stats::bump(&self.lane_stats(lane).in_flight);
        if self.config.kind != GateKind::Shard {
            // An effect attempt starting is news to `wait_until` (a message's admission is
            // followed by its outcome, which notifies anyway).
            self.shared.stats.notify();
        }
        Slot {
            gate: self.clone(),
            entity: Some(id),
            lane,
        }
    }

    fn release(self: &Arc<Self>, id: EntityId, lane: usize) {
        {
            let mut state = self.state.lock();
            state.held -= 1;
            Stats::drop_one(&self.lane_stats(lane).in_flight);
            let entity_max = self.config.entity_max;
            let state = &mut *state;
            if let Some(callers) = state.entities.get_mut(&id) {
                callers.held -= 1;
                // Below its cap again: the entity takes its turns in every lane it waits in.
                if callers.held < entity_max {
                    for l in 0..LANES {
                        if !callers.waiting[l].is_empty() && !callers.queued[l] {
                            callers.queued[l] = true;
                            state.ready[l].push_back(id.clone());
                        }
                    }
                }
                if callers.is_empty() {
                    state.entities.remove(&id);
                }
            }
        }
        self.dispatch();
    }

    /// Grants free slots to waiters, then hands them over outside the lock. A slot whose
    /// waiter gave up is dropped there, which frees it and dispatches again.
    fn dispatch(self: &Arc<Self>) {
        let mut grants = Vec::new();
        {
            let mut state = self.state.lock();
            while !state.closed && state.held < self.config.capacity {
                let waiting = state.lanes_waiting();
                let fits: [bool; LANES] =
                    std::array::from_fn(|i| state.held < self.config.limit(i));
                let Some(lane) = state.picker.pick(waiting, fits) else {
                    break;
                };
                let Some(id) = state.ready[lane].pop_front() else {
                    break;
                };
                let Some(waiter) = self.next_caller(&mut state, &id, lane) else {
                    continue;
                };
                if state.picker.starving(lane) {
                    Stats::bump(&self.lane_stats(lane).promoted);
                }
                let slot = self.grant(&mut state, id, lane, waiting);
                grants.push((waiter, lane, slot));
            }
        }
        for (waiter, lane, slot) in grants {
            let counters = self.lane_stats(lane);
            Stats::drop_one(&counters.waiting);
            Stats::bump(&counters.admitted);
            Stats::bump(&counters.waited);
            let waited_us = waiter.since.elapsed().as_micros() as u64;
            counters.wait_us_max.fetch_max(waited_us, Ordering::Relaxed);
            // A waiter gone since the check: the slot comes back here, is dropped, and its
            // drop frees it and dispatches again.
            let _ = waiter.tx.send(slot);
        }
    }

    /// Takes entity `id`'s oldest live caller in `lane`, whose turn it is, and puts the
    /// entity back at the end of the lane's turns if it has more callers there and room
    /// under its cap. Callers that gave up are dropped on the way.
    fn next_caller(&self, state: &mut State, id: &EntityId, lane: usize) -> Option<Waiter> {
        let entity_max = self.config.entity_max;
        let callers = state.entities.get_mut(id)?;
        callers.queued[lane] = false;
        if callers.held >= entity_max {
            // It reached its cap through another lane since it was queued here; it takes
            // its turns again once one of its slots frees.
            return None;
        }
        let mut next = None;
        while let Some(waiter) = callers.waiting[lane].pop_front() {
            if waiter.tx.is_closed() {
                Stats::drop_one(&self.lane_stats(lane).waiting);
                continue;
            }
            next = Some(waiter);
            break;
        }
        // The grant that follows adds one to `held`.
        let held_after = callers.held + usize::from(next.is_some());
        if !callers.waiting[lane].is_empty() && held_after < entity_max {
            callers.queued[lane] = true;
            state.ready[lane].push_back(id.clone());
        } else if !callers.waiting[lane].is_empty() {
            Stats::bump(&self.shared.stats.entity_capped);
        }
        if next.is_none() && callers.is_empty() {
            state.entities.remove(id);
        }
        next
    }

    /// Refuses every waiter and every later caller.
    pub(crate) fn close(&self) {
        let dropped: Vec<(usize, Waiter)> = {
            let mut state = self.state.lock();
            state.closed = true;
            for ready in &mut state.ready {
                ready.clear();
            }
            state
                .entities
                .values_mut()
                .flat_map(|c| {
                    c.queued = [false; LANES];
                    c.waiting
                        .iter_mut()
                        .enumerate()
                        .flat_map(|(lane, q)| q.drain(..).map(move |w| (lane, w)))
                })
                .collect()
        };
        for (lane, _) in &dropped {
            Stats::drop_one(&self.lane_stats(*lane).waiting);
        }
        drop(dropped);
    }
}

impl State {
    fn lanes_waiting(&self) -> [bool; LANES] {
        std::array::from_fn(|i| !self.ready[i].is_empty())
    }
}

/// Admission: a caller holds one ticket from the moment it is admitted until its message is
/// finished (for `tell`, until its inbox entry is written; a lane feeder then holds one for
/// each entity it drains). Tickets bound every in-memory queue: shard mailboxes, actor queues
/// and the commit queue.
pub(crate) struct Ticket {
    slot: Option<Slot>,
    shared: Arc<Shared>,
    /// Run when the ticket is released, before `in_flight` falls (the lane feeders use it
    /// to wake an entity again once its drain ends).
    on_release: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    pub(crate) fn new(slot: Slot, shared: Arc<Shared>) -> Self {
        shared.stats.work_up(&shared.stats.in_flight);
        Self {
            slot: Some(slot),
            shared,
            on_release: None,
        }
    }

    /// Runs `hook` when the ticket is released.
    pub(crate) fn on_release(mut self, hook: Box<dyn FnOnce() + Send>) -> Self {
        self.on_release = Some(hook);
        self
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Free the slot first, so that whoever sees `in_flight` fall sees the lanes free too.
        drop(self.slot.take());
        if let Some(hook) = self.on_release.take() {
            hook();
        }
        self.shared.stats.work_down(&self.shared.stats.in_flight);
        self.shared.stats.notify();
    }
}

/// Registers entity `id` as being drained with `slot`, and returns the ticket its drain
/// holds: when the ticket is released (the drain ended, or it was never sent), the entity
/// leaves the draining set and is woken again in the highest lane where more came meanwhile.
/// `None`, giving the slot back, if the entity is being drained already (then, with
/// `more_in`, that lane is noted as having more for it).
pub(crate) fn claim_drain(
    shared: &Arc<Shared>,
    draining: &Draining,
    shard: usize,
    id: (&'static str, String),
    slot: Slot,
    more_in: Option<Priority>,
) -> Option<Ticket> {
    {
        let mut map = draining.lock();
        match map.get_mut(&id) {
            Some(more) => {
                *more = (*more).max(more_in);
                return None;
            }
            None => {
                map.insert(id.clone(), None);
            }
        }
    }
    let (draining, hook_shared) = (draining.clone(), shared.clone());
    let on_release = Box::new(move || {
        let more = draining.lock().remove(&id).flatten();
        if let Some(lane) = more {
            hook_shared.feeds[shard][lane.index()].rewake(id, &hook_shared.stats);
        }
    });
    Some(Ticket::new(slot, shared.clone()).on_release(on_release))
}

#[cfg(test)]
mod tests {
    //! The gate against its rules, without actors: capacity, reserves, the per-entity cap,
    //! the starvation bound, and a model check over random operation sequences. Grants are
    //! made synchronously when a slot frees, so each test reads them with `try_recv`.

    use super::*;
    use crate::clock::SystemClock;
    use crate::retry::RetryPolicy;
    use crate::runtime::shared::Config;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    fn gate(capacity: usize, entity_max: usize, promote_after: u32) -> Arc<Gate> {
        let shared = Arc::new(Shared {
            config: Config {
                retry: RetryPolicy::default(),
                dedup_retention: Duration::from_secs(1),
                dedup_purge_every: Duration::from_secs(1),
                passivate_after: Duration::from_secs(1),
                message_size_max: 1,
                in_flight_max: capacity,
                shards: 1,
                entity_in_flight_max: entity_max,
                lane_promote_after: promote_after,
                log_payloads: false,
                feeds: Default::default(),
                feed_retention: 0,
            },
            clock: Arc::new(SystemClock),
            stats: Stats::default(),
            seq: AtomicU64::new(1),
            backlog: crate::runtime::backlog::Backlog::new(Default::default()),
            outbox: crate::runtime::backlog::Backlog::new(Default::default()),
            feeds: vec![Default::default()],
            inbox_generations: vec![AtomicU64::new(0)],
            runtime: Default::default(),
        });
        Gate::new(
            GateConfig {
                capacity,
                entity_max,
                promote_after,
                kind: GateKind::Shard,
            },
            shared,
        )
    }

    /// A slot given at once: on the fast path, or by the dispatch the arrival ran.
    fn granted(entry: Entry) -> Slot {
        match entry {
            Entry::Granted(slot) => slot,
            Entry::Wait(mut rx) => rx.try_recv().expect("expected a slot at once"),
            Entry::Closed => panic!("expected a slot, the gate is closed"),
        }
    }

    fn waiting(entry: Entry) -> oneshot::Receiver<Slot> {
        match entry {
            Entry::Wait(rx) => rx,
            _ => panic!("expected to wait"),
        }
    }

    #[test]
    fn a_flood_of_low_leaves_the_reserve_to_critical() {
        let gate = gate(16, 16, 1000);
        let lows: Vec<Slot> = (0..12)
            .map(|i| granted(gate.enter("e", &format!("low-{i}"), Priority::Low)))
            .collect();
        let mut low_waits = waiting(gate.enter("e", "low-12", Priority::Low));
        // The four slots Low may not take are there for the lanes above.
        let normals: Vec<Slot> = (0..2)
            .map(|i| granted(gate.enter("e", &format!("n-{i}"), Priority::Normal)))
            .collect();
        let high = granted(gate.enter("e", "h", Priority::High));
        let critical = granted(gate.enter("e", "c", Priority::Critical));
        assert!(matches!(
            gate.enter("e", "c2", Priority::Critical),
            Entry::Wait(_)
        ));
        assert!(
            low_waits.try_recv().is_err(),
            "low stays out of the reserve"
        );
        drop((normals, high, critical));
        assert!(low_waits.try_recv().is_err(), "the c2 waiter came first");
        drop(lows);
        assert!(
            low_waits.try_recv().is_ok(),
            "low gets in once the lanes are free"
        );
    }

    #[test]
    fn a_low_waiter_is_admitted_within_the_bound_under_a_critical_flood() {
        let bound = 5;
        let gate = gate(1, 1, bound);
        let mut held = granted(gate.enter("e", "c-0", Priority::Critical));
        let mut criticals: VecDeque<oneshot::Receiver<Slot>> = (1..=50)
            .map(|i| waiting(gate.enter("e", &format!("c-{i}"), Priority::Critical)))
            .collect();
        let mut low = waiting(gate.enter("e", "low", Priority::Low));
        let mut grants = 0;
        let mut next = 51;
        loop {
            drop(held);
            grants += 1;
            if let Ok(slot) = low.try_recv() {
                assert!(
                    grants <= bound as usize + 3,
                    "low admitted after {grants} grants, bound {}",
                    bound + 3
                );
                assert_eq!(
                    gate.shared.stats.lanes[Priority::Low.index()]
                        .promoted
                        .load(Ordering::Relaxed),
                    1
                );
                drop(slot);
                return;
            }
            held = criticals
                .pop_front()
                .expect("critical flood")
                .try_recv()
                .expect("the oldest critical waiter got the slot");
            // The flood never stops: another critical joins for each one admitted.
            criticals.push_back(waiting(gate.enter(
                "e",
                &format!("c-{next}"),
                Priority::Critical,
            )));
            next += 1;
            assert!(grants < 100, "low never admitted");
        }
    }

    #[test]
    fn a_hot_entity_waits_behind_itself() {
        let gate = gate(8, 2, 16);
        let hot: Vec<Slot> = (0..2)
            .map(|_| granted(gate.enter("e", "hot", Priority::Normal)))
            .collect();
        let mut hot_waits: Vec<_> = (0..20)
            .map(|_| waiting(gate.enter("e", "hot", Priority::Normal)))
            .collect();
        // Another key on the same shard gets in at once: the hot key holds only its cap.
        let other = granted(gate.enter("e", "cold", Priority::Normal));
        drop(other);
        drop(hot);
        let admitted: Vec<Slot> = hot_waits
            .iter_mut()
            .filter_map(|rx| rx.try_recv().ok())
            .collect();
        assert_eq!(
            admitted.len(),
            2,
            "each freed hot slot admits the next hot caller"
        );
        assert!(gate.shared.stats.entity_capped.load(Ordering::Relaxed) >= 20);
    }

    #[test]
    fn a_caller_that_gave_up_does_not_keep_a_slot() {
        let gate = gate(1, 1, 16);
        let held = granted(gate.enter("e", "a", Priority::Normal));
        let gone = waiting(gate.enter("e", "b", Priority::Normal));
        let mut next = waiting(gate.enter("e", "c", Priority::Normal));
        drop(gone);
        drop(held);
        assert!(
            next.try_recv().is_ok(),
            "the slot skipped the caller that left"
        );
        // And a slot granted to a receiver dropped after the grant comes back too.
        let gate2 = self::gate(1, 1, 16);
        let held = granted(gate2.enter("e", "a", Priority::Normal));
        let rx = waiting(gate2.enter("e", "b", Priority::Normal));
        drop(held); // granted into `rx`'s channel
        drop(rx); // never received: dropping the channel drops the slot
        let _again = granted(gate2.enter("e", "c", Priority::Normal));
    }

    #[test]
    fn close_refuses_waiters_and_callers() {
        let gate = gate(1, 1, 16);
        let _held = granted(gate.enter("e", "a", Priority::Normal));
        let mut rx = waiting(gate.enter("e", "b", Priority::Normal));
        gate.close();
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            gate.enter("e", "c", Priority::Critical),
            Entry::Closed
        ));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Enter { key: u8, lane: usize },
        Release(usize),
        GiveUp(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u8..6, 0usize..LANES).prop_map(|(key, lane)| Step::Enter { key, lane }),
            2 => any::<usize>().prop_map(Step::Release),
            1 => any::<usize>().prop_map(Step::GiveUp),
        ]
    }

    /// Runs `steps` against a gate and checks its rules after each.
    fn run_model(
        capacity: usize,
        entity_max: usize,
        bound: u32,
        steps: Vec<Step>,
    ) -> Result<(), TestCaseError> {
        let gate = gate(capacity, entity_max, bound);
        let mut held: Vec<(u8, Slot)> = Vec::new();
        let mut waiters: Vec<(u8, usize, oneshot::Receiver<Slot>)> = Vec::new();
        for step in steps {
            match step {
                Step::Enter { key, lane } => {
                    match gate.enter("e", &key.to_string(), Priority::ALL[lane]) {
                        Entry::Granted(slot) => {
                            prop_assert!(
                                held.len() < gate.config.limit(lane),
                                "the fast path keeps the reserve"
                            );
                            held.push((key, slot))
                        }
                        Entry::Wait(rx) => waiters.push((key, lane, rx)),
                        Entry::Closed => prop_assert!(false, "never closed here"),
                    }
                }
                Step::Release(i) if !held.is_empty() => {
                    let i = i % held.len();
                    drop(held.swap_remove(i));
                }
                Step::GiveUp(i) if !waiters.is_empty() => {
                    let i = i % waiters.len();
                    drop(waiters.swap_remove(i));
                }
                _ => {}
            }
            // Collect every grant made by this step.
            let mut still = Vec::new();
            for (key, lane, mut rx) in waiters.drain(..) {
                match rx.try_recv() {
                    Ok(slot) => held.push((key, slot)),
                    Err(_) => still.push((key, lane, rx)),
                }
            }
            waiters = still;
            prop_assert!(
                held.len() <= capacity,
                "{} slots held, capacity {}",
                held.len(),
                capacity
            );
            let state = gate.state.lock();
            prop_assert_eq!(
                state.held,
                held.len(),
                "the gate counts exactly the slots held"
            );
            for key in 0u8..6 {
                let n = held.iter().filter(|(k, _)| *k == key).count();
                prop_assert!(
                    n <= entity_max,
                    "key {} holds {} slots, cap {}",
                    key,
                    n,
                    entity_max
                );
            }
            // Liveness: a waiter whose entity is under its cap and whose lane fits
            // would have been granted.
            for (key, lane, _) in &waiters {
                let n = held.iter().filter(|(k, _)| k == key).count();
                let fits = held.len() < gate.config.limit(*lane)
                    || (held.len() < capacity && state.picker.starving(*lane));
                prop_assert!(
                    !(n < entity_max && fits),
                    "key {} lane {} waits with {} of {} held and room",
                    key,
                    lane,
                    n,
                    held.len()
                );
            }
        }
        drop(waiters);
        drop(held);
        prop_assert_eq!(gate.state.lock().held, 0, "every slot came back");
        Ok(())
    }

    proptest! {
        /// Any sequence of arrivals, releases and callers giving up: capacity and the
        /// per-entity cap are never exceeded, no slot leaks, and no caller is left waiting
        /// while a slot it may take is free.
        #[test]
        fn the_gate_keeps_its_rules(
            capacity in 1usize..10,
            entity_share in 1usize..10,
            bound in 1u32..6,
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            run_model(capacity, entity_share.min(capacity), bound, steps)?;
        }
    }
}
