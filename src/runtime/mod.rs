//! The runtime: opening the store, starting the shards, recovering the inbox, admitting
//! messages, and shutting down.
//!
//! Layers, lowest first (each imports only modules listed before it):
//! - [`backlog`]: per lane, the durable work pending and the signals to the lane feeders;
//! - [`shared`]: settings, clock, counters, the backlog, the key rule;
//! - [`admission`]: each shard's gate in lanes, and the tickets it hands out;
//! - [`mail`]: the messages between the parts;
//! - [`actor`]: one entity's home;
//! - [`supervisor`]: one shard, which starts and routes to its entities' actors;
//! - [`inner`]: the shards, the registry, the store and the effect workers together;
//! - [`delayed`]: delayed messages waiting for their due time (accept, cancel, fire);
//! - [`address`]: typed entity addresses;
//! - `batch`: many tells in one atomic write, many asks in one global order;
//! - `listing`: listing an entity type's keys and reading many states at once;
//! - `transaction`: atomic multi-entity commands (hold, evaluate, commit, release);
//! - `feeder`: per shard and lane, moves work from the durable inbox into admission;
//! - `purge`: background removal of expired dedup records;
//! - `handle`: the `Runtime` handle (entity addresses, stats, operator reads, closing);
//! - `builder`: the `RuntimeBuilder`, which opens the store and starts everything.

pub(crate) mod actor;
pub(crate) mod address;
pub(crate) mod admission;
pub(crate) mod backlog;
pub(crate) mod batch;
mod builder;
pub(crate) mod delayed;
pub(crate) mod feed;
mod feeder;
mod handle;
pub(crate) mod inner;
mod listing;
pub(crate) mod mail;
mod purge;
pub(crate) mod shared;
pub(crate) mod supervisor;
pub(crate) mod transaction;

pub use address::RuntimeHandle;
pub use batch::{
    Answer, Answers, AskBatch, BatchError, TellBatch, BATCH_BYTES_MAX, BATCH_MESSAGES_MAX,
};
pub use builder::RuntimeBuilder;
pub use feed::{Change, Consumer, Feed, Start, FEED_CONSUMER_NAME_MAX};
pub use handle::Runtime;
pub use listing::{Listed, Listing, Page, LIST_PAGE_MAX};
pub use transaction::{Transact, TxOutcome};
