#!/usr/bin/env bash
# The Test::Nginx suite with every nginx process under valgrind's memcheck
# (Test::Nginx's TEST_NGINX_USE_VALGRIND), nginx's own known noise suppressed
# by t/valgrind.suppress. Not part of CI (see t/README.md for the result).
#
#   scripts/valgrind.sh                        the whole suite
#   TEST_FILES="t/001-balance.t" scripts/valgrind.sh
#
# One log per process in $VALGRIND_DIR (default /tmp/ngx-consul-valgrind); the
# summary lists every process that reported an error or a leak. Exits 1 if any did.
# Timing-sensitive tests may fail under valgrind's slowdown: that is reported by
# prove separately and is not a memory error.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"

command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
[ -z "${SKIP_BUILD:-}" ] && cargo build --quiet

dir=${VALGRIND_DIR:-/tmp/ngx-consul-valgrind}
rm -rf "$dir" && mkdir -p "$dir"
export TEST_NGINX_USE_VALGRIND="--tool=memcheck --leak-check=full --show-possibly-lost=no \
--num-callers=40 --suppressions=$(pwd)/t/valgrind.suppress --log-file=$dir/vg.%p.log"

# shellcheck disable=SC2206
files=(${TEST_FILES:-t/})
t0=$SECONDS
if [ "${NGX_CONSUL_NETNS:-1}" != 0 ] && unshare -n sh -c 'ip link set lo up' 2>/dev/null; then
    unshare -n sh -c 'ip link set lo up && exec "$@"' sh prove -I t/lib -r "${files[@]}"
else
    prove -I t/lib -r "${files[@]}"
fi
prove_rc=$?

logs=$(find "$dir" -name 'vg.*.log' | wc -l)
bad=$(find "$dir" -name 'vg.*.log' -size +0 | sort)
echo
echo "valgrind: $logs nginx processes in $((SECONDS - t0)) s (prove exit code $prove_rc)"
if [ -z "$bad" ]; then
    echo "valgrind: no memory error and no leak reported (logs: $dir)"
    exit 0
fi
echo "valgrind: $(echo "$bad" | wc -l) processes reported errors or leaks:"
for f in $bad; do
    echo "--- $f"
    head -n 60 "$f"
done
exit 1
