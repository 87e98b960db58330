//! `consul_upstream` parameters to typed settings, with nginx's error phrasing.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::api::{ApiArgs, ApiSettings, LineArgs, DEFAULT_API_TIMEOUT_MS};
use crate::view::HealthPolicy;

/// Consul's DNS port: the port of a `resolver=` given without one.
pub const CONSUL_DNS_PORT: u16 = 8600;
/// Default shared memory per upstream: room for more peers than one DNS answer
/// can carry (about 1,400 Consul-shaped SRV records over TCP).
pub const DEFAULT_ZONE_SIZE: usize = 256 * 1024;
/// nginx's smallest shared zone: 8 pages.
pub const MIN_ZONE_SIZE: usize = 8 * 4096;
/// The largest zone accepted.
pub const MAX_ZONE_SIZE: usize = 1 << 30;
/// The longest time a parameter takes: 24 days keeps every timer nginx arms below
/// 2^31 ms, which its timer tree compares as a signed number.
pub const MAX_TIME_MS: u64 = 24 * 86_400_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

/// What to do with the last good set when discovery has nothing better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Keep,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The SRV name, lower case, without the root dot.
    pub query: String,
    pub resolvers: Vec<SocketAddr>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub transport: Transport,
    pub on_empty: Policy,
    pub on_error: Policy,
    pub max_stale_ms: Option<u64>,
    pub zone_size: usize,
    pub state_path: Option<String>,
    pub health: HealthPolicy,
    /// `slow_start`: how long a joining or recovering peer ramps up (0: off).
    pub slow_start_ms: u64,
    /// `max_conns`: open connections per peer, all workers together (0: no limit).
    pub max_conns: u32,
    /// `api=`: the line watches Consul's HTTP API instead of its DNS interface
    /// (`query` then names the request; `resolvers` only resolve host names).
    pub api: Option<ApiSettings>,
}

/// A configuration error, worded as nginx words them (the caller adds file:line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfError(pub String);

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn invalid(arg: &str) -> ConfError {
    ConfError(format!("invalid parameter \"{arg}\""))
}

/// nginx's time syntax in milliseconds, as `ngx_parse_time(value, 0)` reads
/// it (nginx's `*_timeout` directives): numbers each followed by a unit, `w`,
/// `d`, `h`, `m`, `s`, `ms`, in this order and each at most once (`1s1s` and
/// `30s1m` are not times); a number without a unit, last, counts as seconds
/// (`90`, `1m30`); spaces may separate the parts. A value too large for nginx
/// comes back as `u64::MAX` (the caller bounds it).
pub fn parse_time_ms(s: &str) -> Option<u64> {
    // ngx_parse_time's steps; milliseconds start past years and months.
    const WEEK: u8 = 3;
    const DAY: u8 = 4;
    const HOUR: u8 = 5;
    const MIN: u8 = 6;
    const SEC: u8 = 7;
    const MSEC: u8 = 8;
    const LAST: u8 = 9;
    let b = s.as_bytes();
    let (mut step, mut valid) = (2u8, false);
    let (mut value, mut total) = (0u128, 0u128);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        i += 1;
        if c.is_ascii_digit() {
            value = (value * 10 + u128::from(c - b'0')).min(u128::from(u64::MAX));
            valid = true;
            continue;
        }
        let (next, scale_ms) = match c {
            b'w' => (WEEK, 7 * 86_400_000),
            b'd' => (DAY, 86_400_000),
            b'h' => (HOUR, 3_600_000),
            b'm' if b.get(i) == Some(&b's') => {
                i += 1;
                (MSEC, 1)
            }
            b'm' => (MIN, 60_000),
            b's' => (SEC, 1_000),
            // A space ends a number of seconds (after no unit of seconds or less).
            b' ' if step < SEC => (LAST, 1_000),
            _ => return None,
        };
        if step >= next {
            return None;
        }
        step = next;
        total = total.saturating_add(value * scale_ms);
        value = 0;
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
    }
    if !valid {
        return None;
    }
    let total = total.saturating_add(value * 1_000);
    Some(u64::try_from(total).unwrap_or(u64::MAX))
}

