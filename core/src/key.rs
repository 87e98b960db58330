//! What names an upstream: its protocol and its name. A stream and an http
//! upstream may share a name, so everything named per upstream is derived here,
//! from both: the shared zone's name, the log prefix, the status label, the
//! state file's identity and the words `nginx -t` uses for the upstream.

use std::fmt;

use serde_json::{Map, Value};

use crate::zone::LAYOUT;

/// The nginx block an upstream is in: `stream { upstream {} }` or `http { upstream {} }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolKind {
    Stream,
    Http,
}

impl ProtocolKind {
    /// In the order the status page lists them.
    pub const ALL: [ProtocolKind; 2] = [ProtocolKind::Stream, ProtocolKind::Http];

    /// `stream` / `http`: the status label, the zone name's and the state
    /// file's protocol field.
    pub fn label(self) -> &'static str {
        match self {
            ProtocolKind::Stream => "stream",
            ProtocolKind::Http => "http",
        }
    }

    /// The inverse of [`label`](Self::label).
    pub fn from_label(label: &str) -> Option<ProtocolKind> {
        ProtocolKind::ALL.into_iter().find(|p| p.label() == label)
    }
}

impl fmt::Display for ProtocolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One upstream among those of both protocols. Displayed as nginx's messages
/// name it: `upstream "redis"` (stream, as before http existed) or
/// `http upstream "api"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    pub protocol: ProtocolKind,
    pub name: String,
}

/// Every zone name of this module starts with it, then `<protocol>:<name>`.
fn zone_name_start() -> String {
    format!("consul_upstream:v{LAYOUT}:")
}

impl UpstreamKey {
    pub fn new(protocol: ProtocolKind, name: impl Into<String>) -> UpstreamKey {
        UpstreamKey {
            protocol,
            name: name.into(),
        }
    }

    pub fn stream(name: impl Into<String>) -> UpstreamKey {
        UpstreamKey::new(ProtocolKind::Stream, name)
    }

    pub fn http(name: impl Into<String>) -> UpstreamKey {
        UpstreamKey::new(ProtocolKind::Http, name)
    }

    /// The shared zone's name, `consul_upstream:v<LAYOUT>:<stream|http>:<name>`:
    /// the layout, so that a reload into a module with another layout gets a
    /// fresh zone; the protocol always, so that a stream upstream named
    /// `http:x` cannot meet http upstream `x`.
    pub fn zone_name(&self) -> String {
        format!("{}{}:{}", zone_name_start(), self.protocol, self.name)
    }

    /// The upstream whose zone [`zone_name`](Self::zone_name) gave `zone`, if
    /// it is one (of this layout).
    pub fn from_zone_name(zone: &str) -> Option<UpstreamKey> {
        let rest = zone.strip_prefix(zone_name_start().as_str())?;
        let (protocol, name) = rest.split_once(':')?;
        Some(UpstreamKey::new(ProtocolKind::from_label(protocol)?, name))
    }

    /// `consul upstream "redis": ` / `consul http upstream "api": `, the start
    /// of every runtime log line about the upstream. Written only when the
    /// line is: a line whose level is off allocates nothing for it.
    pub fn log_prefix(&self) -> LogPrefix<'_> {
        LogPrefix(self)
    }

    /// The status label, `stream` or `http`.
    pub fn label(&self) -> &'static str {
        self.protocol.label()
    }

    /// Names the upstream in a state file: `"upstream"`, and `"protocol"` for
    /// http only, so that files written before http existed (no protocol)
    /// are stream upstreams' and stream upstreams still write what they did.
    pub fn write_state_identity(&self, doc: &mut Map<String, Value>) {
        doc.insert("upstream".into(), Value::from(self.name.as_str()));
        if self.protocol != ProtocolKind::Stream {
            doc.insert("protocol".into(), Value::from(self.label()));
        }
    }

    /// The upstream a state file names (see [`write_state_identity`](Self::write_state_identity)).
    pub fn read_state_identity(doc: &Value) -> Result<UpstreamKey, String> {
        let name = doc
            .get("upstream")
            .and_then(Value::as_str)
            .ok_or("no upstream name")?;
        let protocol = match doc.get("protocol") {
            None => ProtocolKind::Stream,
            Some(p) => p
                .as_str()
                .and_then(ProtocolKind::from_label)
                .ok_or_else(|| format!("unknown protocol {p}"))?,
        };
        Ok(UpstreamKey::new(protocol, name))
    }

    /// Why a state file that names `saved` is not `self`'s (`None`: it is):
    /// `written for upstream "redis"`, `written for http upstream "redis"`.
    pub fn foreign_state(&self, saved: &UpstreamKey) -> Option<String> {
        (saved != self).then(|| format!("written for {saved}"))
    }

    /// `nginx -t`'s refusal of state file `file` (as written in the
    /// configuration, made absolute) that `self` already uses, as `written`
    /// (another spelling of the same file, or the same).
    pub fn state_file_taken(&self, file: &str, written: &str) -> String {
        let spelling = if written == file {
            String::new()
        } else {
            format!(" (as \"{written}\")")
        };
        format!("state file \"{file}\" is already used by {self}{spelling}")
    }
}

