#!/usr/bin/env bash
# Builds the filter (crates/filter, package market-router) as a wasm32-wasip1 cdylib, choosing how the target's standard library
# is obtained:
#
#   rustup  rustup's prebuilt wasm32-wasip1 target (the normal route)
#   debian  Debian's rustc-web, which builds std for wasm32-wasip1 itself from rust-web-src
#           and links with wasm-ld-22 against Debian's wasi-libc (fallback, Debian only)
#
# usage: scripts/wasm-build.sh [build|ensure|route]
#   build   (default) make sure a route works, then build the .wasm for profile $BUILD
#   ensure  make sure a route works, installing what it needs, and say which
#   route   print the route usable right now, installing nothing: rustup, debian or none
#
# Environment:
#   BUILD=release      cargo profile (release, debug/dev, or a custom profile)
#   WASM_ROUTE=auto    force a route: rustup or debian
#   RUSTUP_TIMEOUT=120 seconds allowed for one `rustup target add` (one retry follows)
#   WASM_OPT=auto      after a release build, binaryen's wasm-opt (-O3; -Oz when
#                      RUSTC_OPT_LEVEL is s or z) rewrites the .wasm when wasm-opt is installed
#                      (Debian: binaryen); `off` skips it, `required` fails without it. Debug
#                      builds are left as cargo wrote them.
#   RUSTC_OPT_LEVEL=3  rustc's opt-level for a release build of the .wasm only (native release
#                      builds of the tools keep Cargo.toml's 3). `z` gives a .wasm of about
#                      440 KB instead of about 630 KB at some Envoy CPU per request
#                      (bench/results/wasm-size.md)
set -euo pipefail

cd "$(dirname "$0")/.."

TARGET=wasm32-wasip1
CRATE=market_router
BUILD=${BUILD:-release}
WASM_ROUTE=${WASM_ROUTE:-auto}
RUSTUP_TIMEOUT=${RUSTUP_TIMEOUT:-120}
WASM_OPT=${WASM_OPT:-auto}
RUSTC_OPT_LEVEL=${RUSTC_OPT_LEVEL:-3}
case "$RUSTC_OPT_LEVEL" in
s | z) WASM_OPT_LEVEL=-Oz ;;
*) WASM_OPT_LEVEL=-O3 ;;
esac
# The features rustc's wasm32-wasip1 output uses; wasm-opt needs them named once the
# target_features section is stripped.
WASM_OPT_FEATURES=(--enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int
    --enable-mutable-globals --enable-multivalue --enable-reference-types)
DEBIAN_PKGS=(rustc-web cargo-web rust-web-src lld-22 wasi-libc)
DEBIAN_LINKER=wasm-ld-22
DEBIAN_WASI_LIBDIR=/usr/lib/wasm32-wasi

log() { echo "wasm-build: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

rustup_ready() {
    command -v rustup >/dev/null 2>&1 &&
        rustup target list --installed 2>/dev/null | grep -x "$TARGET" >/dev/null
}

debian_ready() {
    local pkg
    command -v dpkg-query >/dev/null 2>&1 || return 1
    for pkg in "${DEBIAN_PKGS[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || return 1
    done
    [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] && command -v "$DEBIAN_LINKER" >/dev/null 2>&1
}

ensure_rustup() {
    local try
    rustup_ready && return 0
    if ! command -v rustup >/dev/null 2>&1; then
        log "rustup is not installed"
        return 1
    fi
    for try in 1 2; do
        log "adding rustup target $TARGET (attempt $try of 2, timeout ${RUSTUP_TIMEOUT}s)"
        if timeout "$RUSTUP_TIMEOUT" rustup target add "$TARGET" >&2 && rustup_ready; then
            return 0
        fi
    done
    log "rustup could not add $TARGET"
    return 1
}

ensure_debian() {
    local sudo=()
    debian_ready && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        log "no apt-get: the debian route is not available here"
        return 1
    fi
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || {
            log "installing Debian packages needs root or sudo"
            return 1
        }
        sudo=(sudo)
    fi
    log "installing Debian packages: ${DEBIAN_PKGS[*]}"
    "${sudo[@]}" apt-get update -q >&2 || return 1
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${DEBIAN_PKGS[@]}" >&2 || return 1
    debian_ready
}

# Prints the route name on stdout (everything else goes to stderr); installs what that
# route needs.
ensure() {
    case "$WASM_ROUTE" in
    rustup)
        ensure_rustup || die "the rustup route (forced by WASM_ROUTE) is not available"
        echo rustup
        ;;
    debian)
        ensure_debian || die "the debian route (forced by WASM_ROUTE) is not available"
        echo debian
        ;;
    auto)
        if ensure_rustup; then
            echo rustup
        elif {
            log "falling back to the debian route"
            ensure_debian
        }; then
            echo debian
        else
            die "no route to a wasm32-wasip1 standard library: rustup target add failed twice and the Debian packages could not be installed"
        fi
        ;;
    *) die "WASM_ROUTE must be auto, rustup or debian, not '$WASM_ROUTE'" ;;
    esac
}

