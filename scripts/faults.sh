#!/usr/bin/env bash
# `make test-faults`: the fault suite (tests/faults/) on the `faults` stack, which has its
# own ports and data so it can run beside `make run` and `make test`. The scenarios stop and
# start that stack's services themselves (scripts/stack.sh stop|start faults SERVICE) and
# run one at a time; each prints one `fault NAME: ...` line of figures. Exits non-zero if a
# promise is broken. Arguments go to the test harness: `scripts/faults.sh broker` runs the
# scenarios whose names contain "broker".
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
started=$SECONDS

log=$(mktemp)
cleanup() {
    rm -f "$log"
    # CI leaves no process behind; locally the stack stays up to make the next run fast.
    if [[ ${CI:-} == true ]]; then scripts/stack.sh down faults; fi
}
trap cleanup EXIT

scripts/stack.sh install
scripts/stack.sh up faults

# Each scenario makes its own database; drop the ones earlier runs left behind.
faults_db=$(scripts/stack.sh env faults | sed -n 's/^HERALD_DATABASE_URL=//p')
psql "$faults_db" -qtAc \
    "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE);', datname) FROM pg_database WHERE datname LIKE 'herald_fault_%'" \
    | psql "$faults_db" -q >/dev/null

# Hostile input, case by case: the envelope decoder's property tests (no stack needed).
cargo test --lib ingest::decode -- --quiet

status=0
cargo test --test faults -- --test-threads=1 --nocapture "$@" 2>&1 | tee "$log" || status=$?
echo
echo "[faults] figures (Herald logs under target/tmp/faults/):"
grep -o 'fault [a-z]*: .*' "$log" || echo "  none: the suite did not get to run a scenario"
echo "[faults] done in $((SECONDS - started)) s"
exit "$status"
