#!/usr/bin/env bash
# make test-layering (opt-in, not part of make test): Portkey's open-source gateway in front of
# Envoy + market-router. One request end to end through both (the filter fails over from a to
# b behind Portkey), then one where every provider fails and Portkey's own retry policy acts on
# the filter's error. Uses examples/layering/{portkey-config.json,market-router.json}; the
# checks are in tools/src/bin/test_layering.rs. Installs Portkey's gateway on first use into
# .node-peers/ (git-ignored). Everything listens on 127.0.0.1.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/peers/lib.sh
source scripts/peers/lib.sh

make --no-print-directory build envoy
cargo build --release -p market-router-tools --bin test_layering -p market-router-testbed --bin mock_provider

errf="$(mktemp)"
trap 'rm -f "$errf"' EXIT
if ! install_portkey 2>"$errf"; then
	echo "test-layering: cannot run: Portkey's gateway is not available: $(cat "$errf")" >&2
	exit 1
fi
echo "test-layering: Portkey gateway $(portkey_installed_version), Envoy + market-router"
export MR_WASM="${MR_WASM:-$PWD/target/wasm32-wasip1/release/market_router.wasm}"
# GNU timeout signals the whole process group: the mocks, Envoy and Portkey the check started.
timeout 120 target/release/test_layering --portkey "$PORTKEY_JS" \
	--node-preload "$NODE_PRELOAD" "$@"
