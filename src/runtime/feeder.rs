//! The lane feeders: one per shard and lane, each moving that lane's durable work from the
//! inbox into admission.
//!
//! `tell` writes an inbox entry and, in the same batch, its lane index entry
//! (`Q/<shard>/<lane>/<seq>`, holding the inbox key), then signals the feeder. The feeder reads
//! its lane index in order and, for each entity found, waits for a slot of the shard's gate
//! in its lane (so `Critical` work and a starving `Low` lane are let in as admission says)
//! and sends the entity a `Drain`, which processes the entity's inbox in sequence order. So
//! a backlog of any size waits on disk: memory holds one waiting slot per feeder, at most
//! 64 index entries being read, and one record per entity being drained.
//!
//! An entity being drained is not woken twice: the feeder notes that more came for it, and
//! the drain's ticket, when released, asks its lane's feeder to wake it again. Commits can
//! land out of sequence order, so each signal carries its sequence and the feeder rewinds to
//! the lowest one before its next pass. At open every feeder reads its whole lane once: that
//! is how the inbox left by a crash is recovered.

use std::sync::{Arc, Weak};

use crate::core::keys::{self, Space};
use crate::error::StoreError;
use crate::priority::Priority;
use crate::runtime::admission::{self, Draining, Gate};
use crate::runtime::inner::Inner;
use crate::runtime::shared::Shared;
use crate::store::{Entry, Store};

/// How many lane index entries a feeder reads per pass.
const READ_MAX: usize = 64;

/// Starts the feeders of shard `shard`, one per lane, on that shard's arbiter.
pub(crate) fn start(inner: &Arc<Inner>, shard: usize, arbiter: &actix::ArbiterHandle) -> bool {
    let draining = inner.shards[shard].draining.clone();
    Priority::ALL.iter().all(|&lane| {
        let feeder = Feeder {
            inner: Arc::downgrade(inner),
            shared: inner.shared.clone(),
            store: inner.store.clone(),
            gate: inner.shards[shard].gate.clone(),
            draining: draining.clone(),
            shard,
            lane,
        };
        arbiter.spawn(feeder.run())
    })
}

struct Feeder {
    inner: Weak<Inner>,
    shared: Arc<Shared>,
    store: Arc<Store>,
    gate: Arc<Gate>,
    draining: Draining,
    shard: usize,
    lane: Priority,
}

impl Feeder {
    async fn run(self) {
        let prefix = keys::lane_index_prefix(self.shard, self.lane);
        let feed = &self.shared.feeds[self.shard][self.lane.index()];
        let mut next = prefix.clone();
        loop {
            let pass = feed.begin();
            if let Some(seq) = pass.rewind {
                let rewind = keys::lane_index(self.shard, self.lane, seq);
                if rewind < next {
                    next = rewind;
                }
            }
            let mut found = !pass.rewake.is_empty();
            for id in pass.rewake {
                if !self.wake(id).await {
                    return;
                }
            }
            let batch = match self.read(&prefix, &next) {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(target: "keystead", shard = self.shard, lane = %self.lane, error = %e,
                        "cannot read the lane index; its messages wait for the next signal or open");
                    Vec::new()
                }
            };
            for (index_key, inbox_key) in batch {
                found = true;
                next = index_key;
                next.push(0);
                let Some(id) = self.entity_of(&inbox_key) else {
                    continue;
                };
                if self.note_more(&id) {
                    continue;
                }
                if !self.wake(id).await {
                    return;
                }
            }
            if self.closed() {
                return;
            }
            if !found {
                feed.caught_up(pass.generation, &self.shared.stats);
                feed.changed().await;
                if self.closed() {
                    return;
                }
            }
        }
    }

    fn closed(&self) -> bool {
        self.inner.upgrade().is_none_or(|inner| inner.is_closed())
    }

    fn read(&self, prefix: &[u8], from: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.store.scan_from(prefix, from)?.take(READ_MAX).collect()
    }

    /// The registered entity an inbox key belongs to; `None` (logged) for a malformed key
    /// or an unregistered type, whose entries stay in the inbox.
    fn entity_of(&self, inbox_key: &[u8]) -> Option<(&'static str, String)> {
        let parsed = keys::parse(Space::Inbox, inbox_key)?;
        let inner = self.inner.upgrade()?;
        let Some((&name, _)) = inner.registry.get_key_value(parsed.entity) else {
            tracing::warn!(target: "keystead", entity = %parsed.entity, key = %parsed.key,
                "inbox entries for an unregistered entity type stay in the inbox; register the type to process them");
            return None;
        };
        Some((name, parsed.key.to_string()))
    }

    /// If entity `id` is being drained, notes that more came for it in this lane (its drain,
    /// once done, asks for another) and returns true.
    fn note_more(&self, id: &(&'static str, String)) -> bool {
        match self.draining.lock().get_mut(id) {
            Some(more) => {
                *more = (*more).max(Some(self.lane));
                true
            }
            None => false,
        }
    }

    /// Waits for a slot in this lane and sends entity `id` a drain of everything accepted so
    /// far, unless another lane's feeder started one meanwhile (an entity is registered as
    /// draining only once it has its slot, so a higher lane is never held up by a lower
    /// lane's wait). False once the runtime is closing.
    async fn wake(&self, id: (&'static str, String)) -> bool {
        let Some(slot) = self.gate.acquire(id.0, &id.1, self.lane).await else {
            return false;
        };
        let Some(inner) = self.inner.upgrade() else {
            return false;
        };
        let (entity, key) = (id.0, id.1.clone());
        let claimed = admission::claim_drain(
            &self.shared,
            &self.draining,
            self.shard,
            id,
            slot,
            Some(self.lane),
        );
        if let Some(ticket) = claimed {
            inner.send_drain(entity, key, ticket);
        }
        true
    }
}
