//! The balancer: nginx's upstream peer callbacks, in nginx's order —
//! `init_upstream`, `init_peer`, `get`, `free`, `notify` (and the TLS session
//! hooks) — written once for both protocols ([`Protocol`]). Each protocol has
//! thin `extern "C"` entry points for the callbacks a block's conf holds
//! ([`entry_points!`]); `get` and the others are installed per session.
//!
//! Each worker keeps a local copy of the zone's set and refreshes it only when
//! the zone's generation moved (at `init_peer` and at every `get`: a retry never
//! picks a peer that left); a pick is O(1) and decodes nothing.
//!
//! Static `server` lines of the block are nginx round-robin peers: they serve
//! when no discovered peer can take a connection (none discovered, or all down
//! or tried), `backup` ones after the others, as nginx users expect.

use std::ffi::c_void;
use std::mem::size_of;
use std::panic::AssertUnwindSafe;
use std::ptr;

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_palloc, ngx_peer_connection_t, ngx_str_t, ngx_uint_t, sockaddr,
    NGX_BUSY, NGX_ERROR, NGX_OK, NGX_PEER_FAILED,
};

use consul_core::method::Method;
use consul_core::view::{Balancing, PeerView, PickContext};

use crate::placeholder;
use crate::protocol::{Key, Protocol};
use crate::sockaddr::SockaddrBuf;
use crate::upstream::{Fallback, Upstream};
use crate::{ffi, log};

mod peer_data;

use peer_data::{Current, PeerData, PeerDataInit, RoundRobin};

/// The `extern "C"` entry points of protocol `$p` that a block's conf holds:
/// `init_upstream`, `init_peer` (once per session or request) and
/// `below_keepalive`, in a module `entry` beside the protocol. Each has one
/// address, which the directives compare.
macro_rules! entry_points {
    ($p:ident) => {
        /// The entry points of this protocol's blocks (see `crate::balancer`).
        pub mod entry {
            use ngx::ffi::{ngx_conf_t, ngx_int_t};

            use crate::protocol::Protocol;

            type P = super::$p;

            /// `peer.init_upstream`.
            pub unsafe extern "C" fn init_upstream(
                cf: *mut ngx_conf_t,
                us: *mut <P as Protocol>::Uscf,
            ) -> ngx_int_t {
                // SAFETY: nginx's arguments, handed on.
                unsafe { crate::balancer::init_upstream::<P>(cf, us) }
            }

            /// `peer.init`.
            pub unsafe extern "C" fn init_peer(
                s: *mut <P as Protocol>::Session,
                us: *mut <P as Protocol>::Uscf,
            ) -> ngx_int_t {
                // SAFETY: as above.
                unsafe { crate::balancer::init_peer::<P>(s, us) }
            }

            /// The balancer below `keepalive` (see `crate::conf::chain`).
            pub unsafe extern "C" fn below_keepalive(
                cf: *mut ngx_conf_t,
                us: *mut <P as Protocol>::Uscf,
            ) -> ngx_int_t {
                // SAFETY: as above.
                unsafe { crate::balancer::below_keepalive::<P>(cf, us) }
            }
        }
    };
}

pub(crate) use entry_points;

/// Runs a callback's body; a panic becomes `failed` instead of crossing into nginx.
fn guarded<T>(failed: T, body: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        log::alert!("consul upstream: balancer callback failed (panic)");
        failed
    })
}

/// `peer.init_upstream`: takes the directive's placeholder server out; static
/// `server` lines left become nginx round-robin peers.
///
/// # Safety
/// nginx's arguments: the configuration and an upstream block's conf.
pub unsafe fn init_upstream<P: Protocol>(cf: *mut ngx_conf_t, us: *mut P::Uscf) -> ngx_int_t {
    // SAFETY: per the contract.
    let (cf, us) = unsafe { (&mut *cf, &mut *us) };
    guarded(NGX_ERROR as ngx_int_t, || init_static::<P>(cf, us))
}

