//! One upstream's discovered set in the process that writes its zone (worker 0,
//! or the master filling the zone before it forks workers): each
//! `consul_upstream` line's part, the parts merged into the one set the zone
//! holds and sized against the zone, what a line's answer does to its part
//! (publish, drop, keep; the set's kind), the record kept per line, and when
//! the state file is written. Nothing here touches nginx: clocks, log lines,
//! the zone's write lock and the state file go through [`GroupEnv`].

use std::borrow::Cow;

use crate::answer::Ignored;
use crate::key::{LogPrefix, UpstreamKey};
use crate::lookup::{Resolved, Truncation};
use crate::peer::{canonicalize_by, Peer};
use crate::policy::{peers as count, Action, Decision, Level, Outcome, Tracker};
use crate::settings::{Settings, Transport};
use crate::state::{self, Exclusive, Saved, SavedSource};
use crate::zone::{LineStatus, Lookup, SetKind, Snapshot, StreakKind, Zone};

/// What a user can do about an answer that cannot carry every instance.
const SEE_EVERY_INSTANCE: &str =
    "to see every instance, use an api= line or several consul_upstream lines (by tag)";

/// What a group does outside its own memory and the zone's: the process's
/// clocks and pid, log lines, the zone's write lock, the state file.
pub trait GroupEnv {
    /// Holds the zone's write lock until it is dropped.
    type Lock;
    /// This process: the zone's writer while it writes.
    fn pid(&self) -> i64;
    /// Unix time in seconds.
    fn now_unix(&self) -> u64;
    /// The monotonic clock of the policy's timers, in milliseconds.
    fn now_ms(&self) -> u64;
    /// A random number: the jitter of the next query.
    fn random(&self) -> u64;
    /// A log line; formatted only where it is written.
    fn log(&self, level: Level, msg: std::fmt::Arguments<'_>);
    /// Takes the zone's write lock (never while it is held).
    fn lock(&self) -> Self::Lock;
    /// The smallest `zone=` size that holds `peers` peers.
    fn zone_size_for(&self, peers: usize) -> usize;
    /// The state file at `path` of `upstream` (at most `max_peers` peers), as
    /// [`state::load`] reads it.
    fn load_state(
        &self,
        path: &str,
        upstream: &UpstreamKey,
        max_peers: usize,
    ) -> Result<Option<Saved>, String>;
    /// Writes the state file as process `pid` of this nginx instance, at
    /// `now_unix`, as [`state::save_exclusive`] does.
    fn save_state(
        &self,
        path: &str,
        saved: &Saved,
        pid: i64,
        now_unix: u64,
    ) -> std::io::Result<Exclusive>;
    /// Gives up process `pid`'s claim on the state file ([`state::release`]).
    fn release_state(&self, path: &str, pid: i64);
}

/// One `consul_upstream` line, as the group sees it.
#[derive(Clone, Copy, Debug)]
pub struct LineConf<'a> {
    /// `source_tag` of the query: marks the line's peers and record in the zone.
    pub tag: u32,
    pub settings: &'a Settings,
}

/// The upstream a group discovers for.
#[derive(Clone, Debug)]
pub struct GroupConf<'a> {
    pub key: UpstreamKey,
    /// Never empty. The first line also holds the upstream-wide parameters.
    pub lines: Vec<LineConf<'a>>,
    /// `state=`, as a full path.
    pub state_path: Option<&'a str>,
}

/// One line's part of the upstream's set.
#[derive(Clone, Debug)]
struct Part {
    /// What the zone holds for the line.
    published: Vec<Peer>,
    /// The last non-empty part an answer confirmed, and when (Unix seconds):
    /// what the state file keeps (a dropped part is not a good one).
    good: Vec<Peer>,
    confirmed_unix: u64,
    /// The confirmation the state file holds for this line.
    saved_unix: u64,
    kind: SetKind,
    last_ignored: Ignored,
    /// The last answer could not carry every instance (said once per change).
    truncated: Option<Truncation>,
    /// An API line's last `X-Consul-Index`, for the status page.
    index: u64,
}

/// One upstream's lines and their parts, over the upstream's zone.
pub struct Group<'a, E: GroupEnv> {
    conf: GroupConf<'a>,
    zone: Zone<'a>,
    env: E,
    pid: i64,
    /// The master before it forks workers: it writes without claiming the
    /// zone (the previous worker 0 may still be its writer), and never the
    /// state file.
    master: bool,
    parts: Vec<Part>,
    /// Another process writes the zone now (a newer worker 0).
    stopped: bool,
    /// A part changed since the state file was written.
    state_dirty: bool,
    /// The last save failed (said once, until one succeeds).
    state_failing: bool,
    /// Another nginx instance writes the state file (a binary upgrade): the
    /// pid said, once, until this process writes it again.
    state_deferred: Option<i64>,
    /// This process's claim on the state file (see `state::save_exclusive`),
    /// given up when it stops writing.
    state_held: bool,
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

/// The lookups a line's record counts, of every kind.
fn lookups_of(rec: &LineStatus) -> u64 {
    rec.lookups.iter().sum()
}

impl<'a, E: GroupEnv> Group<'a, E> {
    /// Takes over the upstream's zone. Each line starts from its part of the zone:
    /// a reload or respawn keeps the set, and at start (or for a line a reload
    /// added) the master filled it before it forked the workers ([`Group::prefill`]).
    /// Peers of lines that are no longer configured leave the zone now, whatever
    /// DNS does.
    pub fn start(conf: GroupConf<'a>, zone: Zone<'a>, env: E) -> Group<'a, E> {
        let pid = env.pid();
        {
            let _lock = env.lock();
            zone.claim(pid);
        }
        let z = zone;
        let snapshot = z.read().unwrap_or_default();
        let parts = parts_of(&conf, &z, &snapshot, env.now_unix());
        let mut g = Group {
            conf,
            zone,
            env,
            pid,
            master: false,
            parts,
            stopped: false,
            state_dirty: true,
            state_failing: false,
            state_deferred: None,
            state_held: false,
        };
        let tags: Vec<u32> = g.conf.lines.iter().map(|l| l.tag).collect();
        let lock = g.env.lock();
        z.retain_lines(&tags);
        // The previous configuration may have balanced otherwise (least_conn's
        // tree is kept up to date only under least_conn).
        z.tree().rebuild();
        let p = g.conf.key.log_prefix();
        for (l, part) in g.conf.lines.iter().zip(&g.parts) {
            let s = l.settings;
            let resolvers: Vec<String> = s.resolvers.iter().map(|r| r.to_string()).collect();
            let zone_text = format!(
                "zone={}k holds {}",
                g.zone_size() / 1024,
                count(z.capacity())
            );
            match &s.api {
                Some(api) => g.env.log(
                    Level::Info,
                    format_args!(
                        "{p}watching {} (blocking queries, wait={}ms), {zone_text}",
                        s.query, api.wait_ms
                    ),
                ),
                None => g.env.log(
                    Level::Info,
                    format_args!(
                        "{p}resolving {} every {}ms via {} ({}), {zone_text}",
                        s.query,
                        s.interval_ms,
                        resolvers.join(", "),
                        transport_name(s.transport),
                    ),
                ),
            }
            let (kind, confirmed, peers) = (part.kind, part.confirmed_unix, part.published.len());
            z.update_line(l.tag, |rec| {
                rec.kind = kind as u32;
                rec.confirmed_unix = confirmed;
                rec.peers = peers as u32;
            });
        }
        drop(lock);

