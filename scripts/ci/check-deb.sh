#!/usr/bin/env bash
# CI: the Debian package on Debian's packaged nginx (after scripts/ci/packaged-nginx.sh):
#   dpkg -i; files and the modules-enabled order; nginx -t with Debian's own
#   /etc/nginx/nginx.conf plus a stream{} include using consul_upstream and an http
#   upstream dropped into its conf.d/; one Redis connection and one HTTP request over
#   upstream keepalive proxied through them (BIND standing in for Consul, redis and a
#   Python HTTP server, on loopback); the http upstream's state= file in the package's
#   /var/lib/nginx/consul, written by a worker (www-data);
#   dpkg -r (module disabled, nginx -t still passes, state files kept); reinstall
#   (enabled again); dpkg -P: nothing of the package is left, state files neither.
# Runs itself in a private network namespace (Debian's default site listens on port 80).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${CHECK_DEB_NETNS:-}" ]; then
    exec env CHECK_DEB_NETNS=1 unshare -n sh -c 'ip link set lo up && exec "$@"' sh bash "$0" "$@"
fi
export PATH="$PATH:/usr/sbin:/sbin"
# shellcheck source=scripts/lib/standin.sh
. "$root/scripts/lib/standin.sh"

name=libnginx-mod-stream-consul-upstream
so_path=/usr/lib/nginx/modules/ngx_stream_consul_upstream_module.so
snippet=/usr/share/nginx/modules-available/mod-stream-consul-upstream.conf
link=/etc/nginx/modules-enabled/70-mod-stream-consul-upstream.conf
query=redis.service.yunlu_office.consul
http_query=api.service.yunlu_office.consul
http_conf=/etc/nginx/conf.d/zz-ngx-consul-check.conf   # Debian's http{} includes conf.d/*.conf
state_dir=/var/lib/nginx/consul                        # the package's, for state= files
state_file=$state_dir/zz-ngx-consul-check.state
target=${CARGO_TARGET_DIR:-$root/target}

fails=0
ok()   { echo "ok - $*"; }
fail() { echo "not ok - $*"; fails=$((fails + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }

tmp=$(mktemp -d)
started=''
cleanup() {
    set +e
    [ -n "$started" ] && /usr/sbin/nginx -c "$tmp/nginx.conf" -s stop 2>/dev/null
    standin_stop_all
    rm -f "$http_conf"
    dpkg -P "$name" >/dev/null 2>&1
    rm -rf "$tmp"
}
trap cleanup EXIT

bash "$root/scripts/package-deb.sh" --so "$target/module/debian/ngx_stream_consul_upstream_module.so" >"$tmp/package.log" \
    || { cat "$tmp/package.log"; exit 1; }
deb=$(sed -n 's/^package-deb: built //p' "$tmp/package.log")
echo "# $deb"
dpkg-deb -f "$deb" Depends | sed 's/^/# Depends: /'

# ---------------------------------------------------------------- install
dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; exit 1; }
check "installed: $so_path" test -f "$so_path"
check "installed: $snippet" grep -qx 'load_module modules/ngx_stream_consul_upstream_module.so;' "$snippet"
check "enabled: $link -> $snippet" test "$(readlink "$link")" = "$snippet"
check "installed: $state_dir, owned by www-data" test "$(stat -c %U "$state_dir" 2>/dev/null)" = www-data
order=$(cd /etc/nginx/modules-enabled && ls -1 -- *.conf | tr '\n' ' ')
case " $order" in
    *" 50-mod-stream.conf "*"70-mod-stream-consul-upstream.conf "*) ok "loaded after the stream module: $order" ;;
    *) fail "load order: $order" ;;
esac

