//! Time: the timer firer, which moves delayed messages into the inbox when due, and the
//! scheduler, which fires schedules' runs. Both run on one thread, `keystead-time`, with a
//! small tokio runtime of its own, and sleep on the runtime's [`Clock`](crate::Clock), so a
//! [`ManualClock`](crate::ManualClock) drives them in tests.
//!
//! - `firer`: delayed messages (the records and the claims are in `runtime/delayed.rs`);
//! - `scheduler`: named, durable schedules and their operations.

mod firer;
pub(crate) mod scheduler;

use std::sync::{Arc, Weak};
use std::thread;

use crate::error::OpenError;
use crate::runtime::inner::Inner;

pub use scheduler::{Schedule, ScheduleError, ScheduleStatus, Schedules};

/// Starts `keystead-time`: the timer firer and the scheduler, until the runtime closes.
pub(crate) fn start(
    inner: Weak<Inner>,
    scheduler: Arc<scheduler::Scheduler>,
) -> Result<thread::JoinHandle<()>, OpenError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| OpenError::Threads(e.to_string()))?;
    thread::Builder::new()
        .name("keystead-time".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::join!(
                    firer::run(inner.clone()),
                    crate::runtime::feed::janitor(inner.clone()),
                    scheduler::run(inner, scheduler)
                );
            });
        })
        .map_err(|e| OpenError::Threads(e.to_string()))
}
