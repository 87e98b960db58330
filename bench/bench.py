#!/usr/bin/env python3
"""ngx-consul benchmark driver; bench/run.sh builds everything and then runs this.

Three setups, same nginx binary, same worker count, same backends, same BIND:
  a  stock nginx static `upstream` round robin
  b  nginx 1.28 `server NAME service=... resolve;` with `resolver` and `zone`
  c  this module: `consul_upstream redis.service.bench.consul resolver=... interval=1s`

Writes bench/results.csv, bench/RESULTS.md and (via plot.py) bench/plot.png; with --quick
the same files go to bench/out/ instead.
Every address is in 127.0.0.0/8; every load loop is bounded in count and in time.
"""

import argparse
import csv
import datetime
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
if not TARGET.is_absolute():
    TARGET = ROOT / TARGET

HOST = "127.77.0.1"  # nginx listeners and the responder's control port
# BIND listens only on addresses configured on an interface (127.0.0.1 here), and the test
# suite and demos use 127.0.0.1:8600: the benchmark's BIND gets its own port.
DNS_HOST = "127.0.0.1"
DNS_PORT = int(os.environ.get("BENCH_DNS_PORT", "28600"))
PEER_NET = 78  # peer i listens on 127.78.(i // 250).(i % 250 + 1):6400
PEER_PORT = 6400
EXTRA_PEER = "127.79.0.1"  # registered / deregistered by the propagation test
CTL_PORT = 6399
INST_PORTS = {"a": [17001, 17002, 17003, 17004],  # one nginx instance per setup, own ports
              "b": [17011, 17012, 17013, 17014],
              "c": [17021, 17022, 17023, 17024],
              "a2": [17031, 17032, 17033, 17034]}  # a second (a): the A/A noise floor
CACHE_PORT = 17005
DC = "bench"
QNAME = f"redis.service.{DC}.consul"
CACHE_QNAME = f"cache.service.{DC}.consul"
# nginx's own resolver (b) sends an A and an AAAA query per SRV target at once; with the
# default 208 KiB socket buffer BIND drops most of them from ~1,400 targets on. 4 MiB is
# net.core.rmem_max here (no sysctl is changed).
UDP_RCVBUF = int(os.environ.get("BENCH_UDP_RCVBUF", "4194304"))
GEN_CONNS = 32  # connections in flight (the notes' 4 generators x 8 connections), over 4 ports
LOADER = None  # path of bench-load, set from --loader
NOFILE = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
TICK = os.sysconf("SC_CLK_TCK")
SETUPS = ["a", "b", "c"]
SETUP_NAMES = {
    "a": "static round robin",
    "b": "nginx resolve (service=)",
    "c": "consul_upstream",
}


def log(*a):
    print(*a, flush=True)


def peer_ip(i):
    return f"127.{PEER_NET}.{i // 250}.{i % 250 + 1}"


def hex_target(ip):
    return "".join(f"{int(o):02x}" for o in ip.split(".")) + f".addr.{DC}.consul."


# --------------------------------------------------------------------------- processes

STARTED = []  # Popen objects this run started (and only those are ever signalled)


def spawn(args, **kw):
    p = subprocess.Popen(args, **kw)
    STARTED.append(p)
    return p


def stop_proc(p, sig=signal.SIGTERM, wait=10):
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(sig)
        p.wait(wait)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def cleanup(*_):
    for p in reversed(STARTED):
        stop_proc(p, wait=5)


