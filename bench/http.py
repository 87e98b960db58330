#!/usr/bin/env python3
"""HTTP benchmark for ngx-consul (issue 17); bench/run.sh --http builds and runs it.

Setups on one nginx binary (the module is loaded in all of them when it loads, so the
process image is the same), one worker each, `access_log off`:
  a   a static http `upstream` with the N peers as `server` lines
  a2  a second, identical (a): the A/A noise floor
  c   `consul_upstream api.service.bench.consul` (BIND 9 answering with the same N peers)
each with the same method line and `keepalive 64`, `proxy_http_version 1.1;
proxy_set_header Connection "";`. Backends: `bench-responder --http`, one listener per
peer on 127.78.x.y:6400 (keep-alive 200, Content-Length 2).

Load: Debian's wrk, `-t1 -c32 -d<slice>s -s bench/wrk-done.lua`, in slices alternating
between two setups (x y y x x y ...), only one loaded at a time; the nginx worker's
utime+stime (/proc/PID/stat) and schedstat time are read at every slice edge. Figures
per setup: requests/s, worker CPU µs per request, backend connections per 1,000
requests (from the responder's counters), non-2xx answers and socket errors; ratios
with 95 % bootstrap intervals over the slice pairs, as bench.py does for stream.

With a module older than issue 17's http side, (c) fails at nginx -t with
`"consul_upstream" directive is not allowed here`: the run says so and measures (a)
against (a2) only.
Writes bench/out/http.csv (one row per setup, peer count and method). Every address is
in 127.0.0.0/8.
"""

import argparse
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import bench
from bench import (Bind, Nginx, Responder, bootstrap, cleanup, hex_target, log, peer_ip, port_free,
                   proc_cpu, proc_sched_ns, spawn, stop_proc, HOST, DNS_HOST, DNS_PORT, OUT, BENCH,
                   PEER_PORT, CTL_PORT, NOFILE, TICK)

DC = "bench"
QNAME = f"api.service.{DC}.consul"
PORTS = {"a": 17101, "a2": 17102, "c": 17103}
CONNS = 32
KEEPALIVE = 64
METHODS = {
    "rr": "",
    "least_conn": "least_conn;",
    "hash": "hash $request_uri;",
    "hash_consistent": "hash $request_uri consistent;",
    "random_two": "random two;",
    "ip_hash": "ip_hash;",  # one client address: pins one peer; a cost figure only
}
NAMES = {"a": "static", "a2": "static (A/A)", "c": "consul_upstream"}


def zone_text(n):
    lines = ["$TTL 0", "@ IN SOA ns.consul. hostmaster.consul. 1 3600 600 86400 0",
             "@ IN NS ns.consul.", f"ns IN A {DNS_HOST}"]
    lines += [f"api.service.{DC} IN SRV 1 1 {PEER_PORT} {hex_target(peer_ip(i))}" for i in range(n)]
    lines += [f"{hex_target(peer_ip(i))[:-len('.consul.')]} IN A {peer_ip(i)}" for i in range(n)]
    return "\n".join(lines) + "\n"


