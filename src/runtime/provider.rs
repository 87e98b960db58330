//! hickory's `RuntimeProvider` over nginx: its tasks are spawned through
//! [`super::spawn`], its timers are nginx timers, its sockets are [`Socket`]s.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::net::runtime::{RuntimeProvider, Spawn, Time};

use super::{spawn, with_timeout, Socket, BACKGROUND};

/// How long a TCP connect may take when hickory gives no limit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
