#!/usr/bin/env bash
# Builds ngx_stream_consul_upstream_module.so for an nginx you already have, and
# proves that it loads into it.
#
# Usage: scripts/build-module.sh [--nginx BIN] [--source DIR] [--out DIR]
#   --nginx BIN   the nginx that will load the module (default: nginx on PATH, else
#                 /usr/sbin/nginx); its version and configure arguments (nginx -V) are used
#   --source DIR  that version's source tree: an nginx release or git tree, or an
#                 OpenResty bundle (openresty-X.Y.Z.N/, its bundle/nginx-X.Y.Z is used).
#                 Without it: Debian/Ubuntu's source package when BIN comes from one
#                 (apt-get source through a private source list; the machine's apt
#                 configuration is not changed); otherwise the script says what to download.
#   --out DIR     where to put the .so (default target/module/<nginx version>/)
#
# Steps: read BIN's nginx -V; get the source; install the build packages those
# arguments need (apt-get, as root or via sudo); configure the tree with BIN's
# arguments (third-party --add-module/--add-dynamic-module arguments are left out:
# with --with-compat they do not change what a module must match); build with
#   NGINX_BUILD_DIR=<tree>/objs cargo build --release --no-default-features --features export-modules
# (target dir target/build-module, apart from the vendored build); check the result
# with BIN -t on a generated configuration; print the .so path and the load_module lines.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/rust.sh
. "$root/scripts/lib/rust.sh"

say()  { printf 'build-module: %s\n' "$*"; }
die()  { printf 'build-module: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '5,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit "${1:-0}"; }

bin='' src='' out='' pkg=''
while [ $# -gt 0 ]; do
    case $1 in
        --nginx) [ $# -ge 2 ] || usage 2; bin=$2; shift 2 ;;
        --source) [ $# -ge 2 ] || usage 2; src=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || usage 2; out=$2; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "build-module: unknown argument \"$1\"" >&2; usage 2 ;;
    esac
done

# ---------------------------------------------------------------- the target nginx
if [ -z "$bin" ]; then
    bin=$(command -v nginx || true)
    [ -n "$bin" ] || { [ -x /usr/sbin/nginx ] && bin=/usr/sbin/nginx; }
    [ -n "$bin" ] || die "no nginx on PATH: pass --nginx /path/to/sbin/nginx"
fi
[ -x "$bin" ] || bin=$(command -v "$bin" || true)
[ -n "$bin" ] && [ -x "$bin" ] || die "--nginx: \"$bin\" is not an executable"
bin=$(readlink -f "$bin")

info_v=$("$bin" -V 2>&1) || die "$bin -V failed: $info_v"
product=$(printf '%s\n' "$info_v" | sed -n 's|^nginx version: \([^/]*\)/\([^ ]*\).*|\1|p')
version=$(printf '%s\n' "$info_v" | sed -n 's|^nginx version: \([^/]*\)/\([^ ]*\).*|\2|p')
conf_line=$(printf '%s\n' "$info_v" | sed -n 's/^configure arguments: //p')
[ -n "$version" ] || die "cannot read the version from $bin -V: $info_v"

# nginx -V quotes arguments with spaces ('...'); xargs splits them the same way.
args=()
if [ -n "$conf_line" ]; then
    mapfile -t args < <(printf '%s\n' "$conf_line" | xargs -n 1 printf '%s\n')
fi
# shellcheck disable=SC2254  # $1 is a glob on purpose
has_arg() { local a; for a in "${args[@]}"; do case $a in $1) return 0 ;; esac; done; return 1; }
arg_value() { local a; for a in "${args[@]}"; do case $a in "$1"=*) echo "${a#*=}"; return 0 ;; esac; done; return 1; }

say "target: $bin, $product $version"
has_arg '--with-stream*' || die "$bin has no stream module (configured without --with-stream): rebuild nginx with --with-stream"
stream_dynamic=''
has_arg '--with-stream=dynamic' && stream_dynamic=1
if ! has_arg '--with-compat'; then
    say "note: $bin was built without --with-compat: the module loads only because it is"
    say "      configured with exactly the same arguments (keep them when you rebuild nginx)"
