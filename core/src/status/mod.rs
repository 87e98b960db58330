//! The status report: what the balancer sees, per upstream, `consul_upstream`
//! line and peer — read from an upstream's zone and its configuration, and
//! rendered as JSON or as Prometheus text (exposition format 0.0.4).
//!
//! Reading takes no lock: the set comes from [`Zone::read`], line records from
//! [`Zone::line`] (each consistent on its own), peer state from the slots'
//! atomics. Counters live in the zone, so every worker reports the same ones,
//! and they survive reloads; a peer that leaves and returns gets a reset slot,
//! so its counters start again from zero, as Prometheus expects of a new series.
//!
//! Files: this one reads the report; `json.rs` and `prometheus.rs` render it.

mod json;
mod prometheus;

pub use json::{json, JSON_CONTENT_TYPE};
pub use prometheus::{prometheus, Metric, PROMETHEUS_CONTENT_TYPE};

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use crate::key::UpstreamKey;
use crate::peer::Peer;
use crate::settings::{Settings, Transport};
use crate::view::HealthPolicy;
use crate::zone::{LineStatus, SetKind, StreakKind, Zone};

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

#[cfg(test)]
pub(crate) mod tests {
    use super::prometheus::tests::{parse, value};
    use super::*;
    use crate::peer::source_tag;
    use crate::zone::tests::Owned;
    use crate::zone::Lookup;

    pub(crate) const Q1: &str = "redis.service.dc1.consul";
    pub(crate) const Q2: &str = "redis.service.dc2.consul";

    pub(crate) fn settings(line: &str) -> Settings {
        let args: Vec<&str> = line.split_whitespace().collect();
        Settings::parse(&args).unwrap()
    }

    pub(crate) fn p(s: &str, w: u16, prio: u16) -> Peer {
        Peer::new(s.parse().unwrap(), w, prio)
    }

    pub(crate) struct Fixture {
        pub(crate) s1: Settings,
        pub(crate) s2: Settings,
        pub(crate) zone: Owned,
    }

    impl Fixture {
        pub(crate) fn new() -> Fixture {
            Fixture {
                s1: settings(&format!(
                    "{Q1} resolver=127.0.0.1:8600 resolver=[::1]:53 max_stale=30s max_fails=2 fail_timeout=5s"
                )),
                s2: settings(&format!("{Q2} interval=500ms udp")),
                zone: Owned::new(8),
            }
        }

        pub(crate) fn conf(&self, name: &'static str, fallback_servers: usize) -> UpstreamConf<'_> {
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
    pub(crate) fn scenario(f: &Fixture) -> Report {
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
}
