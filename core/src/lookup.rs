//! One line's DNS lookup: the rules by which both of the module's DNS clients
//! read Consul's answers, and the lookup as plain bytes in and out.
//!
//! Two clients ask Consul's DNS interface. Worker 0's is asynchronous, on
//! nginx's event loop, over the connections the cycle shares between lines
//! (`src/resolve.rs` over `src/dns_client.rs`). The master's runs once before
//! it forks workers, with no event loop and no thread: one poll loop
//! (`src/sync_resolve.rs`) driving [`SrvLookup`], the same lookup as bytes in
//! and out. Whatever carried the messages, both read them with the rules here,
//! so the same answers make the same set, warning and status in either:
//! - [`request`]: the query as hickory's resolver builds it (recursion desired,
//!   EDNS with hickory's payload size); [`answers_question`]: a response to
//!   another question is no answer;
//! - [`udp_answer_needs_tcp`]: a UDP answer with TC set, or one that fills the
//!   size the query offered (Consul trims by size, and sets TC only with
//!   `enable_truncate`), is asked again over TCP;
//! - [`read_srv`]: NXDOMAIN or no records is an empty answer; another response
//!   code, or a truncated answer without records, fails at this resolver (the
//!   next one is asked, [`Failover`]); records are an answer, with a
//!   [`Truncation`] when it may not carry every instance (TC over TCP: what
//!   came is published, with a warning);
//! - [`read_addresses`], [`FollowUp::of`]: the follow-up A and AAAA queries
//!   for a target the answer gives no address for — a refusal, no such name or
//!   no address records leave that target's instances out (saying why); any
//!   other failure fails the whole answer ([`Found::finish`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::{DnsRequest, DnsRequestOptions, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use crate::answer::{
    by_name, chain_addresses, may_be_trimmed, Ignored, OwnAddresses, Record, RecordData, SrvAnswer,
};
use crate::message::convert;
use crate::peer::Peer;

/// What one line's lookup came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    Peers {
        peers: Vec<Peer>,
        ignored: Ignored,
        truncated: Option<Truncation>,
    },
    /// NXDOMAIN (`true`) or an answer without records: no healthy instance.
    Empty {
        nxdomain: bool,
    },
    Failed(String),
}

/// Why an answer may lack instances that Consul knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truncation {
    /// TC set: the server trimmed the answer to fit one message.
    Tc,
    /// No TC, but the answer is as large as Consul sends (1,024 SRV records,
    /// or a message near 64 KiB): Consul trims without TC unless
    /// `enable_truncate` is on.
    Full,
}

/// A DNS name from a query or a target as the settings or an answer hold it
/// (with or without the root dot).
pub fn dns_name(name: &str) -> Result<Name, String> {
    Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
        .map_err(|e| format!("invalid name: {e}"))
}

/// The query as hickory's resolver sends it (`DnsRequestOptions::default()`:
/// recursion desired, EDNS with its payload size, which an answer over UDP may
/// fill).
pub fn request(name: Name, rtype: RecordType) -> DnsRequest {
    DnsRequest::from_query(Query::query(name, rtype), DnsRequestOptions::default())
}

/// Whether `msg` answers the question `asked` (a query's, one question) and
/// nothing else: an answer to another question is a confused or forged one.
pub fn answers_question(msg: &Message, asked: &[Query]) -> bool {
    match (msg.queries.as_slice(), asked) {
        ([got], [want]) => {
            got.name() == want.name()
                && got.query_type() == want.query_type()
                && got.query_class() == want.query_class()
        }
        _ => false,
    }
}

/// Whether a UDP answer of `bytes` is asked again over TCP: TC set, or as large
/// as the `offered` size (Consul trims to it by dropping instances, and sets TC
/// only with `enable_truncate`; a datagram larger than offered may be cut).
pub fn udp_answer_needs_tcp(tc: bool, bytes: usize, offered: usize) -> bool {
    tc || may_be_trimmed(0, bytes, false, offered)
}

