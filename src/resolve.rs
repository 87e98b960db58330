//! One line's lookups (see [`crate::runtime`] for where they run): the SRV
//! query to each resolver in order, over the connection [`crate::exchange`]
//! shares between lines, and A/AAAA follow-ups for targets the answer gives no
//! address for; core turns the answer into a peer set.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::join_all;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RecordType};

use consul_core::answer::{
    by_name, chain_addresses, may_be_trimmed, Ignored, OwnAddresses, Record, RecordData, SrvAnswer,
};
use consul_core::exchange::rcode_name;
use consul_core::message::convert;
use consul_core::settings::{Settings, Transport};
use consul_core::Peer;

use crate::exchange::{Exchanges, Server};
use crate::log;

/// Targets looked up at once when the answer gives no address for them (each an
/// A and an AAAA query).
const FOLLOW_UP_TARGETS: usize = 8;

pub enum Resolved {
    Peers {
        peers: Vec<Peer>,
        ignored: Ignored,
        truncated: Option<Truncation>,
    },
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

/// What a follow-up A/AAAA lookup for one target found.
enum FollowUp {
    Found(Vec<IpAddr>),
    /// A definitive answer without an address (refused, no such name, no
    /// address records): the target's instances are left out.
    NoAddress(String),
    /// A failure that may pass (timeout, SERVFAIL, lost connection): the
    /// whole answer fails and the line keeps its set.
    Failed(String),
}

/// The resolvers of one `consul_upstream` line.
pub struct LineResolver {
    query: String,
    servers: Vec<Rc<Server>>,
    transport: Transport,
    timeout: Duration,
    own: Rc<OwnAddresses>,
}

impl LineResolver {
    pub fn new(settings: &Settings, own: Rc<OwnAddresses>, exchanges: &Exchanges) -> LineResolver {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let servers = settings
            .resolvers
            .iter()
            .map(|&addr| exchanges.server(addr))
            .collect();
        LineResolver {
            query: settings.query.clone(),
            servers,
            transport: settings.transport,
            timeout,
            own,
        }
    }

    /// Asks each resolver in order until one answers; an answer (even NXDOMAIN)
    /// ends the search, a failure (timeout, refused, SERVFAIL) moves on to the next.
    pub async fn lookup(&self) -> Resolved {
        crate::fault::inject("lookup");
        let name = match Name::from_ascii(format!("{}.", self.query)) {
            Ok(n) => n,
            Err(e) => return Resolved::Failed(format!("invalid name: {e}")),
        };
        let mut errors = Vec::new();
        for server in &self.servers {
            let addr = server.addr();
            let answer = match server
                .query(&name, RecordType::SRV, self.transport, self.timeout)
                .await
            {
                Ok(answer) => answer,
                Err(failure) => {
                    errors.push(failure.describe(addr));
                    continue;
                }
            };
            let response = &answer.response;
            match response.response_code {
                ResponseCode::NoError => {}
                ResponseCode::NXDomain => return Resolved::Empty { nxdomain: true },
                code => {
                    errors.push(format!("{addr} answered {}", rcode_name(u16::from(code))));
                    continue;
                }
            }
            if response.answers.is_empty() {
                if answer.truncated {
                    errors.push(format!("{addr} sent a truncated answer without records"));
                    continue;
                }
                return Resolved::Empty { nxdomain: false };
            }
            let answers: Vec<Record> = response.answers.iter().map(convert).collect();
            let additionals: Vec<Record> = response.additionals.iter().map(convert).collect();
            let srv_records = answers
                .iter()
                .filter(|r| matches!(r.data, RecordData::Srv { .. }))
                .count();
            let bytes = response.as_buffer().len();
            let truncated = if answer.truncated {
                Some(Truncation::Tc)
            } else if answer.over_tcp && may_be_trimmed(srv_records, bytes, true, 0) {
                Some(Truncation::Full)
            } else {
                None
            };
            return self
                .peers_of(&answers, &additionals, server, truncated)
                .await;
        }
        if errors.is_empty() {
            errors.push("no usable resolver".into());
        }
        Resolved::Failed(errors.join(", "))
    }

