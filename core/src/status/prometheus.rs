//! The report in Prometheus text format 0.0.4: one family per [`Metric`],
//! every series labelled with its upstream and protocol first.

use std::fmt::Write as _;

use super::{
    max_stale_left_s, set_name, streak_name, streak_of, transport_name, LineReport, PeerReport,
    Report, UpstreamReport, OUTCOMES, SETS, STREAKS,
};
use crate::key::UpstreamKey;
use crate::zone::{SetKind, StreakKind};

/// Content type of [`prometheus`]: the text exposition format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
pub(crate) mod tests {
    use super::*;
    use crate::status::tests::{scenario, Fixture, Q1, Q2};

    /// Parses the text as the format defines it, asserting its rules on the
    /// way: HELP then TYPE before a family's samples, each family once, its
    /// samples together. Returns (series, value) pairs.
    pub(crate) fn parse(text: &str) -> Vec<(String, String)> {
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

    pub(crate) fn value<'a>(samples: &'a [(String, String)], series: &str) -> Option<&'a str> {
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
    fn metric_names_are_prometheus_names_and_the_readme_lists_them() {
        let readme = include_str!("../../../README.md");
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
