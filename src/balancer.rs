//! The balancer: nginx's stream upstream callbacks, in nginx's order —
//! `init_upstream`, `init_peer`, `get`, `free`, `notify` (and the TLS session
//! hooks). Each worker keeps a local copy of the zone's set and refreshes it only
//! when the zone's generation moved; a pick is O(1) and decodes nothing.
//!
//! Static `server` lines of the block are nginx round-robin peers: they serve
//! when no discovered peer can take a connection (none discovered, or all down
//! or tried), `backup` ones after the others, as nginx users expect.

use std::ffi::c_void;
use std::mem::size_of;
use std::panic::AssertUnwindSafe;
use std::ptr;

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_palloc, ngx_pcalloc, ngx_peer_connection_t, ngx_pool_t, ngx_str_t,
    ngx_stream_complex_value, ngx_stream_session_t, ngx_stream_upstream_init_round_robin,
    ngx_stream_upstream_init_round_robin_peer, ngx_stream_upstream_rr_peer_data_t,
    ngx_stream_upstream_rr_peers_t, ngx_stream_upstream_server_t, ngx_stream_upstream_srv_conf_t,
    ngx_uint_t, sockaddr, NGX_BUSY, NGX_ERROR, NGX_OK, NGX_PEER_FAILED,
};

use consul_core::method::{hash64, Method};
use consul_core::view::{Balancing, HealthPolicy, PeerView, PickContext, SlotRef};

use crate::sockaddr::SockaddrBuf;
use crate::upstream::{remove_placeholder, srv_conf_of, upstream_of, Fallback, Upstream};
use crate::{ffi, log};

/// `NGX_STREAM_UPSTREAM_NOTIFY_CONNECT` (nginx 1.25+; older ones never notify).
const NOTIFY_CONNECT: ngx_uint_t = 1;

type GetPeer = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void) -> ngx_int_t;
type FreePeer = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void, ngx_uint_t);
type NotifyPeer = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void, ngx_uint_t);
#[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
type SetSession = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void) -> ngx_int_t;
#[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
type SaveSession = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void);

/// nginx's round-robin callbacks for the static servers of one connection.
#[derive(Clone, Copy)]
struct RoundRobin {
    get: Option<GetPeer>,
    free: Option<FreePeer>,
    notify: Option<NotifyPeer>,
    #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
    set_session: Option<SetSession>,
    #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
    save_session: Option<SaveSession>,
}

/// Where the peer of the current try came from.
#[derive(Clone, Copy)]
enum Current {
    None,
    Discovered(SlotRef<'static>),
    Static,
}

/// Per-connection balancer state, in the session's pool (plain data, no drop).
#[repr(C)]
struct PeerData {
    /// Round robin's data for the static servers. First: its callbacks take
    /// `peer.data` as theirs (as nginx's hash module arranges it too).
    rr: ngx_stream_upstream_rr_peer_data_t,
    /// Round robin's callbacks, when the block has static servers.
    static_servers: Option<RoundRobin>,
    upstream: *const Upstream,
    /// The upstream block's name (its `host`): `pc.name` whenever no peer is
    /// picked, as nginx's round robin sets it.
    upstream_name: *mut ngx_str_t,
    pool: *mut ngx_pool_t,
    generation: u64,
    health: HealthPolicy,
    /// The hash key's hash (hash methods; `None` for an empty key).
    key_hash: Option<u64>,
    current: Current,
    /// Discovered peers tried by this connection: the first 64 inline, the rest
    /// in a bitmap allocated from the pool on first need.
    tried_inline: u64,
    tried_more: *mut u64,
    tried_words: usize,
}

impl PeerData {
    fn is_tried(&self, i: usize) -> bool {
        if i < 64 {
            return self.tried_inline & (1 << i) != 0;
        }
        let w = i / 64 - 1;
        // SAFETY: tried_more holds tried_words words when non-null.
        w < self.tried_words
            && !self.tried_more.is_null()
            && unsafe { *self.tried_more.add(w) } & (1 << (i % 64)) != 0
    }