fi
modules_path=$(arg_value --modules-path || true)
if [ -z "$modules_path" ]; then
    prefix=$(arg_value --prefix || echo /usr/local/nginx)
    modules_path=$prefix/modules
fi

no_source() {   # what to download when there is no source to use
    local url dir
    case $product in
        openresty) url="https://openresty.org/download/openresty-$version.tar.gz"; dir="openresty-$version" ;;
        *) url="https://nginx.org/download/nginx-$version.tar.gz"; dir="nginx-$version" ;;
    esac
    die "no source for $product $version: download $url, unpack it (tar xzf), and run: scripts/build-module.sh --nginx $bin --source ./$dir"
}
# Without --source, only a Debian/Ubuntu package's nginx has a source we can fetch.
if [ -z "$src" ] && ! { command -v dpkg >/dev/null && dpkg -S "$bin" >/dev/null 2>&1; }; then
    no_source
fi

# ---------------------------------------------------------------- packages
# The nginx build's own packages, from the arguments (names are Debian/Ubuntu's).
pkgs=(build-essential libclang-dev libpcre2-dev zlib1g-dev)
has_arg '--with-*ssl*' && pkgs+=(libssl-dev)
has_arg '--with-http_xslt_module*' && pkgs+=(libxml2-dev libxslt1-dev)
has_arg '--with-http_image_filter_module*' && pkgs+=(libgd-dev)
has_arg '--with-*geoip_module*' && pkgs+=(libgeoip-dev)
has_arg '--with-http_perl_module*' && pkgs+=(libperl-dev)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "needs root for: $*"; fi
}
if command -v dpkg-query >/dev/null && command -v apt-get >/dev/null; then
    missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing build packages: ${missing[*]}"
        apt_log=$(mktemp)
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1 \
            || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
                     apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1; } \
            || { cat "$apt_log" >&2; die "could not install ${missing[*]}"; }
        rm -f "$apt_log"
    fi
else
    say "not a Debian/Ubuntu system: the build needs a C compiler, make, libclang, and the"
    say "development files of PCRE2, zlib and OpenSSL (plus what $bin's modules use)"
fi
ensure_rust build-module

