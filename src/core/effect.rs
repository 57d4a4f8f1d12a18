//! The pure record of an effect: what a handler's `ctx.effect(..)` leaves in its context,
//! the outbox record it becomes in the same batch as the state, its identity (the effect
//! key), its status moves, and the errors an executor reports. The workers that run effects
//! (`effects`) build on these; nothing here runs anything.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::core::codec;
use crate::core::keys::{self, Space};
use crate::core::ops::Op;
use crate::core::records::Meta;
use crate::priority::Priority;

/// Why an effect failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EffectError {
    /// A passing condition (timeout, rate limit, service down): retried with backoff and
    /// jitter up to the effect retry policy's limit, then dead-lettered.
    #[error("{0}")]
    Retryable(String),
    /// Bad input or a refusal: recorded as failed, never retried.
    #[error("{0}")]
    Permanent(String),
}

impl EffectError {
    /// A retryable failure.
    ///
    /// ```
    /// assert!(keystead::EffectError::retryable("timeout").is_retryable());
    /// ```
    pub fn retryable(reason: impl fmt::Display) -> Self {
        EffectError::Retryable(reason.to_string())
    }
    /// A permanent failure.
    pub fn permanent(reason: impl fmt::Display) -> Self {
        EffectError::Permanent(reason.to_string())
    }
    /// True for [`EffectError::Retryable`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, EffectError::Retryable(_))
    }
}

/// The stable identity of one effect: the message that recorded it and its position among
/// that message's effects. Its [`Display`](fmt::Display) form is the idempotency key to
/// hand to outside services.
///
/// ```
/// let key = keystead::EffectKey::new("order", "o-42", "pay-1", 0);
/// assert_eq!(key.to_string(), "order/o-42/pay-1/0");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EffectKey {
    /// Entity type that recorded it.
    pub entity: String,
    /// Entity key.
    pub key: String,
    /// The message that recorded it.
    pub message_id: String,
    /// Its index among that message's effects, from 0.
    pub index: u32,
}

impl EffectKey {
    /// An effect key from its parts.
    pub fn new(
        entity: impl Into<String>,
        key: impl Into<String>,
        message_id: impl Into<String>,
        index: u32,
    ) -> Self {
        Self {
            entity: entity.into(),
            key: key.into(),
            message_id: message_id.into(),
            index,
        }
    }
}

impl fmt::Display for EffectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.entity, self.key, self.message_id, self.index
        )
    }
}

/// What an executor knows about the effect it performs.
#[derive(Debug, Clone)]
pub struct EffectContext {
    pub(crate) key: EffectKey,
    pub(crate) correlation_id: String,
    pub(crate) attempt: u32,
    /// The runtime, weakly and type-erased: [`EffectContext::runtime`] (in the runtime's
    /// module) turns it into a handle.
    pub(crate) runtime: Option<std::sync::Weak<dyn std::any::Any + Send + Sync>>,
}

impl EffectContext {
    /// The idempotency key to hand to the outside service.
    pub fn effect_key(&self) -> &EffectKey {
        &self.key
    }
    /// The correlation id of the message that recorded the effect.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
    /// The attempt number, from 1 (attempts count across restarts).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// Where an effect is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EffectStatus {
    /// Committed, waiting for its turn (or for its next attempt).
    Pending,
    /// Being performed (after a crash, a running effect runs again with the same key).
    Running,
    /// Performed.
    Done,
    /// Failed permanently; not retried.
    Failed,
    /// Every attempt failed; can be requeued.
    DeadLettered,
    /// Replaced, before it started, by a newer effect of the same coalescing type for the
    /// same entity ([`Effect::COALESCE`](crate::Effect::COALESCE)); never run. Its
    /// `last_error` names the effect that replaced it. (Appended last: records written
    /// before it existed still decode.)
    Superseded,
}

impl EffectStatus {
    /// The allowed moves, in one place. Requeue moves a dead letter back to pending.
    pub(crate) fn can_move_to(self, next: EffectStatus) -> bool {
        use EffectStatus::*;
        matches!(
            (self, next),
            (Pending, Running)
                | (Running, Running) // a crash left it running: it runs again
                | (Running, Pending)
                | (Running, Done)
                | (Running, Failed)
                | (Running, DeadLettered)
                | (DeadLettered, Pending)
                | (Pending, Superseded)
        )
    }

    pub(crate) fn finished(self) -> bool {
        matches!(
            self,
            EffectStatus::Done
                | EffectStatus::Failed
                | EffectStatus::DeadLettered
                | EffectStatus::Superseded
        )
    }
}

