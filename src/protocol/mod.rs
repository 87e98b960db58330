//! What differs between a `stream { upstream {} }` and an `http { upstream {} }`
//! block, behind one trait: nginx's types (block conf, server, session or
//! request, round-robin data, complex values), its round-robin functions, the
//! modules that own the directives handed on, and how a session's key is read.
//! The balancer ([`crate::balancer`]) and the directives ([`crate::conf`]) are
//! written once over it; [`stream::Stream`] and [`http::Http`] implement it.
//!
//! nginx's C structs of the two protocols share their field names: one macro
//! ([`block_fields!`]) writes both implementations' field access.

use std::ffi::c_void;
use std::ptr::NonNull;

use ngx::ffi::{
    ngx_array_t, ngx_conf_t, ngx_int_t, ngx_log_t, ngx_peer_connection_t, ngx_pool_t,
    ngx_shm_zone_t, ngx_str_t, ngx_uint_t,
};
use ngx::log::DebugMask;

use consul_core::key::ProtocolKind;

use crate::block::Block;

pub mod http;
pub mod stream;

pub use http::Http;
pub use stream::Stream;

/// `peer.init_upstream` of a block of protocol `P`.
pub type InitUpstream<P> =
    unsafe extern "C" fn(*mut ngx_conf_t, *mut <P as Protocol>::Uscf) -> ngx_int_t;

/// `peer.init` of a block of protocol `P`, once per session or request.
pub type InitPeer<P> =
    unsafe extern "C" fn(*mut <P as Protocol>::Session, *mut <P as Protocol>::Uscf) -> ngx_int_t;

/// What a hash method hashes, read per session or request.
pub enum Key<P: Protocol> {
    /// `hash KEY`: the key compiled in the configuration's pool.
    Complex(NonNull<P::Complex>),
    /// `ip_hash`: the client's address (IPv4: its /24; IPv6: all of it).
    ClientAddr,
}

impl<P: Protocol> Clone for Key<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P: Protocol> Copy for Key<P> {}

/// An upstream block's fields that the balancer and the directives use, borrowed
/// at once (see [`block_fields!`]).
pub struct Hooks<'a, P: Protocol> {
    pub init_upstream: &'a mut Option<InitUpstream<P>>,
    pub init: &'a mut Option<InitPeer<P>>,
    pub data: &'a mut *mut c_void,
    pub flags: &'a mut ngx_uint_t,
    pub host: &'a mut ngx_str_t,
    pub servers: *mut ngx_array_t,
    /// nginx's `zone` of the block (null without one, or without the zone module).
    pub shm_zone: *mut ngx_shm_zone_t,
}

