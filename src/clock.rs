//! Time as the runtime sees it. Handlers read time only through their [`Context`](crate::Context),
//! which reads it from the runtime's [`Clock`], so tests can control it with [`ManualClock`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// `d` in whole milliseconds, saturating (a duration past `u64::MAX` ms is "forever").
pub(crate) fn ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `t` in milliseconds since the Unix epoch: 0 for a time before it, saturating after.
pub(crate) fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(ms_of).unwrap_or(0)
}

/// What [`Clock::sleep_until`] returns.
pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A source of wall-clock time, in milliseconds since the Unix epoch.
///
/// ```
/// use keystead::{Clock, SystemClock};
/// assert!(SystemClock.now_ms() > 1_600_000_000_000);
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// Resolves once [`now_ms`](Clock::now_ms) reads `at_ms` or later: the runtime's timers
    /// (a breaker's cool-down, a rate limit's refill) wait with it. The default sleeps on
    /// tokio's timer for the difference and reads the clock again; a clock moved by hand
    /// overrides it to wake its sleepers when moved, as [`ManualClock`] does. Must be
    /// polled inside a tokio runtime with its timer enabled.
    fn sleep_until(&self, at_ms: u64) -> Sleep<'_> {
        Box::pin(async move {
            loop {
                let now = self.now_ms();
                if now >= at_ms {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(at_ms - now)).await;
            }
        })
    }
}

/// The operating system's clock. The default.
///
/// ```
/// use keystead::{Clock, SystemClock};
/// let a = SystemClock.now_ms();
/// assert!(SystemClock.now_ms() >= a);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 is a broken host; report the epoch rather than panic.
        epoch_ms(SystemTime::now())
    }
}

/// A clock that only moves when told to; share clones between the test and the runtime.
/// Moving it wakes whatever sleeps on it ([`Clock::sleep_until`]): a test drives a
/// breaker's cool-down or a rate limit's refill with [`advance`](ManualClock::advance),
/// never by sleeping.
///
/// ```
/// use std::time::Duration;
/// use keystead::{Clock, ManualClock};
/// let clock = ManualClock::new(1_000);
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(clock.now_ms(), 3_000);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    ms: Arc<AtomicU64>,
    moved: Arc<Notify>,
}

impl ManualClock {
    /// A clock reading `start_ms` milliseconds since the epoch.
    pub fn new(start_ms: u64) -> Self {
        Self {
            ms: Arc::new(AtomicU64::new(start_ms)),
            moved: Arc::new(Notify::new()),
        }
    }

    /// Moves the clock forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by_ms = ms_of(by);
        let mut current = self.ms.load(Ordering::SeqCst);
        loop {
            let next = current.saturating_add(by_ms);
            match self
                .ms
                .compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.moved.notify_waiters();
    }

    /// Sets the clock to `ms` milliseconds since the epoch.
    pub fn set(&self, ms: u64) {
        self.ms.store(ms, Ordering::SeqCst);
        self.moved.notify_waiters();
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }

    fn sleep_until(&self, at_ms: u64) -> Sleep<'_> {
        Box::pin(async move {
            loop {
                let moved = self.moved.notified();
                tokio::pin!(moved);
                // Registered before the reading, so a move between the two is not missed.
                moved.as_mut().enable();
                if self.now_ms() >= at_ms {
                    return;
                }
                moved.await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_its_sleepers_when_moved() {
        let clock = ManualClock::new(0);
        let sleeper = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.sleep_until(1_000).await })
        };
        clock.advance(Duration::from_millis(999));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "not yet due");
        clock.advance(Duration::from_millis(1));
        tokio::time::timeout(Duration::from_secs(60), sleeper)
            .await
            .expect("woken by the move")
            .unwrap();
        assert_eq!(clock.now_ms(), 1_000);
    }
}
