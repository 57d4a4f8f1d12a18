//! Delayed messages: a `tell` with a due time waits in the timer keyspace (`T`, keyed by due
//! time, so the next one due is the first key and finding it scans nothing), with a lookup
//! by message id (`K`) for cancelling. When due, the timer firer (`time/firer.rs`) moves it
//! into the inbox in one atomic batch, from where it goes the normal way (dedup, version,
//! lanes). A message is in exactly one of the two places at every moment, so a crash fires
//! it exactly once.
//!
//! Accepting, cancelling and firing the same message id race; each first *claims* the id
//! (a short lock on a set, never held across a wait) and reads the store only after, so the
//! one that comes second sees what the first committed: a message is fired or cancelled,
//! never both, and a double-clicked delayed `tell` makes one timer.
//!
//! A delayed message takes room in its lane's backlog from the moment it is accepted (it is
//! pending work of that lane), so firing it never meets a full lane and never waits.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::core::codec;
use crate::core::keys::{self, Space};
use crate::core::records::TimerRecord;
use crate::error::StoreError;
use crate::priority::Priority;
use crate::runtime::shared::Shared;
use crate::store::{Op, Store};
use crate::telemetry::Stats;

/// Timers fired in one batch at most.
pub(crate) const FIRE_BATCH_MAX: usize = 1024;

/// The shared state of delayed messages: the claims, and the firer's wake-up.
#[derive(Debug, Default)]
pub(crate) struct Delayed {
    /// Message ids (their `K` keys) being accepted, cancelled or fired now.
    claims: Mutex<HashSet<Vec<u8>>>,
    /// Woken when a claim is released.
    released: Notify,
    /// Woken when a timer is added (it may be due before the firer's next wake-up), and at
    /// close.
    pub(crate) wake: Notify,
    /// Timer keys that do not decode: skipped (and logged once) instead of blocking the
    /// timers behind them.
    broken: Mutex<HashSet<Vec<u8>>>,
    /// Where the firer's scans start, so they do not walk over the deleted timers of every
    /// earlier pass (an LSM engine keeps them as tombstones for a while).
    floor: Mutex<Floor>,
}

/// No timer due before `due_ms` is pending, except broken ones. Accepting a timer lowers
/// it (after the commit, so a scan that started earlier may have missed the timer); the
/// firer raises it after a pass, never above the lowest due time accepted since the pass
/// began.
#[derive(Debug, Default)]
struct Floor {
    due_ms: u64,
    /// The lowest due time accepted since the current pass began.
    accepted_min: Option<u64>,
}

/// A claim on one message id, released when dropped.
struct Claim<'a> {
    delayed: &'a Delayed,
    id: Vec<u8>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.delayed.claims.lock().remove(&self.id);
        self.delayed.released.notify_waiters();
    }
}

/// What accepting a delayed message found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheduled {
    /// A new timer, due at this time.
    New(u64),
    /// The same message id was already waiting (a resend): its due time. Nothing written.
    AlreadyPending(u64),
}

/// What one pass of the firer did.
#[derive(Debug, Default)]
pub(crate) struct Pass {
    pub fired: usize,
    /// When the next timer is due (after this pass), if any.
    pub next_due_ms: Option<u64>,
    /// A due timer was claimed by a cancel: wait for the claim, not for the clock.
    pub contended: bool,
}

