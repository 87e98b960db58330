//! A Redis-shaped backend for `bench/run.sh`: one process, one epoll loop, any number of
//! listening sockets inside 127.0.0.0/8 (one per peer address), so that 10,000 distinct
//! peers need neither 10,000 redis-servers nor a wildcard bind.
//!
//! Commands (inline or RESP multi-bulk): `PING` -> `+PONG`, `ADDR` -> `+<listener address>`
//! (lets a prober see which peer served it), `CONFIG GET x` -> `[x, ""]` (redis-benchmark
//! asks at start), anything else -> `-ERR`.
//! With `--http` the peers speak HTTP/1.1 instead (`bench/http.py`): every request gets
//! `200`, `Content-Length: 2`, `X-Peer: <listener address>`, body `OK`, on a kept-alive
//! connection (closed after the answer when the request says `Connection: close`, or is
//! HTTP/1.0 without `keep-alive`); request bodies (Content-Length) are skipped.
//! A control listener (`--ctl ADDR:PORT`, always Redis-shaped) answers `STATS` with
//! `total <accepted connections> distinct <listeners that accepted at least one>
//! requests <HTTP requests answered>` and `RESET` (zeroes the counters) with `OK`.
//!
//! Usage: bench-responder --peers N [--net 127.78] [--port 6400] [--listen ADDR:PORT]... --ctl ADDR:PORT [--http]
//! Peer i listens on NET.(i / 250).(i % 250 + 1):PORT (NET is the first two octets).

use std::collections::HashMap;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

const CTL_TAG: u64 = 1 << 62;
const LISTENER_TAG: u64 = 1 << 61;

fn check(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

fn listen_on(addr: SocketAddrV4) -> io::Result<RawFd> {
    // SAFETY: plain socket syscalls on values we own.
    unsafe {
        let fd = check(
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0),
            "socket",
        )?;
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
            sin_zero: [0; 8],
        };
        check(
            libc::bind(fd, &sin as *const _ as *const libc::sockaddr, mem::size_of::<libc::sockaddr_in>() as u32),
            &format!("bind {addr}"),
        )?;
        check(libc::listen(fd, 4096), "listen")?;
        Ok(fd)
    }
}

fn peer_addr(net: u8, i: usize, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(127, net, (i / 250) as u8, (i % 250 + 1) as u8), port)
}

struct Conn {
    listener: usize, // usize::MAX for control connections
    buf: Vec<u8>,
    nargs: usize,
    args: Vec<String>,
    skip: usize, // HTTP: request body bytes still to drop
}

fn reply_for(args: &[String], me: &str, stats: &mut Stats) -> Vec<u8> {
    let cmd = args.first().map(|s| s.to_ascii_uppercase()).unwrap_or_default();
    match cmd.as_str() {
        "PING" => b"+PONG\r\n".to_vec(),
        "ADDR" => format!("+{me}\r\n").into_bytes(),
        "CONFIG" => {
            // CONFIG GET name -> [name, ""], as an empty-configured redis would answer
            let name = args.get(2).map(String::as_str).unwrap_or("");
            format!("*2\r\n${}\r\n{}\r\n$0\r\n\r\n", name.len(), name).into_bytes()
        }
        "STATS" => {
            format!("+total {} distinct {} requests {}\r\n", stats.total, stats.distinct, stats.requests).into_bytes()
        }
        "RESET" => {
            stats.reset();
            b"+OK\r\n".to_vec()
        }
        _ => b"-ERR unknown command\r\n".to_vec(),
    }
}

struct Stats {
    total: u64,
    distinct: u64,
    requests: u64,
    hits: Vec<u32>,
}

impl Stats {
    fn reset(&mut self) {
        self.total = 0;
        self.distinct = 0;
        self.requests = 0;
        self.hits.iter_mut().for_each(|h| *h = 0);
    }
    fn accepted(&mut self, listener: usize) {
        self.total += 1;
        if self.hits[listener] == 0 {
            self.distinct += 1;
        }
        self.hits[listener] = self.hits[listener].saturating_add(1);
    }
}

/// Feeds bytes into the connection's line parser; returns the replies to send.
fn feed(c: &mut Conn, data: &[u8], me: &str, stats: &mut Stats) -> Vec<u8> {
    c.buf.extend_from_slice(data);
    let mut out = Vec::new();
    let mut start = 0;
    while let Some(pos) = c.buf[start..].windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&c.buf[start..start + pos]).into_owned();
        start += pos + 2;
        if let Some(n) = line.strip_prefix('*') {
            c.nargs = n.parse().unwrap_or(0);
            c.args.clear();
        } else if line.starts_with('$') {
            // bulk length: the argument follows on its own line
        } else if c.nargs > 0 {
            c.args.push(line);
            if c.args.len() == c.nargs {
                out.extend(reply_for(&c.args, me, stats));
                c.nargs = 0;
                c.args.clear();
            }
        } else if !line.is_empty() {
            let args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            out.extend(reply_for(&args, me, stats));
        }
    }
    c.buf.drain(..start);
    if c.buf.len() > 64 * 1024 {
        c.buf.clear();
    }
    out
}

