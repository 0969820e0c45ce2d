#!/usr/bin/env bash
# make bench-peers: Envoy alone, Envoy + market-router, LiteLLM proxy and Portkey's gateway in
# front of the same two mock providers, measured in one run, alternating (tools/src/bin/bench_peers.rs
# does the measuring). Installs the peers on first use into .venv-peers/ and .node-peers/
# (git-ignored); a peer that cannot be installed or started is reported as not measured.
# Writes bench/results/peers.json and bench/results/peers.md.
#
# Arguments are passed to the driver, e.g. make bench-peers ARGS='--rounds 1 --throughput-s 3'
# (see `target/release/bench_peers --help`). Environment: LITELLM_VERSION,
# PORTKEY_VERSION, PEERS_INSTALL_TIMEOUT (seconds), BENCH_PEERS_TIMEOUT (seconds, whole run).
# Everything listens on 127.0.0.1; every process the run starts is ended when it finishes.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/peers/lib.sh
source scripts/peers/lib.sh

BENCH_PEERS_TIMEOUT="${BENCH_PEERS_TIMEOUT:-480}"

echo "bench-peers: building the filter, Envoy and the driver"
make --no-print-directory build envoy
cargo build --release -p market-router-tools --bin bench_peers -p market-router-testbed --bin mock_provider

errf="$(mktemp)"
trap 'rm -f "$errf"' EXIT
peer_args=()
if install_litellm 2>"$errf"; then
	peer_args+=(--litellm "$LITELLM_BIN" --litellm-version "$(litellm_installed_version)")
else
	echo "bench-peers: LiteLLM NOT AVAILABLE: $(cat "$errf")"
	peer_args+=(--litellm-unavailable "install failed: $(cat "$errf")")
fi
if install_portkey 2>"$errf"; then
	peer_args+=(--portkey "$PORTKEY_JS" --portkey-version "$(portkey_installed_version)"
		--node-preload "$NODE_PRELOAD")
else
	echo "bench-peers: Portkey gateway NOT AVAILABLE: $(cat "$errf")"
	peer_args+=(--portkey-unavailable "install failed: $(cat "$errf")")
fi

# GNU timeout signals the driver's whole process group: the mocks, Envoys and peers it started.
export MR_WASM="${MR_WASM:-$PWD/target/wasm32-wasip1/release/market_router.wasm}"
timeout "$BENCH_PEERS_TIMEOUT" target/release/bench_peers "${peer_args[@]}" "$@"
