//! ngx_stream_consul_upstream_module: load balancing across backends discovered
//! from Consul (its DNS interface or its HTTP API), in `stream {}` and `http {}`
//! upstreams. One file, three modules (`ngx_modules` below): the core module of the
//! [`registry`], the stream module and the http module, which also answers
//! `consul_upstream_status`.
//!
//! - [`registry`]: the library's core module, whose per-cycle registry lists
//!   every upstream with `consul_upstream` lines (discovery and status read it);
//! - [`protocol`]: what differs between a stream and an http upstream block;
//!   [`block`]: what the module keeps per block;
//! - [`upstream`]: the types every part shares (an upstream, its lines, a
//!   worker's copy of its set);
//! - [`conf`]: the `consul_upstream` directive, nginx's directives seen first
//!   (methods, `server`, `keepalive`, `zone`) and the checks of the protocol's block;
//!   [`placeholder`]: the server line nginx needs until `init_upstream` removes it;
//! - [`zone`]: each upstream's shared-memory zone (layout in `consul_core::zone`);
//! - [`discovery`] and [`resolve`]: worker 0's loops and lookups; [`dns_client`]:
//!   their DNS queries, one TCP connection per resolver;
//! - [`api`]: `api=` lines, Consul's HTTP API with blocking queries;
//! - [`prefill`] and [`sync_resolve`]: the master fills the zones before it forks
//!   workers (state file, one bounded lookup); [`sync_socket`]: its sockets;
//! - [`runtime`]: hickory's runtime on nginx's event loop (no thread);
//! - [`balancer`]: the per-connection peer callbacks, for both protocols;
//! - [`status`]: `consul_upstream_status` in an http `location` (JSON and
//!   Prometheus text of what the balancers see);
//! - [`tls`]: TLS sessions to discovered peers, per worker;
//! - [`listening`], [`sockaddr`]: nginx's own addresses, socket addresses in C form;
//! - [`ffi`]: nginx's globals, module lookup, typed stream conf access;
//! - [`log`]: log lines in nginx's voice, formatted only when their level is on;
//!   [`fault`]: the test suite's fault injection (debug builds only).

#![deny(unsafe_op_in_unsafe_fn)]

use std::ffi::{c_char, c_void};
use std::ptr;

use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_core_module_t, ngx_http_module_t, ngx_module_t, ngx_str_t,
    ngx_stream_module_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_BLOCK, NGX_CONF_NOARGS,
    NGX_CONF_TAKE1, NGX_CONF_TAKE12, NGX_CORE_MODULE, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MODULE, NGX_HTTP_SRV_CONF_OFFSET, NGX_HTTP_UPS_CONF, NGX_STREAM_MODULE,
    NGX_STREAM_SRV_CONF_OFFSET, NGX_STREAM_UPS_CONF,
};

use protocol::{Http, Stream};

mod api;
mod balancer;
mod block;
mod conf;
mod discovery;
mod dns_client;
mod fault;
mod ffi;
mod listening;
mod log;
mod placeholder;
mod prefill;
mod protocol;
mod registry;
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

// The core module: the per-cycle registry of every consul upstream, the
// master's fill before it forks workers, discovery in worker 0.
static mut CORE_CTX: ngx_core_module_t = ngx_core_module_t {
    name: ngx::ngx_string!("consul_upstream"),
    create_conf: Some(registry::create_conf),
    init_conf: None,
};

static mut CORE_COMMANDS: [ngx_command_t; 1] = [ngx_command_t::empty()];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_consul_upstream_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of_mut!(CORE_CTX) as *mut c_void,
    commands: ptr::addr_of_mut!(CORE_COMMANDS) as *mut ngx_command_t,
    type_: NGX_CORE_MODULE as ngx_uint_t,
    init_module: Some(prefill::init_module),
    init_process: Some(discovery::init_process),
    exit_process: Some(discovery::exit_process),
    ..ngx_module_t::default()
};

