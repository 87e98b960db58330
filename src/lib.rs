//! ngx_stream_consul_upstream_module: TCP load balancing across backends
//! discovered from Consul's DNS interface.
//!
//! - [`upstream`]: the types every part shares (an upstream, its lines, a
//!   worker's copy of its set) and the placeholder server;
//! - [`conf`]: the `consul_upstream` directive and the checks of `stream {}`;
//! - [`zone`]: each upstream's shared-memory zone (layout in `consul_core::zone`);
//! - [`discovery`] and [`resolve`]: worker 0's loops and lookups; [`dns_client`]:
//!   their DNS queries, one TCP connection per resolver;
//! - [`api`]: `api=` lines, Consul's HTTP API with blocking queries;
//! - [`prefill`] and [`sync_resolve`]: the master fills the zones before it forks
//!   workers (state file, one bounded lookup);
//! - [`runtime`]: hickory's runtime on nginx's event loop (no thread);
//! - [`balancer`]: the per-connection peer callbacks;
//! - [`status`]: the library's http module, `consul_upstream_status` (JSON and
//!   Prometheus text of what the balancer sees);
//! - [`tls`]: TLS sessions to discovered peers, per worker;
//! - [`listening`], [`sockaddr`]: nginx's own addresses, socket addresses in C form;
//! - [`ffi`]: nginx's stream C macros, written out.

#![deny(unsafe_op_in_unsafe_fn)]

use std::ffi::c_void;
use std::ptr;

use ngx::ffi::{
    ngx_command_t, ngx_http_module_t, ngx_module_t, ngx_stream_module_t, ngx_uint_t,
    NGX_CONF_1MORE, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE12, NGX_HTTP_LOC_CONF,
    NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MODULE, NGX_STREAM_MODULE, NGX_STREAM_SRV_CONF_OFFSET,
    NGX_STREAM_UPS_CONF,
};

mod api;
mod balancer;
mod conf;
mod discovery;
mod dns_client;
mod fault;
mod ffi;
mod listening;
mod log;
mod methods;
mod prefill;
mod resolve;
mod runtime;
mod sockaddr;
mod status;
mod sync_resolve;
mod sync_socket;
#[cfg(ngx_feature = "ssl")]
mod tls;
mod upstream;
mod zone;

static mut CTX: ngx_stream_module_t = ngx_stream_module_t {
    preconfiguration: None,
    postconfiguration: Some(conf::postconfiguration),
    create_main_conf: Some(conf::create_main_conf),
    init_main_conf: None,
    create_srv_conf: Some(conf::create_srv_conf),
    merge_srv_conf: None,
};

/// `consul_upstream`, and nginx's own directives that this module sees first
/// and hands on: the balancing methods and `server` (see [`methods`]), `zone`
/// (see [`zone`]).
static mut COMMANDS: [ngx_command_t; 7] = [
    ngx_command_t {
        name: ngx::ngx_string!("consul_upstream"),
        type_: (NGX_STREAM_UPS_CONF | NGX_CONF_1MORE) as ngx_uint_t,
        set: Some(conf::consul_upstream),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx::ngx_string!("least_conn"),
        type_: (NGX_STREAM_UPS_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(methods::directive),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx::ngx_string!("hash"),
        type_: (NGX_STREAM_UPS_CONF | NGX_CONF_TAKE12) as ngx_uint_t,
        set: Some(methods::directive),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx::ngx_string!("random"),
        type_: (NGX_STREAM_UPS_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE12) as ngx_uint_t,
        set: Some(methods::directive),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx::ngx_string!("server"),
        type_: (NGX_STREAM_UPS_CONF | NGX_CONF_1MORE) as ngx_uint_t,
        set: Some(methods::server),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx::ngx_string!("zone"),
        type_: (NGX_STREAM_UPS_CONF | NGX_CONF_TAKE12) as ngx_uint_t,
        set: Some(zone::zone_directive),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_stream_consul_upstream_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of_mut!(CTX) as *mut c_void,
    commands: ptr::addr_of_mut!(COMMANDS) as *mut ngx_command_t,
    type_: NGX_STREAM_MODULE as ngx_uint_t,
    init_module: Some(prefill::init_module),
    init_process: Some(discovery::init_process),
    exit_process: Some(discovery::exit_process),
    ..ngx_module_t::default()
};

// The http module: only a directive. No confs, no phase handler, nothing at
// process start: an nginx without `consul_upstream_status` runs none of it.
static mut HTTP_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: None,
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: None,
    merge_loc_conf: None,
};

static mut HTTP_COMMANDS: [ngx_command_t; 2] = [
    ngx_command_t {
        name: ngx::ngx_string!("consul_upstream_status"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(status::consul_upstream_status),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_consul_upstream_status_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of_mut!(HTTP_CTX) as *mut c_void,
    commands: ptr::addr_of_mut!(HTTP_COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

/// What nginx reads from a dynamic module's file: its modules (one `load_module`
/// line loads both), their names, and where they go among the others. The
/// stream module goes before nginx's upstream module and its balancer and zone
/// modules, so that their directives reach it first (see [`methods`]); the
/// http module goes last, as usual.
/// Written out: ngx 0.5.1's `ngx_modules!` takes one module and no order.
#[cfg(feature = "export-modules")]
#[allow(non_upper_case_globals)]
mod exports {
    use std::ffi::c_char;
    use std::ptr;

    use ngx::ffi::ngx_module_t;

    #[no_mangle]
    pub static mut ngx_modules: [*const ngx_module_t; 3] = [
        ptr::addr_of!(crate::ngx_stream_consul_upstream_module),
        ptr::addr_of!(crate::ngx_http_consul_upstream_status_module),
        ptr::null(),
    ];

    #[no_mangle]
    pub static mut ngx_module_names: [*const c_char; 3] = [
        c"ngx_stream_consul_upstream_module".as_ptr(),
        c"ngx_http_consul_upstream_status_module".as_ptr(),
        ptr::null(),
    ];

    #[no_mangle]
    pub static mut ngx_module_order: [*const c_char; 7] = [
        c"ngx_stream_consul_upstream_module".as_ptr(),
        c"ngx_stream_upstream_module".as_ptr(),
        c"ngx_stream_upstream_hash_module".as_ptr(),
        c"ngx_stream_upstream_random_module".as_ptr(),
        c"ngx_stream_upstream_least_conn_module".as_ptr(),
        c"ngx_stream_upstream_zone_module".as_ptr(),
        ptr::null(),
    ];
}
