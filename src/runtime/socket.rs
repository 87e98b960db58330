//! [`Socket`]: a non-blocking socket registered with nginx's event loop as a
//! connection, read and written by hickory and the API client as futures.

use std::cell::Cell;
use std::ffi::c_void;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll, Waker};

use futures_io::{AsyncRead, AsyncWrite};
use hickory_resolver::net::runtime::{DnsTcpStream, DnsUdpSocket};
use ngx::ffi::{
    ngx_close_connection, ngx_connection_t, ngx_event_t, ngx_get_connection, ngx_handle_read_event,
    ngx_handle_write_event, ngx_int_t, NGX_OK,
};

use super::provider::NgxTime;
use super::SOCKETS;
use crate::ffi;
use crate::sockaddr::SockaddrBuf;

/// The tasks waiting for a socket to become readable or writable.
#[derive(Default)]
struct Wakers {
    read: Cell<Option<Waker>>,
    write: Cell<Option<Waker>>,
}

/// A non-blocking socket registered with nginx's event loop as a connection.
pub struct Socket {
    c: NonNull<ngx_connection_t>,
    /// Boxed: the connection's `data` points at it.
    wakers: Box<Wakers>,
}

// SAFETY: a Socket is created, polled and dropped on the worker's event loop
// thread only; no other thread exists in the process to move or share it.
unsafe impl Send for Socket {}
// SAFETY: as above.
unsafe impl Sync for Socket {}

#[derive(Clone, Copy)]
enum Ready {
    Read,
    Write,
}

