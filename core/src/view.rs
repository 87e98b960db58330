//! A worker's view of one upstream's peers: the set, the selection state and
//! passive health (nginx's max_fails/fail_timeout), which survives set updates.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::peer::Peer;
use crate::select::Selector;

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

/// Runtime state of a peer, with nginx's round-robin semantics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerState {
    pub fails: u32,
    pub checked_ms: u64,
    pub accessed_ms: u64,
    pub conns: u32,
}

impl PeerState {
    fn available(&self, policy: &HealthPolicy, now_ms: u64) -> bool {
        policy.max_fails == 0
            || self.fails < policy.max_fails
            || now_ms.saturating_sub(self.checked_ms) > policy.fail_timeout_ms
    }
}

#[derive(Debug, Default)]
pub struct PeerView {
    peers: Vec<Peer>,
    state: Vec<PeerState>,
    selector: Selector,
    policy: HealthPolicy,
}

impl PeerView {
    pub fn new(policy: HealthPolicy) -> Self {
        PeerView {
            policy,
            ..PeerView::default()
        }
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn state(&self, index: usize) -> Option<&PeerState> {
        self.state.get(index)
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Replaces the set; a peer (same address) present before keeps its state.
    /// `peers` must be in canonical order.
    pub fn replace(&mut self, peers: Vec<Peer>, start: usize) {
        let old: HashMap<SocketAddr, PeerState> = self
            .peers
            .iter()
            .zip(&self.state)
            .map(|(p, s)| (p.addr, *s))
            .collect();
        self.state = peers
            .iter()
            .map(|p| old.get(&p.addr).copied().unwrap_or_default())
            .collect();
        self.selector = Selector::new(&peers, start);
        self.peers = peers;
    }

    /// Picks a peer not yet tried by this connection, skipping failed ones.
    /// A single peer is always tried (as nginx does), unless already tried.
    pub fn select(&mut self, tried: impl Fn(usize) -> bool, now_ms: u64) -> Option<usize> {
        let single = self.peers.len() == 1;
        let (state, policy) = (&self.state, &self.policy);
        let index = self.selector.pick(|i| {
            !tried(i) && (single || state.get(i).is_some_and(|s| s.available(policy, now_ms)))
        })?;
        let s = self.state.get_mut(index)?;
        if now_ms.saturating_sub(s.checked_ms) > self.policy.fail_timeout_ms {
            s.checked_ms = now_ms;
        }
        s.conns = s.conns.saturating_add(1);
        Some(index)
    }

    /// The connection to `index` ended; `failed` when connecting to it failed.
    /// `addr` guards against a set replaced while the connection was open.
    pub fn release(&mut self, index: usize, addr: &SocketAddr, failed: bool, now_ms: u64) {
        if self.peers.get(index).map(|p| &p.addr) != Some(addr) {
            return;
        }
        let Some(s) = self.state.get_mut(index) else {
            return;
        };
        s.conns = s.conns.saturating_sub(1);
        if failed {
            s.fails = s.fails.saturating_add(1);
            s.accessed_ms = now_ms;
            s.checked_ms = now_ms;
        } else if s.accessed_ms < s.checked_ms {
            s.fails = 0;
        }
    }

    /// How many peers could be tried for one connection (nginx's `tries`).
    pub fn tries(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str, prio: u16) -> Peer {
        Peer::new(s.parse().unwrap(), 1, prio)
    }

    fn view(peers: Vec<Peer>) -> PeerView {
        let mut v = PeerView::new(HealthPolicy::default());
        v.replace(peers, 0);
        v
    }

    #[test]
    fn failed_peer_is_skipped_for_fail_timeout_then_retried() {
        let mut v = view(vec![peer("127.0.0.1:1", 1), peer("127.0.0.1:2", 1)]);
        let a = v.peers()[0].addr;
        assert_eq!(v.select(|_| false, 0), Some(0));
        v.release(0, &a, true, 0);
        assert_eq!(v.select(|_| false, 100), Some(1));
        assert_eq!(v.select(|_| false, 200), Some(1));
        assert_eq!(v.select(|_| false, 10_001), Some(0), "fail_timeout passed");
        v.release(0, &a, false, 10_002);
        assert_eq!(v.state(0).unwrap().fails, 0, "success resets fails");
    }

    #[test]
    fn priority_two_only_when_priority_one_failed_or_tried() {
        let mut v = view(vec![peer("127.0.0.1:1", 1), peer("127.0.0.1:9", 2)]);
        let a = v.peers()[0].addr;
        assert_eq!(v.select(|_| false, 0), Some(0));
        assert_eq!(v.select(|i| i == 0, 0), Some(1), "retry of a connection");
        v.release(0, &a, true, 0);
        assert_eq!(v.select(|_| false, 1), Some(1));
        assert_eq!(v.select(|_| false, 20_000), Some(0));
    }

    #[test]
    fn single_peer_ignores_failures_but_not_tried() {
        let mut v = view(vec![peer("127.0.0.1:1", 1)]);
        let a = v.peers()[0].addr;
        v.release(0, &a, true, 0);
        assert_eq!(v.select(|_| false, 1), Some(0));
        assert_eq!(v.select(|i| i == 0, 1), None);
    }

    #[test]
    fn state_survives_replacement_by_address() {
        let mut v = view(vec![peer("127.0.0.1:1", 1), peer("127.0.0.1:2", 1)]);
        let b = v.peers()[1].addr;
        assert_eq!(v.select(|i| i == 0, 0), Some(1));
        v.release(1, &b, true, 5);
        v.replace(vec![peer("127.0.0.1:0", 1), peer("127.0.0.1:2", 1)], 0);
        assert_eq!(v.state(1).unwrap().fails, 1);
        assert_eq!(v.state(0).unwrap().fails, 0);
        // A release for an index whose peer changed is dropped.
        v.release(0, &b, true, 6);
        assert_eq!(v.state(0).unwrap().fails, 0);
    }

    #[test]
    fn conns_count_open_connections() {
        let mut v = view(vec![peer("127.0.0.1:1", 1)]);
        let a = v.peers()[0].addr;
        v.select(|_| false, 0);
        v.select(|_| false, 0);
        assert_eq!(v.state(0).unwrap().conns, 2);
        v.release(0, &a, false, 0);
        assert_eq!(v.state(0).unwrap().conns, 1);
    }

    #[test]
    fn max_fails_zero_never_marks_down() {
        let mut v = PeerView::new(HealthPolicy {
            max_fails: 0,
            fail_timeout_ms: 10_000,
        });
        v.replace(vec![peer("127.0.0.1:1", 1), peer("127.0.0.1:2", 1)], 0);
        let a = v.peers()[0].addr;
        v.release(0, &a, true, 0);
        assert_eq!(v.select(|_| false, 1), Some(0));
    }
}
