//! The script: the messages the outside world sends in a scenario, and the entities they
//! touch. The testkit decides when, how often and in which order they arrive.

use std::any::Any;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::effects::{EffectInfo, EffectStatus};
use crate::entity::Entity;
use crate::error::{AdminError, SubmitError};
use crate::outcome::Outcome;
use crate::runtime::address::Snapshot;
use crate::runtime::Runtime;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A read of the runtime's records, borrowing the runtime and the key.
pub(crate) type ReadFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What one delivery produced.
pub(crate) struct Observed {
    /// The outcome in words (the same words in every replay of a seed).
    pub summary: String,
    /// `Result<Outcome<..>, SubmitError>` for an ask, `Result<Accepted, SubmitError>` for a
    /// tell.
    pub value: Box<dyn Any + Send>,
    /// An error the runtime must never give a well-formed script (anything but `Conflict`).
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Ask,
    Tell,
    /// An operation on the runtime (creating a schedule), awaited like a tell.
    Operation,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Ask => "ask",
            Kind::Tell => "tell",
            Kind::Operation => "operation",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    pub id: Option<String>,
    pub version: Option<u64>,
    pub expected_revision: Option<u64>,
}

type SendFn = Arc<dyn Fn(&Runtime, &str, &Options) -> BoxFuture<Observed> + Send + Sync>;

/// A scripted message.
pub(crate) struct Planned {
    pub label: Option<String>,
    pub kind: Kind,
    pub key: usize,
    pub options: Options,
    pub once: bool,
    /// How many clock moves come before it in the script: messages are reordered only
    /// among those of the same phase.
    pub phase: usize,
    send: SendFn,
}

/// A snapshot in words (for the picture) and typed (for [`Run::state`](super::Run::state)).
pub(crate) type Snapshotted = (String, Box<dyn Any + Send>);

/// A typed read of one entity's records, called without knowing its type.
pub(crate) type ReadFn<T> = for<'a> fn(&'a Runtime, &'a str) -> ReadFuture<'a, T>;

/// How to look at one entity (type and key) without knowing its type.
pub(crate) struct Probe {
    pub entity: &'static str,
    pub key: String,
    pub snapshot: ReadFn<Result<Snapshotted, SubmitError>>,
    pub passivate: fn(&Runtime, &str) -> BoxFuture<Result<bool, AdminError>>,
    pub dead_letters: ReadFn<Result<Vec<String>, AdminError>>,
    pub effects: ReadFn<Result<Vec<EffectInfo>, AdminError>>,
}

impl Probe {
    pub(crate) fn name(&self) -> String {
        format!("{}/{}", self.entity, self.key)
    }
}

/// The messages of a scenario. Each is an event the outside world sends once in a calm run;
/// under chaos it may arrive late, early, twice or three times.
///
/// A message without an [`id`](Message::id) gets a fresh generated id at every delivery,
/// exactly like a caller that resends without an idempotency key, so a duplicate of it
/// is a second, different message. That is usually the bug a chaos test is there to find.
///
/// ```
/// # use keystead::{Context, Entity, Failure, FailureKind};
/// # #[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
/// # #[error("never")] struct Never;
/// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// # struct Counter;
/// # impl Entity for Counter {
/// #     const NAME: &'static str = "counter"; type State = u64; type Command = u64;
/// #     type Reply = u64; type Error = Never;
/// #     fn handle(s: &mut u64, by: &u64, _: &mut Context<'_>) -> Result<u64, Never> { *s += by; Ok(*s) }
/// # }
/// use keystead::testkit::Script;
/// fn script(s: &mut Script) {
///     s.ask::<Counter>("c-1", 5).id("add-5");           // an idempotent request
///     s.tell::<Counter>("c-1", 7).id("add-7").version(3); // a versioned event
/// }
/// ```
#[derive(Default)]
pub struct Script {
    pub(crate) messages: Vec<Planned>,
    pub(crate) probes: Vec<Probe>,
    /// The clock moves, in script order: each is how far the runtime's clock stands past
    /// [`CLOCK_START_MS`](super::CLOCK_START_MS) once the messages before it are delivered.
    pub(crate) clock_moves: Vec<u64>,
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("messages", &self.messages.len())
            .field("entities", &self.probes.len())
            .field("clock_moves", &self.clock_moves.len())
            .finish()
    }
}

