#!/usr/bin/env bash
# Mutation testing of the core with cargo-mutants (from crates.io): each module in turn, the
# native unit tests only (`cargo test --lib`, and only the lib is built for each mutant: the
# integration tests and examples are not rebuilt), one job, a timeout per mutant. Opt-in and slow
# (minutes per module): `make mutants`, or `make mutants ARGS='crates/core/src/health.rs crates/core/src/attempt.rs'`.
#
# Results: target/mutants/<module>/mutants.out (cargo-mutants' own output) and a summary in
# bench/results/mutants.md: per module caught / missed / timeout / unviable, the share caught
# of the viable mutants, and every surviving mutant, marked equivalent (with the reason
# given in scripts/mutants-equivalent.txt) or MISSED.
#
# Environment:
#   MUTANTS_TIMEOUT=60    seconds allowed for one mutant's test run
#   MUTANTS_JOBS=1        mutants built and tested at once (cargo-mutants --jobs)
#   MUTANTS_VERSION=27.1.0  cargo-mutants version installed when it is missing
#   MUTANTS_SUMMARY_ONLY=1  rewrite the summary from earlier outputs, run nothing
# scripts/mutants-notes.md, when present, is appended to the summary (what the last run
# covered, mutants killed by tests added after it).
#   MUTANTS_ARGS="..."    more cargo-mutants options, e.g. --copy-target=true in a tree whose
#                         target/ holds only a built `cargo test --lib` (skips most of each
#                         module's baseline build)
#   MUTANTS_RETEST=1      re-test, on the current code, the mutants an earlier run of the
#                         module missed, found by what they change (not by line: lines move
#                         as code changes); the summary counts the earlier run's mutants with
#                         the re-test's survivors as the ones missed
#   MUTANTS_ITERATE=1     test again only the mutants an earlier run of the module did not
#                         catch (cargo-mutants --iterate, no baseline run), e.g. after
#                         adding tests
set -euo pipefail

cd "$(dirname "$0")/.."

MODULES=(walk health attempt select market config config/raw config/leaf json request answer headers explain
    decision errors report)
MODULES=("${MODULES[@]/#/crates/core/src/}")
MODULES=("${MODULES[@]/%/.rs}")
TIMEOUT=${MUTANTS_TIMEOUT:-60}
JOBS=${MUTANTS_JOBS:-1}
VERSION=${MUTANTS_VERSION:-27.1.0}
OUT=target/mutants
SUMMARY=bench/results/mutants.md
EQUIVALENT=scripts/mutants-equivalent.txt

log() { echo "mutants: $*" >&2; }