# ---------------------------------------------------------------- the source tree
cache=${CARGO_TARGET_DIR:-$root/target}/nginx-src
tree_version() { sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' "$1/src/core/nginx.h" 2>/dev/null; }

# Debian/Ubuntu: BIN's package's source, from the repositories the machine already uses.
debian_source() {
    local pkgver srcpkg upstream dir listfile v tried=() apt_opts
    pkg=$(dpkg -S "$bin" 2>/dev/null | head -n 1 | cut -d: -f1) || true
    [ -n "$pkg" ] || return 1
    pkgver=$(dpkg-query -W -f='${Version}' "$pkg")
    srcpkg=$(dpkg-query -W -f='${source:Package}' "$pkg")
    upstream=${pkgver#*:}
    upstream=${upstream%-*}
    say "$bin comes from the package $pkg $pkgver: using its source package"
    for dir in "$cache/debian-$pkgver" "$cache"/debian-*; do    # fetched before
        [ -f "$dir/.complete" ] && [ "$(tree_version "$(cat "$dir/.complete")")" = "$upstream" ] || continue
        src=$(cat "$dir/.complete")
        return 0
    done
    mkdir -p "$cache/apt/lists/partial" "$cache/apt/archives/partial"
    listfile=$cache/apt/sources.list
    apt-get indextargets --format '$(TARGET_OF) $(REPO_URI) $(RELEASE) $(COMPONENT)' \
        | awk '$1 == "deb" {print "deb-src " $2 " " $3 " " $4}' | sort -u >"$listfile"
    [ -s "$listfile" ] || { say "no apt repositories found"; return 1; }
    apt_opts=(-o "Dir::Etc::sourcelist=$listfile" -o Dir::Etc::sourceparts=-
              -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt"
              -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User="$(id -un)")
    apt-get "${apt_opts[@]}" update -qq >/dev/null 2>"$cache/apt/update.log" \
        || { say "apt-get update of the source lists failed:"; cat "$cache/apt/update.log" >&2; return 1; }
    # The installed revision first; else another revision of the same upstream version
    # (the module must match the upstream version and the configure arguments, not
    # Debian's revision): the newest security update's source can lag behind.
    local candidates
    candidates=$( { echo "$pkgver"; apt-cache "${apt_opts[@]}" showsrc "$srcpkg" 2>/dev/null \
        | sed -n 's/^Version: //p' | sort -rV; } | awk -v u="$upstream" '{v=$1; sub(/^[0-9]+:/, "", v); sub(/-[^-]*$/, "", v)} v == u && !seen[$1]++')
    for v in $candidates; do
        dir=$cache/debian-$v
        tried+=("$v")
        rm -rf "$dir"; mkdir -p "$dir"
        say "apt-get source $srcpkg=$v"
        if (cd "$dir" && apt-get "${apt_opts[@]}" source -qq "$srcpkg=$v" >"$dir/source.log" 2>&1); then
            src=$(find "$dir" -mindepth 1 -maxdepth 1 -type d -name 'nginx-*' | head -n 1)
            if [ -n "$src" ] && [ "$(tree_version "$src")" = "$upstream" ]; then
                [ "$v" = "$pkgver" ] || say "(source of $pkgver not found; $v has the same upstream version $upstream)"
                echo "$src" >"$dir/.complete"
                return 0
            fi
        fi
        rm -rf "$dir"
    done
    say "no source package $srcpkg with upstream version $upstream (tried: ${tried[*]:-none})"
    return 1
}

if [ -n "$src" ]; then
    [ -d "$src" ] || die "--source: \"$src\" is not a directory"
    src=$(cd "$src" && pwd)
    # An OpenResty bundle: the patched nginx core is bundle/nginx-<version>.
    if [ ! -f "$src/src/core/nginx.h" ] && [ -d "$src/bundle" ]; then
        core=$(find "$src/bundle" -mindepth 1 -maxdepth 1 -type d -name 'nginx-[0-9]*' | head -n 1)
        [ -n "$core" ] || die "--source: $src/bundle has no nginx-<version> directory"
        say "OpenResty bundle: using its nginx core $core"
        src=$core
    fi
elif command -v dpkg >/dev/null && debian_source; then
    :
else
    no_source
fi
[ -f "$src/src/core/nginx.h" ] || die "$src is not an nginx source tree (no src/core/nginx.h)"
src_version=$(tree_version "$src")
case $version in
    "$src_version" | "$src_version".*) ;;   # OpenResty 1.27.1.2 is nginx 1.27.1
    *) die "$src is nginx $src_version, $bin is $product $version: use the source of the same version" ;;
esac
say "source: $src (nginx $src_version)"

# ---------------------------------------------------------------- configure
conf_args=()
for a in "${args[@]}"; do
    case $a in --add-module=* | --add-dynamic-module=*) ;; *) conf_args+=("$a") ;; esac
done
configure=./configure
[ -x "$src/configure" ] || configure=auto/configure    # a git checkout
stamp="$configure ${conf_args[*]}"
configured=$(sed -n 's/^#define NGX_CONFIGURE "\(.*\)"$/\1/p' "$src/objs/ngx_auto_config.h" 2>/dev/null || true)
if [ -f "$src/objs/ngx_auto_config.h" ] && { [ "${configured# }" = "$conf_line" ] \
        || [ "$(cat "$src/objs/.consul-configure" 2>/dev/null)" = "$stamp" ]; }; then
    say "already configured with these arguments: $src/objs"
