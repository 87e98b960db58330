//! The status report: what the balancer sees, per upstream, `consul_upstream`
//! line and peer — read from an upstream's zone and its configuration, and
//! rendered as JSON or as Prometheus text (exposition format 0.0.4).
//!
//! Reading takes no lock: the set comes from [`Zone::read`], line records from
//! [`Zone::line`] (each consistent on its own), peer state from the slots'
//! atomics. Counters live in the zone, so every worker reports the same ones,
//! and they survive reloads; a peer that leaves and returns gets a reset slot,
//! so its counters start again from zero, as Prometheus expects of a new series.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use crate::key::UpstreamKey;
use crate::peer::Peer;
use crate::settings::{Settings, Transport};
use crate::view::HealthPolicy;
use crate::zone::{LineStatus, SetKind, StreakKind, Zone};

/// Content type of [`json`].
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// Content type of [`prometheus`]: the text exposition format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One `consul_upstream` line as configured: every worker has it.
#[derive(Clone, Copy, Debug)]
pub struct LineConf<'a> {
    pub settings: &'a Settings,
    /// `source_tag` of the query.
    pub tag: u32,
}

/// One upstream as configured.
#[derive(Clone, Debug)]
pub struct UpstreamConf<'a> {
    pub key: UpstreamKey,
    /// Never empty; the first line holds the upstream-wide parameters.
    pub lines: Vec<LineConf<'a>>,
    /// Static `server` lines of the block.
    pub fallback_servers: usize,
}

/// The whole report: every upstream, at one moment, in the caller's order
/// (stream upstreams, then http, each in configuration order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub now_unix: u64,
    pub upstreams: Vec<UpstreamReport>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamReport {
    /// Protocol and name: a stream and an http upstream may share a name.
    pub key: UpstreamKey,
    pub generation: u64,
    /// Peers the zone holds.
    pub capacity: usize,
    pub health: HealthPolicy,
    /// `max_conns` per peer (0: no limit).
    pub max_conns: u32,
    pub fallback_servers: usize,
    /// The set could not be read (being rewritten on every try, or no zone):
    /// no peers are reported rather than a wrong set.
    pub busy: bool,
    pub lines: Vec<LineReport>,
    pub peers: Vec<PeerReport>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineReport {
    pub query: String,
    pub resolvers: Vec<SocketAddr>,
    pub transport: Transport,
    pub interval_ms: u64,
    pub max_stale_ms: Option<u64>,
    /// An `api=` line's agent (`http://127.0.0.1:8500`); `None` for a DNS line.
    pub api: Option<String>,
    /// The line's record in the zone (default: none yet).
    pub record: LineStatus,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerReport {
    pub peer: Peer,
    /// Index of the line it came from (`None`: a line a reload removed, whose
    /// peers the new discovery process has not taken out yet).
    pub line: Option<usize>,
    /// Down by passive health until then (Unix seconds, rounded up).
    pub down_until_unix: Option<u64>,
    /// Failed attempts in the current `fail_timeout` window.
    pub fails: u32,
    /// Open connections, all workers.
    pub active: u32,
    /// Connections made since the peer appeared.
    pub connections: u64,
    /// Failed attempts since the peer appeared.
    pub failures: u64,
    /// When the peer appeared (Unix seconds).
    pub since_unix: u64,
}

impl PeerReport {
    pub fn usable(&self) -> bool {
        self.down_until_unix.is_none()
    }
}

/// A peer's tier: priority, how many peers, how many usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    pub priority: u16,
    pub peers: usize,
    pub usable: usize,
}

/// When a peer with these counters is down until (monotonic ms), or `None` if
/// usable: `core::view`'s rule — down after `max_fails` failures, for
/// `fail_timeout` from the start of the window (`checked`). A single peer is
/// never down: the balancer always tries it, as nginx tries a lone server.
pub fn down_until_ms(
    policy: &HealthPolicy,
    fails: u32,
    checked_ms: u64,
    now_ms: u64,
    single: bool,
) -> Option<u64> {
    if single {
        return None;
    }
    policy.down_until(fails, checked_ms, now_ms)
}

/// `max_stale` left for a line: seconds until its peers are dropped if no
/// answer comes; `None` without `max_stale` or without peers to drop.
pub fn max_stale_left_s(line: &LineReport, now_unix: u64) -> Option<u64> {
    let max_s = line.max_stale_ms? / 1000;
    let rec = &line.record;
    if rec.peers == 0 || rec.confirmed_unix == 0 {
        return None;
    }
    Some(max_s.saturating_sub(now_unix.saturating_sub(rec.confirmed_unix)))
}

impl UpstreamReport {
    /// Reads one upstream: its configuration and, when mapped, its zone.
    pub fn read(
        conf: &UpstreamConf<'_>,
        zone: Option<&Zone<'_>>,
        now_unix: u64,
        now_ms: u64,
    ) -> Self {
        let health = conf
            .lines
            .first()
            .map_or_else(HealthPolicy::default, |l| l.settings.health);
        let max_conns = conf.lines.first().map_or(0, |l| l.settings.max_conns);
        let lines = conf
            .lines
            .iter()
            .map(|l| LineReport {
                query: l.settings.query.clone(),
                resolvers: l.settings.resolvers.clone(),
                transport: l.settings.transport,
                interval_ms: l.settings.interval_ms,
                max_stale_ms: l.settings.max_stale_ms,
                api: l.settings.api.as_ref().map(|a| a.agent.to_string()),
                record: zone.and_then(|z| z.line(l.tag)).unwrap_or_default(),
            })
            .collect();
        let mut report = UpstreamReport {
            key: conf.key.clone(),
            generation: 0,
            capacity: 0,
            health,
            max_conns,
            fallback_servers: conf.fallback_servers,
            busy: true,
            lines,
            peers: Vec::new(),
        };
        let Some(zone) = zone else { return report };
        report.capacity = zone.capacity();
        report.generation = zone.generation();
        let Some(snap) = zone.read() else {
            return report;
        };
        report.busy = false;
        report.generation = snap.generation;
        let single = snap.peers.len() == 1;
        report.peers = snap
            .peers
            .iter()
            .filter_map(|sp| {
                let slot = zone.slot(sp.slot)?;
                let fails = slot.fails.load(Ordering::Relaxed);
                let checked_ms = slot.checked_ms.load(Ordering::Relaxed);
                let peer = PeerReport {
                    peer: sp.peer,
                    line: conf.lines.iter().position(|l| l.tag == sp.tag),
                    down_until_unix: down_until_ms(&health, fails, checked_ms, now_ms, single)
                        .map(|until| now_unix + (until - now_ms).div_ceil(1000)),
                    fails,
                    active: slot.conns.load(Ordering::Relaxed),
                    connections: slot.connections.load(Ordering::Relaxed),
                    failures: slot.failures.load(Ordering::Relaxed),
                    since_unix: slot.since_unix.load(Ordering::Relaxed),
                };
                // The slot went to another peer since the set was read: this
                // one has left; its numbers would be the newcomer's.
                (slot.epoch.load(Ordering::Acquire) == sp.epoch).then_some(peer)
            })
            .collect();
        report
    }

    pub fn usable(&self) -> usize {
        self.peers.iter().filter(|p| p.usable()).count()
    }

    /// Whether the static `server` lines serve now: no discovered peer can.
    pub fn serving_fallback(&self) -> bool {
        self.fallback_servers > 0 && !self.busy && self.usable() == 0
    }

    /// Peers per priority tier, lowest priority value first (peers are in
    /// canonical order: by priority).
    pub fn tiers(&self) -> Vec<Tier> {
        let mut tiers: Vec<Tier> = Vec::new();
        for p in &self.peers {
            let prio = p.peer.priority;
            if tiers.last().is_none_or(|t| t.priority != prio) {
                tiers.push(Tier {
                    priority: prio,
                    peers: 0,
                    usable: 0,
                });
            }
            if let Some(t) = tiers.last_mut() {
                t.peers += 1;
                t.usable += usize::from(p.usable());
            }
        }
        tiers
    }

    fn query_of(&self, p: &PeerReport) -> Option<&str> {
        p.line
            .and_then(|i| self.lines.get(i))
            .map(|l| l.query.as_str())
    }
}

pub fn set_name(kind: SetKind) -> &'static str {
    match kind {
        SetKind::None => "none",
        SetKind::Live => "live",
        SetKind::Kept => "kept",
        SetKind::StateFile => "state_file",
        SetKind::Dropped => "dropped",
    }
}

