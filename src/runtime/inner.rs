//! The runtime's internals, held strongly by the `Runtime` handle and weakly by entity
//! addresses: the shards and their admission, the registry of entity types, the store, the
//! effect workers and the threads to join at close.

use std::any::TypeId;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use actix::prelude::*;
use crossbeam_channel::Sender;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::core::hash::shard_of;
use crate::effects::Effects;
use crate::entity::Entity;
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
