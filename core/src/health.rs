//! Consul's `/v1/health/service/NAME` answer (a JSON array of `{Node, Service,
//! Checks}`, Consul's `api.ServiceEntry`) to the peers of an API line, with the
//! rules Consul's DNS interface applies on its side:
//! - an instance with any critical check (node checks, whose `ServiceID` is
//!   empty, and maintenance included) is left out;
//! - one with a warning check weighs `Weights.Warning` (left out with
//!   `only_passing`, Consul's `passing`), a passing one `Weights.Passing`; 0 is
//!   carried as it is (the operator's "no share"); no `Weights` counts as 1;
//! - the address is `Service.Address`, else `Node.Address`: an IP address, or a
//!   host name the module may resolve; the port is `Service.Port`.
//!
//! A body that is not such an array (truncated, wrong types) is malformed as a
//! whole: the line keeps its set as `on_error` says rather than publish a part.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::answer::{
    describe_left_out, example, takes_connections, OwnAddresses, NGINX_OWN_SOCKET,
    TAKES_NO_CONNECTIONS,
};
use crate::peer::{canonicalize, Peer};
use crate::settings::valid_dns_name;

/// Consul's check states (api/health.go); "warning", and any other, is not passing.
const PASSING: &str = "passing";
const CRITICAL: &str = "critical";
/// Maintenance checks: the node's, and each service instance's (prefix).
const NODE_MAINT: &str = "_node_maintenance";
const SERVICE_MAINT_PREFIX: &str = "_service_maintenance:";
/// Every API peer is in one tier, as Consul's SRV records are (priority 1).
pub const API_PRIORITY: u16 = 1;
/// The longest text of a malformed answer's reason (the zone keeps 128 bytes).
const REASON_CHARS: usize = 100;
/// Answer bytes read per peer the zone holds (a Consul entry, with its
/// checks' output, takes a few KiB), and the least cap.
const BODY_BYTES_PER_PEER: usize = 16 * 1024;
const MIN_BODY_CAP: usize = 4 << 20;

/// The largest answer body a line reads into memory, for a zone of `capacity`
/// peers: 16 KiB per peer, at least 4 MiB.
pub fn body_cap(capacity: usize) -> usize {
    capacity
        .saturating_mul(BODY_BYTES_PER_PEER)
        .max(MIN_BODY_CAP)
}

#[derive(Deserialize)]
struct EntryJson<'a> {
    #[serde(rename = "Node", borrow, default)]
    node: Option<NodeJson<'a>>,
    #[serde(rename = "Service", borrow, default)]
    service: Option<ServiceJson<'a>>,
    #[serde(rename = "Checks", borrow, default)]
    checks: Option<Vec<CheckJson<'a>>>,
}

#[derive(Deserialize)]
struct NodeJson<'a> {
    #[serde(rename = "Address", borrow, default)]
    address: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ServiceJson<'a> {
    #[serde(rename = "Address", borrow, default)]
    address: Option<Cow<'a, str>>,
    #[serde(rename = "Port", default)]
    port: Option<i64>,
    #[serde(rename = "Weights", default)]
    weights: Option<WeightsJson>,
}

#[derive(Deserialize)]
struct WeightsJson {
    #[serde(rename = "Passing", default)]
    passing: Option<i64>,
    #[serde(rename = "Warning", default)]
    warning: Option<i64>,
}

#[derive(Deserialize)]
struct CheckJson<'a> {
    #[serde(rename = "CheckID", borrow, default)]
    check_id: Option<Cow<'a, str>>,
    #[serde(rename = "Status", borrow, default)]
    status: Option<Cow<'a, str>>,
}

/// Where an instance is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Ip(IpAddr),
    /// A host name (lower case, no root dot): resolved through `resolver=`.
    Host(String),
}

/// A healthy instance of the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub address: Address,
    pub port: u16,
    pub weight: u16,
}

