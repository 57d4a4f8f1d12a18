//! What every part of the runtime shares: the settings fixed at open, the clock, the
//! counters, the sequence counter, and the key rule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::core::hash::shard_of;
use crate::core::keys::{self, ENTITY_KEY_LEN_MAX};
use crate::error::SubmitError;
use crate::priority::Priority;
use crate::retry::RetryPolicy;
use crate::telemetry::Stats;

use crate::runtime::backlog::{Backlog, LaneFeed};

/// Settings fixed at open.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub retry: RetryPolicy,
    pub dedup_retention: Duration,
    pub dedup_purge_every: Duration,
    pub passivate_after: Duration,
    pub message_size_max: usize,
    pub in_flight_max: usize,
    /// The number of shards (the lane index is kept per shard).
    pub shards: usize,
    /// Slots one entity may hold of its shard's `in_flight_max`.
    pub entity_in_flight_max: usize,
    /// Grants a waiting lane may be passed over by before it is promoted.
    pub lane_promote_after: u32,
    pub log_payloads: bool,
    /// Entity types whose applied changes go to the change feed.
    pub feeds: std::collections::HashSet<&'static str>,
    /// Change feed records kept beyond the slowest consumer (or, with none, at all)
    /// before the feed warns that it is held back.
    pub feed_retention: u64,
}

/// State shared by the runtime's parts.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub stats: Stats,
    pub(crate) seq: AtomicU64,
    /// Messages pending in the inbox, per lane.
    pub backlog: Backlog,
    /// Effects pending in the outbox, per lane (the lane each was recorded in).
    pub outbox: Backlog,
    /// Per shard, per lane: the signals to its lane feeder.
    pub feeds: Vec<[LaneFeed; 4]>,
    /// Per shard: bumped after every commit that adds an inbox entry there, so an actor
    /// that found its inbox empty knows when it must look again.
    pub inbox_generations: Vec<AtomicU64>,
    /// The runtime itself, weakly and type-erased (set once at open), for the handles that
    /// lower layers hand out (an effect executor's `EffectContext::runtime`).
    pub runtime: std::sync::OnceLock<std::sync::Weak<dyn std::any::Any + Send + Sync>>,
}

impl Shared {
    /// The next inbox/outbox sequence number. Starts above every sequence ever committed
    /// (the store's high-water mark and the inbox), so new keys never reuse an old one and
    /// sort after recovered entries. Commit it with `Store::commit_with_seq`.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Tells the feeder of lane `lane` of entity (`entity`, `key`)'s shard that an entry
    /// with sequence `seq` is in its index (after the commit that wrote it).
    pub(crate) fn accepted(&self, entity: &str, key: &str, lane: Priority, seq: u64) {
        self.accepted_on(shard_of(entity, key, self.config.shards), lane, seq);
    }

    /// [`Shared::accepted`] for a caller that knows the shard (an entity actor).
    pub(crate) fn accepted_on(&self, shard: usize, lane: Priority, seq: u64) {
        self.inbox_generations[shard].fetch_add(1, Ordering::AcqRel);
        self.feeds[shard][lane.index()].accepted(seq, &self.stats);
    }

    /// An inbox entry of entity (`entity`, `key`) was committed without a lane index entry
    /// (it is handed to the entity directly): only the shard's inbox generation moves.
    pub(crate) fn inbox_written(&self, entity: &str, key: &str) {
        let shard = shard_of(entity, key, self.config.shards);
        self.inbox_generations[shard].fetch_add(1, Ordering::AcqRel);
    }

    /// The inbox generation of shard `shard` (see `inbox_generations`).
    pub(crate) fn inbox_generation(&self, shard: usize) -> u64 {
        self.inbox_generations[shard].load(Ordering::Acquire)
    }

    /// The shard of entity (`entity`, `key`).
    pub(crate) fn shard_of(&self, entity: &str, key: &str) -> usize {
        shard_of(entity, key, self.config.shards)
    }

    /// The lane index key of an inbox entry of entity (`entity`, `key`).
    pub(crate) fn lane_index(&self, entity: &str, key: &str, lane: Priority, seq: u64) -> Vec<u8> {
        keys::lane_index(shard_of(entity, key, self.config.shards), lane, seq)
    }
}

/// Validates an entity key.
pub(crate) fn check_key(entity: &'static str, key: &str) -> Result<(), SubmitError> {
    let reason = if key.is_empty() {
        "the key is empty; give every entity a non-empty key".to_string()
    } else if key.len() > ENTITY_KEY_LEN_MAX {
        format!(
            "the key is {} bytes, the limit is {ENTITY_KEY_LEN_MAX}",
            key.len()
        )
    } else {
        return Ok(());
    };
    Err(SubmitError::InvalidKey { entity, reason })
}
