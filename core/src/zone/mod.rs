//! The shared-memory zone of one upstream: its layout and every operation on it,
//! written with plain atomics so that the module only maps the memory (and takes
//! nginx's lock around a write) while the logic is tested here.
//!
//! - Two **record buffers**. The writer (the discovery process) fills the one that
//!   is not active, then flips `active`: a writer killed in the middle leaves a
//!   half-written *inactive* buffer, never a torn published set, and readers never
//!   wait for it. Each buffer has a sequence number, odd while it is written, so a
//!   reader that was overtaken by two publishes notices and reads again.
//! - One **slot** per peer with the state every worker shares: active connections,
//!   passive health (nginx's `fails`/`checked`/`accessed`), counters. A peer keeps
//!   its slot while it stays in the set; a slot given to another peer changes its
//!   epoch, so a late release for the old peer is dropped.
//! - A **tournament tree** over the slots for `least_conn` (see `crate::least`).
//! - One **line record** per `consul_upstream` line (by query tag): when its last
//!   successful answer came, its failure streak, lookup counters. They outlive a
//!   reload, like the set.
//!
//! Writers are serialized by the caller (nginx's shared mutex, which the master
//! frees when its holder dies); readers take no lock.
//!
//! Files: `layout.rs` (the header, sizes), `records.rs` (the two buffers),
//! `lines.rs` (line records); this one maps the parts and reads, publishes and
//! copies sets.

mod layout;
mod lines;
mod records;

pub use layout::{bytes_for, capacity_for, Header, BYTES_PER_PEER, LAYOUT, MAGIC};
pub use lines::{LineCell, LineStatus, Lookup, SetKind, StreakKind, MAX_LINES, REASON_MAX};
pub use records::{BufHeader, Record};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::least::Tree;
use crate::peer::Peer;
use crate::slot::PeerSlot;

/// Reads that find the buffer being rewritten twice in a row give up (the caller
/// keeps its copy and asks again on its next connection).
const READ_TRIES: usize = 64;

/// A published peer as a reader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedPeer {
    pub peer: Peer,
    /// `source_tag` of the query it came from.
    pub tag: u32,
    pub slot: u32,
    /// The slot's epoch when the set was read.
    pub epoch: u32,
}

/// A consistent copy of the published set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub generation: u64,
    pub peers: Vec<SharedPeer>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub capacity: usize,
}

/// A view of one zone's memory.
#[derive(Clone, Copy)]
pub struct Zone<'a> {
    header: &'a Header,
    records: [&'a [Record]; 2],
    slots: &'a [PeerSlot],
    tree: &'a [AtomicU32],
}

impl<'a> Zone<'a> {
    /// A zone over its parts: the header, the two record buffers and the slots,
    /// each `capacity` long, and the least_conn tree's nodes.
    pub fn from_parts(
        header: &'a Header,
        records: [&'a [Record]; 2],
        slots: &'a [PeerSlot],
        tree: &'a [AtomicU32],
    ) -> Zone<'a> {
        Zone {
            header,
            records,
            slots,
            tree,
        }
    }

