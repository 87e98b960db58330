//! nginx's balancing methods over a discovered set, as nginx users write them in
//! the upstream: `least_conn`, `hash KEY [consistent]`, `random [two [least_conn]]`
//! (round robin is the default, in [`crate::select`]). What a worker builds for
//! them per set (weighted tiers, consistent-hash rings) is built once per set
//! change, off the connection path; a pick is O(log n).

use crate::peer::{bands, Peer};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    #[default]
    RoundRobin,
    LeastConn,
    /// `hash KEY`: the key's hash picks a peer in proportion to weights; a peer
    /// that is down or tried makes it hash again (20 times, then round robin).
    Hash,
    /// `hash KEY consistent`: a ring of points per peer (in proportion to its
    /// weight); a peer that leaves moves only the keys that were on it.
    ConsistentHash,
    /// `random`: a peer at random, in proportion to weights.
    Random,
    /// `random two [least_conn]`: two at random, the one with fewer connections.
    RandomTwo,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::RoundRobin => "round robin",
            Method::LeastConn => "least_conn",
            Method::Hash => "hash",
            Method::ConsistentHash => "hash consistent",
            Method::Random => "random",
            Method::RandomTwo => "random two least_conn",
        }
    }

    pub fn uses_key(&self) -> bool {
        matches!(self, Method::Hash | Method::ConsistentHash)
    }
}

/// Tries of a hash or random pick before falling back to round robin (nginx's).
pub const TRIES: usize = 20;

/// Points on the ring per unit of weight (ketama's 160)...
const POINTS_PER_WEIGHT: u64 = 160;
/// ... as long as one ring stays under this many points (about 2 MB per worker):
/// beyond, every peer gets proportionally fewer.
const MAX_RING_POINTS: u64 = 1 << 18;

/// FNV-1a over `bytes`, then a 64-bit finalizer: the hash of a key, and of the
/// ring's points. The same in every worker and across restarts.
pub fn hash64(bytes: &[u8], salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small, fast generator for random picks (xorshift64*); one per worker.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `true` with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        den == 0 || self.next_u64() % den < num
    }
}

/// One band of a set (a priority tier's weighted peers, or its weight-0 peers,
/// which are asked after them: [`Peer::band`]) for hash and random picks: its
/// peers' cumulative weights (a weighted pick is a binary search) and, for
/// `hash consistent`, its ring.
#[derive(Clone, Debug, Default)]
pub struct Tier {
    /// Index of the tier's first peer in the set.
    pub start: usize,
    cumulative: Vec<u64>,
    /// (point, peer index in the set), sorted by point.
    ring: Vec<(u64, u32)>,
}

