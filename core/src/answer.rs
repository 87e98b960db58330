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
    pub over_limit: usize,
    pub unresolved: usize,
}

impl Ignored {
    pub fn is_empty(&self) -> bool {
        *self == Ignored::default()
    }

    /// "2 records for other names, 1 with port 0"; empty when nothing was ignored.
    pub fn describe(&self) -> String {
        let parts = [
            (self.other_owner, "for other names"),
            (self.port_zero, "with port 0"),
            (self.over_limit, "over the limit of records"),
            (self.unresolved, "with targets that have no address"),
        ];
        parts
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, why)| format!("{n} {why}"))
            .collect::<Vec<_>>()
            .join(", ")
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
                if let Some(ip) = decode_addr_target(&target) {
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

    /// One peer per SRV record and address, canonical order, no duplicates.
    pub fn peers(&mut self) -> Vec<Peer> {
        let mut peers = Vec::with_capacity(self.srvs.len());
        let mut unresolved = 0;
        for srv in &self.srvs {
            match self.addrs.get(&srv.target) {
                Some(ips) => {
                    peers.extend(ips.iter().map(|ip| {
                        Peer::new(SocketAddr::new(*ip, srv.port), srv.weight, srv.priority)
                    }))
                }
                None => unresolved += 1,
            }
        }
        self.ignored.unresolved = unresolved;
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
/// 32 for IPv6. Decoding them saves one A and one AAAA query per target.
pub fn decode_addr_target(target: &str) -> Option<IpAddr> {
    let mut labels = target.split('.');
    let hex = labels.next()?;
    if labels.next()? != "addr" || labels.next().is_none() {
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
        ans.peers().iter().map(|p| p.to_string()).collect()
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
        let got: Vec<String> = ans.peers().iter().map(|p| p.addr.to_string()).collect();
        assert_eq!(got, ["127.0.0.1:6380", "[2001:db8::1]:6381"]);
    }

    #[test]
    fn decode_rejects_non_addr_names() {
        assert_eq!(decode_addr_target("7f000001.node.dc1.consul"), None);
        assert_eq!(decode_addr_target("7f00001.addr.dc1.consul"), None);
        assert_eq!(decode_addr_target("zz000001.addr.dc1.consul"), None);
        assert_eq!(decode_addr_target("7f000001.addr"), None);
        assert_eq!(
            decode_addr_target("0a00000b.addr.dc1.consul"),
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
        let got: Vec<String> = ans.peers().iter().map(|p| p.addr.to_string()).collect();
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
        let got: Vec<String> = ans.peers().iter().map(|p| p.to_string()).collect();
        assert_eq!(got, ["127.0.0.3:6381 weight=1 priority=1"]);
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
        assert!(ans.peers().is_empty());
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
        assert_eq!(ans.peers().len(), MAX_SRV_RECORDS);
        assert_eq!(ans.ignored.over_limit, 500);
    }

    #[test]
    fn addresses_per_target_are_bounded() {
        let answers = [srv(Q, 1, 1, 6380, "node1.node.dc.consul")];
        let additionals: Vec<Record> = (1..=40)
            .map(|i| a("node1.node.dc.consul", &format!("127.0.1.{i}")))
            .collect();
        let mut ans = SrvAnswer::parse(Q, &answers, &additionals);
        assert_eq!(ans.peers().len(), MAX_ADDRS_PER_TARGET);
    }
}
