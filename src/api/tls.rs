//! `https://` to the agent with the OpenSSL nginx itself is linked with (the
//! module adds no TLS library): a client context made when the configuration is
//! read (the CA file is read there, by the master, as nginx reads
//! `proxy_ssl_trusted_certificate`), and a TLS stream over a [`Transport`] —
//! the runtime's socket (an nginx connection) in worker 0, a descriptor the
//! master's poll loop watches before it forks workers — driven by
//! `SSL_do_handshake`/`SSL_read`/`SSL_write` and the socket's readiness. nginx's `ngx_ssl_*` connection layer is not used:
//! it logs a hostile agent's handshake failures at `crit` on every attempt,
//! where discovery says so once per failure streak with the reason.
//!
//! The agent is verified against `api_ca=` (else the system's roots), by host
//! name (also sent as SNI) or, for an IP address in `api=`, by IP address.

use std::ffi::{c_int, c_void, CStr, CString};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};
use ngx::ffi::{
    ERR_clear_error, ERR_error_string_n, ERR_get_error, SSL_CTX_ctrl, SSL_CTX_free,
    SSL_CTX_load_verify_locations, SSL_CTX_new, SSL_CTX_set_default_verify_paths,
    SSL_CTX_set_verify, SSL_ctrl, SSL_do_handshake, SSL_free, SSL_get0_param, SSL_get_error,
    SSL_get_verify_result, SSL_new, SSL_read, SSL_set_connect_state, SSL_set_fd, SSL_write,
    TLSEXT_NAMETYPE_host_name, TLS_client_method, X509_VERIFY_PARAM_set1_host,
    X509_VERIFY_PARAM_set1_ip_asc, X509_verify_cert_error_string, SSL, SSL_CTRL_MODE,
    SSL_CTRL_SET_MIN_PROTO_VERSION, SSL_CTRL_SET_TLSEXT_HOSTNAME, SSL_CTX, SSL_ERROR_SYSCALL,
    SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE, SSL_ERROR_ZERO_RETURN,
    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, SSL_MODE_ENABLE_PARTIAL_WRITE, SSL_VERIFY_PEER,
    TLS1_2_VERSION, X509_V_OK,
};

use consul_core::api::AgentUrl;

use crate::runtime::Socket;

/// A client context: TLS 1.2 or newer, the agent's certificate verified.
pub struct TlsContext {
    ctx: NonNull<SSL_CTX>,
}

impl Drop for TlsContext {
    fn drop(&mut self) {
        // SAFETY: made by SSL_CTX_new in `new`; each SSL holds its own reference.
        unsafe { SSL_CTX_free(self.ctx.as_ptr()) };
    }
}

/// The reason of the last OpenSSL error (the queue is emptied).
fn openssl_reason() -> String {
    // SAFETY: ERR_* read and clear this thread's error queue.
    let first = unsafe { ERR_get_error() };
    // SAFETY: as above.
    while unsafe { ERR_get_error() } != 0 {}
    if first == 0 {
        return String::new();
    }
    let mut buf = [0u8; 256];
    // SAFETY: writes at most buf.len() bytes, NUL-terminated.
    unsafe { ERR_error_string_n(first, buf.as_mut_ptr() as *mut _, buf.len()) };
    CStr::from_bytes_until_nul(&buf)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl TlsContext {
    /// Made when the configuration is read; `ca_file` (full path) holds PEM
    /// certificates, else the system's trusted roots are used.
    pub fn new(ca_file: Option<&str>) -> Result<TlsContext, String> {
        // SAFETY: plain OpenSSL calls on a context this function owns until it
        // is wrapped; strings are NUL-terminated copies.
        unsafe {
            ERR_clear_error();
            let ctx = NonNull::new(SSL_CTX_new(TLS_client_method()))
                .ok_or_else(|| format!("SSL_CTX_new() failed ({})", openssl_reason()))?;
            let tls = TlsContext { ctx };
            let ctx = ctx.as_ptr();
            SSL_CTX_ctrl(
                ctx,
                SSL_CTRL_SET_MIN_PROTO_VERSION as c_int,
                TLS1_2_VERSION as _,
                std::ptr::null_mut(),
            );
            // A write is retried with whatever is left of the request.
            SSL_CTX_ctrl(
                ctx,
                SSL_CTRL_MODE as c_int,
                (SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER) as _,
                std::ptr::null_mut(),
            );
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER as c_int, None);
            match ca_file {
                Some(path) => {
                    let c = CString::new(path).map_err(|_| format!("invalid path \"{path}\""))?;
                    if SSL_CTX_load_verify_locations(ctx, c.as_ptr(), std::ptr::null()) != 1 {
                        return Err(format!(
                            "cannot load certificates from \"{path}\" ({})",
                            openssl_reason()
                        ));
                    }
                }
                None => {
                    if SSL_CTX_set_default_verify_paths(ctx) != 1 {
                        return Err(format!(
                            "cannot load the system's trusted certificates ({})",
                            openssl_reason()
                        ));
                    }
                }
            }
            Ok(tls)
        }
    }
}

