//! An `api=` line: Consul's `/v1/health/service/NAME` watched with blocking
//! queries, from the discovery process, as a second source beside DNS. Its
//! loop (in [`crate::discovery`]) asks [`Watch::fetch`] for the next answer and
//! applies it with the same policies as a DNS answer; core decides what the
//! answer means ([`consul_core::health`]) and how to block
//! ([`consul_core::blocking`]); [`http`] and [`tls`] talk to the agent. Before
//! it forks workers, the master asks once ([`sync_get`], one request without
//! index) and reads the answer with the same [`Reader`]; worker 0 goes on from
//! its index.
//!
//! The ACL token is read from `token_file` when the configuration is read (by
//! the master, which may read files the workers cannot), kept in the
//! configuration's memory, sent as `X-Consul-Token`, and never logged, shown
//! or saved.

pub mod http;
pub mod sync_get;
#[cfg(ngx_feature = "ssl")]
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;

use consul_core::answer::{Ignored, OwnAddresses};
use consul_core::api::{ApiSettings, Token};
use consul_core::blocking::{request_time_ms, wait_to_send, BlockingIndex, Pacer};
use consul_core::health::{self, body_cap, HealthAnswer, Left};
use consul_core::http::get_request;
use consul_core::settings::Settings;

use crate::dns_client::DnsClient;
use crate::log;
use crate::resolve::{LineResolver, Resolved};

/// What an API line needs besides its settings, made when the configuration is
/// read.
pub struct ApiConf {
    /// The agent's addresses: its host name resolved at configuration time, as
    /// nginx resolves the names of `server` and `proxy_pass`.
    pub addrs: Vec<SocketAddr>,
    #[cfg(ngx_feature = "ssl")]
    pub tls: Option<tls::TlsContext>,
}

