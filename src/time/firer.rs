//! The timer firer: moves delayed messages into the inbox when they fall due, in due
//! order, many per batch, and sleeps on the runtime clock until the next one (or until a
//! new timer, due sooner, is accepted).

use std::sync::Weak;
use std::time::Duration;

use crate::runtime::inner::Inner;

/// After a storage error, the firer tries again this much later on the runtime clock (a
/// store that stays broken is poisoned, and the runtime must be restarted anyway).
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(100);

pub(crate) async fn run(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let (delayed, shared, store) = (
            strong.delayed.clone(),
            strong.shared.clone(),
            strong.store.clone(),
        );
        let closed = strong.is_closed();
        drop(strong);
        if closed {
            return;
        }
        let wake = delayed.wake.notified();
        tokio::pin!(wake);
        // Registered before the pass, so a timer accepted during it is not missed.
        wake.as_mut().enable();
        let now = shared.clock.now_ms();
        shared.stats.work_up(&shared.stats.time_firing);
        let pass = delayed.fire_due(&store, &shared, now).await;
        shared.stats.work_down(&shared.stats.time_firing);
        shared.stats.notify();
        let next_due = match pass {
            Ok(pass) if pass.fired > 0 => continue,
            Ok(pass) if pass.contended => {
                tokio::select! {
                    _ = delayed.claim_released() => {}
                    _ = &mut wake => {}
                }
                continue;
            }
            Ok(pass) => pass.next_due_ms,
            Err(e) => {
                tracing::warn!(target: "keystead", error = %e, "delayed messages could not be fired; trying again");
                Some(now.saturating_add(RETRY_AFTER_ERROR.as_millis() as u64))
            }
        };
        let clock = shared.clock.clone();
        match next_due {
            Some(at) => {
                tokio::select! {
                    _ = clock.sleep_until(at) => {}
                    _ = &mut wake => {}
                }
            }
            None => wake.await,
        }
    }
}
