#!/usr/bin/env bash
# CI: the Dockerfile, built and run without a Docker engine (buildah --isolation chroot).
#   1. Base images, made here (nothing can be pulled) under the names the FROM lines use:
#        debian:bookworm-slim  debootstrap --variant=minbase bookworm, from the machine's
#                              own Debian mirror, with the machine's apt sources
#        rust:1-bookworm       that + build packages + this machine's Rust toolchain and
#                              its locally added CA certificates (so that cargo reaches
#                              the crate registry inside the build as it does outside)
#      Both are kept and reused by later runs (NGX_CONSUL_REBUILD_BASES=1 remakes them).
#   2. buildah bud on a context of the repository's files plus nginx-<version>.tar.gz
#      packed from the tree the nginx-src crate brings (no download from nginx.org).
#   3. In a private network namespace: nginx -t with the shipped configuration, then the
#      image's nginx started with it and one Redis connection proxied through
#      consul_upstream (BIND standing in for the agent on 127.0.0.1:8600, redis on 6380);
#      then the same with the shipped http example (examples/http.conf: an http upstream
#      with keepalive) and one HTTP request (a Python HTTP server on 8082).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
image=localhost/ngx-consul:ci
say() { printf 'check-docker: %s\n' "$*"; }
die() { printf 'check-docker: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- 3. run (in the namespace)
if [ "${1:-}" = --run ]; then
    # shellcheck source=scripts/lib/standin.sh
    . "$root/scripts/lib/standin.sh"
    query=redis.service.yunlu_office.consul
    http_query=api.service.yunlu_office.consul
    tmp=$(mktemp -d)
    c='' ngx=''
    cleanup() {
        set +e
        [ -n "$c" ] && buildah run --isolation chroot "$c" -- nginx -s quit 2>/dev/null
        [ -n "$ngx" ] && { sleep 0.5; standin_stop_pid "$ngx" child; }
        standin_stop_all
        [ -n "$c" ] && buildah rm "$c" >/dev/null
        rm -rf "$tmp"
    }
    trap cleanup EXIT
    c=$(buildah from --pull-never "$image")
    say "nginx -t in the image (/etc/nginx/nginx.conf = nginx-conf/consul-agent.conf):"
    buildah run --isolation chroot "$c" -- nginx -t
    standin_dns_setup "$tmp/bind" 8600 "$(standin_srv "$query" 1 6380)
$(standin_srv "$http_query" 1 8082)"
    standin_dns_start
    standin_redis_start "$tmp" 6380
    buildah run --isolation chroot "$c" -- nginx -g 'daemon off;' >"$tmp/nginx.log" 2>&1 &
    ngx=$!
    for _ in $(seq 100); do
        grep -qE "$(consul_log_set "$query")" "$tmp/nginx.log" && break
        standin_alive "$ngx" || break
        sleep 0.1
    done
    port=$(redis-cli -h 127.0.0.1 -p 6379 --raw CONFIG GET port 2>&1 | tail -n 1 || true)
    sed 's/^/  nginx: /' "$tmp/nginx.log"
    grep -qE "$(consul_log_set "$query")" "$tmp/nginx.log" \
        || die "the image's nginx did not log the peer set"
    [ "$port" = 6380 ] || die "a connection to the image's nginx on 6379 did not reach redis on 6380 (got: $port)"
    say "one Redis connection through the image's nginx reached 127.0.0.1:6380"
    buildah run --isolation chroot "$c" -- nginx -s quit
    for _ in $(seq 100); do standin_alive "$ngx" || break; sleep 0.1; done
    standin_stop_pid "$ngx" child; ngx=''

    http_conf=/usr/share/doc/ngx-consul/examples/http.conf
    say "nginx -t in the image with $http_conf:"
    buildah run --isolation chroot "$c" -- nginx -t -c "$http_conf"
    standin_web_start "$tmp" 8082 "from the api backend"
    buildah run --isolation chroot "$c" -- nginx -c "$http_conf" -g 'daemon off;' >"$tmp/nginx-http.log" 2>&1 &
    ngx=$!
    body=''
    for _ in $(seq 100); do
        body=$(curl -s --max-time 2 http://127.0.0.1:80/ || true)
        [ "$body" = "from the api backend" ] && break
        standin_alive "$ngx" || break
        sleep 0.1
    done
    sed 's/^/  nginx: /' "$tmp/nginx-http.log"
    grep -qE "$(consul_log_set "$http_query" http)" "$tmp/nginx-http.log" \
        || die "the image's nginx did not log the http upstream's peer set"
    [ "$body" = "from the api backend" ] \
        || die "a request to the image's nginx on port 80 did not reach the backend on 8082 (got: $body)"
    say "one HTTP request through the image's nginx (http upstream, keepalive) reached 127.0.0.1:8082"
    exit 0
fi

# ---------------------------------------------------------------- 1. base images
missing=()
for p in buildah debootstrap; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }
[ -z "${NGX_CONSUL_REBUILD_BASES:-}" ] || buildah rmi -f docker.io/library/rust:1-bookworm docker.io/library/debian:bookworm-slim >/dev/null 2>&1 || true

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! have_image docker.io/library/debian:bookworm-slim; then
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 == "bookworm" {print $1; exit}')
    [ -n "$mirror" ] || die "no bookworm repository in the machine's apt sources"
    t0=$SECONDS
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 20 "$work/debootstrap.log"; die "debootstrap failed"; }
    # the machine's own apt sources (its mirror, security updates), not debootstrap's one line
    rm -f "$work/rootfs/etc/apt/sources.list"
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$work/rootfs/etc/apt/"
    cp -a /etc/apt/sources.list.d/. "$work/rootfs/etc/apt/sources.list.d/" 2>/dev/null || true
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    c=$(buildah from scratch)
    m=$(buildah mount "$c")
    cp -a "$work/rootfs/." "$m/"
    buildah umount "$c" >/dev/null
    buildah config --cmd bash "$c"
    buildah commit --rm -q "$c" docker.io/library/debian:bookworm-slim >/dev/null
    rm -rf "$work/rootfs"
    say "debian:bookworm-slim made with debootstrap in $((SECONDS - t0)) s"
