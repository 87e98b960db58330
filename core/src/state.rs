//! The state file: the last good set of one upstream, per query (an upstream may
//! follow several), so that nginx restarted while Consul is unreachable still
//! serves the last known backends.
//!
//! JSON, written to a temporary file and renamed into place. A truncated, corrupt
//! or foreign file fails to decode with a reason; it is reported and ignored.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::{json, Value};

use crate::answer::MAX_SRV_RECORDS;
use crate::peer::{canonicalize, Peer};

const FORMAT: &str = "ngx-consul-state";
const VERSION: u64 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub upstream: String,
    /// Unix time in seconds.
    pub saved_at: u64,
    pub sources: Vec<SavedSource>,
}

/// The last good answer to one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedSource {
    pub query: String,
    pub peers: Vec<Peer>,
}

impl Saved {
    /// The peers saved for `query`, if the file has that query.
    pub fn peers_of(&self, query: &str) -> Option<&[Peer]> {
        self.sources
            .iter()
            .find(|s| s.query == query)
            .map(|s| s.peers.as_slice())
    }
}

pub fn encode(saved: &Saved) -> String {
    let sources: Vec<Value> = saved
        .sources
        .iter()
        .map(|s| {
            let peers: Vec<Value> = s
                .peers
                .iter()
                .map(|p| json!({"addr": p.addr.to_string(), "weight": p.weight, "priority": p.priority}))
                .collect();
            json!({"query": s.query, "peers": peers})
        })
        .collect();
    let doc = json!({
        "format": FORMAT,
        "version": VERSION,
        "upstream": saved.upstream,
        "saved_at": saved.saved_at,
        "sources": sources,
    });
    let mut text = doc.to_string();
    text.push('\n');
    text
}

pub fn decode(text: &str, upstream: &str) -> Result<Saved, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    if doc.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err("not an ngx-consul state file".into());
    }
    match doc.get("version").and_then(Value::as_u64) {
        Some(VERSION) => {}
        v => {
            return Err(format!(
                "unsupported version {}",
                v.map_or("?".into(), |v| v.to_string())
            ))
        }
    }
    let field = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_string);
    let saved_upstream = field("upstream").ok_or("no upstream name")?;
    if saved_upstream != upstream {
        return Err(format!("written for upstream \"{saved_upstream}\""));
    }
    let saved_at = doc
        .get("saved_at")
        .and_then(Value::as_u64)
        .ok_or("no saved_at")?;
    let list = doc
        .get("sources")
        .and_then(Value::as_array)
        .ok_or("no source list")?;
    let mut sources = Vec::with_capacity(list.len());
    let mut total = 0;
    for (i, src) in list.iter().enumerate() {
        let query = src
            .get("query")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("source {} has no query", i + 1))?;
        let peers = src
            .get("peers")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("source {} has no peer list", i + 1))?;
        total += peers.len();
        if total > MAX_SRV_RECORDS {
            return Err(format!("more than {MAX_SRV_RECORDS} peers"));
        }
        sources.push(SavedSource {
            query: query.to_string(),
            peers: decode_peers(peers)?,
        });
    }
    Ok(Saved {
        upstream: saved_upstream,
        saved_at,
        sources,
    })
}

fn decode_peers(list: &[Value]) -> Result<Vec<Peer>, String> {
    let mut peers = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let bad = || format!("peer {} is malformed", i + 1);
        let addr: SocketAddr = p
            .get("addr")
            .and_then(Value::as_str)
            .and_then(|a| a.parse().ok())
            .ok_or_else(bad)?;
        let num = |k: &str| {
            p.get(k)
                .and_then(Value::as_u64)
                .and_then(|v| u16::try_from(v).ok())
                .ok_or_else(bad)
        };
        if addr.port() == 0 {
            return Err(bad());
        }
        peers.push(Peer::new(addr, num("weight")?, num("priority")?));
    }
    canonicalize(&mut peers);
    Ok(peers)
}

/// Writes atomically: a reader sees the old file or the new one, never a mix.
pub fn save(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = Path::new(&tmp);
    let result = (|| {
        let mut f = fs::File::create(tmp)?;
        f.write_all(encode(saved).as_bytes())?;
        f.sync_all()?;
        fs::rename(tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// `Ok(None)` when there is no file yet.
pub fn load(path: &Path, upstream: &str) -> Result<Option<Saved>, String> {
    match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
        Ok(m) if m.len() > 4 << 20 => return Err("larger than 4M".into()),
        Ok(_) => {}
    }
    let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
    decode(&text, upstream).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Saved {
        Saved {
            upstream: "redis".into(),
            saved_at: 1_764_000_000,
            sources: vec![
                SavedSource {
                    query: "redis.service.yunlu_office.consul".into(),
                    peers: vec![
                        Peer::new("127.0.0.1:6380".parse().unwrap(), 3, 1),
                        Peer::new("[::1]:6381".parse().unwrap(), 1, 2),
                    ],
                },
                SavedSource {
                    query: "redis.service.dc2.consul".into(),
                    peers: vec![Peer::new("127.0.0.2:6380".parse().unwrap(), 1, 1)],
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let text = encode(&sample());
        let back = decode(&text, "redis").unwrap();
        assert_eq!(back, sample());
        assert_eq!(
            back.peers_of("redis.service.dc2.consul").map(<[Peer]>::len),
            Some(1)
        );
        assert_eq!(back.peers_of("other.service.consul"), None);
    }

    #[test]
    fn truncated_corrupt_foreign_are_rejected_with_a_reason() {
        let text = encode(&sample());
        assert!(decode(&text[..text.len() / 2], "redis")
            .unwrap_err()
            .starts_with("not valid JSON"));
        assert_eq!(
            decode("{\"format\":\"x\"}", "redis").unwrap_err(),
            "not an ngx-consul state file"
        );
        assert_eq!(
            decode(&text, "other").unwrap_err(),
            "written for upstream \"redis\""
        );
        let bad = text.replace("127.0.0.1:6380", "127.0.0.1:0");
        assert_eq!(decode(&bad, "redis").unwrap_err(), "peer 1 is malformed");
        let bad = text.replace("\"weight\":3", "\"weight\":70000");
        assert_eq!(decode(&bad, "redis").unwrap_err(), "peer 1 is malformed");
        let bad = text.replace("\"version\":2", "\"version\":9");
        assert_eq!(decode(&bad, "redis").unwrap_err(), "unsupported version 9");
    }

    #[test]
    fn save_and_load_atomically() {
        let dir = std::env::temp_dir().join(format!("ngx-consul-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("redis.state");
        assert_eq!(load(&path, "redis").unwrap(), None);
        save(&path, &sample()).unwrap();
        assert_eq!(load(&path, "redis").unwrap(), Some(sample()));
        let leftovers = fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
        fs::write(&path, b"\x00garbage").unwrap();
        assert!(load(&path, "redis").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
