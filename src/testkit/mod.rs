//! The chaos testkit (feature `testkit`): run your entities under seeded, reproducible
//! adversarial delivery and check that nothing depends on luck.
//!
//! A scenario is a [`Script`]: the messages the outside world sends. For each seed,
//! [`Chaos`] derives a plan that duplicates messages (at once, like a double click, or
//! after the first copy succeeded, like a retry after a timeout), shuffles them across and
//! within senders, sends up to four at a time, restarts entity actors between messages,
//! stops the whole runtime abruptly and reopens it on the same directory, and makes the
//! effects' outside world (the [`Ledger`]) fail or time out after succeeding. Then it
//! compares the run with a calm one (each message once, in order): final states, dead
//! letters and effects performed must be identical, and your [`check`](Chaos::check)s
//! must hold. A failing seed is printed with its plan, its trace and the one command that
//! replays it.
//!
//! ```
//! use keystead::testkit::Chaos;
//! # use keystead::{Context, Entity, Failure, FailureKind};
//! # #[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
//! # #[error("already paid")] struct AlreadyPaid;
//! # impl Failure for AlreadyPaid { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
//! # struct Order;
//! # impl Entity for Order {
//! #     const NAME: &'static str = "order"; type State = u64; type Command = u64;
//! #     type Reply = u64; type Error = AlreadyPaid;
//! #     fn handle(paid: &mut u64, cents: &u64, _: &mut Context<'_>) -> Result<u64, AlreadyPaid> {
//! #         if *paid > 0 { return Err(AlreadyPaid) }
//! #         *paid = *cents; Ok(*paid)
//! #     }
//! # }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A double-clicked, retried "Pay": the order is paid once, whatever the delivery.
//! let report = Chaos::new(|builder, _ledger| builder.register::<Order>())
//!     .seeds(20)
//!     .run(|s| {
//!         s.ask::<Order>("o-1", 1999).id("pay-o-1");
//!     })
//!     .await;
//! assert_eq!(report.seeds, 20);
//! # }
//! ```
//!
//! Replaying: set `KEYSTEAD_CHAOS_SEED=<seed>` to run only that seed (after the calm run)
//! and print its trace; `KEYSTEAD_CHAOS_SEEDS=<n>` overrides the number of seeds.
//! `docs/testkit.md` walks through writing such a test.

mod ledger;
mod plan;
mod run;
mod script;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

pub use ledger::{Ledger, LedgerExecutor, Performed};
pub use plan::Faults;
pub use run::{AskResult, Run};
pub use script::{Message, Script, ScriptBatch};

use crate::backend::Backend;
use crate::clock::{Clock, ManualClock};
use crate::retry::RetryPolicy;
use crate::runtime::{Runtime, RuntimeBuilder};
use plan::{Delivery, Plan, Then};
use run::{Delivered, Final};
use script::{unfinished, BoxFuture, Kind, Observed};

/// The environment variable that replays one seed.
pub const SEED_ENV: &str = "KEYSTEAD_CHAOS_SEED";
/// The environment variable that overrides the number of seeds.
pub const SEEDS_ENV: &str = "KEYSTEAD_CHAOS_SEEDS";

/// Where the runtime's [`ManualClock`] stands in every run (2026-01-01T00:00:00Z), so a
/// handler reading `ctx.now_ms()` sees the same time in every seed.
pub const CLOCK_START_MS: u64 = 1_767_225_600_000;

/// How long a seed may go without progress before the watchdog prints its replay command.
const STALL_REPORT_AFTER: Duration = Duration::from_secs(60);

type Setup = dyn Fn(RuntimeBuilder, &Ledger) -> RuntimeBuilder + Send + Sync;
type Check = dyn Fn(&Run) -> Result<(), String> + Send + Sync;

/// A chaos test: how to build the runtime, how many seeds, which faults, what must hold.
/// See the [module documentation](self) for an example.
pub struct Chaos {
    setup: Arc<Setup>,
    backend: Backend,
    seeds: u64,
    first_seed: u64,
    faults: Faults,
    identical: bool,
    outage: bool,
    checks: Vec<Box<Check>>,
}

impl fmt::Debug for Chaos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chaos")
            .field("backend", &self.backend)
            .field("seeds", &self.seeds)
            .field("first_seed", &self.first_seed)
            .field("faults", &self.faults)
            .field("identical", &self.identical)
            .field("checks", &self.checks.len())
            .finish()
    }
}

