#!/usr/bin/env bash
# api= lines against DNS lines (bench/api.py): propagation p50/p99 from a change at the
# agent (the Consul API double, or BIND for DNS lines at interval=1s and 100ms) to the
# first connection through nginx that reflects it; requests per line per idle minute;
# worker 0's CPU. About 8 minutes on 2 cores; --quick: about 2, report in bench/out/.
# Not part of .ci/run. Builds the release module and bench/responder unless
# BENCH_NO_BUILD=1; runs in a private network namespace (every address is loopback).
#
#   bench/api.sh [--quick] [--changes N] [--lines N] [--idle SECONDS]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
if [ -z "${BENCH_API_NETNS:-}" ]; then
    exec env BENCH_API_NETNS=1 unshare -n sh -c 'ip link set lo up && exec "$@"' sh bash "$0" "$@"
fi
export PATH="$PATH:/usr/sbin:/sbin"
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    cargo build --release --quiet
    cargo build --release --quiet --manifest-path bench/responder/Cargo.toml --target-dir "$target/bench-responder"
fi
module=$target/release/libngx_stream_consul_upstream_module.so
# shellcheck disable=SC2012
nginx=$(ls -1t "$target"/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n 1)
responder=$target/bench-responder/release/bench-responder
[ -f "$module" ] && [ -x "$nginx" ] && [ -x "$responder" ] || { echo "api.sh: build first (cargo build --release)" >&2; exit 1; }
exec python3 "$here/api.py" --nginx "$nginx" --module "$module" --responder "$responder" "$@"
