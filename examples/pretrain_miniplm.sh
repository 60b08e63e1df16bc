#!/usr/bin/env bash
# The whole MiniPLM pipeline: preprocess -> split D_ref -> train reference ->
# import teacher -> score -> Difference Sampling -> train students -> evaluate.
#
# Every setting is an environment variable with a small CPU default; the same
# script drives a multi-node run (set NNODES, NODE_RANK, MASTER_ADDR, NPROC_PER_NODE).
# A stage whose outputs exist and are complete is skipped, so an interrupted
# pipeline resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
WORK_DIR=${WORK_DIR:-demo_runs}
mkdir -p "$WORK_DIR"

stage() { printf '\n=== stage %s: %s\n' "$1" "$2"; }
pending() { printf '    not run: %s (tracked in issue %s)\n' "$1" "$2"; }

echo "megatron-miniplm pipeline, work dir: $WORK_DIR"
stage 0 "models: parameter counts of the presets this pipeline uses"
$PYTHON tools/model_info.py --model-preset qwen-104M --model-preset qwen-200M \
    --model-preset smollm2-135M --model-preset tiny

stage 1 "preprocess the corpus into MiniPLM instances"
pending "tools/preprocess_data.py" 4
stage 2 "split D_ref"
pending "tools/split_dataset.py" 4
stage 3 "train the reference LM on D_ref"
pending "tools/pretrain_gpt.py" 5
stage 4 "import the teacher (SmolLM2-135M from its GGUF file)"
pending "tools/convert_checkpoint.py" 6
stage 5 "score every instance with teacher and reference"
pending "tools/score_docs.py" 7
stage 6 "Difference Sampling"
pending "tools/difference_sample.py" 8
stage 7 "train the MiniPLM student and the uniform-baseline student"
pending "tools/pretrain_gpt.py" 5
stage 8 "evaluate both students"
pending "tools/evaluate.py" 9
