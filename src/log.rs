//! Log lines in nginx's voice, on the cycle's log (not tied to a connection).

use std::cell::Cell;

use ngx::ffi::{
    ngx_log_t, NGX_LOG_ALERT, NGX_LOG_DEBUG, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE,
    NGX_LOG_WARN,
};

use consul_core::policy::Level;

pub fn level_of(level: Level) -> u32 {
    match level {
        Level::Error => NGX_LOG_ERR,
        Level::Warn => NGX_LOG_WARN,
        Level::Notice => NGX_LOG_NOTICE,
        Level::Info => NGX_LOG_INFO,
        // A line for nginx's debug log goes through [`debug`].
        Level::Debug => NGX_LOG_DEBUG,
    }
}

thread_local! {
    /// Where log lines go instead of the running cycle's log (see [`to`]).
    static TARGET: Cell<*mut ngx_log_t> = const { Cell::new(std::ptr::null_mut()) };
}

/// Runs `f` with its log lines going to `log`: the master logs to the cycle it
/// is setting up (its `error_log`), not to the one still running.
pub fn to<T>(log: *mut ngx_log_t, f: impl FnOnce() -> T) -> T {
    struct Restore(*mut ngx_log_t);
    impl Drop for Restore {
        fn drop(&mut self) {
            TARGET.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(TARGET.with(|t| t.replace(log)));
    f()
}

fn target() -> *mut ngx_log_t {
    let log = TARGET.with(Cell::get);
    if log.is_null() {
        crate::ffi::cycle_log()
    } else {
        log
    }
}

pub fn log(level: u32, msg: &str) {
    let log = target();
    if log.is_null() {
        return;
    }
    ngx::ngx_log_error!(level, log, "{}", msg);
}

pub fn alert(msg: &str) {
    log(NGX_LOG_ALERT, msg);
}

pub fn error(msg: &str) {
    log(NGX_LOG_ERR, msg);
}

pub fn warn(msg: &str) {
    log(NGX_LOG_WARN, msg);
}

pub fn info(msg: &str) {
    log(NGX_LOG_INFO, msg);
}

/// A debug line (stream mask), as nginx's own balancers write one in every
/// step; compiled to nothing unless nginx was built `--with-debug`.
pub fn debug(msg: &str) {
    let log = target();
    if log.is_null() {
        return;
    }
    ngx::ngx_log_debug!(mask: ngx::log::DebugMask::Stream, log, "{}", msg);
}
