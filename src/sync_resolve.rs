//! The master's bounded lookup (see [`crate::prefill`]): the SRV query of
//! every line, at all of the line's resolvers at once, over non-blocking
//! sockets and one poll(2) loop, all within one deadline. The master runs no
//! event loop while it reads its configuration, and a thread would not survive
//! its fork: this is the synchronous path, built from the worker's pieces —
//! core's [`SrvLookup`] asks, and reads every answer by the same rules as
//! worker 0 ([`consul_core::lookup`]). As in worker 0, the lines that ask one
//! resolver share one TCP connection to it (a close after the server's last
//! answer costs no lookup: what it caught is asked once more on a new one);
//! UDP queries go out on a socket per lookup. The same loop drives the one
//! request of each `api=` line ([`crate::api::sync_get`]). Every socket is
//! closed before [`lookup_all`] returns.
//!
//! Resolvers keep their order: a line takes the answer of its first resolver
//! unless that one fails (the worker's failover), but all are asked at once, so
//! that a resolver that never answers costs the line's `timeout` (capped by the
//! deadline), not one `timeout` after another.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use consul_core::answer::OwnAddresses;
use consul_core::lookup::{Failover, Next, Outcome, Outgoing, QueryIds, Resolved, SrvLookup};
use consul_core::settings::{Settings, Transport};

use crate::api::sync_get::Get;
use crate::sync_socket;

/// Sockets open at once; further lookups start as earlier ones end (the
/// master's descriptor limit is nginx's default, not `worker_rlimit_nofile`).
const MAX_SOCKETS: usize = 256;

/// The largest DNS message (TCP's length prefix is 16 bits).
const MAX_MESSAGE: usize = 65_535;

/// Reads from one socket before the loop looks at the clock again: a server
/// that floods cannot hold the master past the deadline.
const READS_PER_WAKE: usize = 64;

/// One socket to one resolver: UDP for one line's lookup, TCP shared by every
/// line that asks the resolver (as worker 0 shares one connection per
/// resolver: an agent, dnsmasq or BIND in front of it serves a fleet's hosts).
struct Conn {
    fd: OwnedFd,
    tcp: bool,
    connecting: bool,
    /// TCP: an answer came over it (a close then may have caught queries
    /// sent after the server's last answer: they are asked once more).
    answered: bool,
    /// TCP: length-prefixed queries not written yet.
    out: Vec<u8>,
    /// TCP: bytes read, not yet a whole message.
    inbuf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr, tcp: bool) -> io::Result<Conn> {
        let kind = if tcp {
            libc::SOCK_STREAM
        } else {
            libc::SOCK_DGRAM
        };
        let (fd, connecting) = sync_socket::connect(addr, kind)?;
        Ok(Conn {
            fd,
            tcp,
            connecting,
            answered: false,
            out: Vec::new(),
            inbuf: Vec::new(),
        })
    }

    /// Queues (TCP) or sends (UDP) one query.
    fn send(&mut self, q: &Outgoing) -> io::Result<()> {
        if self.tcp {
            let len =
                u16::try_from(q.bytes.len()).map_err(|_| io::Error::other("query too large"))?;
            self.out.extend_from_slice(&len.to_be_bytes());
            self.out.extend_from_slice(&q.bytes);
            return self.flush();
        }
        // SAFETY: q.bytes is readable for its length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                q.bytes.as_ptr().cast(),
                q.bytes.len(),
                0,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            // A full send buffer loses a datagram, as a network would: the timeout tells.
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Writes what TCP has queued, as far as the socket takes it.
    fn flush(&mut self) -> io::Result<()> {
        while !self.connecting && !self.out.is_empty() {
            // SAFETY: out is readable for its length.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    self.out.as_ptr().cast(),
                    self.out.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err),
                };
            }
            self.out.drain(..n as usize);
        }
        Ok(())
    }

    /// A connect in progress ended: Ok once connected.
    fn connected(&mut self) -> io::Result<()> {
        sync_socket::connect_result(&self.fd)?;
        self.connecting = false;
        self.flush()
    }

    /// Whole messages that arrived; Err when the socket failed or (TCP) closed.
    fn receive(&mut self) -> io::Result<Vec<Vec<u8>>> {
        let mut messages = Vec::new();
        let mut buf = vec![0u8; MAX_MESSAGE];
        for _ in 0..READS_PER_WAKE {
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(err),
                }
            }
            let n = n as usize;
            if !self.tcp {
                messages.push(buf[..n].to_vec());
                continue;
            }
            if n == 0 {
                if messages.is_empty() {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                break;
            }
            self.inbuf.extend_from_slice(&buf[..n]);
            while self.inbuf.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([self.inbuf[0], self.inbuf[1]]));
                if self.inbuf.len() < 2 + len {
                    break;
                }
                messages.push(self.inbuf[2..2 + len].to_vec());
                self.inbuf.drain(..2 + len);
            }
        }
        Ok(messages)
    }

    fn events(&self) -> libc::c_short {
        if self.connecting || !self.out.is_empty() {
            libc::POLLOUT | libc::POLLIN
        } else {
            libc::POLLIN
        }
    }
}