static mut STREAM_CTX: ngx_stream_module_t = ngx_stream_module_t {
    preconfiguration: None,
    postconfiguration: Some(conf::postconfiguration::<Stream>),
    create_main_conf: None,
    init_main_conf: Some(conf::init_main_conf::<Stream>),
    create_srv_conf: Some(conf::create_srv_conf::<Stream>),
    merge_srv_conf: None,
};

/// A directive handler.
type Handler =
    unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char;

/// A command of the stream module in `upstream {}` (its conf: the block's).
const fn stream_ups(name: ngx_str_t, args: u32, set: Handler) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: (NGX_STREAM_UPS_CONF | args) as ngx_uint_t,
        set: Some(set),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    }
}

/// `consul_upstream`, and nginx's own directives that this module sees first
/// and hands on: the balancing methods and `server` (see [`conf::methods`]),
/// `zone` (see [`zone`]), other balancers (see [`conf::chain`]).
static mut STREAM_COMMANDS: [ngx_command_t; 10] = [
    stream_ups(
        ngx::ngx_string!("consul_upstream"),
        NGX_CONF_1MORE,
        conf::consul_upstream::<Stream>,
    ),
    stream_ups(
        ngx::ngx_string!("least_conn"),
        NGX_CONF_NOARGS,
        conf::methods::method::<Stream>,
    ),
    stream_ups(
        ngx::ngx_string!("hash"),
        NGX_CONF_TAKE12,
        conf::methods::method::<Stream>,
    ),
    stream_ups(
        ngx::ngx_string!("random"),
        NGX_CONF_NOARGS | NGX_CONF_TAKE12,
        conf::methods::method::<Stream>,
    ),
    stream_ups(
        ngx::ngx_string!("server"),
        NGX_CONF_1MORE,
        conf::methods::server::<Stream>,
    ),
    stream_ups(
        ngx::ngx_string!("zone"),
        NGX_CONF_TAKE12,
        conf::zone_directive::zone::<Stream>,
    ),
    stream_ups(
        ngx::ngx_string!("least_time"),
        NGX_CONF_TAKE12,
        conf::chain::foreign::<Stream>,
    ),
    stream_ups(
        ngx::ngx_string!("balancer_by_lua_block"),
        NGX_CONF_BLOCK | NGX_CONF_NOARGS,
        conf::chain::foreign::<Stream>,
    ),
    stream_ups(
        ngx::ngx_string!("balancer_by_lua_file"),
        NGX_CONF_TAKE1,
        conf::chain::foreign::<Stream>,
    ),
    ngx_command_t::empty(),
];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_stream_consul_upstream_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of_mut!(STREAM_CTX) as *mut c_void,
    commands: ptr::addr_of_mut!(STREAM_COMMANDS) as *mut ngx_command_t,
    type_: NGX_STREAM_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

static mut HTTP_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: Some(conf::postconfiguration::<Http>),
    create_main_conf: None,
    init_main_conf: Some(conf::init_main_conf::<Http>),
    create_srv_conf: Some(conf::create_srv_conf::<Http>),
    merge_srv_conf: None,
    create_loc_conf: None,
    merge_loc_conf: None,
};

/// A command of the http module in `upstream {}` (its conf: the block's).
const fn http_ups(name: ngx_str_t, args: u32, set: Handler) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: (NGX_HTTP_UPS_CONF | args) as ngx_uint_t,
        set: Some(set),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    }
}

