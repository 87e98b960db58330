//! What one session or request carries through its tries: round robin's data
//! for the static servers (first: its callbacks take it as theirs), where the
//! current try's peer came from, and which discovered peers it tried.

use std::ffi::c_void;
use std::ptr;

use ngx::ffi::{ngx_int_t, ngx_pcalloc, ngx_peer_connection_t, ngx_pool_t, ngx_str_t, ngx_uint_t};

use consul_core::view::{HealthPolicy, SlotRef};

use crate::protocol::Protocol;
use crate::upstream::Upstream;

type GetPeer = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void) -> ngx_int_t;
type FreePeer = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void, ngx_uint_t);
type NotifyPeer = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void, ngx_uint_t);
#[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
type SetSession = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void) -> ngx_int_t;
#[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
type SaveSession = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void);

/// nginx's round-robin callbacks for the static servers of one session,
/// taken from the peer connection after round robin's `init_peer` (never named:
/// the session ones exist only in TLS builds).
#[derive(Clone, Copy)]
pub struct RoundRobin {
    pub get: Option<GetPeer>,
    pub free: Option<FreePeer>,
    pub notify: Option<NotifyPeer>,
    #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
    pub set_session: Option<SetSession>,
    #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
    pub save_session: Option<SaveSession>,
}

impl RoundRobin {
    /// The callbacks round robin's `init_peer` just installed on `pc`.
    pub fn installed(pc: &ngx_peer_connection_t) -> RoundRobin {
        RoundRobin {
            get: pc.get,
            free: pc.free,
            notify: pc.notify,
            #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
            set_session: pc.set_session,
            #[cfg(any(ngx_feature = "ssl", ngx_feature = "compat"))]
            save_session: pc.save_session,
        }
    }
}

/// Where the peer of the current try came from.
#[derive(Clone, Copy)]
pub enum Current {
    None,
    Discovered(SlotRef<'static>),
    Static,
}

/// The discovered peers a session tried, by zone slot number: a peer keeps
/// its slot while it stays in the set, so what was tried stays tried when the
/// worker takes a new set between two tries. The first 64 slots inline, the
/// others in words allocated once, when first needed, for the zone's capacity
/// (which bounds every slot number).
pub struct Tried {
    inline: u64,
    more: *mut u64,
    words: usize,
}

impl Tried {
    pub const fn new() -> Tried {
        Tried {
            inline: 0,
            more: ptr::null_mut(),
            words: 0,
        }
    }

    pub fn is_set(&self, slot: usize) -> bool {
        if slot < 64 {
            return self.inline & (1 << slot) != 0;
        }
        let w = slot / 64 - 1;
        // SAFETY: more holds `words` words when w < words.
        w < self.words && unsafe { *self.more.add(w) } & (1 << (slot % 64)) != 0
    }

    /// Marks `slot` tried; false when the words for it cannot be allocated
    /// from `pool` (room for `capacity` slots).
    pub fn set(&mut self, slot: usize, pool: *mut ngx_pool_t, capacity: usize) -> bool {
        if slot < 64 {
            self.inline |= 1 << slot;
            return true;
        }
        let w = slot / 64 - 1;
        if self.more.is_null() {
            let words = capacity.max(slot + 1).saturating_sub(64).div_ceil(64);
            // SAFETY: the pool outlives the session's balancer state.
            let mem = unsafe { ngx_pcalloc(pool, words * 8) } as *mut u64;
            if mem.is_null() {
                return false;
            }
            self.more = mem;
            self.words = words;
        }
        if w >= self.words {
            return false;
        }
        // SAFETY: w is within the allocated words.
        unsafe { *self.more.add(w) |= 1 << (slot % 64) };
        true
    }

    /// Whether any peer was tried.
    pub fn any(&self) -> bool {
        // SAFETY: more holds `words` words when non-null.
        self.inline != 0
            || (!self.more.is_null() && (0..self.words).any(|w| unsafe { *self.more.add(w) } != 0))
    }
}

/// Per-session balancer state, in the session's or request's pool (plain
/// data, no drop).
#[repr(C)]
pub struct PeerData<P: Protocol> {
    /// Round robin's data for the static servers. First: its callbacks take
    /// `peer.data` as theirs (as nginx's hash module arranges it too).
    pub rr: P::RrData,
    /// Round robin's callbacks, when the block has static servers.
    pub static_servers: Option<RoundRobin>,
    pub upstream: *const Upstream,
    /// The upstream block's name (its `host`): `pc.name` whenever no peer is
    /// picked, as nginx's round robin sets it.
    pub upstream_name: *mut ngx_str_t,
    pub pool: *mut ngx_pool_t,
    /// The zone's capacity: every slot number is below it.
    pub capacity: usize,
    pub health: HealthPolicy,
    /// The hash key's hash (hash methods; `None` for an empty key).
    pub key_hash: Option<u64>,
    pub current: Current,
    pub tried: Tried,
    /// The last discovered peer released is still usable (not down): a retry
    /// then leaves the round-robin turn to the peer that stands in.
    pub released_usable: bool,
}

impl<P: Protocol> PeerData<P> {
    /// A new session's state in `pool` (round robin's data zeroed until its
    /// `init_peer` fills it); null when out of memory.
    pub fn alloc(pool: *mut ngx_pool_t, init: PeerDataInit) -> *mut PeerData<P> {
        // SAFETY: the pool outlives the session's balancer state.
        let pd =
            unsafe { ngx_pcalloc(pool, std::mem::size_of::<PeerData<P>>()) } as *mut PeerData<P>;
        if pd.is_null() {
            return pd;
        }
        // SAFETY: pd is fresh, aligned, zeroed pool memory for one PeerData;
        // `rr` stays zeroed (nginx's own initial state for it), the other
        // fields are written whole.
        unsafe {
            ptr::addr_of_mut!((*pd).static_servers).write(None);
            ptr::addr_of_mut!((*pd).upstream).write(init.upstream);
            ptr::addr_of_mut!((*pd).upstream_name).write(init.upstream_name);
            ptr::addr_of_mut!((*pd).pool).write(pool);
            ptr::addr_of_mut!((*pd).capacity).write(init.capacity);
            ptr::addr_of_mut!((*pd).health).write(init.health);
            ptr::addr_of_mut!((*pd).key_hash).write(init.key_hash);
            ptr::addr_of_mut!((*pd).current).write(Current::None);
            ptr::addr_of_mut!((*pd).tried).write(Tried::new());
            ptr::addr_of_mut!((*pd).released_usable).write(false);
        }
        pd
    }

    /// `peer.data` for round robin's own callbacks.
    pub fn rr_data(&mut self) -> *mut c_void {
        ptr::addr_of_mut!(self.rr) as *mut c_void
    }
}

/// What a new session's [`PeerData`] starts with.
pub struct PeerDataInit {
    pub upstream: *const Upstream,
    pub upstream_name: *mut ngx_str_t,
    pub capacity: usize,
    pub health: HealthPolicy,
    pub key_hash: Option<u64>,
}