    fn set_tried(&mut self, i: usize, peers: usize) {
        if i < 64 {
            self.tried_inline |= 1 << i;
            return;
        }
        if self.tried_more.is_null() {
            let words = peers.div_ceil(64);
            // SAFETY: the session's pool outlives the connection's balancer state.
            let mem = unsafe { ngx_pcalloc(self.pool, words * 8) } as *mut u64;
            if mem.is_null() {
                return;
            }
            self.tried_more = mem;
            self.tried_words = words;
        }
        let w = i / 64 - 1;
        if w < self.tried_words {
            // SAFETY: w is within the allocated words.
            unsafe { *self.tried_more.add(w) |= 1 << (i % 64) };
        }
    }

    fn clear_tried(&mut self) {
        self.tried_inline = 0;
        if !self.tried_more.is_null() {
            // SAFETY: tried_more holds tried_words words.
            unsafe { ptr::write_bytes(self.tried_more, 0, self.tried_words) };
        }
    }

    fn rr_data(&mut self) -> *mut c_void {
        ptr::addr_of_mut!(self.rr) as *mut c_void
    }
}

/// Runs a callback's body; a panic becomes `failed` instead of crossing into nginx.
fn guarded<T>(failed: T, body: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        log::alert("consul upstream: balancer callback failed (panic)");
        failed
    })
}

/// `peer.init_upstream`: takes the directive's placeholder server out; static
/// `server` lines left become nginx round-robin peers.
pub unsafe extern "C" fn init_upstream(
    cf: *mut ngx_conf_t,
    us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: nginx passes the configuration and an upstream block's conf.
    let (cf, us) = unsafe { (&mut *cf, &mut *us) };
    guarded(NGX_ERROR as ngx_int_t, || init_static(cf, us))
}

fn init_static(cf: &mut ngx_conf_t, us: &mut ngx_stream_upstream_srv_conf_t) -> ngx_int_t {
    ngx::ngx_log_debug!(mask: ngx::log::DebugMask::Stream, cf.log, "init consul upstream");
    // SAFETY: us is an upstream block's conf.
    let Some(srv) = (unsafe { srv_conf_of(us) }) else {
        return NGX_ERROR as ngx_int_t;
    };
    let Some(up) = srv.upstream.as_deref() else {
        return NGX_ERROR as ngx_int_t;
    };
    // The block is read: its method (`least_conn`, `hash`, `random` before or
    // after `consul_upstream`) applies to the discovered peers.
    let first = &up.first().settings;
    let balancing = Balancing {
        method: srv.method.map_or(Method::RoundRobin, |c| c.method),
        health: first.health,
        slow_start_ms: first.slow_start_ms,
        max_conns: first.max_conns,
    };
    up.hash_key
        .set(srv.method.map_or(ptr::null_mut(), |c| c.key));
    match up.local.try_borrow_mut() {
        Ok(mut local) => local.view = PeerView::new(balancing),
        Err(_) => return NGX_ERROR as ngx_int_t,
    }
    ngx::ngx_log_debug!(
        mask: ngx::log::DebugMask::Stream,
        cf.log,
        "consul upstream \"{}\": {}",
        up.name,
        balancing.method.name()
    );
    let servers = remove_placeholder(us);
    if servers > 0 {
        // nginx's round robin needs a primary server. When every static server
        // is `backup`, they become its primaries: they serve after the
        // discovered peers either way.
        // SAFETY: the block's server array (non-empty: servers > 0).
        let list = unsafe { (*us.servers).as_slice_mut::<ngx_stream_upstream_server_t>() };
        if list.iter().all(|s| s.backup() != 0) {
            for s in list.iter_mut() {
                s.set_backup(0);
            }
        }
        // SAFETY: a complete upstream block conf, as init_upstream receives it.
        let rc = unsafe { ngx_stream_upstream_init_round_robin(cf, us) };
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        up.fallback.set(Fallback { servers });
    } else if !us.shm_zone.is_null() {
        // `zone` in the block: nginx's zone module copies the block's round-robin
        // peers into it. There are none: hand it an empty list (discovered peers
        // live in the module's own zone).
        // SAFETY: the configuration's pool lives as long as the cycle.
        let peers = unsafe { ngx_pcalloc(cf.pool, size_of::<ngx_stream_upstream_rr_peers_t>()) }
            as *mut ngx_stream_upstream_rr_peers_t;
        if peers.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        // SAFETY: zeroed memory for one peers list; the name lives in the conf.
        unsafe { (*peers).name = &mut us.host };
        us.peer.data = peers as *mut c_void;
    }
    us.peer.init = Some(init_peer);
    NGX_OK as ngx_int_t
}

