#!/usr/bin/env bash
# CI: Debian 12's packaged nginx (nginx-light + libnginx-mod-stream, a --with-debug
# build with stream as a dynamic module), installed idempotently, its service stopped,
# and the module built for it by scripts/build-module.sh into target/module/debian/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

pkgs=(nginx-light libnginx-mod-stream)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "packaged-nginx: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The tests start their own nginx: not the packaged service (port 80).
if command -v systemctl >/dev/null && systemctl is-active -q nginx 2>/dev/null; then
    systemctl stop nginx
elif [ -s /run/nginx.pid ] && grep -qa nginx "/proc/$(cat /run/nginx.pid)/cmdline" 2>/dev/null; then
    /usr/sbin/nginx -s quit || true
fi
/usr/sbin/nginx -v
bash "$root/scripts/build-module.sh" --nginx /usr/sbin/nginx --out "${CARGO_TARGET_DIR:-$root/target}/module/debian"
