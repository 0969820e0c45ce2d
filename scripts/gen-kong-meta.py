#!/usr/bin/env python3
"""Writes kong/market_router.meta.json from schema/market-router.schema.json.

Kong validates a filter's `config_schema` with a JSON Schema draft-4 validator and refuses a
schema whose `$schema` names another draft. The shipped schema uses only keywords that mean
the same in draft 4 and draft 2020-12, so the Kong copy is the same document with the draft-4
`$schema` and without `$id`.

    python3 scripts/gen-kong-meta.py           # (re)write the file
    python3 scripts/gen-kong-meta.py --check   # exit 1 if the file is missing or stale
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schema" / "market-router.schema.json"
META = ROOT / "kong" / "market_router.meta.json"
DRAFT_4 = "http://json-schema.org/draft-04/schema#"


def kong_schema(schema: dict) -> dict:
    """The schema as Kong's draft-4 validator accepts it."""
    out = {"$schema": DRAFT_4}
    out.update((k, v) for k, v in schema.items() if k not in ("$schema", "$id"))
    return out


def render() -> str:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    return json.dumps({"config_schema": kong_schema(schema)}, indent=2, ensure_ascii=False) + "\n"


def main(argv: list) -> int:
    text = render()
    if "--check" in argv:
        if not META.exists() or META.read_text(encoding="utf-8") != text:
            print(f"{META.relative_to(ROOT)} is stale: run python3 scripts/gen-kong-meta.py", file=sys.stderr)
            return 1
        print(f"{META.relative_to(ROOT)} is up to date")
        return 0
    META.write_text(text, encoding="utf-8")
    print(f"wrote {META.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
