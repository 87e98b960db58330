//! Configuration: the `consul_upstream` directive, the module's main and
//! server confs, and the checks that need the whole `stream {}` block.

use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::ptr;

use ngx::core::Pool;
use ngx::ffi::{
    ngx_addr_t, ngx_array_push, ngx_command_t, ngx_conf_t, ngx_int_t, ngx_log_error_core,
    ngx_shared_memory_add, ngx_str_t, ngx_stream_upstream_module, ngx_stream_upstream_server_t,
    ngx_stream_upstream_srv_conf_t, NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
};

use consul_core::settings::{upstream_wide_param, Settings};
use consul_core::view::{HealthPolicy, PeerView};

use crate::balancer::Local;
use crate::ffi;
use crate::ngx_stream_consul_upstream_module;
use crate::zone::{self, LAYOUT};

/// One `consul_upstream` line: a query with its resolvers and policies.
pub struct Source {
    pub settings: Settings,
    pub file: String,
    pub line: usize,
}

/// One upstream block with `consul_upstream` lines (their peer sets are merged),
/// and this process's view of its peers.
pub struct Upstream {
    pub name: String,
    /// Never empty. The first line also holds the upstream-wide parameters.
    pub sources: Vec<Source>,
    pub uscf: *mut ngx_stream_upstream_srv_conf_t,
    pub shm_zone: *mut ngx::ffi::ngx_shm_zone_t,
    /// The block also has `server` lines: nginx's round robin serves them while
    /// discovery has no peers.
    pub fallback: std::cell::Cell<bool>,
    pub local: RefCell<Local>,
}

impl Upstream {
    /// The first `consul_upstream` line: zone, state file, passive health.
    pub fn first(&self) -> &Source {
        &self.sources[0]
    }
}

/// The module's conf of a `server {}` or `upstream {}` block of `stream {}`.
#[derive(Default)]
pub struct SrvConf {
    pub upstream: Option<Box<Upstream>>,
}

/// Every upstream that uses `consul_upstream`, for the discovery process.
#[derive(Default)]
pub struct MainConf {
    pub upstreams: Vec<*const Upstream>,
}

const CONF_OK: *mut c_char = ptr::null_mut();

fn conf_error() -> *mut c_char {
    // NGX_CONF_ERROR is (char *) -1.
    usize::MAX as *mut c_char
}

pub unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx passes the configuration being parsed; its pool lives as long
    // as the cycle, and `allocate` registers a cleanup that drops the value.
    let pool = Pool::from_ngx_pool((*cf).pool);
    pool.allocate(MainConf::default()) as *mut c_void
}

pub unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: as in create_main_conf.
    let pool = Pool::from_ngx_pool((*cf).pool);
    pool.allocate(SrvConf::default()) as *mut c_void
}

fn conf_log(cf: *mut ngx_conf_t, msg: &str) {
    ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", msg);
}

