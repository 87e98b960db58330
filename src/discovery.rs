//! Discovery in the one process that resolves (worker 0, or the single process):
//! a timer per `consul_upstream` line starts a lookup on the event loop; its
//! result applies the line's policy and writes the upstream's zone. Other workers
//! only read the zone.

use std::cell::RefCell;
use std::ffi::c_void;
use std::path::Path;
use std::ptr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ngx::ffi::{
    ngx_add_timer, ngx_cycle_t, ngx_del_timer, ngx_event_t, ngx_int_t, ngx_msec_t, ngx_random,
    NGX_OK,
};

use consul_core::answer::Ignored;
use consul_core::peer::{canonicalize_by, source_tag};
use consul_core::policy::{log_prefix, peers as count, tail, Action, Outcome, Tracker};
use consul_core::settings::Transport;
use consul_core::state::{self, Saved, SavedSource};
use consul_core::Peer;

use crate::conf::{MainConf, Upstream};
use crate::ngx_stream_consul_upstream_module;
use crate::resolve::{Done, Lookups, Query, Resolved};
use crate::zone::{WriteError, Zone, RECORD_SIZE};
use crate::{ffi, log};

/// One `consul_upstream` line being resolved.
struct Entry {
    up: *const Upstream,
    source: usize,
    /// `source_tag` of the query, stored with its peers in the zone.
    tag: u32,
    group: usize,
    tracker: Tracker,
    /// Boxed: nginx's timer tree keeps its address.
    timer: Box<ngx_event_t>,
    /// This query's part of the upstream's set.
    published: Vec<Peer>,
    /// Another process took over writing (a newer worker 0).
    stopped: bool,
    last_ignored: Ignored,
}

/// One upstream: its zone, written with the merged parts of its entries.
struct Group {
    up: *const Upstream,
    zone: Zone,
    /// The state file holds the published parts (saved by this process, or loaded).
    state_current: bool,
    oversize_logged: usize,
}

struct Discovery {
    cycle: *const ngx_cycle_t,
    lookups: Lookups,
    entries: Vec<Entry>,
    groups: Vec<Group>,
    pid: i64,
}

thread_local! {
    static DISCOVERY: RefCell<Option<Discovery>> = const { RefCell::new(None) };
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn prefix(up: &Upstream) -> String {
    log_prefix(&up.name)
}

/// `init_process`: starts discovery in the one process that resolves. A failure
/// here is logged and leaves the worker serving whatever the zones hold.
pub unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    if ffi::is_discovery_process() {
        // SAFETY: nginx passes its initialized cycle.
        begin(&*cycle);
    }
    NGX_OK as ngx_int_t
}

/// `exit_process`: stops the timers and cancels the lookups in flight.
pub unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    if let Some(d) = DISCOVERY.with(|cell| cell.borrow_mut().take()) {
        end(d);
    }
    crate::runtime::stop_tasks();
}

unsafe fn begin(cycle: &ngx_cycle_t) {
    let main = ffi::cycle_main_conf(cycle, &*ptr::addr_of!(ngx_stream_consul_upstream_module))
        as *const MainConf;
    if main.is_null() || (*main).upstreams.is_empty() {
        return;
    }
    let d = start(cycle, &*main);
    DISCOVERY.with(|cell| *cell.borrow_mut() = Some(d));
}

unsafe fn end(mut d: Discovery) {
    for e in &mut d.entries {
        // SAFETY: the timer is ours; ngx_del_timer checks nothing, so test timer_set.
        if e.timer.timer_set() != 0 {
            ngx_del_timer(&mut *e.timer);
        }
    }
    drop(d);
}

/// With `master_process off`, a reload (HUP) builds a new cycle in the same
/// process without calling init_process again: discovery follows the new cycle's
/// upstreams from the next timer on, and lets the old cycle go.
unsafe fn follow_reload() -> bool {
    let current = ngx::ffi::ngx_cycle as *const ngx_cycle_t;
    let old = DISCOVERY.with(|cell| {
        let mut d = cell.borrow_mut();
        if d.as_ref().is_some_and(|d| d.cycle != current) {
            d.take()
        } else {
            None
        }
    });
    let Some(old) = old else { return false };
    end(old);
    begin(&*current);
    true
}