/// What one resolver's answer to the SRV query says.
#[derive(Debug)]
pub enum SrvReply {
    /// No instance: the resolver spoke for the service.
    Empty { nxdomain: bool },
    /// This resolver failed (another response code, or a truncated answer
    /// without records): the next one is asked.
    Failed(String),
    /// Records: follow-ups for the targets without an address, then
    /// [`Found::finish`].
    Found(Box<Found>),
}

/// The SRV answer of `server` to `query` (`bytes` long; over TCP or UDP).
pub fn read_srv(
    query: &str,
    server: &SocketAddr,
    msg: &Message,
    bytes: usize,
    over_tcp: bool,
) -> SrvReply {
    let tc = msg.metadata.truncation;
    match msg.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return SrvReply::Empty { nxdomain: true },
        code => {
            return SrvReply::Failed(format!("{server} answered {}", rcode_name(u16::from(code))))
        }
    }
    if msg.answers.is_empty() {
        if tc {
            return SrvReply::Failed(format!("{server} sent a truncated answer without records"));
        }
        return SrvReply::Empty { nxdomain: false };
    }
    let answers: Vec<Record> = msg.answers.iter().map(convert).collect();
    let additionals: Vec<Record> = msg.additionals.iter().map(convert).collect();
    let srv_records = answers
        .iter()
        .filter(|r| matches!(r.data, RecordData::Srv { .. }))
        .count();
    let truncated = if tc {
        Some(Truncation::Tc)
    } else if over_tcp && may_be_trimmed(srv_records, bytes, true, 0) {
        Some(Truncation::Full)
    } else {
        None
    };
    let answer = SrvAnswer::parse(query, &answers, &additionals);
    if answer.srvs.is_empty() && answer.ignored.is_empty() {
        return SrvReply::Empty { nxdomain: false };
    }
    SrvReply::Found(Box::new(Found {
        targets: answer.unresolved_targets(),
        answer,
        failed: Vec::new(),
        truncated,
    }))
}

/// An SRV answer with records, waiting for its targets' follow-ups.
#[derive(Debug)]
pub struct Found {
    answer: SrvAnswer,
    targets: Vec<String>,
    failed: Vec<String>,
    truncated: Option<Truncation>,
}

impl Found {
    /// The targets without an address, each to be looked up once.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// What the follow-up for `target` found.
    pub fn follow_up(&mut self, target: &str, result: FollowUp) {
        match result {
            FollowUp::Found(ips) => self.answer.add_addresses(target, ips),
            FollowUp::NoAddress(why) => self.answer.no_address(target, &why),
            FollowUp::Failed(e) => self.failed.push(format!("{target}: {e}")),
        }
    }

    /// The peer set, once every target's follow-up came back.
    pub fn finish(mut self, own: &OwnAddresses) -> Resolved {
        // A target whose lookup failed is not a target without an address: the
        // answer is incomplete, and publishing it would drop healthy instances.
        if let Some(first) = self.failed.first() {
            return Resolved::Failed(format!(
                "resolving {} of {} targets failed ({first})",
                self.failed.len(),
                self.targets.len()
            ));
        }
        let peers = self.answer.peers(own);
        if peers.is_empty() {
            return Resolved::Failed(format!(
                "answer has no usable records ({})",
                self.answer.ignored.describe()
            ));
        }
        Resolved::Peers {
            peers,
            ignored: self.answer.ignored,
            truncated: self.truncated,
        }
    }
}

/// One follow-up answer (A or AAAA) for a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrReply {
    /// Its addresses (maybe none: the name has no records of this family).
    Found(Vec<IpAddr>),
    /// A definitive answer without an address, ranked by what it says.
    NoAddress { rank: u8, why: String },
    /// A failure that may pass (timeout, SERVFAIL, lost connection).
    Failed(String),
}

