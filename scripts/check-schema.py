#!/usr/bin/env python3
"""Checks schema/market-router.schema.json and every filter configuration shipped in the repo.

Run from anywhere with the project venv (created by `make envoy`):

    .venv/bin/pip install jsonschema pyyaml
    .venv/bin/python scripts/check-schema.py

What it checks:
  1. the schema against the JSON Schema 2020-12 metaschema;
  2. kong/market_router.meta.json: equal to what scripts/gen-kong-meta.py writes, and its
     config_schema valid against the draft-4 metaschema (the draft Kong validates with);
  3. every market-router configuration found in envoy/*.yaml (the wasm filter's
     `configuration` StringValue), istio/*.yaml (same, inside EnvoyFilter patches),
     envoy-gateway/*.yaml (EnvoyExtensionPolicy wasm `config`), kong/*.yaml (filter_chains
     `config`, also against the Kong draft-4 copy) and examples/configs/*.json;
  4. YAML syntax of every file in those folders;
  5. a table of configurations that must be rejected, and edge cases that must be accepted.

Rules the schema cannot express (unique provider names, default_provider naming a configured
provider, market.max_age_ms >= refresh_ms, failover.deadline_ms >= attempt_timeout_ms) are
left to the filter's own validator (src/config.rs). Exits 1 on any failure.
"""
import importlib.util
import json
import pathlib
import sys

try:
    import jsonschema
    import yaml
except ImportError as e:  # pragma: no cover - depends on the environment
    print(
        f"check-schema: missing Python package ({e.name}).\n"
        "  Install into the project venv:  .venv/bin/pip install jsonschema pyyaml\n"
        "  then run:                       .venv/bin/python scripts/check-schema.py",
        file=sys.stderr,
    )
    sys.exit(2)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "schema" / "market-router.schema.json"
FILTER_NAME = "market_router"
STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"

passed = 0
failed = 0


def ok(msg: str) -> None:
    global passed
    passed += 1
    print(f"  ok    {msg}")


def fail(msg: str) -> None:
    global failed
    failed += 1
    print(f"  FAIL  {msg}")


def rel(p: pathlib.Path) -> str:
    return str(p.relative_to(ROOT))


def errors_of(validator, doc) -> list:
    """Readable validation errors, deepest path first."""
    out = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(x) for x in e.absolute_path) or "(root)"
        out.append(f"{where}: {e.message}")
    return out


