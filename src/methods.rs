//! nginx's own balancing directives — `least_conn;`, `hash KEY [consistent];`,
//! `random [two [least_conn]];` — in an upstream that has `consul_upstream`, and
//! nginx's `server` line after `hash` or `random` (its `backup`).
//!
//! The module is placed before nginx's upstream and balancer modules
//! (`ngx_module_order` in lib.rs), so these directives reach its commands
//! first ([`NginxHandler`] hands them on; `zone` too, see `zone.rs`). Each one records the
//! method in the block's conf, then hands the directive on, unchanged, to nginx's
//! own module: an upstream without `consul_upstream` works exactly as before,
//! and nginx checks the arguments as it always does. With `consul_upstream` in the
//! block (before or after the method), the module's balancer stays in charge and
//! applies the method to the discovered peers.

use std::ffi::{c_char, c_void};
use std::ptr;

use ngx::core::Pool;
use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_module_t, ngx_str_t, ngx_stream_compile_complex_value,
    ngx_stream_compile_complex_value_t, ngx_stream_complex_value_t, ngx_stream_upstream_module,
    ngx_stream_upstream_srv_conf_t, ngx_uint_t, NGX_OK, NGX_STREAM_MODULE,
    NGX_STREAM_UPSTREAM_BACKUP,
};

use consul_core::method::Method;

use crate::ffi;
use crate::upstream::{MainConf, SrvConf};

/// The method an upstream block asked for, with the hash key when it has one.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub method: Method,
    /// `hash`'s key, compiled (in the configuration's pool).
    pub key: *mut ngx_stream_complex_value_t,
}

/// nginx's stream module named `name`, if this nginx has it.
fn stream_module(cf: &ngx_conf_t, name: &str) -> Option<&'static ngx_module_t> {
    // SAFETY: the cycle being configured has its module list.
    let modules = unsafe { (*cf.cycle).modules };
    if modules.is_null() {
        return None;
    }
    for i in 0.. {
        // SAFETY: the list ends with a null pointer.
        let m = unsafe { *modules.add(i) };
        if m.is_null() {
            return None;
        }
        // SAFETY: a loaded module, alive for the cycle (modules are never unloaded
        // while a cycle that loaded them runs).
        let module = unsafe { &*m };
        if module.type_ != NGX_STREAM_MODULE as usize || module.name.is_null() {
            continue;
        }
        // SAFETY: module names are C strings.
        let module_name = unsafe { std::ffi::CStr::from_ptr(module.name) };
        if module_name.to_bytes() == name.as_bytes() {
            return Some(module);
        }
    }
    None
}

/// The command `directive` of `module`.
fn command(module: &ngx_module_t, directive: &str) -> Option<&'static ngx_command_t> {
    let mut cmd = module.commands;
    if cmd.is_null() {
        return None;
    }
    loop {
        // SAFETY: a command table ends with an empty command.
        let c = unsafe { &*cmd };
        if c.name.len == 0 {
            return None;
        }
        if c.name.as_bytes() == directive.as_bytes() {
            return Some(c);
        }
        // SAFETY: not past the terminating command.
        cmd = unsafe { cmd.add(1) };
    }
}

/// nginx's own handler of a directive that this module sees first.
pub struct NginxHandler {
    module: &'static ngx_module_t,
    cmd: &'static ngx_command_t,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
}

impl NginxHandler {
    /// `directive` of nginx's stream module `owner` (its conf at
    /// NGX_STREAM_SRV_CONF_OFFSET, as for every directive handed on here).
    pub fn find(cf: &ngx_conf_t, owner: &str, directive: &str) -> Result<NginxHandler, String> {
        let module = stream_module(cf, owner).ok_or_else(|| {
            format!("\"{directive}\" is not available: this nginx is built without {owner}")
        })?;
        command(module, directive)
            .and_then(|cmd| cmd.set.map(|set| NginxHandler { module, cmd, set }))
            .ok_or_else(|| format!("\"{directive}\" is not available in {owner}"))
    }

