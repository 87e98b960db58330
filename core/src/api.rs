//! `consul_upstream ... api=http://HOST:PORT`: a line that watches Consul's HTTP
//! API (`/v1/health/service/NAME` with blocking queries) instead of asking its
//! DNS interface. Here: the line's parameters, the agent's address, the ACL
//! token (a value that never prints), and the request target the line sends.
//!
//! [`Settings::parse`](crate::settings::Settings::parse) hands every parameter
//! it does not know to [`ApiArgs::take`] and lets [`ApiArgs::finish`] decide
//! whether the line is an API line and which parameters clash.

use std::fmt;
use std::net::IpAddr;

use crate::settings::{parse_time_ms, valid_dns_name, ConfError};

/// Consul's HTTP port, and its HTTPS port: the port of an `api=` given without one.
pub const CONSUL_HTTP_PORT: u16 = 8500;
pub const CONSUL_HTTPS_PORT: u16 = 8501;
/// `wait=` by default: what Consul's own clients use (and its server's default).
pub const DEFAULT_WAIT_MS: u64 = 300_000;
/// Consul caps `wait` at 10 minutes.
pub const MAX_WAIT_MS: u64 = 600_000;
/// The shortest `wait=`: below it a blocking query is a poll.
pub const MIN_WAIT_MS: u64 = 1_000;
/// `timeout=` on an API line by default: connecting (and the TLS handshake), an
/// answer that does not block, and the rest of an answer once it has begun.
pub const DEFAULT_API_TIMEOUT_MS: u64 = 5_000;
/// The longest ACL token accepted (Consul's are 36-character UUIDs).
const MAX_TOKEN_LEN: usize = 512;
/// The longest `filter=` expression accepted.
const MAX_FILTER_LEN: usize = 2048;

/// Where the agent's HTTP API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    /// `https://`.
    pub tls: bool,
    /// The host as written, without brackets: an IP address or a name (a name is
    /// resolved when the configuration is read, and is what TLS verifies).
    pub host: String,
    pub port: u16,
}

impl AgentUrl {
    /// `http://HOST[:PORT]`, `https://HOST[:PORT]`, HOST an IPv4 address, `[IPv6]`
    /// or a host name; a trailing `/` is accepted, any other path is not.
    pub fn parse(s: &str) -> Option<AgentUrl> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            return None;
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let default_port = if tls {
            CONSUL_HTTPS_PORT
        } else {
            CONSUL_HTTP_PORT
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            host.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after {
                "" => default_port,
                p => parse_port(p.strip_prefix(':')?)?,
            };
            (host, port)
        } else {
            let (host, port) = match rest.rsplit_once(':') {
                Some((host, p)) => (host, parse_port(p)?),
                None => (rest, default_port),
            };
            // An IPv6 address needs its brackets.
            if host.contains(':') {
                return None;
            }
            (host, port)
        };
        let is_ip = host.parse::<IpAddr>().is_ok();
        let is_name = valid_dns_name(host) && !host.contains('_');
        if !is_ip && !is_name {
            return None;
        }
        Some(AgentUrl {
            tls,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The host as an IP address, if it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// `127.0.0.1:8500`, `[::1]:8500`, `consul.local:8500`: how log lines name it.
    pub fn authority(&self) -> String {
        match self.ip() {
            Some(IpAddr::V6(_)) => format!("[{}]:{}", self.host, self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

impl fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&p| p != 0)
}

/// An ACL token: sent as `X-Consul-Token`, never shown (`Debug` hides it, there
/// is no `Display`), never saved.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The token in a token file: its first line, surrounding white space removed.
    /// Refused: empty, too long, or bytes that do not belong in a header value.
    pub fn from_file_text(text: &[u8]) -> Result<Token, &'static str> {
        let text = std::str::from_utf8(text).map_err(|_| "not text")?;
        let token = text.trim();
        if token.is_empty() {
            return Err("empty");
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err("too long");
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("not one line of printable characters");
        }
        Ok(Token(token.to_string()))
    }

    /// The header value. The only way to the text.
    pub fn header_value(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(hidden)")
    }
}

/// The parameters of an API line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiSettings {
    pub agent: AgentUrl,
    pub service: String,
    /// Every one is required (Consul's repeated `tag` parameter).
    pub tags: Vec<String>,
    pub datacenter: Option<String>,
    /// Consul's `filter` expression.
    pub filter: Option<String>,
    /// Consul's `passing`: warning instances are left out too.
    pub only_passing: bool,
    /// `token_file=`, as written (the module reads it; see [`Token`]).
    pub token_file: Option<String>,
    /// The token read from `token_file` when the configuration was read.
    pub token: Option<Token>,
    /// `api_ca=`: PEM certificates that verify the agent (else the system's).
    pub ca_file: Option<String>,
    pub wait_ms: u64,
}

impl ApiSettings {
    /// The request target without `index` and `wait`:
    /// `/v1/health/service/redis?dc=dc1&tag=a&tag=b&passing=1&filter=...`.
    pub fn target(&self) -> String {
        let mut t = String::from("/v1/health/service/");
        encode(&mut t, &self.service);
        let mut sep = '?';
        let mut param = |t: &mut String, key: &str, value: Option<&str>| {
            t.push(sep);
            sep = '&';
            t.push_str(key);
            if let Some(v) = value {
                t.push('=');
                encode(t, v);
            }
        };
        if let Some(dc) = &self.datacenter {
            param(&mut t, "dc", Some(dc));
        }
        for tag in &self.tags {
            param(&mut t, "tag", Some(tag));
        }
        if self.only_passing {
            param(&mut t, "passing", Some("1"));
        }
        if let Some(f) = &self.filter {
            param(&mut t, "filter", Some(f));
        }
        t
    }

