//! Errors, one enum per boundary: opening a runtime ([`OpenError`]), submitting a message
//! ([`SubmitError`]), operator actions ([`AdminError`]), the store ([`StoreError`]) and decoding
//! stored bytes ([`DecodeError`]).
//!
//! An expected result is not an error: a duplicate, a stale message, a rejection by the
//! handler and a dead-lettered message are [`Outcome`](crate::Outcome)s. Every variant that
//! concerns one entity names its type and key, and every message says what to do.

use crate::priority::{BacklogKind, Priority};
use std::io;
use std::path::PathBuf;

/// Stored bytes that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The stored value is empty.
    #[error("stored {what} is empty; the record is damaged, restore it or delete it")]
    Empty {
        /// The record kind (state, dedup, inbox, dead letter, command).
        what: &'static str,
    },
    /// The stored value starts with a format version this release does not know.
    #[error("stored {what} has format version {found}, this release reads version {supported}; open it with the release that wrote it")]
    UnknownFormat {
        /// The record kind.
        what: &'static str,
        /// The version byte found.
        found: u8,
        /// The version this release reads.
        supported: u8,
    },
    /// The bytes do not decode as the expected type.
    #[error("stored {what} does not decode ({reason}); was it written by an incompatible type? restore it or migrate it")]
    Malformed {
        /// The record kind.
        what: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// Bytes remain after the value.
    #[error("stored {what} has {extra} unexpected trailing bytes; was it written by an incompatible type?")]
    TrailingBytes {
        /// The record kind.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
}

/// A failure of the storage engine or of the commit path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The disk or the database reported an error (full disk, read-only directory, I/O error).
    #[error("storage failed during {op}: {source}; check disk space and permissions, then retry")]
    Io {
        /// What keystead was doing.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The database reported corruption.
    #[error("the database reports corruption during {op}: {detail}; restore the directory from a backup")]
    Corrupt {
        /// What keystead was doing.
        op: &'static str,
        /// The database's description.
        detail: String,
    },
    /// The commit path has stopped (the runtime is shutting down).
    #[error("the commit path is closed; the runtime is shutting down, open it again")]
    Closed,
    /// An earlier commit failed (for example on a full disk), so this runtime writes nothing
    /// more: sled cannot be trusted to flush after an I/O error, and a flush on a broken
    /// database can block every sled database in the process. Accepted messages are safe.
    #[error("the store stopped writing after an earlier failure ({first_error}); fix the disk, then restart the process and reopen the runtime: accepted messages are kept")]
    Poisoned {
        /// The first failure.
        first_error: String,
    },
    /// The commit queue is full: more writes are waiting than the runtime admits.
    #[error("the commit queue is full; retry, or raise RuntimeBuilder::in_flight_max")]
    Busy,
}

impl StoreError {
    /// True when the same operation may succeed later (an I/O error can clear; corruption and a
    /// closed runtime do not clear by waiting).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Busy)
    }

    /// A copy for each caller of a failed group commit (an `io::Error` is not `Clone`).
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Io { op, source } => StoreError::Io {
                op,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::Corrupt { op, detail } => StoreError::Corrupt {
                op,
                detail: detail.clone(),
            },
            StoreError::Closed => StoreError::Closed,
            StoreError::Busy => StoreError::Busy,
            StoreError::Poisoned { first_error } => StoreError::Poisoned {
                first_error: first_error.clone(),
            },
        }
    }
}

/// Opening a runtime failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A setting is out of range.
    #[error("invalid setting {setting}: {reason}")]
    InvalidConfig {
        /// The builder method concerned.
        setting: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// Two entity types were registered under the same name, or a name is unusable.
    #[error("entity type name {name:?} is not usable: {reason}")]
    EntityName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Another process (or another runtime in this process) has the database open.
    #[error("the database at {path:?} is already open elsewhere ({detail}); stop the other runtime or process, or choose another directory")]
    Locked {
        /// The directory.
        path: PathBuf,
        /// The lock error.
        detail: String,
    },
    /// The directory could not be created, read or written.
    #[error("cannot use the directory {path:?}: {source}; check that it exists, is writable and the disk has room")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The database could not be opened or scanned.
    #[error("cannot open the database at {path:?}: {source}")]
    Store {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: StoreError,
    },
    /// The directory holds data in a layout this release does not read.
    #[error("the database at {path:?} has layout {found:?}, this release reads {expected:?}; open it with the release that wrote it")]
    Layout {
        /// The directory.
        path: PathBuf,
        /// The layout found.
        found: String,
        /// The layout this release reads.
        expected: String,
    },
    /// The directory was created by another storage engine.
    #[error("the database at {path:?} was created by the {found} backend, but this runtime uses {requested}; open it with RuntimeBuilder::backend for {found}, or choose another directory")]
    WrongBackend {
        /// The directory.
        path: PathBuf,
        /// The engine that created it (from its `keystead.backend` file or its files).
        found: String,
        /// The engine this runtime was built with.
        requested: &'static str,
    },
    /// The directory holds files but no keystead database: keystead creates its database
    /// only in a new or empty directory, so that it never mistakes, or removes, what it
    /// did not write.
    #[error("the directory {path:?} is not empty ({found:?} is not keystead's) and holds no keystead database; give keystead a new or empty directory of its own")]
    NotEmpty {
        /// The directory.
        path: PathBuf,
        /// The first entry that is not keystead's.
        found: String,
    },
    /// The chosen storage engine is not compiled into this build.
    #[error(
        "the {backend} backend is not compiled in; enable keystead's `{feature}` cargo feature"
    )]
    BackendNotBuilt {
        /// The engine asked for.
        backend: &'static str,
        /// The cargo feature that builds it.
        feature: &'static str,
    },
    /// The runtime's threads could not be started.
    #[error("cannot start the runtime's threads: {0}")]
    Threads(String),
}

