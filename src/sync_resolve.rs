//! The master's bounded lookup (see [`crate::prefill`]): the SRV query of
//! every line, at all of the line's resolvers at once, over non-blocking
//! sockets and one poll(2) loop, all within one deadline. The master runs no
//! event loop while it reads its configuration, and a thread would not survive
//! its fork: this is the synchronous path, built from the worker's pieces —
//! core's [`Exchange`] asks and reads as the worker's resolver does. Every
//! socket is closed before [`lookup_all`] returns.
//!
//! Resolvers keep their order: a line takes the answer of its first resolver
//! unless that one fails (the worker's failover), but all are asked at once, so
//! that a resolver that never answers costs the line's `timeout` (capped by the
//! deadline), not one `timeout` after another.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use consul_core::answer::OwnAddresses;
use consul_core::exchange::{Exchange, Next, Outcome, Outgoing};
use consul_core::settings::{Settings, Transport};

use crate::resolve::Resolved;
use crate::sockaddr::SockaddrBuf;

/// Sockets open at once; further lookups start as earlier ones end (the
/// master's descriptor limit is nginx's default, not `worker_rlimit_nofile`).
const MAX_SOCKETS: usize = 256;

/// The largest DNS message (TCP's length prefix is 16 bits).
const MAX_MESSAGE: usize = 65_535;

/// Reads from one socket before the loop looks at the clock again: a server
/// that floods cannot hold the master past the deadline.
const READS_PER_WAKE: usize = 64;

/// One socket to one resolver.
struct Conn {
    fd: OwnedFd,
    tcp: bool,
    connecting: bool,
    /// TCP: length-prefixed queries not written yet.
    out: Vec<u8>,
    /// TCP: bytes read, not yet a whole message.
    inbuf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr, tcp: bool) -> io::Result<Conn> {
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let kind = if tcp {
            libc::SOCK_STREAM
        } else {
            libc::SOCK_DGRAM
        };
        // SAFETY: plain socket(2); the descriptor is owned below.
        let raw =
            unsafe { libc::socket(domain, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor socket(2) just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let (sa, len) = SockaddrBuf::new(&addr);
        // SAFETY: sa holds a socket address of len bytes.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), sa.as_ptr(), len) };
        let mut connecting = false;
        if rc != 0 {
            let err = io::Error::last_os_error();
            if !(tcp && err.raw_os_error() == Some(libc::EINPROGRESS)) {
                return Err(err);
            }
            connecting = true;
        }
        Ok(Conn {
            fd,
            tcp,
            connecting,
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
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: err and len are valid for getsockopt's SO_ERROR.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
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
    exchange: Exchange,
    tcp_first: bool,
    timeout: Duration,
    started: bool,
    udp: Option<Conn>,
    tcp: Option<Conn>,
    /// The answer is due by then (renewed whenever a query goes out).
    due: Instant,
}

impl Attempt {
    fn sockets(&self) -> usize {
        usize::from(self.udp.is_some()) + usize::from(self.tcp.is_some())
    }

    fn fail(&mut self, reason: String) {
        self.exchange.fail(reason);
        self.close();
    }

    fn close(&mut self) {
        self.udp = None;
        self.tcp = None;
    }

    fn start(&mut self, now: Instant) {
        self.started = true;
        self.due = now + self.timeout;
        if let Some(q) = self.exchange.start() {
            self.send(q, self.tcp_first);
        }
    }

    /// Sends `q` over TCP or UDP, opening the socket on first use.
    fn send(&mut self, q: Outgoing, tcp: bool) {
        let addr = self.exchange.server();
        let slot = if tcp { &mut self.tcp } else { &mut self.udp };
        if slot.is_none() {
            match Conn::open(addr, tcp) {
                Ok(c) => *slot = Some(c),
                Err(e) => return self.fail(describe(&e, addr)),
            }
        }
        let sent = slot.as_mut().map_or(Ok(()), |c| c.send(&q));
        if let Err(e) = sent {
            self.fail(describe(&e, addr));
        }
    }

    /// Handles what poll reported for the UDP (`tcp` false) or TCP socket.
    fn on_ready(&mut self, tcp: bool, revents: libc::c_short, own: &OwnAddresses, now: Instant) {
        let addr = self.exchange.server();
        let Some(conn) = (if tcp {
            self.tcp.as_mut()
        } else {
            self.udp.as_mut()
        }) else {
            return;
        };
        if conn.connecting {
            if revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) == 0 {
                return;
            }
            if let Err(e) = conn.connected() {
                return self.fail(describe(&e, addr));
            }
        } else if revents & libc::POLLOUT != 0 {
            if let Err(e) = conn.flush() {
                return self.fail(describe(&e, addr));
            }
        }
        if revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) == 0 {
            return;
        }
        let messages = match conn.receive() {
            Ok(m) => m,
            Err(e) => return self.fail(describe(&e, addr)),
        };
        for msg in messages {
            match self.exchange.on_message(&msg, tcp, own) {
                Next::Ignored => {}
                Next::Send(queries) => {
                    if !queries.is_empty() {
                        self.due = now + self.timeout;
                    }
                    for q in queries {
                        self.send(q, self.tcp_first);
                    }
                }
                Next::Truncated(q) => {
                    self.due = now + self.timeout;
                    self.send(q, true);
                }
            }
        }
        if self.exchange.is_done() {
            self.close();
        }
    }
}

/// hickory's words for a failed exchange (src/resolve.rs says the same).
fn describe(e: &io::Error, addr: SocketAddr) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED | libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ECONNRESET) => {
            format!("cannot connect to {addr}")
        }
        _ if e.kind() == io::ErrorKind::UnexpectedEof => format!("{addr} closed the connection"),
        _ => format!("{e} from {addr}"),
    }
}

