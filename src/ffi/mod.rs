//! nginx's process globals, strings in the configuration's pool, module and
//! command lookup by name, and the typed configuration access ngx 0.5 lacks
//! for stream ([`stream_conf`]). Every raw read of nginx's globals lives here.

use ngx::ffi::{ngx_command_t, ngx_conf_t, ngx_module_t, ngx_uint_t};

pub mod stream_conf;

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

/// The module of type `module_type` (NGX_STREAM_MODULE, NGX_HTTP_MODULE)
/// named `name` in the cycle being configured, if this nginx has it.
pub fn find_module(
    cf: &ngx_conf_t,
    module_type: ngx_uint_t,
    name: &str,
) -> Option<&'static ngx_module_t> {
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
        if module.type_ != module_type || module.name.is_null() {
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
pub fn find_command(module: &ngx_module_t, directive: &str) -> Option<&'static ngx_command_t> {
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

/// The words of the directive being parsed, the name first.
pub fn words(cf: &ngx_conf_t) -> Vec<String> {
    // SAFETY: cf.args holds the directive's words as ngx_str_t.
    let args = unsafe { (*cf.args).as_slice::<ngx::ffi::ngx_str_t>() };
    args.iter()
        .map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned())
        .collect()
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

/// The conf that nginx passes to `cmd` of `module` for the directive being
/// parsed (as `ngx_conf_handler` picks it: the level `cmd.conf` names in the
/// block's context), to hand a directive on to that module's handler.
///
/// # Safety
/// `cf` must be inside a block of `module`'s type (http or stream), and `cmd`
/// one of `module`'s commands for that context.
pub unsafe fn handler_conf(
    cf: &ngx_conf_t,
    module: &ngx_module_t,
    cmd: &ngx_command_t,
) -> *mut std::ffi::c_void {
    // SAFETY: per the contract, cf.ctx is an http or stream conf context, a
    // struct of conf arrays; cmd.conf is the offset of one of them, which holds
    // a slot per module of that type.
    unsafe {
        let confp = *((cf.ctx as *const u8).add(cmd.conf) as *const *mut *mut std::ffi::c_void);
        if confp.is_null() {
            return std::ptr::null_mut();
        }
        *confp.add(module.ctx_index)
    }
}