# Debian's own nginx.conf, included unchanged, plus a stream{} block of ours.
cat >"$tmp/nginx.conf" <<EOF
include /etc/nginx/nginx.conf;
error_log $tmp/error.log notice;
stream {
    upstream redis {
        consul_upstream $query resolver=127.0.0.1:8600 interval=1s;
    }
    server {
        listen 127.0.0.1:6379;
        proxy_pass redis;
    }
}
EOF
cat >"$http_conf" <<EOF
upstream api {
    consul_upstream $http_query resolver=127.0.0.1:8600 interval=1s state=$state_file;
    keepalive 4;
}
server {
    listen 127.0.0.1:8081;
    location / {
        proxy_pass http://api;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }
}
EOF
check "nginx -t: Debian's nginx.conf + a consul_upstream stream{} and http upstream" /usr/sbin/nginx -t -q -c "$tmp/nginx.conf"

# ---------------------------------------------------------------- one connection
standin_dns_setup "$tmp/bind" 8600 "$(standin_srv "$query" 1 6380)
$(standin_srv "$http_query" 1 8082)"
standin_dns_start
standin_redis_start "$tmp" 6380
standin_web_start "$tmp" 8082 "from the api backend"
/usr/sbin/nginx -c "$tmp/nginx.conf"     # Debian's settings: daemon, pid /run/nginx.pid
started=1
for _ in $(seq 50); do
    grep -qE "$(consul_log_set "$query")" "$tmp/error.log" 2>/dev/null && break
    sleep 0.1
done
check "the module logged its peer set" grep -qE "$(consul_log_set "$query")" "$tmp/error.log"
port=$(redis-cli -h 127.0.0.1 -p 6379 --raw CONFIG GET port 2>&1 | tail -n 1 || true)
check "a Redis connection through nginx reached 127.0.0.1:6380 (got: $port)" test "$port" = 6380
check "the module logged the http upstream's peer set" grep -qE "$(consul_log_set "$http_query" http)" "$tmp/error.log"
body=''
for _ in $(seq 50); do
    body=$(curl -s --max-time 2 http://127.0.0.1:8081/ || true)
    [ "$body" = "from the api backend" ] && break
    sleep 0.1
done
check "an HTTP request through nginx's http upstream reached 127.0.0.1:8082 (got: $body)" \
    test "$body" = "from the api backend"
for _ in $(seq 50); do grep -q 8082 "$state_file" 2>/dev/null && break; sleep 0.1; done
check "the http upstream's state file holds its peer: $state_file" grep -q 8082 "$state_file"
check "... written by a worker (www-data)" test "$(stat -c %U "$state_file" 2>/dev/null)" = www-data
if grep -q 'cannot save state file' "$tmp/error.log"; then
    fail "state file not saved:"; grep 'cannot save state file' "$tmp/error.log"
else ok "no \"cannot save state file\" in the error log"; fi
if ! grep -qE '\[(alert|emerg|crit)\]' "$tmp/error.log"; then ok "no alert/crit in the error log"
else fail "alert/crit in the error log:"; grep -E '\[(alert|emerg|crit)\]' "$tmp/error.log"; fi
/usr/sbin/nginx -c "$tmp/nginx.conf" -s quit 2>/dev/null || true
for _ in $(seq 50); do [ -e /run/nginx.pid ] || break; sleep 0.1; done
started=''

standin_stop_all
rm -f "$http_conf"

# ---------------------------------------------------------------- remove, reinstall, purge
dpkg -r "$name" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; exit 1; }
check "removed: no $so_path" test ! -e "$so_path"
check "removed: no $snippet" test ! -e "$snippet"
check "removed: the module is not enabled" test ! -e "$link" -a ! -L "$link"
left=$(ls -d /etc/nginx/modules-enabled/*consul* /usr/share/doc/$name 2>/dev/null || true)
check "removed: nothing left${left:+ (left: $left)}" test -z "$left"
check "removed: no marker left in /run" test -z "$(ls /run/*consul* 2>/dev/null)"
check "removed: nginx -t passes with Debian's nginx.conf" /usr/sbin/nginx -t -q
check "removed: the state files are kept ($state_file)" test -f "$state_file"
dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; exit 1; }
check "reinstalled: enabled again" test "$(readlink "$link")" = "$snippet"
check "reinstalled: no marker left in /run" test -z "$(ls /run/*consul* 2>/dev/null)"
# An upgrade (the same version again) keeps the administrator's own disabling.
rm "$link"
dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; exit 1; }
check "upgraded: still disabled, as the administrator left it" test ! -e "$link" -a ! -L "$link"
dpkg -P "$name" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; exit 1; }
left=$(ls -d "$so_path" "$snippet" /etc/nginx/modules-enabled/*consul* /usr/share/doc/$name 2>/dev/null || true)
check "purged: nothing left${left:+ (left: $left)}" test -z "$left"
check "purged: dpkg does not know $name" test -z "$(dpkg-query -W -f='${Status}' "$name" 2>/dev/null)"
check "purged: no $state_dir" test ! -e "$state_dir"
check "purged: nginx -t passes with Debian's nginx.conf" /usr/sbin/nginx -t -q

echo
if [ "$fails" -ne 0 ]; then
    echo "check-deb: $fails check(s) failed"
    exit 1
fi
echo "check-deb: all checks passed"
