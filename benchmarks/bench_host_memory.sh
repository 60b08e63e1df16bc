#!/bin/bash
# The demo student's training step on a CPU with glibc's heap thresholds raised in-process (the
# default, host_memory.keep_freed), left alone (--no-keep-freed-memory) and raised from the
# environment at start-up (MALLOC_*_THRESHOLD_ at 16 GiB, which the tools keep), interleaved.
#   bash benchmarks/bench_host_memory.sh [DATA_PREFIX] [ROUNDS]
# DATA_PREFIX: a tokenized dataset of the teacher's vocabulary (default: a finished demo's
# MiniPLM selection). Prints each run's ms per iteration (iterations 9-16), loss and peak RSS,
# then each arm's mean time against the default's. glibc settings from the environment are
# dropped for the first two arms.
set -euo pipefail
unset MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_ MALLOC_MMAP_MAX_ MALLOC_TOP_PAD_ GLIBC_TUNABLES
cd "$(dirname "$0")/.."
DATA=${1:-$(ls -d demo_runs/select/*/ | head -1)miniplm}
ROUNDS=${2:-3}
PY=${PYTHON:-.venv/bin/python}
run() {  # ARM [FLAG...]
  local arm=$1; shift
  /usr/bin/time -f "peak RSS %M KB" "$PY" tools/pretrain_gpt.py --num-layers 4 --hidden-size 256 \
    --ffn-hidden-size 704 --num-attention-heads 4 --vocab-size 49152 --data-path "$DATA" --seq-length 256 \
    --global-batch-size 16 --micro-batch-size 4 --train-iters 16 --lr 0.001 --log-interval 8 --bf16 "$@" 2>&1 |
    grep -E "iteration +16/|peak RSS" | sed -E 's/.*(loss [0-9.]+).*(grad norm [0-9.]+).*\| ([0-9]+ ms\/iter).*/\3, \1, \2/' |
    sed "s/^/[$arm] /"
}
for _ in $(seq "$ROUNDS"); do
  run kept
  run defaults --no-keep-freed-memory
  MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 run environment
done | tee /dev/stderr |
  awk '/ms\/iter/ {sum[$1] += $2; n[$1]++}
       END {k = sum["[kept]"] / n["[kept]"]
            for (a in sum) if (a != "[kept]") printf "%s / kept: %.2fx (mean ms per iteration %.0f / %.0f)\n", a, (sum[a]/n[a])/k, sum[a]/n[a], k}'
