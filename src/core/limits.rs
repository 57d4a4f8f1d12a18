//! The pure rules of an effect type's limits: token buckets (rate limits) and the circuit
//! breaker. Both are values moved by `now_ms` readings and attempt results; they never read
//! a clock, sleep or wake anyone. The effect workers (`effects::limits`) drive them with the
//! runtime's clock and park the work they refuse.

use std::time::Duration;

/// A rate limit: at most `count` attempts per `per`, as a token bucket that holds `count`
/// tokens (so a burst of `count` may go at once) and refills evenly over `per`.
///
/// ```
/// use std::time::Duration;
/// use keystead::Rate;
/// let rate = Rate::new(100, Duration::from_secs(1));
/// assert_eq!(rate.count(), 100);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: u32,
    per: Duration,
}

impl Rate {
    /// At most `count` attempts per `per`. A zero count or period is refused at open.
    pub fn new(count: u32, per: Duration) -> Self {
        Self { count, per }
    }
    /// Attempts per period.
    pub fn count(&self) -> u32 {
        self.count
    }
    /// The period.
    pub fn per(&self) -> Duration {
        self.per
    }
    pub(crate) fn is_valid(&self) -> bool {
        self.count > 0 && duration_ms(self.per) > 0
    }
}

/// One token bucket. Tokens are counted in units of 1/`per_ms` of a token, so that refill is
/// exact in integers: each millisecond adds `count` units, one token costs `per_ms` units.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    count: u128,
    per_ms: u128,
    level: u128,
    last_ms: u64,
}

impl Bucket {
    /// A full bucket at `now_ms`.
    pub(crate) fn new(rate: Rate, now_ms: u64) -> Self {
        let count = u128::from(rate.count.max(1));
        let per_ms = u128::from(duration_ms(rate.per).max(1));
        Self {
            count,
            per_ms,
            level: count * per_ms,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        if now_ms > self.last_ms {
            let elapsed = u128::from(now_ms - self.last_ms);
            self.level = (self.level + elapsed * self.count).min(self.count * self.per_ms);
            self.last_ms = now_ms;
        }
    }

    /// Milliseconds until a token is there (0: one is there now).
    pub(crate) fn wait_ms(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        if self.level >= self.per_ms {
            return 0;
        }
        let need = self.per_ms - self.level;
        u64::try_from(need.div_ceil(self.count)).unwrap_or(u64::MAX)
    }

    /// Takes a token if one is there.
    pub(crate) fn try_take(&mut self, now_ms: u64) -> bool {
        if self.wait_ms(now_ms) > 0 {
            return false;
        }
        self.level -= self.per_ms;
        true
    }

    /// Gives back a token taken for an attempt that never ran.
    pub(crate) fn give_back(&mut self) {
        self.level = (self.level + self.per_ms).min(self.count * self.per_ms);
    }
}

/// Takes one token from every bucket, or none: `Err(ms)` is how long until all have one.
pub(crate) fn take_all(buckets: &mut [Bucket], now_ms: u64) -> Result<(), u64> {
    let wait = buckets
        .iter_mut()
        .map(|b| b.wait_ms(now_ms))
        .max()
        .unwrap_or(0);
    if wait > 0 {
        return Err(wait);
    }
    for bucket in buckets.iter_mut() {
        let taken = bucket.try_take(now_ms);
        debug_assert!(taken, "every bucket had a token");
    }
    Ok(())
}

/// When a circuit breaker opens, and how long it stays open before it lets one probe
/// through. It opens after `consecutive` retryable failures in a row, or (with
/// [`BreakerPolicy::failure_ratio`]) when at least `min_attempts` attempts ended in the last
/// `window` and at least `ratio` of them failed. A permanent failure is an answer, not an
/// outage: it counts as a success here.
///
/// ```
/// use std::time::Duration;
/// use keystead::BreakerPolicy;
/// let policy = BreakerPolicy::consecutive(5)
///     .failure_ratio(0.5, 20, Duration::from_secs(60))
///     .cool_down(Duration::from_secs(30));
/// assert_eq!(policy.get_cool_down(), Duration::from_secs(30));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    consecutive: u32,
    ratio: Option<(f64, u32, Duration)>,
    cool_down: Duration,
}

impl BreakerPolicy {
    /// Opens after `failures` retryable failures in a row (zero is refused at open).
    /// Cool-down 30 s.
    pub fn consecutive(failures: u32) -> Self {
        Self {
            consecutive: failures,
            ratio: None,
            cool_down: Duration::from_secs(30),
        }
    }

