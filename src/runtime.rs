//! hickory's runtime on nginx's event loop: tasks run on ngx-rust's executor,
//! timers are nginx timers, sockets are nginx connections. Discovery thus adds no
//! thread to the worker: a second thread would switch glibc (malloc, system call
//! wrappers) and the kernel (file table) to their multi-thread paths for every
//! connection the worker proxies.
//!
//! Two guarantees ngx-rust's executor does not give alone are added by [`spawn`]:
//! - a wake never runs the woken task inside the waker's call. ngx-rust runs a task
//!   at once when it is woken from outside, but hickory wakes while holding locks
//!   the woken task takes (futures_util's `Mutex` wakes a waiter with its waiter
//!   list locked): every wake is deferred to a posted event instead, queued on
//!   `ngx_posted_next_events` like ngx-rust's own, so a task that keeps waking
//!   itself cannot run ahead of proxied I/O;
//! - a panic ends its task (logged) instead of crossing into nginx.
//!
//! Every DNS socket and every background task hickory starts is registered here,
//! and [`shutdown`] closes and drops whatever is left (as `ngx_resolver_cleanup`
//! does for nginx's resolver) when discovery stops with its cycle.
//!
//! Everything here runs on the worker's only thread. hickory's bounds ask for
//! Send and Sync; the impls below satisfy them on that ground.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::ptr::NonNull;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use async_trait::async_trait;
use futures_io::{AsyncRead, AsyncWrite};
use hickory_resolver::net::runtime::{DnsTcpStream, DnsUdpSocket, RuntimeProvider, Spawn, Time};
use ngx::async_::Task;
use ngx::ffi::{
    ngx_close_connection, ngx_connection_t, ngx_delete_posted_event, ngx_event_t,
    ngx_get_connection, ngx_handle_read_event, ngx_handle_write_event, ngx_int_t, ngx_post_event,
    ngx_posted_next_events, NGX_OK,
};

use crate::sockaddr::SockaddrBuf;
use crate::{ffi, log};

/// How long a TCP connect may take when hickory gives no limit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What `ngx_event_ident` reads through an event's `data` in nginx's debug
/// lines: something laid out like the start of a connection (data, read, write,
/// fd). Events here point at this.
static EVENT_IDENT: [usize; 4] = [0, 0, 0, 0x434f_4e53]; // "CONS"

fn event_ident() -> *mut c_void {
    EVENT_IDENT.as_ptr() as *mut c_void
}

thread_local! {
    /// hickory's background tasks (one per DNS connection), until they end.
    static BACKGROUND: RefCell<Vec<Task<()>>> = const { RefCell::new(Vec::new()) };
    /// Every open DNS socket.
    static SOCKETS: RefCell<Vec<NonNull<ngx_connection_t>>> = const { RefCell::new(Vec::new()) };
}

/// Starts `future` as a task on ngx-rust's executor, with deferred wakes and
/// panics contained (see the module's documentation).
pub fn spawn<F: Future<Output = ()> + 'static>(future: F) -> Task<()> {
    ngx::async_::spawn(Guarded::new(future))
}

/// Stops everything the runtime still runs: hickory's background tasks are
/// dropped (their sockets close with them), then any socket left is closed.
pub fn shutdown() {
    let tasks = BACKGROUND.with(|b| std::mem::take(&mut *b.borrow_mut()));
    drop(tasks);
    let left = SOCKETS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for c in left {
        // SAFETY: registered by Socket::open and not closed since (close
        // unregisters); the Socket that owns it will find it gone.
        unsafe { ngx_close_connection(c.as_ptr()) };
    }
}

/// A future whose wakes go through a posted event and whose panic ends it.
struct Guarded<F> {
    future: Pin<Box<F>>,
    wake: Arc<DeferredWake>,
}

impl<F> Guarded<F> {
    fn new(future: F) -> Self {
        Guarded {
            future: Box::pin(future),
            wake: DeferredWake::new(),
        }
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.wake.set_task(cx.waker());
        let waker = Waker::from(self.wake.clone());
        let mut inner = Context::from_waker(&waker);
        let future = self.future.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(&mut inner))) {
            Ok(poll) => poll,
            Err(_) => {
                log::alert!("consul upstream: a discovery task failed (panic); it was stopped");
                Poll::Ready(())
            }
        }
    }
}

/// The waker a guarded future sees: waking posts an event, whose handler wakes
/// the task from the event loop, where no lock of hickory's is held.
struct DeferredWake {
    event: std::cell::UnsafeCell<ngx_event_t>,
    task: Cell<Option<Waker>>,
}

// SAFETY: created, woken and dropped on the worker's event loop thread only; no
// other thread exists in the process to move or share it.
unsafe impl Send for DeferredWake {}
// SAFETY: as above.
unsafe impl Sync for DeferredWake {}

