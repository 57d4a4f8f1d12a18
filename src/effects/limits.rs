//! One effect type's gate: its concurrency limit, rate limits and circuit breaker (the pure
//! rules are `core::limits`), and the entities parked behind it.
//!
//! The rule that keeps an outage from spreading: a worker never waits for a type while it
//! holds an effect worker slot. When the next effect of an entity may not start (the
//! breaker is open, a bucket is empty, the type's concurrency is full), its worker *parks*
//! the entity in the type's queue, in the effect's lane, gives its slot back and ends. The
//! type's waker (one task per gated type) hands parked entities a [`Ticket`] (the admission
//! already taken for them) as the type opens up, highest lane first, and gives each a
//! worker again. So an open breaker holds no worker and spends no attempt, and effects of
//! other types keep every worker. A parked entity costs one queue entry and its lane's
//! bookkeeping (no task); its effects stay in the outbox, where a crash finds them (the
//! next open's feeders).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::core::lanes::LANES;
use crate::core::limits::{take_all, Allow, Breaker, BreakerState, Bucket, Move};
use crate::priority::Priority;
use crate::runtime::shared::Shared;
use crate::telemetry::EffectTypeStats;

use super::executor::EffectLimits;

/// What waits behind a type: an entity's lane of ordered effects, or one independent
/// effect (by outbox key, with its entity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parked {
    Lane((String, String)),
    Independent(Vec<u8>, (String, String)),
}

impl Parked {
    pub(crate) fn entity(&self) -> &(String, String) {
        match self {
            Parked::Lane(id) | Parked::Independent(_, id) => id,
        }
    }
}

struct State {
    running: usize,
    buckets: Vec<Bucket>,
    breaker: Option<Breaker>,
    parked: [VecDeque<Parked>; LANES],
}

#[derive(Debug, Default)]
struct Counters {
    parks: AtomicU64,
    resumed: AtomicU64,
    probes: AtomicU64,
    uncounted: AtomicU64,
    opened: AtomicU64,
    half_opened: AtomicU64,
    closed: AtomicU64,
}

/// One effect type's limits, live.
pub(crate) struct TypeGate {
    pub(crate) name: &'static str,
    concurrency: Option<usize>,
    shared: Arc<Shared>,
    state: Mutex<State>,
    /// Wakes the type's waker: a ticket ended, an entity parked.
    changed: Notify,
    counters: Counters,
}

/// An admission through a type's gate, held for one attempt. Dropped unused (its work went
/// elsewhere), it gives its token and probe back.
pub(crate) struct Ticket {
    gate: Arc<TypeGate>,
    probe: bool,
    ran: bool,
}

impl Ticket {
    pub(crate) fn gate(&self) -> &Arc<TypeGate> {
        &self.gate
    }

    /// The attempt ended, `failed` retryably (a timeout included): the breaker learns it.
    /// Returns true when the breaker is not closed after it, so the failure is the
    /// provider's and is not counted against the effect.
    pub(crate) fn ended(&mut self, failed: bool) -> bool {
        self.ran = true;
        let gate = &self.gate;
        let now = gate.shared.clock.now_ms();
        let mut moves = Vec::new();
        let open = {
            let mut state = gate.state.lock();
            match state.breaker.as_mut() {
                Some(breaker) => {
                    breaker.record(failed, self.probe, now, &mut moves);
                    breaker.state() != BreakerState::Closed
                }
                None => false,
            }
        };
        gate.moved(&moves);
        if failed && open {
            gate.counters.uncounted.fetch_add(1, Ordering::Relaxed);
        }
        open
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut state = self.gate.state.lock();
            state.running = state.running.saturating_sub(1);
            if !self.ran {
                for bucket in &mut state.buckets {
                    bucket.give_back();
                }
                if self.probe {
                    if let Some(breaker) = state.breaker.as_mut() {
                        breaker.probe_unused();
                    }
                }
            }
        }
        self.gate.shared.stats.work_moved();
        self.gate.changed.notify_one();
    }
}