/// One line's lookup at one resolver.
struct Attempt {
    line: usize,
    lookup: SrvLookup,
    tcp_first: bool,
    timeout: Duration,
    started: bool,
    udp: Option<Conn>,
    /// Queries sent over the resolver's shared TCP connection.
    over_tcp: Vec<u16>,
    /// Queries asked again after the server closed the connection they were on.
    retried: Vec<u16>,
    /// The answer is due by then (renewed whenever a query goes out).
    due: Instant,
}

impl Attempt {
    fn active(&self) -> bool {
        self.started && !self.lookup.is_done()
    }
}

/// hickory's words for a failed exchange (worker 0 says the same, see
/// `crate::dns_client::Failure`).
fn describe(e: &io::Error, addr: SocketAddr) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED | libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ECONNRESET) => {
            format!("cannot connect to {addr}")
        }
        _ if e.kind() == io::ErrorKind::UnexpectedEof => format!("{addr} closed the connection"),
        _ => format!("{e} from {addr}"),
    }
}

/// Every lookup of one run, and the TCP connections they share.
struct Lookups<'a> {
    attempts: Vec<Attempt>,
    tcp: HashMap<SocketAddr, Conn>,
    ids: QueryIds,
    own: &'a OwnAddresses,
}

impl Lookups<'_> {
    fn sockets(&self) -> usize {
        self.tcp.len() + self.attempts.iter().filter(|a| a.udp.is_some()).count()
    }

    fn fail(&mut self, a: usize, reason: String) {
        let attempt = &mut self.attempts[a];
        attempt.lookup.fail(reason, self.own);
        attempt.udp = None;
    }

    fn start(&mut self, a: usize, now: Instant) {
        let attempt = &mut self.attempts[a];
        attempt.started = true;
        attempt.due = now + attempt.timeout;
        if let Some(q) = attempt.lookup.start(&mut self.ids) {
            let tcp = attempt.tcp_first;
            self.send(a, q, tcp);
        }
    }

    /// Sends `q` over TCP (the resolver's shared connection) or UDP (the
    /// lookup's socket), opening the socket on first use.
    fn send(&mut self, a: usize, q: Outgoing, tcp: bool) {
        let addr = self.attempts[a].lookup.server();
        let sent = if tcp {
            let conn = match self.tcp.entry(addr) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => match Conn::open(addr, true) {
                    Ok(c) => e.insert(c),
                    Err(e) => return self.fail(a, describe(&e, addr)),
                },
            };
            self.attempts[a].over_tcp.push(q.id);
            conn.send(&q)
        } else {
            let attempt = &mut self.attempts[a];
            if attempt.udp.is_none() {
                match Conn::open(addr, false) {
                    Ok(c) => attempt.udp = Some(c),
                    Err(e) => return self.fail(a, describe(&e, addr)),
                }
            }
            attempt.udp.as_mut().map_or(Ok(()), |c| c.send(&q))
        };
        if let Err(e) = sent {
            if tcp {
                self.tcp_failed(addr, &e);
            } else {
                self.fail(a, describe(&e, addr));
            }
        }
    }

    /// What a message means to lookup `a`.
    fn on_message(&mut self, a: usize, msg: &[u8], over_tcp: bool, now: Instant) {
        let attempt = &mut self.attempts[a];
        match attempt
            .lookup
            .on_message(msg, over_tcp, self.own, &mut self.ids)
        {
            Next::Ignored => {}
            Next::Send(queries) => {
                if !queries.is_empty() {
                    attempt.due = now + attempt.timeout;
                }
                let tcp = attempt.tcp_first;
                for q in queries {
                    self.send(a, q, tcp);
                }
            }
            Next::AgainOverTcp(q) => {
                attempt.due = now + attempt.timeout;
                self.send(a, q, true);
            }
        }
        if self.attempts[a].lookup.is_done() {
            self.attempts[a].udp = None;
        }
    }

    /// Handles what poll reported for lookup `a`'s UDP socket.
    fn on_udp(&mut self, a: usize, revents: libc::c_short, now: Instant) {
        let addr = self.attempts[a].lookup.server();
        let Some(conn) = self.attempts[a].udp.as_mut() else {
            return;
        };
        if revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) == 0 {
            return;
        }
        let messages = match conn.receive() {
            Ok(m) => m,
            Err(e) => return self.fail(a, describe(&e, addr)),
        };
        for msg in messages {
            self.on_message(a, &msg, false, now);
        }
    }

    /// Handles what poll reported for the shared TCP connection to `addr`.
    fn on_tcp(&mut self, addr: SocketAddr, revents: libc::c_short, now: Instant) {
        let Some(conn) = self.tcp.get_mut(&addr) else {
            return;
        };
        let ready = if conn.connecting {
            if revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) == 0 {
                return;
            }
            conn.connected()
        } else if revents & libc::POLLOUT != 0 {
            conn.flush()
        } else {
            Ok(())
        };
        if let Err(e) = ready {
            return self.tcp_failed(addr, &e);
        }
        if revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) == 0 {
            return;
        }
        let messages = match conn.receive() {
            Ok(m) => m,
            Err(e) => return self.tcp_failed(addr, &e),
        };
        if !messages.is_empty() {
            conn.answered = true;
        }
        for msg in messages {
            if msg.len() < 2 {
                continue;
            }
            let id = u16::from_be_bytes([msg[0], msg[1]]);
            let owner = self
                .attempts
                .iter()
                .position(|x| x.active() && x.lookup.server() == addr && x.lookup.awaits(id));
            if let Some(a) = owner {
                self.on_message(a, &msg, true, now);
            }
        }
    }

    /// The TCP connection to `addr` failed or was closed. What it carried for
    /// lookups that wait is asked once more on a new connection if the server
    /// had answered on it before (it closes after so many queries, or when
    /// idle, as Consul's DNS server does); otherwise, or the second time, those
    /// lookups fail.
    fn tcp_failed(&mut self, addr: SocketAddr, e: &io::Error) {
        let Some(conn) = self.tcp.remove(&addr) else {
            return;
        };
        let reused = conn.answered;
        drop(conn);
        let reason = describe(e, addr);
        for a in 0..self.attempts.len() {
            let attempt = &mut self.attempts[a];
            if !attempt.active() || attempt.lookup.server() != addr {
                continue;
            }
            let caught: Vec<Outgoing> = attempt
                .lookup
                .pending()
                .into_iter()
                .filter(|q| attempt.over_tcp.contains(&q.id))
                .collect();
            if caught.is_empty() {
                continue;
            }
            if !reused || caught.iter().any(|q| attempt.retried.contains(&q.id)) {
                self.fail(a, reason.clone());
                continue;
            }
            attempt.retried.extend(caught.iter().map(|q| q.id));
            crate::log::debug!(
                "consul upstream: DNS connection to {addr} closed ({reason}), asking again"
            );
            for q in caught {
                self.send(a, q, true);
            }
        }
    }
}

