#!/bin/bash
# `make bench`: runs ci/bench/guest.sh where ublk_drv is (a VM if needed),
# keeps every run in target/bench/runs.jsonl and the table in
# target/bench/summary.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p target/bench
VM_MEM=${VM_MEM:-4G} bash ci/in-ublk-env.sh "${BENCH_SCRIPT:-ci/bench/guest.sh}" | tee target/bench/guest.log
sed -n 's/^bench-json: //p' target/bench/guest.log > target/bench/runs.jsonl
python3 "${BENCH_SUMMARY:-ci/bench/summarize.py}" target/bench/runs.jsonl > target/bench/summary.md
[ -n "${BENCH_SUMMARY:-}" ] || python3 ci/bench/chart.py target/bench/runs.jsonl target/bench || true
cat target/bench/summary.md
echo "bench: results in target/bench/ (runs.jsonl, results.json, summary.md, chart.png)"