impl Tier {
    /// The bands of `peers` (canonical order: by band), with rings if `ring`.
    pub fn build(peers: &[Peer], ring: bool) -> Vec<Tier> {
        bands(peers)
            .map(|range| {
                let mut total = 0;
                let cumulative = peers[range.clone()]
                    .iter()
                    .map(|p| {
                        total += u64::from(p.share());
                        total
                    })
                    .collect();
                let ring = if ring {
                    build_ring(&peers[range.clone()], range.start)
                } else {
                    Vec::new()
                };
                Tier {
                    start: range.start,
                    cumulative,
                    ring,
                }
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The peer (index in the set) that `r` falls on, in proportion to weights.
    pub fn weighted(&self, r: u64) -> Option<usize> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let w = r % total;
        let i = self.cumulative.partition_point(|&c| c <= w);
        Some(self.start + i)
    }

    /// Peers (indices in the set) in ring order from where `hash` falls: the
    /// first one a connection can use is the key's peer.
    pub fn ring_from(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let at = self.ring.partition_point(|&(p, _)| p < hash);
        let n = self.ring.len();
        (0..n).map(move |k| self.ring[(at + k) % n].1 as usize)
    }

    /// Ring points (for tests and the bench).
    pub fn ring_len(&self) -> usize {
        self.ring.len()
    }
}

/// Points for `peers` (the tier starting at `start`), each peer's hashed from its
/// address and port, so every worker builds the same ring.
fn build_ring(peers: &[Peer], start: usize) -> Vec<(u64, u32)> {
    let total_weight: u64 = peers.iter().map(|p| u64::from(p.share())).sum();
    let per_weight = if total_weight * POINTS_PER_WEIGHT <= MAX_RING_POINTS {
        POINTS_PER_WEIGHT
    } else {
        (MAX_RING_POINTS / total_weight.max(1)).max(1)
    };
    let mut ring = Vec::with_capacity((total_weight * per_weight) as usize);
    for (i, p) in peers.iter().enumerate() {
        let name = p.addr.to_string();
        for j in 0..u64::from(p.share()) * per_weight {
            ring.push((hash64(name.as_bytes(), j), (start + i) as u32));
        }
    }
    ring.sort_unstable();
    ring
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize, weight: u16) -> Vec<Peer> {
        (0..n)
            .map(|i| {
                Peer::new(
                    format!("127.1.{}.{}:6379", i / 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                    weight,
                    1,
                )
            })
            .collect()
    }

    #[test]
    fn weighted_picks_follow_weights() {
        let ps = vec![
            Peer::new("127.0.0.1:1".parse().unwrap(), 3, 1),
            Peer::new("127.0.0.2:1".parse().unwrap(), 1, 1),
            Peer::new("127.0.0.3:1".parse().unwrap(), 1, 2),
        ];
        let tiers = Tier::build(&ps, false);
        assert_eq!(tiers.len(), 2);
        let got: Vec<usize> = (0..4).filter_map(|r| tiers[0].weighted(r)).collect();
        assert_eq!(got, [0, 0, 0, 1]);
        assert_eq!(tiers[1].weighted(12345), Some(2));
    }

    #[test]
    fn weight_zero_peers_are_a_band_of_their_own_with_even_shares() {
        let ps = vec![
            Peer::new("127.0.0.1:1".parse().unwrap(), 2, 1),
            Peer::new("127.0.0.2:1".parse().unwrap(), 0, 1),
            Peer::new("127.0.0.3:1".parse().unwrap(), 0, 1),
        ];
        let tiers = Tier::build(&ps, true);
        assert_eq!(tiers.len(), 2);
        assert_eq!((tiers[0].start, tiers[0].len()), (0, 1));
        assert_eq!((tiers[1].start, tiers[1].len()), (1, 2));
        assert_eq!(tiers[1].ring_len(), 2 * 160);
        let got: Vec<usize> = (0..4).filter_map(|r| tiers[1].weighted(r)).collect();
        assert_eq!(got, [1, 2, 1, 2]);
    }

    #[test]
    fn a_peer_leaving_moves_only_its_keys() {
        let before = peers(10, 1);
        let mut after = before.clone();
        after.remove(3);
        let (t0, t1) = (
            &Tier::build(&before, true)[0],
            &Tier::build(&after, true)[0],
        );
        let owner = |t: &Tier, set: &[Peer], k: u64| {
            set[t.ring_from(hash64(&k.to_le_bytes(), 0)).next().unwrap()].addr
        };
        let (mut moved, mut on_removed) = (0, 0);
        for k in 0..10_000u64 {
            let a = owner(t0, &before, k);
            if a == before[3].addr {
                on_removed += 1;
                continue;
            }
            if a != owner(t1, &after, k) {
                moved += 1;
            }
        }
        assert_eq!(moved, 0, "keys of the other nine stay where they were");
        assert!(
            (700..1300).contains(&on_removed),
            "about a tenth was on the removed peer: {on_removed}"
        );
    }

    #[test]
    fn rings_balance_and_respect_weights() {
        let mut ps = peers(10, 1);
        ps[0].weight = 3;
        let t = &Tier::build(&ps, true)[0];
        assert_eq!(t.ring_len(), 12 * 160);
        let mut n = [0usize; 10];
        for k in 0..120_000u64 {
            n[t.ring_from(hash64(&k.to_le_bytes(), 0)).next().unwrap()] += 1;
        }
        assert!(
            (25_000..35_000).contains(&n[0]),
            "weight 3: about 30,000 of 120,000: {n:?}"
        );
        for &c in &n[1..] {
            assert!(
                (7_000..13_000).contains(&c),
                "weight 1: about 10,000: {n:?}"
            );
        }
    }

    #[test]
    fn large_sets_keep_rings_bounded() {
        let t = &Tier::build(&peers(10_000, 1), true)[0];
        assert!(t.ring_len() <= MAX_RING_POINTS as usize);
        assert_eq!(t.ring_len(), 10_000 * (MAX_RING_POINTS / 10_000) as usize);
    }

    #[test]
    fn hashes_and_randoms_are_stable_and_spread() {
        assert_eq!(hash64(b"127.0.0.1", 0), hash64(b"127.0.0.1", 0));
        assert_ne!(hash64(b"127.0.0.1", 0), hash64(b"127.0.0.1", 1));
        let mut r = Rng::new(1);
        let mut buckets = [0; 4];
        for _ in 0..4000 {
            buckets[(r.next_u64() % 4) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (800..1200).contains(&b)),
            "{buckets:?}"
        );
        assert!(Rng::new(5).chance(1, 1));
        assert!(!Rng::new(5).chance(0, 7));
    }
}