impl Script {
    /// Adds an `ask` of `command` to entity `key` of type `E`. Its outcomes are in
    /// [`Run::outcomes`](super::Run::outcomes).
    pub fn ask<E: Entity>(&mut self, key: impl Into<String>, command: E::Command) -> Message<'_>
    where
        E::Command: Clone,
        E::State: fmt::Debug,
    {
        let command = Mutex::new(command);
        let send: SendFn = Arc::new(move |rt, key, options| {
            let mut ask = rt.entity::<E>(key).ask(command.lock().clone());
            if let Some(id) = &options.id {
                ask = ask.id(id.clone());
            }
            if let Some(version) = options.version {
                ask = ask.version(version);
            }
            if let Some(revision) = options.expected_revision {
                ask = ask.expect_revision(revision);
            }
            let future = ask.into_future();
            Box::pin(async move { observe_ask::<E>(future.await) })
        });
        self.push::<E>(key.into(), Kind::Ask, send)
    }

    /// Adds a `tell` of `command` to entity `key` of type `E`: accepted into the durable
    /// inbox, processed later. Check its effect on the final state.
    pub fn tell<E: Entity>(&mut self, key: impl Into<String>, command: E::Command) -> Message<'_>
    where
        E::Command: Clone,
        E::State: fmt::Debug,
    {
        let command = Mutex::new(command);
        let send: SendFn = Arc::new(move |rt, key, options| {
            let mut tell = rt.entity::<E>(key).tell(command.lock().clone());
            if let Some(id) = &options.id {
                tell = tell.id(id.clone());
            }
            if let Some(version) = options.version {
                tell = tell.version(version);
            }
            let future = tell.into_future();
            Box::pin(async move {
                let result = future.await;
                let (summary, problem) = match &result {
                    Ok(_) => ("accepted".to_string(), None),
                    Err(e) => (format!("error: {e}"), Some(e.to_string())),
                };
                Observed {
                    summary,
                    value: Box::new(result),
                    problem,
                }
            })
        });
        self.push::<E>(key.into(), Kind::Tell, send)
    }

    /// Adds the creation of `schedule` (durable and idempotent: a duplicate delivery
    /// changes nothing). Its targets become entities of the script, so
    /// [`Run::state`](super::Run::state) reads them, and its counters are in
    /// [`Run::schedule`](super::Run::schedule) and in the compared picture. Its runs fire
    /// when the runtime's clock reaches them: move it with [`advance`](Script::advance).
    /// The message's key is the schedule's first target.
    ///
    /// # Panics
    /// If the schedule has no target (a mistake in the test, not a chaos finding).
    pub fn schedule<E: Entity>(&mut self, schedule: crate::time::Schedule<E>) -> Message<'_>
    where
        E::Command: Clone,
        E::State: fmt::Debug,
    {
        let targets = schedule.targets().to_vec();
        assert!(
            !targets.is_empty(),
            "keystead chaos: schedule {} has no target; add .to(key)",
            schedule.name()
        );
        for key in &targets[1..] {
            self.probe::<E>(key.clone());
        }
        let label = format!("schedule {}", schedule.name());
        let schedule = Mutex::new(schedule);
        let send: SendFn = Arc::new(move |rt, _key, _options| {
            let schedule = schedule.lock().clone();
            let schedules = rt.schedules();
            Box::pin(async move {
                let result = schedules.create(schedule).await;
                let (summary, problem) = match &result {
                    Ok(_) => ("created".to_string(), None),
                    Err(e) => (format!("error: {e}"), Some(e.to_string())),
                };
                Observed {
                    summary,
                    value: Box::new(result.map(|_| ())),
                    problem,
                }
            })
        });
        self.push::<E>(targets[0].clone(), Kind::Operation, send)
            .label(label)
    }

