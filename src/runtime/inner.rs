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

use crate::core::hash::fnv1a;
use crate::effects::Effects;
use crate::entity::Entity;
use crate::priority::Priority;
use crate::runtime::admission::{Gate, Ticket};
use crate::runtime::mail::{Deliver, Job};
use crate::runtime::shared::Shared;
use crate::runtime::supervisor::Shard;
use crate::store::Store;

pub(crate) struct ShardRef {
    pub addr: Addr<Shard>,
    pub gate: Arc<Gate>,
}

/// How to wake a registered entity type's actor without knowing its Rust type.
#[derive(Clone, Copy)]
pub(crate) struct Registration {
    pub(crate) type_id: TypeId,
    pub(crate) wake: fn(&Inner, String, Ticket) -> bool,
}

pub(crate) fn wake<E: Entity>(inner: &Inner, key: String, ticket: Ticket) -> bool {
    let shard = inner.shard_index(E::NAME, &key);
    let job = Job::<E>::Drain {
        up_to: u64::MAX,
        ticket,
    };
    inner.shards[shard]
        .addr
        .try_send(Deliver { key, job })
        .is_ok()
}

pub(crate) struct Threads {
    pub(crate) system: System,
    pub(crate) system_thread: Option<thread::JoinHandle<()>>,
    pub(crate) arbiters: Vec<Arbiter>,
    pub(crate) purge_stop: Option<Sender<()>>,
    pub(crate) purge_thread: Option<thread::JoinHandle<()>>,
}

/// The runtime's internals; entity handles hold it weakly.
pub(crate) struct Inner {
    pub shared: Arc<Shared>,
    pub store: Arc<Store>,
    pub effects: Arc<Effects>,
    pub shards: Vec<ShardRef>,
    pub(crate) registry: HashMap<&'static str, Registration>,
    pub(crate) closed: AtomicBool,
    pub(crate) threads: Mutex<Option<Threads>>,
    pub(crate) path: PathBuf,
}

impl Inner {
    pub(crate) fn shard_index(&self, entity: &str, key: &str) -> usize {
        let mut hash = fnv1a(entity.as_bytes());
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        hash ^= fnv1a(key.as_bytes());
        (hash % self.shards.len() as u64) as usize
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

    /// Delivers a `Drain` to entity (`entity`, `key`) of a registered type, taking a ticket
    /// in lane `priority` like any caller. False when the runtime is closing.
    pub(crate) async fn wake_entity(&self, entity: &str, key: &str, priority: Priority) -> bool {
        let Some((&name, registration)) = self.registry.get_key_value(entity) else {
            tracing::warn!(target: "keystead", %entity, %key,
                "inbox entries for an unregistered entity type stay in the inbox; register the type to process them");
            return true;
        };
        let registration = *registration;
        let Some(ticket) = self.admit(name, key, priority).await else {
            return false;
        };
        (registration.wake)(self, key.to_string(), ticket)
    }

    pub(crate) fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for shard in &self.shards {
            shard.gate.close();
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
