//! The pure core of atomic multi-entity commands ([`Transaction`]): the members a command
//! declares, the view its handler gets ([`TxContext`]), and the decision for one attempt
//! (dedup, versions, expected revisions, the handler under `catch_unwind`). No I/O: the
//! runtime (`runtime/transaction.rs`) holds the members, calls [`evaluate`], commits, and
//! releases them.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::core::effect;
use crate::entity::{Entity, Failure, FailureKind};
use crate::outcome::Recorded;

/// The key under which a transaction's dedup record and dead letter are stored (with the
/// transaction's name as the type).
pub(crate) const TX_KEY: &str = "~tx";

/// The most entities one transaction may hold.
pub const TX_MEMBERS_MAX: usize = 64;

/// An atomic command over several entities, possibly of different types: one synchronous,
/// deterministic handler sees all their states and changes any of them; every change, the
/// command's dedup record (with its reply) and the effects it records commit in **one
/// atomic batch**, or nothing does.
///
/// keystead holds the members for the handler's run, taking them from their owners in
/// one global order (entity type, then key), so two transactions over the same entities
/// cannot deadlock whatever order each names them in; while a member is held, its own
/// messages wait behind the transaction. The command has an id (a duplicate returns the
/// stored reply), an optional source version, expected revisions per member, and the
/// failure classes, retries and dead letters of a single message. Register it with
/// [`RuntimeBuilder::transaction`](crate::RuntimeBuilder::transaction); run it with
/// [`Runtime::transaction`](crate::Runtime::transaction).
///
/// ```
/// use keystead::{Context, Entity, Failure, FailureKind, Members, Runtime, Transaction, TxContext};
/// # #[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
/// # #[error("never")] struct Never;
/// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// struct Account;
/// impl Entity for Account {
///     const NAME: &'static str = "account";
///     type State = i64;
///     type Command = i64;
///     type Reply = i64;
///     type Error = Never;
///     fn handle(balance: &mut i64, by: &i64, _: &mut Context<'_>) -> Result<i64, Never> {
///         *balance += by;
///         Ok(*balance)
///     }
/// }
///
/// #[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
/// #[error("insufficient funds: {0} available")]
/// struct Insufficient(i64);
/// impl Failure for Insufficient {
///     fn kind(&self) -> FailureKind { FailureKind::Permanent }
/// }
///
/// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
/// struct Move { from: String, to: String, amount: i64 }
///
/// struct Transfer;
/// impl Transaction for Transfer {
///     const NAME: &'static str = "transfer";
///     type Command = Move;
///     type Reply = ();
///     type Error = Insufficient;
///     fn members(m: &Move) -> Members {
///         Members::new().with::<Account>(&m.from).with::<Account>(&m.to)
///     }
///     fn handle(m: &Move, tx: &mut TxContext<'_>) -> Result<(), Insufficient> {
///         let available = *tx.state::<Account>(&m.from);
///         if available < m.amount {
///             return Err(Insufficient(available));
///         }
///         *tx.state_mut::<Account>(&m.from) -= m.amount;
///         *tx.state_mut::<Account>(&m.to) += m.amount;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let rt = Runtime::builder(dir.path()).register::<Account>().transaction::<Transfer>().open()?;
/// rt.entity::<Account>("alice").ask(100).await?;
/// let m = Move { from: "alice".into(), to: "bob".into(), amount: 30 };
/// rt.transaction::<Transfer>(m.clone()).id("t-1").await?;
/// assert_eq!(rt.entity::<Account>("alice").snapshot().await?.state, 70);
/// assert_eq!(rt.entity::<Account>("bob").snapshot().await?.state, 30);
/// // The same id again: the stored result, nothing moves twice.
/// rt.transaction::<Transfer>(m).id("t-1").await?;
/// assert_eq!(rt.entity::<Account>("bob").snapshot().await?.state, 30);
/// # rt.shutdown().await; Ok(()) }
/// ```
pub trait Transaction: Send + Sync + 'static {
    /// A stable name (stored with its dedup records); unique among transactions and
    /// entity types.
    const NAME: &'static str;
    /// The command.
    type Command: Serialize + DeserializeOwned + fmt::Debug + Send + Sync + 'static;
    /// What the handler returns on success (stored for duplicates).
    type Reply: Serialize + DeserializeOwned + Clone + fmt::Debug + PartialEq + Send + 'static;
    /// What the handler returns on failure; its [`Failure::kind`] decides between
    /// rejection and retry.
    type Error: Failure + Clone + PartialEq;

    /// The entities the command changes or reads: fixed by the command, two or more (one
    /// works too), at most [`TX_MEMBERS_MAX`], no entity twice.
    fn members(command: &Self::Command) -> Members;

    /// Applies the command to the members' states (copies: nothing is kept unless it
    /// returns `Ok` and the batch commits). Synchronous and deterministic, like
    /// [`Entity::handle`].
    ///
    /// # Errors
    /// The transaction's error.
    fn handle(command: &Self::Command, tx: &mut TxContext<'_>) -> Result<Self::Reply, Self::Error>;
}

