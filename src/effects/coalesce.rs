//! Coalescing: a message that records an effect of a coalescing type supersedes, in its own
//! atomic batch, the effects of that type for its entity that have not started.
//!
//! The race it must win: a worker may have read such an effect and be about to mark it
//! `Running` (a put of its outbox record) while the message plans to delete it; the put
//! would bring the deleted record back, and the effect would both run and be recorded as
//! superseded. Two small sets per entity, under one short lock (striped by entity, never
//! held across I/O), settle it:
//! - a worker *starting* a coalescing effect marks it current, then reads it again from the
//!   store: gone means superseded (it skips it); a key being superseded is not marked;
//! - a message superseding takes only effects not current, marks them superseding until its
//!   commit has landed (or failed), and then reads each again: one a worker ran and finished
//!   between the message's scan and its marks is gone (or no longer pending) and is left out.
//!
//! Either the worker marked first (the message leaves the effect alone, or finds it
//! finished when it reads it again), or the message did (the worker skips it, or finds it
//! gone once the commit landed).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::core::codec;
use crate::core::effect::{
    effect_lane, history_key_of, outbox_index_of, EffectKey, EffectRecord, EffectStatus,
};
use crate::core::hash::fnv1a;
use crate::core::keys::{self, Space};
use crate::error::StoreError;
use crate::priority::Priority;
use crate::store::Op;
use crate::telemetry::Stats;

use super::workers::Effects;

const STRIPES: usize = 16;

type Id = (String, String);

#[derive(Debug, Default)]
struct Marks {
    /// Coalescing effects a worker is attempting (or about to): never superseded.
    current: HashSet<Vec<u8>>,
    /// Effects a committing message supersedes: no worker starts them.
    superseding: HashSet<Vec<u8>>,
}

impl Marks {
    fn is_empty(&self) -> bool {
        self.current.is_empty() && self.superseding.is_empty()
    }
}

/// The per-entity marks, striped.
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    stripes: [Mutex<HashMap<Id, Marks>>; STRIPES],
}

impl Coalescer {
    fn stripe(&self, id: &Id) -> &Mutex<HashMap<Id, Marks>> {
        let hash = fnv1a(id.0.as_bytes()) ^ fnv1a(id.1.as_bytes()).rotate_left(1);
        &self.stripes[(hash % STRIPES as u64) as usize]
    }

    fn edit(&self, id: &Id, f: impl FnOnce(&mut Marks) -> bool) -> bool {
        let mut stripe = self.stripe(id).lock();
        let marks = stripe.entry(id.clone()).or_default();
        let out = f(marks);
        if marks.is_empty() {
            stripe.remove(id);
        }
        out
    }
}

/// A worker's mark on the coalescing effect it attempts; removed when dropped.
pub(crate) struct Current {
    effects: Arc<Effects>,
    id: Id,
    outbox_key: Vec<u8>,
}

impl Drop for Current {
    fn drop(&mut self) {
        let key = std::mem::take(&mut self.outbox_key);
        self.effects.coalescer().edit(&self.id, |m| {
            m.current.remove(&key);
            false
        });
    }
}

/// The effects one message supersedes: the writes to add to its batch, and after the
/// commit, their outbox room to give back. Dropped, it lifts the marks.
pub(crate) struct Superseding {
    effects: Arc<Effects>,
    id: Id,
    keys: Vec<Vec<u8>>,
    room: Vec<(Priority, u64)>,
    pub(crate) ops: Vec<Op>,
}

impl Superseding {
    /// The message's commit landed: the superseded effects left the outbox.
    pub(crate) fn landed(self) {
        let shared = self.effects.shared();
        for (lane, bytes) in &self.room {
            shared.outbox.release_n(*lane, 1, *bytes);
            Stats::bump(&shared.stats.effects_superseded);
        }
    }
}

impl Drop for Superseding {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut self.keys);
        self.effects.coalescer().edit(&self.id, |m| {
            for key in &keys {
                m.superseding.remove(key);
            }
            false
        });
    }
}

impl Effects {
    /// Lifts the superseding marks of `keys` (effects a message took and then let go).
    fn unmark(&self, id: &Id, keys: &[Vec<u8>]) {
        if keys.is_empty() {
            return;
        }
        self.coalescer().edit(id, |m| {
            for key in keys {
                m.superseding.remove(key);
            }
            false
        });
    }