/// Completes an API line's configuration: reads the token file, resolves the
/// agent's name, makes the TLS context. `full_name` puts a relative path under
/// nginx's prefix.
pub fn configure(
    settings: &mut Settings,
    full_name: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<Option<ApiConf>, String> {
    let Some(api) = settings.api.as_mut() else {
        return Ok(None);
    };
    if let Some(path) = &api.token_file {
        let path = full_name(path)?;
        let text = std::fs::read(&path).map_err(|e| {
            format!(
                "cannot read token_file \"{path}\" ({})",
                e.to_string().split(" (os error").next().unwrap_or("")
            )
        })?;
        let token = Token::from_file_text(&text)
            .map_err(|why| format!("invalid token in token_file \"{path}\": {why}"))?;
        api.token = Some(token);
    }
    let authority = api.agent.authority();
    let addrs: Vec<SocketAddr> = match api.agent.ip() {
        Some(ip) => vec![SocketAddr::new(ip, api.agent.port)],
        None => (api.agent.host.as_str(), api.agent.port)
            .to_socket_addrs()
            .map_err(|_| format!("host not found in \"api={}\"", api.agent))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(format!("host not found in \"api={}\"", api.agent));
    }
    log::debug!("consul upstream: agent {authority} at {addrs:?}");
    #[cfg(ngx_feature = "ssl")]
    let tls = match (api.agent.tls, &api.ca_file) {
        (false, _) => None,
        (true, ca) => {
            let ca = match ca {
                Some(p) => Some(full_name(p)?),
                None => None,
            };
            Some(tls::TlsContext::new(ca.as_deref())?)
        }
    };
    #[cfg(not(ngx_feature = "ssl"))]
    if api.agent.tls {
        return Err("\"https://\" in \"api=\" needs nginx built with OpenSSL".into());
    }
    Ok(Some(ApiConf {
        addrs,
        #[cfg(ngx_feature = "ssl")]
        tls,
    }))
}

/// One answer, as the line's loop applies it.
pub struct Fetched {
    pub result: Resolved,
    /// A 200 with a usable body came: the next request follows at the pace
    /// of answers, not of failures.
    pub answered: bool,
}

/// What an API line's answers mean, and what was said about them (once per
/// change): worker 0's watch reads with it, and so does the master's request
/// before it forks workers, which hands its [`Noted`] on.
pub struct Reader {
    prefix: String,
    api: &'static ApiSettings,
    index: BlockingIndex,
    last_left: Left,
    /// The last answer said ACLs left instances out (said once until it changes).
    last_acl_filtered: bool,
}

/// What the master's answer left for worker 0's watch of a line.
#[derive(Clone, Default)]
pub struct Noted {
    /// The answer's index (0: none to block on).
    pub index: u64,
    pub left: Left,
    pub acl_filtered: bool,
}

/// A 200 answer, read: the instances, and whether ACLs left some out.
pub struct Read {
    pub answer: HealthAnswer,
    acl_filtered: bool,
}

impl Reader {
    pub fn new(prefix: String, api: &'static ApiSettings) -> Reader {
        Reader {
            prefix,
            api,
            index: BlockingIndex::default(),
            last_left: Left::default(),
            last_acl_filtered: false,
        }
    }

    /// The index of the last answer (0: none yet, or a reset).
    pub fn index(&self) -> u64 {
        self.index.get()
    }

    /// The request failed: the next one does not block.
    pub fn failed(&mut self) {
        self.index.failed();
    }

    /// What was said and the index, for the next reader of the line.
    pub fn noted(&self) -> Noted {
        Noted {
            index: self.index.get(),
            left: self.last_left.clone(),
            acl_filtered: self.last_acl_filtered,
        }
    }

    /// Goes on from another process's reader (the master's answer).
    pub fn resume(&mut self, noted: Noted) {
        self.index = BlockingIndex::default();
        if noted.index > 0 {
            self.index.answered(Some(noted.index));
        }
        self.last_left = noted.left;
        self.last_acl_filtered = noted.acl_filtered;
    }

    /// An answer's status, body and index: `Err` for what fails the request.
    pub fn read(&mut self, response: http::Response) -> Result<Read, String> {
        let name = self.api.agent.authority();
        let http::Response {
            status,
            index,
            acl_filtered,
            body,
        } = response;
        if status != 200 {
            return Err(status_reason(&name, status, &body));
        }
        let parsed = health::parse(&body, self.api.only_passing);
        drop(body);
        let answer = parsed.map_err(|why| format!("{name}: {why}"))?;
        let step = self.index.answered(index);
        log::debug!(
            "{}answer: {} entries, {} critical, index {index:?} ({step:?})",
            self.prefix,
            answer.entries,
            answer.critical
        );
        Ok(Read {
            answer,
            acl_filtered,
        })
    }

    /// The line's result from an answer and its host names' addresses
    /// (`None` without `resolver=`); `Err` when the answer fails the request
    /// (the next one goes at the pace of failures, without index).
    pub fn result(
        &mut self,
        read: Read,
        own: &OwnAddresses,
        hosts: Option<&HashMap<String, Vec<IpAddr>>>,
    ) -> Result<Resolved, String> {
        let name = self.api.agent.authority();
        let Read {
            mut answer,
            acl_filtered,
        } = read;
        let peers = answer.peers(own, hosts);
        self.say_left(&answer.left);
        let filtered = acl_filtered;
        if filtered && !self.last_acl_filtered && !peers.is_empty() {
            log::warn!(
                "{}the ACL token may not read every instance of \"{}\": {name} left some out (X-Consul-Results-Filtered-By-ACLs)",
                self.prefix, self.api.service
            );
        }
        self.last_acl_filtered = filtered;
        if peers.is_empty() && answer.entries == 0 && filtered {
            // Default-deny ACLs answer "nothing" rather than 403: an ACL error,
            // not a service without instances. A policy change does not wake a
            // blocking query: ask again at the pace of failures.
            return Err(format!(
                "ACL: {name} left every instance out: the token may not read service \"{}\" (X-Consul-Results-Filtered-By-ACLs)",
                self.api.service
            ));
        }
        Ok(if !peers.is_empty() {
            Resolved::Peers {
                peers,
                ignored: Ignored::default(),
                // The HTTP API sends every instance.
                truncated: None,
            }
        } else if answer.instances.is_empty() {
            // Nothing registered, or nothing healthy: Consul's "no instances".
            Resolved::Empty { nxdomain: false }
        } else {
            Resolved::Failed(format!(
                "answer has no usable instances ({})",
                answer.left.describe()
            ))
        })
    }

    /// Says once what the answer's instances gave no peer for (until it changes).
    fn say_left(&mut self, left: &Left) {
        if *left != self.last_left && !left.is_empty() {
            let level = if left.needs_attention() {
                ngx::ffi::NGX_LOG_WARN
            } else {
                ngx::ffi::NGX_LOG_INFO
            };
            log::at!(
                level,
                "{}ignored instances of the answer: {}",
                self.prefix,
                left.describe()
            );
        }
        self.last_left = left.clone();
    }
}

/// One API line's watch: its client, its reader, its pace.
pub struct Watch {
    prefix: String,
    settings: &'static Settings,
    api: &'static ApiSettings,
    client: http::Client,
    reader: Reader,
    pacer: Pacer,
    own: Rc<OwnAddresses>,
    /// Host name addresses are resolved through `resolver=`, when given.
    resolver: Option<LineResolver>,
    max_body: usize,
}

impl Watch {
    pub fn new(
        prefix: String,
        settings: &'static Settings,
        conf: &'static ApiConf,
        own: Rc<OwnAddresses>,
        dns: &DnsClient,
        capacity: usize,
        now_ms: u64,
    ) -> Option<Watch> {
        let api = settings.api.as_ref()?;
        let resolver =
            (!settings.resolvers.is_empty()).then(|| LineResolver::new(settings, own.clone(), dns));
        Some(Watch {
            prefix: prefix.clone(),
            settings,
            api,
            client: http::Client::new(
                &api.agent,
                &conf.addrs,
                #[cfg(ngx_feature = "ssl")]
                conf.tls.as_ref(),
            ),
            reader: Reader::new(prefix, api),
            pacer: Pacer::new(settings.interval_ms, now_ms),
            own,
            resolver,
            max_body: body_cap(capacity),
        })
    }

    /// The index of the last answer (0: none yet, or a reset).
    pub fn index(&self) -> u64 {
        self.reader.index()
    }

    /// Goes on from the master's answer: its index (the first request
    /// blocks on it), what it said, and its place in the pace (the master's
    /// answer was the line's first).
    pub fn resume(&mut self, noted: Noted, now_ms: u64) {
        self.reader.resume(noted);
        self.pacer.pause_ms(now_ms);
    }

    /// After an answer, how long to wait before the next request: the pace of
    /// answers when one came, else `failed_ms` (the policy's backoff).
    pub fn pause_ms(&mut self, answered: bool, failed_ms: u64, now_ms: u64) -> u64 {
        if answered {
            self.pacer.pause_ms(now_ms)
        } else {
            failed_ms
        }
    }

    /// A request that will not be finished (the loop stops, or it panicked):
    /// its connection cannot carry another.
    pub fn abandon(&mut self) {
        self.client.reset();
    }

    /// Sends the next blocking query and makes a result of its answer.
    pub async fn fetch(&mut self, random: u64) -> Fetched {
        crate::fault::inject("lookup");
        let index = self.reader.index();
        let wait = wait_to_send(self.api.wait_ms, self.settings.max_stale_ms, random);
        let target = self.api.target_with(index, wait);
        let request = get_request(
            &target,
            &self.api.agent.authority(),
            self.api.token.as_ref().map(Token::header_value),
        );
        let limits = http::Limits {
            blocking: index > 0,
            first_byte_ms: request_time_ms(index, wait, self.settings.timeout_ms),
            timeout_ms: self.settings.timeout_ms,
            max_body: self.max_body,
        };
        log::debug!("{}GET {target}", self.prefix);
        let fetched = self.exchange(&request, limits).await;
        if !fetched.answered {
            self.reader.failed();
        }
        fetched
    }

    /// One request and what its answer means.
    async fn exchange(&mut self, request: &[u8], limits: http::Limits) -> Fetched {
        let failed = |why: String| Fetched {
            result: Resolved::Failed(why),
            answered: false,
        };
        let response = match self.client.exchange(request, limits).await {
            Ok(r) => r,
            Err(why) => return failed(why),
        };
        let read = match self.reader.read(response) {
            Ok(r) => r,
            Err(why) => return failed(why),
        };
        let hosts = match self.resolve_hosts(&read.answer.host_names()).await {
            Ok(h) => h,
            Err(why) => return failed(why),
        };
        match self.reader.result(read, &self.own, hosts.as_ref()) {
            Ok(result) => Fetched {
                result,
                answered: true,
            },
            Err(why) => failed(why),
        }
    }

    /// Addresses of the answer's host names (`None` without `resolver=`); a
    /// failed lookup fails the answer, as a failed SRV follow-up does.
    async fn resolve_hosts(
        &self,
        names: &[String],
    ) -> Result<Option<HashMap<String, Vec<IpAddr>>>, String> {
        let Some(resolver) = &self.resolver else {
            return Ok(None);
        };
        let mut found = HashMap::new();
        let mut failed = Vec::new();
        for name in names {
            match resolver.host_addresses(name).await {
                Ok(ips) => {
                    found.insert(name.clone(), ips);
                }
                Err(e) => failed.push(format!("{name}: {e}")),
            }
        }
        match failed.first() {
            Some(first) => Err(format!(
                "resolving {} of {} host names failed ({first})",
                failed.len(),
                names.len()
            )),
            None => Ok(Some(found)),
        }
    }
}

/// A non-200 answer as a reason: Consul's text (the first line, clipped) with
/// the status; a 403 is the token's (`ACL not found`, `Permission denied`).
fn status_reason(name: &str, status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text: String = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(80)
        .collect();
    let with_text = |t: &str| {
        if t.is_empty() {
            String::new()
        } else {
            format!(": {t}")
        }
    };
    if status == 403 {
        format!("ACL: {name} answered 403{}", with_text(&text))
    } else {
        format!("{name} answered {status}{}", with_text(&text))
    }
}
