//! Load generator for `bench/run.sh`: a new TCP connection per request (`PING` -> `+PONG`,
//! then close), CONNS of them in flight, one epoll loop; alternates between targets in
//! short slices (a o o a a o o a ...) so that two proxies are compared under the same
//! machine conditions, and reads the CPU time of each target's nginx workers at every
//! slice boundary (in-flight connections are drained first, so nothing leaks across).
//!
//! Usage:
//!   bench-load --conns 32 --slice-ms 250 --pairs 20 [--max-conns N] [--drain-ms 2000]
//!              --target NAME=ADDR:PORT,ADDR:PORT,...[@PID,PID...]   (one or two targets)
//! With one target it runs `--pairs` slices of that target.
//! Prints one JSON object: per target, the connections, errors, latency percentiles (µs,
//! from connect() to the reply) and every slice with its wall time and the workers'
//! utime/stime (clock ticks) and schedstat run time (ns).
//! Every address must be in 127.0.0.0/8.

use std::collections::HashMap;
use std::io;
use std::mem;
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

struct Target {
    name: String,
    addrs: Vec<SocketAddrV4>,
    pids: Vec<i32>,
    lat_us: Vec<u32>,
    conns: u64,
    errors: u64,
    slices: Vec<String>,
}

struct Conn {
    target: usize,
    started: Instant,
    written: bool,
    got: Vec<u8>,
}

fn cpu_of(pids: &[i32]) -> (u64, u64, u64) {
    let (mut u, mut s, mut sched) = (0u64, 0u64, 0u64);
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                u += f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
                s += f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }
        if let Ok(ss) = std::fs::read_to_string(format!("/proc/{pid}/schedstat")) {
            sched += ss.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    (u, s, sched)
}

fn sockaddr(a: &SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

struct Loop {
    ep: RawFd,
    conns: HashMap<RawFd, Conn>,
    events: Vec<libc::epoll_event>,
}

impl Loop {
    /// Opens one connection to `addr` (non-blocking connect); counts an error on failure.
    fn open(&mut self, t: usize, addr: &SocketAddrV4) -> bool {
        // SAFETY: socket syscalls on a descriptor we own.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return false;
            }
            let one: libc::c_int = 1;
            libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one as *const _ as *const libc::c_void, 4);
            let sin = sockaddr(addr);
            let started = Instant::now();
            let r = libc::connect(fd, &sin as *const _ as *const libc::sockaddr, mem::size_of::<libc::sockaddr_in>() as u32);
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
                libc::close(fd);
                return false;
            }
            let mut ev = libc::epoll_event { events: (libc::EPOLLOUT | libc::EPOLLIN) as u32, u64: fd as u64 };
            if libc::epoll_ctl(self.ep, libc::EPOLL_CTL_ADD, fd, &mut ev) < 0 {
                libc::close(fd);
                return false;
            }
            self.conns.insert(fd, Conn { target: t, started, written: false, got: Vec::new() });
        }
        true
    }

    fn close(&mut self, fd: RawFd) -> Option<Conn> {
        // SAFETY: closing a descriptor we own (removes it from the epoll set).
        unsafe { libc::close(fd) };
        self.conns.remove(&fd)
    }

    /// Handles ready connections; returns finished ones as (target, latency, ok).
    fn poll(&mut self, timeout_ms: i32, done: &mut Vec<(usize, u32, bool)>) {
        // SAFETY: epoll_wait into our own buffer.
        let n = unsafe { libc::epoll_wait(self.ep, self.events.as_mut_ptr(), self.events.len() as i32, timeout_ms) };
        if n <= 0 {
            return;
        }
        for i in 0..n as usize {
            let ev = self.events[i];
            let fd = ev.u64 as RawFd;
            let flags = ev.events;
            let Some(c) = self.conns.get_mut(&fd) else { continue };
            if flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 && flags & libc::EPOLLIN as u32 == 0 {
                let c = self.close(fd).unwrap();
                done.push((c.target, 0, false));
                continue;
            }
            if !c.written && flags & libc::EPOLLOUT as u32 != 0 {
                let msg = b"PING\r\n";
                // SAFETY: writing our own buffer to our socket.
                let w = unsafe { libc::write(fd, msg.as_ptr() as *const libc::c_void, msg.len()) };
                if w != msg.len() as isize {
                    let c = self.close(fd).unwrap();
                    done.push((c.target, 0, false));
                    continue;
                }
                c.written = true;
                let mut ev2 = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
                // SAFETY: modifying our own registration.
                unsafe { libc::epoll_ctl(self.ep, libc::EPOLL_CTL_MOD, fd, &mut ev2) };
            }
            if flags & libc::EPOLLIN as u32 != 0 {
                let mut buf = [0u8; 64];
                // SAFETY: reading into our own buffer.
                let r = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if r > 0 {
                    c.got.extend_from_slice(&buf[..r as usize]);
                    if c.got.ends_with(b"\r\n") {
                        let ok = c.got.starts_with(b"+PONG");
                        let lat = c.started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        let c = self.close(fd).unwrap();
                        done.push((c.target, lat, ok));
                    }
                } else if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
                    let c = self.close(fd).unwrap();
                    done.push((c.target, 0, false));
                }
            }
        }
    }
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let k = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[k]
}