/// The same commands as the stream module's, with http's own (`ip_hash`,
/// `keepalive`, `sticky`), and `consul_upstream_status` in `location {}`.
static mut HTTP_COMMANDS: [ngx_command_t; 15] = [
    http_ups(
        ngx::ngx_string!("consul_upstream"),
        NGX_CONF_1MORE,
        conf::consul_upstream::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("least_conn"),
        NGX_CONF_NOARGS,
        conf::methods::method::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("hash"),
        NGX_CONF_TAKE12,
        conf::methods::method::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("ip_hash"),
        NGX_CONF_NOARGS,
        conf::methods::method::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("random"),
        NGX_CONF_NOARGS | NGX_CONF_TAKE12,
        conf::methods::method::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("server"),
        NGX_CONF_1MORE,
        conf::methods::server::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("zone"),
        NGX_CONF_TAKE12,
        conf::zone_directive::zone::<Http>,
    ),
    // `keepalive N` (nginx ≥ 1.29.7 also `keepalive N local`): nginx's own
    // handler checks the count it takes.
    http_ups(
        ngx::ngx_string!("keepalive"),
        NGX_CONF_TAKE12,
        conf::chain::keepalive::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("sticky"),
        NGX_CONF_1MORE,
        conf::chain::foreign::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("least_time"),
        NGX_CONF_TAKE12,
        conf::chain::foreign::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("balancer_by_lua_block"),
        NGX_CONF_BLOCK | NGX_CONF_NOARGS,
        conf::chain::foreign::<Http>,
    ),
    http_ups(
        ngx::ngx_string!("balancer_by_lua_file"),
        NGX_CONF_TAKE1,
        conf::chain::foreign::<Http>,
    ),
    ngx_command_t {
        name: ngx::ngx_string!("consul_upstream_status"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(status::consul_upstream_status),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
    ngx_command_t::empty(),
];

/// `consul_upstream` in `http { upstream {} }`, and `consul_upstream_status`.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_consul_upstream_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of_mut!(HTTP_CTX) as *mut c_void,
    commands: ptr::addr_of_mut!(HTTP_COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

/// What nginx reads from a dynamic module's file: its modules (one `load_module`
/// line loads them all), their names, and where they go among the others. The
/// stream module goes before nginx's upstream module and its balancer and zone
/// modules, so that their directives reach it first (see [`conf::methods`]);
/// so does the http module before nginx's http ones; the core module goes
/// last (it is not in the order).
/// Written out: ngx 0.5.1's `ngx_modules!` takes one module and no order.
#[cfg(feature = "export-modules")]
#[allow(non_upper_case_globals)]
mod exports {
    use std::ffi::c_char;
    use std::ptr;

    use ngx::ffi::ngx_module_t;

    #[no_mangle]
    pub static mut ngx_modules: [*const ngx_module_t; 4] = [
        ptr::addr_of!(crate::ngx_consul_upstream_module),
        ptr::addr_of!(crate::ngx_http_consul_upstream_module),
        ptr::addr_of!(crate::ngx_stream_consul_upstream_module),
        ptr::null(),
    ];

    #[no_mangle]
    pub static mut ngx_module_names: [*const c_char; 4] = [
        c"ngx_consul_upstream_module".as_ptr(),
        c"ngx_http_consul_upstream_module".as_ptr(),
        c"ngx_stream_consul_upstream_module".as_ptr(),
        ptr::null(),
    ];

    /// One list for both: each module goes before the earliest loaded of the
    /// names after its own, so the http entries come first (nginx's http
    /// modules precede its stream modules in every build).
    #[no_mangle]
    pub static mut ngx_module_order: [*const c_char; 20] = [
        c"ngx_http_consul_upstream_module".as_ptr(),
        c"ngx_http_upstream_module".as_ptr(),
        c"ngx_http_upstream_hash_module".as_ptr(),
        c"ngx_http_upstream_ip_hash_module".as_ptr(),
        c"ngx_http_upstream_least_conn_module".as_ptr(),
        c"ngx_http_upstream_least_time_module".as_ptr(),
        c"ngx_http_upstream_random_module".as_ptr(),
        c"ngx_http_upstream_keepalive_module".as_ptr(),
        c"ngx_http_upstream_zone_module".as_ptr(),
        c"ngx_http_upstream_sticky_module".as_ptr(),
        c"ngx_http_lua_module".as_ptr(),
        c"ngx_stream_consul_upstream_module".as_ptr(),
        c"ngx_stream_upstream_module".as_ptr(),
        c"ngx_stream_upstream_hash_module".as_ptr(),
        c"ngx_stream_upstream_least_conn_module".as_ptr(),
        c"ngx_stream_upstream_least_time_module".as_ptr(),
        c"ngx_stream_upstream_random_module".as_ptr(),
        c"ngx_stream_upstream_zone_module".as_ptr(),
        c"ngx_stream_lua_module".as_ptr(),
        ptr::null(),
    ];
}