    /// Includes entity `key` of type `E` in the final picture and in
    /// [`Run::state`](super::Run::state) without sending it anything (a transaction's
    /// members must be watched, or addressed by another message, so the testkit knows
    /// their types).
    pub fn watch<E: Entity>(&mut self, key: impl Into<String>)
    where
        E::State: fmt::Debug,
    {
        self.probe::<E>(key.into());
    }

    /// Adds a batch of `ask`s, built by `build` (see [`ScriptBatch`]); chaos delivers the
    /// whole batch as one message (duplicated, reordered, racing other messages). Each
    /// delivery's answers, in the order the batch was built, are in
    /// [`Run::batch_results`](super::Run::batch_results).
    pub fn ask_batch(
        &mut self,
        label: impl Into<String>,
        build: impl FnOnce(&mut ScriptBatch<'_>),
    ) -> Message<'_> {
        self.batch(label.into(), build, Kind::Ask)
    }

    /// Adds a batch of `tell`s, built by `build` (see [`ScriptBatch`]), written in one
    /// atomic write at each delivery. Each delivery's message ids, in the order the batch
    /// was built, are in [`Run::batch_results`](super::Run::batch_results).
    pub fn tell_batch(
        &mut self,
        label: impl Into<String>,
        build: impl FnOnce(&mut ScriptBatch<'_>),
    ) -> Message<'_> {
        self.batch(label.into(), build, Kind::Tell)
    }

    fn batch(
        &mut self,
        label: String,
        build: impl FnOnce(&mut ScriptBatch<'_>),
        kind: Kind,
    ) -> Message<'_> {
        let mut batch = ScriptBatch {
            script: self,
            entries: Vec::new(),
        };
        build(&mut batch);
        let entries = Arc::new(std::mem::take(&mut batch.entries));
        assert!(
            !entries.is_empty(),
            "keystead chaos: batch {label} is empty; add asks or tells to it"
        );
        let first = entries[0].key.clone();
        let send: SendFn = Arc::new(move |rt, _key, _options| {
            let entries = entries.clone();
            match kind {
                Kind::Tell => {
                    let mut batch = rt.tell_batch();
                    for e in entries.iter() {
                        (e.push_tell)(rt, &mut batch);
                    }
                    Box::pin(async move {
                        let result = batch.send().await;
                        let (summary, problem, value) = match result {
                            Ok(accepted) => {
                                let ids: Vec<Result<String, String>> =
                                    accepted.into_iter().map(|a| Ok(a.message_id)).collect();
                                (format!("accepted {}", ids.len()), None, ids)
                            }
                            Err(e) => (format!("error: {e}"), Some(e.to_string()), Vec::new()),
                        };
                        Observed {
                            summary,
                            value: Box::new(value),
                            problem,
                        }
                    })
                }
                _ => {
                    let mut batch = rt.ask_batch();
                    let takers: Vec<_> = entries
                        .iter()
                        .map(|e| (e.push_ask)(rt, &mut batch))
                        .collect();
                    Box::pin(async move {
                        let mut answers = batch.send().await;
                        let mut results = Vec::with_capacity(takers.len());
                        let mut problem = None;
                        for take in takers {
                            let result = take(&mut answers);
                            if let Err(e) = &result {
                                if !e.starts_with("Conflict") {
                                    problem.get_or_insert_with(|| e.clone());
                                }
                            }
                            results.push(result);
                        }
                        Observed {
                            summary: format!("{results:?}"),
                            value: Box::new(results),
                            problem,
                        }
                    })
                }
            }
        });
        let entity =
            self.probes[self.probes.iter().position(|p| p.key == first).unwrap_or(0)].entity;
        let index = self
            .probes
            .iter()
            .position(|p| p.key == first && p.entity == entity)
            .unwrap_or(0);
        self.messages.push(Planned {
            label: Some(label),
            kind: if kind == Kind::Tell {
                Kind::Operation
            } else {
                Kind::Ask
            },
            key: index,
            options: Options::default(),
            once: false,
            phase: self.clock_moves.len(),
            send,
        });
        let planned = self.messages.last_mut().expect("pushed just above");
        Message { planned }
    }