route_now() {
    case "$WASM_ROUTE" in
    rustup) if rustup_ready; then echo rustup; else echo none; fi ;;
    debian) if debian_ready; then echo debian; else echo none; fi ;;
    *)
        if rustup_ready; then
            echo rustup
        elif debian_ready; then
            echo debian
        else
            echo none
        fi
        ;;
    esac
}

profile_args() {
    case "$BUILD" in
    release) echo --release ;;
    debug | dev) ;;
    *) echo --profile "$BUILD" ;;
    esac
}

profile_dir() {
    case "$BUILD" in
    debug | dev) echo debug ;;
    *) echo "$BUILD" ;;
    esac
}

# optimize FILE: wasm-opt ($WASM_OPT_LEVEL) on cargo's output. Cargo links FILE afresh from its copy under
# deps/ on every build, so the optimized result is kept beside it (FILE.opt) with the checksum
# of the input it was made from, and wasm-opt runs again only when cargo's output changed.
optimize() {
    local out=$1 src key tmp
    case "$WASM_OPT" in
    off) return 0 ;;
    auto | required) ;;
    *) die "WASM_OPT must be auto, off or required, not '$WASM_OPT'" ;;
    esac
    if ! command -v wasm-opt >/dev/null 2>&1; then
        [ "$WASM_OPT" = required ] && die "WASM_OPT=required but wasm-opt (Debian: binaryen) is not installed"
        log "wasm-opt not installed (Debian: binaryen): the .wasm stays as cargo built it"
        return 0
    fi
    src="$(dirname "$out")/deps/$CRATE.wasm"
    [ -f "$src" ] || src=$out
    key="$(cksum <"$src") $WASM_OPT_LEVEL ${WASM_OPT_FEATURES[*]}"
    if ! [ -f "$out.opt" ] || [ "$(cat "$out.opt.key" 2>/dev/null)" != "$key" ]; then
        log "wasm-opt $WASM_OPT_LEVEL $out ($(wc -c <"$src") bytes)"
        wasm-opt "${WASM_OPT_FEATURES[@]}" "$WASM_OPT_LEVEL" "$src" -o "$out.opt" || {
            rm -f "$out.opt"
            die "wasm-opt failed on $src"
        }
        echo "$key" >"$out.opt.key"
    fi
    tmp="$out.tmp"
    cp "$out.opt" "$tmp" && mv -f "$tmp" "$out"
}

build() {
    local route out
    route=$(ensure)
    log "route: $route"
    if [ "$BUILD" = release ]; then
        export CARGO_PROFILE_RELEASE_OPT_LEVEL="$RUSTC_OPT_LEVEL"
    fi
    # shellcheck disable=SC2046 # profile_args is zero to two words
    case "$route" in
    rustup)
        cargo build -p market-router --lib --target "$TARGET" $(profile_args)
        ;;
    debian)
        # Debian's cargo runs the first rustc on PATH (rustup's) unless told otherwise.
        RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
            RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$DEBIAN_WASI_LIBDIR" \
            CARGO_TARGET_WASM32_WASIP1_LINKER="$DEBIAN_LINKER" \
            /usr/bin/cargo build -p market-router --lib --target "$TARGET" $(profile_args) -Zbuild-std=std,panic_abort
        ;;
    esac
    out="${CARGO_TARGET_DIR:-target}/$TARGET/$(profile_dir)/$CRATE.wasm"
    [ -f "$out" ] || die "the build finished but $out is missing"
    [ "$(profile_dir)" = debug ] || optimize "$out"
    log "built $out ($(wc -c <"$out") bytes) by the $route route"
}

case "${1:-build}" in
build) build ;;
ensure) echo "wasm-build: route: $(ensure)" ;;
route) route_now ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
*) die "unknown command '$1' (build, ensure or route)" ;;
esac
