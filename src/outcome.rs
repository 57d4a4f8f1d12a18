//! How a message ended. Every message ends with exactly one [`Outcome`].

use serde::{Deserialize, Serialize};

/// The result of the first processing of a message id, as stored for deduplication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Recorded<R, X> {
    /// The command was applied; `revision` is the entity's revision after it.
    Applied {
        /// The handler's reply.
        reply: R,
        /// The revision the change produced.
        revision: u64,
    },
    /// The message carried a version not greater than the entity's; it was dropped.
    Stale {
        /// The entity's version at the time.
        current: u64,
    },
    /// The handler returned a permanent error.
    Rejected {
        /// The error.
        error: X,
    },
    /// Every attempt failed; the message is in the dead-letter store.
    DeadLettered {
        /// The last error, as text.
        error: String,
        /// Attempts made.
        attempts: u32,
    },
}

/// How a message ended.
///
/// ```
/// use keystead::{Outcome, OutcomeKind, Recorded};
/// let first: Outcome<u32, String> = Outcome::Applied { reply: 7, revision: 1 };
/// let again: Outcome<u32, String> = Outcome::Duplicate {
///     first: Recorded::Applied { reply: 7, revision: 1 },
/// };
/// assert_eq!(first.reply(), again.reply());
/// assert_eq!(again.kind(), OutcomeKind::Duplicate);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome<R, X> {
    /// The command was applied and committed durably.
    Applied {
        /// The handler's reply.
        reply: R,
        /// The entity's revision after the change.
        revision: u64,
    },
    /// The message id was processed before; nothing ran again. `first` is what the first
    /// processing recorded.
    Duplicate {
        /// The stored result of the first processing.
        first: Recorded<R, X>,
    },
    /// The message's version was not greater than the entity's; dropped and recorded.
    Stale {
        /// The entity's version.
        current: u64,
    },
    /// The handler returned a permanent error; nothing changed; never retried.
    Rejected {
        /// The error.
        error: X,
    },
    /// Every attempt failed; the message is in the dead-letter store, where it can be
    /// listed, requeued or purged.
    DeadLettered {
        /// The last error, as text.
        error: String,
        /// Attempts made.
        attempts: u32,
    },
}

/// The kind of an [`Outcome`], without its data: for logs and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// See [`Outcome::Applied`].
    Applied,
    /// See [`Outcome::Duplicate`].
    Duplicate,
    /// See [`Outcome::Stale`].
    Stale,
    /// See [`Outcome::Rejected`].
    Rejected,
    /// See [`Outcome::DeadLettered`].
    DeadLettered,
}

impl OutcomeKind {
    /// The lower-case name used in logs.
    ///
    /// ```
    /// assert_eq!(keystead::OutcomeKind::Stale.as_str(), "stale");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Applied => "applied",
            OutcomeKind::Duplicate => "duplicate",
            OutcomeKind::Stale => "stale",
            OutcomeKind::Rejected => "rejected",
            OutcomeKind::DeadLettered => "dead_lettered",
        }
    }
}

impl<R, X> Outcome<R, X> {
    /// The kind of this outcome.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Applied { .. } => OutcomeKind::Applied,
            Outcome::Duplicate { .. } => OutcomeKind::Duplicate,
            Outcome::Stale { .. } => OutcomeKind::Stale,
            Outcome::Rejected { .. } => OutcomeKind::Rejected,
            Outcome::DeadLettered { .. } => OutcomeKind::DeadLettered,
        }
    }

    /// The reply, if the message (or, for a duplicate, its first processing) was applied.
    pub fn reply(&self) -> Option<&R> {
        match self {
            Outcome::Applied { reply, .. } => Some(reply),
            Outcome::Duplicate {
                first: Recorded::Applied { reply, .. },
            } => Some(reply),
            _ => None,
        }
    }

    /// True for [`Outcome::Duplicate`].
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Outcome::Duplicate { .. })
    }

    /// The first processing's result: the outcome itself, or what a duplicate carries.
    ///
    /// ```
    /// use keystead::{Outcome, Recorded};
    /// let dup: Outcome<u8, String> = Outcome::Duplicate { first: Recorded::Stale { current: 4 } };
    /// assert_eq!(dup.into_first(), Outcome::Stale { current: 4 });
    /// ```
    pub fn into_first(self) -> Outcome<R, X> {
        match self {
            Outcome::Duplicate { first } => Outcome::from(first),
            other => other,
        }
    }
}

impl<R, X> From<Recorded<R, X>> for Outcome<R, X> {
    fn from(recorded: Recorded<R, X>) -> Self {
        match recorded {
            Recorded::Applied { reply, revision } => Outcome::Applied { reply, revision },
            Recorded::Stale { current } => Outcome::Stale { current },
            Recorded::Rejected { error } => Outcome::Rejected { error },
            Recorded::DeadLettered { error, attempts } => Outcome::DeadLettered { error, attempts },
        }
    }
}
