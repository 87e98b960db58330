//! A worker's view of one upstream's discovered peers: the set, what the
//! upstream's balancing method needs to pick from it, and for each peer its slot
//! in the shared zone, where every worker keeps passive health (nginx's
//! `max_fails`/`fail_timeout`), open connections and counters with atomics: a
//! peer that fails is skipped by all workers, not only by the one that saw it fail.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::least::{Tree, STRIDE};
use crate::method::{Method, Rng, Tier, TRIES};
use crate::peer::Peer;
use crate::select::Selector;
use crate::slot::PeerSlot;

/// nginx's `max_fails`/`fail_timeout`: the one place their defaults are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// 0 turns failure accounting off, as in nginx.
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
}

impl HealthPolicy {
    /// Until when a peer is down (nginx's rule): `max_fails` failures in the
    /// window that started at `checked_ms` keep it out for `fail_timeout` from
    /// there. `None`: the peer may be tried.
    pub fn down_until(&self, fails: u32, checked_ms: u64, now_ms: u64) -> Option<u64> {
        if self.max_fails == 0 || fails < self.max_fails {
            return None;
        }
        let until = checked_ms.saturating_add(self.fail_timeout_ms);
        (now_ms <= until).then_some(until)
    }
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            max_fails: 1,
            fail_timeout_ms: 10_000,
        }
    }
}

/// How an upstream picks: the method, passive health, slow start, connection limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Balancing {
    pub method: Method,
    pub health: HealthPolicy,
    /// `slow_start`: a peer that joins the set or comes back ramps up to its share
    /// over this time (0: off).
    pub slow_start_ms: u64,
    /// `max_conns`: a peer with this many open connections (all workers
    /// together) takes no more (0: no limit).
    pub max_conns: u32,
}

/// The zone's least_conn structures.
#[derive(Clone, Copy)]
pub struct Shared<'z> {
    pub tree: Tree<'z>,
    pub vtime: &'z AtomicU64,
}

/// A peer's slot as a worker found it: the epoch tells a release for a peer that
/// has since left (its slot given to another) from one for the peer itself.
#[derive(Clone, Copy)]
pub struct SlotRef<'z> {
    pub slot: &'z PeerSlot,
    pub epoch: u32,
    /// The slot's number (its leaf in the least_conn tree).
    pub index: u32,
    /// The least_conn tree, when the upstream balances by it.
    tree: Option<Tree<'z>>,
}

impl std::fmt::Debug for SlotRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot {} (epoch {})", self.index, self.epoch)
    }
}