impl Delayed {
    fn try_claim(&self, id: &[u8]) -> Option<Claim<'_>> {
        self.claims.lock().insert(id.to_vec()).then(|| Claim {
            delayed: self,
            id: id.to_vec(),
        })
    }

    async fn claim(&self, id: &[u8]) -> Claim<'_> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(claim) = self.try_claim(id) {
                return claim;
            }
            released.await;
        }
    }

    /// Waits until some claim is released.
    pub(crate) async fn claim_released(&self) {
        self.released.notified().await;
    }

    /// Writes a delayed message for entity (`entity`, `key`) due at `due_ms`, whose room in
    /// lane `lane` the caller has taken. `inbox` is the encoded inbox entry it becomes.
    /// If the id is already waiting, nothing is written and the caller gives the room back.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn accept(
        &self,
        store: &Store,
        shared: &Shared,
        entity: &str,
        key: &str,
        message_id: &str,
        lane: Priority,
        due_ms: u64,
        inbox: Vec<u8>,
    ) -> Result<Scheduled, StoreError> {
        let id = keys::timer_id(entity, key, message_id);
        let _claim = self.claim(&id).await;
        if let Some(existing) = store.get(&id)? {
            let due = keys::timer_position(&existing).map_or(due_ms, |(due, _)| due);
            return Ok(Scheduled::AlreadyPending(due));
        }
        let record = TimerRecord {
            entity: entity.to_string(),
            key: key.to_string(),
            message_id: message_id.to_string(),
            lane: lane.index() as u8,
            inbox,
        };
        let bytes = codec::encode(&record).map_err(|reason| StoreError::Corrupt {
            op: "encode a delayed message",
            detail: reason,
        })?;
        let seq = shared.next_seq();
        let timer = keys::timer(due_ms, seq);
        let ops = vec![Op::Put(timer.clone(), bytes), Op::Put(id, timer)];
        store.commit_with_seq(ops, seq).await?;
        {
            let mut floor = self.floor.lock();
            floor.due_ms = floor.due_ms.min(due_ms);
            floor.accepted_min = Some(floor.accepted_min.map_or(due_ms, |m| m.min(due_ms)));
        }
        Stats::bump(&shared.stats.timers_pending);
        self.wake.notify_waiters();
        Ok(Scheduled::New(due_ms))
    }

    /// Cancels entity (`entity`, `key`)'s delayed message `message_id`: its due time if it
    /// was waiting, `None` if it was not (fired already, cancelled already, or never sent
    /// with a due time).
    pub(crate) async fn cancel(
        &self,
        store: &Store,
        shared: &Shared,
        entity: &str,
        key: &str,
        message_id: &str,
    ) -> Result<Option<u64>, StoreError> {
        let id = keys::timer_id(entity, key, message_id);
        let _claim = self.claim(&id).await;
        let Some(timer) = store.get(&id)? else {
            return Ok(None);
        };
        let record = store
            .get(&timer)?
            .and_then(|bytes| codec::decode::<TimerRecord>("timer", &bytes).ok());
        store
            .commit(vec![Op::Delete(timer.clone()), Op::Delete(id)])
            .await?;
        if let Some(record) = record {
            let lane = Priority::from_index(record.lane).unwrap_or_default();
            shared.backlog.release(lane, record.inbox.len() as u64);
        }
        Stats::drop_one(&shared.stats.timers_pending);
        Stats::bump(&shared.stats.timers_cancelled);
        Ok(Some(keys::timer_position(&timer).map_or(0, |(due, _)| due)))
    }

    /// The due time of the next timer (broken ones aside).
    pub(crate) fn next_due(&self, store: &Store) -> Result<Option<u64>, StoreError> {
        let start = keys::timer(self.floor.lock().due_ms, 0);
        for entry in store.scan_from(&[Space::Timer as u8], &start)? {
            let (key, _) = entry?;
            if self.broken.lock().contains(&key) {
                continue;
            }
            return Ok(keys::timer_position(&key).map(|(due, _)| due));
        }
        Ok(None)
    }

    /// Moves every timer due at `now_ms` (up to [`FIRE_BATCH_MAX`]) into the inbox, in due
    /// order, in one atomic batch, and tells their lane feeders.
    pub(crate) async fn fire_due(
        &self,
        store: &Store,
        shared: &Shared,
        now_ms: u64,
    ) -> Result<Pass, StoreError> {
        let mut pass = Pass::default();
        let mut claims = Vec::new();
        let mut ops = Vec::new();
        let mut fired = Vec::new();
        let mut seq_max = 0;
        let start = {
            let mut floor = self.floor.lock();
            floor.accepted_min = None;
            keys::timer(floor.due_ms, 0)
        };
        // The lowest due time left pending by this pass (`None`: none is left).
        let mut left: Option<u64> = None;
        for entry in store.scan_from(&[Space::Timer as u8], &start)? {
            let (timer, bytes) = entry?;
            let Some((due, _)) = keys::timer_position(&timer) else {
                self.skip_broken(&timer, "a malformed timer key");
                continue;
            };
            if due > now_ms || fired.len() == FIRE_BATCH_MAX {
                pass.next_due_ms = Some(due);
                left = Some(left.map_or(due, |l| l.min(due)));
                break;
            }
            let record = match codec::decode::<TimerRecord>("timer", &bytes) {
                Ok(record) => record,
                Err(e) => {
                    self.skip_broken(&timer, &e.to_string());
                    continue;
                }
            };
            let Some(lane) = Priority::from_index(record.lane) else {
                self.skip_broken(&timer, "its lane is not one keystead knows");
                continue;
            };
            if record.entity.is_empty()
                || record.entity.len() > keys::ENTITY_NAME_LEN_MAX
                || record.key.is_empty()
                || record.key.len() > keys::ENTITY_KEY_LEN_MAX
            {
                self.skip_broken(&timer, "its entity type name or key is not valid");
                continue;
            }
            let id = keys::timer_id(&record.entity, &record.key, &record.message_id);
            let Some(claim) = self.try_claim(&id) else {
                // Being cancelled right now: the cancel decides; look again once it is done.
                pass.contended = true;
                left = Some(left.map_or(due, |l| l.min(due)));
                continue;
            };
            // Read again under the claim: a cancel may have removed it since the scan.
            if store.get(&timer)?.is_none() {
                continue;
            }
            let seq = shared.next_seq();
            seq_max = seq;
            // Under the claim, `K` names this timer: accept writes one only where none is.
            ops.push(Op::Delete(timer.clone()));
            ops.push(Op::Delete(id));
            ops.push(Op::Put(
                keys::inbox_in(&record.entity, &record.key, seq, lane),
                record.inbox,
            ));
            ops.push(Op::Put(
                shared.lane_index(&record.entity, &record.key, lane, seq),
                keys::inbox_in(&record.entity, &record.key, seq, lane),
            ));
            fired.push((record.entity, record.key, lane, seq));
            claims.push(claim);
        }
        if !fired.is_empty() {
            store.commit_with_seq(ops, seq_max).await?;
        }
        {
            // Every timer below `left` was fired (committed just above), is broken, or was
            // accepted since the pass began (then `accepted_min` holds it).
            let mut floor = self.floor.lock();
            let raise = left
                .unwrap_or(u64::MAX)
                .min(floor.accepted_min.unwrap_or(u64::MAX));
            floor.due_ms = floor.due_ms.max(raise);
        }
        if fired.is_empty() {
            return Ok(pass);
        }
        for (entity, key, lane, seq) in &fired {
            shared.accepted(entity, key, *lane, *seq);
        }
        pass.fired = fired.len();
        shared
            .stats
            .timers_fired
            .fetch_add(fired.len() as u64, Ordering::Relaxed);
        let _ =
            shared
                .stats
                .timers_pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(v.saturating_sub(fired.len() as u64))
                });
        drop(claims);
        Ok(pass)
    }

    fn skip_broken(&self, timer: &[u8], why: &str) {
        if self.broken.lock().insert(timer.to_vec()) {
            tracing::error!(target: "keystead", key = ?timer, reason = why,
                "a delayed message cannot be read; it is left in place and skipped (restore it or delete it)");
        }
    }
}

/// Counts the timers at open into `backlog`, per lane (they hold room from acceptance), and
/// returns how many there are.
pub(crate) fn scan_timers(
    store: &Store,
    backlog: &crate::runtime::backlog::Backlog,
) -> Result<u64, StoreError> {
    let mut count = 0;
    for entry in store.scan_prefix(&[Space::Timer as u8])? {
        let (key, value) = entry?;
        if keys::timer_position(&key).is_none() {
            continue;
        }
        let Ok(record) = codec::decode::<TimerRecord>("timer", &value) else {
            continue;
        };
        let lane = Priority::from_index(record.lane).unwrap_or_default();
        backlog.force(lane, record.inbox.len() as u64);
        count += 1;
    }
    Ok(count)
}
