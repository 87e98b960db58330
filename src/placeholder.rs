//! The placeholder server: nginx refuses an upstream block without servers, so
//! a `consul_upstream` line adds one, and the module's `init_upstream` takes it
//! out again before nginx's round robin sees the block's static servers.

use std::ptr;

use ngx::core::Pool;
use ngx::ffi::{ngx_addr_t, ngx_array_push, ngx_conf_t, ngx_str_t, socklen_t};

use crate::protocol::Protocol;

/// Marks the placeholder server: its name points at this text.
static PLACEHOLDER: &str = "consul_upstream";

/// Adds the placeholder to the block's servers. It has an address (0.0.0.0:0)
/// so that a balancer that replaced ours (`least_conn` after `consul_upstream`
/// in a block nginx reads without this module's help) gets as far as the
/// module's check once the block is read, which names the conflict, instead
/// of "no servers in upstream".
pub fn add<P: Protocol>(cf: &mut ngx_conf_t, uscf: &mut P::Uscf) -> Result<(), String> {
    // SAFETY: cf.pool is the configuration's pool, alive for the whole cycle.
    let pool = unsafe { Pool::from_ngx_pool(cf.pool) };
    let sin = pool.calloc(std::mem::size_of::<libc::sockaddr_in>()) as *mut libc::sockaddr_in;
    let addr = pool.calloc(std::mem::size_of::<ngx_addr_t>()) as *mut ngx_addr_t;
    let servers = P::hooks(uscf).servers;
    if servers.is_null() {
        return Err("no server list in the upstream block".into());
    }
    // SAFETY: the block's server array (created with the block).
    let server = unsafe { ngx_array_push(servers) } as *mut P::Server;
    if sin.is_null() || addr.is_null() || server.is_null() {
        return Err("out of memory".into());
    }
    let name = ngx_str_t {
        len: PLACEHOLDER.len(),
        data: PLACEHOLDER.as_ptr() as *mut u8,
    };
    // SAFETY: fresh, zeroed pool memory of the right sizes; a zeroed server is
    // nginx's initial state for one.
    unsafe {
        (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
        (*addr).sockaddr = sin as *mut ngx::ffi::sockaddr;
        (*addr).socklen = std::mem::size_of::<libc::sockaddr_in>() as socklen_t;
        (*addr).name = name;
        ptr::write_bytes(server, 0, 1);
        P::init_server(&mut *server, name, addr);
    }
    Ok(())
}

/// Takes the placeholder out of the block's servers; returns how many (static)
/// servers are left.
pub fn remove<P: Protocol>(uscf: &mut P::Uscf) -> usize {
    let servers = P::hooks(uscf).servers;
    let Some(list) = P::servers(uscf) else {
        return 0;
    };
    let mut kept = 0;
    for i in 0..list.len() {
        if !ptr::eq(P::server_name(&list[i]).data, PLACEHOLDER.as_ptr()) {
            list.swap(kept, i);
            kept += 1;
        }
    }
    // SAFETY: the block's server array (non-null: it had a list).
    unsafe { (*servers).nelts = kept };
    kept
}
