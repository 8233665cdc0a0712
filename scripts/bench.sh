#!/usr/bin/env bash
# `make bench`: Herald's benchmark (examples/bench) on the bench stack, release build. Prints
# one line per figure and writes them as JSON under bench/results/. Arguments go to the
# benchmark (`scripts/bench.sh --help` lists them; `--events 20000` for a quick run).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

scripts/stack.sh install
# A fresh stack each run, so that runs compare: Tansu keeps every earlier run's topics in
# memory (gigabytes after a few runs), and earlier runs' databases fill PostgreSQL's cache.
scripts/stack.sh down bench
scripts/stack.sh up bench
bench_db=$(scripts/stack.sh env bench | sed -n 's/^HERALD_DATABASE_URL=//p')
psql "$bench_db" -qtAc \
    "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE);', datname) FROM pg_database WHERE datname LIKE 'herald_bench_%'" \
    | psql "$bench_db" -q >/dev/null
while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep '^HERALD_' || true)
while IFS='=' read -r name value; do export "$name=$value"; done < <(scripts/stack.sh env bench)
export RUST_LOG=${RUST_LOG:-warn}

echo "[bench] building (release)" >&2
cargo build --release --quiet --bin herald --example bench

mkdir -p bench/results
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)
./target/release/examples/bench --out "$out.json" "$@" 2>"$out.log" | tee "$out.txt"
echo "[bench] figures in $out.json, logs in $out.log and bench/results/herald-*.log" >&2