fn init_static<P: Protocol>(cf: &mut ngx_conf_t, us: &mut P::Uscf) -> ngx_int_t {
    ngx::ngx_log_debug!(mask: P::DEBUG, cf.log, "init consul upstream");
    let Some(block) = P::block(us) else {
        return NGX_ERROR as ngx_int_t;
    };
    let Some(up) = block.upstream.as_deref() else {
        return NGX_ERROR as ngx_int_t;
    };
    block.initialized = true;
    // The block is read: its method (before or after `consul_upstream`)
    // applies to the discovered peers.
    let first = &up.first().settings;
    let balancing = Balancing {
        method: block.method.map_or(Method::RoundRobin, |c| c.method),
        health: first.health,
        slow_start_ms: first.slow_start_ms,
        max_conns: first.max_conns,
    };
    match up.local.try_borrow_mut() {
        Ok(mut local) => local.view = PeerView::new(balancing),
        Err(_) => return NGX_ERROR as ngx_int_t,
    }
    let method = match block.method.and_then(|c| c.key) {
        Some(Key::ClientAddr) => "ip_hash",
        _ => balancing.method.name(),
    };
    ngx::ngx_log_debug!(mask: P::DEBUG, cf.log, "{}{method}", up.prefix());
    let servers = placeholder::remove::<P>(us);
    if servers > 0 {
        // nginx's round robin needs a primary server. When every static server
        // is `backup`, they become its primaries: they serve after the
        // discovered peers either way.
        if let Some(list) = P::servers(us) {
            if list.iter().all(P::server_backup) {
                for s in list.iter_mut() {
                    P::set_server_backup(s, false);
                }
            }
        }
        // SAFETY: a complete upstream block conf, as init_upstream receives it.
        let rc = unsafe { P::init_round_robin(cf, us) };
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        up.fallback.set(Fallback { servers });
    } else if !P::hooks(us).shm_zone.is_null() {
        // `zone` in the block: nginx's zone module copies the block's round-robin
        // peers into it. There are none: hand it an empty list (discovered peers
        // live in the module's own zone).
        let hooks = P::hooks(us);
        let peers = P::empty_rr_peers(cf.pool, hooks.host);
        if peers.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        *hooks.data = peers;
    }
    *P::hooks(us).init = Some(P::init_peer());
    NGX_OK as ngx_int_t
}

/// What `keepalive` calls as its balancer when its line came before any
/// `consul_upstream` line (nginx < 1.29.7, see `crate::conf::chain`): the
/// module's balancer if the block got one, else what was there before
/// `keepalive` (a method, or round robin), as nginx alone would have called.
///
/// # Safety
/// As for [`init_upstream`].
pub unsafe fn below_keepalive<P: Protocol>(cf: *mut ngx_conf_t, us: *mut P::Uscf) -> ngx_int_t {
    // SAFETY: per the contract.
    let Some(block) = P::block(unsafe { &*us }) else {
        return NGX_ERROR as ngx_int_t;
    };
    if block.upstream.is_some() {
        // SAFETY: per the contract.
        return unsafe { init_upstream::<P>(cf, us) };
    }
    // SAFETY: nginx's own init_upstream (the method's, or round robin), with
    // the arguments nginx gave.
    unsafe {
        match block.below {
            Some(below) => below(cf, us),
            None => P::init_round_robin(cf, us),
        }
    }
}

/// `peer.init`, once per session or request.
///
/// # Safety
/// nginx's arguments: a live session or request with an upstream, and the
/// block's conf.
pub unsafe fn init_peer<P: Protocol>(s: *mut P::Session, us: *mut P::Uscf) -> ngx_int_t {
    guarded(NGX_ERROR as ngx_int_t, || {
        // SAFETY: per the contract.
        let Some(up) = P::block(unsafe { &*us }).and_then(|b| b.upstream.as_deref()) else {
            return NGX_ERROR as ngx_int_t;
        };
        // SAFETY: per the contract; the references end before nginx's round
        // robin (called with the raw pointers) touches the same structs.
        unsafe { init_session::<P>(s, us, up) }
    })
}

