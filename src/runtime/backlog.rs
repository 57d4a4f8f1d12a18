//! The durable work waiting in each lane, and the signals that tell each shard's lane
//! feeders that there is more.
//!
//! - [`Backlog`]: per lane, the messages (and their bytes) accepted into the inbox and not
//!   yet processed, against the lane's [`LaneLimits`]. `tell` reserves room before it
//!   writes; the actor releases it in the batch's wake once the entry is retired. Counted
//!   from the disk at open, so the figures survive a crash.
//! - [`LaneFeed`]: per shard and lane, a generation bumped by every write of a lane index
//!   entry (`accepted`) and the generation the feeder has caught up with; the lowest
//!   sequence accepted since the feeder's last pass (commits can land out of sequence order,
//!   so the feeder rewinds to it); and entities to wake again once their drain ends.

use std::collections::VecDeque;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::core::lanes::LANES;
use crate::priority::{LaneLimits, Priority, WhenFull};
use crate::telemetry::Stats;

/// Why a lane refused a reservation: what it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full {
    pub pending: u64,
    pub pending_bytes: u64,
    pub limits: LaneLimits,
}

#[derive(Debug, Default)]
struct Held {
    count: u64,
    bytes: u64,
}

#[derive(Debug)]
struct LaneBacklog {
    limits: LaneLimits,
    held: Mutex<Held>,
    /// Woken whenever room is released.
    room: Notify,
}

/// Per lane, the durable work pending, against the lane's limits.
#[derive(Debug)]
pub(crate) struct Backlog {
    lanes: [LaneBacklog; LANES],
}

impl Backlog {
    pub(crate) fn new(limits: [LaneLimits; LANES]) -> Self {
        Self {
            lanes: limits.map(|limits| LaneBacklog {
                limits,
                held: Mutex::new(Held::default()),
                room: Notify::new(),
            }),
        }
    }

    /// Counts work found on disk at open (never refused: it is already accepted).
    pub(crate) fn force(&self, lane: Priority, bytes: u64) {
        self.force_n(lane, 1, bytes);
    }

    /// Counts `count` items of `bytes` in all that are already accepted (never refused).
    pub(crate) fn force_n(&self, lane: Priority, count: u64, bytes: u64) {
        let mut held = self.lanes[lane.index()].held.lock();
        held.count += count;
        held.bytes += bytes;
    }

    /// Takes room for one message of `bytes` at once, or says what the lane holds.
    pub(crate) fn try_reserve(&self, lane: Priority, bytes: u64) -> Result<(), Full> {
        self.try_reserve_n(lane, 1, bytes)
    }

    /// Takes room for `count` items of `bytes` in all (the effects of one message), at once
    /// or not at all, or says what the lane holds.
    pub(crate) fn try_reserve_n(&self, lane: Priority, count: u64, bytes: u64) -> Result<(), Full> {
        let backlog = &self.lanes[lane.index()];
        let mut held = backlog.held.lock();
        let limits = backlog.limits;
        // Work larger than the whole budget still gets in alone into a lane that may hold
        // anything, so that nothing is refused forever.
        let alone = held.count == 0 && limits.pending_max() > 0;
        let fits_count = held.count + count <= limits.pending_max() || alone;
        let fits_bytes = held.bytes + bytes <= limits.pending_bytes_max() || alone;
        if fits_count && fits_bytes {
            held.count += count;
            held.bytes += bytes;
            Ok(())
        } else {
            Err(Full {
                pending: held.count,
                pending_bytes: held.bytes,
                limits,
            })
        }
    }