    /// Adds transaction `T` with `command` (see [`Transaction`](crate::Transaction)). Its
    /// members' entity types must be known to the script: [`watch`](Script::watch) them
    /// (or address them by another message) first. Its outcomes are in
    /// [`Run::transaction_outcomes`](super::Run::transaction_outcomes).
    ///
    /// # Panics
    /// If a member's type is not known to the script (a mistake in the test).
    pub fn transaction<T: crate::Transaction>(&mut self, command: T::Command) -> Message<'_>
    where
        T::Command: Clone,
    {
        let members = T::members(&command);
        let mut first = None;
        for m in members.list() {
            let known = self
                .probes
                .iter()
                .position(|p| p.entity == m.entity() && p.key == m.key())
                .or_else(|| {
                    // Another key of a known type: copy its probe functions.
                    let like = self.probes.iter().position(|p| p.entity == m.entity())?;
                    let p = &self.probes[like];
                    let probe = Probe {
                        entity: p.entity,
                        key: m.key().to_string(),
                        snapshot: p.snapshot,
                        passivate: p.passivate,
                        dead_letters: p.dead_letters,
                        effects: p.effects,
                    };
                    self.probes.push(probe);
                    Some(self.probes.len() - 1)
                });
            match known {
                Some(index) => {
                    first.get_or_insert(index);
                }
                None => panic!(
                    "keystead chaos: transaction {} has member {} {:?} of a type the script does not know; call Script::watch::<{}>(..) first",
                    T::NAME,
                    m.entity(),
                    m.key(),
                    m.entity()
                ),
            }
        }
        let command = Mutex::new(command);
        let send: SendFn = Arc::new(move |rt, _key, options| {
            let mut tx = rt.transaction::<T>(command.lock().clone());
            if let Some(id) = &options.id {
                tx = tx.id(id.clone());
            }
            if let Some(version) = options.version {
                tx = tx.version(version);
            }
            let future = tx.into_future();
            Box::pin(async move {
                let result = future.await;
                let (summary, problem) = match &result {
                    Ok(outcome) => (format!("{outcome:?}"), None),
                    Err(SubmitError::Conflict { .. }) => (format!("{result:?}"), None),
                    Err(e) => (format!("error: {e}"), Some(e.to_string())),
                };
                Observed {
                    summary,
                    value: Box::new(result),
                    problem,
                }
            })
        });
        self.messages.push(Planned {
            label: None,
            kind: Kind::Ask,
            key: first.unwrap_or(0),
            options: Options::default(),
            once: false,
            phase: self.clock_moves.len(),
            send,
        });
        let planned = self.messages.last_mut().expect("pushed just above");
        Message { planned }
    }

    /// Moves the runtime's [`ManualClock`](crate::ManualClock) forward by `by` once every
    /// message scripted before this call has been delivered and the runtime is idle, then
    /// waits until it is idle again (so the delayed messages and schedule runs that fell
    /// due have been delivered). Chaos reorders messages only between two clock moves, and
    /// a restart may come right after a move, while what it fired is still running.
    pub fn advance(&mut self, by: std::time::Duration) {
        let previous = self.clock_moves.last().copied().unwrap_or(0);
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.clock_moves.push(previous.saturating_add(by));
    }