const SETS: [SetKind; 5] = [
    SetKind::None,
    SetKind::Live,
    SetKind::Kept,
    SetKind::StateFile,
    SetKind::Dropped,
];

pub fn streak_name(kind: StreakKind) -> &'static str {
    match kind {
        StreakKind::None => "none",
        StreakKind::Empty => "empty",
        StreakKind::Failed => "error",
        StreakKind::Oversize => "oversize",
    }
}

const STREAKS: [StreakKind; 4] = [
    StreakKind::None,
    StreakKind::Empty,
    StreakKind::Failed,
    StreakKind::Oversize,
];

fn streak_of(v: u32) -> StreakKind {
    STREAKS
        .into_iter()
        .find(|k| *k as u32 == v)
        .unwrap_or(StreakKind::None)
}

/// Lookup outcomes in the order of `LineStatus::lookups`.
pub const OUTCOMES: [&str; 4] = ["ok", "empty", "error", "oversize"];

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

// ---------------------------------------------------------------------------
// JSON

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A Unix time, or null for "never" (0).
fn json_time(t: u64) -> String {
    if t == 0 {
        "null".into()
    } else {
        t.to_string()
    }
}

fn json_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "null".into(), |v| v.to_string())
}

/// The report as one JSON document (README, "Status and metrics").
pub fn json(report: &Report) -> String {
    let mut o = String::with_capacity(512 + 400 * report.upstreams.len());
    let _ = write!(o, "{{\"time\":{},\"upstreams\":[", report.now_unix);
    for (i, u) in report.upstreams.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        json_upstream(&mut o, u, report.now_unix);
    }
    o.push_str("]}\n");
    o
}

fn json_upstream(o: &mut String, u: &UpstreamReport, now_unix: u64) {
    o.push_str("\n{\"name\":");
    json_str(o, &u.key.name);
    let _ = write!(
        o,
        ",\"protocol\":\"{}\",\"generation\":{},\"capacity\":{},\"busy\":{},\"peers_total\":{},\"usable_peers\":{},\"max_fails\":{},\"fail_timeout_ms\":{},\"max_conns\":{}",
        u.key.label(),
        u.generation,
        u.capacity,
        u.busy,
        u.peers.len(),
        u.usable(),
        u.health.max_fails,
        u.health.fail_timeout_ms,
        json_opt((u.max_conns > 0).then_some(u64::from(u.max_conns)))
    );
    o.push_str(",\"tiers\":[");
    for (i, t) in u.tiers().iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(
            o,
            "{{\"priority\":{},\"peers\":{},\"usable\":{}}}",
            t.priority, t.peers, t.usable
        );
    }
    let _ = write!(
        o,
        "],\"fallback\":{{\"servers\":{},\"serving\":{}}},\"lines\":[",
        u.fallback_servers,
        u.serving_fallback()
    );
    for (i, l) in u.lines.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        json_line(o, l, now_unix);
    }
    o.push_str("],\"peers\":[");
    for (i, p) in u.peers.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        json_peer(o, u, p);
    }
    o.push_str("]}");
}

fn json_line(o: &mut String, l: &LineReport, now_unix: u64) {
    let r = &l.record;
    o.push_str("\n {\"query\":");
    json_str(o, &l.query);
    match &l.api {
        Some(agent) => {
            o.push_str(",\"source\":\"api\",\"api\":");
            json_str(o, agent);
            let _ = write!(o, ",\"index\":{}", r.index);
        }
        None => o.push_str(",\"source\":\"dns\""),
    }
    o.push_str(",\"resolvers\":[");
    for (i, a) in l.resolvers.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        json_str(o, &a.to_string());
    }
    let _ = write!(
        o,
        "],\"transport\":\"{}\",\"interval_ms\":{},\"max_stale_ms\":{},\"max_stale_left_s\":{},\"set\":\"{}\",\"peers\":{},\"last_success\":{},\"last_change\":{}",
        transport_name(l.transport),
        l.interval_ms,
        json_opt(l.max_stale_ms),
        json_opt(max_stale_left_s(l, now_unix)),
        set_name(SetKind::from_u32(r.kind)),
        r.peers,
        json_time(r.confirmed_unix),
        json_time(r.changed_unix)
    );
    o.push_str(",\"lookups\":{");
    for (i, (name, n)) in OUTCOMES.iter().zip(r.lookups).enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(o, "\"{name}\":{n}");
    }
    o.push_str("},\"streak\":");
    let kind = streak_of(r.streak_kind);
    if kind == StreakKind::None {
        o.push_str("null");
    } else {
        let _ = write!(
            o,
            "{{\"kind\":\"{}\",\"count\":{},\"since\":{},\"reason\":",
            streak_name(kind),
            r.streak_count,
            json_time(r.streak_since_unix)
        );
        json_str(o, &r.reason);
        o.push('}');
    }
    o.push('}');
}