fn main() {
    let mut conns = 32usize;
    let mut slice_ms = 250u64;
    let mut pairs = 20usize;
    let mut max_conns = u64::MAX;
    let mut drain_ms = 2000u64;
    let mut targets: Vec<Target> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--conns" => conns = v.parse().expect("--conns N"),
            "--slice-ms" => slice_ms = v.parse().expect("--slice-ms N"),
            "--pairs" => pairs = v.parse().expect("--pairs N"),
            "--max-conns" => max_conns = v.parse().expect("--max-conns N"),
            "--drain-ms" => drain_ms = v.parse().expect("--drain-ms N"),
            "--target" => {
                let (name, rest) = v.split_once('=').expect("--target NAME=ADDRS[@PIDS]");
                let (addrs, pids) = rest.split_once('@').unwrap_or((rest, ""));
                let addrs: Vec<SocketAddrV4> = addrs.split(',').map(|s| s.parse().expect("ADDR:PORT")).collect();
                for a in &addrs {
                    assert!(a.ip().octets()[0] == 127, "{a} is not in 127.0.0.0/8");
                }
                let pids = pids.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().expect("PID")).collect();
                targets.push(Target {
                    name: name.to_string(),
                    addrs,
                    pids,
                    lat_us: Vec::new(),
                    conns: 0,
                    errors: 0,
                    slices: Vec::new(),
                });
            }
            _ => panic!("unknown argument {a}"),
        }
    }
    assert!(!targets.is_empty() && targets.len() <= 2, "one or two --target");
    assert!(pairs <= 10_000 && slice_ms <= 60_000, "bounded runs only");

    // Schedule: one target -> `pairs` slices; two -> a o o a a o o a ...
    let schedule: Vec<usize> = if targets.len() == 1 {
        vec![0; pairs]
    } else {
        (0..pairs).flat_map(|k| if k % 2 == 0 { [0, 1] } else { [1, 0] }).collect()
    };

    // SAFETY: creating our epoll instance.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1");
    let mut lp = Loop { ep, conns: HashMap::new(), events: vec![libc::epoll_event { events: 0, u64: 0 }; 256] };
    let mut done = Vec::new();
    let mut rr = 0usize;
    let run_start = Instant::now();

    for &t in &schedule {
        let (u0, s0, sch0) = cpu_of(&targets[t].pids);
        let start = Instant::now();
        let end = start + Duration::from_millis(slice_ms);
        let mut opened = 0u64;
        let (mut ok_n, mut err_n) = (0u64, 0u64);
        let mut lats: Vec<u32> = Vec::new();
        // Run: keep `conns` in flight until the slice time or its connection budget is used.
        loop {
            let now = Instant::now();
            let running = now < end && opened < max_conns;
            if running {
                while lp.conns.len() < conns && opened < max_conns {
                    let addr = targets[t].addrs[rr % targets[t].addrs.len()];
                    rr += 1;
                    opened += 1;
                    if !lp.open(t, &addr) {
                        err_n += 1;
                    }
                }
            } else if lp.conns.is_empty() || now > end + Duration::from_millis(drain_ms) {
                break;
            }
            lp.poll(1, &mut done);
            for (tt, lat, ok) in done.drain(..) {
                debug_assert_eq!(tt, t);
                if ok {
                    ok_n += 1;
                    lats.push(lat);
                } else {
                    err_n += 1;
                }
            }
        }
        // Anything still open after the drain time is an error; drop it.
        let stuck: Vec<RawFd> = lp.conns.keys().copied().collect();
        for fd in stuck {
            lp.close(fd);
            err_n += 1;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let (u1, s1, sch1) = cpu_of(&targets[t].pids);
        let tg = &mut targets[t];
        tg.conns += ok_n;
        tg.errors += err_n;
        tg.lat_us.extend_from_slice(&lats);
        lats.sort_unstable();
        tg.slices.push(format!(
            "{{\"conns\":{ok_n},\"errors\":{err_n},\"elapsed_s\":{elapsed:.6},\"utime_ticks\":{},\"stime_ticks\":{},\"sched_ns\":{},\"p50_us\":{},\"p99_us\":{}}}",
            u1 - u0,
            s1 - s0,
            sch1 - sch0,
            pct(&lats, 50.0),
            pct(&lats, 99.0)
        ));
    }

    let mut out = String::from("{\"targets\":{");
    for (i, tg) in targets.iter_mut().enumerate() {
        tg.lat_us.sort_unstable();
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "\"{}\":{{\"conns\":{},\"errors\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"slices\":[{}]}}",
            tg.name,
            tg.conns,
            tg.errors,
            pct(&tg.lat_us, 50.0),
            pct(&tg.lat_us, 99.0),
            pct(&tg.lat_us, 99.9),
            tg.slices.join(",")
        ));
    }
    out.push_str(&format!("}},\"wall_s\":{:.3}}}", run_start.elapsed().as_secs_f64()));
    println!("{out}");
}
