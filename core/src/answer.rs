//! A DNS answer to Consul's SRV query, turned into a canonical peer set.
//!
//! Records come in as plain data (the module converts hickory's types), so every
//! hostile shape an answer can take is testable here: wrong owners, CNAME chains,
//! port 0, weight 0, duplicates, records of other types, huge answers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::peer::{canonicalize, Peer};

/// More SRV records than one DNS message over TCP can carry (64 KiB: about 1,900
/// records with `.addr.` targets and no ADDITIONAL; Consul itself sends at most
/// 1,024): anything above is hostile and is cut, not processed.
pub const MAX_SRV_RECORDS: usize = 10_000;
/// The most SRV records Consul puts into one answer over TCP (it cuts there
/// before it counts bytes; over UDP it sends far fewer).
pub const CONSUL_TCP_SRV_RECORDS: usize = 1024;
/// The largest DNS message, over TCP.
pub const TCP_MESSAGE_BYTES: usize = 65_535;

/// Whether an answer of `bytes` (over TCP when `tcp`, else over UDP to a query
/// that offered `limit` bytes) with `srv_records` may lack instances Consul left
/// out. Consul trims an answer that does not fit (TCP: 1,024 SRV records, then
/// 65,523 bytes; UDP: the size the query offered) by dropping whole instances,
/// and sets TC only with `dns_config.enable_truncate`: a trimmed answer ends
/// within about one instance of the limit (a few hundred bytes with a CNAME
/// chain), so an answer that close to it may have been trimmed.
pub fn may_be_trimmed(srv_records: usize, bytes: usize, tcp: bool, limit: usize) -> bool {
    const UDP_MARGIN: usize = 256;
    const TCP_MARGIN: usize = 1024;
    if tcp {
        // More records than Consul's cut: another server (BIND sends about 1,420).
        srv_records == CONSUL_TCP_SRV_RECORDS || bytes + TCP_MARGIN > TCP_MESSAGE_BYTES
    } else {
        bytes + UDP_MARGIN > limit
    }
}
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
    /// Records whose target has no address (no A/AAAA in the answer, and the
    /// follow-up found none or was refused), with the first one and why.
    pub unresolved: usize,
    pub unresolved_example: Option<String>,
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
        self.unusable > 0 || self.own > 0 || self.unresolved > 0
    }

    /// "2 records for other names, 1 with port 0"; empty when nothing was ignored.
    pub fn describe(&self) -> String {
        describe_left_out(&[
            (self.other_owner, "for other names", None),
            (self.port_zero, "with port 0", None),
            (self.no_service, "with target \".\" (no service)", None),
            (self.over_limit, "over the limit of records", None),
            (
                self.unresolved,
                "with targets that have no address",
                example(&self.unresolved_example),
            ),
            (
                self.unusable,
                TAKES_NO_CONNECTIONS,
                example(&self.unusable_example),
            ),
            (self.own, NGINX_OWN_SOCKET, example(&self.own_example)),
        ])
    }
}

/// Why an instance with an address gives no peer: the same words whether DNS or
/// the HTTP API reported it.
pub const TAKES_NO_CONNECTIONS: &str = "with an address that takes no connections";
pub const NGINX_OWN_SOCKET: &str = "pointing at nginx's own listening socket";

/// The first instance met for a reason, as the log line shows it.
pub fn example<T: std::fmt::Display>(first: &Option<T>) -> Option<String> {
    first.as_ref().map(ToString::to_string)
}