impl<'z> SlotRef<'z> {
    pub fn new(slot: &'z PeerSlot, epoch: u32, index: u32) -> SlotRef<'z> {
        SlotRef {
            slot,
            epoch,
            index,
            tree: None,
        }
    }

    /// Whether the slot still holds the peer it was found with.
    pub fn current(&self) -> bool {
        self.slot.epoch.load(Ordering::Relaxed) == self.epoch
    }

    fn down(&self, policy: &HealthPolicy) -> bool {
        policy.max_fails > 0 && self.slot.fails.load(Ordering::Relaxed) >= policy.max_fails
    }

    /// Not down: fewer than `max_fails` failures, or the window has passed.
    pub fn usable(&self, policy: &HealthPolicy, now_ms: u64) -> bool {
        let s = self.slot;
        policy
            .down_until(
                s.fails.load(Ordering::Relaxed),
                s.checked_ms.load(Ordering::Relaxed),
                now_ms,
            )
            .is_none()
    }

    /// Takes the peer for a connection. A new `fail_timeout` window starts when the
    /// last one is over (nginx's `checked`); for a peer that is down, only the
    /// worker that starts the window tries it (one probe, whichever worker).
    /// A peer at `max_conns` is passed over.
    fn take(&self, policy: &HealthPolicy, now_ms: u64, max_conns: u32) -> bool {
        if !self.current() {
            // The peer left the set after this worker copied it: its slot may
            // be another peer's by now (the zone reuses freed slots).
            return false;
        }
        let s = self.slot;
        if self.full(max_conns) {
            return false;
        }
        let checked = s.checked_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(checked) > policy.fail_timeout_ms {
            let won = s
                .checked_ms
                .compare_exchange(checked, now_ms, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
            if self.down(policy) && !won {
                return false;
            }
        } else if self.down(policy) {
            return false;
        }
        self.count_in(max_conns)
    }

    /// At `max_conns` open connections (0: no limit).
    fn full(&self, max_conns: u32) -> bool {
        max_conns > 0 && self.slot.conns.load(Ordering::Relaxed) >= max_conns
    }

    /// One more connection, counted (and least_conn's turn moved on); under
    /// `max_conns` only while below it, which holds for all workers together.
    #[inline]
    fn count_in(&self, max_conns: u32) -> bool {
        let s = self.slot;
        if max_conns == 0 {
            s.conns.fetch_add(1, Ordering::Relaxed);
        } else if s
            .conns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c < max_conns).then_some(c + 1)
            })
            .is_err()
        {
            return false;
        }
        s.connections.fetch_add(1, Ordering::Relaxed);
        if let Some(tree) = self.tree {
            let weight = u64::from(s.weight.load(Ordering::Relaxed).max(1));
            s.pass.fetch_add(STRIDE / weight, Ordering::Relaxed);
            tree.update(self.index);
        }
        true
    }

    /// The connection to this peer was established: the peer answers again
    /// (nginx 1.25+ reports this; older ones only at the end of the session).
    /// A peer that was down is usable again from now: slow start ramps from here.
    pub fn connected(&self, policy: &HealthPolicy, now_ms: u64) {
        if !self.current() {
            return;
        }
        let s = self.slot;
        if s.accessed_ms.load(Ordering::Relaxed) < s.checked_ms.load(Ordering::Relaxed) {
            let was_down = self.down(policy);
            s.fails.store(0, Ordering::Relaxed);
            if was_down {
                s.usable_since_ms.store(now_ms.max(1), Ordering::Relaxed);
            }
        }
    }

    /// The connection ended; `failed` when connecting to the peer failed.
    pub fn release(&self, failed: bool, policy: &HealthPolicy, now_ms: u64) {
        if !self.current() {
            return;
        }
        let s = self.slot;
        let _ = s
            .conns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
        if let Some(tree) = self.tree {
            tree.update(self.index);
        }
        if failed {
            s.fails.fetch_add(1, Ordering::Relaxed);
            s.failures.fetch_add(1, Ordering::Relaxed);
            s.accessed_ms.store(now_ms, Ordering::Relaxed);
            s.checked_ms.store(now_ms, Ordering::Relaxed);
        } else {
            self.connected(policy, now_ms);
        }
    }

    /// Whether slow start lets this pick through: a ramping peer gets its share
    /// in proportion to how far into `slow_start` it is.
    fn ramped(&self, slow_start_ms: u64, now_ms: u64, rng: &mut Rng) -> bool {
        let since = self.slot.usable_since_ms.load(Ordering::Relaxed);
        if slow_start_ms == 0 || since == 0 {
            return true;
        }
        let elapsed = now_ms.saturating_sub(since);
        elapsed >= slow_start_ms || rng.chance(elapsed.max(slow_start_ms / 20), slow_start_ms)
    }

    /// Open connections per unit of weight, as a fraction to compare exactly.
    fn load(&self) -> (u64, u64) {
        (
            u64::from(self.slot.conns.load(Ordering::Relaxed)),
            u64::from(self.slot.weight.load(Ordering::Relaxed).max(1)),
        )
    }
}

/// What one pick needs besides the set: the key's hash (hash methods; `None`
/// for an empty key, which nginx balances by round robin) and the worker's
/// random numbers (random, slow start).
pub struct PickContext<'a> {
    pub key_hash: Option<u64>,
    pub rng: &'a mut Rng,
    /// A retry whose failed peer stays in the rotation (not down): the
    /// round-robin pick leaves the turn to the peer that stands in (see
    /// [`Selector::pick_again`](crate::select::Selector::pick_again)).
    pub retry: bool,
}

#[derive(Default)]
pub struct PeerView<'z> {
    peers: Vec<Peer>,
    slots: Vec<SlotRef<'z>>,
    /// Round robin's schedule (one tier per band): the default method, and every
    /// method's fallback.
    selector: Selector,
    /// Weighted tiers (and rings) for hash and random, one per band: a priority
    /// tier's weighted peers, then its weight-0 peers (asked in that order).
    tiers: Vec<Tier>,
    shared: Option<Shared<'z>>,
    /// Slot number to peer index, for least_conn (u32::MAX: not in this view).
    index_of_slot: Vec<u32>,
    balancing: Balancing,
}

impl std::fmt::Debug for PeerView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerView")
            .field("peers", &self.peers)
            .field("balancing", &self.balancing)
            .finish()
    }
}

impl<'z> PeerView<'z> {
    pub fn new(balancing: Balancing) -> Self {
        PeerView {
            balancing,
            ..PeerView::default()
        }
    }

