#!/bin/bash
# The demo student's training step on a CPU with glibc's heap thresholds raised (the default,
# host_memory.keep_freed) and left alone (--no-keep-freed-memory), interleaved.
#   bash benchmarks/bench_host_memory.sh [DATA_PREFIX] [ROUNDS]
# DATA_PREFIX: a tokenized dataset of the teacher's vocabulary (default: a finished demo's
# MiniPLM selection). Prints each run's ms per iteration (iterations 9-16), loss and peak RSS,
# then the ratio of the mean times. glibc settings from the environment are dropped for both.
set -euo pipefail
unset MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_ MALLOC_MMAP_MAX_ MALLOC_TOP_PAD_ GLIBC_TUNABLES
cd "$(dirname "$0")/.."
DATA=${1:-$(ls -d demo_runs/select/*/ | head -1)miniplm}
ROUNDS=${2:-3}
PY=${PYTHON:-.venv/bin/python}
run() {
  /usr/bin/time -f "peak RSS %M KB" "$PY" tools/pretrain_gpt.py --num-layers 4 --hidden-size 256 \
    --ffn-hidden-size 704 --num-attention-heads 4 --vocab-size 49152 --data-path "$DATA" --seq-length 256 \
    --global-batch-size 16 --micro-batch-size 4 --train-iters 16 --lr 0.001 --log-interval 8 --bf16 "$@" 2>&1 |
    grep -E "iteration +16/|peak RSS" | sed -E 's/.*(loss [0-9.]+).*(grad norm [0-9.]+).*\| ([0-9]+ ms\/iter).*/\3, \1, \2/' |
    sed "s/^/[${1:-kept}] /"
}
for _ in $(seq "$ROUNDS"); do run; run --no-keep-freed-memory; done | tee /dev/stderr |
  awk '/ms\/iter/ {t = $2 + 0; if ($1 == "[kept]") {k += t; nk++} else {d += t; nd++}}
       END {printf "glibc defaults / kept: %.2fx (mean ms per iteration %.0f / %.0f)\n", (d/nd)/(k/nk), d/nd, k/nk}'
