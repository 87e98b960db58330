//! The master's request for an `api=` line before it forks workers (see
//! [`crate::prefill`]): one GET without index, which Consul answers at once,
//! over a non-blocking socket that the master's poll loop
//! ([`crate::sync_resolve`]) watches beside the DNS lines' sockets, within the
//! same bound. `https://` goes through worker 0's TLS code ([`super::tls`] over
//! a polled descriptor instead of an nginx connection); the answer is read with
//! core's [`ResponseReader`] and judged by the line's [`super::Reader`], as
//! worker 0 reads and judges it. The socket is closed when the request ends.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use consul_core::api::{ApiSettings, Token};
use consul_core::health::body_cap;
use consul_core::http::{get_request, Progress, Response, ResponseReader};
use consul_core::settings::Settings;

use super::http::{io_reason, seconds};
use super::ApiConf;
use crate::sync_socket;

#[cfg(ngx_feature = "ssl")]
use super::tls::{TlsContext, TlsStream, Transport};

/// Bytes asked of the socket per read, and reads before the loop looks at
/// the clock again.
const READ_CHUNK: usize = 64 * 1024;
const READS_PER_WAKE: usize = 16;

/// A descriptor the poll loop watches for what its socket waits for.
struct Polled {
    fd: OwnedFd,
    want: Cell<libc::c_short>,
}

impl Polled {
    fn wait(&self, events: libc::c_short) -> io::Error {
        self.want.set(events);
        io::ErrorKind::WouldBlock.into()
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is readable for its length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Err(self.wait(libc::POLLOUT)),
            e => Err(e),
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Err(self.wait(libc::POLLIN)),
            e => Err(e),
        }
    }
}

#[cfg(ngx_feature = "ssl")]
impl Transport for Polled {
    fn fd(&self) -> Option<std::ffi::c_int> {
        Some(self.fd.as_raw_fd())
    }

    /// Nothing parks: the poll loop waits for `want`, then the step runs again.
    fn poll_ready(
        &self,
        write: bool,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.want
            .set(if write { libc::POLLOUT } else { libc::POLLIN });
        std::task::Poll::Pending
    }
}

/// A connected socket, plain or TLS.
enum Conn {
    Plain(Polled),
    #[cfg(ngx_feature = "ssl")]
    Tls(Box<TlsStream<Polled>>),
}