/// `peer.init`, once per session.
unsafe extern "C" fn init_peer(
    s: *mut ngx_stream_session_t,
    us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: nginx passes a live session with an upstream, and the block's conf.
    let (session, uscf) = unsafe { (&mut *s, &mut *us) };
    guarded(NGX_ERROR as ngx_int_t, || {
        // SAFETY: us is an upstream block's conf.
        let Some(up) = (unsafe { upstream_of(uscf) }) else {
            return NGX_ERROR as ngx_int_t;
        };
        init_session(session, uscf, up)
    })
}

fn init_session(
    s: &mut ngx_stream_session_t,
    us: &mut ngx_stream_upstream_srv_conf_t,
    up: &Upstream,
) -> ngx_int_t {
    // SAFETY: the session's connection is live for the whole session.
    let c = unsafe { &*s.connection };
    ngx::ngx_log_debug!(mask: ngx::log::DebugMask::Stream, c.log, "init consul peer");
    let Ok(mut local) = up.local.try_borrow_mut() else {
        return NGX_ERROR as ngx_int_t;
    };
    local.refresh(up.zone());
    let fallback = up.fallback.get();
    let (discovered, generation) = (local.view.tries(), local.generation);
    let health = local.view.balancing().health;
    drop(local);
    if discovered == 0 && fallback.servers > 0 {
        ngx::ngx_log_debug!(
            mask: ngx::log::DebugMask::Stream,
            c.log,
            "no discovered peers: round robin over the static servers"
        );
        // SAFETY: the session and its block's conf, as nginx passed them.
        return unsafe { ngx_stream_upstream_init_round_robin_peer(s, us) };
    }
    // SAFETY: a session with an upstream (nginx creates it before init).
    let Some(u) = (unsafe { s.upstream.as_mut() }) else {
        return NGX_ERROR as ngx_int_t;
    };
    let pool = c.pool;
    // SAFETY: the connection's pool outlives the session's balancer state.
    let pd = unsafe { ngx_pcalloc(pool, size_of::<PeerData>()) } as *mut PeerData;
    if pd.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    // SAFETY: pd is fresh, aligned, zeroed pool memory for one PeerData; `rr`
    // stays zeroed until round robin fills it.
    unsafe {
        ptr::addr_of_mut!((*pd).static_servers).write(None);
        ptr::addr_of_mut!((*pd).upstream).write(up);
        ptr::addr_of_mut!((*pd).upstream_name).write(&mut us.host);
        ptr::addr_of_mut!((*pd).pool).write(pool);
        ptr::addr_of_mut!((*pd).generation).write(generation);
        ptr::addr_of_mut!((*pd).health).write(health);
        ptr::addr_of_mut!((*pd).key_hash).write(key_hash(s, up));
        ptr::addr_of_mut!((*pd).current).write(Current::None);
    }
    // SAFETY: initialized above (the remaining fields are zero: valid).
    let pd = unsafe { &mut *pd };
    u.peer.data = pd as *mut PeerData as *mut c_void;
    let mut static_tries = 0;
    if fallback.servers > 0 {
        // Round robin fills `pd.rr` (u.peer.data points at it) and installs its
        // callbacks; ours take their place and call them for the static servers.
        // SAFETY: as above; peer.data is set to memory that starts with rr data.
        let rc = unsafe { ngx_stream_upstream_init_round_robin_peer(s, us) };
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        // SAFETY: as above.
        let u = unsafe { &mut *s.upstream };
        pd.static_servers = Some(RoundRobin {
            get: u.peer.get,
            free: u.peer.free,
            notify: u.peer.notify,
            #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
            set_session: u.peer.set_session,
            #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
            save_session: u.peer.save_session,
        });
        static_tries = u.peer.tries;
    }
    // SAFETY: as above.
    let u = unsafe { &mut *s.upstream };
    u.peer.get = Some(get_peer);
    u.peer.free = Some(free_peer);
    u.peer.notify = Some(notify_peer);
    #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
    {
        u.peer.set_session = Some(set_session);
        u.peer.save_session = Some(save_session);
    }
    u.peer.tries = (discovered as ngx_uint_t + static_tries).max(1);
    NGX_OK as ngx_int_t
}