else
    say "configuring with $bin's arguments (log: $src/objs/configure.log)"
    rm -rf "$src/objs"
    mkdir -p "$src/objs"
    if ! (cd "$src" && "$configure" "${conf_args[@]}") >"$src/configure.log" 2>&1; then
        tail -n 15 "$src/configure.log" >&2
        die "configure failed (whole log: $src/configure.log); a missing library usually means a missing -dev package"
    fi
    mv "$src/configure.log" "$src/objs/configure.log"
    printf '%s' "$stamp" >"$src/objs/.consul-configure"
fi

# ---------------------------------------------------------------- build
target_dir=${CARGO_TARGET_DIR:-$root/target}/build-module
say "cargo build --release --no-default-features --features export-modules (NGINX_BUILD_DIR=$src/objs)"
(cd "$root" && NGINX_BUILD_DIR="$src/objs" CARGO_TARGET_DIR="$target_dir" \
    cargo build --release --locked --no-default-features --features export-modules)
built=$target_dir/release/libngx_stream_consul_upstream_module.so
[ -f "$built" ] || die "cargo did not produce $built"
out=${out:-${CARGO_TARGET_DIR:-$root/target}/module/$product-$version}
mkdir -p "$out"
so=$(cd "$out" && pwd)/ngx_stream_consul_upstream_module.so
install -m 0644 "$built" "$so"

# ---------------------------------------------------------------- prove: BIN -t
load_lines=()
if [ -n "$stream_dynamic" ]; then
    stream_so=$modules_path/ngx_stream_module.so
    [ -f "$stream_so" ] || die "$bin has stream as a dynamic module, but $stream_so is missing (Debian/Ubuntu: apt-get install libnginx-mod-stream)"
    load_lines+=("load_module $stream_so;")
fi
load_lines+=("load_module $so;")
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
mkdir -p "$check/logs"
# nginx -t opens the access log and creates the http temp directories; those
# configured with an absolute --http-*-temp-path (/var/cache/nginx/... in nginx.org's
# packages and the Docker image's build stage, where it does not exist yet) go under
# $check instead.
temp_paths=()
for kind in client_body proxy fastcgi uwsgi scgi; do
    module=${kind/client_body/}
    if has_arg "--http-${kind//_/-}-temp-path=*" && { [ -z "$module" ] || ! has_arg "--without-http_${module}_module"; }; then
        temp_paths+=("${kind}_temp_path $check/${kind}_temp;")
    fi
done
{
    printf '%s\n' "${load_lines[@]}"
    cat <<EOF
pid $check/logs/nginx.pid;
events { }
stream {
    upstream consul_check {
        consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:8600 interval=1s;
    }
    server { listen 127.0.0.1:16379; proxy_pass consul_check; }
}
http {
    access_log off;   # --http-log-path's directory may not exist yet either
    ${temp_paths[*]}
    upstream consul_check {
        consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:8600 interval=1s;
        keepalive 8;
    }
    server { listen 127.0.0.1:16380; location / { proxy_pass http://consul_check; } }
}
EOF
} >"$check/nginx.conf"
if ! t_out=$("$bin" -t -p "$check/" -c "$check/nginx.conf" -e "$check/logs/error.log" 2>&1); then
    printf '%s\n' "$t_out" >&2
    die "$bin -t rejected the module (configuration: see above)"
fi
say "$bin -t with the module: ok"

cat <<EOF

Module for $product $version ($bin):
    $so

Install it next to nginx's other modules and load it at the top of nginx.conf
(after the stream module where that is a module of its own):
    install -m 0644 $so $modules_path/
EOF
[ -n "$stream_dynamic" ] && printf '    load_module %s;   # Debian/Ubuntu: /etc/nginx/modules-enabled/50-mod-stream.conf has it\n' "$modules_path/ngx_stream_module.so"
printf '    load_module %s;\n' "$modules_path/ngx_stream_consul_upstream_module.so"
if [ -n "${pkg:-}" ] || dpkg -S "$bin" >/dev/null 2>&1; then
    printf '\nOr as a Debian package: scripts/package-deb.sh --nginx %s\n' "$bin"
fi
echo "A reload keeps an already loaded copy of the module: restart nginx after replacing it."