/// nginx size syntax: `65536`, `64k`, `1m`.
pub fn parse_size(s: &str) -> Option<usize> {
    let (num, scale) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024),
        b'm' | b'M' => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<usize>().ok()?.checked_mul(scale)
}

/// `ADDR`, `ADDR:PORT`, `[V6]`, `[V6]:PORT` or a bare IPv6 address; port 8600 by default.
pub fn parse_resolver(s: &str) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return (sa.port() != 0).then_some(sa);
    }
    let host = s
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(s);
    host.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, CONSUL_DNS_PORT))
}

/// Checks an SRV name: LDH labels plus `_` (Consul's RFC 2782 form and dc names use it).
pub fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn valid_label(l: &str) -> bool {
    !l.contains('.') && valid_dns_name(l)
}

#[derive(Default)]
struct Structured<'a> {
    service: Option<&'a str>,
    /// Several only on an API line.
    tags: Vec<&'a str>,
    datacenter: Option<&'a str>,
    domain: Option<&'a str>,
}

impl Settings {
    /// Parses the directive's arguments (without the directive name).
    pub fn parse<'a>(args: &[&'a str]) -> Result<Settings, ConfError> {
        let mut query: Option<&str> = None;
        let mut st = Structured::default();
        let mut resolvers = Vec::new();
        let mut s = Settings {
            query: String::new(),
            resolvers: Vec::new(),
            interval_ms: 1_000,
            timeout_ms: 1_000,
            transport: Transport::Tcp,
            on_empty: Policy::Keep,
            on_error: Policy::Keep,
            max_stale_ms: None,
            zone_size: DEFAULT_ZONE_SIZE,
            state_path: None,
            health: HealthPolicy::default(),
            slow_start_ms: 0,
            max_conns: 0,
            api: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        let mut api = ApiArgs::default();
        let mut transport: Option<&str> = None;
        let mut timeout_given = false;

        for &arg in args {
            let (key, value) = match arg.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (arg, None),
            };
            if key != "resolver" && key != "tag" && value.is_some() {
                if seen.contains(&key) {
                    return Err(ConfError(format!("duplicate parameter \"{key}\"")));
                }
                seen.push(key);
            }
            if value.is_none() && (arg == "tcp" || arg == "udp") {
                match transport {
                    Some(t) if t == arg => {
                        return Err(ConfError(format!("duplicate parameter \"{arg}\"")))
                    }
                    Some(_) => {
                        return Err(ConfError("\"tcp\" and \"udp\" cannot both be given".into()))
                    }
                    None => transport = Some(arg),
                }
            }
            let time = |v: Option<&str>| {
                let t = v.and_then(parse_time_ms).ok_or_else(|| invalid(arg))?;
                if t > MAX_TIME_MS {
                    return Err(ConfError(format!(
                        "invalid parameter \"{arg}\": at most 24d is allowed"
                    )));
                }
                Ok(t)
            };
            let label =
                |v: Option<&'a str>| v.filter(|v| valid_label(v)).ok_or_else(|| invalid(arg));
            let policy = |v: Option<&str>| match v {
                Some("keep") => Ok(Policy::Keep),
                Some("fail") => Ok(Policy::Fail),
                _ => Err(invalid(arg)),
            };
            if api.take(key, value, arg)? {
                continue;
            }
            match (key, value) {
                ("tcp", None) => s.transport = Transport::Tcp,
                ("udp", None) => s.transport = Transport::Udp,
                ("resolver", Some(v)) => {
                    let addr = parse_resolver(v)
                        .ok_or_else(|| ConfError(format!("invalid resolver address \"{v}\"")))?;
                    resolvers.push(addr);
                }
                ("interval", v) => s.interval_ms = time(v).and_then(|t| nonzero(t, arg))?,
                ("timeout", v) => {
                    s.timeout_ms = time(v).and_then(|t| nonzero(t, arg))?;
                    timeout_given = true;
                }
                ("fail_timeout", v) => s.health.fail_timeout_ms = time(v)?,
                ("slow_start", v) => s.slow_start_ms = time(v)?,
                ("max_stale", Some("off")) => s.max_stale_ms = None,
                ("max_stale", v) => s.max_stale_ms = Some(time(v).and_then(|t| nonzero(t, arg))?),
                ("on_empty", v) => s.on_empty = policy(v)?,
                ("on_error", v) => s.on_error = policy(v)?,
                ("max_fails", Some(v)) if digits(v) => {
                    s.health.max_fails = v.parse().map_err(|_| invalid(arg))?
                }
                ("max_conns", Some(v)) if digits(v) => {
                    s.max_conns = v.parse().map_err(|_| invalid(arg))?
                }
                ("zone", Some(v)) => {
                    let size = parse_size(v).ok_or_else(|| invalid(arg))?;
                    if size < MIN_ZONE_SIZE {
                        return Err(ConfError(format!(
                            "invalid parameter \"{arg}\": at least 32k is needed"
                        )));
                    }
                    if size > MAX_ZONE_SIZE {
                        return Err(ConfError(format!(
                            "invalid parameter \"{arg}\": at most 1024m is allowed"
                        )));
                    }
                    s.zone_size = size;
                }
                ("state", Some(v)) if !v.is_empty() => s.state_path = Some(v.to_string()),
                // Checked below: an API line takes names DNS cannot carry.
                ("service", Some(v)) => st.service = Some(v),
                ("tag", Some(v)) => st.tags.push(v),
                ("datacenter", v) => st.datacenter = Some(label(v)?),
                ("domain", v) => {
                    st.domain = Some(
                        v.filter(|v| valid_dns_name(v))
                            .ok_or_else(|| invalid(arg))?,
                    )
                }
                (_, None) if query.is_none() && !arg.is_empty() && looks_like_name(arg) => {
                    if !valid_dns_name(arg) {
                        return Err(ConfError(format!("invalid query \"{arg}\"")));
                    }
                    query = Some(arg);
                }
                // `consul_upstream redis;`: a service name where a query goes.
                (_, None)
                    if query.is_none()
                        && st.service.is_none()
                        && valid_label(arg)
                        && !PARAMETERS.contains(&arg) =>
                {
                    return Err(ConfError(format!(
                        "invalid parameter \"{arg}\": a query is an SRV name such as \"{arg}.service.consul\", or use \"service={arg}\""
                    )));
                }
                _ => return Err(invalid(arg)),
            }
        }

        let line = LineArgs {
            query,
            service: st.service,
            tags: &st.tags,
            datacenter: st.datacenter,
            domain: st.domain,
            transport,
            has_resolver: !resolvers.is_empty(),
        };
        if let Some(api) = api.finish(&line)? {
            s.query = api.query();
            s.resolvers = resolvers;
            if !timeout_given {
                s.timeout_ms = DEFAULT_API_TIMEOUT_MS;
            }
            s.api = Some(api);
            return Ok(s);
        }
        if st.tags.len() > 1 {
            return Err(ConfError("duplicate parameter \"tag\"".into()));
        }
        for (v, key) in st
            .service
            .iter()
            .map(|v| (*v, "service"))
            .chain(st.tags.iter().map(|v| (*v, "tag")))
        {
            if !valid_label(v) {
                return Err(invalid(&format!("{key}={v}")));
            }
        }
        let tag = st.tags.first().copied();
        s.query = match (query, st.service) {
            (Some(_), Some(_)) => {
                return Err(ConfError(
                    "a query name and \"service=\" cannot both be given".into(),
                ))
            }
            (Some(q), None) => {
                if tag.is_some() || st.datacenter.is_some() || st.domain.is_some() {
                    return Err(ConfError(
                        "\"tag=\", \"datacenter=\" and \"domain=\" need \"service=\"".into(),
                    ));
                }
                q.trim_end_matches('.').to_ascii_lowercase()
            }
            (None, Some(service)) => consul_name(service, tag, st.datacenter, st.domain),
            (None, None) => return Err(ConfError("a query name or \"service=\" is needed".into())),
        };
        if !valid_dns_name(&s.query) {
            return Err(ConfError(format!("invalid query \"{}\"", s.query)));
        }
        s.resolvers = if resolvers.is_empty() {
            vec![SocketAddr::from(([127, 0, 0, 1], CONSUL_DNS_PORT))]
        } else {
            resolvers
        };
        Ok(s)
    }
}