    /// Takes room for `count` items of `bytes`, waiting for it until `deadline` (with
    /// `None`, as long as it takes). The error says what the lane held at the deadline.
    pub(crate) async fn reserve_until(
        &self,
        lane: Priority,
        count: u64,
        bytes: u64,
        deadline: Option<Instant>,
    ) -> Result<(), Full> {
        let backlog = &self.lanes[lane.index()];
        loop {
            let room = backlog.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a release in between is not missed.
            room.as_mut().enable();
            let full = match self.try_reserve_n(lane, count, bytes) {
                Ok(()) => return Ok(()),
                Err(full) => full,
            };
            match deadline {
                None => room.await,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || tokio::time::timeout(left, room).await.is_err() {
                        return Err(full);
                    }
                }
            }
        }
    }

    /// Takes room for one message, waiting as the lane's policy says when it is full.
    pub(crate) async fn reserve(&self, lane: Priority, bytes: u64) -> Result<(), Full> {
        match self.limits(lane).when_full_policy() {
            WhenFull::Reject => self.try_reserve(lane, bytes),
            WhenFull::Block(wait_max) => {
                self.reserve_until(lane, 1, bytes, Some(Instant::now() + wait_max))
                    .await
            }
        }
    }

    /// The limits of lane `lane`.
    pub(crate) fn limits(&self, lane: Priority) -> LaneLimits {
        self.lanes[lane.index()].limits
    }

    /// Gives back the room of one retired message.
    pub(crate) fn release(&self, lane: Priority, bytes: u64) {
        self.release_n(lane, 1, bytes);
    }

    /// Gives back the room of `count` items of `bytes` in all.
    pub(crate) fn release_n(&self, lane: Priority, count: u64, bytes: u64) {
        let backlog = &self.lanes[lane.index()];
        {
            let mut held = backlog.held.lock();
            held.count = held.count.saturating_sub(count);
            held.bytes = held.bytes.saturating_sub(bytes);
        }
        backlog.room.notify_waiters();
    }

    /// What lane `lane` holds: messages and bytes.
    pub(crate) fn pending(&self, lane: Priority) -> (u64, u64) {
        let held = self.lanes[lane.index()].held.lock();
        (held.count, held.bytes)
    }
}

#[derive(Debug)]
struct FeedState {
    /// Bumped by every accepted entry and every wake asked for.
    generation: u64,
    /// The generation the feeder had read when it last found nothing left.
    fed: u64,
    /// The lowest sequence accepted since the feeder's last pass.
    rewind: Option<u64>,
    /// Entities to wake again: their drain ended while more work arrived for them.
    rewake: VecDeque<(&'static str, String)>,
}

/// One shard's lane: how its feeder learns of new work.
#[derive(Debug)]
pub(crate) struct LaneFeed {
    state: Mutex<FeedState>,
    notify: Notify,
}

impl Default for LaneFeed {
    /// Behind from the start, so that every feeder reads its whole lane once after open.
    fn default() -> Self {
        Self {
            state: Mutex::new(FeedState {
                generation: 1,
                fed: 0,
                rewind: None,
                rewake: VecDeque::new(),
            }),
            notify: Notify::new(),
        }
    }
}

/// What a feeder's pass starts from.
pub(crate) struct Pass {
    pub generation: u64,
    pub rewind: Option<u64>,
    pub rewake: Vec<(&'static str, String)>,
}

impl LaneFeed {
    /// An entry with sequence `seq` was committed to this lane's index.
    pub(crate) fn accepted(&self, seq: u64, stats: &Stats) {
        {
            let mut state = self.state.lock();
            state.rewind = Some(state.rewind.map_or(seq, |r| r.min(seq)));
            self.bump(&mut state, stats);
        }
        self.notify.notify_one();
    }