fi

if ! have_image docker.io/library/rust:1-bookworm; then
    command -v rustc >/dev/null || die "no rustc on PATH for the rust:1-bookworm base image"
    sysroot=$(rustc --print sysroot)
    t0=$SECONDS
    c=$(buildah from --pull-never docker.io/library/debian:bookworm-slim)
    buildah run --isolation chroot "$c" -- sh -c 'apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           build-essential curl ca-certificates libclang-dev libpcre2-dev libssl-dev zlib1g-dev >/dev/null 2>&1 \
        && rm -rf /var/lib/apt/lists/*'
    m=$(buildah mount "$c")
    mkdir -p "$m/usr/local/rust/bin" "$m/usr/local/cargo/bin"
    cp -a "$sysroot/bin/cargo" "$sysroot/bin/rustc" "$m/usr/local/rust/bin/"
    cp -a "$sysroot/lib" "$m/usr/local/rust/"
    cp -a /usr/local/share/ca-certificates/. "$m/usr/local/share/ca-certificates/" 2>/dev/null || true
    buildah umount "$c" >/dev/null
    buildah run --isolation chroot "$c" -- update-ca-certificates >/dev/null 2>&1
    buildah config --env CARGO_HOME=/usr/local/cargo \
        --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --label "rust-version=$(rustc --version)" "$c"
    buildah commit --rm -q "$c" docker.io/library/rust:1-bookworm >/dev/null
    say "rust:1-bookworm made ($(rustc --version), from $sysroot) in $((SECONDS - t0)) s"
fi

# ---------------------------------------------------------------- 2. build
ngx_src=$(sed -n '/^name = "nginx-src"/{n;s/^version = "\(.*\)"/\1/p}' "$root/Cargo.lock")
ngx_version=${ngx_src#*+}
crate=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"nginx-src-$ngx_src"/nginx 2>/dev/null | head -n 1)
[ -n "$crate" ] || die "the nginx-src $ngx_src crate is not in the cargo registry (run cargo build first)"
ctx=$work/context
mkdir -p "$ctx"
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$ctx") || die "cannot copy the repository's files into the build context"
tar czf "$ctx/nginx-$ngx_version.tar.gz" -C "$(dirname "$crate")" --transform "s|^nginx|nginx-$ngx_version|" nginx
say "context: the repository's files + nginx-$ngx_version.tar.gz from $crate"
t0=$SECONDS
if ! buildah bud --isolation chroot --pull-never --layers --build-arg "NGINX_VERSION=$ngx_version" \
        -t "$image" -f "$ctx/Dockerfile" "$ctx" >"$work/bud.log" 2>&1; then
    tail -n 60 "$work/bud.log"
    die "buildah bud failed"
fi
grep -E 'STEP [0-9]+/[0-9]+: (FROM|RUN)|^build-module:' "$work/bud.log" | cut -c1-120 | sed 's/^/  /'
say "image $image built in $((SECONDS - t0)) s"
buildah rmi --prune >/dev/null 2>&1 || true     # earlier builds' layers (a few GB each)

# ---------------------------------------------------------------- 3. run
unshare -n sh -c 'ip link set lo up && exec "$@"' sh bash "$0" --run