/// The outcome of a line: its first resolver's answer, unless that one failed
/// (then the next one's); `None` while that is not known yet.
fn line_outcome(attempts: &[Attempt]) -> Option<Resolved> {
    let mut reasons = Vec::new();
    for a in attempts {
        match a.exchange.outcome()? {
            Outcome::Failed(reason) => reasons.push(reason.clone()),
            answer => return Some(resolved(answer.clone())),
        }
    }
    if reasons.is_empty() {
        reasons.push("no usable resolver".into());
    }
    Some(Resolved::Failed(reasons.join(", ")))
}

fn resolved(outcome: Outcome) -> Resolved {
    match outcome {
        Outcome::Peers { peers, ignored } => Resolved::Peers {
            peers,
            ignored,
            truncated: None,
        },
        Outcome::Empty { nxdomain } => Resolved::Empty { nxdomain },
        Outcome::Failed(reason) => Resolved::Failed(reason),
    }
}

/// Looks up every line (its query at its resolvers, with its transport and
/// `timeout`), all at once, within `bound` in all. One result per line, in order.
pub fn lookup_all(lines: &[&Settings], own: &OwnAddresses, bound: Duration) -> Vec<Resolved> {
    let start = Instant::now();
    let deadline = start + bound;
    // Random ids, as any resolver's: a stray datagram must not pass for an answer.
    let mut next_id = ngx::ffi::ngx_random() as u16;
    let mut jobs: Vec<Vec<Attempt>> = lines
        .iter()
        .map(|s| {
            s.resolvers
                .iter()
                .map(|&addr| {
                    let id = next_id;
                    next_id = next_id.wrapping_add(0x100);
                    Attempt {
                        exchange: Exchange::new(&s.query, addr, id),
                        tcp_first: s.transport == Transport::Tcp,
                        timeout: Duration::from_millis(s.timeout_ms),
                        started: false,
                        udp: None,
                        tcp: None,
                        due: deadline,
                    }
                })
                .collect()
        })
        .collect();
    let mut results: Vec<Option<Resolved>> = lines.iter().map(|_| None).collect();
    loop {
        let now = Instant::now();
        for (job, result) in jobs.iter_mut().zip(results.iter_mut()) {
            if result.is_some() {
                continue;
            }
            for a in job.iter_mut() {
                // At the deadline, also what the socket limit kept from starting.
                if !a.exchange.is_done() && (now >= deadline || a.started && now >= a.due) {
                    let addr = a.exchange.server();
                    a.fail(format!("{addr} timed out"));
                }
            }
            *result = line_outcome(job);
            if result.is_some() {
                // Decided: the other resolvers' sockets close now.
                job.iter_mut().for_each(Attempt::close);
            }
        }
        if results.iter().all(Option::is_some) {
            break;
        }
        // Start what the socket limit allows, in order.
        let mut open: usize = jobs.iter().flatten().map(Attempt::sockets).sum();
        for (job, result) in jobs.iter_mut().zip(&results) {
            if result.is_some() {
                continue;
            }
            for a in job.iter_mut().filter(|a| !a.started) {
                if open >= MAX_SOCKETS {
                    break;
                }
                a.start(now);
                open += a.sockets();
            }
        }
        // What to wait for, and until when.
        let mut fds = Vec::new();
        let mut owners = Vec::new();
        let mut wake = deadline;
        for (j, job) in jobs.iter().enumerate() {
            if results[j].is_some() {
                continue;
            }
            for (r, a) in job.iter().enumerate() {
                if !a.started || a.exchange.is_done() {
                    continue;
                }
                wake = wake.min(a.due);
                for (tcp, conn) in [(false, &a.udp), (true, &a.tcp)] {
                    if let Some(c) = conn {
                        fds.push(libc::pollfd {
                            fd: c.fd.as_raw_fd(),
                            events: c.events(),
                            revents: 0,
                        });
                        owners.push((j, r, tcp));
                    }
                }
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
            for a in jobs.iter_mut().flatten() {
                a.fail(format!("poll failed: {err}"));
            }
            continue;
        }
        let now = Instant::now();
        for (pfd, &(j, r, tcp)) in fds.iter().zip(&owners) {
            if pfd.revents != 0 {
                jobs[j][r].on_ready(tcp, pfd.revents, own, now);
            }
        }
    }
    results.into_iter().flatten().collect()
}