fn nonzero(t: u64, arg: &str) -> Result<u64, ConfError> {
    if t == 0 {
        Err(invalid(arg))
    } else {
        Ok(t)
    }
}

/// Parameters that concern the whole upstream (its zone, state file, passive
/// health, slow start and connection limit) rather than one query: with several `consul_upstream` lines in one
/// upstream, only the first may set them. Returns the first such argument.
pub fn upstream_wide_param<'a>(args: &[&'a str]) -> Option<&'a str> {
    const KEYS: [&str; 6] = [
        "zone",
        "state",
        "max_fails",
        "fail_timeout",
        "slow_start",
        "max_conns",
    ];
    args.iter()
        .copied()
        .find(|a| a.split_once('=').is_some_and(|(k, _)| KEYS.contains(&k)))
}

/// The parameters' names and keyword values: a bare one is not taken for a
/// service name.
const PARAMETERS: [&str; 27] = [
    "service",
    "tag",
    "datacenter",
    "domain",
    "resolver",
    "interval",
    "timeout",
    "tcp",
    "udp",
    "on_empty",
    "on_error",
    "max_stale",
    "zone",
    "state",
    "max_fails",
    "fail_timeout",
    "slow_start",
    "max_conns",
    "api",
    "token_file",
    "filter",
    "api_ca",
    "wait",
    "only_passing",
    "keep",
    "fail",
    "off",
];

