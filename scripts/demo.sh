#!/usr/bin/env bash
# The ngx-consul demo, on one machine, without Consul:
#   - BIND 9 on 127.0.0.1:8600 stands in for the Consul agent's DNS interface
#     (zone "consul", answers shaped like Consul's: TTL 0, SRV + A in ADDITIONAL);
#   - two redis-server instances (ports 6380, 6381) are the service "redis" in
#     datacenter "yunlu_office"; registering/deregistering = nsupdate on the zone;
#   - nginx (the one built with the module) listens on 127.0.0.1:6379 with
#     nginx-conf/demo.conf and balances connections across what DNS reports;
#   - the same file's http{} part: service "api" (two HTTP servers, t/lib/http_backend.py,
#     ports 8081 and 8082) behind an http upstream with keepalive on 127.0.0.1:8080,
#     and the status page (/consul-status) listing both upstreams.
# Each step shows which backend answered N connections (`CONFIG GET port`) or requests.
#
# Usage: scripts/demo.sh [--short]
#   --short        20 connections per measurement (scripts/test.sh runs this)
#   DEMO_CONNS=N   connections per measurement (default 40)
#   DEMO_KEEP=1    keep the temporary directory (configs, logs) after a successful run
#   SKIP_SETUP=1   do not run scripts/setup.sh
# Every process the demo starts is stopped on exit, also on failure or Ctrl-C.
# Exits non-zero when a step does not behave as described.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export PATH="$PATH:/usr/sbin:/sbin"
# shellcheck source=scripts/lib/rust.sh
. "$root/scripts/lib/rust.sh"
# shellcheck source=scripts/lib/standin.sh
. "$root/scripts/lib/standin.sh"

CONNS=${DEMO_CONNS:-40}
case "${1:-}" in
    --short) CONNS=${DEMO_CONNS:-20} ;;
    '') ;;
    *) echo "usage: scripts/demo.sh [--short]" >&2; exit 2 ;;
esac
QUERY=redis.service.yunlu_office.consul
API_QUERY=api.service.yunlu_office.consul
# The module's error-log lines the demo waits for (scripts/lib/standin.sh).
LOG_CHANGED=$(consul_log_set "$QUERY")
LOG_FAILED=$(consul_log_failed "$QUERY")
LOG_RECOVERED=$(consul_log_recovered)
LOG_EMPTY=$(consul_log_empty "$QUERY")
LOG_API_CHANGED=$(consul_log_set "$API_QUERY" http)

if [ -t 1 ]; then bold=$'\033[1m'; dim=$'\033[2m'; off=$'\033[0m'; else bold='' dim='' off=''; fi
heading() { printf '\n%s== %s ==%s\n' "$bold" "$*" "$off"; }
info()    { printf '   %s\n' "$*"; }
warn()    { printf '   %sWARNING: %s%s\n' "$bold" "$*" "$off" >&2; }
die()     { printf 'demo: %s\n' "$*" >&2; exit 1; }
now_ms()  { date +%s%3N; }

# ---------------------------------------------------------------- cleanup
tmp=
nginx_pid=
http_backend_pid=

stop_nginx() {
    [ -n "$nginx_pid" ] || return 0
    local workers
    workers=$(pgrep -P "$nginx_pid" 2>/dev/null || true)
    standin_stop_pid "$nginx_pid" child
    for w in $workers; do standin_stop_pid "$w"; done
    nginx_pid=
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    stop_nginx
    [ -n "$http_backend_pid" ] && standin_stop_pid "$http_backend_pid" child
    standin_stop_all
    if [ -n "$tmp" ] && [ -d "$tmp" ]; then
        if [ "$rc" -ne 0 ]; then
            for f in "$tmp"/nginx/logs/error.log "$tmp"/bind/named.log; do
                [ -s "$f" ] || continue
                printf '\n--- last lines of %s\n' "$f" >&2
                tail -n 15 "$f" >&2
            done
            case $rc in
                130 | 143) printf '\ndemo: interrupted; files kept in %s\n' "$tmp" >&2 ;;
                *) printf '\ndemo: FAILED (exit %s); files kept in %s\n' "$rc" "$tmp" >&2 ;;
            esac
        elif [ -n "${DEMO_KEEP:-}" ]; then
            printf '\nFiles kept in %s\n' "$tmp"
        else
            rm -rf "$tmp"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- ports
