//! The state file: the last good set of one upstream, per query (an upstream may
//! follow several), so that nginx restarted while Consul is unreachable still
//! serves the last known backends.
//!
//! JSON, written to a new temporary file (never an existing one, never through a
//! symbolic link, mode 0644) and renamed into place. A truncated, corrupt or
//! foreign file, or one that is not a regular file, fails to load with a reason;
//! it is reported and ignored.
//!
//! `PATH.lock` names the nginx instance that writes the file, so that two of them
//! (a live binary upgrade) do not both write it: see [`save_exclusive`].

use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use crate::key::UpstreamKey;
use crate::peer::{canonicalize, Peer};

const FORMAT: &str = "ngx-consul-state";
const VERSION: u64 = 3;
/// Version 2 files (one time for the whole file) are still read.
const VERSION_2: u64 = 2;
/// An upper bound of one peer's JSON, for the size a file may have.
const MAX_PEER_JSON: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub upstream: UpstreamKey,
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
    let mut doc = serde_json::Map::new();
    doc.insert("format".into(), FORMAT.into());
    doc.insert("version".into(), VERSION.into());
    saved.upstream.write_state_identity(&mut doc);
    doc.insert("saved_at".into(), saved.saved_at.into());
    doc.insert("sources".into(), sources.into());
    let mut text = Value::Object(doc).to_string();
    text.push('\n');
    text
}

/// Decodes a state file of `upstream` holding at most `max_peers` peers in all.
pub fn decode(text: &str, upstream: &UpstreamKey, max_peers: usize) -> Result<Saved, String> {
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
    let saved_upstream = UpstreamKey::read_state_identity(&doc)?;
    if let Some(why) = upstream.foreign_state(&saved_upstream) {
        return Err(why);
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
pub fn load(
    path: &Path,
    upstream: &UpstreamKey,
    max_peers: usize,
) -> Result<Option<Saved>, String> {
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

/// The largest state file that can hold `max_peers` peers.
fn max_size(max_peers: usize) -> usize {
    64 * 1024 + max_peers.saturating_mul(MAX_PEER_JSON)
}

/// The state file is rewritten at the latest when the confirmation it holds is
/// this old (or a quarter of `max_stale`, if shorter), while answers confirm
/// the set: a restart during an outage knows the set's age to within that.
pub const CONFIRM_LAG_S: u64 = 60;

/// How long a writer's claim on a state file lasts without a save renewing it:
/// longer than [`CONFIRM_LAG_S`], so that a live writer keeps its claim while
/// answers come. A writer that stops gives its claim up ([`release`]); this is
/// for one that could not (stopped by a debugger, killed in the middle).
pub const WRITER_LEASE_S: u64 = CONFIRM_LAG_S * 5 / 2;

/// The process that last wrote a state file, as the file's lock file names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writer {
    /// The nginx instance: its master's pid (the single process's pid under
    /// `master_process off`). Within one instance the zone decides who writes.
    pub master: i64,
    pub pid: i64,
    /// When it last wrote (Unix seconds).
    pub at: u64,
}

const WRITER_LINE: &str = "ngx-consul-state-writer";

impl Writer {
    fn line(&self) -> String {
        format!(
            "{WRITER_LINE} master={} pid={} at={}\n",
            self.master, self.pid, self.at
        )
    }

    fn parse(text: &str) -> Option<Writer> {
        let mut words = text.split_whitespace();
        if words.next() != Some(WRITER_LINE) {
            return None;
        }
        let mut field = |key: &str| {
            words
                .next()?
                .strip_prefix(key)?
                .strip_prefix('=')?
                .parse::<u64>()
                .ok()
        };
        let master = field("master")?;
        let pid = field("pid")?;
        let at = field("at")?;
        Some(Writer {
            master: i64::try_from(master).ok()?,
            pid: i64::try_from(pid).ok()?,
            at,
        })
    }

    /// Whether `me` (master, pid) may write after this writer, at `now`.
    pub fn yields_to(&self, me_master: i64, now: u64, alive: impl Fn(i64) -> bool) -> bool {
        self.master == me_master
            || !alive(self.pid)
            || now >= self.at.saturating_add(WRITER_LEASE_S)
    }
}

/// What [`save_exclusive`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exclusive {
    Written,
    /// Another process is saving this very moment (its lock is held): ask again later.
    Busy,
    /// Another nginx instance writes this file; this one does not meanwhile.
    Deferred(Writer),
}

/// The lock file next to a state file: `PATH.lock`, with PATH resolved as the
/// one-file-per-upstream check resolves it ([`resolved_path`]): two nginx
/// instances that spell one state file differently name one lock file.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut p = resolved_path(path).into_os_string();
    p.push(".lock");
    p.into()
}