/// `server`'s answer to a follow-up for `target`: its addresses, through a
/// CNAME chain in the answer.
pub fn read_addresses(target: &str, server: &SocketAddr, msg: &Message) -> AddrReply {
    match msg.metadata.response_code {
        ResponseCode::NoError => {
            let records: Vec<Record> = msg.answers.iter().map(convert).collect();
            AddrReply::Found(chain_addresses(target, &by_name(&records)))
        }
        // A refusal says more than a missing name.
        ResponseCode::NXDomain => AddrReply::NoAddress {
            rank: 1,
            why: format!("{server} answered NXDOMAIN"),
        },
        ResponseCode::Refused => AddrReply::NoAddress {
            rank: 2,
            why: format!("{server} answered REFUSED"),
        },
        code => AddrReply::Failed(format!("{server} answered {}", rcode_name(u16::from(code)))),
    }
}

/// What the follow-up lookups (A and AAAA) for one target found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FollowUp {
    Found(Vec<IpAddr>),
    /// A definitive answer without an address (refused, no such name, no
    /// address records): the target's instances are left out, saying why.
    NoAddress(String),
    /// A failure that may pass: the whole answer fails and the line keeps its set.
    Failed(String),
}

impl FollowUp {
    /// The target's result from its A and AAAA answers (in that order): the
    /// first failure, else the addresses, else the strongest reason there are none.
    pub fn of(replies: [AddrReply; 2]) -> FollowUp {
        let mut ips = Vec::new();
        let mut why = (0, String::from("no A or AAAA records"));
        for reply in replies {
            match reply {
                AddrReply::Failed(e) => return FollowUp::Failed(e),
                AddrReply::Found(found) => ips.extend(found),
                AddrReply::NoAddress { rank, why: w } => {
                    if rank > why.0 {
                        why = (rank, w);
                    }
                }
            }
        }
        if ips.is_empty() {
            FollowUp::NoAddress(why.1)
        } else {
            FollowUp::Found(ips)
        }
    }
}

/// A line's resolvers in order: the first that answers (even NXDOMAIN, or an
/// answer that failed) gives the line's result; failures move on to the next.
#[derive(Default)]
pub struct Failover {
    reasons: Vec<String>,
}

impl Failover {
    /// A resolver failed for `reason`.
    pub fn failed(&mut self, reason: String) {
        self.reasons.push(reason);
    }

    /// Every resolver failed: the line's result, naming each reason.
    pub fn result(mut self) -> Resolved {
        if self.reasons.is_empty() {
            self.reasons.push("no usable resolver".into());
        }
        Resolved::Failed(self.reasons.join(", "))
    }
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

/// Follow-up queries in flight at once for one lookup (A and AAAA for 8
/// targets, as many as worker 0 asks at a time).
pub const FOLLOW_UPS_IN_FLIGHT: usize = 16;

/// Query ids for the lookups that share a connection: each query its own, as
/// long as fewer than 65,536 are in flight.
pub struct QueryIds {
    next: u16,
}

impl QueryIds {
    /// Ids from `first` on (a random start, as any resolver's: a stray
    /// datagram must not pass for an answer).
    pub fn new(first: u16) -> QueryIds {
        QueryIds { next: first }
    }

    fn take(&mut self) -> u16 {
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        id
    }
}

/// What a lookup at one resolver came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The resolver answered: the line's result (failover stops here).
    Answer(Resolved),
    /// It did not (transport, response code): the next resolver's answer counts.
    Failed(String),
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
    /// Not an answer to a pending query of this lookup (another id, not a
    /// response, another question): wait on.
    Ignored,
    /// Send these follow-ups (maybe none). The outcome is set once nothing is
    /// pending any more.
    Send(Vec<Outgoing>),
    /// An answer over UDP that goes to TCP ([`udp_answer_needs_tcp`]): send
    /// this query again over TCP.
    AgainOverTcp(Outgoing),
}

#[derive(Clone, Copy, Debug)]
enum Asked {
    Srv,
    /// A follow-up for target `target`: A (family 0) or AAAA (1).
    Addr {
        target: usize,
        family: usize,
    },
}

struct Pending {
    id: u16,
    question: Vec<Query>,
    asked: Asked,
    offered: usize,
    bytes: Vec<u8>,
}

