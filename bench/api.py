#!/usr/bin/env python3
"""api= lines against DNS lines: propagation, requests to the agent, worker-0 CPU.

bench/api.sh runs this in a private network namespace (release build). Three setups, the
same nginx binary, backends (bench-responder) and two workers:
  api       consul_upstream service=redis api=http://127.0.0.1:28500   (blocking queries)
  dns1s     consul_upstream redis.service.bench.consul resolver=127.0.0.1:28600 interval=1s
  dns100ms  the same at interval=100ms
The HTTP API is the Consul API double (t/lib/consul_api_double.py), DNS is BIND 9.

1. Propagation: a registration or deregistration of 127.79.0.1:6400 at the double (a PUT on
   its control port) or in BIND (nsupdate), then a new connection through nginx every ~2 ms
   (bench.py's Prober): the time to the first connection that reflects the change. p50, p99.
2. Idle: LINES upstreams of one line each, nothing changes for IDLE seconds: requests per
   line per minute at the agent (the double's request log) or at BIND (its query log), and
   worker 0's CPU time (utime+stime from /proc) as % of one core.

Writes bench/API.md and the section between <!-- api --> markers in bench/RESULTS.md.
Every address is in 127.0.0.0/8.
"""

import argparse
import datetime
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402  (Bind, Nginx, Responder, Prober, processes)

API_PORT = 28500
API_CONTROL = 38500
API = f"http://127.0.0.1:{API_PORT}"
PORTS = {"api": [17041], "api10s": [17046], "dns1s": [17051], "dns100ms": [17061]}
SETUPS = ["api", "dns1s", "dns100ms"]
IDLE_SETUPS = ["api", "api10s", "dns1s", "dns100ms"]
NAMES = {"api": "API line (blocking queries)", "api10s": "API line, wait=10s",
         "dns1s": "DNS line, interval=1s", "dns100ms": "DNS line, interval=100ms"}


def log(*a):
    print(*a, flush=True)


def register_request(service, ip, port=B.PEER_PORT):
    return {"Node": f"node-{ip}", "Address": ip,
            "Service": {"ID": f"{service}-{ip}", "Service": service, "Port": port},
            "Checks": [{"CheckID": "serfHealth", "Status": "passing"},
                       {"CheckID": f"service:{service}-{ip}", "ServiceID": f"{service}-{ip}",
                        "Status": "passing"}]}


