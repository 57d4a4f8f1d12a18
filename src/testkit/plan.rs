//! The delivery plan: one seed decides every fault of a run, before the run starts.
//!
//! A plan is a list of groups. The deliveries of a group are submitted in plan order and
//! awaited together (a `tell` is awaited until accepted before the next submission, as a
//! caller would), so two copies in one group race like a double click, while a copy in a
//! later group is a redelivery after success. After each group the plan says what happens
//! next: let the runtime settle, passivate some entities (their actors restart on the next
//! message), or stop the runtime abruptly and reopen it on the same directory.
//!
//! Everything here is a pure function of the seed and the script's shape, so replaying a
//! seed replays the same plan.

use std::fmt::Write as _;

use crate::core::hash::splitmix64;

/// Which faults a chaotic plan may use. Every fault is on by default.
///
/// ```
/// use keystead::testkit::Faults;
/// let faults = Faults::default().restarts_max(0).group_size_max(2);
/// assert_eq!(faults, Faults::default().restarts_max(0).group_size_max(2));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Faults {
    pub(crate) duplicates: bool,
    pub(crate) reorder: bool,
    pub(crate) group_size_max: usize,
    pub(crate) passivations: bool,
    pub(crate) restarts_max: u32,
    pub(crate) effect_faults: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            duplicates: true,
            reorder: true,
            group_size_max: 4,
            passivations: true,
            restarts_max: 2,
            effect_faults: true,
        }
    }
}

impl Faults {
    /// No fault at all: each message once, in script order, one at a time. This is the
    /// "calm" delivery every chaotic run is compared with.
    ///
    /// ```
    /// # use keystead::testkit::Faults;
    /// assert_ne!(Faults::none(), Faults::default());
    /// ```
    pub fn none() -> Self {
        Self {
            duplicates: false,
            reorder: false,
            group_size_max: 1,
            passivations: false,
            restarts_max: 0,
            effect_faults: false,
        }
    }

    /// Deliver some messages two or three times: at once (a double click) or after the
    /// first copy succeeded (a retry after a timeout). Default: on.
    pub fn duplicates(mut self, on: bool) -> Self {
        self.duplicates = on;
        self
    }

    /// Shuffle deliveries across and within senders. Default: on.
    pub fn reorder(mut self, on: bool) -> Self {
        self.reorder = on;
        self
    }

    /// The most deliveries in flight together (1 = one at a time). Default: 4.
    pub fn group_size_max(mut self, deliveries: usize) -> Self {
        self.group_size_max = deliveries.max(1);
        self
    }

    /// Passivate entities between groups, so their next message starts a fresh actor that
    /// reloads from disk. Default: on.
    pub fn passivations(mut self, on: bool) -> Self {
        self.passivations = on;
        self
    }

    /// At most this many abrupt runtime stops per seed, each followed by a reopen on the
    /// same directory. Default: 2.
    pub fn restarts_max(mut self, restarts: u32) -> Self {
        self.restarts_max = restarts;
        self
    }

    /// Make the [`Ledger`](super::Ledger)'s executors fail some first attempts: the provider
    /// is unavailable, or it succeeded and the reply timed out. Default: on.
    pub fn effect_faults(mut self, on: bool) -> Self {
        self.effect_faults = on;
        self
    }
}

/// A seeded generator (SplitMix64): small, fast and the same on every platform.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0, "below(0) has no answer");
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `1 / n`.
    pub(crate) fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// One copy of one scripted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivery {
    /// Index into the script's messages.
    pub message: usize,
    /// 1 for the first copy, 2 and 3 for duplicates.
    pub copy: u32,
}

/// What happens after a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Then {
    /// Wait until the runtime is idle (replies, drains, effects and feedback done).
    Settle,
    /// Settle, then passivate these entities (indexes into the script's keys).
    Passivate(Vec<usize>),
    /// Stop the runtime abruptly without waiting (accepted tells stay in the inbox, running
    /// effects are cut off), reopen it on the same directory, and let it recover.
    Restart,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub deliveries: Vec<Delivery>,
    pub then: Then,
    /// The phase of its messages (how many clock moves come before them).
    pub phase: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub groups: Vec<Group>,
}

impl Plan {
    /// The plan for `seed`. `once[i]` is true for messages that must not be duplicated;
    /// `phases[i]` is message i's phase (messages are reordered and grouped only within a
    /// phase; phases never decrease along the script); `keys` is the number of distinct
    /// entities in the script.
    pub(crate) fn new(
        seed: u64,
        once: &[bool],
        phases: &[usize],
        keys: usize,
        faults: &Faults,
    ) -> Plan {
        let mut rng = Rng::new(seed);
        let mut deliveries = Vec::new();
        for (message, &once) in once.iter().enumerate() {
            let mut copies = 1;
            if faults.duplicates && !once && rng.one_in(2) {
                copies += 1;
                if rng.one_in(3) {
                    copies += 1;
                }
            }
            deliveries.extend((1..=copies).map(|copy| Delivery { message, copy }));
        }
        let phase_of = |d: &Delivery| phases.get(d.message).copied().unwrap_or(0);
        if faults.reorder {
            // Fisher-Yates within each phase: every order of a phase equally likely,
            // duplicates included. A script without clock moves is one phase.
            let mut start = 0;
            while start < deliveries.len() {
                let phase = phase_of(&deliveries[start]);
                let end = start
                    + deliveries[start..]
                        .iter()
                        .take_while(|d| phase_of(d) == phase)
                        .count();
                for i in (start + 1..end).rev() {
                    deliveries.swap(i, start + rng.below(i - start + 1));
                }
                start = end;
            }
        }
        let mut groups = Vec::new();
        let mut restarts = 0;
        let mut rest = &deliveries[..];
        while !rest.is_empty() {
            let phase = phase_of(&rest[0]);
            let in_phase = rest.iter().take_while(|d| phase_of(d) == phase).count();
            let size = 1 + rng.below(faults.group_size_max.min(in_phase));
            let (now, later) = rest.split_at(size);
            rest = later;
            let roll = rng.below(10);
            let then = if roll < 3 && restarts < faults.restarts_max {
                restarts += 1;
                Then::Restart
            } else if roll < 6 && faults.passivations && keys > 0 {
                let mut chosen: Vec<usize> = (0..keys).filter(|_| rng.one_in(2)).collect();
                if chosen.is_empty() {
                    chosen.push(rng.below(keys));
                }
                Then::Passivate(chosen)
            } else {
                Then::Settle
            };
            groups.push(Group {
                deliveries: now.to_vec(),
                then,
                phase,
            });
        }
        debug_assert_eq!(
            groups.iter().map(|g| g.deliveries.len()).sum::<usize>(),
            deliveries.len(),
            "every delivery is in exactly one group"
        );
        Plan { groups }
    }

