//! Least connections over the state all workers share: a tournament tree in the
//! zone whose leaves are the peer slots and whose every inner node holds the slot
//! of the best peer below it. A connection that opens or closes moves its slot's
//! count and replays the matches on the way up: O(log n), a few atomic loads and
//! stores, no lock. The root is the peer nginx's `least_conn` would pick.
//!
//! Order (best first), as nginx's `least_conn`: lowest band (priority tier, and
//! within it weighted peers before weight-0 ones, which count as weight 1 among
//! themselves: [`crate::peer::Peer::band`]); fewest open connections for the
//! weight (`conns / weight`, compared exactly); among equals,
//! the smallest pass (stride scheduling: each pick moves a peer's pass on by
//! `STRIDE / weight`, so equal peers take turns in proportion to their weights,
//! as nginx's weighted round robin among equals does); then the lower slot.
//!
//! Workers update the tree concurrently without a lock, so an inner node may
//! briefly reflect an older count; the next update on that path repairs it. The
//! writer rebuilds the whole tree with each new set.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::slot::PeerSlot;

/// No slot (an empty subtree).
pub const NONE: u32 = u32::MAX;

/// How far a pick moves a peer of weight 1 on; heavier peers move less.
pub const STRIDE: u64 = 1 << 24;

/// Nodes a tree over `slots` slots takes (the root is node 1; node 0 is unused).
pub fn nodes_for(slots: usize) -> usize {
    2 * slots.max(1).next_power_of_two()
}

/// What a slot's rank depends on, read once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    slot: u32,
    band: u32,
    conns: u64,
    weight: u64,
    pass: u64,
}

impl Key {
    fn of(slots: &[PeerSlot], slot: u32) -> Option<Key> {
        let s = slots.get(slot as usize)?;
        let weight = u64::from(s.weight.load(Ordering::Relaxed));
        if weight == 0 {
            // Not in the set.
            return None;
        }
        Some(Key {
            slot,
            band: s.band.load(Ordering::Relaxed),
            conns: u64::from(s.conns.load(Ordering::Relaxed)),
            weight,
            pass: s.pass.load(Ordering::Relaxed),
        })
    }

    /// Less is better.
    fn rank(&self, other: &Key) -> CmpOrdering {
        self.band
            .cmp(&other.band)
            .then((self.conns * other.weight).cmp(&(other.conns * self.weight)))
            .then(self.pass.cmp(&other.pass))
            .then(self.slot.cmp(&other.slot))
    }
}

/// The best of two slots (NONE loses to anything).
fn better(slots: &[PeerSlot], a: u32, b: u32) -> u32 {
    match (Key::of(slots, a), Key::of(slots, b)) {
        (Some(ka), Some(kb)) => {
            if ka.rank(&kb) == CmpOrdering::Greater {
                b
            } else {
                a
            }
        }
        (Some(_), None) => a,
        (None, Some(_)) => b,
        (None, None) => NONE,
    }
}

/// A tree over `slots`, in `nodes` (of [`nodes_for`] length).
#[derive(Clone, Copy)]
pub struct Tree<'a> {
    nodes: &'a [AtomicU32],
    slots: &'a [PeerSlot],
    leaves: usize,
    /// Slots `0..used` may be in the set; the leaves beyond are empty, and
    /// neither they nor the nodes above only them are read (a big zone's
    /// memory stays untouched where no peer ever was).
    used: usize,
}

/// A candidate in the best-first search, with its key as read when found.
struct Candidate {
    node: usize,
    key: Key,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        // BinaryHeap is a max-heap: the best key must compare greatest.
        other.key.rank(&self.key).then(other.node.cmp(&self.node))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl<'a> Tree<'a> {
    pub fn new(nodes: &'a [AtomicU32], slots: &'a [PeerSlot]) -> Tree<'a> {
        let leaves = (nodes.len() / 2).max(1);
        Tree {
            nodes,
            slots,
            leaves,
            used: slots.len(),
        }
    }