def load_gen_kong_meta():
    spec = importlib.util.spec_from_file_location("gen_kong_meta", ROOT / "scripts" / "gen-kong-meta.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- configurations embedded in host configs ----------------------------------------------


def walk(node):
    """Yields every mapping in a YAML document."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def wasm_configs(doc):
    """market-router configurations of Envoy wasm PluginConfigs (JSON in a StringValue)."""
    for m in walk(doc):
        conf = m.get("configuration")
        if not isinstance(conf, dict) or conf.get("@type") != STRING_VALUE:
            continue
        if FILTER_NAME not in (m.get("name"), m.get("root_id")):
            continue
        yield f"wasm config {m.get('name')!r}", conf.get("value")


def gateway_configs(doc):
    """EnvoyExtensionPolicy wasm entries of this filter (config as YAML)."""
    if not isinstance(doc, dict) or doc.get("kind") != "EnvoyExtensionPolicy":
        return
    for w in (doc.get("spec") or {}).get("wasm") or []:
        if w.get("rootID") == FILTER_NAME:
            yield f"EnvoyExtensionPolicy {doc['metadata']['name']!r} wasm {w.get('name')!r}", w.get("config")


def kong_configs(doc):
    """filter_chains entries of this filter, anywhere in a Kong declarative config."""
    for m in walk(doc):
        for chain in m.get("filter_chains") or []:
            for f in chain.get("filters") or []:
                if f.get("name") == FILTER_NAME:
                    yield f"filter chain {chain.get('name')!r}", f.get("config")


def as_json(value):
    """A configuration given as a JSON string or as a parsed object."""
    if isinstance(value, str):
        return json.loads(value)
    return value


def check_yaml_folder(folder: str, extract, validators) -> None:
    files = sorted((ROOT / folder).glob("*.yaml"))
    if not files:
        print(f"  (no {folder}/*.yaml)")
        return
    for path in files:
        try:
            docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except yaml.YAMLError as e:
            fail(f"{rel(path)}: YAML syntax: {e}")
            continue
        ok(f"{rel(path)}: YAML syntax ({len(docs)} document{'s' if len(docs) != 1 else ''})")
        found = 0
        for doc in docs:
            for label, raw in extract(doc):
                found += 1
                try:
                    config = as_json(raw)
                except json.JSONDecodeError as e:
                    fail(f"{rel(path)}: {label}: not JSON: {e}")
                    continue
                check_config(f"{rel(path)}: {label}", config, validators)
        if found == 0:
            print(f"  note  {rel(path)}: no {FILTER_NAME} configuration in it")


def check_config(label: str, config, validators) -> None:
    problems = []
    for name, v in validators:
        problems += [f"[{name}] {e}" for e in errors_of(v, config)]
    if problems:
        fail(f"{label}: " + "; ".join(problems))
    else:
        ok(f"{label}: valid")


# ---- known-bad and edge-case configurations -----------------------------------------------

P = {"name": "a", "cluster": "c", "models": {"m": "m-id"}}


def with_(**top):
    doc = {"providers": [dict(P)]}
    doc.update(top)
    return doc


def provider(**fields):
    p = dict(P)
    p.update(fields)
    return {"providers": [p]}


MUST_REJECT = [
    ("root is not an object", [1]),
    ("providers missing", {}),
    ("providers empty", {"providers": []}),
    ("unknown top-level field", with_(bogus=1)),
    ("unknown nested field (routing.stratgy)", with_(routing={"stratgy": "fastest"})),
    ("unknown provider field", provider(weight=1)),
    ("bad strategy", with_(routing={"strategy": "fastes"})),
    ("failover.max_attempts 0", with_(failover={"max_attempts": 0})),
    ("failover.max_attempts 11", with_(failover={"max_attempts": 11})),
    ("failover.max_attempts 2.5", with_(failover={"max_attempts": 2.5})),
    ("failover.mode hedge", with_(failover={"mode": "hedge"})),
    ("failover.retry_on unknown value", with_(failover={"retry_on": ["5xx", "boom"]})),
    ("failover.retry_on_status 200", with_(failover={"retry_on_status": [200]})),
    ("failover.circuit.failure_threshold 0", with_(failover={"circuit": {"failure_threshold": 0}})),
    ("provider without models", {"providers": [{"name": "a", "cluster": "c"}]}),
    ("provider without cluster", {"providers": [{"name": "a", "models": {"m": "m"}}]}),
    ("models empty", provider(models={})),
    ("model id empty", provider(models={"m": ""})),
    ("model name empty", provider(models={"": "m"})),
    ("model id not a string", provider(models={"m": 1})),
    ("cluster not a string", provider(cluster=42)),
    ("cluster empty", provider(cluster="")),
    ("provider name with a space", provider(name="a b")),
    ("provider name of 65 characters", provider(name="x" * 65)),
    ("provider_type corp", provider(provider_type="corp")),
    ("static_offer without price", provider(static_offer={"uptime": 0.9})),
    ("static_offer negative price", provider(static_offer={"price": {"input_per_mtok": -1, "output_per_mtok": 1}})),
    ("static_offer uptime 1.5", provider(static_offer={"price": {"input_per_mtok": 1, "output_per_mtok": 1}, "uptime": 1.5})),
    ("static_offer ttft_p50 0", provider(static_offer={"price": {"input_per_mtok": 1, "output_per_mtok": 1}, "latency_ms": {"ttft_p50": 0}})),
    ("routing.weights all zero", with_(routing={"weights": {"price": 0, "latency": 0, "reliability": 0}})),
    ("routing.weights negative", with_(routing={"weights": {"price": -1}})),
    ("constraints.min_uptime 1.5", with_(routing={"constraints": {"min_uptime": 1.5}})),
    ("constraints.provider_types unknown", with_(routing={"constraints": {"provider_types": ["corp"]}})),
    ("constraints.regions empty string", with_(routing={"constraints": {"regions": [""]}})),
    ("cluster_header with a space", with_(routing={"cluster_header": "X Cluster"})),
    ("affinity_header upper case", with_(routing={"affinity_header": "X-Session-Id"})),
    ("rollout_percent 50 without default_provider", with_(routing={"rollout_percent": 50})),
    ("rollout_percent 101", with_(routing={"rollout_percent": 101, "default_provider": "a"})),
    ("default_output_tokens 0", with_(routing={"default_output_tokens": 0})),
    ("market without cluster", with_(market={"refresh_ms": 5000})),
    ("market.path without /", with_(market={"cluster": "s", "path": "snapshot"})),
    ("market.refresh_ms 99", with_(market={"cluster": "s", "refresh_ms": 99})),
    ("market.timeout_ms 60001", with_(market={"cluster": "s", "timeout_ms": 60001})),
    ("limits.max_body_bytes 0", with_(limits={"max_body_bytes": 0})),
    ("limits.max_body_bytes 64 MiB + 1", with_(limits={"max_body_bytes": (64 << 20) + 1})),
    ("response_headers not a boolean", with_(response_headers="yes")),
    ("decision_record not a boolean", with_(decision_record=1)),
    ("routing.ttft_target_ms 0", with_(routing={"ttft_target_ms": 0})),
    ("shared_data_prefix with /", with_(shared_data_prefix="a/b")),
    ("explain.path_prefix without leading /", with_(explain={"path_prefix": "mr/"})),
    ("explain.path_prefix with trailing /", with_(explain={"path_prefix": "/mr/"})),
    ("explain.path_prefix with ?", with_(explain={"path_prefix": "/mr?x"})),
]

MUST_ACCEPT = [
    ("minimal provider", with_()),
    ("one weight zero, others default", with_(routing={"weights": {"price": 0}})),
    ("rollout 50 with default_provider", with_(routing={"rollout_percent": 50, "default_provider": "a"})),
    ("rollout 100 without default_provider", with_(routing={"rollout_percent": 100})),
    ("retry_on empty (never fail over)", with_(failover={"retry_on": []})),
    ("explain disabled", with_(explain={"enabled": False})),
    ("seed 0 and largest u64", with_(routing={"seed": 18446744073709551615})),
    ("self_hosted provider with region", provider(provider_type="self_hosted", region="on-prem")),
    ("Kong-style host:port clusters", {"providers": [dict(P, cluster="api.example.com:443")],
                                       "market": {"cluster": "127.0.0.1:8090"},
                                       "failover": {"mode": "dispatch"}}),
]


def check_tables(validators) -> None:
    for label, doc in MUST_REJECT:
        accepted_by = [name for name, v in validators if v.is_valid(doc)]
        if accepted_by:
            fail(f"must reject: {label}: accepted by {', '.join(accepted_by)}")
        else:
            ok(f"rejects {label}")
    for label, doc in MUST_ACCEPT:
        problems = []
        for name, v in validators:
            problems += [f"[{name}] {e}" for e in errors_of(v, doc)]
        if problems:
            fail(f"must accept: {label}: " + "; ".join(problems))
        else:
            ok(f"accepts {label}")


# ---- main ---------------------------------------------------------------------------------


def main() -> int:
    print("schema")
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
        ok(f"{rel(SCHEMA_PATH)}: valid JSON Schema 2020-12")
    except jsonschema.SchemaError as e:
        fail(f"{rel(SCHEMA_PATH)}: {e.message}")
        return summary()
    strict = jsonschema.Draft202012Validator(schema)

    print("kong meta.json")
    gen = load_gen_kong_meta()
    meta_path = gen.META
    if not meta_path.exists():
        fail(f"{rel(meta_path)}: missing (run python3 scripts/gen-kong-meta.py)")
        return summary()
    if meta_path.read_text(encoding="utf-8") == gen.render():
        ok(f"{rel(meta_path)}: identical to the output of scripts/gen-kong-meta.py")
    else:
        fail(f"{rel(meta_path)}: stale, differs from scripts/gen-kong-meta.py output (run it)")
    kong_schema = json.loads(meta_path.read_text(encoding="utf-8")).get("config_schema")
    same_rules = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
    if {k: v for k, v in (kong_schema or {}).items() if k != "$schema"} == same_rules:
        ok(f"{rel(meta_path)}: config_schema has the same rules as the schema (only $schema differs)")
    else:
        fail(f"{rel(meta_path)}: config_schema rules differ from {rel(SCHEMA_PATH)}")
    try:
        jsonschema.Draft4Validator.check_schema(kong_schema)
        ok(f"{rel(meta_path)}: config_schema is a valid draft-4 schema")
    except jsonschema.SchemaError as e:
        fail(f"{rel(meta_path)}: config_schema: {e.message}")
        return summary()
    kong = jsonschema.Draft4Validator(kong_schema)
    both = [("2020-12", strict), ("kong draft-4", kong)]

    print("examples/configs")
    examples = sorted((ROOT / "examples" / "configs").glob("*.json"))
    if not examples:
        print("  (no examples/configs/*.json)")
    for path in examples:
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            fail(f"{rel(path)}: not JSON: {e}")
            continue
        check_config(rel(path), config, both)

    print("envoy")
    check_yaml_folder("envoy", wasm_configs, [("2020-12", strict)])
    print("kong")
    check_yaml_folder("kong", kong_configs, both)
    print("istio (example, YAML syntax and embedded configuration only)")
    check_yaml_folder("istio", wasm_configs, [("2020-12", strict)])
    print("envoy-gateway (example, YAML syntax and embedded configuration only)")
    check_yaml_folder("envoy-gateway", gateway_configs, [("2020-12", strict)])

    print("must reject / must accept")
    check_tables(both)
    return summary()


def summary() -> int:
    print(f"check-schema: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