/// One protocol's side of nginx's upstream API.
pub trait Protocol: Sized + 'static {
    const KIND: ProtocolKind;
    /// The debug log mask of its sessions.
    const DEBUG: DebugMask;
    /// NGX_STREAM_MODULE or NGX_HTTP_MODULE.
    const MODULE_TYPE: ngx_uint_t;
    /// `NGX_*_UPSTREAM_BACKUP`: the block takes `backup` servers.
    const BACKUP: ngx_uint_t;
    /// The `notify` kind that says a connection to the peer is established
    /// (stream's CONNECT); `None` where notify means something else (http's
    /// HEADER, nginx ≥ 1.29.6: for `sticky`).
    const NOTIFY_CONNECT: Option<ngx_uint_t>;
    /// nginx's module that owns `server` in `upstream {}`.
    const UPSTREAM_MODULE: &'static str;
    /// nginx's module that owns `zone` in `upstream {}`.
    const ZONE_MODULE: &'static str;
    /// nginx's balancing directives this module sees first, and their modules.
    const METHODS: &'static [(&'static str, &'static str)];
    /// Other balancers' directives, refused beside `consul_upstream`, and their
    /// modules (see `crate::conf::chain`).
    const FOREIGN: &'static [(&'static str, &'static str)];

    /// `ngx_*_upstream_srv_conf_t`.
    type Uscf: 'static;
    /// `ngx_*_upstream_server_t`.
    type Server: 'static;
    /// `ngx_stream_session_t` or `ngx_http_request_t`.
    type Session;
    /// `ngx_*_upstream_rr_peer_data_t`.
    type RrData: 'static;
    /// `ngx_*_complex_value_t`.
    type Complex: 'static;

    /// The `init_upstream` entry point of this protocol (see [`crate::balancer`]).
    fn init_upstream() -> InitUpstream<Self>;
    /// The `init` entry point, once per session or request.
    fn init_peer() -> InitPeer<Self>;
    /// What `keepalive` is given as the balancer below it (see
    /// [`crate::conf::chain`]).
    fn below_keepalive() -> InitUpstream<Self>;

    /// The upstream block being parsed.
    fn block_uscf(cf: &ngx_conf_t) -> Option<&'static mut Self::Uscf>;
    /// This module's conf of an upstream block (none for an implicit upstream).
    fn block(uscf: &Self::Uscf) -> Option<&'static mut Block<Self>>;
    /// Every upstream block of the configuration being parsed, explicit and
    /// implicit, in the order of the upstream module's list.
    fn upstreams(cf: &ngx_conf_t) -> &'static [*mut Self::Uscf];
    /// The block's fields, borrowed at once.
    fn hooks(uscf: &mut Self::Uscf) -> Hooks<'_, Self>;
    /// The block's `server` list.
    fn servers(uscf: &mut Self::Uscf) -> Option<&mut [Self::Server]>;
    fn server_name(server: &Self::Server) -> &ngx_str_t;
    fn server_backup(server: &Self::Server) -> bool;
    fn set_server_backup(server: &mut Self::Server, backup: bool);
    /// Fills a zeroed server: `name`, one address, weight 1.
    fn init_server(server: &mut Self::Server, name: ngx_str_t, addr: *mut ngx::ffi::ngx_addr_t);

    /// `ngx_*_upstream_init_round_robin`.
    ///
    /// # Safety
    /// A complete upstream block conf in the configuration being initialized.
    unsafe fn init_round_robin(cf: *mut ngx_conf_t, us: *mut Self::Uscf) -> ngx_int_t;
    /// `ngx_*_upstream_init_round_robin_peer`.
    ///
    /// # Safety
    /// A live session or request with its upstream, and its block's conf.
    unsafe fn init_round_robin_peer(s: *mut Self::Session, us: *mut Self::Uscf) -> ngx_int_t;
    /// An empty round-robin peer list named after the block (`zone` in a block
    /// with no static server), in `pool`; null when out of memory.
    fn empty_rr_peers(pool: *mut ngx_pool_t, host: *mut ngx_str_t) -> *mut c_void;

    /// Compiles `hash`'s key, the directive's word `word`, in the configuration's pool.
    fn compile_key(cf: &mut ngx_conf_t, word: usize) -> Result<NonNull<Self::Complex>, String>;
    /// The hash of the session's key: `None` for an empty key (round robin then,
    /// as nginx's hash methods do).
    fn key_hash(s: &mut Self::Session, key: Key<Self>) -> Option<u64>;

    /// The session's connection to its upstream.
    fn peer_connection(s: &mut Self::Session) -> Option<&mut ngx_peer_connection_t>;
    /// The pool that lives as long as the session or request.
    fn pool(s: &Self::Session) -> *mut ngx_pool_t;
    /// The session's or request's log.
    fn log(s: &Self::Session) -> *mut ngx_log_t;
}

/// The field access of [`Protocol`] that reads the same in both protocols'
/// structs: expanded inside each `impl Protocol`.
macro_rules! block_fields {
    () => {
        fn hooks(u: &mut Self::Uscf) -> $crate::protocol::Hooks<'_, Self> {
            let shm_zone = Self::shm_zone(u);
            $crate::protocol::Hooks {
                init_upstream: &mut u.peer.init_upstream,
                init: &mut u.peer.init,
                data: &mut u.peer.data,
                flags: &mut u.flags,
                host: &mut u.host,
                servers: u.servers,
                shm_zone,
            }
        }

        fn servers(u: &mut Self::Uscf) -> Option<&mut [Self::Server]> {
            // SAFETY: null, or the block's server array, which holds its
            // protocol's servers.
            unsafe { u.servers.as_mut().map(|a| a.as_slice_mut::<Self::Server>()) }
        }

        fn server_name(s: &Self::Server) -> &ngx::ffi::ngx_str_t {
            &s.name
        }

        fn server_backup(s: &Self::Server) -> bool {
            s.backup() != 0
        }

        fn set_server_backup(s: &mut Self::Server, backup: bool) {
            s.set_backup(u32::from(backup));
        }

        fn init_server(
            s: &mut Self::Server,
            name: ngx::ffi::ngx_str_t,
            addr: *mut ngx::ffi::ngx_addr_t,
        ) {
            s.name = name;
            s.addrs = addr;
            s.naddrs = 1;
            s.weight = 1;
        }

        fn peer_connection(s: &mut Self::Session) -> Option<&mut ngx::ffi::ngx_peer_connection_t> {
            // SAFETY: null, or the session's live upstream.
            unsafe { s.upstream.as_mut() }.map(|u| &mut u.peer)
        }

        fn upstreams(cf: &ngx::ffi::ngx_conf_t) -> &'static [*mut Self::Uscf] {
            match Self::upstream_main_conf(cf) {
                // SAFETY: the upstream module's list of block confs.
                Some(umcf) => unsafe { umcf.upstreams.as_slice::<*mut Self::Uscf>() },
                None => &[],
            }
        }
    };
}

pub(crate) use block_fields;
