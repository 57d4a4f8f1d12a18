//! What one run (one seed) ended with, for comparisons and user checks.

use std::any::Any;
use std::fmt;
use std::fmt::Write as _;

use crate::entity::Entity;
use crate::error::SubmitError;
use crate::outcome::Outcome;
use crate::runtime::address::{Accepted, Snapshot};

use super::ledger::Performed;

/// What one delivery of an `ask` to an `E` returned.
pub type AskResult<E> = Result<Outcome<<E as Entity>::Reply, <E as Entity>::Error>, SubmitError>;

/// One delivery of a scripted message and what it returned.
pub(crate) struct Delivered {
    pub label: String,
    pub entity: &'static str,
    pub copy: u32,
    pub value: Box<dyn Any + Send>,
}

/// One entity at the end of a run.
pub(crate) struct Final {
    pub entity: &'static str,
    pub key: String,
    pub debug: String,
    pub snapshot: Box<dyn Any + Send>,
    pub dead_letters: Vec<String>,
    /// The keys of its effects that were dead-lettered.
    pub effect_dead_letters: Vec<String>,
}

/// The end of one run: final states, what every delivery returned, the effects the
/// outside world performed, and the trace of the plan as executed.
///
/// The [`picture`](Run::picture) (states, dead letters, effects performed) is what
/// [`Chaos`](super::Chaos) compares across seeds.
pub struct Run {
    pub(crate) seed: Option<u64>,
    pub(crate) finals: Vec<Final>,
    pub(crate) delivered: Vec<Delivered>,
    pub(crate) performed: Vec<Performed>,
    pub(crate) effect_calls: u64,
    pub(crate) effect_faults: u64,
    pub(crate) outage_calls: u64,
    pub(crate) passivations: u64,
    pub(crate) restarts: u64,
    pub(crate) trace: Vec<String>,
    pub(crate) schedules: Vec<crate::time::ScheduleStatus>,
}

impl fmt::Debug for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("seed", &self.seed)
            .field("picture", &self.picture())
            .finish_non_exhaustive()
    }
}

impl Run {
    /// The seed, or `None` for the calm run (each message once, in script order).
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// The final committed state of entity `key` of type `E`, if the script touched it.
    pub fn state<E: Entity>(&self, key: &str) -> Option<&Snapshot<E::State>> {
        self.finals
            .iter()
            .find(|f| f.entity == E::NAME && f.key == key)
            .and_then(|f| f.snapshot.downcast_ref())
    }

    /// The errors of the dead letters of entity `key` of type `E`.
    pub fn dead_letters<E: Entity>(&self, key: &str) -> Vec<&str> {
        self.finals
            .iter()
            .filter(|f| f.entity == E::NAME && f.key == key)
            .flat_map(|f| f.dead_letters.iter().map(String::as_str))
            .collect()
    }

    /// The effect keys of every effect dead-lettered in this run, any entity.
    pub fn effect_dead_letters(&self) -> Vec<&str> {
        self.finals
            .iter()
            .flat_map(|f| f.effect_dead_letters.iter().map(String::as_str))
            .collect()
    }

    /// What each delivery of the `ask` labelled `label` returned, in delivery order (one
    /// entry per copy).
    pub fn outcomes<E: Entity>(&self, label: &str) -> Vec<&AskResult<E>> {
        self.delivered
            .iter()
            .filter(|d| d.entity == E::NAME && d.label == label)
            .filter_map(|d| d.value.downcast_ref())
            .collect()
    }

    /// What each delivery of the batch labelled `label` answered, one list per delivery,
    /// each in the order the batch was built: an ask batch's outcomes in words (or its
    /// error), a tell batch's message ids (empty if the batch was refused).
    pub fn batch_results(&self, label: &str) -> Vec<&[Result<String, String>]> {
        self.delivered
            .iter()
            .filter(|d| d.label == label)
            .filter_map(|d| d.value.downcast_ref::<Vec<Result<String, String>>>())
            .map(Vec::as_slice)
            .collect()
    }

    /// What each delivery of the transaction labelled `label` returned.
    pub fn transaction_outcomes<T: crate::Transaction>(
        &self,
        label: &str,
    ) -> Vec<&Result<crate::TxOutcome<T>, SubmitError>> {
        self.delivered
            .iter()
            .filter(|d| d.label == label)
            .filter_map(|d| d.value.downcast_ref())
            .collect()
    }

    /// How many deliveries of the `tell` labelled `label` were accepted.
    pub fn accepted(&self, label: &str) -> usize {
        self.delivered
            .iter()
            .filter(|d| d.label == label)
            .filter_map(|d| d.value.downcast_ref::<Result<Accepted, SubmitError>>())
            .filter(|r| r.is_ok())
            .count()
    }

    /// How many times message `label` was delivered (1 to 3).
    pub fn deliveries(&self, label: &str) -> usize {
        self.delivered.iter().filter(|d| d.label == label).count()
    }

    /// The effects the outside world performed, once per effect key, sorted.
    pub fn performed(&self) -> &[Performed] {
        &self.performed
    }

    /// The status of schedule `name` at the end of the run, if it exists.
    pub fn schedule(&self, name: &str) -> Option<&crate::time::ScheduleStatus> {
        self.schedules.iter().find(|s| s.name == name)
    }

    /// Calls the outside world received, repeats after injected faults included.
    pub fn effect_calls(&self) -> u64 {
        self.effect_calls
    }

    /// The plan as executed: one line per delivery with its outcome, per passivation and
    /// per restart. Replaying a seed gives the same trace.
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    /// What must not depend on delivery: every entity's final state, version and dead
    /// letters, and the effects performed (without message ids, which may be generated).
    /// Revisions are left out: a stale event dropped in one order and applied in another
    /// legitimately changes how many revisions it took to reach the same state.
    pub fn picture(&self) -> String {
        let mut out = String::new();
        for f in &self.finals {
            let _ = writeln!(out, "{}/{}: {}", f.entity, f.key, f.debug);
            if !f.dead_letters.is_empty() {
                let _ = writeln!(
                    out,
                    "{}/{} dead letters: {:?}",
                    f.entity, f.key, f.dead_letters
                );
            }
            if !f.effect_dead_letters.is_empty() {
                let _ = writeln!(
                    out,
                    "{}/{} effect dead letters: {:?}",
                    f.entity, f.key, f.effect_dead_letters
                );
            }
        }
        for s in &self.schedules {
            // Its runs' fate, not its times (settling moves the clock by varying amounts).
            let _ = writeln!(
                out,
                "schedule {}: fired {}, caught up {}, skipped {}, missed {}, buffered {}, paused {:?}",
                s.name, s.fired, s.caught_up, s.skipped, s.missed, s.buffered, s.paused
            );
        }
        let mut effects: Vec<String> = self.performed.iter().map(|p| p.to_string()).collect();
        effects.sort();
        for e in effects {
            let _ = writeln!(out, "performed {e}");
        }
        out
    }

    /// The count of deliveries that were duplicates (copy 2 or 3).
    pub(crate) fn duplicates(&self) -> usize {
        self.delivered.iter().filter(|d| d.copy > 1).count()
    }

    /// Lines of `self.picture()` and `other.picture()` that differ, marked `-` and `+`.
    pub(crate) fn diff(&self, other: &Run) -> String {
        let (a, b) = (self.picture(), other.picture());
        let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
        let mut out = String::new();
        for line in &a {
            if !b.contains(line) {
                let _ = writeln!(out, "  - {line}");
            }
        }
        for line in &b {
            if !a.contains(line) {
                let _ = writeln!(out, "  + {line}");
            }
        }
        out
    }
}