unsafe fn start(cycle: &ngx_cycle_t, main: &MainConf) -> Discovery {
    let pid = ffi::pid();
    let mut d = Discovery {
        cycle,
        lookups: Lookups::new(on_done),
        entries: Vec::new(),
        groups: Vec::new(),
        pid,
    };
    for &up in &main.upstreams {
        d.add_group(&*up, cycle);
    }
    for e in &mut d.entries {
        ngx_add_timer(&mut *e.timer, 1);
    }
    d
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

impl Discovery {
    /// Claims the upstream's zone and sets up one entry per `consul_upstream` line.
    /// Each entry starts from its part of the zone (a reload or respawn keeps the
    /// set) or, in a fresh zone, of the state file.
    unsafe fn add_group(&mut self, up_ref: &Upstream, cycle: &ngx_cycle_t) {
        let Some(zone) = Zone::from_shm_zone(up_ref.shm_zone) else {
            log::alert(&format!("{}shared zone missing", prefix(up_ref)));
            return;
        };
        zone.claim(self.pid);
        let now = ffi::current_msec();
        let fresh = zone.generation() == 0;
        let tagged = zone.read_tagged().map(|(_, t)| t).unwrap_or_default();
        let path = up_ref.first().settings.state_path.as_deref();
        let saved = match (fresh, path) {
            (true, Some(path)) => load_state(up_ref, path),
            _ => None,
        };
        let group = self.groups.len();
        for (source, src) in up_ref.sources.iter().enumerate() {
            let s = &src.settings;
            let resolvers: Vec<String> = s.resolvers.iter().map(|r| r.to_string()).collect();
            log::info(&format!(
                "{}resolving {} every {}ms via {} ({}), zone={}k holds {} peers",
                prefix(up_ref),
                s.query,
                s.interval_ms,
                resolvers.join(", "),
                transport_name(s.transport),
                up_ref.first().settings.zone_size / 1024,
                zone.capacity()
            ));
            let tag = source_tag(&s.query);
            let published: Vec<Peer> = match &saved {
                Some(saved) => saved.peers_of(&s.query).unwrap_or_default().to_vec(),
                None => tagged
                    .iter()
                    .filter(|(_, t)| *t == tag)
                    .map(|(p, _)| *p)
                    .collect(),
            };
            let mut tracker = Tracker::new(&up_ref.name, s);
            if !published.is_empty() {
                // A set kept across reload or restart is as old as its last confirmation.
                let confirmed = saved.as_ref().map_or(zone.confirmed_at(), |s| s.saved_at);
                let age_ms = unix_now().saturating_sub(confirmed).saturating_mul(1000);
                tracker.loaded(now.saturating_sub(age_ms));
            }
            let id = self.entries.len();
            let mut timer: Box<ngx_event_t> = Box::new(std::mem::zeroed());
            timer.handler = Some(on_timer);
            timer.data = id as *mut c_void;
            timer.log = cycle.log;
            timer.set_cancelable(1);
            self.entries.push(Entry {
                up: up_ref,
                source,
                tag,
                group,
                tracker,
                timer,
                published,
                stopped: false,
                last_ignored: Ignored::default(),
            });
        }
        self.groups.push(Group {
            up: up_ref,
            zone,
            state_current: saved.is_some(),
            oversize_logged: 0,
        });
        if let (Some(saved), Some(path)) = (saved, path) {
            let merged = self.merged(group, None);
            if merged.is_empty() {
                return;
            }
            match zone.write(self.pid, &merged) {
                Ok(generation) => {
                    zone.set_confirmed_at(saved.saved_at);
                    log::notice(&format!(
                        "{}{} from state file \"{path}\" (generation {generation})",
                        prefix(up_ref),
                        count(merged.len())
                    ));
                }
                Err(e) => log::error(&format!(
                    "{}state file \"{path}\" ignored: {e:?}",
                    prefix(up_ref)
                )),
            }
        }
    }

    /// The upstream's set: every entry's part, canonical, each peer with its tag.
    /// `replace` substitutes one entry's part (to test a candidate before taking it).
    fn merged(&self, group: usize, replace: Option<(usize, &[Peer])>) -> Vec<(Peer, u32)> {
        let mut all: Vec<(Peer, u32)> = Vec::new();
        for (id, e) in self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.group == group)
        {
            let part = match replace {
                Some((rid, peers)) if rid == id => peers,
                _ => &e.published,
            };
            all.extend(part.iter().map(|p| (*p, e.tag)));
        }
        canonicalize_by(&mut all, |(p, _)| p);
        all
    }
}

