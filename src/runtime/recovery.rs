//! After an open: wake every entity that has inbox entries, taking tickets like any caller.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::priority::Priority;
use crate::runtime::inner::Inner;

/// Clears the "recovering" flag however recovery ends (done, runtime closed, or dropped).
pub(crate) struct RecoveryDone(Weak<Inner>);

impl Drop for RecoveryDone {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner
                .shared
                .stats
                .recovering
                .store(false, Ordering::Release);
            inner.shared.stats.notify();
        }
    }
}

/// Wakes every entity that has inbox entries, in the background, taking tickets like any
/// caller (so recovery of a large inbox is bounded in memory too).
pub(crate) fn start_recovery(inner: &Arc<Inner>, entities: Vec<(String, String)>) {
    if entities.is_empty() {
        return;
    }
    inner.shared.stats.recovering.store(true, Ordering::Release);
    let weak = Arc::downgrade(inner);
    let done = RecoveryDone(weak.clone());
    let recovery = async move {
        let _done = done;
        for (entity, key) in entities {
            let Some(inner) = weak.upgrade() else { return };
            if !inner.wake_entity(&entity, &key, Priority::Normal).await {
                return;
            }
        }
    };
    // Run on a shard's arbiter: recovery only awaits tickets, it never blocks the thread.
    let threads = inner.threads.lock();
    let spawned = threads
        .as_ref()
        .and_then(|t| t.arbiters.first())
        .is_some_and(|arbiter| arbiter.spawn(recovery));
    if !spawned {
        tracing::error!(target: "keystead", "could not start inbox recovery; reopen the runtime");
    }
}
