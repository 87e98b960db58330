//! Log lines in nginx's voice, on the cycle's log (not tied to a connection).

use ngx::ffi::{NGX_LOG_ALERT, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN};

use consul_core::policy::Level;

pub fn level_of(level: Level) -> u32 {
    match level {
        Level::Error => NGX_LOG_ERR,
        Level::Warn => NGX_LOG_WARN,
        Level::Notice => NGX_LOG_NOTICE,
    }
}

pub fn log(level: u32, msg: &str) {
    let log = crate::ffi::cycle_log();
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

pub fn notice(msg: &str) {
    log(NGX_LOG_NOTICE, msg);
}

pub fn info(msg: &str) {
    log(NGX_LOG_INFO, msg);
}

/// A debug line (stream mask), as nginx's own balancers write one in every
/// step; compiled to nothing unless nginx was built `--with-debug`.
pub fn debug(msg: &str) {
    let log = crate::ffi::cycle_log();
    if log.is_null() {
        return;
    }
    ngx::ngx_log_debug!(mask: ngx::log::DebugMask::Stream, log, "{}", msg);
}
