//! Discovery in the one process that resolves (worker 0, or the single process
//! under `master_process off`): one async loop per `consul_upstream` line —
//! look up, decide (core's policy, for every outcome), publish, sleep — on
//! ngx-rust's executor (see [`crate::runtime`]). The lines of one upstream share
//! a [`Group`]: the zone and each line's part of the merged set. The loops belong
//! to the cycle: they stop, and their DNS sockets close, at `exit_process` or
//! when the cycle's pool goes.

use std::borrow::Cow;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use futures_util::FutureExt;
use ngx::async_::Task;
use ngx::core::Pool;
use ngx::ffi::{ngx_cycle_t, ngx_int_t, ngx_random, NGX_OK};

use consul_core::answer::{Ignored, OwnAddresses};
use consul_core::peer::canonicalize_by;
use consul_core::policy::{peers as count, Action, Decision, Outcome, Tracker};
use consul_core::settings::Transport;
use consul_core::state::{self, Exclusive, Saved, SavedSource};
use consul_core::zone::{Lookup, SetKind, Snapshot, StreakKind, Zone};
use consul_core::Peer;

use crate::api::Watch;
use crate::dns_client::DnsClient;
use crate::resolve::{LineResolver, Resolved, Truncation};
use crate::upstream::{MainConf, Upstream};
use crate::zone::{self, SharedZone};
use crate::{fault, ffi, listening, log, runtime};

/// What a user can do about an answer that cannot carry every instance.
const SEE_EVERY_INSTANCE: &str =
    "to see every instance, use an api= line or several consul_upstream lines (by tag)";

/// Discovery of one cycle in this process.
struct Running {
    cycle: *const ngx_cycle_t,
    /// One loop per line; dropping a task stops its loop.
    loops: Vec<Task<()>>,
    /// The lines' DNS connections, one per resolver.
    dns: Rc<DnsClient>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.loops.clear();
        self.dns.close();
        runtime::shutdown();
    }
}

thread_local! {
    static RUNNING: RefCell<Option<Running>> = const { RefCell::new(None) };
}

/// Dropped with the cycle's pool: stops that cycle's discovery if it still runs.
struct CycleGuard {
    cycle: *const ngx_cycle_t,
}

impl Drop for CycleGuard {
    fn drop(&mut self) {
        let running = RUNNING.with(|r| {
            let mut r = r.borrow_mut();
            if r.as_ref().is_some_and(|run| run.cycle == self.cycle) {
                r.take()
            } else {
                None
            }
        });
        drop(running);
    }
}

/// `init_process`: starts discovery in the one process that resolves.
pub unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    if ffi::is_discovery_process() {
        // SAFETY: nginx passes its initialized cycle.
        let cycle = unsafe { &*cycle };
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| start(cycle)));
        if started.is_err() {
            log::alert("consul upstream: discovery failed to start (panic)");
        }
    }
    NGX_OK as ngx_int_t
}

/// `exit_process`: stops the loops and closes their sockets.
pub unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    let running = RUNNING.with(|r| r.borrow_mut().take());
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| drop(running)));
}

fn start(cycle: &ngx_cycle_t) {
    // A previous cycle's discovery (a reload under master_process off) stops first:
    // its sockets close before the new loops open theirs.
    let previous = RUNNING.with(|r| r.borrow_mut().take());
    drop(previous);
    // SAFETY: a fully initialized cycle.
    let main = unsafe { ffi::cycle_main_conf(cycle, ffi::module()) } as *const MainConf;
    // SAFETY: null, or this module's main conf, which lives as long as the cycle.
    let Some(main) = (unsafe { main.as_ref() }) else {
        return;
    };
    if main.upstreams.is_empty() {
        return;
    }
    let own = Rc::new(listening::own_addresses(cycle));
    let dns = Rc::new(DnsClient::default());
    let mut loops = Vec::new();
    for &up in &main.upstreams {
        // SAFETY: upstream confs live as long as the cycle that runs discovery.
        let up: &'static Upstream = unsafe { &*up };
        let Some(group) = Group::start(up) else {
            continue;
        };
        let group = Rc::new(RefCell::new(group));
        for line in 0..up.lines.len() {
            let task = if up.lines[line].api.is_some() {
                runtime::spawn(api_loop(
                    group.clone(),
                    line,
                    own.clone(),
                    dns.clone(),
                    cycle,
                ))
            } else {
                runtime::spawn(line_loop(
                    group.clone(),
                    line,
                    own.clone(),
                    dns.clone(),
                    cycle,
                ))
            };
            loops.push(task);
        }
    }
    // SAFETY: the cycle's pool lives as long as the cycle.
    let pool = unsafe { Pool::from_ngx_pool(cycle.pool) };
    if pool.allocate(CycleGuard { cycle }).is_null() {
        log::alert("consul upstream: no memory to tie discovery to its cycle");
    }
    RUNNING.with(|r| *r.borrow_mut() = Some(Running { cycle, loops, dns }));
}

