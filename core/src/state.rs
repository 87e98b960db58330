//! The state file: the last good set of one upstream, per query (an upstream may
//! follow several), so that nginx restarted while Consul is unreachable still
//! serves the last known backends.
//!
//! JSON, written to a new temporary file (never an existing one, never through a
//! symbolic link, mode 0644) and renamed into place. A truncated, corrupt or
//! foreign file, or one that is not a regular file, fails to load with a reason;
//! it is reported and ignored.

use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use crate::peer::{canonicalize, Peer};

const FORMAT: &str = "ngx-consul-state";
const VERSION: u64 = 3;
/// Version 2 files (one time for the whole file) are still read.
const VERSION_2: u64 = 2;
/// An upper bound of one peer's JSON, for the size a file may have.
const MAX_PEER_JSON: usize = 128;

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
    /// When an answer last confirmed these peers (Unix seconds): `max_stale`
    /// counts from here after a restart, not from when the file was written.
    pub confirmed_at: u64,
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
            json!({"query": s.query, "confirmed_at": s.confirmed_at, "peers": peers})
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

/// Decodes a state file of `upstream` holding at most `max_peers` peers in all.
pub fn decode(text: &str, upstream: &str, max_peers: usize) -> Result<Saved, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    if doc.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err("not an ngx-consul state file".into());
    }
    let version = doc.get("version").and_then(Value::as_u64);
    if version != Some(VERSION) && version != Some(VERSION_2) {
        return Err(format!(
            "unsupported version {}",
            version.map_or("?".into(), |v| v.to_string())
        ));
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
        if total > max_peers {
            return Err(format!("more than the {max_peers} peers the zone holds"));
        }
        let confirmed_at = match version {
            Some(VERSION_2) => saved_at,
            _ => src
                .get("confirmed_at")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("source {} has no confirmed_at", i + 1))?,
        };
        sources.push(SavedSource {
            query: query.to_string(),
            confirmed_at,
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
/// The temporary file is created anew next to `path` under a name nobody else
/// uses (an existing file or link there is never opened), with mode 0644.
pub fn save(path: &Path, saved: &Saved) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".tmp.{}.{}.{nanos:x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = Path::new(&tmp);
    let result = write_new(tmp, &encode(saved)).and_then(|()| fs::rename(tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Creates `path` (which must not exist, not even as a link), mode 0644, and
/// writes `text` to disk.
fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // The mode asked for is reduced by the umask: set it as documented.
    f.set_permissions(fs::Permissions::from_mode(0o644))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Loads the state file of `upstream` (at most `max_peers` peers); `Ok(None)` when
/// there is no file yet. Anything but a regular file is refused without reading
/// it: a FIFO would block the process forever.
pub fn load(path: &Path, upstream: &str, max_peers: usize) -> Result<Option<Saved>, String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match file {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
        Ok(f) => f,
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let limit = max_size(max_peers);
    if meta.len() > limit as u64 {
        return Err(format!("larger than {limit} bytes"));
    }
    let mut text = String::new();
    file.take(limit as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    decode(&text, upstream, max_peers).map(Some)
}

/// The largest state file that can hold `max_peers` peers.
/// The file a state path names, for telling two spellings of one file apart
/// (`st/s.state`, `./st/sub/../s.state`, `st//s.state`, a symbolic link to
/// `st`): the directory resolved, the file name kept as it is (the file is
/// replaced by a rename, never written through a link). A directory that does
/// not exist yet is resolved as far as it exists, the rest taken as written
/// with `.` and `..` applied. `path` is absolute (nginx's prefix applied).
pub fn resolved_path(path: &Path) -> PathBuf {
    let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
        return lexical(Path::new("/"), path.components());
    };
    let mut existing = dir;
    loop {
        if let Ok(real) = fs::canonicalize(existing) {
            let rest = dir.strip_prefix(existing).unwrap_or(Path::new(""));
            return lexical(&real, rest.components()).join(file);
        }
        match existing.parent() {
            Some(up) => existing = up,
            None => return lexical(Path::new("/"), dir.components()).join(file),
        }
    }
}

/// `base` followed by `parts`, `.` and `..` applied without the file system.
fn lexical<'a>(base: &Path, parts: impl Iterator<Item = Component<'a>>) -> PathBuf {
    let mut out = base.to_path_buf();
    for part in parts {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::RootDir => out = PathBuf::from("/"),
            Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn max_size(max_peers: usize) -> usize {
    64 * 1024 + max_peers.saturating_mul(MAX_PEER_JSON)
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
                    confirmed_at: 1_763_999_990,
                    peers: vec![
                        Peer::new("127.0.0.1:6380".parse().unwrap(), 3, 1),
                        Peer::new("[::1]:6381".parse().unwrap(), 1, 2),
                    ],
                },
                SavedSource {
                    query: "redis.service.dc2.consul".into(),
                    confirmed_at: 1_763_999_000,
                    peers: vec![Peer::new("127.0.0.2:6380".parse().unwrap(), 1, 1)],
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let text = encode(&sample());
        let back = decode(&text, "redis", 100).unwrap();
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
        assert!(decode(&text[..text.len() / 2], "redis", 100)
            .unwrap_err()
            .starts_with("not valid JSON"));
        assert_eq!(
            decode("{\"format\":\"x\"}", "redis", 100).unwrap_err(),
            "not an ngx-consul state file"
        );
        assert_eq!(
            decode(&text, "other", 100).unwrap_err(),
            "written for upstream \"redis\""
        );
        let bad = text.replace("127.0.0.1:6380", "127.0.0.1:0");
        assert_eq!(
            decode(&bad, "redis", 100).unwrap_err(),
            "peer 1 is malformed"
        );
        let bad = text.replace("\"weight\":3", "\"weight\":70000");
        assert_eq!(
            decode(&bad, "redis", 100).unwrap_err(),
            "peer 1 is malformed"
        );
        let bad = text.replace("\"version\":3", "\"version\":9");
        assert_eq!(
            decode(&bad, "redis", 100).unwrap_err(),
            "unsupported version 9"
        );
    }

    #[test]
    fn save_and_load_atomically() {
        let dir = std::env::temp_dir().join(format!("ngx-consul-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("redis.state");
        assert_eq!(load(&path, "redis", 100).unwrap(), None);
        save(&path, &sample()).unwrap();
        assert_eq!(load(&path, "redis", 100).unwrap(), Some(sample()));
        let leftovers = fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
        fs::write(&path, b"\x00garbage").unwrap();
        assert!(load(&path, "redis", 100).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ngx-consul-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn one_file_under_several_spellings_resolves_to_one_path() {
        let dir = tmpdir("spellings");
        fs::create_dir_all(dir.join("st/sub")).unwrap();
        std::os::unix::fs::symlink(dir.join("st"), dir.join("link")).unwrap();
        let real = fs::canonicalize(&dir).unwrap().join("st/s.state");
        for spelling in [
            "st/s.state",
            "./st/sub/../s.state",
            "st//s.state",
            "st/./s.state",
            "link/s.state",
            "link/sub/../s.state",
        ] {
            assert_eq!(resolved_path(&dir.join(spelling)), real, "{spelling}");
        }
        // Another file name, or the link itself as the file: other files.
        assert_ne!(resolved_path(&dir.join("st/t.state")), real);
        assert_ne!(
            resolved_path(&dir.join("link")),
            resolved_path(&dir.join("st"))
        );
        // A directory that does not exist (yet): as far as it exists, then as written.
        let missing = fs::canonicalize(&dir).unwrap().join("st/new/s.state");
        for spelling in [
            "link/new/s.state",
            "st/new/x/../s.state",
            "st/./new//s.state",
        ] {
            assert_eq!(resolved_path(&dir.join(spelling)), missing, "{spelling}");
        }
        assert_eq!(
            resolved_path(Path::new("/nonexistent-ngx-consul/a/../b/s.state")),
            Path::new("/nonexistent-ngx-consul/b/s.state")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_or_a_directory_is_refused_without_blocking() {
        let dir = tmpdir("fifo");
        let fifo = dir.join("fifo.state");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert_eq!(load(&fifo, "redis", 100).unwrap_err(), "not a regular file");
        assert_eq!(load(&dir, "redis", 100).unwrap_err(), "not a regular file");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_never_writes_through_a_planted_link_and_sets_its_mode() {
        let dir = tmpdir("link");
        let path = dir.join("redis.state");
        let victim = dir.join("victim");
        fs::write(&victim, "keep me").unwrap();
        // A link planted where the temporary file goes is not followed.
        let planted = dir.join("planted");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let err = write_new(&planted, "attack").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o077) };
        save(&path, &sample()).unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep me");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cap_is_the_zone_not_a_record_count() {
        let peers: Vec<Peer> = (0..3000u32)
            .map(|i| {
                Peer::new(
                    format!("127.1.{}.{}:6379", i / 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                    1,
                    1,
                )
            })
            .collect();
        let big = Saved {
            upstream: "redis".into(),
            saved_at: 5,
            sources: (0..8)
                .map(|n| SavedSource {
                    query: format!("q{n}.service.consul"),
                    confirmed_at: 5,
                    peers: peers.clone(),
                })
                .collect(),
        };
        let dir = tmpdir("big");
        let path = dir.join("big.state");
        save(&path, &big).unwrap();
        assert_eq!(
            load(&path, "redis", 24_000).unwrap().unwrap().sources.len(),
            8
        );
        assert_eq!(
            load(&path, "redis", 23_999).unwrap_err(),
            "more than the 23999 peers the zone holds"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn version_2_files_date_every_source_by_the_file() {
        let v2 = r#"{"format":"ngx-consul-state","version":2,"upstream":"redis","saved_at":77,
            "sources":[{"query":"r.service.consul","peers":[{"addr":"127.0.0.1:1","weight":1,"priority":1}]}]}"#;
        let s = decode(v2, "redis", 10).unwrap();
        assert_eq!(s.sources[0].confirmed_at, 77);
        let v3 = v2.replace("\"version\":2", "\"version\":3");
        assert_eq!(
            decode(&v3, "redis", 10).unwrap_err(),
            "source 1 has no confirmed_at"
        );
    }
}
