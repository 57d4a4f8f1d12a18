//! When a write counts as done: flushed (the default), or applied with a bounded window of
//! writes a crash can lose.

use std::time::Duration;

/// When keystead acknowledges a write (a `tell` accepted, an `ask` replied).
///
/// ```
/// use std::time::Duration;
/// use keystead::{Durability, Runtime};
/// # let dir = tempfile::tempdir().unwrap();
/// let builder = Runtime::builder(dir.path())
///     .durability(Durability::Relaxed { flush_every: Duration::from_millis(20) });
/// # drop(builder);
/// assert_eq!(Durability::default(), Durability::Sync);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Acknowledge a write only once its batch is flushed to disk (sled's `flush` survives a
    /// crash of the process; fjall's `fdatasync` also a power loss on a drive that honours
    /// it; see `docs/architecture.md`). Batches still form under load: the commits that
    /// arrive during one flush make up the next batch.
    #[default]
    Sync,
    /// Acknowledge a write once its batch is applied (in the engine's memory and log buffers), and
    /// flush in the background at most `flush_every` later. A crash can lose the writes
    /// acknowledged in the last `flush_every` (plus one flush): accepted `tell`s, applied
    /// changes, their dedup records (a resend with the same id then runs again) and their
    /// effects' records (an effect already performed may run again under the same key).
    /// Each batch stays atomic: a crash never leaves half a message.
    Relaxed {
        /// The longest time between a write being acknowledged and being flushed.
        flush_every: Duration,
    },
}

impl Durability {
    /// The flush interval of [`Durability::Relaxed`]; `None` for [`Durability::Sync`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use keystead::Durability;
    /// let relaxed = Durability::Relaxed { flush_every: Duration::from_millis(5) };
    /// assert_eq!(relaxed.flush_every(), Some(Duration::from_millis(5)));
    /// assert_eq!(Durability::Sync.flush_every(), None);
    /// ```
    pub fn flush_every(&self) -> Option<Duration> {
        match self {
            Durability::Sync => None,
            Durability::Relaxed { flush_every } => Some(*flush_every),
        }
    }
}
