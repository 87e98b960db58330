#!/usr/bin/env bash
# What one nginx host costs its Consul agent and itself: N upstreams, one
# consul_upstream line each, at interval=I, against BIND standing in for the agent.
# Prints the SRV queries per second BIND received and the CPU time of worker 0 (the
# querying worker) and of the other worker, as % of one core, over D seconds after
# a warm-up, read from /proc/<pid>/stat (utime + stime), and the TCP connections
# nginx holds to the resolver (ss, in the private network namespace).
#
# Usage: bench/fleet.sh [UPSTREAMS [INTERVAL [SECONDS]]]    (default: 200 1s 30)
# Uses the release build (cargo build --release); runs in a private network namespace.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
n=${1:-200} interval=${2:-1s} secs=${3:-30}
if [ -z "${FLEET_NETNS:-}" ]; then
    exec env FLEET_NETNS=1 unshare -n sh -c 'ip link set lo up && exec "$@"' sh bash "$0" "$n" "$interval" "$secs"
fi
export PATH="$PATH:/usr/sbin:/sbin"
# shellcheck source=scripts/lib/standin.sh
. "$root/scripts/lib/standin.sh"
target=${CARGO_TARGET_DIR:-$root/target}
module=$target/release/libngx_stream_consul_upstream_module.so
# shellcheck disable=SC2012
nginx=$(ls -1t "$target"/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n 1)
[ -f "$module" ] && [ -x "$nginx" ] || { echo "fleet: run cargo build --release first" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'set +e; [ -s "$tmp/nginx/nginx.pid" ] && kill -QUIT "$(cat "$tmp/nginx/nginx.pid")"; sleep 0.5; standin_stop_all; rm -rf "$tmp"' EXIT
zone=''
for i in $(seq "$n"); do zone+="$(standin_srv "svc$i.service.yunlu_office.consul" 1 $((20000 + i)))"$'\n'; done
STANDIN_DNS_QUERYLOG=1 standin_dns_setup "$tmp/bind" 8600 "$zone"
standin_dns_start

mkdir -p "$tmp/nginx"
{
    echo "load_module $module;"
    echo "worker_processes 2; error_log $tmp/nginx/error.log info; pid $tmp/nginx/nginx.pid;"
    echo "events { } stream {"
    for i in $(seq "$n"); do
        echo "upstream u$i { consul_upstream svc$i.service.yunlu_office.consul resolver=127.0.0.1:8600 interval=$interval; }"
    done
    echo "server { listen 127.0.0.1:16379; proxy_pass u1; } }"
} >"$tmp/nginx/nginx.conf"
"$nginx" -p "$tmp/nginx/" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log"
sleep 5    # warm-up: every line has answered

# worker 0 is the one that logs discovery's start
w0=$(grep -E "$(consul_log_started)" "$tmp/nginx/error.log" | sed -n 's/.*\[info\] \([0-9]*\)#.*/\1/p' | head -n 1)
[ -n "$w0" ] || { echo "fleet: no \"$(consul_log_started)\" line in the error log" >&2; exit 1; }
other=$(pgrep -P "$(cat "$tmp/nginx/nginx.pid")" | grep -vx "$w0" | head -n 1)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
q0=$(grep -c 'query:' "$tmp/bind/named.log" || true); a0=$(ticks "$w0"); b0=$(ticks "$other"); n0=$(ticks "$STANDIN_DNS_PID")
t0=$(date +%s.%N)
sleep "$secs"
q1=$(grep -c 'query:' "$tmp/bind/named.log" || true); a1=$(ticks "$w0"); b1=$(ticks "$other"); n1=$(ticks "$STANDIN_DNS_PID")
t1=$(date +%s.%N)
conns=$(ss -Htn state established '( dport = :8600 )' | wc -l)
awk -v n="$n" -v iv="$interval" -v dq=$((q1 - q0)) -v da=$((a1 - a0)) -v db=$((b1 - b0)) -v dn=$((n1 - n0)) \
    -v hz="$hz" -v t0="$t0" -v t1="$t1" -v conns="$conns" 'BEGIN {
    dt = t1 - t0
    printf "%d upstreams, interval=%s, %.1f s measured (nginx %s)\n", n, iv, dt, "'"$("$nginx" -v 2>&1 | sed 's/.*\///')"'"
    printf "  SRV queries received by BIND: %.1f /s\n", dq / dt
    printf "  worker 0 (queries):           %.2f %% of one core\n", 100 * da / hz / dt
    printf "  other worker:                 %.2f %% of one core\n", 100 * db / hz / dt
    printf "  BIND (answering):             %.2f %% of one core\n", 100 * dn / hz / dt
    printf "  TCP connections to BIND:      %d\n", conns
}'
grep -cE '\[(alert|crit|error)\]' "$tmp/nginx/error.log" | sed 's/^/  error log lines at error or above: /'
