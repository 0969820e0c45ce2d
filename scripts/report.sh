#!/usr/bin/env bash
# Per-provider report (requests, failures, tokens, cost, effective cost, upstream latency) from a
# running Envoy's admin interface, plus an SVG chart. Arguments go to tools/src/bin/report.rs:
#   scripts/report.sh [--admin http://127.0.0.1:9901] [--out report.svg] [--config plugin.json]
# From make: make report ARGS='--admin http://127.0.0.1:9901 --out report.svg'
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec cargo run --quiet --release --manifest-path "$root/Cargo.toml" -p market-router-tools --bin report -- "$@"
