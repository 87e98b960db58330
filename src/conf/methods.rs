//! nginx's own balancing directives — `least_conn;`, `hash KEY [consistent];`,
//! `random [two [least_conn]];`, http's `ip_hash;` — in an upstream that has
//! `consul_upstream`, and nginx's `server` line after `hash` or `random` (its
//! `backup`).
//!
//! The protocol's module is placed before nginx's upstream and balancer
//! modules (`ngx_module_order` in lib.rs), so these directives reach its
//! commands first ([`NginxHandler`] hands them on; `zone` and `keepalive` too,
//! see [`super::zone_directive`] and [`super::chain`]). Each one records the
//! method in the block's conf, then hands the directive on, unchanged, to
//! nginx's own module: an upstream without `consul_upstream` works exactly as
//! before, and nginx checks the arguments as it always does. With `consul_upstream` in the block
//! (before or after the method), the module's balancer stays in charge and
//! applies the method to the discovered peers.

use std::ffi::{c_char, c_void};

use ngx::core::NGX_CONF_OK;
use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_module_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_2MORE,
    NGX_CONF_FLAG, NGX_CONF_MAX_ARGS, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE2,
    NGX_CONF_TAKE3, NGX_CONF_TAKE4, NGX_CONF_TAKE5, NGX_CONF_TAKE6, NGX_CONF_TAKE7, NGX_LOG_WARN,
};

use consul_core::method::Method;

use super::{block_of, directive_result};
use crate::block::{Block, Chosen};
use crate::ffi;
use crate::protocol::{Key, Protocol};

/// nginx's own handler of a directive that this module sees first.
pub struct NginxHandler {
    module: &'static ngx_module_t,
    cmd: &'static ngx_command_t,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
}

impl NginxHandler {
    /// `directive` of nginx's module `owner` of protocol `P`.
    pub fn find<P: Protocol>(
        cf: &ngx_conf_t,
        owner: &str,
        directive: &str,
    ) -> Result<NginxHandler, String> {
        let module = ffi::find_module(cf, P::MODULE_TYPE, owner).ok_or_else(|| {
            format!("\"{directive}\" is not available: this nginx is built without {owner}")
        })?;
        ffi::find_command(module, directive)
            .and_then(|cmd| cmd.set.map(|set| NginxHandler { module, cmd, set }))
            .ok_or_else(|| format!("\"{directive}\" is not available in {owner}"))
    }

    /// Calls it on the directive being parsed, as nginx would have: with the
    /// number of arguments its command takes (this module's twin of the
    /// command may take more, for another nginx version), and its own conf.
    pub fn call<P: Protocol>(&self, cf: &mut ngx_conf_t) -> *mut c_char {
        // SAFETY: cf.args holds the directive's words.
        let words = unsafe { (*cf.args).nelts };
        if !takes(self.cmd.type_, words) {
            let name = String::from_utf8_lossy(self.cmd.name.as_bytes()).into_owned();
            ngx::ngx_conf_log_error!(
                ngx::ffi::NGX_LOG_EMERG,
                cf,
                "invalid number of arguments in \"{}\" directive",
                name
            );
            return ngx::core::NGX_CONF_ERROR;
        }
        // SAFETY: inside a block of P's type, for one of the module's commands
        // in that context.
        let their_conf = unsafe { ffi::handler_conf(cf, self.module, self.cmd) };
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

/// Whether a command of `kind` takes a directive of `words` words (its name
/// first), as `ngx_conf_handler` checks it.
fn takes(kind: ngx_uint_t, words: usize) -> bool {
    const ARGUMENT_NUMBER: [u32; 8] = [
        NGX_CONF_NOARGS,
        NGX_CONF_TAKE1,
        NGX_CONF_TAKE2,
        NGX_CONF_TAKE3,
        NGX_CONF_TAKE4,
        NGX_CONF_TAKE5,
        NGX_CONF_TAKE6,
        NGX_CONF_TAKE7,
    ];
    let has = |flag: u32| kind & flag as ngx_uint_t != 0;
    if has(NGX_CONF_FLAG) {
        words == 2
    } else if has(NGX_CONF_1MORE) {
        words >= 2
    } else if has(NGX_CONF_2MORE) {
        words >= 3
    } else if words > NGX_CONF_MAX_ARGS as usize {
        false
    } else {
        words
            .checked_sub(1)
            .and_then(|n| ARGUMENT_NUMBER.get(n))
            .is_some_and(|&flag| has(flag))
    }
}

/// The method the words ask for, and whether it hashes a key or the client's
/// address (nginx's own handler checks the words in detail).
fn method_of(words: &[String]) -> Option<(Method, Option<KeyKind>)> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["least_conn"] => Some((Method::LeastConn, None)),
        ["hash", _] => Some((Method::Hash, Some(KeyKind::Complex))),
        ["hash", _, "consistent"] => Some((Method::ConsistentHash, Some(KeyKind::Complex))),
        // nginx's ip_hash: a hash of the client's /24 (IPv4) or whole address.
        ["ip_hash"] => Some((Method::Hash, Some(KeyKind::ClientAddr))),
        ["random"] => Some((Method::Random, None)),
        ["random", "two"] | ["random", "two", "least_conn"] => Some((Method::RandomTwo, None)),
        _ => None,
    }
}

