//! Worker 0's DNS client: the queries of every line to the resolvers (the
//! Consul agents), over one TCP connection per resolver address, shared by
//! every line that asks it, and UDP queries for lines in `udp` mode. Over UDP,
//! an answer with TC set, or one that fills the size the query offered (Consul
//! trims by size and sets TC only with `enable_truncate`), is asked again over
//! TCP ([`consul_core::lookup::udp_answer_needs_tcp`], as in the master's
//! lookup).
//!
//! One connection per resolver, not per line: an agent, dnsmasq (20 TCP
//! clients) or BIND (150) in front of it serves a fleet's hosts, not each
//! line's socket. The connection is opened on first use and again after the
//! server closed it (Consul's DNS library closes a TCP connection after 128
//! queries, or 8 s idle): a query that the close caught on a reused connection
//! is asked once more on a new one, so that costs no failed lookup. A query that
//! times out leaves its connection to the queries already on it; later ones
//! open a new connection (a server that stalls on one connection may answer on
//! another). Each line keeps its own timeout around its queries.
//!
//! [`DnsClient`] belongs to discovery of the cycle: dropping it drops the
//! connections' driver tasks, which close their sockets (reload, quit).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::lock::Mutex;
use hickory_resolver::net::tcp::TcpClientStream;
use hickory_resolver::net::udp::UdpClientStream;
use hickory_resolver::net::xfer::{
    DnsExchange, DnsHandle, DnsMultiplexer, DnsRequestSender, FirstAnswer,
};
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::{DnsRequest, DnsResponse};
use hickory_resolver::proto::rr::{Name, RecordType};
use ngx::async_::Task;

use consul_core::lookup::{answers_question, request, udp_answer_needs_tcp};
use consul_core::settings::{Transport, MAX_TIME_MS};

use crate::runtime::{self, NgxRuntime};

/// How long a connection waits for an answer, and for its connect: as long as
/// any line may (each line's own `timeout=` ends its wait earlier, and a query
/// nobody waits for leaves the connection).
const CONNECTION_TIMEOUT: Duration = Duration::from_millis(MAX_TIME_MS);

/// Queries one TCP connection carries at once: every line of a large
/// configuration at its first lookup, with their follow-ups (hickory's default
/// of 32 would turn the rest away as busy).
const MAX_QUERIES_PER_CONNECTION: usize = 4096;

/// Why an exchange gave no answer, as a user reads it in error.log.
#[derive(Debug)]
pub enum Failure {
    /// The line's `timeout=` passed.
    TimedOut,
    /// No TCP connection could be made.
    Connect(Arc<io::Error>),
    /// The server closed the connection, or the exchange failed otherwise.
    Net(NetError),
    /// The answer is to another question (a confused or forged answer).
    WrongQuestion,
}

impl Failure {
    pub fn describe(&self, addr: &SocketAddr) -> String {
        match self {
            Failure::TimedOut => format!("{addr} timed out"),
            Failure::Connect(e) if e.kind() == io::ErrorKind::TimedOut => {
                format!("{addr} timed out")
            }
            Failure::Connect(_) => format!("cannot connect to {addr}"),
            Failure::Net(NetError::Timeout) => format!("{addr} timed out"),
            Failure::Net(NetError::NoConnections) => format!("cannot connect to {addr}"),
            Failure::Net(NetError::Io(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                format!("cannot connect to {addr}")
            }
            Failure::Net(e) if e.is_connection_closed() => {
                format!("{addr} closed the connection")
            }
            Failure::Net(e) => format!("{e} from {addr}"),
            Failure::WrongQuestion => format!("{addr} answered another question"),
        }
    }
}

/// The resolvers of every line of the cycle, by address.
#[derive(Default)]
pub struct DnsClient {
    servers: RefCell<HashMap<SocketAddr, Rc<Server>>>,
}

impl DnsClient {
    /// The server at `addr`, shared with the other lines that ask it.
    pub fn server(&self, addr: SocketAddr) -> Rc<Server> {
        self.servers
            .borrow_mut()
            .entry(addr)
            .or_insert_with(|| {
                Rc::new(Server {
                    addr,
                    conn: RefCell::new(None),
                    connecting: Mutex::new(()),
                })
            })
            .clone()
    }

    /// Closes every connection (discovery stops). Lines still holding a server
    /// would open a new one: they are stopped first.
    pub fn close(&self) {
        let servers = std::mem::take(&mut *self.servers.borrow_mut());
        for server in servers.values() {
            server.conn.borrow_mut().take();
        }
    }
}

/// One resolver address and its shared TCP connection.
pub struct Server {
    addr: SocketAddr,
    conn: RefCell<Option<Rc<Connection>>>,
    /// Held while a connection is being opened: the other lines wait for it
    /// rather than opening their own.
    connecting: Mutex<()>,
}

/// An open TCP connection: its handle and the task that drives it (reads the
/// answers, writes the queries). Dropping it stops the task, which closes the
/// socket.
struct Connection {
    exchange: DnsExchange<NgxRuntime>,
    driver: Task<()>,
}

/// Forgets the connection a query was sent on unless the query completed: a
/// query that timed out (or whose line stopped waiting) leaves the connection
/// to the queries already on it, and the next one opens a new connection.
struct InFlight<'a> {
    server: &'a Server,
    conn: Rc<Connection>,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.server.forget(&self.conn);
        }
    }
}

