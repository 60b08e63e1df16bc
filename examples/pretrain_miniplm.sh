#!/usr/bin/env bash
# The whole MiniPLM pipeline from one config (tools/pipeline.py):
#   corpus -> preprocess -> split D_ref -> train reference -> import teacher -> score (teacher,
#   reference) -> Difference Sampling (+ baselines of the same token budget) -> train the students
#   (same steps, seed) -> evaluate on held-out documents -> comparison table.
#
#   bash examples/pretrain_miniplm.sh [CONFIG.yaml] [key=value ...] [--dry-run]
#
# Without a config it runs the small CPU demo (`make demo`); examples/configs/ has the demo's
# config written out and the paper's 50B-token setting. The environment variables it reads
# (WORK_DIR, ALPHA, TEACHER, CORPUS_TRAIN, SEQ_LENGTH, REF_MODEL, NNODES,
# NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, TP, ...) override the config; key=value overrides them.
# A finished stage is skipped unless what it is made with changed; a changed stage reruns with
# every stage after it. Several nodes: run this on each node with NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT and NPROC_PER_NODE set and a work directory every node sees; under Slurm run it
# once, with LAUNCHER=srun (examples/slurm/). Exit status 3: a stage was stopped by SIGTERM
# after saving; run the same command again to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tools/pipeline.py "$@"
