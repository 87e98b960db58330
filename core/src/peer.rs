//! A backend discovered from Consul: one SRV record and one address.

use std::cmp::Ordering;
use std::fmt;
use std::net::SocketAddr;

/// A peer's identity is its socket address; weight and priority are attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub addr: SocketAddr,
    pub weight: u16,
    pub priority: u16,
}

impl Peer {
    /// Weight 0 is kept as it is: Consul sends it for an instance in warning
    /// when the operator set `Weights.Warning = 0` ("no share"), and RFC 2782
    /// gives such a record only the smallest chance beside weighted ones.
    pub fn new(addr: SocketAddr, weight: u16, priority: u16) -> Self {
        Peer {
            addr,
            weight,
            priority,
        }
    }

    /// The band a peer is asked in: bands go by priority, and within a
    /// priority a weight-0 peer comes after every weighted one, so it takes a
    /// connection only when no weighted peer of its tier can.
    pub fn band(&self) -> u32 {
        u32::from(self.priority) << 1 | u32::from(self.weight == 0)
    }

    /// The weight of the peer's share within its band: weight-0 peers share
    /// theirs evenly.
    pub fn share(&self) -> u16 {
        self.weight.max(1)
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} weight={} priority={}",
            self.addr, self.weight, self.priority
        )
    }
}

fn addr_order(a: &SocketAddr, b: &SocketAddr) -> Ordering {
    // IPv4 before IPv6, then by address bytes, then port: the same on every host.
    match (a, b) {
        (SocketAddr::V4(x), SocketAddr::V4(y)) => {
            (x.ip().octets(), x.port()).cmp(&(y.ip().octets(), y.port()))
        }
        (SocketAddr::V6(x), SocketAddr::V6(y)) => {
            (x.ip().octets(), x.port()).cmp(&(y.ip().octets(), y.port()))
        }
        (SocketAddr::V4(_), SocketAddr::V6(_)) => Ordering::Less,
        (SocketAddr::V6(_), SocketAddr::V4(_)) => Ordering::Greater,
    }
}

/// Sorts into the canonical order (band: priority, weighted peers before
/// weight-0 ones; then address) and removes duplicate
/// addresses, keeping the lowest priority and, within it, the highest weight.
pub fn canonicalize(peers: &mut Vec<Peer>) {
    canonicalize_by(peers, |p| p);
}

/// [`canonicalize`] for items that carry a peer and more (which query it came from).
pub fn canonicalize_by<T>(items: &mut Vec<T>, peer: impl Fn(&T) -> &Peer) {
    items.sort_by(|a, b| {
        let (a, b) = (peer(a), peer(b));
        addr_order(&a.addr, &b.addr)
            .then(a.priority.cmp(&b.priority))
            .then(b.weight.cmp(&a.weight))
    });
    items.dedup_by(|later, first| peer(later).addr == peer(first).addr);
    items.sort_by(|a, b| {
        let (a, b) = (peer(a), peer(b));
        a.band().cmp(&b.band()).then(addr_order(&a.addr, &b.addr))
    });
}

/// The bands of peers in canonical order (see [`Peer::band`]): each band's
/// index range, in the order a pick asks them.
pub fn bands(peers: &[Peer]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= peers.len() {
            return None;
        }
        let band = peers[start].band();
        let end = start
            + peers[start..]
                .iter()
                .take_while(|p| p.band() == band)
                .count();
        let range = start..end;
        start = end;
        Some(range)
    })
}

