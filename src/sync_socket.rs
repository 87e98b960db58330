//! The master's sockets before it forks workers (no event loop yet): non-blocking
//! connects that its lookups (`sync_resolve`) and API requests (`api::sync_get`)
//! wait for with poll(2).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::sockaddr::SockaddrBuf;

/// A non-blocking socket of `kind` (`SOCK_STREAM`, `SOCK_DGRAM`) connecting to
/// `addr`, and whether the connect is still in progress (TCP only: EINPROGRESS).
pub fn connect(addr: SocketAddr, kind: libc::c_int) -> io::Result<(OwnedFd, bool)> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned below.
    let raw = unsafe { libc::socket(domain, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor socket(2) just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (sa, len) = SockaddrBuf::new(&addr);
    // SAFETY: sa holds a socket address of len bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), sa.as_ptr(), len) } == 0 {
        return Ok((fd, false));
    }
    let err = io::Error::last_os_error();
    if kind == libc::SOCK_STREAM && err.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok((fd, true))
    } else {
        Err(err)
    }
}

/// How a connect in progress on `fd` ended (SO_ERROR): Ok once connected.
pub fn connect_result(fd: &OwnedFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err and len are valid for getsockopt's SO_ERROR.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}