/// # Safety
/// As for [`init_peer`].
unsafe fn init_session<P: Protocol>(
    s: *mut P::Session,
    us: *mut P::Uscf,
    up: &'static Upstream,
) -> ngx_int_t {
    // SAFETY: per the contract.
    let log = P::log(unsafe { &*s });
    ngx::ngx_log_debug!(mask: P::DEBUG, log, "init consul peer");
    let Ok(mut local) = up.local.try_borrow_mut() else {
        return NGX_ERROR as ngx_int_t;
    };
    let zone = up.zone();
    // The zone's capacity bounds every generation: the tried bitmap's size.
    let capacity = zone.as_ref().map_or(0, |z| z.zone().capacity());
    local.refresh(zone);
    let fallback = up.fallback.get();
    let discovered = local.view.tries();
    let health = local.view.balancing().health;
    drop(local);
    if discovered == 0 && fallback.servers > 0 {
        ngx::ngx_log_debug!(
            mask: P::DEBUG,
            log,
            "no discovered peers: round robin over the static servers"
        );
        // SAFETY: the session and its block's conf, as nginx passed them.
        return unsafe { P::init_round_robin_peer(s, us) };
    }
    // SAFETY: per the contract.
    let block = P::block(unsafe { &*us });
    let key = block.and_then(|b| b.method).and_then(|c| c.key);
    // SAFETY: per the contract.
    let session = unsafe { &mut *s };
    let init = PeerDataInit {
        upstream: up,
        // SAFETY: per the contract; the block's name lives as long as its conf.
        upstream_name: P::hooks(unsafe { &mut *us }).host,
        capacity,
        health,
        key_hash: key.and_then(|k| P::key_hash(session, k)),
    };
    let pool = P::pool(session);
    let pd = PeerData::<P>::alloc(pool, init);
    // SAFETY: null, or initialized by alloc.
    let Some(pd) = (unsafe { pd.as_mut() }) else {
        return NGX_ERROR as ngx_int_t;
    };
    let Some(pc) = P::peer_connection(session) else {
        return NGX_ERROR as ngx_int_t;
    };
    pc.data = pd as *mut PeerData<P> as *mut c_void;
    let mut static_tries = 0;
    if fallback.servers > 0 {
        // Round robin fills `pd.rr` (peer.data points at it) and installs its
        // callbacks; ours take their place and call them for the static servers.
        // SAFETY: as above; peer.data is set to memory that starts with rr data.
        let rc = unsafe { P::init_round_robin_peer(s, us) };
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        // SAFETY: per the contract.
        let Some(pc) = P::peer_connection(unsafe { &mut *s }) else {
            return NGX_ERROR as ngx_int_t;
        };
        pd.static_servers = Some(RoundRobin::installed(pc));
        static_tries = pc.tries;
    }
    // SAFETY: per the contract.
    let Some(pc) = P::peer_connection(unsafe { &mut *s }) else {
        return NGX_ERROR as ngx_int_t;
    };
    pc.get = Some(get_peer::<P>);
    pc.free = Some(free_peer::<P>);
    pc.notify = Some(notify_peer::<P>);
    #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
    {
        pc.set_session = Some(set_session::<P>);
        pc.save_session = Some(save_session::<P>);
    }
    pc.tries = (discovered as ngx_uint_t + static_tries).max(1);
    NGX_OK as ngx_int_t
}