/// [`save`], by one nginx instance at a time. Two instances follow the same
/// upstream with the same file during a live binary upgrade (USR2): the old
/// binary's worker 0 and the new one's both run discovery until the old one
/// quits. `PATH.lock` names the writer; an advisory lock (flock, held only for
/// this call) makes the check and the write one step. The file goes on being
/// written by the instance that wrote it, until that one's writer gives it up
/// ([`release`]), is gone, or has not written for [`WRITER_LEASE_S`]; then the
/// next instance takes over
/// (the new binary after the old one quit, or the old one again when the new
/// one was stopped to roll back). `me` is (master, pid); `alive` says whether
/// a pid still runs.
pub fn save_exclusive(
    path: &Path,
    saved: &Saved,
    me: (i64, i64),
    now: u64,
    alive: impl Fn(i64) -> bool,
) -> std::io::Result<Exclusive> {
    let lock = lock_path(path);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&lock)
        .map_err(|e| match e.kind() {
            // No directory: the reason for the state file as well.
            std::io::ErrorKind::NotFound => e,
            kind => std::io::Error::new(kind, format!("lock file \"{}\": {e}", lock.display())),
        })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "lock file \"{}\" is not a regular file",
            lock.display()
        )));
    }
    // SAFETY: flock on a descriptor this function owns; released when it closes.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        let err = std::io::Error::last_os_error();
        return match err.kind() {
            std::io::ErrorKind::WouldBlock => Ok(Exclusive::Busy),
            _ => Err(err),
        };
    }
    let mut text = String::new();
    // A lock file that is not ours to read (garbage) names no writer.
    let _ = (&mut file).take(256).read_to_string(&mut text);
    let (master, pid) = me;
    if let Some(holder) = Writer::parse(&text) {
        if holder.pid != pid && !holder.yields_to(master, now, alive) {
            return Ok(Exclusive::Deferred(holder));
        }
    }
    save(path, saved)?;
    let line = Writer {
        master,
        pid,
        at: now,
    }
    .line();
    file.set_len(0)?;
    std::os::unix::fs::FileExt::write_all_at(&file, line.as_bytes(), 0)?;
    Ok(Exclusive::Written)
}

/// Gives up the claim on `path` that [`save_exclusive`] recorded for process
/// `pid`, if it is still this process's: the process stops writing (it exits,
/// or its nginx shuts down gracefully), and another instance need not wait for
/// the lease to run out. Nothing happens when the lock is held this moment or
/// names another process.
pub fn release(path: &Path, pid: i64) -> std::io::Result<()> {
    let file = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(lock_path(path))
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    if !file.metadata()?.is_file() {
        return Ok(());
    }
    // SAFETY: flock on a descriptor this function owns; released when it closes.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Ok(());
    }
    let mut text = String::new();
    let _ = (&file).take(256).read_to_string(&mut text);
    if Writer::parse(&text).is_some_and(|w| w.pid == pid) {
        file.set_len(0)?;
    }
    Ok(())
}