def conf(inst, setup, n, method):
    if setup == "c":
        body = f"    consul_upstream {QNAME} resolver={DNS_HOST}:{DNS_PORT} interval=1s;\n"
    else:
        body = "".join(f"    server {peer_ip(i)}:{PEER_PORT};\n" for i in range(n))
    m = f"    {METHODS[method]}\n" if METHODS[method] else ""
    load = f"load_module {inst.module};\n" if inst.module else ""
    return f"""{load}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {NOFILE};
error_log {inst.errlog} notice;
pid {inst.prefix}/logs/nginx.pid;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    upstream api {{
{m}{body}        keepalive {KEEPALIVE};
    }}
    server {{
        listen {HOST}:{inst.ports[0]};
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def wrk(inst, secs, method):
    env = dict(os.environ, WRK_VARY="1" if method.startswith("hash") else "0")
    args = ["wrk", "-t1", f"-c{CONNS}", f"-d{secs}s", "--timeout", "5s", "-s", str(BENCH / "wrk-done.lua"),
            f"http://{HOST}:{inst.ports[0]}/"]
    p = spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = p.communicate(timeout=secs + 30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise RuntimeError("wrk did not finish")
    line = next((x for x in out.splitlines() if x.startswith("{")), None)
    if p.returncode != 0 or not line:
        raise RuntimeError(f"wrk failed ({p.returncode}): {(err or out).strip()[-300:]}")
    return json.loads(line)


def responder_counts(resp):
    m = re.search(r"total (\d+) distinct (\d+) requests (\d+)", resp.cmd("STATS") or "")
    return (int(m.group(1)), int(m.group(3))) if m else (0, 0)


def slice_of(inst, resp, secs, method):
    """One loaded slice: wrk's result plus the worker's CPU and the backend counters."""
    (w,) = inst.workers() or [None]
    if w is None:
        raise RuntimeError(f"nginx ({inst.name}) has no worker")
    resp.cmd("RESET")
    c0, s0 = proc_cpu(w), proc_sched_ns(w)
    r = wrk(inst, secs, method)
    c1, s1 = proc_cpu(w), proc_sched_ns(w)
    if c0 is None or c1 is None or inst.workers() != [w]:
        raise RuntimeError(f"nginx ({inst.name}) worker {w} changed during a slice; see {inst.errlog}")
    accepted, backend_requests = responder_counts(resp)
    e = r["errors"]
    return {"conns": r["requests"], "elapsed_s": r["duration_us"] / 1e6,
            "utime_ticks": round((c1[0] - c0[0]) * TICK), "stime_ticks": round((c1[1] - c0[1]) * TICK),
            "sched_ns": s1 - s0, "backend_conns": accepted, "backend_requests": backend_requests,
            "non2xx": e["status"], "socket_errors": e["connect"] + e["read"] + e["write"] + e["timeout"],
            "p50_us": r["p50_us"], "p99_us": r["p99_us"]}


def summary(slices):
    req = sum(x["conns"] for x in slices) or 1
    el = sum(x["elapsed_s"] for x in slices) or 1
    ticks = sum(x["utime_ticks"] + x["stime_ticks"] for x in slices)
    breq = sum(x["backend_requests"] for x in slices) or 1
    return {"rps": req / el, "cpu_us": ticks / TICK / req * 1e6,
            "user_us": sum(x["utime_ticks"] for x in slices) / TICK / req * 1e6,
            "sched_us": sum(x["sched_ns"] for x in slices) / req / 1e3,
            "backend_conns_per_1k": sum(x["backend_conns"] for x in slices) / breq * 1000,
            "non2xx": sum(x["non2xx"] for x in slices), "socket_errors": sum(x["socket_errors"] for x in slices),
            "requests": req, "slices": len(slices)}


def pairing(insts, x, y, pairs, secs, resp, method):
    """Slices x y y x x y ... of setups x and y: returns {x: [slice...], y: [slice...]}."""
    out = {x: [], y: []}
    for k in range(pairs):
        for s in (x, y) if k % 2 == 0 else (y, x):
            out[s].append(slice_of(insts[s], resp, secs, method))
    return out


def wait_ready(inst, setup, n, deadline_s=30):
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        try:
            with socket.create_connection((HOST, inst.ports[0]), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        return False
    if setup != "c":
        return True
    pat = re.compile(r'consul (?:http )?upstream "api": (\d+) peers? from')
    while time.time() < deadline:
        m = pat.findall(inst.log_text())
        if m and int(m[-1]) >= n:
            return True
        time.sleep(0.1)
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8 pairs, rr and least_conn")
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", default="")
    ap.add_argument("--responder", required=True)
    ap.add_argument("--sizes", default="2,1000")
    ap.add_argument("--methods", default=None, help=f"comma-separated, of {','.join(METHODS)}")
    ap.add_argument("--pairs", type=int, default=None, help="alternating slice pairs per comparison")
    ap.add_argument("--slice", type=int, default=2, help="seconds per slice (wrk -d)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("http.py: wrk not found (run scripts/setup.sh)")
    pairs = args.pairs or (8 if args.quick else 20)
    methods = args.methods.split(",") if args.methods else (
        ["rr", "least_conn"] if args.quick else list(METHODS))
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"http.py: unknown method {m}")
    sizes = [int(x) for x in args.sizes.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    for host, port, kind in [(DNS_HOST, DNS_PORT, socket.SOCK_DGRAM), (DNS_HOST, DNS_PORT, socket.SOCK_STREAM),
                             (HOST, CTL_PORT, socket.SOCK_STREAM)] + [(HOST, p, socket.SOCK_STREAM) for p in PORTS.values()]:
        if not port_free(host, port, kind):
            raise SystemExit(f"{host}:{port} is in use (a previous run still going?); not starting")
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(143)))
    try:
        os.nice(int(os.environ.get("BENCH_NICE", "-5")))
    except OSError:
        pass

    # Snapshots: nginx and the module may be rebuilt by someone else while this runs.
    snap = OUT / "bin-http"
    snap.mkdir(exist_ok=True)
    nginx_bin = snap / "nginx"
    shutil.copy2(args.nginx, nginx_bin)
    module = None
    if args.module:
        module = str(snap / Path(args.module).name)
        shutil.copy2(args.module, module)
    insts = {s: Nginx(nginx_bin, module, f"http-{s}", [p]) for s, p in PORTS.items()}

    resp = Responder(args.responder, max(sizes))
    bind = Bind()
    rows = []
    try:
        # Responder.start() knows no --http: start it here the same way.
        resp.p = spawn([str(resp.binary), "--http", "--peers", str(max(sizes)), "--net", f"127.{bench.PEER_NET}",
                        "--port", str(PEER_PORT), "--ctl", f"{HOST}:{CTL_PORT}"],
                       stdout=subprocess.DEVNULL, stderr=open(OUT / "responder-http.log", "w"))
        deadline = time.time() + 20
        while not resp.cmd("STATS"):
            if resp.p.poll() is not None or time.time() > deadline:
                raise SystemExit(f"responder did not start: {(OUT / 'responder-http.log').read_text()}")
            time.sleep(0.1)

        # Is (c) possible with this nginx and module?
        c_ok, c_msg = False, "no module built"
        if module:
            ok, msg = insts["c"].test(conf(insts["c"], "c", 2, "rr"))
            c_ok, c_msg = ok, msg
            if not ok:
                log("== (c) consul_upstream in http is not measured: nginx -t says")
                for line in msg.splitlines():
                    log(f"     {line}")
                log("   (a module without http upstreams, before issue 17; (a) against (a2) only)")
                if "not allowed here" not in msg and "unknown directive" not in msg:
                    # the module itself does not load: measure without it
                    for i in insts.values():
                        i.module = None
        for n in sizes:
            bind.start(zone_text(n))
            for method in methods:
                log(f"== {n} peers, {method}: (a) static against (a2) static"
                    + (" and (c) consul_upstream" if c_ok else ""))
                setups = ["a", "a2"] + (["c"] if c_ok else [])
                try:
                    for s in setups:
                        insts[s].start(conf(insts[s], s, n, method))
                        if not wait_ready(insts[s], s, n):
                            raise RuntimeError(f"({s}) never became ready with {n} peers; see {insts[s].errlog}")
                        wrk(insts[s], 1, method)  # warm-up: keepalive connections, every peer used
                    res = {"a2": pairing(insts, "a", "a2", pairs, args.slice, resp, method)}
                    if c_ok:
                        res["c"] = pairing(insts, "a", "c", pairs, args.slice, resp, method)
                except RuntimeError as e:
                    log(f"   failed: {e}")
                    continue
                finally:
                    for s in setups:
                        insts[s].stop()
                for other, r in res.items():
                    a, o = r["a"], r[other]
                    sa, so = summary(a), summary(o)
                    rps_iv, cpu_iv = bootstrap(a, o)
                    cpu_ratio = so["cpu_us"] / sa["cpu_us"] if sa["cpu_us"] else float("nan")
                    for s, m in (("a", sa), (other, so)):
                        log(f"   {NAMES[s]:<16} {m['rps']:9.0f} req/s  {m['cpu_us']:6.1f} µs CPU/request "
                            f"(user {m['user_us']:5.1f}, sched {m['sched_us']:5.1f})  "
                            f"{m['backend_conns_per_1k']:7.1f} backend conns/1k requests  "
                            f"non-2xx {m['non2xx']}  socket errors {m['socket_errors']}")
                        rows.append({"peers": n, "method": method, "setup": s, "against": other if s == "a" else "a",
                                     **{k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}})
                    iv = f"[{1 / cpu_iv[1]:.3f}–{1 / cpu_iv[0]:.3f}]" if cpu_iv else ""
                    riv = f"[{rps_iv[0]:.3f}–{rps_iv[1]:.3f}]" if rps_iv else ""
                    log(f"   {other}/a: CPU per request {cpu_ratio:.3f} {iv}, req/s "
                        f"{so['rps'] / sa['rps']:.3f} {riv}  ({pairs} pairs of {args.slice} s)")
    finally:
        for i in insts.values():
            i.stop()
        bind.stop()
        stop_proc(resp.p)
        cleanup()
    if rows:
        path = OUT / "http.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        log(f"== wrote {path.relative_to(bench.ROOT)}")


if __name__ == "__main__":
    main()
