# shellcheck shell=bash
# Sourced by scripts/demo.sh, scripts/test.sh and scripts/build-module.sh:
#
#   ensure_rust NAME    NAME: the calling script, for messages
#
# Puts a Rust toolchain at least as new as Cargo.toml's rust-version on PATH
# (~/.cargo/bin first: rustup's toolchain wins over Debian's older /usr/bin/cargo).
# Without one, installs it with rustup's official installer when that is
# reachable; otherwise stops with one line saying what to install.

rust_required() {   # the rust-version line of Cargo.toml
    sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../../Cargo.toml"
}

rust_version_ok() { # HAVE NEED: HAVE >= NEED (dotted versions; 1.89 = 1.89.0)
    local have=$1 need=$2
    [ -n "$have" ] || return 1
    local dots=${have//[^.]/}
    while [ ${#dots} -lt 2 ]; do have=$have.0; dots=$dots.; done
    dots=${need//[^.]/}
    while [ ${#dots} -lt 2 ]; do need=$need.0; dots=$dots.; done
    [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n 1)" = "$need" ]
}

ensure_rust() {
    local who=$1 need have installer
    case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) PATH="$HOME/.cargo/bin:$PATH" ;; esac
    export PATH
    need=$(rust_required)
    have=$(cargo --version 2>/dev/null | awk '{print $2}' || true)
    rust_version_ok "$have" "$need" && return 0

    local found="no cargo on PATH"
    [ -n "$have" ] && found="cargo $have at $(command -v cargo)"
    local how="install it with rustup: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
    if command -v rustup >/dev/null 2>&1; then
        echo "$who: Rust $need or newer is needed ($found): rustup update stable"
        if rustup toolchain install stable --profile minimal -c clippy -c rustfmt && rustup default stable; then
            have=$(cargo --version 2>/dev/null | awk '{print $2}' || true)
            rust_version_ok "$have" "$need" && return 0
        fi
        how="update it: rustup update stable && rustup default stable"
    elif command -v curl >/dev/null 2>&1; then
        installer=$(mktemp)
        if curl --proto '=https' --tlsv1.2 -sSf --max-time 20 -o "$installer" https://sh.rustup.rs 2>/dev/null; then
            echo "$who: Rust $need or newer is needed ($found): installing it with rustup"
            if sh "$installer" -y --profile minimal -c clippy -c rustfmt; then
                rm -f "$installer"
                have=$(cargo --version 2>/dev/null | awk '{print $2}' || true)
                rust_version_ok "$have" "$need" && return 0
            fi
        fi
        rm -f "$installer"
    fi
    echo "$who: needs Rust $need or newer ($found); $how" >&2
    exit 1
}
