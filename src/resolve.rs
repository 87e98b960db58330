//! The resolver thread of the discovery process: a tokio current-thread runtime
//! and hickory resolvers, off nginx's event loop. It receives jobs over a channel
//! and hands results back through another channel plus an eventfd that wakes the
//! event loop. It never touches nginx's memory.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{Name, RData, Record as DnsRecord, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::mpsc as tmpsc;

use consul_core::answer::{Ignored, Record, RecordData, SrvAnswer};
use consul_core::settings::Transport;
use consul_core::state::{self, Saved};
use consul_core::Peer;

/// Follow-up A/AAAA queries in flight at once for targets missing from ADDITIONAL.
const FOLLOW_UP_PARALLEL: usize = 32;

pub struct Query {
    pub id: usize,
    pub name: String,
    pub resolvers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub transport: Transport,
}

pub enum Job {
    Resolve(Query),
    Save {
        id: usize,
        path: PathBuf,
        saved: Saved,
    },
}

pub enum Resolved {
    Peers { peers: Vec<Peer>, ignored: Ignored },
    Empty { nxdomain: bool },
    Failed(String),
    Saved(Result<(), String>),
}

pub struct Done {
    pub id: usize,
    pub result: Resolved,
}

pub struct Thread {
    pub jobs: tmpsc::UnboundedSender<Job>,
    pub results: mpsc::Receiver<Done>,
    handle: Option<JoinHandle<()>>,
}

impl Thread {
    /// Starts the thread with every asynchronous signal blocked, so that nginx's
    /// signals (reload, quit) are always delivered to the event loop's thread.
    pub fn start(efd: RawFd) -> Result<Thread, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the resolver runtime: {e}"))?;
        let (jobs, job_rx) = tmpsc::unbounded_channel();
        let (tx, results) = mpsc::channel();
        let handle = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("consul-resolver".into())
                .spawn(move || runtime.block_on(serve(job_rx, tx, efd)))
        })
        .map_err(|e| format!("cannot start the resolver thread: {e}"))?;
        Ok(Thread {
            jobs,
            results,
            handle: Some(handle),
        })
    }

    /// Ends the thread: lookups in flight are abandoned, not waited for.
    pub fn stop(mut self) {
        drop(self.jobs);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset manipulation on local values; pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for sig in [libc::SIGILL, libc::SIGFPE, libc::SIGSEGV, libc::SIGBUS] {
            libc::sigdelset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        let out = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        out
    }
}

fn notify(efd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a local to an eventfd we own for the thread's life.
    unsafe { libc::write(efd, &one as *const u64 as *const libc::c_void, 8) };
}

async fn serve(mut jobs: tmpsc::UnboundedReceiver<Job>, tx: mpsc::Sender<Done>, efd: RawFd) {
    let mut cache: HashMap<(SocketAddr, Transport, Duration), Arc<TokioResolver>> = HashMap::new();
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Resolve(q) => {
                let resolvers: Vec<(SocketAddr, Arc<TokioResolver>)> = q
                    .resolvers
                    .iter()
                    .filter_map(|&addr| {
                        let key = (addr, q.transport, q.timeout);
                        if let Some(r) = cache.get(&key) {
                            return Some((addr, r.clone()));
                        }
                        let r = Arc::new(build_resolver(addr, q.transport, q.timeout).ok()?);
                        cache.insert(key, r.clone());
                        Some((addr, r))
                    })
                    .collect();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let result = discover(&q.name, &resolvers).await;
                    if tx.send(Done { id: q.id, result }).is_ok() {
                        notify(efd);
                    }
                });
            }
            Job::Save { id, path, saved } => {
                let result = state::save(&path, &saved).map_err(|e| e.to_string());
                if tx
                    .send(Done {
                        id,
                        result: Resolved::Saved(result),
                    })
                    .is_ok()
                {
                    notify(efd);
                }
            }
        }
    }
}

fn build_resolver(
    addr: SocketAddr,
    transport: Transport,
    timeout: Duration,
) -> Result<TokioResolver, String> {
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
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
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
async fn discover(query: &str, resolvers: &[(SocketAddr, Arc<TokioResolver>)]) -> Resolved {
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
    resolver: &Arc<TokioResolver>,
) -> Resolved {
    let mut answer = SrvAnswer::parse(query, answers, additionals);
    if answer.srvs.is_empty() && answer.ignored.is_empty() {
        return Resolved::Empty { nxdomain: false };
    }
    let targets = answer.unresolved_targets();
    for chunk in targets.chunks(FOLLOW_UP_PARALLEL) {
        let mut set = tokio::task::JoinSet::new();
        for target in chunk {
            let (target, resolver) = (target.clone(), resolver.clone());
            set.spawn(async move {
                let ips = addresses(&resolver, &target).await;
                (target, ips)
            });
        }
        while let Some(Ok((target, ips))) = set.join_next().await {
            answer.add_addresses(&target, ips);
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

async fn addresses(resolver: &TokioResolver, target: &str) -> Vec<IpAddr> {
    let Ok(name) = Name::from_ascii(format!("{}.", target.trim_end_matches('.'))) else {
        return Vec::new();
    };
    let (v4, v6) = tokio::join!(
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
