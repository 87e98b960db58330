//! One line's lookups (see [`crate::runtime`] for where they run): hickory
//! resolvers, one per resolver address, asked in order; the SRV answer, with
//! A/AAAA follow-ups for targets the answer gives no address for, turned into
//! a peer set by core.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::join_all;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::Resolver;

use consul_core::answer::{Ignored, OwnAddresses, Record, SrvAnswer};
use consul_core::exchange::rcode_name;
use consul_core::message::convert;
use consul_core::settings::{Settings, Transport};
use consul_core::Peer;

use crate::runtime::NgxRuntime;

type DnsResolver = Resolver<NgxRuntime>;

/// Targets looked up at once when the answer gives no address for them (each an
/// A and an AAAA query): well below the 32 requests hickory keeps in flight on
/// one connection.
const FOLLOW_UP_TARGETS: usize = 8;

pub enum Resolved {
    Peers { peers: Vec<Peer>, ignored: Ignored },
    Empty { nxdomain: bool },
    Failed(String),
}

/// The resolvers of one `consul_upstream` line.
pub struct LineResolver {
    query: String,
    resolvers: Vec<(SocketAddr, Result<DnsResolver, String>)>,
    own: Rc<OwnAddresses>,
}

impl LineResolver {
    pub fn new(settings: &Settings, own: Rc<OwnAddresses>) -> LineResolver {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let resolvers = settings
            .resolvers
            .iter()
            .map(|&addr| (addr, build_resolver(addr, settings.transport, timeout)))
            .collect();
        LineResolver {
            query: settings.query.clone(),
            resolvers,
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
        for (addr, resolver) in &self.resolvers {
            let resolver = match resolver {
                Ok(r) => r,
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            match resolver.lookup(name.clone(), RecordType::SRV).await {
                Ok(lookup) => {
                    let answers: Vec<Record> = lookup.answers().iter().map(convert).collect();
                    let additionals: Vec<Record> =
                        lookup.additionals().iter().map(convert).collect();
                    return self.peers_of(&answers, &additionals, resolver, addr).await;
                }
                Err(e) if e.is_nx_domain() => return Resolved::Empty { nxdomain: true },
                Err(e) if e.is_no_records_found() => return Resolved::Empty { nxdomain: false },
                Err(e) => errors.push(describe(&e, addr)),
            }
        }
        if errors.is_empty() {
            errors.push("no usable resolver".into());
        }
        Resolved::Failed(errors.join(", "))
    }

    /// The peer set of an SRV answer, with follow-ups for targets without address.
    async fn peers_of(
        &self,
        answers: &[Record],
        additionals: &[Record],
        resolver: &DnsResolver,
        addr: &SocketAddr,
    ) -> Resolved {
        let mut answer = SrvAnswer::parse(&self.query, answers, additionals);
        if answer.srvs.is_empty() && answer.ignored.is_empty() {
            return Resolved::Empty { nxdomain: false };
        }
        let targets = answer.unresolved_targets();
        let mut failed = Vec::new();
        for chunk in targets.chunks(FOLLOW_UP_TARGETS) {
            let found = join_all(chunk.iter().map(|t| addresses(resolver, t, addr))).await;
            for (target, result) in chunk.iter().zip(found) {
                match result {
                    Ok(ips) => answer.add_addresses(target, ips),
                    Err(e) => failed.push(format!("{target}: {e}")),
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
        }
    }
}

fn build_resolver(
    addr: SocketAddr,
    transport: Transport,
    timeout: Duration,
) -> Result<DnsResolver, String> {
    let mut ns = match transport {
        // Consul trims UDP answers to 3 records without setting TC: TCP by default.
        Transport::Tcp => NameServerConfig::tcp(addr.ip()),
        Transport::Udp => NameServerConfig::udp_and_tcp(addr.ip()),
    };
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 0;
    opts.cache_size = 0;
    opts.ndots = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.preserve_intermediates = true;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    Resolver::builder_with_config(ResolverConfig::from_name_servers(vec![ns]), NgxRuntime)
        .with_options(opts)
        .build()
        .map_err(|e| e.to_string())
}

/// hickory's words for a failed exchange, as a user reads them in error.log.
fn describe(e: &NetError, addr: &SocketAddr) -> String {
    match e {
        NetError::NoConnections => format!("cannot connect to {addr}"),
        NetError::Timeout => format!("{addr} timed out"),
        NetError::Truncated => {
            format!("{addr} sent a truncated answer (too large for one DNS message)")
        }
        NetError::Dns(DnsError::ResponseCode(code)) => {
            format!("{addr} answered {}", rcode_name(u16::from(*code)))
        }
        other => format!("{other} from {addr}"),
    }
}

/// A target's addresses (A and AAAA); a name that does not exist or has no
/// address records has none; any other failure is an error.
async fn addresses(
    resolver: &DnsResolver,
    target: &str,
    addr: &SocketAddr,
) -> Result<Vec<IpAddr>, String> {
    let name = Name::from_ascii(format!("{}.", target.trim_end_matches('.')))
        .map_err(|e| format!("invalid name: {e}"))?;
    let (v4, v6) = futures_util::join!(
        resolver.lookup(name.clone(), RecordType::A),
        resolver.lookup(name, RecordType::AAAA)
    );
    let mut ips = Vec::new();
    for result in [v4, v6] {
        match result {
            Ok(lookup) => ips.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {}
            Err(e) => return Err(describe(&e, addr)),
        }
    }
    Ok(ips)
}
