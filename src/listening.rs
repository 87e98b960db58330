//! nginx's own listening sockets and the host's addresses: a discovered peer at
//! one of them would send each connection back into nginx (a proxy loop that
//! ends when `worker_connections` runs out).

use std::net::IpAddr;

use ngx::ffi::{ngx_cycle_t, ngx_listening_t};

use consul_core::answer::OwnAddresses;

use crate::sockaddr::SockaddrBuf;

/// The cycle's listening sockets (every module's: stream, http, mail) and the
/// addresses of the host's interfaces.
pub fn own_addresses(cycle: &ngx_cycle_t) -> OwnAddresses {
    let mut own = OwnAddresses::default();
    let listening = &cycle.listening;
    let list = listening.elts as *const ngx_listening_t;
    for i in 0..listening.nelts {
        // SAFETY: i < nelts of the cycle's listening array.
        let ls = unsafe { &*list.add(i) };
        if ls.sockaddr.is_null() {
            continue;
        }
        let len = (ls.socklen as usize).min(std::mem::size_of::<SockaddrBuf>());
        let mut buf = SockaddrBuf::empty();
        // SAFETY: nginx's sockaddr of socklen bytes, copied into a buffer that
        // holds the largest IP socket address.
        unsafe {
            std::ptr::copy_nonoverlapping(
                ls.sockaddr as *const u8,
                buf.as_mut_ptr() as *mut u8,
                len,
            )
        };
        if let Some(addr) = buf.socket_addr() {
            own.listen.push(addr);
        }
    }
    own.local_ips = interface_addresses();
    own
}

/// Every address of the host's interfaces.
fn interface_addresses() -> Vec<IpAddr> {
    let mut ips = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills head with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return ips;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            let mut buf = SockaddrBuf::empty();
            // SAFETY: ifa_addr points at a sockaddr of its family; we copy at most
            // the size of the family's structure.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            let len = match family {
                libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
                libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
                _ => 0,
            };
            if len > 0 {
                // SAFETY: as above.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        ifa.ifa_addr as *const u8,
                        buf.as_mut_ptr() as *mut u8,
                        len,
                    )
                };
                if let Some(addr) = buf.socket_addr() {
                    ips.push(addr.ip());
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs above.
    unsafe { libc::freeifaddrs(head) };
    ips
}
