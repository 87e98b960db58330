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
    pub fn new(addr: SocketAddr, weight: u16, priority: u16) -> Self {
        // Consul publishes weight 0 for "no preference": treat it as 1, never as "off".
        Peer {
            addr,
            weight: weight.max(1),
            priority,
        }
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

/// Sorts into the canonical order (priority, then address) and removes duplicate
/// addresses, keeping the lowest priority and, within it, the highest weight.
pub fn canonicalize(peers: &mut Vec<Peer>) {
    peers.sort_by(|a, b| {
        addr_order(&a.addr, &b.addr)
            .then(a.priority.cmp(&b.priority))
            .then(b.weight.cmp(&a.weight))
    });
    peers.dedup_by(|later, first| later.addr == first.addr);
    peers.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(addr_order(&a.addr, &b.addr))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str, w: u16, prio: u16) -> Peer {
        Peer::new(s.parse().unwrap(), w, prio)
    }

    #[test]
    fn weight_zero_means_one() {
        assert_eq!(p("127.0.0.1:1", 0, 1).weight, 1);
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
