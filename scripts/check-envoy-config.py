#!/usr/bin/env python3
"""Checks that Envoy configs in envoy mode match their plugin configuration.

usage: check-envoy-config.py GENERATOR FILE...

GENERATOR is the market-router-envoy-config binary. For every listener whose market-router
filter runs with `failover.mode: envoy`, the generator's pieces for that plugin configuration
must be in the file: its HTTP filters in order (others may stand between), its LLM route
entry, and on every provider cluster the upstream role first and the codec last in
`HttpProtocolOptions.http_filters`, with room for as many concurrent retries. A piece is in
the file when every field the generator sets has that value there (the file may set more,
e.g. an idle timeout); buffer limits and retry room may be larger. No route of that listener may
take its cluster from a request header. Files without a filter in envoy mode are skipped.
Exits 1 naming the file and what differs.
"""

import json
import subprocess
import sys

import yaml

HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def hcms(doc):
    for listener in (doc.get("static_resources") or {}).get("listeners") or []:
        for chain in listener.get("filter_chains") or []:
            for f in chain.get("filters") or []:
                if f.get("name") == "envoy.filters.network.http_connection_manager":
                    yield listener.get("name", "?"), f.get("typed_config") or {}


def market_router(filters):
    for f in filters:
        cfg = ((f.get("typed_config") or {}).get("config")) or {}
        if f.get("name") == "envoy.filters.http.wasm" and cfg.get("root_id") == "market_router":
            return cfg
    return None


def subset(want, have):
    """Every field of `want` has the same value in `have` (which may have more fields)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(
            subset(w, h) for w, h in zip(want, have))
    return want == have


def is_subsequence(want, have):
    it = iter(have)
    return all(any(subset(w, h) for h in it) for w in want)


def route_matches(want, r):
    limit = "request_body_buffer_limit"
    return (subset(want["match"], r.get("match")) and subset(want["route"], r.get("route"))
            and (r.get(limit) or 0) >= want[limit])


def retry_room(breakers):
    for t in (breakers or {}).get("thresholds") or []:
        if t.get("priority", "DEFAULT") == "DEFAULT":
            return t.get("max_retries") or 0
    return 3


def check(generator, path):
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    problems = []
    checked = 0
    clusters = {c.get("name"): c for c in (doc.get("static_resources") or {}).get("clusters") or []}
    for listener, hcm in hcms(doc):
        filters = hcm.get("http_filters") or []
        mr = market_router(filters)
        if mr is None:
            continue
        text = mr["configuration"]["value"]
        try:
            mode = json.loads(text).get("failover", {}).get("mode", "route")
        except json.JSONDecodeError as e:
            problems.append(f"listener {listener}: the plugin configuration is not JSON ({e})")
            continue
        if mode != "envoy":
            continue
        checked += 1
        wasm = mr["vm_config"]["code"]["local"]["filename"]
        out = subprocess.run(
            [generator, "--config", "-", "--wasm", wasm, "--format", "json"],
            input=text, capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            problems.append(f"listener {listener}: {out.stderr.strip()}")
            continue
        want = json.loads(out.stdout)
        if not is_subsequence(want["http_filters"], filters):
            names = [f.get("name") for f in filters]
            problems.append(
                f"listener {listener}: http_filters {names} do not contain the generated ones, "
                "in order and unchanged (market-router-envoy-config prints them)")
        routes = [r for vh in (hcm.get("route_config") or {}).get("virtual_hosts") or []
                  for r in vh.get("routes") or []]
        route = want["llm_route"]
        if not any(route_matches(route, r) for r in routes):
            problems.append(
                f"listener {listener}: no route equals the generated llm_route (its priority "
                "groups, retry policy and buffer limit must match the plugin's providers)")
        for r in routes:
            if "cluster_header" in (r.get("route") or {}):
                problems.append(
                    f"listener {listener}: route {r.get('match')} takes its cluster from a "
                    "request header; in envoy mode a client must never pick a cluster")
        for name in want["provider_clusters"]:
            c = clusters.get(name)
            if c is None:
                problems.append(f"cluster {name}: missing (a provider of listener {listener})")
                continue
            ups = (((c.get("typed_extension_protocol_options") or {}).get(HPO)) or {}).get(
                "http_filters") or []
            gen = want["cluster_upstream_http_filters"]
            if not ups or not subset(gen[0], ups[0]) or not subset(gen[-1], ups[-1]):
                problems.append(
                    f"cluster {name}: HttpProtocolOptions.http_filters must start with the "
                    "generated upstream role and end with the generated upstream codec")
            room = retry_room(want["cluster_circuit_breakers"])
            if retry_room(c.get("circuit_breakers")) < room:
                problems.append(
                    f"cluster {name}: circuit_breakers allow fewer than {room} concurrent retries")
    return checked, problems


def main():
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    generator, files = sys.argv[1], sys.argv[2:]
    failed = False
    for path in files:
        checked, problems = check(generator, path)
        for p in problems:
            print(f"envoy-config: {path}: {p}", file=sys.stderr)
        failed |= bool(problems)
        if checked and not problems:
            print(f"envoy-config: {path}: envoy mode pieces match the plugin configuration")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
