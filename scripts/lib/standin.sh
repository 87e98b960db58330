# shellcheck shell=bash
# Consul's DNS interface (BIND 9) and Redis backends on 127.0.0.1, for scripts/demo.sh
# and the CI checks of the packaged builds (scripts/ci/). The Test::Nginx suite has its
# own, richer copy in t/lib/Test/Nginx/Consul.pm.
#
#   standin_dns_setup DIR PORT ZONE_LINES   named.conf + zone "consul" (TTL 0, like Consul)
#   standin_dns_start                       start named on 127.0.0.1:PORT, wait until it answers
#   standin_dns_stop                        stop it (zone and journal stay: a restart keeps updates)
#   standin_nsupdate LINE...                "update add ..." lines: a (de)registration
#   standin_srv NAME WEIGHT PORT            a Consul-shaped SRV record for 127.0.0.1:PORT
#   standin_redis_start DIR PORT            redis-server on 127.0.0.1:PORT
#   standin_stop_all                        stop every process started here
#   standin_alive PID / standin_stop_pid PID [child]
#   consul_log_* QUERY                      the module's log lines, as grep -E patterns
# Functions return non-zero with a message on stderr when something does not start.

# The module's error-log lines these scripts wait for (README: "Log messages"), in one
# place: when a message changes, change it here.
consul_log_set()       { echo "consul ${2:+$2 }upstream \"[^\"]*\": [0-9]+ peers? from ${1//./\\.}"; }  # the set changed; $2: http
consul_log_failed()    { echo "resolving ${1//./\\.} failed"; }         # once per failure streak
consul_log_recovered() { echo "resolver recovered"; }                    # the first answer after it
consul_log_empty()     { echo "${1//./\\.} has no healthy instances"; } # NXDOMAIN / no records
consul_log_started()   { echo "resolving .* every"; }                    # [info], worker 0 starts

STANDIN_DNS_DIR='' STANDIN_DNS_PORT='' STANDIN_DNS_PID='' STANDIN_NAMED=''
STANDIN_REDIS_PIDS=() STANDIN_WEB_PIDS=()
STANDIN_TARGET=7f000001.addr.yunlu_office.consul   # Consul's name for node address 127.0.0.1

standin_alive() {       # PID: running (a zombie child waiting to be reaped does not count)
    local state
    state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

standin_stop_pid() {    # PID [child]: TERM, wait up to 5 s, then KILL; reap it if it is our child
    local pid=$1 child=${2:-} _
    if standin_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            standin_alive "$pid" || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    if [ -n "$child" ]; then wait "$pid" 2>/dev/null || true; fi
}

standin_srv() { echo "$1. 0 SRV 1 $2 $3 $STANDIN_TARGET."; }

standin_dns_setup() {   # DIR PORT ZONE_LINES
    STANDIN_DNS_DIR=$1 STANDIN_DNS_PORT=$2
    local d=$1 querylog=''
    mkdir -p "$d"
    # STANDIN_DNS_QUERYLOG=1: one line per query in DIR/named.log (bench/fleet.sh counts them)
    [ -z "${STANDIN_DNS_QUERYLOG:-}" ] || querylog="querylog yes;"
    cat >"$d/named.conf" <<EOF
options {
    directory "$d";
    pid-file "$d/named.pid";
    session-keyfile "$d/session.key";
    managed-keys-directory "$d";
    listen-on port $2 { 127.0.0.1; };
    listen-on-v6 { none; };
    recursion no;
    dnssec-validation no;
    notify no;
    check-names primary ignore;     // "yunlu_office" has an underscore
    minimal-responses no-auth;      // ADDITIONAL section, no NS authority: like Consul
    tcp-clients 10000;              // default 150: bench runs of builds that held a connection per line
    $querylog
};
controls { };
zone "consul" {
    type primary;
    file "$d/consul.zone";
    allow-update { 127.0.0.1; };
};
EOF
    # Consul-shaped: TTL 0, SRV priority 1, target <hex-ip>.addr.<dc>.consul. + its A record.
    cat >"$d/consul.zone" <<EOF
\$TTL 0
@   IN SOA ns.consul. hostmaster.consul. 1 3600 600 86400 0
@   IN NS  ns.consul.
ns  IN A   127.0.0.1
$STANDIN_TARGET. IN A 127.0.0.1
$3
EOF
    STANDIN_NAMED=$(command -v named || echo /usr/sbin/named)
    # Debian/Ubuntu's AppArmor profile for /usr/sbin/named forbids reading a temp dir;
    # a copy of the binary under another path is not confined by it.
    if grep -qs 'named (enforce)' /sys/kernel/security/apparmor/profiles 2>/dev/null; then
        cp "$STANDIN_NAMED" "$d/named"
        STANDIN_NAMED=$d/named
    fi
}

standin_dns_start() {
    local d=$STANDIN_DNS_DIR _
    "$STANDIN_NAMED" -4 -g -n 1 -c "$d/named.conf" >>"$d/named.log" 2>&1 &
    STANDIN_DNS_PID=$!
    for _ in $(seq 50); do
        if dig @127.0.0.1 -p "$STANDIN_DNS_PORT" +tcp +time=1 +tries=1 +short SOA consul. 2>/dev/null | grep -q .; then
            return 0
        fi
        if ! kill -0 "$STANDIN_DNS_PID" 2>/dev/null; then
            echo "named exited; see $d/named.log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "named did not answer on 127.0.0.1:$STANDIN_DNS_PORT within 5 s; see $d/named.log" >&2
    return 1
}

standin_dns_stop() {
    [ -n "$STANDIN_DNS_PID" ] || return 0
    standin_stop_pid "$STANDIN_DNS_PID" child
    STANDIN_DNS_PID=
}

standin_nsupdate() {
    { echo "server 127.0.0.1 $STANDIN_DNS_PORT"; echo "zone consul."; echo "check-names off"
      printf '%s\n' "$@"; echo "send"; } | nsupdate
}

standin_redis_start() { # DIR PORT
    local d=$1 p=$2 _
    redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --dir "$d" --pidfile "$d/redis-$p.pid" --logfile "$d/redis-$p.log"
    for _ in $(seq 50); do
        [ -s "$d/redis-$p.pid" ] && redis-cli -p "$p" ping 2>/dev/null | grep -q PONG && break
        sleep 0.1
    done
    if [ ! -s "$d/redis-$p.pid" ]; then
        echo "redis-server on port $p did not start; see $d/redis-$p.log" >&2
        return 1
    fi
    STANDIN_REDIS_PIDS+=("$(cat "$d/redis-$p.pid")")
}

standin_web_start() {   # DIR PORT BODY: an HTTP server on 127.0.0.1:PORT whose / answers BODY
    local d=$1/www-$2
    mkdir -p "$d" && printf '%s\n' "$3" >"$d/index.html"
    python3 -m http.server "$2" --bind 127.0.0.1 --directory "$d" >"$1/web-$2.log" 2>&1 &
    STANDIN_WEB_PIDS+=("$!")
}

standin_stop_all() {
    local pid
    for pid in "${STANDIN_REDIS_PIDS[@]}"; do standin_stop_pid "$pid"; done
    STANDIN_REDIS_PIDS=()
    for pid in "${STANDIN_WEB_PIDS[@]}"; do standin_stop_pid "$pid" child; done
    STANDIN_WEB_PIDS=()
    standin_dns_stop
}
