#!/usr/bin/env bash
# Installs everything the demo, the test suite and the benchmarks need, idempotently:
# Debian packages (nginx build deps, BIND, redis, Perl), Test::Nginx from Debian sid,
# the prometheus_client Python package from PyPI (t/030-status.t parses the metrics with it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# gdb: t/015-writer-death.t and t/020-faults.t kill worker 0 at a breakpoint
# inside a zone write. openssl: t/043-tls-sessions.t's certificate and TLS backend.
# wrk: the http bench (bench/run.sh --http).
pkgs=(build-essential pkg-config libclang-dev libpcre2-dev libssl-dev zlib1g-dev
      bind9 bind9-dnsutils redis-server redis-tools perl libipc-run-perl iproute2 psmisc procps gdb
      openssl wrk curl
      liblist-moreutils-perl libtext-diff-perl libhttp-message-perl liburi-perl
      libwww-perl python3 python3-pip)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq

    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Test::Nginx is not in bookworm; Debian sid's arch-all package works with bookworm's Perl.
if ! perl -MTest::Nginx::Socket -e1 2>/dev/null; then
    echo "setup: installing Test::Nginx from Debian sid"
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(CODENAME)' \
        | awk '$2 == "bookworm" && $1 !~ /security/ {print $1; exit}')
    [ -n "$mirror" ] || { echo "setup: no bookworm mirror in apt sources" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
    echo "deb [trusted=yes] ${mirror%/} sid main" >"$tmp/sid.list"
    aptopts=(-o "Dir::Etc::sourcelist=$tmp/sid.list" -o Dir::Etc::sourceparts=- \
             -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" \
             -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
    apt-get "${aptopts[@]}" update -qq
    (cd "$tmp" && apt-get "${aptopts[@]}" download libtest-nginx-perl)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tmp"/libtest-nginx-perl_*_all.deb >/dev/null
fi

# prometheus_client, pinned, into t/python (not the system's Python: Debian's is
# externally managed); t/lib/promparse.py puts that directory on its path.
pydir="$root/t/python"
if ! PYTHONPATH="$pydir" python3 -c 'import prometheus_client' 2>/dev/null; then
    echo "setup: installing prometheus_client into $pydir"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --target "$pydir" 'prometheus-client==0.26.0'
fi

# BIND's and redis's packaged services are not wanted: tests start their own on loopback.
for svc in named redis-server; do
    if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then
        systemctl stop "$svc" || true
    fi
done
echo "setup: done"