    /// Entity `id` has more work in this lane than its finished drain covered.
    pub(crate) fn rewake(&self, id: (&'static str, String), stats: &Stats) {
        {
            let mut state = self.state.lock();
            state.rewake.push_back(id);
            self.bump(&mut state, stats);
        }
        self.notify.notify_one();
    }

    fn bump(&self, state: &mut FeedState, stats: &Stats) {
        if state.generation == state.fed {
            stats.work_up(&stats.feeds_behind);
        }
        state.generation += 1;
    }

    /// Starts a pass: the generation it covers, where to rewind to, whom to wake again.
    pub(crate) fn begin(&self) -> Pass {
        let mut state = self.state.lock();
        Pass {
            generation: state.generation,
            rewind: state.rewind.take(),
            rewake: state.rewake.drain(..).collect(),
        }
    }

    /// A pass that began at `generation` found nothing left.
    pub(crate) fn caught_up(&self, generation: u64, stats: &Stats) {
        let mut state = self.state.lock();
        if state.fed != state.generation && generation == state.generation {
            stats.work_down(&stats.feeds_behind);
            stats.notify();
        }
        state.fed = state.fed.max(generation);
    }

    /// Waits for the next `accepted` or `rewake` (or returns at once if one came since the
    /// last wait).
    pub(crate) async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Wakes the feeder so that it sees the runtime closing.
    pub(crate) fn wake_for_close(&self) {
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn backlog(max: u64, bytes_max: u64, when_full: WhenFull) -> Backlog {
        let mut limits = [LaneLimits::default(); LANES];
        limits[Priority::Low.index()] = LaneLimits::new(max, bytes_max).when_full(when_full);
        Backlog::new(limits)
    }

    #[test]
    fn a_lane_never_holds_more_than_its_limits() {
        let backlog = Arc::new(backlog(8, 1000, WhenFull::Reject));
        let in_use = Arc::new(AtomicU64::new(0));
        let bytes_in_use = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (backlog, in_use, bytes_in_use) =
                    (backlog.clone(), in_use.clone(), bytes_in_use.clone());
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    let mut seed = t + 1;
                    for _ in 0..20_000 {
                        seed = crate::core::hash::splitmix64(seed);
                        let size = 50 + seed % 200;
                        if seed % 3 != 0 && backlog.try_reserve(Priority::Low, size).is_ok() {
                            let n = in_use.fetch_add(1, Ordering::SeqCst) + 1;
                            let b = bytes_in_use.fetch_add(size, Ordering::SeqCst) + size;
                            assert!(n <= 8, "{n} messages held, limit 8");
                            assert!(b <= 1000, "{b} bytes held, limit 1000");
                            held.push(size);
                        } else if let Some(size) = held.pop() {
                            in_use.fetch_sub(1, Ordering::SeqCst);
                            bytes_in_use.fetch_sub(size, Ordering::SeqCst);
                            backlog.release(Priority::Low, size);
                        }
                    }
                    for size in held {
                        in_use.fetch_sub(1, Ordering::SeqCst);
                        bytes_in_use.fetch_sub(size, Ordering::SeqCst);
                        backlog.release(Priority::Low, size);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            backlog.pending(Priority::Low),
            (0, 0),
            "every reservation came back"
        );
        // Other lanes have their own limits.
        assert!(backlog.try_reserve(Priority::Critical, 10).is_ok());
    }

    #[test]
    fn a_message_larger_than_the_byte_budget_gets_in_alone() {
        let backlog = backlog(10, 100, WhenFull::Reject);
        assert!(
            backlog.try_reserve(Priority::Low, 500).is_ok(),
            "alone: admitted"
        );
        let full = backlog.try_reserve(Priority::Low, 1).unwrap_err();
        assert_eq!((full.pending, full.pending_bytes), (1, 500));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_reservation_gets_room_once_it_is_released() {
        let backlog = Arc::new(backlog(
            1,
            1000,
            WhenFull::Block(std::time::Duration::from_secs(60)),
        ));
        backlog.try_reserve(Priority::Low, 10).unwrap();
        let waiting = {
            let backlog = backlog.clone();
            tokio::spawn(async move { backlog.reserve(Priority::Low, 10).await })
        };
        tokio::task::yield_now().await;
        backlog.release(Priority::Low, 10);
        waiting.await.unwrap().expect("room after the release");
        assert_eq!(backlog.pending(Priority::Low), (1, 10));
    }

    #[test]
    fn several_items_are_reserved_all_or_nothing() {
        let lane = backlog(5, 100, WhenFull::Reject);
        lane.try_reserve_n(Priority::Low, 3, 60).unwrap();
        let full = lane.try_reserve_n(Priority::Low, 3, 10).unwrap_err();
        assert_eq!(
            (full.pending, full.pending_bytes),
            (3, 60),
            "count: none taken"
        );
        let full = lane.try_reserve_n(Priority::Low, 2, 41).unwrap_err();
        assert_eq!(
            (full.pending, full.pending_bytes),
            (3, 60),
            "bytes: none taken"
        );
        lane.try_reserve_n(Priority::Low, 2, 40).unwrap();
        assert_eq!(lane.pending(Priority::Low), (5, 100));
        lane.release_n(Priority::Low, 5, 100);
        // More items than the whole limit still get in alone, so nothing waits forever.
        lane.try_reserve_n(Priority::Low, 9, 500).unwrap();
        assert_eq!(lane.pending(Priority::Low), (9, 500));
        // A lane that may hold nothing holds nothing.
        let none = backlog(0, 100, WhenFull::Reject);
        assert!(none.try_reserve_n(Priority::Low, 1, 0).is_err());
    }
}
