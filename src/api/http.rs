//! The HTTP/1.1 client of one API line: one request at a time, over one
//! keep-alive connection to the agent — a runtime socket (an nginx connection,
//! see [`crate::runtime`]), with TLS for `https://`. Every wait is bounded: the
//! connect and the handshake by `timeout`, the first byte of the answer by the
//! blocking query's time, the rest of the answer by `timeout` again (a slow
//! drip cannot hold a line), the body by a size cap. A connection the agent
//! closed while idle is replaced once, at once.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_io::{AsyncRead, AsyncWrite};
use hickory_resolver::net::runtime::RuntimeProvider;

use consul_core::api::AgentUrl;
pub use consul_core::http::Response;
use consul_core::http::{Progress, ResponseReader};

use crate::runtime::{NgxRuntime, Socket};

#[cfg(ngx_feature = "ssl")]
use super::tls::{TlsContext, TlsStream};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

enum Stream {
    Plain(Socket),
    #[cfg(ngx_feature = "ssl")]
    Tls(TlsStream),
}

impl Stream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(ngx_feature = "ssl")]
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(ngx_feature = "ssl")]
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
}

/// Bounds of one exchange.
#[derive(Clone, Copy)]
pub struct Limits {
    /// The request blocks (an index is sent): the agent may end it by closing
    /// the connection (it restarts, or closes it as idle), as it may a reused
    /// connection; it is sent once more at once.
    pub blocking: bool,
    /// Until the answer's first byte (a blocking query waits here).
    pub first_byte_ms: u64,
    /// Connecting and handshaking; the rest of the answer once it began.
    pub timeout_ms: u64,
    pub max_body: usize,
}

/// How an exchange failed: before any byte of the answer came (on a reused
/// connection: the agent may have closed it while idle), or after.
enum Failure {
    Early(String),
    Late(String),
}

/// One line's agent.
pub struct Client {
    agent: &'static AgentUrl,
    addrs: &'static [SocketAddr],
    #[cfg(ngx_feature = "ssl")]
    tls: Option<&'static TlsContext>,
    conn: Option<Stream>,
}