    /// Also opens when, of the attempts that ended in the last `window` (at least
    /// `min_attempts` of them), a share of at least `ratio` (in (0, 1]) failed.
    pub fn failure_ratio(mut self, ratio: f64, min_attempts: u32, window: Duration) -> Self {
        self.ratio = Some((ratio, min_attempts, window));
        self
    }

    /// How long it stays open before one probe may go (default 30 s).
    pub fn cool_down(mut self, cool_down: Duration) -> Self {
        self.cool_down = cool_down;
        self
    }

    /// The cool-down.
    pub fn get_cool_down(&self) -> Duration {
        self.cool_down
    }

    /// What is wrong with the policy, if anything.
    pub(crate) fn invalid(&self) -> Option<&'static str> {
        if self.consecutive == 0 {
            return Some("BreakerPolicy::consecutive must be at least 1");
        }
        if duration_ms(self.cool_down) == 0 {
            return Some("BreakerPolicy::cool_down must be at least 1 ms");
        }
        if let Some((ratio, min, window)) = self.ratio {
            if !(ratio > 0.0 && ratio <= 1.0) {
                return Some("BreakerPolicy::failure_ratio's ratio must be in (0, 1]");
            }
            if min == 0 || duration_ms(window) < WINDOW_SLOTS {
                return Some("BreakerPolicy::failure_ratio needs min_attempts >= 1 and a window of at least 10 ms");
            }
        }
        None
    }
}

/// Where a circuit breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BreakerState {
    /// Attempts go.
    #[default]
    Closed,
    /// Attempts wait (spending nothing) until the cool-down ends.
    Open,
    /// One probe attempt is allowed; its result closes or reopens the breaker.
    HalfOpen,
}

/// A breaker's answer to "may an attempt go now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Allow {
    /// Yes; `probe` when it is the half-open breaker's one probe.
    Go { probe: bool },
    /// Not before `until_ms` (open), or not until the probe out now ends (`None`).
    Wait { until_ms: Option<u64> },
}

/// A state change, to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Move {
    pub from: BreakerState,
    pub to: BreakerState,
}

const WINDOW_SLOTS: u64 = 10;

/// A circuit breaker: a table of moves (`can_move`) driven by `allow` and `record`.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    policy: BreakerPolicy,
    state: BreakerState,
    failures_in_row: u32,
    open_until_ms: u64,
    probe_out: bool,
    /// The failure-ratio window as `WINDOW_SLOTS` slots: (slot number, ended, failed).
    slots: [(u64, u32, u32); WINDOW_SLOTS as usize],
}

/// The allowed moves, in one place.
fn can_move(from: BreakerState, to: BreakerState) -> bool {
    use BreakerState::*;
    matches!(
        (from, to),
        (Closed, Open) | (Open, HalfOpen) | (HalfOpen, Closed) | (HalfOpen, Open)
    )
}