/// Under `master_process off`, a reload (HUP) builds a new cycle in the same
/// process without calling init_process: the first loop that notices moves
/// discovery to the new cycle's upstreams.
fn follow_reload() {
    // SAFETY: plain read of nginx's current cycle.
    let current = unsafe { ngx::ffi::ngx_cycle } as *const ngx_cycle_t;
    let moved = RUNNING.with(|r| r.borrow().as_ref().is_some_and(|run| run.cycle != current));
    if moved {
        // SAFETY: ngx_cycle is the fully initialized running cycle.
        start(unsafe { &*current });
    }
}

fn current_cycle() -> *const ngx_cycle_t {
    // SAFETY: plain read of nginx's current cycle.
    unsafe { ngx::ffi::ngx_cycle as *const ngx_cycle_t }
}

/// One line: look up, decide, publish, sleep; until the process exits, another
/// process takes over writing, or the cycle is replaced.
async fn line_loop(
    group: Rc<RefCell<Group>>,
    line: usize,
    own: Rc<OwnAddresses>,
    dns: Rc<DnsClient>,
    cycle: *const ngx_cycle_t,
) {
    let (up, mut tracker) = {
        let g = group.borrow();
        (g.up, g.tracker(line))
    };
    let settings = &up.lines[line].settings;
    let mut resolver = LineResolver::new(settings, own.clone(), &dns);
    // At once, unless the master has just asked (see crate::prefill).
    let mut delay_ms = crate::prefill::first_query_in_ms(up, up.lines[line].tag);
    loop {
        if delay_ms > 0 {
            ngx::async_::sleep(Duration::from_millis(delay_ms)).await;
        }
        if stops(&group, cycle) {
            return;
        }
        log::debug(&format!("{}resolving {}", up.prefix(), settings.query));
        let result = AssertUnwindSafe(resolver.lookup())
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                // hickory's state may be broken after a panic: start afresh.
                resolver = LineResolver::new(settings, own.clone(), &dns);
                Resolved::Failed("internal error in the DNS client (panic)".into())
            });
        let applied = std::panic::catch_unwind(AssertUnwindSafe(|| {
            fault::inject("apply");
            group.borrow_mut().apply(line, &mut tracker, result)
        }));
        delay_ms = applied.unwrap_or_else(|_| {
            log::alert(&format!(
                "{}applying the answer for {} failed (panic); next query in {}ms",
                up.prefix(),
                settings.query,
                settings.interval_ms
            ));
            settings.interval_ms
        });
        log::debug(&format!(
            "{}next query for {} in {delay_ms}ms",
            up.prefix(),
            settings.query
        ));
    }
}

/// Whether a line's loop ends here: the process exits, the cycle was replaced
/// (discovery moves to the new one), or another process writes the zone now.
fn stops(group: &Rc<RefCell<Group>>, cycle: *const ngx_cycle_t) -> bool {
    if ffi::exiting() {
        // nginx quits (gracefully: the process may live on for its
        // connections): another instance may write the state file now.
        group.borrow_mut().release_state();
        return true;
    }
    if current_cycle() != cycle {
        follow_reload();
        return true;
    }
    !group.borrow_mut().still_writer()
}

/// How often a blocked API line checks that its loop should go on.
const API_CHECK_MS: u64 = 1000;

