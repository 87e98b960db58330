#!/usr/bin/env bash
# Packages the module for a Debian/Ubuntu nginx, laid out like the distribution's own
# libnginx-mod-* packages:
#
#   target/debian/libnginx-mod-stream-consul-upstream_<version>_<arch>.deb
#     /usr/lib/nginx/modules/ngx_stream_consul_upstream_module.so
#     /usr/share/nginx/modules-available/mod-stream-consul-upstream.conf   (the load_module line)
#     /etc/nginx/modules-enabled/70-mod-stream-consul-upstream.conf -> ... (made by postinst,
#       after 50-mod-stream.conf: the stream module must be loaded first)
#   Depends: the nginx-abi-* package the target nginx provides, libnginx-mod-stream (when
#   stream is a dynamic module), and the shared libraries the .so uses.
#   Maintainer scripts: an installation enables the module, also one after a remove,
#   and makes /var/lib/nginx/consul, owned by www-data, for state= files (Debian's
#   /var/lib/nginx is root's: workers could not write there); purge removes it with
#   the state files, remove keeps them. Otherwise remove and purge leave no file
#   behind (Debian's own module packages keep a
#   "...conf.removed" link after a remove, to know on a reinstall; here preinst knows it,
#   as dpkg tells it "install" for both). An upgrade keeps an administrator's own removal
#   of the link.
#
# Usage: scripts/package-deb.sh [--nginx BIN] [--so FILE]
#   --nginx BIN   the packaged nginx to build for (default /usr/sbin/nginx)
#   --so FILE     package this .so (default: scripts/build-module.sh --nginx BIN builds it)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { printf 'package-deb: %s\n' "$*" >&2; exit 1; }
say() { printf 'package-deb: %s\n' "$*"; }

bin=/usr/sbin/nginx so=''
while [ $# -gt 0 ]; do
    case $1 in
        --nginx) [ $# -ge 2 ] || die "--nginx needs a value"; bin=$2; shift 2 ;;
        --so) [ $# -ge 2 ] || die "--so needs a value"; so=$2; shift 2 ;;
        -h | --help) sed -n '2,19s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument \"$1\"" ;;
    esac
done
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: this builds Debian packages (on Debian/Ubuntu)"
bin=$(readlink -f "$(command -v "$bin" || echo "$bin")")
[ -x "$bin" ] || die "no nginx at $bin"
ngx_pkg=$(dpkg -S "$bin" 2>/dev/null | head -n 1 | cut -d: -f1) || true
[ -n "$ngx_pkg" ] || die "$bin does not belong to a Debian package: use scripts/build-module.sh for it"
abi=$(dpkg-query -W -f='${Provides}' "$ngx_pkg" | tr ',' '\n' | sed -n 's/^ *\(nginx-abi-[^ ]*\).*/\1/p' | head -n 1)
[ -n "$abi" ] || die "the package $ngx_pkg provides no nginx-abi-* (Provides: $(dpkg-query -W -f='${Provides}' "$ngx_pkg"))"
conf_args=$("$bin" -V 2>&1 | sed -n 's/^configure arguments: //p')
modules_path=$(printf '%s\n' "$conf_args" | tr ' ' '\n' | sed -n 's/^--modules-path=//p')
modules_path=${modules_path:-/usr/lib/nginx/modules}
prefix=$(printf '%s\n' "$conf_args" | tr ' ' '\n' | sed -n 's/^--prefix=//p')
stream_dep=''
case " $conf_args " in *" --with-stream=dynamic "*) stream_dep=libnginx-mod-stream ;; esac

if [ -z "$so" ]; then
    out=${CARGO_TARGET_DIR:-$root/target}/debian/module
    bash "$root/scripts/build-module.sh" --nginx "$bin" --out "$out"
    so=$out/ngx_stream_consul_upstream_module.so
fi
[ -f "$so" ] || die "no module at $so"

name=libnginx-mod-stream-consul-upstream
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)
arch=$(dpkg --print-architecture)
snippet=mod-stream-consul-upstream.conf
link=70-mod-stream-consul-upstream.conf
outdir=${CARGO_TARGET_DIR:-$root/target}/debian
stage=$outdir/$name
rm -rf "$stage"
install -d "$stage/DEBIAN" "$stage$modules_path" "$stage/usr/share/nginx/modules-available" \
    "$stage/usr/share/doc/$name"