/// "2 for other names, 1 with port 0 (db1:0)": each reason that counted any
/// instance, with its first example in brackets; empty when none did.
pub fn describe_left_out(reasons: &[(usize, &str, Option<String>)]) -> String {
    reasons
        .iter()
        .filter(|(count, _, _)| *count > 0)
        .map(|(count, why, first)| match first {
            Some(first) => format!("{count} {why} ({first})"),
            None => format!("{count} {why}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
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
    /// Why a target has no address, as its follow-up found (for the log).
    no_address: HashMap<String, String>,
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
        let records = by_name(answers.iter().chain(additionals));
        for target in targets {
            // A hostname target comes with what the agent's recursors gave:
            // a CNAME chain and the addresses of its end.
            for ip in chain_addresses(&target, &records) {
                out.add_address(&target, ip);
            }
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

    /// Records why a target's follow-up gave no address (a definitive answer:
    /// refused, no such name, no address records): its instances are left out.
    pub fn no_address(&mut self, target: &str, why: &str) {
        self.no_address.insert(normalize(target), why.to_string());
    }

    /// One peer per SRV record and address, canonical order, no duplicates;
    /// addresses that take no connections and nginx's own are left out. The
    /// examples of what was left out are the least ones, not the first met:
    /// Consul shuffles its records, and the same answer must log the same line.
    pub fn peers(&mut self, own: &OwnAddresses) -> Vec<Peer> {
        fn least<T: Ord>(example: &mut Option<T>, new: T) {
            if example.as_ref().is_none_or(|e| new < *e) {
                *example = Some(new);
            }
        }
        let mut peers = Vec::with_capacity(self.srvs.len());
        let mut unresolved = 0;
        let ignored = &mut self.ignored;
        for srv in &self.srvs {
            let Some(ips) = self.addrs.get(&srv.target) else {
                unresolved += 1;
                let why = self.no_address.get(&srv.target);
                let why = why.map_or("no address", String::as_str);
                let example = format!("{}:{}: {why}", srv.target, srv.port);
                least(&mut ignored.unresolved_example, example);
                continue;
            };
            for ip in ips {
                let addr = SocketAddr::new(*ip, srv.port);
                if !takes_connections(*ip) {
                    ignored.unusable += 1;
                    least(&mut ignored.unusable_example, addr);
                } else if own.contains(&addr) {
                    ignored.own += 1;
                    least(&mut ignored.own_example, addr);
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

/// Records by owner name, to follow names through an answer in one lookup each.
pub type ByName<'a> = HashMap<&'a str, Vec<&'a RecordData>>;

/// Indexes `records` by owner name.
pub fn by_name<'a>(records: impl IntoIterator<Item = &'a Record>) -> ByName<'a> {
    let mut index: ByName<'a> = HashMap::new();
    for rec in records {
        index.entry(rec.name.as_str()).or_default().push(&rec.data);
    }
    index
}

/// The addresses `name` has in an answer: its own A/AAAA records, or those of
/// the end of a CNAME chain from it (bounded, loops stop). Used for SRV targets
/// (ADDITIONAL: what the agent's recursors gave for a hostname) and for the
/// answer to a follow-up A/AAAA query.
pub fn chain_addresses(name: &str, records: &ByName<'_>) -> Vec<IpAddr> {
    let mut chain = vec![normalize(name)];
    let mut ips = Vec::new();
    for _ in 0..8 {
        let mut next = None;
        let last = &chain[chain.len() - 1];
        for data in records.get(last.as_str()).into_iter().flatten() {
            match data {
                RecordData::A(ip) => ips.push(IpAddr::V4(*ip)),
                RecordData::Aaaa(ip) => ips.push(IpAddr::V6(*ip)),
                RecordData::Cname(t) => {
                    next.get_or_insert_with(|| normalize(t));
                }
                _ => {}
            }
        }
        match next {
            Some(t) if ips.is_empty() && !chain.contains(&t) => chain.push(t),
            _ => break,
        }
    }
    ips
}

/// Consul names node addresses `<hex>.addr.<dc>.<domain>`, or `<hex>.addr.<domain>`
/// for an instance of a cluster peer (peering drops the datacenter): 8 hex digits
/// for IPv4, 32 for IPv6. Decoding them saves one A and one AAAA query per
/// target. Only names under the query's own domain are decoded: anyone can make
/// up a name that looks like one elsewhere.
pub fn decode_addr_target(target: &str, query: &str) -> Option<IpAddr> {
    let target = normalize(target);
    let mut labels = target.splitn(3, '.');
    let hex = labels.next()?;
    if labels.next()? != "addr" {
        return None;
    }
    // `<dc>.<domain>` or `<domain>`: either way, a domain the query is under.
    let rest = labels.next()?;
    let query = normalize(query);
    let under = |domain: &str| !domain.is_empty() && query.ends_with(&format!(".{domain}"));
    let without_dc = rest.split_once('.').map_or("", |(_, d)| d);
    if !(under(rest) || under(without_dc)) {
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
    fn answers_near_consuls_limits_may_be_trimmed() {
        // Over UDP, to a query offering 1,232 bytes (hickory's EDNS size):
        // Consul trims to 1,224, without TC.
        assert!(!may_be_trimmed(3, 400, false, 1232));
        assert!(may_be_trimmed(17, 1222, false, 1232));
        // Over TCP: 1,024 SRV records, or a message near 64 KiB.
        assert!(!may_be_trimmed(40, 4898, true, 0));
        assert!(may_be_trimmed(874, 65_449, true, 0));
        assert!(may_be_trimmed(1024, 45_112, true, 0));
        assert!(!may_be_trimmed(1200, 55_312, true, 0), "not Consul's");
    }

    #[test]
    fn peering_addr_targets_without_datacenter_decode() {
        // Cluster peering: `<hex>.addr.<domain>.`, no datacenter label.
        let q = "redis.service.peer1.peer.consul";
        assert_eq!(
            decode_addr_target("0a00000b.addr.consul.", q),
            Some("10.0.0.11".parse().unwrap())
        );
        assert_eq!(
            decode_addr_target("20010db8000000000000000000000001.addr.consul", q),
            Some("2001:db8::1".parse().unwrap())
        );
        let q = "redis.service.dc1.consul.example.org";
        assert_eq!(
            decode_addr_target("0a00000b.addr.consul.example.org", q),
            Some("10.0.0.11".parse().unwrap())
        );
        assert_eq!(decode_addr_target("0a00000b.addr.example.net", q), None);
        assert_eq!(decode_addr_target("0a00000b.addr.", q), None);
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
        assert!(ans.ignored.needs_attention(), "an instance is missing");
        assert_eq!(
            ans.ignored.describe(),
            "1 with targets that have no address (node2.node.dc.consul:6382: no address)"
        );
    }

    #[test]
    fn a_definitive_follow_up_leaves_its_instances_out_and_says_why() {
        let answers = [
            srv(Q, 1, 1, 6380, "7f000001.addr.yunlu_office.consul."),
            srv(Q, 1, 1, 6381, "Redis-Ext.Example.com."),
        ];
        let mut ans = SrvAnswer::parse(Q, &answers, &[]);
        assert_eq!(ans.unresolved_targets(), ["redis-ext.example.com"]);
        ans.no_address("redis-ext.example.com.", "127.0.0.1:8600 answered REFUSED");
        let got = ans.peers(&OwnAddresses::default());
        assert_eq!(got.len(), 1, "the other instance stays");
        assert_eq!(
            ans.ignored.describe(),
            "1 with targets that have no address \
             (redis-ext.example.com:6381: 127.0.0.1:8600 answered REFUSED)"
        );
    }

    #[test]
    fn what_is_left_out_is_described_alike_in_any_record_order() {
        // Consul shuffles the records of every answer: the log line must not
        // change with the order (it is said when it changes).
        let mut answers = vec![
            srv(Q, 1, 1, 6380, "b.example."),
            srv(Q, 1, 1, 6381, "a.example."),
            srv(Q, 1, 1, 6382, "00000000.addr.dc.consul."),
            srv(Q, 1, 1, 6383, "00000000.addr.dc.consul."),
            srv(Q, 1, 1, 6384, "7f000001.addr.dc.consul."),
        ];
        let described = |answers: &[Record]| {
            let mut ans = SrvAnswer::parse(Q, answers, &[]);
            ans.no_address("a.example", "REFUSED");
            ans.no_address("b.example", "NXDOMAIN");
            ans.peers(&OwnAddresses::default());
            ans.ignored
        };
        let first = described(&answers);
        assert_eq!(
            first.describe(),
            "2 with targets that have no address (a.example:6381: REFUSED), \
             2 with an address that takes no connections (0.0.0.0:6382)"
        );
        answers.reverse();
        assert_eq!(described(&answers), first);
    }

    #[test]
    fn cname_chain_in_additional_gives_a_hostname_target_its_address() {
        // Consul with recursors: the hostname target, and in ADDITIONAL the chain
        // its recursors returned.
        let answers = [srv(Q, 1, 1, 6381, "redis-ext.example.com.")];
        let additionals = [
            Record::new(
                "redis-ext.example.com.",
                RecordData::Cname("Edge.Example.NET.".into()),
            ),
            Record::new(
                "edge.example.net.",
                RecordData::Cname("host7.example.net.".into()),
            ),
            a("host7.example.net.", "127.0.0.7"),
            Record::new("redis-ext.example.com.", RecordData::Other),
        ];
        let mut ans = SrvAnswer::parse(Q, &answers, &additionals);
        assert!(ans.unresolved_targets().is_empty(), "no follow-up query");
        let got: Vec<String> = ans
            .peers(&OwnAddresses::default())
            .iter()
            .map(|p| p.addr.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.7:6381"]);
    }

    #[test]
    fn chain_addresses_stop_at_loops_and_length() {
        let looped = [
            Record::new("a.example", RecordData::Cname("b.example".into())),
            Record::new("b.example", RecordData::Cname("a.example".into())),
        ];
        assert!(chain_addresses("a.example", &by_name(&looped)).is_empty());
        let mut long: Vec<Record> = (0..20)
            .map(|i| {
                Record::new(
                    &format!("n{i}.example"),
                    RecordData::Cname(format!("n{}.example", i + 1)),
                )
            })
            .collect();
        long.push(a("n20.example", "127.0.0.20"));
        assert!(
            chain_addresses("n0.example", &by_name(&long)).is_empty(),
            "20 hops are too many"
        );
        long.push(a("n3.example", "127.0.0.3"));
        assert_eq!(
            chain_addresses("N2.example.", &by_name(&long)),
            ["127.0.0.3".parse::<IpAddr>().unwrap()]
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
            srv(Q, 1, 1, 6383, "7f000004.addr.evil.example."),
        ];
        let mut ans = SrvAnswer::parse(Q, &answers, &[]);
        assert_eq!(
            ans.unresolved_targets(),
            [
                "7f000002.addr.dc.evil.example",
                "7f000004.addr.evil.example"
            ],
            "only Consul's own domain is decoded; the others need A/AAAA queries"
        );
        let got: Vec<String> = ans
            .peers(&OwnAddresses::default())
            .iter()
            .map(|p| p.addr.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.1:6380", "127.0.0.3:6382"]);
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