        // The zone must hold exactly the configured lines' parts.
        let merged = g.merged(None);
        let current: Vec<(Peer, u32)> = snapshot.peers.iter().map(|sp| (sp.peer, sp.tag)).collect();
        if merged != current {
            let removed = current.iter().filter(|(_, t)| !tags.contains(t)).count();
            if let Some(generation) = g.write(&merged) {
                if removed > 0 {
                    g.env.log(Level::Notice, format_args!(
                        "{}dropping {} of removed \"consul_upstream\" lines, {} in all (generation {generation})",
                        g.conf.key.log_prefix(),
                        count(removed),
                        count(merged.len())
                    ));
                }
            }
        }
        // The state file follows the zone from now on: the master's set goes
        // in at once (an API line's next answer may be minutes away).
        g.save_state();
        g
    }

    /// In the master, before it forks workers: the upstream's lines the zone
    /// holds nothing for (a start, a new upstream or line, a zone of another
    /// size with a new line), with the state file's parts for them already in
    /// the zone when the zone is fresh. `None` when every line has its part.
    pub fn prefill(
        conf: GroupConf<'a>,
        zone: Zone<'a>,
        env: E,
    ) -> Option<(Group<'a, E>, Vec<usize>)> {
        let z = zone;
        let snapshot = z.read().unwrap_or_default();
        let empty: Vec<usize> = (0..conf.lines.len())
            .filter(|&i| {
                let tag = conf.lines[i].tag;
                !snapshot.peers.iter().any(|sp| sp.tag == tag)
                    && z.line(tag)
                        .is_none_or(|rec| SetKind::from_u32(rec.kind) == SetKind::None)
            })
            .collect();
        if empty.is_empty() {
            return None;
        }
        let parts = parts_of(&conf, &z, &snapshot, env.now_unix());
        let mut g = Group {
            conf,
            zone,
            pid: env.pid(),
            env,
            master: true,
            parts,
            stopped: false,
            state_dirty: false,
            state_failing: false,
            state_deferred: None,
            state_held: false,
        };
        if let (Some(path), 0) = (g.conf.state_path, snapshot.generation) {
            g.load_state_file(path, &empty);
        }
        Some((g, empty))
    }

    fn prefix(&self) -> LogPrefix<'_> {
        self.conf.key.log_prefix()
    }

    /// The zone's size as configured (`zone=` of the first line).
    fn zone_size(&self) -> usize {
        self.conf.lines.first().map_or(0, |l| l.settings.zone_size)
    }

    /// The state file's parts for a fresh zone (a start, not a reload), if usable.
    fn load_state(&self, path: &str) -> Option<Saved> {
        let p = self.conf.key.log_prefix();
        let saved = match self
            .env
            .load_state(path, &self.conf.key, self.zone.capacity())
        {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(reason) => {
                self.env.log(
                    Level::Error,
                    format_args!("{p}state file \"{path}\" ignored: {reason}"),
                );
                return None;
            }
        };
        let known = self
            .conf
            .lines
            .iter()
            .any(|l| saved.sources.iter().any(|s| s.query == l.settings.query));
        if !known {
            let queries: Vec<&str> = saved.sources.iter().map(|s| s.query.as_str()).collect();
            self.env.log(
                Level::Error,
                format_args!(
                    "{p}state file \"{path}\" ignored: written for {}",
                    queries.join(", ")
                ),
            );
            return None;
        }
        Some(saved)
    }

    /// The state file's parts for `lines`, written to the zone (master only).
    fn load_state_file(&mut self, path: &str, lines: &[usize]) {
        let Some(saved) = self.load_state(path) else {
            return;
        };
        let mut filled = Vec::new();
        for &i in lines {
            let query = &self.conf.lines[i].settings.query;
            if let Some(src) = saved.sources.iter().find(|s| s.query == *query) {
                let part = &mut self.parts[i];
                part.published = src.peers.clone();
                part.good = src.peers.clone();
                part.confirmed_unix = src.confirmed_at;
                part.saved_unix = src.confirmed_at;
                part.kind = SetKind::StateFile;
                filled.push(i);
            }
        }
        if filled.is_empty() {
            return;
        }
        let merged = self.merged(None);
        let Some(generation) = self.write(&merged) else {
            return;
        };
        self.env.log(
            Level::Notice,
            format_args!(
                "{}{} from state file \"{path}\" (generation {generation})",
                self.prefix(),
                count(merged.len())
            ),
        );
        let now_unix = self.env.now_unix();
        let _lock = self.env.lock();
        for i in filled {
            let part = &self.parts[i];
            let (kind, confirmed, peers) = (part.kind, part.confirmed_unix, part.published.len());
            self.zone.update_line(self.conf.lines[i].tag, |rec| {
                rec.kind = kind as u32;
                rec.confirmed_unix = confirmed;
                rec.peers = peers as u32;
                rec.changed_unix = now_unix;
            });
        }
    }

    /// Line `line`'s settings.
    pub fn settings(&self, line: usize) -> &'a Settings {
        self.conf.lines[line].settings
    }

    /// Peers the upstream's zone holds.
    pub fn capacity(&self) -> usize {
        self.zone.capacity()
    }

    /// What the zone holds for line `line`.
    pub fn published(&self, line: usize) -> &[Peer] {
        &self.parts[line].published
    }

    /// The lookups line `line`'s record counts.
    pub fn lookups(&self, line: usize) -> u64 {
        lookups_of(
            &self
                .zone
                .line(self.conf.lines[line].tag)
                .unwrap_or_default(),
        )
    }

    /// What was said about line `line`'s last answer: the records it ignored,
    /// and whether it could not carry every instance.
    pub fn said_about(&self, line: usize) -> (Ignored, Option<Truncation>) {
        let part = &self.parts[line];
        (part.last_ignored.clone(), part.truncated)
    }

    /// Goes on from what another process (the master) said about line
    /// `line`'s last answer: it is not said again.
    pub fn resume_said(&mut self, line: usize, ignored: Ignored, truncated: Option<Truncation>) {
        let part = &mut self.parts[line];
        part.last_ignored = ignored;
        part.truncated = truncated;
    }

    /// Records an API line's index before its answer is applied.
    pub fn set_index(&mut self, line: usize, index: u64) {
        self.parts[line].index = index;
    }

    /// A line's policy tracker, aware of how old its carried-over part is, and
    /// of the streak its record holds (the master, or the previous worker 0,
    /// logged its first line).
    pub fn tracker(&self, line: usize) -> Tracker {
        let l = &self.conf.lines[line];
        let mut t = Tracker::new(&self.conf.key, l.settings);
        let part = &self.parts[line];
        let (now_ms, now_unix) = (self.env.now_ms(), self.env.now_unix());
        if !part.published.is_empty() {
            let age_ms = now_unix
                .saturating_sub(part.confirmed_unix)
                .saturating_mul(1000);
            t.loaded(now_ms.saturating_sub(age_ms));
        }
        if let Some(rec) = self.zone.line(l.tag) {
            t.resume(&rec, now_ms, now_unix);
        }
        t
    }

    /// Whether this process still writes the zone; says once when it stopped.
    pub fn still_writer(&mut self) -> bool {
        if !self.stopped && self.zone.writer() != self.pid {
            self.hand_over();
        }
        !self.stopped
    }

    /// A newer discovery process (worker 0 after a reload or respawn) writes the
    /// zone now: this process stops, and says so once.
    fn hand_over(&mut self) {
        if !self.stopped {
            self.stopped = true;
            self.env.log(
                Level::Notice,
                format_args!(
                    "{}process {} resolves from now on",
                    self.prefix(),
                    self.zone.writer()
                ),
            );
        }
    }

    /// The upstream's set: every line's part (line `replace` given as `part`),
    /// canonical, each peer with its line's tag.
    fn merged(&self, replace: Option<(usize, &[Peer])>) -> Vec<(Peer, u32)> {
        let mut all: Vec<(Peer, u32)> = Vec::new();
        for (i, (part, line)) in self.parts.iter().zip(&self.conf.lines).enumerate() {
            let peers = match replace {
                Some((r, peers)) if r == i => peers,
                _ => &part.published,
            };
            all.extend(peers.iter().map(|p| (*p, line.tag)));
        }
        canonicalize_by(&mut all, |(p, _)| p);
        all
    }

    /// Writes `set` as the next generation, if this process is still the writer.
    fn write(&mut self, set: &[(Peer, u32)]) -> Option<u64> {
        let written = {
            let _lock = self.env.lock();
            let z = &self.zone;
            if !self.master && z.writer() != self.pid {
                None
            } else {
                let set = self.with_others(set);
                Some(z.publish(&set, self.env.now_unix(), self.env.now_ms()))
            }
        };
        match written {
            None => {
                self.hand_over();
                None
            }
            Some(Ok(generation)) => Some(generation),
            Some(Err(e)) => {
                // Sizes are checked before: only a zone smaller than it says.
                self.env.log(
                    Level::Error,
                    format_args!(
                        "{}{} do not fit in the zone (max {})",
                        self.prefix(),
                        count(set.len()),
                        e.capacity
                    ),
                );
                None
            }
        }
    }

    /// Applies one lookup's result to line `line`; returns when to ask next (ms).
    pub fn apply(&mut self, line: usize, tracker: &mut Tracker, result: Resolved) -> u64 {
        let settings = self.conf.lines[line].settings;
        let p = self.conf.key.log_prefix();
        let (outcome, lookup, reason) = match result {
            Resolved::Empty { nxdomain } => (
                Outcome::Empty { nxdomain },
                Lookup::Empty,
                if nxdomain { "NXDOMAIN" } else { "no records" }.to_string(),
            ),
            Resolved::Failed(reason) => (Outcome::Failed(reason.clone()), Lookup::Error, reason),
            Resolved::Peers {
                peers,
                ignored,
                truncated,
            } => {
                let part = &mut self.parts[line];
                if truncated != part.truncated {
                    let query = &settings.query;
                    let (level, msg) = match truncated {
                        Some(Truncation::Tc) => (
                            Level::Warn,
                            format!(
                                "{p}Consul truncated the answer for {query} (TC set): {} came, \
                                 others are left out; {SEE_EVERY_INSTANCE}",
                                count(peers.len())
                            ),
                        ),
                        Some(Truncation::Full) => (
                            Level::Warn,
                            format!(
                                "{p}the answer for {query} is as large as Consul sends ({} came): \
                                 it may leave instances out without saying so (TC is set only \
                                 with enable_truncate); {SEE_EVERY_INSTANCE}",
                                count(peers.len())
                            ),
                        ),
                        None => (
                            Level::Notice,
                            format!("{p}the answer for {query} carries every instance again"),
                        ),
                    };
                    self.env.log(level, format_args!("{msg}"));
                    part.truncated = truncated;
                }
                if !ignored.is_empty() && ignored != part.last_ignored {
                    let msg = format!("{p}ignored records of the answer: {}", ignored.describe());
                    let level = if ignored.needs_attention() {
                        Level::Warn
                    } else {
                        Level::Info
                    };
                    self.env.log(level, format_args!("{msg}"));
                }
                part.last_ignored = ignored;
                self.sized(line, peers)
            }
        };
        let tenth = settings.interval_ms / 10;
        let jitter = if tenth == 0 {
            0
        } else {
            self.env.random() % (tenth + 1)
        };
        let now_ms = self.env.now_ms();
        let current = self.parts[line].published.len();
        let decision: Decision = tracker.on_outcome(outcome, current, now_ms, jitter);
        self.act(line, tracker, decision, Some(lookup), &reason)
    }

    /// Carries a decision out for line `line` (`lookup`: the outcome it
    /// counts; `None` for a `max_stale` drop without an answer); returns when
    /// to ask next (ms).
    pub fn act(
        &mut self,
        line: usize,
        tracker: &Tracker,
        decision: Decision,
        lookup: Option<Lookup>,
        reason: &str,
    ) -> u64 {
        if let Some((level, msg)) = &decision.log {
            self.env.log(*level, format_args!("{msg}"));
        }
        let now_unix = self.env.now_unix();
        // Whether the line's part changed (peers, weights, priorities).
        let mut changed = false;
        match decision.action {
            Action::Publish(peers) => {
                if peers != self.parts[line].published {
                    self.publish(line, peers.clone());
                    changed = self.parts[line].published == peers;
                }
                let part = &mut self.parts[line];
                if part.good != peers {
                    part.good = peers;
                    self.state_dirty = true;
                }
                let part = &mut self.parts[line];
                part.confirmed_unix = now_unix;
                part.kind = SetKind::Live;
            }
            Action::Drop => {
                let had = !self.parts[line].published.is_empty();
                self.publish(line, Vec::new());
                changed = had && self.parts[line].published.is_empty();
                self.parts[line].kind = SetKind::Dropped;
            }
            Action::Keep => {
                let part = &mut self.parts[line];
                if !part.published.is_empty() && part.kind != SetKind::StateFile {
                    part.kind = SetKind::Kept;
                }
            }
        }
        self.record(line, tracker, lookup, reason, changed);
        self.save_state();
        decision.next_ms
    }

    /// The outcome of an answer with `peers`: too large for the zone, with the
    /// other lines' parts beside it, or a set to publish.
    fn sized(&self, line: usize, peers: Vec<Peer>) -> (Outcome, Lookup, String) {
        let capacity = self.zone.capacity();
        // Merging only removes duplicates: when the parts fit side by side (the
        // usual case), the merged set fits too and need not be built here.
        let bound: usize = self
            .parts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != line)
            .map(|(_, part)| part.published.len())
            .sum::<usize>()
            + peers.len();
        let total = if bound > capacity {
            self.merged(Some((line, &peers))).len()
        } else {
            bound
        };
        if total <= capacity {
            return (Outcome::Peers(peers), Lookup::Ok, String::new());
        }
        let outcome = Outcome::Oversize {
            peers: total,
            capacity,
            zone_size: self.zone_size(),
            needed_size: self.env.zone_size_for(total),
        };
        let reason = format!("{} do not fit in the zone (max {capacity})", count(total));
        (outcome, Lookup::Oversize, reason)
    }

    /// `set` with the zone's peers of lines this process does not follow but the
    /// zone keeps a record for: lines a reload added, which the master filled
    /// while the previous worker 0 still writes (the next worker 0 takes them
    /// over; it dropped the records of removed lines before it writes).
    fn with_others<'s>(&self, set: &'s [(Peer, u32)]) -> Cow<'s, [(Peer, u32)]> {
        let z = &self.zone;
        // Records name tag 0 as 1 (0 marks a free record).
        let ours = |tag: u32| self.conf.lines.iter().any(|l| l.tag.max(1) == tag);
        // Usually none: only the records are looked at then.
        let others: Vec<u32> = z
            .lines()
            .iter()
            .map(|r| r.tag)
            .filter(|&t| !ours(t))
            .collect();
        if others.is_empty() {
            return Cow::Borrowed(set);
        }
        let Some(snapshot) = z.read() else {
            return Cow::Borrowed(set);
        };
        let others: Vec<(Peer, u32)> = snapshot
            .peers
            .iter()
            .filter(|sp| others.contains(&sp.tag.max(1)))
            .map(|sp| (sp.peer, sp.tag))
            .collect();
        if others.is_empty() {
            return Cow::Borrowed(set);
        }
        let mut all = set.to_vec();
        all.extend(others);
        canonicalize_by(&mut all, |(p, _)| p);
        Cow::Owned(all)
    }

    /// Makes `part` line `line`'s share of the upstream and writes the merged set.
    fn publish(&mut self, line: usize, part: Vec<Peer>) {
        let merged = self.merged(Some((line, &part)));
        let Some(generation) = self.write(&merged) else {
            return;
        };
        if !part.is_empty() {
            let all = if self.conf.lines.len() > 1 {
                format!(", {} in all", count(merged.len()))
            } else {
                String::new()
            };
            self.env.log(
                Level::Notice,
                format_args!(
                    "{}{} from {}{all} (generation {generation})",
                    self.prefix(),
                    count(part.len()),
                    self.conf.lines[line].settings.query
                ),
            );
        }
        self.parts[line].published = part;
    }

    /// Updates line `line`'s record in the zone: counters, streak, set kind, and
    /// the time of the last change (`changed`: the part was just rewritten).
    fn record(
        &self,
        line: usize,
        tracker: &Tracker,
        lookup: Option<Lookup>,
        reason: &str,
        changed: bool,
    ) {
        let part = &self.parts[line];
        let streak = tracker.streak();
        let now_ms = self.env.now_ms();
        let now_unix = self.env.now_unix();
        let since_unix = streak.since_ms.map_or(0, |since| {
            now_unix.saturating_sub(now_ms.saturating_sub(since) / 1000)
        });
        let (kind, confirmed, peers) = (part.kind, part.confirmed_unix, part.published.len());
        let index = part.index;
        let _lock = self.env.lock();
        // Records are the writer's: after a newer worker 0 took the zone over,
        // an answer this process was still waiting for would show its part
        // (or its drop) as the line's until the new one's next answer.
        if !self.master && self.zone.writer() != self.pid {
            return;
        }
        self.zone.update_line(self.conf.lines[line].tag, |rec| {
            if let Some(lookup) = lookup {
                rec.lookups[lookup as usize] += 1;
            }
            rec.index = index;
            if changed || rec.peers != peers as u32 || rec.kind != kind as u32 {
                rec.changed_unix = now_unix;
            }
            rec.kind = kind as u32;
            rec.confirmed_unix = confirmed;
            rec.peers = peers as u32;
            rec.streak_kind = streak.kind as u32;
            rec.streak_count = streak.count;
            rec.streak_since_unix = since_unix;
            if streak.kind == StreakKind::None {
                rec.reason.clear();
            } else if !reason.is_empty() {
                rec.reason = reason.to_string();
            }
        });
    }

    /// Writes the lines' last good parts to the state file when one changed, or
    /// when the confirmations it holds lag too far behind; only as the writer.
    fn save_state(&mut self) {
        let Some(path) = self.conf.state_path else {
            return;
        };
        if self.master || self.stopped || self.zone.writer() != self.pid {
            return;
        }
        let lagging = self.parts.iter().zip(&self.conf.lines).any(|(part, l)| {
            let lag = l.settings.max_stale_ms.map_or(state::CONFIRM_LAG_S, |ms| {
                (ms / 4000).clamp(1, state::CONFIRM_LAG_S)
            });
            !part.good.is_empty() && part.confirmed_unix >= part.saved_unix + lag
        });
        if !self.state_dirty && !lagging {
            return;
        }
        let sources = self
            .parts
            .iter()
            .zip(&self.conf.lines)
            .filter(|(part, _)| !part.good.is_empty())
            .map(|(part, l)| SavedSource {
                query: l.settings.query.clone(),
                confirmed_at: part.confirmed_unix,
                peers: part.good.clone(),
            })
            .collect();
        let now_unix = self.env.now_unix();
        let saved = Saved {
            upstream: self.conf.key.clone(),
            saved_at: now_unix,
            sources,
        };
        let result = self.env.save_state(path, &saved, self.pid, now_unix);
        let p = self.conf.key.log_prefix();
        match result {
            // Another process saves this moment, or another nginx instance
            // writes the file (a binary upgrade): the next answer tries again.
            Ok(Exclusive::Busy) => return,
            Ok(Exclusive::Deferred(writer)) => {
                if self.state_deferred != Some(writer.pid) {
                    self.state_deferred = Some(writer.pid);
                    self.env.log(Level::Notice, format_args!(
                        "{p}state file \"{path}\" is written by process {} of nginx master {}, not by this process meanwhile",
                        writer.pid,
                        writer.master
                    ));
                }
                return;
            }
            _ => {}
        }
        // Tried: the next change, or the next lag, tries again.
        self.state_dirty = false;
        self.state_held |= result.is_ok();
        for part in &mut self.parts {
            part.saved_unix = part.confirmed_unix;
        }
        match result {
            Ok(_) if self.state_deferred.is_some() => {
                self.state_failing = false;
                self.env.log(
                    Level::Notice,
                    format_args!(
                        "{p}state file \"{path}\" taken over from process {}",
                        self.state_deferred.take().unwrap_or_default()
                    ),
                );
            }
            Ok(_) if self.state_failing => {
                self.state_failing = false;
                self.env.log(
                    Level::Notice,
                    format_args!("{p}state file \"{path}\" written again"),
                );
            }
            Ok(_) => self.env.log(
                Level::Debug,
                format_args!("{p}state file \"{path}\" written"),
            ),
            Err(err) if !self.state_failing => {
                self.state_failing = true;
                self.env.log(
                    Level::Error,
                    format_args!("{p}cannot save state file \"{path}\": {err}"),
                );
            }
            Err(_) => {}
        }
    }

    /// Gives up this process's claim on the state file, if it has one.
    pub fn release_state(&mut self) {
        if let (true, Some(path)) = (self.state_held, self.conf.state_path) {
            self.state_held = false;
            self.env.release_state(path, self.pid);
        }
    }
}