/// A short, stable tag for the query a peer came from (FNV-1a), kept with the peer
/// in the shared zone so that a new worker 0 knows which query holds which peers.
pub fn source_tag(query: &str) -> u32 {
    query.bytes().fold(0x811c_9dc5, |h: u32, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The tag of a line's query in its upstream: [`source_tag`], unless an
/// earlier line of the upstream has it already (two queries whose 32-bit
/// hashes collide, about one pair in four billion: `s31597.service.consul` and
/// `s618190.service.consul`), then the first free one of a salted sequence.
/// Never 0 (a free line record). The same lines in the same order get the same
/// tags in every configuration, so that a reload keeps each line's peers.
pub fn line_source_tag(query: &str, taken: &[u32]) -> u32 {
    (0u32..)
        .map(|salt| {
            if salt == 0 {
                return source_tag(query);
            }
            salt.to_le_bytes()
                .iter()
                .fold(source_tag(query), |h: u32, &b| {
                    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
                })
        })
        .find(|t| *t != 0 && !taken.contains(t))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str, w: u16, prio: u16) -> Peer {
        Peer::new(s.parse().unwrap(), w, prio)
    }

    #[test]
    fn weight_zero_is_kept_and_shares_evenly_in_its_own_band() {
        let zero = p("127.0.0.1:1", 0, 1);
        assert_eq!((zero.weight, zero.share()), (0, 1));
        assert!(zero.band() > p("127.0.0.2:1", 9, 1).band());
        assert!(zero.band() < p("127.0.0.0:1", 1, 2).band());
    }

    #[test]
    fn canonical_order_and_dedup() {
        let mut v = vec![
            p("[::1]:6380", 1, 1),
            p("127.0.0.2:6380", 1, 2),
            p("127.0.0.1:6381", 1, 1),
            p("127.0.0.1:6380", 2, 1),
            p("127.0.0.1:6380", 5, 1),
            p("127.0.0.1:6380", 9, 3),
        ];
        canonicalize(&mut v);
        let got: Vec<String> = v.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            got,
            [
                "127.0.0.1:6380 weight=5 priority=1",
                "127.0.0.1:6381 weight=1 priority=1",
                "[::1]:6380 weight=1 priority=1",
                "127.0.0.2:6380 weight=1 priority=2",
            ]
        );
    }

    #[test]
    fn tagged_items_keep_the_tag_of_the_kept_peer() {
        let mut v = vec![
            (p("127.0.0.1:1", 1, 2), 7),
            (p("127.0.0.1:1", 1, 1), 9),
            (p("127.0.0.0:1", 1, 1), 7),
        ];
        canonicalize_by(&mut v, |(p, _)| p);
        let got: Vec<(String, u32)> = v.iter().map(|(p, t)| (p.addr.to_string(), *t)).collect();
        assert_eq!(
            got,
            [
                ("127.0.0.0:1".to_string(), 7),
                ("127.0.0.1:1".to_string(), 9)
            ]
        );
    }

    #[test]
    fn colliding_queries_get_distinct_line_tags() {
        let (a, b) = ("s31597.service.consul", "s618190.service.consul");
        assert_eq!(source_tag(a), source_tag(b), "a 32-bit collision");
        let ta = line_source_tag(a, &[]);
        let tb = line_source_tag(b, &[ta]);
        assert_eq!(ta, source_tag(a));
        assert_ne!(tb, ta);
        assert_ne!(tb, 0);
        // Stable: the same lines in the same order, the same tags.
        assert_eq!(line_source_tag(b, &[line_source_tag(a, &[])]), tb);
        // Never 0, whatever is taken.
        assert_ne!(line_source_tag("x.service.consul", &[0, 1]), 0);
    }

    #[test]
    fn source_tags_differ_and_are_stable() {
        assert_eq!(
            source_tag("redis.service.dc1.consul"),
            source_tag("redis.service.dc1.consul")
        );
        assert_ne!(
            source_tag("redis.service.dc1.consul"),
            source_tag("redis.service.dc2.consul")
        );
        assert_eq!(source_tag(""), 0x811c_9dc5);
    }

    #[test]
    fn bands_are_runs_of_one_priority_weighted_peers_first() {
        let v = vec![
            p("127.0.0.1:1", 1, 1),
            p("127.0.0.2:1", 1, 1),
            p("127.0.0.3:1", 1, 4),
        ];
        assert_eq!(bands(&v).collect::<Vec<_>>(), [0..2, 2..3]);
        assert_eq!(bands(&[]).count(), 0);
        let mut v = vec![
            p("127.0.0.1:1", 0, 1),
            p("127.0.0.2:1", 2, 1),
            p("127.0.0.3:1", 0, 2),
            p("127.0.0.4:1", 1, 1),
            p("127.0.0.5:1", 0, 1),
        ];
        canonicalize(&mut v);
        let got: Vec<String> = v.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            got,
            [
                "127.0.0.2:1 weight=2 priority=1",
                "127.0.0.4:1 weight=1 priority=1",
                "127.0.0.1:1 weight=0 priority=1",
                "127.0.0.5:1 weight=0 priority=1",
                "127.0.0.3:1 weight=0 priority=2",
            ]
        );
        assert_eq!(bands(&v).collect::<Vec<_>>(), [0..2, 2..4, 4..5]);
    }

    #[test]
    fn canonical_order_ignores_input_order() {
        let mut a = vec![
            p("127.0.0.3:1", 1, 1),
            p("127.0.0.1:1", 1, 1),
            p("127.0.0.2:1", 1, 1),
        ];
        let mut b = a.clone();
        b.reverse();
        canonicalize(&mut a);
        canonicalize(&mut b);
        assert_eq!(a, b);
    }
}
