#!/usr/bin/env python3
"""Plots results.csv (written by bench/bench.py) into plot.png, both in the directory given
as the first argument (default: bench/)."""
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
rows = list(csv.DictReader(open(BENCH / "results.csv")))
names = {"a": "(a) static round robin", "b": "(b) nginx resolve", "c": "(c) consul_upstream"}
colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}

fig, axs = plt.subplots(2, 2, figsize=(13, 9))
ax = [axs[0][0], axs[1][0], axs[1][1], axs[0][1]]
def e2e_points(s):
    """(peers, row) of setup s; (a) as measured alongside (c), else alongside (b)."""
    pts = {}
    for r in rows:
        if r["kind"] != "e2e" or r["setup"] != s:
            continue
        n = int(r["peers"])
        if s != "a" or n not in pts or r["measured_with"] == "c":
            pts[n] = r
    return sorted(pts.items())


for s in "abc":
    pts = e2e_points(s)
    if not pts:
        continue
    x = [p for p, _ in pts]
    ax[0].plot(x, [float(r["rps"]) for _, r in pts], "o-", color=colors[s], label=names[s])
    ax[1].plot(x, [float(r["worker_cpu_us_per_conn"]) for _, r in pts], "o-", color=colors[s], label=names[s])
    if s != "a":
        y = [float(r["ratio_to_a_rps"]) for _, r in pts]
        lo = [yy - float(r["ratio_rps_ci_lo"] or yy) for yy, (_, r) in zip(y, pts)]
        hi = [float(r["ratio_rps_ci_hi"] or yy) - yy for yy, (_, r) in zip(y, pts)]
        ax[3].errorbar(x, y, yerr=[lo, hi], fmt="o-", capsize=3, color=colors[s], label=names[s] + " / (a)")
ax[3].axhline(1.0, color=colors["a"], lw=1, label="(a) = 1")
aa = [r for r in rows if r["kind"] == "e2e" and r["setup"] == "a2"]
if aa:
    r = aa[0]
    y = float(r["ratio_to_a_rps"])
    ax[3].errorbar([int(r["peers"]) * 1.15], [y], yerr=[[y - float(r["ratio_rps_ci_lo"] or y)],
                   [float(r["ratio_rps_ci_hi"] or y) - y]], fmt="s", capsize=3, color="grey",
                   label="A/A check: second (a) / (a)")
for lvl, lab in ((0.98, "target at 2 peers"), (0.95, "target at 10,000")):
    ax[3].axhline(lvl, color="grey", lw=0.8, ls=":")
    ax[3].text(2, lvl, lab, fontsize=7, va="bottom", color="grey")
ax[3].set_title("conn/s relative to the interleaved (a), 95 % intervals")
ax[3].set_ylabel("conn/s ratio")
ax[0].set_title("connections/s through the proxy (new connection per request)")
ax[0].set_ylabel("connections / s")
ax[0].set_ylim(bottom=0)
ax[1].set_title("nginx worker CPU per connection")
ax[1].set_ylabel("µs (utime + stime)")
ax[1].set_ylim(bottom=0)

micro = {
    "nginx_swrr": ("(a)/(b) nginx smooth WRR, O(n) (re-implemented)", "tab:orange", "s--"),
    "selector": ("(c) Selector::pick", "tab:green", "o-"),
    "view": ("(c) PeerView::select + release", "darkgreen", "^-"),
}
for fn, (label, color, style) in micro.items():
    pts = sorted((int(r["peers"]), float(r["ns_per_pick"])) for r in rows
                 if r["kind"] == "micro_pick" and r["setup"] == fn)
    if pts:
        ax[2].plot([p for p, _ in pts], [v for _, v in pts], style, color=color, label=label)
ax[2].set_title("selection micro-bench: cost per pick")
ax[2].set_ylabel("ns per pick")
ax[2].set_yscale("log")
for a in ax:
    a.set_xscale("log")
    a.set_xlabel("peers in the upstream")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
fig.suptitle("ngx-consul: (c) above the largest single DNS answer (~1,420 records) uses several "
             "consul_upstream lines in one upstream", fontsize=10)
fig.tight_layout()
out = BENCH / "plot.png"
fig.savefig(out, dpi=110)
print(f"wrote {out}", file=sys.stderr)
