//! Stream-module equivalents of nginx's C macros, which ngx 0.5 does not provide.
//! Every raw access to nginx's stream configuration structures lives here.

use std::ffi::c_void;

use ngx::ffi::{
    ngx_conf_t, ngx_cycle_t, ngx_module_t, ngx_stream_conf_ctx_t, ngx_stream_module,
    ngx_stream_upstream_srv_conf_t,
};

/// `ngx_stream_conf_get_module_srv_conf(cf, module)`.
///
/// # Safety
/// `cf` must be a configuration being parsed inside `stream {}`.
pub unsafe fn conf_srv_conf(cf: &ngx_conf_t, module: &ngx_module_t) -> *mut c_void {
    let ctx = cf.ctx as *const ngx_stream_conf_ctx_t;
    // SAFETY: per the contract, cf.ctx is a stream conf context with a slot per module.
    unsafe { *(*ctx).srv_conf.add(module.ctx_index) }
}

/// `ngx_stream_conf_get_module_main_conf(cf, module)`.
///
/// # Safety
/// As for [`conf_srv_conf`].
pub unsafe fn conf_main_conf(cf: &ngx_conf_t, module: &ngx_module_t) -> *mut c_void {
    let ctx = cf.ctx as *const ngx_stream_conf_ctx_t;
    // SAFETY: as for conf_srv_conf.
    unsafe { *(*ctx).main_conf.add(module.ctx_index) }
}

/// `ngx_stream_conf_upstream_srv_conf(uscf, module)`.
///
/// # Safety
/// `uscf` must be an upstream block's configuration of a stream module list that
/// includes `module`.
pub unsafe fn upstream_srv_conf(
    uscf: &ngx_stream_upstream_srv_conf_t,
    module: &ngx_module_t,
) -> *mut c_void {
    if uscf.srv_conf.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: per the contract, srv_conf has a slot per stream module.
    unsafe { *uscf.srv_conf.add(module.ctx_index) }
}

/// `ngx_stream_cycle_get_module_main_conf(cycle, module)`; null without `stream {}`.
///
/// # Safety
/// `cycle` must be a fully initialized cycle.
pub unsafe fn cycle_main_conf(cycle: &ngx_cycle_t, module: &ngx_module_t) -> *mut c_void {
    // SAFETY: per the contract, conf_ctx has a slot per core module; stream's
    // is null without `stream {}`, else a stream conf context.
    unsafe {
        let ctx = *cycle.conf_ctx.add(ngx_stream_module.index) as *const ngx_stream_conf_ctx_t;
        if ctx.is_null() {
            return std::ptr::null_mut();
        }
        *(*ctx).main_conf.add(module.ctx_index)
    }
}

/// What a directive handler returns when all is well (`NGX_CONF_OK`)...
pub const CONF_OK: *mut std::ffi::c_char = std::ptr::null_mut();

/// ... and when it is not (`NGX_CONF_ERROR`, `(char *) -1`).
pub fn conf_error() -> *mut std::ffi::c_char {
    usize::MAX as *mut std::ffi::c_char
}

/// `text` copied into the configuration's pool, as nginx's own strings are.
pub fn pool_str(cf: &ngx_conf_t, text: &str) -> Option<ngx::ffi::ngx_str_t> {
    // SAFETY: the configuration's pool lives as long as the cycle.
    let pool = unsafe { ngx::core::Pool::from_ngx_pool(cf.pool) };
    let data = pool.alloc(text.len()) as *mut u8;
    if data.is_null() {
        return None;
    }
    // SAFETY: data holds text.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), data, text.len()) };
    Some(ngx::ffi::ngx_str_t {
        len: text.len(),
        data,
    })
}

/// The file and line of the directive being parsed (for messages that name
/// it later); ("", 0) outside a file (`-g`).
pub fn conf_position(cf: &ngx_conf_t) -> (String, usize) {
    // SAFETY: conf_file, when set, is the file being parsed.
    match unsafe { cf.conf_file.as_ref() } {
        Some(f) => (
            String::from_utf8_lossy(f.file.name.as_bytes()).into_owned(),
            f.line,
        ),
        None => (String::new(), 0),
    }
}

/// This module's own `ngx_module_t` (its `ctx_index` locates its confs).
pub fn module() -> &'static ngx_module_t {
    // SAFETY: the module's own static; nginx writes its indexes while loading the
    // configuration, before any of the module's code runs.
    unsafe { &*std::ptr::addr_of!(crate::ngx_stream_consul_upstream_module) }
}

/// `(ngx_process == SINGLE) || (ngx_process == WORKER && ngx_worker == 0)`:
/// the one process that resolves and writes the zones. Cache manager and loader
/// processes also see `ngx_worker == 0`, hence the process type check.
pub fn is_discovery_process() -> bool {
    // SAFETY: plain reads of nginx's process globals, set before init_process runs.
    let (process, worker) = unsafe { (ngx::ffi::ngx_process, ngx::ffi::ngx_worker) };
    process == ngx::ffi::NGX_PROCESS_SINGLE as usize
        || (process == ngx::ffi::NGX_PROCESS_WORKER as usize && worker == 0)
}

pub fn worker_index() -> usize {
    // SAFETY: plain read of a process global.
    unsafe { ngx::ffi::ngx_worker }
}

pub fn current_msec() -> u64 {
    // SAFETY: plain read of the event loop's cached clock.
    unsafe { ngx::ffi::ngx_current_msec as u64 }
}

pub fn exiting() -> bool {
    // SAFETY: plain reads of process globals set by signal handling.
    unsafe { ngx::ffi::ngx_exiting != 0 || ngx::ffi::ngx_quit != 0 || ngx::ffi::ngx_terminate != 0 }
}

/// Wall-clock time in Unix seconds (for what is shown to people and saved).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn pid() -> i64 {
    // SAFETY: plain read of a process global.
    unsafe { ngx::ffi::ngx_pid as i64 }
}

/// The cycle's log, for lines not tied to a connection.
pub fn cycle_log() -> *mut ngx::ffi::ngx_log_t {
    ngx::log::ngx_cycle_log().as_ptr()
}