impl<E: GroupEnv> Drop for Group<'_, E> {
    fn drop(&mut self) {
        self.release_state();
    }
}

/// Each line's part as the zone holds it (a reload or respawn keeps the set;
/// the master filled a fresh zone from the state file or its own lookup).
fn parts_of(conf: &GroupConf<'_>, z: &Zone<'_>, snapshot: &Snapshot, now_unix: u64) -> Vec<Part> {
    conf.lines
        .iter()
        .map(|l| {
            let peers: Vec<Peer> = snapshot
                .peers
                .iter()
                .filter(|sp| sp.tag == l.tag)
                .map(|sp| sp.peer)
                .collect();
            let rec = z.line(l.tag).unwrap_or_default();
            let kind = match SetKind::from_u32(rec.kind) {
                SetKind::None if !peers.is_empty() => SetKind::Live,
                kind => kind,
            };
            // A part without a recorded confirmation counts as confirmed now.
            let confirmed = if rec.confirmed_unix > 0 || peers.is_empty() {
                rec.confirmed_unix
            } else {
                now_unix
            };
            Part {
                good: peers.clone(),
                published: peers,
                confirmed_unix: confirmed,
                saved_unix: 0,
                kind,
                last_ignored: Ignored::default(),
                truncated: None,
                index: rec.index,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;
    use crate::peer::source_tag;
    use crate::state::Writer;
    use crate::zone::tests::Owned;

    /// What a save returns (an `io::Error` is not `Clone`).
    #[derive(Clone, Copy)]
    enum SaveWith {
        Written,
        Busy,
        Deferred(Writer),
        Fails,
    }

    /// A recording environment: a clock the test moves, the log lines, the
    /// state file's loads and saves; the zone's lock is never taken twice (it
    /// would deadlock nginx's mutex).
    struct Rec {
        pid: i64,
        unix: Cell<u64>,
        ms: Cell<u64>,
        logs: RefCell<Vec<(Level, String)>>,
        locked: Cell<bool>,
        file: RefCell<Option<Saved>>,
        loads: Cell<usize>,
        saves: RefCell<Vec<Saved>>,
        save_with: Cell<SaveWith>,
        released: Cell<usize>,
    }

    impl Rec {
        fn new(pid: i64) -> Rec {
            Rec {
                pid,
                unix: Cell::new(1_000_000),
                ms: Cell::new(50_000),
                logs: RefCell::default(),
                locked: Cell::new(false),
                file: RefCell::default(),
                loads: Cell::new(0),
                saves: RefCell::default(),
                save_with: Cell::new(SaveWith::Written),
                released: Cell::new(0),
            }
        }

        fn advance_s(&self, s: u64) {
            self.unix.set(self.unix.get() + s);
            self.ms.set(self.ms.get() + s * 1000);
        }

        /// The log lines so far, and forgets them.
        fn take_logs(&self) -> Vec<(Level, String)> {
            std::mem::take(&mut *self.logs.borrow_mut())
        }

        /// The lines at `level` or above (Debug and Info left out for Notice).
        fn said(&self, level: Level) -> Vec<String> {
            let rank = |l: Level| match l {
                Level::Error => 0,
                Level::Warn => 1,
                Level::Notice => 2,
                Level::Info => 3,
                Level::Debug => 4,
            };
            self.take_logs()
                .into_iter()
                .filter(|(l, _)| rank(*l) <= rank(level))
                .map(|(_, m)| m)
                .collect()
        }
    }

    struct Held<'r>(&'r Rec);

    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.locked.set(false);
        }
    }

    impl<'r> GroupEnv for &'r Rec {
        type Lock = Held<'r>;

        fn pid(&self) -> i64 {
            self.pid
        }

        fn now_unix(&self) -> u64 {
            self.unix.get()
        }

        fn now_ms(&self) -> u64 {
            self.ms.get()
        }

        fn random(&self) -> u64 {
            0
        }

        fn log(&self, level: Level, msg: std::fmt::Arguments<'_>) {
            self.logs.borrow_mut().push((level, msg.to_string()));
        }

        fn lock(&self) -> Held<'r> {
            assert!(!self.locked.replace(true), "the zone's lock taken twice");
            Held(self)
        }

        fn zone_size_for(&self, peers: usize) -> usize {
            peers * 1024
        }

        fn load_state(
            &self,
            _path: &str,
            upstream: &UpstreamKey,
            _max_peers: usize,
        ) -> Result<Option<Saved>, String> {
            assert_eq!(upstream, &UpstreamKey::stream("redis"));
            self.loads.set(self.loads.get() + 1);
            Ok(self.file.borrow().clone())
        }

        fn save_state(
            &self,
            _path: &str,
            saved: &Saved,
            pid: i64,
            now_unix: u64,
        ) -> std::io::Result<Exclusive> {
            assert!(
                !self.locked.get(),
                "the state file written under the zone's lock"
            );
            assert_eq!(
                (pid, now_unix, saved.saved_at),
                (self.pid, self.unix.get(), now_unix)
            );
            self.saves.borrow_mut().push(saved.clone());
            match self.save_with.get() {
                SaveWith::Written => Ok(Exclusive::Written),
                SaveWith::Busy => Ok(Exclusive::Busy),
                SaveWith::Deferred(w) => Ok(Exclusive::Deferred(w)),
                SaveWith::Fails => Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
            }
        }

        fn release_state(&self, _path: &str, pid: i64) {
            assert_eq!(pid, self.pid);
            self.released.set(self.released.get() + 1);
        }
    }

    fn settings(line: &str) -> Settings {
        let args: Vec<&str> = line.split_whitespace().collect();
        Settings::parse(&args).unwrap()
    }

    const A: &str = "a.service.consul";
    const B: &str = "b.service.consul";

    fn conf<'a>(lines: &'a [Settings], state_path: Option<&'a str>) -> GroupConf<'a> {
        GroupConf {
            key: UpstreamKey::stream("redis"),
            lines: lines
                .iter()
                .map(|s| LineConf {
                    tag: source_tag(&s.query),
                    settings: s,
                })
                .collect(),
            state_path,
        }
    }

    fn peer(port: u16) -> Peer {
        Peer::new(format!("127.0.0.1:{port}").parse().unwrap(), 1, 1)
    }

    fn peers(ports: &[u16]) -> Vec<Peer> {
        ports.iter().map(|&p| peer(p)).collect()
    }

    fn answer(ports: &[u16]) -> Resolved {
        Resolved::Peers {
            peers: peers(ports),
            ignored: Ignored::default(),
            truncated: None,
        }
    }

    /// The zone's set: (port, line's query).
    fn held(z: &Zone<'_>) -> Vec<(u16, &'static str)> {
        let name = |tag: u32| {
            [A, B]
                .into_iter()
                .find(|q| source_tag(q) == tag)
                .unwrap_or("?")
        };
        z.read()
            .unwrap()
            .peers
            .iter()
            .map(|sp| (sp.peer.addr.port(), name(sp.tag)))
            .collect()
    }

    fn record(z: &Zone<'_>, query: &str) -> LineStatus {
        z.line(source_tag(query)).unwrap()
    }

    /// Applies `result` to line `line` with the line's tracker from scratch.
    fn answer_line<E: GroupEnv>(g: &mut Group<'_, E>, line: usize, result: Resolved) -> u64 {
        let mut t = g.tracker(line);
        g.apply(line, &mut t, result)
    }

    #[test]
    fn a_reload_keeps_every_part_and_writes_nothing() {
        let lines = [settings(A), settings(&format!("{B} udp interval=5s"))];
        let o = Owned::new(16);
        let z = o.zone();
        let old = Rec::new(100);
        let mut g = Group::start(conf(&lines, None), z, &old);
        assert_eq!(
            old.said(Level::Info),
            [
                "consul upstream \"redis\": resolving a.service.consul every 1000ms via 127.0.0.1:8600 (tcp), zone=256k holds 16 peers",
                "consul upstream \"redis\": resolving b.service.consul every 5000ms via 127.0.0.1:8600 (udp), zone=256k holds 16 peers",
            ]
        );
        answer_line(&mut g, 0, answer(&[1, 2]));
        answer_line(&mut g, 1, answer(&[3]));
        assert_eq!(
            old.said(Level::Notice),
            [
                "consul upstream \"redis\": 2 peers from a.service.consul, 2 peers in all (generation 1)",
                "consul upstream \"redis\": 1 peer from b.service.consul, 3 peers in all (generation 2)",
            ]
        );
        let changed = record(&z, A).changed_unix;
        drop(g);

        // The new worker 0, a minute later: same lines, same zone.
        let new = Rec::new(200);
        new.unix.set(old.unix.get() + 60);
        let mut g = Group::start(conf(&lines, None), z, &new);
        assert_eq!(z.writer(), 200);
        assert_eq!(z.generation(), 2, "nothing written");
        assert_eq!(
            (g.published(0), g.published(1)),
            (&peers(&[1, 2])[..], &peers(&[3])[..])
        );
        assert_eq!(new.said(Level::Notice), Vec::<String>::new());
        for q in [A, B] {
            let r = record(&z, q);
            assert_eq!(SetKind::from_u32(r.kind), SetKind::Live);
            assert_eq!(
                r.confirmed_unix,
                old.unix.get(),
                "confirmed when the old one heard it"
            );
        }
        // The same answer again: no generation, no change recorded.
        answer_line(&mut g, 0, answer(&[1, 2]));
        assert_eq!(z.generation(), 2);
        assert_eq!(new.said(Level::Notice), Vec::<String>::new());
        let r = record(&z, A);
        assert_eq!(
            (r.changed_unix, r.confirmed_unix, r.lookups),
            (changed, new.unix.get(), [2, 0, 0, 0])
        );
    }

    #[test]
    fn a_line_a_reload_added_keeps_the_masters_fill_while_the_old_writer_goes_on() {
        let both = [settings(A), settings(B)];
        let o = Owned::new(16);
        let z = o.zone();
        let old = Rec::new(100);
        let mut g = Group::start(conf(&both[..1], None), z, &old);
        answer_line(&mut g, 0, answer(&[1]));
        // The reload: the master fills line B before it forks.
        let master = Rec::new(10);
        let (mut fill, empty) = Group::prefill(conf(&both, None), z, &master).unwrap();
        assert_eq!(empty, [1]);
        answer_line(&mut fill, 1, answer(&[2]));
        drop(fill);
        assert_eq!(held(&z), [(1, A), (2, B)]);
        // The old worker 0 still writes A's answers: B's part stays.
        answer_line(&mut g, 0, answer(&[1, 3]));
        assert_eq!(held(&z), [(1, A), (2, B), (3, A)]);
        // The new worker 0 goes on from both parts.
        let new = Rec::new(200);
        let g2 = Group::start(conf(&both, None), z, &new);
        assert_eq!(
            (g2.published(0), g2.published(1)),
            (&peers(&[1, 3])[..], &peers(&[2])[..])
        );
        assert_eq!(z.generation(), 3);
        assert!(!g.still_writer());
    }

    #[test]
    fn removed_lines_peers_leave_at_start() {
        let both = [settings(A), settings(B)];
        let o = Owned::new(16);
        let z = o.zone();
        let old = Rec::new(100);
        let mut g = Group::start(conf(&both, None), z, &old);
        answer_line(&mut g, 0, answer(&[1]));
        answer_line(&mut g, 1, answer(&[2, 3]));
        drop(g);
        assert_eq!(held(&z), [(1, A), (2, B), (3, B)]);

        let new = Rec::new(200);
        let _g = Group::start(conf(&both[..1], None), z, &new);
        assert_eq!(held(&z), [(1, A)]);
        assert_eq!(
            new.said(Level::Notice),
            ["consul upstream \"redis\": dropping 2 peers of removed \"consul_upstream\" lines, 1 peer in all (generation 3)"]
        );
        assert!(
            z.line(source_tag(B)).is_none(),
            "the removed line's record is freed"
        );
        assert_eq!(record(&z, A).peers, 1);
    }

    fn saved(sources: &[(&str, &[u16], u64)]) -> Saved {
        Saved {
            upstream: UpstreamKey::stream("redis"),
            saved_at: 999_000,
            sources: sources
                .iter()
                .map(|&(query, ports, at)| SavedSource {
                    query: query.into(),
                    confirmed_at: at,
                    peers: peers(ports),
                })
                .collect(),
        }
    }

    #[test]
    fn the_state_file_fills_only_a_fresh_zone() {
        let lines = [settings(A), settings(B)];
        let path = Some("/var/lib/nginx/redis.state");
        let master = Rec::new(10);
        *master.file.borrow_mut() = Some(saved(&[(A, &[1, 2], 998_000), (B, &[2, 3], 997_000)]));

        // A fresh zone (a start): both lines' parts come from the file, merged.
        let o = Owned::new(16);
        let z = o.zone();
        let (mut g, empty) = Group::prefill(conf(&lines, path), z, &master).unwrap();
        assert_eq!(empty, [0, 1]);
        assert_eq!(held(&z), [(1, A), (2, A), (3, B)]);
        assert_eq!(
            master.said(Level::Notice),
            ["consul upstream \"redis\": 3 peers from state file \"/var/lib/nginx/redis.state\" (generation 1)"]
        );
        let r = record(&z, B);
        assert_eq!(SetKind::from_u32(r.kind), SetKind::StateFile);
        assert_eq!(
            (r.confirmed_unix, r.changed_unix, r.peers),
            (997_000, master.unix.get(), 2)
        );
        // The master's own answer fails: the file's part stays what it is.
        answer_line(&mut g, 0, Resolved::Failed("timed out".into()));
        assert_eq!(SetKind::from_u32(record(&z, A).kind), SetKind::StateFile);
        master.take_logs();
        assert!(
            master.saves.borrow().is_empty(),
            "the master never writes the file"
        );
        drop(g);
        assert_eq!(master.released.get(), 0);

        // Every line has its part now: nothing to fill.
        assert!(Group::prefill(conf(&lines, path), z, &master).is_none());

        // A reused zone (a reload adding line B): the file is not read for it.
        let o = Owned::new(16);
        let z = o.zone();
        let w = Rec::new(100);
        let mut g = Group::start(conf(&lines[..1], None), z, &w);
        answer_line(&mut g, 0, answer(&[5]));
        drop(g);
        master.loads.set(0);
        let (g, empty) = Group::prefill(conf(&lines, path), z, &master).unwrap();
        assert_eq!(empty, [1]);
        assert_eq!(master.loads.get(), 0);
        assert_eq!(held(&z), [(5, A)]);
        assert!(g.published(1).is_empty());
        drop(g);
        // Under `master_process off` the one process fills the zone it writes:
        // the fill still writes no state file.
        let single = Rec::new(100);
        let (mut g, _) = Group::prefill(conf(&lines, path), z, &single).unwrap();
        answer_line(&mut g, 1, answer(&[6]));
        assert_eq!(held(&z), [(5, A), (6, B)]);
        assert!(single.saves.borrow().is_empty());

        // A file written for other queries is ignored, and said.
        let o = Owned::new(16);
        *master.file.borrow_mut() = Some(saved(&[("c.service.consul", &[9], 1)]));
        assert!(Group::prefill(conf(&lines, path), o.zone(), &master).is_some());
        assert_eq!(o.zone().generation(), 0);
        assert_eq!(
            master.said(Level::Notice),
            ["consul upstream \"redis\": state file \"/var/lib/nginx/redis.state\" ignored: written for c.service.consul"]
        );
    }

    #[test]
    fn lines_merge_into_one_set_without_duplicates() {
        let lines = [settings(A), settings(B)];
        let o = Owned::new(16);
        let z = o.zone();
        let env = Rec::new(100);
        let mut g = Group::start(conf(&lines, None), z, &env);
        answer_line(&mut g, 0, answer(&[1, 2]));
        // Peer 2 in both lines' answers, with another weight in B's.
        let mut b = peers(&[2, 3]);
        b[0].weight = 5;
        let result = Resolved::Peers {
            peers: b,
            ignored: Ignored::default(),
            truncated: None,
        };
        answer_line(&mut g, 1, result);
        let snap = z.read().unwrap();
        let ports: Vec<(u16, u16)> = snap
            .peers
            .iter()
            .map(|sp| (sp.peer.addr.port(), sp.peer.weight))
            .collect();
        assert_eq!(
            ports,
            [(1, 1), (2, 5), (3, 1)],
            "one peer per address, the higher weight"
        );
        assert_eq!(
            env.said(Level::Notice)[1],
            "consul upstream \"redis\": 2 peers from b.service.consul, 3 peers in all (generation 2)"
        );
        // Each line keeps its own part: B's answer without peer 2 leaves A's.
        answer_line(&mut g, 1, answer(&[3]));
        assert_eq!(held(&z).iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn an_answer_too_large_beside_the_other_parts_is_refused() {
        let lines = [settings(A), settings(B)];
        let o = Owned::new(4);
        let z = o.zone();
        let env = Rec::new(100);
        let mut g = Group::start(conf(&lines, None), z, &env);
        answer_line(&mut g, 0, answer(&[1, 2, 3]));
        env.take_logs();
        // Two more beside A's three: five for four places.
        answer_line(&mut g, 1, answer(&[4, 5]));
        assert_eq!(held(&z).len(), 3);
        assert_eq!(
            env.said(Level::Notice),
            ["consul upstream \"redis\": 5 peers do not fit in zone=256k (max 4 peers), zone=5k needed, no peers to keep"]
        );
        let r = record(&z, B);
        assert_eq!(
            (r.lookups, r.streak_kind),
            ([0, 0, 0, 1], StreakKind::Oversize as u32)
        );
        assert_eq!(r.reason, "5 peers do not fit in the zone (max 4)");
        // Side by side five, merged four (peer 3 in both): it fits.
        answer_line(&mut g, 1, answer(&[3, 4]));
        assert_eq!(
            held(&z).iter().map(|p| p.0).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        let r = record(&z, B);
        assert_eq!(
            (r.lookups, r.streak_kind, r.reason.as_str()),
            ([1, 0, 0, 1], 0, "")
        );
    }

    #[test]
    fn failures_keep_or_drop_a_part_as_the_line_says() {
        let lines = [
            settings(&format!("{A} on_error=keep")),
            settings(&format!("{B} on_empty=fail")),
        ];
        let o = Owned::new(16);
        let z = o.zone();
        let env = Rec::new(100);
        let mut g = Group::start(conf(&lines, None), z, &env);
        let mut ta = g.tracker(0);
        let mut tb = g.tracker(1);
        g.apply(0, &mut ta, answer(&[1]));
        g.apply(1, &mut tb, answer(&[2]));
        env.take_logs();
        env.advance_s(10);

        g.apply(0, &mut ta, Resolved::Failed("timed out".into()));
        let r = record(&z, A);
        assert_eq!(SetKind::from_u32(r.kind), SetKind::Kept);
        assert_eq!(r.changed_unix, env.unix.get(), "the kind changed");
        assert_eq!(r.reason, "timed out");

        g.apply(1, &mut tb, Resolved::Empty { nxdomain: true });
        let r = record(&z, B);
        assert_eq!((SetKind::from_u32(r.kind), r.peers), (SetKind::Dropped, 0));
        assert_eq!(r.changed_unix, env.unix.get());
        assert_eq!(held(&z), [(1, A)]);
        assert_eq!(
            env.said(Level::Notice),
            [
                "consul upstream \"redis\": resolving a.service.consul failed: timed out, keeping 1 peer",
                "consul upstream \"redis\": b.service.consul has no healthy instances (NXDOMAIN), dropping 1 peer",
            ]
        );
        // Back: live again, and said.
        g.apply(1, &mut tb, answer(&[2]));
        assert_eq!(SetKind::from_u32(record(&z, B).kind), SetKind::Live);
        assert_eq!(
            env.said(Level::Notice),
            ["consul upstream \"redis\": 1 peer from b.service.consul, 2 peers in all (generation 4)"]
        );
    }

    #[test]
    fn the_state_file_is_written_on_change_and_on_lag_only() {
        let lines = [settings(A), settings(&format!("{B} max_stale=8s"))];
        let o = Owned::new(16);
        let z = o.zone();
        let env = Rec::new(100);
        let path = Some("/s.state");
        let mut g = Group::start(conf(&lines, path), z, &env);
        // At start: the zone's set (nothing yet).
        assert_eq!(env.saves.borrow().len(), 1);
        let mut ta = g.tracker(0);
        g.apply(0, &mut ta, answer(&[1]));
        assert_eq!(env.saves.borrow().len(), 2, "a change");
        env.advance_s(1);
        g.apply(0, &mut ta, answer(&[1]));
        assert_eq!(env.saves.borrow().len(), 2, "the same answer soon after");
        env.advance_s(state::CONFIRM_LAG_S - 1);
        g.apply(0, &mut ta, answer(&[1]));
        assert_eq!(env.saves.borrow().len(), 3, "the confirmation lags");
        let last = env.saves.borrow()[2].clone();
        assert_eq!(last.sources.len(), 1);
        assert_eq!(
            (last.sources[0].confirmed_at, last.sources[0].peers.clone()),
            (env.unix.get(), peers(&[1]))
        );

        // max_stale=8s: a quarter of it is lag enough for B.
        let mut tb = g.tracker(1);
        g.apply(1, &mut tb, answer(&[2]));
        assert_eq!(env.saves.borrow().len(), 4);
        env.advance_s(1);
        g.apply(1, &mut tb, answer(&[2]));
        assert_eq!(env.saves.borrow().len(), 4);
        env.advance_s(1);
        g.apply(1, &mut tb, answer(&[2]));
        assert_eq!(env.saves.borrow().len(), 5);
        // A failure: no good part changed, nothing written.
        g.apply(1, &mut tb, Resolved::Failed("refused".into()));
        assert_eq!(env.saves.borrow().len(), 5);
        env.take_logs();

        // Failing saves are said once, and their end.
        env.save_with.set(SaveWith::Fails);
        g.apply(0, &mut ta, answer(&[1, 3]));
        g.apply(0, &mut ta, answer(&[3]));
        env.save_with.set(SaveWith::Written);
        g.apply(0, &mut ta, answer(&[4]));
        let said: Vec<String> = env
            .said(Level::Notice)
            .into_iter()
            .filter(|m| m.contains("state file"))
            .collect();
        assert_eq!(
            said,
            [
                "consul upstream \"redis\": cannot save state file \"/s.state\": permission denied",
                "consul upstream \"redis\": state file \"/s.state\" written again",
            ]
        );
        // Busy: tried again with the next answer even without a change.
        env.save_with.set(SaveWith::Busy);
        let n = env.saves.borrow().len();
        g.apply(0, &mut ta, answer(&[5]));
        env.save_with.set(SaveWith::Written);
        g.apply(0, &mut ta, answer(&[5]));
        assert_eq!(env.saves.borrow().len(), n + 2);
        // Another instance writes the file: said once; taken over later.
        let other = Writer {
            master: 7,
            pid: 8,
            at: 0,
        };
        env.save_with.set(SaveWith::Deferred(other));
        g.apply(0, &mut ta, answer(&[6]));
        g.apply(0, &mut ta, answer(&[7]));
        env.save_with.set(SaveWith::Written);
        g.apply(0, &mut ta, answer(&[8]));
        let said: Vec<String> = env
            .said(Level::Notice)
            .into_iter()
            .filter(|m| m.contains("state file"))
            .collect();
        assert_eq!(
            said,
            [
                "consul upstream \"redis\": state file \"/s.state\" is written by process 8 of nginx master 7, not by this process meanwhile",
                "consul upstream \"redis\": state file \"/s.state\" taken over from process 8",
            ]
        );
        drop(g);
        assert_eq!(env.released.get(), 1, "the claim is given up");
    }

    #[test]
    fn a_new_writer_stops_this_ones_writes() {
        let lines = [settings(A)];
        let o = Owned::new(16);
        let z = o.zone();
        let env = Rec::new(100);
        let mut g = Group::start(conf(&lines, Some("/s.state")), z, &env);
        answer_line(&mut g, 0, answer(&[1]));
        let saves = env.saves.borrow().len();
        assert!(g.still_writer());
        env.take_logs();

        // A newer worker 0 claims the zone.
        z.claim(200);
        answer_line(&mut g, 0, answer(&[1, 2]));
        answer_line(&mut g, 0, answer(&[1, 2, 3]));
        assert_eq!(z.generation(), 1);
        assert_eq!(held(&z), [(1, A)]);
        assert_eq!(env.saves.borrow().len(), saves);
        assert!(!g.still_writer());
        assert_eq!(
            env.said(Level::Notice),
            ["consul upstream \"redis\": process 200 resolves from now on"]
        );
        g.release_state();
        assert_eq!(env.released.get(), 1);
        drop(g);
        assert_eq!(env.released.get(), 1, "given up once");
    }

    #[test]
    fn a_stopped_writer_leaves_the_line_records_to_the_new_one() {
        let lines = [settings(&format!("{A} on_empty=fail"))];
        let o = Owned::new(16);
        let z = o.zone();
        let old = Rec::new(100);
        let mut g = Group::start(conf(&lines, None), z, &old);
        answer_line(&mut g, 0, answer(&[1]));
        // A reload: the new worker 0 takes over and hears of a second peer
        // while the old one's lookups are still under way.
        let new = Rec::new(200);
        new.advance_s(5);
        let mut g2 = Group::start(conf(&lines, None), z, &new);
        answer_line(&mut g2, 0, answer(&[1, 2]));
        let theirs = record(&z, A);
        assert_eq!(
            (SetKind::from_u32(theirs.kind), theirs.peers),
            (SetKind::Live, 2)
        );
        // The old one's answers change neither the set nor the record.
        old.advance_s(10);
        answer_line(&mut g, 0, answer(&[1]));
        answer_line(&mut g, 0, Resolved::Empty { nxdomain: true });
        assert_eq!(held(&z), [(1, A), (2, A)]);
        assert_eq!(record(&z, A), theirs);
        assert!(!g.still_writer());
    }
}