taken=" "
port_busy() {
    case "$taken" in *" $1 "*) return 0 ;; esac
    if command -v ss >/dev/null; then
        [ -n "$(ss -Hlntu "sport = :$1" 2>/dev/null)" ]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}
pick_port() {   # VAR START: set VAR to the first free port from START on, remembered as taken
    local p=$2
    while port_busy "$p"; do p=$((p + 1)); done
    taken="$taken$p "
    printf -v "$1" '%s' "$p"
}

# ---------------------------------------------------------------- 1. setup and build
heading "1. Installing what the demo needs (scripts/setup.sh)"
if [ -n "${SKIP_SETUP:-}" ]; then
    info "skipped (SKIP_SETUP is set)"
elif [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
    sudo "$root/scripts/setup.sh"
else
    "$root/scripts/setup.sh"
fi
for cmd in named nsupdate dig redis-server redis-cli; do
    command -v "$cmd" >/dev/null || die "$cmd not found (scripts/setup.sh installs it)"
done
ensure_rust demo

ngx_version=$(sed -n '/^name = "nginx-src"/{n;s/^version = ".*+\(.*\)"/\1/p}' Cargo.lock)
heading "2. Building the module and nginx ${ngx_version:-} (cargo build --release; a few minutes the first time)"
cargo build --release
target=${CARGO_TARGET_DIR:-$root/target}
module=$target/release/libngx_stream_consul_upstream_module.so
[ -f "$module" ] || die "$module was not built"
# shellcheck disable=SC2012  # newest of at most a few build directories
nginx_bin=$(ls -1t "$target"/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n 1 || true)
[ -x "$nginx_bin" ] || die "no nginx binary under $target/release/build/nginx-sys-*/out/objs/"
info "module: ${module#"$root"/}"
info "nginx:  ${nginx_bin#"$root"/}"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ngx-consul-demo.XXXXXX")
chmod 755 "$tmp"
dns_port='' r1='' r2='' ngx_port=''
pick_port dns_port 8600
pick_port r1 6380
pick_port r2 $((r1 + 1))
pick_port ngx_port 6379
pick_port a1 8081
pick_port a2 $((a1 + 1))
pick_port http_port 8080

# ---------------------------------------------------------------- 3. the Consul stand-in
heading "3. Starting BIND 9 on 127.0.0.1:$dns_port as the Consul agent's DNS interface"
standin_dns_setup "$tmp/bind" "$dns_port" "$(standin_srv "$QUERY" 1 "$r1")
$(standin_srv "$API_QUERY" 1 "$a1")
$(standin_srv "$API_QUERY" 1 "$a2")"
[ "$STANDIN_NAMED" = "$(command -v named)" ] \
    || info "(AppArmor confines $(command -v named): running a copy from the temp dir)"
standin_dns_start || die "BIND did not start"

show_dns() {    # what "Consul" answers now
    local out status
    out=$(dig @127.0.0.1 -p "$dns_port" +tcp +time=1 +tries=1 SRV "$QUERY" 2>&1 || true)
    status=$(printf '%s\n' "$out" | sed -n 's/.*status: \([A-Z]*\).*/\1/p' | head -n 1)
    if [ "$status" = NOERROR ]; then
        printf '%s\n' "$out" | awk '/^;; ANSWER SECTION/{a=1;next} /^$/{a=0} a{print}' \
            | while read -r line; do info "${dim}dig: $line${off}"; done
    else
        info "${dim}dig: status $status (Consul's answer when no instance is healthy)${off}"
    fi
}

dns_update() {  # nsupdate lines...; the equivalent of a Consul (de)registration
    local l
    for l in "$@"; do info "${dim}nsupdate: $l${off}"; done
    standin_nsupdate "$@"
}
srv() { standin_srv "$QUERY" "$1" "$2"; }   # WEIGHT PORT

show_dns

# ---------------------------------------------------------------- 4. backends
heading "4. Starting redis-server on ports $r1 (redis1) and $r2 (redis2)"
for p in "$r1" "$r2"; do
    standin_redis_start "$tmp" "$p" || die "redis-server did not start"
    info "redis on 127.0.0.1:$p, pid $(cat "$tmp/redis-$p.pid")"
done

info "api1 and api2 on 127.0.0.1:$a1 and :$a2 (HTTP/1.1 keep-alive; each response names its"
info "backend and connection; t/lib/http_backend.py)"
python3 "$root/t/lib/http_backend.py" --control "$tmp/http.sock" "127.0.0.1:$a1" "127.0.0.1:$a2" \
    >"$tmp/http_backend.log" 2>&1 &
http_backend_pid=$!
for _ in $(seq 50); do [ -S "$tmp/http.sock" ] && break; sleep 0.1; done
[ -S "$tmp/http.sock" ] || die "t/lib/http_backend.py did not start (see $tmp/http_backend.log)"

# ---------------------------------------------------------------- 5. nginx
heading "5. Starting nginx with nginx-conf/demo.conf on 127.0.0.1:$ngx_port"
mkdir -p "$tmp/nginx/conf" "$tmp/nginx/logs"
conf=$tmp/nginx/conf/nginx.conf
errlog=$tmp/nginx/logs/error.log
sed -e "s|/usr/lib/nginx/modules/ngx_stream_consul_upstream_module.so|$module|" \
    -e "s|127\.0\.0\.1:6379|127.0.0.1:$ngx_port|" \
    -e "s|127\.0\.0\.1:8600|127.0.0.1:$dns_port|" \
    -e "s|127\.0\.0\.1:8080|127.0.0.1:$http_port|" \
    nginx-conf/demo.conf >"$conf"
{ grep -E '^\s*(load_module|listen|consul_upstream)' "$conf" || true; } | while read -r l; do info "${dim}$l${off}"; done
"$nginx_bin" -p "$tmp/nginx" -c "$conf" -t -q || die "nginx -t rejected $conf"
"$nginx_bin" -p "$tmp/nginx" -c "$conf" -g 'daemon off;' 2>>"$tmp/nginx/logs/stderr.log" &
nginx_pid=$!

log_count() { grep -cE -- "$1" "$errlog" 2>/dev/null || true; }

wait_log() {    # PATTERN COUNT_BEFORE TIMEOUT_MS: wait for a new matching line; prints elapsed ms
    local pat=$1 before=$2 limit=$3 t0 t
    t0=$(now_ms)
    while :; do
        t=$(now_ms)
        if [ "$(log_count "$pat")" -gt "$before" ]; then echo $((t - t0)); return 0; fi
        [ $((t - t0)) -le "$limit" ] || return 1
        standin_alive "$nginx_pid" || die "nginx exited"
        sleep 0.05
    done
}

ms=$(wait_log "$LOG_CHANGED" 0 5000) || die "no \"$LOG_CHANGED\" line in the error log within 5 s"
for i in $(seq 50); do
    redis-cli -h 127.0.0.1 -p "$ngx_port" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done
info "nginx master pid $nginx_pid; first peer set published ${ms} ms after start"

# ---------------------------------------------------------------- measuring
bar() { printf '%*s' "$1" '' | tr ' ' '#'; }
count() {       # N: open N connections through nginx, count who answered
    local n=$1 i port c1=0 c2=0 failed=0
    for ((i = 0; i < n; i++)); do
        port=$(redis-cli -h 127.0.0.1 -p "$ngx_port" --raw CONFIG GET port 2>/dev/null | tail -n 1 || true)
        if [ "$port" = "$r1" ]; then c1=$((c1 + 1))
        elif [ "$port" = "$r2" ]; then c2=$((c2 + 1))
        else failed=$((failed + 1)); fi
    done
    printf '   %sredis1 (:%s) %3d  %s%s\n' "$bold" "$r1" "$c1" "$(bar "$c1")" "$off"
    printf '   %sredis2 (:%s) %3d  %s%s\n' "$bold" "$r2" "$c2" "$(bar "$c2")" "$off"
    [ "$failed" -eq 0 ] || printf '   %sfailed        %3d%s\n' "$bold" "$failed" "$off"
    last_counts="$c1 $c2 $failed"
}
expect() {      # A B: the last count should be about A:B (each of the 2 workers
                # interleaves on its own, so allow 10% of the connections either way)
    local c1 c2 failed want
    read -r c1 c2 failed <<<"$last_counts"
    want=$(( (c1 + c2 + failed) * $1 / ($1 + $2) ))
    if [ "$failed" -ne 0 ] || [ $(( (c1 - want) * 10 )) -gt "$CONNS" ] \
        || [ $(( (want - c1) * 10 )) -gt "$CONNS" ] \
        || { [ "$2" -eq 0 ] && [ "$c2" -ne 0 ]; } || { [ "$1" -eq 0 ] && [ "$c1" -ne 0 ]; }; then
        warn "expected about $1:$2"
        mismatches=$((mismatches + 1))
    fi
}
mismatches=0
await_change() {    # LABEL BEFORE: wait for the module to publish the new set
    local ms
    if ms=$(wait_log "$LOG_CHANGED" "$2" 5000); then
        info "nginx published the new set ${ms} ms after the change ($1)"
    else
        warn "no new \"$LOG_CHANGED\" line within 5 s"
        mismatches=$((mismatches + 1))
    fi
}

# ---------------------------------------------------------------- 6. the scenario
heading "6. One instance registered: redis1 (:$r1). $CONNS connections through nginx"
count "$CONNS"; expect "$CONNS" 0

heading "7. Register redis2 (:$r2, weight 1): traffic splits 1:1"
before=$(log_count "$LOG_CHANGED")
dns_update "update add $(srv 1 "$r2")"
show_dns
await_change "interval=1s" "$before"
count "$CONNS"; expect 1 1

heading "8. Re-register redis1 with weight 3 (Consul: \"Weights\": {\"Passing\": 3}): traffic 3:1"
before=$(log_count "$LOG_CHANGED")
dns_update "update delete $(srv 1 "$r1")" "update add $(srv 3 "$r1")"
show_dns
await_change "interval=1s" "$before"
count "$CONNS"; expect 3 1

heading "9. Consul agent unreachable (BIND stopped): the last set is kept (on_error=keep)"
before=$(log_count "$LOG_FAILED")
standin_dns_stop
if ms=$(wait_log "$LOG_FAILED" "$before" 5000); then
    info "failure noticed after ${ms} ms"
else
    warn "no \"$LOG_FAILED\" line within 5 s"
    mismatches=$((mismatches + 1))
fi
count "$CONNS"; expect 3 1
info "restarting BIND (it replays its journal: the registrations are kept);"
info "meanwhile the module retries with backoff (interval, doubling up to 10 s)"
before=$(log_count "$LOG_RECOVERED")
standin_dns_start || die "BIND did not restart"
if ms=$(wait_log "$LOG_RECOVERED" "$before" 15000); then
    info "\"resolver recovered\" logged ${ms} ms after BIND was back"
else
    warn "no \"$LOG_RECOVERED\" line within 15 s"
    mismatches=$((mismatches + 1))
fi

heading "10. Deregister redis1: all traffic to redis2 within about a second"
before=$(log_count "$LOG_CHANGED")
dns_update "update delete $(srv 3 "$r1")"
show_dns
await_change "interval=1s" "$before"
count "$CONNS"; expect 0 1

heading "11. Deregister redis2 too: Consul answers NXDOMAIN, the last set is kept (on_empty=keep)"
before=$(log_count "$LOG_EMPTY")
dns_update "update delete $(srv 1 "$r2")"
show_dns
if ms=$(wait_log "$LOG_EMPTY" "$before" 5000); then
    info "empty answer noticed after ${ms} ms"
else
    warn "no \"$LOG_EMPTY\" line within 5 s"
    mismatches=$((mismatches + 1))
fi
count "$CONNS"; expect 0 1
info "(nginx's own \"server ... service=... resolve;\" would have dropped every peer now)"

# ---------------------------------------------------------------- http
count_http() {  # N: send N requests through nginx's http upstream, count who answered
    local n=$1 i body port conn c1=0 c2=0 failed=0
    local -A conns=()
    for ((i = 0; i < n; i++)); do
        body=$(curl -s --max-time 5 "http://127.0.0.1:$http_port/" 2>/dev/null || true)
        read -r _ port conn _ <<<"$body"
        if [ "$port" = "$a1" ]; then c1=$((c1 + 1))
        elif [ "$port" = "$a2" ]; then c2=$((c2 + 1))
        else failed=$((failed + 1)); continue; fi
        conns["$port $conn"]=1
    done
    local k1=0 k2=0 k
    for k in "${!conns[@]}"; do
        case $k in "$a1 "*) k1=$((k1 + 1)) ;; "$a2 "*) k2=$((k2 + 1)) ;; esac
    done
    printf '   %sapi1 (:%s) %3d  %-20s over %d connection(s)%s\n' "$bold" "$a1" "$c1" "$(bar "$c1")" "$k1" "$off"
    printf '   %sapi2 (:%s) %3d  %-20s over %d connection(s)%s\n' "$bold" "$a2" "$c2" "$(bar "$c2")" "$k2" "$off"
    [ "$failed" -eq 0 ] || printf '   %sfailed      %3d%s\n' "$bold" "$failed" "$off"
    last_counts="$c1 $c2 $failed"
    last_conns=$((k1 + k2))
}