fn json_peer(o: &mut String, u: &UpstreamReport, p: &PeerReport) {
    o.push_str("\n {\"address\":");
    json_str(o, &p.peer.addr.to_string());
    o.push_str(",\"ip\":");
    json_str(o, &p.peer.addr.ip().to_string());
    let _ = write!(
        o,
        ",\"port\":{},\"weight\":{},\"priority\":{},\"query\":",
        p.peer.addr.port(),
        p.peer.weight,
        p.peer.priority
    );
    match u.query_of(p) {
        Some(q) => json_str(o, q),
        None => o.push_str("null"),
    }
    let _ = write!(
        o,
        ",\"state\":\"{}\",\"down_until\":{},\"fails\":{},\"active\":{},\"connections\":{},\"failures\":{},\"since\":{}}}",
        if p.usable() { "up" } else { "down" },
        json_opt(p.down_until_unix),
        p.fails,
        p.active,
        p.connections,
        p.failures,
        json_time(p.since_unix)
    );
}

// ---------------------------------------------------------------------------
// Prometheus text format 0.0.4

/// A label value with `\`, `"` and newlines escaped.
fn label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample's value: a count, or milliseconds written as seconds.
#[derive(Clone, Copy)]
enum Value {
    N(u64),
    Ms(u64),
}

/// Writes one family's samples under its `# HELP` and `# TYPE` lines (the
/// format wants a family's lines together).
struct Family<'o> {
    out: &'o mut String,
    name: &'static str,
}

impl<'o> Family<'o> {
    fn start(out: &'o mut String, m: Metric) -> Self {
        let (name, kind, help) = m.def();
        // HELP text would escape `\` and newlines: ours have neither.
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        Family { out, name }
    }

    /// One sample of upstream `up`: every series starts with the labels
    /// `upstream` and `protocol` (one label set per family; a stream and an
    /// http upstream of the same name are two series), then `labels`.
    fn put(&mut self, up: &UpstreamKey, labels: &[(&str, &str)], value: Value) {
        let o = &mut *self.out;
        o.push_str(self.name);
        o.push_str("{upstream=\"");
        label_value(o, &up.name);
        o.push_str("\",protocol=\"");
        o.push_str(up.label());
        o.push('"');
        for (k, v) in labels {
            o.push(',');
            o.push_str(k);
            o.push_str("=\"");
            label_value(o, v);
            o.push('"');
        }
        o.push('}');
        let _ = match value {
            Value::N(n) => writeln!(o, " {n}"),
            Value::Ms(ms) if ms % 1000 == 0 => writeln!(o, " {}", ms / 1000),
            Value::Ms(ms) => writeln!(o, " {}", ms as f64 / 1000.0),
        };
    }
}

/// Every metric of the Prometheus output, in output order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    UpstreamGeneration,
    UpstreamCapacity,
    UpstreamPeers,
    UpstreamUsablePeers,
    UpstreamMaxConns,
    UpstreamFallbackServers,
    UpstreamFallbackActive,
    LineInfo,
    LineInterval,
    LineMaxStale,
    LineMaxStaleRemaining,
    LinePeers,
    LineSet,
    LineLastSuccess,
    LineLastChange,
    LineLookups,
    LineStreak,
    LineStreakLookups,
    LineStreakStart,
    LineIndex,
    PeerInfo,
    PeerWeight,
    PeerPriority,
    PeerUp,
    PeerDownUntil,
    PeerFails,
    PeerActive,
    PeerConnections,
    PeerFailures,
    PeerStart,
}

impl Metric {
    pub const ALL: [Metric; 30] = [
        Metric::UpstreamGeneration,
        Metric::UpstreamCapacity,
        Metric::UpstreamPeers,
        Metric::UpstreamUsablePeers,
        Metric::UpstreamMaxConns,
        Metric::UpstreamFallbackServers,
        Metric::UpstreamFallbackActive,
        Metric::LineInfo,
        Metric::LineInterval,
        Metric::LineMaxStale,
        Metric::LineMaxStaleRemaining,
        Metric::LinePeers,
        Metric::LineSet,
        Metric::LineLastSuccess,
        Metric::LineLastChange,
        Metric::LineLookups,
        Metric::LineStreak,
        Metric::LineStreakLookups,
        Metric::LineStreakStart,
        Metric::LineIndex,
        Metric::PeerInfo,
        Metric::PeerWeight,
        Metric::PeerPriority,
        Metric::PeerUp,
        Metric::PeerDownUntil,
        Metric::PeerFails,
        Metric::PeerActive,
        Metric::PeerConnections,
        Metric::PeerFailures,
        Metric::PeerStart,
    ];

