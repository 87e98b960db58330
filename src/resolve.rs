//! One line's lookups (see [`crate::runtime`] for where they run): the SRV
//! query to each resolver in order, over the connection [`crate::dns_client`]
//! shares between lines, and A/AAAA follow-ups for targets the answer gives no
//! address for; core reads each answer ([`consul_core::lookup`]) and turns it
//! into a peer set.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::join_all;
use hickory_resolver::proto::rr::RecordType;

use consul_core::answer::OwnAddresses;
use consul_core::lookup::{
    dns_name, read_addresses, read_srv, AddrReply, Failover, FollowUp, Found, SrvReply,
};
pub use consul_core::lookup::{Resolved, Truncation};
use consul_core::settings::{Settings, Transport};

use crate::dns_client::{Answer, DnsClient, Failure, Server};
use crate::log;

/// Targets looked up at once when the answer gives no address for them (each an
/// A and an AAAA query).
const FOLLOW_UP_TARGETS: usize = consul_core::lookup::FOLLOW_UPS_IN_FLIGHT / 2;

/// The resolvers of one `consul_upstream` line.
pub struct LineResolver {
    query: String,
    servers: Vec<Rc<Server>>,
    transport: Transport,
    timeout: Duration,
    own: Rc<OwnAddresses>,
}

impl LineResolver {
    pub fn new(settings: &Settings, own: Rc<OwnAddresses>, dns: &DnsClient) -> LineResolver {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let servers = settings
            .resolvers
            .iter()
            .map(|&addr| dns.server(addr))
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
    /// ends the search, a failure (timeout, refused, SERVFAIL) moves on to the
    /// next. What an answer means is core's rule ([`consul_core::lookup`]), as
    /// for the master's lookup before it forks workers.
    pub async fn lookup(&self) -> Resolved {
        crate::fault::inject("lookup");
        let name = match dns_name(&self.query) {
            Ok(n) => n,
            Err(e) => return Resolved::Failed(e),
        };
        let mut failover = Failover::default();
        for server in &self.servers {
            let addr = server.addr();
            let answer = match server
                .query(&name, RecordType::SRV, self.transport, self.timeout)
                .await
            {
                Ok(answer) => answer,
                Err(failure) => {
                    failover.failed(failure.describe(addr));
                    continue;
                }
            };
            let bytes = answer.response.as_buffer().len();
            match read_srv(&self.query, addr, &answer.response, bytes, answer.over_tcp) {
                SrvReply::Empty { nxdomain } => return Resolved::Empty { nxdomain },
                SrvReply::Failed(why) => failover.failed(why),
                SrvReply::Found(found) => return self.follow_up(found, server).await,
            }
        }
        failover.result()
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
                    log::debug!("consul upstream: {name}: {why}");
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
    async fn follow_up(&self, mut found: Box<Found>, server: &Server) -> Resolved {
        let targets = found.targets().to_vec();
        for chunk in targets.chunks(FOLLOW_UP_TARGETS) {
            let results = join_all(chunk.iter().map(|t| self.addresses(server, t))).await;
            for (target, result) in chunk.iter().zip(results) {
                found.follow_up(target, result);
            }
        }
        found.finish(&self.own)
    }

    /// A target's addresses (A and AAAA, through a CNAME chain in the answer).
    async fn addresses(&self, server: &Server, target: &str) -> FollowUp {
        let addr = server.addr();
        let name = match dns_name(target) {
            Ok(n) => n,
            Err(e) => return FollowUp::NoAddress(e),
        };
        let (v4, v6) = futures_util::join!(
            server.query(&name, RecordType::A, self.transport, self.timeout),
            server.query(&name, RecordType::AAAA, self.transport, self.timeout)
        );
        let read = |result: Result<Answer, Failure>| match result {
            Ok(answer) => read_addresses(target, addr, &answer.response),
            Err(failure) => AddrReply::Failed(failure.describe(addr)),
        };
        FollowUp::of([read(v4), read(v6)])
    }
}