    /// The same tree, where only slots `0..used` may be in the set.
    pub fn in_use(self, used: usize) -> Tree<'a> {
        Tree {
            used: used.min(self.slots.len()),
            ..self
        }
    }

    /// The slot a node stands for: a leaf's own slot, an inner node's winner.
    fn value(&self, node: usize) -> u32 {
        if node >= self.leaves {
            let slot = node - self.leaves;
            if slot < self.used {
                slot as u32
            } else {
                NONE
            }
        } else {
            self.nodes
                .get(node)
                .map_or(NONE, |n| n.load(Ordering::Relaxed))
        }
    }

    fn replay(&self, node: usize) {
        let winner = better(self.slots, self.value(2 * node), self.value(2 * node + 1));
        if let Some(n) = self.nodes.get(node) {
            n.store(winner, Ordering::Relaxed);
        }
    }

    /// Slot `slot`'s rank changed: replays its matches up to the root.
    pub fn update(&self, slot: u32) {
        let mut node = (self.leaves + slot as usize) / 2;
        while node >= 1 {
            self.replay(node);
            node /= 2;
        }
    }

    /// Replays every match over the slots in use (a new set: weights,
    /// priorities, slots changed), level by level from the leaves up. The
    /// right neighbour of a level's last node covers no slot in use: it is set
    /// to NONE, so that every node a replay or a search reads was written here,
    /// and the rest of the tree's memory is never touched.
    pub fn rebuild(&self) {
        if self.leaves == 1 {
            return;
        }
        if self.used == 0 {
            if let Some(root) = self.nodes.get(1) {
                root.store(NONE, Ordering::Relaxed);
            }
            return;
        }
        let (mut first, mut last) = (self.leaves, self.leaves + self.used - 1);
        while first > 1 {
            if first < self.leaves && last % 2 == 0 {
                if let Some(n) = self.nodes.get(last + 1) {
                    n.store(NONE, Ordering::Relaxed);
                }
            }
            first /= 2;
            last /= 2;
            for node in first..=last {
                self.replay(node);
            }
        }
    }

    /// The best slot that `accept` takes, best first: O(log n) when the best one
    /// is taken, O(k log n) when k better ones are refused (down, or tried).
    pub fn best(&self, mut accept: impl FnMut(u32) -> bool) -> Option<u32> {
        // The usual case: the root's peer is taken. No search, no allocation.
        let root = Key::of(self.slots, self.value(1))?;
        if accept(root.slot) {
            return Some(root.slot);
        }
        if self.leaves == 1 {
            return None;
        }
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Candidate>, node: usize| {
            if let Some(key) = Key::of(self.slots, self.value(node)) {
                heap.push(Candidate { node, key });
            }
        };
        push(&mut heap, 2);
        push(&mut heap, 3);
        while let Some(c) = heap.pop() {
            if c.node >= self.leaves {
                // The root's peer was refused already.
                if c.key.slot != root.slot && accept(c.key.slot) {
                    return Some(c.key.slot);
                }
                continue;
            }
            push(&mut heap, 2 * c.node);
            push(&mut heap, 2 * c.node + 1);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        slots: Vec<PeerSlot>,
        nodes: Vec<AtomicU32>,
    }

    impl Fixture {
        /// Slots with (weight, band); weight 0 is a free slot.
        fn new(spec: &[(u32, u32)]) -> Fixture {
            let slots: Vec<PeerSlot> = spec
                .iter()
                .map(|&(w, p)| {
                    let s = PeerSlot::default();
                    s.weight.store(w, Ordering::Relaxed);
                    s.band.store(p, Ordering::Relaxed);
                    s
                })
                .collect();
            let nodes = (0..nodes_for(slots.len()))
                .map(|_| AtomicU32::new(NONE))
                .collect();
            let f = Fixture { slots, nodes };
            f.tree().rebuild();
            f
        }

        fn tree(&self) -> Tree<'_> {
            Tree::new(&self.nodes, &self.slots)
        }

        /// A pick as the balancer makes it: the best usable slot, counted.
        fn pick(&self, accept: impl FnMut(u32) -> bool) -> Option<u32> {
            let slot = self.tree().best(accept)?;
            let s = &self.slots[slot as usize];
            s.conns.fetch_add(1, Ordering::Relaxed);
            s.pass.fetch_add(
                STRIDE / u64::from(s.weight.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            self.tree().update(slot);
            Some(slot)
        }

        fn close(&self, slot: u32) {
            self.slots[slot as usize]
                .conns
                .fetch_sub(1, Ordering::Relaxed);
            self.tree().update(slot);
        }
    }

    #[test]
    fn fewest_connections_first_then_turns_by_weight() {
        let f = Fixture::new(&[(1, 1), (1, 1), (1, 1)]);
        // Held connections: each pick goes to the least loaded peer.
        let held: Vec<u32> = (0..6).filter_map(|_| f.pick(|_| true)).collect();
        assert_eq!(held, [0, 1, 2, 0, 1, 2]);
        // Short connections (closed at once): equals take turns.
        let f = Fixture::new(&[(3, 1), (1, 1)]);
        let mut n = [0; 2];
        for _ in 0..40 {
            let s = f.pick(|_| true).unwrap();
            n[s as usize] += 1;
            f.close(s);
        }
        assert_eq!(n, [30, 10], "3:1 among peers with no open connection");
    }

    #[test]
    fn weights_scale_the_connection_counts() {
        let f = Fixture::new(&[(2, 1), (1, 1)]);
        let held: Vec<u32> = (0..6).filter_map(|_| f.pick(|_| true)).collect();
        let on_0 = held.iter().filter(|&&s| s == 0).count();
        assert_eq!(
            on_0, 4,
            "twice the weight, twice the open connections: {held:?}"
        );
    }

    #[test]
    fn a_newcomer_takes_the_next_connections_until_counts_even_out() {
        let f = Fixture::new(&[(1, 1), (0, 1)]);
        for _ in 0..5 {
            f.pick(|_| true);
        }
        // A new peer in slot 1 (the writer sets its weight, starts its pass at
        // the others', and rebuilds).
        f.slots[1].weight.store(1, Ordering::Relaxed);
        f.slots[1]
            .pass
            .store(f.slots[0].pass.load(Ordering::Relaxed), Ordering::Relaxed);
        f.tree().rebuild();
        let next: Vec<u32> = (0..6).filter_map(|_| f.pick(|_| true)).collect();
        assert_eq!(next, [1, 1, 1, 1, 1, 0]);
    }

    #[test]
    fn lower_priority_tier_first_and_refused_slots_are_passed_over() {
        let f = Fixture::new(&[(1, 2), (1, 1), (1, 1), (1, 3)]);
        assert_eq!(f.pick(|_| true), Some(1));
        assert_eq!(f.pick(|_| true), Some(2));
        // Tier 1 down: tier 2, then 3.
        assert_eq!(f.pick(|s| s != 1 && s != 2), Some(0));
        assert_eq!(f.pick(|s| s == 3), Some(3));
        assert_eq!(f.pick(|_| false), None);
    }

    #[test]
    fn free_slots_never_win() {
        let f = Fixture::new(&[(0, 1), (0, 1), (1, 5), (0, 1)]);
        for _ in 0..3 {
            assert_eq!(f.pick(|_| true), Some(2));
        }
        let empty = Fixture::new(&[(0, 1), (0, 1)]);
        assert_eq!(empty.pick(|_| true), None);
        let none = Fixture::new(&[]);
        assert_eq!(none.pick(|_| true), None);
        let one = Fixture::new(&[(1, 1)]);
        assert_eq!(one.pick(|_| true), Some(0));
    }

    #[test]
    fn only_the_slots_in_use_and_the_nodes_above_them_are_touched() {
        // 64 slots, 5 in use; the slots beyond look like peers (junk memory).
        let spec: Vec<(u32, u32)> = (0..64).map(|i| (if i < 5 { 1 } else { 7 }, 1)).collect();
        let mut f = Fixture::new(&spec);
        fn tree(f: &Fixture) -> Tree<'_> {
            f.tree().in_use(5)
        }
        const JUNK: u32 = 0xdead;
        f.nodes = (0..nodes_for(64)).map(|_| AtomicU32::new(JUNK)).collect();
        tree(&f).rebuild();
        // The nodes over slots 0..5 (leaves are 64..128) and, per inner level,
        // the right neighbour of the last one, set to NONE.
        let written: Vec<usize> = (1..64)
            .filter(|&n| f.nodes[n].load(Ordering::Relaxed) != JUNK)
            .collect();
        assert_eq!(written, [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 34, 35]);
        for n in [3, 5, 9, 35] {
            assert_eq!(f.nodes[n].load(Ordering::Relaxed), NONE, "node {n}");
        }
        // The same over zeroed memory (a node that was never written names
        // slot 0): picks and updates stay within the slots in use.
        for n in &f.nodes {
            n.store(0, Ordering::Relaxed);
        }
        tree(&f).rebuild();
        let mut counts = [0; 5];
        for _ in 0..50 {
            let s = tree(&f).best(|_| true).unwrap();
            assert!(s < 5, "slot {s} is not in use");
            f.slots[s as usize].conns.fetch_add(1, Ordering::Relaxed);
            tree(&f).update(s);
            counts[s as usize] += 1;
        }
        assert_eq!(counts, [10; 5]);
        assert_eq!(tree(&f).best(|s| s > 4), None);
        for n in [6, 7, 10, 15, 18, 31, 36, 63] {
            assert_eq!(f.nodes[n].load(Ordering::Relaxed), 0, "node {n} untouched");
        }
    }

    #[test]
    fn many_slots_in_log_time_agree_with_a_scan() {
        let spec: Vec<(u32, u32)> = (0..1000u32)
            .map(|i| (1 + i % 3, 1 + (i % 7 == 0) as u32))
            .collect();
        let f = Fixture::new(&spec);
        let mut seed = 7u64;
        for _ in 0..3000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if seed >> 62 == 0 {
                // close a random open connection
                let s = (seed >> 20) as u32 % 1000;
                if f.slots[s as usize].conns.load(Ordering::Relaxed) > 0 {
                    f.close(s);
                }
                continue;
            }
            // the tree's choice has the least conns/weight of the best tier
            let got = f.pick(|_| true).unwrap();
            let g = &f.slots[got as usize];
            let (gc, gw) = (
                u64::from(g.conns.load(Ordering::Relaxed)) - 1,
                u64::from(g.weight.load(Ordering::Relaxed)),
            );
            for (i, s) in f.slots.iter().enumerate() {
                if i as u32 == got || s.band.load(Ordering::Relaxed) != 1 {
                    continue;
                }
                let (c, w) = (
                    u64::from(s.conns.load(Ordering::Relaxed)),
                    u64::from(s.weight.load(Ordering::Relaxed)),
                );
                assert!(
                    gc * w <= c * gw,
                    "slot {got} ({gc}/{gw}) was picked over {i} ({c}/{w})"
                );
            }
        }
    }
}