/// A count as nginx's `ngx_atoi` takes it: digits only (no sign, no space).
fn digits(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())
}

/// A bare word with a dot is a query; other bare words are unknown flags.
fn looks_like_name(arg: &str) -> bool {
    arg.contains('.')
}

/// Consul's name for a service: `[tag.]service.service[.dc].domain`.
pub fn consul_name(
    service: &str,
    tag: Option<&str>,
    dc: Option<&str>,
    domain: Option<&str>,
) -> String {
    let mut name = String::new();
    if let Some(tag) = tag {
        name.push_str(tag);
        name.push('.');
    }
    name.push_str(service);
    name.push_str(".service.");
    if let Some(dc) = dc {
        name.push_str(dc);
        name.push('.');
    }
    name.push_str(domain.unwrap_or("consul").trim_end_matches('.'));
    name.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Settings, ConfError> {
        let args: Vec<&str> = line.split_whitespace().collect();
        Settings::parse(&args)
    }

    fn err(line: &str) -> String {
        parse(line).unwrap_err().0
    }

    #[test]
    fn defaults() {
        let s = parse("redis.service.yunlu_office.consul").unwrap();
        assert_eq!(s.query, "redis.service.yunlu_office.consul");
        assert_eq!(s.resolvers, ["127.0.0.1:8600".parse().unwrap()]);
        assert_eq!((s.interval_ms, s.timeout_ms), (1000, 1000));
        assert_eq!(s.transport, Transport::Tcp);
        assert_eq!(
            (s.on_empty, s.on_error, s.max_stale_ms),
            (Policy::Keep, Policy::Keep, None)
        );
        assert_eq!(s.zone_size, DEFAULT_ZONE_SIZE);
        assert_eq!(s.health, HealthPolicy::default());
        assert_eq!(s.slow_start_ms, 0);
    }

    #[test]
    fn query_forms() {
        assert_eq!(
            parse("primary.redis.service.consul.").unwrap().query,
            "primary.redis.service.consul"
        );
        assert_eq!(
            parse("_redis._primary.service.consul").unwrap().query,
            "_redis._primary.service.consul"
        );
        assert_eq!(
            parse("Redis.Service.Consul").unwrap().query,
            "redis.service.consul"
        );
        assert_eq!(
            err("redis..service.consul"),
            "invalid query \"redis..service.consul\""
        );
        assert_eq!(
            err("re$dis.service.consul"),
            "invalid query \"re$dis.service.consul\""
        );
    }

    #[test]
    fn structured_form() {
        let s = parse("service=redis tag=primary datacenter=yunlu_office").unwrap();
        assert_eq!(s.query, "primary.redis.service.yunlu_office.consul");
        assert_eq!(
            parse("service=redis").unwrap().query,
            "redis.service.consul"
        );
        assert_eq!(
            parse("service=redis domain=example.org.").unwrap().query,
            "redis.service.example.org"
        );
        assert_eq!(
            err("redis.service.consul service=redis"),
            "a query name and \"service=\" cannot both be given"
        );
        assert_eq!(
            err("redis.service.consul tag=x"),
            "\"tag=\", \"datacenter=\" and \"domain=\" need \"service=\""
        );
        assert_eq!(err("tag=x"), "a query name or \"service=\" is needed");
        assert_eq!(err("service=a.b"), "invalid parameter \"service=a.b\"");
        assert_eq!(err("service="), "invalid parameter \"service=\"");
    }

    #[test]
    fn resolvers_in_order_with_default_port() {
        let s = parse("r.service.consul resolver=10.0.0.1 resolver=10.0.0.2:53 resolver=[::1]:8601 resolver=::2").unwrap();
        let want: Vec<SocketAddr> = ["10.0.0.1:8600", "10.0.0.2:53", "[::1]:8601", "[::2]:8600"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(s.resolvers, want);
        assert_eq!(
            err("r.service.consul resolver=consul.local"),
            "invalid resolver address \"consul.local\""
        );
        assert_eq!(
            err("r.service.consul resolver=1.2.3.4:0"),
            "invalid resolver address \"1.2.3.4:0\""
        );
        assert_eq!(
            err("r.service.consul resolver=1.2.3.4:99999"),
            "invalid resolver address \"1.2.3.4:99999\""
        );
    }

    #[test]
    fn times_sizes_policies() {
        let s = parse("r.service.consul interval=500ms timeout=2s max_stale=1m30s udp on_empty=fail on_error=fail zone=1m max_fails=3 fail_timeout=0 state=/tmp/x slow_start=30s").unwrap();
        assert_eq!(s.slow_start_ms, 30_000);
        assert_eq!(
            (s.interval_ms, s.timeout_ms, s.max_stale_ms),
            (500, 2000, Some(90_000))
        );
        assert_eq!(s.transport, Transport::Udp);
        assert_eq!((s.on_empty, s.on_error), (Policy::Fail, Policy::Fail));
        assert_eq!(
            (s.zone_size, s.health.max_fails, s.health.fail_timeout_ms),
            (1 << 20, 3, 0)
        );
        assert_eq!(s.state_path.as_deref(), Some("/tmp/x"));
        assert_eq!(
            parse("r.service.consul max_stale=off")
                .unwrap()
                .max_stale_ms,
            None
        );
    }

    #[test]
    fn bad_parameters() {
        assert_eq!(
            err("r.service.consul interval=abc"),
            "invalid parameter \"interval=abc\""
        );
        assert_eq!(
            err("r.service.consul interval=0"),
            "invalid parameter \"interval=0\""
        );
        assert_eq!(
            err("r.service.consul interval"),
            "invalid parameter \"interval\""
        );
        assert_eq!(
            err("r.service.consul timeout=1x"),
            "invalid parameter \"timeout=1x\""
        );
        assert_eq!(
            err("r.service.consul on_empty=maybe"),
            "invalid parameter \"on_empty=maybe\""
        );
        assert_eq!(
            err("r.service.consul foo=bar"),
            "invalid parameter \"foo=bar\""
        );
        assert_eq!(err("r.service.consul weird"), "invalid parameter \"weird\"");
        assert_eq!(
            err("r.service.consul zone=1k"),
            "invalid parameter \"zone=1k\": at least 32k is needed"
        );
        assert_eq!(
            err("r.service.consul zone=big"),
            "invalid parameter \"zone=big\""
        );
        assert_eq!(
            err("r.service.consul max_fails=-1"),
            "invalid parameter \"max_fails=-1\""
        );
        assert_eq!(
            err("r.service.consul state="),
            "invalid parameter \"state=\""
        );
        assert_eq!(
            err("r.service.consul interval=1s interval=2s"),
            "duplicate parameter \"interval\""
        );
        assert_eq!(
            err("r.service.consul tcp tcp"),
            "duplicate parameter \"tcp\""
        );
        assert_eq!(
            err("r.service.consul tcp udp"),
            "\"tcp\" and \"udp\" cannot both be given"
        );
        assert_eq!(
            err("r.service.consul udp tcp"),
            "\"tcp\" and \"udp\" cannot both be given"
        );
        assert_eq!(
            err("r.service.consul max_fails=+3"),
            "invalid parameter \"max_fails=+3\""
        );
        assert_eq!(
            err("r.service.consul max_fails="),
            "invalid parameter \"max_fails=\""
        );
        assert_eq!(err("a.consul b.consul"), "invalid parameter \"b.consul\"");
        assert_eq!(
            err("r.service.consul interval=25d"),
            "invalid parameter \"interval=25d\": at most 24d is allowed"
        );
        assert_eq!(
            err("r.service.consul max_stale=106751991167d"),
            "invalid parameter \"max_stale=106751991167d\": at most 24d is allowed"
        );
        assert_eq!(
            parse("r.service.consul interval=24d").unwrap().interval_ms,
            MAX_TIME_MS
        );
        assert_eq!(
            err("r.service.consul zone=2048m"),
            "invalid parameter \"zone=2048m\": at most 1024m is allowed"
        );
    }

    #[test]
    fn upstream_wide_parameters_are_found() {
        let args = ["r.service.consul", "interval=2s", "zone=128k", "state=/x"];
        assert_eq!(upstream_wide_param(&args), Some("zone=128k"));
        assert_eq!(
            upstream_wide_param(&["r.service.consul", "max_fails=3"]),
            Some("max_fails=3")
        );
        assert_eq!(
            upstream_wide_param(&["r.service.consul", "fail_timeout=1s"]),
            Some("fail_timeout=1s")
        );
        assert_eq!(
            upstream_wide_param(&["r.service.consul", "slow_start=10s"]),
            Some("slow_start=10s")
        );
        assert_eq!(
            upstream_wide_param(&["r.service.consul", "interval=1s", "udp", "zone"]),
            None
        );
    }

    #[test]
    fn max_conns_is_a_count_per_peer_for_the_whole_upstream() {
        assert_eq!(parse("r.service.consul").unwrap().max_conns, 0);
        assert_eq!(parse("r.service.consul max_conns=3").unwrap().max_conns, 3);
        assert_eq!(parse("r.service.consul max_conns=0").unwrap().max_conns, 0);
        for bad in [
            "max_conns=-1",
            "max_conns=x",
            "max_conns=",
            "max_conns",
            "max_conns=4294967296",
            "max_conns=+3",
        ] {
            assert_eq!(
                err(&format!("r.service.consul {bad}")),
                format!("invalid parameter \"{bad}\"")
            );
        }
        assert_eq!(
            upstream_wide_param(&["r.service.consul", "max_conns=2"]),
            Some("max_conns=2")
        );
    }

    #[test]
    fn upstream_wide_parameters_on_an_api_line() {
        let s = parse(
            "service=redis api=http://127.0.0.1:8500 zone=64k state=/tmp/r.state \
             max_fails=3 fail_timeout=5s slow_start=10s max_conns=4",
        )
        .unwrap();
        assert!(s.api.is_some());
        assert_eq!(
            (s.zone_size, s.state_path.as_deref(), s.max_conns),
            (64 * 1024, Some("/tmp/r.state"), 4)
        );
        assert_eq!(
            (
                s.health.max_fails,
                s.health.fail_timeout_ms,
                s.slow_start_ms
            ),
            (3, 5_000, 10_000)
        );
        assert_eq!(
            upstream_wide_param(&["service=redis", "api=http://127.0.0.1", "max_conns=2"]),
            Some("max_conns=2")
        );
        assert_eq!(
            err("service=redis api=http://127.0.0.1 max_conns=x"),
            "invalid parameter \"max_conns=x\""
        );
    }

    #[test]
    fn a_bare_service_name_is_explained() {
        assert_eq!(
            err("redis"),
            "invalid parameter \"redis\": a query is an SRV name such as \"redis.service.consul\", or use \"service=redis\""
        );
        assert_eq!(
            err("redis resolver=127.0.0.1"),
            "invalid parameter \"redis\": a query is an SRV name such as \"redis.service.consul\", or use \"service=redis\""
        );
        // Not where a query is given already, nor for the parameters' own words.
        assert_eq!(err("r.service.consul redis"), "invalid parameter \"redis\"");
        assert_eq!(err("service=r redis"), "invalid parameter \"redis\"");
        assert_eq!(err("interval"), "invalid parameter \"interval\"");
        assert_eq!(err("keep"), "invalid parameter \"keep\"");
        for word in ["max_conns", "api", "token_file", "filter", "api_ca", "wait"] {
            assert_eq!(err(word), format!("invalid parameter \"{word}\""));
        }
        assert_eq!(err("re$dis"), "invalid parameter \"re$dis\"");
    }

    #[test]
    fn times_are_read_as_nginx_reads_them() {
        // ngx_parse_time(value, 0), case by case; which of them nginx 1.28.3
        // accepts was checked with `proxy_timeout "VALUE";` and nginx -t.
        for (text, ms) in [
            ("30", Some(30_000)),
            ("500ms", Some(500)),
            ("1h2m3s4ms", Some(3_723_004)),
            ("1d", Some(86_400_000)),
            ("1w", Some(7 * 86_400_000)),
            ("1m30", Some(90_000)),
            ("1s30", Some(31_000)),
            ("1m 30s", Some(90_000)),
            ("30 ", Some(30_000)),
            ("1d 2h", Some(93_600_000)),
            ("0", Some(0)),
            ("m1", Some(1_000)),
            // units out of order or repeated: not a time
            ("1s1s", None),
            ("30s1m", None),
            ("1ms1s", None),
            ("1m1m", None),
            ("1h1d", None),
            ("1ms1ms", None),
            ("1s ", Some(1_000)),
            ("1ms 2", Some(2_001)),
            ("1 2", Some(3_000)),
            ("1s  2", Some(3_000)),
            ("1w2d3h4m5s6ms", Some(788_645_006)),
            ("1 s", None),
            (" 1s", None),
            ("2 ms", None),
            ("w", None),
            // no number, unknown or years/months (seconds-only units)
            ("", None),
            ("s", None),
            ("ms", None),
            ("1y", None),
            ("1M", None),
            ("1x", None),
            ("-1s", None),
            ("1.5s", None),
        ] {
            assert_eq!(parse_time_ms(text), ms, "{text:?}");
        }
        assert_eq!(parse_time_ms("99999999999999999999"), Some(u64::MAX));
        assert_eq!(
            err("r.service.consul interval=1s1s"),
            "invalid parameter \"interval=1s1s\""
        );
        assert_eq!(
            err("r.service.consul timeout=30s1m"),
            "invalid parameter \"timeout=30s1m\""
        );
        assert_eq!(
            err("r.service.consul interval=99999999999999999999"),
            "invalid parameter \"interval=99999999999999999999\": at most 24d is allowed"
        );
        assert_eq!(
            parse("r.service.consul interval=3w").unwrap().interval_ms,
            21 * 86_400_000
        );
    }

    #[test]
    fn time_and_size_syntax() {
        assert_eq!(parse_time_ms("30"), Some(30_000));
        assert_eq!(parse_time_ms("1h2m3s4ms"), Some(3_723_004));
        assert_eq!(parse_time_ms("1d"), Some(86_400_000));
        assert_eq!(parse_time_ms("s"), None);
        assert_eq!(parse_time_ms("1y"), None);
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("1g"), None);
    }
}