/// What a whole chaos test exercised, summed over its seeds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Seeds run (the calm run not counted).
    pub seeds: u64,
    /// Deliveries made.
    pub deliveries: u64,
    /// Deliveries that were duplicates of an earlier one.
    pub duplicates: u64,
    /// Entity actors stopped between messages.
    pub passivations: u64,
    /// Abrupt runtime stops followed by a reopen.
    pub restarts: u64,
    /// Calls received by the ledger's executors.
    pub effect_calls: u64,
    /// Effect faults injected by the ledger.
    pub effect_faults: u64,
    /// Calls that met the outage ([`Chaos::outage`]).
    pub outage_calls: u64,
    /// The seed replayed on its own (`KEYSTEAD_CHAOS_SEED`), if any: then the counts above
    /// are one seed's, so skip assertions on them.
    pub replayed_seed: Option<u64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} seeds: {} deliveries ({} duplicates), {} passivations, {} restarts, {} effect calls ({} faults injected",
            self.seeds,
            self.deliveries,
            self.duplicates,
            self.passivations,
            self.restarts,
            self.effect_calls,
            self.effect_faults,
        )?;
        if self.outage_calls > 0 {
            write!(f, ", {} during the outage", self.outage_calls)?;
        }
        write!(f, ")")
    }
}

/// Why a run failed, with what it had done so far.
struct Failure {
    reason: String,
    trace: Vec<String>,
}

impl Chaos {
    /// A chaos test whose runtimes are built by `setup` from a builder on a fresh directory
    /// (one per seed, reused across that seed's restarts), with that seed's [`Ledger`].
    ///
    /// The builder comes preset for tests: 2 shards, a [`ManualClock`] at
    /// [`CLOCK_START_MS`], message and effect retries of 5 attempts 1-8 ms apart, and no
    /// idle passivation (the plan passivates). `setup` may override any of it.
    pub fn new(
        setup: impl Fn(RuntimeBuilder, &Ledger) -> RuntimeBuilder + Send + Sync + 'static,
    ) -> Self {
        Self {
            setup: Arc::new(setup),
            backend: Backend::Sled,
            seeds: 100,
            first_seed: 0,
            faults: Faults::default(),
            identical: true,
            outage: false,
            checks: Vec::new(),
        }
    }

    /// The storage engine every run uses. Default: [`Backend::Sled`]. Run a scenario once
    /// per engine to check that your outcome does not depend on it.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// How many seeds to run. Default: 100 (or `KEYSTEAD_CHAOS_SEEDS`).
    pub fn seeds(mut self, seeds: u64) -> Self {
        self.seeds = seeds;
        self
    }

    /// The first seed; seeds run from it upwards. Default: 0.
    pub fn first_seed(mut self, seed: u64) -> Self {
        self.first_seed = seed;
        self
    }

    /// Which faults to inject. Default: [`Faults::default`], all of them.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Adds a check that every run (the calm one and every seed) must pass. Return
    /// `Err(why)` or panic (an `assert!`) to fail the seed.
    pub fn check(
        mut self,
        check: impl Fn(&Run) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.checks.push(Box::new(check));
        self
    }

    /// The outside world (every [`Ledger`] executor) is down from the start of every run,
    /// the calm one included, until every scripted message has been delivered: every call
    /// fails retryably and performs nothing. Then it comes back, and the run settles. Use
    /// it with a circuit breaker on the effect types (`EffectLimits::breaker`): the effects
    /// must wait out the outage without being dead-lettered. To let cool-downs and rate
    /// limits elapse, the settling moves the runtime's `ManualClock` on by an hour at a
    /// time while effects are parked behind their limits.
    pub fn outage(mut self) -> Self {
        self.outage = true;
        self
    }

    /// The final picture may legitimately depend on delivery order (two tabs: whichever
    /// saves first wins), so do not compare it with the calm run; only the
    /// [`check`](Chaos::check)s decide, and there must be at least one.
    pub fn order_dependent(mut self) -> Self {
        self.identical = false;
        self
    }

