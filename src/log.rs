//! Log lines in nginx's voice, on the cycle's log (not tied to a connection).
//!
//! The macros test the line's level first, as nginx's `ngx_log_error` and
//! `ngx_log_debug` do: a line whose level is off formats nothing and does not
//! even evaluate its arguments; a debug line is compiled out unless nginx was
//! built `--with-debug`.

use std::cell::Cell;
use std::fmt;
use std::mem::MaybeUninit;

use ngx::ffi::{ngx_log_t, NGX_LOG_DEBUG, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN};
use ngx::log::DebugMask;

use consul_core::policy::Level;

pub fn level_of(level: Level) -> u32 {
    match level {
        Level::Error => NGX_LOG_ERR,
        Level::Warn => NGX_LOG_WARN,
        Level::Notice => NGX_LOG_NOTICE,
        Level::Info => NGX_LOG_INFO,
        // A line for nginx's debug log goes through [`debug!`].
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

/// The log a line at `level` goes to, if that level is on (nginx's test:
/// the first log of the chain is the most verbose one).
#[doc(hidden)]
pub fn enabled(level: u32) -> Option<*mut ngx_log_t> {
    let log = target();
    // SAFETY: `target` gives null or a log that lives as long as its cycle.
    let on = !log.is_null() && level as usize <= unsafe { (*log).log_level };
    on.then_some(log)
}

/// The log a debug line goes to, if nginx's debug log is on for the stream
/// mask (always `None` without `--with-debug`).
#[doc(hidden)]
pub fn debug_enabled() -> Option<*mut ngx_log_t> {
    if !ngx::log::DEBUG {
        return None;
    }
    let log = target();
    // SAFETY: as in `enabled`.
    let on = !log.is_null() && ngx::log::check_mask(DebugMask::Stream, unsafe { (*log).log_level });
    on.then_some(log)
}

/// Formats `args` into a stack buffer (truncated as nginx truncates) and hands
/// it to nginx at `level`; `log` comes from [`enabled`] or [`debug_enabled`].
#[doc(hidden)]
pub fn write(level: u32, log: *mut ngx_log_t, args: fmt::Arguments<'_>) {
    let mut buf = [const { MaybeUninit::<u8>::uninit() }; ngx::log::LOG_BUFFER_SIZE];
    let line = ngx::log::write_fmt(&mut buf, args);
    // SAFETY: `log` is live (see `enabled`); `line` is a byte slice nginx
    // copies with "%*s".
    unsafe { ngx::log::log_error(level as ngx::ffi::ngx_uint_t, log, 0, line) };
}

/// A line at a level chosen at run time (`NGX_LOG_*`).
macro_rules! at {
    ($level:expr, $($arg:tt)+) => {{
        let level: u32 = $level;
        if let Some(log) = $crate::log::enabled(level) {
            $crate::log::write(level, log, format_args!($($arg)+));
        }
    }};
}

macro_rules! alert {
    ($($arg:tt)+) => { $crate::log::at!(::ngx::ffi::NGX_LOG_ALERT, $($arg)+) };
}

macro_rules! error {
    ($($arg:tt)+) => { $crate::log::at!(::ngx::ffi::NGX_LOG_ERR, $($arg)+) };
}

// Named `warn!` on export: a macro defined as `warn` clashes with the
// built-in attribute of that name.
macro_rules! warn_ {
    ($($arg:tt)+) => { $crate::log::at!(::ngx::ffi::NGX_LOG_WARN, $($arg)+) };
}

/// A debug line (stream mask), as nginx's own balancers write one in every
/// step; compiled to nothing unless nginx was built `--with-debug`.
macro_rules! debug {
    ($($arg:tt)+) => {{
        if let Some(log) = $crate::log::debug_enabled() {
            $crate::log::write(::ngx::ffi::NGX_LOG_DEBUG, log, format_args!($($arg)+));
        }
    }};
}

pub(crate) use {alert, at, debug, error, warn_ as warn};