    /// Name, type and help text: the one place they are written (README's
    /// table repeats them; a test checks it names every one).
    pub fn def(self) -> (&'static str, &'static str, &'static str) {
        use Metric::*;
        match self {
            UpstreamGeneration => ("nginx_consul_upstream_generation", "gauge",
                "Generation of the upstream's published peer set: it grows with every change."),
            UpstreamCapacity => ("nginx_consul_upstream_capacity_peers", "gauge",
                "Peers the upstream's shared zone holds (zone=)."),
            UpstreamPeers => ("nginx_consul_upstream_peers", "gauge",
                "Discovered peers, per priority tier."),
            UpstreamUsablePeers => ("nginx_consul_upstream_usable_peers", "gauge",
                "Discovered peers that take connections (not down by max_fails/fail_timeout)."),
            UpstreamMaxConns => ("nginx_consul_upstream_max_conns", "gauge",
                "Open connections a peer takes at most, all workers together (max_conns=); present when set."),
            UpstreamFallbackServers => ("nginx_consul_upstream_fallback_servers", "gauge",
                "Static server lines of the upstream block."),
            UpstreamFallbackActive => ("nginx_consul_upstream_fallback_active", "gauge",
                "1 while the static servers serve because no discovered peer can."),
            LineInfo => ("nginx_consul_line_info", "gauge",
                "A consul_upstream line: its query, source (dns or api), resolvers, transport and, for an api line, its agent (value 1)."),
            LineInterval => ("nginx_consul_line_interval_seconds", "gauge",
                "Time between lookups of the line (interval=)."),
            LineMaxStale => ("nginx_consul_line_max_stale_seconds", "gauge",
                "max_stale= of the line; present when set."),
            LineMaxStaleRemaining => ("nginx_consul_line_max_stale_remaining_seconds", "gauge",
                "Time left until the line's peers are dropped if no answer comes (max_stale); present when max_stale is set and the line has peers."),
            LinePeers => ("nginx_consul_line_peers", "gauge",
                "Peers the line contributes to the upstream."),
            LineSet => ("nginx_consul_line_set", "gauge",
                "Where the line's peers come from, 1 for the current one: none (no answer yet), live (the last answer), kept (after an empty or failed answer), state_file, dropped."),
            LineLastSuccess => ("nginx_consul_line_last_success_timestamp_seconds", "gauge",
                "Unix time of the line's last successful (non-empty) answer; present after one."),
            LineLastChange => ("nginx_consul_line_last_change_timestamp_seconds", "gauge",
                "Unix time the line's peers or set kind last changed; present after a change."),
            LineLookups => ("nginx_consul_line_lookups_total", "counter",
                "Lookups of the line by outcome: ok, empty (NXDOMAIN or no records), error (timeout, refused, SERVFAIL, malformed answer), oversize (more peers than the zone holds)."),
            LineStreak => ("nginx_consul_line_streak", "gauge",
                "The streak the line is in, 1 for the current kind: none, empty, error, oversize."),
            LineStreakLookups => ("nginx_consul_line_streak_lookups", "gauge",
                "Failed lookups in the current error or oversize streak (1 in an empty streak, 0 without one)."),
            LineStreakStart => ("nginx_consul_line_streak_start_timestamp_seconds", "gauge",
                "Unix time the current streak started; present during a streak."),
            LineIndex => ("nginx_consul_line_index", "gauge",
                "X-Consul-Index of an api line's last answer (0 before one); api lines only."),
            PeerInfo => ("nginx_consul_peer_info", "gauge",
                "A discovered peer and the query it came from (value 1)."),
            PeerWeight => ("nginx_consul_peer_weight", "gauge",
                "SRV weight of the peer."),
            PeerPriority => ("nginx_consul_peer_priority", "gauge",
                "SRV priority of the peer: its tier, lowest used first."),
            PeerUp => ("nginx_consul_peer_up", "gauge",
                "1 if the peer takes connections, 0 while it is down by passive health."),
            PeerDownUntil => ("nginx_consul_peer_down_until_timestamp_seconds", "gauge",
                "Unix time until which the peer is down; present while down."),
            PeerFails => ("nginx_consul_peer_fails", "gauge",
                "Failed attempts in the peer's current fail_timeout window."),
            PeerActive => ("nginx_consul_peer_active_connections", "gauge",
                "Connections open to the peer now, all workers."),
            PeerConnections => ("nginx_consul_peer_connections_total", "counter",
                "Connections made to the peer since it appeared, all workers."),
            PeerFailures => ("nginx_consul_peer_failures_total", "counter",
                "Failed connection attempts to the peer since it appeared, all workers."),
            PeerStart => ("nginx_consul_peer_start_timestamp_seconds", "gauge",
                "Unix time the peer appeared in the set: its counters count from there."),
        }
    }
}

/// The report in Prometheus text format 0.0.4.
pub fn prometheus(report: &Report) -> String {
    let peers: usize = report.upstreams.iter().map(|u| u.peers.len()).sum();
    let lines: usize = report.upstreams.iter().map(|u| u.lines.len()).sum();
    let mut o = String::with_capacity(6000 + 600 * lines + 1000 * peers);
    for m in Metric::ALL {
        let mut f = Family::start(&mut o, m);
        for u in &report.upstreams {
            upstream_samples(&mut f, m, u, report.now_unix);
        }
    }
    o
}

fn upstream_samples(f: &mut Family<'_>, m: Metric, u: &UpstreamReport, now_unix: u64) {
    use Metric::*;
    let up = &u.key;
    match m {
        UpstreamGeneration => f.put(up, &[], Value::N(u.generation)),
        UpstreamCapacity => f.put(up, &[], Value::N(u.capacity as u64)),
        UpstreamFallbackServers => f.put(up, &[], Value::N(u.fallback_servers as u64)),
        UpstreamMaxConns => {
            if u.max_conns > 0 {
                f.put(up, &[], Value::N(u64::from(u.max_conns)));
            }
        }
        // A set that could not be read has no peer numbers: absent, not 0.
        _ if u.busy
            && matches!(
                m,
                UpstreamPeers | UpstreamUsablePeers | UpstreamFallbackActive
            ) => {}
        UpstreamPeers => {
            for t in u.tiers() {
                let prio = t.priority.to_string();
                f.put(up, &[("priority", &prio)], Value::N(t.peers as u64));
            }
        }
        UpstreamUsablePeers => f.put(up, &[], Value::N(u.usable() as u64)),
        UpstreamFallbackActive => f.put(up, &[], Value::N(u64::from(u.serving_fallback()))),
        LineInfo
        | LineInterval
        | LineMaxStale
        | LineMaxStaleRemaining
        | LinePeers
        | LineSet
        | LineLastSuccess
        | LineLastChange
        | LineLookups
        | LineStreak
        | LineStreakLookups
        | LineStreakStart
        | LineIndex => {
            for l in &u.lines {
                line_samples(f, m, up, l, now_unix);
            }
        }
        PeerInfo | PeerWeight | PeerPriority | PeerUp | PeerDownUntil | PeerFails | PeerActive
        | PeerConnections | PeerFailures | PeerStart => {
            for p in &u.peers {
                peer_samples(f, m, u, p);
            }
        }
    }
}

fn line_samples(f: &mut Family<'_>, m: Metric, up: &UpstreamKey, l: &LineReport, now_unix: u64) {
    use Metric::*;
    let r = &l.record;
    let q = l.query.as_str();
    let ll = [("query", q)];
    let streak = streak_of(r.streak_kind);
    match m {
        LineInfo => {
            let resolvers: Vec<String> = l.resolvers.iter().map(|a| a.to_string()).collect();
            let resolvers = resolvers.join(",");
            let (source, agent) = match &l.api {
                Some(agent) => ("api", agent.as_str()),
                None => ("dns", ""),
            };
            let labels = [
                ("query", q),
                ("source", source),
                ("resolvers", resolvers.as_str()),
                ("transport", transport_name(l.transport)),
                ("api", agent),
            ];
            // A DNS line has no agent label (rather than an empty one).
            let n = if l.api.is_some() { 5 } else { 4 };
            f.put(up, &labels[..n], Value::N(1));
        }
        LineIndex if l.api.is_some() => f.put(up, &ll, Value::N(r.index)),
        LineInterval => f.put(up, &ll, Value::Ms(l.interval_ms)),
        LineMaxStale => {
            if let Some(ms) = l.max_stale_ms {
                f.put(up, &ll, Value::Ms(ms));
            }
        }
        LineMaxStaleRemaining => {
            if let Some(left) = max_stale_left_s(l, now_unix) {
                f.put(up, &ll, Value::N(left));
            }
        }
        LinePeers => f.put(up, &ll, Value::N(u64::from(r.peers))),
        LineSet => {
            let current = SetKind::from_u32(r.kind);
            for kind in SETS {
                let labels = [("query", q), ("set", set_name(kind))];
                f.put(up, &labels, Value::N(u64::from(kind == current)));
            }
        }
        LineLastSuccess if r.confirmed_unix > 0 => f.put(up, &ll, Value::N(r.confirmed_unix)),
        LineLastChange if r.changed_unix > 0 => f.put(up, &ll, Value::N(r.changed_unix)),
        LineLookups => {
            for (outcome, n) in OUTCOMES.iter().zip(r.lookups) {
                f.put(up, &[("query", q), ("outcome", outcome)], Value::N(n));
            }
        }
        LineStreak => {
            for kind in STREAKS {
                let labels = [("query", q), ("kind", streak_name(kind))];
                f.put(up, &labels, Value::N(u64::from(kind == streak)));
            }
        }
        LineStreakLookups => {
            let n = if streak == StreakKind::None {
                0
            } else {
                r.streak_count
            };
            f.put(up, &ll, Value::N(u64::from(n)));
        }
        LineStreakStart if streak != StreakKind::None && r.streak_since_unix > 0 => {
            f.put(up, &ll, Value::N(r.streak_since_unix))
        }
        _ => {}
    }
}