impl Breaker {
    pub(crate) fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            state: BreakerState::Closed,
            failures_in_row: 0,
            open_until_ms: 0,
            probe_out: false,
            slots: [(u64::MAX, 0, 0); WINDOW_SLOTS as usize],
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.state
    }

    /// When an open breaker's cool-down ends (`None` unless open).
    pub(crate) fn open_until_ms(&self) -> Option<u64> {
        (self.state == BreakerState::Open).then_some(self.open_until_ms)
    }

    fn go(&mut self, to: BreakerState, moves: &mut Vec<Move>) {
        debug_assert!(
            can_move(self.state, to),
            "breaker {:?} -> {to:?}",
            self.state
        );
        moves.push(Move {
            from: self.state,
            to,
        });
        self.state = to;
    }

    /// May an attempt go at `now_ms`? A yes while half-open hands out the one probe.
    /// State changes made on the way are pushed to `moves`.
    pub(crate) fn allow(&mut self, now_ms: u64, moves: &mut Vec<Move>) -> Allow {
        if self.state == BreakerState::Open {
            if now_ms < self.open_until_ms {
                return Allow::Wait {
                    until_ms: Some(self.open_until_ms),
                };
            }
            self.go(BreakerState::HalfOpen, moves);
        }
        match self.state {
            BreakerState::Closed => Allow::Go { probe: false },
            _ if self.probe_out => Allow::Wait { until_ms: None },
            _ => {
                self.probe_out = true;
                Allow::Go { probe: true }
            }
        }
    }

    /// The probe handed out never ran (its work went elsewhere): another may go.
    pub(crate) fn probe_unused(&mut self) {
        self.probe_out = false;
    }

    /// An attempt ended at `now_ms`: `failed` for a retryable failure (a timeout included),
    /// `probe` if it was the half-open probe. Results of attempts that started before the
    /// breaker opened change nothing while it is open.
    pub(crate) fn record(&mut self, failed: bool, probe: bool, now_ms: u64, moves: &mut Vec<Move>) {
        if probe {
            self.probe_out = false;
            if self.state == BreakerState::HalfOpen {
                if failed {
                    self.open(now_ms, moves);
                } else {
                    self.go(BreakerState::Closed, moves);
                    self.failures_in_row = 0;
                    self.slots = [(u64::MAX, 0, 0); WINDOW_SLOTS as usize];
                }
            }
            return;
        }
        if self.state != BreakerState::Closed {
            return;
        }
        self.failures_in_row = if failed { self.failures_in_row + 1 } else { 0 };
        let tripped_ratio = self.count_in_window(failed, now_ms);
        if self.failures_in_row >= self.policy.consecutive || tripped_ratio {
            self.open(now_ms, moves);
        }
    }

    fn open(&mut self, now_ms: u64, moves: &mut Vec<Move>) {
        self.go(BreakerState::Open, moves);
        self.open_until_ms = now_ms.saturating_add(duration_ms(self.policy.cool_down));
        self.failures_in_row = 0;
        self.slots = [(u64::MAX, 0, 0); WINDOW_SLOTS as usize];
    }

    /// Counts one ended attempt in the ratio window; true when the ratio trips.
    fn count_in_window(&mut self, failed: bool, now_ms: u64) -> bool {
        let Some((ratio, min, window)) = self.policy.ratio else {
            return false;
        };
        let slot_ms = (duration_ms(window) / WINDOW_SLOTS).max(1);
        let slot = now_ms / slot_ms;
        let cell = &mut self.slots[(slot % WINDOW_SLOTS) as usize];
        if cell.0 != slot {
            *cell = (slot, 0, 0);
        }
        cell.1 += 1;
        cell.2 += u32::from(failed);
        let (ended, failures) = self
            .slots
            .iter()
            .filter(|(s, _, _)| *s != u64::MAX && *s + WINDOW_SLOTS > slot && *s <= slot)
            .fold((0u64, 0u64), |(e, f), (_, de, df)| {
                (e + u64::from(*de), f + u64::from(*df))
            });
        ended >= u64::from(min) && failures as f64 >= ratio * ended as f64
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_bucket_refills_evenly() {
        let mut b = Bucket::new(Rate::new(10, Duration::from_secs(1)), 0);
        for _ in 0..10 {
            assert!(b.try_take(0));
        }
        assert!(!b.try_take(0), "a burst of 10, then empty");
        assert_eq!(b.wait_ms(0), 100, "one token per 100 ms");
        assert!(!b.try_take(99));
        assert!(b.try_take(100));
        b.give_back();
        assert!(b.try_take(100));
        assert!(!b.try_take(100));
    }

    proptest! {
        /// Whatever the request times, a bucket never lets more than `count` + (elapsed
        /// refill) through: in any window of length `per`, at most 2 * count (the burst
        /// plus one period's refill), and over the whole run at most count + count *
        /// elapsed / per.
        #[test]
        fn buckets_hold_over_windows(count in 1u32..50, per_ms in 1u64..5_000,
                                     steps in proptest::collection::vec(0u64..200, 1..400)) {
            let rate = Rate::new(count, Duration::from_millis(per_ms));
            let mut b = Bucket::new(rate, 0);
            let mut now = 0u64;
            let mut granted: Vec<u64> = Vec::new();
            for step in steps {
                now += step;
                if b.try_take(now) {
                    granted.push(now);
                }
            }
            let total_bound = u64::from(count) + u64::from(count) * now / per_ms;
            prop_assert!(granted.len() as u64 <= total_bound);
            for (i, &t) in granted.iter().enumerate() {
                let in_window = granted[i..].iter().take_while(|&&u| u < t + per_ms).count();
                prop_assert!(in_window as u64 <= 2 * u64::from(count));
            }
        }

        /// Two buckets together (100/s and 5,000/h scaled down): neither is ever exceeded.
        #[test]
        fn all_buckets_hold_together(steps in proptest::collection::vec(0u64..50, 1..2_000)) {
            let mut buckets = vec![
                Bucket::new(Rate::new(5, Duration::from_millis(100)), 0),
                Bucket::new(Rate::new(20, Duration::from_millis(2_000)), 0),
            ];
            let mut now = 0;
            let mut granted = 0u64;
            for step in steps {
                now += step;
                if take_all(&mut buckets, now).is_ok() {
                    granted += 1;
                }
            }
            prop_assert!(granted <= 5 + 5 * now / 100);
            prop_assert!(granted <= 20 + 20 * now / 2_000);
        }
    }

    fn breaker(n: u32) -> Breaker {
        Breaker::new(BreakerPolicy::consecutive(n).cool_down(Duration::from_millis(1_000)))
    }

    #[test]
    fn a_breaker_opens_probes_and_closes() {
        let mut b = breaker(3);
        let mut moves = Vec::new();
        for t in 0..2 {
            assert_eq!(b.allow(t, &mut moves), Allow::Go { probe: false });
            b.record(true, false, t, &mut moves);
        }
        b.record(false, false, 2, &mut moves);
        assert_eq!(b.state(), BreakerState::Closed, "a success resets the row");
        for t in 3..6 {
            b.record(true, false, t, &mut moves);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.allow(500, &mut moves),
            Allow::Wait {
                until_ms: Some(1_005)
            }
        );
        assert_eq!(b.allow(1_005, &mut moves), Allow::Go { probe: true });
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.allow(1_005, &mut moves), Allow::Wait { until_ms: None });
        b.record(true, true, 1_010, &mut moves);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens it");
        assert_eq!(
            b.allow(2_009, &mut moves),
            Allow::Wait {
                until_ms: Some(2_010)
            }
        );
        assert_eq!(b.allow(2_010, &mut moves), Allow::Go { probe: true });
        b.record(false, true, 2_011, &mut moves);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.allow(2_011, &mut moves), Allow::Go { probe: false });
        use BreakerState::*;
        let seen: Vec<_> = moves.iter().map(|m| (m.from, m.to)).collect();
        assert_eq!(
            seen,
            [
                (Closed, Open),
                (Open, HalfOpen),
                (HalfOpen, Open),
                (Open, HalfOpen),
                (HalfOpen, Closed)
            ]
        );
    }

    #[test]
    fn an_unused_probe_lets_another_go() {
        let mut b = breaker(1);
        let mut moves = Vec::new();
        b.record(true, false, 0, &mut moves);
        assert_eq!(b.allow(1_000, &mut moves), Allow::Go { probe: true });
        b.probe_unused();
        assert_eq!(b.allow(1_000, &mut moves), Allow::Go { probe: true });
    }

    #[test]
    fn a_failure_ratio_opens_it() {
        let policy =
            BreakerPolicy::consecutive(100).failure_ratio(0.5, 10, Duration::from_secs(10));
        let mut b = Breaker::new(policy);
        let mut moves = Vec::new();
        // Alternate: never 100 in a row, but nearly half of them fail.
        for t in 0..9 {
            b.record(t % 2 == 1, false, t * 100, &mut moves);
        }
        assert_eq!(b.state(), BreakerState::Closed, "fewer than 10 attempts");
        b.record(false, false, 950, &mut moves);
        assert_eq!(b.state(), BreakerState::Closed, "4 of 10 failed");
        b.record(true, false, 960, &mut moves);
        assert_eq!(b.state(), BreakerState::Closed, "5 of 11 failed");
        b.record(true, false, 970, &mut moves);
        assert_eq!(b.state(), BreakerState::Open, "6 of 12 failed");
        // Old attempts leave the window: 9 failures, then successes 20 s later.
        let mut b = Breaker::new(policy);
        for t in 0..9 {
            b.record(true, false, t, &mut moves);
        }
        for t in 0..10 {
            b.record(false, false, 20_000 + t, &mut moves);
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "the failures left the window"
        );
        let mut b = Breaker::new(policy);
        for t in 0..9 {
            b.record(true, false, t, &mut moves);
        }
        b.record(false, false, 100, &mut moves);
        assert_eq!(b.state(), BreakerState::Open, "9 of 10 in the window");
    }

    #[test]
    fn invalid_policies_are_named() {
        assert!(BreakerPolicy::consecutive(0).invalid().is_some());
        assert!(BreakerPolicy::consecutive(1)
            .cool_down(Duration::ZERO)
            .invalid()
            .is_some());
        assert!(BreakerPolicy::consecutive(1)
            .failure_ratio(1.5, 1, Duration::from_secs(1))
            .invalid()
            .is_some());
        assert!(BreakerPolicy::consecutive(1).invalid().is_none());
    }
}
