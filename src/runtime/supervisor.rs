//! The shard supervisor: one per actix Arbiter (one thread each). It owns the map from entity
//! to actor for the keys hashed to its shard, activates an entity actor lazily on its first
//! job, forwards jobs in arrival order, and passivates idle actors.
//!
//! Passivation is a handshake, so no job can be lost to a stopping actor: the shard counts
//! the jobs it forwards to each actor; an idle actor reports how many it received; only if
//! the two counts match does the shard forget the actor and tell it to stop. Any job that
//! arrives afterwards activates a fresh actor, which reloads the entity from the store. All
//! of this runs on the shard's own thread, so no lock is needed.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::effects::Effects;
use crate::entity::Entity;
use crate::error::AdminError;
use crate::runtime::actor::EntityActor;
use crate::runtime::mail::{Deliver, Forward, Idle, Stop};
use crate::runtime::shared::Shared;
use crate::store::Store;

struct Slot {
    /// An `Addr<EntityActor<E>>` for the entity type named in the map key.
    addr: Box<dyn Any>,
    /// How many jobs this shard forwarded to the actor.
    forwarded: u64,
    /// Sends `Stop` to the actor, without knowing its type.
    stop: fn(&dyn Any, Option<StopReply>),
}

/// The supervisor of one shard.
pub(crate) struct Shard {
    shared: Arc<Shared>,
    store: Arc<Store>,
    effects: Arc<Effects>,
    entities: HashMap<(&'static str, String), Slot>,
}

impl Shard {
    pub(crate) fn new(shared: Arc<Shared>, store: Arc<Store>, effects: Arc<Effects>) -> Self {
        Self {
            shared,
            store,
            effects,
            entities: HashMap::new(),
        }
    }
}

type StopReply = oneshot::Sender<Result<bool, AdminError>>;

fn stop_actor<E: Entity>(addr: &dyn Any, done: Option<StopReply>) {
    if let Some(addr) = addr.downcast_ref::<Addr<EntityActor<E>>>() {
        // A closed mailbox means the actor is already gone, which is what we want (and a
        // dropped `done` tells its caller the runtime is stopping).
        let _ = addr.try_send(Stop { done });
    }
}

impl Actor for Shard {
    type Context = Context<Self>;
}

impl<E: Entity> Handler<Deliver<E>> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Deliver<E>, ctx: &mut Context<Self>) {
        let id = (E::NAME, msg.key);
        let slot = match self.entities.get_mut(&id) {
            Some(slot) => slot,
            None => {
                let (shared, store, effects, shard, key) = (
                    self.shared.clone(),
                    self.store.clone(),
                    self.effects.clone(),
                    ctx.address(),
                    id.1.clone(),
                );
                let addr = EntityActor::<E>::create(move |actor_ctx| {
                    // Capacity 0 means actix never parks or refuses our sends: the bound on
                    // this mailbox is the runtime's admission tickets, acquired by callers
                    // before anything reaches a shard.
                    actor_ctx.set_mailbox_capacity(0);
                    EntityActor::new(key, shared, store, effects, shard.recipient())
                });
                self.entities.entry(id.clone()).or_insert(Slot {
                    addr: Box::new(addr),
                    forwarded: 0,
                    stop: stop_actor::<E>,
                })
            }
        };
        let Some(addr) = slot.addr.downcast_ref::<Addr<EntityActor<E>>>() else {
            // The registry ties each name to one Rust type, so this cannot happen; if it
            // did, dropping the job makes its caller see `ReplyLost`, never a wrong handler.
            tracing::error!(target: "keystead", entity = E::NAME, "entity name bound to two types; job dropped");
            return;
        };
        slot.forwarded += 1;
        if addr.try_send(Forward(msg.job)).is_err() {
            // Only a stopped actor refuses mail; forget it so the next job activates afresh.
            tracing::error!(target: "keystead", entity = E::NAME, key = %id.1, "entity actor gone; job dropped");
            self.entities.remove(&id);
        }
    }
}

impl Handler<Idle> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Idle, _ctx: &mut Context<Self>) {
        let id = (msg.entity, msg.key);
        let quiet = self
            .entities
            .get(&id)
            .is_some_and(|slot| slot.forwarded == msg.received);
        match (quiet, msg.done) {
            (true, done) => {
                if let Some(slot) = self.entities.remove(&id) {
                    // The actor answers `done` once it has stopped.
                    (slot.stop)(slot.addr.as_ref(), done);
                }
            }
            (false, Some(done)) => {
                let _ = done.send(Ok(false));
            }
            (false, None) => {}
        }
    }
}