    /// Runs the calm run, then every seed, and panics with a replayable report at the
    /// first failure.
    ///
    /// # Panics
    /// On the first failing seed (that is the test failing), or if the script is empty, or
    /// if [`order_dependent`](Chaos::order_dependent) was set without any check.
    pub async fn run(&self, script: impl Fn(&mut Script)) -> Report {
        assert!(
            self.identical || !self.checks.is_empty(),
            "keystead chaos: order_dependent() without a check() would check nothing; add a check"
        );
        let only = std::env::var(SEED_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let count = std::env::var(SEEDS_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(self.seeds);
        let seeds: Vec<u64> = match only {
            Some(seed) => vec![seed],
            None => (self.first_seed..self.first_seed.saturating_add(count)).collect(),
        };
        let calm = match self.execute(&script, None).await {
            Ok(run) => run,
            Err(failure) => panic!("{}", self.report(&script, None, &failure)),
        };
        if let Err(reason) = self.judge(&calm, None) {
            let failure = Failure {
                reason,
                trace: calm.trace.clone(),
            };
            panic!("{}", self.report(&script, None, &failure));
        }
        let watchdog = Watchdog::start();
        let mut report = Report {
            replayed_seed: only,
            ..Report::default()
        };
        for seed in seeds {
            watchdog.now_on(seed);
            let run = match self.execute(&script, Some(seed)).await {
                Ok(run) => run,
                Err(failure) => panic!("{}", self.report(&script, Some(seed), &failure)),
            };
            if let Err(reason) = self.judge(&run, Some(&calm)) {
                let failure = Failure {
                    reason,
                    trace: run.trace.clone(),
                };
                panic!("{}", self.report(&script, Some(seed), &failure));
            }
            if only.is_some() {
                eprintln!("keystead chaos: seed {seed} passed; its trace:");
                for line in &run.trace {
                    eprintln!("  {line}");
                }
            }
            report.seeds += 1;
            report.deliveries += run.delivered.len() as u64;
            report.duplicates += run.duplicates() as u64;
            report.passivations += run.passivations;
            report.restarts += run.restarts;
            report.effect_calls += run.effect_calls;
            report.effect_faults += run.effect_faults;
            report.outage_calls += run.outage_calls;
        }
        report
    }

    /// Runs one seed (`None`: the calm run) and returns its [`Run`] without judging it.
    /// Use it to look at a trace, or to check that a replay repeats itself.
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
    /// use keystead::testkit::{Chaos, Script};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), String> {
    /// let chaos = Chaos::new(|builder, _| builder.register::<Counter>());
    /// let script = |s: &mut Script| {
    ///     s.ask::<Counter>("c-1", 5).id("add-5");
    /// };
    /// let run = chaos.run_seed(script, Some(7)).await?;
    /// // However often seed 7 delivered it, the id made it count once.
    /// assert_eq!(run.state::<Counter>("c-1").map(|s| s.state), Some(5));
    /// let replay = chaos.run_seed(script, Some(7)).await?;
    /// assert_eq!(run.trace(), replay.trace());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Why the run could not complete (the runtime refused a delivery, did not recover,
    /// left an effect unfinished...), with its trace so far.
    pub async fn run_seed(
        &self,
        script: impl Fn(&mut Script),
        seed: Option<u64>,
    ) -> Result<Run, String> {
        self.execute(&script, seed).await.map_err(|failure| {
            let mut text = failure.reason;
            for line in failure.trace {
                text.push_str("\n  ");
                text.push_str(&line);
            }
            text
        })
    }

    fn plan(&self, script: &Script, seed: Option<u64>) -> Plan {
        let once: Vec<bool> = script.messages.iter().map(|m| m.once).collect();
        let phases: Vec<usize> = script.messages.iter().map(|m| m.phase).collect();
        let keys = script.probes.len();
        match seed {
            None => Plan::new(0, &once, &phases, keys, &Faults::none()),
            Some(seed) => Plan::new(seed, &once, &phases, keys, &self.faults),
        }
    }

    /// The calm comparison and the user's checks.
    fn judge(&self, run: &Run, calm: Option<&Run>) -> Result<(), String> {
        if let Some(calm) = calm {
            if self.identical && run.picture() != calm.picture() {
                return Err(format!(
                    "the final picture differs from the calm run's (each message once, in script order):\n{}",
                    calm.diff(run)
                ));
            }
        }
        for (i, check) in self.checks.iter().enumerate() {
            match catch_unwind(AssertUnwindSafe(|| check(run))) {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(format!("check {} failed: {why}", i + 1)),
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".to_string());
                    return Err(format!("check {} panicked: {why}", i + 1));
                }
            }
        }
        Ok(())
    }

    fn report(
        &self,
        script: &impl Fn(&mut Script),
        seed: Option<u64>,
        failure: &Failure,
    ) -> String {
        let mut s = Script::default();
        script(&mut s);
        let plan = self.plan(&s, seed);
        let which = match seed {
            Some(seed) => format!("seed {seed}"),
            None => "the calm run (each message once, in script order)".to_string(),
        };
        let mut out = format!("keystead chaos: {which} failed: {}\n", failure.reason);
        out.push_str("plan:\n");
        out.push_str(&plan.describe(|m| s.label(m), |k| s.probes[k].name()));
        out.push_str("trace:\n");
        for line in &failure.trace {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&format!(
            "faults: {:?}; backend: {}\n",
            self.faults,
            self.backend.name()
        ));
        if let Some(seed) = seed {
            out.push_str(&format!("replay: {}\n", replay_command(seed)));
        }
        out
    }

    /// One run: open, deliver the plan group by group, settle, collect, close.
    async fn execute(
        &self,
        script_fn: &impl Fn(&mut Script),
        seed: Option<u64>,
    ) -> Result<Run, Failure> {
        let mut script = Script::default();
        script_fn(&mut script);
        let mut trace = Vec::new();
        let fail = |reason: String, trace: &[String]| Failure {
            reason,
            trace: trace.to_vec(),
        };
        if script.messages.is_empty() {
            return Err(fail("the script sends no message".into(), &trace));
        }
        let plan = self.plan(&script, seed);
        let dir = tempfile::Builder::new()
            .prefix("keystead-chaos-")
            .tempdir()
            .map_err(|e| fail(format!("cannot create a temporary directory: {e}"), &trace))?;
        let ledger = Ledger::new(
            seed.unwrap_or(0),
            seed.is_some() && self.faults.effect_faults,
        );
        let clock = ManualClock::new(CLOCK_START_MS);
        let open = |trace: &[String]| {
            (self.setup)(preset(dir.path(), clock.clone(), self.backend), &ledger)
                .open()
                .map_err(|e| fail(format!("open failed: {e}"), trace))
        };
        ledger.set_down(self.outage);
        let mut rt = open(&trace)?;
        let mut delivered = Vec::new();
        let (mut passivations, mut restarts) = (0, 0);
        let mut moved = 0;
        for (g, group) in plan.groups.iter().enumerate() {
            while moved < group.phase.min(script.clock_moves.len()) {
                move_clock(&rt, &clock, script.clock_moves[moved], &mut trace).await;
                moved += 1;
            }
            let mut waiting: Vec<(Delivery, BoxFuture<Observed>)> = Vec::new();
            let mut observed: Vec<(Delivery, Observed)> = Vec::new();
            for &d in &group.deliveries {
                let mut future = script.send(d.message, &rt);
                match script.messages[d.message].kind {
                    // A tell is awaited until accepted, as its caller would; so is an
                    // operation.
                    Kind::Tell | Kind::Operation => observed.push((d, future.await)),
                    // An ask is submitted now (its first poll sends it) and awaited with
                    // the rest of the group, so the group's asks race.
                    Kind::Ask => match poll_once(&mut future).await {
                        Some(obs) => observed.push((d, obs)),
                        None => waiting.push((d, future)),
                    },
                }
            }
            for (d, future) in waiting {
                observed.push((d, future.await));
            }
            // Report in plan order, whatever order the replies came in.
            observed.sort_by_key(|(d, _)| {
                group
                    .deliveries
                    .iter()
                    .position(|x| x == d)
                    .expect("observed deliveries come from this group")
            });
            for (d, obs) in observed {
                let m = &script.messages[d.message];
                let label = script.label(d.message);
                let kind = m.kind.name();
                trace.push(format!(
                    "group {g}: {kind} {label}#{} -> {}",
                    d.copy, obs.summary
                ));
                if let Some(problem) = obs.problem {
                    return Err(fail(
                        format!("delivery {label}#{} was refused: {problem}", d.copy),
                        &trace,
                    ));
                }
                delivered.push(Delivered {
                    label,
                    entity: script.probes[m.key].entity,
                    copy: d.copy,
                    value: obs.value,
                });
            }
            match &group.then {
                Then::Settle => rt.idle().await,
                Then::Passivate(keys) => {
                    rt.idle().await;
                    for &k in keys {
                        let probe = &script.probes[k];
                        let stopped = (probe.passivate)(&rt, &probe.key)
                            .await
                            .map_err(|e| fail(format!("passivate failed: {e}"), &trace))?;
                        passivations += u64::from(stopped);
                        let what = if stopped { "stopped" } else { "still busy" };
                        trace.push(format!("group {g}: passivate {} -> {what}", probe.name()));
                    }
                }
                Then::Restart => {
                    // Abrupt: accepted tells may still be in the inbox and effects may be
                    // cut off mid-call; all of it must resume after the reopen.
                    rt.close_now();
                    rt = open(&trace)?;
                    rt.idle().await;
                    restarts += 1;
                    trace.push(format!("group {g}: stopped abruptly, reopened, recovered"));
                }
            }
        }
        while moved < script.clock_moves.len() {
            move_clock(&rt, &clock, script.clock_moves[moved], &mut trace).await;
            moved += 1;
        }
        if self.outage {
            ledger.set_down(false);
            trace.push("the outside world is back".to_string());
        }
        settle(&rt, &clock).await.map_err(|why| fail(why, &trace))?;
        // Whatever the scenario, a settled runtime has retired every accepted message and
        // finished every effect.
        let inbox = rt
            .inbox_len()
            .await
            .map_err(|e| fail(format!("cannot count the inbox: {e}"), &trace))?;
        if inbox != 0 {
            let left = inbox_entries(&rt);
            let stats = rt.stats();
            // Is it late (an early idle) or stuck (a lost wake-up)? Settle once more.
            settle(&rt, &clock).await.map_err(|why| fail(why, &trace))?;
            let again = rt.inbox_len().await.unwrap_or(u64::MAX);
            return Err(fail(
                format!(
                    "{inbox} accepted message(s) still in the inbox after settling: {left:?}; \
                     in flight {}, effect workers {}, effect types {:?}; after settling once \
                     more: {again} left",
                    stats.in_flight, stats.effect_lanes, stats.effect_types
                ),
                &trace,
            ));
        }
        let mut finals = Vec::new();
        for probe in &script.probes {
            let effects = (probe.effects)(&rt, &probe.key)
                .await
                .map_err(|e| fail(format!("cannot list effects: {e}"), &trace))?;
            if let Some(stuck) = effects.iter().find(|info| unfinished(info)) {
                return Err(fail(
                    format!(
                        "effect {} ({}) is still {:?} after settling",
                        stuck.effect_key, stuck.name, stuck.status
                    ),
                    &trace,
                ));
            }
            let (debug, snapshot) = (probe.snapshot)(&rt, &probe.key)
                .await
                .map_err(|e| fail(format!("cannot read {}: {e}", probe.name()), &trace))?;
            let mut dead_letters = (probe.dead_letters)(&rt, &probe.key)
                .await
                .map_err(|e| fail(format!("cannot list dead letters: {e}"), &trace))?;
            dead_letters.sort();
            let mut effect_dead_letters: Vec<String> = effects
                .iter()
                .filter(|info| info.status == crate::effects::EffectStatus::DeadLettered)
                .map(|info| info.effect_key.to_string())
                .collect();
            effect_dead_letters.sort();
            finals.push(Final {
                entity: probe.entity,
                key: probe.key.clone(),
                debug,
                snapshot,
                dead_letters,
                effect_dead_letters,
            });
        }
        let schedules = rt
            .schedules()
            .list()
            .await
            .map_err(|e| fail(format!("cannot list the schedules: {e}"), &trace))?;
        rt.shutdown().await;
        Ok(Run {
            schedules,
            seed,
            finals,
            delivered,
            performed: ledger.performed(),
            effect_calls: ledger.calls(),
            effect_faults: ledger.faults_injected(),
            outage_calls: ledger.outage_calls(),
            passivations,
            restarts,
            trace,
        })
    }
}

/// Moves `clock` to `past_start_ms` after [`CLOCK_START_MS`] (never backwards: settling
/// may have moved it further) once the runtime is idle, and waits until it is idle again,
/// so what fell due has been delivered.
async fn move_clock(
    rt: &Runtime,
    clock: &ManualClock,
    past_start_ms: u64,
    trace: &mut Vec<String>,
) {
    rt.idle().await;
    let to = CLOCK_START_MS.saturating_add(past_start_ms);
    if to > clock.now_ms() {
        clock.set(to);
    }
    rt.idle().await;
    trace.push(format!(
        "clock moved to start + {} s",
        past_start_ms as f64 / 1000.0
    ));
}

/// The inbox entries on disk, as `entity/key/message id` (for a failure report).
fn inbox_entries(rt: &Runtime) -> Vec<String> {
    use crate::core::keys::{self, Space};
    let Ok(scan) = rt.inner.store.scan_prefix(&[Space::Inbox as u8]) else {
        return Vec::new();
    };
    scan.filter_map(Result::ok)
        .map(|(key, value)| {
            let id =
                crate::core::codec::decode::<crate::core::records::InboxRecord>("inbox", &value)
                    .map_or_else(|e| e.to_string(), |r| r.meta.message_id);
            match keys::parse(Space::Inbox, &key) {
                Some(p) => format!("{}/{}/{id}", p.entity, p.key),
                None => format!("?/{id}"),
            }
        })
        .collect()
}

/// Waits until the runtime is idle and no effect is parked behind its type's limits. While
/// some are, it moves `clock` on (to the end of an open breaker's cool-down, or by an hour
/// for a rate limit's refill) and waits until parked work is resumed.
async fn settle(rt: &Runtime, clock: &ManualClock) -> Result<(), String> {
    use crate::telemetry::EffectTypeStats;
    const STEPS_MAX: u32 = 10_000;
    let sum = |types: &[EffectTypeStats], f: fn(&EffectTypeStats) -> u64| -> u64 {
        types.iter().map(f).sum()
    };
    for _ in 0..STEPS_MAX {
        // One consistent reading: idle, and what is parked then.
        let stats = rt.idle_snapshot().await;
        if sum(&stats.effect_types, |t| t.parked + t.running) == 0 {
            return Ok(());
        }
        let resumed = sum(&stats.effect_types, |t| t.resumed);
        let now = clock.now_ms();
        let due = stats
            .effect_types
            .iter()
            .filter(|t| t.parked > 0 && t.breaker_open_until_ms > 0)
            .map(|t| t.breaker_open_until_ms)
            .max();
        let to = due.unwrap_or(now + 3_600_000).max(now + 1);
        clock.set(to);
        rt.wait_until(|s| {
            sum(&s.effect_types, |t| t.resumed) > resumed || sum(&s.effect_types, |t| t.parked) == 0
        })
        .await;
    }
    Err(format!(
        "effects still parked behind their limits after {STEPS_MAX} moves of the runtime clock: {:?}",
        rt.stats().effect_types
    ))
}

/// The builder every run starts from; see [`Chaos::new`].
fn preset(dir: &Path, clock: ManualClock, backend: Backend) -> RuntimeBuilder {
    let fast = RetryPolicy::default()
        .attempts_max(5)
        .backoff_initial(Duration::from_millis(1))
        .backoff_max(Duration::from_millis(8));
    Runtime::builder(dir)
        .backend(backend)
        .shards(2)
        .retry(fast)
        .effect_retry(fast)
        .clock(clock)
        .passivate_after(Duration::from_secs(24 * 3600))
}

/// Polls `future` once: `Some` if it finished, `None` if it is waiting (and has been
/// submitted: an `ask` sends its message on the first poll).
async fn poll_once<T>(future: &mut BoxFuture<T>) -> Option<T> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match future.as_mut().poll(cx) {
            Poll::Ready(value) => Some(value),
            Poll::Pending => None,
        })
    })
    .await
}

