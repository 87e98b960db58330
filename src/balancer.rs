//! The balancer: nginx's stream upstream `init_upstream` / `init_peer` / `get` /
//! `free` callbacks. Each worker keeps a local view of the zone and refreshes it
//! only when the zone's generation moved; a pick is O(1) and decodes nothing.

use std::ffi::c_void;
use std::io::Write;
use std::mem::size_of;
use std::net::SocketAddr;
use std::ptr;

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_palloc, ngx_pcalloc, ngx_peer_connection_t, ngx_pool_t, ngx_str_t,
    ngx_stream_session_t, ngx_stream_upstream_init_round_robin,
    ngx_stream_upstream_init_round_robin_peer, ngx_stream_upstream_server_t,
    ngx_stream_upstream_srv_conf_t, ngx_uint_t, sockaddr, socklen_t, NGX_BUSY, NGX_ERROR, NGX_OK,
    NGX_PEER_FAILED,
};

use consul_core::view::PeerView;

use crate::conf::{upstream_of, Upstream, PLACEHOLDER};
use crate::ffi;
use crate::sockaddr::SockaddrBuf;
use crate::zone::Zone;

/// Room for a socket address's text: "[v6%scope]:port" takes at most 58 bytes.
const ADDR_TEXT_MAX: usize = 64;

/// A peer's socket address in the C form nginx connects with, and its text, in
/// one record: a pick reads no other memory to hand them to nginx.
struct Endpoint {
    sockaddr: SockaddrBuf,
    socklen: socklen_t,
    text_len: usize,
    text: [u8; ADDR_TEXT_MAX],
}

impl Endpoint {
    fn new(addr: &SocketAddr) -> Endpoint {
        let (buf, socklen) = SockaddrBuf::new(addr);
        let mut text = [0; ADDR_TEXT_MAX];
        let mut rest = &mut text[..];
        // Cannot fail (the text fits); a failure would only shorten the name.
        let _ = write!(rest, "{addr}");
        let text_len = ADDR_TEXT_MAX - rest.len();
        Endpoint {
            sockaddr: buf,
            socklen,
            text_len,
            text,
        }
    }

    fn text(&self) -> &[u8] {
        &self.text[..self.text_len]
    }
}

/// This worker's copy of one upstream's discovered set.
pub struct Local {
    pub view: PeerView,
    pub generation: u64,
    endpoints: Vec<Endpoint>,
}

impl Local {
    pub fn new(view: PeerView) -> Local {
        Local {
            view,
            generation: 0,
            endpoints: Vec::new(),
        }
    }

    /// Copies the zone's set if its generation moved: one atomic load otherwise.
    fn refresh(&mut self, zone: Option<Zone>) {
        let Some(zone) = zone else { return };
        if zone.generation() == self.generation {
            return;
        }
        let Some((generation, peers)) = zone.read() else {
            return;
        };
        self.endpoints = peers.iter().map(|p| Endpoint::new(&p.addr)).collect();
        self.view.replace(peers, ffi::worker_index());
        self.generation = generation;
    }
}

/// Per-connection balancer state, in the session's pool (plain data, no drop).
#[repr(C)]
struct PeerData {
    upstream: *const Upstream,
    pool: *mut ngx_pool_t,
    generation: u64,
    current: usize,
    current_addr: Option<SocketAddr>,
    /// Peers tried by this connection: the first 64 inline, the rest in a bitmap
    /// allocated from the pool on first need.
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
}

/// `peer.init_upstream`: removes the directive's placeholder server; static
/// `server` lines left become nginx round-robin fallback peers.
pub unsafe extern "C" fn init_upstream(
    cf: *mut ngx_conf_t,
    us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: nginx passes the configuration and an upstream block's conf.
    let us_ref = &mut *us;
    let Some(up) = upstream_of(us_ref) else {
        return NGX_ERROR as ngx_int_t;
    };
    let servers = &mut *us_ref.servers;
    let list = servers.as_slice_mut::<ngx_stream_upstream_server_t>();
    let mut kept = 0;
    for i in 0..list.len() {
        if !ptr::eq(list[i].name.data, PLACEHOLDER.as_ptr()) {
            list.swap(kept, i);
            kept += 1;
        }
    }
    servers.nelts = kept;
    if kept > 0 {
        let rc = ngx_stream_upstream_init_round_robin(cf, us);
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        up.fallback.set(true);
    }
    us_ref.peer.init = Some(init_peer);
    NGX_OK as ngx_int_t
}

/// `peer.init`, once per session.
unsafe extern "C" fn init_peer(
    s: *mut ngx_stream_session_t,
    us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: nginx passes a live session with an upstream, and the block's conf.
    let (session, us_ref) = (&mut *s, &*us);
    let Some(up) = upstream_of(us_ref) else {
        return NGX_ERROR as ngx_int_t;
    };
    match init_session(session, up) {
        Ok(true) => NGX_OK as ngx_int_t,
        // Discovery has nothing: the static servers serve, as plain round robin.
        Ok(false) => ngx_stream_upstream_init_round_robin_peer(s, us),
        Err(()) => NGX_ERROR as ngx_int_t,
    }
}