    /// Marks the coalescing effect under `outbox_key` as being attempted, unless it is
    /// being superseded or is gone (superseded and committed): then `Ok(None)`, and it must
    /// not run. `Err` when the store cannot be read (it waits for a later wake).
    pub(crate) fn start_coalescing(
        self: &Arc<Self>,
        outbox_key: &[u8],
        record: &EffectRecord,
    ) -> Result<Option<Current>, ()> {
        let id = (
            record.info.effect_key.entity.clone(),
            record.info.effect_key.key.clone(),
        );
        let marked = self.coalescer().edit(&id, |m| {
            if m.superseding.contains(outbox_key) {
                return false;
            }
            m.current.insert(outbox_key.to_vec());
            true
        });
        if !marked {
            return Ok(None);
        }
        let current = Current {
            effects: self.clone(),
            id,
            outbox_key: outbox_key.to_vec(),
        };
        // Marked: no message supersedes it from now on. Still there? (A message may have
        // superseded it, committed and lifted its marks just before.)
        match self.store().get(outbox_key) {
            Ok(Some(_)) => Ok(Some(current)),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(target: "keystead", error = %e, "cannot read the outbox; the effect waits for the next wake or open");
                Err(())
            }
        }
    }

    /// The effects of entity (`entity`, `key`) that the effects `by` (type name, new effect
    /// key) of a message supersede: every pending effect of the same type not being
    /// attempted. `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError`] when the outbox cannot be read.
    pub(crate) fn supersede(
        self: &Arc<Self>,
        entity: &str,
        key: &str,
        by: &[(&str, EffectKey)],
        now_ms: u64,
    ) -> Result<Option<Superseding>, StoreError> {
        let prefix = keys::entity_prefix(Space::Outbox, entity, key);
        let mut found = Vec::new();
        for entry in self.store().scan_prefix(&prefix)? {
            let (outbox_key, value) = entry?;
            let Ok(record) = codec::decode::<EffectRecord>("effect record", &value) else {
                continue;
            };
            if record.info.status != EffectStatus::Pending {
                continue;
            }
            if let Some((_, new)) = by.iter().find(|(name, _)| *name == record.info.name) {
                found.push((outbox_key, record, new.clone()));
            }
        }
        if found.is_empty() {
            return Ok(None);
        }
        let id = (entity.to_string(), key.to_string());
        let mut taken = Vec::new();
        self.coalescer().edit(&id, |m| {
            for (outbox_key, record, new) in found {
                if !m.current.contains(&outbox_key) && m.superseding.insert(outbox_key.clone()) {
                    taken.push((outbox_key, record, new));
                }
            }
            false
        });
        // Marked: no worker starts them from now on. Read each again: the scan above may be
        // stale, a worker may have run one and moved it to the history (`Done`) between the
        // scan and the marks. Such an effect is no longer this message's to supersede.
        let all: Vec<Vec<u8>> = taken.iter().map(|(k, _, _)| k.clone()).collect();
        let mut fresh = Vec::with_capacity(taken.len());
        let mut gone = Vec::new();
        for (outbox_key, _, new) in taken {
            let now = match self.store().get(&outbox_key) {
                Ok(now) => now,
                Err(e) => {
                    self.unmark(&id, &all);
                    return Err(e);
                }
            };
            match now.and_then(|v| codec::decode::<EffectRecord>("effect record", &v).ok()) {
                Some(record) if record.info.status == EffectStatus::Pending => {
                    fresh.push((outbox_key, record, new));
                }
                _ => gone.push(outbox_key),
            }
        }
        self.unmark(&id, &gone);
        let taken = fresh;
        if taken.is_empty() {
            return Ok(None);
        }
        let mut superseding = Superseding {
            effects: self.clone(),
            id,
            keys: taken.iter().map(|(k, _, _)| k.clone()).collect(),
            room: Vec::new(),
            ops: Vec::new(),
        };
        for (outbox_key, mut record, new) in taken {
            debug_assert!(record.info.status.can_move_to(EffectStatus::Superseded));
            record.info.status = EffectStatus::Superseded;
            record.info.updated_at_ms = now_ms;
            record.info.last_error = Some(format!("superseded by {new}"));
            let history_key = history_key_of(&outbox_key);
            let encoded = codec::encode(&record).map_err(|e| StoreError::Io {
                op: "supersede effect",
                source: std::io::Error::other(e),
            })?;
            superseding.ops.push(Op::Delete(outbox_key.clone()));
            superseding.ops.push(Op::Put(history_key, encoded));
            // Its index entry, wherever a `prioritise` may have moved it.
            for lane in Priority::ALL {
                if let Some(index_key) = outbox_index_of(lane, &outbox_key) {
                    superseding.ops.push(Op::Delete(index_key));
                }
            }
            superseding.room.push((
                effect_lane(Space::Outbox, &outbox_key),
                record.payload.len() as u64,
            ));
        }
        Ok(Some(superseding))
    }
}
