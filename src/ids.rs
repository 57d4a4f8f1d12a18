//! Message and correlation ids generated when the caller gives none.
//!
//! A generated id is a per-process random prefix plus a counter: unique within the process
//! and, with overwhelming probability, across restarts. Generated ids protect against
//! internal redelivery only; to make a caller's retry idempotent, the caller must supply its
//! own id (an idempotency key) and reuse it on the retry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::core::hash::splitmix64;

fn process_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let stack_addr = &nanos as *const u64 as u64;
        splitmix64(nanos ^ u64::from(std::process::id()).rotate_left(32) ^ stack_addr)
    })
}

/// A fresh id such as `k-1f3a9c2e5b7d8e01-2a`.
pub(crate) fn generate() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("k-{:016x}-{n:x}", process_seed())
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_ids_are_unique() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| super::generate()).collect();
        assert_eq!(ids.len(), 10_000);
    }
}
