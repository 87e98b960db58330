//! Which `init_upstream` a block with `consul_upstream` ends up with, whatever
//! the order of its lines: the module's balancer, alone or under http's
//! `keepalive`; and the balancers that cannot work with discovered peers.
//!
//! `keepalive N` (http) wraps a balancer. Before nginx 1.29.7 its handler wraps
//! whatever `init_upstream` the block has **at its line** (round robin if none)
//! and installs its own; from 1.29.7 the handler only records `N`, and keepalive
//! wraps every block's `peer.init` once all blocks are initialized, so the order
//! of lines does not matter there. For the older regime this module sees
//! `keepalive` first ([`keepalive`]): in a block without `consul_upstream` yet,
//! it puts the shim `below_keepalive` (see `crate::balancer`) under keepalive,
//! which calls the module's balancer if a `consul_upstream` line follows, else
//! what nginx's keepalive would have called (the method before it, or round
//! robin). The wrapper keepalive installs is recorded in the block
//! ([`Block::keepalive`]); a `consul_upstream` line keeps it, and puts it back
//! after a method line that replaced it. The regime is told by effect: a
//! handler that left the shim in place is the new one, and the shim goes.
//!
//! `sticky` (nginx ≥ 1.29.6), `least_time` (1.31) and OpenResty's
//! `balancer_by_lua*` are other balancers: refused beside `consul_upstream`,
//! in either order ([`foreign`]).

use std::ffi::{c_char, c_void};

use ngx::ffi::{ngx_command_t, ngx_conf_t};

use super::methods::NginxHandler;
use super::{block_of, directive_result};
use crate::block::Block;
use crate::protocol::Protocol;

/// Installs the module's balancer in a block that gets its first
/// `consul_upstream` line (see the module's opening).
pub fn install_balancer<P: Protocol>(
    block: &mut Block<P>,
    uscf: &mut P::Uscf,
) -> Result<(), String> {
    if let Some(directive) = &block.foreign {
        return Err(refusal(directive));
    }
    let hooks = P::hooks(uscf);
    let next = match (*hooks.init_upstream, block.keepalive) {
        (None, _) => P::init_upstream(),
        // keepalive's line came first: it calls the shim, which calls ours.
        (Some(f), Some(k)) if std::ptr::fn_addr_eq(f, k) => k,
        // A method this module saw (`hash; consul_upstream;`): ours takes its
        // place, under keepalive if keepalive's line came first (and the
        // method's line replaced it: `keepalive; hash; consul_upstream;`).
        (Some(_), k) if block.method.is_some() => k.unwrap_or(P::init_upstream()),
        (Some(_), _) => {
            return Err(
                "\"consul_upstream\" cannot be combined with another load balancing method".into(),
            )
        }
    };
    *hooks.init_upstream = Some(next);
    Ok(())
}

/// Whether the block's balancer is still the module's (or keepalive over it)
/// and was initialized, once the protocol's block is read.
pub fn kept<P: Protocol>(block: &Block<P>, uscf: &mut P::Uscf) -> bool {
    let current = *P::hooks(uscf).init_upstream;
    let ours = current.is_some_and(|f| {
        std::ptr::fn_addr_eq(f, P::init_upstream())
            || block.keepalive.is_some_and(|k| std::ptr::fn_addr_eq(f, k))
    });
    ours && block.initialized
}

fn refusal(directive: &str) -> String {
    format!("\"consul_upstream\" cannot be combined with \"{directive}\"")
}

/// `keepalive N [local]` in an http `upstream {}`, seen before nginx's
/// keepalive module (see the module's opening).
pub unsafe extern "C" fn keepalive<P: Protocol>(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls directive handlers with the configuration being parsed,
    // the command, and (NGX_*_SRV_CONF_OFFSET) this module's block conf.
    let (cf, cmd, block) = unsafe { (&mut *cf, &*cmd, block_of::<P>(conf)) };
    directive_result(cf, |cf| {
        let name = String::from_utf8_lossy(cmd.name.as_bytes()).into_owned();
        let theirs = NginxHandler::find::<P>(cf, "ngx_http_upstream_keepalive_module", &name)?;
        let uscf = P::block_uscf(cf).ok_or("no upstream block")?;
        let before = *P::hooks(uscf).init_upstream;
        let shim = P::below_keepalive();
        if block.upstream.is_none() {
            block.below = before;
            *P::hooks(uscf).init_upstream = Some(shim);
        }
        let rv = theirs.call::<P>(cf);
        let after = *P::hooks(uscf).init_upstream;
        match after {
            // nginx ≥ 1.29.7 (or a refusal): nothing wraps the shim.
            Some(f) if std::ptr::fn_addr_eq(f, shim) => *P::hooks(uscf).init_upstream = before,
            Some(f) if before.is_none_or(|b| !std::ptr::fn_addr_eq(f, b)) => {
                block.keepalive = Some(f)
            }
            _ => {}
        }
        Ok(rv)
    })
}

/// A directive of a balancer that cannot work with discovered peers: handed
/// on to its module in a block without `consul_upstream` (nginx's own
/// "unknown directive" where this nginx has no such module); refused in a
/// block with one, whichever line comes first.
pub unsafe extern "C" fn foreign<P: Protocol>(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: as in `keepalive`.
    let (cf, cmd, block) = unsafe { (&mut *cf, &*cmd, block_of::<P>(conf)) };
    directive_result(cf, |cf| {
        let name = String::from_utf8_lossy(cmd.name.as_bytes()).into_owned();
        let owner = P::FOREIGN
            .iter()
            .find(|(d, _)| *d == name)
            .map(|(_, m)| *m)
            .ok_or_else(|| format!("unknown directive \"{name}\""))?;
        let theirs = NginxHandler::find::<P>(cf, owner, &name)
            .map_err(|_| format!("unknown directive \"{name}\""))?;
        if block.upstream.is_some() {
            return Err(refusal(&name));
        }
        block.foreign.get_or_insert(name);
        Ok(theirs.call::<P>(cf))
    })
}
