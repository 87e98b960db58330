//! Discovery in the one process that resolves (worker 0, or the single process):
//! a timer per upstream sends a job to the resolver thread; results come back
//! through an eventfd on the event loop, which applies the policy and writes the
//! zone. Other workers only read the zone.

use std::cell::RefCell;
use std::ffi::c_void;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::ptr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ngx::ffi::{
    ngx_add_timer, ngx_close_connection, ngx_connection_t, ngx_cycle_t, ngx_del_timer, ngx_event_t,
    ngx_get_connection, ngx_handle_read_event, ngx_int_t, ngx_msec_t, ngx_random, NGX_OK,
};

use consul_core::answer::Ignored;
use consul_core::policy::{peers as count, tail, Action, Outcome, Tracker};
use consul_core::settings::Transport;
use consul_core::state::{self, Saved};
use consul_core::Peer;

use crate::conf::{MainConf, Upstream};
use crate::ngx_stream_consul_upstream_module;
use crate::resolve::{Done, Job, Query, Resolved, Thread};
use crate::zone::{WriteError, Zone, RECORD_SIZE};
use crate::{ffi, log};

struct Entry {
    up: *const Upstream,
    zone: Zone,
    tracker: Tracker,
    /// Boxed: nginx's timer tree keeps its address.
    timer: Box<ngx_event_t>,
    published: Vec<Peer>,
    /// Another process took over writing (a newer worker 0).
    stopped: bool,
    last_ignored: Ignored,
    oversize_logged: usize,
    /// The state file holds `published` (saved by this process, or loaded from it).
    state_current: bool,
}

struct Discovery {
    cycle: *const ngx_cycle_t,
    thread: Option<Thread>,
    conn: *mut ngx_connection_t,
    entries: Vec<Entry>,
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
    format!("consul upstream \"{}\": ", up.name)
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

/// `exit_process`: stops the timers and the thread, closes the eventfd.
pub unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    if let Some(d) = DISCOVERY.with(|cell| cell.borrow_mut().take()) {
        end(d);
    }
}

unsafe fn begin(cycle: &ngx_cycle_t) {
    let main = ffi::cycle_main_conf(cycle, &*ptr::addr_of!(ngx_stream_consul_upstream_module))
        as *const MainConf;
    if main.is_null() || (*main).upstreams.is_empty() {
        return;
    }
    match start(cycle, &*main) {
        Ok(d) => DISCOVERY.with(|cell| *cell.borrow_mut() = Some(d)),
        Err(msg) => log::alert(&format!("consul upstream: discovery not started: {msg}")),
    }
}

