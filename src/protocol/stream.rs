//! `stream { upstream {} }`: nginx's stream types and functions behind
//! [`Protocol`].

use std::ffi::c_void;
use std::mem::size_of;
use std::ptr::{self, NonNull};

use ngx::core::Pool;
use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_log_t, ngx_module_t, ngx_pcalloc, ngx_pool_t, ngx_shm_zone_t,
    ngx_str_t, ngx_stream_compile_complex_value, ngx_stream_compile_complex_value_t,
    ngx_stream_complex_value, ngx_stream_complex_value_t, ngx_stream_session_t,
    ngx_stream_upstream_init_round_robin, ngx_stream_upstream_init_round_robin_peer,
    ngx_stream_upstream_main_conf_t, ngx_stream_upstream_rr_peer_data_t,
    ngx_stream_upstream_rr_peers_t, ngx_stream_upstream_server_t, ngx_stream_upstream_srv_conf_t,
    ngx_uint_t, NGX_OK, NGX_STREAM_MODULE, NGX_STREAM_UPSTREAM_BACKUP,
};
use ngx::log::DebugMask;

use consul_core::key::ProtocolKind;
use consul_core::method::hash64;

use super::{block_fields, InitPeer, InitUpstream, Key, Protocol};
use crate::block::Block;
use crate::ffi::stream_conf::{NgxStreamUpstreamModule, StreamModuleMainConf, StreamModuleSrvConf};

/// The stream side.
pub struct Stream;

/// This library's stream module and its conf of a block.
pub struct StreamConsulModule;

// SAFETY: the module's create_srv_conf makes a Block<Stream> (crate::conf).
unsafe impl StreamModuleSrvConf for StreamConsulModule {
    type SrvConf = Block<Stream>;

    fn module() -> &'static ngx_module_t {
        // SAFETY: the module's own static; nginx writes its indexes while loading
        // the configuration, before any of the module's code runs.
        unsafe { &*ptr::addr_of!(crate::ngx_stream_consul_upstream_module) }
    }
}

impl Stream {
    fn upstream_main_conf(cf: &ngx_conf_t) -> Option<&'static ngx_stream_upstream_main_conf_t> {
        NgxStreamUpstreamModule::main_conf(cf)
    }

    fn shm_zone(u: &ngx_stream_upstream_srv_conf_t) -> *mut ngx_shm_zone_t {
        u.shm_zone
    }
}

crate::balancer::entry_points!(Stream);

impl Protocol for Stream {
    const KIND: ProtocolKind = ProtocolKind::Stream;
    const DEBUG: DebugMask = DebugMask::Stream;
    const MODULE_TYPE: ngx_uint_t = NGX_STREAM_MODULE as ngx_uint_t;
    const BACKUP: ngx_uint_t = NGX_STREAM_UPSTREAM_BACKUP as ngx_uint_t;
    /// `NGX_STREAM_UPSTREAM_NOTIFY_CONNECT` (nginx 1.25+; older ones never notify).
    const NOTIFY_CONNECT: Option<ngx_uint_t> = Some(1);
    const UPSTREAM_MODULE: &'static str = "ngx_stream_upstream_module";
    const ZONE_MODULE: &'static str = "ngx_stream_upstream_zone_module";
    const METHODS: &'static [(&'static str, &'static str)] = &[
        ("least_conn", "ngx_stream_upstream_least_conn_module"),
        ("hash", "ngx_stream_upstream_hash_module"),
        ("random", "ngx_stream_upstream_random_module"),
    ];
    const FOREIGN: &'static [(&'static str, &'static str)] = &[
        ("least_time", "ngx_stream_upstream_least_time_module"),
        ("balancer_by_lua_block", "ngx_stream_lua_module"),
        ("balancer_by_lua_file", "ngx_stream_lua_module"),
    ];

    type Uscf = ngx_stream_upstream_srv_conf_t;
    type Server = ngx_stream_upstream_server_t;
    type Session = ngx_stream_session_t;
    type RrData = ngx_stream_upstream_rr_peer_data_t;
    type Complex = ngx_stream_complex_value_t;

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
        NgxStreamUpstreamModule::server_conf_mut(cf)
    }

    fn block(uscf: &Self::Uscf) -> Option<&'static mut Block<Self>> {
        StreamConsulModule::server_conf_mut(uscf)
    }

    block_fields!();

    unsafe fn init_round_robin(cf: *mut ngx_conf_t, us: *mut Self::Uscf) -> ngx_int_t {
        // SAFETY: per the contract.
        unsafe { ngx_stream_upstream_init_round_robin(cf, us) }
    }

    unsafe fn init_round_robin_peer(s: *mut Self::Session, us: *mut Self::Uscf) -> ngx_int_t {
        // SAFETY: per the contract.
        unsafe { ngx_stream_upstream_init_round_robin_peer(s, us) }
    }

    fn empty_rr_peers(pool: *mut ngx_pool_t, host: *mut ngx_str_t) -> *mut c_void {
        // SAFETY: the configuration's pool lives as long as the cycle.
        let peers = unsafe { ngx_pcalloc(pool, size_of::<ngx_stream_upstream_rr_peers_t>()) }
            as *mut ngx_stream_upstream_rr_peers_t;
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
        let mut ccv: ngx_stream_compile_complex_value_t = unsafe { std::mem::zeroed() };
        ccv.cf = cf;
        ccv.value = value;
        ccv.complex_value = cv.as_ptr();
        // SAFETY: a complete compile request for the configuration being parsed.
        if unsafe { ngx_stream_compile_complex_value(&mut ccv) } != NGX_OK as ngx_int_t {
            return Err("invalid hash key".into());
        }
        Ok(cv)
    }

    fn key_hash(s: &mut Self::Session, key: Key<Self>) -> Option<u64> {
        let Key::Complex(cv) = key else {
            return None;
        };
        let mut value = ngx_str_t::default();
        // SAFETY: a key compiled for this configuration, evaluated in a live session.
        if unsafe { ngx_stream_complex_value(s, cv.as_ptr(), &mut value) } != NGX_OK as ngx_int_t {
            return None;
        }
        let bytes = value.as_bytes();
        (!bytes.is_empty()).then(|| hash64(bytes, 0))
    }

    fn pool(s: &Self::Session) -> *mut ngx_pool_t {
        // SAFETY: a session's connection lives as long as the session.
        unsafe { (*s.connection).pool }
    }

    fn log(s: &Self::Session) -> *mut ngx_log_t {
        // SAFETY: as above.
        unsafe { (*s.connection).log }
    }
}