/// Instances of the answer that give no peer and are worth saying so (health
/// filtering is not: that is what the answer is for).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Left {
    pub port_zero: usize,
    /// Neither `Service.Address` nor `Node.Address`.
    pub no_address: usize,
    /// An address that is neither an IP address nor a host name.
    pub bad_address: usize,
    pub bad_address_example: Option<String>,
    /// Host names, without `resolver=` to resolve them.
    pub host_no_resolver: usize,
    pub host_no_resolver_example: Option<String>,
    /// Host names that have no A/AAAA records.
    pub host_no_records: usize,
    pub host_no_records_example: Option<String>,
    /// Addresses no connection should go to, and nginx's own listening sockets.
    pub unusable: usize,
    pub unusable_example: Option<SocketAddr>,
    pub own: usize,
    pub own_example: Option<SocketAddr>,
}

impl Left {
    pub fn is_empty(&self) -> bool {
        *self == Left::default()
    }

    /// Whether a user must act (instances Consul calls healthy are not served),
    /// rather than a shape of the registrations.
    pub fn needs_attention(&self) -> bool {
        Left {
            port_zero: 0,
            ..self.clone()
        } != Left::default()
    }

    /// "1 with port 0, 2 with a host name and no resolver= (db1.example.org)".
    pub fn describe(&self) -> String {
        describe_left_out(&[
            (self.port_zero, "with port 0", None),
            (self.no_address, "without an address", None),
            (
                self.bad_address,
                "with an invalid address",
                example(&self.bad_address_example),
            ),
            (
                self.host_no_resolver,
                "with a host name and no \"resolver=\" to resolve it",
                example(&self.host_no_resolver_example),
            ),
            (
                self.host_no_records,
                "with a host name that has no address",
                example(&self.host_no_records_example),
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

/// One answer, health rules applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthAnswer {
    /// Entries in the answer.
    pub entries: usize,
    /// Left out by health: a critical or maintenance check.
    pub critical: usize,
    /// Left out by `only_passing`: a warning check.
    pub not_passing: usize,
    pub instances: Vec<Instance>,
    pub left: Left,
}

/// Decodes an answer; `Err` says why it is malformed.
pub fn parse(body: &[u8], only_passing: bool) -> Result<HealthAnswer, String> {
    let entries: Vec<EntryJson<'_>> = serde_json::from_slice(body).map_err(|e| {
        let mut why = e.to_string();
        if why.len() > REASON_CHARS {
            let mut end = REASON_CHARS;
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            why.truncate(end);
        }
        format!("malformed answer ({why})")
    })?;
    let mut answer = HealthAnswer {
        entries: entries.len(),
        ..HealthAnswer::default()
    };
    for e in &entries {
        let Some(service) = &e.service else {
            return Err("malformed answer (an entry without \"Service\")".into());
        };
        let mut warning = false;
        let mut critical = false;
        for c in e.checks.iter().flatten() {
            let id = c.check_id.as_deref().unwrap_or("");
            if id == NODE_MAINT || id.starts_with(SERVICE_MAINT_PREFIX) {
                critical = true;
                continue;
            }
            match c.status.as_deref() {
                Some(PASSING) => {}
                Some(CRITICAL) => critical = true,
                // Warning, and any state Consul does not define: not passing.
                _ => warning = true,
            }
        }
        if critical {
            answer.critical += 1;
            continue;
        }
        if warning && only_passing {
            answer.not_passing += 1;
            continue;
        }
        let weights = service.weights.as_ref();
        let weight = if warning {
            weights.and_then(|w| w.warning)
        } else {
            weights.and_then(|w| w.passing)
        }
        .unwrap_or(1)
        .clamp(0, i64::from(u16::MAX)) as u16;
        let port = match service.port.unwrap_or(0) {
            p @ 1..=65535 => p as u16,
            _ => {
                answer.left.port_zero += 1;
                continue;
            }
        };
        let text = match service.address.as_deref() {
            Some(a) if !a.is_empty() => a,
            _ => e
                .node
                .as_ref()
                .and_then(|n| n.address.as_deref())
                .unwrap_or(""),
        };
        let address = if text.is_empty() {
            answer.left.no_address += 1;
            continue;
        } else if let Ok(ip) = text.parse::<IpAddr>() {
            Address::Ip(ip)
        } else if valid_dns_name(text) {
            Address::Host(text.trim_end_matches('.').to_ascii_lowercase())
        } else {
            answer.left.bad_address += 1;
            answer
                .left
                .bad_address_example
                .get_or_insert_with(|| text.chars().take(64).collect());
            continue;
        };
        answer.instances.push(Instance {
            address,
            port,
            weight,
        });
    }
    Ok(answer)
}

impl HealthAnswer {
    /// The host names to resolve (each once).
    pub fn host_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .instances
            .iter()
            .filter_map(|i| match &i.address {
                Address::Host(h) => Some(h.clone()),
                Address::Ip(_) => None,
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The peer set, canonical: one peer per instance and address (a host name
    /// gives one per address it has in `hosts`; without `hosts`, none). Weight
    /// 0 stays 0. What gives no peer is counted in `left`.
    pub fn peers(
        &mut self,
        own: &OwnAddresses,
        hosts: Option<&HashMap<String, Vec<IpAddr>>>,
    ) -> Vec<Peer> {
        let left = &mut self.left;
        let mut peers = Vec::with_capacity(self.instances.len());
        for inst in &self.instances {
            let ips: &[IpAddr] = match (&inst.address, hosts) {
                (Address::Ip(ip), _) => std::slice::from_ref(ip),
                (Address::Host(h), None) => {
                    left.host_no_resolver += 1;
                    left.host_no_resolver_example
                        .get_or_insert_with(|| h.clone());
                    continue;
                }
                (Address::Host(h), Some(hosts)) => match hosts.get(h) {
                    Some(ips) if !ips.is_empty() => ips,
                    _ => {
                        left.host_no_records += 1;
                        left.host_no_records_example
                            .get_or_insert_with(|| h.clone());
                        continue;
                    }
                },
            };
            for &ip in ips {
                let addr = SocketAddr::new(ip, inst.port);
                if !takes_connections(ip) {
                    left.unusable += 1;
                    left.unusable_example.get_or_insert(addr);
                } else if own.contains(&addr) {
                    left.own += 1;
                    left.own_example.get_or_insert(addr);
                } else {
                    peers.push(Peer::new(addr, inst.weight, API_PRIORITY));
                }
            }
        }
        canonicalize(&mut peers);
        peers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry as Consul writes it (abridged: what the module reads, plus
    /// fields it must skip).
    fn entry(node_addr: &str, svc_addr: &str, port: i64, checks: &[(&str, &str)]) -> String {
        let checks: Vec<String> = checks
            .iter()
            .map(|(id, status)| {
                format!(
                    r#"{{"Node":"n1","CheckID":"{id}","Name":"c","Status":"{status}","Notes":"","Output":"ok","ServiceID":"","ServiceName":"","ServiceTags":[],"Type":"","Definition":{{}},"CreateIndex":5,"ModifyIndex":5}}"#
                )
            })
            .collect();
        format!(
            r#"{{"Node":{{"ID":"7d","Node":"n1","Address":"{node_addr}","Datacenter":"dc1","TaggedAddresses":{{"lan":"{node_addr}"}},"Meta":{{"k":"v"}},"CreateIndex":4,"ModifyIndex":4}},"Service":{{"ID":"redis1","Service":"redis","Tags":["primary"],"Address":"{svc_addr}","Meta":null,"Port":{port},"Weights":{{"Passing":3,"Warning":1}},"EnableTagOverride":false,"Proxy":{{"Expose":{{}}}},"Connect":{{}},"CreateIndex":6,"ModifyIndex":6}},"Checks":[{}]}}"#,
            checks.join(",")
        )
    }

    fn body(entries: &[String]) -> Vec<u8> {
        format!("[{}]", entries.join(",")).into_bytes()
    }

    fn peers_of(b: &[u8], only_passing: bool) -> Vec<String> {
        let mut a = parse(b, only_passing).unwrap();
        a.peers(&OwnAddresses::default(), None)
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn service_address_then_node_address_and_weights_by_health() {
        let b = body(&[
            entry(
                "10.0.0.1",
                "127.0.0.1",
                6380,
                &[("serfHealth", "passing"), ("svc", "passing")],
            ),
            entry(
                "127.0.0.2",
                "",
                6381,
                &[("serfHealth", "passing"), ("svc", "warning")],
            ),
            entry("10.0.0.3", "::1", 6382, &[]),
        ]);
        assert_eq!(
            peers_of(&b, false),
            [
                "127.0.0.1:6380 weight=3 priority=1",
                "127.0.0.2:6381 weight=1 priority=1",
                "[::1]:6382 weight=3 priority=1",
            ]
        );
        assert_eq!(
            peers_of(&b, true),
            [
                "127.0.0.1:6380 weight=3 priority=1",
                "[::1]:6382 weight=3 priority=1",
            ]
        );
        let a = parse(&b, true).unwrap();
        assert_eq!((a.entries, a.critical, a.not_passing), (3, 0, 1));
    }

    #[test]
    fn any_critical_check_leaves_the_instance_out() {
        let b = body(&[
            entry(
                "127.0.0.1",
                "",
                1,
                &[("serfHealth", "critical"), ("svc", "passing")],
            ),
            entry("127.0.0.2", "", 2, &[("svc", "critical")]),
            entry("127.0.0.3", "", 3, &[("_node_maintenance", "passing")]),
            entry(
                "127.0.0.4",
                "",
                4,
                &[("_service_maintenance:redis4", "critical")],
            ),
            entry("127.0.0.5", "", 5, &[("svc", "passing")]),
        ]);
        assert_eq!(peers_of(&b, false), ["127.0.0.5:5 weight=3 priority=1"]);
        assert_eq!(parse(&b, false).unwrap().critical, 4);
    }

    #[test]
    fn weight_zero_is_carried_and_missing_weights_are_one() {
        let b = br#"[{"Node":{"Address":"127.0.0.1"},"Service":{"Port":1,"Weights":{"Passing":1,"Warning":0}},"Checks":[{"Status":"warning"}]},
                     {"Node":{"Address":"127.0.0.2"},"Service":{"Port":1},"Checks":[]},
                     {"Node":{"Address":"127.0.0.3"},"Service":{"Port":1,"Weights":null},"Checks":null},
                     {"Node":{"Address":"127.0.0.4"},"Service":{"Port":1,"Weights":{"Passing":70000}}},
                     {"Node":{"Address":"127.0.0.5"},"Service":{"Port":1,"Weights":{"Passing":-3}}}]"#;
        // Canonical order: weight-0 peers after the weighted ones of their
        // priority (their own band, `Peer::band`).
        assert_eq!(
            peers_of(b, false),
            [
                "127.0.0.2:1 weight=1 priority=1",
                "127.0.0.3:1 weight=1 priority=1",
                "127.0.0.4:1 weight=65535 priority=1",
                "127.0.0.1:1 weight=0 priority=1",
                "127.0.0.5:1 weight=0 priority=1",
            ]
        );
    }

    #[test]
    fn unknown_check_states_count_as_warning() {
        let b = br#"[{"Node":{"Address":"127.0.0.1"},"Service":{"Port":1,"Weights":{"Passing":5,"Warning":2}},"Checks":[{"Status":"weird"}]}]"#;
        assert_eq!(peers_of(b, false), ["127.0.0.1:1 weight=2 priority=1"]);
        assert!(peers_of(b, true).is_empty());
    }

    #[test]
    fn addresses_that_give_no_peer_are_counted() {
        let b = body(&[
            entry("", "", 1, &[]),
            entry("10.0.0.1", "not an address!", 2, &[]),
            entry("10.0.0.1", "Db1.Example.org.", 3, &[]),
            entry("127.0.0.1", "", 0, &[]),
            entry("127.0.0.1", "0.0.0.0", 4, &[]),
            entry("127.0.0.1", "224.0.0.1", 5, &[]),
            entry("127.0.0.1", "", 6379, &[]),
        ]);
        let mut a = parse(&b, false).unwrap();
        assert_eq!(a.host_names(), ["db1.example.org"]);
        let own = OwnAddresses {
            listen: vec!["127.0.0.1:6379".parse().unwrap()],
            local_ips: vec![],
        };
        assert!(a.peers(&own, None).is_empty());
        let l = &a.left;
        assert_eq!(
            (
                l.port_zero,
                l.no_address,
                l.bad_address,
                l.host_no_resolver,
                l.unusable,
                l.own
            ),
            (1, 1, 1, 1, 2, 1)
        );
        assert!(l.needs_attention());
        assert_eq!(
            l.describe(),
            "1 with port 0, 1 without an address, 1 with an invalid address (not an address!), 1 with a host name and no \"resolver=\" to resolve it (db1.example.org), 2 with an address that takes no connections (0.0.0.0:4), 1 pointing at nginx's own listening socket (127.0.0.1:6379)"
        );
        let port_only = Left {
            port_zero: 2,
            ..Left::default()
        };
        assert!(!port_only.needs_attention());
    }

    #[test]
    fn host_names_resolve_to_every_address() {
        let b = body(&[
            entry("10.0.0.1", "db1.example.org", 6380, &[]),
            entry("10.0.0.1", "gone.example.org", 6381, &[]),
        ]);
        let mut a = parse(&b, false).unwrap();
        let mut hosts = HashMap::new();
        hosts.insert(
            "db1.example.org".to_string(),
            vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        );
        let got: Vec<String> = a
            .peers(&OwnAddresses::default(), Some(&hosts))
            .iter()
            .map(|p| p.addr.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.1:6380", "[::1]:6380"]);
        assert_eq!(a.left.host_no_records, 1);
        assert_eq!(
            a.left.host_no_records_example.as_deref(),
            Some("gone.example.org")
        );
    }

    #[test]
    fn duplicate_addresses_merge() {
        let b = body(&[
            entry("127.0.0.1", "", 1, &[]),
            entry("127.0.0.1", "", 1, &[("c", "warning")]),
        ]);
        assert_eq!(peers_of(&b, false), ["127.0.0.1:1 weight=3 priority=1"]);
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for (b, want) in [
            (&b""[..], "malformed answer (EOF while parsing a value at line 1 column 0)"),
            (b"[", "malformed answer (EOF while parsing a list at line 1 column 1)"),
            (b"{}", "malformed answer (invalid type: map, expected a sequence at line 1 column 0)"),
            (b"[{\"Service\":{\"Port\":\"6379\"}}]", "malformed answer (invalid type: string \"6379\", expected i64 at line 1 column 26)"),
            (b"[{\"Service\":{\"Port\":6379.5}}]", "malformed answer (invalid type: floating point `6379.5`, expected i64 at line 1 column 26)"),
            (b"[{\"Node\":{\"Address\":\"127.0.0.1\"}}]", "malformed answer (an entry without \"Service\")"),
            (b"[{\"Service\":{\"Port\":1,\"Port\":2}}]", "malformed answer (duplicate field `Port` at line 1 column 28)"),
            (b"[null]", "malformed answer (invalid type: null, expected struct EntryJson at line 1 column 5)"),
            (b"[] x", "malformed answer (trailing characters at line 1 column 4)"),
            (b"\xff", "malformed answer (expected value at line 1 column 1)"),
        ] {
            assert_eq!(parse(b, false).unwrap_err(), want, "{:?}", String::from_utf8_lossy(b));
        }
        let long = format!("[{{\"Service\":{{\"Address\":\"{}", "a".repeat(500));
        assert!(parse(long.as_bytes(), false).unwrap_err().len() < 140);
        assert_eq!(parse(b"[]", false).unwrap(), HealthAnswer::default());
    }

    #[test]
    fn escaped_strings_decode() {
        let b = br#"[{"Node":{"Address":"127.0.0.\u0031"},"Service":{"Port":1,"Address":""},"Checks":[{"Status":"pass\u0069ng"}]}]"#;
        assert_eq!(peers_of(b, true), ["127.0.0.1:1 weight=1 priority=1"]);
    }

    #[test]
    fn body_cap_grows_with_the_zone() {
        assert_eq!(body_cap(129), 4 << 20);
        assert_eq!(body_cap(1543), 1543 * 16 * 1024);
        assert_eq!(body_cap(usize::MAX), usize::MAX);
    }

    #[test]
    fn three_thousand_instances() {
        let entries: Vec<String> = (0..3000)
            .map(|i| {
                entry(
                    &format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                    "",
                    6379,
                    &[("serfHealth", "passing")],
                )
            })
            .collect();
        let b = body(&entries);
        let mut a = parse(&b, false).unwrap();
        assert_eq!(a.peers(&OwnAddresses::default(), None).len(), 3000);
    }
}
