//! How urgent a message is (the lane it waits in wherever work waits), and how much durable
//! work a lane may hold.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The priority of a message: which lane it waits in wherever work waits (shard admission,
/// and for `tell` the durable inbox until its entity takes it). Higher lanes go first, and a lower lane still gets a bounded share (see
/// [`RuntimeBuilder::lane_promote_after`](crate::RuntimeBuilder::lane_promote_after)).
///
/// Priority orders work *across* entities. It never reorders one entity's own messages:
/// the entity's actor applies them in the order they reach it, whatever their lanes.
///
/// ```
/// use keystead::Priority;
/// assert_eq!(Priority::default(), Priority::Normal);
/// assert!(Priority::Critical > Priority::Low);
/// assert_eq!(Priority::High.as_str(), "high");
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub enum Priority {
    /// Background work that may wait (refreshes, re-indexing).
    Low,
    /// Ordinary work: the default.
    #[default]
    Normal,
    /// Work a person is waiting for.
    High,
    /// Work that must not wait behind anything else (an item a user just searched).
    Critical,
}

impl Priority {
    /// Every lane, highest first.
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    /// The lane's position in [`Priority::ALL`]: 0 for `Critical`, 3 for `Low`.
    pub fn index(self) -> usize {
        match self {
            Priority::Critical => 0,
            Priority::High => 1,
            Priority::Normal => 2,
            Priority::Low => 3,
        }
    }

    /// The lane at position `index` of [`Priority::ALL`] (a lane byte as stored), or `None`
    /// for a byte no lane has.
    pub(crate) fn from_index(index: u8) -> Option<Priority> {
        Priority::ALL.get(usize::from(index)).copied()
    }

    /// The lane's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a `tell` meets when its lane already holds its limit of pending work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenFull {
    /// Wait for room, at most this long, then refuse with
    /// [`SubmitError::Overloaded`](crate::SubmitError::Overloaded).
    Block(Duration),
    /// Refuse at once with [`SubmitError::Overloaded`](crate::SubmitError::Overloaded).
    Reject,
}

/// Which durable backlog refused work: the inbox (messages accepted by `tell` and not yet
/// processed) or the outbox (effects recorded and not yet finished).
///
/// ```
/// use keystead::BacklogKind;
/// assert_eq!(BacklogKind::Outbox.to_string(), "outbox");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BacklogKind {
    /// Messages accepted by `tell` and not yet processed
    /// ([`RuntimeBuilder::lane_limits`](crate::RuntimeBuilder::lane_limits)).
    Inbox,
    /// Effects recorded by handlers and not yet finished
    /// ([`RuntimeBuilder::outbox_limits`](crate::RuntimeBuilder::outbox_limits)).
    Outbox,
}

impl BacklogKind {
    /// What this backlog holds, for messages.
    pub(crate) fn items(self) -> &'static str {
        match self {
            BacklogKind::Inbox => "messages",
            BacklogKind::Outbox => "effects",
        }
    }

    /// The builder setting that sets its limits.
    pub(crate) fn setting(self) -> &'static str {
        match self {
            BacklogKind::Inbox => "lane_limits",
            BacklogKind::Outbox => "outbox_limits",
        }
    }
}

impl fmt::Display for BacklogKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BacklogKind::Inbox => "inbox",
            BacklogKind::Outbox => "outbox",
        })
    }
}

/// The most durable work one lane may hold: messages accepted by `tell` (or requeued) and not
/// yet processed, counted and in bytes (encoded inbox records). Work the caller marked
/// sheddable ([`Tell::sheddable`](crate::Tell::sheddable)) meets a full lane by going to the
/// shed log; anything else meets [`WhenFull`].
///
/// ```
/// use std::time::Duration;
/// use keystead::{LaneLimits, WhenFull};
/// let limits = LaneLimits::new(200_000, 256 << 20).when_full(WhenFull::Reject);
/// assert_eq!(limits.pending_max(), 200_000);
/// assert_eq!(LaneLimits::default().when_full_policy(), WhenFull::Block(Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneLimits {
    pending_max: u64,
    pending_bytes_max: u64,
    when_full: WhenFull,
}

impl Default for LaneLimits {
    /// 1,000,000 messages, 1 GiB, and a full lane blocks `tell` for up to 30 s.
    fn default() -> Self {
        Self {
            pending_max: 1_000_000,
            pending_bytes_max: 1 << 30,
            when_full: WhenFull::Block(Duration::from_secs(30)),
        }
    }
}

impl LaneLimits {
    /// At most `pending_max` messages and `pending_bytes_max` bytes pending; when full, the
    /// default policy (block up to 30 s).
    pub fn new(pending_max: u64, pending_bytes_max: u64) -> Self {
        Self {
            pending_max,
            pending_bytes_max,
            ..Self::default()
        }
    }
    /// What a `tell` meets when the lane is full. Default: `Block(30 s)`.
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.when_full = policy;
        self
    }
    /// The most messages pending.
    pub fn pending_max(&self) -> u64 {
        self.pending_max
    }
    /// The most bytes pending.
    pub fn pending_bytes_max(&self) -> u64 {
        self.pending_bytes_max
    }
    /// The policy for a full lane.
    pub fn when_full_policy(&self) -> WhenFull {
        self.when_full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_follows_all_and_order() {
        for (i, p) in Priority::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
        }
        let mut sorted = Priority::ALL;
        sorted.sort();
        sorted.reverse();
        assert_eq!(sorted, Priority::ALL, "ALL is highest first");
    }
}