class Double:
    def __init__(self, lines):
        self.dir = B.OUT / "api"
        self.dir.mkdir(parents=True, exist_ok=True)
        regs = [register_request("redis", B.peer_ip(i)) for i in range(2)]
        regs += [register_request(f"svc{k}", B.peer_ip(k % 2)) for k in range(lines)]
        (self.dir / "init.json").write_text(json.dumps({"register": regs}))
        self.p = B.spawn([sys.executable, str(B.ROOT / "t/lib/consul_api_double.py"),
                          "--port", str(API_PORT), "--control-port", str(API_CONTROL),
                          "--init", str(self.dir / "init.json")],
                         stdout=subprocess.DEVNULL, stderr=open(self.dir / "double.log", "w"))
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                self.requests()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the API double did not start")

    def put(self, path, data):
        req = urllib.request.Request(f"http://127.0.0.1:{API_CONTROL}{path}",
                                     data=json.dumps(data).encode(), method="PUT")
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()

    def requests(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{API_CONTROL}/requests", timeout=10) as r:
            return [json.loads(x) for x in r.read().decode().splitlines() if x]


def line_of(setup, service):
    if setup == "api":
        return f"consul_upstream service={service} api={API};"
    if setup == "api10s":
        return f"consul_upstream service={service} api={API} wait=10s;"
    iv = "1s" if setup == "dns1s" else "100ms"
    return f"consul_upstream {service}.service.{B.DC}.consul resolver={B.DNS_HOST}:{B.DNS_PORT} interval={iv};"


def bind_zone(lines):
    z = B.Bind().zone(2)
    z += "".join(f"svc{k}.service.{B.DC} IN SRV 1 1 {B.PEER_PORT} {B.hex_target(B.peer_ip(k % 2))}\n"
                 for k in range(lines))
    return z


def propagation(nginx, bind, double, setup, changes):
    up = f"  upstream redis {{\n    {line_of(setup, 'redis')}\n  }}\n"
    nginx.start(nginx.conf("c", up, workers=2))
    if not B.wait_ready(nginx, "c", 2, 30):
        nginx.stop()
        return {"error": "proxy never answered"}
    time.sleep(1.5)
    prober = B.Prober(nginx.ports[0], limit_s=changes * 4 + 30)
    prober.start()
    time.sleep(0.5)
    srv = f"{B.QNAME}. 0 IN SRV 1 1 {B.PEER_PORT} {B.hex_target(B.EXTRA_PEER)}"
    results = []
    registered = False
    for _ in range(changes):
        # A random phase against the 1 s interval, changes at least 1 s apart: faster
        # churn is paced on purpose (an API line's token bucket: 1 answer per interval).
        time.sleep(random.uniform(1.05, 2.05))
        registered = not registered
        if setup == "api":
            if registered:
                double.put("/register", register_request("redis", B.EXTRA_PEER))
            else:
                double.put("/deregister", {"Node": f"node-{B.EXTRA_PEER}", "ServiceID": f"redis-{B.EXTRA_PEER}"})
        else:
            bind.nsupdate([("update add " if registered else "update delete ") + srv])
        t0 = time.monotonic()
        delay = None
        deadline = t0 + 6
        while time.monotonic() < deadline:
            time.sleep(0.01)
            recs = prober.since(t0)
            if registered:
                hit = next((t for t, a in recs if a == B.EXTRA_PEER), None)
                if hit is not None:
                    delay = hit - t0
                    break
            else:
                last = max((i for i, (t, a) in enumerate(recs) if a == B.EXTRA_PEER), default=-1)
                after = recs[last + 1:]
                if len(after) >= 100 and all(a not in (B.EXTRA_PEER, None) for _, a in after[:100]):
                    delay = after[0][0] - t0
                    break
        results.append({"op": "register" if registered else "deregister", "delay_s": delay})
    prober.stop_ev.set()
    prober.join(5)
    nginx.stop()
    failed = sum(1 for _, a in prober.records if a is None)
    return {"changes": results, "probes": len(prober.records), "failed_probes": failed}


def worker0(nginx):
    """The worker that runs discovery: the one that logs its start (level info)."""
    for line in nginx.log_text().splitlines():
        if "[info]" in line and ("watching" in line or " every " in line):
            return int(line.split("[info] ")[1].split("#")[0])
    return None


def idle(nginx, bind, double, setup, lines, secs):
    ups = "".join(f"  upstream u{k} {{\n    {line_of(setup, f'svc{k}')}\n  }}\n" for k in range(lines))
    ups += f"  upstream redis {{\n    {line_of(setup, 'redis')}\n  }}\n"
    nginx.start(nginx.conf("c", ups, workers=2, level="info"))
    deadline = time.time() + 30
    while time.time() < deadline and nginx.log_text().count(" from ") < lines + 1:
        time.sleep(0.2)
    time.sleep(3)
    w0 = worker0(nginx)
    qlog = bind.dir / "query.log"
    q0 = qlog.stat().st_size if qlog.exists() else 0
    r0 = len(double.requests())
    c0 = B.proc_cpu(w0) or (0, 0)
    s0 = B.proc_sched_ns(w0)
    t0 = time.monotonic()
    time.sleep(secs)
    dt = time.monotonic() - t0
    c1 = B.proc_cpu(w0) or (0, 0)
    s1 = B.proc_sched_ns(w0)
    r1 = len(double.requests())
    q1 = qlog.stat().st_size if qlog.exists() else 0
    counts = B.count_queries(qlog, q0, q1)
    srv = sum(v for (n, t), v in counts.items() if t == "SRV" and n.startswith("svc"))
    requests = (r1 - r0) if setup.startswith("api") else srv
    problems = [x for x in nginx.log_text().splitlines() if "[warn]" in x or "[error]" in x]
    nginx.stop()
    return {"requests_per_line_per_min": requests / lines / dt * 60,
            "requests": requests, "secs": dt,
            "w0_cpu_pct": 100 * ((c1[0] + c1[1]) - (c0[0] + c0[1])) / dt,
            "w0_sched_pct": 100 * (s1 - s0) / 1e9 / dt,
            "problems": problems[:5]}


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def report(args, prop, idl, started):
    L = [f"# api= lines against DNS lines\n",
         f"Generated by `bench/api.sh` on {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC "
         f"({(time.time() - started) / 60:.1f} min): {B.sh(args.nginx + ' -v 2>&1')}, the module's "
         f"release build (commit {B.sh('git -C ' + str(B.ROOT) + ' rev-parse --short HEAD')}), "
         "`worker_processes 2`, the Consul API double (Python) on "
         f"127.0.0.1:{API_PORT} and BIND 9 on {B.DNS_HOST}:{B.DNS_PORT}, on the same 2-core machine.\n",
         "## Propagation: a change at the agent to the first connection that reflects it\n",
         f"{args.changes} changes per setup (registrations and deregistrations alternately, at a "
         "random phase, at least 1 s apart: faster churn is paced on purpose, one answer per "
         "`interval` after a burst of two), a new connection through nginx every ~2 ms.\n",
         "| setup | changes seen | p50 | p99 | max |", "|---|---:|---:|---:|---:|"]
    for s in SETUPS:
        p = prop.get(s, {})
        ds = [c["delay_s"] * 1000 for c in p.get("changes", []) if c["delay_s"] is not None]
        n = len(p.get("changes", []))
        if ds:
            L.append(f"| {NAMES[s]} | {len(ds)}/{n} | {pct(ds, 50):.1f} ms | {pct(ds, 99):.1f} ms | {max(ds):.1f} ms |")
        else:
            L.append(f"| {NAMES[s]} | 0/{n} | – | – | – |")
    L += ["", f"## Idle: {args.lines} upstreams of one line, nothing changes for {args.idle} s\n",
          "| setup | requests per line per minute | worker 0 CPU (% of one core) |",
          "|---|---:|---:|"]
    for s in IDLE_SETUPS:
        i = idl.get(s, {})
        if "requests_per_line_per_min" in i:
            L.append(f"| {NAMES[s]} | {i['requests_per_line_per_min']:.2f} | {i['w0_sched_pct']:.2f} |")
    L.append("")
    L.append("An API line sends one request per `wait` when nothing changes (5 minutes by "
             "default, less up to 1/16 at random: none in a shorter idle window; `wait=10s` "
             "shows the rate, about 6 a minute); a DNS line one query per `interval`. Worker "
             "0's CPU is its schedstat time on CPU over the idle period, all lines together; "
             "an idle API line costs a timer check per second (it watches for a reload or a "
             "new writer while its request waits).")
    probs = {s: i.get("problems") for s, i in idl.items() if i.get("problems")}
    if probs:
        L.append("\nLog lines at warn or above: " + json.dumps(probs))
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--responder", required=True)
    ap.add_argument("--changes", type=int, default=40)
    ap.add_argument("--lines", type=int, default=100)
    ap.add_argument("--idle", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="10 changes, 20 lines, 15 s idle; report in bench/out/")
    args = ap.parse_args()
    if args.quick:
        args.changes, args.lines, args.idle = 10, 20, 15
    started = time.time()
    B.OUT.mkdir(parents=True, exist_ok=True)
    resp = B.Responder(Path(args.responder), 2)
    resp.start()
    bind = B.Bind()
    bind.start(bind_zone(args.lines), querylog=True)
    double = Double(args.lines)
    prop, idl = {}, {}
    for s in IDLE_SETUPS:
        nginx = B.Nginx(Path(args.nginx), str(Path(args.module).resolve()), f"api-{s}", PORTS[s])
        if s in SETUPS:
            log(f"== {NAMES[s]}: propagation ({args.changes} changes)")
            prop[s] = propagation(nginx, bind, double, s, args.changes)
            ds = sorted(c["delay_s"] * 1000 for c in prop[s].get("changes", []) if c["delay_s"] is not None)
            if ds:
                log(f"   p50 {pct(ds, 50):.1f} ms, p99 {pct(ds, 99):.1f} ms, {len(ds)} changes seen")
            else:
                log(f"   {prop[s]}")
        log(f"== {NAMES[s]}: idle ({args.lines} lines, {args.idle} s)")
        idl[s] = idle(nginx, bind, double, s, args.lines, args.idle)
        log(f"   {idl[s]['requests_per_line_per_min']:.2f} requests per line per minute, "
            f"worker 0 {idl[s]['w0_sched_pct']:.2f} % of one core")
    text = report(args, prop, idl, started)
    out = B.OUT / "API.md" if args.quick else B.BENCH / "API.md"
    out.write_text(text)
    (B.OUT / "api.json").write_text(json.dumps({"propagation": prop, "idle": idl}, indent=1))
    if not args.quick:
        results = B.BENCH / "RESULTS.md"
        old = results.read_text() if results.exists() else ""
        section = "<!-- api -->\n" + text.replace("# api= lines against DNS lines", "## api= lines against DNS lines (bench/api.sh)", 1) + "<!-- /api -->\n"
        if "<!-- api -->" in old:
            old = old[:old.index("<!-- api -->")] + old[old.index("<!-- /api -->") + len("<!-- /api -->\n"):]
        results.write_text(old.rstrip("\n") + "\n\n" + section)
    log("\n" + text)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        B.cleanup()
        sys.exit(130)
    finally:
        B.cleanup()