impl AdminError {
    /// The admin form of a refusal the runtime gives before any work starts: an unregistered
    /// type or an invalid key keep their reason; anything else means the runtime is gone.
    pub(crate) fn from_refusal(refusal: SubmitError) -> Self {
        match refusal {
            SubmitError::NotRegistered { entity } => AdminError::NotRegistered { entity },
            SubmitError::InvalidKey { entity, reason } => AdminError::InvalidKey { entity, reason },
            _ => AdminError::Closed,
        }
    }
}

/// Submitting a message with `ask` or `tell` failed. Nothing was acknowledged unless the
/// variant says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The runtime was shut down or dropped.
    #[error("the runtime is closed; open it again to send to {entity} {key:?}")]
    Closed {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
    },
    /// The entity type was not registered with the runtime.
    #[error("entity type {entity} is not registered; call RuntimeBuilder::register::<{entity}>() before open()")]
    NotRegistered {
        /// Entity type.
        entity: &'static str,
    },
    /// The key is empty or too long.
    #[error("invalid key for {entity}: {reason}")]
    InvalidKey {
        /// Entity type.
        entity: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The message id is empty or too long.
    #[error("invalid message id for {entity} {key:?}: {reason}")]
    InvalidMessageId {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The encoded command is larger than the configured limit.
    #[error("command for {entity} {key:?} is {size} bytes, over the limit of {max}; send a reference to the data instead, or raise RuntimeBuilder::message_size_max")]
    TooLarge {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The command, reply or error could not be encoded.
    #[error(
        "cannot encode a value for {entity} {key:?}: {reason}; check its Serialize implementation"
    )]
    Encode {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// The encoder's message.
        reason: String,
    },
    /// `expected_revision` did not match: nothing changed.
    #[error("{entity} {key:?} changed: expected revision {expected}, found {actual}; reload it and retry")]
    Conflict {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// The revision the caller expected.
        expected: u64,
        /// The entity's current revision.
        actual: u64,
    },
    /// The entity's stored state (or a stored reply) does not decode; the message was not
    /// applied and stays recoverable.
    #[error("{entity} {key:?}: {source}")]
    Decode {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// What failed to decode.
        #[source]
        source: DecodeError,
    },
    /// The store failed; nothing was acknowledged.
    #[error("{entity} {key:?}: {source}")]
    Storage {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The message's lane holds its limit of pending work (and, for
    /// [`WhenFull::Block`](crate::WhenFull::Block), still did at the deadline): in the
    /// inbox, for a `tell`; in the outbox, for an `ask` whose handler recorded effects
    /// that did not fit. Nothing was written; the command is given back
    /// ([`SubmitError::into_command`]).
    #[error("{backlog} lane {lane} is full for {entity} {key:?}: {pending} of {pending_max} {}, {pending_bytes} of {pending_bytes_max} bytes pending; send it again later, mark refreshable work sheddable, or raise RuntimeBuilder::{}", backlog.items(), backlog.setting())]
    Overloaded {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// Which backlog was full.
        backlog: BacklogKind,
        /// The lane.
        lane: Priority,
        /// Items pending in the lane (messages in the inbox, effects in the outbox).
        pending: u64,
        /// The lane's item limit.
        pending_max: u64,
        /// Bytes pending in the lane (encoded messages in the inbox, effect payloads in
        /// the outbox).
        pending_bytes: u64,
        /// The lane's byte limit.
        pending_bytes_max: u64,
        /// The refused command, to take back with [`SubmitError::into_command`].
        command: Returned,
    },
    /// The runtime stopped before the reply arrived. The message may or may not have been
    /// applied: send it again with the same message id to learn its outcome.
    #[error("no reply from {entity} {key:?} for message {message_id:?}: the runtime stopped; send it again with the same message id")]
    ReplyLost {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// The id to resend with.
        message_id: String,
    },
    /// A transaction cannot run as declared (its members, or an expected revision of an
    /// entity that is not a member): fix the declaration.
    #[error("transaction {transaction} cannot run: {reason}")]
    InvalidTransaction {
        /// The transaction's name.
        transaction: &'static str,
        /// Why.
        reason: String,
    },
    /// [`Answers::take`](crate::Answers::take) was given an answer that is not from its
    /// batch, or whose result was taken already: read each answer once, from its own batch.
    #[error(
        "answer {position} is not in this batch's answers (taken already, or from another batch)"
    )]
    NoSuchAnswer {
        /// The answer's position.
        position: usize,
    },
}