/// `peer.get`: the next peer, or NGX_BUSY ("no live upstreams").
unsafe extern "C" fn get_peer<P: Protocol>(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
) -> ngx_int_t {
    // SAFETY: data is the PeerData set in init_session; pc is the session's peer.
    let (pc, pd) = unsafe { (&mut *pc, &mut *(data as *mut PeerData<P>)) };
    ngx::ngx_log_debug!(mask: P::DEBUG, pc.log, "get consul peer, try: {}", pc.tries);
    let rc = guarded(NGX_ERROR as ngx_int_t, || pick(pc, pd));
    if rc == NGX_BUSY as ngx_int_t || rc == NGX_ERROR as ngx_int_t {
        // No peer: name the upstream, as nginx's balancers do. nginx reads
        // `pc->name` after a get that found none (with nginx's `zone` in the
        // block it copies it), and a new connection has none yet (NULL).
        pc.name = pd.upstream_name;
    }
    rc
}

fn pick<P: Protocol>(pc: &mut ngx_peer_connection_t, pd: &mut PeerData<P>) -> ngx_int_t {
    crate::fault::inject("get");
    // SAFETY: the upstream conf outlives every session of its cycle.
    let up = unsafe { &*pd.upstream };
    let Ok(mut local) = up.local.try_borrow_mut() else {
        return NGX_ERROR as ngx_int_t;
    };
    // A retry, or a session that waited: never a peer that has left since.
    local.refresh(up.zone());
    let l = &mut *local;
    let mut ctx = PickContext {
        key_hash: pd.key_hash,
        rng: &mut l.rng,
        retry: pd.released_usable && pd.tried.any(),
    };
    let endpoints = &l.endpoints;
    let tried = |i: usize| {
        endpoints
            .get(i)
            .is_none_or(|e| pd.tried.is_set(e.slot as usize))
    };
    let picked = l.view.select(tried, ffi::current_msec(), &mut ctx);
    if let Some(index) = picked {
        let Some(slot) = local.view.slot(index) else {
            return NGX_ERROR as ngx_int_t;
        };
        if !pd.tried.set(slot.index as usize, pd.pool, pd.capacity) {
            slot.release(false, &pd.health, ffi::current_msec());
            return NGX_ERROR as ngx_int_t;
        }
        pd.current = Current::Discovered(slot);
        let Some(ep) = local.endpoints.get(index) else {
            return NGX_ERROR as ngx_int_t;
        };
        ngx::ngx_log_debug!(
            mask: P::DEBUG,
            pc.log,
            "get consul peer: {}",
            String::from_utf8_lossy(ep.text())
        );
        // The address and name must outlive a later set change ($upstream_addr is
        // read when the session is logged) and a retry (nginx keeps each try's
        // name): copy them into the session's pool, in one allocation.
        let text = ep.text();
        let sa_at = size_of::<ngx_str_t>();
        let text_at = sa_at + size_of::<SockaddrBuf>();
        // SAFETY: one aligned pool block of text_at + text.len() bytes: the
        // ngx_str_t at its start, the sockaddr at an 8-byte boundary after it,
        // then the text.
        unsafe {
            let mem = ngx_palloc(pd.pool, text_at + text.len()) as *mut u8;
            if mem.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            let (name, sa, bytes) = (mem as *mut ngx_str_t, mem.add(sa_at), mem.add(text_at));
            ptr::write(sa as *mut SockaddrBuf, ep.sockaddr);
            ptr::copy_nonoverlapping(text.as_ptr(), bytes, text.len());
            ptr::write(
                name,
                ngx_str_t {
                    len: text.len(),
                    data: bytes,
                },
            );
            pc.sockaddr = sa as *mut sockaddr;
            pc.socklen = ep.socklen;
            pc.name = name;
        }
        return NGX_OK as ngx_int_t;
    }
    drop(local);
    if let Some(get) = pd.static_servers.and_then(|rr| rr.get) {
        ngx::ngx_log_debug!(
            mask: P::DEBUG,
            pc.log,
            "no usable discovered peer: static servers"
        );
        pd.current = Current::Static;
        // SAFETY: round robin's own callback with its own data.
        return unsafe { get(pc, pd.rr_data()) };
    }
    pd.current = Current::None;
    NGX_BUSY as ngx_int_t
}

