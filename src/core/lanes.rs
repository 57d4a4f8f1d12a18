//! Which lane goes next: strict priority with a bound on starvation. Pure: the caller says
//! which lanes have work waiting and which may take a free slot; nothing here waits, counts
//! time or locks.
//!
//! The rule: each lane with work waiting counts the grants that went to other lanes while it
//! waited. A lane whose count reached the bound is *starving* and goes first, whatever its
//! priority and whatever its reserve (the starving lane with the highest count wins, ties to
//! the higher priority). Otherwise the highest-priority lane that may take a slot goes.
//!
//! The bound this gives: a lane that keeps work waiting is granted within `bound + 3` grants
//! (after `bound` grants it is starving; each of the three other lanes can then take at most
//! one promoted grant before this lane's count is the highest). The proptest below checks it.

/// The number of lanes (see `Priority`).
pub(crate) const LANES: usize = 4;

/// Chooses the next lane. Lane 0 is the highest priority.
#[derive(Debug, Clone)]
pub(crate) struct LanePicker {
    bound: u32,
    skipped: [u32; LANES],
}

impl LanePicker {
    /// A picker that promotes a lane after `bound` grants passed it over (at least 1).
    pub(crate) fn new(bound: u32) -> Self {
        Self {
            bound: bound.max(1),
            skipped: [0; LANES],
        }
    }

    /// The most grants a waiting lane can be passed over by, from when it starts waiting.
    #[cfg(test)]
    pub(crate) fn wait_grants_max(&self) -> u32 {
        self.bound + LANES as u32 - 1
    }

    /// The lane to grant next, or `None`. `waiting[i]`: lane `i` has work waiting;
    /// `fits[i]`: lane `i` may take a free slot without being promoted (it is within its
    /// reserve). Call [`LanePicker::granted`] once the grant is made.
    pub(crate) fn pick(&self, waiting: [bool; LANES], fits: [bool; LANES]) -> Option<usize> {
        let starving = (0..LANES)
            .filter(|&i| waiting[i] && self.skipped[i] >= self.bound)
            // Highest count first; among equals the lower index (higher priority).
            .max_by_key(|&i| (self.skipped[i], std::cmp::Reverse(i)));
        starving.or_else(|| (0..LANES).find(|&i| waiting[i] && fits[i]))
    }

    /// True when `lane` has been passed over `bound` times: a grant to it now is a promotion.
    pub(crate) fn starving(&self, lane: usize) -> bool {
        self.skipped[lane] >= self.bound
    }

    /// Records a grant to `lane` while `waiting` lanes had work: the others waited once
    /// more, a lane with nothing waiting starts again from zero.
    pub(crate) fn granted(&mut self, lane: usize, waiting: [bool; LANES]) {
        for (i, skipped) in self.skipped.iter_mut().enumerate() {
            *skipped = if i == lane || !waiting[i] {
                0
            } else {
                skipped.saturating_add(1)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strict_priority_when_nothing_starves() {
        let picker = LanePicker::new(8);
        assert_eq!(picker.pick([false, true, true, true], [true; 4]), Some(1));
        assert_eq!(picker.pick([true, false, false, true], [true; 4]), Some(0));
        // A lane outside its reserve waits unless it starves.
        assert_eq!(
            picker.pick([false, false, false, true], [true, true, true, false]),
            None
        );
        assert_eq!(picker.pick([false; 4], [true; 4]), None);
    }

    #[test]
    fn a_flood_of_critical_still_lets_low_through() {
        let mut picker = LanePicker::new(4);
        let waiting = [true, false, false, true];
        let fits = [true, false, false, false];
        let picks: Vec<usize> = (0..10)
            .map(|_| {
                let lane = picker.pick(waiting, fits).expect("critical always fits");
                picker.granted(lane, waiting);
                lane
            })
            .collect();
        assert_eq!(picks, vec![0, 0, 0, 0, 3, 0, 0, 0, 0, 3]);
    }

    proptest! {
        /// Under any pattern of waiting lanes and reserves, a lane that keeps work waiting
        /// is granted within `wait_grants_max` grants.
        #[test]
        fn a_waiting_lane_is_granted_within_the_bound(
            bound in 1u32..20,
            steps in proptest::collection::vec((any::<[bool; LANES]>(), any::<[bool; LANES]>()), 1..400),
        ) {
            let mut picker = LanePicker::new(bound);
            // Grants that went elsewhere since each lane last got one, while it waited.
            let mut passed_over = [0u32; LANES];
            for (waiting, fits) in steps {
                let Some(lane) = picker.pick(waiting, fits) else { continue };
                prop_assert!(waiting[lane], "only a lane with work is picked");
                picker.granted(lane, waiting);
                for i in 0..LANES {
                    passed_over[i] = if i == lane || !waiting[i] { 0 } else { passed_over[i] + 1 };
                    prop_assert!(passed_over[i] <= picker.wait_grants_max(),
                        "lane {} passed over {} times, bound {}", i, passed_over[i], picker.wait_grants_max());
                }
            }
        }
    }
}