    /// Calls it on the directive being parsed, as nginx would have.
    pub fn call(&self, cf: &mut ngx_conf_t) -> *mut c_char {
        // SAFETY: inside a stream block: the owner module's conf of this block,
        // as nginx would pass it.
        let their_conf = unsafe { ffi::conf_srv_conf(cf, self.module) };
        // SAFETY: nginx's own handler, with the arguments and confs it expects.
        unsafe {
            (self.set)(
                cf,
                self.cmd as *const ngx_command_t as *mut ngx_command_t,
                their_conf,
            )
        }
    }
}

/// The stream upstream module's conf of the `upstream {}` block being parsed.
///
/// # Safety
/// `cf` must be inside `upstream {}` of `stream {}`.
pub unsafe fn block_uscf(cf: &ngx_conf_t) -> &'static mut ngx_stream_upstream_srv_conf_t {
    // SAFETY: per the contract; the conf lives as long as the cycle.
    unsafe {
        &mut *(ffi::conf_srv_conf(cf, &*ptr::addr_of!(ngx_stream_upstream_module))
            as *mut ngx_stream_upstream_srv_conf_t)
    }
}

/// Runs a directive handler's body: a panic or an error becomes nginx's error.
pub fn directive_result(
    cf: &mut ngx_conf_t,
    body: impl FnOnce(&mut ngx_conf_t) -> Result<*mut c_char, String>,
) -> *mut c_char {
    let cf_ptr: *mut ngx_conf_t = cf;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(cf)))
        .unwrap_or_else(|_| Err("internal error (panic) while reading the directive".into()));
    match result {
        Ok(rv) => rv,
        Err(msg) => {
            ngx::ngx_conf_log_error!(ngx::ffi::NGX_LOG_EMERG, cf_ptr, "{}", msg);
            ffi::conf_error()
        }
    }
}

fn words(cf: &ngx_conf_t) -> Vec<String> {
    // SAFETY: cf.args holds the directive's words as ngx_str_t.
    let args = unsafe { (*cf.args).as_slice::<ngx_str_t>() };
    args.iter()
        .map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned())
        .collect()
}

/// The method the words ask for (nginx's own handler checks them in detail).
fn method_of(words: &[String]) -> Option<Method> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["least_conn"] => Some(Method::LeastConn),
        ["hash", _] => Some(Method::Hash),
        ["hash", _, "consistent"] => Some(Method::ConsistentHash),
        ["random"] => Some(Method::Random),
        ["random", "two"] | ["random", "two", "least_conn"] => Some(Method::RandomTwo),
        _ => None,
    }
}

/// Compiles `hash`'s key (a complex value such as `$remote_addr`) for the
/// module's own use.
fn compile_key(cf: &mut ngx_conf_t) -> Result<*mut ngx_stream_complex_value_t, String> {
    // SAFETY: the configuration's pool lives as long as the cycle.
    let pool = unsafe { Pool::from_ngx_pool(cf.pool) };
    let cv = pool.calloc(std::mem::size_of::<ngx_stream_complex_value_t>())
        as *mut ngx_stream_complex_value_t;
    if cv.is_null() {
        return Err("out of memory".into());
    }
    // SAFETY: cf.args has at least two words here (checked by method_of).
    let value = unsafe { (*cf.args).as_slice_mut::<ngx_str_t>() }
        .get_mut(1)
        .ok_or("no key")? as *mut ngx_str_t;
    // SAFETY: all-zero is nginx's initial state for this struct.
    let mut ccv: ngx_stream_compile_complex_value_t = unsafe { std::mem::zeroed() };
    ccv.cf = cf;
    ccv.value = value;
    ccv.complex_value = cv;
    // SAFETY: a complete compile request for the configuration being parsed.
    if unsafe { ngx_stream_compile_complex_value(&mut ccv) } != NGX_OK as isize {
        return Err("invalid hash key".into());
    }
    Ok(cv)
}

