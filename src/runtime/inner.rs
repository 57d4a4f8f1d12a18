//! The runtime's internals, held strongly by the `Runtime` handle and weakly by entity
//! addresses: the shards and their admission, the registry of entity types, the store, the
//! effect workers and the threads to join at close.

use std::any::{Any, TypeId};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use actix::prelude::*;
use crossbeam_channel::Sender;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::core::apply::Loaded;
use crate::core::codec;
use crate::core::hash::shard_of;
use crate::core::records::StateRecord;
use crate::effects::Effects;
use crate::entity::Entity;
use crate::error::SubmitError;
use crate::priority::Priority;
use crate::runtime::admission::{self, Draining, Gate, Ticket};
use crate::runtime::delayed::Delayed;
use crate::runtime::mail::{Deliver, Job};
use crate::runtime::shared::Shared;
use crate::runtime::supervisor::Shard;
use crate::store::Store;

pub(crate) struct ShardRef {
    pub addr: Addr<Shard>,
    pub gate: Arc<Gate>,
    /// Bounds the `tell`s being written to this shard's inbox at once. Apart from the gate:
    /// writing work to disk must not wait for the processing slots of its lane, or a slow
    /// lane could not build the durable backlog that is there to absorb it.
    pub accepting: Arc<Semaphore>,
    /// Entities of this shard being drained, with the highest lane in which more work came
    /// for each meanwhile (see `runtime/feeder.rs`).
    pub draining: Draining,
}

/// How to wake a registered entity type's actor without knowing its Rust type.
#[derive(Clone, Copy)]
pub(crate) struct Registration {
    pub(crate) type_id: TypeId,
    pub(crate) wake: fn(&Inner, String, Ticket, u64) -> bool,
    /// Holds an entity for a transaction (see [`hold`]).
    pub(crate) hold: fn(&Inner, String, Ticket, u64) -> HoldFuture,
    /// Encodes a state record of the type's state, given as `Any`.
    pub(crate) encode_state: EncodeState,
}

/// Encodes `(state, revision, version, updated at ms)` as a state record.
pub(crate) type EncodeState =
    fn(&(dyn Any + Send), u64, Option<u64>, u64) -> Result<Vec<u8>, String>;

/// What a released member becomes: its new state, revision and version once committed.
pub(crate) type Released = Option<(Box<dyn Any + Send>, u64, Option<u64>)>;

/// An entity held for a transaction, its type erased.
pub(crate) struct Held {
    pub revision: u64,
    pub version: Option<u64>,
    /// A copy of its committed state (its type's `State`).
    pub state: Box<dyn Any + Send>,
    /// Lets the entity go: with what was committed, or `None` if nothing changed. Dropping
    /// it unused makes the entity reload from the store.
    pub release: Box<dyn FnOnce(Released) + Send>,
}

pub(crate) type HoldFuture = Pin<Box<dyn Future<Output = Result<Held, SubmitError>> + Send>>;

/// Holds entity (`E`, `key`) for a transaction: once every inbox entry up to `up_to` is
/// applied, its actor answers with its committed state and applies nothing else until
/// released.
pub(crate) fn hold<E: Entity>(
    inner: &Inner,
    key: String,
    ticket: Ticket,
    up_to: u64,
) -> HoldFuture {
    let shard = inner.shard_index(E::NAME, &key);
    let (reply, answer) = oneshot::channel();
    let (release_tx, release) = oneshot::channel::<Option<Loaded<E::State>>>();
    let job = Job::<E>::Hold {
        reply,
        release,
        ticket,
        inbox_up_to: Some(up_to),
    };
    let closed = SubmitError::Closed {
        entity: E::NAME,
        key: key.clone(),
    };
    let sent = inner.shards[shard].addr.try_send(Deliver {
        key: key.clone(),
        job,
    });
    Box::pin(async move {
        sent.map_err(|_| closed)?;
        let loaded = answer.await.map_err(|_| SubmitError::ReplyLost {
            entity: E::NAME,
            key,
            message_id: String::new(),
        })??;
        let release = move |released: Released| {
            let next = released.map(|(state, revision, version)| {
                state.downcast::<E::State>().map(|state| Loaded {
                    revision,
                    version,
                    state: *state,
                })
            });
            match next {
                None => {
                    let _ = release_tx.send(None);
                }
                Some(Ok(next)) => {
                    let _ = release_tx.send(Some(next));
                }
                // Not its type (cannot happen): drop the sender, the actor reloads.
                Some(Err(_)) => drop(release_tx),
            }
        };
        Ok(Held {
            revision: loaded.revision,
            version: loaded.version,
            state: Box::new(loaded.state),
            release: Box::new(release),
        })
    })
}