    /// The least_conn tree over the slots.
    pub fn tree(&self) -> Tree<'a> {
        Tree::new(self.tree, self.slots).in_use(self.slots_used())
    }

    /// Slots given to a peer at least once: `0..slots_used()`.
    fn slots_used(&self) -> usize {
        (self.header.slots_used.load(Ordering::Acquire) as usize).min(self.slots.len())
    }

    /// Where least_conn newcomers start (the latest pick's pass).
    pub fn vtime(&self) -> &'a AtomicU64 {
        &self.header.vtime
    }

    pub fn capacity(&self) -> usize {
        self.slots
            .len()
            .min(self.records[0].len())
            .min(self.records[1].len())
    }

    /// One atomic load: what a worker compares on every connection.
    pub fn generation(&self) -> u64 {
        self.header.generation.load(Ordering::Acquire)
    }

    pub fn writer(&self) -> i64 {
        self.header.writer.load(Ordering::SeqCst)
    }

    /// Makes `pid` the writer (the caller holds the write lock), and repairs what
    /// a writer killed between flipping the buffer and announcing it left behind.
    pub fn claim(&self, pid: i64) {
        let h = self.header;
        h.writer.store(pid, Ordering::SeqCst);
        let active = h.active.load(Ordering::Relaxed) as usize & 1;
        let generation = h.bufs[active].generation.load(Ordering::Relaxed);
        if h.generation.load(Ordering::Relaxed) != generation {
            h.generation.store(generation, Ordering::Release);
        }
    }

    pub fn slot(&self, index: u32) -> Option<&'a PeerSlot> {
        self.slots.get(index as usize)
    }

    /// A consistent copy of the published set; `None` if it kept changing under
    /// the reader (the caller keeps its copy and asks again later).
    pub fn read(&self) -> Option<Snapshot> {
        let h = self.header;
        let mut peers = Vec::new();
        let epoch_of = |slot: u32| {
            self.slots
                .get(slot as usize)
                .map_or(0, |s| s.epoch.load(Ordering::Relaxed))
        };
        for _ in 0..READ_TRIES {
            let b = h.active.load(Ordering::Acquire) as usize & 1;
            let records = &self.records[b][..self.capacity()];
            match h.bufs[b].try_read(records, &mut peers, epoch_of) {
                Some(generation) => return Some(Snapshot { generation, peers }),
                None => std::hint::spin_loop(),
            }
        }
        None
    }

    /// Publishes `peers` (canonical order, each with its query tag) as the next
    /// generation. Peers already published keep their slot; new ones get the slot
    /// freed longest ago. The caller holds the write lock and is the writer.
    pub fn publish(
        &self,
        peers: &[(Peer, u32)],
        now_unix: u64,
        now_ms: u64,
    ) -> Result<u64, TooLarge> {
        let capacity = self.capacity();
        if peers.len() > capacity {
            return Err(TooLarge { capacity });
        }
        let h = self.header;
        let current = h.active.load(Ordering::Relaxed) as usize & 1;
        let next = 1 - current;
        let generation = h.bufs[current].generation.load(Ordering::Relaxed) + 1;

        // Slots: kept by address, freed for peers that left, taken for newcomers.
        let old: HashMap<SocketAddr, u32> = self
            .published(current)
            .into_iter()
            .map(|(p, slot, _)| (p.addr, slot))
            .collect();
        // Only slots below the high-water mark were ever given out: those are
        // read, and reused first; the mark grows only when they are all taken.
        let slots_used = self.slots_used();
        let mut used = vec![false; slots_used];
        let mut assigned: Vec<Option<u32>> = peers
            .iter()
            .map(|(p, _)| old.get(&p.addr).copied())
            .collect();
        for &slot in assigned.iter().flatten() {
            if let Some(u) = used.get_mut(slot as usize) {
                *u = true;
            }
        }
        for (addr, &slot) in &old {
            if !peers.iter().any(|(p, _)| p.addr == *addr) {
                if let Some(s) = self.slots.get(slot as usize) {
                    s.freed_gen.store(generation, Ordering::Relaxed);
                    s.epoch.fetch_add(1, Ordering::Relaxed);
                    s.weight.store(0, Ordering::Relaxed);
                }
            }
        }
        // Free slots: those freed by an earlier set, longest ago first; then
        // never-used ones; those freed just now last (a worker whose copy is
        // older than this set may still pick the peer that left).
        let freed_at = |i: usize| self.slots[i].freed_gen.load(Ordering::Relaxed);
        let (mut earlier, now): (Vec<usize>, Vec<usize>) = (0..slots_used)
            .filter(|&i| !used[i])
            .partition(|&i| freed_at(i) < generation);
        earlier.sort_by_key(|&i| freed_at(i));
        let mut free = earlier.into_iter().chain(slots_used..capacity).chain(now);
        // Peers joining a set that has peers ramp up (slow_start); the first set does not.
        let ramp_ms = if old.is_empty() { 0 } else { now_ms.max(1) };
        let vtime = self.header.vtime.load(Ordering::Relaxed);
        for a in assigned.iter_mut().filter(|a| a.is_none()) {
            // More free slots than newcomers: peers.len() <= capacity.
            let slot = free.next().unwrap_or_default();
            self.slots[slot].reset(now_unix, ramp_ms, vtime);
            *a = Some(slot as u32);
        }
        for ((p, _), slot) in peers.iter().zip(&assigned) {
            if let Some(s) = slot.and_then(|i| self.slots.get(i as usize)) {
                s.weight.store(u32::from(p.share()), Ordering::Relaxed);
                s.band.store(p.band(), Ordering::Relaxed);
            }
        }
        let highest = assigned.iter().flatten().map(|&i| i as usize + 1).max();
        if let Some(mark) = highest.filter(|&m| m > slots_used) {
            // Before the set is published: a reader of the new set sees it.
            self.header.slots_used.store(mark as u32, Ordering::Release);
        }
        self.tree().rebuild();

        let entries = peers
            .iter()
            .zip(&assigned)
            .map(|((p, tag), slot)| (p, slot.unwrap_or_default(), *tag));
        h.bufs[next].write(self.records[next], entries, generation);
        h.active.store(next as u32, Ordering::Release);
        h.generation.store(generation, Ordering::Release);
        Ok(generation)
    }

    /// The active buffer as the writer sees it (no concurrent writer).
    fn published(&self, b: usize) -> Vec<(Peer, u32, u32)> {
        self.header.bufs[b].entries(&self.records[b][..self.capacity()])
    }

    /// Carries another zone's set, peer state and line records over into this
    /// fresh one (a reload that changed the zone's size). Counters stay monotonic;
    /// open connections stay counted where they were opened.
    pub fn copy_from(&self, old: &Zone<'_>, now_unix: u64, now_ms: u64) -> Result<(), TooLarge> {
        if let Some(snap) = old.read() {
            let set: Vec<(Peer, u32)> = snap.peers.iter().map(|p| (p.peer, p.tag)).collect();
            let h = self.header;
            // Continue the old numbering: logs and workers see the generation grow.
            let base = snap.generation.saturating_sub(1);
            h.vtime
                .store(old.header.vtime.load(Ordering::Relaxed), Ordering::Relaxed);
            let b = h.active.load(Ordering::Relaxed) as usize & 1;
            h.bufs[b].generation.store(base, Ordering::Relaxed);
            self.publish(&set, now_unix, now_ms)?;
            if let Some(new) = self.read() {
                for (n, o) in new.peers.iter().zip(&snap.peers) {
                    let (Some(to), Some(from)) = (self.slot(n.slot), old.slot(o.slot)) else {
                        continue;
                    };
                    to.fails
                        .store(from.fails.load(Ordering::Relaxed), Ordering::Relaxed);
                    for (t, f) in [
                        (&to.checked_ms, &from.checked_ms),
                        (&to.accessed_ms, &from.accessed_ms),
                        (&to.connections, &from.connections),
                        (&to.failures, &from.failures),
                        (&to.since_unix, &from.since_unix),
                        (&to.usable_since_ms, &from.usable_since_ms),
                        (&to.pass, &from.pass),
                    ] {
                        t.store(f.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                }
            }
        }
        self.copy_lines_from(old);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::least::nodes_for;

    /// A zone in ordinary memory, as the module lays one out in shared memory.
    pub struct Owned {
        pub header: Box<Header>,
        pub records: [Vec<Record>; 2],
        pub slots: Vec<PeerSlot>,
        pub tree: Vec<AtomicU32>,
    }

    impl Owned {
        pub fn new(capacity: usize) -> Owned {
            let header: Box<Header> = Box::default();
            let o = Owned {
                header,
                records: [
                    (0..capacity).map(|_| Record::default()).collect(),
                    (0..capacity).map(|_| Record::default()).collect(),
                ],
                slots: (0..capacity).map(|_| PeerSlot::default()).collect(),
                tree: (0..nodes_for(capacity))
                    .map(|_| AtomicU32::new(crate::least::NONE))
                    .collect(),
            };
            o.header.format(capacity);
            o
        }

        pub fn zone(&self) -> Zone<'_> {
            Zone::from_parts(
                &self.header,
                [&self.records[0], &self.records[1]],
                &self.slots,
                &self.tree,
            )
        }
    }

    fn p(s: &str, w: u16, prio: u16) -> Peer {
        Peer::new(s.parse().unwrap(), w, prio)
    }

    fn set(peers: &[Peer]) -> Vec<(Peer, u32)> {
        peers.iter().map(|p| (*p, 7)).collect()
    }

    #[test]
    fn publish_and_read_round_trip() {
        let o = Owned::new(8);
        let z = o.zone();
        assert_eq!(z.generation(), 0);
        assert_eq!(z.read().unwrap().peers, vec![]);
        let peers = [p("127.0.0.1:6380", 3, 1), p("[::1]:6381", 1, 2)];
        assert_eq!(z.publish(&set(&peers), 100, 5), Ok(1));
        let snap = z.read().unwrap();
        assert_eq!(snap.generation, 1);
        let got: Vec<Peer> = snap.peers.iter().map(|p| p.peer).collect();
        assert_eq!(got, peers);
        assert!(snap.peers.iter().all(|p| p.tag == 7));
        assert_eq!(z.generation(), 1);
    }

    #[test]
    fn too_large_is_refused_and_nothing_changes() {
        let o = Owned::new(1);
        let z = o.zone();
        let peers = [p("127.0.0.1:1", 1, 1), p("127.0.0.1:2", 1, 1)];
        assert_eq!(z.publish(&set(&peers), 0, 0), Err(TooLarge { capacity: 1 }));
        assert_eq!(z.generation(), 0);
    }

    #[test]
    fn a_big_zone_is_touched_only_where_peers_are() {
        // Memory the zone never wrote, marked: it must stay as it is.
        const MARK: u64 = 0x5eed;
        let o = Owned::new(4096);
        for s in &o.slots {
            s.since_unix.store(MARK, Ordering::Relaxed);
        }
        for r in o.records.iter().flatten() {
            r.0[0].store(MARK, Ordering::Relaxed);
        }
        for n in &o.tree {
            n.store(MARK as u32, Ordering::Relaxed);
        }
        let z = o.zone();
        // Sets of 3 to 10 peers, each replacing every peer of the one before.
        let mut largest = 0;
        for round in 0..50u16 {
            let n = 3 + usize::from(round % 8);
            largest = largest.max(n);
            let peers: Vec<Peer> = (0..n)
                .map(|i| p(&format!("127.0.0.{}:{}", 1 + round % 200, 1000 + i), 1, 1))
                .collect();
            z.publish(&set(&peers), 100, 0).unwrap();
            let snap = z.read().unwrap();
            assert_eq!(snap.peers.len(), n);
            assert!(snap
                .peers
                .iter()
                .all(|sp| (sp.slot as usize) < z.slots_used()));
        }
        let used = z.slots_used();
        assert!(
            (largest..=2 * largest).contains(&used),
            "{used} slots used for sets of at most {largest}"
        );
        assert!(o.slots[used..]
            .iter()
            .all(|s| s.since_unix.load(Ordering::Relaxed) == MARK));
        for buf in &o.records {
            assert!(buf[largest..]
                .iter()
                .all(|r| r.0[0].load(Ordering::Relaxed) == MARK));
        }
        let nodes = o
            .tree
            .iter()
            .filter(|n| n.load(Ordering::Relaxed) != MARK as u32)
            .count();
        assert!(nodes < 2 * used + 2 * 13, "{nodes} tree nodes written");
        // least_conn over it picks among the set only.
        let tree = z.tree();
        let snap = z.read().unwrap();
        let slot = tree.best(|_| true).unwrap();
        assert!(snap.peers.iter().any(|sp| sp.slot == slot));
    }

    #[test]
    fn slots_follow_addresses_and_reuse_the_oldest_free() {
        let o = Owned::new(4);
        let z = o.zone();
        let a = p("127.0.0.1:1", 1, 1);
        let b = p("127.0.0.1:2", 1, 1);
        let c = p("127.0.0.1:3", 1, 1);
        z.publish(&set(&[a, b]), 10, 0).unwrap();
        let first = z.read().unwrap();
        let slot_b = first.peers[1].slot;
        z.slot(slot_b).unwrap().conns.store(5, Ordering::Relaxed);
        // b stays (weight change), a leaves, c comes.
        let b2 = p("127.0.0.1:2", 9, 1);
        z.publish(&set(&[b2, c]), 20, 0).unwrap();
        let second = z.read().unwrap();
        assert_eq!(second.peers[0].slot, slot_b, "b keeps its slot and state");
        assert_eq!(second.peers[0].peer.weight, 9);
        assert_eq!(z.slot(slot_b).unwrap().conns.load(Ordering::Relaxed), 5);
        let slot_a = first.peers[0].slot;
        assert_ne!(
            second.peers[1].slot, slot_a,
            "a's slot rests while never-used ones exist"
        );
        assert_eq!(
            z.slot(second.peers[1].slot)
                .unwrap()
                .since_unix
                .load(Ordering::Relaxed),
            20
        );
        assert_ne!(
            z.slot(slot_a).unwrap().epoch.load(Ordering::Relaxed),
            first.peers[0].epoch,
            "a late release for a is recognized"
        );
    }

    #[test]
    fn a_writer_killed_mid_publish_leaves_the_set_readable() {
        let o = Owned::new(4);
        let z = o.zone();
        let a = p("127.0.0.1:1", 1, 1);
        z.publish(&set(&[a]), 0, 0).unwrap();
        // A publish that died while writing the other buffer: its seq is odd.
        let idle = 1 - o.header.active.load(Ordering::Relaxed) as usize;
        o.header.bufs[idle].seq.store(7, Ordering::Relaxed);
        o.records[idle][0].store(&p("127.0.0.9:9", 1, 1), 3, 1);
        let snap = z.read().expect("no waiting on a dead writer");
        assert_eq!(snap.peers.len(), 1);
        assert_eq!(snap.peers[0].peer, a);
        // The next writer goes on from there.
        let b = p("127.0.0.1:2", 1, 1);
        assert_eq!(z.publish(&set(&[a, b]), 0, 0), Ok(2));
        assert_eq!(o.header.bufs[idle].seq.load(Ordering::Relaxed) & 1, 0);
        assert_eq!(z.read().unwrap().peers.len(), 2);
    }

    #[test]
    fn a_writer_killed_before_announcing_is_repaired_by_the_next_claim() {
        let o = Owned::new(4);
        let z = o.zone();
        z.publish(&set(&[p("127.0.0.1:1", 1, 1)]), 0, 0).unwrap();
        z.publish(&set(&[p("127.0.0.1:2", 1, 1)]), 0, 0).unwrap();
        // Flipped, but the header still says generation 1.
        o.header.generation.store(1, Ordering::Relaxed);
        z.claim(42);
        assert_eq!(z.generation(), 2);
        assert_eq!(z.writer(), 42);
    }

    #[test]
    fn readers_racing_a_writer_see_whole_sets_only() {
        let o = std::sync::Arc::new(Owned::new(64));
        let sets: Vec<Vec<(Peer, u32)>> = (1..=6u16)
            .map(|n| {
                (0..n * 10)
                    .map(|i| {
                        (
                            p(&format!("127.0.{n}.{}:{}", i % 250, 1000 + i), n, 1),
                            u32::from(n),
                        )
                    })
                    .collect()
            })
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (o, stop) = (o.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seen = 0;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(s) = o.zone().read() {
                            if let Some(first) = s.peers.first() {
                                let n = first.peer.weight;
                                assert_eq!(s.peers.len(), usize::from(n) * 10, "a whole set");
                                assert!(s
                                    .peers
                                    .iter()
                                    .all(|p| p.peer.weight == n && p.tag == u32::from(n)));
                                seen += 1;
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        for i in 0..5_000 {
            o.zone().publish(&sets[i % sets.len()], 0, 0).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }

    #[test]
    fn copy_carries_set_state_and_lines_into_a_larger_zone() {
        let small = Owned::new(2);
        let zs = small.zone();
        let a = p("127.0.0.1:1", 2, 1);
        zs.publish(&set(&[a]), 50, 0).unwrap();
        zs.publish(&set(&[a]), 50, 0).unwrap();
        let s = zs.read().unwrap().peers[0].slot;
        let slot = zs.slot(s).unwrap();
        slot.connections.store(40, Ordering::Relaxed);
        slot.fails.store(1, Ordering::Relaxed);
        slot.conns.store(3, Ordering::Relaxed);
        zs.update_line(7, |l| l.lookups = [5, 1, 2, 0]);

        let big = Owned::new(16);
        let zb = big.zone();
        zb.copy_from(&zs, 60, 0).unwrap();
        let snap = zb.read().unwrap();
        assert_eq!(snap.generation, 2, "the numbering goes on");
        assert_eq!(snap.peers.len(), 1);
        let to = zb.slot(snap.peers[0].slot).unwrap();
        assert_eq!(to.connections.load(Ordering::Relaxed), 40);
        assert_eq!(to.fails.load(Ordering::Relaxed), 1);
        assert_eq!(
            to.conns.load(Ordering::Relaxed),
            0,
            "open connections stay in the old zone"
        );
        assert_eq!(to.since_unix.load(Ordering::Relaxed), 50);
        assert_eq!(zb.line(7).unwrap().lookups, [5, 1, 2, 0]);
    }
}
