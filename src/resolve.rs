//! Lookups for discovery, as tasks on nginx's event loop (see [`crate::runtime`]):
//! hickory resolvers, one per resolver address, asked in order; each result goes
//! to discovery's callback.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::Duration;

use async_task::Task;
use futures_util::future::join_all;
use futures_util::FutureExt;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{Name, RData, Record as DnsRecord, RecordType};
use hickory_resolver::Resolver;

use consul_core::answer::{Ignored, Record, RecordData, SrvAnswer};
use consul_core::settings::Transport;
use consul_core::Peer;

use crate::runtime::{self, NgxRuntime};

type DnsResolver = Resolver<NgxRuntime>;

/// Follow-up A/AAAA queries in flight at once for targets missing from ADDITIONAL.
const FOLLOW_UP_PARALLEL: usize = 32;

pub struct Query {
    pub id: usize,
    pub name: String,
    pub resolvers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub transport: Transport,
}

pub enum Resolved {
    Peers { peers: Vec<Peer>, ignored: Ignored },
    Empty { nxdomain: bool },
    Failed(String),
}

pub struct Done {
    pub id: usize,
    pub result: Resolved,
}

/// The lookups of the discovery process.
pub struct Lookups {
    resolvers: HashMap<(SocketAddr, Transport, Duration), Rc<DnsResolver>>,
    /// The task of each entry's lookup; replacing or dropping one cancels it.
    tasks: HashMap<usize, Task<()>>,
    on_done: fn(Done),
}

impl Lookups {
    /// `on_done` gets each result, from the task that looked it up.
    pub fn new(on_done: fn(Done)) -> Lookups {
        Lookups {
            resolvers: HashMap::new(),
            tasks: HashMap::new(),
            on_done,
        }
    }

    pub fn resolve(&mut self, q: Query) {
        let resolvers: Vec<(SocketAddr, Rc<DnsResolver>)> = q
            .resolvers
            .iter()
            .filter_map(|&addr| {
                let key = (addr, q.transport, q.timeout);
                if let Some(r) = self.resolvers.get(&key) {
                    return Some((addr, r.clone()));
                }
                let r = Rc::new(build_resolver(addr, q.transport, q.timeout).ok()?);
                self.resolvers.insert(key, r.clone());
                Some((addr, r))
            })
            .collect();
        let (on_done, id) = (self.on_done, q.id);
        let task = runtime::spawn(async move {
            let lookup = AssertUnwindSafe(discover(&q.name, &resolvers)).catch_unwind();
            let result = lookup.await.unwrap_or_else(|_| {
                Resolved::Failed("internal error in the DNS client (panic)".into())
            });
            on_done(Done { id, result });
        });
        self.tasks.insert(id, task);
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

fn convert(r: &DnsRecord) -> Record {
    let data = match &r.data {
        RData::SRV(s) => RecordData::Srv {
            priority: s.priority,
            weight: s.weight,
            port: s.port,
            target: s.target.to_ascii(),
        },
        RData::A(a) => RecordData::A(a.0),
        RData::AAAA(a) => RecordData::Aaaa(a.0),
        RData::CNAME(c) => RecordData::Cname(c.0.to_ascii()),
        _ => RecordData::Other,
    };
    Record::new(&r.name.to_ascii(), data)
}

/// Asks each resolver in order until one answers; an answer (even NXDOMAIN) ends
/// the search, a failure (timeout, refused, SERVFAIL) moves on to the next.
async fn discover(query: &str, resolvers: &[(SocketAddr, Rc<DnsResolver>)]) -> Resolved {
    let name = match Name::from_ascii(format!("{query}.")) {
        Ok(n) => n,
        Err(e) => return Resolved::Failed(format!("invalid name: {e}")),
    };
    let mut errors = Vec::new();
    for (addr, resolver) in resolvers {
        match resolver.lookup(name.clone(), RecordType::SRV).await {
            Ok(lookup) => {
                let answers: Vec<Record> = lookup.answers().iter().map(convert).collect();
                let additionals: Vec<Record> = lookup.additionals().iter().map(convert).collect();
                return from_answer(query, &answers, &additionals, resolver).await;
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

/// hickory's words for a failed exchange, as a user reads them in error.log.
fn describe(e: &NetError, addr: &SocketAddr) -> String {
    match e {
        NetError::NoConnections => format!("cannot connect to {addr}"),
        NetError::Timeout => format!("{addr} timed out"),
        NetError::Truncated => {
            format!("{addr} sent a truncated answer (too large for one DNS message)")
        }
        NetError::Dns(DnsError::ResponseCode(code)) => format!("{addr} answered {code}"),
        other => format!("{other} from {addr}"),
    }
}

async fn from_answer(
    query: &str,
    answers: &[Record],
    additionals: &[Record],
    resolver: &DnsResolver,
) -> Resolved {
    let mut answer = SrvAnswer::parse(query, answers, additionals);
    if answer.srvs.is_empty() && answer.ignored.is_empty() {
        return Resolved::Empty { nxdomain: false };
    }
    let targets = answer.unresolved_targets();
    for chunk in targets.chunks(FOLLOW_UP_PARALLEL) {
        let found = join_all(chunk.iter().map(|t| addresses(resolver, t))).await;
        for (target, ips) in chunk.iter().zip(found) {
            answer.add_addresses(target, ips);
        }
    }
    let peers = answer.peers();
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

async fn addresses(resolver: &DnsResolver, target: &str) -> Vec<IpAddr> {
    let Ok(name) = Name::from_ascii(format!("{}.", target.trim_end_matches('.'))) else {
        return Vec::new();
    };
    let (v4, v6) = futures_util::join!(
        resolver.lookup(name.clone(), RecordType::A),
        resolver.lookup(name, RecordType::AAAA)
    );
    let mut ips = Vec::new();
    for lookup in [v4, v6].into_iter().flatten() {
        for r in lookup.answers() {
            match &r.data {
                RData::A(a) => ips.push(IpAddr::V4(a.0)),
                RData::AAAA(a) => ips.push(IpAddr::V6(a.0)),
                _ => {}
            }
        }
    }
    ips
}
