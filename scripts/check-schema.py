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
  5. the tables in schema/config-cases.json: configurations that must be rejected, edge cases
     that must be accepted (crates/core/src/config/cases_tests.rs runs the same tables through Config::parse).

A folder without files, or a file in which no market-router configuration is found, fails.

Rules the schema cannot express (unique provider names, default_provider naming a configured
provider, market.max_age_ms >= refresh_ms, failover.deadline_ms >= attempt_timeout_ms) are
left to the filter's own validator (crates/core/src/config.rs). Exits 1 on any failure.
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
CASES_PATH = ROOT / "schema" / "config-cases.json"
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


# Files that hold no filter configuration on purpose, each with what it holds instead. Any
# other file in which no configuration is found fails.
NO_FILTER_CONFIG = {
    "istio/market-service.yaml": "the market service's own Kubernetes objects",
}


def check_yaml_folder(folder: str, extract, validators) -> None:
    files = sorted((ROOT / folder).glob("*.yaml"))
    if not files:
        fail(f"{folder}/: no *.yaml (missing folder or empty)")
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
            if rel(path) in NO_FILTER_CONFIG:
                ok(f"{rel(path)}: no {FILTER_NAME} configuration, as listed ({NO_FILTER_CONFIG[rel(path)]})")
            else:
                fail(f"{rel(path)}: no {FILTER_NAME} configuration found in it (list it in NO_FILTER_CONFIG if that is intended)")


def check_config(label: str, config, validators) -> None:
    problems = []
    for name, v in validators:
        problems += [f"[{name}] {e}" for e in errors_of(v, config)]
    if problems:
        fail(f"{label}: " + "; ".join(problems))
    else:
        ok(f"{label}: valid")


# ---- known-bad and edge-case configurations -----------------------------------------------


def load_cases():
    """The must-reject / must-accept tables, shared with crates/core/src/config/cases_tests.rs."""
    doc = json.loads(CASES_PATH.read_text(encoding="utf-8"))
    table = lambda key: [(c["label"], c["config"]) for c in doc[key]]
    return table("must_reject"), table("must_accept"), table("filter_only_reject")


def check_tables(validators) -> None:
    must_reject, must_accept, filter_only = load_cases()
    if not must_reject or not must_accept:
        fail(f"{rel(CASES_PATH)}: an empty table checks nothing")
    for label, doc in must_reject:
        accepted_by = [name for name, v in validators if v.is_valid(doc)]
        if accepted_by:
            fail(f"must reject: {label}: accepted by {', '.join(accepted_by)}")
        else:
            ok(f"rejects {label}")
    for label, doc in must_accept:
        problems = []
        for name, v in validators:
            problems += [f"[{name}] {e}" for e in errors_of(v, doc)]
        if problems:
            fail(f"must accept: {label}: " + "; ".join(problems))
        else:
            ok(f"accepts {label}")
    # Rules only the filter's validator knows: if the schema learns one, move it to must_reject.
    for label, doc in filter_only:
        rejected_by = [name for name, v in validators if not v.is_valid(doc)]
        if rejected_by:
            fail(f"filter_only_reject: {label}: the schema rejects it too ({', '.join(rejected_by)}): move it to must_reject")
        else:
            ok(f"leaves to the filter: {label}")


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
        fail("examples/configs/: no *.json (missing folder or empty)")
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