enum KeyKind {
    Complex,
    ClientAddr,
}

/// The directive handler for the protocol's methods in `upstream {}`.
pub unsafe extern "C" fn method<P: Protocol>(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls directive handlers with the configuration being parsed,
    // the command, and (NGX_*_SRV_CONF_OFFSET) this module's block conf.
    let (cf, cmd, block) = unsafe { (&mut *cf, &*cmd, block_of::<P>(conf)) };
    directive_result(cf, |cf| pass_on::<P>(cf, cmd, block))
}

fn pass_on<P: Protocol>(
    cf: &mut ngx_conf_t,
    cmd: &ngx_command_t,
    block: &mut Block<P>,
) -> Result<*mut c_char, String> {
    let directive = String::from_utf8_lossy(cmd.name.as_bytes()).into_owned();
    let owner = P::METHODS
        .iter()
        .find(|(d, _)| *d == directive)
        .map(|(_, m)| *m)
        .ok_or_else(|| format!("unknown directive \"{directive}\""))?;
    let theirs = NginxHandler::find::<P>(cf, owner, &directive)?;
    let uscf = P::block_uscf(cf).ok_or("no upstream block")?;
    // With consul_upstream in the block, the balancer it installed stays (with
    // keepalive over it, if so): nginx's "load balancing method redefined"
    // only if a method was given before.
    let kept = block
        .upstream
        .is_some()
        .then(|| P::hooks(uscf).init_upstream.take());
    if kept.is_some() && block.method.is_some() {
        ngx::ngx_conf_log_error!(NGX_LOG_WARN, cf, "load balancing method redefined");
    }
    let rv = theirs.call::<P>(cf);
    if let Some(kept) = kept {
        *P::hooks(uscf).init_upstream = kept;
        // Static servers stay round robin's, which has backups.
        *P::hooks(uscf).flags |= P::BACKUP;
    }
    if !rv.is_null() {
        // nginx's handler said what was wrong (and logged it, if it logs).
        return Ok(rv);
    }
    let (method, key) = method_of(&ffi::words(cf)).unwrap_or((Method::default(), None));
    let key = match key {
        Some(KeyKind::Complex) => Some(Key::Complex(P::compile_key(cf, 1)?)),
        Some(KeyKind::ClientAddr) => Some(Key::ClientAddr),
        None => None,
    };
    block.method = Some(Chosen { method, key });
    Ok(NGX_CONF_OK)
}

/// `server` in `upstream {}`, seen before nginx's upstream module. After
/// `hash` or `random`, nginx refuses `backup`; but a `consul_upstream` line
/// that follows makes the block's static servers round robin's, which has
/// backups (every other order of these lines is accepted). Such a server is
/// taken, and the block refused after all with nginx's own message for that
/// line if no `consul_upstream` line came (see `super::postconfiguration`).
pub unsafe extern "C" fn server<P: Protocol>(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: as in `method`.
    let (cf, block) = unsafe { (&mut *cf, block_of::<P>(conf)) };
    directive_result(cf, |cf| {
        let theirs = NginxHandler::find::<P>(cf, P::UPSTREAM_MODULE, "server")?;
        let uscf = P::block_uscf(cf).ok_or("no upstream block")?;
        let deferred = block.upstream.is_none()
            && block.method.is_some()
            && *P::hooks(uscf).flags & P::BACKUP == 0
            && ffi::words(cf).iter().skip(2).any(|w| w == "backup");
        if !deferred {
            return Ok(theirs.call::<P>(cf));
        }
        *P::hooks(uscf).flags |= P::BACKUP;
        let rv = theirs.call::<P>(cf);
        *P::hooks(uscf).flags &= !P::BACKUP;
        if rv.is_null() && block.deferred_backup.is_none() {
            block.deferred_backup = Some(ffi::conf_position(cf));
        }
        Ok(rv)
    })
}
