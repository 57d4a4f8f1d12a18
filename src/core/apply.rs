//! The pure core: what happens to one message, given the entity as committed, the dedup
//! record for its id (if any), and the attempt number. No I/O, no actix, no clock reads:
//! the shell (the entity actor, in `runtime`) does the lookups, calls [`evaluate`], commits
//! [`writes`], and replies.
//!
//! The checks run in a fixed order, and that order is the contract:
//! 1. dedup: an id seen before returns its first result (`Duplicate`), whatever else holds;
//! 2. version: a source version not greater than the entity's is `Stale`;
//! 3. expected revision: a mismatch is a `Conflict` and changes nothing;
//! 4. the handler, on a copy of the state, inside `catch_unwind`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::core::codec;
use crate::core::keys;
use crate::core::ops::Op;
use crate::core::records::{DeadLetterRecord, DedupRecord, Meta, StateRecord};
use crate::entity::{Context, Entity, Failure, FailureKind};
use crate::outcome::{Outcome, Recorded};
use crate::priority::Priority;

/// The stored result type of entity `E`.
pub(crate) type RecordedOf<E> = Recorded<<E as Entity>::Reply, <E as Entity>::Error>;
/// The outcome type of entity `E`.
pub(crate) type OutcomeOf<E> = Outcome<<E as Entity>::Reply, <E as Entity>::Error>;

/// The writes that retire a message and the outcome to report once they are durable.
pub(crate) type Planned<E> = (Vec<Op>, OutcomeOf<E>);

/// An entity as last committed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Loaded<S> {
    pub revision: u64,
    pub version: Option<u64>,
    pub state: S,
}

impl<S: Default> Default for Loaded<S> {
    fn default() -> Self {
        Self {
            revision: 0,
            version: None,
            state: S::default(),
        }
    }
}

impl<S> From<StateRecord<S>> for Loaded<S> {
    fn from(r: StateRecord<S>) -> Self {
        Self {
            revision: r.revision,
            version: r.version,
            state: r.state,
        }
    }
}

/// One attempt at one message.
#[derive(Debug)]
pub(crate) struct Attempt<'a, C> {
    pub key: &'a str,
    pub meta: &'a Meta,
    pub command: &'a C,
    pub expected_revision: Option<u64>,
    pub attempt: u32,
    pub attempts_max: u32,
    pub now_ms: u64,
}

/// What the core decided.
#[derive(Debug)]
pub(crate) enum Verdict<E: Entity> {
    /// The id was processed before.
    Duplicate(RecordedOf<E>),
    /// The version is not newer than the entity's.
    Stale { current: u64 },
    /// The expected revision does not match.
    Conflict { expected: u64, actual: u64 },
    /// The handler succeeded: the new entity, the reply, and the effects it recorded.
    Applied {
        next: Loaded<E::State>,
        reply: E::Reply,
        effects: Vec<crate::core::effect::Recorded>,
    },
    /// The handler failed permanently.
    Rejected { error: E::Error },
    /// The handler failed in a way worth retrying (or panicked), and attempts remain.
    Retry { error: String, panicked: bool },
    /// The handler failed in a way worth retrying (or panicked) on the last attempt.
    DeadLetter { error: String, panicked: bool },
}