install -m 0644 "$so" "$stage$modules_path/ngx_stream_consul_upstream_module.so"
strip --strip-unneeded "$stage$modules_path/ngx_stream_consul_upstream_module.so" 2>/dev/null || true
# "modules/" is relative to nginx's prefix, where Debian links modules -> the modules path.
if [ "$prefix" = /usr/share/nginx ] && [ "$modules_path" = /usr/lib/nginx/modules ]; then
    echo "load_module modules/ngx_stream_consul_upstream_module.so;" >"$stage/usr/share/nginx/modules-available/$snippet"
else
    echo "load_module $modules_path/ngx_stream_consul_upstream_module.so;" >"$stage/usr/share/nginx/modules-available/$snippet"
fi
cat >"$stage/usr/share/doc/$name/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ngx-consul

Files: *
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be
 found in "/usr/share/common-licenses/Apache-2.0".
EOF

# Shared libraries the .so needs (libc, libgcc_s), as dpkg-shlibdeps finds them. Its
# nginx symbols are the binary's and are not libraries: warnings off.
shl=$(mktemp -d)
trap 'rm -rf "$shl"' EXIT
mkdir -p "$shl/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$name" "$name" >"$shl/debian/control"
shlibs=$(cd "$shl" && dpkg-shlibdeps --warnings=0 -O "$stage$modules_path/ngx_stream_consul_upstream_module.so" 2>/dev/null \
    | sed -n 's/^shlibs:Depends=//p')
depends="$abi${stream_dep:+, $stream_dep}${shlibs:+, $shlibs}"

cat >"$stage/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: ngx-consul <ngx-consul@invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Depends: $depends
Recommends: nginx
Section: httpd
Priority: optional
Description: Consul service discovery for nginx stream and http upstreams
 The consul_upstream directive fills a stream or http upstream with the
 instances of a Consul service, read from the SRV records of the agent's DNS
 interface or from its HTTP API, with weights and ports, priorities as tiers,
 and the last good set kept while Consul has trouble. One module file serves
 both: it needs the stream module loaded first even for http upstreams.
EOF

# Maintainer scripts.
marker=/run/$name.enable
state_dir=/var/lib/nginx/consul
cat >"$stage/DEBIAN/preinst" <<EOF
#!/bin/sh
set -e
# dpkg says "install" for a first installation and for one after a remove, and
# "upgrade" otherwise: only the first two enable the module (in postinst).
if [ "\$1" = install ]; then
	: >$marker
fi
EOF
cat >"$stage/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
# Where state= files go (the examples' path): writable by the workers' user.
# Made once: an administrator's own owner or mode stays through upgrades.
if [ "\$1" = configure ] && [ ! -d $state_dir ]; then
	install -d -m 0750 $state_dir
	if getent passwd www-data >/dev/null; then
		chown www-data:www-data $state_dir
	fi
fi
if [ "\$1" = configure ] && { [ -z "\$2" ] || [ -e $marker ]; }; then
	mkdir -p /etc/nginx/modules-enabled
	ln -sf /usr/share/nginx/modules-available/$snippet /etc/nginx/modules-enabled/$link
fi
rm -f $marker
if [ "\$1" = configure ] && command -v dpkg-trigger >/dev/null 2>&1; then
	dpkg-trigger --no-await nginx-reload
fi
EOF
cat >"$stage/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
# nginx must not load a module file that is about to go.
if [ "\$1" = remove ] || [ "\$1" = deconfigure ]; then
	rm -f /etc/nginx/modules-enabled/$link
fi
EOF
cat >"$stage/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ] || [ "\$1" = purge ]; then
	rm -f /etc/nginx/modules-enabled/$link
fi
if [ "\$1" = purge ]; then
	rm -rf $state_dir
fi
if [ "\$1" = remove ] && command -v dpkg-trigger >/dev/null 2>&1; then
	dpkg-trigger --no-await nginx-reload
fi
EOF
chmod 0755 "$stage/DEBIAN/preinst" "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"

deb=$outdir/${name}_${version}_${arch}.deb
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
rm -rf "$stage"
say "built $deb"
say "  Depends: $depends"
echo "Install it with: apt-get install $deb   (or dpkg -i; then restart nginx)"