/// A DNS answer, and whether it came over TCP.
pub struct Answer {
    pub response: DnsResponse,
    pub over_tcp: bool,
}

impl Server {
    pub fn addr(&self) -> &SocketAddr {
        &self.addr
    }

    /// Asks `name`/`rtype` over `transport` within `timeout`. Over UDP, an
    /// answer with TC set, or one that may have been trimmed, is asked again
    /// over TCP; over TCP, an answer with TC set is returned as it came (its
    /// records are what the server could send).
    pub async fn query(
        &self,
        name: &Name,
        rtype: RecordType,
        transport: Transport,
        timeout: Duration,
    ) -> Result<Answer, Failure> {
        let request = request(name.clone(), rtype);
        let question = request.queries.clone();
        let exchange = async {
            if transport == Transport::Udp {
                let offered = usize::from(request.max_payload());
                let response = match self.over_udp(request.clone(), timeout).await {
                    Ok(response) => response,
                    // A datagram larger than the size the query offered is cut
                    // to it on receipt (Consul from 1.19 adds its OPT record
                    // after trimming to that size): TCP carries it whole.
                    Err(Failure::Net(NetError::Proto(_))) => {
                        return Ok((self.over_tcp(request).await?, true))
                    }
                    Err(failure) => return Err(failure),
                };
                let bytes = response.as_buffer().len();
                if !udp_answer_needs_tcp(response.truncation, bytes, offered) {
                    return Ok((response, false));
                }
            }
            Ok((self.over_tcp(request).await?, true))
        };
        let (response, over_tcp) = runtime::with_timeout(timeout, exchange)
            .await
            .map_err(|_| Failure::TimedOut)??;
        if !answers_question(&response, &question) {
            return Err(Failure::WrongQuestion);
        }
        Ok(Answer { response, over_tcp })
    }

    async fn over_udp(
        &self,
        request: DnsRequest,
        timeout: Duration,
    ) -> Result<DnsResponse, Failure> {
        // A UDP stream binds a new socket (a random port) for each query.
        let mut stream = UdpClientStream::builder(self.addr, NgxRuntime)
            .with_timeout(Some(timeout))
            .build();
        stream
            .send_message(request)
            .first_answer()
            .await
            .map_err(Failure::Net)
    }

    async fn over_tcp(&self, request: DnsRequest) -> Result<DnsResponse, Failure> {
        let mut retried = false;
        loop {
            let (conn, reused) = self.connection().await?;
            let mut in_flight = InFlight {
                server: self,
                conn: conn.clone(),
                done: false,
            };
            let result = conn.exchange.send(request.clone()).first_answer().await;
            in_flight.done = true;
            match result {
                Ok(response) => return Ok(response),
                // The connection is gone (closed by the server, or broken):
                // a query sent on an older connection is asked once more.
                Err(e) if conn.driver.is_finished() => {
                    self.forget(&conn);
                    if reused && !retried {
                        crate::log::debug!(
                            "consul upstream: DNS connection to {} closed ({e}), asking again",
                            self.addr
                        );
                        retried = true;
                        continue;
                    }
                    return Err(Failure::Net(e));
                }
                Err(e) => return Err(Failure::Net(e)),
            }
        }
    }

    /// The open connection (reused: it carried queries before), or a new one.
    async fn connection(&self) -> Result<(Rc<Connection>, bool), Failure> {
        if let Some(conn) = self.open() {
            return Ok((conn, true));
        }
        let _connecting = self.connecting.lock().await;
        // Another line may have opened it while this one waited.
        if let Some(conn) = self.open() {
            return Ok((conn, true));
        }
        let timeout = CONNECTION_TIMEOUT;
        let (stream, sender) = TcpClientStream::new(self.addr, None, Some(timeout), NgxRuntime);
        let stream = stream.await.map_err(|e| match e {
            NetError::Io(io) => Failure::Connect(io),
            other => Failure::Net(other),
        })?;
        let multiplexer = DnsMultiplexer::new(stream, sender)
            .with_timeout(timeout)
            .with_max_active_requests(MAX_QUERIES_PER_CONNECTION);
        let (exchange, background) = DnsExchange::<NgxRuntime>::from_stream(multiplexer);
        let conn = Rc::new(Connection {
            exchange,
            driver: runtime::spawn(background),
        });
        crate::log::debug!("consul upstream: DNS connection to {} opened", self.addr);
        *self.conn.borrow_mut() = Some(conn.clone());
        Ok((conn, false))
    }

    /// The current connection, unless its driver ended (the server closed it).
    fn open(&self) -> Option<Rc<Connection>> {
        let mut slot = self.conn.borrow_mut();
        if slot.as_ref().is_some_and(|c| c.driver.is_finished()) {
            slot.take();
        }
        slot.clone()
    }

    /// Stops handing out `conn` to new queries (it closes when the last query
    /// on it ends).
    fn forget(&self, conn: &Rc<Connection>) {
        let mut slot = self.conn.borrow_mut();
        if slot.as_ref().is_some_and(|c| Rc::ptr_eq(c, conn)) {
            slot.take();
        }
    }
}