/// One `api=` line: a blocking query, its answer applied with the DNS lines'
/// policies, the next query at the pace of answers (or the backoff of
/// failures); until the loop stops as a DNS line's does. While a query waits,
/// `max_stale` still drops the line's part on time, and the loop still notices
/// every second that it should stop.
async fn api_loop(
    group: Rc<RefCell<Group>>,
    line: usize,
    own: Rc<OwnAddresses>,
    dns: Rc<DnsClient>,
    cycle: *const ngx_cycle_t,
) {
    let (up, mut tracker) = {
        let g = group.borrow();
        (g.up, g.tracker(line))
    };
    let l = &up.lines[line];
    let settings = &l.settings;
    let capacity = group.borrow().zone.zone().capacity();
    let Some(mut watch) = l.api.as_ref().and_then(|conf| {
        Watch::new(
            up.prefix(),
            settings,
            conf,
            own,
            &dns,
            capacity,
            ffi::current_msec(),
        )
    }) else {
        return;
    };
    // Go on from the master's answer (see crate::prefill): block on its index.
    let lookups = group.borrow().lookups(line);
    if let Some(noted) = crate::prefill::said(up, l.tag, lookups).and_then(|said| said.api) {
        watch.resume(noted, ffi::current_msec());
    }
    let mut delay_ms = crate::prefill::first_query_in_ms(up, l.tag);
    loop {
        if delay_ms > 0 {
            ngx::async_::sleep(Duration::from_millis(delay_ms)).await;
        }
        if stops(&group, cycle) {
            return;
        }
        let fetched = {
            let mut fetch =
                std::pin::pin!(AssertUnwindSafe(watch.fetch(ngx_random() as u64)).catch_unwind());
            loop {
                let current = group.borrow().parts[line].published.len();
                let now = ffi::current_msec();
                let due = tracker.stale_due_ms(current).map_or(API_CHECK_MS, |due| {
                    due.saturating_sub(now).clamp(1, API_CHECK_MS)
                });
                if let Some(done) = crate::api::http::within(due, fetch.as_mut()).await {
                    break done;
                }
                if stops(&group, cycle) {
                    return;
                }
                if let Some(decision) = tracker.expire(current, ffi::current_msec()) {
                    group.borrow_mut().act(line, &tracker, decision, None, "");
                }
            }
        };
        let fetched = fetched.unwrap_or_else(|_| {
            watch.abandon();
            crate::api::Fetched {
                result: Resolved::Failed("internal error in the HTTP client (panic)".into()),
                answered: false,
            }
        });
        let answered = fetched.answered;
        let index = watch.index();
        let applied = std::panic::catch_unwind(AssertUnwindSafe(|| {
            fault::inject("apply");
            let mut g = group.borrow_mut();
            g.parts[line].index = index;
            g.apply(line, &mut tracker, fetched.result)
        }));
        let failed_ms = applied.unwrap_or_else(|_| {
            log::alert(&format!(
                "{}applying the answer for {} failed (panic); next query in {}ms",
                up.prefix(),
                settings.query,
                settings.interval_ms
            ));
            settings.interval_ms
        });
        delay_ms = watch.pause_ms(answered, failed_ms, ffi::current_msec());
        log::debug(&format!(
            "{}next query for {} in {delay_ms}ms",
            up.prefix(),
            settings.query
        ));
    }
}

/// What discovery said about a line's answer, once per change: the master
/// hands it to worker 0 (see `crate::prefill::Handover`), which does not say
/// it again.
#[derive(Clone, Default)]
pub(crate) struct Said {
    pub ignored: Ignored,
    pub truncated: Option<Truncation>,
    /// An API line's index and what its reader said.
    pub api: Option<crate::api::Noted>,
}

/// The lookups a line's record counts, of every kind.
fn lookups_of(rec: &consul_core::zone::LineStatus) -> u64 {
    rec.lookups.iter().sum()
}

/// One line's part of the upstream's set.
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