    pub fn balancing(&self) -> &Balancing {
        &self.balancing
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn slot(&self, index: usize) -> Option<SlotRef<'z>> {
        self.slots.get(index).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Replaces the set (canonical order, each peer with its slot). `start`
    /// staggers the workers' round-robin cursors; `shared` is the zone's least_conn
    /// tree. Built here, once per set: nothing is built per connection.
    pub fn replace(
        &mut self,
        peers: Vec<(Peer, SlotRef<'z>)>,
        start: usize,
        shared: Option<Shared<'z>>,
    ) {
        let method = self.balancing.method;
        let (peers, mut slots): (Vec<Peer>, Vec<SlotRef<'z>>) = peers.into_iter().unzip();
        self.selector = Selector::new(&peers, start);
        self.tiers = match method {
            Method::Hash | Method::Random | Method::RandomTwo => Tier::build(&peers, false),
            Method::ConsistentHash => Tier::build(&peers, true),
            Method::RoundRobin | Method::LeastConn => Vec::new(),
        };
        self.index_of_slot.clear();
        self.shared = None;
        if let (Method::LeastConn, Some(shared)) = (method, shared) {
            for (i, s) in slots.iter_mut().enumerate() {
                s.tree = Some(shared.tree);
                let at = s.index as usize;
                if self.index_of_slot.len() <= at {
                    self.index_of_slot.resize(at + 1, u32::MAX);
                }
                self.index_of_slot[at] = i as u32;
            }
            self.shared = Some(shared);
        }
        self.peers = peers;
        self.slots = slots;
    }

    /// Picks a peer not yet tried by this connection, by the upstream's method,
    /// skipping peers that are down or at `max_conns`. A single peer is always
    /// tried (as nginx does), unless already tried or at `max_conns`.
    pub fn select(
        &mut self,
        tried: impl Fn(usize) -> bool,
        now_ms: u64,
        ctx: &mut PickContext<'_>,
    ) -> Option<usize> {
        if self.peers.len() == 1 {
            let s = self.slots.first()?;
            // Not a peer whose slot changed hands (see `take`): its release
            // would not count the connection out again.
            if tried(0) || !s.current() || !s.count_in(self.balancing.max_conns) {
                return None;
            }
            return Some(0);
        }
        // Slow start passes over ramping peers now and then; if that leaves no
        // peer at all, they are taken anyway. A hash keeps a key on its peer.
        let ramp = self.balancing.slow_start_ms > 0
            && !(self.balancing.method.uses_key() && ctx.key_hash.is_some());
        if let Some(i) = self.pick(&tried, now_ms, ctx, ramp) {
            return Some(i);
        }
        if ramp {
            return self.pick(&tried, now_ms, ctx, false);
        }
        None
    }

    fn pick(
        &mut self,
        tried: &impl Fn(usize) -> bool,
        now_ms: u64,
        ctx: &mut PickContext<'_>,
        ramp: bool,
    ) -> Option<usize> {
        let Balancing {
            method,
            health,
            slow_start_ms,
            max_conns,
        } = self.balancing;
        let slots = &self.slots;
        // Whether peer i may be asked: not tried, not down, through slow start.
        let open = |i: usize, rng: &mut Rng| {
            !tried(i)
                && slots.get(i).is_some_and(|s| {
                    s.usable(&health, now_ms) && (!ramp || s.ramped(slow_start_ms, now_ms, rng))
                })
        };
        let take = |i: usize| {
            slots
                .get(i)
                .is_some_and(|s| s.take(&health, now_ms, max_conns))
        };
        match method {
            Method::RoundRobin => {}
            Method::LeastConn => {
                if let Some(shared) = self.shared {
                    let index_of_slot = &self.index_of_slot;
                    let rng = &mut *ctx.rng;
                    let slot = shared.tree.best(|slot| {
                        let i = index_of_slot
                            .get(slot as usize)
                            .copied()
                            .unwrap_or(u32::MAX);
                        i != u32::MAX && open(i as usize, rng) && take(i as usize)
                    });
                    if let Some(slot) = slot {
                        let s = &self.slots[self.index_of_slot[slot as usize] as usize];
                        shared
                            .vtime
                            .store(s.slot.pass.load(Ordering::Relaxed), Ordering::Relaxed);
                        return Some(self.index_of_slot[slot as usize] as usize);
                    }
                    return None;
                }
            }
            Method::Hash => {
                // An empty key: round robin, as nginx's hash methods do.
                let Some(key_hash) = ctx.key_hash else {
                    return self.selector.pick(|i| open(i, ctx.rng) && take(i));
                };
                for tier in &self.tiers {
                    for r in 0..TRIES as u64 {
                        let h = crate::method::hash64(&key_hash.to_le_bytes(), r);
                        let Some(i) = tier.weighted(h) else { break };
                        if open(i, ctx.rng) && take(i) {
                            return Some(i);
                        }
                    }
                }
            }
            Method::ConsistentHash => {
                // An empty key: round robin, as nginx's hash methods do.
                let Some(key_hash) = ctx.key_hash else {
                    return self.selector.pick(|i| open(i, ctx.rng) && take(i));
                };
                for tier in &self.tiers {
                    for i in tier.ring_from(key_hash) {
                        if open(i, ctx.rng) && take(i) {
                            return Some(i);
                        }
                    }
                }
            }
            Method::Random | Method::RandomTwo => {
                let two = method == Method::RandomTwo;
                for tier in &self.tiers {
                    let mut first = None;
                    for _ in 0..TRIES {
                        let Some(i) = tier.weighted(ctx.rng.next_u64()) else {
                            break;
                        };
                        if first == Some(i) || !open(i, ctx.rng) {
                            continue;
                        }
                        match first {
                            None if two && tier.len() > 1 => first = Some(i),
                            None => {
                                if take(i) {
                                    return Some(i);
                                }
                            }
                            Some(a) => {
                                // The one with fewer connections for its weight.
                                let ((ca, wa), (cb, wb)) = (slots[a].load(), slots[i].load());
                                let best = if cb * wa < ca * wb { i } else { a };
                                if take(best) {
                                    return Some(best);
                                }
                                first = None;
                            }
                        }
                    }
                    if let Some(a) = first {
                        if take(a) {
                            return Some(a);
                        }
                    }
                }
            }
        }
        // Round robin: the default, and every method's last resort.
        let rng = &mut *ctx.rng;
        if ctx.retry {
            return self.selector.pick_again(|i| open(i, rng) && take(i));
        }
        self.selector.pick(|i| open(i, rng) && take(i))
    }

    /// How many peers could be tried for one connection (nginx's `tries`).
    pub fn tries(&self) -> usize {
        self.peers.len()
    }

    /// Whether some peer could take a connection now (for the static backups).
    pub fn any_usable(&self, now_ms: u64) -> bool {
        let health = &self.balancing.health;
        self.peers.len() == 1 || self.slots.iter().any(|s| s.usable(health, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn peer(s: &str, prio: u16) -> Peer {
        Peer::new(s.parse().unwrap(), 1, prio)
    }

    /// Slots as the writer fills them for `peers`.
    fn slots_for(peers: &[Peer]) -> Vec<PeerSlot> {
        peers
            .iter()
            .map(|p| {
                let s = PeerSlot::default();
                s.weight.store(u32::from(p.share()), Ordering::Relaxed);
                s.band.store(p.band(), Ordering::Relaxed);
                s
            })
            .collect()
    }

    fn nodes(n: usize) -> Vec<AtomicU32> {
        (0..crate::least::nodes_for(n))
            .map(|_| AtomicU32::new(crate::least::NONE))
            .collect()
    }

    fn view<'z>(
        peers: &[Peer],
        slots: &'z [PeerSlot],
        balancing: Balancing,
        shared: Option<Shared<'z>>,
    ) -> PeerView<'z> {
        let mut v = PeerView::new(balancing);
        v.replace(
            peers
                .iter()
                .zip(slots)
                .enumerate()
                .map(|(i, (p, slot))| (*p, SlotRef::new(slot, 0, i as u32)))
                .collect(),
            0,
            shared,
        );
        v
    }

    fn rr(policy: HealthPolicy) -> Balancing {
        Balancing {
            health: policy,
            ..Balancing::default()
        }
    }

    /// A worker picking with key 0 and a fixed seed.
    struct Worker<'z> {
        view: PeerView<'z>,
        rng: Rng,
        key: Option<u64>,
    }

    impl<'z> Worker<'z> {
        fn new(view: PeerView<'z>) -> Self {
            Worker {
                view,
                rng: Rng::new(42),
                key: Some(0),
            }
        }

        fn select(&mut self, tried: impl Fn(usize) -> bool, now: u64) -> Option<usize> {
            let mut ctx = PickContext {
                key_hash: self.key,
                rng: &mut self.rng,
                retry: false,
            };
            self.view.select(tried, now, &mut ctx)
        }

        fn fail(&self, i: usize, now: u64) {
            let h = self.view.balancing.health;
            self.view.slot(i).unwrap().release(true, &h, now);
        }

        fn done(&self, i: usize, now: u64) {
            let h = self.view.balancing.health;
            self.view.slot(i).unwrap().release(false, &h, now);
        }
    }

    fn two() -> [Peer; 2] {
        [peer("127.0.0.1:1", 1), peer("127.0.0.1:2", 1)]
    }

    #[test]
    fn failed_peer_is_skipped_for_fail_timeout_then_retried() {
        let ps = two();
        let s = slots_for(&ps);
        let mut w = Worker::new(view(&ps, &s, rr(HealthPolicy::default()), None));
        assert_eq!(w.select(|_| false, 0), Some(0));
        w.fail(0, 0);
        assert_eq!(w.select(|_| false, 100), Some(1));
        assert_eq!(w.select(|_| false, 200), Some(1));
        assert_eq!(w.select(|_| false, 10_001), Some(0), "fail_timeout passed");
        w.done(0, 10_002);
        assert_eq!(
            s[0].fails.load(Ordering::Relaxed),
            0,
            "success resets fails"
        );
    }

    #[test]
    fn a_failure_seen_by_one_worker_is_known_to_all() {
        let ps = two();
        let s = slots_for(&ps);
        let mut w0 = Worker::new(view(&ps, &s, rr(HealthPolicy::default()), None));
        let mut w1 = Worker::new(view(&ps, &s, rr(HealthPolicy::default()), None));
        assert_eq!(w0.select(|_| false, 0), Some(0));
        w0.fail(0, 0);
        for _ in 0..4 {
            assert_eq!(w1.select(|_| false, 50), Some(1), "worker 1 skips it too");
        }
    }

    #[test]
    fn after_fail_timeout_one_probe_in_all() {
        let ps = two();
        let s = slots_for(&ps);
        let policy = HealthPolicy {
            max_fails: 1,
            fail_timeout_ms: 1000,
        };
        let mut w0 = Worker::new(view(&ps, &s, rr(policy), None));
        let mut w1 = Worker::new(view(&ps, &s, rr(policy), None));
        w0.select(|_| false, 0);
        w0.fail(0, 0);
        // Both workers pick while the window is over: only the first probes peer 0.
        let mut to_dead = 0;
        for round in 0..8 {
            let w = if round % 2 == 0 { &mut w0 } else { &mut w1 };
            if w.select(|_| false, 1500) == Some(0) {
                to_dead += 1;
            }
        }
        assert_eq!(to_dead, 1, "one probe, whichever worker");
        // The probe failed: down for another window.
        w0.fail(0, 1500);
        assert_eq!(w1.select(|_| false, 2000), Some(1));
        // The next probe succeeds: the peer is back for everyone.
        assert_eq!(w1.select(|_| false, 2600), Some(0));
        w1.view.slot(0).unwrap().connected(&policy, 2600);
        assert_eq!(s[0].fails.load(Ordering::Relaxed), 0);
        assert_eq!(
            s[0].usable_since_ms.load(Ordering::Relaxed),
            2600,
            "back: slow start counts from here"
        );
        let picks: Vec<_> = (0..4).filter_map(|_| w0.select(|_| false, 2700)).collect();
        assert!(picks.contains(&0) && picks.contains(&1));
    }

    #[test]
    fn priority_two_only_when_priority_one_failed_or_tried() {
        let ps = [peer("127.0.0.1:1", 1), peer("127.0.0.1:9", 2)];
        let s = slots_for(&ps);
        let mut w = Worker::new(view(&ps, &s, rr(HealthPolicy::default()), None));
        assert_eq!(w.select(|_| false, 0), Some(0));
        assert_eq!(w.select(|i| i == 0, 0), Some(1), "retry of a connection");
        w.fail(0, 0);
        assert_eq!(w.select(|_| false, 1), Some(1));
        assert_eq!(w.select(|_| false, 20_000), Some(0));
    }

    #[test]
    fn single_peer_ignores_failures_but_not_tried() {
        let ps = [peer("127.0.0.1:1", 1)];
        let s = slots_for(&ps);
        let mut w = Worker::new(view(&ps, &s, rr(HealthPolicy::default()), None));
        w.fail(0, 0);
        assert_eq!(w.select(|_| false, 1), Some(0));
        assert_eq!(w.select(|i| i == 0, 1), None);
    }

    #[test]
    fn counters_and_open_connections() {
        let ps = [peer("127.0.0.1:1", 1)];
        let s = slots_for(&ps);
        let mut w = Worker::new(view(&ps, &s, rr(HealthPolicy::default()), None));
        w.select(|_| false, 0);
        w.select(|_| false, 0);
        assert_eq!(s[0].conns.load(Ordering::Relaxed), 2);
        assert_eq!(s[0].connections.load(Ordering::Relaxed), 2);
        w.fail(0, 0);
        w.done(0, 0);
        w.done(0, 0);
        assert_eq!(s[0].conns.load(Ordering::Relaxed), 0, "never below zero");
        assert_eq!(s[0].failures.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_release_for_a_peer_that_left_is_dropped() {
        let ps = two();
        let s = slots_for(&ps);
        let mut w = Worker::new(view(&ps, &s, rr(HealthPolicy::default()), None));
        assert_eq!(w.select(|_| false, 0), Some(0));
        let held = w.view.slot(0).unwrap();
        // The writer gave slot 0 to another peer.
        s[0].epoch.fetch_add(1, Ordering::Relaxed);
        s[0].conns.store(0, Ordering::Relaxed);
        held.release(true, &HealthPolicy::default(), 5);
        assert_eq!(s[0].fails.load(Ordering::Relaxed), 0);
        assert_eq!(s[0].conns.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_peer_that_left_is_not_taken_from_an_older_copy() {
        let ps = two();
        let s = slots_for(&ps);
        let mut w = Worker::new(view(&ps, &s, rr(HealthPolicy::default()), None));
        // The writer freed slot 0 and gave it to another peer; this worker
        // has not copied the new set yet.
        s[0].epoch.fetch_add(2, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(w.select(|_| false, 0), Some(1));
        }
        assert_eq!(
            s[0].conns.load(Ordering::Relaxed),
            0,
            "nothing counted on the new peer"
        );
        // A set of one peer (nginx tries it whatever its health) too.
        let one = [ps[0]];
        let s = slots_for(&one);
        let mut w = Worker::new(view(&one, &s, rr(HealthPolicy::default()), None));
        s[0].epoch.fetch_add(2, Ordering::Relaxed);
        assert_eq!(w.select(|_| false, 0), None);
        assert_eq!(s[0].conns.load(Ordering::Relaxed), 0, "a set of one");
    }

    #[test]
    fn max_fails_zero_never_marks_down() {
        let ps = two();
        let s = slots_for(&ps);
        let policy = HealthPolicy {
            max_fails: 0,
            fail_timeout_ms: 10_000,
        };
        let mut w = Worker::new(view(&ps, &s, rr(policy), None));
        w.fail(0, 0);
        assert_eq!(w.select(|_| false, 1), Some(0));
    }

    #[test]
    fn any_usable_is_false_only_when_every_peer_is_down() {
        let ps = two();
        let s = slots_for(&ps);
        let mut w = Worker::new(view(&ps, &s, rr(HealthPolicy::default()), None));
        assert!(w.view.any_usable(0));
        w.select(|_| false, 0);
        w.fail(0, 0);
        assert!(w.view.any_usable(1));
        w.fail(1, 0);
        assert!(!w.view.any_usable(1));
        assert!(w.view.any_usable(10_001));
    }

    fn method(m: Method) -> Balancing {
        Balancing {
            method: m,
            ..Balancing::default()
        }
    }

    #[test]
    fn least_conn_across_workers_evens_out_held_connections() {
        let ps: Vec<Peer> = (1..=3)
            .map(|i| peer(&format!("127.0.0.{i}:1"), 1))
            .collect();
        let s = slots_for(&ps);
        let n = nodes(s.len());
        let vtime = AtomicU64::new(0);
        let shared = || {
            Some(Shared {
                tree: Tree::new(&n, &s),
                vtime: &vtime,
            })
        };
        shared().unwrap().tree.rebuild();
        let mut w0 = Worker::new(view(&ps, &s, method(Method::LeastConn), shared()));
        let mut w1 = Worker::new(view(&ps, &s, method(Method::LeastConn), shared()));
        // Four connections held on peer 0 (all workers count in the zone).
        s[0].conns.store(4, Ordering::Relaxed);
        shared().unwrap().tree.update(0);
        let picks: Vec<usize> = (0..8)
            .filter_map(|k| {
                if k % 2 == 0 {
                    w0.select(|_| false, 0)
                } else {
                    w1.select(|_| false, 0)
                }
            })
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 0, "{picks:?}");
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 4);
        // Counts even: all three take turns.
        let next: Vec<usize> = (0..3).filter_map(|_| w0.select(|_| false, 0)).collect();
        let mut sorted = next.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2], "{next:?}");
        // A release makes its peer the least loaded.
        w1.done(2, 0);
        assert_eq!(w0.select(|_| false, 0), Some(2));
    }

    #[test]
    fn least_conn_skips_tried_and_down_peers() {
        let ps: Vec<Peer> = (1..=3)
            .map(|i| peer(&format!("127.0.0.{i}:1"), 1))
            .collect();
        let s = slots_for(&ps);
        let n = nodes(s.len());
        let vtime = AtomicU64::new(0);
        let shared = Shared {
            tree: Tree::new(&n, &s),
            vtime: &vtime,
        };
        shared.tree.rebuild();
        let mut w = Worker::new(view(&ps, &s, method(Method::LeastConn), Some(shared)));
        let a = w.select(|_| false, 0).unwrap();
        w.fail(a, 0);
        for _ in 0..5 {
            let i = w.select(|_| false, 1).unwrap();
            assert_ne!(i, a, "down");
            w.done(i, 1);
        }
        let b = w.select(|_| false, 1).unwrap();
        let c = w.select(|i| i == b, 1).unwrap();
        assert!(
            c != a && c != b,
            "neither the down peer nor the tried one: {a} {b} {c}"
        );
        assert_eq!(
            w.select(|i| i == b || i == c, 1),
            None,
            "the down one is not a retry's last resort"
        );
    }

    #[test]
    fn hash_keeps_a_key_on_its_peer_and_rehashes_past_a_down_one() {
        let ps: Vec<Peer> = (1..=5)
            .map(|i| peer(&format!("127.0.0.{i}:1"), 1))
            .collect();
        let s = slots_for(&ps);
        for m in [Method::Hash, Method::ConsistentHash] {
            let mut w0 = Worker::new(view(&ps, &s, method(m), None));
            let mut w1 = Worker::new(view(&ps, &s, method(m), None));
            let mut spread = [0; 5];
            for key in 0..200u64 {
                w0.key = Some(crate::method::hash64(&key.to_le_bytes(), 9));
                w1.key = w0.key;
                let a = w0.select(|_| false, 0).unwrap();
                assert_eq!(
                    w1.select(|_| false, 0),
                    Some(a),
                    "{m:?}: every worker agrees"
                );
                assert_eq!(w0.select(|_| false, 0), Some(a), "{m:?}: and again");
                spread[a] += 1;
                // A retry of the same connection goes elsewhere, the same way everywhere.
                let b = w0.select(|i| i == a, 0).unwrap();
                assert_ne!(a, b);
                assert_eq!(w1.select(|i| i == a, 0), Some(b));
            }
            assert!(spread.iter().all(|&n| n > 15), "{m:?}: {spread:?}");
        }
    }

    #[test]
    fn random_two_prefers_the_less_loaded_of_two() {
        let ps: Vec<Peer> = (1..=2)
            .map(|i| peer(&format!("127.0.0.{i}:1"), 1))
            .collect();
        let s = slots_for(&ps);
        let mut w = Worker::new(view(&ps, &s, method(Method::RandomTwo), None));
        s[0].conns.store(100, Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(w.select(|_| false, 0), Some(1));
        }
        let mut r = Worker::new(view(&ps, &s, method(Method::Random), None));
        let got: Vec<usize> = (0..200).filter_map(|_| r.select(|_| false, 0)).collect();
        let zeros = got.iter().filter(|&&i| i == 0).count();
        assert!(
            (70..130).contains(&zeros),
            "random ignores load: {zeros} of 200"
        );
    }

    #[test]
    fn slow_start_ramps_a_newcomer_and_never_starves_a_set() {
        let ps = two();
        let s = slots_for(&ps);
        let b = Balancing {
            slow_start_ms: 10_000,
            ..Balancing::default()
        };
        let mut w = Worker::new(view(&ps, &s, b, None));
        s[1].usable_since_ms.store(1, Ordering::Relaxed);
        let share = |w: &mut Worker, now: u64| {
            let got: Vec<usize> = (0..1000).filter_map(|_| w.select(|_| false, now)).collect();
            got.iter().filter(|&&i| i == 1).count()
        };
        let early = share(&mut w, 1_001);
        let half = share(&mut w, 5_001);
        let full = share(&mut w, 11_000);
        assert!(early < 150, "10% in: {early} of 1000");
        assert!(
            (250..450).contains(&half),
            "half way: {half} of 1000 (full share 500)"
        );
        assert!((450..550).contains(&full), "done: {full} of 1000");
        // Only ramping peers: they are taken anyway.
        s[0].usable_since_ms.store(1, Ordering::Relaxed);
        assert_eq!((0..20).filter_map(|_| w.select(|_| false, 2)).count(), 20);
    }

    #[test]
    fn an_empty_hash_key_balances_by_round_robin() {
        let ps: Vec<Peer> = (1..=2)
            .map(|i| peer(&format!("127.0.0.{i}:1"), 1))
            .collect();
        let s = slots_for(&ps);
        for m in [Method::Hash, Method::ConsistentHash] {
            let mut w = Worker::new(view(&ps, &s, method(m), None));
            w.key = None;
            let got: Vec<usize> = (0..4).filter_map(|_| w.select(|_| false, 0)).collect();
            assert_eq!(got, [0, 1, 0, 1], "{m:?}");
            w.key = Some(7);
            let keyed: Vec<usize> = (0..4).filter_map(|_| w.select(|_| false, 0)).collect();
            assert!(keyed.iter().all(|&i| i == keyed[0]), "{m:?}: {keyed:?}");
        }
    }

    fn every_method() -> [Method; 6] {
        [
            Method::RoundRobin,
            Method::LeastConn,
            Method::Hash,
            Method::ConsistentHash,
            Method::Random,
            Method::RandomTwo,
        ]
    }

    /// A view of `ps` for `b`, with the zone's least_conn tree when it needs one.
    fn with_tree<'z>(
        ps: &[Peer],
        s: &'z [PeerSlot],
        n: &'z [AtomicU32],
        vtime: &'z AtomicU64,
        b: Balancing,
    ) -> Worker<'z> {
        let shared = Shared {
            tree: Tree::new(n, s),
            vtime,
        };
        shared.tree.rebuild();
        Worker::new(view(ps, s, b, Some(shared)))
    }

    #[test]
    fn weight_zero_peers_serve_only_when_no_weighted_peer_of_their_tier_can() {
        // Tier 1: 127.0.0.1 weighted, .2 and .3 weight 0; tier 2: .4.
        let mut ps = vec![
            Peer::new("127.0.0.2:1".parse().unwrap(), 0, 1),
            Peer::new("127.0.0.1:1".parse().unwrap(), 1, 1),
            Peer::new("127.0.0.4:1".parse().unwrap(), 5, 2),
            Peer::new("127.0.0.3:1".parse().unwrap(), 0, 1),
        ];
        crate::peer::canonicalize(&mut ps);
        let at = |a: &str| ps.iter().position(|p| p.addr.to_string() == a).unwrap();
        let (w, z1, z2, t2) = (
            at("127.0.0.1:1"),
            at("127.0.0.2:1"),
            at("127.0.0.3:1"),
            at("127.0.0.4:1"),
        );
        for m in every_method() {
            let s = slots_for(&ps);
            let n = nodes(s.len());
            let vtime = AtomicU64::new(0);
            let mut wk = with_tree(&ps, &s, &n, &vtime, method(m));
            for key in 0..40u64 {
                wk.key = Some(crate::method::hash64(&key.to_le_bytes(), 3));
                let i = wk.select(|_| false, 0).unwrap();
                assert_eq!(i, w, "{m:?}: the weighted peer while it can");
                wk.done(i, 0);
            }
            // The weighted peer tried (a retry): weight-0 peers, evenly.
            let mut n0 = [0; 2];
            for key in 0..400u64 {
                wk.key = Some(crate::method::hash64(&key.to_le_bytes(), 5));
                let i = wk.select(|i| i == w, 0).unwrap();
                assert!(i == z1 || i == z2, "{m:?}: {i}");
                n0[usize::from(i == z2)] += 1;
                wk.done(i, 0);
            }
            assert!(
                n0.iter().all(|&c| (120..280).contains(&c)),
                "{m:?}: weight-0 peers share evenly: {n0:?}"
            );
            // The weighted peer down: the same.
            wk.fail(w, 0);
            let i = wk.select(|_| false, 1).unwrap();
            assert!(i == z1 || i == z2, "{m:?}: {i}");
            wk.done(i, 1);
            // The whole tier unusable: tier 2.
            assert_eq!(wk.select(|i| i == z1 || i == z2, 1), Some(t2), "{m:?}");
        }
    }

    #[test]
    fn max_conns_counts_all_workers_and_passes_full_peers_over() {
        for m in every_method() {
            let ps = [
                Peer::new("127.0.0.1:1".parse().unwrap(), 3, 1),
                Peer::new("127.0.0.2:1".parse().unwrap(), 1, 1),
                Peer::new("127.0.0.3:1".parse().unwrap(), 0, 1),
            ];
            let s = slots_for(&ps);
            let n = nodes(s.len());
            let vtime = AtomicU64::new(0);
            let b = Balancing {
                max_conns: 2,
                ..method(m)
            };
            let mut w0 = with_tree(&ps, &s, &n, &vtime, b);
            let mut w1 = with_tree(&ps, &s, &n, &vtime, b);
            // Held connections from two workers: 2 per peer, then none.
            let mut held = [0; 3];
            for k in 0..8u64 {
                let w = if k % 2 == 0 { &mut w0 } else { &mut w1 };
                w.key = Some(k);
                if let Some(i) = w.select(|_| false, 0) {
                    held[i] += 1;
                }
            }
            assert_eq!(held, [2, 2, 2], "{m:?}: weight does not move the limit");
            assert_eq!(s[2].conns.load(Ordering::Relaxed), 2);
            // One closes: its peer takes exactly one more.
            w1.done(1, 0);
            assert_eq!(w0.select(|_| false, 0), Some(1), "{m:?}");
            assert_eq!(w0.select(|_| false, 0), None, "{m:?}");
        }
        // A single peer: the limit holds too (nginx fails the connection).
        let one = [peer("127.0.0.1:1", 1)];
        let s = slots_for(&one);
        let b = Balancing {
            max_conns: 1,
            ..Balancing::default()
        };
        let mut w = Worker::new(view(&one, &s, b, None));
        assert_eq!(w.select(|_| false, 0), Some(0));
        assert_eq!(w.select(|_| false, 0), None);
        w.done(0, 0);
        assert_eq!(w.select(|_| false, 0), Some(0));
    }
}