/// The outcome of a line: its first resolver's answer, unless that one failed
/// (then the next one's); `None` while that is not known yet.
fn line_outcome(attempts: &[Attempt], of_line: &[usize]) -> Option<Resolved> {
    let mut failover = Failover::default();
    for &a in of_line {
        match attempts[a].lookup.outcome()? {
            Outcome::Failed(reason) => failover.failed(reason.clone()),
            Outcome::Answer(resolved) => return Some(resolved.clone()),
        }
    }
    Some(failover.result())
}

/// Whose descriptor poll reported on.
enum Owner {
    Udp(usize),
    Tcp(SocketAddr),
    Get(usize),
}

/// Looks up every DNS line (its query at its resolvers, with its transport and
/// `timeout`) and sends every API line's request (`gets`, which hold their
/// results), all at once, within `bound` in all. One result per DNS line, in
/// order.
pub fn lookup_all(
    lines: &[&Settings],
    gets: &mut [Get],
    own: &OwnAddresses,
    bound: Duration,
) -> Vec<Resolved> {
    let start = Instant::now();
    let deadline = start + bound;
    let mut run = Lookups {
        attempts: Vec::new(),
        tcp: HashMap::new(),
        // Random ids, as any resolver's: a stray datagram must not pass for an answer.
        ids: QueryIds::new(ngx::ffi::ngx_random() as u16),
        own,
    };
    let mut of_line: Vec<Vec<usize>> = Vec::with_capacity(lines.len());
    for (line, s) in lines.iter().enumerate() {
        let mut mine = Vec::new();
        for &addr in &s.resolvers {
            mine.push(run.attempts.len());
            run.attempts.push(Attempt {
                line,
                lookup: SrvLookup::new(&s.query, addr),
                tcp_first: s.transport == Transport::Tcp,
                timeout: Duration::from_millis(s.timeout_ms),
                started: false,
                udp: None,
                over_tcp: Vec::new(),
                retried: Vec::new(),
                due: deadline,
            });
        }
        of_line.push(mine);
    }
    let mut results: Vec<Option<Resolved>> = lines.iter().map(|_| None).collect();
    loop {
        let now = Instant::now();
        for a in 0..run.attempts.len() {
            let x = &run.attempts[a];
            // At the deadline, also what the socket limit kept from starting.
            if results[x.line].is_none()
                && !x.lookup.is_done()
                && (now >= deadline || x.started && now >= x.due)
            {
                let addr = x.lookup.server();
                run.fail(a, format!("{addr} timed out"));
            }
        }
        for (line, result) in results.iter_mut().enumerate() {
            if result.is_none() {
                *result = line_outcome(&run.attempts, &of_line[line]);
                if result.is_some() {
                    // Decided: the other resolvers' lookups end now.
                    for &a in &of_line[line] {
                        run.fail(a, "decided".into());
                    }
                }
            }
        }
        for get in gets.iter_mut() {
            // At the deadline, also what the socket limit kept from starting.
            if !get.is_done() && (now >= deadline || get.started() && now >= get.due()) {
                get.expire();
            }
        }
        if results.iter().all(Option::is_some) && gets.iter().all(Get::is_done) {
            break;
        }
        // Start what the socket limit allows, in order.
        let mut open = run.sockets() + gets.iter().filter(|g| g.poll_fd().is_some()).count();
        for a in 0..run.attempts.len() {
            if run.attempts[a].started || results[run.attempts[a].line].is_some() {
                continue;
            }
            if open >= MAX_SOCKETS {
                break;
            }
            run.start(a, now);
            open = run.sockets() + gets.iter().filter(|g| g.poll_fd().is_some()).count();
        }
        for get in gets.iter_mut().filter(|g| !g.started()) {
            if open >= MAX_SOCKETS {
                break;
            }
            get.start(now, deadline);
            open += 1;
        }
        // What to wait for, and until when.
        let mut fds = Vec::new();
        let mut owners: Vec<Owner> = Vec::new();
        let mut wake = deadline;
        for (a, x) in run.attempts.iter().enumerate() {
            if !x.active() {
                continue;
            }
            wake = wake.min(x.due);
            if let Some(c) = &x.udp {
                fds.push(libc::pollfd {
                    fd: c.fd.as_raw_fd(),
                    events: c.events(),
                    revents: 0,
                });
                owners.push(Owner::Udp(a));
            }
        }
        for (&addr, c) in &run.tcp {
            fds.push(libc::pollfd {
                fd: c.fd.as_raw_fd(),
                events: c.events(),
                revents: 0,
            });
            owners.push(Owner::Tcp(addr));
        }
        for (i, get) in gets.iter().enumerate() {
            if let Some((fd, events)) = get.poll_fd() {
                wake = wake.min(get.due());
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                owners.push(Owner::Get(i));
            }
        }
        let wait_ms = wake
            .saturating_duration_since(now)
            .as_millis()
            .saturating_add(1)
            .min(i32::MAX as u128) as libc::c_int;
        // SAFETY: fds is a valid array of fds.len() pollfd records.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // poll itself failed: nothing more can be learnt in time.
            for a in 0..run.attempts.len() {
                run.fail(a, format!("poll failed: {err}"));
            }
            for get in gets.iter_mut() {
                get.expire();
            }
            continue;
        }
        let now = Instant::now();
        for (pfd, owner) in fds.iter().zip(owners) {
            if pfd.revents == 0 {
                continue;
            }
            match owner {
                Owner::Udp(a) => run.on_udp(a, pfd.revents, now),
                Owner::Tcp(addr) => run.on_tcp(addr, pfd.revents, now),
                Owner::Get(i) => gets[i].on_ready(pfd.revents),
            }
        }
    }
    results.into_iter().flatten().collect()
}