#[cfg(ngx_feature = "ssl")]
fn step<T>(
    call: impl FnOnce(&mut std::task::Context<'_>) -> std::task::Poll<io::Result<T>>,
) -> io::Result<T> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match call(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Conn {
    fn polled(&self) -> &Polled {
        match self {
            Conn::Plain(p) => p,
            #[cfg(ngx_feature = "ssl")]
            Conn::Tls(t) => t.transport(),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(p) => p.send(buf),
            #[cfg(ngx_feature = "ssl")]
            Conn::Tls(t) => {
                use futures_io::AsyncWrite;
                step(|cx| std::pin::Pin::new(&mut **t).poll_write(cx, buf))
            }
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(p) => p.recv(buf),
            #[cfg(ngx_feature = "ssl")]
            Conn::Tls(t) => {
                use futures_io::AsyncRead;
                step(|cx| std::pin::Pin::new(&mut **t).poll_read(cx, buf))
            }
        }
    }
}

enum Stage {
    /// Not started (the socket limit).
    Waiting,
    Connect(Polled, SocketAddr),
    #[cfg(ngx_feature = "ssl")]
    Handshake(Box<TlsStream<Polled>>),
    Send {
        conn: Conn,
        written: usize,
    },
    Receive {
        conn: Conn,
        /// A byte of the answer came.
        began: bool,
    },
    Done,
}

/// One API line's request in the master.
pub struct Get {
    prefix: String,
    api: &'static ApiSettings,
    name: String,
    addrs: &'static [SocketAddr],
    next_addr: usize,
    connect_errors: Vec<String>,
    #[cfg(ngx_feature = "ssl")]
    tls: Option<&'static TlsContext>,
    request: Vec<u8>,
    reader: ResponseReader,
    stage: Stage,
    timeout: Duration,
    limit_ms: u64,
    due: Instant,
    result: Option<Result<Response, String>>,
}

impl Get {
    /// The request of an API line whose zone holds `capacity` peers (the cap
    /// on the answer's body, as worker 0's).
    pub fn new(
        prefix: String,
        settings: &'static Settings,
        api: &'static ApiSettings,
        conf: &'static ApiConf,
        capacity: usize,
    ) -> Get {
        let name = api.agent.authority();
        Get {
            prefix,
            api,
            request: get_request(
                &api.target_with(0, 0),
                &name,
                api.token.as_ref().map(Token::header_value),
            ),
            name,
            addrs: &conf.addrs,
            next_addr: 0,
            connect_errors: Vec::new(),
            #[cfg(ngx_feature = "ssl")]
            tls: conf.tls.as_ref(),
            reader: ResponseReader::new(body_cap(capacity)),
            stage: Stage::Waiting,
            timeout: Duration::from_millis(settings.timeout_ms),
            limit_ms: settings.timeout_ms,
            due: Instant::now(),
            result: None,
        }
    }

    pub fn started(&self) -> bool {
        !matches!(self.stage, Stage::Waiting)
    }

    pub fn is_done(&self) -> bool {
        self.result.is_some()
    }

    /// When the request gives up: its line's `timeout`, within the deadline.
    pub fn due(&self) -> Instant {
        self.due
    }

    /// The answer, or why there is none.
    pub fn take_result(&mut self) -> Result<Response, String> {
        self.result
            .take()
            .unwrap_or_else(|| Err(format!("{} did not answer", self.name)))
    }

    /// Connects (the first address that takes it, as worker 0's client does).
    pub fn start(&mut self, now: Instant, deadline: Instant) {
        self.due = (now + self.timeout).min(deadline);
        self.limit_ms = self.due.saturating_duration_since(now).as_millis() as u64;
        crate::log::debug!(
            "{}GET {} (before the workers start)",
            self.prefix,
            self.api.target()
        );
        self.connect_next();
    }

    /// What the socket waits for, if anything.
    pub fn poll_fd(&self) -> Option<(RawFd, libc::c_short)> {
        let polled = match &self.stage {
            Stage::Waiting | Stage::Done => return None,
            Stage::Connect(p, _) => p,
            #[cfg(ngx_feature = "ssl")]
            Stage::Handshake(t) => t.transport(),
            Stage::Send { conn, .. } | Stage::Receive { conn, .. } => conn.polled(),
        };
        Some((polled.fd.as_raw_fd(), polled.want.get()))
    }

    /// The request's time ran out.
    pub fn expire(&mut self) {
        let limit = seconds(self.limit_ms.max(1));
        let why = match &self.stage {
            Stage::Done => return,
            Stage::Connect(..) => {
                format!("cannot connect to {} (timed out after {limit})", self.name)
            }
            #[cfg(ngx_feature = "ssl")]
            Stage::Handshake(_) => {
                format!("cannot connect to {} (timed out after {limit})", self.name)
            }
            Stage::Waiting | Stage::Send { .. } | Stage::Receive { began: false, .. } => {
                format!("{} did not answer within {limit}", self.name)
            }
            Stage::Receive { began: true, .. } => {
                format!("{} did not finish its answer within {limit}", self.name)
            }
        };
        self.finish(Err(why));
    }

    fn finish(&mut self, result: Result<Response, String>) {
        self.stage = Stage::Done;
        self.result = Some(result);
    }

    fn connect_next(&mut self) {
        while let Some(&addr) = self.addrs.get(self.next_addr) {
            self.next_addr += 1;
            match open(addr) {
                Ok((polled, true)) => return self.connected(polled),
                Ok((polled, false)) => {
                    polled.want.set(libc::POLLOUT);
                    self.stage = Stage::Connect(polled, addr);
                    return;
                }
                Err(e) => self
                    .connect_errors
                    .push(format!("cannot connect to {addr} ({})", io_reason(&e))),
            }
        }
        let why = if self.connect_errors.is_empty() {
            format!("no address for {}", self.name)
        } else {
            self.connect_errors.join(", ")
        };
        self.finish(Err(why));
    }

    fn connected(&mut self, polled: Polled) {
        #[cfg(ngx_feature = "ssl")]
        if let Some(ctx) = self.tls {
            match TlsStream::new(polled, ctx, &self.api.agent) {
                Ok(t) => self.stage = Stage::Handshake(Box::new(t)),
                Err(e) => return self.finish(Err(e)),
            }
            return self.progress();
        }
        self.stage = Stage::Send {
            conn: Conn::Plain(polled),
            written: 0,
        };
        self.progress();
    }

    /// The socket is ready for what it waited for (`revents` from poll).
    pub fn on_ready(&mut self, revents: libc::c_short) {
        if let Stage::Connect(polled, addr) = &self.stage {
            if revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) == 0 {
                return;
            }
            let addr = *addr;
            match connect_result(polled) {
                Ok(()) => {
                    let Stage::Connect(polled, _) = std::mem::replace(&mut self.stage, Stage::Done)
                    else {
                        return;
                    };
                    self.connected(polled);
                }
                Err(e) => {
                    self.connect_errors
                        .push(format!("cannot connect to {addr} ({})", io_reason(&e)));
                    self.connect_next();
                }
            }
            return;
        }
        self.progress();
    }

    /// Goes as far as the socket allows: handshake, request, answer.
    fn progress(&mut self) {
        loop {
            match std::mem::replace(&mut self.stage, Stage::Done) {
                #[cfg(ngx_feature = "ssl")]
                Stage::Handshake(t) => {
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    match t.poll_handshake(&mut cx, &self.name) {
                        std::task::Poll::Pending => {
                            self.stage = Stage::Handshake(t);
                            return;
                        }
                        std::task::Poll::Ready(Err(e)) => return self.finish(Err(e)),
                        std::task::Poll::Ready(Ok(())) => {
                            self.stage = Stage::Send {
                                conn: Conn::Tls(t),
                                written: 0,
                            }
                        }
                    }
                }
                Stage::Send { mut conn, written } => match conn.write(&self.request[written..]) {
                    Ok(n) if written + n >= self.request.len() => {
                        conn.polled().want.set(libc::POLLIN);
                        self.stage = Stage::Receive { conn, began: false };
                    }
                    Ok(0) => return self.finish(Err(format!("{}: write failed", self.name))),
                    Ok(n) => {
                        self.stage = Stage::Send {
                            conn,
                            written: written + n,
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.stage = Stage::Send { conn, written };
                        return;
                    }
                    Err(e) => return self.finish(Err(format!("{}: {}", self.name, io_reason(&e)))),
                },
                Stage::Receive { conn, began } => return self.receive(conn, began),
                other => {
                    self.stage = other;
                    return;
                }
            }
        }
    }

    fn receive(&mut self, mut conn: Conn, mut began: bool) {
        let mut buf = vec![0u8; READ_CHUNK];
        for _ in 0..READS_PER_WAKE {
            match conn.read(&mut buf) {
                Ok(0) => {
                    let why = if began {
                        format!(
                            "{} closed the connection in the middle of the answer",
                            self.name
                        )
                    } else {
                        format!("{} closed the connection without answering", self.name)
                    };
                    let result = self.reader.end().ok_or(why);
                    return self.finish(result);
                }
                Ok(n) => {
                    began = true;
                    match self.reader.push(&buf[..n]) {
                        Ok(Progress::More) => {}
                        Ok(Progress::Done { response, .. }) => return self.finish(Ok(response)),
                        Err(e) => return self.finish(Err(format!("{}: {e}", self.name))),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.finish(Err(format!("{}: {}", self.name, io_reason(&e)))),
            }
        }
        self.stage = Stage::Receive { conn, began };
    }
}

/// A non-blocking TCP socket connecting to `addr`: `true` once connected.
fn open(addr: SocketAddr) -> io::Result<(Polled, bool)> {
    let (fd, in_progress) = sync_socket::connect(addr, libc::SOCK_STREAM)?;
    let polled = Polled {
        fd,
        want: Cell::new(libc::POLLOUT),
    };
    Ok((polled, !in_progress))
}

/// How a connect in progress ended.
fn connect_result(polled: &Polled) -> io::Result<()> {
    sync_socket::connect_result(&polled.fd)
}
