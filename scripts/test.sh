#!/usr/bin/env bash
# The whole test run (README's test command; .ci/run runs exactly this):
#   packages (scripts/setup.sh), cargo build, cargo test --workspace,
#   cargo fmt --check, cargo clippy -D warnings (when clippy is installed),
#   a fuzz smoke run (scripts/fuzz.sh: each cargo fuzz target for a few seconds),
#   then the Test::Nginx suite: prove -I t/lib -r t/ (t/020-faults.t prints the
#   fault figures: "fault: ... connections tried N / failed M")
#
# Environment:
#   NGX_CONSUL_PROFILE=release   build and test target/release (default: debug)
#   NGX_CONSUL_DNS_PORT=N        BIND's port in the suite (default 8600)
#   PROVE_ARGS="-v"              extra prove arguments; TEST_FILES="t/001-balance.t" to narrow
#   SKIP_SETUP=1                 do not run scripts/setup.sh
#   NGX_CONSUL_NETNS=0           run prove in the host's network namespace
#   NGX_CONSUL_FUZZ_SECONDS=N    seconds per fuzz target in the smoke run (default 5, 0: skip)
# Exits non-zero when any step fails; leaves no daemon running.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

[ -d "$HOME/.cargo/bin" ] && case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) PATH="$HOME/.cargo/bin:$PATH" ;; esac
export PATH CARGO_TERM_COLOR=never

profile=${NGX_CONSUL_PROFILE:-debug}
cargo_flags=()
[ "$profile" = release ] && cargo_flags+=(--release)
export NGX_CONSUL_PROFILE=$profile

failed=()
step() {
    local name=$1; shift
    echo
    echo "=== $name: $*"
    local t0=$SECONDS
    if "$@"; then
        echo "=== $name: ok ($((SECONDS - t0)) s)"
    else
        echo "=== $name: FAILED ($((SECONDS - t0)) s)"
        failed+=("$name")
        return 1
    fi
}

# Daemons the suite starts are stopped by its own END blocks; this catches
# what a killed prove leaves behind (only runs whose perl process is gone).
cleanup() {
    local pidfile pid dir owner
    if [ -f "$root/t/servroot/logs/nginx.pid" ]; then
        pid=$(cat "$root/t/servroot/logs/nginx.pid" 2>/dev/null)
        if [ -n "$pid" ] && grep -qa nginx "/proc/$pid/cmdline" 2>/dev/null; then
            kill -QUIT "$pid" 2>/dev/null; sleep 0.5; kill -KILL "$pid" 2>/dev/null
        fi
    fi
    for dir in "${NGX_CONSUL_TEST_DIR:-/tmp/ngx-consul-test}"/run-*; do
        [ -d "$dir" ] || continue
        owner=${dir##*/run-}
        if [ -d "/proc/$owner" ] && grep -qaE 'perl|prove' "/proc/$owner/cmdline" 2>/dev/null; then
            continue
        fi
        for pidfile in "$dir"/*.pid "$dir"/*/*.pid; do
            [ -f "$pidfile" ] || continue
            pid=$(cat "$pidfile" 2>/dev/null)
            [ -n "$pid" ] || continue
            if grep -qaE 'named|redis-server' "/proc/$pid/cmdline" 2>/dev/null; then
                echo "cleanup: stopping leftover $(tr '\0' ' ' <"/proc/$pid/cmdline") (pid $pid)"
                kill -TERM "$pid" 2>/dev/null
            fi
        done
        rm -rf "$dir"
    done
}
trap cleanup EXIT

if [ -z "${SKIP_SETUP:-}" ]; then
    step setup bash scripts/setup.sh || exit 1
fi

step build cargo build "${cargo_flags[@]}" || { echo "build failed: nothing to test"; exit 1; }

step unit-tests cargo test --workspace "${cargo_flags[@]}"

if cargo fmt --version >/dev/null 2>&1; then
    step fmt cargo fmt --all --check -- --color never
else
    echo "=== fmt: rustfmt not installed, skipped"
fi

if cargo clippy --version >/dev/null 2>&1; then
    step clippy cargo clippy --workspace "${cargo_flags[@]}" -- -D warnings
else
    echo "=== clippy: not installed, skipped"
fi

# Fuzz smoke: builds the cargo fuzz targets and runs each briefly (the long,
# documented run is scripts/fuzz.sh with its default 600 s per target).
fuzz_seconds=${NGX_CONSUL_FUZZ_SECONDS:-5}
if [ "$fuzz_seconds" != 0 ]; then
    step fuzz-smoke bash scripts/fuzz.sh "$fuzz_seconds"
fi

# The suite binds fixed loopback ports (BIND 8600, redis 6380-6390, nginx
# 1984/1985): run it in a private network namespace when possible, so that
# nothing else on the machine can collide with it (NGX_CONSUL_NETNS=0: don't).
prove_cmd=(prove -I t/lib -r)
# shellcheck disable=SC2206
prove_cmd+=(${PROVE_ARGS:-} ${TEST_FILES:-t/})
if [ "${NGX_CONSUL_NETNS:-1}" != 0 ] && unshare -n sh -c 'ip link set lo up' 2>/dev/null; then
    step prove unshare -n sh -c 'ip link set lo up && exec "$@"' sh "${prove_cmd[@]}"
else
    step prove "${prove_cmd[@]}"
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