/// One member of a transaction: an entity type and key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub(crate) entity: &'static str,
    pub(crate) key: String,
}

impl Member {
    /// The entity type name.
    pub fn entity(&self) -> &'static str {
        self.entity
    }
    /// The entity key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// The entities a transaction holds, declared by [`Transaction::members`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    pub(crate) list: Vec<Member>,
}

impl Members {
    /// No member yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds entity `key` of type `E`.
    #[must_use]
    pub fn with<E: Entity>(mut self, key: impl Into<String>) -> Self {
        self.list.push(Member {
            entity: E::NAME,
            key: key.into(),
        });
        self
    }
    /// The members, in the order declared.
    pub fn list(&self) -> &[Member] {
        &self.list
    }
}

/// A held member as the handler sees it: its committed state (a copy), revision, version,
/// and the effects recorded for it.
pub(crate) struct Slot {
    pub entity: &'static str,
    pub key: String,
    pub revision: u64,
    pub version: Option<u64>,
    pub state: Box<dyn Any + Send>,
    pub effects: Vec<effect::Recorded>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("entity", &self.entity)
            .field("key", &self.key)
            .field("revision", &self.revision)
            .field("version", &self.version)
            .field("effects", &self.effects.len())
            .finish_non_exhaustive()
    }
}

/// What a transaction's handler sees: the members' states, and facts about the attempt.
#[derive(Debug)]
pub struct TxContext<'a> {
    pub(crate) slots: &'a mut [Slot],
    pub(crate) message_id: &'a str,
    pub(crate) correlation_id: &'a str,
    pub(crate) attempt: u32,
    pub(crate) now_ms: u64,
}

impl TxContext<'_> {
    fn slot(&self, entity: &'static str, key: &str) -> &Slot {
        match self
            .slots
            .iter()
            .find(|s| s.entity == entity && s.key == key)
        {
            Some(slot) => slot,
            None => not_a_member(entity, key),
        }
    }

    fn slot_mut(&mut self, entity: &'static str, key: &str) -> &mut Slot {
        match self
            .slots
            .iter_mut()
            .find(|s| s.entity == entity && s.key == key)
        {
            Some(slot) => slot,
            None => not_a_member(entity, key),
        }
    }

    /// Member `key` of type `E`'s state.
    ///
    /// # Panics
    /// If it is not a member (declare it in [`Transaction::members`]): the attempt fails
    /// like a panicking handler (retried, then dead-lettered), and nothing is written.
    pub fn state<E: Entity>(&self, key: &str) -> &E::State {
        match self.slot(E::NAME, key).state.downcast_ref::<E::State>() {
            Some(state) => state,
            None => not_a_member(E::NAME, key),
        }
    }

    /// Member `key` of type `E`'s state, to change.
    ///
    /// # Panics
    /// As [`TxContext::state`].
    pub fn state_mut<E: Entity>(&mut self, key: &str) -> &mut E::State {
        match self.slot_mut(E::NAME, key).state.downcast_mut::<E::State>() {
            Some(state) => state,
            None => not_a_member(E::NAME, key),
        }
    }

    /// Member `key` of type `E`'s revision before this transaction.
    ///
    /// # Panics
    /// As [`TxContext::state`].
    pub fn revision<E: Entity>(&self, key: &str) -> u64 {
        self.slot(E::NAME, key).revision
    }

    /// Records effect `effect` for member `key` of its origin type, exactly as
    /// [`Context::effect`](crate::Context::effect) does for a single message: it runs after
    /// the transaction commits, never if it does not.
    ///
    /// # Panics
    /// As [`TxContext::state`].
    pub fn effect<T: crate::Effect>(&mut self, key: &str, effect: T) {
        let slot = self.slot_mut(<T::Origin as Entity>::NAME, key);
        crate::entity::record_effect(&mut slot.effects, &effect);
    }

    /// The transaction's message id.
    pub fn message_id(&self) -> &str {
        self.message_id
    }
    /// The correlation id.
    pub fn correlation_id(&self) -> &str {
        self.correlation_id
    }
    /// The attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The runtime clock's time when this attempt started, ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }
}

fn not_a_member(entity: &str, key: &str) -> ! {
    panic!(
        "{entity} {key:?} is not a member of this transaction: declare it in Transaction::members"
    )
}