    /// The index of entity `key` of type `E` among the probes, added if new.
    fn probe<E: Entity>(&mut self, key: String) -> usize
    where
        E::State: fmt::Debug,
    {
        match self
            .probes
            .iter()
            .position(|p| p.entity == E::NAME && p.key == key)
        {
            Some(index) => index,
            None => {
                self.probes.push(Probe {
                    entity: E::NAME,
                    key,
                    snapshot: snapshot_of::<E>,
                    passivate: passivate_of::<E>,
                    dead_letters: dead_letters_of::<E>,
                    effects: effects_of::<E>,
                });
                self.probes.len() - 1
            }
        }
    }

    fn push<E: Entity>(&mut self, key: String, kind: Kind, send: SendFn) -> Message<'_>
    where
        E::State: fmt::Debug,
    {
        let index = self.probe::<E>(key);
        self.messages.push(Planned {
            label: None,
            kind,
            key: index,
            options: Options::default(),
            once: false,
            phase: self.clock_moves.len(),
            send,
        });
        let planned = self
            .messages
            .last_mut()
            .expect("a message was pushed just above");
        Message { planned }
    }

    /// The label of message `index`: its own, else its id, else `#index`.
    pub(crate) fn label(&self, index: usize) -> String {
        let m = &self.messages[index];
        m.label
            .clone()
            .or_else(|| m.options.id.clone())
            .unwrap_or_else(|| format!("#{index}"))
    }

    pub(crate) fn send(&self, index: usize, rt: &Runtime) -> BoxFuture<Observed> {
        let m = &self.messages[index];
        (m.send)(rt, &self.probes[m.key].key, &m.options)
    }
}

type PushAsk = Arc<
    dyn Fn(
            &Runtime,
            &mut crate::AskBatch,
        ) -> Box<dyn FnOnce(&mut crate::Answers) -> Result<String, String> + Send>
        + Send
        + Sync,
>;
type PushTell = Arc<dyn Fn(&Runtime, &mut crate::TellBatch) + Send + Sync>;

/// One entry of a scripted batch.
struct BatchEntry {
    key: String,
    push_ask: PushAsk,
    push_tell: PushTell,
}

/// The messages of one scripted batch, in the caller's order. Built in the closure given
/// to [`Script::ask_batch`] or [`Script::tell_batch`].
pub struct ScriptBatch<'a> {
    script: &'a mut Script,
    entries: Vec<BatchEntry>,
}

impl fmt::Debug for ScriptBatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptBatch")
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl ScriptBatch<'_> {
    /// Adds `command` to entity `key` of type `E`, with message id `id` (a batch's
    /// messages always carry ids: chaos delivers the batch more than once). Its answer is
    /// its outcome in words.
    pub fn add<E: Entity>(
        &mut self,
        key: impl Into<String>,
        command: E::Command,
        id: impl Into<String>,
    ) -> &mut Self
    where
        E::Command: Clone + Sync,
        E::State: fmt::Debug,
    {
        let (key, id) = (key.into(), id.into());
        self.script.probe::<E>(key.clone());
        let (k, i, c) = (key.clone(), id.clone(), command.clone());
        let push_ask: PushAsk = Arc::new(move |rt, batch| {
            let answer = batch.push(rt.entity::<E>(k.clone()).ask(c.clone()).id(i.clone()));
            Box::new(
                move |answers: &mut crate::Answers| match answers.take(answer) {
                    Ok(outcome) => Ok(format!("{outcome:?}")),
                    Err(SubmitError::Conflict {
                        expected, actual, ..
                    }) => Err(format!(
                        "Conflict {{ expected: {expected}, actual: {actual} }}"
                    )),
                    Err(e) => Err(format!("error: {e}")),
                },
            )
        });
        let (k, i) = (key.clone(), id);
        let push_tell: PushTell = Arc::new(move |rt, batch| {
            batch.push(
                rt.entity::<E>(k.clone())
                    .tell(command.clone())
                    .id(i.clone()),
            );
        });
        self.entries.push(BatchEntry {
            key,
            push_ask,
            push_tell,
        });
        self
    }
}