/// An effect's stored record, as returned by the status queries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EffectInfo {
    /// Its identity and idempotency key.
    pub effect_key: EffectKey,
    /// The effect type's name.
    pub name: String,
    /// Where it is.
    pub status: EffectStatus,
    /// Attempts started so far.
    pub attempts: u32,
    /// The last error, if an attempt failed; for a superseded effect, the key of the
    /// effect that replaced it.
    pub last_error: Option<String>,
    /// The correlation id of the message that recorded it.
    pub correlation_id: String,
    /// When it was recorded, ms since the epoch.
    pub created_at_ms: u64,
    /// When its status last changed, ms since the epoch.
    pub updated_at_ms: u64,
}

/// The stored form: the public info plus what running it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EffectRecord {
    pub info: EffectInfo,
    pub independent: bool,
    pub payload: Vec<u8>,
}

/// An effect as recorded by a handler, before commit.
#[derive(Debug)]
pub(crate) struct Recorded {
    pub name: &'static str,
    pub origin: &'static str,
    pub independent: bool,
    pub coalesce: bool,
    pub index: u32,
    pub payload: Result<Vec<u8>, String>,
}

/// The outbox key of effect `index` of a message committed with outbox sequence `seq`, in
/// lane `lane` (the lane of the message that recorded it). The lane byte comes last, so one
/// entity's effects stay in recorded order whatever their lanes.
pub(crate) fn outbox_key(
    space: Space,
    entity: &str,
    key: &str,
    seq: u64,
    index: u32,
    lane: Priority,
) -> Vec<u8> {
    let mut out = keys::entity_prefix(space, entity, key);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    out.push(lane.index() as u8);
    out
}

/// The lane of an outbox or history key: its last suffix byte, or `Normal` for a key
/// written before lanes (a 12-byte suffix).
pub(crate) fn effect_lane(space: Space, key: &[u8]) -> Priority {
    keys::parse(space, key)
        .and_then(|p| match p.suffix.len() {
            13 => Priority::from_index(p.suffix[12]),
            _ => None,
        })
        .unwrap_or_default()
}

/// The outbox sequence and effect index of the outbox entry `outbox_key`; `None` for a
/// malformed key.
pub(crate) fn outbox_position_of(outbox_key: &[u8]) -> Option<(u64, u32)> {
    keys::outbox_position(keys::parse(Space::Outbox, outbox_key)?.suffix)
}

/// Where the outbox entry `outbox_key` goes in the effect history once it has finished
/// (the same key in keyspace `X`).
pub(crate) fn history_key_of(outbox_key: &[u8]) -> Vec<u8> {
    let mut history_key = outbox_key.to_vec();
    if let Some(space) = history_key.first_mut() {
        *space = Space::EffectHistory as u8;
    }
    history_key
}

/// The outbox lane index entry of the outbox entry `outbox_key`, in lane `lane`; `None` for
/// a malformed key.
pub(crate) fn outbox_index_of(lane: Priority, outbox_key: &[u8]) -> Option<Vec<u8>> {
    let (seq, index) = outbox_position_of(outbox_key)?;
    Some(keys::outbox_index(lane, seq, index))
}

/// The writes that put a message's effects in the outbox, in the message's lane, each with
/// its outbox lane index entry when `indexed` (see `Stamp::index_effects`).
pub(crate) fn outbox_ops(
    entity: &str,
    key: &str,
    meta: &Meta,
    (seq, lane): (u64, Priority),
    effects: &[Recorded],
    now_ms: u64,
    indexed: bool,
) -> Result<Vec<Op>, String> {
    effects
        .iter()
        .map(|e| {
            let payload = e.payload.clone()?;
            let record = EffectRecord {
                info: EffectInfo {
                    effect_key: EffectKey::new(entity, key, meta.message_id.clone(), e.index),
                    name: e.name.to_string(),
                    status: EffectStatus::Pending,
                    attempts: 0,
                    last_error: None,
                    correlation_id: meta.correlation_id.clone(),
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                },
                independent: e.independent,
                payload,
            };
            let outbox_key = outbox_key(Space::Outbox, entity, key, seq, e.index, lane);
            let index = indexed
                .then(|| Op::Put(keys::outbox_index(lane, seq, e.index), outbox_key.clone()));
            Ok([Some(Op::Put(outbox_key, codec::encode(&record)?)), index])
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|ops| ops.into_iter().flatten().flatten().collect())
}

/// The message id of an effect's feedback: derived from the effect key, so feedback from a
/// repeated run is a duplicate.
pub(crate) fn feedback_id(key: &EffectKey) -> String {
    format!("effect:{key}")
}