/// What TLS runs over: a connected socket's descriptor and its readiness.
pub trait Transport {
    fn fd(&self) -> Option<c_int>;
    /// Parks the task until the socket is readable (`write`: writable).
    fn poll_ready(&self, write: bool, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Transport for Socket {
    fn fd(&self) -> Option<c_int> {
        self.connection()
            // SAFETY: an open connection of the runtime.
            .map(|c| unsafe { c.as_ref().fd })
    }

    fn poll_ready(&self, write: bool, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Socket::poll_ready(self, write, cx)
    }
}

/// TLS over a socket. One task uses it at a time (one request per line).
pub struct TlsStream<S: Transport = Socket> {
    socket: S,
    ssl: NonNull<SSL>,
}

impl<S: Transport> Drop for TlsStream<S> {
    fn drop(&mut self) {
        // SAFETY: made by SSL_new in `connect`; it does not own the fd (the
        // socket does, and closes it after this).
        unsafe { SSL_free(self.ssl.as_ptr()) };
    }
}

enum Step {
    Done(c_int),
    Again,
    Closed,
    Failed(String),
}

impl TlsStream<Socket> {
    /// The handshake with the agent at `agent`, over a connected socket.
    pub async fn connect(
        socket: Socket,
        ctx: &TlsContext,
        agent: &AgentUrl,
    ) -> Result<TlsStream, String> {
        let stream = TlsStream::new(socket, ctx, agent)?;
        let name = agent.authority();
        poll_fn(|cx| stream.poll_handshake(cx, &name)).await?;
        Ok(stream)
    }
}

impl<S: Transport> TlsStream<S> {
    /// A client for the agent at `agent` over a connected socket, before its
    /// handshake ([`TlsStream::poll_handshake`]).
    pub fn new(socket: S, ctx: &TlsContext, agent: &AgentUrl) -> Result<TlsStream<S>, String> {
        let fd = socket.fd().ok_or_else(|| "connection closed".to_string())?;
        let host = CString::new(agent.host.as_str()).map_err(|_| "invalid host".to_string())?;
        // SAFETY: a new SSL of a live context, set up before it is used; every
        // string passed is NUL-terminated and outlives the call.
        let stream = unsafe {
            ERR_clear_error();
            let ssl = NonNull::new(SSL_new(ctx.ctx.as_ptr()))
                .ok_or_else(|| format!("SSL_new() failed ({})", openssl_reason()))?;
            let stream = TlsStream { socket, ssl };
            let s = ssl.as_ptr();
            let param = SSL_get0_param(s);
            let set = if agent.ip().is_some() {
                X509_VERIFY_PARAM_set1_ip_asc(param, host.as_ptr())
            } else {
                SSL_ctrl(
                    s,
                    SSL_CTRL_SET_TLSEXT_HOSTNAME as c_int,
                    TLSEXT_NAMETYPE_host_name as _,
                    host.as_ptr() as *mut c_void,
                );
                X509_VERIFY_PARAM_set1_host(param, host.as_ptr(), agent.host.len())
            };
            if set != 1 || SSL_set_fd(s, fd) != 1 {
                return Err(format!("cannot set TLS up ({})", openssl_reason()));
            }
            SSL_set_connect_state(s);
            stream
        };
        Ok(stream)
    }

    /// What the stream runs over.
    pub fn transport(&self) -> &S {
        &self.socket
    }

    /// The handshake with the agent `name`, as far as the socket allows.
    pub fn poll_handshake(&self, cx: &mut Context<'_>, name: &str) -> Poll<Result<(), String>> {
        // SAFETY: the stream's own SSL, on the process's only thread.
        match self.step(cx, |s| unsafe { SSL_do_handshake(s) }) {
            Step::Done(_) => Poll::Ready(Ok(())),
            Step::Again => Poll::Pending,
            Step::Closed => Poll::Ready(Err(format!(
                "{name} closed the connection in the TLS handshake"
            ))),
            Step::Failed(why) => Poll::Ready(Err(self.handshake_error(name, why))),
        }
    }

    /// Why the handshake failed: the certificate check, else OpenSSL's reason.
    fn handshake_error(&self, name: &str, why: String) -> String {
        // SAFETY: the stream's own SSL.
        let verify = unsafe { SSL_get_verify_result(self.ssl.as_ptr()) };
        if verify != X509_V_OK as std::ffi::c_long {
            // SAFETY: returns a static string for any code.
            let text = unsafe { CStr::from_ptr(X509_verify_cert_error_string(verify)) };
            return format!(
                "certificate of {name} not accepted ({})",
                text.to_string_lossy()
            );
        }
        format!("TLS handshake with {name} failed ({why})")
    }

    /// Runs one OpenSSL call; on "want read/write", parks the task on the socket.
    fn step(&self, cx: &mut Context<'_>, call: impl FnOnce(*mut SSL) -> c_int) -> Step {
        let s = self.ssl.as_ptr();
        // SAFETY: the stream's own SSL; the error queue is this thread's.
        let (n, err) = unsafe {
            ERR_clear_error();
            let n = call(s);
            (n, if n > 0 { 0 } else { SSL_get_error(s, n) })
        };
        if n > 0 {
            return Step::Done(n);
        }
        let wait = match err as u32 {
            SSL_ERROR_WANT_READ => false,
            SSL_ERROR_WANT_WRITE => true,
            SSL_ERROR_ZERO_RETURN => return Step::Closed,
            SSL_ERROR_SYSCALL => {
                let reason = openssl_reason();
                let os = io::Error::last_os_error();
                return match (reason.is_empty(), os.raw_os_error()) {
                    (false, _) => Step::Failed(reason),
                    (true, Some(code)) if code != 0 => Step::Failed(os.to_string()),
                    _ => Step::Closed,
                };
            }
            _ => return Step::Failed(openssl_reason()),
        };
        match self.socket.poll_ready(wait, cx) {
            Poll::Pending => Step::Again,
            Poll::Ready(Ok(())) => Step::Again,
            Poll::Ready(Err(e)) => Step::Failed(e.to_string()),
        }
    }
}

fn io_error(step: Step) -> Poll<io::Result<usize>> {
    match step {
        Step::Done(n) => Poll::Ready(Ok(n as usize)),
        Step::Again => Poll::Pending,
        Step::Closed => Poll::Ready(Ok(0)),
        Step::Failed(why) => Poll::Ready(Err(io::Error::other(format!("TLS: {why}")))),
    }
}

impl<S: Transport> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let len = buf.len().min(c_int::MAX as usize) as c_int;
        // SAFETY: SSL_read writes at most len bytes into buf.
        io_error(self.step(cx, |s| unsafe {
            SSL_read(s, buf.as_mut_ptr() as *mut c_void, len)
        }))
    }
}

impl<S: Transport> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let len = buf.len().min(c_int::MAX as usize) as c_int;
        // SAFETY: SSL_write reads at most len bytes from buf.
        match self.step(cx, |s| unsafe {
            SSL_write(s, buf.as_ptr() as *const c_void, len)
        }) {
            Step::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            step => io_error(step),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
