//! The pure core: what a message does to an entity, as values. Nothing here names actix, a
//! thread, a channel or the disk; the actor shell (`runtime`) and the store (`store`) call it.
//!
//! - [`apply`]: evaluate a message against an entity (dedup, version, revision, handler) and
//!   turn the verdict into the writes of one atomic commit.
//! - [`records`]: the records keystead stores, one type per keyspace.
//! - [`keys`]: the key layout of those keyspaces.
//! - [`codec`]: how records become bytes (a format byte, then bincode), with its limits.
//! - [`hash`]: the stable hashes every layer shares.
//! - [`effect`]: the pure record of an effect (identity, status moves, outbox record).
//! - [`ops`]: one write of an atomic commit, as a value.
//! - [`lanes`]: which priority lane goes next (strict priority, bounded starvation).
//! - [`limits`]: token buckets and the circuit breaker of an effect type, as values.
//! - [`schedule`]: when a schedule's runs are due and what happens to each (pure).
//! - [`merge`]: field-level merge rules for states that several paths write (public as
//!   `keystead::merge`).

pub(crate) mod apply;
pub(crate) mod codec;
pub(crate) mod effect;
pub(crate) mod hash;
pub(crate) mod keys;
pub(crate) mod lanes;
pub(crate) mod limits;
pub mod merge;
pub(crate) mod ops;
pub(crate) mod records;
pub(crate) mod schedule;
pub(crate) mod transaction;