/// Encodes a state record of `E` from its state given as `Any`.
pub(crate) fn encode_state<E: Entity>(
    state: &(dyn Any + Send),
    revision: u64,
    version: Option<u64>,
    now_ms: u64,
) -> Result<Vec<u8>, String> {
    let state = state
        .downcast_ref::<E::State>()
        .ok_or_else(|| format!("a state given for {} is of another type", E::NAME))?;
    codec::encode(&StateRecord {
        revision,
        version,
        updated_at_ms: now_ms,
        state,
    })
}

/// Message ids of transactions running now (per transaction type), so that two with one
/// id run one after the other: the second finds the first's dedup record.
#[derive(Debug, Default)]
pub(crate) struct TxClaims {
    running: Mutex<HashSet<(&'static str, String)>>,
    released: Notify,
}

/// A claim on one transaction id, released when dropped.
pub(crate) struct TxClaim<'a> {
    claims: &'a TxClaims,
    id: (&'static str, String),
}

impl Drop for TxClaim<'_> {
    fn drop(&mut self) {
        self.claims.running.lock().remove(&self.id);
        self.claims.released.notify_waiters();
    }
}

impl TxClaims {
    /// Waits until no transaction of type `name` with id `id` runs, and claims it.
    pub(crate) async fn claim(&self, name: &'static str, id: &str) -> TxClaim<'_> {
        let id = (name, id.to_string());
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.running.lock().insert(id.clone()) {
                return TxClaim { claims: self, id };
            }
            released.await;
        }
    }
}

/// Sends entity (`E`, `key`) a drain of its inbox entries up to sequence `up_to`.
pub(crate) fn wake<E: Entity>(inner: &Inner, key: String, ticket: Ticket, up_to: u64) -> bool {
    let shard = inner.shard_index(E::NAME, &key);
    let job = Job::<E>::Drain {
        up_to,
        ticket: Some(ticket),
    };
    inner.shards[shard]
        .addr
        .try_send(Deliver { key, job })
        .is_ok()
}

/// Room to write one `tell`, held until its inbox entry is durable.
pub(crate) struct Accepting {
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
}

impl Drop for Accepting {
    fn drop(&mut self) {
        self.shared.stats.work_down(&self.shared.stats.in_flight);
        self.shared.stats.notify();
    }
}

pub(crate) struct Threads {
    pub(crate) system: System,
    pub(crate) system_thread: Option<thread::JoinHandle<()>>,
    pub(crate) arbiters: Vec<Arbiter>,
    pub(crate) purge_stop: Option<Sender<()>>,
    pub(crate) purge_thread: Option<thread::JoinHandle<()>>,
    /// The timer firer and the scheduler (`keystead-time`).
    pub(crate) time_thread: Option<thread::JoinHandle<()>>,
}

/// The runtime's internals; entity handles hold it weakly.
pub(crate) struct Inner {
    pub shared: Arc<Shared>,
    pub store: Arc<Store>,
    pub effects: Arc<Effects>,
    /// Delayed messages: claims and the firer's wake-up.
    pub delayed: Arc<Delayed>,
    pub shards: Vec<ShardRef>,
    pub(crate) registry: HashMap<&'static str, Registration>,
    /// Registered transactions: name and type.
    pub(crate) transactions: HashMap<&'static str, TypeId>,
    pub(crate) tx_claims: TxClaims,
    pub(crate) closed: AtomicBool,
    pub(crate) threads: Mutex<Option<Threads>>,
    pub(crate) path: PathBuf,
}