/// One upstream in the discovery process (or in the master, filling the zone
/// before it forks workers: see [`crate::prefill`]): its zone and its lines' parts.
pub(crate) struct Group {
    up: &'static Upstream,
    zone: SharedZone,
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

impl Group {
    /// Takes over the upstream's zone. Each line starts from its part of the zone:
    /// a reload or respawn keeps the set, and at start (or for a line a reload
    /// added) the master filled it before it forked the workers ([`Group::prefill`]).
    /// Peers of lines that are no longer configured leave the zone now, whatever
    /// DNS does.
    fn start(up: &'static Upstream) -> Option<Group> {
        let p = up.prefix();
        let Some(zone) = up.zone() else {
            log::alert(&format!("{p}shared zone missing"));
            return None;
        };
        let pid = ffi::pid();
        zone.lock().zone().claim(pid);
        let z = zone.zone();
        let snapshot = z.read().unwrap_or_default();
        let mut parts = parts_of(up, z, &snapshot);
        for (l, part) in up.lines.iter().zip(&mut parts) {
            let lookups = lookups_of(&z.line(l.tag).unwrap_or_default());
            if let Some(said) = crate::prefill::said(up, l.tag, lookups) {
                part.last_ignored = said.ignored;
                part.truncated = said.truncated;
            }
        }
        let mut g = Group {
            up,
            zone,
            pid,
            master: false,
            parts,
            stopped: false,
            state_dirty: true,
            state_failing: false,
            state_deferred: None,
            state_held: false,
        };
        let tags: Vec<u32> = up.lines.iter().map(|l| l.tag).collect();
        let guard = zone.lock();
        z.retain_lines(&tags);
        // The previous configuration may have balanced otherwise (least_conn's
        // tree is kept up to date only under least_conn).
        z.tree().rebuild();
        for (l, part) in up.lines.iter().zip(&g.parts) {
            let s = &l.settings;
            let resolvers: Vec<String> = s.resolvers.iter().map(|r| r.to_string()).collect();
            let zone_text = format!(
                "zone={}k holds {}",
                up.first().settings.zone_size / 1024,
                count(z.capacity())
            );
            match &s.api {
                Some(api) => log::info(&format!(
                    "{p}watching {} (blocking queries, wait={}ms), {zone_text}",
                    s.query, api.wait_ms
                )),
                None => log::info(&format!(
                    "{p}resolving {} every {}ms via {} ({}), {zone_text}",
                    s.query,
                    s.interval_ms,
                    resolvers.join(", "),
                    transport_name(s.transport),
                )),
            }
            let (kind, confirmed, peers) = (part.kind, part.confirmed_unix, part.published.len());
            z.update_line(l.tag, |rec| {
                rec.kind = kind as u32;
                rec.confirmed_unix = confirmed;
                rec.peers = peers as u32;
            });
        }
        drop(guard);

        // The zone must hold exactly the configured lines' parts.
        let merged = g.merged(None);
        let current: Vec<(Peer, u32)> = snapshot.peers.iter().map(|sp| (sp.peer, sp.tag)).collect();
        if merged != current {
            let removed = current.iter().filter(|(_, t)| !tags.contains(t)).count();
            if let Some(generation) = g.write(&merged) {
                if removed > 0 {
                    log::notice(&format!(
                        "{p}dropping {} of removed \"consul_upstream\" lines, {} in all (generation {generation})",
                        count(removed),
                        count(merged.len())
                    ));
                }
            }
        }
        // The state file follows the zone from now on: the master's set goes
        // in at once (an API line's next answer may be minutes away).
        g.save_state();
        Some(g)
    }

    /// In the master, before it forks workers: the upstream's lines the zone
    /// holds nothing for (a start, a new upstream or line, a zone of another
    /// size with a new line), with the state file's parts for them already in
    /// the zone when the zone is fresh. `None` when every line has its part.
    pub(crate) fn prefill(up: &'static Upstream) -> Option<(Group, Vec<usize>)> {
        let zone = up.zone()?;
        let z = zone.zone();
        let snapshot = z.read().unwrap_or_default();
        let empty: Vec<usize> = (0..up.lines.len())
            .filter(|&i| {
                let tag = up.lines[i].tag;
                !snapshot.peers.iter().any(|sp| sp.tag == tag)
                    && z.line(tag)
                        .is_none_or(|rec| SetKind::from_u32(rec.kind) == SetKind::None)
            })
            .collect();
        if empty.is_empty() {
            return None;
        }
        let mut g = Group {
            up,
            zone,
            pid: ffi::pid(),
            master: true,
            parts: parts_of(up, z, &snapshot),
            stopped: false,
            state_dirty: false,
            state_failing: false,
            state_deferred: None,
            state_held: false,
        };
        if let (Some(path), 0) = (&up.state_path, snapshot.generation) {
            g.load_state_file(path, &empty);
        }
        Some((g, empty))
    }