/// What the waker does next.
enum Next {
    Go(Parked, Priority, Ticket),
    Wait(Option<u64>),
}

impl TypeGate {
    pub(crate) fn new(name: &'static str, limits: &EffectLimits, shared: Arc<Shared>) -> Arc<Self> {
        let now = shared.clock.now_ms();
        Arc::new(Self {
            name,
            concurrency: limits.get_concurrency().map(|n| n as usize),
            state: Mutex::new(State {
                running: 0,
                buckets: limits
                    .get_rates()
                    .iter()
                    .map(|r| Bucket::new(*r, now))
                    .collect(),
                breaker: limits.get_breaker().copied().map(Breaker::new),
                parked: Default::default(),
            }),
            shared,
            changed: Notify::new(),
            counters: Counters::default(),
        })
    }

    /// An admission for an attempt in lane `lane` now, unless the type is held back or
    /// entities parked in that lane or a higher one go first (they are served by the
    /// waker, in order).
    pub(crate) fn try_admit(self: &Arc<Self>, lane: Priority) -> Option<Ticket> {
        let now = self.shared.clock.now_ms();
        let mut moves = Vec::new();
        let admitted = {
            let mut state = self.state.lock();
            if state.parked[..=lane.index()].iter().any(|q| !q.is_empty()) {
                return None;
            }
            self.admit(&mut state, now, &mut moves)
        };
        self.moved(&moves);
        if admitted.is_ok() {
            self.shared.stats.work_moved();
        }
        admitted.ok().map(|probe| self.ticket(probe))
    }

    fn ticket(self: &Arc<Self>, probe: bool) -> Ticket {
        if probe {
            self.counters.probes.fetch_add(1, Ordering::Relaxed);
        }
        Ticket {
            gate: self.clone(),
            probe,
            ran: false,
        }
    }

    /// Takes an admission under the lock: `Ok(probe)`, or `Err(when)` (a time, or `None`
    /// for "when a ticket ends").
    fn admit(
        &self,
        state: &mut State,
        now: u64,
        moves: &mut Vec<Move>,
    ) -> Result<bool, Option<u64>> {
        if self.concurrency.is_some_and(|max| state.running >= max) {
            return Err(None);
        }
        let wait = state
            .buckets
            .iter_mut()
            .map(|b| b.wait_ms(now))
            .max()
            .unwrap_or(0);
        if wait > 0 {
            return Err(Some(now.saturating_add(wait)));
        }
        let probe = match state.breaker.as_mut().map(|b| b.allow(now, moves)) {
            None | Some(Allow::Go { probe: false }) => false,
            Some(Allow::Go { probe: true }) => true,
            Some(Allow::Wait { until_ms }) => return Err(until_ms),
        };
        let taken = take_all(&mut state.buckets, now);
        debug_assert!(taken.is_ok(), "every bucket had a token");
        state.running += 1;
        Ok(probe)
    }

    /// Parks `parked` in lane `lane`, to be woken by the waker.
    pub(crate) fn park(&self, parked: Parked, lane: Priority) {
        self.state.lock().parked[lane.index()].push_back(parked);
        self.shared.stats.work_moved();
        self.counters.parks.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
        self.shared.stats.notify();
    }

    /// Moves entity `id`'s parked work below `lane` up to `lane` (a `prioritise`).
    pub(crate) fn raise(&self, id: &(String, String), lane: Priority) {
        let mut state = self.state.lock();
        for below in lane.index() + 1..LANES {
            let (keep, moved): (VecDeque<_>, VecDeque<_>) =
                std::mem::take(&mut state.parked[below])
                    .into_iter()
                    .partition(|p| p.entity() != id);
            state.parked[below] = keep;
            state.parked[lane.index()].extend(moved);
        }
        drop(state);
        self.changed.notify_one();
    }

