//! Smooth weighted round robin over priority tiers, O(1) per pick.
//!
//! nginx's round robin walks every peer on every pick (O(n)). Here each tier's
//! order is computed once per peer-set change: a smooth interleaving in which
//! every peer appears in proportion to its weight (virtual deadlines
//! `(2k+1)/2w`, the same spread as nginx's smooth algorithm). A pick reads the
//! next slot; only unavailable peers make it look further. A tier's weight-0
//! peers form a band of their own after its weighted ones (see
//! [`crate::peer::Peer::band`]): reached only when no weighted peer is usable.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::peer::{bands, Peer};

/// A tier's schedule holds at most this many slots (or one per peer, if more):
/// weights whose sum is larger are scaled down, keeping their proportions.
pub const MAX_SCHEDULE: u64 = 1 << 16;

#[derive(Clone, Debug)]
struct Tier {
    priority: u16,
    /// Peer indices (into the peer slice the selector was built from), in order.
    order: Vec<u32>,
    cursor: usize,
}

/// The selection state of one worker: tiers in priority order, each with its cursor.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    tiers: Vec<Tier>,
}

#[derive(PartialEq, Eq)]
struct Slot {
    /// Deadline (2k+1)/(2w) as numerator and denominator.
    num: u64,
    den: u64,
    weight: u64,
    index: u32,
}

impl Ord for Slot {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: the earliest deadline must compare greatest.
        let lhs = u128::from(self.num) * u128::from(other.den);
        let rhs = u128::from(other.num) * u128::from(self.den);
        rhs.cmp(&lhs)
            .then(self.weight.cmp(&other.weight))
            .then(other.index.cmp(&self.index))
    }
}

impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The smooth order of one tier: `indices[i]` has weight `weights[i]`.
fn smooth_order(indices: &[u32], weights: &[u64]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut weights: Vec<u64> = weights.iter().map(|w| w / g).collect();
    let sum: u64 = weights.iter().sum();
    let cap = MAX_SCHEDULE.max(indices.len() as u64);
    if sum > cap {
        for w in &mut weights {
            *w = (*w * cap / sum).max(1);
        }
    }
    let total: u64 = weights.iter().sum();
    let mut heap: BinaryHeap<Slot> = indices
        .iter()
        .zip(&weights)
        .map(|(&index, &w)| Slot {
            num: 1,
            den: 2 * w,
            weight: w,
            index,
        })
        .collect();
    let mut order = Vec::with_capacity(total as usize);
    while let Some(mut slot) = heap.pop() {
        order.push(slot.index);
        // k-th appearance has deadline (2k+1)/(2w); stop after w appearances.
        if slot.num + 2 <= 2 * slot.weight {
            slot.num += 2;
            heap.push(slot);
        }
    }
    order
}

impl Selector {
    /// Builds the schedule for peers in canonical order (by band: priority,
    /// weighted peers before weight-0 ones), one tier per band.
    /// `start` staggers the cursors so that workers do not all begin with the same peer.
    pub fn new(peers: &[Peer], start: usize) -> Selector {
        let tiers = bands(peers)
            .map(|range| {
                let indices: Vec<u32> = (range.start as u32..range.end as u32).collect();
                let weights: Vec<u64> = peers[range.clone()]
                    .iter()
                    .map(|p| u64::from(p.share()))
                    .collect();
                let order = smooth_order(&indices, &weights);
                let cursor = if order.is_empty() {
                    0
                } else {
                    start % order.len()
                };
                Tier {
                    priority: peers[range.start].priority,
                    order,
                    cursor,
                }
            })
            .collect();
        Selector { tiers }
    }

    pub fn is_empty(&self) -> bool {
        self.tiers.is_empty()
    }

