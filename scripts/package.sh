#!/usr/bin/env bash
# make package: the release module and what a gateway needs next to it, in
# dist/market-router-<version>/ and dist/market-router-<version>.tar.gz (version from
# Cargo.toml). Prints the module's sha256 and checks the .sha256 file with sha256sum -c.
set -euo pipefail

cd "$(dirname "$0")/.."

version="$(awk -F'"' '/^\[/ { in_pkg = ($0 == "[package]") } in_pkg && /^version[[:space:]]*=/ { print $2; exit }' Cargo.toml)"
[ -n "$version" ] || { echo "package: no [package] version in Cargo.toml" >&2; exit 1; }
name="market-router-$version"
wasm="target/wasm32-wasip1/release/market_router.wasm"
out="dist/$name"

# Always the release build, whatever BUILD the caller set.
make --no-print-directory build BUILD=release
[ -s "$wasm" ] || { echo "package: $wasm is missing after make build" >&2; exit 1; }
for f in kong/market_router.meta.json schema/market-router.schema.json; do
	[ -s "$f" ] || { echo "package: $f is missing" >&2; exit 1; }
done

rm -rf "$out" "dist/$name.tar.gz"
mkdir -p "$out"
install -m 0644 "$wasm" "$out/market_router.wasm"
install -m 0644 kong/market_router.meta.json "$out/market_router.meta.json"
install -m 0644 schema/market-router.schema.json "$out/market-router.schema.json"
(cd "$out" && sha256sum market_router.wasm >market_router.wasm.sha256)
sha="$(cut -d' ' -f1 "$out/market_router.wasm.sha256")"
size="$(wc -c <"$out/market_router.wasm" | tr -d ' ')"

title="market-router $version"
cat >"$out/README.txt" <<TXT
$title
${title//?/=}

A proxy-wasm HTTP filter (wasm32-wasip1) that routes OpenAI-compatible LLM requests across
providers by live market stats and fails over between them. Needs a host with the proxy-wasm
ABI 0.2.1 (Envoy >= 1.35 with the V8 runtime; Kong >= 3.6 with wasm on).

Files
-----
market_router.wasm          the filter module ($size bytes). Root id: market_router.
market_router.wasm.sha256   its SHA-256 in sha256sum format; check with
                              sha256sum -c market_router.wasm.sha256
                            sha256: $sha
market_router.meta.json     Kong's filter metadata: the configuration's JSON Schema under
                            "config_schema". Kong reads it from next to the .wasm file.
market-router.schema.json   the same configuration's JSON Schema (draft-04), for editors,
                            CI checks and other hosts.
README.txt                  this file.

How gateways fetch the module
-----------------------------
Publish market_router.wasm at an HTTPS URL (or in an OCI registry) and give the host its
sha256 so it refuses any other bytes.

Istio (WasmPlugin, istio-agent downloads and caches the module):
    spec:
      url: https://downloads.example.com/market-router/$version/market_router.wasm
      sha256: $sha
      pluginName: market_router
  The filter needs the Envoy wasm setting allow_on_headers_stop_iteration: true, which
  WasmPlugin does not expose yet: use the EnvoyFilter form (extension config with
  vm_config.code.remote.http_uri.uri = the URL above and sha256 = $sha).

Envoy Gateway (EnvoyExtensionPolicy):
    wasm:
    - name: market-router
      rootID: market_router
      code:
        type: HTTP
        http:
          url: https://downloads.example.com/market-router/$version/market_router.wasm
          sha256: $sha
  allow_on_headers_stop_iteration is set with an EnvoyPatchPolicy.

Envoy (bootstrap or xDS): vm_config.code.local.filename pointing at the file, or
  vm_config.code.remote { http_uri { uri, cluster, timeout }, sha256: $sha }, and
  allow_on_headers_stop_iteration: true in the filter's config.

Kong (>= 3.6): copy market_router.wasm and market_router.meta.json into the directory named
  by wasm_filters_path (kong.conf: wasm = on, wasm_filters_path = /usr/local/kong/wasm); the
  filter is then called "market_router" in filter_chains. Check the copy with sha256sum -c
  first. Kong needs failover.mode "dispatch" and an shm_kv zone for the filter's shared data
  (nginx_wasm_shm_kv_mr).
TXT

(cd "$out" && sha256sum -c market_router.wasm.sha256)

# Reproducible archive: fixed order, owner and times; gzip without a timestamp.
mtime="$(git log -1 --format=%cI 2>/dev/null || echo 1970-01-01T00:00:00Z)"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="$mtime" \
	-C dist -cf - "$name" | gzip -n -9 >"dist/$name.tar.gz"
tar -tzf "dist/$name.tar.gz" >/dev/null

echo "package: dist/$name/ and dist/$name.tar.gz ($(wc -c <"dist/$name.tar.gz" | tr -d ' ') bytes)"
echo "package: sha256 $sha  market_router.wasm"
