//! A worker's view of one upstream's discovered peers: the set, its selection
//! schedule, and for each peer its slot in the shared zone, where every worker
//! keeps passive health (nginx's `max_fails`/`fail_timeout`) and counters with
//! atomics: a peer that fails is skipped by all workers, not only by the one that
//! saw it fail.

use std::sync::atomic::Ordering;

use crate::peer::Peer;
use crate::select::Selector;
use crate::zone::PeerSlot;

/// nginx's `max_fails`/`fail_timeout`: the one place their defaults are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// 0 turns failure accounting off, as in nginx.
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            max_fails: 1,
            fail_timeout_ms: 10_000,
        }
    }
}

/// A peer's slot as a worker found it: the epoch tells a release for a peer that
/// has since left (its slot given to another) from one for the peer itself.
#[derive(Clone, Copy, Debug)]
pub struct SlotRef<'z> {
    pub slot: &'z PeerSlot,
    pub epoch: u32,
}

impl SlotRef<'_> {
    fn current(&self) -> bool {
        self.slot.epoch.load(Ordering::Relaxed) == self.epoch
    }

    /// Not down: fewer than `max_fails` failures, or the window has passed.
    fn usable(&self, policy: &HealthPolicy, now_ms: u64) -> bool {
        let s = self.slot;
        policy.max_fails == 0
            || s.fails.load(Ordering::Relaxed) < policy.max_fails
            || now_ms.saturating_sub(s.checked_ms.load(Ordering::Relaxed)) > policy.fail_timeout_ms
    }

    /// Takes the peer for a connection. A new `fail_timeout` window starts when the
    /// last one is over (nginx's `checked`); for a peer that is down, only the
    /// worker that starts the window tries it (one probe, whichever worker).
    fn take(&self, policy: &HealthPolicy, now_ms: u64) -> bool {
        let s = self.slot;
        let checked = s.checked_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(checked) > policy.fail_timeout_ms {
            let won = s
                .checked_ms
                .compare_exchange(checked, now_ms, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
            let down = policy.max_fails > 0 && s.fails.load(Ordering::Relaxed) >= policy.max_fails;
            if down && !won {
                return false;
            }
        } else if !self.usable(policy, now_ms) {
            return false;
        }
        s.conns.fetch_add(1, Ordering::Relaxed);
        s.connections.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The connection to this peer was established: the peer answers again
    /// (nginx 1.25+ reports this; older ones only at the end of the session).
    pub fn connected(&self) {
        if !self.current() {
            return;
        }
        let s = self.slot;
        if s.accessed_ms.load(Ordering::Relaxed) < s.checked_ms.load(Ordering::Relaxed) {
            s.fails.store(0, Ordering::Relaxed);
        }
    }

    /// The connection ended; `failed` when connecting to the peer failed.
    pub fn release(&self, failed: bool, now_ms: u64) {
        if !self.current() {
            return;
        }
        let s = self.slot;
        let _ = s
            .conns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
        if failed {
            s.fails.fetch_add(1, Ordering::Relaxed);
            s.failures.fetch_add(1, Ordering::Relaxed);
            s.accessed_ms.store(now_ms, Ordering::Relaxed);
            s.checked_ms.store(now_ms, Ordering::Relaxed);
        } else {
            self.connected();
        }
    }
}

#[derive(Debug, Default)]
pub struct PeerView<'z> {
    peers: Vec<Peer>,
    slots: Vec<SlotRef<'z>>,
    selector: Selector,
    policy: HealthPolicy,
}

