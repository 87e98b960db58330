#!/usr/bin/env bash
# The whole test run (README's test command; .ci/run runs exactly this), one step each:
#   setup        packages (scripts/setup.sh)
#   build        cargo build (module + vendored nginx 1.28.3)
#   unit-tests   cargo test --workspace
#   fmt, clippy  cargo fmt --check, cargo clippy -D warnings (when installed)
#   msrv         Cargo.toml's rust-version is at least what every locked crate needs
#   fuzz-smoke   scripts/fuzz.sh: each cargo fuzz target for a few seconds
#   prove        the Test::Nginx suite on the vendored nginx: prove -I t/lib -r t/
#                (t/020-faults.t prints "fault: ... connections tried N / failed M")
#   config-fuzz  scripts/config-fuzz.pl: 60 generated configurations through nginx -t,
#                the accepted ones started and sent connections and HTTP requests (about 1.5 min)
#   demo         scripts/demo.sh --short (the README's first command)
#   debian-nginx Debian's packaged nginx + scripts/build-module.sh for it
#   prove-debian the suite again on Debian's nginx, at debug level (scripts/ci/prove-debian.sh)
#   deb          scripts/package-deb.sh: install, nginx -t, one connection, remove, purge
#   docker       the Dockerfile built with buildah and run (scripts/ci/check-docker.sh)
# The summary at the end lists each step with its time.
#
# Environment:
#   NGX_CONSUL_PROFILE=release   build and test target/release (default: debug)
#   NGX_CONSUL_DNS_PORT=N        BIND's port in the suite (default 8600)
#   PROVE_ARGS="-v"              extra prove arguments; TEST_FILES="t/001-balance.t" to narrow
#                                (both also apply to prove-debian)
#   SKIP_SETUP=1                 do not run scripts/setup.sh
#   SKIP_STEPS="docker deb"      leave these steps out (names as above)
#   NGX_CONSUL_NETNS=0           run prove in the host's network namespace
#   NGX_CONSUL_FUZZ_SECONDS=N    seconds per fuzz target in the smoke run (default 5, 0: skip)
#   NGX_CONSUL_CONFIG_FUZZ_COUNT=N  configurations in the config-fuzz step (default 60, 0: skip);
#                                NGX_CONSUL_CONFIG_FUZZ_SEED=S replays a run
# Exits non-zero when any step fails; leaves no daemon running.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

export CARGO_TERM_COLOR=never
# shellcheck source=scripts/lib/rust.sh
. scripts/lib/rust.sh

profile=${NGX_CONSUL_PROFILE:-debug}
cargo_flags=()
[ "$profile" = release ] && cargo_flags+=(--release)
export NGX_CONSUL_PROFILE=$profile

failed=()
summary=()
step() {
    local name=$1; shift
    case " ${SKIP_STEPS:-} " in
        *" $name "*) echo; echo "=== $name: skipped (SKIP_STEPS)"; summary+=("$(printf '%-13s skipped' "$name")"); return 0 ;;
    esac
    echo
    echo "=== $name: $*"
    local t0=$SECONDS rc=0
    "$@" || rc=$?
    local took=$((SECONDS - t0))
    local cost
    cost=$(printf '%d:%02d' $((took / 60)) $((took % 60)))
    if [ "$rc" -eq 0 ]; then
        echo "=== $name: ok ($took s)"
        summary+=("$(printf '%-13s ok      %6s' "$name" "$cost")")
    else
        echo "=== $name: FAILED ($took s)"
        summary+=("$(printf '%-13s FAILED  %6s' "$name" "$cost")")
        failed+=("$name")
        return 1
    fi
}
# Cargo.toml's rust-version against the newest rust-version of the locked crates.
msrv() {
    local declared needed
    declared=$(rust_required)
    needed=$(cargo metadata --format-version 1 --locked 2>/dev/null | perl -MJSON::PP -e '
        my $m = decode_json(join "", <STDIN>);
        my %used = map { $_->{id} => 1 } @{ $m->{resolve}{nodes} };
        delete @used{ @{ $m->{workspace_members} } };    # ours declare it
        my ($max, $who) = ("0", "");
        for my $p (grep { $used{$_->{id}} && $_->{rust_version} } @{ $m->{packages} }) {
            my @a = split /\./, $p->{rust_version}; my @b = split /\./, $max;
            my $gt = ($a[0] <=> $b[0]) || (($a[1] // 0) <=> ($b[1] // 0)) || (($a[2] // 0) <=> ($b[2] // 0));
            ($max, $who) = ($p->{rust_version}, "$p->{name} $p->{version}") if $gt > 0;
        }
        print "$max ($who)\n";')
    echo "Cargo.toml rust-version $declared; the locked crates need ${needed:-?}"
    rust_version_ok "$declared" "${needed%% *}"
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

ensure_rust test
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

step msrv msrv

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

# Generated configurations (scripts/config-fuzz.pl; its own private network
# namespace, like prove's): no crash, hang or worker death. The long run is
# the script's default (2000 configurations).
config_fuzz_count=${NGX_CONSUL_CONFIG_FUZZ_COUNT:-60}
if [ "$config_fuzz_count" != 0 ]; then
    config_fuzz=(perl scripts/config-fuzz.pl --count "$config_fuzz_count")
    [ -n "${NGX_CONSUL_CONFIG_FUZZ_SEED:-}" ] && config_fuzz+=(--seed "$NGX_CONSUL_CONFIG_FUZZ_SEED")
    if [ "${NGX_CONSUL_NETNS:-1}" = 0 ]; then
        step config-fuzz env NGX_CONSUL_CONFIG_FUZZ_NETNS=host "${config_fuzz[@]}"
    else
        step config-fuzz "${config_fuzz[@]}"
    fi
fi

# The README's first command, short (20 connections per step; release build).
step demo env SKIP_SETUP=1 bash scripts/demo.sh --short

# Debian 12's packaged nginx (--with-debug, stream as a dynamic module): the module
# built for it by scripts/build-module.sh, the suite again (debug level), the .deb.
if step debian-nginx bash scripts/ci/packaged-nginx.sh; then
    step prove-debian bash scripts/ci/prove-debian.sh
    step deb bash scripts/ci/check-deb.sh
fi

# The Dockerfile, built with buildah (no Docker engine here) and run.
step docker bash scripts/ci/check-docker.sh

echo
echo "=== summary (step, result, minutes:seconds)"
printf '    %s\n' "${summary[@]}"
echo "    total          $(printf '%d:%02d' $((SECONDS / 60)) $((SECONDS % 60)))"
echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