impl Inner {
    pub(crate) fn shard_index(&self, entity: &str, key: &str) -> usize {
        shard_of(entity, key, self.shards.len())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Checks that `E` is registered under its name.
    pub(crate) fn registered<E: Entity>(&self) -> bool {
        self.registry
            .get(E::NAME)
            .is_some_and(|r| r.type_id == TypeId::of::<E>())
    }

    /// Waits for a ticket for entity (`entity`, `key`) in lane `priority`: this is where
    /// callers feel backpressure. `None` once the runtime is closing.
    pub(crate) async fn admit(
        &self,
        entity: &'static str,
        key: &str,
        priority: Priority,
    ) -> Option<Ticket> {
        let shard = self.shard_index(entity, key);
        let slot = self.shards[shard]
            .gate
            .acquire(entity, key, priority)
            .await?;
        if self.is_closed() {
            return None;
        }
        Some(Ticket::new(slot, self.shared.clone()))
    }

    /// A drain of entity (`entity`, `key`) claimed at once for a `tell` about to be written
    /// in lane `lane`, so that it can be handed to the entity straight after its commit,
    /// without a lane index entry and without its lane's feeder: only when the entity is not
    /// being drained and a slot is free in that lane with nobody queued ahead (so lane order
    /// holds). `None` otherwise: the `tell` then takes the lane index and the feeder.
    pub(crate) fn claim_direct(
        &self,
        entity: &'static str,
        key: &str,
        lane: Priority,
    ) -> Option<Ticket> {
        let shard = self.shard_index(entity, key);
        let id = (entity, key.to_string());
        if self.shards[shard].draining.lock().contains_key(&id) {
            return None;
        }
        let slot = self.shards[shard].gate.try_acquire(entity, key, lane)?;
        admission::claim_drain(
            &self.shared,
            &self.shards[shard].draining,
            shard,
            id,
            slot,
            None,
        )
    }

    /// Sends entity (`entity`, `key`) a drain of everything accepted so far, holding
    /// `ticket`.
    pub(crate) fn send_drain(&self, entity: &'static str, key: String, ticket: Ticket) {
        let Some(registration) = self.registry.get(entity).copied() else {
            return;
        };
        let up_to = self.shared.seq.load(Ordering::Acquire);
        (registration.wake)(self, key, ticket, up_to);
    }

    /// Waits for room to write one `tell` to entity (`entity`, `key`)'s shard. `None` once
    /// the runtime is closing. Counted in `in_flight` until dropped.
    pub(crate) async fn accept(&self, entity: &str, key: &str) -> Option<Accepting> {
        self.accept_on(self.shard_index(entity, key)).await
    }

    /// [`Inner::accept`] on shard `shard` (a batch takes one per shard it writes to, in
    /// shard order).
    pub(crate) async fn accept_on(&self, shard: usize) -> Option<Accepting> {
        let permit = self.shards[shard]
            .accepting
            .clone()
            .acquire_owned()
            .await
            .ok()?;
        if self.is_closed() {
            return None;
        }
        self.shared.stats.work_up(&self.shared.stats.in_flight);
        Some(Accepting {
            _permit: permit,
            shared: self.shared.clone(),
        })
    }

    /// Refuses every new admission and write, and every caller still waiting for one.
    pub(crate) fn stop_admitting(&self) {
        for shard in &self.shards {
            shard.gate.close();
            shard.accepting.close();
        }
    }

    pub(crate) fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop_admitting();
        for lanes in &self.shared.feeds {
            for feed in lanes {
                feed.wake_for_close();
            }
        }
        let Some(mut threads) = self.threads.lock().take() else {
            return;
        };
        if let Some(stop) = threads.purge_stop.take() {
            drop(stop);
        }
        if let Some(handle) = threads.purge_thread.take() {
            let _ = handle.join();
        }
        // The timer firer and the scheduler look at `closed` after every wake-up.
        self.delayed.wake.notify_waiters();
        if let Some(handle) = threads.time_thread.take() {
            if handle.thread().id() != thread::current().id() {
                let _ = handle.join();
            }
        }
        for arbiter in &threads.arbiters {
            arbiter.stop();
        }
        for arbiter in threads.arbiters.drain(..) {
            let _ = arbiter.join();
        }
        threads.system.stop();
        if let Some(handle) = threads.system_thread.take() {
            let _ = handle.join();
        }
        self.effects.shutdown();
        self.store.close();
        self.shared.stats.notify();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}