/// One scripted message, to refine with its id, version and so on. Returned by
/// [`Script::ask`] and [`Script::tell`]; see [`Script`] for an example.
pub struct Message<'a> {
    planned: &'a mut Planned,
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("kind", &self.planned.kind)
            .field("options", &self.planned.options)
            .finish_non_exhaustive()
    }
}

impl Message<'_> {
    /// The message id (idempotency key), the same on every delivery. Default: none, so
    /// every delivery gets a fresh generated id.
    pub fn id(self, message_id: impl Into<String>) -> Self {
        self.planned.options.id = Some(message_id.into());
        self
    }

    /// The source version. Default: none (never stale).
    pub fn version(self, version: u64) -> Self {
        self.planned.options.version = Some(version);
        self
    }

    /// For an `ask`: apply only at this revision, else `Conflict`. Ignored for a `tell`.
    pub fn expect_revision(self, revision: u64) -> Self {
        self.planned.options.expected_revision = Some(revision);
        self
    }

    /// The name used in reports and in [`Run::outcomes`](super::Run::outcomes). Default:
    /// the id, else `#<index in the script>`.
    pub fn label(self, label: impl Into<String>) -> Self {
        self.planned.label = Some(label.into());
        self
    }

    /// Never duplicate this message (for a source that truly delivers once). It is still
    /// reordered and may be cut off by a restart. Default: may be duplicated.
    pub fn once(self) -> Self {
        self.planned.once = true;
        self
    }
}

fn observe_ask<E: Entity>(result: Result<Outcome<E::Reply, E::Error>, SubmitError>) -> Observed {
    let (summary, problem) = match &result {
        Ok(outcome) => (format!("{outcome:?}"), None),
        Err(SubmitError::Conflict {
            expected, actual, ..
        }) => (
            format!("Conflict {{ expected: {expected}, actual: {actual} }}"),
            None,
        ),
        Err(e) => (format!("error: {e}"), Some(e.to_string())),
    };
    Observed {
        summary,
        value: Box::new(result),
        problem,
    }
}

fn snapshot_of<'a, E: Entity>(
    rt: &'a Runtime,
    key: &'a str,
) -> ReadFuture<'a, Result<Snapshotted, SubmitError>>
where
    E::State: fmt::Debug,
{
    Box::pin(async move {
        let snapshot: Snapshot<E::State> = rt.entity::<E>(key).snapshot().await?;
        let picture = format!("{:?} at version {:?}", snapshot.state, snapshot.version);
        Ok((picture, Box::new(snapshot) as Box<dyn std::any::Any + Send>))
    })
}

fn passivate_of<E: Entity>(rt: &Runtime, key: &str) -> BoxFuture<Result<bool, AdminError>> {
    let entity = rt.entity::<E>(key);
    Box::pin(async move { entity.passivate().await })
}

fn dead_letters_of<'a, E: Entity>(
    rt: &'a Runtime,
    key: &'a str,
) -> ReadFuture<'a, Result<Vec<String>, AdminError>> {
    Box::pin(async move {
        Ok(rt
            .dead_letters::<E>()
            .await?
            .into_iter()
            .filter(|letter| letter.key == key)
            .map(|letter| letter.error)
            .collect())
    })
}

fn effects_of<'a, E: Entity>(
    rt: &'a Runtime,
    key: &'a str,
) -> ReadFuture<'a, Result<Vec<EffectInfo>, AdminError>> {
    Box::pin(rt.effects_of::<E>(key))
}

/// True for an effect that has not finished after the runtime went idle.
pub(crate) fn unfinished(info: &EffectInfo) -> bool {
    matches!(info.status, EffectStatus::Pending | EffectStatus::Running)
}