impl SubmitError {
    /// The same error, with `command` as the work an [`SubmitError::Overloaded`] gives back
    /// (other errors are returned as they are).
    pub(crate) fn giving_back(self, command: Returned) -> Self {
        match self {
            SubmitError::Overloaded {
                entity,
                key,
                backlog,
                lane,
                pending,
                pending_max,
                pending_bytes,
                pending_bytes_max,
                command: _,
            } => SubmitError::Overloaded {
                entity,
                key,
                backlog,
                lane,
                pending,
                pending_max,
                pending_bytes,
                pending_bytes_max,
                command,
            },
            other => other,
        }
    }

    /// True when sending the same message again (same id) may succeed without changes.
    ///
    /// ```
    /// let e = keystead::SubmitError::NotRegistered { entity: "order" };
    /// assert!(!e.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            SubmitError::Storage { source, .. } => source.is_retryable(),
            SubmitError::ReplyLost { .. } | SubmitError::Overloaded { .. } => true,
            _ => false,
        }
    }

    /// The command a refusal gave back: `Some` for [`SubmitError::Overloaded`] when `C` is
    /// the entity's command type.
    ///
    /// ```
    /// # use keystead::{Context, Entity, Failure, FailureKind, LaneLimits, Priority, Runtime, SubmitError, WhenFull};
    /// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
    /// # #[error("never")] struct Never;
    /// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
    /// # struct Counter;
    /// # impl Entity for Counter {
    /// #     const NAME: &'static str = "counter";
    /// #     type State = u64; type Command = u64; type Reply = u64; type Error = Never;
    /// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Never> { *s += c; Ok(*s) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// // A lane that holds no pending work at all refuses every tell.
    /// let rt = Runtime::builder(dir.path())
    ///     .lane_limits(Priority::Low, LaneLimits::new(0, 0).when_full(WhenFull::Reject))
    ///     .register::<Counter>()
    ///     .open()?;
    /// let refused = rt.entity::<Counter>("c").tell(7).priority(Priority::Low).await.unwrap_err();
    /// assert!(refused.is_retryable());
    /// assert_eq!(refused.into_command::<u64>(), Some(7));
    /// # rt.shutdown().await; Ok(()) }
    /// ```
    pub fn into_command<C: 'static>(self) -> Option<C> {
        match self {
            SubmitError::Overloaded { command, .. } => command.take::<C>(),
            _ => None,
        }
    }
}

/// A command given back by a refusal, typed away so that [`SubmitError`] stays one type
/// for every entity. Take it back with [`SubmitError::into_command`].
pub struct Returned(parking_lot::Mutex<Option<Box<dyn std::any::Any + Send>>>);

impl Returned {
    pub(crate) fn new<C: Send + 'static>(command: C) -> Self {
        Self(parking_lot::Mutex::new(Some(Box::new(command))))
    }

    fn take<C: 'static>(self) -> Option<C> {
        let command = self.0.into_inner()?;
        command.downcast::<C>().ok().map(|c| *c)
    }
}

impl std::fmt::Debug for Returned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Returned(..)")
    }
}

/// An operator action (dead letters, dedup purge) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The runtime was shut down or dropped.
    #[error("the runtime is closed; open it again")]
    Closed,
    /// The entity type was not registered with the runtime.
    #[error("entity type {entity} is not registered; call RuntimeBuilder::register::<{entity}>() before open()")]
    NotRegistered {
        /// Entity type.
        entity: &'static str,
    },
    /// The entity key is empty or too long (the same rule as for `ask` and `tell`).
    #[error("invalid key for {entity}: {reason}")]
    InvalidKey {
        /// Entity type.
        entity: &'static str,
        /// What is wrong with the key and what is accepted.
        reason: String,
    },
    /// The store failed.
    #[error("{0}")]
    Storage(#[from] StoreError),
    /// A stored record does not decode.
    #[error("{entity} {key:?}: {source}")]
    Decode {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// What failed.
        #[source]
        source: DecodeError,
    },
    /// The runtime stopped before the action completed; it may have taken effect.
    #[error(
        "the runtime stopped before the action on {entity} {key:?} completed; check and retry"
    )]
    Interrupted {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
    },
    /// A requeue would put the lane over its limit; nothing changed (the message stays
    /// where it was).
    #[error("{backlog} lane {lane} is full ({pending} of {pending_max} {} pending); requeue {entity} {key:?} once it drains, or raise RuntimeBuilder::{}", backlog.items(), backlog.setting())]
    Overloaded {
        /// Entity type.
        entity: &'static str,
        /// Entity key.
        key: String,
        /// Which backlog was full (the inbox for a message, the outbox for an effect).
        backlog: BacklogKind,
        /// The lane.
        lane: Priority,
        /// Messages pending in the lane.
        pending: u64,
        /// The lane's limit.
        pending_max: u64,
    },
}
