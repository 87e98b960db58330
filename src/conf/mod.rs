//! Configuration, for both protocols: the `consul_upstream` directive, the
//! module's conf of a block ([`Block`]), nginx's directives this module sees
//! first ([`methods`], [`chain`], [`zone_directive`]), and the checks that
//! need the protocol's whole block.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void};

use ngx::core::{Pool, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_full_name, ngx_conf_t, ngx_int_t, ngx_log_error_core, ngx_str_t,
    NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
};

use consul_core::key::UpstreamKey;
use consul_core::peer::line_source_tag;
use consul_core::settings::{upstream_wide_param, Settings};
use consul_core::view::{Balancing, PeerView};
use consul_core::zone::MAX_LINES;

use crate::block::Block;
use crate::protocol::Protocol;
use crate::registry::Registry;
use crate::upstream::{Fallback, Line, Local, Upstream};
use crate::{ffi, placeholder, zone};

pub mod chain;
pub mod methods;
pub mod zone_directive;

/// `create_srv_conf` of the protocol's module: a [`Block`] for every `server {}`
/// and `upstream {}` block.
pub unsafe extern "C" fn create_srv_conf<P: Protocol>(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx passes the configuration being parsed; its pool lives as long
    // as the cycle, and `allocate` registers a cleanup that drops the value.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    pool.allocate(Block::<P>::default()) as *mut c_void
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
            ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf_ptr, "{}", msg);
            NGX_CONF_ERROR
        }
    }
}

/// The conf a handler of this module's `NGX_*_SRV_CONF_OFFSET` commands gets.
///
/// # Safety
/// `conf` must be what nginx passes such a handler of protocol `P`.
pub unsafe fn block_of<'a, P: Protocol>(conf: *mut c_void) -> &'a mut Block<P> {
    // SAFETY: per the contract: the module's conf of the block being parsed.
    unsafe { &mut *(conf as *mut Block<P>) }
}

pub fn str_of(s: &ngx_str_t) -> String {
    String::from_utf8_lossy(s.as_bytes()).into_owned()
}

/// `consul_upstream QUERY | service=NAME [parameters];` in `upstream {}`.
pub unsafe extern "C" fn consul_upstream<P: Protocol>(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls directive handlers with the configuration being parsed
    // and, for NGX_*_SRV_CONF_OFFSET, this module's conf of the upstream block.
    let (cf, block) = unsafe { (&mut *cf, block_of::<P>(conf)) };
    directive_result(cf, |cf| directive::<P>(cf, block).map(|()| NGX_CONF_OK))
}

fn directive<P: Protocol>(cf: &mut ngx_conf_t, block: &mut Block<P>) -> Result<(), String> {
    let owned = ffi::words(cf);
    let words: Vec<&str> = owned.iter().skip(1).map(String::as_str).collect();
    let mut settings = Settings::parse(&words).map_err(|e| e.0)?;
    let api = crate::api::configure(&mut settings, &mut |p| full_name(cf, p))?;
    let (file, line) = ffi::conf_position(cf);
    let taken: Vec<u32> = block
        .upstream
        .iter()
        .flat_map(|up| &up.lines)
        .map(|l| l.tag)
        .collect();
    let new = Line {
        tag: line_source_tag(&settings.query, &taken),
        settings,
        file,
        line,
        api,
    };

    // A further line adds the instances of another query to the same upstream.
    if let Some(up) = block.upstream.as_mut() {
        if let Some(same) = up
            .lines
            .iter()
            .find(|l| l.settings.query == new.settings.query)
        {
            // However it is written (`service=redis`, `redis.service.consul`).
            return Err(format!(
                "\"consul_upstream\" directive is duplicate: query \"{}\" is already in {}:{}",
                same.settings.query, same.file, same.line
            ));
        }
        if let Some(w) = upstream_wide_param(&words) {
            return Err(format!(
                "invalid parameter \"{w}\": it belongs on the first \"consul_upstream\" line of the upstream"
            ));
        }
        if up.lines.len() >= MAX_LINES {
            return Err(format!(
                "too many \"consul_upstream\" lines in one upstream (at most {MAX_LINES})"
            ));
        }
        up.lines.push(new);
        return Ok(());
    }

    let uscf = P::block_uscf(cf).ok_or("no upstream block")?;
    chain::install_balancer(block, uscf)?;
    // Static servers are round robin's, which has backups, whatever method
    // (hash, random) the discovered peers are balanced by.
    *P::hooks(uscf).flags |= P::BACKUP;
    placeholder::add::<P>(cf, uscf)?;

    let key = UpstreamKey::new(P::KIND, str_of(P::hooks(uscf).host));
    let registry = Registry::of_conf(cf).ok_or("no registry of consul upstreams")?;
    let state_path = match &new.settings.state_path {
        Some(path) => {
            let full = full_name(cf, path)?;
            registry.claim_state_file(&full, &key)?;
            Some(full)
        }
        None => None,
    };
    let shm_zone = zone::register(cf, &key, new.settings.zone_size)?;
    let upstream = Box::new(Upstream {
        key,
        lines: vec![new],
        state_path,
        shm_zone,
        fallback: Cell::new(Fallback::default()),
        // The method is known once the block is read: see balancer::init_upstream.
        local: RefCell::new(Local::new(PeerView::new(Balancing::default()))),
    });
    registry.add(&upstream);
    block.upstream = Some(upstream);
    Ok(())
}

