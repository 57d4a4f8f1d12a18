//! # keystead
//!
//! Race-free entity updates and background jobs inside one binary. Every entity (an order, a
//! customer) has one home: a single actor that owns its state and applies its messages one at
//! a time. A sled database on local disk holds the durable inbox, each entity's state,
//! revision and version, and a dedup store of processed message ids with their stored
//! replies.
//!
//! What that buys, in plain words:
//! - a double-clicked "Pay" or a retry after a timeout that had succeeded returns the first
//!   result (`Duplicate`) instead of running twice;
//! - a late event with an older version is dropped (`Stale`) instead of overwriting newer
//!   truth;
//! - two tabs saving from the same revision: one wins, the other gets `Conflict`;
//! - a `tell` that returned `Ok` is on disk and will be processed, even across a crash;
//! - every message ends with exactly one outcome.
//!
//! ```
//! use keystead::{Context, Entity, Failure, FailureKind, Outcome, Runtime};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! struct Order { paid_cents: u64 }
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! enum OrderCmd { Pay { cents: u64 } }
//!
//! #[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
//! enum OrderError { #[error("already paid")] AlreadyPaid }
//! impl Failure for OrderError {
//!     fn kind(&self) -> FailureKind { FailureKind::Permanent }
//! }
//!
//! struct OrderEntity;
//! impl Entity for OrderEntity {
//!     const NAME: &'static str = "order";
//!     type State = Order;
//!     type Command = OrderCmd;
//!     type Reply = String;
//!     type Error = OrderError;
//!     fn handle(state: &mut Order, cmd: &OrderCmd, ctx: &mut Context<'_>) -> Result<String, OrderError> {
//!         match cmd {
//!             OrderCmd::Pay { cents } if state.paid_cents == 0 => {
//!                 state.paid_cents = *cents;
//!                 Ok(format!("receipt for {} ({})", ctx.key(), ctx.message_id()))
//!             }
//!             OrderCmd::Pay { .. } => Err(OrderError::AlreadyPaid),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let rt = Runtime::builder(dir.path()).register::<OrderEntity>().open()?;
//! let order = rt.entity::<OrderEntity>("o-42");
//!
//! // The user double-clicks "Pay": both requests carry the same idempotency key.
//! let (a, b) = tokio::join!(
//!     order.ask(OrderCmd::Pay { cents: 1999 }).id("pay-o-42"),
//!     order.ask(OrderCmd::Pay { cents: 1999 }).id("pay-o-42"),
//! );
//! let (a, b) = (a?, b?);
//! assert_eq!(a.reply(), b.reply(), "both callers get the same receipt");
//! assert_eq!(order.snapshot().await?.revision, 1, "charged once");
//! rt.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Cargo features:
//! - `fjall`: a second storage engine, chosen with
//!   [`RuntimeBuilder::backend`]`(`[`Backend::Fjall`]`)`. Its flush is an `fdatasync`.
//!   sled, the default, is always built.
//! - `time-zones`: cron schedules in IANA time zones ([`Schedule::time_zone`]), with
//!   chrono-tz's database; without it schedules run in UTC.
//! - `testkit`: the `testkit` module, a seeded chaos harness that runs your entities under
//!   duplicated, reordered and restarted delivery (`docs/testkit.md`).
//!
//! See `docs/architecture.md` for the life of a message and where each guarantee is
//! enforced.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod backend;
mod clock;
mod core;
mod dead_letter;
mod durability;
mod effects;
mod entity;
mod error;
mod ids;
mod outcome;
mod priority;
mod retry;
mod runtime;
mod store;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
mod time;

/// The README's code must compile: it is checked as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use crate::core::codec::FORMAT_VERSION;
pub use crate::core::keys::{ENTITY_KEY_LEN_MAX, ENTITY_NAME_LEN_MAX, MESSAGE_ID_LEN_MAX};
pub use crate::core::limits::{BreakerPolicy, BreakerState, Rate};
pub use crate::core::merge;
pub use crate::core::schedule::Overlap;
pub use crate::core::transaction::{Member, Members, Transaction, TxContext, TX_MEMBERS_MAX};
pub use backend::Backend;
pub use clock::{Clock, ManualClock, Sleep, SystemClock};
pub use dead_letter::{DeadLetter, Shed};
pub use durability::Durability;
pub use effects::{
    AsyncExecutor, Effect, EffectContext, EffectError, EffectInfo, EffectKey, EffectLimits,
    EffectStatus, Executor, Feedback,
};
pub use entity::{Context, Entity, Failure, FailureKind};
pub use error::{AdminError, DecodeError, OpenError, Returned, StoreError, SubmitError};
pub use outcome::{Outcome, OutcomeKind, Recorded};
pub use priority::{BacklogKind, LaneLimits, Priority, WhenFull};
pub use retry::RetryPolicy;
pub use runtime::address::{Accepted, Ask, Cancelled, EntityRef, Snapshot, Tell};
pub use runtime::{
    Answer, Answers, AskBatch, BatchError, Change, Consumer, Feed, Listed, Listing, Page, Runtime,
    RuntimeBuilder, RuntimeHandle, Start, TellBatch, Transact, TxOutcome, BATCH_BYTES_MAX,
    BATCH_MESSAGES_MAX, FEED_CONSUMER_NAME_MAX, LIST_PAGE_MAX,
};
pub use telemetry::{EffectTypeStats, LaneStats, RuntimeStats};
pub use time::{Schedule, ScheduleError, ScheduleStatus, Schedules};
