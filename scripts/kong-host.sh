#!/usr/bin/env bash
# Builds Kong's proxy-wasm host -- nginx with ngx_wasm_module on wasmtime, the host Kong Gateway
# embeds -- into a cache that is reused while its inputs are unchanged.
#
# usage: scripts/kong-host.sh [deps|build|path|key]
#   deps    install the Debian packages the build needs (cmake, pcre2, zlib, openssl headers)
#   build   (default) make sure the host is built, then print the nginx binary's path
#   path    print the nginx binary's path if it is built for the current inputs, else fail
#   key     print the cache key of the current inputs
#
# Inputs, each part of the cache key:
#   the nginx source     Debian's nginx source package (orig tarball, upstream's sha256 below)
#   the module source    $NGX_WASM_SRC, a tarball of ngx_wasm_module (default
#                        ../shared/hosts/ngx_wasm_module.tar.gz from the project root; outside
#                        that setup, a `git archive` of the same commit of Kong/ngx_wasm_module)
#   wasmtime             the C API from crates.io through the wrapper crate in
#                        scripts/kong-host/wasmtime-capi (version and features in its
#                        Cargo.toml, every crate pinned by its Cargo.lock; built --locked)
#   configure flags      below
#   this script          its own sha256
#
# Environment:
#   MR_KONG_CACHE   cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/market-router/kong-host)
#   NGX_WASM_SRC    the module tarball (see above)
#   JOBS            parallel jobs for make and cargo (default 2)
#
# The wasmtime C API is built through the wrapper crate in scripts/kong-host/wasmtime-capi (a
# staticlib re-exporting wasmtime-c-api-impl), copied into the cache; cargo's target directory
# stays in the cache too, so a changed script or module rebuilds only nginx (about a minute),
# not wasmtime (minutes), and a changed lock file rebuilds only the crates it changes.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SCRIPT="$ROOT/scripts/kong-host.sh"

NGINX_VERSION=1.22.1
NGINX_ORIG="nginx_${NGINX_VERSION}.orig.tar.gz"
NGINX_SHA256=9ebb333a9e82b952acd3e2b4aeb1d4ff6406f72491bab6cd9fe69f0dea737f31
DEBIAN_SUITE=bookworm
WASMTIME_CRATE="$ROOT/scripts/kong-host/wasmtime-capi"
WASMTIME_VERSION=$(sed -n 's/^wasmtime-c-api-impl = { version = "=\([0-9.]*\)".*/\1/p' "$WASMTIME_CRATE/Cargo.toml")
CONFIGURE_FLAGS=(--with-http_ssl_module)
DEB_PKGS=(cmake libpcre2-dev zlib1g-dev libssl-dev)

CACHE=${MR_KONG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/market-router/kong-host}
NGX_WASM_SRC=${NGX_WASM_SRC:-$ROOT/../shared/hosts/ngx_wasm_module.tar.gz}
JOBS=${JOBS:-2}

