//! One line's lookup at one resolver as plain bytes, for a caller that owns the
//! sockets and the clock: the SRV query to send, what each response makes of it
//! (A/AAAA follow-ups for targets the answer gives no address for), and the
//! outcome.
//!
//! It asks and reads as the worker's resolver does: hickory-proto's request
//! (recursion desired, EDNS with hickory's payload size), [`SrvAnswer`], nginx's
//! own addresses left out, a failed follow-up failing the whole answer. So the
//! set the master finds before it forks workers (the module's `sync_resolve`
//! drives one exchange per resolver of each line) is the set worker 0's first
//! lookup would find.

use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::{DnsRequest, DnsRequestOptions, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::answer::{normalize, Ignored, OwnAddresses, Record, SrvAnswer};
use crate::message::convert;
use crate::peer::Peer;

/// Follow-up queries in flight at once (A and AAAA for 8 targets, as many as
/// the worker's resolver asks at a time).
pub const FOLLOW_UPS_IN_FLIGHT: usize = 16;

/// What a lookup at one resolver came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Peers {
        peers: Vec<Peer>,
        ignored: Ignored,
    },
    /// NXDOMAIN (`true`) or an answer without records: no healthy instance.
    Empty {
        nxdomain: bool,
    },
    Failed(String),
}

impl Outcome {
    /// An answer: the resolver spoke for the service (failover stops here).
    pub fn is_answer(&self) -> bool {
        !matches!(self, Outcome::Failed(_))
    }
}

/// A query to send: its id and its wire bytes (without TCP's length prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub id: u16,
    pub bytes: Vec<u8>,
}

/// What a received message asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Not an answer to a pending query of this exchange (another id, not a
    /// response, another question): wait on.
    Ignored,
    /// Send these follow-ups (maybe none). The outcome is set once nothing is
    /// pending any more.
    Send(Vec<Outgoing>),
    /// A UDP answer came truncated: ask this again over TCP.
    Truncated(Outgoing),
}

#[derive(Clone, Copy)]
enum Asked {
    Srv,
    Addr { target: usize },
}

struct Pending {
    id: u16,
    name: String,
    rtype: RecordType,
    asked: Asked,
    bytes: Vec<u8>,
}

/// One line's lookup at one resolver.
pub struct Exchange {
    query: String,
    server: SocketAddr,
    next_id: u16,
    pending: Vec<Pending>,
    answer: SrvAnswer,
    targets: Vec<String>,
    asked_targets: usize,
    failed: Vec<String>,
    outcome: Option<Outcome>,
}