    /// Priorities of the tiers, lowest first.
    pub fn priorities(&self) -> impl Iterator<Item = u16> + '_ {
        self.tiers.iter().map(|t| t.priority)
    }

    /// The next peer for which `usable` holds: from the first tier that has one.
    /// A higher tier is reached only when no peer of the lower ones is usable.
    /// A retry's pick when the peer that failed stays in the rotation (it is
    /// not down: `max_fails=0`, or fewer failures): the next usable peer from
    /// the cursor, which stays where it is. The peer that failed took its
    /// turn; the one that stands in keeps its own, as nginx's smooth round
    /// robin counts such a retry (a dead peer that stays is then tried first by
    /// every other request of two, not by every request). When the failure
    /// took the peer out (down for `fail_timeout`), nginx's turns go on past
    /// the stand-in: that is [`pick`](Self::pick).
    pub fn pick_again(&self, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        for tier in &self.tiers {
            let len = tier.order.len();
            for k in 0..len {
                let index = tier.order[(tier.cursor + k) % len] as usize;
                if usable(index) {
                    return Some(index);
                }
            }
        }
        None
    }

    pub fn pick(&mut self, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        for tier in &mut self.tiers {
            let len = tier.order.len();
            for _ in 0..len {
                let index = tier.order[tier.cursor] as usize;
                tier.cursor += 1;
                if tier.cursor == len {
                    tier.cursor = 0;
                }
                if usable(index) {
                    return Some(index);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(spec: &[(u16, u16)]) -> Vec<Peer> {
        spec.iter()
            .enumerate()
            .map(|(i, &(w, prio))| {
                Peer::new(format!("127.0.0.{}:6379", i + 1).parse().unwrap(), w, prio)
            })
            .collect()
    }

    fn picks(sel: &mut Selector, n: usize, usable: impl Fn(usize) -> bool) -> Vec<usize> {
        (0..n).filter_map(|_| sel.pick(&usable)).collect()
    }

    #[test]
    fn a_retry_leaves_the_turn_to_the_peer_that_stood_in() {
        // Peer 0 refuses every connection and is never marked down
        // (max_fails=0): as in nginx, every other request tries it first.
        let mut sel = Selector::new(&peers(&[(1, 1), (1, 1)]), 0);
        let mut first = Vec::new();
        for _ in 0..10 {
            let a = sel.pick(|_| true).unwrap();
            first.push(a);
            if a == 0 {
                assert_eq!(sel.pick_again(|i| i != 0), Some(1));
            }
        }
        assert_eq!(first.iter().filter(|&&i| i == 0).count(), 5, "{first:?}");
    }

    #[test]
    fn weights_three_to_one_are_smooth_and_exact() {
        let mut sel = Selector::new(&peers(&[(3, 1), (1, 1)]), 0);
        assert_eq!(picks(&mut sel, 8, |_| true), [0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn smooth_spread_like_nginx_for_5_1_1() {
        // nginx's smooth weighted round robin gives a a b a c a a for 5:1:1.
        let mut sel = Selector::new(&peers(&[(5, 1), (1, 1), (1, 1)]), 0);
        let got = picks(&mut sel, 7, |_| true);
        assert_eq!(got.iter().filter(|&&i| i == 0).count(), 5);
        assert_ne!(got[0..2], [1, 2]);
        // No peer of weight 1 twice in a row, and the heavy one never more than 3 in a row.
        let runs = got.windows(4).filter(|w| w.iter().all(|&i| i == 0)).count();
        assert_eq!(runs, 0, "{got:?}");
    }

    #[test]
    fn equal_weights_round_robin() {
        let mut sel = Selector::new(&peers(&[(1, 1), (1, 1), (1, 1)]), 0);
        assert_eq!(picks(&mut sel, 6, |_| true), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn start_staggers_workers() {
        let mut sel = Selector::new(&peers(&[(1, 1), (1, 1), (1, 1)]), 4);
        assert_eq!(picks(&mut sel, 3, |_| true), [1, 2, 0]);
    }

    #[test]
    fn lower_priority_value_wins_and_higher_tier_only_when_all_unusable() {
        let ps = peers(&[(1, 1), (1, 1), (1, 2), (1, 3)]);
        let mut sel = Selector::new(&ps, 0);
        assert_eq!(picks(&mut sel, 4, |_| true), [0, 1, 0, 1]);
        assert_eq!(picks(&mut sel, 2, |i| i != 0), [1, 1]);
        assert_eq!(picks(&mut sel, 2, |i| i >= 2), [2, 2]);
        assert_eq!(picks(&mut sel, 2, |i| i == 3), [3, 3]);
        assert_eq!(sel.pick(|_| false), None);
        assert_eq!(sel.priorities().collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn tried_peers_are_skipped_within_a_connection() {
        let mut sel = Selector::new(&peers(&[(1, 1), (1, 1), (1, 1)]), 0);
        let mut tried = vec![];
        while let Some(i) = sel.pick(|i| !tried.contains(&i)) {
            tried.push(i);
        }
        tried.sort();
        assert_eq!(tried, [0, 1, 2]);
    }

    #[test]
    fn large_weights_keep_proportions_in_a_bounded_schedule() {
        let ps = peers(&[(65535, 1), (65535, 1), (1, 1)]);
        let mut sel = Selector::new(&ps, 0);
        let len = sel.tiers[0].order.len() as u64;
        assert!(len <= MAX_SCHEDULE + 3, "{len}");
        let got = picks(&mut sel, len as usize, |_| true);
        let heavy = got.iter().filter(|&&i| i == 0).count();
        assert!(heavy > 30_000, "{heavy}");
        assert!(got.contains(&2));
    }

    #[test]
    fn gcd_shrinks_schedules() {
        let sel = Selector::new(&peers(&[(300, 1), (100, 1)]), 0);
        assert_eq!(sel.tiers[0].order.len(), 4);
    }

    #[test]
    fn ten_thousand_peers_every_peer_once_per_cycle() {
        let ps: Vec<Peer> = (0..10_000u32)
            .map(|i| {
                Peer::new(
                    std::net::SocketAddr::from(([127, 0, (i >> 8) as u8, i as u8], 6379)),
                    1,
                    1,
                )
            })
            .collect();
        let mut sel = Selector::new(&ps, 0);
        let mut seen = vec![false; ps.len()];
        for _ in 0..ps.len() {
            seen[sel.pick(|_| true).unwrap()] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn weight_zero_peers_only_when_no_weighted_peer_of_their_tier_is_usable() {
        // Tier 1: 0 and 1 weighted, 2 and 3 weight 0; tier 2: 4.
        let ps = peers(&[(3, 1), (1, 1), (0, 1), (0, 1), (1, 2)]);
        let mut sel = Selector::new(&ps, 0);
        assert_eq!(picks(&mut sel, 8, |_| true), [0, 0, 1, 0, 0, 0, 1, 0]);
        assert_eq!(
            picks(&mut sel, 6, |i| i >= 2),
            [2, 3, 2, 3, 2, 3],
            "weighted peers down: the weight-0 ones, evenly"
        );
        assert_eq!(picks(&mut sel, 2, |i| i == 3 || i == 4), [3, 3]);
        assert_eq!(picks(&mut sel, 2, |i| i == 4), [4, 4], "then tier 2");
        let all_zero = peers(&[(0, 1), (0, 1)]);
        let mut sel = Selector::new(&all_zero, 0);
        assert_eq!(picks(&mut sel, 4, |_| true), [0, 1, 0, 1], "as weight 1");
    }

    #[test]
    fn empty_selector_picks_nothing() {
        let mut sel = Selector::new(&[], 0);
        assert!(sel.is_empty());
        assert_eq!(sel.pick(|_| true), None);
    }
}