    /// The request target of one blocking query: `index=0` is never sent (the
    /// first request, or one after a reset, answers at once).
    pub fn target_with(&self, index: u64, wait_ms: u64) -> String {
        let mut t = self.target();
        if index > 0 {
            let sep = if t.contains('?') { '&' } else { '?' };
            t.push_str(&format!("{sep}index={index}&wait={wait_ms}ms"));
        }
        t
    }

    /// What names the line (its "query"): the agent and the target, as a user can
    /// paste it into curl. No token: it is never part of a name.
    pub fn query(&self) -> String {
        format!("{}{}", self.agent, self.target())
    }
}

/// Percent-encodes everything outside RFC 3986's unreserved characters.
fn encode(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Text Consul takes as a service name or tag: printable, no `/` in a name.
fn valid_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(|c| !c.is_control())
}

/// The parameters only API lines have, collected while the line is parsed.
#[derive(Default)]
pub struct ApiArgs<'a> {
    api: Option<&'a str>,
    token_file: Option<&'a str>,
    filter: Option<&'a str>,
    ca_file: Option<&'a str>,
    wait: Option<&'a str>,
    only_passing: Option<&'a str>,
}

/// What the line says besides the API parameters, for [`ApiArgs::finish`].
pub struct LineArgs<'a> {
    pub query: Option<&'a str>,
    pub service: Option<&'a str>,
    pub tags: &'a [&'a str],
    pub datacenter: Option<&'a str>,
    pub domain: Option<&'a str>,
    /// `tcp` or `udp`, if given.
    pub transport: Option<&'a str>,
    pub has_resolver: bool,
}

fn invalid(arg: &str) -> ConfError {
    ConfError(format!("invalid parameter \"{arg}\""))
}

