//! Dead letters (messages whose attempts ran out, kept with their last error) and shed
//! messages (sheddable `tell`s a full lane refused), as listed for an operator, who can
//! requeue (same id) or purge them.

use crate::core::codec;
use crate::core::keys::{self, Space};
use crate::core::records::{DeadLetterRecord, ShedRecord};
use crate::entity::Entity;
use crate::error::{AdminError, DecodeError};
use crate::priority::Priority;

/// The entity key of a stored record of keyspace `space`, and the record decoded.
fn read<E: Entity, R: serde::de::DeserializeOwned>(
    space: Space,
    what: &'static str,
    key: &[u8],
    value: &[u8],
) -> Result<(String, R), AdminError> {
    let entity_key = keys::parse(space, key).map_or_else(String::new, |p| p.key.to_string());
    let record = codec::decode(what, value).map_err(|source| AdminError::Decode {
        entity: E::NAME,
        key: entity_key.clone(),
        source,
    })?;
    Ok((entity_key, record))
}

/// One dead letter of entity type `E`, as listed by
/// [`Runtime::dead_letters`](crate::Runtime::dead_letters).
#[derive(Debug)]
#[non_exhaustive]
pub struct DeadLetter<E: Entity> {
    /// The entity key.
    pub key: String,
    /// The message id (kept on requeue).
    pub message_id: String,
    /// The correlation id.
    pub correlation_id: String,
    /// The source version the message carried, if any.
    pub version: Option<u64>,
    /// The command, or why it does not decode (a command kept from an incompatible type).
    pub command: Result<E::Command, DecodeError>,
    /// The last error, as text.
    pub error: String,
    /// Attempts made (0 for an inbox entry that could not even be decoded).
    pub attempts: u32,
    /// When the message was accepted, ms since the epoch.
    pub accepted_at_ms: u64,
    /// When the first attempt failed.
    pub first_failed_at_ms: u64,
    /// When the last attempt failed.
    pub last_failed_at_ms: u64,
}

impl<E: Entity> DeadLetter<E> {
    pub(crate) fn from_stored(key: &[u8], value: &[u8]) -> Result<Self, AdminError> {
        let (entity_key, record): (String, DeadLetterRecord) =
            read::<E, _>(Space::DeadLetter, "dead letter", key, value)?;
        Ok(Self {
            key: entity_key,
            message_id: record.meta.message_id,
            correlation_id: record.meta.correlation_id,
            version: record.meta.version,
            command: codec::decode("command", &record.command),
            error: record.error,
            attempts: record.attempts,
            accepted_at_ms: record.meta.accepted_at_ms,
            first_failed_at_ms: record.first_failed_at_ms,
            last_failed_at_ms: record.last_failed_at_ms,
        })
    }
}

/// One shed message of entity type `E`: a sheddable `tell` its full lane refused, kept until
/// requeued ([`EntityRef::requeue_shed`](crate::EntityRef::requeue_shed)) or purged. Listed by
/// [`Runtime::shed`](crate::Runtime::shed).
#[derive(Debug)]
#[non_exhaustive]
pub struct Shed<E: Entity> {
    /// The entity key.
    pub key: String,
    /// The message id (kept on requeue).
    pub message_id: String,
    /// The correlation id.
    pub correlation_id: String,
    /// The source version the message carried, if any.
    pub version: Option<u64>,
    /// The lane it was sent in (and goes back to).
    pub lane: Priority,
    /// The command, or why it does not decode.
    pub command: Result<E::Command, DecodeError>,
    /// When it was sent, ms since the epoch.
    pub accepted_at_ms: u64,
    /// When it was shed.
    pub shed_at_ms: u64,
}

impl<E: Entity> Shed<E> {
    pub(crate) fn from_stored(key: &[u8], value: &[u8]) -> Result<Self, AdminError> {
        let (entity_key, record): (String, ShedRecord) =
            read::<E, _>(Space::Shed, "shed message", key, value)?;
        Ok(Self {
            key: entity_key,
            message_id: record.meta.message_id,
            correlation_id: record.meta.correlation_id,
            version: record.meta.version,
            lane: Priority::from_index(record.lane).unwrap_or_default(),
            command: codec::decode("command", &record.command),
            accepted_at_ms: record.meta.accepted_at_ms,
            shed_at_ms: record.shed_at_ms,
        })
    }
}