/// The state file's sets for a fresh zone (a start, not a reload), if usable.
fn load_state(up: &Upstream, path: &str) -> Option<Saved> {
    let p = prefix(up);
    let saved = match state::load(std::path::Path::new(path), &up.name) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(reason) => {
            log::error(&format!("{p}state file \"{path}\" ignored: {reason}"));
            return None;
        }
    };
    let known = up
        .sources
        .iter()
        .any(|s| saved.peers_of(&s.settings.query).is_some());
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

unsafe extern "C" fn on_timer(ev: *mut ngx_event_t) {
    // SAFETY: nginx passes the timer event we armed; data is the entry's index.
    let id = (*ev).data as usize;
    if ffi::exiting() || follow_reload() {
        return;
    }
    DISCOVERY.with(|cell| {
        if let Ok(mut d) = cell.try_borrow_mut() {
            if let Some(d) = d.as_mut() {
                d.query(id);
            }
        }
    });
}

/// A lookup finished. Lookups run from nginx's posted events (see
/// [`crate::runtime::spawn`]), never inside discovery's own calls.
fn on_done(done: Done) {
    if ffi::exiting() {
        return;
    }
    DISCOVERY.with(|cell| {
        if let Ok(mut d) = cell.try_borrow_mut() {
            if let Some(d) = d.as_mut() {
                d.apply(done.id, done.result);
            }
        }
    });
}