unsafe fn end(mut d: Discovery) {
    for e in &mut d.entries {
        // SAFETY: the timer is ours; ngx_del_timer checks nothing, so test timer_set.
        if e.timer.timer_set() != 0 {
            ngx_del_timer(&mut *e.timer);
        }
    }
    if let Some(t) = d.thread.take() {
        t.stop();
    }
    // SAFETY: the connection wraps our eventfd; the thread that wrote it is gone.
    ngx_close_connection(d.conn);
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

unsafe fn start(cycle: &ngx_cycle_t, main: &MainConf) -> Result<Discovery, String> {
    let efd: RawFd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
    if efd < 0 {
        return Err(format!(
            "eventfd() failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let conn = ngx_get_connection(efd, cycle.log);
    if conn.is_null() {
        libc::close(efd);
        return Err("no free connection for the resolver's eventfd".into());
    }
    (*conn).log = cycle.log;
    (*(*conn).read).log = cycle.log;
    (*(*conn).write).log = cycle.log;
    (*(*conn).read).handler = Some(on_wakeup);
    if ngx_handle_read_event((*conn).read, 0) != NGX_OK as ngx_int_t {
        ngx_close_connection(conn);
        return Err("cannot watch the resolver's eventfd".into());
    }
    let thread = match Thread::start(efd) {
        Ok(t) => t,
        Err(e) => {
            ngx_close_connection(conn);
            return Err(e);
        }
    };
    let pid = ffi::pid();
    let now = ffi::current_msec();
    let mut entries = Vec::new();
    for &up in &main.upstreams {
        let up_ref = &*up;
        let Some(zone) = Zone::from_shm_zone(up_ref.shm_zone) else {
            log::alert(&format!("{}shared zone missing", prefix(up_ref)));
            continue;
        };
        zone.claim(pid);
        let s = &up_ref.settings;
        let resolvers: Vec<String> = s.resolvers.iter().map(|r| r.to_string()).collect();
        log::info(&format!(
            "{}resolving {} every {}ms via {} ({}), zone={}k holds {} peers",
            prefix(up_ref),
            s.query,
            s.interval_ms,
            resolvers.join(", "),
            if s.transport == Transport::Tcp {
                "tcp"
            } else {
                "udp"
            },
            s.zone_size / 1024,
            zone.capacity()
        ));
        let mut tracker = Tracker::new(&up_ref.name, &up_ref.settings);
        let mut published = zone.read().map(|(_, p)| p).unwrap_or_default();
        let mut state_current = false;
        if zone.generation() == 0 {
            if let Some(path) = &up_ref.settings.state_path {
                if let Some(peers) = load_state(up_ref, zone, pid, path) {
                    published = peers;
                    state_current = true;
                }
            }
        }
        if !published.is_empty() {
            // A set kept across reload or restart is as old as its last confirmation.
            let age_ms = unix_now()
                .saturating_sub(zone.confirmed_at())
                .saturating_mul(1000);
            tracker.loaded(now.saturating_sub(age_ms));
        }
        let id = entries.len();
        let mut timer: Box<ngx_event_t> = Box::new(std::mem::zeroed());
        timer.handler = Some(on_timer);
        timer.data = id as *mut c_void;
        timer.log = cycle.log;
        timer.set_cancelable(1);
        entries.push(Entry {
            up,
            zone,
            tracker,
            timer,
            published,
            stopped: false,
            last_ignored: Ignored::default(),
            oversize_logged: 0,
            state_current,
        });
    }
    for e in &mut entries {
        ngx_add_timer(&mut *e.timer, 1);
    }
    Ok(Discovery {
        cycle,
        thread: Some(thread),
        conn,
        entries,
        pid,
    })
}

/// Publishes the state file's set into an empty zone (a start, not a reload).
fn load_state(up: &Upstream, zone: Zone, pid: i64, path: &str) -> Option<Vec<Peer>> {
    let p = prefix(up);
    let saved = match state::load(std::path::Path::new(path), &up.name) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(reason) => {
            log::error(&format!("{p}state file \"{path}\" ignored: {reason}"));
            return None;
        }
    };
    if saved.query != up.settings.query {
        log::error(&format!(
            "{p}state file \"{path}\" ignored: written for {}",
            saved.query
        ));
        return None;
    }
    if saved.peers.is_empty() {
        return None;
    }
    match zone.write(pid, &saved.peers) {
        Ok(generation) => {
            zone.set_confirmed_at(saved.saved_at);
            log::notice(&format!(
                "{p}{} from state file \"{path}\" (generation {generation})",
                count(saved.peers.len())
            ));
            Some(saved.peers)
        }
        Err(e) => {
            log::error(&format!("{p}state file \"{path}\" ignored: {e:?}"));
            None
        }
    }
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

unsafe extern "C" fn on_wakeup(ev: *mut ngx_event_t) {
    // SAFETY: the read event of our eventfd connection.
    let conn = (*ev).data as *mut ngx_connection_t;
    let mut counter = 0u64;
    while libc::read((*conn).fd, &mut counter as *mut u64 as *mut c_void, 8) == 8 {}
    DISCOVERY.with(|cell| {
        if let Ok(mut d) = cell.try_borrow_mut() {
            if let Some(d) = d.as_mut() {
                d.drain();
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
        if e.zone.writer() != self.pid {
            e.stopped = true;
            log::notice(&format!(
                "{}process {} resolves from now on",
                prefix(up),
                e.zone.writer()
            ));
            return;
        }
        let s = &up.settings;
        let job = Job::Resolve(Query {
            id,
            name: s.query.clone(),
            resolvers: s.resolvers.clone(),
            timeout: Duration::from_millis(s.timeout_ms),
            transport: s.transport,
        });
        let sent = self
            .thread
            .as_ref()
            .is_some_and(|t| t.jobs.send(job).is_ok());
        if !sent {
            self.apply(id, Resolved::Failed("the resolver thread is gone".into()));
        }
    }

    fn drain(&mut self) {
        let mut done: Vec<Done> = Vec::new();
        if let Some(t) = &self.thread {
            while let Ok(d) = t.results.try_recv() {
                done.push(d);
            }
        }
        if ffi::exiting() {
            return;
        }
        for d in done {
            self.apply(d.id, d.result);
        }
    }

    fn apply(&mut self, id: usize, result: Resolved) {
        let pid = self.pid;
        let thread = self.thread.as_ref();
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        // SAFETY: upstream confs live as long as the cycle this process runs.
        let up = unsafe { &*e.up };
        let p = prefix(up);
        let now = ffi::current_msec();
        let outcome = match result {
            Resolved::Saved(Ok(())) => return,
            Resolved::Saved(Err(err)) => {
                let path = up.settings.state_path.as_deref().unwrap_or("");
                log::error(&format!("{p}cannot save state file \"{path}\": {err}"));
                return;
            }
            Resolved::Empty { nxdomain } => Outcome::Empty { nxdomain },
            Resolved::Failed(reason) => Outcome::Failed(reason),
            Resolved::Peers { peers, ignored } => {
                if !ignored.is_empty() && ignored != e.last_ignored {
                    log::info(&format!(
                        "{p}ignored records of the answer: {}",
                        ignored.describe()
                    ));
                }
                e.last_ignored = ignored;
                if peers.len() > e.zone.capacity() {
                    if e.oversize_logged != peers.len() {
                        e.oversize_logged = peers.len();
                        log::error(&format!(
                            "{p}{} do not fit in zone={}k (max {}), zone={}k needed{}",
                            count(peers.len()),
                            up.settings.zone_size / 1024,
                            count(e.zone.capacity()),
                            zone_size_for(peers.len()) / 1024,
                            tail("keeping", e.published.len())
                        ));
                    }
                    arm(e, up.settings.interval_ms);
                    return;
                }
                e.oversize_logged = 0;
                Outcome::Peers(peers)
            }
        };
        let tenth = up.settings.interval_ms / 10;
        let jitter = if tenth == 0 {
            0
        } else {
            ngx_random() as u64 % (tenth + 1)
        };
        let decision = e
            .tracker
            .on_outcome(outcome, e.published.len(), now, jitter);
        if let Some((level, msg)) = &decision.log {
            log::log(log::level_of(*level), msg);
        }
        match decision.action {
            Action::Publish(peers) => {
                e.zone.set_confirmed_at(unix_now());
                if peers != e.published {
                    publish(e, up, pid, peers);
                }
                if !e.state_current {
                    save_state(e, up, thread, id);
                }
            }
            Action::Drop => publish(e, up, pid, Vec::new()),
            Action::Keep => {}
        }
        if !e.stopped {
            arm(e, decision.next_ms);
        }
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

/// Hands the published set to the resolver thread, which writes the state file.
fn save_state(e: &mut Entry, up: &Upstream, thread: Option<&Thread>, id: usize) {
    let (Some(t), Some(path)) = (thread, &up.settings.state_path) else {
        return;
    };
    let saved = Saved {
        upstream: up.name.clone(),
        query: up.settings.query.clone(),
        saved_at: unix_now(),
        peers: e.published.clone(),
    };
    let job = Job::Save {
        id,
        path: PathBuf::from(path),
        saved,
    };
    e.state_current = t.jobs.send(job).is_ok();
}

/// Writes `peers` into the zone as a new generation. A dropped (empty) set is not
/// saved: the state file keeps the last good one.
fn publish(e: &mut Entry, up: &Upstream, pid: i64, peers: Vec<Peer>) {
    let p = prefix(up);
    match e.zone.write(pid, &peers) {
        Ok(generation) => {
            if !peers.is_empty() {
                log::notice(&format!(
                    "{p}{} from {} (generation {generation})",
                    count(peers.len()),
                    up.settings.query
                ));
                e.state_current = false;
            }
            e.published = peers;
        }
        Err(WriteError::NotWriter) => {
            e.stopped = true;
            log::notice(&format!(
                "{p}process {} resolves from now on",
                e.zone.writer()
            ));
        }
        Err(WriteError::TooLarge { capacity }) => {
            log::error(&format!(
                "{p}{} peers do not fit in the zone (max {capacity})",
                peers.len()
            ));
        }
    }
}
