//! The retry policy for retryable handler failures: exponential backoff with jitter and an
//! attempt limit, after which the message is dead-lettered.

use std::time::Duration;

use crate::core::hash::splitmix64;

/// How retryable failures are retried.
///
/// ```
/// use std::time::Duration;
/// use keystead::RetryPolicy;
/// let policy = RetryPolicy::default()
///     .attempts_max(3)
///     .backoff_initial(Duration::from_millis(10))
///     .backoff_max(Duration::from_secs(1));
/// assert_eq!(policy.get_attempts_max(), 3);
/// // The delay before attempt 2 is at most the initial backoff.
/// assert!(policy.backoff(1, 42) <= Duration::from_millis(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    attempts_max: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms initial backoff doubling up to 10 s.
    fn default() -> Self {
        Self {
            attempts_max: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The total number of attempts, the first included (default 5; at least 1).
    pub fn attempts_max(mut self, attempts: u32) -> Self {
        self.attempts_max = attempts;
        self
    }
    /// The delay before the second attempt (default 100 ms); it doubles for each further one.
    pub fn backoff_initial(mut self, delay: Duration) -> Self {
        self.backoff_initial = delay;
        self
    }
    /// The longest delay between two attempts (default 10 s).
    pub fn backoff_max(mut self, delay: Duration) -> Self {
        self.backoff_max = delay;
        self
    }
    /// The configured attempt limit.
    pub fn get_attempts_max(&self) -> u32 {
        self.attempts_max
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.attempts_max == 0 {
            return Err("attempts_max must be at least 1 (1 means no retry)".into());
        }
        if self.backoff_initial > self.backoff_max {
            return Err(format!(
                "backoff_initial ({:?}) must not exceed backoff_max ({:?})",
                self.backoff_initial, self.backoff_max
            ));
        }
        Ok(())
    }

    /// The delay after failed attempt `attempt` (1-based): "equal jitter", a random point in
    /// the upper half of the exponential delay, so that retries of many messages spread out
    /// while each still waits at least half its step. `seed` makes the jitter reproducible
    /// (the runtime derives it from the message id); handlers never see randomness.
    pub fn backoff(&self, attempt: u32, seed: u64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let step = self
            .backoff_initial
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max);
        let step_us = u64::try_from(step.as_micros()).unwrap_or(u64::MAX);
        let half = step_us / 2;
        let jitter = if half == 0 {
            0
        } else {
            splitmix64(seed ^ u64::from(attempt)) % (half + 1)
        };
        Duration::from_micros(step_us - half + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default()
            .backoff_initial(Duration::from_millis(100))
            .backoff_max(Duration::from_millis(1000));
        for seed in 0..200 {
            let d1 = p.backoff(1, seed);
            let d3 = p.backoff(3, seed);
            let d9 = p.backoff(9, seed);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1000));
        }
        // Jitter actually varies with the seed.
        let distinct: std::collections::HashSet<_> = (0..50).map(|s| p.backoff(2, s)).collect();
        assert!(
            distinct.len() > 10,
            "jitter spreads retries: {}",
            distinct.len()
        );
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(RetryPolicy::default().attempts_max(0).validate().is_err());
        let bad = RetryPolicy::default()
            .backoff_initial(Duration::from_secs(5))
            .backoff_max(Duration::from_secs(1));
        assert!(bad.validate().unwrap_err().contains("backoff_initial"));
        assert!(RetryPolicy::default().validate().is_ok());
    }
}