/// `path` under nginx's prefix when relative, as nginx resolves its own files.
fn full_name(cf: &mut ngx_conf_t, path: &str) -> Result<String, String> {
    let mut name = ffi::pool_str(cf, path).ok_or("out of memory")?;
    // SAFETY: cf.cycle is the cycle being configured; nginx allocates the full
    // name from its pool.
    if unsafe { ngx_conf_full_name(cf.cycle, &mut name, 0) } != NGX_OK as ngx_int_t {
        return Err("out of memory".into());
    }
    Ok(str_of(&name))
}

/// An `[emerg]` line outside a directive (the message names the place).
fn emerg(cf: &ngx_conf_t, msg: &str) {
    // SAFETY: a plain log call with a "%*s" format and its two arguments.
    unsafe {
        ngx_log_error_core(
            NGX_LOG_EMERG as usize,
            cf.log,
            0,
            c"%*s".as_ptr(),
            msg.len(),
            msg.as_ptr(),
        )
    };
}

/// Runs a check of the protocol's whole block: an error is logged as nginx's
/// `[emerg]`, with the place it names.
fn checked<P: Protocol>(cf: &ngx_conf_t, check: fn(&ngx_conf_t) -> Result<(), String>) -> bool {
    let result = std::panic::catch_unwind(|| check(cf))
        .unwrap_or_else(|_| Err("internal error (panic) while checking the configuration".into()));
    result.map_err(|msg| emerg(cf, &msg)).is_ok()
}

/// `init_main_conf` of the protocol's module, which runs before nginx's
/// upstream module initializes the upstream blocks: a `backup` server taken
/// after `hash` or `random` in a block that got no `consul_upstream` line is
/// refused, as nginx refuses it.
pub unsafe extern "C" fn init_main_conf<P: Protocol>(
    cf: *mut ngx_conf_t,
    _conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the configuration of the parsed block.
    let cf = unsafe { &*cf };
    if checked::<P>(cf, deferred_backups::<P>) {
        NGX_CONF_OK
    } else {
        NGX_CONF_ERROR
    }
}

fn deferred_backups<P: Protocol>(cf: &ngx_conf_t) -> Result<(), String> {
    for &uscf in P::upstreams(cf) {
        // SAFETY: the upstream module's block confs, alive with the configuration.
        let Some(block) = (unsafe { uscf.as_ref() }).and_then(P::block) else {
            continue;
        };
        if let (None, Some((file, line))) = (&block.upstream, &block.deferred_backup) {
            return Err(format!(
                "balancing method does not support parameter \"backup\" in {file}:{line}"
            ));
        }
    }
    Ok(())
}

/// After the protocol's block (`stream {}`, `http {}`) is parsed and its
/// upstreams initialized: a later balancing directive that replaced the
/// module's balancer (nginx only warns) is refused.
pub unsafe extern "C" fn postconfiguration<P: Protocol>(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes the configuration of the parsed block.
    let cf = unsafe { &*cf };
    if checked::<P>(cf, balancers_kept::<P>) {
        NGX_OK as ngx_int_t
    } else {
        NGX_ERROR as ngx_int_t
    }
}

fn balancers_kept<P: Protocol>(cf: &ngx_conf_t) -> Result<(), String> {
    for &uscf in P::upstreams(cf) {
        // SAFETY: the upstream module's block confs, alive with the configuration.
        let Some(uscf) = (unsafe { uscf.as_mut() }) else {
            continue;
        };
        let Some(block) = P::block(uscf) else {
            continue;
        };
        let Some(up) = &block.upstream else {
            continue;
        };
        if !chain::kept(block, uscf) {
            return Err(format!(
                "\"consul_upstream\" cannot be combined with another load balancing method in {}:{}",
                up.first().file,
                up.first().line
            ));
        }
    }
    Ok(())
}