/// The hash of the session's `hash` key: `None` without a key, or for an empty
/// one (`$proxy_protocol_addr` without PROXY protocol, `$ssl_preread_server_name`
/// without SNI), which nginx's hash methods balance by round robin.
fn key_hash(s: &mut ngx_stream_session_t, up: &Upstream) -> Option<u64> {
    let key = up.hash_key.get();
    if key.is_null() {
        return None;
    }
    let mut value = ngx_str_t::default();
    // SAFETY: a key compiled for this configuration, evaluated in a live session.
    if unsafe { ngx_stream_complex_value(s, key, &mut value) } != NGX_OK as ngx_int_t {
        return None;
    }
    let bytes = value.as_bytes();
    (!bytes.is_empty()).then(|| hash64(bytes, 0))
}

/// `peer.get`: the next peer, or NGX_BUSY ("no live upstreams").
unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: data is the PeerData set in init_session; pc is the session's peer.
    let (pc, pd) = unsafe { (&mut *pc, &mut *(data as *mut PeerData)) };
    ngx::ngx_log_debug!(
        mask: ngx::log::DebugMask::Stream,
        pc.log,
        "get consul peer, try: {}",
        pc.tries
    );
    let rc = guarded(NGX_ERROR as ngx_int_t, || pick(pc, pd));
    if rc == NGX_BUSY as ngx_int_t || rc == NGX_ERROR as ngx_int_t {
        // No peer: name the upstream, as nginx's balancers do. With nginx's
        // `zone` in the block, ngx_stream_proxy_connect copies `pc->name` even
        // for "no live upstreams", and a new connection has none yet (NULL).
        pc.name = pd.upstream_name;
    }
    rc
}

