//! `http { upstream {} }`: nginx's http types and functions behind [`Protocol`],
//! its configuration through ngx's own typed access (`HttpModule*Conf`).

use std::ffi::c_void;
use std::mem::size_of;
use std::ptr::{self, NonNull};

use ngx::core::Pool;
use ngx::ffi::{
    ngx_conf_t, ngx_http_compile_complex_value, ngx_http_compile_complex_value_t,
    ngx_http_complex_value, ngx_http_complex_value_t, ngx_http_request_t,
    ngx_http_upstream_init_round_robin, ngx_http_upstream_init_round_robin_peer,
    ngx_http_upstream_main_conf_t, ngx_http_upstream_rr_peer_data_t, ngx_http_upstream_rr_peers_t,
    ngx_http_upstream_server_t, ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_log_t, ngx_module_t,
    ngx_pcalloc, ngx_pool_t, ngx_shm_zone_t, ngx_str_t, ngx_uint_t, NGX_HTTP_MODULE,
    NGX_HTTP_UPSTREAM_BACKUP, NGX_OK,
};
use ngx::http::{HttpModule, HttpModuleMainConf, HttpModuleServerConf, NgxHttpUpstreamModule};
use ngx::log::DebugMask;

use consul_core::key::ProtocolKind;
use consul_core::method::hash64;

use super::{block_fields, InitPeer, InitUpstream, Key, Protocol};
use crate::block::Block;

/// The http side.
pub struct Http;

/// This library's http module and its conf of a block.
pub struct HttpConsulModule;

impl HttpModule for HttpConsulModule {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module's own static; nginx writes its indexes while loading
        // the configuration, before any of the module's code runs.
        unsafe { &*ptr::addr_of!(crate::ngx_http_consul_upstream_module) }
    }
}

// SAFETY: the module's create_srv_conf makes a Block<Http> (crate::conf).
unsafe impl HttpModuleServerConf for HttpConsulModule {
    type ServerConf = Block<Http>;
}

impl Http {
    fn upstream_main_conf(cf: &ngx_conf_t) -> Option<&'static ngx_http_upstream_main_conf_t> {
        NgxHttpUpstreamModule::main_conf(cf)
    }

    #[cfg(ngx_feature = "http_upstream_zone")]
    fn shm_zone(u: &ngx_http_upstream_srv_conf_t) -> *mut ngx_shm_zone_t {
        u.shm_zone
    }

    /// nginx built without the upstream zone module: no `zone` line.
    #[cfg(not(ngx_feature = "http_upstream_zone"))]
    fn shm_zone(_u: &ngx_http_upstream_srv_conf_t) -> *mut ngx_shm_zone_t {
        ptr::null_mut()
    }
}

crate::balancer::entry_points!(Http);

/// The hash of what `ip_hash` hashes of a client's address, as nginx's
/// ip_hash module reads it: the first three bytes of an IPv4 address (its
/// /24), the whole of an IPv6 one, three zero bytes for anything else (a unix
/// socket).
fn client_addr_hash(sa: *const libc::sockaddr) -> u64 {
    // SAFETY: null, or the connection's address, whose family says its type.
    match unsafe { sa.as_ref() }.map(|a| i32::from(a.sa_family)) {
        Some(libc::AF_INET) => {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            hash64(&sin.sin_addr.s_addr.to_ne_bytes()[..3], 0)
        }
        Some(libc::AF_INET6) => {
            // SAFETY: an AF_INET6 address is a sockaddr_in6.
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            hash64(&sin6.sin6_addr.s6_addr, 0)
        }
        _ => hash64(&[0; 3], 0),
    }
}