fn str_of(s: &ngx_str_t) -> String {
    if s.len == 0 || s.data.is_null() {
        return String::new();
    }
    // SAFETY: an ngx_str_t from nginx points at `len` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(s.data, s.len) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// `consul_upstream QUERY | service=NAME [parameters];` in `upstream {}`.
pub unsafe extern "C" fn consul_upstream(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls directive handlers with the configuration being parsed
    // and, for NGX_STREAM_SRV_CONF_OFFSET, this module's conf of the upstream block.
    let (cf_ref, srv) = (&mut *cf, &mut *(conf as *mut SrvConf));
    match directive(cf_ref, srv) {
        Ok(()) => CONF_OK,
        Err(msg) => {
            conf_log(cf, &msg);
            conf_error()
        }
    }
}

unsafe fn directive(cf: &mut ngx_conf_t, srv: &mut SrvConf) -> Result<(), String> {
    let args = (*cf.args).as_slice::<ngx_str_t>();
    let owned: Vec<String> = args.iter().skip(1).map(str_of).collect();
    let words: Vec<&str> = owned.iter().map(String::as_str).collect();
    let settings = Settings::parse(&words).map_err(|e| e.0)?;
    let (file, line) = if cf.conf_file.is_null() {
        (String::new(), 0)
    } else {
        (str_of(&(*cf.conf_file).file.name), (*cf.conf_file).line)
    };
    let source = Source {
        settings,
        file,
        line,
    };

    // A further line adds the instances of another query to the same upstream.
    if let Some(up) = srv.upstream.as_mut() {
        if up
            .sources
            .iter()
            .any(|s| s.settings.query == source.settings.query)
        {
            return Err("\"consul_upstream\" directive is duplicate".into());
        }
        if let Some(w) = upstream_wide_param(&words) {
            return Err(format!(
                "invalid parameter \"{w}\": it belongs on the first \"consul_upstream\" line of the upstream"
            ));
        }
        up.sources.push(source);
        return Ok(());
    }

    let uscf = &mut *(ffi::conf_srv_conf(cf, &*ptr::addr_of!(ngx_stream_upstream_module))
        as *mut ngx_stream_upstream_srv_conf_t);
    if uscf.peer.init_upstream.is_some() {
        return Err(
            "\"consul_upstream\" cannot be combined with another load balancing method".into(),
        );
    }
    uscf.peer.init_upstream = Some(crate::balancer::init_upstream);

    add_placeholder(cf, uscf)?;

    let name = str_of(&uscf.host);
    let settings = &source.settings;
    let shm_zone = add_zone(cf, &name, settings.zone_size)?;
    let policy = HealthPolicy {
        max_fails: settings.max_fails,
        fail_timeout_ms: settings.fail_timeout_ms,
    };
    let upstream = Box::new(Upstream {
        name,
        sources: vec![source],
        uscf,
        shm_zone,
        fallback: std::cell::Cell::new(false),
        local: RefCell::new(Local::new(PeerView::new(policy))),
    });
    let main = &mut *(ffi::conf_main_conf(cf, &*ptr::addr_of!(ngx_stream_consul_upstream_module))
        as *mut MainConf);
    main.upstreams.push(&*upstream as *const Upstream);
    srv.upstream = Some(upstream);
    Ok(())
}

/// Marks the placeholder server: its name points at this text.
pub static PLACEHOLDER: &str = "consul_upstream";

/// nginx refuses an upstream block without servers. A placeholder server passes
/// that check and is removed again by our init_upstream. It carries an address
/// (0.0.0.0:0) only so that a balancer that replaced ours (`least_conn` after
/// `consul_upstream`) gets as far as our postconfiguration check, which names
/// the conflict, instead of failing with "no servers in upstream".
unsafe fn add_placeholder(
    cf: &mut ngx_conf_t,
    uscf: &mut ngx_stream_upstream_srv_conf_t,
) -> Result<(), String> {
    let pool = Pool::from_ngx_pool(cf.pool);
    let sin = pool.calloc(std::mem::size_of::<libc::sockaddr_in>()) as *mut libc::sockaddr_in;
    let addr = pool.calloc(std::mem::size_of::<ngx_addr_t>()) as *mut ngx_addr_t;
    let server = ngx_array_push(uscf.servers) as *mut ngx_stream_upstream_server_t;
    if sin.is_null() || addr.is_null() || server.is_null() {
        return Err("out of memory".into());
    }
    (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
    (*addr).sockaddr = sin as *mut ngx::ffi::sockaddr;
    (*addr).socklen = std::mem::size_of::<libc::sockaddr_in>() as ngx::ffi::socklen_t;
    (*addr).name = ngx_str_t {
        len: PLACEHOLDER.len(),
        data: PLACEHOLDER.as_ptr() as *mut u8,
    };
    ptr::write_bytes(server, 0, 1);
    (*server).name = (*addr).name;
    (*server).addrs = addr;
    (*server).naddrs = 1;
    (*server).weight = 1;
    Ok(())
}

/// Registers `consul_upstream:v<LAYOUT>:<upstream>`. The tag is a symbol of the
/// nginx binary, not of this module, so that the zone (and its peers) survives a
/// reload even when the module's file moved.
unsafe fn add_zone(
    cf: &mut ngx_conf_t,
    upstream: &str,
    size: usize,
) -> Result<*mut ngx::ffi::ngx_shm_zone_t, String> {
    let text = format!("consul_upstream:v{LAYOUT}:{upstream}");
    let pool = Pool::from_ngx_pool(cf.pool);
    let data = pool.alloc(text.len()) as *mut u8;
    if data.is_null() {
        return Err("out of memory".into());
    }
    ptr::copy_nonoverlapping(text.as_ptr(), data, text.len());
    let mut name = ngx_str_t {
        len: text.len(),
        data,
    };
    let tag = ptr::addr_of_mut!(ngx_stream_upstream_module) as *mut c_void;
    let shm_zone = ngx_shared_memory_add(cf, &mut name, size, tag);
    if shm_zone.is_null() {
        return Err(format!("could not add shared zone \"{text}\""));
    }
    (*shm_zone).init = Some(zone::init_zone);
    (*shm_zone).data = ptr::null_mut();
    Ok(shm_zone)
}

/// After `stream {}` is parsed: a later `hash`, `least_conn` or `random` in the
/// same block replaced our balancer (nginx only warns); refuse that.
pub unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes the configuration of the parsed stream block.
    let cf_ref = &mut *cf;
    let main = ffi::conf_main_conf(cf_ref, &*ptr::addr_of!(ngx_stream_consul_upstream_module))
        as *const MainConf;
    if main.is_null() {
        return NGX_OK as ngx_int_t;
    }
    for &up in &(*main).upstreams {
        let up = &*up;
        let ours: unsafe extern "C" fn(_, _) -> _ = crate::balancer::init_upstream;
        let kept = (*up.uscf)
            .peer
            .init_upstream
            .is_some_and(|f| std::ptr::fn_addr_eq(f, ours));
        if !kept {
            let msg = format!(
                "\"consul_upstream\" cannot be combined with another load balancing method in {}:{}",
                up.first().file, up.first().line
            );
            ngx_log_error_core(
                NGX_LOG_EMERG as usize,
                cf_ref.log,
                0,
                c"%*s".as_ptr(),
                msg.len(),
                msg.as_ptr(),
            );
            return NGX_ERROR as ngx_int_t;
        }
    }
    NGX_OK as ngx_int_t
}

/// The module's upstream of an upstream block, if it has `consul_upstream`.
///
/// # Safety
/// `uscf` must be a stream upstream block's configuration.
pub unsafe fn upstream_of<'a>(uscf: &ngx_stream_upstream_srv_conf_t) -> Option<&'a Upstream> {
    let srv = ffi::upstream_srv_conf(uscf, &*ptr::addr_of!(ngx_stream_consul_upstream_module))
        as *const SrvConf;
    if srv.is_null() {
        return None;
    }
    (*srv).upstream.as_deref().map(|u| &*(u as *const Upstream))
}