fn peer_samples(f: &mut Family<'_>, m: Metric, u: &UpstreamReport, p: &PeerReport) {
    use Metric::*;
    let up = &u.key;
    let addr = p.peer.addr.to_string();
    let pl = [("peer", addr.as_str())];
    match m {
        PeerInfo => {
            let labels = [
                ("peer", addr.as_str()),
                ("query", u.query_of(p).unwrap_or("")),
            ];
            f.put(up, &labels, Value::N(1));
        }
        PeerWeight => f.put(up, &pl, Value::N(u64::from(p.peer.weight))),
        PeerPriority => f.put(up, &pl, Value::N(u64::from(p.peer.priority))),
        PeerUp => f.put(up, &pl, Value::N(u64::from(p.usable()))),
        PeerDownUntil => {
            if let Some(until) = p.down_until_unix {
                f.put(up, &pl, Value::N(until));
            }
        }
        PeerFails => f.put(up, &pl, Value::N(u64::from(p.fails))),
        PeerActive => f.put(up, &pl, Value::N(u64::from(p.active))),
        PeerConnections => f.put(up, &pl, Value::N(p.connections)),
        PeerFailures => f.put(up, &pl, Value::N(p.failures)),
        PeerStart => f.put(up, &pl, Value::N(p.since_unix)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::source_tag;
    use crate::zone::tests::Owned;
    use crate::zone::Lookup;

    const Q1: &str = "redis.service.dc1.consul";
    const Q2: &str = "redis.service.dc2.consul";

    fn settings(line: &str) -> Settings {
        let args: Vec<&str> = line.split_whitespace().collect();
        Settings::parse(&args).unwrap()
    }

    fn p(s: &str, w: u16, prio: u16) -> Peer {
        Peer::new(s.parse().unwrap(), w, prio)
    }

    struct Fixture {
        s1: Settings,
        s2: Settings,
        zone: Owned,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                s1: settings(&format!(
                    "{Q1} resolver=127.0.0.1:8600 resolver=[::1]:53 max_stale=30s max_fails=2 fail_timeout=5s"
                )),
                s2: settings(&format!("{Q2} interval=500ms udp")),
                zone: Owned::new(8),
            }
        }

        fn conf(&self, name: &'static str, fallback_servers: usize) -> UpstreamConf<'_> {
            UpstreamConf {
                key: UpstreamKey::stream(name),
                lines: vec![
                    LineConf {
                        settings: &self.s1,
                        tag: source_tag(Q1),
                    },
                    LineConf {
                        settings: &self.s2,
                        tag: source_tag(Q2),
                    },
                ],
                fallback_servers,
            }
        }
    }

    /// Two lines, three peers in two tiers; 127.0.0.1:1 failed twice at 1000 ms.
    fn scenario(f: &Fixture) -> Report {
        let z = f.zone.zone();
        let (t1, t2) = (source_tag(Q1), source_tag(Q2));
        z.publish(
            &[
                (p("127.0.0.1:1", 3, 1), t1),
                (p("[::1]:2", 1, 1), t1),
                (p("127.0.0.2:3", 1, 2), t2),
            ],
            100,
            0,
        )
        .unwrap();
        let snap = z.read().unwrap();
        let s0 = z.slot(snap.peers[0].slot).unwrap();
        s0.fails.store(2, Ordering::Relaxed);
        s0.failures.store(7, Ordering::Relaxed);
        s0.connections.store(40, Ordering::Relaxed);
        s0.checked_ms.store(1000, Ordering::Relaxed);
        let s1 = z.slot(snap.peers[1].slot).unwrap();
        s1.conns.store(2, Ordering::Relaxed);
        s1.connections.store(12, Ordering::Relaxed);
        z.update_line(t1, |l| {
            l.kind = SetKind::Kept as u32;
            l.peers = 2;
            l.confirmed_unix = 190;
            l.changed_unix = 100;
            l.lookups = [5, 0, 3, 0];
            l.streak_kind = StreakKind::Failed as u32;
            l.streak_count = 3;
            l.streak_since_unix = 195;
            l.reason = "127.0.0.1:8600 timed out".into();
        });
        z.update_line(t2, |l| {
            l.kind = SetKind::Live as u32;
            l.peers = 1;
            l.confirmed_unix = 200;
            l.changed_unix = 100;
            l.lookups[Lookup::Ok as usize] = 9;
        });
        Report {
            now_unix: 200,
            upstreams: vec![UpstreamReport::read(
                &f.conf("redis", 0),
                Some(&z),
                200,
                3500,
            )],
        }
    }

    #[test]
    fn the_report_holds_what_the_zone_and_the_configuration_say() {
        let f = Fixture::new();
        let r = scenario(&f);
        let u = &r.upstreams[0];
        assert_eq!((u.generation, u.capacity, u.busy), (1, 8, false));
        assert_eq!(u.health.max_fails, 2);
        let addrs: Vec<String> = u.peers.iter().map(|p| p.peer.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:1", "[::1]:2", "127.0.0.2:3"]);
        assert_eq!(
            u.peers.iter().map(|p| p.line).collect::<Vec<_>>(),
            [Some(0), Some(0), Some(1)]
        );
        // Down from 1000 ms for fail_timeout=5s: until 6000 ms, 2.5 s after now.
        assert_eq!(u.peers[0].down_until_unix, Some(203));
        assert_eq!((u.peers[0].failures, u.peers[0].connections), (7, 40));
        assert_eq!((u.peers[1].active, u.peers[1].connections), (2, 12));
        assert_eq!(u.peers[1].since_unix, 100);
        assert_eq!(u.usable(), 2);
        assert_eq!(
            u.tiers(),
            [
                Tier {
                    priority: 1,
                    peers: 2,
                    usable: 1
                },
                Tier {
                    priority: 2,
                    peers: 1,
                    usable: 1
                }
            ]
        );
        assert_eq!(u.lines[0].record.reason, "127.0.0.1:8600 timed out");
        assert_eq!(u.lines[1].record.lookups, [9, 0, 0, 0]);
        assert_eq!(max_stale_left_s(&u.lines[0], 200), Some(20));
        assert_eq!(max_stale_left_s(&u.lines[0], 400), Some(0));
        assert_eq!(max_stale_left_s(&u.lines[1], 200), None, "no max_stale");
    }

    #[test]
    fn down_follows_the_balancers_rule() {
        let policy = HealthPolicy {
            max_fails: 2,
            fail_timeout_ms: 1000,
        };
        assert_eq!(
            down_until_ms(&policy, 1, 0, 10, false),
            None,
            "below max_fails"
        );
        assert_eq!(down_until_ms(&policy, 2, 100, 1100, false), Some(1100));
        assert_eq!(
            down_until_ms(&policy, 2, 100, 1101, false),
            None,
            "window over"
        );
        assert_eq!(
            down_until_ms(&policy, 2, 100, 200, true),
            None,
            "a single peer"
        );
        let off = HealthPolicy {
            max_fails: 0,
            ..policy
        };
        assert_eq!(down_until_ms(&off, 9, 100, 200, false), None, "max_fails=0");
    }

    #[test]
    fn a_peer_that_leaves_and_returns_starts_fresh() {
        let f = Fixture::new();
        let z = f.zone.zone();
        let t = source_tag(Q1);
        let a = p("127.0.0.1:1", 1, 1);
        z.publish(&[(a, t)], 100, 0).unwrap();
        let slot = z.slot(z.read().unwrap().peers[0].slot).unwrap();
        slot.connections.store(5, Ordering::Relaxed);
        slot.failures.store(1, Ordering::Relaxed);
        z.publish(&[], 110, 0).unwrap();
        z.publish(&[(a, t)], 120, 0).unwrap();
        let u = UpstreamReport::read(&f.conf("redis", 0), Some(&z), 130, 0);
        assert_eq!(u.peers.len(), 1);
        let back = &u.peers[0];
        assert_eq!(
            (back.connections, back.failures, back.since_unix),
            (0, 0, 120)
        );
    }

    #[test]
    fn fallback_serves_when_no_discovered_peer_can() {
        let f = Fixture::new();
        let z = f.zone.zone();
        let u = UpstreamReport::read(&f.conf("redis", 2), Some(&z), 0, 0);
        assert!(u.serving_fallback(), "nothing discovered yet");
        assert!(!u.busy);
        let lines = &u.lines;
        assert_eq!(SetKind::from_u32(lines[0].record.kind), SetKind::None);
        z.publish(&[(p("127.0.0.1:1", 1, 1), source_tag(Q1))], 0, 0)
            .unwrap();
        let u = UpstreamReport::read(&f.conf("redis", 2), Some(&z), 0, 0);
        assert!(!u.serving_fallback());
        let u = UpstreamReport::read(&f.conf("redis", 0), Some(&z), 0, 0);
        assert!(!u.serving_fallback(), "no static servers");
    }

    #[test]
    fn a_set_that_cannot_be_read_is_reported_busy_not_empty() {
        let f = Fixture::new();
        let z = f.zone.zone();
        z.publish(&[(p("127.0.0.1:1", 1, 1), source_tag(Q1))], 0, 0)
            .unwrap();
        let active = f.zone.header.active.load(Ordering::Relaxed) as usize;
        f.zone.header.bufs[active]
            .seq
            .fetch_add(1, Ordering::Relaxed);
        let u = UpstreamReport::read(&f.conf("redis", 1), Some(&z), 0, 0);
        assert!(u.busy && u.peers.is_empty() && !u.serving_fallback());
        let text = prometheus(&Report {
            now_unix: 0,
            upstreams: vec![u],
        });
        assert!(text.contains(
            "nginx_consul_upstream_generation{upstream=\"redis\",protocol=\"stream\"} 1\n"
        ));
        assert!(!text.contains("nginx_consul_upstream_usable_peers{"));
        let none = UpstreamReport::read(&f.conf("redis", 1), None, 0, 0);
        assert!(none.busy);
    }

    #[test]
    fn max_conns_and_weight_zero_are_shown() {
        let f = Fixture::new();
        let limited = settings(&format!("{Q1} max_conns=5"));
        let conf = UpstreamConf {
            key: UpstreamKey::stream("redis"),
            lines: vec![LineConf {
                settings: &limited,
                tag: source_tag(Q1),
            }],
            fallback_servers: 0,
        };
        let z = f.zone.zone();
        z.publish(
            &[
                (p("127.0.0.1:1", 1, 1), source_tag(Q1)),
                (p("127.0.0.2:1", 0, 1), source_tag(Q1)),
            ],
            0,
            0,
        )
        .unwrap();
        let r = Report {
            now_unix: 0,
            upstreams: vec![UpstreamReport::read(&conf, Some(&z), 0, 0)],
        };
        let v: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        let u = &v["upstreams"][0];
        assert_eq!(u["max_conns"], 5);
        assert_eq!(
            (
                u["peers"][1]["address"].as_str(),
                u["peers"][1]["weight"].as_u64()
            ),
            (Some("127.0.0.2:1"), Some(0))
        );
        let text = prometheus(&r);
        assert!(text.contains(
            "nginx_consul_upstream_max_conns{upstream=\"redis\",protocol=\"stream\"} 5\n"
        ));
        assert!(
            text.contains("nginx_consul_peer_weight{upstream=\"redis\",protocol=\"stream\",peer=\"127.0.0.2:1\"} 0\n")
        );
        let unlimited = prometheus(&scenario(&f));
        assert!(!unlimited.contains("nginx_consul_upstream_max_conns{"));
        let v: serde_json::Value = serde_json::from_str(&json(&scenario(&f))).unwrap();
        assert!(v["upstreams"][0]["max_conns"].is_null());
    }

    #[test]
    fn json_has_every_field() {
        let f = Fixture::new();
        let text = json(&scenario(&f));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["time"], 200);
        let u = &v["upstreams"][0];
        assert_eq!(u["name"], "redis");
        assert_eq!(u["protocol"], "stream");
        assert_eq!(u["generation"], 1);
        assert_eq!(u["peers_total"], 3);
        assert_eq!(u["usable_peers"], 2);
        assert_eq!(
            u["tiers"][0],
            serde_json::json!({"priority": 1, "peers": 2, "usable": 1})
        );
        assert_eq!(
            u["fallback"],
            serde_json::json!({"servers": 0, "serving": false})
        );
        assert_eq!(
            (u["max_fails"].as_u64(), u["fail_timeout_ms"].as_u64()),
            (Some(2), Some(5000))
        );
        let l = &u["lines"][0];
        assert_eq!(l["query"], Q1);
        assert_eq!(
            l["resolvers"],
            serde_json::json!(["127.0.0.1:8600", "[::1]:53"])
        );
        assert_eq!(l["transport"], "tcp");
        assert_eq!(l["set"], "kept");
        assert_eq!(
            (l["last_success"].as_u64(), l["last_change"].as_u64()),
            (Some(190), Some(100))
        );
        assert_eq!(l["max_stale_ms"], 30_000);
        assert_eq!(l["max_stale_left_s"], 20);
        assert_eq!(
            l["lookups"],
            serde_json::json!({"ok": 5, "empty": 0, "error": 3, "oversize": 0})
        );
        assert_eq!(
            l["streak"],
            serde_json::json!({"kind": "error", "count": 3, "since": 195, "reason": "127.0.0.1:8600 timed out"})
        );
        let l2 = &u["lines"][1];
        assert_eq!(
            (l2["transport"].as_str(), l2["interval_ms"].as_u64()),
            (Some("udp"), Some(500))
        );
        assert!(l2["streak"].is_null() && l2["max_stale_ms"].is_null());
        let p0 = &u["peers"][0];
        assert_eq!(
            *p0,
            serde_json::json!({
                "address": "127.0.0.1:1", "ip": "127.0.0.1", "port": 1, "weight": 3,
                "priority": 1, "query": Q1, "state": "down", "down_until": 203, "fails": 2,
                "active": 0, "connections": 40, "failures": 7, "since": 100
            })
        );
        assert_eq!(u["peers"][1]["ip"], "::1");
        assert_eq!(u["peers"][1]["state"], "up");
        assert!(u["peers"][1]["down_until"].is_null());
        assert_eq!(u["peers"][2]["query"], Q2);
    }

    #[test]
    fn json_escapes_names() {
        let f = Fixture::new();
        let z = f.zone.zone();
        let name = "we\"ird\\name\n\u{1}";
        let r = Report {
            now_unix: 0,
            upstreams: vec![UpstreamReport::read(&f.conf(name, 0), Some(&z), 0, 0)],
        };
        let v: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        assert_eq!(v["upstreams"][0]["name"], name);
        assert!(v["upstreams"][0]["lines"][0]["last_success"].is_null());
    }

    /// Parses the text as the format defines it, asserting its rules on the
    /// way: HELP then TYPE before a family's samples, each family once, its
    /// samples together. Returns (series, value) pairs.
    fn parse(text: &str) -> Vec<(String, String)> {
        let mut seen = Vec::new();
        let mut current = String::new();
        let mut samples = Vec::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(!seen.contains(&name), "{name} twice");
                let ty = lines.next().unwrap();
                assert!(
                    ty == format!("# TYPE {name} gauge") || ty == format!("# TYPE {name} counter"),
                    "{ty}"
                );
                seen.push(name.clone());
                current = name;
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let metric = series.split('{').next().unwrap();
            assert_eq!(metric, current, "samples of a family together");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            samples.push((series.to_string(), value.to_string()));
        }
        assert_eq!(seen.len(), Metric::ALL.len());
        samples
    }

    fn value<'a>(samples: &'a [(String, String)], series: &str) -> Option<&'a str> {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn prometheus_has_every_family_and_the_values() {
        let f = Fixture::new();
        let text = prometheus(&scenario(&f));
        let s = parse(&text);
        let v = |series: &str| value(&s, series);
        let q1 = format!("query=\"{Q1}\"");
        assert_eq!(
            v("nginx_consul_upstream_generation{upstream=\"redis\",protocol=\"stream\"}"),
            Some("1")
        );
        assert_eq!(
            v("nginx_consul_upstream_peers{upstream=\"redis\",protocol=\"stream\",priority=\"1\"}"),
            Some("2")
        );
        assert_eq!(
            v("nginx_consul_upstream_peers{upstream=\"redis\",protocol=\"stream\",priority=\"2\"}"),
            Some("1")
        );
        assert_eq!(
            v("nginx_consul_upstream_usable_peers{upstream=\"redis\",protocol=\"stream\"}"),
            Some("2")
        );
        assert_eq!(
            v("nginx_consul_upstream_fallback_active{upstream=\"redis\",protocol=\"stream\"}"),
            Some("0")
        );
        assert_eq!(
            v(&format!("nginx_consul_line_info{{upstream=\"redis\",protocol=\"stream\",{q1},source=\"dns\",resolvers=\"127.0.0.1:8600,[::1]:53\",transport=\"tcp\"}}")),
            Some("1")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_interval_seconds{{upstream=\"redis\",protocol=\"stream\",query=\"{Q2}\"}}"
            )),
            Some("0.5")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_max_stale_seconds{{upstream=\"redis\",protocol=\"stream\",{q1}}}"
            )),
            Some("30")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_max_stale_remaining_seconds{{upstream=\"redis\",protocol=\"stream\",{q1}}}"
            )),
            Some("20")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_set{{upstream=\"redis\",protocol=\"stream\",{q1},set=\"kept\"}}"
            )),
            Some("1")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_set{{upstream=\"redis\",protocol=\"stream\",{q1},set=\"live\"}}"
            )),
            Some("0")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_lookups_total{{upstream=\"redis\",protocol=\"stream\",{q1},outcome=\"error\"}}"
            )),
            Some("3")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_streak{{upstream=\"redis\",protocol=\"stream\",{q1},kind=\"error\"}}"
            )),
            Some("1")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_streak_lookups{{upstream=\"redis\",protocol=\"stream\",{q1}}}"
            )),
            Some("3")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_streak_start_timestamp_seconds{{upstream=\"redis\",protocol=\"stream\",{q1}}}"
            )),
            Some("195")
        );
        assert_eq!(
            v(&format!("nginx_consul_line_streak_start_timestamp_seconds{{upstream=\"redis\",protocol=\"stream\",query=\"{Q2}\"}}")),
            None,
            "no streak, no start"
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_line_last_success_timestamp_seconds{{upstream=\"redis\",protocol=\"stream\",{q1}}}"
            )),
            Some("190")
        );
        let a = "upstream=\"redis\",protocol=\"stream\",peer=\"127.0.0.1:1\"";
        assert_eq!(v(&format!("nginx_consul_peer_info{{{a},{q1}}}")), Some("1"));
        assert_eq!(v(&format!("nginx_consul_peer_up{{{a}}}")), Some("0"));
        assert_eq!(
            v(&format!(
                "nginx_consul_peer_down_until_timestamp_seconds{{{a}}}"
            )),
            Some("203")
        );
        assert_eq!(
            v(&format!("nginx_consul_peer_connections_total{{{a}}}")),
            Some("40")
        );
        assert_eq!(
            v(&format!("nginx_consul_peer_failures_total{{{a}}}")),
            Some("7")
        );
        assert_eq!(v(&format!("nginx_consul_peer_weight{{{a}}}")), Some("3"));
        let b = "upstream=\"redis\",protocol=\"stream\",peer=\"[::1]:2\"";
        assert_eq!(v(&format!("nginx_consul_peer_up{{{b}}}")), Some("1"));
        assert_eq!(
            v(&format!("nginx_consul_peer_active_connections{{{b}}}")),
            Some("2")
        );
        assert_eq!(
            v(&format!(
                "nginx_consul_peer_down_until_timestamp_seconds{{{b}}}"
            )),
            None
        );
        assert_eq!(
            v(&format!("nginx_consul_peer_start_timestamp_seconds{{{b}}}")),
            Some("100")
        );
    }

    #[test]
    fn prometheus_escapes_label_values() {
        let f = Fixture::new();
        let z = f.zone.zone();
        let r = Report {
            now_unix: 0,
            upstreams: vec![UpstreamReport::read(
                &f.conf("a\"b\\c\nd", 0),
                Some(&z),
                0,
                0,
            )],
        };
        let text = prometheus(&r);
        assert!(text.contains("nginx_consul_upstream_generation{upstream=\"a\\\"b\\\\c\\nd\",protocol=\"stream\"} 0\n"));
        parse(&text);
    }

    #[test]
    fn api_lines_report_their_agent_and_index() {
        let s = settings("service=redis api=http://127.0.0.1:8500 tag=a");
        let q = s.query.clone();
        let tag = source_tag(&q);
        let zone = Owned::new(4);
        let z = zone.zone();
        z.publish(&[(p("127.0.0.1:1", 1, 1), tag)], 100, 0).unwrap();
        z.update_line(tag, |l| {
            l.index = 4242;
            l.streak_kind = StreakKind::Failed as u32;
            l.streak_count = 1;
            l.reason = "127.0.0.1:8500 answered 403 (ACL not found)".into();
        });
        let conf = UpstreamConf {
            key: UpstreamKey::stream("redis"),
            lines: vec![LineConf { settings: &s, tag }],
            fallback_servers: 0,
        };
        let report = Report {
            now_unix: 200,
            upstreams: vec![UpstreamReport::read(&conf, Some(&z), 200, 0)],
        };
        let v: serde_json::Value = serde_json::from_str(&json(&report)).unwrap();
        let l = &v["upstreams"][0]["lines"][0];
        assert_eq!(
            l["query"],
            "http://127.0.0.1:8500/v1/health/service/redis?tag=a"
        );
        assert_eq!(l["source"], "api");
        assert_eq!(l["api"], "http://127.0.0.1:8500");
        assert_eq!(l["index"], 4242);
        assert_eq!(l["resolvers"], serde_json::json!([]));
        assert_eq!(
            l["streak"]["reason"],
            "127.0.0.1:8500 answered 403 (ACL not found)"
        );
        assert_eq!(v["upstreams"][0]["peers"][0]["query"], q);
        let text = prometheus(&report);
        let samples = parse(&text);
        let v = |name: &str| {
            samples
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            v(&format!(
                "nginx_consul_line_index{{upstream=\"redis\",protocol=\"stream\",query=\"{q}\"}}"
            ))
            .as_deref(),
            Some("4242")
        );
        assert_eq!(
            v(&format!("nginx_consul_line_info{{upstream=\"redis\",protocol=\"stream\",query=\"{q}\",source=\"api\",resolvers=\"\",transport=\"tcp\",api=\"http://127.0.0.1:8500\"}}")).as_deref(),
            Some("1")
        );
    }

    #[test]
    fn a_stream_and_an_http_upstream_of_one_name_are_two_entries() {
        let f = Fixture::new();
        let z = f.zone.zone();
        let http_zone = Owned::new(4);
        let hz = http_zone.zone();
        hz.publish(&[(p("127.0.0.9:80", 1, 1), source_tag(Q1))], 100, 0)
            .unwrap();
        let mut http = f.conf("redis", 1);
        http.key = UpstreamKey::http("redis");
        let r = Report {
            now_unix: 0,
            upstreams: vec![
                UpstreamReport::read(&f.conf("redis", 0), Some(&z), 0, 0),
                UpstreamReport::read(&http, Some(&hz), 0, 0),
            ],
        };
        let v: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        let ups = v["upstreams"].as_array().unwrap();
        // The caller's order, kept.
        let keys: Vec<_> = ups
            .iter()
            .map(|u| (u["name"].as_str(), u["protocol"].as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                (Some("redis"), Some("stream")),
                (Some("redis"), Some("http"))
            ]
        );
        assert_eq!(
            (
                ups[0]["peers_total"].as_u64(),
                ups[1]["peers_total"].as_u64()
            ),
            (Some(0), Some(1))
        );
        assert_eq!(ups[1]["peers"][0]["address"], "127.0.0.9:80");

        let text = prometheus(&r);
        let samples = parse(&text);
        let v = |series: &str| value(&samples, series);
        assert_eq!(
            v("nginx_consul_upstream_fallback_servers{upstream=\"redis\",protocol=\"stream\"}"),
            Some("0")
        );
        assert_eq!(
            v("nginx_consul_upstream_fallback_servers{upstream=\"redis\",protocol=\"http\"}"),
            Some("1")
        );
        assert_eq!(
            v("nginx_consul_peer_up{upstream=\"redis\",protocol=\"http\",peer=\"127.0.0.9:80\"}"),
            Some("1")
        );
        // Every series names its upstream, then its protocol, then the rest.
        for (series, _) in &samples {
            let labels = series.split_once('{').unwrap().1;
            assert!(
                labels.starts_with("upstream=\"redis\",protocol=\"stream\"")
                    || labels.starts_with("upstream=\"redis\",protocol=\"http\""),
                "{series}"
            );
        }
        let mut unique = samples.iter().map(|(s, _)| s).collect::<Vec<_>>();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), samples.len(), "a series twice");
    }

    #[test]
    fn an_empty_report_still_declares_every_family() {
        let text = prometheus(&Report::default());
        assert_eq!(parse(&text), []);
        let v: serde_json::Value = serde_json::from_str(&json(&Report::default())).unwrap();
        assert_eq!(v["upstreams"], serde_json::json!([]));
    }

    #[test]
    fn metric_names_are_prometheus_names_and_the_readme_lists_them() {
        let readme = include_str!("../../README.md");
        for m in Metric::ALL {
            let (name, kind, _) = m.def();
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
            assert!(
                readme.contains(&format!("`{name}`")),
                "README does not list {name}"
            );
        }
    }
}