    /// A host name's addresses (A and AAAA), from the first resolver that
    /// answers, over the same connections as the lines' SRV queries: an API
    /// line's instances registered by name. A definitive answer without an
    /// address (refused, no such name, no address records) is an empty list,
    /// as for an SRV target: the instance is left out, the others kept.
    pub async fn host_addresses(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let mut errors = Vec::new();
        for server in &self.servers {
            match self.addresses(server, name).await {
                FollowUp::Found(ips) => return Ok(ips),
                FollowUp::NoAddress(why) => {
                    log::debug(&format!("consul upstream: {name}: {why}"));
                    return Ok(Vec::new());
                }
                FollowUp::Failed(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            errors.push("no usable resolver".into());
        }
        Err(errors.join(", "))
    }

    /// The peer set of an SRV answer, with follow-ups for targets without address.
    async fn peers_of(
        &self,
        answers: &[Record],
        additionals: &[Record],
        server: &Server,
        truncated: Option<Truncation>,
    ) -> Resolved {
        let mut answer = SrvAnswer::parse(&self.query, answers, additionals);
        if answer.srvs.is_empty() && answer.ignored.is_empty() {
            return Resolved::Empty { nxdomain: false };
        }
        let targets = answer.unresolved_targets();
        let mut failed = Vec::new();
        for chunk in targets.chunks(FOLLOW_UP_TARGETS) {
            let found = join_all(chunk.iter().map(|t| self.addresses(server, t))).await;
            for (target, result) in chunk.iter().zip(found) {
                match result {
                    FollowUp::Found(ips) => answer.add_addresses(target, ips),
                    FollowUp::NoAddress(why) => answer.no_address(target, &why),
                    FollowUp::Failed(e) => failed.push(format!("{target}: {e}")),
                }
            }
        }
        // A target whose lookup failed is not a target without an address: the
        // answer is incomplete, and publishing it would drop healthy instances.
        if let Some(first) = failed.first() {
            return Resolved::Failed(format!(
                "resolving {} of {} targets failed ({first})",
                failed.len(),
                targets.len()
            ));
        }
        let peers = answer.peers(&self.own);
        if peers.is_empty() {
            return Resolved::Failed(format!(
                "answer has no usable records ({})",
                answer.ignored.describe()
            ));
        }
        Resolved::Peers {
            peers,
            ignored: answer.ignored,
            truncated,
        }
    }

    /// A target's addresses (A and AAAA, through a CNAME chain in the answer).
    async fn addresses(&self, server: &Server, target: &str) -> FollowUp {
        let addr = server.addr();
        let name = match Name::from_ascii(format!("{}.", target.trim_end_matches('.'))) {
            Ok(n) => n,
            Err(e) => return FollowUp::NoAddress(format!("invalid name: {e}")),
        };
        let (v4, v6) = futures_util::join!(
            server.query(&name, RecordType::A, self.transport, self.timeout),
            server.query(&name, RecordType::AAAA, self.transport, self.timeout)
        );
        let mut ips = Vec::new();
        // The strongest reason of the two answers: a refusal says more than a
        // missing name, which says more than a name without address records.
        let mut why = (0, String::from("no A or AAAA records"));
        for result in [v4, v6] {
            let answer = match result {
                Ok(answer) => answer,
                Err(failure) => return FollowUp::Failed(failure.describe(addr)),
            };
            let response = &answer.response;
            let reason = match response.response_code {
                ResponseCode::NoError => {
                    let records: Vec<Record> = response.answers.iter().map(convert).collect();
                    ips.extend(chain_addresses(target, &by_name(&records)));
                    continue;
                }
                ResponseCode::NXDomain => (1, format!("{addr} answered NXDOMAIN")),
                ResponseCode::Refused => (2, format!("{addr} answered REFUSED")),
                code => {
                    return FollowUp::Failed(format!(
                        "{addr} answered {}",
                        rcode_name(u16::from(code))
                    ))
                }
            };
            if reason.0 > why.0 {
                why = reason;
            }
        }
        if ips.is_empty() {
            FollowUp::NoAddress(why.1)
        } else {
            FollowUp::Found(ips)
        }
    }
}