impl Exchange {
    /// `query` as the settings hold it (no root dot); ids count up from `first_id`.
    pub fn new(query: &str, server: SocketAddr, first_id: u16) -> Exchange {
        Exchange {
            query: normalize(query),
            server,
            next_id: first_id,
            pending: Vec::new(),
            answer: SrvAnswer::default(),
            targets: Vec::new(),
            asked_targets: 0,
            failed: Vec::new(),
            outcome: None,
        }
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The SRV query; `None` when the name cannot be asked (the outcome says why).
    pub fn start(&mut self) -> Option<Outgoing> {
        let query = self.query.clone();
        match self.ask(&query, RecordType::SRV, Asked::Srv) {
            Ok(out) => Some(out),
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn is_done(&self) -> bool {
        self.outcome.is_some()
    }

    /// The transport failed (refused, closed, timed out): the lookup at this
    /// resolver failed, unless it is already over.
    pub fn fail(&mut self, reason: String) {
        if self.outcome.is_none() {
            self.pending.clear();
            self.outcome = Some(Outcome::Failed(reason));
        }
    }

    /// A message from the resolver; `over_tcp` says how it came.
    pub fn on_message(&mut self, bytes: &[u8], over_tcp: bool, own: &OwnAddresses) -> Next {
        if self.outcome.is_some() {
            return Next::Ignored;
        }
        let msg = match Message::from_vec(bytes) {
            Ok(m) => m,
            // A stray datagram is no reason to give up; a TCP stream out of
            // step is.
            Err(_) if !over_tcp => return Next::Ignored,
            Err(e) => {
                self.fail(format!("malformed answer from {}: {e}", self.server));
                return Next::Send(Vec::new());
            }
        };
        let Some(i) = self.pending.iter().position(|p| {
            p.id == msg.metadata.id
                && msg.metadata.message_type == MessageType::Response
                && msg.queries.len() == 1
                && msg.queries[0].query_type() == p.rtype
                && normalize(&msg.queries[0].name().to_ascii()) == p.name
        }) else {
            return Next::Ignored;
        };
        if msg.metadata.truncation {
            if !over_tcp {
                let p = &self.pending[i];
                return Next::Truncated(Outgoing {
                    id: p.id,
                    bytes: p.bytes.clone(),
                });
            }
            self.fail(format!(
                "{} sent a truncated answer (too large for one DNS message)",
                self.server
            ));
            return Next::Send(Vec::new());
        }
        let asked = self.pending.swap_remove(i).asked;
        let code = msg.metadata.response_code;
        match asked {
            Asked::Srv => match code {
                ResponseCode::NXDomain => self.outcome = Some(Outcome::Empty { nxdomain: true }),
                ResponseCode::NoError if msg.answers.is_empty() => {
                    self.outcome = Some(Outcome::Empty { nxdomain: false })
                }
                ResponseCode::NoError => {
                    let answers: Vec<Record> = msg.answers.iter().map(convert).collect();
                    let additionals: Vec<Record> = msg.additionals.iter().map(convert).collect();
                    self.answer = SrvAnswer::parse(&self.query, &answers, &additionals);
                    if self.answer.srvs.is_empty() && self.answer.ignored.is_empty() {
                        self.outcome = Some(Outcome::Empty { nxdomain: false });
                    } else {
                        self.targets = self.answer.unresolved_targets();
                    }
                }
                code => self.fail(format!(
                    "{} answered {}",
                    self.server,
                    rcode_name(u16::from(code))
                )),
            },
            Asked::Addr { target } => match code {
                // No such name, or no address of this family: no addresses.
                ResponseCode::NoError | ResponseCode::NXDomain => {
                    let ips = msg.answers.iter().filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    });
                    self.answer.add_addresses(&self.targets[target], ips);
                }
                code => {
                    let reason = format!(
                        "{}: {} answered {}",
                        self.targets[target],
                        self.server,
                        rcode_name(u16::from(code))
                    );
                    // Both of a target's queries may fail: one entry per target.
                    if !self
                        .failed
                        .iter()
                        .any(|f| f.starts_with(&format!("{}: ", self.targets[target])))
                    {
                        self.failed.push(reason);
                    }
                }
            },
        }
        if self.outcome.is_some() {
            return Next::Send(Vec::new());
        }
        let more = self.follow_ups();
        if self.pending.is_empty() {
            self.finish(own);
        }
        Next::Send(more)
    }

    /// Queries for the next targets without an address, up to the limit in flight.
    fn follow_ups(&mut self) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while self.pending.len() + 2 <= FOLLOW_UPS_IN_FLIGHT
            && self.asked_targets < self.targets.len()
        {
            let target = self.asked_targets;
            self.asked_targets += 1;
            let name = self.targets[target].clone();
            for rtype in [RecordType::A, RecordType::AAAA] {
                match self.ask(&name, rtype, Asked::Addr { target }) {
                    Ok(q) => out.push(q),
                    Err(e) => {
                        self.failed.push(format!("{name}: {e}"));
                        break;
                    }
                }
            }
        }
        out
    }

    /// The peer set, once every follow-up came back.
    fn finish(&mut self, own: &OwnAddresses) {
        let outcome = if let Some(first) = self.failed.first() {
            // A target whose lookup failed is not a target without an address:
            // the answer is incomplete (the worker's rule, src/resolve.rs).
            Outcome::Failed(format!(
                "resolving {} of {} targets failed ({first})",
                self.failed.len(),
                self.targets.len()
            ))
        } else {
            let peers = self.answer.peers(own);
            if peers.is_empty() {
                Outcome::Failed(format!(
                    "answer has no usable records ({})",
                    self.answer.ignored.describe()
                ))
            } else {
                Outcome::Peers {
                    peers,
                    ignored: self.answer.ignored.clone(),
                }
            }
        };
        self.outcome = Some(outcome);
    }

    fn ask(&mut self, name: &str, rtype: RecordType, asked: Asked) -> Result<Outgoing, String> {
        let dns_name =
            Name::from_ascii(format!("{name}.")).map_err(|e| format!("invalid name: {e}"))?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let bytes = query_bytes(id, dns_name, rtype)?;
        self.pending.push(Pending {
            id,
            name: name.to_string(),
            rtype,
            asked,
            bytes: bytes.clone(),
        });
        Ok(Outgoing { id, bytes })
    }
}

/// A query as hickory's resolver sends it (`DnsRequestOptions::default()`:
/// recursion desired, EDNS), with id `id`.
fn query_bytes(id: u16, name: Name, rtype: RecordType) -> Result<Vec<u8>, String> {
    let request = DnsRequest::from_query(Query::query(name, rtype), DnsRequestOptions::default());
    let (mut msg, _) = request.into_parts();
    msg.metadata.id = id;
    msg.to_vec()
        .map_err(|e| format!("cannot encode the query: {e}"))
}