impl Protocol for Http {
    const KIND: ProtocolKind = ProtocolKind::Http;
    const DEBUG: DebugMask = DebugMask::Http;
    const MODULE_TYPE: ngx_uint_t = NGX_HTTP_MODULE as ngx_uint_t;
    const BACKUP: ngx_uint_t = NGX_HTTP_UPSTREAM_BACKUP as ngx_uint_t;
    /// http notifies a response header (nginx ≥ 1.29.6, for `sticky`), never
    /// a connection.
    const NOTIFY_CONNECT: Option<ngx_uint_t> = None;
    const UPSTREAM_MODULE: &'static str = "ngx_http_upstream_module";
    const ZONE_MODULE: &'static str = "ngx_http_upstream_zone_module";
    const METHODS: &'static [(&'static str, &'static str)] = &[
        ("least_conn", "ngx_http_upstream_least_conn_module"),
        ("hash", "ngx_http_upstream_hash_module"),
        ("ip_hash", "ngx_http_upstream_ip_hash_module"),
        ("random", "ngx_http_upstream_random_module"),
    ];
    const FOREIGN: &'static [(&'static str, &'static str)] = &[
        ("sticky", "ngx_http_upstream_sticky_module"),
        ("least_time", "ngx_http_upstream_least_time_module"),
        ("balancer_by_lua_block", "ngx_http_lua_module"),
        ("balancer_by_lua_file", "ngx_http_lua_module"),
    ];

    type Uscf = ngx_http_upstream_srv_conf_t;
    type Server = ngx_http_upstream_server_t;
    type Session = ngx_http_request_t;
    type RrData = ngx_http_upstream_rr_peer_data_t;
    type Complex = ngx_http_complex_value_t;

    fn init_upstream() -> InitUpstream<Self> {
        entry::init_upstream
    }

    fn init_peer() -> InitPeer<Self> {
        entry::init_peer
    }

    fn below_keepalive() -> InitUpstream<Self> {
        entry::below_keepalive
    }

    fn block_uscf(cf: &ngx_conf_t) -> Option<&'static mut Self::Uscf> {
        NgxHttpUpstreamModule::server_conf_mut(cf)
    }

    fn block(uscf: &Self::Uscf) -> Option<&'static mut Block<Self>> {
        HttpConsulModule::server_conf_mut(uscf)
    }

    block_fields!();

    unsafe fn init_round_robin(cf: *mut ngx_conf_t, us: *mut Self::Uscf) -> ngx_int_t {
        // SAFETY: per the contract.
        unsafe { ngx_http_upstream_init_round_robin(cf, us) }
    }

    unsafe fn init_round_robin_peer(s: *mut Self::Session, us: *mut Self::Uscf) -> ngx_int_t {
        // SAFETY: per the contract.
        unsafe { ngx_http_upstream_init_round_robin_peer(s, us) }
    }

    fn empty_rr_peers(pool: *mut ngx_pool_t, host: *mut ngx_str_t) -> *mut c_void {
        // SAFETY: the configuration's pool lives as long as the cycle.
        let peers = unsafe { ngx_pcalloc(pool, size_of::<ngx_http_upstream_rr_peers_t>()) }
            as *mut ngx_http_upstream_rr_peers_t;
        // SAFETY: null, or zeroed memory for one peers list.
        if let Some(p) = unsafe { peers.as_mut() } {
            p.name = host;
        }
        peers.cast()
    }

    fn compile_key(cf: &mut ngx_conf_t, word: usize) -> Result<NonNull<Self::Complex>, String> {
        // SAFETY: the configuration's pool lives as long as the cycle.
        let pool = unsafe { Pool::from_ngx_pool(cf.pool) };
        let cv = NonNull::new(pool.calloc(size_of::<Self::Complex>()) as *mut Self::Complex)
            .ok_or("out of memory")?;
        // SAFETY: cf.args holds the directive's words.
        let value = unsafe { (*cf.args).as_slice_mut::<ngx_str_t>() }
            .get_mut(word)
            .ok_or("no key")? as *mut ngx_str_t;
        // SAFETY: all-zero is nginx's initial state for this struct.
        let mut ccv: ngx_http_compile_complex_value_t = unsafe { std::mem::zeroed() };
        ccv.cf = cf;
        ccv.value = value;
        ccv.complex_value = cv.as_ptr();
        // SAFETY: a complete compile request for the configuration being parsed.
        if unsafe { ngx_http_compile_complex_value(&mut ccv) } != NGX_OK as ngx_int_t {
            return Err("invalid hash key".into());
        }
        Ok(cv)
    }

    fn key_hash(r: &mut Self::Session, key: Key<Self>) -> Option<u64> {
        match key {
            Key::Complex(cv) => {
                let mut value = ngx_str_t::default();
                // SAFETY: a key compiled for this configuration, evaluated in a
                // live request.
                if unsafe { ngx_http_complex_value(r, cv.as_ptr(), &mut value) }
                    != NGX_OK as ngx_int_t
                {
                    return None;
                }
                let bytes = value.as_bytes();
                (!bytes.is_empty()).then(|| hash64(bytes, 0))
            }
            Key::ClientAddr => {
                // SAFETY: a live request's connection and its address (after
                // realip, the client's).
                let sa = unsafe { (*r.connection).sockaddr } as *const libc::sockaddr;
                Some(client_addr_hash(sa))
            }
        }
    }

    fn pool(r: &Self::Session) -> *mut ngx_pool_t {
        r.pool
    }

    fn log(r: &Self::Session) -> *mut ngx_log_t {
        // SAFETY: a live request's connection.
        unsafe { (*r.connection).log }
    }
}
