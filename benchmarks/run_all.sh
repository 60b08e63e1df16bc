#!/usr/bin/env bash
# `make bench`: every benchmark with the command its figures in RESULTS.md came from.
# Run on a quiet machine: each prints ratios against a baseline measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
run() { printf '\n=== %s\n' "$*"; "$PYTHON" "$@"; }
run benchmarks/bench_train.py
run benchmarks/bench_train.py --bf16
run benchmarks/check_smollm2_conversion.py
run benchmarks/bench_score.py --rounds 3
run benchmarks/bench_select.py --instances 100000000 --shards 8 --repeat 3
run benchmarks/bench_select_tool.py --instances 20000000 --shards 8 --rounds 3
run benchmarks/bench_preprocess.py --rounds 3
run benchmarks/bench_import.py --rounds 5
