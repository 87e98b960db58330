#!/usr/bin/env bash
# CI: the whole Test::Nginx suite again, against Debian 12's packaged nginx
# (/usr/sbin/nginx, a --with-debug build with stream as a dynamic module) and the
# module scripts/ci/packaged-nginx.sh built for it. Test::Nginx writes
# `error_log ... debug`, so this is also the debug-level run.
#
#   NGX_CONSUL_DEBIAN_LOG_LEVEL=info   another level (TEST_NGINX_LOG_LEVEL)
#   TEST_FILES=..., PROVE_ARGS=...     as for scripts/test.sh
#
# First a 3-second smoke run (two workers, a consul_upstream line, debug level): when
# a worker dies there, the suite would only wait for connections that never come, so
# the step stops at once with the error log's crash lines.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
nginx=/usr/sbin/nginx
stream_so=/usr/lib/nginx/modules/ngx_stream_module.so
module=${CARGO_TARGET_DIR:-$root/target}/module/debian/ngx_stream_consul_upstream_module.so
level=${NGX_CONSUL_DEBIAN_LOG_LEVEL:-debug}
[ -x "$nginx" ] && [ -f "$stream_so" ] || { echo "prove-debian: run scripts/ci/packaged-nginx.sh first" >&2; exit 1; }
[ -f "$module" ] || { echo "prove-debian: no module at $module (scripts/ci/packaged-nginx.sh builds it)" >&2; exit 1; }

# ---------------------------------------------------------------- smoke
smoke=$(mktemp -d)
trap 'rm -rf "$smoke"' EXIT
mkdir -p "$smoke/logs"
cat >"$smoke/nginx.conf" <<EOF
load_module $stream_so;
load_module $module;
worker_processes 2;
error_log $smoke/logs/error.log $level;
pid $smoke/logs/nginx.pid;
events { }
stream {
    upstream smoke {
        # nothing answers on port 9: discovery's timers and retries run anyway
        consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:9 interval=200ms timeout=100ms;
    }
    server { listen 127.0.0.1:16399; proxy_pass smoke; }
}
EOF
unshare -n sh -c 'ip link set lo up && "$1" -p "$2/" -c "$2/nginx.conf" && sleep 3 && "$1" -p "$2/" -c "$2/nginx.conf" -s quit 2>/dev/null' \
    sh "$nginx" "$smoke" || true
sleep 0.5
if grep -qE 'exited on signal|panicked' "$smoke/logs/error.log"; then
    echo "prove-debian: Debian's nginx at error_log $level: workers die within 3 s (so the suite is not run):"
    grep -m 5 -E 'exited on signal|panicked' "$smoke/logs/error.log"
    exit 1
fi
echo "prove-debian: smoke run at $level: no worker died in 3 s"

# ---------------------------------------------------------------- the suite
export TEST_NGINX_BINARY=$nginx NGX_CONSUL_MODULE=$module NGX_CONSUL_EXTRA_MODULES=$stream_so
export TEST_NGINX_LOG_LEVEL=$level
prove_cmd=(prove -I t/lib -r)
# shellcheck disable=SC2206
prove_cmd+=(${PROVE_ARGS:-} ${TEST_FILES:-t/})
exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "${prove_cmd[@]}"