/// One line's lookup at one resolver, for a caller that owns the sockets and
/// the clock: the SRV query, then follow-ups, read with the rules above.
pub struct SrvLookup {
    query: String,
    server: SocketAddr,
    pending: Vec<Pending>,
    found: Option<Box<Found>>,
    targets: Vec<String>,
    asked_targets: usize,
    /// Follow-up answers of targets still waiting for their other family.
    halves: HashMap<usize, [Option<AddrReply>; 2]>,
    outcome: Option<Outcome>,
}

impl SrvLookup {
    /// `query` as the settings hold it (no root dot).
    pub fn new(query: &str, server: SocketAddr) -> SrvLookup {
        SrvLookup {
            query: query.to_string(),
            server,
            pending: Vec::new(),
            found: None,
            targets: Vec::new(),
            asked_targets: 0,
            halves: HashMap::new(),
            outcome: None,
        }
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The SRV query; `None` when the name cannot be asked (the outcome says why).
    pub fn start(&mut self, ids: &mut QueryIds) -> Option<Outgoing> {
        let name = match dns_name(&self.query) {
            Ok(n) => n,
            Err(e) => {
                self.outcome = Some(Outcome::Answer(Resolved::Failed(e)));
                return None;
            }
        };
        match self.ask(ids, name, RecordType::SRV, Asked::Srv) {
            Ok(q) => Some(q),
            Err(e) => {
                self.outcome = Some(Outcome::Failed(e));
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

    /// Whether a query with this id waits for its answer.
    pub fn awaits(&self, id: u16) -> bool {
        self.pending.iter().any(|p| p.id == id)
    }

    /// The queries still waiting for an answer (to ask again on a new
    /// connection after the server closed one).
    pub fn pending(&self) -> Vec<Outgoing> {
        self.pending
            .iter()
            .map(|p| Outgoing {
                id: p.id,
                bytes: p.bytes.clone(),
            })
            .collect()
    }

    /// The transport failed (refused, closed, timed out) for what is pending:
    /// before the SRV answer, the lookup at this resolver failed; after it, the
    /// targets still waiting failed, and so does the answer, as in worker 0.
    pub fn fail(&mut self, reason: String, own: &OwnAddresses) {
        if self.outcome.is_some() {
            return;
        }
        let Some(mut found) = self.found.take() else {
            self.pending.clear();
            self.outcome = Some(Outcome::Failed(reason));
            return;
        };
        let mut waiting: Vec<usize> = self
            .pending
            .drain(..)
            .filter_map(|p| match p.asked {
                Asked::Addr { target, .. } => Some(target),
                Asked::Srv => None,
            })
            .chain(self.asked_targets..self.targets.len())
            .collect();
        waiting.sort_unstable();
        waiting.dedup();
        for t in waiting {
            found.follow_up(&self.targets[t], FollowUp::Failed(reason.clone()));
        }
        self.halves.clear();
        self.asked_targets = self.targets.len();
        self.outcome = Some(Outcome::Answer(found.finish(own)));
    }

    /// A message from the resolver; `over_tcp` says how it came.
    pub fn on_message(
        &mut self,
        bytes: &[u8],
        over_tcp: bool,
        own: &OwnAddresses,
        ids: &mut QueryIds,
    ) -> Next {
        if self.outcome.is_some() {
            return Next::Ignored;
        }
        let msg = match Message::from_vec(bytes) {
            Ok(m) => m,
            // A stray datagram is no reason to give up; a TCP stream out of
            // step is.
            Err(_) if !over_tcp => return Next::Ignored,
            Err(e) => {
                self.fail(format!("{e} from {}", self.server), own);
                return Next::Send(Vec::new());
            }
        };
        let Some(i) = self.pending.iter().position(|p| {
            p.id == msg.metadata.id
                && msg.metadata.message_type == MessageType::Response
                && answers_question(&msg, &p.question)
        }) else {
            return Next::Ignored;
        };
        let p = &self.pending[i];
        if !over_tcp && udp_answer_needs_tcp(msg.metadata.truncation, bytes.len(), p.offered) {
            return Next::AgainOverTcp(Outgoing {
                id: p.id,
                bytes: p.bytes.clone(),
            });
        }
        let asked = self.pending.swap_remove(i).asked;
        match asked {
            Asked::Srv => match read_srv(&self.query, &self.server, &msg, bytes.len(), over_tcp) {
                SrvReply::Empty { nxdomain } => {
                    self.outcome = Some(Outcome::Answer(Resolved::Empty { nxdomain }))
                }
                SrvReply::Failed(why) => self.outcome = Some(Outcome::Failed(why)),
                SrvReply::Found(found) => {
                    self.targets = found.targets().to_vec();
                    self.found = Some(found);
                }
            },
            Asked::Addr { target, family } => {
                let reply = read_addresses(&self.targets[target], &self.server, &msg);
                self.answered(target, family, reply);
            }
        }
        if self.outcome.is_some() {
            return Next::Send(Vec::new());
        }
        let more = self.follow_ups(ids);
        if self.pending.is_empty() {
            if let Some(found) = self.found.take() {
                self.outcome = Some(Outcome::Answer(found.finish(own)));
            }
        }
        Next::Send(more)
    }

    /// One of a target's follow-up answers; with both, the target's result.
    fn answered(&mut self, target: usize, family: usize, reply: AddrReply) {
        let halves = self.halves.entry(target).or_default();
        halves[family] = Some(reply);
        if let [Some(_), Some(_)] = halves {
            let [Some(a), Some(aaaa)] = self.halves.remove(&target).unwrap_or_default() else {
                return;
            };
            if let Some(found) = self.found.as_mut() {
                found.follow_up(&self.targets[target], FollowUp::of([a, aaaa]));
            }
        }
    }

    /// Queries for the next targets without an address, up to the limit in flight.
    fn follow_ups(&mut self, ids: &mut QueryIds) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while self.pending.len() + 2 <= FOLLOW_UPS_IN_FLIGHT
            && self.asked_targets < self.targets.len()
        {
            let target = self.asked_targets;
            self.asked_targets += 1;
            let name = match dns_name(&self.targets[target]) {
                Ok(n) => n,
                Err(e) => {
                    if let Some(found) = self.found.as_mut() {
                        found.follow_up(&self.targets[target], FollowUp::NoAddress(e));
                    }
                    continue;
                }
            };
            for (family, rtype) in [RecordType::A, RecordType::AAAA].into_iter().enumerate() {
                match self.ask(ids, name.clone(), rtype, Asked::Addr { target, family }) {
                    Ok(q) => out.push(q),
                    Err(e) => self.answered(target, family, AddrReply::Failed(e)),
                }
            }
        }
        out
    }

    fn ask(
        &mut self,
        ids: &mut QueryIds,
        name: Name,
        rtype: RecordType,
        asked: Asked,
    ) -> Result<Outgoing, String> {
        let request = request(name, rtype);
        let offered = usize::from(request.max_payload());
        let (mut msg, _) = request.into_parts();
        let id = ids.take();
        msg.metadata.id = id;
        let bytes = msg
            .to_vec()
            .map_err(|e| format!("cannot encode the query: {e}"))?;
        self.pending.push(Pending {
            id,
            question: msg.queries.clone(),
            asked,
            offered,
            bytes: bytes.clone(),
        });
        Ok(Outgoing { id, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, CNAME, SRV};
    use hickory_proto::rr::{RData, Record as DnsRecord};

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
            Some(Outcome::Answer(Resolved::Peers { peers, .. })) => {
                peers.iter().map(|p| p.to_string()).collect()
            }
            other => panic!("not peers: {other:?}"),
        }
    }

    fn failed_answer(outcome: Option<&Outcome>) -> String {
        match outcome {
            Some(Outcome::Answer(Resolved::Failed(why))) => why.clone(),
            other => panic!("not a failed answer: {other:?}"),
        }
    }

    /// Answers every follow-up of `queue` (and those they lead to) with `answer`.
    fn answer_follow_ups(
        x: &mut SrvLookup,
        mut queue: Vec<Outgoing>,
        ids: &mut QueryIds,
        answer: impl Fn(&Message, &mut Message),
    ) -> usize {
        let own = OwnAddresses::default();
        let mut asked = 0;
        while let Some(f) = queue.pop() {
            asked += 1;
            let msg = Message::from_vec(&f.bytes).unwrap();
            let ans = respond(&f.bytes, |r| answer(&msg, r));
            if let Next::Send(more) = x.on_message(&ans, true, &own, ids) {
                queue.extend(more);
            }
        }
        asked
    }

    #[test]
    fn query_is_what_hickory_sends() {
        let mut ids = QueryIds::new(7);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let msg = Message::from_vec(&q.bytes).unwrap();
        assert_eq!(msg.metadata.id, 7);
        assert!(msg.metadata.recursion_desired);
        assert_eq!(msg.queries[0].query_type(), RecordType::SRV);
        assert_eq!(msg.queries[0].name().to_ascii(), format!("{Q}."));
        assert_eq!(msg.edns.as_ref().map(|e| e.max_payload()), Some(1232));
        assert!(x.awaits(7) && !x.awaits(8));
    }

    #[test]
    fn answer_with_additional_gives_peers_at_once() {
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("7f000001.addr.yunlu_office.consul.", 6380, 3));
            r.add_answer(srv("node2.node.yunlu_office.consul.", 6381, 1));
            r.add_additional(a("node2.node.yunlu_office.consul.", [127, 0, 0, 2]));
        });
        assert_eq!(
            x.on_message(&r, true, &OwnAddresses::default(), &mut ids),
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
        let mut ids = QueryIds::new(100);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("node1.node.yunlu_office.consul.", 6380, 1));
        });
        let own = OwnAddresses::default();
        let Next::Send(follow) = x.on_message(&r, true, &own, &mut ids) else {
            panic!("follow-ups expected");
        };
        assert_eq!(follow.len(), 2, "A and AAAA");
        assert!(!x.is_done());
        // A stray answer with another id changes nothing.
        assert_eq!(x.on_message(&r, true, &own, &mut ids), Next::Ignored);
        // The A answer through a CNAME chain, as worker 0 follows it.
        answer_follow_ups(&mut x, follow, &mut ids, |q, r| {
            if q.queries[0].query_type() == RecordType::A {
                r.add_answer(DnsRecord::from_rdata(
                    name("node1.node.yunlu_office.consul."),
                    0,
                    RData::CNAME(CNAME(name("real.example.org."))),
                ));
                r.add_answer(a("real.example.org.", [127, 0, 0, 9]));
            }
        });
        assert_eq!(
            peers_of(x.outcome()),
            ["127.0.0.9:6380 weight=1 priority=1"]
        );
    }

    #[test]
    fn a_failed_follow_up_fails_the_answer() {
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("node1.node.yunlu_office.consul.", 6380, 1));
        });
        let Next::Send(follow) = x.on_message(&r, true, &OwnAddresses::default(), &mut ids) else {
            panic!()
        };
        answer_follow_ups(&mut x, follow, &mut ids, |_, r| {
            r.metadata.response_code = ResponseCode::ServFail
        });
        assert_eq!(
            failed_answer(x.outcome()),
            "resolving 1 of 1 targets failed (node1.node.yunlu_office.consul: 127.0.0.1:8600 answered SERVFAIL)"
        );
    }

    #[test]
    fn a_refused_or_missing_target_drops_only_its_instances() {
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("db.example.org.", 6380, 1));
            r.add_answer(srv("gone.node.yunlu_office.consul.", 6381, 1));
            r.add_answer(srv("7f000002.addr.yunlu_office.consul.", 6382, 1));
        });
        let Next::Send(follow) = x.on_message(&r, true, &OwnAddresses::default(), &mut ids) else {
            panic!()
        };
        assert_eq!(follow.len(), 4);
        answer_follow_ups(&mut x, follow, &mut ids, |q, r| {
            r.metadata.response_code = if q.queries[0].name().to_ascii().starts_with("db.") {
                ResponseCode::Refused
            } else {
                ResponseCode::NXDomain
            }
        });
        let Some(Outcome::Answer(Resolved::Peers { peers, ignored, .. })) = x.outcome() else {
            panic!("{:?}", x.outcome())
        };
        assert_eq!(peers.len(), 1);
        assert_eq!(ignored.unresolved, 2);
        assert_eq!(
            ignored.unresolved_example.as_deref(),
            Some("db.example.org:6380: 127.0.0.1:8600 answered REFUSED")
        );
    }

    #[test]
    fn many_targets_are_asked_a_few_at_a_time() {
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let r = respond(&q.bytes, |r| {
            for i in 0..20 {
                r.add_answer(srv(&format!("n{i}.node.dc.consul."), 6380, 1));
            }
        });
        let Next::Send(queue) = x.on_message(&r, true, &OwnAddresses::default(), &mut ids) else {
            panic!()
        };
        assert_eq!(queue.len(), FOLLOW_UPS_IN_FLIGHT);
        let asked = answer_follow_ups(&mut x, queue, &mut ids, |q, r| {
            if q.queries[0].query_type() == RecordType::A {
                r.add_answer(a(&q.queries[0].name().to_ascii(), [127, 0, 0, 1]));
            }
        });
        assert_eq!(asked, 40);
        assert_eq!(
            peers_of(x.outcome()).len(),
            1,
            "20 targets at one address: one peer"
        );
    }

    #[test]
    fn a_transport_failure_after_the_answer_fails_the_answer() {
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("node1.node.yunlu_office.consul.", 6380, 1));
            r.add_answer(srv("node2.node.yunlu_office.consul.", 6380, 1));
        });
        let Next::Send(follow) = x.on_message(&r, true, &OwnAddresses::default(), &mut ids) else {
            panic!()
        };
        assert_eq!(x.pending().len(), follow.len());
        x.fail("127.0.0.1:8600 timed out".into(), &OwnAddresses::default());
        assert_eq!(
            failed_answer(x.outcome()),
            "resolving 2 of 2 targets failed (node1.node.yunlu_office.consul: 127.0.0.1:8600 timed out)"
        );
        // Before the answer, the resolver failed: the next one is asked.
        let mut x = SrvLookup::new(Q, server());
        x.start(&mut ids).unwrap();
        x.fail(
            "cannot connect to 127.0.0.1:8600".into(),
            &OwnAddresses::default(),
        );
        assert_eq!(
            x.outcome(),
            Some(&Outcome::Failed("cannot connect to 127.0.0.1:8600".into()))
        );
    }

    #[test]
    fn empty_answers_and_errors() {
        let own = OwnAddresses::default();
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        x.on_message(
            &respond(&q.bytes, |r| {
                r.metadata.response_code = ResponseCode::NXDomain
            }),
            true,
            &own,
            &mut ids,
        );
        assert_eq!(
            x.outcome(),
            Some(&Outcome::Answer(Resolved::Empty { nxdomain: true }))
        );

        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        x.on_message(&respond(&q.bytes, |_| {}), true, &own, &mut ids);
        assert_eq!(
            x.outcome(),
            Some(&Outcome::Answer(Resolved::Empty { nxdomain: false }))
        );

        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        x.on_message(
            &respond(&q.bytes, |r| {
                r.metadata.response_code = ResponseCode::Refused
            }),
            true,
            &own,
            &mut ids,
        );
        assert_eq!(
            x.outcome(),
            Some(&Outcome::Failed("127.0.0.1:8600 answered REFUSED".into()))
        );
    }

    #[test]
    fn udp_answers_that_may_be_trimmed_go_to_tcp() {
        let own = OwnAddresses::default();
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let tc = respond(&q.bytes, |r| r.metadata.truncation = true);
        assert_eq!(
            x.on_message(&tc, false, &own, &mut ids),
            Next::AgainOverTcp(q.clone())
        );
        // No TC, but as large as the query offered (Consul trims by size).
        let full = respond(&q.bytes, |r| {
            for i in 0..40 {
                r.add_answer(srv(&format!("{i:08x}.addr.yunlu_office.consul."), 6380, 1));
            }
        });
        assert!(full.len() + 256 > 1232, "{} bytes", full.len());
        assert_eq!(
            x.on_message(&full, false, &own, &mut ids),
            Next::AgainOverTcp(q.clone())
        );
        assert!(!x.is_done());
        // Over TCP, TC without records: this resolver failed.
        assert_eq!(x.on_message(&tc, true, &own, &mut ids), Next::Send(vec![]));
        assert_eq!(
            x.outcome(),
            Some(&Outcome::Failed(
                "127.0.0.1:8600 sent a truncated answer without records".into()
            ))
        );
    }

    #[test]
    fn tc_over_tcp_publishes_what_came() {
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let r = respond(&q.bytes, |r| {
            r.metadata.truncation = true;
            r.add_answer(srv("7f000001.addr.yunlu_office.consul.", 6380, 1));
        });
        x.on_message(&r, true, &OwnAddresses::default(), &mut ids);
        let Some(Outcome::Answer(Resolved::Peers {
            peers, truncated, ..
        })) = x.outcome()
        else {
            panic!("{:?}", x.outcome())
        };
        assert_eq!(peers.len(), 1);
        assert_eq!(*truncated, Some(Truncation::Tc));
    }

    #[test]
    fn hostile_messages_are_not_answers() {
        let own = OwnAddresses::default();
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        // Another question under the right id.
        let mut other = SrvLookup::new("other.service.consul", server());
        let oq = other.start(&mut QueryIds::new(1)).unwrap();
        let wrong = respond(&oq.bytes, |r| {
            r.add_answer(srv("7f000001.addr.dc.consul.", 1, 1));
        });
        assert_eq!(x.on_message(&wrong, true, &own, &mut ids), Next::Ignored);
        // The query itself echoed back (not a response).
        assert_eq!(x.on_message(&q.bytes, true, &own, &mut ids), Next::Ignored);
        // Garbage: ignored over UDP, fatal over TCP.
        assert_eq!(
            x.on_message(b"\x00\x01garbage", false, &own, &mut ids),
            Next::Ignored
        );
        assert!(!x.is_done());
        x.on_message(b"\x00\x01garbage", true, &own, &mut ids);
        assert!(
            matches!(x.outcome(), Some(Outcome::Failed(r)) if r.ends_with("from 127.0.0.1:8600"))
        );
    }

    #[test]
    fn own_addresses_are_left_out() {
        let own = OwnAddresses {
            listen: vec!["127.0.0.1:6380".parse().unwrap()],
            ..OwnAddresses::default()
        };
        let mut ids = QueryIds::new(1);
        let mut x = SrvLookup::new(Q, server());
        let q = x.start(&mut ids).unwrap();
        let r = respond(&q.bytes, |r| {
            r.add_answer(srv("7f000001.addr.yunlu_office.consul.", 6380, 1));
        });
        x.on_message(&r, true, &own, &mut ids);
        assert!(failed_answer(x.outcome()).starts_with("answer has no usable records"));
    }

    #[test]
    fn follow_up_results_and_failover() {
        let no = |rank, why: &str| AddrReply::NoAddress {
            rank,
            why: why.into(),
        };
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            FollowUp::of([no(1, "NXDOMAIN"), no(2, "REFUSED")]),
            FollowUp::NoAddress("REFUSED".into())
        );
        assert_eq!(
            FollowUp::of([AddrReply::Found(vec![]), AddrReply::Found(vec![])]),
            FollowUp::NoAddress("no A or AAAA records".into())
        );
        assert_eq!(
            FollowUp::of([AddrReply::Found(vec![ip]), no(1, "NXDOMAIN")]),
            FollowUp::Found(vec![ip])
        );
        assert_eq!(
            FollowUp::of([
                AddrReply::Found(vec![ip]),
                AddrReply::Failed("timed out".into())
            ]),
            FollowUp::Failed("timed out".into())
        );
        let mut f = Failover::default();
        f.failed("a timed out".into());
        f.failed("b answered SERVFAIL".into());
        assert_eq!(
            f.result(),
            Resolved::Failed("a timed out, b answered SERVFAIL".into())
        );
        assert_eq!(
            Failover::default().result(),
            Resolved::Failed("no usable resolver".into())
        );
    }
}