if [ $# -gt 0 ]; then MODULES=("$@"); fi

if [ "${MUTANTS_SUMMARY_ONLY:-}" != 1 ]; then
    if ! cargo mutants --version >/dev/null 2>&1; then
        log "installing cargo-mutants $VERSION from crates.io"
        cargo install --locked --version "$VERSION" cargo-mutants
    fi
    for m in "${MODULES[@]}"; do
        [ -f "$m" ] || { log "no such module: $m"; exit 1; }
        # One output folder per module, named after its path (src/config/raw.rs: config-raw).
        name=$(echo "${m%.rs}" | sed -E 's#^(crates/[^/]+/)?src/##; s#/#-#g')
        log "$m (timeout ${TIMEOUT}s per mutant)"
        mkdir -p "$OUT/$name"
        echo "$m" >"$OUT/$name/module"
        iterate=()
        [ "${MUTANTS_ITERATE:-}" = 1 ] && iterate=(--iterate --baseline=skip)
        if [ "${MUTANTS_RETEST:-}" = 1 ]; then
            missed="$OUT/$name/mutants.out/missed.txt"
            if [ ! -s "$missed" ]; then log "$m: no survivors of an earlier run to re-test"; continue; fi
            # The survivors by what they change, without file, line and column (those move
            # when code changes): every mutant of the current code that matches one is tested.
            mapfile -t res < <(python3 -c '
import re, sys
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if line:
        print(re.escape(line.split(": ", 1)[1]) + "$")' "$missed" | sort -u)
            re_args=()
            for r in "${res[@]}"; do re_args+=(--re "$r"); done
            rm -rf "$OUT/$name/retest"
            CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0 \
                cargo mutants --package market-router-core --file "$m" --jobs "$JOBS" --timeout "$TIMEOUT" --no-shuffle \
                "${re_args[@]}" ${MUTANTS_ARGS:-} --output "$OUT/$name/retest" --cargo-arg=--lib || {
                rc=$?
                [ "$rc" = 2 ] || [ "$rc" = 3 ] || { log "cargo mutants failed on $m (exit $rc)"; exit "$rc"; }
            }
            continue
        fi
        # Exit status 2 means mutants were missed: that is a result, not a failure here.
        CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0 \
            cargo mutants --package market-router-core --file "$m" --jobs "$JOBS" --timeout "$TIMEOUT" --no-shuffle \
            "${iterate[@]}" ${MUTANTS_ARGS:-} --output "$OUT/$name" --cargo-arg=--lib || {
            rc=$?
            [ "$rc" = 2 ] || [ "$rc" = 3 ] || { log "cargo mutants failed on $m (exit $rc)"; exit "$rc"; }
        }
    done
fi

python3 - "$OUT" "$SUMMARY" "$EQUIVALENT" <<'EOF'
import json, pathlib, re, sys

out, summary, equivalent = map(pathlib.Path, sys.argv[1:])
reasons = {}
if equivalent.exists():
    for line in equivalent.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            mutant, _, why = line.partition(" # ")
            reasons[mutant.strip()] = why.strip()

def lines(path):
    return [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()] if path.exists() else []

rows, survivors = [], []
totals = dict(caught=0, missed=0, timeout=0, unviable=0, equivalent=0)
for d in sorted(p for p in out.iterdir() if (p / "mutants.out").is_dir()):
    mo, old = d / "mutants.out", d / "mutants.out.old"
    # After an --iterate run, mutants.out holds only the re-tested mutants and the earlier
    # run's outcomes are in mutants.out.old: a mutant caught in either run is caught.
    union = lambda name: sorted(set(lines(mo / name)) | set(lines(old / name)))
    caught, unviable = union("caught.txt"), union("unviable.txt")
    timeout = sorted(set(union("timeout.txt")) - set(caught))
    missed = [m for m in union("missed.txt") if m not in caught]
    retest = d / "retest" / "mutants.out"
    if retest.is_dir():
        # Survivors re-tested on the current code: what still survives is missed, by its name
        # in the current code; the earlier run's total stays the count of viable mutants.
        again = set(lines(retest / "caught.txt")) | set(lines(retest / "timeout.txt"))
        still = [m for m in lines(retest / "missed.txt") if m not in again]
        caught = caught + ["(re-test) " + m for m in again][: max(0, len(missed) - len(still))]
        missed = still
    equiv = [m for m in missed if m in reasons]
    viable = len(caught) + len(missed) + len(timeout)
    # A timeout is a caught mutant (the tests did not pass); an equivalent one cannot be caught.
    killed = len(caught) + len(timeout)
    share = killed / (viable - len(equiv)) if viable - len(equiv) else 1.0
    module = (d / "module").read_text(encoding="utf-8").strip() if (d / "module").exists() else f"crates/core/src/{d.name}.rs"
    # Every mutant the run found (cargo-mutants lists them before testing): a run stopped
    # early shows fewer tested than found.
    found = mo / "mutants.json"
    found = len(json.loads(found.read_text(encoding="utf-8"))) if found.exists() else None
    tested = viable + len(unviable)
    tested = f"{tested} of {found}" if found is not None and not retest.is_dir() else str(tested)
    rows.append((module, tested, len(caught), len(missed), len(equiv), len(timeout), len(unviable), share))
    for m in missed:
        survivors.append((m, reasons.get(m)))
    for k, v in (("caught", caught), ("missed", missed), ("timeout", timeout), ("unviable", unviable)):
        totals[k] += len(v)
    totals["equivalent"] += len(equiv)

viable = totals["caught"] + totals["missed"] + totals["timeout"]
killable = viable - totals["equivalent"]
share = (totals["caught"] + totals["timeout"]) / killable if killable else 1.0
md = ["# Mutation testing (cargo-mutants, `make mutants`)", "",
      "Native unit tests (`cargo test --lib`) against every mutant cargo-mutants generates in each",
      "core module. Caught share = (caught + timeout) / (viable − equivalent); equivalent mutants",
      "are listed with the reason in `scripts/mutants-equivalent.txt`.", "",
      "| module | tested | caught | missed | of which equivalent | timeout | unviable | caught share |",
      "|---|---:|---:|---:|---:|---:|---:|---:|"]
for name, n, c, m, e, t, u, s in rows:
    md.append(f"| `{name}` | {n} | {c} | {m} | {e} | {t} | {u} | {s:.1%} |")
md.append(f"| **all** | | {totals['caught']} | {totals['missed']} | {totals['equivalent']} | "
          f"{totals['timeout']} | {totals['unviable']} | **{share:.1%}** |")
md += ["", "## Surviving mutants", ""]
if not survivors:
    md.append("None.")
for m, why in survivors:
    md.append(f"- `{m}` — " + (f"equivalent: {why}" if why else "**MISSED**"))
notes = equivalent.with_name("mutants-notes.md")
if notes.exists():
    md += ["", "## Notes on this run", "", notes.read_text(encoding="utf-8").strip()]
summary.parent.mkdir(parents=True, exist_ok=True)
summary.write_text("\n".join(md) + "\n", encoding="utf-8")
print(f"mutants: {share:.1%} of {killable} killable mutants caught; summary in {summary}")
EOF