fn pick(pc: &mut ngx_peer_connection_t, pd: &mut PeerData) -> ngx_int_t {
    crate::fault::inject("get");
    // SAFETY: the upstream conf outlives every session of its cycle.
    let up = unsafe { &*pd.upstream };
    let Ok(mut local) = up.local.try_borrow_mut() else {
        return NGX_ERROR as ngx_int_t;
    };
    if local.generation != pd.generation {
        // The set changed under a retrying connection: indices moved.
        pd.clear_tried();
        pd.generation = local.generation;
    }
    let peers = local.view.peers().len();
    let l = &mut *local;
    let mut ctx = PickContext {
        key_hash: pd.key_hash,
        rng: &mut l.rng,
    };
    let picked = l
        .view
        .select(|i| pd.is_tried(i), ffi::current_msec(), &mut ctx);
    if let Some(index) = picked {
        pd.set_tried(index, peers);
        pd.current = local
            .view
            .slot(index)
            .map_or(Current::None, Current::Discovered);
        let Some(ep) = local.endpoints.get(index) else {
            return NGX_ERROR as ngx_int_t;
        };
        ngx::ngx_log_debug!(
            mask: ngx::log::DebugMask::Stream,
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
            mask: ngx::log::DebugMask::Stream,
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
unsafe extern "C" fn free_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    state: ngx_uint_t,
) {
    // SAFETY: as in get_peer.
    let (pc, pd) = unsafe { (&mut *pc, &mut *(data as *mut PeerData)) };
    ngx::ngx_log_debug!(
        mask: ngx::log::DebugMask::Stream,
        pc.log,
        "free consul peer, try: {}, state: {}",
        pc.tries,
        state
    );
    guarded((), || release(pc, pd, state));
}

fn release(pc: &mut ngx_peer_connection_t, pd: &mut PeerData, state: ngx_uint_t) {
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
        Current::Discovered(slot) => slot.release(
            state & NGX_PEER_FAILED as ngx_uint_t != 0,
            &pd.health,
            ffi::current_msec(),
        ),
        Current::None => {}
    }
    if pc.tries > 0 {
        pc.tries -= 1;
    }
}

/// `peer.notify`: the connection to the peer is established.
unsafe extern "C" fn notify_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    kind: ngx_uint_t,
) {
    // SAFETY: as in get_peer.
    let pd = unsafe { &mut *(data as *mut PeerData) };
    guarded((), || match pd.current {
        Current::Static => {
            if let Some(notify) = pd.static_servers.and_then(|rr| rr.notify) {
                // SAFETY: round robin's own callback with its own data.
                unsafe { notify(pc, pd.rr_data(), kind) };
            }
        }
        Current::Discovered(slot) if kind == NOTIFY_CONNECT => {
            slot.connected(&pd.health, ffi::current_msec())
        }
        _ => {}
    });
}

/// TLS sessions (`proxy_ssl on` with `proxy_ssl_session_reuse on`): the
/// worker's session of the discovered peer, or round robin's for a static server.
#[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
unsafe extern "C" fn set_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: as in get_peer.
    let (pc, pd) = unsafe { (&mut *pc, &mut *(data as *mut PeerData)) };
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
            (Current::Discovered(slot), _) => set_peer_session(pc, pd, &slot),
            _ => NGX_OK as ngx_int_t,
        }
    })
}

#[cfg(ngx_feature = "ssl")]
fn set_peer_session(pc: &mut ngx_peer_connection_t, pd: &PeerData, slot: &SlotRef) -> ngx_int_t {
    // SAFETY: the upstream conf outlives every session of its cycle.
    let up = unsafe { &*pd.upstream };
    let Ok(local) = up.local.try_borrow() else {
        return NGX_OK as ngx_int_t;
    };
    let session = local.sessions.get(slot);
    ngx::ngx_log_debug!(
        mask: ngx::log::DebugMask::Stream,
        pc.log,
        "set consul peer session: {:p}",
        session
    );
    if session.is_null() {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: nginx calls set_session with the peer connection's TLS state just
    // created; the session stays alive (the store holds a reference) while
    // OpenSSL takes its own.
    unsafe { ngx::ffi::ngx_ssl_set_session(pc.connection, session) }
}

#[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
unsafe extern "C" fn save_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) {
    // SAFETY: as in get_peer.
    let (pc, pd) = unsafe { (&mut *pc, &mut *(data as *mut PeerData)) };
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
        (Current::Discovered(slot), _) => save_peer_session(pc, pd, &slot),
        _ => {}
    });
}

#[cfg(ngx_feature = "ssl")]
fn save_peer_session(pc: &mut ngx_peer_connection_t, pd: &PeerData, slot: &SlotRef) {
    // SAFETY: the upstream conf outlives every session of its cycle; nginx calls
    // save_session with the peer's live connection.
    let (up, c) = unsafe { (&*pd.upstream, pc.connection.as_ref()) };
    let (Some(c), Ok(mut local)) = (c, up.local.try_borrow_mut()) else {
        return;
    };
    let session = local.sessions.save(slot, c);
    ngx::ngx_log_debug!(
        mask: ngx::log::DebugMask::Stream,
        pc.log,
        "save consul peer session: {:p}",
        session
    );
}
