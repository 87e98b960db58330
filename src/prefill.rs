//! Peers in the zone before any worker accepts. At start and at each reload,
//! before it forks workers (`init_module`: after nginx has set up the cycle's
//! zones and listening sockets, in the master, or in the single process under
//! `master_process off`), the master fills each line's part of the zone when
//! the zone holds nothing for it: from the state file when there is one, then
//! with one lookup of its own, as nginx resolves static server names while it
//! reads its configuration — an `api=` line with one request without index
//! ([`crate::api::sync_get`]). All lines are asked at once within [`BOUND`];
//! with Consul down the start goes on with what the state file gave. A zone a
//! reload reused holds its set already: nothing is asked for its lines. Worker 0
//! goes on from what the master recorded in the zone and handed over
//! ([`Handover`]): its first query of such a line comes when the master's
//! answer says (`interval` later, or after the backoff a failure begins; an
//! `api=` line's first request blocks on the master's index at once), a
//! failure streak the master logged is not logged again, nor what it said
//! about the answer. An `api=` line whose agent is one of nginx's own
//! listening sockets, or whose answer names hosts to resolve through
//! `resolver=`, is left to worker 0, which asks at once.
//!
//! Nothing of this runs under `nginx -t` (nor `-T`): a test stays fast and
//! offline.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use ngx::ffi::{ngx_cycle_t, ngx_int_t, NGX_OK};

use crate::api::sync_get::Get;
use crate::api::{Noted, Reader};
use crate::discovery::{Group, Said};
use crate::registry::Registry;
use crate::resolve::Resolved;
use crate::upstream::Upstream;
use crate::{ffi, listening, log, sync_resolve};

/// All of the master's lookups together take at most this long (each query
/// also within its line's `timeout`).
pub const BOUND: Duration = Duration::from_secs(2);

/// What the master's answer for one line leaves to worker 0 of the cycle it
/// sets up: when to ask next, and what was said about the answer (said once
/// per change: worker 0 does not say it again).
#[derive(Clone)]
pub struct Handover {
    /// When worker 0's first query is due (`ngx_current_msec`).
    due_msec: u64,
    /// The lookups the line's record counted after the master's: a worker 0
    /// that finds more (respawned after its predecessor went on) starts afresh.
    lookups: u64,
    pub said: Said,
}

thread_local! {
    /// The master's handovers, by upstream and line tag. Set in the master
    /// before it forks: the workers find them in their copy of its memory.
    static HANDOVER: RefCell<Vec<(*const Upstream, u32, Handover)>> =
        const { RefCell::new(Vec::new()) };
}

fn handover_of(up: &Upstream, tag: u32) -> Option<Handover> {
    HANDOVER.with(|h| {
        h.borrow()
            .iter()
            .find(|(u, t, _)| std::ptr::eq(*u, up) && *t == tag)
            .map(|(_, _, h)| h.clone())
    })
}

/// Milliseconds until the first query of line `tag` of `up` is due: 0 unless
/// the master asked for it when it set up this cycle (long past for a worker 0
/// respawned later).
pub fn first_query_in_ms(up: &Upstream, tag: u32) -> u64 {
    let now = ffi::current_msec();
    handover_of(up, tag).map_or(0, |h| h.due_msec.saturating_sub(now))
}

/// What the master said about line `tag`'s answer, while nothing was asked
/// since (`lookups`: the line record's count now).
pub fn said(up: &Upstream, tag: u32, lookups: u64) -> Option<Said> {
    handover_of(up, tag)
        .filter(|h| h.lookups == lookups)
        .map(|h| h.said)
}

/// `init_module` of the core module.
pub unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: plain read of a process global set from the command line.
    if unsafe { ngx::ffi::ngx_test_config } != 0 {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: nginx passes the cycle it is setting up, fully configured.
    let Some(cycle) = (unsafe { cycle.as_ref() }) else {
        return NGX_OK as ngx_int_t;
    };
    log::to(cycle.log, || {
        let filled = std::panic::catch_unwind(AssertUnwindSafe(|| fill(cycle)));
        if filled.is_err() {
            log::alert!(
                "consul upstream: filling the zones before the workers start failed (panic)",
            );
        }
    });
    NGX_OK as ngx_int_t
}

