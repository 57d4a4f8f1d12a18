//! One write of an atomic commit, as a value: the core describes the writes, the store
//! applies them.

/// One write in a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Insert or overwrite.
    Put(Vec<u8>, Vec<u8>),
    /// Remove (a missing key is fine).
    Delete(Vec<u8>),
    /// Append a record to the change feed: the committer gives it the next feed sequence,
    /// in commit order, and writes it as a `Put` (the engines never see an `Append`).
    Append(Vec<u8>),
}