/// Decides the fate of `attempt` against `current`. `dedup` is the stored first result for
/// the message id, if any.
pub(crate) fn evaluate<E: Entity>(
    current: &Loaded<E::State>,
    dedup: Option<RecordedOf<E>>,
    attempt: &Attempt<'_, E::Command>,
) -> Verdict<E> {
    if let Some(first) = dedup {
        return Verdict::Duplicate(first);
    }
    if let (Some(incoming), Some(current_version)) = (attempt.meta.version, current.version) {
        if incoming <= current_version {
            return Verdict::Stale {
                current: current_version,
            };
        }
    }
    if let Some(expected) = attempt.expected_revision {
        if expected != current.revision {
            return Verdict::Conflict {
                expected,
                actual: current.revision,
            };
        }
    }
    let mut draft = current.state.clone();
    let mut ctx = Context {
        effects: Vec::new(),
        entity: E::NAME,
        key: attempt.key,
        message_id: &attempt.meta.message_id,
        correlation_id: &attempt.meta.correlation_id,
        attempt: attempt.attempt,
        now_ms: attempt.now_ms,
        revision: current.revision,
        version: current.version,
        message_version: attempt.meta.version,
    };
    // The draft is thrown away if the handler panics, so no broken invariant can escape:
    // asserting unwind safety is sound here.
    let result = catch_unwind(AssertUnwindSafe(|| {
        E::handle(&mut draft, attempt.command, &mut ctx)
    }));
    let last = attempt.attempt >= attempt.attempts_max;
    match result {
        Ok(Ok(reply)) => {
            let next = Loaded {
                revision: current.revision + 1,
                version: attempt.meta.version.or(current.version),
                state: draft,
            };
            assert!(
                next.revision > current.revision,
                "an applied change bumps the revision"
            );
            Verdict::Applied {
                next,
                reply,
                effects: ctx.effects,
            }
        }
        Ok(Err(error)) => match error.kind() {
            FailureKind::Permanent => Verdict::Rejected { error },
            FailureKind::Retryable if last => Verdict::DeadLetter {
                error: error.to_string(),
                panicked: false,
            },
            FailureKind::Retryable => Verdict::Retry {
                error: error.to_string(),
                panicked: false,
            },
        },
        Err(panic) => {
            let text = panic_text(panic.as_ref());
            let error = format!("handler panicked: {text}");
            if last {
                Verdict::DeadLetter {
                    error,
                    panicked: true,
                }
            } else {
                Verdict::Retry {
                    error,
                    panicked: true,
                }
            }
        }
    }
}

pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Where a message came from, for the writes that retire it.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    /// The inbox key to remove, for messages accepted by `tell` or requeued.
    pub inbox_key: Option<Vec<u8>>,
    /// Its lane index entry, removed with it.
    pub index_key: Option<Vec<u8>>,
    /// The encoded command, needed to dead-letter it.
    pub command_bytes: Option<Vec<u8>>,
    /// When the first attempt failed, if one did.
    pub first_failed_at_ms: Option<u64>,
}

/// When and where a message's writes happen: its attempt number, the clock, and the
/// outbox sequence for the effects it recorded (unused when it recorded none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp {
    pub attempt: u32,
    pub now_ms: u64,
    pub outbox_seq: u64,
    /// The message's lane: its effects wait in the same one.
    pub lane: Priority,
    /// Write an outbox lane index entry for each effect: false only when an effect worker
    /// of the entity is already pinned to read them (see `Effects::claim`).
    pub index_effects: bool,
    /// Append the change to the change feed (the entity type publishes its changes).
    pub feed: bool,
}