impl Discovery {
    fn query(&mut self, id: usize) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        // SAFETY: upstream confs live as long as the cycle this process runs.
        let up = unsafe { &*e.up };
        if self.groups[e.group].zone.writer() != self.pid {
            self.hand_over(id);
            return;
        }
        let s = &up.sources[e.source].settings;
        self.lookups.resolve(Query {
            id,
            name: s.query.clone(),
            resolvers: s.resolvers.clone(),
            timeout: Duration::from_millis(s.timeout_ms),
            transport: s.transport,
        });
    }

    fn apply(&mut self, id: usize, result: Resolved) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        // SAFETY: upstream confs live as long as the cycle this process runs.
        let up = unsafe { &*e.up };
        let (g, interval_ms) = (e.group, up.sources[e.source].settings.interval_ms);
        let p = prefix(up);
        let outcome = match result {
            Resolved::Empty { nxdomain } => Outcome::Empty { nxdomain },
            Resolved::Failed(reason) => Outcome::Failed(reason),
            Resolved::Peers { peers, ignored } => {
                if !ignored.is_empty() && ignored != e.last_ignored {
                    log::info(&format!(
                        "{p}ignored records of the answer: {}",
                        ignored.describe()
                    ));
                }
                self.entries[id].last_ignored = ignored;
                let capacity = self.groups[g].zone.capacity();
                // Merging only removes duplicates: when the parts fit side by side
                // (the usual case), the merged set fits too and need not be built here.
                let bound: usize = self
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(i, e)| e.group == g && *i != id)
                    .map(|(_, e)| e.published.len())
                    .sum::<usize>()
                    + peers.len();
                let total = if bound > capacity {
                    self.merged(g, Some((id, &peers))).len()
                } else {
                    bound
                };
                if total > capacity {
                    if self.groups[g].oversize_logged != total {
                        self.groups[g].oversize_logged = total;
                        let kept = self.merged(g, None).len();
                        log::error(&format!(
                            "{p}{} do not fit in zone={}k (max {}), zone={}k needed{}",
                            count(total),
                            up.first().settings.zone_size / 1024,
                            count(capacity),
                            zone_size_for(total) / 1024,
                            tail("keeping", kept)
                        ));
                    }
                    arm(&mut self.entries[id], interval_ms);
                    return;
                }
                self.groups[g].oversize_logged = 0;
                Outcome::Peers(peers)
            }
        };
        let tenth = interval_ms / 10;
        let jitter = if tenth == 0 {
            0
        } else {
            ngx_random() as u64 % (tenth + 1)
        };
        let e = &mut self.entries[id];
        let decision =
            e.tracker
                .on_outcome(outcome, e.published.len(), ffi::current_msec(), jitter);
        if let Some((level, msg)) = &decision.log {
            log::log(log::level_of(*level), msg);
        }
        match decision.action {
            Action::Publish(peers) => {
                self.groups[g].zone.set_confirmed_at(unix_now());
                if peers != self.entries[id].published {
                    self.publish(id, peers);
                }
                if !self.groups[g].state_current {
                    self.save_state(g);
                }
            }
            Action::Drop => self.publish(id, Vec::new()),
            Action::Keep => {}
        }
        let e = &mut self.entries[id];
        if !e.stopped {
            arm(e, decision.next_ms);
        }
    }

    /// Makes `part` this entry's share of the upstream and writes the merged set
    /// as a new generation. A dropped (empty) part is not saved: the state file
    /// keeps the last good one.
    fn publish(&mut self, id: usize, part: Vec<Peer>) {
        let (g, source) = (self.entries[id].group, self.entries[id].source);
        // SAFETY: upstream confs live as long as the cycle this process runs.
        let up = unsafe { &*self.entries[id].up };
        let p = prefix(up);
        let merged = self.merged(g, Some((id, &part)));
        let zone = self.groups[g].zone;
        match zone.write(self.pid, &merged) {
            Ok(generation) => {
                if !part.is_empty() {
                    let query = &up.sources[source].settings.query;
                    let all = if up.sources.len() > 1 {
                        format!(", {} in all", count(merged.len()))
                    } else {
                        String::new()
                    };
                    log::notice(&format!(
                        "{p}{} from {query}{all} (generation {generation})",
                        count(part.len())
                    ));
                    self.groups[g].state_current = false;
                }
                self.entries[id].published = part;
            }
            Err(WriteError::NotWriter) => self.hand_over(id),
            Err(WriteError::TooLarge { capacity }) => {
                log::error(&format!(
                    "{p}{} do not fit in the zone (max {capacity})",
                    count(merged.len())
                ));
            }
        }
    }

    /// A newer discovery process (worker 0 after a reload or respawn) writes the
    /// zone now: this entry stops, and says so once.
    fn hand_over(&mut self, id: usize) {
        let e = &mut self.entries[id];
        e.stopped = true;
        // SAFETY: upstream confs live as long as the cycle this process runs.
        let up = unsafe { &*e.up };
        log::notice(&format!(
            "{}process {} resolves from now on",
            prefix(up),
            self.groups[e.group].zone.writer()
        ));
    }

    /// Writes every part of the upstream to the state file (small, and only when
    /// a set changed: on the event loop).
    fn save_state(&mut self, g: usize) {
        // SAFETY: upstream confs live as long as the cycle this process runs.
        let up = unsafe { &*self.groups[g].up };
        let Some(path) = &up.first().settings.state_path else {
            return;
        };
        let sources = self
            .entries
            .iter()
            .filter(|e| e.group == g)
            .map(|e| SavedSource {
                query: up.sources[e.source].settings.query.clone(),
                peers: e.published.clone(),
            })
            .collect();
        let saved = Saved {
            upstream: up.name.clone(),
            saved_at: unix_now(),
            sources,
        };
        if let Err(err) = state::save(Path::new(path), &saved) {
            log::error(&format!(
                "{}cannot save state file \"{path}\": {err}",
                prefix(up)
            ));
        }
        self.groups[g].state_current = true;
    }
}

fn arm(e: &mut Entry, ms: u64) {
    // SAFETY: the boxed timer event lives as long as the entry.
    unsafe { ngx_add_timer(&mut *e.timer, ms as ngx_msec_t) };
}

/// Zone size that holds `peers` records, with room for the slab allocator's pages.
fn zone_size_for(peers: usize) -> usize {
    let bytes = peers * RECORD_SIZE * 102 / 100 + 16 * 1024;
    bytes.div_ceil(4096) * 4096
}