    /// The state file's parts for `lines`, written to the zone (master only).
    fn load_state_file(&mut self, path: &str, lines: &[usize]) {
        let up = self.up;
        let Some(saved) = load_state(up, path, self.zone.zone().capacity()) else {
            return;
        };
        let mut filled = Vec::new();
        for &i in lines {
            let query = &up.lines[i].settings.query;
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
        log::notice(&format!(
            "{}{} from state file \"{path}\" (generation {generation})",
            up.prefix(),
            count(merged.len())
        ));
        let now_unix = ffi::unix_now();
        let _guard = self.zone.lock();
        for i in filled {
            let part = &self.parts[i];
            let (kind, confirmed, peers) = (part.kind, part.confirmed_unix, part.published.len());
            self.zone.zone().update_line(up.lines[i].tag, |rec| {
                rec.kind = kind as u32;
                rec.confirmed_unix = confirmed;
                rec.peers = peers as u32;
                rec.changed_unix = now_unix;
            });
        }
    }

    /// The master's lookup for line `line` (see [`Group::prefill`]), decided and
    /// logged as worker 0 decides an answer, and recorded in the zone, where
    /// worker 0 goes on from.
    /// Returns when worker 0 should ask next (ms), as for any answer.
    pub(crate) fn prefill_apply(&mut self, line: usize, result: Resolved) -> u64 {
        let mut tracker = self.tracker(line);
        self.apply(line, &mut tracker, result)
    }

    pub(crate) fn upstream(&self) -> &'static Upstream {
        self.up
    }

    /// What was said about line `line`'s last answer (see [`Said`]).
    pub(crate) fn said(&self, line: usize) -> Said {
        let part = &self.parts[line];
        Said {
            ignored: part.last_ignored.clone(),
            truncated: part.truncated,
            api: None,
        }
    }

    /// Records an API line's index before its answer is applied.
    pub(crate) fn set_index(&mut self, line: usize, index: u64) {
        self.parts[line].index = index;
    }

    /// Peers the upstream's zone holds.
    pub(crate) fn capacity(&self) -> usize {
        self.zone.zone().capacity()
    }

    /// The lookups line `line`'s record counts.
    pub(crate) fn lookups(&self, line: usize) -> u64 {
        lookups_of(
            &self
                .zone
                .zone()
                .line(self.up.lines[line].tag)
                .unwrap_or_default(),
        )
    }

    pub(crate) fn line_settings(&self, line: usize) -> &'static consul_core::settings::Settings {
        &self.up.lines[line].settings
    }

    /// A line's policy tracker, aware of how old its carried-over part is, and
    /// of the streak its record holds (the master, or the previous worker 0,
    /// logged its first line).
    fn tracker(&self, line: usize) -> Tracker {
        let l = &self.up.lines[line];
        let mut t = Tracker::new(&self.up.name, &l.settings);
        let part = &self.parts[line];
        let (now_ms, now_unix) = (ffi::current_msec(), ffi::unix_now());
        if !part.published.is_empty() {
            let age_ms = now_unix
                .saturating_sub(part.confirmed_unix)
                .saturating_mul(1000);
            t.loaded(now_ms.saturating_sub(age_ms));
        }
        if let Some(rec) = self.zone.zone().line(l.tag) {
            t.resume(&rec, now_ms, now_unix);
        }
        t
    }

    /// Whether this process still writes the zone; says once when it stopped.
    fn still_writer(&mut self) -> bool {
        if !self.stopped && self.zone.zone().writer() != self.pid {
            self.hand_over();
        }
        !self.stopped
    }

    /// A newer discovery process (worker 0 after a reload or respawn) writes the
    /// zone now: this process stops, and says so once.
    fn hand_over(&mut self) {
        if !self.stopped {
            self.stopped = true;
            log::notice(&format!(
                "{}process {} resolves from now on",
                self.up.prefix(),
                self.zone.zone().writer()
            ));
        }
    }