/// The writes that make `verdict` durable, and the outcome to report once they are.
/// `None` for a conflict (nothing is written; the caller gets an error).
///
/// # Errors
/// The encoder's message if a reply, error or command cannot be encoded.
pub(crate) fn writes<E: Entity>(
    key: &str,
    meta: &Meta,
    source: &Source,
    command: &E::Command,
    verdict: &Verdict<E>,
    stamp: Stamp,
) -> Result<Option<Planned<E>>, String> {
    let Stamp {
        attempt,
        now_ms,
        outbox_seq,
        lane,
        index_effects,
        feed,
    } = stamp;
    let dedup_key = || keys::dedup(E::NAME, key, &meta.message_id);
    let dedup = |outcome: RecordedOf<E>| -> Result<Op, String> {
        let record = DedupRecord {
            recorded_at_ms: now_ms,
            outcome,
        };
        Ok(Op::Put(dedup_key(), codec::encode(&record)?))
    };
    let mut ops = Vec::with_capacity(3);
    let outcome = match verdict {
        Verdict::Conflict { .. } | Verdict::Retry { .. } => return Ok(None),
        Verdict::Duplicate(first) => Outcome::Duplicate {
            first: first.clone(),
        },
        Verdict::Stale { current } => {
            ops.push(dedup(Recorded::Stale { current: *current })?);
            Outcome::Stale { current: *current }
        }
        Verdict::Applied {
            next,
            reply,
            effects,
        } => {
            ops.extend(crate::core::effect::outbox_ops(
                E::NAME,
                key,
                meta,
                (outbox_seq, lane),
                effects,
                now_ms,
                index_effects,
            )?);
            let record = StateRecord {
                revision: next.revision,
                version: next.version,
                updated_at_ms: now_ms,
                state: &next.state,
            };
            let state = codec::encode(&record)?;
            if feed {
                let change = crate::core::records::ChangeRecord {
                    entity: E::NAME.to_string(),
                    key: key.to_string(),
                    message_id: meta.message_id.clone(),
                    correlation_id: meta.correlation_id.clone(),
                    state: state.clone(),
                };
                ops.push(Op::Append(codec::encode(&change)?));
            }
            ops.push(Op::Put(keys::state(E::NAME, key), state));
            if next.revision == 1 {
                // A new entity: it enters the listing index, once.
                ops.push(Op::Put(keys::entity_index(E::NAME, key), Vec::new()));
            }
            ops.push(dedup(Recorded::Applied {
                reply: reply.clone(),
                revision: next.revision,
            })?);
            Outcome::Applied {
                reply: reply.clone(),
                revision: next.revision,
            }
        }
        Verdict::Rejected { error } => {
            ops.push(dedup(Recorded::Rejected {
                error: error.clone(),
            })?);
            Outcome::Rejected {
                error: error.clone(),
            }
        }
        Verdict::DeadLetter { error, .. } => {
            let command = match &source.command_bytes {
                Some(bytes) => bytes.clone(),
                None => codec::encode(command)?,
            };
            let letter = DeadLetterRecord {
                meta: meta.clone(),
                command,
                error: error.clone(),
                attempts: attempt,
                first_failed_at_ms: source.first_failed_at_ms.unwrap_or(now_ms),
                last_failed_at_ms: now_ms,
            };
            ops.push(Op::Put(
                keys::dead_letter(E::NAME, key, &meta.message_id),
                codec::encode(&letter)?,
            ));
            ops.push(dedup(Recorded::DeadLettered {
                error: error.clone(),
                attempts: attempt,
            })?);
            Outcome::DeadLettered {
                error: error.clone(),
                attempts: attempt,
            }
        }
    };
    if let Some(inbox_key) = &source.inbox_key {
        ops.push(Op::Delete(inbox_key.clone()));
    }
    if let Some(index_key) = &source.index_key {
        ops.push(Op::Delete(index_key.clone()));
    }
    Ok(Some((ops, outcome)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    struct Sub {
        status: String,
    }
    #[derive(Debug, Serialize, Deserialize)]
    enum Cmd {
        Set(String),
        Flaky,
        Boom,
        Illegal,
    }
    #[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
    enum Err {
        #[error("illegal")]
        Illegal,
        #[error("timeout")]
        Timeout,
    }
    impl Failure for Err {
        fn kind(&self) -> FailureKind {
            match self {
                Err::Illegal => FailureKind::Permanent,
                Err::Timeout => FailureKind::Retryable,
            }
        }
    }
    #[derive(Debug)]
    struct E;
    impl Entity for E {
        const NAME: &'static str = "sub";
        type State = Sub;
        type Command = Cmd;
        type Reply = String;
        type Error = Err;
        fn handle(state: &mut Sub, cmd: &Cmd, _ctx: &mut Context<'_>) -> Result<String, Err> {
            match cmd {
                Cmd::Set(s) => {
                    state.status = s.clone();
                    Ok(s.clone())
                }
                Cmd::Flaky => Err(Err::Timeout),
                Cmd::Boom => {
                    state.status = "half-written".into();
                    panic!("boom")
                }
                Cmd::Illegal => Err(Err::Illegal),
            }
        }
    }

    const STAMP: Stamp = Stamp {
        attempt: 1,
        now_ms: 10,
        outbox_seq: 0,
        lane: Priority::Normal,
        index_effects: true,
        feed: false,
    };

    fn meta(version: Option<u64>) -> Meta {
        Meta {
            message_id: "m1".into(),
            correlation_id: "c1".into(),
            version,
            accepted_at_ms: 0,
        }
    }

    fn attempt<'a>(meta: &'a Meta, cmd: &'a Cmd, n: u32) -> Attempt<'a, Cmd> {
        Attempt {
            key: "k",
            meta,
            command: cmd,
            expected_revision: None,
            attempt: n,
            attempts_max: 3,
            now_ms: 10,
        }
    }

    fn at(version: Option<u64>, revision: u64) -> Loaded<Sub> {
        Loaded {
            revision,
            version,
            state: Sub {
                status: "active".into(),
            },
        }
    }

    #[test]
    fn applied_bumps_revision_and_keeps_the_highest_version() {
        let m = meta(Some(5));
        let cmd = Cmd::Set("cancelled".into());
        match evaluate::<E>(&at(Some(4), 2), None, &attempt(&m, &cmd, 1)) {
            Verdict::Applied { next, reply, .. } => {
                assert_eq!(next.revision, 3);
                assert_eq!(next.version, Some(5));
                assert_eq!(next.state.status, "cancelled");
                assert_eq!(reply, "cancelled");
            }
            other => panic!("expected Applied, got {other:?}"),
        }
    }

    #[test]
    fn a_late_renew_after_cancel_is_stale() {
        let m = meta(Some(4));
        let cmd = Cmd::Set("renewed".into());
        assert!(matches!(
            evaluate::<E>(&at(Some(5), 3), None, &attempt(&m, &cmd, 1)),
            Verdict::Stale { current: 5 }
        ));
        let m = meta(Some(5));
        assert!(
            matches!(
                evaluate::<E>(&at(Some(5), 3), None, &attempt(&m, &cmd, 1)),
                Verdict::Stale { current: 5 }
            ),
            "an equal version is not newer"
        );
    }

    #[test]
    fn duplicate_wins_over_everything() {
        let m = meta(Some(1));
        let cmd = Cmd::Illegal;
        let first = Recorded::Applied {
            reply: "x".to_string(),
            revision: 1,
        };
        assert!(matches!(
            evaluate::<E>(&at(Some(9), 9), Some(first), &attempt(&m, &cmd, 1)),
            Verdict::Duplicate(Recorded::Applied { revision: 1, .. })
        ));
    }

    #[test]
    fn conflict_and_classified_failures() {
        let m = meta(None);
        let cmd = Cmd::Set("x".into());
        let mut a = attempt(&m, &cmd, 1);
        a.expected_revision = Some(1);
        assert!(matches!(
            evaluate::<E>(&at(None, 2), None, &a),
            Verdict::Conflict {
                expected: 1,
                actual: 2
            }
        ));
        assert!(matches!(
            evaluate::<E>(&at(None, 2), None, &attempt(&m, &Cmd::Illegal, 1)),
            Verdict::Rejected {
                error: Err::Illegal
            }
        ));
        assert!(matches!(
            evaluate::<E>(&at(None, 2), None, &attempt(&m, &Cmd::Flaky, 2)),
            Verdict::Retry {
                panicked: false,
                ..
            }
        ));
        assert!(matches!(
            evaluate::<E>(&at(None, 2), None, &attempt(&m, &Cmd::Flaky, 3)),
            Verdict::DeadLetter {
                panicked: false,
                ..
            }
        ));
    }

    #[test]
    fn a_panic_is_a_retryable_failure_and_leaves_the_state_alone() {
        let m = meta(None);
        let before = at(None, 2);
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let verdict = evaluate::<E>(&before, None, &attempt(&m, &Cmd::Boom, 1));
        std::panic::set_hook(hook);
        match verdict {
            Verdict::Retry { error, panicked } => {
                assert!(panicked);
                assert!(error.contains("boom"), "{error}");
            }
            other => panic!("expected Retry, got {other:?}"),
        }
        assert_eq!(before.state.status, "active");
    }

    #[test]
    fn writes_retire_the_inbox_entry_with_the_outcome() {
        let m = meta(Some(2));
        let cmd = Cmd::Set("a".into());
        let source = Source {
            inbox_key: Some(keys::inbox("sub", "k", 7)),
            index_key: None,
            command_bytes: None,
            first_failed_at_ms: None,
        };
        let verdict = evaluate::<E>(&at(Some(1), 0), None, &attempt(&m, &cmd, 1));
        let (ops, outcome) = writes::<E>("k", &m, &source, &cmd, &verdict, STAMP)
            .expect("encodes")
            .expect("applied writes");
        assert_eq!(
            outcome,
            Outcome::Applied {
                reply: "a".into(),
                revision: 1
            }
        );
        // A new entity (revision 0 -> 1) also enters the listing index.
        assert_eq!(
            ops.len(),
            4,
            "state + listing index + dedup + inbox removal: {ops:?}"
        );
        assert!(matches!(&ops[0], Op::Put(k, _) if *k == keys::state("sub", "k")));
        assert!(matches!(&ops[1], Op::Put(k, _) if *k == keys::entity_index("sub", "k")));
        assert!(matches!(&ops[3], Op::Delete(k) if *k == keys::inbox("sub", "k", 7)));

        let dup = Verdict::<E>::Duplicate(Recorded::Stale { current: 3 });
        let (ops, _) = writes::<E>("k", &m, &source, &cmd, &dup, STAMP)
            .expect("encodes")
            .expect("duplicate writes");
        assert_eq!(ops, vec![Op::Delete(keys::inbox("sub", "k", 7))]);
    }
}
