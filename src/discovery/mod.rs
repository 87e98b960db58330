//! Discovery in the one process that resolves (worker 0, or the single process
//! under `master_process off`): one async loop per `consul_upstream` line —
//! look up, decide (core's policy, for every outcome), publish, sleep — on
//! ngx-rust's executor (see [`crate::runtime`]). The lines of one upstream share
//! a [`Group`]: the zone and each line's part of the merged set (the
//! bookkeeping is `consul_core::group`'s). The loops belong
//! to the cycle: they stop, and their DNS sockets close, at `exit_process` or
//! when the cycle's pool goes.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::Duration;

use futures_util::FutureExt;
use ngx::async_::Task;
use ngx::core::Pool;
use ngx::ffi::{ngx_cycle_t, ngx_int_t, ngx_random, NGX_OK};

use consul_core::answer::{Ignored, OwnAddresses};

use crate::api::Watch;
use crate::dns_client::DnsClient;
use crate::registry::Registry;
use crate::resolve::{LineResolver, Resolved, Truncation};
use crate::{fault, ffi, listening, log, runtime};

mod group;

pub(crate) use group::Group;

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
            log::alert!("consul upstream: discovery failed to start (panic)");
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
    let Some(registry) = Registry::of_cycle(cycle) else {
        return;
    };
    if registry.is_empty() {
        return;
    }
    let own = Rc::new(listening::own_addresses(cycle));
    let dns = Rc::new(DnsClient::default());
    let mut loops = Vec::new();
    for up in registry.upstreams() {
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
        log::alert!("consul upstream: no memory to tie discovery to its cycle");
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
        (g.upstream(), g.tracker(line))
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
        log::debug!("{}resolving {}", up.prefix(), settings.query);
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
            log::alert!(
                "{}applying the answer for {} failed (panic); next query in {}ms",
                up.prefix(),
                settings.query,
                settings.interval_ms
            );
            settings.interval_ms
        });
        log::debug!(
            "{}next query for {} in {delay_ms}ms",
            up.prefix(),
            settings.query
        );
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
        (g.upstream(), g.tracker(line))
    };
    let l = &up.lines[line];
    let settings = &l.settings;
    let capacity = group.borrow().capacity();
    let Some(mut watch) = l.api.as_ref().and_then(|conf| {
        Watch::new(
            up.prefix().to_string(),
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
                let current = group.borrow().published(line).len();
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
            g.set_index(line, index);
            g.apply(line, &mut tracker, fetched.result)
        }));
        let failed_ms = applied.unwrap_or_else(|_| {
            log::alert!(
                "{}applying the answer for {} failed (panic); next query in {}ms",
                up.prefix(),
                settings.query,
                settings.interval_ms
            );
            settings.interval_ms
        });
        delay_ms = watch.pause_ms(answered, failed_ms, ffi::current_msec());
        log::debug!(
            "{}next query for {} in {delay_ms}ms",
            up.prefix(),
            settings.query
        );
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
