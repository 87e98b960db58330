#!/usr/bin/env bash
# Benchmark harness for ngx-consul (issue 4).
#
#   bench/run.sh            full run (a few minutes on 2 cores)
#   bench/run.sh --quick    smoke run (2 and 1,000 peers, fewer slices and changes; about
#                           1.5 minutes; writes its report to bench/out/, not over bench/RESULTS.md)
#   bench/run.sh --skip-methods   without the balancing methods' run (bench/methods.py: least_conn,
#                           hash, random... static against consul_upstream at 2, 1,000 and 10,000
#                           peers; about 10 more minutes in a full run)
#   Extra arguments go to bench/bench.py, e.g. --sizes 2,100 --pairs 40 --slice 0.25 --changes 30 --skip-e2e
#   BENCH_NO_BUILD=1        skip the cargo builds (use what is in target/)
#   bench/run.sh --http [--quick]   the http bench instead (bench/http.py, issue 17): wrk against a
#                           static http upstream and consul_upstream, 2 and 1,000 peers, keepalive 64;
#                           options after --http go to http.py (--sizes 2 --methods rr --pairs 3 ...)
#
# Builds in release mode, runs the selection micro-bench, starts a loopback backend with one
# listener per peer, BIND 9 standing in for Consul's DNS interface, and nginx in three setups
# (static round robin, nginx's own `resolve`, this module), and writes bench/RESULTS.md,
# bench/results.csv and bench/plot.png. Needs scripts/setup.sh (bind9, dnsutils)
# and python3 with matplotlib (installed with pip if missing). Run as root or as a user that
# may raise its open-file limit. Everything listens on 127.0.0.0/8.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in /*) ;; *) target=$root/$target ;; esac

quick=()
methods=1
args=()
http=
for a in "$@"; do
    case "$a" in
        --http) http=1 ;;
        --quick) quick=(--quick); args+=("$a") ;;
        --skip-methods) methods= ;;
        *) args+=("$a") ;;
    esac
done

for tool in named nsupdate dig python3 cargo; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool not found (run scripts/setup.sh)" >&2; exit 1; }
done

if [ -n "$http" ]; then
    command -v wrk >/dev/null || { echo "run.sh: wrk not found (run scripts/setup.sh)" >&2; exit 1; }
    if [ -z "${BENCH_NO_BUILD:-}" ]; then
        cargo build --release || echo "run.sh: cargo build --release failed; (c) will not be measured" >&2
        cargo build --release --quiet --manifest-path bench/responder/Cargo.toml --target-dir "$target/bench-responder"
    fi
    nginx=$(ls -td "$target"/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n1 || true)
    [ -x "$nginx" ] || { echo "run.sh: no nginx binary under $target/release/build/nginx-sys-*/out/objs" >&2; exit 1; }
    module=$target/release/libngx_stream_consul_upstream_module.so
    [ -f "$module" ] || module=
    ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    exec python3 "$here/http.py" --nginx "$nginx" --module "$module" \
        --responder "$target/bench-responder/release/bench-responder" "${args[@]}"
fi
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install -q matplotlib

mkdir -p "$here/out"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    echo "== cargo build --release"
    if ! cargo build --release; then
        # Do not measure a stale module: (a) and (b) still run with the vendored nginx.
        echo "run.sh: cargo build --release failed; (c) will not be measured" >&2
        no_module=1
    fi
    echo "== building bench/responder (backend and load generator)"
    cargo build --release --quiet --manifest-path bench/responder/Cargo.toml --target-dir "$target/bench-responder"
    echo "== selection micro-bench"
    # Fresh results only (bench.py reads target/criterion/), and a little shelter from other
    # work on the box (nice is ignored where not permitted).
    rm -rf "$target/criterion/pick" "$target/criterion/rebuild"
    quick_arg=()
    [ ${#quick[@]} -gt 0 ] && quick_arg=(-- --quick)
    if nice -n -5 true 2>/dev/null; then niced=(nice -n -5); else niced=(); fi
    # Twice in a full run: bench.py takes the fastest sample of both (criterion keeps the
    # first run as "base"), which evens out the box's second-long slow phases.
    rounds=2
    [ ${#quick[@]} -gt 0 ] && rounds=1
    for round in $(seq "$rounds"); do
        if "${niced[@]}" cargo bench -p ngx-consul-core --bench select "${quick_arg[@]}" >"$here/out/select-$round.log" 2>&1; then
            grep -E '^(pick|rebuild)/.*time:' "$here/out/select-$round.log" || true
        else
            echo "run.sh: the micro-bench failed (see bench/out/select-$round.log); its table stays empty" >&2
            tail -n 20 "$here/out/select-$round.log" >&2
            rm -rf "$target/criterion/pick" "$target/criterion/rebuild"
            break
        fi
    done
fi

nginx=$(ls -td "$target"/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n1 || true)  # newest build
[ -x "$nginx" ] || { echo "run.sh: no nginx binary under $target/release/build/nginx-sys-*/out/objs" >&2; exit 1; }
module=$target/release/libngx_stream_consul_upstream_module.so
[ -f "$module" ] && [ -z "${no_module:-}" ] || module=
responder=$target/bench-responder/release/bench-responder
loader=$target/bench-responder/release/bench-load
[ -x "$responder" ] && [ -x "$loader" ] || { echo "run.sh: $responder or $loader missing" >&2; exit 1; }

# Enough descriptors for 10,000 listeners and nginx's upstream connections.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

python3 "$here/bench.py" --nginx "$nginx" --module "$module" --responder "$responder" --loader "$loader" "${args[@]}"
if [ ${#quick[@]} -gt 0 ]; then dest=$here/out; else dest=$here; fi
python3 "$here/plot.py" "$dest"
echo "== wrote ${dest#$root/}/RESULTS.md, results.csv, plot.png"
if [ -n "$methods" ] && [ -n "$module" ]; then
    echo "== balancing methods: static against consul_upstream (bench/methods.py)"
    python3 "$here/methods.py" --nginx "$nginx" --module "$module" --responder "$responder" --loader "$loader" "${quick[@]}"
    echo "== wrote ${dest#$root/}/METHODS.md, methods.csv"
fi
