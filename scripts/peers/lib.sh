# Shared by scripts/bench-peers.sh and scripts/test-layering.sh (sourced, not run): installs
# the peers into project-local, git-ignored directories and finds the binaries.
#   .venv-peers/  LiteLLM proxy (PyPI `litellm[proxy]`)
#   .node-peers/  Portkey's open-source gateway (npm `@portkey-ai/gateway`)
# Each installer prints why it failed and returns non-zero; callers report the peer as not
# measured instead of failing the whole run.

# Pinned versions. LiteLLM 1.107.0 was a compromised release: never use it.
LITELLM_VERSION="${LITELLM_VERSION:-1.108.0}"
PORTKEY_VERSION="${PORTKEY_VERSION:-1.15.2}"
PEERS_INSTALL_TIMEOUT="${PEERS_INSTALL_TIMEOUT:-420}"

PEERS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LITELLM_VENV="$PEERS_ROOT/.venv-peers"
LITELLM_BIN="$LITELLM_VENV/bin/litellm"
PORTKEY_DIR="$PEERS_ROOT/.node-peers"
PORTKEY_JS="$PORTKEY_DIR/node_modules/@portkey-ai/gateway/build/start-server.js"
NODE_PRELOAD="$PEERS_ROOT/scripts/peers/loopback.mjs"

# Installed version of a package in the peers' venv ("" if none).
litellm_installed_version() {
	[ -x "$LITELLM_VENV/bin/python" ] || return 0
	"$LITELLM_VENV/bin/python" -c \
		'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null || true
}

portkey_installed_version() {
	local pkg="$PORTKEY_DIR/node_modules/@portkey-ai/gateway/package.json"
	[ -f "$pkg" ] || return 0
	node -e 'console.log(require(process.argv[1]).version)' "$pkg" 2>/dev/null || true
}

# Installs litellm[proxy]==$LITELLM_VERSION unless it is there. Prints the reason on failure.
install_litellm() {
	if [ "$LITELLM_VERSION" = 1.107.0 ]; then
		echo "LiteLLM 1.107.0 is a compromised release; refusing to install it" >&2
		return 1
	fi
	if [ "$(litellm_installed_version)" = "$LITELLM_VERSION" ] && [ -x "$LITELLM_BIN" ]; then
		return 0
	fi
	command -v python3 >/dev/null || { echo "python3 is not installed" >&2; return 1; }
	[ -x "$LITELLM_VENV/bin/python" ] || python3 -m venv "$LITELLM_VENV" ||
		{ echo "python3 -m venv $LITELLM_VENV failed" >&2; return 1; }
	echo "peers: installing litellm[proxy]==$LITELLM_VERSION into .venv-peers (timeout ${PEERS_INSTALL_TIMEOUT}s)"
	local log
	log="$(mktemp)"
	if ! timeout "$PEERS_INSTALL_TIMEOUT" "$LITELLM_VENV/bin/pip" install \
		--disable-pip-version-check -q "litellm[proxy]==$LITELLM_VERSION" >"$log" 2>&1; then
		echo "pip install litellm[proxy]==$LITELLM_VERSION failed or timed out: $(tail -n 2 "$log" | tr '\n' ' ')" >&2
		rm -f "$log"
		return 1
	fi
	rm -f "$log"
	[ -x "$LITELLM_BIN" ] || { echo "no litellm executable in .venv-peers after install" >&2; return 1; }
}

# Installs @portkey-ai/gateway@$PORTKEY_VERSION unless it is there. Prints the reason on failure.
install_portkey() {
	command -v node >/dev/null || { echo "node is not installed" >&2; return 1; }
	command -v npm >/dev/null || { echo "npm is not installed" >&2; return 1; }
	if [ "$(portkey_installed_version)" = "$PORTKEY_VERSION" ] && [ -f "$PORTKEY_JS" ]; then
		return 0
	fi
	mkdir -p "$PORTKEY_DIR"
	[ -f "$PORTKEY_DIR/package.json" ] ||
		printf '{ "name": "market-router-peers", "private": true }\n' >"$PORTKEY_DIR/package.json"
	echo "peers: installing @portkey-ai/gateway@$PORTKEY_VERSION into .node-peers (timeout ${PEERS_INSTALL_TIMEOUT}s)"
	local log
	log="$(mktemp)"
	if ! (cd "$PORTKEY_DIR" && timeout "$PEERS_INSTALL_TIMEOUT" npm install --no-audit --no-fund \
		--save-exact "@portkey-ai/gateway@$PORTKEY_VERSION") >"$log" 2>&1; then
		echo "npm install @portkey-ai/gateway@$PORTKEY_VERSION failed or timed out: $(tail -n 2 "$log" | tr '\n' ' ')" >&2
		rm -f "$log"
		return 1
	fi
	rm -f "$log"
	[ -f "$PORTKEY_JS" ] || { echo "no build/start-server.js in the installed package" >&2; return 1; }
}