impl<'z> PeerView<'z> {
    pub fn new(policy: HealthPolicy) -> Self {
        PeerView {
            policy,
            peers: Vec::new(),
            slots: Vec::new(),
            selector: Selector::default(),
        }
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
    /// staggers the workers' round-robin cursors.
    pub fn replace(&mut self, peers: Vec<(Peer, SlotRef<'z>)>, start: usize) {
        let (peers, slots): (Vec<Peer>, Vec<SlotRef<'z>>) = peers.into_iter().unzip();
        self.selector = Selector::new(&peers, start);
        self.peers = peers;
        self.slots = slots;
    }

    /// Picks a peer not yet tried by this connection, skipping peers that are
    /// down. A single peer is always tried (as nginx does), unless already tried.
    pub fn select(&mut self, tried: impl Fn(usize) -> bool, now_ms: u64) -> Option<usize> {
        let single = self.peers.len() == 1;
        let (slots, policy) = (&self.slots, &self.policy);
        self.selector.pick(|i| {
            if tried(i) {
                return false;
            }
            let Some(s) = slots.get(i) else { return false };
            if single {
                s.slot.conns.fetch_add(1, Ordering::Relaxed);
                s.slot.connections.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            s.take(policy, now_ms)
        })
    }

    /// How many peers could be tried for one connection (nginx's `tries`).
    pub fn tries(&self) -> usize {
        self.peers.len()
    }

    /// Whether some peer could take a connection now (for the static backups).
    pub fn any_usable(&self, now_ms: u64) -> bool {
        self.peers.len() == 1 || self.slots.iter().any(|s| s.usable(&self.policy, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str, prio: u16) -> Peer {
        Peer::new(s.parse().unwrap(), 1, prio)
    }

    fn slots(n: usize) -> Vec<PeerSlot> {
        (0..n).map(|_| PeerSlot::default()).collect()
    }

    fn view<'z>(peers: &[Peer], slots: &'z [PeerSlot], policy: HealthPolicy) -> PeerView<'z> {
        let mut v = PeerView::new(policy);
        v.replace(
            peers
                .iter()
                .zip(slots)
                .map(|(p, slot)| (*p, SlotRef { slot, epoch: 0 }))
                .collect(),
            0,
        );
        v
    }

    fn two() -> [Peer; 2] {
        [peer("127.0.0.1:1", 1), peer("127.0.0.1:2", 1)]
    }

    #[test]
    fn failed_peer_is_skipped_for_fail_timeout_then_retried() {
        let s = slots(2);
        let mut v = view(&two(), &s, HealthPolicy::default());
        assert_eq!(v.select(|_| false, 0), Some(0));
        v.slot(0).unwrap().release(true, 0);
        assert_eq!(v.select(|_| false, 100), Some(1));
        assert_eq!(v.select(|_| false, 200), Some(1));
        assert_eq!(v.select(|_| false, 10_001), Some(0), "fail_timeout passed");
        v.slot(0).unwrap().release(false, 10_002);
        assert_eq!(
            s[0].fails.load(Ordering::Relaxed),
            0,
            "success resets fails"
        );
    }

    #[test]
    fn a_failure_seen_by_one_worker_is_known_to_all() {
        let s = slots(2);
        let mut w0 = view(&two(), &s, HealthPolicy::default());
        let mut w1 = view(&two(), &s, HealthPolicy::default());
        assert_eq!(w0.select(|_| false, 0), Some(0));
        w0.slot(0).unwrap().release(true, 0);
        for _ in 0..4 {
            assert_eq!(w1.select(|_| false, 50), Some(1), "worker 1 skips it too");
        }
    }

    #[test]
    fn after_fail_timeout_one_probe_in_all() {
        let s = slots(2);
        let policy = HealthPolicy {
            max_fails: 1,
            fail_timeout_ms: 1000,
        };
        let mut w0 = view(&two(), &s, policy);
        let mut w1 = view(&two(), &s, policy);
        w0.select(|_| false, 0);
        w0.slot(0).unwrap().release(true, 0);
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
        w0.slot(0).unwrap().release(true, 1500);
        assert_eq!(w1.select(|_| false, 2000), Some(1));
        // The next probe succeeds: the peer is back for everyone.
        assert_eq!(w1.select(|_| false, 2600), Some(0));
        w1.slot(0).unwrap().connected();
        assert_eq!(s[0].fails.load(Ordering::Relaxed), 0);
        let picks: Vec<_> = (0..4).filter_map(|_| w0.select(|_| false, 2700)).collect();
        assert!(picks.contains(&0) && picks.contains(&1));
    }

    #[test]
    fn priority_two_only_when_priority_one_failed_or_tried() {
        let s = slots(2);
        let peers = [peer("127.0.0.1:1", 1), peer("127.0.0.1:9", 2)];
        let mut v = view(&peers, &s, HealthPolicy::default());
        assert_eq!(v.select(|_| false, 0), Some(0));
        assert_eq!(v.select(|i| i == 0, 0), Some(1), "retry of a connection");
        v.slot(0).unwrap().release(true, 0);
        assert_eq!(v.select(|_| false, 1), Some(1));
        assert_eq!(v.select(|_| false, 20_000), Some(0));
    }

    #[test]
    fn single_peer_ignores_failures_but_not_tried() {
        let s = slots(1);
        let mut v = view(&[peer("127.0.0.1:1", 1)], &s, HealthPolicy::default());
        v.slot(0).unwrap().release(true, 0);
        assert_eq!(v.select(|_| false, 1), Some(0));
        assert_eq!(v.select(|i| i == 0, 1), None);
    }

    #[test]
    fn counters_and_open_connections() {
        let s = slots(1);
        let mut v = view(&[peer("127.0.0.1:1", 1)], &s, HealthPolicy::default());
        v.select(|_| false, 0);
        v.select(|_| false, 0);
        assert_eq!(s[0].conns.load(Ordering::Relaxed), 2);
        assert_eq!(s[0].connections.load(Ordering::Relaxed), 2);
        v.slot(0).unwrap().release(true, 0);
        v.slot(0).unwrap().release(false, 0);
        v.slot(0).unwrap().release(false, 0);
        assert_eq!(s[0].conns.load(Ordering::Relaxed), 0, "never below zero");
        assert_eq!(s[0].failures.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_release_for_a_peer_that_left_is_dropped() {
        let s = slots(2);
        let mut v = view(&two(), &s, HealthPolicy::default());
        assert_eq!(v.select(|_| false, 0), Some(0));
        let held = v.slot(0).unwrap();
        // The writer gave slot 0 to another peer.
        s[0].epoch.fetch_add(1, Ordering::Relaxed);
        s[0].conns.store(0, Ordering::Relaxed);
        held.release(true, 5);
        assert_eq!(s[0].fails.load(Ordering::Relaxed), 0);
        assert_eq!(s[0].conns.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn max_fails_zero_never_marks_down() {
        let s = slots(2);
        let mut v = view(
            &two(),
            &s,
            HealthPolicy {
                max_fails: 0,
                fail_timeout_ms: 10_000,
            },
        );
        v.slot(0).unwrap().release(true, 0);
        assert_eq!(v.select(|_| false, 1), Some(0));
    }

    #[test]
    fn any_usable_is_false_only_when_every_peer_is_down() {
        let s = slots(2);
        let mut v = view(&two(), &s, HealthPolicy::default());
        assert!(v.any_usable(0));
        v.select(|_| false, 0);
        v.slot(0).unwrap().release(true, 0);
        assert!(v.any_usable(1));
        v.slot(1).unwrap().release(true, 0);
        assert!(!v.any_usable(1));
        assert!(v.any_usable(10_001));
    }
}