impl Socket {
    pub(super) fn open(addr: &SocketAddr, kind: libc::c_int) -> io::Result<Socket> {
        let family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2).
        let fd =
            unsafe { libc::socket(family, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let log = ffi::cycle_log();
        // SAFETY: fd is ours; nginx takes it over (ngx_close_connection closes it).
        let c = unsafe { ngx_get_connection(fd, log) };
        let Some(c) = NonNull::new(c) else {
            // SAFETY: fd was not handed over.
            unsafe { libc::close(fd) };
            return Err(io::Error::other("no free connection for a DNS socket"));
        };
        let wakers = Box::<Wakers>::default();
        // SAFETY: a fresh connection with its read and write events.
        unsafe {
            let conn = &mut *c.as_ptr();
            conn.data = &*wakers as *const Wakers as *mut c_void;
            conn.log = log;
            for (ev, handler) in [
                (
                    conn.read,
                    on_readable as unsafe extern "C" fn(*mut ngx_event_t),
                ),
                (conn.write, on_writable),
            ] {
                (*ev).log = log;
                (*ev).handler = Some(handler);
                // Like nginx's own resolver sockets: a graceful exit does not
                // report them as left open.
                (*ev).set_resolver(1);
            }
        }
        SOCKETS.with(|s| s.borrow_mut().push(c));
        Ok(Socket { c, wakers })
    }

    /// The connection, unless [`super::shutdown`] closed it already.
    fn conn(&self) -> Option<&ngx_connection_t> {
        let open = SOCKETS.with(|s| s.borrow().contains(&self.c));
        if !open {
            return None;
        }
        // SAFETY: registered connections are open and ours.
        Some(unsafe { self.c.as_ref() })
    }

    fn fd(&self) -> libc::c_int {
        self.conn().map_or(-1, |c| c.fd)
    }

    pub(super) fn set_nodelay(&self) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt from a local int.
        let rc = unsafe {
            libc::setsockopt(
                self.fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &one as *const libc::c_int as *const c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) fn bind(&self, addr: &SocketAddr) -> io::Result<()> {
        let (sa, len) = SockaddrBuf::new(addr);
        // SAFETY: a valid sockaddr of len bytes.
        if unsafe { libc::bind(self.fd(), sa.as_ptr(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) async fn connect(&self, addr: &SocketAddr) -> io::Result<()> {
        let (sa, len) = SockaddrBuf::new(addr);
        // SAFETY: a valid sockaddr of len bytes.
        if unsafe { libc::connect(self.fd(), sa.as_ptr(), len) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
        poll_fn(|cx| self.poll_writable(cx)).await?;
        let mut so_error: libc::c_int = 0;
        let mut optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a local int.
        let rc = unsafe {
            libc::getsockopt(
                self.fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut so_error as *mut libc::c_int as *mut c_void,
                &mut optlen,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if so_error != 0 {
            return Err(io::Error::from_raw_os_error(so_error));
        }
        Ok(())
    }

    /// Ready once nginx reported the socket writable (a connect finished).
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(conn) = self.conn() else {
            return Poll::Ready(Err(closed()));
        };
        // SAFETY: the connection's write event lives with it.
        if unsafe { (*conn.write).ready() } != 0 {
            return Poll::Ready(Ok(()));
        }
        self.wait(Ready::Write, cx)
    }

    /// Runs a non-blocking system call until it does not ask to be retried.
    fn poll_io(
        &self,
        ready: Ready,
        cx: &mut Context<'_>,
        mut call: impl FnMut(libc::c_int) -> isize,
    ) -> Poll<io::Result<usize>> {
        if self.conn().is_none() {
            return Poll::Ready(Err(closed()));
        }
        loop {
            let n = call(self.fd());
            if n >= 0 {
                return Poll::Ready(Ok(n as usize));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return self.wait(ready, cx),
                _ => return Poll::Ready(Err(err)),
            }
        }
    }

    /// Parks the task until nginx reports the socket ready.
    fn wait<T>(&self, ready: Ready, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let Some(conn) = self.conn() else {
            return Poll::Ready(Err(closed()));
        };
        // SAFETY: the connection and its events are open (checked above).
        let rc: ngx_int_t = unsafe {
            match ready {
                Ready::Read => {
                    self.wakers.read.set(Some(cx.waker().clone()));
                    (*conn.read).set_ready(0);
                    ngx_handle_read_event(conn.read, 0)
                }
                Ready::Write => {
                    self.wakers.write.set(Some(cx.waker().clone()));
                    (*conn.write).set_ready(0);
                    ngx_handle_write_event(conn.write, 0)
                }
            }
        };
        if rc != NGX_OK as ngx_int_t {
            return Poll::Ready(Err(io::Error::other("cannot watch a DNS socket")));
        }
        Poll::Pending
    }
}

impl Socket {
    /// The nginx connection, for TLS over it (`crate::api::tls`); `None` once
    /// [`super::shutdown`] closed it.
    pub fn connection(&self) -> Option<NonNull<ngx_connection_t>> {
        self.conn().map(|_| self.c)
    }

    /// Parks the task until nginx reports the socket readable (`write`: writable).
    pub fn poll_ready(&self, write: bool, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.wait(if write { Ready::Write } else { Ready::Read }, cx)
    }
}

fn closed() -> io::Error {
    io::Error::other("DNS socket closed (discovery stopped)")
}

impl Drop for Socket {
    fn drop(&mut self) {
        let open = SOCKETS.with(|s| {
            let mut s = s.borrow_mut();
            let before = s.len();
            s.retain(|c| *c != self.c);
            s.len() != before
        });
        if open {
            // SAFETY: ours since open and still open; closes the fd and removes its events.
            unsafe { ngx_close_connection(self.c.as_ptr()) };
        }
    }
}

unsafe extern "C" fn on_readable(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this with the read event of a Socket's connection.
    unsafe { wake(ev, Ready::Read) };
}

unsafe extern "C" fn on_writable(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this with the write event of a Socket's connection.
    unsafe { wake(ev, Ready::Write) };
}

/// # Safety
/// `ev` is an event of a connection opened by [`Socket::open`] and not closed.
unsafe fn wake(ev: *mut ngx_event_t, ready: Ready) {
    // SAFETY: per the contract, data is the connection whose data is the Wakers.
    let wakers = unsafe {
        let c = (*ev).data as *const ngx_connection_t;
        &*((*c).data as *const Wakers)
    };
    let waker = match ready {
        Ready::Read => wakers.read.take(),
        Ready::Write => wakers.write.take(),
    };
    if let Some(w) = waker {
        w.wake();
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        // SAFETY: recv into buf, at most its length.
        self.poll_io(Ready::Read, cx, |fd| unsafe {
            libc::recv(fd, buf.as_mut_ptr() as *mut c_void, buf.len(), 0)
        })
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // SAFETY: send from buf, at most its length.
        self.poll_io(Ready::Write, cx, |fd| unsafe {
            libc::send(
                fd,
                buf.as_ptr() as *const c_void,
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) of our fd (-1 once closed: EBADF, ignored).
        unsafe { libc::shutdown(self.fd(), libc::SHUT_WR) };
        Poll::Ready(Ok(()))
    }
}

impl DnsTcpStream for Socket {
    type Time = NgxTime;
}

impl DnsUdpSocket for Socket {
    type Time = NgxTime;

    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        let mut from = SockaddrBuf::empty();
        let mut len = std::mem::size_of::<SockaddrBuf>() as libc::socklen_t;
        // SAFETY: recvfrom into buf and a sockaddr buffer of len bytes.
        let n = std::task::ready!(self.poll_io(Ready::Read, cx, |fd| unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut c_void,
                buf.len(),
                0,
                from.as_mut_ptr(),
                &mut len,
            )
        }))?;
        let from = from
            .socket_addr()
            .ok_or_else(|| io::Error::other("datagram from an unknown address family"))?;
        Poll::Ready(Ok((n, from)))
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        let (sa, len) = SockaddrBuf::new(&target);
        // SAFETY: sendto from buf to a valid sockaddr of len bytes.
        self.poll_io(Ready::Write, cx, |fd| unsafe {
            libc::sendto(
                fd,
                buf.as_ptr() as *const c_void,
                buf.len(),
                libc::MSG_NOSIGNAL,
                sa.as_ptr(),
                len,
            )
        })
    }
}
