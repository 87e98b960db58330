//! A DNS answer to Consul's SRV query, turned into a canonical peer set.
//!
//! Records come in as plain data (the module converts hickory's types), so every
//! hostile shape an answer can take is testable here: wrong owners, CNAME chains,
//! port 0, weight 0, duplicates, records of other types, huge answers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::peer::{canonicalize, Peer};

/// More SRV records than one DNS message over TCP can carry (64 KiB ≈ 1,900
/// Consul-shaped records): anything above is hostile and is cut, not processed.
pub const MAX_SRV_RECORDS: usize = 10_000;
/// Addresses accepted for one SRV target.
pub const MAX_ADDRS_PER_TARGET: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordData {
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub data: RecordData,
}

impl Record {
    pub fn new(name: &str, data: RecordData) -> Self {
        Record {
            name: normalize(name),
            data,
        }
    }
}

/// DNS names compare case-insensitively and with or without the root dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// Records left out of the peer set, by reason; reported in one log line per answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ignored {
    pub other_owner: usize,
    pub port_zero: usize,
    /// Target `.`: RFC 2782's "the service is not available here".
    pub no_service: usize,
    pub over_limit: usize,
    pub unresolved: usize,
    /// Addresses no connection should go to, with the first one met.
    pub unusable: usize,
    pub unusable_example: Option<SocketAddr>,
    /// Addresses nginx itself listens on (a proxy loop), with the first one met.
    pub own: usize,
    pub own_example: Option<SocketAddr>,
}

impl Ignored {
    pub fn is_empty(&self) -> bool {
        *self == Ignored::default()
    }

    /// Whether a user must act (the set misses instances Consul calls healthy
    /// because of where they are registered), rather than a shape of the answer.
    pub fn needs_attention(&self) -> bool {
        self.unusable > 0 || self.own > 0
    }