/// [`UpstreamKey::log_prefix`]: displays as `consul <key>: `.
#[derive(Clone, Copy)]
pub struct LogPrefix<'a>(&'a UpstreamKey);

impl fmt::Display for LogPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "consul {}: ", self.0)
    }
}

impl fmt::Display for UpstreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            ProtocolKind::Stream => write!(f, "upstream \"{}\"", self.name),
            ProtocolKind::Http => write!(f, "http upstream \"{}\"", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_round_trip_in_status_order() {
        assert_eq!(ProtocolKind::Stream.label(), "stream");
        assert_eq!(ProtocolKind::Http.to_string(), "http");
        for p in ProtocolKind::ALL {
            assert_eq!(ProtocolKind::from_label(p.label()), Some(p));
        }
        assert_eq!(ProtocolKind::from_label("tcp"), None);
        assert!(ProtocolKind::Stream < ProtocolKind::Http);
        assert_eq!(UpstreamKey::http("api").label(), "http");
    }

    #[test]
    fn zone_names_keep_protocols_apart() {
        let stream = UpstreamKey::stream("redis");
        assert_eq!(
            stream.zone_name(),
            format!("consul_upstream:v{LAYOUT}:stream:redis")
        );
        let http = UpstreamKey::http("redis");
        assert_eq!(
            http.zone_name(),
            format!("consul_upstream:v{LAYOUT}:http:redis")
        );
        // A stream upstream whose name looks like the protocol segment.
        let tricky = UpstreamKey::stream("http:redis");
        assert_ne!(tricky.zone_name(), http.zone_name());
        for key in [stream, http, tricky, UpstreamKey::stream("")] {
            assert_eq!(UpstreamKey::from_zone_name(&key.zone_name()), Some(key));
        }
        assert_eq!(UpstreamKey::from_zone_name("redis"), None);
        assert_eq!(
            UpstreamKey::from_zone_name("consul_upstream:v1:stream:redis"),
            None
        );
        assert_eq!(
            UpstreamKey::from_zone_name(&format!("consul_upstream:v{LAYOUT}:udp:redis")),
            None
        );
    }

    #[test]
    fn log_prefix_and_nginx_wording() {
        let stream = UpstreamKey::stream("redis");
        let http = UpstreamKey::http("api");
        assert_eq!(
            stream.log_prefix().to_string(),
            "consul upstream \"redis\": "
        );
        assert_eq!(
            http.log_prefix().to_string(),
            "consul http upstream \"api\": "
        );
        assert_eq!(stream.to_string(), "upstream \"redis\"");
        assert_eq!(http.to_string(), "http upstream \"api\"");
    }

    #[test]
    fn a_state_file_used_twice() {
        let stream = UpstreamKey::stream("redis");
        let http = UpstreamKey::http("api");
        assert_eq!(
            stream.state_file_taken("/var/s.state", "/var/s.state"),
            "state file \"/var/s.state\" is already used by upstream \"redis\""
        );
        assert_eq!(
            http.state_file_taken("/var/s.state", "/var/s.state"),
            "state file \"/var/s.state\" is already used by http upstream \"api\""
        );
        assert_eq!(
            http.state_file_taken("/var/s.state", "/var/./s.state"),
            "state file \"/var/s.state\" is already used by http upstream \"api\" (as \"/var/./s.state\")"
        );
    }

    fn identity(key: &UpstreamKey) -> Value {
        let mut doc = Map::new();
        key.write_state_identity(&mut doc);
        Value::Object(doc)
    }

    #[test]
    fn state_identity_stream_as_before_http_with_a_protocol() {
        let stream = UpstreamKey::stream("redis");
        let http = UpstreamKey::http("redis");
        assert_eq!(identity(&stream), json!({"upstream": "redis"}));
        assert_eq!(
            identity(&http),
            json!({"upstream": "redis", "protocol": "http"})
        );
        for key in [&stream, &http] {
            assert_eq!(
                UpstreamKey::read_state_identity(&identity(key)).as_ref(),
                Ok(key)
            );
        }
        // Files written before http existed name a stream upstream.
        assert_eq!(
            UpstreamKey::read_state_identity(&json!({"upstream": "redis"})),
            Ok(stream.clone())
        );
        assert_eq!(
            UpstreamKey::read_state_identity(&json!({"protocol": "http"})),
            Err("no upstream name".into())
        );
        assert_eq!(
            UpstreamKey::read_state_identity(&json!({"upstream": "redis", "protocol": "udp"})),
            Err("unknown protocol \"udp\"".into())
        );
        assert_eq!(
            UpstreamKey::read_state_identity(&json!({"upstream": "redis", "protocol": 1})),
            Err("unknown protocol 1".into())
        );
    }

    #[test]
    fn a_state_file_of_the_other_protocol_is_foreign() {
        let stream = UpstreamKey::stream("redis");
        let http = UpstreamKey::http("redis");
        assert_eq!(stream.foreign_state(&stream), None);
        assert_eq!(
            stream.foreign_state(&http).as_deref(),
            Some("written for http upstream \"redis\"")
        );
        assert_eq!(
            http.foreign_state(&stream).as_deref(),
            Some("written for upstream \"redis\"")
        );
        assert_eq!(
            http.foreign_state(&UpstreamKey::http("api")).as_deref(),
            Some("written for http upstream \"api\"")
        );
    }
}
