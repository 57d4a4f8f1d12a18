//! How urgent a message is: the lane it waits in wherever work waits.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The priority of a message: which lane it waits in wherever work waits (today: shard
/// admission). Higher lanes go first, and a lower lane still gets a bounded share (see
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