    fn moved(&self, moves: &[Move]) {
        for m in moves {
            let counter = match m.to {
                BreakerState::Open => &self.counters.opened,
                BreakerState::HalfOpen => &self.counters.half_opened,
                BreakerState::Closed => &self.counters.closed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            match m.to {
                BreakerState::Open => tracing::warn!(target: "keystead", effect = self.name,
                    from = ?m.from, "circuit breaker open: this effect type's attempts wait (spending none) until the cool-down ends"),
                _ => tracing::info!(target: "keystead", effect = self.name, from = ?m.from,
                    to = ?m.to, "circuit breaker moved"),
            }
        }
        if !moves.is_empty() {
            self.shared.stats.notify();
        }
    }

    /// The type's counters now.
    pub(crate) fn stats(&self) -> EffectTypeStats {
        let state = self.state.lock();
        let c = &self.counters;
        EffectTypeStats {
            name: self.name.to_string(),
            breaker: state
                .breaker
                .as_ref()
                .map(Breaker::state)
                .unwrap_or_default(),
            breaker_opened: c.opened.load(Ordering::Relaxed),
            breaker_half_opened: c.half_opened.load(Ordering::Relaxed),
            breaker_closed: c.closed.load(Ordering::Relaxed),
            probes: c.probes.load(Ordering::Relaxed),
            running: state.running as u64,
            parked: state.parked.iter().map(|q| q.len() as u64).sum(),
            parks: c.parks.load(Ordering::Relaxed),
            resumed: c.resumed.load(Ordering::Relaxed),
            breaker_open_until_ms: state
                .breaker
                .as_ref()
                .and_then(Breaker::open_until_ms)
                .unwrap_or(0),
            attempts_uncounted: c.uncounted.load(Ordering::Relaxed),
        }
    }

    /// The type's waker: hands parked work, highest lane first, an admission as the type
    /// opens up, and `resume` gives it a worker (false once the workers are closing). It
    /// sleeps on the runtime clock (a cool-down, a refill) or until a ticket ends or work
    /// parks.
    pub(crate) async fn serve<F, R>(self: Arc<Self>, resume: F)
    where
        F: Fn(Parked, Priority, Ticket) -> R,
        R: Future<Output = bool>,
    {
        loop {
            let changed = self.changed.notified();
            let mut changed = pin!(changed);
            changed.as_mut().enable();
            let next = self.next();
            match next {
                Next::Go(parked, lane, ticket) => {
                    if !resume(parked, lane, ticket).await {
                        return;
                    }
                }
                Next::Wait(None) => changed.await,
                Next::Wait(Some(at_ms)) => {
                    let clock = self.shared.clock.clone();
                    let mut due = clock.sleep_until(at_ms);
                    std::future::poll_fn(|cx| {
                        if changed.as_mut().poll(cx).is_ready() || due.as_mut().poll(cx).is_ready()
                        {
                            Poll::Ready(())
                        } else {
                            Poll::Pending
                        }
                    })
                    .await;
                }
            }
        }
    }

    fn next(self: &Arc<Self>) -> Next {
        let now = self.shared.clock.now_ms();
        let mut moves = Vec::new();
        let next = {
            let mut state = self.state.lock();
            match state.parked.iter().position(|q| !q.is_empty()) {
                None => Next::Wait(None),
                Some(lane) => match self.admit(&mut state, now, &mut moves) {
                    Ok(probe) => {
                        let parked = state.parked[lane]
                            .pop_front()
                            .expect("the lane has parked work");
                        Next::Go(parked, Priority::ALL[lane], self.ticket(probe))
                    }
                    Err(at) => Next::Wait(at),
                },
            }
        };
        if let Next::Go(..) = &next {
            self.counters.resumed.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.work_moved();
            self.shared.stats.notify();
        }
        self.moved(&moves);
        next
    }
}