/// A response code as dig shows it (RFC 1035, 2136).
pub fn rcode_name(code: u16) -> String {
    let name = match code {
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        _ => return format!("rcode {code}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SRV};
    use hickory_proto::rr::Record as DnsRecord;

    const Q: &str = "redis.service.yunlu_office.consul";

    fn server() -> SocketAddr {
        "127.0.0.1:8600".parse().unwrap()
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    /// The response a Consul-like server gives to `query` (parsed back from its bytes).
    fn respond(query: &[u8], build: impl FnOnce(&mut Message)) -> Vec<u8> {
        let q = Message::from_vec(query).unwrap();
        let mut r = Message::response(q.metadata.id, q.metadata.op_code);
        r.metadata.authoritative = true;
        r.add_queries(q.queries.clone());
        build(&mut r);
        r.to_vec().unwrap()
    }

    fn srv(target: &str, port: u16, weight: u16) -> DnsRecord {
        DnsRecord::from_rdata(
            name(&format!("{Q}.")),
            0,
            RData::SRV(SRV::new(1, weight, port, name(target))),
        )
    }

    fn a(owner: &str, ip: [u8; 4]) -> DnsRecord {
        DnsRecord::from_rdata(
            name(owner),
            0,
            RData::A(A::from(std::net::Ipv4Addr::from(ip))),
        )
    }

    fn peers_of(outcome: Option<&Outcome>) -> Vec<String> {
        match outcome {
            Some(Outcome::Peers { peers, .. }) => peers.iter().map(|p| p.to_string()).collect(),
            other => panic!("not peers: {other:?}"),
        }
    }

    #[test]
    fn query_is_what_hickory_sends() {
        let mut x = Exchange::new(Q, server(), 7);
        let q = x.start().unwrap();
        let msg = Message::from_vec(&q.bytes).unwrap();
        assert_eq!(msg.metadata.id, 7);
        assert!(msg.metadata.recursion_desired);
        assert_eq!(msg.queries[0].query_type(), RecordType::SRV);
        assert_eq!(msg.queries[0].name().to_ascii(), format!("{Q}."));
        assert_eq!(msg.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    }

    #[test]
    fn answer_with_additional_gives_peers_at_once() {
        let mut x = Exchange::new(Q, server(), 1);
        let q = x.start().unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("7f000001.addr.yunlu_office.consul.", 6380, 3));
            r.add_answer(srv("node2.node.yunlu_office.consul.", 6381, 1));
            r.add_additional(a("node2.node.yunlu_office.consul.", [127, 0, 0, 2]));
        });
        assert_eq!(
            x.on_message(&r, true, &OwnAddresses::default()),
            Next::Send(vec![])
        );
        assert_eq!(
            peers_of(x.outcome()),
            [
                "127.0.0.1:6380 weight=3 priority=1",
                "127.0.0.2:6381 weight=1 priority=1"
            ]
        );
    }

    #[test]
    fn follow_ups_for_targets_without_address() {
        let mut x = Exchange::new(Q, server(), 100);
        let q = x.start().unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("node1.node.yunlu_office.consul.", 6380, 1));
        });
        let Next::Send(follow) = x.on_message(&r, true, &OwnAddresses::default()) else {
            panic!("follow-ups expected");
        };
        assert_eq!(follow.len(), 2, "A and AAAA");
        assert!(!x.is_done());
        // A stray answer with another id changes nothing.
        assert_eq!(
            x.on_message(&r, true, &OwnAddresses::default()),
            Next::Ignored
        );
        for f in &follow {
            let msg = Message::from_vec(&f.bytes).unwrap();
            let ans = respond(&f.bytes, |r| {
                if msg.queries[0].query_type() == RecordType::A {
                    r.add_answer(a("node1.node.yunlu_office.consul.", [127, 0, 0, 9]));
                }
            });
            x.on_message(&ans, true, &OwnAddresses::default());
        }
        assert_eq!(
            peers_of(x.outcome()),
            ["127.0.0.9:6380 weight=1 priority=1"]
        );
    }

    #[test]
    fn failed_follow_up_fails_the_answer() {
        let mut x = Exchange::new(Q, server(), 1);
        let q = x.start().unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("node1.node.yunlu_office.consul.", 6380, 1));
        });
        let Next::Send(follow) = x.on_message(&r, true, &OwnAddresses::default()) else {
            panic!()
        };
        for f in &follow {
            let ans = respond(&f.bytes, |r| {
                r.metadata.response_code = ResponseCode::ServFail
            });
            x.on_message(&ans, true, &OwnAddresses::default());
        }
        assert_eq!(
            x.outcome(),
            Some(&Outcome::Failed(
                "resolving 1 of 1 targets failed (node1.node.yunlu_office.consul: 127.0.0.1:8600 answered SERVFAIL)".into()
            ))
        );
    }

    #[test]
    fn many_targets_are_asked_a_few_at_a_time() {
        let mut x = Exchange::new(Q, server(), 1);
        let q = x.start().unwrap();
        let r = respond(&q.bytes, |r| {
            for i in 0..20 {
                r.add_answer(srv(&format!("n{i}.node.dc.consul."), 6380, 1));
            }
        });
        let own = OwnAddresses::default();
        let Next::Send(mut queue) = x.on_message(&r, true, &own) else {
            panic!()
        };
        assert_eq!(queue.len(), FOLLOW_UPS_IN_FLIGHT);
        let mut asked = 0;
        while let Some(f) = queue.pop() {
            asked += 1;
            let msg = Message::from_vec(&f.bytes).unwrap();
            let owner = msg.queries[0].name().to_ascii();
            let ans = respond(&f.bytes, |r| {
                if msg.queries[0].query_type() == RecordType::A {
                    r.add_answer(a(&owner, [127, 0, 0, 1]));
                }
            });
            if let Next::Send(more) = x.on_message(&ans, true, &own) {
                queue.extend(more);
            }
        }
        assert_eq!(asked, 40);
        assert_eq!(
            peers_of(x.outcome()).len(),
            1,
            "20 targets at one address: one peer"
        );
    }

    #[test]
    fn empty_answers_and_errors() {
        let own = OwnAddresses::default();
        let mut x = Exchange::new(Q, server(), 1);
        let q = x.start().unwrap();
        x.on_message(
            &respond(&q.bytes, |r| {
                r.metadata.response_code = ResponseCode::NXDomain
            }),
            true,
            &own,
        );
        assert_eq!(x.outcome(), Some(&Outcome::Empty { nxdomain: true }));

        let mut x = Exchange::new(Q, server(), 1);
        let q = x.start().unwrap();
        x.on_message(&respond(&q.bytes, |_| {}), true, &own);
        assert_eq!(x.outcome(), Some(&Outcome::Empty { nxdomain: false }));

        let mut x = Exchange::new(Q, server(), 1);
        let q = x.start().unwrap();
        x.on_message(
            &respond(&q.bytes, |r| {
                r.metadata.response_code = ResponseCode::Refused
            }),
            true,
            &own,
        );
        assert_eq!(
            x.outcome(),
            Some(&Outcome::Failed("127.0.0.1:8600 answered REFUSED".into()))
        );
        assert!(!x.outcome().unwrap().is_answer());
    }

    #[test]
    fn truncation_over_udp_asks_again_over_tcp() {
        let own = OwnAddresses::default();
        let mut x = Exchange::new(Q, server(), 1);
        let q = x.start().unwrap();
        let tc = respond(&q.bytes, |r| r.metadata.truncation = true);
        assert_eq!(x.on_message(&tc, false, &own), Next::Truncated(q.clone()));
        assert!(!x.is_done());
        assert_eq!(x.on_message(&tc, true, &own), Next::Send(vec![]));
        assert!(matches!(x.outcome(), Some(Outcome::Failed(r)) if r.contains("truncated")));
    }

    #[test]
    fn hostile_messages_are_not_answers() {
        let own = OwnAddresses::default();
        let mut x = Exchange::new(Q, server(), 1);
        let q = x.start().unwrap();
        // Another question under the right id.
        let mut other = Exchange::new("other.service.consul", server(), 1);
        let oq = other.start().unwrap();
        let wrong = respond(&oq.bytes, |r| {
            r.add_answer(srv("7f000001.addr.dc.consul.", 1, 1));
        });
        assert_eq!(x.on_message(&wrong, true, &own), Next::Ignored);
        // The query itself echoed back (not a response).
        assert_eq!(x.on_message(&q.bytes, true, &own), Next::Ignored);
        // Garbage: ignored over UDP, fatal over TCP.
        assert_eq!(x.on_message(b"\x00\x01garbage", false, &own), Next::Ignored);
        assert!(!x.is_done());
        x.on_message(b"\x00\x01garbage", true, &own);
        assert!(
            matches!(x.outcome(), Some(Outcome::Failed(r)) if r.starts_with("malformed answer"))
        );
    }

    #[test]
    fn own_addresses_are_left_out() {
        let own = OwnAddresses {
            listen: vec!["127.0.0.1:6380".parse().unwrap()],
            ..OwnAddresses::default()
        };
        let mut x = Exchange::new(Q, server(), 1);
        let q = x.start().unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("7f000001.addr.yunlu_office.consul.", 6380, 1));
        });
        x.on_message(&r, true, &own);
        assert!(
            matches!(x.outcome(), Some(Outcome::Failed(r)) if r.starts_with("answer has no usable records"))
        );
    }
}