    /// The upstream's set: every line's part (line `replace` given as `part`),
    /// canonical, each peer with its line's tag.
    fn merged(&self, replace: Option<(usize, &[Peer])>) -> Vec<(Peer, u32)> {
        let mut all: Vec<(Peer, u32)> = Vec::new();
        for (i, (part, line)) in self.parts.iter().zip(&self.up.lines).enumerate() {
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
            let guard = self.zone.lock();
            let z = guard.zone();
            if !self.master && z.writer() != self.pid {
                None
            } else {
                let set = self.with_others(z, set);
                Some(z.publish(&set, ffi::unix_now(), ffi::current_msec()))
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
                log::error(&format!(
                    "{}{} do not fit in the zone (max {})",
                    self.up.prefix(),
                    count(set.len()),
                    e.capacity
                ));
                None
            }
        }
    }

    /// Applies one lookup's result to line `line`; returns when to ask next (ms).
    fn apply(&mut self, line: usize, tracker: &mut Tracker, result: Resolved) -> u64 {
        let up = self.up;
        let settings = &up.lines[line].settings;
        let p = up.prefix();
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
                    match truncated {
                        Some(Truncation::Tc) => log::warn(&format!(
                            "{p}Consul truncated the answer for {query} (TC set): {} came, \
                             others are left out; {SEE_EVERY_INSTANCE}",
                            count(peers.len())
                        )),
                        Some(Truncation::Full) => log::warn(&format!(
                            "{p}the answer for {query} is as large as Consul sends ({} came): \
                             it may leave instances out without saying so (TC is set only \
                             with enable_truncate); {SEE_EVERY_INSTANCE}",
                            count(peers.len())
                        )),
                        None => log::notice(&format!(
                            "{p}the answer for {query} carries every instance again"
                        )),
                    }
                    part.truncated = truncated;
                }
                if !ignored.is_empty() && ignored != part.last_ignored {
                    let msg = format!("{p}ignored records of the answer: {}", ignored.describe());
                    if ignored.needs_attention() {
                        log::warn(&msg);
                    } else {
                        log::info(&msg);
                    }
                }
                part.last_ignored = ignored;
                self.sized(line, peers)
            }
        };
        let tenth = settings.interval_ms / 10;
        let jitter = if tenth == 0 {
            0
        } else {
            ngx_random() as u64 % (tenth + 1)
        };
        let now_ms = ffi::current_msec();
        let current = self.parts[line].published.len();
        let decision: Decision = tracker.on_outcome(outcome, current, now_ms, jitter);
        self.act(line, tracker, decision, Some(lookup), &reason)
    }

    /// Carries a decision out for line `line` (`lookup`: the outcome it
    /// counts; `None` for a `max_stale` drop without an answer); returns when
    /// to ask next (ms).
    fn act(
        &mut self,
        line: usize,
        tracker: &Tracker,
        decision: Decision,
        lookup: Option<Lookup>,
        reason: &str,
    ) -> u64 {
        if let Some((level, msg)) = &decision.log {
            log::log(log::level_of(*level), msg);
        }
        let now_unix = ffi::unix_now();
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
        let capacity = self.zone.zone().capacity();
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
            zone_size: self.up.first().settings.zone_size,
            needed_size: zone::size_for(total),
        };
        let reason = format!("{} do not fit in the zone (max {capacity})", count(total));
        (outcome, Lookup::Oversize, reason)
    }

    /// `set` with the zone's peers of lines this process does not follow but the
    /// zone keeps a record for: lines a reload added, which the master filled
    /// while the previous worker 0 still writes (the next worker 0 takes them
    /// over; it dropped the records of removed lines before it writes).
    fn with_others<'s>(&self, z: &Zone<'_>, set: &'s [(Peer, u32)]) -> Cow<'s, [(Peer, u32)]> {
        // Records name tag 0 as 1 (0 marks a free record).
        let ours = |tag: u32| self.up.lines.iter().any(|l| l.tag.max(1) == tag);
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
        let up = self.up;
        if !part.is_empty() {
            let all = if up.lines.len() > 1 {
                format!(", {} in all", count(merged.len()))
            } else {
                String::new()
            };
            log::notice(&format!(
                "{}{} from {}{all} (generation {generation})",
                up.prefix(),
                count(part.len()),
                up.lines[line].settings.query
            ));
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
        let now_ms = ffi::current_msec();
        let now_unix = ffi::unix_now();
        let since_unix = streak.since_ms.map_or(0, |since| {
            now_unix.saturating_sub(now_ms.saturating_sub(since) / 1000)
        });
        let (kind, confirmed, peers) = (part.kind, part.confirmed_unix, part.published.len());
        let index = part.index;
        let _guard = self.zone.lock();
        self.zone
            .zone()
            .update_line(self.up.lines[line].tag, |rec| {
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
        let up = self.up;
        let Some(path) = &up.state_path else { return };
        if self.master || self.stopped || self.zone.zone().writer() != self.pid {
            return;
        }
        let lagging = self.parts.iter().zip(&up.lines).any(|(part, l)| {
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
            .zip(&up.lines)
            .filter(|(part, _)| !part.good.is_empty())
            .map(|(part, l)| SavedSource {
                query: l.settings.query.clone(),
                confirmed_at: part.confirmed_unix,
                peers: part.good.clone(),
            })
            .collect();
        let saved = Saved {
            upstream: up.name.clone(),
            saved_at: ffi::unix_now(),
            sources,
        };
        let me = (instance(), self.pid);
        let result = state::save_exclusive(
            Path::new(path),
            &saved,
            me,
            ffi::unix_now(),
            state::process_exists,
        );
        match result {
            // Another process saves this moment, or another nginx instance
            // writes the file (a binary upgrade): the next answer tries again.
            Ok(Exclusive::Busy) => return,
            Ok(Exclusive::Deferred(writer)) => {
                if self.state_deferred != Some(writer.pid) {
                    self.state_deferred = Some(writer.pid);
                    log::notice(&format!(
                        "{}state file \"{path}\" is written by process {} of nginx master {}, not by this process meanwhile",
                        up.prefix(),
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
                log::notice(&format!(
                    "{}state file \"{path}\" taken over from process {}",
                    up.prefix(),
                    self.state_deferred.take().unwrap_or_default()
                ));
            }
            Ok(_) if self.state_failing => {
                self.state_failing = false;
                log::notice(&format!(
                    "{}state file \"{path}\" written again",
                    up.prefix()
                ));
            }
            Ok(_) => log::debug(&format!("{}state file \"{path}\" written", up.prefix())),
            Err(err) if !self.state_failing => {
                self.state_failing = true;
                log::error(&format!(
                    "{}cannot save state file \"{path}\": {err}",
                    up.prefix()
                ));
            }
            Err(_) => {}
        }
    }

    /// Gives up this process's claim on the state file, if it has one.
    fn release_state(&mut self) {
        if let (true, Some(path)) = (self.state_held, &self.up.state_path) {
            self.state_held = false;
            let _ = state::release(Path::new(path), self.pid);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.release_state();
    }
}

/// The nginx instance this process belongs to, which names a state file's
/// writer across instances (see `consul_core::state::save_exclusive`): the
/// master's pid, or the single process's under `master_process off`.
fn instance() -> i64 {
    // SAFETY: plain read of a process global.
    if unsafe { ngx::ffi::ngx_process } == ngx::ffi::NGX_PROCESS_WORKER as usize {
        // SAFETY: getppid cannot fail.
        i64::from(unsafe { libc::getppid() })
    } else {
        ffi::pid()
    }
}

/// Each line's part as the zone holds it (a reload or respawn keeps the set;
/// the master filled a fresh zone from the state file or its own lookup).
fn parts_of(up: &Upstream, z: &Zone<'_>, snapshot: &Snapshot) -> Vec<Part> {
    let now_unix = ffi::unix_now();
    up.lines
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

/// The state file's parts for a fresh zone (a start, not a reload), if usable.
fn load_state(up: &Upstream, path: &str, capacity: usize) -> Option<Saved> {
    let p = up.prefix();
    let saved = match state::load(Path::new(path), &up.name, capacity) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(reason) => {
            log::error(&format!("{p}state file \"{path}\" ignored: {reason}"));
            return None;
        }
    };
    let known = up
        .lines
        .iter()
        .any(|l| saved.sources.iter().any(|s| s.query == l.settings.query));
    if !known {
        let queries: Vec<&str> = saved.sources.iter().map(|s| s.query.as_str()).collect();
        log::error(&format!(
            "{p}state file \"{path}\" ignored: written for {}",
            queries.join(", ")
        ));
        return None;
    }
    Some(saved)
}