/// Sets up the connection's balancer state; `Ok(false)` hands it to round robin.
fn init_session(s: &mut ngx_stream_session_t, up: &Upstream) -> Result<bool, ()> {
    let mut local = up.local.try_borrow_mut().map_err(|_| ())?;
    // SAFETY: the zone pointer was set at configuration time and stays mapped.
    local.refresh(unsafe { Zone::from_shm_zone(up.shm_zone) });
    if local.view.is_empty() && up.fallback.get() {
        return Ok(false);
    }
    // SAFETY: the session's connection and pool are live for the whole session.
    let pool = unsafe { (*s.connection).pool };
    let pd = unsafe { ngx_pcalloc(pool, size_of::<PeerData>()) } as *mut PeerData;
    if pd.is_null() || s.upstream.is_null() {
        return Err(());
    }
    // SAFETY: pd is fresh, aligned pool memory for one PeerData.
    unsafe {
        ptr::write(
            pd,
            PeerData {
                upstream: up,
                pool,
                generation: local.generation,
                current: usize::MAX,
                current_addr: None,
                tried_inline: 0,
                tried_more: ptr::null_mut(),
                tried_words: 0,
            },
        )
    };
    // SAFETY: s.upstream was checked above and is the session's upstream.
    let peer = unsafe { &mut (*s.upstream).peer };
    peer.data = pd as *mut c_void;
    peer.get = Some(get_peer);
    peer.free = Some(free_peer);
    // Round robin's notify and SSL session hooks expect its own peer data.
    peer.notify = None;
    #[cfg(ngx_feature = "stream_ssl")]
    {
        peer.set_session = Some(set_session);
        peer.save_session = Some(save_session);
    }
    peer.tries = local.view.tries().max(1) as ngx_uint_t;
    Ok(true)
}

/// `peer.get`: the next peer, or NGX_BUSY ("no live upstreams").
unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: data is the PeerData set in init_session; pc is the session's peer.
    let (pc, pd) = (&mut *pc, &mut *(data as *mut PeerData));
    match pick(pc, pd) {
        Ok(()) => NGX_OK as ngx_int_t,
        Err(()) => NGX_BUSY as ngx_int_t,
    }
}

fn pick(pc: &mut ngx_peer_connection_t, pd: &mut PeerData) -> Result<(), ()> {
    // SAFETY: the upstream conf outlives every session of its cycle.
    let up = unsafe { &*pd.upstream };
    let mut local = up.local.try_borrow_mut().map_err(|_| ())?;
    if local.generation != pd.generation {
        // The set changed under a retrying connection: indices moved.
        pd.clear_tried();
        pd.generation = local.generation;
    }
    let peers = local.view.peers().len();
    let index = local
        .view
        .select(|i| pd.is_tried(i), ffi::current_msec())
        .ok_or(())?;
    pd.set_tried(index, peers);
    pd.current = index;
    pd.current_addr = local.view.peers().get(index).map(|p| p.addr);
    let ep = local.endpoints.get(index).ok_or(())?;

    // The address and name must outlive a later set change ($upstream_addr is
    // read when the session is logged) and a retry (nginx keeps each try's name):
    // copy them into the session's pool, in one allocation.
    let text = ep.text();
    let sa_at = size_of::<ngx_str_t>();
    let text_at = sa_at + size_of::<SockaddrBuf>();
    // SAFETY: one aligned pool block of text_at + text.len() bytes: the ngx_str_t
    // at its start, the sockaddr at an 8-byte boundary after it, then the text.
    unsafe {
        let mem = ngx_palloc(pd.pool, text_at + text.len()) as *mut u8;
        if mem.is_null() {
            return Err(());
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
    Ok(())
}

/// `peer.free`: records success or failure of the peer just used.
unsafe extern "C" fn free_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    state: ngx_uint_t,
) {
    // SAFETY: as in get_peer.
    let (pc, pd) = (&mut *pc, &mut *(data as *mut PeerData));
    release(pd, state & NGX_PEER_FAILED as ngx_uint_t != 0);
    if pc.tries > 0 {
        pc.tries -= 1;
    }
}

fn release(pd: &mut PeerData, failed: bool) {
    let Some(addr) = pd.current_addr.take() else {
        return;
    };
    // SAFETY: the upstream conf outlives every session of its cycle.
    let up = unsafe { &*pd.upstream };
    if let Ok(mut local) = up.local.try_borrow_mut() {
        local
            .view
            .release(pd.current, &addr, failed, ffi::current_msec());
    }
    pd.current = usize::MAX;
}

#[cfg(ngx_feature = "stream_ssl")]
unsafe extern "C" fn set_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) -> ngx_int_t {
    // No TLS session cache for discovered peers: every handshake is full.
    NGX_OK as ngx_int_t
}

#[cfg(ngx_feature = "stream_ssl")]
unsafe extern "C" fn save_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) {}
