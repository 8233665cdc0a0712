#!/usr/bin/env bash
# `make bench`: Herald's benchmarks on the local test stack, release build. Prints one line
# per figure and writes them as JSON under bench/results/.
#
#   scripts/bench.sh [EVENTS] [BACKLOG] [RATE]   defaults 100000 5000 200
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
events=${1:-100000} backlog=${2:-5000} rate=${3:-200}

scripts/stack.sh install
scripts/stack.sh up bench
while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep '^HERALD_' || true)
while IFS='=' read -r name value; do export "$name=$value"; done < <(scripts/stack.sh env bench)
export RUST_LOG=${RUST_LOG:-warn}

echo "[bench] building (release)" >&2
cargo build --release --quiet --example ingest_throughput --example dispatch_throughput

mkdir -p bench/results
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ).txt
{
    ./target/release/examples/ingest_throughput "$events"
    ./target/release/examples/dispatch_throughput "$backlog" "$rate"
} 2>/dev/null | tee "$out"

python3 - "$out" <<'PY'
import json, re, sys, platform, os
text = open(sys.argv[1]).read()
figures = {}
m = re.search(r"ingest: (\d+) events .*?; ([\d.]+) s from the first stored \((\d+) events/s\)", text)
if m: figures["ingest_events_per_s"] = int(m.group(3)); figures["ingest_events"] = int(m.group(1))
for channel, rate in re.findall(r"dispatch (\w+): \d+ deliveries in [\d.]+ s = (\d+)/s", text):
    figures[f"dispatch_{channel.lower()}_per_s"] = int(rate)
m = re.search(r"at (\d+) notifications/s .*: p50 ([\d.]+) ms, p99 ([\d.]+) ms", text)
if m: figures.update(latency_rate_per_s=int(m.group(1)), latency_p50_ms=float(m.group(2)), latency_p99_ms=float(m.group(3)))
figures["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
path = sys.argv[1].replace(".txt", ".json")
json.dump(figures, open(path, "w"), indent=2)
print(f"[bench] figures written to {path}", file=sys.stderr)
PY