/// `future`, or `None` once `ms` have passed.
pub async fn within<F: Future>(ms: u64, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut sleep = pin!(ngx::async_::sleep(Duration::from_millis(ms)));
    poll_fn(|cx| {
        if let Poll::Ready(v) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

pub(crate) fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl Client {
    pub fn new(
        agent: &'static AgentUrl,
        addrs: &'static [SocketAddr],
        #[cfg(ngx_feature = "ssl")] tls: Option<&'static TlsContext>,
    ) -> Client {
        Client {
            agent,
            addrs,
            #[cfg(ngx_feature = "ssl")]
            tls,
            conn: None,
        }
    }

    /// Drops the connection (a request that did not finish leaves it unusable).
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Sends `request` and reads its answer.
    pub async fn exchange(&mut self, request: &[u8], limits: Limits) -> Result<Response, String> {
        let reused = self.conn.is_some();
        match self.once(request, limits).await {
            Ok(r) => Ok(r),
            Err(Failure::Early(_)) if reused || limits.blocking => {
                crate::log::debug!(
                    "consul upstream: agent connection closed while idle, reconnecting",
                );
                self.conn = None;
                self.once(request, limits).await.map_err(|f| match f {
                    Failure::Early(e) | Failure::Late(e) => e,
                })
            }
            Err(Failure::Early(e) | Failure::Late(e)) => Err(e),
        }
    }

    async fn once(&mut self, request: &[u8], limits: Limits) -> Result<Response, Failure> {
        let name = self.agent.authority();
        if self.conn.is_none() {
            let conn = within(limits.timeout_ms, self.connect(limits.timeout_ms))
                .await
                .unwrap_or_else(|| {
                    Err(format!(
                        "cannot connect to {name} (timed out after {})",
                        seconds(limits.timeout_ms)
                    ))
                })
                .map_err(Failure::Late)?;
            self.conn = Some(conn);
        }
        let result = self.talk(request, limits, &name).await;
        match &result {
            Ok((_, true)) => {}
            _ => self.conn = None,
        }
        result.map(|(r, _)| r)
    }

    async fn connect(&self, timeout_ms: u64) -> Result<Stream, String> {
        let mut errors = Vec::new();
        for &addr in self.addrs {
            let socket = match NgxRuntime
                .connect_tcp(addr, None, Some(Duration::from_millis(timeout_ms)))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    errors.push(format!("cannot connect to {addr} ({})", io_reason(&e)));
                    continue;
                }
            };
            #[cfg(ngx_feature = "ssl")]
            if let Some(ctx) = self.tls {
                return TlsStream::connect(socket, ctx, self.agent)
                    .await
                    .map(Stream::Tls);
            }
            return Ok(Stream::Plain(socket));
        }
        if errors.is_empty() {
            errors.push(format!("no address for {}", self.agent.authority()));
        }
        Err(errors.join(", "))
    }

    /// One request and its answer on the open connection; `true` with the
    /// answer when the connection can carry the next request.
    async fn talk(
        &mut self,
        request: &[u8],
        limits: Limits,
        name: &str,
    ) -> Result<(Response, bool), Failure> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(Failure::Late("no connection".into()));
        };
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        // Up to the first byte of the answer: the request, then the wait.
        let first = async {
            write_all(conn, request).await?;
            read_some(conn, &mut buf).await
        };
        match within(limits.first_byte_ms, first).await {
            None => {
                return Err(Failure::Late(format!(
                    "{name} did not answer within {}",
                    seconds(limits.first_byte_ms)
                )))
            }
            Some(Err(e)) => return Err(Failure::Early(format!("{name}: {}", io_reason(&e)))),
            Some(Ok(0)) => {
                return Err(Failure::Early(format!(
                    "{name} closed the connection without answering"
                )))
            }
            Some(Ok(_)) => {}
        }
        let rest = read_answer(conn, buf, limits.max_body, name);
        match within(limits.timeout_ms, rest).await {
            None => Err(Failure::Late(format!(
                "{name} did not finish its answer within {}",
                seconds(limits.timeout_ms)
            ))),
            Some(r) => r.map_err(Failure::Late),
        }
    }
}

/// The rest of an answer whose first bytes are in `buf` (core's reader, as
/// the master's request reads it).
async fn read_answer(
    conn: &mut Stream,
    mut buf: Vec<u8>,
    max_body: usize,
    name: &str,
) -> Result<(Response, bool), String> {
    let mut reader = ResponseReader::new(max_body);
    loop {
        match reader.push(&buf).map_err(|e| format!("{name}: {e}"))? {
            Progress::Done { response, reusable } => return Ok((response, reusable)),
            Progress::More => {}
        }
        buf.clear();
        let n = read_some(conn, &mut buf)
            .await
            .map_err(|e| format!("{name}: {}", io_reason(&e)))?;
        if n == 0 {
            return reader.end().map(|r| (r, false)).ok_or_else(|| {
                format!("{name} closed the connection in the middle of the answer")
            });
        }
    }
}

/// Reads what is there (at least one byte, or 0 at the end) onto `buf`.
async fn read_some(conn: &mut Stream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let n = poll_fn(|cx| conn.poll_read(cx, &mut buf[start..])).await;
    buf.truncate(start + *n.as_ref().unwrap_or(&0));
    n
}

async fn write_all(conn: &mut Stream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll_fn(|cx| conn.poll_write(cx, data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// An I/O error as a log line names it: "Connection refused", "timed out".
pub(crate) fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => {
            let s = e.to_string();
            // "Connection refused (os error 111)" -> "Connection refused"
            s.split(" (os error").next().unwrap_or(&s).to_string()
        }
    }
}
