#!/usr/bin/env python3
"""nginx's balancing methods over discovered peers against the same method over static
peers, on the same vendored nginx (issue 11's cost targets): for least_conn, hash
consistent, hash, random two least_conn and random, at 2, 1,000 and 10,000 peers, a
static upstream with the method (a) and consul_upstream with the method (c) run side by
side and are loaded in alternating slices, as bench.py does for round robin.

Writes bench/METHODS.md and bench/methods.csv (bench/out/ with --quick). Run by
bench/run.sh after bench.py, or alone (after run.sh built everything):
    python3 bench/methods.py --nginx N --module M --responder R --loader L [--quick]
"""

import argparse
import csv
import datetime
import math
import os
import signal
import sys
import time

import bench
from bench import Bind, Nginx, Responder, pairing, bootstrap, log, ci, fmt, INST_PORTS, OUT, BENCH

# The key for hash: the client's port, so that the load generator's connections
# (one address) spread over the peers as many clients would.
METHODS = [
    ("least_conn", "least_conn;"),
    ("hash consistent", "hash $remote_port consistent;"),
    ("hash", "hash $remote_port;"),
    ("random two least_conn", "random two least_conn;"),
    ("random", "random;"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--responder", required=True)
    ap.add_argument("--loader", required=True)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--slice", type=float, default=0.25)
    ap.add_argument("--sizes", default=None)
    ap.add_argument("--methods", default=None, help="comma-separated names, e.g. least_conn,random")
    args = ap.parse_args()
    bench.LOADER = args.loader
    quick = args.quick
    pairs = args.pairs or (6 if quick else 16)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([2, 1000] if quick else [2, 1000, 10000])
    methods = [m for m in METHODS if not args.methods or m[0] in args.methods.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: (bench.cleanup(), sys.exit(143)))
    try:
        os.nice(int(os.environ.get("BENCH_NICE", "-5")))
    except OSError:
        pass
    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()

    bind = Bind()
    max_answer = bench.find_max_answer(bind, 1430)
    resp = Responder(args.responder, max(sizes))
    resp.start()
    insts = {s: Nginx(args.nginx, args.module, s, INST_PORTS[s]) for s in ("a", "c")}
    rows = []
    try:
        for n in sizes:
            shards = math.ceil(n / max_answer) if n > max_answer else 0
            bind.start(bind.zone(n, shards=shards))
            for name, directive in methods:
                res = pairing(insts, "c", n, shards, bind, resp, args.slice, pairs, method=directive)
                if "error" in res:
                    log(f"  {name:>22} n={n:>5}: ERROR {res['error']}")
                    rows.append({"method": name, "peers": n, "error": res["error"]})
                    continue
                a, c = res["sum"]["a"], res["sum"]["c"]
                rps_ci, cpu_ci = bootstrap(res["slices"]["a"], res["slices"]["c"])
                row = {"method": name, "peers": n, "a_cpu_us": a["cpu_us"], "c_cpu_us": c["cpu_us"],
                       "a_rps": a["rps"], "c_rps": c["rps"], "cpu_ratio": a["cpu_us"] / c["cpu_us"],
                       "cpu_ci": cpu_ci, "rps_ratio": c["rps"] / a["rps"], "rps_ci": rps_ci,
                       "errors": a["errors"] + c["errors"], "peers_used": res["peers_used"]}
                rows.append(row)
                log(f"  {name:>22} n={n:>5}: static {a['cpu_us']:6.1f} us/conn, consul_upstream "
                    f"{c['cpu_us']:6.1f} us/conn, static/consul CPU {row['cpu_ratio']:.3f} {ci(cpu_ci)}, "
                    f"conn/s ratio {row['rps_ratio']:.3f} {ci(rps_ci)}, errors {row['errors']}")
    finally:
        for i in insts.values():
            i.stop()
        bind.stop()
        bench.stop_proc(resp.p)
    write(rows, quick, started, time.monotonic() - t0, pairs, args.slice, max_answer)


def write(rows, quick, started, took, pairs, secs, max_answer):
    dest = OUT if quick else BENCH
    with open(dest / "methods.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "peers", "static_cpu_us_per_conn", "consul_cpu_us_per_conn",
                    "static_over_consul_cpu", "ci_lo", "ci_hi", "consul_over_static_rps", "errors"])
        for r in rows:
            if "error" in r:
                w.writerow([r["method"], r["peers"], "", "", "", "", "", "", r["error"][:80]])
                continue
            lo, hi = r["cpu_ci"] or ("", "")
            w.writerow([r["method"], r["peers"], f"{r['a_cpu_us']:.2f}", f"{r['c_cpu_us']:.2f}",
                        f"{r['cpu_ratio']:.4f}", lo, hi, f"{r['rps_ratio']:.4f}", r["errors"]])
    L = ["# Balancing methods: consul_upstream against the same method on static peers", ""]
    L.append(f"Run {started:%Y-%m-%d %H:%M %Z}, {took / 60:.1f} min, {pairs} slice pairs of {secs * 1000:.0f} ms "
             f"per comparison{' (quick run)' if quick else ''}; machine as in [RESULTS.md](RESULTS.md). "
             f"Written by `bench/methods.py` (run by `bench/run.sh`).")
    L.append("")
    L.append("Each row: a static `upstream` with the method (a) and `consul_upstream` with the same "
             "method (c), the same peers, run side by side and loaded in alternating slices. Worker "
             "CPU time per connection; the ratio is (a)/(c) with a 95 % interval: above 1, "
             "consul_upstream costs less. Hash keys are `$remote_port` (one client address spread "
             f"as many clients). At 10,000 peers (c) has {math.ceil(10000 / max_answer)} "
             "`consul_upstream` lines in the upstream (one DNS answer from BIND carries about "
             f"{max_answer}; a Consul agent's, fewer: README's Limitations).")
    L.append("")
    L.append("| method | peers | static µs/conn | consul_upstream µs/conn | static / consul_upstream CPU | target |")
    L.append("|---|---:|---:|---:|---|---|")
    for r in rows:
        if "error" in r:
            L.append(f"| {r['method']} | {r['peers']:,} | – | – | error: {r['error'][:60]} | |")
            continue
        target = "at or below static" if r["peers"] >= 1000 else "(no target below 1,000)"
        met = ""
        if r["peers"] >= 1000 and r["cpu_ci"]:
            met = " — met" if r["cpu_ci"][1] >= 1.0 or r["cpu_ratio"] >= 1.0 else " — not met"
        L.append(f"| {r['method']} | {r['peers']:,} | {fmt(r['a_cpu_us'])} | {fmt(r['c_cpu_us'])} | "
                 f"{r['cpu_ratio']:.3f} {ci(r['cpu_ci'])} | {target}{met} |")
    L.append("")
    L.append("Pick cost alone (no nginx, no sockets) is in RESULTS.md's micro-bench table: "
             "`pick/least_conn`, `pick/hash`, `pick/hash_consistent`, `pick/random`, "
             "`pick/random_two` against `pick/nginx_least_conn` and `pick/nginx_swrr`.")
    (dest / "METHODS.md").write_text("\n".join(L) + "\n")
    log(f"wrote {dest / 'METHODS.md'}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        bench.cleanup()
        sys.exit(130)
    finally:
        bench.cleanup()