fn fill(cycle: &ngx_cycle_t) {
    HANDOVER.with(|h| h.borrow_mut().clear());
    crate::fault::inject("prefill");
    let Some(registry) = Registry::of_cycle(cycle) else {
        return;
    };
    let mut groups: Vec<(Group, Vec<usize>)> =
        registry.upstreams().filter_map(Group::prefill).collect();
    // DNS lines are looked up; an api= line (its query is a URL) sends one
    // request without index.
    let own = listening::own_addresses(cycle);
    let mut dns: Vec<(usize, usize)> = Vec::new();
    let mut api: Vec<(usize, usize)> = Vec::new();
    let mut gets: Vec<Get> = Vec::new();
    for (g, (group, lines)) in groups.iter().enumerate() {
        let up = group.upstream();
        for &l in lines {
            let line = &up.lines[l];
            match (&line.api, &line.settings.api) {
                // An agent at one of nginx's own listening sockets answers
                // only once workers run: worker 0 asks at once.
                (Some(conf), Some(_)) if conf.addrs.iter().any(|a| own.contains(a)) => {}
                (Some(conf), Some(settings)) => {
                    api.push((g, l));
                    gets.push(Get::new(
                        up.prefix().to_string(),
                        &line.settings,
                        settings,
                        conf,
                        group.capacity(),
                    ));
                }
                _ => dns.push((g, l)),
            }
        }
    }
    if dns.is_empty() && api.is_empty() {
        return;
    }
    let settings: Vec<_> = dns.iter().map(|&(g, l)| groups[g].0.settings(l)).collect();
    let started = Instant::now();
    let results = sync_resolve::lookup_all(&settings, &mut gets, &own, BOUND);
    log::debug!(
        "consul upstream: {} lookups and {} API requests before the workers start took {}ms",
        dns.len(),
        api.len(),
        started.elapsed().as_millis()
    );
    // The clock nginx caches stood still while the master waited.
    // SAFETY: what nginx's master calls in its own loop.
    unsafe { ngx::ffi::ngx_time_update() };
    for (&(g, l), result) in dns.iter().zip(results) {
        let group = &mut groups[g].0;
        let next_ms = group.prefill_apply(l, result);
        hand_over(group, l, next_ms, None);
    }
    for (&(g, l), get) in api.iter().zip(&mut gets) {
        let group = &mut groups[g].0;
        let up = group.upstream();
        let line = &up.lines[l];
        let Some(settings) = &line.settings.api else {
            continue;
        };
        let mut reader = Reader::new(up.prefix().to_string(), settings);
        let read = get.take_result().and_then(|response| reader.read(response));
        let (result, answered) = match read {
            Err(why) => {
                reader.failed();
                (Resolved::Failed(why), false)
            }
            Ok(read)
                if !line.settings.resolvers.is_empty() && !read.answer.host_names().is_empty() =>
            {
                // Host names are resolved through resolver=, which only
                // worker 0 does for an API line: it asks at once.
                log::debug!(
                    "{}{}: host names in the answer, left to worker 0",
                    up.prefix(),
                    line.settings.query
                );
                continue;
            }
            Ok(read) => match reader.result(read, &own, None) {
                Ok(result) => (result, true),
                Err(why) => {
                    reader.failed();
                    (Resolved::Failed(why), false)
                }
            },
        };
        group.set_index(l, reader.index());
        let next_ms = group.prefill_apply(l, result);
        // An answer with an index: worker 0's first request blocks on it at
        // once (it returns when the service changes), as its own next would.
        let next_ms = if answered && reader.index() > 0 {
            0
        } else {
            next_ms
        };
        hand_over(group, l, next_ms, answered.then(|| reader.noted()));
    }
}

/// Leaves what the master's answer for line `l` of `group` means for worker 0
/// of this cycle (its first query in `next_ms`).
fn hand_over(group: &Group, l: usize, next_ms: u64, api: Option<Noted>) {
    let up = group.upstream();
    let mut said = group.said(l);
    said.api = api;
    let handover = Handover {
        due_msec: ffi::current_msec().saturating_add(next_ms),
        lookups: group.lookups(l),
        said,
    };
    HANDOVER.with(|h| {
        h.borrow_mut()
            .push((up as *const Upstream, up.lines[l].tag, handover))
    });
}
