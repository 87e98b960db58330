//! Socket addresses in the C form nginx and the kernel take, built from std's.

use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libc::socklen_t;

/// Room for an IPv4 or IPv6 socket address.
#[repr(C)]
#[derive(Clone, Copy)]
pub union SockaddrBuf {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl SockaddrBuf {
    /// The C form of `addr`, and its length.
    pub fn new(addr: &SocketAddr) -> (SockaddrBuf, socklen_t) {
        match addr {
            SocketAddr::V4(a) => {
                let v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                (
                    SockaddrBuf { v4 },
                    size_of::<libc::sockaddr_in>() as socklen_t,
                )
            }
            SocketAddr::V6(a) => {
                let v6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                (
                    SockaddrBuf { v6 },
                    size_of::<libc::sockaddr_in6>() as socklen_t,
                )
            }
        }
    }

    /// An all-zero buffer for the kernel to fill (recvfrom).
    pub fn empty() -> SockaddrBuf {
        // SAFETY: all-zero is a valid sockaddr_in/sockaddr_in6.
        unsafe { std::mem::zeroed() }
    }

    pub fn as_ptr(&self) -> *const libc::sockaddr {
        self as *const SockaddrBuf as *const libc::sockaddr
    }

    pub fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        self as *mut SockaddrBuf as *mut libc::sockaddr
    }

    /// Back to std's form; None for another address family.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the family field is at the same place in both variants; each
        // variant is read only when the family says it is the one written.
        unsafe {
            match self.v4.sin_family as libc::c_int {
                libc::AF_INET => Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(self.v4.sin_addr.s_addr)),
                    u16::from_be(self.v4.sin_port),
                ))),
                libc::AF_INET6 => Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(self.v6.sin6_addr.s6_addr),
                    u16::from_be(self.v6.sin6_port),
                    self.v6.sin6_flowinfo,
                    self.v6.sin6_scope_id,
                ))),
                _ => None,
            }
        }
    }
}