    /// The plan in words, one group per line, with `label(message)` naming messages and
    /// `key_name(key)` naming entities.
    pub(crate) fn describe(
        &self,
        label: impl Fn(usize) -> String,
        key_name: impl Fn(usize) -> String,
    ) -> String {
        let mut out = String::new();
        let mut phase = 0;
        for (g, group) in self.groups.iter().enumerate() {
            while phase < group.phase {
                phase += 1;
                let _ = writeln!(out, "  clock move {phase}");
            }
            let copies: Vec<String> = group
                .deliveries
                .iter()
                .map(|d| format!("{}#{}", label(d.message), d.copy))
                .collect();
            let then = match &group.then {
                Then::Settle => "settle".to_string(),
                Then::Passivate(keys) => {
                    let names: Vec<String> = keys.iter().map(|&k| key_name(k)).collect();
                    format!("passivate {}", names.join(", "))
                }
                Then::Restart => "stop abruptly and reopen".to_string(),
            };
            let _ = writeln!(out, "  group {g}: [{}] then {then}", copies.join(", "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_plan() {
        let once = [false, false, true, false];
        for seed in 0..200 {
            let a = Plan::new(seed, &once, &[0; 4], 3, &Faults::default());
            let b = Plan::new(seed, &once, &[0; 4], 3, &Faults::default());
            assert_eq!(a, b, "seed {seed}");
        }
    }

    #[test]
    fn every_message_is_delivered_and_once_means_once() {
        let once = [false, true, false];
        let mut duplicated = 0;
        let mut reordered = 0;
        let mut restarts = 0;
        for seed in 0..500 {
            let plan = Plan::new(seed, &once, &[0; 3], 2, &Faults::default());
            let all: Vec<Delivery> = plan
                .groups
                .iter()
                .flat_map(|g| g.deliveries.iter().copied())
                .collect();
            for (m, &once) in once.iter().enumerate() {
                let copies = all.iter().filter(|d| d.message == m).count();
                assert!(
                    (1..=3).contains(&copies),
                    "seed {seed}: {copies} copies of {m}"
                );
                if once {
                    assert_eq!(copies, 1, "seed {seed}: a once message was duplicated");
                }
                duplicated += usize::from(copies > 1);
            }
            let firsts: Vec<usize> = all
                .iter()
                .filter(|d| d.copy == 1)
                .map(|d| d.message)
                .collect();
            reordered += usize::from(firsts != [0, 1, 2]);
            let r = plan
                .groups
                .iter()
                .filter(|g| g.then == Then::Restart)
                .count();
            assert!(r <= 2, "seed {seed}: {r} restarts");
            restarts += r;
        }
        // Each fault shows up often over 500 seeds (these are far from their expected counts).
        assert!(duplicated > 200, "duplicated {duplicated}");
        assert!(reordered > 200, "reordered {reordered}");
        assert!(restarts > 100, "restarts {restarts}");
    }

    #[test]
    fn no_faults_is_the_script_in_order_one_at_a_time() {
        let plan = Plan::new(7, &[false; 5], &[0; 5], 2, &Faults::none());
        assert_eq!(plan.groups.len(), 5);
        for (i, group) in plan.groups.iter().enumerate() {
            assert_eq!(
                group.deliveries,
                [Delivery {
                    message: i,
                    copy: 1
                }]
            );
            assert_eq!(group.then, Then::Settle);
        }
    }

    #[test]
    fn messages_never_cross_a_clock_move() {
        let once = [false; 7];
        let phases = [0, 0, 0, 1, 1, 2, 2];
        let mut reordered = 0;
        for seed in 0..500 {
            let plan = Plan::new(seed, &once, &phases, 2, &Faults::default());
            let mut last_phase = 0;
            for group in &plan.groups {
                assert!(group.phase >= last_phase, "seed {seed}: {plan:?}");
                last_phase = group.phase;
                for d in &group.deliveries {
                    assert_eq!(phases[d.message], group.phase, "seed {seed}: {plan:?}");
                }
            }
            let firsts: Vec<usize> = plan
                .groups
                .iter()
                .flat_map(|g| g.deliveries.iter())
                .filter(|d| d.copy == 1)
                .map(|d| d.message)
                .collect();
            reordered += usize::from(firsts != [0, 1, 2, 3, 4, 5, 6]);
        }
        assert!(reordered > 200, "reordered within phases {reordered}");
    }
}