heading "12. HTTP: the same directive in http { upstream api { ... keepalive 8; } }: $CONNS requests to :$http_port"
count_http "$CONNS"; expect 1 1
# Each of the 2 workers keeps its own idle connections: at most 2 per backend.
if [ "$last_conns" -le 4 ]; then
    info "keepalive: $CONNS requests over $last_conns upstream connection(s) (each worker keeps its own)"
else
    warn "expected upstream keepalive: $CONNS requests over $last_conns connections"
    mismatches=$((mismatches + 1))
fi

heading "13. Deregister api1 while nginx still holds idle connections to it: no new request goes there"
api_before=$(log_count "$LOG_API_CHANGED")
dns_update "update delete $(standin_srv "$API_QUERY" 1 "$a1")"
if ms=$(wait_log "$LOG_API_CHANGED" "$api_before" 5000); then
    info "nginx published the new set ${ms} ms after the change (interval=1s)"
else
    warn "no new \"$LOG_API_CHANGED\" line within 5 s"
    mismatches=$((mismatches + 1))
fi
count_http "$CONNS"; expect 0 1
open_to_api1=$(python3 -c '
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"stats\n")
print(json.loads(s.makefile().readline())["127.0.0.1:" + sys.argv[2]]["open"])
' "$tmp/http.sock" "$a1" 2>/dev/null || echo "?")
info "api1 still has $open_to_api1 open connection(s) from nginx (idle in the keepalive cache until keepalive_timeout)"

