//! The messages between the runtime's parts: jobs for an entity actor, the shard's routing
//! envelope, and the passivation handshake. Kept apart from the actor and the shard so that
//! each imports only the mail it sends, never the other's module.

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::core::apply::{Loaded, OutcomeOf};
use crate::core::records::Meta;
use crate::entity::Entity;
use crate::error::{AdminError, SubmitError};
use crate::priority::Priority;
use crate::runtime::admission::Ticket;

/// Where the reply to an `ask` goes.
pub(crate) type AskReply<E> = oneshot::Sender<Result<OutcomeOf<E>, SubmitError>>;

/// An operator action on one entity's dead letters or shed messages, serialised with its
/// messages.
#[derive(Debug)]
pub(crate) enum AdminAction {
    /// Move a dead letter back into the inbox, keeping its id.
    Requeue,
    /// Remove a dead letter.
    Purge,
    /// Move a shed message back into the inbox, in its lane, keeping its id.
    RequeueShed,
    /// Remove a shed message.
    PurgeShed,
}

/// Work for an entity actor.
pub(crate) enum Job<E: Entity> {
    /// A command sent with `ask`; the reply goes back to the caller.
    Ask {
        meta: Meta,
        command: E::Command,
        expected_revision: Option<u64>,
        /// The runtime generated the message id just now: no dedup record can exist for it.
        fresh_id: bool,
        reply: AskReply<E>,
        ticket: Ticket,
        /// Inbox entries up to this sequence (every `tell` acknowledged before this ask was
        /// sent) go first, so that one caller's `tell` then `ask` apply in that order.
        /// `None` once that is done.
        inbox_up_to: Option<u64>,
        /// Its lane: the effects it records wait in the same one.
        priority: Priority,
    },
    /// Process this entity's inbox entries with a sequence up to `up_to`, oldest first. The
    /// ticket is the drain's own (from a lane feeder), or `None` for a drain an ask runs
    /// first under its own ticket.
    Drain { up_to: u64, ticket: Option<Ticket> },
    /// An operator action on the dead letter `message_id`; replies whether it existed.
    Admin {
        action: AdminAction,
        message_id: String,
        reply: oneshot::Sender<Result<bool, AdminError>>,
        ticket: Ticket,
    },
    /// Move this entity's pending inbox messages below `lane` up to `lane`; replies how
    /// many moved.
    Prioritise {
        lane: Priority,
        reply: oneshot::Sender<Result<u64, AdminError>>,
        ticket: Ticket,
    },
    /// Hold the entity for an atomic multi-entity command (a transaction): reply with its
    /// committed state, then apply nothing else until `release` says what was committed
    /// (`Some`: the new state; `None`: nothing changed). A dropped `release` (the command
    /// gave up, maybe after committing) makes the actor reload from the store.
    Hold {
        reply: oneshot::Sender<Result<Loaded<E::State>, SubmitError>>,
        release: oneshot::Receiver<Option<Loaded<E::State>>>,
        ticket: Ticket,
        /// As for an ask: inbox entries up to this sequence go first.
        inbox_up_to: Option<u64>,
    },
    /// Passivate now if nothing else is queued; replies whether the actor stopped.
    Passivate {
        reply: oneshot::Sender<Result<bool, AdminError>>,
        ticket: Ticket,
    },
}

/// The actor's mail: a job routed by the shard.
pub(crate) struct Forward<E: Entity>(pub Job<E>);

impl<E: Entity> Message for Forward<E> {
    type Result = ();
}

/// Sent by the shard once it has forgotten this actor: no more jobs will arrive.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Stop {
    /// Told `true` once the actor has stopped (for `EntityRef::passivate`).
    pub done: Option<oneshot::Sender<Result<bool, AdminError>>>,
}

/// A job for entity `E` with key `key`, on its way to the entity's actor.
pub(crate) struct Deliver<E: Entity> {
    pub key: String,
    pub job: Job<E>,
}

impl<E: Entity> Message for Deliver<E> {
    type Result = ();
}

/// An actor reports that it has been idle for the passivation timeout.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Idle {
    pub entity: &'static str,
    pub key: String,
    pub received: u64,
    /// For [`EntityRef::passivate`](crate::EntityRef::passivate): told `false` if the actor
    /// stays, or `true` by the actor once it has stopped.
    pub done: Option<oneshot::Sender<Result<bool, AdminError>>>,
}