def proc_cpu(pid):
    """(utime, stime) of a process in seconds, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / TICK, int(fields[12]) / TICK
    except (OSError, IndexError):
        return None


def proc_sched_ns(pid):
    """Time on CPU in ns from /proc/PID/schedstat (exact, unlike the 10 ms ticks of stat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def port_free(host, port, kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def redis_cmd(host, port, cmd, timeout=1.0):
    """Sends one inline command on a new connection; returns the reply line or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(cmd.encode() + b"\r\n")
            buf = b""
            while not buf.endswith(b"\r\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                buf += chunk
            return buf.decode(errors="replace").strip() or None
    except OSError:
        return None


# --------------------------------------------------------------------------- responder


class Responder:
    def __init__(self, binary, peers):
        self.binary = binary
        self.peers = peers
        self.p = None

    def start(self):
        self.p = spawn(
            [str(self.binary), "--peers", str(self.peers), "--net", f"127.{PEER_NET}",
             "--port", str(PEER_PORT), "--listen", f"{EXTRA_PEER}:{PEER_PORT}",
             "--ctl", f"{HOST}:{CTL_PORT}"],
            stdout=subprocess.DEVNULL, stderr=open(OUT / "responder.log", "w"))
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.cmd("STATS"):
                return
            if self.p.poll() is not None:
                raise SystemExit(f"responder exited: {(OUT / 'responder.log').read_text()}")
            time.sleep(0.1)
        raise SystemExit("responder did not start")

    def cmd(self, c):
        return redis_cmd(HOST, CTL_PORT, c)

    def stats(self):
        m = re.search(r"total (\d+) distinct (\d+)", self.cmd("STATS") or "")
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# --------------------------------------------------------------------------- BIND


class Bind:
    """BIND 9 standing in for Consul's DNS interface on DNS_HOST:DNS_PORT, zone `consul`."""

    def __init__(self):
        self.dir = OUT / "bind"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.p = None

    def zone(self, n, shards=0, cache=False, extra_a=True):
        """n peers under QNAME (or, with shards, spread over redis.service.sK.bench.consul)."""
        lines = [
            "$TTL 0",
            "@ IN SOA ns.consul. hostmaster.consul. 1 3600 600 86400 0",
            "@ IN NS ns.consul.",
            f"ns IN A {DNS_HOST}",
        ]
        if shards:
            for i in range(n):
                lines.append(f"redis.service.s{i % shards}.{DC} IN SRV 1 1 {PEER_PORT} {hex_target(peer_ip(i))}")
        else:
            for i in range(n):
                lines.append(f"redis.service.{DC} IN SRV 1 1 {PEER_PORT} {hex_target(peer_ip(i))}")
        if cache:
            for i in range(2):
                lines.append(f"cache.service.{DC} IN SRV 1 1 {PEER_PORT} {hex_target(peer_ip(i))}")
        for i in range(n):
            ip = peer_ip(i)
            lines.append(f"{hex_target(ip)[:-len('.consul.')]} IN A {ip}")
        if extra_a:
            lines.append(f"{hex_target(EXTRA_PEER)[:-len('.consul.')]} IN A {EXTRA_PEER}")
        return "\n".join(lines) + "\n"

    def start(self, zone_text, querylog=False):
        self.stop()
        d = self.dir
        for f in d.glob("consul.zone*"):
            f.unlink()
        (d / "consul.zone").write_text(zone_text)
        qlog = d / "query.log"
        if qlog.exists():
            qlog.unlink()
        (d / "named.conf").write_text(f"""
options {{
  directory "{d}";
  pid-file "{d}/named.pid";
  session-keyfile "{d}/session.key";
  managed-keys-directory "{d}";
  listen-on port {DNS_PORT} {{ {DNS_HOST}; }};
  listen-on-v6 {{ none; }};
  recursion no;
  dnssec-validation no;
  notify no;
  check-names primary ignore;
  minimal-responses no-auth;
  max-records-per-type 0;
  udp-receive-buffer {UDP_RCVBUF};
  querylog {"yes" if querylog else "no"};
}};
controls {{ }};
logging {{
  channel main {{ file "{d}/named.log"; severity info; print-time yes; }};
  channel queries {{ file "{qlog}"; print-time yes; }};
  category default {{ main; }};
  category queries {{ queries; }};
}};
zone "consul" {{ type primary; file "{d}/consul.zone"; allow-update {{ 127.0.0.0/8; }}; }};
""")
        self.p = spawn(["named", "-f", "-n", "1", "-c", str(d / "named.conf")],
                       stdout=subprocess.DEVNULL, stderr=open(d / "named.stderr", "w"))
        deadline = time.time() + 15
        while time.time() < deadline:
            r = subprocess.run(["dig", "+short", "+time=1", "+tries=1", "@" + DNS_HOST, "-p", str(DNS_PORT),
                                "consul", "SOA"], capture_output=True, text=True)
            if "hostmaster" in r.stdout:
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"BIND did not start; see {d}/named.log and named.stderr")

    def stop(self):
        stop_proc(self.p)
        self.p = None

    def answer_count(self, qname):
        r = subprocess.run(["dig", "+tcp", "+norec", "+time=3", "+tries=1", "@" + DNS_HOST, "-p", str(DNS_PORT),
                            qname, "SRV"], capture_output=True, text=True)
        m = re.search(r"ANSWER: (\d+)", r.stdout)
        return int(m.group(1)) if m else -1

    def nsupdate(self, lines):
        script = f"server {DNS_HOST} {DNS_PORT}\nzone consul.\n" + "\n".join(lines) + "\nsend\n"
        r = subprocess.run(["nsupdate", "-t", "3"], input=script, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise RuntimeError(f"nsupdate failed: {r.stderr.strip()}")

    def cpu(self):
        c = proc_cpu(self.p.pid) if self.p else None
        return sum(c) if c else 0.0


def find_max_answer(bind, start):
    """Largest number of Consul-shaped SRV records one DNS message over TCP carries here."""
    n = start
    for _ in range(20):
        bind.start(bind.zone(n, extra_a=False))
        got = bind.answer_count(QNAME)
        if got == n:
            return n
        n -= 10
    raise SystemExit("could not find a record count that fits in one TCP answer")


# --------------------------------------------------------------------------- nginx


class Nginx:
    """One nginx instance (master + workers) with its own prefix and listen ports."""

    def __init__(self, binary, module, name, ports):
        self.binary = binary
        self.module = module  # absolute path of the .so, or None
        self.name = name
        self.ports = ports
        self.prefix = OUT / f"nginx-{name}"
        (self.prefix / "logs").mkdir(parents=True, exist_ok=True)
        (self.prefix / "conf").mkdir(parents=True, exist_ok=True)
        self.errlog = self.prefix / "logs" / "error.log"
        (self.prefix / "logs" / "all-runs.log").write_text("")
        self.p = None

    @staticmethod
    def upstream(setup, n, name="redis", qname=QNAME, shards=0, zone="256k", method=""):
        """An upstream of n peers for a setup; `method` (e.g. "least_conn;") is nginx's
        balancing directive, written in the block for (a) and (c) alike."""
        text = Nginx._upstream(setup, n, name, qname, shards, zone)
        if method:
            text = text.replace(" {\n", f" {{\n    {method}\n", 1)
        return text

    @staticmethod
    def _upstream(setup, n, name, qname, shards, zone):
        if setup == "a":
            body = "\n".join(f"    server {peer_ip(i)}:{PEER_PORT};" for i in range(n))
        elif setup == "b":
            if shards:
                servers = "\n".join(f"    server s{k}.{DC}.consul service=redis.service resolve;"
                                    for k in range(shards))
            else:
                svc, _, domain = qname.partition(".service.")
                servers = f"    server {domain} service={svc}.service resolve;"
            body = f"    zone {name}_b 64m;\n{servers}"
        elif shards:
            # One consul_upstream line per SRV name; their sets are merged. zone= (upstream-wide)
            # goes on the first line only.
            body = "\n".join(
                f"    consul_upstream redis.service.s{k}.{DC}.consul resolver={DNS_HOST}:{DNS_PORT} interval=1s"
                + (" zone=2m;" if k == 0 else ";")
                for k in range(shards))
        else:
            body = f"    consul_upstream {qname} resolver={DNS_HOST}:{DNS_PORT} interval=1s zone={zone};"
        return f"  upstream {name} {{\n{body}\n  }}\n"

    def conf(self, setup, upstreams, workers=1, extra_servers="", level="notice"):
        load = f"load_module {self.module};\n" if self.module else ""
        resolver = f"  resolver {DNS_HOST}:{DNS_PORT} valid=1s;\n" if setup == "b" else ""
        listens = " ".join(f"listen {HOST}:{p};" for p in self.ports)
        return f"""{load}daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {NOFILE};
error_log {self.errlog} {level};
pid {self.prefix}/logs/nginx.pid;
events {{ worker_connections 16384; }}
stream {{
{resolver}{upstreams}
  server {{ {listens} proxy_pass redis; }}
{extra_servers}}}
"""

    def test(self, conf_text):
        path = self.prefix / "conf" / "test.conf"
        path.write_text(conf_text)
        r = subprocess.run([str(self.binary), "-t", "-p", str(self.prefix), "-c", str(path)],
                           capture_output=True, text=True, timeout=60)
        return r.returncode == 0, (r.stderr + r.stdout).strip()

    def start(self, conf_text):
        self.stop()
        (self.prefix / "conf" / "nginx.conf").write_text(conf_text)
        self.errlog.write_text("")
        stderr = self.prefix / "logs" / "stderr.log"
        self.p = spawn([str(self.binary), "-p", str(self.prefix), "-c", str(self.prefix / "conf" / "nginx.conf")],
                       stdout=subprocess.DEVNULL, stderr=open(stderr, "w"))
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"nginx ({self.name}) exited: " + stderr.read_text()[-1000:]
                                   + self.log_text()[-1000:])
            if self.workers() and not port_free(HOST, self.ports[-1]):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx ({self.name}) did not start")

    def workers(self):
        if not self.p:
            return []
        try:
            with open(f"/proc/{self.p.pid}/task/{self.p.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def cpu(self):
        """utime, stime (s) and schedstat time on CPU (s) summed over the workers."""
        u = s = sched = 0.0
        for w in self.workers():
            c = proc_cpu(w)
            if c:
                u += c[0]
                s += c[1]
            sched += proc_sched_ns(w) / 1e9
        return u, s, sched

    def rss(self):
        st = [proc_status(w) for w in self.workers()]
        return {k: max((x.get(k, 0) for x in st), default=0) for k in ("VmRSS", "RssAnon", "RssShmem")}

    def log_text(self):
        try:
            return self.errlog.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.p is None:
            return
        stop_proc(self.p, signal.SIGTERM)
        self.p = None
        # keep every run's log: the report lists the module's warnings and errors
        with open(self.prefix / "logs" / "all-runs.log", "a") as f:
            f.write(self.log_text())

    def problems(self):
        """warn and worse lines of all runs of this instance (environment noise left out)."""
        try:
            text = (self.prefix / "logs" / "all-runs.log").read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines()
                if re.search(r"\[(warn|error|crit|alert|emerg)\]", line) and "setrlimit" not in line]


# --------------------------------------------------------------------------- load


def bench_load(targets, pairs, slice_ms, max_conns=None, timeout=None):
    """Runs bench-load (bench/responder/src/bin/bench-load.rs): GEN_CONNS connections in flight,
    a new connection per request, spread over the target's listen ports; with two targets it
    alternates slices a o o a a o o a ... and reads the workers' CPU at every slice boundary.
    targets: [(name, nginx instance)]."""
    args = [str(LOADER), "--conns", str(GEN_CONNS), "--slice-ms", str(int(slice_ms)), "--pairs", str(pairs)]
    if max_conns:
        args += ["--max-conns", str(int(max_conns))]
    for name, inst in targets:
        args += ["--target", f"{name}=" + ",".join(f"{HOST}:{p}" for p in inst.ports) + "@"
                 + ",".join(str(w) for w in inst.workers())]
    limit = timeout or (pairs * len(targets) * (slice_ms / 1000 + 2.5) + 10)
    p = spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise RuntimeError(f"bench-load did not finish within {limit:.0f} s")
    if p.returncode != 0:
        raise RuntimeError(f"bench-load failed: {err.strip()[-300:]}")
    return json.loads(out)


def wait_ready(nginx, setup, expect_peers, deadline_s):
    """Waits until the proxy answers; for (c) also until the module logged the whole set."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if redis_cmd(HOST, nginx.ports[0], "PING", timeout=0.5) == "+PONG":
            break
        time.sleep(0.1)
    else:
        return False
    if setup == "c":
        # "N peers from Q" (one query) or "N peers from Q, M peers in all" (several).
        pat = re.compile(r'consul upstream "redis": (\d+) peers? from \S+?(?:, (\d+) peers in all)? \(')
        while time.time() < deadline:
            m = pat.findall(nginx.log_text())
            if m and int(m[-1][1] or m[-1][0]) >= expect_peers:
                return True
            time.sleep(0.1)
        return False
    return True


def warm_up(nginx, setup, n, resp):
    """Load until every peer has been used at least twice (or 20 s: (b)'s resolver may still
    be filling its set). Returns the number of distinct peers that got connections."""
    deadline = time.time() + 20
    while True:
        resp.cmd("RESET")
        bench_load([(setup, nginx)], 1, 8000, max_conns=max(2000, 2 * n))
        _, distinct = resp.stats()
        if distinct >= n or setup == "a" or time.time() > deadline:
            return distinct
        time.sleep(0.5)


def summarize(slices, lat=None):
    """Totals over slices (bench-load's slice records)."""
    conns = sum(x["conns"] for x in slices)
    el = sum(x["elapsed_s"] for x in slices)
    c = max(1, conns)
    u = sum(x["utime_ticks"] for x in slices) / TICK
    s = sum(x["stime_ticks"] for x in slices) / TICK
    out = {"rps": conns / el if el else 0.0, "conns": conns, "elapsed": el,
           "errors": sum(x["errors"] for x in slices),
           "cpu_us": (u + s) / c * 1e6, "user_us": u / c * 1e6, "sys_us": s / c * 1e6,
           "sched_us": sum(x["sched_ns"] for x in slices) / c / 1e3, "slices": len(slices),
           "worker_busy_pct": sum(x["sched_ns"] for x in slices) / 1e9 / el * 100 if el else 0.0}
    if lat:
        out.update(p50_ms=lat["p50_us"] / 1000, p99_ms=lat["p99_us"] / 1000)
    else:
        out.update(p50_ms=statistics.median(x["p50_us"] for x in slices) / 1000,
                   p99_ms=statistics.median(x["p99_us"] for x in slices) / 1000)
    return out


def pairing(insts, other, n, shards, bind, resp, secs, pairs, base="a", profile_conns=0, method=""):
    """`base` and `other` run side by side as two nginx instances and are measured in
    alternating slices (a o o a a o o a ...; only one has load at a time), so that the
    drifts of a shared 2-core VM fall on both alike. With profile_conns, each is then also
    profiled with perf over that many connections."""
    A, O = insts[base], insts[other]
    out = {"base": base, "other": other, "peers": n}
    try:
        A.start(A.conf(base, Nginx.upstream(base, n, method=method)))
        O.start(O.conf(other[0], Nginx.upstream(other[0], n, shards=shards, method=method)))
        for inst, s in ((A, base), (O, other)):
            # (b) with 10,000 targets needs a while before its first peers are installed
            if not wait_ready(inst, s[0], n, 45 if shards else 30):
                raise RuntimeError(f"({s}) never became ready with {n} peers")
        out["peers_used"] = {base: warm_up(A, base, n, resp), other: warm_up(O, other[0], n, resp)}
        workers = {base: A.workers(), other: O.workers()}
        b0 = bind.cpu()
        t0 = time.monotonic()
        d = bench_load([(base, A), (other, O)], pairs, secs * 1000)
        out["dns_cpu_pct"] = (bind.cpu() - b0) / (time.monotonic() - t0) * 100
        if {base: A.workers(), other: O.workers()} != workers:
            raise RuntimeError(f"nginx worker pids changed during the run (a worker died?): "
                               f"{workers} -> {A.workers()}, {O.workers()}; see {O.errlog}")
        tg = d["targets"]
        out["slices"] = {s: tg[s]["slices"] for s in (base, other)}
        out["sum"] = {s: summarize(tg[s]["slices"], tg[s]) for s in (base, other)}
        out["rss"] = {base: A.rss(), other: O.rss()}
        rate = lambda x: x["conns"] / x["elapsed_s"] if x["elapsed_s"] else 0.0  # noqa: E731
        out["pair_ratios"] = [rate(o) / rate(a) for a, o in zip(tg[base]["slices"], tg[other]["slices"])
                              if rate(a) > 0]
        if profile_conns:
            out["profile"] = {s: profile(inst, s, profile_conns) for inst, s in ((A, base), (O, other))}
    except RuntimeError as e:
        out["error"] = str(e)[:700]
    finally:
        O.stop()
        A.stop()
    return out


PERF = shutil.which("perf")


def profile(inst, setup, conns):
    """perf samples (cpu-clock) of the single worker while it serves `conns` connections:
    CPU ns per connection in total and the share of each binary (kernel, nginx, libc, the
    module). Unlike conn/s, shares within one profile do not drift with the box. None without
    perf or when perf cannot sample."""
    workers = inst.workers()
    if not PERF or len(workers) != 1:
        return None
    data = OUT / f"perf-{setup}.data"
    rec = spawn([PERF, "record", "-q", "-o", str(data), "-p", str(workers[0])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # perf attached; the idle worker adds no cpu-clock samples
    try:
        d = bench_load([(setup, inst)], 1, 60000, max_conns=conns)
    finally:
        stop_proc(rec, signal.SIGINT, wait=30)
    done = d["targets"][setup]["slices"][0]["conns"]
    try:
        r = subprocess.run([PERF, "report", "-i", str(data), "--stdio", "--sort", "dso", "-g", "none",
                            "--percent-limit", "0"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    total = re.search(r"Event count \(approx\.\): (\d+)", r.stdout)
    if r.returncode != 0 or not total or not done:
        return None
    module = Path(inst.module).name if inst.module else None
    parts = {"kernel": 0.0, "nginx": 0.0, "libc": 0.0, "module": 0.0, "other": 0.0}
    for m in re.finditer(r"^\s+([\d.]+)%\s+(\S+)", r.stdout, re.M):
        dso = m.group(2)
        key = ("kernel" if dso.startswith("[kernel") else "nginx" if dso == "nginx" else
               "libc" if dso.startswith("libc.") else "module" if dso == module else "other")
        parts[key] += float(m.group(1))
    ns = int(total.group(1)) / done  # cpu-clock counts nanoseconds
    return {"conns": done, "ns_per_conn": ns, "pct": parts,
            "ns": {k: ns * v / 100 for k, v in parts.items()}}


class Prober(threading.Thread):
    """Opens a new connection through the proxy every ~2 ms, asks ADDR, records (time, peer)."""

    def __init__(self, port, limit_s, gap=0.002):
        super().__init__(daemon=True)
        self.port, self.limit, self.gap = port, limit_s, gap
        self.records = []
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        end = time.monotonic() + self.limit
        count = 0
        while not self.stop_ev.is_set() and time.monotonic() < end and count < 200_000:
            r = redis_cmd(HOST, self.port, "ADDR", timeout=0.5)
            t = time.monotonic()
            with self.lock:
                self.records.append((t, r[1:].split(":")[0] if r and r.startswith("+") else None))
            count += 1
            time.sleep(self.gap)

    def since(self, t0):
        with self.lock:
            return [r for r in self.records if r[0] > t0]


def count_queries(path, start_off, end_off):
    """Counts BIND query-log lines between two file offsets, by (qname, qtype)."""
    counts = {}
    try:
        with open(path, "rb") as f:
            f.seek(start_off)
            data = f.read(end_off - start_off).decode(errors="replace")
    except OSError:
        return counts
    for m in re.finditer(r"query: (\S+) IN (\S+) ", data):
        k = (m.group(1).lower().rstrip("."), m.group(2))
        counts[k] = counts.get(k, 0) + 1
    return counts


def propagation(nginx, bind, setup, changes):
    """Registers / deregisters EXTRA_PEER `changes` times; times each change until the first
    connection that reflects it. Also counts DNS queries per upstream (worker_processes 2)."""
    bind.start(bind.zone(2, cache=True), querylog=True)
    ups = Nginx.upstream(setup, 2) + Nginx.upstream(setup, 2, name="cache", qname=CACHE_QNAME)
    extra = f"  server {{ listen {HOST}:{CACHE_PORT}; proxy_pass cache; }}\n"
    nginx.start(nginx.conf(setup, ups, workers=2, extra_servers=extra))
    if not wait_ready(nginx, setup, 2, 30):
        nginx.stop()
        return {"error": "proxy never answered"}
    time.sleep(1.5)
    qlog = bind.dir / "query.log"
    q_start_off = qlog.stat().st_size if qlog.exists() else 0
    q_t0 = time.monotonic()
    prober = Prober(nginx.ports[0], limit_s=changes * 4 + 30)
    cache_prober = Prober(CACHE_PORT, limit_s=changes * 4 + 30, gap=0.1)
    prober.start()
    cache_prober.start()
    time.sleep(0.5)
    srv = f"{QNAME}. 0 IN SRV 1 1 {PEER_PORT} {hex_target(EXTRA_PEER)}"
    results = []
    registered = False
    for k in range(changes):
        time.sleep(random.uniform(0.2, 1.2))  # a random phase against the 1 s interval
        registered = not registered
        t_sent = time.monotonic()
        bind.nsupdate([("update add " if registered else "update delete ") + srv])
        t0 = time.monotonic()
        delay = None
        deadline = t0 + 6
        while time.monotonic() < deadline:
            time.sleep(0.02)
            recs = prober.since(t0)
            if registered:
                hit = next((t for t, a in recs if a == EXTRA_PEER), None)
                if hit is not None:
                    delay = hit - t0
                    break
            else:
                last = max((i for i, (t, a) in enumerate(recs) if a == EXTRA_PEER), default=-1)
                after = recs[last + 1:]
                # 100 connections in a row without the removed peer (3 peers round robin per worker):
                if len(after) >= 100 and all(a not in (EXTRA_PEER, None) for _, a in after[:100]):
                    delay = after[0][0] - t0
                    break
        results.append({"op": "register" if registered else "deregister", "delay_s": delay,
                        "nsupdate_s": t0 - t_sent})
    prober.stop_ev.set()
    cache_prober.stop_ev.set()
    prober.join(5)
    cache_prober.join(5)
    q_t1 = time.monotonic()
    time.sleep(0.2)
    q_end_off = qlog.stat().st_size if qlog.exists() else 0
    counts = count_queries(qlog, q_start_off, q_end_off)
    nginx.stop()
    window = q_t1 - q_t0
    srv_redis = counts.get((QNAME, "SRV"), 0)
    srv_cache = counts.get((CACHE_QNAME, "SRV"), 0)
    all_q = sum(counts.values())
    failed_probes = sum(1 for _, a in prober.records if a is None)
    return {"setup": setup, "changes": results, "window_s": window,
            "srv_per_upstream_per_s": (srv_redis + srv_cache) / 2 / window,
            "srv_redis": srv_redis, "srv_cache": srv_cache,
            "all_queries_per_upstream_per_s": all_q / 2 / window, "all_queries": all_q,
            "by_type": {f"{t}": sum(v for (n, tt), v in counts.items() if tt == t) for t in {t for _, t in counts}},
            "probes": len(prober.records), "failed_probes": failed_probes}


def zone_capacity(nginx, bind, n):
    """Zone bytes per peer for (c). The module logs how many peers a zone holds when an
    answer does not fit (`... do not fit in zone=32k (max N peers)`, an error) and, at
    level info, `zone=64k holds N peers`; the answer here has n peers."""
    bind.start(bind.zone(n))
    out = {}
    for size in ("32k", "48k", "64k"):
        ups = Nginx.upstream("c", n, zone=size)
        conf = nginx.conf("c", ups, workers=1, level="info")
        ok, msg = nginx.test(conf)
        if not ok:
            out[size] = {"error": msg.splitlines()[-1] if msg else "nginx -t failed"}
            continue
        try:
            nginx.start(conf)
        except RuntimeError as e:
            out[size] = {"error": str(e)[:300]}
            continue
        deadline = time.time() + 8
        seen = None
        while time.time() < deadline:
            t = nginx.log_text()
            m = re.search(r"(\d+) peers do not fit in zone=(\S+) \(max (\d+) peers\)", t)
            if m:
                seen = {"max_peers": int(m.group(3)), "line": m.group(0)}
                break
            m = re.search(r'consul upstream "redis": (\d+) peers from', t)
            if m and int(m.group(1)) >= n:
                seen = {"fits": n, "line": m.group(0)}
                h = re.search(r"zone=\S+ holds (\d+) peers", t)
                if h:
                    seen.update(max_peers=int(h.group(1)), line=h.group(0))
                break
            time.sleep(0.1)
        out[size] = seen or {"error": "no zone message in error.log within 8 s"}
        nginx.stop()
    return out


# --------------------------------------------------------------------------- micro-bench


def read_criterion(sizes):
    """ns per iteration from target/criterion: criterion's median estimate ("median") and the
    fastest of its samples ("min"). On this VM a busy sibling hyperthread halves the speed of
    a tight loop for seconds at a time (the samples of one benchmark are bimodal, e.g. 2.2
    and 4.4 ns), so the fastest sample is the figure that compares sizes fairly."""
    base = TARGET / "criterion"
    res = {}
    funcs = (("pick", "selector"), ("pick", "view"), ("pick", "nginx_swrr"), ("rebuild", "selector"),
             ("pick", "least_conn"), ("pick", "nginx_least_conn"), ("pick", "hash"), ("pick", "hash_consistent"),
             ("pick", "random"), ("pick", "random_two"), ("rebuild", "ring"))
    for group, func in funcs:
        for n in sizes:
            d = base / group / func / str(n)
            try:
                est = json.loads((d / "new" / "estimates.json").read_text())
                mins = []
                for run in ("new", "base"):  # base: the previous run of the same run.sh, if any
                    try:
                        smp = json.loads((d / run / "sample.json").read_text())
                        mins.append(min(t / i for t, i in zip(smp["times"], smp["iters"]) if i))
                    except (OSError, ValueError):
                        pass
                res[(group, func, n)] = {"median": est["median"]["point_estimate"], "min": min(mins)}
            except (OSError, KeyError, ValueError):
                pass
    return res


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", default="")
    ap.add_argument("--responder", required=True)
    ap.add_argument("--loader", required=True)
    ap.add_argument("--pairs", type=int, default=None, help="alternating slice pairs per comparison")
    ap.add_argument("--slice", type=float, default=0.25, help="seconds per slice")
    ap.add_argument("--sizes", default=None, help="comma-separated peer counts")
    ap.add_argument("--changes", type=int, default=None, help="propagation changes for (c)")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()

    global LOADER
    LOADER = args.loader
    quick = args.quick
    secs = args.slice
    pairs = args.pairs or (8 if quick else 24)
    changes = args.changes or (6 if quick else 20)
    OUT.mkdir(parents=True, exist_ok=True)

    ports_to_check = [(DNS_HOST, DNS_PORT, socket.SOCK_DGRAM), (DNS_HOST, DNS_PORT, socket.SOCK_STREAM),
                      (HOST, CTL_PORT, socket.SOCK_STREAM), (HOST, CACHE_PORT, socket.SOCK_STREAM)]
    ports_to_check += [(HOST, p, socket.SOCK_STREAM) for ps in INST_PORTS.values() for p in ps]
    for host, port, kind in ports_to_check:
        if not port_free(host, port, kind):
            raise SystemExit(f"{host}:{port} is in use (a previous run still going?); not starting")

    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(143)))
    # Shield the rig from other work on the box (builds, tests): same priority for every setup.
    try:
        os.nice(int(os.environ.get("BENCH_NICE", "-5")))
    except OSError:
        pass
    started = datetime.datetime.now().astimezone()
    t_begin = time.monotonic()

    bind = Bind()
    max_answer = find_max_answer(bind, 1430)
    log(f"largest Consul-shaped SRV answer over TCP: {max_answer} records")
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else \
        ([2, 1000] if quick else [2, 100, 1000, max_answer, 10000])

    resp = Responder(args.responder, max(max(sizes), 2))
    resp.start()
    # Snapshots: the module (and nginx) may be rebuilt by someone else while this runs;
    # every nginx start of the run must load the same code.
    snap = OUT / "bin"
    snap.mkdir(exist_ok=True)
    nginx_bin = snap / "nginx"
    shutil.copy2(args.nginx, nginx_bin)
    module = None
    if args.module:
        module = str(snap / Path(args.module).name)
        shutil.copy2(args.module, module)
    insts = {s: Nginx(nginx_bin, module, s, ports) for s, ports in INST_PORTS.items()}

    # Is (c) available? The module must load and know the directive.
    c_ok, c_msg = False, "module not built"
    if module:
        ok, msg = insts["c"].test(insts["c"].conf("c", Nginx.upstream("c", 2)))
        c_ok, c_msg = ok, ("" if ok else msg)
        if not ok:
            for i in insts.values():
                i.module = None  # (a) and (b) then run without load_module
    log(f"(c) consul_upstream: {'available' if c_ok else 'NOT available: ' + c_msg}")
    mod_all = bool(insts["a"].module)

    e2e = {}
    prop = {}
    zcap = {}
    try:
        if not args.skip_e2e:
            for n in sizes:
                shards = math.ceil(n / max_answer) if n > max_answer else 0
                bind.start(bind.zone(n, shards=shards))
                if not shards and bind.answer_count(QNAME) != n:
                    raise SystemExit(f"BIND does not answer all {n} records in one TCP answer")
                e2e[n] = {}
                others = (["c"] if c_ok else []) + ["b"] + (["a2"] if n == sizes[0] else [])
                for other in others:
                    # The tightest target (0.98 at the smallest size) gets more pairs, and a
                    # perf profile of (a) and (c) says where any difference goes.
                    first = n == sizes[0] and other in ("c", "a2")
                    res = pairing(insts, other, n, shards, bind, resp, secs,
                                  pairs * 5 // 2 if first else pairs,
                                  profile_conns=(20000 if quick else 60000) if first and other == "c" else 0)
                    e2e[n][other] = res
                    if "error" in res:
                        log(f"  n={n:>5} (a) vs ({other}): ERROR {res['error']}")
                        continue
                    for s in ("a", other):
                        m = res["sum"][s]
                        log(f"  n={n:>5} ({s}) [vs {other}]: {m['rps']:7.0f} conn/s  p50 {m['p50_ms']:.2f} ms  "
                            f"p99 {m['p99_ms']:.2f} ms  worker {m['cpu_us']:6.1f} us/conn (user {m['user_us']:5.1f}; "
                            f"schedstat {m['sched_us']:5.1f}; busy {m['worker_busy_pct']:.0f}%)  "
                            f"peers used {res['peers_used'][s]}  errors {m['errors']}")
                    for s, pf in (res.get("profile") or {}).items():
                        if pf:
                            log(f"  n={n:>5} ({s}) perf: {pf['ns_per_conn'] / 1000:.1f} us/conn; "
                                + ", ".join(f"{k} {v:.2f}%" for k, v in pf["pct"].items()))
                    pr = res["pair_ratios"]
                    log(f"  n={n:>5} ({other})/(a) conn/s {res['sum'][other]['rps'] / res['sum']['a']['rps']:.3f} "
                        f"(median pair {statistics.median(pr):.3f}); (a)/({other}) CPU per conn "
                        f"{res['sum']['a']['cpu_us'] / res['sum'][other]['cpu_us']:.3f}; "
                        f"DNS server CPU {res['dns_cpu_pct']:.0f}%")

        # Propagation and DNS load (worker_processes 2)
        for s in (["c"] if c_ok else []) + ["b"]:
            inst = insts[s]
            try:
                prop[s] = propagation(inst, bind, s, changes if s == "c" else max(6, changes // 2))
            except (RuntimeError, OSError) as e:
                prop[s] = {"error": str(e)[:500]}
            inst.stop()
            p = prop[s]
            if "error" in p:
                log(f"  propagation ({s}): ERROR {p['error']}")
            else:
                ds = [c["delay_s"] for c in p["changes"] if c["delay_s"] is not None]
                log(f"  propagation ({s}): {len(ds)}/{len(p['changes'])} changes seen, "
                    f"p50 {fmt(pct(ds, 50) * 1000 if ds else None, '.0f')} ms, "
                    f"p99 {fmt(pct(ds, 99) * 1000 if ds else None, '.0f')} ms; "
                    f"SRV queries/upstream/s {p['srv_per_upstream_per_s']:.2f}, "
                    f"all queries/upstream/s {p['all_queries_per_upstream_per_s']:.2f}")

        if c_ok:
            zinst = Nginx(nginx_bin, module, "zone-test", INST_PORTS["c"])
            zcap = zone_capacity(zinst, bind, max_answer)
            log(f"  zone capacity: {zcap}")
    finally:
        for i in insts.values():
            i.stop()
        bind.stop()
        stop_proc(resp.p)

    micro = read_criterion([2, 100, 1000, 10000])
    problems = {s: insts[s].problems() for s in ("c", "b")}
    report(e2e, prop, zcap, micro, sizes, max_answer, c_ok, c_msg, mod_all, started,
           time.monotonic() - t_begin, quick, secs, pairs, args, problems)


def pct(xs, p):
    """Nearest-rank percentile."""
    xs = sorted(xs)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, math.ceil(p / 100 * len(xs)) - 1))
    return xs[k]


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.rstrip()
    except subprocess.SubprocessError:
        return ""


def fmt(v, spec=".1f"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


# --------------------------------------------------------------------------- report


def ci(iv):
    return f"[{iv[0]:.3f}–{iv[1]:.3f}]" if iv else ""


def comparison(e2e, n, other):
    r = e2e.get(n, {}).get(other)
    return r if r and "error" not in r else None


def row_of(e2e, n, other, s):
    """Numbers of setup s from its comparison with `other` at n peers."""
    r = comparison(e2e, n, other)
    if not r:
        return None
    m = dict(r["sum"][s])
    m["peers_used"] = r["peers_used"][s]
    m["dns_cpu_pct"] = r["dns_cpu_pct"]
    rss = r["rss"][s]
    m.update(rss_kb=rss.get("VmRSS", 0), rss_anon_kb=rss.get("RssAnon", 0), rss_shmem_kb=rss.get("RssShmem", 0))
    return m


def setup_summary(e2e, n, s):
    """Setup s at n peers; (a) from its comparison with (c), else with (b)."""
    if s == "a":
        for o in ("c", "b"):
            m = row_of(e2e, n, o, "a")
            if m:
                return m
        return None
    return row_of(e2e, n, s, s)


def bootstrap(a, o, rounds=2000):
    """95 % intervals of the conn/s ratio o/a and the CPU-per-connection ratio a/o, by
    resampling the slice pairs (pair k = a's k-th and o's k-th slice) with replacement."""
    rnd = random.Random(1)
    k = min(len(a), len(o))
    if k < 2:
        return None, None

    def rates(idx):
        ca = sum(a[i]["conns"] for i in idx) or 1
        co = sum(o[i]["conns"] for i in idx) or 1
        ea = sum(a[i]["elapsed_s"] for i in idx)
        eo = sum(o[i]["elapsed_s"] for i in idx)
        ua = sum(a[i]["utime_ticks"] + a[i]["stime_ticks"] for i in idx)
        uo = sum(o[i]["utime_ticks"] + o[i]["stime_ticks"] for i in idx) or 1
        return (co / eo) / (ca / ea) if ea and eo else 1.0, (ua / ca) / (uo / co)

    rr, cc = [], []
    for _ in range(rounds):
        x, y = rates([rnd.randrange(k) for _ in range(k)])
        rr.append(x)
        cc.append(y)
    rr.sort()
    cc.sort()
    lo, hi = int(0.025 * rounds), int(0.975 * rounds) - 1
    return (rr[lo], rr[hi]), (cc[lo], cc[hi])


def report(e2e, prop, zcap, micro, sizes, max_answer, c_ok, c_msg, mod_all, started, took, quick, secs,
           pairs, args, problems):
    def ratio(n, other):
        r = comparison(e2e, n, other)
        if not r:
            return None
        a, o = r["sum"]["a"], r["sum"][other]
        out = {"rps": o["rps"] / a["rps"], "cpu": a["cpu_us"] / o["cpu_us"],
               "sched": a["sched_us"] / o["sched_us"], "med": statistics.median(r["pair_ratios"])}
        out["rps_ci"], out["cpu_ci"] = bootstrap(r["slices"]["a"], r["slices"][other])
        return out

    aa = ratio(sizes[0], "a2")

    dest = OUT if quick else BENCH  # a smoke run leaves the committed results alone
    csv_path = dest / "results.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "setup", "peers", "measured_with", "rps", "p50_ms", "p99_ms", "worker_cpu_us_per_conn",
                    "worker_user_us_per_conn", "worker_schedstat_us_per_conn", "peers_used", "worker_rss_kb",
                    "ratio_to_a_rps", "ratio_rps_ci_lo", "ratio_rps_ci_hi", "ratio_a_to_setup_cpu", "ns_per_pick"])
        for n in sizes:
            for other in ("c", "b", "a2"):
                for s in ("a", other):
                    m = row_of(e2e, n, other, s)
                    if not m:
                        continue
                    rt = ratio(n, other) if s != "a" else None
                    w.writerow(["e2e", s, n, other, f"{m['rps']:.0f}", f"{m['p50_ms']:.3f}", f"{m['p99_ms']:.3f}",
                                f"{m['cpu_us']:.2f}", f"{m['user_us']:.2f}", f"{m['sched_us']:.2f}",
                                m["peers_used"], m["rss_kb"], f"{rt['rps']:.4f}" if rt else "",
                                f"{rt['rps_ci'][0]:.4f}" if rt and rt["rps_ci"] else "",
                                f"{rt['rps_ci'][1]:.4f}" if rt and rt["rps_ci"] else "",
                                f"{rt['cpu']:.4f}" if rt else "", ""])
        for (g, fn, n), v in sorted(micro.items()):
            w.writerow([f"micro_{g}", fn, n] + [""] * 13 + [f"{v['min']:.3f}"])

    L = []
    L.append("# ngx-consul benchmark results\n")
    L.append(f"Generated by `bench/run.sh{' --quick' if quick else ''}` on {started:%Y-%m-%d %H:%M %Z} "
             f"(the driver took {took / 60:.1f} min).\n")
    L.append("## Machine\n")
    L.append("```")
    cpu_model = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    L.append(f"nproc: {sh('nproc')}   CPU: {cpu_model}")
    L.append(sh("free -h"))
    L.append(f"kernel: {platform.release()}   {sh('. /etc/os-release; echo $PRETTY_NAME')}")
    L.append(f"{sh(args.nginx + ' -v 2>&1')}   {sh('named -v')}")
    if args.module:
        so = Path(args.module)
        digest = sh(f"sha256sum '{OUT / 'bin' / so.name}' | cut -c1-16")
        L.append(f"module: {so.name} (sha256 {digest}…, built "
                 f"{datetime.datetime.fromtimestamp(so.stat().st_mtime):%Y-%m-%d %H:%M})")
    L.append("```\n")
    L.append("The box is a 2-vCPU VM that may share its cores with other work. "
             "Throughput drifts by ±15 % within seconds and single 250 ms slices by up to ±50 %, so every "
             "comparison is made from interleaved slices, ratios come with 95 % intervals, and an A/A "
             "comparison — (a) against a second, identical (a) — checks them.\n")

    nsh = math.ceil(10000 / max_answer)
    L.append("## Setup\n")
    L.append(f"- (a) {SETUP_NAMES['a']}: `server 127.78.x.y:6400;` × N, no zone.")
    L.append(f"- (b) {SETUP_NAMES['b']}: `zone redis_b 64m; server {DC}.consul service=redis.service resolve;` "
             f"(asks `{QNAME}` SRV) and `resolver {DNS_HOST}:{DNS_PORT} valid=1s;` (otherwise nginx's "
             f"defaults: an A and an AAAA query per SRV target).")
    L.append(f"- (c) {SETUP_NAMES['c']}: `consul_upstream {QNAME} resolver={DNS_HOST}:{DNS_PORT} interval=1s "
             f"zone=256k;`.")
    L.append("- One nginx binary, the vendored nginx 1.28.3 build; "
             + ("the consul module is loaded (`load_module`) in **all** setups, so the process image is "
                "identical; " if mod_all else "the consul module is **not loaded** (it was not available); ")
             + "`worker_processes 1` for the connection-rate points (the single worker is the bottleneck: "
               "it is ~95 % busy), `worker_processes 2` for propagation and DNS load.")
    L.append(f"- Backends: one `bench-responder` process (bench/responder, epoll) listening on N distinct "
             f"loopback addresses 127.78.(i/250).(i%250+1):6400, answering PING with +PONG. BIND 9 on "
             f"{DNS_HOST}:{DNS_PORT} stands in for Consul (its own port, so that it never meets the test "
             f"suite's or the demo's BIND): zone `consul`, `$TTL 0`, `{QNAME}. SRV 1 1 6400 "
             f"7f4e0001.addr.{DC}.consul.` per peer plus the A records, `max-records-per-type 0`, "
             f"`minimal-responses no-auth`, `udp-receive-buffer {UDP_RCVBUF}` (with the default 208 KiB "
             f"BIND dropped most of (b)'s queries from ~1,400 targets on).")
    L.append(f"- Load: `bench-load` (bench/responder/src/bin/bench-load.rs) keeps {GEN_CONNS} connections in "
             f"flight, a new connection per request (connect, `PING`, `+PONG`, close — what "
             f"`redis-benchmark -k 0` does), spread over 4 listen ports of the same upstream. For each peer "
             f"count, (a) and the other setup run as two nginx instances side by side and are measured in "
             f"alternating slices of {secs * 1000:.0f} ms (a o o a a o o a …, {pairs} pairs, {pairs * 5 // 2} for (c) and the "
             f"A/A check at {sizes[0]} peers; in-flight "
             f"connections are drained at every switch; only one instance has load at a time), after a "
             f"warm-up that uses every peer at least twice. conn/s = connections / wall time of that "
             f"setup's slices; p50/p99 over all its connections, from connect() to the reply; worker CPU = "
             f"utime+stime of the nginx worker from /proc/PID/stat at each slice boundary, divided by the "
             f"connections (user part in brackets; the exact schedstat figure is in results.csv).")
    L.append(f"- Largest answer: one DNS message over TCP from BIND carries **{max_answer}** Consul-shaped SRV records "
             f"here (46 bytes each: an SRV target is never compressed), not ≈1,900; a Consul agent sends at "
             f"most 1,024 and trims by size before that (about 870 to 1,000 instances with `.addr.` targets, "
             f"README's Limitations). Above that, the peers are "
             f"spread over {nsh} SRV names `redis.service.sK.{DC}.consul`: (c) uses {nsh} `consul_upstream` "
             f"lines in the one upstream (their sets are merged; `zone=2m` on the first line), (b) uses {nsh} "
             f"`server sK.{DC}.consul service=redis.service resolve;` lines, (a) 10,000 static servers.\n")
    if not c_ok:
        L.append(f"**(c) was not measured**: `{c_msg}`\n")

    L.append("## Connection rate through the proxy (worker_processes 1)\n")
    L.append("Rows come in pairs: (a) and the setup it was interleaved with.\n")
    L.append("| peers | setup | conn/s | p50 ms | p99 ms | worker µs/conn (user) | worker busy % | peers used | worker RSS MB | DNS server CPU % |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        for other in ("c", "b", "a2"):
            r = e2e.get(n, {}).get(other)
            if r is None:
                if other == "c" and n > max_answer and c_ok:
                    L.append(f"| {n} | (c) | n/a: more than {max_answer} records do not fit in one DNS answer "
                             f"(see the micro-bench) | | | | | | | |")
                continue
            if "error" in r:
                L.append(f"| {n} | ({other}) | error (below) | | | | | | | |")
                continue
            for s in ("a", other):
                m = row_of(e2e, n, other, s)
                label = f"(a) ‖ ({other})" if s == "a" else ("(a′) A/A" if s == "a2" else f"({s})")
                L.append(f"| {n} | {label} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                         f"{m['cpu_us']:.1f} ({m['user_us']:.1f}) | {m['worker_busy_pct']:.0f} | "
                         f"{m['peers_used']} | {m['rss_kb'] / 1024:.1f} | {m['dns_cpu_pct']:.0f} |")
    L.append("")
    for n in sizes:
        for o, r in e2e.get(n, {}).items():
            if "error" in r:
                L.append(f"- error at {n} peers, (a) vs ({o}): `{r['error'][:400]}`")
    L.append("\n### Ratios (each against the (a) interleaved with it; 95 % intervals from resampling the slice pairs)\n")
    if aa:
        L.append(f"Noise check, A/A at {sizes[0]} peers — (a) against an identical second (a): conn/s "
                 f"{aa['rps']:.3f} {ci(aa['rps_ci'])}, worker CPU per connection {aa['cpu']:.3f} {ci(aa['cpu_ci'])}.\n")
    L.append("| peers | (c)/(a) conn/s | (a)/(c) worker CPU per conn | (b)/(a) conn/s | (a)/(b) worker CPU per conn |")
    L.append("|---:|---:|---:|---:|---:|")
    for n in sizes:
        rc, rb = ratio(n, "c"), ratio(n, "b")
        f3 = lambda r, k: f"{r[k]:.3f} {ci(r[k + '_ci'])}" if r else "–"  # noqa: E731
        L.append(f"| {n} | {f3(rc, 'rps')} | {f3(rc, 'cpu')} | {f3(rb, 'rps')} | {f3(rb, 'cpu')} |")
    L.append("\n(a CPU ratio above 1: the setup costs the worker less per connection than static round robin)\n")

    prof = (comparison(e2e, sizes[0], "c") or {}).get("profile") or {}
    if prof.get("a") and prof.get("c"):
        pa, pc = prof["a"], prof["c"]
        L.append(f"### Where the worker's time goes at {sizes[0]} peers (perf)\n")
        L.append(f"`perf record` (cpu-clock) of the single worker of (a) and of (c), each serving "
                 f"{pc['conns']} connections alone right after the interleaved run. Totals drift with the "
                 f"box (compare conn/s above, measured interleaved); the shares within one profile do not, "
                 f"so they say what the module adds.\n")
        parts = ("kernel", "nginx", "libc", "module", "other")
        L.append("| setup | worker µs/conn under perf | kernel | nginx | libc | consul module | other |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for s_, p_ in (("a", pa), ("c", pc)):
            cells = " | ".join(f"{p_['pct'][k]:.2f} % ({p_['ns'][k] / 1000:.2f} µs)" for k in parts)
            L.append(f"| ({s_}) | {p_['ns_per_conn'] / 1000:.1f} | {cells} |")
        L.append("")
        L.append(f"- The module's own code — balancer callbacks, selection, and the DNS lookups, which run "
                 f"on the worker's event loop — is {pc['pct']['module']:.2f} % of (c)'s worker CPU, "
                 f"{pc['ns']['module']:.0f} ns per connection.")
        L.append(f"- libc is {pa['pct']['libc']:.2f} % of (a)'s worker CPU and {pc['pct']['libc']:.2f} % of "
                 f"(c)'s. (An earlier build ran the lookups on a thread in worker 0: libc then took ~0.8 "
                 f"points more in (c), glibc's multi-thread paths — locked malloc/free, cancellation "
                 f"bookkeeping around system calls — and (c)/(a) was ~0.97–0.99 at 2 peers.)\n")

    L.append("## Selection micro-bench (`cargo bench -p ngx-consul-core --bench select`), ns per pick\n")
    L.append("| peers | Selector::pick | PeerView::select + release | nginx smooth WRR (re-implemented, O(n)) | Selector::new (once per set change) |")
    L.append("|---:|---:|---:|---:|---:|")

    def mc(key, spec=".2f", scale=1.0, unit=""):
        v = micro.get(key)
        if not v:
            return "–"
        return f"{v['min'] / scale:{spec}}{unit} ({v['median'] / scale:{spec}})"

    for n in [2, 100, 1000, 10000]:
        L.append(f"| {n} | {mc(('pick', 'selector', n))} | {mc(('pick', 'view', n))} | "
                 f"{mc(('pick', 'nginx_swrr', n), '.1f')} | {mc(('rebuild', 'selector', n), '.1f', 1000, ' µs')} |")
    L.append("\nThe fastest of criterion's samples over the run's micro-bench rounds (2 in a full run), "
             "criterion's median of the last round in brackets (the box's other load "
             "makes the samples bimodal: a busy sibling hyperthread halves a tight loop's speed). All peers "
             "weight 1, priority 1. The nginx column is the algorithm (a) and (b) run per connection "
             "(every peer visited per pick); (c) runs `PeerView::select` (and `release` when the connection "
             "ends), which calls `Selector::pick`.\n")
    L.append("### nginx's methods over discovered peers, ns per pick (and release)\n")
    L.append("| peers | least_conn (shared tree) | nginx least_conn (re-implemented, O(n)) | hash | hash consistent | "
             "random | random two least_conn | ring build (once per set change) |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in [2, 100, 1000, 10000]:
        L.append(f"| {n} | {mc(('pick', 'least_conn', n))} | {mc(('pick', 'nginx_least_conn', n), '.1f')} | "
                 f"{mc(('pick', 'hash', n))} | {mc(('pick', 'hash_consistent', n))} | {mc(('pick', 'random', n))} | "
                 f"{mc(('pick', 'random_two', n))} | {mc(('rebuild', 'ring', n), '.1f', 1000, ' µs')} |")
    L.append("\nEach method's pick with its release (least_conn moves the shared tournament tree's path "
             "twice per connection). End-to-end costs against static nginx with the same method: "
             "[METHODS.md](METHODS.md).\n")
    L.append("## Propagation and DNS load (worker_processes 2, two upstreams, interval / valid = 1 s)\n")
    L.append("A prober opens a new connection through the proxy every ~2 ms and asks the backend for its "
             f"address. Each change is an `nsupdate` that adds or deletes the SRV record of {EXTRA_PEER} (2 "
             "other peers stay); the delay runs from nsupdate's acknowledgement to the first connection that "
             "reflects the change (register: the first connection to the new peer; deregister: the first "
             "connection after the last one to the removed peer, confirmed by 100 more without it). Changes "
             "are spaced by a random 0.2–1.2 s so that they fall on every phase of the interval. DNS queries "
             "are counted from BIND's query log over the same window; a second upstream "
             f"(`{CACHE_QNAME}`, light traffic) runs alongside.\n")
    L.append("| setup | changes seen | p50 ms | p99 ms | max ms | register / deregister p50 ms | SRV queries / upstream / s | all DNS queries / upstream / s | failed probes |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ms = lambda v: fmt(v * 1000 if v is not None else None, ".0f")  # noqa: E731
    for s in ("c", "b"):
        p = prop.get(s)
        if not p:
            continue
        if "error" in p:
            L.append(f"| ({s}) | error: {p['error'][:200]} | | | | | | | |")
            continue
        ds = [c["delay_s"] for c in p["changes"] if c["delay_s"] is not None]
        reg = [c["delay_s"] for c in p["changes"] if c["op"] == "register" and c["delay_s"] is not None]
        dereg = [c["delay_s"] for c in p["changes"] if c["op"] == "deregister" and c["delay_s"] is not None]
        L.append(f"| ({s}) | {len(ds)}/{len(p['changes'])} | {ms(pct(ds, 50))} | {ms(pct(ds, 99))} | "
                 f"{ms(max(ds) if ds else None)} | {ms(pct(reg, 50))} / {ms(pct(dereg, 50))} | "
                 f"{p['srv_per_upstream_per_s']:.2f} | {p['all_queries_per_upstream_per_s']:.2f} | "
                 f"{p['failed_probes']}/{p['probes']} |")
    L.append("")
    for s in ("c", "b"):
        p = prop.get(s)
        if p and "error" not in p:
            L.append(f"- ({s}) queries by type over {p['window_s']:.1f} s: {p['by_type']}; "
                     f"SRV {QNAME}: {p['srv_redis']}, SRV {CACHE_QNAME}: {p['srv_cache']}")
    L.append("")

    L.append("## Memory\n")
    zb = None
    if zcap:
        for size, v in zcap.items():
            kb = int(size.rstrip("k")) * 1024
            if "max_peers" in v:
                L.append(f"- zone={size}: the error log says `{v['line']}` → {kb / v['max_peers']:.1f} bytes "
                         f"per peer (zone size / capacity, header and slab overhead included)")
                zb = kb / v["max_peers"] if zb is None else max(zb, kb / v["max_peers"])
            elif "fits" in v:
                L.append(f"- zone={size}: all {v['fits']} peers fit (`{v['line']}`) → at most "
                         f"{kb / v['fits']:.1f} bytes per peer")
                zb = kb / v["fits"] if zb is None else max(zb, kb / v["fits"])
            else:
                L.append(f"- zone={size}: {v.get('error')}")
        caps = sorted((int(s.rstrip('k')) * 1024, v["max_peers"]) for s, v in zcap.items() if "max_peers" in v)
        if len(caps) >= 2 and caps[-1][1] != caps[0][1]:
            marg = (caps[-1][0] - caps[0][0]) / (caps[-1][1] - caps[0][1])
            L.append(f"- marginal cost: {marg:.1f} bytes of zone per additional peer")
    else:
        L.append("- (c) zone bytes per peer: not measured (module not available)")
    for s, n in (("a", 10000), ("b", 10000), ("c", max_answer), ("a", max_answer), ("b", max_answer)):
        m = setup_summary(e2e, n, s)
        if m:
            L.append(f"- ({s}) at {n} peers: worker RSS {m['rss_kb'] / 1024:.1f} MB (anonymous "
                     f"{m['rss_anon_kb'] / 1024:.1f} MB, shared memory {m['rss_shmem_kb'] / 1024:.1f} MB)")
    L.append("")

    L.append("## Warnings and errors in nginx's error log during the measurements\n")
    L.append("`no live upstreams` lines come from the readiness probe before a setup has its first peers.\n")
    for s_ in ("c", "b"):
        lines = problems.get(s_, [])
        L.append(f"- ({s_}): {len(lines)} lines at level warn or above"
                 + (" (the zone-size test's intended errors are not counted)" if s_ == "c" else "")
                 + (":" if lines else "."))
        if lines:
            L.append("```")
            uniq = {}
            for x in lines:
                k = re.sub(r"\*\d+ ", "", re.sub(r"^\S+ \S+ \[(\w+)\] \d+#\d+: ", r"[\1] ", x))
                uniq[k] = uniq.get(k, 0) + 1
            L.extend(f"{c:>5} × {k}" for k, c in sorted(uniq.items(), key=lambda kv: -kv[1])[:12])
            L.append("```")
    L.append("")

    L.append("## Targets (printed, never enforced)\n")
    tg = []

    def target(name, ok, detail):
        tg.append((name, ok, detail))

    def ratio_detail(r):
        return (f"{r['rps']:.3f} {ci(r['rps_ci'])} (95 % interval); worker CPU per connection (a)/(c) "
                f"{r['cpu']:.3f} {ci(r['cpu_ci'])}")

    def judged(r, bound):
        if r is None:
            return None
        lo, hi = r["rps_ci"] or (r["rps"], r["rps"])
        if r["rps"] >= bound:
            return True if lo >= bound else "yes, by the point estimate (its interval reaches below)"
        return "no by the point estimate (its interval reaches the target)" if hi >= bound else False

    r2 = ratio(2, "c")
    target("(c)/(a) conn/s ≥ 0.98 at 2 peers", judged(r2, 0.98), ratio_detail(r2) if r2 else "not measured")
    r10 = ratio(10000, "c")
    rbig = ratio(max_answer, "c")
    if r10:
        target("(c)/(a) conn/s ≥ 0.95 at 10,000 peers", judged(r10, 0.95), ratio_detail(r10))
    else:
        target(f"(c)/(a) conn/s ≥ 0.95 at 10,000 peers — not measurable end to end; measured at {max_answer} "
               f"peers (the largest answer), 10,000 only in the micro-bench", judged(rbig, 0.95),
               f"at {max_answer}: " + ratio_detail(rbig) if rbig else "not measured")
    for fn, label in (("selector", "Selector::pick"), ("view", "PeerView::select + release")):
        v2, v10 = micro.get(("pick", fn, 2)), micro.get(("pick", fn, 10000))
        if v2 and v10:
            target(f"per-pick cost at 10,000 ≤ 1.5 × at 2 ({label})", v10["min"] <= 1.5 * v2["min"],
                   f"{v10['min']:.2f} ns vs {v2['min']:.2f} ns ({v10['min'] / v2['min']:.2f}×; criterion medians "
                   f"{v10['median']:.2f} vs {v2['median']:.2f} ns, {v10['median'] / v2['median']:.2f}×)")
    pc = prop.get("c")
    if pc and "error" not in pc:
        ds = [c["delay_s"] for c in pc["changes"] if c["delay_s"] is not None]
        p99 = pct(ds, 99)
        ok = p99 is not None and p99 <= 1.1 and len(ds) == len(pc["changes"])
        target("propagation p99 ≤ interval + 100 ms (1,100 ms)", ok,
               f"p99 {ms(p99)} ms over {len(ds)}/{len(pc['changes'])} changes")
        q = pc["srv_per_upstream_per_s"]
        target("one query per upstream per interval", abs(q - 1.0) <= 0.1,
               f"{q:.2f} SRV queries per upstream per second, {pc['all_queries_per_upstream_per_s']:.2f} of any "
               f"type (worker_processes 2)")
    else:
        target("propagation p99 ≤ interval + 100 ms", None, "not measured")
        target("one query per upstream per interval", None, "not measured")
    target("≤ 256 bytes of shared memory per peer", None if zb is None else zb <= 256,
           f"{zb:.1f} bytes/peer" if zb is not None else "not measured")
    L.append("| target | met | measured |")
    L.append("|---|---|---|")
    for name, ok, detail in tg:
        met = ok if isinstance(ok, str) else {True: "yes", False: "no", None: "not measured"}[ok]
        L.append(f"| {name} | {met} | {detail} |")
    L.append("")
    L.append("![connection rate, worker CPU per connection and per-pick cost against peer count](plot.png)\n")
    L.append("Raw numbers: `results.csv` next to this file; every slice and change of the last run: "
             "`bench/out/raw.json`.\n")

    text = "\n".join(L)
    # bench/api.sh's section (between <!-- api --> markers) is its own: kept.
    old = (dest / "RESULTS.md").read_text() if (dest / "RESULTS.md").exists() else ""
    if "<!-- api -->" in old and "<!-- /api -->" in old:
        text = text.rstrip("\n") + "\n\n" + old[old.index("<!-- api -->"):old.index("<!-- /api -->")] + "<!-- /api -->\n"
    (dest / "RESULTS.md").write_text(text)
    (OUT / "raw.json").write_text(json.dumps(
        {"e2e": {str(n): v for n, v in e2e.items()}, "prop": prop, "zone": zcap,
         "micro": {f"{g}/{f}/{n}": v for (g, f, n), v in micro.items()}}, indent=1, default=str))
    log("\n" + text)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        cleanup()
        sys.exit(130)
    finally:
        cleanup()
