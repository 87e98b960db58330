//! The report as one JSON document (README, "Status and metrics").

use std::fmt::Write as _;

use super::{
    max_stale_left_s, set_name, streak_name, streak_of, transport_name, LineReport, PeerReport,
    Report, UpstreamReport, OUTCOMES,
};
use crate::zone::{SetKind, StreakKind};

/// Content type of [`json`].
pub const JSON_CONTENT_TYPE: &str = "application/json";

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::{scenario, Fixture, Q1, Q2};

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
}