impl DeferredWake {
    fn new() -> Arc<DeferredWake> {
        // SAFETY: an all-zero event is nginx's initial state for an event.
        let mut event: ngx_event_t = unsafe { std::mem::zeroed() };
        event.handler = Some(run_deferred);
        event.data = event_ident();
        Arc::new(DeferredWake {
            event: std::cell::UnsafeCell::new(event),
            task: Cell::new(None),
        })
    }

    fn set_task(&self, waker: &Waker) {
        let old = self.task.take();
        let same = old.as_ref().is_some_and(|w| w.will_wake(waker));
        self.task.set(if same { old } else { Some(waker.clone()) });
    }
}

impl Wake for DeferredWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let ev = self.event.get();
        // SAFETY: the event lives in this Arc, which stays alive while it is
        // posted (Drop unposts it); single thread.
        unsafe {
            if (*ev).posted() == 0 {
                // The cycle's log may change on a reload under master_process off.
                (*ev).log = ffi::cycle_log();
                ngx_post_event(ev, std::ptr::addr_of_mut!(ngx_posted_next_events));
            }
        }
    }
}

impl Drop for DeferredWake {
    fn drop(&mut self) {
        let ev = self.event.get_mut();
        if ev.posted() != 0 {
            // SAFETY: posted by wake_by_ref, still in nginx's posted queue.
            unsafe { ngx_delete_posted_event(ev) };
        }
    }
}

unsafe extern "C" fn run_deferred(ev: *mut ngx_event_t) {
    // SAFETY: ev is the `event` field of a live DeferredWake (posted events are
    // removed before it drops).
    let wake =
        unsafe { &*(ngx::ngx_container_of!(ev, DeferredWake, event) as *const DeferredWake) };
    if let Some(waker) = wake.task.take() {
        // Keep it for the next wake: the task may be woken again before it runs.
        wake.task.set(Some(waker.clone()));
        waker.wake();
    }
}

#[derive(Clone, Copy, Default)]
pub struct NgxRuntime;

#[derive(Clone, Copy, Default)]
pub struct NgxHandle;

#[derive(Clone, Copy, Default)]
pub struct NgxTime;

impl Spawn for NgxHandle {
    fn spawn_bg(&mut self, future: impl Future<Output = ()> + Send + 'static) {
        let task = spawn(future);
        BACKGROUND.with(|b| {
            let mut tasks = b.borrow_mut();
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        });
    }
}

/// `future`, or a TimedOut error once `duration` has passed.
pub async fn with_timeout<F: Future>(duration: Duration, future: F) -> io::Result<F::Output> {
    let mut future = pin!(future);
    let mut sleep = pin!(ngx::async_::sleep(duration));
    poll_fn(|cx| {
        if let Poll::Ready(v) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "future timed out",
            )));
        }
        Poll::Pending
    })
    .await
}

#[async_trait]
impl Time for NgxTime {
    async fn delay_for(duration: Duration) {
        ngx::async_::sleep(duration).await
    }

    async fn timeout<F: 'static + Future + Send>(
        duration: Duration,
        future: F,
    ) -> Result<F::Output, io::Error> {
        with_timeout(duration, future).await
    }
}

impl RuntimeProvider for NgxRuntime {
    type Handle = NgxHandle;
    type Timer = NgxTime;
    type Udp = Socket;
    type Tcp = Socket;

    fn create_handle(&self) -> NgxHandle {
        NgxHandle
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Socket>>>> {
        Box::pin(async move {
            let socket = Socket::open(&server_addr, libc::SOCK_STREAM)?;
            // hickory writes a message's length and its body separately: without
            // this, Nagle holds the body until the server's delayed ACK (40 ms).
            socket.set_nodelay()?;
            if let Some(local) = bind_addr {
                socket.bind(&local)?;
            }
            let wait = timeout.unwrap_or(CONNECT_TIMEOUT);
            match with_timeout(wait, socket.connect(&server_addr)).await {
                Ok(Ok(())) => Ok(socket),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TCP connect timed out",
                )),
            }
        })
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        _server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Socket>>>> {
        Box::pin(async move {
            let socket = Socket::open(&local_addr, libc::SOCK_DGRAM)?;
            socket.bind(&local_addr)?;
            Ok(socket)
        })
    }
}

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
    fn open(addr: &SocketAddr, kind: libc::c_int) -> io::Result<Socket> {
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

    /// The connection, unless [`shutdown`] closed it already.
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

    fn set_nodelay(&self) -> io::Result<()> {
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

    fn bind(&self, addr: &SocketAddr) -> io::Result<()> {
        let (sa, len) = SockaddrBuf::new(addr);
        // SAFETY: a valid sockaddr of len bytes.
        if unsafe { libc::bind(self.fd(), sa.as_ptr(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    async fn connect(&self, addr: &SocketAddr) -> io::Result<()> {
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
    /// [`shutdown`] closed it.
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