impl<'a> ApiArgs<'a> {
    /// Takes `arg` if it is an API parameter (`Ok(true)`).
    pub fn take(
        &mut self,
        key: &str,
        value: Option<&'a str>,
        arg: &'a str,
    ) -> Result<bool, ConfError> {
        let slot = match (key, value) {
            ("api", Some(_)) => &mut self.api,
            ("token_file", Some(_)) => &mut self.token_file,
            ("filter", Some(_)) => &mut self.filter,
            ("api_ca", Some(_)) => &mut self.ca_file,
            ("wait", Some(_)) => &mut self.wait,
            ("only_passing", None) => &mut self.only_passing,
            ("only_passing", Some(_)) => return Err(invalid(arg)),
            _ => return Ok(false),
        };
        if value.is_none() && slot.is_some() {
            // A flag given twice, as "tcp tcp" (the others are checked by name).
            return Err(ConfError(format!("duplicate parameter \"{arg}\"")));
        }
        *slot = Some(value.unwrap_or(arg));
        Ok(true)
    }

    /// The API settings of an `api=` line (`None` for a DNS line, which must not
    /// have API parameters).
    pub fn finish(self, line: &LineArgs<'_>) -> Result<Option<ApiSettings>, ConfError> {
        let Some(api) = self.api else {
            let only_api = [
                (self.token_file.is_some(), "token_file="),
                (self.filter.is_some(), "filter="),
                (self.ca_file.is_some(), "api_ca="),
                (self.wait.is_some(), "wait="),
                (self.only_passing.is_some(), "only_passing"),
            ];
            if let Some((_, name)) = only_api.iter().find(|(given, _)| *given) {
                return Err(ConfError(format!("\"{name}\" needs \"api=\"")));
            }
            return Ok(None);
        };
        let agent = AgentUrl::parse(api)
            .ok_or_else(|| ConfError(format!("invalid API address \"{api}\"")))?;
        if line.query.is_some() {
            return Err(ConfError(
                "a query name and \"api=\" cannot both be given".into(),
            ));
        }
        if line.domain.is_some() {
            return Err(ConfError("\"domain=\" cannot be used with \"api=\"".into()));
        }
        if let (Some(t), false) = (line.transport, line.has_resolver) {
            return Err(ConfError(format!(
                "\"{t}\" needs \"resolver=\" on an \"api=\" line"
            )));
        }
        let Some(service) = line.service else {
            return Err(ConfError("\"api=\" needs \"service=\"".into()));
        };
        if !valid_text(service, 256) || service.contains('/') {
            return Err(invalid(&format!("service={service}")));
        }
        for tag in line.tags {
            if !valid_text(tag, 256) {
                return Err(invalid(&format!("tag={tag}")));
            }
        }
        let datacenter = match line.datacenter {
            Some(dc) if !valid_dns_name(dc) || dc.contains('.') => {
                return Err(invalid(&format!("datacenter={dc}")))
            }
            dc => dc.map(str::to_string),
        };
        let filter = match self.filter {
            Some(f) if !valid_text(f, MAX_FILTER_LEN) => {
                return Err(invalid(&format!("filter={f}")))
            }
            f => f.map(str::to_string),
        };
        let wait_ms = match self.wait {
            None => DEFAULT_WAIT_MS,
            Some(w) => {
                let arg = format!("wait={w}");
                let ms = parse_time_ms(w).ok_or_else(|| invalid(&arg))?;
                if !(MIN_WAIT_MS..=MAX_WAIT_MS).contains(&ms) {
                    return Err(ConfError(format!(
                        "invalid parameter \"{arg}\": from 1s to 10m is allowed"
                    )));
                }
                ms
            }
        };
        let path = |p: Option<&str>, name: &str| match p {
            Some("") => Err(invalid(&format!("{name}="))),
            p => Ok(p.map(str::to_string)),
        };
        let ca_file = path(self.ca_file, "api_ca")?;
        if ca_file.is_some() && !agent.tls {
            return Err(ConfError(
                "\"api_ca=\" needs an \"https://\" address in \"api=\"".into(),
            ));
        }
        Ok(Some(ApiSettings {
            agent,
            service: service.to_string(),
            tags: line.tags.iter().map(|t| t.to_string()).collect(),
            datacenter,
            filter,
            only_passing: self.only_passing.is_some(),
            token_file: path(self.token_file, "token_file")?,
            token: None,
            ca_file,
            wait_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn parse(line: &str) -> Result<Settings, ConfError> {
        let args: Vec<&str> = line.split_whitespace().collect();
        Settings::parse(&args)
    }

    fn err(line: &str) -> String {
        parse(line).unwrap_err().0
    }

    fn api(line: &str) -> ApiSettings {
        parse(line).unwrap().api.unwrap()
    }

    #[test]
    fn agent_addresses() {
        let u = AgentUrl::parse("http://127.0.0.1:8500").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 8500));
        assert_eq!(u.to_string(), "http://127.0.0.1:8500");
        assert_eq!(AgentUrl::parse("http://127.0.0.1/").unwrap().port, 8500);
        let u = AgentUrl::parse("https://[::1]").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "::1", 8501));
        assert_eq!(u.to_string(), "https://[::1]:8501");
        assert_eq!(u.ip(), Some("::1".parse().unwrap()));
        let u = AgentUrl::parse("https://Consul.Service.Consul:443").unwrap();
        assert_eq!((u.host.as_str(), u.ip()), ("consul.service.consul", None));
        for bad in [
            "127.0.0.1:8500",
            "ftp://127.0.0.1",
            "http://",
            "http://127.0.0.1:0",
            "http://127.0.0.1:65536",
            "http://127.0.0.1:85a",
            "http://[::1",
            "http://[::1]8500",
            "http://[zz]:1",
            "http://::1:8500",
            "http://user@host:1",
            "http://host/v1",
            "http://ho_st:1",
            "http://host:",
        ] {
            assert_eq!(AgentUrl::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn tokens_never_print() {
        let t = Token::from_file_text(b"  0b7d9e0c-2f2e-4d6a-9c1e-5f0d7a1b2c3d\n").unwrap();
        assert_eq!(t.header_value(), "0b7d9e0c-2f2e-4d6a-9c1e-5f0d7a1b2c3d");
        assert_eq!(format!("{t:?}"), "Token(hidden)");
        let s = parse("service=redis api=http://127.0.0.1:8500").unwrap();
        let mut with = s.clone();
        with.api.as_mut().unwrap().token = Some(t);
        assert!(!format!("{with:?}").contains("0b7d9e0c"));
        assert_eq!(Token::from_file_text(b" \n"), Err("empty"));
        assert_eq!(
            Token::from_file_text(b"a b"),
            Err("not one line of printable characters")
        );
        assert_eq!(
            Token::from_file_text(b"abc\r\nX-Evil: 1"),
            Err("not one line of printable characters")
        );
        assert_eq!(Token::from_file_text(&[0xff]), Err("not text"));
        assert_eq!(Token::from_file_text(&[b'a'; 600]), Err("too long"));
    }

    #[test]
    fn an_api_line() {
        let s = parse("service=redis tag=primary tag=v2 datacenter=yunlu_office api=http://127.0.0.1:8500 token_file=/etc/nginx/consul.token only_passing filter=Service.Meta.zone==a").unwrap();
        let a = s.api.as_ref().unwrap();
        assert_eq!(a.tags, ["primary", "v2"]);
        assert_eq!(a.token_file.as_deref(), Some("/etc/nginx/consul.token"));
        assert!(a.only_passing);
        assert_eq!(a.wait_ms, DEFAULT_WAIT_MS);
        assert_eq!(
            a.target(),
            "/v1/health/service/redis?dc=yunlu_office&tag=primary&tag=v2&passing=1&filter=Service.Meta.zone%3D%3Da"
        );
        assert_eq!(
            s.query,
            "http://127.0.0.1:8500/v1/health/service/redis?dc=yunlu_office&tag=primary&tag=v2&passing=1&filter=Service.Meta.zone%3D%3Da"
        );
        assert_eq!(s.timeout_ms, DEFAULT_API_TIMEOUT_MS);
        assert!(s.resolvers.is_empty(), "no DNS resolver unless given");
        let a = api(
            "service=redis api=http://127.0.0.1:8500 wait=30s timeout=2s resolver=127.0.0.1 udp",
        );
        assert_eq!(
            a.target_with(0, 30_000),
            "/v1/health/service/redis",
            "index 0 does not block"
        );
        assert_eq!(
            a.target_with(7, 29_000),
            "/v1/health/service/redis?index=7&wait=29000ms"
        );
        let s = parse(
            "service=redis api=http://127.0.0.1:8500 wait=30s timeout=2s resolver=127.0.0.1 udp",
        )
        .unwrap();
        assert_eq!((s.timeout_ms, s.resolvers.len()), (2000, 1));
        assert_eq!(
            api("service=my%svc api=https://[::1]").target_with(1, 1000),
            "/v1/health/service/my%25svc?index=1&wait=1000ms"
        );
    }

    #[test]
    fn tags_and_names_are_encoded() {
        let a = api("service=web.api tag=version=1.2 tag=a&b api=http://127.0.0.1:8500");
        assert_eq!(
            a.target(),
            "/v1/health/service/web.api?tag=version%3D1.2&tag=a%26b"
        );
    }

    #[test]
    fn parameters_of_the_other_kind_are_refused() {
        let a = "api=http://127.0.0.1:8500";
        assert_eq!(
            err(&format!("redis.service.consul {a}")),
            "a query name and \"api=\" cannot both be given"
        );
        assert_eq!(
            err(&format!("service=redis domain=example {a}")),
            "\"domain=\" cannot be used with \"api=\""
        );
        assert_eq!(
            err(&format!("service=redis udp {a}")),
            "\"udp\" needs \"resolver=\" on an \"api=\" line"
        );
        assert_eq!(err(a), "\"api=\" needs \"service=\"");
        assert_eq!(
            err("tag=x api=http://127.0.0.1"),
            "\"api=\" needs \"service=\""
        );
        for (p, name) in [
            ("token_file=/x", "token_file="),
            ("filter=a", "filter="),
            ("api_ca=/x", "api_ca="),
            ("wait=1m", "wait="),
            ("only_passing", "only_passing"),
        ] {
            assert_eq!(
                err(&format!("redis.service.consul {p}")),
                format!("\"{name}\" needs \"api=\"")
            );
        }
        assert_eq!(
            err("service=redis api=http://127.0.0.1 only_passing only_passing"),
            "duplicate parameter \"only_passing\""
        );
        assert_eq!(
            err("service=redis tag=a tag=b"),
            "duplicate parameter \"tag\"",
            "one tag in a DNS name"
        );
        assert_eq!(
            err(&format!("service=redis api_ca=/ca.pem {a}")),
            "\"api_ca=\" needs an \"https://\" address in \"api=\""
        );
    }

    #[test]
    fn bad_api_values() {
        assert_eq!(
            err("service=redis api=127.0.0.1:8500"),
            "invalid API address \"127.0.0.1:8500\""
        );
        assert_eq!(
            err("service=redis api=http://127.0.0.1 wait=20m"),
            "invalid parameter \"wait=20m\": from 1s to 10m is allowed"
        );
        assert_eq!(
            err("service=redis api=http://127.0.0.1 wait=500ms"),
            "invalid parameter \"wait=500ms\": from 1s to 10m is allowed"
        );
        assert_eq!(
            err("service=redis api=http://127.0.0.1 wait=x"),
            "invalid parameter \"wait=x\""
        );
        assert_eq!(
            err("service=redis api=http://127.0.0.1 token_file="),
            "invalid parameter \"token_file=\""
        );
        assert_eq!(
            err("service=redis api=http://127.0.0.1 only_passing=1"),
            "invalid parameter \"only_passing=1\""
        );
        assert_eq!(
            err("service=a/b api=http://127.0.0.1"),
            "invalid parameter \"service=a/b\""
        );
        assert_eq!(
            err("service=redis datacenter=a.b api=http://127.0.0.1"),
            "invalid parameter \"datacenter=a.b\""
        );
        assert_eq!(
            err("service=redis api=http://127.0.0.1 api=http://127.0.0.2"),
            "duplicate parameter \"api\""
        );
    }
}