/// The stored result type of transaction `T`.
pub(crate) type TxRecorded<T> = Recorded<<T as Transaction>::Reply, <T as Transaction>::Error>;

/// What one attempt of a transaction decided.
#[derive(Debug)]
pub(crate) enum TxVerdict<T: Transaction> {
    /// A member has seen this source version or a newer one.
    Stale { current: u64 },
    /// A member's revision is not the one expected.
    Conflict {
        entity: &'static str,
        key: String,
        expected: u64,
        actual: u64,
    },
    /// The handler succeeded; the slots hold the new states and effects.
    Applied { reply: T::Reply },
    /// The handler failed permanently.
    Rejected { error: T::Error },
    /// Worth retrying (or it panicked), and attempts remain.
    Retry { error: String, panicked: bool },
    /// Worth retrying (or it panicked) on the last attempt.
    DeadLetter { error: String, panicked: bool },
}

/// One attempt: the checks in the order of a single message (the caller checked the dedup
/// record first), then the handler on the held copies. On anything but `Applied`, the
/// slots' states may be half-changed: throw them away.
pub(crate) fn evaluate<T: Transaction>(
    slots: &mut [Slot],
    command: &T::Command,
    version: Option<u64>,
    expected: &[(Member, u64)],
    ids: (&str, &str),
    (attempt, attempts_max, now_ms): (u32, u32, u64),
) -> TxVerdict<T> {
    if let Some(incoming) = version {
        if let Some(current) = slots.iter().filter_map(|s| s.version).max() {
            if incoming <= current {
                return TxVerdict::Stale { current };
            }
        }
    }
    for (member, revision) in expected {
        let actual = slots
            .iter()
            .find(|s| s.entity == member.entity && s.key == member.key)
            .map_or(0, |s| s.revision);
        if actual != *revision {
            return TxVerdict::Conflict {
                entity: member.entity,
                key: member.key.clone(),
                expected: *revision,
                actual,
            };
        }
    }
    let mut ctx = TxContext {
        slots,
        message_id: ids.0,
        correlation_id: ids.1,
        attempt,
        now_ms,
    };
    let result = catch_unwind(AssertUnwindSafe(|| T::handle(command, &mut ctx)));
    let last = attempt >= attempts_max;
    match result {
        Ok(Ok(reply)) => TxVerdict::Applied { reply },
        Ok(Err(error)) => match error.kind() {
            FailureKind::Permanent => TxVerdict::Rejected { error },
            FailureKind::Retryable if last => TxVerdict::DeadLetter {
                error: error.to_string(),
                panicked: false,
            },
            FailureKind::Retryable => TxVerdict::Retry {
                error: error.to_string(),
                panicked: false,
            },
        },
        Err(panic) => {
            let text = crate::core::apply::panic_text(panic.as_ref());
            let error = format!("transaction handler panicked: {text}");
            if last {
                TxVerdict::DeadLetter {
                    error,
                    panicked: true,
                }
            } else {
                TxVerdict::Retry {
                    error,
                    panicked: true,
                }
            }
        }
    }
}

/// Why a declared member list cannot run: `None` if it can.
pub(crate) fn check_members(members: &Members) -> Option<String> {
    let list = &members.list;
    if list.is_empty() {
        return Some("it declares no member".into());
    }
    if list.len() > TX_MEMBERS_MAX {
        return Some(format!(
            "it declares {} members; the limit is {TX_MEMBERS_MAX}",
            list.len()
        ));
    }
    let mut sorted: Vec<&Member> = list.iter().collect();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Some(format!("it declares {} {:?} twice", w[0].entity, w[0].key));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_list_is_checked() {
        struct A;
        impl Entity for A {
            const NAME: &'static str = "a";
            type State = u8;
            type Command = u8;
            type Reply = u8;
            type Error = crate::core::transaction::tests::Never;
            fn handle(_: &mut u8, _: &u8, _: &mut crate::Context<'_>) -> Result<u8, Never> {
                Ok(0)
            }
        }
        assert!(check_members(&Members::new()).is_some());
        assert!(check_members(&Members::new().with::<A>("x").with::<A>("y")).is_none());
        let twice = check_members(&Members::new().with::<A>("x").with::<A>("x"));
        assert!(twice.is_some_and(|t| t.contains("twice")));
        let mut many = Members::new();
        for i in 0..=TX_MEMBERS_MAX {
            many = many.with::<A>(format!("k{i}"));
        }
        assert!(check_members(&many).is_some_and(|t| t.contains("limit")));
    }

    #[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, serde::Deserialize)]
    #[error("never")]
    pub(crate) struct Never;
    impl Failure for Never {
        fn kind(&self) -> FailureKind {
            FailureKind::Permanent
        }
    }
}