/// `peer.free`: records success or failure of the peer just used.
unsafe extern "C" fn free_peer<P: Protocol>(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    state: ngx_uint_t,
) {
    // SAFETY: as in get_peer.
    let (pc, pd) = unsafe { (&mut *pc, &mut *(data as *mut PeerData<P>)) };
    ngx::ngx_log_debug!(
        mask: P::DEBUG,
        pc.log,
        "free consul peer, try: {}, state: {}",
        pc.tries,
        state
    );
    guarded((), || release(pc, pd, state));
}

fn release<P: Protocol>(pc: &mut ngx_peer_connection_t, pd: &mut PeerData<P>, state: ngx_uint_t) {
    let current = std::mem::replace(&mut pd.current, Current::None);
    match current {
        Current::Static => {
            if let Some(free) = pd.static_servers.and_then(|rr| rr.free) {
                // SAFETY: round robin's own callback with its own data; it counts
                // the try down itself.
                unsafe { free(pc, pd.rr_data(), state) };
                return;
            }
        }
        Current::Discovered(slot) => {
            let now = ffi::current_msec();
            slot.release(state & NGX_PEER_FAILED as ngx_uint_t != 0, &pd.health, now);
            pd.released_usable = slot.usable(&pd.health, now);
        }
        Current::None => {}
    }
    if pc.tries > 0 {
        pc.tries -= 1;
    }
}

/// `peer.notify`: stream's "the connection to the peer is established"; what
/// http notifies (a response header, for nginx's `sticky`) concerns only
/// round robin's static servers.
unsafe extern "C" fn notify_peer<P: Protocol>(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    kind: ngx_uint_t,
) {
    // SAFETY: as in get_peer.
    let pd = unsafe { &mut *(data as *mut PeerData<P>) };
    guarded((), || match pd.current {
        Current::Static => {
            if let Some(notify) = pd.static_servers.and_then(|rr| rr.notify) {
                // SAFETY: round robin's own callback with its own data.
                unsafe { notify(pc, pd.rr_data(), kind) };
            }
        }
        Current::Discovered(slot) if Some(kind) == P::NOTIFY_CONNECT => {
            slot.connected(&pd.health, ffi::current_msec())
        }
        _ => {}
    });
}

/// TLS sessions (`proxy_ssl on` with `proxy_ssl_session_reuse on`): the
/// worker's session of the discovered peer, or round robin's for a static server.
#[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
unsafe extern "C" fn set_session<P: Protocol>(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
) -> ngx_int_t {
    // SAFETY: as in get_peer.
    let (pc, pd) = unsafe { (&mut *pc, &mut *(data as *mut PeerData<P>)) };
    guarded(NGX_OK as ngx_int_t, || {
        match (pd.current, pd.static_servers) {
            (
                Current::Static,
                Some(RoundRobin {
                    set_session: Some(f),
                    ..
                }),
            ) => {
                // SAFETY: round robin's own callback with its own data.
                unsafe { f(pc, pd.rr_data()) }
            }
            #[cfg(ngx_feature = "ssl")]
            (Current::Discovered(slot), _) => crate::tls::set_peer_session(pc, pd.upstream, &slot),
            _ => NGX_OK as ngx_int_t,
        }
    })
}

#[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
unsafe extern "C" fn save_session<P: Protocol>(pc: *mut ngx_peer_connection_t, data: *mut c_void) {
    // SAFETY: as in get_peer.
    let (pc, pd) = unsafe { (&mut *pc, &mut *(data as *mut PeerData<P>)) };
    guarded((), || match (pd.current, pd.static_servers) {
        (
            Current::Static,
            Some(RoundRobin {
                save_session: Some(f),
                ..
            }),
        ) => {
            // SAFETY: round robin's own callback with its own data.
            unsafe { f(pc, pd.rr_data()) }
        }
        #[cfg(ngx_feature = "ssl")]
        (Current::Discovered(slot), _) => crate::tls::save_peer_session(pc, pd.upstream, &slot),
        _ => {}
    });
}
