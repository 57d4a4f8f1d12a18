//! The records keystead stores, one type per keyspace (see [`keys`](crate::core::keys) for where
//! each lives). All are encoded with [`codec`](crate::core::codec), so each starts with the format
//! version byte.

use serde::{Deserialize, Serialize};

use crate::core::schedule::{Overlap, Progress, SpecRecord};
use crate::outcome::Recorded;

/// An entity's state with its revision and version (keyspace `S`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StateRecord<S> {
    // The first three fields are also `StateHeader`: keep them first, in this order.
    /// How many changes have been applied (0 for a new entity).
    pub revision: u64,
    /// The highest source version applied, if any message carried one.
    pub version: Option<u64>,
    /// When the last change was committed, ms since the epoch.
    pub updated_at_ms: u64,
    /// The user's state.
    pub state: S,
}

/// One applied change in the change feed (`F`): what changed and the entity's new state
/// record (revision, version, update time and state, encoded as in `S`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ChangeRecord {
    pub entity: String,
    pub key: String,
    pub message_id: String,
    pub correlation_id: String,
    /// The encoded [`StateRecord`] as committed with this change.
    pub state: Vec<u8>,
}

/// The leading fields of a [`StateRecord`], read without decoding the state (listings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct StateHeader {
    pub revision: u64,
    pub version: Option<u64>,
    pub updated_at_ms: u64,
}

/// What the first processing of a message id produced (keyspace `D`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DedupRecord<R, X> {
    /// When it was recorded, ms since the epoch; retention counts from here.
    pub recorded_at_ms: u64,
    /// The stored result.
    pub outcome: Recorded<R, X>,
}

/// The part of a [`DedupRecord`] the purge reads without knowing the entity's types: the
/// timestamp is the first field, so it decodes from the prefix of any dedup record.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) struct DedupStamp {
    pub recorded_at_ms: u64,
}

/// Everything about a message except its payload, as accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// The idempotency key.
    pub message_id: String,
    /// The correlation id.
    pub correlation_id: String,
    /// The source version, if any.
    pub version: Option<u64>,
    /// When it was accepted, ms since the epoch.
    pub accepted_at_ms: u64,
}

/// A message accepted by `tell` or requeued, waiting for its entity (keyspace `I`). The
/// command is kept as its own encoded bytes so that a command that no longer decodes can be
/// moved to the dead letters intact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InboxRecord {
    pub meta: Meta,
    pub command: Vec<u8>,
}

/// A message whose attempts were exhausted, or whose command could not be decoded
/// (keyspace `L`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeadLetterRecord {
    pub meta: Meta,
    pub command: Vec<u8>,
    /// The last error, as text.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the first attempt failed, ms since the epoch.
    pub first_failed_at_ms: u64,
    /// When the last attempt failed, ms since the epoch.
    pub last_failed_at_ms: u64,
}

/// A sheddable message refused by its full lane, kept until requeued or purged (keyspace
/// `H`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShedRecord {
    pub meta: Meta,
    pub command: Vec<u8>,
    /// The lane it was sent in (`Priority::index`).
    pub lane: u8,
    /// When it was shed, ms since the epoch.
    pub shed_at_ms: u64,
}

/// What the last `prioritise` of an entity raised its effects to (keyspace `R`): effects
/// recorded up to sequence `up_to_seq` wait in lane `lane` at least. Effects recorded later
/// keep their own lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RaiseRecord {
    pub lane: u8,
    pub up_to_seq: u64,
}

/// A delayed message waiting for its due time (keyspace `T`). It holds the inbox entry it
/// becomes when due, already encoded, so firing it copies bytes and decodes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TimerRecord {
    pub entity: String,
    pub key: String,
    /// Its message id (also inside `inbox`; kept here so firing decodes nothing more).
    pub message_id: String,
    /// Its lane (`Priority::index`).
    pub lane: u8,
    /// The encoded `InboxRecord`.
    pub inbox: Vec<u8>,
}

/// A schedule: its definition and its durable progress (keyspace `C`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ScheduleRecord {
    pub name: String,
    /// The entity type its runs are sent to.
    pub entity: String,
    /// The keys each run is sent to.
    pub targets: Vec<String>,
    /// The encoded command.
    pub command: Vec<u8>,
    /// The lane its runs are sent in (`Priority::index`).
    pub lane: u8,
    pub sheddable: bool,
    pub spec: SpecRecord,
    pub jitter_ms: u64,
    pub overlap: Overlap,
    pub buffer_max: u32,
    pub catch_up_window_ms: u64,
    pub catch_up_runs_max: u32,
    pub pause_on_failure: bool,
    pub created_at_ms: u64,
    pub progress: Progress,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::codec::{decode, encode};

    #[test]
    fn dedup_stamp_reads_any_dedup_record() {
        let record: DedupRecord<String, String> = DedupRecord {
            recorded_at_ms: 1234,
            outcome: Recorded::Applied {
                reply: "receipt".into(),
                revision: 3,
            },
        };
        let bytes = encode(&record).expect("encodes");
        // The stamp decodes from a prefix: decode it without the trailing-bytes check.
        let stamp: DedupStamp =
            bincode::serde::decode_from_slice(&bytes[1..], bincode::config::standard())
                .expect("prefix decodes")
                .0;
        assert_eq!(stamp.recorded_at_ms, 1234);
        let back: DedupRecord<String, String> = decode("dedup", &bytes).expect("decodes");
        assert_eq!(back, record);
    }
}