/// The directive handler for `least_conn`, `hash` and `random` in `upstream {}`.
pub unsafe extern "C" fn directive(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls directive handlers with the configuration being parsed,
    // the command, and (NGX_STREAM_SRV_CONF_OFFSET) this module's block conf.
    let (cf, cmd, srv) = unsafe { (&mut *cf, &*cmd, &mut *(conf as *mut SrvConf)) };
    directive_result(cf, |cf| pass_on(cf, cmd, srv))
}

fn pass_on(
    cf: &mut ngx_conf_t,
    cmd: &ngx_command_t,
    srv: &mut SrvConf,
) -> Result<*mut c_char, String> {
    let directive = String::from_utf8_lossy(cmd.name.as_bytes()).into_owned();
    let owner = match directive.as_str() {
        "least_conn" => "ngx_stream_upstream_least_conn_module",
        "hash" => "ngx_stream_upstream_hash_module",
        _ => "ngx_stream_upstream_random_module",
    };
    let theirs = NginxHandler::find(cf, owner, &directive)?;
    // SAFETY: inside `upstream {}` of `stream {}`.
    let uscf = unsafe { block_uscf(cf) };
    let ours = srv.upstream.is_some();
    if ours {
        // consul_upstream's balancer stays, with this method: nginx's "load
        // balancing method redefined" only if a method was given before.
        uscf.peer.init_upstream = None;
        if srv.method.is_some() {
            ngx::ngx_conf_log_error!(
                ngx::ffi::NGX_LOG_WARN,
                cf,
                "load balancing method redefined"
            );
        }
    }
    let rv = theirs.call(cf);
    if ours {
        uscf.peer.init_upstream = Some(crate::balancer::init_upstream);
        // Static servers stay round robin's, which has backups.
        uscf.flags |= NGX_STREAM_UPSTREAM_BACKUP as ngx_uint_t;
    }
    if !rv.is_null() {
        // nginx's handler said what was wrong (and logged it, if it logs).
        return Ok(rv);
    }
    let words = words(cf);
    let method = method_of(&words).unwrap_or_default();
    let key = if method.uses_key() {
        compile_key(cf)?
    } else {
        ptr::null_mut()
    };
    srv.method = Some(Chosen { method, key });
    Ok(ffi::CONF_OK)
}

/// `server` in `upstream {}`, seen before nginx's upstream module. After
/// `hash` or `random`, nginx refuses `backup`; but a `consul_upstream` line
/// that follows makes the block's static servers round robin's, which has
/// backups (every other order of these lines is accepted). Such a server is
/// taken, and the block refused after all with nginx's own message for that
/// line if no `consul_upstream` line came (see conf::postconfiguration).
pub unsafe extern "C" fn server(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: as in `directive`.
    let (cf, srv) = unsafe { (&mut *cf, &mut *(conf as *mut SrvConf)) };
    directive_result(cf, |cf| {
        let theirs = NginxHandler::find(cf, "ngx_stream_upstream_module", "server")?;
        // SAFETY: inside `upstream {}` of `stream {}`.
        let uscf = unsafe { block_uscf(cf) };
        let backup = NGX_STREAM_UPSTREAM_BACKUP as ngx_uint_t;
        let deferred = srv.upstream.is_none()
            && srv.method.is_some()
            && uscf.flags & backup == 0
            && words(cf).iter().skip(2).any(|w| w == "backup");
        if !deferred {
            return Ok(theirs.call(cf));
        }
        uscf.flags |= backup;
        let rv = theirs.call(cf);
        uscf.flags &= !backup;
        if rv.is_null() && srv.deferred_backup.is_none() {
            srv.deferred_backup = Some(ffi::conf_position(cf));
            // SAFETY: the stream block's context: this module's main conf.
            let main = unsafe { &mut *(ffi::conf_main_conf(cf, ffi::module()) as *mut MainConf) };
            main.deferred_backups.push(srv as *const SrvConf);
        }
        Ok(rv)
    })
}