    /// "2 records for other names, 1 with port 0"; empty when nothing was ignored.
    pub fn describe(&self) -> String {
        let unusable = format!(
            "with an address that takes no connections ({})",
            self.unusable_example
                .map_or(String::new(), |a| a.to_string())
        );
        let own = format!(
            "pointing at nginx's own listening socket ({})",
            self.own_example.map_or(String::new(), |a| a.to_string())
        );
        let parts = [
            (self.other_owner, "for other names"),
            (self.port_zero, "with port 0"),
            (self.no_service, "with target \".\" (no service)"),
            (self.over_limit, "over the limit of records"),
            (self.unresolved, "with targets that have no address"),
            (self.unusable, unusable.as_str()),
            (self.own, own.as_str()),
        ];
        parts
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, why)| format!("{n} {why}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The addresses nginx listens on, so that no peer points back at nginx itself:
/// a connection there would be proxied again, until `worker_connections` runs out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnAddresses {
    /// Listening sockets; an unspecified address (`listen 6379;`) listens on all
    /// of the host's addresses.
    pub listen: Vec<SocketAddr>,
    /// The host's own addresses (for listening sockets on all of them).
    pub local_ips: Vec<IpAddr>,
}

impl OwnAddresses {
    pub fn contains(&self, addr: &SocketAddr) -> bool {
        let ip = canonical_ip(addr.ip());
        self.listen.iter().any(|l| {
            let lip = canonical_ip(l.ip());
            l.port() == addr.port()
                && (lip == ip
                    || lip.is_unspecified()
                        && (ip.is_loopback()
                            || self.local_ips.iter().any(|&i| canonical_ip(i) == ip)))
        })
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Addresses that take no TCP connection to one backend: "this host" (0.0.0.0/8,
/// `::`, which Linux routes to the proxy's own host), multicast, broadcast.
pub fn takes_connections(ip: IpAddr) -> bool {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => !(v4.octets()[0] == 0 || v4.is_broadcast() || v4.is_multicast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// The SRV part of an answer, with the addresses known so far for its targets.
#[derive(Clone, Debug, Default)]
pub struct SrvAnswer {
    pub srvs: Vec<Srv>,
    addrs: HashMap<String, Vec<IpAddr>>,
    pub ignored: Ignored,
}

impl SrvAnswer {
    /// Picks the SRV records that answer `query` (following a CNAME chain from it),
    /// and the addresses the message already gives for their targets: from the
    /// ADDITIONAL (or ANSWER) section, else decoded from Consul's `.addr.` names.
    pub fn parse(query: &str, answers: &[Record], additionals: &[Record]) -> SrvAnswer {
        let owners = owner_chain(&normalize(query), answers);
        let mut out = SrvAnswer::default();
        for rec in answers {
            let RecordData::Srv {
                priority,
                weight,
                port,
                target,
            } = &rec.data
            else {
                continue;
            };
            if !owners.contains(&rec.name) {
                out.ignored.other_owner += 1;
            } else if *port == 0 {
                out.ignored.port_zero += 1;
            } else if normalize(target).is_empty() {
                out.ignored.no_service += 1;
            } else if out.srvs.len() >= MAX_SRV_RECORDS {
                out.ignored.over_limit += 1;
            } else {
                out.srvs.push(Srv {
                    priority: *priority,
                    weight: *weight,
                    port: *port,
                    target: normalize(target),
                });
            }
        }
        let targets: HashSet<String> = out.srvs.iter().map(|s| s.target.clone()).collect();
        for rec in answers.iter().chain(additionals) {
            let ip = match rec.data {
                RecordData::A(ip) => IpAddr::V4(ip),
                RecordData::Aaaa(ip) => IpAddr::V6(ip),
                _ => continue,
            };
            if targets.contains(&rec.name) {
                out.add_address(&rec.name, ip);
            }
        }
        for target in targets {
            if !out.addrs.contains_key(&target) {
                if let Some(ip) = decode_addr_target(&target, query) {
                    out.add_address(&target, ip);
                }
            }
        }
        out
    }

    fn add_address(&mut self, target: &str, ip: IpAddr) {
        let list = self.addrs.entry(target.to_string()).or_default();
        if list.len() < MAX_ADDRS_PER_TARGET && !list.contains(&ip) {
            list.push(ip);
        }
    }

    /// Targets that still need A/AAAA queries, each once, in answer order.
    pub fn unresolved_targets(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.srvs
            .iter()
            .filter(|s| !self.addrs.contains_key(&s.target))
            .filter(|s| seen.insert(s.target.clone()))
            .map(|s| s.target.clone())
            .collect()
    }

    /// Adds the result of a follow-up A/AAAA query.
    pub fn add_addresses(&mut self, target: &str, ips: impl IntoIterator<Item = IpAddr>) {
        let target = normalize(target);
        for ip in ips {
            self.add_address(&target, ip);
        }
    }

    /// One peer per SRV record and address, canonical order, no duplicates;
    /// addresses that take no connections and nginx's own are left out.
    pub fn peers(&mut self, own: &OwnAddresses) -> Vec<Peer> {
        let mut peers = Vec::with_capacity(self.srvs.len());
        let mut unresolved = 0;
        let ignored = &mut self.ignored;
        for srv in &self.srvs {
            let Some(ips) = self.addrs.get(&srv.target) else {
                unresolved += 1;
                continue;
            };
            for ip in ips {
                let addr = SocketAddr::new(*ip, srv.port);
                if !takes_connections(*ip) {
                    ignored.unusable += 1;
                    ignored.unusable_example.get_or_insert(addr);
                } else if own.contains(&addr) {
                    ignored.own += 1;
                    ignored.own_example.get_or_insert(addr);
                } else {
                    peers.push(Peer::new(addr, srv.weight, srv.priority));
                }
            }
        }
        ignored.unresolved = unresolved;
        canonicalize(&mut peers);
        peers
    }
}

/// The query name and every name a CNAME chain from it leads to (bounded).
fn owner_chain(query: &str, answers: &[Record]) -> Vec<String> {
    let mut chain = vec![query.to_string()];
    for _ in 0..8 {
        let last = chain[chain.len() - 1].clone();
        let next = answers.iter().find_map(|r| match &r.data {
            RecordData::Cname(t) if r.name == last => Some(normalize(t)),
            _ => None,
        });
        match next {
            Some(t) if !chain.contains(&t) => chain.push(t),
            _ => break,
        }
    }
    chain
}

/// Consul names node addresses `<hex>.addr.<dc>.<domain>`: 8 hex digits for IPv4,
/// 32 for IPv6. Decoding them saves one A and one AAAA query per target. Only
/// names under the query's own domain are decoded: anyone can make up a name
/// that looks like one elsewhere.
pub fn decode_addr_target(target: &str, query: &str) -> Option<IpAddr> {
    let target = normalize(target);
    let mut labels = target.splitn(4, '.');
    let hex = labels.next()?;
    if labels.next()? != "addr" {
        return None;
    }
    let _dc = labels.next()?;
    let domain = labels.next()?;
    let query = normalize(query);
    if !(query == domain || query.ends_with(&format!(".{domain}"))) {
        return None;
    }
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.len() {
        8 => u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "redis.service.yunlu_office.consul";

    fn srv(owner: &str, prio: u16, w: u16, port: u16, target: &str) -> Record {
        Record::new(
            owner,
            RecordData::Srv {
                priority: prio,
                weight: w,
                port,
                target: target.into(),
            },
        )
    }

    fn a(owner: &str, ip: &str) -> Record {
        Record::new(owner, RecordData::A(ip.parse().unwrap()))
    }

    fn peers_of(answers: &[Record], additionals: &[Record]) -> Vec<String> {
        let mut ans = SrvAnswer::parse(Q, answers, additionals);
        ans.peers(&OwnAddresses::default())
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn consul_shaped_answer_uses_additional_port_weight_priority() {
        let answers = [
            srv(
                "redis.service.yunlu_office.consul.",
                1,
                3,
                6380,
                "node1.node.yunlu_office.consul.",
            ),
            srv(
                "redis.service.yunlu_office.consul.",
                2,
                1,
                6381,
                "node2.node.yunlu_office.consul.",
            ),
        ];
        let additionals = [
            a("node1.node.yunlu_office.consul.", "10.0.0.11"),
            a("node2.node.yunlu_office.consul.", "10.0.0.12"),
        ];
        assert_eq!(
            peers_of(&answers, &additionals),
            [
                "10.0.0.11:6380 weight=3 priority=1",
                "10.0.0.12:6381 weight=1 priority=2"
            ]
        );
    }

    #[test]
    fn addr_targets_decode_without_additional() {
        let answers = [
            srv(Q, 1, 1, 6380, "7f000001.addr.yunlu_office.consul."),
            srv(
                Q,
                1,
                1,
                6381,
                "20010db8000000000000000000000001.addr.yunlu_office.consul.",
            ),
        ];
        let mut ans = SrvAnswer::parse(Q, &answers, &[]);
        assert!(ans.unresolved_targets().is_empty());
        let got: Vec<String> = ans
            .peers(&OwnAddresses::default())
            .iter()
            .map(|p| p.addr.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.1:6380", "[2001:db8::1]:6381"]);
    }

    #[test]
    fn decode_rejects_non_addr_names() {
        let q = "redis.service.dc1.consul";
        assert_eq!(decode_addr_target("7f000001.node.dc1.consul", q), None);
        assert_eq!(decode_addr_target("7f00001.addr.dc1.consul", q), None);
        assert_eq!(decode_addr_target("zz000001.addr.dc1.consul", q), None);
        assert_eq!(decode_addr_target("7f000001.addr", q), None);
        assert_eq!(decode_addr_target("7f000001.addr.dc1", q), None);
        assert_eq!(
            decode_addr_target("0a00000b.addr.dc1.consul.", q),
            Some("10.0.0.11".parse().unwrap())
        );
    }

    #[test]
    fn missing_targets_are_resolved_by_follow_up() {
        let answers = [
            srv(Q, 1, 1, 6380, "node1.node.dc.consul."),
            srv(Q, 1, 1, 6381, "node1.node.dc.consul."),
            srv(Q, 1, 1, 6382, "node2.node.dc.consul."),
        ];
        let mut ans = SrvAnswer::parse(Q, &answers, &[]);
        assert_eq!(
            ans.unresolved_targets(),
            ["node1.node.dc.consul", "node2.node.dc.consul"]
        );
        ans.add_addresses(
            "node1.node.dc.consul.",
            ["127.0.0.5".parse().unwrap(), "::1".parse().unwrap()],
        );
        let got: Vec<String> = ans
            .peers(&OwnAddresses::default())
            .iter()
            .map(|p| p.addr.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "127.0.0.5:6380",
                "127.0.0.5:6381",
                "[::1]:6380",
                "[::1]:6381"
            ]
        );
        assert_eq!(ans.ignored.unresolved, 1);
        assert_eq!(
            ans.ignored.describe(),
            "1 with targets that have no address"
        );
    }

    #[test]
    fn hostile_records_are_ignored_and_counted() {
        let answers = [
            srv(
                "other.service.consul",
                1,
                1,
                6380,
                "7f000001.addr.dc.consul",
            ),
            srv(Q, 1, 1, 0, "7f000002.addr.dc.consul"),
            srv(Q, 1, 0, 6381, "7f000003.addr.dc.consul"),
            srv(Q, 1, 0, 6381, "7f000003.addr.dc.consul"),
            a(Q, "127.0.0.9"),
            Record::new(Q, RecordData::Other),
        ];
        let mut ans = SrvAnswer::parse(&format!("{}.", Q.to_uppercase()), &answers, &[]);
        let got: Vec<String> = ans
            .peers(&OwnAddresses::default())
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.3:6381 weight=0 priority=1"]);
        assert_eq!(ans.ignored.other_owner, 1);
        assert_eq!(ans.ignored.port_zero, 1);
        assert_eq!(ans.ignored.describe(), "1 for other names, 1 with port 0");
    }

    #[test]
    fn cname_chain_is_followed_and_loops_stop() {
        let answers = [
            Record::new(Q, RecordData::Cname("alias.consul.".into())),
            Record::new("alias.consul", RecordData::Cname(Q.into())),
            srv("alias.consul.", 1, 1, 6380, "7f000001.addr.dc.consul"),
        ];
        assert_eq!(
            peers_of(&answers, &[]),
            ["127.0.0.1:6380 weight=1 priority=1"]
        );
    }

    #[test]
    fn additional_records_for_strangers_are_not_used() {
        let answers = [srv(Q, 1, 1, 6380, "node1.node.dc.consul")];
        let additionals = [a("evil.example", "127.0.0.66")];
        let mut ans = SrvAnswer::parse(Q, &answers, &additionals);
        assert_eq!(ans.unresolved_targets(), ["node1.node.dc.consul"]);
        assert!(ans.peers(&OwnAddresses::default()).is_empty());
    }

    #[test]
    fn huge_answers_are_bounded() {
        let answers: Vec<Record> = (0..MAX_SRV_RECORDS + 500)
            .map(|i| {
                srv(
                    Q,
                    1,
                    1,
                    1000 + (i % 60000) as u16,
                    &format!("{:08x}.addr.dc.consul", 0x7f00_0000 + i),
                )
            })
            .collect();
        let mut ans = SrvAnswer::parse(Q, &answers, &[]);
        assert_eq!(ans.peers(&OwnAddresses::default()).len(), MAX_SRV_RECORDS);
        assert_eq!(ans.ignored.over_limit, 500);
    }

    #[test]
    fn addresses_per_target_are_bounded() {
        let answers = [srv(Q, 1, 1, 6380, "node1.node.dc.consul")];
        let additionals: Vec<Record> = (1..=40)
            .map(|i| a("node1.node.dc.consul", &format!("127.0.1.{i}")))
            .collect();
        let mut ans = SrvAnswer::parse(Q, &answers, &additionals);
        assert_eq!(
            ans.peers(&OwnAddresses::default()).len(),
            MAX_ADDRS_PER_TARGET
        );
    }

    #[test]
    fn addr_names_under_another_domain_are_not_decoded() {
        let answers = [
            srv(Q, 1, 1, 6380, "7f000001.addr.yunlu_office.consul."),
            srv(Q, 1, 1, 6381, "7f000002.addr.dc.evil.example."),
            srv(Q, 1, 1, 6382, "7f000003.addr.consul."),
        ];
        let mut ans = SrvAnswer::parse(Q, &answers, &[]);
        assert_eq!(
            ans.unresolved_targets(),
            ["7f000002.addr.dc.evil.example", "7f000003.addr.consul"],
            "only Consul's own domain is decoded; the others need A/AAAA queries"
        );
        let got: Vec<String> = ans
            .peers(&OwnAddresses::default())
            .iter()
            .map(|p| p.addr.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.1:6380"]);
        assert_eq!(
            decode_addr_target("0a000001.addr.dc1.example.org", "r.service.dc1.example.org"),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn target_root_means_no_service_and_is_not_resolved() {
        let answers = [
            srv(Q, 1, 1, 6380, "."),
            srv(Q, 1, 1, 6381, "7f000001.addr.dc.consul"),
        ];
        let mut ans = SrvAnswer::parse(Q, &answers, &[]);
        assert!(
            ans.unresolved_targets().is_empty(),
            "no A query for the root"
        );
        assert_eq!(ans.peers(&OwnAddresses::default()).len(), 1);
        assert_eq!(ans.ignored.no_service, 1);
        assert_eq!(ans.ignored.describe(), "1 with target \".\" (no service)");
    }

    #[test]
    fn addresses_that_take_no_connections_are_left_out() {
        let hex = |ip: &str| -> String {
            match ip.parse::<IpAddr>().unwrap() {
                IpAddr::V4(v) => format!("{:08x}", u32::from(v)),
                IpAddr::V6(v) => format!("{:032x}", u128::from(v)),
            }
        };
        let bad = [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "::",
            "ff02::1",
            "::ffff:0.0.0.0",
        ];
        let mut answers: Vec<Record> = bad
            .iter()
            .map(|ip| srv(Q, 1, 1, 6380, &format!("{}.addr.dc.consul", hex(ip))))
            .collect();
        answers.push(srv(Q, 1, 1, 6380, "7f000001.addr.dc.consul"));
        let mut ans = SrvAnswer::parse(Q, &answers, &[]);
        let got = ans.peers(&OwnAddresses::default());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].addr.to_string(), "127.0.0.1:6380");
        assert_eq!(ans.ignored.unusable, bad.len());
        assert!(ans.ignored.needs_attention());
        assert_eq!(
            ans.ignored.describe(),
            format!(
                "{} with an address that takes no connections (0.0.0.0:6380)",
                bad.len()
            )
        );
        for ok in ["127.0.0.1", "10.0.0.1", "::1", "2001:db8::1", "240.0.0.1"] {
            assert!(takes_connections(ok.parse().unwrap()), "{ok}");
        }
    }

    #[test]
    fn nginx_own_listening_sockets_are_left_out() {
        let own = OwnAddresses {
            listen: vec![
                "127.0.0.1:1985".parse().unwrap(),
                "0.0.0.0:6379".parse().unwrap(),
            ],
            local_ips: vec!["10.1.2.3".parse().unwrap()],
        };
        for (addr, loops) in [
            ("127.0.0.1:1985", true),
            ("127.0.0.2:1985", false),
            ("127.0.0.9:6379", true),
            ("10.1.2.3:6379", true),
            ("[::ffff:10.1.2.3]:6379", true),
            ("10.9.9.9:6379", false),
            ("127.0.0.1:6380", false),
        ] {
            assert_eq!(own.contains(&addr.parse().unwrap()), loops, "{addr}");
        }
        let answers = [
            srv(Q, 1, 1, 1985, "node1.node.dc.consul"),
            srv(Q, 1, 1, 6380, "node1.node.dc.consul"),
        ];
        let mut ans = SrvAnswer::parse(Q, &answers, &[a("node1.node.dc.consul", "127.0.0.1")]);
        let got = ans.peers(&own);
        assert_eq!(got.len(), 1);
        assert_eq!(
            ans.ignored.describe(),
            "1 pointing at nginx's own listening socket (127.0.0.1:1985)"
        );
    }
}