heading "14. The status page (curl http://127.0.0.1:$http_port/consul-status): both upstreams"
status_json=$(curl -s --max-time 5 "http://127.0.0.1:$http_port/consul-status" || true)
if summary=$(printf '%s' "$status_json" | python3 -c '
import json, sys
for u in json.load(sys.stdin)["upstreams"]:
    peers = ", ".join("%s %s" % (p["address"], p["state"]) for p in u["peers"]) or "none"
    print("%-6s upstream %-6s %d usable of %d: %s" % (u["protocol"], u["name"], u["usable_peers"], u["peers_total"], peers))
' 2>&1); then
    printf '%s\n' "$summary" | while read -r l; do info "$l"; done
else
    warn "the status page did not answer JSON: ${status_json:0:200}"
    mismatches=$((mismatches + 1))
fi

heading "15. The module's lines in the error log (grep consul error.log)"
grep consul "$errlog" | sed 's/^/   /' || warn "no line mentions consul"

if [ "$mismatches" -ne 0 ]; then
    heading "Done, but $mismatches step(s) did not behave as described above"
    exit 1
fi
heading "Done: every step behaved as described; stopping nginx, redis, the HTTP servers and BIND"
cat <<EOF

${bold}Where to look next${off}
   README.md, "With a real Consul agent"      register services, point resolver= at the agent
   README.md, "Building for your own nginx"   scripts/build-module.sh for the nginx you run
                                              (Debian/Ubuntu package: scripts/package-deb.sh)
   README.md, "Directive" / "Log messages"    every parameter, balancing methods; what the error log says
   README.md, "Status and metrics"            the balancer's view as JSON or Prometheus metrics
   README.md, "HTTP upstreams"                consul_upstream in http {}, keepalive, methods
   nginx-conf/                                consul-agent.conf, fallback.conf, demo.conf, http.conf,
                                              methods.conf (least_conn, hash, status endpoint)
   README.zh-CN.md                            中文说明

${bold}Commands to try${off}
   DEMO_KEEP=1 scripts/demo.sh                keep the demo's files (BIND zone, nginx.conf, logs)
   scripts/test.sh                            the whole test suite (TEST_FILES=t/001-balance.t for one file)
   scripts/build-module.sh --nginx /usr/sbin/nginx    build and check the module for that nginx
   dig @AGENT_IP -p 8600 +tcp redis.service.yunlu_office.consul SRV   what nginx will get from your agent
EOF
