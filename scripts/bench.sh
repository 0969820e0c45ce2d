#!/usr/bin/env bash
# make bench: installs and builds what the benchmark needs, then runs tools/src/bin/bench.rs, which
# writes bench/results/latest.json and bench/results/latest.md, then tools/src/bin/bench_fleet.rs
# (the fleet market; bench/results/fleet.json and fleet.md), then tools/src/bin/bench_kong.rs
# (Kong's wasm host; bench/results/kong.json and kong.md).
#
# usage: scripts/bench.sh [driver arguments]     (make bench ARGS='...')
#   --quick                about a minute: one round, short runs, fewer snapshot sizes
#   --rounds N             alternating rounds of the overhead runs (default 3)
#   --sections LIST        overhead,streaming,failover,memory (default: all four)
#   --sat-secs S / --lat-secs S / --failover-secs S, --no-knobs, --perf / --no-perf,
#   --out DIR              see `target/release/bench --help`
#   --no-market-sim        skip the market simulation (routing quality, run first)
#
# Needs (installed here when missing, from Debian): wrk (load generator) and nginx (the fast
# upstream; without it the mock provider stands in). Envoy comes from `make envoy`.
# Everything runs on 127.0.0.1; the driver kills every process it starts.
set -euo pipefail

cd "$(dirname "$0")/.."

log() { echo "bench: $*" >&2; }

apt_ready=
# apt_install PKG...: installs Debian packages without starting any service they ship.
apt_install() {
    local sudo=() policy=/usr/sbin/policy-rc.d made_policy= status=0
    command -v apt-get >/dev/null 2>&1 || return 1
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || return 1
        sudo=(sudo)
    fi
    if [ -z "$apt_ready" ]; then
        timeout 300 "${sudo[@]}" apt-get update -q >&2 || log "apt-get update failed; trying the install anyway"
        apt_ready=1
    fi
    # A package such as nginx starts its system service on install unless policy-rc.d says no.
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod 755 "$policy" && made_policy=1
    fi
    timeout 600 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" >&2 || status=$?
    if [ -n "$made_policy" ]; then "${sudo[@]}" rm -f "$policy"; fi
    return "$status"
}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

if ! have wrk; then
    log "installing wrk"
    apt_install wrk || { log "error: wrk is needed and could not be installed"; exit 1; }
fi
if ! have nginx; then
    log "installing nginx"
    apt_install nginx-light || apt_install nginx || log "no nginx: the mock provider stands in as the fast upstream"
fi

# The filter, Envoy, the empty comparison filter, the driver and the processes it starts.
BUILD=release scripts/wasm-build.sh build
make --no-print-directory envoy
empty=(cargo build --release --target wasm32-wasip1 --manifest-path bench/empty-filter/Cargo.toml)
case "$(scripts/wasm-build.sh route)" in
rustup) "${empty[@]}" ;;
debian)
    # The same toolchain switch scripts/wasm-build.sh makes for its debian route.
    RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
        RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=/usr/lib/wasm32-wasi" \
        CARGO_TARGET_WASM32_WASIP1_LINKER=wasm-ld-22 \
        /usr/bin/"${empty[@]}" -Zbuild-std=std,panic_abort
    ;;
*) log "error: no wasm32-wasip1 toolchain"; exit 1 ;;
esac
cargo build --release -p market-router-testbed --bin mock_provider --bin market_sidecar

# Routing quality first (no Envoy, a few minutes): the market simulation on every catalog world
# × five seeds, with the goals of the default configuration as min / median / max. Its report
# goes to bench/results/market-sim.{txt,json}, seeds 6-10 to market-sim-seeds-6-10.{txt,json};
# --no-market-sim skips it, --quick shortens it.
args=() sim=1 sim_requests=50000
for a in "$@"; do
    case "$a" in
    --no-market-sim) sim= ;;
    --quick) sim_requests=10000; args+=("$a") ;;
    *) args+=("$a") ;;
    esac
done
if [ -n "$sim" ]; then
    make --no-print-directory catalogs
    cargo build --release -p market-router-tools --bin market_sim
    mkdir -p bench/results
    log "market simulation: $sim_requests requests per run"
    # A missed goal is a finding of the benchmark, reported in its output, not a reason to stop.
    target/release/market_sim --requests "$sim_requests" --informed-oracle true \
        --json bench/results/market-sim.json | tee bench/results/market-sim.txt || true
    # Seeds the defaults were not chosen on: the same worlds, seeds 6-10.
    log "market simulation, held-out seeds 6-10: $sim_requests requests per run"
    target/release/market_sim --requests "$sim_requests" --seeds 6,7,8,9,10 --informed-oracle true \
        --json bench/results/market-sim-seeds-6-10.json | tee bench/results/market-sim-seeds-6-10.txt || true
fi

export MR_WASM="${MR_WASM:-$PWD/target/wasm32-wasip1/release/market_router.wasm}"
cargo run --release -p market-router-tools --bin bench -- "${args[@]}"

# The fleet market (tools/src/bin/bench_fleet.rs, bench/results/fleet.md): what reporting costs on the
# request path (market.report on vs off, paired alternating rounds) and the time from a
# provider's outage to fleet-wide avoidance (one service; two replicas on Redis); --quick
# carries over. Needs redis-server (Debian's package).
if ! have redis-server; then
    log "installing redis-server"
    apt_install redis-server || { log "error: redis-server is needed and could not be installed"; exit 1; }
fi
cargo build --release -p market-sidecar
fleet_args=()
for a in "${args[@]}"; do [ "$a" = --quick ] && fleet_args+=(--quick); done
cargo run --release -p market-router-tools --bin bench_fleet -- "${fleet_args[@]}"

# Kong's wasm host: nginx proxy_pass alone vs market-router in dispatch mode
# (tools/src/bin/bench_kong.rs, bench/results/kong.md); --quick carries over.
kong_args=()
for a in "${args[@]}"; do [ "$a" = --quick ] && kong_args+=(--quick); done
make --no-print-directory kong-host
exec cargo run --release -p market-router-tools --bin bench_kong -- "${kong_args[@]}"