log() { echo "kong-host: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# --- Debian packages -------------------------------------------------------------------------

missing_pkgs() {
    local pkg
    for pkg in "${DEB_PKGS[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] ||
            echo "$pkg"
    done
}

deps() {
    local missing
    missing=$(missing_pkgs)
    [ -z "$missing" ] && return 0
    # shellcheck disable=SC2086
    log "installing Debian packages: $(echo $missing)"
    local sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -q >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends \
        $missing >&2
}

# --- nginx source: Debian's source package, fetched without touching /etc ---------------------

nginx_tarball() {
    local dl="$CACHE/downloads" tarball="$CACHE/downloads/$NGINX_ORIG"
    if [ -f "$tarball" ] && [ "$(sha "$tarball")" = "$NGINX_SHA256" ]; then
        echo "$tarball"
        return 0
    fi
    mkdir -p "$dl/lists/partial"
    local uri
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    echo "deb-src $uri $DEBIAN_SUITE main" >"$dl/src.list"
    local apt=(apt-get -q -o "Dir::Etc::SourceList=$dl/src.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$dl/lists" -o APT::Sandbox::User=root)
    log "downloading Debian's nginx source package ($uri $DEBIAN_SUITE)"
    "${apt[@]}" update >&2
    # The .dsc and Debian tarball may fail to come; the orig tarball is the one used.
    (cd "$dl" && "${apt[@]}" source --download-only nginx >&2) || true
    [ -f "$tarball" ] || die "no $NGINX_ORIG after apt-get source (see above)"
    local got
    got=$(sha "$tarball")
    [ "$got" = "$NGINX_SHA256" ] || die "$NGINX_ORIG has sha256 $got, expected $NGINX_SHA256"
    echo "$tarball"
}

# --- wasmtime's C API --------------------------------------------------------------------------

# sha256 of the wrapper crate: its manifest, lock file and source.
wasmtime_crate_sha() {
    (cd "$WASMTIME_CRATE" && sha256sum Cargo.toml Cargo.lock src/lib.rs) | sha256sum | cut -c1-12
}

wasmtime_dir() { echo "$CACHE/wasmtime-$WASMTIME_VERSION-$(wasmtime_crate_sha)"; }

build_wasmtime() {
    local dir
    dir=$(wasmtime_dir)
    if [ -f "$dir/done" ]; then
        echo "$dir"
        return 0
    fi
    [ -n "$WASMTIME_VERSION" ] || die "no wasmtime-c-api-impl version in $WASMTIME_CRATE/Cargo.toml"
    log "building wasmtime $WASMTIME_VERSION's C API (several minutes on 2 cores)"
    rm -rf "$dir/crate"
    mkdir -p "$dir/crate/src"
    cp "$WASMTIME_CRATE/Cargo.toml" "$WASMTIME_CRATE/Cargo.lock" "$dir/crate/"
    cp "$WASMTIME_CRATE/src/lib.rs" "$dir/crate/src/"
    local target="$CACHE/wasmtime-target"
    (cd "$dir/crate" && CARGO_TARGET_DIR="$target" cargo build --release --locked -j "$JOBS" >&2)
    # The build script's output of the crate just built (the newest, should older ones linger).
    local out
    out=$(ls -td "$target"/release/build/wasmtime-c-api-impl-*/out/include 2>/dev/null |
        head -n 1)
    [ -n "$out" ] || die "wasmtime's build left no include directory"
    rm -rf "$dir/include" "$dir/lib"
    mkdir -p "$dir/lib"
    cp -r "$out" "$dir/include"
    cp "$target/release/libwasmtime_capi_static.a" "$dir/lib/libwasmtime.a"
    # 26.0.1's build script leaves WASMTIME_FEATURE_WAT out of conf.h; the module builds with
    # -Werror and needs it.
    # (The header has CRLF line ends.)
    grep -q '^#define WASMTIME_FEATURE_WAT' "$dir/include/wasmtime/conf.h" ||
        sed -i 's/^#define WASMTIME_CONF_H\r\?$/&\n#define WASMTIME_FEATURE_WAT/' \
            "$dir/include/wasmtime/conf.h"
    grep -q '^#define WASMTIME_FEATURE_WAT' "$dir/include/wasmtime/conf.h" ||
        die "could not add WASMTIME_FEATURE_WAT to conf.h"
    touch "$dir/done"
    echo "$dir"
}

# --- the key and the host ----------------------------------------------------------------------

cache_key() {
    [ -f "$NGX_WASM_SRC" ] || die "no ngx_wasm_module tarball at $NGX_WASM_SRC (set NGX_WASM_SRC)"
    {
        echo "nginx $NGINX_SHA256"
        echo "module $(sha "$NGX_WASM_SRC")"
        echo "wasmtime $WASMTIME_VERSION crate $(wasmtime_crate_sha)"
        echo "configure ${CONFIGURE_FLAGS[*]}"
        echo "script $(sha "$SCRIPT")"
    } | sha256sum | cut -c1-16
}

host_dir() { echo "$CACHE/host-$(cache_key)"; }

build_host() {
    local dir
    dir=$(host_dir)
    if [ -x "$dir/nginx" ] && [ -f "$dir/done" ]; then
        echo "$dir/nginx"
        return 0
    fi
    [ -z "$(missing_pkgs)" ] || die "missing Debian packages: $(missing_pkgs | tr '\n' ' ')(run: scripts/kong-host.sh deps)"
    local tarball wt
    tarball=$(nginx_tarball)
    wt=$(build_wasmtime)
    log "building nginx $NGINX_VERSION with ngx_wasm_module into $dir"
    local work="$dir.work"
    rm -rf "$work"
    mkdir -p "$work/module"
    tar xzf "$tarball" -C "$work"
    tar xzf "$NGX_WASM_SRC" -C "$work/module"
    local module="$work/module"
    # A tarball with one top directory, or the module's files at its root.
    [ -f "$module/config" ] || module=$(dirname "$(ls "$work"/module/*/config | head -n 1)")
    [ -f "$module/config" ] || die "$NGX_WASM_SRC holds no ngx_wasm_module (no config file)"
    (
        cd "$work/nginx-$NGINX_VERSION"
        NGX_IPC=0 NGX_WASM_RUNTIME=wasmtime ./configure "${CONFIGURE_FLAGS[@]}" \
            --add-module="$module" \
            --with-cc-opt="-O2 -I$wt/include" \
            --with-ld-opt="$wt/lib/libwasmtime.a -ldl -lm -lpthread" >&2
        make -j "$JOBS" >&2
    )
    mkdir -p "$dir"
    cp "$work/nginx-$NGINX_VERSION/objs/nginx" "$dir/nginx"
    {
        echo "nginx $NGINX_VERSION ($NGINX_SHA256)"
        echo "ngx_wasm_module $(sha "$NGX_WASM_SRC")"
        echo "wasmtime $WASMTIME_VERSION (wrapper crate and lock $(wasmtime_crate_sha))"
        echo "configure ${CONFIGURE_FLAGS[*]}"
    } >"$dir/inputs"
    rm -rf "$work"
    touch "$dir/done"
    log "built $dir/nginx"
    echo "$dir/nginx"
}

locked() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/lock"
    flock 9
    "$@"
}

case "${1:-build}" in
deps) deps ;;
build) locked build_host ;;
path)
    dir=$(host_dir)
    [ -x "$dir/nginx" ] && [ -f "$dir/done" ] || die "not built for the current inputs (run: scripts/kong-host.sh build)"
    echo "$dir/nginx"
    ;;
key) cache_key ;;
*) die "usage: $0 [deps|build|path|key]" ;;
esac