/// Whether process `pid` exists (one of another user counts: kill says EPERM).
pub fn process_exists(pid: i64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let sent = unsafe { libc::kill(pid, 0) } == 0;
    sent || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> UpstreamKey {
        UpstreamKey::stream(name)
    }

    fn sample() -> Saved {
        Saved {
            upstream: key("redis"),
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
        let back = decode(&text, &key("redis"), 100).unwrap();
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
        assert!(decode(&text[..text.len() / 2], &key("redis"), 100)
            .unwrap_err()
            .starts_with("not valid JSON"));
        assert_eq!(
            decode("{\"format\":\"x\"}", &key("redis"), 100).unwrap_err(),
            "not an ngx-consul state file"
        );
        assert_eq!(
            decode(&text, &key("other"), 100).unwrap_err(),
            "written for upstream \"redis\""
        );
        let bad = text.replace("127.0.0.1:6380", "127.0.0.1:0");
        assert_eq!(
            decode(&bad, &key("redis"), 100).unwrap_err(),
            "peer 1 is malformed"
        );
        let bad = text.replace("\"weight\":3", "\"weight\":70000");
        assert_eq!(
            decode(&bad, &key("redis"), 100).unwrap_err(),
            "peer 1 is malformed"
        );
        let bad = text.replace("\"version\":3", "\"version\":9");
        assert_eq!(
            decode(&bad, &key("redis"), 100).unwrap_err(),
            "unsupported version 9"
        );
    }

    #[test]
    fn an_http_upstream_s_file_names_its_protocol_and_is_not_the_stream_one_s() {
        let stream = encode(&sample());
        assert!(!stream.contains("protocol"), "{stream}");
        let http = Saved {
            upstream: UpstreamKey::http("redis"),
            ..sample()
        };
        let text = encode(&http);
        assert!(text.contains("\"protocol\":\"http\""), "{text}");
        assert_eq!(decode(&text, &UpstreamKey::http("redis"), 100), Ok(http));
        assert_eq!(
            decode(&text, &key("redis"), 100).unwrap_err(),
            "written for http upstream \"redis\""
        );
        assert_eq!(
            decode(&stream, &UpstreamKey::http("redis"), 100).unwrap_err(),
            "written for upstream \"redis\""
        );
    }

    #[test]
    fn save_and_load_atomically() {
        let dir = std::env::temp_dir().join(format!("ngx-consul-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("redis.state");
        assert_eq!(load(&path, &key("redis"), 100).unwrap(), None);
        save(&path, &sample()).unwrap();
        assert_eq!(load(&path, &key("redis"), 100).unwrap(), Some(sample()));
        let leftovers = fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
        fs::write(&path, b"\x00garbage").unwrap();
        assert!(load(&path, &key("redis"), 100).is_err());
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
        assert_eq!(
            load(&fifo, &key("redis"), 100).unwrap_err(),
            "not a regular file"
        );
        assert_eq!(
            load(&dir, &key("redis"), 100).unwrap_err(),
            "not a regular file"
        );
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
            upstream: key("redis"),
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
            load(&path, &key("redis"), 24_000)
                .unwrap()
                .unwrap()
                .sources
                .len(),
            8
        );
        assert_eq!(
            load(&path, &key("redis"), 23_999).unwrap_err(),
            "more than the 23999 peers the zone holds"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn version_2_files_date_every_source_by_the_file() {
        let v2 = r#"{"format":"ngx-consul-state","version":2,"upstream":"redis","saved_at":77,
            "sources":[{"query":"r.service.consul","peers":[{"addr":"127.0.0.1:1","weight":1,"priority":1}]}]}"#;
        let s = decode(v2, &key("redis"), 10).unwrap();
        assert_eq!(s.sources[0].confirmed_at, 77);
        let v3 = v2.replace("\"version\":2", "\"version\":3");
        assert_eq!(
            decode(&v3, &key("redis"), 10).unwrap_err(),
            "source 1 has no confirmed_at"
        );
    }
    #[test]
    fn one_instance_writes_until_its_writer_is_gone_or_silent() {
        let dir = tmpdir("exclusive");
        let path = dir.join("redis.state");
        let all_alive = |_: i64| true;
        let old = (100, 101);
        let new = (200, 201);
        assert_eq!(
            save_exclusive(&path, &sample(), old, 1_000, all_alive).unwrap(),
            Exclusive::Written
        );
        assert_eq!(load(&path, &key("redis"), 100).unwrap(), Some(sample()));
        let holder = Writer {
            master: 100,
            pid: 101,
            at: 1_000,
        };
        // The new binary's worker 0 waits while the old one writes...
        assert_eq!(
            save_exclusive(&path, &sample(), new, 1_010, all_alive).unwrap(),
            Exclusive::Deferred(holder)
        );
        // ...and the old one goes on, as does a later worker 0 of its own master.
        assert_eq!(
            save_exclusive(&path, &sample(), old, 1_020, all_alive).unwrap(),
            Exclusive::Written
        );
        assert_eq!(
            save_exclusive(&path, &sample(), (100, 102), 1_030, all_alive).unwrap(),
            Exclusive::Written
        );
        // The writer's process is gone: the next one takes over at once.
        let gone = |pid: i64| pid != 102;
        assert_eq!(
            save_exclusive(&path, &sample(), new, 1_031, gone).unwrap(),
            Exclusive::Written
        );
        // Now the old instance (a roll back) waits for the new one...
        assert_eq!(
            save_exclusive(&path, &sample(), old, 1_040, all_alive).unwrap(),
            Exclusive::Deferred(Writer {
                master: 200,
                pid: 201,
                at: 1_031
            })
        );
        // ...until it has not written for the lease.
        assert_eq!(
            save_exclusive(&path, &sample(), old, 1_031 + WRITER_LEASE_S, all_alive).unwrap(),
            Exclusive::Written
        );
        let text = fs::read_to_string(lock_path(&path)).unwrap();
        assert_eq!(
            text,
            format!(
                "ngx-consul-state-writer master=100 pid=101 at={}\n",
                1_031 + WRITER_LEASE_S
            )
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_writer_that_stops_lets_the_next_one_write_at_once() {
        let dir = tmpdir("release");
        let path = dir.join("redis.state");
        let alive = |_: i64| true;
        assert_eq!(
            release(&path, 101).ok(),
            Some(()),
            "no lock file: nothing to do"
        );
        assert_eq!(
            save_exclusive(&path, &sample(), (100, 101), 10, alive).unwrap(),
            Exclusive::Written
        );
        release(&path, 999).unwrap();
        assert!(matches!(
            save_exclusive(&path, &sample(), (200, 201), 11, alive).unwrap(),
            Exclusive::Deferred(_)
        ));
        release(&path, 101).unwrap();
        assert_eq!(
            save_exclusive(&path, &sample(), (200, 201), 12, alive).unwrap(),
            Exclusive::Written
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_spellings_of_one_state_file_share_its_lock() {
        let dir = tmpdir("lock-spellings");
        fs::create_dir_all(dir.join("st/sub")).unwrap();
        std::os::unix::fs::symlink(dir.join("st"), dir.join("link")).unwrap();
        let (one, other) = (dir.join("st/s.state"), dir.join("link/sub/../s.state"));
        let lock = fs::canonicalize(&dir).unwrap().join("st/s.state.lock");
        assert_eq!(lock_path(&one), lock);
        assert_eq!(lock_path(&other), lock);
        let alive = |_: i64| true;
        assert_eq!(
            save_exclusive(&one, &sample(), (100, 101), 10, alive).unwrap(),
            Exclusive::Written
        );
        // Another nginx instance, its configuration spelling the file otherwise.
        assert!(matches!(
            save_exclusive(&other, &sample(), (200, 201), 11, alive).unwrap(),
            Exclusive::Deferred(Writer { master: 100, .. })
        ));
        release(&one, 101).unwrap();
        assert_eq!(
            save_exclusive(&other, &sample(), (200, 201), 12, alive).unwrap(),
            Exclusive::Written
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_held_lock_or_a_garbage_lock_file() {
        let dir = tmpdir("held");
        let path = dir.join("redis.state");
        let lock = lock_path(&path);
        fs::write(&lock, "garbage\n").unwrap();
        assert_eq!(
            save_exclusive(&path, &sample(), (1, 2), 5, |_| true).unwrap(),
            Exclusive::Written
        );
        let f = fs::File::open(&lock).unwrap();
        // SAFETY: flock on a descriptor this test owns.
        assert_eq!(
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) },
            0
        );
        assert_eq!(
            save_exclusive(&path, &sample(), (1, 2), 6, |_| true).unwrap(),
            Exclusive::Busy
        );
        drop(f);
        assert_eq!(
            save_exclusive(&path, &sample(), (1, 2), 7, |_| true).unwrap(),
            Exclusive::Written
        );
        // A link planted as the lock file is not followed.
        fs::remove_file(&lock).unwrap();
        std::os::unix::fs::symlink(dir.join("victim"), &lock).unwrap();
        assert!(save_exclusive(&path, &sample(), (1, 2), 8, |_| true).is_err());
        assert!(!dir.join("victim").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn processes_that_exist() {
        assert!(process_exists(i64::from(std::process::id())));
        assert!(process_exists(1), "init runs (as another user, too)");
        assert!(!process_exists(0));
        assert!(!process_exists(-1));
        assert!(!process_exists(i64::MAX));
    }
}
