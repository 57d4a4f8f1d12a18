//! Side effects exactly once (with the outside world's help): a durable outbox.
//!
//! A handler records effects with [`Context::effect`](crate::Context::effect). They are
//! written to the outbox (keyspace `O`) in the same atomic batch as the state change, and
//! only when the message is `Applied`. After the commit, the effect workers (a tokio pool of
//! their own, the slow path) run them: per entity in the order recorded, unless the effect
//! type is independent. Each run gets a stable [`EffectKey`] to hand to the outside service
//! as its idempotency key, so a run repeated after a crash is absorbed there. A finished
//! effect moves to the effect history (keyspace `X`) in one batch with its optional
//! feedback message to the entity, whose message id derives from the effect key.
//!
//! Exactly once holds for what keystead stores (the effect record, its feedback). Towards
//! the outside world it is at least once with a stable idempotency key: the service must
//! honour the key.

//!
//! - [`executor`]: the traits users implement, and their type-erased form;
//! - [`workers`]: the lanes that run effects, their attempts and feedback;
//! - [`query`]: reading effect records (status queries, requeue).
//!
//! The pure record of an effect (its key, status table, outbox record) is
//! [`core::effect`](crate::core::effect).

mod coalesce;
mod executor;
mod limits;
mod query;
mod workers;

pub(crate) use crate::core::effect::EffectRecord;
pub use crate::core::effect::{EffectContext, EffectError, EffectInfo, EffectKey, EffectStatus};
pub use crate::entity::{Effect, Feedback};
pub(crate) use coalesce::Superseding;
pub(crate) use executor::Registered;
pub use executor::{AsyncExecutor, EffectLimits, Executor};
pub(crate) use query::{find, of_entity};
pub(crate) use workers::Effects;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_moves_follow_the_table() {
        use EffectStatus::*;
        assert!(Pending.can_move_to(Running));
        assert!(Running.can_move_to(Done));
        assert!(DeadLettered.can_move_to(Pending));
        assert!(!Done.can_move_to(Running), "a done effect never runs again");
        assert!(
            !Failed.can_move_to(Pending),
            "a permanent failure is never retried"
        );
        assert!(
            !Pending.can_move_to(Done),
            "nothing is done without running"
        );
    }
}