/// The one command that replays `seed` of the current test: the test binary and name come
/// from the running test harness.
pub fn replay_command(seed: u64) -> String {
    let test = std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .map(|name| format!(" -- --exact {name}"))
        .unwrap_or_default();
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            // Cargo names test binaries `<target>-<16 hex digits>`.
            Some((name, hash))
                if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                name.to_string()
            }
            _ => stem,
        });
    let package = std::env::var("CARGO_PKG_NAME")
        .ok()
        .map(|p| p.replace('-', "_"));
    let target = match target {
        Some(t) if Some(&t) == package.as_ref() => " --lib".to_string(),
        Some(t) => format!(" --test {t}"),
        None => String::new(),
    };
    format!("{SEED_ENV}={seed} cargo test{target}{test}")
}

/// Prints the replay command of a seed that stops making progress, so a hang is as
/// reproducible as a failure.
struct Watchdog {
    tx: Option<crossbeam_channel::Sender<(u64, String)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start() -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<(u64, String)>(1);
        let thread = std::thread::Builder::new()
            .name("keystead-chaos-watchdog".into())
            .spawn(move || {
                let mut current: Option<(u64, String)> = None;
                loop {
                    match rx.recv_timeout(STALL_REPORT_AFTER) {
                        Ok(seed) => current = Some(seed),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                            if let Some((seed, replay)) = &current {
                                eprintln!(
                                    "keystead chaos: seed {seed} has made no progress for {} s; replay: {replay}",
                                    STALL_REPORT_AFTER.as_secs()
                                );
                            }
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            thread,
        }
    }

    /// Called on the test's thread, where the replay command can name the test.
    fn now_on(&self, seed: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((seed, replay_command(seed)));
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