/// HTTP/1.x on a peer connection: answers every complete request in `data` (pipelined ones
/// too). Returns the answers and whether to close after sending them.
fn feed_http(c: &mut Conn, data: &[u8], me: &str, stats: &mut Stats) -> (Vec<u8>, bool) {
    let mut data = data;
    if c.skip > 0 {
        let n = c.skip.min(data.len());
        c.skip -= n;
        data = &data[n..];
    }
    c.buf.extend_from_slice(data);
    let mut out = Vec::new();
    let mut start = 0;
    while c.skip == 0 {
        let Some(end) = c.buf[start..].windows(4).position(|w| w == b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&c.buf[start..start + end]).to_ascii_lowercase();
        start += end + 4;
        let mut lines = head.split("\r\n");
        let http10 = lines.next().is_some_and(|l| l.ends_with("http/1.0"));
        let (mut length, mut connection) = (0usize, "");
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                match k.trim() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "connection" => connection = v.trim(),
                    _ => {}
                }
            }
        }
        let close = connection.contains("close") || (http10 && !connection.contains("keep-alive"));
        stats.requests += 1;
        let conn = if close { "close" } else { "keep-alive" };
        out.extend_from_slice(
            format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Peer: {me}\r\nConnection: {conn}\r\n\r\nOK").as_bytes(),
        );
        if close {
            c.buf.clear();
            return (out, true);
        }
        let body = length.min(c.buf.len() - start);
        start += body;
        c.skip = length - body;
    }
    c.buf.drain(..start);
    // no end of head in 64 KiB: not a client of ours
    let junk = c.buf.len() > 64 * 1024;
    (out, junk)
}

fn main() -> io::Result<()> {
    let mut peers = 0usize;
    let mut port = 6400u16;
    let mut net = 78u8;
    let mut extra: Vec<SocketAddrV4> = Vec::new();
    let mut ctl: Option<SocketAddrV4> = None;
    let mut http = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--peers" => peers = val().parse().expect("--peers N"),
            "--net" => {
                let v = val();
                net = v.strip_prefix("127.").and_then(|n| n.parse().ok()).expect("--net 127.N")
            }
            "--port" => port = val().parse().expect("--port P"),
            "--listen" => extra.push(val().parse().expect("--listen A:P")),
            "--ctl" => ctl = Some(val().parse().expect("--ctl A:P")),
            "--http" => http = true,
            _ => panic!("unknown argument {a}"),
        }
    }
    let mut addrs: Vec<SocketAddrV4> = (0..peers).map(|i| peer_addr(net, i, port)).collect();
    addrs.extend(extra);
    for a in &addrs {
        assert!(a.ip().octets()[0] == 127, "{a} is not in 127.0.0.0/8");
    }

    // SAFETY: raising our own file descriptor limit.
    unsafe {
        let lim = libc::rlimit { rlim_cur: 200_000, rlim_max: 200_000 };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            let mut cur = mem::zeroed::<libc::rlimit>();
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
            cur.rlim_cur = cur.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
        }
    }

    // SAFETY: epoll syscalls on descriptors we own.
    let ep = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }, "epoll_create1")?;
    let add = |fd: RawFd, data: u64| -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: data };
        check(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }, "epoll_ctl").map(|_| ())
    };

    let mut listeners: Vec<(RawFd, String)> = Vec::with_capacity(addrs.len());
    for (i, a) in addrs.iter().enumerate() {
        let fd = listen_on(*a)?;
        add(fd, LISTENER_TAG | i as u64)?;
        listeners.push((fd, a.to_string()));
    }
    let ctl_fd = match ctl {
        Some(a) => {
            let fd = listen_on(a)?;
            add(fd, CTL_TAG)?;
            Some(fd)
        }
        None => None,
    };
    eprintln!("bench-responder: {} listeners ready", listeners.len());

    let mut stats = Stats { total: 0, distinct: 0, requests: 0, hits: vec![0; listeners.len()] };
    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut rbuf = vec![0u8; 16 * 1024];
    loop {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io::Error::last_os_error());
        }
        for ev in &events[..n as usize] {
            let data = ev.u64;
            if data & (LISTENER_TAG | CTL_TAG) != 0 {
                let (lfd, index) = if data & CTL_TAG != 0 {
                    (ctl_fd.unwrap(), usize::MAX)
                } else {
                    let i = (data & !LISTENER_TAG) as usize;
                    (listeners[i].0, i)
                };
                loop {
                    let fd = unsafe {
                        libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                    };
                    if fd < 0 {
                        break;
                    }
                    if index != usize::MAX {
                        stats.accepted(index);
                    }
                    if add(fd, fd as u64).is_err() {
                        unsafe { libc::close(fd) };
                        continue;
                    }
                    conns.insert(fd, Conn { listener: index, buf: Vec::new(), nargs: 0, args: Vec::new(), skip: 0 });
                }
                continue;
            }
            let fd = data as RawFd;
            let mut close = false;
            loop {
                let r = unsafe { libc::read(fd, rbuf.as_mut_ptr() as *mut libc::c_void, rbuf.len()) };
                if r == 0 {
                    close = true;
                    break;
                }
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                        close = true;
                    }
                    break;
                }
                let Some(c) = conns.get_mut(&fd) else {
                    close = true;
                    break;
                };
                let me = if c.listener == usize::MAX { "ctl" } else { listeners[c.listener].1.as_str() };
                let out = if http && c.listener != usize::MAX {
                    let (out, done) = feed_http(c, &rbuf[..r as usize], me, &mut stats);
                    close = done;
                    out
                } else {
                    feed(c, &rbuf[..r as usize], me, &mut stats)
                };
                if !out.is_empty() {
                    let w = unsafe { libc::write(fd, out.as_ptr() as *const libc::c_void, out.len()) };
                    if w != out.len() as isize {
                        close = true; // replies are tiny: a short write means a stuck client
                        break;
                    }
                }
                if close || (r as usize) < rbuf.len() {
                    break;
                }
            }
            if close {
                conns.remove(&fd);
                unsafe { libc::close(fd) }; // close removes it from the epoll set
            }
        }
    }
}
